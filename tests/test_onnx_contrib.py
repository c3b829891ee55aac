"""onnxruntime's com.microsoft contrib ops (qcompiler/frontends/onnx_contrib.py, issue #13).

Each case is one node in a model; onnxruntime (CPU, optimizations off so the node runs as
written) is the oracle, fed the same fresh random inputs as our import + the ``ref`` target's
default pipeline (fusion passes included) + the numpy reference runtime.
"""
from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.driver.api import run_pipeline
from qcompiler.errors import QCompilerError
from qcompiler.frontends.onnx import load
from qcompiler.runtime.reference import run
from qcompiler.targets import get_target

MS = "com.microsoft"
F32 = TensorProto.FLOAT
PIPELINE = get_target("ref").default_pipeline
_NP_TO_ONNX = {np.dtype(np.float32): F32, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8, np.dtype(np.float16): TensorProto.FLOAT16}


def single_node(op: str, inputs: dict, inits: dict, outputs: list[str], domain: str = MS,
                **attrs) -> onnx.ModelProto:
    """One node with graph inputs ``inputs`` (name → array, static shapes) and initializers
    ``inits``; the node takes ``list(inputs) + list(inits)`` unless ``_order`` gives the exact
    input list ("" for an absent optional input)."""
    order = attrs.pop("_order", None) or [*inputs, *inits]
    graph_inputs = [helper.make_tensor_value_info(k, _NP_TO_ONNX[v.dtype], list(v.shape))
                    for k, v in inputs.items() if v is not None]
    node = helper.make_node(op, [k if (k in inits or inputs.get(k) is not None) else ""
                                 for k in order], outputs, domain=domain, **attrs)
    outs = [onnx.ValueInfoProto(name=o) for o in outputs if o]
    graph = helper.make_graph([node], "g", graph_inputs, outs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v for k, v in feeds.items() if v is not None})


def ours(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    module, _, _ = run_pipeline(load(model), PIPELINE, verify_each=True)
    return run(module, {k: v for k, v in feeds.items() if v is not None})


def check(model, feeds, rtol=1e-4, atol=1e-5, exact=False):
    expect = ort_run(model, feeds)
    got = ours(model, feeds)
    names = [o.name for o in model.graph.output]
    for name, e in zip(names, expect):
        g = got[name]
        assert g.shape == e.shape, (name, g.shape, e.shape)
        assert g.dtype == e.dtype, (name, g.dtype, e.dtype)
        if exact:
            np.testing.assert_array_equal(g, e, err_msg=name)
        else:
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol, err_msg=name)
    return got


