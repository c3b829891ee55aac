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
  ``qc_vnni_u8s8_16x4`` defined here; each group's term is multiplied by its x_scale. On
  targets without VNNI (AVX2: Haswell, Zen 3) the same sum comes 8 columns x 4 rows at a time
  from ``vpmaddubsw`` + ``vpmaddwd`` (``qc_avx2_u8s8_8x4``; 8-bit containers by nibbles,
  ``qc_avx2_u8s8_8x4_nibbles``), exact as well: see ``register_avx2_intrins``.

Rows are blocked: the activations arrive as ``[m_outer, m_block, k_pad]`` (int8) or
``[m_outer, k_pad, m_block]`` (exact; the runner transposes each row block) with M padded to
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

from qcompiler.codegen.cpu import layout

NUMERICS = ("exact", "int8")
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
    lanes: int  # float32 lanes of one vector register (16 for AVX-512, 8 for AVX2)

    @property
    def tiles(self) -> int:
        return self.n_pad // self.n_tile

    @property
    def per_byte(self) -> int:
        return 8 // self.container_bits


_registered = False
_avx2_registered = False
_avx2_steps_registered: set = set()


def register_vnni_intrin() -> None:
    """Register ``qc_vnni_u8s8_16x4``: C[16] += sum_b u8 B[j, b] * s8 A[b] (vpdpbusd).

    TVM's own ``dot_16x4_vnni`` passes ``<16 x i32>`` operands, which LLVM 22 rejects; this
    one passes the ``<64 x i8>`` operands LLVM 22's ``llvm.x86.avx512.vpdpbusd.512`` takes.
    The weights are the unsigned operand (codes 0..255), the activations the signed one.
    """
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((16, 4), "uint8", offset_factor=1, scope="local"),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], B[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(B[vi, vk], "int32") * T.cast(A[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((16, 4), "uint8", offset_factor=1, scope="local"),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], B[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            a_i8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64")
            b_i8x64 = T.reinterpret(B.vload([0, 0], dtype="uint8x64"), dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), b_i8x64, a_i8x64, dtype="int32x16")

    try:
        TensorIntrin.register(VNNI_INTRIN, desc, impl)
    except Exception as e:  # registered already by another import of this module
        if "already" not in str(e).lower():
            raise
    _registered = True


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
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((8, 4), "uint8", offset_factor=1, scope="local"),
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], B[0:8, 0:4], A[0:4])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(B[vi, vk], "int32") * T.cast(A[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((8, 4), "uint8", offset_factor=1, scope="local"),
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], B[0:8, 0:4], A[0:4])
            T.writes(C[0:8])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            a_i8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="int8x32")
            b_i8x32 = T.reinterpret(B.vload([0, 0], dtype="uint8x32"), dtype="int8x32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                b_i8x32, a_i8x32, dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def impl_nibbles(A: T.Buffer((4,), "int8", offset_factor=1),
                     B: T.Buffer((8, 4), "uint8", offset_factor=1, scope="local"),
                     C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], B[0:8, 0:4], A[0:4])
            T.writes(C[0:8])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            a_i8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="int8x32")
            b = B.vload([0, 0], dtype="uint8x32")
            low = T.reinterpret(b & T.broadcast(T.uint8(15), 32), dtype="int8x32")
            high = T.reinterpret(b >> T.broadcast(T.uint8(4), 32), dtype="int8x32")
            low_pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                low, a_i8x32, dtype="int16x16")
            high_pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                high, a_i8x32, dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = (
                C.vload([0], dtype="int32x8")
                + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                          low_pairs, T.broadcast(T.int16(1), 16),
                                          dtype="int32x8")
                + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                          high_pairs, T.broadcast(T.int16(16), 16),
                                          dtype="int32x8"))

    for name, body in ((AVX2_INTRIN, impl), (AVX2_NIBBLES_INTRIN, impl_nibbles)):
        try:
            TensorIntrin.register(name, desc, body)
        except Exception as e:  # registered already by another import of this module
            if "already" not in str(e).lower():
                raise
    _avx2_registered = True


# Rows-of-4 steps whose vpmaddubsw sums one int16 accumulator before vpmaddwd widens it: each
# step adds at most 2 x 15 x 127 = 3810 (codes of 4-bit containers), 8 steps 30480 < 32767.
AVX2_INT16_STEPS = 8


