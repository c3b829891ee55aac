"""The body of a ``fused_elementwise`` op and of a ``qmatmul`` epilogue: parser, formatter, evaluator.

A body is a small straight-line program over the node's operands ``x0, x1, ...``::

    body := stmt (";" stmt)* ";" "return" tmp        (whitespace is ignored)
    stmt := tmp "=" op ["<" attr ">"] "(" arg ("," arg)* ")"
    tmp  := "t" INT        arg := "x" INT | "t" INT | FLOAT literal (0.5, -3.4e+38, inf)

e.g. ``t0 = add(x0, x1); t1 = gelu<none>(t0); return t1``. Each statement has the reference
semantics of the QIR op of that name (``qcompiler.runtime.reference``; ``evaluate`` calls those
very implementations), plus ``silu`` = mul(x, sigmoid(x)). ``gelu`` takes the attribute ``none``
or ``tanh``; ``cast`` takes an element type name (``f16``, ``bool``); no other op takes one.

Element types, statement by statement (what type inference and ``evaluate`` both follow):

- a float literal is a 0-d scalar of the statement's float type: the element type of the
  statement's first float operand (for ``where``: of its two branches), or f32 when it has
  none (a pass that wants another type passes the constant as an operand instead);
- equal, greater, greater_or_equal, less, less_or_equal, and, isnan give bool; cast gives its
  attribute's type; where gives its branches' type; every other op its first operand's type.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir.types import ElementType, TensorType, elem, elem_from_numpy

# Number of arguments of each op a body may use.
OP_ARITY: dict[str, int] = {
    "add": 2, "sub": 2, "mul": 2, "div": 2, "max": 2, "min": 2, "pow": 2,
    "equal": 2, "greater": 2, "greater_or_equal": 2, "less": 2, "less_or_equal": 2, "and": 2,
    "where": 3,
    "sqrt": 1, "erf": 1, "relu": 1, "sigmoid": 1, "tanh": 1, "exp": 1, "neg": 1, "abs": 1,
    "reciprocal": 1, "gelu": 1, "cast": 1, "isnan": 1, "silu": 1,
}
BOOL_RESULT_OPS = frozenset({"equal", "greater", "greater_or_equal", "less", "less_or_equal",
                             "and", "isnan"})
GELU_MODES = ("none", "tanh")

Arg = Union[str, float]


@dataclass(frozen=True)
class Stmt:
    """``dst = op<attr>(args)``; each arg is an operand ("x0"), a temporary ("t1") or a float."""
    dst: str
    op: str
    attr: Optional[str]
    args: tuple


@dataclass(frozen=True)
class Body:
    stmts: tuple
    result: str

    def operand_count(self) -> int:
        """1 + the highest operand index the body reads (0 when it reads none)."""
        used = [int(a[1:]) for s in self.stmts for a in s.args
                if isinstance(a, str) and a.startswith("x")]
        return max(used) + 1 if used else 0

    def ops(self) -> list[str]:
        return [s.op for s in self.stmts]


_STMT = re.compile(r"^(t\d+)=([a-z_]+)(?:<([A-Za-z0-9_]+)>)?\((.*)\)$")
_NAME = re.compile(r"^[xt]\d+$")
_RETURN = re.compile(r"^return(t\d+)$")


def _parse_arg(text: str, stmt: str) -> Arg:
    if _NAME.match(text):
        return text
    try:
        return float(text)
    except ValueError:
        raise InputError(f"elementwise body: bad argument {text!r} in {stmt!r}") from None


def parse_body(text: str) -> Body:
    """Parse and check a body (ops, arities, attributes, temporaries defined before use)."""
    if not isinstance(text, str):
        raise InputError(f"elementwise body must be a string, not {type(text).__name__}")
    return _parse_body(text)


@functools.lru_cache(maxsize=4096)
def _parse_body(text: str) -> Body:
    # Cached: the interpreter and type inference parse the same few bodies over and over.
    parts = [re.sub(r"\s+", "", p) for p in text.split(";")]
    if parts and parts[-1] == "":
        parts.pop()  # a trailing ";" after the return
    if len(parts) < 2:
        raise InputError(f"elementwise body {text!r} needs at least one statement and a return")
    ret = _RETURN.match(parts[-1])
    if ret is None:
        raise InputError(f"elementwise body {text!r} must end with 'return t<N>'")
    defined: set[str] = set()
    stmts = []
    for part in parts[:-1]:
        m = _STMT.match(part)
        if m is None:
            raise InputError(f"elementwise body: cannot parse statement {part!r}")
        dst, op, attr, arg_text = m.groups()
        if op not in OP_ARITY:
            raise InputError(f"elementwise body: unknown op {op!r} in {part!r}")
        args = tuple(_parse_arg(a, part) for a in arg_text.split(",")) if arg_text else ()
        if len(args) != OP_ARITY[op]:
            raise InputError(f"elementwise body: {op} takes {OP_ARITY[op]} arguments, "
                             f"got {len(args)} in {part!r}")
        _check_attr(op, attr, part)
        for a in args:
            if isinstance(a, str) and a.startswith("t") and a not in defined:
                raise InputError(f"elementwise body: {a} used before its definition in {part!r}")
        if dst in defined:
            raise InputError(f"elementwise body: {dst} defined twice ({part!r})")
        defined.add(dst)
        stmts.append(Stmt(dst, op, attr, args))
    if ret.group(1) not in defined:
        raise InputError(f"elementwise body: returns undefined {ret.group(1)}")
    return Body(tuple(stmts), ret.group(1))


def _check_attr(op: str, attr: Optional[str], stmt: str) -> None:
    if op == "gelu":
        if attr not in GELU_MODES:
            raise InputError(f"elementwise body: gelu needs <none> or <tanh> in {stmt!r}")
    elif op == "cast":
        try:
            elem(attr or "")
        except ValueError:
            raise InputError(f"elementwise body: cast needs an element type, "
                             f"not {attr!r}, in {stmt!r}") from None
    elif attr is not None:
        raise InputError(f"elementwise body: {op} takes no attribute in {stmt!r}")


def _format_arg(a: Arg) -> str:
    return a if isinstance(a, str) else repr(float(a))


def format_body(body: Body) -> str:
    """The canonical text: ``t0 = op<attr>(a, b); ...; return tN``."""
    lines = []
    for s in body.stmts:
        attr = f"<{s.attr}>" if s.attr is not None else ""
        lines.append(f"{s.dst} = {s.op}{attr}({', '.join(_format_arg(a) for a in s.args)})")
    return "; ".join(lines + [f"return {body.result}"])


# --------------------------------------------------------------------------------------------
# element types
# --------------------------------------------------------------------------------------------


def _is_float_dtype(dtype: np.dtype) -> bool:
    return not (np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def _literal_dtype(stmt: Stmt, arg_dtypes: list) -> np.dtype:
    """The float type of the statement's literals (module docstring)."""
    candidates = arg_dtypes[1:] if stmt.op == "where" else arg_dtypes
    for d in candidates:
        if d is not None and _is_float_dtype(d):
            return d
    return np.dtype(np.float32)


