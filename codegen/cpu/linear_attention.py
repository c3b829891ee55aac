"""TensorIR of the CPU ``linear_attention`` kernel: ONNX LinearAttention (opset 27).

The reference's semantics (``runtime.reference._linear_attention``), all in float32 whatever
the element types (results rounded once at the end):

- q [B, T, Hq*dk], k [B, T, Hkv*dk], v [B, T, Hkv*dv]; each kv head h keeps a state S [dk, dv]
  (past_state [B, Hkv, dk, dv], zeros without it), read by its group of Hq / Hkv query heads
  (query head qh reads kv head qh // (Hq / Hkv));
- at each step t, in this order: ``gated`` / ``gated_delta`` scale row d of S by
  exp(decay[b, t, h*dk + d]) (decay [B, T, Hkv*dk]) or all of S by exp(decay[b, t, h])
  (decay [B, T, Hkv]); ``delta`` / ``gated_delta`` replace v_t by
  beta * (v_t - S^T k_t) (beta [B, T, Hkv] or [B, T, 1]: one rate for every head), with the
  already decayed S; then S += k_t v_t^T, and each query head writes
  y[b, t, qh*dv + m] = scale * sum_d q_t[d] S[d, m];
- scale 0 means 1 / sqrt(dk); present_state is the final S.

Loop structure: the (batch entry, kv head) pairs are independent recurrences, so they are the
one parallel loop (no synchronisation between steps); inside it a serial time loop. Each pair
keeps S in a float32 scratch [dk, dv]; each step first converts its k, v, q rows (and decay,
beta) to float32 scratch (so no bf16 value is ever loaded inside a let binding: TVM's bf16
legalization leaves such a load unconverted), then updates S. Every product over d runs with
d outermost and the state's columns m innermost: contiguous in S, a loop LLVM vectorizes, each
column still summed in d order.

No kernel (CPUBackendError; the node then runs on the host): non-float operands or results
(ONNX allows f16 / bf16 / f32; f64 is computed in float32 as the reference does), element
types without a TVM dtype, head sizes not known at compile time (the packed last dims must be
static: the heads are unpacked with constant strides), past_state / decay / beta of other
ranks than ONNX's (4, 3, 3: the type rules leave them open, the reference reshapes them), and
shapes the reference itself would reject (last dims that do not split into the heads, a decay
that is neither per head nor per key dim, a beta that is neither per kv head nor shared).
"""
from __future__ import annotations

import math

import numpy as np

from qcompiler.codegen.cpu.ops.common import (Dims, is_float_dtype, kernel_name, tvm_dtype,
                                              unsupported)
from qcompiler.codegen.cpu.tir_builder import (build_kernel, i64, loop, parallel_min_elements,
                                               param, scratch, static_sizes)
from qcompiler.ir.core import Node

OPERANDS = ("q", "k", "v", "past_state", "decay", "beta")
RESULTS = ("y", "present_state")
_F32 = "float32"


def primfunc_for_linear_attention(node: Node, params=None, module=None, known=()):
    """(kernel name, PrimFunc) of a linear_attention node; (name, None) for a known name.
    Raises CPUBackendError naming the node and op when it has no kernel."""
    shape = _check(node)
    # one thread below parallel_min_elements state updates: B * T * Hkv * dk * dv, times the reads
    min_elements = parallel_min_elements(params)
    return build_kernel(kernel_name(node, {}), known,
                        lambda: _Kernel(node, shape).emit(min_elements))


