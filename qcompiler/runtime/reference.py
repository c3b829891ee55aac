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
- gelu is computed in float64 and rounded once (ONNX expands it into float ops), in forms
  that stay accurate in the negative tail where 1 + erf and 1 + tanh cancel (erfc; a
  logistic of 2 inner).
- cast from float to integer saturates out-of-range values and maps NaN to 0 (undefined in
  ONNX); quantize saturates ±inf and huge values (onnx.reference wraps them through int32).
- matmul_integer / qlinear_matmul accept a 1-D per-row ``[M]`` zero point / scale for ``a``
  as the ONNX spec says (onnx.reference would broadcast it along K instead).
- grid_sample cubic with border padding clamps each of the 16 taps, not the sampling point
  (PyTorch and onnxruntime; onnx.reference clamps the point first).

Every op implementation has the signature ``impl(node, args, module) -> list[np.ndarray]``
and never writes into its arguments (values may be shared between nodes and the caller).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from qcompiler.errors import InputError, QCompilerError
from qcompiler.ir.core import Function, Module, Node, Value
from qcompiler.ir.ops import QMATMUL_X_NORMS, qmatmul_epilogue_operands
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
        # 0.5 v (1 + tanh(inner)) written as v / (1 + e^(-2 inner)): the same function, but
        # 1 + tanh cancels for inner << 0 (below inner ~ -19 nothing of it is left in float64)
        inner = math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)
        with np.errstate(over="ignore", invalid="ignore"):
            y = v / (1.0 + np.exp(-2.0 * inner))
    elif approximate in ("none", "", None):
        # 0.5 v (1 + erf(v / sqrt 2)) written with erfc: the same function, but 1 + erf
        # cancels for v << 0 (below v ~ -5.6 no digit of it is left in float64), erfc keeps
        # the tail's relative accuracy down to float32's subnormals
        from scipy.special import erfc

        y = 0.5 * v * erfc(-v / math.sqrt(2.0))
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
    bias = args[2] if len(args) > 2 else None
    return [layer_normalize(args[0], args[1], bias, node.attrs["epsilon"], node.attrs["axis"])]


def layer_normalize(x: np.ndarray, scale: np.ndarray, bias, epsilon: float,
                    axis: int) -> np.ndarray:
    """(x - mean) / sqrt(var + epsilon) * scale (+ bias) over the axes from ``axis`` on, the
    statistics in float32 for f16/bf16 x, rounded to x's type (``layernorm``, and qmatmul's
    ``x_norm = "layer"``)."""
    ct = _compute_dtype(x.dtype)
    rank = x.ndim
    axis = axis % rank
    eps = epsilon
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
    return y.astype(x.dtype)


def _rmsnorm(node, args, module):
    """ONNX RMSNormalization (stash_type=1: f16/bf16 computed in float32)."""
    x, scale = args
    return [rms_normalize(x, scale, node.attrs["epsilon"], node.attrs["axis"])]


def x_normalize(node: Node, x: np.ndarray, scale: np.ndarray, bias=None) -> np.ndarray:
    """x as a qmatmul with ``x_norm`` reads it: normalized over its last axis with the norm's
    scale (and LayerNorm's bias)."""
    eps = node.attrs["x_norm_epsilon"]
    if node.attrs["x_norm"] == "rms":
        return rms_normalize(x, scale, eps, axis=-1)
    return layer_normalize(x, scale, bias, eps, axis=-1)


def rms_normalize(x: np.ndarray, scale: np.ndarray, epsilon: float, axis: int) -> np.ndarray:
    """x / sqrt(mean(x^2 over the axes from ``axis`` on) + epsilon) * scale, in float32 for
    f16/bf16 x, rounded to x's type (``rmsnorm``, and qmatmul's ``x_norm = "rms"``)."""
    ct = _compute_dtype(x.dtype)
    axes = tuple(range(axis % x.ndim, x.ndim))
    v = x.astype(ct)
    mean_square = np.mean(v * v, axis=axes, keepdims=True, dtype=ct)
    rms = np.sqrt(mean_square + ct.type(epsilon))
    return ((v / rms) * scale.astype(ct)).astype(x.dtype)


def _fused_elementwise(node, args, module):
    from qcompiler.ir.elementwise_body import evaluate

    return [evaluate(node.attrs["body"], args, _result_dtype(node))]


def _attention(node, args, module):
    """softmax(q @ k^T * scale + mask) @ v in float32 (float64 stays), kv heads shared by
    groups of query heads. Causal positions get float's lowest value (as onnxruntime's
    decomposed graphs' -3.4e38), so a fully masked row is uniform; an additive -inf mask over a
    whole row gives NaN, as softmax does."""
    q, k, v = args[0], args[1], args[2]
    # [B, S, H, D] operands (fold-attention-layout) as [B, H, S, D] views
    if node.attrs.get("q_bshd", 0):
        q = np.swapaxes(q, 1, 2)
    if node.attrs.get("kv_bshd", 0):
        k, v = np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2)
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
    y = np.matmul(probs, v.astype(ct)).astype(_result_dtype(node))
    return [np.ascontiguousarray(np.swapaxes(y, 1, 2)) if node.attrs.get("y_bshd", 0) else y]


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


def _all_reduce(node, args, module):
    """Rank 0 + rank 1 + ... in the operands' type, in rank order. In a rank program (one
    operand, ``world`` ranks) the sum with the other ranks' partials is the collective's: the
    communicator the rank's process installed (``qcompiler.runtime.collectives``)."""
    world = node.attrs.get("world", len(args))
    if world > len(args):
        from qcompiler.runtime.collectives import all_reduce

        return [all_reduce(node, np.asarray(args[0]), world)]
    total = args[0].copy()
    for a in args[1:]:
        total = total + a
    return [total.astype(args[0].dtype)]


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
    return node.arg("w_scale").type.dtype.np_dtype


def _apply_epilogue(node: Node, product: np.ndarray, args: list) -> list:
    """qmatmul's ``epilogue`` on the product (``x0``) and the operands after the eight fixed
    ones; the one place where it is applied, to the reference product and to a backend's
    kernel output alike (``run(kernels=...)``)."""
    body = node.attrs.get("epilogue")
    if body is None:
        return [product]
    from qcompiler.ir.elementwise_body import evaluate

    product = np.asarray(product).astype(qmatmul_product_dtype(node), copy=False)
    if node.attrs.get("epilogue_pairs"):  # column pairs (2j, 2j + 1) -> column j
        return [evaluate(body, [product[..., 0::2], product[..., 1::2]], _result_dtype(node))]
    extra = qmatmul_epilogue_operands(list(args), node.attrs)
    return [evaluate(body, [product] + extra, _result_dtype(node))]


def _qmatmul_product(node, args, module):
    """x @ dequant(w) + bias; see qcompiler.ir.ops._qmatmul for the three ``act`` modes."""
    x, w, w_scale = args[0], args[1], args[2]
    w_zp, g_idx = _arg(args, 3), _arg(args, 4)
    x_scale, x_zp, bias = _arg(args, 5), _arg(args, 6), _arg(args, 7)
    scheme: QuantScheme = node.attrs["w_scheme"]
    act = node.attrs["act"]
    w_type = node.arg("w").type
    if w_type.layout is not None and w_type.layout.name != "row_major":
        raise NotImplementedError(
            f"the reference qmatmul reads row-major [K, N] codes, not {w_type.layout}")
    if w.ndim != 2:
        raise ValueError(f"qmatmul weight must be [K, N], not {w.shape}")
    out_dtype = qmatmul_product_dtype(node)
    if node.attrs.get("x_norm"):  # fuse-norm-qmatmul: the norm it took in
        count = QMATMUL_X_NORMS[node.attrs["x_norm"]]
        x = x_normalize(node, x, *args[len(args) - count:])

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
    "all_reduce": _all_reduce,
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
# ONNX coverage (issue #13): math, activations, reductions, indexing, convolution and pooling
# --------------------------------------------------------------------------------------------


def _float_unary(fn: Callable) -> Callable:
    """A float function computed in float32 (float64 stays) and rounded once to x's type;
    integer x (Sign, Abs ...) is computed in its own type."""
    def impl(node, args, module):
        x = args[0]
        v = x.astype(_compute_dtype(x.dtype)) if _is_float(x.dtype) else x
        with np.errstate(all="ignore"):
            return [np.asarray(fn(v)).astype(x.dtype)]
    return impl


def _softplus_fn(v):
    return np.logaddexp(v, np.zeros((), v.dtype))


def _hard_swish_fn(v):
    return v * np.clip(v / v.dtype.type(6) + v.dtype.type(0.5), 0, 1)


def _activation(fn: Callable) -> Callable:
    """An activation with float parameters (node attributes) in float32, rounded once."""
    def impl(node, args, module):
        x = args[0]
        v = x.astype(_compute_dtype(x.dtype))
        params = {k: v.dtype.type(a) for k, a in node.attrs.items()}
        with np.errstate(all="ignore"):
            return [np.asarray(fn(v, **params)).astype(x.dtype)]
    return impl


def _selu_fn(x, alpha, gamma):
    return np.where(x > 0, gamma * x, gamma * alpha * (np.exp(x) - 1))


def _celu_fn(x, alpha):
    return np.maximum(0, x) + np.minimum(0, alpha * (np.exp(x / alpha) - 1))


def _shrink_fn(x, bias, lambd):
    return np.where(x > lambd, x - bias, np.where(x < -lambd, x + bias, 0))


