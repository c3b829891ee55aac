"""Handlers of the ``quantized_decomposed`` ops (PT2E, torchao): ``quantize`` and
``dequantize`` with the scheme their arguments give."""
from __future__ import annotations

from typing import Optional

import numpy as np

from qcompiler.frontends.fx.importer import _hint
from qcompiler.frontends.fx.registry import _qd
from qcompiler.frontends.fx.tensors import _qir_dtype, _to_numpy, _to_torch, _Const
from qcompiler.ir import QuantScheme, TensorType, elem
from qcompiler.ir.core import Value, constant_node


def _code_type(imp, qmin: int, qmax: int, dtype):
    """The QIR code type for [quant_min, quant_max] stored in ``dtype``: 4-bit ranges are i4/u4."""
    for name in ("i2", "u2", "i4", "u4", "i8", "u8", "i16", "u16"):
        et = elem(name)
        if et.int_range() == (qmin, qmax):
            return et
    base = _qir_dtype(dtype, imp.where())
    lo, hi = base.int_range()
    if not lo <= qmin <= qmax <= hi:
        raise imp.fail(f"quant range [{qmin}, {qmax}] does not fit {dtype}")
    # A narrower range of a wider type (e.g. [-127, 127] in int8): codes are in range anyway.
    for name in ("i4", "u4", "i8", "u8", "i16", "u16"):
        et = elem(name)
        lo2, hi2 = et.int_range()
        if lo2 <= qmin and qmax <= hi2 and (lo2 < 0) == (lo < 0):
            return et
    return base


def _scalar_or_tensor(imp, a, dtype, hint):
    import torch

    if isinstance(a, (Value, _Const)):
        return imp.value(a, dtype)
    return imp.value(_Const(torch.tensor(a), hint), dtype)


def _qparams(imp, scale, zero_point, code_type, shape_hint=None):
    """QIR scale (f32) and zero point (codes) operands; a zero zero point is dropped."""
    s = _scalar_or_tensor(imp, scale, elem("f32"), "scale")
    if zero_point is None:
        return s, None
    zp_arr = imp.const_array(zero_point) if isinstance(zero_point, (Value, _Const)) \
        else np.asarray(zero_point)
    if zp_arr is not None:
        if np.any(zp_arr != np.rint(zp_arr)):
            raise imp.fail("zero points that are not integers are not supported")
        if not np.any(zp_arr):
            return s, None
        lo, hi = code_type.int_range()
        if zp_arr.min() < lo or zp_arr.max() > hi:
            raise imp.fail(f"zero points outside the code range [{lo}, {hi}]")
        arr = np.asarray(zp_arr).astype(code_type.np_dtype)
        zp = constant_node(imp.fn, imp.module, arr, TensorType(tuple(arr.shape), code_type),
                           name_hint="zero_point").result
        return s, zp
    return s, imp.value(zero_point, code_type)


def _scheme(code_type, s: Value, zp: Optional[Value], **gran) -> QuantScheme:
    return QuantScheme(dtype=code_type, scale_type=s.type.dtype, symmetric=zp is None,
                       zero_point_type=None if zp is None else zp.type.dtype, **gran)


def _codes(imp, x, code_type) -> Value:
    """Codes stored as int8/uint8 tensors, retyped as the narrower code type (i4 ...)."""
    if isinstance(x, _Const):
        arr = _to_numpy(x.tensor)
        lo, hi = code_type.int_range()
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise imp.fail(f"codes of {x.hint} lie outside [{lo}, {hi}]")
        return constant_node(imp.fn, imp.module, arr.astype(code_type.np_dtype),
                             TensorType(tuple(arr.shape), code_type),
                             name_hint=_hint(x.hint)).result
    v = imp.value(x)
    if v.type.dtype != code_type:
        raise imp.fail(f"run-time codes of type {v.type.dtype} cannot be read as {code_type} "
                       "(quantize and dequantize must use the same quant_min/quant_max)")
    return v


