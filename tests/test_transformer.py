"""A transformer encoder layer written the way exporters write it (dynamic reshapes from
Shape/Gather/Concat, decomposed LayerNorm and GELU, masks with Equal/Where), with symbolic
batch and sequence: imported, compiled and run against onnxruntime."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.driver.api import run_pipeline
from qcompiler.frontends.onnx import load
from qcompiler.ir import parse_module, print_module
from qcompiler.runtime.reference import run

D, H, FF = 32, 4, 64


def encoder_layer(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = []

    def w(name, *shape, scale=None):
        arr = (rng.standard_normal(shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32)
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def c(name, value, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    N = helper.make_node
    nodes = [
        # Decomposed LayerNorm (what older exporters write): mean, var, sqrt, div.
        N("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1),
        N("Sub", ["x", "mu"], ["xc"]),
        N("Pow", ["xc", c("two", 2.0, np.float32)], ["xc2"]),
        N("ReduceMean", ["xc2"], ["var"], axes=[-1], keepdims=1),
        N("Add", ["var", c("eps", 1e-5, np.float32)], ["var_eps"]),
        N("Sqrt", ["var_eps"], ["std"]),
        N("Div", ["xc", "std"], ["xn"]),
        N("Mul", ["xn", w("ln_g", D, scale=1.0)], ["xg"]),
        N("Add", ["xg", w("ln_b", D, scale=0.1)], ["h"]),
        # Fused QKV projection, split in three.
        N("MatMul", ["h", w("wqkv", D, 3 * D)], ["qkv0"]),
        N("Add", ["qkv0", w("bqkv", 3 * D, scale=0.1)], ["qkv"]),
        N("Split", ["qkv", c("split", [D, D, D])], ["q", "k", "v"], axis=-1),
        # Dynamic head reshape: [B, S, D] -> [B, S, H, D/H] from Shape/Gather/Concat.
        N("Shape", ["x"], ["shp"]),
        N("Gather", ["shp", c("i0", 0)], ["b"], axis=0),
        N("Gather", ["shp", c("i1", 1)], ["s"], axis=0),
        N("Unsqueeze", ["b", c("ax0", [0])], ["b1"]),
        N("Unsqueeze", ["s", c("ax0b", [0])], ["s1"]),
        N("Concat", ["b1", "s1", c("hd", [H, D // H])], ["hshape"], axis=0),
    ]
    for t in "qkv":
        nodes += [N("Reshape", [t, "hshape"], [f"{t}4"]),
                  N("Transpose", [f"{t}4"], [f"{t}t"], perm=[0, 2, 1, 3])]
    nodes += [
        N("Transpose", ["kt"], ["ktt"], perm=[0, 1, 3, 2]),
        N("MatMul", ["qt", "ktt"], ["sc0"]),
        N("Div", ["sc0", c("sqrtd", np.sqrt(D // H), np.float32)], ["sc1"]),
        # Padding mask: positions where mask == 0 get -1e4.
        N("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        N("Equal", ["mask", c("zero64", 0)], ["pad"]),
        N("Unsqueeze", ["pad", c("ax12", [1, 2])], ["pad4"]),
        N("Expand", [c("neg", -1e4, np.float32), "shp2"], ["negs"]),
        N("Shape", ["sc1"], ["shp2"]),
        N("Where", ["pad4", "negs", "sc1"], ["sc2"]),
        N("Softmax", ["sc2"], ["p"], axis=-1),
        N("MatMul", ["p", "vt"], ["ctx4"]),
        N("Transpose", ["ctx4"], ["ctxt"], perm=[0, 2, 1, 3]),
        N("Concat", ["b1", "s1", c("dd", [D])], ["oshape"], axis=0),
        N("Reshape", ["ctxt", "oshape"], ["ctx"]),
        N("MatMul", ["ctx", w("wo", D, D)], ["ao0"]),
        N("Add", ["ao0", w("bo", D, scale=0.1)], ["ao"]),
        N("Add", ["x", "ao"], ["r1"]),
        N("LayerNormalization", ["r1", w("ln2_g", D, scale=1.0), w("ln2_b", D, scale=0.1)],
          ["h2"], axis=-1, epsilon=1e-5),
        # FFN with GELU written as x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports it.
        N("Gemm", ["h2flat", w("w1t", FF, D), w("bff1", FF, scale=0.1)], ["f1flat"], transB=1),
        N("Div", ["f1", c("sqrt2", np.sqrt(2.0), np.float32)], ["f1s"]),
        N("Erf", ["f1s"], ["f1e"]),
        N("Add", ["f1e", c("one", 1.0, np.float32)], ["f1e1"]),
        N("Mul", ["f1", "f1e1"], ["f1m"]),
        N("Mul", ["f1m", c("half", 0.5, np.float32)], ["g"]),
        N("MatMul", ["g", w("w2", FF, D)], ["f2"]),
        N("Add", ["r1", "f2"], ["y0"]),
        N("Slice", ["y0", c("st", [0]), c("en", [D // 2]), c("axs", [2])], ["y_half"]),
        N("Tanh", ["y_half"], ["y"]),
    ]
    # The FFN runs on [B*S, D] for Gemm: reshape around it with -1 (symbolic B*S).
    nodes.insert(nodes.index(next(n for n in nodes if n.op_type == "Gemm")),
                 N("Reshape", ["h2", c("flat", [-1, D])], ["h2flat"]))
    nodes.insert(nodes.index(next(n for n in nodes if n.op_type == "Gemm")) + 1,
                 N("Reshape", ["f1flat", "ffshape"], ["f1"]))
    nodes.insert(nodes.index(next(n for n in nodes if n.op_type == "Gemm")),
                 N("Concat", ["b1", "s1", c("ffd", [FF])], ["ffshape"], axis=0))
    # Topologically order (Expand uses shp2 defined after it above).
    done, sorted_nodes = {"x", "mask"} | {i.name for i in inits}, []
    pending = list(nodes)
    while pending:
        for n in pending:
            if all(i in done for i in n.input):
                sorted_nodes.append(n)
                done.update(n.output)
                pending.remove(n)
                break
        else:
            raise AssertionError("cycle")
    g = helper.make_graph(
        sorted_nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D // 2])],
        inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _inputs(batch, seq, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, D)).astype(np.float32)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2:] = 0  # some padding
    return {"x": x, "mask": mask}


def _ort(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_symbolic_dims_are_kept():
    m = load(encoder_layer())
    assert [a.type.shape for a in m.main.args] == [("batch", "seq", D), ("batch", "seq")]
    assert m.main.outputs[0].type.shape == ("batch", "seq", D // 2)
    text = print_module(m)
    assert print_module(parse_module(text, m.constants)) == text


@pytest.mark.parametrize("batch, seq", [(1, 5), (3, 7)])
def test_float_encoder_matches_onnxruntime(batch, seq):
    model = encoder_layer()
    feeds = _inputs(batch, seq, seed=batch * 10 + seq)
    want = _ort(model, feeds)
    imported = load(model)
    np.testing.assert_allclose(run(imported, feeds)["y"], want, rtol=1e-4, atol=1e-5)
    compiled, _, _ = run_pipeline(imported, "canonicalize,fuse-dequant,canonicalize",
                                  verify_each=True)
    assert "gemm" not in {n.op for n in compiled.main.nodes}
    np.testing.assert_allclose(run(compiled, feeds)["y"], want, rtol=1e-4, atol=1e-5)


def test_quantized_encoder_every_matmul_with_constant_weight_becomes_qmatmul(tmp_path):
    model = encoder_layer()
    m = qcompiler.compile(model, target="ref", output_dir=str(tmp_path), verify_each=True,
                          passes="canonicalize,quantize-weights{bits=8,group=16},"
                                 "fuse-dequant,canonicalize")
    ops = [n.op for n in m.module.main.nodes]
    assert ops.count("qmatmul") == 4  # qkv, out-proj, ffn1 (from Gemm transB=1), ffn2
    assert ops.count("matmul") == 2  # the two activation x activation products stay float
    feeds = _inputs(2, 6, seed=3)
    want = _ort(model, feeds)
    got = m.run(feeds)["y"]
    # 8-bit RTN weights with groups of 16: errors of a fraction of a percent of the output.
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
