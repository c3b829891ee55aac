"""fuse-epilogue: what follows a qmatmul becomes its ``epilogue`` (or its bias).

Starting from each qmatmul, the single user of its result is absorbed while it is one of:

- ``add(y, b)`` with b a constant [N] and no bias or epilogue yet: b becomes the bias operand;
- an activation: ``gelu``, ``relu``, ``sigmoid``, and silu written ``mul(y, sigmoid(y))``;
- ``add``, ``sub`` or ``mul`` with another value that does not change the shape: a residual
  add, or SwiGLU's product ``mul(silu(gate), up)``; the other value is appended as an
  epilogue operand (after qmatmul's eight fixed operands); a one-element constant becomes a
  literal of the body instead.

The epilogue is a ``fused_elementwise`` body (``qcompiler.ir.elementwise_body``) whose ``x0``
is the product. Only values with no other use (and that are not outputs) are absorbed, so the
product is never needed outside. The qmatmul node keeps its name and moves down to the
absorbed node's place when an extra operand is defined after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Function, Node, Value, constant_value
from qcompiler.ir.elementwise_body import Body, Stmt, format_body, parse_body
from qcompiler.pipeline import Pass, record_stat, register_pass

_ACTIVATIONS = ("gelu", "relu", "sigmoid")
_BINARY = ("add", "sub", "mul")


def _users(fn: Function, v: Value) -> Optional[list[Node]]:
    """The nodes using v, or None when v is also an output."""
    if fn.is_output(v):
        return None
    return [n for n in fn.nodes if any(o is v for o in n.operands)]


class _Epilogue:
    """The body being built for one qmatmul: statements and the temporary holding the result."""

    def __init__(self, node: Node):
        self.node = node
        text = node.attrs.get("epilogue")
        body = parse_body(text) if text else None
        self.stmts = list(body.stmts) if body else []
        self.result = body.result if body else "x0"

    def add(self, op: str, attr: Optional[str], args: tuple) -> None:
        dst = f"t{len(self.stmts)}"
        self.stmts.append(Stmt(dst, op, attr, args))
        self.result = dst

    def extra(self, v: Value) -> str:
        """The body name of an epilogue operand (appended after the eight fixed ones)."""
        ops = self.node.operands
        if len(ops) < 8:
            ops.extend([None] * (8 - len(ops)))
        for i, o in enumerate(ops[8:]):
            if o is v:
                return f"x{i + 1}"
        ops.append(v)
        return f"x{len(ops) - 8}"

    def commit(self) -> None:
        self.node.attrs["epilogue"] = format_body(Body(tuple(self.stmts), self.result))


def _bias_fold(fn: Function, module: Module, node: Node, user: Node) -> bool:
    """add(y, b), b a constant [N]: into the empty bias operand (before any epilogue)."""
    if user.op != "add" or "epilogue" in node.attrs:
        return False
    if len(node.operands) > 7 and node.operands[7] is not None:
        return False
    y = node.result
    other = user.operands[1] if user.operands[0] is y else user.operands[0]
    n = y.type.shape[-1]
    if other is y or constant_value(module, other) is None or other.type.shape != (n,) \
            or other.type.dtype != y.type.dtype or user.result.type != y.type:
        return False
    node.operands.extend([None] * (8 - len(node.operands)))
    node.operands[7] = other
    _absorb(fn, node, user, before=None)
    return True


def _absorb(fn: Function, node: Node, last: Node, before: Optional[Node],
            also: tuple = ()) -> None:
    """The qmatmul's result replaces ``last``'s; ``last`` and ``also`` go away."""
    if before is not None:  # an extra operand is defined after the qmatmul: move it down
        fn.nodes.remove(node)
        fn.nodes.insert(fn.nodes.index(before), node)
    node.result.type = last.result.type
    fn.replace_all_uses(last.result, node.result)
    for dead in (last,) + also:
        fn.erase(dead)


def _defined_after(fn: Function, v: Value, node: Node) -> bool:
    if v.producer is None:
        return False
    return fn.nodes.index(v.producer) > fn.nodes.index(node)


def extend_once(fn: Function, module: Module, node: Node) -> Optional[str]:
    """Absorb the next user of ``node``'s result; returns what was absorbed, or None."""
    y = node.result
    users = _users(fn, y)
    if not users:
        return None
    if len(users) == 2 and {u.op for u in users} == {"sigmoid", "mul"}:
        sig = next(u for u in users if u.op == "sigmoid")
        mul = next(u for u in users if u.op == "mul")
        if set(map(id, mul.operands)) == {id(y), id(sig.result)} and _users(fn, sig.result) == [mul] \
                and mul.result.type == y.type:
            ep = _Epilogue(node)
            ep.add("silu", None, (ep.result,))
            ep.commit()
            _absorb(fn, node, mul, before=None, also=(sig,))
            return "silu"
        return None
    if len(users) != 1:
        return None
    user = users[0]
    if user.op in _ACTIVATIONS and user.result.type == y.type:
        ep = _Epilogue(node)
        attr = None
        if user.op == "gelu":
            attr = user.attrs.get("approximate") or "none"
        ep.add(user.op, attr, (ep.result,))
        ep.commit()
        _absorb(fn, node, user, before=None)
        return user.op
    if user.op not in _BINARY or user.operands[0] is user.operands[1]:
        return None
    if _bias_fold(fn, module, node, user):
        return "bias"
    if user.result.type.shape != y.type.shape or user.result.type.dtype != y.type.dtype:
        return None
    other = user.operands[1] if user.operands[0] is y else user.operands[0]
    if other.type.dtype != y.type.dtype:
        return None
    ep = _Epilogue(node)
    const = constant_value(module, other)
    if const is not None and const.size == 1 and other.type.dtype.is_float:
        # A scalar of the product's type: a literal (the body gives literals that type).
        name = float(np.asarray(const).astype(np.float64).reshape(()))
    else:
        name = ep.extra(other)
    args = (ep.result, name) if user.operands[0] is y else (name, ep.result)
    ep.add(user.op, None, args)
    ep.commit()
    _absorb(fn, node, user, before=user if _defined_after(fn, other, node) else None)
    return "residual" if user.op == "add" else user.op


@register_pass("fuse-epilogue")
@dataclass
class FuseEpiloguePass(Pass):
    """Bias add, activation, residual add and SwiGLU product after a qmatmul → its epilogue."""

    def run(self, module: Module) -> Module:
        counts: dict[str, int] = {}
        fused = 0
        for fn in module.functions:
            for node in [n for n in fn.nodes if n.op == "qmatmul"]:
                absorbed = 0
                while (what := extend_once(fn, module, node)) is not None:
                    counts[what] = counts.get(what, 0) + 1
                    absorbed += what != "bias"
                fused += absorbed > 0
        record_stat(module, self.name, qmatmul_epilogues=fused,
                    **{f"absorbed_{k}": v for k, v in sorted(counts.items())})
        return module
