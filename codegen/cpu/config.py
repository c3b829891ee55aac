"""The CPU backend's config validator: one check for every source of a qmatmul's config.

A config reaches ``codegen/cpu/backend.py`` from ``cpu-schedule`` (its heuristic or a tuning
log) or from ``.qir`` text read back by the parser; ``validate`` runs before any kernel is
built. Rules:

- ``impl``: ``tvm`` or ``reference`` (the numpy reference runs it; nothing else is read);
- ``numerics``: one of ``kernels.NUMERICS``; ``lanes`` and ``n_tile``: the target's and the
  packed layout's (plain ints);
- ``variants``: ``{"v0": ..., "v1": ...}``, each with ``m`` >= 1, ``max_m`` >= 0 (0: no
  bound), a ``source`` string, and exactly the knobs of ``tuning.search_space`` for that M,
  each of the knob's own type (``m_block`` of ``True`` or ``1.0`` is refused, as is ``"2"``)
  and one of its allowed values (``tuning.check_config``, which the tuner uses too).
  numerics=lut: every variant's ``table_group`` is the packed layout's (it shapes the codes).

``ConfigError`` names the node and the knob.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from qcompiler.errors import ConfigError, InputError

IMPLS = ("tvm", "reference")
SOURCES = ("heuristic", "tuning-log", "explicit")
VARIANT_FIELDS = ("m", "max_m", "source")
LAYOUT_INTS = ("k", "n", "k_pad", "block", "n_tile", "container_bits")
MCPU = re.compile(r"[a-z0-9_.-]+")


@dataclass(frozen=True)
class Variant:
    m: int
    max_m: int
    source: str
    knobs: tuple  # ((name, value), ...) in search-space order


@dataclass(frozen=True)
class CpuConfig:
    impl: str
    numerics: str = ""
    lanes: int = 0
    n_tile: int = 0
    variants: tuple = ()


def is_int(value) -> bool:
    """A plain int: bool is not an int here, nor 1.0, nor "2"."""
    return type(value) is int


def validate(config, node, target) -> CpuConfig:
    """The typed config of a scheduled (and packed) qmatmul ``node`` for ``target``;
    ``ConfigError`` naming the node and the knob otherwise."""
    from qcompiler.codegen.cpu import kernels, layout, tuning

    where = f"%{node.result.name}"
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config is {type(config).__name__}, not a dict")
    impl = config.get("impl")
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ConfigError(f"{where}: config impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "reference":
        return CpuConfig(impl)
    numerics = config.get("numerics")
    if not isinstance(numerics, str) or numerics not in kernels.NUMERICS:
        raise ConfigError(f"{where}: config numerics={numerics!r} is not one of "
                          f"{', '.join(kernels.NUMERICS)}")
    mcpu = config.get("mcpu")
    if mcpu is not None and (not isinstance(mcpu, str) or not MCPU.fullmatch(mcpu)):
        raise ConfigError(f"{where}: config mcpu={mcpu!r} is not a CPU name")
    lay = node.arg("w").type.layout
    for param in LAYOUT_INTS:
        if lay is None or not is_int(lay.get(param)) or lay.get(param) < 1:
            raise ConfigError(f"{where}: weight layout parameter {param}="
                              f"{None if lay is None else lay.get(param)!r} is not a positive int")
    for knob in ("lanes", "n_tile"):
        if not is_int(config.get(knob)) or config[knob] < 1:
            raise ConfigError(f"{where}: config {knob}={config.get(knob)!r} is not a positive int")
    if "byte_permute" in config and (not is_int(config["byte_permute"])
                                     or config["byte_permute"] not in (0, 1)):
        raise ConfigError(f"{where}: config byte_permute={config['byte_permute']!r} is not 0 "
                          "or 1")
    try:
        p = tuning.problem(target, tuning.node_key(node, 1, numerics))
    except (InputError, layout.Unsupported) as e:
        raise ConfigError(f"{where}: config does not describe a CPU kernel: {e}") from None
    for knob, want in (("lanes", p.lanes), ("n_tile", p.n_tile), ("n_tile", lay.get("n_tile"))):
        if config[knob] != want:
            raise ConfigError(f"{where}: config {knob}={config[knob]} but the target and the "
                              f"packed layout need {want}")
    raw = config.get("variants")
    if not isinstance(raw, dict) or not raw or set(raw) != {f"v{i}" for i in range(len(raw))}:
        raise ConfigError(f"{where}: config variants must be a dict v0, v1, ... of variants")
    variants = []
    for i in range(len(raw)):
        v, at = raw[f"v{i}"], f"{where} variant v{i}"
        if not isinstance(v, dict):
            raise ConfigError(f"{at}: a variant is a dict of knobs, not {type(v).__name__}")
        if not is_int(v.get("m")) or v["m"] < 1:
            raise ConfigError(f"{at}: m={v.get('m')!r} is not a positive int")
        if not is_int(v.get("max_m")) or v["max_m"] < 0:
            raise ConfigError(f"{at}: max_m={v.get('max_m')!r} is not an int >= 0")
        source = v.get("source")
        if not isinstance(source, str) or source not in SOURCES:
            raise ConfigError(f"{at}: source={source!r} is not one of {', '.join(SOURCES)}")
        knobs = {k: val for k, val in v.items() if k not in VARIANT_FIELDS}
        problem = tuning.check_config(target, tuning.node_key(node, v["m"], numerics), knobs)
        if problem:
            raise ConfigError(f"{at}: {problem}")
        if numerics == "lut" and knobs.get("table_group") != lay.get("table_group"):
            raise ConfigError(f"{at}: table_group={knobs.get('table_group')!r} but the packed "
                              f"layout's tables group {lay.get('table_group')!r} rows")
        variants.append(Variant(v["m"], v["max_m"], source, tuple(knobs.items())))
    return CpuConfig(impl, numerics, config["lanes"], config["n_tile"], tuple(variants))
