"""QIR: element types, schemes, printer/parser round trip, verifier."""
import os

import numpy as np
import pytest

from qcompiler.ir import (ELEMENT_TYPES, OPS, Function, Layout, Module, ParseError, QuantScheme,
                          VerificationError, constant_node, elem, parse_module, print_module,
                          tensor, verify)

HERE = os.path.dirname(os.path.abspath(__file__))
ALL_OPS = os.path.join(HERE, "ir", "all_ops.qir")


def roundtrip(module, constants=None):
    text = print_module(module)
    again = print_module(parse_module(text, constants))
    assert again == text
    return text


def test_element_types_cover_the_literature():
    for name in ["i2", "i3", "i4", "u4", "i8", "u8", "f8e4m3fn", "f8e5m2", "f4e2m1", "nf4",
                 "ternary", "f16", "bf16", "f32", "i32"]:
        assert name in ELEMENT_TYPES
    assert elem("i4").int_range() == (-8, 7)
    assert elem("u3").int_range() == (0, 7)
    assert elem("ternary").int_range() == (-1, 1)
    with pytest.raises(ValueError, match="unknown element type 'int4'"):
        elem("int4")


def test_quant_scheme_validation_and_text():
    s = QuantScheme(elem("u4"), symmetric=False, zero_point_type=elem("u4"),
                    granularity="group", axis=0, block_size=128, act_order=True)
    assert str(s) == ("#quant<u4, affine, per_group(axis=0, block=128), scale=f32, zp=u4, "
                      "act_order>")
    assert s.scale_shape((4096, 11008)) == ("?", 11008)
    assert s.replace(act_order=False).scale_shape((300, 8)) == (3, 8)
    assert QuantScheme(elem("i8"), granularity="channel", axis=1).scale_shape((4, 6)) == (6,)
    with pytest.raises(ValueError, match="block size"):
        QuantScheme(elem("i4"), granularity="group", axis=0)
    with pytest.raises(ValueError, match="zero-point type"):
        QuantScheme(elem("u4"), symmetric=False)
    with pytest.raises(ValueError, match="act-order"):
        QuantScheme(elem("i4"), act_order=True)


def test_every_op_roundtrips_and_verifies():
    with open(ALL_OPS) as f:
        module = parse_module(f.read())
    verify(module)
    assert {n.op for n in module.main.nodes} == set(OPS)
    text = roundtrip(module)
    assert '%"odd name/0"' in text
    assert "act_order>" in text


def test_layout_and_symbolic_types_roundtrip():
    fn = Function("main")
    lay = Layout.make("mma_m16n8k16", interleave=[0, 2, 4, 6, 1, 3, 5, 7], n=64, k_tile=16)
    x = fn.add_arg("x", tensor(["batch", "seq", 64], "bf16"))
    w = fn.add_arg("w", tensor([32, 64], "u4", layout=lay))
    fn.set_outputs([x, w], ["x_out", "w_out"])
    m = Module("types")
    m.add_function(fn)
    text = roundtrip(m)
    assert "#layout<mma_m16n8k16, interleave=[0, 2, 4, 6, 1, 3, 5, 7], k_tile=16, n=64>" in text
    assert "tensor<[batch, seq, 64], bf16>" in text


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "i64", "u4", "i8", "bool"])
def test_inline_constants_roundtrip_exactly(dtype):
    rng = np.random.default_rng(3)
    t = elem(dtype)
    if t.is_float:
        arr = rng.standard_normal((2, 3)).astype(t.np_dtype)
    elif dtype == "bool":
        arr = rng.integers(0, 2, (2, 3)).astype(bool)
    else:
        lo, hi = (0, 15) if dtype == "u4" else (-100, 100)
        arr = rng.integers(lo, hi, (2, 3)).astype(t.np_dtype)
    m = Module("c")
    fn = m.add_function(Function("main"))
    node = constant_node(fn, m, arr, tensor([2, 3], dtype))
    fn.set_outputs([node.result], ["c"])
    verify(m)
    back = parse_module(roundtrip(m))
    got = back.main.nodes[0].attrs["value"]
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr)


def test_large_constants_live_in_the_side_table():
    m = Module("c")
    fn = m.add_function(Function("main"))
    arr = np.arange(1000, dtype=np.float32)
    node = constant_node(fn, m, arr, name_hint="big.weight")
    fn.set_outputs([node.result], ["c"])
    text = print_module(m)
    assert 'name = "big.weight"' in text and "999" not in text
    back = parse_module(text, m.constants)
    np.testing.assert_array_equal(back.constants["big.weight"], arr)
    with pytest.raises(ParseError, match="missing from the weights"):
        parse_module(text, {})


@pytest.mark.parametrize("text, message", [
    ("module @m {\n  func @main() -> () {\n    %0 = frobnicate() : tensor<[], f32>\n"
     "    return\n  }\n}\n", "line 3.*unknown op 'frobnicate'"),
    ("module @m {\n  func @main() -> (\"y\": tensor<[], f32>) {\n    return %nope\n  }\n}\n",
     "line 3.*undefined value %nope"),
    ("module @m {\n  func @main(%x: tensor<[2], int4>) -> () {\n    return\n  }\n}\n",
     "unknown element type 'int4'"),
    ("module @m {\n  func @main() -> () {\n    return\n  }\n", "expected"),
])
def test_parse_errors_name_the_place(text, message):
    with pytest.raises(ParseError, match=message):
        parse_module(text)


def _fn_with(op_text: str) -> str:
    return ("module @m {\n  func @main(%x: tensor<[2, 8], f32>, %w: tensor<[8, 4], u4>, "
            "%s: tensor<[1, 4], f32>) -> (\"y\": tensor<[2, 4], f32>) {\n"
            f"    {op_text}\n    return %y\n  }}\n}}\n")


@pytest.mark.parametrize("op_text, message", [
    ("%y = matmul(%x, %x) : tensor<[2, 4], f32>", "inner dims differ"),
    ("%y = relu(%x) : tensor<[2, 4], f32>", "result %y is"),
    ("%y = softmax(%x) : tensor<[2, 8], f32>", "missing attribute 'axis'"),
    ("%y = dequantize(%w, %x, none) {out = f32, scheme = #quant<u4, symmetric, "
     "per_group(axis=0, block=4), scale=f32>} : tensor<[8, 4], f32>", "scale shape"),
    ("%y = qmatmul(%x, %w, %s, none, none, none, none, none) {act = \"float\", "
     "w_scheme = #quant<i4, symmetric, per_group(axis=0, block=8), scale=f32>} "
     ": tensor<[2, 4], f32>", "weight codes are u4"),
])
def test_verifier_rejects(op_text, message):
    module = parse_module(_fn_with(op_text))
    with pytest.raises(VerificationError, match=message):
        verify(module)


def test_verifier_checks_constant_code_range():
    m = Module("c")
    fn = m.add_function(Function("main"))
    node = constant_node(fn, m, np.full((4, 8), 9, np.int8), tensor([4, 8], "i4"))
    fn.set_outputs([node.result], ["c"])
    with pytest.raises(VerificationError, match="outside the i4 range"):
        verify(m)
