"""ATen op handlers: linear, matmul, addmm and scaled dot-product attention."""
from __future__ import annotations

import math

from qcompiler.frontends.fx.ops_shape import _transpose
from qcompiler.frontends.fx.registry import _aten
from qcompiler.frontends.fx.tensors import _Const


def _weight_t(imp, w):
    """Wᵀ of a linear weight [N, K]: a transposed constant, or a transposed dequantize."""
    if isinstance(w, _Const):
        t = w.tensor
        hint = w.hint + ".T"
        return imp.value(_Const(t.t().contiguous(), hint))
    return _transpose(imp, w, [1, 0])


@_aten("linear")
def _linear(imp, x, weight, bias=None):
    dtype = imp.out_dtype()
    y = imp.emit("matmul", [imp.value(x, dtype), imp.value(_weight_t(imp, weight), dtype)])
    if bias is not None:
        y = imp.emit("add", [y, imp.value(bias, dtype)])
    return y


@_aten("matmul", "mm", "bmm")
def _matmul(imp, a, b):
    dtype = imp.out_dtype()
    return imp.emit("matmul", [imp.value(a, dtype), imp.value(b, dtype)])


@_aten("addmm")
def _addmm(imp, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise imp.fail("addmm with beta or alpha other than 1 is not supported")
    dtype = imp.out_dtype()
    y = imp.emit("matmul", [imp.value(a, dtype), imp.value(b, dtype)])
    return imp.emit("add", [y, imp.value(bias, dtype)])


@_aten("scaled_dot_product_attention")
def _sdpa(imp, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    """softmax(q kᵀ · scale + mask) v; a boolean mask keeps the positions that are True."""
    import torch

    if dropout_p:
        raise imp.fail("scaled_dot_product_attention with dropout_p > 0 (training)")
    if enable_gqa:
        raise imp.fail("scaled_dot_product_attention with enable_gqa is not supported")
    dtype = imp.out_dtype()
    qv, kv, vv = (imp.value(t, dtype) for t in (q, k, v))
    rank = kv.type.rank
    d = qv.type.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = imp.emit("matmul", [qv, imp.emit("transpose", [kv], {"perm": perm})])
    scores = imp.emit("mul", [scores, imp.value(scale, dtype)])
    L, S = qv.type.shape[-2], kv.type.shape[-2]
    if is_causal:
        if attn_mask is not None:  # torch refuses this combination too
            raise imp.fail("scaled_dot_product_attention with both is_causal and attn_mask")
        attn_mask = _Const(torch.ones(L, S, dtype=torch.bool).tril(), "causal_mask")
    if attn_mask is not None:
        m = imp.value(attn_mask)
        if m.type.dtype.name == "bool":
            neg = imp.value(float("-inf"), dtype)
            scores = imp.emit("where", [m, scores, neg])
        else:
            scores = imp.emit("add", [scores, imp.value(m, dtype)])
    probs = imp.emit("softmax", [scores], {"axis": -1})
    return imp.emit("matmul", [probs, vv])
