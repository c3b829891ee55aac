"""TensorIR of the ONNX integer-arithmetic ops (issue #13): ``dynamic_quantize``
(DynamicQuantizeLinear), ``matmul_integer`` (MatMulInteger) and ``qlinear_matmul``
(QLinearMatMul), step for step as ``runtime.reference`` / ``runtime.numerics``:

- matmul_integer: ``(a - a_zp) @ (b - b_zp)`` accumulated in int32. A 1-D zero point of ``a``
  is per row (``[M]`` seen as ``[M, 1]``, as the ONNX spec says); the others broadcast
  (numpy rules) against the operand they apply to.
- qlinear_matmul: that int32 product C, then ``rint(C * (a_scale * b_scale / y_scale) +
  y_zp)`` clamped to the result type. The multiplier is computed in numpy's promoted type of
  the scales (f16 scales: each product / quotient rounded to f16, done in float32 and rounded
  once, as numpy's f16 loops), and C times it in float64 (numpy promotes int32 x float to
  float64), so the result is bit-exact.
- dynamic_quantize: ``scale = (max(0, max x) - min(0, min x)) / 255`` (1/255 for an all-zero
  range), ``zp = rint(clamp(-min / scale, 0, 255))`` and ``y = clamp(rint(x / scale) + zp,
  0, 255)``, in float32. NaN propagates through max / min as np.max does, and the clamp of
  the zero point takes Python's min / max order (a NaN zero point becomes 255); a NaN y
  becomes 0, which is what the reference's uint8 cast gives on x86 (NumPy leaves it
  undefined).

Both products read a and b with numpy's batch broadcasting; 1-D operands, float8 operands and
parameters whose broadcasting cannot be decided at build time have no kernel
(CPUBackendError: the node runs on the host).
"""
from __future__ import annotations

import numpy as np

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.codegen.cpu.ops.common import (broadcast_index, is_float_dtype, kernel_name,
                                              same_dim)
from qcompiler.codegen.cpu.qdq import host_params, round_to
from qcompiler.ir.core import Node

def _where(node: Node) -> str:
    return ", ".join(f"%{r.name}" for r in node.results) + f" = {node.op}"


def primfunc_for_qlinear(node: Node, params=None, module=None, known=()):
    """(kernel name, scheduled PrimFunc) of a dynamic_quantize / matmul_integer /
    qlinear_matmul node."""
    from tvm import te

    from qcompiler.codegen.cpu.ops.compute import _Ctx
    from qcompiler.codegen.cpu.ops.schedule import schedule

    ctx = _Ctx(node, module)  # CPUBackendError for element types without a buffer type
    if node.op == "dynamic_quantize":
        kernel = _dynamic_quantize(ctx)
    else:
        kernel = _integer_matmul(ctx)
    name = kernel_name(node, {})
    if name in known:
        return name, None
    func = te.create_prim_func(kernel.inputs + kernel.outputs)
    if node.op == "dynamic_quantize":
        func = _schedule_dynamic_quantize(func, host_params(params))
    else:
        func = schedule(func, kernel, host_params(params))
    return name, func.with_attr("global_symbol", name)


# --------------------------------------------------------------------------------------------
# matmul_integer / qlinear_matmul
# --------------------------------------------------------------------------------------------


def _param_index(node: Node, shape: tuple, target: tuple, index: list, what: str) -> list:
    """The index into a parameter of (QIR) ``shape`` broadcast against a tensor of (QIR)
    ``target`` shape at ``index``: right-aligned, a dim of 1 repeats."""
    from tvm import tirx

    offset = len(target) - len(shape)
    if offset < 0:
        raise CPUBackendError(f"{_where(node)}: {what} of shape {shape} has more dims than "
                              f"{target}")
    out = []
    for j, d in enumerate(shape):
        if d == 1:
            out.append(tirx.IntImm("int64", 0))
        elif same_dim(d, target[offset + j]):
            out.append(index[offset + j])
        else:  # a symbol against another dim: 1 or not is only known at run time
            raise CPUBackendError(f"{_where(node)}: {what} of shape {shape} against {target}: "
                                  "broadcast not decidable at build time")
    return out


