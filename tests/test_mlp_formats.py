"""The same 3-layer MLP in every quantized ONNX format onnxruntime's tools write, compiled for
the ref target with its default pipeline and checked against onnxruntime.

Formats (tests/onnx_models.FORMATS): MatMulNBits 4-bit (block 32 asym, block 128 sym), 2-bit
and 8-bit; QDQ blocked int4 (sym/asym); QDQ int8 static per-channel; QOperator
(QLinearMatMul + com.microsoft QLinearAdd, imported as dequantize/add/quantize); dynamic int8
(per tensor / per channel). The integer formats use weights that onnxruntime multiplies exactly
on every x86 host (7-bit i8 or u8; tests/onnx_models.py says why), so the bounds below hold
with or without VNNI.

Tolerances (the arithmetic behind them):

- float-activation formats (MatMulNBits, QDQ int4; qmatmul act=float): both sides multiply
  the same f32 activations by the same real weights (code - zp) * scale, each dequantized
  value being one f32 rounding; what differs is the f32 summation order over K <= 128 (about
  sqrt(K) * 2^-24 relative) and Gelu's last ulp (onnxruntime approximates erf, the reference
  rounds a float64 result). Bound: max |dy| <= 1e-5 * max |y| (observed <= 5e-7, 20x margin).
- static int8 formats (QDQ int8, QOperator; act=static): every integer op is exact on both
  sides and the float steps are the same f32 operations, except Gelu's last ulp. An ulp can
  move a value across a rounding tie of the next QuantizeLinear and flip one activation
  code; one flipped code moves the next layer's pre-activation by s_act * |w| < one step of
  its output scale. Bound: max |dy| <= 2 * y_scale (two codes of the output
  DequantizeLinear's scale; observed 0 codes over 1000 random batches).
- dynamic int8 (act=dynamic): same argument; a flipped code of the last layer's input moves
  y[n] by x_scale_3 * |w_3[k, n]| <= x_scale_3 * max|W_3| =: step, where x_scale_3 is what
  the last DynamicQuantizeLinear computes at run time (fetched from onnxruntime) and W_3
  the dequantized last weight; flips in earlier layers reach y attenuated the same way.
  Bound: max |dy| <= 4 * step + 1e-5 * max |y| (observed: at most 2 steps in 3 of 1000
  random batches, 0 otherwise).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.driver.api import run_pipeline
from qcompiler.driver.artifact import MODULE_FILE, WEIGHTS_FILE, read_weights
from qcompiler.frontends.onnx import load
from qcompiler.ir.core import constant_value
from qcompiler.ir import parse_module, print_module
from qcompiler.runtime.reference import run
from qcompiler.targets import get_target

from onnx_models import FORMATS, IR_VERSION, N_LAYERS, SIZES, op_types, ort_session

DEFAULT_PIPELINE = get_target("ref").default_pipeline
FLOAT_RTOL = 1e-5
STATIC_CODES = 2
DYNAMIC_STEPS = 4


@pytest.fixture(scope="module", params=sorted(FORMATS))
def built(request, tmp_path_factory):
    """The model, saved as a file and compiled from that path for target ref."""
    name = request.param
    fmt = FORMATS[name]
    model = fmt.build()
    d = tmp_path_factory.mktemp(name)
    path = os.path.join(d, "model.onnx")
    onnx.save(model, path)
    out_dir = os.path.join(d, "artifact")
    compiled = qcompiler.compile(path, target="ref", output_dir=out_dir)
    return SimpleNamespace(name=name, fmt=fmt, model=model, path=path, out_dir=out_dir,
                           compiled=compiled)


def _round_trips(module) -> None:
    text = print_module(module)
    again = print_module(parse_module(text, module.constants))
    assert again == text


def test_onnxruntime_wrote_the_format(built):
    m = built.model
    assert m.ir_version == IR_VERSION
    ops = op_types(m)
    missing = set(built.fmt.onnx_ops) - ops
    assert not missing, f"{built.name}: the quantizer did not emit {missing} (got {ops})"
    if built.fmt.act == "float" and "com.microsoft:MatMulNBits" in built.fmt.onnx_ops:
        assert "MatMul" not in ops  # every MatMul was quantized


def test_final_ir_has_one_qmatmul_per_layer(built):
    assert built.compiled.manifest["pipeline"] == DEFAULT_PIPELINE
    with open(os.path.join(built.out_dir, MODULE_FILE)) as f:
        text = f.read()
    module = parse_module(text, read_weights(os.path.join(built.out_dir, WEIGHTS_FILE)))
    nodes = module.main.nodes
    qmms = [n for n in nodes if n.op == "qmatmul"]
    assert len(qmms) == N_LAYERS, [n.op for n in nodes]
    leftover = [n.op for n in nodes if n.op in ("matmul", "gemm", "matmul_integer",
                                                 "qlinear_matmul", "dynamic_quantize")]
    assert not leftover, f"{built.name}: unfused {leftover}"
    # No weight is dequantized at run time any more: every remaining dequantize reads
    # activations or a 1-D bias, never a constant [K, N] code tensor.
    for n in nodes:
        if n.op == "dequantize":
            x = n.operands[0]
            assert not (x.producer is not None and x.producer.op == "constant"
                        and x.type.rank == 2), f"weight dequantize left: {n}"
    fmt = built.fmt
    for i, q in enumerate(qmms):
        w = q.arg("w")
        assert w.producer is not None and w.producer.op == "constant"
        assert w.type.shape == (SIZES[i], SIZES[i + 1])
        scheme = q.attrs["w_scheme"]
        assert q.attrs["act"] == fmt.act
        assert scheme.dtype.name == fmt.w_dtype
        assert scheme.granularity == fmt.granularity
        if fmt.granularity == "group":
            assert (scheme.axis, scheme.block_size) == (0, fmt.block_size)
        elif fmt.granularity == "channel":
            assert scheme.axis == 1


def _last_dynamic_step(model: onnx.ModelProto) -> tuple[str, float]:
    """(name of the last DynamicQuantizeLinear's scale output, max |dequantized W_3|)."""
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dql = [n for n in g.node if n.op_type == "DynamicQuantizeLinear"][-1]
    mmi = next(n for n in g.node if n.op_type == "MatMulInteger" and n.input[0] == dql.output[0])
    wq = inits[mmi.input[1]].astype(np.float64)
    if len(mmi.input) > 3 and mmi.input[3]:
        wq = wq - inits[mmi.input[3]].astype(np.float64)
    smul = next(n for n in g.node if n.op_type == "Mul" and dql.output[1] in n.input)
    w_scale = inits[next(i for i in smul.input if i != dql.output[1])].astype(np.float64)
    return dql.output[1], float(np.max(np.abs(wq) * w_scale))


def _output_scale(model: onnx.ModelProto) -> float:
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dq = next(n for n in g.node if g.output[0].name in n.output)
    assert dq.op_type == "DequantizeLinear", dq.op_type
    return float(inits[dq.input[1]])


# i8 weights at most this large keep onnxruntime's u8 x s8 int16 pair sums (vpmaddubsw on
# AVX2-only hosts) from saturating: 2 * 255 * 64 = 32640 <= 32767.
MAX_EXACT_I8_CODE = 64


@pytest.mark.parametrize("name", sorted(n for n, f in FORMATS.items() if f.act != "float"))
def test_integer_formats_are_exact_in_onnxruntime_on_every_x86(name):
    """The premise of the integer bounds below on hosts without VNNI: every weight code is u8
    (u8 x u8 widens to int16 in onnxruntime) or an i8 code within 7 bits (reduce_range)."""
    fmt = FORMATS[name]
    module, _, _ = run_pipeline(load(fmt.build()), DEFAULT_PIPELINE)
    qmms = [n for n in module.main.nodes if n.op == "qmatmul"]
    assert len(qmms) == N_LAYERS
    for q in qmms:
        codes = constant_value(module, q.arg("w"))
        dtype = q.attrs["w_scheme"].dtype.name
        assert dtype == fmt.w_dtype and dtype in ("u8", "i8"), (name, dtype)
        if dtype == "i8":
            assert int(np.abs(codes.astype(np.int32)).max()) <= MAX_EXACT_I8_CODE, name


@pytest.mark.parametrize("batch", [1, 5])
def test_matches_onnxruntime(built, batch):
    fmt = built.fmt
    rng = np.random.default_rng(1000 + batch)
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    y = built.compiled.run({"x": x})["y"]
    extra = ()
    if fmt.act == "dynamic":
        scale_name, w_max = _last_dynamic_step(built.model)
        extra = (scale_name,)
    outs = ort_session(built.model, fmt.ort_config, extra).run(None, {"x": x})
    want = outs[0]
    assert y.shape == want.shape == (batch, SIZES[-1]) and y.dtype == want.dtype == np.float32
    err = float(np.max(np.abs(y.astype(np.float64) - want)))
    ymax = float(np.max(np.abs(want)))
    assert ymax > 0.1  # a real signal, not an all-zero output
    if fmt.act == "float":
        bound = FLOAT_RTOL * ymax
    elif fmt.act == "static":
        bound = STATIC_CODES * _output_scale(built.model)
    else:
        step = float(outs[1]) * w_max
        bound = DYNAMIC_STEPS * step + FLOAT_RTOL * ymax
    assert err <= bound, (f"{built.name} batch {batch}: max |dy| = {err:.3g} > {bound:.3g} "
                          f"(max |y| = {ymax:.3g})")


def test_ir_round_trips(built):
    imported = load(built.path)
    _round_trips(imported)
    final, _, _ = run_pipeline(imported, DEFAULT_PIPELINE, verify_each=True)
    _round_trips(final)
    assert sum(n.op == "qmatmul" for n in final.main.nodes) == N_LAYERS
    # What the artifact stores reads back to the same text.
    with open(os.path.join(built.out_dir, MODULE_FILE)) as f:
        text = f.read()
    weights = read_weights(os.path.join(built.out_dir, WEIGHTS_FILE))
    assert print_module(parse_module(text, weights)) == text
    assert print_module(final) == text


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_add_matches_onnxruntime(dtype):
    """com.microsoft QLinearAdd alone (imported as dequantize, add, quantize), with a
    broadcast [N] operand as the QOperator MLP's bias. onnxruntime folds the scale ratios
    A_scale/C_scale and B_scale/C_scale into one float expression before rounding, we
    dequantize, add and divide: the real sums agree to a few ulps, so a code may differ by
    one where the sum lies at a rounding tie, never more."""
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    elem = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    a = rng.integers(info.min, info.max + 1, size=(6, 32), dtype=dtype)
    inits = [numpy_helper.from_array(v, n) for v, n in [
        (np.array(0.0213, np.float32), "a_s"), (np.array(7, dtype), "a_zp"),
        (rng.integers(info.min, info.max + 1, size=32, dtype=dtype), "b"),
        (np.array(0.0071, np.float32), "b_s"), (np.array(-3 if dtype == np.int8 else 131, dtype),
                                                "b_zp"),
        (np.array(0.0342, np.float32), "c_s"), (np.array(5, dtype), "c_zp")]]
    node = helper.make_node("QLinearAdd", ["a", "a_s", "a_zp", "b", "b_s", "b_zp", "c_s", "c_zp"],
                            ["c"], name="qadd0", domain="com.microsoft")
    graph = helper.make_graph([node], "qadd", [helper.make_tensor_value_info("a", elem, [6, 32])],
                              [helper.make_tensor_value_info("c", elem, [6, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = IR_VERSION
    module = load(model)
    assert [n.op for n in module.main.nodes if n.op != "constant"] == \
        ["dequantize", "dequantize", "add", "quantize"]
    _round_trips(module)
    got = run(module, {"a": a})["c"]
    want = ort_session(model).run(None, {"a": a})[0]
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.95, (diff.max(), np.mean(diff == 0))
