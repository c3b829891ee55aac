"""Single-qmatmul modules with random quantized weights: the test and benchmark cases of the
CUDA backend (GPTQ/AWQ-like formats), and the reference output to compare with."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Function, constant_node
from qcompiler.ir.ops import infer_types
from qcompiler.ir.types import QuantScheme, elem, tensor


@dataclass(frozen=True)
class Case:
    k: int
    n: int
    bits: int = 4
    signed: bool = False       # signed codes, symmetric (no zero point)
    zero_point: bool = True    # unsigned codes with a zero-point tensor (affine)
    group: int = 128           # 0: per-channel
    act_order: bool = False
    dtype: str = "f16"
    bias: bool = False
    scale_dtype: str = "f16"
    accuracy_level: int = 0    # 4: int8 activations permitted (MatMulNBits), see int8_model
    fp8: bool = False          # FP8 e4m3 weights (bits 8, symmetric; signed/zero_point unused)

    @property
    def name(self) -> str:
        w = "f8e4m3" if self.fp8 else f"{'i' if self.signed else 'u'}{self.bits}"
        g = f"g{self.group}" if self.group else "pc"
        extra = ("_zp" if self.zero_point and not self.signed else "") + \
            ("_ao" if self.act_order else "") + ("_bias" if self.bias else "")
        extra += f"_acc{self.accuracy_level}" if self.accuracy_level else ""
        return f"{w}{g}{extra}_{self.dtype}_k{self.k}_n{self.n}"

    def scheme(self) -> QuantScheme:
        if self.fp8:
            kw = dict(dtype=elem("f8e4m3fn"), symmetric=True, scale_type=elem(self.scale_dtype))
            if self.group:
                return QuantScheme(**kw, granularity="group", axis=0, block_size=self.group)
            return QuantScheme(**kw, granularity="channel", axis=1)
        affine = self.zero_point and not self.signed
        dt = elem(f"{'i' if self.signed else 'u'}{self.bits}")
        kw = dict(dtype=dt, symmetric=not affine, scale_type=elem(self.scale_dtype),
                  zero_point_type=dt if affine else None)
        if self.group:
            kw.update(granularity="group", axis=0, block_size=self.group,
                      act_order=self.act_order)
        else:
            kw.update(granularity="channel", axis=1)
        return QuantScheme(**kw)


def make_module(case: Case, seed: int = 0) -> Module:
    """``y[batch, N] = qmatmul(x[batch, K], w)`` with fresh random codes, scales and zeros."""
    rng = np.random.default_rng(seed)
    k, n = case.k, case.n
    scheme = case.scheme()
    # FP8 codes: e4m3 values of a normal spread up to ~400 (subnormals included), as if
    # ~448 / max|w| scaled them; the "range" below then sets scales near 1/(448 sqrt(K)).
    lo, hi = (-224, 224) if case.fp8 else scheme.dtype.int_range()
    m = Module("qmm")
    fn = m.add_function(Function("main"))
    x = fn.add_arg("x", tensor(["batch", k], case.dtype))
    if case.fp8:
        codes = np.clip(rng.standard_normal((k, n)) * 100.0, -448, 448).astype(scheme.dtype.np_dtype)
    else:
        codes = rng.integers(lo, hi + 1, (k, n)).astype(scheme.dtype.np_dtype)
    w = constant_node(fn, m, codes, tensor((k, n), scheme.dtype), "w").result
    groups = -(-k // case.group) if case.group else None
    sshape = (groups, n) if case.group else (n,)
    # Scales near 1/(range * sqrt(K)) keep y of order 1 in fp16.
    scale = (rng.uniform(0.5, 1.5, sshape) / ((hi - lo) * np.sqrt(k))).astype(
        elem(case.scale_dtype).np_dtype)
    s = constant_node(fn, m, scale, tensor(sshape, case.scale_dtype), "scales").result
    zp = None
    if scheme.zero_point_type is not None:
        zcodes = rng.integers(lo, hi + 1, sshape).astype(scheme.dtype.np_dtype)
        zp = constant_node(fn, m, zcodes, tensor(sshape, scheme.dtype), "zeros").result
    g_idx = None
    if case.act_order:
        # GPTQ desc_act: a random permutation of K assigned to groups in order.
        perm = rng.permutation(k)
        gi = np.empty(k, np.int64)
        gi[perm] = np.arange(k) // case.group
        g_idx = constant_node(fn, m, gi, tensor((k,), "i64"), "g_idx").result
    bias = None
    if case.bias:
        bias = constant_node(fn, m, rng.standard_normal(n).astype(np.float32),
                             tensor((n,), "f32"), "bias").result
    operands = [x, w, s, zp, g_idx, None, None, bias]
    attrs = {"w_scheme": scheme, "act": "float"}
    if case.accuracy_level > 1:
        attrs["accuracy_level"] = case.accuracy_level
    types = infer_types("qmatmul", [v.type if v is not None else None for v in operands],
                        attrs, [None] * 8)
    node = fn.make_node("qmatmul", operands, types, attrs, names=["y"])
    fn.set_outputs([node.result], ["y"])
    return m


def random_x(case: Case, m: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, case.k)).astype(elem(case.dtype).np_dtype)


def reference(module: Module, x: np.ndarray) -> np.ndarray:
    from qcompiler.runtime.reference import run

    return run(module, {"x": x})["y"]


def int8_model(module: Module, x: np.ndarray, node=None) -> np.ndarray:
    """What the CUDA int8-activation kernel computes (include/qcompiler/tiled_i8.cuh) for the
    qmatmul ``node`` of ``module`` (before packing; default: its only qmatmul) on x [M, K]:
    the product (bias included, no epilogue), in float64 then rounded to x's type.

    x's columns are put in the kernel's K order (the act-order permutation), padded to 64 and
    quantized per row and group (the weights' groups, or the whole row for per-channel
    scales) as ``numerics.quantize_int8_groups`` does; each group's integer sum of codes times
    the centred weight codes is scaled by the x scale and the weight scale (rounded to x's
    type, as the packed tables hold it); then the bias.
    """
    return _act8_model(module, x, node, fp8=False)


def fp8_model(module: Module, x: np.ndarray, node=None) -> np.ndarray:
    """``int8_model`` for the FP8-activation kernel (FP8 e4m3 weights): x quantized per row
    and group to e4m3 (nearest, ties to even) of x * (448 / max|x|), scale max|x| / 448, the
    products of e4m3 values summed exactly (the hardware's fp32 sums are less exact: compare
    with FP8_TOLERANCE)."""
    return _act8_model(module, x, node, fp8=True)


def _quantize_fp8_groups(x_groups: np.ndarray):
    """(e4m3 values as float64, scales [M, G]) of x [M, G, block] (the quantizer's f32 steps)."""
    import ml_dtypes

    amax = np.max(np.abs(x_groups), axis=-1)
    scale = np.where(amax > 0, amax * np.float32(1.0 / 448.0), np.float32(1.0)).astype(np.float32)
    inv = np.divide(np.float32(448.0), amax, out=np.zeros_like(amax), where=amax > 0)
    v = np.minimum(np.abs(x_groups * inv[..., None]), np.float32(448.0)) * np.sign(x_groups)
    return v.astype(ml_dtypes.float8_e4m3fn).astype(np.float64), scale


def _act8_model(module: Module, x: np.ndarray, node, fp8: bool) -> np.ndarray:
    from qcompiler.codegen.cuda.layout import K_ALIGN, act_order_permutation, pad_to
    from qcompiler.ir.core import constant_value
    from qcompiler.runtime import numerics

    if node is None:
        node = next(n for n in module.main.nodes if n.op == "qmatmul")
    scheme = node.attrs["w_scheme"]
    w = constant_value(module, node.arg("w"))
    scale = constant_value(module, node.arg("w_scale"))
    zp_v, gi_v, bias_v = node.arg("w_zero_point"), node.arg("g_idx"), node.arg("bias")
    k, n = w.shape
    k_pad = pad_to(k, K_ALIGN)
    g_idx = constant_value(module, gi_v) if gi_v is not None else None
    if node.attrs.get("x_norm"):  # fuse-norm-qmatmul: the kernel quantizes the normalized x
        from qcompiler.ir.ops import qmatmul_x_norm_operands
        from qcompiler.runtime.reference import x_normalize

        x = x_normalize(node, x, *(constant_value(module, v)
                                   for v in qmatmul_x_norm_operands(node)))
    if fp8:
        centred = np.asarray(w).astype(np.float64)  # e4m3 values, no zero point
    else:
        if zp_v is not None:
            zero = numerics.expand_scale(constant_value(module, zp_v), (k, n), scheme, g_idx)
        else:
            zero = np.full((k, n), scheme.implied_zero_point or 0)
        centred = w.astype(np.int64) - zero.astype(np.int64)
    perm = (act_order_permutation(g_idx, scheme.block_size) if g_idx is not None
            else np.arange(k))
    s_dtype = x.dtype
    group = scheme.block_size if scheme.granularity == "group" else k_pad
    groups = k_pad // group
    xp = np.zeros((x.shape[0], k_pad), np.float32)
    xp[:, :k] = x.astype(np.float32)[:, perm]
    x_groups = xp.reshape(x.shape[0], groups, group)
    if fp8:
        xq, xs = _quantize_fp8_groups(x_groups)
    else:
        xq = np.empty(x_groups.shape, np.int8)
        xs = np.empty((x.shape[0], groups), np.float32)
        numerics.quantize_int8_groups(x_groups, xq, xs)
        xq = xq.astype(np.int64)
    wc = np.zeros((k_pad, n), centred.dtype)
    wc[:k] = centred[perm]
    ws = np.asarray(scale).astype(s_dtype).astype(np.float64)
    y = np.zeros((x.shape[0], n))
    for g in range(groups):
        sums = xq[:, g] @ wc[g * group:(g + 1) * group]
        col_scale = ws[g] if scheme.granularity == "group" else ws
        y += sums * xs[:, g:g + 1].astype(np.float64) * col_scale
    if bias_v is not None:
        y += constant_value(module, bias_v).astype(np.float64)
    return y.astype(s_dtype)


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y64)):
        return float("inf")
    return float(np.linalg.norm(y64 - r64) / max(np.linalg.norm(r64), 1e-30))


# fp16 products rounded once (scale multiply) plus the output rounding: ~1e-3; bf16 ~1e-2.
TOLERANCE = {"f16": 2e-3, "bf16": 1.5e-2}
# The int8-activation kernel against int8_model: the same integer sums, so only the fp32
# order of the scaled group sums differs, which flips the output's rounding in a few
# elements (measured in the host emulation: at most 7e-6). int8's own error against the
# float reference is 2e-3 to 7e-3 on the test cases: this bound tells them apart.
INT8_TOLERANCE = {"f16": 2e-4, "bf16": 1e-3}
# The FP8-activation kernel against fp8_model: the hardware sums e4m3 products in fp32 with
# less than fp32's precision (the host emulation sums exactly: at most a few ulps of f16).
FP8_TOLERANCE = {"f16": 1e-3}
