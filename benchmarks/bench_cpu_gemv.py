"""The CPU qmatmul at decode sizes (M=1, small M) against onnxruntime MatMulNBits, int8 and fp32.

    .venv/bin/python benchmarks/bench_cpu_gemv.py [--threads 1] [--ms 1] [--blocks 128,32]
                                                  [--shapes 4096x4096,...] [--seconds 0.6]
                                                  [--no-baseline] [--out benchmarks/results]
                                                  [--isa native|avx2]

The Llama decode step's weight products (TinyLlama widths: 2048 hidden, 5632 intermediate)
and the 4096x4096 of issue #11, shapes given as N x K (outputs x inputs), 4-bit asymmetric
weights (u4 codes and zero points, fp32 scales, groups of --blocks along K), the problems
and helpers of ``bench_cpu.py`` (same weights, same onnxruntime model, same kernel objects).
Implementations, at the same thread count:

- ``qc-int8``: qcompiler's int8 numerics (activations quantized per row and group, vpdpbusd
  on AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2), its default config: up to M=64 (VNNI) or
  32 (AVX2) the fused row kernel (codes unpacked in registers); the scales stored as
  cpu-pack-weights stores them (f16 where they fit, ``runtime.store_scales``);
- ``qc-int8-sched`` (unless --no-baseline; x86 hosts): the same config built with the
  tensorized schedule that the fused kernel replaced (codes unpacked into a stack buffer),
  i.e. the kernel before it, for a before/after in one run (above the fused kernel's M, both
  are the group order: the same kernel);
- ``qc-exact``: qcompiler's fp32-activation kernel (numerics=exact);
- ``ort-acc4`` / ``ort-acc0``: MatMulNBits with accuracy_level 4 (int8 activations) and 0.

``--isa avx2`` compiles qcompiler's kernels as for an AVX2-only host of this vendor
(QC_HOST_ISA=avx2: AVX-512 and VNNI masked from host detection, e.g. -mcpu=znver3 on an AMD
host; ymm code, 8-lane int8 dot), so an AVX-512 machine runs the code a Zen 3 would. The
JSON is then named ``cpu-gemv-<stamp>-avx2-on-<real -mcpu>-t<threads>.json`` and says so:
these are AVX2 figures measured on the real CPU, not on an AVX2-only host (clocks, caches
and port counts are the real CPU's). onnxruntime picks its kernels by CPUID and cannot be
masked: its rows are its best kernels for the real CPU (AVX-512 VNNI on a Zen 4).

Warm (weights cache-resident as far as they fit: 4096x4096 is 8 MiB of codes, inside the
32 MiB L3 of a Zen 4): the implementations of one problem take turns for 3 rounds and each
keeps its best round's median (``bench_cpu.py``'s rule). A qcompiler time is one call of the
runtime's kernel object from numpy x to numpy y (quantization prologue included); ``kernel_ms``
is the compiled function alone. Accuracy: max |y - y_exact| / max |y_exact| against float64
math on the dequantized weights. The JSON names the CPU model, the LLVM -mcpu and ISA flags.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

from timing import time_call  # benchmarks/timing.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = "4096x4096,2048x2048,2048x5632,5632x2048"  # N x K
ROUNDS = 3


def _isa_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
            "gfni", "amx_int8")
    return [f for f in keep if f in flags]


def scheduled_kernel(q, scale, zp, block, m, work):
    """``bench_cpu.QCKernel`` for int8, built with the tensorized row schedule (the fused
    kernel switched off for this build only)."""
    import bench_cpu
    from qcompiler.codegen.cpu import kernels

    os.makedirs(os.path.join(work, "sched"), exist_ok=True)
    saved = kernels.int8_fused
    kernels.int8_fused = lambda ks, variant: False
    try:
        return bench_cpu.QCKernel(q, scale, zp, block, "int8", m,
                                  os.path.join(work, "sched"))
    finally:
        kernels.int8_fused = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ms", default="1")
    ap.add_argument("--blocks", default="128,32")
    ap.add_argument("--shapes", default=SHAPES, help="N x K, comma separated")
    ap.add_argument("--seconds", type=float, default=0.6, help="timing per row and impl")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: qcompiler's kernels as for an AVX2-only host (QC_HOST_ISA=avx2)")
    args = ap.parse_args(argv)
    if args.isa == "avx2":
        os.environ["QC_HOST_ISA"] = "avx2"  # before the host is detected (codegen/cpu/host.py)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy and TVM read them
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_cpu
    import numpy as np

    sys.path.insert(0, ROOT)
    import qcompiler
    from qcompiler.codegen.cpu import host as qc_host
    from qcompiler.codegen.cpu.host import host_cpu, target_cpu
    from qcompiler.targets import get_target
    from qcompiler.tuning.device import cpu_name

    try:
        from threadpoolctl import threadpool_limits

        _limits = threadpool_limits(args.threads)  # noqa: F841  (held while it lives)
    except ImportError:
        pass
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    compiled = target_cpu(get_target("cpu"))
    vnni = compiled["vnni"]
    # the fused kernel (VNNI or AVX2) has the tensorized schedule as its before (not Arm)
    fused_isa = compiled["arch"] == "x86_64"
    impls = (["qc-int8"] + (["qc-int8-sched"] if fused_isa and not args.no_baseline else [])
             + ["ort-acc4", "qc-exact", "ort-acc0"])
    work = tempfile.mkdtemp(prefix="qc_bench_gemv_")
    rows, t_start = [], time.time()
    for n, k in shapes:
        for block in blocks:
            q, scale, zp = bench_cpu.make_weights(n, k, block, seed=n + k + block)
            w64 = bench_cpu.dequant(q, scale, zp, block).astype(np.float64)
            for m in ms:
                x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
                exact = x.astype(np.float64) @ w64
                subjects = {}
                for impl in impls:
                    if impl.startswith("qc-"):
                        qk = (scheduled_kernel(q, scale, zp, block, m, work)
                              if impl == "qc-int8-sched" else
                              bench_cpu.QCKernel(q, scale, zp, block, impl.split("-")[1], m,
                                                 work))
                        prepared = qk.kernel.prepare(x)
                        subjects[impl] = {
                            "fn": lambda qk=qk: qk.kernel(x),
                            "kernel_fn": lambda qk=qk, pr=prepared: qk.kernel.call_prepared(pr),
                            "extra": {"config": qk.config}}
                    else:
                        sess = bench_cpu.ort_session(
                            bench_cpu.ort_model(q, scale, zp, block, int(impl[-1])), args.threads)
                        subjects[impl] = {"fn": lambda sess=sess: sess.run(None, {"A": x})[0],
                                          "extra": {}}
                rounds = {impl: [] for impl in subjects}
                lb = bench_cpu.load1()
                for _ in range(ROUNDS):
                    for impl, subject in subjects.items():
                        rounds[impl].append(time_call(subject["fn"], args.seconds / ROUNDS,
                                                      min_runs=5, warmup=3))
                la = bench_cpu.load1()
                for impl, subject in subjects.items():
                    y = subject["fn"]()
                    err = float(np.abs(y - exact).max() / np.abs(exact).max())
                    best = min(rounds[impl], key=lambda t: t["median_ms"])
                    extra = dict(subject["extra"])
                    if "kernel_fn" in subject:
                        extra["kernel_ms"] = time_call(subject["kernel_fn"], args.seconds / 4,
                                                       min_runs=5, warmup=3)["median_ms"]
                    row = {"impl": impl, "n": n, "k": k, "block": block, "m": m, **best,
                           **extra, "round_medians_ms": [t["median_ms"] for t in rounds[impl]],
                           "rel_err": err, "load_before": lb, "load_after": la}
                    rows.append(row)
                    kern = f" kernel {row['kernel_ms']:.3f}" if "kernel_ms" in row else ""
                    print(f"{impl:<14} N={n:<5} K={k:<5} b={block:<4} M={m:<3} "
                          f"{row['median_ms']:8.3f} ms{kern}  err {err:.1e}  load {lb}->{la}",
                          flush=True)
                del subjects
    summary = ratios(rows)
    for line in summary:
        print(line)
    cpu = host_cpu()
    real_mcpu = qc_host._host_cpu(None)["mcpu"]  # the CPU's own, whatever QC_HOST_ISA says
    result = {
        "benchmark": "bench_cpu_gemv", "qcompiler": qcompiler.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": cpu_name(), "llvm_mcpu": real_mcpu, "isa": _isa_flags(),
                   "cores": os.cpu_count(), "llc_bytes": bench_cpu.llc_bytes()},
        "compiled_for": {"isa": args.isa, "llvm_mcpu": cpu["mcpu"],
                         "vector_bits": compiled["vector_bits"], "vnni": vnni,
                         "QC_HOST_ISA": os.environ.get("QC_HOST_ISA") or None},
        "threads": args.threads, "seconds_per_row": args.seconds,
        "command": " ".join([os.path.relpath(sys.executable, ROOT)] + sys.argv),
        "wall_s": round(time.time() - t_start, 1), "versions": bench_cpu._versions(),
        "summary": summary, "rows": rows,
    }
    if args.isa == "avx2":
        result["note"] = (
            f"qcompiler rows: AVX2 code (-mcpu={cpu['mcpu']}, 256-bit, no VNNI) measured on "
            f"a {cpu_name()} (-mcpu={real_mcpu}) running it, not on an AVX2-only host; "
            "onnxruntime rows: its own CPUID dispatch on this CPU (not masked to AVX2)")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    isa = f"avx2-on-{real_mcpu}" if args.isa == "avx2" else real_mcpu
    path = os.path.join(args.out, f"cpu-gemv-{stamp}-{isa}-t{args.threads}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)} ({len(rows)} rows, {result['wall_s']} s)")
    return 0


def ratios(rows) -> list:
    """Per problem: peer median / ours (above 1: ours faster)."""
    idx = {(r["impl"], r["n"], r["k"], r["block"], r["m"]): r["median_ms"] for r in rows}
    lines = ["speed-up (peer median / ours):"]
    pairs = [("qc-int8", "ort-acc4"), ("qc-int8", "qc-int8-sched"), ("qc-exact", "ort-acc0")]
    for (impl, n, k, block, m), t in sorted(idx.items(), key=lambda kv: str(kv[0][1:])):
        for ours, peer in pairs:
            if impl == ours and (peer, n, k, block, m) in idx:
                lines.append(f"  N={n:<5} K={k:<5} b={block:<4} M={m:<3} {ours} vs {peer}: "
                             f"{idx[(peer, n, k, block, m)] / t:5.2f}x")
    return lines


if __name__ == "__main__":
    sys.exit(main())
