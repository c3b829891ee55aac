"""The HLS design's arithmetic, twice: the exact integer data the templates emit, and a
bit-accurate numpy model of the generated C++ (the C simulation must equal it exactly).

Every fixed-point value is an integer ``raw`` with a known number of fraction bits, so the
model is integer arithmetic on int64 (widths are capped by ``hls-fixed-point`` so nothing
overflows). The C++ does the same with ap_fixed:

- input:  ``x = ap_fixed<x_width, x_int, AP_RND, AP_SAT>(float)``  → ``floor(x·2^F + 1/2)``,
  saturated;
- group:  ``part += (code - zp) * x``                               → exact integer sum;
- scale:  ``acc += part * scale`` with acc AP_TRN                    → ``(part·s) >> shift``
  (an arithmetic shift is a floor);
- output: ``y = ap_fixed<y_width, y_int, AP_RND, AP_SAT>(relu(acc + bias))``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.errors import InputError
from qcompiler.codegen.hls.design import design_layers, layer_weights


class InputSaturated(UserWarning):
    """Run-time inputs beyond the design's fixed-point input range were saturated."""


@dataclass
class LayerData:
    """Everything the templates and the model need for one layer, as exact integers."""

    name: str
    cfg: dict
    words: np.ndarray  # uint32 [N, k_padded / codes_per_word], codes LSB-first in each word
    codes: np.ndarray  # int64 [k_padded, N], the K order of the words (act-order applied)
    scale_raw: np.ndarray  # int64 [N, groups]
    zp: np.ndarray  # int64 [N, groups] (zeros when symmetric)
    bias_raw: np.ndarray  # int64 [N], acc fraction bits
    inv_perm: Optional[np.ndarray]  # int64 [K]: input k goes to position inv_perm[k]


def _round_half_even(v: np.ndarray) -> np.ndarray:
    return np.rint(v).astype(np.int64)