ACTIVATION_FNS = {
    "leaky_relu": lambda x, alpha: np.where(x >= 0, x, alpha * x),
    "elu": lambda x, alpha: np.where(x > 0, x, alpha * (np.exp(x) - 1)),
    "selu": _selu_fn,
    "celu": _celu_fn,
    "hard_sigmoid": lambda x, alpha, beta: np.clip(alpha * x + beta, 0, 1),
    "thresholded_relu": lambda x, alpha: np.where(x > alpha, x, 0),
    "shrink": _shrink_fn,
}


def _shrink(node, args, module):
    """Shrink also takes integer x (ONNX): compare and shift in float64, then convert back."""
    x = args[0]
    if _is_float(x.dtype):
        return _activation(_shrink_fn)(node, args, module)
    v = x.astype(np.float64)
    return [_shrink_fn(v, node.attrs["bias"], node.attrs["lambd"]).astype(x.dtype)]


def _isinf(node, args, module):
    x = args[0]
    pos = np.isposinf(x) if node.attrs["detect_positive"] else np.zeros(x.shape, bool)
    neg = np.isneginf(x) if node.attrs["detect_negative"] else np.zeros(x.shape, bool)
    return [pos | neg]


def _round_half_even(v):
    return np.round(v)  # numpy rounds halves to even, as ONNX Round


def _mod(node, args, module):
    a, b = args
    if node.attrs["fmod"]:
        with np.errstate(all="ignore"):
            y = np.fmod(a, b)
    else:
        with np.errstate(all="ignore"):
            y = np.mod(a, b)  # the sign of the divisor, as Python's %
    return [np.asarray(y).astype(_result_dtype(node))]


def _bit_shift(node, args, module):
    a, b = args
    dtype = _result_dtype(node)
    shift = np.left_shift if node.attrs["direction"].lower() == "left" else np.right_shift
    return [shift(a.astype(dtype), b.astype(dtype)).astype(dtype)]


def _prelu(node, args, module):
    x, slope = args
    return [np.where(x < 0, x * slope, x).astype(_result_dtype(node))]


def _reduce_kind(node, args, module):
    """reduce: f16/bf16 computed in float32; max/min of an empty set give ONNX's identities."""
    x = args[0]
    kind = node.attrs["kind"]
    axes = list(node.attrs["axes"])
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        return [x]
    axes_t = tuple(sorted({a % x.ndim for a in axes})) if axes else tuple(range(x.ndim))
    keepdims = bool(node.attrs["keepdims"])
    v = x.astype(_compute_dtype(x.dtype)) if _is_float(x.dtype) else x
    with np.errstate(all="ignore"):
        if kind in ("max", "min"):
            fn = np.max if kind == "max" else np.min
            if v.size == 0:
                if _is_float(v.dtype):
                    empty = -np.inf if kind == "max" else np.inf
                elif v.dtype == np.bool_:
                    empty = kind != "max"  # max of nothing is False, min True
                else:
                    info = np.iinfo(v.dtype)
                    empty = info.min if kind == "max" else info.max
                shape = [1 if i in axes_t else d for i, d in enumerate(v.shape)] if keepdims \
                    else [d for i, d in enumerate(v.shape) if i not in axes_t]
                y = np.full(shape, empty, v.dtype)
            else:
                y = fn(v, axis=axes_t, keepdims=keepdims)
        elif kind == "prod":
            y = np.prod(v, axis=axes_t, keepdims=keepdims, dtype=v.dtype)
        elif kind == "sum_square":
            y = np.sum(v * v, axis=axes_t, keepdims=keepdims, dtype=v.dtype)
        elif kind == "l1":
            y = np.sum(np.abs(v), axis=axes_t, keepdims=keepdims, dtype=v.dtype)
        elif kind == "log_sum":
            y = np.log(np.sum(v, axis=axes_t, keepdims=keepdims, dtype=v.dtype))
        elif kind == "log_sum_exp":
            if v.size == 0:
                y = np.log(np.sum(np.exp(v), axis=axes_t, keepdims=keepdims))
            else:
                m = np.max(v, axis=axes_t, keepdims=True)
                m = np.where(np.isfinite(m), m, 0)
                y = np.log(np.sum(np.exp(v - m), axis=axes_t, keepdims=True)) + m
                if not keepdims:
                    y = np.squeeze(y, axis=axes_t)
        else:
            raise ValueError(f"reduce kind {kind!r} is not supported")
    return [np.asarray(y).astype(x.dtype)]


def _arg_reduce(node, args, module):
    x = args[0]
    axis = node.attrs["axis"] % x.ndim
    fn = np.argmax if node.attrs["kind"] == "max" else np.argmin
    if node.attrs["select_last_index"]:
        flipped = np.flip(x, axis)
        y = x.shape[axis] - 1 - fn(flipped, axis=axis)
    else:
        y = fn(x, axis=axis)
    if node.attrs["keepdims"]:
        y = np.expand_dims(y, axis)
    return [np.asarray(y).astype(np.int64)]


def _cumulative(node, args, module):
    x = args[0]
    axis = node.attrs["axis"] % x.ndim
    fn = np.cumsum if node.attrs["kind"] == "sum" else np.cumprod
    identity = 0 if node.attrs["kind"] == "sum" else 1
    v = np.flip(x, axis) if node.attrs["reverse"] else x
    y = fn(v, axis=axis, dtype=x.dtype)
    if node.attrs["exclusive"]:
        first = np.full_like(np.take(y, [0], axis=axis), identity)
        y = np.concatenate([first, np.take(y, range(y.shape[axis] - 1), axis=axis)], axis=axis)
    if node.attrs["reverse"]:
        y = np.flip(y, axis)
    return [np.ascontiguousarray(y)]


def _log_softmax(node, args, module):
    x = args[0]
    if x.size == 0:
        return [x]
    axis = node.attrs["axis"]
    v = x.astype(_compute_dtype(x.dtype))
    tmp = v - v.max(axis=axis, keepdims=True)
    return [(tmp - np.log(np.exp(tmp).sum(axis=axis, keepdims=True))).astype(x.dtype)]


def _hardmax(node, args, module):
    x = args[0]
    axis = node.attrs["axis"] % max(x.ndim, 1)
    y = np.zeros_like(x)
    if x.size:
        np.put_along_axis(y, np.expand_dims(np.argmax(x, axis=axis), axis), 1, axis=axis)
    return [y]


def _tile(node, args, module):
    return [np.tile(args[0], _ints(args[1]))]


def _pad(node, args, module):
    """ONNX Pad: negative pads crop first; reflect / edge / wrap as numpy's reflect / edge /
    wrap."""
    x, pads = args[0], _ints(args[1])
    value = _arg(args, 2)
    r = x.ndim
    if len(pads) != 2 * r:
        raise ValueError(f"pad has {len(pads)} pads for a rank-{r} tensor")
    crop = tuple(slice(max(-pads[i], 0), x.shape[i] - max(-pads[i + r], 0)) for i in range(r))
    x = x[crop]
    width = [(max(pads[i], 0), max(pads[i + r], 0)) for i in range(r)]
    mode = node.attrs["mode"]
    if mode == "constant":
        fill = 0 if value is None or np.asarray(value).size == 0 else \
            np.asarray(value).reshape(-1)[0]
        return [np.pad(x, width, mode="constant", constant_values=fill)]
    return [np.pad(x, width, mode=mode)]


def _trilu(node, args, module):
    x = args[0]
    k_arr = _arg(args, 1)
    k = int(np.asarray(k_arr).reshape(-1)[0]) if k_arr is not None else 0
    return [np.triu(x, k) if node.attrs["upper"] else np.tril(x, k)]


def _topk(node, args, module):
    """Sorted by value (largest or smallest first), ties by the smaller index (ONNX)."""
    x = args[0]
    k = int(np.asarray(args[1]).reshape(-1)[0])
    axis = node.attrs["axis"] % x.ndim
    if k < 0 or k > x.shape[axis]:
        raise ValueError(f"topk k={k} is out of range for dim {axis} of {x.shape}")
    # A stable sort by the negated (largest) or plain values keeps equal values in index order.
    keys = -x.astype(np.float64) if node.attrs["largest"] else x
    order = np.argsort(keys, axis=axis, kind="stable")
    idx = np.take(order, range(k), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)]


def _einsum(node, args, module):
    dtype = _result_dtype(node)
    if _is_float(dtype):
        ct = _compute_dtype(dtype)
        return [np.asarray(np.einsum(node.attrs["equation"], *[a.astype(ct) for a in args]))
                .astype(dtype)]
    return [np.asarray(np.einsum(node.attrs["equation"], *args)).astype(dtype)]


def _resize_coeffs(mode: str, node, ratio: np.ndarray, scale: float) -> np.ndarray:
    """Interpolation weights [out, n] of each output position's n neighbours."""
    attrs = node.attrs
    if mode == "nearest":
        nm = attrs["nearest_mode"]
        whole = ratio == 1.0  # x_ori on a pixel: that pixel (the right of the pair)
        if nm == "round_prefer_floor":
            right = ratio > 0.5
        elif nm == "round_prefer_ceil":
            right = ratio >= 0.5
        elif nm == "floor":
            right = np.zeros_like(whole)
        elif nm == "ceil":
            right = np.ones_like(whole)
        else:
            raise ValueError(f"resize nearest_mode {nm!r} is not supported")
        right = right | whole
        return np.stack([~right, right], axis=1).astype(np.float64)
    if mode == "linear":
        if not attrs["antialias"]:
            return np.stack([1 - ratio, ratio], axis=1)
        s = min(scale, 1.0)
        start = int(np.floor(-1 / s) + 1)
        footprint = 2 - 2 * start
        args = (np.arange(start, start + footprint)[None, :] - ratio[:, None]) * s
        c = np.clip(1 - np.abs(args), 0, 1)
        return c / c.sum(axis=1, keepdims=True)
    if mode == "cubic":
        a = attrs["cubic_coeff_a"]
        if not attrs["antialias"]:
            r = ratio[:, None]
            d = np.concatenate([r + 1, r, 1 - r, 2 - r], axis=1)
        else:
            s = min(scale, 1.0)
            i_start = int(np.floor(-2 / s) + 1)
            i_end = 2 - i_start
            d = s * (np.arange(i_start, i_end)[None, :] - ratio[:, None])
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        c = np.where(d <= 1, near, np.where(d < 2, far, 0.0))
        if attrs["antialias"]:
            c = c / c.sum(axis=1, keepdims=True)
        return c
    raise ValueError(f"resize mode {mode!r} is not supported")


