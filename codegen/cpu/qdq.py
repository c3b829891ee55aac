"""TensorIR of per-tensor ``quantize`` / ``dequantize`` kernels (issue #15: the Q/DQ pairs
that a QDQ CNN keeps between its fused qconvs, residual adds and pools).

Per-tensor i8/u8 codes, f32 values, operation for operation as ``runtime.numerics``:

- dequantize: ``(f32(x) - f32(zp)) * scale`` in f32;
- quantize: ``clamp(nearbyint(x / scale) + zp)`` in f32 (round half to even; NaN -> 0,
  +-inf saturate), then the code type.

Other schemes (per-channel, blocked, narrow floats, implied zero points) have no kernel here
(CPUBackendError: the node runs on the host).
"""
from __future__ import annotations

import hashlib
import re

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.ir.core import Node

CODE_TYPES = ("i8", "u8")


def _check(node: Node) -> None:
    scheme = node.attrs["scheme"]
    codes = scheme.dtype.name
    value = node.operands[0] if node.op == "quantize" else node.results[0]
    where = f"%{node.results[0].name} = {node.op}"
    if scheme.granularity != "tensor" or codes not in CODE_TYPES:
        raise CPUBackendError(f"{where}: only per-tensor i8/u8 schemes have a CPU kernel")
    if value.type.dtype.name != "f32" or node.arg("scale").type.dtype.name != "f32":
        raise CPUBackendError(f"{where}: only f32 values and scales have a CPU kernel")
    zp = node.arg("zero_point")
    g_idx = node.arg("g_idx") if node.op == "dequantize" else None
    if (zp is None and scheme.implied_zero_point is not None) or g_idx is not None:
        raise CPUBackendError(f"{where}: implied zero points and g_idx have no CPU kernel")
    if zp is not None and zp.type.dtype.name != codes:
        raise CPUBackendError(f"{where}: zero point {zp.type.dtype} is not {codes}")


def kernel_name(node: Node) -> str:
    text = repr((node.op, [None if v is None else (v.type.shape, str(v.type.dtype))
                           for v in node.operands], str(node.attrs["scheme"]),
                 node.attrs.get("saturate", 1)))
    return f"{node.op}_" + hashlib.sha256(text.encode()).hexdigest()[:16]


def primfunc_for_qdq(node: Node, params=None, module=None, known=()):
    """(kernel name, scheduled PrimFunc) of a per-tensor quantize / dequantize node."""
    _check(node)
    name = kernel_name(node)
    if name in known:
        return name, None
    return name, _build(node).with_attr("global_symbol", name)


def _scalar(t):
    return t(*([0] * len(t.shape)))


def _build(node: Node):
    import tvm
    from tvm import te, tirx

    dims: dict = {}

    def shape_of(v):
        out = []
        for d in v.type.shape:
            if isinstance(d, int):
                out.append(d)
            else:
                if d not in dims:
                    dims[d] = tirx.Var(re.sub(r"[^A-Za-z0-9_]", "_", d) or "dim", "int32")
                out.append(dims[d])
        return tuple(out)

    placeholders = [te.placeholder(shape_of(v), str(v.type.dtype.np_dtype), name=f"in{i}")
                    for i, v in enumerate(node.operands) if v is not None]
    x, scale = placeholders[0], placeholders[1]
    zp = placeholders[2] if len(placeholders) > 2 else None
    f32 = "float32"
    shape = shape_of(node.results[0])
    if node.op == "dequantize":
        def fn(*i):
            v = x(*i).astype(f32)
            if zp is not None:
                v = v - _scalar(zp).astype(f32)
            return v * _scalar(scale)
    else:
        lo, hi = node.attrs["scheme"].dtype.int_range()
        out_dtype = str(node.results[0].type.dtype.np_dtype)

        def fn(*i):
            r = tirx.nearbyint(x(*i) / _scalar(scale))
            r = tirx.Select(tirx.isnan(r), tirx.const(0.0, f32), r)
            if zp is not None:
                r = r + _scalar(zp).astype(f32)
            r = tirx.max(tirx.min(r, tirx.const(float(hi), f32)), tirx.const(float(lo), f32))
            return r.astype(out_dtype)
    out = te.compute(shape, fn, name="out")
    func = te.create_prim_func(placeholders + [out])
    sch = tvm.s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock("out"))
    if len(loops) > 1:
        sch.fuse(*loops)
    return sch.mod["main"]
