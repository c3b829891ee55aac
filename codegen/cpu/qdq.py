"""TensorIR of the ``quantize`` / ``dequantize`` kernels (issue #15: the Q/DQ pairs a QDQ CNN
keeps between its fused qconvs; issue #13: every scheme of ONNX's QuantizeLinear /
DequantizeLinear node cases).

Operation for operation as ``runtime.numerics`` (bit-exact, NaN and saturation included):

- codes: integers of 2 to 16 bits (i2/u2/i4/u4 held one per byte, as the executor stores
  them: int8 / uint8 of the value), float8 (e4m3fn, e5m2, e4m3fnuz, e5m2fnuz) and float4
  e2m1 as their uint8 codes (library.wrap hands such arrays to the kernel as uint8);
- granularity: per tensor (scale ``()`` or ``[1]``), per channel on any axis (``[D_axis]``),
  blocked (x's shape with ``ceil(D_axis / block)`` on the axis; the last block may be short);
- zero points: a tensor of the scheme's shape, the scheme's implied one, or none. float8 /
  float4 codes have none: ONNX requires their zero-point operand to be 0, and the kernel
  ignores it as onnx.reference does (the reference interpreter raises on a nonzero one: a
  nonzero constant keeps the node on the host; a run-time one is not checked);
- values and scales f32, f16 or bf16.

dequantize: ``(f32(code) - f32(zp)) * f32(scale)`` in float32 (numpy's promotion of the
reference's operands), rounded once to the result type; float8/float4 codes are decoded to
their value first. quantize: ``x / scale`` in numpy's promoted type of x and scale (f16/bf16:
divided in float32 and rounded once to it, which is what numpy's f16 and ml_dtypes' bf16
divisions do), then integer codes ``clamp(nearbyint(q) + zp)`` (round half to even, NaN -> 0,
+-inf saturate), float codes the round-to-nearest-even encoding with ``saturate``
(``scalar.encode_narrow_float``). The arithmetic after the division is float32: q is an
integer there, and the sum with a 16-bit zero point is exact (or far outside the code range,
so the clamp gives the same code).

No kernel (CPUBackendError; the node runs on the host): nf4 and ternary codes, 32-bit codes,
act-order (g_idx) dequantization, f64 values or scales.
"""
from __future__ import annotations

import numpy as np

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.codegen.cpu.ops import scalar
from qcompiler.codegen.cpu.ops.common import Dims, constant_operand, kernel_name
from qcompiler.ir.core import Node
from qcompiler.ir.types import ElementType
from qcompiler.runtime.numerics import is_narrow_float

FLOAT_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _where(node: Node) -> str:
    return f"%{node.results[0].name} = {node.op}"


def _code_dtype(et: ElementType, node: Node, what: str) -> str:
    """TVM dtype of a buffer of codes (or zero points) of element type ``et``."""
    if is_narrow_float(et):
        return "uint8"
    if et.kind in ("int", "uint") and et.bits <= 16:
        return str(et.np_dtype)  # i2/i4 in int8, u2/u4 in uint8: one value per element
    raise CPUBackendError(f"{_where(node)}: {what} of type {et.name} has no CPU kernel "
                          f"(codes: 2- to 16-bit integers, float8, float4)")


def _float_dtype(et: ElementType, node: Node, what: str) -> str:
    if et.name not in FLOAT_TYPES:
        raise CPUBackendError(f"{_where(node)}: {what} of type {et.name} has no CPU kernel "
                              "(f32, f16, bf16 only)")
    return FLOAT_TYPES[et.name]


