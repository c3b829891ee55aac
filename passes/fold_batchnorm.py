"""fold-batchnorm: per-channel affine steps after a float conv fold into its weights and bias.

The ONNX importer lowers BatchNormalization (inference) to ``((x - mean) / std) * scale + bias``
with per-channel constants shaped [C, 1, ...]; canonicalize folds ``std = sqrt(var + eps)``.
Any chain of single-use ``add``/``sub``/``mul``/``div`` by a constant that broadcasts along the
conv's output channels only (shape [C, 1, ...], [1, C, 1, ...] or a scalar) is the affine map
``y = alpha[c] * conv + beta[c]``, so::

    conv(x, w, b) -> chain        becomes        conv(x, w * alpha[m], b * alpha + beta)

when w (and b) are constants. Exact up to float rounding: the new weights are computed in
float64 and rounded once to the weight type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns
from qcompiler.pipeline import Pass, record_stat, register_pass

AFFINE_OPS = ("add", "sub", "mul", "div")


def channel_vector(rw: Rewriter, v, channels: int, rank: int) -> Optional[np.ndarray]:
    """The constant ``v`` as a float64 [channels] vector when it broadcasts against an
    [N, channels, *sp] tensor along the channel dim only (None otherwise)."""
    c = rw.const(v)
    if c is None or not np.issubdtype(c.dtype, np.floating):
        return None
    c = np.asarray(c, np.float64)
    if c.size == 1 and c.ndim <= rank:
        return np.full(channels, float(c.reshape(())))
    shape = (1,) * (rank - c.ndim) + c.shape
    if len(shape) != rank or shape[1] != channels or any(d != 1 for i, d in enumerate(shape)
                                                           if i != 1):
        return None
    return c.reshape(channels)


def _affine_step(rw: Rewriter, node, current, channels: int, rank: int):
    """(scale, shift) of one step ``node`` applied to ``current`` (None when it is not one)."""
    if node.op not in AFFINE_OPS or len(node.operands) != 2:
        return None
    a, b = node.operands
    if a is current:
        k = channel_vector(rw, b, channels, rank)
        if k is None:
            return None
        return {"add": (1.0, k), "sub": (1.0, -k), "mul": (k, 0.0), "div": (1.0 / k, 0.0)}[node.op]
    if b is current and node.op in ("add", "mul", "sub"):
        k = channel_vector(rw, a, channels, rank)
        if k is None:
            return None
        return {"add": (1.0, k), "mul": (k, 0.0), "sub": (-1.0, k)}[node.op]
    return None


class FoldAffineIntoConv(RewritePattern):
    op = "conv"

    def rewrite(self, node, rw):
        x, w, b = node.arg("x"), node.arg("w"), node.arg("b")
        wc = rw.const(w)
        bc = rw.const(b) if b is not None else None
        if wc is None or not np.issubdtype(wc.dtype, np.floating) or (b is not None
                                                                        and bc is None):
            return False
        channels, rank = wc.shape[0], node.result.type.rank
        alpha = np.ones(channels)
        beta = np.zeros(channels)
        current, last = node.result, None
        while rw.single_use(current):
            user = rw.users[current][0]
            step = _affine_step(rw, user, current, channels, rank)
            if step is None or user.result.type.shape != node.result.type.shape \
                    or user.result.type.dtype != node.result.type.dtype:
                break
            scale, shift = step
            alpha, beta = alpha * scale, beta * scale + shift
            current, last = user.result, user
        if last is None:
            return False
        dtype = wc.dtype
        new_w = (wc.astype(np.float64) * alpha.reshape((-1,) + (1,) * (wc.ndim - 1))).astype(dtype)
        old_b = np.zeros(channels) if bc is None else bc.astype(np.float64)
        new_b = (old_b * alpha + beta).astype(dtype)
        wv = rw.constant(new_w, w.type, before=node, hint="conv_w_folded")
        bv = rw.constant(new_b, w.type.with_shape((channels,)), before=node, hint="conv_b_folded")
        folded = rw.create("conv", [x, wv, bv], dict(node.attrs), before=node, hint="conv",
                           result_types=[last.result.type])
        rw.replace(last, [folded.result])
        return True


@register_pass("fold-batchnorm")
@dataclass
class FoldBatchNormPass(Pass):
    """BatchNormalization (and any per-channel affine chain) after a conv → the conv's weights."""

    def run(self, module: Module) -> Module:
        folded = apply_patterns(module, [FoldAffineIntoConv()])
        record_stat(module, self.name, folded=folded)
        return module
