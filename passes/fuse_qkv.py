"""fuse-qkv: an attention layer's q, k and v projections become one qmatmul, and what came
between them and the attention (rotary embeddings, cache appends) one ``qkv_heads``.

After ``fuse-rotary``, ``fuse-attention``, ``fold-attention-layout`` and ``fuse-kv-concat``
a Llama-style decoder layer reads its normalized input ``x`` three times::

    q = rotary(qmatmul(x, Wq), cos, sin, pos){H}          -> attention's q [B, S, H, D]
    k = kv_concat(past_k, rotary(qmatmul(x, Wk), ...){Hkv}){layer, new_bshd}
    v = kv_concat(past_v, qmatmul(x, Wv)){layer, new_bshd}

with reshapes between, which move no data. Without a cache (a prefill-only export, an
encoder) k and v go to the attention as [B, S, Hkv, D]; without rotary (BERT) q and k are
the projections' heads as they are. This pass rewrites each form to::

    qkv = qmatmul(x, [Wq | Wk | Wv])                      one weight, columns concatenated
    q, k, v = qkv_heads(qkv, [cos, sin, pos,] [past_k, past_v]){H, Hkv, layer}

Seven launches become two in a decoder layer with a cache, five in one without, and three
become two in an encoder. At decode (M = 1) each projection is a short, latency-bound kernel,
so the three GEMVs cost about what one wider GEMV costs; in a prefill the k and v GEMMs
(N = Hkv D, a few CTAs) fill the GPU as part of the wider one.

The three qmatmuls must have the same input, weight scheme (per-channel, or groups along K:
scales concatenate along N) and ``act``, no epilogue, act-order or activation scales, and
biases on all or none; q and k rotated alike (same caches, positions, attributes) or not
at all; the appends the same layer. It runs before ``reorder-weights`` (the weights are
still [K, N] codes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Value
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.ir.ops import infer_types
from qcompiler.ir.types import TensorType
from qcompiler.pipeline import Pass, record_stat, register_pass

VIEW_OPS = ("reshape",)


def _through_views(v: Value, rw: Rewriter) -> Optional[Value]:
    """The value a chain of single-use reshapes ending in ``v`` starts from (``v`` itself
    when none produces it); None when a reshape of the chain has another use."""
    while v.producer is not None and v.producer.op in VIEW_OPS:
        src = v.producer.operands[0]
        if not rw.single_use(src):
            return None
        v = src
    return v


def mergeable_weights(node) -> bool:
    """A float qmatmul whose weight operands can merge with a sibling's along N: no config,
    act-order or activation scales; scales per column or in groups along K; the weight
    still [K, N] codes (before reorder-weights). Its epilogue is the caller's business."""
    if node.op != "qmatmul" or node.attrs.get("act") != "float" or "config" in node.attrs \
            or node.attrs.get("x_norm"):
        return False
    if any(node.arg(n) is not None for n in ("g_idx", "x_scale", "x_zero_point")):
        return False
    scheme = node.attrs["w_scheme"]
    if scheme.act_order or not (scheme.granularity == "channel" and scheme.axis == 1
                                or scheme.granularity == "group" and scheme.axis == 0):
        return False  # scales must run along N to merge
    return node.arg("w").type.layout is None


def plain_projection(node) -> bool:
    """A qmatmul with mergeable weights and no epilogue."""
    return mergeable_weights(node) and "epilogue" not in node.attrs and len(node.operands) <= 8


def same_projection_kind(a, b) -> bool:
    """Two plain projections of one input with one weight scheme and accuracy level."""
    return a.arg("x") is b.arg("x") and a.attrs["w_scheme"] == b.attrs["w_scheme"] \
        and a.attrs.get("accuracy_level") == b.attrs.get("accuracy_level")


