"""Concats in place (``lower(..., concat_in_place=True)``, qcompiler/plan/lower.py): each operand's
producer writes straight into its slice of the concat's result, and the concat has no step.

Checked against the reference interpreter over a poisoned arena (0xFF: NaN in floats), so a
slice written at the wrong place, or a buffer placed over a live slice, shows up. The result
is a graph output in one module (the stacked KV cache of a decode step is one) and an arena
buffer read by later steps in another; the cases the rewrite must refuse keep their step.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from qcompiler.ir import parse_module
from qcompiler.plan import (PlanExecutor, format_plan, liveness, lower, plan_from_json,
                            plan_to_json)
from qcompiler.runtime import reference
from test_plan import _check_plan_sane

# Three layers' results stacked into an output, each also read after the stack.
STACKED_OUTPUT = """
module @stack {
  func @main(%x: tensor<[n, 16], f32>, %y: tensor<[n, 16], f32>) -> ("s": tensor<[3, n, 16], f32>, "m": tensor<[n, 16], f32>) {
    %a = tanh(%x) : tensor<[n, 16], f32>
    %b = exp(%y) : tensor<[n, 16], f32>
    %c = add(%a, %b) : tensor<[n, 16], f32>
    %ua = unsqueeze(%a) {axes = [0]} : tensor<[1, n, 16], f32>
    %ub = unsqueeze(%b) {axes = [0]} : tensor<[1, n, 16], f32>
    %uc = unsqueeze(%c) {axes = [0]} : tensor<[1, n, 16], f32>
    %s = concat(%ua, %ub, %uc) {axis = 0} : tensor<[3, n, 16], f32>
    %m = mul(%a, %c) : tensor<[n, 16], f32>
    return %s, %m
  }
}
"""

# The concat's result is an intermediate, read by a reduction and by an elementwise op, while
# a slice of it is read last by another elementwise op of the slice's size.
ARENA_RESULT = """
module @rows {
  func @main(%x: tensor<[n, 16], f32>) -> ("r": tensor<[n, 16], f32>, "t": tensor<[n, 16], f32>, "q": tensor<[3, n, 16], f32>, "p": tensor<[n, 16], f32>) {
    %a = tanh(%x) : tensor<[n, 16], f32>
    %b = exp(%x) : tensor<[n, 16], f32>
    %c = sigmoid(%a) : tensor<[n, 16], f32>
    %d = neg(%c) : tensor<[n, 16], f32>
    %ua = unsqueeze(%a) {axes = [0]} : tensor<[1, n, 16], f32>
    %ub = unsqueeze(%b) {axes = [0]} : tensor<[1, n, 16], f32>
    %ud = unsqueeze(%d) {axes = [0]} : tensor<[1, n, 16], f32>
    %s = concat(%ua, %ub, %ud) {axis = 0} : tensor<[3, n, 16], f32>
    %r = reduce_sum(%s) {axes = [0], keepdims = 0} : tensor<[n, 16], f32>
    %t = neg(%a) : tensor<[n, 16], f32>
    %q = relu(%s) : tensor<[3, n, 16], f32>
    %p = sigmoid(%b) : tensor<[n, 16], f32>
    return %r, %t, %q, %p
  }
}
"""

# A concat along axis 1 of [n, ...] operands: n rows before the axis, so no operand is one
# block of the result.
AXIS_1 = """
module @m {
  func @main(%x: tensor<[n, 16], f32>) -> ("s": tensor<[n, 32], f32>) {
    %a = tanh(%x) : tensor<[n, 16], f32>
    %b = exp(%x) : tensor<[n, 16], f32>
    %s = concat(%a, %b) {axis = 1} : tensor<[n, 32], f32>
    return %s
  }
}
"""

INPUT_OPERAND = """
module @m {
  func @main(%x: tensor<[n, 16], f32>) -> ("s": tensor<[2, n, 16], f32>) {
    %a = tanh(%x) : tensor<[n, 16], f32>
    %ua = unsqueeze(%a) {axes = [0]} : tensor<[1, n, 16], f32>
    %ux = unsqueeze(%x) {axes = [0]} : tensor<[1, n, 16], f32>
    %s = concat(%ua, %ux) {axis = 0} : tensor<[2, n, 16], f32>
    return %s
  }
}
"""

UNALIGNED = """
module @m {
  func @main(%x: tensor<[n, 3], f32>) -> ("s": tensor<[2, n, 3], f32>) {
    %a = tanh(%x) : tensor<[n, 3], f32>
    %b = exp(%x) : tensor<[n, 3], f32>
    %ua = unsqueeze(%a) {axes = [0]} : tensor<[1, n, 3], f32>
    %ub = unsqueeze(%b) {axes = [0]} : tensor<[1, n, 3], f32>
    %s = concat(%ua, %ub) {axis = 0} : tensor<[2, n, 3], f32>
    return %s
  }
}
"""

TWICE = """
module @m {
  func @main(%x: tensor<[n, 16], f32>) -> ("s": tensor<[2, n, 16], f32>) {
    %a = tanh(%x) : tensor<[n, 16], f32>
    %ua = unsqueeze(%a) {axes = [0]} : tensor<[1, n, 16], f32>
    %s = concat(%ua, %ua) {axis = 0} : tensor<[2, n, 16], f32>
    return %s
  }
}
"""


def _check(module, plan, feeds_list):
    ex = PlanExecutor(plan, module)
    ex.poison_byte = 0xFF
    for feeds in feeds_list:
        want = reference.run(module, feeds)
        got = ex.run(feeds)
        again = ex.run(feeds)  # the cached call list, over the re-poisoned arena
        for name in want:
            assert got[name].shape == want[name].shape, name
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6,
                                       err_msg=name)
            np.testing.assert_array_equal(again[name], got[name])


def _feeds(rng, n, names=("x", "y")):
    return {k: rng.standard_normal((n, 16)).astype(np.float32) for k in names}


def test_a_stacked_output_is_written_by_its_producers():
    module = parse_module(STACKED_OUTPUT)
    plan = lower(module, {"n": [4]}, concat_in_place=True)
    assert "concat" not in [s.op for s in plan.steps]
    a, b, c = (plan.buffers[k] for k in "abc")
    assert (a.kind, a.alias_of, a.offset_of) == ("view", "s", ())
    assert (b.alias_of, b.offset_of) == ("s", ("ua",))
    assert (c.alias_of, c.offset_of) == ("s", ("ua", "ub"))
    assert plan.buffers["uc"].alias_of == "s" and plan.buffers["uc"].offset_of == ("ua", "ub")
    text = format_plan(plan, {"n": 4})
    assert "= tanh(%x (input))  %a into %s at its start" in text
    assert "into %s after %ua, %ub" in text
    rng = np.random.default_rng(1)
    # within the bucket, at it, and beyond it (planned per size class)
    with pytest.warns(RuntimeWarning, match="exceed every shape bucket"):
        _check(module, plan, [_feeds(rng, n) for n in (1, 3, 4, 13)])
    # the default keeps the concat
    assert "concat" in [s.op for s in lower(module, {"n": [4]}).steps]


def test_an_intermediate_result_lives_from_its_first_slice():
    module = parse_module(ARENA_RESULT)
    plan = lower(module, {"n": [2, 8]}, concat_in_place=True)
    assert "concat" not in [s.op for s in plan.steps]
    assert plan.buffers["s"].kind == "arena"
    assert {plan.buffers[k].alias_of for k in "abd"} == {"s"}
    first, last = liveness(plan)["s"]
    order = [s.outputs[0] for s in plan.steps]
    assert first == order.index("a") == 0 and last == order.index("p")
    # sigmoid(b), the last read of a slice, must not take over the result's slot (its
    # offset 0 is not b's)
    mem = plan.bucket({"n": 8})
    assert "p" not in mem.inplace
    # no two buffers live at once overlap; the peak is within the live bytes' bounds
    _check_plan_sane(plan)
    rng = np.random.default_rng(2)
    _check(module, plan, [_feeds(rng, n, ("x",)) for n in (1, 2, 5, 8)])


@pytest.mark.parametrize("why,module_text", [
    ("dims before the axis", AXIS_1),
    ("an operand is a graph input", INPUT_OPERAND),
    ("a slice off a 64-byte boundary", UNALIGNED),
    ("one operand twice", TWICE),
])
def test_concats_that_cannot_be_written_in_place_keep_their_step(why, module_text):
    module = parse_module(module_text)
    plan = lower(module, {"n": [4]}, concat_in_place=True)
    assert "concat" in [s.op for s in plan.steps], why
    assert not any(plan.buffers[n].alias_of for s in plan.steps if s.kind == "kernel"
                   for n in s.outputs), why
    rng = np.random.default_rng(3)
    width = module.main.args[0].type.shape[1]
    _check(module, plan, [{"x": rng.standard_normal((n, width)).astype(np.float32)}
                          for n in (1, 4)])


def test_slices_survive_the_json_round_trip():
    module = parse_module(STACKED_OUTPUT)
    plan = lower(module, {"n": [4]}, concat_in_place=True)
    data = json.loads(json.dumps(plan_to_json(plan)))
    back = plan_from_json(data)
    assert plan_to_json(back) == data
    assert back.buffers["c"].offset_of == ("ua", "ub")
    _check(module, back, [_feeds(np.random.default_rng(4), 3)])