def _check(node: Node, module) -> dict:
    """The kernel's buffer dtypes, or CPUBackendError naming what has no kernel."""
    scheme = node.attrs["scheme"]
    values = node.operands[0] if node.op == "quantize" else node.results[0]
    if node.op == "dequantize" and node.arg("g_idx") is not None:
        raise CPUBackendError(f"{_where(node)}: act-order (g_idx) dequantization has no CPU "
                              "kernel")
    dtypes = {"codes": _code_dtype(scheme.dtype, node, "codes"),
              "values": _float_dtype(values.type.dtype, node, "values"),
              "scale": _float_dtype(node.arg("scale").type.dtype, node, "scale")}
    zp = node.arg("zero_point")
    if zp is not None:
        dtypes["zp"] = _code_dtype(zp.type.dtype, node, "zero point")
        if is_narrow_float(scheme.dtype):
            # ONNX requires it to be 0 and the kernel ignores it, as onnx.reference does (the
            # reference interpreter raises on a nonzero one: a constant one is checked here,
            # so that such a node stays on the host and fails there as it should)
            value = constant_operand(node, 2, module)
            if value is not None and np.any(np.asarray(value).astype(np.float32) != 0):
                raise CPUBackendError(f"{_where(node)}: a {scheme.dtype.name} zero point must "
                                      "be 0")
        elif zp.type.dtype.kind not in ("int", "uint"):
            raise CPUBackendError(f"{_where(node)}: zero point {zp.type.dtype.name} of "
                                  f"{scheme.dtype.name} codes has no CPU kernel")
    if node.op == "quantize":
        try:  # numpy's type of x / scale (f16 with bf16 has none: the reference fails too)
            q = np.result_type(values.type.dtype.np_dtype, node.arg("scale").type.dtype.np_dtype)
        except TypeError as e:
            raise CPUBackendError(f"{_where(node)}: {values.type.dtype.name} x with a "
                                  f"{node.arg('scale').type.dtype.name} scale: {e}") from None
        dtypes["quotient"] = str(q)  # float32, float16 or bfloat16
    return dtypes


def primfunc_for_qdq(node: Node, params=None, module=None, known=()):
    """(kernel name, scheduled PrimFunc) of a quantize / dequantize node."""
    from tvm import te

    dtypes = _check(node, module)
    name = kernel_name(node, {})
    if name in known:
        return name, None
    inputs, out = _build(node, dtypes)
    func = schedule_elementwise(te.create_prim_func(inputs + [out]), "out",
                                host_params(params))
    return name, func.with_attr("global_symbol", name)


def host_params(params):
    """``params``, or the host ``cpu`` target's (ops.kernel.default_params, which this module
    cannot import: ops.kernel dispatches here)."""
    if params is not None:
        return params
    from qcompiler.codegen.cpu.ops.schedule import params_for
    from qcompiler.targets import get_target

    return params_for(get_target("cpu"))


def schedule_elementwise(func, block: str, p):
    """The outer loops of ``block`` fused and run in parallel (when worth it); the innermost
    loop is left to LLVM's loop vectorizer. (TVM's own vectorize of a body with nearbyint
    lowers the loads of x to gathers: a [256, 4096] per-tensor quantize took 2.4 ms that
    way, 0.3 ms with contiguous vector loads.)"""
    import tvm

    from qcompiler.codegen.cpu.ops.schedule import _worth_parallel

    sch = tvm.s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock(block))
    if len(loops) > 1:
        extents = [sch.get(lp).extent for lp in loops]
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        if _worth_parallel(extents, p):
            sch.parallel(outer)
    return sch.mod["main"]


def round_to(v, dtype: str):
    """The float32 ``v`` rounded to ``dtype`` (float32, float16 or bfloat16) once, to nearest
    even: numpy's f16 / bf16 arithmetic rounds each result so. For bf16 the rounding is done
    on the bits and stays a float32 value: TVM drops a bf16 cast that is cast back to float32
    (measured: ``x.astype(bf16).astype(f32)`` came back unrounded)."""
    from tvm import tirx

    if dtype == "float32":
        return v
    if dtype != "bfloat16":
        return v.astype(dtype)
    u32 = "uint32"
    bits = tirx.reinterpret(u32, v)
    half = tirx.const(0x7FFF, u32) + ((bits >> tirx.const(16, u32)) & tirx.const(1, u32))
    rounded = tirx.reinterpret("float32", (bits + half) & tirx.const(0xFFFF0000, u32))
    return tirx.Select(tirx.isnan(v), v, rounded)


