"""The numpy reference interpreter of QIR: the oracle every backend is compared against.

``run(module, inputs)`` executes ``module.main`` node by node with ``OP_IMPLS[node.op]``.
Float ops follow the ONNX operator of the same meaning (onnx.reference), the quantization ops
use ``qcompiler.runtime.numerics``. Intentional differences from onnx.reference:

- matmul / gemm / qmatmul(act=float) on f16 and bf16 accumulate in float32 and round once
  (numpy would round after every step); reduce_mean, softmax and layernorm likewise compute
  f16/bf16 in float32 (layernorm's ONNX ``stash_type=1``); so do the fused ops rmsnorm and
  attention (a causal position gets float's lowest value: a fully hidden row is uniform).
- fused_elementwise and qmatmul's epilogue run their body statement by statement with the
  implementations below (``qcompiler.ir.elementwise_body.evaluate``), rounding as the
  decomposed ops did.
- gelu is computed in float64 and rounded once (ONNX expands it into float ops).
- cast from float to integer saturates out-of-range values and maps NaN to 0 (undefined in
  ONNX); quantize saturates ±inf and huge values (onnx.reference wraps them through int32).
- matmul_integer / qlinear_matmul accept a 1-D per-row ``[M]`` zero point / scale for ``a``
  as the ONNX spec says (onnx.reference would broadcast it along K instead).

Every op implementation has the signature ``impl(node, args, module) -> list[np.ndarray]``
and never writes into its arguments (values may be shared between nodes and the caller).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from qcompiler.errors import InputError, QCompilerError
from qcompiler.ir.core import Function, Module, Node, Value
from qcompiler.ir.types import QuantScheme, TensorType
from qcompiler.runtime import numerics



class RunInputError(InputError):
    """run() inputs are missing, unknown, or of the wrong dtype, rank or shape."""


class OpFailedError(QCompilerError, RuntimeError):
    """An op refused the data it was given at run time (an index out of range, sizes that do
    not add up ...); the message names the node."""


# Exceptions an op raises when the data it is given is out of its domain; any other
# exception escaping an op is a bug and is passed on as it is.
_DATA_ERRORS = (ValueError, IndexError, KeyError, ZeroDivisionError, FloatingPointError,
                OverflowError, NotImplementedError, MemoryError)

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


def _result_dtype(node: Node, i: int = 0) -> np.dtype:
    return node.results[i].type.dtype.np_dtype


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """The float type that f16/bf16/f32 math is carried out in: float32 (float64 stays)."""
    return F64 if np.dtype(dtype) == F64 else F32


def _is_float(dtype: np.dtype) -> bool:
    return not (np.issubdtype(dtype, np.integer) or dtype == np.bool_)


# --------------------------------------------------------------------------------------------
# constants and plumbing
# --------------------------------------------------------------------------------------------


def _constant(node, args, module):
    if "value" in node.attrs:
        return [np.asarray(node.attrs["value"])]
    name = node.attrs["name"]
    if name not in module.constants:
        raise KeyError(f"constant {name!r} is not in the module's side table")
    return [np.asarray(module.constants[name])]


def _identity(node, args, module):
    return [args[0]]


def _cast(node, args, module):
    src = node.operands[0].type.dtype if node.operands[0] is not None else None
    return [numerics.cast(args[0], node.attrs["to"], node.attrs.get("saturate", 1), src=src)]


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------


def _int_div(x, y):
    """Integer division truncating toward zero (C / ONNX Div), exactly in integers."""
    q = np.floor_divide(x, y)
    r = np.remainder(x, y)
    needs_adjust = (r != 0) & ((x < 0) ^ (y < 0))
    return q + needs_adjust.astype(q.dtype)


def _binary(fn: Callable) -> Callable:
    def impl(node, args, module):
        a, b = args
        return [np.asarray(fn(a, b)).astype(_result_dtype(node), copy=False)]
    return impl


def _div(node, args, module):
    a, b = args
    if not _is_float(a.dtype):
        return [_int_div(a, b).astype(_result_dtype(node), copy=False)]
    return [np.divide(a, b).astype(_result_dtype(node), copy=False)]


def _pow(node, args, module):
    a, b = args
    with np.errstate(all="ignore"):
        return [np.power(a, b).astype(a.dtype)]


def _equal(node, args, module):
    return [np.equal(args[0], args[1])]


def _isnan(node, args, module):
    return [np.isnan(args[0])]


def _where(node, args, module):
    cond, x, y = args
    return [np.where(cond.astype(bool), x, y).astype(_result_dtype(node), copy=False)]


def _unary(fn: Callable) -> Callable:
    def impl(node, args, module):
        x = args[0]
        with np.errstate(all="ignore"):
            return [np.asarray(fn(x)).astype(x.dtype, copy=False)]
    return impl


def _sigmoid_fn(x):
    # The numerically stable form of onnx.reference's Sigmoid.
    exp_x = np.exp(x)
    return np.where(x > 0, 1.0 / (1.0 + np.exp(-x)), exp_x / (1.0 + exp_x))


def erf_exact(x: np.ndarray) -> np.ndarray:
    """erf in float64; callers round it to their type.

    scipy's vectorized erf agrees with ``math.erf`` (what onnx.reference calls per element)
    to an ulp of float64, so both round to the same float32; a per-element Python call made
    exact GELU most of a transformer's run time in this interpreter.
    """
    from scipy.special import erf

    return erf(np.asarray(x, dtype=np.float64))


def _erf(node, args, module):
    x = args[0]
    # onnx.reference rounds math.erf to float32, then to x's type; do the same.
    return [erf_exact(x).astype(np.float32).astype(x.dtype)]


def _gelu(node, args, module):
    x = args[0]
    v = x.astype(np.float64)
    approximate = node.attrs.get("approximate", "none")
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)
        y = 0.5 * v * (1.0 + np.tanh(inner))
    elif approximate in ("none", "", None):
        y = 0.5 * v * (1.0 + erf_exact(v / math.sqrt(2.0)))
    else:
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', not {approximate!r}")
    return [y.astype(x.dtype)]


def _relu(x):
    return np.maximum(x, np.zeros((), dtype=x.dtype))


def _softmax(node, args, module):
    x = args[0]
    if x.size == 0:
        return [x]
    axis = node.attrs["axis"]
    v = x.astype(_compute_dtype(x.dtype))
    tmp = v - v.max(axis=axis, keepdims=True)
    y = np.exp(tmp)
    y = y / y.sum(axis=axis, keepdims=True)
    return [y.astype(x.dtype)]


def _layernorm(node, args, module):
    """onnx.reference's LayerNormalization (stash_type=1: statistics in float32)."""
    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    ct = _compute_dtype(x.dtype)
    rank = x.ndim
    axis = node.attrs["axis"] % rank
    eps = node.attrs["epsilon"]
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    cols = int(np.prod(x.shape[axis:], dtype=np.int64))
    x_mat = x.astype(ct).reshape(rows, cols)
    mean = np.sum(x_mat, axis=1, keepdims=True) / cols
    diff = x_mat - mean
    variance = np.sum(diff * diff, axis=1, keepdims=True) / cols
    inv_std = np.reciprocal(np.sqrt(variance + ct.type(eps)))
    y = (diff * inv_std).reshape(x.shape) * scale.astype(ct)
    if bias is not None:
        y = y + bias.astype(ct)
    return [y.astype(x.dtype)]


