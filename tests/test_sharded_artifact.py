"""Sharded (tensor-parallel) artifacts, issue #17: the degree from the target (``cpu:tp=2``,
``--tp``), shard's place in the pipeline, the artifact's layout (a manifest, one single-device
artifact per rank holding only its weights), and real runs: ``qcompiler.load(DIR)`` starts one
worker process per rank, torch.distributed (gloo) sums the all_reduce partials, and rank 0's
output equals the unsharded compile's."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import qcompiler
from qcompiler.driver.api import CompileError, compile_to_dir
from qcompiler.driver.sharded import (SHARDED_FORMAT_NAME, TargetOptionError,
                                      pipeline_with_shard, split_target)
from qcompiler.errors import ArtifactError
from qcompiler.targets import get_target
from test_shard import _feeds, _module

torch = pytest.importorskip("torch", reason="the sharded runtime's collectives need torch "
                            "(the fx extra)")


# -- the degree from the target ----------------------------------------------------------------

def test_target_options_and_the_tp_flag():
    assert split_target("cpu") == ("cpu", {})
    assert split_target("cuda-sm90:tp=2") == ("cuda-sm90", {"tp": 2})
    assert split_target("cpu", tp=4) == ("cpu", {"tp": 4})
    assert split_target("cpu:tp=2", tp=2) == ("cpu", {"tp": 2})
    with pytest.raises(TargetOptionError, match="says tp=2, --tp says 4"):
        split_target("cpu:tp=2", tp=4)
    with pytest.raises(TargetOptionError, match="unknown option 'pp'"):
        split_target("cpu:pp=2")
    with pytest.raises(TargetOptionError, match="needs the form key=value"):
        split_target("cpu:tp")
    for bad in ("0", "two", "-1"):
        with pytest.raises(TargetOptionError, match="integer >= 1"):
            split_target(f"cpu:tp={bad}")


@pytest.mark.parametrize("target", ["ref", "cpu", "cuda-sm80", "cuda-sm90"])
def test_shard_goes_after_the_qmatmul_fusions_and_before_fuse_epilogue(target):
    pipeline = get_target(target).default_pipeline
    names = [p.split("{")[0] for p in pipeline_with_shard(pipeline, 2).split(",")]
    at = names.index("shard")
    assert "fuse-dequant" in names[:at]
    if "fuse-epilogue" in names:
        assert names[at + 1] == "fuse-epilogue"
        assert "fuse-gelu" in names[:at] and "fuse-rmsnorm" in names[:at]
    else:
        assert at == len(names) - 1
    # a pipeline that runs shard already keeps it; another degree is refused
    assert pipeline_with_shard("canonicalize,shard{tp=2}", 2) == "canonicalize,shard"
    with pytest.raises(TargetOptionError, match="asks for tp=4"):
        pipeline_with_shard("canonicalize,shard{tp=2}", 4)


# -- the artifact --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref_artifacts(tmp_path_factory):
    base = _module(act_order=True)
    root = tmp_path_factory.mktemp("tp_ref")
    sharded, global_module = compile_to_dir(base.clone(), "ref:tp=2", str(root / "tp2"))
    single, _ = compile_to_dir(base.clone(), "ref", str(root / "tp1"))
    return sharded, single, global_module


def test_sharded_artifact_layout(ref_artifacts):
    sharded, single, _ = ref_artifacts
    with open(os.path.join(sharded, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == {"name": SHARDED_FORMAT_NAME, "version": 1}
    assert manifest["tp"] == 2 and manifest["collective_backend"] == "gloo"
    assert [r["dir"] for r in manifest["ranks"]] == ["rank0", "rank1"]
    assert [c["op"] for c in manifest["collectives"]] == ["sum"]
    assert [i["name"] for i in manifest["inputs"]] == ["x"]
    from qcompiler.driver.artifact import read_artifact

    full, _ = read_artifact(single)
    full_w = sum(a.nbytes for a in full.constants.values())
    names = []
    for r, rec in enumerate(manifest["ranks"]):
        module, rank_manifest = read_artifact(os.path.join(sharded, rec["dir"]))
        assert rank_manifest["format"]["name"] == "qcompiler-artifact"  # a normal artifact
        names.append(set(module.constants))
        qmms = [n for n in module.main.nodes if n.op == "qmatmul"]
        assert {n.attrs["rank"] for n in qmms} == {r} and len(qmms) == 3
        (reduce,) = [n for n in module.main.nodes if n.op == "all_reduce"]
        assert len(reduce.operands) == 1 and reduce.attrs["world"] == 2
        # about half the weights: every qmatmul's codes, scales and zero points are split;
        # only the down projection's bias (rank 0) and the residual path are not
        w = sum(a.nbytes for a in module.constants.values())
        assert rec["weight_bytes"] == w
        assert 0.45 * full_w <= w <= 0.55 * full_w, (r, w, full_w)
    assert not names[0] & names[1]  # no weight is held by both ranks
    with open(os.path.join(sharded, "report.txt")) as f:
        text = f.read()
    assert "tensor parallel tp=2" in text
    assert "rank 0: rank0/  weights" in text and "rank 1: rank1/  weights" in text


def test_run_ref_tp2_in_two_processes_equals_the_unsharded_compile(ref_artifacts):
    sharded, single, _ = ref_artifacts
    module = qcompiler.load(sharded)
    try:
        assert type(module).__name__ == "ShardedModule" and module.tp == 2
        assert module.input_names == ["x"] and module.output_names == ["y"]
        whole = qcompiler.load(single)
        for seed, batch in ((1, 5), (2, 1)):
            want = whole.run(_feeds(seed, batch))["y"]
            got = module.run(_feeds(seed, batch))["y"]
            # f32 partial sums added in another order: a few ulps of the output's size
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        # the same run through the call interface
        np.testing.assert_allclose(module(_feeds(3)["x"])["y"],
                                   whole.run(_feeds(3))["y"], rtol=1e-5, atol=1e-4)
    finally:
        module.close()


def test_run_cpu_tp2_in_two_processes_equals_the_unsharded_compile(tmp_path):
    pytest.importorskip("tvm", reason="the cpu target needs the cpu extra")
    base = _module(act_order=True)
    sharded, _ = compile_to_dir(base.clone(), "cpu", str(tmp_path / "tp2"), tp=2)
    single, _ = compile_to_dir(base.clone(), "cpu", str(tmp_path / "tp1"))
    with open(os.path.join(sharded, "rank0", "manifest.json")) as f:
        rank0 = json.load(f)
    assert not rank0["host_fallback"]  # the all_reduce is a collective, not a fallback
    assert [k["impl"] for k in rank0["kernels"] if k["op"] == "all_reduce"] == ["collective"]
    module = qcompiler.load(sharded)
    try:
        want = qcompiler.load(single).run(_feeds(4))["y"]
        got = module.run(_feeds(4))["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    finally:
        module.close()


# -- refusals ----------------------------------------------------------------------------------

def test_a_model_without_shardable_blocks_is_refused_with_the_reason():
    with pytest.raises(CompileError, match="split nothing.*split B's groups of 16"):
        compile_to_dir(_module(act_order=True), "ref", None, tp=4)


def test_one_rank_artifact_alone_refuses_its_all_reduce(ref_artifacts):
    from qcompiler.runtime.collectives import CollectiveError

    sharded, _, _ = ref_artifacts
    rank0 = qcompiler.load(os.path.join(sharded, "rank0"))
    with pytest.raises(CollectiveError, match="all_reduce: this is one rank's program.*2 ranks"):
        rank0.run(_feeds(1))


def test_a_changed_rank_artifact_is_refused_at_load(ref_artifacts, tmp_path):
    import shutil

    sharded, _, _ = ref_artifacts
    copy = str(tmp_path / "copy")
    shutil.copytree(sharded, copy)
    with open(os.path.join(copy, "rank1", "manifest.json"), "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="rank1/manifest.json was changed"):
        qcompiler.load(copy)
    shutil.rmtree(copy)
    shutil.copytree(sharded, copy)
    with open(os.path.join(copy, "rank1", "weights.safetensors"), "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(ArtifactError, match="weights.safetensors was changed"):
        qcompiler.load(copy)
    with open(os.path.join(copy, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["ranks"][1]["dir"] = "../elsewhere"
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ArtifactError, match="leads out of the artifact"):
        qcompiler.load(copy)


def test_a_failing_rank_is_reported_by_rank_and_stops_the_workers(ref_artifacts):
    sharded, _, _ = ref_artifacts
    module = qcompiler.load(sharded)
    try:
        with pytest.raises(Exception, match=r"rank \d failed while running: .*input"):
            module.run({"x": np.zeros((2, 3), np.float32)})
        assert module._workers is None  # stopped; the next run starts them again
        assert module.run(_feeds(1))["y"].shape == (5, 64)
    finally:
        module.close()


def test_cli_tp_flag_writes_a_sharded_artifact(tmp_path, capsys):
    import onnx

    import onnx_models
    from qcompiler.driver.cli import main

    path = str(tmp_path / "mlp.onnx")
    onnx.save(onnx_models.matmul_nbits(), path)  # gelu MLP: its last two layers shard
    out = str(tmp_path / "o")
    assert main([path, "--target", "ref", "--tp", "2", "-o", out]) == 0
    assert "sharded over 2 ranks" in capsys.readouterr().err
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["tp"] == 2
    assert main([path, "--target", "ref:tp=2", "-o", str(tmp_path / "o2")]) == 0
    assert main([path, "--target", "ref:tp=3", "--tp", "2", "-o", str(tmp_path / "o3")]) == 1
    assert "says tp=3, --tp says 2" in capsys.readouterr().err
