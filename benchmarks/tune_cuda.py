"""Tune the CUDA benchmark's shapes on this GPU; report tuned against heuristic and tuning time.

    .venv/bin/python benchmarks/tune_cuda.py                       # every shape, every M bucket
    .venv/bin/python benchmarks/tune_cuda.py --shapes 4096x4096,28672x8192 --buckets 16,64

For each weight shape (N, K) of benchmarks/bench_cuda.py (signed int4, group 128, fp16)
and each M bucket of the ``tile`` pass (16, 32, 64, 128: one kernel variant per bucket), the
tuner (``qcompiler.tuning.tuner.tune_key``) searches the CUDA space from the heuristic default
with a time budget (60 s per shape: the goal), appending every candidate to the tuning log.
Then the default and the best config are measured again, one after the other, at the bucket's
M (``--head-to-head all``: at every benchmark M that the bucket serves; 1 and 4 run the
M <= 16 variant), so both numbers come from the same minute on the same GPU. The JSON
(``benchmarks/results/tune-cuda-<device>-<date>.json``, or ``--out``) is rewritten after
every shape, so a run cut short keeps what it finished.

On the GPU machine (one command may run 10 minutes; a shape takes the budget plus two builds):
    python3 benchmarks/tune_cuda.py --shapes 4096x4096,28672x8192,8192x28672 --buckets 16,64 \
        --out "$OUT/tune-cuda.json" --log "$OUT/tune-cuda.jsonl"
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (N, K) of benchmarks/bench_cuda.py and the benchmark M values.
SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 8192),
          (8192, 28672)]
BENCH_M = (1, 4, 16, 32, 64, 128, 512)


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        n, k = item.lower().split("x")
        out.append((int(n), int(k)))
    return out


def _bucket_of(m: int, buckets: tuple) -> int:
    return next((b for b in sorted(buckets) if m <= b), max(buckets))


def _head_to_head(target, key, default, best, m_values, workdir, repeats, rounds=1):
    """Default and tuned latency at each M, measured alternately in one child process."""
    from qcompiler.tuning.tuner import WorkerPool, tuning_module_for

    module = tuning_module_for(target)
    rows = []
    with WorkerPool(module, 1) as pool:
        for m in m_values:
            k_m = {**key, "m": m}
            got = {"default": [], "tuned": []}
            errors = {}
            for r in range(rounds):
                for name, config in (("default", default), ("tuned", best)):
                    d = os.path.join(workdir, f"h2h_m{m}_{name}_{r}")
                    os.makedirs(d, exist_ok=True)
                    status, value, error = "ok", None, None
                    if callable(getattr(module, "build", None)):
                        status, _, error = pool.run([("build", (target, k_m, config, d), {})],
                                                    600)[0]
                    if status == "ok":
                        status, value, error = pool.run(
                            [("measure", (target, k_m, config, d), {"repeats": repeats})],
                            300)[0]
                    if status == "ok":
                        got[name].append(value["median"])
                    else:
                        errors[name] = f"{status}: {error}"
            row = {"m": m}
            for name in ("default", "tuned"):
                row[f"{name}_us"] = min(got[name]) if got[name] else None
            if row["default_us"] and row["tuned_us"]:
                row["speedup"] = round(row["default_us"] / row["tuned_us"], 3)
            if errors:
                row["errors"] = errors
            rows.append(row)
    return rows


def _packed_node(target, n: int, k: int):
    """The qmatmul of an (N, K) case after the target's pipeline (keys need its layout)."""
    from qcompiler.codegen.cuda.cases import Case, make_module
    from qcompiler.driver.api import run_pipeline

    case = Case(k=k, n=n, bits=4, signed=True, zero_point=False, group=128, dtype="f16")
    module, _, _ = run_pipeline(make_module(case), target.default_pipeline)
    return next(nd for nd in module.main.nodes if nd.op == "qmatmul")


