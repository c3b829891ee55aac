"""The CPU ``col2im`` kernel (codegen/cpu/col2im.py: ONNX Col2Im) against the reference
implementation.

Kernel level: one op library holds a col2im node per configuration (2-D with every attribute
alone and together, overlapping and gapped blocks, asymmetric pads, 1-D, 3-D, a symbolic batch
and channels, f16 / bf16 / f64, 8- and 16-bit integers whose sums wrap, bool); each runs on
fresh random inputs (no zeros) into a result buffer filled with garbage and must equal
``OP_IMPLS["col2im"]`` exactly (the kernel adds the same terms in the same order in the same
type). Model level: an ONNX model of Col2Im nodes compiled for ``cpu`` through
``qcompiler.compile`` runs every node as a compiled kernel (no host fallback) and matches the
``ref`` target.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import (KernelGraph, aligned, build_kernels, check_nodes,  # noqa: E402
                              check_onnx_model_on_cpu, nonzero_normal, onnx_model, run_kernel)
from qcompiler.codegen.cpu.backend import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import OpsLibrary, build_ops_library, primfunc_for  # noqa: E402
from qcompiler.codegen.cpu.runtime import aligned_empty  # noqa: E402
from qcompiler.ir.core import Function, Module, constant_node  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402
from qcompiler.runtime.reference import OP_IMPLS  # noqa: E402

# sizes of the symbolic configurations: batch and channels * prod(block)
SIZES = ({"batch": 3, "ck": 8}, {"batch": 1, "ck": 4})


def _counts(image, block, strides, pads, dil):
    nsp = len(image)
    return [(image[i] + pads[i] + pads[i + nsp] - ((block[i] - 1) * dil[i] + 1))
            // strides[i] + 1 for i in range(nsp)]


class Graph(KernelGraph):
    def __init__(self):
        super().__init__("col2im")

    def const(self, values):
        return constant_node(self.fn, self.module, np.asarray(values, np.int64)).result

    def add(self, key, image, block, batch=2, channels=3, strides=None, pads=None,
            dilations=None, dtype="f32", ck=None):
        """A col2im node; ``ck``: x's channel dim when it is a symbol (``channels`` unused)."""
        nsp = len(image)
        strides, dil = strides or [1] * nsp, dilations or [1] * nsp
        pads = pads or [0] * (2 * nsp)
        taps = int(np.prod(block))
        x_shape = [batch, ck or channels * taps,
                   int(np.prod(_counts(image, block, strides, pads, dil)))]
        x = self.fn.add_arg(self.fn.fresh_name("x"), tensor(x_shape, dtype))
        result = tensor([batch, "?" if ck else channels, *image], dtype)
        return self.add_node(key, "col2im", [x, self.const(image), self.const(block)],
                             [result], {"strides": strides, "pads": pads, "dilations": dil})


def _make_graph() -> Graph:
    g = Graph()
    # 2-D: defaults, each attribute, all together (asymmetric pads; a stride above the
    # dilated block leaves pixels no block covers; one below makes blocks overlap)
    g.add("2d", [5, 5], [1, 5], channels=1)
    g.add("2d", [4, 5], [2, 2])
    g.add("2d", [6, 7], [2, 3], strides=[2, 3])
    g.add("2d", [7, 6], [2, 2], strides=[3, 3])
    g.add("2d", [6, 9], [2, 2], dilations=[2, 3])
    g.add("2d", [5, 4], [3, 2], pads=[1, 0, 2, 1])
    g.add("2d", [9, 8], [3, 2], strides=[2, 1], pads=[2, 1, 0, 3], dilations=[2, 3])
    g.add("2d", [3, 3], [3, 3], pads=[1, 1, 1, 1])
    # other ranks: 1-D, 3-D (a block whose dilation reaches past the stride)
    g.add("nd", [11], [3], strides=[2], pads=[1, 2], dilations=[2])
    g.add("nd", [4, 5, 6], [2, 2, 3], strides=[1, 2, 1], pads=[0, 1, 1, 0, 0, 2],
          dilations=[2, 1, 2])
    g.add("nd", [3, 3, 4, 3], [2, 1, 2, 2], channels=2)
    # symbolic batch; symbolic channels (the result's channels unknown until run time)
    g.add("symbolic", [5, 6], [2, 3], batch="batch", strides=[1, 2], pads=[1, 0, 0, 1])
    g.add("symbolic", [6, 5], [2, 2], batch="batch", ck="ck", dilations=[2, 1])
    # other types: floats, integers that overflow and wrap, bool
    for dtype in ("f16", "bf16", "f64", "i8", "u8", "i16", "u16", "bool"):
        g.add("dtypes", [5, 6], [3, 2], strides=[1, 2], pads=[1, 1, 0, 1], dtype=dtype)
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_kernels(_make_graph(), tmp_path_factory, "col2im")


