"""Tuning one kernel key by measurement: ``tune_key`` runs the search (``search.py``) with
candidates built and measured in worker processes (``workers.py``), every candidate appended
to the tuning log, then measures the default and the fastest few again (``_confirm``).
"""
from __future__ import annotations

import hashlib
import importlib
import math
import os
import shutil
from dataclasses import dataclass
from typing import Optional

from qcompiler.tuning.search import SearchResult, Space, Trial, config_id, search
from qcompiler.tuning.workers import WorkerPool


def tuning_module_for(target):
    """The backend's tuning module, ``qcompiler.codegen.<backend>.tuning``."""
    name = f"qcompiler.codegen.{target.backend}.tuning"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ValueError(f"target {target.name!r}: the {target.backend} backend has no tuning "
                         f"module ({name}); it cannot be tuned") from None


def prior_from_log(records: list[dict], target_name: str, device: str, key: dict,
                   min_configs: int = 3) -> list[tuple[dict, float]]:
    """What the log says about configs of *other* kernels of this target and device.

    Per other key with at least ``min_configs`` measured configs: each config's log latency
    relative to that key's mean (negative: faster than usual for that shape). Shapes differ,
    but which knob values are good often carries over (stages, unrolls, vector widths).
    """
    from qcompiler.tuning import log as tlog
    from qcompiler.tuning.key import key_id

    own = key_id(key)
    others: dict[str, dict] = {}
    for r in records:
        if r["target"] == target_name and r["device"] == device and r["status"] == "ok" \
                and r["op"] == key.get("op") and key_id(r["key"]) != own:
            others.setdefault(key_id(r["key"]), r["key"])
    prior = []
    for other in others.values():
        scores = tlog.config_scores(records, target_name, device, other)
        if len(scores) < min_configs:
            continue
        logs = [math.log(score) for _, score, _ in scores if score > 0]
        mean = sum(logs) / len(logs)
        prior += [(config, math.log(score) - mean) for config, score, _ in scores if score > 0]
    return prior


def _key_hash(key: dict) -> str:
    from qcompiler.tuning.key import key_id

    return hashlib.sha1(key_id(key).encode()).hexdigest()[:10]


@dataclass
class KernelResult:
    """The outcome of tuning one key."""

    key: dict
    nodes: list[str]
    search: SearchResult
    default_config: Optional[dict]
    design_estimate: Optional[dict] = None   # FPGA: the best design's cost-model estimate
    # default and the fastest configs measured again at the end: config id -> medians
    confirmed: Optional[dict] = None
    # (config, score, records) per config from the log: what replay chooses by (measured only)
    scores: Optional[list] = None

    @property
    def best(self) -> Optional[Trial]:
        return self.search.best

    @property
    def default(self) -> Optional[Trial]:
        return self.search.default

    def summary(self) -> dict:
        """What was tuned and chosen. ``best_config`` / ``best_us`` are what replay uses: with
        ``scores``, the config of lowest score (median of its records) and that score, and
        ``default_us`` is the default's score; else the search's single best trial."""
        best, default = self.best, self.default
        best_config = best.config if best else None
        best_us = best.median if best else None
        default_us = default.median if default else None
        if self.scores:
            best_config, best_us, _ = min(self.scores, key=lambda t: t[1])
            default_us = next((score for config, score, _ in self.scores
                               if config == self.default_config), default_us)
        counts: dict[str, int] = {}
        for t in self.search.trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        return {
            "key": self.key, "nodes": self.nodes, "trials": len(self.search.trials),
            "statuses": counts, "stopped": self.search.stopped,
            "seconds": round(self.search.seconds, 3),
            "default_config": self.default_config,
            "default_us": default_us,
            "best_config": best_config,
            "best_us": best_us,
            "speedup": default_us / best_us if best_us and default_us else None,
            "search_best_us": best.median if best else None,
            "confirmed": self.confirmed,
            "from_log": len(self.search.history),
            "trial_points": [{"index": t.index, "median": t.median, "status": t.status}
                             for t in self.search.trials],
        }


