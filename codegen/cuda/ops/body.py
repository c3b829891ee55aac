"""An elementwise body (``qcompiler.ir.elementwise_body``) as a CUDA device function.

Every temporary is held in its statement's element type (f16/bf16 ones rounded once per
statement, as ``elementwise_body.evaluate`` does) and each op computes in f32 (f64 where an
f64 takes part), with the reference's numerics: NaN-propagating max/min, the stable sigmoid,
erf and gelu in double, integer division toward zero with x / 0 = 0, saturating float ->
integer casts with NaN -> 0, integer -> integer casts that wrap.
"""
from __future__ import annotations

import re

import numpy as np

from qcompiler.codegen.cuda.ops.common import (C_TYPES, FLOAT_TYPES, HALF_TYPES, c_type,
                                               compute_type, convert, literal, unsupported)
from qcompiler.ir.elementwise_body import (BOOL_RESULT_OPS, Body, Stmt, _arg_dtypes,
                                           _stmt_dtype)
from qcompiler.ir.types import elem, elem_from_numpy

_UNARY_FLOAT = {"sqrt": "sqrt{f}({a})", "exp": "exp{f}({a})", "tanh": "tanh{f}({a})",
                "abs": "fabs{f}({a})"}
_COMPARE = {"equal": "==", "greater": ">", "greater_or_equal": ">=", "less": "<",
            "less_or_equal": "<="}
_BITWISE = {"bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^", "bitwise_not": "~"}
# Logical, bitwise and prelu as whole ops (not body statements), elementwise with broadcasting.
LOGIC_OPS = ("or", "xor", "not") + tuple(_BITWISE) + ("prelu",)
# Float math as whole ops (not body statements): the reference computes each in float32 and
# rounds once (f64 stays f64). Transcendentals go through double here, so that their error
# is the rounding to float32 (CUDA's float versions are up to 2-4 ulps off).
_MATH_DOUBLE = {"log": "log", "sin": "sin", "cos": "cos", "tan": "tan", "asin": "asin",
                "acos": "acos", "atan": "atan", "sinh": "sinh", "cosh": "cosh",
                "asinh": "asinh", "acosh": "acosh", "atanh": "atanh"}
# x is the operand in the compute type c; {p_name} the node's float attributes as c literals
# (rounded to c first, as the reference's float32 parameters); the reference's operation order.
_ACTIVATIONS = {
    "floor": "floor{f}(x)", "ceil": "ceil{f}(x)", "round": "rint{f}(x)",
    "sign": "(x != x ? x : (c)((x > (c)0) - (x < (c)0)))",
    "softsign": "(x / ((c)1 + fabs{f}(x)))",
    "softplus": "(qc_ops::np_max<c>(x, (c)0) + log1p{f}(exp{f}(-fabs{f}(x))))",
    "mish": "(x * tanh{f}(qc_ops::np_max<c>(x, (c)0) + log1p{f}(exp{f}(-fabs{f}(x)))))",
    "hard_swish": "(x * qc_ops::np_min<c>(qc_ops::np_max<c>(x / (c)6 + (c)0.5, (c)0), (c)1))",
    "leaky_relu": "(x >= (c)0 ? x : {alpha} * x)",
    "elu": "(x > (c)0 ? x : {alpha} * (exp{f}(x) - (c)1))",
    "selu": "(x > (c)0 ? {gamma} * x : {gamma} * {alpha} * (exp{f}(x) - (c)1))",
    "celu": "(qc_ops::np_max<c>((c)0, x) + qc_ops::np_min<c>((c)0, {alpha} * "
            "(exp{f}(x / {alpha}) - (c)1)))",
    "hard_sigmoid": "qc_ops::np_min<c>(qc_ops::np_max<c>({alpha} * x + {beta}, (c)0), (c)1)",
    "thresholded_relu": "(x > {alpha} ? x : (c)0)",
}
FLOAT_MATH_OPS = tuple(_MATH_DOUBLE) + tuple(_ACTIVATIONS)