def _rmsnorm(node, args, module):
    """ONNX RMSNormalization (stash_type=1: f16/bf16 computed in float32)."""
    x, scale = args
    ct = _compute_dtype(x.dtype)
    axes = tuple(range(node.attrs["axis"] % x.ndim, x.ndim))
    v = x.astype(ct)
    mean_square = np.mean(v * v, axis=axes, keepdims=True, dtype=ct)
    rms = np.sqrt(mean_square + ct.type(node.attrs["epsilon"]))
    return [((v / rms) * scale.astype(ct)).astype(x.dtype)]


def _fused_elementwise(node, args, module):
    from qcompiler.ir.elementwise_body import evaluate

    return [evaluate(node.attrs["body"], args, _result_dtype(node))]


def _attention(node, args, module):
    """softmax(q @ k^T * scale + mask) @ v in float32 (float64 stays), kv heads shared by
    groups of query heads. Causal positions get float's lowest value (as onnxruntime's
    decomposed graphs' -3.4e38), so a fully masked row is uniform; an additive -inf mask over a
    whole row gives NaN, as softmax does."""
    q, k, v = args[0], args[1], args[2]
    mask = _arg(args, 3)
    ct = _compute_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = np.repeat(k, groups, axis=1)
        v = np.repeat(v, groups, axis=1)
    scores = np.matmul(q.astype(ct), np.swapaxes(k.astype(ct), -1, -2)) * ct.type(
        node.attrs["scale"])
    if mask is not None:
        scores = scores + mask.astype(ct)
    if node.attrs["causal"]:
        sq, skv = q.shape[2], k.shape[2]
        allowed = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + (skv - sq)
        scores = np.where(allowed, scores, np.finfo(ct).min)
    with np.errstate(invalid="ignore"):
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return [np.matmul(probs, v.astype(ct)).astype(_result_dtype(node))]


