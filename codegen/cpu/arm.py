"""The Arm (aarch64) instructions of the int8 and lut qmatmul kernels: ``sdot`` and ``tbl``.

The kernels themselves are ``kernels.py``'s (the same TensorIR computations, schedules and
weight layouts as on x86); this module supplies what differs on Arm, and ``kernels.py``
picks it by the kernel's lanes (``layout.ARM_SDOT_LANES`` for int8, ``layout.NEON_LUT_BYTES``
for lut: no x86 kernel has those). The code is cross-compiled by TVM's LLVM for aarch64 and
checked for correctness under qemu-user (tests/test_cpu_arm.py); no speed is claimed: no Arm
hardware has measured it.

**int8** (``cpu-arm-dotprod``: ARMv8.2 dot product). ``sdot v.4s, b.16b, a.16b`` adds, in
each of 4 int32 lanes, the 4 products of the lane's bytes of b and a, signed x signed, into
exact int32 sums. The ``cpu_vnni`` layout with 16-column tiles gives it 4 columns x 4 rows of
codes per 16 bytes; the row's 4 activation bytes (int8 in [-127, 127]) are broadcast to every
lane. x86's ``vpdpbusd`` multiplies *unsigned* codes by signed activations; sdot has no such
mixed form (``usdot`` is ARMv8.6 i8mm, which Neoverse N1 lacks), so:

- codes of 1- to 4-bit containers are at most 15: their bytes read as int8 are the same
  numbers, and one sdot is the exact sum (``qc_arm_sdot_4x4``);
- 8-bit containers hold codes up to 255, which int8 cannot. Flipping the top bit turns a
  code u into the int8 ``u - 128`` (``u ^ 0x80`` read as signed), and
  ``sum_b u_b a_b = sum_b (u_b - 128) a_b + 128 sum_b a_b``; the correction
  ``128 sum_b a_b = -sdot(-128, a)`` is one more sdot on a constant (the same for every
  column vector of a row and step, so LLVM computes it once per step). Both sums are exact
  int32 (|u - 128| <= 128, |a| <= 127: 4 x 16256 per lane and step), so the intrinsic
  (``qc_arm_sdot_4x4_offset``) has exactly the description of the others:
  ``C[j] += sum_b u8 B[j, b] * s8 A[b]``; the zero points, scales and group sums are
  untouched.

The activation prologue (``qmm_quantize``: symmetric int8 per row and group) and the output
(``x_scale * s * (P - xsum * zc)`` per group) are ``kernels.py``'s, vectorized for 128-bit
registers.

**lut** (both Arm targets: ``tbl`` is base NEON). ``tbl v.16b, {t.16b}, i.16b`` looks up 16
bytes of a 16-entry table, like ``pshufb`` on one 128-bit lane (indices are nibbles: never
out of range). Each table-index vector holds two planes' indices per column in adjacent
bytes ([plane 2p, plane 2p+1], ``layout.pack_lut``); x86 adds each pair as ``1*L + 2*L'``
with ``vpmaddubsw``. NEON has no such instruction, so the pair sum is
``saddlp(looked) + (looked as int16 >> 8)``: the pairwise widening add gives ``L + L'`` and
the arithmetic shift of the little-endian int16 gives ``L'`` sign-extended (LLVM folds the
adds into ``sadalp`` / ``ssra``): exact, and the int16 bound of ``kernels.py`` holds (|L +
2L'| <= 381 per step). An odd last plane is looked up with an 8-byte index on the whole
16-byte table and widened (``sxtl``).
"""
from __future__ import annotations

from qcompiler.codegen.cpu import layout

SDOT_INTRIN = "qc_arm_sdot_4x4"
SDOT_OFFSET_INTRIN = "qc_arm_sdot_4x4_offset"
_SDOT = "llvm.aarch64.neon.sdot"
_TBL1 = "llvm.aarch64.neon.tbl1"
_SADDLP = "llvm.aarch64.neon.saddlp"

_sdot_registered = False


def numerics_reason(cpu: dict, numerics_mode: str, target_name: str):
    """Why ``numerics_mode`` has no kernel for a non-x86 target (None if it has one):
    aarch64 has the lut path everywhere and the int8 path where the target has the
    dot-product extension (``+dotprod``: cpu-arm-dotprod)."""
    arch = cpu.get("arch", "x86_64")
    if numerics_mode == "exact" or arch == "x86_64":
        return None
    if arch != "aarch64" or numerics_mode not in ("int8", "lut"):
        return (f"numerics={numerics_mode} has no {arch} kernel (target {target_name}): use "
                "numerics=exact")
    if numerics_mode == "int8" and "+dotprod" not in cpu.get("mattr", []):
        return (f"numerics=int8 on aarch64 needs the dot-product extension (sdot); target "
                f"{target_name} (-mcpu={cpu['mcpu']}) has none: use cpu-arm-dotprod, or "
                "numerics=exact / lut")
    return None