def _dry_run(target, shapes, buckets) -> int:
    from qcompiler.passes import tile as tile_pass
    from qcompiler.tuning.tuner import Space, tuning_module_for
    from qcompiler.tuning.key import describe, kernel_key

    module = tuning_module_for(target)
    for n, k in shapes:
        node = _packed_node(target, n, k)
        for bucket in buckets:
            key = kernel_key(node, bucket)
            space = module.search_space(target, key)
            size = Space(space).size
            default = module.default_config(target, key)
            problem = module.check_config(target, key, default)
            print(f"{describe(key)}: space {size} configs, default {default}"
                  f"{' INVALID: ' + problem if problem else ''}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cuda-sm90")
    ap.add_argument("--shapes", help="N x K list, e.g. 4096x4096,28672x8192 (default: all)")
    ap.add_argument("--buckets", help="M buckets to tune, e.g. 16,64 (default: the tile pass's)")
    ap.add_argument("--trials", type=int, default=48, help="candidates per shape at most (48)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="tuning time per shape: no new batch starts after it (60)")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="limit of one measurement")
    ap.add_argument("--repeats", type=int, default=100, help="launches per head-to-head timing")
    ap.add_argument("--head-to-head", choices=("none", "bucket", "all"), default="bucket",
                    help="re-measure default and tuned after the search: at the bucket's M, at "
                         "every benchmark M the bucket serves, or not at all (each "
                         "measurement rebuilds the kernel)")
    ap.add_argument("--rounds", type=int, default=1, help="head-to-head rounds (alternating)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", help="tuning log (default: benchmarks/results/tune-cuda.jsonl)")
    ap.add_argument("--out", help="result JSON (default: benchmarks/results/tune-cuda-...json)")
    ap.add_argument("--workdir", default=os.path.join("/tmp", "qc_tune_cuda"))
    ap.add_argument("--dry-run", action="store_true",
                    help="list the keys, spaces and heuristic defaults; measure nothing")
    args = ap.parse_args(argv)

    import qcompiler
    from qcompiler.passes import tile as tile_pass
    from qcompiler.targets import get_target
    from qcompiler.tuning.device import NO_CUDA_DEVICE, device_name
    from qcompiler.tuning.key import kernel_key
    from qcompiler.tuning.progress import Progress, summary_table
    from qcompiler.tuning.tuner import tune_key, tuning_module_for

    target = get_target(args.target)
    device = device_name(target)
    shapes = _parse_shapes(args.shapes) if args.shapes else SHAPES
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets \
        else tile_pass.M_BUCKETS
    if args.dry_run:
        return _dry_run(target, shapes, buckets)
    if device == NO_CUDA_DEVICE:
        sys.stderr.write("tune_cuda: no CUDA device here; run this on the GPU machine\n")
        return 2
    date = datetime.datetime.now(datetime.timezone.utc)
    results_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(results_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out_path = args.out or os.path.join(
        results_dir, f"tune-cuda-{slug}-{date.strftime('%Y%m%d-%H%M')}.json")
    log_path = args.log or os.path.join(results_dir, "tune-cuda.jsonl")
    doc = {
        "benchmark": "tune_cuda", "device": device, "target": target.name,
        "date": date.isoformat(timespec="seconds"), "qcompiler": qcompiler.__version__,
        "host": platform.node(), "command": " ".join([sys.executable] + sys.argv),
        "settings": {"trials": args.trials, "budget_s": args.budget_s,
                     "timeout_s": args.timeout_s, "repeats": args.repeats, "seed": args.seed,
                     "format": "W4A16: signed int4 codes (symmetric), group 128, f16 scales, "
                               "f16 x (the cases of benchmarks/bench_cuda.py)"},
        "peers": "heuristic default (codegen/cuda/tuning.default_config) measured in the "
                 "same run, interleaved with the tuned config",
        "log": os.path.relpath(log_path, ROOT), "shapes": [],
    }
    progress = Progress(len(shapes) * len(buckets))
    summaries = []
    for n, k in shapes:
        node = _packed_node(target, n, k)
        for bucket in buckets:
            key = kernel_key(node, bucket)
            start = time.monotonic()
            result = tune_key(target, key, log_path=log_path, module=tuning_module_for(target),
                              workdir=os.path.join(args.workdir, f"n{n}_k{k}_m{bucket}"),
                              trials=args.trials, seed=args.seed, timeout_s=args.timeout_s,
                              time_budget_s=args.budget_s, device=device, progress=progress,
                              confirm=0)   # the head-to-head below does it
            tuning_s = time.monotonic() - start
            s = result.summary()
            summaries.append(s)
            entry = {"n": n, "k": k, "m_bucket": bucket, "key": key,
                     "tuning_seconds": round(tuning_s, 2), "trials": s["trials"],
                     "statuses": s["statuses"], "stopped": s["stopped"],
                     "default_config": s["default_config"], "best_config": s["best_config"],
                     "search_default_us": s["default_us"], "search_best_us": s["best_us"],
                     "trial_points": s["trial_points"]}
            if s["best_config"] and s["default_us"] and args.head_to_head != "none":
                ms = [bucket] if args.head_to_head == "bucket" else \
                    [m for m in BENCH_M if _bucket_of(m, tile_pass.M_BUCKETS) == bucket]
                entry["head_to_head"] = _head_to_head(
                    target, key, s["default_config"], s["best_config"], ms,
                    os.path.join(args.workdir, f"n{n}_k{k}_m{bucket}"), args.repeats,
                    args.rounds)
            doc["shapes"].append(entry)
            times = [e["tuning_seconds"] for e in doc["shapes"]]
            doc["tuning_seconds"] = {"median": statistics.median(times), "max": max(times),
                                     "total": round(sum(times), 1)}
            with open(out_path, "w") as f:
                json.dump(doc, f, indent=1)
    sys.stderr.write(summary_table(summaries))
    print(f"{'N':>6} {'K':>6} {'M':>4} {'default us':>11} {'tuned us':>9} {'speedup':>8} "
          f"{'tuning s':>9}")
    for e in doc["shapes"]:
        for row in e.get("head_to_head", []):
            d, t = row.get("default_us"), row.get("tuned_us")
            print(f"{e['n']:>6} {e['k']:>6} {row['m']:>4} {d or float('nan'):>11.2f} "
                  f"{t or float('nan'):>9.2f} {row.get('speedup', float('nan')):>8.2f} "
                  f"{e['tuning_seconds']:>9.1f}")
    print(f"wrote {out_path}")
    try:
        from qcompiler.tuning.plot import write_plots

        write_plots(summaries, target, os.path.splitext(out_path)[0] + "_plots", device)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
