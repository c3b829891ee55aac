"""The autotuner: keys, the JSON Lines log, replay, child processes with time limits and
failure statuses, the search strategy against random search, early stopping, FPGA design
tuning by the cost model, the CLI and the plots, and (when the CPU backend exists) a real CPU
tuning run.

The synthetic backend at the top of this file is the tuning module of the machinery tests: the
tuner's worker processes import it by name (this file), so its functions must stay at module
level and import-safe.
"""
import json
import os
import random
import sys
import time

import numpy as np
import pytest

import qcompiler
import qcompiler.driver.api  # noqa: F401  (tests call qcompiler.driver.api.*)
from qcompiler.errors import InputError
from qcompiler.targets import get_target
from qcompiler.tuning import log as tlog
from qcompiler.tuning.device import NO_CUDA_DEVICE, device_name
from qcompiler.tuning.errors import BuildError, WrongResult
from qcompiler.tuning.key import describe, kernel_key, key_id, scheme_of
from qcompiler.tuning.tuner import (Space, Trial, pipeline_with_tuning_log, search, tune_key)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from make_example_model import float_mlp  # noqa: E402

KEY = {"op": "qmatmul", "m": 1, "k": 64, "n": 32,
       "w_scheme": "#quant<u4, symmetric, per_group(axis=0, block=32), scale=f32>",
       "act": "float", "x_dtype": "f32", "has_bias": False, "act_order": False}
FPGA_PASSES = ("canonicalize,quantize-weights{{bits=4,group=32}},fuse-dequant,canonicalize,"
               "hls-fixed-point,hls-parallelism{{target={target}}}")

# ---- a synthetic backend: latency is a known function of the config -----------------------
# "mode" selects a behaviour: ok, a build error, a hang past the time limit, a wrong result
# (the reference check in measure fails: it must never win), or a crash of the process.
FAKE_HANG_S = 60.0


def search_space(target, key):
    if key["x_dtype"] == "f16":   # the benchmark script's test: only well-behaved candidates
        return {"tile": [8, 16, 32, 64], "mode": ["ok"]}
    return {"tile": [8, 16, 32, 64], "mode": ["ok", "build_error", "hang", "wrong", "crash"]}


def default_config(target, key):
    return {"tile": 8, "mode": "ok"}


def check_config(target, key, config):
    return None if config["tile"] <= key["n"] else f"tile {config['tile']} > n {key['n']}"


def build(target, key, config, workdir):
    if config["mode"] == "build_error":
        raise BuildError(f"synthetic build failure for tile={config['tile']}")
    with open(os.path.join(workdir, "kernel.txt"), "w") as f:
        f.write(json.dumps(config))


def measure(target, key, config, workdir, repeats=3):
    assert os.path.exists(os.path.join(workdir, "kernel.txt")), "measure before build"
    mode = config["mode"]
    if mode == "hang":
        time.sleep(FAKE_HANG_S)
    if mode == "wrong":
        raise WrongResult("max |got - want| = 0.5 (tolerance 1e-3)")
    if mode == "crash":
        os._exit(7)
    lat = 100.0 / config["tile"]
    return {"median": lat, "min": lat * 0.9, "max": lat * 1.1, "runs": repeats}


# ---- keys and the log ----------------------------------------------------------------------


def _mlp_module(sizes=(64, 32, 16), act="Relu", quant="bits=4,group=32"):
    from qcompiler.driver.api import run_pipeline

    model = float_mlp(sizes=sizes, seed=0, act=act)
    module, _, _ = run_pipeline(qcompiler.driver.api.import_model(model),
                                f"canonicalize,quantize-weights{{{quant}}},fuse-dequant,"
                                "canonicalize")
    return module


