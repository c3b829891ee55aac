"""fuse-kv-concat: a decoder layer's cache update becomes one ``kv_concat`` op.

Decoder exports with the KV cache stacked over layers (``past_k [L, B, H, P, D]``) take each
layer's slice with a gather and append the new keys (or values), split into heads by a
transpose::

    k = concat(gather(past, l, axis=0), transpose(new [B, S, H, D], [0, 2, 1, 3]), axis=2)
      -> kv_concat(past, new) {layer = l, new_bshd = 1}

(``new_bshd = 0`` when the new rows are already [B, H, S, D]). Three launches and two copies
of the layer's cache become one launch that reads the stacked cache in place. The gather and
the transpose must have no other use (the gather index is a constant scalar); run after
``fold-attention-layout``, which moves a rotary embedding off the head split.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Module
from qcompiler.ir.rewrite import RewritePattern, apply_patterns, producer_of
from qcompiler.passes.fold_attention_layout import swapped_from
from qcompiler.pipeline import Pass, record_stat, register_pass


class FuseKvConcat(RewritePattern):
    op = "concat"

    def rewrite(self, node, rw):
        if len(node.operands) != 2 or node.result.type.rank != 4 or node.attrs["axis"] % 4 != 2:
            return False
        cached, fresh = node.operands
        gather = producer_of(cached, "gather")
        if gather is None or not rw.single_use(cached) or gather.operands[0].type.rank != 5:
            return False
        past, index = gather.operands
        layer = rw.const(index)
        if gather.attrs.get("axis", 0) % 5 != 0 or layer is None or layer.ndim != 0:
            return False
        layers = past.type.shape[0]
        layer = int(layer)
        if layer < 0 and isinstance(layers, int):
            layer += layers  # gather's negative index counts from the end
        if layer < 0 or (isinstance(layers, int) and layer >= layers):
            return False
        new_bshd = 0
        rows = swapped_from(rw, fresh)  # the new rows as [B, S, H, D]
        if rows is not None:
            fresh, new_bshd = rows, 1
        if fresh.type.dtype != past.type.dtype:
            return False
        fused = rw.create("kv_concat", [past, fresh], {"layer": layer, "new_bshd": new_bshd},
                          before=node, hint="kv_concat", result_types=[node.result.type])
        rw.replace(node, [fused.result])
        return True


@register_pass("fuse-kv-concat")
@dataclass
class FuseKvConcatPass(Pass):
    """A layer's gather from the stacked KV cache + head transpose + concat → kv_concat."""

    def run(self, module: Module) -> Module:
        fused = apply_patterns(module, [FuseKvConcat()])
        record_stat(module, self.name, kv_concat=fused)
        return module