def tune_key(target, key: dict, *, log_path, workdir, trials: int = 32,
             strategy: str = "evolutionary", seed: int = 0, module=None,
             build_workers: Optional[int] = None, timeout_s: float = 60.0,
             build_timeout_s: float = 300.0, repeats: Optional[int] = None,
             patience: Optional[int] = None, min_improvement: float = 0.01,
             reuse_log: bool = True, device: Optional[str] = None, progress=None,
             nodes: tuple = (), time_budget_s: Optional[float] = None,
             confirm: int = 1, confirm_top: int = 2) -> KernelResult:
    """Tune one kernel key on ``target``'s device; every candidate goes to the log.

    ``reuse_log``: configs of this key already in the log are not measured again and, with
    the records of other keys (``prior_from_log``), train the cost model.
    ``module``: the backend tuning module (default: the target's); ``build_workers``:
    processes building candidates in parallel when the module has ``build`` (default: the
    usable CPUs, as for a compile's ``jobs``; measuring waits until a batch is built);
    ``timeout_s``: limit of one ``measure`` call (``build_timeout_s`` of one ``build``);
    ``time_budget_s``: stop starting new batches after this long;
    ``confirm``: rounds in which the default and the ``confirm_top`` fastest configs are
    measured again, back to back (alternating order), so that a lucky measurement during the
    search does not decide alone; the records go to the log, and replay judges a config by
    the median of its records (``log.best_record``). 0 skips it.
    """
    from qcompiler.codegen.build import default_jobs
    from qcompiler.tuning import log as tlog
    from qcompiler.tuning.device import device_name

    module = module or tuning_module_for(target)
    device = device or device_name(target)
    space = Space(module.search_space(target, key))
    default = module.default_config(target, key)
    problem = module.check_config(target, key, default)
    if problem:
        raise ValueError(f"{target.name}: the heuristic default {default} is not valid for "
                         f"{key}: {problem}")

    def is_valid(config: dict) -> bool:
        return module.check_config(target, key, config) is None

    history, prior = [], []
    if reuse_log:
        records = tlog.read(log_path)
        for r in tlog.matching(records, target.name, device, key):
            history.append(Trial(-1, r["config"], r["status"], r["latency_us"], r["error"],
                                 origin="log"))
        prior = prior_from_log(records, target.name, device, key)
    has_build = callable(getattr(module, "build", None))
    workers = build_workers or default_jobs()
    key_dir = os.path.join(os.fspath(workdir), _key_hash(key))
    measure_kwargs = {} if repeats is None else {"repeats": repeats}
    build_pool = WorkerPool(module, workers) if has_build else None
    measure_pool = WorkerPool(module, 1)

    def evaluate(configs: list[dict]) -> list[Trial]:
        dirs = []
        for config in configs:
            # One fresh directory per config: nothing of an earlier run is picked up.
            d = os.path.join(key_dir, hashlib.sha1(config_id(config).encode()).hexdigest()[:10])
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            dirs.append(d)
        built = [("ok", None, None)] * len(configs)
        if build_pool is not None:
            built = build_pool.run([("build", (target, key, c, d), {})
                                    for c, d in zip(configs, dirs)], build_timeout_s)
        out = []
        for config, d, (b_status, _, b_error) in zip(configs, dirs, built):
            if b_status != "ok":
                # an unexpected exception while building is still a build failure
                status = "compile_error" if b_status == "runtime_error" else b_status
                t = Trial(-1, config, status, None, f"build: {b_error}")
            else:
                status, value, error = measure_pool.run(
                    [("measure", (target, key, config, d), measure_kwargs)], timeout_s)[0]
                problem = _check_latency(value) if status == "ok" else None
                if problem:
                    status, error = "runtime_error", problem
                t = Trial(-1, config, status, value if status == "ok" else None, error)
            tlog.append(log_path, tlog.make_record(target.name, device, key, config,
                                                   t.latency_us, t.status, t.error))
            out.append(t)
        return out

    def on_trial(t: Trial, result: SearchResult) -> None:
        if progress is not None:
            progress.trial(t, result)

    try:
        if progress is not None:
            progress.start_kernel(key, trials)
        res = search(space, evaluate, trials=trials, strategy=strategy, seed=seed,
                     default=default, is_valid=is_valid,
                     batch_size=workers if has_build else 1, patience=patience,
                     min_improvement=min_improvement, history=history, on_trial=on_trial,
                     time_budget_s=time_budget_s, prior=prior)
        confirmed = _confirm(res, default, evaluate, confirm, confirm_top)
    finally:
        measure_pool.close()
        if build_pool is not None:
            build_pool.close()
    scores = tlog.config_scores(tlog.read(log_path), target.name, device, key)
    kr = KernelResult(key, list(nodes), res, default, confirmed=confirmed, scores=scores)
    if progress is not None:
        progress.end_kernel(kr)
    return kr


def _confirm(res: SearchResult, default: dict, evaluate, rounds: int,
             top: int) -> Optional[dict]:
    """Measure the default and the ``top`` fastest distinct configs again, ``rounds`` times."""
    ranked = sorted((t for t in res.history + res.trials if t.median is not None),
                    key=lambda t: t.median)
    configs = [default]
    for t in ranked:
        if len(configs) > top:
            break
        if all(config_id(t.config) != config_id(c) for c in configs):
            configs.append(t.config)
    if rounds < 1 or len(configs) < 2:
        return None
    again: dict[str, list] = {config_id(c): [] for c in configs}
    for r in range(rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for t in evaluate(order):
            again[config_id(t.config)].append(t.median)
    return again


def _check_latency(value) -> Optional[str]:
    if not isinstance(value, dict):
        return f"measure returned {type(value).__name__}, not a latency dict"
    for f in ("median", "min", "max"):
        v = value.get(f)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return f"measure returned a bad {f} latency {v!r}"
    return None