def _integer_matmul(ctx):
    """C = (a - a_zp) @ (b - b_zp) in int32 (the ``acc`` stage); qlinear_matmul requantizes
    it in ``out``."""
    from tvm import te, tirx

    from qcompiler.codegen.cpu.ops.compute import Kernel

    node = ctx.node
    qlinear = node.op == "qlinear_matmul"
    ia, ib = (0, 3) if qlinear else (0, 1)
    a_zp_i, b_zp_i = (2, 5) if qlinear else (2, 3)
    ta, tb = ctx.otype(ia), ctx.otype(ib)
    if ta.rank < 2 or tb.rank < 2:
        raise CPUBackendError(f"{_where(node)}: a 1-D operand ({ta.shape} @ {tb.shape}) has no "
                              "CPU kernel")
    for i in (ia, ib):
        if ctx.otype(i).dtype.kind not in ("int", "uint"):
            raise CPUBackendError(f"{_where(node)}: {ctx.otype(i).dtype.name} operands have no "
                                  "CPU kernel")
    a, b = ctx.operand(ia), ctx.operand(ib)
    out_type = ctx.rtype
    out_shape = ctx.out_shapes[0]
    batch = len(out_shape) - 2
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    i32 = "int32"

    def row_shape(i):
        """A parameter of a: 1-D ``[M]`` is per row, ``[M, 1]`` (numpy would take it per
        column of K)."""
        shape = ctx.otype(i).shape
        return (shape[0], 1) if len(shape) == 1 else shape

    def param(i, shape, target, index, what):
        if not ctx.has(i):
            return None
        p = ctx.operand(i)
        idx = _param_index(node, shape, target, index, what)
        if len(p.shape) == 1 and len(shape) == 2:  # a's [M] seen as [M, 1]
            idx = idx[:1]
        return p[tuple(idx)] if idx else p[()]

    def operand_at(p, t, i, last2, zp_i, zp_shape, what):
        lead = broadcast_index(t.with_shape(t.shape[:-2]), list(p.shape[:-2]),
                               out_type.with_shape(out_type.shape[:-2]), list(i[:batch]))
        index = list(lead) + list(last2)
        v = p[tuple(index)].astype(i32)
        z = param(zp_i, zp_shape, t.shape, index, what)
        return v if z is None else v - z.astype(i32)

    def c_fn(*i):
        av = operand_at(a, ta, i, (i[batch], k), a_zp_i, row_shape(a_zp_i) if ctx.has(a_zp_i)
                        else (), "a's zero point")
        bv = operand_at(b, tb, i, (k, i[batch + 1]), b_zp_i, ctx.otype(b_zp_i).shape
                        if ctx.has(b_zp_i) else (), "b's zero point")
        return te.sum(av * bv, axis=k)

    acc = te.compute(out_shape, c_fn, name="acc")
    if not qlinear:
        return Kernel(ctx.inputs, [acc], "matmul", rows=batch + 1)

    # multiplier = a_scale * b_scale / y_scale in numpy's promoted types
    if any(ctx.otype(i).dtype.name not in ("f32", "f16", "bf16") for i in (1, 4, 6)):
        raise CPUBackendError(f"{_where(node)}: scales other than f32 / f16 / bf16 have no "
                              "CPU kernel")
    scales = {i: ctx.otype(i).dtype.np_dtype for i in (1, 4, 6)}
    try:
        t_ab = np.result_type(scales[1], scales[4])
        t_m = np.result_type(t_ab, scales[6])
    except TypeError as e:  # f16 with bf16: the reference has no type for it either
        raise CPUBackendError(f"{_where(node)}: scales {sorted(map(str, scales.values()))}: "
                              f"{e}") from None
    t_ab, t_m = str(t_ab), str(t_m)
    lo, hi = out_type.dtype.int_range()
    f32, f64 = "float32", "float64"
    c_shape = out_type.shape

    def out_fn(*i):
        i = list(i)
        sa = param(1, row_shape(1), c_shape, i, "a_scale")
        sb = param(4, ctx.otype(4).shape, c_shape, i, "b_scale")
        sy = param(6, ctx.otype(6).shape, c_shape, i, "y_scale")
        # each step rounded to numpy's result type (f16 / bf16: done in float32, rounded)
        m = round_to(sa.astype(f32) * sb.astype(f32), t_ab)
        m = round_to(m / sy.astype(f32), t_m)
        d = acc(*i).astype(f64) * m.astype(f64)
        zy = param(7, ctx.otype(7).shape, c_shape, i, "y_zero_point") if ctx.has(7) else None
        if zy is not None:
            d = d + zy.astype(f64)
        r = tirx.nearbyint(d)
        r = tirx.max(tirx.min(r, tirx.const(float(hi), f64)), tirx.const(float(lo), f64))
        return r.astype(ctx.out_dtypes[0])

    out = te.compute(out_shape, out_fn, name="out")
    return Kernel(ctx.inputs, [out], "matmul", rows=batch + 1)


# --------------------------------------------------------------------------------------------
# dynamic_quantize
# --------------------------------------------------------------------------------------------