def _resize_1d(node, data: np.ndarray, axis: int, scale: float, out_n: int,
               roi: Optional[tuple]) -> np.ndarray:
    """Resize along one axis (Resize is separable), in float64 (onnx.reference)."""
    attrs = node.attrs
    in_n = data.shape[axis]
    out_w = scale * in_n
    y = np.arange(out_n, dtype=np.float64)
    ctm = attrs["coordinate_transformation_mode"]
    extrapolated = None
    if ctm == "align_corners":
        x = np.zeros(out_n) if out_w == 1 else y * (in_n - 1) / (out_w - 1)
    elif ctm == "asymmetric":
        x = y / scale
    elif ctm == "tf_crop_and_resize":
        lo, hi = roi
        x = np.full(out_n, (hi - lo) * (in_n - 1) / 2) if out_w == 1 else \
            y * (hi - lo) * (in_n - 1) / (out_w - 1)
        x = x + lo * (in_n - 1)
        extrapolated = (x < 0) | (x > in_n - 1)
    elif ctm == "pytorch_half_pixel":
        x = np.full(out_n, -0.5) if out_w == 1 else (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ctm == "half_pixel_symmetric":
        offset = in_n / 2 * (1 - out_n / out_w)
        x = offset + (y + 0.5) / scale - 0.5
    else:
        raise ValueError(f"resize coordinate_transformation_mode {ctm!r} is not supported")
    base = np.floor(x)
    ratio = np.where(x == base, 1.0, x - base)  # on a pixel: weight it as the right neighbour
    coeffs = _resize_coeffs(attrs["mode"], node, ratio, scale)
    n = coeffs.shape[1]
    # The n neighbours closest to x (ties to the smaller index), as onnx.reference picks them.
    pad = int(np.ceil(n / 2))
    xp = x + pad
    p = np.floor(xp).astype(np.int64)
    frac = xp - p
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    idx = (p + offset)[:, None] + np.arange(n)[None, :] - pad
    if attrs["exclude_outside"]:
        coeffs = np.where((idx < 0) | (idx >= in_n), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    gathered = np.take(data, np.clip(idx, 0, in_n - 1), axis=axis)
    shape = (1,) * axis + coeffs.shape + (1,) * (data.ndim - axis - 1)
    out = (gathered * coeffs.reshape(shape)).sum(axis=axis + 1)
    if extrapolated is not None and extrapolated.any():
        mask = extrapolated.reshape((1,) * axis + (out_n,) + (1,) * (data.ndim - axis - 1))
        out = np.where(mask, attrs["extrapolation_value"], out)
    return out


def _resize(node, args, module):
    x = args[0]
    roi, scales, sizes = _arg(args, 1), _arg(args, 2), _arg(args, 3)
    r = x.ndim
    axes = [a % r for a in node.attrs["axes"]] or list(range(r))
    roi_full = None
    if roi is not None and roi.size:
        rv = np.asarray(roi, np.float64).reshape(-1)
        roi_full = [(0.0, 1.0)] * r
        for i, a in enumerate(axes):
            roi_full[a] = (rv[i], rv[len(axes) + i])
    scale_full = [1.0] * r
    out_full = list(x.shape)
    if sizes is not None and sizes.size:
        sz = _ints(sizes)
        for i, a in enumerate(axes):
            out_full[a] = sz[i]
        scale_full = [out_full[i] / x.shape[i] for i in range(r)]
        policy = node.attrs["keep_aspect_ratio_policy"]
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            s = pick(scale_full[a] for a in axes)
            scale_full = [s if i in axes else 1.0 for i in range(r)]
            out_full = [int(s * x.shape[i] + 0.5) if i in axes else x.shape[i]
                        for i in range(r)]
    elif scales is not None and scales.size:
        sv = np.asarray(scales, np.float64).reshape(-1)
        for i, a in enumerate(axes):
            scale_full[a] = float(sv[i])
        out_full = [int(scale_full[i] * x.shape[i]) for i in range(r)]
    else:
        raise ValueError("resize needs scales or sizes")
    y = x.astype(np.float64)
    for a in axes:
        same_roi = roi_full is None or (math.isclose(roi_full[a][0], 0.0)
                                        and math.isclose(roi_full[a][1], 1.0))
        if math.isclose(scale_full[a], 1.0) and out_full[a] == y.shape[a] and same_roi:
            continue
        y = _resize_1d(node, y, a, scale_full[a], out_full[a],
                       None if roi_full is None else roi_full[a])
    dtype = x.dtype
    if not _is_float(dtype):
        info = np.iinfo(dtype)
        y = np.clip(np.round(y), info.min, info.max)
    return [y.astype(dtype)]


def _one_hot(node, args, module):
    indices, depth, values = args
    d = int(np.asarray(depth).reshape(-1)[0])
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)
    axis = node.attrs["axis"] % (indices.ndim + 1)
    hot = np.expand_dims(idx, axis) == np.arange(d).reshape(
        (d,) + (1,) * (indices.ndim - axis))
    off, on = np.asarray(values).reshape(-1)[:2]
    return [np.where(hot, on, off).astype(values.dtype)]


def _nonzero(node, args, module):
    return [np.array(np.nonzero(args[0]), dtype=np.int64).reshape(args[0].ndim, -1)]


def _scatter_combine(reduction: str, old, new):
    if reduction == "none":
        return new
    return {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[
        reduction](old, new)


def _scatter_nd(node, args, module):
    """Updates are applied in order, so a repeated index combines all its updates."""
    data, indices, updates = args
    out = np.array(data, copy=True)
    idx = indices.astype(np.int64)
    depth = idx.shape[-1]
    flat_idx = idx.reshape(-1, depth)
    flat_upd = updates.reshape((flat_idx.shape[0],) + data.shape[depth:])
    reduction = node.attrs["reduction"]
    for i, upd in zip(flat_idx, flat_upd):
        key = tuple(int(v) for v in i)
        out[key] = _scatter_combine(reduction, out[key], upd)
    return [out]


def _scatter_elements(node, args, module):
    data, indices, updates = args
    axis = node.attrs["axis"] % data.ndim
    out = np.array(data, copy=True)
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    if idx.size and (idx.min() < 0 or idx.max() >= data.shape[axis]):
        raise IndexError(f"scatter_elements index out of range for dim {axis} of {data.shape}")
    reduction = node.attrs["reduction"]
    for pos in np.ndindex(*idx.shape):
        target = list(pos)
        target[axis] = idx[pos]
        target = tuple(target)
        out[target] = _scatter_combine(reduction, out[target], updates[pos])
    return [out]


def _windows(x: np.ndarray, kernel: list, strides: list, dilations: list, out_sp: list,
             pads_begin: list) -> np.ndarray:
    """Sliding windows of an already padded [N, C, *sp] x: [N, C, *out_sp, *kernel]."""
    nsp = len(kernel)
    index = []
    for i in range(nsp):
        starts = np.arange(out_sp[i]) * strides[i]
        taps = np.arange(kernel[i]) * dilations[i]
        index.append(starts[:, None] + taps[None, :])  # [out_i, k_i]
    # Gather dim by dim: each step replaces spatial dim i by [out_i, k_i].
    y = x
    for i in range(nsp):
        ax = 2 + i  # the first remaining spatial dim is at 2 + i (earlier ones moved behind)
        y = np.take(y, index[i], axis=ax)  # [..., out_i, k_i, ...]
        y = np.moveaxis(y, ax + 1, -1)
    return y  # [N, C, out_0, ..., out_{n-1}, k_0, ..., k_{n-1}]


def _conv(node, args, module):
    x, w = args[0], args[1]
    b = _arg(args, 2)
    a = node.attrs
    nsp = x.ndim - 2
    group = a["group"]
    pads = a["pads"]
    dtype = _result_dtype(node)
    ct = _compute_dtype(dtype) if _is_float(dtype) else np.int64
    xp = np.pad(x.astype(ct), [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)])
    kernel = list(w.shape[2:])
    out_sp = [(xp.shape[2 + i] - ((kernel[i] - 1) * a["dilations"][i] + 1)) // a["strides"][i]
              + 1 for i in range(nsp)]
    win = _windows(xp, kernel, a["strides"], a["dilations"], out_sp, pads)
    n, c = x.shape[:2]
    m = w.shape[0]
    cg, mg = c // group, m // group
    outs = []
    letters = "".join(chr(ord("p") + i) for i in range(nsp))
    kl = letters.upper()
    for g in range(group):
        wg = w[g * mg:(g + 1) * mg].astype(ct)
        xg = win[:, g * cg:(g + 1) * cg]
        outs.append(np.einsum(f"nc{letters}{kl},mc{kl}->nm{letters}", xg, wg))
    y = np.concatenate(outs, axis=1) if outs else np.zeros((n, m, *out_sp), ct)
    if b is not None:
        y = y + b.astype(ct).reshape((1, m) + (1,) * nsp)
    return [y.astype(dtype)]


def _conv_transpose(node, args, module):
    """Scatter form: every input pixel adds its weighted kernel into the (cropped) output."""
    x, w = args[0], args[1]
    b = _arg(args, 2)
    a = node.attrs
    nsp = x.ndim - 2
    group = a["group"]
    ct = _compute_dtype(x.dtype)
    n, c = x.shape[:2]
    cg = c // group
    mg = w.shape[1]
    kernel = w.shape[2:]
    strides, dil, pads = a["strides"], a["dilations"], a["pads"]
    full = [strides[i] * (x.shape[2 + i] - 1) + (kernel[i] - 1) * dil[i] + 1
            + a["output_padding"][i] for i in range(nsp)]
    y = np.zeros((n, mg * group, *full), ct)
    xv = x.astype(ct)
    wv = w.astype(ct)
    for g in range(group):
        # contrib[n, m, *in_sp, *k] = sum_c x[n, c, *in_sp] * w[c, m, *k]
        contrib = np.tensordot(xv[:, g * cg:(g + 1) * cg], wv[g * cg:(g + 1) * cg], axes=([1], [0]))
        contrib = np.moveaxis(contrib, 1 + nsp, 1)  # [n, m, *in_sp, *k]
        for k_pos in np.ndindex(*kernel):
            index = [slice(None), slice(g * mg, (g + 1) * mg)]
            for i in range(nsp):
                start = k_pos[i] * dil[i]
                index.append(slice(start, start + strides[i] * (x.shape[2 + i] - 1) + 1,
                                   strides[i]))
            y[tuple(index)] += contrib[(slice(None), slice(None)) + (slice(None),) * nsp + k_pos]
    crop = tuple([slice(None), slice(None)] + [slice(pads[i], full[i] - pads[i + nsp])
                                               for i in range(nsp)])
    y = y[crop]
    if b is not None:
        y = y + b.astype(ct).reshape((1, -1) + (1,) * nsp)
    return [y.astype(x.dtype)]


def _channels_last_aware(impl):
    """An op implementation that also takes ``channels_last`` nodes: x and a residual
    (``ir.ops.channels_last_operands``) move from [N, *spatial, C] to [N, C, *spatial], the
    results back."""
    def run_op(node, args, module):
        if not node.attrs.get("channels_last", 0):
            return impl(node, args, module)
        from qcompiler.ir.ops import channels_last_operands

        moved_ops = channels_last_operands(node.op)
        moved = [np.moveaxis(a, -1, 1) if i in moved_ops and a is not None else a
                 for i, a in enumerate(args)]
        return [np.ascontiguousarray(np.moveaxis(y, 1, -1)) for y in impl(node, moved, module)]
    run_op.__doc__ = impl.__doc__
    return run_op


@_channels_last_aware
def _pool(node, args, module):
    """Windows over x padded with NaN (missing); max ignores them, average divides by the
    window's real (or, with count_include_pad, padded-in-bounds) size."""
    x = args[0]
    a = node.attrs
    nsp = x.ndim - 2
    kernel, strides, dil, pads = a["kernel_shape"], a["strides"], a["dilations"], a["pads"]
    from qcompiler.ir.ops import _window_out

    out_sp = [_window_out(x.shape[2 + i], kernel[i], strides[i], pads[i], pads[i + nsp], dil[i],
                          a["ceil_mode"]) for i in range(nsp)]
    # Enough end padding for ceil_mode's last partial window.
    extra = [max((out_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
                 - (x.shape[2 + i] + pads[i] + pads[i + nsp]), 0) for i in range(nsp)]
    ct = _compute_dtype(x.dtype) if _is_float(x.dtype) else np.float64
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp] + extra[i]) for i in range(nsp)]
    xp = np.pad(x.astype(ct), width, constant_values=np.nan)
    win = _windows(xp, kernel, strides, dil, out_sp, pads)
    flat = win.reshape(win.shape[:2 + nsp] + (-1,))
    kind = a["kind"]
    outs = []
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "max":
            filled = np.where(np.isnan(flat), -np.inf, flat)
            y = filled.max(axis=-1)
            if node.attrs.get("indices", 0):
                outs.append(_pool_indices(x, filled, kernel, strides, dil, pads, out_sp,
                                          a.get("storage_order", 0)))
        elif kind == "average":
            total = np.nansum(flat, axis=-1)
            if a["count_include_pad"]:
                inside = np.pad(np.ones(x.shape[2:]), [(pads[i], pads[i + nsp])
                                                       for i in range(nsp)], constant_values=1)
                inside = np.pad(inside, [(0, e) for e in extra], constant_values=0)
            else:
                inside = np.pad(np.ones(x.shape[2:]), [(pads[i], pads[i + nsp] + extra[i])
                                                       for i in range(nsp)], constant_values=0)
            count = _windows(inside[None, None], kernel, strides, dil, out_sp, pads)
            count = count.reshape(count.shape[:2 + nsp] + (-1,)).sum(axis=-1)
            y = total / count
        else:  # lp
            p = a["p"]
            y = np.nansum(np.abs(flat) ** p, axis=-1) ** (1.0 / p)
    return [y.astype(x.dtype)] + outs