def sdot_intrin(container_bits: int, desc) -> str:
    """The int8 tensor intrinsic for codes of ``container_bits`` containers (registered on
    first use with ``desc``, ``kernels.dot_product_desc(4, "int8", "uint8", "local")``)."""
    register_sdot_intrins(desc)
    return SDOT_INTRIN if container_bits <= 4 else SDOT_OFFSET_INTRIN


def register_sdot_intrins(desc) -> None:
    """Register ``qc_arm_sdot_4x4`` (codes below 128) and ``qc_arm_sdot_4x4_offset`` (8-bit
    containers): C[4] += sum_b u8 B[j, b] * s8 A[b], 4 columns x 4 rows (see the module
    docstring for the offset)."""
    global _sdot_registered
    if _sdot_registered:
        return
    from tvm.script import tirx as T

    from qcompiler.codegen.cpu.intrin_registry import register_intrin_once

    L = layout.ARM_SDOT_LANES

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((L, 4), "uint8", offset_factor=1, scope="local"),
             C: T.Buffer((L,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], B[0:L, 0:4], A[0:4])
            T.writes(C[0:L])
            # (one expression: a named intermediate becomes a "local" buffer, which TVM
            # allocates through TVMBackendAllocWorkspace per parallel iteration; codes <= 15
            # are the same numbers as int8)
            C[T.ramp(T.int32(0), 1, L)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_SDOT), C.vload([0], dtype="int32x4"),
                T.reinterpret(B.vload([0, 0], dtype="uint8x16"), dtype="int8x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"),
                                          L), dtype="int8x16"),
                dtype="int32x4")

    @T.prim_func(s_tir=True)
    def impl_offset(A: T.Buffer((4,), "int8", offset_factor=1),
                    B: T.Buffer((L, 4), "uint8", offset_factor=1, scope="local"),
                    C: T.Buffer((L,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], B[0:L, 0:4], A[0:4])
            T.writes(C[0:L])
            # u ^ 0x80 read as int8 is u - 128; adding 128 * sum(a) = -sdot(-128, a) restores
            # sum u * a exactly (one expression, as above; LLVM shares the repeated a)
            C[T.ramp(T.int32(0), 1, L)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_SDOT), C.vload([0], dtype="int32x4"),
                T.reinterpret(B.vload([0, 0], dtype="uint8x16") ^ T.broadcast(T.uint8(128), 16),
                              dtype="int8x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"),
                                          L), dtype="int8x16"),
                dtype="int32x4") - T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(_SDOT), T.broadcast(T.int32(0), 4),
                T.broadcast(T.int8(-128), 16),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"),
                                          L), dtype="int8x16"),
                dtype="int32x4")

    for name, body in ((SDOT_INTRIN, impl), (SDOT_OFFSET_INTRIN, impl_offset)):
        register_intrin_once(name, desc, body)
    _sdot_registered = True


def neon_lut_steps(vector_bytes: int, half: int):
    """The NEON lookups of ``kernels.lut_source`` (TVMScript expression texts): ``(pair(table,
    index), single(table, index), single_table_lanes)``: the int16x``half`` increment of a
    pair of planes (``index``: ``vector_bytes`` uint8 nibbles), that of an odd last plane
    (``index``: ``half`` uint8 nibbles), and the lanes of the table the latter reads (the
    whole 16-byte table)."""
    VB, H = vector_bytes, half

    def lookup(table, index, lanes):
        return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{_TBL1}'), {table}, "
                f"T.reinterpret({index}, dtype='int8x{lanes}'), dtype='int8x{lanes}')")

    def pair(table, index):
        looked = lookup(table, index, VB)
        # L + L' (pairwise widening add) + L' (the int16's high byte, sign-extended)
        return (f"(T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id('{_SADDLP}'), {looked}, "
                f"dtype='int16x{H}') + (T.reinterpret({looked}, dtype='int16x{H}') >> "
                f"T.broadcast(T.int16(8), {H})))")

    def single(table, index):
        return f"T.Cast('int16x{H}', {lookup(table, index, H)})"

    return pair, single, VB
