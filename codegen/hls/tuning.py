"""Tuning of the FPGA designs: PE and SIMD per layer, scored by the cost model, not measured.

An FPGA design is a DATAFLOW chain whose layers share one resource budget, so the unit that is
tuned is the whole design (``tune_design``): the knobs are every layer's ``pe`` (output
channels in parallel; divides n) and ``simd`` (32-bit words per PE per cycle; divides
words_per_group); a candidate is valid when the design fits ``utilization`` of the part's
resources; its score is the design's interval from ``cost_model.estimate_design``. The search
(``qcompiler.tuning.search.search``) starts from the greedy heuristic of ``hls-parallelism``
(``cost_model.choose_parallelism``) and needs no child processes: the cost model is plain
Python that cannot hang or crash a tuner.

Records: one per layer per candidate design, keyed by the layer's ``kernel_key(node, 1)`` (a
design streams one vector at a time) on device = the part, config ``{"pe", "simd"}``, and
``latency_us`` from the cycle counts at the part's clock: ``min`` = the design's interval,
``max`` = its latency, ``median`` = interval + latency / 1000, a score whose second term only
breaks ties between designs of equal interval, so that every layer's best record comes from
the same (best) design. ``runs`` is 0: estimated, not measured.

The per-kernel functions of the tuning contract (``search_space``, ``default_config``,
``check_config``, ``measure``) treat one layer as a design of its own, with nominal
fixed-point widths derived from the key (``nominal_layer_config``): the real widths depend on
the weights, which a key does not hold.
"""
from __future__ import annotations

import math
from typing import Optional

from qcompiler.codegen.hls.config import check_parallelism
from qcompiler.codegen.hls.cost_model import (RESOURCES, _divisors, _over_budget,
                                              choose_parallelism, estimate_design)

DEFAULT_UTILIZATION = 0.8   # the hls-parallelism pass's default


def _budget(target) -> dict:
    budget = target.params.get("resources")
    if target.backend != "hls" or not budget:
        raise ValueError(f"target {target.name!r} is not an FPGA target")
    return budget


def layer_knobs(cfg: dict) -> dict:
    """pe and simd candidates of one layer (from its hls-fixed-point config)."""
    return {"pe": _divisors(cfg["n"]), "simd": _divisors(cfg["words_per_group"])}