def prepare_layer(module, node, name: str) -> LayerData:
    """Pack a configured qmatmul's constants into the integer arrays the design stores."""
    cfg = node.attrs["config"]
    w = layer_weights(module, node)
    codes, scales, zps = w["codes"], w["scales"], w["zps"]
    k, n = codes.shape
    group, groups, kp, cpw, bits = (cfg["group"], cfg["groups"], cfg["k_padded"],
                                    cfg["codes_per_word"], cfg["bits"])
    inv_perm = None
    if w["g_idx"] is not None:
        # Act-order: sort K by group once, here; the kernel scatters x on load instead of
        # gathering inside the inner loop.
        perm = np.argsort(w["g_idx"], kind="stable")
        counts = np.bincount(w["g_idx"], minlength=groups)
        if np.any(counts[:-1] != group) or counts[-1] > group:
            raise ValueError(f"{name}: act-order groups are not of size {group}")
        codes = codes[perm]
        inv_perm = np.argsort(perm)
    zp = np.zeros((groups, n), np.int64) if zps is None else np.asarray(zps, np.int64)
    # Pad K to whole groups with codes equal to the zero point: (code - zp) = 0 adds nothing.
    pad_rows = zp[-1:].repeat(kp - k, axis=0) if kp > k else np.zeros((0, n), np.int64)
    codes = np.concatenate([codes, pad_rows], axis=0)
    mask = (1 << bits) - 1
    lanes = (codes & mask).astype(np.uint64).T.reshape(n, kp // cpw, cpw)
    shifts = (np.arange(cpw, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(lanes << shifts, axis=2).astype(np.uint32)
    scale_raw = _round_half_even(np.asarray(scales, np.float64) * 2.0 ** cfg["scale_frac"])
    acc_frac = cfg["acc_width"] - cfg["acc_int"]
    bias = w["bias"] if w["bias"] is not None else np.zeros(n)
    bias_raw = _round_half_even(bias * 2.0 ** acc_frac)
    return LayerData(name, cfg, words, codes, scale_raw.T.copy(), zp.T.copy(), bias_raw,
                     inv_perm)


def quantize_input(x: np.ndarray, width: int, int_bits: int) -> np.ndarray:
    """float → raw of ap_fixed<width, int_bits, AP_RND, AP_SAT>."""
    frac = width - int_bits
    raw = np.floor(np.asarray(x, np.float64) * 2.0 ** frac + 0.5)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    return np.clip(raw, lo, hi).astype(np.int64)


def input_bounds(width: int, int_bits: int) -> tuple[float, float]:
    """The smallest and largest value of ap_fixed<width, int_bits>."""
    step = 2.0 ** -(width - int_bits)
    return -(1 << (width - 1)) * step, ((1 << (width - 1)) - 1) * step


def saturated_count(x: np.ndarray, width: int, int_bits: int) -> int:
    """How many values of ``x`` ``quantize_input`` saturates (their rounded raw value lies
    beyond the format's range)."""
    frac = width - int_bits
    raw = np.floor(np.asarray(x, np.float64) * 2.0 ** frac + 0.5)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    return int(np.count_nonzero((raw < lo) | (raw > hi)))


def check_run_inputs(module, inputs) -> tuple[str, np.ndarray]:
    """The design's one input checked (name, float dtype, rank, static dims, batch >= 1,
    finite values): ``(name, array)``, else ``InputError`` naming the input."""
    arg = module.main.args[0]
    name, shape = arg.name, list(arg.type.shape)
    if not isinstance(inputs, dict) or set(inputs) != {name}:
        got = sorted(map(str, inputs)) if isinstance(inputs, dict) else type(inputs).__name__
        raise InputError(f"the design takes one input {name!r}, got {got}")
    try:
        x = np.asarray(inputs[name])
    except Exception as e:
        raise InputError(f"input {name!r}: not an array ({type(e).__name__})") from None
    if x.dtype.kind != "f":
        raise InputError(f"input {name!r}: dtype {x.dtype}; the design takes floating-point "
                         f"values ({arg.type.dtype.name})")
    if x.ndim != len(shape):
        raise InputError(f"input {name!r}: rank {x.ndim} (shape {list(x.shape)}); the design "
                         f"takes rank {len(shape)} {shape}")
    for axis, (got, want) in enumerate(zip(x.shape, shape)):
        if isinstance(want, int) and got != want:
            raise InputError(f"input {name!r}: shape {list(x.shape)}; dimension {axis} must be "
                             f"{want} ({shape})")
    if x.size == 0:
        raise InputError(f"input {name!r}: shape {list(x.shape)} holds no rows; the batch must "
                         "be at least 1")
    finite = np.isfinite(x)
    if not finite.all():
        bad = x[~finite]
        raise InputError(f"input {name!r}: {int(np.isnan(bad).sum())} NaN and "
                         f"{int(np.isinf(bad).sum())} infinite values; the design takes finite "
                         "values")
    return name, x


def report_saturation(name: str, x: np.ndarray, cfg: dict) -> int:
    """Count the values of the design's input ``x`` beyond the first layer's input format
    (``cfg``: its config) and warn once (``InputSaturated``) when there are any."""
    count = saturated_count(x, cfg["x_width"], cfg["x_int"])
    if count:
        lo, hi = input_bounds(cfg["x_width"], cfg["x_int"])
        warnings.warn(f"input {name!r}: {count} of {x.size} values lie beyond the design's "
                      f"fixed-point input range [{lo:g}, {hi:g}] and were saturated; recompile "
                      "with hls-fixed-point{input_range=...} or {calibration=<.npz>}",
                      InputSaturated, stacklevel=3)
    return count


def prepare_run_input(module, inputs) -> tuple[np.ndarray, dict]:
    """What the FPGA runner feeds the C simulation, and the run's stats: the checked input
    (``check_run_inputs``), its saturated values counted and reported (``report_saturation``),
    and values far beyond the range clipped to just past it (they saturate the same way, and
    no float becomes inf on the way to float32). Stats: ``{"saturated": {name: count}}``."""
    name, x = check_run_inputs(module, inputs)
    cfg = design_layers(module)[0][0].attrs["config"]
    count = report_saturation(name, x, cfg)
    lo, hi = input_bounds(cfg["x_width"], cfg["x_int"])
    return np.clip(x, lo - 1, hi + 1), {"saturated": {name: count}}


def simulate_layer(layer: LayerData, x_raw: np.ndarray) -> np.ndarray:
    """One layer on raw inputs [M, K] (x fraction bits) → raw outputs [M, N] (y fraction)."""
    cfg = layer.cfg
    m = x_raw.shape[0]
    k, kp, group, groups = cfg["k"], cfg["k_padded"], cfg["group"], cfg["groups"]
    xs = x_raw
    if layer.inv_perm is not None:
        xs = np.empty_like(x_raw)
        xs[:, layer.inv_perm] = x_raw
    xs = np.concatenate([xs, np.zeros((m, kp - k), np.int64)], axis=1)
    q = layer.codes - np.repeat(layer.zp.T, group, axis=0)  # [kp, N]
    # Exact per-group integer partial sums: [M, G, N].
    part = np.einsum("mgk,gkn->mgn", xs.reshape(m, groups, group), q.reshape(groups, group, -1))
    x_frac = cfg["x_width"] - cfg["x_int"]
    acc_frac = cfg["acc_width"] - cfg["acc_int"]
    shift = x_frac + cfg["scale_frac"] - acc_frac
    prod = part * layer.scale_raw.T[None]  # frac x_frac + scale_frac
    contrib = prod >> shift if shift >= 0 else prod << -shift
    acc = contrib.sum(axis=1) + layer.bias_raw[None]
    if cfg["relu"]:
        acc = np.maximum(acc, 0)
    y_frac = cfg["y_width"] - cfg["y_int"]
    down = acc_frac - y_frac
    y = (acc + (1 << (down - 1))) >> down  # AP_RND: round half toward +inf
    lo, hi = -(1 << (cfg["y_width"] - 1)), (1 << (cfg["y_width"] - 1)) - 1
    return np.clip(y, lo, hi)


def simulate(layers: list[LayerData], x: np.ndarray) -> np.ndarray:
    """The whole design on float inputs [M, K] → float64 outputs, bit-exact with csim."""
    first = layers[0].cfg
    raw = quantize_input(x, first["x_width"], first["x_int"])
    for layer in layers:
        raw = simulate_layer(layer, raw)
    last = layers[-1].cfg
    return raw.astype(np.float64) / 2.0 ** (last["y_width"] - last["y_int"])