def test_kernel_key_has_the_contract_fields_and_a_canonical_id():
    module = _mlp_module()
    nodes = [n for n in module.main.nodes if n.op == "qmatmul"]
    key = kernel_key(nodes[0], 4)
    assert set(key) == {"op", "m", "k", "n", "w_scheme", "act", "x_dtype", "has_bias",
                        "act_order"}
    assert (key["m"], key["k"], key["n"]) == (4, 64, 32)
    assert key["x_dtype"] == "f32" and key["act"] == "float" and key["act_order"] is False
    assert scheme_of(key) == nodes[0].attrs["w_scheme"]
    assert key_id(key) == key_id(dict(reversed(list(key.items()))))
    assert key_id(key) != key_id(kernel_key(nodes[0], 8))
    assert "m=4 k=64 n=32 u4 g32" in describe(key)
    with pytest.raises(ValueError, match="m must be a positive int"):
        kernel_key(nodes[0], 0)


def _record(device="dev-A", target="cpu", config=None, median=10.0, status="ok", key=KEY):
    lat = {"median": median, "min": median, "max": median, "runs": 3} if status == "ok" else None
    return tlog.make_record(target, device, key, config or {"tile": 8}, lat, status,
                            None if status == "ok" else "boom")


def test_log_appends_valid_records_and_replays_the_fastest_ok(tmp_path):
    path = tmp_path / "log.jsonl"
    tlog.append(path, _record(config={"tile": 8}, median=20.0))
    tlog.append(path, _record(config={"tile": 16}, median=5.0))
    tlog.append(path, _record(config={"tile": 32}, status="wrong_result"))
    tlog.append(path, _record(config={"tile": 64}, median=1.0, device="dev-B"))
    tlog.append(path, _record(config={"tile": 4}, median=2.0, key={**KEY, "m": 2}))
    records = tlog.read(path)
    assert len(records) == 5
    for r in records:
        assert tlog.validate(r) is None
        assert r["version"] == tlog.LOG_VERSION and r["qcompiler"] == qcompiler.__version__
    assert tlog.best_config(path, "cpu", "dev-A", KEY) == {"tile": 16}
    assert tlog.best_config(path, "cpu", "dev-B", KEY) == {"tile": 64}
    with pytest.warns(tlog.OtherDeviceRecords, match="dev-A, dev-B, not on this device"):
        assert tlog.best_config(path, "cpu", "dev-C", KEY) is None
    assert tlog.best_config(path, "cuda-sm90", "dev-A", KEY) is None
    with pytest.raises(InputError, match="missing.jsonl does not exist"):  # replay: no silent
        tlog.best_config(tmp_path / "missing.jsonl", "cpu", "dev-A", KEY)  # empty log (#18)
    with pytest.raises(ValueError, match="status"):
        tlog.make_record("cpu", "d", KEY, {}, None, "fine")


def test_replay_judges_a_config_measured_twice_by_its_median(tmp_path):
    path = tmp_path / "log.jsonl"
    tlog.append(path, _record(config={"tile": 8}, median=1.0))     # a lucky measurement ...
    tlog.append(path, _record(config={"tile": 16}, median=5.0))
    tlog.append(path, _record(config={"tile": 8}, median=20.0))    # ... not confirmed
    tlog.append(path, _record(config={"tile": 16}, median=6.0))
    assert tlog.best_config(path, "cpu", "dev-A", KEY) == {"tile": 16}
    records = tlog.read(path)
    scores = tlog.config_scores(records, "cpu", "dev-A", KEY)
    assert scores == [({"tile": 8}, 10.5, 2), ({"tile": 16}, 5.5, 2)]
    lowest = tlog.best_record(records, "cpu", "dev-A", KEY, per_config=False)
    assert lowest["config"] == {"tile": 8} and lowest["latency_us"]["median"] == 1.0


def test_a_corrupt_log_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "log.jsonl"
    tlog.append(path, _record(config={"tile": 8}, median=20.0))
    with open(path, "a") as f:
        f.write('{"version": 1, "target": "cpu", "dev\n')          # a truncated write
        f.write("not json at all\n")
        f.write(json.dumps({**_record(config={"tile": 2}, median=0.1), "version": 99}) + "\n")
    tlog.append(path, _record(config={"tile": 16}, median=9.0))
    with pytest.warns(tlog.CorruptLogLine) as caught:
        records = tlog.read(path)
    assert [r["config"]["tile"] for r in records] == [8, 16]
    messages = " ".join(str(w.message) for w in caught)
    assert ":2:" in messages and ":3:" in messages and "version 99" in messages
    with pytest.warns(tlog.CorruptLogLine):
        assert tlog.best_config(path, "cpu", "dev-A", KEY) == {"tile": 16}


