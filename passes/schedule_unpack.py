"""schedule-unpack: choose how each packed qmatmul turns codes into MMA operands in registers.

Needs ``reorder-weights`` first (reads the weight's ``cuda_mma_b16`` layout). Writes into the
node's ``config``:

- ``unpack``: the register-level conversion of codes to x's float type
  - ``lop3-magic-f16``: 4-bit codes, fp16: one LOP3 ``(q & 0x000f000f) | 0x64006400`` per two
    codes gives exact ``1024 + c``; the high nibbles take an FMA by 1/16 (Marlin's trick);
  - ``shift-magic-bf16``: 4-bit codes, bf16: 7 mantissa bits cannot hold ``16c``, so one shift
    per nibble pair, then the same LOP3 with 0x4300 (``128 + c``);
  - ``prmt-f16``: 8-bit codes, fp16: PRMT puts each byte under 0x64 (``1024 + c``);
  - ``fp8-e4m3-f16``: FP8 e4m3 codes, fp16: PRMT, shift and LOP3 move each byte's bits into
    an f16 (its value / 2^8; reorder-weights folds the 2^8 into the scales);
  - ``shift-mask-f32``: anything else (8-bit codes with bf16, whose 128 + c is not exact):
    shift, mask, convert through fp32.
- ``scale_at``: ``registers`` (group scales multiply the B fragment before the MMA, after an
  exact subtraction of the zero point) or ``epilogue`` (per-channel/per-tensor scales multiply
  the fp32 accumulator once);
- ``zero_at``: ``registers`` (a zero-point table, subtracted exactly before the scale) or
  ``constant`` (one zero point for the whole weight, folded into the magic constant).
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.codegen.cuda.config import UNPACKS
from qcompiler.codegen.cuda.layout import LAYOUT_NAME
from qcompiler.ir import Module
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass



def choose_unpack(container_bits: int, dtype: str, codes: str = "") -> str:
    if codes == "f8e4m3fn":
        return "fp8-e4m3-f16"
    if container_bits == 4:
        return "lop3-magic-f16" if dtype == "f16" else "shift-magic-bf16"
    if container_bits == 8 and dtype == "f16":
        return "prmt-f16"
    return "shift-mask-f32"


@register_pass("schedule-unpack")
@dataclass
class ScheduleUnpackPass(Pass):
    """Choose the register-level unpack and where scales and zero points apply."""

    unpack: str = ""  # force one strategy (testing); "" chooses per node

    def run(self, module: Module) -> Module:
        if self.unpack and self.unpack not in UNPACKS:
            raise PassError(f"schedule-unpack: unpack={self.unpack!r}; one of {UNPACKS}")
        count = 0
        for node in module.main.nodes:
            if node.op != "qmatmul":
                continue
            lay = node.arg("w").type.layout
            if lay is None or lay.name != LAYOUT_NAME:
                raise PassError(f"schedule-unpack: %{node.result.name} has no {LAYOUT_NAME} "
                                "weight; run reorder-weights first")
            dtype = node.operands[0].type.dtype.name
            fp8 = lay.get("codes") == "f8e4m3fn"
            unpack = self.unpack or choose_unpack(lay.get("container_bits"), dtype,
                                                  lay.get("codes"))
            if fp8 != (unpack == "fp8-e4m3-f16"):
                raise PassError(f"schedule-unpack: {unpack} does not fit %{node.result.name} "
                                f"({lay.get('codes')} codes: FP8 e4m3 takes fp8-e4m3-f16 only)")
            if unpack == "lop3-magic-f16" and (lay.get("container_bits") != 4 or dtype != "f16") \
                    or unpack == "shift-magic-bf16" and (lay.get("container_bits") != 4
                                                         or dtype != "bf16") \
                    or unpack == "prmt-f16" and (lay.get("container_bits") != 8 or dtype != "f16"):
                raise PassError(f"schedule-unpack: {unpack} does not fit %{node.result.name} "
                                f"({lay.get('container_bits')}-bit containers, {dtype})")
            node.attrs["config"] = {
                **node.attrs.get("config", {}), "unpack": unpack,
                "scale_at": lay.get("scale_at"),
                "zero_at": "registers" if node.arg("w_zero_point") is not None else "constant",
            }
            count += 1
        record_stat(module, self.name, scheduled=count)
        return module
