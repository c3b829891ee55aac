"""fuse-rotary: rotary position embedding written out (rotate_half) becomes one
``rotary_embedding`` op.

Recognized (Llama-style exports, x [B, H, S, D] with D = 2h)::

    rot = concat(neg(slice(x, h:D)), slice(x, 0:h), axis=-1)        (rotate_half)
    y   = add(mul(x, cos), mul(rot, sin))                             (either order)
    cos = unsqueeze(gather(COS, pos), [1]),  sin = unsqueeze(gather(SIN, pos), [1])
    (or gather_nd(COS, unsqueeze(pos, [-1])), as the dynamo exporter writes the row gather)

where COS and SIN are constant [P, D] tables whose two halves are equal (``cat([f, f])``):
→ ``rotary_embedding(x, COS[:, :h], SIN[:, :h], pos) {interleaved = 0}``, the ONNX op (the
non-interleaved halves rotate as r1 = cos x1 - sin x2, r2 = sin x1 + cos x2, which is what the
decomposed form computes). Five kernels per tensor become one, and the product is rounded
once instead of per step (the f16 decomposed form rounds each mul and the add).
Intermediates must have no other use, except x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Value
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.pipeline import Pass, record_stat, register_pass


def _last_axis_slice(rw: Rewriter, v: Value) -> Optional[tuple[Value, int, int]]:
    """(x, start, end) when v = slice(x) along x's last axis with step 1 (single use)."""
    node = producer_of(v, "slice")
    if node is None or not rw.single_use(v):
        return None
    x = node.operands[0]
    starts, ends = rw.const(node.arg("starts")), rw.const(node.arg("ends"))
    axes = rw.const(node.arg("axes")) if node.arg("axes") is not None else None
    steps = rw.const(node.arg("steps")) if node.arg("steps") is not None else None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    d = x.type.shape[-1]
    axis = int(axes.reshape(-1)[0]) if axes is not None else 0
    if not isinstance(d, int) or axis % x.type.rank != x.type.rank - 1:
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    start, end = (int(np.clip(int(c.reshape(-1)[0]) + (d if int(c.reshape(-1)[0]) < 0 else 0),
                              0, d)) for c in (starts, ends))
    return x, start, end