def _reduce_mean(node, args, module):
    x = args[0]
    axes = list(node.attrs["axes"])
    keepdims = bool(node.attrs["keepdims"])
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.ndim))
    axes_t = tuple(sorted(a % x.ndim for a in axes))
    if _is_float(x.dtype):
        ct = _compute_dtype(x.dtype)
        y = np.mean(x.astype(ct), axis=axes_t, keepdims=keepdims, dtype=ct)
    else:
        y = np.mean(x, axis=axes_t, keepdims=keepdims, dtype=x.dtype)
    return [np.asarray(y).astype(x.dtype)]


def _reduce(fn: Callable) -> Callable:
    """reduce_sum / reduce_l2: axes as reduce_mean; f16/bf16 computed in float32."""
    def impl(node, args, module):
        x = args[0]
        axes = list(node.attrs["axes"])
        if not axes and node.attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes_t = tuple(sorted({a % x.ndim for a in axes})) if axes else tuple(range(x.ndim))
        v = x.astype(_compute_dtype(x.dtype)) if _is_float(x.dtype) else x
        y = fn(v, axes_t, bool(node.attrs["keepdims"]))
        return [np.asarray(y).astype(x.dtype)]
    return impl


def _sum(v, axes, keepdims):
    return np.sum(v, axis=axes, keepdims=keepdims, dtype=v.dtype)


def _l2(v, axes, keepdims):
    return np.sqrt(np.sum(v * v, axis=axes, keepdims=keepdims, dtype=v.dtype))


# --------------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------------


def _ints(a) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]


def _reshape(node, args, module):
    x, shape = args
    target = _ints(shape)
    if not node.attrs.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return [np.reshape(x, target)]


def _transpose(node, args, module):
    return [np.transpose(args[0], node.attrs["perm"])]


def _concat(node, args, module):
    return [np.concatenate(args, axis=node.attrs["axis"])]


def _split(node, args, module):
    x = args[0]
    sizes = list(node.attrs["sizes"])
    axis = node.attrs["axis"] % x.ndim
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not sum to dim {axis} = {x.shape[axis]}")
    return list(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _slice(node, args, module):
    """ONNX Slice: Python slicing clamps starts/ends exactly as ONNX specifies."""
    x, starts, ends = args[0], _ints(args[1]), _ints(args[2])
    axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ValueError("slice step must not be 0")
        index[a % x.ndim] = slice(s, e, st)
    return [x[tuple(index)]]


def _gather(node, args, module):
    x, indices = args
    axis = node.attrs["axis"] % x.ndim
    # np.take wraps negative indices like ONNX Gather and raises on out-of-range ones.
    return [np.take(x, indices.astype(np.int64), axis=axis)]


def _gather_elements(node, args, module):
    x, indices = args
    axis = node.attrs["axis"] % x.ndim
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)  # ONNX allows negative indices
    if idx.size and (idx.min() < 0 or idx.max() >= x.shape[axis]):
        raise IndexError(f"gather_elements index out of range for dim {axis} of {x.shape}")
    return [np.take_along_axis(x, idx, axis=axis)]


