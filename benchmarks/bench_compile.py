"""Compile time of all-MiniLM-L6-v2 (4-bit MatMulNBits) for target ``cpu``: cold and warm cache,
one and two build jobs (issue #18, "Compile speed and honesty").

    .venv/bin/python benchmarks/bench_compile.py [--jobs 1,2] [--repeats 1] [--out FILE]

Each compile is a fresh ``qcompile`` process (what a user waits for, TVM's import included):
*cold* with an empty build cache directory, then *warm* with the cache that the cold compile
filled. The model is exported and quantized once with the helpers of
``examples/minilm_onnx.py`` (block 32, symmetric). Writes
``benchmarks/results/compile-cpu-<date>.json``: per run the wall seconds, the compile's own
stage seconds and build counts from its report.json, and the host CPU model and ISA.
Goals: cold <= 20 s on 2 cores, warm <= 3 s. ``cpu_s`` (CPU seconds of the compile and its
build workers) tells what a run costs on a machine that other processes keep busy, where the
wall time mostly measures them; ``host.load_average_1m`` says how busy it was.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

GOAL_COLD_S, GOAL_WARM_S = 20.0, 3.0


def make_model(work: str) -> str:
    """The 4-bit MatMulNBits all-MiniLM-L6-v2 (examples/minilm_onnx.py helpers)."""
    import minilm_onnx

    _, model = minilm_onnx.load_minilm()
    fp32 = minilm_onnx.export_onnx(model, os.path.join(work, "minilm_fp32.onnx"))
    q4 = os.path.join(work, "minilm_q4.onnx")
    minilm_onnx.quantize_matmulnbits(fp32, q4, block=32, symmetric=True)
    return q4


def compile_once(model: str, out: str, cache: str, jobs: int) -> dict:
    env = {**os.environ, "QC_CACHE_DIR": cache}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qcompiler.driver.cli", model, "--target",
                           "cpu", "-o", out, "-j", str(jobs)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of qcompile and its build workers: what the compile costs when other
    # processes compete for the cores (wall time then mostly measures the competition).
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(f"qcompile failed:\n{proc.stderr}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    build = report["build"]
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "stages_s": report["seconds"],
            "passes_ms": {f"{i}:{p['pass']}": p["ms"] for i, p in enumerate(report["passes"])},
            "build_s": build["seconds"], "kernels": build["kernels"], "built": build["built"],
            "cache_hits": build["cache_hits"],
            "per_kernel_s": {k["library"]: k["seconds"] for k in build["per_kernel"]},
            "qmatmuls": len(report["qmatmuls"]), "cli_line": proc.stderr.strip().splitlines()[-1]}


def host() -> dict:
    from qcompiler.codegen.cpu.host import host_cpu, host_flags
    from qcompiler.tuning.device import cpu_name

    _, flags = host_flags()
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return {"cpu": cpu_name(), "isa": isa, "vnni": "avx512_vnni" in flags,
            "mcpu": host_cpu()["mcpu"], "usable_cpus": len(os.sched_getaffinity(0)),
            "load_average_1m": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="1,2", help="build jobs to compare (1,2)")
    ap.add_argument("--repeats", type=int, default=1, help="cold+warm pairs per jobs value")
    ap.add_argument("--model", help="an already quantized model (default: make MiniLM q4)")
    ap.add_argument("--out", help="result file (default benchmarks/results/compile-cpu-DATE)")
    args = ap.parse_args()
    import qcompiler

    with tempfile.TemporaryDirectory(prefix="qc_bench_compile_") as work:
        model = args.model or make_model(work)
        runs = []
        for jobs in [int(j) for j in args.jobs.split(",")]:
            for rep in range(args.repeats):
                cache = os.path.join(work, f"cache-j{jobs}-{rep}")  # empty: cold
                for state in ("cold", "warm"):
                    out = os.path.join(work, f"out-j{jobs}-{rep}-{state}")
                    r = {"jobs": jobs, "cache": state, **compile_once(model, out, cache, jobs)}
                    runs.append(r)
                    print(f"jobs={jobs} {state}: {r['wall_s']:6.2f} s wall, {r['cpu_s']:6.2f} s "
                          f"CPU (build "
                          f"{r['build_s']:.2f} s, {r['built']} built, {r['cache_hits']} cached; "
                          f"stages {r['stages_s']})", flush=True)
    cold = min(r["wall_s"] for r in runs if r["cache"] == "cold")
    warm = min(r["wall_s"] for r in runs if r["cache"] == "warm")
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"benchmark": "compile all-MiniLM-L6-v2 q4 (MatMulNBits block 32 sym) for cpu",
              "date": now.isoformat(timespec="seconds"), "qcompiler": qcompiler.__version__,
              "host": host(), "runs": runs,
              "best_cold_s": cold, "best_warm_s": warm,
              "goals": {"cold_s": GOAL_COLD_S, "warm_s": GOAL_WARM_S,
                        "cold_met": cold <= GOAL_COLD_S, "warm_met": warm <= GOAL_WARM_S}}
    path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                    f"compile-cpu-{now:%Y%m%d-%H%M}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"best cold {cold:.2f} s (goal {GOAL_COLD_S:g}), best warm {warm:.2f} s "
          f"(goal {GOAL_WARM_S:g}); wrote {path}")


if __name__ == "__main__":
    main()
