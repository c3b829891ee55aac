"""TensorIR of the CPU ``conv`` and ``conv_transpose`` kernels (issue #13): N-d, grouped, dilated.

``conv`` is what ONNX Conv becomes when it is not quantized (the int8 ``qconv`` is conv.py's):
float x and w (f16 / bf16 summed in float32, f64 in float64, as the reference's compute
dtype), or the integer operands of ConvInteger (widened and zero-point-shifted by the frontend),
summed in int64 and wrapped to the i32 result as the reference does. ``conv_transpose`` is ONNX
ConvTranspose with its pads, output_padding (the frontend turns output_shape and auto_pad into
those), groups and dilations; float only, as ONNX.

Layouts are the node's own: x [N, C, *sp], conv's w [M, C/g, *k], conv_transpose's w
[C, M/g, *k], optional bias [M], result [N, M, *out]. The batch may be a symbol; channels, the
kernel and the spatial dims must be static (else CPUBackendError: the node runs on the host).

- conv: x is first copied into a zero-padded buffer covering exactly the windows' span (so the
  sum reads it without bounds checks), then ``acc[n, m, *o] = sum_{c, *k} xp[n, g*C/g + c,
  o*s + k*d] * w[m, c, *k]``.
- conv_transpose in two stages per (batch, output channel) plane: ``cols[*k, *i] = sum_c
  x[n, c, *i] * w[c, m, *k]`` (what input position i adds through tap k: every product once,
  as the reference's tensordot), then the output gathers them: position f = o + pad (in the
  uncropped result) takes tap k from input i when ``i*s + k*d == f``, i.e. when ``f - k*d`` is
  a non-negative multiple of s below s * in (K adds per output, no multiplies). The plain
  gather form, all products under a phase test, was 10x slower ([1, 64, 28, 28] x
  [64, 32, 4, 4], stride 2: 44 ms vs 4 ms, numpy's host fallback 10-18 ms).

Schedule: the output rows (all loops but the innermost output dim) are fused and run in
parallel (conv_transpose: the planes, cols computed under each); per row, the reduction loops
(channels, taps) run outside the output columns, so the innermost loop is an axpy over a row
of sums that LLVM vectorizes; a row's sums live in a row-sized scratch and are written out
once, with the bias, in the result's type. (A [1, 64, 56, 56] 3x3 conv, 64 outputs: 7-11 ms on
this 2-core VM, numpy's host fallback 650 ms.)
"""
from __future__ import annotations

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.codegen.cpu.ops.common import (Dims, compute_dtype, is_float_dtype, kernel_name,
                                              tvm_dtype)
from qcompiler.ir.core import Node

# Below this many output elements the kernel stays on one thread (as the op library's schedules)
_PARALLEL_MIN_ELEMENTS = 4096


def primfunc_for_conv(node: Node, params=None, module=None, known=()):
    """(kernel name, scheduled PrimFunc) of a conv or conv_transpose node; (name, None) for a
    known name. Raises CPUBackendError for shapes and types without a kernel."""
    _check(node)
    name = kernel_name(node, {})
    if name in known:
        return name, None
    min_elements = getattr(params, "parallel_min_elements", _PARALLEL_MIN_ELEMENTS)
    build = _build_conv if node.op == "conv" else _build_conv_transpose
    return name, build(node, min_elements).with_attr("global_symbol", name)


def _check(node: Node) -> None:
    where = f"%{node.results[0].name} = {node.op}"
    x, w = node.operands[0], node.operands[1]
    y = node.results[0]
    if x.type.rank < 3 or w.type.rank != x.type.rank:
        raise CPUBackendError(f"{where}: x {x.type.shape} with w {w.type.shape} has no CPU "
                              "kernel")
    static = (list(x.type.shape[1:]) + list(w.type.shape) + list(y.type.shape[1:]))
    if not all(isinstance(d, int) for d in static):
        raise CPUBackendError(f"{where}: the CPU kernel needs static channels, kernel and "
                              f"spatial dims, not x {x.type.shape}, w {w.type.shape}, result "
                              f"{y.type.shape} (the batch may be a symbol)")
    if any(p < 0 for p in node.attrs["pads"]):
        raise CPUBackendError(f"{where}: negative pads {node.attrs['pads']} have no CPU kernel")
    operands = [v for v in node.operands if v is not None]
    dtypes = {tvm_dtype(v.type.dtype, node) for v in operands}  # refuses unknown types
    floats = [is_float_dtype(d) for d in dtypes]
    if node.op == "conv_transpose" and not all(floats):
        raise CPUBackendError(f"{where}: {x.type.dtype} has no CPU kernel (float only)")
    if any(floats) and len(dtypes) > 1:
        raise CPUBackendError(f"{where}: mixed operand types {sorted(dtypes)} have no CPU "
                              "kernel")
    if any(v.type.dtype.kind == "bool" for v in operands):
        raise CPUBackendError(f"{where}: bool operands have no CPU kernel")


