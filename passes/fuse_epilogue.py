"""fuse-epilogue: what follows a qmatmul becomes its ``epilogue`` (or its bias).

Starting from each qmatmul, the single user of its result is absorbed while it is one of:

- ``add(y, b)`` with b a constant [N] and no bias or epilogue yet: b becomes the bias operand;
- an activation: ``gelu``, ``relu``, ``sigmoid``, and silu written ``mul(y, sigmoid(y))``;
- ``add``, ``sub`` or ``mul`` with another value that does not change the shape: a residual
  add, or SwiGLU's product ``mul(silu(gate), up)``; the other value is appended as an
  epilogue operand (after qmatmul's eight fixed operands); a one-element constant becomes a
  literal of the body instead.

A reshape of the product that keeps its last dim (``[M, N]`` viewed as ``[B, S, N]``) is
looked through: the reshape stays after the qmatmul, the absorbed op's other operand is
reshaped to the product's static shape.

The epilogue is a ``fused_elementwise`` body (``qcompiler.ir.elementwise_body``) whose ``x0``
is the product. Only values with no other use (and that are not outputs) are absorbed, so the
product is never needed outside. The qmatmul node keeps its name and moves down to the
absorbed node's place when an extra operand is defined after it (a topological sort).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Function, Node, Value, constant_node, constant_value, operand_index
from qcompiler.ir.elementwise_body import Body, Stmt, format_body, parse_body
from qcompiler.ir.ops import QMATMUL_FIXED_OPERANDS, qmatmul_epilogue_operands
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
        """The body name of an epilogue operand (added after the eight fixed ones and those
        the epilogue already reads; an ``x_norm``'s operands stay last)."""
        ops = self.node.operands
        if len(ops) < QMATMUL_FIXED_OPERANDS:
            ops.extend([None] * (QMATMUL_FIXED_OPERANDS - len(ops)))
        extras = qmatmul_epilogue_operands(self.node)
        for i, o in enumerate(extras):
            if o is v:
                return f"x{i + 1}"
        ops.insert(QMATMUL_FIXED_OPERANDS + len(extras), v)
        return f"x{len(extras) + 1}"

    def commit(self) -> None:
        self.node.attrs["epilogue"] = format_body(Body(tuple(self.stmts), self.result))


def _bias_fold(fn: Function, module: Module, node: Node, user: Node) -> bool:
    """add(y, b), b a constant [N]: into the empty bias operand (before any epilogue)."""
    if user.op != "add" or "epilogue" in node.attrs:
        return False
    if node.arg("bias") is not None:
        return False
    y = node.result
    a, b = user.operands
    other = b if a is y else a
    n = y.type.shape[-1]
    if other is y or constant_value(module, other) is None or other.type.shape != (n,) \
            or other.type.dtype != y.type.dtype or user.result.type != y.type:
        return False
    node.operands.extend([None] * (8 - len(node.operands)))
    node.operands[operand_index("qmatmul", "bias")] = other
    _absorb(fn, node, user)
    return True


def _absorb(fn: Function, node: Node, last: Node, also: tuple = ()) -> None:
    """The qmatmul's result replaces ``last``'s; ``last`` and ``also`` go away. (An extra
    operand defined after the qmatmul is ordered by the pass's final topological sort.)"""
    node.result.type = last.result.type
    fn.replace_all_uses(last.result, node.result)
    for dead in (last,) + also:
        fn.erase(dead)


def extend_once(fn: Function, module: Module, node: Node) -> Optional[str]:
    """Absorb the next user of ``node``'s result; returns what was absorbed, or None."""
    y = node.result
    users = _users(fn, y)
    if not users:
        return None
    if len(users) == 2 and {u.op for u in users} == {"sigmoid", "mul"}:
        sig = next(u for u in users if u.op == "sigmoid")
        mul = next(u for u in users if u.op == "mul")
        if set(map(id, mul.operands)) == {id(y), id(sig.result)} \
                and _users(fn, sig.result) == [mul] and mul.result.type == y.type:
            ep = _Epilogue(node)
            ep.add("silu", None, (ep.result,))
            ep.commit()
            _absorb(fn, node, mul, also=(sig,))
            return "silu"
        return None
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "reshape":
        return _through_reshape(fn, module, node, user)
    if user.op in _BINARY and user.operands[0] is not user.operands[1] \
            and _bias_fold(fn, module, node, user):
        return "bias"
    return _absorb_user(fn, module, node, y, user, None)


def _through_reshape(fn: Function, module: Module, node: Node, reshape: Node) -> Optional[str]:
    """y = qmatmul [M, N] viewed as r = reshape(y) [.., N] (same last dim) and r used once:
    the user of r joins the epilogue (its other operand reshaped to y's static shape)."""
    r = reshape.result
    users = _users(fn, r)
    y = node.result
    if not users or len(users) != 1 or r.type.shape[-1:] != y.type.shape[-1:] \
            or not y.type.is_static:
        return None
    return _absorb_user(fn, module, node, r, users[0], reshape)


def _absorb_user(fn: Function, module: Module, node: Node, v: Value, user: Node,
                 reshape: Optional[Node]) -> Optional[str]:
    """An activation or a binary op on v (the product, or its reshape) into the epilogue."""
    if len(user.results) != 1 or user.result.type != v.type:
        return None
    ep = _Epilogue(node)
    if user.op in _ACTIVATIONS:
        attr = (user.attrs.get("approximate") or "none") if user.op == "gelu" else None
        ep.add(user.op, attr, (ep.result,))
        what = user.op
    elif user.op in _BINARY and user.operands[0] is not user.operands[1]:
        other = user.operands[1] if user.operands[0] is v else user.operands[0]
        if other.type.dtype != v.type.dtype or other.type.shape != v.type.shape \
                and reshape is not None:
            return None
        const = constant_value(module, other)
        if const is not None and const.size == 1 and other.type.dtype.is_float:
            # A scalar of the product's type: a literal (the body gives literals that type).
            name = float(np.asarray(const).astype(np.float64).reshape(()))
        else:
            if reshape is not None:
                other = _reshaped(fn, module, other, node.result.type, before=user)
            name = ep.extra(other)
        ep.add(user.op, None, (ep.result, name) if user.operands[0] is v else (name, ep.result))
        what = "residual" if user.op == "add" else user.op
    else:
        return None
    ep.commit()
    if reshape is None:
        _absorb(fn, node, user)
    else:
        fn.replace_all_uses(user.result, reshape.result)
        fn.erase(user)
    return what


def _reshaped(fn: Function, module: Module, v: Value, like, before: Node) -> Value:
    """reshape(v) to the static shape of ``like`` (a view of the same elements)."""
    shape = constant_node(fn, module, np.array(like.shape, np.int64), name_hint="epilogue_shape",
                          before=before)
    return fn.make_node("reshape", [v, shape.result], [v.type.with_shape(like.shape)], {},
                        names=[fn.fresh_name(f"{v.name}_view")], before=before).result


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
            fn.topo_sort()  # a qmatmul now reads values defined after it (residual, SwiGLU)
        record_stat(module, self.name, qmatmul_epilogues=fused,
                    **{f"absorbed_{k}": v for k, v in sorted(counts.items())})
        return module
