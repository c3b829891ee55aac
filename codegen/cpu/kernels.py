"""TensorIR of the CPU qmatmul kernels: computation from the layout, schedule from the knobs.

Both numerics factor the scale out of each group (``layout.py`` has the weight layouts)::

    P[m, t, g, j] = sum_{k in group g} x[m, k] * f(u[k, t*n_tile + j])   (u: container codes)
    y[m, t*n_tile + j] = sum_g s'[t, g, j] * (P[m, t, g, j] - xsum[m, g] * z'[t, g, j])

with ``xsum[m, g]`` the sum of the row's activations over group g (the runner computes it) and
``zc`` the zero point in container units (one byte: the weights stream is codes, one float
scale and one byte per group and column). Exact path: ``f(u) = 1 + u/2^cb`` (made from the
code's bits, see ``layout.py``), so ``s' = 2^cb * s`` and ``z' = 1 + zc/2^cb``; the inner
loop is one shift, one and-or and one FMA per 16 codes. int8 path: ``f(u) = u``, ``s' = s``,
``z' = zc``, and each group's term is also multiplied by its activation scale.

- ``exact``: x is float32 and P is float32 (like onnxruntime MatMulNBits accuracy_level 0).
- ``int8``: x is quantized at run time per row and group (symmetric int8,
  ``x ~= xq * x_scale[m, g]``, like MatMulNBits accuracy_level 4 which quantizes per block);
  P is an exact int32 sum computed 16 columns x 4 rows at a time by ``vpdpbusd`` (unsigned
  codes times signed activations, no saturation), tensorized with the intrinsic
  ``qc_vnni_u8s8_16x4`` defined here; each group's term is multiplied by its x_scale (the
  ``row`` order on VNNI and on AVX2 is written as vector TensorIR instead, its codes unpacked
  in registers: ``int8_fused_source``). On targets without VNNI (AVX2: Haswell, Zen 3) the
  same sum comes 8 columns x 4 rows at a time from ``vpmaddubsw`` + ``vpmaddwd``
  (``qc_avx2_u8s8_8x4``; 8-bit containers by nibbles, ``qc_avx2_u8s8_8x4_nibbles``), exact
  as well: see ``register_avx2_intrins`` (the fused AVX2 kernel keeps the same int16 bound:
  ``int8_avx2_int16_limit``). On cpu-arm-dotprod it comes 4 columns x 4 rows at a time from
  Arm ``sdot`` (``arm.py``: signed x signed, 8-bit codes by an exact offset).

Rows are blocked: the activations arrive as ``[m_outer, m_block, k_pad]`` (int8, exact
``dequant``) or ``[m_outer, k_pad, m_block]`` (exact ``row`` / ``group``: the runner transposes
each row block; ``x_row_major`` says which) with M padded to
a multiple of m_block, so the M loop needs no bound checks and M stays symbolic (one
compiled function serves every batch size). Knobs (``variant``):

- ``m_block``: rows whose accumulators are kept in registers together (weights reused).
- ``order``: ``row`` (tile, row block, group: accumulators stay in registers across groups;
  best for few rows) or ``group`` (tile, group, row block: each group's codes are unpacked
  once for all rows and partial sums go to the output; best for many rows); exact path also
  ``dequant`` (tile, chunk of up to 512 rows dequantized to float32, row block: a plain fp32
  GEMM step with no per-group work per row block; best for many rows).
- ``k_unroll`` (exact): rows of a group unrolled in the inner loop.
- ``col_vectors`` (exact): column vectors accumulated at once (m_block x col_vectors
  accumulator registers; the tile's columns are done in n_tile / (col_vectors*lanes) passes).
The column tiles are spread over the TVM thread pool (``parallel``): threads never share a
sum, so results do not depend on the thread count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from qcompiler.codegen.cpu import layout
from qcompiler.codegen.cpu.intrin_registry import register_intrin_once

NUMERICS = ("exact", "int8", "lut")
ORDERS = ("row", "group", "dequant")
VNNI_INTRIN = "qc_vnni_u8s8_16x4"
AVX2_INTRIN = "qc_avx2_u8s8_8x4"
AVX2_NIBBLES_INTRIN = "qc_avx2_u8s8_8x4_nibbles"


@dataclass(frozen=True)
class KernelShape:
    """The decided problem of one kernel (from the qmatmul's config and layout)."""

    numerics: str
    n_pad: int
    k_pad: int
    block: int
    groups: int
    n_tile: int
    container_bits: int
    lanes: int  # float32 lanes of one vector register (16 for AVX-512, 8 for AVX2); lut: bytes
    bits: int = 0         # lut: the codes' bits (one-bit planes)
    table_group: int = 0  # lut: activations per table (the index bits)
    byte_permute: bool = False  # lut: look tables up with vpermb (AVX-512 VBMI), not vpshufb
    # lut: the odd plane (of 1 or 3 bits only) in quads of table groups (vpermb, vpdpbusd)
    single_quads: bool = False
    # the zero code (container units) of every group and column when they share one (the
    # packed layout's ``zero_code``): the fused int8 kernels use it as a constant instead of
    # reading the zc table; None: per group and column, read from zc
    zero_code: Optional[int] = None
    # the stored scales' type: "float32", or "float16" (the int8 kernels on x86, where every
    # scale is an f16 normal: cpu-pack-weights' scale_dtype; converted to f32 as they load)
    scale_dtype: str = "float32"

    @property
    def tiles(self) -> int:
        return self.n_pad // self.n_tile

    @property
    def per_byte(self) -> int:
        return 8 // self.container_bits


_avx2_registered = False
_avx2_steps_registered: set = set()


def dot_product_desc(lanes: int, a_dtype: str, b_dtype: str, b_scope: str = "global",
                     depth: int = 4, c_scope: str = "local"):
    """The description every dot-product intrinsic shares:
    ``C[lanes] += sum_k B[j, k] * A[k]`` over ``depth`` elements, widened to int32 (4 bytes:
    VNNI's 16 lanes, the AVX2 pair's 8; the qmatmul kernels' weights are the unsigned B, the
    conv kernel's the signed one; 2 int16 for the conv kernel's vpmaddwd)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((depth,), a_dtype, offset_factor=1),
             B: T.Buffer((lanes, depth), b_dtype, offset_factor=1, scope=b_scope),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], B[0:lanes, 0:depth], A[0:depth])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(B[vi, vk], "int32") * T.cast(A[vk], "int32")

    return desc


def register_vnni_intrin() -> None:
    """Register ``qc_vnni_u8s8_16x4``: C[16] += sum_b u8 B[j, b] * s8 A[b] (vpdpbusd), the
    weights B (the unsigned operand, codes 0..255) unpacked in registers, the activations A
    the signed one."""
    register_vpdpbusd_intrin(VNNI_INTRIN, "local")


_vpdpbusd_registered: set = set()


def register_vpdpbusd_intrin(name: str, b_scope: str, c_scope: str = "local") -> None:
    """Register ``name``: C[16] += sum_b u8 B[j, b] * s8 A[b] (vpdpbusd), A's 4 bytes
    broadcast to the 16 lanes, B read from ``b_scope`` (``local``: the qmatmul kernels'
    unpacked weights; ``global``: the conv kernel's pixel lanes, activations as B), the sums
    C in ``c_scope`` (``global`` for a small buffer that lives on the stack: on the CPU, TVM
    allocates every ``local`` buffer through TVMBackendAllocWorkspace, per iteration of a
    parallel loop).

    TVM's own ``dot_16x4_vnni`` passes ``<16 x i32>`` operands, which LLVM 22 rejects; this
    one passes the ``<64 x i8>`` operands LLVM 22's ``llvm.x86.avx512.vpdpbusd.512`` takes.
    """
    if name in _vpdpbusd_registered:
        return
    from tvm.script import tirx as T

    desc = dot_product_desc(16, "int8", "uint8", b_scope, c_scope=c_scope)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((16, 4), "uint8", offset_factor=1, scope=b_scope),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], B[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            # (one expression: a named intermediate becomes a bound variable, which TVM
            # lowers to a "local" buffer, allocated through TVMBackendAllocWorkspace on
            # every iteration of the enclosing parallel loop)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(B.vload([0, 0], dtype="uint8x64"), dtype="int8x64"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"),
                                          16), dtype="int8x64"),
                dtype="int32x16")

    register_intrin_once(name, desc, impl)
    _vpdpbusd_registered.add(name)


def register_avx2_intrins() -> None:
    """Register the AVX2 int8 dot products (hosts without VNNI): C[8] += sum_b u8 B[j, b] * s8 A[b].

    ``vpmaddubsw`` multiplies u8 by s8 and adds adjacent pairs into int16 with saturation;
    ``vpmaddwd`` with ones adds the pairs of pairs into int32 (the AVX2 form of one
    ``vpdpbusd``, 8 columns x 4 rows per ymm register). The activations lie in [-127, 127],
    so a pair cannot saturate while the codes are below 128 (2 * 127 * 127 = 32258):

    - ``qc_avx2_u8s8_8x4``: codes of 1- to 4-bit containers (at most 15): one
      ``vpmaddubsw`` + one ``vpmaddwd`` per 32 weight bytes;
    - ``qc_avx2_u8s8_8x4_nibbles``: 8-bit containers (codes up to 255 would saturate): the
      byte is split into its two nibbles, each multiplied as above, and the high one's int16
      sums are widened with ``vpmaddwd`` by 16 instead of 1 (exact, twice the work).
    """
    global _avx2_registered
    if _avx2_registered:
        return
    from tvm.script import tirx as T

    desc = dot_product_desc(8, "int8", "uint8", "local")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((8, 4), "uint8", offset_factor=1, scope="local"),
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], B[0:8, 0:4], A[0:4])
            T.writes(C[0:8])
            # (one expression: see register_vpdpbusd_intrin)
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                    T.reinterpret(B.vload([0, 0], dtype="uint8x32"), dtype="int8x32"),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"),
                                                            dtype="int32"), 8), dtype="int8x32"),
                    dtype="int16x16"),
                T.broadcast(T.int16(1), 16), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def impl_nibbles(A: T.Buffer((4,), "int8", offset_factor=1),
                     B: T.Buffer((8, 4), "uint8", offset_factor=1, scope="local"),
                     C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], B[0:8, 0:4], A[0:4])
            T.writes(C[0:8])
            # (one expression: see register_vpdpbusd_intrin; LLVM shares the repeated loads)
            C[T.ramp(T.int32(0), 1, 8)] = (
                C.vload([0], dtype="int32x8")
                + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    T.call_llvm_pure_intrin(   # the low nibbles
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                        T.reinterpret(B.vload([0, 0], dtype="uint8x32")
                                      & T.broadcast(T.uint8(15), 32), dtype="int8x32"),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"),
                                                                dtype="int32"), 8),
                                      dtype="int8x32"),
                        dtype="int16x16"),
                    T.broadcast(T.int16(1), 16), dtype="int32x8")
                + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    T.call_llvm_pure_intrin(   # the high nibbles, weighted 16
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                        T.reinterpret(B.vload([0, 0], dtype="uint8x32")
                                      >> T.broadcast(T.uint8(4), 32), dtype="int8x32"),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"),
                                                                dtype="int32"), 8),
                                      dtype="int8x32"),
                        dtype="int16x16"),
                    T.broadcast(T.int16(16), 16), dtype="int32x8"))

    for name, body in ((AVX2_INTRIN, impl), (AVX2_NIBBLES_INTRIN, impl_nibbles)):
        register_intrin_once(name, desc, body)
    _avx2_registered = True


# Rows-of-4 steps whose vpmaddubsw sums one int16 accumulator before vpmaddwd widens it: each
# step adds at most 2 x 15 x 127 = 3810 (codes of 4-bit containers), 8 steps 30480 < 32767.
AVX2_INT16_STEPS = 8


def int16_steps(ks: KernelShape) -> int:
    """Steps of 4 rows summed in int16 by the AVX2 int8 dot (1: every step widened): up to
    ``AVX2_INT16_STEPS`` for codes below 16, a divisor of the group's steps."""
    if ks.lanes != layout.AVX2_INT8_LANES or ks.container_bits > 4:  # VNNI, Arm sdot
        return 1
    return math.gcd(ks.block // 4, AVX2_INT16_STEPS)


def register_avx2_steps_intrin(steps: int) -> str:
    """Register ``qc_avx2_u8s8_8x4x<steps>``: C[8] += sum over ``steps`` steps of 4 rows,
    the steps' ``vpmaddubsw`` pairs summed in int16 (no overflow for codes below 16: see
    ``AVX2_INT16_STEPS``), then one ``vpmaddwd`` with ones: half the widening work. The steps'
    codes lie ``stride`` bytes apart (rows of 4 of the unpacked tile)."""
    from tvm.script import tirx as T

    name = f"{AVX2_INTRIN}x{steps}"
    if name in _avx2_steps_registered:
        return name
    S = steps

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        stride = T.int64()
        A = T.match_buffer(a, (4 * S,), "int8", offset_factor=1)
        B = T.match_buffer(b, (S, 8, 4), "uint8", offset_factor=1, scope="local",
                           strides=[stride, 4, 1])
        C = T.match_buffer(c, (8,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:8], B[0:S, 0:8, 0:4], A[0:4 * S])
            T.writes(C[0:8])
            for s, i, k in T.grid(S, 8, 4):
                with T.sblock("update"):
                    vi = T.axis.spatial(8, i)
                    vk = T.axis.reduce(4 * S, s * 4 + k)
                    C[vi] = C[vi] + T.cast(B[vk // 4, vi, vk % 4], "int32") * T.cast(A[vk],
                                                                                    "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        stride = T.int64()
        A = T.match_buffer(a, (4 * S,), "int8", offset_factor=1)
        B = T.match_buffer(b, (S, 8, 4), "uint8", offset_factor=1, scope="local",
                           strides=[stride, 4, 1])
        C = T.match_buffer(c, (8,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:8], B[0:S, 0:8, 0:4], A[0:4 * S])
            T.writes(C[0:8])
            pairs = T.alloc_local((1,), "int16x16")
            pairs[0] = T.broadcast(T.int16(0), 16)
            for s in T.unroll(S):  # (no named intermediate: see register_vpdpbusd_intrin)
                pairs[0] = pairs[0] + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                    T.reinterpret(B.vload([s, 0, 0], dtype="uint8x32"), dtype="int8x32"),
                    T.reinterpret(T.broadcast(T.reinterpret(
                        A.vload([s * 4], "int8x4"), dtype="int32"), 8), dtype="int8x32"),
                    dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs[0], T.broadcast(T.int16(1), 16), dtype="int32x8")

    register_intrin_once(name, desc, impl)
    _avx2_steps_registered.add(name)
    return name


def int8_intrin(ks: KernelShape) -> str:
    """The tensor intrinsic of an int8 kernel: vpdpbusd with 16 int32 lanes (AVX-512 VNNI),
    else the AVX2 pair with 8 (codes below 128 in one step, 8-bit containers by nibbles);
    Arm ``sdot`` with 4 (cpu-arm-dotprod: ``arm.py``)."""
    if ks.lanes == layout.ARM_SDOT_LANES:
        from qcompiler.codegen.cpu import arm

        return arm.sdot_intrin(ks.container_bits, dot_product_desc(ks.lanes, "int8", "uint8",
                                                                   "local"))
    if ks.lanes == layout.VNNI_LANES:
        register_vnni_intrin()
        return VNNI_INTRIN
    if int16_steps(ks) > 1:
        return register_avx2_steps_intrin(int16_steps(ks))
    register_avx2_intrins()
    return AVX2_INTRIN if ks.container_bits <= 4 else AVX2_NIBBLES_INTRIN


def _exact_func(ks: KernelShape, m_block: int):
    import tvm
    from tvm import te

    T, K, G, B, nt = ks.tiles, ks.k_pad, ks.groups, ks.block, ks.n_tile
    cb = ks.container_bits
    r = 32 // cb  # codes per 32-bit word
    mo = te.var("m_outer", "int64")
    # x arrives k-major within each row block ([m_outer, K, m_block]): the m_block values
    # broadcast for one k are adjacent (one cache line) instead of K floats apart.
    x = te.placeholder((mo, K, m_block), "float32", name="x")
    xsum = te.placeholder((mo, m_block, G), "float32", name="xsum")
    w = te.placeholder((T, K // r, nt), "uint32", name="w")
    s = te.placeholder((T, G, nt), "float32", name="s")
    zc = te.placeholder((T, G, nt), "uint8", name="zc")
    mantissa = tvm.tirx.const(((1 << cb) - 1) << (23 - cb), "uint32")
    one = tvm.tirx.const(0x3F800000, "uint32")

    def code(t, k, j):
        # Row k's code sits at bit (k % r) * cb of its word; moved to the top mantissa bits
        # of 1.0f it reads as the float 1 + u / 2^cb (exact, no int-to-float conversion).
        word = w[t, k // r, j]
        bits = ((word >> (k % r * cb).astype("uint32")) << tvm.tirx.const(23 - cb, "uint32")
                & mantissa) | one
        return tvm.tirx.reinterpret("float32", bits)

    u = te.compute((T, K, nt), code, name="unpack")
    kk = te.reduce_axis((0, B), name="kk")
    partial = te.compute(
        (mo, m_block, T, G, nt),
        lambda io, ii, t, g, j: te.sum(x[io, g * B + kk, ii] * u[t, g * B + kk, j], axis=kk),
        name="partial")
    g = te.reduce_axis((0, G), name="g")
    inv = tvm.tirx.const(1.0 / (1 << cb), "float32")  # a power of two: exact
    one_f = tvm.tirx.const(1.0, "float32")
    y = te.compute(
        (mo, m_block, T * nt),
        lambda io, ii, n: te.sum(
            s[n // nt, g, n % nt] * (partial[io, ii, n // nt, g, n % nt] - xsum[io, ii, g]
                                     * (zc[n // nt, g, n % nt].astype("float32") * inv
                                        + one_f)), axis=g),
        name="y")
    return te.create_prim_func([x, xsum, w, s, zc, y])


# Rows of the float32 tile of the ``dequant`` order: 512 x 64 floats = 128 KiB stays in L2 and
# makes the output updates (once per chunk and row block) rare; measured best of 32..512.
DEQUANT_CHUNK = 512


def dequant_chunk(ks: KernelShape) -> int:
    """Rows per step of the ``dequant`` order: the largest divisor of k_pad that divides
    DEQUANT_CHUNK (a multiple of the codes per word, since k_pad is whole groups of words)."""
    return math.gcd(ks.k_pad, DEQUANT_CHUNK)


# Rows of x per kernel call of the ``group`` and ``dequant`` orders (the runner calls the
# kernel once per chunk of rows, ``QmmKernel._launch``): the chunk's activations (half of a
# 1 MiB L2) are reused by every column tile and its output tile stays in cache across the
# groups; one call over all rows streams x from memory once per column tile. At M = 4096
# (MiniLM 32x128), int8 1536x384 ran at 97 GFLOP/s against 194 at 384x1536 (Zen 4).
CHUNK_BYTES = 512 * 1024
CHUNK_ROWS = (128, 1024)  # one call up to M = 128 (prefill); at most 1024 rows a call


def chunk_blocks(ks: KernelShape, variant: dict):
    """Row blocks per kernel call: the power of two of rows whose activations (float32 on
    the exact path, int8 on the int8 path) fill CHUNK_BYTES, within CHUNK_ROWS; None for the
    ``row`` order (few rows: one call)."""
    if variant.get("order") not in ("group", "dequant"):
        return None
    per_row = ks.k_pad * (1 if ks.numerics == "int8" else 4)
    rows = 1 << max(0, (CHUNK_BYTES // per_row).bit_length() - 1)
    rows = min(max(rows, CHUNK_ROWS[0]), CHUNK_ROWS[1])
    return max(1, rows // variant["m_block"])


def x_row_major(numerics: str, variant: dict) -> bool:
    """Whether the kernel of ``variant`` reads x as ``[m_outer, m_block, k_pad]`` (rows as
    they come) rather than k-major ``[m_outer, k_pad, m_block]`` (the same memory when
    m_block is 1)."""
    return numerics != "exact" or variant["order"] == "dequant"


def _exact_dequant_func(ks: KernelShape, m_block: int):
    """The exact path without factoring the scale out: for many rows and small groups.

    Each chunk of rows of the tile is dequantized once into float32 (``(f(u) - z') * s'`` =
    ``(u - zc) * s``) and multiplied as a plain fp32 GEMM, so no per-group work is repeated for
    every row block. Same arguments as ``_exact_func`` except that x is row-major per row
    block (``[m_outer, m_block, k_pad]``: the caller's x as it is, no transposition) and
    ``xsum`` is not read. The m_block rows' broadcasts then come from m_block cache lines,
    each serving 16 steps of k: as fast as k-major here (M=256, 384x1536), and the runner
    no longer transposes x (10-20% of a call at 1536x384).
    """
    import tvm
    from tvm import te

    T, K, G, B, nt = ks.tiles, ks.k_pad, ks.groups, ks.block, ks.n_tile
    cb = ks.container_bits
    r = 32 // cb
    C = dequant_chunk(ks)
    mo = te.var("m_outer", "int64")
    x = te.placeholder((mo, m_block, K), "float32", name="x")
    xsum = te.placeholder((mo, m_block, G), "float32", name="xsum")
    w = te.placeholder((T, K // r, nt), "uint32", name="w")
    s = te.placeholder((T, G, nt), "float32", name="s")
    zc = te.placeholder((T, G, nt), "uint8", name="zc")
    mantissa = tvm.tirx.const(((1 << cb) - 1) << (23 - cb), "uint32")
    one = tvm.tirx.const(0x3F800000, "uint32")
    inv = tvm.tirx.const(1.0 / (1 << cb), "float32")
    one_f = tvm.tirx.const(1.0, "float32")

    def weight(t, k, j):
        bits = ((w[t, k // r, j] >> (k % r * cb).astype("uint32"))
                << tvm.tirx.const(23 - cb, "uint32") & mantissa) | one
        f = tvm.tirx.reinterpret("float32", bits)                   # 1 + u / 2^cb
        z = zc[t, k // B, j].astype("float32") * inv + one_f        # 1 + zc / 2^cb
        return (f - z) * s[t, k // B, j]                            # (u - zc) * s

    u = te.compute((T, K, nt), weight, name="unpack")
    kk = te.reduce_axis((0, C), name="kk")
    partial = te.compute(
        (mo, m_block, T, K // C, nt),
        lambda io, ii, t, c, j: te.sum(x[io, ii, c * C + kk] * u[t, c * C + kk, j], axis=kk),
        name="partial")
    c = te.reduce_axis((0, K // C), name="c")
    y = te.compute((mo, m_block, T * nt),
                   lambda io, ii, n: te.sum(partial[io, ii, n // nt, c, n % nt], axis=c),
                   name="y")
    return te.create_prim_func([x, xsum, w, s, zc, y])


def _int8_func(ks: KernelShape, m_block: int):
    import tvm
    from tvm import te

    T, K, G, B, nt = ks.tiles, ks.k_pad, ks.groups, ks.block, ks.n_tile
    cb, c = ks.container_bits, ks.per_byte
    mo = te.var("m_outer", "int64")
    xq = te.placeholder((mo, m_block, K), "int8", name="xq")
    xsum = te.placeholder((mo, m_block, G), "float32", name="xsum")
    xscale = te.placeholder((mo, m_block, G), "float32", name="x_scale")
    w = te.placeholder((T, K // (4 * c), nt, 4), "uint8", name="w")
    s = te.placeholder((T, G, nt), ks.scale_dtype, name="s")
    zc = te.placeholder((T, G, nt), "uint8", name="zc")
    mask = tvm.tirx.const((1 << cb) - 1, "uint8")

    def scale(t, g, j):
        v = s[t, g, j]
        return v if ks.scale_dtype == "float32" else v.astype("float32")
    # Rows k4*4 .. k4*4+3 of the tile are the 64 bytes of w[t, k4 // c] shifted by k4 % c.
    u = te.compute((T, K // 4, nt, 4),
                   lambda t, k4, j, b: (w[t, k4 // c, j, b] >> (k4 % c * cb).astype("uint8"))
                   & mask, name="unpack")
    kk = te.reduce_axis((0, B), name="kk")
    partial = te.compute(
        (mo, m_block, T, G, nt),
        lambda io, ii, t, g, j: te.sum(
            u[t, (g * B + kk) // 4, j, kk % 4].astype("int32")
            * xq[io, ii, g * B + kk].astype("int32"), axis=kk),
        name="partial")
    g = te.reduce_axis((0, G), name="g")
    # x is quantized per row and group (x ~= xq * x_scale[m, g]): the group's exact integer
    # sum is scaled by both scales.
    y = te.compute(
        (mo, m_block, T * nt),
        lambda io, ii, n: te.sum(
            xscale[io, ii, g] * scale(n // nt, g, n % nt)
            * (partial[io, ii, n // nt, g, n % nt].astype("float32")
               - xsum[io, ii, g] * zc[n // nt, g, n % nt].astype("float32")), axis=g),
        name="y")
    return te.create_prim_func([xq, xsum, xscale, w, s, zc, y])


QUANTIZE_FUNC = "qmm_quantize"
# The same prologue with its rows spread over the thread pool, for calls with many rows: the
# serial one took ~30 % of MiniLM's time at 32x128 on 2 threads, one core idle meanwhile.
# Few rows stay serial: waking the pool costs more than quantizing them.
QUANTIZE_ROWS_FUNC = "qmm_quantize_rows"
QUANTIZE_PARALLEL_ROWS = 64


def _quantize_func(ks: KernelShape):
    """The int8 path's activation prologue: per row and group, symmetric int8.

    ``x_scale = max|x| / 127`` (1 for an all-zero group), ``xq = nearbyint(x * (127 / max|x|))``
    (within [-127, 127], half to even like numpy's rint), and ``xsum`` = the sum of xq per
    group, all as ``runtime.quantize_groups`` computes them.
    """
    import tvm
    from tvm import te

    K, G, B = ks.k_pad, ks.groups, ks.block
    m = te.var("m", "int64")
    x = te.placeholder((m, K), "float32", name="x")
    kk = te.reduce_axis((0, B), name="kk")
    amax = te.compute((m, G), lambda i, g: te.max(te.abs(x[i, g * B + kk]), axis=kk),
                      name="amax")
    zero = tvm.tirx.const(0.0, "float32")
    qmax = tvm.tirx.const(127.0, "float32")
    scale = te.compute((m, G), lambda i, g: tvm.tirx.Select(
        amax[i, g] > zero, amax[i, g] * tvm.tirx.const(1.0 / 127, "float32"),
        tvm.tirx.const(1.0, "float32")), name="x_scale")
    inv = te.compute((m, G), lambda i, g: tvm.tirx.Select(
        amax[i, g] > zero, qmax / amax[i, g], zero), name="inv")
    xq = te.compute((m, K), lambda i, k: tvm.tirx.nearbyint(x[i, k] * inv[i, k // B])
                    .astype("int8"), name="xq")
    k2 = te.reduce_axis((0, B), name="k2")
    xsum = te.compute((m, G), lambda i, g: te.sum(xq[i, g * B + k2].astype("float32"),
                                                  axis=k2), name="xsum")
    return te.create_prim_func([x, xq, scale, xsum])


def quantize_source(ks: KernelShape, parallel: bool = False) -> str:
    """The prologue of ``_quantize_func`` as vector TensorIR (TVMScript): per row and group,
    the group's ``|x|`` maxima in one vector of the dot's lanes, compared as int32 bit patterns
    (for non-negative floats the same order; a reduction of ints is a shuffle tree, one of
    floats with maxnum's NaN rules a scalar chain), then ``nearbyint(x * inv)`` per vector,
    stored as int8, and the int32 sum of the codes (exact: at most 127 x 256). The same float32
    operations as the TE form, so the same codes and scales; the TE form's scalar group
    reductions took 47-77% of the int8 kernel's time at M = 256 (K = 384 and 1536, Zen 4).
    ``parallel``: rows over the thread pool (``QUANTIZE_ROWS_FUNC``)."""
    K, G, B, L = ks.k_pad, ks.groups, ks.block, ks.lanes
    V = B // L
    f, i32 = f"float32x{L}", f"int32x{L}"

    def reduce(op, v):
        return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('llvm.vector.reduce.{op}'),"
                f" {v}, dtype='int32')")

    return "\n".join([
        "@T.prim_func",
        f"def {QUANTIZE_ROWS_FUNC if parallel else QUANTIZE_FUNC}(x_h: T.handle, xq_h: T.handle, "
        "scale_h: T.handle, xsum_h: T.handle):",
        "    T.func_attr({'tirx.noalias': True})",
        "    m = T.int64()",
        f"    x = T.match_buffer(x_h, (m, {K}), 'float32')",
        f"    xq = T.match_buffer(xq_h, (m, {K}), 'int8')",
        f"    scale = T.match_buffer(scale_h, (m, {G}), 'float32')",
        f"    xsum = T.match_buffer(xsum_h, (m, {G}), 'float32')",
        "    for i in T.parallel(m):" if parallel else "    for i in range(m):",
        f"        for g in range({G}):",
        f"            vmax = T.alloc_local((1,), '{i32}')",
        f"            vsum = T.alloc_local((1,), '{i32}')",
        f"            vmax[0] = T.broadcast(T.int32(0), {L})",
        f"            vsum[0] = T.broadcast(T.int32(0), {L})",
        f"            for c in T.unroll({V}):",
        f"                vmax[0] = T.max(vmax[0], T.reinterpret('{i32}', "
        f"T.fabs(x.vload([i, g * {B} + c * {L}], '{f}'))))",
        f"            amax = T.reinterpret('float32', {reduce('smax', 'vmax[0]')})",
        "            scale[i, g] = T.Select(amax > T.float32(0), amax * T.float32(1.0 / 127), "
        "T.float32(1))",
        "            inv = T.Select(amax > T.float32(0), T.float32(127) / amax, T.float32(0))",
        f"            for c in T.unroll({V}):",
        f"                q = T.Cast('{i32}', T.nearbyint(x.vload([i, g * {B} + c * {L}], '{f}')"
        f" * T.broadcast(inv, {L})))",
        f"                xq[i, T.ramp(g * {B} + c * {L}, 1, {L})] = T.Cast('int8x{L}', q)",
        "                vsum[0] = vsum[0] + q",
        f"            xsum[i, g] = T.Cast('float32', {reduce('add', 'vsum[0]')})",
    ]) + "\n"


def schedule_quantize(ks: KernelShape, parallel: bool = False):
    """The int8 prologue (``quantize_source``) in a schedule-like wrapper."""
    import tvm

    if ks.block % ks.lanes:
        raise ValueError(f"the int8 prologue needs groups of whole vectors: block {ks.block}, "
                         f"{ks.lanes} lanes")
    return _Prepared(tvm.script.from_source(quantize_source(ks, parallel)))


def _loops_below(sch, block, depth: int) -> list:
    """The loops of ``block`` below its first ``depth`` loops (unit loops are dropped by TVM)."""
    return list(sch.get_loops(block)[depth:])


def _schedule_output(sch, y, g, ii, j, acc, lanes: int, unroll_rows: bool) -> None:
    """The output block of both schedules: columns in unrolled vectors of ``lanes``, the row
    block unrolled if asked, and the zero-init of y and the accumulator's write-back
    vectorized."""
    j_hi, j_lo = sch.split(j, [None, lanes])
    if unroll_rows:
        sch.unroll(ii)
    sch.unroll(j_hi)
    sch.vectorize(j_lo)
    y_init = sch.decompose_reduction(y, g)
    sch.vectorize(sch.get_loops(y_init)[-1])
    if acc is not None:
        sch.vectorize(sch.get_loops(acc)[-1])


def schedule_exact(ks: KernelShape, variant: dict):
    """The scheduled exact-path PrimFunc (a tvm.s_tir.Schedule)."""
    import tvm

    mb, order = variant["m_block"], variant["order"]
    k_unroll = variant["k_unroll"]
    if order == "dequant":  # steps of whole words within the chunk
        k_unroll = math.gcd(k_unroll, dequant_chunk(ks))
    elif ks.block % k_unroll:
        raise ValueError(f"k_unroll={k_unroll} does not divide the group of {ks.block} rows")
    func = _exact_dequant_func(ks, mb) if order == "dequant" else _exact_func(ks, mb)
    sch = tvm.s_tir.Schedule(func)
    y, part, unpack = sch.get_sblock("y"), sch.get_sblock("partial"), sch.get_sblock("unpack")
    io, ii, n, g = sch.get_loops(y)
    t, j = sch.split(n, [None, ks.n_tile])
    if order == "row":
        # tile, row block, group: the row block's accumulators live across the groups
        sch.reorder(t, io, g, ii, j)
        acc = sch.cache_write(y, 0, "global")
        sch.reverse_compute_at(acc, io)
        sch.compute_inline(unpack)
        sch.compute_at(part, g)
    else:
        # tile, group (or chunk), row block: codes are unpacked once for all rows
        sch.reorder(t, g, io, ii, j)
        sch.compute_at(part, io)
        sch.compute_at(unpack, g)
        sch.set_scope(unpack, 0, "local")
        acc = None
    # The accumulators (acc, part) in "global" buffers: stack arrays inside the parallel
    # tile loop, which LLVM keeps in registers; "local" ones were TVMBackendAllocWorkspace
    # calls per tile (heap memory; M = 1 on 4096 x 4096: 0.57-0.59 -> 0.56 ms on a Zen 4)
    sch.set_scope(part, 0, "global")
    sch.parallel(t)
    # partial: [rows of the block,] columns, reduction over the group's rows. The columns
    # are done col_vectors vectors at a time: m_block x col_vectors accumulators in registers.
    col_vectors = variant["col_vectors"]
    below = _loops_below(sch, part, 3)
    p_rows = below[0] if mb > 1 else None
    p_cols, p_k = below[-2], below[-1]
    c_pass, p_cols = sch.split(p_cols, [None, col_vectors * ks.lanes])
    k_out, k_in = sch.split(p_k, [None, k_unroll])
    sch.reorder(*[lp for lp in (c_pass, k_out, k_in, p_rows, p_cols) if lp is not None])
    c_hi, c_lo = sch.split(p_cols, [None, ks.lanes])
    sch.unroll(k_in)
    if p_rows is not None:
        sch.unroll(p_rows)
    sch.unroll(c_hi)
    sch.vectorize(c_lo)
    p_init = sch.decompose_reduction(part, k_out)
    sch.vectorize(sch.get_loops(p_init)[-1])
    if order != "row":
        u_rows, u_cols = sch.get_loops(unpack)[-2:]
        _, u_word = sch.split(u_rows, [None, 32 // ks.container_bits])
        sch.unroll(u_word)  # constant shifts
        u_hi, u_lo = sch.split(u_cols, [None, ks.lanes])
        sch.unroll(u_hi)
        sch.vectorize(u_lo)
    _schedule_output(sch, y, g, ii, j, acc, ks.lanes, unroll_rows=mb > 1)
    return sch


# --------------------------------------------------------------------------------------------
# int8, AVX-512 VNNI, row order: codes unpacked in registers (the GEMV and small-M kernel)
# --------------------------------------------------------------------------------------------
#
# The scheduled ``row`` order unpacks a group's codes into a stack buffer (block x n_tile
# bytes) and the tensorized vpdpbusd reads them back: a store and a load per weight byte,
# which held the M=1 GEMV at 0.75x onnxruntime accuracy_level 4 (4096x4096, block 128, Zen 4).
# This kernel is written as vector TensorIR instead: per 64 bytes of the cpu_vnni layout (16
# columns x 4 bytes), one aligned load, then for each of the c codes of a byte one mask (and
# a shift, which LLVM makes one ``vgf2p8affineqb``) and one vpdpbusd per row of the block,
# with the row's 4 activation bytes broadcast once per word for all column vectors. Each
# (row, column vector) keeps ``int8_fused_splits`` int32 accumulators (the byte's codes go to
# different ones: short dependent vpdpbusd chains); with one per code, code h is masked in
# place (read as 2^(h cb) u, still an unsigned byte) and its exact sum shifted back once per
# group, so a byte costs one ``vpandq`` per code and no shift. Once per group the sums are
# converted and scaled: ``y += x_scale * s * (P - xsum * zc)``, as in ``_int8_func``.
# Measured (Zen 4, 1 thread, kernel alone): 4096x4096 block 128 M=1 0.256 -> 0.122 ms,
# block 32 0.195 -> 0.160 ms.

VNNI_ACCUMULATORS = 16  # int32 zmm accumulators at most (of 32 registers: codes, scales)


def int8_fused_splits(ks: KernelShape, m_block: int) -> int:
    """Accumulators per (row, column vector) of the fused kernel: one per code of a byte when
    the row block's accumulators fit ``VNNI_ACCUMULATORS``, else fewer (a divisor of c)."""
    vectors = ks.n_tile // ks.lanes
    splits = ks.per_byte
    while splits > 1 and m_block * vectors * splits > VNNI_ACCUMULATORS:
        splits //= 2
    return splits


def int8_codes_in_place(ks: KernelShape, m_block: int) -> bool:
    """Whether the fused kernel masks each code of a byte in place (no shift: code h is read
    as 2^(h cb) u) and shifts its accumulator's exact int32 sum back once per group: when each
    code of a byte has its own accumulator and no sum can overflow (255 x 127 per row)."""
    return (ks.container_bits < 8 and int8_fused_splits(ks, m_block) == ks.per_byte
            and ks.block * 255 * 127 < 2 ** 31)


def int8_fused_unroll(ks: KernelShape) -> int:
    """Words of codes (4c rows) unrolled in the fused kernel's inner loop: up to 4, a divisor
    of the group's words."""
    return math.gcd(ks.block // (4 * ks.per_byte), 4)


def _scale_vector(ks: KernelShape, cols: str) -> str:
    """The fused kernels' float32 vector of the tile's scales ``cols`` of group g (f16 scales
    converted as they load: vcvtph2ps)."""
    L = ks.lanes
    if ks.scale_dtype == "float32":
        return f"s.vload([t, g, {cols}], 'float32x{L}')"
    return f"T.Cast('float32x{L}', s.vload([t, g, {cols}], 'float16x{L}'))"


def _int8_fused_signature(mb: int, K: int, G: int, TL: int, c: int, nt: int,
                          scale_dtype: str) -> list[str]:
    """The fused int8 kernel's signature, buffers and outer loops (tiles in parallel, then the
    row blocks), shared by the VNNI and AVX2 sources."""
    return [
        "@T.prim_func",
        "def qmm_int8_fused(xq_h: T.handle, xsum_h: T.handle, xs_h: T.handle, w_h: T.handle, "
        "s_h: T.handle, zc_h: T.handle, y_h: T.handle):",
        "    T.func_attr({'tirx.noalias': True})",
        "    mo = T.int64()",
        f"    xq = T.match_buffer(xq_h, (mo, {mb}, {K}), 'int8')",
        f"    xsum = T.match_buffer(xsum_h, (mo, {mb}, {G}), 'float32')",
        f"    xs = T.match_buffer(xs_h, (mo, {mb}, {G}), 'float32')",
        f"    w = T.match_buffer(w_h, ({TL}, {K // (4 * c)}, {nt}, 4), 'uint8')",
        f"    s = T.match_buffer(s_h, ({TL}, {G}, {nt}), '{scale_dtype}')",
        f"    zc = T.match_buffer(zc_h, ({TL}, {G}, {nt}), 'uint8')",
        f"    y = T.match_buffer(y_h, (mo, {mb}, {TL * nt}), 'float32')",
        f"    for t in T.parallel({TL}):",
        "        for io in range(mo):",
    ]


def _zero_codes(ks: KernelShape, cols: str) -> str:
    """The fused kernels' float32 vector of zero codes for the tile's columns ``cols``: the
    shared constant (``ks.zero_code``) broadcast, or the group's bytes of the zc table."""
    if ks.zero_code is not None:
        return f"T.broadcast(T.float32({float(ks.zero_code)}), {ks.lanes})"
    return f"T.Cast('float32x{ks.lanes}', zc.vload([t, g, {cols}], 'uint8x{ks.lanes}'))"


def int8_fused_source(ks: KernelShape, variant: dict) -> str:
    """The TVMScript of the fused int8 kernel (VNNI, ``row`` order) for ``ks`` and the
    variant's ``m_block``: the arguments of ``_int8_func`` (xq ``[m_outer, m_block, k_pad]``,
    xsum and x_scale ``[m_outer, m_block, G]``, the cpu_vnni codes, scales and zero points
    ``[tiles, G, n_tile]``, y ``[m_outer, m_block, n_pad]``), the same sums: per group the
    exact int32 dot products, then ``y += x_scale * s * (P - xsum * zc)``.

    The rows of the block are unrolled here (``acc_<row>_<split>``, ``yacc_<row>``: one
    local array of column vectors each, small enough for LLVM to keep in registers; TVM puts
    local arrays above 1 KiB on the heap). On AVX2 targets (8 lanes) the kernel of
    ``_int8_fused_avx2_source``."""
    if ks.lanes == layout.AVX2_INT8_LANES:
        return _int8_fused_avx2_source(ks, variant)
    mb, L, nt, cb, c = variant["m_block"], ks.lanes, ks.n_tile, ks.container_bits, ks.per_byte
    CV, K, G, B, TL = nt // L, ks.k_pad, ks.groups, ks.block, ks.tiles
    W = B // (4 * c)                      # words of codes (4c rows: one byte each) per group
    U = int8_fused_unroll(ks)
    S = int8_fused_splits(ks, mb)
    in_place = int8_codes_in_place(ks, mb)
    word = f"g * {W} + ko * {U} + ki"
    vec = f"'int8x{4 * L}'"
    lines = _int8_fused_signature(mb, K, G, TL, c, nt, ks.scale_dtype) + [
    ]
    for r in range(mb):
        lines.append(f"            yacc_{r} = T.alloc_local(({CV},), 'float32x{L}')")
        lines += [f"            acc_{r}_{i} = T.alloc_local(({CV},), 'int32x{L}')"
                  for i in range(S)]
    lines.append(f"            for cv in T.unroll({CV}):")
    lines += [f"                yacc_{r}[cv] = T.broadcast(T.float32(0), {L})" for r in range(mb)]
    lines += [f"            for g in range({G}):",
              f"                for cv in T.unroll({CV}):"]
    lines += [f"                    acc_{r}_{i}[cv] = T.broadcast(T.int32(0), {L})"
              for r in range(mb) for i in range(S)]
    lines += [
        f"                for ko in range({W // U}):",
        f"                    for ki in T.unroll({U}):",
        # the rows' 4 activation bytes of each code of the word, broadcast to every lane
        *[f"                        a_{r}_{h} = T.reinterpret(T.broadcast(T.reinterpret("
          f"xq.vload([io, {r}, ({word}) * {4 * c} + {h * 4}], 'int8x4'), dtype='int32'), "
          f"{L}), dtype={vec})" for r in range(mb) for h in range(c)],
        f"                        for cv in T.unroll({CV}):",
        f"                            v = w.vload([t, {word}, cv * {L}, 0], 'uint8x{4 * L}')",
    ]
    for h in range(c):
        mask = f"T.broadcast(T.uint8({((1 << cb) - 1) << (h * cb if in_place else 0)}), {4 * L})"
        if cb == 8:
            code = "v"
        elif h == 0 or in_place:
            code = f"v & {mask}"
        else:
            code = f"(v >> T.broadcast(T.uint8({h * cb}), {4 * L})) & {mask}"
        lines.append(f"                            u{h} = T.reinterpret({code}, dtype={vec})")
        for r in range(mb):
            a = f"acc_{r}_{h % S}[cv]"
            lines.append(f"                            {a} = T.call_llvm_pure_intrin("
                         "T.llvm_lookup_intrinsic_id('llvm.x86.avx512.vpdpbusd.512'), "
                         f"{a}, u{h}, a_{r}_{h}, dtype='int32x{L}')")
    lines += [f"                for cv in T.unroll({CV}):",
              f"                    sv = {_scale_vector(ks, f'cv * {L}')}",
              f"                    zv = {_zero_codes(ks, f'cv * {L}')}"]
    for r in range(mb):
        # codes masked in place are 2^(h cb) times the code: their exact sums shift back
        total = " + ".join(
            f"(acc_{r}_{i}[cv] >> T.broadcast({i * cb}, {L}))" if in_place and i
            else f"acc_{r}_{i}[cv]" for i in range(S))
        lines.append(
            f"                    yacc_{r}[cv] = yacc_{r}[cv] + T.broadcast(xs[io, {r}, g], {L})"
            f" * sv * (T.Cast('float32x{L}', {total}) - T.broadcast(xsum[io, {r}, g], {L})"
            " * zv)")
    lines.append(f"            for cv in T.unroll({CV}):")
    lines += [f"                y[io, {r}, T.ramp(t * {nt} + cv * {L}, 1, {L})] = yacc_{r}[cv]"
              for r in range(mb)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# int8, AVX2 (no VNNI), row order: the fused kernel with vpmaddubsw + vpmaddwd
# --------------------------------------------------------------------------------------------
#
# The same idea for AVX2 hosts (Haswell, Zen 3): per 32 bytes of the cpu_vnni layout (8
# columns x 4 rows), one load, then per code of a byte one mask (and, for codes above bit 0,
# a shift: AVX2 shifts 16-bit lanes, so ``v >> s`` is a ``vpsrlw`` plus the ``vpand``) and one
# ``vpmaddubsw`` per row of the block, added in int16 to the (row, column vector)'s int16 sum;
# every ``int8_avx2_flush_words`` words one ``vpmaddwd`` with ones widens it into the int32
# sum. No stack buffer. The same exactness rule as ``register_avx2_intrins``: activations lie
# in [-127, 127], so one ``vpmaddubsw`` pair of codes below 2^cb adds at most
# 2 (2^cb - 1) 127 (3810 for 4-bit codes) and cannot saturate, and the int16 sum takes as many
# of them as stay below 32767 (``AVX2_INT16_STEPS`` = 8 for 4-bit codes, as the tensorized
# path; 43 for 2-bit ones). Codes are not masked in place as on VNNI: 16 u x 127 pairs would
# saturate. 8-bit codes go by nibbles: two int16 sums, the high one widened by ``vpmaddwd``
# with 16s. AVX2 has 16 ymm registers, so the tile's column vectors are done in passes of
# ``int8_avx2_pass_vectors`` (m_block x vectors x (int16 sums + int32 sum + float sum) within
# ``AVX2_ACCUMULATORS``), each pass over all groups with its own output sums.

AVX2_ACCUMULATORS = 12  # ymm sums of one pass at most (of 16: codes, activations, a temp)


def int8_avx2_int16_limit(ks: KernelShape) -> int:
    """``vpmaddubsw`` results one int16 sum takes: the largest count whose worst case
    (codes 2^cb - 1, or 15 for the nibbles of 8-bit codes, times 127 in both bytes of a pair)
    stays within 32767."""
    top = 15 if ks.container_bits == 8 else (1 << ks.container_bits) - 1
    return 32767 // (2 * top * 127)


def int8_avx2_flush_words(ks: KernelShape) -> int:
    """Words of codes (4c rows) summed in int16 before ``vpmaddwd`` widens the sums: each word
    adds c results to a sum (one per code; 8-bit: one per nibble sum), so the largest divisor
    of the group's words within ``int8_avx2_int16_limit`` / c."""
    words, per_word = ks.block // (4 * ks.per_byte), ks.per_byte
    limit = max(1, int8_avx2_int16_limit(ks) // per_word)
    return max(d for d in range(1, min(words, limit) + 1) if words % d == 0)


def int8_avx2_pass_vectors(ks: KernelShape, m_block: int) -> int:
    """Column vectors of one pass of the AVX2 fused kernel: the most (a divisor of the tile's)
    whose sums, m_block x vectors x (int16 sums + int32 + float32), fit AVX2_ACCUMULATORS
    (at least 1: a larger row block spills)."""
    per = m_block * ((2 if ks.container_bits == 8 else 1) + 2)
    vectors = ks.n_tile // ks.lanes
    while vectors > 1 and vectors * per > AVX2_ACCUMULATORS:
        vectors //= 2
    return vectors


def _int8_fused_avx2_source(ks: KernelShape, variant: dict) -> str:
    """``int8_fused_source`` for AVX2 (8 int32 lanes): see the comment above."""
    mb, L, nt, cb, c = variant["m_block"], ks.lanes, ks.n_tile, ks.container_bits, ks.per_byte
    CV, K, G, B, TL = nt // L, ks.k_pad, ks.groups, ks.block, ks.tiles
    W = B // (4 * c)                      # words of codes (4c rows: one byte each) per group
    FW = int8_avx2_flush_words(ks)        # words per int16 sum
    U = math.gcd(FW, 4)                   # words unrolled
    P = int8_avx2_pass_vectors(ks, mb)    # column vectors per pass
    nibbles = cb == 8
    sums = ("lo", "hi") if nibbles else ("",)
    word = f"g * {W} + f * {FW} + ko * {U} + ki"
    vec = "'int8x32'"

    def pmaddubsw(u, a):
        return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('llvm.x86.avx2.pmadd.ub.sw'),"
                f" T.reinterpret({u}, dtype={vec}), {a}, dtype='int16x16')")

    def pmaddwd(v, weight):
        return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('llvm.x86.avx2.pmadd.wd'), "
                f"{v}, T.broadcast(T.int16({weight}), 16), dtype='int32x8')")

    lines = _int8_fused_signature(mb, K, G, TL, c, nt, ks.scale_dtype) + [
        # passes of P column vectors (column cv of the pass is p * P + cv of the tile)
        f"            for p in T.unroll({CV // P}):",
    ]
    for r in range(mb):
        lines.append(f"                yacc_{r} = T.alloc_local(({P},), 'float32x{L}')")
        lines.append(f"                acc_{r} = T.alloc_local(({P},), 'int32x{L}')")
        lines += [f"                acc16{n}_{r} = T.alloc_local(({P},), 'int16x16')" for n in sums]
    lines.append(f"                for cv in T.unroll({P}):")
    lines += [f"                    yacc_{r}[cv] = T.broadcast(T.float32(0), {L})"
              for r in range(mb)]
    lines += [f"                for g in range({G}):",
              f"                    for cv in T.unroll({P}):"]
    lines += [f"                        acc_{r}[cv] = T.broadcast(T.int32(0), {L})"
              for r in range(mb)]
    lines += [f"                    for f in range({W // FW}):",
              f"                        for cv in T.unroll({P}):"]
    lines += [f"                            acc16{n}_{r}[cv] = T.broadcast(T.int16(0), 16)"
              for r in range(mb) for n in sums]
    lines += [
        f"                        for ko in range({FW // U}):",
        f"                            for ki in T.unroll({U}):",
        # the rows' 4 activation bytes of each code of the word, broadcast to every lane
        *[f"                                a_{r}_{h} = T.reinterpret(T.broadcast(T.reinterpret("
          f"xq.vload([io, {r}, ({word}) * {4 * c} + {h * 4}], 'int8x4'), dtype='int32'), "
          f"{L}), dtype={vec})" for r in range(mb) for h in range(c)],
        f"                                for cv in T.unroll({P}):",
        f"                                    v = w.vload([t, {word}, (p * {P} + cv) * {L}, 0], "
        "'uint8x32')",
    ]
    ind = " " * 36
    if nibbles:
        # 8-bit codes: u = 16 hi + lo, each nibble below 16 (no saturation), hi weighted later
        codes = [("lo", "v & T.broadcast(T.uint8(15), 32)", "a_{r}_0"),
                 ("hi", "v >> T.broadcast(T.uint8(4), 32)", "a_{r}_0")]
    else:
        codes = []
        for h in range(c):
            if h == 0:
                code = f"v & T.broadcast(T.uint8({(1 << cb) - 1}), 32)"
            elif (h + 1) * cb == 8:  # the top code: the shift clears the bits above it
                code = f"v >> T.broadcast(T.uint8({h * cb}), 32)"
            else:
                code = (f"(v >> T.broadcast(T.uint8({h * cb}), 32)) & "
                        f"T.broadcast(T.uint8({(1 << cb) - 1}), 32)")
            codes.append(("", code, f"a_{{r}}_{h}"))
    for i, (n, code, a) in enumerate(codes):
        lines.append(f"{ind}u{i} = {code}")
        for r in range(mb):
            acc = f"acc16{n}_{r}[cv]"
            lines.append(f"{ind}{acc} = {acc} + {pmaddubsw(f'u{i}', a.format(r=r))}")
    # widen the int16 sums into the int32 ones (exact: vpmaddwd adds pairs of int16 products)
    lines.append(f"                        for cv in T.unroll({P}):")
    for r in range(mb):
        widened = " + ".join(pmaddwd(f"acc16{n}_{r}[cv]", 16 if n == "hi" else 1) for n in sums)
        lines.append(f"                            acc_{r}[cv] = acc_{r}[cv] + {widened}")
    cols = f"(p * {P} + cv) * {L}"
    lines += [f"                    for cv in T.unroll({P}):",
              f"                        sv = {_scale_vector(ks, cols)}",
              f"                        zv = {_zero_codes(ks, cols)}"]
    lines += [
        f"                        yacc_{r}[cv] = yacc_{r}[cv] + T.broadcast(xs[io, {r}, g], {L})"
        f" * sv * (T.Cast('float32x{L}', acc_{r}[cv]) - T.broadcast(xsum[io, {r}, g], {L})"
        " * zv)" for r in range(mb)]
    lines.append(f"                for cv in T.unroll({P}):")
    lines += [f"                    y[io, {r}, T.ramp(t * {nt} + {cols}, 1, {L})] = yacc_{r}[cv]"
              for r in range(mb)]
    return "\n".join(lines) + "\n"


def int8_fused(ks: KernelShape, variant: dict) -> bool:
    """Whether the int8 variant runs the fused kernel: ``row`` order on AVX-512 VNNI or AVX2
    (not Arm sdot, whose row order is the tensorized schedule)."""
    return (ks.numerics == "int8" and ks.lanes in (layout.VNNI_LANES, layout.AVX2_INT8_LANES)
            and variant["order"] == "row")


def schedule_int8_fused(ks: KernelShape, variant: dict):
    """The fused int8 kernel (TVMScript from ``int8_fused_source``) in a schedule-like
    wrapper."""
    import tvm

    return _Prepared(tvm.script.from_source(int8_fused_source(ks, variant)))


def schedule_int8(ks: KernelShape, variant: dict):
    """The scheduled int8 PrimFunc (a tvm.s_tir.Schedule): vpdpbusd on VNNI targets, the
    AVX2 pair elsewhere (``int8_intrin``)."""
    import tvm

    intrin = int8_intrin(ks)
    mb, order = variant["m_block"], variant["order"]
    sch = tvm.s_tir.Schedule(_int8_func(ks, mb))
    y, part, unpack = sch.get_sblock("y"), sch.get_sblock("partial"), sch.get_sblock("unpack")
    io, ii, n, g = sch.get_loops(y)
    t, j = sch.split(n, [None, ks.n_tile])
    acc = None
    if order == "row":
        sch.reorder(t, io, g, ii, j)
        acc = sch.cache_write(y, 0, "local")
        sch.reverse_compute_at(acc, io)
        sch.compute_at(part, g)
    else:
        sch.reorder(t, g, io, ii, j)
        sch.compute_at(part, io)
    sch.compute_at(unpack, g)
    sch.set_scope(part, 0, "local")
    sch.set_scope(unpack, 0, "local")
    sch.parallel(t)
    below = _loops_below(sch, part, 3)
    p_rows = below[0] if mb > 1 else None
    p_cols, p_k = below[-2], below[-1]
    steps = int16_steps(ks)
    if steps > 1:  # the intrinsic covers several steps of 4 rows (int16 sums, AVX2)
        k_out, k_step, k_in = sch.split(p_k, [None, steps, 4])
    else:
        (k_out, k_in), k_step = sch.split(p_k, [None, 4]), None
    # n_tile/lanes independent dot products per 4 rows: separate accumulators hide latency.
    c_out, c_in = sch.split(p_cols, [None, ks.lanes])
    sch.reorder(*[lp for lp in (k_out, p_rows, c_out, k_step, c_in, k_in) if lp is not None])
    sch.decompose_reduction(part, k_out)
    sch.tensorize(k_step if k_step is not None else c_in, intrin)
    sch.unroll(c_out)
    if p_rows is not None:
        sch.unroll(p_rows)
    u_loops = sch.get_loops(unpack)
    # rows k4 = kc*c + h: unrolling h makes each shift a constant
    u_kc, u_h = sch.split(u_loops[-3], [None, ks.per_byte])
    sch.unroll(u_h)
    sch.vectorize(sch.fuse(*u_loops[-2:]))  # n_tile columns x 4 rows
    _schedule_output(sch, y, g, ii, j, acc, ks.lanes, unroll_rows=mb > 1 and order == "row")
    return sch


def schedule(ks: KernelShape, variant: dict):
    if ks.numerics == "lut":
        return lut_schedule(ks, variant)
    if int8_fused(ks, variant):
        return schedule_int8_fused(ks, variant)
    if ks.numerics == "int8":
        return schedule_int8(ks, variant)
    return schedule_exact(ks, variant)


def function_name(index: int) -> str:
    return f"qmm_v{index}"


def build_module(ks: KernelShape, variants: list[dict]):
    """One IRModule with a scheduled PrimFunc per variant (``qmm_v0``, ``qmm_v1`` ...) and,
    for the int8 path, the activation quantization ``qmm_quantize`` (and ``qmm_quantize_rows``,
    its rows in parallel)."""
    import tvm

    funcs = {}
    for i, v in enumerate(variants):
        f = schedule(ks, v).mod["main"]
        funcs[function_name(i)] = f.with_attr("global_symbol", function_name(i))
    if ks.numerics == "int8":
        for name, parallel in ((QUANTIZE_FUNC, False), (QUANTIZE_ROWS_FUNC, True)):
            f = schedule_quantize(ks, parallel).mod["main"]
            funcs[name] = f.with_attr("global_symbol", name)
    if ks.numerics == "lut":
        f = schedule_lut_tables(ks).mod["main"]
        funcs[LUT_TABLES_FUNC] = f.with_attr("global_symbol", LUT_TABLES_FUNC)
    return tvm.IRModule(funcs)


# --------------------------------------------------------------------------------------------
# lut: T-MAC-style table lookups for 1- to 4-bit codes (numerics "lut")
# --------------------------------------------------------------------------------------------
#
# The codes' b bits are b one-bit planes (``layout.pack_lut``): for plane i, table group j
# (``table_group`` = g consecutive rows of K) and column n, the g bits form the index
# ``idx_i[j, n]``. Per row of x and table group, the prologue ``qmm_lut_tables`` builds the
# table of the 2^g signed half sums ``L[j, c] = sum_t (bit_t(c) - 1/2) x[g*j + t]`` (entries
# in +-sum|x|/2: half the range of the plain subset sums, and L[~c] = -L[c]), quantized to int8
# with one scale per row and weight group (``ls = max |L| / 127`` over the group's tables), so
# a group's lookups add up as integers. Then, exactly,
#
#     sum_{k in group} x[k] u[k, n] = sum_j sum_i 2^i L[j, idx_i[j, n]] + (2^b - 1)/2 xsum
#     y[n] = sum_g s[g, n] ls[g] ISUM[g, n] + zt[g, n] xsum[g],  zt = s ((2^b - 1)/2 - zc)
#
# with ISUM the integer sum of the quantized lookups and xsum the float sum of x over the
# group. The tables are the only rounding: the accuracy of int8 activations. zt is computed
# once when the kernel is loaded (``runtime.kernel_weights``; the artifact keeps s and zc), so a
# group's flush is two FMAs a vector of columns instead of converting and centring the zero
# points there: 4096 x 4096 2-bit at M = 1 ~90 -> ~87 us of kernel on a Zen 4 (2026-12-07).
# On x86 s and zt are stored as f16 where both are f16 normals (``runtime.store_scales``; the
# tables already round more): at block 128 they are a fifth of a 2-bit weight's bytes in
# f32, which a call streams from DRAM once the weights outgrow the caches. The flush converts
# them as it loads them (two ``vcvtph2ps`` a vector of 16 columns). Zen 4, 1 thread, 4096^2
# 2-bit M = 1, ten alternated rounds: cold 0.282 -> 0.248 ms, warm 0.103 -> 0.101 (median).
#
# The main loop per table group and 16 (AVX2) / 32 (AVX-512BW) columns: ``vpshufb`` looks up
# the table (16 bytes, broadcast into every 128-bit lane as it is loaded: the tables of a row
# stay a quarter of the size, within L1 at K = 4096) with the index bytes of two planes
# interleaved per column ([plane 2p, plane 2p+1] in adjacent bytes), and ``vpmaddubsw`` with
# the bytes [1, 2] adds each column's pair as 1*L + 2*L' into int16: the plane combination and
# the widening in one instruction. An odd last plane is looked up on a half vector and widened
# by ``vpmovsxbw``. Pair p's int16 sums get their weight 4^p when they are widened to int32.
#
# The odd plane in quads (``single_quads``: 1- and 3-bit codes on AVX-512 VBMI + VNNI targets,
# where a weight group's int16 runs hold whole quads of table groups): four table groups'
# odd-plane nibbles are interleaved per column, one ``vpermb`` of the four groups' tables (the
# byte's position in its dword picking the table through index bits 4-5) looks up 64 of them
# and ``vpdpbusd`` with ones adds each column's four into an int32 sum: 7 instructions for
# 128 lookups where the half vectors take 14. The tables are then stored a quad a row (four
# 16-byte tables, 64 bytes), which the pairs read by broadcasting their group's 16 bytes, and
# the codes a quad a row too (the pairs' bytes of its four groups, then the odd plane's), so
# that the kernel reads each as one stream. Zen 4, 1 thread, 4096^2 block 128, M = 1, kernel
# alone, alternated (2026-12-07): 3-bit warm 0.155 -> 0.144 ms, cold 0.32 -> 0.30; 1-bit warm
# 0.086 -> 0.074 (the whole call). A separate buffer for the quads' tables (beside the
# pairs' 64-byte copies) had made the cold 3-bit call ~20 % slower: one more stream.
#
# int16 overflow: one step of a pair adds |L| + 2|L'| <= 3 * 127 = 381 (the single plane 127),
# so ``LUT_INT16_STEPS`` = 86 table groups (86 * 381 = 32766) fit an int16 sum; a weight group
# is flushed to float every ``lut_flush_steps`` table groups (the largest divisor of its table
# groups up to 86: the whole group for blocks up to 344 rows at g = 4). ``vpmaddubsw`` itself
# cannot saturate (381 < 32767).
#
# On AVX-512 VBMI targets (``byte_permute``) ``vpermb`` replaces ``vpshufb``: it reads an
# index's low 6 bits and ignores the top 2 (``vpshufb`` zeroes the entry when bit 7 is set),
# so with the table in all four 128-bit lanes bits 4-5 merely choose between equal copies.
# The low nibble's lookup then takes the code byte as it is, the high one's a 16-bit shift:
# 7 instructions instead of 9 per vector of index bytes (no mask before either lookup).
#
# Arm (16-byte index vectors, both cpu-arm targets): ``tbl`` looks the table up and a widening
# pairwise add plus an arithmetic shift make the same 1*L + 2*L' int16 sums (``arm.py``).

LUT_TABLES_FUNC = "qmm_lut_tables"
LUT_INT16_STEPS = 86
LUT_TABLE_BYTES = 16  # one vpshufb table: 16 int8 entries in a 128-bit lane
LUT_QUAD = 4  # table groups whose odd plane one vpermb looks up (single_quads)

_PSHUFB = {16: "llvm.x86.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b",
           64: "llvm.x86.avx512.pshuf.b.512"}
_PMADDUBSW = {32: "llvm.x86.avx2.pmadd.ub.sw", 64: "llvm.x86.avx512.pmaddubs.w.512"}
# vpermb (AVX-512 VBMI; the ymm form with VL): the table's entry at the index's low 6 (5) bits
_PERMB = {32: "llvm.x86.avx512.permvar.qi.256", 64: "llvm.x86.avx512.permvar.qi.512"}


def lut_table_bytes(ks: KernelShape) -> int:
    """Bytes of one table as the prologue stores it: its 16 entries, once per 128-bit lane of
    the kernel's index vectors where it looks them up with ``vpermb`` (``byte_permute``),
    so the kernel loads a table with one plain 64-byte load instead of a
    ``vbroadcasti32x4`` (a load and a shuffle, on the port ``vpermb`` needs). The tables of a
    K = 4096 row take 64 KB instead of 16; the 2-bit 4096^2 kernel at M = 1 went 98.6 ->
    93.3 us on a Zen 4 (bound calls, alternated, 2026-12-07). ``vpshufb`` (no VBMI) keeps the
    16-byte tables: it reads each 128-bit lane's own copy of the broadcast, and so do the
    pairs of a kernel with the odd plane in quads (their tables a quad a row:
    ``lut_quad_row_bytes``)."""
    if ks.byte_permute and not ks.single_quads:
        return ks.lanes
    return LUT_TABLE_BYTES


def lut_quad_row_bytes(ks: KernelShape) -> int:
    """single_quads: bytes of the tables of one quad of table groups (``_lut_tables_func``)."""
    return LUT_QUAD * lut_table_bytes(ks)


def lut_center(bits: int) -> float:
    """(2^b - 1) / 2: the tables' signed half sums count each code from this centre."""
    return ((1 << bits) - 1) / 2


def lut_flush_steps(block: int, table_group: int) -> int:
    """Table groups summed in int16 before the sums go to float (see the overflow note)."""
    steps = block // table_group
    return max(d for d in range(1, min(steps, LUT_INT16_STEPS) + 1) if steps % d == 0)


def lut_weight_bytes(ks: KernelShape) -> int:
    """Bytes of one (tile, table group) of the ``cpu_lut`` codes: n_tile columns x b planes x
    one index nibble."""
    return ks.n_tile * ks.bits // 2


def lut_source(ks: KernelShape, variant: dict) -> str:
    """The TVMScript of the lut kernel for ``ks`` and the variant's knobs (``k_unroll``: table
    groups unrolled in the inner loop; with the odd plane in quads at least 4). Arguments:
    tables ``[M, J, lut_table_bytes]`` int8 (quads: ``[M, J/4, lut_quad_row_bytes]``), their
    scales and the group sums of x ``[M, G]`` float32, the codes ``[tiles, J, n_tile*b/2]`` u8
    (quads: ``[tiles, J/4, 4*n_tile*b/2]``), scales and
    the zero-point factors zt ``[tiles, G, n_tile]`` (``ks.scale_dtype``: float16 on x86 where
    both fit, converted as they load), y ``[M, N_pad]`` float32. Rows are a
    symbolic M; the column tiles run in parallel (no shared sums: results do not depend on
    the thread count)."""
    g, bits, nt, VB = ks.table_group, ks.bits, ks.n_tile, ks.lanes
    H, CV = VB // 2, nt // VB                       # int16 lanes; vectors of index bytes
    J, G, TL = ks.k_pad // g, ks.groups, ks.tiles
    SG = ks.block // g                               # table groups per weight group
    F = lut_flush_steps(ks.block, g)
    pairs, single = bits // 2, bits % 2
    quads = ks.single_quads
    # the odd plane in quads: the inner loop takes whole quads of table groups
    U = max(variant["k_unroll"], LUT_QUAD) if quads else variant["k_unroll"]
    sums = (pairs + (0 if quads else single)) * 2 * CV  # int16 sums: (pair, vector, half)
    QV = nt // 32                                    # quads: vectors of 32 columns
    j = f"g * {SG} + f * {F} + jo * {U} + ji"

    def lookup(intrin, table, index, lanes):
        return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{intrin}'), {table}, "
                f"T.reinterpret({index}, dtype='int8x{lanes}'), dtype='int8x{lanes}')")

    if VB == layout.NEON_LUT_BYTES:  # Arm: tbl, and the pair sum without vpmaddubsw
        from qcompiler.codegen.cpu import arm

        pair_sum, single_sum, single_table = arm.neon_lut_steps(VB, H)
    else:
        lookups = _PERMB if ks.byte_permute else _PSHUFB
        lookup_full, lookup_half = lookups[VB], lookups[H]
        # [1, 2] in every byte pair: the unsigned operand of vpmaddubsw (planes 2p and 2p+1)
        plane_weights = f"T.reinterpret(T.broadcast(T.int16(513), {H}), dtype='int8x{VB}')"
        single_table = H

        def pair_sum(table, index):
            return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{_PMADDUBSW[VB]}'), "
                    f"{plane_weights}, {lookup(lookup_full, table, index, VB)}, dtype='int16x{H}')")

        def single_sum(table, index):
            return f"T.Cast('int16x{H}', {lookup(lookup_half, table, index, H)})"

    TB = lut_table_bytes(ks)

    def table_vector(j, lanes):  # the 16-byte table in every 128-bit lane
        if TB >= lanes:  # (stored in every lane: one plain load)
            return f"lut.vload([r, {j}, 0], 'int8x{lanes}')"
        # (quads: group j's 16 bytes in its quad's row of four tables)
        at = (f"[r, ({j}) // {LUT_QUAD}, ({j}) % {LUT_QUAD} * {LUT_TABLE_BYTES}]" if quads
              else f"[r, {j}, 0]")
        v = f"lut.vload({at}, 'int8x{LUT_TABLE_BYTES}')"
        copies = ", ".join([v] * (lanes // LUT_TABLE_BYTES))  # (one load: LLVM shares it)
        return f"T.Shuffle([{copies}], [{', '.join(str(i) for i in range(lanes))}])"

    def nibble(v, lanes, high):
        if ks.byte_permute:
            # vpermb reads the index's low 6 bits, and bits 4-5 only pick one of the table's
            # identical 16-byte copies: the low nibble is the byte itself, the high one a
            # 16-bit shift (no mask; bits shifted in from the next byte land in bits 4-7)
            if not high:
                return v
            return (f"T.reinterpret(T.reinterpret({v}, dtype='uint16x{lanes // 2}') >> "
                    f"T.broadcast(T.uint16(4), {lanes // 2}), dtype='uint8x{lanes}')")
        return (f"({v} >> T.broadcast(T.uint8(4), {lanes}))" if high else
                f"({v} & T.broadcast(T.uint8(15), {lanes}))")

    lines = [
        "@T.prim_func",
        "def lut_kernel(lut_h: T.handle, ls_h: T.handle, xs_h: T.handle, w_h: T.handle, "
        "s_h: T.handle, zt_h: T.handle, y_h: T.handle):",
        "    T.func_attr({'tirx.noalias': True})",
        "    m = T.int64()",
        # (quads: a row of tables is a quad of table groups, read front to back)
        f"    lut = T.match_buffer(lut_h, (m, {J // LUT_QUAD}, {lut_quad_row_bytes(ks)}), 'int8')"
        if quads else f"    lut = T.match_buffer(lut_h, (m, {J}, {TB}), 'int8')",
        f"    ls = T.match_buffer(ls_h, (m, {G}), 'float32')",
        f"    xs = T.match_buffer(xs_h, (m, {G}), 'float32')",
        # (quads: a row of w is a quad of table groups, read front to back)
        f"    w = T.match_buffer(w_h, ({TL}, {J // LUT_QUAD}, {LUT_QUAD * lut_weight_bytes(ks)}), "
        "'uint8')" if quads else
        f"    w = T.match_buffer(w_h, ({TL}, {J}, {lut_weight_bytes(ks)}), 'uint8')",
        f"    s = T.match_buffer(s_h, ({TL}, {G}, {nt}), '{ks.scale_dtype}')",
        f"    zt = T.match_buffer(zt_h, ({TL}, {G}, {nt}), '{ks.scale_dtype}')",
        f"    y = T.match_buffer(y_h, (m, {TL * nt}), 'float32')",
        f"    for t in T.parallel({TL}):",
        "        for r in range(m):",
        f"            yacc = T.alloc_local(({2 * CV},), 'float32x{H}')",
    ] + ([f"            acc = T.alloc_local(({sums},), 'int16x{H}')"] if sums else []) + (
        [f"            qacc = T.alloc_local(({2 * QV},), 'int32x16')"] if quads else []) + [
        f"            for c in T.unroll({2 * CV}):",
        f"                yacc[c] = T.broadcast(T.float32(0), {H})",
        f"            for g in range({G}):",
        f"                for f in range({SG // F}):",
    ] + ([f"                    for i in T.unroll({sums}):",
          f"                        acc[i] = T.broadcast(T.int16(0), {H})"] if sums else []) + (
        [f"                    for i in T.unroll({2 * QV}):",
          "                        qacc[i] = T.broadcast(T.int32(0), 16)"] if quads else []) + [
        f"                    for jo in range({F // U}):",
    ] + ([f"                        for ji in T.unroll({U}):"] if sums else [])
    # pair p's vector c of table group j (quads: in the quad's row, its groups one after another)
    pair_at = (f"[t, ({j}) // {LUT_QUAD}, ({j}) % {LUT_QUAD} * {pairs * nt} "
               f"+ (p * {CV} + c) * {VB}]" if quads else f"[t, {j}, (p * {CV} + c) * {VB}]")
    if pairs:
        lines += [
            f"                            tab = {table_vector(j, VB)}",
            f"                            for p in T.unroll({pairs}):",
            f"                                for c in T.unroll({CV}):",
            f"                                    v = w.vload({pair_at}, 'uint8x{VB}')"]
        for half in (0, 1):
            a = f"acc[(p * {CV} + c) * 2 + {half}]"
            lines.append(f"                                    {a} = {a} + "
                         f"{pair_sum('tab', nibble('v', VB, half))}")
    if quads:
        # Four table groups' odd plane at once: a vector of 64 index bytes holds, per byte
        # 4e + q, table group 4Q + q of column e (low nibble) and of column 16 + e (high
        # nibble) of its 32 columns. The byte's position sets index bits 4-5 (q: the OR
        # below, one vpternlogd with the mask), so one vpermb looks each byte up in its own
        # group's table (the quad's row of four tables), and vpdpbusd with ones
        # adds each column's four lookups into an int32 sum: 7 instructions a vector for 128
        # lookups, where the half-vector path takes 7 for 64.
        j0 = f"g * {SG} + f * {F} + jo * {U} + jq * {LUT_QUAD}"
        pos = "T.reinterpret(T.broadcast(T.uint32(0x30201000), 16), dtype='uint8x64')"
        low = "T.broadcast(T.uint8(15), 64)"
        ones = "T.broadcast(T.int8(1), 64)"
        high_bits = ("T.reinterpret(T.reinterpret(vq, dtype='uint16x32') >> "
                     "T.broadcast(T.uint16(4), 32), dtype='uint8x64')")
        lines += [
            f"                        for jq in T.unroll({U // LUT_QUAD}):",
            f"                            tabq = lut.vload([r, ({j0}) // {LUT_QUAD}, 0], "
            "'int8x64')",
            f"                            for c in T.unroll({QV}):",
            f"                                vq = w.vload([t, ({j0}) // {LUT_QUAD}, "
            f"{LUT_QUAD * pairs * nt} + c * 64], 'uint8x64')"]
        for half, bits_ in ((0, "vq"), (1, high_bits)):
            a = f"qacc[c * 2 + {half}]"
            index = f"({bits_} & {low}) | {pos}"
            lines.append(
                f"                                {a} = T.call_llvm_pure_intrin("
                f"T.llvm_lookup_intrinsic_id('llvm.x86.avx512.vpdpbusd.512'), {a}, {ones}, "
                f"{lookup(_PERMB[64], 'tabq', index, 64)}, dtype='int32x16')")
    elif single:
        lines += [
            f"                            tab_half = {table_vector(j, single_table)}",
            f"                            for c in T.unroll({CV}):",
            f"                                v1 = w.vload([t, {j}, {pairs * CV * VB} + c * {H}], "
            f"'uint8x{H}')"]
        for half in (0, 1):
            a = f"acc[({pairs * CV} + c) * 2 + {half}]"
            lines.append(f"                                {a} = {a} + "
                         f"{single_sum('tab_half', nibble('v1', H, half))}")
    terms = [f"T.Cast('int32x{H}', acc[({q * CV} + c) * 2 + h])"
             for q in range(pairs + (0 if quads else single))]
    if quads:  # vector (c, h)'s 32 columns: quad vector 2c + h's two int32 sums
        terms.append(f"T.Shuffle([qacc[(c * 2 + h) * 2], qacc[(c * 2 + h) * 2 + 1]], "
                     f"[{', '.join(str(i) for i in range(32))}])")
    weighted = " + ".join(t + (f" * T.broadcast({4 ** q}, {H})" if q else "")
                          for q, t in enumerate(terms))
    cols = f"c * {VB} + h * {H}"

    def factors(buf):  # a vector of s or zt as float32 (f16 ones converted as they load)
        v = f"{buf}.vload([t, g, {cols}], '{ks.scale_dtype}x{H}')"
        return v if ks.scale_dtype == "float32" else f"T.Cast('float32x{H}', {v})"

    scale = factors("s")
    isum = f"T.broadcast(ls[r, g], {H}) * T.Cast('float32x{H}', {weighted})"
    zterm = f"{factors('zt')} * T.broadcast(xs[r, g], {H})"
    if SG // F == 1:
        # one int16 run per weight group (blocks up to 344 rows at g = 4): the group's two
        # terms in one update, s ls ISUM + zt xs. Two separate passes over the accumulators
        # cost ~17 % of a 4096 x 4096 2-bit call at block 128 (the 16 zmm of float sums
        # spilled around each; Zen 5, 2026-12-05).
        lines += [
            f"                    for c in T.unroll({CV}):",
            "                        for h in T.unroll(2):",
            f"                            yacc[c * 2 + h] = yacc[c * 2 + h] + {scale} * "
            f"{isum} + {zterm}",
        ]
    else:
        lines += [
            f"                    for c in T.unroll({CV}):",
            "                        for h in T.unroll(2):",
            f"                            yacc[c * 2 + h] = yacc[c * 2 + h] + {scale} * {isum}",
            f"                for c in T.unroll({CV}):",
            "                    for h in T.unroll(2):",
            f"                        yacc[c * 2 + h] = yacc[c * 2 + h] + {zterm}",
        ]
    lines += [
        f"            for c in T.unroll({CV}):",
        "                for h in T.unroll(2):",
        f"                    y[r, T.ramp(t * {nt} + {cols}, 1, {H})] = yacc[c * 2 + h]",
    ]
    return "\n".join(lines) + "\n"


class _Prepared:
    """What ``build_module`` needs of a schedule: ``.mod["main"]`` (the lut kernel is written
    directly as scheduled TensorIR, with its vector instructions spelled out)."""

    def __init__(self, func):
        import tvm

        self.mod = tvm.IRModule({"main": func})


def lut_schedule(ks: KernelShape, variant: dict):
    """The lut kernel (TVMScript from ``lut_source``) in a schedule-like wrapper."""
    import tvm

    if ks.block % variant["k_unroll"] or lut_flush_steps(ks.block, ks.table_group) % \
            variant["k_unroll"]:
        raise ValueError(f"k_unroll={variant['k_unroll']} does not divide the table groups "
                         f"summed in int16 ({lut_flush_steps(ks.block, ks.table_group)})")
    return _Prepared(tvm.script.from_source(lut_source(ks, variant)))


def _lut_tables_func(ks: KernelShape):
    """The lut prologue: per row, the quantized tables ``[M, J, lut_table_bytes]`` (16
    entries, repeated where the kernel loads every lane's copy), their scale per weight
    group, and the group sums of x, as
    ``runtime.lut_tables`` computes them (the same float32 operations)."""
    import tvm
    from tvm import te

    g, K, G, B = ks.table_group, ks.k_pad, ks.groups, ks.block
    J, SG = K // g, ks.block // g
    m = te.var("m", "int64")
    x = te.placeholder((m, K), "float32", name="x")
    half = tvm.tirx.const(0.5, "float32")
    t_ax = te.reduce_axis((0, g), name="t")
    absum = te.compute((m, J), lambda i, j: te.sum(te.abs(x[i, j * g + t_ax]), axis=t_ax),
                       name="absum")
    jj = te.reduce_axis((0, SG), name="jj")
    amax = te.compute((m, G), lambda i, gi: te.max(absum[i, gi * SG + jj] * half, axis=jj),
                      name="amax")
    zero = tvm.tirx.const(0.0, "float32")
    scale = te.compute((m, G), lambda i, gi: tvm.tirx.Select(
        amax[i, gi] > zero, amax[i, gi] * tvm.tirx.const(1.0 / 127, "float32"),
        tvm.tirx.const(1.0, "float32")), name="lut_scale")
    inv = te.compute((m, G), lambda i, gi: tvm.tirx.Select(
        amax[i, gi] > zero, tvm.tirx.const(127.0, "float32") / amax[i, gi], zero), name="inv")

    def entry(i, j, c):
        total = None
        for t in range(g):  # (bit_t(c) - 1/2) x[g*j + t], as +-x times 1/2 (exact)
            sign = (((c >> t) & 1) * 2 - 1).astype("float32")
            term = sign * x[i, j * g + t]
            total = term if total is None else total + term
        return total * half

    # (entry c reads bits 0 .. g-1 of c only: the copies of lut_table_bytes come out equal)
    if ks.single_quads:
        # a row per quad of table groups, their four tables one after another: the odd
        # plane's one vpermb reads the row, the pairs broadcast their group's 16 bytes
        lut = te.compute((m, J // LUT_QUAD, lut_quad_row_bytes(ks)), lambda i, q, c:
                         tvm.tirx.nearbyint(entry(i, q * LUT_QUAD + c // LUT_TABLE_BYTES, c)
                                            * inv[i, (q * LUT_QUAD + c // LUT_TABLE_BYTES)
                                                  // SG]).astype("int8"), name="lut")
    else:
        lut = te.compute((m, J, lut_table_bytes(ks)), lambda i, j, c: tvm.tirx.nearbyint(
            entry(i, j, c) * inv[i, j // SG]).astype("int8"), name="lut")
    # x's group sums in up to 16 interleaved partial sums (vector lanes; the sum's order is
    # not the numpy model's either: xsum only needs float32 accuracy)
    L = math.gcd(B, 16)
    kk = te.reduce_axis((0, B // L), name="kk")
    xpart = te.compute((m, G, L), lambda i, gi, ln: te.sum(x[i, gi * B + kk * L + ln], axis=kk),
                       name="xpart")
    ll = te.reduce_axis((0, L), name="ll")
    xsum = te.compute((m, G), lambda i, gi: te.sum(xpart[i, gi, ll], axis=ll), name="xsum")
    return te.create_prim_func([x, lut, scale, xsum])


def schedule_lut_tables(ks: KernelShape):
    import tvm

    sch = tvm.s_tir.Schedule(_lut_tables_func(ks))
    # inv (127 / amax) stays a buffer: one division per weight group, not per table.
    # Each table's 16 entries are one vector: the signs a constant pattern of the lanes, each
    # x a broadcast.
    sch.vectorize(sch.get_loops(sch.get_sblock("lut"))[-1])
    xpart = sch.get_sblock("xpart")
    i, gi, ln, kk = sch.get_loops(xpart)
    sch.reorder(kk, ln)
    sch.vectorize(ln)
    return sch