def _gather_nd(node, args, module):
    x, indices = args
    b = node.attrs.get("batch_dims", 0)
    idx = indices.astype(np.int64)
    depth = idx.shape[-1]
    batch_shape = x.shape[:b]
    # Negative indices count from the end of their dim, as in ONNX.
    dims = np.array(x.shape[b:b + depth], dtype=np.int64)
    idx = np.where(idx < 0, idx + dims, idx)
    if idx.size and ((idx < 0).any() or (idx >= dims).any()):
        raise IndexError(f"gather_nd index out of range for data {x.shape}")
    nb = int(np.prod(batch_shape, dtype=np.int64))
    if nb == 0 or idx.size == 0:
        return [np.zeros(idx.shape[:-1] + x.shape[b + depth:], x.dtype)]
    xb = x.reshape((nb,) + x.shape[b:])
    ib = idx.reshape((nb, -1, depth))
    out = np.stack([xb[i][tuple(ib[i].T)] for i in range(nb)])
    return [out.reshape(idx.shape[:-1] + x.shape[b + depth:])]


def _range(node, args, module):
    start, limit, delta = (np.asarray(a).item() for a in args)
    n = max(int(np.ceil((limit - start) / delta)), 0)
    dtype = _result_dtype(node)
    return [(start + np.arange(n, dtype=np.float64 if _is_float(dtype) else np.int64) * delta)
            .astype(dtype)]


def _unsqueeze(node, args, module):
    return [np.expand_dims(args[0], tuple(node.attrs["axes"]))]


def _squeeze(node, args, module):
    x = args[0]
    axes = tuple(a % x.ndim for a in node.attrs["axes"])
    if not axes:
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    return [np.squeeze(x, axis=axes)]


def _shape(node, args, module):
    x = args[0]
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", x.ndim)
    return [np.array(x.shape[start:end], dtype=np.int64)]


def _expand(node, args, module):
    x, shape = args
    out_shape = np.broadcast_shapes(x.shape, tuple(_ints(shape)))
    return [np.array(np.broadcast_to(x, out_shape))]


# --------------------------------------------------------------------------------------------
# matrix products
# --------------------------------------------------------------------------------------------


