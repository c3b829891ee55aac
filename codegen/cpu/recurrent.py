"""TensorIR of the CPU ``recurrent`` kernel: ONNX RNN / GRU / LSTM over a whole sequence.

The reference's semantics (``runtime.reference._recurrent``), step by step:

- gate order i o f c for lstm, z r h for gru; x [S, B, I] (layout 1: [B, S, I]), w [D, G*H, I],
  r [D, G*H, H], b [D, 2*G*H] (the W biases, then the R biases), sequence_lens [B],
  initial_h / initial_c [D, B, H] (layout 1: [B, D, H]), p [D, 3*H] (peepholes i o f);
- each direction's activations (f, g, h) with their alpha / beta; ``clip`` > 0 clips every
  activation's input to [-clip, clip];
- gru: linear_before_reset applies the reset gate after the recurrent product (and its bias),
  else to h before it;
- a batch entry runs its sequence_lens[b] valid steps (the reverse direction, and the second
  one of bidirectional, from step sequence_lens[b] - 1 down to 0); past them its state is kept
  and Y is 0; a sequence_lens outside [0, S] fails the call (the reference raises).

Loop structure: W and R are first copied transposed ([D, I, G*H], [D, H, G*H]) into scratch
buffers of the compute type, so that the gate products run along contiguous gate rows (a loop
LLVM vectorizes; each row is still summed in input order). The (direction, batch entry) pairs
are independent recurrences, so they are the one parallel loop (no synchronisation between
time steps); inside it a serial time loop runs the gate products (x_t W^T + Wb, then h R^T,
then + Rb, the reference's order), then the elementwise state update. The state h (and c)
lives in a scratch buffer of the compute type per pair: float32 for f32 / f16 / bf16, float64
for f64, as the reference computes (only Y, Y_h and Y_c are rounded to x's type).

No kernel (CPUBackendError; the node then runs on the host): non-float x / w / r / b /
initial states / peepholes, non-integer sequence_lens, element types without a TVM dtype,
lstm's input_forget (the op does not carry it; the importer refuses it), a layout other than
0 or 1, an activation this module does not know.
"""
from __future__ import annotations

from qcompiler.codegen.cpu.ops import scalar
from qcompiler.codegen.cpu.ops.common import (Dims, compute_dtype, is_float_dtype, kernel_name,
                                              tvm_dtype, unsupported)
from qcompiler.codegen.cpu.tir_builder import (bind, build_kernel, check, i64, loop,
                                               parallel_min_elements, param, scratch, static_sizes)
from qcompiler.ir.core import Node
from qcompiler.ir.ops import RECURRENT_GATES

OPERANDS = ("x", "w", "r", "b", "sequence_lens", "initial_h", "initial_c", "p")


def primfunc_for_recurrent(node: Node, params=None, module=None, known=()):
    """(kernel name, PrimFunc) of a recurrent node; (name, None) for a known name.
    Raises CPUBackendError naming the node and op when it has no kernel."""
    dtypes = _check(node)
    # one thread below parallel_min_elements multiply-adds: S * D * B * G*H * (I + H)
    min_elements = parallel_min_elements(params)
    return build_kernel(kernel_name(node, {}), known,
                        lambda: _Kernel(node, dtypes).emit(min_elements))


def _check(node: Node) -> dict:
    """The TVM dtype of each present operand by name, or CPUBackendError."""
    a = node.attrs
    if a.get("input_forget", 0):
        raise unsupported(node, "lstm input_forget (the reference does not implement it)")
    if a["layout"] not in (0, 1):
        raise unsupported(node, f"layout {a['layout']} (0 or 1)")
    for name in a["activations"].split(","):
        if name not in _ACTIVATIONS:
            raise unsupported(node, f"activation {name!r}")
    if len(node.results) != (3 if a["kind"] == "lstm" else 2):
        raise unsupported(node, f"{len(node.results)} results for {a['kind']}")
    dtypes = {}
    for name, v in zip(OPERANDS, node.operands):
        if v is None:
            continue
        dtype = tvm_dtype(v.type.dtype, node)  # refuses types without a TVM dtype
        if name == "sequence_lens":
            if v.type.dtype.kind not in ("int", "uint"):
                raise unsupported(node, f"sequence_lens of {v.type.dtype.name}")
        elif not is_float_dtype(dtype):
            raise unsupported(node, f"{name} of {v.type.dtype.name} (float types only)")
        dtypes[name] = dtype
    for r in node.results:
        if tvm_dtype(r.type.dtype, node) != dtypes["x"]:
            raise unsupported(node, f"result {r.type} is not of x's type "
                                    f"{node.operands[0].type.dtype.name}")
    return dtypes


