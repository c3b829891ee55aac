"""fuse-gelu: the decomposed exact GELU becomes one ``gelu`` op.

Recognized (the form torch's exporter writes for ``nn.GELU()`` before opset 20, and BERT's
``gelu``), with the three factors of the product in any order and grouping::

    u  = div(x, √2) | mul(x, 1/√2) | mul(1/√2, x)
    e  = add(erf(u), 1) | add(1, erf(u))
    out = x · e · 0.5

→ ``gelu(x)`` (exact, erf). √2 and 1/√2 are matched within 2e-3 relative: after
compute-dtype an f16 or bf16 model holds them rounded (1.4140625). Intermediates must have no
other use. Fused, GELU is one elementwise op that fuse-epilogue folds into a qmatmul's
epilogue (applied as the kernel stores y) where the five separate ops stayed a kernel of
their own: the product has two uses (the division and the product), so no epilogue could take
the first of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Value
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.pipeline import Pass, record_stat, register_pass

SQRT2 = math.sqrt(2.0)
TOLERANCE = 2e-3  # relative, for √2 and 1/√2 rounded to f16 / bf16


def _scalar(rw: Rewriter, v: Value) -> Optional[float]:
    c = rw.const(v)
    if c is None or c.size != 1:
        return None
    return float(np.asarray(c).astype(np.float64).reshape(()))


def _near(a: Optional[float], b: float) -> bool:
    return a is not None and abs(a - b) <= TOLERANCE * abs(b)


def _factors(rw: Rewriter, v: Value, root: bool) -> list[Value]:
    """The factors of a product tree of ``mul`` nodes (inner products used only there)."""
    node = producer_of(v, "mul")
    if node is None or not (root or rw.single_use(v)):
        return [v]
    return _factors(rw, node.operands[0], False) + _factors(rw, node.operands[1], False)


def _erf_input(rw: Rewriter, e: Value) -> Optional[Value]:
    """u when e = add(erf(u), 1) (either order), single uses."""
    add = producer_of(e, "add")
    if add is None or not rw.single_use(e):
        return None
    for erf_value, one in (add.operands, add.operands[::-1]):
        erf = producer_of(erf_value, "erf")
        if erf is not None and rw.single_use(erf_value) and _scalar(rw, one) == 1.0:
            return erf.operands[0]
    return None


def _scaled_input(rw: Rewriter, u: Value) -> Optional[Value]:
    """x when u = x / √2 or x · (1/√2), single use."""
    if not rw.single_use(u) or u.producer is None:
        return None
    node = u.producer
    if node.op == "div" and _near(_scalar(rw, node.operands[1]), SQRT2):
        return node.operands[0]
    if node.op == "mul":
        for x, c in (node.operands, node.operands[::-1]):
            if _near(_scalar(rw, c), 1.0 / SQRT2):
                return x
    return None


class FuseGelu(RewritePattern):
    op = "mul"

    def rewrite(self, node, rw):
        factors = _factors(rw, node.result, root=True)
        if len(factors) != 3:
            return False
        for i, half in enumerate(factors):
            if _scalar(rw, half) != 0.5:
                continue
            rest = factors[:i] + factors[i + 1:]
            for x, e in (rest, rest[::-1]):
                u = _erf_input(rw, e)
                if u is None or _scaled_input(rw, u) is not x:
                    continue
                if node.result.type != x.type:
                    continue  # the product broadcast x: not an elementwise GELU of x
                fused = rw.create("gelu", [x], {"approximate": "none"}, before=node,
                                  hint="gelu", result_types=[node.result.type])
                rw.replace(node, [fused.result])
                return True
        return False


@register_pass("fuse-gelu")
@dataclass
class FuseGeluPass(Pass):
    """x · 0.5 · (1 + erf(x / √2)) in its decomposed forms → one gelu op."""

    def run(self, module: Module) -> Module:
        record_stat(module, self.name, gelu=apply_patterns(module, [FuseGelu()]))
        return module