def _check(node: Node) -> dict:
    """The static sizes of the heads (dk, dv, decay_per_key, beta_shared), or
    CPUBackendError."""
    a = node.attrs
    hq, hkv = a["q_num_heads"], a["kv_num_heads"]
    values = _operands(node)
    for name, v in list(values.items()) + list(zip(RESULTS, node.results)):
        if v is None:
            continue
        if not is_float_dtype(tvm_dtype(v.type.dtype, node)):  # refuses types without a TVM one
            raise unsupported(node, f"{name} of {v.type.dtype.name} (float types only)")
    for name, v in values.items():
        # the type rules fix q, k, v as [B, T, H*D] but not the optional operands' ranks
        # (the reference reshapes whatever it gets); the kernel indexes the ONNX shapes
        want = 4 if name == "past_state" else 3
        if v is not None and v.type.rank != want:
            raise unsupported(node, f"{name} of rank {v.type.rank} (ONNX's is {want})")
    last = {}
    for name in ("q", "k", "v", "decay", "beta"):
        v = values[name]
        if v is not None:
            last[name] = v.type.shape[2]
            if not isinstance(last[name], int):
                raise unsupported(node, f"{name}'s last dim {last[name]} is not static (the "
                                        "head sizes must be known)")
    if last["q"] % hq or last["v"] % hkv:
        raise unsupported(node, f"q [.., {last['q']}] / v [.., {last['v']}] do not split into "
                                f"{hq} / {hkv} heads")
    dk, dv = last["q"] // hq, last["v"] // hkv
    if last["k"] != hkv * dk:
        raise unsupported(node, f"k [.., {last['k']}] is not {hkv} heads of q's {dk}")
    past = values["past_state"]
    if past is not None and any(isinstance(d, int) and d != w for d, w in
                                zip(past.type.shape[1:], (hkv, dk, dv))):
        raise unsupported(node, f"past_state {past.type.shape} is not [B, {hkv}, {dk}, {dv}]")
    decay_per_key = False
    if "decay" in last:
        if last["decay"] not in (hkv, hkv * dk):
            raise unsupported(node, f"decay [.., {last['decay']}] is neither {hkv} (per head) "
                                    f"nor {hkv * dk} (per key dim)")
        decay_per_key = last["decay"] == hkv * dk
    beta_shared = False
    if "beta" in last:
        if last["beta"] not in (1, hkv):
            raise unsupported(node, f"beta [.., {last['beta']}] is neither {hkv} nor 1")
        beta_shared = last["beta"] == 1
    return {"dk": dk, "dv": dv, "decay_per_key": decay_per_key, "beta_shared": beta_shared}


def _operands(node: Node) -> dict:
    """Operand name -> value (None when absent or not given: the list may stop early)."""
    return {name: node.operand(i) for i, name in enumerate(OPERANDS)}


