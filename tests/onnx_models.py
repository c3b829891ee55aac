"""ONNX model builders shared by the tests: one float MLP in every quantized format that
onnxruntime's own tools write, plus small helpers to run onnxruntime as the golden model.

The float MLP is examples/make_example_model.float_mlp (64 → 128 → 128 → 32, MatMul + Add +
Gelu, symbolic batch, fixed seed). Every builder returns an ``onnx.ModelProto`` stamped
``ir_version = 10``: onnx 1.23 writes IR 14, which onnxruntime 1.31 refuses
(/work/shared/notes/hls-onnx-cpu.md §0.3). Builders are deterministic and write only into
temporary directories (onnxruntime's static quantizer needs file paths).

    FORMATS["mnb4_b32_asym"].build()   # → ModelProto
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; opset 21 needs IR >= 10
SIZES = (64, 128, 128, 32)
N_LAYERS = len(SIZES) - 1


@functools.lru_cache(maxsize=None)
def _examples_module():
    path = os.path.join(ROOT, "examples", "make_example_model.py")
    spec = importlib.util.spec_from_file_location("qc_tests_make_example_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def float_mlp(act: str = "Gelu") -> onnx.ModelProto:
    """examples/make_example_model.float_mlp: x[batch, 64] → y[batch, 32], 3 layers."""
    m = _examples_module().float_mlp(SIZES, seed=0, act=act)
    m.ir_version = IR_VERSION
    return m


def _stamp(model: onnx.ModelProto) -> onnx.ModelProto:
    model.ir_version = IR_VERSION
    return model


def _quiet():
    """onnxruntime's MatMulNBits quantizer logs every node at INFO on its own handler."""
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# the formats
# --------------------------------------------------------------------------------------------


def matmul_nbits(bits: int = 4, block_size: int = 32, symmetric: bool = False
                 ) -> onnx.ModelProto:
    """com.microsoft MatMulNBits from onnxruntime's quantizer (accuracy_level 0: float math)."""
    _quiet()
    return _stamp(_examples_module().quantize_matmul_nbits(
        float_mlp(), bits=bits, block_size=block_size, symmetric=symmetric, accuracy_level=0))


def qdq_blocked_int4(symmetric: bool, block_size: int = 32) -> onnx.ModelProto:
    """Opset-21 DequantizeLinear(int4/uint4, axis 0, block_size) → MatMul (MatMulNBits tool)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    _quiet()
    cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                           quant_format=QuantFormat.QDQ, bits=4)
    q = mnq.MatMulNBitsQuantizer(float_mlp(), algo_config=cfg)
    q.process()
    return _stamp(q.model.model)


def calibration_reader(seed: int = 1, batches: int = 8, batch: int = 4):
    """A CalibrationDataReader over random N(0, 1) inputs (never zeros)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self._data = iter([{"x": rng.standard_normal((batch, SIZES[0])).astype(np.float32)}
                               for _ in range(batches)])

        def get_next(self):
            return next(self._data, None)

    return _Reader()


def _via_files(fn: Callable[[str, str], None]) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="qc_test_models_") as d:
        src, dst = os.path.join(d, "float.onnx"), os.path.join(d, "quant.onnx")
        onnx.save(float_mlp(), src)
        fn(src, dst)
        return _stamp(onnx.load(dst))


# onnxruntime as the golden model of the integer formats must be exact on every x86 host. On
# x86 without VNNI (Haswell, Zen 3: AVX2 only) its u8 x s8 integer matmul (MLAS, vpmaddubsw)
# adds pairs of u8*s8 products in saturating int16: 2 * 255 * 128 = 65280 > 32767, so results
# move by 0.05-0.16 on this MLP. Two configurations are exact everywhere, and each int8 format
# below uses one of them (both kinds of weights stay covered):
# - reduce_range=True: 7-bit signed weights, |w| <= 64, so a pair is at most 2 * 255 * 64 =
#   32640 (int16 holds it); keeps the i8 per-channel formats as onnxruntime writes them;
# - weight_type=QUInt8 (u8 x u8): MLAS widens both to int16 and sums in int32 (vpmaddwd).
# Tested under QEMU -cpu Haswell: the QInt8 full-range forms fail there, these pass.


