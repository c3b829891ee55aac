"""qconv (issue #15): reference vs onnxruntime, the passes (fuse-qconv, fuse-requant,
fold-batchnorm) and the CPU kernel vs the reference (exact integers).

Weights in onnxruntime comparisons lie in [-64, 64] (7-bit, as reduce_range): onnxruntime's
AVX2 u8s8 kernels saturate int16 pair sums on full-range codes, so only these are exact on
every CI host.
"""
from __future__ import annotations

import os

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from qcompiler.frontends.onnx import load
from qcompiler.ir import Function, Module
from qcompiler.ir.core import constant_node
from qcompiler.ir.printer import print_module
from qcompiler.ir.types import TensorType, elem
from qcompiler.pipeline import make_pass
from qcompiler.runtime.reference import dyadic_multiplier, run
from conftest import check_golden

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "cpu")


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _ours(module: Module, feeds: dict) -> np.ndarray:
    return list(run(module, feeds).values())[0]


def _passes(module: Module, *names) -> Module:
    for name in names:
        module = make_pass(name)(module)
    return module


def _ops(module: Module) -> list:
    return [n.op for n in module.main.nodes if n.op != "constant"]


# (c, m, kernel, stride, pad, dilation, group, hw)
CONV_CASES = [
    (3, 5, 3, 1, 1, 1, 1, 9),     # odd channel counts
    (8, 8, 3, 2, 1, 1, 8, 10),    # depthwise, stride 2
    (6, 4, 3, 1, 2, 2, 2, 9),     # groups, dilation 2
    (12, 20, 1, 1, 0, 1, 1, 7),   # pointwise
    (16, 24, 5, 2, 2, 1, 4, 11),  # 5x5 grouped, stride 2
    (4, 6, 3, 3, 0, 1, 1, 12),    # stride 3, no padding
]


def qlinear_conv(rng, c, m, k, stride, pad, dil, group, hw, x_type=np.uint8,
                 per_channel=True, n=2):
    """A QLinearConv model and a fresh input."""
    w = rng.integers(-64, 65, (m, c // group, k, k)).astype(np.int8)
    ws = (rng.random(m if per_channel else 1) * 0.01 + 0.002).astype(np.float32)
    if not per_channel:
        ws = ws.reshape(())
    xz = np.array(3 if x_type == np.uint8 else -5, x_type)
    inits = [nh.from_array(np.array(0.05, np.float32), "xs"), nh.from_array(xz, "xz"),
             nh.from_array(w, "w"), nh.from_array(ws, "ws"),
             nh.from_array(np.zeros(ws.shape, np.int8), "wz"),
             nh.from_array(np.array(0.25, np.float32), "ys"),
             nh.from_array(np.array(120 if x_type == np.uint8 else -10, x_type), "yz"),
             nh.from_array(rng.integers(-3000, 3000, m).astype(np.int32), "b")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"], strides=[stride] * 2, pads=[pad] * 4, dilations=[dil] * 2,
                            group=group)
    tp = TensorProto.UINT8 if x_type == np.uint8 else TensorProto.INT8
    model = _model([node], [helper.make_tensor_value_info("x", tp, [n, c, hw, hw])],
                   [helper.make_tensor_value_info("y", tp, None)], inits)
    info = np.iinfo(x_type)
    x = rng.integers(info.min, info.max + 1, (n, c, hw, hw)).astype(x_type)
    return model, x


@pytest.mark.parametrize("case", CONV_CASES)
def test_qlinear_conv_reference_matches_onnxruntime(case):
    rng = np.random.default_rng(sum(case))
    for x_type, per_channel in ((np.uint8, True), (np.int8, False)):
        model, x = qlinear_conv(rng, *case, x_type=x_type, per_channel=per_channel)
        module = load(model)
        assert _ops(module) == ["qconv"]
        np.testing.assert_array_equal(_ours(module, {"x": x}), _ort(model, {"x": x}))


def qdq_conv(rng, c=4, m=6, hw=7, relu=True, residual=False, float_bias=False):
    """DequantizeLinear(x), DequantizeLinear(w, per channel), bias -> Conv [-> Add(DQ(r))]
    [-> Relu] -> QuantizeLinear."""
    w = rng.integers(-64, 65, (m, c, 3, 3)).astype(np.int8)
    ws = (rng.random(m) * 0.01 + 0.002).astype(np.float32)
    xs = np.float32(0.05)
    b = rng.integers(-500, 500, m).astype(np.int32)
    inits = [nh.from_array(np.array(xs), "xs"), nh.from_array(np.array(3, np.uint8), "xz"),
             nh.from_array(w, "w"), nh.from_array(ws, "ws"),
             nh.from_array(np.zeros(m, np.int8), "wz"),
             nh.from_array(np.array(0.1, np.float32), "ys"),
             nh.from_array(np.array(0 if relu else 128, np.uint8), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0)]
    if float_bias:
        inits.append(nh.from_array((b * xs * ws).astype(np.float32), "bd"))
    else:
        inits += [nh.from_array(b, "b"), nh.from_array((xs * ws).astype(np.float32), "bs")]
        nodes.append(helper.make_node("DequantizeLinear", ["b", "bs"], ["bd"], axis=0))
    nodes.append(helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, hw, hw])]
    feeds = {"x": rng.integers(0, 256, (1, c, hw, hw)).astype(np.uint8)}
    last = "c"
    if residual:
        inits += [nh.from_array(np.array(0.07, np.float32), "rs"),
                  nh.from_array(np.array(100, np.uint8), "rz")]
        nodes += [helper.make_node("DequantizeLinear", ["r", "rs", "rz"], ["rd"]),
                  helper.make_node("Add", ["c", "rd"], ["s"])]
        inputs.append(helper.make_tensor_value_info("r", TensorProto.UINT8, [1, m, hw, hw]))
        feeds["r"] = rng.integers(0, 256, (1, m, hw, hw)).astype(np.uint8)
        last = "s"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["a"]))
        last = "a"
    nodes.append(helper.make_node("QuantizeLinear", [last, "ys", "yz"], ["y"]))
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                   inits)
    return model, feeds


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("float_bias", [False, True])
def test_qdq_conv_fuses_into_one_exact_qconv(relu, float_bias):
    rng = np.random.default_rng(7 + relu + 2 * float_bias)
    model, feeds = qdq_conv(rng, relu=relu, float_bias=float_bias)
    module = _passes(load(model), "canonicalize", "fuse-qconv", "fuse-requant")
    assert _ops(module) == ["qconv"]
    node = module.main.nodes[-1]
    assert node.attrs["out"] == "quant" and node.attrs["requant"] == "float"
    assert ("act_min" in node.attrs) == relu
    want = _ort(model, feeds)
    got = _ours(module, feeds)
    if float_bias:  # the bias is rounded to i32 units of x_scale * w_scale (as ORT's quantizer)
        assert np.abs(got.astype(int) - want).max() <= 1
    else:
        np.testing.assert_array_equal(got, want)


def test_residual_add_fuses_into_the_epilogue():
    """One rounding instead of the unfused graph's two: within one code of onnxruntime."""
    rng = np.random.default_rng(11)
    model, feeds = qdq_conv(rng, relu=True, residual=True)
    unfused = load(model)
    module = _passes(unfused, "canonicalize", "fuse-qconv", "fuse-requant")
    assert _ops(module) == ["qconv"]
    assert module.main.nodes[-1].arg("residual") is not None
    got = _ours(module, feeds).astype(int)
    assert np.abs(got - _ort(model, feeds)).max() <= 1
    assert np.abs(got - _ours(unfused, feeds)).max() <= 1


