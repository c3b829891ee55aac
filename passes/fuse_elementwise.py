"""fuse-elementwise: maximal groups of elementwise ops become one ``fused_elementwise``.

A group grows backwards from its root (the op whose result leaves the group) through operands
produced by elementwise ops whose every use is inside the group, that are not outputs, and
whose result has the root's shape (so every member computes over the output's index space;
the group's external operands may broadcast). Such a group is convex: only the root's result
leaves it. Groups of one op stay as they are. Members are float or boolean valued (integer
index arithmetic is left alone).

One-element float constants become literals of the body when their type is the one the body
language gives literals in that statement (``qcompiler.ir.elementwise_body``); others are
operands. Plain code, not networkx: a group is found by a backwards walk over single-use
edges, which needs nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Function, Node, Value, constant_value
from qcompiler.ir.elementwise_body import Body, Stmt, format_body, parse_body
from qcompiler.ir.verifier import PLACEMENT_ATTR
from qcompiler.pipeline import Pass, record_stat, register_pass

ELEMENTWISE_OPS = frozenset({
    "add", "sub", "mul", "div", "max", "min", "pow", "sqrt", "erf", "relu", "sigmoid", "tanh",
    "exp", "neg", "abs", "reciprocal", "gelu", "cast", "where", "equal", "greater",
    "greater_or_equal", "less", "less_or_equal", "and", "isnan"})


def _fusible(node: Node) -> bool:
    if node.op not in ELEMENTWISE_OPS or len(node.results) != 1:
        return False
    if node.op == "cast" and node.attrs.get("saturate", 1) != 1:
        return False  # the body's cast saturates (the default)
    t = node.result.type
    return (t.dtype.is_float or t.dtype.name == "bool") and t.layout is None


def _stmt_attr(node: Node) -> Optional[str]:
    if node.op == "gelu":
        return node.attrs.get("approximate") or "none"
    if node.op == "cast":
        return str(node.attrs["to"])
    return None


def find_groups(fn: Function) -> list[list[Node]]:
    """Groups of two or more fusible nodes, each in program order (root last)."""
    users = fn.users()
    position = {n: i for i, n in enumerate(fn.nodes)}
    taken: set[Node] = set()
    groups = []
    for root in reversed(fn.nodes):
        if root in taken or not _fusible(root):
            continue
        shape = root.result.type.shape
        group = {root}
        grew = True
        while grew:
            grew = False
            for member in list(group):
                for v in member.operands:
                    p = v.producer if v is not None else None
                    if p is None or p in group or p in taken or not _fusible(p):
                        continue
                    if v.type.shape != shape or fn.is_output(v):
                        continue
                    if all(u in group for u in users.get(v, [])):
                        group.add(p)
                        grew = True
        if len(group) > 1:
            taken |= group
            groups.append(sorted(group, key=position.__getitem__))
    return groups


def _literal(module: Module, v: Value) -> Optional[float]:
    """The value of a one-element float constant, else None."""
    c = constant_value(module, v)
    if c is None or c.size != 1 or not v.type.dtype.is_float:
        return None
    return float(np.asarray(c).astype(np.float64).reshape(()))


def _literal_allowed(node: Node, i: int, module: Module) -> bool:
    """A literal in argument i gets the statement's float type: the first float operand that
    is not itself a literal (of the branches, for where), else f32. It must be v's own type."""
    v = node.operands[i]
    candidates = range(1, 3) if node.op == "where" else range(len(node.operands))
    for j in candidates:
        o = node.operands[j]
        if _literal(module, o) is None and o.type.dtype.is_float:
            return o.type.dtype == v.type.dtype
    return v.type.dtype.name == "f32"


def build_body(module: Module, group: list[Node]) -> tuple[Body, list[Value]]:
    """The body of a group and its external operands (x0, x1, ... in first-use order)."""
    tmp: dict[Value, str] = {}
    operands: list[Value] = []
    stmts = []
    for node in group:
        args = []
        for i, v in enumerate(node.operands):
            if v in tmp:
                args.append(tmp[v])
                continue
            lit = _literal(module, v)
            if lit is not None and _literal_allowed(node, i, module):
                args.append(lit)
                continue
            if v not in operands:
                operands.append(v)
            args.append(f"x{operands.index(v)}")
        dst = f"t{len(stmts)}"
        stmts.append(Stmt(dst, node.op, _stmt_attr(node), tuple(args)))
        tmp[node.result] = dst
    return Body(tuple(stmts), stmts[-1].dst), operands


@register_pass("fuse-elementwise")
@dataclass
class FuseElementwisePass(Pass):
    """Maximal single-output groups of elementwise ops → one fused_elementwise op."""

    def run(self, module: Module) -> Module:
        groups = ops = 0
        for fn in module.functions:
            for group in find_groups(fn):
                root = group[-1]
                body, operands = build_body(module, group)
                text = format_body(body)
                parse_body(text)  # the canonical text must read back (a bug here is ours)
                name, rtype = root.result.name, root.result.type
                attrs = {"body": text}
                # a group inside one tensor-parallel rank's block (passes/shard.py) stays there
                ranks = {n.attrs[PLACEMENT_ATTR] for n in group if PLACEMENT_ATTR in n.attrs}
                if len(ranks) == 1:
                    attrs[PLACEMENT_ATTR] = ranks.pop()
                fused = fn.make_node("fused_elementwise", operands, [rtype], attrs,
                                     names=[fn.fresh_name(f"{name}_fused")], before=root)
                fn.replace_all_uses(root.result, fused.result)
                for member in group:
                    fn.erase(member)
                groups += 1
                ops += len(group)
        record_stat(module, self.name, groups=groups, fused_ops=ops)
        return module
