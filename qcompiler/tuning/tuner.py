"""The autotuner: search a backend's config space for each distinct kernel, measured on the device.

For every key (``key.kernel_key``) the tuner

1. asks the backend's tuning module (``qcompiler.codegen.<backend>.tuning``, the contract in
   ``qcompiler/tuning/__init__.py``) for the search space and the heuristic default;
2. proposes candidates: first the default, then a model-guided evolutionary search
   (``EvolutionarySearch``) or, for comparison, plain random search (``RandomSearch``);
3. builds each batch in parallel worker processes when the backend has a ``build`` function
   (the CPU and CUDA backends build through ``qcompiler.codegen.build``, the compile's key
   and cache, so a config measured again is not compiled again), then measures the
   candidates one at a time (so that they do not disturb each other's timing), each call in
   a child process under a time limit: a candidate that hangs or crashes is killed with its
   worker, recorded, and the tuner goes on;
4. appends one record per measured candidate to the log (``log.append``), ok or not;
5. stops when the trial budget is spent, the space is exhausted, ``patience`` trials in a
   row brought no improvement of at least ``min_improvement`` (early stopping), or the time
   budget is over;
6. measures the default and the fastest few again, back to back, so that one lucky
   measurement does not decide alone (replay judges a config by the median of its records).

``tune(model, target)`` (``qcompiler.tune``, ``qcompile --tune``) does this for every key that
the target's config-choosing pass looks up, then writes the summary table and the plots.

Only ``status == "ok"`` records can win, and a backend's ``measure`` returns ok only after it
checked its output against the reference, so a fast wrong kernel never becomes the best.

``search(...)`` is the strategy loop alone, with the evaluation passed in; the FPGA backend
uses it with its cost model instead of measurements (``codegen/hls/tuning.py``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Optional

STRATEGIES = ("evolutionary", "random")
DEFAULT_TRIALS = 32               # measured candidates per kernel
DEFAULT_TRIALS_COST_MODEL = 500   # FPGA designs: scored by the cost model, ~2 ms each
MAX_ERROR_CHARS = 2000   # errors are kept in the log; a compiler's full output can be huge


# --------------------------------------------------------------------------------------------
# configs and spaces
# --------------------------------------------------------------------------------------------


def config_id(config: dict) -> str:
    """Canonical text of a config: equal configs give equal ids."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


class Space:
    """A product of knobs, each with an ordered list of candidate values.

    The order of a knob's values is meaningful for mutation: a small step moves to a
    neighbouring value (tiles 32 -> 64), as tuning knobs are mostly ordinal.
    """

    def __init__(self, knobs: dict[str, list]):
        if not knobs:
            raise ValueError("a search space needs at least one knob")
        for name, values in knobs.items():
            if not values:
                raise ValueError(f"knob {name!r} has no candidate values")
        self.knobs = {name: list(values) for name, values in knobs.items()}
        self.names = list(self.knobs)

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.knobs.values())

    def random(self, rng: random.Random) -> dict:
        return {name: rng.choice(values) for name, values in self.knobs.items()}

    def _index(self, name: str, value) -> int:
        values = self.knobs[name]
        return values.index(value) if value in values else 0

    def mutate(self, config: dict, rng: random.Random) -> dict:
        """Change one knob (sometimes two): mostly a step to a neighbouring value."""
        out = dict(config)
        changes = 2 if len(self.names) > 1 and rng.random() < 0.3 else 1
        for name in rng.sample(self.names, changes):
            values = self.knobs[name]
            if len(values) == 1:
                continue
            if rng.random() < 0.7:
                i = self._index(name, out.get(name)) + rng.choice((-1, 1))
                out[name] = values[min(max(i, 0), len(values) - 1)]
            else:
                out[name] = rng.choice(values)
        return out

    def crossover(self, a: dict, b: dict, rng: random.Random) -> dict:
        return {name: (a if rng.random() < 0.5 else b).get(name) for name in self.names}

    def features(self, config: dict) -> list[float]:
        """One-hot encoding of every knob's value (the cost model's input)."""
        out = []
        for name, values in self.knobs.items():
            hot = [0.0] * len(values)
            if config.get(name) in values:
                hot[values.index(config.get(name))] = 1.0
            out.extend(hot)
        return out


