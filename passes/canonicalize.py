"""canonicalize: constant folding, Gemm to MatMul orientation, dead and identity ops.

After this pass:
- ``gemm`` is gone: ``gemm(a, b, c)`` is ``matmul(a', b') [* alpha] [+ beta * c]`` with the
  transposes made explicit, so every weight is a [K, N] right operand;
- a ``transpose`` of a ``dequantize`` of constants moves onto the constants (so a transposed
  quantized weight is stored [K, N] and fuse-dequant sees ``matmul(x, dequantize(w))``);
- nodes whose operands are all constants are evaluated (except ``dequantize``: folding it
  would undo the quantization), as is ``shape`` of a static tensor;
- ``identity``, casts to the same type and reshapes to the same static shape disappear;
- the contraction dimension of a matmul / qmatmul operand is static when the weight's is:
  ``x[..., ?] @ w[K, N]`` types x's producer result ``[..., K]`` (matmul requires it; a
  reshape to a shape computed at run time otherwise leaves it unknown, and backends need K);
- nodes that reach no output are removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module, TensorType
from qcompiler.ir.rewrite import RewritePattern, apply_patterns
from qcompiler.pipeline import Pass, record_stat, register_pass

# Ops never folded: folding them would change what the program means to later passes.
_NO_FOLD = {"constant", "dequantize", "quantize", "qmatmul", "dynamic_quantize",
            "matmul_integer", "qlinear_matmul"}
# Results larger than this are not materialized by folding (keeps the weights file small).
_FOLD_LIMIT = 1 << 22


class FoldConstants(RewritePattern):
    op = "*"

    def rewrite(self, node, rw):
        if node.op in _NO_FOLD or not all(
                v is None or rw.const(v) is not None for v in node.operands):
            return False
        if not all(r.type.is_static and r.type.numel() <= _FOLD_LIMIT for r in node.results):
            return False
        from qcompiler.runtime.reference import OP_IMPLS

        args = [rw.const(v) for v in node.operands]
        outs = OP_IMPLS[node.op](node, args, rw.module)
        rw.replace(node, [rw.constant(np.asarray(o), r.type, before=node, hint=r.name)
                          for o, r in zip(outs, node.results)])
        return True


class FoldShape(RewritePattern):
    op = "shape"

    def rewrite(self, node, rw):
        t = node.operands[0].type
        if not t.is_static:
            return False
        start, end = node.attrs.get("start", 0), node.attrs.get("end", t.rank)
        dims = np.array(t.shape[slice(start, end)], np.int64)
        rw.replace(node, [rw.constant(dims, node.result.type, before=node, hint="shape")])
        return True


class RefineContractionDim(RewritePattern):
    op = "*"

    def rewrite(self, node, rw):
        if node.op not in ("matmul", "qmatmul") or len(node.operands) < 2:
            return False
        x, w = node.operands[0], node.arg("w" if node.op == "qmatmul" else "b")
        if x is None or x.producer is None or w is None or w.type.layout is not None:
            return False
        if x.type.rank < 1 or w.type.rank < 2 or isinstance(x.type.shape[-1], int):
            return False
        k = w.type.shape[-2]
        if not isinstance(k, int):
            return False
        x.type = x.type.with_shape(tuple(x.type.shape[:-1]) + (k,))
        return True


class RemoveIdentity(RewritePattern):
    op = "identity"

    def rewrite(self, node, rw):
        rw.replace(node, [node.operands[0]])
        return True


class RemoveNoopCast(RewritePattern):
    op = "cast"

    def rewrite(self, node, rw):
        if node.operands[0].type.dtype != node.attrs["to"]:
            return False
        rw.replace(node, [node.operands[0]])
        return True


class RemoveNoopReshape(RewritePattern):
    op = "reshape"

    def rewrite(self, node, rw):
        src, dst = node.operands[0].type, node.result.type
        if not (src.is_static and src.shape == dst.shape):
            return False
        rw.replace(node, [node.operands[0]])
        return True


class GemmToMatmul(RewritePattern):
    op = "gemm"

    def rewrite(self, node, rw):
        a, b, c = node.arg("a"), node.arg("b"), node.arg("c")
        alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
        if node.attrs.get("trans_a", 0):
            a = rw.create("transpose", [a], {"perm": [1, 0]}, before=node).result
        if node.attrs.get("trans_b", 0):
            b = rw.create("transpose", [b], {"perm": [1, 0]}, before=node).result
        y = rw.create("matmul", [a, b], before=node, hint="mm").result
        dtype = y.type.dtype
        if alpha != 1.0:
            k = rw.constant(np.array(alpha, dtype.np_dtype), TensorType((), dtype), node, "alpha")
            y = rw.create("mul", [y, k], before=node).result
        if c is not None and beta != 0.0:
            if beta != 1.0:
                k = rw.constant(np.array(beta, dtype.np_dtype), TensorType((), dtype), node, "beta")
                c = rw.create("mul", [c, k], before=node).result
            y = rw.create("add", [y, c], before=node, hint="gemm").result
        rw.replace(node, [y])
        return True


class TransposeOfDequantize(RewritePattern):
    """transpose(dequantize(w, s, zp)) of 2-D constants → dequantize(wᵀ, sᵀ, zpᵀ)."""

    op = "transpose"

    def rewrite(self, node, rw):
        dq = node.operands[0].producer
        if dq is None or dq.op != "dequantize" or node.attrs["perm"] != [1, 0]:
            return False
        scheme = dq.attrs["scheme"]
        w, s, zp = dq.arg("x"), dq.arg("scale"), dq.arg("zero_point")
        if w.type.rank != 2 or dq.arg("g_idx") is not None or any(
                v is not None and rw.const(v) is None for v in (w, s, zp)):
            return False
        if scheme.granularity == "group" and s.type.rank != 2:
            return False
        if scheme.granularity != "tensor":
            scheme = scheme.replace(axis=1 - scheme.axis)

        def flipped(v):
            if v is None or v.type.rank < 2:
                return v
            return rw.create("transpose", [v], {"perm": [1, 0]}, before=node).result

        new = rw.create("dequantize", [flipped(w), flipped(s), flipped(zp)],
                        {"scheme": scheme, "out": dq.attrs["out"]}, before=node, hint="dq")
        rw.replace(node, [new.result])
        return True


@register_pass("canonicalize")
@dataclass
class CanonicalizePass(Pass):
    """Fold constants, rewrite Gemm to MatMul, drop identity and dead ops."""

    fold: bool = True  # evaluate nodes whose operands are all constants

    def run(self, module: Module) -> Module:
        patterns = [GemmToMatmul(), TransposeOfDequantize(), FoldShape(), RefineContractionDim(),
                    RemoveIdentity(),
                    RemoveNoopCast(), RemoveNoopReshape()]
        if self.fold:
            patterns.append(FoldConstants())
        n = apply_patterns(module, patterns)
        for fn in module.functions:
            fn.remove_dead_nodes()
        module.drop_unused_constants()
        record_stat(module, self.name, rewrites=n)
        return module
