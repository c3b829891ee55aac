"""The CUDA backend's config validator: one check for every source of a qmatmul's config.

A config reaches ``codegen/cuda/backend.py`` from the passes (``schedule-unpack``, ``tile``),
from a tuning log (replayed by ``tile``) or from ``.qir`` text read back by the parser. All
three go through ``validate`` before anything is rendered, so the template only ever sees
the values below:

- ``unpack`` / ``scale_at`` / ``zero_at``: one of a fixed set of strings (they select code in
  the template; any other string is refused, never interpolated);
- ``variants``: one dict per M bucket with the knobs of ``tuning.KNOBS``, each a plain int
  (``True``, ``1.0`` and ``"2"`` are not ints), ``m_max`` >= 1 and a ``source`` string; the
  knobs must also pass ``check_knobs`` (the ranges and the shared-memory and register limits
  that the tuner's ``check_config`` applies);
- the packed weight's layout parameters that the template prints as code: plain ints.

``ConfigError`` names the node and the knob.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from qcompiler.errors import ConfigError

UNPACKS = ("lop3-magic-f16", "shift-magic-bf16", "prmt-f16", "fp8-e4m3-f16", "shift-mask-f32")
SCALE_AT = ("registers", "epilogue")
ZERO_AT = ("registers", "constant")
SOURCES = ("heuristic", "tuning-log", "explicit")
KNOBS = ("gemv", "m_frags", "warps_n", "warps_k", "stages", "stage_k", "acc_scale", "split_k")
# Knobs added later, with the value a config written before them means (tuning logs and .qir
# text from before the wgmma kernel stay valid): wgmma=1 and 2 select the sm_90a wgmma/TMA
# kernel with its consumer warpgroups splitting the tokens (1) or the N tile (2); int8=1 the
# tiled kernel with int8 activations (tiled_i8.cuh; for qmatmuls whose accuracy_level is 4);
# fp8=1 the same kernel with FP8 e4m3 activations (FP8 e4m3 weights, targets with FP8 MMA).
OPTIONAL_KNOBS = {"wgmma": 0, "int8": 0, "fp8": 0}
# The 16-bit wgmma kernel's TMA ring may be deeper than the other kernels' (at most 8 stages):
# its stages are the only big user of the CTA's shared memory, and a narrow tile's stage
# (M tile 128 x one n64 block: 19 KB) leaves room for 11.
WGMMA_MAX_STAGES = 12
INT8_ACCURACY_LEVEL = 4  # MatMulNBits's permission for int8 activations
X_DTYPES = ("f16", "bf16")
# Layout parameters the template prints as C++ numbers.
LAYOUT_INTS = ("container_bits", "k", "n", "k_pad", "n_pad", "group", "zero_const",
               "act_order")
TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True)
class Variant:
    """One kernel variant (an M bucket) with decided knobs."""

    m_max: int
    source: str
    gemv: int
    m_frags: int
    warps_n: int
    warps_k: int
    stages: int
    stage_k: int
    acc_scale: int
    split_k: int
    wgmma: int = 0
    int8: int = 0
    fp8: int = 0


@dataclass(frozen=True)
class CudaConfig:
    unpack: str
    scale_at: str
    zero_at: str
    variants: tuple[Variant, ...]


def is_int(value) -> bool:
    """A plain int: bool is not an int here, nor 1.0, nor "2"."""
    return type(value) is int


def knob_types(config: dict, knobs=KNOBS) -> Optional[str]:
    """None if every knob is present and a plain int, else what is wrong (names the knob)."""
    if not isinstance(config, dict):
        return f"a config is a dict of knobs, not {type(config).__name__}"
    missing = [k for k in knobs if k not in config]
    if missing:
        return f"config lacks {missing}"
    for knob in knobs:
        if not is_int(config[knob]):
            return f"{knob}={config[knob]!r} is not an int"
    return None


def gemv_runs_in_one_group(k_steps: int, split_k: int, warps_k: int, group_steps: int) -> bool:
    """Whether every warp of the GEMV kernel runs k16 steps of one group only, with
    ``k_steps`` split over ``split_k`` CTAs of ``warps_k`` k warps as the kernel divides them
    (include/qcompiler/gemv.cuh ``gemv_runs_in_one_group``, the launcher's check): the
    condition of its ``acc_scale`` (a warp's group scales on its sums after its loop)."""
    for split in range(split_k):
        cb, ce = split * k_steps // split_k, (split + 1) * k_steps // split_k
        for wk in range(warps_k):
            b, e = cb + (ce - cb) * wk // warps_k, cb + (ce - cb) * (wk + 1) // warps_k
            if e > b and b // group_steps != (e - 1) // group_steps:
                return False
    return True


def check_knobs(target, key: dict, config: dict) -> Optional[str]:
    """None if ``config`` is a valid kernel variant for ``key`` on ``target``, else why.

    The tuner's ``tuning.check_config`` is this function: tuning logs, passes and ``.qir``
    text are held to the same rules.
    """
    from qcompiler.codegen.cuda.layout import K_ALIGN, N_ALIGN, pad_to
    from qcompiler.codegen.cuda.tuning import (GEMV_REGISTERS, _bits, _group, _smem_limit,
                                               gemv_registers, smem_bytes)

    problem = knob_types(config)
    if problem:
        return problem
    for knob, default in OPTIONAL_KNOBS.items():
        if not is_int(config.get(knob, default)):
            return f"{knob}={config[knob]!r} is not an int"
    if config.get("wgmma", 0) not in (0, 1, 2):
        return f"wgmma={config['wgmma']} not in (0, 1, 2)"
    for knob in ("int8", "fp8"):
        if config.get(knob, 0) not in (0, 1):
            return f"{knob}={config[knob]} not in (0, 1)"
    if config.get("int8", 0) and config.get("fp8", 0):
        return "int8=1 and fp8=1 are two kinds of activations: one at most"
    if config.get("wgmma", 0):
        if config.get("int8", 0) or config.get("fp8", 0):
            return check_wgmma_act8(target, key, config)
        return check_wgmma(target, key, config)
    if config.get("int8", 0) or config.get("fp8", 0):
        problem = check_int8(key, config) if config.get("int8", 0) else \
            check_fp8(target, key, config)
        if problem:
            return problem
    n_blocks = pad_to(key["n"], N_ALIGN) // 64
    k_tiles = pad_to(key["k"], K_ALIGN) // 64
    if config["gemv"] not in (0, 1):
        return f"gemv={config['gemv']} not in (0, 1)"
    if config["gemv"]:
        cb = 8 if _bits(key) > 4 else 4
        if config["m_frags"] not in (1, 2):
            return f"the GEMV kernel takes m_frags 1 or 2, not {config['m_frags']}"
        if config["stage_k"] != 64:
            return "the GEMV kernel does not use stage_k (it must be 64)"
        if config["acc_scale"] not in (0, 1):
            return f"acc_scale={config['acc_scale']} not in (0, 1)"
        if config["acc_scale"]:
            group = _group(key)
            k_steps = pad_to(key["k"], K_ALIGN) // 16
            if not group or key.get("act_order") or group % 16:
                return "the GEMV kernel's acc_scale needs group scales (no act_order)"
            if not gemv_runs_in_one_group(k_steps, config["split_k"], config["warps_k"],
                                          group // 16):
                return (f"acc_scale: a warp's run of k16 steps (split_k={config['split_k']}, "
                        f"warps_k={config['warps_k']}) crosses a group of {group} rows")
        if gemv_registers(config, cb) > GEMV_REGISTERS:
            return (f"stages={config['stages']} needs {gemv_registers(config, cb)} registers for "
                    f"loads in flight and accumulators (at most {GEMV_REGISTERS})")
    if config["m_frags"] not in (1, 2, 4):
        return f"m_frags={config['m_frags']} not in (1, 2, 4)"
    if config["warps_n"] < 1 or n_blocks % config["warps_n"]:
        return f"warps_n={config['warps_n']} does not divide the {n_blocks} n64 blocks"
    if config["warps_k"] not in ((1, 2, 4, 8, 16) if config["gemv"] else (1, 2, 4)):
        return f"warps_k={config['warps_k']} not in (1, 2, 4; 8, 16 for the GEMV kernel)"
    if config["warps_n"] * config["warps_k"] > 16:
        return "more than 16 warps per CTA"
    if not 2 <= config["stages"] <= 8:
        return f"stages={config['stages']} not in [2, 8]"
    if config["stage_k"] not in (64, 128):
        return f"stage_k={config['stage_k']} not in (64, 128)"
    if pad_to(key["k"], K_ALIGN) % config["stage_k"]:
        return f"stage_k={config['stage_k']} does not divide K padded to {pad_to(key['k'], 64)}"
    group = _group(key)
    if group and not (group % config["stage_k"] == 0 or config["stage_k"] % group == 0):
        return f"group {group} and stage_k={config['stage_k']} do not nest"
    if config["acc_scale"] not in (0, 1):
        return f"acc_scale={config['acc_scale']} not in (0, 1)"
    if config["acc_scale"] and not config["gemv"] and (config["m_frags"] != 1 or not group):
        return "acc_scale needs an M tile of 16 (m_frags=1) and group scales"
    if not 1 <= config["split_k"] <= k_tiles:
        return f"split_k={config['split_k']} not in [1, {k_tiles}] (K has {k_tiles} tiles of 64)"
    if smem_bytes(config, key, cb=8 if _bits(key) > 4 else 4, group=group or 1 << 30) \
            > _smem_limit(target):
        return f"needs {smem_bytes(config, key)} bytes of shared memory"
    return None


def int8_weight_reason(key: dict) -> Optional[str]:
    """None if the int8 kernel can take ``key``'s weights, else why: integer codes (any 1-8
    bit format: the kernel multiplies the unsigned codes and subtracts the zero point once per
    group), groups of whole k32 steps, float activations."""
    from qcompiler.codegen.cuda.tuning import _group, _scheme

    scheme = _scheme(key["w_scheme"])
    if not scheme.dtype.is_integer:
        return f"{scheme.dtype} codes: the int8 kernel takes integer codes"
    group = _group(key)
    if group and group % 32:
        return f"group size {group}: the int8 kernel needs groups of a multiple of 32 rows"
    if key.get("act") != "float":
        return f"act={key.get('act')}: the int8 kernel quantizes float activations"
    return None


def check_int8(key: dict, config: dict) -> Optional[str]:
    """``check_knobs``'s extra rules for ``int8=1`` (include/qcompiler/tiled_i8.cuh): the
    model's permission, the weights it takes, then the kernel's tile rules."""
    return int8_permission_reason(key) or int8_weight_reason(key) \
        or _act8_tile_reason("int8", key, config)


def int8_permission_reason(key: dict) -> Optional[str]:
    """None if the model permits int8 activations for ``key`` (accuracy_level 4), else why."""
    if key.get("accuracy_level") != INT8_ACCURACY_LEVEL:
        return (f"int8=1 computes with int8 activations, which only a qmatmul with "
                f"accuracy_level {INT8_ACCURACY_LEVEL} permits (this one: "
                f"{key.get('accuracy_level')})")
    return None


def _act8_tile_reason(knob: str, key: dict, config: dict) -> Optional[str]:
    """The 8-bit-activation kernel's tile rules (``int8=1`` and ``fp8=1``): the tiled kernel
    (gemv=0, acc_scale=0), each warp's run of a stage whole k32 steps, and at most 2 m_frags
    with group scales (fp32 sums and the MMA's sums both live in registers)."""
    from qcompiler.codegen.cuda.tuning import _group

    if config["gemv"] or config["acc_scale"]:
        return f"{knob}=1 is a variant of the tiled kernel (gemv=0, acc_scale=0)"
    if (config["stage_k"] // 16) % (2 * config["warps_k"]):
        return (f"{knob}=1: stage_k={config['stage_k']} split over warps_k={config['warps_k']} "
                "is not whole k32 steps a warp")
    if _group(key) and config["m_frags"] > 2:
        return (f"{knob}=1 with group scales takes m_frags 1 or 2 (not {config['m_frags']}): "
                "fp32 sums and the MMA's sums both live in registers")
    return None


def fp8_weight_reason(target, key: dict) -> Optional[str]:
    """None if the FP8-activation kernel can take ``key`` on ``target``, else why: FP8 e4m3
    weights (their bytes go to the MMA as they are), f16 activations, a target with FP8 MMA
    (sm_89+), groups of whole k32 steps."""
    from qcompiler.codegen.cuda.tuning import _group, _scheme

    if "fp8" not in getattr(target, "features", ()):
        return f"FP8 activations need a target with FP8 MMA (sm_89+), not {target.name}"
    if _scheme(key["w_scheme"]).dtype.name != "f8e4m3fn":
        return f"FP8 activations take FP8 e4m3 weights, not {_scheme(key['w_scheme']).dtype}"
    if key.get("x_dtype") != "f16" or key.get("act") != "float":
        return "FP8 activations quantize f16 activations"
    group = _group(key)
    if group and group % 32:
        return f"group size {group}: the FP8 kernel needs groups of a multiple of 32 rows"
    return None


def check_fp8(target, key: dict, config: dict) -> Optional[str]:
    """``check_knobs``'s extra rules for ``fp8=1``: the weights and target it takes
    (``fp8_weight_reason``), then the tile rules of the same kernel as int8's."""
    return fp8_weight_reason(target, key) or _act8_tile_reason("fp8", key, config)


def _wgmma_target_reason(target, config: dict) -> Optional[str]:
    """None if ``target`` has wgmma (sm_90), else why the wgmma kernels cannot run there."""
    if "wgmma" not in getattr(target, "features", ()):
        return (f"wgmma={config['wgmma']} needs a target with wgmma (sm_90), not "
                f"{getattr(target, 'name', target)}")
    return None


def _block_split_reason(config: dict, most: int, sums: str,
                        token_halves: bool = False) -> Optional[str]:
    """The block split's tiles (``wgmma=2``, both wgmma kernels): 1 or 2 consumer warpgroups,
    M tiles of 64, 128 or 256 tokens (one wgmma's N), the same number of n64 blocks for each
    warpgroup, and blocks a warpgroup x M tile at most ``most`` (``sums``: what a thread holds
    in registers for them). ``token_halves`` (the 16-bit kernel): two warpgroups may also share
    one block, each taking half of an M tile of 128 or 256 tokens."""
    consumers, blocks, m_tile = config["warps_k"], config["warps_n"], 16 * config["m_frags"]
    if consumers not in (1, 2) or m_tile not in (64, 128, 256):
        return (f"warps_k={consumers}, m_frags={config['m_frags']}: the block-split wgmma "
                "kernel takes 1 or 2 consumer warpgroups (warps_k) and M tiles of 64, 128 "
                "or 256 (m_frags 4, 8, 16)")
    if token_halves and blocks == 1 and consumers == 2:
        if m_tile == 64:
            return (f"warps_n=1, warps_k=2, m_frags={config['m_frags']}: two warpgroups on one "
                    "block take half an M tile each, of at least 64 tokens (m_frags 8 or 16)")
        return None
    if blocks % consumers or blocks // consumers * m_tile > most:
        return (f"warps_n={blocks}, warps_k={consumers}, m_frags={config['m_frags']}: each "
                "consumer warpgroup takes the same number of n64 blocks, and blocks per "
                f"warpgroup x M tile is at most {most} ({sums})")
    return None


def check_wgmma(target, key: dict, config: dict) -> Optional[str]:
    """``check_knobs`` for the sm_90a wgmma kernel (include/qcompiler/wgmma.cuh), whose knobs
    mean: ``m_frags`` the CTA's M tile / 16, ``warps_n`` its n64 blocks, ``warps_k`` its
    consumer warpgroups, ``stages`` the TMA ring's depth (stages of 64 K rows: ``stage_k`` =
    64), ``split_k``. With ``wgmma=1`` the warpgroups split the tokens (64 each) over four
    blocks; with ``wgmma=2`` they split the blocks over all the M tile's tokens (at most 256:
    one wgmma's N), a warpgroup holding (blocks / warpgroups) x M tile / 2 <= 128 fp32
    accumulators a thread."""
    from qcompiler.codegen.cuda.layout import K_ALIGN, pad_to
    from qcompiler.codegen.cuda.tuning import _bits, _group, _smem_limit, smem_bytes

    problem = _wgmma_target_reason(target, config)
    if problem:
        return problem
    if _bits(key) > 4:
        return "the wgmma kernel reads 4-bit containers (codes of at most 4 bits)"
    if config["gemv"] != 0 or config["acc_scale"] != 0 or config["stage_k"] != 64:
        return "the wgmma kernel takes gemv=0, acc_scale=0 and stage_k=64"
    consumers, blocks = config["warps_k"], config["warps_n"]
    if config["wgmma"] == 1:
        if blocks != 4:
            return f"warps_n={blocks}: the token-split wgmma kernel's N tile is 4 n64 blocks (4)"
        if consumers not in (1, 2) or config["m_frags"] != 4 * consumers:
            return (f"warps_k={consumers}, m_frags={config['m_frags']}: the token-split wgmma "
                    "kernel takes 1 or 2 consumer warpgroups (warps_k) of 64 tokens "
                    "(m_frags = 4 warps_k)")
    else:
        problem = _block_split_reason(config, 256, "128 accumulators a thread",
                                      token_halves=True)
        if problem:
            return problem
    if not 2 <= config["stages"] <= WGMMA_MAX_STAGES:
        return f"stages={config['stages']} not in [2, {WGMMA_MAX_STAGES}]"
    group = _group(key)
    if group and not (group % 64 == 0 or 64 % group == 0):
        return f"group {group} and the wgmma kernel's 64-row stages do not nest"
    k_tiles = pad_to(key["k"], K_ALIGN) // 64
    if not 1 <= config["split_k"] <= k_tiles:
        return f"split_k={config['split_k']} not in [1, {k_tiles}] (K has {k_tiles} tiles of 64)"
    need = smem_bytes(config, key, group=group or 1 << 30)
    if need > _smem_limit(target):
        return f"needs {need} bytes of shared memory"
    return None


def check_wgmma_act8(target, key: dict, config: dict) -> Optional[str]:
    """``check_knobs`` for the sm_90a wgmma kernel with 8-bit activations
    (include/qcompiler/wgmma_act8.cuh: ``wgmma=2`` with ``int8=1`` or ``fp8=1``), whose knobs
    mean as the block-split wgmma kernel's, with stages of 128 K rows (``stage_k`` = 128): the
    weights and permission of the 8-bit-activation kernel, int8 group scales of whole stages
    (a multiple of 128 rows; they are folded into fp32 sums every stage, so a warpgroup holds
    s32 and fp32 sums: blocks a warpgroup x M tile <= 128), FP8 with per-channel scales (its
    sums promoted into fp32 ones every stage: the same register rule)."""
    from qcompiler.codegen.cuda.layout import K_ALIGN, pad_to
    from qcompiler.codegen.cuda.tuning import _bits, _group, _smem_limit, smem_bytes

    knob = "int8" if config.get("int8", 0) else "fp8"
    problem = _wgmma_target_reason(target, config) or (
        (int8_permission_reason(key) or int8_weight_reason(key)) if knob == "int8"
        else fp8_weight_reason(target, key))
    if problem:
        return problem
    if config["gemv"] or config["acc_scale"]:
        return f"the wgmma kernel with {knob} activations takes gemv=0 and acc_scale=0"
    if config["wgmma"] != 2:
        return f"{knob}=1 on the wgmma kernel takes the block-split mapping (wgmma=2)"
    if config["stage_k"] != 128:
        return (f"the wgmma kernel with {knob} activations takes stage_k=128 (one 128-byte "
                "row of codes)")
    group = _group(key)
    if knob == "fp8" and group:
        return "FP8 activations on the wgmma kernel take per-channel weight scales"
    if group and group % 128:
        return (f"group size {group}: the wgmma kernel with int8 activations folds whole "
                "128-row stages (groups of a multiple of 128 rows)")
    k_pad = pad_to(key["k"], K_ALIGN)
    if k_pad % 128:
        return f"K padded to {k_pad} is not a multiple of the 128-row stages"
    # group scales and FP8 keep a stage's sums, the held ones and fp32 ones in registers
    if group:
        problem = _block_split_reason(config, 128, "s32 and fp32 sums in registers")
    elif knob == "fp8":
        problem = _block_split_reason(config, 128, "a stage's fp32 sums promoted into others")
    else:
        problem = _block_split_reason(config, 256, "128 accumulators a thread")
    if problem:
        return problem
    if not 2 <= config["stages"] <= 8:
        return f"stages={config['stages']} not in [2, 8]"
    if not 1 <= config["split_k"] <= k_pad // 128:
        return (f"split_k={config['split_k']} not in [1, {k_pad // 128}] (K has "
                f"{k_pad // 128} stages of 128)")
    need = smem_bytes(config, key, cb=8 if _bits(key) > 4 else 4, group=group or 1 << 30)
    if need > _smem_limit(target):
        return f"needs {need} bytes of shared memory"
    return None


def _node(node) -> str:
    return f"%{node.result.name}" if node is not None else "qmatmul"


def _choice(config: dict, knob: str, allowed: tuple, where: str) -> str:
    value = config.get(knob)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{where}: config {knob}={value!r} is not one of {', '.join(allowed)}")
    return value


def validate(config, node, target=None) -> CudaConfig:
    """The typed config of a packed, tiled qmatmul ``node``; ``ConfigError`` naming the node
    and the knob when any value is not one the kernels were written for.

    ``target`` (a Target) enables the shared-memory limit of ``check_knobs``; without it the
    target named by the config is used.
    """
    from qcompiler.targets import get_target
    from qcompiler.tuning.key import kernel_key

    where = _node(node)
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config is {type(config).__name__}, not a dict")
    unpack = _choice(config, "unpack", UNPACKS, where)
    scale_at = _choice(config, "scale_at", SCALE_AT, where)
    zero_at = _choice(config, "zero_at", ZERO_AT, where)
    if config.get("wgmma_pdl", 0) not in (0, 1) or isinstance(config.get("wgmma_pdl"), bool):
        raise ConfigError(f"{where}: wgmma_pdl={config.get('wgmma_pdl')!r} is not 0 or 1")
    x_dtype = node.operands[0].type.dtype.name
    if x_dtype not in X_DTYPES:
        raise ConfigError(f"{where}: the CUDA kernels take f16 or bf16 activations, not {x_dtype}")
    lay = node.arg("w").type.layout
    for param in LAYOUT_INTS:
        if lay is None or not is_int(lay.get(param)):
            raise ConfigError(f"{where}: weight layout parameter {param}="
                              f"{None if lay is None else lay.get(param)!r} is not an int")
    if target is None:
        name = config.get("target")
        if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
            raise ConfigError(f"{where}: config target={name!r} is not a target name")
        try:
            target = get_target(name)
        except Exception:
            raise ConfigError(f"{where}: config target={name!r} is not a known target") from None
    raw = config.get("variants")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: config variants must be a non-empty dict of M buckets")
    variants = []
    for bucket, v in raw.items():
        at = f"{where} variant {bucket!r}"
        if not isinstance(v, dict):
            raise ConfigError(f"{at}: a variant is a dict of knobs, not {type(v).__name__}")
        if not is_int(v.get("m_max")) or v["m_max"] < 1:
            raise ConfigError(f"{at}: m_max={v.get('m_max')!r} is not a positive int")
        source = v.get("source")
        if not isinstance(source, str) or source not in SOURCES:
            raise ConfigError(f"{at}: source={source!r} is not one of {', '.join(SOURCES)}")
        problem = check_knobs(target, kernel_key(node, min(v["m_max"], 1 << 20)), v)
        if problem:
            raise ConfigError(f"{at}: {problem}")
        variants.append(Variant(m_max=v["m_max"], source=source,
                                **{k: v[k] for k in KNOBS},
                                **{k: v.get(k, d) for k, d in OPTIONAL_KNOBS.items()}))
    return CudaConfig(unpack, scale_at, zero_at, tuple(sorted(variants, key=lambda v: v.m_max)))
