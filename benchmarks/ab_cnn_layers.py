"""Per-layer A/B of a CPU codegen constant on the CNN benchmark's models (issue #15).

Each value of ``--attr`` (a module-level constant of qcompiler, e.g.
``qcompiler.codegen.cpu.conv.STACK_ACCUMULATORS``) is set in its own process, which compiles
the model (bench_cnn.py's quantized file) and times every kernel step (profile_cnn.py's
timer); the values' processes alternate for ``--rounds`` rounds, and each step keeps the
minimum of its per-round medians. Separate processes, because two builds in one process
would share the timer's wrapped executor. The outputs of every value must be identical.
JSON to benchmarks/results/ with the host's CPU and ISA.

    python benchmarks/ab_cnn_layers.py --attr qcompiler.codegen.cpu.conv.STACK_ACCUMULATORS \\
        --values 24,15 [--model mobilenetv2] [--format qoperator] [--batch 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# One value's process: compile with the constant set, time the steps, print one JSON line.
CHILD = r'''
import hashlib, importlib, json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ["QC_CPU_THREADS"] = "1"
os.environ["QC_NATIVE_CALLS"] = "0"   # each kernel call timed from Python (profile_cnn.py)
import numpy as np
import profile_cnn
import qcompiler
from bench_cnn import quantized_model
module_name, attr = sys.argv[2].rsplit(".", 1)
target_module = importlib.import_module(module_name)
setattr(target_module, attr, type(getattr(target_module, attr))(sys.argv[3]))
path = quantized_model(sys.argv[4], sys.argv[5], sys.argv[8])
records = {}
profile_cnn._patch_executor(records)
model = qcompiler.compile(path, target="cpu")
x = np.random.default_rng(2).standard_normal((int(sys.argv[6]), 3, 224, 224)).astype(np.float32)
y = model.run({"x": x})
for rec in records.values():
    rec[0].clear()
for _ in range(int(sys.argv[7])):
    model.run({"x": x})
print("JSON" + json.dumps({
    "outputs": {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                for k, v in y.items()},
    "steps": {str(k[0]): [float(np.median(v[0])) * 1e3,
                          profile_cnn.describe(v[1]) if k[1] == "qconv" else k[1]]
              for k, v in records.items()}}))
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attr", required=True, help="module.CONSTANT of qcompiler to vary")
    p.add_argument("--values", required=True, help="comma-separated values, the first the base")
    p.add_argument("--model", default="mobilenetv2")
    p.add_argument("--format", default="qoperator")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qc_bench_cnn"))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    sys.path.insert(0, HERE)
    from bench_cnn import host_info

    values = a.values.split(",")
    runs = {v: [] for v in values}
    for _ in range(a.rounds):
        for v in values:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, HERE, a.attr, v, a.model, a.format,
                 str(a.batch), str(a.runs), a.work], capture_output=True, text=True)
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("JSON")]
            if done.returncode or not line:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs[v].append(json.loads(line[0][4:]))
    base = runs[values[0]][0]
    for v in values[1:]:
        if runs[v][0]["outputs"] != base["outputs"]:
            print(f"{a.attr}={v}: outputs differ from {values[0]}'s", file=sys.stderr)
            return 1
    steps = []
    totals = {v: 0.0 for v in values}
    for key in sorted(base["steps"], key=int):
        best = {v: min(r["steps"][key][0] for r in runs[v]) for v in values}
        for v in values:
            totals[v] += best[v]
        steps.append({"step": int(key), "what": base["steps"][key][1],
                      "ms": {v: round(best[v], 4) for v in values}})
        if max(best.values()) - min(best.values()) > 0.01:
            print(key, " ".join(f"{best[v]:.3f}" for v in values), base["steps"][key][1])
    print("step sums (ms):", {v: round(t, 3) for v, t in totals.items()})
    host = host_info()
    stamp = datetime.datetime.now()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"ab-cnn-layers-{stamp:%Y%m%d-%H%M}-{a.model}-b{a.batch}-{host['mcpu']}-t1.json")
    with open(path, "w") as f:
        json.dump({"benchmark": "ab_cnn_layers", "date": stamp.isoformat(timespec="seconds"),
                   "host": host, "attr": a.attr, "values": values, "model": a.model,
                   "format": a.format, "batch": a.batch, "rounds": a.rounds, "runs": a.runs,
                   "outputs_identical": True, "step_sums_ms": totals, "steps": steps}, f,
                  indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