def _float_math(op: str, x: str, ct: str, out: str, node) -> str:
    """A float math op (``FLOAT_MATH_OPS``) on ``x`` (already in ``ct``, float or double)."""
    if op in _MATH_DOUBLE:
        v = f"{_MATH_DOUBLE[op]}((double)({x}))"
        return convert(v if ct == "double" else f"(float){v}", ct, out)
    params = {k: f"(({ct}){literal(float(np.asarray(v, np.float64 if ct == 'double' else np.float32)), ct)})"
              for k, v in node.attrs.items() if isinstance(v, float)}
    try:
        expr = _ACTIVATIONS[op].format(f="f" if ct == "float" else "", **params)
    except KeyError as e:
        raise unsupported(node, f"{op} without its attribute {e.args[0]}") from None
    expr = re.sub(r"\bx\b", f"({x})", expr).replace("(c)", f"({ct})").replace("<c>", f"<{ct}>")
    return convert(f"(({ct}){expr})", ct, out)


def _op_expr(stmt: Stmt, args: list, arg_types: list, out: str, node) -> str:
    """The C expression of one statement, already in the result C type ``out``."""
    op = stmt.op
    if op == "identity":
        return convert(args[0], arg_types[0], out)
    if op == "cast":
        return _cast_expr(args[0], arg_types[0], stmt.attr, out, node)
    if op in _COMPARE:
        ct = arg_types[0] if arg_types[0] == arg_types[1] else "double"
        ct = "float" if ct in HALF_TYPES else ct
        a, b = (convert(x, t, ct) for x, t in zip(args, arg_types))
        return f"(({a}) {_COMPARE[op]} ({b}))"
    if op in ("and", "or", "xor"):
        a, b = (convert(x, t, "bool") for x, t in zip(args, arg_types))
        return f"({a} {dict(zip(('and', 'or', 'xor'), ('&&', '||', '!=')))[op]} {b})"
    if op == "not":
        return f"(!{convert(args[0], arg_types[0], 'bool')})"
    if op in _BITWISE:  # integers (bool as 0/1), in the result type: wraps as numpy's
        xs_ = [convert(x, t, out) for x, t in zip(args, arg_types)]
        if op == "bitwise_not":
            return f"(({out})~{xs_[0]})"
        return f"(({out})({xs_[0]} {_BITWISE[op]} {xs_[1]}))"
    if op == "isnan":
        if arg_types[0] not in FLOAT_TYPES:
            return "false"
        a = convert(args[0], arg_types[0], "double" if arg_types[0] == "double" else "float")
        return f"(({a}) != ({a}))"
    if op == "where":
        c = convert(args[0], arg_types[0], "bool")
        return f"({c} ? {convert(args[1], arg_types[1], out)} : " \
               f"{convert(args[2], arg_types[2], out)})"
    if op in ("erf", "gelu"):
        v = convert(args[0], arg_types[0], "double")
        if op == "erf":  # the reference rounds erf(f64) to f32, then to the result type
            return convert(f"(float)erf({v})", "float", out)
        if stmt.attr == "tanh":
            g = f"qc_ops::gelu_tanh({v})"
        else:
            g = f"qc_ops::gelu_erf({v})"
        return convert(g, "double", out)
    ct = compute_type(arg_types)
    xs = [convert(x, t, ct) for x, t in zip(args, arg_types)]
    f = "f" if ct == "float" else ""
    is_float = ct in ("float", "double")
    if op == "silu":  # x * sigmoid(x), the sigmoid rounded to the result type first
        sig = convert(convert(f"qc_ops::np_sigmoid({xs[0]})", ct, out), out, ct)
        return convert(f"(({xs[0]}) * {sig})", ct, out)
    binary = {"add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})",
              "max": "qc_ops::np_max<{c}>({a}, {b})", "min": "qc_ops::np_min<{c}>({a}, {b})"}
    if op in binary:
        return convert(binary[op].format(a=xs[0], b=xs[1], c=ct), ct, out)
    if op == "div":
        e = f"({xs[0]} / {xs[1]})" if is_float else f"qc_ops::int_div<{ct}>({xs[0]}, {xs[1]})"
        return convert(e, ct, out)
    if op == "pow":
        if is_float:
            return convert(f"pow{f}({xs[0]}, {xs[1]})", ct, out)
        return convert(f"pow((double)({xs[0]}), (double)({xs[1]}))", "double", out)
    if op == "relu":
        return convert(f"qc_ops::np_max<{ct}>({xs[0]}, ({ct})0)", ct, out)
    if op == "prelu":  # x < 0 ? x * slope : x
        return convert(f"({xs[0]} < ({ct})0 ? {xs[0]} * {xs[1]} : {xs[0]})", ct, out)
    if op == "neg":
        return convert(f"(({ct})0 - {xs[0]})", ct, out)
    if op == "reciprocal":
        return convert(f"(({ct})1 / {xs[0]})", ct, out)
    if op == "sigmoid":
        return convert(f"qc_ops::np_sigmoid({xs[0]})", ct, out)
    if op in FLOAT_MATH_OPS:
        if not is_float:
            raise unsupported(node, f"{op} of an integer type")
        return _float_math(op, xs[0], ct, out, node)
    if op in _UNARY_FLOAT:
        if not is_float:
            if op == "abs":
                return convert(f"({xs[0]} < 0 ? -{xs[0]} : {xs[0]})", ct, out)
            raise unsupported(node, f"{op} of an integer type")
        return convert(_UNARY_FLOAT[op].format(f=f, a=xs[0]), ct, out)
    raise unsupported(node, f"elementwise op {op}")


