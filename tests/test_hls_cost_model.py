"""The HLS cost model (codegen/hls/cost_model.py) and the hls-parallelism pass."""
import os
import sys

import pytest

from qcompiler.codegen.hls.cost_model import (RESOURCES, choose_parallelism, estimate_design,
                                              estimate_layer)
from qcompiler.driver.api import run_pipeline
from qcompiler.frontends.onnx import load
from qcompiler.pipeline import PassError, make_pass
from qcompiler.targets import get_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from make_example_model import float_mlp  # noqa: E402


def make_cfg(k, n, bits, group, relu=True):
    """A config as hls-fixed-point writes it, with plausible widths."""
    cpw = 32 // bits
    groups = -(-k // group)
    return {"bits": bits, "signed_codes": 0, "codes_per_word": cpw, "group": group,
            "k": k, "k_padded": groups * group, "n": n, "groups": groups,
            "words_per_group": group // cpw, "x_width": 16, "x_int": 6,
            "part_width": 32, "part_int": 22, "scale_width": 18, "scale_frac": 16,
            "acc_width": 40, "acc_int": 16, "y_width": 16, "y_int": 6, "relu": int(relu)}


# 784 -> 256 -> 256 -> 10: 4-bit group 32, 8-bit group 64, 4-bit group 32.
MLP = [make_cfg(784, 256, 4, 32), make_cfg(256, 256, 8, 64), make_cfg(256, 10, 4, 32, False)]


def budget(target):
    return get_target(target).params["resources"]


def fits(par, target, utilization=0.8):
    est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(MLP, par)])
    return all(est[r] <= utilization * budget(target)[r] for r in RESOURCES)


def test_report_keys_and_latency_is_fixed():
    e = estimate_layer(MLP[0], 1, 1)
    for key in ("BestLatency", "WorstLatency", "IntervalMin", *RESOURCES):
        assert isinstance(e[key], int) and e[key] >= 0, key
    assert e["BestLatency"] == e["WorstLatency"]  # no data-dependent loops
    assert e["IntervalMin"] >= e["BestLatency"]
    assert e["BestLatency"] == 2 + sum(e["cycles"].values())


def test_doubling_pe_halves_compute_and_doubles_multipliers():
    for cfg in MLP[:2]:
        a, b = estimate_layer(cfg, 2, 1), estimate_layer(cfg, 4, 1)
        assert b["cycles"]["compute"] * 2 == a["cycles"]["compute"]
        assert b["cycles"]["load"] == a["cycles"]["load"]  # K cycles whatever pe
        assert b["products"] == 2 * a["products"]
        assert 1.6 < (b["LUT"] + b["DSP"]) / (a["LUT"] + a["DSP"]) < 2.1
        assert b["BestLatency"] < a["BestLatency"]


def test_simd_shortens_the_word_loop_only():
    cfg = MLP[1]  # 8-bit: 4 codes a word, 16 words a group
    a, b = estimate_layer(cfg, 1, 1), estimate_layer(cfg, 1, 2)
    steps = cfg["words_per_group"]
    assert a["cycles"]["compute"] - b["cycles"]["compute"] == cfg["n"] * cfg["groups"] * (
        steps - steps // 2 - 1)  # half the steps, one more adder-tree level
    assert b["products"] == 2 * a["products"]


def test_multiplier_mapping():
    # 4-bit codes: 5 x 16-bit products in LUTs; only the per-group scale uses DSPs (32 x 18).
    e4 = estimate_layer(MLP[0], 4, 1)
    assert e4["DSP"] == 4 * 2
    # 8-bit codes: 9 x 16-bit products go to DSPs, one each.
    e8 = estimate_layer(MLP[1], 4, 1)
    assert e8["DSP"] == e8["products"] + 4 * 2


def test_bram_grows_with_weight_size():
    small = estimate_layer(make_cfg(1024, 256, 4, 32), 1, 1)
    large = estimate_layer(make_cfg(4096, 256, 4, 32), 1, 1)
    wide = estimate_layer(make_cfg(1024, 256, 8, 32), 1, 1)
    assert large["BRAM_18K"] > 3 * small["BRAM_18K"]
    assert wide["BRAM_18K"] > small["BRAM_18K"]
    assert small["URAM"] == large["URAM"] == 0


def test_design_totals():
    par = [(2, 1), (4, 2), (5, 1)]
    est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(MLP, par)])
    for r in RESOURCES:
        assert est[r] == sum(layer[r] for layer in est["layers"])
    assert est["IntervalMin"] == max(layer["IntervalMin"] for layer in est["layers"])
    assert est["BestLatency"] > sum(layer["BestLatency"] for layer in est["layers"])


def test_bad_parallelism_is_refused():
    with pytest.raises(ValueError, match="pe=3 must divide n=256"):
        estimate_layer(MLP[0], 3, 1)
    with pytest.raises(ValueError, match="simd=8 must divide words_per_group=4"):
        estimate_layer(MLP[0], 1, 8)


