"""ATen op handlers: elementwise arithmetic, comparisons and activations."""
from __future__ import annotations

from qcompiler.frontends.fx.registry import _aten
from qcompiler.frontends.fx.tensors import _Const
from qcompiler.ir import elem
from qcompiler.ir.core import Value


def _binary_handler(op: str, swap: bool = False):
    def handler(imp, a, b, alpha=1, **kw):
        dtype = imp.out_dtype()
        if kw.get("rounding_mode") is not None:
            raise imp.fail(f"rounding_mode={kw['rounding_mode']!r} is not supported")
        if op in ("greater", "greater_or_equal", "less", "less_or_equal", "equal", "and"):
            dtype = _common_dtype(imp, a, b)
        if alpha != 1:
            b = imp.emit("mul", [imp.value(b, dtype), imp.value(alpha, dtype)])
        x, y = imp.value(a, dtype), imp.value(b, dtype)
        return imp.emit(op, [y, x] if swap else [x, y])
    handler.keeps_quantization = False
    return handler


def _common_dtype(imp, a, b):
    """The operand type of a comparison: the tensor's (a python scalar follows it)."""
    for x in (a, b):
        if isinstance(x, (Value, _Const)):
            return imp.value(x).type.dtype
    return elem("f32")


for _names, _op, _swap in [
        (("add", "add_"), "add", False), (("sub", "sub_"), "sub", False),
        (("rsub",), "sub", True), (("mul", "mul_"), "mul", False),
        (("div", "div_", "true_divide"), "div", False),
        (("maximum",), "max", False), (("minimum",), "min", False),
        (("gt",), "greater", False), (("ge",), "greater_or_equal", False),
        (("lt",), "less", False), (("le",), "less_or_equal", False), (("eq",), "equal", False),
        (("__and__", "bitwise_and", "logical_and"), "and", False)]:
    _aten(*_names)(_binary_handler(_op, _swap))


def _unary_handler(op: str):
    def handler(imp, x, *a, **k):
        return imp.emit(op, [imp.value(x, imp.out_dtype())])
    handler.keeps_quantization = False
    return handler


for _name, _op in [("neg", "neg"), ("exp", "exp"), ("sqrt", "sqrt"), ("tanh", "tanh"),
                   ("sigmoid", "sigmoid"), ("relu", "relu"), ("erf", "erf"), ("abs", "abs"),
                   ("reciprocal", "reciprocal")]:
    _aten(_name)(_unary_handler(_op))


@_aten("rsqrt")
def _rsqrt(imp, x):
    return imp.emit("reciprocal", [imp.emit("sqrt", [x])])


@_aten("silu")
def _silu(imp, x):
    return imp.emit("mul", [x, imp.emit("sigmoid", [x])])


@_aten("gelu")
def _gelu(imp, x, approximate="none"):
    return imp.emit("gelu", [x], {"approximate": approximate} if approximate != "none" else {})


@_aten("pow")
def _pow(imp, x, exponent):
    dtype = imp.out_dtype()
    return imp.emit("pow", [imp.value(x, dtype), imp.value(exponent, dtype)])


@_aten("logical_not", "bitwise_not")
def _not(imp, x):
    v = imp.value(x)
    if v.type.dtype.name != "bool":
        raise imp.fail(f"{imp.node.target} on {v.type.dtype} (only bool) is not supported")
    return imp.emit("equal", [v, imp.value(False)])


@_aten("clamp", "clamp_min", "clamp_max")
def _clamp(imp, x, lo=None, hi=None):
    packet = str(imp.node.target)
    if "clamp_max" in packet:
        lo, hi = None, lo
    dtype = imp.out_dtype()
    y = imp.value(x, dtype)
    if lo is not None:
        y = imp.emit("max", [y, imp.value(lo, dtype)])
    if hi is not None:
        y = imp.emit("min", [y, imp.value(hi, dtype)])
    return y


@_aten("hardtanh")
def _hardtanh(imp, x, min_val=-1.0, max_val=1.0):
    dtype = imp.out_dtype()
    y = imp.emit("max", [imp.value(x, dtype), imp.value(float(min_val), dtype)])
    return imp.emit("min", [y, imp.value(float(max_val), dtype)])


@_aten("leaky_relu")
def _leaky_relu(imp, x, negative_slope=0.01):
    dtype = imp.out_dtype()
    v = imp.value(x, dtype)
    positive = imp.emit("greater", [v, imp.value(0.0, dtype)])
    return imp.emit("where", [positive, v, imp.emit("mul", [v, imp.value(negative_slope,
                                                                         dtype)])])


@_aten("where")
def _where(imp, cond, x, y):
    dtype = imp.out_dtype()
    return imp.emit("where", [imp.value(cond, elem("bool")), imp.value(x, dtype),
                              imp.value(y, dtype)])


@_aten("masked_fill")
def _masked_fill(imp, x, mask, value):
    dtype = imp.out_dtype()
    return imp.emit("where", [imp.value(mask, elem("bool")), imp.value(value, dtype),
                              imp.value(x, dtype)])