def rnd(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def rng(request):
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and a test's
    # inputs must be the same in every run (test_qlinear_binary failed a CI run on unlucky
    # inputs: 3 of 48 ties rounded apart from onnxruntime, against 2 allowed)
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


# -- norms and activations -----------------------------------------------------------------


@pytest.mark.parametrize("beta,bias,sum_out,skip_shape", [
    (True, True, True, (2, 5, 16)), (False, False, False, (2, 5, 16)),
    (True, False, True, (5, 16)), (True, True, False, (1, 5, 16))])
def test_skip_layernorm(rng, beta, bias, sum_out, skip_shape):
    x, skip = rnd(rng, 2, 5, 16), rnd(rng, *skip_shape)
    inits = {"gamma": rnd(rng, 16)}
    if beta:
        inits["beta"] = rnd(rng, 16)
    if bias:
        inits["bias"] = rnd(rng, 16)
    order = ["x", "skip", "gamma", "beta" if beta else "", "bias" if bias else ""]
    outputs = ["y", "", "", "sum"] if sum_out else ["y"]
    m = single_node("SkipLayerNormalization", {"x": x, "skip": skip}, inits, outputs,
                    _order=order, epsilon=1e-5)
    check(m, {"x": x, "skip": skip})


@pytest.mark.parametrize("bias,sum_out", [(True, True), (False, False)])
def test_skip_simplified_layernorm(rng, bias, sum_out):
    x, skip = rnd(rng, 2, 3, 32), rnd(rng, 2, 3, 32)
    inits = {"gamma": rnd(rng, 32)}
    if bias:
        inits["bias"] = rnd(rng, 32)
    outputs = ["y", "", "", "sum"] if sum_out else ["y"]
    m = single_node("SkipSimplifiedLayerNormalization", {"x": x, "skip": skip}, inits, outputs,
                    epsilon=1e-6)
    check(m, {"x": x, "skip": skip})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_simplified_layernorm(rng, dtype):
    """onnxruntime registers SimplifiedLayerNormalization in the ONNX domain."""
    x = rnd(rng, 3, 4, 24, dtype=dtype)
    m = single_node("SimplifiedLayerNormalization", {"x": x}, {"scale": rnd(rng, 24, dtype=dtype)},
                    ["y"], domain="", epsilon=1e-5, axis=-1)
    tol = 1e-2 if dtype == np.float16 else 1e-5
    check(m, {"x": x}, rtol=tol, atol=tol)


@pytest.mark.parametrize("bias", [True, False])
def test_fast_gelu(rng, bias):
    x = rnd(rng, 2, 7, 20) * 3
    m = single_node("FastGelu", {"x": x}, {"b": rnd(rng, 20)} if bias else {}, ["y"])
    check(m, {"x": x})


def test_bias_gelu(rng):
    x = rnd(rng, 2, 7, 20) * 3
    check(single_node("BiasGelu", {"x": x}, {"b": rnd(rng, 20)}, ["y"]), {"x": x})


@pytest.mark.parametrize("alpha", [None, 1.3])
def test_quick_gelu(rng, alpha):
    x = rnd(rng, 4, 33) * 3
    kw = {} if alpha is None else {"alpha": alpha}
    check(single_node("QuickGelu", {"x": x}, {}, ["y"], **kw), {"x": x})


# -- rotary embedding ----------------------------------------------------------------------


def _caches(rng, max_pos, half):
    ang = rng.uniform(0, 6.3, (max_pos, half)).astype(np.float32)
    return np.cos(ang), np.sin(ang)


@pytest.mark.parametrize("layout,interleaved,offset,partial", [
    ("bsd", 0, False, False), ("bsd", 1, False, False), ("bnsh", 0, False, False),
    ("bnsh", 1, True, False), ("bsd", 0, True, False), ("bsd", 0, False, True),
    ("bnsh", 1, False, True)])
def test_rotary_embedding(rng, layout, interleaved, offset, partial):
    b, s, heads, head = 2, 5, 3, 8
    rd = 4 if partial else head
    cos, sin = _caches(rng, 32, rd // 2)
    x = rnd(rng, b, s, heads * head) if layout == "bsd" else rnd(rng, b, heads, s, head)
    pos = np.array([7], np.int64) if offset else rng.integers(0, 32, (b, s)).astype(np.int64)
    attrs = {"interleaved": interleaved}
    if layout == "bsd":
        attrs["num_heads"] = heads
    if partial:
        attrs["rotary_embedding_dim"] = rd
        attrs["num_heads"] = heads
    m = single_node("RotaryEmbedding", {"x": x, "pos": pos}, {"cos": cos, "sin": sin}, ["y"],
                    **attrs)
    check(m, {"x": x, "pos": pos})


# -- attention -----------------------------------------------------------------------------


def _gqa_model(b, s, heads, kv, head, past, packed, rotary, window=-1, interleaved=0):
    hid_q, hid_kv = heads * head, kv * head
    inputs = [helper.make_tensor_value_info("q", F32, [b, s, hid_q + (2 * hid_kv if packed
                                                                        else 0)])]
    names = ["q", "", ""] if packed else ["q", "k", "v"]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, F32, [b, s, hid_kv]) for n in ("k", "v")]
    inputs += [helper.make_tensor_value_info(n, F32, [b, kv, past, head])
               for n in ("past_k", "past_v")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [b]),
               helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    names += ["past_k", "past_v", "seqlens_k", "total"]
    inits = []
    if rotary:
        names += ["cos", "sin"]
        rng = np.random.default_rng(5)
        cos, sin = _caches(rng, 64, head // 2)
        inits = [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")]
    node = helper.make_node("GroupQueryAttention", names, ["y", "present_k", "present_v"],
                            domain=MS, num_heads=heads, kv_num_heads=kv, do_rotary=int(rotary),
                            rotary_interleaved=interleaved, local_window_size=window)
    outs = [onnx.ValueInfoProto(name=n) for n in ("y", "present_k", "present_v")]
    m = helper.make_model(helper.make_graph([node], "g", inputs, outs, inits),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    m.ir_version = 10
    return m


def _gqa_feeds(rng, b, s, heads, kv, head, past, packed, seqlens):
    hid_q, hid_kv = heads * head, kv * head
    f = {"q": rnd(rng, b, s, hid_q + (2 * hid_kv if packed else 0)),
         "past_k": rnd(rng, b, kv, past, head), "past_v": rnd(rng, b, kv, past, head),
         "seqlens_k": np.asarray(seqlens, np.int32),
         "total": np.array(max(seqlens) + 1, np.int32)}
    if not packed:
        f["k"], f["v"] = rnd(rng, b, s, hid_kv), rnd(rng, b, s, hid_kv)
    return f


@pytest.mark.parametrize("s,past,packed,rotary,window,interleaved", [
    (1, 6, True, True, -1, 0),     # decode, the GenAI builder's form (packed QKV, rotary)
    (1, 6, False, False, -1, 0),   # decode, separate q/k/v
    (3, 4, False, True, -1, 1),    # a chunk after a past
    (5, 0, True, True, -1, 0),     # first prompt, no past
    (1, 9, False, False, 4, 0),    # sliding window
    (4, 0, False, False, 2, 0)])   # first prompt with a window
def test_group_query_attention(rng, s, past, packed, rotary, window, interleaved):
    # onnxruntime's rotary needs head % 16 == 0, and a chunk after a past batch 1.
    b, heads, kv, head = (1 if s > 1 and past else 2), 4, 2, 16
    total = past + s
    m = _gqa_model(b, s, heads, kv, head, past, packed, rotary, window, interleaved)
    feeds = _gqa_feeds(rng, b, s, heads, kv, head, past, packed, [total - 1] * b)
    check(m, feeds)


def test_group_query_attention_ragged_decode(rng):
    """Rows of different lengths in one past buffer: each new token is written at its row's
    position (seqlens_k), and each row sees only its own tokens. onnxruntime leaves present's
    positions after a row's tokens unwritten, so only the written ones are compared."""
    b, s, heads, kv, head, past = 2, 1, 4, 2, 16, 6
    m = _gqa_model(b, s, heads, kv, head, past, False, True)
    seqlens = [6, 3]                       # row 0 full (past 6 + 1), row 1 holds 4 tokens
    feeds = _gqa_feeds(rng, b, s, heads, kv, head, past, False, seqlens)
    y, pk, pv = ort_run(m, feeds)
    got = ours(m, feeds)
    np.testing.assert_allclose(got["y"], y, rtol=1e-4, atol=1e-5)
    # The new keys are f32 projections of O(1) values: a few ulps apart where the two sum
    # in different orders, so an absolute floor for entries near zero.
    for row, n_tok in enumerate(np.asarray(seqlens) + 1):
        np.testing.assert_allclose(got["present_k"][row, :, :n_tok], pk[row, :, :n_tok],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["present_v"][row, :, :n_tok], pv[row, :, :n_tok],
                                   rtol=1e-5, atol=1e-6)
    # Row 1's new token went to position 3, not to the end of the buffer.
    assert not np.allclose(got["present_k"][1, :, 3], feeds["past_k"][1, :, 3])


@pytest.mark.parametrize("bias,kpm,attn_bias,past,causal", [
    (False, False, False, False, 0), (True, True, False, False, 0),
    (True, False, True, False, 1), (False, True, False, True, 1), (True, False, False, True, 0)])
def test_multi_head_attention(rng, bias, kpm, attn_bias, past, causal):
    b, s, heads, head, kv_len, p = 2, 4, 2, 8, 4, 3
    hid = heads * head
    feeds = {"q": rnd(rng, b, s, hid), "k": rnd(rng, b, kv_len, hid), "v": rnd(rng, b, kv_len, hid)}
    order = ["q", "k", "v", "", "", "", "", ""]
    inits = {}
    total = kv_len + (p if past else 0)
    if bias:
        inits["bias"] = rnd(rng, 3 * hid)
        order[3] = "bias"
    if kpm:
        mask = np.ones((b, total), np.int32)
        mask[1, -2:] = 0
        feeds["kpm"] = mask
        order[4] = "kpm"
    if attn_bias:
        feeds["ab"] = rnd(rng, 1, heads, s, total)
        order[5] = "ab"
    if past:
        feeds["pk"], feeds["pv"] = rnd(rng, b, heads, p, head), rnd(rng, b, heads, p, head)
        order[6], order[7] = "pk", "pv"
    outputs = ["y", "present_k", "present_v"] if past else ["y"]
    m = single_node("MultiHeadAttention", {k: feeds[k] for k in feeds}, inits, outputs,
                    _order=order, num_heads=heads, unidirectional=causal)
    check(m, feeds)


@pytest.mark.parametrize("mask,past,causal,sizes", [
    (None, False, 0, None), ("2d", False, 0, None), ("1d", False, 0, None),
    ("3d", False, 1, None), (None, True, 1, None), ("2d", True, 1, None),
    (None, False, 0, [16, 16, 24])])
def test_attention(rng, mask, past, causal, sizes):
    b, s, hin, heads, p = 2, 5, 12, 2, 3
    width = sum(sizes) if sizes else 3 * 16
    feeds = {"x": rnd(rng, b, s, hin)}
    inits = {"w": rnd(rng, hin, width) * 0.5, "bias": rnd(rng, width)}
    order = ["x", "w", "bias", "", ""]
    total = s + (p if past else 0)
    if mask == "2d":
        m = np.ones((b, total), np.int32)
        m[0, -2:] = 0
        feeds["mask"] = m
    elif mask == "1d":
        feeds["mask"] = np.array([total, total - 2], np.int32)
    elif mask == "3d":
        feeds["mask"] = (rng.uniform(size=(b, s, total)) > 0.3).astype(np.int32)
        feeds["mask"][:, :, 0] = 1
    if mask:
        order[3] = "mask"
    if past:
        feeds["past"] = rnd(rng, 2, b, heads, p, 8)
        order[4] = "past"
    attrs = {"num_heads": heads, "unidirectional": causal}
    if sizes:
        attrs["qkv_hidden_sizes"] = sizes
    outputs = ["y", "present"] if past else ["y"]
    model = single_node("Attention", feeds, inits, outputs, _order=order, **attrs)
    check(model, feeds)


def test_attention_fuses_to_attention_op(rng):
    """The contrib attention ops become the fused ``attention`` op (one per node)."""
    m = _gqa_model(1, 1, 4, 2, 16, 3, True, True)
    module, _, _ = run_pipeline(load(m), PIPELINE)
    ops = [nd.op for nd in module.main.nodes]
    assert ops.count("attention") == 1 and "softmax" not in ops


# -- embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize("segment,mask,pos_ids,sum_out", [
    (True, True, False, False), (False, False, False, True), (True, True, True, True)])
def test_embed_layernorm(rng, segment, mask, pos_ids, sum_out):
    b, s, hid, vocab = 2, 6, 16, 30
    feeds = {"ids": rng.integers(0, vocab, (b, s)).astype(np.int32)}
    inits = {"word": rnd(rng, vocab, hid), "pos": rnd(rng, 16, hid)}
    order = ["ids", "", "word", "pos", "", "gamma", "beta", "", ""]
    if segment:
        feeds["seg"] = rng.integers(0, 2, (b, s)).astype(np.int32)
        inits["segemb"] = rnd(rng, 2, hid)
        order[1], order[4] = "seg", "segemb"
    inits["gamma"], inits["beta"] = rnd(rng, hid), rnd(rng, hid)
    if mask:
        mk = np.ones((b, s), np.int32)
        mk[1, 4:] = 0
        feeds["mask"] = mk
        order[7] = "mask"
    if pos_ids:
        feeds["pid"] = rng.integers(0, 16, (b, s)).astype(np.int32)
        order[8] = "pid"
    outputs = ["y", "mask_index"] + (["emb_sum"] if sum_out else [])
    m = single_node("EmbedLayerNormalization", feeds, inits, outputs, _order=order,
                    epsilon=1e-5)
    check(m, feeds)


# -- integer forms -------------------------------------------------------------------------


@pytest.mark.parametrize("w_type,per_channel,zp,bias", [
    (np.uint8, False, True, True), (np.int8, True, False, False), (np.int8, False, True, True),
    (np.uint8, True, True, False)])
def test_dynamic_quantize_matmul(rng, w_type, per_channel, zp, bias):
    k, n = 32, 24
    # 7-bit signed weights keep onnxruntime's u8 x s8 path exact on AVX2-only hosts.
    lo, hi = (0, 255) if w_type == np.uint8 else (-64, 63)
    inits = {"w": rng.integers(lo, hi + 1, (k, n)).astype(w_type),
             "ws": (rng.uniform(0.01, 0.05, (n,) if per_channel else ()).astype(np.float32))}
    order = ["a", "w", "ws", "", ""]
    if zp:
        zp_lo, zp_hi = (64, 200) if w_type == np.uint8 else (-8, 9)
        inits["wzp"] = rng.integers(zp_lo, zp_hi, (n,) if per_channel else ()).astype(w_type)
        order[3] = "wzp"
    if bias:
        inits["b"] = rnd(rng, n)
        order[4] = "b"
    a = rnd(rng, 3, 5, k)
    m = single_node("DynamicQuantizeMatMul", {"a": a}, inits, ["y"], _order=order)
    check(m, {"a": a}, rtol=1e-5, atol=1e-4)
    module, _, _ = run_pipeline(load(m), PIPELINE)
    assert [nd.attrs["act"] for nd in module.main.nodes if nd.op == "qmatmul"] == ["dynamic"]


@pytest.mark.parametrize("a_type,zps,bias", [(np.uint8, True, True), (np.uint8, False, False),
                                             (np.int8, True, False)])
def test_matmul_integer_to_float(rng, a_type, zps, bias):
    k, n = 16, 8
    a = rng.integers(0, 256, (4, k)).astype(np.uint8) if a_type == np.uint8 else \
        rng.integers(-128, 128, (4, k)).astype(np.int8)
    inits = {"b": rng.integers(-64, 64, (k, n)).astype(np.int8),
             "as": np.array(0.02, np.float32), "bs": rng.uniform(0.01, 0.1, n).astype(np.float32)}
    order = ["a", "b", "as", "bs", "", "", ""]
    if zps:
        inits["azp"] = np.array(3, a_type)
        inits["bzp"] = rng.integers(-5, 5, n).astype(np.int8)
        order[4], order[5] = "azp", "bzp"
    if bias:
        inits["bias"] = rnd(rng, n)
        order[6] = "bias"
    m = single_node("MatMulIntegerToFloat", {"a": a}, inits, ["y"], _order=order)
    check(m, {"a": a}, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_binary(rng, op, dtype):
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max + 1, (3, 16)).astype(dtype)
    b = rng.integers(info.min, info.max + 1, (16,)).astype(dtype)
    inits = {"as": np.array(0.05, np.float32), "azp": np.array(info.min // 2 + 10, dtype),
             "bs": np.array(0.03, np.float32), "bzp": np.array(-3 if dtype == np.int8 else 120,
                                                               dtype),
             "cs": np.array(0.2 if op == "QLinearMul" else 0.07, np.float32),
             "czp": np.array(5 if dtype == np.int8 else 128, dtype)}
    m = single_node(op, {"a": a, "b": b}, inits, ["c"],
                    _order=["a", "as", "azp", "b", "bs", "bzp", "cs", "czp"])
    expect = ort_run(m, {"a": a, "b": b})[0]
    got = ours(m, {"a": a, "b": b})["c"]
    assert got.dtype == expect.dtype
    # onnxruntime folds the scale ratios into one float expression: a tie may round apart.
    diff = np.abs(got.astype(np.int32) - expect.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95


# -- refusals ------------------------------------------------------------------------------


def test_unsupported_attribute_is_named(rng):
    x = rnd(rng, 1, 2, 8)
    m = single_node("RotaryEmbedding", {"x": x, "pos": np.zeros((1, 2), np.int64)},
                    {"cos": np.ones((4, 4), np.float32), "sin": np.ones((4, 4), np.float32)},
                    ["y"], is_packed_batching=1)
    with pytest.raises(QCompilerError, match="is_packed_batching"):
        load(m)


@pytest.mark.parametrize("op,channels_last,attrs", [
    ("QLinearGlobalAveragePool", 0, {}), ("QLinearGlobalAveragePool", 1, {}),
    ("QLinearAveragePool", 0, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("QLinearAveragePool", 0, {"kernel_shape": [2, 2], "count_include_pad": 1,
                               "pads": [0, 1, 0, 1]}),
    ("QLinearAveragePool", 1, {"kernel_shape": [2, 3], "ceil_mode": 1, "strides": [2, 2]})])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_pools(rng, op, channels_last, attrs, dtype):
    info = np.iinfo(dtype)
    shape = (2, 7, 6, 3) if channels_last else (2, 3, 7, 6)
    x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    inits = {"xs": np.array(0.04, np.float32), "xzp": np.array(info.min + 100, dtype),
             "ys": np.array(0.03, np.float32), "yzp": np.array(info.min + 120, dtype)}
    m = single_node(op, {"x": x}, inits, ["y"], channels_last=channels_last, **attrs)
    expect = ort_run(m, {"x": x})[0]
    got = ours(m, {"x": x})["y"]
    assert got.shape == expect.shape and got.dtype == expect.dtype
    # onnxruntime sums integer codes and scales once; a tie may round apart by one code.
    diff = np.abs(got.astype(np.int32) - expect.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95


@pytest.mark.parametrize("w_type,per_channel,group,bias", [
    (np.uint8, False, 1, True), (np.int8, True, 1, False), (np.int8, True, 2, True)])
def test_qlinear_conv(rng, w_type, per_channel, group, bias):
    """QLinearConv (ONNX domain; imported in onnx.py for issue #15) as onnxruntime's QOperator
    CNNs use it. Weights |w| <= 63 keep onnxruntime's u8 x s8 path exact without VNNI."""
    c, m = 4, 6
    x = rng.integers(0, 256, (2, c, 7, 7)).astype(np.uint8)
    lo, hi = (0, 256) if w_type == np.uint8 else (-63, 64)
    w = rng.integers(lo, hi, (m, c // group, 3, 3)).astype(w_type)
    ws = rng.uniform(0.002, 0.01, (m,) if per_channel else ()).astype(np.float32)
    wzp = np.full((m,) if per_channel else (), 128 if w_type == np.uint8 else 0, w_type)
    inits = {"xs": np.array(0.02, np.float32), "xzp": np.array(120, np.uint8), "w": w,
             "ws": ws, "wzp": wzp, "ys": np.array(0.05, np.float32),
             "yzp": np.array(128, np.uint8)}
    order = ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"]
    if bias:
        inits["b"] = rng.integers(-500, 500, (m,)).astype(np.int32)
        order.append("b")
    model = single_node("QLinearConv", {"x": x}, inits, ["y"], domain="", _order=order,
                        pads=[1, 1, 1, 1], group=group)
    expect = ort_run(model, {"x": x})[0]
    got = ours(model, {"x": x})["y"]
    assert got.shape == expect.shape and got.dtype == expect.dtype
    diff = np.abs(got.astype(np.int32) - expect.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95


def test_matmul_integer_to_float_after_dynamic_quantize(rng):
    """What onnxruntime's optimizer writes for a quantize_dynamic model
    (DynamicQuantizeLinear → MatMulIntegerToFloat) becomes one ``qmatmul{act=dynamic}``."""
    k, n = 32, 16
    w = rng.integers(0, 256, (k, n)).astype(np.uint8)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.uniform(0.01, 0.05, n).astype(np.float32), "ws"),
             numpy_helper.from_array(np.array(131, np.uint8), "wzp"),
             numpy_helper.from_array(rnd(rng, n), "bias")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
             helper.make_node("MatMulIntegerToFloat", ["xq", "w", "xs", "ws", "xzp", "wzp", "bias"],
                              ["y"], domain=MS)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [3, k])],
                              [onnx.ValueInfoProto(name="y")], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid(MS, 1)])
    m.ir_version = 10
    x = rnd(rng, 3, k)
    check(m, {"x": x}, rtol=1e-5, atol=1e-4)
    module, _, _ = run_pipeline(load(m), PIPELINE)
    qmms = [nd for nd in module.main.nodes if nd.op == "qmatmul"]
    assert [nd.attrs["act"] for nd in qmms] == ["dynamic"] and qmms[0].operand(7) is not None


def test_group_query_attention_softcap_is_refused():
    m = _gqa_model(1, 1, 4, 2, 16, 3, True, False)
    m.graph.node[0].attribute.append(helper.make_attribute("softcap", 30.0))
    with pytest.raises(QCompilerError, match="softcap"):
        load(m)


def test_shapes_built_after_a_contrib_op_are_inferred():
    """A Reshape whose shape is built from Shape/Gather/Unsqueeze/Concat of a value, applied
    to a MatMulNBits output: onnx's own shape inference stops at the contrib op (it does not
    know it), and onnxruntime's quantizer leaves no value_info. The importer runs onnx's
    inference again with its own type of the MatMulNBits output, so the Reshape keeps static
    and symbolic dims ([batch, seq, 4, 16], not [?, ?, ?, ?]); it matches onnxruntime."""
    import onnx_models as om

    om._quiet()
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("i0", 0), ("i1", 1), ("four", [4]), ("sixteen", [16]))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
             helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
             helper.make_node("Unsqueeze", ["t", "axes0"], ["t1"]),
             helper.make_node("Concat", ["b1", "t1", "four", "sixteen"], ["shape"], axis=0),
             helper.make_node("Reshape", ["h", "shape"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, *consts, numpy_helper.from_array(np.array([0], np.int64), "axes0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    quantized = om._examples_module().quantize_matmul_nbits(model, bits=4, block_size=32)
    assert any(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    module = load(quantized)
    y = next(n for n in module.main.nodes if n.op == "reshape").result
    assert tuple(y.type.shape) == ("batch", "seq", 4, 16), y.type
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(ours(quantized, {"x": x})["y"], ort_run(quantized, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
