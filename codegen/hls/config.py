"""The FPGA backend's config validator: one check for every source of a layer's config.

A layer's config is written by ``hls-fixed-point`` (formats) and ``hls-parallelism`` (``pe``,
``simd``: its heuristic or a tuning log), or read back from ``.qir`` text. Every number in it
is printed into the HLS C++ (array sizes, loop bounds, ``ap_fixed`` widths, pragma factors),
so ``validate`` runs before anything is emitted:

- every knob is a plain int (``pe: true`` is refused, it would print as ``PE=True``; so are
  ``1.0`` and ``"2"``) within its range;
- the shapes agree with each other and with the weight (``k``, ``n``, groups of whole
  32-bit words), ``pe`` divides ``n`` and ``simd`` divides ``words_per_group``;
- widths stay within what the bit-accurate model computes exactly (62 bits);
- ``source`` is ``heuristic`` or ``tuning-log``.

``ConfigError`` names the node and the knob.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from qcompiler.errors import ConfigError

# Largest width whose products the bit-accurate model computes exactly in int64.
MAX_EXACT_BITS = 62
SOURCES = ("heuristic", "tuning-log")


@dataclass(frozen=True)
class HlsLayerConfig:
    bits: int
    signed_codes: int
    codes_per_word: int
    group: int
    groups: int
    k: int
    k_padded: int
    n: int
    words_per_group: int
    x_width: int
    x_int: int
    part_width: int
    part_int: int
    scale_width: int
    scale_frac: int
    acc_width: int
    acc_int: int
    y_width: int
    y_int: int
    relu: int
    pe: int
    simd: int


INT_KNOBS = tuple(f.name for f in fields(HlsLayerConfig))


def is_int(value) -> bool:
    """A plain int: bool is not an int here, nor 1.0, nor "2"."""
    return type(value) is int


def check_parallelism(cfg: dict, pe, simd):
    """None if ``pe`` and ``simd`` are plain ints that divide ``n`` and ``words_per_group``."""
    if not is_int(pe) or pe < 1 or cfg["n"] % pe:
        return f"pe={pe!r} must be an int that divides n={cfg['n']}"
    if not is_int(simd) or simd < 1 or cfg["words_per_group"] % simd:
        return f"simd={simd!r} must be an int that divides words_per_group=" \
               f"{cfg['words_per_group']}"
    return None


def _problem(cfg: dict) -> str | None:
    for knob in INT_KNOBS:
        if knob not in cfg:
            return f"config lacks {knob!r}"
        if not is_int(cfg[knob]):
            return f"{knob}={cfg[knob]!r} is not an int"
    if not 2 <= cfg["bits"] <= 8:
        return f"bits={cfg['bits']} not in [2, 8]"
    for knob in ("signed_codes", "relu"):
        if cfg[knob] not in (0, 1):
            return f"{knob}={cfg[knob]} not in (0, 1)"
    if cfg["codes_per_word"] not in (4, 8, 16) or cfg["codes_per_word"] * cfg["bits"] > 32:
        return f"codes_per_word={cfg['codes_per_word']} does not fit {cfg['bits']}-bit codes " \
               "in a 32-bit word"
    for knob in ("group", "groups", "k", "k_padded", "n", "words_per_group"):
        if cfg[knob] < 1:
            return f"{knob}={cfg[knob]} must be >= 1"
    if cfg["group"] != cfg["words_per_group"] * cfg["codes_per_word"]:
        return f"group={cfg['group']} is not words_per_group x codes_per_word"
    if cfg["k_padded"] != cfg["groups"] * cfg["group"] or not \
            cfg["k_padded"] - cfg["group"] < cfg["k"] <= cfg["k_padded"]:
        return f"k={cfg['k']}, k_padded={cfg['k_padded']}, groups={cfg['groups']} and " \
               f"group={cfg['group']} disagree"
    for width, ints in (("x_width", "x_int"), ("part_width", "part_int"),
                        ("acc_width", "acc_int"), ("y_width", "y_int")):
        if not 1 <= cfg[ints] <= cfg[width] <= MAX_EXACT_BITS:
            return f"{width}={cfg[width]}, {ints}={cfg[ints]}: need 1 <= {ints} <= {width} <= " \
                   f"{MAX_EXACT_BITS}"
    if not 2 <= cfg["scale_width"] <= MAX_EXACT_BITS or not -128 <= cfg["scale_frac"] <= 128:
        return f"scale_width={cfg['scale_width']}, scale_frac={cfg['scale_frac']} out of range"
    if cfg["part_width"] + cfg["scale_width"] > MAX_EXACT_BITS:
        return f"part_width + scale_width = {cfg['part_width'] + cfg['scale_width']} exceeds " \
               f"{MAX_EXACT_BITS} bits"
    if cfg["acc_width"] - cfg["acc_int"] <= cfg["y_width"] - cfg["y_int"]:
        return "the accumulator needs more fraction bits than the output"
    return check_parallelism(cfg, cfg["pe"], cfg["simd"])


def validate(config, node) -> HlsLayerConfig:
    """The typed config of one layer (a qmatmul ``node``); ``ConfigError`` naming the node
    and the knob when a value is missing, of the wrong type or out of range."""
    where = f"%{node.result.name}"
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config is {type(config).__name__}, not a dict")
    problem = _problem(config)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    shape = node.arg("w").type.shape
    if tuple(shape) != (config["k"], config["n"]):
        raise ConfigError(f"{where}: config k={config['k']}, n={config['n']} but the weight is "
                          f"{list(shape)}")
    source = config.get("source", "heuristic")
    if not isinstance(source, str) or source not in SOURCES:
        raise ConfigError(f"{where}: source={source!r} is not one of {', '.join(SOURCES)}")
    return HlsLayerConfig(**{k: config[k] for k in INT_KNOBS})