# --------------------------------------------------------------------------------------------
# activations: the reference's formulas in the compute type (NaN propagates where numpy's does)
# --------------------------------------------------------------------------------------------


def _select_clamp(v, lo, hi):
    """np.clip(v, lo, hi): a NaN stays NaN (comparisons are false), where max / min would
    drop it."""
    from tvm import tirx

    return tirx.Select(v < lo, lo, tirx.Select(v > hi, hi, v))


def _tanh(v):
    from tvm import tirx

    # float32: the op library's tanh (TVM's goes through exp and loses the low bits near 0)
    return scalar.tanh_f32(v) if scalar.dtype_of(v) == "float32" else tirx.tanh(v)


def _softplus(v):
    """np.logaddexp(v, 0) = max(v, 0) + log1p(exp(-|v|)), without overflow."""
    from tvm import tirx

    zero = tirx.const(0.0, scalar.dtype_of(v))
    return tirx.Select(v > zero, v, zero) + tirx.log1p(tirx.exp(zero - tirx.abs(v)))


def _activation(name: str, alpha: float, beta: float, ct: str):
    """The activation ``name`` as a function of a TIR value of type ``ct``."""
    from tvm import tirx

    al, be = tirx.const(alpha, ct), tirx.const(beta, ct)
    zero, one = tirx.const(0.0, ct), tirx.const(1.0, ct)
    return {
        "sigmoid": scalar.sigmoid,
        "tanh": _tanh,
        "relu": lambda v: tirx.Select(v < zero, zero, v),
        "affine": lambda v: al * v + be,
        "leakyrelu": lambda v: tirx.Select(v >= zero, v, al * v),
        "thresholdedrelu": lambda v: tirx.Select(v > al, v, zero),
        "scaledtanh": lambda v: al * _tanh(be * v),
        "hardsigmoid": lambda v: _select_clamp(al * v + be, zero, one),
        "elu": lambda v: tirx.Select(v > zero, v, al * (tirx.exp(v) - one)),
        "softsign": lambda v: v / (one + tirx.abs(v)),
        "softplus": _softplus,
    }[name]


_ACTIVATIONS = ("sigmoid", "tanh", "relu", "affine", "leakyrelu", "thresholdedrelu",
                "scaledtanh", "hardsigmoid", "elu", "softsign", "softplus")


# --------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------


