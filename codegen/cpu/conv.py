"""TensorIR of the CPU ``qconv`` kernel (issue #15): int8 convolution, i32 sums, fused epilogue.

The kernel takes the node's operands as they are (x codes NCHW, w codes [M, C/g, KH, KW],
scales, zero points, bias, residual) and writes the NCHW result; with ``channels_last`` (set
by conv-channels-last where ``qconv_takes_channels_last``) x, the residual and the result are
NHWC, and only the channel lanes of the vnni and madd variants and the depthwise ``dwlanes``
ones take it. Its stages:

- ``vnni`` (AVX-512 VNNI targets, C/g >= 2 and M/g >= 8): x is repacked per call into
  unsigned bytes ``xq[n, g, h + pads, w + pads, c4]`` (NHWC per group, channels padded to a
  multiple of 4, the border holding the zero point); w is packed at compile time by
  ``cpu-conv-layout`` (else per call) into signed bytes ``wq[g, m / 16, kh, kw, c / 4, 16, 4]``
  (``runtime.reference.pack_conv_weights``). ``sum xq * wq`` is tensorized with ``vpdpbusd``
  (4 activations broadcast x 16 output channels x 4 input channels per instruction), the
  ``ow_block`` x 16 sums held in registers over the whole window; the loop order keeps either
  a row of the image or a block of weights in cache (whichever is larger stays outer). u8 x
  and i8 w are vpdpbusd's operands as they are (i8 x is shifted by +128, u8 w by -128); the
  exact sum of ``(x - xzp)(w - wzp)`` is ``S - zw'[m] * Xsum - zx' * Wsum[m] + K zx' zw'[m]``
  with the shifted zero points zx', zw', Wsum the shifted weights' sums and Xsum the window
  sums of xq, computed only where some zw' is not a constant 0 (no overflow: xq <= 255,
  |wq| <= 128, 4 products per lane step). Wsum comes from vpdpbusd too (the packed weights
  times a vector of ones). Where the image outweighs the weights and the channels per group
  are a multiple of 16, each output row's sums are computed inside the epilogue's row loop.
  Pixel lanes (stride-1 layers with few input codes, every 1 x 1 at 14+ columns): 16 output
  pixels x 4 input channels of xq per vpdpbusd against one channel's 4 weights, a block of
  8 channels in registers (a stack array, ``_schedule_px_fused``); unpadded one-group 1 x 1
  layers whose width is not a multiple of 16 take the image as one row of pixels
  (``_flat_pixels``).
- ``taps`` (AVX-512 VNNI targets, depthwise, x's zero point and the weights constant, the
  weights minus their zero points in int8): per channel plane, the padded image as unsigned
  bytes; each vpdpbusd sums 4 taps of a window row (a block of them: 5 x 5 and 7 x 7
  windows take 2 a row) for 16 output columns, the columns' taps made from one 64-byte load of the row by a byte
  shuffle (vpermb), the weights (w - wzp) broadcast; ``sum - zx' * Wsum[m]`` is the exact
  sum. Each output row's sums are computed right before its epilogue (``_taps_sum``); a
  stride-1 plane narrower than 16 is one row of its padded pitch instead
  (``_taps_pitched``: a 7 x 7 plane in 4 vectors).
  Measured 1 thread Zen 4 against ``direct``: 32 channels at 112 x 112 0.170 -> 0.076 ms,
  96 at 112 -> 56 (stride 2) 0.259 -> 0.090 ms, 960 at 7 x 7 0.061 -> 0.053 ms.
- ``madd`` (x86 targets without VNNI: AVX2, or AVX-512 without VNNI; 2+ input and 4+
  output channels per group): the vnni kernel's channel lanes with vpmaddwd on int16 pairs of centred codes
  (x - xzp, w - wzp: no int16 saturation), 8 output channels x 2 input channels per
  instruction; pixel lanes (8 pixels x 2 channels, the epilogue fused into the sums) at 28+
  columns; the weights packed as int16 at compile time by ``cpu-conv-layout``
  (``_madd_sum``). ResNet-18 on AVX2 code 98.6 -> 25.5 ms against ``direct``.
- ``dwlanes`` (channels-last depthwise layers on AVX-512 VNNI targets, x's zero point a
  constant): where the dilation is 1, the centred weights fit int8 and the channels are a
  multiple of 16, each vpdpbusd sums 4 taps of a window row for 16 channels, the 4 taps'
  channel vectors interleaved by one byte shuffle (``_dw_vnni_sum``); else 16 channels a
  vector of int32 products of the codes and the centred weights (``w - wzp`` made per call
  as [kh, kw, m]) summed in registers for a few output pixels, minus ``xzp * Wsum[m]``
  (``_dw_lanes_sum``); x padded by its zero point. ``dwlanes_avx2`` (x86 targets without
  VNNI): the int32 products in 8-channel vectors.
- ``direct`` (everything else: other depthwise layers, thin groups, Arm): the i32 sum of
  ``(x - xzp) * (w - wzp)`` one output channel plane at a time, the window loops outside
  the output columns (16-lane vectors; the padded image's columns split by stride phase, so
  that strided taps are vector loads: a plain padded copy whose border is filled apart,
  then deinterleaved by phase), the plane's epilogue right after it. AVX2's
  vpmaddubsw would saturate int16 on 8-bit codes (255 * 127 * 2 > 32767), so it is not used
  for qconv (onnxruntime needs reduce_range there for the same reason).

The epilogue is the reference's (``runtime.reference._qconv``) operation for operation:
f32(acc) * f32(f32(x_scale * w_scale[m]) / y_scale), round half to even (``nearbyint``),
plus y_zero_point, clamped to the codes of act_min / act_max. Dyadic requantization is the
FPGA's: the CPU kernel refuses it (CPUBackendError; the node runs on the host).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.ir.core import Node, constant_value

CONV_VNNI_INTRIN = "qc_conv_vnni_u8s8_16x4"
# the same with its sums in a plain (stack) buffer: the channels-last schedule whose epilogue
# reads the accumulators themselves (PX_ACC_SCOPE's reason)
CONV_VNNI_STACK_INTRIN = "qc_conv_vnni_u8s8_16x4_stack"
OC_BLOCK = 16   # output channels per vpdpbusd (int32 lanes of a zmm register)
IC_BLOCK = 4    # input channels summed per lane by vpdpbusd
TAP_BLOCK = 4   # a window row's taps summed per lane by vpdpbusd (the taps variant)
_intrins_registered: set = set()   # the conv intrinsics registered with TVM


def register_conv_vnni_intrin(name: str = CONV_VNNI_INTRIN) -> None:
    """C[16] += sum_k s8 B[j, k] * u8 A[k] (vpdpbusd): the 4 activations (unsigned, the
    codes as they are for u8 x) broadcast to 16 lanes, the packed weights (signed) from
    global memory, the sums in registers (kernels.py's qmatmul intrinsic has the signs the
    other way round: its weights are the unsigned operand). ``name``: CONV_VNNI_INTRIN
    (sums in a ``local`` buffer) or CONV_VNNI_STACK_INTRIN (``global``: a stack array)."""
    if name in _intrins_registered:
        return
    from tvm.script import tirx as T

    from qcompiler.codegen.cpu.intrin_registry import register_intrin_once
    from qcompiler.codegen.cpu.kernels import dot_product_desc

    c_scope = "global" if name == CONV_VNNI_STACK_INTRIN else "local"
    desc = dot_product_desc(16, "uint8", "int8", c_scope=c_scope)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], B[0:16, 0:4], A[0:4])
            T.writes(C[0:16])
            # (one expression: see kernels.register_vpdpbusd_intrin)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"),
                                          16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    register_intrin_once(name, desc, impl)
    _intrins_registered.add(name)


VNNI_W_LAYOUT = "g_m16_kh_kw_c4_16_4"   # cpu-conv-layout's int8 weights, vpdpbusd's
MADD_W_LAYOUT = "g_m8_kh_kw_c2_8_2"     # its int16 centred weights, vpmaddwd's (AVX2)
MADD_OC_BLOCK = 8   # output channels per vpmaddwd (int32 lanes of a ymm register)
MADD_IC_BLOCK = 2   # input channels summed per lane by vpmaddwd
CONV_MADD_INTRIN = "qc_conv_madd_s16_8x2"


def register_conv_madd_intrin() -> None:
    """C[8] += sum_k s16 A[k] * s16 B[j, k] (vpmaddwd, then an add): 2 centred activations
    (x - xzp) broadcast x 8 output channels x 2 input channels of centred weights
    (w - wzp). Products of 9-bit operands and their pair sums fit in int32: no saturation,
    where vpmaddubsw on the 8-bit codes would saturate int16."""
    from tvm.script import tirx as T

    from qcompiler.codegen.cpu.intrin_registry import register_intrin_once
    from qcompiler.codegen.cpu.kernels import dot_product_desc

    if CONV_MADD_INTRIN in _intrins_registered:
        return

    desc = dot_product_desc(MADD_OC_BLOCK, "int16", "int16", depth=MADD_IC_BLOCK)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1),
             B: T.Buffer((8, 2), "int16", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], B[0:8, 0:2], A[0:2])
            T.writes(C[0:8])
            # (one expression, see kernels.register_vpdpbusd_intrin)
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                B.vload([0, 0], dtype="int16x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"),
                                          8), dtype="int16x16"),
                dtype="int32x8")

    register_intrin_once(CONV_MADD_INTRIN, desc, impl)
    _intrins_registered.add(CONV_MADD_INTRIN)


CONV_VNNI_PX_INTRIN = "qc_conv_vnni_px_u8s8_16x4"
# The scope of the pixel-lane intrinsics' sums C (and of the schedules' accumulator caches):
# a "global" cache of mb x 16 sums is a stack array that LLVM keeps in registers, where a
# "local" one is a TVMBackendAllocWorkspace per iteration of the parallel row loop, heap
# memory that every block zeroed, stored and read back (16 -> 96 at 112 x 112, batch 8: 4.0
# -> 2.8 ms). The madd intrinsic, shared with the channel lanes, keeps "local".
PX_ACC_SCOPE = {CONV_VNNI_PX_INTRIN: "global", CONV_MADD_INTRIN: "local"}


def register_conv_vnni_px_intrin() -> None:
    """C[16] += sum_k u8 B[j, k] * s8 A[k] (vpdpbusd) with B from global memory: 16 output
    pixels x 4 input channels of activations against one output channel's 4 weights,
    broadcast (the pixel-lane schedule)."""
    from qcompiler.codegen.cpu.kernels import register_vpdpbusd_intrin

    register_vpdpbusd_intrin(CONV_VNNI_PX_INTRIN, "global",
                             c_scope=PX_ACC_SCOPE[CONV_VNNI_PX_INTRIN])


def register_conv_vnni_taps_intrin(stride: int, dilation: int) -> str:
    """``C[j] += sum_t u8 B[j * stride + t * dilation] * s8 A[t]`` for 16 output columns j
    and 4 taps t (vpdpbusd): B is a row of the padded image, from which one 64-byte load and
    a byte shuffle make each column's 4 taps (LLVM picks the shuffle: vpermb with VBMI);
    A, one channel's 4 weights of a window row, broadcast. The sums C live in a plain
    buffer (the row's sums, on the stack: a "local" one would be a workspace allocation
    per plane). Returns the intrinsic's name."""
    from tvm.script import tirx as T

    from qcompiler.codegen.cpu.intrin_registry import register_intrin_once

    name = f"qc_conv_vnni_taps_s{stride}_d{dilation}"
    if name in _intrins_registered:
        return name
    span = 15 * stride + 3 * dilation + 1   # the bytes the 16 x 4 taps read
    if 15 * stride + 3 * dilation >= 64:
        raise CPUBackendError(f"taps kernel: stride {stride} and dilation {dilation} reach "
                              "past one 64-byte load")
    index = [j * stride + t * dilation for j in range(16) for t in range(TAP_BLOCK)]

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((span,), "uint8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], B[0:span], A[0:4])
            T.writes(C[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(B[vi * stride + vk * dilation], "int32") * T.cast(
                        A[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "int8", offset_factor=1),
             B: T.Buffer((span,), "uint8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], B[0:span], A[0:4])
            T.writes(C[0:16])
            # (one expression, see kernels.register_vpdpbusd_intrin; the 64-byte load
            # reads past span: the image rows are padded for it, _taps_sum)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.Shuffle([B.vload([0], dtype="uint8x64")], index),
                              dtype="int8x64"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"),
                                          16), dtype="int8x64"),
                dtype="int32x16")

    register_intrin_once(name, desc, impl)
    _intrins_registered.add(name)
    return name



# 1.5 * 2^23 and its float32 bits: x + 1.5 * 2^23 for |x| < 2^22 is a float whose bits
# minus these are x rounded half to even (in the default rounding mode)
ROUNDING_MAGIC = 12582912.0
ROUNDING_MAGIC_BITS = 0x4B400000


def _round_up(v: int, k: int) -> int:
    return -(-v // k) * k


def _static_shape(node: Node, v) -> tuple:
    """The dims of ``v``; all static but the batch (dim 0), which may be a symbol."""
    if not all(isinstance(d, int) for d in v.type.shape[1:]):
        raise CPUBackendError(f"%{node.results[0].name} = qconv: the CPU kernel needs static "
                              f"shapes, not {v.type.shape}")
    return tuple(v.type.shape)


def conv_variant(node: Node, vnni: bool, module=None, avx2: bool = False) -> str:
    """``vnni``, ``taps``, ``madd`` or ``direct`` (see the module docstring). ``vnni``:
    AVX-512 VNNI targets (``vnni``); ``madd``: other x86 targets (``avx2``: they all have
    AVX2). ``taps`` needs the module: it is chosen only where x's zero point and the weights
    are constants, and the weights minus their zero points fit in int8
    (``_centred_weights_fit_int8``)."""
    cfg = node.attrs.get("config") or {}
    if "w_shape" in cfg:  # packed by cpu-conv-layout, for one kernel
        if cfg.get("w_layout") == MADD_W_LAYOUT:
            return "madd"
        return "vnni" if vnni else "direct"
    m, cg, _, kw = node.arg("w").type.shape
    mg = m // node.attrs["group"]
    if cg == 1 and mg == 1 and node.attrs.get("channels_last", 0):
        if vnni:
            return "dwlanes"
        if avx2:
            return "dwlanes_avx2"
    # Channels are padded to 4 (inputs) and 16 (outputs): worth it down to 2 inputs and 8
    # outputs per group (a stem conv's 3 channels); depthwise layers take a tap kernel.
    if vnni and cg >= 2 and mg >= 8:
        return "vnni"
    if avx2 and not vnni and cg >= 2 and mg >= 4:
        return "madd"
    sw, dw = node.attrs["strides"][1], node.attrs["dilations"][1]
    if (vnni and cg == 1 and mg == 1 and isinstance(kw, int)
            and 15 * sw + (TAP_BLOCK - 1) * dw < 64   # (one 64-byte load per 16 columns)
            and const_x_zero_point(node, module) is not None
            and _centred_weights_fit_int8(node, module)):
        return "taps"
    return "direct"


def qconv_takes_channels_last(node: Node, vnni: bool, module=None,
                              avx2: bool = False) -> bool:
    """Whether the CPU kernel takes this 2-D qconv channels-last (conv-channels-last): the
    channel lanes of the vnni variant (VNNI targets) or the madd one (other x86 targets),
    or a depthwise layer's lanes; static shapes but the batch, float requantization."""
    x, y = node.operands[0].type, node.results[0].type
    return (x.rank == 4 and all(isinstance(d, int) for d in x.shape[1:] + y.shape[1:])
            and not (node.attrs.get("requant", "float") == "dyadic"
                     and node.attrs["out"] == "quant")
            and (conv_variant(node, vnni, module, avx2=avx2) in ("vnni", "madd")
                 or _depthwise_lanes(node, vnni or avx2, module)))


def _depthwise_lanes(node: Node, x86: bool, module) -> bool:
    """Whether a depthwise layer would take a channels-last lanes kernel: an x86 target
    (``dwlanes``: 16 channels a vector on VNNI ones, ``dwlanes_avx2``: 8) and a constant x
    zero point (its padding)."""
    m, cg = node.arg("w").type.shape[:2]
    return (x86 and cg == 1 and m == node.attrs["group"]
            and const_x_zero_point(node, module) is not None)


def _flat_pixels(node: Node, ow: int, oh: int) -> bool:
    """Whether the vnni kernel takes a 1 x 1 layer's output image as one row of pixels: no
    padding, one group, an output width of 7+ that is not a multiple of 16 and 4+ rows (7 x
    7, 14 x 14, 28 x 28, 56 x 56; a strided layer on its subsampled image). Its pixel lanes
    then waste at most 15 pixels of the image instead of up to 15 of every row, and every
    block of 16 pixels x 8 channels is requantized from its accumulators
    (``_schedule_px_fused``), where a 14-wide row left a scalar tail and a whole image of
    int32 sums in memory, and 7 x 7 images took channel lanes."""
    kh, kw = node.arg("w").type.shape[2:] if "w_shape" not in (node.attrs.get("config") or {}) \
        else node.attrs["config"]["w_shape"][2:]
    return (kh == kw == 1 and node.attrs["group"] == 1 and not any(node.attrs["pads"])
            and isinstance(ow, int) and isinstance(oh, int) and ow % 16 != 0 and oh >= 4
            and ow >= 7)


def _centred_weights_fit_int8(node: Node, module) -> bool:
    """Whether the weights are module constants whose codes minus their zero points (per
    channel) all fit in int8: the taps kernel's signed vpdpbusd operand."""
    if module is None:
        return False
    w = constant_value(module, node.arg("w"))
    if w is None:
        return False
    wzp_v = node.arg("w_zero_point")
    zp = 0 if wzp_v is None else constant_value(module, wzp_v)
    if zp is None:
        return False
    w = np.asarray(w, np.int64)
    zp = np.asarray(zp, np.int64).reshape(-1)
    centred = w - (zp.reshape(-1, *([1] * (w.ndim - 1))) if zp.size > 1 else zp.reshape(()))
    return bool(centred.min() >= -128 and centred.max() <= 127)


def conv_w_shift(node: Node) -> int:
    """What the vnni kernel subtracts from the weight codes: 128 for unsigned codes (so that
    they are vpdpbusd's signed operand), 0 for signed ones."""
    cfg = node.attrs.get("config") or {}
    if "w_shift" in cfg:
        return int(cfg["w_shift"])
    return 128 if node.arg("w").type.dtype.name in ("u8", "u4") else 0


def ow_block(ow: int) -> int:
    """Output columns whose 16-channel sums stay in registers together (a divisor of ow)."""
    for b in (8, 7, 6, 4, 5, 3, 2):
        if ow % b == 0:
            return b
    return 1


# zmm accumulators of the vnni kernel's register tile (of 32: the tile's weight vectors and
# a broadcast activation need the rest)
VNNI_ACCUMULATORS = 24


# The fused channels-last kernel's tile of sums ("global" scope, PX_ACC_SCOPE's reason) is
# a stack array only below 1 KiB (TVM's ``kMaxStackAlloca``); a larger one becomes a
# TVMBackendAllocWorkspace per row, which LLVM cannot keep in registers: 24 sums (1.5 KiB)
# were zeroed in memory, stored and read back by the epilogue for every tile. 15 zmm sums
# (960 bytes) stay on the stack, and LLVM keeps them in registers. Measured (Zen 4, 1 thread,
# benchmarks/ab_cnn_layers.py, 24 against 15 sums, processes alternated, 2026-12-07 13:37,
# ab-cnn-layers-20261207-1337-*-znver4-t1.json): MobileNetV2 QOperator batch 8, 16 -> 96 at
# 112 x 112 2.02 -> 1.78 ms, 24 -> 144 at 56 x 56 0.89 -> 0.69, its conv steps 22.3 -> 20.9.
# Long windows keep the 24 sums: there the tile's memory round trip is a small part of its
# work, and fewer sums cost more operand loads per vpdpbusd (ResNet-18 batch 1: its 3 x 3
# layers of 2304 and 4608 codes 3-7 % slower with 15, those of 576 and 1152 even).
TVM_STACK_LIMIT = 1024  # bytes: TVM's kMaxStackAlloca (a buffer must be below it)
STACK_ACCUMULATORS = (TVM_STACK_LIMIT - 1) // (OC_BLOCK * 4)  # int32 zmm sums: 15
STACK_TILE_MAX_WINDOW = 2048  # codes a window: at and above it, VNNI_ACCUMULATORS sums


def register_tile(ow: int, oc_blocks: int,
                  accumulators: int = VNNI_ACCUMULATORS) -> tuple[int, int]:
    """(output columns, 16-channel blocks) whose sums the vnni kernel keeps in registers:
    divisors of ``ow`` and ``oc_blocks`` with at most ``accumulators`` sums, the fewest
    loads per vpdpbusd (per 4 input channels: a broadcast per column and a weight vector per
    block, for columns x blocks instructions), then the larger tile. One block (the kernel
    before) loaded 1 + 1/columns operands per vpdpbusd, a bound below the VNNI ports'
    rate."""
    best = None
    for cols in (8, 7, 6, 5, 4, 3, 2, 1):
        if ow % cols:
            continue
        for blocks in (4, 3, 2, 1):
            if oc_blocks % blocks or cols * blocks > accumulators:
                continue
            key = ((cols + blocks) / (cols * blocks), -cols * blocks)
            if best is None or key < best[0]:
                best = (key, cols, blocks)
    return best[1], best[2]


def kernel_name(node: Node, variant: str, module=None) -> str:
    """One name per distinct kernel: the operand types, attributes, variant, and what the
    kernel bakes in from the module's constant values (x's zero point, the clamp's codes from
    y_scale / y_zero_point, whether x's window sums are needed, the depthwise lanes'
    vpdpbusd form): two layers of one shape may differ there, and one kernel shared between
    them would compute the second wrong."""
    baked = [variant]
    if variant in ("vnni", "taps", "dwlanes", "dwlanes_avx2"):
        baked.append(("xzp", const_x_zero_point(node, module)))
    if node.attrs["out"] == "quant":
        baked.append(("codes", _bounds(node, module)))
    if variant == "vnni":
        baked.append(("xsum", not _zero_after_shift(node, module, conv_w_shift(node))))
    if variant == "dwlanes":
        m = node.arg("w").type.shape[0]
        baked.append(("cb", _dw_vnni_block(node, module, m, *node.attrs["dilations"])))
    text = repr((baked, [None if v is None else (v.type.shape, str(v.type.dtype))
                         for v in node.operands],
                 sorted((k, repr(v)) for k, v in node.attrs.items() if k != "config"),
                 str(node.results[0].type.dtype)))
    return "qconv_" + hashlib.sha256(text.encode()).hexdigest()[:16]


def const_x_zero_point(node: Node, module):
    """x's zero point as an int where it is a module constant (the vnni kernel then fills
    the repacked image's padding with that constant: a plain fill, and the in-bound copy
    without conditions), else None."""
    if module is None:
        return None
    v = constant_value(module, node.operands[3])
    if v is None or np.asarray(v).size != 1:
        return None
    return int(np.asarray(v).reshape(()))


def _bounds(node: Node, module) -> tuple[int, int]:
    from qcompiler.runtime.reference import qconv_output_bounds

    lo, hi = node.results[0].type.dtype.int_range()
    if not any(k in node.attrs for k in ("act_min", "act_max")):
        return lo, hi
    ys, yzp = (constant_value(module, node.operands[i]) if module is not None else None
               for i in (7, 8))
    if ys is None or yzp is None:
        raise CPUBackendError(f"%{node.results[0].name} = qconv: a clamped output needs "
                              "constant y_scale and y_zero_point")
    return qconv_output_bounds(node, ys, yzp)


def primfunc_for_qconv(node: Node, params, module=None, known=(), vnni=None):
    """(kernel name, scheduled PrimFunc) of a qconv node; (name, None) for a known name."""
    from qcompiler.codegen.cpu.host import target_cpu
    from qcompiler.targets import get_target

    if node.attrs.get("requant", "float") == "dyadic" and node.attrs["out"] == "quant":
        raise CPUBackendError(f"%{node.results[0].name} = qconv: dyadic requantization has "
                              "no CPU kernel (it is the FPGA's); use requant=float")
    if len(node.operands[0].type.shape) != 4:
        raise CPUBackendError(f"%{node.results[0].name} = qconv: the CPU kernel is 2-D only")
    layout = (node.attrs.get("config") or {}).get("w_layout")
    if layout not in (None, VNNI_W_LAYOUT, MADD_W_LAYOUT):
        raise CPUBackendError(f"%{node.results[0].name} = qconv: its weights are packed for "
                              f"another backend ({layout}), not for the CPU kernels")
    if vnni is None:  # 512-bit params: a VNNI target (cpu-x86-avx512, or the host when it has it)
        vnni = target_cpu(get_target("cpu"))["vnni"] and getattr(params, "lanes", 0) == 16
    # Every x86 target has AVX2 (the baseline): the madd kernel where VNNI is missing
    # (cpu-x86-avx2, or a host without it: AVX2-only, or AVX-512 without VNNI)
    avx2 = getattr(params, "arch", "x86_64") == "x86_64" and getattr(params, "lanes", 0) >= 8
    variant = conv_variant(node, vnni, module, avx2=avx2)
    name = kernel_name(node, variant, module)
    if name in known:
        return name, None
    func = build_qconv(node, variant, module)
    return name, func.with_attr("global_symbol", name)


def build_qconv(node: Node, variant: str, module=None):
    """The scheduled PrimFunc of ``node`` in ``variant`` (vnni | direct)."""
    from tvm import te, tirx

    a = node.attrs
    ops = node.operands
    # channels_last (conv-channels-last): x, the residual and the result are NHWC; the sums
    # below index them as NCHW through accessors that swap the dims back
    nhwc = bool(a.get("channels_last", 0))
    if nhwc and variant not in ("vnni", "madd", "dwlanes", "dwlanes_avx2"):
        raise CPUBackendError(f"%{node.results[0].name} = qconv: channels_last has a CPU kernel "
                              f"on x86 targets only (channel lanes, depthwise lanes), not "
                              f"{variant}")
    if variant.startswith("dwlanes") and const_x_zero_point(node, module) is None:
        raise CPUBackendError(f"%{node.results[0].name} = qconv: the depthwise channels-last "
                              "kernel needs a constant x zero point (its padding)")
    if nhwc:
        n, h, w_, c = _static_shape(node, ops[0])
        _, oh, ow, _ = _static_shape(node, node.results[0])
    else:
        n, c, h, w_ = _static_shape(node, ops[0])
        _, _, oh, ow = _static_shape(node, node.results[0])
    cfg = a.get("config") or {}
    m, cg, kh, kw = cfg["w_shape"] if "w_shape" in cfg else _static_shape(node, ops[1])
    group = a["group"]
    mg = m // group
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    pt, pl = a["pads"][0], a["pads"][1]
    i32, f32 = "int32", "float32"
    # The batch symbol: one int32 var shared by x, residual and the result (int32 like every
    # other index here, which tensorize needs: its loop vars and extents must agree).
    batch = n
    if not isinstance(n, int):
        n = tirx.Var(re.sub(r"[^A-Za-z0-9_]", "_", n), "int32")

    def shape_of(v):
        return tuple(n if d == batch else d for d in v.type.shape)
    placeholders = {}
    for i, v in enumerate(ops):
        if v is not None:
            placeholders[i] = te.placeholder(shape_of(v), str(v.type.dtype.np_dtype),
                                             name=f"in{i}")
    x, w_stored = placeholders[0], placeholders[1]
    if nhwc:
        def x(nn, cc, yy, xx, x_nhwc=placeholders[0]):
            return x_nhwc(nn, yy, xx, cc)
    packed = "w_shape" in cfg

    def wt(mm, cc, yy, xx):
        """The logical weight code w[m, c, ky, kx] (as int32 when packed: the vnni layout;
        the madd kernel reads its packed layout itself)."""
        if not packed:
            return w_stored(mm, cc, yy, xx)
        g, mr = mm // mg, mm % mg
        return w_stored(g, mr // OC_BLOCK, yy, xx, cc // IC_BLOCK, mr % OC_BLOCK,
                        cc % IC_BLOCK).astype("int32") + cfg["w_shift"]

    def scalar(i):
        t = placeholders[i]
        return t(*([0] * len(t.shape)))

    def per_channel(i, mm):
        t = placeholders[i]
        if len(t.shape) == 0 or int(np.prod([int(d) for d in t.shape])) == 1:
            return t(*([0] * len(t.shape)))
        return t(mm)

    xzp = scalar(3).astype(i32)

    def wzp(mm):
        return per_channel(5, mm).astype(i32) if 5 in placeholders else tirx.const(0, i32)

    if variant == "madd":
        acc, extra = _madd_sum(node, x, wt, xzp, wzp, (n, c, h, w_, m, cg, kh, kw, oh, ow, group,
                                                       mg, sh, sw, dh, dw, pt, pl),
                               w_stored if packed else None, nhwc)
    elif variant in ("dwlanes", "dwlanes_avx2"):
        acc, extra = _dw_lanes_sum(node, x, wt, xzp, wzp, (n, c, h, w_, m, cg, kh, kw, oh, ow,
                                                           group, mg, sh, sw, dh, dw, pt, pl),
                                   module, vnni=variant == "dwlanes")
    elif variant == "taps":
        acc, extra = _taps_sum(node, x, wt, wzp, (n, c, h, w_, m, cg, kh, kw, oh, ow, group,
                                                  mg, sh, sw, dh, dw, pt, pl), module)
    elif variant == "vnni":
        flat = not nhwc and _flat_pixels(node, ow, oh)
        dims = (n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, pt, pl)
        x_sum = x
        if flat:
            def x_sum(nn, cc, yy, xx, sy=sh, sx=sw):  # pixel xx of the flat output image
                return x(nn, cc, xx // ow * sy, xx % ow * sx)
            dims = (n, c, 1, oh * ow, m, cg, 1, 1, 1, oh * ow, group, mg, 1, 1, 1, 1, 0, 0)
        acc, extra = _vnni_sum(node, x_sum, wt, xzp, wzp, dims, module,
                               w_stored if packed else None, flat, nhwc)
    else:
        acc, extra = _direct_sum(x, wt, xzp, wzp, (n, c, h, w_, m, cg, kh, kw, oh, ow, group,
                                                   mg, sh, sw, dh, dw, pt, pl))

    # Pixel lanes with a width of 28+ that is not a multiple of 16: the epilogue runs over
    # the padded width (``outp``, so that each output row's sums can be computed inside its
    # row loop, whole vectors), the result copies the first ow columns; the residual is
    # read at a clamped column there. (14 x 14 images keep a whole image of sums: 576 -> 96
    # at batch 8 measured 0.60 ms that way, 0.76 ms by rows.)
    padded_out = (variant == "vnni" and extra.get("px") and extra.get("padded_rows")) or (
        (variant == "taps" or (variant == "madd" and extra["px"])) and ow % 16 != 0)
    flat = extra.get("flat", False)
    pitch = extra.get("out_pitch")   # the taps kernel's pitched plane (_taps_pitched)
    owp = _round_up(oh * ow if flat else ow, 16)

    def residual(nn, mm, yy, xx):
        if nhwc:
            return placeholders[9](nn, yy, xx, mm)
        if flat:  # (yy is 0: the pixel, clamped to the image, is xx)
            p = tirx.min(xx, oh * ow - 1)
            return placeholders[9](nn, mm, p // ow, p % ow)
        if pitch:  # (yy is 0; junk lanes read a clamped pixel)
            return placeholders[9](nn, mm, tirx.min(xx // pitch, oh - 1),
                                   tirx.min(xx % pitch, ow - 1))
        return placeholders[9](nn, mm, yy, tirx.min(xx, ow - 1) if padded_out else xx)

    channel_term = extra.get("channel_term")
    if channel_term is not None:
        # Channels-last epilogues take a vector of channels per pixel: the sum's per-channel
        # terms (zero-point corrections, bias) added up once per call into one int32 offset
        # per channel, not recomputed per output vector (the same integers).
        bias = placeholders.get(6)
        offset = te.compute((m,), lambda mm: channel_term(mm) + (bias(mm) if bias is not None
                                                                 else 0), name="offset")

    def total(nn, mm, yy, xx):
        v = acc(nn, mm, yy, xx)
        if channel_term is not None:
            return v + offset(mm)
        if 6 in placeholders:
            v = v + placeholders[6](mm)
        return v

    def out_scale(mm):
        """What the sum is multiplied by, as the reference: f32(x_scale * w_scale[m]), for
        out=quant divided by y_scale."""
        v = scalar(2).astype(f32) * per_channel(4, mm).astype(f32)
        return v / scalar(7).astype(f32) if a["out"] == "quant" else v
    if nhwc:
        # Channels-last epilogues take a vector of channels per pixel: the per-channel scale
        # made once per call (the same f32 values), not a division per output vector.
        out_scale = te.compute((m,), out_scale, name="scale")

    def fenced(v):
        """A product rounded on its own before the sum it feeds, as in the reference: TVM
        lets LLVM fuse a multiply feeding an add into one FMA, which rounds once. Behind
        max(v, -FLT_MAX) the add sees no multiply, and LLVM cannot drop the max (it changes
        -inf and NaN, which a product of finite codes and scales never is). The loop still
        vectorizes, where ``llvm.arithmetic.fence`` (the barrier before) kept it scalar (TVM
        scalarizes the call, LLVM does not vectorize around it): a residual add made a 3x3
        64 -> 64 layer at 56 x 56 take 1.97 ms instead of 0.75 (0.76 with the max)."""
        return tirx.max(v, tirx.const(float(-np.finfo(np.float32).max), f32))

    if a["out"] == "float":
        def out_fn(nn, mm, yy, xx):
            v = total(nn, mm, yy, xx).astype(f32) * out_scale(mm)
            if 9 in placeholders:
                v = fenced(v) + residual(nn, mm, yy, xx).astype(f32)
            if "act_min" in a:
                v = tirx.max(v, tirx.const(float(np.float32(a["act_min"])), f32))
            if "act_max" in a:
                v = tirx.min(v, tirx.const(float(np.float32(a["act_max"])), f32))
            return v
    else:
        out_dtype = str(node.results[0].type.dtype.np_dtype)
        lo, hi = _bounds(node, module)

        def out_fn(nn, mm, yy, xx):
            ys = scalar(7).astype(f32)
            v = total(nn, mm, yy, xx).astype(f32) * out_scale(mm)
            if 9 in placeholders:
                r = residual(nn, mm, yy, xx).astype(i32) - scalar(11).astype(i32)
                v = fenced(v) + fenced(r.astype(f32) * (scalar(10).astype(f32) / ys))
            # Clamped to the codes' range around the zero point in float (integral bounds:
            # clamping and rounding commute, and |v| <= 255 after it), then rounded half to
            # even by adding 1.5 * 2^23, whose float's low bits are then the integer: 2
            # instructions where nearbyint, the conversion, the zero point's add and the
            # integer clamp took 5 (16 -> 96 at 112 x 112, a 16-code window: 0.238 ->
            # 0.199 ms). The clamp also keeps LLVM from fusing the product into that add.
            yzp = scalar(8).astype(i32)
            v = tirx.min(tirx.max(v, (tirx.const(lo, i32) - yzp).astype(f32)),
                         (tirx.const(hi, i32) - yzp).astype(f32))
            q = (tirx.reinterpret("int32", v + tirx.const(ROUNDING_MAGIC, f32))
                 - (tirx.const(ROUNDING_MAGIC_BITS, i32) - yzp))
            return q.astype(out_dtype)
    if nhwc:  # the row's pixels, then their channels (contiguous: the epilogue's vectors)
        out = te.compute((n, oh, ow, m), lambda nn, yy, xx, mm: out_fn(nn, mm, yy, xx),
                         name="out")
    elif flat or pitch:
        step = pitch or ow
        outp = te.compute((n, m, 1, extra["vlen"] if pitch else owp), out_fn, name="outp")
        out = te.compute((n, m, oh, ow),
                         lambda nn, mm, yy, xx: outp(nn, mm, 0, yy * step + xx), name="out")
    elif padded_out:
        outp = te.compute((n, m, oh, owp), out_fn, name="outp")
        out = te.compute((n, m, oh, ow), lambda nn, mm, yy, xx: outp(nn, mm, yy, xx),
                         name="out")
    else:
        out = te.compute((n, m, oh, ow), out_fn, name="out")
    inputs = [placeholders[i] for i in sorted(placeholders)]
    func = te.create_prim_func(inputs + [out])
    return _schedule(func, variant, extra)


def _direct_sum(x, wt, xzp, wzp, dims):
    from tvm import te, tirx

    n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, pt, pl = dims
    i32 = "int32"
    rc = te.reduce_axis((0, cg), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    # Output columns padded to whole vectors (16 int32 lanes; 8 for narrow images, none for
    # 1 x 1 and 2 x 2 ones): the epilogue reads the first ow.
    vec = 16 if ow > 8 else 8 if ow > 4 else 1
    owp = _round_up(ow, vec)
    hp, wp = (oh - 1) * sh + (kh - 1) * dh + 1, (owp - 1) * sw + (kw - 1) * dw + 1
    # The padded image with its columns split by phase (column j * sw + phase at
    # [..., phase, j]): the window's taps read consecutive j for consecutive output columns,
    # whatever the stride (a vector load, not a gather).
    wpp = -(-wp // sw)

    # The padding pattern decompose_padding takes (_schedule): a plain padded copy, then
    # (stride > 1) its columns split by phase, a deinterleave without conditions.
    xpad = te.compute((n, c, hp, wpp * sw), lambda nn, cc, yy, xx: tirx.if_then_else(
        tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w_),
        (x(nn, cc, yy - pt, xx - pl).astype(i32) - xzp).astype("int16"),
        tirx.const(0, "int16")), name="xs" if sw == 1 else "xpad")
    if sw == 1:
        def xs(nn, cc, yy, ph, j):
            return xpad(nn, cc, yy, j)
    else:
        xs = te.compute((n, c, hp, sw, wpp),
                        lambda nn, cc, yy, ph, j: xpad(nn, cc, yy, j * sw + ph), name="xs")
    acc = te.compute((n, m, oh, owp), lambda nn, mm, yy, xx: te.sum(
        xs(nn, (mm // mg) * cg + rc, yy * sh + ry * dh, (rx * dw) % sw, xx + (rx * dw) // sw
           ).astype(i32) * (wt(mm, rc, ry, rx).astype(i32) - wzp(mm)), axis=[rc, ry, rx]),
        name="acc")
    return acc, {"ow": ow, "vec": vec, "depthwise": cg == 1,
                 "strided": sw > 1,
                 # the padded copy's border, filled apart
                 "xs_border": bool(pt or pl or hp > h or wpp * sw > w_)}


def _tile_sums(xq, wq, dims, oc: int, ic: int, px: bool, owp: int, cp: int, mp: int):
    """The int32 sums of the packed operands, for the vnni and madd kernels alike: with
    pixel lanes (``px``: x as [n, g, y, c / ic, x, ic]) ``s(nn, g, yy, xx, mo, mi)`` over the
    padded width ``owp``; with channel lanes (x as [n, g, y, x, c]) over the output
    columns. The weights are [g, m / oc, kh, kw, c / ic, oc, ic] in both."""
    from tvm import te

    n, _, _, _, _, _, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, _, _ = dims
    i32 = "int32"
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rco = te.reduce_axis((0, cp // ic), name="rco")
    rci = te.reduce_axis((0, ic), name="rci")
    if px:
        s2 = te.compute((n, group, mg, oh, owp), lambda nn, g, mr, yy, xx: te.sum(
            xq(nn, g, yy * sh + ry * dh, rco, xx + rx * dw, rci).astype(i32)
            * wq(g, mr // oc, ry, rx, rco, mr % oc, rci).astype(i32),
            axis=[ry, rx, rco, rci]), name="sum")

        def s(nn, g, yy, xx, mo, mi):
            return s2(nn, g, mo * oc + mi, yy, xx)
        return s
    return te.compute((n, group, oh, ow, mp // oc, oc), lambda nn, g, yy, xx, mo, mi:
                      te.sum(wq(g, mo, ry, rx, rco, mi, rci).astype(i32)
                             * xq(nn, g, yy * sh + ry * dh, xx * sw + rx * dw,
                                  rco * ic + rci).astype(i32),
                             axis=[ry, rx, rco, rci]), name="sum")


def _madd_sum(node, x, wt, xzp, wzp, dims, w_packed=None, nhwc=False):
    """Channel lanes on AVX2 (``madd``): the exact sum of (x - xzp)(w - wzp) with vpmaddwd on
    int16 pairs of input channels, 8 output channels per instruction. x is repacked per
    call into centred int16 ``xq[n, g, h + pads, w + pads, c2]`` (the border 0, the channels
    padded to a multiple of 2); the weights, centred and packed at compile time by
    ``cpu-conv-layout`` (``MADD_W_LAYOUT``, else here per call), as
    ``wq[g, m / 8, kh, kw, c / 2, 8, 2]``. ``ow_block`` x 8 sums stay in registers over
    the window, as in the vnni kernel's channel lanes; at 28+ columns pixel lanes instead
    (below)."""
    from tvm import te, tirx

    n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, pt, pl = dims
    i32 = "int32"
    cp = _round_up(cg, MADD_IC_BLOCK)
    mp = _round_up(mg, MADD_OC_BLOCK)
    hp, wp = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    # Pixel lanes (8 output pixels x 2 input channels per vpmaddwd, a pair of weights
    # broadcast), the epilogue fused into the sums, where the vnni kernel takes them too and
    # the layer has one group (_schedule_px_fused): a channel-lane epilogue gathers each
    # channel's pixels out of [pixel, channel] sums, which dominates at few input channels.
    # The widths are padded to 16 as the vnni kernel's (build_qconv's outp). Measured on
    # AVX2 code (Zen 4, QC_HOST_ISA=avx2), 1 thread: 32 -> 16 at 112 x 112 0.30 -> 0.14 ms,
    # 144 -> 24 at 56 x 56 0.32 -> 0.21 ms, 192 -> 32 at 28 x 28 0.099 -> 0.086; at 14 x 14
    # the expansions were slower (96 -> 576: 0.18 -> 0.20 ms), so those keep channel lanes.
    # (channels-last layers: channel lanes whatever their shape, as the vnni kernel's)
    px = (not nhwc and sw == 1 and ow >= 28 and group == 1
          and (cp * kh * kw <= 96 or kh * kw == 1))
    owp = _round_up(ow, 16)
    if not px:
        xq = te.compute((n, group, hp, wp, cp), lambda nn, g, yy, xx, cc: tirx.if_then_else(
            tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w_, cc < cg),
            (x(nn, tirx.min(g * cg + cc, c - 1), yy - pt, xx - pl).astype(i32) - xzp
             ).astype("int16"), tirx.const(0, "int16")), name="xq")
    else:  # [n, g, y, c / 2, x, 2]: 8 pixels x 2 channels are 32 contiguous bytes
        # (a padded channel repeats the last one: its weights are 0; a condition on it
        # would not be the padding pattern decompose_padding takes)
        wp = (owp - 1) + (kw - 1) * dw + 1
        xq2 = te.compute((n, group, hp, cp // MADD_IC_BLOCK, wp, MADD_IC_BLOCK),
                         lambda nn, g, yy, co, xx, ci: tirx.if_then_else(
            tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w_),
            (x(nn, tirx.min(g * cg + co * MADD_IC_BLOCK + ci, c - 1), yy - pt, xx - pl
               ).astype(i32) - xzp).astype("int16"), tirx.const(0, "int16")), name="xq")

    def w_pack(g, mo, yy, xx, co, mi, ci):
        mm, cc = mo * MADD_OC_BLOCK + mi, co * MADD_IC_BLOCK + ci
        ch = tirx.min(g * mg + mm, m - 1)
        v = wt(ch, tirx.min(cc, cg - 1), yy, xx).astype(i32) - wzp(ch)
        return tirx.if_then_else(tirx.all(mm < mg, cc < cg), v, tirx.const(0, i32)
                                 ).astype("int16")
    wq = w_packed if w_packed is not None else te.compute(
        (group, mp // MADD_OC_BLOCK, kh, kw, cp // MADD_IC_BLOCK, MADD_OC_BLOCK, MADD_IC_BLOCK),
        w_pack, name="wq")
    s = _tile_sums(xq2 if px else xq, wq, dims, MADD_OC_BLOCK, MADD_IC_BLOCK, px, owp, cp, mp)

    def acc(nn, mm, yy, xx):
        g, mr = mm // mg, mm % mg
        return s(nn, g, yy, xx, mr // MADD_OC_BLOCK, mr % MADD_OC_BLOCK)
    weight_bytes = mp * kh * kw * cp * 2
    image_bytes = hp * wp * cp * 2
    return acc, {"ow": ow, "mg": mg, "weights_outer": weight_bytes > image_bytes,
                 "packed": w_packed is not None, "px": px, "xsum": False,
                 "xq_const_pad": True, "nhwc": nhwc, "m": m, "lanes": MADD_OC_BLOCK,
                 "xq_border": bool(pt or pl or hp > h or wp > w_ or (cp > cg and not px))}


def _schedule_madd(sch, out, extra: dict):
    """The AVX2 channel lanes: as the vnni kernel's (``_schedule``), with vpmaddwd; pixel
    lanes as its fused ones (``_schedule_px_fused``)."""
    register_conv_madd_intrin()
    if extra["px"]:
        copy = None
        if extra["ow"] % 16:
            copy, out = out, sch.get_sblock("outp")
        func = _schedule_px_fused(sch, out, copy, extra, CONV_MADD_INTRIN, MADD_OC_BLOCK)
        if not extra["packed"]:
            wb = sch.get_sblock("wq")
            sch.parallel(sch.fuse(*sch.get_loops(wb)[:2]))
            func = sch.mod["main"]
        return func
    row = _schedule_channel_lanes(sch, out, extra, MADD_OC_BLOCK, CONV_MADD_INTRIN)
    b = sch.get_sblock("xq")
    if extra["xq_border"]:
        sch.decompose_padding(b, sch.get_loops(b)[3])
    sch.parallel(sch.fuse(*sch.get_loops(b)[:3]))
    if not extra["packed"]:
        wb = sch.get_sblock("wq")
        sch.parallel(sch.fuse(*sch.get_loops(wb)[:2]))
    if row is None:
        sch.parallel(_epilogue_rows(sch, out, extra))
    return sch.mod["main"]


def _taps_sum(node, x, wt, wzp, dims, module):
    """Depthwise sums with vpdpbusd over a window row's taps: 16 output columns x 4 taps of
    one channel per instruction (a 3 x 3 window is 3 instructions per 16 outputs, where the
    direct kernel widens, multiplies and adds 9 times). Per channel plane, the padded image
    as unsigned bytes (its border the zero point, which adds 0 to the exact sum); the
    intrinsic makes each column's 4 taps from one 64-byte load of a row with a byte
    shuffle, so that strided and dilated windows cost the same. The weights are the codes
    minus their zero point (int8: ``_centred_weights_fit_int8``), padded to 4 taps with
    zeros; the exact sum of (x - xzp)(w - wzp) is then ``sum x' * (w - wzp) - zx' * Wsum[m]``
    with x' the unsigned codes (i8 x shifted by 128) and zx' their zero point."""
    from tvm import te, tirx

    n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, pt, pl = dims
    i32 = "int32"
    x_shift = 128 if node.operands[0].type.dtype.name == "i8" else 0   # x' = x + 128: u8
    zx = const_x_zero_point(node, module) + x_shift
    owp = _round_up(ow, 16)
    hp = (oh - 1) * sh + (kh - 1) * dh + 1
    kq = -(-kw // TAP_BLOCK)   # blocks of 4 taps a window row (2 for 5 x 5 and 7 x 7)
    # the pitched plane's row: the image row and every valid output's window, in bytes
    # that the stride divides
    pitch = _round_up(max(pl + w_, (ow - 1) * sw + (kw - 1) * dw + 1), sw)
    pitched = _taps_pitched(sh, sw, ow, oh, pitch)
    if pitched:
        # A plane narrower than 16 as one row: the padded image with a row pitch of P bytes
        # (a multiple of the stride s), and output v = y * Q + x with Q = P / s (x < ow;
        # the others are junk lanes) reads the bytes s * v + base[ry] + t * dw, so 16
        # consecutive outputs are one vpdpbusd whatever rows they span. At stride s > 1
        # the image rows are stored by phase (rows r, r + s, r + 2s ... together; R of
        # each), so that output row y + 1 reads P bytes past row y in every phase: base[ry]
        # is the start of row (ry * dh) // s of phase (ry * dh) % s. A 7 x 7 output takes
        # 4 vectors of sums instead of 7 rows of 16 lanes, and the epilogue runs on whole
        # vectors (a 7-wide row left 3 of its 7 lanes scalar). The image is rows x P here,
        # so that (at stride 1) decompose_padding splits its border from a plain copy; the
        # schedule makes it one row (_schedule_taps_pitched).
        out_pitch = pitch // sw
        phase_rows = -(-hp // sw)
        vlen = _round_up(oh * out_pitch, 16)

        def base(ry):  # (ry a window row: an int, or the reduce axis)
            return ((ry * dh) % sw * phase_rows + (ry * dh) // sw) * pitch
        # every 64-byte load of the last vector in bounds (its junk lanes read the tail)
        span = max(sw * phase_rows * pitch, sw * (vlen - 16) + max(map(base, range(kh)))
                   + (kq - 1) * TAP_BLOCK * dw + 64)
        rows, width = -(-span // pitch), pitch
    else:
        # every padded output column's taps in bounds, and the 64 bytes the intrinsic loads
        # from each block of 16 columns and 4 taps
        rows = hp
        width = max((owp - 1) * sw + (kq * TAP_BLOCK - 1) * dw + 1,
                    (owp - 16) * sw + (kq - 1) * TAP_BLOCK * dw + 64)

    def image_row(yy):  # the padded image row that buffer row yy holds
        if not pitched or sw == 1:
            return yy
        return yy % phase_rows * sw + yy // phase_rows

    def stored(yy):  # whether buffer row yy holds an image row at all (else the tail)
        return tirx.const(True) if not pitched or sw == 1 else yy < sw * phase_rows
    xp = te.compute((n, c, rows, width), lambda nn, cc, yy, xx: tirx.if_then_else(
        tirx.all(stored(yy), image_row(yy) >= pt, image_row(yy) < pt + h, xx >= pl,
                 xx < pl + w_),
        (x(nn, cc, image_row(yy) - pt, xx - pl).astype(i32) + x_shift).astype("uint8"),
        tirx.const(zx, "uint8")), name="xp")
    w4 = te.compute((m, kh, kq, TAP_BLOCK), lambda mm, yy, q, t: tirx.if_then_else(
        q * TAP_BLOCK + t < kw,
        wt(mm, 0, yy, tirx.min(q * TAP_BLOCK + t, kw - 1)).astype(i32) - wzp(mm),
        tirx.const(0, i32)).astype("int8"), name="w4")
    ry = te.reduce_axis((0, kh), name="ry")
    rq = te.reduce_axis((0, kq), name="rq")
    rt = te.reduce_axis((0, TAP_BLOCK), name="rt")
    if pitched:
        def tap(nn, mm, v):
            i = sw * v + base(ry) + (rq * TAP_BLOCK + rt) * dw
            return xp(nn, mm, i // pitch, i % pitch)
        s = te.compute((n, m, 1, vlen), lambda nn, mm, yy, v: te.sum(
            tap(nn, mm, v).astype(i32) * w4(mm, ry, rq, rt).astype(i32),
            axis=[ry, rq, rt]), name="sum")
    else:
        s = te.compute((n, m, oh, owp), lambda nn, mm, yy, j: te.sum(
            xp(nn, mm, yy * sh + ry * dh, j * sw + (rq * TAP_BLOCK + rt) * dw).astype(i32)
            * w4(mm, ry, rq, rt).astype(i32),
            axis=[ry, rq, rt]), name="sum")
    wy = te.reduce_axis((0, kh), name="wy")
    wq = te.reduce_axis((0, kq), name="wq")
    wt_ = te.reduce_axis((0, TAP_BLOCK), name="wt")
    wsum = te.compute((m,), lambda mm: te.sum(w4(mm, wy, wq, wt_).astype(i32),
                                              axis=[wy, wq, wt_]), name="wsum")

    def acc(nn, mm, yy, xx):  # (no weight sums where zx' is 0: post-ReLU u8 activations)
        return s(nn, mm, yy, xx) - zx * wsum(mm) if zx else s(nn, mm, yy, xx)
    # (by phase, the border is not a box of the buffer: that copy keeps its conditions)
    extra = {"ow": ow, "xp_border": bool(pt or pl or rows > h or width > w_),
             "decompose_border": not pitched or sw == 1,
             "stride": sw, "dilation": dw, "wsum": zx != 0}
    if pitched:
        extra.update(pitch=pitch, out_pitch=out_pitch, vlen=vlen)
    return acc, extra


def register_conv_dw_vnni_intrin(cb: int) -> str:
    """``C[c] += sum_t u8 B[t, c] * s8 A[c, t]`` for ``cb`` channels c (16, 32 or 64) and 4
    taps t of a window row (vpdpbusd, one per 16 channels): B holds the 4 taps' channel
    vectors of the padded NHWC image (rows ``stride`` bytes apart: the next pixel), A the
    centred weights, 4 taps per channel. One byte shuffle of the 4 loads puts each
    channel's 4 taps in one int32 lane (LLVM picks the shuffles: ``vpermt2b`` with VBMI), so
    the sums come out in channel order, 16 channels a vector. The sums C live in a plain
    buffer (the pixel-lane kernel's reason, ``PX_ACC_SCOPE``). Returns the name."""
    from tvm.script import tirx as T

    from qcompiler.codegen.cpu.intrin_registry import register_intrin_once

    name = f"qc_conv_dw_vnni_{cb}"
    if name in _intrins_registered:
        return name
    vec = f"uint8x{cb}"
    # q_j's byte 4 * ci + t is tap t of channel 16 j + ci (sources concatenated: t * cb + c)
    index = [[t * cb + 16 * j + ci for ci in range(16) for t in range(TAP_BLOCK)]
             for j in range(cb // 16)]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        stride = T.int32()
        A = T.match_buffer(a, (cb, 4), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, cb), "uint8", offset_factor=1, strides=[stride, 1])
        C = T.match_buffer(c, (cb,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:cb], B[0:4, 0:cb], A[0:cb, 0:4])
            T.writes(C[0:cb])
            for i, k in T.grid(cb, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(B[vk, vi], "int32") * T.cast(A[vi, vk], "int32")

    def lanes(C, B, A, j):
        # (one expression per 16 channels: no named intermediate, see
        # kernels.register_vpdpbusd_intrin; LLVM shares the 4 loads between them)
        taps = [B.vload([t, 0], dtype=vec) for t in range(TAP_BLOCK)]
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([16 * j], dtype="int32x16"),
            T.reinterpret(T.Shuffle(taps, index[j]), dtype="int8x64"),
            A.vload([16 * j, 0], dtype="int8x64"), dtype="int32x16")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        stride = T.int32()
        A = T.match_buffer(a, (cb, 4), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, cb), "uint8", offset_factor=1, strides=[stride, 1])
        C = T.match_buffer(c, (cb,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:cb], B[0:4, 0:cb], A[0:cb, 0:4])
            T.writes(C[0:cb])
            C[T.ramp(T.int32(0), 1, 16)] = lanes(C, B, A, 0)
            if cb >= 32:  # (Python conditions: the statements of this cb only)
                C[T.ramp(T.int32(16), 1, 16)] = lanes(C, B, A, 1)
            if cb == 64:
                C[T.ramp(T.int32(32), 1, 16)] = lanes(C, B, A, 2)
                C[T.ramp(T.int32(48), 1, 16)] = lanes(C, B, A, 3)

    register_intrin_once(name, desc, impl)
    _intrins_registered.add(name)
    return name


def _dw_vnni_block(node, module, m: int, dh: int, dw: int):
    """The channels per vpdpbusd step (64, 32 or 16, dividing m) of the dwlanes kernel's
    vpdpbusd form, or 0 where it does not apply: dilation 1 (the 4 taps are adjacent
    pixels), the centred weights in int8 (module constants), m a multiple of 16."""
    if dh != 1 or dw != 1 or not _centred_weights_fit_int8(node, module):
        return 0
    return next((b for b in (64, 32, 16) if m % b == 0), 0)


def _dw_lanes_sum(node, x, wt, xzp, wzp, dims, module, vnni: bool = True):
    """Depthwise channels-last (``dwlanes``; ``vnni`` False: ``dwlanes_avx2``): 16 channels
    per vector (8 on AVX2), the window's taps summed in registers as int32 products of the
    codes and the centred weights (w - wzp, made per call as [kh, kw, m]: 4 bytes a tap and
    channel, a contiguous vector per tap); ``sum - xzp * Wsum[m]`` is the exact sum, with x
    padded by its zero point (a copy of whole rows, the border filled apart). On VNNI
    targets the vpdpbusd form where ``_dw_vnni_block`` allows it (``_dw_vnni_sum``)."""
    from tvm import te

    n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, pt, pl = dims
    i32 = "int32"
    cb = _dw_vnni_block(node, module, m, dh, dw) if vnni else 0
    if cb:
        return _dw_vnni_sum(node, x, wt, xzp, wzp, dims, module, cb)
    hp, wp = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    xp, zx = _dw_padded_x(node, x, xzp, dims, module, hp, wp)
    wc = te.compute((kh, kw, m), lambda yy, xx, mm: wt(mm, 0, yy, xx).astype(i32) - wzp(mm),
                    name="wc")
    wy = te.reduce_axis((0, kh), name="wy")
    wx = te.reduce_axis((0, kw), name="wx")
    wsum = te.compute((m,), lambda mm: te.sum(wc(wy, wx, mm), axis=[wy, wx]), name="wsum")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    s = te.compute((n, oh, ow, m), lambda nn, yy, xx, mm: te.sum(
        xp(nn, yy * sh + ry * dh, xx * sw + rx * dw, mm).astype(i32) * wc(ry, rx, mm),
        axis=[ry, rx]), name="sum")

    def acc(nn, mm, yy, xx):
        return s(nn, yy, xx, mm)
    return acc, {"ow": ow, "m": m, "xq_border": bool(pt or pl or hp > h or wp > w_),
                 "channel_term": lambda mm: -zx * wsum(mm),
                 # a vector of channels: 16 int32 lanes on VNNI targets, 8 (AVX2's) else
                 "lanes": OC_BLOCK if vnni else MADD_OC_BLOCK}


def _dw_padded_x(node, x, xzp, dims, module, hp: int, wp: int):
    """The depthwise lanes kernels' NHWC copy of x, [n, hp, wp, c] of unsigned bytes padded
    by x's zero point (i8 codes shifted by +128, as the vnni kernel's), and that zero point
    (shifted): ``sum x' * w - zx' * Wsum`` is the exact sum."""
    from tvm import te, tirx

    n, c, h, w_ = dims[:4]
    pt, pl = dims[16:18]
    zp = const_x_zero_point(node, module)
    x_shift = 128 if node.operands[0].type.dtype.name == "i8" else 0

    def x_pad(nn, yy, xx, cc):
        inside = tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w_)
        return tirx.if_then_else(inside, (x(nn, cc, yy - pt, xx - pl).astype("int32")
                                          + x_shift).astype("uint8"),
                                 tirx.const(zp + x_shift, "uint8"))
    return te.compute((n, hp, wp, c), x_pad, name="xq"), xzp + x_shift


def _dw_vnni_sum(node, x, wt, xzp, wzp, dims, module, cb: int):
    """The dwlanes kernel on vpdpbusd: each window row's taps in groups of 4 (the last
    group padded with zero weights, the padded image one group wider), ``cb`` channels a
    step (``register_conv_dw_vnni_intrin``); i8 x shifted by +128 (``sum - zx' * Wsum``
    with the shifted zero point, as the vnni kernel)."""
    from tvm import te, tirx

    n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, pt, pl = dims
    i32 = "int32"
    groups = -(-kw // TAP_BLOCK)
    hp = (oh - 1) * sh + kh
    wp = (ow - 1) * sw + groups * TAP_BLOCK
    xp, zx = _dw_padded_x(node, x, xzp, dims, module, hp, wp)

    def w_pack(yy, g, mm, t):
        kx = g * TAP_BLOCK + t
        return tirx.if_then_else(kx < kw, wt(mm, 0, yy, tirx.min(kx, kw - 1)).astype(i32)
                                 - wzp(mm), tirx.const(0, i32)).astype("int8")
    wq = te.compute((kh, groups, m, TAP_BLOCK), w_pack, name="wc")
    wy = te.reduce_axis((0, kh), name="wy")
    wg = te.reduce_axis((0, groups), name="wg")
    wt4 = te.reduce_axis((0, TAP_BLOCK), name="wt")
    wsum = te.compute((m,), lambda mm: te.sum(wq(wy, wg, mm, wt4).astype(i32),
                                              axis=[wy, wg, wt4]), name="wsum")
    ry = te.reduce_axis((0, kh), name="ry")
    rg = te.reduce_axis((0, groups), name="rg")
    rt = te.reduce_axis((0, TAP_BLOCK), name="rt")
    s = te.compute((n, oh, ow, m), lambda nn, yy, xx, mm: te.sum(
        xp(nn, yy * sh + ry, xx * sw + rg * TAP_BLOCK + rt, mm).astype(i32)
        * wq(ry, rg, mm, rt).astype(i32), axis=[ry, rg, rt]), name="sum")

    def acc(nn, mm, yy, xx):
        return s(nn, yy, xx, mm)
    return acc, {"ow": ow, "m": m, "cb": cb, "xq_border": True,
                 "channel_term": lambda mm: -zx * wsum(mm)}


def _schedule_dw_vnni(sch, out, extra: dict):
    """Rows in parallel; per row ``cols`` output pixels x ``cb`` channels of sums in
    registers over the window's tap groups (tensorized), the epilogue right after them in
    16-lane vectors."""
    cb = extra["cb"]
    intrin = register_conv_dw_vnni_intrin(cb)
    # cols x cb / 16 accumulators: up to 16 of the 32 zmm registers (the tap vectors, their
    # shuffles and the weights need the rest)
    cols = next(b for b in (4, 7, 3, 2, 1) if extra["ow"] % b == 0 and b * cb <= 256)
    blk, omo, oxi, omi = _dw_tile(sch, out, cols, cb)
    nn, yy, xx, mm, ry, rg, rt = sch.get_loops(blk)[3:]
    sch.reorder(ry, rg, nn, yy, xx, mm, rt)
    acc = sch.cache_write(blk, 0, "global")   # (a stack array: PX_ACC_SCOPE's reason)
    init = sch.decompose_reduction(blk, ry)
    sch.tensorize(mm, intrin)
    sch.unroll(xx)
    for block in (init, acc):
        _registers_below(sch, block, omo)
    sch.compute_inline(acc)  # (the epilogue reads the accumulators themselves)
    sch.unroll(oxi)
    sch.vectorize(sch.split(omi, [None, OC_BLOCK])[1])
    _schedule_dw_xq(sch, border=True)
    return sch.mod["main"]


def _dw_tile(sch, out, cols: int, channels: int):
    """The depthwise lanes kernels' tiles: output rows in parallel, per row ``cols``
    pixels x ``channels`` channels, the tile's sums computed right before its epilogue.
    Returns (the sums' block, the tile's channel loop, the epilogue's pixel and channel
    loops)."""
    blk = sch.get_sblock("sum")
    on, oy, ox, om = sch.get_loops(out)
    row = sch.fuse(on, oy)
    sch.parallel(row)
    oxo, oxi = sch.split(ox, [None, cols])
    omo, omi = sch.split(om, [None, channels])
    sch.reorder(row, oxo, omo, oxi, omi)
    sch.compute_at(blk, omo, preserve_unit_loops=True)
    return blk, omo, oxi, omi


def _schedule_dw_xq(sch, border: bool):
    """The padded copy of x, per padded row (the border filled apart, the row copied), the
    rows in parallel."""
    b = sch.get_sblock("xq")
    if border:
        sch.decompose_padding(b, sch.get_loops(b)[2])
    sch.parallel(sch.fuse(*sch.get_loops(b)[:2]))


def _schedule_dw_lanes(sch, out, extra: dict):
    """Rows in parallel; per row ``cols`` output pixels x 16 channels of sums in registers
    over the window (one weight vector serves the cols pixels), the epilogue right after
    them; the padded copy of x and the centred weights per call, before."""
    cols = next(b for b in (4, 7, 3, 2, 1) if extra["ow"] % b == 0)
    # (a vector of 16 channels, 8 on AVX2; fewer where the count is not a multiple of it)
    blk, omo, oxi, omi = _dw_tile(sch, out, cols, _lanes_dividing(extra["m"], extra["lanes"]))
    nn, yy, xx, mm, ry, rx = sch.get_loops(blk)[3:]
    sch.reorder(ry, rx, nn, yy, xx, mm)
    acc = sch.cache_write(blk, 0, "local")   # (its write-back lands under omo too)
    # the sums: the taps outside, cols pixels x 16 lanes unrolled / vectorized inside
    # (vectorized before the init is split off: a block without its init is no longer a
    # reduction block, which vectorize requires)
    sch.unroll(xx)
    sch.vectorize(mm)
    init = sch.decompose_reduction(blk, ry)
    for block in (init, acc):
        _registers_below(sch, block, omo)
    sch.unroll(oxi)
    sch.vectorize(omi)
    _schedule_dw_xq(sch, extra["xq_border"])
    return sch.mod["main"]


def _taps_pitched(sh: int, sw: int, ow: int, oh: int, pitch: int) -> bool:
    """Whether the taps kernel runs a plane as one row of its pitch (``_taps_sum``): one
    stride both ways and rows narrower than a vector (7 x 7 and 14 x 14 outputs); at a
    stride above 1 only where that takes fewer vectors than rows of 16 (its image copy by
    row phase keeps its conditions: 192 channels 28 -> 14, 14 vectors either way, ran
    0.028 -> 0.031 ms; 576 channels 14 -> 7, 4 vectors instead of 7, 0.047 -> 0.035)."""
    if sh != sw or ow >= 16:
        return False
    return sw == 1 or -(-oh * (pitch // sw) // 16) < oh


def _schedule_taps(sch, out, extra: dict):
    """One channel plane per parallel iteration: its padded unsigned image, then each output
    row's sums (in registers, 16 columns x 4 taps per vpdpbusd) right before the row's
    epilogue."""
    intrin = register_conv_vnni_taps_intrin(extra["stride"], extra["dilation"])
    last = None
    if "pitch" in extra:
        return _schedule_taps_pitched(sch, out, extra, intrin)
    if extra["ow"] % 16:
        # the epilogue over the padded width (outp: whole vectors of sums), then the
        # result's copy of the row's first ow columns
        last, out = out, sch.get_sblock("outp")
    nn, mm, yy, xx = sch.get_loops(out)
    sch.parallel(mm)  # (not fused with the batch: a symbolic one defeats compute_at)
    if last is not None:
        sch.reverse_compute_at(last, yy)
    blk = sch.get_sblock("sum")
    sch.compute_at(blk, yy, preserve_unit_loops=True)
    for name in ("xp", "wsum", "w4") if extra["wsum"] else ("xp", "w4"):
        sch.compute_at(sch.get_sblock(name), mm, preserve_unit_loops=True)
    xp = sch.get_sblock("xp")
    if extra["xp_border"]:
        sch.decompose_padding(xp, sch.get_loops(xp)[-2])
    loops = sch.get_loops(blk)
    j, ry, rq, rt = loops[-4:]
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(jo, ry, rq, ji, rt)
    # (the row's sums straight in its buffer, no "local" cache: that would be a workspace
    # allocation per plane; LLVM keeps the 16 sums in a register over the window rows)
    init = sch.decompose_reduction(blk, ry)
    sch.tensorize(ji, intrin)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


def _schedule_taps_pitched(sch, out, extra: dict, intrin: str):
    """A plane per parallel iteration: its pitched image, its sums (16 outputs x 4 taps per
    vpdpbusd), its epilogue on whole vectors; then the result's copy of the ow valid
    columns of each row, a loop of its own (under the plane, reverse_compute_at would
    infer the copied region from the pitched one)."""
    copy, outp = out, sch.get_sblock("outp")
    nn, mm, yy, v = sch.get_loops(outp)
    sch.parallel(mm)
    blk = sch.get_sblock("sum")
    sch.compute_at(blk, mm, preserve_unit_loops=True)
    for name in ("xp", "wsum", "w4") if extra["wsum"] else ("xp", "w4"):
        sch.compute_at(sch.get_sblock(name), mm, preserve_unit_loops=True)
    xp, pitch = sch.get_sblock("xp"), extra["pitch"]
    sch.transform_layout(xp, ("write", 0), lambda nn, cc, yy, xx: (nn, cc, yy * pitch + xx))
    if extra["xp_border"] and extra["decompose_border"]:
        sch.decompose_padding(xp, sch.get_loops(xp)[-2])
    j, ry, rq, rt = sch.get_loops(blk)[-4:]
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(jo, ry, rq, ji, rt)
    init = sch.decompose_reduction(blk, ry)
    sch.tensorize(ji, intrin)
    sch.vectorize(sch.get_loops(init)[-1])
    cn, cm, cy, cx = sch.get_loops(copy)
    sch.parallel(cm)
    sch.unroll(cx)  # (a row's ow bytes; LLVM vectorized the plane's copy with gathers)
    return sch.mod["main"]


def _zero_after_shift(node: Node, module, w_shift: int) -> bool:
    """Whether every shifted weight zero point wzp[m] - w_shift is a constant 0 (then the
    window sums of x drop out of the sum)."""
    wzp = node.operands[5] if len(node.operands) > 5 else None
    if wzp is None:
        return w_shift == 0
    c = constant_value(module, wzp) if module is not None else None
    return c is not None and bool(np.all(np.asarray(c, np.int64) - w_shift == 0))


def _vnni_sum(node, x, wt, xzp, wzp, dims, module=None, w_packed=None, flat=False,
              nhwc=False):
    """The vnni kernel's sums (``acc``) and the facts its schedule needs. ``flat``: the
    dims are a 1 x 1 layer's image as one row of pixels (``_flat_pixels``); ``nhwc``: x is
    channels-last (channel lanes only: its repack is then a copy of contiguous rows)."""
    from tvm import te, tirx

    n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg, sh, sw, dh, dw, pt, pl = dims
    if not flat and kh == kw == 1 and (sh > 1 or sw > 1) and not any(node.attrs["pads"]):
        # A strided 1 x 1 layer (ResNet's downsampling) reads every sh-th row and sw-th
        # column only: it is the stride-1 layer on that subsampled image, which the repack
        # reads directly (a quarter of the image to repack at stride 2, and pixel lanes).
        x_full = x

        def x(nn, cc, yy, xx, x_full=x_full, sy=sh, sx=sw):
            return x_full(nn, cc, yy * sy, xx * sx)
        h, w_, sh, sw = oh, ow, 1, 1
    i32 = "int32"
    x_shift = 128 if node.operands[0].type.dtype.name == "i8" else 0   # x' = x + 128: u8
    w_shift = conv_w_shift(node)  # w' = w - 128 for unsigned codes
    cp = _round_up(cg, IC_BLOCK)
    mp = _round_up(mg, OC_BLOCK)
    hp, wp = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    zx = xzp + x_shift  # the zero point of the shifted codes

    zp_const = const_x_zero_point(node, module)

    def x_pack(nn, g, yy, xx, cc):
        inside = tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w_)
        if zp_const is not None:
            # The padding pattern decompose_padding takes (_schedule_xq): the border is the
            # constant zero point, the rest a copy without conditions or clamps (LLVM
            # vectorizes it). Padded channels copy the group's last channel instead of 0:
            # their weights are 0, and the x window sums (xsum) add only the cg real ones.
            return tirx.if_then_else(
                inside, (x(nn, tirx.min(g * cg + cc, c - 1), yy - pt, xx - pl).astype(i32)
                         + x_shift).astype("uint8"),
                tirx.const(zp_const + x_shift, "uint8"))
        v = x(nn, tirx.min(g * cg + cc, c - 1), tirx.max(tirx.min(yy - pt, h - 1), 0),
              tirx.max(tirx.min(xx - pl, w_ - 1), 0)).astype(i32) + x_shift
        return tirx.if_then_else(cc < cg, tirx.if_then_else(inside, v, zx),
                                 tirx.const(0, i32)).astype("uint8")
    # Pixel lanes (stride 1, 14+ output columns, padded to a multiple of 16: at most 1/8
    # of the sums wasted; windows of at most 96 codes, the expanding 1 x 1 layers, where
    # the channel-lane kernel's epilogue gathers cost more than its sums): see _schedule_px.
    # Measured 1 thread Zen 4: 16 -> 96 at 112 x 112 0.70 -> 0.31 ms, 96 -> 576 at 14 x 14
    # 0.54 -> 0.10 ms; 3 x 3 windows of 144+ codes (64 x 9 at 56) are even.
    # 1 x 1 layers take pixel lanes whatever their depth (since their repack is a plain
    # 4-channel interleave, _schedule_xq): 144 -> 24 at 56 x 56 0.24 -> 0.13 ms, 192 -> 32
    # at 28 x 28 0.11 -> 0.07 ms; 7 x 7 images stay on channel lanes (960 -> 160: 0.08 vs
    # 0.13 ms).
    # Channels-last layers take channel lanes whatever their shape: their epilogue writes a
    # pixel's channels contiguously (no gather), and their repack copies whole rows.
    px = not nhwc and sw == 1 and ow >= 14 and (cp * kh * kw <= 96 or kh * kw == 1)
    # Pixel lanes at 28+ columns that are not a multiple of 16: each output row's sums
    # inside the epilogue's row loop, over the padded width (build_qconv's outp), where
    # the layer has no residual (MobileNetV2's 24 -> 144 at 56 x 56, batch 8: 4.1 -> 2.4 ms;
    # its 144 -> 24 with a residual measured slower that way).
    padded_rows = px and (flat or ow % 16 != 0 and ow >= 28 and (
        len(node.operands) <= 9 or node.operands[9] is None))
    owp = _round_up(ow, 16)
    wpx = (owp - 1) + (kw - 1) * dw + 1
    if px:
        # Rows of 4-channel blocks, [n, g, y, c / 4, x, 4], so that 16 output pixels x 4
        # channels are 64 contiguous bytes (vpdpbusd's vector operand); the columns past
        # the padded image (for the padded output columns) hold the zero point too.
        xq2 = te.compute((n, group, hp, cp // IC_BLOCK, wpx, IC_BLOCK),
                         lambda nn, g, yy, co, xx, ci: x_pack(nn, g, yy, xx, co * IC_BLOCK + ci),
                         name="xq")

        def xq(nn, g, yy, xx, cc):
            return xq2(nn, g, yy, cc // IC_BLOCK, xx, cc % IC_BLOCK)
    elif (nhwc and group == 1 and cp == cg and x_shift == 0 and not any(node.attrs["pads"])
          and hp == h and wp == w_):
        # Channels-last x that is already the repack's layout (unsigned, unpadded, channels a
        # multiple of 4: a 1 x 1 layer's, or a strided one's subsampled image): read as it is
        def xq(nn, g, yy, xx, cc):
            return x(nn, cc, yy, xx)
    else:
        xq = te.compute((n, group, hp, wp, cp), x_pack, name="xq")

    def w_pack(g, mo, yy, xx, co, mi, ci):
        mm, cc = mo * OC_BLOCK + mi, co * IC_BLOCK + ci
        v = wt(tirx.min(g * mg + mm, m - 1), tirx.min(cc, cg - 1), yy, xx).astype(i32) - w_shift
        return tirx.if_then_else(tirx.all(mm < mg, cc < cg), v, tirx.const(0, i32)
                                 ).astype("int8")
    # Packed at compile time (cpu-conv-layout) or here, per call.
    wq = w_packed if w_packed is not None else te.compute(
        (group, mp // OC_BLOCK, kh, kw, cp // IC_BLOCK, OC_BLOCK, IC_BLOCK), w_pack, name="wq")
    s = _tile_sums(xq2 if px else xq, wq, (n, c, h, w_, m, cg, kh, kw, oh, ow, group, mg,
                                            sh, sw, dh, dw, pt, pl),
                   OC_BLOCK, IC_BLOCK, px, owp, cp, mp)
    xsum = None
    if not _zero_after_shift(node, module, w_shift):
        sy = te.reduce_axis((0, kh), name="sy")
        sx = te.reduce_axis((0, kw), name="sx")
        sc = te.reduce_axis((0, cg), name="sc")
        xw = owp if padded_rows else ow
        xsum = te.compute((n, group, oh, xw), lambda nn, g, yy, xx: te.sum(
            xq(nn, g, yy * sh + sy * dh, xx * sw + sx * dw, sc).astype(i32), axis=[sy, sx, sc]),
            name="xsum")
    # Wsum[m]: the packed (shifted, zero-padded) weights times a vector of ones, 16 channels x
    # 4 codes per vpdpbusd like the sum itself (a scalar reduction over every weight on each
    # call cost as much as a third of a 512 x 512 x 3 x 3 layer).
    ones = te.compute((IC_BLOCK,), lambda i: tirx.const(1, "uint8"), name="ones")
    wy = te.reduce_axis((0, kh), name="wy")
    wx = te.reduce_axis((0, kw), name="wx")
    wco = te.reduce_axis((0, cp // IC_BLOCK), name="wco")
    wci = te.reduce_axis((0, IC_BLOCK), name="wci")
    wsum_b = te.compute((group, mp // OC_BLOCK, OC_BLOCK), lambda g, mo, mi: te.sum(
        wq(g, mo, wy, wx, wco, mi, wci).astype(i32) * ones(wci).astype(i32),
        axis=[wy, wx, wco, wci]), name="wsum")

    def group_of(mm):
        """(group, channel within it) of output channel ``mm``; with one group the channel
        itself, no modulo: the schedule's buffer regions are then found exact (a ``% m`` in
        an index made TVM keep a fused tile's sums for every channel, not the tile's)."""
        return (0, mm) if group == 1 else (mm // mg, mm % mg)

    def wsum(mm):
        g, mr = group_of(mm)
        return wsum_b(g, mr // OC_BLOCK, mr % OC_BLOCK)
    k = cg * kh * kw

    def channel_term(mm):  # the part of the sum that depends on the channel only
        return k * zx * (wzp(mm) - w_shift) - zx * wsum(mm)

    def acc(nn, mm, yy, xx):
        g, mr = group_of(mm)
        zw = wzp(mm) - w_shift
        v = s(nn, g, yy, xx, mr // OC_BLOCK, mr % OC_BLOCK)
        if not nhwc:
            v = v + channel_term(mm)
        return v if xsum is None else v - zw * xsum(nn, g, yy, xx)
    weight_bytes = mp * kh * kw * cp
    image_bytes = hp * wp * cp
    return acc, {"ow": ow, "group": group, "xsum": xsum is not None, "flat": flat,
                 "nhwc": nhwc, "m": m, "channel_term": channel_term if nhwc else None,
                 "window": cp * kh * kw,  # codes summed per output (padded channels)
                 "xq_direct": not px and not isinstance(xq, te.Tensor),
                 "weights_outer": weight_bytes > image_bytes, "mg": mg, "px": px,
                 "xq_const_pad": zp_const is not None, "padded_rows": padded_rows,
                 # (whether the repacked image has a border at all)
                 "xq_border": bool(pt or pl or hp > h or (wpx if px else wp) > w_)}


def _schedule(func, variant: str, extra: dict):
    import tvm

    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("out")
    if variant == "taps":
        return _schedule_taps(sch, out, extra)
    if variant in ("dwlanes", "dwlanes_avx2"):
        if extra.get("cb"):
            return _schedule_dw_vnni(sch, out, extra)
        return _schedule_dw_lanes(sch, out, extra)
    if variant == "madd":
        return _schedule_madd(sch, out, extra)
    if variant == "direct":
        # One output channel plane at a time: the window loops outside the output columns,
        # which are one vector (the row's int32 sums stay in registers or L1 across the
        # window), and the plane's epilogue right after its sums, while they are in cache.
        acc = sch.get_sblock("acc")
        nn, mm, yy, xx, rc, ry, rx = sch.get_loops(acc)
        xo, xi = sch.split(xx, [None, extra["vec"]])
        sch.reorder(nn, mm, yy, xo, rc, ry, rx, xi)
        sch.parallel(mm)  # (not fused with the batch: a symbolic one defeats compute_at)
        if extra["vec"] > 1:
            sch.vectorize(xi)
        sch.reverse_compute_at(out, mm)
        plane = mm
        # The padded copy's border filled with 0 apart, the image copied without conditions
        # or clamps (vectorized by LLVM; the conditional copy was a scalar loop), then at a
        # stride > 1 split by column phase.
        copies = ["xpad", "xs"] if extra["strided"] else ["xs"]
        if extra["depthwise"]:  # its one input plane, right before it is used
            for name in copies[::-1]:
                sch.compute_at(sch.get_sblock(name), plane)
        for name in copies:
            b = sch.get_sblock(name)
            if name == copies[0] and extra["xs_border"]:
                sch.decompose_padding(b, sch.get_loops(b)[2])
            if not extra["depthwise"]:
                sch.parallel(sch.fuse(*sch.get_loops(b)[:2]))
        return sch.mod["main"]
    if extra["px"]:
        return _schedule_px(sch, out, extra)
    if extra.get("nhwc") and extra["group"] == 1 and extra["mg"] % OC_BLOCK == 0:
        return _schedule_channel_lanes_fused(sch, out, extra)
    register_conv_vnni_intrin()
    row = _schedule_channel_lanes(sch, out, extra, OC_BLOCK, CONV_VNNI_INTRIN)
    _schedule_wsum(sch)
    _schedule_xq(sch, extra)
    if row is not None:
        return sch.mod["main"]
    if extra["xsum"]:
        b = sch.get_sblock("xsum")
        sch.parallel(sch.fuse(*sch.get_loops(b)[:3]))
    # The epilogue walks one output row at a time: the row's [ow, M] sums stay in cache
    # while the NCHW result is written channel by channel (NHWC: pixel by pixel).
    sch.parallel(_epilogue_rows(sch, out, extra))
    return sch.mod["main"]


def _lanes_dividing(channels: int, widest: int) -> int:
    """The widest vector of channels (a power of two up to ``widest``) that divides
    ``channels``: whole vectors, no tail."""
    lanes = widest
    while channels % lanes:
        lanes //= 2
    return lanes


def _epilogue_rows(sch, out, extra: dict):
    """The channel-lane epilogue's loops as (row, then the row's outputs): NCHW channel by
    channel; NHWC pixel by pixel, each pixel's channels in 16-lane vectors (contiguous sums,
    per-channel terms and result bytes). Returns the fused (batch, row) loop."""
    if extra.get("nhwc"):
        on, oy, ox, om = sch.get_loops(out)
        # (16 lanes, or 8 / 4 where the channels are not a multiple of 16: 24 -> 3 x 8;
        # AVX2's madd kernel 8)
        lanes = _lanes_dividing(extra["m"], extra.get("lanes", OC_BLOCK))
        if lanes > 1:
            sch.vectorize(sch.split(om, [None, lanes])[1])
    else:
        on, om, oy, ox = sch.get_loops(out)
        sch.reorder(on, oy, om, ox)
    return sch.fuse(on, oy)


def _schedule_channel_lanes(sch, out, extra: dict, oc_block: int, intrin: str):
    """The sums of channel lanes (the vnni and madd kernels): ``ow_block`` output columns x
    ``oc_block`` channels in registers over the whole window, tensorized with ``intrin``.
    Returns the epilogue's row loop where each output row's sums are computed inside it,
    else None."""
    blk = sch.get_sblock("sum")
    row = None
    if not extra["weights_outer"] and extra["mg"] % oc_block == 0:
        # (channels per group a multiple of the block: the epilogue then needs whole
        # blocks, which the intrinsic computes)
        # Each output row's sums right before its epilogue, inside the epilogue's row loop:
        # the row's [ow, M] int32 sums are still in cache when the epilogue reads them (a
        # separate pass over a whole image's sums went to memory and back: 4.8 MB for 96
        # channels at 112 x 112).
        row = _epilogue_rows(sch, out, extra)
        sch.parallel(row)
        sch.compute_at(blk, row, preserve_unit_loops=True)
        if extra.get("xsum"):
            sch.compute_at(sch.get_sblock("xsum"), row, preserve_unit_loops=True)
    loops = sch.get_loops(blk)
    if row is not None:  # (row, then the loops compute_at made: unit ones are kept)
        loops = loops[1:]
        if len(loops) != 10:
            raise RuntimeError(f"qconv schedule: unexpected loops after compute_at: {loops}")
    nn, g, yy, xx, mo, mi, ry, rx, rco, rci = loops
    if intrin == CONV_VNNI_INTRIN:  # columns x blocks of 16 channels in registers
        cols, blocks = register_tile(extra["ow"], -(-extra["mg"] // oc_block))
    else:  # madd: AVX2's 16 ymm registers hold one block's columns
        cols, blocks = ow_block(extra["ow"]), 1
    xo, xi = sch.split(xx, [None, cols])
    moo, moi = sch.split(mo, [None, blocks])
    if extra["weights_outer"]:
        # More weight than image bytes per group (deep layers, small images): one block of
        # output channels' weights stays in cache while it sweeps the whole image.
        sch.reorder(nn, g, moo, yy, xo, ry, rx, rco, xi, moi, mi, rci)
        sch.parallel(sch.fuse(nn, g, moo))
        reuse = xo
    else:
        # The image rows of one output row stay in cache while all weights sweep them.
        sch.reorder(nn, g, yy, xo, moo, ry, rx, rco, xi, moi, mi, rci)
        if row is None:
            sch.parallel(sch.fuse(nn, g, yy))
        reuse = moo
    # cols x blocks x oc_block sums stay in registers over the whole window, written back
    # once.
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, reuse)
    init = sch.decompose_reduction(blk, ry)
    sch.tensorize(mi, intrin)
    sch.unroll(xi)
    sch.unroll(moi)
    # (both blocks sit under `reuse`)
    for block in (init, acc):
        _registers_below(sch, block, reuse)
    return row


def _schedule_channel_lanes_fused(sch, out, extra: dict):
    """Channel lanes, channels-last, with the epilogue fused into the sums: each output row
    in parallel; per tile of ``register_tile`` columns x 16-channel blocks, the sums in
    registers over the whole window, then the tile's epilogue reading the accumulators
    themselves (no int32 row of sums stored and read back: a 1 x 1 layer of few input
    channels is mostly epilogue). One group, channels a multiple of 16. Where the image
    rows outweigh the weights, the rows are the outer (parallel) loop; else each block of
    output channels is, and its weights stay in cache while it sweeps the whole image."""
    register_conv_vnni_intrin(CONV_VNNI_STACK_INTRIN)
    blk = sch.get_sblock("sum")
    on, oy, ox, om = sch.get_loops(out)
    sums = STACK_ACCUMULATORS if extra["window"] < STACK_TILE_MAX_WINDOW else VNNI_ACCUMULATORS
    cols, blocks = register_tile(extra["ow"], extra["mg"] // OC_BLOCK, sums)
    oxo, oxi = sch.split(ox, [None, cols])
    omo, omi = sch.split(om, [None, blocks * OC_BLOCK])
    if extra["weights_outer"]:
        sch.reorder(on, omo, oy, oxo, oxi, omi)
        sch.parallel(sch.fuse(on, omo))
        tile = oxo
    else:
        sch.reorder(on, oy, oxo, omo, oxi, omi)
        row = sch.fuse(on, oy)
        sch.parallel(row)
        tile = omo
    sch.compute_at(blk, tile, preserve_unit_loops=True)
    if extra.get("xsum") and extra["weights_outer"]:  # (once, not per channel block)
        b = sch.get_sblock("xsum")
        sch.parallel(sch.fuse(*sch.get_loops(b)[:3]))
    elif extra.get("xsum"):
        sch.compute_at(sch.get_sblock("xsum"), row, preserve_unit_loops=True)
    # (three loops above the tile, then the block's own)
    nn, g, yy, xx, mo, mi, ry, rx, rco, rci = sch.get_loops(blk)[3:]
    sch.reorder(ry, rx, rco, nn, g, yy, xx, mo, mi, rci)
    acc = sch.cache_write(blk, 0, "global")   # (a stack array, kept in registers)
    sch.decompose_reduction(blk, ry)
    sch.tensorize(mi, CONV_VNNI_STACK_INTRIN)
    sch.unroll(xx)
    sch.unroll(mo)
    sch.compute_inline(acc)  # (the epilogue reads the accumulators themselves)
    _registers_below(sch, sch.get_sblock("sum_init"), tile)
    sch.unroll(oxi)
    sch.vectorize(sch.split(omi, [None, _lanes_dividing(blocks * OC_BLOCK, 64)])[1])
    _schedule_wsum(sch)
    _schedule_xq(sch, extra)
    return sch.mod["main"]


def _registers_below(sch, block, outer) -> None:
    """``block``'s loops below ``outer`` (its tile of accumulators) unrolled and its innermost
    (the lanes) vectorized: constant indices everywhere, so that LLVM keeps the tile in
    registers."""
    outer_var = sch.get(outer).loop_var
    loops = sch.get_loops(block)
    below = next(i for i, lp in enumerate(loops) if sch.get(lp).loop_var.same_as(outer_var)) + 1
    for lp in loops[below:-1]:
        sch.unroll(lp)
    sch.vectorize(loops[-1])


def _schedule_xq(sch, extra: dict):
    """The per-call repack of x, parallel over (batch, group, row). With a constant zero
    point: the border filled with it (a plain fill) and the image copied without conditions,
    4 channels (one vpdpbusd operand) per step, so that LLVM vectorizes the copy along the
    row (the conditional, clamped copy was a byte gather: two thirds of a 1 x 1 144 -> 24
    layer at 56 x 56)."""
    if extra.get("xq_direct"):  # (no repack: the sums read x)
        return
    b = sch.get_sblock("xq")
    loops = sch.get_loops(b)
    if extra.get("xq_const_pad"):
        if extra["xq_border"]:
            sch.decompose_padding(b, loops[3])
        inner = sch.get_loops(b)[3:]
        if extra["px"]:  # [.., c / 4, x, 4]: the 4 channels of a column interleaved
            sch.unroll(inner[-1])
        elif extra.get("nhwc"):  # [.., x, c] from NHWC rows: a plain copy along the row
            pass
        else:  # [.., x, c]: columns outer, then 4 channels of a column at a time
            xx, cc = inner
            co, ci = sch.split(cc, [None, IC_BLOCK])
            sch.reorder(co, xx, ci)
            sch.unroll(ci)
        loops = sch.get_loops(b)
    sch.parallel(sch.fuse(*loops[:3]))


def _schedule_wsum(sch):
    """The weight sums: 16 channels in one register over their whole window, with the
    packed weights times a vector of ones (vpdpbusd)."""
    register_conv_vnni_intrin()
    wblk = sch.get_sblock("wsum")
    wg, wmo, wmi, wy, wx, wco, wci = sch.get_loops(wblk)
    sch.reorder(wg, wmo, wy, wx, wco, wmi, wci)
    wacc = sch.cache_write(wblk, 0, "local")
    sch.reverse_compute_at(wacc, wmo)
    winit = sch.decompose_reduction(wblk, wy)
    sch.tensorize(wmi, CONV_VNNI_INTRIN)
    for block in (winit, wacc):
        sch.vectorize(sch.get_loops(block)[-1])


def _schedule_px(sch, out, extra: dict):
    """Pixel lanes: 16 output pixels of ``mb`` output channels in registers over the window,
    one vector load of activations per (tap, 4 channels) shared by the mb channels."""
    register_conv_vnni_px_intrin()
    _schedule_wsum(sch)
    blk = sch.get_sblock("sum")
    on, om, oy, ox = sch.get_loops(out)
    padded = extra["padded_rows"]
    in_rows = extra["ow"] % 16 == 0 or padded  # (else part of the last vector is read)
    if padded:
        # the epilogue over the padded width (outp), the result's copy of its row after it
        last = out
        out = sch.get_sblock("outp")
        on, om, oy, ox = sch.get_loops(out)
    if in_rows and extra["group"] == 1:
        return _schedule_px_fused(sch, out, last if padded else None, extra)
    if in_rows:
        # Each output row's sums inside the epilogue's row loop: they are read back from
        # cache (a batch of 8 at 112 x 112 x 96 has 39 MB of int32 sums; 144 x 56 x 56:
        # 16 MB, which took 3x its batch-1 time per image).
        sch.reorder(on, oy, om, ox)
        row = sch.fuse(on, oy)
        sch.parallel(row)
        sch.compute_at(blk, row, preserve_unit_loops=True)
        if extra["xsum"]:
            sch.compute_at(sch.get_sblock("xsum"), row, preserve_unit_loops=True)
        if padded:
            sch.reverse_compute_at(last, row)
        loops = sch.get_loops(blk)[1:]
        if len(loops) != 9:
            raise RuntimeError(f"qconv schedule: unexpected loops after compute_at: {loops}")
    else:
        sch.parallel(sch.fuse(on, om))
        loops = sch.get_loops(blk)
    nn, g, mr, yy, xx, ry, rx, rco, rci = loops
    mg = extra["mg"]
    mb = next(b for b in (8, 6, 4, 7, 5, 3, 2, 1) if mg % b == 0)
    mo, mi = sch.split(mr, [None, mb])
    xo, xi = sch.split(xx, [None, 16])
    sch.reorder(nn, g, yy, mo, xo, ry, rx, rco, mi, xi, rci)
    if not in_rows:
        sch.parallel(sch.fuse(nn, g, yy))
    acc = sch.cache_write(blk, 0, PX_ACC_SCOPE[CONV_VNNI_PX_INTRIN])
    sch.reverse_compute_at(acc, xo)
    init = sch.decompose_reduction(blk, ry)
    sch.tensorize(xi, CONV_VNNI_PX_INTRIN)
    sch.unroll(mi)
    for block in (init, acc):
        rows, lanes = sch.get_loops(block)[-2:]
        sch.unroll(rows)
        sch.vectorize(lanes)
    _schedule_xq(sch, extra)
    if extra["xsum"] and not in_rows:
        b = sch.get_sblock("xsum")
        sch.parallel(sch.fuse(*sch.get_loops(b)[:3]))
    return sch.mod["main"]


def _schedule_px_fused(sch, out, copy, extra: dict, intrin: str = CONV_VNNI_PX_INTRIN,
                       lanes: int = 16):
    """Pixel lanes with the epilogue fused into the sums: each block of mb channels x
    pv vectors of ``lanes`` pixels (pv > 1 on vnni) is computed right before its epilogue, which reads the accumulators
    themselves, so that no int32 sum goes to memory and back (one group; ``copy``: the
    result's copy of each padded row; ``intrin``: vpdpbusd's, or vpmaddwd's for madd)."""
    from tvm import tirx

    blk = sch.get_sblock("sum")
    mg = extra["mg"]
    mb = next(b for b in (8, 6, 4, 7, 5, 3, 2, 1) if mg % b == 0)
    on, om, oy, ox = sch.get_loops(out)
    omo, omi = sch.split(om, [None, mb])
    # vnni: pv vectors of pixels x mb channels in registers (a weight broadcast then serves
    # pv instructions: per 4 input channels pv + mb loads for pv * mb vpdpbusd)
    extent = sch.get(ox).extent
    vectors = int(extent) // lanes if isinstance(extent, tirx.IntImm) else 1
    pv = next(v for v in (4, 3, 2, 1) if vectors % v == 0 and (
        v * mb <= VNNI_ACCUMULATORS or v == 1)) if intrin == CONV_VNNI_PX_INTRIN else 1
    oxo, oxm, oxi = sch.split(ox, [None, pv, lanes])
    sch.reorder(on, oy, omo, oxo, omi, oxm, oxi)
    flat = extra.get("flat", False)
    # (a flat image is one row: its blocks of mb channels run in parallel, each with its
    # copy into the result)
    row = sch.fuse(on, oy, omo) if flat else sch.fuse(on, oy)
    sch.parallel(row)
    sch.compute_at(blk, oxo, preserve_unit_loops=True)
    if extra.get("xsum") and not flat:
        sch.compute_at(sch.get_sblock("xsum"), row, preserve_unit_loops=True)
    if copy is not None and flat:
        # The copy of the flat image into the NCHW result, under its channel block, over
        # one pixel loop: with its rows and columns apart, reverse_compute_at inferred 14 x
        # 12 pixels of a 14 x 14 image from the 208 padded ones (the last columns were not
        # copied).
        img_w = int(sch.get(sch.get_loops(copy)[3]).extent)
        sch.transform_block_layout(copy, lambda nn, mm, yy, xx: (nn, mm, yy * img_w + xx))
        sch.reverse_compute_at(copy, row)
        sch.vectorize(sch.split(sch.get_loops(copy)[-1], [None, 16])[1])
    elif copy is not None:
        sch.reverse_compute_at(copy, row)
    # (row, omo, oxo, then the block's own; omo is in row where flat)
    loops = sch.get_loops(blk)[2 if flat else 3:]
    if len(loops) != 9:
        raise RuntimeError(f"qconv schedule: unexpected loops after compute_at: {loops}")
    nn, g, mr, yy, xx, ry, rx, rco, rci = loops
    xxo, xxi = sch.split(xx, [None, lanes])
    sch.reorder(nn, g, yy, ry, rx, rco, mr, xxo, xxi, rci)
    acc = sch.cache_write(blk, 0, PX_ACC_SCOPE[intrin])   # (placed under oxo, after the sums)
    sch.decompose_reduction(blk, ry)
    sch.tensorize(xxi, intrin)
    sch.unroll(mr)
    sch.unroll(xxo)
    sch.compute_inline(acc)  # (the epilogue reads the accumulators themselves)
    init = sch.get_sblock("sum_init")
    _registers_below(sch, init, oxo)  # (the sums sit under oxo)
    sch.unroll(omi)
    sch.unroll(oxm)
    sch.vectorize(oxi)
    _schedule_xq(sch, extra)
    if extra.get("xsum") and flat:
        b = sch.get_sblock("xsum")
        sch.parallel(sch.fuse(*sch.get_loops(b)[:3]))
    return sch.mod["main"]