def test_dyadic_requantization_for_fpga_targets():
    rng = np.random.default_rng(5)
    model, feeds = qdq_conv(rng, relu=True, residual=True)
    module = load(model)
    float_mod = _passes(module, "canonicalize", "fuse-qconv", "fuse-requant")
    fpga = make_pass("fuse-requant", {"target": "fpga-u250"})(
        _passes(module, "canonicalize", "fuse-qconv"))
    assert fpga.main.nodes[-1].attrs["requant"] == "dyadic"
    diff = np.abs(_ours(fpga, feeds).astype(int) - _ours(float_mod, feeds))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95


def test_dyadic_multiplier_represents_the_ratio():
    ratios = np.array([1e-4, 0.0123, 0.5, 0.999999, 3.0, 1 / 3])
    m, shift = dyadic_multiplier(ratios)
    assert np.all((m >= 1 << 30) & (m < 1 << 31))
    np.testing.assert_allclose(m * 2.0 ** -shift.astype(np.float64), ratios, rtol=2 ** -30)


def conv_integer_model(rng, c=5, m=7, hw=8):
    """DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul(x_scale * w_scale) (what
    quantize_dynamic writes for a Conv, per-channel scales here)."""
    w = rng.integers(-64, 65, (m, c, 3, 3)).astype(np.int8)
    ws = (rng.random(m) * 0.01 + 0.002).astype(np.float32).reshape(1, m, 1, 1)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("ConvInteger", ["xq", "w", "xz"], ["ci"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Mul", ["cf", "s"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [nh.from_array(w, "w"), nh.from_array(ws, "ws")])
    return model, {"x": rng.standard_normal((1, c, hw, hw)).astype(np.float32)}


def test_conv_integer_cast_mul_fuses_into_qconv():
    rng = np.random.default_rng(3)
    model, feeds = conv_integer_model(rng)
    unfused = _passes(load(model), "canonicalize")
    module = make_pass("fuse-qconv")(unfused)
    assert _ops(module) == ["dynamic_quantize", "qconv"]
    np.testing.assert_array_equal(_ours(module, feeds), _ours(unfused, feeds))
    np.testing.assert_allclose(_ours(module, feeds), _ort(model, feeds), rtol=1e-5, atol=1e-6)


def test_fold_batchnorm_is_exact_up_to_rounding():
    rng = np.random.default_rng(2)
    c, m = 3, 8
    inits = [nh.from_array(rng.standard_normal((m, c, 3, 3)).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal(m).astype(np.float32), "b")]
    for name, lo in (("scale", 0.5), ("bias", -1.0), ("mean", -1.0), ("var", 0.1)):
        inits.append(nh.from_array((rng.random(m) + lo).astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"],
                              ["y"], epsilon=1e-3)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 9, 9])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    x = rng.standard_normal((2, c, 9, 9)).astype(np.float32)
    module = _passes(load(model), "canonicalize")
    folded = make_pass("fold-batchnorm")(module)
    assert _ops(folded) == ["conv"]
    want = _ort(model, {"x": x})
    np.testing.assert_allclose(_ours(folded, {"x": x}), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_ours(module, {"x": x}), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the CPU kernel
# --------------------------------------------------------------------------------------------


def _host_vnni() -> bool:
    from qcompiler.codegen.cpu.host import target_cpu
    from qcompiler.targets import get_target

    return target_cpu(get_target("cpu"))["vnni"]


def _run_kernel(module: Module, node, variant: str, feeds: dict) -> np.ndarray:
    import tvm

    from qcompiler.codegen.cpu.conv import build_qconv, kernel_name
    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.codegen.cpu.ops.library import aligned_like
    from qcompiler.ir.core import constant_value
    from qcompiler.targets import get_target

    name = kernel_name(node, variant, module)
    func = build_qconv(node, variant, module).with_attr("global_symbol", name)
    lib = tvm.compile(tvm.IRModule({name: func}), target=tvm_target(get_target("cpu")))
    args = []
    for v in node.operands:
        if v is None:
            continue
        c = constant_value(module, v)
        a = np.asarray(feeds[v.name] if c is None else c).reshape(v.type.shape)
        args.append(aligned_like(a.shape, a.dtype))  # the kernels assume 64-byte alignment
        args[-1][...] = a
    out = aligned_like(node.results[0].type.shape, node.results[0].type.dtype.np_dtype)
    lib[name](*args, out)  # numpy arrays go through DLPack, without a copy
    return out


def _qconv_module(rng, c, m, k, stride, pad, dil, group, hw, w_type="i8", out="quant",
                  residual=False, act=(None, None), n=2, w_zero_point="random", x_type="u8",
                  x_zero_point=None):
    """A module with one qconv node (operands as constants, x and residual arguments).
    ``w_zero_point``: "random" (per channel, -2..2), None (no operand: symmetric) or an int
    (that constant for every channel)."""
    module = Module("qconv_test")
    fn = module.add_function(Function("main"))
    x = fn.add_arg("x", TensorType((n, c, hw, hw), elem(x_type)))
    lo, hi = elem(w_type).int_range()
    hi = min(hi, 64) if w_type == "i8" else hi

    def const(array, dtype):
        array = np.asarray(array, elem(dtype).np_dtype)
        return constant_node(fn, module, array, TensorType(array.shape, elem(dtype))).result
    w = const(rng.integers(max(lo, -64), hi + 1, (m, c // group, k, k)), w_type)
    if isinstance(w_zero_point, str):
        wzp = const(rng.integers(-2, 3, m), w_type)
    else:
        wzp = None if w_zero_point is None else const(np.full(m, w_zero_point), w_type)
    if x_zero_point is None:
        x_zero_point = 7 if x_type == "u8" else -9
    operands = [x, w, const(0.05, "f32"), const(x_zero_point, x_type),
                const(rng.random(m) * 0.01 + 0.002, "f32"),
                wzp, const(rng.integers(-900, 900, m), "i32")]
    attrs = {"strides": [stride] * 2, "pads": [pad] * 4, "dilations": [dil] * 2,
             "group": group, "out": out}
    oh = (hw + 2 * pad - (k - 1) * dil - 1) // stride + 1
    if out == "quant":
        operands += [const(0.2, "f32"), const(110, "u8")]
        attrs["requant"] = "float"
    else:
        operands += [None, None]
    if residual:
        r_type = "u8" if out == "quant" else "f32"
        operands.append(fn.add_arg("r", TensorType((n, m, oh, oh), elem(r_type))))
        if out == "quant":
            operands += [const(0.09, "f32"), const(100, "u8")]
    if act[0] is not None:
        attrs["act_min"] = act[0]
    if act[1] is not None:
        attrs["act_max"] = act[1]
    from qcompiler.ir.ops import infer_types

    types = infer_types("qconv", [v.type if v is not None else None for v in operands], attrs,
                        [None] * len(operands))
    node = fn.make_node("qconv", operands, types, attrs, names=["y"])
    fn.set_outputs([node.result], ["y"])
    lo_x, hi_x = elem(x_type).int_range()
    feeds = {"x": rng.integers(lo_x, hi_x + 1, (n, c, hw, hw)).astype(elem(x_type).np_dtype)}
    if residual:
        feeds["r"] = (rng.integers(0, 256, (n, m, oh, oh)).astype(np.uint8) if out == "quant"
                      else rng.standard_normal((n, m, oh, oh)).astype(np.float32))
    return module, node, feeds


KERNEL_CASES = [
    # (conv case, w_type, out, residual, act)
    ((16, 32, 3, 1, 1, 1, 1, 8), "i8", "quant", False, (0.0, None)),
    ((12, 20, 3, 2, 1, 1, 2, 9), "i4", "quant", True, (0.0, 6.0)),
    ((8, 8, 3, 1, 1, 1, 8, 7), "i8", "quant", False, (None, None)),     # depthwise
    ((5, 7, 3, 1, 2, 2, 1, 9), "u8", "float", True, (-1.0, 2.0)),       # odd, dilation 2
    ((24, 18, 1, 1, 0, 1, 3, 6), "i4", "float", False, (None, None)),   # pointwise groups
    # image larger than the weights, 16k channels per group: the sums of each output row
    # computed inside the epilogue's row loop (_schedule's row path)
    ((8, 16, 1, 1, 0, 1, 1, 20), "i8", "quant", True, (0.0, None)),
    ((8, 32, 3, 2, 1, 1, 2, 13), "u8", "float", False, (None, 6.0)),   # groups, stride 2
    ((12, 48, 3, 1, 1, 1, 1, 23), "i4", "quant", False, (0.0, 6.0)),
    # the direct kernel's shapes: strided depthwise (scalar sum), depthwise 20 wide (vectors
    # of 16, padded), depthwise dilated on a 7-wide image, stride 2 by column phases
    ((16, 16, 3, 2, 1, 1, 16, 15), "i8", "quant", False, (0.0, 6.0)),
    ((24, 24, 3, 1, 1, 1, 24, 20), "u8", "quant", True, (0.0, None)),
    ((8, 8, 3, 1, 2, 2, 8, 7), "i4", "quant", True, (None, None)),
    ((6, 10, 5, 2, 2, 1, 1, 17), "i8", "float", False, (-1.0, 1.0)),
    # stride 1, 14+ output columns, windows of <= 96 codes: the vnni kernel's pixel lanes
    # (16 output pixels x 4 channels per vpdpbusd; channel blocks of 8 and 4, groups,
    # dilation, widths padded to 16: 20 -> 32, 14 -> 16)
    ((8, 24, 1, 1, 0, 1, 1, 16), "i8", "quant", True, (0.0, None)),
    ((12, 20, 3, 1, 1, 1, 1, 32), "u8", "float", False, (None, None)),  # 108 codes: channels
    ((8, 20, 3, 1, 1, 1, 1, 20), "u8", "quant", True, (None, None)),
    ((32, 40, 1, 1, 0, 1, 1, 14), "i8", "quant", False, (0.0, 6.0)),
    ((16, 32, 3, 1, 1, 1, 2, 16), "i4", "quant", False, (0.0, 6.0)),
    ((6, 16, 3, 1, 2, 2, 1, 16), "i8", "quant", True, (None, None)),
    # 1 x 1 layers of more than 96 codes on pixel lanes too (deep, grouped, padded width);
    # channel lanes with the repack's border filled apart (3 x 3 of 180 codes, odd
    # channels, stride 2 with a one-sided overhang)
    ((144, 24, 1, 1, 0, 1, 1, 14), "i8", "quant", True, (0.0, None)),
    ((200, 48, 1, 1, 0, 1, 2, 18), "u8", "float", False, (None, None)),
    ((20, 16, 3, 1, 1, 1, 1, 9), "i8", "quant", False, (0.0, 6.0)),
    ((13, 16, 3, 2, 1, 1, 1, 12), "i8", "quant", True, (None, None)),
    # pixel lanes, 28+ columns not a multiple of 16, no residual: the epilogue over the
    # padded width inside the row loop (the window sums of x too, for u8 weights); with a
    # residual (float: the product and the sum rounded apart, as the reference)
    ((8, 20, 3, 1, 1, 1, 1, 29), "i8", "quant", False, (0.0, None)),
    ((8, 16, 1, 1, 0, 1, 1, 30), "u8", "float", False, (None, None)),
    ((8, 16, 1, 1, 0, 1, 1, 30), "u8", "float", True, (None, 3.0)),
    # strided 1 x 1 without padding (ResNet's downsampling): the stride-1 layer on the
    # subsampled image (pixel lanes at 14+ columns, channel lanes below; odd sizes, groups,
    # u8 weights with the x window sums, stride 3)
    ((16, 32, 1, 2, 0, 1, 1, 30), "i8", "quant", True, (None, None)),
    ((12, 20, 1, 2, 0, 1, 1, 9), "i8", "quant", False, (0.0, None)),
    ((16, 32, 1, 2, 0, 1, 2, 13), "u8", "float", False, (None, None)),
    ((8, 16, 1, 3, 0, 1, 1, 10), "u8", "quant", True, (0.0, 6.0)),
    # 1 x 1, one group, no padding, a width not a multiple of 16: the vnni kernel's flat
    # image (one row of oh * ow pixels, padded to 16 once; with the x window sums for u8
    # weights, a residual at 7 x 7, stride 2 on the subsampled image)
    ((160, 48, 1, 1, 0, 1, 1, 7), "i8", "quant", True, (0.0, None)),
    ((20, 24, 1, 1, 0, 1, 1, 12), "u8", "float", True, (None, None)),
    ((24, 40, 1, 2, 0, 1, 1, 27), "u4", "quant", False, (0.0, 6.0)),
    # 28+ columns, one group: the madd kernel's pixel lanes too (1 x 1 and 3 x 3 with few
    # channels, odd channels, widths padded to 16 or whole, a residual)
    ((6, 12, 1, 1, 0, 1, 1, 28), "i8", "quant", True, (0.0, None)),
    ((5, 8, 3, 1, 1, 1, 1, 32), "u8", "float", False, (None, 6.0)),
    ((3, 9, 3, 1, 1, 2, 1, 30), "i4", "quant", False, (0.0, 6.0)),
    # depthwise 5 x 5 at stride 2, 32 channels (two 16-lane vectors; float out)
    ((32, 32, 5, 2, 2, 1, 32, 17), "i8", "float", False, (None, None)),
]


@pytest.mark.parametrize("variant", ["vnni", "madd", "direct"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c[0])) + c[2])
def test_cpu_kernel_matches_the_reference_exactly(case, variant):
    """Every kernel variant on every case (``madd``, the AVX2 one, runs on every x86 host:
    depthwise and thin groups too, padded to its 8 x 2 tile)."""
    if variant == "vnni" and not _host_vnni():
        pytest.skip("host has no AVX-512 VNNI (the vnni variant needs vpdpbusd)")
    conv, w_type, out, residual, act = case
    rng = np.random.default_rng(sum(conv))
    module, node, feeds = _qconv_module(rng, *conv, w_type=w_type, out=out, residual=residual,
                                        act=act)
    if variant == "vnni" and conv[0] // conv[6] < 4:
        variant = "direct"  # thin groups take the direct kernel (conv_variant)
    want = _ours(module, feeds)
    got = _run_kernel(module, node, variant, feeds)
    np.testing.assert_array_equal(got, want)


def _channels_last_node(module: Module, feeds: dict):
    """The module's qconv after conv-channels-last, and its NHWC feeds (the pass puts a
    transpose before x and the residual)."""
    from qcompiler.passes.conv_channels_last import ConvChannelsLastPass

    module = ConvChannelsLastPass().run(module)
    node = next(n for n in module.main.nodes if n.op == "qconv")
    assert node.attrs["channels_last"] == 1
    nhwc = {}
    for v in node.operands:
        if v is not None and v.producer is not None and v.producer.op == "transpose":
            nhwc[v.name] = feeds[v.producer.operands[0].name].transpose(0, 2, 3, 1)
    return module, node, nhwc


@pytest.mark.parametrize("isa", ["vnni", "avx2"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c[0])) + c[2])
def test_cpu_kernel_channels_last_matches_the_reference_exactly(case, isa):
    """The vnni and madd (AVX2) kernels on NHWC x, residual and result (channel lanes
    whatever the shape: 1 x 1 and strided layers, groups, odd channels, u8 weights with the x
    window sums), and depthwise layers on the dwlanes kernels (strides, dilation, 5 x 5,
    channels not a multiple of 16 or 8). The AVX2 kernels run on every x86 host."""
    if isa == "vnni" and not _host_vnni():
        pytest.skip("host has no AVX-512 VNNI (the vnni channels-last kernels need it)")
    conv, w_type, out, residual, act = case
    depthwise = conv[0] == conv[1] == conv[6]
    if not depthwise and (conv[0] // conv[6] < 2 or conv[1] // conv[6] < (8 if isa == "vnni"
                                                                          else 4)):
        pytest.skip("thin groups have no channels-last kernel")
    rng = np.random.default_rng(sum(conv) + 1)
    module, _, feeds = _qconv_module(rng, *conv, w_type=w_type, out=out, residual=residual,
                                     act=act)
    want = _ours(module, feeds)
    module, node, nhwc = _channels_last_node(module, feeds)
    variant = {("vnni", True): "dwlanes", ("vnni", False): "vnni",
               ("avx2", True): "dwlanes_avx2", ("avx2", False): "madd"}[isa, depthwise]
    got = _run_kernel(module, node, variant, nhwc)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("case", [
    # (conv case, w_type, out, residual, act, x_type, takes vpdpbusd)
    ((64, 64, 3, 1, 1, 1, 64, 9), "i8", "quant", True, (0.0, 6.0), "u8", True),
    ((128, 128, 3, 2, 1, 1, 128, 7), "i4", "quant", True, (None, None), "i8", True),
    ((32, 32, 7, 1, 3, 1, 32, 10), "i8", "float", False, (None, None), "u8", True),
    ((16, 16, 5, 1, 2, 1, 16, 16), "i8", "quant", False, (0.0, 6.0), "u8", True),
    ((48, 48, 3, 2, 1, 1, 48, 12), "i8", "quant", False, (0.0, None), "i8", True),
    # u8 weights centred on small zero points span past int8; dilation 2: int32 products
    ((48, 48, 3, 2, 1, 1, 48, 12), "u8", "quant", False, (0.0, None), "i8", False),
    ((32, 32, 3, 1, 2, 2, 32, 11), "i8", "quant", True, (None, None), "u8", False),
], ids=lambda c: "-".join(map(str, c[0])) + f"-{c[1]}-x{c[5]}")
def test_cpu_depthwise_channels_last_on_vpdpbusd_matches_the_reference(case):
    """dwlanes's vpdpbusd form (4 taps of a window row per instruction, the taps' channel
    vectors interleaved by a byte shuffle) where its conditions hold, int32 products
    elsewhere: exact either way."""
    if not _host_vnni():
        pytest.skip("host has no AVX-512 VNNI (the channels-last kernels are vnni ones)")
    from qcompiler.codegen.cpu.conv import build_qconv

    conv, w_type, out, residual, act, x_type, dpbusd = case
    rng = np.random.default_rng(sum(conv))
    module, _, feeds = _qconv_module(rng, *conv, w_type=w_type, out=out, residual=residual,
                                     act=act, x_type=x_type)
    want = _ours(module, feeds)
    module, node, nhwc = _channels_last_node(module, feeds)
    assert ("vpdpbusd" in build_qconv(node, "dwlanes", module).script()) == dpbusd
    got = _run_kernel(module, node, "dwlanes", nhwc)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


def test_depthwise_kernels_of_one_shape_differ_where_their_weights_choose_the_form():
    """dwlanes takes vpdpbusd only where the centred weights fit int8: two layers of one
    shape, one with weights that do not fit, get two kernels (one shared kernel would
    truncate the second layer's weights)."""
    from qcompiler.codegen.cpu.conv import primfunc_for_qconv

    names = []
    for zero_point in (0, 100):   # codes in -64..64: minus 100 they span past int8
        rng = np.random.default_rng(9)
        module, _, feeds = _qconv_module(rng, 32, 32, 3, 1, 1, 1, 32, 9,
                                         w_zero_point=zero_point)
        want = _ours(module, feeds)
        module, node, nhwc = _channels_last_node(module, feeds)
        names.append(primfunc_for_qconv(node, None, module, vnni=True)[0])
        if _host_vnni():
            got = _run_kernel(module, node, "dwlanes", nhwc)
            np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
    assert names[0] != names[1]


def test_layers_of_one_shape_with_other_clamp_codes_get_their_own_kernels():
    """A ReLU6 layer's clamp codes come from its y_scale and y_zero_point (constants baked
    into the kernel): two layers of one shape and attributes but other output
    quantization are two kernels, each exact."""
    from qcompiler.codegen.cpu.conv import primfunc_for_qconv
    from qcompiler.ir.core import constant_value

    names = []
    for y_zero_point in (110, 30):
        rng = np.random.default_rng(4)
        module, node, feeds = _qconv_module(rng, 16, 32, 3, 1, 1, 1, 1, 8, act=(0.0, 6.0))
        yzp = node.operands[8]
        node.operands[8] = constant_node(module.main, module,
                                         np.array(y_zero_point, np.uint8), yzp.type,
                                         before=node).result
        assert int(constant_value(module, node.operands[8])) == y_zero_point
        names.append(primfunc_for_qconv(node, None, module, vnni=_host_vnni())[0])
        want = _ours(module, feeds)
        got = _run_kernel(module, node, "vnni" if _host_vnni() else "madd", feeds)
        np.testing.assert_array_equal(got, want)
    assert names[0] != names[1]


def test_cpu_channels_last_refuses_other_variants_by_name():
    from qcompiler.codegen.cpu.conv import build_qconv
    from qcompiler.codegen.cpu.errors import CPUBackendError

    rng = np.random.default_rng(5)
    module, _, feeds = _qconv_module(rng, 8, 8, 3, 1, 1, 1, 8, 7)   # depthwise
    module, node, _ = _channels_last_node(module, feeds)
    with pytest.raises(CPUBackendError, match=r"%y = qconv: channels_last .* not direct"):
        build_qconv(node, "direct", module)
    # the depthwise lanes pad x with its zero point: it must be a constant
    with pytest.raises(CPUBackendError, match=r"%y = qconv: .* constant x zero point"):
        build_qconv(node, "dwlanes", None)


@pytest.mark.parametrize("case", [
    # (kernel, stride, pads, ceil_mode, channels, hw, x_type)
    (3, 2, 1, 0, 64, 15, "u8"),     # ResNet's stem pool (odd image: a one-sided border)
    (3, 2, 1, 1, 20, 12, "i8"),     # ceil_mode's overhang, channels not a multiple of 16
    (2, 2, 0, 0, 32, 8, "u8"),      # no border
    (3, 1, 1, 0, 16, 9, "i8"),
])
def test_cpu_pool_kernel_channels_last_matches_the_reference(case):
    import tvm

    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.codegen.cpu.ops.library import aligned_like
    from qcompiler.codegen.cpu.pool import pool_takes_channels_last, primfunc_for_pool
    from qcompiler.ir.ops import infer_types
    from qcompiler.passes.conv_channels_last import ConvChannelsLastPass
    from qcompiler.targets import get_target

    k, stride, pad, ceil_mode, c, hw, x_type = case
    module = Module("pool_test")
    fn = module.add_function(Function("main"))
    x = fn.add_arg("x", TensorType((2, c, hw, hw), elem(x_type)))
    attrs = {"kind": "max", "kernel_shape": [k, k], "strides": [stride] * 2,
             "pads": [pad] * 4, "dilations": [1, 1], "ceil_mode": ceil_mode}
    node = fn.make_node("pool", [x], infer_types("pool", [x.type], attrs, [None]), attrs,
                        names=["y"])
    fn.set_outputs([node.result], ["y"])
    lo, hi = elem(x_type).int_range()
    feeds = {"x": np.random.default_rng(sum(case[:-1])).integers(
        lo, hi + 1, (2, c, hw, hw)).astype(elem(x_type).np_dtype)}
    want = _ours(module, feeds)
    module = ConvChannelsLastPass().run(module)
    node = next(n for n in module.main.nodes if n.op == "pool")
    assert node.attrs["channels_last"] == 1 and pool_takes_channels_last(node)
    name, func = primfunc_for_pool(node)
    lib = tvm.compile(tvm.IRModule({name: func}), target=tvm_target(get_target("cpu")))
    xin = aligned_like(node.operands[0].type.shape, feeds["x"].dtype)
    xin[...] = feeds["x"].transpose(0, 2, 3, 1)
    out = aligned_like(node.results[0].type.shape, feeds["x"].dtype)
    lib[name](xin, out)
    np.testing.assert_array_equal(out, want.transpose(0, 2, 3, 1))


def test_cpu_pipelines_run_a_conv_chain_channels_last_where_every_kernel_takes_it(tmp_path):
    """conv-channels-last{target=cpu-*}: an x86 target (VNNI or AVX2) runs the whole chain
    NHWC (a transpose at each end); an Arm target, or a chain with a layer only NCHW kernels
    take (thin groups), keeps every layer NCHW. Compiled for the host, the chain is exact."""
    import qcompiler
    from qcompiler.pipeline import PassManager
    from qcompiler.targets import get_target
    from test_cuda_conv import _qlinear_chain

    path = str(tmp_path / "chain.onnx")
    feeds = _qlinear_chain(np.random.default_rng(11), path)

    def ops(target, module=None):
        module = module or load(path)
        pipeline = get_target(target).default_pipeline.split(",cpu-conv-layout")[0]
        module = PassManager.parse(pipeline).run(module)
        return module, [n.op for n in module.main.nodes if n.op != "constant"]
    for target in ("cpu-x86-avx512", "cpu-x86-avx2"):
        module, got = ops(target)
        assert got == ["transpose", "qconv", "pool", "qconv", "transpose"], (target, got)
        assert all(n.attrs.get("channels_last") for n in module.main.nodes
                   if n.op in ("qconv", "pool"))
    _, got = ops("cpu-arm-neon")
    assert got == ["qconv", "pool", "qconv"], got
    # a layer of thin groups (2 input and 2 output channels each) in the chain: none of it
    # channels-last
    thin = load(path)
    conv2 = [n for n in thin.main.nodes if n.op == "qconv"][1]
    m = conv2.arg("w").type.shape[0]
    conv2.attrs["group"] = m // 2
    wv = np.random.default_rng(3).integers(-64, 65, (m, 2, 3, 3)).astype(np.int8)
    conv2.operands[1] = constant_node(thin.main, thin, wv, TensorType(wv.shape, elem("i8")),
                                      before=conv2).result
    _, got = ops("cpu-x86-avx512", thin)
    assert "transpose" not in got, got
    # a float op between the convolutions (no NHWC kernel): two transposes around it would
    # be copies the NCHW plan does not make, so the chain stays NCHW on the CPU (CUDA's
    # pipeline, without a target, converts it anyway)
    between = load(path)
    pool = next(n for n in between.main.nodes if n.op == "pool")
    neg = between.main.make_node("neg", [pool.result], [pool.result.type], {},
                                 before=between.main.nodes[between.main.nodes.index(pool) + 1])
    for user in between.main.nodes:
        if user is not neg:
            user.operands = [neg.result if v is pool.result else v for v in user.operands]
    _, got = ops("cpu-x86-avx512", between)
    assert "transpose" not in got, got
    converted = make_pass("conv-channels-last")(between)
    assert sum(n.op == "transpose" for n in converted.main.nodes) == 4
    compiled = qcompiler.compile(path, target="cpu")
    np.testing.assert_array_equal(compiled.run(feeds)["y"], run(load(path), feeds)["y"])


def test_flat_pixels_for_unpadded_one_group_1x1_layers():
    """The vnni kernel takes a 1 x 1 layer's image as one row of pixels where its rows are
    not whole vectors (MobileNetV2's 14 x 14, 28 x 28, 56 x 56, 7 x 7 projections); the
    flat epilogue writes a padded image that is copied into the result."""
    from qcompiler.codegen.cpu.conv import _flat_pixels, build_qconv

    rng = np.random.default_rng(0)
    cases = {(96, 576, 1, 1, 0, 1, 1, 14): True, (24, 144, 1, 1, 0, 1, 1, 56): True,
             (960, 160, 1, 1, 0, 1, 1, 7): True, (16, 96, 1, 1, 0, 1, 1, 32): False,
             (24, 48, 1, 1, 0, 1, 2, 14): False, (16, 32, 3, 1, 1, 1, 1, 14): False}
    for conv, flat in cases.items():
        module, node, _ = _qconv_module(rng, *conv)
        oh = node.results[0].type.shape[2]
        assert _flat_pixels(node, oh, oh) is flat, conv
        if flat:
            text = build_qconv(node, "vnni", module).script()
            assert f'"outp"' in text and f", 1, {-(-oh * oh // 16) * 16})" in text, conv


TAPS_CASES = [
    # (c, k, stride, pad, dil, hw), w_type, w zero point, x_type (and zero point), out,
    # residual
    ((16, 3, 1, 1, 1, 7), "i8", None, "u8", "quant", False),    # 7 wide: padded to 16
    ((16, 3, 2, 1, 1, 29), "i8", None, "u8:0", "quant", False),  # x zero point 0 (ReLU)
    ((8, 3, 1, 1, 1, 12), "i8", None, "i8:-128", "float", True),  # i8 x, shifted zp 0
    ((24, 3, 2, 1, 1, 15), "i8", None, "i8", "quant", True),    # stride 2, odd, i8 x
    ((8, 3, 1, 2, 2, 9), "u8", 128, "u8", "float", True),       # dilation 2, u8 w
    ((12, 3, 2, 1, 1, 40), "i4", None, "u8", "quant", False),   # 3 blocks of 16 columns
    ((8, 2, 1, 0, 1, 33), "i8", None, "u8", "float", False),    # 2 x 2, 33 wide
    ((6, 4, 3, 1, 1, 20), "i8", None, "i8", "quant", False),    # 4 taps, stride 3
    ((5, 1, 1, 0, 1, 17), "u4", 8, "u8", "quant", True),        # 1 x 1, u4 w centred
    ((16, 3, 1, 1, 1, 14), "i8", "random", "u8", "quant", True),  # per-channel zero points
    ((16, 3, 4, 1, 1, 30), "i4", "random", "u8", "float", False),  # stride 4: 64 bytes
    # 5 x 5 and 7 x 7 windows: two blocks of 4 taps a row (MobileNetV3, ConvNeXt)
    ((8, 5, 1, 2, 1, 14), "i8", None, "u8", "quant", True),
    ((8, 5, 2, 2, 1, 23), "i8", "random", "i8", "float", False),
    ((6, 7, 1, 3, 1, 20), "i8", None, "u8:0", "quant", False),
    ((4, 7, 1, 6, 2, 9), "u8", 128, "u8", "quant", False),      # dilation 2, 7 x 7
]


@pytest.mark.parametrize("case", TAPS_CASES, ids=lambda c: "-".join(map(str, c[0])) + c[1])
def test_taps_depthwise_kernel_matches_the_reference_exactly(case):
    """The depthwise vpdpbusd kernel (16 columns x 4 taps a row): strides, dilation, odd and
    padded widths, signed and unsigned codes; it is chosen where x's zero point is constant
    and the weights' zero point is their shift (conv_variant)."""
    from qcompiler.codegen.cpu.conv import conv_variant

    if not _host_vnni():
        pytest.skip("host has no AVX-512 VNNI (the taps variant needs vpdpbusd)")
    (c, k, stride, pad, dil, hw), w_type, wzp, x_type, out, residual = case
    x_type, _, xzp = x_type.partition(":")
    rng = np.random.default_rng(c * hw + k)
    module, node, feeds = _qconv_module(rng, c, c, k, stride, pad, dil, c, hw, w_type=w_type,
                                        out=out, residual=residual, act=(0.0, 6.0),
                                        w_zero_point=wzp, x_type=x_type,
                                        x_zero_point=int(xzp) if xzp else None)
    assert conv_variant(node, True, module) == "taps"
    np.testing.assert_array_equal(_run_kernel(module, node, "taps", feeds), _ours(module, feeds))


def _lowered_tir(func) -> str:
    """The kernel's TIR after TVM's LowerTVMBuiltin pass (where buffers become stack or
    workspace allocations), compiled for the host."""
    import tvm

    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.targets import get_target

    seen = []

    @tvm.ir.instrument.pass_instrument
    class Capture:
        def run_after_pass(self, mod, info):
            if info.name == "tirx.LowerTVMBuiltin":
                seen.append(mod.script())
    with tvm.transform.PassContext(instruments=[Capture()]):
        tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}),
                    target=tvm_target(get_target("cpu")))
    assert len(seen) == 1
    return seen[0]


