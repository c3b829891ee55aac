"""ONNX's backend node cases through the ``cpu`` target (issue #13: cpu >= 85% of the cases).

Every in-scope case of tests/onnx_node_cases.py (the ``ref`` suite's scope, inputs frozen
the same way) is compiled with ``qcompiler.compile(model, target="cpu",
allow_host_fallback=True, jobs=1)`` into a temp build cache of this run, run on its first data
set and compared like the ref suite. Per case: passed or not, the ops left to the host
interpreter (report.json's ``host_fallback``: op and reason) and the error. Two rates:
"correct" (outputs right) and "correct with every op compiled" (right and no host fallback).

JSON to benchmarks/results/onnx-node-suite-cpu-<date>.json with the host's CPU and ISA; one
line per case is appended to <json>.partial.jsonl as it finishes (removed at the end), so a
run cut short still gives its rates (``--summarize FILE.jsonl``). The full run takes about
2-3 minutes with 2 workers on a 2-core VM (most kernels build in well under a second).

    python benchmarks/onnx_node_suite_cpu.py [--workers 2] [--only REGEX] [--limit N]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

CASE_SECONDS = 300  # a case taking longer is recorded as a timeout


def host_info() -> dict:
    from qcompiler.codegen.cpu.host import host_cpu, read_cpuinfo

    vendor, flags = read_cpuinfo()
    name = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"cpu": name, "vendor": vendor, "machine": platform.machine(),
            "mcpu": host_cpu()["mcpu"],
            "isa": [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                "amx_int8") if f in flags]}


def run_case(name: str, work: str) -> dict:
    """Compile and run one case on ``cpu``; the record of the outcome."""
    import qcompiler
    from onnx_node_cases import CASES, check_outputs, frozen_case, op_names

    case = CASES[name]
    record = {"name": name, "ops": sorted(op_names(case.model)), "passed": False,
              "host_fallback": [], "stage": "compile", "error": None}
    start = time.perf_counter()
    try:
        model, feeds = frozen_case(case)
        out_dir = os.path.join(work, "out", name)
        compiled = qcompiler.compile(model, target="cpu", output_dir=out_dir, jobs=1,
                                     progress=False, allow_host_fallback=True)
        with open(os.path.join(out_dir, "report.json")) as f:
            record["host_fallback"] = json.load(f).get("host_fallback", [])
        record["stage"] = "run"
        got = compiled.run(feeds)
        record["stage"] = "compare"
        check_outputs(name, case, model, got)
        record["passed"] = True
        record["stage"] = "done"
    except BaseException as e:  # noqa: BLE001 - every failure is a result to record
        record["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    record["compiled_only"] = record["passed"] and not record["host_fallback"]
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _worker(args) -> dict:
    import signal

    name, work = args

    def timeout(*_):
        raise TimeoutError(f"case took over {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(CASE_SECONDS)
    try:
        return run_case(name, work)
    finally:
        signal.alarm(0)
        import shutil

        shutil.rmtree(os.path.join(work, "out", name), ignore_errors=True)


def summarize(records: list, total: int) -> dict:
    passed = sum(r["passed"] for r in records)
    compiled = sum(r["compiled_only"] for r in records)
    fallback_ops = collections.Counter(f["op"] for r in records for f in r["host_fallback"])
    failing = collections.Counter("+".join(r["ops"]) for r in records if not r["passed"])
    not_compiled = collections.Counter("+".join(r["ops"]) for r in records
                                       if r["passed"] and not r["compiled_only"])
    return {"cases": total, "covered": len(records),
            "correct": passed, "correct_rate": passed / max(len(records), 1),
            "correct_compiled": compiled, "correct_compiled_rate": compiled / max(len(records), 1),
            "host_fallback_ops": dict(fallback_ops.most_common()),
            "failing_by_op": dict(failing.most_common()),
            "correct_with_fallback_by_op": dict(not_compiled.most_common())}


def print_summary(s: dict) -> None:
    print(f"covered {s['covered']} of {s['cases']} in-scope cases")
    print(f"correct: {s['correct']} ({s['correct_rate']:.1%})")
    print(f"correct with every op compiled: {s['correct_compiled']} "
          f"({s['correct_compiled_rate']:.1%})")
    print("host-fallback ops (cases):", ", ".join(
        f"{k} {v}" for k, v in list(s["host_fallback_ops"].items())[:25]))
    print("failing (by op):", ", ".join(f"{k} {v}" for k, v in
                                        list(s["failing_by_op"].items())[:40]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default=None, help="regex on case names")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    ap.add_argument("--summarize", default=None, help="print the rates of a .partial.jsonl")
    args = ap.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            records = [json.loads(line) for line in f if line.strip()]
        print_summary(summarize(records, len(records)))
        return

    from onnx_node_cases import CASES

    names = sorted(CASES)
    if args.only:
        names = [n for n in names if re.search(args.only, n)]
    if args.limit:
        names = names[:args.limit]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    out = args.out or os.path.join(HERE, "results", f"onnx-node-suite-cpu-{stamp}.json")
    partial = out + ".partial.jsonl"
    work = tempfile.mkdtemp(prefix="qc_node_suite_")
    os.environ["QC_CACHE_DIR"] = os.path.join(work, "cache")  # this run's own build cache
    os.environ.setdefault("QC_CPU_THREADS", "1")
    start = time.time()
    records = []
    with open(partial, "w") as log:
        def keep(r):
            records.append(r)
            log.write(json.dumps(r) + "\n")
            log.flush()
            mark = "ok  " if r["compiled_only"] else ("host" if r["passed"] else "FAIL")
            print(f"[{len(records)}/{len(names)}] {mark} {r['name']} {r['seconds']:.1f}s "
                  f"{r['error'] or ''}", flush=True)

        if args.workers <= 1:
            for n in names:
                keep(_worker((n, work)))
        else:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(args.workers, maxtasksperchild=40) as pool:
                for r in pool.imap_unordered(_worker, [(n, work) for n in names]):
                    keep(r)
    summary = summarize(records, len(names))
    result = {"date": stamp, "host": host_info(), "seconds": round(time.time() - start, 1),
              "summary": summary, "cases": sorted(records, key=lambda r: r["name"])}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    os.remove(partial)  # the JSON holds every record now
    print_summary(summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
