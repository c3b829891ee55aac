"""Exact numeric helpers shared by the reference interpreter: the oracle of every backend.

Rounding, saturation, scale broadcasting and the (de)quantization formulas follow the ONNX
operators (QuantizeLinear / DequantizeLinear opset 21+, DynamicQuantizeLinear) as implemented
by ``onnx.reference``; the few places that intentionally differ are marked "differs from
onnx.reference" below. Every function takes and returns plain numpy arrays; low-bit codes are
held unpacked, one per element, in their type's storage dtype (``ElementType.np_dtype``).
"""
from __future__ import annotations

from typing import Optional, Union

import ml_dtypes
import numpy as np

from qcompiler.ir.types import NF4_LEVELS, ElementType, QuantScheme, elem

_FLOAT8_STORAGE = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_FLOAT4_STORAGE = ("float4_e2m1fn",)


def is_float8(et: ElementType) -> bool:
    """True for the four float8 element types."""
    return et.storage in _FLOAT8_STORAGE


def is_float4(et: ElementType) -> bool:
    """True for float4 e2m1."""
    return et.storage in _FLOAT4_STORAGE


def is_narrow_float(et: ElementType) -> bool:
    """float8 or float4: float codes whose casts follow ONNX's ``saturate`` rules."""
    return is_float8(et) or is_float4(et)


def _as_elem(et: Union[str, ElementType]) -> ElementType:
    return elem(et)


# --------------------------------------------------------------------------------------------
# rounding and saturation
# --------------------------------------------------------------------------------------------


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, ties to even (IEEE default; ONNX's rounding everywhere)."""
    return np.rint(x)


def saturate_cast(x: np.ndarray, elem_type: Union[str, ElementType],
                  saturate: int = 1) -> np.ndarray:
    """Convert ``x`` to ``elem_type``'s storage, clamping to the representable range.

    - integer-like types (``i2``..``i32``, ``u2``..``u16``, ``ternary``, ``nf4`` codes): floats
      are rounded half to even, then clamped to ``int_range()``; NaN becomes 0 (ONNX leaves
      it undefined). Integers are clamped.
    - float8: ``saturate=1`` clamps to the largest finite value (±inf too; NaN stays NaN), as
      ``onnx.numpy_helper.saturate_cast``; ``saturate=0`` is a plain IEEE conversion where
      overflow gives NaN (e4m3fn and the fnuz types, which have no inf) or inf (e5m2).
    - float4 e2m1: ml_dtypes' conversion, which saturates by itself (no inf/NaN encodings);
      ``saturate`` has no effect, as in onnx.reference.
    - any other float type: a plain round-to-nearest-even conversion.
    """
    et = _as_elem(elem_type)
    x = np.asarray(x)
    dtype = et.np_dtype
    if et.kind in ("int", "uint", "ternary", "nf4"):
        lo, hi = et.int_range()
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            return np.clip(x.astype(np.int64), lo, hi).astype(dtype)
        v = round_half_even(x.astype(np.float64))
        v = np.where(np.isnan(v), 0.0, v)
        return np.clip(v, lo, hi).astype(dtype)
    if is_float8(et):
        if saturate:
            info = ml_dtypes.finfo(dtype)
            # Clamp in x's own float type first (what onnx.numpy_helper.saturate_cast does),
            # then convert: the conversion rounds to nearest even. Integers and ml_dtypes
            # floats (bf16, fp8) are widened to float32 first, which is exact for them.
            if x.dtype not in (np.float16, np.float32, np.float64):
                x = x.astype(np.float32)
            return np.clip(x, info.min, info.max).astype(dtype)
        return x.astype(dtype)
    if is_float4(et):
        return x.astype(dtype)
    if et.kind == "bool":
        return x != 0
    return x.astype(dtype)


def wrap_cast(x: np.ndarray, elem_type: Union[str, ElementType]) -> np.ndarray:
    """Integer → integer conversion modulo 2**bits (two's complement), like numpy's astype.

    This is what ONNX Cast (and C's static_cast) does for narrowing integer casts; sub-byte
    types wrap within their own width (i4: 9 → -7), as ml_dtypes.int4 does.
    """
    et = _as_elem(elem_type)
    x = np.asarray(x)
    if et.bits >= 8 and et.kind in ("int", "uint"):
        return x.astype(et.np_dtype)
    v = x.astype(np.int64) & ((1 << et.bits) - 1)
    if et.kind == "int":
        v = np.where(v >= (1 << (et.bits - 1)), v - (1 << et.bits), v)
    return v.astype(et.np_dtype)


def cast(x: np.ndarray, elem_type: Union[str, ElementType], saturate: int = 1,
         src: Optional[ElementType] = None) -> np.ndarray:
    """ONNX Cast of ``x`` to ``elem_type``.

    - float → float: round to nearest even; float8 targets follow ``saturate`` (see
      ``saturate_cast``).
    - float → integer: truncation toward zero as ONNX (numpy's astype); out-of-range values
      and NaN are undefined in ONNX, here they saturate (NaN → 0) so every backend can match.
    - integer → integer: wraps modulo 2**bits (ONNX / numpy astype).
    - → bool: ``x != 0``.
    ``src`` is the source element type when it is not implied by the storage (an ``nf4``
    source casts its NF4 level values, not its codes).
    """
    et = _as_elem(elem_type)
    x = np.asarray(x)
    if src is not None and src.kind == "nf4":
        x = NF4_LEVELS[x.astype(np.intp)]
    if et.kind == "nf4":
        raise NotImplementedError("cast to nf4 is not defined; use quantize")
    if et.kind == "bool":
        return x != 0
    src_is_float = not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_)
    if et.kind in ("int", "uint", "ternary"):
        if not src_is_float:
            return wrap_cast(x, et) if et.kind != "ternary" else saturate_cast(x, et)
        # Truncate first so that saturate_cast's rounding is a no-op.
        return saturate_cast(np.trunc(x.astype(np.float64)), et)
    return saturate_cast(x, et, saturate)