def _dynamic_quantize(ctx):
    from tvm import te, tirx

    from qcompiler.codegen.cpu.ops.compute import Kernel

    node = ctx.node
    x = ctx.operand(0)
    t = ctx.otype(0)
    if not is_float_dtype(str(t.dtype.np_dtype)) or t.dtype.name == "f64":
        raise CPUBackendError(f"{_where(node)}: x of type {t.dtype.name} has no CPU kernel")
    if any(d == 0 for d in t.shape):
        raise CPUBackendError(f"{_where(node)}: an empty x (the reference's max fails)")
    f32 = "float32"
    zero, one = tirx.const(0.0, f32), tirx.const(1.0, f32)

    def nan(v):
        return tirx.isnan(v)

    # (max, min) over x with NaN propagating (np.max / np.min), from 0: np.maximum(0, max x)
    def combine(acc, new):
        hi = tirx.Select(tirx.Or(nan(acc[0]), acc[0] >= new[0]), acc[0], new[0])
        lo = tirx.Select(tirx.Or(nan(acc[1]), acc[1] <= new[1]), acc[1], new[1])
        return hi, lo

    def identity(t0, t1):
        return tirx.const(0.0, t0), tirx.const(0.0, t1)

    extremes = te.comm_reducer(combine, identity, name="extremes")
    shape = list(x.shape)
    if len(shape) >= 2:
        # per row (over the last axis, the rows in parallel), then over the rows' extremes
        k = te.reduce_axis((0, shape[-1]), name="k")
        part_hi, part_lo = te.compute(shape[:-1], lambda *i: extremes(
            (x[i + (k,)].astype(f32), x[i + (k,)].astype(f32)), axis=k), name="rows")
        axes = [te.reduce_axis((0, d), name=f"r{j}") for j, d in enumerate(shape[:-1])]
        hi, lo = te.compute((), lambda: extremes(
            (part_hi[tuple(axes)], part_lo[tuple(axes)]), axis=axes), name="range")
        hi_v, lo_v = hi[()], lo[()]
    elif shape:
        k = te.reduce_axis((0, shape[0]), name="k")
        hi, lo = te.compute((), lambda: extremes((x[k].astype(f32), x[k].astype(f32)), axis=k),
                            name="range")
        hi_v, lo_v = hi[()], lo[()]
    else:  # a scalar x is its own max and min
        v = x[()].astype(f32)
        hi_v = tirx.Select(tirx.Or(nan(v), v >= zero), v, zero)
        lo_v = tirx.Select(tirx.Or(nan(v), v <= zero), v, zero)

    def scale_fn():
        width = tirx.Select(hi_v == lo_v, one, hi_v - lo_v)
        return width / tirx.const(255.0, f32)

    scale = te.compute((), scale_fn, name="scale")

    def zp_fn():
        izp = zero - lo_v / scale[()]
        # Python's min(255, izp) then max(0, .): the first argument wins unless the second
        # compares strictly beyond it, so NaN gives 255
        z = tirx.Select(izp < tirx.const(255.0, f32), izp, tirx.const(255.0, f32))
        z = tirx.Select(z > zero, z, zero)
        return tirx.nearbyint(z)

    zp = te.compute((), zp_fn, name="zp")

    def y_fn(*i):
        r = tirx.nearbyint(x(*i).astype(f32) / scale[()]) + zp[()]
        clamped = tirx.max(tirx.min(r, tirx.const(255.0, f32)), zero)
        return tirx.Select(nan(r), tirx.const(0, "uint8"), clamped.astype("uint8"))

    y = te.compute(ctx.out_shapes[0], y_fn, name="y") if ctx.out_shapes[0] else \
        te.compute((), lambda: y_fn(), name="y")
    scale_out = te.compute((), lambda: scale[()].astype(ctx.out_dtypes[1]), name="y_scale")
    zp_out = te.compute((), lambda: zp[()].astype("uint8"), name="y_zero_point")
    return Kernel(ctx.inputs, [y, scale_out, zp_out], "dynamic_quantize")


def _schedule_dynamic_quantize(func, p):
    """The rows' extremes in parallel (max / min are exact in any order), their range, then
    y as an elementwise kernel (``qdq.schedule_elementwise``)."""
    import tvm

    from qcompiler.codegen.cpu.ops.schedule import _worth_parallel
    from qcompiler.codegen.cpu.qdq import schedule_elementwise

    func = schedule_elementwise(func, "y", p)
    sch = tvm.s_tir.Schedule(func)
    try:
        rows = sch.get_sblock("rows")
    except Exception:  # x of rank 0 or 1: one serial reduction
        return func
    loops = sch.get_loops(rows)
    extents = [sch.get(lp).extent for lp in loops]
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    if _worth_parallel(extents, p):
        sch.parallel(outer)
    return sch.mod["main"]
