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

The pieces: ``search.py`` (spaces, cost model, strategies, ``search``), ``workers.py``
(child-process measurement, ``WorkerPool``), ``kernel_tuning.py`` (one key: ``tune_key``),
this file (whole models: ``tune``, and the tuning-log plumbing of the compile). Every name
stays importable from here.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from qcompiler.tuning.kernel_tuning import (KernelResult, prior_from_log, tune_key,
                                            tuning_module_for)
from qcompiler.tuning.search import (STRATEGIES, CostModel, EvolutionarySearch, RandomSearch,
                                     SearchResult, Space, Strategy, Trial, config_id,
                                     make_strategy, search)
from qcompiler.tuning.workers import WorkerPool

# The tuner's public names, importable from here whichever module defines them.
__all__ = ["STRATEGIES", "DEFAULT_TRIALS", "DEFAULT_TRIALS_COST_MODEL", "Space", "CostModel",
           "Trial", "Strategy", "RandomSearch", "EvolutionarySearch", "SearchResult",
           "config_id", "make_strategy", "search", "WorkerPool", "tuning_module_for",
           "prior_from_log", "KernelResult", "tune_key", "pipeline_with_tuning_log",
           "tuning_pass_of", "kernels_of", "looked_up_kernels", "tune"]

DEFAULT_TRIALS = 32               # measured candidates per kernel
DEFAULT_TRIALS_COST_MODEL = 500   # FPGA designs: scored by the cost model, ~2 ms each


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
    from qcompiler.tuning.key import kernel_key, key_id

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
    def shape_of(node):  # its K, its kernel's columns and whether they pair (None: dynamic)
        try:
            key = kernel_key(node, 1)
        except ValueError:
            return None
        return {f: key.get(f) for f in ("k", "n", "epilogue_pairs")}

    shapes = [(n.result.name, shape) for n in module.main.nodes
              if n.op == "qmatmul" and (shape := shape_of(n)) is not None]
    return [(key, [name for name, shape in shapes
                   if all(shape[f] == key.get(f) for f in shape)])
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