# --------------------------------------------------------------------------------------------
# scale broadcasting
# --------------------------------------------------------------------------------------------


def expand_scale(scale: np.ndarray, x_shape: tuple, scheme: QuantScheme,
                 g_idx: Optional[np.ndarray] = None) -> np.ndarray:
    """Broadcast a scale (or zero-point) tensor of ``scheme`` to ``x_shape``.

    - per-tensor: a scalar or ``[1]``.
    - per-channel on axis a: ``[D_a]`` (a tensor of x's rank with 1s elsewhere is accepted).
    - per-group on axis a with block B: x's shape with ``ceil(D_a / B)`` on a; each entry is
      repeated B times along a and the result cut to D_a (the last block may be short), as
      ONNX's blocked quantization.
    - act-order: the entry of index k along a is ``scale[..., g_idx[k], ...]``.
    Returns a read-only broadcast view of shape ``x_shape``.
    """
    scale = np.asarray(scale)
    x_shape = tuple(int(d) for d in x_shape)
    rank = len(x_shape)
    if scheme.granularity == "tensor":
        if scale.size != 1 or scale.ndim > 1:
            raise ValueError(f"per-tensor scale must be a scalar or [1], not {scale.shape}")
        return np.broadcast_to(scale.reshape(()), x_shape)
    axis = scheme.axis % rank
    dim = x_shape[axis]
    if scheme.granularity == "channel":
        if scale.ndim == 1:
            if scale.shape[0] != dim:
                raise ValueError(f"per-channel scale has {scale.shape[0]} entries, "
                                 f"axis {axis} of {x_shape} has {dim}")
            shape = [1] * rank
            shape[axis] = dim
            scale = scale.reshape(shape)
        return np.broadcast_to(scale, x_shape)
    # per-group
    if scale.ndim != rank:
        raise ValueError(f"per-group scale must have rank {rank}, not shape {scale.shape}")
    for i, (s, d) in enumerate(zip(scale.shape, x_shape)):
        if i != axis and s != d:
            raise ValueError(f"per-group scale shape {scale.shape} does not fit {x_shape} "
                             f"(axis {axis})")
    if scheme.act_order:
        if g_idx is None:
            raise ValueError("an act-order scheme needs g_idx")
        g_idx = np.asarray(g_idx).reshape(-1).astype(np.int64)
        if g_idx.shape[0] != dim:
            raise ValueError(f"g_idx has {g_idx.shape[0]} entries, axis {axis} has {dim}")
        if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= scale.shape[axis]):
            raise ValueError(f"g_idx entries must lie in [0, {scale.shape[axis]})")
        return np.take(scale, g_idx, axis=axis)
    groups = -(-dim // scheme.block_size)
    if scale.shape[axis] != groups:
        raise ValueError(f"per-group scale has {scale.shape[axis]} groups on axis {axis}, "
                         f"ceil({dim} / {scheme.block_size}) = {groups} expected")
    rep = np.repeat(scale, scheme.block_size, axis=axis)
    return np.take(rep, np.arange(dim), axis=axis)


# --------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------


def _check_zero_zp(zero_point: Optional[np.ndarray], what: str) -> None:
    """float8/float4 codes have no zero point: ONNX requires it to be 0 when given."""
    if zero_point is None:
        return
    if np.any(np.asarray(zero_point).astype(np.float32) != 0):
        raise ValueError(f"{what}: the zero point of float8/float4 codes must be 0")


def dequantize(codes: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray],
               scheme: QuantScheme, out_dtype=None,
               g_idx: Optional[np.ndarray] = None) -> np.ndarray:
    """``(codes - zero_point) * scale`` per ``scheme`` (ONNX DequantizeLinear).

    As onnx.reference: the codes and the difference are float32, the product has numpy's
    promoted type (float32 for f16/bf16/f32 scales) and is rounded once to ``out_dtype``
    (an ElementType, name or numpy dtype; default: the scale's dtype).
    nf4 codes are replaced by their ``NF4_LEVELS`` value, ternary codes are their value
    (-1/0/1), float8/float4 codes are converted to float32. Without a ``zero_point`` tensor,
    ``scheme.implied_zero_point`` (if any) is subtracted.
    """
    codes = np.asarray(codes)
    scale = np.asarray(scale)
    x_shape = codes.shape
    et = scheme.dtype
    if et.kind == "nf4":
        if zero_point is not None or scheme.implied_zero_point is not None:
            raise ValueError("dequantize: nf4 codes take no zero point")
        dx = NF4_LEVELS[codes.astype(np.intp)]
    elif is_narrow_float(et):
        _check_zero_zp(zero_point, "dequantize")
        dx = codes.astype(np.float32)
    elif zero_point is not None:
        zp = expand_scale(np.asarray(zero_point), x_shape, scheme, g_idx)
        # Same operation order and numpy promotion as onnx.reference's DequantizeLinear.
        dx = codes.astype(np.float32) - zp
    elif scheme.implied_zero_point is not None:
        dx = codes.astype(np.float32) - np.float32(scheme.implied_zero_point)
    else:
        dx = codes.astype(np.float32)
    y = dx * expand_scale(scale, x_shape, scheme, g_idx)
    if out_dtype is None:
        dtype = scale.dtype
    elif isinstance(out_dtype, (str, ElementType)):
        dtype = _as_elem(out_dtype).np_dtype
    else:
        dtype = np.dtype(out_dtype)
    return np.asarray(y).astype(dtype)


