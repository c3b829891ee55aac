"""fuse-requant: a float-output qconv's quantize, clip/relu and residual add → its epilogue.

Recognized, every intermediate single-use, from the ``quantize`` back::

    quantize(A(qconv{out=float}), ys, yzp)                  per-tensor i8/u8 quantize
    quantize(A(add(qconv{out=float}, dequantize(r, rs, rzp))), ys, yzp)    residual
    quantize(A(add(dequantize(qconv{out=quant}), dequantize(r, rs, rzp))), ys, yzp)
    A = any chain of relu, max(., c), min(., c) with scalar constants c (lo <= hi)

→ ``qconv{out=quant, requant=..., act_min, act_max}`` with the residual's codes. The clamp is
exact on codes (quantization is monotone); the residual is added before the single rounding
(an unfused graph rounds the conv output first: a code may differ by one).

The second residual form is what quantize_static writes for a ResNet / MobileNetV2 block in
both formats (QDQ: a Q/DQ pair after the block's last conv; QOperator: QLinearConv, then
QLinearAdd imported as dequantize/add/quantize): the conv's own requantization to its
intermediate codes (rounded and clamped to the code range) is dropped, the block's add and
quantize become the conv's epilogue (one i32 -> f32 -> codes pass instead of a conv epilogue,
two dequantizes, a float add and a quantize). Taken only where the intermediate codes have
no other use and the conv has no clamp of its own (a relu before the add is kept). Its
numerics: the unfused graph's conv output is rounded (half an intermediate step) and clamped
to its calibrated range before the add; the fused one is not, so a code may differ by one,
and by more where the conv's output leaves its calibrated range (onnxruntime clamps there).
Option ``through_codes`` (default on) takes this form; off keeps such blocks unfused.
Without a quantize, the chain A alone moves into a float-output qconv (exact).

Requantization (option ``requant``): ``float`` (onnxruntime's arithmetic) or ``dyadic``
(integer multiplier and shift, HAWQ-V3); ``auto`` (default) takes dyadic for ``fpga-*``
targets and float for the others (option ``target``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import operand_index
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass

REQUANT_CHOICES = ("auto", "float", "dyadic")


def _scalar(rw: Rewriter, v):
    c = rw.const(v)
    if c is None or c.size != 1:
        return None
    return float(np.asarray(c, np.float64).reshape(()))


def _activation_chain(rw: Rewriter, v):
    """(source, lo, hi) with v = clamp(source, lo, hi) (lo <= hi) through single-use
    relu/max/min."""
    lo, hi = -np.inf, np.inf
    while v.producer is not None and v.producer.op in ("relu", "max", "min"):
        node = v.producer
        if node.op == "relu":
            src, bound = node.operands[0], 0.0
        else:
            src, other = node.operands
            bound = _scalar(rw, other)
            if bound is None:
                src, other = other, src
                bound = _scalar(rw, other)
            if bound is None:
                break
        if not rw.single_use(src) or src.type.shape != v.type.shape:
            break
        # clamp(g(src), lo, hi) with g = max(., c) or min(., c) is again a clamp of src.
        if node.op in ("relu", "max"):
            lo = min(max(lo, bound), hi)
        else:
            hi = max(min(hi, bound), lo)
        v = src
    return v, lo, hi


def _float_qconv(v):
    node = v.producer
    if node is None or node.op != "qconv" or node.attrs["out"] != "float" or any(
            k in node.attrs for k in ("act_min", "act_max")) or len(node.operands) > 9:
        return None
    return node


def _quant_qconv_codes(rw: Rewriter, v):
    """The qconv{out=quant} whose codes v dequantizes (its own y scale and zero point, no
    clamp, no residual, codes used only there), else None."""
    dq = v.producer
    if dq is None or dq.op != "dequantize" or len(dq.operands) > 3 \
            or dq.attrs["scheme"].granularity != "tensor" or not rw.single_use(v):
        return None
    codes = dq.arg("x")
    node = codes.producer
    if node is None or node.op != "qconv" or node.attrs["out"] != "quant" \
            or node.attrs.get("requant", "float") != "float" \
            or any(k in node.attrs for k in ("act_min", "act_max")) \
            or len(node.operands) > 9 or not rw.single_use(codes):
        return None
    ops = _padded(node.operands)
    ys, yzp = ops[operand_index("qconv", "y_scale")], ops[operand_index("qconv", "y_zero_point")]
    for a, b in ((dq.arg("scale"), ys), (dq.arg("zero_point"), yzp)):
        if a is b:
            continue
        ca, cb = rw.const(a), rw.const(b)
        if ca is None or cb is None or ca.size != 1 or cb.size != 1 \
                or np.float64(ca.reshape(())) != np.float64(cb.reshape(())):
            return None
    return node


def _with_act(attrs: dict, lo: float, hi: float) -> dict:
    a = dict(attrs)
    if lo != -np.inf:
        a["act_min"] = float(lo)
    if hi != np.inf:
        a["act_max"] = float(hi)
    return a


def _padded(operands: list) -> list:
    return list(operands) + [None] * (9 - len(operands))


class FuseQuantizeIntoQConv(RewritePattern):
    op = "quantize"

    def __init__(self, requant: str, through_codes: bool = True):
        self.requant = requant
        self.through_codes = through_codes

    def rewrite(self, node, rw):
        scheme = node.attrs["scheme"]
        if scheme.granularity != "tensor" or scheme.dtype.name not in ("i8", "u8") \
                or node.arg("zero_point") is None:
            return False
        src, lo, hi = _activation_chain(rw, node.arg("x"))
        if lo > hi:
            return False
        residual = []
        conv = _float_qconv(src)
        add = src.producer if conv is None else None
        if add is not None and add.op == "add" and rw.single_use(src):
            for c, r in (add.operands, add.operands[::-1]):
                conv = _float_qconv(c) or (_quant_qconv_codes(rw, c) if self.through_codes
                                           else None)
                r_dq = r.producer if r.producer is not None and r.producer.op == "dequantize" \
                    else None
                if conv is None or r_dq is None or not rw.single_use(c):
                    conv = None
                    continue
                rs = r_dq.attrs["scheme"]
                if rs.granularity != "tensor" or rs.dtype.name not in ("i8", "u8") \
                        or r_dq.arg("zero_point") is None \
                        or r.type.shape != c.type.shape:
                    conv = None
                    continue
                residual = [r_dq.arg("x"), r_dq.arg("scale"), r_dq.arg("zero_point")]
                break
        if conv is None or (src.producer is conv and not rw.single_use(src)):
            return False
        y_quant = [node.arg("scale"), node.arg("zero_point")]
        # the float qconv's operands up to its bias, then y's quantization and the residual
        operands = _padded(conv.operands)[:operand_index("qconv", "y_scale")] + y_quant + residual
        attrs = _with_act({k: v for k, v in conv.attrs.items() if k != "requant"}, lo, hi)
        attrs.update(out="quant", requant=self.requant)
        fused = rw.create("qconv", operands, attrs, before=node, hint="qconv",
                          result_types=[node.result.type])
        rw.replace(node, [fused.result])
        return True


class FuseActivationIntoQConv(RewritePattern):
    """A clamp chain on a float-output qconv with no quantize after it."""

    op = "*"

    def rewrite(self, node, rw):
        if node.op not in ("relu", "max", "min"):
            return False
        src, lo, hi = _activation_chain(rw, node.result)
        conv = _float_qconv(src)
        if conv is None or lo > hi or src is node.result:
            return False
        fused = rw.create("qconv", list(conv.operands), _with_act(conv.attrs, lo, hi),
                          before=node, hint="qconv", result_types=[node.result.type])
        rw.replace(node, [fused.result])
        return True


@register_pass("fuse-requant")
@dataclass
class FuseRequantPass(Pass):
    """quantize / clip / relu / residual add after a qconv → the qconv's epilogue."""

    target: str = ""
    requant: str = "auto"
    through_codes: bool = True

    def run(self, module: Module) -> Module:
        if self.requant not in REQUANT_CHOICES:
            raise PassError(f"fuse-requant: requant must be one of {REQUANT_CHOICES}, not "
                            f"{self.requant!r}")
        mode = self.requant
        if mode == "auto":
            mode = "dyadic" if self.target.startswith("fpga") else "float"
        quantized = apply_patterns(module, [FuseQuantizeIntoQConv(mode, self.through_codes)])
        clamped = apply_patterns(module, [FuseActivationIntoQConv()])
        record_stat(module, self.name, quantize=quantized, activation=clamped)
        return module
