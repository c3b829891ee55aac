"""A new input signature costs little: arena plans per size class beyond the buckets, and bound
step calls reused where a step sees the same memory (qcompiler/plan/executor.py).

A decode loop gives the executor a new signature every step (the KV length grows by one).
Beyond every bucket the arena is planned for the dims rounded up to their size class
(``size_class``: eighths of an octave), once per class; and a step whose arrays (arena,
offset, shape, dtype) did not change keeps the call bound for an earlier signature. Checked
on a decode step in miniature against the reference interpreter over a poisoned arena, with
signatures alternating inside one class (a stale binding would read or write the wrong
memory).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from qcompiler.driver.api import run_pipeline
from qcompiler.plan import PlanExecutor, lower
from qcompiler.plan.executor import reference_step
from qcompiler.plan.memory import size_class
from qcompiler.runtime import reference


def test_size_class_rounds_up_by_at_most_an_eighth():
    assert [size_class(d) for d in (1, 7, 8, 9, 16, 17, 20, 21, 24, 25, 128, 129, 513)] == \
        [1, 7, 8, 9, 16, 18, 20, 22, 24, 26, 128, 144, 576]
    for d in range(1, 5000):
        c = size_class(d)
        assert d <= c < d + max(1, d / 8) and size_class(c) == c


class _Binding:
    """A reference step with a ``bind`` (as compiled kernels have), counting its bindings."""

    binds = 0

    def __init__(self, node, module):
        self.step = reference_step(node, module)

    def __call__(self, args, outs):
        self.step(args, outs)

    def bind(self, args, outs):
        _Binding.binds += 1
        return lambda: self.step(args, outs)


# A decode step in miniature: x [1, 16] through a weight (no KV dim), and the KV cache
# [1, p, 16] summed over its positions; only the KV steps change with p.
DECODE = """module @decode {
  func @main(%x: tensor<[1, 16], f32>, %kv: tensor<[1, p, 16], f32>) -> ("y": tensor<[1, 16], f32>) {
    %w = constant() {name = "w"} : tensor<[16, 16], f32>
    %h = matmul(%x, %w) : tensor<[1, 16], f32>
    %a = tanh(%h) : tensor<[1, 16], f32>
    %e = tanh(%kv) : tensor<[1, p, 16], f32>
    %s = reduce_sum(%e) {axes = [1], keepdims = 0} : tensor<[1, 16], f32>
    %t = add(%a, %s) : tensor<[1, 16], f32>
    %y = tanh(%t) : tensor<[1, 16], f32>
    return %y
  }
}
"""


@pytest.fixture(scope="module")
def decode():
    from qcompiler.ir import parse_module

    module = parse_module(DECODE)
    module.constants["w"] = np.random.default_rng(0).standard_normal((16, 16)).astype(
        np.float32)
    return module


def _inputs(rng, p):
    return {"x": rng.standard_normal((1, 16)).astype(np.float32),
            "kv": rng.standard_normal((1, p, 16)).astype(np.float32)}


def test_signatures_beyond_the_buckets_share_plans_and_bindings(decode):
    plan = lower(decode, {"p": [8]})
    nodes = {n.results[0].name: n for n in decode.main.nodes if n.results}
    impls = {s.node: _Binding(nodes[s.node], decode) for s in plan.steps
             if s.kind == "kernel"}
    ex = PlanExecutor(plan, decode, impls)
    ex.poison_byte = 0xFF
    rng = np.random.default_rng(5)
    kernels = sum(1 for s in plan.steps if s.kind == "kernel")
    binds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # beyond every bucket: said once
        for seq in (37, 38, 39, 37, 40, 38):  # one size class (40), alternating
            feeds = _inputs(rng, seq)
            before = _Binding.binds
            got = ex.run(feeds)
            binds.append(_Binding.binds - before)
            want = reference.run(decode, feeds)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    # one arena plan for the class
    assert ex.memory_plan_for({"p": 37}) is ex.memory_plan_for({"p": 40})
    # small inputs and outputs have buffers of their own (STAGE_BYTES), so the first
    # signature binds every step; later ones rebind only the KV steps (the cache's buffer is
    # per shape, and the sum's operand changed shape), none when a signature comes back (its
    # call list is cached)
    assert kernels == 6 and binds[0] == 6
    assert binds[1:] == [2, 2, 0, 2, 0]


def test_a_new_signature_places_again_only_what_its_changed_dims_reach(decode, monkeypatch):
    """Within one arena a new signature starts from the last one: the buffers whose shapes
    depend on the changed dim (the cache, its tanh) are placed again and the steps touching
    them get new calls; the rest keep theirs. Results checked over a poisoned arena."""
    plan = lower(decode, {"p": [64]})
    ex = PlanExecutor(plan, decode)
    ex.poison_byte = 0xFF
    made = []
    step_call = PlanExecutor._step_call
    monkeypatch.setattr(PlanExecutor, "_step_call",
                        lambda self, i, st, now: made.append(st.node) or step_call(self, i, st,
                                                                                   now))
    rng = np.random.default_rng(6)
    calls = []
    for p in (20, 21, 22, 21):
        made.clear()
        feeds = _inputs(rng, p)
        got = ex.run(feeds)
        calls.append(sorted(made))
        want = reference.run(decode, feeds)
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-5)
    assert len(calls[0]) == sum(1 for s in plan.steps if s.kind not in ("view", "host"))
    assert calls[1] == calls[2] == ["e", "s"]
    assert calls[3] == []  # prepared before: its call list is kept


def test_a_long_generation_keeps_few_size_class_arenas(decode, monkeypatch):
    """Beyond the buckets each size class gets its own memory plan and arena; a generation
    loop leaves the classes behind one after another, and only the MAX_EXACT_PLANS most
    recent are kept (results stay correct when a released class comes back)."""
    monkeypatch.setattr(PlanExecutor, "MAX_EXACT_PLANS", 2)
    plan = lower(decode, {"p": [8]})
    ex = PlanExecutor(plan, decode)
    ex.poison_byte = 0xFF
    rng = np.random.default_rng(7)
    classes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for seq in list(range(9, 80, 3)) + [9]:  # through 13 classes, then back to the first
            feeds = _inputs(rng, seq)
            got = ex.run(feeds)
            np.testing.assert_allclose(got["y"], reference.run(decode, feeds)["y"],
                                       rtol=1e-5, atol=1e-5)
            classes.append(size_class(seq))
            assert len(ex._plans.exact) <= 2 and len(ex._arenas) <= 1 + 2  # the bucket's + 2
    assert len(set(classes)) > 4


def test_large_inputs_and_outputs_are_bound_per_run(decode, monkeypatch):
    """Above STAGE_BYTES an input is read where the caller put it and an output is a fresh
    array per run: the steps touching them take the run's arrays and are never bound."""
    from qcompiler.plan import executor

    monkeypatch.setattr(executor, "STAGE_BYTES", 0)
    plan = lower(decode, {"p": [64]})
    nodes = {n.results[0].name: n for n in decode.main.nodes if n.results}
    impls = {s.node: _Binding(nodes[s.node], decode) for s in plan.steps if s.kind == "kernel"}
    ex = PlanExecutor(plan, decode, impls)
    ex.poison_byte = 0xFF
    rng = np.random.default_rng(6)
    binds, outputs = [], []
    for seq in (5, 6, 5):
        feeds = _inputs(rng, seq)
        before = _Binding.binds
        got = ex.run(feeds)
        binds.append(_Binding.binds - before)
        np.testing.assert_allclose(got["y"], reference.run(decode, feeds)["y"], rtol=1e-5,
                                   atol=1e-5)
        outputs.append(got["y"])
    # matmul(x), tanh(kv) and tanh -> y are called with the run's arrays; the other three
    # bind once, the KV sum again for the new shape
    assert binds == [3, 1, 0]
    assert outputs[0] is not outputs[2] and not np.shares_memory(outputs[0], outputs[2])


