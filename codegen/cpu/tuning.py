"""The CPU backend's side of the tuning contract: search space, default, validity, measurement.

A key is ``qcompiler.tuning.key.kernel_key(node, m)``; the int8 path adds ``"numerics":
"int8"`` to it (the two numerics are different kernels with different best configs; the exact
path's key is the contract's key unchanged). A config is one kernel variant's knobs:

- ``m_block``: rows computed together (1, 2, 4, 8, 16);
- ``order``: ``row`` or ``group`` (see ``kernels.py``);
- ``k_unroll``: rows of a group unrolled, 1, 2 or 4 words of codes (exact path only; the int8
  path steps 4 rows per instruction).

The lut path (``"numerics": "lut"``) has its own knobs: ``table_group`` (4 or 2 activations
per table; it shapes the packed layout, so all variants of a node share it) and ``k_unroll``
(table groups unrolled in the inner loop; a kernel with the odd plane in quads unrolls at
least one quad, 4); its rows are computed one at a time.

The column tile (``n_tile``) is not tuned: it is 4 vectors of columns (4 independent
accumulators), fixed by the packed weight layout that all batch sizes share. The int8 path's
vectors are its dot instruction's: 16 int32 lanes (``vpdpbusd``, AVX-512 VNNI) or 8 (the AVX2
pair, on every x86 target without VNNI); on cpu-arm-dotprod 4 (``sdot``, ``arm.py``), and the
lut path's index vectors are 16 bytes there (``tbl``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.codegen.cpu import arm, kernels, layout
from qcompiler.codegen.cpu.host import target_cpu

M_BLOCKS = (1, 2, 4, 8, 16)
# The group order keeps one group's unpacked float32 codes (block x n_tile) in a stack buffer.
MAX_GROUP_TILE_BYTES = 64 * 1024


def scheme_from_str(text: str):
    """A QuantScheme from its printed form ``#quant<...>``."""
    from qcompiler.ir.parser import _Parser

    return _Parser(text, None).quant_scheme()


def node_key(node, m: int, numerics_mode: str) -> dict:
    """The tuning key of ``node`` at ``m`` rows (the contract's key; int8 adds its numerics)."""
    from qcompiler.tuning.key import kernel_key as contract_key

    key = contract_key(node, m)
    if numerics_mode != "exact":
        key["numerics"] = numerics_mode
    return key