def _float_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b; f16/bf16 are accumulated in float32 (and left there for the caller to round)."""
    if _is_float(a.dtype) and a.dtype != F64:
        return np.matmul(a.astype(F32, copy=False), b.astype(F32, copy=False))
    return np.matmul(a, b)


def _matmul(node, args, module):
    a, b = args
    return [_float_matmul(a, b).astype(_result_dtype(node), copy=False)]


def _gemm(node, args, module):
    a, b = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    alpha = node.attrs.get("alpha", 1.0)
    beta = node.attrs.get("beta", 1.0)
    if node.attrs.get("trans_a", 0):
        a = a.T
    if node.attrs.get("trans_b", 0):
        b = b.T
    y = _float_matmul(a, b)
    if _is_float(y.dtype):
        y = y * y.dtype.type(alpha)
        if c is not None and beta != 0:
            y = y + c.astype(y.dtype) * y.dtype.type(beta)
    else:
        y = y * int(alpha)
        if c is not None and beta != 0:
            y = y + c * int(beta)
    return [y.astype(_result_dtype(node), copy=False)]


def _row_param(v: Optional[np.ndarray], a: np.ndarray) -> Optional[np.ndarray]:
    """A per-row parameter of the left operand: 1-D ``[M]`` becomes ``[M, 1]``."""
    if v is None:
        return None
    v = np.asarray(v)
    if v.ndim == 1 and v.size > 1 and a.ndim >= 2:
        return v.reshape(-1, 1)
    if v.size == 1:
        return v.reshape(())
    return v


def _col_param(v: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if v is None:
        return None
    v = np.asarray(v)
    return v.reshape(()) if v.size == 1 else v


def _matmul_integer(node, args, module):
    a, b = args[0], args[1]
    a_zp = _row_param(args[2] if len(args) > 2 else None, a)
    b_zp = _col_param(args[3] if len(args) > 3 else None)
    a32 = a.astype(np.int32)
    if a_zp is not None:
        a32 = a32 - a_zp.astype(np.int32)
    b32 = b.astype(np.int32)
    if b_zp is not None:
        b32 = b32 - b_zp.astype(np.int32)
    return [np.matmul(a32, b32).astype(np.int32)]


def _qlinear_matmul(node, args, module):
    """onnx.reference's QLinearMatMul, step for step (integer a and b)."""
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = args
    if _is_float(a.dtype) or _is_float(b.dtype):
        raise NotImplementedError("qlinear_matmul on float8 codes is not supported")
    a_scale, a_zp = _row_param(a_scale, a), _row_param(a_zp, a)
    b_scale, b_zp = _col_param(b_scale), _col_param(b_zp)
    y_scale, y_zp = _col_param(y_scale), _col_param(y_zp)
    A = a.astype(np.int32)
    if a_zp is not None:
        A = A - a_zp.astype(np.int32)
    B = b.astype(np.int32)
    if b_zp is not None:
        B = B - b_zp.astype(np.int32)
    C = np.matmul(A, B)
    # int32 * float32 promotes to float64 in numpy: the same as onnx.reference.
    D = C * (a_scale * b_scale / y_scale)
    if y_zp is not None:
        D = D + y_zp
        dtype = y_zp.dtype
    else:
        dtype = a.dtype
    info = np.iinfo(dtype)
    return [np.clip(np.rint(D), info.min, info.max).astype(dtype)]


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


def _arg(args, i):
    return args[i] if len(args) > i else None


def _dequantize(node, args, module):
    return [numerics.dequantize(args[0], args[1], _arg(args, 2), node.attrs["scheme"],
                                node.attrs["out"], g_idx=_arg(args, 3))]


def _quantize(node, args, module):
    return [numerics.quantize(args[0], args[1], _arg(args, 2), node.attrs["scheme"],
                              saturate=node.attrs.get("saturate", 1))]


def _dynamic_quantize(node, args, module):
    return list(numerics.dynamic_quantize(args[0]))


def _is_u8_per_tensor_affine(s: Optional[QuantScheme]) -> bool:
    return (s is not None and s.dtype.name == "u8" and not s.symmetric
            and s.granularity == "tensor")


def _qmatmul(node, args, module):
    """The product (below), then the node's epilogue if it has one."""
    return _apply_epilogue(node, _qmatmul_product(node, args, module)[0], args)


def qmatmul_product_dtype(node: Node) -> np.dtype:
    """The element type of x @ dequant(w) + bias, before any epilogue."""
    if node.attrs["act"] == "float":
        return node.operands[0].type.dtype.np_dtype
    return node.operands[2].type.dtype.np_dtype


def _apply_epilogue(node: Node, product: np.ndarray, args: list) -> list:
    """qmatmul's ``epilogue`` on the product (``x0``) and the operands after the eight fixed
    ones; the one place where it is applied, to the reference product and to a backend's
    kernel output alike (``run(kernels=...)``)."""
    body = node.attrs.get("epilogue")
    if body is None:
        return [product]
    from qcompiler.ir.elementwise_body import evaluate

    product = np.asarray(product).astype(qmatmul_product_dtype(node), copy=False)
    return [evaluate(body, [product] + list(args[8:]), _result_dtype(node))]


