"""shard{tp=N} (issue #17): tensor-parallel MLP blocks in the global view. The sharded module,
run by the reference, equals the unsharded one; each rank's layers hold 1/N of the weights;
act-order weights are reordered TP-aware (B's row blocks are contiguous groups: no all-gather);
blocks that cannot be split are left whole with the reason in the pass stats."""
from __future__ import annotations

import numpy as np
import pytest

from qcompiler.ir import parse_module, print_module, verify
from qcompiler.ir.core import constant_value
from qcompiler.pipeline import PassError, PassManager
from qcompiler.runtime import reference

# Llama's MLP: down(silu(gate(x)) * up(x)) + a residual, 4-bit g16; the down projection's
# scheme is %DOWN% (plain groups or act-order with a g_idx operand).
SWIGLU = """module @m {
  func @main(%x: tensor<[batch, 64], f32>) -> ("y": tensor<[batch, 64], f32>) {
    %wg = constant() {name = "wg"} : tensor<[64, 96], u4>
    %sg = constant() {name = "sg"} : tensor<[4, 96], f32>
    %zg = constant() {name = "zg"} : tensor<[4, 96], u4>
    %wu = constant() {name = "wu"} : tensor<[64, 96], u4>
    %su = constant() {name = "su"} : tensor<[4, 96], f32>
    %zu = constant() {name = "zu"} : tensor<[4, 96], u4>
    %wd = constant() {name = "wd"} : tensor<[96, 64], u4>
    %sd = constant() {name = "sd"} : tensor<[6, 64], f32>
    %zd = constant() {name = "zd"} : tensor<[6, 64], u4>
    %gd = constant() {name = "gd"} : tensor<[96], i32>
    %bd = constant() {name = "bd"} : tensor<[64], f32>
    %g = qmatmul(%x, %wg, %sg, %zg, none, none, none, none) {act = "float", w_scheme = #quant<u4, affine, per_group(axis=0, block=16), scale=f32, zp=u4>} : tensor<[batch, 96], f32>
    %u = qmatmul(%x, %wu, %su, %zu, none, none, none, none) {act = "float", w_scheme = #quant<u4, affine, per_group(axis=0, block=16), scale=f32, zp=u4>} : tensor<[batch, 96], f32>
    %sig = sigmoid(%g) : tensor<[batch, 96], f32>
    %silu = mul(%g, %sig) : tensor<[batch, 96], f32>
    %h = mul(%silu, %u) : tensor<[batch, 96], f32>
    %d = qmatmul(%h, %wd, %sd, %zd, %DOWN_GIDX%, none, none, %bd) {act = "float", w_scheme = %DOWN%} : tensor<[batch, 64], f32>
    %y = add(%d, %x) : tensor<[batch, 64], f32>
    return %y
  }
}"""
PLAIN = "#quant<u4, affine, per_group(axis=0, block=16), scale=f32, zp=u4>"
ACT_ORDER = "#quant<u4, affine, per_group(axis=0, block=16), scale=f32, zp=u4, act_order>"