def _x(node, sizes, rng) -> np.ndarray:
    """Random non-zero entries: normal floats, integers over the whole range (sums overflow
    8- and 16-bit results), bools mostly true (some sums of several, some single)."""
    v = node.operands[0]
    shape = tuple(d if isinstance(d, int) else sizes[d] for d in v.type.shape)
    dtype = v.type.dtype.np_dtype
    if v.type.dtype.kind == "bool":
        return rng.random(shape) < 0.3
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, shape, endpoint=True)
        a[a == 0] = 1
        return a.astype(dtype)
    return nonzero_normal(rng, shape).astype(dtype)


def _args(node, x) -> list:
    image, block = (np.asarray(v.producer.attrs["value"]) for v in node.operands[1:])
    return [x, image, block]


def _inputs(node, sizes, rng) -> list:
    """Random columns (``_x``), then the constant image and block shapes."""
    return _args(node, _x(node, sizes, rng))


# a test per group of _make_graph: (key, sizes of the symbolic dims, seed of the inputs); no
# tolerance, bit for bit: the same float64 sums in the same order, one rounding
@pytest.mark.parametrize("key, sizes_list, seed", [
    pytest.param("2d", ({},), 0, id="2d_strides_pads_dilations"),
    pytest.param("nd", ({},), 1, id="1d_and_nd"),
    pytest.param("symbolic", SIZES, 2, id="symbolic_batch_and_channels"),
])
def test_matches_reference(built, key, sizes_list, seed):
    check_nodes(built, key, _inputs, None, sizes_list, seed)


def test_other_types(built):
    """f16 / bf16 / f64; i8 / u8 / i16 / u16 whose sums wrap; bool (any true entry): bit for
    bit too."""
    check_nodes(built, "dtypes", _inputs, None, seed=3)
    # the integer cases did overflow (so the wrap is what was compared)
    g = built.graph
    node = next(n for n in g.nodes["dtypes"] if n.operands[0].type.dtype.name == "i8")
    x = _x(node, {}, np.random.default_rng(3))
    sums = OP_IMPLS["col2im"](node, _args(node, x.astype(np.float64)), g.module)[0]
    assert (np.abs(sums) > 127).any()


def test_every_entry_lands_once(built):
    """Ones in: each pixel counts the blocks that cover it (0 where a stride leaves gaps,
    never 2 where blocks do not overlap)."""
    node = built.graph.nodes["2d"][3]  # stride 3 over a 2x2 block: gaps
    ones = np.ones(node.operands[0].type.shape, np.float32)
    (got,), (want,) = run_kernel(built, node, _args(node, ones))
    np.testing.assert_array_equal(got, want)
    assert (got == 0).any() and got.max() == 1