def int16_steps(ks: KernelShape) -> int:
    """Steps of 4 rows summed in int16 by the AVX2 int8 dot (1: every step widened): up to
    ``AVX2_INT16_STEPS`` for codes below 16, a divisor of the group's steps."""
    if ks.lanes == layout.VNNI_LANES or ks.container_bits > 4:
        return 1
    return math.gcd(ks.block // 4, AVX2_INT16_STEPS)


def register_avx2_steps_intrin(steps: int) -> str:
    """Register ``qc_avx2_u8s8_8x4x<steps>``: C[8] += sum over ``steps`` steps of 4 rows,
    the steps' ``vpmaddubsw`` pairs summed in int16 (no overflow for codes below 16: see
    ``AVX2_INT16_STEPS``), then one ``vpmaddwd`` with ones: half the widening work. The steps'
    codes lie ``stride`` bytes apart (rows of 4 of the unpacked tile)."""
    from tvm.s_tir import TensorIntrin
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
            for s in T.unroll(S):
                a_i8x32 = T.reinterpret(T.broadcast(T.reinterpret(
                    A.vload([s * 4], "int8x4"), dtype="int32"), 8), dtype="int8x32")
                pairs[0] = pairs[0] + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                    T.reinterpret(B.vload([s, 0, 0], dtype="uint8x32"), dtype="int8x32"),
                    a_i8x32, dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs[0], T.broadcast(T.int16(1), 16), dtype="int32x8")

    try:
        TensorIntrin.register(name, desc, impl)
    except Exception as e:  # registered already by another import of this module
        if "already" not in str(e).lower():
            raise
    _avx2_steps_registered.add(name)
    return name


def int8_intrin(ks: KernelShape) -> str:
    """The tensor intrinsic of an int8 kernel: vpdpbusd with 16 int32 lanes (AVX-512 VNNI),
    else the AVX2 pair with 8 (codes below 128 in one step, 8-bit containers by nibbles)."""
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


def _exact_dequant_func(ks: KernelShape, m_block: int):
    """The exact path without factoring the scale out: for many rows and small groups.

    Each chunk of rows of the tile is dequantized once into float32 (``(f(u) - z') * s'`` =
    ``(u - zc) * s``) and multiplied as a plain fp32 GEMM, so no per-group work is repeated for
    every row block. Same arguments as ``_exact_func`` (``xsum`` is not read).
    """
    import tvm
    from tvm import te

    T, K, G, B, nt = ks.tiles, ks.k_pad, ks.groups, ks.block, ks.n_tile
    cb = ks.container_bits
    r = 32 // cb
    C = dequant_chunk(ks)
    mo = te.var("m_outer", "int64")
    x = te.placeholder((mo, K, m_block), "float32", name="x")
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
        lambda io, ii, t, c, j: te.sum(x[io, c * C + kk, ii] * u[t, c * C + kk, j], axis=kk),
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
    s = te.placeholder((T, G, nt), "float32", name="s")
    zc = te.placeholder((T, G, nt), "uint8", name="zc")
    mask = tvm.tirx.const((1 << cb) - 1, "uint8")
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
            xscale[io, ii, g] * s[n // nt, g, n % nt]
            * (partial[io, ii, n // nt, g, n % nt].astype("float32")
               - xsum[io, ii, g] * zc[n // nt, g, n % nt].astype("float32")), axis=g),
        name="y")
    return te.create_prim_func([xq, xsum, xscale, w, s, zc, y])


QUANTIZE_FUNC = "qmm_quantize"


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


def schedule_quantize(ks: KernelShape):
    import tvm

    sch = tvm.s_tir.Schedule(_quantize_func(ks))
    sch.compute_inline(sch.get_sblock("inv"))
    xq = sch.get_sblock("xq")
    i, k = sch.get_loops(xq)
    g, kk = sch.split(k, [None, ks.block])
    k_hi, k_lo = sch.split(kk, [None, ks.lanes])
    sch.vectorize(k_lo)
    return sch


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
        acc = sch.cache_write(y, 0, "local")
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
    sch.set_scope(part, 0, "local")
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
    if ks.numerics == "int8":
        return schedule_int8(ks, variant)
    return schedule_exact(ks, variant)


def function_name(index: int) -> str:
    return f"qmm_v{index}"


def build_module(ks: KernelShape, variants: list[dict]):
    """One IRModule with a scheduled PrimFunc per variant (``qmm_v0``, ``qmm_v1`` ...) and,
    for the int8 path, the activation quantization ``qmm_quantize``."""
    import tvm

    funcs = {}
    for i, v in enumerate(variants):
        f = schedule(ks, v).mod["main"]
        funcs[function_name(i)] = f.with_attr("global_symbol", function_name(i))
    if ks.numerics == "int8":
        f = schedule_quantize(ks).mod["main"]
        funcs[QUANTIZE_FUNC] = f.with_attr("global_symbol", QUANTIZE_FUNC)
    return tvm.IRModule(funcs)
