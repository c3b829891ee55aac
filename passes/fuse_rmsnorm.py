"""fuse-rmsnorm: decomposed RMS normalization becomes one ``rmsnorm`` op.

Recognized, with x² written ``pow(x, 2)`` or ``mul(x, x)`` and the mean over trailing axes
(keepdims)::

    ms = reduce_mean(x², axes=[-k..-1]);  d = add(ms, eps)    (eps a scalar constant)
    y  = mul(x, reciprocal(sqrt(d))) | mul(reciprocal(sqrt(d)), x) | div(x, sqrt(d))
       | mul(x, div(1, sqrt(d)))
    out = mul(y, w) | mul(w, y)        optional; w broadcasts over the normalized dims only

→ ``rmsnorm(x, w) {axis = -k, epsilon = eps}`` (w = ones without the weight). Intermediates
must have no other use. For f16/bf16 the fused op computes in f32 (ONNX stash_type 1), where
the decomposed graph rounded every step to the narrow type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Value
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.pipeline import Pass, record_stat, register_pass


def _scalar(rw: Rewriter, v: Value) -> Optional[float]:
    c = rw.const(v)
    if c is None or c.size != 1:
        return None
    return float(np.asarray(c).astype(np.float64).reshape(()))


def _squared(rw: Rewriter, v: Value) -> Optional[Value]:
    """x when v = pow(x, 2) or mul(x, x) (and v has no other use)."""
    if not rw.single_use(v):
        return None
    node = v.producer
    if node is None:
        return None
    if node.op == "pow" and _scalar(rw, node.operands[1]) == 2.0:
        return node.operands[0]
    if node.op == "mul" and node.operands[0] is node.operands[1]:
        return node.operands[0]
    return None


def _root_mean_square(rw: Rewriter, v: Value) -> Optional[tuple[Value, int, float]]:
    """(x, axis, eps) when v = sqrt(reduce_mean(x², trailing axes) + eps), single uses."""
    sqrt = producer_of(v, "sqrt")
    if sqrt is None or not rw.single_use(v):
        return None
    add = producer_of(sqrt.operands[0], "add")
    if add is None or not rw.single_use(add.result):
        return None
    for ms, e in (add.operands, add.operands[::-1]):
        eps = _scalar(rw, e)
        mean = producer_of(ms, "reduce_mean")
        if eps is None or mean is None or not rw.single_use(ms) or not mean.attrs["keepdims"]:
            continue
        x = _squared(rw, mean.operands[0])
        if x is None:
            continue
        rank = x.type.rank
        axes = sorted(a % rank for a in mean.attrs["axes"]) if mean.attrs["axes"] else []
        if not axes or axes != list(range(axes[0], rank)):
            continue
        return x, axes[0] - rank, eps
    return None


def _inverse_rms(rw: Rewriter, v: Value) -> Optional[tuple[Value, int, float]]:
    """As _root_mean_square for v = reciprocal(sqrt(..)) or div(1, sqrt(..))."""
    if not rw.single_use(v) or v.producer is None:
        return None
    node = v.producer
    if node.op == "reciprocal":
        return _root_mean_square(rw, node.operands[0])
    if node.op == "div" and _scalar(rw, node.operands[0]) == 1.0:
        return _root_mean_square(rw, node.operands[1])
    return None


def normalized(rw: Rewriter, v: Value) -> Optional[tuple[Value, int, float]]:
    """(x, axis, eps) when v is x / rms(x) in one of the decomposed forms."""
    node = v.producer
    if node is None:
        return None
    if node.op == "div":
        found = _root_mean_square(rw, node.operands[1])
        if found and found[0] is node.operands[0]:
            return found
    if node.op == "mul":
        for x, r in (node.operands, node.operands[::-1]):
            found = _inverse_rms(rw, r)
            if found and found[0] is x:
                return found
    return None


def _fits_normalized_dims(w: Value, x: Value, axis: int) -> bool:
    """w broadcasts over the normalized (trailing) dims of x only, with the same element type."""
    dims = x.type.shape[axis:]
    ws = w.type.shape
    while ws and ws[0] == 1 and len(ws) > len(dims):
        ws = ws[1:]
    if len(ws) > len(dims) or w.type.dtype != x.type.dtype:
        return False
    return all(a == 1 or a == b for a, b in zip(ws[::-1], dims[::-1]))


class FuseWeightedRMSNorm(RewritePattern):
    op = "mul"

    def rewrite(self, node, rw):
        for y, w in (node.operands, node.operands[::-1]):
            if not rw.single_use(y):
                continue
            found = normalized(rw, y)
            if found is None:
                continue
            x, axis, eps = found
            if not _fits_normalized_dims(w, x, axis) or node.result.type.shape != x.type.shape:
                continue
            fused = rw.create("rmsnorm", [x, w], {"axis": axis, "epsilon": eps}, before=node,
                              hint="rmsnorm", result_types=[node.result.type])
            rw.replace(node, [fused.result])
            return True
        return False


class FuseRMSNorm(RewritePattern):
    """Without a weight (run after FuseWeightedRMSNorm, which takes the weighted ones)."""

    op = "*"

    def rewrite(self, node, rw):
        if node.op not in ("mul", "div"):
            return False
        found = normalized(rw, node.result)
        if found is None:
            return False
        x, axis, eps = found
        t = x.type
        dims = t.shape[axis:]
        if not all(isinstance(d, int) for d in dims):
            return False  # the ones constant needs the normalized dims
        ones = rw.constant(np.ones(dims, t.dtype.np_dtype), t.with_shape(dims), before=node,
                           hint="rmsnorm_scale")
        fused = rw.create("rmsnorm", [x, ones], {"axis": axis, "epsilon": eps}, before=node,
                          hint="rmsnorm", result_types=[node.result.type])
        rw.replace(node, [fused.result])
        return True


@register_pass("fuse-rmsnorm")
@dataclass
class FuseRMSNormPass(Pass):
    """x · rsqrt(mean(x²) + eps) · w in its decomposed forms → one rmsnorm op."""

    def run(self, module: Module) -> Module:
        weighted = apply_patterns(module, [FuseWeightedRMSNorm()])
        plain = apply_patterns(module, [FuseRMSNorm()])
        record_stat(module, self.name, rmsnorm=weighted + plain)
        return module