def _rotate_half_of(rw: Rewriter, rot: Value) -> Optional[Value]:
    """x when rot = concat(neg(x[..., h:]), x[..., :h], axis=-1) with D = 2h."""
    cat = producer_of(rot, "concat")
    if cat is None or not rw.single_use(rot) or len(cat.operands) != 2:
        return None
    if cat.attrs["axis"] % rot.type.rank != rot.type.rank - 1:
        return None
    neg = producer_of(cat.operands[0], "neg")
    if neg is None or not rw.single_use(cat.operands[0]):
        return None
    hi, lo = _last_axis_slice(rw, neg.operands[0]), _last_axis_slice(rw, cat.operands[1])
    if hi is None or lo is None or hi[0] is not lo[0]:
        return None
    x = hi[0]
    d = x.type.shape[-1]
    if d % 2 or hi[1:] != (d // 2, d) or lo[1:] != (0, d // 2):
        return None
    return x


def _gathered_rows(rw: Rewriter, v: Value) -> Optional[tuple[Value, Value]]:
    """(TABLE value, pos) when v = gather(TABLE, pos, axis=0), or the dynamo exporter's
    gather_nd(TABLE, unsqueeze(pos, [-1])) (batch_dims 0: the same rows)."""
    gather = producer_of(v, "gather")
    if gather is not None:
        return (gather.operands[0], gather.operands[1]) if gather.attrs.get("axis", 0) == 0 \
            else None
    gather_nd = producer_of(v, "gather_nd")
    if gather_nd is None or gather_nd.attrs.get("batch_dims", 0) != 0:
        return None
    index = producer_of(gather_nd.operands[1], "unsqueeze")
    if index is None:
        return None
    pos = index.operands[0]
    if [a % (pos.type.rank + 1) for a in index.attrs["axes"]] != [pos.type.rank]:
        return None
    return gather_nd.operands[0], pos


def _table_rows(rw: Rewriter, v: Value) -> Optional[tuple[np.ndarray, Value]]:
    """(TABLE, pos) when v = unsqueeze(ROWS, [1]) with ROWS the rows ``pos`` of a constant
    TABLE (``_gathered_rows``)."""
    unsq = producer_of(v, "unsqueeze")
    if unsq is None or list(unsq.attrs["axes"]) != [1]:
        return None
    found = _gathered_rows(rw, unsq.operands[0])
    if found is None:
        return None
    table_value, pos = found
    table = rw.const(table_value)
    if table is None or table.ndim != 2 or pos.type.rank != 2:
        return None
    return table, pos, table_value


class FuseRotary(RewritePattern):
    op = "add"

    def __init__(self):
        self.half_tables: dict = {}  # (table value, dtype) -> its first half, made once

    def rewrite(self, node, rw):
        muls = [producer_of(v, "mul") for v in node.operands]
        if None in muls or not all(rw.single_use(v) for v in node.operands):
            return False
        for first, second in (muls, muls[::-1]):
            match = self._match(rw, first, second)
            if match is not None:
                break
        else:
            return False
        x, (cos, cos_value), (sin, sin_value), pos = match
        cos_h = self._half(rw, cos, cos_value, x, node, "rope_cos")
        sin_h = self._half(rw, sin, sin_value, x, node, "rope_sin")
        fused = rw.create("rotary_embedding", [x, cos_h, sin_h, pos],
                          {"interleaved": 0, "num_heads": 0, "rotary_embedding_dim": 0},
                          before=node, hint="rotary", result_types=[node.result.type])
        rw.replace(node, [fused.result])
        return True

    def _half(self, rw, table, value, x, before, hint):
        """The first half of a [P, D] table in x's type; the layers of a model share one."""
        key = (value, str(x.type.dtype))
        if key not in self.half_tables:
            # before the first rotary that uses it: the patterns visit nodes in order, so
            # every later layer's rotary comes after this one
            h = x.type.shape[-1] // 2
            self.half_tables[key] = rw.constant(
                np.ascontiguousarray(table[:, :h]), x.type.with_shape((table.shape[0], h)),
                before=before, hint=hint)
        return self.half_tables[key]

    def _match(self, rw, plain, rotated):
        """(x, COS, SIN, pos) when plain = x * cos and rotated = rotate_half(x) * sin."""
        for xs, cs in ((0, 1), (1, 0)):
            x, cos_v = plain.operands[xs], plain.operands[cs]
            for rs, ss in ((0, 1), (1, 0)):
                rot, sin_v = rotated.operands[rs], rotated.operands[ss]
                if _rotate_half_of(rw, rot) is not x:
                    continue
                if x.type.rank != 4 or not x.type.dtype.is_float:
                    continue
                cos_t, sin_t = _table_rows(rw, cos_v), _table_rows(rw, sin_v)
                if cos_t is None or sin_t is None or cos_t[1] is not sin_t[1]:
                    continue
                d, h = x.type.shape[-1], x.type.shape[-1] // 2
                (cos, pos, cos_value), (sin, _, sin_value) = cos_t, sin_t
                if cos.shape[1] != d or sin.shape[1] != d:
                    continue
                if not (np.array_equal(cos[:, :h], cos[:, h:])
                        and np.array_equal(sin[:, :h], sin[:, h:])):
                    continue
                if cos_v.type.shape[1] != 1 or plain.result.type.shape != x.type.shape:
                    continue
                dt = x.type.dtype.np_dtype
                return x, (cos.astype(dt), cos_value), (sin.astype(dt), sin_value), pos
        return None


@register_pass("fuse-rotary")
@dataclass
class FuseRotaryPass(Pass):
    """Rotary embedding written out with rotate_half → one rotary_embedding op."""

    def run(self, module: Module) -> Module:
        fused = apply_patterns(module, [FuseRotary()])
        record_stat(module, self.name, rotary=fused)
        return module