class _Kernel:
    """Emits the parameters and body of one linear_attention node's PrimFunc (``emit``, run
    by ``build_kernel``)."""

    def __init__(self, node: Node, shape: dict):
        a = node.attrs
        self.hq, self.hkv = a["q_num_heads"], a["kv_num_heads"]
        self.group = self.hq // self.hkv
        self.dk, self.dv = shape["dk"], shape["dv"]
        self.decay_per_key, self.beta_shared = shape["decay_per_key"], shape["beta_shared"]
        # the reference: ``scale or 1 / sqrt(dk)``, then np.float32 of it
        self.scale = float(np.float32(a["scale"] or 1.0 / math.sqrt(self.dk)))
        self.present = [name for name, v in zip(OPERANDS, node.operands) if v is not None]
        self.dtypes = {name: tvm_dtype(v.type.dtype, node)
                       for name, v in list(zip(OPERANDS, node.operands)) +
                       list(zip(RESULTS, node.results)) if v is not None}
        # Every buffer's shape is written with q's batch and time dims: the call then checks
        # that the operands agree (TVM binds B, T from q and tests the others against them)
        dims = Dims()
        self.batch, self.steps = (dims.dim(d) for d in node.operands[0].type.shape[:2])
        bt = (self.batch, self.steps)
        state = (self.batch, i64(self.hkv), i64(self.dk), i64(self.dv))
        values = _operands(node)
        decay, beta = (values[name].type.shape[2] if values[name] is not None else 0
                       for name in ("decay", "beta"))
        self.shapes = {
            "q": bt + (i64(self.hq * self.dk),), "k": bt + (i64(self.hkv * self.dk),),
            "v": bt + (i64(self.hkv * self.dv),), "past_state": state,
            "decay": bt + (i64(decay),), "beta": bt + (i64(beta),),
            "y": bt + (i64(self.hq * self.dv),), "present_state": state}

    # -- small helpers -----------------------------------------------------------------------

    @staticmethod
    def float32_scratch(name: str, shape):
        """A float32 buffer of the current scope (inside the parallel loop: each thread its
        own)."""
        return scratch(name, tuple(i64(d) for d in shape), _F32)

    def each_cell(self, store) -> None:
        """``store(d, m)`` over the state's [dk, dv] cells, m innermost."""
        with loop(self.dk, "d") as d:
            with loop(self.dv, "m") as m:
                store(d, m)

    def column_sums(self, out, row) -> None:
        """out[m] = sum_d row(d) * S[d, m], summed in d order with m innermost."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        s = self.s
        with loop(self.dv, "m") as m:
            T.buffer_store(out, tirx.const(0.0, _F32), [m])
        self.each_cell(lambda d, m: T.buffer_store(out, out[m] + row(d) * s[d, m], [m]))

    # -- the function ------------------------------------------------------------------------

    def emit(self, min_elements: int) -> None:
        """The parameters and body of the PrimFunc (inside ``build_kernel``)."""
        from tvm import tirx

        self.buf = {name: param(name, self.shapes[name], self.dtypes[name])
                    for name in self.present + list(RESULTS)}
        # the pairs are independent: one parallel loop, the time loop inside each
        # (single-threaded when the whole recurrence is small)
        sizes = static_sizes(self.batch, self.steps)
        worth = sizes is None or sizes[0] * sizes[1] * self.hkv * self.dk * self.dv \
            * (self.group + 2) >= min_elements
        with loop(self.batch * i64(self.hkv), "bh", parallel=worth) as bh:
            self.pair(tirx.floordiv(bh, i64(self.hkv)), tirx.floormod(bh, i64(self.hkv)))

    def pair(self, b, h) -> None:
        """The recurrence of kv head h of batch entry b."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        buf, dk, dv, group = self.buf, self.dk, self.dv, self.group
        # per-pair float32 scratch: the state, and each step's rows of k, v (the value that
        # the state gains: beta * (v - S^T k) under a delta rule), the group's q rows, the
        # decay factors, beta, and one row of column sums
        self.s = self.float32_scratch("s", (dk, dv))
        k_t, u_t = self.float32_scratch("k_t", (dk,)), self.float32_scratch("u_t", (dv,))
        q_t = self.float32_scratch("q_t", (group * dk,))
        sums = self.float32_scratch("sums", (dv,))
        decay, beta = buf.get("decay"), buf.get("beta")
        # exp(decay) per key dim (row d of the state) or one for the whole head
        rows = dk if self.decay_per_key else 1
        g_t = self.float32_scratch("g_t", (rows,)) if decay is not None else None
        beta_t = self.float32_scratch("beta_t", (1,)) if beta is not None else None
        past = buf.get("past_state")
        s = self.s
        self.each_cell(lambda d, m: T.buffer_store(
            s, past[b, h, d, m].astype(_F32) if past is not None else tirx.const(0.0, _F32),
            [d, m]))
        with loop(self.steps, "t") as t:
            with loop(dk, "d") as d:
                T.buffer_store(k_t, buf["k"][b, t, h * i64(dk) + d].astype(_F32), [d])
            with loop(dv, "m") as m:
                T.buffer_store(u_t, buf["v"][b, t, h * i64(dv) + m].astype(_F32), [m])
            with loop(group * dk, "j") as j:
                T.buffer_store(q_t, buf["q"][b, t, h * i64(group * dk) + j].astype(_F32), [j])
            if decay is not None:
                with loop(rows, "d") as d:
                    T.buffer_store(g_t, tirx.exp(decay[b, t, h * i64(rows) + d].astype(_F32)),
                                   [d])
                self.each_cell(lambda d, m: T.buffer_store(
                    s, s[d, m] * g_t[d if self.decay_per_key else i64(0)], [d, m]))
            if beta is not None:
                # the delta rule: the value becomes beta * (v - S^T k), S already decayed
                T.buffer_store(beta_t, beta[b, t, i64(0) if self.beta_shared else h]
                               .astype(_F32), [i64(0)])
                self.column_sums(sums, lambda d: k_t[d])
                with loop(dv, "m") as m:
                    T.buffer_store(u_t, beta_t[i64(0)] * (u_t[m] - sums[m]), [m])
            self.each_cell(lambda d, m: T.buffer_store(s, s[d, m] + k_t[d] * u_t[m], [d, m]))
            # each query head of the group reads the updated state
            with loop(group, "g") as g:
                self.column_sums(sums, lambda d: q_t[g * i64(dk) + d])
                with loop(dv, "m") as m:
                    qh = h * i64(group) + g
                    T.buffer_store(buf["y"],
                                   (tirx.const(self.scale, _F32) * sums[m])
                                   .astype(self.dtypes["y"]),
                                   [b, t, qh * i64(dv) + m])
        self.each_cell(lambda d, m: T.buffer_store(
            buf["present_state"], s[d, m].astype(self.dtypes["present_state"]), [b, h, d, m]))
