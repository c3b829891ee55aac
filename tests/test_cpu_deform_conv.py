"""The CPU ``deform_conv`` kernel (codegen/cpu/deform_conv.py: ONNX DeformConv) against the
reference implementation.

Kernel level: one op library holds a deform_conv node per configuration (ONNX's node cases'
shapes; strides, asymmetric pads, dilations alone and together; groups, offset groups and
both; bias and mask; 1 x 1 and non-square kernels; a symbolic batch, image and output size;
f16 / bf16 / f64 and operands of other types than x); each runs on fresh random inputs
(offsets of a few pixels: many taps fall partly or wholly outside x) into a result buffer
filled with garbage and is compared with ``OP_IMPLS["deform_conv"]``: the samples are the
reference's operation for operation, the sum over (channel, tap) runs in another order than
numpy's einsum, so within a few float64 ulps. Integer offsets make every sample a single
pixel: then the kernel is a plain convolution, checked against one computed here. Model
level: an ONNX model of DeformConv nodes compiled for ``cpu`` through ``qcompiler.compile``
runs every node as a compiled kernel (no host fallback) and matches the ``ref`` target.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import (HALF_FLOAT_TOLERANCE, KernelGraph, build_kernels,  # noqa: E402
                              by_operand_type, check_nodes, check_onnx_model_on_cpu, nonzero_normal,
                              onnx_model, run_kernel, shape_at)
from qcompiler.codegen.cpu.backend import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import primfunc_for  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402

# sizes of the symbolic configurations
SIZES = ({"batch": 2, "h": 5, "w": 6, "oh": 4, "ow": 5}, {"batch": 1, "h": 3, "w": 2, "oh": 2,
                                                          "ow": 3})
# per result dtype: (rtol, atol). float64 sums in another order than numpy's einsum: a few
# float64 ulps, which the rounding to f32 mostly hides
TOLERANCE = {"f64": (1e-12, 1e-12), "f32": (1e-6, 1e-6), **HALF_FLOAT_TOLERANCE}


def _out_size(size, k, stride, pad_begin, pad_end, dilation):
    return (size + pad_begin + pad_end - ((k - 1) * dilation + 1)) // stride + 1


class Graph(KernelGraph):
    def __init__(self):
        super().__init__("deform_conv")

    def add(self, key, x, w, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
            offset_group=1, bias=False, mask=False, dtype="f32", dtypes=None, out=None):
        """A deform_conv node of x [N, C, H, W] and w [OC, C / group, KH, KW]; ``out``: the
        output size when x's is symbolic; ``dtypes``: other types of w, offset, b, mask."""
        fn = self.fn
        n, _, h, wd = x
        oc, _, kh, kw = w
        if out is None:
            out = [_out_size(h, kh, strides[0], pads[0], pads[2], dilations[0]),
                   _out_size(wd, kw, strides[1], pads[1], pads[3], dilations[1])]
        taps = offset_group * kh * kw
        dtypes = dtypes or {}

        def arg(name, shape):
            return fn.add_arg(fn.fresh_name(name), tensor(shape, dtypes.get(name, dtype)))

        operands = [arg("x", x), arg("w", w), arg("offset", [n, 2 * taps, *out]),
                    arg("b", [oc]) if bias else None,
                    arg("mask", [n, taps, *out]) if mask else None]
        while operands[-1] is None:
            operands.pop()
        attrs = {"strides": list(strides), "pads": list(pads), "dilations": list(dilations),
                 "group": group, "offset_group": offset_group}
        return self.add_node(key, "deform_conv", operands, [tensor([n, oc, *out], dtype)],
                             attrs)


