"""The 2-bit lut kernel's two lookups on an AVX-512 VBMI host, warm and cold, alternated.

    .venv/bin/python benchmarks/ab_lut_lookup.py [--rounds 5] [--out benchmarks/results]

4096x4096, block 128, M = 1, 1 thread, bench_cpu_lut.py's weights and cold copies (the codes
rotated through copies beyond the last-level cache). Three builds of the same layer:

- ``vpermb-host``: the ``cpu`` target as it compiles for this host (``vpermb`` on 64-byte
  tables, the heuristic's lookup on VBMI hosts);
- ``vpshufb-host``: the same target and -mcpu with the lookup cpu-schedule gives a model
  whose weights outgrow the last-level cache (``bench_cpu_lut.qc_kernel(streamed=True)``:
  ``vpshufb`` on 16-byte tables broadcast as loaded, and a mask before each lookup);
- ``vpshufb-cascadelake``: the ``cpu-x86-avx512`` target (``vpshufb``, -mcpu=cascadelake).

Each round times every build warm, then cold; the medians of the rounds are printed and
written as JSON with the host's processor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu_lut as lut  # noqa: E402
from bench_cpu import ROOT, _set_threads, llc_bytes  # noqa: E402
from timing import time_call  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    _set_threads(1)
    import numpy as np

    from qcompiler.codegen.cpu import host, runtime
    from qcompiler.targets import get_target
    from qcompiler.tuning.device import cpu_name

    if not host.target_cpu(get_target("cpu"))["vbmi"] or not llc_bytes():
        print("this host has no AVX-512 VBMI (or no known last-level cache): its lut kernels "
              "have one lookup")
        return 0
    runtime.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="qc_ab_lut_")
    x = np.random.default_rng(1).standard_normal((1, lut.K)).astype(np.float32)
    wts = lut.weights(2, seed=2)
    copies = lut.cold_copies(lut.K * lut.N * 2 // 8)
    builds = {}
    for name, target_name, streamed in (("vpermb-host", "cpu", False),
                                        ("vpshufb-host", "cpu", True),
                                        ("vpshufb-cascadelake", "cpu-x86-avx512", False)):
        make, packed, _ = lut.qc_kernel(target_name, 2, "lut", wts, work, streamed=streamed)
        cold = [make({**packed, "w": np.roll(packed["w"], i + 1, axis=1)}) for i in range(copies)]
        builds[name] = (make(packed), cold)
    times = {name: {"warm": [], "cold": []} for name in builds}
    for _ in range(args.rounds):
        for name, (kern, cold) in builds.items():
            times[name]["warm"].append(
                time_call(lambda: kern(x), 0.3, min_runs=3, warmup=3)["median_ms"])
            at = [0]

            def cold_call(cold=cold, at=at):
                at[0] += 1
                return cold[at[0] % copies](x)
            times[name]["cold"].append(time_call(cold_call, 0.5, min_runs=copies + 5,
                                                 max_runs=2 * copies, warmup=3)["median_ms"])
    rows = []
    for name, t in times.items():
        row = {"build": name, "warm_ms": float(np.median(t["warm"])),
               "cold_ms": float(np.median(t["cold"])), "warm_rounds_ms": t["warm"],
               "cold_rounds_ms": t["cold"]}
        rows.append(row)
        print(f"{name:<22} warm {row['warm_ms']:.4f} ms  cold {row['cold_ms']:.4f} ms")
    date = datetime.datetime.now(datetime.timezone.utc)
    hcpu = host.host_cpu()
    doc = {"benchmark": "ab_lut_lookup.py", "host": cpu_name(), "host_mcpu": hcpu["mcpu"],
           "host_isa": sorted(f for f in hcpu["features"] if "avx512" in f or "vnni" in f),
           "date": date.isoformat(timespec="seconds"),
           "layer": "4096x4096 u2 block 128, M = 1, 1 thread",
           "rounds": args.rounds, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"ab-lut-lookup-{date:%Y%m%d-%H%M}-t1.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
