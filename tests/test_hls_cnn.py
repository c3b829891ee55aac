"""Integer CNNs on the FPGA backend (issue #15): every layer's C simulation (g++ + ap_types)
vs the bit-accurate numpy model (codegen/hls/cnn.py) vs the integer reference, on fresh random
input codes; the two issue models end to end on fpga-zcu104 and fpga-u250; a golden of one
generated conv layer.

Models are built directly in QIR (qconv with requant=dyadic, pool, reshape): the QDQ route
needs a quantized Gemm/flatten fusion into qconv that fuse-qconv does not do. One g++ build
per compiled design, several images per build.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import check_golden
from qcompiler.codegen.hls.backend import build_csim, run_csim, top_name
from qcompiler.codegen.hls.cnn import cnn_design, simulate_cnn
from qcompiler.driver.api import compile_to_dir
from qcompiler.ir import Function, Module
from qcompiler.ir.core import constant_node, constant_value
from qcompiler.ir.ops import infer_types
from qcompiler.ir.types import TensorType, elem
from qcompiler.runtime.reference import run

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "hls")


class Builder:
    """A QIR CNN: qconv (dyadic requant, relu), pool and flatten, with fresh random weights."""

    def __init__(self, rng, name, c, hw, x_type="u8"):
        self.rng = rng
        self.module = Module(name)
        self.fn = self.module.add_function(Function("main"))
        self.x = self.fn.add_arg("x", TensorType((1, c, hw, hw), elem(x_type)))
        self.count = 0

    def const(self, array, dtype):
        array = np.asarray(array, elem(dtype).np_dtype)
        return constant_node(self.fn, self.module, array,
                             TensorType(array.shape, elem(dtype))).result

    def node(self, op, operands, attrs):
        consts = [None if v is None else constant_value(self.module, v) for v in operands]
        types = infer_types(op, [v.type if v is not None else None for v in operands], attrs,
                            consts)
        self.count += 1
        return self.fn.make_node(op, operands, types, attrs, names=[f"v{self.count}"]).result

    def conv(self, x, m, k, stride=1, pad=0, dil=1, group=1, w_type="i8", relu=True,
             residual=None, out_type="u8", per_channel=True):
        rng = self.rng
        c = x.type.shape[1]
        cg = c // group
        lo, hi = (-64, 64) if w_type == "i8" else (-8, 7)
        w = rng.integers(lo, hi + 1, (m, cg, k, k))
        ws = rng.random(m if per_channel else 1) * 0.01 + 0.002
        x_zp = int(rng.integers(0, 20)) if x.type.dtype.name == "u8" else int(rng.integers(-5, 5))
        xs = 0.05
        x_std = 70.0 if x.type.dtype.name == "u8" else 40.0
        # An output scale that spreads the accumulators over the codes (not all saturated).
        ys = xs * float(ws.mean()) * np.sqrt(cg * k * k) * float(np.std(w)) * x_std / 40
        y_zp = 0 if relu else (128 if out_type == "u8" else 0)
        operands = [x, self.const(w, w_type), self.const(xs, "f32"),
                    self.const(x_zp, x.type.dtype.name), self.const(ws, "f32"),
                    self.const(rng.integers(-1, 2, m) if w_type == "i8" else np.zeros(m),
                               w_type),
                    self.const(rng.integers(-3000, 3000, m), "i32"),
                    self.const(ys, "f32"), self.const(y_zp, out_type)]
        attrs = {"strides": [stride] * 2, "pads": [pad] * 4, "dilations": [dil] * 2,
                 "group": group, "out": "quant", "requant": "dyadic"}
        if residual is not None:
            operands += [residual, self.const(ys * 0.7, "f32"),
                         self.const(int(rng.integers(0, 30)), residual.type.dtype.name)]
        if relu:
            attrs["act_min"] = 0.0
        return self.node("qconv", operands, attrs)

    def pool(self, x, kind, k, stride, pad=0, count_include_pad=0):
        return self.node("pool", [x], {
            "kind": kind, "kernel_shape": [k, k], "strides": [stride] * 2, "pads": [pad] * 4,
            "dilations": [1, 1], "ceil_mode": 0, "count_include_pad": count_include_pad,
            "p": 2})

    def flatten(self, x):
        n, c, h, w = x.type.shape
        shape = self.const(np.array([n, c * h * w, 1, 1]), "i64")
        return self.node("reshape", [x, shape], {"allowzero": 0})

    def finish(self, y):
        self.fn.set_outputs([y], ["y"])
        return self.module


def _check(module, target, images=3, seed=0):
    """Compile, run the C simulation on fresh images; csim == model == reference, exactly."""
    import tempfile

    out_dir, compiled = compile_to_dir(module, target, tempfile.mkdtemp(prefix="qc_cnn_"),
                                       verify_each=True)
    layers, streams, _, _ = cnn_design(compiled)
    exe = build_csim(os.path.join(out_dir, "kernels"), top_name(compiled))
    arg = compiled.main.args[0]
    rng = np.random.default_rng(seed)
    info = np.iinfo(arg.type.dtype.np_dtype)
    x = rng.integers(info.min, info.max + 1, (images,) + tuple(arg.type.shape[1:])).astype(
        arg.type.dtype.np_dtype)
    hwc = x.transpose(0, 2, 3, 1).reshape(images, -1)
    model = np.stack([simulate_cnn(layers, row) for row in hwc])
    csim = run_csim(exe, hwc.astype(np.float32), expected=model.astype(np.float64))
    np.testing.assert_array_equal(csim, model)
    want = np.concatenate([list(run(module, {"x": x[i:i + 1]}).values())[0]
                           for i in range(images)])
    got = model.reshape((images,) + tuple(want.shape[2:]) + (want.shape[1],)).transpose(
        0, 3, 1, 2)
    np.testing.assert_array_equal(got, want)
    assert np.unique(want).size > 3  # not all saturated: the comparison means something
    return out_dir, compiled


def test_layers_over_strides_padding_groups_and_int4():
    """One design chaining many layer kinds: odd channels, stride 2/3, padding, dilation 2,
    grouped and depthwise convs, int4 and per-tensor weights, i8 codes, max/avg pools."""
    rng = np.random.default_rng(1)
    b = Builder(rng, "cnn_layers", 3, 13)
    v = b.conv(b.x, 5, 3, stride=1, pad=1)                                   # odd channels
    v = b.conv(v, 10, 3, stride=2, pad=1, group=5, w_type="i4")              # grouped, int4
    v = b.conv(v, 10, 3, pad=2, dil=2, group=10, relu=False, out_type="i8")  # depthwise, dil
    v = b.pool(v, "max", 3, 1, pad=1)                                        # i8 max, padded
    v = b.conv(v, 6, 1, per_channel=False)                                   # pointwise
    v = b.pool(v, "average", 3, 2, pad=1)                                    # avg, no pad count
    v = b.pool(v, "average", 2, 1, pad=1, count_include_pad=1)
    v = b.conv(v, 7, 2, stride=3, pad=0, relu=False)                         # stride 3
    _check(b.finish(v), "fpga-zcu104", images=4)


def cifar_cnn(rng):
    """3 conv, 2 pool, 1 dense on 32x32x3 (int8 weights, per-channel)."""
    b = Builder(rng, "cifar_cnn", 3, 32)
    v = b.conv(b.x, 8, 3, pad=1)
    v = b.pool(v, "max", 2, 2)
    v = b.conv(v, 16, 3, pad=1)
    v = b.pool(v, "average", 2, 2)
    v = b.conv(v, 16, 3, stride=2, pad=1)
    v = b.flatten(v)
    return b.finish(b.conv(v, 10, 1, relu=False, out_type="i8"))


def resnet_block(rng, c=8, hw=12):
    """conv-relu-conv + skip add + relu (the skip is the block's input)."""
    b = Builder(rng, "resnet_block", c, hw)
    v = b.conv(b.x, c, 3, pad=1)
    return b.finish(b.conv(v, c, 3, pad=1, residual=b.x))


@pytest.mark.parametrize("target", ["fpga-zcu104", "fpga-u250"])
def test_cifar_cnn_bit_exact(target):
    out_dir, module = _check(cifar_cnn(np.random.default_rng(2)), target, images=2)
    est = module.metadata["hls_estimate"]
    convs = [e for e in est["layers"] if e["kind"] == "conv"]
    assert len(convs) == 4 and all(e["pe"] >= 1 and e["simd"] >= 1 for e in convs)
    assert any(e["pe"] * e["simd"] > 1 for e in convs)  # the budget buys parallelism
    for key in ("IntervalMin", "BestLatency", "DSP", "BRAM_18K", "LUT"):
        assert est[key] > 0
    assert os.path.exists(os.path.join(out_dir, "kernels", "run_hls.tcl"))


@pytest.mark.parametrize("target", ["fpga-zcu104", "fpga-u250"])
def test_resnet_block_bit_exact(target):
    out_dir, module = _check(resnet_block(np.random.default_rng(3)), target, images=2)
    kinds = [e["kind"] for e in module.metadata["hls_estimate"]["layers"]]
    assert kinds == ["dup", "conv", "conv"]


def test_runner_matches_reference():
    """The artifact's runner (csim built from the verified sources) on an NCHW batch."""
    import tempfile

    import qcompiler

    module = resnet_block(np.random.default_rng(4), c=4, hw=6)
    out_dir, _ = compile_to_dir(module, "fpga-u250", tempfile.mkdtemp(prefix="qc_cnn_"))
    x = np.random.default_rng(5).integers(0, 256, (2, 4, 6, 6)).astype(np.uint8)
    got = qcompiler.load(out_dir).run({"x": x})
    want = np.concatenate([run(module, {"x": x[i:i + 1]})["y"] for i in range(2)])
    np.testing.assert_array_equal(got["y"], want)


def test_golden_conv_layer_source(update_goldens):
    import tempfile

    module = resnet_block(np.random.default_rng(6), c=4, hw=5)
    out_dir, compiled = compile_to_dir(module, "fpga-zcu104", tempfile.mkdtemp(prefix="qc_g_"))
    src = open(os.path.join(out_dir, "kernels", f"{top_name(compiled)}.cpp")).read()
    start = src.index("// layer2:")
    end = src.index("\n}\n", start) + 3
    check_golden(os.path.join(GOLDEN, "cnn_conv_layer.cpp"), src[start:end], update_goldens)


def test_float_requant_and_unsupported_ops_are_refused():
    """A qconv with float requantization (what non-FPGA targets get) names the node."""
    from qcompiler.pipeline import PassError

    b = Builder(np.random.default_rng(7), "cnn_float", 3, 6)
    v = b.conv(b.x, 4, 3, pad=1)
    v.producer.attrs["requant"] = "float"
    with pytest.raises(PassError, match=r"%v1 = qconv: .*requant=dyadic"):
        cnn_design(b.finish(v))
    b = Builder(np.random.default_rng(7), "cnn_lp", 3, 6)
    v = b.pool(b.conv(b.x, 4, 3), "max", 2, 2)
    v.producer.attrs["ceil_mode"] = 1
    with pytest.raises(PassError, match="ceil_mode"):
        cnn_design(b.finish(v))
