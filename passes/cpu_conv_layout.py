"""cpu-conv-layout: qconv weights packed at compile time for the CPU's conv kernels.

For each ``qconv`` with constant weights that a packed kernel takes on the target
(``codegen.cpu.conv.conv_variant``), the weight operand becomes the kernel's layout
(``runtime.reference.pack_conv_weights``) and ``config`` records ``w_shape`` (the logical
[M, C/g, KH, KW]) and ``w_layout``:

- ``vnni`` (AVX-512 VNNI, 2+ input and 8+ output channels per group): int8
  ``[g, M/g/16, KH, KW, C/g/4, 16, 4]`` of ``w - w_shift`` (128 for unsigned codes, else 0;
  ``config.w_shift``);
- ``madd`` (x86 targets without VNNI, 2+ input and 4+ output channels per group): int16
  ``[g, M/g/8, KH, KW, C/g/2, 8, 2]`` of ``w - wzp`` (the weights centred on their zero
  points, constant or absent; ``config.w_centred``).

The values do not change: the reference unpacks, the kernel reads the packed array directly
instead of repacking the weights on every call. Activations are NCHW, or NHWC where
``conv-channels-last`` converted the function (before this pass); the kernel repacks them per
call (NHWC per group, 4- or 2-channel blocks, padded: from NHWC a copy of whole rows).

A statically quantized classifier qmatmul becomes a 1 x 1 qconv before this pass
(``static-qmatmul-as-qconv``), so its weights are packed here too.

Option: ``target`` (a cpu target; default ``cpu``, the host).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import constant_node, constant_value, operand_index
from qcompiler.ir.types import TensorType, elem
from qcompiler.pipeline import Pass, record_stat, register_pass



@register_pass("cpu-conv-layout")
@dataclass
class CPUConvLayoutPass(Pass):
    """qconv weights → the vnni or madd kernel's packed layout (compile time)."""

    target: str = "cpu"

    def run(self, module: Module) -> Module:
        from qcompiler.codegen.cpu.conv import (MADD_IC_BLOCK, MADD_OC_BLOCK, MADD_W_LAYOUT,
                                                VNNI_W_LAYOUT, conv_variant, conv_w_shift)
        from qcompiler.codegen.cpu.host import target_cpu
        from qcompiler.runtime.reference import pack_conv_weights

        cpu = target_cpu(self.backend_target("cpu"))
        vnni = cpu["vnni"]
        avx2 = cpu["arch"] == "x86_64"   # (every x86 target has AVX2; madd where no VNNI)
        packed = 0
        for fn in module.functions:
            for node in list(fn.nodes):
                if node.op != "qconv" or "w_shape" in (node.attrs.get("config") or {}):
                    continue
                w = constant_value(module, node.arg("w"))
                if w is None or node.arg("w").type.rank != 4:
                    continue
                variant = conv_variant(node, vnni, avx2=avx2)
                wzp_v = node.arg("w_zero_point")
                wzp = 0 if wzp_v is None else constant_value(module, wzp_v)
                if variant == "vnni":
                    shift = conv_w_shift(node)
                    p = pack_conv_weights(np.asarray(w), node.attrs["group"], shift)
                    cfg = {"w_shift": shift, "w_layout": VNNI_W_LAYOUT}
                elif variant == "madd" and wzp is not None:
                    p = pack_conv_weights(np.asarray(w), node.attrs["group"], wzp,
                                          MADD_OC_BLOCK, MADD_IC_BLOCK, np.int16)
                    cfg = {"w_centred": True, "w_layout": MADD_W_LAYOUT}
                else:
                    continue
                w_node = constant_node(fn, module, p, TensorType(p.shape, elem(str(p.dtype)
                                       .replace("int", "i"))),
                                       name_hint=f"{node.result.name}.w_packed", before=node)
                ops = list(node.operands)
                ops[operand_index("qconv", "w")] = w_node.result
                node.operands = ops
                node.attrs["config"] = {**(node.attrs.get("config") or {}),
                                        "w_shape": [int(d) for d in w.shape], **cfg}
                packed += 1
            fn.remove_dead_nodes()
        module.drop_unused_constants()
        record_stat(module, self.name, packed=packed)
        return module
