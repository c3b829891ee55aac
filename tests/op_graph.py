"""A graph of single op nodes to build and check one by one: the op-kernel tests of every
backend (test_cpu_ops.py, test_cuda_ops.py) build theirs with it."""
from __future__ import annotations

import numpy as np

from qcompiler.ir.core import Function, Module, constant_node
from qcompiler.ir.types import elem, tensor


class Graph:
    """Nodes to build, each with its own arguments, by test name."""

    def __init__(self):
        self.module = Module("ops")
        self.fn = self.module.add_function(Function("main"))
        self.nodes: dict = {}
        self.low: dict = {}  # arg -> (lo, hi) for integer inputs

    def arg(self, shape, dtype, low=None):
        v = self.fn.add_arg(self.fn.fresh_name("a"), tensor(shape, dtype))
        if low is not None:
            self.low[v.name] = low
        return v

    def const(self, values, dtype="i64"):
        return constant_node(self.fn, self.module, np.asarray(values, elem(dtype).np_dtype)).result

    def add(self, key, op, operands, result_types, attrs=None):
        node = self.fn.make_node(op, operands, [tensor(*t) for t in result_types], attrs)
        self.nodes.setdefault(key, []).append(node)
        return node
