"""Local rewrites: small patterns, each rooted at one op, run by one driver to a fixed point.

    class FoldIdentity(RewritePattern):
        op = "identity"
        def rewrite(self, node, rw):
            rw.replace(node, [node.operands[0]])
            return True

    apply_patterns(module, [FoldIdentity()])

A pattern guards first and returns False early when it does not apply; when it applies it
edits the function through the ``Rewriter`` and returns True.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from qcompiler.ir.core import Function, Module, Node, Value, constant_node, constant_value
from qcompiler.ir.ops import infer_types
from qcompiler.ir.types import TensorType


class Rewriter:
    """Edits of one function during a rewrite, with the module for its constant table."""

    def __init__(self, module: Module, fn: Function):
        self.module = module
        self.fn = fn
        self.users = fn.users()

    def const(self, v: Optional[Value]) -> Optional[np.ndarray]:
        return constant_value(self.module, v)

    def single_use(self, v: Value) -> bool:
        return len(self.users.get(v, [])) == 1 and not self.fn.is_output(v)

    def create(self, op: str, operands: list, attrs: Optional[dict] = None, before: Node = None,
               hint="", result_types: Optional[list[TensorType]] = None) -> Node:
        """A new node before ``before``; result types are inferred unless given. ``hint``: the
        results' name hint, or one hint per result."""
        attrs = attrs or {}
        if result_types is None:
            result_types = infer_types(op, [v.type if v is not None else None for v in operands],
                                       attrs, [self.const(v) for v in operands])
        hints = hint if isinstance(hint, (list, tuple)) else [hint or op] * len(result_types)
        names: list[str] = []
        for h in hints:  # fresh_name does not reserve: keep a node's results apart
            name = self.fn.fresh_name(h)
            while name in names:
                name = self.fn.fresh_name(f"{h}_{len(names)}")
            names.append(name)
        return self.fn.make_node(op, operands, result_types, attrs, names=names, before=before)

    def constant(self, array: np.ndarray, type: Optional[TensorType], before: Node,
                 hint: str = "cst") -> Value:
        return constant_node(self.fn, self.module, array, type, name_hint=hint,
                             before=before).result

    def replace(self, node: Node, new_values: list[Value]) -> None:
        """Replace every use of ``node``'s results; the node dies (dead-code removal drops it)."""
        for old, new in zip(node.results, new_values):
            self.fn.replace_all_uses(old, new)
        self.users = self.fn.users()


def producer_of(v: Optional[Value], op: str) -> Optional[Node]:
    """The node that produced ``v`` when it is an ``op``, else None (also for v None)."""
    if v is None or v.producer is None or v.producer.op != op:
        return None
    return v.producer


class RewritePattern:
    """Match one op; rewrite and return True, or return False without changing anything."""

    op: str = ""

    def rewrite(self, node: Node, rw: Rewriter) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def apply_patterns(module: Module, patterns: list[RewritePattern], max_iterations: int = 20) -> int:
    """Apply patterns to every function until nothing changes. Returns the number of rewrites."""
    by_op: dict[str, list[RewritePattern]] = {}
    for p in patterns:
        by_op.setdefault(p.op, []).append(p)
    total = 0
    for fn in module.functions:
        for _ in range(max_iterations):
            rw = Rewriter(module, fn)
            changed = 0
            for node in list(fn.nodes):
                if node not in fn.nodes:
                    continue
                for p in by_op.get(node.op, []) + by_op.get("*", []):
                    if p.rewrite(node, rw):
                        changed += 1
                        break
            fn.remove_dead_nodes()
            total += changed
            if not changed:
                break
    return total
