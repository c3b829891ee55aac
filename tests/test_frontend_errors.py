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
    _fails(m, "'fancy0'", "FancyOp (com.example opset 3)", "unsupported ops")


def test_custom_domain_missing_from_opset_import():
    m = _model([helper.make_node("FancyOp", ["x"], ["y"], name="fancy0", domain="com.example")],
               [_x()], [_y()])
    _fails(m, "'fancy0'", "FancyOp", "'com.example'", "opset_import")


def test_unknown_standard_op():
    m = _model([helper.make_node("StringNormalizer", ["x"], ["y"], name="det0")], [_x((3, 3))], [_y()])
    msg = _fails(m, "'det0'", "StringNormalizer (ai.onnx opset 21)", "x1 node", "unsupported ops")
    assert msg == "unsupported ops: StringNormalizer (ai.onnx opset 21) x1 node 'det0'"  # nothing else


def test_all_unsupported_ops_are_listed_at_once():
    """Each unsupported op once, with its count and first three node names, in graph order;
    supported ops in between are not mentioned and no list of supported ops follows."""
    nodes = [helper.make_node("StringNormalizer", ["x"], ["d0"], name="det0"),
             helper.make_node("Relu", ["d0"], ["r"], name="relu0"),
             helper.make_node("FancyOp", ["r"], ["f"], name="fancy0", domain="com.example")]
    prev = "f"
    for i in range(1, 5):
        nodes.append(helper.make_node("StringNormalizer", [prev], [f"d{i}"], name=f"det{i}"))
        prev = f"d{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    m = _model(nodes, [_x((3, 3))], [_y()], opsets=(("", 21), ("com.example", 3)))
    msg = _fails(m)
    assert msg == ("unsupported ops: StringNormalizer (ai.onnx opset 21) x5 nodes 'det0', 'det1', 'det2' "
                   "and 2 more; FancyOp (com.example opset 3) x1 node 'fancy0'"), msg


def test_unnamed_node_is_named_by_its_index():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("StringNormalizer", ["r"], ["y"])]
    _fails(_model(nodes, [_x((3, 3))], [_y()]), "node '#1'", "StringNormalizer (ai.onnx")


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
    onnx.save(_model([helper.make_node("StringNormalizer", ["x"], ["y"], name="det0")], [_x((3, 3))],
                     [_y()]), str(path))
    return str(path)


def test_compile_raises_the_frontend_error(tmp_path):
    with pytest.raises(FrontendError, match=r"unsupported ops: StringNormalizer "):
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
    _cli_fails([_det_file(tmp_path), "-o", str(out)], capsys, "StringNormalizer", "det0", "ai.onnx")
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


# --------------------------------------------------------------------------------------------
# at least as strict as onnxruntime (issue #18): each case below is one onnxruntime refuses
# --------------------------------------------------------------------------------------------


def _relu_model(**stamp) -> onnx.ModelProto:
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu0")], [_x()], [_y()])
    for key, value in stamp.items():
        setattr(m, key, value)
    return m


@pytest.mark.parametrize("ir_version", [0, 2, onnx.IR_VERSION + 1, 99])
def test_ir_version_out_of_range(ir_version):
    _fails(_relu_model(ir_version=ir_version), f"ir_version {ir_version}", "supported: 3..")


@pytest.mark.parametrize("opset", [1, 5, onnx.defs.onnx_opset_version() + 1, 99])
def test_default_opset_out_of_range(opset):
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu0")], [_x()], [_y()],
               opsets=(("", opset),))
    _fails(m, f"opset {opset}", "'ai.onnx'", "supported: 6..")


