"""fuse-dequant: quantized-weight matmuls of every ONNX form become one ``qmatmul``.

Patterns (w is always a constant [K, N] code tensor after this pass):

- ``matmul(x, dequantize(w, s, zp, g_idx))`` → ``qmatmul{act=float}``: QDQ weights (blocked
  int4, per-channel int8 ...) and MatMulNBits (imported as dequantize + matmul);
  when x itself is ``dequantize(xq)`` of 8-bit per-tensor codes and the weight scale is
  per-tensor or per-column, the product is integer: ``qmatmul{act=static}`` on xq;
- ``qlinear_matmul(a, …, b, …)`` → ``quantize(qmatmul{act=static}(a, b), y_scale, y_zp)``;
- ``mul(cast(matmul_integer(dynamic_quantize(x), w)), mul(x_scale, w_scale))``, the graph
  onnxruntime's ``quantize_dynamic`` writes → ``qmatmul{act=dynamic}``;
- ``add(qmatmul, constant bias [N])`` → the bias operand of the qmatmul.

Dequantizes whose consumers were all fused die with dead-code removal.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Module, QuantScheme, elem
from qcompiler.ir.core import Node, operand_index
from qcompiler.ir.rewrite import RewritePattern, Rewriter, apply_patterns, producer_of
from qcompiler.pipeline import Pass, record_stat, register_pass

U8_PER_TENSOR = QuantScheme(dtype=elem("u8"), symmetric=False, zero_point_type=elem("u8"))


def _integer_weight_scheme(scheme: QuantScheme) -> bool:
    """Integer products need one scale per tensor or per output column (axis 1 of [K, N])."""
    return scheme.dtype.is_integer and (
        scheme.granularity == "tensor" or (scheme.granularity == "channel" and scheme.axis == 1))


def _activation_scheme(scheme: QuantScheme) -> bool:
    return scheme.granularity == "tensor" and scheme.dtype.name in ("u8", "i8")


def _qmatmul(rw: Rewriter, before: Node, x, w, w_scale, w_zp, g_idx, x_scale, x_zp, bias,
             w_scheme: QuantScheme, act: str, x_scheme=None, result_type=None):
    attrs = {"w_scheme": w_scheme, "act": act}
    if x_scheme is not None:
        attrs["x_scheme"] = x_scheme
    operands = [x, w, w_scale, w_zp, g_idx, x_scale, x_zp, bias]
    return rw.create("qmatmul", operands, attrs, before=before, hint="qmm",
                     result_types=None if result_type is None else [result_type]).result


class FuseDequantMatmul(RewritePattern):
    op = "matmul"

    def rewrite(self, node, rw):
        x, wv = node.operands
        dq = producer_of(wv, "dequantize")
        if dq is None or rw.const(dq.operands[0]) is None or dq.operands[0].type.rank != 2:
            return False
        scheme: QuantScheme = dq.attrs["scheme"]
        w, s, zp = dq.arg("x"), dq.arg("scale"), dq.arg("zero_point")
        g = dq.arg("g_idx")
        if any(v is not None and rw.const(v) is None for v in (s, zp, g)):
            return False  # run-time scales: leave the dequantize where it is
        xdq = producer_of(x, "dequantize")
        if (xdq is not None and _activation_scheme(xdq.attrs["scheme"])
                and _integer_weight_scheme(scheme) and scheme.dtype.bits <= 8):
            y = _qmatmul(rw, node, xdq.arg("x"), w, s, zp, None, xdq.arg("scale"),
                         xdq.arg("zero_point"), None, scheme, "static", xdq.attrs["scheme"],
                         result_type=node.result.type)
        else:
            if dq.attrs["out"] != x.type.dtype:
                return False
            y = _qmatmul(rw, node, x, w, s, zp, g, None, None, None, scheme, "float")
            if "accuracy_level" in node.attrs:  # MatMulNBits's: the backend reads it
                y.producer.attrs["accuracy_level"] = node.attrs["accuracy_level"]
        rw.replace(node, [y])
        return True


class FuseQLinearMatmul(RewritePattern):
    op = "qlinear_matmul"

    def rewrite(self, node, rw):
        a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = node.operands
        if rw.const(b) is None or b.type.rank != 2 or rw.const(b_s) is None:
            return False
        if b_s.type.rank == 0 or b_s.type.shape == (1,):
            gran = {"granularity": "tensor"}
        elif b_s.type.rank == 1:
            gran = {"granularity": "channel", "axis": 1}
        else:
            return False
        if a_s.type.rank not in (0,) and a_s.type.shape != (1,):
            return False  # per-row activation scales are not a qmatmul scheme
        w_scheme = QuantScheme(dtype=b.type.dtype, symmetric=b_zp is None,
                               zero_point_type=None if b_zp is None else b_zp.type.dtype,
                               scale_type=b_s.type.dtype, **gran)
        x_scheme = QuantScheme(dtype=a.type.dtype, symmetric=a_zp is None,
                               zero_point_type=None if a_zp is None else a_zp.type.dtype,
                               scale_type=a_s.type.dtype)
        y = _qmatmul(rw, node, a, b, b_s, b_zp, None, a_s, a_zp, None, w_scheme, "static",
                     x_scheme)
        out_scheme = QuantScheme(dtype=y_zp.type.dtype, symmetric=False,
                                 zero_point_type=y_zp.type.dtype, scale_type=y_s.type.dtype)
        q = rw.create("quantize", [y, y_s, y_zp], {"scheme": out_scheme}, before=node, hint="q")
        rw.replace(node, [q.result])
        return True


class FuseDynamicMatmulInteger(RewritePattern):
    """mul(cast(matmul_integer(dq.y, w, dq.zp, w_zp)), mul(dq.scale, w_scale)) → qmatmul."""

    op = "mul"

    def rewrite(self, node, rw):
        for cast_v, scale_v in (node.operands, node.operands[::-1]):
            cast = producer_of(cast_v, "cast")
            smul = producer_of(scale_v, "mul")
            if cast is None or smul is None or not cast.attrs["to"].is_float:
                continue
            mi = producer_of(cast.operands[0], "matmul_integer")
            if mi is None:
                continue
            xq, w = mi.arg("a"), mi.arg("b")
            dyn = producer_of(xq, "dynamic_quantize")
            if dyn is None or mi.arg("a_zero_point") is not dyn.results[2] or rw.const(w) is None:
                continue
            w_zp = mi.arg("b_zero_point")
            if w_zp is not None and rw.const(w_zp) is None:
                continue
            a, b = smul.operands
            w_scale = b if a is dyn.results[1] else a if b is dyn.results[1] else None
            if w_scale is None or rw.const(w_scale) is None or w.type.rank != 2:
                continue
            if w_scale.type.rank == 0 or w_scale.type.shape == (1,):
                gran = {"granularity": "tensor"}
            elif w_scale.type.shape == (w.type.shape[1],):
                gran = {"granularity": "channel", "axis": 1}
            else:
                continue
            if w_zp is not None and w_zp.type.shape not in ((), (1,), w_scale.type.shape):
                continue
            w_scheme = QuantScheme(dtype=w.type.dtype, symmetric=w_zp is None,
                                   zero_point_type=None if w_zp is None else w_zp.type.dtype,
                                   scale_type=w_scale.type.dtype, **gran)
            y = _qmatmul(rw, node, dyn.operands[0], w, w_scale, w_zp, None, None, None, None,
                         w_scheme, "dynamic", U8_PER_TENSOR.replace(scale_type=w_scale.type.dtype),
                         result_type=node.result.type)
            rw.replace(node, [y])
            return True
        return False


class FoldBiasIntoQmatmul(RewritePattern):
    op = "add"

    def rewrite(self, node, rw):
        for qv, bias in (node.operands, node.operands[::-1]):
            qmm = producer_of(qv, "qmatmul")
            if qmm is None or qmm.arg("bias") is not None or not rw.single_use(qv):
                continue
            b = rw.const(bias)
            n = qmm.arg("w").type.shape[1]
            if b is None or bias.type.shape != (n,) or bias.type.dtype != qv.type.dtype:
                continue
            operands = list(qmm.operands) + [None] * (8 - len(qmm.operands))
            operands[operand_index("qmatmul", "bias")] = bias
            y = rw.create("qmatmul", operands, dict(qmm.attrs), before=node, hint="qmm",
                          result_types=[node.result.type]).result
            rw.replace(node, [y])
            return True
        return False


@register_pass("fuse-dequant")
@dataclass
class FuseDequantPass(Pass):
    """Fuse dequantize→matmul, MatMulNBits, QLinearMatMul and dynamic int8 into qmatmul."""

    bias: bool = True  # also fold a following constant bias add

    def run(self, module: Module) -> Module:
        patterns = [FuseDequantMatmul(), FuseQLinearMatmul(), FuseDynamicMatmulInteger()]
        if self.bias:
            patterns.append(FoldBiasIntoQmatmul())
        n = apply_patterns(module, patterns)
        record_stat(module, self.name, rewrites=n,
                    qmatmuls=sum(1 for nd in module.main.nodes if nd.op == "qmatmul"))
        return module
