"""The plan's shape functions (qcompiler/plan/shapes.py) share work between a model's layers
and between signatures: each distinct host evaluation and type inference is done once
(``_Memo``, kept in the runner's ConstantCache), which was most of the host time of a decode
loop's new signature. The memo must
never hand one node another node's result: checked on a 2-layer Llama decode step (every
value's shape and host array equal to a resolve without the memo, over several cache
lengths) and on two nodes that differ only in what the memo keys on.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from qcompiler.ir import parse_module
from qcompiler.plan import lower
from qcompiler.plan import shapes as shapes_mod
from qcompiler.plan.shapes import ConstantCache, ShapeDependencies, resolve
from qcompiler.runtime import reference

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class _Forgetful(dict):
    """A memo store that keeps nothing: every node is evaluated (the resolve before the memo)."""

    def __setitem__(self, key, value):
        pass


def _without_memo(monkeypatch):
    original = shapes_mod._Memo.__init__

    def init(self, static, results):
        original(self, static, results)
        self.results = _Forgetful()

    monkeypatch.setattr(shapes_mod._Memo, "__init__", init)


@pytest.fixture(scope="module")
def llama_decode(tmp_path_factory):
    pytest.importorskip("torch")
    sys.path.insert(0, EXAMPLES)
    import decoder_models as dm

    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager

    cfg = dm.SMALL_LLAMA
    path = str(tmp_path_factory.mktemp("llama") / "decode.onnx")
    dm.export_onnx(dm.llama(layers=2, **cfg), dm.llama_inputs(cfg, 2, 1, 1, 8), path,
                   dynamo=False)
    module = PassManager.parse("canonicalize,quantize-weights{bits=4,group=32},fuse-dequant") \
        .run(import_model(path))
    return module, lower(module), cfg, dm


def test_memo_changes_no_shape_or_host_value(llama_decode, monkeypatch):
    module, plan, cfg, dm = llama_decode
    calls = []
    infer = shapes_mod.infer_types
    monkeypatch.setattr(shapes_mod, "infer_types", lambda *a: calls.append(a[0]) or infer(*a))
    cache = ConstantCache()
    signatures = [{n: tuple(v.shape) for n, v in dm.llama_inputs(cfg, 2, 1, 1, past).items()}
                  for past in (3, 8, 40)]
    with_memo = [resolve(plan, module, s, cache) for s in signatures]
    inferred_with_memo = len(calls)
    # the cache's memo outlives a resolve: a new cache length evaluates again only the host
    # values that read it
    evaluated = []

    class Counting(dict):
        def get(self, op, default=None):
            impl = super().get(op, default)
            return None if impl is None else \
                (lambda *a: evaluated.append(op) or impl(*a))

    monkeypatch.setattr(reference, "OP_IMPLS", Counting(reference.OP_IMPLS))
    new_length = {**signatures[2], "past_k": signatures[2]["past_k"][:3] + (41,)
                  + signatures[2]["past_k"][4:]}
    new_length["past_v"] = new_length["past_k"]
    resolve(plan, module, new_length, cache)
    shared = len(evaluated)
    evaluated.clear()
    resolve(plan, module, new_length, ConstantCache())
    assert 0 < shared < len(evaluated)
    monkeypatch.setattr(reference, "OP_IMPLS", reference.OP_IMPLS.copy())
    calls.clear()
    _without_memo(monkeypatch)
    calls.clear()
    without = [resolve(plan, module, s, ConstantCache()) for s in signatures]
    # both layers infer the same ops' types: the memo did the second layer's from the first's
    assert inferred_with_memo < len(calls)
    for a, b in zip(with_memo, without):
        assert a.shapes == b.shapes and a.dims == b.dims
        assert a.host.keys() == b.host.keys()
        for name in a.host:
            np.testing.assert_array_equal(a.host[name], b.host[name], err_msg=name)
            assert a.host[name].dtype == b.host[name].dtype, name


def test_resolve_from_the_last_one_equals_a_fresh_resolve(llama_decode, monkeypatch):
    """With the plan's ShapeDependencies, a resolve evaluates only the nodes that depend on
    the input dims that changed since the last one; every shape, dim and host value must be
    a fresh resolve's, over growing caches, a batch change and a step back."""
    module, plan, cfg, dm = llama_decode
    deps = ShapeDependencies(plan, module)
    evaluated = []
    resolve_node = shapes_mod._resolve_node
    monkeypatch.setattr(shapes_mod, "_resolve_node",
                        lambda *a: evaluated.append(a[2]) or resolve_node(*a))
    cache = ConstantCache()
    for batch, past in [(1, 3), (1, 4), (1, 5), (2, 5), (2, 9), (1, 9), (1, 4)]:
        signature = {n: tuple(v.shape)
                     for n, v in dm.llama_inputs(cfg, 2, batch, 1, past).items()}
        evaluated.clear()
        got = resolve(plan, module, signature, cache, deps)
        count = len(evaluated)
        want = resolve(plan, module, signature, ConstantCache())
        assert len(evaluated) - count == len(module.main.nodes)
        if (batch, past) == (1, 4):  # only the cache length changed
            assert got.changed == {"past"}
            assert 0 < count < len(module.main.nodes) / 3
        assert got.shapes == want.shapes and got.dims == want.dims
        assert got.host.keys() == want.host.keys()
        for name in want.host:
            np.testing.assert_array_equal(got.host[name], want.host[name], err_msg=name)
            assert got.host[name].dtype == want.host[name].dtype, name


