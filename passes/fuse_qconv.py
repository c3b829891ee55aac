"""fuse-qconv: quantized convolutions in their three ONNX forms become one ``qconv``.

Recognized (after canonicalize, which folds the casts and zero-point subtractions of
constants)::

    QDQ:           conv(dequantize(xq, xs, xzp), dequantize(wq, ws, wzp), bias?)
                   bias: none, dequantize(bq i32, xs * ws) or a float constant
    ConvInteger:   mul(cast(conv(x32, w32), f32), s)      (either operand order of mul)
                   x32 = cast(xq, i32) | sub(cast(xq, i32), zp); w32 an i32 constant
                   s = a constant, or mul(x_scale, w_scale) with w_scale constant
    QLinearConv:   imported as ``qconv`` directly (frontends/onnx.py)

→ ``qconv(...) {out = "float"}``; fuse-requant then moves a following quantize, clip/relu and
residual add into it. x must be per-tensor i8/u8; w per-tensor or per output channel
(axis 0) i8/u8/i4/u4. A float bias is rounded to i32 units of x_scale * w_scale (as
onnxruntime's quantizer does); every other rewrite keeps the values exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Value
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.ir.types import TensorType, elem
from qcompiler.pipeline import Pass, record_stat, register_pass

X_CODES = ("i8", "u8")
W_CODES = ("i8", "u8", "i4", "u4")
CONV_KEYS = ("strides", "pads", "dilations", "group")


def _scalar_const(rw: Rewriter, array, dtype_name: str, before, hint: str) -> Value:
    t = TensorType((), elem(dtype_name))
    return rw.constant(np.asarray(array, t.dtype.np_dtype).reshape(()), t, before, hint)


def _qconv_attrs(conv) -> dict:
    return {**{k: conv.attrs[k] for k in CONV_KEYS}, "out": "float"}


def _x_dequantize(v: Value):
    dq = producer_of(v, "dequantize")
    if dq is None:
        return None
    s = dq.attrs["scheme"]
    if s.granularity != "tensor" or s.dtype.name not in X_CODES or len(dq.operands) > 3:
        return None
    return dq


def _w_dequantize(v: Value, out_channels: int):
    dq = producer_of(v, "dequantize")
    if dq is None:
        return None
    s = dq.attrs["scheme"]
    if s.dtype.name not in W_CODES or len(dq.operands) > 3:
        return None
    if s.granularity == "channel" and s.axis == 0 and dq.arg("scale").type.shape == (out_channels,):
        return dq
    return dq if s.granularity == "tensor" else None


class FuseQDQConv(RewritePattern):
    op = "conv"

    def rewrite(self, node, rw):
        x_dq = _x_dequantize(node.arg("x"))
        w_dq = _w_dequantize(node.arg("w"), node.arg("w").type.shape[0])
        if x_dq is None or w_dq is None or node.result.type.dtype.name != "f32":
            return False
        xq, xs, xzp = x_dq.arg("x"), x_dq.arg("scale"), x_dq.arg("zero_point")
        wq, ws, wzp = w_dq.arg("x"), w_dq.arg("scale"), w_dq.arg("zero_point")
        bias = self._bias(rw, node, xs, ws)
        if bias is False:
            return False
        if xzp is None:
            xzp = _scalar_const(rw, 0, xq.type.dtype.name, node, "x_zero_point")
        fused = rw.create("qconv", [xq, wq, xs, xzp, ws, wzp, bias], _qconv_attrs(node),
                          before=node, hint="qconv")
        rw.replace(node, [fused.result])
        return True

    @staticmethod
    def _bias(rw: Rewriter, node, xs: Value, ws: Value):
        """The i32 bias operand, None without one, False when it cannot be expressed."""
        b = node.arg("b")
        if b is None:
            return None
        m = node.arg("w").type.shape[0]
        xs_c, ws_c = rw.const(xs), rw.const(ws)
        b_dq = producer_of(b, "dequantize")
        if b_dq is not None and b_dq.arg("x").type.dtype.name == "i32":
            bzp = rw.const(b_dq.arg("zero_point")) if b_dq.arg("zero_point") is not None else None
            bs = rw.const(b_dq.arg("scale"))
            if bs is None or xs_c is None or ws_c is None or (bzp is not None and np.any(bzp)):
                return False
            want = np.float32(xs_c.reshape(-1)[0]) * np.broadcast_to(
                np.asarray(ws_c, np.float32).reshape(-1), (m,))
            if not np.allclose(np.broadcast_to(np.asarray(bs, np.float32).reshape(-1), (m,)),
                               want, rtol=1e-6, atol=0):
                return False
            return b_dq.operands[0]
        bc = rw.const(b)
        if bc is None or xs_c is None or ws_c is None:
            return False
        unit = np.float64(np.float32(xs_c.reshape(-1)[0])) * np.broadcast_to(
            np.asarray(ws_c, np.float64).reshape(-1), (m,))
        codes = np.rint(np.asarray(bc, np.float64).reshape(m) / unit)
        if np.any(np.abs(codes) >= 2 ** 31):
            return False
        return rw.constant(codes.astype(np.int32), TensorType((m,), elem("i32")), node,
                           "conv_bias_i32")


def _narrow_codes(w: np.ndarray) -> Optional[np.ndarray]:
    for name in ("i8", "u8"):
        lo, hi = elem(name).int_range()
        if w.min(initial=0) >= lo and w.max(initial=0) <= hi:
            return w.astype(elem(name).np_dtype)
    return None


class FuseConvInteger(RewritePattern):
    op = "mul"

    def rewrite(self, node, rw):
        for c, s in (node.operands, node.operands[::-1]):
            cast = producer_of(c, "cast")
            conv = producer_of(cast.operands[0], "conv") if cast is not None else None
            if conv is None or not rw.single_use(c) or not rw.single_use(cast.operands[0]):
                continue
            if conv.result.type.dtype.name != "i32" or node.result.type.dtype.name != "f32" \
                    or conv.arg("b") is not None:
                continue
            found = self._operands(rw, node, conv, s)
            if found is None:
                continue
            fused = rw.create("qconv", found, _qconv_attrs(conv), before=node, hint="qconv")
            if fused.result.type.shape != node.result.type.shape:
                return False
            rw.replace(node, [fused.result])
            return True
        return False

    @staticmethod
    def _operands(rw: Rewriter, node, conv, s: Value) -> Optional[list]:
        x32, w32 = conv.arg("x"), conv.arg("w")
        m = w32.type.shape[0]
        xzp = None
        sub = producer_of(x32, "sub")
        if sub is not None:
            x32, zp = sub.operands
            zc = rw.const(zp)
            zcast = producer_of(zp, "cast")
            if zc is not None and zc.size == 1:
                xzp = "const", int(zc.reshape(-1)[0])
            elif zcast is not None and zcast.operands[0].type.rank <= 1:
                xzp = "value", zcast.operands[0]
            else:
                return None
        xcast = producer_of(x32, "cast")
        if xcast is None or xcast.operands[0].type.dtype.name not in X_CODES:
            return None
        xq = xcast.operands[0]
        wc = rw.const(w32)
        wcodes = _narrow_codes(np.asarray(wc)) if wc is not None else None
        if wcodes is None:
            return None
        if xzp is None or xzp[0] == "const":
            zero = _scalar_const(rw, 0 if xzp is None else xzp[1], xq.type.dtype.name, node,
                                 "x_zero_point")
        elif xzp[1].type.dtype == xq.type.dtype:
            zero = xzp[1]
        else:
            return None
        scales = FuseConvInteger._scales(rw, node, s, m)
        if scales is None:
            return None
        wv = rw.constant(wcodes, TensorType(wcodes.shape, elem(str(wcodes.dtype).replace(
            "int", "i").replace("ui", "u"))), node, "conv_w_codes")
        return [xq, wv, scales[0], zero, scales[1]]

    @staticmethod
    def _scales(rw: Rewriter, node, s: Value, m: int):
        """(x_scale, w_scale [M] or scalar) whose product is s along the output channels."""
        def per_channel(c):
            c = np.asarray(c, np.float32)
            if c.size == 1:
                return c.reshape(())
            shape = (1,) * (4 - c.ndim) + c.shape if c.ndim <= 4 else c.shape
            if c.size != m or shape[1] != m:
                return None
            return c.reshape(m)
        sc = rw.const(s)
        f32 = elem("f32")
        if sc is not None:
            w = per_channel(sc)
            if w is None:
                return None
            one = _scalar_const(rw, 1.0, "f32", node, "x_scale")
            return one, rw.constant(w, TensorType(w.shape, f32), node, "w_scale")
        prod = producer_of(s, "mul")
        if prod is None:
            return None
        for a, b in (prod.operands, prod.operands[::-1]):
            bc = rw.const(b)
            if bc is None or a.type.shape not in ((), (1,)) or a.type.dtype != f32:
                continue
            w = per_channel(bc)
            if w is not None:
                return a, rw.constant(w, TensorType(w.shape, f32), node, "w_scale")
        return None


@register_pass("fuse-qconv")
@dataclass
class FuseQConvPass(Pass):
    """QDQ-wrapped Conv and ConvInteger + Cast + Mul → qconv (out = float)."""

    def run(self, module: Module) -> Module:
        qdq = apply_patterns(module, [FuseQDQConv()])
        integer = apply_patterns(module, [FuseConvInteger()])
        record_stat(module, self.name, qdq=qdq, conv_integer=integer)
        return module