def merged_weights(rw: Rewriter, projections, before, interleave: bool = False):
    """[w, scales, zero points or None, bias or None] of the projections merged along N as
    new constants: side by side, or (``interleave``) column j of each in turn. None when an
    operand is not a constant or the projections differ in which operands they have."""
    out = []
    for name in ("w", "w_scale", "w_zero_point", "bias"):
        vals = [p.arg(name) for p in projections]
        if all(v is None for v in vals):
            out.append(None)
            continue
        arrays = [rw.const(v) for v in vals]
        if any(a is None for a in arrays) or len({v.type.dtype for v in vals}) != 1 \
                or len({a.shape[:-1] for a in arrays}) != 1:
            return None
        if interleave:
            if len({a.shape for a in arrays}) != 1:
                return None
            merged = np.stack(arrays, axis=-1).reshape(arrays[0].shape[:-1] + (-1,))
        else:
            merged = np.concatenate(arrays, axis=-1)
        t = TensorType(tuple(merged.shape), vals[0].type.dtype)
        out.append(rw.constant(merged, t, before, hint=f"{vals[0].name}.merged"))
    return out


def _qmatmul_of(v: Value, rw: Rewriter):
    """The plain projection producing ``v`` (through views), single use, 3-D, or None."""
    base = _through_views(v, rw)
    node = producer_of(base, "qmatmul") if base is not None else None
    if node is None or not rw.single_use(base) or not plain_projection(node):
        return None
    return node if node.result.type.rank == 3 else None


def _projection_of(v: Value, rw: Rewriter):
    """(rotary node or None, plain projection or None) behind ``v``: through views, a 3-D
    rotary_embedding over a projection's result, or the projection itself."""
    base = _through_views(v, rw)
    rot = producer_of(base, "rotary_embedding") if base is not None else None
    if rot is None:
        return None, _qmatmul_of(v, rw)
    if not rw.single_use(base) or rot.arg("x").type.rank != 3:
        return None, None
    return rot, _qmatmul_of(rot.arg("x"), rw)


def _heads_view_ok(v: Value, rows: tuple, heads: int, d: int) -> bool:
    """``v`` is [B, S, heads, d] with the same B and S as the projection's rows (the heads
    dim may be a symbol: a reshape's -1)."""
    shape = tuple(v.type.shape)
    return len(shape) == 4 and shape[:2] == rows and "?" not in rows and shape[3] == d \
        and (shape[2] == heads or isinstance(shape[2], str))


