"""fuse-gate-up: a gated MLP's two projections become one qmatmul whose epilogue pairs them.

After ``fuse-epilogue`` a SwiGLU (or GeGLU) block reads its input twice, and the second
projection's epilogue reads the first's product::

    up   = qmatmul(x, Wu)
    gate = qmatmul(x, Wg, ..., up) {epilogue = "silu(x0) * x1"}

This pass interleaves the two weights column by column (column 2j of the merged weight is
column j of Wg, column 2j + 1 column j of Wu) and gives the one qmatmul ``epilogue_pairs``::

    gate_up = qmatmul(x, [Wg, Wu interleaved]) {epilogue = "silu(x0) * x1", epilogue_pairs = 1}

so each output column is made from the two sums of one pair, which the kernels hold in the
same tile. At decode this is one GEMV launch instead of two, and the up product never goes
to memory. Both projections must be plain (``fuse_qkv.plain_projection``) with the
same input and weight scheme, the up product used only by the epilogue, and the epilogue
reading nothing but x0 and x1. It runs before ``reorder-weights``; only backends that apply
the pairs in their kernels take it (the CUDA pipelines).
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Module
from qcompiler.ir.elementwise_body import parse_body
from qcompiler.ir.rewrite import RewritePattern, apply_patterns, producer_of
from qcompiler.passes.fuse_qkv import (merged_weights, mergeable_weights, plain_projection,
                                      same_projection_kind)
from qcompiler.pipeline import Pass, record_stat, register_pass


class FuseGateUp(RewritePattern):
    op = "qmatmul"

    def rewrite(self, node, rw):
        if "epilogue" not in node.attrs or node.attrs.get("epilogue_pairs") \
                or len(node.operands) != 9 or "config" in node.attrs:
            return False
        (extra,) = node.operands[8:]  # the epilogue's one operand: the other product
        other = producer_of(extra, "qmatmul")
        if other is None or other is node or not rw.single_use(extra):
            return False
        if parse_body(node.attrs["epilogue"]).operand_count() > 2:
            return False
        if not (mergeable_weights(node) and plain_projection(other)
                and same_projection_kind(node, other)):
            return False
        if node.result.type.shape[-1] != other.result.type.shape[-1]:
            return False
        weights = merged_weights(rw, (node, other), before=other, interleave=True)
        if weights is None:
            return False
        attrs = {k: v for k, v in node.attrs.items() if k in ("act", "w_scheme", "accuracy_level")}
        fused = rw.create("qmatmul", [node.arg("x"), *weights[:3], None, None, None,
                                      weights[3]],
                          {**attrs, "epilogue": node.attrs["epilogue"], "epilogue_pairs": 1},
                          before=other, hint="gate_up")
        rw.replace(node, [fused.result])
        return True


@register_pass("fuse-gate-up")
@dataclass
class FuseGateUpPass(Pass):
    """Two projections of one input, one's epilogue reading the other → one qmatmul with
    interleaved weights and ``epilogue_pairs``."""

    def run(self, module: Module) -> Module:
        fused = apply_patterns(module, [FuseGateUp()])
        module.drop_unused_constants()  # the two projections' own weights
        record_stat(module, self.name, gate_up=fused)
        return module