def _make_graph() -> Graph:
    g = Graph()
    # ONNX's node cases: with and without padding, mask and bias, two offset groups
    g.add("attrs", [1, 1, 3, 3], [1, 1, 2, 2])
    g.add("attrs", [1, 1, 3, 3], [1, 1, 2, 2], pads=[1, 1, 1, 1])
    g.add("attrs", [1, 1, 3, 3], [1, 1, 2, 2], bias=True, mask=True)
    g.add("attrs", [1, 2, 3, 3], [1, 2, 2, 2], offset_group=2)
    # each attribute, all together (asymmetric pads)
    g.add("attrs", [2, 3, 7, 6], [4, 3, 3, 3], strides=[2, 1])
    g.add("attrs", [2, 3, 6, 7], [4, 3, 2, 3], pads=[1, 0, 2, 1])
    g.add("attrs", [1, 2, 8, 7], [3, 2, 3, 2], dilations=[2, 3])
    g.add("attrs", [2, 4, 9, 8], [6, 2, 3, 2], strides=[2, 2], pads=[1, 2, 0, 1],
          dilations=[2, 1], group=2, offset_group=4, bias=True, mask=True)
    # groups: alone, with offset groups that split them, with fewer offset groups
    g.add("groups", [2, 6, 5, 5], [6, 2, 3, 3], group=3)
    g.add("groups", [1, 4, 5, 6], [8, 2, 2, 2], group=2, offset_group=4, mask=True)
    g.add("groups", [1, 6, 5, 4], [4, 3, 2, 2], group=2, offset_group=3, bias=True)
    g.add("groups", [1, 4, 4, 4], [4, 1, 3, 3], group=4, offset_group=2, pads=[1, 1, 1, 1])
    # 1 x 1 and a kernel larger than the image (every tap samples the padding somewhere)
    g.add("groups", [2, 3, 4, 5], [5, 3, 1, 1], mask=True)
    g.add("groups", [1, 2, 3, 3], [2, 2, 4, 4], pads=[2, 2, 2, 2], bias=True)
    # symbolic batch, image and output sizes
    g.add("symbolic", ["batch", 3, "h", "w"], [2, 3, 2, 2], out=["oh", "ow"], bias=True,
          mask=True)
    g.add("symbolic", ["batch", 4, 5, 5], [4, 2, 3, 3], group=2, offset_group=2,
          pads=[1, 1, 1, 1])
    # other types: of x (and the result), of the other operands alone
    for dtype in ("f16", "bf16", "f64"):
        g.add("dtypes", [1, 2, 5, 5], [3, 2, 2, 2], pads=[0, 1, 1, 0], bias=True, mask=True,
              dtype=dtype)
    g.add("dtypes", [1, 2, 5, 5], [3, 2, 2, 2], bias=True, mask=True,
          dtypes={"w": "f16", "offset": "f64", "b": "bf16", "mask": "f64"})
    g.add("dtypes", [1, 2, 5, 5], [3, 2, 2, 2], mask=True, dtype="f64",
          dtypes={"offset": "f32", "mask": "bool"})
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_kernels(_make_graph(), tmp_path_factory, "deform_conv")


def _inputs(node, sizes, rng) -> list:
    """Normal x, w, b; offsets of up to about 3 pixels; masks in [-1, 1) (bool: random)."""
    args = []
    for i, v in enumerate(node.operands):
        if v is None:
            args.append(None)
            continue
        shape, dtype = shape_at(v, sizes), v.type.dtype.np_dtype
        if v.type.dtype.kind == "bool":
            args.append(rng.random(shape) < 0.7)
        elif i == 2:
            args.append(nonzero_normal(rng, shape, 1.5).astype(dtype))
        else:
            args.append(nonzero_normal(rng, shape).astype(dtype))
    return args




@pytest.mark.parametrize("key, sizes_list, seed", [
    pytest.param("attrs", ({},), 0, id="strides_pads_dilations_bias_mask"),
    pytest.param("groups", ({},), 1, id="groups_and_offset_groups"),
    pytest.param("symbolic", SIZES, 2, id="symbolic_sizes"),
    pytest.param("dtypes", ({},), 3, id="operand_types"),
])
def test_matches_reference(built, key, sizes_list, seed):
    check_nodes(built, key, _inputs, by_operand_type(TOLERANCE), sizes_list, seed)