def _i64(v: int):
    from tvm import tirx

    return tirx.IntImm("int64", v)


def _placeholders(node: Node, dims: Dims) -> list:
    """te placeholders of the operands that are not none (the kernel's parameters, in order)."""
    from tvm import te

    return [None if v is None else te.placeholder(dims.shape(v.type),
                                                  tvm_dtype(v.type.dtype, node), name=f"in{i}")
            for i, v in enumerate(node.operands)]


def _accumulator_dtype(node: Node) -> str:
    dtype = tvm_dtype(node.operands[0].type.dtype, node)
    # integer operands (ConvInteger's i32): the reference sums in int64, then wraps to i32
    return compute_dtype(dtype) if is_float_dtype(dtype) else "int64"


def _build_conv(node: Node, min_elements: int):
    from tvm import te, tirx

    a = node.attrs
    dims = Dims()
    ph = _placeholders(node, dims)
    x, w, b = ph[0], ph[1], (ph[2] if len(ph) > 2 else None)
    x_shape = node.operands[0].type.shape
    m, cg, *kernel = node.operands[1].type.shape
    c, sp = x_shape[1], list(x_shape[2:])
    nsp = len(sp)
    y_type = node.results[0].type
    out_sp = list(y_type.shape[2:])
    out_dtype = tvm_dtype(y_type.dtype, node)
    strides, dil, pads = a["strides"], a["dilations"], a["pads"]
    mg = m // a["group"]
    ct = _accumulator_dtype(node)
    n = dims.dim(x_shape[0])
    # The padded span the windows read: up to the last window's last tap (a stride's leftover
    # columns of x are never read).
    span = [(out_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nsp)]

    def padded(nn, cc, *pos):
        coords = [pos[i] - pads[i] for i in range(nsp)]
        inside = tirx.all(*[tirx.all(coords[i] >= 0, coords[i] < sp[i]) for i in range(nsp)])
        v = x(nn, cc, *[tirx.max(tirx.min(coords[i], sp[i] - 1), 0) for i in range(nsp)])
        # if_then_else, not Select: TVM drops the clamp of a Select's branch under its
        # condition, and a Select loads both branches (a read outside x)
        return tirx.if_then_else(inside, v.astype(ct), tirx.const(0, ct))
    xp = te.compute([n, _i64(c)] + [_i64(s) for s in span], padded, name="xp")
    rc = te.reduce_axis((0, cg), name="rc")
    rk = [te.reduce_axis((0, k), name=f"rk{i}") for i, k in enumerate(kernel)]

    def acc_fn(nn, mm, *o):
        xv = xp(nn, (mm // mg) * cg + rc, *[o[i] * strides[i] + rk[i] * dil[i]
                                             for i in range(nsp)])
        return te.sum(xv * w(mm, rc, *rk).astype(ct), axis=[rc, *rk])
    out_shape = [n, _i64(m)] + [_i64(s) for s in out_sp]
    acc = te.compute(out_shape, acc_fn, name="acc")
    out = te.compute(out_shape, _with_bias(acc, b, ct, out_dtype), name="out")
    inputs = [p for p in ph if p is not None]
    return _schedule(te.create_prim_func(inputs + [out]), out_shape, min_elements,
                     staged=["xp"])