def test_device_names(monkeypatch):
    monkeypatch.delenv("QC_TUNING_DEVICE", raising=False)
    assert device_name("fpga-u250") == get_target("fpga-u250").params["part"]
    assert device_name("cpu") and device_name("cpu") == device_name("cpu-x86-avx512")
    assert isinstance(device_name("cuda-sm90"), str) and device_name("cuda-sm90")
    # Without a CUDA driver (a build machine), the name matches no measured record.
    from qcompiler.tuning import device as device_module

    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(device_module.ctypes, "CDLL", no_driver)
    assert device_module.cuda_device_name.__wrapped__(0) == NO_CUDA_DEVICE
    monkeypatch.setenv("QC_TUNING_DEVICE", "NVIDIA H100 80GB HBM3")
    assert device_name("cuda-sm90") == "NVIDIA H100 80GB HBM3"


# ---- the tuner's machinery with the synthetic backend --------------------------------------


def test_failures_are_logged_with_their_status_and_never_stop_the_tuner(tmp_path):
    me = sys.modules[__name__]
    target = get_target("ref")
    log_path = tmp_path / "log.jsonl"
    # n=8: only tile 8 is valid, so the space is the 5 modes and 5 trials try every one.
    key = {**KEY, "n": 8}
    result = tune_key(target, key, log_path=log_path, workdir=tmp_path / "work", trials=5,
                      module=me, timeout_s=3.0, build_workers=2, device="fake-device",
                      strategy="random", seed=1)
    by_mode = {t.config["mode"]: t for t in result.search.trials}
    assert set(by_mode) == {"ok", "build_error", "hang", "wrong", "crash"}
    assert by_mode["ok"].status == "ok" and by_mode["ok"].median == pytest.approx(12.5)
    assert by_mode["build_error"].status == "compile_error"
    assert "synthetic build failure" in by_mode["build_error"].error
    assert by_mode["hang"].status == "timeout" and "time limit" in by_mode["hang"].error
    assert by_mode["wrong"].status == "wrong_result" and "tolerance" in by_mode["wrong"].error
    assert by_mode["crash"].status == "runtime_error" and "exit code 7" in by_mode["crash"].error
    records = tlog.read(log_path)
    assert sorted(r["status"] for r in records) == sorted(
        ["ok", "compile_error", "timeout", "wrong_result", "runtime_error"])
    assert all(r["device"] == "fake-device" and r["target"] == "ref" for r in records)
    assert all(r["error"] for r in records if r["status"] != "ok")
    assert tlog.best_config(log_path, "ref", "fake-device", key) == {"tile": 8, "mode": "ok"}
    assert result.best.config == {"tile": 8, "mode": "ok"}
    import multiprocessing

    assert multiprocessing.active_children() == []   # every worker was closed or killed


def test_tuner_starts_from_the_default_and_resumes_from_the_log(tmp_path):
    me = sys.modules[__name__]
    target = get_target("ref")
    log_path = tmp_path / "log.jsonl"
    key = {**KEY, "n": 64, "x_dtype": "f16"}   # f16: the synthetic space without failures
    first = tune_key(target, key, log_path=log_path, workdir=tmp_path / "w1", trials=3,
                     module=me, timeout_s=3.0, build_workers=1, device="fake-device", seed=0)
    assert first.search.trials[0].config == default_config(target, key)
    assert first.search.trials[0].origin == "default"
    assert first.summary()["default_us"] == pytest.approx(12.5)
    # The default and the 2 fastest are measured again at the end, back to back, and logged.
    assert first.best.config != default_config(target, key)
    again = first.confirmed
    assert len(again) == 3 and again[json.dumps(default_config(target, key), sort_keys=True,
                                                separators=(",", ":"))] == [12.5]
    assert first.summary()["best_us"] == pytest.approx(first.best.median)
    second = tune_key(target, key, log_path=log_path, workdir=tmp_path / "w2", trials=3,
                      module=me, timeout_s=3.0, build_workers=1, device="fake-device", seed=0,
                      confirm=0)
    seen_before = {json.dumps(t.config, sort_keys=True) for t in first.search.trials}
    assert not any(json.dumps(t.config, sort_keys=True) in seen_before
                   for t in second.search.trials), "a config of the log was measured again"
    assert len(second.search.history) == 3 + 3
    # 4 configs in all, 3 measured before: one is left, then the space is exhausted.
    assert len(second.search.trials) == 1 and second.search.stopped == "exhausted"
    assert second.best.median <= first.best.median
    assert len(tlog.read(log_path)) == 3 + 3 + 1


