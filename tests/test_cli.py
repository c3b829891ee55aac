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


# A CUDA pipeline without compute-dtype (which the default pipelines run) keeps the example's
# f32 activations, which the CUDA kernels do not take.
CUDA_WITHOUT_COMPUTE_DTYPE = ("canonicalize,fuse-dequant,canonicalize,reorder-weights,"
                              "schedule-unpack,tile{target=cuda-sm80}")


@pytest.mark.parametrize("args, message", [
    (["--target", "cuda-sm80", "--passes", CUDA_WITHOUT_COMPUTE_DTYPE], "activations are f32"),
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--passes", "canonicalize,bogus"], "unknown pass 'bogus'"),
    (["--target", "cuda-sm80", "--pass-option", "tile.int8_min=128"],
     "pass 'tile' has no option 'int8_min'"),
    (["--target", "cuda-sm80", "--pass-option", "tile.int8_min_m=many"],
     "option int8_min_m='many' of pass 'tile' is not a int"),
    (["--pass-option", "tile.int8_min_m=128"], "the pipeline runs no 'tile' pass"),
    (["--pass-option", "tile=128"], "expected PASS.OPTION=VALUE"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    assert main([EXAMPLE, "-o", str(tmp_path)] + args) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error:") and message in err
    assert "Traceback" not in err


def test_a_planned_target_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Every registered target is built today; one declared with status "planned" (as new
    targets are, before their backend exists) is refused by name."""
    import dataclasses

    from qcompiler.driver import frontend

    planned = dataclasses.replace(all_targets()["cpu-arm-neon"], name="cpu-riscv-v",
                                  status="planned")
    real = frontend.get_target
    monkeypatch.setattr(frontend, "get_target",
                        lambda name: planned if name == "cpu-riscv-v" else real(name))
    assert main([EXAMPLE, "-o", str(tmp_path), "--target", "cpu-riscv-v"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error:") and "is registered but its backend" in err


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


# --------------------------------------------------------------------------------------------
# errors: a QCompilerError is one line and exit 1; anything else is a bug (exit 2)
# --------------------------------------------------------------------------------------------


def _one_error_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _mnb_k0_file(tmp_path) -> str:
    """MatMulNBits with K = 0 (onnxruntime accepts it; TVM once failed with 322 lines)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["y"], name="mnb_k0",
                            domain="com.microsoft", K=0, N=8, bits=4, block_size=32)
    graph = helper.make_graph(
        [node], "k0", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((8, 0, 16), np.uint8), "B"),
         numpy_helper.from_array(np.zeros((8, 0), np.float32), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    path = str(tmp_path / "k0.onnx")
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("target", ["ref", "cpu"])
def test_matmul_nbits_k0_is_one_line(tmp_path, capsys, target):
    assert main([_mnb_k0_file(tmp_path), "--target", target, "-o", str(tmp_path / "o")]) == 1
    err = _one_error_line(capsys, "qcompile: error: ")
    assert "mnb_k0" in err and "K=0" in err


def test_missing_qir_file(tmp_path, capsys):
    path = str(tmp_path / "missing.qir")
    assert main([path, "-o", str(tmp_path / "o")]) == 1
    assert path in _one_error_line(capsys, "qcompile: error: ")


def test_deeply_nested_qir_is_a_parse_error(tmp_path, capsys):
    path = tmp_path / "deep.qir"
    path.write_text("module @m {\n func @main() -> () {\n %c = constant() {value = "
                    + "{a = " * 100000 + "1" + "}" * 100000 + "} : tensor<[], f32>\n"
                    " return\n }\n}\n")
    assert main([str(path), "-o", str(tmp_path / "o")]) == 1
    assert "nested deeper" in _one_error_line(capsys, "qcompile: error: ")


def test_output_directory_blocked_by_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([EXAMPLE, "-o", str(blocker / "out")]) == 1
    assert "cannot create the output directory" in _one_error_line(capsys, "qcompile: error: ")


def test_bad_tune_m(tmp_path, capsys):
    assert main([EXAMPLE, "--tune", "--tune-m", "a,2", "-o", str(tmp_path / "o")]) == 1
    assert "--tune-m" in _one_error_line(capsys, "qcompile: error: ")


@pytest.fixture
def broken_compiler(monkeypatch):
    """compile_to_dir fails the way a bug would: with a builtin exception."""
    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero in a pass")
    monkeypatch.setattr("qcompiler.driver.api.compile_to_dir", boom)


def test_internal_error_is_exit_2_without_a_traceback(tmp_path, capsys, broken_compiler):
    assert main([EXAMPLE, "-o", str(tmp_path / "o")]) == 2
    err = _one_error_line(capsys, "qcompile: internal error: ZeroDivisionError: ")
    assert "division by zero in a pass" in err and "this is a bug in qcompiler" in err
    assert "--debug" in err


def test_debug_shows_the_traceback(tmp_path, capsys, broken_compiler):
    assert main([EXAMPLE, "-o", str(tmp_path / "o"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "def boom" not in err and "in boom" in err
    assert err.rstrip().splitlines()[-1].startswith("qcompile: internal error: ZeroDivision")


def test_debug_with_a_user_error_still_exits_1(tmp_path, capsys):
    path = str(tmp_path / "missing.onnx")
    assert main([path, "-o", str(tmp_path / "o"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("qcompile: error: ")


def test_compile_without_output_dir_removes_its_temp_dir_with_the_module(tmp_path):
    """qcompiler.compile(...) with no output_dir owns its temporary artifact: it is gone once
    the module is; an explicit output_dir is the caller's and stays."""
    import gc

    import numpy as np

    import qcompiler

    model = os.path.join(ROOT, "examples", "mlp_int4.onnx")
    m = qcompiler.compile(model, "ref")
    tmp = m.directory
    y = m.run({"x": np.ones((2, 64), np.float32)})["y"]
    assert os.path.isdir(tmp) and np.isfinite(y).all()
    del m
    gc.collect()
    assert not os.path.exists(tmp)
    kept = qcompiler.compile(model, "ref", str(tmp_path / "out"))
    del kept
    gc.collect()
    assert os.path.isfile(tmp_path / "out" / "manifest.json")


def test_pass_option_sets_an_option_of_the_default_pipeline(tmp_path, capsys):
    """--pass-option PASS.OPTION=VALUE: the target's pipeline with that option set (the
    report's pipeline line shows it), repeatable."""
    assert main([EXAMPLE, "-o", str(tmp_path), "--target", "cpu", "--pass-option",
                 "cpu-schedule.numerics=int8", "--pass-option", "cpu-schedule.numerics=exact"]) == 0
    report = (tmp_path / "report.txt").read_text()
    assert "cpu-schedule{numerics=exact}" in report, report[:600]
