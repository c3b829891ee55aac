"""Bad input gets a clear, one-line error naming the culprit, never a deep traceback.

Every failure is a ``qcompiler.frontends.onnx.FrontendError`` (or the driver's
``CompileError``) without a chained cause, whose message names what is wrong: the file path,
the node, op, domain and opset, or the missing value; the CLI turns it into one
``qcompile: error: ...`` line and exit status 1.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.driver.api import CompileError
from qcompiler.driver.cli import main
from qcompiler.frontends.onnx import FrontendError, load
from qcompiler.runtime.reference import run

from onnx_models import IR_VERSION, matmul_nbits


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 21),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = IR_VERSION
    return m


def _x(shape=(2, 3), elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info("x", elem, list(shape))


def _y():
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, None)


def _fails(model, *needles: str) -> str:
    """load(model) raises a chain-free, one-line FrontendError containing every needle."""
    with pytest.raises(FrontendError) as info:
        load(model)
    err = info.value
    msg = str(err)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), \
        f"chained exception behind: {err.__context__!r}"
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return matmul_nbits().SerializeToString()


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_truncated_file(tmp_path, model_bytes):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(model_bytes[:len(model_bytes) // 2])
    msg = _fails(str(path), str(path), "not a valid ONNX model")
    assert "truncated" in msg


def test_truncated_bytes(model_bytes):
    _fails(model_bytes[:len(model_bytes) // 2], "the given bytes", "not a valid ONNX model")


@pytest.mark.parametrize("content", [
    b"this is a text file, not an ONNX model\n" * 10,
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00",
], ids=["text", "png"])
def test_not_an_onnx_file(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    msg = _fails(str(path), str(path))
    assert re.search(r"not (a valid ONNX|an ONNX) model", msg), msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _fails(str(path), str(path), "empty file")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "model.onnx"
    _fails(str(path), str(path), "no such file")


def test_directory_instead_of_file(tmp_path):
    _fails(str(tmp_path), str(tmp_path), "directory")


# --------------------------------------------------------------------------------------------
# graphs
# --------------------------------------------------------------------------------------------


def test_missing_initializer():
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc0/MatMul")], [_x()], [_y()])
    _fails(m, "'fc0/MatMul'", "MatMul", "'W'", "neither a graph input, an initializer")


def test_missing_input_of_a_later_node():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Add", ["r", "bias_missing"], ["y"], name="add0")]
    _fails(_model(nodes, [_x()], [_y()]), "'add0'", "op Add", "'bias_missing'")


def test_mismatched_matmul_shapes():
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 5))
                                .astype(np.float32), "W")
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0")], [_x((2, 3))], [_y()],
               [w])
    _fails(m, "'mm0'", "MatMul", "(2, 3)", "(4, 5)")


def test_unknown_custom_domain_op():
    m = _model([helper.make_node("FancyOp", ["x"], ["y"], name="fancy0", domain="com.example")],
               [_x()], [_y()], opsets=(("", 21), ("com.example", 3)))
    _fails(m, "'fancy0'", "FancyOp", "com.example", "opset 3", "unsupported op")


def test_custom_domain_missing_from_opset_import():
    m = _model([helper.make_node("FancyOp", ["x"], ["y"], name="fancy0", domain="com.example")],
               [_x()], [_y()])
    _fails(m, "'fancy0'", "FancyOp", "'com.example'", "opset_import")


def test_unknown_standard_op():
    m = _model([helper.make_node("Det", ["x"], ["y"], name="det0")], [_x((3, 3))], [_y()])
    msg = _fails(m, "'det0'", "op Det", "domain ai.onnx", "opset 21", "unsupported op")
    assert "MatMulNBits" in msg  # the message lists what is supported


def test_unnamed_node_is_named_by_its_index():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Det", ["r"], ["y"])]
    _fails(_model(nodes, [_x((3, 3))], [_y()]), "'#1'", "op Det")


def test_output_produced_by_no_node():
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu0")], [_x()], [_y()])
    _fails(m, "graph output 'y'", "produced by no node")


def test_unsupported_element_type():
    m = _model([helper.make_node("Identity", ["x"], ["y"], name="id0")],
               [_x(elem=TensorProto.STRING)], [_y()])
    _fails(m, "graph input 'x'", "STRING", "not supported")


@pytest.mark.parametrize("op, inputs, missing", [
    ("DequantizeLinear", ["x"], "#1 (x_scale)"),
    ("DequantizeLinear", ["x", ""], "#1 (x_scale)"),
    ("QuantizeLinear", ["x"], "#1 (y_scale)"),
    ("Gemm", ["x"], "#1 (B)"),
    ("QLinearMatMul", ["x", "x", "x"], "#3 (b)"),
    ("Reshape", ["x"], "#1 (shape)"),
])
def test_missing_required_input(op, inputs, missing):
    """Inputs ONNX's schema requires are checked before the op is imported."""
    elem = TensorProto.UINT8 if op in ("DequantizeLinear", "QLinearMatMul") else TensorProto.FLOAT
    m = _model([helper.make_node(op, inputs, ["y"], name="n0")], [_x((3, 3), elem)], [_y()])
    _fails(m, "'n0'", f"op {op}", f"required input {missing}", "is missing")


