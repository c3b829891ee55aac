"""The CPU ``det`` kernel (codegen/cpu/det.py: ONNX Det) against the reference implementation.

Kernel level: one op library holds a det node per configuration (single matrices of 1 x 1 to
7 x 7, batches of one and two leading dims, empty matrices, a symbolic batch and matrix size,
f16 / bf16 / f64); each runs on fresh random inputs into a result buffer filled with garbage
and is compared with ``OP_IMPLS["det"]`` (numpy's LAPACK LU: the kernel's elimination rounds
differently in the last bits, so within a tolerance). Special inputs: matrices that need row
swaps (permutations: exactly +-1), singular ones (exactly 0) and ones whose pivots' product
over- or underflows on the way where numpy's sum of logarithms does not. Model level: an ONNX
model of Det nodes compiled for ``cpu`` through ``qcompiler.compile`` runs every node as a
compiled kernel (no host fallback) and matches the ``ref`` target.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import (HALF_FLOAT_TOLERANCE, KernelGraph, aligned,  # noqa: E402
                              by_operand_type, build_kernels, check_nodes, check_onnx_model_on_cpu,
                              nonzero_normal, onnx_model, run_kernel, shape_at)
from qcompiler.codegen.cpu.backend import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import OpsLibrary, build_ops_library, primfunc_for  # noqa: E402
from qcompiler.codegen.cpu.runtime import aligned_empty  # noqa: E402
from qcompiler.ir.core import Function, Module  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402
from qcompiler.runtime.reference import OP_IMPLS  # noqa: E402

# sizes of the symbolic configurations: batch and matrix size
SIZES = ({"batch": 3, "m": 4}, {"batch": 1, "m": 1}, {"batch": 2, "m": 6})
# per result dtype: (rtol, atol). float64 LU in another order than LAPACK's: a few ulps of
# float64 (the atol for determinants that cancel to near 0), which f32 rounding mostly hides
TOLERANCE = {"f64": (1e-10, 1e-10), "f32": (1e-6, 1e-6), **HALF_FLOAT_TOLERANCE}


class Graph(KernelGraph):
    def __init__(self):
        super().__init__("det")

    def add(self, key, shape, dtype="f32"):
        x = self.fn.add_arg(self.fn.fresh_name("x"), tensor(shape, dtype))
        return self.add_node(key, "det", [x], [tensor(shape[:-2], dtype)], {})


def _make_graph() -> Graph:
    g = Graph()
    # single matrices of every small size; batches of one and two leading dims
    for m in range(1, 8):
        g.add("shapes", [m, m])
    g.add("shapes", [5, 3, 3])
    g.add("shapes", [2, 3, 4, 4])
    g.add("shapes", [3, 0, 0])  # empty matrices: determinant 1
    # symbolic batch and matrix size
    g.add("symbolic", ["batch", "m", "m"])
    g.add("symbolic", ["batch", 2, 5, 5], "f64")
    # other types
    for dtype in ("f16", "bf16", "f64"):
        g.add("dtypes", [4, 3, 3], dtype)
    # special matrices (test_special_matrices)
    g.add("special", [6, 5, 5], "f64")
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_kernels(_make_graph(), tmp_path_factory, "det")


def _inputs(node, sizes, rng) -> list:
    x = node.operands[0]
    return [nonzero_normal(rng, shape_at(x, sizes)).astype(x.type.dtype.np_dtype)]




@pytest.mark.parametrize("key, sizes_list, seed", [
    pytest.param("shapes", ({},), 0, id="sizes_and_batches"),
    pytest.param("symbolic", SIZES, 1, id="symbolic_batch_and_size"),
    pytest.param("dtypes", ({},), 2, id="f16_bf16_f64"),
])
def test_matches_reference(built, key, sizes_list, seed):
    check_nodes(built, key, _inputs, by_operand_type(TOLERANCE), sizes_list, seed)


def test_empty_matrices_have_determinant_one(built):
    node = next(n for n in built.graph.nodes["shapes"] if n.operands[0].type.shape[-1] == 0)
    (got,), (want,) = run_kernel(built, node, [np.zeros((3, 0, 0), np.float32)])
    np.testing.assert_array_equal(got, np.ones(3, np.float32))
    np.testing.assert_array_equal(got, want)


def test_special_matrices(built):
    """Row swaps (permutations, a zero first pivot), singular matrices (a zero row, a zero column:
    exactly 0) and pivots whose running product overflows or underflows: numpy's
    sign * exp(sum log|pivot|), which the kernel forms the same way."""
    node = built.graph.nodes["special"][0]
    rng = np.random.default_rng(3)
    x = nonzero_normal(rng, (6, 5, 5))
    x[0] = np.eye(5)[[3, 0, 4, 1, 2]]              # a permutation: +-1, only by swaps
    x[1, 0, 0] = 0.0                                # the first pivot must come from below
    x[2, 3] = 0.0                                   # a zero row: singular
    x[3, :, 2] = 0.0                                # a zero column: singular
    x[4] = np.diag([1e200, 1e200, 1e-300, 1e-150, 1.0])  # the product leaves float64 midway
    x[4, 4, 0] = 3.0
    x[5] = np.diag([1e-200, 1e-200, 1e250, 1e150, 2.0])
    (got,), (want,) = run_kernel(built, node, [x])
    assert want[0] in (1.0, -1.0) and want[2] == 0.0 and want[3] == 0.0
    assert np.isfinite(want[4]) and want[4] != 0 and np.isfinite(want[5]) and want[5] != 0
    np.testing.assert_array_equal(got[[0, 2, 3]], want[[0, 2, 3]])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_non_square_call_fails(tmp_path):
    """A symbolic [m, n] called with m != n: numpy raises, the kernel's shape check fails the
    call (one dim for both)."""
    module = Module("m")
    fn = module.add_function(Function("f"))
    x = fn.add_arg("x", tensor([2, "m", "n"], "f32"))
    node = fn.make_node("det", [x], [tensor([2], "f32")], {})
    path = str(tmp_path / "ops.so")
    names = build_ops_library([node], "cpu", path, module=module)
    call = OpsLibrary(path)[names[node.results[0].name]]
    out = aligned_empty((2,), np.float32)
    with pytest.raises(np.linalg.LinAlgError):
        OP_IMPLS["det"](node, [np.ones((2, 3, 4), np.float32)], module)
    with pytest.raises(ValueError, match="Mismatched x"):
        call(aligned(np.ones((2, 3, 4), np.float32)), out)
    square = nonzero_normal(np.random.default_rng(4), (2, 3, 3)).astype(np.float32)
    call(aligned(square), out)
    np.testing.assert_allclose(out, OP_IMPLS["det"](node, [square], module)[0], rtol=1e-6)


def test_refused_configurations_name_node_and_op():
    g = Graph()
    # integers: the reference truncates a float64 determinant (its rounding decides)
    node = g.add("refused", [3, 3], "i32")
    with pytest.raises(CPUBackendError, match=r"%\S+ = det: no CPU op kernel \(x of i32"):
        primfunc_for(node, module=g.module)
    node = g.add("refused", [2, 2], "bool")
    with pytest.raises(CPUBackendError, match=r"det: no CPU op kernel \(x of bool"):
        primfunc_for(node, module=g.module)


# --------------------------------------------------------------------------------------------
# through qcompiler.compile: an ONNX model of Det nodes
# --------------------------------------------------------------------------------------------


def _onnx_model():
    """Det of a batch [2, 3, 4, 4] and of one 5 x 5 matrix (fed on into an Add)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    feeds = {"a": nonzero_normal(rng, (2, 3, 4, 4)).astype(np.float32),
             "b": nonzero_normal(rng, (5, 5)).astype(np.float32)}
    nodes = [helper.make_node("Det", ["a"], ["det_a"]),
             helper.make_node("Det", ["b"], ["det_b"]),
             helper.make_node("Add", ["det_b", "det_b"], ["twice_b"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape)
              for n, v in feeds.items()]
    outputs = [helper.make_tensor_value_info("det_a", TensorProto.FLOAT, [2, 3]),
               helper.make_tensor_value_info("twice_b", TensorProto.FLOAT, [])]
    return onnx_model("det", nodes, inputs, outputs, [], opset=22), feeds


def test_onnx_det_compiles_without_host_fallback(tmp_path):
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_det_", kernel_count=2, output_count=2,
                            tolerance=TOLERANCE["f32"])
