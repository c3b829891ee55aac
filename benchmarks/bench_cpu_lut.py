"""The lut kernels (numerics=lut, T-MAC-style table lookups) against our 4-bit paths and ORT.

    .venv/bin/python benchmarks/bench_cpu_lut.py [--seconds 0.6] [--out benchmarks/results]

4096x4096, block 128, asymmetric codes and zero points, fp32 scales in the model (stored as
cpu-pack-weights stores them: f16 for the x86 int8 kernels), M = 1, 1 thread, warm
(implementations take turns, 3 rounds, best round kept) and cold (weights rotated through
copies beyond the last-level cache):

- ``qc-lut{2,3,4}``: numerics=lut for 2-, 3- and 4-bit codes, built for the host (``cpu``)
  and, labelled ``-avx2``, for ``cpu-x86-avx2`` (-mcpu=haswell: AVX2 code run on this host);
- ``qc-exact4`` / ``qc-int8-4``: our 4-bit exact and int8 paths (host; ``qc-int8-4-avx2``:
  the AVX2 int8 path);
- ``qc-lut2-streamed``: the 2-bit lut kernel with the lookup cpu-schedule gives a model whose
  weights outgrow the last-level cache (``tuning.lut_byte_permute``: ``vpshufb`` on 16-byte
  tables on VBMI hosts, where ``qc-lut2`` is the in-cache ``vpermb``); the cold row is its case;
- ``qc-lut2-avx512`` (AVX-512 hosts): the 2-bit lut kernel for ``cpu-x86-avx512`` (Cascade
  Lake: ``vpshufb`` on zmm), beside the host row's ``vpermb`` where the host has AVX-512 VBMI;
- ``qc-int8-2`` (and ``-avx2``): 2-bit codes through the int8 path (2-bit containers, four
  codes a byte): the other way our 2-bit weights run (``numerics=auto`` takes lut for one-row
  accuracy_level-4 layers of 1- and 2-bit codes on x86, int8 for the rest);
- ``ort-acc0`` / ``ort-acc4``: onnxruntime MatMulNBits accuracy_level 0 and 4, 4-bit (it
  picks kernels from the CPU it runs on: VNNI on an AVX-512 VNNI host).

Accuracy: max |y - y_exact| / max |y_exact| against float64 on each row's own dequantized
weights. The JSON names the host and the load average (the shared VM is often loaded: compare
ratios of one run, not times across runs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import (ROOT, _set_threads, _versions, llc_bytes, load1,  # noqa: E402
                       ort_model, ort_session)
from timing import time_call  # noqa: E402

N = K = 4096
BLOCK = 128
ROUNDS = 3


def weights(bits, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, (K, N), dtype=np.uint8)
    scale = (rng.random((K // BLOCK, N)) * 0.02 + 0.002).astype(np.float32)
    zp = rng.integers(0, 1 << bits, (K // BLOCK, N), dtype=np.uint8)
    return q, scale, zp


def cold_copies(copy_bytes: int, cold_mib: int = 512) -> int:
    """How many copies of a layer (``copy_bytes`` each) the cold rows rotate through: twice
    the last-level cache and at least 256 MiB, at most ``cold_mib`` MiB (at least 2 copies)."""
    return max(2, int(min(max(2 * llc_bytes(), 256 << 20), cold_mib << 20) // copy_bytes))


def qc_kernel(target_name, bits, numerics, wts, workdir, streamed=False):
    """(kernel factory over packed codes, packed, config) with the heuristic's M=1 config;
    ``streamed``: the lut lookup that cpu-schedule gives a model whose weights outgrow the
    last-level cache (``tuning.lut_byte_permute``: vpshufb on VBMI hosts)."""
    import dataclasses

    from qcompiler.codegen.cpu import runtime, tuning
    from qcompiler.codegen.cpu.host import llc_bytes
    from qcompiler.targets import get_target

    target = get_target(target_name)
    key = {"op": "qmatmul", "m": 1, "k": K, "n": N, "act": "float", "x_dtype": "f32",
           "w_scheme": f"#quant<u{bits}, affine, per_group(axis=0, block={BLOCK}), scale=f32, "
                       f"zp=u{bits}>", "has_bias": False, "act_order": False}
    if numerics != "exact":
        key["numerics"] = numerics
    config = tuning.default_config(target, key)
    p = tuning.with_table_group(tuning.problem(target, key), config)
    if streamed:
        p = dataclasses.replace(p, byte_permute=tuning.lut_byte_permute(
            p, model_weight_bytes=2 * llc_bytes(), llc=llc_bytes()))
    variants = [{**config, "m": 1, "max_m": 0}]
    # packed as cpu-pack-weights packs them (the int8 kernels' scales f16 where they fit)
    p, packed = runtime.store_scales(p, runtime.pack_weights(p, *wts, None))
    lib = runtime.build_library(p.kernel_shape(), variants, target,
                                os.path.join(workdir, f"k_{target_name}_{numerics}_{bits}"
                                                      + ("_streamed" if streamed else "")))
    return (lambda pk: runtime.QmmKernel(lib, p, variants, pk)), packed, config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.6, help="timing per row")
    ap.add_argument("--cold-mib", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    _set_threads(1)

    import tempfile

    import numpy as np

    import qcompiler
    from qcompiler.codegen.cpu import runtime
    from qcompiler.codegen.cpu.host import host_cpu, host_flags, read_cpuinfo
    from qcompiler.tuning.device import cpu_name

    runtime.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="qc_bench_lut_")
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    wts = {b: weights(b, seed=b) for b in (2, 3, 4)}

    def exact_of(bits):
        q, scale, zp = wts[bits]
        s, z = np.repeat(scale, BLOCK, 0), np.repeat(zp, BLOCK, 0)
        return x.astype(np.float64) @ ((q.astype(np.float64) - z) * s)

    exact = {b: exact_of(b) for b in wts}
    subjects = {}
    plan = [("qc-lut2", "cpu", 2, "lut"), ("qc-lut3", "cpu", 3, "lut"), ("qc-lut4", "cpu", 4, "lut"),
            ("qc-exact4", "cpu", 4, "exact"), ("qc-int8-4", "cpu", 4, "int8"),
            ("qc-int8-2", "cpu", 2, "int8"), ("qc-int8-2-avx2", "cpu-x86-avx2", 2, "int8"),
            ("qc-lut2-avx2", "cpu-x86-avx2", 2, "lut"), ("qc-lut3-avx2", "cpu-x86-avx2", 3, "lut"),
            ("qc-lut4-avx2", "cpu-x86-avx2", 4, "lut"),
            ("qc-int8-4-avx2", "cpu-x86-avx2", 4, "int8")]
    # the lookup a model gets whose weights outgrow the last-level cache (cold: vpshufb on
    # VBMI hosts; the same kernel as qc-lut2 elsewhere)
    plan.append(("qc-lut2-streamed", "cpu", 2, "lut"))
    if {"avx512f", "avx512bw", "avx512vl"} <= host_flags()[1]:
        # cpu-x86-avx512 (no VBMI): vpshufb on zmm, the lookup that vpermb replaces on
        # VBMI hosts (Ice Lake, Zen 4 and later): the A/B of the two in one run
        plan.append(("qc-lut2-avx512", "cpu-x86-avx512", 2, "lut"))
    for impl, target_name, bits, numerics in plan:
        make, packed, config = qc_kernel(target_name, bits, numerics, wts[bits], work,
                                         streamed=impl.endswith("-streamed"))
        kern = make(packed)
        subjects[impl] = {"fn": lambda kern=kern: kern(x), "bits": bits, "config": config,
                          "make": make, "packed": packed, "target": target_name}
    for level in (0, 4):
        sess = ort_session(ort_model(*wts[4], BLOCK, level), 1)
        subjects[f"ort-acc{level}"] = {"fn": lambda sess=sess: sess.run(None, {"A": x})[0],
                                       "bits": 4, "level": level, "target": "onnxruntime"}
    rows, t_start, load_start = [], time.time(), list(os.getloadavg())

    def record(row):
        rows.append(row)
        print(f"{row['impl']:<15} {row['mode']:<4} {row['median_ms']:8.3f} ms  err "
              f"{row['rel_err']:.2e}  load {row['load_before']}->{row['load_after']}", flush=True)

    rounds = {impl: [] for impl in subjects}
    lb = load1()
    for _ in range(ROUNDS):
        for impl, subject in subjects.items():
            rounds[impl].append(time_call(subject["fn"], args.seconds / ROUNDS, min_runs=3,
                                          warmup=3))
    la = load1()
    for impl, subject in subjects.items():
        y = subject["fn"]()
        ex = exact[subject["bits"]]
        subject["err"] = float(np.abs(y - ex).max() / np.abs(ex).max())
        best = min(rounds[impl], key=lambda t: t["median_ms"])
        record({"impl": impl, "mode": "warm", "m": 1, "bits": subject["bits"],
                "target": subject["target"], **best,
                **({"config": subject["config"]} if "config" in subject else {}),
                "round_medians_ms": [t["median_ms"] for t in rounds[impl]],
                "rel_err": subject["err"], "load_before": lb, "load_after": la})
    for impl, subject in subjects.items():
        q, scale, zp = wts[subject["bits"]]
        copy_bytes = q.size * subject["bits"] // 8 + scale.nbytes + zp.size // 2
        copies = cold_copies(copy_bytes, args.cold_mib)
        objs = []
        for i in range(copies):
            if "make" in subject:
                packed = subject["packed"]
                objs.append(subject["make"]({**packed, "w": np.roll(packed["w"], i + 1, axis=1)}))
            else:
                objs.append(ort_session(ort_model(np.roll(q, i + 1, axis=0), scale, zp, BLOCK,
                                                  subject["level"]), 1, spinning=False))
        idx = [0]

        def cold_fn(objs=objs, qc="make" in subject):
            o = objs[idx[0] % copies]
            idx[0] += 1
            return o(x) if qc else o.run(None, {"A": x})[0]

        lb = load1()
        t = time_call(cold_fn, args.seconds, min_runs=copies + 5, max_runs=max(400, 2 * copies),
                      warmup=3)
        record({"impl": impl, "mode": "cold", "m": 1, "bits": subject["bits"],
                "target": subject["target"], **t, "rel_err": subject["err"], "copies": copies,
                "load_before": lb, "load_after": load1()})
        del objs

    by = {(r["impl"], r["mode"]): r for r in rows}
    ratios = []
    for mode in ("warm", "cold"):
        ort = min((by[(f"ort-acc{lv}", mode)] for lv in (0, 4)), key=lambda r: r["median_ms"])
        for suffix, ours4 in (("", min((by[("qc-exact4", mode)], by[("qc-int8-4", mode)]),
                                       key=lambda r: r["median_ms"])),
                              ("-avx2", by[("qc-int8-4-avx2", mode)])):
            for impl in [f"qc-lut{bits}{suffix}" for bits in (2, 3, 4)] + [f"qc-int8-2{suffix}"] \
                    + (["qc-lut2-streamed"] if not suffix else []):
                r = by[(impl, mode)]
                ratios.append({
                    "impl": r["impl"], "mode": mode, "our_4bit": ours4["impl"],
                    "speedup_vs_our_4bit": round(ours4["median_ms"] / r["median_ms"], 3),
                    "faster_ort": ort["impl"],
                    "speedup_vs_faster_ort": round(ort["median_ms"] / r["median_ms"], 3),
                    "rel_err": r["rel_err"], "ort_acc4_rel_err": by[("ort-acc4", mode)]["rel_err"]})
                print(f"  {r['impl']:<13} {mode}: {ratios[-1]['speedup_vs_our_4bit']:5.2f}x "
                      f"{ours4['impl']}, {ratios[-1]['speedup_vs_faster_ort']:5.2f}x "
                      f"{ort['impl']} (4-bit); err {r['rel_err']:.1e}")
    vendor, flags = read_cpuinfo()
    result = {
        "benchmark": "bench_cpu_lut", "qcompiler": qcompiler.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": cpu_name(), "vendor": vendor,
                   "host_isa": "avx512_vnni" if "avx512_vnni" in flags else
                   ("avx2" if "avx2" in flags else "other"),
                   "host_llvm_mcpu": host_cpu()["mcpu"], "cores": os.cpu_count(),
                   "llc_bytes": llc_bytes()},
        "code": "rows with target cpu: built for this host; cpu-x86-avx2 (-avx2 rows): AVX2 "
                "code (-mcpu=haswell) run on this host; cpu-x86-avx512 (-avx512 row): "
                "AVX-512 code without VBMI (vpshufb lookups); onnxruntime uses the kernels of the "
                "CPU it runs on",
        "load_avg_1_5_15_start_end": [load_start, list(os.getloadavg())],
        "threads": 1, "n": N, "k": K, "block": BLOCK, "seconds_per_row": args.seconds,
        "command": " ".join([os.path.relpath(sys.executable, ROOT)] + sys.argv),
        "wall_s": round(time.time() - t_start, 1), "versions": _versions(),
        "ratios": ratios, "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"cpu-lut-{stamp}-t1.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)} ({len(rows)} rows, {result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