class CostModel:
    """Ridge regression of log(latency) on the one-hot knob values.

    An additive model in log space says each knob value multiplies the latency by a factor,
    which is how tiles, vector widths and unrolls mostly behave; it is cheap, needs a handful
    of points, and only ranks candidates (the measurement decides).

    ``prior``: (config, relative log latency) pairs from other kernels of the same target and
    device (``prior_from_log``); they enter with weight ``prior_weight``, shifted to this
    kernel's mean, so that what was fast for other shapes guides the first batches.
    """

    def __init__(self, space: Space, ridge: float = 0.3, prior_weight: float = 0.3):
        self.space = space
        self.ridge = ridge
        self.prior_weight = prior_weight
        self.weights = None

    def fit(self, configs: list[dict], latencies: list[float], prior: tuple = ()) -> None:
        import numpy as np

        if len(configs) + len(prior) < 4 or not configs:
            self.weights = None
            return
        y_own = np.log(np.array(latencies, dtype=np.float64))
        y = np.concatenate([y_own, [rel + y_own.mean() for _, rel in prior]])
        x = np.array([[1.0] + self.space.features(c) for c in configs]
                     + [[1.0] + self.space.features(c) for c, _ in prior])
        w = np.concatenate([np.ones(len(configs)), np.full(len(prior), self.prior_weight)])
        reg = self.ridge * np.eye(x.shape[1])
        reg[0, 0] = 0.0  # the intercept is not shrunk
        self.weights = np.linalg.solve(x.T @ (w[:, None] * x) + reg, x.T @ (w * y))

    def predict(self, config: dict) -> Optional[float]:
        if self.weights is None:
            return None
        import numpy as np

        return float(np.exp(np.dot([1.0] + self.space.features(config), self.weights)))


@dataclass
class Trial:
    """One evaluated candidate."""

    index: int
    config: dict
    status: str
    latency_us: Optional[dict] = None
    error: Optional[str] = None
    origin: str = "search"   # "default" | "search" | "log" (measured in an earlier run)

    @property
    def median(self) -> Optional[float]:
        return self.latency_us["median"] if self.status == "ok" and self.latency_us else None


class Strategy:
    """Proposes batches of unseen valid configs and learns from their results."""

    def __init__(self, space: Space, is_valid: Callable[[dict], bool], seed: int = 0,
                 default: Optional[dict] = None, prior: tuple = ()):
        self.space = space
        self.is_valid = is_valid
        self.rng = random.Random(seed)
        self.default = default
        self.prior = list(prior)   # (config, relative log latency) of other kernels
        self.seen: set[str] = set()
        self.ok: list[tuple[float, dict]] = []
        self.failed: list[dict] = []

    def observe(self, config: dict, median: Optional[float]) -> None:
        self.seen.add(config_id(config))
        if median is not None:
            self.ok.append((median, config))
        else:
            self.failed.append(config)

    def _fresh(self, config: dict, taken: set[str]) -> bool:
        cid = config_id(config)
        if cid in self.seen or cid in taken or not self.is_valid(config):
            return False
        taken.add(cid)
        return True

    def _random_batch(self, n: int, taken: set[str], attempts: int = 200) -> list[dict]:
        out = []
        for _ in range(attempts * max(n, 1)):
            if len(out) >= n:
                break
            c = self.space.random(self.rng)
            if self._fresh(c, taken):
                out.append(c)
        return out

    def propose(self, n: int) -> list[dict]:
        raise NotImplementedError


class RandomSearch(Strategy):
    """Uniform random valid configs without repetition (the baseline to beat).

    It does not start from the default: it is the plain random search of the comparison.
    """

    def propose(self, n: int) -> list[dict]:
        return self._random_batch(n, set())