def test_older_opset_reads_as_the_lowest_where_its_ops_are_unchanged():
    """Below opset 6 a model imports as opset 6 when every op it uses is defined the same at
    both (Not since opset 1); otherwise the error names the ops that changed (Relu at 6)."""
    y = helper.make_tensor_value_info("y", TensorProto.BOOL, None)
    m = _model([helper.make_node("Not", ["x"], ["y"])], [_x(elem=TensorProto.BOOL)], [y],
               opsets=(("", 1),))
    x = np.array([[True, False, True], [False, False, True]])
    assert (run(load(m), {"x": x})["y"] == ~x).all()
    m = _model([helper.make_node("Not", ["x"], ["t"]), helper.make_node(
        "Relu", ["f"], ["y"])], [_x(elem=TensorProto.BOOL), _x((2, 3))], [_y()],
               opsets=(("", 5),))
    m.graph.input[1].name = "f"
    _fails(m, "opset 5", "read as 6", "Relu changed since")


def test_contrib_opset_out_of_range():
    m = _mnb(opsets=(("", 21), ("com.microsoft", 2)))
    _fails(m, "opset 2", "'com.microsoft'", "supported: 1..1")


def test_duplicate_initializers_are_refused():
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    m = _model([helper.make_node("Add", ["x", "w"], ["y"], name="add0")], [_x()], [_y()],
               [w, w])
    _fails(m, "initializer 'w'", "defined twice")


@pytest.mark.parametrize("redefined", ["x", "w", "r"])
def test_a_value_defined_twice_is_refused(redefined):
    """A node output that redefines a graph input, an initializer or an earlier output."""
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Neg", ["x"], [redefined], name="neg0"),
             helper.make_node("Add", ["r", "w"], ["y"], name="add0")]
    _fails(_model(nodes, [_x()], [_y()], [w]), "'neg0'", f"output {redefined!r}",
           "already defined")


def test_duplicate_graph_input_is_refused():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu0")], [_x(), _x()], [_y()])
    _fails(m, "graph input 'x'", "declared twice")


def test_initializer_that_is_also_an_input_is_its_default_constant():
    """IR < 4 style (onnxruntime: an input defaulting to the initializer): a constant."""
    w_arr = np.random.default_rng(2).standard_normal(3).astype(np.float32)
    m = _model([helper.make_node("Add", ["x", "w"], ["y"], name="add0")],
               [_x(), helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])], [_y()],
               [numpy_helper.from_array(w_arr, "w")])
    module = load(m)
    assert [a.name for a in module.main.args] == ["x"]
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(module, {"x": x})["y"], x + w_arr)


def test_graph_input_dims_must_not_be_negative():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="relu0")], [_x([2, -1])], [_y()])
    _fails(m, "graph input 'x'", "[2, -1]", ">= 0")


def test_zero_size_graph_input_runs():
    """onnxruntime runs zero-size tensors (the ONNX node suite's empty-set reductions)."""
    m = _model([helper.make_node("ReduceSum", ["x"], ["y"], name="sum0", keepdims=0)],
               [_x([0, 3])], [_y()], opsets=(("", 11),))
    got = run(load(m), {"x": np.zeros((0, 3), np.float32)})["y"]
    assert got.shape == () and got == 0


# -- MatMulNBits -------------------------------------------------------------------------------