@dataclass(frozen=True)
class Problem:
    """Everything the kernels need to know about a key on a target."""

    m: int
    k: int
    n: int
    scheme: object  # the logical QuantScheme (None when rebuilt from a packed layout)
    numerics: str
    blocking: layout.Blocking
    n_tile: int
    lanes: int
    container_bits: int
    table_group: int = 0  # lut: activations per table (the config's knob; 0 until chosen)
    zero_code: Optional[int] = None  # the packed layout's shared zero code (kernels.KernelShape)
    scale_dtype: str = "float32"  # the packed layout's scale type (kernels.KernelShape)
    byte_permute: bool = False  # lut on an AVX-512 VBMI target: vpermb lookups (kernels.py)
    # lut, an odd number of planes on a VBMI + VNNI target: the last plane's index nibbles of
    # four table groups interleaved per column and looked up in one vpermb of four tables
    # (kernels.py's quads); quads_capable says the target and bits allow it, single_quads that
    # the packed layout has it (with_table_group: the table group's flush runs must hold
    # whole quads)
    quads_capable: bool = False
    single_quads: bool = False

    @property
    def n_pad(self) -> int:
        return -(-self.n // self.n_tile) * self.n_tile

    def kernel_shape(self) -> kernels.KernelShape:
        return kernels.KernelShape(
            numerics=self.numerics, n_pad=self.n_pad, k_pad=self.blocking.k_pad,
            block=self.blocking.block, groups=self.blocking.groups, n_tile=self.n_tile,
            container_bits=self.container_bits, lanes=self.lanes,
            bits=self.container_bits if self.numerics == "lut" else 0,
            table_group=self.table_group, zero_code=self.zero_code,
            scale_dtype=self.scale_dtype, byte_permute=self.byte_permute,
            single_quads=self.single_quads)


# Column vectors per tile: independent accumulators that hide the FMA / vpdpbusd latency.
VECTORS_PER_TILE = 4


# lut: vectors of index bytes per column tile (each is vector-bytes columns: 2 x 16 (AVX2) or
# 2 x 32 (AVX-512) int16 sums per pair of planes; 4-bit codes keep 2 x 2 x 2 = 8 of them).
LUT_VECTORS_PER_TILE = 2
# 1- and 2-bit codes on zmm: 4 vectors (256 columns: 8 int16 sums and 16 zmm of float sums),
# each table load shared by twice the lookups: 4096 x 4096 2-bit 0.114 -> 0.108 ms on a Zen 4
# (2026-12-06), although the 32 registers are then so full that LLVM reloads vpmaddubsw's
# [1, 2] constant (vpbroadcastw) before every lookup (llvm-mca: ~7 % of the loop's pipe
# slots). AVX2's 16 ymm registers spill at 4 (0.137 -> 0.151 ms), 3- and 4-bit codes' 16
# sums would too.
LUT_VECTORS_PER_TILE_WIDE = 4


def n_tile_for(numerics_mode: str, bits: int, lanes: int, quads: bool = False) -> int:
    if numerics_mode == "lut":
        # (1-bit codes in quads keep 128 columns: their int32 sums take twice the registers)
        wide = lanes == 64 and bits <= 2 and not quads
        return lanes * (LUT_VECTORS_PER_TILE_WIDE if wide else LUT_VECTORS_PER_TILE)
    return lanes * VECTORS_PER_TILE


def problem(target, key: dict) -> Problem:
    """The Problem of ``key`` (raises layout.Unsupported for what the kernels cannot do)."""
    numerics_mode = key.get("numerics", "exact")
    if numerics_mode not in kernels.NUMERICS:
        raise layout.Unsupported(f"numerics {numerics_mode!r}: choose one of {kernels.NUMERICS}")
    if key.get("act") != "float":
        raise layout.Unsupported(f"act={key.get('act')}: the CPU kernels take float activations")
    if key.get("x_dtype") != "f32":
        raise layout.Unsupported(f"{key.get('x_dtype')} activations: the CPU kernels take f32")
    cpu = target_cpu(target)
    # aarch64: lut (tbl) on every Arm target, int8 (sdot) with +dotprod (arm.py)
    reason = arm.numerics_reason(cpu, numerics_mode, target.name)
    if reason:
        raise layout.Unsupported(reason)
    scheme = scheme_from_str(key["w_scheme"])
    bl = layout.blocking(scheme, key["k"], numerics_mode)
    lanes = cpu["vector_bits"] // 32
    if numerics_mode == "int8":
        # The int8 dot's int32 lanes: vpdpbusd on zmm (VNNI), else the AVX2 pair on ymm
        # (also on AVX-512 hosts without VNNI, where the zmm form saturates the same way).
        lanes = layout.VNNI_LANES if cpu["vnni"] else layout.AVX2_INT8_LANES
        if cpu["arch"] == "aarch64":
            lanes = layout.ARM_SDOT_LANES  # sdot on a 128-bit q register
    if numerics_mode == "lut":
        # bytes of one vector of table indices: vpshufb on ymm (AVX2) or zmm (AVX-512BW,
        # which every AVX-512 target here has); tbl on a NEON q register (16)
        lanes = cpu["vector_bits"] // 8
    quads = numerics_mode == "lut" and lut_quads_target(cpu) and scheme.bits % 2 == 1
    return Problem(m=key["m"], k=key["k"], n=key["n"], scheme=scheme, numerics=numerics_mode,
                   blocking=bl, n_tile=n_tile_for(numerics_mode, scheme.bits, lanes, quads),
                   lanes=lanes, container_bits=scheme.bits if numerics_mode == "lut"
                   else layout.container_bits(scheme.bits),
                   byte_permute=numerics_mode == "lut" and cpu["vbmi"], quads_capable=quads)


# lut on AVX-512 VBMI targets: vpermb on 64-byte tables (one plain load a table, no masks)
# while the weights come from the caches, vpshufb on 16-byte ones where they stream from
# memory. Zen 4, 1 thread, 4096^2 2-bit block 128, M = 1, alternated (benchmarks/
# ab_lut_lookup.py, ab-lut-lookup-20261208-0048-t1.json): vpermb 0.099 ms warm / 0.241 cold,
# vpshufb 0.114 / 0.206-0.214 (the tables, 4x smaller, stay in L1 beside the streamed codes).
# "Streams": the model's packed weights outgrow the last-level cache (so a decode step reads
# them from memory); odd planes in quads need vpermb either way.
def lut_byte_permute(p: Problem, model_weight_bytes: int, llc: int) -> bool:
    """Whether a lut kernel (its Problem ``p``, with the table group applied) looks its tables
    up with vpermb: on a VBMI target, unless the model's weights (``model_weight_bytes``)
    outgrow the last-level cache (``llc`` bytes; 0: unknown, so vpermb) and no plane goes in
    quads."""
    if not p.byte_permute:
        return False
    return p.single_quads or not (llc and model_weight_bytes > llc)


def lut_quads_target(cpu: dict) -> bool:
    """Whether a target (``target_cpu``) can look the odd plane up in quads: ``vpermb``
    (AVX-512 VBMI) and ``vpdpbusd`` (VNNI)."""
    return cpu["vbmi"] and cpu["vnni"]


def with_table_group(p: Problem, config: dict) -> Problem:
    """``p`` with the lut table group of a variant's (or a qmatmul config's first variant's)
    knobs, and with it whether the odd plane goes in quads (``single_quads``: on a target
    that can, where the int16 runs of the table group hold whole quads); other numerics
    unchanged."""
    if p.numerics != "lut":
        return p
    if "variants" in config:
        config = config["variants"]["v0"]
    g = config["table_group"]
    return dataclasses.replace(p, table_group=g, single_quads=p.quads_capable and (
        kernels.lut_flush_steps(p.blocking.block, g) % kernels.LUT_QUAD == 0))


def problem_from_layout(target, code_layout, config: dict) -> Problem:
    """The Problem of a packed qmatmul on ``target``, from its weight layout and its config."""
    block, k_pad = code_layout.get("block"), code_layout.get("k_pad")
    cpu = target_cpu(target)
    if code_layout.get("single_quads") and not lut_quads_target(cpu):
        raise layout.Unsupported(f"a cpu_lut layout with single_quads (vpermb and vpdpbusd) "
                                 f"on {target.name}, which lacks AVX-512 VBMI or VNNI")
    # lut: vpermb unless cpu-schedule chose vpshufb (config byte_permute=0: weights that
    # stream from memory, lut_byte_permute)
    byte_permute = config["numerics"] == "lut" and bool(config.get("byte_permute", cpu["vbmi"]))
    if byte_permute and not cpu["vbmi"]:
        raise layout.Unsupported(f"a lut config with vpermb lookups (byte_permute=1) on "
                                 f"{target.name}, which lacks AVX-512 VBMI")
    return Problem(m=1, k=code_layout.get("k"), n=code_layout.get("n"), scheme=None,
                   numerics=config["numerics"],
                   blocking=layout.Blocking(block, k_pad // block, k_pad),
                   n_tile=code_layout.get("n_tile"), lanes=config["lanes"],
                   container_bits=code_layout.get("container_bits"),
                   table_group=code_layout.get("table_group") or 0,
                   zero_code=code_layout.get("zero_code"),
                   scale_dtype=layout.SCALE_DTYPES[code_layout.get("scale_dtype") or "f32"],
                   byte_permute=byte_permute,
                   single_quads=bool(code_layout.get("single_quads")))


def _group_order_fits(p: Problem) -> bool:
    if p.numerics == "int8":
        return p.blocking.block * p.n_tile <= MAX_GROUP_TILE_BYTES
    return p.blocking.block * p.n_tile * 4 <= MAX_GROUP_TILE_BYTES


def lut_unrolls(block: int) -> list:
    """The lut ``k_unroll`` values: table groups unrolled, dividing the int16 run of every
    table group size."""
    runs = [kernels.lut_flush_steps(block, g) for g in layout.LUT_TABLE_GROUPS]
    return [u for u in (1, 2, 4, 8) if all(r % u == 0 for r in runs)]


def search_space(target, key: dict) -> dict:
    p = problem(target, key)
    if p.numerics == "lut":
        # one row at a time (the tables are per row); the table group changes the packed
        # layout, so every variant of a node must agree on it (config.validate checks)
        return {"table_group": list(layout.LUT_TABLE_GROUPS),
                "k_unroll": lut_unrolls(p.blocking.block)}
    space = {"m_block": [b for b in M_BLOCKS if b <= max(p.m, 1) * 2 and b <= 16],
             "order": ["row", "group"] if _group_order_fits(p) else ["row"]}
    if p.numerics == "exact":
        space["order"].append("dequant")  # a workspace tile of up to 512 rows x n_tile floats
    if p.numerics == "exact":
        r = 32 // p.container_bits  # whole words: the shift of each unrolled row is constant
        space["k_unroll"] = [u for u in (r, 2 * r, 4 * r) if p.blocking.block % u == 0]
        space["col_vectors"] = [v for v in (1, 2, 4) if v <= p.n_tile // p.lanes]
    return space


def default_config(target, key: dict) -> dict:
    """The heuristic: one row block of registers for few rows; for more rows, unpack once for
    all row blocks: int8 ``group`` order, 4 rows a block; exact ``dequant`` order (a chunk of
    the tile dequantized to float32, then fp32 register tiles of 4 rows x 4 column vectors on
    AVX-512), one word of codes unrolled.

    Measured on an AMD EPYC Zen 4 (AVX-512 VNNI, 1 thread, 2026-12-03, alternating with
    onnxruntime MatMulNBits on the same weights; shapes 384x1536 ... 2048x5632, block 32):
    exact M=16 and 128 with dequant/4 rows/4 vectors/unroll 8: 77-107 GFLOP/s (1.02-1.50x
    onnxruntime accuracy_level 0), against 52-89 with the former group or dequant / 8 rows /
    2 vectors / unroll 16; int8 with 4-row blocks: 1.31-1.99x accuracy_level 4, against
    1.19-1.61x with 8 (8 rows x 4 vectors of int32 sums take all 32 zmm registers)."""
    p = problem(target, key)
    if p.numerics == "lut":
        # g = 4: the 16-entry table of one vpshufb, half the lookups of g = 2 and half its
        # index bytes; 4 table groups unrolled (measured no slower than 8 at 4096x4096, M=1)
        unrolls = lut_unrolls(p.blocking.block)
        return {"table_group": 4, "k_unroll": 4 if 4 in unrolls else unrolls[-1]}
    m = p.m
    if p.numerics == "int8" and m <= fused_max_m(p.lanes):
        # VNNI: the fused row kernel (codes unpacked in registers, kernels.int8_fused_source)
        # in blocks of 2 rows (2 x 4 column vectors x 2 int32 sums: 16 zmm accumulators); an
        # odd M up to 3 in single rows (no padded row). Zen 4, 1 thread, 4096x4096 block 128:
        # M=4 0.36 ms (4-row blocks 0.41), M=3 0.32 (2-row 0.37), M=8 0.69 (group order with
        # 4-row blocks 0.97), M=64 5.6 (6.2); M=128 the same as the group order.
        # AVX2 (the code a Zen 3 runs, measured on the Zen 4 above, 2026-12-03): the fused
        # kernel is bound by vpmaddubsw (two per 32 bytes and row), so row blocks gain little
        # and the same rule holds: 4096x4096 block 128, M=1 0.22 ms (tensorized row schedule
        # 0.29), M=2 0.43 in 2-row blocks (0.50), M=3 0.57 in single rows (2-row blocks 0.76),
        # M=16 3.3 (group order, 4-row blocks 3.7), block 32 M=32 7.2 (8.5); M=64 no faster.
        cfg = {"m_block": 1 if m <= 1 or (m <= 3 and m % 2) else 2, "order": "row"}
    elif m <= 1:
        cfg = {"m_block": 1, "order": "row"}
    elif m <= 4:
        cfg = {"m_block": 1 << (m - 1).bit_length(), "order": "row"}
    elif p.numerics == "int8":
        cfg = {"m_block": 4, "order": "group"}  # unpack once per group for all row blocks
    else:
        # many rows, exact: dequantize a chunk to float32 once and run plain GEMM steps
        cfg = {"m_block": 4, "order": "dequant"}
    if cfg["order"] == "group" and not _group_order_fits(p):
        cfg = {"m_block": 4, "order": "row"}
    if p.numerics == "int8" and p.lanes == layout.AVX2_INT8_LANES and cfg["m_block"] > 4:
        # AVX2: 16 ymm registers; 4 rows x 4 column vectors of int32 sums already fill them
        # (m_block 8 measured no faster at M=16, 4096x4096 on a Sapphire Rapids running AVX2).
        cfg["m_block"] = 4
    if p.numerics == "int8" and p.lanes == layout.ARM_SDOT_LANES and cfg["m_block"] > 4:
        # Arm sdot: 32 q registers; 8 rows x 4 column vectors of sums would take all of them
        # (not measured: no Arm hardware here), so 4 rows leave room for codes and activations.
        cfg["m_block"] = 4
    if p.numerics == "exact":
        r = 32 // p.container_bits
        # one word of codes per unrolled step for row blocks (two measured up to 1.6x slower
        # at 8 rows); the GEMV keeps two
        two = cfg["m_block"] == 1 and p.blocking.block % (2 * r) == 0
        cfg["k_unroll"] = 2 * r if two else r
        # Half the vector registers hold accumulators: m_block rows x col_vectors column
        # vectors. AVX2 has 16 ymm registers: 16 accumulators spill (M=16, 4096x4096, AVX2
        # code on a Sapphire Rapids: 36-42 ms with 8x2 against 27 ms with 8x1 or 4x2).
        vectors = p.n_tile // p.lanes
        cfg["col_vectors"] = max(1, min(vectors, vector_registers(p.lanes) // 2
                                        // cfg["m_block"]))
    return cfg


# int8 on VNNI: the largest M whose default is the fused row kernel (above it the group order,
# whose calls take chunks of rows that stay in cache for every column tile); on AVX2 (no VNNI)
# AVX2_FUSED_MAX_M; Arm sdot keeps the tensorized schedule (kernels.int8_fused).
FUSED_MAX_M = 64
AVX2_FUSED_MAX_M = 32


def fused_max_m(lanes: int) -> int:
    """The largest M whose int8 default is the fused row kernel, for the dot of ``lanes``
    int32 lanes (0 where there is none: Arm sdot)."""
    return {layout.VNNI_LANES: FUSED_MAX_M, layout.AVX2_INT8_LANES: AVX2_FUSED_MAX_M}.get(
        lanes, 0)


def vector_registers(lanes: int) -> int:
    """Vector registers of the ISA whose float32 vectors have ``lanes`` lanes: 32 zmm for
    AVX-512, 16 ymm for AVX2."""
    return 32 if lanes >= 16 else 16


def check_config(target, key: dict, config) -> Optional[str]:
    """None if ``config`` holds exactly the knobs of ``search_space(target, key)``, each of
    the type of its allowed values and one of them; else what is wrong (names the knob).
    ``config.validate`` checks every variant of a node's config with it."""
    if not isinstance(config, dict):
        return f"a config is a dict of knobs, not {type(config).__name__}"
    try:
        space = search_space(target, key)
    except layout.Unsupported as e:
        return str(e)
    for knob, values in space.items():
        if knob not in config:
            return f"config lacks {knob!r}"
        value = config[knob]
        if type(value) is not type(values[0]) or value not in values:
            return f"{knob}={value!r} is not one of {values}"
    extra = set(config) - set(space)
    if extra:
        return f"unknown knobs {sorted(extra)}"
    return None


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def random_weights(p: Problem, rng) -> dict:
    """Fresh random codes, scales and zero points of the key's scheme (never zeros)."""
    s = p.scheme
    lo, hi = s.dtype.int_range()
    q = rng.integers(lo, hi + 1, (p.k, p.n)).astype(s.dtype.np_dtype)
    groups = -(-p.k // s.block_size) if s.granularity == "group" else 1
    shape = (groups, p.n) if s.granularity == "group" else \
        ((p.n,) if s.granularity == "channel" else ())
    scale = (rng.random(shape) * 0.02 + 0.005).astype(np.float32)
    zp = None
    if not s.symmetric:
        zlo, zhi = s.zero_point_type.int_range()
        zp = rng.integers(zlo, zhi + 1, shape).astype(s.zero_point_type.np_dtype)
    g_idx = None
    if s.act_order:
        g_idx = rng.permutation(np.arange(p.k) // s.block_size).astype(np.int32)
    return {"q": q, "scale": scale, "zp": zp, "g_idx": g_idx}


CANDIDATE_LIBRARY = "kernel.so"


def build(target, key: dict, config: dict, workdir: str) -> str:
    """The tuner's build step (run for a batch of candidates in parallel worker processes):
    the candidate's library in ``workdir``, through the compile's build path and cache
    (``qcompiler.codegen.build``), so ``measure`` finds it and a config measured again
    (confirmation rounds, a second tuning run) is not compiled again."""
    import functools

    from qcompiler.codegen.build import Builder, KernelBuild
    from qcompiler.codegen.cpu import runtime
    from qcompiler.tuning.errors import BuildError

    reason = check_config(target, key, config)
    if reason:
        raise BuildError(f"invalid config {config}: {reason}")
    p = _as_deployed(with_table_group(problem(target, key), config))
    ks, variants = p.kernel_shape(), [{**config, "m": p.m, "max_m": 0}]
    try:
        source = runtime.scheduled_source(ks, variants)
        kernel = KernelBuild(runtime.kernel_build_key(source, target), CANDIDATE_LIBRARY,
                             functools.partial(runtime.compile_library, ks, variants, target))
        # jobs=1: the tuner already runs one candidate per worker process
        Builder(jobs=1, progress=False).build_many([kernel], workdir)
    except Exception as e:
        raise BuildError(f"{type(e).__name__}: {e}") from e
    return os.path.join(workdir, CANDIDATE_LIBRARY)


def _as_deployed(p: Problem) -> Problem:
    """``p`` with the scale type cpu-pack-weights stores for it (runtime.store_scales): the
    tuner builds and times the kernel a compile deploys (f16 scales for the x86 int8
    kernels; its random scales always fit)."""
    from qcompiler.codegen.cpu import runtime

    return (dataclasses.replace(p, scale_dtype="float16") if runtime.f16_scale_kernels(p)
            else p)


def measure(target, key: dict, config: dict, workdir: str, repeats: int = 20) -> dict:
    """Build exactly this kernel (``build``: found in ``workdir`` or the build cache when the
    tuner built it already), check it against numpy on random inputs, time it (µs)."""
    from qcompiler.tuning.errors import BuildError, WrongResult

    from qcompiler.codegen.cpu import runtime

    lib_path = build(target, key, config, workdir)
    p = _as_deployed(with_table_group(problem(target, key), config))
    rng = np.random.default_rng(0)
    wts = random_weights(p, rng)
    if p.scale_dtype == "float16":  # stored as f16 (random_weights' scales are f16 normals)
        wts["scale"] = wts["scale"].astype(np.float16).astype(np.float32)
    packed = runtime.pack_weights(p, wts["q"], wts["scale"], wts["zp"], wts["g_idx"])
    packed["s"] = np.asarray(packed["s"]).astype(np.dtype(p.scale_dtype))
    variant = {**config, "m": p.m, "max_m": 0}
    try:
        kernel = runtime.QmmKernel(lib_path, p, [variant], packed)
    except Exception as e:
        raise BuildError(f"{type(e).__name__}: {e}") from e
    x = rng.standard_normal((p.m, p.k)).astype(np.float32)
    got = kernel(x)
    want = runtime.numpy_model(p, x, wts["q"], wts["scale"], wts["zp"], wts["g_idx"])
    err = float(np.abs(got - want).max()) if got.size else 0.0
    tol = runtime.tolerance(p, want)
    if not np.isfinite(err) or err > tol:
        raise WrongResult(f"max |kernel - numpy| = {err:.3g} > {tol:.3g}")
    times = []
    for _ in range(3):
        kernel.call_prepared(kernel.prepare(x))  # warm up
    prepared = kernel.prepare(x)
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel.call_prepared(prepared)
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {"median": times[len(times) // 2], "min": times[0], "max": times[-1],
            "runs": len(times)}
