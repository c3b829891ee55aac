"""fuse-attention: decomposed scaled-dot-product attention becomes one ``attention`` op.

Recognized (what the ONNX and FX frontends produce from BERT, GPT-2 and Llama)::

    scores = matmul(q, kt)                         kt = k transposed in its last two dims
    scores = mul(scores, c) | div(scores, c)       optional; or c folded into q (mul(q, c))
    scores = add(scores, mask)                     optional additive float mask, or
           | where(keep, scores, -big)             a boolean one (-inf, -3.4e38 ...)
    probs  = softmax(scores, axis=-1)
    probs  = where(isnan(probs), 0, probs)         optional NaN guard (torch's ONNX export),
                                                   only when the mask cannot be -inf
    out    = matmul(probs, v)

k and v may be kv heads repeated over query-head groups (grouped-query attention):
``reshape(expand(unsqueeze(k0, axes=[2])))`` from [B, Hkv, S, D] to [B, Hkv * r, S, D]; the
attention op then reads k0 and v0 directly. kt may also be k transposed through a 3-D
reshape (torch's ONNX export), and the scale split between q and kt (sqrt(scale) on each). A boolean mask becomes the additive
``where(keep, 0, -big)``, which adds exactly what the where selected (finite scores plus 0,
or plus -big). A constant mask that is exactly the lower triangle aligned to the bottom right
(key j hidden from query i when j > i + Skv - Sq) becomes ``causal = 1`` without a mask, and
so does one computed from the sequence length as exporters build it (``arange`` compared
with itself transposed, ``_causal_condition``) where queries and keys are the same positions,
or over a KV cache from its length (``_causal_over_cache``; with a dynamic number of new
tokens, ``_causal_over_cache_of_any_length``): the kernels then skip the hidden
keys' tiles and read no mask, and a decode step evaluates no mask on the host.
Intermediates must have no other use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Value
from qcompiler.ir.ops import TypeInferenceError, broadcast_shapes, infer_types
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.pipeline import Pass, record_stat, register_pass

# An additive fill at or below this hides a key (onnxruntime and torch use -3.4e38 or -inf).
_HIDDEN = -1e30


def _scalar(rw: Rewriter, v: Value) -> Optional[float]:
    """The value of a one-element float constant, else None."""
    c = rw.const(v)
    if c is None or c.size != 1 or not v.type.dtype.is_float:
        return None
    return float(np.asarray(c).astype(np.float64).reshape(()))


def _scaled_operand(rw: Rewriter, v: Value) -> tuple[Value, float]:
    """v = mul(x, c) with a scalar constant c and no other use: (x, c); else (v, 1)."""
    node = producer_of(v, "mul")
    if node is None or not rw.single_use(v):
        return v, 1.0
    for a, b in (node.operands, node.operands[::-1]):
        c = _scalar(rw, b)
        if c is not None and a.type.shape == v.type.shape:
            return a, c
    return v, 1.0


def _through_3d(kt: Value) -> Optional[Value]:
    """k when kt = reshape(transpose(reshape(k, [B*H, S, D]), [0, 2, 1]), [B, H, D, S])
    (how torch's ONNX exporter transposes k for scaled_dot_product_attention)."""
    outer = producer_of(kt, "reshape")
    tr = producer_of(outer.operands[0], "transpose") if outer else None
    inner = producer_of(tr.operands[0], "reshape") if tr else None
    if inner is None or list(tr.attrs["perm"]) != [0, 2, 1]:
        return None
    k = inner.operands[0]
    if k.type.rank == 5:  # [B, Hkv, r, S, D]: kv heads repeated straight into the 3-D form
        k0 = _repeated_heads(k)
        if k0 is None:
            return None
        b, hkv, s, d = k0.type.shape
        rep = k.type.shape[2]
        if inner.result.type.shape[1:] == (s, d) and isinstance(hkv, int) \
                and kt.type.shape == (b, hkv * rep, d, s):
            return k0
        return None
    b, h, s, d = k.type.shape if k.type.rank == 4 else (None,) * 4
    if k.type.rank != 4 or inner.result.type.shape[1:] != (s, d) \
            or kt.type.shape != (b, h, d, s):
        return None
    return k


def _untransposed(rw: Rewriter, kt: Value, before) -> Value:
    """k from kt = k with its last two dims swapped (a new transpose unless one cancels)."""
    rank = kt.type.rank
    k = _through_3d(kt)
    if k is not None:
        return k
    node = producer_of(kt, "transpose")
    if node is not None:
        perm = list(node.attrs["perm"])
        perm[-1], perm[-2] = perm[-2], perm[-1]
        if perm == list(range(rank)):
            return node.operands[0]
        return rw.create("transpose", [node.operands[0]], {"perm": perm}, before=before,
                         hint="attn_k").result
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return rw.create("transpose", [kt], {"perm": perm}, before=before, hint="attn_k").result


def _repeated_heads(five: Value) -> Optional[Value]:
    """k0 when five = expand(unsqueeze(k0, [2])) is [B, Hkv, r, S, D] from k0 [B, Hkv, S, D].

    The expand's dims may be symbols of their own when its target shape is computed at run
    time (torch.onnx's repeat_kv: `unk__5` for r); then the static dims must agree and the
    caller checks the reshaped result against k0's dims."""
    expand = producer_of(five, "expand")
    unsq = producer_of(expand.operands[0], "unsqueeze") if expand else None
    if unsq is None or list(unsq.attrs["axes"]) not in ([2], [-3]):
        return None
    k0 = unsq.operands[0]
    shape = five.type.shape
    if k0.type.rank != 4 or len(shape) != 5:
        return None
    for got, want in zip(shape[:2] + shape[3:], k0.type.shape):
        if got != want and not (isinstance(got, str) and got.startswith("unk__")):
            return None
    return k0


def _shared_heads(rw: Rewriter, v: Value) -> Value:
    """k0 when v = reshape(expand(unsqueeze(k0, [2]))) repeats the kv heads of k0, else v: the
    reshaped result must be k0's [B, Hkv * r, S, D] with k0's own B, S and D."""
    reshape = producer_of(v, "reshape")
    k0 = _repeated_heads(reshape.operands[0]) if reshape else None
    if k0 is None or v.type.rank != 4:
        return v
    b, hkv, s, d = k0.type.shape
    heads = v.type.shape[1]
    rep = reshape.operands[0].type.shape[2]
    if not isinstance(rep, int):  # a run-time expand: r from the heads it was reshaped to
        rep = heads // hkv if isinstance(heads, int) and isinstance(hkv, int) and hkv else None
    if rep is None or not isinstance(hkv, int) or v.type.shape != (b, hkv * rep, s, d):
        return v
    return k0


def _causal_constant(rw: Rewriter, mask: Value, keep: bool) -> bool:
    """True when a constant mask hides exactly the keys j > i + (Skv - Sq).

    ``keep``: the mask is boolean (True keeps a key); else it is additive (0 keeps, a value
    at or below -1e30 hides)."""
    c = rw.const(mask)
    if c is None or c.ndim < 2 or any(d != 1 for d in c.shape[:-2]):
        return False
    c = np.asarray(c).reshape(c.shape[-2:])
    sq, skv = c.shape
    allowed = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + (skv - sq)
    if keep:
        return bool(np.array_equal(c.astype(bool), allowed))
    c = c.astype(np.float64)
    return bool(np.all(c[allowed] == 0) and np.all(c[~allowed] <= _HIDDEN))


def _int_constant(rw: Rewriter, v: Value) -> Optional[int]:
    """The value of a one-element integer constant, else None."""
    c = rw.const(v)
    if c is None or np.asarray(c).size != 1 or not np.issubdtype(np.asarray(c).dtype, np.integer):
        return None
    return int(np.asarray(c).reshape(()))


def _range_lengths(rw: Rewriter, rng) -> tuple:
    """The dims known to be the length of ``rng``: its type's, and for range(0, stop, 1)
    the dim d of a tensor X when stop is gather(shape(X), k) with X's dim k the symbol d
    (exporters take the sequence length from the input's shape: the range's own type then
    has a fresh symbol)."""
    own = rng.result.type.shape[0]
    other = _stop_dim(rw, rng)
    return (own,) if other is None else (own, other)


def _stop_dim(rw: Rewriter, rng) -> object:
    """X's dim k for range(0, gather(shape(X), k), 1), else None."""
    if _int_constant(rw, rng.operands[0]) != 0 or _int_constant(rw, rng.operands[2]) != 1:
        return None
    return _shape_dim(rw, rng.operands[1])


def _shape_dim(rw: Rewriter, v: Value) -> object:
    """X's dim k when the scalar ``v`` is gather(shape(X), k), else None."""
    g = producer_of(v, "gather")
    if g is None or g.attrs.get("axis", 0) != 0:
        return None
    shp, k = producer_of(g.operands[0], "shape"), _int_constant(rw, g.operands[1])
    if shp is None or k is None:
        return None
    full = shp.operands[0].type.shape
    dims = full[slice(shp.attrs.get("start", 0), shp.attrs.get("end", len(full)))]
    return dims[k] if -len(dims) <= k < len(dims) else None


def _same_range(rw: Rewriter, a: Value, b: Value) -> bool:
    """True when ``a`` and ``b`` are one range, or two with the same constant start and step
    and the same stop value (an exporter's two ``arange`` calls)."""
    if a is b:
        return True
    ra, rb = producer_of(a, "range"), producer_of(b, "range")
    if ra is None or rb is None or ra.operands[1] is not rb.operands[1]:
        return False
    for i in (0, 2):  # start, step
        value = _int_constant(rw, ra.operands[i])
        if value is None or value != _int_constant(rw, rb.operands[i]):
            return False
    return True


def _causal_condition(rw: Rewriter, cond: Value, scores: Value) -> bool:
    """True when ``cond`` keeps key j for query i exactly when j <= i, computed the way
    exporters build a causal mask from the sequence length (torch's ``arange`` compared with
    itself transposed)::

        r = range(start, stop, 1)                           [S]
        cond = less_or_equal(unsqueeze(r, [0]), unsqueeze(r, [1]))    [S, S]
               (or greater_or_equal with the operands swapped; r may be two ranges of the
               same start, stop and step)

    and the scores are [.., S, S] (queries and keys the same S positions, so j <= i is the
    bottom-right-aligned causal limit j <= i + Skv - Sq). S is the ranges' static length or,
    for range(0, shape(X)[k], 1), X's dim k (``_range_lengths``)."""
    node = producer_of(cond, "less_or_equal")
    if node is not None:
        j, i = node.operands
    else:
        node = producer_of(cond, "greater_or_equal")
        if node is None:
            return False
        i, j = node.operands
    uj, ui = producer_of(j, "unsqueeze"), producer_of(i, "unsqueeze")
    if uj is None or ui is None or not _same_range(rw, uj.operands[0], ui.operands[0]):
        return False
    if list(uj.attrs["axes"]) not in ([0], [-2]) or list(ui.attrs["axes"]) not in ([1], [-1]):
        return False
    rng = producer_of(uj.operands[0], "range")
    if rng is None or rng.result.type.rank != 1:
        return False
    if _int_constant(rw, rng.operands[2]) != 1:
        return False
    sq, skv = scores.type.shape[-2:]
    # (cond is [S, S] by construction: its two dims are the ranges')
    return sq == skv and sq in _range_lengths(rw, rng) and cond.type.rank >= 2 \
        and all(d == 1 for d in cond.type.shape[:-2])


def _keys_against_shifted_rows(rw: Rewriter, cond: Value) -> tuple:
    """(the keys' range, the add of the shifted query rows) when ``cond`` is
    less_or_equal(unsqueeze(range(0, stop, 1), [0]), add(rows, x)), else (None, None)."""
    node = producer_of(cond, "less_or_equal")
    if node is None:
        return None, None
    j, i = node.operands
    uj, shifted = producer_of(j, "unsqueeze"), producer_of(i, "add")
    if uj is None or shifted is None or list(uj.attrs["axes"]) not in ([0], [-2]):
        return None, None
    keys = producer_of(uj.operands[0], "range")
    if keys is None or _int_constant(rw, keys.operands[0]) != 0 \
            or _int_constant(rw, keys.operands[2]) != 1:
        return None, None
    return keys, shifted


def _causal_over_cache(rw: Rewriter, cond: Value, scores: Value) -> bool:
    """True when ``cond`` keeps key j for query i exactly when j <= i + x, x = Skv - Sq: the
    mask of a step over a KV cache of x positions, as exporters build it from the cache length
    x (torch's ``cache_position``)::

        r = range(0, x + Sq, 1)                                         [Skv]
        cond = less_or_equal(unsqueeze(r, [0]), add([[0], .., [Sq - 1]], x))   [Sq, Skv]

    with Sq static (a decode step: 1) and x a scalar."""
    rng, shifted = _keys_against_shifted_rows(rw, cond)
    sq, skv = scores.type.shape[-2:]
    if rng is None or not isinstance(sq, int) or rng.result.type.shape != (skv,):
        return False
    for rows, x in (shifted.operands, shifted.operands[::-1]):
        c = rw.const(rows)
        if c is not None and x.type.rank == 0 and np.asarray(c).shape == (sq, 1) \
                and np.array_equal(np.asarray(c).reshape(-1), np.arange(sq)):
            break
    else:
        return False
    stop = producer_of(rng.operands[1], "add")  # x + Sq
    return stop is not None and any(a is x and _int_constant(rw, b) == sq
                                    for a, b in (stop.operands, stop.operands[::-1])) \
        and tuple(cond.type.shape[-2:]) == (sq, skv) and all(d == 1 for d in cond.type.shape[:-2])


def _causal_over_cache_of_any_length(rw: Rewriter, cond: Value, scores: Value) -> bool:
    """``_causal_over_cache`` with the number of new tokens s a dim of the inputs, as
    torch.onnx exports a decode step whose sequence length is dynamic::

        r = range(0, x + s, 1)                                        [x + s]
        cond = less_or_equal(unsqueeze(r, [0]), add(unsqueeze(range(0, s, 1), [1]), x))

    s and x scalars read from shapes (s = gather(shape(input_ids), 1), x the cache's length
    from past's shape), every range typed with a fresh symbol. Kept: j <= i + x. It is the
    causal limit j <= i + Skv - Sq when Sq = s (the queries' dim is the one s reads) and
    Skv = x + s: the keys' dim is a concat, along its axis, of a dim equal to x's and one
    equal to s's (the cache and the new keys; ``_concat_parts``)."""
    keys, shifted = _keys_against_shifted_rows(rw, cond)
    if keys is None:
        return False
    sq, skv = scores.type.shape[-2:]
    for rows, x in (shifted.operands, shifted.operands[::-1]):
        ur = producer_of(rows, "unsqueeze")
        queries = producer_of(ur.operands[0], "range") if ur is not None else None
        if queries is None or list(ur.attrs["axes"]) not in ([1], [-1]) or x.type.rank != 0:
            continue
        s = queries.operands[1]
        stop = producer_of(keys.operands[1], "add")  # x + s
        x_dim, s_dim = _shape_dim(rw, x), _stop_dim(rw, queries)
        if stop is None or {id(v) for v in stop.operands} != {id(x), id(s)} \
                or x_dim is None or s_dim is None or s_dim != sq:
            continue
        return sorted(map(str, (x_dim, s_dim))) in _concat_parts(rw, skv)
    return False


def _concat_parts(rw: Rewriter, dim) -> list:
    """For each concat in the function whose result has ``dim`` along its axis, the dims of
    its two operands there (as sorted strings): what ``dim`` is known to be the sum of."""
    parts = []
    for n in rw.fn.nodes:
        if n.op != "concat" or len(n.operands) != 2:
            continue
        shape = n.result.type.shape
        axis = n.attrs.get("axis", 0) % len(shape) if shape else 0
        if shape and shape[axis] == dim and not isinstance(dim, int):
            parts.append(sorted(str(v.type.shape[axis]) for v in n.operands))
    return parts


def _hides(fill: float, dtype) -> bool:
    """Whether an additive fill hides a key: at or below -1e30, or in a narrow float mask the
    lowest finite value of its type (torch's ``finfo(dtype).min``: f16 -65504, what an f32
    -3.4e38 fill becomes under compute-dtype). The scores are float32 in the kernels and the
    reference alike, so exp(score - 65504 - row max) is 0 unless a hidden key's score beat
    the row's by over 65000, more than an f16 score can."""
    return fill <= _HIDDEN or fill <= float(np.finfo(dtype.np_dtype).min)


def _causal_computed(rw: Rewriter, mask: Value, scores: Value) -> bool:
    """True when an additive mask is where(causal condition, 0, a fill that hides)."""
    where = producer_of(mask, "where")
    if where is None:
        return False
    cond, zero, fill = where.operands
    kept, hidden = _scalar(rw, zero), _scalar(rw, fill)
    return kept == 0 and hidden is not None and _hides(hidden, fill.type.dtype) \
        and tuple(mask.type.shape[-2:]) == tuple(cond.type.shape[-2:]) \
        and all(d == 1 for d in mask.type.shape[:-2]) \
        and (_causal_condition(rw, cond, scores) or _causal_over_cache(rw, cond, scores)
             or _causal_over_cache_of_any_length(rw, cond, scores))


class FuseAttention(RewritePattern):
    op = "matmul"

    def __init__(self):
        self.additive_masks: dict = {}

    def rewrite(self, node, rw):
        probs, v = node.operands
        probs, nan_guard = _without_nan_guard(rw, probs)
        softmax = producer_of(probs, "softmax")
        if softmax is None or not (nan_guard or rw.single_use(probs)) or v.type.rank != 4:
            return False
        if softmax.attrs["axis"] not in (-1, probs.type.rank - 1):
            return False
        scores = softmax.operands[0]
        if not rw.single_use(scores):
            return False
        mask, causal, scores = self._mask(rw, scores)
        if scores is None or nan_guard and not _finite_mask(rw, mask):
            return False
        scale, scores = self._scale(rw, scores)
        qk = producer_of(scores, "matmul")
        if qk is None or not rw.single_use(qk.result):
            return False
        q, kt = qk.operands
        if q.type.rank != 4 or kt.type.rank != 4:
            return False
        q, q_scale = _scaled_operand(rw, q)
        kt, k_scale = _scaled_operand(rw, kt)
        k = _shared_heads(rw, _untransposed(rw, kt, node))
        v = _shared_heads(rw, v)
        attrs = {"scale": float(scale * q_scale * k_scale), "causal": int(causal)}
        types = [q.type, k.type, v.type]
        try:
            if isinstance(mask, tuple):  # a boolean mask: where(keep, 0, fill), made below
                keep, fill = mask
                types.append(fill.type.with_shape(broadcast_shapes(keep.type.shape,
                                                                   fill.type.shape)))
            elif mask is not None:
                types.append(mask.type)
            inferred = infer_types("attention", types, attrs, [None] * 4)[0]
        except TypeInferenceError:
            return False  # e.g. k and v repeat heads differently; a new transpose dies unused
        if inferred.dtype != node.result.type.dtype or inferred.rank != 4:
            return False
        if isinstance(mask, tuple):
            mask = self._additive(rw, *mask, before=node)
        operands = [q, k, v] + ([mask] if mask is not None else [])
        fused = rw.create("attention", operands, attrs, before=node, hint="attention",
                          result_types=[node.result.type])
        rw.replace(node, [fused.result])
        return True

    def _additive(self, rw: Rewriter, keep: Value, fill: Value, before) -> Value:
        """where(keep, 0, fill), made once per mask (the layers of a model share it)."""
        key = (keep, _scalar(rw, fill), str(fill.type.dtype))
        if key not in self.additive_masks:
            zero = rw.constant(np.zeros((), fill.type.dtype.np_dtype), fill.type.with_shape(()),
                               before=before, hint="attn_mask_zero")
            self.additive_masks[key] = rw.create("where", [keep, zero, fill], before=before,
                                                 hint="attn_mask").result
        return self.additive_masks[key]

    def _mask(self, rw: Rewriter, scores: Value):
        """(mask, causal, the scores before masking), or (.., .., None) when nothing matches.
        mask: None, an additive float value, or (keep, fill) of a boolean where."""
        add = producer_of(scores, "add")
        if add is not None:
            for s, m in (add.operands, add.operands[::-1]):
                if _reaches_qk(rw, s) and rw.single_use(s) and m.type.dtype.is_float:
                    if _causal_constant(rw, m, keep=False) or _causal_computed(rw, m, s):
                        return None, True, s
                    return m, False, s
            return None, False, None
        where = producer_of(scores, "where")
        if where is not None:
            keep, s, fill = where.operands
            hidden = _scalar(rw, fill)
            if hidden is None or hidden > _HIDDEN or not _reaches_qk(rw, s) \
                    or not rw.single_use(s):
                return None, False, None
            if _causal_constant(rw, keep, keep=True) or _causal_condition(rw, keep, s) \
                    or _causal_over_cache(rw, keep, s) \
                    or _causal_over_cache_of_any_length(rw, keep, s):
                return None, True, s
            return (keep, fill), False, s
        return None, False, scores

    def _scale(self, rw: Rewriter, scores: Value) -> tuple[float, Value]:
        """(scale, q kᵀ) from scores = mul(q kᵀ, c) | mul(c, q kᵀ) | div(q kᵀ, c) | q kᵀ."""
        node = scores.producer
        if node is None or node.op not in ("mul", "div"):
            return 1.0, scores
        pairs = [node.operands] if node.op == "div" else [node.operands, node.operands[::-1]]
        for s, c in pairs:
            value = _scalar(rw, c)
            if value is not None and producer_of(s, "matmul") is not None and rw.single_use(s):
                return (1.0 / value if node.op == "div" else value), s
        return 1.0, scores


def _without_nan_guard(rw: Rewriter, probs: Value) -> tuple[Value, bool]:
    """(p, True) when probs = where(isnan(p), 0, p) (torch's ONNX export of SDPA), else
    (probs, False)."""
    where = producer_of(probs, "where")
    if where is None or not rw.single_use(probs):
        return probs, False
    cond, zero, p = where.operands
    isnan = producer_of(cond, "isnan")
    if isnan is None or isnan.operands[0] is not p or _scalar(rw, zero) != 0.0:
        return probs, False
    if len(rw.users.get(p, [])) != 2 or not rw.single_use(cond):
        return probs, False
    return p, True


def _finite_mask(rw: Rewriter, mask) -> bool:
    """The mask cannot hide a whole row with -inf (so softmax gives no NaN to guard against):
    none, or where(keep, a, b) of finite scalar constants."""
    if mask is None:
        return True
    if isinstance(mask, tuple):
        fill = _scalar(rw, mask[1])
        return fill is not None and np.isfinite(fill)
    where = producer_of(mask, "where")
    if where is None:
        return False
    values = [_scalar(rw, v) for v in where.operands[1:]]
    return all(x is not None and np.isfinite(x) for x in values)


def _reaches_qk(rw: Rewriter, v: Value) -> bool:
    """v is q kᵀ, possibly scaled by a scalar constant (tells the scores from the mask)."""
    if producer_of(v, "matmul") is not None:
        return True
    node = v.producer
    if node is None or node.op not in ("mul", "div"):
        return False
    pairs = [node.operands] if node.op == "div" else [node.operands, node.operands[::-1]]
    return any(producer_of(s, "matmul") is not None and _scalar(rw, c) is not None
               for s, c in pairs)


@register_pass("fuse-attention")
@dataclass
class FuseAttentionPass(Pass):
    """Decomposed attention (q kᵀ, scale, mask, softmax, · v; shared kv heads) → one attention op."""

    def run(self, module: Module) -> Module:
        fused = apply_patterns(module, [FuseAttention()])
        record_stat(module, self.name, attention=fused)
        return module
