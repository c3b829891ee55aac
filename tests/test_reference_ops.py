"""The reference interpreter against independent expectations.

Each test builds a one-node QIR function (its result types from the op's own type inference,
the module verified) and compares ``reference.run`` with onnx.reference's ReferenceEvaluator
on the equivalent single-node ONNX model, or with explicit numpy for the ops ONNX lacks.
Integer outputs are compared exactly; float outputs with tolerances that fit the arithmetic.
"""
from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qcompiler.ir.core import Function, Module, constant_node, constant_value
from qcompiler.ir.ops import OPS, infer_types
from qcompiler.ir.types import NF4_LEVELS, QuantScheme, elem, elem_from_numpy, tensor
from qcompiler.ir.verifier import verify
from qcompiler.runtime import numerics, reference

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class Arg:
    """A function argument, fed at run time. ``dtype`` names a low-bit type for the codes."""

    def __init__(self, name, array, dtype=None):
        self.name, self.array, self.dtype = name, np.asarray(array), dtype


class Const:
    """A ``constant`` node operand."""

    def __init__(self, array, dtype=None):
        self.array, self.dtype = np.asarray(array), dtype


def _type_of(array, dtype):
    et = elem(dtype) if dtype is not None else elem_from_numpy(array.dtype)
    return tensor(array.shape, et)


def build(op, operands, attrs=None, n_results=None):
    """A verified one-node module computing ``op`` on ``operands``; returns (module, feeds)."""
    attrs = attrs or {}
    m = Module()
    fn = m.add_function(Function("main"))
    values, consts, feeds = [], [], {}
    for o in operands:
        if o is None:
            values.append(None)
            consts.append(None)
        elif isinstance(o, Arg):
            values.append(fn.add_arg(o.name, _type_of(o.array, o.dtype)))
            consts.append(None)
            feeds[o.name] = o.array
        else:
            node = constant_node(fn, m, o.array, _type_of(o.array, o.dtype))
            values.append(node.result)
            consts.append(constant_value(m, node.result))
    types = [v.type if v is not None else None for v in values]
    result_types = infer_types(op, types, attrs, consts)
    if n_results is not None:
        assert len(result_types) == n_results
    names = [f"y{i}" for i in range(len(result_types))]
    node = fn.make_node(op, values, result_types, attrs, names=names)
    fn.set_outputs(node.results, [f"y{i}" for i in range(len(node.results))])
    verify(m)
    return m, feeds


def run_op(op, operands, attrs=None):
    """Run a one-node QIR function; returns the list of its results."""
    m, feeds = build(op, operands, attrs)
    out = reference.run(m, feeds)
    results = [out[f"y{i}"] for i in range(len(out))]
    for r, y in zip(m.main.nodes[-1].results, results):
        assert y.dtype == r.type.dtype.np_dtype, (r, y.dtype)
    return results


