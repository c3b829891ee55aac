"""fuse-norm-qmatmul: a normalization whose only reader is a qmatmul goes into the qmatmul.

A pre-norm decoder layer normalizes the residual stream before each of its two projections
(RMSNorm in Llama, Mistral, Qwen; LayerNorm in GPT-2, Phi, Falcon); after ``fuse-rmsnorm``,
``fuse-qkv`` and ``fuse-gate-up`` each norm has one reader::

    n  = rmsnorm(h, g) {axis = -1, epsilon = e}       (or layernorm(h, g, b))
    y  = qmatmul(n, W, ...)

which this pass rewrites to::

    y  = qmatmul(h, W, ..., g) {x_norm = "rms", x_norm_epsilon = e}
    y  = qmatmul(h, W, ..., g, b) {x_norm = "layer", x_norm_epsilon = e}

(the scale, and layer's bias or none, are the qmatmul's last operands, after its
epilogue's). At decode the norm is a one-row kernel whose launch costs more than its work;
the CUDA GEMV kernel applies it itself: RMSNorm after the product, ``rmsnorm(x, g) W =
(1 / rms(x)) ((x * g) W)`` (x * g in the loop, each row's statistics after it, off the
critical path), LayerNorm before it (the CTA normalizes its rows into shared memory); the
other kernels (and an act-order or padded x) normalize x into their workspace first,
permuted and padded in the same copy (one launch, as before). The result is the unfused
graph's within rounding: the same f32 statistics and formula (the GEMV's RMSNorm rounds
x * g to x's type where the reference rounds the normalized row; x * g must fit the type).

Conditions: the norm normalizes the last axis only, with a scale (and bias) [K] of x's
type, and is one of ``kinds``; its result is read by this qmatmul alone (as x); the qmatmul
is ``act=float`` without ``x_norm`` yet. Only backends that compute ``x_norm`` take it: the
CUDA pipelines, opt-in with ``enable=1`` (on an H100's 22-layer decode it cost 6-9 %
normalizing first and 11 % with the RMSNorm after the product: codegen/cuda/NOTES.md); the CPU backend runs such a qmatmul on the reference, the HLS backend
refuses it. A post-norm encoder (BERT) keeps its LayerNorms: their results are also the next
residual.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Module
from qcompiler.ir.rewrite import RewritePattern, apply_patterns, producer_of
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass


NORM_KINDS = {"rmsnorm": "rms", "layernorm": "layer"}


def _per_k(v, k, dtype) -> bool:
    """A [K] operand of x's type (a norm's scale or bias)."""
    return v.type.rank == 1 and v.type.shape[0] == k and v.type.dtype == dtype


class FuseNormQmatmul(RewritePattern):
    op = "qmatmul"

    def __init__(self, kinds=frozenset(NORM_KINDS.values())):
        self.kinds = kinds  # the x_norm kinds to fuse ("rms", "layer")

    def rewrite(self, node, rw):
        a = node.attrs
        if a.get("act") != "float" or a.get("x_norm") or "config" in a:
            return False
        x = node.arg("x")
        norm = producer_of(x, "rmsnorm") or producer_of(x, "layernorm")
        if norm is None or not rw.single_use(x):
            return False
        h, scale = norm.arg("x"), norm.arg("scale")
        bias = norm.arg("bias") if norm.op == "layernorm" else None
        if norm.attrs["axis"] % h.type.rank != h.type.rank - 1:
            return False  # statistics over more than the last axis
        k, dtype = h.type.shape[-1], h.type.dtype
        if not _per_k(scale, k, dtype) or (bias is not None and not _per_k(bias, k, dtype)):
            return False
        kind = NORM_KINDS[norm.op]
        if kind not in self.kinds:
            return False
        # the node keeps its name and result; the norm, now unread, goes with the dead nodes
        node.operands = [h] + list(node.operands[1:]) + [None] * (8 - len(node.operands)) \
            + [scale] + ([bias] if kind == "layer" else [])
        a["x_norm"] = kind
        a["x_norm_epsilon"] = float(norm.attrs["epsilon"])
        rw.users = rw.fn.users()
        return True


@register_pass("fuse-norm-qmatmul")
@dataclass
class FuseNormQmatmulPass(Pass):
    """rmsnorm / layernorm (last axis) read only by a qmatmul → the qmatmul's ``x_norm``."""

    enable: int = 1  # 0: the pass does nothing
    kinds: str = "rms+layer"  # the norms it fuses, "+"-separated: rms (rmsnorm), layer (layernorm)

    def __post_init__(self):
        if self.enable not in (0, 1):
            raise PassError(f"fuse-norm-qmatmul: enable={self.enable!r} (0 or 1)")
        self._kinds = frozenset(k for k in str(self.kinds).split("+") if k)
        unknown = self._kinds - set(NORM_KINDS.values())
        if unknown or not self._kinds:
            raise PassError(f"fuse-norm-qmatmul: kinds={self.kinds!r} (rms, layer or rms+layer)")

    def run(self, module: Module) -> Module:
        fused = apply_patterns(module, [FuseNormQmatmul(self._kinds)]) if self.enable else 0
        record_stat(module, self.name, norm_prologues=fused)
        return module
