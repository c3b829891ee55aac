"""The QIR verifier: SSA order, operand counts, attributes, types and shapes.

``verify(module)`` raises ``VerificationError`` naming the function, node and op on the first
problem. Declared result types must agree with what the op's type inference derives: same
rank and element type, and equal sizes wherever both sides know a size.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir.core import Function, Module, Node, constant_value
from qcompiler.ir.ops import OPS, TypeInferenceError
from qcompiler.ir.printer import format_node
from qcompiler.ir.types import ElementType, Layout, QuantScheme, TensorType

_ATTR_KINDS = {
    "int": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (float, int)),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v),
    "floats": lambda v: isinstance(v, (list, tuple)),
    "type": lambda v: isinstance(v, ElementType),
    "quant": lambda v: isinstance(v, QuantScheme),
    "layout": lambda v: isinstance(v, Layout),
    "tensor": lambda v: isinstance(v, np.ndarray),
    "dict": lambda v: isinstance(v, dict),
}


class VerificationError(InputError):
    """The IR breaks an invariant; the message names where."""


# The attribute any node may carry: the tensor-parallel rank it runs on (passes/shard.py).
# Nodes without it run on every rank.
PLACEMENT_ATTR = "rank"

def missing_operand(op: str, i: int) -> Optional[str]:
    """The formal name of operand ``i`` of ``op`` if that operand may not be none: required
    ones and the members of a variadic list (``xs*``) must be given; ``name?`` may be none."""
    formals = OPS[op].operands
    if not formals:
        return None
    formal = formals[min(i, len(formals) - 1)]
    if i >= len(formals) and not formal.endswith("*"):
        return None  # past the end: the operand count check reports it
    return None if formal.endswith("?") else formal


def _compatible(declared: TensorType, inferred: TensorType) -> bool:
    if declared.dtype != inferred.dtype or declared.rank != inferred.rank:
        return False
    for d, i in zip(declared.shape, inferred.shape):
        if isinstance(d, int) and isinstance(i, int) and d != i:
            return False
    return True


def verify_node(fn: Function, module: Module, node: Node) -> None:
    where = f"@{fn.name}: {format_node(node)[:200]}"
    opdef = OPS.get(node.op)
    if opdef is None:
        raise VerificationError(f"{where}: unknown op {node.op!r}")
    lo, hi = opdef.operand_range()
    if not lo <= len(node.operands) <= hi:
        raise VerificationError(
            f"{where}: {node.op} takes {lo}..{hi if hi < 1 << 30 else 'any'} operands, "
            f"got {len(node.operands)}")
    for i, v in enumerate(node.operands):
        formal = missing_operand(node.op, i) if v is None else None
        if formal is not None:
            raise VerificationError(f"{where}: required operand {formal} is none")
    for name, (kind, required) in opdef.attrs.items():
        if name not in node.attrs:
            if required:
                raise VerificationError(f"{where}: missing attribute {name!r}")
            continue
        if not _ATTR_KINDS[kind](node.attrs[name]):
            raise VerificationError(f"{where}: attribute {name!r} should be {kind}")
    for name in node.attrs:
        if name == PLACEMENT_ATTR:  # any op: the tensor-parallel rank it runs on (`shard`)
            if not (isinstance(node.attrs[name], int) and node.attrs[name] >= 0):
                raise VerificationError(f"{where}: attribute 'rank' should be an int >= 0")
            continue
        if name not in opdef.attrs:
            raise VerificationError(f"{where}: unknown attribute {name!r} of {node.op}")
    if opdef.results >= 0 and len(node.results) != opdef.results:
        raise VerificationError(f"{where}: {node.op} has {opdef.results} results")
    if node.op == "constant":
        _verify_constant(where, module, node)
        return
    types = [v.type if v is not None else None for v in node.operands]
    consts = [constant_value(module, v) for v in node.operands]
    try:
        inferred = opdef.infer(types, node.attrs, consts)
    except TypeInferenceError as e:
        raise VerificationError(f"{where}: {e}") from None
    if inferred is None:
        return
    if len(inferred) != len(node.results):
        raise VerificationError(f"{where}: expected {len(inferred)} results")
    for r, t in zip(node.results, inferred):
        if not _compatible(r.type, t):
            raise VerificationError(f"{where}: result %{r.name} is {r.type}, op gives {t}")


def _verify_constant(where: str, module: Module, node: Node) -> None:
    has_value, has_name = "value" in node.attrs, "name" in node.attrs
    if has_value == has_name:
        raise VerificationError(f"{where}: a constant has exactly one of value and name")
    t = node.result.type
    if has_value:
        arr = node.attrs["value"]
    else:
        arr = module.constants.get(node.attrs["name"])
        if arr is None:
            return  # declared only (parsed without weights)
    if tuple(arr.shape) != t.shape:
        raise VerificationError(f"{where}: data shape {arr.shape} != type shape {t.shape}")
    if arr.dtype != t.dtype.np_dtype:
        raise VerificationError(f"{where}: data dtype {arr.dtype} != storage of {t.dtype}")
    if t.dtype.is_integer and t.dtype.bits < 8 and arr.size:
        lo, hi = t.dtype.int_range()
        if arr.min() < lo or arr.max() > hi:
            raise VerificationError(f"{where}: codes outside the {t.dtype} range [{lo}, {hi}]")


def verify_function(fn: Function, module: Module) -> None:
    defined: set[int] = {id(a) for a in fn.args}
    names: set[str] = {a.name for a in fn.args}
    if len(names) != len(fn.args):
        raise VerificationError(f"@{fn.name}: duplicate argument names")
    for node in fn.nodes:
        for v in node.operands:
            if v is not None and id(v) not in defined:
                raise VerificationError(
                    f"@{fn.name}: {node.op} uses %{v.name} before its definition")
        verify_node(fn, module, node)
        for r in node.results:
            if r.name in names:
                raise VerificationError(f"@{fn.name}: value %{r.name} defined twice")
            names.add(r.name)
            defined.add(id(r))
    for v in fn.outputs:
        if id(v) not in defined:
            raise VerificationError(f"@{fn.name}: returns undefined %{v.name}")
    if len(fn.output_names) != len(fn.outputs) or len(set(fn.output_names)) != len(fn.outputs):
        raise VerificationError(f"@{fn.name}: output names {fn.output_names} are not unique")


def verify(module: Module) -> None:
    for fn in module.functions:
        verify_function(fn, module)