def test_taps_kernel_allocates_nothing_per_plane():
    """TVM serves every "local" buffer on the CPU with TVMBackendAllocWorkspace, once per
    iteration of the enclosing parallel loop, and an intrinsic body's named intermediates
    become such buffers: the taps kernel (parallel over channel planes) and its intrinsic
    keep none, and the vpdpbusd intrinsic of the other kernels has no vector locals."""
    from qcompiler.codegen.cpu.conv import build_qconv

    if not _host_vnni():
        pytest.skip("host has no AVX-512 VNNI (the taps and vnni variants need vpdpbusd)")
    rng = np.random.default_rng(3)
    module, node, _ = _qconv_module(rng, 32, 32, 3, 1, 1, 1, 32, 20, w_zero_point=None)
    taps = _lowered_tir(build_qconv(node, "taps", module))
    assert "TVMBackendAllocWorkspace" not in taps
    module, node, _ = _qconv_module(rng, 8, 24, 1, 1, 0, 1, 1, 16)
    px = _lowered_tir(build_qconv(node, "vnni", module))
    assert "vpdpbusd" in px
    assert not re.search(r'decl_buffer\(\(1,\), "u?int(8|32)x(4|16|64)"', px)
    # the pixel-lane kernel's accumulators: a stack array inside the parallel row loop,
    # not a workspace allocated (and zeroed, stored, reloaded from heap) for each row
    assert re.search(r'sum_global = T.alloc_buffer\(\(\d+,\), "int32(x16)?"\)', px)
    assert not re.search(r"\bsum\w* = T.decl_buffer\([^\n]*TVMBackendAllocWorkspace", px)


