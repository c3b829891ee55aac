"""A plan up to data-dependent ops (qcompiler/plan/split.py): the nodes before a NonZero are
planned and compiled, the NonZero and what follows it run in the reference interpreter after
the plan. Checked against the reference of the whole model on inputs whose masks select
different numbers of elements, through the plan executor (no TVM) and compiled for ``cpu``."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qcompiler.driver.frontend import import_model
from qcompiler.plan import PlanError, lower
from qcompiler.plan.executor import PlanExecutor
from qcompiler.plan.shapes import DataDependentShapeError
from qcompiler.plan.split import TailRunner, lower_with_tail, split_module
from qcompiler.runtime.reference import run as ref_run


def _masked_sum_model(nonzero_on_input: bool = False, act_out: bool = False):
    """x [b, 16] @ w -> relu -> "act"; the elements of act above 0.5 gathered through
    NonZero -> "total" (their sum) and "picked" (them); "scaled" = act * 2 beside it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.asarray(0.5, np.float32), "half"),
             numpy_helper.from_array(np.asarray(2.0, np.float32), "two")]
    masked = "x" if nonzero_on_input else "act"
    # (x's non-zero elements: all of them, but NonZero cannot know that before it runs)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Relu", ["h"], ["act"]),
             helper.make_node("Mul", ["act", "two"], ["scaled"]),
             helper.make_node("Greater", [masked, "half"], ["mask"]),
             helper.make_node("NonZero", ["mask"], ["where"]),
             helper.make_node("Transpose", ["where"], ["index"], perm=[1, 0]),
             helper.make_node("GatherND", [masked, "index"], ["picked"]),
             helper.make_node("ReduceSum", ["picked"], ["total"], keepdims=0)]
    outputs = [helper.make_tensor_value_info("scaled", f32, ["b", 8]),
               helper.make_tensor_value_info("picked", f32, ["n"]),
               helper.make_tensor_value_info("total", f32, [])]
    if act_out:  # act returned too
        outputs.append(helper.make_tensor_value_info("act", f32, ["b", 8]))
    if nonzero_on_input:  # NonZero(x): nothing comes before it
        outputs = outputs[1:]
        nodes = [helper.make_node("NonZero", ["x"], ["where"])] + nodes[5:]
    graph = helper.make_graph(nodes, "masked_sum",
                              [helper.make_tensor_value_info("x", f32, ["b", 16])], outputs,
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(batch: int, seed: int) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 16)).astype(np.float32)}


def test_the_plan_stops_at_nonzero_and_the_interpreter_runs_the_rest():
    module = import_model(_masked_sum_model())
    with pytest.raises(DataDependentShapeError) as e:
        lower(module)
    assert e.value.node == "where"
    plan, split = lower_with_tail(module)
    assert plan.tail_roots == ["where"]
    head = split.head
    assert [n.results[0].name for n in split_module(module, ["where"]).head.main.nodes] == \
        [n.results[0].name for n in head.main.nodes]
    # the head: the GEMM, relu, scale and the mask, with act and the mask handed to the tail
    assert "where" not in plan.buffers and {"act", "mask"} <= set(plan.outputs.values())
    assert split.boundary == {"mask": "mask", "act": "act"}
    assert [a.name for a in split.tail.main.args] == ["mask", "act"]
    assert split.tail.main.output_names == ["picked", "total"]
    assert split.tail_nodes == ["where", "index", "picked", "total"]
    runner = TailRunner(split, PlanExecutor(plan, head).run, module.main.output_names)
    counts = set()
    for batch, seed in [(1, 1), (3, 2), (3, 3), (7, 4), (2, 5)]:
        feeds = _feeds(batch, seed)
        got, want = runner(feeds), ref_run(module, feeds)
        assert list(got) == list(want) == ["scaled", "picked", "total"]
        for name in want:
            assert got[name].shape == want[name].shape, name
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5,
                                       err_msg=name)
        counts.add(want["picked"].shape[0])
    assert len(counts) >= 4  # the masks selected different numbers of elements


def test_a_value_the_tail_reads_that_main_returns_too():
    """act is returned by main and read by the tail: the head returns it once, under main's
    name for it."""
    module = import_model(_masked_sum_model(act_out=True))
    plan, split = lower_with_tail(module)
    names = split.head.main.output_names
    assert sorted(names) == ["act", "mask", "scaled"]
    assert split.boundary == {"mask": "mask", "act": "act"}
    runner = TailRunner(split, PlanExecutor(plan, split.head).run, module.main.output_names)
    feeds = _feeds(4, 21)
    got, want = runner(feeds), ref_run(module, feeds)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_model_that_is_all_tail_gets_no_plan():
    """NonZero on the input itself: every output follows it, nothing is left to plan."""
    module = import_model(_masked_sum_model(nonzero_on_input=True))
    with pytest.raises(PlanError, match="every output follows the data-dependent %where"):
        lower_with_tail(module)


def test_a_split_model_compiled_for_cpu(tmp_path):
    """Through qcompile: the head's ops are op-library kernels, the tail's nodes host
    fallbacks that name the NonZero, the report says where the plan stops; the results equal
    the reference target's."""
    pytest.importorskip("tvm")
    import qcompiler
    from qcompiler.targets import get_target

    if not get_target("cpu").available:
        pytest.skip("the cpu target is not available here")
    model = _masked_sum_model()
    out = str(tmp_path / "out")
    with pytest.warns(RuntimeWarning, match="host fallback"):
        compiled = qcompiler.compile(model, target="cpu", output_dir=out, jobs=1,
                                     progress=False, cache=False)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["plan"]["tail_roots"] == ["where"]
    fallbacks = {r["result"]: r for r in manifest["kernels"] if r.get("host_fallback")}
    assert set(fallbacks) == {"where", "index", "picked", "total"}
    assert all("follows the data-dependent %where" in r["reason"] for r in fallbacks.values())
    ops = next(r for r in manifest["kernels"] if r.get("impl") == "tvm-llvm-ops")
    assert ops["kernels"]  # the head's ops are compiled
    with open(os.path.join(out, "report.txt")) as f:
        assert "tail: 4 nodes from %where on" in f.read()
    from qcompiler.plan import format_plan, plan_from_json

    printed = format_plan(plan_from_json(manifest["plan"]))
    assert "then the reference interpreter, from the data-dependent %where on" in printed
    reference = qcompiler.compile(model, "ref")
    for batch, seed in [(2, 11), (5, 12), (1, 13)]:
        feeds = _feeds(batch, seed)
        got, want = compiled.run(feeds), reference.run(feeds)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5,
                                       err_msg=name)
