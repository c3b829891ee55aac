"""quantize-weights: round-to-nearest quantization of the constant weights of float matmuls.

Each ``matmul(x, W)`` with a constant float ``W [K, N]`` becomes
``matmul(x, dequantize(codes, scales, zero_points))``; run ``fuse-dequant`` after it to get
``qmatmul``. Options:

- ``bits``: 2, 3, 4 or 8;
- ``group``: elements per scale along ``group_axis``; 0 means one scale per output channel;
- ``group_axis``: ``k`` groups input channels (one scale per ``group`` rows of K, for each
  output column: GPTQ/AWQ/MatMulNBits) or ``n`` groups output channels (for each row of K);
- ``symmetric``: signed codes in [-(2^(b-1) - 1), 2^(b-1) - 1], ``scale = absmax / (2^(b-1) - 1)``;
  otherwise unsigned codes with a zero point over ``[min(w, 0), max(w, 0)]`` (the range
  always holds 0 so that zeros stay exact);
- ``min_elements``: leave smaller weights in float;
- ``accuracy_level``: stamped on each quantized matmul (and the qmatmul ``fuse-dequant`` makes
  of it) as MatMulNBits's attribute would be: 4 permits int8 activations (the backends' int8
  kernels); 0 (default) leaves it unset: float activations.

Rounding is half to even, as ONNX QuantizeLinear does. A ragged last group (K not a
multiple of ``group``) gets its own scale over the elements it has.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module, QuantScheme, TensorType, elem
from qcompiler.ir.rewrite import RewritePattern, apply_patterns
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass


def quantize_rtn(w: np.ndarray, bits: int, group: int, axis: int, symmetric: bool):
    """Round-to-nearest codes, scales and zero points of ``w [K, N]``.

    Returns ``(codes, scales, zero_points or None)`` in the ONNX blocked layout: scales have
    ``ceil(D_axis / group)`` on ``axis`` (or shape ``[N]`` for per-channel, group == 0).
    """
    w = w.astype(np.float32)
    if group == 0:
        # Per output channel: reduce over K.
        mx, mn = w.max(axis=0), w.min(axis=0)
        expand = lambda a: a[None, :]  # noqa: E731
    else:
        d = w.shape[axis]
        nblk = -(-d // group)
        pad = nblk * group - d
        wp = np.moveaxis(w, axis, 0)
        # Pad the ragged last group with its own first element so it does not move the range.
        if pad:
            wp = np.concatenate([wp, np.repeat(wp[-1:], pad, axis=0)], axis=0)
        blocks = wp.reshape(nblk, group, -1)
        mx, mn = blocks.max(axis=1), blocks.min(axis=1)  # [nblk, other]
        if axis == 1:
            mx, mn = mx.T, mn.T  # scales are [K, nblk] for groups along N

        def expand(a):
            return np.repeat(a, group, axis=axis).take(range(d), axis=axis)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        absmax = np.maximum(np.abs(mx), np.abs(mn))
        scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        codes = np.clip(np.rint(w / expand(scale)), -qmax, qmax).astype(np.int8)
        return codes, scale, None
    qmax = (1 << bits) - 1
    hi, lo = np.maximum(mx, 0), np.minimum(mn, 0)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.uint8)
    codes = np.clip(np.rint(w / expand(scale)) + expand(zp), 0, qmax).astype(np.uint8)
    return codes, scale, zp


class QuantizeMatmulWeight(RewritePattern):
    op = "matmul"

    def __init__(self, options: "QuantizeWeightsPass"):
        self.o = options

    def rewrite(self, node, rw):
        wv = node.arg("b")
        w = rw.const(wv)
        if w is None or wv.type.rank != 2 or not wv.type.dtype.is_float:
            return False
        if wv.type.dtype.bits < 16 or w.size < self.o.min_elements:
            return False  # fp8/fp4 are already low precision
        o = self.o
        axis = 0 if o.group_axis == "k" else 1
        group = o.group if o.group and o.group < w.shape[axis] else 0
        codes, scale, zp = quantize_rtn(np.asarray(w, np.float32), o.bits, group, axis,
                                        o.symmetric)
        code_type = elem(f"i{o.bits}" if o.symmetric else f"u{o.bits}")
        fdtype = wv.type.dtype
        if group == 0:
            gran = {"granularity": "channel", "axis": 1}
        else:
            gran = {"granularity": "group", "axis": axis, "block_size": group}
        scheme = QuantScheme(dtype=code_type, symmetric=o.symmetric,
                             zero_point_type=None if o.symmetric else code_type,
                             scale_type=fdtype, **gran)
        base = wv.name
        wq = rw.constant(codes, TensorType(codes.shape, code_type), node, f"{base}.q")
        s = rw.constant(scale.astype(fdtype.np_dtype), TensorType(scale.shape, fdtype), node,
                        f"{base}.scale")
        z = None if zp is None else rw.constant(zp, TensorType(zp.shape, code_type), node,
                                                f"{base}.zp")
        dq = rw.create("dequantize", [wq, s, z], {"scheme": scheme, "out": fdtype}, before=node,
                       hint=f"{base}.dq")
        mm = rw.create("matmul", [node.operands[0], dq.result],
                       {"accuracy_level": o.accuracy_level} if o.accuracy_level > 1 else None,
                       before=node, hint="mm", result_types=[node.result.type])
        rw.replace(node, [mm.result])
        return True


@register_pass("quantize-weights")
@dataclass
class QuantizeWeightsPass(Pass):
    """Round-to-nearest quantization of constant matmul weights (bits, group, symmetric)."""

    bits: int = 4
    group: int = 128
    group_axis: str = "k"
    symmetric: bool = False
    min_elements: int = 0
    accuracy_level: int = 0

    def run(self, module: Module) -> Module:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PassError(f"quantize-weights: accuracy_level={self.accuracy_level} is not "
                            "one of 0..4 (MatMulNBits's levels)")
        if self.bits not in (2, 3, 4, 8):
            raise PassError(f"quantize-weights: bits={self.bits} (use 2, 3, 4 or 8)")
        if self.group < 0:
            raise PassError(f"quantize-weights: group={self.group} must be >= 0")
        if self.group_axis not in ("k", "n"):
            raise PassError(f"quantize-weights: group_axis={self.group_axis!r} (use k or n)")
        n = apply_patterns(module, [QuantizeMatmulWeight(self)], max_iterations=1)
        record_stat(module, self.name, quantized=n)
        return module