def qdq_int8_static() -> onnx.ModelProto:
    """quantize_static(QDQ): u8 activations (per tensor), i8 weights per output channel
    (reduce_range: 7-bit codes, exact in onnxruntime on AVX2-only hosts)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    _quiet()
    return _via_files(lambda src, dst: quantize_static(
        src, dst, calibration_reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
        reduce_range=True))


def qoperator_int8() -> onnx.ModelProto:
    """quantize_static(QOperator): QLinearMatMul + com.microsoft QLinearAdd (the bias); u8
    activations and u8 weights with a zero point (u8 x u8: exact in onnxruntime everywhere)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    _quiet()
    return _via_files(lambda src, dst: quantize_static(
        src, dst, calibration_reader(), quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8))


def dynamic_int8(per_channel: bool) -> onnx.ModelProto:
    """quantize_dynamic: DynamicQuantizeLinear + MatMulInteger + Cast + Mul. Per tensor: u8
    weights with a zero point (u8 x u8); per channel: i8 weights with reduce_range (7-bit).
    Both are exact in onnxruntime on AVX2-only hosts."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet()
    if per_channel:
        return _via_files(lambda src, dst: quantize_dynamic(
            src, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True))
    return _via_files(lambda src, dst: quantize_dynamic(
        src, dst, weight_type=QuantType.QUInt8, per_channel=False))


@dataclass(frozen=True)
class Format:
    """One quantized form of the MLP and what the compiled qmatmuls must look like."""

    build: Callable[[], onnx.ModelProto]
    act: str                      # qmatmul act mode after fuse-dequant
    w_dtype: str                  # weight code type
    granularity: str              # tensor / channel / group
    block_size: Optional[int] = None
    onnx_ops: tuple = ()          # (domain:)op types the onnxruntime tool must have emitted
    ort_config: dict = field(default_factory=dict)  # extra session config entries


_QDQ_EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}  # notes §0.4

FORMATS: dict[str, Format] = {
    "mnb4_b32_asym": Format(functools.partial(matmul_nbits, 4, 32, False), "float", "u4",
                            "group", 32, ("com.microsoft:MatMulNBits",)),
    "mnb4_b128_sym": Format(functools.partial(matmul_nbits, 4, 128, True), "float", "i4",
                            "group", 128, ("com.microsoft:MatMulNBits",)),
    "mnb2_b32_asym": Format(functools.partial(matmul_nbits, 2, 32, False), "float", "u2",
                            "group", 32, ("com.microsoft:MatMulNBits",)),
    "mnb8_b32_asym": Format(functools.partial(matmul_nbits, 8, 32, False), "float", "u8",
                            "group", 32, ("com.microsoft:MatMulNBits",)),
    "qdq_int4_sym": Format(functools.partial(qdq_blocked_int4, True), "float", "i4", "group",
                           32, ("DequantizeLinear", "MatMul"), _QDQ_EXACT),
    "qdq_int4_asym": Format(functools.partial(qdq_blocked_int4, False), "float", "u4", "group",
                            32, ("DequantizeLinear", "MatMul"), _QDQ_EXACT),
    "qdq_int8_static": Format(qdq_int8_static, "static", "i8", "channel", None,
                              ("QuantizeLinear", "DequantizeLinear", "MatMul")),
    "qoperator_int8": Format(qoperator_int8, "static", "u8", "tensor", None,
                             ("QLinearMatMul", "com.microsoft:QLinearAdd")),
    "dynamic_int8": Format(functools.partial(dynamic_int8, False), "dynamic", "u8", "tensor",
                           None, ("DynamicQuantizeLinear", "MatMulInteger")),
    "dynamic_int8_per_channel": Format(functools.partial(dynamic_int8, True), "dynamic", "i8",
                                       "channel", None,
                                       ("DynamicQuantizeLinear", "MatMulInteger")),
}


def op_types(model: onnx.ModelProto) -> set[str]:
    return {(f"{n.domain}:" if n.domain not in ("", "ai.onnx") else "") + n.op_type
            for n in model.graph.node}


# --------------------------------------------------------------------------------------------
# onnxruntime as the golden model
# --------------------------------------------------------------------------------------------


def ort_session(model: onnx.ModelProto, config: Optional[dict] = None,
                extra_outputs: tuple = ()):
    """A CPU session; ``extra_outputs`` names intermediate values to fetch after the outputs."""
    import onnxruntime as ort

    if extra_outputs:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for name in extra_outputs:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        model = m
    so = ort.SessionOptions()
    # Many live sessions in one process must not keep spinning thread pools (notes §0.8).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
