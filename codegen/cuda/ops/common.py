"""What every CUDA op kernel shares: C element types, the scalar code of elementwise bodies,
errors, and the ABI every generated kernel has.

The ABI (one per kernel symbol ``qc_cu_<op>_<hash>``, all ``extern "C"``)::

    int     SYM(void* const* ptrs, const int64_t* shapes, void* workspace, cudaStream_t s);
    int64_t SYM_workspace_bytes(const int64_t* shapes);

``ptrs``: device pointers of the node's operands that are not ``none`` (in order), then of its
results (destination-passing: the caller owns every buffer). ``shapes``: the run-time dims of
those buffers, concatenated in the same order (the ranks are baked into the kernel), so a
symbolic dim is just an int64 here. The return value is a cudaError_t (0: launched).
``workspace``: ``SYM_workspace_bytes`` of scratch, zeroed by the caller when it is allocated;
a kernel that keeps counters there (the grouped-query decode attention) leaves them at zero.
``ptrs`` has one more slot after the results: null, or for the ops of ``PAD_AWARE_OPS`` the
device address of an int64, the padding rows of a KV cache laid out for a capacity (a decode
graph shared by every cache length up to it, ``codegen/cuda/plan.py``): their shapes then give
the capacity, and the kernel reads only the rows before the padding.
"""
from __future__ import annotations

import math

from qcompiler.errors import QCompilerError
from qcompiler.ir.core import Node
from qcompiler.ir.types import ElementType

# The ops whose kernels read a cache's padding word after their operands (see the ABI above):
# qkv_heads (its past copy and where the new rows go) and decode attention (its keys).
PAD_AWARE_OPS = frozenset({"qkv_heads", "attention"})

# QIR storage dtype -> the C type of one element in device memory.
C_TYPES = {
    "bool": "bool", "int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t",
    "uint16": "uint16_t", "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t",
    "uint64": "uint64_t", "float16": "__half", "bfloat16": "__nv_bfloat16",
    "float32": "float", "float64": "double",
}
C_SIZES = {"bool": 1, "int8_t": 1, "uint8_t": 1, "int16_t": 2, "uint16_t": 2, "int32_t": 4,
           "uint32_t": 4, "int64_t": 8, "uint64_t": 8, "__half": 2, "__nv_bfloat16": 2,
           "float": 4, "double": 8}
HALF_TYPES = ("__half", "__nv_bfloat16")
FLOAT_TYPES = ("__half", "__nv_bfloat16", "float", "double")


class CudaOpsError(QCompilerError, ValueError):
    """A node the CUDA op library has no kernel for (the caller runs it elsewhere)."""


def node_label(node: Node) -> str:
    return f"{', '.join('%' + r.name for r in node.results)} = {node.op}"


def unsupported(node: Node, why: str) -> CudaOpsError:
    return CudaOpsError(f"{node_label(node)}: no CUDA op kernel ({why})")


def c_type(et: ElementType, node: Node) -> str:
    """The C type of ``et``; sub-byte codes, float8/float4 and nf4 have no op kernel."""
    if (et.is_low_bit and et.kind != "bool") or et.storage not in C_TYPES:
        raise unsupported(node, f"element type {et.name}")
    return C_TYPES[et.storage]


def compute_type(ctypes_: list) -> str:
    """The C type an op computes in: f32 for f16/bf16/f32, double when an f64 (or a float
    mixed with an integer, as numpy promotes) takes part, else a 64-bit integer."""
    floats = [t for t in ctypes_ if t in FLOAT_TYPES]
    if floats:
        if "double" in floats or len(floats) != len(ctypes_):
            return "double"
        return "float"
    return "uint64_t" if "uint64_t" in ctypes_ else "int64_t"


def convert(expr: str, src: str, dst: str) -> str:
    """C code converting ``expr`` of C type ``src`` to ``dst`` (one rounding; ints wrap)."""
    if src == dst:
        return expr
    if dst == "bool":
        return f"(qc_ops::to_f({expr}) != 0)" if src in HALF_TYPES else f"(({expr}) != 0)"
    if src in HALF_TYPES:
        f = f"qc_ops::to_f({expr})"
        return f if dst == "float" else convert(f, "float", dst)
    if dst in HALF_TYPES:
        if src == "double":
            return f"{'__double2half' if dst == '__half' else '__double2bfloat16'}({expr})"
        return f"qc_ops::from_f<{dst}>((float)({expr}))"
    return f"(({dst})({expr}))"


def literal(value: float, ctype: str) -> str:
    """A float literal in compute type ``ctype`` (float or double)."""
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INFINITY" if value > 0 else "-INFINITY"
    text = repr(float(value))
    return text if ctype == "double" else f"{text}f"