def test_staged_outputs_are_copies(decode):
    """A small output comes back as a copy of its buffer: the next run does not change it."""
    plan = lower(decode, {"p": [64]})
    ex = PlanExecutor(plan, decode)
    rng = np.random.default_rng(7)
    first_feeds = _inputs(rng, 5)
    first = ex.run(first_feeds)["y"]
    kept = first.copy()
    ex.run(_inputs(rng, 5))
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_allclose(first, reference.run(decode, first_feeds)["y"], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["1", "kernels"])
def test_profile_counts_every_call_per_op_or_per_kernel(decode, monkeypatch, mode):
    """``QC_PROFILE=1`` sums per op kind; ``QC_PROFILE=kernels`` per op kind and kernel name,
    which tells apart two steps of one kind (here the three tanh steps of three shapes)."""
    monkeypatch.setenv("QC_PROFILE", mode)
    plan = lower(decode, {"p": [8]})
    ex = PlanExecutor(plan, decode)
    rng = np.random.default_rng(7)
    for _ in range(3):
        ex.run(_inputs(rng, 8))
    rows = ex.profile()
    steps = [s for s in plan.steps if s.kind == "kernel"]
    labels = [s.op if mode == "1" else f"{s.op} {s.kernel}" for s in steps]
    assert sorted(rows) == sorted(set(labels))
    for label, row in rows.items():
        assert row["calls_per_run"] == labels.count(label)
        assert row["ms_per_run"] > 0
    if mode == "kernels":  # two tanh kernels ([1, 16] twice shares one name, [1, p, 16])
        assert sum(1 for label in rows if label.startswith("tanh ")) == 2
    ex._profile.runs = 0  # nothing printed at exit