def _pool_indices(x, filled, kernel, strides, dil, pads, out_sp, storage_order):
    """MaxPool's Indices: the flat index of the (first) maximum in x's [N, C, *sp] layout
    (column-major spatial order with storage_order=1)."""
    nsp = len(kernel)
    arg = np.argmax(filled, axis=-1)  # position within the window
    taps = np.unravel_index(arg, kernel)
    coords = []
    for i in range(nsp):
        starts = (np.arange(out_sp[i]) * strides[i] - pads[i]).reshape(
            (1, 1) + tuple(-1 if j == i else 1 for j in range(nsp)))
        coords.append(starts + taps[i] * dil[i])
    n_idx = np.arange(x.shape[0]).reshape((-1,) + (1,) * (nsp + 1))
    c_idx = np.arange(x.shape[1]).reshape((1, -1) + (1,) * nsp)
    spatial = x.shape[2:]
    if storage_order:
        flat_sp = np.zeros_like(coords[0])
        stride = 1
        for i in range(nsp):
            flat_sp = flat_sp + coords[i] * stride
            stride *= spatial[i]
    else:
        flat_sp = np.ravel_multi_index(tuple(coords), spatial, mode="clip")
    size = int(np.prod(spatial))
    return ((n_idx * x.shape[1] + c_idx) * size + flat_sp).astype(np.int64)


def _kv_concat(node, args, module):
    past, new = args
    layer = node.attrs["layer"]
    if not 0 <= layer < past.shape[0]:
        raise IndexError(f"layer {layer} of a past with {past.shape[0]} layers")
    if node.attrs["new_bshd"]:
        new = new.transpose(0, 2, 1, 3)
    return [np.concatenate([past[layer], new], axis=2)]