def test_wrong_column_count_fails(tmp_path):
    """x with another L than prod(counts) (a symbolic L here): the reference raises, the
    kernel's shape check fails the call."""
    module = Module("m")
    fn = module.add_function(Function("f"))
    x = fn.add_arg("x", tensor([1, 4, "L"], "f32"))
    image = constant_node(fn, module, np.asarray([3, 3], np.int64)).result
    block = constant_node(fn, module, np.asarray([2, 2], np.int64)).result
    node = fn.make_node("col2im", [x, image, block], [tensor([1, 1, 3, 3], "f32")],
                        {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]})
    path = str(tmp_path / "ops.so")
    names = build_ops_library([node], "cpu", path, module=module)
    call = OpsLibrary(path)[names[node.results[0].name]]
    args = [np.ones((1, 4, 5), np.float32), np.asarray([3, 3]), np.asarray([2, 2])]
    with pytest.raises(ValueError, match="col2im: 5 columns"):
        OP_IMPLS["col2im"](node, args, module)
    out = aligned_empty((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="Mismatched x"):  # TVM checks the argument
        call(*[aligned(a) for a in args], out)
    # the right L (4 = 2 x 2 blocks) runs
    args[0] = np.ones((1, 4, 4), np.float32)
    call(*[aligned(a) for a in args], out)
    np.testing.assert_array_equal(out, OP_IMPLS["col2im"](node, args, module)[0])


def test_refused_configurations_name_node_and_op():
    g = Graph()
    # 32-bit integers: the reference's float64 round trip is not an integer sum
    node = g.add("refused", [4, 4], [2, 2], dtype="i32")
    with pytest.raises(CPUBackendError, match=r"%\S+ = col2im: no CPU op kernel \(x of i32"):
        primfunc_for(node, module=g.module)
    # negative pads
    node = g.add("refused", [4, 4], [2, 2], pads=[-1, 0, 0, 0])
    with pytest.raises(CPUBackendError, match=r"col2im: no CPU op kernel \(strides .* pads "
                                              r"\[-1, 0, 0, 0\] non-negative"):
        primfunc_for(node, module=g.module)
    # image_shape given at run time
    fn = g.fn
    x = fn.add_arg("xr", tensor([1, 4, 9], "f32"))
    node = fn.make_node("col2im", [x, fn.add_arg("image", tensor([2], "i64")),
                                   g.const([2, 2])], [tensor([1, 1, 4, 4], "f32")],
                        {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]})
    with pytest.raises(CPUBackendError, match=r"col2im: no CPU op kernel \(image_shape / "
                                              r"block_shape are not constants"):
        primfunc_for(node, module=g.module)


# --------------------------------------------------------------------------------------------
# through qcompiler.compile: an ONNX model of Col2Im nodes
# --------------------------------------------------------------------------------------------


def _onnx_model():
    """Col2Im nodes (2-D with every attribute, 3-D) on fed columns, image_shape and
    block_shape initializers, one node's result fed on into an Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    inputs, inits, feeds, nodes, outputs = [], [], {}, [], []

    def node(name, image, block, channels=2, batch=2, **attrs):
        nsp = len(image)
        counts = _counts(image, block, attrs.get("strides", [1] * nsp),
                         attrs.get("pads", [0] * 2 * nsp), attrs.get("dilations", [1] * nsp))
        x = nonzero_normal(rng, (batch, channels * int(np.prod(block)), int(np.prod(counts))))
        feeds[f"{name}_x"] = x.astype(np.float32)
        inputs.append(helper.make_tensor_value_info(f"{name}_x", TensorProto.FLOAT, x.shape))
        inits.append(numpy_helper.from_array(np.asarray(image, np.int64), f"{name}_image"))
        inits.append(numpy_helper.from_array(np.asarray(block, np.int64), f"{name}_block"))
        nodes.append(helper.make_node("Col2Im", [f"{name}_x", f"{name}_image", f"{name}_block"],
                                      [f"{name}_y"], name=name, **attrs))
        return f"{name}_y", [batch, channels, *image]

    y, shape = node("plain", [5, 6], [2, 3])
    outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, shape))
    y, shape = node("all", [9, 8], [3, 2], strides=[2, 1], pads=[2, 1, 0, 3],
                    dilations=[2, 3])
    outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, shape))
    y, shape = node("vol", [4, 5, 6], [2, 2, 3], channels=1, strides=[1, 2, 1],
                    pads=[0, 1, 1, 0, 0, 2], dilations=[2, 1, 2])
    nodes.append(helper.make_node("Add", [y, y], ["vol_twice"]))
    outputs.append(helper.make_tensor_value_info("vol_twice", TensorProto.FLOAT, shape))
    return onnx_model("col2im", nodes, inputs, outputs, inits, opset=18), feeds


def test_onnx_col2im_compiles_without_host_fallback(tmp_path):
    # bit for bit, as at the kernel level
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_col2im_", kernel_count=3,
                            output_count=3)