def _qmatmul_product(node, args, module):
    """x @ dequant(w) + bias; see qcompiler.ir.ops._qmatmul for the three ``act`` modes."""
    x, w, w_scale = args[0], args[1], args[2]
    w_zp, g_idx = _arg(args, 3), _arg(args, 4)
    x_scale, x_zp, bias = _arg(args, 5), _arg(args, 6), _arg(args, 7)
    scheme: QuantScheme = node.attrs["w_scheme"]
    act = node.attrs["act"]
    w_type = node.operands[1].type
    if w_type.layout is not None and w_type.layout.name != "row_major":
        raise NotImplementedError(
            f"the reference qmatmul reads row-major [K, N] codes, not {w_type.layout}")
    if w.ndim != 2:
        raise ValueError(f"qmatmul weight must be [K, N], not {w.shape}")
    out_dtype = qmatmul_product_dtype(node)

    if act == "float":
        # Dequantize in float32 and round to x's type (an f16 model stores f16 weights),
        # then accumulate in float32 and round once at the end.
        wf = numerics.dequantize(w, w_scale, w_zp, scheme, np.float32, g_idx=g_idx)
        wf = wf.astype(x.dtype).astype(_compute_dtype(x.dtype))
        y = np.matmul(x.astype(_compute_dtype(x.dtype)), wf)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return [y.astype(out_dtype)]

    if act not in ("dynamic", "static"):
        raise ValueError(f"qmatmul act must be float, dynamic or static, not {act!r}")
    if scheme.granularity == "group" or scheme.dtype.kind == "nf4" \
            or numerics.is_narrow_float(scheme.dtype):
        raise ValueError(f"integer qmatmul needs integer per-tensor or per-column weights, "
                         f"not {scheme}")
    x_scheme: Optional[QuantScheme] = node.attrs.get("x_scheme")
    if act == "dynamic":
        if not _is_u8_per_tensor_affine(x_scheme):
            raise NotImplementedError(
                f"dynamic qmatmul supports the u8 per-tensor affine x_scheme "
                f"(DynamicQuantizeLinear), not {x_scheme}")
        xq, x_scale, x_zp = numerics.dynamic_quantize(x)
    else:
        if x_scale is None:
            raise ValueError("static qmatmul needs an x_scale operand")
        xq = x
        if x_zp is None and x_scheme is not None and x_scheme.implied_zero_point is not None:
            x_zp = np.array(x_scheme.implied_zero_point)

    # acc = (xq - xzp) @ (w - wzp), exactly in int32 (ONNX MatMulInteger).
    x32 = xq.astype(np.int32)
    if x_zp is not None:
        x32 = x32 - np.asarray(x_zp).reshape(()).astype(np.int32)
    w32 = w.astype(np.int32)
    if w_zp is not None:
        w32 = w32 - numerics.expand_scale(w_zp, w.shape, scheme).astype(np.int32)
    elif scheme.implied_zero_point is not None:
        w32 = w32 - np.int32(scheme.implied_zero_point)
    acc = np.matmul(x32, w32)
    # One scale per output column: [N] (per-column) or a scalar (per-tensor).
    ws = numerics.expand_scale(w_scale, w.shape, scheme)[0]
    multiplier = np.asarray(x_scale).reshape(()) * ws
    y = acc.astype(np.float32) * multiplier
    if bias is not None:
        y = y + bias
    return [np.asarray(y).astype(out_dtype)]


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------

