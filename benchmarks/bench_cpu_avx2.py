"""The AVX2 code paths of the CPU backend (target ``cpu-x86-avx2``) against onnxruntime.

    .venv/bin/python benchmarks/bench_cpu_avx2.py [--seconds 0.6] [--out benchmarks/results]

4096x4096, block 128, 4-bit asymmetric (u4 codes and zero points, fp32 scales), 1 thread:

- ``qc-exact-avx2``: fp32 activations (numerics=exact) built for -mcpu=haswell;
- ``qc-int8-avx2``: activations quantized per row and group to int8, ``vpmaddubsw`` +
  ``vpmaddwd`` (numerics=int8 on a target without VNNI) built for -mcpu=haswell;
- ``ort-acc0`` / ``ort-acc4``: onnxruntime MatMulNBits accuracy_level 0 and 4 on the same
  codes. onnxruntime picks its kernels from the CPU it runs on (CPUID), so on an AVX-512 VNNI
  host its acc4 uses VNNI: the JSON says which host ran it, and only a real AVX2-only host
  (Zen 3, Haswell) compares AVX2 code with AVX2 code.

M in {1, 16, 128} warm (implementations take turns, 3 rounds, best round kept) and M=1 cold
(weights rotated through copies beyond the last-level cache). Accuracy: max |y - y_exact| /
max |y_exact| against float64 on the dequantized weights. The 1-minute load average before
and after each row is recorded (the shared 2-core VM is often loaded: compare ratios of one
run, not times across runs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import (ROOT, _set_threads, _versions, dequant, llc_bytes, load1,  # noqa: E402
                       make_weights, ort_model, ort_session)
from timing import time_call  # noqa: E402

N = K = 4096
BLOCK = 128
MS = (1, 16, 128)
ROUNDS = 3
TARGET = "cpu-x86-avx2"


def qc_kernel(q, scale, zp, numerics, m, workdir):
    """qcompiler's kernel for the AVX2 target with the heuristic's config for M."""
    from qcompiler.codegen.cpu import runtime, tuning
    from qcompiler.targets import get_target

    target = get_target(TARGET)
    key = {"op": "qmatmul", "m": m, "k": K, "n": N, "act": "float", "x_dtype": "f32",
           "w_scheme": f"#quant<u4, affine, per_group(axis=0, block={BLOCK}), scale=f32, "
                       "zp=u4>", "has_bias": False, "act_order": False}
    if numerics != "exact":
        key["numerics"] = numerics
    p = tuning.problem(target, key)
    config = tuning.default_config(target, key)
    variants = [{**config, "m": m, "max_m": 0}]
    lib = runtime.build_library(p.kernel_shape(), variants, target,
                                os.path.join(workdir, f"k_{numerics}_{m}"))
    packed = runtime.pack_weights(p, q, scale, zp, None)
    return p, variants, lib, packed, config


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
    from qcompiler.codegen.cpu.host import host_cpu, read_cpuinfo, target_cpu
    from qcompiler.targets import get_target
    from qcompiler.tuning.device import cpu_name

    runtime.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="qc_bench_avx2_")
    q, scale, zp = make_weights(N, K, BLOCK, seed=N + K + BLOCK)
    w64 = dequant(q, scale, zp, BLOCK).astype(np.float64)
    rows, t_start, load_start = [], time.time(), list(os.getloadavg())

    def record(row):
        rows.append(row)
        print(f"{row['impl']:<14} {row['mode']:<4} M={row['m']:<4} {row['median_ms']:9.3f} ms"
              f"  err {row['rel_err']:.2e}  load {row['load_before']}->{row['load_after']}",
              flush=True)

    for m in MS:
        x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
        exact = x.astype(np.float64) @ w64
        subjects = {}
        for numerics in ("exact", "int8"):
            p, variants, lib, packed, config = qc_kernel(q, scale, zp, numerics, m, work)
            kern = runtime.QmmKernel(lib, p, variants, packed)
            subjects[f"qc-{numerics}-avx2"] = {"fn": lambda kern=kern: kern(x),
                                               "config": config, "kernel": (p, variants, lib,
                                                                            packed)}
        for level in (0, 4):
            sess = ort_session(ort_model(q, scale, zp, BLOCK, level), 1)
            subjects[f"ort-acc{level}"] = {"fn": lambda sess=sess: sess.run(None, {"A": x})[0],
                                           "level": level}
        rounds = {impl: [] for impl in subjects}
        lb = load1()
        for _ in range(ROUNDS):
            for impl, subject in subjects.items():
                rounds[impl].append(time_call(subject["fn"], args.seconds / ROUNDS,
                                              min_runs=3, warmup=3))
        la = load1()
        for impl, subject in subjects.items():
            y = subject["fn"]()
            subject["err"] = float(np.abs(y - exact).max() / np.abs(exact).max())
            best = min(rounds[impl], key=lambda t: t["median_ms"])
            record({"impl": impl, "mode": "warm", "m": m, **best,
                    **({"config": subject["config"]} if "config" in subject else {}),
                    "round_medians_ms": [t["median_ms"] for t in rounds[impl]],
                    "rel_err": subject["err"], "load_before": lb, "load_after": la})
        if m != 1:
            continue
        copy_bytes = q.size // 2 + scale.nbytes + zp.size // 2
        copies = max(2, int(min(max(2 * llc_bytes(), 256 << 20), args.cold_mib << 20)
                            // copy_bytes))
        for impl, subject in subjects.items():
            objs = []
            for i in range(copies):
                if "kernel" in subject:
                    p, variants, lib, packed = subject["kernel"]
                    rolled = {**packed, "w": np.roll(packed["w"], i + 1, axis=1)}
                    objs.append(runtime.QmmKernel(lib, p, variants, rolled))
                else:
                    objs.append(ort_session(ort_model(np.roll(q, i + 1, axis=0), scale, zp,
                                                      BLOCK, subject["level"]), 1,
                                            spinning=False))
            idx = [0]

            def cold_fn(objs=objs, qc="kernel" in subject):
                o = objs[idx[0] % copies]
                idx[0] += 1
                return o(x) if qc else o.run(None, {"A": x})[0]

            lb = load1()
            t = time_call(cold_fn, args.seconds, min_runs=copies + 5,
                          max_runs=max(400, 2 * copies), warmup=3)
            record({"impl": impl, "mode": "cold", "m": m, **t, "rel_err": subject["err"],
                    "copies": copies, "bytes_rotated": copies * copy_bytes,
                    "load_before": lb, "load_after": load1()})
            del objs

    idx = {(r["impl"], r["mode"], r["m"]): r for r in rows}
    ratios = []
    for mode, m in (("warm", 1), ("cold", 1), ("warm", 16), ("warm", 128)):
        peer = min((idx[(f"ort-acc{lv}", mode, m)] for lv in (0, 4)),
                   key=lambda r: r["median_ms"])
        for impl in ("qc-exact-avx2", "qc-int8-avx2"):
            r = idx[(impl, mode, m)]
            ratios.append({"impl": impl, "mode": mode, "m": m, "peer": peer["impl"],
                           "speedup_vs_faster_ort": round(peer["median_ms"] / r["median_ms"], 3),
                           "rel_err": r["rel_err"], "peer_rel_err": peer["rel_err"]})
            print(f"  {impl:<14} {mode} M={m:<4} {ratios[-1]['speedup_vs_faster_ort']:5.2f}x "
                  f"the faster ORT ({peer['impl']}); err {r['rel_err']:.1e} / "
                  f"{peer['rel_err']:.1e}")
    vendor, flags = read_cpuinfo()
    result = {
        "benchmark": "bench_cpu_avx2", "qcompiler": qcompiler.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": cpu_name(), "vendor": vendor,
                   "host_isa": "avx512_vnni" if "avx512_vnni" in flags else
                   ("avx2" if "avx2" in flags else "other"),
                   "host_llvm_mcpu": host_cpu()["mcpu"], "cores": os.cpu_count(),
                   "llc_bytes": llc_bytes()},
        "code": f"qcompiler kernels built for {TARGET} (-mcpu="
                f"{target_cpu(get_target(TARGET))['mcpu']}: AVX2 only, no AVX-512, no VNNI); "
                "onnxruntime uses the kernels of the CPU it runs on",
        "load_avg_1_5_15_start_end": [load_start, list(os.getloadavg())],
        "threads": 1, "n": N, "k": K, "block": BLOCK, "seconds_per_row": args.seconds,
        "command": " ".join([os.path.relpath(sys.executable, ROOT)] + sys.argv),
        "wall_s": round(time.time() - t_start, 1), "versions": _versions(),
        "ratios": ratios, "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"cpu-avx2-{stamp}-t1.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)} ({len(rows)} rows, {result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
