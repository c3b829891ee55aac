"""Quantized CNNs on CUDA (issue #15): the passes that prepare qconv for the CUDA kernels
(conv-channels-last, cuda-conv-layout, compute-dtype's f32 islands), the kernels
(``templates/ops/qconv.cu.j2``: the int8 implicit GEMM and the direct kernel; ``pool.cu.j2``,
``quantize.cu.j2``) and whole CNNs through the device plan.

CPU side (CI): the passes keep the module's meaning exactly (reference before and after, on
every case of test_qconv's KERNEL_CASES), transposes cancel between convolutions, the CNN's
float tail stays f32, every kernel renders and a representative set compiles with nvcc for
sm_80 and sm_90. GPU side (marked ``gpu``): each case's kernel against the reference of the
same node, exactly (integer codes; float outputs to the last ulp: the epilogue is the
reference's sequence of IEEE roundings), and whole QLinearConv / QDQ models against the
reference interpreter.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from cuda_gpu_util import gpu_reason
from qcompiler.codegen.cuda.build import find_nvcc
from qcompiler.codegen.cuda.ops import CudaOpsError, kernel_source
from qcompiler.ir.core import Function, Module, constant_node
from qcompiler.ir.types import TensorType, elem
from qcompiler.pipeline import make_pass
from qcompiler.runtime.reference import run
from cuda_emulation import build_emulated, call_emulated, op_kernel_impl
from test_qconv import KERNEL_CASES, _qconv_module, qdq_conv, qlinear_conv

# test_qconv's cases (but unsigned weights: codes centred on their zero points must fit
# int8, and no u8 x u8 kernel exists; test_weights_that_do_not_fit... checks the refusal),
# plus signed activations, a stem-like layer (3 channels, 7 x 7, stride 2: the byte-gathered
# A) and a batch large enough for the 128 x 128 tile (16928 pixels).
CASES = [(conv, w, out, res, act, "u8", 2) for conv, w, out, res, act in KERNEL_CASES
         if w not in ("u8", "u4")] + [
    ((16, 24, 3, 1, 1, 1, 1, 10), "i8", "quant", True, (0.0, None), "i8", 2),
    ((8, 8, 3, 2, 1, 1, 8, 11), "i4", "quant", False, (None, None), "i8", 3),
    ((3, 64, 7, 2, 3, 1, 1, 30), "i8", "quant", False, (0.0, None), "u8", 2),
    ((16, 128, 3, 1, 1, 1, 1, 92), "i8", "quant", True, (0.0, 6.0), "u8", 2),
    # depthwise dp4a strips: float out with a float residual and a clip (vector stores of
    # f32), 12 channels (4 a vector), 5 x 5 stride 2 (a one-pixel strip's window)
    ((16, 16, 3, 1, 1, 1, 16, 9), "i8", "float", True, (None, 6.0), "i8", 2),
    ((12, 12, 3, 1, 1, 1, 12, 10), "i4", "quant", True, (0.0, None), "u8", 2),
    ((32, 32, 5, 2, 2, 1, 32, 13), "i8", "quant", False, (0.0, 6.0), "u8", 1),
    # stems on pairs of pixels (cuda_igemm_rows): MobileNet's 3 x 3 stride 2 (3 channels
    # padded to 4, lead 1), 4 channels 5 x 5 with an even left pad (lead 0, rows of 8
    # slots); an odd width keeps 4-byte words
    ((3, 32, 3, 2, 1, 1, 1, 16), "i8", "quant", True, (0.0, 6.0), "u8", 2),
    ((4, 24, 5, 2, 2, 1, 1, 14), "i4", "float", False, (None, None), "i8", 2),
    ((3, 16, 3, 2, 1, 1, 1, 17), "i8", "quant", False, (0.0, None), "u8", 2),
]


def _case_id(case):
    conv, w, out, res, act, x, n = case
    return "-".join(map(str, conv)) + f"-{w}-{out}{'-res' if res else ''}-x{x}-n{n}"


def _prepared(case):
    """(module before, module after conv-channels-last + cuda-conv-layout, its qconv, feeds)."""
    conv, w_type, out, residual, act, x_type, n = case
    rng = np.random.default_rng(sum(conv) + n)
    module, _, feeds = _qconv_module(rng, *conv, w_type=w_type, out=out, residual=residual,
                                     act=act, x_type=x_type, n=n)
    after = make_pass("cuda-conv-layout")(make_pass("conv-channels-last")(module.clone()))
    node = next(nd for nd in after.main.nodes if nd.op == "qconv")
    return module, after, node, feeds


def _rendered(cases_) -> tuple:
    """({case id: (module, prepared module, qconv node, feeds, kernel symbol)}, {symbol: the
    kernel's source}) for ``cases_``: one kernel per distinct source."""
    prepared, texts = {}, {}
    for case in cases_:
        module, after, node, feeds = _prepared(case)
        symbol, text = kernel_source(node, after)
        texts[symbol] = text
        prepared[_case_id(case)] = (module, after, node, feeds, symbol)
    return prepared, texts


# ---- CPU side ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_passes_keep_the_meaning_exactly(case):
    module, after, node, feeds = _prepared(case)
    assert node.attrs["channels_last"] == 1
    cfg = node.attrs["config"]
    depthwise_in_fours = (cfg["w_shape"][1] == 1 and cfg["w_shape"][0] == node.arg("x").type.shape[3]
                          and cfg["w_shape"][0] % 4 == 0)
    x_shape = node.arg("x").type.shape
    rows = (node.attrs["group"] == 1 and x_shape[3] == 4 and x_shape[2] % 2 == 0
            and node.attrs["strides"][1] % 2 == 0 and node.attrs["dilations"][1] == 1)
    assert cfg["w_layout"] == ("cuda_igemm_rows" if rows else
                               "cuda_igemm_mk" if node.attrs["group"] == 1
                               else "cuda_dw_t4" if depthwise_in_fours else "cuda_direct_khwcm")
    if rows:  # every output's window row starts at an even pixel
        assert (node.attrs["pads"][1] + cfg["w_lead"]) % 2 == 0
        assert cfg["w_row_taps"] % 4 == 0 and cfg["w_row_taps"] >= cfg["w_shape"][3] + cfg["w_lead"]
    assert cfg["bias_folds_x_zp"] and node.arg("bias").type.dtype.name == "i32"
    want = run(module, feeds)["y"]
    got = run(after, feeds)["y"]
    np.testing.assert_array_equal(got, want)
    kernel_source(node, after)  # renders


def test_packed_weights_hold_the_centred_codes():
    from qcompiler.runtime.reference import pack_conv_weights_cuda, unpack_conv_weights_cuda

    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (5, 3, 3, 2)).astype(np.int64)
    p = pack_conv_weights_cuda(w, "cuda_igemm_mk")
    assert p.shape == (5, 32) and (p[:, 18:] == 0).all()
    assert p[2, (1 * 2 + 1) * 3 + 2] == w[2, 2, 1, 1]  # k = (kh * KW + kw) * C + c
    np.testing.assert_array_equal(unpack_conv_weights_cuda(p, w.shape, "cuda_igemm_mk"), w)
    d = pack_conv_weights_cuda(w, "cuda_direct_khwcm")
    assert d.shape == (3, 2, 3, 5) and d[1, 0, 2, 4] == w[4, 2, 1, 0]
    np.testing.assert_array_equal(unpack_conv_weights_cuda(d, w.shape, "cuda_direct_khwcm"), w)
    # depthwise, taps four to a word: [ceil(9 / 4), M, 4], zeros past the 9th tap
    dw = rng.integers(-128, 128, (8, 1, 3, 3)).astype(np.int64)
    t4 = pack_conv_weights_cuda(dw, "cuda_dw_t4")
    assert t4.shape == (3, 8, 4) and (t4[2, :, 1:] == 0).all()
    assert t4[1, 5, 2] == dw[5, 0, 2, 0]  # tap 6 = (kh 2, kw 0): word 1, byte 2
    np.testing.assert_array_equal(unpack_conv_weights_cuda(t4, dw.shape, "cuda_dw_t4"), dw)
    # kernel rows of 8 slots, the 2 taps from slot 1: [5, 3 * 8 * 3 = 72 -> 96]
    r = pack_conv_weights_cuda(w, "cuda_igemm_rows", row_taps=8, lead=1)
    assert r.shape == (5, 96) and (r[:, 72:] == 0).all()
    assert r[2, (1 * 8 + 1 + 1) * 3 + 2] == w[2, 2, 1, 1]  # k = (kh * 8 + lead + kw) * C + c
    assert (r[:, :72].reshape(5, 3, 8, 3)[:, :, [0, 3, 4, 5, 6, 7]] == 0).all()
    np.testing.assert_array_equal(
        unpack_conv_weights_cuda(r, w.shape, "cuda_igemm_rows", row_taps=8, lead=1), w)
    with pytest.raises(ValueError, match="do not fit"):
        pack_conv_weights_cuda(w, "cuda_igemm_rows", row_taps=2, lead=1)


def test_weights_that_do_not_fit_int8_once_centred_are_left_alone():
    """u8 weights with zero point 0 span 0..255: centred they do not fit int8, so the node
    keeps its weights and the CUDA library refuses it by name."""
    rng = np.random.default_rng(5)
    module, _, _ = _qconv_module(rng, 4, 6, 3, 1, 1, 1, 1, 8, w_type="u8", w_zero_point=0)
    node = next(nd for nd in module.main.nodes if nd.op == "qconv")
    w = node.arg("w")
    big = np.full(w.type.shape, 200, np.uint8)
    node.operands[1] = constant_node(module.main, module, big, w.type, before=node).result
    after = make_pass("cuda-conv-layout")(make_pass("conv-channels-last")(module))
    node = next(nd for nd in after.main.nodes if nd.op == "qconv")
    assert "w_layout" not in (node.attrs.get("config") or {})
    with pytest.raises(CudaOpsError, match=r"%y = qconv.*cuda-conv-layout"):
        kernel_source(node, after)


def test_cpu_kernels_refuse_channels_last_nodes_they_cannot_take():
    """conv-channels-last prepares every CUDA kernel; of the CPU's, only the vnni kernel's
    channel and depthwise lanes read NHWC: a layer of thin groups (direct or madd kernel) says
    so rather than computing on the wrong layout."""
    pytest.importorskip("tvm")
    from qcompiler.codegen.cpu.ops.common import CPUBackendError
    from qcompiler.codegen.cpu.ops.kernel import primfunc_for

    conv, w_type, out, residual, act, x_type, n = next(
        c for c in CASES if c[0][:3] == (24, 18, 1) and c[0][6] == 3)   # 6 outputs a group
    module, _, _ = _qconv_module(np.random.default_rng(1), *conv, w_type=w_type, out=out,
                                 residual=residual, act=act, x_type=x_type, n=n)
    after = make_pass("conv-channels-last")(module)
    node = next(nd for nd in after.main.nodes if nd.op == "qconv")
    with pytest.raises(CPUBackendError, match=r"%y = qconv.*channels_last"):
        primfunc_for(node, module=after)


def _qlinear_chain(rng, path):
    """QLinearConv -> MaxPool -> QLinearConv (a chain of three layout-changing nodes)."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    c, m, hw = 8, 16, 12
    inits = [nh.from_array(np.array(0.05, np.float32), "xs"),
             nh.from_array(np.array(3, np.uint8), "xz"),
             nh.from_array(rng.integers(-64, 65, (m, c, 3, 3)).astype(np.int8), "w1"),
             nh.from_array(rng.integers(-64, 65, (m, m, 3, 3)).astype(np.int8), "w2"),
             nh.from_array((rng.random(m) * 0.01 + 0.002).astype(np.float32), "ws"),
             nh.from_array(np.zeros(m, np.int8), "wz"),
             nh.from_array(np.array(0.2, np.float32), "ys"),
             nh.from_array(np.array(100, np.uint8), "yz")]
    nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w1", "ws", "wz", "ys", "yz"],
                              ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c1"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("QLinearConv", ["p", "ys", "yz", "w2", "ws", "wz", "ys", "yz"],
                              ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.UINT8, ["batch", c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.save(model, path)
    return {"x": rng.integers(0, 256, (2, c, hw, hw)).astype(np.uint8)}


def test_a_conv_chain_transposes_only_at_its_ends(tmp_path):
    from qcompiler.frontends.onnx import load
    from qcompiler.pipeline import PassManager
    from qcompiler.targets import get_target

    rng = np.random.default_rng(11)
    path = str(tmp_path / "chain.onnx")
    feeds = _qlinear_chain(rng, path)
    module = PassManager.parse(get_target("cuda-sm90").default_pipeline).run(load(path))
    ops = [n.op for n in module.main.nodes if n.op != "constant"]
    assert ops == ["transpose", "qconv", "pool", "qconv", "transpose"], ops
    assert all(n.attrs.get("channels_last") for n in module.main.nodes
               if n.op in ("qconv", "pool"))
    np.testing.assert_array_equal(run(module, feeds)["y"], run(load(path), feeds)["y"])


def test_a_cnn_float_tail_stays_f32():
    """compute-dtype leaves the input quantize reading f32 and keeps the float work between
    quantized ops (average pool, classifier bias) in f32: half there would move codes."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    from qcompiler.frontends.onnx import load

    inits = [nh.from_array(np.array(0.05, np.float32), "s"),
             nh.from_array(np.array(3, np.uint8), "z"),
             nh.from_array(np.array([0.5, -1.0, 2.0, 0.25], np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("ReduceMean", ["d"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    module = make_pass("compute-dtype")(load(model))
    kinds = {n.op: str(n.results[0].type.dtype) for n in module.main.nodes if n.op != "constant"}
    assert "cast" not in kinds, kinds
    assert kinds["reduce_mean"] == "f32" and kinds["add"] == "f32", kinds


# The kernels that test_cuda_conv compiles in CI: one of each template path.
NVCC_CASES = [CASES[0], CASES[1], CASES[2], CASES[3],
              # the stem on pairs of pixels (cuda_igemm_rows) and on 4-byte words (odd width)
              next(c for c in CASES if c[0][0] == 3 and c[0][2] == 7),
              next(c for c in CASES if c[0][0] == 3 and c[0][-1] == 17),
              # a depthwise layer with channels in fours: the dp4a kernel (cuda_dw_t4)
              next(c for c in CASES if c[0][6] == c[0][0] == c[0][1] and c[0][0] % 4 == 0)]


# Golden kernels (`make goldens` rewrites them; review the diff): the implicit GEMM of a
# stem-like layer (3 channels padded to 4: pairs of pixels, split-K), of a stem on an odd
# width (4-byte words) and the depthwise dp4a kernel.
GOLDEN_CASES = {
    "qconv_igemm_stem": next(c for c in CASES if c[0][0] == 3 and c[0][2] == 7),
    "qconv_igemm_words": next(c for c in CASES if c[0][0] == 3 and c[0][-1] == 17),
    "qconv_depthwise_dp4a": NVCC_CASES[-1],
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_kernels(name, update_goldens):
    from conftest import check_golden

    _, after, node, _ = _prepared(GOLDEN_CASES[name])
    _, text = kernel_source(node, after)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "cuda",
                        f"{name}.cu")
    check_golden(path, text, update_goldens)


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    from qcompiler.codegen.cuda.build import build
    from qcompiler.codegen.cuda.ops.library import HEADER

    texts = {}
    for case in NVCC_CASES:
        _, after, node, _ = _prepared(case)
        symbol, text = kernel_source(node, after)
        texts[symbol] = text
    assert any("dp4a" in t for t in texts.values())
    src = tmp_path / "conv.cu"
    src.write_text(open(HEADER).read() + "\n".join(texts.values()))
    build(str(src), str(tmp_path / "conv.o"), ["sm_80", "sm_90"], compile_only=True)
    assert (tmp_path / "conv.o").stat().st_size > 0


# ---- host emulation (CI): the kernels' own source run on the CPU -----------------------------

# Emulated cases: all but the 16928-pixel one (minutes as fibers); the big tile is taken from
# 256 pixels here (EMULATED_BIG_TILE) so that small cases run it too.
EMULATED_CASES = [c for c in CASES if c[0][-1] < 90] + [
    ((16, 128, 3, 1, 1, 1, 1, 12), "i8", "quant", True, (0.0, 6.0), "u8", 2),
    ((32, 136, 1, 1, 0, 1, 1, 12), "i4", "float", False, (None, None), "i8", 2),
    # an odd channel count with a residual: the epilogue's codes one at a time, not in pairs
    ((16, 21, 3, 1, 1, 1, 1, 9), "i8", "quant", True, (0.0, None), "u8", 2)]
# Every tile of the table from a few hundred pixels: 128 x 128 from 256 pixels and 128
# channels (the 288-pixel cases of 128 and 136 channels), 256 x 64 from 128 pixels, 40
# channels and K 100 (the stem-like case, K 196, and the 48-channel one, K 108), 128 x 64
# below that K (the 40-channel 1 x 1), 128 x 32 below 40 channels, 64 x 64 below 128 pixels.
EMULATED_TILES = [{"min_pixels": 256, "min_channels": 128, "tile": (128, 128, 4, 2)},
                  {"min_pixels": 128, "min_channels": 40, "min_k": 100, "tile": (256, 64, 4, 2)},
                  {"min_pixels": 128, "min_channels": 40, "tile": (128, 64, 4, 2)},
                  {"min_pixels": 128, "min_channels": 1, "tile": (128, 32, 4, 1)},
                  {"min_pixels": 0, "min_channels": 1, "tile": (64, 64, 2, 2)}]
# and split-K from one K step a part, to 16 blocks: the small cases' few tiles split
EMULATED_SPLIT = {"split_target_blocks": 16, "split_min_steps": 1, "max_splits": 16}


@pytest.fixture(scope="module")
def emulated_conv(tmp_path_factory):
    import ctypes

    from qcompiler.codegen.cuda.ops import kernel as kernel_module

    saved = list(kernel_module.QCONV_TILES), dict(kernel_module.QCONV_SPLIT)
    kernel_module.QCONV_TILES[:] = EMULATED_TILES
    kernel_module.QCONV_SPLIT.update(EMULATED_SPLIT)
    try:
        prepared, texts = _rendered(EMULATED_CASES)
    finally:
        kernel_module.QCONV_TILES[:] = saved[0]
        kernel_module.QCONV_SPLIT.clear()
        kernel_module.QCONV_SPLIT.update(saved[1])
    lib = ctypes.CDLL(build_emulated([texts[s] for s in sorted(texts)],
                                     tmp_path_factory.mktemp("emulated_conv")))
    return prepared, lib


@pytest.mark.parametrize("case", EMULATED_CASES, ids=_case_id)
def test_kernel_matches_the_reference_in_host_emulation(emulated_conv, case):
    """The kernel's own source (implicit GEMM: tiles, cp.async staging, the mma fragments,
    the epilogue; direct kernel) run on the CPU as fibers, against the reference, exactly."""
    prepared, lib = emulated_conv
    module, after, node, feeds, symbol = prepared[_case_id(case)]
    args = [_operand_array(after, v, feeds) for v in node.operands if v is not None]
    want = np.moveaxis(run(module, feeds)["y"], 1, -1)
    rng = np.random.default_rng(99)
    first = [a if i != 0 else rng.integers(0, 256, a.shape).astype(a.dtype)  # another x
             for i, a in enumerate(args)]
    (got,) = call_emulated(lib, symbol, args, [(want.shape, want.dtype)], first=first)
    np.testing.assert_array_equal(got, want)


# Depthwise strips other than the ones _dw_strip picks (VEC:PX through QC_DW_STRIP): 16
# channels a thread, one-pixel strips, 4-pixel strips at stride 2 and dilation 2.
DW_STRIP_CASES = [
    (((16, 16, 3, 1, 1, 1, 16, 9), "i8", "quant", True, (0.0, 6.0), "u8", 2), "16:2"),
    (((8, 8, 3, 2, 1, 1, 8, 11), "i4", "quant", False, (None, None), "i8", 2), "8:4"),
    (((8, 8, 3, 1, 2, 2, 8, 7), "i8", "float", True, (None, None), "u8", 1), "4:4"),
    (((24, 24, 3, 1, 1, 1, 24, 6), "i8", "quant", False, (0.0, None), "u8", 2), "8:1"),
]


def test_depthwise_strips_match_the_reference_in_host_emulation(tmp_path, monkeypatch):
    import ctypes

    texts, prepared = {}, []
    for case, strip in DW_STRIP_CASES:
        monkeypatch.setenv("QC_DW_STRIP", strip)
        module, after, node, feeds = _prepared(case)
        symbol, text = kernel_source(node, after)
        vec, px = strip.split(":")
        assert f"VEC = {vec}, PX = {px};" in text
        texts[symbol] = text
        prepared.append((module, after, node, feeds, symbol))
    lib = ctypes.CDLL(build_emulated([texts[s] for s in sorted(texts)], tmp_path))
    for module, after, node, feeds, symbol in prepared:
        args = [_operand_array(after, v, feeds) for v in node.operands if v is not None]
        want = np.moveaxis(run(module, feeds)["y"], 1, -1)
        (got,) = call_emulated(lib, symbol, args, [(want.shape, want.dtype)])
        np.testing.assert_array_equal(got, want, err_msg=symbol)


def test_depthwise_strip_choice():
    from qcompiler.codegen.cuda.ops.kernel import DW_WINDOW_WORDS, _dw_columns, _dw_strip

    assert _dw_strip(96, 3, 3, 1, 1) == (8, 4)   # MobileNetV2's stride-1 layers
    assert _dw_strip(96, 3, 3, 2, 1) == (8, 2)   # and its stride-2 ones
    assert _dw_strip(12, 3, 3, 1, 1) == (4, 4)
    assert _dw_strip(32, 5, 5, 2, 1) == (4, 2)   # 8 channels: even one pixel's window is 50
    assert _dw_strip(32, 7, 7, 1, 1) == (4, 1)
    for args in [(8, 3, 3, 1, 1), (8, 3, 3, 2, 2), (16, 5, 5, 1, 1), (8, 7, 7, 2, 1)]:
        vec, px = _dw_strip(*args)
        fits = args[1] * _dw_columns(px, args[2], args[3], args[4]) * vec // 4 <= DW_WINDOW_WORDS
        assert fits or px == 1, args


def _pool_and_qdq_nodes():
    """(module, [(node, feeds)]) of the CNN's other op kernels: max pooling on codes
    (channels-last, vectorized over channels or not, and NCHW, ceil mode), float average pooling with and without padded taps,
    quantize and dequantize per tensor and per channel."""
    from qcompiler.ir.ops import infer_types
    from qcompiler.ir.types import QuantScheme

    module = Module("cnn_ops")
    fn = module.add_function(Function("main"))
    rng = np.random.default_rng(17)
    cases = []

    def const(a, dtype):
        a = np.asarray(a, elem(dtype).np_dtype)
        return constant_node(fn, module, a, TensorType(a.shape, elem(dtype))).result

    def add(op, operands, attrs, feeds):
        types = infer_types(op, [v.type if v is not None else None for v in operands], attrs,
                            [None] * len(operands))
        cases.append((fn.make_node(op, operands, types, attrs), feeds))

    def arg(shape, dtype, values):
        v = fn.add_arg(fn.fresh_name("a"), TensorType(shape, elem(dtype)))
        return v, {v.name: values}

    pool = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
            "dilations": [1, 1], "ceil_mode": 0, "count_include_pad": 0, "p": 2}
    x, f = arg((2, 9, 9, 24), "u8", rng.integers(0, 256, (2, 9, 9, 24)).astype(np.uint8))
    add("pool", [x], {**pool, "kind": "max", "channels_last": 1}, f)
    # channels-last with C a multiple of 16 bytes: a thread per 16 channels (u8) or 4 (f32)
    x, f = arg((2, 9, 9, 48), "u8", rng.integers(0, 256, (2, 9, 9, 48)).astype(np.uint8))
    add("pool", [x], {**pool, "kind": "max", "channels_last": 1}, f)
    x, f = arg((2, 7, 6, 8), "f32", rng.standard_normal((2, 7, 6, 8)).astype(np.float32))
    add("pool", [x], {**pool, "kind": "average", "count_include_pad": 1, "channels_last": 1}, f)
    x, f = arg((2, 5, 10, 11), "i8", rng.integers(-128, 128, (2, 5, 10, 11)).astype(np.int8))
    add("pool", [x], {**pool, "kind": "max", "ceil_mode": 1}, f)
    xf = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    for include in (0, 1):
        x, f = arg((2, 3, 9, 8), "f32", xf)
        add("pool", [x], {**pool, "kind": "average", "count_include_pad": include}, f)
    xq = (rng.standard_normal((2, 6, 5, 5)) * 3).astype(np.float32)
    xq.reshape(-1)[:4] = [0.025, -0.075, 1e9, np.nan]  # ties to even, saturation, NaN
    for dtype, zp, per_channel in (("u8", 128, False), ("i8", -3, True)):
        x, f = arg((2, 6, 5, 5), "f32", xq)
        scale = const(rng.random(6) * 0.05 + 0.01 if per_channel else 0.05, "f32")
        zero = const(np.full(6, zp) if per_channel else zp, dtype)
        scheme = QuantScheme(elem(dtype), symmetric=False, zero_point_type=elem(dtype),
                             granularity="channel" if per_channel else "tensor",
                             axis=1 if per_channel else None)
        add("quantize", [x, scale, zero], {"scheme": scheme}, f)
        codes = rng.integers(*elem(dtype).int_range(), (2, 6, 5, 5)).astype(elem(dtype).np_dtype)
        c, f = arg((2, 6, 5, 5), dtype, codes)
        add("dequantize", [c, scale, zero], {"scheme": scheme, "out": elem("f32")}, f)
    return module, cases


def test_pool_and_qdq_kernels_match_the_reference_in_host_emulation(tmp_path):
    import ctypes

    from qcompiler.ir.core import constant_value
    from qcompiler.runtime.reference import OP_IMPLS

    module, cases = _pool_and_qdq_nodes()
    rendered = [kernel_source(node, module) for node, _ in cases]
    lib = ctypes.CDLL(build_emulated(sorted({t for _, t in rendered}), tmp_path))
    for (node, feeds), (symbol, _) in zip(cases, rendered):
        args = [np.asarray(constant_value(module, v)) if v.name not in feeds else feeds[v.name]
                for v in node.operands if v is not None]
        want = OP_IMPLS[node.op](node, args, module)
        got = call_emulated(lib, symbol, args, [(w.shape, w.dtype) for w in want])
        for g, w in zip(got, want):
            if node.attrs.get("kind") == "average":  # f32 sums in another order: a few ulps
                np.testing.assert_allclose(g, w, rtol=4e-7, atol=1e-7, err_msg=str(node.attrs))
            else:  # max on codes, quantize, dequantize: exact
                np.testing.assert_array_equal(g, w, err_msg=f"{node.op} {node.attrs}")


def emulated_kernels(module, out_dir, ops=("qconv", "pool", "quantize", "dequantize")) -> dict:
    """``reference.run``'s ``kernels``: every node of ``ops`` (that reads computed data) run
    by its emulated CUDA kernel, built once for the module."""
    import ctypes

    from qcompiler.ir.core import constant_value

    nodes = [n for n in module.main.nodes
             if n.op in ops and constant_value(module, n.operands[0]) is None]
    rendered = {n.results[0].name: kernel_source(n, module) for n in nodes}
    lib = ctypes.CDLL(build_emulated(sorted({t for _, t in rendered.values()}), out_dir))
    return {name: op_kernel_impl(lib, symbol) for name, (symbol, _) in rendered.items()}


def test_a_conv_chain_runs_in_host_emulation(tmp_path):
    from qcompiler.frontends.onnx import load
    from qcompiler.pipeline import PassManager
    from qcompiler.targets import get_target

    rng = np.random.default_rng(12)
    path = str(tmp_path / "chain.onnx")
    feeds = _qlinear_chain(rng, path)
    module = PassManager.parse(get_target("cuda-sm90").default_pipeline).run(load(path))
    kernels = emulated_kernels(module, tmp_path)
    assert len(kernels) == 3  # qconv, pool, qconv
    np.testing.assert_array_equal(run(module, feeds, kernels=kernels)["y"],
                                  run(load(path), feeds)["y"])


def _small_quantized_cnn(arch: str, fmt: str, tmp_path, hw: int = 64) -> str:
    """bench_cnn.py's architecture at hw x hw, exported and quantized with quantize_static
    (per channel, u8 activations, i8 weights) on random calibration images."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    import sys

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    import bench_cnn

    torch.manual_seed(0)
    net = bench_cnn.ARCHS[arch]()
    net.train()
    with torch.no_grad():  # BatchNorm statistics of random images
        for _ in range(2):
            net(torch.randn(4, 3, hw, hw))
    net.eval()
    fp32 = str(tmp_path / f"{arch}.onnx")
    torch.onnx.export(net, (torch.randn(1, 3, hw, hw),), fp32, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                      opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"x": rng.standard_normal((1, 3, hw, hw)).astype(np.float32)}
                                 for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    path = str(tmp_path / f"{arch}.{fmt}.onnx")
    quantize_static(fp32, path, Reader(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return path


@pytest.mark.parametrize("arch,fmt", [("resnet18", "qdq"), ("mobilenetv2", "qoperator")])
def test_whole_cnns_run_in_host_emulation(tmp_path, arch, fmt):
    """ResNet-18 and MobileNetV2 (64 x 64 images) through the CUDA pipeline, every conv, pool,
    quantize and dequantize run by its emulated CUDA kernel: the output equals the reference
    of the same module (the other ops, transposes, the average pool and the classifier's
    bias, run in the reference)."""
    from qcompiler.frontends.onnx import load
    from qcompiler.pipeline import PassManager
    from qcompiler.targets import get_target

    path = _small_quantized_cnn(arch, fmt, tmp_path)
    module = PassManager.parse(get_target("cuda-sm90").default_pipeline).run(load(path))
    kernels = emulated_kernels(module, tmp_path)
    assert sum(n.op == "qconv" for n in module.main.nodes) == {"resnet18": 21,
                                                               "mobilenetv2": 53}[arch]
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(module, {"x": x}, kernels=kernels)["y"],
                                  run(module, {"x": x})["y"])


# ---- GPU side ------------------------------------------------------------------------------


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(bool(gpu_reason()),
                                              reason=f"GPU tests: {gpu_reason()}")(test))


@pytest.fixture(scope="module")
def conv_library(tmp_path_factory):
    """One library with every case's kernel (and the CUDA runtime)."""
    from qcompiler.codegen.cuda import build as nv
    from qcompiler.codegen.cuda.ops import CudaOpsLibrary
    from qcompiler.codegen.cuda.ops.library import HEADER
    from qcompiler.codegen.cuda.runtime import CudaRuntime

    d = tmp_path_factory.mktemp("cuda_conv")
    prepared, texts = _rendered(CASES)
    src = d / "conv.cu"
    src.write_text(open(HEADER).read() + "\n".join(texts[s] for s in sorted(texts)))
    lib = CudaOpsLibrary(nv.build_cached(str(src), str(d / "conv.so"), ["sm_90"]))
    rt_src = d / "qc_runtime.cu"
    rt_src.write_text(open(nv.RUNTIME_SOURCE).read())
    rt = CudaRuntime(nv.build_cached(str(rt_src), str(d / "qc_runtime.so"), ["sm_90"]))
    return prepared, lib, rt


def _operand_array(module, v, feeds):
    from qcompiler.ir.core import constant_value

    c = constant_value(module, v)
    if c is not None:
        return np.asarray(c)
    producer = v.producer
    if producer.op == "pad":  # cuda-conv-layout's channel padding (constant pads, value 0)
        inner = _operand_array(module, producer.operands[0], feeds)
        pads = np.asarray(constant_value(module, producer.operands[1])).reshape(-1)
        r = inner.ndim
        return np.pad(inner, [(int(pads[i]), int(pads[i + r])) for i in range(r)])
    # the transpose conv-channels-last put in front of an argument
    return np.ascontiguousarray(np.moveaxis(feeds[producer.operands[0].name], 1, -1))


@gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_the_reference_exactly(conv_library, case):
    prepared, lib, rt = conv_library
    module, after, node, feeds, symbol = prepared[_case_id(case)]
    args = [_operand_array(after, v, feeds) for v in node.operands if v is not None]
    want = np.moveaxis(run(module, feeds)["y"], 1, -1)
    (got,) = lib.run_numpy(rt, symbol, args, [(want.shape, want.dtype)])
    np.testing.assert_array_equal(got, want)


def _compare_model(tmp_path, model_path, feeds):
    import qcompiler

    compiled = qcompiler.compile(model_path, target="cuda-sm90")
    record = next(k for k in compiled.manifest["kernels"] if k.get("op") == "plan")
    assert record["impl"] == "cuda-plan", record
    from qcompiler.frontends.onnx import load

    want = run(load(model_path), feeds)
    got = compiled.run(feeds)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


@gpu
def test_qlinear_conv_chain_runs_on_the_device(tmp_path):
    rng = np.random.default_rng(int.from_bytes(os.urandom(2), "little"))
    path = str(tmp_path / "chain.onnx")
    feeds = _qlinear_chain(rng, path)
    _compare_model(tmp_path, path, feeds)


@gpu
@pytest.mark.parametrize("case", [(3, 5, 3, 1, 1, 1, 1, 9), (8, 8, 3, 2, 1, 1, 8, 10),
                                  (16, 24, 5, 2, 2, 1, 4, 11)])
def test_qlinear_conv_models_run_on_the_device(tmp_path, case):
    rng = np.random.default_rng(sum(case))
    model, x = qlinear_conv(rng, *case)
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    _compare_model(tmp_path, path, {"x": x})


@gpu
@pytest.mark.parametrize("residual", [False, True])
def test_qdq_conv_with_residual_runs_on_the_device(tmp_path, residual):
    rng = np.random.default_rng(21 + residual)
    model, feeds = qdq_conv(rng, c=16, m=16, hw=9, relu=True, residual=residual)
    path = str(tmp_path / "qdq.onnx")
    onnx.save(model, path)
    _compare_model(tmp_path, path, feeds)


def test_tile_table_filters_by_channels_and_k(monkeypatch):
    """The implicit GEMM's tile table as a layer sees it: tiles whose least channel count and
    K the layer reaches, in order, the last one for every pixel count; the sweep override
    (``QC_QCONV_TILES``) parses, and a table whose last tile has a least pixel count is
    refused."""
    from qcompiler.codegen.cuda.ops.kernel import _qconv_tiles

    def dims(tiles):
        return [(t["bm"], t["bn"], t["wm"], t["wn"], t["min_pixels"]) for t in tiles]

    big = 128 * 132
    assert dims(_qconv_tiles(64, 576)) == [(256, 64, 4, 2, big), (64, 64, 2, 2, 0)]
    assert dims(_qconv_tiles(96, 16)) == [(128, 64, 4, 2, big), (64, 64, 2, 2, 0)]  # short K
    assert dims(_qconv_tiles(24, 144)) == [(128, 32, 4, 1, big), (64, 64, 2, 2, 0)]  # 24 channels
    # 256 x 64 and the others apply too, from more pixels than 128 x 128: never launched
    assert dims(_qconv_tiles(256, 2304)) == [(128, 128, 4, 2, big // 2), (64, 64, 2, 2, 0)]
    monkeypatch.setenv("QC_QCONV_TILES", "100:1:128x64x2x2:64;0:1:64x64x2x2")
    assert dims(_qconv_tiles(32, 64)) == [(128, 64, 2, 2, 100), (64, 64, 2, 2, 0)]
    assert dims(_qconv_tiles(32, 32)) == [(64, 64, 2, 2, 0)]
    monkeypatch.setenv("QC_QCONV_TILES", "100:1:128x64x2x2")
    with pytest.raises(ValueError, match="must take every pixel count"):
        _qconv_tiles(32, 64)