# ---- the search strategy -------------------------------------------------------------------


def _landscape(space: Space, rng: random.Random):
    """A latency function of a 6-knob space: a product of per-knob bowls around a random
    optimum, with an interaction between two knobs and multiplicative noise."""
    optimum = {name: rng.randrange(len(values)) for name, values in space.knobs.items()}
    names = space.names

    def latency(config):
        idx = {n: space.knobs[n].index(config[n]) for n in names}
        value = 10.0
        for n in names:
            value *= 1 + 0.25 * abs(idx[n] - optimum[n])
        value *= 1 + 0.1 * abs((idx[names[0]] - optimum[names[0]])
                               - (idx[names[1]] - optimum[names[1]]))
        return value * (1 + 0.02 * rng.random())
    return latency


def _run(strategy, seed, trials=48, batch_size=4):
    space = Space({f"k{i}": list(range(8)) for i in range(6)})   # 262144 configs
    latency = _landscape(space, random.Random(1000 + seed))
    default = {name: 4 for name in space.names}

    def evaluate(configs):
        out = []
        for c in configs:
            v = latency(c)
            out.append(Trial(-1, c, "ok", {"median": v, "min": v, "max": v, "runs": 1}))
        return out
    res = search(space, evaluate, trials=trials, strategy=strategy, seed=seed, default=default,
                 batch_size=batch_size, patience=trials)
    assert len(res.trials) == trials
    return res.best.median


@pytest.mark.parametrize("batch_size", [1, 4])   # 1: measured one at a time (no parallel build)
def test_evolutionary_search_beats_random_search_on_the_same_budget(batch_size):
    seeds = range(6)
    evo = [_run("evolutionary", s, batch_size=batch_size) for s in seeds]
    rnd = [_run("random", s, batch_size=batch_size) for s in seeds]
    wins = sum(e < r for e, r in zip(evo, rnd))
    assert wins >= 5, f"evolutionary {evo} vs random {rnd}"
    assert np.mean(evo) < 0.8 * np.mean(rnd)


def _bowl(space: Space, optimum: dict, rng: random.Random):
    def latency(config):
        value = 10.0
        for n in space.names:
            value *= 1 + 0.25 * abs(space.knobs[n].index(config[n]) - optimum[n])
        return value * (1 + 0.02 * rng.random())
    return lambda configs: [Trial(-1, c, "ok", {"median": latency(c), "min": 0.0, "max": 0.0,
                                                "runs": 1}) for c in configs]


def test_what_other_kernels_taught_warm_starts_the_search():
    """Two shapes whose best configs share 4 of 6 knobs: 12 trials on the second one go
    further with the first one's results as the cost model's prior."""
    from qcompiler.tuning.tuner import prior_from_log

    with_prior, without = [], []
    for seed in range(10):
        space = Space({f"k{i}": list(range(8)) for i in range(6)})
        rng = random.Random(seed)
        opt_a = {n: rng.randrange(8) for n in space.names}
        opt_b = {**opt_a, "k0": rng.randrange(8), "k1": rng.randrange(8)}
        default = {n: 4 for n in space.names}
        first = search(space, _bowl(space, opt_a, random.Random(seed)), trials=48, seed=seed,
                       default=default, batch_size=1, patience=48)
        records = [_record(config=t.config, median=t.median) for t in first.trials]
        prior = prior_from_log(records, "cpu", "dev-A", {**KEY, "m": 99})
        assert len(prior) == len({json.dumps(t.config, sort_keys=True) for t in first.trials})
        assert prior_from_log(records, "cpu", "dev-A", KEY) == []   # its own key: no prior
        for use, out in ((True, with_prior), (False, without)):
            second = search(space, _bowl(space, opt_b, random.Random(seed + 100)), trials=12,
                            seed=seed, default=default, batch_size=1, patience=12,
                            prior=prior if use else ())
            out.append(second.best.median)
    assert sum(a < b for a, b in zip(with_prior, without)) >= 8, (with_prior, without)
    assert np.mean(with_prior) < 0.7 * np.mean(without)