def test_taps_kernel_runs_narrow_planes_as_one_pitched_row():
    """Stride-1 images narrower than 16 (7 x 7, 14 x 14) are one row of the image's pitch:
    a 7 x 7 plane is 4 vectors of sums (63 of 64 lanes with a pitch of 9), none more per
    window row; its epilogue is whole vectors, without gathers (LLVM once vectorized it
    across the plane's 4 vectors when TVM had been asked to vectorize it)."""
    import tvm

    from qcompiler.codegen.cpu.conv import build_qconv
    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.targets import get_target

    if not _host_vnni():
        pytest.skip("host has no AVX-512 VNNI (the taps variant needs vpdpbusd)")
    rng = np.random.default_rng(5)
    module, node, _ = _qconv_module(rng, 32, 32, 3, 1, 1, 1, 32, 7, w_zero_point=None)
    func = build_qconv(node, "taps", module)
    text = func.script()
    assert '"outp"' in text and "(2, 32, 1, 64)" in text, "not one pitched row of 64 lanes"
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm_target(get_target("cpu")))
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    assert "vpdpbusd" in asm and "vpgather" not in asm
    # stride 2, 14 -> 7: rows stored by phase, an output pitch of 8 (4 vectors, not 7)
    module, node, _ = _qconv_module(rng, 32, 32, 3, 2, 1, 1, 32, 14, w_zero_point=None)
    assert "(2, 32, 1, 64)" in build_qconv(node, "taps", module).script()
    # 28 -> 14 would take 14 vectors either way: rows of 16
    module, node, _ = _qconv_module(rng, 32, 32, 3, 2, 1, 1, 32, 28, w_zero_point=None)
    text = build_qconv(node, "taps", module).script()
    assert "(2, 32, 14, 16)" in text and "(2, 32, 1, " not in text


