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
- conv_transpose, as a gather: output position f = o + pad (in the uncropped result) takes
  tap k from input i when ``i*s + k*d == f``, i.e. when ``f - k*d`` is a non-negative
  multiple of s below s * in; other taps add 0. (Taps of the wrong phase are computed and
  masked: stride-times more multiplies than a phase-split kernel, simple and exact.)

Schedule (both): the output rows (all loops but the innermost output dim) are fused and run in
parallel; per row, the reduction loops (channels, taps) run outside the output columns, so the
innermost loop is an axpy over a row of sums that LLVM vectorizes; a row's sums live in a
row-sized scratch and are written out once, with the bias, in the result's type.
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
    rc = te.reduce_axis((0, cg), name="rc")
    rk = [te.reduce_axis((0, k), name=f"rk{i}") for i, k in enumerate(kernel)]

    def acc_fn(nn, mm, *o):
        # t: the tap's offset from input 0 along each dim; a whole stride multiple inside x
        t = [o[i] + pads[i] - rk[i] * dil[i] for i in range(nsp)]
        hit = tirx.all(*[tirx.all(t[i] >= 0, tirx.floormod(t[i], strides[i]) == 0,
                                  t[i] < strides[i] * sp[i]) for i in range(nsp)])
        src = [tirx.min(tirx.floordiv(tirx.max(t[i], 0), strides[i]), sp[i] - 1)
               for i in range(nsp)]
        cc = (mm // mg) * cg + rc
        v = x(nn, cc, *src).astype(ct) * w(cc, mm % mg, *rk).astype(ct)
        # if_then_else: the load must not run for a tap outside x (see _build_conv)
        return te.sum(tirx.if_then_else(hit, v, tirx.const(0, ct)), axis=[rc, *rk])
    out_shape = [n, _i64(m)] + [_i64(s) for s in out_sp]
    acc = te.compute(out_shape, acc_fn, name="acc")
    out = te.compute(out_shape, _with_bias(acc, b, ct, tvm_dtype(y_type.dtype, node)),
                     name="out")
    inputs = [p for p in ph if p is not None]
    return _schedule(te.create_prim_func(inputs + [out]), out_shape, min_elements, staged=[])


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


def _schedule(func, out_shape, min_elements: int, staged: list):
    import tvm

    sch = tvm.s_tir.Schedule(func)
    numel = _numel(out_shape)
    parallel = numel is None or numel >= min_elements
    for name in staged:  # the padded copy of x: its planes in parallel
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
    # the block's own loops (column, channels, taps), before compute_at drops those of extent 1
    extents = [int(sch.get(lp).extent) for lp in sch.get_loops(acc)[len(out_shape) - 1:]]
    sch.compute_at(acc, row)  # one row of sums per iteration
    kept = [i for i, e in enumerate(extents) if e != 1]
    loops = dict(zip(kept, sch.get_loops(acc)[1:]))
    col = loops.pop(0, None)
    red = list(loops.values())
    if col is not None and red:
        sch.reorder(*red, col)  # channels and taps outside the row: an axpy per tap
    if red:  # (a single-term sum, 1x1 depthwise, keeps its init in the block)
        sch.decompose_reduction(acc, red[0])
    return sch.mod["main"]