def test_early_stopping_ends_a_search_that_no_longer_improves():
    space = Space({"a": list(range(10)), "b": list(range(10))})

    def flat(configs):
        return [Trial(-1, c, "ok", {"median": 5.0, "min": 5.0, "max": 5.0, "runs": 1})
                for c in configs]
    res = search(space, flat, trials=80, seed=0, default={"a": 0, "b": 0}, batch_size=1,
                 patience=6)
    assert res.stopped == "early stop"
    assert len(res.trials) == 7   # the first trial sets the best; 6 more do not improve it
    tiny = search(Space({"a": [1, 2]}), flat, trials=10, seed=0, batch_size=1, patience=20)
    assert tiny.stopped == "exhausted" and len(tiny.trials) == 2


# ---- FPGA: the cost model as the measurement ------------------------------------------------


def test_fpga_per_kernel_contract():
    from qcompiler.codegen.hls import tuning as hls_tuning

    target = get_target("fpga-pynq-z2")
    key = {**KEY, "k": 256, "n": 128}
    space = hls_tuning.search_space(target, key)
    assert space["pe"] == [d for d in range(1, 129) if 128 % d == 0]
    assert space["simd"] == [1, 2, 4]            # 32 codes of 4 bits = 4 words per group
    default = hls_tuning.default_config(target, key)
    assert hls_tuning.check_config(target, key, default) is None
    assert "divide" in hls_tuning.check_config(target, key, {"pe": 3, "simd": 1})
    assert "over budget" in hls_tuning.check_config(target, key, {"pe": 128, "simd": 4})
    small = hls_tuning.measure(target, key, {"pe": 1, "simd": 1})
    fast = hls_tuning.measure(target, key, default)
    assert fast["min"] < small["min"] and small["runs"] == 0
    with pytest.raises(BuildError, match="divide"):
        hls_tuning.measure(target, key, {"pe": 3, "simd": 1})


def _fpga_model(tmp_path):
    import onnx

    path = tmp_path / "mlp.onnx"
    onnx.save(float_mlp(sizes=(128, 64, 32, 16), seed=3, act="Relu"), path)
    return str(path)


def test_fpga_tuning_writes_a_valid_log_and_replay_reproduces_it(tmp_path):
    target = "fpga-zcu104"
    model = _fpga_model(tmp_path)
    passes = FPGA_PASSES.format(target=target)
    out = tmp_path / "tune"
    summary = qcompiler.tune(model, target, output_dir=out, trials=40, passes=passes,
                             progress=False)
    records = tlog.read(summary["log"])
    assert records and all(tlog.validate(r) is None for r in records)
    assert {r["device"] for r in records} == {get_target(target).params["part"]}
    assert len(summary["kernels"]) == 3
    assert os.path.exists(out / "tuning_trials.png") and os.path.exists(out / "tuning_summary.txt")
    best_interval = min(r["latency_us"]["min"] for r in records)
    default_interval = summary["kernels"][0]["default_us"]
    assert best_interval <= default_interval + 1e-9   # the search starts from the heuristic

    _, replayed = qcompiler.driver.api.compile_to_dir(model, target, str(tmp_path / "a"),
                                                      passes, tuning_log=summary["log"])
    _, heuristic = qcompiler.driver.api.compile_to_dir(model, target, str(tmp_path / "b"),
                                                       passes)
    for node in (n for n in replayed.main.nodes if n.op == "qmatmul"):
        cfg = node.attrs["config"]
        assert cfg["source"] == "tuning-log"
        best = tlog.best_record(records, target, records[0]["device"], kernel_key(node, 1),
                                per_config=False)["config"]
        assert (cfg["pe"], cfg["simd"]) == (best["pe"], best["simd"])
    assert all(n.attrs["config"]["source"] == "heuristic"
               for n in heuristic.main.nodes if n.op == "qmatmul")
    est_replayed = replayed.metadata["hls_estimate"]["IntervalMin"]
    est_heuristic = heuristic.metadata["hls_estimate"]["IntervalMin"]
    assert est_replayed <= est_heuristic


