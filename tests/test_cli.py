"""The qcompile command line, the artifact it writes, and the Python API."""
import json
import os

import numpy as np
import pytest

import qcompiler
from conftest import check_golden
from qcompiler.driver.cli import main
from qcompiler.ir import parse_module, print_module
from qcompiler.targets import all_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "mlp_int4.onnx")
GOLDEN = os.path.join(ROOT, "tests", "golden")

DESIGN_TARGETS = ["ref", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90", "cpu",
                  "cpu-x86-avx2", "cpu-x86-avx512", "cpu-arm-neon", "fpga-u250", "fpga-zcu104",
                  "fpga-pynq-z2"]


def test_list_passes(capsys):
    assert main(["--list-passes"]) == 0
    out = capsys.readouterr().out
    for name in ["canonicalize", "fuse-dequant", "quantize-weights"]:
        assert f"  {name} " in out
    assert "Round-to-nearest" in out and "options: bits=4" in out


def test_list_targets(capsys):
    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    for name in DESIGN_TARGETS:
        assert f"  {name} " in out
    assert set(DESIGN_TARGETS) <= set(all_targets())
    # A target whose backend is not built is listed, and marked as such.
    for name, target in all_targets().items():
        line = next(l for l in out.splitlines() if l.startswith(f"  {name} "))
        assert ("[planned:" in line) == (not target.available), line


def test_compile_writes_the_artifact(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main([EXAMPLE, "-o", str(out_dir), "--time-passes", "--verify-each"]) == 0
    err = capsys.readouterr().err
    assert "pass execution timing report" in err and "3 qmatmul" in err
    for name in ["module.qir", "weights.safetensors", "manifest.json", "report.json",
                 "report.txt", "kernels"]:
        assert (out_dir / name).exists(), name
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "x", "shape": ["batch", 64], "dtype": "f32"}]
    assert manifest["outputs"] == [{"name": "y", "shape": ["batch", 32], "dtype": "f32"}]
    assert [k["op"] for k in manifest["kernels"]] == ["qmatmul"] * 3
    report = json.loads((out_dir / "report.json").read_text())
    assert [r["pass"] for r in report["passes"]] == ["canonicalize", "fuse-dequant",
                                                      "canonicalize"]
    assert report["passes"][1]["qmatmuls"] == 3

    loaded = qcompiler.load(out_dir)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    y = loaded.run({"x": x})["y"]
    assert y.shape == (3, 32) and y.dtype == np.float32
    import onnxruntime as ort

    want = ort.InferenceSession(EXAMPLE, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_print_ir_after_all_and_named(tmp_path, capsys):
    assert main([EXAMPLE, "-o", str(tmp_path), "--print-ir-after-all"]) == 0
    err = capsys.readouterr().err
    assert err.count("// ----- IR after") == 3
    assert main([EXAMPLE, "-o", str(tmp_path), "--print-ir-after", "fuse-dequant"]) == 0
    err = capsys.readouterr().err
    assert err.count("// ----- IR after") == 1 and "IR after fuse-dequant" in err
    # What is printed parses: the IR text is the interface.
    parse_module(err.split("-----\n", 1)[1].split("qcompile: wrote")[0])


def test_custom_pipeline_and_emit_ir(tmp_path, capsys):
    assert main([EXAMPLE, "-o", str(tmp_path), "--passes", "canonicalize", "--emit-ir"]) == 0
    out = capsys.readouterr().out
    assert "dequantize(" in out and "qmatmul(" not in out


PLANNED = [name for name, t in all_targets().items() if not t.available]


@pytest.mark.parametrize("args, message", [
    *[(["--target", name], "is registered but its backend") for name in PLANNED[:1]],
    # The CUDA kernels take f16/bf16 activations; the example model is f32.
    (["--target", "cuda-sm80"], "activations are f32"),
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--passes", "canonicalize,bogus"], "unknown pass 'bogus'"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    assert main([EXAMPLE, "-o", str(tmp_path)] + args) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error:") and message in err
    assert "Traceback" not in err


def test_python_api_compile_and_run(tmp_path):
    m = qcompiler.compile(EXAMPLE, target="ref", output_dir=str(tmp_path))
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(m(x)["y"], m.run({"x": x})["y"])
    with pytest.raises(ValueError, match="x"):
        m.run({"x": x.astype(np.float64)})


def test_golden_ir_of_the_example(update_goldens):
    """The imported and the compiled IR of the shipped example (`make goldens` updates)."""
    from qcompiler.driver.api import run_pipeline
    from qcompiler.frontends.onnx import load

    imported = load(EXAMPLE)
    check_golden(os.path.join(GOLDEN, "mlp_int4.imported.qir"), print_module(imported),
                 update_goldens)
    compiled, _, _ = run_pipeline(imported, "canonicalize,fuse-dequant,canonicalize")
    check_golden(os.path.join(GOLDEN, "mlp_int4.ref.qir"), print_module(compiled), update_goldens)