def test_taps_variant_needs_its_zero_points_and_one_load_per_16_columns():
    from qcompiler.codegen.cpu.conv import conv_variant

    rng = np.random.default_rng(0)
    chosen = {}
    for label, kwargs in (("symmetric", {"w_zero_point": None}),
                          ("per-channel wzp", {}),
                          ("u8 codes - 0 past int8", {"w_zero_point": 0, "w_type": "u8"}),
                          ("5x5", {"w_zero_point": None, "k": 5}),
                          ("stride 5", {"w_zero_point": None, "stride": 5})):
        k, stride = kwargs.pop("k", 3), kwargs.pop("stride", 1)
        module, node, _ = _qconv_module(rng, 8, 8, k, stride, 1, 1, 8, 9, **kwargs)
        chosen[label] = (conv_variant(node, True, module), conv_variant(node, False, module),
                         conv_variant(node, True))
    assert chosen == {"symmetric": ("taps", "direct", "direct"),
                      "per-channel wzp": ("taps", "direct", "direct"),
                      "u8 codes - 0 past int8": ("direct", "direct", "direct"),
                      "5x5": ("taps", "direct", "direct"),
                      "stride 5": ("direct", "direct", "direct")}


@pytest.mark.parametrize("out", ["quant", "float"])
def test_residual_epilogue_rounds_each_product_and_vectorizes(out):
    """The residual epilogue's products are rounded before their sum, as in the reference:
    no FMA in the kernel (TVM lets LLVM contract a multiply feeding an add). And the loop
    around them is vectorized: packed adds (the barrier before, ``llvm.arithmetic.fence``,
    kept it scalar: 2.6x slower)."""
    import re

    import tvm

    from qcompiler.codegen.cpu.conv import build_qconv, conv_variant
    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.targets import get_target

    rng = np.random.default_rng(5)
    module, node, _ = _qconv_module(rng, 16, 32, 3, 1, 1, 1, 1, 32, out=out, residual=True,
                                    act=(0.0, None))
    func = build_qconv(node, conv_variant(node, _host_vnni()), module)
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}),
                      target=tvm_target(get_target("cpu")))
    asm = lib.mod.inspect_source("asm")
    assert not re.findall(r"\bvfn?m(add|sub)\w*ps", asm)
    assert re.search(r"\bvaddps\s[^\n]*%[yz]mm", asm) and not re.search(r"\bvaddss\s", asm)


