"""The textual form of QIR (MLIR-like). ``parse(print(m))`` prints back identically.

    module @mlp {
      func @main(%x: tensor<[batch, 256], f32>) -> ("y": tensor<[batch, 64], f32>) {
        %w = constant {name = "fc1.weight"} : tensor<[256, 512], u4>
        %0 = dequantize(%w, %s, none) {out = f32, scheme = #quant<...>} : tensor<[256, 512], f32>
        return %5
      }
    }

Attributes are printed sorted by name; large constants by their side-table name only.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

from qcompiler.ir.core import Function, Module, Node
from qcompiler.ir.types import ElementType, Layout, QuantScheme

_BARE = re.compile(r"^[A-Za-z0-9_.]+$")


def value_ref(v) -> str:
    if v is None:
        return "none"
    return "%" + (v.name if _BARE.match(v.name) else json.dumps(v.name))


def format_float(x: float) -> str:
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    r = repr(x)
    return r if any(c in r for c in ".en") else r + ".0"


def format_attr(v, dtype=None) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return format_float(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (ElementType, QuantScheme, Layout)):
        return str(v)
    if isinstance(v, np.ndarray):
        return format_dense(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if isinstance(v, dict):
        # Decided parameters of a backend (tile shapes, fixed-point formats ...), sorted.
        return "{" + ", ".join(f"{k} = {format_attr(v[k])}" for k in sorted(v)) + "}"
    raise TypeError(f"cannot print attribute value {v!r}")


def format_dense(a: np.ndarray) -> str:
    flat = a.reshape(-1)
    if a.dtype == np.bool_:
        items = ["1" if x else "0" for x in flat]
    elif np.issubdtype(a.dtype, np.integer):
        items = [str(int(x)) for x in flat]
    else:
        items = [format_float(float(x)) for x in flat]
    return "dense<[" + ", ".join(items) + "]>"


def format_node(node: Node) -> str:
    lhs = ", ".join(value_ref(r) for r in node.results)
    args = ", ".join(value_ref(o) for o in node.operands)
    text = f"{lhs} = {node.op}({args})"
    if node.attrs:
        text += " {" + ", ".join(f"{k} = {format_attr(node.attrs[k])}"
                                 for k in sorted(node.attrs)) + "}"
    text += " : " + ", ".join(str(r.type) for r in node.results)
    return text


def format_function(fn: Function, indent: str = "  ") -> str:
    args = ", ".join(f"{value_ref(a)}: {a.type}" for a in fn.args)
    outs = ", ".join(f"{json.dumps(n)}: {v.type}" for n, v in zip(fn.output_names, fn.outputs))
    lines = [f"{indent}func @{fn.name}({args}) -> ({outs}) {{"]
    for node in fn.nodes:
        lines.append(f"{indent}  {format_node(node)}")
    lines.append(f"{indent}  return " + ", ".join(value_ref(v) for v in fn.outputs))
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    """The module as text, ending with a newline."""
    body = "\n".join(format_function(f) for f in module.functions)
    return f"module @{module.name} {{\n{body}\n}}\n"