def _cast_expr(expr: str, src: str, to: str, out: str, node) -> str:
    dst = elem(to)
    if dst.is_low_bit and dst.kind != "bool":
        raise unsupported(node, f"cast to {dst.name}")
    if dst.kind == "bool":
        return convert(expr, src, "bool")
    if dst.kind in ("int", "uint") and src in FLOAT_TYPES:
        lo, hi = dst.int_range()
        v = convert(expr, src, "double")
        return f"qc_ops::float_to_int<{out}>({v}, {float(lo)!r}, {float(hi)!r})"
    return convert(expr, src, out)


def device_function(name: str, body: Body, operand_types: list, out_ctype: str, node) -> str:
    """``__device__ OUT name(const A0 x0, ...)``: the body on one element of each operand.

    ``operand_types``: the QIR element types of x0, x1, ...; ``out_ctype``: the node's result
    C type (the body's value is converted to it at the end).
    """
    dtypes = {f"x{i}": t.np_dtype for i, t in enumerate(operand_types)}
    ctypes_ = {k: c_type(elem_from_numpy(d) if d != np.bool_ else elem("bool"), node)
               for k, d in dtypes.items()}
    for i, t in enumerate(operand_types):
        ctypes_[f"x{i}"] = c_type(t, node)
    lines = []
    for s in body.stmts:
        arg_dtypes = _arg_dtypes(s, dtypes)
        result = np.dtype(_stmt_dtype(s, arg_dtypes)) if s.op != "identity" else arg_dtypes[0]
        res_c = C_TYPES[_storage(result)]
        args, types = [], []
        for a, d in zip(s.args, arg_dtypes):
            if isinstance(a, str):
                args.append(a)
                types.append(ctypes_[a])
            else:  # a literal of the statement's float type, exact in f32 (or f64)
                c = C_TYPES[_storage(d)]
                lit_c = "double" if c == "double" else "float"
                with np.errstate(over="ignore"):  # -3.4e38 in f16 is -inf, as numpy has it
                    args.append(literal(float(np.asarray(a, dtype=d)), lit_c))
                types.append(lit_c)
        lines.append(f"  const {res_c} {s.dst} = {_op_expr(s, args, types, res_c, node)};")
        dtypes[s.dst] = result
        ctypes_[s.dst] = res_c
    ret = convert(body.result, ctypes_[body.result], out_ctype)
    params = ", ".join(f"const {ctypes_[f'x{i}']} x{i}" for i in range(len(operand_types)))
    return (f"__device__ __forceinline__ {out_ctype} {name}({params}) {{\n"
            + "\n".join(lines) + f"\n  return {ret};\n}}\n")


def _storage(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if dtype.name == "bfloat16":
        return "bfloat16"
    return dtype.name


BOOL_OPS = BOOL_RESULT_OPS
