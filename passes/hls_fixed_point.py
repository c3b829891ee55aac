"""hls-fixed-point: choose the fixed-point formats of every layer of an FPGA design.

Each ``qmatmul`` gets ``config`` entries that the HLS templates and the bit-accurate model
(``codegen/hls/numerics.py``) read; nothing about formats is decided later. Per layer:

- ``x``: the layer input, ``ap_fixed<x_width, x_int, AP_RND, AP_SAT>`` with ``frac_bits``
  fraction bits; the first layer's input range is ``input_range``, or with
  ``calibration=<path.npz>`` (sample model inputs: the array named like the model's input,
  or the file's only array) the largest |x| of those samples. Values beyond it saturate; the
  FPGA runner counts them (``module.last_run_stats["saturated"]``) and warns;
- ``part``: the exact sum of ``(code - zero_point) * x`` over one group (integer weights need
  no multiplier by a scale inside the group: one scale multiply per group, as in MixPE);
- ``scale``: the group scales rounded to ``scale_bits`` significant bits (``scale_frac``
  fraction bits, chosen per layer from the largest scale), emitted as exact integer codes;
- ``acc``: ``ap_fixed<acc_width, acc_int>`` (AP_TRN: each ``part * scale`` is floored to
  ``acc_frac_bits`` fraction bits); bias codes use the same format;
- ``y``: the layer output (the next layer's ``x``), rounded (AP_RND) and saturated.

Integer bits come from a worst-case interval bound, ``|y_n| <= R_x * sum_k |w_kn| + |b_n|``,
so no accumulator can overflow; the output format of a layer is the input format of the next.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcompiler.codegen.hls.config import MAX_EXACT_BITS
from qcompiler.codegen.hls.design import (codes_per_word, design_layers, int_bits_for,
                                          layer_weights)
from qcompiler.ir import Module
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass


def dequantized_abs_colsum(w: dict) -> np.ndarray:
    """sum_k |w_kn| of the dequantized weight (for the interval bound)."""
    codes, group = w["codes"], w["group"]
    k = codes.shape[0]
    gi = w["g_idx"] if w["g_idx"] is not None else np.arange(k) // group
    zp = 0 if w["zps"] is None else w["zps"][gi]
    return np.abs((codes - zp) * w["scales"][gi]).sum(axis=0)


def calibrated_range(path: str, input_name: str) -> float:
    """max |x| of the calibration data in ``path`` (a ``.npz`` of sample model inputs: the
    array named like the model's input, or its only array). Non-finite samples are refused."""
    import os

    from qcompiler.errors import InputError

    if not os.path.isfile(path):
        raise InputError(f"hls-fixed-point: calibration file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            name = input_name if input_name in names else (names[0] if len(names) == 1
                                                            else None)
            if name is None:
                raise InputError(f"hls-fixed-point: calibration file {path} holds {names}; "
                                 f"name the array {input_name!r} (the model input)")
            samples = np.asarray(data[name])
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"hls-fixed-point: calibration file {path} is not a readable .npz "
                         f"of arrays ({type(e).__name__})") from None
    if samples.dtype.kind not in "fiu" or samples.size == 0:
        raise InputError(f"hls-fixed-point: calibration array {name!r} in {path} has no "
                         f"numbers (dtype {samples.dtype}, shape {list(samples.shape)})")
    if not np.isfinite(samples).all():
        raise InputError(f"hls-fixed-point: calibration array {name!r} in {path} holds NaN or "
                         "infinite values")
    return float(np.abs(samples.astype(np.float64)).max())


@register_pass("hls-fixed-point")
@dataclass
class HLSFixedPointPass(Pass):
    """Choose ap_fixed formats per layer (inputs, partial sums, scales, accumulators)."""

    input_range: float = 8.0  # |model input| assumed at most this (beyond: saturation)
    frac_bits: int = 10  # fraction bits of every activation (layer inputs and outputs)
    scale_bits: int = 18  # significant bits of a scale (an 18-bit DSP port)
    acc_frac_bits: int = 16  # fraction bits of accumulators and biases
    calibration: str = ""  # a .npz of sample model inputs: its max |x| replaces input_range

    def run(self, module: Module) -> Module:
        if self.acc_frac_bits <= self.frac_bits:
            raise PassError("acc_frac_bits must exceed frac_bits (outputs are rounded from it)")
        x_range = float(self.input_range)
        if self.calibration:
            # Whatever the calibration data reaches is held exactly (one ulp above its max).
            x_range = calibrated_range(self.calibration, module.main.args[0].name) \
                + 2.0 ** -self.frac_bits
        if not (math.isfinite(x_range) and x_range > 0):
            raise PassError(f"hls-fixed-point: input_range={x_range} must be a positive number")
        input_range = x_range
        x_int = int_bits_for(x_range)
        from qcompiler.codegen.hls.cnn import cnn_design, is_cnn_design

        if is_cnn_design(module):
            # An integer CNN: every format is fixed by the codes (8-bit streams, i32
            # accumulators, the dyadic multipliers of fuse-requant); only check the design.
            layers = cnn_design(module)[0]
            record_stat(module, self.name, layers=len(layers), integer_design=True)
            return module
        for node, relu in design_layers(module):
            w = layer_weights(module, node)
            bits = w["scheme"].bits
            k, n = w["codes"].shape
            cpw = codes_per_word(bits)
            group = w["group"]
            if group % cpw:
                group_padded = -(-group // cpw) * cpw
                if w["scheme"].granularity == "group":
                    raise PassError(f"%{node.result.name}: group {group} is not a multiple of "
                                    f"{cpw} codes per 32-bit word")
                group = group_padded
            groups = -(-k // group)
            # Worst-case output bound from the input bound.
            colsum = dequantized_abs_colsum(w)
            bias = w["bias"] if w["bias"] is not None else np.zeros(n)
            y_bound = float((x_range * colsum + np.abs(bias)).max())
            y_range = y_bound
            part_int = x_int + bits + 1 + max(0, math.ceil(math.log2(group)))
            max_scale = float(np.abs(w["scales"]).max()) or 1.0
            scale_int = math.floor(math.log2(max_scale)) + 2  # sign + magnitude < 2^(int-1)
            scale_frac = self.scale_bits - scale_int
            acc_int = int_bits_for(y_bound) + 1
            y_int = int_bits_for(y_range)
            cfg = {
                "bits": bits, "signed_codes": int(w["scheme"].dtype.kind == "int"),
                "codes_per_word": cpw, "group": group, "groups": groups, "k": k,
                "k_padded": groups * group, "n": n, "words_per_group": group // cpw,
                "x_width": x_int + self.frac_bits, "x_int": x_int,
                "part_width": part_int + self.frac_bits, "part_int": part_int,
                "scale_width": self.scale_bits, "scale_frac": scale_frac,
                "acc_width": acc_int + self.acc_frac_bits, "acc_int": acc_int,
                "y_width": y_int + self.frac_bits, "y_int": y_int, "relu": int(relu),
            }
            if (cfg["part_width"] + cfg["scale_width"] > MAX_EXACT_BITS
                    or cfg["acc_width"] > MAX_EXACT_BITS):
                raise PassError(f"%{node.result.name}: fixed-point widths {cfg} exceed "
                                f"{MAX_EXACT_BITS} bits; lower input_range or frac_bits")
            node.attrs["config"] = {**node.attrs.get("config", {}), **cfg}
            x_range, x_int = y_range, y_int
        record_stat(module, self.name, layers=len(design_layers(module)),
                    input_range=input_range,
                    input_range_from="calibration" if self.calibration else "input_range")
        return module