def decode(code, et: ElementType):
    """The float64 value of a float8 / float4 code: ``scalar.decode_narrow_float``, with the
    sign of zero kept (its ``0.0 - 0.0`` for the code of -0 gives +0; the reference's -0.0
    times a scale stays -0.0)."""
    from tvm import tirx

    value = scalar.decode_narrow_float(code, et)
    if scalar.NARROW_FLOATS[et.storage][4] == "uz":  # the sign-only code is NaN: no -0
        return value
    sign_only = 1 << (et.bits - 1)
    return tirx.Select(code == tirx.const(sign_only, "uint8"), tirx.const(-0.0, "float64"),
                       value)


def param_index(scheme, rank: int, param_rank: int, i: list) -> tuple:
    """Index into a scale / zero-point tensor of ``scheme`` for element ``i`` of x
    (``numerics.expand_scale``): per tensor the only element, per channel the entry of
    i[axis], blocked the block of i[axis]."""
    from tvm import tirx

    if scheme.granularity == "tensor":
        return (tirx.IntImm("int64", 0),) * param_rank
    axis = scheme.axis % rank
    if scheme.granularity == "channel":
        return (i[axis],)
    return tuple(tirx.floordiv(d, scheme.block_size) if k == axis else d
                 for k, d in enumerate(i))


def _build(node: Node, dtypes: dict):
    from tvm import te, tirx

    scheme = node.attrs["scheme"]
    et = scheme.dtype
    dims = Dims()
    rank = node.results[0].type.rank
    shape = dims.shape(node.results[0].type)
    x_dtype = dtypes["codes"] if node.op == "dequantize" else dtypes["values"]
    x = te.placeholder(shape, x_dtype, name="in0")
    scale_v, zp_v = node.arg("scale"), node.arg("zero_point")
    scale = te.placeholder(dims.shape(scale_v.type), dtypes["scale"], name="in1")
    zp = None if zp_v is None else te.placeholder(dims.shape(zp_v.type), dtypes["zp"],
                                                  name="in2")
    f32 = "float32"

    def param(t, i):
        return t[param_index(scheme, rank, len(t.shape), i)]

    def zero_point(i):
        """The zero point to apply (float32) or None: the tensor's, else the implied one;
        float8/float4 codes have none (ONNX requires their zero-point operand to be 0)."""
        if is_narrow_float(et):
            return None
        if zp is not None:
            return param(zp, i).astype(f32)
        if scheme.implied_zero_point is not None:
            return tirx.const(float(scheme.implied_zero_point), f32)
        return None

    if node.op == "dequantize":
        out_dtype = dtypes["values"]

        def fn(*i):
            i = list(i)
            if is_narrow_float(et):
                v = decode(x(*i), et).astype(f32)  # exact
            else:
                v = x(*i).astype(f32)
                z = zero_point(i)
                if z is not None:
                    v = v - z
            return (v * param(scale, i).astype(f32)).astype(out_dtype)
    else:
        q_dtype = dtypes["quotient"]
        out_dtype = dtypes["codes"]
        saturate = bool(node.attrs.get("saturate", 1))

        def fn(*i):
            i = list(i)
            # numpy's f16 / bf16 quotient: rounded once (a float32 value from here on)
            q = round_to(x(*i).astype(f32) / param(scale, i).astype(f32), q_dtype)
            if is_narrow_float(et):
                return scalar.encode_narrow_float(q.astype("float64"), et, saturate)
            r = tirx.nearbyint(q.astype(f32))
            r = tirx.Select(tirx.isnan(r), tirx.const(0.0, f32), r)
            z = zero_point(i)
            if z is not None:
                r = r + z
            lo, hi = et.int_range()
            r = tirx.max(tirx.min(r, tirx.const(float(hi), f32)), tirx.const(float(lo), f32))
            return r.astype(out_dtype)
    if rank == 0:
        out = te.compute((), lambda: fn(), name="out")
    else:
        out = te.compute(shape, fn, name="out")
    return [t for t in (x, scale, zp) if t is not None], out
