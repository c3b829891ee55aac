"""fuse-kv-concat and fold-attention-layout's rotary hoist on a Llama decode step (the CUDA
pipelines' order): every head transpose is gone (q folds into attention, k and v into
kv_concat), one kv_concat per layer and cache, and the reference of the fused module agrees
with the unfused one at f16 rounding."""
import os
import sys
from collections import Counter

import numpy as np
import pytest

from qcompiler.driver.frontend import import_model
from qcompiler.pipeline import PassManager
from qcompiler.runtime.reference import run as ref_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_PASSES = ("canonicalize,quantize-weights{bits=4,group=128},canonicalize,fuse-dequant,"
               "canonicalize,compute-dtype{dtype=f16}")
FUSIONS = ",fuse-rotary,fuse-attention,fold-attention-layout,fuse-kv-concat"


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import decoder_models as dm

    cfg = dict(dm.SMALL_LLAMA, hidden=128, heads=4, kv_heads=2, intermediate=192)
    feeds = dm.llama_inputs(cfg, 3, 2, 3, 11, seed=4)  # batch 2, 3 new tokens, 11 cached
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    dm.export_onnx(dm.llama(layers=3, **cfg), feeds, path, dynamo=False)
    return path, feeds


def test_head_transposes_fold_and_each_layer_updates_its_cache_once(llama_file):
    path, feeds = llama_file
    plain = PassManager.parse(CUDA_PASSES).run(import_model(path))
    fused = PassManager.parse(CUDA_PASSES + FUSIONS).run(import_model(path))
    ops = Counter(n.op for n in fused.main.nodes)
    assert ops["transpose"] == 0 and ops["kv_concat"] == 6 and ops["attention"] == 3
    kv = [n for n in fused.main.nodes if n.op == "kv_concat"]
    assert sorted(n.attrs["layer"] for n in kv) == [0, 0, 1, 1, 2, 2]
    assert {n.attrs["new_bshd"] for n in kv} == {1}
    heads = sorted(n.attrs["num_heads"] for n in fused.main.nodes if n.op == "rotary_embedding")
    assert heads == [2, 2, 2, 4, 4, 4]  # k over the 2 kv heads, q over 4, in [B, S, H*D]
    assert all(n.attrs.get("q_bshd") for n in fused.main.nodes if n.op == "attention")
    want, got = ref_run(plain, feeds), ref_run(fused, feeds)
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1.0)
        assert np.abs(got[k].astype(np.float64) - want[k]).max() <= 1e-2 * scale, k


def test_kv_concat_reference_is_concat_of_the_layer_and_the_new_rows():
    from qcompiler.ir.core import Node
    from qcompiler.runtime.reference import OP_IMPLS

    rng = np.random.default_rng(0)
    past = rng.standard_normal((3, 2, 4, 5, 8)).astype(np.float32)
    new = rng.standard_normal((2, 6, 4, 8)).astype(np.float32)  # [B, S, H, D]
    node = Node("kv_concat", [], [], {"layer": 1, "new_bshd": 1})
    (y,) = OP_IMPLS["kv_concat"](node, [past, new], None)
    assert y.shape == (2, 4, 11, 8)
    assert np.array_equal(y[:, :, :5], past[1])
    assert np.array_equal(y[:, :, 5:], new.transpose(0, 2, 1, 3))
