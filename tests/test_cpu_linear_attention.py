"""The CPU ``linear_attention`` kernel (codegen/cpu/linear_attention.py: ONNX LinearAttention)
against the reference implementation.

Kernel level: one op library holds a linear_attention node per configuration (every update
rule, decay per key dim and per head, beta per kv head and shared, with and without
past_state, an explicit scale, multi-head / grouped / multi-query heads, dk != dv, one step,
symbolic batch and time, f16 / bf16 / f64 operands and a past_state of another type); each
runs on fresh random inputs (no zeros) into result buffers filled with garbage and is compared
with ``OP_IMPLS["linear_attention"]``. Model level: an ONNX model of LinearAttention nodes
compiled for ``cpu`` through ``qcompiler.compile`` runs every node as a compiled kernel (no
host fallback) and matches the ``ref`` target.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import (HALF_FLOAT_TOLERANCE, KernelGraph, build_kernels,  # noqa: E402
                              check_nodes, check_onnx_model_on_cpu, nonzero_normal,
                              onnx_model, run_kernel)
from qcompiler.codegen.cpu.backend import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import primfunc_for  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402
from qcompiler.runtime.reference import OP_IMPLS  # noqa: E402

RULES = ("linear", "gated", "delta", "gated_delta")
# sizes of the symbolic configurations: batch and time
SIZES = ({"batch": 3, "time": 6}, {"batch": 1, "time": 1})
# per result dtype: (rtol, atol). The kernel computes in float32 as the reference, but sums
# over d in its own order (numpy's einsum pairs them differently), and the state carries the
# rounding from step to step
TOLERANCE = {"f32": (1e-4, 1e-5), "f64": (1e-4, 1e-5), **HALF_FLOAT_TOLERANCE}


class Graph(KernelGraph):
    def __init__(self):
        super().__init__("linear_attention")

    def add(self, key, rule, batch=2, time=5, hq=4, hkv=2, dk=3, dv=4, dtype="f32",
            past=False, past_dtype=None, decay="key", beta="head", scale=0.0):
        """A linear_attention node; ``decay``: key | head (its last dim Hkv*dk or Hkv, used by
        the gated rules), ``beta``: head | shared (Hkv or 1, used by the delta rules)."""
        fn = self.fn

        def arg(last, dt=dtype, shape=None):
            return fn.add_arg(fn.fresh_name("a"), tensor(shape or [batch, time, last], dt))

        gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
        state_dtype = past_dtype or dtype
        operands = [arg(hq * dk), arg(hkv * dk), arg(hkv * dv),
                    arg(0, state_dtype, [batch, hkv, dk, dv]) if past else None,
                    arg(hkv * dk if decay == "key" else hkv) if gated else None,
                    arg(hkv if beta == "head" else 1) if delta else None]
        while operands[-1] is None:
            operands.pop()
        results = [tensor([batch, time, hq * dv], dtype),
                   tensor([batch, hkv, dk, dv], state_dtype)]
        attrs = {"q_num_heads": hq, "kv_num_heads": hkv, "scale": scale, "update_rule": rule}
        return self.add_node(key, "linear_attention", operands, results, attrs)


def _make_graph() -> Graph:
    g = Graph()
    # every rule, with and without past_state; decay per key dim and per head, beta per kv
    # head and shared
    for rule in RULES:
        for past in (False, True):
            g.add("rules", rule, past=past)
    g.add("rules", "gated", decay="head", past=True)
    g.add("rules", "gated_delta", decay="head", beta="shared")
    g.add("rules", "delta", beta="shared", past=True)
    # head grouping: one kv head per query head, groups of 4, a single kv head (multi-query)
    g.add("heads", "gated_delta", hq=3, hkv=3, past=True)
    g.add("heads", "gated_delta", hq=8, hkv=2, dk=4, dv=2, past=True)
    g.add("heads", "linear", hq=4, hkv=1, dk=5, dv=3)
    g.add("heads", "gated_delta", hq=6, hkv=1, dk=2, dv=6, decay="head", beta="shared",
          past=True)
    # scale: explicit (0 is 1 / sqrt(dk)); a single step (decode); head sizes of 1
    g.add("options", "gated_delta", scale=0.37, past=True)
    g.add("options", "linear", scale=2.5)
    g.add("options", "gated_delta", time=1, past=True)
    g.add("options", "gated", dk=1, dv=1, hq=2, hkv=2, past=True)
    g.add("options", "delta", dk=16, dv=16, hq=2, hkv=2, time=7, past=True)
    # symbolic batch and time: one kernel for every size
    g.add("symbolic", "gated_delta", batch="batch", time="time", past=True)
    g.add("symbolic", "linear", batch="batch", time="time", hq=4, hkv=1)
    g.add("symbolic", "gated", batch="batch", time="time", decay="head")
    # other float types (computed in float32, as the reference), and a past_state of its own
    # type (present_state follows it)
    for dtype in ("f16", "bf16", "f64"):
        g.add("dtypes", "gated_delta", dtype=dtype, past=True)
        g.add("dtypes", "linear", dtype=dtype, hq=4, hkv=1)
    g.add("dtypes", "gated_delta", dtype="f32", past=True, past_dtype="f16")
    g.add("dtypes", "delta", dtype="f16", past=True, past_dtype="f32")
    g.add("dtypes", "gated", dtype="bf16", past=True, past_dtype="f32", decay="head")
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_kernels(_make_graph(), tmp_path_factory, "linear_attention")


def _inputs(node, sizes, rng) -> list:
    """q, v, past_state normal; k small (the delta rules expect a unit-norm k: keeps the
    state bounded over the steps); decay negative (log-space, as a forget gate); beta in
    (0.1, 0.9). No zeros anywhere."""
    args = []
    for i, v in enumerate(node.operands):
        if v is None:
            args.append(None)
            continue
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in v.type.shape)
        if i == 4:  # decay
            a = -rng.uniform(0.02, 0.8, shape)
        elif i == 5:  # beta
            a = rng.uniform(0.1, 0.9, shape)
        else:
            a = nonzero_normal(rng, shape, 0.4 if i == 1 else 1.0)
        args.append(a.astype(v.type.dtype.np_dtype))
    return args


def _tolerance(node, want):
    """(rtol, atol) of the result's own type (present_state follows past_state's)."""
    return TOLERANCE[{np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
                      np.dtype(np.float16): "f16"}.get(want.dtype, "bf16")]


# a test per group of _make_graph: (key, sizes of the symbolic dims, seed of the inputs)
@pytest.mark.parametrize("key, sizes_list, seed", [
    # linear / gated / delta / gated_delta, with and without past_state, decay per key dim
    # and per head, beta per kv head and shared
    pytest.param("rules", ({},), 0, id="every_update_rule"),
    # Hq = Hkv, groups of query heads sharing a kv head's state, one kv head (MQA)
    pytest.param("heads", ({},), 1, id="head_grouping"),
    # an explicit scale, one step, head sizes of 1 and of 16 (with a longer sequence)
    pytest.param("options", ({},), 2, id="options"),
    pytest.param("symbolic", SIZES, 3, id="symbolic_batch_and_time"),
    pytest.param("dtypes", ({},), 4, id="other_float_types"),
])
def test_matches_reference(built, key, sizes_list, seed):
    check_nodes(built, key, _inputs, _tolerance, sizes_list, seed)


def test_kernel_follows_state_and_heads(built):
    """On these inputs the reference's own outputs differ where a kernel that ignored
    past_state or read another kv head's state would differ: a
    match rules those out."""
    node = next(n for n in built.graph.nodes["heads"] if n.attrs["q_num_heads"] == 8)
    args = _inputs(node, {}, np.random.default_rng(5))
    outs, want = run_kernel(built, node, args)
    for got, w in zip(outs, want):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-5)
    # without the past state
    want_zero = OP_IMPLS["linear_attention"](node, args[:3] + [None] + args[4:], None)
    assert not np.allclose(want[0], want_zero[0], rtol=1e-3, atol=1e-3)
    # kv heads swapped: a query head reading the wrong state
    swapped = [a.copy() for a in args]
    dk, dv = 4, 2
    for i, d in ((1, dk), (2, dv), (4, dk)):
        swapped[i] = np.concatenate([args[i][..., d:], args[i][..., :d]], axis=-1)
    swapped[3] = args[3][:, ::-1].copy()
    swapped[5] = args[5][..., ::-1].copy()
    want_swapped = OP_IMPLS["linear_attention"](node, swapped, None)
    assert not np.allclose(want[0], want_swapped[0], rtol=1e-3, atol=1e-3)


def test_refused_configurations_name_node_and_op():
    g = Graph()
    # integer q / k / v (not an ONNX LinearAttention type): no kernel
    node = g.add("refused", "linear", dtype="i32")
    with pytest.raises(CPUBackendError, match=r"%\S+, %\S+ = linear_attention: no CPU op "
                                              r"kernel \(q of i32"):
        primfunc_for(node)
    # a decay of 4 dims (the type rules leave the optional operands' ranks open)
    fn = g.fn
    q, k = fn.add_arg("q4", tensor([2, 3, 4], "f32")), fn.add_arg("k4", tensor([2, 3, 4], "f32"))
    decay = fn.add_arg("decay4", tensor([2, 3, 1, 4], "f32"))
    node = fn.make_node("linear_attention", [q, k, k, None, decay],
                        [tensor([2, 3, 4], "f32"), tensor([2, 1, 4, 4], "f32")],
                        {"q_num_heads": 1, "kv_num_heads": 1, "scale": 0.0,
                         "update_rule": "gated"})
    with pytest.raises(CPUBackendError, match=r"linear_attention: no CPU op kernel \(decay of "
                                              r"rank 4"):
        primfunc_for(node)
    # head sizes known only at run time
    q = fn.add_arg("qs", tensor([2, 3, "hd"], "f32"))
    node = fn.make_node("linear_attention", [q, q, q],
                        [tensor([2, 3, "?"], "f32"), tensor([2, 1, "?", "?"], "f32")],
                        {"q_num_heads": 1, "kv_num_heads": 1, "scale": 0.0,
                         "update_rule": "linear"})
    with pytest.raises(CPUBackendError, match=r"linear_attention: no CPU op kernel \(q's "
                                              r"last dim hd is not static"):
        primfunc_for(node)


# --------------------------------------------------------------------------------------------
# through qcompiler.compile: an ONNX model of LinearAttention nodes
# --------------------------------------------------------------------------------------------


def _onnx_model():
    """LinearAttention nodes of every rule over B = 2, T = 5, with past states fed and kept
    as outputs, GQA and MQA heads, per-head decay and a shared beta."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(8)
    B, T = 2, 5
    inputs, feeds, nodes, outputs = [], {}, [], []

    def feed(name, a):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, a.shape))
        feeds[name] = a
        return name

    def normal(*shape, scale=1.0):
        return nonzero_normal(rng, shape, scale).astype(np.float32)

    def node(name, rule, hq, hkv, dk, dv, past=False, decay_per_key=True, shared_beta=False,
             **attrs):
        ins = [feed(f"{name}_q", normal(B, T, hq * dk)),
               feed(f"{name}_k", normal(B, T, hkv * dk, scale=0.4)),
               feed(f"{name}_v", normal(B, T, hkv * dv)),
               feed(f"{name}_past", normal(B, hkv, dk, dv)) if past else ""]
        if rule in ("gated", "gated_delta"):
            width = hkv * dk if decay_per_key else hkv
            ins.append(feed(f"{name}_decay",
                            -rng.uniform(0.02, 0.8, (B, T, width)).astype(np.float32)))
        else:
            ins.append("")
        if rule in ("delta", "gated_delta"):
            ins.append(feed(f"{name}_beta", rng.uniform(
                0.1, 0.9, (B, T, 1 if shared_beta else hkv)).astype(np.float32)))
        while ins[-1] == "":
            ins.pop()
        outs = [f"{name}_y", f"{name}_state"]
        nodes.append(helper.make_node("LinearAttention", ins, outs, name=name, q_num_heads=hq,
                                      kv_num_heads=hkv, update_rule=rule, **attrs))
        outputs.append(helper.make_tensor_value_info(outs[0], TensorProto.FLOAT,
                                                     [B, T, hq * dv]))
        outputs.append(helper.make_tensor_value_info(outs[1], TensorProto.FLOAT,
                                                     [B, hkv, dk, dv]))

    node("lin", "linear", 4, 4, 3, 5, past=True)
    node("gated", "gated", 4, 2, 4, 3, decay_per_key=False)
    node("delta", "delta", 2, 2, 6, 4, past=True, scale=0.5)
    node("gdelta", "gated_delta", 8, 2, 4, 4, past=True)
    node("mqa", "gated_delta", 4, 1, 8, 2, shared_beta=True)
    return onnx_model("linear_attention", nodes, inputs, outputs, [], opset=27), feeds


def test_onnx_linear_attention_compiles_without_host_fallback(tmp_path):
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_linear_attention_", kernel_count=5,
                            output_count=10, tolerance=(1e-4, 1e-5))