def test_qconv_runs_compiled_through_the_plan(tmp_path):
    """A QDQ Conv + Relu model compiled for the host: one qconv step, no host fallback,
    exact against onnxruntime."""
    import warnings

    import qcompiler

    rng = np.random.default_rng(9)
    model, feeds = qdq_conv(rng, c=8, m=16, hw=10, relu=True)
    path = str(tmp_path / "qdq_conv.onnx")
    onnx.save(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a host fallback warns
        compiled = qcompiler.compile(path, target="cpu")
    np.testing.assert_array_equal(compiled.run(feeds)["y"], _ort(model, feeds))


def test_golden_vnni_kernel_tir(update_goldens):
    """The TensorIR of one vpdpbusd kernel (built without running it: any host)."""
    from qcompiler.codegen.cpu.conv import primfunc_for_qconv

    rng = np.random.default_rng(0)
    module, node, _ = _qconv_module(rng, 8, 16, 3, 1, 1, 1, 1, 6, act=(0.0, None), n=1)
    name, func = primfunc_for_qconv(node, None, module, vnni=True)
    check_golden(os.path.join(GOLDEN, "qconv_vnni.tir.py"), func.script(), update_goldens)
    assert "vpdpbusd" in func.script()


@pytest.mark.parametrize("label, conv", [
    ("qconv_nhwc_fused", (16, 32, 3, 1, 1, 1, 1, 8)),      # channel lanes, fused epilogue
    ("qconv_nhwc_dw_vpdpbusd", (32, 32, 3, 1, 1, 1, 32, 8)),  # depthwise, 4 taps a vpdpbusd
])
def test_golden_channels_last_kernel_tir(label, conv, update_goldens):
    """The TensorIR of the channels-last kernels (built without running them: any host)."""
    from qcompiler.codegen.cpu.conv import primfunc_for_qconv

    rng = np.random.default_rng(0)
    module, _, feeds = _qconv_module(rng, *conv, act=(0.0, None), n=1)
    module, node, _ = _channels_last_node(module, feeds)
    name, func = primfunc_for_qconv(node, None, module, vnni=True)
    check_golden(os.path.join(GOLDEN, f"{label}.tir.py"), func.script(), update_goldens)
    assert "vpdpbusd" in func.script()


def test_qconv_type_errors_name_the_problem():
    from qcompiler.ir.ops import TypeInferenceError, infer_types

    x = TensorType((1, 4, 5, 5), elem("f32"))
    w = TensorType((4, 4, 3, 3), elem("i8"))
    s = TensorType((), elem("f32"))
    attrs = {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1], "group": 1,
             "out": "float"}
    with pytest.raises(TypeInferenceError, match="i8/u8 x"):
        infer_types("qconv", [x, w, s, TensorType((), elem("u8")), s], attrs, [None] * 5)
    xq = TensorType((1, 4, 5, 5), elem("u8"))
    with pytest.raises(TypeInferenceError, match="y_scale"):
        infer_types("qconv", [xq, w, s, TensorType((), elem("u8")), s],
                    {**attrs, "out": "quant"}, [None] * 5)
    module, node, _ = _qconv_module(np.random.default_rng(1), 4, 4, 3, 1, 1, 1, 1, 5)
    assert "qconv(" in print_module(module)