def test_a_log_from_another_device_is_not_applied(tmp_path):
    model = _fpga_model(tmp_path)
    summary = qcompiler.tune(model, "fpga-pynq-z2", output_dir=tmp_path / "t", trials=8,
                             passes=FPGA_PASSES.format(target="fpga-pynq-z2"), progress=False,
                             plots=False)
    # Same kernels, same target name, another part: rewrite the device of every record.
    moved = tmp_path / "moved.jsonl"
    for r in tlog.read(summary["log"]):
        tlog.append(moved, {**r, "device": "xc7z010clg400-1"})
    passes = FPGA_PASSES.format(target="fpga-pynq-z2")
    with pytest.warns(UserWarning, match="no record"):
        _, module = qcompiler.driver.api.compile_to_dir(model, "fpga-pynq-z2",
                                                        str(tmp_path / "o"), passes,
                                                        tuning_log=str(moved))
    assert all(n.attrs["config"]["source"] == "heuristic"
               for n in module.main.nodes if n.op == "qmatmul")


def test_cli_tune_then_replay(tmp_path, capsys):
    from qcompiler.driver.cli import main

    model = _fpga_model(tmp_path)
    passes = FPGA_PASSES.format(target="fpga-pynq-z2")
    out = tmp_path / "out"
    assert main([model, "--target", "fpga-pynq-z2", "--passes", passes, "--tune",
                 "--trials", "12", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "best config" in err and "tuning [1/1]" in err
    log_path = out / "tuning_log.jsonl"
    assert len(tlog.read(log_path)) >= 3
    report = json.loads((out / "report.json").read_text())
    assert "tuning_log=" in report["pipeline"]
    replay = tmp_path / "replay"
    before = log_path.read_text()
    assert main([model, "--target", "fpga-pynq-z2", "--passes", passes, "--tuning-log",
                 str(log_path), "-o", str(replay)]) == 0
    assert log_path.read_text() == before   # replay measures nothing, appends nothing
    replay_report = json.loads((replay / "report.json").read_text())
    assert "tuning_log=" in replay_report["pipeline"]
    assert (replay / "kernels").is_dir()
    assert main([model, "--target", "ref", "--tuning-log", str(log_path),
                 "-o", str(tmp_path / "r")]) == 1
    assert "no tunable kernels" in capsys.readouterr().err


def test_pipeline_with_tuning_log_sets_the_option_of_the_tuning_pass():
    spec = pipeline_with_tuning_log(
        "canonicalize,hls-fixed-point,hls-parallelism{target=fpga-zcu104}", "hls-parallelism",
        "/tmp/log.jsonl")
    assert spec.endswith("hls-parallelism{target=fpga-zcu104,tuning_log=/tmp/log.jsonl}")
    with pytest.raises(ValueError, match="no 'hls-parallelism' pass"):
        pipeline_with_tuning_log("canonicalize", "hls-parallelism", "/tmp/log.jsonl")
    with pytest.raises(ValueError, match="cannot contain"):
        pipeline_with_tuning_log("hls-parallelism", "hls-parallelism", "/tmp/a,b.jsonl")


def test_roofline_plot_from_the_key_work(tmp_path):
    from qcompiler.tuning.plot import kernel_work, plot_roofline

    key = {**KEY, "m": 16, "k": 4096, "n": 4096,
           "w_scheme": "#quant<u4, affine, per_group(axis=0, block=128), scale=f16, zp=u4>",
           "x_dtype": "f16"}
    work = kernel_work(key)
    assert work["flops"] == 2 * 16 * 4096 * 4096
    weights = 4096 * 4096 / 2 + (4096 // 128) * 4096 * (2 + 0.5)
    assert work["bytes"] == pytest.approx(weights + 16 * 4096 * 2 * 2)
    summaries = [{"key": key, "best_us": 50.0, "default_us": 80.0}]
    path = plot_roofline(summaries, {"peak_gflops": 1000.0, "mem_bandwidth_gbs": 100.0},
                         str(tmp_path / "roof.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- CUDA: replay of a log into the tile pass (no GPU needed: the pass only reads the log) --


def test_cuda_tile_pass_replays_the_log_of_its_device_only(tmp_path, monkeypatch):
    cuda_cases = pytest.importorskip("qcompiler.codegen.cuda.cases")
    from qcompiler.codegen.cuda import tuning as cuda_tuning
    from qcompiler.driver.api import run_pipeline
    from qcompiler.passes.tile import M_BUCKETS
    from qcompiler.tuning.tuner import looked_up_kernels, tuning_pass_of

    target = get_target("cuda-sm90")
    monkeypatch.setenv("QC_TUNING_DEVICE", "NVIDIA H100 80GB HBM3")
    module = cuda_cases.make_module(cuda_cases.Case(k=512, n=256))
    # The tuner tunes exactly the keys that the tile pass looks up: one per M bucket.
    kernels = looked_up_kernels(module, target.default_pipeline, target)
    assert [k["m"] for k, _ in kernels] == list(M_BUCKETS)
    assert all(names == ["y"] for _, names in kernels)
    assert [k["m"] for k, _ in looked_up_kernels(module, target.default_pipeline, target,
                                                 [1, 12, 20, 300, 700])] == [8, 16, 32, 512,
                                                                             4096]
    key16 = kernels[1][0]
    assert key16["m"] == 16
    default = cuda_tuning.default_config(target, key16)
    space = Space(cuda_tuning.search_space(target, key16))
    rng = random.Random(0)
    tuned = next(c for c in (space.random(rng) for _ in range(1000))
                 if c != default and cuda_tuning.check_config(target, key16, c) is None)
    log_path = tmp_path / "log.jsonl"
    lat = {"median": 9.0, "min": 8.5, "max": 9.9, "runs": 50}
    tlog.append(log_path, tlog.make_record(target.name, "NVIDIA H100 80GB HBM3", key16, tuned,
                                           lat, "ok"))
    other = {**tuned, "split_k": 1} if tuned["split_k"] != 1 else {**tuned, "split_k": 2}
    tlog.append(log_path, tlog.make_record(target.name, "NVIDIA A100-SXM4-80GB", key16, other,
                                           {**lat, "median": 1.0}, "ok"))
    replay_spec = pipeline_with_tuning_log(target.default_pipeline, tuning_pass_of(target),
                                           log_path)
    replayed, _, _ = run_pipeline(module, replay_spec)
    variants = next(n for n in replayed.main.nodes if n.op == "qmatmul").attrs["config"][
        "variants"]
    assert variants["m16"]["source"] == "tuning-log"
    assert {k: variants["m16"][k] for k in tuned} == tuned
    assert all(variants[f"m{b}"]["source"] == "heuristic" for b in (8, 32, 64, 128))
    monkeypatch.setenv("QC_TUNING_DEVICE", "NVIDIA L4")
    with pytest.warns(tlog.OtherDeviceRecords, match="not on this device .NVIDIA L4"):
        elsewhere, _, _ = run_pipeline(module, replay_spec)
    assert next(n for n in elsewhere.main.nodes if n.op == "qmatmul").attrs["config"][
        "variants"]["m16"]["source"] == "heuristic"


# ---- CPU: a real tuning run on a small layer ------------------------------------------------


@pytest.mark.slow
def test_cpu_tuning_run_writes_a_valid_log_and_replay_reproduces_the_choice(tmp_path):
    pytest.importorskip("tvm")
    pytest.importorskip("qcompiler.codegen.cpu.tuning")
    import onnx

    from make_example_model import quantize_matmul_nbits
    from qcompiler.driver.api import compile_to_dir, import_model
    from qcompiler.runtime.reference import run as reference_run

    if not get_target("cpu").available:
        pytest.skip("the cpu target is not available in this version")
    model_path = tmp_path / "layer.onnx"
    onnx.save(quantize_matmul_nbits(float_mlp(sizes=(128, 64), seed=5), bits=4, block_size=32),
              model_path)
    out = tmp_path / "tune"
    summary = qcompiler.tune(str(model_path), "cpu", output_dir=out, trials=5, m=1,
                             progress=False)
    records = tlog.read(summary["log"])
    (kernel,) = summary["kernels"]
    # + the default and the fastest measured again at the end
    assert len(records) == 5 + sum(len(v) for v in (kernel["confirmed"] or {}).values())
    assert all(tlog.validate(r) is None for r in records)
    assert {(r["target"], r["device"]) for r in records} == {("cpu", device_name("cpu"))}
    assert {r["key"]["m"] for r in records} == {1}
    ok = [r for r in records if r["status"] == "ok"]
    assert ok and all(r["latency_us"]["median"] > 0 and r["latency_us"]["runs"] > 0 for r in ok)
    assert kernel["default_us"] is not None and kernel["best_us"] <= kernel["default_us"]
    for png in ("tuning_trials.png", "tuning_roofline.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    best = tlog.best_config(summary["log"], "cpu", device_name("cpu"), kernel["key"])
    assert best == kernel["best_config"]
    out_dir, module = compile_to_dir(str(model_path), "cpu", str(tmp_path / "replayed"),
                                     tuning_log=summary["log"])
    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    variants = list(node.attrs["config"]["variants"].values())
    served_by_log = [v for v in variants if v["source"] == "tuning-log"]
    assert len(served_by_log) == 1 and served_by_log[0]["m"] == 1
    assert {k: served_by_log[0][k] for k in best} == best
    x = np.random.default_rng(11).standard_normal((1, 128)).astype(np.float32)
    got = qcompiler.load(out_dir).run({"x": x})["y"]
    want = reference_run(import_model(str(model_path)), {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_tune_cuda_benchmark_script_reports_tuned_against_heuristic(tmp_path, monkeypatch,
                                                                    capsys):
    """benchmarks/tune_cuda.py end to end, with the synthetic backend in place of the GPU."""
    pytest.importorskip("qcompiler.codegen.cuda.cases")
    import importlib.util

    from qcompiler.tuning import tuner

    spec = importlib.util.spec_from_file_location(
        "tune_cuda", os.path.join(ROOT, "benchmarks", "tune_cuda.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("QC_TUNING_DEVICE", "FAKE GPU")
    monkeypatch.setattr(tuner, "tuning_module_for", lambda target: sys.modules[__name__])
    out = tmp_path / "tune.json"
    assert script.main(["--shapes", "256x512", "--buckets", "16", "--trials", "4",
                        "--out", str(out), "--log", str(tmp_path / "log.jsonl"),
                        "--workdir", str(tmp_path / "work")]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "FAKE GPU" and doc["target"] == "cuda-sm90" and doc["date"]
    (entry,) = doc["shapes"]
    assert (entry["n"], entry["k"], entry["m_bucket"], entry["trials"]) == (256, 512, 16, 4)
    assert entry["key"]["m"] == 16 and entry["key"]["x_dtype"] == "f16"
    assert entry["search_best_us"] <= entry["search_default_us"] == pytest.approx(12.5)
    (row,) = entry["head_to_head"]
    assert row["m"] == 16 and row["tuned_us"] <= row["default_us"]
    assert entry["tuning_seconds"] > 0 and doc["tuning_seconds"]["max"] > 0
    assert len(tlog.read(tmp_path / "log.jsonl")) == 4
    assert "256    512   16" in capsys.readouterr().out
