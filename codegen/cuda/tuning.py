"""Tuning hooks of the CUDA backend (the tuning contract: docs/tuning-log.md and the tuner).

A config is one kernel variant. ``gemv`` picks the kernel:

- ``gemv=0``, the tiled tensor-core kernel: ``m_frags`` (M tile = 16 m_frags), ``warps_n``
  (n64 warp tiles side by side: N tile = 64 warps_n), ``warps_k`` (warps splitting each
  stage), ``stages`` (cp.async pipeline depth), ``stage_k`` (K rows per stage: 64 or 128),
  ``acc_scale`` (1: group scales multiply fp32 per-group sums instead of the B fragments; M
  tile 16 only) and ``split_k`` (CTAs splitting K, reduced by the last CTA of each tile);
- ``wgmma=1`` (cuda-sm90 only, 4-bit codes), the sm_90a wgmma/TMA kernel with its consumer
  warpgroups splitting the tokens (include/qcompiler/wgmma.cuh; ``gemv=0``): ``m_frags`` = M
  tile / 16 with 64 tokens per consumer warpgroup (4 or 8), ``warps_k`` the consumer
  warpgroups (1 or 2), ``warps_n`` = 4 (N tile 256), ``stages`` (TMA ring depth, stages of
  ``stage_k`` = 64 rows), ``split_k``;
- ``wgmma=2``, the same kernel with the warpgroups splitting the N tile: ``m_frags`` = M tile
  / 16 (4, 8 or 16: every warpgroup covers all of the tile's tokens), ``warps_n`` the n64
  blocks of the N tile, shared evenly by ``warps_k`` warpgroups (1 or 2), blocks per
  warpgroup x M tile <= 256;
- ``int8=1`` (with ``gemv=0``, ``wgmma=0``, ``acc_scale=0``), the tiled kernel with int8
  activations (include/qcompiler/tiled_i8.cuh): the same knobs; only for a qmatmul whose
  ``accuracy_level`` is 4 (``tile{int8_min_m=...}`` picks it; ``int8_default``);
- ``gemv=1``, the split-K GEMV kernel for small M (weights straight from global memory into
  registers, operands swapped): ``m_frags`` (1 or 2: M tile = 8 m_frags), ``warps_n``,
  ``warps_k`` (warps splitting the CTA's K range, summed in shared memory), ``stages`` (k16
  steps each warp keeps in flight) and ``split_k``; ``stage_k`` and ``acc_scale`` are unused
  and must be 64 and 0.

``qcompiler.tuning`` is imported lazily so this works without it.
"""
from __future__ import annotations

import functools
import math
import os

from qcompiler.codegen.cuda.config import KNOBS, OPTIONAL_KNOBS  # noqa: F401  (a variant's knobs)
from qcompiler.codegen.cuda.layout import K_ALIGN, N_ALIGN, pad_to


def _sm_count(target) -> int:
    return int(target.params.get("sm_count", 132))


def _smem_limit(target) -> int:
    return int(target.params.get("shared_memory_kib", 164)) * 1024 - 1024