def onnx_run(op_type, inputs, n_outputs=1, opset=21, **attrs):
    """onnx.reference on a single ``op_type`` node; ``inputs`` is a list of arrays or None."""
    names, feeds, infos = [], {}, []
    for i, x in enumerate(inputs):
        if x is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        feeds[name] = x
        infos.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape))
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, **attrs)
    graph = helper.make_graph([node], "g", infos, [
        helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)


def rng_for(seed):
    """A generator seeded by an int or, stably across runs, by any repr-able key."""
    if not isinstance(seed, int):
        seed = zlib.crc32(repr(seed).encode())
    return np.random.default_rng(seed)


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def codes(rng, shape, et):
    lo, hi = elem(et).int_range()
    return rng.integers(lo, hi + 1, size=shape).astype(elem(et).np_dtype)


_ML = {"i4": ml_dtypes.int4, "u4": ml_dtypes.uint4, "i2": ml_dtypes.int2,
       "u2": ml_dtypes.uint2}


def to_onnx_codes(a, et):
    """Our unpacked low-bit codes as the ml_dtypes array onnx.reference expects."""
    return a.astype(_ML[et]) if et in _ML else a


def scheme(dtype, zp=None, granularity="tensor", axis=None, block=None, **kw):
    return QuantScheme(elem(dtype), symmetric=zp is None,
                       zero_point_type=elem(zp) if zp else None, granularity=granularity,
                       axis=axis, block_size=block, **kw)


# --------------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------------


def test_every_op_has_an_implementation():
    assert set(reference.OP_IMPLS) == set(OPS)


# --------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------


def test_saturate_cast_sub_byte_integers():
    x = np.array([-9.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 100.0, np.nan], np.float32)
    assert numerics.saturate_cast(x, "i4").tolist() == [-8, -2, -2, 0, 0, 2, 2, 4, 7, 0]
    assert numerics.saturate_cast(x, "u2").tolist() == [0, 0, 0, 0, 0, 2, 2, 3, 3, 0]
    assert numerics.saturate_cast(x, "i3").tolist() == [-4, -2, -2, 0, 0, 2, 2, 3, 3, 0]
    assert numerics.saturate_cast(x, "ternary").tolist() == [-1, -1, -1, 0, 0, 1, 1, 1, 1, 0]
    assert numerics.saturate_cast(np.array([70000, -5], np.int32), "u16").tolist() == [65535, 0]
    assert numerics.saturate_cast(x, "i4").dtype == np.int8


def test_saturate_cast_float8_matches_onnx_helper():
    x = np.array([0.1, 1, 448, 500, 1e4, -1e4, np.inf, -np.inf, np.nan], np.float32)
    for et, dt in [("f8e4m3fn", ml_dtypes.float8_e4m3fn), ("f8e5m2", ml_dtypes.float8_e5m2),
                   ("f8e4m3fnuz", ml_dtypes.float8_e4m3fnuz)]:
        want = onnx.numpy_helper.saturate_cast(x, dt)
        got = numerics.saturate_cast(x, et, saturate=1)
        assert got.dtype == dt
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    sat0 = numerics.saturate_cast(x, "f8e4m3fn", saturate=0).astype(np.float32)
    assert sat0[2] == 448 and np.isnan(sat0[3:]).all()
    big = np.array([1e5, -1e5], np.float32)  # beyond e5m2's 57344
    assert numerics.saturate_cast(big, "f8e5m2", saturate=0).astype(np.float32).tolist() \
        == [np.inf, -np.inf]
    assert numerics.saturate_cast(big, "f8e5m2").astype(np.float32).tolist() == [57344, -57344]


def test_expand_scale_group_ragged_and_act_order():
    rng = rng_for(1)
    s = randn(rng, 3, 2)
    sch = scheme("i4", granularity="group", axis=0, block=4)
    e = numerics.expand_scale(s, (10, 2), sch)
    np.testing.assert_array_equal(e, s[np.arange(10) // 4])
    g_idx = rng.permutation(np.arange(10) // 4).astype(np.int32)
    e = numerics.expand_scale(s, (10, 2), sch.replace(act_order=True), g_idx)
    np.testing.assert_array_equal(e, s[g_idx])
    with pytest.raises(ValueError, match="groups"):
        numerics.expand_scale(randn(rng, 2, 2), (10, 2), sch)


# --------------------------------------------------------------------------------------------
# dequantize / quantize vs onnx.reference (opset 21)
# --------------------------------------------------------------------------------------------

DQ_CASES = [
    # (code type, zero-point type, shape, granularity, axis, block, scale dtype)
    ("i4", None, (40, 6), "group", 0, 16, np.float32),      # ragged K=40, 3 blocks
    ("u4", "u4", (40, 6), "group", 0, 16, np.float32),
    ("i4", None, (6, 40), "group", 1, 16, np.float32),      # [N, K] layout
    ("u8", "u8", (5, 7), "channel", 1, None, np.float32),
    ("i8", "i8", (5, 7), "channel", 0, None, np.float32),
    ("i8", None, (5, 7), "tensor", None, None, np.float16),  # fp16 scale -> fp16 out
    ("u16", "u16", (4, 9), "tensor", None, None, np.float32),
    ("i16", "i16", (4, 9), "channel", 1, None, np.float32),
    ("u8", "u8", (4, 9), "tensor", None, None, ml_dtypes.bfloat16),  # bf16 scale -> bf16
]


@pytest.mark.parametrize("case", DQ_CASES, ids=lambda c: f"{c[0]}-{c[3]}-{c[4]}")
def test_dequantize_matches_onnx(case):
    et, zpt, shape, gran, axis, block, sdt = case
    rng = rng_for(case)
    sch = scheme(et, zpt, gran, axis, block)
    x = codes(rng, shape, et)
    sshape = sch.scale_shape(shape)
    scale = (rng.uniform(0.01, 0.2, size=sshape)).astype(sdt)
    zp = codes(rng, sshape, zpt) if zpt else None
    operands = [Arg("x", x, et), Const(scale), Const(zp, zpt) if zpt else None]
    (y,) = run_op("dequantize", operands, {"scheme": sch, "out": elem_from_numpy(sdt)})
    attrs = {"axis": axis} if axis is not None else {}
    if block:
        attrs["block_size"] = block
    onnx_in = [to_onnx_codes(x, et), scale] + ([to_onnx_codes(zp, zpt)] if zpt else [])
    (want,) = onnx_run("DequantizeLinear", onnx_in, **attrs)
    assert y.dtype == want.dtype
    np.testing.assert_array_equal(y, want)


Q_CASES = [
    ("i4", None, (40, 6), "group", 0, 16),
    ("u4", "u4", (40, 6), "group", 0, 16),
    ("u8", "u8", (5, 7), "channel", 1, None),
    ("i8", "i8", (5, 7), "channel", 0, None),
    ("u8", "u8", (3, 8), "tensor", None, None),
    ("i16", None, (3, 8), "tensor", None, None),
    ("u16", "u16", (3, 8), "tensor", None, None),
]


@pytest.mark.parametrize("case", Q_CASES, ids=lambda c: f"{c[0]}-{c[3]}-{c[4]}")
def test_quantize_matches_onnx(case):
    et, zpt, shape, gran, axis, block = case
    rng = rng_for(case)
    sch = scheme(et, zpt, gran, axis, block)
    sshape = sch.scale_shape(shape)
    scale = rng.uniform(0.05, 0.3, size=sshape).astype(np.float32)
    # Mostly in range, some far out (saturation), some exact .5 ties (round half to even).
    x = randn(rng, *shape) * 2.0
    x.flat[::5] = (rng.integers(-40, 40, size=x.flat[::5].shape) + 0.5) \
        * np.broadcast_to(numerics.expand_scale(scale, shape, sch), shape).flat[::5]
    zp = codes(rng, sshape, zpt) if zpt else None
    operands = [Arg("x", x), Const(scale), Const(zp, zpt) if zpt else None]
    (y,) = run_op("quantize", operands, {"scheme": sch})
    attrs = {"axis": axis} if axis is not None else {}
    if block:
        attrs["block_size"] = block
    if zpt is None:
        attrs["output_dtype"] = {"i4": TensorProto.INT4, "i16": TensorProto.INT16}[et]
    onnx_in = [x, scale] + ([to_onnx_codes(zp, zpt)] if zpt else [])
    (want,) = onnx_run("QuantizeLinear", onnx_in, **attrs)
    np.testing.assert_array_equal(y, want.astype(y.dtype))


@pytest.mark.parametrize("et,tp", [("f8e4m3fn", TensorProto.FLOAT8E4M3FN),
                                   ("f8e5m2", TensorProto.FLOAT8E5M2)])
@pytest.mark.parametrize("saturate", [1, 0])
def test_quantize_float8_saturate_matches_onnx(et, tp, saturate):
    rng = rng_for(7 + saturate)
    x = np.concatenate([randn(rng, 20) * 100,
                        np.array([448, 500, 1e4, -1e4, 6e4, 1e6, np.inf, np.nan], np.float32)])
    scale = np.array(1.5, np.float32)
    (y,) = run_op("quantize", [Arg("x", x), Const(scale)],
                  {"scheme": scheme(et), "saturate": saturate})
    zp = np.zeros((), dtype=elem(et).np_dtype)
    (want,) = onnx_run("QuantizeLinear", [x, scale, zp], saturate=saturate)
    assert y.dtype == want.dtype
    np.testing.assert_array_equal(y.astype(np.float32), want.astype(np.float32))
    # ...and back: DequantizeLinear of float8 codes.
    (dq,) = run_op("dequantize", [Arg("c", y), Const(scale)],
                   {"scheme": scheme(et), "out": elem("f32")})
    (want_dq,) = onnx_run("DequantizeLinear", [y, scale])
    np.testing.assert_array_equal(dq, want_dq)


@pytest.mark.parametrize("et,tp,opset", [("i2", TensorProto.INT2, 25),
                                          ("f4e2m1", TensorProto.FLOAT4E2M1, 23)])
def test_quantize_int2_and_float4_match_onnx(et, tp, opset):
    rng = rng_for(et)
    x = np.concatenate([randn(rng, 30) * 3, np.array([20.0, -20.0], np.float32)])
    scale = np.array(0.7, np.float32)
    (y,) = run_op("quantize", [Arg("x", x), Const(scale)], {"scheme": scheme(et)})
    (want,) = onnx_run("QuantizeLinear", [x, scale], opset=opset, output_dtype=tp)
    np.testing.assert_array_equal(y.astype(np.float32), want.astype(np.float32))
    (dq,) = run_op("dequantize", [Arg("c", y, et), Const(scale)],
                   {"scheme": scheme(et), "out": elem("f32")})
    (want_dq,) = onnx_run("DequantizeLinear", [want, scale], opset=opset)
    np.testing.assert_array_equal(dq, want_dq)


def test_dynamic_quantize_matches_onnx():
    rng = rng_for(11)
    for x in [randn(rng, 4, 33) * 3, np.abs(randn(rng, 50)) + 0.5, -np.abs(randn(rng, 7))]:
        got = run_op("dynamic_quantize", [Arg("x", x)])
        want = onnx_run("DynamicQuantizeLinear", [x], n_outputs=3, opset=11)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


def test_dequantize_nf4_and_ternary():
    rng = rng_for(12)
    K, N, B = 96, 5, 64  # ragged: the second block has 32 rows
    c = codes(rng, (K, N), "nf4")
    s = rng.uniform(0.5, 2.0, size=(2, N)).astype(np.float32)
    sch = scheme("nf4", granularity="group", axis=0, block=B)
    (y,) = run_op("dequantize", [Arg("c", c, "nf4"), Const(s)], {"scheme": sch,
                                                               "out": elem("f32")})
    want = NF4_LEVELS[c] * s[np.arange(K) // B]
    np.testing.assert_array_equal(y, want)

    t = codes(rng, (8, 3), "ternary")
    st = rng.uniform(0.5, 2.0, size=(3,)).astype(np.float32)
    sch = scheme("ternary", granularity="channel", axis=1)
    (y,) = run_op("dequantize", [Arg("t", t, "ternary"), Const(st)],
                  {"scheme": sch, "out": elem("f16")})
    np.testing.assert_array_equal(y, (t.astype(np.float32) * st).astype(np.float16))
    # quantize back recovers the ternary codes exactly
    (q,) = run_op("quantize", [Arg("x", y.astype(np.float32)), Const(st)], {"scheme": sch})
    np.testing.assert_array_equal(q, t)


def test_dequantize_implied_zero_point():
    rng = rng_for(13)
    c = codes(rng, (32, 4), "u4")
    s = rng.uniform(0.1, 1.0, size=(2, 4)).astype(np.float32)
    sch = QuantScheme(elem("u4"), granularity="group", axis=0, block_size=16,
                      implied_zero_point=8)
    (y,) = run_op("dequantize", [Arg("c", c, "u4"), Const(s)], {"scheme": sch,
                                                              "out": elem("f32")})
    np.testing.assert_array_equal(y, (c.astype(np.float32) - 8) * s[np.arange(32) // 16])


# --------------------------------------------------------------------------------------------
# integer matmuls
# --------------------------------------------------------------------------------------------


def test_matmul_integer_matches_onnx():
    rng = rng_for(21)
    a = codes(rng, (5, 12), "u8")
    b = codes(rng, (12, 7), "i8")
    a_zp = np.array(131, np.uint8)
    b_zp = codes(rng, (7,), "i8")
    (y,) = run_op("matmul_integer", [Arg("a", a), Arg("b", b), Const(a_zp), Const(b_zp)])
    (want,) = onnx_run("MatMulInteger", [a, b, a_zp, b_zp], opset=10)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, want)
    # A per-row a zero point [M] (ONNX spec) means [M, 1] to onnx.reference.
    a_zp_rows = codes(rng, (5,), "u8")
    (y,) = run_op("matmul_integer", [Arg("a", a), Arg("b", b), Const(a_zp_rows), None])
    (want,) = onnx_run("MatMulInteger", [a, b, a_zp_rows.reshape(5, 1)], opset=10)
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("dt", ["u8", "i8"])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("per_column", [False, True])
def test_qlinear_matmul_matches_onnx(dt, batched, per_column):
    rng = rng_for(22 + batched * 2 + per_column)
    a = codes(rng, (2, 4, 16) if batched else (4, 16), dt)
    b = codes(rng, (16, 6), dt)
    a_s = np.array(rng.uniform(0.01, 0.05), np.float32)
    b_s = rng.uniform(0.01, 0.05, size=(6,) if per_column else ()).astype(np.float32)
    y_s = np.array(rng.uniform(0.05, 0.2), np.float32)
    zps = [codes(rng, (), dt) for _ in range(3)]
    b_zp = codes(rng, (6,), dt) if per_column else zps[1]
    args = [a, a_s, zps[0], b, b_s, b_zp, y_s, zps[2]]
    ops = [Arg("a", a)] + [Const(v) for v in args[1:3]] + [Arg("b", b)] \
        + [Const(v) for v in args[4:]]
    (y,) = run_op("qlinear_matmul", ops)
    (want,) = onnx_run("QLinearMatMul", args)
    assert y.dtype == want.dtype
    np.testing.assert_array_equal(y, want)


# --------------------------------------------------------------------------------------------
# qmatmul
# --------------------------------------------------------------------------------------------


def explicit_dequant(w, s, zp, block, g_idx=None, implied=None):
    """(w[k, n] - zp[g(k), n]) * s[g(k), n] with g(k) = k // block or g_idx[k], by indexing."""
    K = w.shape[0]
    g = np.arange(K) // block if g_idx is None else np.asarray(g_idx)
    z = zp[g].astype(np.float32) if zp is not None else np.float32(implied or 0)
    return (w.astype(np.float32) - z) * s[g]


QM_FLOAT_CASES = [
    # (name, code type, affine, K, N, block, act_order, implied zp)
    ("u4-affine-g32-ragged", "u4", True, 80, 12, 32, False, None),
    ("i4-sym-g16", "i4", False, 64, 8, 16, False, None),
    ("u4-act-order", "u4", True, 64, 8, 16, True, None),
    ("u4-implied-zp8", "u4", False, 48, 8, 16, False, 8),
    ("i8-sym-g128-short", "i8", False, 40, 8, 128, False, None),
]


@pytest.mark.parametrize("case", QM_FLOAT_CASES, ids=lambda c: c[0])
def test_qmatmul_float_group(case):
    _, et, affine, K, N, B, act_order, implied = case
    rng = rng_for(case[0])
    groups = -(-K // B)
    w = codes(rng, (K, N), et)
    s = rng.uniform(0.01, 0.1, size=(groups, N)).astype(np.float32)
    zp = codes(rng, (groups, N), et) if affine else None
    g_idx = rng.permutation(np.arange(K) // B).astype(np.int32) if act_order else None
    sch = QuantScheme(elem(et), symmetric=not affine, zero_point_type=elem(et) if affine else None,
                      granularity="group", axis=0, block_size=B, act_order=act_order,
                      implied_zero_point=implied)
    x = randn(rng, 3, K)
    bias = randn(rng, N)
    ops = [Arg("x", x), Const(w, et), Const(s), Const(zp, et) if affine else None,
           Const(g_idx) if act_order else None, None, None, Const(bias)]
    (y,) = run_op("qmatmul", ops, {"w_scheme": sch, "act": "float"})
    want = x @ explicit_dequant(w, s, zp, B, g_idx, implied) + bias
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_qmatmul_float_per_channel_f16():
    rng = rng_for(31)
    K, N = 24, 10
    w = codes(rng, (K, N), "i8")
    s = rng.uniform(0.01, 0.05, size=(N,)).astype(np.float32)
    sch = scheme("i8", granularity="channel", axis=1)
    x = randn(rng, 2, 5, K, dtype=np.float16)
    (y,) = run_op("qmatmul", [Arg("x", x), Const(w, "i8"), Const(s)],
                  {"w_scheme": sch, "act": "float"})
    wf = (w.astype(np.float32) * s).astype(np.float16).astype(np.float32)
    want = (x.astype(np.float32) @ wf).astype(np.float16)
    assert y.dtype == np.float16 and y.shape == (2, 5, N)
    np.testing.assert_allclose(y.astype(np.float32), want.astype(np.float32), rtol=1e-3)


def _onnx_dynamic_qmatmul(x, w, w_s, w_zp, bias, evaluator="onnx"):
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_s * w_s) -> Add, as
    onnxruntime.quantization.quantize_dynamic builds it."""
    T = TensorProto
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
        helper.make_node("MatMulInteger", ["xq", "w", "xzp", "wzp"], ["acc"]),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT),
        helper.make_node("Mul", ["accf", "s"], ["yb"]),
        helper.make_node("Add", ["yb", "bias"], ["y"]),
    ]
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in
             [("w", w), ("ws", w_s), ("wzp", w_zp), ("bias", bias)]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if evaluator == "onnx":
        return ReferenceEvaluator(model).run(None, {"x": x})[0]
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("evaluator", ["onnx", "ort"])
def test_qmatmul_dynamic_matches_composed_onnx(per_column, evaluator):
    rng = rng_for(41 + per_column)
    K, N = 32, 9
    x = randn(rng, 6, K) * 2
    if per_column:
        w = codes(rng, (K, N), "i8")
        if evaluator == "ort":
            # onnxruntime on x86 without VNNI (AVX2: vpmaddubsw) sums pairs of u8 x s8
            # products in saturating int16; 7-bit weights (what quantize_dynamic writes with
            # reduce_range) keep every pair <= 2 * 255 * 64 = 32640, exact on every host.
            # onnx.reference keeps the full i8 range.
            w = (w // 2).astype(np.int8)
        w_s = rng.uniform(0.01, 0.05, size=(N,)).astype(np.float32)
        w_zp = np.zeros((N,), np.int8)
        sch = scheme("i8", granularity="channel", axis=1)
        ops_zp = None
    else:
        w = codes(rng, (K, N), "u8")
        w_s = np.array(0.02, np.float32)
        w_zp = np.array(121, np.uint8)
        sch = scheme("u8", "u8")
        ops_zp = Const(w_zp)
    bias = randn(rng, N)
    ops = [Arg("x", x), Const(w), Const(w_s), ops_zp, None, None, None, Const(bias)]
    attrs = {"w_scheme": sch, "act": "dynamic", "x_scheme": scheme("u8", "u8")}
    (y,) = run_op("qmatmul", ops, attrs)
    want = _onnx_dynamic_qmatmul(x, w, w_s, w_zp, bias, evaluator)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_qmatmul_static():
    rng = rng_for(51)
    K, N = 20, 7
    xq = codes(rng, (3, K), "u8")
    x_s, x_zp = np.array(0.05, np.float32), np.array(100, np.uint8)
    w = codes(rng, (K, N), "i8")
    w_s = rng.uniform(0.01, 0.05, size=(N,)).astype(np.float32)
    w_zp = codes(rng, (N,), "i8")
    sch = scheme("i8", "i8", granularity="channel", axis=1)
    ops = [Arg("xq", xq), Const(w), Const(w_s), Const(w_zp), None, Const(x_s), Const(x_zp)]
    attrs = {"w_scheme": sch, "act": "static", "x_scheme": scheme("u8", "u8")}
    (y,) = run_op("qmatmul", ops, attrs)
    acc = (xq.astype(np.int64) - 100) @ (w.astype(np.int64) - w_zp)
    np.testing.assert_allclose(y, acc.astype(np.float32) * (x_s * w_s), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# float and shape ops vs onnx.reference
# --------------------------------------------------------------------------------------------


def _compare(got, want, exact=False):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape,
                                                                  got.dtype, want.dtype)
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=2e-6, atol=2e-6)


UNARY = [("sqrt", "Sqrt"), ("erf", "Erf"), ("relu", "Relu"), ("sigmoid", "Sigmoid"),
         ("tanh", "Tanh"), ("exp", "Exp"), ("neg", "Neg"), ("abs", "Abs"),
         ("reciprocal", "Reciprocal")]


@pytest.mark.parametrize("op,onnx_op", UNARY)
def test_unary_matches_onnx(op, onnx_op):
    rng = rng_for(op)
    x = randn(rng, 3, 17) * 3
    if op == "sqrt":
        x = np.abs(x)
    (y,) = run_op(op, [Arg("x", x)])
    (want,) = onnx_run(onnx_op, [x], opset=13)
    _compare(y, want, exact=op not in ("sigmoid", "tanh", "exp"))


BINARY = [("add", "Add"), ("sub", "Sub"), ("mul", "Mul"), ("div", "Div"), ("max", "Max"),
          ("min", "Min"), ("pow", "Pow"), ("equal", "Equal")]


@pytest.mark.parametrize("op,onnx_op", BINARY)
def test_binary_matches_onnx(op, onnx_op):
    rng = rng_for(op)
    a, b = randn(rng, 4, 5), randn(rng, 5)
    if op == "pow":
        a = np.abs(a)
    if op == "equal":
        b = a[1].copy()
    (y,) = run_op(op, [Arg("a", a), Arg("b", b)])
    (want,) = onnx_run(onnx_op, [a, b], opset=14)
    _compare(y, want, exact=op != "pow")


def test_integer_div_truncates_toward_zero():
    rng = rng_for(61)
    a = rng.integers(-50, 50, size=(6, 4)).astype(np.int32)
    b = rng.choice([-7, -3, 2, 5], size=(4,)).astype(np.int32)
    (y,) = run_op("div", [Arg("a", a), Arg("b", b)])
    (want,) = onnx_run("Div", [a, b], opset=14)
    _compare(y, want, exact=True)


def test_where_and_expand_match_onnx():
    rng = rng_for(62)
    c = rng.random((3, 1)) > 0.5
    x, y_ = randn(rng, 3, 4), randn(rng, 4)
    (y,) = run_op("where", [Arg("c", c), Arg("x", x), Arg("y", y_)])
    _compare(y, onnx_run("Where", [c, x, y_], opset=16)[0], exact=True)
    shape = np.array([2, 1, 4], np.int64)
    (y,) = run_op("expand", [Arg("x", x), Const(shape)])
    _compare(y, onnx_run("Expand", [x, shape], opset=13)[0], exact=True)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_onnx(approximate):
    rng = rng_for(63)
    x = randn(rng, 4, 9) * 3
    (y,) = run_op("gelu", [Arg("x", x)], {"approximate": approximate})
    (want,) = onnx_run("Gelu", [x], opset=20, approximate=approximate)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    v = x.astype(np.float64)
    if approximate == "none":
        erf = np.vectorize(__import__("math").erf)
        exact = 0.5 * v * (1 + erf(v / np.sqrt(2)))
        np.testing.assert_array_equal(y, exact.astype(np.float32))


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_matches_onnx(axis):
    rng = rng_for(64)
    x = randn(rng, 2, 5, 7) * 4
    (y,) = run_op("softmax", [Arg("x", x)], {"axis": axis})
    _compare(y, onnx_run("Softmax", [x], opset=13, axis=axis)[0])


@pytest.mark.parametrize("axis", [-1, 1])
def test_layernorm_matches_onnx(axis):
    rng = rng_for(65)
    x = randn(rng, 2, 3, 8) * 2 + 1
    norm_shape = x.shape[axis % 3:]
    scale, bias = randn(rng, *norm_shape), randn(rng, *norm_shape)
    attrs = {"axis": axis, "epsilon": 1e-5}
    (y,) = run_op("layernorm", [Arg("x", x), Const(scale), Const(bias)], attrs)
    (want,) = onnx_run("LayerNormalization", [x, scale, bias], opset=17, **attrs)
    _compare(y, want)
    (y,) = run_op("layernorm", [Arg("x", x), Const(scale)], attrs)
    (want,) = onnx_run("LayerNormalization", [x, scale], opset=17, **attrs)
    _compare(y, want)


@pytest.mark.parametrize("axes,keepdims,noop", [([1], 1, 0), ([0, -1], 0, 0), ([], 1, 0),
                                                ([], 0, 1)])
def test_reduce_mean_matches_onnx(axes, keepdims, noop):
    rng = rng_for(66)
    x = randn(rng, 3, 4, 5)
    attrs = {"axes": axes, "keepdims": keepdims, "noop_with_empty_axes": noop}
    (y,) = run_op("reduce_mean", [Arg("x", x)], attrs)
    onnx_in = [x, np.array(axes, np.int64)] if axes else [x]
    (want,) = onnx_run("ReduceMean", onnx_in, opset=18, keepdims=keepdims,
                       noop_with_empty_axes=noop)
    _compare(y, want)


@pytest.mark.parametrize("target,allowzero", [([0, -1], 0), ([-1, 5], 0), ([2, 0, 10], 1),
                                              ([4, 0, 5], 0)])
def test_reshape_matches_onnx(target, allowzero):
    rng = rng_for(67)
    x = randn(rng, 4, 3, 5)
    if allowzero:
        x = randn(rng, 2, 0, 5)
    shape = np.array(target, np.int64)
    (y,) = run_op("reshape", [Arg("x", x), Const(shape)], {"allowzero": allowzero})
    (want,) = onnx_run("Reshape", [x, shape], opset=14, allowzero=allowzero)
    _compare(y, want, exact=True)


SLICES = [
    ([1], [-1], None, None),
    ([-3, 0], [100, -2], [1, 0], None),
    ([10, -1], [-100, 0], [2, 1], [-1, -2]),   # clamped, negative steps
    ([0], [2**62], [-1], [2]),
]


@pytest.mark.parametrize("starts,ends,axes,steps", SLICES)
def test_slice_matches_onnx(starts, ends, axes, steps):
    rng = rng_for(68)
    x = randn(rng, 6, 7, 4)
    arrs = [np.array(v, np.int64) if v is not None else None for v in (starts, ends, axes, steps)]
    ops = [Arg("x", x)] + [Const(a) if a is not None else None for a in arrs]
    (y,) = run_op("slice", ops)
    onnx_in = [x] + arrs
    while onnx_in[-1] is None:
        onnx_in.pop()
    (want,) = onnx_run("Slice", onnx_in, opset=13)
    _compare(y, want, exact=True)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_matches_onnx(axis):
    rng = rng_for(69)
    x = randn(rng, 5, 6, 3)
    dim = x.shape[axis]
    idx = rng.integers(-dim, dim, size=(2, 4)).astype(np.int64)
    (y,) = run_op("gather", [Arg("x", x), Arg("i", idx)], {"axis": axis})
    _compare(y, onnx_run("Gather", [x, idx], opset=13, axis=axis)[0], exact=True)


def test_shape_plumbing_ops_match_onnx():
    rng = rng_for(70)
    x = randn(rng, 2, 1, 6)
    (y,) = run_op("transpose", [Arg("x", x)], {"perm": [2, 0, 1]})
    _compare(y, onnx_run("Transpose", [x], opset=13, perm=[2, 0, 1])[0], exact=True)
    z = randn(rng, 2, 3, 6)
    (y,) = run_op("concat", [Arg("x", x), Arg("z", z)], {"axis": 1})
    _compare(y, onnx_run("Concat", [x, z], opset=13, axis=1)[0], exact=True)
    ys = run_op("split", [Arg("z", z)], {"axis": -1, "sizes": [1, 2, 3]})
    wants = onnx_run("Split", [z, np.array([1, 2, 3], np.int64)], n_outputs=3, opset=13,
                     axis=-1)
    for g, w in zip(ys, wants):
        _compare(g, w, exact=True)
    (y,) = run_op("unsqueeze", [Arg("x", x)], {"axes": [0, -1]})
    _compare(y, onnx_run("Unsqueeze", [x, np.array([0, -1], np.int64)], opset=13)[0], True)
    (y,) = run_op("squeeze", [Arg("x", x)], {"axes": []})
    _compare(y, onnx_run("Squeeze", [x], opset=13)[0], exact=True)
    (y,) = run_op("shape", [Arg("x", x)], {"start": 1, "end": -1})
    _compare(y, onnx_run("Shape", [x], opset=15, start=1, end=-1)[0], exact=True)
    (y,) = run_op("identity", [Arg("x", x)])
    _compare(y, x, exact=True)


def test_matmul_and_gemm_match_onnx():
    rng = rng_for(71)
    a, b = randn(rng, 2, 3, 8), randn(rng, 8, 5)
    (y,) = run_op("matmul", [Arg("a", a), Arg("b", b)])
    _compare(y, onnx_run("MatMul", [a, b], opset=13)[0])
    a2, b2, c = randn(rng, 8, 3), randn(rng, 5, 8), randn(rng, 5)
    attrs = {"alpha": 0.5, "beta": 2.0, "trans_a": 1, "trans_b": 1}
    (y,) = run_op("gemm", [Arg("a", a2), Arg("b", b2), Arg("c", c)], attrs)
    (want,) = onnx_run("Gemm", [a2, b2, c], opset=13, alpha=0.5, beta=2.0, transA=1, transB=1)
    _compare(y, want)


CASTS = [("f16", TensorProto.FLOAT16, {}), ("bf16", TensorProto.BFLOAT16, {}),
         ("i8", TensorProto.INT8, {}), ("i32", TensorProto.INT32, {}),
         ("f8e4m3fn", TensorProto.FLOAT8E4M3FN, {"saturate": 1}),
         ("f8e4m3fn", TensorProto.FLOAT8E4M3FN, {"saturate": 0}),
         ("f8e5m2", TensorProto.FLOAT8E5M2, {"saturate": 0})]


@pytest.mark.parametrize("to,tp,attrs", CASTS, ids=lambda c: str(c))
def test_cast_matches_onnx(to, tp, attrs):
    rng = rng_for(72)
    x = randn(rng, 4, 6) * 40  # in int8 range, so float->int is defined in ONNX
    if to.startswith("f8"):
        x = np.concatenate([x.ravel(), np.array([500, 1e5, -np.inf, np.nan], np.float32)])
    (y,) = run_op("cast", [Arg("x", x)], {"to": elem(to), **attrs})
    (want,) = onnx_run("Cast", [x], opset=21, to=tp, **attrs)
    assert y.dtype == want.dtype
    np.testing.assert_array_equal(y.astype(np.float32), want.astype(np.float32))


def test_cast_integer_edges():
    x = np.array([300.7, -300.7, np.nan, -2.9, 2.9], np.float32)
    (y,) = run_op("cast", [Arg("x", x)], {"to": elem("i8")})
    assert y.tolist() == [127, -128, 0, -2, 2]  # saturating where ONNX is undefined
    w = np.array([9, -9, 20, 7], np.int8)
    (y,) = run_op("cast", [Arg("w", w)], {"to": elem("i4")})
    assert y.tolist() == w.astype(ml_dtypes.int4).astype(np.int8).tolist()  # wraps


# --------------------------------------------------------------------------------------------
# the interpreter: graphs, freeing, errors
# --------------------------------------------------------------------------------------------


def _two_layer_module():
    """t = x @ w (w in the side table); out = relu(t) + t: t is used twice and is an output."""
    m = Module()
    fn = m.add_function(Function("main"))
    x = fn.add_arg("x", tensor(["batch", 6], "f32"))
    w = constant_node(fn, m, np.arange(36, dtype=np.float32).reshape(6, 6) / 10 - 1, name_hint="w")
    t = fn.make_node("matmul", [x, w.result], [tensor(["batch", 6], "f32")], names=["t"])
    r = fn.make_node("relu", [t.result], [tensor(["batch", 6], "f32")], names=["r"])
    s = fn.make_node("add", [r.result, t.result], [tensor(["batch", 6], "f32")], names=["s"])
    fn.set_outputs([s.result, t.result], ["out", "t"])
    verify(m)
    return m


def test_graph_with_shared_values_and_symbolic_batch():
    rng = rng_for(81)
    m = _two_layer_module()
    w = m.constants["w"]
    for batch in (1, 3):
        x = randn(rng, batch, 6)
        out = reference.run(m, {"x": x})
        t = x @ w
        np.testing.assert_array_equal(out["t"], t)
        np.testing.assert_array_equal(out["out"], np.maximum(t, 0) + t)


def test_input_errors_name_the_input():
    m = _two_layer_module()
    good = np.ones((2, 6), np.float32)
    with pytest.raises(ValueError, match="missing \\['x'\\].*unknown \\['y'\\]"):
        reference.run(m, {"y": good})
    with pytest.raises(ValueError, match="%x.*f32.*float64"):
        reference.run(m, {"x": good.astype(np.float64)})
    with pytest.raises(ValueError, match="%x.*shape"):
        reference.run(m, {"x": np.ones((2, 5), np.float32)})
    with pytest.raises(ValueError, match="%x.*rank"):
        reference.run(m, {"x": np.ones((6,), np.float32)})


def test_low_bit_input_range_is_checked():
    m, feeds = build("dequantize", [Arg("c", np.array([1, 2, 3], np.uint8), "u2"),
                                    Const(np.array(0.5, np.float32))],
                     {"scheme": scheme("u2"), "out": elem("f32")})
    assert reference.run(m, feeds)["y0"].tolist() == [0.5, 1.0, 1.5]
    with pytest.raises(ValueError, match="%c.*u2"):
        reference.run(m, {"c": np.array([1, 4, 3], np.uint8)})


def test_op_failure_is_a_runtime_error_naming_the_node():
    rng = rng_for(82)
    x = randn(rng, 5, 3)
    m, _ = build("gather", [Arg("x", x), Arg("i", np.array([1, 2], np.int64))], {"axis": 0})
    with pytest.raises(RuntimeError, match="%y0 = gather"):
        reference.run(m, {"x": x, "i": np.array([1, 7], np.int64)})
