"""fuse-qpool: a QDQ-wrapped max pooling, reshape or transpose runs on the codes.

Recognized (what quantize_static writes around a MaxPool, a Flatten or a Reshape in the QDQ
format)::

    quantize(pool{kind=max}(dequantize(c, s, zp)), s, zp)      per-tensor i8/u8, same s, zp
    quantize(V(dequantize(c, s, zp)), s, zp)                   V: reshapes and transposes

→ ``pool{kind=max}(c)`` on the codes (the QOperator format has this form already), and
``V(c)``: the codes moved as the values were (a reshape stays a view; a classifier's
Flatten between GlobalAveragePool and Gemm then costs no kernel). Exact:
dequantize is monotone (s > 0), so the max commutes with it, and quantize(dequantize(c)) is c
for every code with the same scale and zero point (``(c - zp) * s / s`` is within a few ulps
of the integer c - zp, far from a rounding boundary); max pooling ignores padded positions
(the reference's NaN padding), so no zero point has to stand in for them. The integer pool
reads and writes a quarter of the float one's bytes, and the dequantize and quantize around
it are gone (ResNet-18's stem: 64 x 112 x 112 values each). Data movement does not change a
value, so ``V`` is exact by the same round trip.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.pipeline import Pass, record_stat, register_pass

CODES = ("i8", "u8")


def _same_scalar(rw: Rewriter, a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    ca, cb = rw.const(a), rw.const(b)
    return (ca is not None and cb is not None and ca.size == 1 and cb.size == 1
            and ca.dtype == cb.dtype and ca.reshape(()) == cb.reshape(()))


def _codes_of(rw: Rewriter, node, v):
    """The codes c where ``v`` is ``dequantize(c, s, zp)`` and the quantize ``node`` takes
    the values back with the same per-tensor scheme (dtype, scale > 0, zero point), else
    None: then quantize(f(dequantize(c))) is f(c) for any f that moves values (or maxes them)."""
    q = node.attrs["scheme"]
    if q.granularity != "tensor" or q.dtype.name not in CODES or len(node.operands) > 3:
        return None
    dq = producer_of(v, "dequantize")
    if dq is None or len(dq.operands) > 3:
        return None
    d = dq.attrs["scheme"]
    codes = dq.arg("x")
    if d.granularity != "tensor" or d.dtype.name != q.dtype.name \
            or codes.type.dtype.name != node.result.type.dtype.name:
        return None
    if not _same_scalar(rw, dq.arg("scale"), node.arg("scale")) \
            or not _same_scalar(rw, dq.arg("zero_point"), node.arg("zero_point")):
        return None
    s = rw.const(node.arg("scale"))
    if s is None or not np.all(np.asarray(s, np.float64) > 0):
        return None
    return codes


class MaxPoolOnCodes(RewritePattern):
    op = "quantize"

    def rewrite(self, node, rw):
        pool = producer_of(node.arg("x"), "pool")
        if pool is None or pool.attrs.get("kind") != "max" or len(pool.results) != 1 \
                or not rw.single_use(pool.result):
            return False
        codes = _codes_of(rw, node, pool.operands[0])
        if codes is None:
            return False
        fused = rw.create("pool", [codes], dict(pool.attrs), before=node, hint="pool",
                          result_types=[node.result.type])
        rw.replace(node, [fused.result])
        return True


# ops that move values without changing them, and the operands that are data (not shapes)
MOVES = {"reshape": 0, "transpose": 0}


class MovesOnCodes(RewritePattern):
    """quantize(V(dequantize(c, s, zp)), s, zp) → V(c) (V: single-use reshapes and
    transposes, at least one)."""
    op = "quantize"

    def rewrite(self, node, rw):
        moves = []
        v = node.arg("x")
        while v.producer is not None and v.producer.op in MOVES and rw.single_use(v):
            moves.append(v.producer)
            v = v.producer.operands[MOVES[v.producer.op]]
        codes = _codes_of(rw, node, v) if moves else None
        if codes is None:
            return False
        v = codes
        for move in reversed(moves):  # from the dequantize outwards
            operands = list(move.operands)
            operands[MOVES[move.op]] = v
            v = rw.create(move.op, operands, dict(move.attrs), before=node, hint=move.op,
                          result_types=[node.result.type.with_shape(move.result.type.shape)]
                          ).result
        rw.replace(node, [v])
        return True


@register_pass("fuse-qpool")
@dataclass
class FuseQPoolPass(Pass):
    """quantize(maxpool / reshape / transpose(dequantize(c))) with one scale and zero point
    → the same op on the codes."""

    def run(self, module: Module) -> Module:
        pools = apply_patterns(module, [MaxPoolOnCodes()])
        moves = apply_patterns(module, [MovesOnCodes()])
        record_stat(module, self.name, max_pool=pools, moves=moves)
        return module
