"""TensorIR of the CPU ``pool`` kernel (2-D max / average pooling, issue #15).

The reference's semantics (``runtime.reference._pool``): max ignores padding (and ceil_mode's
overhang); average divides the in-bounds sum by the count of positions inside x, or, with
count_include_pad, inside x plus its explicit pads. Max pooling on integer codes is exact
(fuse-requant leaves a quantized graph's DequantizeLinear -> MaxPool -> QuantizeLinear to
the host when scales differ; ONNX models compute it in float here). ``lp`` pooling and the
indices output have no kernel (CPUBackendError: the node runs on the host).
"""
from __future__ import annotations

import hashlib
import re

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.ir.core import Node


def kernel_name(node: Node) -> str:
    text = repr((node.operands[0].type.shape, str(node.operands[0].type.dtype),
                 sorted((k, repr(v)) for k, v in node.attrs.items())))
    return "pool_" + hashlib.sha256(text.encode()).hexdigest()[:16]


def primfunc_for_pool(node: Node, params=None, module=None, known=()):
    """(kernel name, scheduled PrimFunc) of a 2-D max / average pool node."""
    a = node.attrs
    x = node.operands[0]
    where = f"%{node.results[0].name} = pool"
    if a["kind"] not in ("max", "average") or a.get("indices", 0):
        raise CPUBackendError(f"{where}: {a['kind']} pooling"
                              f"{' with indices' if a.get('indices', 0) else ''} has no CPU "
                              "kernel")
    if x.type.rank != 4 or not all(isinstance(d, int) for d in x.type.shape[1:]):
        raise CPUBackendError(f"{where}: the CPU kernel takes [N, C, H, W] with static C, H, W")
    if a["kind"] == "average" and x.type.dtype.name != "f32":
        raise CPUBackendError(f"{where}: average pooling of {x.type.dtype} has no CPU kernel")
    name = kernel_name(node)
    if name in known:
        return name, None
    return name, _build(node).with_attr("global_symbol", name)


def _build(node: Node):
    import tvm
    from tvm import te, tirx

    a = node.attrs
    x_type = node.operands[0].type
    n, c, h, w = x_type.shape
    if not isinstance(n, int):
        n = tirx.Var(re.sub(r"[^A-Za-z0-9_]", "_", n), "int32")
    oh, ow = node.results[0].type.shape[2:]
    kh, kw = a["kernel_shape"]
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    pt, pl, pb, pr = a["pads"]
    dtype = str(x_type.dtype.np_dtype)
    x = te.placeholder((n, c, h, w), dtype, name="in0")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def at(nn, cc, yy, xx):
        iy, ix = yy * sh + ry * dh - pt, xx * sw + rx * dw - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        return inside, x(nn, cc, tirx.max(tirx.min(iy, h - 1), 0),
                         tirx.max(tirx.min(ix, w - 1), 0))

    if a["kind"] == "max":
        def out_fn(nn, cc, yy, xx):
            inside, v = at(nn, cc, yy, xx)
            return te.max(tirx.if_then_else(inside, v, tvm.te.min_value(dtype)), axis=[ry, rx])
        out = te.compute((n, c, oh, ow), out_fn, name="out")
    else:
        def total_fn(nn, cc, yy, xx):
            inside, v = at(nn, cc, yy, xx)
            return te.sum(tirx.if_then_else(inside, v, tirx.const(0.0, dtype)), axis=[ry, rx])
        total = te.compute((n, c, oh, ow), total_fn, name="total")
        lo_y, hi_y, lo_x, hi_x = (-pt, h + pb, -pl, w + pr) if a["count_include_pad"] \
            else (0, h, 0, w)

        def count(yy, xx):  # positions of the window inside [lo, hi) per dim
            def along(o, s, d, k, pad, lo, hi):
                taps = [tirx.Select(tirx.all(o * s + t * d - pad >= lo,
                                             o * s + t * d - pad < hi), 1, 0) for t in range(k)]
                return sum(taps[1:], taps[0])
            return (along(yy, sh, dh, kh, pt, lo_y, hi_y)
                    * along(xx, sw, dw, kw, pl, lo_x, hi_x))
        out = te.compute((n, c, oh, ow), lambda nn, cc, yy, xx: total(nn, cc, yy, xx)
                         / count(yy, xx).astype(dtype), name="out")
    func = te.create_prim_func([x, out])
    sch = tvm.s_tir.Schedule(func)
    if a["kind"] == "average":
        block = sch.get_sblock("total")
        sch.compute_at(block, sch.get_loops(sch.get_sblock("out"))[-1])
    on, oc = sch.get_loops(sch.get_sblock("out"))[:2]
    sch.parallel(sch.fuse(on, oc))
    return sch.mod["main"]