class _Kernel:
    """Emits the parameters and body of one recurrent node's PrimFunc (``emit``, run by
    ``build_kernel``)."""

    def __init__(self, node: Node, dtypes: dict):
        a = node.attrs
        self.a = a
        self.kind, self.hidden, self.layout = a["kind"], a["hidden_size"], a["layout"]
        self.clip = a["clip"]
        self.gh = RECURRENT_GATES[self.kind] * self.hidden
        self.dirs = 2 if a["direction"] == "bidirectional" else 1
        self.acts = a["activations"].split(",")
        self.per_dir = len(self.acts) // self.dirs
        self.dtypes = dtypes
        self.dtype = dtypes["x"]
        self.ct = compute_dtype(self.dtype)
        self.present = [name for name, v in zip(OPERANDS, node.operands) if v is not None]
        self.results = ["y", "y_h", "y_c"][:len(node.results)]
        # gru without linear_before_reset: the h gate's recurrent product takes r * h, known
        # only after the r gate, so its R rows are a second product
        self.gru_reset_first = self.kind == "gru" and not a["linear_before_reset"]
        # Every buffer's shape is written with x's dims (S, B, I) and the attributes' (D, H):
        # the call then checks that the operands agree (TVM binds S, B, I from x and tests
        # every other shape against them)
        dims = Dims()
        xs = [dims.dim(d) for d in node.operands[0].type.shape]
        self.seq, self.batch, self.inputs = (xs[1], xs[0], xs[2]) if self.layout else xs
        d, h, gh = i64(self.dirs), i64(self.hidden), i64(self.gh)
        state = (self.batch, d, h) if self.layout else (d, self.batch, h)
        self.shapes = {
            "x": xs, "w": (d, gh, self.inputs), "r": (d, gh, h), "b": (d, i64(2 * self.gh)),
            "sequence_lens": (self.batch,), "initial_h": state, "initial_c": state,
            "p": (d, i64(3 * self.hidden)),
            "y": (self.batch, self.seq, d, h) if self.layout else (self.seq, d, self.batch, h),
            "y_h": state, "y_c": state}

    # -- small helpers -----------------------------------------------------------------------

    def const(self, v):
        from tvm import tirx

        return tirx.const(v, self.ct)

    def clipped(self, v):
        """The activation's input clipped to [-clip, clip] when clip > 0."""
        if self.clip > 0:
            return _select_clamp(v, self.const(-self.clip), self.const(self.clip))
        return v

    def state_index(self, d, b, u):
        return [b, d, u] if self.layout else [d, b, u]

    def y_index(self, t, d, b, u):
        return [b, t, d, u] if self.layout else [t, d, b, u]

    def activation(self, k: int, d):
        """The k-th activation (f, g, h) of direction d: a Select between the two directions'
        when they differ."""
        from tvm import tirx

        a = self.a

        def of(i):
            return (self.acts[i], a["activation_alpha"][i], a["activation_beta"][i])

        first = _activation(*of(k), self.ct)
        if self.dirs == 1 or of(k) == of(self.per_dir + k):
            return first
        second = _activation(*of(self.per_dir + k), self.ct)
        return lambda v: tirx.Select(d == i64(0), first(v), second(v))

    # -- the function ------------------------------------------------------------------------

    def emit(self, min_elements: int) -> None:
        """The parameters and body of the PrimFunc (inside ``build_kernel``)."""
        from tvm import tirx

        buf = {}
        for name in self.present:
            buf[name] = param(name, self.shapes[name], self.dtypes[name])
        for name in self.results:
            buf[name] = param(name, self.shapes[name], self.dtype)
        self.buf = buf
        lens = buf.get("sequence_lens")
        if lens is not None:
            # the reference raises on these; the kernel would read x out of bounds
            with loop(self.batch, "entry") as entry:
                n = lens[entry].astype("int64")
                check(tirx.all(n >= i64(0), n <= self.seq),
                      "recurrent: a sequence_lens entry is outside [0, seq]")
        # the (direction, batch entry) pairs are independent: one parallel loop, the time
        # loop inside each (single-threaded when the whole recurrence is small)
        sizes = static_sizes(self.seq, self.batch, self.inputs)
        worth = sizes is None or sizes[0] * self.dirs * sizes[1] * self.gh * \
            (sizes[2] + self.hidden) >= min_elements
        # W and R transposed to [D, I, G*H] / [D, H, G*H] in the compute type, once per
        # call: the gate products then run along contiguous gate rows, a loop LLVM
        # vectorizes (along W's rows they would be float sums it may not reorder)
        self.w_t = self.transposed("w_t", buf["w"], self.inputs, worth)
        self.r_t = self.transposed("r_t", buf["r"], i64(self.hidden), worth)
        with loop(i64(self.dirs) * self.batch, "db", parallel=worth) as db:
            self.pair(tirx.floordiv(db, self.batch), tirx.floormod(db, self.batch))

    def transposed(self, name: str, src, n, parallel: bool):
        """``src`` [D, G*H, n] as [D, n, G*H] in the compute type (a new buffer)."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        out = scratch(name, (i64(self.dirs), n, i64(self.gh)), self.ct)
        with loop(i64(self.dirs) * n, "dk", parallel=parallel) as dk:
            d, k = tirx.floordiv(dk, n), tirx.floormod(dk, n)
            with loop(self.gh, "j") as j:
                T.buffer_store(out, src[d, j, k].astype(self.ct), [d, k, j])
        return out

    def pair(self, d, b) -> None:
        """The recurrence of direction d over batch entry b."""
        from tvm.script.ir_builder import tirx as T

        buf, ct, hidden = self.buf, self.ct, self.hidden
        # per-pair scratch (each thread its own): the state in the compute type, the input
        # products x_t W^T + Wb and the recurrent ones h R^T (gru: and the reset h r * h)
        self.h = scratch("h", (hidden,), ct)
        self.c = scratch("c", (hidden,), ct) if self.kind == "lstm" else None
        self.xw = scratch("xw", (self.gh,), ct)
        self.hr = scratch("hr", (self.gh,), ct)
        self.rh = scratch("rh", (hidden,), ct) if self.gru_reset_first else None
        # direction d's biases and peepholes in the compute type, converted once (and so
        # never loaded inside a let binding: TVM's bf16 legalization leaves a bf16 load there
        # unconverted, which then reads its bits as an integer)
        self.bias = self.converted("bias", buf.get("b"), d, 2 * self.gh)
        self.peep = self.converted("peep", buf.get("p"), d, 3 * hidden)
        lens = buf.get("sequence_lens")
        length = self.seq if lens is None else bind("length", lens[b].astype("int64"))
        with loop(hidden, "u") as u:
            for state, init in ((self.h, "initial_h"), (self.c, "initial_c")):
                if state is None:
                    continue
                value = buf[init][tuple(self.state_index(d, b, u))].astype(ct) \
                    if init in buf else self.const(0.0)
                T.buffer_store(state, value, [u])
        with loop(self.seq, "step") as step:
            with T.If(step < length):
                with T.Then():
                    self.step(d, b, step, length)
                with T.Else():
                    # past the entry's length Y is 0 (the valid steps write exactly the
                    # positions below the length, forwards or backwards)
                    with loop(hidden, "u") as u:
                        T.buffer_store(buf["y"], self.const(0.0).astype(self.dtype),
                                       self.y_index(step, d, b, u))
        with loop(hidden, "u") as u:
            T.buffer_store(buf["y_h"], self.h[u].astype(self.dtype), self.state_index(d, b, u))
            if self.c is not None:
                T.buffer_store(buf["y_c"], self.c[u].astype(self.dtype),
                               self.state_index(d, b, u))

    def converted(self, name: str, src, d, n: int):
        """Row d of ``src`` ([D, n]) in a scratch buffer of the compute type; None without
        ``src``."""
        from tvm.script.ir_builder import tirx as T

        if src is None:
            return None
        out = scratch(name, (n,), self.ct)
        with loop(n, "j") as j:
            T.buffer_store(out, src[d, j].astype(self.ct), [j])
        return out

    def product(self, out, rows: range, vec, mat_t, d, n, bias=None) -> None:
        """out[j] = sum_k vec(k) * mat_t[d, k, j] (+ bias(j)) for j in ``rows``: a gate
        product in the compute type, each row summed in k order. The row loop is innermost:
        contiguous in out and in the transposed matrix, with vec(k) fixed."""
        from tvm.script.ir_builder import tirx as T

        def each_row(store):
            with loop(len(rows), "j") as jj:
                store(jj + i64(rows.start))

        each_row(lambda j: T.buffer_store(out, self.const(0.0), [j]))
        with loop(n, "k") as k:
            each_row(lambda j: T.buffer_store(out, out[j] + vec(k) * mat_t[d, k, j], [j]))
        if bias is not None:
            each_row(lambda j: T.buffer_store(out, out[j] + bias(j), [j]))

    def step(self, d, b, step, length) -> None:
        """One valid time step of pair (d, b): the gate products, the state update, Y at t."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        buf, ct, hidden, gh = self.buf, self.ct, self.hidden, self.gh
        x, bias = buf["x"], self.bias
        h, c, xw, hr, rh = self.h, self.c, self.xw, self.hr, self.rh
        # the reverse direction (and the second of bidirectional) reads the entry's valid
        # steps backwards
        backwards = length - i64(1) - step
        direction = self.a["direction"]
        t = bind("t", backwards if direction == "reverse" else
                      tirx.Select(d == i64(1), backwards, step)
                      if direction == "bidirectional" else step)
        f = self.activation(0, d)
        g = self.activation(1, d) if self.per_dir > 1 else None
        hh = self.activation(2, d) if self.per_dir > 2 else None

        def x_t(k):
            return (x[b, t, k] if self.layout else x[t, b, k]).astype(ct)

        def r_bias(j):
            return bias[j + i64(gh)] if bias is not None else self.const(0.0)

        self.product(xw, range(gh), x_t, self.w_t, d, self.inputs,
                     None if bias is None else (lambda j: bias[j]))
        # gru without linear_before_reset: the z and r rows here, the h rows below
        self.product(hr, range(2 * hidden if self.gru_reset_first else gh), lambda k: h[k],
                     self.r_t, d, hidden)

        def gate_in(gate: int, u):
            """x_t W^T + Wb + h R^T + Rb of gate row ``gate * hidden + u``."""
            j = u + i64(gate * hidden)
            return xw[j] + hr[j] + r_bias(j)

        if self.kind == "rnn":
            with loop(hidden, "u") as u:
                T.buffer_store(h, f(bind("hi", self.clipped(gate_in(0, u)))), [u])
        elif self.kind == "gru":
            if self.gru_reset_first:
                # the reset h (r * h, from the old h), then its product with R's h rows
                with loop(hidden, "u") as u:
                    r = bind("r", f(bind("ri", self.clipped(gate_in(1, u)))))
                    T.buffer_store(rh, r * h[u], [u])
                self.product(hr, range(2 * hidden, gh), lambda k: rh[k], self.r_t, d, hidden)
            with loop(hidden, "u") as u:
                z = bind("z", f(bind("zi", self.clipped(gate_in(0, u)))))
                j = u + i64(2 * hidden)
                if self.gru_reset_first:
                    pre = xw[j] + hr[j] + r_bias(j)
                else:  # linear_before_reset: r times the recurrent product and its bias
                    r = bind("r", f(bind("ri", self.clipped(gate_in(1, u)))))
                    pre = xw[j] + r * (hr[j] + r_bias(j))
                n = bind("n", g(bind("ni", self.clipped(pre))))
                T.buffer_store(h, (self.const(1.0) - z) * n + z * h[u], [u])
        else:  # lstm: gates i o f c; peepholes p = [pi, po, pf] on c (o: on the new c)
            p = self.peep

            def peephole(k, u):
                return p[u + i64(k * hidden)] if p is not None else self.const(0.0)

            with loop(hidden, "u") as u:
                i = bind("i", f(bind("ii", self.clipped(
                    gate_in(0, u) + peephole(0, u) * c[u]))))
                fg = bind("fg", f(bind("fi", self.clipped(
                    gate_in(2, u) + peephole(2, u) * c[u]))))
                cc = bind("cc", g(bind("ci", self.clipped(gate_in(3, u)))))
                new_c = bind("new_c", fg * c[u] + i * cc)
                o = bind("o", f(bind("oi", self.clipped(
                    gate_in(1, u) + peephole(1, u) * new_c))))
                T.buffer_store(c, new_c, [u])
                T.buffer_store(h, o * hh(new_c), [u])
        with loop(hidden, "u") as u:
            T.buffer_store(buf["y"], h[u].astype(self.dtype), self.y_index(t, d, b, u))