class FuseQkv(RewritePattern):
    op = "attention"

    def rewrite(self, node, rw):
        if not node.attrs.get("q_bshd"):
            return False
        q_in, k_all, v_all = node.arg("q"), node.arg("k"), node.arg("v")
        kcat, vcat = producer_of(k_all, "kv_concat"), producer_of(v_all, "kv_concat")
        if kcat is not None and vcat is not None:  # decode: the new rows go to the caches
            if not (kcat.attrs["new_bshd"] and vcat.attrs["new_bshd"]) \
                    or kcat.attrs["layer"] != vcat.attrs["layer"]:
                return False
            k_new, v_new = kcat.arg("new"), vcat.arg("new")
        elif kcat is None and vcat is None and node.attrs.get("kv_bshd"):  # no cache
            k_new, v_new = k_all, v_all
        else:
            return False
        # the extended caches may have other uses (the model's present outputs): all follow
        if not (rw.single_use(q_in) and rw.single_use(k_new) and rw.single_use(v_new)):
            return False
        qrot, qq = _projection_of(q_in, rw)
        krot, qk = _projection_of(k_new, rw)
        vrot, qv = _projection_of(v_new, rw)
        if qq is None or qk is None or qv is None or vrot is not None \
                or len({id(qq), id(qk), id(qv)}) != 3 or (qrot is None) != (krot is None):
            return False
        if not (same_projection_kind(qq, qk) and same_projection_kind(qq, qv)):
            return False
        d = q_in.type.shape[3]
        nq, nk, nv = (p.result.type.shape[2] for p in (qq, qk, qv))
        if not all(isinstance(n, int) for n in (d, nq, nk, nv)) or nq % d or nk % d or nk != nv:
            return False
        heads, hkv = nq // d, nk // d
        if heads % hkv:
            return False
        rows = tuple(qq.result.type.shape[:2])
        if any(tuple(p.result.type.shape[:2]) != rows for p in (qk, qv)):
            return False
        if not (_heads_view_ok(q_in, rows, heads, d)
                and _heads_view_ok(k_new, rows, hkv, d) and _heads_view_ok(v_new, rows, hkv, d)):
            return False
        tables = ("cos_cache", "sin_cache", "position_ids")
        rotary = {"interleaved": 0, "rotary_embedding_dim": 0}
        if qrot is not None:
            if any(qrot.arg(t) is not krot.arg(t) for t in tables) \
                    or any(qrot.attrs[a] != krot.attrs[a] for a in rotary) \
                    or (qrot.attrs["num_heads"], krot.attrs["num_heads"]) != (heads, hkv):
                return False
            rotary = {a: int(qrot.attrs[a]) for a in rotary}
        weights = merged_weights(rw, (qq, qk, qv), before=qq)
        if weights is None:
            return False
        qkv = rw.create("qmatmul", [qq.arg("x"), *weights[:3], None, None, None, weights[3]],
                        {"act": "float", "w_scheme": qq.attrs["w_scheme"],
                         **({"accuracy_level": qq.attrs["accuracy_level"]}
                            if "accuracy_level" in qq.attrs else {})},
                        before=qq, hint="qkv")
        rot_ops = [qrot.arg(t) for t in tables] if qrot is not None else [None] * 3
        cached = kcat is not None
        past = [kcat.arg("past"), vcat.arg("past")] if cached else []
        operands = [qkv.result, *rot_ops, *past]
        attrs = {"num_heads": heads, "kv_heads": hkv, **rotary,
                 "layer": int(kcat.attrs["layer"]) if cached else 0}
        types = infer_types("qkv_heads", [v.type if v is not None else None for v in operands],
                            attrs, [rw.const(v) for v in operands])
        if cached:  # the caches' length P + S as the replaced appends name it (a symbol)
            types[1:] = [_named_dims(t, cat.results[0].type) for t, cat in
                         ((types[1], kcat), (types[2], vcat))]
        fused = rw.create("qkv_heads", operands, attrs, before=node, result_types=types,
                          hint=["q_heads", "k_cache", "v_cache"] if cached
                          else ["q_heads", "k_heads", "v_heads"])
        q, k, v = fused.results
        rw.fn.replace_all_uses(q_in, q)
        if cached:
            rw.replace(kcat, [k])
            rw.replace(vcat, [v])
        else:  # [B, S, Hkv, D] as before: the attention keeps kv_bshd
            rw.fn.replace_all_uses(k_all, k)
            rw.fn.replace_all_uses(v_all, v)
            rw.users = rw.fn.users()
        return True


def _named_dims(inferred: TensorType, named: TensorType) -> TensorType:
    """``inferred`` with each unknown dim (``?``: a sum of symbols) taken from ``named``, the
    type of the value it replaces: plans then know the cache's size at every dims."""
    if len(inferred.shape) != len(named.shape):
        return inferred
    shape = tuple(n if d == "?" else d for d, n in zip(inferred.shape, named.shape))
    return TensorType(shape, inferred.dtype, inferred.quant, inferred.layout)


@register_pass("fuse-qkv")
@dataclass
class FuseQkvPass(Pass):
    """q/k/v qmatmuls of one input (+ rotary on q and k, + cache appends) → one qmatmul and a
    qkv_heads."""

    def run(self, module: Module) -> Module:
        fused = apply_patterns(module, [FuseQkv()])
        if fused:  # the caches' other users (present outputs) may precede the attention
            for fn in module.functions:
                fn.topo_sort()
        module.drop_unused_constants()  # the projections' own weights
        record_stat(module, self.name, qkv_heads=fused)
        return module