# Two casts of the same shape to different types, and two shape gathers of different dims:
# the same operands, told apart by their attributes, result types and constant operands.
TWINS = """module @twins {
  func @main(%x: tensor<[n, m], f32>) -> ("a": tensor<[2], i64>, "b": tensor<[2], i32>, "c": tensor<[], i64>, "d": tensor<[], i64>) {
    %s = shape(%x) : tensor<[2], i64>
    %a = cast(%s) {to = i64} : tensor<[2], i64>
    %b = cast(%s) {to = i32} : tensor<[2], i32>
    %i0 = constant() {value = 0} : tensor<[], i64>
    %i1 = constant() {value = 1} : tensor<[], i64>
    %c = gather(%s, %i0) {axis = 0} : tensor<[], i64>
    %d = gather(%s, %i1) {axis = 0} : tensor<[], i64>
    return %a, %b, %c, %d
  }
}
"""


def test_memo_keeps_nodes_that_differ_apart():
    module = parse_module(TWINS)
    plan = lower(module)
    r = resolve(plan, module, {"x": (5, 7)})
    assert r.host["a"].dtype == np.int64 and r.host["b"].dtype == np.int32
    assert list(r.host["a"]) == list(r.host["b"]) == [5, 7]
    assert int(r.host["c"]) == 5 and int(r.host["d"]) == 7


def test_attribute_keys_see_all_of_an_array_and_share_objects_only_by_identity():
    a = np.zeros(5000, np.float32)
    b = a.copy()
    b[2500] = 1  # inside the part numpy's repr elides
    assert repr(a) == repr(b)
    assert shapes_mod._attr_key(a) != shapes_mod._attr_key(b)
    assert shapes_mod._attr_key([1, "x", a]) == shapes_mod._attr_key([1, "x", a.copy()])

    class Body:
        def __repr__(self):
            return "body"

    assert shapes_mod._attr_key(Body()) != shapes_mod._attr_key(Body())


def test_an_inference_memo_entry_serves_only_the_nodes_it_fits(monkeypatch):
    """A type inference's memo entry records the attributes it read and whether it read a
    large known operand (one the key holds by shape only). A node that differs only in an
    attribute the inference did not read, or only checked (``OpDef.checked_attrs``), shares
    the entry; one that differs in an attribute it read infers its own; after an inference
    that read a large operand, every node infers its own."""
    from qcompiler.ir import TensorType, elem
    from qcompiler.ir.core import Node, Value
    from qcompiler.ir.ops import OPS, OpDef

    calls = []

    def probe(types, attrs, consts):
        calls.append(types[0].shape)  # (not the attributes: that would read them all)
        n = types[0].shape[0] * attrs["scale"]
        if attrs["layer"] > 9:  # only checked
            raise ValueError("layer")
        if attrs.get("read_big") and consts[1] is not None:
            n += int(consts[1].sum())
        return [TensorType((n,), types[0].dtype)]

    monkeypatch.setitem(OPS, "probe", OpDef("probe", "test", ("x", "big?"), {}, 1, probe,
                                            ("layer",)))
    f32, i64 = elem("f32"), elem("i64")
    x = Value("x", TensorType(("n",), f32))
    big = Value("big", TensorType((100,), i64))

    def node(name, **attrs):
        return Node("probe", [x, big], [Value(name, TensorType(("?",), f32))],
                    {"scale": 2, "layer": 0, "note": "", **attrs})

    cache = ConstantCache()
    memo = shapes_mod._Memo(cache.node_keys, cache.memo)

    def infer(n, big_values):
        shapes = {"x": (3,), "big": (100,)}
        arrays = {"big": big_values}
        shapes_mod._infer(n, shapes, arrays, {"n": 3}, list(n.results), memo)
        return shapes[n.results[0].name]

    ones = np.ones(100, np.int64)
    assert infer(node("a"), ones) == (6,) and len(calls) == 1
    assert infer(node("b", note="other", layer=3), ones) == (6,) and len(calls) == 1
    assert infer(node("c", scale=5), ones) == (15,) and len(calls) == 2
    # reading the large operand: its values are not in the key, so never shared
    assert infer(node("d", read_big=1), ones) == (106,) and len(calls) == 3
    assert infer(node("e", read_big=1), 2 * ones) == (206,) and len(calls) == 4