def test_quantization_axis_out_of_range():
    s = numpy_helper.from_array(np.full(3, 0.5, np.float32), "s")
    m = _model([helper.make_node("DequantizeLinear", ["x", "s"], ["y"], name="dq0", axis=5)],
               [_x((2, 3), TensorProto.UINT8)], [_y()], [s])
    _fails(m, "'dq0'", "DequantizeLinear", "axis=5", "rank-2")


@pytest.mark.parametrize("n", [1, 4])
def test_one_element_scale_on_a_vector_is_per_tensor(n):
    """Not an error: a [1] scale is per-tensor for any input rank (ONNX, onnxruntime), also
    with the default axis=1 on a 1-D input."""
    inits = [numpy_helper.from_array(np.array([0.5], np.float32), "s"),
             numpy_helper.from_array(np.array([3], np.uint8), "z")]
    m = _model([helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], name="dq0")],
               [_x((n,), TensorProto.UINT8)], [_y()], inits)
    x = (np.arange(n) + 7).astype(np.uint8)
    y = run(load(m), {"x": x})["y"]
    np.testing.assert_array_equal(y, (x.astype(np.float32) - 3) * 0.5)


# --------------------------------------------------------------------------------------------
# the driver and the CLI
# --------------------------------------------------------------------------------------------


def _det_file(tmp_path) -> str:
    path = tmp_path / "det.onnx"
    onnx.save(_model([helper.make_node("Det", ["x"], ["y"], name="det0")], [_x((3, 3))],
                     [_y()]), str(path))
    return str(path)


def test_compile_raises_the_frontend_error(tmp_path):
    with pytest.raises(FrontendError, match=r"op Det"):
        qcompiler.compile(_det_file(tmp_path), target="ref", output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_compile_unknown_target(tmp_path, model_bytes):
    path = tmp_path / "m.onnx"
    path.write_bytes(model_bytes)
    with pytest.raises(CompileError, match="no-such-target"):
        qcompiler.compile(str(path), target="no-such-target", output_dir=str(tmp_path / "out"))


def _cli_fails(argv, capsys, *needles: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error: "), err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def test_cli_unknown_op(tmp_path, capsys):
    out = tmp_path / "out"
    _cli_fails([_det_file(tmp_path), "-o", str(out)], capsys, "Det", "det0", "ai.onnx")
    assert not out.exists()


def test_cli_missing_file(tmp_path, capsys):
    path = str(tmp_path / "missing.onnx")
    _cli_fails([path, "-o", str(tmp_path / "out")], capsys, path, "no such file")


def test_cli_truncated_file(tmp_path, capsys, model_bytes):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(model_bytes[:len(model_bytes) // 2])
    _cli_fails([str(path), "-o", str(tmp_path / "out")], capsys, str(path), "truncated")


def test_cli_mismatched_shapes(tmp_path, capsys):
    w = numpy_helper.from_array(np.ones((4, 5), np.float32), "W")
    path = tmp_path / "bad_shapes.onnx"
    onnx.save(_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0")],
                     [_x((2, 3))], [_y()], [w]), str(path))
    _cli_fails([str(path), "-o", str(tmp_path / "out")], capsys, "mm0", "MatMul", "(4, 5)")