def smem_bytes(config: dict, key: dict, cb: int = 4, group: int = 128,
               scale_in_registers: bool = True, has_zp: bool = True) -> int:
    """Shared memory of one CTA (mirrors ``Tile`` and ``GemvTile`` in include/qcompiler/)."""
    m_tile, n_tile = 16 * config["m_frags"], 64 * config["warps_n"]
    if config.get("wgmma") and (config.get("int8") or config.get("fp8")):
        # mirrors WgmmaAct8Tile: stages of 128 rows of x codes, packed weights, and (group
        # scales) a scale and zero-point row and the tile's x scales and code sums
        wb = 8 * config["warps_n"] * 512 * (cb // 4)
        rows = n_tile * 2 * (1 + int(has_zp)) + 2 * m_tile * 4 if group < 1 << 30 else 0
        stage = -(-(m_tile * 128 + wb + rows) // 1024) * 1024
        return max(config["stages"] * stage, m_tile * (n_tile + 4) * 4) \
            + 2 * config["stages"] * 8 + 16 + 1024
    if config.get("wgmma"):  # mirrors WgmmaTile: the ring of stages, or the fp32 tile after it
        srows = 64 // group if group < 64 else 1
        stage = m_tile * 128 + 4 * config["warps_n"] * 512 \
            + srows * n_tile * 2 * (int(scale_in_registers) + int(has_zp))
        stage = -(-stage // 1024) * 1024
        return max(config["stages"] * stage, m_tile * (n_tile + 4) * 4) \
            + 2 * config["stages"] * 8 + 16 + 1024
    if config.get("gemv"):  # one fp32 tile of 8 m_frags rows per k warp
        return config["warps_k"] * 8 * config["m_frags"] * n_tile * 4 + 16
    sk = config.get("stage_k", 64)
    srows = sk // group if group < sk else 1
    int8 = config.get("int8", 0) or config.get("fp8", 0)  # TileI8: 1-byte x codes, x scales
    stage = (sk // 16) * config["warps_n"] * (cb // 4) * 32 * 16 + m_tile * sk * (1 if int8 else 2)
    stage += (srows * n_tile * 2) * (int(scale_in_registers) + int(has_zp))
    if int8 and scale_in_registers:
        stage += srows * m_tile * 4
    return max(config["stages"] * stage, m_tile * n_tile * 4) + 16


@functools.lru_cache(maxsize=256)
def _scheme(text: str):
    from qcompiler.tuning.key import scheme_of

    return scheme_of({"w_scheme": text})


def _bits(key: dict) -> int:
    return _scheme(key["w_scheme"]).dtype.bits


def _group(key: dict) -> int:
    """The K group size of ``key``'s scheme; 0 for per-channel/per-tensor."""
    s = _scheme(key["w_scheme"])
    return s.block_size if s.granularity == "group" else 0


def search_space(target, key) -> dict:
    m = key["m"]
    n_blocks = pad_to(key["n"], N_ALIGN) // 64
    wgmma16 = "wgmma" in target.features and _bits(key) <= 4 and m > 32
    # the wgmma kernel with int8 activations (block split only) takes 8-bit codes too
    wgmma = wgmma16 or "wgmma" in target.features and m > 64 and int8_permitted(key)
    # The GEMV kernel up to 64 rows, and at any M on weights small enough (default_config)
    gemv_permitted = m <= 64 or gemv_reread_bytes(key) < GEMV_MAX_REREAD_BYTES
    return {
        # wgmma=2 (the block split) where its M tiles of 128 and more are not mostly padding.
        "wgmma": [0] + ([1] if wgmma16 else []) + ([2] if wgmma and m > 64 else []),
        "gemv": [1, 0] if gemv_permitted else [0],
        # No tile beyond M (the GEMV kernel's tiles are 8 m_frags rows).
        "m_frags": [f for f in (1, 2, 4) if 16 * f <= max(16, m) or f == 2 and m > 8]
                   + ([8] if wgmma and m > 64 else []) + ([16] if wgmma and m > 128 else []),
        # The wgmma kernels' N tiles may be partial (the token split's is always 4 n64 blocks;
        # the block split's 1, 2 or 4).
        "warps_n": [w for w in (1, 2, 4, 8) if n_blocks % w == 0 or w <= 4 and wgmma],
        "warps_k": [1, 2, 4, 8, 16] if gemv_permitted else [1, 2, 4],
        "stages": [2, 3, 4, 5, 6, 8] + ([10, 12] if wgmma else []),
        "stage_k": [64, 128],
        # (the tiled kernel's at up to 16 rows; the GEMV's wherever it runs: its runs of one
        # group, config.gemv_runs_in_one_group, filter the combinations)
        "acc_scale": [0, 1] if (m <= 16 or gemv_permitted) and _group(key) else [0],
        "split_k": list(range(1, 17)),
        # int8 activations where the model permits them (accuracy_level 4) and the kernel
        # takes the weights; its own rules (config.check_int8) filter the combinations.
        "int8": [0, 1] if m > 16 and int8_permitted(key) else [0],
    }


def int8_permitted(key: dict) -> bool:
    """The int8-activation kernel may compute ``key``: the model permits int8 activations
    (accuracy_level 4) and the kernel takes its weights."""
    from qcompiler.codegen.cuda.config import INT8_ACCURACY_LEVEL, int8_weight_reason

    return key.get("accuracy_level") == INT8_ACCURACY_LEVEL and int8_weight_reason(key) is None


def default_config(target, key, gemv_fill: bool = False, gemv_acc_scale: bool = True,
                   wgmma_stages: int = 0) -> dict:
    """The heuristic, fitted to sweeps on an H100 (benchmarks/bench_cuda.py --sweep):

    - the GEMV kernel (``gemv_default``) up to 16 rows, and for weights under 2^26 elements
      up to 32 rows, and up to 64 when N <= 8192 (its M tiles of 16 re-read the weights from
      L2; on larger weights the tiled kernel's reuse wins); at any M where those re-reads stay
      small (``GEMV_MAX_REREAD_BYTES``: an encoder's short-K layers at a few hundred rows, where
      the tiled kernel's fixed cost per CTA is most of its time);
    - M <= 32, and M <= 64 when N and K < 16384: M tile 32, 2x4 warps, 4 stages of 128 rows;
      split at most 4, same bound (one CTA per SM above 32 rows);
    - larger M: M tile 64 (more reuse of each dequantized weight), 4x2 warps, 3 stages of 128
      rows; these CTAs use ~200 registers a thread (one per SM), so split while the grid
      stays within one CTA per SM;
    - above 128 rows (prefill): the wgmma kernel for 4-bit codes on cuda-sm90 where K >= 1024
      (``wgmma_default``: its block-split mapping), else M tile 64 with 2x2 warps and no split
      (fitted at M = 512 on the H200).
    Stages of 64 rows when K (padded to 64) is not a multiple of 128 or the group does not
    nest with 128. ``wgmma_stages``: the wgmma kernel's deepest ring (0: ``WGMMA_STAGES``).
    """
    m, k, n = key["m"], key["k"], key["n"]
    if m <= 16 or n * k < 1 << 26 and (m <= 32 or m <= 64 and n <= 8192) \
            or gemv_reread_bytes(key) < GEMV_MAX_REREAD_BYTES:
        return gemv_default(target, key, gemv_fill, gemv_acc_scale)
    # The wgmma kernel where its N tiles of 256 alone fill the GPU (measured on the H200,
    # benchmarks/results/cuda-20261203-0831.json: 1.31x / 1.61x cuBLAS at M = 64 / 128 on
    # 28672x8192).
    # Above 128 rows (prefill) the wgmma kernel on every 4-bit shape: at M = 512 on the
    # H200 it beat the tiled kernel's best config on each decoder shape measured, by up to
    # 1.7x (benchmarks/results/prefill-gemm-h200-20261203-2210.json).
    # Not on short K: the wgmma kernels' CTA has a fixed cost of ~5.8 us (launch, TMA fill,
    # the end of the tile; tuning.block_split_estimate_us), more than a K loop under 1024
    # rows takes; an encoder's 384 x 384 layers at 256 rows ran its whole model 2.2x slower
    # (MiniLM 8x32: 0.532 ms with the tiled kernel on 2026-12-03, 1.19 with wgmma).
    long_k = pad_to(k, K_ALIGN) >= 1024
    if "wgmma" in target.features and _bits(key) <= 4 and m > 32 and long_k \
            and (m > 128 or pad_to(n, N_ALIGN) // 256 >= 0.75 * _sm_count(target)):
        cfg = wgmma_default(target, key, wgmma_stages or WGMMA_STAGES)
        if check_config(target, key, cfg) is None:  # e.g. a group that 64 rows do not nest
            return cfg
    sms = _sm_count(target)
    n_blocks = pad_to(n, N_ALIGN) // 64
    if m <= 32 or (m <= 64 and n_blocks < 256 and k < 16384):
        # Up to 64 rows on N, K < 16384: two M tiles of 32 that share each weight tile in L2
        # beat one tile of 64 (measured), whose ~200 registers allow one CTA per SM.
        cfg = {"m_frags": 2, "warps_n": 2, "warps_k": 4, "stages": 4}
        max_split, ctas_per_sm = 4, 2 if m <= 32 else 1
    elif m <= 128:
        cfg = {"m_frags": 4, "warps_n": 4, "warps_k": 2, "stages": 3}
        max_split, ctas_per_sm = 4, 1
    else:
        # Prefill: N tiles of 128 and no split of K (at M = 512 on the H200 split-K ran 1.5-3x
        # slower on every shape, and N tiles of 256 left SMs idle on 2048-wide layers).
        cfg = {"m_frags": 4, "warps_n": 2, "warps_k": 2, "stages": 3}
        max_split, ctas_per_sm = 1, 1
    group = _group(key)
    k_pad = pad_to(k, K_ALIGN)
    cfg["stage_k"] = 128 if k_pad % 128 == 0 and (not group or group % 128 == 0
                                                  or 128 % group == 0) else 64
    while n_blocks % cfg["warps_n"]:
        cfg["warps_n"] //= 2

    def ctas_of(c):
        return (n_blocks // c["warps_n"]) * math.ceil(m / (16 * c["m_frags"]))

    # Narrow layers (an encoder's 384 x 1536 at M = 256: 24 CTAs of 64 x 256 on 132 SMs)
    # leave most SMs idle even split 4 ways (split-K needs K to split): narrower tiles first
    # (fewer N warps), then shorter ones, until the grid covers the SMs. Shapes that split-K
    # fills keep the tiles the sweeps chose.
    most_split = max(1, min(max_split, k_pad // cfg["stage_k"] // 2))
    while ctas_of(cfg) * most_split < 0.75 * sms and (cfg["warps_n"] > 1 or cfg["m_frags"] > 1):
        if cfg["warps_n"] > 1:
            cfg["warps_n"] //= 2
        else:
            cfg["m_frags"] //= 2
        cfg["warps_k"] = min(4, cfg["warps_k"] * 2) if cfg["warps_n"] * cfg["warps_k"] < 8 \
            else cfg["warps_k"]
        max_split, ctas_per_sm = (4 if m <= 128 else 1), 2  # prefill: never split (above)
    ctas = ctas_of(cfg)
    stages_total = k_pad // cfg["stage_k"]
    split = 1
    while (split * 2 <= max_split and ctas * split * 2 <= ctas_per_sm * sms
           and stages_total // (split * 2) >= 2):
        split *= 2
    cfg["split_k"] = split
    cfg["acc_scale"] = 0
    cfg["gemv"] = 0
    cfg["wgmma"] = 0
    while check_config(target, key, cfg) and cfg["stages"] > 2:
        cfg["stages"] -= 1
    return cfg


# The GEMV kernel at M rows reads the weights once per M tile of (up to) 16 rows, from L2
# after the first. Below this many bytes of weight codes read in all it beats the tiled and
# wgmma kernels whatever M. On an H100 (benchmarks/results/gpu-h100-20261206-0651/, MiniLM's
# layers at M = 256: 3.5-4.7 MB) the best GEMV config took 3.4-6.2 us against the
# heuristic's tiled / wgmma kernel's 6.1-13.8 us (cuBLAS fp16 3.1-4.7). The tiled kernel is
# latency-bound there: one CTA of 4 warps an SM, ~1800 dependent instructions a warp, 14 %
# issue (Nsight Compute, ncu-gemm-1152x384x256.txt). A bucket's key has its largest M (512
# for 8 x 32 tokens), where MiniLM's layers read 7-9.4 MB.
GEMV_MAX_REREAD_BYTES = 16 << 20


def gemv_reread_bytes(key: dict, tile_rows: int = 16) -> int:
    """Bytes of weight codes the GEMV kernel reads at ``key``'s M: once per M tile of
    ``tile_rows`` rows (16: its largest tile)."""
    return math.ceil(key["m"] / tile_rows) * key["n"] * key["k"] * _bits(key) // 8


# The block-split wgmma kernel's tiles the prefill heuristic weighs: (M tile, n64 blocks,
# consumer warpgroups), largest first.
BLOCK_SPLIT_TILES = ((256, 2, 2), (128, 4, 2), (128, 2, 2), (256, 1, 1), (128, 1, 1))
# Its time per CTA, fitted on the H200 (prefill-gemm-h200-20261204-0732.json, W4 g128 fp16,
# K 2048 and 5632, M 512 and 4096; the fit is within 10 % of every one-wave and multi-wave
# row): a fixed ~5.8 us (launch, pipeline fill, the end of the tile), then per k16 step
# 0.05 us plus 0.25 ns per column of the step's wgmmas (blocks x M tile: the tensor cores'
# rate). Time = waves x per-CTA time, one CTA per SM.
BLOCK_SPLIT_FIXED_US, BLOCK_SPLIT_STEP_US, BLOCK_SPLIT_COLUMN_US = 5.8, 0.05, 0.00025


def block_split_estimate_us(target, key, m_tile: int, blocks: int) -> float:
    """The fitted time of the block-split kernel with this tile (no split of K)."""
    ctas = math.ceil(key["m"] / m_tile) * math.ceil(pad_to(key["n"], N_ALIGN) // 64 / blocks)
    steps = pad_to(key["k"], K_ALIGN) // 16
    per_cta = BLOCK_SPLIT_FIXED_US + steps * (BLOCK_SPLIT_STEP_US
                                              + BLOCK_SPLIT_COLUMN_US * blocks * m_tile)
    return math.ceil(ctas / _sm_count(target)) * per_cta


# The wgmma kernel's ring: the deepest that fits in shared memory, at most this many stages of
# 64 K rows (check_wgmma allows up to WGMMA_MAX_STAGES; tile{wgmma_stages=N} asks for more).
WGMMA_STAGES = 6


def wgmma_default(target, key, max_stages: int = WGMMA_STAGES) -> dict:
    """The wgmma kernel's config (cuda-sm90, 4-bit codes, M > 32 where the tiled kernel ran):

    - above 128 rows (prefill), the block-split mapping (``wgmma=2``): the tile of
      ``BLOCK_SPLIT_TILES`` with the least fitted time (``block_split_estimate_us``; large
      tiles where the grid still fills the GPU, M tiles of 128 on one warpgroup for narrow
      layers), no split of K (split-K's fix-up lost on every shape measured at M = 512);
    - up to 128 rows, the token-split mapping (``wgmma=1``): two consumer warpgroups (M tile
      128) above 64 rows where M tiles of 128 still give ~0.6 CTAs per SM, else one (M tile
      64); K split 2 ways where the grid is at most half the SMs and each split keeps at
      least 32 stages of 64 rows;
    - the deepest ring of stages that fits in shared memory, at most ``max_stages``.
    """
    m = key["m"]
    sms = _sm_count(target)
    if m > 128:
        m_tile, blocks, consumers = min(
            BLOCK_SPLIT_TILES, key=lambda t: block_split_estimate_us(target, key, t[0], t[1]))
        cfg = {"wgmma": 2, "gemv": 0, "m_frags": m_tile // 16, "warps_n": blocks,
               "warps_k": consumers, "stages": max_stages, "stage_k": 64, "acc_scale": 0,
               "split_k": 1}
    else:
        n_tiles = math.ceil(pad_to(key["n"], N_ALIGN) / 256)
        # M tiles of 128 only where they still give the grid ~0.6 CTAs per SM.
        consumers = 2 if m > 64 and math.ceil(m / 128) * n_tiles >= 0.6 * sms else 1
        ctas = math.ceil(m / (64 * consumers)) * n_tiles
        stages_total = pad_to(key["k"], K_ALIGN) // 64
        split = 2 if 2 * ctas <= sms and stages_total // 2 >= 32 else 1
        cfg = {"wgmma": 1, "gemv": 0, "m_frags": 4 * consumers, "warps_n": 4,
               "warps_k": consumers, "stages": max_stages, "stage_k": 64, "acc_scale": 0,
               "split_k": split}
    while check_config(target, key, cfg) and cfg["stages"] > 2:
        cfg["stages"] -= 1
    return cfg


def int8_default(target, key) -> dict:
    """The int8-activation kernel's config: ``act8_default`` with ``int8=1``."""
    return act8_default(target, key, "int8")


def fp8_default(target, key) -> dict:
    """The FP8-activation kernel's config: ``act8_default`` with ``fp8=1`` (the same kernel;
    at M tiles of 64 ptxas spilled 92 bytes a thread on sm_90 here too)."""
    return act8_default(target, key, "fp8")


def act8_default(target, key, knob: str) -> dict:
    """The 8-bit-activation kernels' config with ``knob`` (``int8`` or ``fp8``) set: on a
    target with wgmma, the sm_90a wgmma kernel (``act8_wgmma_default``) above 64 rows where it
    takes the layer, else the tiled mma.sync kernel (``act8_tiled_default``)."""
    if "wgmma" in getattr(target, "features", ()) and key["m"] > 64:
        cfg = act8_wgmma_default(target, key, knob)
        if check_config(target, key, cfg) is None:
            return cfg
    return act8_tiled_default(target, key, knob)


def act8_wgmma_default(target, key, knob: str) -> dict:
    """The wgmma kernel with 8-bit activations (include/qcompiler/wgmma_act8.cuh): N tiles of
    two n64 blocks, one a consumer warpgroup, over M tiles of 256 tokens with per-channel
    scales (fp32 or s32 sums only) where that grid gives every SM a CTA, else 128 (group
    scales always: s32 and fp32 sums); where the grid still leaves SMs idle, one warpgroup of
    one block a CTA (twice the CTAs). No split of K: on an H100 (2026-12-06 16:20, W4A8
    g128, M = 256, 4096 x 4096, x's quantization in the time) the one-warpgroup tile took
    45.9 us split 2 ways and 30.9 us unsplit (W4A16: 25.0); at M = 4096 two warpgroups of two
    blocks took 315.9 us against one's 437.4."""
    m, group = key["m"], _group(key)
    n_blocks = pad_to(key["n"], N_ALIGN) // 64
    sms = _sm_count(target)
    # per-channel: 256-token tiles where they still give every SM a CTA of two blocks, else
    # 128 (twice the CTAs; reasoned from the g128 runs, where a small grid lost most: not
    # yet measured for per-channel weights)
    # FP8: 128 tokens always (each stage's sums are promoted into fp32 ones, as group scales
    # fold them: three sets of sums in registers)
    wide = not group and knob != "fp8"
    m_frags = 16 if wide and math.ceil(m / 256) * math.ceil(n_blocks / 2) >= sms else 8
    cfg = {"gemv": 0, "wgmma": 2, "acc_scale": 0, "int8": int(knob == "int8"),
           "fp8": int(knob == "fp8"), "m_frags": m_frags, "warps_n": 2, "warps_k": 2,
           "stages": 4, "stage_k": 128}
    m_tiles = math.ceil(m / (16 * m_frags))
    if m_tiles * math.ceil(n_blocks / 2) < sms:
        cfg.update(warps_n=1, warps_k=1)
    cfg["split_k"] = 1
    while check_config(target, key, cfg) and cfg["stages"] > 2:
        cfg["stages"] -= 1
    return cfg


def act8_tiled_default(target, key, knob: str) -> dict:
    """The tiled 8-bit-activation kernel's config (include/qcompiler/tiled_i8.cuh) with
    ``knob`` (``int8`` or ``fp8``) set: the shape of the f16 tiled kernel's heuristic, with M
    tiles of 32 rows (16 up to 16 rows; at 64 rows ptxas spilled 100 bytes a thread at 255
    registers on sm_80 and sm_90 with per-channel scales, and group scales allow at most 32),
    N tiles of 256, two k warps, stages of 128 rows where K and the group allow, and a split of
    K while the grid stays within two CTAs per SM (at most 4 ways, two stages a split). Timed
    once (H100, M = 256): 2.7-3.7x slower than W4A16 on wgmma, so sm_90 takes the wgmma
    kernel above 64 rows."""
    m, group = key["m"], _group(key)
    k_pad = pad_to(key["k"], K_ALIGN)
    n_blocks = pad_to(key["n"], N_ALIGN) // 64
    m_frags = 1 if m <= 16 else 2
    stage_k = 128 if k_pad % 128 == 0 and (not group or group % 128 == 0 or 128 % group == 0) \
        else 64
    cfg = {"gemv": 0, "wgmma": 0, "acc_scale": 0, "int8": int(knob == "int8"),
           "fp8": int(knob == "fp8"), "m_frags": m_frags, "warps_n": 4, "warps_k": 2,
           "stages": 4, "stage_k": stage_k}
    while n_blocks % cfg["warps_n"]:
        cfg["warps_n"] //= 2
    ctas = math.ceil(m / (16 * m_frags)) * (n_blocks // cfg["warps_n"])
    split = 1
    while split * 2 <= 4 and ctas * split * 2 <= 2 * _sm_count(target) \
            and k_pad // stage_k // (split * 2) >= 2:
        split *= 2
    cfg["split_k"] = split
    while check_config(target, key, cfg) and cfg["stages"] > 2:
        cfg["stages"] -= 1
    return cfg


def gemv_registers(config: dict, cb: int) -> int:
    """Registers a GEMV thread spends on its ring of loads in flight (per step: the weight
    words and the x fragments) and on its accumulators."""
    mf = config["m_frags"]
    return config["stages"] * (4 * (cb // 4) + 2 * mf) + 16 * mf


# Of the 128 registers a GEMV thread may use (16 warps per SM). Measured with ptxas -v: more
# spills to local memory once zero points and scales of the group are added.
GEMV_REGISTERS = 64


def gemv_default(target, key, fill: bool = False, acc_scale: bool = True) -> dict:
    """The GEMV kernel's config. Fitted to M = 1 sweeps on the H200 of the decode shapes of a
    1B model (K = 2048 or 5632, N from 256 to 32000; benchmarks/results/cuda-h200-20261203-1837
    .json) and to M = 16-512 sweeps on an H100 of an encoder's short-K layers and 2048^2
    (benchmarks/results/gpu-h100-20261206-0651/); not yet re-swept on the 4096-28672 shapes
    the earlier H100 fit came from (the old rule gave them 8 or 16 k warps, 8 steps):

    - M tiles of 8 rows up to 8 rows, and up to 256 rows where the weights that 8-row tiles
      re-read stay under ``GEMV_MAX_REREAD_BYTES`` (more CTAs for a grid that is small in N:
      10-20 % faster at M = 16-256 on those shapes), else 16;
    - one wave of warps at 16 warps per SM (the register cap) is the aim: k warps per CTA
      16, halved while the grid would take more than a wave, down to 4. The grid is the N
      blocks, times the M tiles where the weights fit ``GEMV_MAX_REREAD_BYTES`` (then down to
      2 k warps: short-K layers at a few hundred rows ran best with 2);
    - split K across CTAs while a warp would have more than 8 k16 steps, or the grid has fewer
      warps than the GPU has SMs, keeping at least 4 steps a warp and one wave at most: the
      fix-up costs about a microsecond, which pays only on long K or tiny grids;
    - 8 k16 steps in flight with 16 k warps and no split, else 4 (more warps hide the rest).

    ``fill`` (``tile{gemv_fill=1}``, off: no faster in the 22-layer decode graph on an H100,
    0.941 against 0.926 ms, codegen/cuda/NOTES.md): then split K further
    where that lowers the largest share of the grid one SM runs. A CTA of 16 warps fills an
    SM's registers, so the rule above can leave most SMs idle: the 22-layer decode's qkv and
    o GEMVs ran 40 and 32 CTAs on 132 SMs, each SM issue-bound for ~8,300 cycles (Nsight,
    codegen/cuda/NOTES.md); split 2 halves each SM's share there.

    ``key["n"]`` is the kernel's columns: for fuse-gate-up's pairs the weight's (twice the
    result's; ``tuning.key.kernel_key``).

    ``acc_scale`` (``tile{gemv_acc_scale=1}``, the default): the group scales on each warp's
    fp32 sums after its loop instead of on every weight pair in it, where every warp's run
    lies in one group (``config.gemv_runs_in_one_group``: the decode's K = 2048 layers at group
    128, 16 k warps of 8 steps). The 8-layer decode graph on an H100: 0.352 -> 0.339 ms
    (benchmarks/results/gpu-h100-20261207-1540/).
    """
    cb = 8 if _bits(key) > 4 else 4
    sms = _sm_count(target)
    wave = 16 * sms
    m = key["m"]
    n_blocks = pad_to(key["n"], N_ALIGN) // 64
    k_steps = pad_to(key["k"], K_ALIGN) // 16
    mf = 1 if m <= 8 or m <= 256 and gemv_reread_bytes(key, 8) < GEMV_MAX_REREAD_BYTES else 2
    m_tiles = math.ceil(m / (8 * mf))
    cfg = {"gemv": 1, "m_frags": mf, "warps_n": 1, "warps_k": 16, "stages": 8, "stage_k": 64,
           "acc_scale": 0, "split_k": 1, "wgmma": 0}
    # The grid's M tiles count toward the wave where the weights are small enough for the
    # GEMV at any M (measured there); larger layers keep the M = 1 fit.
    grid_tiles = m_tiles if gemv_reread_bytes(key) < GEMV_MAX_REREAD_BYTES else 1
    least_warps_k = 2 if grid_tiles > 1 else 4
    while cfg["warps_k"] > least_warps_k and n_blocks * grid_tiles * cfg["warps_k"] > wave:
        cfg["warps_k"] //= 2
    if mf == 2 and n_blocks >= 128 and n_blocks % 2 == 0:
        cfg["warps_n"], cfg["warps_k"] = 2, min(cfg["warps_k"], 8)
    split = 1

    def steps(sp):  # k16 steps of each warp
        return k_steps // (cfg["warps_k"] * sp)

    def warps(sp):  # in the grid
        return n_blocks * grid_tiles * cfg["warps_k"] * sp

    while (split * 2 <= 16 and steps(split * 2) >= 4 and warps(split * 2) <= wave
           and (steps(split) > 8 or warps(split) < sms)):
        split *= 2
    if fill:
        def share(sp):  # of the grid's work, what the busiest SM runs
            ctas = n_blocks * grid_tiles * sp
            return math.ceil(ctas / sms) / ctas

        while (split * 2 <= 16 and steps(split * 2) >= 2 and warps(split * 2) <= wave
               and share(split * 2) < share(split)):
            split *= 2
    cfg["split_k"] = split
    if cfg["warps_k"] < 16 or split > 1:
        cfg["stages"] = 4
    while gemv_registers(cfg, cb) > GEMV_REGISTERS:
        cfg["stages"] -= 1
    while cfg["warps_k"] > 1 and k_steps // (cfg["warps_k"] * split) < cfg["stages"]:
        # short K: a ring of 4 steps, then fewer warps, each with a full ring (K = 384 at
        # 16 rows: 4 warps of 4 steps 3.2 us, 2 warps of 8 steps 4.8)
        if cfg["stages"] > 4:
            cfg["stages"] = 4
        else:
            cfg["warps_k"] //= 2
    if acc_scale:
        from qcompiler.codegen.cuda.config import gemv_runs_in_one_group

        group = _group(key)
        if group and group % 16 == 0 and not key.get("act_order") and gemv_runs_in_one_group(
                k_steps, split, cfg["warps_k"], group // 16):
            cfg["acc_scale"] = 1
    return cfg


def check_config(target, key, config) -> str | None:
    """None if ``config`` is a valid variant for ``key``, else why: the backend's validator
    (``config.check_knobs``: plain-int knobs, ranges, registers, shared memory)."""
    from qcompiler.codegen.cuda.config import check_knobs

    return check_knobs(target, key, config)


def build(target, key, config, workdir) -> str:
    """The tuner's build step, run for a batch of candidates in parallel worker processes:
    nvcc (or the build cache) for this candidate into ``workdir``, where ``measure`` finds
    the library up to date."""
    from qcompiler.codegen.cuda import bench_support
    from qcompiler.codegen.cuda import build as nv
    from qcompiler.tuning.errors import BuildError

    os.makedirs(workdir, exist_ok=True)
    try:
        built = bench_support.build_case(bench_support.case_from_key(key), workdir,
                                         target.name, variants=[config])
    except nv.BuildError as e:
        raise BuildError(str(e)) from None
    return built.lib


def measure(target, key, config, workdir, repeats: int = 50) -> dict:
    """Build this one kernel, check it against the reference on fresh random inputs, time it
    with CUDA events (median of ``repeats`` launches over weight copies larger than L2)."""
    from qcompiler.codegen.cuda import bench_support

    os.makedirs(workdir, exist_ok=True)
    return bench_support.measure_config(target, key, config, workdir, repeats)