def _module(act_order: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    consts = {}
    for name, (k, n, groups) in {"g": (64, 96, 4), "u": (64, 96, 4), "d": (96, 64, 6)}.items():
        consts[f"w{name}"] = rng.integers(0, 16, (k, n)).astype(np.uint8)
        consts[f"s{name}"] = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
        consts[f"z{name}"] = rng.integers(0, 16, (groups, n)).astype(np.uint8)
    # GPTQ's desc_act: rows in a random order, each group of 16 consecutive in that order
    consts["gd"] = (np.argsort(rng.permutation(96)) // 16).astype(np.int32)
    consts["bd"] = rng.standard_normal(64).astype(np.float32)
    text = SWIGLU.replace("%DOWN_GIDX%", "%gd" if act_order else "none") \
        .replace("%DOWN%", ACT_ORDER if act_order else PLAIN)
    if not act_order:
        text = text.replace('    %gd = constant() {name = "gd"} : tensor<[96], i32>\n', "")
        consts.pop("gd")
    m = parse_module(text, consts)
    verify(m)
    return m


def _sharded(module, tp):
    return PassManager.parse(f"shard{{tp={tp}}}").run(module.clone())


def _feeds(seed, batch=5):
    return {"x": np.random.default_rng(seed).standard_normal((batch, 64)).astype(np.float32)}


# (96 act-order rows over 3 ranks would split groups of 16: the refusal test covers it)
@pytest.mark.parametrize("act_order, tp", [(False, 2), (False, 3), (True, 2)],
                         ids=["groups-tp2", "groups-tp3", "act_order-tp2"])
def test_sharded_module_equals_the_unsharded_reference(act_order, tp):
    base = _module(act_order)
    sharded = _sharded(base, tp)
    verify(sharded)
    text = print_module(sharded)
    assert text.count("all_reduce(") == 1
    qmms = [n for n in sharded.main.nodes if n.op == "qmatmul"]
    assert sorted(n.attrs["rank"] for n in qmms) == sorted(list(range(tp)) * 3)
    # every rank holds 1/tp of each layer's columns (gate, up) or rows (down)
    for n in qmms:
        w = constant_value(sharded, n.arg("w"))
        assert w.size == 64 * 96 // tp
    # the bias is added once, the residual add after the sum stays replicated
    assert sum(n.arg("bias") is not None for n in qmms) == 1
    (res,) = [n for n in sharded.main.nodes if n.op == "add"]
    assert "rank" not in res.attrs and res.operands[0].producer.op == "all_reduce"
    for seed in (1, 2):
        want = reference.run(base, _feeds(seed))["y"]
        got = reference.run(sharded, _feeds(seed))["y"]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # parses back
    assert print_module(parse_module(text, sharded.constants)) == text


def test_act_order_is_reordered_tp_aware():
    """After the reordering B's groups are contiguous (a plain group scheme, no g_idx): each
    rank's row block is whole groups of the rows its own column shards produce."""
    sharded = _sharded(_module(act_order=True), 2)
    downs = [n for n in sharded.main.nodes if n.op == "qmatmul" and n.arg("g_idx") is None
             and constant_value(sharded, n.arg("w")).shape == (48, 64)]
    assert len(downs) == 2
    for n in downs:
        assert not n.attrs["w_scheme"].act_order
        assert constant_value(sharded, n.arg("w_scale")).shape == (3, 64)  # 48 rows / 16
        # its input is computed on the same rank from that rank's gate and up shards only
        h = n.operands[0].producer
        assert h.attrs["rank"] == n.attrs["rank"]
        sources = {p.producer.attrs.get("rank") for p in h.operands if p.producer is not None}
        assert sources == {n.attrs["rank"]}


def test_unshardable_blocks_stay_whole_with_the_reason():
    base = _module(act_order=True)
    sharded = _sharded(base, 4)  # 24 rows a rank: splits groups of 16
    assert "all_reduce" not in print_module(sharded)
    stats = sharded.metadata["pass_stats"]["shard"]
    assert stats["blocks"] == 0 and stats["skipped"] == 1
    assert "split B's groups of 16" in stats["skipped_blocks"]
    np.testing.assert_allclose(reference.run(sharded, _feeds(3))["y"],
                               reference.run(base, _feeds(3))["y"], rtol=1e-6)


def test_tp_one_is_the_identity_and_bad_degrees_are_refused():
    base = _module(act_order=False)
    assert print_module(_sharded(base, 1)) == print_module(base)
    with pytest.raises(PassError, match="tp must be an int >= 1"):
        _sharded(base, 0)


def test_all_reduce_checks_its_operands():
    bad = """module @m {
  func @main(%a: tensor<[2, 3], f32>, %b: tensor<[2, 4], f32>) -> ("y": tensor<[2, 3], f32>) {
    %y = all_reduce(%a, %b) {op = "sum"} : tensor<[2, 3], f32>
    return %y
  }
}"""
    with pytest.raises(Exception, match="operands must be present and of one type"):
        verify(parse_module(bad))
    with pytest.raises(Exception, match="must be 'sum'"):
        verify(parse_module(bad.replace("[2, 4]", "[2, 3]").replace('"sum"', '"max"')))


@pytest.mark.parametrize("act_order, tp", [(False, 2), (True, 2), (False, 3)])
def test_simulated_ranks_equal_the_unsharded_model(act_order, tp):
    """One thread per rank runs its rank program (its own weights only); the all_reduce is a
    barrier-synchronized sum: every rank ends with the unsharded model's output."""
    from qcompiler.runtime.ranks import rank_program, ranks_of, run_ranks

    base = _module(act_order)
    sharded = _sharded(base, tp)
    assert ranks_of(sharded) == tp and ranks_of(base) == 1
    mlp_bytes = sum(constant_value(base, n.arg("w")).size for n in base.main.nodes
                    if n.op == "qmatmul")
    for r in range(tp):
        prog = rank_program(sharded, r)
        verify(prog)
        qmms = [n for n in prog.main.nodes if n.op == "qmatmul"]
        assert {n.attrs["rank"] for n in qmms} == {r} and len(qmms) == 3
        assert sum(constant_value(prog, n.arg("w")).size for n in qmms) == mlp_bytes // tp
        (reduce,) = [n for n in prog.main.nodes if n.op == "all_reduce"]
        assert len(reduce.operands) == 1
    want = reference.run(base, _feeds(4))["y"]
    outs = run_ranks(sharded, _feeds(4))
    assert len(outs) == tp
    for r, out in enumerate(outs):
        np.testing.assert_allclose(out["y"], want, rtol=2e-5, atol=2e-5, err_msg=f"rank {r}")


def test_rank_program_refuses_a_rank_outside_the_degree():
    from qcompiler.errors import InputError
    from qcompiler.runtime.ranks import rank_program

    with pytest.raises(InputError, match="rank 2 is not one of the module's 2 ranks"):
        rank_program(_sharded(_module(False), 2), 2)


def test_fusion_after_sharding_keeps_each_rank_whole():
    """In a pipeline, shard runs before fuse-epilogue and fuse-elementwise: the SwiGLU product
    fuses into each rank's up projection, and every rank program still runs on its own."""
    from qcompiler.runtime.ranks import rank_program, run_ranks

    base = _module(act_order=True)
    fused = PassManager.parse("shard{tp=2},fuse-epilogue,fuse-elementwise").run(base.clone())
    assert sum(1 for n in fused.main.nodes if n.op == "qmatmul" and "epilogue" in n.attrs) >= 2
    for n in fused.main.nodes:
        if n.op in ("qmatmul", "fused_elementwise") and n.operands[0].producer is not None \
                and n.operands[0].producer.attrs.get("rank") is not None:
            assert n.attrs.get("rank") == n.operands[0].producer.attrs["rank"], n
    for r in range(2):
        verify(rank_program(fused, r))
    want = reference.run(base, _feeds(6))["y"]
    for out in run_ranks(fused, _feeds(6)):
        np.testing.assert_allclose(out["y"], want, rtol=2e-5, atol=2e-5)