def _nearest_nf4(v: np.ndarray) -> np.ndarray:
    """Index of the nearest NF4 level; a value exactly between two levels takes the lower
    (bitsandbytes compares against the midpoints with a strict >)."""
    dist = np.abs(v.astype(np.float32)[..., None] - NF4_LEVELS)
    return np.argmin(dist, axis=-1).astype(np.uint8)


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray],
             scheme: QuantScheme, saturate: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear per ``scheme``; the result has ``scheme.dtype.np_dtype``.

    - integer targets: ``clamp(round_half_even(x / scale) + zero_point)``; the division is in
      numpy's promoted type of x and scale. Differs from onnx.reference only where it is
      undefined: onnx.reference converts ``rint(x / scale)`` to int32 before clamping, which
      sends |x / scale| >= 2**31 (and ±inf, NaN) to INT32_MIN; here ±inf and huge values
      saturate to the matching end and NaN counts as 0.
    - float8 targets: ``saturate_cast(x / scale)`` with the ``saturate`` rule; a zero point
      must be 0 (onnx.reference ignores it).
    - float4 e2m1: ``(x / scale + zero_point)`` converted, saturating.
    - nf4: the nearest NF4 level of ``x / scale``; ternary: clamp(round(x / scale), -1, 1).
    With no ``zero_point`` tensor, ``scheme.implied_zero_point`` (if any) is added.
    """
    x = np.asarray(x)
    scale = np.asarray(scale)
    et = scheme.dtype
    q = x / expand_scale(scale, x.shape, scheme)
    if et.kind == "nf4":
        if zero_point is not None:
            raise ValueError("quantize: nf4 codes take no zero point")
        return _nearest_nf4(q)
    if is_float8(et):
        _check_zero_zp(zero_point, "quantize")
        return saturate_cast(q, et, saturate)
    if is_float4(et):
        _check_zero_zp(zero_point, "quantize")
        return saturate_cast(q, et, saturate)
    r = round_half_even(q.astype(np.float64))
    r = np.where(np.isnan(r), 0.0, r)
    if zero_point is not None:
        r = r + expand_scale(np.asarray(zero_point), x.shape, scheme).astype(np.float64)
    elif scheme.implied_zero_point is not None:
        r = r + float(scheme.implied_zero_point)
    lo, hi = et.int_range()
    return np.clip(r, lo, hi).astype(et.np_dtype)


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX DynamicQuantizeLinear, step for step as onnx.reference.

    ``scale = (max(0, max x) - min(0, min x)) / 255`` (1/255 when the range is empty),
    ``zp = round_half_even(clamp(-min / scale, 0, 255))``,
    ``y = clamp(round_half_even(x / scale) + zp, 0, 255)``. Returns (y uint8, scale as a
    0-d array of x's dtype, zp as a 0-d uint8 array).
    """
    x = np.asarray(x)
    qmin, qmax = 0, 255
    maxx = np.float32(np.maximum(0, np.max(x)))
    minx = np.float32(np.minimum(0, np.min(x)))
    y_scale = np.float32(1.0 if maxx == minx else (maxx - minx)) / np.float32(qmax - qmin)
    initial_zero_point = np.float32(qmin) - minx / y_scale
    zp = max(qmin, min(qmax, initial_zero_point))
    zpi = np.rint(zp)
    y = np.clip(np.rint(x / y_scale) + zpi, qmin, qmax)
    return (y.astype(np.uint8), np.array(y_scale.astype(x.dtype)),
            np.array(np.asarray(zpi).astype(np.uint8)))


INT8_MAX = 127


def quantize_int8_groups(x_groups: np.ndarray, xq_out: np.ndarray, scale_out: np.ndarray) -> None:
    """Symmetric int8 per row and group: ``x ~= xq * scale``, scale = max|x| / 127: how the
    backends' int8 numerics (MatMulNBits accuracy_level 4) quantize activations.

    The numpy model of the CPU kernels' ``qmm_quantize`` prologue and of the CUDA int8
    kernel's ``quantize_x_i8_kernel`` (the same float32 operations).
    ``x_groups`` is [M, G, block]; writes ``xq_out`` (same shape, int8) and ``scale_out`` [M, G].
    ``xq = rint(x * (127 / max|x|))`` lies in [-127, 127] without clipping. An all-zero group
    gets scale 1 and codes 0 (its terms are zero whatever the scale).
    """
    amax = np.max(np.abs(x_groups), axis=-1)
    np.multiply(amax, np.float32(1.0 / INT8_MAX), out=scale_out)
    inv = np.divide(np.float32(INT8_MAX), amax, out=np.zeros_like(amax), where=amax > 0)
    scale_out[amax == 0] = 1.0
    q = np.multiply(x_groups, inv[..., None])
    np.rint(q, out=q)
    xq_out[...] = q
