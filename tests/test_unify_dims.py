"""unify-dims (passes/unify_dims.py): symbols that type inference proves equal become one, and
a decode step's plan then infers fewer dims per new signature."""
from __future__ import annotations

import numpy as np
import pytest

from qcompiler.ir import parse_module
from qcompiler.ir.printer import print_module
from qcompiler.passes.unify_dims import unify
from qcompiler.runtime import reference

# Two appends of the same new rows to the same cache (the same ``p + s`` rows, which no symbol
# names: inference gives ``?``), one of them through a tanh whose result an exporter named
# afresh, and an append of other rows (``t``), which must keep its own symbol.
APPENDS = """module @m {
  func @main(%a: tensor<[b, p, 16], f32>, %n: tensor<[b, s, 16], f32>, %o: tensor<[b, t, 16], f32>) -> ("y": tensor<[b, u3, 16], f32>, "z": tensor<[b, u2, 16], f32>, "w": tensor<[b, u4, 16], f32>) {
    %c1 = concat(%a, %n) {axis = 1} : tensor<[b, u1, 16], f32>
    %c2 = concat(%a, %n) {axis = 1} : tensor<[b, u2, 16], f32>
    %c3 = concat(%a, %o) {axis = 1} : tensor<[b, u4, 16], f32>
    %t = tanh(%c1) : tensor<[b, u3, 16], f32>
    %y = add(%t, %c2) : tensor<[b, u3, 16], f32>
    return %y, %c2, %c3
  }
}
"""


def _dims(module) -> dict:
    return {r.name: r.type.shape for n in module.main.nodes for r in n.results}


def test_congruent_appends_share_a_symbol_and_inferred_symbols_replace_fresh_ones():
    module = parse_module(APPENDS)
    assert unify(module) == 2
    dims = _dims(module)
    # c1 and c2 read the same operand types: one symbol (the first's); the tanh's is c1's
    assert dims["c1"] == dims["c2"] == dims["t"] == dims["y"] == ("b", "u1", 16)
    assert dims["c3"] == ("b", "u4", 16)  # other rows: its own
    text = print_module(module)
    assert "u2" not in text and "u3" not in text  # the function's result types follow
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((2, 5, 16)).astype(np.float32),
             "n": rng.standard_normal((2, 3, 16)).astype(np.float32),
             "o": rng.standard_normal((2, 1, 16)).astype(np.float32)}
    want = reference.run(parse_module(APPENDS), feeds)
    got = reference.run(module, feeds)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_argument_symbols_are_never_renamed():
    """A result typed with one input's symbol where inference gives another input's (an
    export that knows two inputs' dims agree): both name inputs (buckets and users name
    them), so neither becomes the other; a fresh symbol downstream still takes one."""
    module = parse_module("""module @m {
  func @main(%x: tensor<[b, p], f32>, %y: tensor<[b, q], f32>) -> ("z": tensor<[b, p], f32>, "w": tensor<[b, u], f32>) {
    %z = tanh(%y) : tensor<[b, p], f32>
    %w = tanh(%x) : tensor<[b, u], f32>
    return %z, %w
  }
}
""")
    assert unify(module) == 1
    assert [a.type.shape for a in module.main.args] == [("b", "p"), ("b", "q")]
    assert _dims(module) == {"z": ("b", "p"), "w": ("b", "p")}


@pytest.mark.parametrize("same_shape", [True, False])
def test_values_an_inference_reads_are_part_of_congruence(same_shape):
    """Two reshapes of the same operand type are congruent only when the shape tensors their
    inference reads hold the same values (two constants of equal contents are)."""
    second = "[-1, 4]" if same_shape else "[-1, 8]"
    module = parse_module(f"""module @m {{
  func @main(%x: tensor<[n, 16], f32>) -> ("y": tensor<[u1, 4], f32>, "z": tensor<[u2, {4 if same_shape else 8}], f32>) {{
    %s1 = constant() {{value = [-1, 4]}} : tensor<[2], i64>
    %s2 = constant() {{value = {second}}} : tensor<[2], i64>
    %y = reshape(%x, %s1) : tensor<[u1, 4], f32>
    %z = reshape(%x, %s2) : tensor<[u2, {4 if same_shape else 8}], f32>
    return %y, %z
  }}
}}
""")
    merged = unify(module)
    dims = _dims(module)
    assert (dims["y"][0] == dims["z"][0]) == same_shape
    assert merged == (1 if same_shape else 0)


