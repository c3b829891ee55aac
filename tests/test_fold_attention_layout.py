"""fold-attention-layout: head transposes around attention become its [B, S, H, D] layouts,
with the reference's results unchanged (the kernels' layouts: tests/test_cpu_ops.py and
tests/test_cuda_ops.py)."""
from __future__ import annotations

import numpy as np
import pytest

from qcompiler.ir import parse_module, print_module, verify
from qcompiler.runtime import reference

SPLIT_HEADS = """module @m {{
  func @main(%q: tensor<[2, 5, 4, 8], f32>, %k: tensor<[2, 6, 2, 8], f32>, %v: tensor<{v_shape}, f32>, %mask: tensor<[2, 1, 1, 6], f32>) -> ("y": tensor<[2, 5, 12], f32>{extra_out}) {{
    %qt = transpose(%q) {{perm = [0, 2, 1, 3]}} : tensor<[2, 4, 5, 8], f32>
    %kt = transpose(%k) {{perm = [0, 2, 1, 3]}} : tensor<[2, 2, 6, 8], f32>
{v_line}
    %a = attention(%qt, %kt, %vt, %mask) {{causal = 1, scale = 0.35}} : tensor<[2, 4, 5, 3], f32>
    %at = transpose(%a) {{perm = [0, 2, 1, 3]}} : tensor<[2, 5, 4, 3], f32>
    %shape = constant() {{value = dense<[2, 5, 12]>}} : tensor<[3], i64>
    %y = reshape(%at, %shape) : tensor<[2, 5, 12], f32>
    return %y{extra_ret}
  }}
}}"""
V_SPLIT = "    %vt = transpose(%v) {perm = [0, 2, 1, 3]} : tensor<[2, 2, 6, 3], f32>"
V_AS_IS = "    %vt = neg(%v) : tensor<[2, 2, 6, 3], f32>"  # already [B, H, S, D]


def _module(v_split=True, extra=False):
    """q, k (and v) split into heads by transposes around a causal, masked GQA attention."""
    m = parse_module(SPLIT_HEADS.format(
        v_shape="[2, 6, 2, 3]" if v_split else "[2, 2, 6, 3]",
        v_line=V_SPLIT if v_split else V_AS_IS,
        extra_out=', "qt": tensor<[2, 4, 5, 8], f32>' if extra else "",
        extra_ret=", %qt" if extra else ""))
    verify(m)
    return m


def _fold(module):
    from qcompiler.driver.api import run_pipeline

    return run_pipeline(module, "fold-attention-layout", verify_each=True)[0]


def _feeds(module, seed):
    rng = np.random.default_rng(seed)
    feeds = {a.name: (rng.standard_normal(a.type.shape) + 0.05).astype(np.float32)
             for a in module.main.args}
    feeds["mask"] = np.where(rng.random((2, 1, 1, 6)) < 0.2, -1e9, 0.0).astype(np.float32)
    return feeds


def _ops(module):
    return [n.op for n in module.main.nodes if n.op != "constant"]


def _same(before, after):
    for seed in (1, 2):
        feeds = _feeds(before, seed)
        want, got = reference.run(before, feeds), reference.run(after, feeds)
        for k in want:
            assert got[k].shape == want[k].shape
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _attention(module):
    return next(n for n in module.main.nodes if n.op == "attention")


def test_all_four_transposes_fold_into_the_layouts():
    after = _fold(_module())
    assert _ops(after) == ["attention", "reshape"]
    node = _attention(after)
    assert (node.attrs["q_bshd"], node.attrs["kv_bshd"], node.attrs["y_bshd"]) == (1, 1, 1)
    assert [o.name for o in node.operands[:3]] == ["q", "k", "v"]
    assert node.result.type.shape == (2, 5, 4, 3)
    text = print_module(after)
    assert "q_bshd = 1" in text and print_module(parse_module(text, after.constants)) == text
    _same(_module(), after)


def test_a_transpose_with_another_use_stays():
    after = _fold(_module(extra=True))  # %qt is also an output
    node = _attention(after)
    assert node.attrs.get("q_bshd", 0) == 0 and node.operands[0].name == "qt"
    assert node.attrs["kv_bshd"] == 1 and node.attrs["y_bshd"] == 1
    assert _ops(after).count("transpose") == 1
    _same(_module(extra=True), after)


def test_k_and_v_fold_only_together():
    after = _fold(_module(v_split=False))  # v arrives as [B, H, S, D]: k keeps its transpose
    node = _attention(after)
    assert node.attrs.get("kv_bshd", 0) == 0 and node.attrs["q_bshd"] == 1
    assert node.operands[1].name == "kt"
    _same(_module(v_split=False), after)


