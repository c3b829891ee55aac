"""cuda-conv-layout: qconv weights packed at compile time for the CUDA conv kernels.

For each 2-D ``qconv`` with constant weights, zero points and bias (``runtime.reference``
``pack_conv_weights_cuda``):

- one group: ``cuda_igemm_mk``, int8 [M, Kp] with k = (kh * KW + kw) * C + c (the implicit
  GEMM's B operand, K contiguous per output channel, padded to the mma's K step of 32);
- depthwise with a channel count that is a multiple of 4: ``cuda_dw_t4``, int8
  [ceil(KH * KW / 4), M, 4] (each channel's taps four to a word: the direct kernel sums them
  with dp4a);
- other groups: ``cuda_direct_khwcm``, int8 [KH, KW, C/g, M] (a tap's output channels
  contiguous: the direct kernel's threads read consecutive channels).

The weights are stored centred on their zero points (``w - w_zp[m]``, which must fit int8:
always true for int4 codes and for int8 codes without a zero point), and the bias operand
becomes ``bias - x_zp * sum_k (w - w_zp[m])`` (i32), so a kernel sums the raw codes
``x * w'`` with padding read as ``x_zp``: padded taps then add ``x_zp * w'``, which the
folded term takes back out. ``config`` records ``w_shape`` (the logical [M, C/g, KH, KW]),
``w_layout``, ``w_centred`` and ``bias_folds_x_zp``; the reference decodes them, so the
module still means what it meant.

One-group qconvs on channels-last x whose channel count is not a multiple of 4 get x through
a constant ``pad`` of the channel axis and weights padded with zeros to match (the kernel
then loads 4-byte words of a tap's channels instead of single bytes: the 3-channel stem of an
image model). Where that leaves 4 channels, an even stride and an even width, without
dilation (the stems of ResNet and MobileNet), the weights go to ``cuda_igemm_rows``: each
kernel row's taps in a row of 4k slots, shifted by ``lead`` slots so that every output's
window row starts at an even pixel (``config`` records ``w_row_taps`` and ``w_lead``); the
kernel then loads a window row as 8-byte pairs of pixels, half the copies of 4-byte words,
for the same padded K (7 x 7: 224).

A qconv that does not fit (non-constant weights or zero points, weights that do not fit int8
once centred, an i32 bias or raw sum that could overflow) is left as it is; the CUDA op
library then refuses it by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import constant_node, constant_value, operand_index
from qcompiler.ir.types import TensorType, elem
from qcompiler.pipeline import Pass, record_stat, register_pass

I32 = np.iinfo(np.int32)
CHANNEL_MULTIPLE = 4  # the implicit GEMM's smallest vector load: 4 channels of one tap


def cuda_conv_variant(group: int) -> str:
    """The kernel a qconv takes: the implicit GEMM for one group, else the direct kernel."""
    return "igemm" if group == 1 else "direct"


def cuda_weight_layout(group: int, m: int, cg: int, c) -> str:
    """The weights' layout: the implicit GEMM's for one group; for a depthwise layer whose
    channels come in fours, taps four to a word (the direct kernel's dp4a form); else the
    direct kernel's [KH, KW, C/g, M]."""
    if cuda_conv_variant(group) == "igemm":
        return "cuda_igemm_mk"
    if cg == 1 and m == c and isinstance(c, int) and c % 4 == 0:
        return "cuda_dw_t4"
    return "cuda_direct_khwcm"


@register_pass("cuda-conv-layout")
@dataclass
class CudaConvLayoutPass(Pass):
    """qconv weights → the CUDA kernels' centred int8 layouts, x_zp folded into the bias."""

    def run(self, module: Module) -> Module:
        packed = 0
        for fn in module.functions:
            for node in list(fn.nodes):
                if node.op == "qconv" and "w_layout" not in (node.attrs.get("config") or {}):
                    packed += _pack(fn, module, node)
            fn.remove_dead_nodes()
        module.drop_unused_constants()
        record_stat(module, self.name, packed=packed)
        return module


def _const(module, v):
    return None if v is None else constant_value(module, v)


def _pack(fn, module: Module, node) -> int:
    from qcompiler.runtime.reference import cuda_igemm_rows, pack_conv_weights_cuda

    w_v, xzp_v, wzp_v, bias_v = (node.arg(k) for k in ("w", "x_zero_point", "w_zero_point",
                                                      "bias"))
    if w_v.type.rank != 4:
        return 0
    w, xzp = _const(module, w_v), _const(module, xzp_v)
    wzp = _const(module, wzp_v) if wzp_v is not None else np.zeros(1, np.int64)
    bias = _const(module, bias_v) if bias_v is not None else np.zeros(1, np.int64)
    if w is None or xzp is None or wzp is None or bias is None or np.asarray(xzp).size != 1:
        return 0
    w = np.asarray(w, np.int64)
    m = w.shape[0]
    centred = w - np.broadcast_to(np.asarray(wzp, np.int64).reshape(-1), (m,)).reshape(m, 1, 1, 1)
    if centred.min(initial=0) < -128 or centred.max(initial=0) > 127:
        return 0
    x_bits = 8
    k = int(np.prod(w.shape[1:]))
    if k * (2 ** x_bits - 1) * 128 > I32.max:  # the raw sum x * w' must stay in i32
        return 0
    folded = (np.broadcast_to(np.asarray(bias, np.int64).reshape(-1), (m,))
              - int(np.asarray(xzp).reshape(-1)[0]) * centred.reshape(m, -1).sum(axis=1))
    if folded.min() < I32.min or folded.max() > I32.max:
        return 0
    name = node.result.name
    x = node.arg("x")
    # x's channel count where it is channels-last (the CUDA kernels' layout), else None
    c = x.type.shape[3] if x.type.rank == 4 and node.attrs.get("channels_last") else None
    layout = cuda_weight_layout(node.attrs["group"], m, w.shape[1], c)
    if layout == "cuda_igemm_mk" and isinstance(c, int) and c % CHANNEL_MULTIPLE:
        # A channel count not a multiple of 4 (an RGB stem's 3): x and the weights padded to
        # the next multiple, so that the kernel loads a tap's channels as 4-byte words
        # instead of gathering bytes. The padded weights are 0, so the padded channel adds
        # nothing whatever it holds (and the bias fold is unchanged).
        extra = -c % CHANNEL_MULTIPLE
        pads = constant_node(fn, module, np.array([0] * 7 + [extra], np.int64),
                             TensorType((8,), elem("i64")), name_hint=f"{name}.channel_pads",
                             before=node)
        padded = x.type.shape[:3] + (c + extra,)
        x_padded = fn.make_node("pad", [x, pads.result], [TensorType(padded, x.type.dtype)],
                                {"mode": "constant"}, before=node).result
        node.operands = [x_padded] + list(node.operands[1:])
        centred = np.pad(centred, ((0, 0), (0, extra), (0, 0), (0, 0)))
    # (centred.shape[1]: the channels after that padding)
    rows = cuda_igemm_rows(centred.shape[1], x.type.shape[2], centred.shape[3],
                           node.attrs["strides"][1], node.attrs["pads"][1],
                           node.attrs["dilations"][1]) \
        if layout == "cuda_igemm_mk" and isinstance(c, int) else None
    if rows is not None:
        layout = "cuda_igemm_rows"
    p = pack_conv_weights_cuda(centred, layout, *(rows or ()))
    w_node = constant_node(fn, module, p, TensorType(p.shape, elem("i8")),
                           name_hint=f"{name}.w_cuda", before=node)
    b_node = constant_node(fn, module, folded.astype(np.int32), TensorType((m,), elem("i32")),
                           name_hint=f"{name}.bias_folded", before=node)
    ops = list(node.operands) + [None] * (12 - len(node.operands))
    ops[operand_index("qconv", "w")] = w_node.result
    ops[operand_index("qconv", "bias")] = b_node.result
    while ops and ops[-1] is None:
        ops.pop()
    node.operands = ops
    node.attrs["config"] = {**(node.attrs.get("config") or {}),
                            "w_shape": [int(d) for d in centred.shape], "w_layout": layout,
                            "w_centred": True, "bias_folds_x_zp": True,
                            **({"w_row_taps": rows[0], "w_lead": rows[1]} if rows else {})}
    return 1
