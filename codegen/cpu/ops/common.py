"""What every op kernel shares: TVM element types, symbolic dims, broadcasting, kernel names.

A QIR dim becomes an int64 TIR expression: an int is a constant, a symbol (``batch``,
``Min_512__seq``) is one ``tirx.Var`` shared by name within a kernel (TVM checks at call time
that every buffer agrees on it), ``?`` is a fresh var of its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Optional

import numpy as np

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.ir.core import Node, Value
from qcompiler.ir.types import ElementType, TensorType

# QIR storage dtype -> TVM dtype of the kernel's buffers. float8 / float4 / nf4 codes have no
# kernel here. bool buffers are uint8 (0/1): this numpy's DLPack cannot export bool arrays, so
# the caller passes them as uint8 views (library.wrap), and TVM would refuse uint8 for bool.
_TVM_DTYPES = {
    "bool": "uint8", "int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16",
    "int32": "int32", "uint32": "uint32", "int64": "int64", "uint64": "uint64",
    "float16": "float16", "float32": "float32", "float64": "float64", "bfloat16": "bfloat16",
}


def node_label(node: Node) -> str:
    names = ", ".join(f"%{r.name}" for r in node.results)
    return f"{names} = {node.op}"


def unsupported(node: Node, why: str) -> CPUBackendError:
    return CPUBackendError(f"{node_label(node)}: no CPU op kernel ({why})")


# float8 / float4 codes: uint8 buffers of the codes, for cast only (its kernel encodes and
# decodes them, scalar.encode_narrow_float); every other op refuses them
_CODE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                "float4_e2m1fn")


def tvm_dtype(et: ElementType, node: Node) -> str:
    if et.storage in _CODE_DTYPES and node.op == "cast":
        return "uint8"
    if et.kind in ("nf4",) or et.storage not in _TVM_DTYPES:
        raise unsupported(node, f"element type {et.name}")
    return _TVM_DTYPES[et.storage]


def dtype_of(value) -> str:
    """The dtype of a TIR expression (``.ty`` in TVM 0.27) or of a te tensor."""
    from tvm import te

    if isinstance(value, te.Tensor):
        return str(value.dtype)
    if hasattr(value, "asobject"):  # a te TensorSlice (an element load)
        value = value.asobject()
    return str(value.ty)


def is_float_dtype(dtype) -> bool:
    dtype = str(dtype)
    return dtype.startswith("float") or dtype == "bfloat16"


def compute_dtype(dtype: str) -> str:
    """The type f16/bf16/f32 math is carried out in: float32 (float64 stays)."""
    return "float64" if dtype == "float64" else "float32"


class Dims:
    """The TIR expressions of one kernel's dims; symbols shared by name."""

    def __init__(self):
        self.vars: dict = {}
        self.unknown = 0

    def dim(self, d):
        from tvm import tirx

        if isinstance(d, int):
            return tirx.IntImm("int64", d)
        if d == "?":
            self.unknown += 1
            return tirx.Var(f"dim{self.unknown}", "int64")
        if d not in self.vars:
            self.vars[d] = tirx.Var(re.sub(r"[^A-Za-z0-9_]", "_", d), "int64")
        return self.vars[d]

    def shape(self, t: TensorType) -> list:
        return [self.dim(d) for d in t.shape]


def same_dim(a, b) -> bool:
    """Both the same constant or the same symbol (not ``?``)."""
    return a == b and a != "?"


def broadcast_index(in_type: TensorType, in_shape: list, out_type: TensorType,
                    out_index: list) -> list:
    """The index into an operand broadcast (numpy rules, right-aligned) to the result."""
    from tvm import tirx

    offset = len(out_index) - len(in_shape)
    index = []
    for i, (d, e) in enumerate(zip(in_type.shape, in_shape)):
        o = out_index[offset + i]
        if d == 1:
            index.append(tirx.IntImm("int64", 0))
        elif same_dim(d, out_type.shape[offset + i]) or isinstance(d, int):
            index.append(o)
        else:
            # a dim only known at run time may still be 1 there
            index.append(tirx.Select(e == 1, tirx.IntImm("int64", 0), o))
    return index


def constant_operand(node: Node, i: int, module=None) -> Optional[np.ndarray]:
    """The array of operand i when a ``constant`` node produces it (inline, or in ``module``)."""
    v: Optional[Value] = node.operand(i)
    if v is None or v.producer is None or v.producer.op != "constant":
        return None
    if "value" in v.producer.attrs:
        return np.asarray(v.producer.attrs["value"])
    if module is not None:
        return module.constants.get(v.producer.attrs["name"])
    return None


def _attr_text(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array({value.dtype},{value.shape},{value.tolist()})"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_attr_text(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_attr_text(v) for v in value) + "]"
    return repr(value) if not hasattr(value, "name") or isinstance(value, str) else str(value)


# Attributes passed to a kernel at each call, after its results, instead of being compiled
# into it, so that nodes differing only in them share one kernel (the layer index of a cache
# append: a 22-layer decoder built 22 copies of its qkv_heads kernel). CUDA does the same
# (codegen/cuda/ops/kernel.py).
LAUNCH_CONSTANTS = {"qkv_heads": ("layer",), "kv_concat": ("layer",)}


def launch_constants(node: Node) -> list:
    """The values of ``node``'s launch constants, in the kernel's parameter order."""
    return [int(node.attrs[a]) for a in LAUNCH_CONSTANTS.get(node.op, ())]


def kernel_key(node: Node, baked: dict) -> str:
    """Everything the kernel depends on: op, attributes, operand/result types and the
    operand values baked into the code (``baked``: slice bounds); not the launch constants,
    which each call passes.

    Symbolic dims are named by their first appearance (``$0``, ``$1`` ...): a symbol is one
    int64 var of the kernel, bound from the buffers' shapes at each call, so which symbol it
    is does not change the code. The layers of an exported decoder type the same dims with
    fresh symbols each (``unk__2`` in one layer's attention, ``unk__12`` in the next): they
    share one kernel instead of building one per layer."""
    names: dict = {}

    def dim_text(d):
        return d if isinstance(d, int) or d == "?" else names.setdefault(d, f"${len(names)}")

    def type_text(t) -> str:
        return str(dataclasses.replace(t, shape=tuple(dim_text(d) for d in t.shape)))

    constants = LAUNCH_CONSTANTS.get(node.op, ())
    parts = [node.op,
             ",".join(f"{k}={_attr_text(node.attrs[k])}" for k in sorted(node.attrs)
                      if k not in constants),
             ";".join("none" if v is None else type_text(v.type) for v in node.operands),
             ";".join(type_text(r.type) for r in node.results),
             _attr_text(baked)]
    return "|".join(parts)


def kernel_name(node: Node, baked: dict) -> str:
    """Stable and equal for equal (op, attrs, types, baked values): duplicates build once."""
    digest = hashlib.sha1(kernel_key(node, baked).encode()).hexdigest()[:12]
    return f"qc_{node.op}_{digest}"