class EvolutionarySearch(Strategy):
    """Model-guided evolution, started from the heuristic default.

    Each batch: children of the best configs so far (tournament selection; mutation, mostly
    to neighbouring values, or crossover) plus a few random configs, many more than needed;
    the cost model (fitted on every ok result so far, earlier runs' log records included)
    ranks them and the best predicted are measured, with one in four slots (or, for batches
    of one, one batch in four) left to unranked picks so that the model's blind spots still
    get explored.
    """

    random_fraction = 0.1   # of the candidate pool: fresh random configs (global moves)

    def __init__(self, *args, pool_factor: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool_factor = pool_factor
        self.model = CostModel(self.space)

    def _prior_best(self, count: int) -> list[dict]:
        """The configs fastest for other kernels, as points of this space (unseen ones)."""
        out = []
        for config, _ in sorted(self.prior, key=lambda t: t[1]):
            point = {k: config.get(k) for k in self.space.names}
            if all(point[k] in v for k, v in self.space.knobs.items()) \
                    and config_id(point) not in self.seen and point not in out:
                out.append(point)
            if len(out) >= count:
                break
        return out

    def _parents(self) -> list[dict]:
        ranked = [c for _, c in sorted(self.ok, key=lambda t: t[0])]
        return ranked[:max(4, len(ranked) // 3)]

    def propose(self, n: int) -> list[dict]:
        taken: set[str] = set()
        batch: list[dict] = []
        if self.default is not None and self._fresh(self.default, taken):
            batch.append(dict(self.default))
        parents = self._parents()
        prior_best = self._prior_best(2 * n)
        if not parents:
            # Warm start: half the free slots for what was fastest for other kernels.
            free = n - len(batch)
            for config in prior_best[:free - free // 2]:
                if self._fresh(config, taken):
                    batch.append(config)
            return batch + self._random_batch(n - len(batch), taken)
        pool: list[dict] = [c for c in prior_best if self._fresh(c, taken)]
        for _ in range(self.pool_factor * n * 4):
            if len(pool) >= self.pool_factor * n:
                break
            r = self.rng.random()
            if r < self.random_fraction:
                child = self.space.random(self.rng)
            elif r < self.random_fraction + 0.25 and len(parents) > 1:
                a, b = self.rng.sample(parents, 2)
                child = self.space.mutate(self.space.crossover(a, b, self.rng), self.rng) \
                    if self.rng.random() < 0.3 else self.space.crossover(a, b, self.rng)
            else:
                # tournament of two: the better parent wins more often
                a, b = self.rng.choice(parents), self.rng.choice(parents)
                child = self.space.mutate(a if parents.index(a) <= parents.index(b) else b,
                                          self.rng)
            if self._fresh(child, taken):
                pool.append(child)
        # Failed candidates teach the model too: as if they were much slower than the worst
        # ok one, so that knob values that fail to build or time out are avoided.
        penalty = 4.0 * max(m for m, _ in self.ok)
        self.model.fit([c for _, c in self.ok] + self.failed,
                       [m for m, _ in self.ok] + [penalty] * len(self.failed), self.prior)
        want = n - len(batch)
        if self.model.weights is not None and len(pool) > want:
            explore = want // 4
            if explore == 0 and self.rng.random() < 0.25:
                explore = 1   # small batches (one at a time): explore every fourth batch
            ranked = sorted(pool, key=self.model.predict)
            batch += ranked[:want - explore]
            rest = ranked[want - explore:]
            batch += self.rng.sample(rest, min(explore, len(rest)))
        else:
            batch += pool[:want]
        if len(batch) < n:  # parents exhausted their neighbourhoods
            batch += self._random_batch(n - len(batch), taken)
        return batch


def make_strategy(name: str, space: Space, is_valid, seed: int = 0,
                  default: Optional[dict] = None, prior: tuple = ()) -> Strategy:
    if name == "evolutionary":
        return EvolutionarySearch(space, is_valid, seed=seed, default=default, prior=prior)
    if name == "random":
        return RandomSearch(space, is_valid, seed=seed, default=default)
    raise ValueError(f"unknown search strategy {name!r}; choose one of {STRATEGIES}")


@dataclass
class SearchResult:
    trials: list[Trial] = field(default_factory=list)    # evaluated in this run, in order
    history: list[Trial] = field(default_factory=list)   # from earlier runs (the log)
    stopped: str = ""          # why the search ended: "budget", "early stop", "exhausted"
    seconds: float = 0.0

    @property
    def best(self) -> Optional[Trial]:
        ok = [t for t in self.history + self.trials if t.median is not None]
        return min(ok, key=lambda t: t.median) if ok else None

    @property
    def default(self) -> Optional[Trial]:
        return next((t for t in self.trials + self.history if t.origin == "default"), None)


def search(space: Space, evaluate: Callable[[list[dict]], list[Trial]], *, trials: int,
           strategy: str = "evolutionary", seed: int = 0, default: Optional[dict] = None,
           is_valid: Callable[[dict], bool] = lambda c: True, batch_size: int = 4,
           patience: Optional[int] = None, min_improvement: float = 0.01,
           history: tuple = (), on_trial: Callable[[Trial, SearchResult], None] = None,
           time_budget_s: Optional[float] = None, prior: tuple = ()) -> SearchResult:
    """Run ``strategy`` for at most ``trials`` evaluations of ``evaluate(configs) -> trials``.

    ``history`` holds trials of earlier runs (origin "log"): they are not measured again and
    they train the cost model. Early stopping: after ``patience`` evaluations in a row without
    improving the best by ``min_improvement`` (a fraction), the search ends; it also ends
    when ``time_budget_s`` has passed (checked between batches). ``prior``: what other
    kernels' searches learned (``prior_from_log``), for the evolutionary strategy.
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, not {trials}")
    patience = patience if patience is not None else max(8, trials // 3)
    strat = make_strategy(strategy, space, is_valid, seed, default, prior)
    result = SearchResult(history=list(history))
    start = time.monotonic()
    best = math.inf
    for t in history:
        strat.observe(t.config, t.median)
        if t.median is not None:
            best = min(best, t.median)
        if default is not None and config_id(t.config) == config_id(default):
            t.origin = "default"
    if default is not None and config_id(default) in strat.seen:
        strat.default = None  # measured in an earlier run: its record is in the history
    since_improvement = 0
    while len(result.trials) < trials:
        batch = strat.propose(min(batch_size, trials - len(result.trials)))
        if not batch:
            result.stopped = "exhausted"
            break
        done = evaluate(batch)
        for t in done:
            t.index = len(result.trials)
            if default is not None and config_id(t.config) == config_id(default):
                t.origin = "default"
            result.trials.append(t)
            strat.observe(t.config, t.median)
            if t.median is not None and t.median < best * (1 - min_improvement):
                since_improvement = 0
            else:
                since_improvement += 1
            if t.median is not None:
                best = min(best, t.median)
            if on_trial:
                on_trial(t, result)
        if since_improvement >= patience:
            result.stopped = "early stop"
            break
        if time_budget_s is not None and time.monotonic() - start >= time_budget_s:
            result.stopped = "time budget"
            break
    result.stopped = result.stopped or "budget"
    result.seconds = time.monotonic() - start
    return result


# --------------------------------------------------------------------------------------------
# worker processes with time limits
# --------------------------------------------------------------------------------------------


def _load_module(name: str, path: Optional[str]):
    try:
        return importlib.import_module(name)
    except ImportError:
        if not path:
            raise
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


def _status_of(exc: BaseException) -> str:
    from qcompiler.tuning.errors import BuildError, MeasureTimeout, WrongResult

    if isinstance(exc, BuildError):
        return "compile_error"
    if isinstance(exc, WrongResult):
        return "wrong_result"
    if isinstance(exc, MeasureTimeout):
        return "timeout"
    return "runtime_error"


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, Exception) or type(exc).__module__ != "qcompiler.tuning.errors":
        # an unexpected exception: the last frames say where it came from
        tb = "".join(traceback.format_tb(exc.__traceback__)[-3:])
        text = f"{text}\n{tb}"
    return text[:MAX_ERROR_CHARS]


def _worker_main(conn, module_name: str, module_path: Optional[str]) -> None:
    """A worker process: call functions of the tuning module, one request at a time."""
    module = None
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        fn_name, args, kwargs = request
        try:
            if module is None:
                module = _load_module(module_name, module_path)
            value = getattr(module, fn_name)(*args, **kwargs)
            reply = ("ok", value, None)
        except BaseException as e:  # noqa: BLE001 - every failure is a result to record
            reply = (_status_of(e), None, _short_error(e))
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send(("runtime_error", None, f"result could not be sent back: {e}"))


class _Worker:
    def __init__(self, ctx, module_name: str, module_path: Optional[str]):
        self.ctx, self.module_name, self.module_path = ctx, module_name, module_path
        self.deadline = math.inf
        self._start()

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main,
                                     args=(child, self.module_name, self.module_path),
                                     daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def submit(self, request: tuple, timeout_s: float) -> None:
        self.conn.send(request)
        self.deadline = time.monotonic() + timeout_s

    def restart(self) -> None:
        """Kill the process (it hung or died) and start a fresh one."""
        self.close(kill=True)
        self._start()

    def close(self, kill: bool = False) -> None:
        try:
            if not kill and self.proc.is_alive():
                self.conn.send(None)
                self.proc.join(timeout=5)
        except (OSError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """Worker processes (spawned, so no state leaks in from the tuner) that run calls of a
    backend tuning module under a time limit; a worker that times out or dies is replaced.

    ``run(requests, timeout_s)`` returns, per request, ``(status, value, error)`` with status
    "ok", a failure status of the log, or "timeout".
    """

    def __init__(self, module, size: int = 1):
        ctx = multiprocessing.get_context("spawn")
        path = getattr(module, "__file__", None)
        self.workers = [_Worker(ctx, module.__name__, path) for _ in range(max(1, size))]

    def run(self, requests: list[tuple], timeout_s: float) -> list[tuple]:
        results: list = [None] * len(requests)
        pending = list(enumerate(requests))
        running: dict[_Worker, int] = {}
        while pending or running:
            for w in self.workers:
                if w not in running and pending:
                    i, request = pending.pop(0)
                    try:
                        w.submit(request, timeout_s)
                        running[w] = i
                    except (OSError, BrokenPipeError):
                        w.restart()
                        pending.insert(0, (i, request))
            next_deadline = min(w.deadline for w in running)
            ready = wait([w.conn for w in running],
                         timeout=max(0.0, next_deadline - time.monotonic()))
            for w in list(running):
                if w.conn in ready:
                    i = running.pop(w)
                    try:
                        results[i] = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(timeout=5)
                        results[i] = ("runtime_error", None, "the worker process died (exit "
                                      f"code {w.proc.exitcode}) while running it")
                        w.restart()
                elif time.monotonic() >= w.deadline:
                    results[running.pop(w)] = (
                        "timeout", None, f"ran past the time limit of {timeout_s:g} s; killed")
                    w.restart()
        return results

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# tuning kernels by measurement
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# whole models: qcompiler.tune(...)
# --------------------------------------------------------------------------------------------


def pipeline_with_tuning_log(spec: str, pass_name: Optional[str], log_path) -> str:
    """``spec`` with ``tuning_log=log_path`` set on the pass that chooses configs.

    ``pass_name``: that pass (a target's ``tuning_pass``); None: every pass of the pipeline
    that has a ``tuning_log`` option. Refuses a pipeline without such a pass.
    """
    from qcompiler.pipeline import PassError, parse_pipeline

    path = os.fspath(log_path)
    if any(c in path for c in ",{}"):
        raise PassError(f"a tuning log path cannot contain ',', '{{' or '}}' (pipeline "
                        f"syntax): {path!r}")
    passes = parse_pipeline(spec)
    chosen = [p for p in passes
              if (p.name == pass_name if pass_name else hasattr(p, "tuning_log"))]
    if not chosen:
        what = f"no {pass_name!r} pass" if pass_name else "no pass that takes a tuning log"
        raise PassError(f"the pipeline {spec!r} has {what}: this target has no tunable "
                        "kernels")
    for p in chosen:
        if not hasattr(p, "tuning_log"):
            raise PassError(f"pass {p.name!r} has no tuning_log option")
        p.tuning_log = path
    return ",".join(p.spec() for p in passes)


def tuning_pass_of(target) -> Optional[str]:
    """The pass that reads the tuning log: the target's ``tuning_pass`` field, else None (any
    pass of the pipeline with a ``tuning_log`` option)."""
    return target.params.get("tuning_pass")


def _rows_of(node, m: Optional[int]) -> int:
    """M of a qmatmul: the product of x's leading dimensions; symbolic ones take ``m``."""
    lead = node.operands[0].type.shape[:-1]
    if all(isinstance(d, int) for d in lead):
        return math.prod(lead) if lead else 1
    static = math.prod(d for d in lead if isinstance(d, int))
    return static * (m if m is not None else 1)


def kernels_of(module, m=None, key_fn=None) -> list[tuple[dict, list[str]]]:
    """Distinct kernel keys of a module's qmatmuls with the result names that use each.

    ``m``: the value of symbolic leading dimensions (batch), an int or a list of ints (each
    gives its own key); ``key_fn(node, rows)``: default ``key.kernel_key``.
    """
    from qcompiler.tuning.key import kernel_key, key_id

    key_fn = key_fn or kernel_key
    ms = list(m) if isinstance(m, (list, tuple)) else [m]
    seen: dict[str, tuple[dict, list[str]]] = {}
    for node in module.main.nodes:
        if node.op != "qmatmul":
            continue
        for one in ms:
            key = key_fn(node, _rows_of(node, one))
            names = seen.setdefault(key_id(key), (key, []))[1]
            if node.result.name not in names:
                names.append(node.result.name)
    return list(seen.values())


def looked_up_kernels(model_module, spec: str, target, m=None) -> list[tuple[dict, list[str]]]:
    """The keys the target's config-choosing pass looks up in a tuning log, in order.

    The pipeline runs once under ``log.recording_lookups`` (every key the pass asks for is
    recorded and answered None: the heuristic), so the tuner tunes exactly what replay looks for,
    whatever the pass's M buckets or key details (CUDA's ``tile`` asks per M bucket,
    ``cpu-schedule`` per static M or per bucket of a symbolic batch).

    ``m`` (an int or a list): keep, per requested M, the keys at the smallest looked-up M
    that holds it (the bucket that serves it; the largest serves every larger M); None keeps
    every key. Each key comes with the qmatmul results of the same K and N.
    """
    from qcompiler.driver.frontend import run_pipeline
    from qcompiler.tuning import log as tlog
    from qcompiler.tuning.key import key_id

    spec = pipeline_with_tuning_log(spec, tuning_pass_of(target), os.devnull)
    with tlog.recording_lookups() as asked:
        module, _, _ = run_pipeline(model_module, spec)
    distinct: dict[str, dict] = {}
    for key in asked:
        distinct.setdefault(key_id(key), key)
    keys = list(distinct.values())
    if m is not None:
        looked_m = sorted({k["m"] for k in keys})
        chosen_m = set()
        for one in (m if isinstance(m, (list, tuple)) else [m]):
            chosen_m.add(next((x for x in looked_m if x >= one), looked_m[-1]))
        keys = [k for k in keys if k["m"] in chosen_m]
    nodes = [n for n in module.main.nodes if n.op == "qmatmul"]
    return [(key, [n.result.name for n in nodes
                   if n.operands[0].type.shape[-1] == key["k"]
                   and n.results[0].type.shape[-1] == key["n"]])
            for key in keys]


def tune(model, target: str, *, output_dir="qc_tune", tuning_log=None,
         trials: Optional[int] = None, m=None, strategy: str = "evolutionary", seed: int = 0,
         passes: Optional[str] = None,
         workers: Optional[int] = None, timeout_s: float = 60.0, patience: Optional[int] = None,
         progress: bool = True, plots: bool = True, reuse_log: bool = True,
         time_budget_s: Optional[float] = None, repeats: Optional[int] = None,
         confirm: int = 1) -> dict:
    """Tune every distinct kernel of ``model`` on ``target``'s device; append to the log.

    Returns the run's summary (also written to ``output_dir/tuning_summary.json`` with a
    table in ``tuning_summary.txt`` and, with ``plots``, ``tuning_trials.png`` and
    ``tuning_roofline.png``). ``tuning_log`` defaults to ``output_dir/tuning_log.jsonl``;
    compile with ``qcompiler.compile(model, target, tuning_log=...)`` to use the results.

    ``trials``: per kernel (default 32; 500 for FPGA designs, whose candidates the cost model
    scores in milliseconds); ``m``: the rows that symbolic batch dimensions take (an int or a
    list: one key each; default 1); ``time_budget_s``: per kernel. The other options are
    ``tune_key``'s.
    """
    import datetime

    from qcompiler.driver.frontend import import_model, resolve_target, run_pipeline
    from qcompiler.tuning.device import NO_CUDA_DEVICE, device_name
    from qcompiler.tuning.progress import Progress, summary_table
    from qcompiler.version import __version__

    tgt = resolve_target(target)
    spec = passes or tgt.default_pipeline
    # Refuse targets without tunable kernels before any work.
    pipeline_with_tuning_log(spec, tuning_pass_of(tgt), "unused")
    out_dir = os.fspath(output_dir)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.fspath(tuning_log) if tuning_log else os.path.join(out_dir, "tuning_log.jsonl")
    device = device_name(tgt)
    if tgt.backend == "cuda" and device == NO_CUDA_DEVICE:
        raise ValueError(f"cannot tune for {tgt.name}: no CUDA device here (tuning measures on "
                         "the device; replaying a log with --tuning-log needs none)")
    # --tune creates the log (replay refuses a missing file), even when nothing is measured.
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).touch()
    start = time.monotonic()
    if tgt.backend == "hls":
        from qcompiler.codegen.hls.tuning import tune_design
        from qcompiler.tuning.key import kernel_key

        module, _, spec = run_pipeline(import_model(model), spec)
        # A design streams one vector at a time: hls-parallelism looks keys up at M = 1.
        kernels = kernels_of(module, key_fn=lambda node, _rows: kernel_key(node, 1))
        by_name = {n.result.name: n for n in module.main.nodes if n.op == "qmatmul"}
        layers = [(key, by_name[name].attrs["config"], name)
                  for key, names in kernels for name in names]
        bar = Progress(1, enabled=progress)
        trials = trials or DEFAULT_TRIALS_COST_MODEL
        from qcompiler.pipeline import parse_pipeline

        # The budget fraction that replay will check against: the pass's own option.
        utilization = next((p.utilization for p in parse_pipeline(spec)
                            if p.name == "hls-parallelism"), 0.8)
        results = tune_design(tgt, layers, log_path=log_path, trials=trials, strategy=strategy,
                              seed=seed, patience=patience, progress=bar,
                              utilization=utilization)
    else:
        kernels = looked_up_kernels(import_model(model), spec, tgt, m)
        bar = Progress(len(kernels), enabled=progress)
        trials = trials or DEFAULT_TRIALS
        module_t = tuning_module_for(tgt)
        work = os.path.join(out_dir, "tuning_work")
        results = [tune_key(tgt, key, log_path=log_path, workdir=work, trials=trials,
                            strategy=strategy, seed=seed, module=module_t,
                            build_workers=workers, timeout_s=timeout_s, patience=patience,
                            reuse_log=reuse_log, device=device, progress=bar, nodes=names,
                            time_budget_s=time_budget_s, repeats=repeats, confirm=confirm)
                   for key, names in kernels]
    summaries = []
    for r in results:
        s = r.summary()
        if r.design_estimate:
            s["design_estimate"] = r.design_estimate
        summaries.append(s)
    table = summary_table(summaries)
    summary = {
        "target": tgt.name, "device": device, "qcompiler": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pipeline": spec, "strategy": strategy, "trials_per_kernel": trials, "seed": seed,
        "log": log_path, "seconds": round(time.monotonic() - start, 3), "kernels": summaries,
        "plots": [],
    }
    if plots:
        try:
            from qcompiler.tuning.plot import write_plots

            summary["plots"] = write_plots(summaries, tgt, out_dir, device)
        except ImportError as e:  # matplotlib is the optional `tune` extra
            sys.stderr.write(f"qcompiler.tune: no plots ({e}); pip install 'qcompiler[tune]'\n")
    with open(os.path.join(out_dir, "tuning_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "tuning_summary.txt"), "w") as f:
        f.write(f"{tgt.name} on {device}: {len(summaries)} kernels\n\n{table}")
    if progress:
        sys.stderr.write(table)
    return summary
