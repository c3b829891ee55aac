"""A numpy model of what the generated kernel computes from the packed constants.

It reads the packed operands exactly as the kernel does (``layout.unpack_codes``, the permuted
scale and zero tables, the K permutation), so comparing it with the reference interpreter on
the module before ``reorder-weights`` checks the layout and the packing without a GPU.
"""
from __future__ import annotations

import numpy as np

from qcompiler.codegen.cuda import layout as L
from qcompiler.ir.core import constant_value


def decode_weight(module, node) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(unsigned codes [Kp, Np], zero [Kp, Np] (after the bias), scale [Kp, Np] or [Np]
    (epilogue), perm or None) as the kernel sees them."""
    lay = node.arg("w").type.layout
    cb, kp, np_ = lay.get("container_bits"), lay.get("k_pad"), lay.get("n_pad")
    packed = constant_value(module, node.arg("w"))
    words = np.ascontiguousarray(packed).view(np.uint32).reshape(kp // 16, np_ // 64, cb // 4,
                                                                 32, 4)
    u = L.unpack_codes(words, cb)
    group = lay.get("group")
    row_of_k = np.arange(kp) // group
    zero_v = node.arg("w_zero_point")
    zeros = constant_value(module, zero_v) if zero_v is not None else None
    if zeros is not None:
        z = L.unpermute_group_rows(np.asarray(zeros, np.float32))[row_of_k]
    else:
        z = np.full((kp, np_), float(lay.get("zero_const")), np.float32)
    s = np.asarray(constant_value(module, node.arg("w_scale")), np.float32)
    if lay.get("scale_at") == "registers":
        s = L.unpermute_group_rows(s)[row_of_k]
    perm = constant_value(module, node.arg("g_idx")) if node.arg("g_idx") is not None else None
    return u, z, s, perm


def emulate(module, node, x: np.ndarray) -> np.ndarray:
    """y as the kernel computes it: w rounded to x's type per element (the register dequant),
    products accumulated in fp32, per-channel scale and bias in fp32, rounded once."""
    lay = node.arg("w").type.layout
    k, n, kp = lay.get("k"), lay.get("n"), lay.get("k_pad")
    u, z, s, perm = decode_weight(module, node)
    x2 = x.reshape(-1, k)
    xp = np.zeros((x2.shape[0], kp), np.float32)
    xp[:, :k] = (x2[:, perm] if perm is not None else x2).astype(np.float32)
    v = u.astype(np.float32) - z
    if lay.get("scale_at") == "registers":
        w = (v * s).astype(x.dtype).astype(np.float32)
        y = xp @ w
    else:
        y = (xp @ v) * s[None, :]
    y = y[:, :n]
    bias_v = node.arg("bias")
    if bias_v is not None:
        y = y + constant_value(module, bias_v)
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)
