"""canonicalize: constant folding, Gemm to MatMul orientation, dead and identity ops.

After this pass:
- ``gemm`` is gone: ``gemm(a, b, c)`` is ``matmul(a', b') [* alpha] [+ beta * c]`` with the
  transposes made explicit, so every weight is a [K, N] right operand;
- a ``transpose`` of a ``dequantize`` of constants moves onto the constants (so a transposed
  quantized weight is stored [K, N] and fuse-dequant sees ``matmul(x, dequantize(w))``);
- nodes whose operands are all constants are evaluated (except ``dequantize``: folding it
  would undo the quantization), as is ``shape`` of a static tensor;
- ``identity``, casts to the same type and reshapes to the same static shape disappear; a
  transpose that moves only dims of size 1 becomes a reshape (a view);
- a reshape whose shape is assembled at run time from another tensor's dims
  (``concat(unsqueeze(gather(shape(y), i)), ..., [-1, 16])``, as exporters and onnxruntime's
  optimizer write it) gets a constant shape when each such dim is the input's own dim i (a 0,
  "copy") or a static int: so heads and head dims become static (``ShapeOfSameDims``);
- a result dim that is unknown (``?``, or a symbol) where the op's type inference now gives an
  int, or unknown where it gives a symbol, takes the inferred dim (``RefineResultDims``: the
  rewrites above make operands more static than the importer could);
- the contraction dimension of a matmul / qmatmul operand is static when the weight's is:
  ``x[..., ?] @ w[K, N]`` types x's producer result ``[..., K]`` (matmul requires it; a
  reshape to a shape computed at run time otherwise leaves it unknown, and backends need K);
- nodes that reach no output are removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module, TensorType
from qcompiler.ir.types import elem
from qcompiler.ir.ops import OPS, infer_types
from qcompiler.ir.rewrite import RewritePattern, apply_patterns, producer_of
from qcompiler.pipeline import Pass, record_stat, register_pass

# Ops never folded: folding them would change what the program means to later passes.
_NO_FOLD = {"constant", "dequantize", "quantize", "qmatmul", "dynamic_quantize",
            "matmul_integer", "qlinear_matmul"}
_I64 = elem("i64")
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


def _same_dim(x, y, i: int) -> bool:
    """Whether dim i of values x and y is the same at run time: the same static int or named
    symbol, or both results of one split, off its axis."""
    if x is y:
        return True
    if i >= x.type.rank or i >= y.type.rank:
        return False
    a, b = x.type.shape[i], y.type.shape[i]
    if a == b and a != "?":
        return True
    p = x.producer
    if p is not None and p is y.producer and p.op == "split" and x.type.rank == y.type.rank:
        return i != (p.attrs["axis"] % x.type.rank)
    return False


class ShapeOfSameDims(RewritePattern):
    """reshape(x, concat(pieces)) where every piece is a constant, ``shape(y)[a:b]`` or
    ``unsqueeze(gather(shape(y), i))`` → reshape(x, constant): a dim of y at the position it
    takes in the target that equals x's dim there becomes 0 (copy it), a static dim of y its
    int. ONNX's own inference leaves such a reshape's -1 unknown; with the constant shape it
    is resolved (``[b, s, 64] → [0, 0, -1, 16]`` is ``[b, s, 4, 16]``)."""

    op = "reshape"

    def rewrite(self, node, rw):
        x, shape = node.arg("x"), node.arg("shape")
        cat = shape.producer if shape is not None else None
        if rw.const(shape) is not None or cat is None or cat.op != "concat" \
                or node.attrs.get("allowzero", 0):
            return False
        target: list[int] = []
        for piece in cat.operands:
            c = rw.const(piece)
            if c is not None:
                if c.ndim != 1:
                    return False
                target += [int(v) for v in c]
                continue
            dims = self._shape_dims(piece, rw)
            if dims is None:
                return False
            for y, i in dims:
                pos = len(target)
                if pos == i and _same_dim(x, y, i):
                    target.append(0)
                elif isinstance(y.type.shape[i], int) and y.type.shape[i] > 0:
                    target.append(y.type.shape[i])  # (a 0 would mean "copy" here)
                else:
                    return False
        const = rw.constant(np.array(target, np.int64), TensorType((len(target),), shape.type.dtype),
                            before=node, hint="shape")
        new = rw.create("reshape", [x, const], dict(node.attrs), before=node, hint=node.result.name)
        rw.replace(node, [new.result])
        return True

    @staticmethod
    def _shape_dims(piece, rw):
        """[(y, i), ...]: the dims of tensors a 1-D piece holds, or None."""
        p = piece.producer
        if p is not None and p.op == "shape":
            return _dims_of_shape(p)
        if p is None or p.op != "unsqueeze" or p.attrs["axes"] not in ([0], [-1]) \
                or p.operands[0].type.rank != 0:
            return None
        g = p.operands[0].producer  # unsqueeze(gather(shape(y), k)): one dim of y
        if g is None or g.op != "gather" or g.operands[0].producer is None \
                or g.operands[0].producer.op != "shape":
            return None
        idx = rw.const(g.operands[1])
        dims = _dims_of_shape(g.operands[0].producer)
        if idx is None or idx.ndim != 0 or not -len(dims) <= int(idx) < len(dims):
            return None
        return [dims[int(idx)]]


def _dims_of_shape(node) -> list:
    """[(y, i), ...]: the dims of y that ``shape(y){start, end}`` holds, in order."""
    y = node.operands[0]
    r = y.type.rank
    return [(y, i) for i in range(*slice(node.attrs.get("start", 0),
                                         node.attrs.get("end", r)).indices(r))]


class RefineResultDims(RewritePattern):
    """A result dim that is ``?`` or a symbol takes the int the op's inference gives now, and a
    ``?`` takes an inferred symbol (never an int replaced, never a conflict resolved)."""

    op = "*"

    def rewrite(self, node, rw):
        if node.op == "constant" or node.op not in OPS \
                or all(r.type.is_static for r in node.results):
            return False
        try:
            inferred = infer_types(node.op, [v.type if v is not None else None
                                             for v in node.operands],
                                   node.attrs, [rw.const(v) for v in node.operands])
        except Exception:  # the verifier names real errors; this only refines
            return False
        changed = False
        for r, t in zip(node.results, inferred or []):
            if t is None or t.rank != r.type.rank:
                continue
            dims = list(r.type.shape)
            for i, (old, new) in enumerate(zip(dims, t.shape)):
                if isinstance(old, str) and (isinstance(new, int) or (old == "?" and new != "?")):
                    dims[i] = new
            if tuple(dims) != tuple(r.type.shape):
                r.type = r.type.with_shape(tuple(dims))
                changed = True
        return changed


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


class TransposeOfUnitDims(RewritePattern):
    """A transpose that moves only dims of size 1 (the others keep their order) is a reshape:
    the same elements in the same memory order, and a view instead of a copy in the plans
    (``[N, C, 1, 1]`` to channels-last and back, around a classifier's 1 x 1 qconv)."""

    op = "transpose"

    def rewrite(self, node, rw):
        if producer_of(node.operands[0], "dequantize") is not None:
            return False  # (a transposed weight: TransposeOfDequantize's)
        x, y = node.operands[0].type, node.result.type
        moved = [p for p in node.attrs["perm"] if x.shape[p] != 1]  # symbols may be > 1
        if moved != sorted(moved):
            return False
        # the reshape's shape: y's static dims, and 0 ("x's dim here") for a symbolic dim that
        # stays at its index
        target = []
        for i, d in enumerate(y.shape):
            if isinstance(d, int):
                target.append(d)
            elif d != "?" and i < x.rank and x.shape[i] == d:
                target.append(0)
            else:
                return False
        shape = rw.constant(np.array(target, np.int64), TensorType((len(target),),
                                                                   _I64), node, "shape")
        new = rw.create("reshape", [node.operands[0], shape], before=node, hint="reshape",
                        result_types=[y])
        rw.replace(node, [new.result])
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
        patterns = [GemmToMatmul(), TransposeOfDequantize(), TransposeOfUnitDims(), FoldShape(),
                    RefineContractionDim(),
                    ShapeOfSameDims(), RefineResultDims(), RemoveIdentity(),
                    RemoveNoopCast(), RemoveNoopReshape()]
        if self.fold:
            patterns.append(FoldConstants())
        n = apply_patterns(module, patterns)
        for fn in module.functions:
            fn.remove_dead_nodes()
        module.drop_unused_constants()
        record_stat(module, self.name, rewrites=n)
        return module