def _rotary_embedding(node, args, module):
    """onnx.reference's RotaryEmbedding: x [B, S, H*D] or [B, H, S, D]; caches [S, D'/2] or
    gathered [B, S, D'/2] by position_ids."""
    x, cos, sin = args[0], args[1], args[2]
    a = node.attrs
    if x.ndim == 4:
        xt = np.transpose(x, (0, 2, 1, 3))  # [B, S, H, D]
    else:
        h = a["num_heads"]
        xt = x.reshape(x.shape[0], x.shape[1], h, x.shape[2] // h)
    y = _rotate_heads(xt, cos, sin, _arg(args, 3), a["rotary_embedding_dim"], a["interleaved"])
    if x.ndim == 4:
        return [np.ascontiguousarray(np.transpose(y, (0, 2, 1, 3)))]
    return [y.reshape(x.shape)]


def _rotate_heads(xt, cos, sin, pos, rotary_dim, interleaved):
    """RotaryEmbedding on heads xt [B, S, H, D]: the first ``rotary_dim`` (0: all) features
    of each head rotated by the cache rows of the token's position, the rest kept."""
    d = xt.shape[-1]
    rd = rotary_dim or d
    rot, rest = xt[..., :rd], xt[..., rd:]
    if pos is not None:
        cos, sin = cos[pos], sin[pos]  # [B, S, rd/2]
    cos = cos[..., :rd // 2][:, :, None, :] if cos.ndim == 3 else cos[None, :, None, :rd // 2]
    sin = sin[..., :rd // 2][:, :, None, :] if sin.ndim == 3 else sin[None, :, None, :rd // 2]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :rd // 2], rot[..., rd // 2:]
    r1 = cos * x1 - sin * x2
    r2 = sin * x1 + cos * x2
    if interleaved:
        out_rot = np.stack([r1, r2], axis=-1).reshape(rot.shape)
    else:
        out_rot = np.concatenate([r1, r2], axis=-1)
    return np.concatenate([out_rot, rest], axis=-1).astype(xt.dtype)


def _qkv_heads(node, args, module):
    """qkv [B, S, (H + 2 Hkv) D] -> q rotated [B, S, H, D], and the layer's cache extended
    by k (rotated) and v: exactly rotary_embedding and kv_concat of the three column blocks
    (without caches: k rotated and v, [B, S, Hkv, D]; without cos/sin: nothing rotated)."""
    qkv, cos, sin, pos = args[0], _arg(args, 1), _arg(args, 2), _arg(args, 3)
    past_k, past_v = _arg(args, 4), _arg(args, 5)
    a = node.attrs
    h, hkv, layer = a["num_heads"], a["kv_heads"], a["layer"]
    b, s, width = qkv.shape
    d = width // (h + 2 * hkv)
    heads = qkv.reshape(b, s, h + 2 * hkv, d)

    def rotate(x):
        if cos is None:  # no rotary: the heads as they are
            return x
        return _rotate_heads(x, cos, sin, pos, a["rotary_embedding_dim"], a["interleaved"])

    q = rotate(heads[:, :, :h])
    k, v = rotate(heads[:, :, h:h + hkv]), heads[:, :, h + hkv:]
    if past_k is None:
        return [np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)]
    if not 0 <= layer < past_k.shape[0]:
        raise IndexError(f"layer {layer} of a past with {past_k.shape[0]} layers")
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return [np.ascontiguousarray(q), np.concatenate([past_k[layer], k], axis=2),
            np.concatenate([past_v[layer], v], axis=2)]


def _eye_like(node, args, module):
    x = args[0]
    return [np.eye(x.shape[0], x.shape[1], k=node.attrs["k"], dtype=_result_dtype(node))]


def _compress(node, args, module):
    x, cond = args
    axis = node.attrs.get("axis")
    return [np.compress(cond.astype(bool).reshape(-1), x, axis=axis)]


def _bitcast(node, args, module):
    return [np.array(args[0], copy=True, order="C").view(_result_dtype(node))]


OP_IMPLS.update({
    "cos": _float_unary(np.cos), "sin": _float_unary(np.sin), "tan": _float_unary(np.tan),
    "acos": _float_unary(np.arccos), "asin": _float_unary(np.arcsin),
    "atan": _float_unary(np.arctan), "cosh": _float_unary(np.cosh),
    "sinh": _float_unary(np.sinh), "asinh": _float_unary(np.arcsinh),
    "acosh": _float_unary(np.arccosh), "atanh": _float_unary(np.arctanh),
    "log": _float_unary(np.log), "floor": _float_unary(np.floor),
    "ceil": _float_unary(np.ceil), "round": _float_unary(_round_half_even),
    "sign": _float_unary(np.sign), "softsign": _float_unary(lambda v: v / (1 + np.abs(v))),
    "softplus": _float_unary(_softplus_fn),
    "mish": _float_unary(lambda v: v * np.tanh(_softplus_fn(v))),
    "hard_swish": _float_unary(_hard_swish_fn),
    "not": _unary(np.logical_not), "bitwise_not": _unary(np.invert),
    **{name: _activation(fn) for name, fn in ACTIVATION_FNS.items()},
    "shrink": _shrink,
    "isinf": _isinf,
    "or": _binary(np.logical_or), "xor": _binary(np.logical_xor),
    "bitwise_and": _binary(np.bitwise_and), "bitwise_or": _binary(np.bitwise_or),
    "bitwise_xor": _binary(np.bitwise_xor), "prelu": _prelu,
    "mod": _mod, "bit_shift": _bit_shift,
    "reduce": _reduce_kind, "arg_reduce": _arg_reduce, "cumulative": _cumulative,
    "log_softmax": _log_softmax, "hardmax": _hardmax,
    "tile": _tile, "pad": _pad, "trilu": _trilu, "topk": _topk, "einsum": _einsum,
    "resize": _resize, "one_hot": _one_hot, "nonzero": _nonzero,
    "scatter_nd": _scatter_nd, "scatter_elements": _scatter_elements,
    "conv": _conv, "conv_transpose": _conv_transpose, "pool": _pool,
    "rotary_embedding": _rotary_embedding, "kv_concat": _kv_concat,
    "qkv_heads": _qkv_heads, "eye_like": _eye_like,
    "compress": _compress,
    "bitcast": _bitcast,
})


def _grid_reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Coordinates reflected at the borders lo and hi until inside (onnx.reference)."""
    span = hi - lo
    below, above = x < lo, x > hi
    d = np.where(below, lo - x, np.where(above, x - hi, 0.0))
    n = np.trunc(d / span) if span > 0 else np.zeros_like(d)
    r = d - n * span
    even = (n % 2) == 0
    from_lo = np.where(even, lo + r, hi - r)
    from_hi = np.where(even, hi - r, lo + r)
    return np.where(below, from_lo, np.where(above, from_hi, x))


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    """Keys cubic weights (a = -0.75) of taps -1, 0, 1, 2 at fractional offset t."""
    a = -0.75
    w = []
    for d in (t + 1, t, 1 - t, 2 - t):
        d = np.abs(d)
        w.append(np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                          ((a * d - 5 * a) * d + 8 * a) * d - 4 * a))
    return w


def _grid_sample(node, args, module):
    """Vectorized onnx.reference GridSample: per spatial dim the tap indices and weights
    (nearest 1, linear 2, cubic 4 taps), then the sum over every tap combination of
    weight * pixel (0 outside x for zeros padding; border / reflection move the index)."""
    import itertools

    x, grid = args
    mode, padding = node.attrs["mode"], node.attrs["padding_mode"]
    align = node.attrs["align_corners"]
    sp = x.shape[2:]
    nsp = len(sp)
    # onnx.reference denormalizes in float32; the taps then combine in float64.
    g = grid.astype(F32)
    xt = np.moveaxis(x.astype(F64), 1, -1)  # [N, *sp, C]
    per_dim = []  # for each spatial dim: list of (index, weight)
    for i, size in enumerate(sp):
        n = g[..., nsp - 1 - i]
        c = ((n + 1) / np.float32(2.0) * np.float32(size - 1)) if align else \
            (((n + 1) * np.float32(size) - 1) / np.float32(2.0))
        lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
        c = c.astype(F64)
        if mode == "nearest":
            c = np.rint(c)
        if padding == "border" and mode != "cubic":  # cubic: each tap clamped (below)
            c = np.where((c < lo) | (c > hi), np.clip(c, 0, size - 1), c)
        elif padding == "reflection":
            c = _grid_reflect(c, lo, hi)
        if mode == "nearest":
            per_dim.append([(np.trunc(c).astype(np.int64), np.ones_like(c))])
            continue
        base = np.floor(c)
        t = c - base
        base = base.astype(np.int64)
        if mode == "linear":
            per_dim.append([(base, 1 - t), (base + 1, t)])
        else:
            per_dim.append([(base + o, w) for o, w in zip((-1, 0, 1, 2), _cubic_weights(t))])
    batch = np.arange(x.shape[0]).reshape((-1,) + (1,) * (g.ndim - 2))
    out = np.zeros(g.shape[:-1] + (x.shape[1],), F64)
    for taps in itertools.product(*per_dim):
        weight = np.ones(g.shape[:-1], F64)
        index, inside = [], np.ones(g.shape[:-1], bool)
        for (idx, w), size in zip(taps, sp):
            lo, hi = (0.0, size - 1.0) if align else (-0.5, size - 0.5)
            if padding == "zeros":
                inside &= (idx >= 0) & (idx < size)
            elif padding == "border":
                idx = np.clip(idx, 0, size - 1)
            else:
                idx = np.trunc(_grid_reflect(idx.astype(F64), lo, hi)).astype(np.int64)
            index.append(np.clip(idx, 0, size - 1))
            weight = weight * w
        pixels = xt[(batch, *index)]
        out += np.where(inside[..., None], pixels, 0.0) * weight[..., None]
    return [np.moveaxis(out, -1, 1).astype(x.dtype)]


def _unique(node, args, module):
    x = args[0]
    axis = node.attrs.get("axis")
    y, first, inverse, counts = np.unique(x, return_index=True, return_inverse=True,
                                          return_counts=True, axis=axis)
    inverse = np.asarray(inverse).reshape(-1)
    if not node.attrs["sorted"]:  # the distinct values in order of first occurrence
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        first, counts, inverse = first[order], counts[order], rank[inverse]
        y = np.take(x.reshape(-1) if axis is None else x, first, axis=0 if axis is None
                    else axis)
    return [np.asarray(y, x.dtype), first.astype(np.int64), inverse.astype(np.int64),
            counts.astype(np.int64)]


def _reverse_sequence(node, args, module):
    x, lens = args
    b_axis, t_axis = node.attrs["batch_axis"], node.attrs["time_axis"]
    y = x.copy()
    for b, n in enumerate(np.asarray(lens).reshape(-1)):
        n = int(n)
        if not 0 <= n <= x.shape[t_axis]:
            raise ValueError(f"sequence length {n} of batch {b} is out of [0, "
                             f"{x.shape[t_axis]}]")
        dst = [slice(None)] * x.ndim
        dst[b_axis], dst[t_axis] = b, slice(0, n)
        src = list(dst)
        src[t_axis] = slice(n - 1, None, -1) if n else slice(0, 0)
        y[tuple(dst)] = x[tuple(src)]
    return [y]


def _col2im(node, args, module):
    x = args[0]
    image = [int(v) for v in np.asarray(args[1]).reshape(-1)]
    block = [int(v) for v in np.asarray(args[2]).reshape(-1)]
    strides, pads, dil = (node.attrs[k] for k in ("strides", "pads", "dilations"))
    nsp = len(image)
    n, ck, _ = x.shape
    c = ck // int(np.prod(block))
    padded = [image[i] + pads[i] + pads[i + nsp] for i in range(nsp)]
    counts = [(padded[i] - ((block[i] - 1) * dil[i] + 1)) // strides[i] + 1 for i in range(nsp)]
    if int(np.prod(counts)) != x.shape[2]:
        raise ValueError(f"col2im: {x.shape[2]} columns, the image has {counts} blocks")
    cols = x.astype(F64).reshape(n, c, *block, *counts)
    out = np.zeros((n, c, *padded), F64)
    for k in np.ndindex(*block):
        dst = tuple(slice(k[i] * dil[i], k[i] * dil[i] + (counts[i] - 1) * strides[i] + 1,
                          strides[i]) for i in range(nsp))
        out[(slice(None), slice(None)) + dst] += cols[(slice(None), slice(None)) + k]
    crop = tuple(slice(pads[i], pads[i] + image[i]) for i in range(nsp))
    return [out[(slice(None), slice(None)) + crop].astype(x.dtype)]


def _tensor_scatter(node, args, module):
    cache, update = args[0], args[1]
    axis = node.attrs["axis"] % cache.ndim
    starts = args[2] if len(args) > 2 and args[2] is not None else \
        np.zeros(cache.shape[0], np.int64)
    y = cache.copy()
    length, steps = cache.shape[axis], update.shape[axis]
    for b in range(cache.shape[0]):
        pos = int(starts[b]) + np.arange(steps)
        if node.attrs["mode"] == "circular":
            pos = pos % length
        elif steps and (pos[0] < 0 or pos[-1] >= length):
            raise ValueError(f"tensor_scatter write index {int(starts[b])} of batch {b} "
                             f"overruns the cache length {length}")
        lead = (b,) + (slice(None),) * (axis - 1)
        for step, p in enumerate(pos):
            y[lead + (int(p),)] = update[lead + (step,)]
    return [y]


def _det(node, args, module):
    x = args[0]
    return [np.linalg.det(x.astype(F64)).astype(x.dtype)]


def _max_unpool(node, args, module):
    x, idx = args
    shape = (x.shape[0], x.shape[1], *node.attrs["output_shape"])
    flat = np.zeros(int(np.prod(shape)), x.dtype)
    idx = np.asarray(idx, np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= flat.size):
        raise ValueError(f"max_unpool index out of the output's {flat.size} elements")
    flat[idx] = x.reshape(-1)
    return [flat.reshape(shape)]


OP_IMPLS.update({
    "grid_sample": _grid_sample, "unique": _unique, "reverse_sequence": _reverse_sequence,
    "col2im": _col2im, "tensor_scatter": _tensor_scatter, "det": _det,
    "max_unpool": _max_unpool,
})


def _recurrent_activation(name: str, alpha: float, beta: float) -> Callable:
    return {"sigmoid": lambda v: _sigmoid_fn(v), "tanh": np.tanh,
            "relu": lambda v: np.maximum(v, 0), "affine": lambda v: alpha * v + beta,
            "leakyrelu": lambda v: np.where(v >= 0, v, alpha * v),
            "thresholdedrelu": lambda v: np.where(v > alpha, v, 0),
            "scaledtanh": lambda v: alpha * np.tanh(beta * v),
            "hardsigmoid": lambda v: np.clip(alpha * v + beta, 0, 1),
            "elu": lambda v: np.where(v > 0, v, alpha * (np.exp(v) - 1)),
            "softsign": lambda v: v / (1 + np.abs(v)),
            "softplus": lambda v: np.logaddexp(v, 0)}[name]


def _recurrent(node, args, module):
    """RNN / GRU / LSTM step by step over the sequence (ONNX's equations, gate orders
    i o f c for lstm and z r h for gru); a batch entry past its sequence_lens keeps its state
    and gives zeros in Y; the reverse direction runs each entry's valid steps backwards."""
    a = node.attrs
    kind, hidden = a["kind"], a["hidden_size"]
    args = list(args) + [None] * (8 - len(args))
    x, w, r, b, lens, h0, c0, p = args
    dtype = x.dtype
    ct = _compute_dtype(dtype)
    if a["layout"]:
        x = np.swapaxes(x, 0, 1)
        h0 = None if h0 is None else np.swapaxes(h0, 0, 1)
        c0 = None if c0 is None else np.swapaxes(c0, 0, 1)
    seq, batch = x.shape[0], x.shape[1]
    dirs = w.shape[0]
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[kind]
    x, w, r = x.astype(ct), w.astype(ct), r.astype(ct)
    b = np.zeros((dirs, 2 * gates * hidden), ct) if b is None else b.astype(ct)
    h0 = np.zeros((dirs, batch, hidden), ct) if h0 is None else h0.astype(ct)
    c0 = np.zeros((dirs, batch, hidden), ct) if c0 is None else c0.astype(ct)
    p = np.zeros((dirs, 3 * hidden), ct) if p is None else p.astype(ct)
    lens = np.full(batch, seq) if lens is None else np.asarray(lens).reshape(-1).astype(np.int64)
    if lens.shape != (batch,) or (lens < 0).any() or (lens > seq).any():
        raise ValueError(f"recurrent sequence_lens {lens.tolist()} for {batch} batch entries "
                         f"of {seq} steps")
    names = a["activations"].split(",")
    per_dir = len(names) // dirs
    clip = a["clip"]

    def cl(v):  # the gate inputs clipped to [-clip, clip] when clip > 0
        return np.clip(v, -clip, clip) if clip > 0 else v

    y = np.zeros((seq, dirs, batch, hidden), ct)
    y_h = np.zeros((dirs, batch, hidden), ct)
    y_c = np.zeros((dirs, batch, hidden), ct)
    for d in range(dirs):
        f, g, hh = ([_recurrent_activation(names[k], a["activation_alpha"][k],
                                           a["activation_beta"][k])
                     for k in range(d * per_dir, (d + 1) * per_dir)] + [None, None])[:3]
        reverse = a["direction"] == "reverse" or d == 1
        wb, rb = b[d, :gates * hidden], b[d, gates * hidden:]
        h, c = h0[d].copy(), c0[d].copy()
        pi, po, pf = p[d, :hidden], p[d, hidden:2 * hidden], p[d, 2 * hidden:]
        with np.errstate(over="ignore"):
            for step in range(seq):
                # entry n reads x at step (reversed within its own length) while it is valid
                t = np.where(reverse, lens - 1 - step, step)
                valid = step < lens
                xt = x[np.clip(t, 0, seq - 1), np.arange(batch)]
                xw = xt @ w[d].T + wb
                gates_in = cl(xw + h @ r[d].T + rb)
                if kind == "rnn":
                    new_h = f(gates_in)
                elif kind == "gru":
                    z, rr = f(gates_in[:, :hidden]), f(gates_in[:, hidden:2 * hidden])
                    rh, rbh = r[d][2 * hidden:], rb[2 * hidden:]
                    if a["linear_before_reset"]:
                        pre = xw[:, 2 * hidden:] + rr * (h @ rh.T + rbh)
                    else:
                        pre = xw[:, 2 * hidden:] + (rr * h) @ rh.T + rbh
                    new_h = (1 - z) * g(cl(pre)) + z * h
                else:
                    i_in, o_in, f_in, c_in = np.split(xw + h @ r[d].T + rb, 4, axis=1)
                    i = f(cl(i_in + pi * c))
                    fg = f(cl(f_in + pf * c))
                    new_c = fg * c + i * g(cl(c_in))
                    o = f(cl(o_in + po * new_c))
                    new_h = o * hh(new_c)
                    c = np.where(valid[:, None], new_c, c)
                h = np.where(valid[:, None], new_h, h)
                rows = np.flatnonzero(valid)
                y[t[rows], d, rows] = h[rows]
        y_h[d], y_c[d] = h, c
    outs = [y, y_h, y_c][:len(node.results)]
    if a["layout"]:
        outs = [np.transpose(y, (2, 0, 1, 3))] + [np.swapaxes(s, 0, 1) for s in outs[1:]]
    return [o.astype(dtype) for o in outs]


OP_IMPLS["recurrent"] = _recurrent


def _linear_attention(node, args, module):
    """Step by step in float32: the state decays by exp(decay) (gated), the value is
    replaced by beta * (v - state^T k) (delta), the state gains k v^T and each query head
    reads scale * q^T state of its kv head."""
    a = node.attrs
    args = list(args) + [None] * (6 - len(args))
    q, k, v, past, decay, beta = args
    hq, hkv, rule = a["q_num_heads"], a["kv_num_heads"], a["update_rule"]
    b, t, _ = q.shape

    def heads(x, h):  # [B, T, H*D] -> [B, H, T, D] in float32
        return x.reshape(b, t, h, -1).transpose(0, 2, 1, 3).astype(F32)

    q4, k4, v4 = heads(q, hq), heads(k, hkv), heads(v, hkv)
    dk, dv = q4.shape[3], v4.shape[3]
    if decay is not None:
        decay4 = heads(decay, hkv)  # [B, Hkv, T, 1] or [B, Hkv, T, dk]
    if beta is not None:
        beta4 = beta.reshape(b, t, beta.shape[-1], 1).transpose(0, 2, 1, 3).astype(F32)
    state = np.zeros((b, hkv, dk, dv), F32) if past is None else past.astype(F32)
    if state.shape != (b, hkv, dk, dv):
        raise ValueError(f"linear_attention past_state {state.shape} is not "
                         f"{(b, hkv, dk, dv)}")
    scale = a["scale"] or 1.0 / np.sqrt(dk)
    out = np.zeros((b, hq, t, dv), F32)
    for i in range(t):
        vt = v4[:, :, i]
        if decay is not None:
            state = state * np.exp(decay4[:, :, i])[..., None]
        if beta is not None:
            vt = beta4[:, :, i] * (vt - np.einsum("bhdm,bhd->bhm", state, k4[:, :, i]))
        state = state + k4[:, :, i, :, None] * vt[:, :, None, :]
        read = np.repeat(state, hq // hkv, axis=1)
        out[:, :, i] = np.float32(scale) * np.einsum("bhd,bhdm->bhm", q4[:, :, i], read)
    y = out.transpose(0, 2, 1, 3).reshape(b, t, hq * dv).astype(q.dtype)
    return [y, state.astype(_result_dtype(node, 1))]


OP_IMPLS["linear_attention"] = _linear_attention


def _deform_conv(node, args, module):
    """Every kernel tap (a, b) of output (i, j) samples x bilinearly at
    (i * stride - pad + a * dilation + offset) (zeros outside x), times the mask; then a
    grouped convolution of these columns with w, in float64."""
    a = node.attrs
    args = list(args) + [None] * (5 - len(args))
    x, w, offset, bias, mask = args
    n, c, h, wd = x.shape
    oc, cpg, kh, kw = w.shape
    og, groups = a["offset_group"], a["group"]
    (sh, sw), (dh, dw), pads = a["strides"], a["dilations"], a["pads"]
    oh, ow = offset.shape[2:]
    off = offset.astype(F64).reshape(n, og, kh, kw, 2, oh, ow)
    m = np.ones((n, og, kh, kw, oh, ow)) if mask is None else \
        mask.astype(F64).reshape(n, og, kh, kw, oh, ow)
    # the sampling points of each offset group: [N, og, kh, kw, oh, ow]
    base_h = (np.arange(oh) * sh - pads[0])[None, :] + (np.arange(kh) * dh)[:, None]
    base_w = (np.arange(ow) * sw - pads[1])[None, :] + (np.arange(kw) * dw)[:, None]
    ph = base_h[None, None, :, None, :, None] + off[:, :, :, :, 0]
    pw = base_w[None, None, None, :, None, :] + off[:, :, :, :, 1]
    group_of = np.arange(c) // (c // og)  # channel -> offset group
    xf = x.astype(F64)
    cols = np.zeros((n, c, kh, kw, oh, ow))
    h0, w0 = np.floor(ph).astype(np.int64), np.floor(pw).astype(np.int64)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yy, xx = h0 + dy, w0 + dx
        weight = (1 - np.abs(ph - yy)) * (1 - np.abs(pw - xx))
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < wd)
        yi, xi = np.clip(yy, 0, h - 1)[:, group_of], np.clip(xx, 0, wd - 1)[:, group_of]
        taps = xf[np.arange(n)[:, None, None, None, None, None],
                  np.arange(c)[None, :, None, None, None, None], yi, xi]
        cols += np.where(inside[:, group_of], taps * weight[:, group_of], 0.0)
    cols *= m[:, group_of]
    cols = cols.reshape(n, groups, c // groups, kh, kw, oh, ow)
    y = np.einsum("ngcabij,gocab->ngoij", cols,
                  w.astype(F64).reshape(groups, oc // groups, cpg, kh, kw))
    y = y.reshape(n, oc, oh, ow)
    if bias is not None:
        y = y + bias.astype(F64).reshape(1, -1, 1, 1)
    return [y.astype(x.dtype)]


OP_IMPLS["deform_conv"] = _deform_conv


# --------------------------------------------------------------------------------------------
# the interpreter
# --------------------------------------------------------------------------------------------


def _from_ml_dtypes(x: np.ndarray, t: TensorType) -> np.ndarray:
    """An ml_dtypes low-bit array (int4, uint4, int2, uint2, float8 ..., as onnx and
    onnxruntime hand them out) in QIR's storage for the argument's type (one code per byte),
    as the ONNX frontend stores initializers; other arrays are returned as they are."""
    want = np.dtype(t.dtype.np_dtype)
    if x.dtype == want or not x.dtype.type.__module__.startswith("ml_dtypes"):
        return x
    # int4 / uint4 / int2 / uint2 codes widen exactly into int8 / uint8 storage; float8 and
    # float4 arrays are stored as themselves, so any other pairing is a mismatch for
    # _check_input to report.
    if want in (np.dtype(np.int8), np.dtype(np.uint8)) and x.dtype.name.startswith(("int", "uint")):
        return x.astype(want)
    return x


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
        x = _from_ml_dtypes(x, a.type)
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


# --------------------------------------------------------------------------------------------
# CNN (issue #15): quantized convolution (exact integer arithmetic)
# --------------------------------------------------------------------------------------------


def dyadic_multiplier(ratio) -> tuple[np.ndarray, np.ndarray]:
    """(M, shift) int64 arrays with ratio ~= M * 2^-shift, M in [2^30, 2^31) (ratio > 0):
    the integer-only requantization of HAWQ-V3 / gemmlowp, decided once at compile time."""
    ratio = np.asarray(ratio, np.float64)
    if np.any(ratio <= 0) or not np.all(np.isfinite(ratio)):
        raise InputError(f"dyadic requantization needs positive finite scale ratios, not "
                         f"{ratio.ravel()[:4]}")
    mant, exp = np.frexp(ratio)  # ratio = mant * 2^exp, mant in [0.5, 1)
    m = np.round(mant * (1 << 31)).astype(np.int64)
    carry = m == (1 << 31)
    m = np.where(carry, m // 2, m)
    exp = np.where(carry, exp + 1, exp)
    shift = (31 - exp).astype(np.int64)
    if np.any(shift < 1) or np.any(shift > 62):
        raise InputError(f"dyadic requantization: scale ratio {ratio.ravel()[:4]} is out of "
                         "range (shift must lie in [1, 62])")
    return m, shift


DYADIC_FRACTION_BITS = 16  # fraction bits of the two terms of a dyadic residual sum


def rounding_shift(v: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """round(v / 2^shift), halves up, on int64 (arithmetic shift; shift 0 leaves v)."""
    shift = np.asarray(shift, np.int64)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 0)
    return (v + half) >> shift


def qconv_accumulate(x, w, x_zp, w_zp, bias, attrs) -> np.ndarray:
    """sum (x - x_zp) * (w - w_zp[m]) + bias as int64 [N, M, *out_sp] (the i32 accumulator;
    int64 here so that an overflow of the i32 range can be detected)."""
    nsp = x.ndim - 2
    m = w.shape[0]
    xi = x.astype(np.int64) - np.int64(np.asarray(x_zp).reshape(-1)[0])
    wi = w.astype(np.int64)
    if w_zp is not None:
        wi = wi - np.asarray(w_zp, np.int64).reshape((-1,) + (1,) * (nsp + 1))
    pads = attrs["pads"]
    xp = np.pad(xi, [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)])
    kernel = list(w.shape[2:])
    out_sp = [(xp.shape[2 + i] - ((kernel[i] - 1) * attrs["dilations"][i] + 1))
              // attrs["strides"][i] + 1 for i in range(nsp)]
    win = _windows(xp, kernel, attrs["strides"], attrs["dilations"], out_sp, pads)
    group = attrs["group"]
    cg, mg = x.shape[1] // group, m // group
    letters = "".join(chr(ord("p") + i) for i in range(nsp))
    kl = letters.upper()
    outs = [np.einsum(f"nc{letters}{kl},mc{kl}->nm{letters}", win[:, g * cg:(g + 1) * cg],
                      wi[g * mg:(g + 1) * mg]) for g in range(group)]
    acc = np.concatenate(outs, axis=1)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64).reshape((1, m) + (1,) * nsp)
    return acc


CONV_OC_BLOCK, CONV_IC_BLOCK = 16, 4  # the vpdpbusd tile of the CPU qconv kernel


def pack_conv_weights(w: np.ndarray, group: int, w_shift, oc_block: int = CONV_OC_BLOCK,
                      ic_block: int = CONV_IC_BLOCK, dtype=np.int8) -> np.ndarray:
    """[M, C/g, KH, KW] codes -> ``dtype`` [g, M/g/oc, KH, KW, C/g/ic, oc, ic] of
    w - w_shift (an int, or one per output channel), channel padding 0; ``cpu-conv-layout``
    stores this. The vpdpbusd kernel's: int8, 16 x 4, w_shift 0 or 128; the vpmaddwd
    kernel's (AVX2): int16, 8 x 2, w_shift the weights' zero points."""
    m, cg, kh, kw = w.shape
    mg = m // group
    mp = -(-mg // oc_block) * oc_block
    cp = -(-cg // ic_block) * ic_block
    shift = np.broadcast_to(np.asarray(w_shift, np.int64).reshape(-1), (m,))
    p = np.zeros((group, mp, cp, kh, kw), np.int64)
    p[:, :mg, :cg] = (w.reshape(group, mg, cg, kh, kw).astype(np.int64)
                      - shift.reshape(group, mg, 1, 1, 1))
    p = p.reshape(group, mp // oc_block, oc_block, cp // ic_block, ic_block,
                  kh, kw).transpose(0, 1, 5, 6, 3, 2, 4)
    return np.ascontiguousarray(p).astype(dtype)


def unpack_conv_weights(p: np.ndarray, w_shape, group: int, w_shift) -> np.ndarray:
    """The inverse of ``pack_conv_weights``: the [M, C/g, KH, KW] codes (int64)."""
    m, cg, kh, kw = w_shape
    mg = m // group
    g, mo, _, _, co, mi, ci = p.shape
    q = p.astype(np.int64).transpose(0, 1, 5, 4, 6, 2, 3).reshape(g, mo * mi, co * ci, kh, kw)
    shift = np.broadcast_to(np.asarray(w_shift, np.int64).reshape(-1), (m,))
    return (q[:, :mg, :cg].reshape(m, cg, kh, kw) + shift.reshape(m, 1, 1, 1))


# The CUDA qconv kernels' weight layouts (cuda-conv-layout): weights centred on their zero
# points (w - w_zp[m], int8), and the bias operand holding bias - x_zp * sum_k (w - w_zp[m]),
# so that a kernel sums raw codes x * w' (padding read as x_zp) and adds the bias.
CUDA_IGEMM_K_STEP = 32   # the K step of the int8 mma (m16n8k32): K is padded to it
CUDA_W_LAYOUTS = ("cuda_igemm_mk", "cuda_igemm_rows", "cuda_direct_khwcm", "cuda_dw_t4")
CUDA_DW_TAPS = 4  # the depthwise dp4a kernel's taps per word


CUDA_PIXEL_PAIR_CHANNELS = 4  # cuda_igemm_rows: a pixel of 4 one-byte channels, 8 bytes a pair


def cuda_igemm_rows(c, width, kw: int, stride_w: int, pad_left: int, dilation_w: int):
    """(row_taps, lead) of ``cuda_igemm_rows`` for a one-group channels-last qconv of ``c``
    channels (after the channel padding) on an image ``width`` wide, or None: 4 channels (a
    pixel is 4 bytes), an even stride and width (so every window row starts at a pixel of
    the same parity, and pairs of pixels never straddle the image's right edge or an image
    boundary), no dilation. cuda-conv-layout decides with it, the CUDA kernel checks with it."""
    if c != CUDA_PIXEL_PAIR_CHANNELS or not isinstance(width, int) or width % 2 \
            or stride_w % 2 or dilation_w != 1:
        return None
    lead = pad_left % 2  # window rows start at ow * stride - pad_left: odd iff pad_left is
    return -(-(kw + lead) // 4) * 4, lead  # whole 16-byte chunks (4 slots of 4 bytes) a row


def pack_conv_weights_cuda(w_centred: np.ndarray, layout: str, row_taps: int = 0,
                           lead: int = 0) -> np.ndarray:
    """[M, C/g, KH, KW] centred codes -> the kernel's int8 layout:
    ``cuda_igemm_mk`` [M, Kp] with k = (kh * KW + kw) * C/g + c, Kp padded to 32 with zeros;
    ``cuda_igemm_rows`` [M, Kp] with k = (kh * row_taps + lead + kw) * C/g + c: each kernel
    row's taps in a row of ``row_taps`` slots from slot ``lead`` on, zeros in the other slots
    (the implicit GEMM then loads a window row as aligned pairs of pixels);
    ``cuda_direct_khwcm`` [KH, KW, C/g, M]; ``cuda_dw_t4`` (depthwise: C/g = 1)
    [ceil(KH * KW / 4), M, 4], each channel's taps t = kh * KW + kw four to a word, zeros past
    the last tap."""
    m, cg, kh, kw = w_centred.shape
    if layout == "cuda_igemm_mk":
        k = kh * kw * cg
        kp = -(-k // CUDA_IGEMM_K_STEP) * CUDA_IGEMM_K_STEP
        p = np.zeros((m, kp), np.int8)
        p[:, :k] = w_centred.transpose(0, 2, 3, 1).reshape(m, k)
        return p
    if layout == "cuda_igemm_rows":
        if lead < 0 or row_taps < kw + lead:
            raise ValueError(f"cuda_igemm_rows: {kw} taps from slot {lead} do not fit rows of "
                             f"{row_taps} slots")
        rows = np.zeros((m, kh, row_taps, cg), np.int8)
        rows[:, :, lead:lead + kw, :] = w_centred.transpose(0, 2, 3, 1)
        k = kh * row_taps * cg
        p = np.zeros((m, -(-k // CUDA_IGEMM_K_STEP) * CUDA_IGEMM_K_STEP), np.int8)
        p[:, :k] = rows.reshape(m, k)
        return p
    if layout == "cuda_direct_khwcm":
        return np.ascontiguousarray(w_centred.transpose(2, 3, 1, 0)).astype(np.int8)
    if layout == "cuda_dw_t4":
        if cg != 1:
            raise ValueError(f"cuda_dw_t4 is for depthwise weights (1 channel a group), not {cg}")
        taps = kh * kw
        words = -(-taps // CUDA_DW_TAPS)
        p = np.zeros((words * CUDA_DW_TAPS, m), np.int8)
        p[:taps] = w_centred.reshape(m, taps).T
        return np.ascontiguousarray(p.reshape(words, CUDA_DW_TAPS, m).transpose(0, 2, 1))
    raise ValueError(f"unknown CUDA conv weight layout {layout!r}")


def unpack_conv_weights_cuda(p: np.ndarray, w_shape, layout: str, row_taps: int = 0,
                             lead: int = 0) -> np.ndarray:
    """The inverse of ``pack_conv_weights_cuda``: the centred [M, C/g, KH, KW] (int64)."""
    m, cg, kh, kw = w_shape
    if layout == "cuda_igemm_mk":
        return p[:, :kh * kw * cg].astype(np.int64).reshape(m, kh, kw, cg).transpose(0, 3, 1, 2)
    if layout == "cuda_igemm_rows":
        rows = p[:, :kh * row_taps * cg].astype(np.int64).reshape(m, kh, row_taps, cg)
        return rows[:, :, lead:lead + kw, :].transpose(0, 3, 1, 2)
    if layout == "cuda_dw_t4":
        taps = p.transpose(0, 2, 1).reshape(-1, m)[:kh * kw]
        return taps.astype(np.int64).T.reshape(m, 1, kh, kw)
    return p.astype(np.int64).transpose(3, 2, 0, 1)


def _channel_scale(scale, m: int, nsp: int) -> np.ndarray:
    s = np.asarray(scale, np.float32).reshape(-1)
    return np.broadcast_to(s, (m,)).reshape((1, m) + (1,) * nsp)


def qconv_output_bounds(node: Node, y_scale, y_zp) -> tuple[int, int]:
    """The codes that act_min / act_max (real values) quantize to, within the code range."""
    lo, hi = node.results[0].type.dtype.int_range()
    ys = np.float32(np.asarray(y_scale).reshape(-1)[0])
    zp = int(np.asarray(y_zp).reshape(-1)[0])
    for key in ("act_min", "act_max"):
        if key in node.attrs:
            q = int(np.rint(np.float32(node.attrs[key]) / ys)) + zp
            lo, hi = (max(lo, q), hi) if key == "act_min" else (lo, min(hi, q))
    return lo, hi


@_channels_last_aware
def _qconv(node, args, module):
    x, w, x_scale, x_zp = args[:4]
    w_scale, w_zp, bias, y_scale, y_zp, residual, r_scale, r_zp = (
        _arg(args, i) for i in range(4, 12))
    a = node.attrs
    cfg = a.get("config", {})
    if cfg.get("w_layout") in CUDA_W_LAYOUTS:  # cuda-conv-layout: centred, x_zp in the bias
        centred = unpack_conv_weights_cuda(w, cfg["w_shape"], cfg["w_layout"],
                                           cfg.get("w_row_taps", 0), cfg.get("w_lead", 0))
        m = centred.shape[0]
        folded = np.int64(np.asarray(x_zp).reshape(-1)[0]) * centred.reshape(m, -1).sum(axis=1)
        bias = np.asarray(bias, np.int64) + folded
        w = centred + (0 if w_zp is None else np.asarray(w_zp, np.int64).reshape(-1, 1, 1, 1))
    elif "w_shape" in cfg:  # weights packed by cpu-conv-layout (centred: minus their zero points)
        shift = (0 if w_zp is None else w_zp) if cfg.get("w_centred") else cfg["w_shift"]
        w = unpack_conv_weights(w, cfg["w_shape"], a["group"], shift)
    nsp = x.ndim - 2
    m = w.shape[0]
    acc = qconv_accumulate(x, w, x_zp, w_zp, bias, a)
    if acc.size and (acc.max() > np.iinfo(np.int32).max or acc.min() < np.iinfo(np.int32).min):
        raise InputError(f"qconv %{node.results[0].name}: the i32 accumulator overflows")
    s = (np.float32(np.asarray(x_scale).reshape(-1)[0]) * _channel_scale(w_scale, m, nsp)
         ).astype(np.float32)
    if a["out"] == "float":
        y = acc.astype(np.float32) * s
        if residual is not None:
            y = y + residual.astype(np.float32)
        if "act_min" in a:
            y = np.maximum(y, np.float32(a["act_min"]))
        if "act_max" in a:
            y = np.minimum(y, np.float32(a["act_max"]))
        return [y.astype(np.float32)]
    ys = np.float32(np.asarray(y_scale).reshape(-1)[0])
    zp = np.int64(np.asarray(y_zp).reshape(-1)[0])
    lo, hi = qconv_output_bounds(node, y_scale, y_zp)
    dtype = node.results[0].type.dtype.np_dtype
    if a.get("requant", "float") == "dyadic":
        mult, shift = dyadic_multiplier((s / ys).astype(np.float64))
        if residual is None:
            q = rounding_shift(acc * mult, shift)
        else:
            # Both terms keep DYADIC_FRACTION_BITS fraction bits; one rounding of their sum.
            rm, rs = dyadic_multiplier(np.float64(np.float32(np.asarray(r_scale).reshape(-1)[0])
                                                  / ys))
            r = residual.astype(np.int64) - np.int64(np.asarray(r_zp).reshape(-1)[0])
            f = np.minimum(np.minimum(shift, rs) - 1, DYADIC_FRACTION_BITS)
            q = rounding_shift(rounding_shift(acc * mult, shift - f)
                               + rounding_shift(r * rm, rs - f), f)
        return [np.clip(q + zp, lo, hi).astype(dtype)]
    v = acc.astype(np.float32) * (s / ys).astype(np.float32)
    if residual is not None:
        rr = np.float32(np.float32(np.asarray(r_scale).reshape(-1)[0]) / ys)
        r = (residual.astype(np.int32) - np.int32(np.asarray(r_zp).reshape(-1)[0]))
        v = v + r.astype(np.float32) * rr
    q = np.rint(v.astype(np.float32)).astype(np.int64) + zp
    return [np.clip(q, lo, hi).astype(dtype)]


OP_IMPLS["qconv"] = _qconv