@pytest.mark.parametrize("target", ["fpga-pynq-z2", "fpga-u250"])
def test_choice_fits_the_budget(target):
    par = choose_parallelism(MLP, budget(target))
    assert fits(par, target)
    for cfg, (pe, simd) in zip(MLP, par):
        assert cfg["n"] % pe == 0 and cfg["words_per_group"] % simd == 0
    assert par != [(1, 1)] * 3  # both parts have room for more than the smallest design
    assert choose_parallelism(MLP, budget(target)) == par  # deterministic


def test_bigger_part_gets_more_parallelism():
    small = choose_parallelism(MLP, budget("fpga-pynq-z2"))
    large = choose_parallelism(MLP, budget("fpga-u250"))

    def design(par):
        return estimate_design([(c, pe, simd) for c, (pe, simd) in zip(MLP, par)])

    assert sum(pe * simd for pe, simd in large) > sum(pe * simd for pe, simd in small)
    assert design(large)["IntervalMin"] < design(small)["IntervalMin"] / 4


def test_lower_utilization_and_max_pe_are_respected():
    par = choose_parallelism(MLP, budget("fpga-u250"), utilization=0.2, max_pe=16)
    assert fits(par, "fpga-u250", 0.2)
    assert max(pe for pe, _ in par) <= 16


def test_impossible_budget_names_the_resource():
    tiny = {**budget("fpga-pynq-z2"), "BRAM_18K": 10}
    with pytest.raises(ValueError, match=r"BRAM_18K = \d+ > 8 \(80% of 10\)"):
        choose_parallelism(MLP, tiny)


# ---- the pass on a real module ----------------------------------------------------------


def fixed_point_module():
    module = load(float_mlp((784, 256, 256, 10), act="Relu"))
    module, _, _ = run_pipeline(
        module, "canonicalize,quantize-weights{bits=4,group=32},fuse-dequant,hls-fixed-point")
    return module


@pytest.mark.parametrize("target", ["fpga-pynq-z2", "fpga-u250"])
def test_pass_writes_pe_simd_and_the_estimate(target):
    module = fixed_point_module()
    out = make_pass("hls-parallelism", {"target": target})(module)
    nodes = [n for n in out.main.nodes if n.op == "qmatmul"]
    assert len(nodes) == 3
    for node in nodes:
        cfg = node.attrs["config"]
        assert cfg["n"] % cfg["pe"] == 0 and cfg["words_per_group"] % cfg["simd"] == 0
    est = out.metadata["hls_estimate"]
    assert est["target"] == target and len(est["layers"]) == 3
    assert [layer["name"] for layer in est["layers"]] == [n.result.name for n in nodes]
    for r in RESOURCES:
        assert est[r] <= 0.8 * budget(target)[r]
        assert est[f"Available{r}"] == budget(target)[r]
    stats = out.metadata["pass_stats"]["hls-parallelism"]
    assert stats["IntervalMin"] == est["IntervalMin"] and stats["layers"] == 3
    # The caller's module is untouched (passes run on a clone).
    assert all("pe" not in n.attrs["config"] for n in module.main.nodes if n.op == "qmatmul")


def test_pass_in_a_pipeline_string():
    module = fixed_point_module()
    out, records, spec = run_pipeline(module, "hls-parallelism{target=fpga-zcu104}")
    assert spec == "hls-parallelism{target=fpga-zcu104}"
    assert records[0]["IntervalMin"] == out.metadata["hls_estimate"]["IntervalMin"]


def test_pass_needs_fixed_point_config():
    module = load(float_mlp((64, 32, 8), act="Relu"))
    module, _, _ = run_pipeline(module, "canonicalize,quantize-weights{bits=4,group=32},"
                                        "fuse-dequant")
    with pytest.raises(PassError, match="run hls-fixed-point first"):
        make_pass("hls-parallelism")(module)


@pytest.mark.parametrize("target, message", [
    ("ref", "served by the 'reference' backend, not 'hls'"),
    ("no-such-target", "unknown target"),
])
def test_pass_needs_an_fpga_target(target, message):
    with pytest.raises(PassError, match=message):
        make_pass("hls-parallelism", {"target": target})(fixed_point_module())


def test_pass_reports_a_design_that_cannot_fit():
    module = load(float_mlp((1024, 1024, 8), act="Relu"))
    module, _, _ = run_pipeline(module, "canonicalize,quantize-weights{bits=8,group=64},"
                                        "fuse-dequant,hls-fixed-point")
    with pytest.raises(PassError, match=r"does not fit: .*BRAM_18K.*fpga-pynq-z2"):
        make_pass("hls-parallelism", {"target": "fpga-pynq-z2"})(module)