def _stmt_dtype(stmt: Stmt, arg_dtypes: list) -> np.dtype:
    if stmt.op in BOOL_RESULT_OPS:
        return np.dtype(np.bool_)
    if stmt.op == "cast":
        return elem(stmt.attr).np_dtype
    if stmt.op == "where":
        return arg_dtypes[1]
    return arg_dtypes[0]


def _arg_dtypes(stmt: Stmt, env_dtypes: dict) -> list:
    """Element dtypes of the statement's arguments, literals included."""
    known = [env_dtypes[a] if isinstance(a, str) else None for a in stmt.args]
    lit = _literal_dtype(stmt, known)
    return [d if d is not None else lit for d in known]


def _operand_env(body: Body, count: int, what: str) -> None:
    need = body.operand_count()
    if need > count:
        raise InputError(f"{what}: the body reads x{need - 1} but there are {count} operands")


def result_element_type(body: Body, operand_types: list[ElementType]) -> ElementType:
    """The element type the body computes from operands of ``operand_types``."""
    _operand_env(body, len(operand_types), "elementwise body")
    env = {f"x{i}": t.np_dtype for i, t in enumerate(operand_types)}
    for s in body.stmts:
        env[s.dst] = _stmt_dtype(s, _arg_dtypes(s, env))
    return elem_from_numpy(env[body.result])


# --------------------------------------------------------------------------------------------
# the numpy evaluator
# --------------------------------------------------------------------------------------------


class _StmtNode:
    """What a reference op implementation reads of its node: attrs, operand and result types."""

    __slots__ = ("op", "attrs", "operands", "results")

    def __init__(self, op: str, attrs: dict, operand_dtypes: list, result_dtype: np.dtype):
        from qcompiler.ir.core import Value

        self.op = op
        self.attrs = attrs
        self.operands = [Value("arg", TensorType((), elem_from_numpy(d))) for d in operand_dtypes]
        self.results = [Value("result", TensorType((), elem_from_numpy(result_dtype)))]


def _stmt_attrs(stmt: Stmt) -> dict:
    if stmt.op == "gelu":
        return {"approximate": stmt.attr}
    if stmt.op == "cast":
        return {"to": elem(stmt.attr)}
    return {}


def evaluate(body: Union[Body, str], operands: list, out_dtype) -> np.ndarray:
    """Run the body on numpy ``operands`` with the reference op implementations.

    The result is broadcast to the operands' common shape and has ``out_dtype``.
    """
    from qcompiler.runtime.reference import OP_IMPLS

    if isinstance(body, str):
        body = parse_body(body)
    out_dtype = np.dtype(out_dtype)
    arrays = [np.asarray(x) for x in operands]
    _operand_env(body, len(arrays), "fused_elementwise")
    env: dict = {f"x{i}": a for i, a in enumerate(arrays)}
    dtypes: dict = {k: a.dtype for k, a in env.items()}
    for s in body.stmts:
        arg_dtypes = _arg_dtypes(s, dtypes)
        args = [env[a] if isinstance(a, str) else np.asarray(a, dtype=d)
                for a, d in zip(s.args, arg_dtypes)]
        result_dtype = _stmt_dtype(s, arg_dtypes)
        if s.op == "silu":
            sig_node = _StmtNode("sigmoid", {}, arg_dtypes, result_dtype)
            sig = OP_IMPLS["sigmoid"](sig_node, args, None)[0]
            mul_node = _StmtNode("mul", {}, [result_dtype, result_dtype], result_dtype)
            y = OP_IMPLS["mul"](mul_node, [args[0], sig], None)[0]
        else:
            node = _StmtNode(s.op, _stmt_attrs(s), arg_dtypes, result_dtype)
            y = OP_IMPLS[s.op](node, args, None)[0]
        env[s.dst] = np.asarray(y)
        dtypes[s.dst] = env[s.dst].dtype
    y = env[body.result]
    shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else y.shape
    if y.shape != shape:
        y = np.broadcast_to(y, shape)
    return np.ascontiguousarray(y.astype(out_dtype, copy=False))