def test_integer_offsets_are_a_shifted_convolution(built):
    """Offsets of whole pixels: each tap reads one pixel of x (weight 1, the other corners 0)
    shifted by the offset, zero outside: a convolution computed here directly."""
    node = built.graph.nodes["attrs"][7]  # every attribute, groups, offset groups, mask, bias
    rng = np.random.default_rng(7)
    x, w, offset, b, mask = _inputs(node, {}, rng)
    offset = np.round(offset).astype(np.float32)
    (got,), (want,) = run_kernel(built, node, [x, w, offset, b, mask])
    a = node.attrs
    n, c, h, wd = x.shape
    oc, cpg, kh, kw = w.shape
    og, groups = a["offset_group"], a["group"]
    (sh, sw), (dh, dw), pads = a["strides"], a["dilations"], a["pads"]
    direct = np.zeros(want.shape)
    off = offset.reshape(n, og, kh, kw, 2, *want.shape[2:])
    m = mask.reshape(n, og, kh, kw, *want.shape[2:])
    for ni, o, i, j in np.ndindex(n, oc, *want.shape[2:]):
        g = o // (oc // groups)
        total = 0.0
        for ci, ka, kb in np.ndindex(cpg, kh, kw):
            ch = g * cpg + ci
            go = ch // (c // og)
            row = i * sh - pads[0] + ka * dh + int(off[ni, go, ka, kb, 0, i, j])
            col = j * sw - pads[1] + kb * dw + int(off[ni, go, ka, kb, 1, i, j])
            if 0 <= row < h and 0 <= col < wd:
                total += x[ni, ch, row, col] * m[ni, go, ka, kb, i, j] * w[o, ci, ka, kb]
        direct[ni, o, i, j] = total + b[o]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5)


def test_refused_configurations_name_node_and_op():
    g = Graph()
    # integer x: the reference truncates a float64 sum
    node = g.add("refused", [1, 2, 4, 4], [2, 2, 2, 2], dtype="i32")
    with pytest.raises(CPUBackendError, match=r"%\S+ = deform_conv: no CPU op kernel \(x of "
                                              r"i32"):
        primfunc_for(node, module=g.module)
    # offset groups that do not divide the channels (the reference's reshape fails)
    node = g.add("refused", [1, 3, 4, 4], [2, 3, 2, 2], offset_group=2)
    with pytest.raises(CPUBackendError, match=r"deform_conv: no CPU op kernel \(group 1 / "
                                              r"offset_group 2 do not divide"):
        primfunc_for(node, module=g.module)
    # w of a symbolic shape
    fn = g.fn
    operands = [fn.add_arg("xs", tensor([1, 2, 4, 4], "f32")),
                fn.add_arg("ws", tensor(["oc", 2, 2, 2], "f32")),
                fn.add_arg("os", tensor([1, 8, 3, 3], "f32"))]
    node = fn.make_node("deform_conv", operands, [tensor([1, "oc", 3, 3], "f32")],
                        {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1],
                         "group": 1, "offset_group": 1})
    with pytest.raises(CPUBackendError, match=r"deform_conv: no CPU op kernel \(w \('oc'"):
        primfunc_for(node, module=g.module)


# --------------------------------------------------------------------------------------------
# through qcompiler.compile: an ONNX model of DeformConv nodes
# --------------------------------------------------------------------------------------------


def _onnx_model():
    """DeformConv with fed offsets: plain; every attribute with bias and mask (initializers);
    its result fed on into an Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    feeds = {"x": nonzero_normal(rng, (2, 4, 7, 6)).astype(np.float32),
             "off1": nonzero_normal(rng, (2, 18, 5, 4), 1.5).astype(np.float32),
             "off2": nonzero_normal(rng, (2, 16, 4, 3), 1.5).astype(np.float32)}
    inits = [numpy_helper.from_array(nonzero_normal(rng, (3, 4, 3, 3)).astype(np.float32),
                                     "w1"),
             numpy_helper.from_array(nonzero_normal(rng, (4, 2, 2, 2)).astype(np.float32),
                                     "w2"),
             numpy_helper.from_array(nonzero_normal(rng, (4,)).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.random((2, 8, 4, 3)).astype(np.float32), "m2")]
    nodes = [helper.make_node("DeformConv", ["x", "w1", "off1"], ["plain"]),
             helper.make_node("DeformConv", ["x", "w2", "off2", "b2", "m2"], ["all"],
                              strides=[2, 2], pads=[1, 0, 0, 1], dilations=[1, 2], group=2,
                              offset_group=2),
             helper.make_node("Add", ["all", "all"], ["all_twice"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape)
              for n, v in feeds.items()]
    outputs = [helper.make_tensor_value_info("plain", TensorProto.FLOAT, [2, 3, 5, 4]),
               helper.make_tensor_value_info("all_twice", TensorProto.FLOAT, [2, 4, 4, 3])]
    return onnx_model("deform_conv", nodes, inputs, outputs, inits, opset=22), feeds


def test_onnx_deform_conv_compiles_without_host_fallback(tmp_path):
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_deform_conv_", kernel_count=2,
                            output_count=2, tolerance=TOLERANCE["f32"])
