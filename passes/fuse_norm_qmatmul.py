"""fuse-norm-qmatmul: an RMS normalization whose only reader is a qmatmul goes into the qmatmul.

A pre-norm decoder layer (Llama, Mistral, Qwen) normalizes the residual stream before each
of its two projections; after ``fuse-rmsnorm``, ``fuse-qkv`` and ``fuse-gate-up`` each norm
has one reader::

    n  = rmsnorm(h, g) {axis = -1, epsilon = e}
    y  = qmatmul(n, W, ...)

which this pass rewrites to::

    y  = qmatmul(h, W, ..., g) {x_norm = "rms", x_norm_epsilon = e}

(the scale is the qmatmul's last operand, after its epilogue's). At decode the norm is a
one-row kernel whose launch costs more than its work; the CUDA GEMV kernel normalizes its
rows itself (each CTA reads the row, sums its squares and keeps the normalized row in shared
memory), and the other kernels (and an act-order or padded x) normalize x into their
workspace first, permuted and padded in the same copy (one launch, as before). The result is the unfused graph's: the same f32
statistics, the normalized row rounded to x's type before the product.

Conditions: the rmsnorm normalizes the last axis only with a scale [K] of x's type, its
result is read by this qmatmul alone (as x), and the qmatmul is ``act=float`` without
``x_norm`` yet. Only
backends that compute ``x_norm`` take it: the CUDA pipelines, opt-in with ``enable=1``
until its speed is measured on a GPU; the CPU backend runs such a qmatmul on the reference,
the HLS backend refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Module
from qcompiler.ir.rewrite import RewritePattern, apply_patterns, producer_of
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass


class FuseNormQmatmul(RewritePattern):
    op = "qmatmul"

    def rewrite(self, node, rw):
        a = node.attrs
        if a.get("act") != "float" or a.get("x_norm") or "config" in a:
            return False
        x = node.arg("x")
        norm = producer_of(x, "rmsnorm")
        if norm is None or not rw.single_use(x):
            return False
        h, scale = norm.operands
        if norm.attrs["axis"] % h.type.rank != h.type.rank - 1:
            return False  # statistics over more than the last axis
        k = h.type.shape[-1]
        if scale.type.rank != 1 or scale.type.shape[0] != k or scale.type.dtype != h.type.dtype:
            return False
        # the node keeps its name and result; the norm, now unread, goes with the dead nodes
        node.operands = [h] + list(node.operands[1:]) + [None] * (8 - len(node.operands)) \
            + [scale]
        a["x_norm"] = "rms"
        a["x_norm_epsilon"] = float(norm.attrs["epsilon"])
        rw.users = rw.fn.users()
        return True


@register_pass("fuse-norm-qmatmul")
@dataclass
class FuseNormQmatmulPass(Pass):
    """rmsnorm (last axis) read only by a qmatmul → the qmatmul's ``x_norm`` prologue."""

    enable: int = 1  # 0: the pass does nothing (the CUDA pipelines list it so, until measured)

    def __post_init__(self):
        if self.enable not in (0, 1):
            raise PassError(f"fuse-norm-qmatmul: enable={self.enable!r} (0 or 1)")

    def run(self, module: Module) -> Module:
        fused = apply_patterns(module, [FuseNormQmatmul()]) if self.enable else 0
        record_stat(module, self.name, norm_prologues=fused)
        return module
