"""static-qmatmul-as-qconv: a statically quantized classifier qmatmul runs as a 1 x 1 qconv.

A ``qmatmul`` with statically quantized activations (``act=static``: the classifier of a
quantize_static CNN, QDQ or QOperator), which the CPU qmatmul kernels do not take
(cpu-schedule would leave it to the numpy reference, whose int32 matmul has no BLAS: 2.7 ms
for ResNet-18's 512 x 1000, 10 ms for MobileNetV2's 1280 x 1000), becomes the same sum as a
1 x 1 ``qconv``: ``reshape(x, [0, K, 1, 1])``, ``qconv(out=float)`` with the weights
transposed to [N, K, 1, 1] (cpu-conv-layout then packs them like any other conv's),
``reshape(.., [0, N])``, and the float bias and the node's epilogue as one
``fused_elementwise``. Exact: both are the i32 sum ``(x - xzp)(w - wzp[n])`` times
``f32(x_scale * w_scale[n])`` in f32, plus the bias and the epilogue in f32
(``runtime.reference._qmatmul``). Only x86 CPU targets (the conv kernels' home) and CUDA
targets (whose qmatmul kernels take float activations only; the int8 conv kernels take
this one); elsewhere the module is returned unchanged. 8-bit integer codes, per-tensor or
per-column scales, no g_idx. Runs before ``cpu-conv-layout`` / ``cuda-conv-layout``.

Option: ``target`` (a cpu or cuda target; default ``cpu``, the host).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import constant_node, constant_value
from qcompiler.ir.ops import qmatmul_epilogue_operands
from qcompiler.ir.types import TensorType, elem
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass


@register_pass("static-qmatmul-as-qconv")
@dataclass
class StaticQmatmulAsQConvPass(Pass):
    """act=static qmatmul → reshape, 1x1 qconv(out=float), reshape (x86 CPU, CUDA)."""

    target: str = "cpu"

    def run(self, module: Module) -> Module:
        from qcompiler.codegen.cpu.host import target_cpu
        from qcompiler.targets import get_target

        try:
            target = get_target(self.target)
        except KeyError as e:
            raise PassError(f"{self.name}: {e.args[0]}") from None
        if target.backend == "cuda":  # no static-activation qmatmul kernel; the conv kernels
            applies = True
        else:
            applies = target_cpu(self.backend_target("cpu"))["arch"] == "x86_64"
        rewritten = 0
        if applies:
            for fn in module.functions:
                for node in list(fn.nodes):
                    if node.op == "qmatmul" and static_qmatmul_as_qconv(fn, module, node):
                        rewritten += 1
                fn.remove_dead_nodes()
        if rewritten:
            module.drop_unused_constants()
        record_stat(module, self.name, rewritten=rewritten)
        return module


def static_qmatmul_as_qconv(fn, module: Module, node) -> bool:
    """Rewrite one ``act=static`` 2-D qmatmul as reshape -> 1x1 qconv -> reshape (+ its bias
    and epilogue as a fused_elementwise); False (unchanged) where it does not fit."""
    a = node.attrs
    ops = list(node.operands) + [None] * (9 - len(node.operands))
    x, w, w_scale, w_zp, g_idx, x_scale, x_zp, bias = ops[:8]
    scheme = a.get("w_scheme")
    if a.get("act") != "static" or g_idx is not None or x_scale is None or x_zp is None:
        return False
    if bias is not None and a.get("epilogue") is not None:  # kept (the epilogue's x1.. move)
        return False
    if x.type.rank != 2 or w.type.rank != 2 or not isinstance(x.type.shape[1], int):
        return False
    if x.type.dtype.name not in ("u8", "i8") or w.type.dtype.name not in ("u8", "i8"):
        return False
    if w.type.layout is not None and w.type.layout.name != "row_major":
        return False
    if scheme is None or scheme.granularity not in ("tensor", "channel") or (
            scheme.granularity == "channel" and scheme.axis not in (1, -1)):
        return False
    if node.result.type.dtype.name != "f32" or w_scale.type.dtype.name != "f32" \
            or x_scale.type.dtype.name != "f32":
        return False
    if w_scale.type.rank > 1 or (w_zp is not None and w_zp.type.rank > 1):
        return False
    wv = constant_value(module, w)
    if wv is None:
        return False
    if w_zp is None and scheme.implied_zero_point not in (None, 0):
        return False
    k, n = (int(d) for d in w.type.shape)
    batch = x.type.shape[0]
    i64 = elem("i64")

    def shape_const(dims, hint):
        arr = np.asarray(dims, np.int64)
        return constant_node(fn, module, arr, TensorType((len(dims),), i64), name_hint=hint,
                             before=node).result
    name = node.result.name
    xr = fn.make_node("reshape", [x, shape_const([0, k, 1, 1], f"{name}.x4d")],
                      [TensorType((batch, k, 1, 1), x.type.dtype)], before=node).result
    wc = np.ascontiguousarray(np.asarray(wv).T).reshape(n, k, 1, 1)
    wn = constant_node(fn, module, wc, TensorType((n, k, 1, 1), w.type.dtype),
                       name_hint=f"{name}.w_conv", before=node).result
    conv = fn.make_node("qconv", [xr, wn, x_scale, x_zp, w_scale, w_zp, None, None, None,
                                  None, None, None],
                        [TensorType((batch, n, 1, 1), elem("f32"))],
                        {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1],
                         "group": 1, "out": "float"}, before=node).result
    y = fn.make_node("reshape", [conv, shape_const([0, n], f"{name}.y2d")],
                     [TensorType((batch, n), elem("f32"))], before=node).result
    body = a.get("epilogue")
    extra = qmatmul_epilogue_operands(node)
    if bias is not None:  # the product's float bias (no epilogue: checked above)
        body, extra = "t0 = add(x0, x1); return t0", [bias]
    if body is not None:
        y = fn.make_node("fused_elementwise", [y] + extra, [node.result.type], {"body": body},
                         before=node).result
    fn.replace_all_uses(node.result, y)
    fn.erase(node)
    return True

