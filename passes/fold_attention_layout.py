"""fold-attention-layout: the head transposes around an ``attention`` op become its layout.

Exported transformers split the heads of a projection with a reshape to [B, S, H, D] and a
transpose to [B, H, S, D] (for q, k and v), and merge them back with the inverse transpose
after attention. Each transpose is a full copy, one kernel launch on a GPU (a quarter of an
encoder layer's launches). The attention kernels can read [B, S, H, D] directly: only the
row stride and the head offset change. So::

    q' = transpose(q, [0, 2, 1, 3])          (single use)      ->  q_bshd = 1, reads q
    k' = transpose(k, ...), v' = transpose(v, ...)  (both)     ->  kv_bshd = 1, reads k, v
    y  = transpose(attention(...), [0, 2, 1, 3])  (its only use) ->  y_bshd = 1, writes y

k and v share one flag, as the kernels share one kv indexing. A transpose with other uses
stays (folding would keep both copies). The mask's dims are not affected. A reshape between
[B, 1, H, D] and [B, H, 1, D] is the same swap (one position: a decode step exported with a
static sequence, its transposes made reshapes by the canonicalizer) and folds alike.

A rotary embedding between the head split and attention (Llama's q and k) is moved before
the transpose, so that the transpose reaches attention (or ``fuse-kv-concat``)::

    rotary_embedding(transpose(x [B, S, H, D], [0, 2, 1, 3]))
      -> transpose(reshape(rotary_embedding(reshape(x, [B, S, H*D])) {num_heads = H}), ...)

The 3-D form is ONNX RotaryEmbedding's own [B, S, H*D] layout (the same rotation per head
and position); the reshapes are views, no launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Value
from qcompiler.ir.ops import infer_types
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns
from qcompiler.pipeline import Pass, record_stat, register_pass

SWAP_SEQ_HEADS = [0, 2, 1, 3]


def unit_seq_swap(src_shape, dst_shape) -> bool:
    """Whether a reshape from ``src_shape`` to ``dst_shape`` is the seq/heads swap of a single
    position: [B, 1, H, D] -> [B, H, 1, D] moves no byte (a decode step exported with a
    static sequence of 1, whose transposes the canonicalizer made reshapes)."""
    return (len(src_shape) == 4 and len(dst_shape) == 4 and src_shape[1] == 1
            and dst_shape[2] == 1 and src_shape[0] == dst_shape[0]
            and src_shape[2] == dst_shape[1] and src_shape[3] == dst_shape[3])


def swapped_from(rw: Rewriter, v: Value) -> Optional[Value]:
    """x when v = transpose(x, [0, 2, 1, 3]), or a reshape of x that is the same swap
    (``unit_seq_swap``), and v has no other use."""
    node = v.producer
    if node is None or not rw.single_use(v):
        return None
    if node.op == "transpose" and list(node.attrs["perm"]) == SWAP_SEQ_HEADS:
        return node.operands[0]
    if node.op == "reshape" and unit_seq_swap(node.operands[0].type.shape, v.type.shape):
        return node.operands[0]
    return None


class FoldAttentionLayout(RewritePattern):
    op = "attention"

    def rewrite(self, node, rw):
        attrs = dict(node.attrs)
        operands = list(node.operands)
        changed = False
        if not attrs.get("q_bshd", 0):
            q = swapped_from(rw, operands[0])
            if q is not None:
                operands[0], attrs["q_bshd"], changed = q, 1, True
        if not attrs.get("kv_bshd", 0):
            k, v = swapped_from(rw, operands[1]), swapped_from(rw, operands[2])
            if k is not None and v is not None and operands[1] is not operands[2]:
                operands[1], operands[2], attrs["kv_bshd"], changed = k, v, 1, True
        merge = None
        if not attrs.get("y_bshd", 0) and rw.single_use(node.result):
            user = rw.users[node.result][0]
            if (user.op == "transpose" and list(user.attrs["perm"]) == SWAP_SEQ_HEADS
                    or user.op == "reshape"
                    and unit_seq_swap(user.result.type.shape, node.result.type.shape)):
                merge, attrs["y_bshd"], changed = user, 1, True
        if not changed:
            return False
        replaced = merge if merge is not None else node
        inferred = infer_types("attention", [v.type if v is not None else None
                                             for v in operands], attrs, [None] * len(operands))[0]
        if not _same_shape(inferred, replaced.result.type):
            return False
        # The replaced value's type, whose symbols the rest of the graph already uses (an
        # exporter's `unk__7` where inference would say `seq`: the same run-time dim).
        fused = rw.create("attention", operands, attrs, before=node, hint="attention",
                          result_types=[replaced.result.type])
        rw.replace(replaced, [fused.result])
        return True


class RotaryBeforeHeadSplit(RewritePattern):
    """rotary_embedding(transpose(x, [0, 2, 1, 3])) -> the head split after the rotary."""

    op = "rotary_embedding"

    def rewrite(self, node, rw):
        if node.attrs.get("num_heads", 0) or node.operands[0].type.rank != 4:
            return False
        x = swapped_from(rw, node.operands[0])
        if x is None:
            return False
        b, s, h, d = x.type.shape
        if not isinstance(h, int) or not isinstance(d, int):
            return False
        flat_t = x.type.with_shape((b, s, h * d))
        to_3d = rw.constant(np.array([0, 0, h * d], np.int64), None, before=node,
                            hint="rotary_flat")
        to_4d = rw.constant(np.array([0, 0, h, d], np.int64), None, before=node,
                            hint="rotary_heads")
        flat = rw.create("reshape", [x, to_3d], {}, before=node, hint="rotary_in",
                         result_types=[flat_t])
        rot = rw.create("rotary_embedding", [flat.result] + list(node.operands[1:]),
                        {**node.attrs, "num_heads": h}, before=node, hint="rotary",
                        result_types=[flat_t])
        heads = rw.create("reshape", [rot.result, to_4d], {}, before=node, hint="rotary_out",
                          result_types=[x.type])
        split = rw.create("transpose", [heads.result], {"perm": SWAP_SEQ_HEADS}, before=node,
                          hint="rotary_heads", result_types=[node.result.type])
        rw.replace(node, [split.result])
        return True


def _same_shape(a, b) -> bool:
    """Same element type and rank, and equal wherever both dims are static."""
    return a.dtype == b.dtype and a.rank == b.rank and all(
        x == y for x, y in zip(a.shape, b.shape) if isinstance(x, int) and isinstance(y, int))


@register_pass("fold-attention-layout")
@dataclass
class FoldAttentionLayoutPass(Pass):
    """Head-split / head-merge transposes around attention → its q/kv/y [B, S, H, D] layout."""

    def run(self, module: Module) -> Module:
        hoisted = apply_patterns(module, [RotaryBeforeHeadSplit()])
        folded = apply_patterns(module, [FoldAttentionLayout()])
        record_stat(module, self.name, folded=folded, rotary_hoisted=hoisted)
        return module
