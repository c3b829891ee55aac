"""Checks of a CPU op kernel against the reference, shared by the kernel tests
(test_cpu_recurrent.py, test_cpu_linear_attention.py, test_cpu_col2im.py, test_cpu_det.py,
test_cpu_max_unpool.py, test_cpu_deform_conv.py, test_cpu_resize_antialias.py).

Kernel level: the nodes of a test graph (``graph.module``, and ``graph.nodes``: a key per
group of configurations -> nodes) are built into one op library; each node runs on its
operands into result buffers filled with garbage (a position the kernel does not write shows
up) and is compared with ``OP_IMPLS[node.op]``. Model level: an ONNX model compiled for
``cpu`` through ``qcompiler.compile`` runs its nodes as compiled kernels (no host fallback)
and matches the ``ref`` target.

Imported as a plain module (conftest.py puts tests/ on sys.path); the callers skip without
TVM before importing it.
"""
from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest

from qcompiler.codegen.cpu.ops import OpsLibrary, build_ops_library
from qcompiler.codegen.cpu.runtime import aligned_empty
from qcompiler.ir.core import Function, Module
from qcompiler.runtime.reference import OP_IMPLS

# (rtol, atol) of f16 / bf16 results computed in float32 and rounded once (as the
# reference's): a last-bit difference of float32 can move them by one of their ulps
HALF_FLOAT_TOLERANCE = {"f16": (2e-3, 2e-3), "bf16": (1.6e-2, 1.6e-2)}
# what the result buffers hold before a kernel runs: a position it does not write shows up
GARBAGE = 7


class KernelGraph:
    """The nodes under test, in one function of a module, grouped by key (one test a group)."""

    def __init__(self, name: str):
        self.module = Module(name)
        self.fn = self.module.add_function(Function("main"))
        self.nodes: dict = {}

    def add_node(self, key: str, op: str, operands: list, results: list, attrs: dict):
        """A new node of ``op``, in group ``key``."""
        node = self.fn.make_node(op, operands, results, attrs)
        self.nodes.setdefault(key, []).append(node)
        return node


class BuiltKernels(NamedTuple):
    """A test graph and its op library: ``names`` maps a node's first result name to its
    kernel in ``lib``."""
    graph: KernelGraph
    names: dict
    lib: OpsLibrary


def build_kernels(graph: KernelGraph, tmp_path_factory, name: str) -> BuiltKernels:
    """Every node of ``graph.nodes`` built into one op library (in a temp dir ``name``)."""
    nodes = [n for ns in graph.nodes.values() for n in ns]
    path = str(tmp_path_factory.mktemp(name) / "ops.so")
    names = build_ops_library(nodes, "cpu", path, module=graph.module)
    return BuiltKernels(graph, names, OpsLibrary(path))


def aligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` in memory aligned as the kernels require."""
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def nonzero_normal(rng, shape, scale: float = 1.0) -> np.ndarray:
    """Normal float64 samples times ``scale``, zeros replaced by 0.25 (a zero operand would
    hide a term the kernel dropped)."""
    a = rng.standard_normal(shape) * scale
    a[a == 0] = 0.25
    return a


def shape_at(value, sizes: dict) -> tuple:
    """The shape of a node's operand or result with its symbolic dims at ``sizes``."""
    return tuple(d if isinstance(d, int) else sizes[d] for d in value.type.shape)


def run_kernel(built: BuiltKernels, node, args: list) -> tuple[list, list]:
    """(kernel results, reference results) of ``node`` on ``args`` (None: an absent
    operand, not passed to the kernel)."""
    want = OP_IMPLS[node.op](node, args, built.graph.module)
    outs = [aligned_empty(w.shape, w.dtype) for w in want]
    for o in outs:
        o[...] = GARBAGE
    built.lib[built.names[node.results[0].name]](*[aligned(a) for a in args if a is not None],
                                                 *outs)
    return outs, want


def by_operand_type(table: dict) -> Callable:
    """A ``check_nodes`` tolerance: ``table``'s (rtol, atol) for the type of the node's first
    operand (``"f32"``, ``"f64"``, ``"f16"``, ``"bf16"``)."""
    return lambda node, want: table[node.operands[0].type.dtype.name]


def check_nodes(built: BuiltKernels, key: str, make_args: Callable,
                tolerance: Optional[Callable] = None, sizes_list=({},), seed: int = 0) -> None:
    """Each node of ``built.graph.nodes[key]`` at each of ``sizes_list`` (values of the
    symbolic dims) runs on ``make_args(node, sizes, rng)``; every result must have the
    reference's shape and dtype and equal it: exactly without ``tolerance``, else within
    ``tolerance(node, want) -> (rtol, atol)`` (compared in float64)."""
    rng = np.random.default_rng(seed)
    checked = 0
    for sizes in sizes_list:
        for node in built.graph.nodes[key]:
            outs, want = run_kernel(built, node, make_args(node, sizes, rng))
            for i, (got, w) in enumerate(zip(outs, want)):
                what = f"{node.op} {dict(node.attrs)} of {node.operands[0].type}: result " \
                       f"{i} at {sizes}"
                assert got.shape == w.shape and got.dtype == w.dtype, what
                if tolerance is None:
                    np.testing.assert_array_equal(got, w, err_msg=what)
                else:
                    rtol, atol = tolerance(node, w)
                    np.testing.assert_allclose(got.astype(np.float64), w.astype(np.float64),
                                               rtol=rtol, atol=atol, err_msg=what)
            checked += 1
    assert checked


def onnx_model(name: str, nodes: list, inputs: list, outputs: list, inits: list,
               opset: int):
    """The checked ModelProto of a graph in the default domain at ``opset``."""
    import onnx
    from onnx import helper
    from onnx_models import IR_VERSION

    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def check_onnx_model_on_cpu(make_model: Callable, tmp_path, kernel_prefix: str,
                            kernel_count: int, output_count: int,
                            tolerance: Optional[tuple] = None) -> None:
    """``make_model()`` -> (model, feeds) compiled for ``cpu`` runs no node on the host, has
    ``kernel_count`` op library kernels named ``kernel_prefix...``, and its
    ``output_count`` outputs equal the ``ref`` target's: exactly without ``tolerance``, else
    within (rtol, atol). Skips where the cpu target is not available."""
    import qcompiler
    from qcompiler.targets import get_target

    if not get_target("cpu").available:
        pytest.skip("the cpu target is not available here")
    model, feeds = make_model()
    out_dir = str(tmp_path / "out")
    compiled = qcompiler.compile(model, target="cpu", output_dir=out_dir, jobs=1,
                                 progress=False, cache=False)
    with open(os.path.join(out_dir, "report.json")) as f:
        assert json.load(f)["host_fallback"] == []
    with open(os.path.join(out_dir, "manifest.json")) as f:
        ops = next(k for k in json.load(f)["kernels"] if k.get("impl") == "tvm-llvm-ops")
    assert sum(name.startswith(kernel_prefix) for name in ops["kernels"].values()) \
        == kernel_count
    got = compiled.run(feeds)
    want = qcompiler.compile(model, "ref").run(feeds)
    assert set(got) == set(want) and len(want) == output_count
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        if tolerance is None:
            np.testing.assert_array_equal(got[name], w, err_msg=name)
        else:
            rtol, atol = tolerance
            np.testing.assert_allclose(got[name], w, rtol=rtol, atol=atol, err_msg=name)