OP_IMPLS: dict[str, Callable] = {
    "constant": _constant,
    "identity": _identity,
    "cast": _cast,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "div": _div,
    "max": _binary(np.maximum),
    "min": _binary(np.minimum),
    "pow": _pow,
    "equal": _equal,
    "where": _where,
    "isnan": _isnan,
    "greater": _binary(np.greater),
    "greater_or_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_or_equal": _binary(np.less_equal),
    "and": _binary(np.logical_and),
    "sqrt": _unary(np.sqrt),
    "erf": _erf,
    "relu": _unary(_relu),
    "sigmoid": _unary(_sigmoid_fn),
    "tanh": _unary(np.tanh),
    "exp": _unary(np.exp),
    "neg": _unary(np.negative),
    "abs": _unary(np.abs),
    "reciprocal": _unary(np.reciprocal),
    "gelu": _gelu,
    "softmax": _softmax,
    "layernorm": _layernorm,
    "rmsnorm": _rmsnorm,
    "fused_elementwise": _fused_elementwise,
    "attention": _attention,
    "reduce_mean": _reduce_mean,
    "reduce_sum": _reduce(_sum),
    "reduce_l2": _reduce(_l2),
    "reshape": _reshape,
    "transpose": _transpose,
    "concat": _concat,
    "split": _split,
    "slice": _slice,
    "gather": _gather,
    "gather_elements": _gather_elements,
    "gather_nd": _gather_nd,
    "range": _range,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "shape": _shape,
    "expand": _expand,
    "matmul": _matmul,
    "gemm": _gemm,
    "matmul_integer": _matmul_integer,
    "qlinear_matmul": _qlinear_matmul,
    "dequantize": _dequantize,
    "quantize": _quantize,
    "dynamic_quantize": _dynamic_quantize,
    "qmatmul": _qmatmul,
}


# --------------------------------------------------------------------------------------------
# the interpreter
# --------------------------------------------------------------------------------------------


def _check_input(v: Value, x: np.ndarray, sizes: dict) -> None:
    """dtype, rank and static dims of an input; a symbol must have one size across inputs."""
    t: TensorType = v.type
    want = t.dtype.np_dtype
    if x.dtype != want:
        raise RunInputError(f"input %{v.name}: expected {t} (numpy {want}), got dtype "
                            f"{x.dtype}")
    if x.ndim != t.rank:
        raise RunInputError(f"input %{v.name}: expected {t}, got rank {x.ndim} shape {x.shape}")
    for i, (d, n) in enumerate(zip(t.shape, x.shape)):
        if isinstance(d, int):
            if d != n:
                raise RunInputError(f"input %{v.name}: expected {t}, got shape {x.shape}")
        elif d != "?":
            if sizes.setdefault(d, n) != n:
                raise RunInputError(f"input %{v.name}: dim {i} is {d} = {sizes[d]} elsewhere, "
                                 f"got {n} (shape {x.shape})")
    if t.dtype.bits < 8 and t.dtype.kind in ("int", "uint", "ternary", "nf4") and x.size:
        lo, hi = t.dtype.int_range()
        if x.min() < lo or x.max() > hi:
            raise RunInputError(f"input %{v.name}: {t.dtype} codes must lie in [{lo}, {hi}]")


class ResultShapeError(TypeError):
    """An op's result does not have its declared shape."""


def _check_result(node: Node, r: Value, y: np.ndarray) -> None:
    t = r.type
    if y.dtype != t.dtype.np_dtype:
        raise TypeError(f"result %{r.name} has dtype {y.dtype}, its type {t} says "
                        f"{t.dtype.np_dtype}")
    if t.layout is not None and t.layout.name != "row_major":
        return  # a packed layout's stored shape is the backend's business
    if y.ndim != t.rank or any(isinstance(d, int) and d != n for d, n in zip(t.shape, y.shape)):
        raise ResultShapeError(f"result %{r.name} has shape {y.shape}, its type is {t}")


def _with_epilogue(kernel: Callable) -> Callable:
    """A backend's qmatmul kernel computes the product; the interpreter applies the epilogue."""
    def impl(node, args, module):
        outs = kernel(node, args, module)
        return _apply_epilogue(node, outs[0], args) if "epilogue" in node.attrs else outs
    return impl


