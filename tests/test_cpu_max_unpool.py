"""The CPU ``max_unpool`` kernel (codegen/cpu/max_unpool.py: ONNX MaxUnpool) against the
reference implementation.

Kernel level: one op library holds a max_unpool node per configuration (2-D as after a max
pool, an output larger than the pool's input, 1-D, 3-D, a symbolic batch and channels, every
element type with a TVM dtype, bool included, and indices of several integer types); each
runs on fresh random non-zero inputs into a result buffer filled with garbage (the positions
no index names must become 0) and must equal ``OP_IMPLS["max_unpool"]`` exactly. Indices
land anywhere in the output (other channels and batch entries too: they are flat over the
whole tensor) and repeat (the last element written stays). Indices outside the output fail
the call, as the reference raises. Model level: an ONNX model of MaxPool -> MaxUnpool (with
and without output_shape) compiled for ``cpu`` through ``qcompiler.compile`` runs every node
as a compiled kernel (no host fallback) and matches the ``ref`` target.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import (KernelGraph, aligned, build_kernels, check_nodes,  # noqa: E402
                              check_onnx_model_on_cpu, nonzero_normal, onnx_model, run_kernel,
                              shape_at)
from qcompiler.codegen.cpu.backend import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import primfunc_for  # noqa: E402
from qcompiler.codegen.cpu.runtime import aligned_empty  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402
from qcompiler.runtime.reference import OP_IMPLS  # noqa: E402

# sizes of the symbolic configurations: batch and channels
SIZES = ({"batch": 3, "channels": 2}, {"batch": 1, "channels": 5})


class Graph(KernelGraph):
    def __init__(self):
        super().__init__("max_unpool")

    def add(self, key, shape, output_shape, dtype="f32", index_dtype="i64"):
        fn = self.fn
        x = fn.add_arg(fn.fresh_name("x"), tensor(shape, dtype))
        indices = fn.add_arg(fn.fresh_name("indices"), tensor(shape, index_dtype))
        result = tensor(shape[:2] + output_shape, dtype)
        return self.add_node(key, "max_unpool", [x, indices], [result],
                             {"output_shape": output_shape})


def _make_graph() -> Graph:
    g = Graph()
    # 2-D: a 2 x 2 pool's inverse, an output larger than the pool's input, overlapping
    # windows (more elements than a plane holds: repeats are certain)
    g.add("shapes", [2, 3, 2, 2], [4, 4])
    g.add("shapes", [1, 2, 3, 3], [7, 8])
    g.add("shapes", [2, 2, 4, 4], [3, 3])
    # 1-D and 3-D
    g.add("shapes", [2, 3, 5], [10])
    g.add("shapes", [1, 2, 2, 3, 2], [4, 5, 4])
    # symbolic batch and channels
    g.add("symbolic", ["batch", "channels", 3, 2], [6, 4])
    g.add("symbolic", ["batch", 2, 4], [9])
    # every element type; indices of other integer types
    for dtype in ("f16", "bf16", "f64", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64",
                  "bool"):
        g.add("dtypes", [2, 2, 3, 3], [6, 6], dtype)
    for index_dtype in ("i32", "u8", "i16", "u64"):
        g.add("index_types", [1, 3, 2, 2], [4, 5], index_dtype=index_dtype)
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_kernels(_make_graph(), tmp_path_factory, "max_unpool")


def _x(v, shape, rng) -> np.ndarray:
    """Random non-zero elements (bools all true: a written position differs from the 0s)."""
    dtype = v.type.dtype.np_dtype
    if v.type.dtype.kind == "bool":
        return np.ones(shape, bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        a[a == 0] = 1
        return a.astype(dtype)
    return nonzero_normal(rng, shape).astype(dtype)


def _inputs(node, sizes, rng) -> list:
    """x, and indices anywhere in the output (the index type's range permitting), repeats
    included."""
    x, indices = node.operands
    shape = shape_at(x, sizes)
    out_size = int(np.prod(shape_at(node.results[0], sizes)))
    high = min(out_size, int(np.iinfo(indices.type.dtype.np_dtype).max) + 1)
    idx = rng.integers(0, high, shape).astype(indices.type.dtype.np_dtype)
    return [_x(x, shape, rng), idx]


@pytest.mark.parametrize("key, sizes_list, seed", [
    pytest.param("shapes", ({},), 0, id="1d_2d_3d"),
    pytest.param("symbolic", SIZES, 1, id="symbolic_batch_and_channels"),
    pytest.param("dtypes", ({},), 2, id="element_types"),
    pytest.param("index_types", ({},), 3, id="index_types"),
])
def test_matches_reference(built, key, sizes_list, seed):
    check_nodes(built, key, _inputs, None, sizes_list, seed)


def test_repeated_indices_keep_the_last_element(built):
    """Every element of x to one of 3 positions: each keeps the last element sent there (a
    parallel or reordered scatter would keep another)."""
    node = built.graph.nodes["shapes"][2]  # [2, 2, 4, 4] -> [2, 2, 3, 3]
    x = np.arange(1, 65, dtype=np.float32).reshape(2, 2, 4, 4)
    idx = np.tile(np.asarray([5, 17, 30]), 22)[:64].reshape(2, 2, 4, 4)
    (got,), (want,) = run_kernel(built, node, [x, idx])
    np.testing.assert_array_equal(got, want)
    flat = got.reshape(-1)
    assert flat[5] == 64 and flat[17] == 62 and flat[30] == 63
    assert np.count_nonzero(flat) == 3


def test_index_outside_the_output_fails(built):
    """An index past the end or negative: the reference raises, the kernel's check fails the
    call."""
    node = built.graph.nodes["shapes"][0]  # [2, 3, 2, 2] -> [2, 3, 4, 4]: 96 elements
    call = built.lib[built.names[node.results[0].name]]
    x = np.ones((2, 3, 2, 2), np.float32)
    for bad in (96, -1):
        idx = np.zeros((2, 3, 2, 2), np.int64)
        idx[1, 2, 1, 0] = bad
        with pytest.raises(ValueError, match="index out of the output"):
            OP_IMPLS["max_unpool"](node, [x, idx], built.graph.module)
        with pytest.raises(RuntimeError, match="max_unpool: an index is outside the output"):
            call(aligned(x), aligned(idx), aligned_empty((2, 3, 4, 4), np.float32))
    idx[1, 2, 1, 0] = 95  # the last position is inside
    (got,), (want,) = run_kernel(built, node, [x, idx])
    np.testing.assert_array_equal(got, want)


def test_refused_configurations_name_node_and_op():
    g = Graph()
    fn = g.fn
    x = fn.add_arg("xr", tensor([1, 2, 2, 2], "f32"))
    indices = fn.add_arg("ir", tensor([1, 2, 4, 1], "i64"))
    node = g.add_node("refused", "max_unpool", [x, indices], [tensor([1, 2, 4, 4], "f32")],
                      {"output_shape": [4, 4]})
    with pytest.raises(CPUBackendError, match=r"%\S+ = max_unpool: no CPU op kernel "
                                              r"\(indices \(1, 2, 4, 1\) and x"):
        primfunc_for(node, module=g.module)


# --------------------------------------------------------------------------------------------
# through qcompiler.compile: MaxPool -> MaxUnpool
# --------------------------------------------------------------------------------------------


def _onnx_model():
    """MaxPool (with indices) of x [2, 3, 6, 8], then MaxUnpool back to its size (inferred)
    and to a larger output_shape (the kernel, then a pad); a 1-D MaxUnpool on fed indices."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    feeds = {"x": nonzero_normal(rng, (2, 3, 6, 8)).astype(np.float32),
             "v": nonzero_normal(rng, (1, 2, 4)).astype(np.float32),
             "vi": rng.integers(0, 2 * 9, (1, 2, 4)).astype(np.int64)}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [helper.make_node("MaxPool", ["x"], ["pooled", "where"], **pool),
             helper.make_node("MaxUnpool", ["pooled", "where"], ["back"], **pool),
             helper.make_node("MaxUnpool", ["pooled", "where", "shape"], ["larger"], **pool),
             helper.make_node("MaxUnpool", ["v", "vi"], ["line"], kernel_shape=[3],
                              strides=[2], pads=[0, 0])]
    inits = [numpy_helper.from_array(np.asarray([2, 3, 8, 9], np.int64), "shape")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 8]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 4]),
              helper.make_tensor_value_info("vi", TensorProto.INT64, [1, 2, 4])]
    outputs = [helper.make_tensor_value_info("back", TensorProto.FLOAT, [2, 3, 6, 8]),
               helper.make_tensor_value_info("larger", TensorProto.FLOAT, [2, 3, 8, 9]),
               helper.make_tensor_value_info("line", TensorProto.FLOAT, [1, 2, 9])]
    return onnx_model("max_unpool", nodes, inputs, outputs, inits, opset=22), feeds


def test_onnx_max_unpool_compiles_without_host_fallback(tmp_path):
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_max_unpool_", kernel_count=3,
                            output_count=3)