def test_the_layout_attrs_are_checked():
    from qcompiler.ir.ops import TypeInferenceError, infer_types
    from qcompiler.ir.types import TensorType, elem

    t = TensorType((2, 5, 4, 8), elem("f32"))
    with pytest.raises(TypeInferenceError, match="q_bshd must be 0 or 1"):
        infer_types("attention", [t, t, t], {"scale": 1.0, "causal": 0, "q_bshd": 2},
                    [None] * 3)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoders_through_fx_fold_their_head_transposes(kind):
    """The exported decoders' head merge after attention folds (Llama's q/k come through
    rotary embedding, so only y and v can); results unchanged on the reference."""
    pytest.importorskip("transformers")
    import torch

    from qcompiler.driver.api import run_pipeline
    from qcompiler.frontends import fx
    from test_fusion import FUSION, QUANT, RNG, _decoder, _decoder_feeds

    feeds = _decoder_feeds(RNG(3))
    module = fx.load(_decoder(kind), tuple(torch.from_numpy(feeds[k]) for k in ("ids", "mask")))
    base = run_pipeline(module, QUANT + "," + FUSION, verify_each=True)[0]
    transposes = [n.op for n in base.main.nodes].count("transpose")
    folded = run_pipeline(base.clone(), "fold-attention-layout", verify_each=True)[0]
    assert [n.op for n in folded.main.nodes].count("transpose") < transposes
    for node in (n for n in folded.main.nodes if n.op == "attention"):
        assert node.attrs.get("y_bshd", 0) == 1
    for seed in (30, 31):
        f = _decoder_feeds(RNG(seed))
        want, got = reference.run(base, f), reference.run(folded, f)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_merged_result_keeps_the_graphs_symbols():
    """An exporter may name a dim differently after the head merge (`unk__7` for `seq`): the
    folded attention takes the replaced value's type, so later types stay as they were."""
    text = """module @m {
  func @main(%q: tensor<[b, seq, 4, 8], f32>, %k: tensor<[b, 4, seq, 8], f32>, %v: tensor<[b, 4, seq, 8], f32>) -> ("y": tensor<[b, unk__7, 4, 8], f32>) {
    %qt = transpose(%q) {perm = [0, 2, 1, 3]} : tensor<[b, 4, seq, 8], f32>
    %a = attention(%qt, %k, %v) {causal = 1, scale = 0.35} : tensor<[b, 4, seq, 8], f32>
    %y = transpose(%a) {perm = [0, 2, 1, 3]} : tensor<[b, unk__7, 4, 8], f32>
    return %y
  }
}"""
    after = _fold(parse_module(text))
    node = _attention(after)
    assert node.attrs["q_bshd"] == 1 and node.attrs["y_bshd"] == 1
    assert node.result.type.shape == ("b", "unk__7", 4, 8)
    rng = np.random.default_rng(5)
    feeds = {"q": rng.standard_normal((2, 5, 4, 8)).astype(np.float32),
             "k": rng.standard_normal((2, 4, 5, 8)).astype(np.float32),
             "v": rng.standard_normal((2, 4, 5, 8)).astype(np.float32)}
    want = reference.run(parse_module(text), feeds)["y"]
    np.testing.assert_allclose(reference.run(after, feeds)["y"], want, rtol=1e-6, atol=1e-7)


# A decode step exported with a static sequence of 1: the canonicalizer made the head
# transposes reshapes between [B, 1, H, D] and [B, H, 1, D], which move no byte.
UNIT_SEQ = """module @m {
  func @main(%q: tensor<[2, 1, 4, 8], f32>, %k: tensor<[2, 6, 2, 8], f32>, %v: tensor<[2, 6, 2, 8], f32>) -> ("y": tensor<[2, 1, 32], f32>) {
    %s4 = constant() {value = dense<[2, 4, 1, 8]>} : tensor<[4], i64>
    %qt = reshape(%q, %s4) : tensor<[2, 4, 1, 8], f32>
    %kt = transpose(%k) {perm = [0, 2, 1, 3]} : tensor<[2, 2, 6, 8], f32>
    %vt = transpose(%v) {perm = [0, 2, 1, 3]} : tensor<[2, 2, 6, 8], f32>
    %a = attention(%qt, %kt, %vt) {causal = 0, scale = 0.35} : tensor<[2, 4, 1, 8], f32>
    %s5 = constant() {value = dense<[2, 1, 4, 8]>} : tensor<[4], i64>
    %at = reshape(%a, %s5) : tensor<[2, 1, 4, 8], f32>
    %s3 = constant() {value = dense<[2, 1, 32]>} : tensor<[3], i64>
    %y = reshape(%at, %s3) : tensor<[2, 1, 32], f32>
    return %y
  }
}"""


def test_unit_sequence_reshapes_fold_as_the_transposes():
    before = parse_module(UNIT_SEQ)
    after = _fold(parse_module(UNIT_SEQ))
    assert _ops(after) == ["attention", "reshape"]
    node = _attention(after)
    assert (node.attrs["q_bshd"], node.attrs["kv_bshd"], node.attrs["y_bshd"]) == (1, 1, 1)
    assert node.operands[0].name == "q" and node.result.type.shape == (2, 1, 4, 8)
    rng = np.random.default_rng(4)
    feeds = {a.name: rng.standard_normal(a.type.shape).astype(np.float32)
             for a in before.main.args}
    np.testing.assert_allclose(reference.run(after, feeds)["y"], reference.run(before, feeds)["y"],
                               rtol=1e-6, atol=1e-7)
    # a reshape that is not the swap (two positions) stays
    other = UNIT_SEQ.replace("tensor<[2, 1, 4, 8], f32>, %k", "tensor<[2, 4, 1, 8], f32>, %k")
    kept = _fold(parse_module(other))
    assert not _attention(kept).attrs.get("q_bshd", 0)