def run(module: Module, inputs: dict[str, np.ndarray],
        kernels: Optional[dict[str, Callable]] = None) -> dict[str, np.ndarray]:
    """Run ``module.main`` on ``inputs`` (by argument name); returns outputs by output name.

    ``kernels`` maps a node's first result name to an implementation with the signature of
    ``OP_IMPLS`` (``impl(node, args, module) -> list[np.ndarray]``): a backend runs the
    kernels it compiled this way and lets the interpreter run the rest of the graph.

    Raises RunInputError (a ValueError) for missing, unknown or mistyped inputs, and
    OpFailedError (a RuntimeError) naming the node when an op refuses its data.
    Intermediates are dropped as soon as their last user has run.
    """
    fn: Function = module.main
    if not isinstance(inputs, dict):
        raise RunInputError(f"@{fn.name}: inputs must be a dict {{name: array}}, not "
                            f"{type(inputs).__name__}")
    arg_names = [a.name for a in fn.args]
    missing = [n for n in arg_names if n not in inputs]
    extra = [n for n in inputs if n not in arg_names]
    if missing or extra:
        raise RunInputError(f"@{fn.name} inputs: missing {missing}, unknown {extra} "
                         f"(expected {', '.join(f'%{a.name}: {a.type}' for a in fn.args)})")

    # Remaining uses of each value; outputs hold one use that is never released.
    uses: dict[Value, int] = {}
    for n in fn.nodes:
        for v in n.operands:
            if v is not None:
                uses[v] = uses.get(v, 0) + 1
    for v in fn.outputs:
        uses[v] = uses.get(v, 0) + 1

    env: dict[Value, np.ndarray] = {}
    sizes: dict = {}
    unknown_dims = any(not isinstance(d, int) for a in fn.args for d in a.type.shape)
    for a in fn.args:
        try:
            x = np.asarray(inputs[a.name])
        except (ValueError, TypeError) as e:  # ragged lists and other non-arrays
            raise RunInputError(f"input %{a.name}: not an array: {e}") from None
        _check_input(a, x, sizes)
        if uses.get(a, 0):
            env[a] = x

    kernels = kernels or {}
    for node in fn.nodes:
        kernel = kernels.get(node.results[0].name) if node.results else None
        impl = _with_epilogue(kernel) if kernel is not None and node.op == "qmatmul" \
            else kernel or OP_IMPLS.get(node.op)
        names = ", ".join(f"%{r.name}" for r in node.results)
        if impl is None:
            raise OpFailedError(f"{names} = {node.op}: the reference runtime has no such op")
        try:
            args = [env[v] if v is not None else None for v in node.operands]
            outs = impl(node, args, module)
            if len(outs) != len(node.results):
                raise TypeError(f"produced {len(outs)} results, the node has "
                                f"{len(node.results)}")
            outs = [np.asarray(y) for y in outs]
            for r, y in zip(node.results, outs):
                _check_result(node, r, y)
        except QCompilerError:
            raise
        except ResultShapeError as e:
            if not unknown_dims:
                raise RuntimeError(f"{names} = {node.op}(...) failed: {e}") from e
            # An argument declared with symbolic or unknown dims was given a size that the
            # graph constrains otherwise: the inputs are wrong, not the interpreter.
            raise OpFailedError(f"{names} = {node.op}(...) failed: {e}; the inputs do not "
                                "fit the shapes the graph was compiled for") from e
        except _DATA_ERRORS as e:
            msg = " ".join(str(e).split())[:300]
            raise OpFailedError(f"{names} = {node.op}(...) failed: {type(e).__name__}: "
                                f"{msg}") from e
        except Exception as e:  # a bug in an op or in type inference: keep it visible
            raise RuntimeError(f"{names} = {node.op}(...) failed: "
                               f"{type(e).__name__}: {e}") from e
        for v in node.operands:
            if v is None:
                continue
            uses[v] -= 1
            if uses[v] == 0:
                del env[v]
        for r, y in zip(node.results, outs):
            if uses.get(r, 0):
                env[r] = y

    return {name: env[v] for name, v in zip(fn.output_names, fn.outputs)}