POOL_CASES = [
    # (kind, kernel, stride, pads, dilation, ceil_mode, count_include_pad)
    ("max", 3, 2, 1, 1, 0, 0),     # ResNet's stem pool
    ("max", 2, 2, 0, 2, 1, 0),     # dilation, ceil_mode overhang
    ("average", 3, 2, 1, 1, 1, 0),
    ("average", 3, 1, 1, 1, 0, 1),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_pool_kernel_matches_the_reference(case):
    import tvm

    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.codegen.cpu.ops.library import aligned_like
    from qcompiler.codegen.cpu.pool import primfunc_for_pool
    from qcompiler.targets import get_target

    kind, k, stride, pad, dil, ceil_mode, include = case
    op = {"max": "MaxPool", "average": "AveragePool"}[kind]
    attrs = {"kernel_shape": [k, k], "strides": [stride] * 2, "pads": [pad] * 4,
             "ceil_mode": ceil_mode}
    if kind == "max":
        attrs["dilations"] = [dil] * 2
    else:
        attrs["count_include_pad"] = include
    model = _model([helper.make_node(op, ["x"], ["y"], **attrs)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 11, 11])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [])
    module = load(model)
    node = module.main.nodes[-1]
    x = aligned_like((2, 5, 11, 11), np.float32)
    x[...] = np.random.default_rng(sum(case[1:])).standard_normal(x.shape)
    name, func = primfunc_for_pool(node)
    lib = tvm.compile(tvm.IRModule({name: func}), target=tvm_target(get_target("cpu")))
    out = aligned_like(node.results[0].type.shape, np.float32)
    lib[name](x, out)
    want = _ours(module, {"x": x})
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    if kind == "max":
        np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(out, _ort(model, {"x": np.array(x)}), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("w_type", ["u8", "i4"])
def test_cpu_conv_layout_packs_weights_at_compile_time(w_type):
    """The packed module means the same (the reference unpacks) and the kernel reading the
    packed weights is exact."""
    if not _host_vnni():
        pytest.skip("host has no AVX-512 VNNI: cpu-conv-layout packs for the vnni kernel only")
    rng = np.random.default_rng(4)
    module, node, feeds = _qconv_module(rng, 12, 24, 3, 1, 1, 1, 2, 7, w_type=w_type,
                                        act=(0.0, None))
    packed = make_pass("cpu-conv-layout")(module)
    q = [n for n in packed.main.nodes if n.op == "qconv"][0]
    assert q.attrs["config"]["w_shape"] == [24, 6, 3, 3]
    assert q.arg("w").type.shape == (2, 1, 3, 3, 2, 16, 4)
    assert q.attrs["config"]["w_shift"] == (128 if w_type == "u8" else 0)
    want = _ours(module, feeds)
    np.testing.assert_array_equal(_ours(packed, feeds), want)
    np.testing.assert_array_equal(_run_kernel(packed, q, "vnni", feeds), want)


@pytest.mark.parametrize("w_type", ["u8", "i4", "i8"])
def test_cpu_conv_layout_packs_centred_int16_weights_for_avx2(w_type):
    """On an AVX2 target the weights are packed for the vpmaddwd kernel: int16, 8 output x 2
    input channels, minus their per-channel zero points (w_centred); the reference unpacks
    them to the same module, the kernel reading them is exact, and the variant is chosen by
    the target."""
    from qcompiler.codegen.cpu.conv import conv_variant

    rng = np.random.default_rng(5)
    module, node, feeds = _qconv_module(rng, 12, 24, 3, 1, 1, 1, 2, 7, w_type=w_type,
                                        act=(0.0, None), residual=True)
    assert conv_variant(node, False, module, avx2=True) == "madd"
    packed = make_pass("cpu-conv-layout", {"target": "cpu-x86-avx2"})(module)
    q = [n for n in packed.main.nodes if n.op == "qconv"][0]
    cfg = q.attrs["config"]
    assert cfg["w_shape"] == [24, 6, 3, 3] and cfg["w_centred"] and "w_shift" not in cfg
    assert q.arg("w").type.shape == (2, 2, 3, 3, 3, 8, 2)
    assert str(q.arg("w").type.dtype) == "i16"
    assert conv_variant(q, True) == "madd"   # (the packed layout decides)
    want = _ours(module, feeds)
    np.testing.assert_array_equal(_ours(packed, feeds), want)
    np.testing.assert_array_equal(_run_kernel(packed, q, "madd", feeds), want)


@pytest.mark.parametrize("codes", ["u8", "i8"])
def test_cpu_quantize_dequantize_kernels_are_exact(codes):
    """Per-tensor Q/DQ (what QDQ CNNs keep between layers), with ties, NaN and +-inf."""
    import tvm

    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.codegen.cpu.ops.library import aligned_like
    from qcompiler.codegen.cpu.qdq import primfunc_for_qdq
    from qcompiler.targets import get_target

    np_codes = np.uint8 if codes == "u8" else np.int8
    zp = np.array(7 if codes == "u8" else -3, np_codes)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    tp = TensorProto.UINT8 if codes == "u8" else TensorProto.INT8
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, 9])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [nh.from_array(np.array(0.25, np.float32), "s"), nh.from_array(zp, "z")])
    module = load(model)
    rng = np.random.default_rng(12)
    x = aligned_like((3, 5, 9), np.float32)
    x[...] = rng.standard_normal(x.shape) * 40
    x.flat[:6] = [0.125, -0.375, np.nan, np.inf, -np.inf, 1e9]  # ties to even, NaN, saturation
    from qcompiler.ir.core import constant_value

    value = {"x": x}
    for node in [n for n in module.main.nodes if n.op in ("quantize", "dequantize")]:
        name, func = primfunc_for_qdq(node)
        lib = tvm.compile(tvm.IRModule({name: func}), target=tvm_target(get_target("cpu")))
        args = [value[node.operands[0].name]]
        for v in node.operands[1:]:
            c = np.asarray(constant_value(module, v)).reshape(v.type.shape)
            a = aligned_like(c.shape, c.dtype)
            a[...] = c
            args.append(a)
        out = aligned_like(node.results[0].type.shape, node.results[0].type.dtype.np_dtype)
        lib[name](*args, out)
        value[node.results[0].name] = out
    got = value[module.main.outputs[0].name]
    np.testing.assert_array_equal(got, _ours(module, {"x": np.array(x)}))