@_qd("quantize_per_tensor", "quantize_per_tensor.tensor", "quantize_per_tensor.tensor2")
def _quantize_per_tensor(imp, x, scale, zero_point, qmin, qmax, dtype):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scale, zero_point, code_type)
    scheme = _scheme(code_type, s, zp)
    return _clamp_codes(imp, imp.emit("quantize", [imp.value(x, elem("f32")), s, zp],
                                      {"scheme": scheme}), code_type, qmin, qmax)


def _clamp_codes(imp, q: Value, code_type, qmin, qmax) -> Value:
    """torch clamps to [quant_min, quant_max]; quantize saturates to the type's range."""
    lo, hi = code_type.int_range()
    if (lo, hi) == (qmin, qmax):
        return q
    q = imp.emit("max", [q, constant_node(imp.fn, imp.module, np.array(qmin, code_type.np_dtype),
                                          TensorType((), code_type)).result])
    return imp.emit("min", [q, constant_node(imp.fn, imp.module, np.array(qmax, code_type.np_dtype),
                                             TensorType((), code_type)).result])


@_qd("dequantize_per_tensor", "dequantize_per_tensor.tensor", "dequantize_per_tensor.tensor2")
def _dequantize_per_tensor(imp, x, scale, zero_point, qmin, qmax, dtype, out_dtype=None):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scale, zero_point, code_type)
    out = imp.out_dtype()
    return imp.emit("dequantize", [_codes(imp, x, code_type), s, zp],
                    {"scheme": _scheme(code_type, s, zp), "out": out})


@_qd("quantize_per_channel")
def _quantize_per_channel(imp, x, scales, zero_points, axis, qmin, qmax, dtype):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scales, zero_points, code_type)
    xv = imp.value(x, elem("f32"))
    scheme = _scheme(code_type, s, zp, granularity="channel", axis=int(axis) % xv.type.rank)
    return _clamp_codes(imp, imp.emit("quantize", [xv, s, zp], {"scheme": scheme}),
                        code_type, qmin, qmax)


@_qd("dequantize_per_channel")
def _dequantize_per_channel(imp, x, scales, zero_points, axis, qmin, qmax, dtype,
                            out_dtype=None):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scales, zero_points, code_type)
    codes = _codes(imp, x, code_type)
    scheme = _scheme(code_type, s, zp, granularity="channel", axis=int(axis) % codes.type.rank)
    return imp.emit("dequantize", [codes, s, zp], {"scheme": scheme, "out": imp.out_dtype()})


@_qd("dequantize_per_channel_group")
def _dequantize_per_channel_group(imp, w, scales, zero_points, qmin, qmax, dtype, group_size,
                                  output_dtype=None):
    """torchao / ExecuTorch 4-bit weights: w [N, K] codes, scales [N, K / group_size]."""
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    codes = _codes(imp, w, code_type)
    if codes.type.rank != 2:
        raise imp.fail(f"dequantize_per_channel_group takes 2-D codes, not {codes.type.shape}")
    n, k = codes.type.shape
    group = int(group_size)
    if group > k:
        group = k
    if k % group:
        raise imp.fail(f"K={k} is not a multiple of group_size={group}")
    s_arr = imp.const_array(scales)
    if s_arr is None:
        raise imp.fail("the scales of dequantize_per_channel_group must be constants")
    s_arr = np.asarray(s_arr, np.float32).reshape(n, k // group)
    s = constant_node(imp.fn, imp.module, s_arr, TensorType((n, k // group), elem("f32")),
                      name_hint="scales").result
    zp = None
    if zero_points is not None:
        z_arr = imp.const_array(zero_points)
        if z_arr is None:
            raise imp.fail("the zero points of dequantize_per_channel_group must be constants")
        z_arr = np.asarray(z_arr).reshape(n, k // group)
        _, zp = _qparams(imp, s, _Const(_to_torch(z_arr), "zero_points"), code_type)
    scheme = _scheme(code_type, s, zp, granularity="group", axis=1, block_size=group)
    return imp.emit("dequantize", [codes, s, zp], {"scheme": scheme, "out": imp.out_dtype()})