def test_a_llama_decode_step_infers_only_the_cache_length_per_token(tmp_path):
    """The example Llama's decode export through the CPU pipeline: every attention result is
    [batch, seq, ...] (its inference's dims), the layers' cache appends share their symbols,
    and a new cache length re-binds only those (the shape functions re-infer one node a
    symbol, not one a layer)."""
    pytest.importorskip("torch")
    import sys
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import decoder_models as dm

    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager
    from qcompiler.plan import lower
    from qcompiler.plan.shapes import ShapeDependencies
    from qcompiler.targets import get_target

    cfg = dict(dm.SMALL_LLAMA)
    layers = 3
    model = dm.llama(layers=layers, **cfg)
    path = dm.export_onnx(model, dm.llama_inputs(cfg, layers, 1, 1, 4),
                          str(tmp_path / "decode.onnx"), dynamo=False)
    pipeline = get_target("cpu").default_pipeline
    module = PassManager.parse(pipeline).run(import_model(path))
    before = PassManager.parse(pipeline.replace("unify-dims,", "")).run(import_model(path))
    for m in (module, before):
        attn = [n for n in m.main.nodes if n.op == "attention"]
        assert len(attn) == layers
    seq = [a.type.shape for a in module.main.args if a.name == "input_ids"][0][1]
    assert all(n.results[0].type.shape[1] == seq for n in module.main.nodes
               if n.op == "attention")
    unbound = {}
    for name, m in (("unified", module), ("before", before)):
        deps = ShapeDependencies(lower(m, {"batch": [1], "seq": [1], "past": [16]}), m)
        past = next(d for a in m.main.args if a.name == "past_k" for d in a.type.shape
                    if isinstance(d, str) and d.startswith("past"))
        unbound[name] = deps.affected(frozenset({past}))[1]
    # per cache (k, v) one symbol, whatever the number of layers
    assert len(unbound["unified"]) <= 2 < len(unbound["before"])


def test_results_of_different_computed_values_keep_their_symbols():
    """Two ranges over limits computed at run time (x's rows, and one more) have the same
    operand types, but their inference reads the limits' values, which no constant holds:
    they stay apart; a third range over the very same limit value shares the first's."""
    src = """module @m {
  func @main(%x: tensor<[n, 16], f32>) -> ("r1": tensor<[u1], i64>, "r2": tensor<[u2], i64>, "r3": tensor<[u3], i64>) {
    %zero = constant() {value = 0} : tensor<[], i64>
    %one = constant() {value = 1} : tensor<[], i64>
    %s = shape(%x) {start = 0, end = 1} : tensor<[1], i64>
    %rows = squeeze(%s) {axes = [0]} : tensor<[], i64>
    %more = add(%rows, %one) : tensor<[], i64>
    %r1 = range(%zero, %rows, %one) : tensor<[u1], i64>
    %r2 = range(%zero, %more, %one) : tensor<[u2], i64>
    %r3 = range(%zero, %rows, %one) : tensor<[u3], i64>
    return %r1, %r2, %r3
  }
}
"""
    module = parse_module(src)
    unify(module)
    dims = _dims(module)
    assert dims["r1"] == dims["r3"] != dims["r2"]
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    got = reference.run(module, {"x": x})
    assert [len(got[k]) for k in ("r1", "r2", "r3")] == [5, 6, 5]


def test_data_dependent_counts_keep_their_symbols():
    """Two NonZero of inputs of one type: inference gives ``?`` for the counts whatever the
    shapes (they depend on the data, which it does not read), so the two stay apart."""
    module = parse_module("""module @m {
  func @main(%x: tensor<[n, 4], f32>, %y: tensor<[n, 4], f32>) -> ("a": tensor<[2, u1], i64>, "b": tensor<[2, u2], i64>) {
    %a = nonzero(%x) : tensor<[2, u1], i64>
    %b = nonzero(%y) : tensor<[2, u2], i64>
    return %a, %b
  }
}
""")
    assert unify(module) == 0
    assert _dims(module) == {"a": (2, "u1"), "b": (2, "u2")}
