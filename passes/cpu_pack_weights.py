"""cpu-pack-weights: store each CPU qmatmul's weights in the layout its kernel reads.

Needs ``cpu-schedule`` first (it reads ``config.numerics`` and ``config.n_tile``). For every
qmatmul with ``config.impl = "tvm"`` the operands become new constants:

- codes (operand 1): container codes packed several per byte, ``#layout<cpu_exact, ...>``,
  ``#layout<cpu_vnni, ...>`` or (numerics=lut: bit planes of table indices)
  ``#layout<cpu_lut, ...>`` with the logical ``k``/``n``, the padded ``k_pad``, the group
  ``block`` and ``container_bits`` (lut: also ``bits`` and ``table_group``;
  ``codegen/cpu/layout.py`` describes the layouts);
  with act-order the rows are stored sorted by group (the runner permutes x's columns);
- scales (operand 2): float32 ``[tiles, groups, n_tile]``, ``#layout<cpu_tiled, ...>``; with
  ``scale_dtype=auto`` (the default) float16 for the int8 and lut kernels on x86 where every
  scale is 0 or an f16 normal (a relative rounding of at most 2^-11, below the int8
  activations' own; for lut the zero-point factors it computes at load, s times the codes'
  centre minus zc, must be too; the code layout then prints ``scale_dtype=f16``);
  ``scale_dtype=f32`` keeps float32;
- zero points (operand 3, added for symmetric schemes too): the zero point in container units
  (``z - lo``; MatMulNBits' implied zero point included) as u8, ``#layout<cpu_tiled>``.

The packed weight's element type (u8) and layout describe the storage; the node's ``w_scheme``
stays the model's scheme. g_idx (operand 4) stays: the permutation is derived from it. The
old constants are removed when nothing else uses them. Nodes whose config says
``impl = "reference"`` are left as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import constant_node, constant_value, operand_index
from qcompiler.ir.types import TensorType, elem
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass


@register_pass("cpu-pack-weights")
@dataclass
class CPUPackWeightsPass(Pass):
    """Pack the weights of each CPU qmatmul into its kernel's layout (shown as #layout<cpu_*>)."""

    target: str = "cpu"
    scale_dtype: str = "auto"  # auto: f16 for x86 int8 and lut kernels where they fit; f32

    def run(self, module: Module) -> Module:
        if self.scale_dtype not in ("auto", "f32"):
            raise PassError(f"cpu-pack-weights: scale_dtype={self.scale_dtype!r} (auto or f32)")
        from qcompiler.codegen.cpu import layout, runtime, tuning
        from qcompiler.codegen.cpu.tuning import node_key
        tgt = self.backend_target("cpu")
        fn = module.main
        packed_bytes = 0
        for node in list(fn.nodes):
            if node.op != "qmatmul":
                continue
            cfg = node.attrs.get("config", {})
            if "impl" not in cfg:
                raise PassError(f"cpu-pack-weights: %{node.result.name} has no CPU config; "
                                "run cpu-schedule first")
            if cfg["impl"] != "tvm" or node.arg("w").type.layout is not None:
                continue
            try:
                p = tuning.with_table_group(
                    tuning.problem(tgt, node_key(node, 1, cfg["numerics"])), cfg)
            except layout.Unsupported as e:
                raise PassError(f"cpu-pack-weights: %{node.result.name}: {e}") from None
            if p.n_tile != cfg["n_tile"]:
                raise PassError(f"cpu-pack-weights: %{node.result.name}: config n_tile "
                                f"{cfg['n_tile']} but target {tgt.name} needs {p.n_tile}")
            q = constant_value(module, node.arg("w"))
            scale = constant_value(module, node.arg("w_scale"))
            zp = constant_value(module, node.arg("w_zero_point"))
            g_idx = constant_value(module, node.arg("g_idx"))
            packed = runtime.pack_weights(p, q, scale, zp, g_idx)
            scheme = node.attrs["w_scheme"]
            bl = p.blocking
            zero_code = packed["zero_code"]
            p, packed = runtime.store_scales(p, packed, self.scale_dtype)
            scale_f16 = p.scale_dtype == "float16"
            code_layout = layout.code_layout(
                p.numerics, codes=scheme.dtype.name, k=p.k, n=p.n, k_pad=bl.k_pad,
                block=bl.block, n_tile=p.n_tile, container_bits=p.container_bits,
                act_order=int(scheme.act_order),
                # one zero code for the whole tensor (symmetric schemes): kernels take it
                # as a constant
                **({"zero_code": zero_code} if zero_code is not None else {}),
                # scales stored as f16 (the kernels convert them as they load)
                **({"scale_dtype": "f16"} if scale_f16 else {}),
                **({"bits": scheme.bits, "table_group": p.table_group}
                   if p.numerics == "lut" else {}),
                # the odd plane in quads of table groups (codegen/cpu/kernels.py)
                **({"single_quads": 1} if p.single_quads else {}))
            # The stored elements are bytes now: u8 and the layout (which names the code type)
            # describe them, w_scheme stays the model's; the packing already applied scales
            # and zero points (in container units) into the tiled tables.
            # qmatmul weights are 2-D: [tiles, bytes of one column tile].
            w_bytes = np.ascontiguousarray(packed["w"]).view(np.uint8).reshape(
                packed["w"].shape[0], -1)
            w_type = TensorType(tuple(w_bytes.shape), elem("u8"), None, code_layout)
            tiled = layout.tiled_layout(p.n_tile)
            f32 = elem("f32")
            base = node.result.name
            w_node = constant_node(fn, module, w_bytes, w_type, name_hint=f"{base}.w_packed",
                                   before=node)
            scales = packed["s"]
            s_node = constant_node(fn, module, scales,
                                   TensorType(tuple(scales.shape),
                                              elem("f16") if scale_f16 else f32, None, tiled),
                                   name_hint=f"{base}.scale_tiled", before=node)
            z_node = constant_node(fn, module, packed["zc"],
                                   TensorType(tuple(packed["zc"].shape), elem("u8"), None,
                                              tiled),
                                   name_hint=f"{base}.zero_tiled", before=node)
            ops = list(node.operands) + [None] * (8 - len(node.operands))
            for name, v in (("w", w_node.result), ("w_scale", s_node.result),
                            ("w_zero_point", z_node.result)):
                ops[operand_index("qmatmul", name)] = v
            while ops and ops[-1] is None:
                ops.pop()
            node.operands = ops
            packed_bytes += int(packed["w"].nbytes)
        fn.remove_dead_nodes()
        for name in [c for c in module.constants if not _used(module, c)]:
            del module.constants[name]
        record_stat(module, self.name, packed_weight_bytes=packed_bytes)
        return module


def _used(module: Module, const_name: str) -> bool:
    return any(n.op == "constant" and n.attrs.get("name") == const_name
               for f in module.functions for n in f.nodes)