def test_prepared_signatures_are_bounded(decode, monkeypatch):
    """A decode loop meets a new signature every step: at most MAX_PREPARED stay prepared
    (least recently used dropped), and a dropped one that comes back is prepared again and
    still computes the right values."""
    from qcompiler.plan.executor import PlanExecutor as Executor

    monkeypatch.setattr(Executor, "MAX_PREPARED", 3)
    plan = lower(decode, {"p": [64]})
    ex = PlanExecutor(plan, decode)
    rng = np.random.default_rng(7)
    for seq in (5, 6, 7, 8, 6, 9, 5):
        feeds = _inputs(rng, seq)
        np.testing.assert_allclose(ex.run(feeds)["y"], reference.run(decode, feeds)["y"],
                                   rtol=1e-5, atol=1e-5)
        assert len(ex._prepared) <= 3
    # the last three distinct signatures, 6 kept as used before 9
    assert [s[1][1] for s in ex._prepared] == [6, 9, 5]


@pytest.mark.parametrize("stage_bytes", [0, 1 << 16])
def test_inputs_of_any_layout_reach_the_steps_aligned(decode, monkeypatch, stage_bytes):
    """A non-contiguous or unaligned input gives the reference's results, and every step
    reads it as a C-contiguous, 64-byte-aligned array (compiled kernels assume both): a small
    input through its staged buffer, a large one (STAGE_BYTES = 0) through a copy made only
    because it is unaligned."""
    from qcompiler.plan import executor

    monkeypatch.setattr(executor, "STAGE_BYTES", stage_bytes)
    plan = lower(decode, {"p": [64]})
    seen = []

    def recording(step):
        def impl(args, outs):
            seen.extend(a for a in args if a is not None)
            step(args, outs)
        return impl

    nodes = {n.results[0].name: n for n in decode.main.nodes if n.results}
    impls = {s.node: recording(reference_step(nodes[s.node], decode)) for s in plan.steps
             if s.kind == "kernel"}
    ex = PlanExecutor(plan, decode, impls)
    rng = np.random.default_rng(8)
    wide = rng.standard_normal((1, 32)).astype(np.float32)
    raw = np.empty(7 * 16 + 1, np.float32)
    kv = raw[1:].reshape(1, 7, 16)  # 4 bytes past an allocation: never 64-byte aligned
    kv[:] = rng.standard_normal((1, 7, 16))
    feeds = {"x": wide[:, ::2], "kv": kv}
    assert not feeds["x"].flags.c_contiguous and kv.ctypes.data % 64
    got = ex.run(feeds)
    np.testing.assert_allclose(got["y"], reference.run(decode, feeds)["y"], rtol=1e-5,
                               atol=1e-5)
    assert seen and all(a.flags.c_contiguous and a.ctypes.data % 64 == 0 for a in seen
                        if isinstance(a, np.ndarray) and a.size)