def nominal_layer_config(key: dict) -> dict:
    """An hls-fixed-point config for a key alone, at that pass's default formats.

    Shapes and packing follow the key exactly; the widths that depend on weight values
    (output and accumulator ranges) assume a 16-bit integer part. Only the resource estimate
    depends on them, never the cycle count.
    """
    from qcompiler.codegen.hls.design import codes_per_word, int_bits_for
    from qcompiler.tuning.key import scheme_of

    scheme = scheme_of(key)
    bits, k, n = scheme.bits, key["k"], key["n"]
    cpw = codes_per_word(bits)
    group = scheme.block_size if scheme.granularity == "group" else k
    group = -(-group // cpw) * cpw
    groups = -(-k // group)
    x_int, frac = int_bits_for(8.0), 10       # hls-fixed-point defaults: input_range 8, frac 10
    part_int = x_int + bits + 1 + max(0, math.ceil(math.log2(group)))
    return {"bits": bits, "signed_codes": int(scheme.dtype.kind == "int"),
            "codes_per_word": cpw, "group": group, "groups": groups, "k": k,
            "k_padded": groups * group, "n": n, "words_per_group": group // cpw,
            "x_width": x_int + frac, "x_int": x_int, "part_width": part_int + frac,
            "part_int": part_int, "scale_width": 18, "scale_frac": 16,
            "acc_width": 16 + 16, "acc_int": 16, "y_width": 16 + frac, "y_int": 16, "relu": 0}


# ---- the per-kernel tuning contract --------------------------------------------------------


def search_space(target, key: dict) -> dict:
    return layer_knobs(nominal_layer_config(key))


def check_config(target, key: dict, config: dict) -> Optional[str]:
    cfg = nominal_layer_config(key)
    pe, simd = config.get("pe"), config.get("simd")
    problem = check_parallelism(cfg, pe, simd)  # the backend's validator: plain ints that divide
    if problem:
        return problem
    over = _over_budget(estimate_design([(cfg, pe, simd)]), _budget(target), DEFAULT_UTILIZATION)
    return f"over budget: {'; '.join(over)}" if over else None


def default_config(target, key: dict) -> dict:
    cfg = nominal_layer_config(key)
    pe, simd = choose_parallelism([cfg], _budget(target), DEFAULT_UTILIZATION)[0]
    return {"pe": pe, "simd": simd}


def _latency_us(target, est: dict) -> dict:
    clock = float(target.params.get("clock_mhz") or 100.0)
    interval, latency = est["IntervalMin"] / clock, est["BestLatency"] / clock
    return {"median": interval + latency / 1000, "min": interval, "max": latency, "runs": 0}


def measure(target, key: dict, config: dict, workdir=None, repeats: int = 0) -> dict:
    """The cost model's estimate of one layer as a design of its own (nothing is built)."""
    problem = check_config(target, key, config)
    if problem:
        from qcompiler.tuning.errors import BuildError

        raise BuildError(problem)
    cfg = nominal_layer_config(key)
    return _latency_us(target, estimate_design([(cfg, config["pe"], config["simd"])]))


# ---- whole designs -------------------------------------------------------------------------


def tune_design(target, layers: list, *, log_path, trials: int = 500,
                strategy: str = "evolutionary", seed: int = 0,
                utilization: float = DEFAULT_UTILIZATION, patience: Optional[int] = None,
                progress=None) -> list:
    """Search (pe, simd) of every layer of a design; returns one ``KernelResult`` per layer.

    ``layers`` are ``(key, cfg, node_name)``: the layer's kernel key and its hls-fixed-point
    config. Every evaluated design appends one record per layer to ``log_path``.
    """
    from qcompiler.tuning import log as tlog
    from qcompiler.tuning.device import device_name
    from qcompiler.tuning.kernel_tuning import KernelResult
    from qcompiler.tuning.search import Space, Trial, search

    budget = _budget(target)
    device = device_name(target)
    cfgs = [cfg for _, cfg, _ in layers]
    knobs = {}
    for i, cfg in enumerate(cfgs):
        for name, values in layer_knobs(cfg).items():
            knobs[f"L{i}.{name}"] = values
    space = Space(knobs)

    def unpack(config: dict) -> list[tuple[int, int]]:
        return [(config[f"L{i}.pe"], config[f"L{i}.simd"]) for i in range(len(cfgs))]

    def is_valid(config: dict) -> bool:
        est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(cfgs, unpack(config))])
        return not _over_budget(est, budget, utilization)

    greedy = choose_parallelism(cfgs, budget, utilization)
    default = {}
    for i, (pe, simd) in enumerate(greedy):
        default.update({f"L{i}.pe": pe, f"L{i}.simd": simd})

    def evaluate(configs: list[dict]) -> list:
        out = []
        for config in configs:
            par = unpack(config)
            est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(cfgs, par)])
            lat = _latency_us(target, est)
            for (key, _, _), (pe, simd) in zip(layers, par):
                tlog.append(log_path, tlog.make_record(target.name, device, key,
                                                       {"pe": pe, "simd": simd}, lat, "ok"))
            out.append(Trial(-1, config, "ok", lat))
        return out

    if progress is not None:
        progress.start_kernel({"design": target.name, "layers": len(layers)}, trials)
    # Candidates cost milliseconds: be patient, local optima under a tight budget are common.
    patience = patience if patience is not None else max(100, trials // 3)
    res = search(space, evaluate, trials=trials, strategy=strategy, seed=seed, default=default,
                 is_valid=is_valid, batch_size=8, patience=patience,
                 on_trial=(lambda t, r: progress.trial(t, r)) if progress is not None else None)
    results = []
    best = res.best
    for i, (key, _, node_name) in enumerate(layers):
        per_layer = _project(res, i)
        kr = KernelResult(key, [node_name], per_layer,
                          {"pe": default[f"L{i}.pe"], "simd": default[f"L{i}.simd"]})
        results.append(kr)
    if progress is not None and results:
        progress.end_kernel(results[0])
    if best is not None:
        est = estimate_design([(c, pe, simd) for c, (pe, simd) in zip(cfgs, unpack(best.config))])
        for kr in results:
            kr.design_estimate = {r: est[r] for r in RESOURCES + ("IntervalMin", "BestLatency")}
    return results


def _project(res, i: int):
    """The design search seen from layer ``i``: its own knobs, the design's scores."""
    from qcompiler.tuning.search import SearchResult, Trial

    def one(t):
        return Trial(t.index, {"pe": t.config[f"L{i}.pe"], "simd": t.config[f"L{i}.simd"]},
                     t.status, t.latency_us, t.error, t.origin)

    return SearchResult([one(t) for t in res.trials], [one(t) for t in res.history],
                        res.stopped, res.seconds)
