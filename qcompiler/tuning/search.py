"""The autotuner's search: configs, spaces, the cost model and the search strategies.

``search(space, evaluate, ...)`` is the strategy loop with the evaluation passed in: the
tuner (``kernel_tuning.tune_key``) evaluates candidates by measuring them on the device, the
FPGA backend (``codegen/hls/tuning.py``) by its cost model. Nothing here builds, runs or
logs anything.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

STRATEGIES = ("evolutionary", "random")


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
