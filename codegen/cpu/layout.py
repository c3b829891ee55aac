"""The CPU weight layouts: how a qmatmul's codes, scales and zero points are stored for the kernels.

Codes are stored as unsigned *container* codes ``u = q - lo`` (``lo`` is the smallest code of
the type: 0 for unsigned, -2^(bits-1) for signed), several per byte: 2-bit codes in 2-bit
containers (4 per byte), 3- and 4-bit codes in 4-bit containers (2 per byte), 5- to 8-bit codes
in bytes. The real weight is ``(u - zc) * s`` with the zero point in container units
``zc = z - lo`` (the implied zero point of MatMulNBits, or 0 for a symmetric scheme, as ``z``).

Output columns are cut into tiles of ``n_tile`` (N padded with zero codes and zero scales);
K is padded to whole groups (``k_pad``) with zero codes (the activations are padded with zeros at
run time, so padding adds exact zeros). Three code layouts:

- ``cpu_exact`` (fp32 activations): ``[N_pad/n_tile, k_pad/r, n_tile]`` 32-bit words with
  ``r = 32/container_bits``; word ``(kr, j)`` holds the rows ``kr*r + h`` (``h < r``) of column
  ``j`` at bit ``h*container_bits``. A vector load gives 16 columns; one shift and one
  and-or (``vpternlogd``) put row h's code into the top mantissa bits of 1.0, i.e. the float
  ``1 + u/2^cb`` exactly, with no integer-to-float conversion (the kernel's scales absorb the
  2^cb factor and the 1).
- ``cpu_lut`` (table lookups, ``kernels.py``'s lut section): the b bits of the codes as b
  one-bit planes, g = ``table_group`` consecutive rows of a plane forming one 4-bit table
  index per column, ``[N_pad/n_tile, k_pad/g, n_tile*b/2]`` bytes (``pack_lut``); the layout
  prints ``bits`` and ``table_group``, and ``single_quads=1`` where the odd plane of four
  table groups is interleaved for one ``vpermb`` (AVX-512 VBMI + VNNI targets).
- ``cpu_vnni`` (int8 activations, AVX-512 VNNI): ``[N_pad/n_tile, k_pad/(4c), n_tile, 4]``
  bytes; byte ``(kc, j, b)`` holds the row ``k = kc*4c + h*4 + b`` of column ``j`` at bit
  ``h*container_bits``: after a shift and a mask, each 64 bytes are the 16 columns x 4
  consecutive rows that one ``vpdpbusd`` multiplies with 4 activation bytes. AVX2 targets use
  the same layout with 32-column tiles: each 32 bytes are the 8 columns x 4 rows of one
  ``vpmaddubsw`` + ``vpmaddwd``; cpu-arm-dotprod with 16-column tiles: each 16 bytes are
  the 4 columns x 4 rows of one Arm ``sdot`` (``arm.py``).

Scales (float32, or float16 for the x86 int8 and lut kernels: ``scale_dtype=f16``) and zero
points (uint8, in container units) are
``[N_pad/n_tile, groups, n_tile]`` (``cpu_tiled``): one contiguous vector per tile and group.
For the int8 kernels on x86 the scales are stored as float16 where every one of them is an f16
normal (``f16_scales_fit``; the code layout then prints ``scale_dtype=f16``): a relative
rounding of at most 2^-11, below the int8 activations' own (2^-8), as llama.cpp's Q4_0 blocks
keep theirs. A block-32 4-bit weight is then 0.5625 bytes instead of 0.625: the decode step
reads 10 % fewer bytes.
Groups run along K (``block`` rows each); a per-column or per-tensor scheme is one group of
all of K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir.types import Layout, QuantScheme
from qcompiler.errors import InputError
from qcompiler.runtime import numerics

VNNI_LANES = 16  # int32 lanes of one zmm register: the columns one vpdpbusd computes
AVX2_INT8_LANES = 8  # int32 lanes of one ymm: the columns one vpmaddubsw + vpmaddwd computes
ARM_SDOT_LANES = 4  # int32 lanes of one NEON q register: the columns one sdot computes (Arm)
NEON_LUT_BYTES = 16  # lut on Arm: bytes of one NEON index vector (one tbl of a 16-entry table)
VNNI_K = 4       # activation bytes per int32 lane of vpdpbusd
K_ALIGN_PER_CHANNEL = 32  # K of a one-group (per-column) scheme is padded to this multiple
LUT_MAX_BITS = 4          # lut: one vpshufb per bit plane pays up to 4 bits
LUT_MAX_TABLE_GROUP = 4   # lut: 2^4 = 16 entries, one vpshufb table
LUT_TABLE_GROUPS = (4, 2)  # the table_group knob: activations per table (index bits)


class Unsupported(InputError):
    """The CPU kernels cannot compute this qmatmul; the message says why."""


def container_bits(bits: int) -> int:
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    if bits <= 8:
        return 8
    raise Unsupported(f"{bits}-bit codes: the CPU kernels take 1- to 8-bit integer codes")


def codes_per_byte(bits: int) -> int:
    return 8 // container_bits(bits)


@dataclass(frozen=True)
class Blocking:
    """Groups along K as the kernels see them: ``groups`` groups of ``block`` rows = ``k_pad``."""

    block: int
    groups: int
    k_pad: int


def check_scheme(scheme: QuantScheme) -> None:
    """Raise Unsupported unless the kernels compute this weight scheme."""
    if not scheme.dtype.is_integer:
        raise Unsupported(f"{scheme.dtype} codes: the CPU kernels take integer codes")
    container_bits(scheme.bits)
    if scheme.granularity == "group" and scheme.axis % 2 != 0:
        raise Unsupported(f"{scheme}: groups along N (axis 1); the CPU kernels take groups "
                          "along K (axis 0)")
    if scheme.granularity == "channel" and scheme.axis % 2 != 1:
        raise Unsupported(f"{scheme}: one scale per input row (axis 0); the CPU kernels take "
                          "per-column (axis 1) scales")


def blocking(scheme: QuantScheme, k: int, numerics_mode: str) -> Blocking:
    """The kernels' grouping of K for ``scheme`` (raises Unsupported)."""
    check_scheme(scheme)
    if numerics_mode == "lut" and scheme.bits > LUT_MAX_BITS:
        raise Unsupported(f"{scheme.bits}-bit codes: the lut path takes 1- to {LUT_MAX_BITS}-bit "
                          "codes (one table lookup per bit plane)")
    if scheme.granularity == "group":
        block = scheme.block_size
        words = 32 // container_bits(scheme.bits)
        if numerics_mode == "exact" and block % words:
            raise Unsupported(f"group size {block} with {scheme.bits}-bit codes: the exact "
                              f"path needs groups of a multiple of {words} rows (one word)")
        if numerics_mode == "lut" and block % LUT_MAX_TABLE_GROUP:
            raise Unsupported(f"group size {block}: the lut path needs groups of a multiple "
                              f"of {LUT_MAX_TABLE_GROUP} rows (whole tables)")
        if numerics_mode == "int8" and block % (VNNI_K * codes_per_byte(scheme.bits)):
            raise Unsupported(f"group size {block} with {scheme.bits}-bit codes: the int8 path "
                              f"needs groups of a multiple of "
                              f"{VNNI_K * codes_per_byte(scheme.bits)} rows")
        groups = -(-k // block)
        return Blocking(block, groups, groups * block)
    k_pad = -(-k // K_ALIGN_PER_CHANNEL) * K_ALIGN_PER_CHANNEL
    return Blocking(k_pad, 1, k_pad)


def act_order_permutation(g_idx: np.ndarray, block: int, k: int) -> np.ndarray:
    """Rows sorted by group (stable): the permutation applied offline to w and at run time to x.

    After it, group g must be rows [g*block, (g+1)*block) as in GPTQ's desc_act checkpoints;
    other g_idx tables (unequal group sizes) are refused.
    """
    g_idx = np.asarray(g_idx).reshape(-1).astype(np.int64)
    if g_idx.shape[0] != k:
        raise Unsupported(f"g_idx has {g_idx.shape[0]} entries, K is {k}")
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], np.arange(k) // block):
        raise Unsupported("act-order g_idx whose groups do not all have block_size rows")
    return perm.astype(np.int32)


def group_params(scheme: QuantScheme, scale: np.ndarray, zero_point: Optional[np.ndarray],
                 k: int, n: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points in container units, both float32 ``[groups, n]``."""
    scale = np.asarray(scale, dtype=np.float32)
    lo = scheme.dtype.int_range()[0]
    if scheme.granularity == "group":
        s = numerics.expand_scale(scale, (groups, n), scheme.replace(block_size=1,
                                                                     act_order=False))
        z = (np.zeros((groups, n), np.float32) if zero_point is None else
             numerics.expand_scale(np.asarray(zero_point), (groups, n),
                                   scheme.replace(block_size=1, act_order=False)))
    else:
        s = numerics.expand_scale(scale, (k, n), scheme)[:1]
        z = (np.zeros((1, n), np.float32) if zero_point is None else
             numerics.expand_scale(np.asarray(zero_point), (k, n), scheme)[:1])
    z = np.asarray(z, dtype=np.float32)
    if zero_point is None and scheme.implied_zero_point is not None:
        z = np.full_like(z, scheme.implied_zero_point)
    return np.ascontiguousarray(s, np.float32), np.ascontiguousarray(z - lo, np.float32)


# The code layout's scale_dtype (IR name) -> the kernels' buffer type.
SCALE_DTYPES = {"f32": "float32", "f16": "float16"}
F16_SMALLEST_NORMAL = float(np.finfo(np.float16).tiny)  # 2^-14
F16_LARGEST = float(np.finfo(np.float16).max)           # 65504


def f16_scales_fit(scales: np.ndarray) -> bool:
    """Whether every scale is 0 or an f16 normal in magnitude, so that storing it as float16
    rounds it by at most 2^-11 relative (no subnormal, no overflow)."""
    a = np.abs(np.asarray(scales, np.float64))
    a = a[a != 0]
    return bool(np.all(np.isfinite(a)) and (not a.size or (a.min() >= F16_SMALLEST_NORMAL
                                                            and a.max() <= F16_LARGEST)))


def zero_codes(zc: np.ndarray) -> np.ndarray:
    """Zero points in container units as uint8 (the kernels read one byte per group/column)."""
    zc = np.asarray(zc, np.float32)
    if zc.size and (np.any(zc != np.round(zc)) or zc.min() < 0 or zc.max() > 255):
        raise Unsupported("zero points that are not integer codes (float zeros): the CPU "
                          "kernels take integer zero points")
    return zc.astype(np.uint8)


def uniform_zero_code(zc: np.ndarray) -> Optional[int]:
    """The zero code every group and column shares (a symmetric scheme's implied zero point,
    or a zero-point tensor of one value), else None. The fused int8 row kernels (decode and
    small batches) then take it as a constant instead of streaming one byte per group and
    column (its load and conversion cost 10-15 % of a cold 4-bit block-32 GEMV on a Zen 5)."""
    zc = np.asarray(zc)
    if not zc.size:
        return None
    first = int(zc.flat[0])
    return first if bool(np.all(zc == first)) else None


def container_codes(scheme: QuantScheme, codes: np.ndarray) -> np.ndarray:
    """Unsigned container codes ``q - lo`` as uint8."""
    lo = scheme.dtype.int_range()[0]
    return (np.asarray(codes).astype(np.int16) - lo).astype(np.uint8)


def pad_to(a: np.ndarray, shape: tuple) -> np.ndarray:
    """Zero-pad a 2-D array at the end of each axis."""
    out = np.zeros(shape, a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def pack_exact(u: np.ndarray, n_tile: int, cbits: int) -> np.ndarray:
    """``[k_pad, n_pad]`` container codes -> the ``cpu_exact`` words ``[T, k_pad/r, n_tile]``."""
    r = 32 // cbits
    k_pad, n_pad = u.shape
    v = u.astype(np.uint32).reshape(k_pad // r, r, n_pad // n_tile, n_tile)  # [kr, h, T, j]
    out = np.zeros((n_pad // n_tile, k_pad // r, n_tile), np.uint32)
    for h in range(r):
        out |= v[:, h].transpose(1, 0, 2) << np.uint32(h * cbits)
    return out


def pack_vnni(u: np.ndarray, n_tile: int, cbits: int) -> np.ndarray:
    """``[k_pad, n_pad]`` container codes -> the ``cpu_vnni`` bytes ``[T, k_pad/4c, n_tile, 4]``."""
    c = 8 // cbits
    k_pad, n_pad = u.shape
    # k = kc*4c + h*4 + b  ->  [kc, h, b, T, j]
    v = u.reshape(k_pad // (VNNI_K * c), c, VNNI_K, n_pad // n_tile, n_tile)
    out = np.zeros((n_pad // n_tile, k_pad // (VNNI_K * c), n_tile, VNNI_K), np.uint8)
    for h in range(c):
        out |= (v[:, h].transpose(2, 0, 3, 1) << (h * cbits)).astype(np.uint8)
    return out


def tile_columns(a: np.ndarray, n_tile: int) -> np.ndarray:
    """``[groups, n_pad]`` -> ``[n_pad/n_tile, groups, n_tile]``."""
    g, n_pad = a.shape
    return np.ascontiguousarray(a.reshape(g, n_pad // n_tile, n_tile).transpose(1, 0, 2))


def untile_columns(a: np.ndarray) -> np.ndarray:
    """The inverse of ``tile_columns``: ``[n_pad/n_tile, groups, n_tile]`` -> ``[groups, n_pad]``."""
    tiles, g, n_tile = a.shape
    return a.transpose(1, 0, 2).reshape(g, tiles * n_tile)


def lut_indices(u: np.ndarray, bits: int, table_group: int) -> np.ndarray:
    """``[k_pad, n]`` container codes -> the table indices ``[bits, k_pad/g, n]``: bit t of
    ``idx[i, j, n]`` is bit i (plane i) of the code of row ``g*j + t``."""
    k_pad, n = u.shape
    rows = u.reshape(k_pad // table_group, table_group, n)
    idx = np.zeros((bits, k_pad // table_group, n), np.uint8)
    for i in range(bits):
        for t in range(table_group):
            idx[i] |= (((rows[:, t] >> i) & 1) << t).astype(np.uint8)
    return idx


def pack_lut(u: np.ndarray, bits: int, table_group: int, n_tile: int,
             vector_bytes: int, quads: bool = False) -> np.ndarray:
    """``[k_pad, n_pad]`` container codes -> the ``cpu_lut`` bytes ``[T, k_pad/g, n_tile*b/2]``.

    Per (tile, table group): for each pair of planes (2p, 2p+1) and each vector of
    ``vector_bytes`` columns, ``vector_bytes`` bytes whose low nibbles are the index bytes of
    the vector's first half of the columns and whose high nibbles those of its second half;
    within a half, byte ``2e + q`` is column e's index of plane ``2p + q`` (the byte pair that
    one ``vpmaddubsw`` adds). An odd last plane follows: per vector, ``vector_bytes/2`` bytes,
    low nibble column e, high nibble column ``vector_bytes/2 + e`` of the vector.

    ``quads`` (``single_quads``: vector_bytes 64): the bytes of four table groups 4Q..4Q+3
    lie together, in the order the kernel reads them (one stream): their pairs' bytes as
    above, group after group, then the odd last plane of the four in vectors of 64 bytes for
    32 columns each, byte ``4e + q`` holding table group 4Q + q of column e (low nibble) and
    of column 16 + e (high nibble). (The array keeps its ``[T, k_pad/g, n_tile*b/2]`` shape.)
    """
    idx = lut_indices(u, bits, table_group)
    _, J, n_pad = idx.shape
    half, vectors, tiles = vector_bytes // 2, n_tile // vector_bytes, n_pad // n_tile
    parts = []
    for p in range(bits // 2):
        # [plane q, j, tile, vector, half h, column e] -> [j, tile, vector, h, e, q]
        pair = idx[2 * p:2 * p + 2].reshape(2, J, tiles, vectors, 2, half)
        pair = pair.transpose(1, 2, 3, 4, 5, 0).reshape(J, tiles, vectors, 2, vector_bytes)
        nibbles = pair[:, :, :, 0] | (pair[:, :, :, 1] << 4)
        parts.append(nibbles.transpose(1, 0, 2, 3).reshape(tiles, J, vectors * vector_bytes))
    if bits % 2 and quads:
        last = idx[bits - 1].reshape(J // 4, 4, tiles, n_tile // 32, 2, 16)  # [Q, q, t, c, h, e]
        nibbles = last[:, :, :, :, 0] | (last[:, :, :, :, 1] << 4)  # [Q, q, t, c, e]
        quad = nibbles.transpose(2, 0, 3, 4, 1).reshape(tiles, J // 4, n_tile * 2)
        pairs = (np.concatenate(parts, axis=-1) if parts
                 else np.zeros((tiles, J, 0), np.uint8)).reshape(tiles, J // 4, -1)
        return np.ascontiguousarray(np.concatenate([pairs, quad], axis=-1).reshape(
            tiles, J, -1), np.uint8)
    if bits % 2:
        last = idx[bits - 1].reshape(J, tiles, vectors, 2, half)
        nibbles = last[:, :, :, 0] | (last[:, :, :, 1] << 4)
        parts.append(nibbles.transpose(1, 0, 2, 3).reshape(tiles, J, vectors * half))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1), np.uint8)


CODE_LAYOUTS = {"exact": "cpu_exact", "int8": "cpu_vnni", "lut": "cpu_lut"}


def code_layout(numerics_mode: str, **params) -> Layout:
    return Layout.make(CODE_LAYOUTS[numerics_mode], **params)


def tiled_layout(n_tile: int) -> Layout:
    return Layout.make("cpu_tiled", n_tile=n_tile)
