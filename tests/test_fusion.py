"""Fusion: the elementwise body language, the fused ops and the four fusion passes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qcompiler.errors import InputError
from qcompiler.ir.elementwise_body import (
    Body, Stmt, evaluate, format_body, parse_body, result_element_type)
from qcompiler.ir.types import elem
from qcompiler.runtime import reference
from scipy.special import erf

RNG = np.random.default_rng


# --------------------------------------------------------------------------------------------
# the body language
# --------------------------------------------------------------------------------------------


def test_parse_format_round_trip():
    text = " t0 = add( x0 ,x1);t1=gelu<none>(t0) ; t2 = mul(t1, -3.4e+38); t3 = cast<f16>(t2);" \
           " return t3 "
    body = parse_body(text)
    assert body == Body((Stmt("t0", "add", None, ("x0", "x1")),
                         Stmt("t1", "gelu", "none", ("t0",)),
                         Stmt("t2", "mul", None, ("t1", -3.4e38)),
                         Stmt("t3", "cast", "f16", ("t2",))), "t3")
    canonical = format_body(body)
    assert canonical == ("t0 = add(x0, x1); t1 = gelu<none>(t0); t2 = mul(t1, -3.4e+38); "
                         "t3 = cast<f16>(t2); return t3")
    assert parse_body(canonical) == body
    assert body.operand_count() == 2


@pytest.mark.parametrize("text, words", [
    ("t0 = add(x0); return t0", "add takes 2"),
    ("t0 = frob(x0); return t0", "unknown op 'frob'"),
    ("t0 = add(x0, t1); return t0", "t1 used before"),
    ("t0 = relu(x0); t0 = relu(t0); return t0", "t0 defined twice"),
    ("t0 = relu(x0); return t1", "returns undefined t1"),
    ("t0 = relu(x0)", "needs at least one statement and a return"),
    ("t0 = relu(x0); t1 = relu(t0)", "must end with"),
    ("t0 = gelu(x0); return t0", "gelu needs"),
    ("t0 = cast<f99>(x0); return t0", "cast needs an element type"),
    ("t0 = relu<none>(x0); return t0", "relu takes no attribute"),
    ("t0 = add(x0, y); return t0", "bad argument 'y'"),
    ("t0 add(x0, x1); return t0", "cannot parse statement"),
])
def test_parse_errors_name_the_statement(text, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(")):
        parse_body(text)


def _gelu(v):
    return 0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))


def test_evaluate_matches_numpy_with_broadcasting():
    rng = RNG(1)
    x0 = rng.standard_normal((3, 5)).astype(np.float32)
    x1 = rng.standard_normal((5,)).astype(np.float32)
    y = evaluate("t0 = add(x0, x1); t1 = gelu<none>(t0); t2 = mul(t1, 0.5); return t2",
                 [x0, x1], np.float32)
    want = (_gelu((x0 + x1).astype(np.float64)).astype(np.float32) * np.float32(0.5))
    assert y.dtype == np.float32 and y.shape == (3, 5)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)


def test_evaluate_every_op_against_reference_nodes():
    """Each statement equals the QIR op of that name run by the reference interpreter."""
    rng = RNG(2)
    a = rng.standard_normal((4, 6)).astype(np.float32) + 0.1
    b = rng.uniform(0.5, 2.0, (4, 6)).astype(np.float32)
    pos = np.abs(a) + 0.5
    cases = {
        "add": (a + b), "sub": (a - b), "mul": (a * b), "div": (a / b),
        "max": np.maximum(a, b), "min": np.minimum(a, b), "pow": np.power(pos, b),
        "sqrt": np.sqrt(pos), "relu": np.maximum(a, 0), "tanh": np.tanh(a), "exp": np.exp(a),
        "neg": -a, "abs": np.abs(a), "reciprocal": 1 / a,
        "sigmoid": 1 / (1 + np.exp(-a.astype(np.float64))),
        "erf": erf(a.astype(np.float64)),
        "silu": a * (1 / (1 + np.exp(-a.astype(np.float64)))),
    }
    for op, want in cases.items():
        if op in ("pow", "sqrt"):
            args = "x0, x1" if op == "pow" else "x0"
            got = evaluate(f"t0 = {op}({args}); return t0", [pos, b], np.float32)
        else:
            args = ", ".join(["x0", "x1"][:2 if op in ("add", "sub", "mul", "div", "max", "min")
                                       else 1])
            got = evaluate(f"t0 = {op}({args}); return t0", [a, b], np.float32)
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=2e-6, atol=1e-7,
                                   err_msg=op)
    tanh_gelu = evaluate("t0 = gelu<tanh>(x0); return t0", [a], np.float32)
    v = a.astype(np.float64)
    want = 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    np.testing.assert_allclose(tanh_gelu, want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_evaluate_comparisons_where_cast_and_literal_types():
    rng = RNG(3)
    x = rng.standard_normal((2, 7)).astype(np.float16)
    mask = rng.random((2, 7)) > 0.5
    # A boolean mask turned into an additive one: literals without a float operand are f32.
    body = parse_body("t0 = where(x0, 0.0, -3.4e+38); return t0")
    assert result_element_type(body, [elem("bool")]) == elem("f32")
    y = evaluate(body, [mask], np.float32)
    np.testing.assert_array_equal(y, np.where(mask, 0, -3.4e38).astype(np.float32))
    # Comparisons give bool; cast converts; a literal next to an f16 operand is f16.
    y = evaluate("t0 = greater(x0, 0.25); t1 = cast<f16>(t0); t2 = mul(t1, x0); return t2",
                 [x], np.float16)
    np.testing.assert_array_equal(y, ((x > np.float16(0.25)).astype(np.float16) * x))
    body = parse_body("t0 = isnan(x0); t1 = and(t0, x1); return t1")
    assert result_element_type(body, [elem("f32"), elem("bool")]) == elem("bool")
    body = parse_body("t0 = cast<f32>(x0); t1 = add(t0, 1.0); return t1")
    assert result_element_type(body, [elem("f16")]) == elem("f32")


def test_evaluate_checks_operand_count():
    with pytest.raises(InputError, match="reads x2"):
        evaluate("t0 = add(x0, x2); return t0", [np.ones(2, np.float32)] * 2, np.float32)