def _build_conv_transpose(node: Node, min_elements: int):
    from tvm import te, tirx

    a = node.attrs
    dims = Dims()
    ph = _placeholders(node, dims)
    x, w, b = ph[0], ph[1], (ph[2] if len(ph) > 2 else None)
    x_shape = node.operands[0].type.shape
    c, mg, *kernel = node.operands[1].type.shape
    sp = list(x_shape[2:])
    nsp = len(sp)
    y_type = node.results[0].type
    out_sp = list(y_type.shape[2:])
    strides, dil, pads = a["strides"], a["dilations"], a["pads"]
    cg = c // a["group"]
    m = mg * a["group"]
    ct = _accumulator_dtype(node)
    n = dims.dim(x_shape[0])
    # cols[n, m, *k, *i]: what input position i adds through tap k to output channel m (a
    # sum over the group's input channels only: every product is needed once)
    rc = te.reduce_axis((0, cg), name="rc")

    def cols_fn(nn, mm, *ki):
        k, i = ki[:nsp], ki[nsp:]
        cc = (mm // mg) * cg + rc
        return te.sum(x(nn, cc, *i).astype(ct) * w(cc, mm % mg, *k).astype(ct), axis=rc)
    cols = te.compute([n, _i64(m)] + [_i64(k) for k in kernel] + [_i64(d) for d in sp],
                      cols_fn, name="cols")
    rk = [te.reduce_axis((0, k), name=f"rk{i}") for i, k in enumerate(kernel)]

    def acc_fn(nn, mm, *o):
        # t: the tap's offset from input 0 along each dim; a whole stride multiple inside x
        t = [o[i] + pads[i] - rk[i] * dil[i] for i in range(nsp)]
        hit = tirx.all(*[tirx.all(t[i] >= 0, tirx.floormod(t[i], strides[i]) == 0,
                                  t[i] < strides[i] * sp[i]) for i in range(nsp)])
        src = [tirx.min(tirx.floordiv(tirx.max(t[i], 0), strides[i]), sp[i] - 1)
               for i in range(nsp)]
        # if_then_else: the load must not run for a tap outside x (see _build_conv)
        return te.sum(tirx.if_then_else(hit, cols(nn, mm, *rk, *src), tirx.const(0, ct)),
                      axis=rk)
    out_shape = [n, _i64(m)] + [_i64(s) for s in out_sp]
    acc = te.compute(out_shape, acc_fn, name="acc")
    out = te.compute(out_shape, _with_bias(acc, b, ct, tvm_dtype(y_type.dtype, node)),
                     name="out")
    inputs = [p for p in ph if p is not None]
    return _schedule_transpose(te.create_prim_func(inputs + [out]), out_shape, min_elements)


def _with_bias(acc, b, ct: str, out_dtype: str):
    def fn(nn, mm, *o):
        v = acc(nn, mm, *o)
        if b is not None:
            v = v + b(mm).astype(ct)
        return v.astype(out_dtype)
    return fn


def _numel(shape):
    from tvm import tirx

    total = 1
    for d in shape:
        if not isinstance(d, tirx.IntImm):
            return None
        total *= int(d)
    return total


def _own_loops(sch, block) -> dict:
    """{position of an iter var of ``block``: the loop that binds it alone}. compute_at drops
    the loops of extent 1 of the region it places, and a fused loop binds several iter vars:
    neither is in the dict."""
    import tvm
    from tvm import tirx

    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    loops = {}
    for lp in sch.get_loops(block):
        var = sch.get(lp).loop_var
        users = [i for i, v in enumerate(realize.iter_values)
                 if any(u.same_as(var) for u in tirx.analysis.undefined_vars(v))]
        if len(users) == 1:
            loops[users[0]] = lp
    return loops


def _sum_row(sch, block, col: int, first_reduce: int):
    """A block placed per row: its reduction loops moved outside its column loop (iter var
    ``col``), so that the innermost loop runs along a row of sums (vectorized by LLVM); the
    init split off before the reduction loops."""
    loops = _own_loops(sch, block)
    red = [loops[i] for i in sorted(loops) if i >= first_reduce]
    if col in loops and red:
        sch.reorder(*red, loops[col])
    if red:  # (a single-term sum, 1x1 depthwise, keeps its init in the block)
        sch.decompose_reduction(block, red[0])


def _schedule(func, out_shape, min_elements: int, staged: list):
    """conv: the padded copy's planes in parallel; one row of sums per parallel iteration."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    numel = _numel(out_shape)
    parallel = numel is None or numel >= min_elements
    for name in staged:
        loops = sch.get_loops(sch.get_sblock(name))
        fused = sch.fuse(*loops[:2])
        if parallel:
            sch.parallel(fused)
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:-1])  # batch x channels x all output dims but the last
    if parallel:
        sch.parallel(row)
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, row)
    rank = len(out_shape)
    _sum_row(sch, acc, rank - 1, rank)
    return sch.mod["main"]


def _schedule_transpose(func, out_shape, min_elements: int):
    """conv_transpose: (batch, channel) planes in parallel; per plane, cols (all taps of all
    input positions) then the output rows, each a row of tap sums."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    numel = _numel(out_shape)
    rank = len(out_shape)
    nsp = rank - 2
    out = sch.get_sblock("out")
    n, m, *o = sch.get_loops(out)
    plane = sch.fuse(n, m)
    if numel is None or numel >= min_elements:
        sch.parallel(plane)
    row = sch.fuse(*o[:-1]) if nsp > 2 else (o[0] if nsp == 2 else plane)
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, row)  # (first: cols' consumer must be under the plane loop)
    _sum_row(sch, acc, rank - 1, rank)
    cols = sch.get_sblock("cols")
    sch.compute_at(cols, plane)
    # cols' iter vars: n, m, taps, input positions, channels; the channels outside the last
    # input dim: an axpy along an input row per channel
    _sum_row(sch, cols, 2 + 2 * nsp - 1, 2 + 2 * nsp)
    return sch.mod["main"]
