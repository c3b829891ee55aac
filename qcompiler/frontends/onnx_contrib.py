"""onnxruntime's com.microsoft contrib ops, as its transformer optimizer and GenAI model builder
write them, lowered onto existing QIR ops.

Imported at the end of ``qcompiler.frontends.onnx``, whose handler table these importers join.
Semantics follow onnxruntime's CPU kernels (1.31; its contrib op docs), checked against
onnxruntime on single-node models in tests/test_onnx_contrib.py:

- norms: SkipLayerNormalization, SkipSimplifiedLayerNormalization (the sum ``input + skip +
  bias`` is output 3), SimplifiedLayerNormalization (both domains; onnxruntime registers it in
  the ONNX domain) → add + ``layernorm`` / ``rmsnorm``;
- activations: FastGelu (tanh GELU of x + bias), BiasGelu (erf GELU of a + b), QuickGelu
  (x * sigmoid(alpha * x));
- attention: RotaryEmbedding (com.microsoft), GroupQueryAttention (KV cache written at each
  row's position), MultiHeadAttention, Attention → the fused ``attention`` op;
- EmbedLayerNormalization → gathers + ``layernorm`` (+ the mask index);
- integer forms: DynamicQuantizeMatMul and MatMulIntegerToFloat → the
  dynamic_quantize/matmul_integer/cast/mul graph that ``fuse-dequant`` turns into
  ``qmatmul{act=dynamic}``; QLinearMul → dequantize, mul, quantize (as QLinearAdd);
  QLinearGlobalAveragePool / QLinearAveragePool → dequantize, reduce_mean / pool, quantize
  (QLinearConv is imported in onnx.py, issue #15).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from qcompiler.frontends.onnx import _handles, _inputs
from qcompiler.ir import QuantScheme, TensorType, elem
from qcompiler.ir.core import Value

MS = "com.microsoft"


# -- small builders ------------------------------------------------------------------------


def _e(imp, op: str, operands: list, attrs: Optional[dict] = None,
       name: Optional[str] = None) -> Value:
    """One QIR node with one result; ``name`` binds it to an ONNX output."""
    return imp.emit(op, operands, attrs, names=[name] if name else None)[0]


def _i64(imp, values, hint: str = "c") -> Value:
    arr = np.asarray(values, np.int64)
    return imp.add_constant(arr, TensorType(arr.shape, elem("i64")), hint)


def _scalar(imp, value: float, dtype, hint: str = "c") -> Value:
    return imp.add_constant(np.array(value, dtype.np_dtype), TensorType((), dtype), hint)


def _slice_last(imp, x: Value, start: int, end: int, step: int = 1) -> Value:
    return _e(imp, "slice", [x, _i64(imp, [start]), _i64(imp, [end]), _i64(imp, [-1]),
                             _i64(imp, [step])])


def _out(n, i: int) -> Optional[str]:
    return n.output[i] if len(n.output) > i and n.output[i] else None


def _pad(xs: list, count: int) -> list:
    return xs + [None] * (count - len(xs))


def _static_dim(imp, v: Value, axis: int, what: str) -> int:
    d = v.type.shape[axis]
    if not isinstance(d, int):
        raise imp.fail(f"{what} (dim {axis} of {list(v.type.shape)}) must be static")
    return d


def _dim(imp, x: Value, axis: int) -> Value:
    """Dim ``axis`` of x as an i64 scalar (from ``shape`` when symbolic)."""
    d = x.type.shape[axis]
    if isinstance(d, int):
        return _i64(imp, d, "dim")
    s = _e(imp, "shape", [x], {"start": axis % x.type.rank, "end": axis % x.type.rank + 1})
    return _e(imp, "squeeze", [s], {"axes": [0]})


# -- norms ---------------------------------------------------------------------------------


def _skip_sum(imp, n, x, skip, bias):
    s = _e(imp, "add", [x, skip])
    if bias is not None:
        s = _e(imp, "add", [s, bias])
    if _out(n, 3):
        s = _e(imp, "identity", [s], name=_out(n, 3))
    return s


def _no_stats(imp, n, indices):
    for i in indices:
        if _out(n, i):
            raise imp.fail(f"output #{i} ({n.output[i]!r}, mean / inv_std_var) is not supported")


@_handles("SkipLayerNormalization", domain=MS)
def _skip_layernorm(imp, n, attrs):
    x, skip, gamma, beta, bias = _pad(_inputs(imp, n), 5)
    _no_stats(imp, n, (1, 2))
    s = _skip_sum(imp, n, x, skip, bias)
    _e(imp, "layernorm", [s, gamma, beta],
       {"axis": -1, "epsilon": float(attrs.get("epsilon", 1e-12))}, name=_out(n, 0))


@_handles("SkipSimplifiedLayerNormalization", domain=MS)
def _skip_simplified_layernorm(imp, n, attrs):
    x, skip, gamma, bias = _pad(_inputs(imp, n), 4)
    _no_stats(imp, n, (1, 2))
    s = _skip_sum(imp, n, x, skip, bias)
    _e(imp, "rmsnorm", [s, gamma], {"axis": -1, "epsilon": float(attrs.get("epsilon", 1e-12))},
       name=_out(n, 0))


@_handles("SimplifiedLayerNormalization")  # onnxruntime registers it in the ONNX domain
def _simplified_layernorm(imp, n, attrs):
    x, scale = _inputs(imp, n)[:2]
    _no_stats(imp, n, (1,))
    if attrs.get("stash_type", 1) != 1:
        raise imp.fail("stash_type other than 1 (float32) is not supported")
    _e(imp, "rmsnorm", [x, scale], {"axis": int(attrs.get("axis", -1)),
                                    "epsilon": float(attrs.get("epsilon", 1e-5))},
       name=_out(n, 0))


# -- activations ---------------------------------------------------------------------------


@_handles("FastGelu", domain=MS)
def _fast_gelu(imp, n, attrs):
    x, bias = _pad(_inputs(imp, n), 2)[:2]
    if bias is not None:
        x = _e(imp, "add", [x, bias])
    _e(imp, "gelu", [x], {"approximate": "tanh"}, name=_out(n, 0))


@_handles("BiasGelu", domain=MS)
def _bias_gelu(imp, n, attrs):
    a, b = _inputs(imp, n)[:2]
    _e(imp, "gelu", [_e(imp, "add", [a, b])], name=_out(n, 0))


@_handles("QuickGelu", domain=MS)
def _quick_gelu(imp, n, attrs):
    x = _inputs(imp, n)[0]
    alpha = float(attrs.get("alpha", 1.702))
    ax = _e(imp, "mul", [x, _scalar(imp, alpha, x.type.dtype, "alpha")])
    _e(imp, "mul", [x, _e(imp, "sigmoid", [ax])], name=_out(n, 0))


# -- rotary embedding ----------------------------------------------------------------------


def _rotate(imp, x: Value, cos: Value, sin: Value, interleaved: bool) -> Value:
    """RoPE over x's last dim d (= 2 * cos's last dim); cos/sin broadcast against x[..., :d/2].

    Halves (x1 = x[:d/2], x2 = x[d/2:]) or interleaved pairs (x[2i], x[2i+1]) rotate as
    (x1 cos - x2 sin, x2 cos + x1 sin).
    """
    d = _static_dim(imp, x, -1, "the rotated head size")
    if interleaved:
        x1, x2 = _slice_last(imp, x, 0, d, 2), _slice_last(imp, x, 1, d, 2)
    else:
        x1, x2 = _slice_last(imp, x, 0, d // 2), _slice_last(imp, x, d // 2, d)
    o1 = _e(imp, "sub", [_e(imp, "mul", [x1, cos]), _e(imp, "mul", [x2, sin])])
    o2 = _e(imp, "add", [_e(imp, "mul", [x2, cos]), _e(imp, "mul", [x1, sin])])
    if not interleaved:
        return _e(imp, "concat", [o1, o2], {"axis": -1})
    pairs = _e(imp, "concat", [_e(imp, "unsqueeze", [o], {"axes": [-1]}) for o in (o1, o2)],
               {"axis": -1})                                    # [..., d/2, 2]
    return _e(imp, "reshape", [pairs, _i64(imp, [0] * (x.type.rank - 1) + [d])])


def _rotary_bsnh(imp, x: Value, positions: Value, cos_cache: Value, sin_cache: Value,
                 interleaved: bool, rotary_dim: int) -> Value:
    """x [B, S, N, H] rotated at ``positions`` [B, S] (or [1, S]) over its first rotary_dim."""
    head = _static_dim(imp, x, -1, "head size")
    cos = _e(imp, "unsqueeze", [_e(imp, "gather", [cos_cache, positions], {"axis": 0})],
             {"axes": [2]})                                     # [B, S, 1, rd/2]
    sin = _e(imp, "unsqueeze", [_e(imp, "gather", [sin_cache, positions], {"axis": 0})],
             {"axes": [2]})
    if rotary_dim == head:
        return _rotate(imp, x, cos, sin, interleaved)
    rot = _rotate(imp, _slice_last(imp, x, 0, rotary_dim), cos, sin, interleaved)
    return _e(imp, "concat", [rot, _slice_last(imp, x, rotary_dim, head)], {"axis": -1})


def _rotary_dim(imp, cos_cache: Value, attr: int) -> int:
    half = _static_dim(imp, cos_cache, -1, "cos_cache's last dim")
    if attr and attr != 2 * half:
        raise imp.fail(f"rotary_embedding_dim={attr} but cos_cache holds {half} = dim / 2")
    return 2 * half


@_handles("RotaryEmbedding", domain=MS)
def _rotary_embedding(imp, n, attrs):
    """input [B, S, N*H] (num_heads given or H = rotary dim) or [B, N, S, H]; position_ids
    [B, S], or [1] holding the offset of position 0."""
    x, pos, cos_cache, sin_cache = _inputs(imp, n)[:4]
    if attrs.get("is_packed_batching", 0):
        raise imp.fail("is_packed_batching=1 is not supported")
    if float(attrs.get("scale", 1.0)) != 1.0:
        raise imp.fail("scale other than 1.0 is not supported (onnxruntime ignores it too)")
    if x.type.rank not in (3, 4):
        raise imp.fail(f"input must be 3-D or 4-D, not {list(x.type.shape)}")
    rd = _rotary_dim(imp, cos_cache, int(attrs.get("rotary_embedding_dim", 0)))
    if x.type.rank == 4:
        bsnh = _e(imp, "transpose", [x], {"perm": [0, 2, 1, 3]})
        seq_axis = 2
    else:
        heads = int(attrs.get("num_heads", 0))
        hidden = _static_dim(imp, x, -1, "hidden size")
        head = hidden // heads if heads else rd
        if head * (hidden // head) != hidden:
            raise imp.fail(f"hidden size {hidden} is not a multiple of the head size {head}")
        bsnh = _e(imp, "reshape", [x, _i64(imp, [0, 0, hidden // head, head])])
        seq_axis = 1
    if pos.type.rank == 1:
        # One offset: positions offset + [0, S).
        seq = _dim(imp, x, seq_axis)
        steps = _e(imp, "range", [_i64(imp, 0), seq, _i64(imp, 1)])
        pos = _e(imp, "unsqueeze", [_e(imp, "add", [steps, _e(imp, "cast", [pos],
                                                                {"to": elem("i64")})])],
                 {"axes": [0]})
    y = _rotary_bsnh(imp, bsnh, pos, cos_cache, sin_cache, bool(attrs.get("interleaved", 0)), rd)
    if x.type.rank == 4:
        _e(imp, "transpose", [y], {"perm": [0, 2, 1, 3]}, name=_out(n, 0))
    else:
        _e(imp, "reshape", [y, _i64(imp, [0, 0, -1])], name=_out(n, 0))


# -- attention -----------------------------------------------------------------------------


def _heads(imp, x: Value, heads: int, what: str) -> Value:
    """[B, S, N*H] → [B, N, S, H]."""
    hidden = _static_dim(imp, x, -1, f"{what} hidden size")
    if hidden % heads:
        raise imp.fail(f"{what} hidden size {hidden} is not a multiple of {heads} heads")
    x = _e(imp, "reshape", [x, _i64(imp, [0, 0, heads, hidden // heads])])
    return _e(imp, "transpose", [x], {"perm": [0, 2, 1, 3]})


def _merge_heads(imp, y: Value, name: Optional[str]) -> Value:
    """[B, N, S, H] → [B, S, N*H]."""
    t = _e(imp, "transpose", [y], {"perm": [0, 2, 1, 3]})
    return _e(imp, "reshape", [t, _i64(imp, [0, 0, -1])], name=name)


def _scale(attrs, head: int) -> float:
    s = float(attrs.get("scale", 0.0))
    return s if s else 1.0 / float(np.sqrt(head))


def _additive(imp, allowed: Value, dtype, masked_value: float) -> Value:
    """bool ``allowed`` → 0 where true, ``masked_value`` where false (of ``dtype``)."""
    return _e(imp, "where", [allowed, _scalar(imp, 0.0, dtype, "zero"),
                             _scalar(imp, masked_value, dtype, "masked")])


@_handles("GroupQueryAttention", domain=MS)
def _group_query_attention(imp, n, attrs):
    """onnxruntime's CPU GroupQueryAttention, KV cache included.

    Row b holds ``seqlens_k[b] + 1`` tokens in total; its past length is 0 for the first
    prompt (S == total_sequence_length), else ``seqlens_k[b] + 1 - S``. present is past with
    the S new tokens written from that row's past length on (past's first P positions
    followed by the new ones when all rows are full: the GenAI builder's CPU models, past
    ``past_sequence_length`` long, present ``total_sequence_length``); its positions after a
    shorter row's tokens are left as in concat(past, new) (onnxruntime leaves them
    unwritten). Query i of row b sees keys j <= past_b + i (and j > past_b + i -
    local_window_size when a window is set); with do_rotary, q and k rotate at positions
    past_b + i.
    """
    xs = _pad(_inputs(imp, n), 16)
    q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache = xs[:9]
    for i, what in ((9, "position_ids"), (10, "attention_bias"), (11, "head_sink"),
                    (12, "k_scale"), (13, "v_scale"), (14, "q_norm_weight"),
                    (15, "k_norm_weight")):
        if xs[i] is not None:
            raise imp.fail(f"input {what} is not supported")
    # The values that keep plain softmax attention over a float cache (-1: unset).
    for attr, ok in (("softcap", (0.0,)), ("smooth_softmax", (-1, 0)), ("qk_output", (0,)),
                     ("kv_cache_bit_width", (0,)), ("sliding_window_cache", (0,))):
        if attrs.get(attr, ok[0]) not in ok:
            raise imp.fail(f"attribute {attr}={attrs[attr]} is not supported")
    for attr in ("k_quant_type", "v_quant_type"):
        if attrs.get(attr, b"NONE") not in (b"NONE", "NONE"):
            raise imp.fail(f"attribute {attr}={attrs[attr]} is not supported")
    if _out(n, 3):
        raise imp.fail("output output_qk is not supported")
    if int(attrs.get("causal", 1)) != 1:
        raise imp.fail("causal=0 is not supported")
    heads, kv_heads = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
    if (past_k is None) != (past_v is None):
        raise imp.fail("past_key and past_value must be given together")
    dtype = q.type.dtype
    if k is None:
        # Packed QKV: [B, S, (N + 2 * KV) * H].
        total_hidden = _static_dim(imp, q, -1, "packed QKV hidden size")
        head = total_hidden // (heads + 2 * kv_heads)
        q, k, v = imp.emit("split", [q], {"axis": -1, "sizes": [heads * head, kv_heads * head,
                                                               kv_heads * head]},
                           n_results=3)
    head = _static_dim(imp, q, -1, "query hidden size") // heads
    seq = _dim(imp, q, 1)
    # Each row's past length (i64 [B]).
    seqlens = _e(imp, "cast", [seqlens_k], {"to": elem("i64")})
    first_prompt = _e(imp, "equal", [_e(imp, "cast", [total_len], {"to": elem("i64")}), seq])
    past_len = _e(imp, "where", [first_prompt, _i64(imp, 0),
                                 _e(imp, "sub", [_e(imp, "add", [seqlens, _i64(imp, 1)]), seq])])
    steps = _e(imp, "range", [_i64(imp, 0), seq, _i64(imp, 1)])          # [S]
    q_pos = _e(imp, "add", [_e(imp, "unsqueeze", [past_len], {"axes": [1]}), steps])  # [B, S]
    q4 = _e(imp, "reshape", [q, _i64(imp, [0, 0, heads, head])])         # [B, S, N, H]
    k4 = _e(imp, "reshape", [k, _i64(imp, [0, 0, kv_heads, head])])
    v4 = _e(imp, "reshape", [v, _i64(imp, [0, 0, kv_heads, head])])
    if attrs.get("do_rotary", 0):
        if cos_cache is None or sin_cache is None:
            raise imp.fail("do_rotary=1 needs cos_cache and sin_cache")
        rd = _rotary_dim(imp, cos_cache, 0)
        inter = bool(attrs.get("rotary_interleaved", 0))
        q4 = _rotary_bsnh(imp, q4, q_pos, cos_cache, sin_cache, inter, rd)
        k4 = _rotary_bsnh(imp, k4, q_pos, cos_cache, sin_cache, inter, rd)
    perm = {"perm": [0, 2, 1, 3]}
    qh, kh, vh = (_e(imp, "transpose", [t], perm) for t in (q4, k4, v4))
    if past_k is None:
        present_k, present_v = kh, vh
        if _out(n, 1):
            present_k = _e(imp, "identity", [kh], name=_out(n, 1))
        if _out(n, 2):
            present_v = _e(imp, "identity", [vh], name=_out(n, 2))
    else:
        # Write the new tokens at each row's position: present[b, :, t] = cat[b, :, src[b, t]]
        # over cat = concat(past, new), src = P + t - past_b inside [past_b, past_b + S).
        p_len = _dim(imp, past_k, 2)
        cat_k = _e(imp, "concat", [past_k, kh], {"axis": 2})
        cat_v = _e(imp, "concat", [past_v, vh], {"axis": 2})
        t = _e(imp, "range", [_i64(imp, 0), _e(imp, "add", [p_len, seq]), _i64(imp, 1)])
        t_b = _e(imp, "unsqueeze", [t], {"axes": [0]})                      # [1, T]
        pb = _e(imp, "unsqueeze", [past_len], {"axes": [1]})                # [B, 1]
        rel = _e(imp, "sub", [t_b, pb])                                     # t - past_b
        inside = _e(imp, "and", [_e(imp, "greater_or_equal", [rel, _i64(imp, 0)]),
                                 _e(imp, "less", [rel, seq])])
        src = _e(imp, "where", [inside, _e(imp, "add", [rel, p_len]), t_b])     # [B, T]
        src4 = _e(imp, "unsqueeze", [src], {"axes": [1, 3]})                # [B, 1, T, 1]
        idx = _e(imp, "expand", [src4, _e(imp, "shape", [cat_k])])
        present_k = _e(imp, "gather_elements", [cat_k, idx], {"axis": 2}, name=_out(n, 1))
        present_v = _e(imp, "gather_elements", [cat_v, idx], {"axis": 2}, name=_out(n, 2))
    # Key j is visible to query i of row b when j <= past_b + i (and inside the window).
    kv_len = _dim(imp, present_k, 2)
    j = _e(imp, "reshape", [_e(imp, "range", [_i64(imp, 0), kv_len, _i64(imp, 1)]),
                            _i64(imp, [1, 1, 1, -1])])                      # [1, 1, 1, T]
    qp = _e(imp, "unsqueeze", [q_pos], {"axes": [1, 3]})                    # [B, 1, S, 1]
    allowed = _e(imp, "less_or_equal", [j, qp])
    window = int(attrs.get("local_window_size", -1))
    if window >= 0:
        # onnxruntime's window holds local_window_size keys, the query's own included.
        lo = _e(imp, "sub", [qp, _i64(imp, window - 1)])
        allowed = _e(imp, "and", [allowed, _e(imp, "greater_or_equal", [j, lo])])
    mask = _additive(imp, allowed, dtype, float(np.finfo(dtype.np_dtype).min))
    y = _e(imp, "attention", [qh, present_k, present_v, mask],
           {"scale": _scale(attrs, head), "causal": 0})
    _merge_heads(imp, y, _out(n, 0))


@_handles("MultiHeadAttention", domain=MS)
def _multi_head_attention(imp, n, attrs):
    """query [B, S, D], key/value [B, L, D] (optionally with a [3D] bias), key_padding_mask
    [B, L] or [B, T] (0 masks, adding mask_filter_value), attention_bias [B|1, N|1, S, T],
    past_key/past_value [B, N, P, H] concatenated before the new keys; unidirectional makes
    it causal."""
    xs = _pad(_inputs(imp, n), 10)
    q, k, v, bias, kpm, attn_bias, past_k, past_v, past_len, cache_ind = xs
    if past_len is not None or cache_ind is not None:
        raise imp.fail("past_sequence_length / cache_indirection (beam search) are not supported")
    if _out(n, 3):
        raise imp.fail("output qk is not supported")
    if q.type.rank != 3 or k is None or v is None or k.type.rank != 3 or v.type.rank != 3:
        raise imp.fail("only 3-D query, key and value are supported (not packed or BNSH forms)")
    heads = int(attrs["num_heads"])
    hidden_q = _static_dim(imp, q, -1, "query hidden size")
    hidden_v = _static_dim(imp, v, -1, "value hidden size")
    if bias is not None:
        hidden_k = _static_dim(imp, k, -1, "key hidden size")
        bq, bk, bv = imp.emit("split", [bias], {"axis": 0,
                                                "sizes": [hidden_q, hidden_k, hidden_v]},
                              n_results=3)
        q, k, v = (_e(imp, "add", [a, b]) for a, b in ((q, bq), (k, bk), (v, bv)))
    qh, kh, vh = _heads(imp, q, heads, "query"), _heads(imp, k, heads, "key"), \
        _heads(imp, v, heads, "value")
    if (past_k is None) != (past_v is None):
        raise imp.fail("past_key and past_value must be given together")
    if past_k is not None:
        kh = _e(imp, "concat", [past_k, kh], {"axis": 2})
        vh = _e(imp, "concat", [past_v, vh], {"axis": 2})
    if _out(n, 1):
        kh = _e(imp, "identity", [kh], name=_out(n, 1))
    if _out(n, 2):
        vh = _e(imp, "identity", [vh], name=_out(n, 2))
    mask = None
    filt = float(attrs.get("mask_filter_value", -10000.0))
    if kpm is not None:
        if kpm.type.rank != 2:
            raise imp.fail(f"key_padding_mask of shape {list(kpm.type.shape)} is not supported "
                           "(only [B, T])")
        keep = _e(imp, "unsqueeze", [_e(imp, "cast", [kpm], {"to": elem("bool")})],
                  {"axes": [1, 2]})
        mask = _additive(imp, keep, q.type.dtype, filt)
    if attn_bias is not None:
        mask = attn_bias if mask is None else _e(imp, "add", [mask, attn_bias])
    y = _e(imp, "attention", [qh, kh, vh] + ([mask] if mask is not None else []),
           {"scale": _scale(attrs, hidden_q // heads),
            "causal": int(attrs.get("unidirectional", 0))})
    _merge_heads(imp, y, _out(n, 0))


@_handles("Attention", domain=MS)
def _ms_attention(imp, n, attrs):
    """input [B, S, In] @ weights [In, Dq+Dk+Dv] + bias → q, k, v; mask_index [B] (valid key
    count, right padding), [B, T] or [B, S, T] (0 masks, adding mask_filter_value); past
    [2, B, N, P, H] concatenated before the new keys, present = stack(k, v); unidirectional
    makes it causal."""
    xs = _pad(_inputs(imp, n), 7)
    x, w, bias, mask_index, past, attn_bias, past_len = xs
    if past_len is not None or attrs.get("past_present_share_buffer", 0):
        raise imp.fail("past_present_share_buffer / past_sequence_length are not supported")
    if attrs.get("do_rotary", 0):
        raise imp.fail("do_rotary=1 is not supported")
    heads = int(attrs["num_heads"])
    width = _static_dim(imp, w, 1, "weights' second dim")
    sizes = [int(s) for s in attrs.get("qkv_hidden_sizes", [])] or [width // 3] * 3
    if sum(sizes) != width or sizes[0] != sizes[1]:
        raise imp.fail(f"qkv_hidden_sizes {sizes} do not fit weights of width {width}")
    qkv = _e(imp, "matmul", [x, w])
    if bias is not None:
        qkv = _e(imp, "add", [qkv, bias])
    q, k, v = imp.emit("split", [qkv], {"axis": -1, "sizes": sizes}, n_results=3)
    qh, kh, vh = _heads(imp, q, heads, "q"), _heads(imp, k, heads, "k"), _heads(imp, v, heads, "v")
    if past is not None:
        pk, pv = imp.emit("split", [past], {"axis": 0, "sizes": [1, 1]}, n_results=2)
        kh = _e(imp, "concat", [_e(imp, "squeeze", [pk], {"axes": [0]}), kh], {"axis": 2})
        vh = _e(imp, "concat", [_e(imp, "squeeze", [pv], {"axes": [0]}), vh], {"axis": 2})
    if _out(n, 1):
        if sizes[1] != sizes[2]:
            raise imp.fail("present needs equal k and v hidden sizes")
        _e(imp, "concat", [_e(imp, "unsqueeze", [t], {"axes": [0]}) for t in (kh, vh)],
           {"axis": 0}, name=_out(n, 1))
    filt = float(attrs.get("mask_filter_value", -10000.0))
    dtype = x.type.dtype
    mask = None
    if mask_index is not None:
        r = mask_index.type.rank
        if r == 1:
            if mask_index.type.shape[0] != x.type.shape[0] and \
                    isinstance(mask_index.type.shape[0], int) and \
                    isinstance(x.type.shape[0], int):
                raise imp.fail("1-D mask_index with start positions ([2B]) is not supported")
            kv_len = _dim(imp, kh, 2)
            j = _e(imp, "unsqueeze", [_e(imp, "range", [_i64(imp, 0), kv_len, _i64(imp, 1)])],
                   {"axes": [0]})                                              # [1, T]
            ends = _e(imp, "unsqueeze", [_e(imp, "cast", [mask_index], {"to": elem("i64")})],
                      {"axes": [1]})                                           # [B, 1]
            keep = _e(imp, "unsqueeze", [_e(imp, "less", [j, ends])], {"axes": [1, 2]})
        elif r in (2, 3):
            keep = _e(imp, "cast", [mask_index], {"to": elem("bool")})
            keep = _e(imp, "unsqueeze", [keep], {"axes": [1, 2] if r == 2 else [1]})
        else:
            raise imp.fail(f"mask_index of rank {r} is not supported (1, 2 or 3)")
        mask = _additive(imp, keep, dtype, filt)
    if attn_bias is not None:
        mask = attn_bias if mask is None else _e(imp, "add", [mask, attn_bias])
    y = _e(imp, "attention", [qh, kh, vh] + ([mask] if mask is not None else []),
           {"scale": _scale(attrs, sizes[0] // heads),
            "causal": int(attrs.get("unidirectional", 0))})
    _merge_heads(imp, y, _out(n, 0))


# -- embeddings ----------------------------------------------------------------------------


@_handles("EmbedLayerNormalization", domain=MS)
def _embed_layernorm(imp, n, attrs):
    """LN(word[ids] + position[pos] + segment[seg]) with pos = position_ids or [0, S); the
    mask index (mask_index_type 1) is each row's count of ones in mask (0 without a mask);
    embedding_sum is the sum before the norm."""
    xs = _pad(_inputs(imp, n), 9)
    ids, seg_ids, word, pos_emb, seg_emb, gamma, beta, mask, pos_ids = xs
    if int(attrs.get("mask_index_type", 1)) != 1 and _out(n, 1):
        raise imp.fail(f"mask_index_type={attrs['mask_index_type']} is not supported")
    s = _e(imp, "gather", [word, ids], {"axis": 0})
    if pos_ids is None:
        seq = _dim(imp, ids, 1)
        pos_ids = _e(imp, "range", [_i64(imp, 0), seq, _i64(imp, 1)])
    s = _e(imp, "add", [s, _e(imp, "gather", [pos_emb, pos_ids], {"axis": 0})])
    if seg_ids is not None and seg_emb is not None:
        s = _e(imp, "add", [s, _e(imp, "gather", [seg_emb, seg_ids], {"axis": 0})])
    if _out(n, 2):
        s = _e(imp, "identity", [s], name=_out(n, 2))
    _e(imp, "layernorm", [s, gamma, beta],
       {"axis": -1, "epsilon": float(attrs.get("epsilon", 1e-12))}, name=_out(n, 0))
    if _out(n, 1):
        if mask is None:
            # onnxruntime writes zeros then (its Attention reads a 0 as "no mask").
            zeros = _e(imp, "expand", [_i64(imp, 0), _e(imp, "shape", [ids])])
            count = _e(imp, "reduce_sum", [zeros], {"axes": [1], "keepdims": 0})
        else:
            count = _e(imp, "reduce_sum", [_e(imp, "cast", [mask], {"to": elem("i64")})],
                       {"axes": [1], "keepdims": 0})
        _e(imp, "cast", [count], {"to": elem("i32")}, name=_out(n, 1))


# -- integer forms -------------------------------------------------------------------------


def _integer_to_float(imp, n, a, b, a_scale, b_scale, a_zp, b_zp, bias):
    """float(matmul_integer(a, b, a_zp, b_zp)) * (a_scale * b_scale) (+ bias): the graph that
    fuse-dequant turns into a qmatmul when a comes from dynamic_quantize."""
    zp = imp.const(b_zp) if b_zp is not None else None
    if zp is not None and zp.size == 1 and b_scale.type.rank == 1 and \
            b_scale.type.shape != (1,) and isinstance(b_scale.type.shape[0], int):
        # One zero point for per-column scales: give each column its copy, the per-channel
        # form that fuse-dequant's integer qmatmul takes (same product).
        n_cols = b_scale.type.shape[0]
        b_zp = imp.add_constant(np.full((n_cols,), zp.reshape(()), zp.dtype),
                                TensorType((n_cols,), b_zp.type.dtype), "b_zero_point")
    prod = _e(imp, "matmul_integer", [a, b, a_zp, b_zp])
    f = _e(imp, "cast", [prod], {"to": b_scale.type.dtype})
    y = _e(imp, "mul", [f, _e(imp, "mul", [a_scale, b_scale])],
           name=None if bias is not None else _out(n, 0))
    if bias is not None:
        _e(imp, "add", [y, bias], name=_out(n, 0))


@_handles("DynamicQuantizeMatMul", domain=MS)
def _dynamic_quantize_matmul(imp, n, attrs):
    a, b, b_scale, b_zp, bias = _pad(_inputs(imp, n), 5)
    if b.type.dtype.name not in ("u8", "i8"):
        raise imp.fail(f"B must be u8 or i8, not {b.type.dtype}")
    aq, a_scale, a_zp = imp.emit("dynamic_quantize", [a], n_results=3)
    _integer_to_float(imp, n, aq, b, a_scale, b_scale, a_zp, b_zp, bias)


@_handles("MatMulIntegerToFloat", domain=MS)
def _matmul_integer_to_float(imp, n, attrs):
    a, b, a_scale, b_scale, a_zp, b_zp, bias = _pad(_inputs(imp, n), 7)
    for what, t in (("A", a), ("B", b)):
        if t.type.dtype.name not in ("u8", "i8"):
            raise imp.fail(f"{what} must be u8 or i8, not {t.type.dtype}")
    _integer_to_float(imp, n, a, b, a_scale, b_scale, a_zp, b_zp, bias)


def _per_tensor(dtype, scale: Value, zp: Optional[Value]) -> QuantScheme:
    return QuantScheme(dtype=dtype, scale_type=scale.type.dtype, symmetric=zp is None,
                       zero_point_type=None if zp is None else zp.type.dtype)


@_handles("QLinearMul", domain=MS)
def _qlinear_mul(imp, n, attrs):
    """``C = quantize(dequantize(A) * dequantize(B), C_scale, C_zero_point)``, per tensor."""
    a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp = _pad(_inputs(imp, n), 8)
    if a.type.dtype.name not in ("u8", "i8") or b.type.dtype != a.type.dtype:
        raise imp.fail(f"QLinearMul takes u8 or i8 A and B of one type, not "
                       f"{a.type.dtype} and {b.type.dtype}")
    for what, s in (("A_scale", a_s), ("B_scale", b_s), ("C_scale", c_s)):
        if s.type.shape not in ((), (1,)):
            raise imp.fail(f"QLinearMul {what} must be a scalar, not {s.type.shape}")
    real = [_e(imp, "dequantize", [x, s, zp],
               {"scheme": _per_tensor(x.type.dtype, s, zp), "out": s.type.dtype})
            for x, s, zp in ((a, a_s, a_zp), (b, b_s, b_zp))]
    _e(imp, "quantize", [_e(imp, "mul", real), c_s, c_zp],
       {"scheme": _per_tensor(a.type.dtype, c_s, c_zp)}, name=_out(n, 0))


def _qlinear_pool(imp, n, x, x_s, x_zp, y_s, y_zp, channels_last: bool,
                  pool_attrs: Optional[dict]):
    """quantize(pool(dequantize(x))): the pools of onnxruntime's QOperator CNNs, per tensor.
    channels_last inputs ([N, ..., C]) are pooled as [N, C, ...] and transposed back."""
    if x.type.dtype.name not in ("u8", "i8"):
        raise imp.fail(f"X must be u8 or i8, not {x.type.dtype}")
    for what, s in (("x_scale", x_s), ("y_scale", y_s)):
        if s.type.shape not in ((), (1,)):
            raise imp.fail(f"{what} must be a scalar, not {s.type.shape}")
    rank = x.type.rank
    real = _e(imp, "dequantize", [x, x_s, x_zp],
              {"scheme": _per_tensor(x.type.dtype, x_s, x_zp), "out": x_s.type.dtype})
    if channels_last:
        real = _e(imp, "transpose", [real], {"perm": [0, rank - 1, *range(1, rank - 1)]})
    if pool_attrs is None:
        pooled = _e(imp, "reduce_mean", [real], {"axes": list(range(2, rank)), "keepdims": 1})
    else:
        pooled = _e(imp, "pool", [real], pool_attrs)
    if channels_last:
        pooled = _e(imp, "transpose", [pooled], {"perm": [0, *range(2, rank), 1]})
    _e(imp, "quantize", [pooled, y_s, y_zp], {"scheme": _per_tensor(x.type.dtype, y_s, y_zp)},
       name=_out(n, 0))


@_handles("QLinearGlobalAveragePool", domain=MS)
def _qlinear_global_average_pool(imp, n, attrs):
    x, x_s, x_zp, y_s, y_zp = _pad(_inputs(imp, n), 5)
    _qlinear_pool(imp, n, x, x_s, x_zp, y_s, y_zp, bool(attrs.get("channels_last", 0)), None)


@_handles("QLinearAveragePool", domain=MS)
def _qlinear_average_pool(imp, n, attrs):
    x, x_s, x_zp, y_s, y_zp = _pad(_inputs(imp, n), 5)
    nsp = x.type.rank - 2
    auto = attrs.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
        raise imp.fail("auto_pad other than NOTSET is not supported")
    kernel = [int(k) for k in attrs["kernel_shape"]]
    _qlinear_pool(imp, n, x, x_s, x_zp, y_s, y_zp, bool(attrs.get("channels_last", 0)), {
        "kind": "average", "kernel_shape": kernel,
        "strides": [int(s) for s in attrs.get("strides", [1] * nsp)],
        "pads": [int(p) for p in attrs.get("pads", [0] * (2 * nsp))],
        "dilations": [1] * nsp, "ceil_mode": int(attrs.get("ceil_mode", 0)),
        "count_include_pad": int(attrs.get("count_include_pad", 0)), "p": 2})
