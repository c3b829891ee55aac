"""What an FPGA design is, read from the IR: its chain of layers and each layer's weights.

The HLS backend, its bit-accurate model, its tuning space and the ``hls-fixed-point`` pass all
read the design through these functions; they live with the backend so that the pass imports
the backend and never the reverse (one-way imports: ``passes/`` -> ``codegen/``).
"""
from __future__ import annotations

import math

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import constant_value
from qcompiler.pipeline import PassError


def int_bits_for(bound: float) -> int:
    """Integer bits (sign included) of a signed fixed-point type that holds [-bound, bound]."""
    return max(1, math.floor(math.log2(bound)) + 2) if bound > 0 else 1


def codes_per_word(bits: int) -> int:
    """Codes in one 32-bit word: a power of two so that every group is whole words."""
    return 1 << int(math.floor(math.log2(32 // bits)))


def design_layers(module: Module) -> list:
    """The qmatmuls of an FPGA design in order, each with whether a relu follows it.

    The design is a chain: input → qmatmul → [relu] → qmatmul → … → output. Anything else is
    refused with the op and value it found.
    """
    fn = module.main
    if len(fn.args) != 1 or len(fn.outputs) != 1:
        raise PassError("an FPGA design takes one input and gives one output; "
                        f"@main has {len(fn.args)} inputs and {len(fn.outputs)} outputs")
    layers = []
    users = fn.users()
    for node in fn.nodes:
        if node.op == "constant":
            continue
        if node.op == "qmatmul" and node.attrs.get("x_norm"):
            raise PassError(f"%{node.result.name} = qmatmul normalizes its input "
                            f"(x_norm={node.attrs['x_norm']}); the HLS backend does not")
        if node.op == "qmatmul":
            layers.append([node, False])
        elif node.op == "relu" and layers and node.operands[0] is layers[-1][0].result \
                and not layers[-1][1]:
            layers[-1][1] = True
        else:
            raise PassError(f"the HLS backend supports chains of qmatmul and relu; "
                            f"%{node.results[0].name} = {node.op}(...) is not supported")
        if len(users.get(node.results[0], [])) > 1:
            raise PassError(f"%{node.results[0].name} has several users; the HLS backend "
                            "supports a chain of layers")
    if not layers:
        raise PassError("no qmatmul to put on the FPGA (run quantize-weights/fuse-dequant first)")
    return [(n, relu) for n, relu in layers]


def layer_weights(module: Module, node) -> dict:
    """Codes [K, N], per-group scales and zero points [G, N], bias [N] and g_idx of a qmatmul."""
    scheme = node.attrs["w_scheme"]
    where = f"%{node.result.name} = qmatmul"
    if node.attrs["act"] != "float":
        raise PassError(f"{where}: the HLS backend takes float activations (act=float)")
    if not scheme.dtype.is_integer or scheme.bits > 8:
        raise PassError(f"{where}: weights of type {scheme.dtype} (the HLS backend takes "
                        "integer codes of 2 to 8 bits)")
    if node.arg("w").type.layout is not None:
        raise PassError(f"{where}: the weight already has a layout")
    codes = constant_value(module, node.arg("w"))
    scale = constant_value(module, node.arg("w_scale"))
    zp = constant_value(module, node.arg("w_zero_point"))
    g_idx = constant_value(module, node.arg("g_idx"))
    bias = constant_value(module, node.arg("bias"))
    if codes is None or scale is None:
        raise PassError(f"{where}: weights and scales must be constants")
    if zp is not None and not zp.dtype.kind in "iu":
        raise PassError(f"{where}: float zero points are not supported by the HLS backend")
    k, n = codes.shape
    scale = np.asarray(scale, np.float64)
    if scheme.granularity == "group" and scheme.axis != 0:
        raise PassError(f"{where}: groups along N (axis 1) are not supported by the HLS backend")
    if scheme.granularity == "group":
        group = scheme.block_size
        scales = scale.reshape(-1, n)
        zps = None if zp is None else np.asarray(zp, np.int64).reshape(-1, n)
    else:
        group = k  # one scale per column (per-channel) or for the whole tensor
        scales = np.broadcast_to(scale.reshape(1, -1), (1, n))
        zps = None if zp is None else np.broadcast_to(np.asarray(zp, np.int64).reshape(1, -1),
                                                      (1, n))
    return {"codes": np.asarray(codes, np.int64), "scales": scales, "zps": zps,
            "bias": None if bias is None else np.asarray(bias, np.float64), "group": group,
            "g_idx": None if g_idx is None else np.asarray(g_idx, np.int64), "scheme": scheme}
