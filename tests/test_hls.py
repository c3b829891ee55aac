"""FPGA HLS backend: generated sources, C simulation bit-exact with the numpy model of the
same fixed-point arithmetic, within a stated tolerance of the float reference, sanitizers,
and an ONNX MatMulNBits MLP end to end against onnxruntime."""
import json
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from conftest import check_golden
from qcompiler.codegen.hls.backend import HLSError, build_csim, design, run_csim, top_name
from qcompiler.codegen.hls.numerics import simulate
from qcompiler.driver.api import compile_to_dir
from qcompiler.frontends.onnx import load
from qcompiler.runtime.reference import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from make_example_model import float_mlp, quantize_matmul_nbits  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden", "hls")
# Fixed point with 10 fraction bits on activations: inputs are rounded by 2^-11, which the
# layers amplify by at most sum|w| each; for these small random MLPs that stays under 1% of
# the largest output (checked below against the float reference of the same quantized model).
FLOAT_TOLERANCE = 1e-2


def _compile(model, tmp_path, target="fpga-pynq-z2", quant=None, extra=""):
    passes = "canonicalize,"
    if quant:
        passes += f"quantize-weights{{{quant}}},"
    passes += (f"fuse-dequant,canonicalize,hls-fixed-point{extra},"
               f"hls-parallelism{{target={target}}}")
    out_dir, module = compile_to_dir(model, target, str(tmp_path), passes, verify_each=True)
    return out_dir, module


def _csim(out_dir, module):
    return build_csim(os.path.join(out_dir, "kernels"), top_name(module))


@pytest.mark.parametrize("bits, group, symmetric, sizes", [
    (4, 32, False, (64, 48, 16)),
    (2, 16, False, (32, 40, 24, 8)),
    (8, 64, True, (96, 32, 10)),
    (4, 0, True, (40, 24, 12)),      # per-channel scales; K=40 padded to whole words
    (3, 32, False, (64, 32, 8)),     # 3-bit codes, 8 to a word
])
def test_csim_is_bit_exact_with_the_model(tmp_path, bits, group, symmetric, sizes):
    model = float_mlp(sizes=sizes, seed=bits + group, act="Relu")
    quant = f"bits={bits},group={group},symmetric={str(symmetric).lower()}"
    out_dir, module = _compile(model, tmp_path, quant=quant)
    layers = design(module)
    x = np.random.default_rng(bits).standard_normal((7, sizes[0])).astype(np.float32)
    want = simulate(layers, x)
    got = run_csim(_csim(out_dir, module), x, expected=want)
    np.testing.assert_array_equal(got, want)
    ref = run(module, {"x": x})["y"]  # the float semantics of the same quantized model
    assert np.abs(got - ref).max() <= FLOAT_TOLERANCE * np.abs(ref).max()


def test_load_runs_the_c_simulation_and_matches_onnxruntime(tmp_path):
    """An ONNX MatMulNBits MLP (onnxruntime's quantizer) end to end."""
    import onnxruntime as ort

    model = quantize_matmul_nbits(float_mlp(sizes=(64, 96, 32, 16), seed=3, act="Relu"),
                                  bits=4, block_size=32, symmetric=False)
    path = str(tmp_path / "mlp_mnb.onnx")
    onnx.save(model, path)
    m = qcompiler.compile(path, target="fpga-zcu104", output_dir=str(tmp_path / "out"))
    x = np.random.default_rng(11).standard_normal((5, 64)).astype(np.float32)
    got = m.run({"x": x})["y"]
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape == (5, 16)
    assert np.abs(got - want).max() <= FLOAT_TOLERANCE * np.abs(want).max()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    est = report["kernels"][0]["estimate"]
    for key in ["BestLatency", "WorstLatency", "IntervalMin", "DSP", "BRAM_18K", "LUT", "FF",
                "URAM"]:
        assert key in est
    for layer in report["kernels"][0]["layers"]:
        assert layer["config"]["pe"] >= 1 and layer["config"]["simd"] >= 1


def _act_order_model(seed=5, K=64, N=24, block=16):
    """MatMulNBits with a shuffled g_idx (GPTQ act-order) and no zero points."""
    rng = np.random.default_rng(seed)
    nblk = K // block
    g_idx = np.repeat(np.arange(nblk), block)
    rng.shuffle(g_idx)
    codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(N, nblk, block // 2)
    scales = (rng.random((N, nblk)) * 0.05 + 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"),
             numpy_helper.from_array(g_idx.astype(np.int32), "G")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "", "G"], ["y"],
                            domain="com.microsoft", K=K, N=N, bits=4, block_size=block)
    g = helper.make_graph([node], "actorder",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21),
                                            helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


def test_act_order_is_a_permutation_at_load(tmp_path):
    out_dir, module = _compile(_act_order_model(), tmp_path, target="fpga-u250")
    src = (tmp_path / "kernels" / f"{top_name(module)}.cpp").read_text()
    assert "_INV_PERM[k]] = x_in.read()" in src  # scattered once on load, not in the loop
    layers = design(module)
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    got = run_csim(_csim(out_dir, module), x)
    np.testing.assert_array_equal(got, simulate(layers, x))
    ref = run(module, {"x": x})["y"]
    assert np.abs(got - ref).max() <= FLOAT_TOLERANCE * np.abs(ref).max()


def test_csim_is_clean_under_asan_and_ubsan(tmp_path):
    model = float_mlp(sizes=(32, 24, 8), seed=1, act="Relu")
    out_dir, module = _compile(model, tmp_path, quant="bits=4,group=16")
    exe = build_csim(os.path.join(out_dir, "kernels"), top_name(module),
                     ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g", "-O1"))
    x = np.random.default_rng(4).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_array_equal(run_csim(exe, x), simulate(design(module), x))


def test_bigger_part_gets_more_parallelism(tmp_path):
    model = float_mlp(sizes=(256, 256, 64), seed=2, act="Relu")
    pe = {}
    for target in ["fpga-pynq-z2", "fpga-u250"]:
        _, module = _compile(model, tmp_path / target, target=target, quant="bits=4,group=32")
        cfgs = [n.attrs["config"] for n in module.main.nodes if n.op == "qmatmul"]
        pe[target] = sum(c["pe"] * c["simd"] for c in cfgs)
    assert pe["fpga-u250"] > pe["fpga-pynq-z2"]


def test_unsupported_graph_is_refused_with_the_op(tmp_path):
    model = float_mlp(sizes=(32, 16, 8), act="Gelu")
    with pytest.raises(ValueError, match="gelu"):
        _compile(model, tmp_path, quant="bits=4,group=16")


def test_golden_sources(update_goldens, tmp_path):
    """A canonical 2-layer design (`make goldens` updates; review the diff)."""
    model = float_mlp(sizes=(32, 16, 8), seed=0, act="Relu")
    out_dir, module = _compile(model, tmp_path, quant="bits=4,group=16")
    top = top_name(module)
    for name in [f"{top}.h", f"{top}.cpp", f"{top}_weights.h", f"{top}_tb.cpp",
                 "hls_config.cfg", "run_hls.tcl"]:
        with open(os.path.join(out_dir, "kernels", name)) as f:
            check_golden(os.path.join(GOLDEN, name), f.read(), update_goldens)