@pytest.mark.parametrize("trans_b, per_channel, quantized_out, alpha", [
    (1, True, True, 1.0),     # what quantize_static(QOperator) writes for a classifier
    (0, False, True, 0.5),
    (1, True, False, 1.0),    # float output (no y_scale)
])
def test_qgemm_matches_onnxruntime(trans_b, per_channel, quantized_out, alpha):
    """com.microsoft QGemm (the QOperator format's Gemm) imported as its Q/DQ graph."""
    rng = np.random.default_rng(40 + trans_b + 2 * per_channel)
    # 7-bit weights: onnxruntime's u8s8 kernels are exact on every host only for these
    model, feeds = _qgemm_model(rng, 3, 37, 11, trans_b, per_channel, quantized_out, alpha,
                                w_bound=64)
    a = feeds["a"]
    want = _ort(model, {"a": a})
    got = _ours(load(model), {"a": a})
    assert got.dtype == want.dtype and got.shape == want.shape
    if quantized_out:  # within one quantization step (ties of the requantization)
        assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
        assert (got == want).mean() > 0.9
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _qgemm_model(rng, m_, k_, n_, trans_b, per_channel, quantized_out, alpha, w_zp=False,
                 w_bound=128):
    """A one-node com.microsoft QGemm model (weights in [-w_bound, w_bound)) and its feeds."""
    a = rng.integers(0, 256, (m_, k_)).astype(np.uint8)
    w = rng.integers(-w_bound, w_bound, (n_, k_) if trans_b else (k_, n_)).astype(np.int8)
    b_scale = (rng.random(n_) * 0.02 + 0.005).astype(np.float32) if per_channel \
        else np.array(0.013, np.float32)
    b_zp = (rng.integers(-5, 6, b_scale.shape) if w_zp else np.zeros(b_scale.shape)
            ).astype(np.int8)
    c = rng.integers(-3000, 3000, n_).astype(np.int32)
    inits = [nh.from_array(np.array(0.021, np.float32), "a_s"),
             nh.from_array(np.array(131, np.uint8), "a_zp"), nh.from_array(w, "w"),
             nh.from_array(b_scale, "b_s"), nh.from_array(b_zp, "b_zp"),
             nh.from_array(c, "c")]
    ins = ["a", "a_s", "a_zp", "w", "b_s", "b_zp", "c"]
    if quantized_out:
        inits += [nh.from_array(np.array(0.37, np.float32), "y_s"),
                  nh.from_array(np.array(120, np.uint8), "y_zp")]
        ins += ["y_s", "y_zp"]
    node = helper.make_node("QGemm", ins, ["y"], domain="com.microsoft", transB=trans_b,
                            alpha=alpha)
    out_t = TensorProto.UINT8 if quantized_out else TensorProto.FLOAT
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8,
                                                                       ["n", k_])],
                          [helper.make_tensor_value_info("y", out_t, ["n", n_])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19),
                                                helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    return model, {"a": a}


@pytest.mark.parametrize("m_, k_, n_, trans_b, per_channel, quantized_out, alpha, w_zp", [
    (1, 512, 40, 1, True, True, 1.0, False),    # a classifier (quantize_static QOperator)
    (3, 37, 11, 0, False, True, 0.5, True),     # odd K, N < 16, weight zero points
    (8, 64, 5, 1, True, False, 1.0, False),     # N < 8: the direct kernel; float output
    (2, 130, 33, 1, True, False, 1.0, True),
])
def test_static_qmatmul_runs_as_a_1x1_qconv(tmp_path, m_, k_, n_, trans_b, per_channel,
                                            quantized_out, alpha, w_zp):
    """static-qmatmul-as-qconv rewrites an act=static qmatmul (which the CPU qmatmul kernels refuse)
    as reshape -> 1x1 qconv -> reshape (+ bias/epilogue): the reference of the rewritten
    module is bit-exact, and the compiled plan has no host fallback and is exact too."""
    import warnings

    import qcompiler

    rng = np.random.default_rng(60 + m_ + k_ + n_)
    model, feeds = _qgemm_model(rng, m_, k_, n_, trans_b, per_channel, quantized_out, alpha,
                                w_zp)
    from qcompiler.pipeline import PassManager

    front = ("canonicalize,fold-batchnorm,fuse-qconv,fuse-requant{target=cpu},fuse-dequant,"
             "canonicalize,fuse-epilogue,fuse-elementwise")
    module = PassManager.parse(front).run(load(model))
    assert any(n.op == "qmatmul" and n.attrs["act"] == "static" for n in module.main.nodes)
    want = _ours(module, feeds)
    rewritten = make_pass("static-qmatmul-as-qconv")(PassManager.parse(front).run(load(model)))
    assert "qmatmul" not in _ops(rewritten) and "qconv" in _ops(rewritten)
    np.testing.assert_array_equal(_ours(rewritten, feeds), want)
    path = str(tmp_path / "qgemm.onnx")
    onnx.save(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = qcompiler.compile(path, target="cpu")  # HostFallbackError if it fell back
    np.testing.assert_array_equal(compiled.run(feeds)["y"], want)


@pytest.mark.parametrize("conv", [
    (16, 96, 1, 1, 0, 1, 1, 16),   # MobileNetV2's expanding 1 x 1: 6 blocks of 16 channels
    (32, 64, 3, 1, 1, 1, 1, 14),   # a dense 3 x 3
], ids=["1x1-16to96", "3x3-32to64"])
def test_fused_channels_last_sums_stay_on_the_stack(conv):
    """The fused channels-last kernel's tile of sums must be a stack array where the window
    is short (TVM keeps one below 1 KiB there, and LLVM then keeps it in registers): a larger
    tile, or one whose buffer spans every channel, becomes a TVMBackendAllocWorkspace per
    row, zeroed, stored and reloaded every tile (MobileNetV2's 16 -> 96 layer: 2.02 against
    1.78 ms, ab_cnn_layers.py). Checked in the LLVM IR of the built kernel (compiled only:
    any x86 host)."""
    import tvm

    from qcompiler.codegen.cpu.conv import (OC_BLOCK, STACK_ACCUMULATORS, TVM_STACK_LIMIT,
                                            primfunc_for_qconv, register_tile)
    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.targets import get_target

    rng = np.random.default_rng(0)
    module, _, feeds = _qconv_module(rng, *conv, act=(0.0, None), n=1)
    module, node, _ = _channels_last_node(module, feeds)
    name, func = primfunc_for_qconv(node, None, module, vnni=True)
    cols, blocks = register_tile(conv[7], conv[1] // OC_BLOCK, STACK_ACCUMULATORS)
    assert cols * blocks * OC_BLOCK * 4 < TVM_STACK_LIMIT
    target = tvm_target(get_target("cpu-x86-avx512"))
    lib = tvm.compile(tvm.IRModule({name: func}), target=target)
    ir = lib.mod.inspect_source("ll")  # (the llvm module: the kernel and its host wrapper)
    assert "vpdpbusd" in ir
    heap = re.findall(r"%(\w+) = tail call ptr %\w+\(i32 1, i32 %dev_id, i64 (\d+)", ir)
    assert heap, "expected the per-call buffers (wsum, scale) as workspaces"
    assert not [b for b, _ in heap if b.startswith("sum")], heap