K, N, BLOCK = 40, 8, 16   # ragged K: 3 blocks of 16
NBLK = -(-K // BLOCK)


def _mnb(B=None, S=None, Z=None, G=None, bias=None, opsets=(("", 21), ("com.microsoft", 1)),
         a_shape=("batch", K), **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    attrs = {"K": K, "N": N, "bits": 4, "block_size": BLOCK, **attrs}
    B = rng.integers(0, 256, (N, NBLK, BLOCK // 2), dtype=np.uint8) if B is None else B
    S = rng.uniform(0.01, 0.1, (N, NBLK)).astype(np.float32) if S is None else S
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(S, "S")]
    names = ["A", "B", "S"]
    for name, arr in (("Z", Z), ("G", G), ("bias", bias)):
        names.append(name if arr is not None else "")
        if arr is not None:
            inits.append(numpy_helper.from_array(arr, name))
    while names[-1] == "":
        names.pop()
    node = helper.make_node("MatMulNBits", names, ["y"], name="mnb0", domain="com.microsoft",
                            **attrs)
    return _model([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT,
                                                         list(a_shape))],
                  [_y()], inits, opsets=opsets)


def test_matmul_nbits_valid_forms_import_and_match_numpy():
    """The accepted layouts (1-D or 2-D scales, packed or float zero points) give the same
    numbers as a numpy dequantize + matmul of the same codes."""
    rng = np.random.default_rng(12)
    codes = rng.integers(0, 16, (N, NBLK * BLOCK), dtype=np.uint8)
    B = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, NBLK, BLOCK // 2)
    S = rng.uniform(0.01, 0.1, (N, NBLK)).astype(np.float32)
    zf = rng.uniform(0, 15, (N, NBLK)).astype(np.float32)
    zc = rng.integers(0, 16, (N, NBLK + 1), dtype=np.uint8)
    zp_packed = (zc[:, 0::2] | (zc[:, 1::2] << 4)).astype(np.uint8)   # [N, 2]
    a = rng.standard_normal((3, K)).astype(np.float32)
    for s, z, z_real in ((S, zp_packed, zc[:, :NBLK]), (S.reshape(-1), zp_packed.reshape(-1),
                                                          zc[:, :NBLK]),
                         (S, zf, zf), (S.reshape(-1), zf.reshape(-1), zf)):
        w = (codes[:, :K].astype(np.float32) - np.repeat(z_real, BLOCK, 1)[:, :K]) \
            * np.repeat(S, BLOCK, 1)[:, :K]
        y = run(load(_mnb(B=B, S=s, Z=z)), {"A": a})["y"]
        np.testing.assert_allclose(y, a @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs, needle", [
    ({"K": 0}, "K=0"), ({"N": 0}, "N=0"), ({"K": -40}, "K=-40"),
    ({"bits": 3}, "bits=3"), ({"bits": 16}, "bits=16"),
    ({"block_size": 8}, "block_size=8"), ({"block_size": 512}, "block_size=512"),
    ({"block_size": 24}, "block_size=24"),
])
def test_matmul_nbits_attributes(attrs, needle):
    _fails(_mnb(a_shape=("batch", "k"), **attrs), "'mnb0'", "MatMulNBits", needle)


@pytest.mark.parametrize("what, kwargs, needle", [
    ("B 2-D", {"B": np.zeros((N, NBLK * BLOCK // 2), np.uint8)}, "B is"),
    ("B 1-D", {"B": np.zeros(N * NBLK * BLOCK // 2, np.uint8)}, "B is"),
    ("B int8", {"B": np.zeros((N, NBLK, BLOCK // 2), np.int8)}, "B is"),
    ("scales transposed", {"S": np.ones((NBLK, N), np.float32)}, "scales is"),
    ("scales tiled", {"S": np.ones((N, 2 * NBLK), np.float32)}, "scales is"),
    ("scales f16", {"S": np.ones((N, NBLK), np.float16)}, "scales is"),
    ("packed zp tiled", {"Z": np.zeros((N, 4), np.uint8)}, "packed u8 zero_points"),
    ("packed zp transposed", {"Z": np.zeros((2, N), np.uint8)}, "packed u8 zero_points"),
    ("float zp transposed", {"Z": np.zeros((NBLK, N), np.float32)}, "float zero_points"),
    ("zp int8", {"Z": np.zeros((N, 2), np.int8)}, "zero_points must be"),
    ("g_idx int64", {"G": np.zeros(K, np.int64)}, "g_idx is"),
    ("g_idx 2^40", {"G": np.full(K, 1 << 40, np.int64)}, "g_idx is"),
    ("g_idx short", {"G": np.zeros(K - 1, np.int32)}, "g_idx is"),
    ("g_idx out of range", {"G": np.full(K, NBLK, np.int32)}, "g_idx values"),
    ("g_idx negative", {"G": np.full(K, -1, np.int32)}, "g_idx values"),
    ("bias of K", {"bias": np.zeros(K, np.float32)}, "bias is"),
])
def test_matmul_nbits_operand_shapes(what, kwargs, needle):
    _fails(_mnb(**kwargs), "'mnb0'", "MatMulNBits", needle)


def test_matmul_nbits_a_of_another_k():
    _fails(_mnb(a_shape=("batch", K + 1)), "'mnb0'", f"K={K}")


# -- Q/DQ auxiliary tensors --------------------------------------------------------------------


def _dq(x, scale, zp=None, **attrs) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(x, "q"), numpy_helper.from_array(scale, "s")]
    names = ["q", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
        names.append("z")
    nodes = [helper.make_node("DequantizeLinear", names, ["d"], name="dq0", **attrs),
             helper.make_node("Add", ["x", "d"], ["y"], name="add0")]
    return _model(nodes, [_x((4, 6))], [_y()], inits)


Q = np.arange(24, dtype=np.uint8).reshape(4, 6)


@pytest.mark.parametrize("scale, zp, attrs, needle", [
    (np.ones(5, np.float32), None, {"axis": 1}, "scale shape (5,)"),
    (np.ones((1, 6), np.float32), None, {"axis": 1}, "per-axis scale must be 1-D"),
    (np.ones(6, np.float32), np.zeros(5, np.uint8), {"axis": 1}, "zero point shape (5,)"),
    (np.float32(1), np.zeros(2, np.uint8), {}, "zero point shape (2,)"),
    (np.ones((3, 6), np.float32), None, {"axis": 0, "block_size": 2}, "scale shape (3, 6)"),
    (np.ones((2, 5), np.float32), None, {"axis": 0, "block_size": 2}, "scale shape (2, 5)"),
    (np.ones((2, 6), np.float32), np.zeros((2, 5), np.uint8), {"axis": 0, "block_size": 2},
     "zero point shape (2, 5)"),
    (np.ones((2, 6), np.float32), None, {"axis": 0, "block_size": -2}, "block_size=-2"),
    (np.ones(6, np.float32), np.zeros(6, np.int8), {"axis": 1}, "zero point is i8"),
    (np.int32(2), None, {}, "scale must be a float"),
])
def test_qdq_auxiliary_tensors(scale, zp, attrs, needle):
    _fails(_dq(Q, scale, zp, **attrs), "'dq0'", "DequantizeLinear", needle)


def test_damaged_names_are_refused():
    m = _relu_model()
    data = m.SerializeToString().replace(b"relu0", b"rel\xe1u")
    _fails(data, "not valid UTF-8")


# -- coverage check and low-bit inputs (issue #13) ----------------------------------------------


def test_qcompile_check_reports_coverage(tmp_path, capsys):
    from qcompiler.driver.cli import main

    nodes = [helper.make_node("Cos", ["x"], ["a"], name="cos0"),
             helper.make_node("StringNormalizer", ["a"], ["b"], name="det0"),
             helper.make_node("StringNormalizer", ["b"], ["y"], name="det1")]
    path = tmp_path / "m.onnx"
    onnx.save(_model(nodes, [_x((3, 3))], [_y()]), str(path))
    assert main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "2 ops in 3 nodes; 1 supported, 1 not" in out
    assert "ok           Cos (opset 21) x1" in out
    assert "unsupported  StringNormalizer (opset 21) x2" in out
    assert not (tmp_path / "qc_out").exists()  # nothing compiled
    onnx.save(_model(nodes[:1], [_x((3, 3))], [helper.make_tensor_value_info(
        "a", TensorProto.FLOAT, None)]), str(path))
    assert main(["--check", str(path)]) == 0


def test_run_accepts_ml_dtypes_low_bit_inputs():
    """An int4 / uint4 / int2 input arriving as an ml_dtypes array (as onnx and onnxruntime
    hand them out) runs as its codes."""
    import ml_dtypes

    rng = np.random.default_rng(13)
    for onnx_type, ml_type, lo, hi in ((TensorProto.INT4, ml_dtypes.int4, -8, 7),
                                       (TensorProto.UINT4, ml_dtypes.uint4, 0, 15),
                                       (TensorProto.INT2, ml_dtypes.int2, -2, 1)):
        m = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                   [_x((2, 5), onnx_type)], [_y()])
        codes = rng.integers(lo, hi + 1, size=(2, 5))
        got = run(load(m), {"x": codes.astype(ml_type)})["y"]
        np.testing.assert_array_equal(got, codes.astype(np.float32))
