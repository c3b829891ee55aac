"""Whole-model latency on the CPU: qcompiler against onnxruntime on the same 4-bit file.

    .venv/bin/python benchmarks/bench_models.py [--models minilm,gpt2,llama] [--threads 1,2]
                                                [--quick] [--out benchmarks/results]

Models (random weights unless said otherwise; 4-bit MatMulNBits by onnxruntime's quantizer,
round to nearest, symmetric, block 32 unless said otherwise):

- ``minilm``: all-MiniLM-L6-v2 from the offline package (``examples/minilm_onnx.py``), blocks
  32 and 128, shapes batch x tokens 1x16, 8x32, 32x128;
- ``gpt2``: the GPT-2 architecture, 12 layers, 768 hidden (``examples/decoder_models.py``),
  prefill 1x128;
- ``llama``: the Llama architecture at TinyLlama's widths (2048 hidden, 32 heads, 4 KV heads,
  5632 intermediate), 4 layers: prefill 1x128, and one decode step against a KV cache of 512.

Each model is exported with ``torch.onnx.export(dynamo=True)``, quantized once, and the same
file is run by onnxruntime (default graph optimizations, ``intra_op_num_threads`` = threads)
and by ``qcompiler.compile(file, target="cpu")`` (``QC_CPU_THREADS`` = threads). Every
qcompiler output is checked against onnxruntime's (max abs difference relative to the output's
scale). Thread counts run in separate child processes (BLAS and thread pools read their sizes
once). The JSON written to ``--out`` names the host's CPU model and ISA and the versions.
A model that qcompiler cannot compile yet is recorded with its error, not skipped silently.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

GOALS = {"minilm": 1.5, "gpt2": 1.3, "llama": 1.3}  # ORT time / qcompiler time


def _cases(quick: bool) -> list[dict]:
    """(model, variant, block, shape) rows in the order they run."""
    rows = []
    for block in ((32,) if quick else (32, 128)):
        for batch, seq in ([(1, 16), (8, 32)] if quick else [(1, 16), (8, 32), (32, 128)]):
            rows.append({"model": "minilm", "block": block, "case": f"{batch}x{seq}",
                         "batch": batch, "seq": seq, "past": 0})
    rows.append({"model": "gpt2", "block": 32, "case": "prefill 1x128", "batch": 1,
                 "seq": 32 if quick else 128, "past": 0})
    rows.append({"model": "llama", "file": "llama_prefill", "block": 32, "case": "prefill 1x128",
                 "batch": 1,
                 "seq": 32 if quick else 128, "past": 0})
    rows.append({"model": "llama", "block": 32, "case": "decode past 512", "batch": 1, "seq": 1,
                 "past": 128 if quick else 512})
    return rows


def host_isa() -> dict:
    """The vendor, the ISA flags that matter to the kernels, and the LLVM -mcpu in use."""
    from qcompiler.codegen.cpu.host import host_cpu, read_cpuinfo

    vendor, flags = read_cpuinfo()
    return {"vendor": vendor, "mcpu": host_cpu()["mcpu"],
            "isa": [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                "amx_int8") if f in flags]}


# --------------------------------------------------------------------------------------------
# models: fp32 export, then the 4-bit file (cached in the work directory)
# --------------------------------------------------------------------------------------------


def fp32_model(name: str, work: str, quick: bool) -> str:
    import decoder_models as dm

    path = os.path.join(work, f"{name}{'_quick' if quick else ''}.fp32.onnx")
    if os.path.exists(path):
        return path
    if name == "minilm":
        import minilm_onnx as mo

        _, model = mo.load_minilm()
        return mo.export_onnx(model, path)
    if name == "gpt2":
        model = dm.gpt2(layers=2 if quick else 12)
        feeds = {"input_ids": __import__("numpy").zeros((1, 8), "int64") + 7}
        return dm.export_onnx(model, feeds, path)
    if name in ("llama", "llama_prefill"):
        prefill = name == "llama_prefill"
        layers = 1 if quick else 4
        model = dm.llama(layers=layers, with_cache=not prefill, **dm.TINYLLAMA)
        feeds = dm.llama_inputs(dm.TINYLLAMA, layers, 1, 8 if prefill else 1, 0 if prefill else 8)
        return dm.export_onnx(model, feeds, path)
    raise ValueError(name)


def quantized_model(name: str, block: int, work: str, quick: bool) -> str:
    from minilm_onnx import quantize_matmulnbits

    src = fp32_model(name, work, quick)
    dst = src.replace(".fp32.onnx", f".q4b{block}.onnx")
    if not os.path.exists(dst):
        quantize_matmulnbits(src, dst, block=block, symmetric=True)
    return dst


def feeds_for(row: dict, quick: bool) -> dict:
    import numpy as np

    import decoder_models as dm

    rng = np.random.default_rng(0)
    if row["model"] == "minilm":
        ids = rng.integers(1000, 20000, (row["batch"], row["seq"]), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[1:, row["seq"] // 2:] = 0  # padded rows beyond the first
        return {"input_ids": ids, "attention_mask": mask}
    if row["model"] == "gpt2":
        return {"input_ids": rng.integers(0, 50257, (row["batch"], row["seq"]), dtype=np.int64)}
    # llama: the decode model takes past_k/past_v; the prefill model takes no cache
    return dm.llama_inputs(dm.TINYLLAMA, 1 if quick else 4, row["batch"], row["seq"], row["past"])


# --------------------------------------------------------------------------------------------
# one child process: every row at one thread count
# --------------------------------------------------------------------------------------------


def run_child(threads: int, models: list[str], quick: bool, work: str,
              min_seconds: float) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    import qcompiler
    from timing import time_call

    os.environ["QC_CPU_THREADS"] = str(threads)
    out = []
    compiled: dict[str, object] = {}
    for row in _cases(quick):
        if row["model"] not in models:
            continue
        rec = {**row, "threads": threads}
        path = quantized_model(row.get("file", row["model"]), row["block"], work, quick)
        feeds = feeds_for(row, quick)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        want = sess.run(None, feeds)
        rec["ort"] = time_call(lambda: sess.run(None, feeds), min_seconds)
        try:
            if path not in compiled:
                t0 = time.perf_counter()
                compiled[path] = qcompiler.compile(path, target="cpu")
                rec["compile_s"] = round(time.perf_counter() - t0, 2)
            mod = compiled[path]
            got = list(mod.run(feeds).values())
            scale = max(float(np.max(np.abs(w))) for w in want) or 1.0
            rec["max_rel_err"] = max(float(np.max(np.abs(np.asarray(g, np.float64) - w)))
                                     for g, w in zip(got, want)) / scale
            rec["qcompiler"] = time_call(lambda: mod.run(feeds), min_seconds)
            rec["ratio"] = round(rec["ort"]["median_ms"] / rec["qcompiler"]["median_ms"], 3)
        except Exception as e:  # recorded, not hidden: the row says why it has no figure
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rec["goal"] = GOALS[row["model"]]
        out.append(rec)
        print(json.dumps({k: rec.get(k) for k in ("model", "block", "case", "threads", "ratio",
                                                  "error")}), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,gpt2,llama")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, smaller models")
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qc_bench_models"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    models = a.models.split(",")
    os.makedirs(a.work, exist_ok=True)
    if a.child:
        rows = run_child(a.child, models, a.quick, a.work, a.min_seconds)
        json.dump(rows, sys.stdout)
        return 0
    for row in _cases(a.quick):  # export and quantize once, before the timed children
        if row["model"] in models:
            quantized_model(row.get("file", row["model"]), row["block"], a.work, a.quick)
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(threads),
               "--models", a.models, "--work", a.work, "--min-seconds", str(a.min_seconds)]
        cmd += ["--quick"] if a.quick else []
        res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(res.stdout)
    import onnxruntime
    from qcompiler.tuning.device import cpu_name

    import qcompiler

    stamp = datetime.datetime.now(datetime.timezone.utc)
    result = {"benchmark": "bench_models", "date": stamp.isoformat(timespec="seconds"),
              "host": {"cpu": cpu_name(), "machine": platform.machine(), **host_isa(),
                       "cores": len(os.sched_getaffinity(0))},
              "versions": {"qcompiler": qcompiler.__version__,
                           "onnxruntime": onnxruntime.__version__},
              "quick": a.quick, "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"models-cpu-{stamp:%Y%m%d-%H%M}{'-quick' if a.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{'model':<8} {'block':>5} {'case':<16} {'thr':>3} {'ORT ms':>9} {'qc ms':>9} "
          f"{'ratio':>6} {'goal':>5}")
    for r in rows:
        qc = r.get("qcompiler", {}).get("median_ms")
        print(f"{r['model']:<8} {r['block']:>5} {r['case']:<16} {r['threads']:>3} "
              f"{r['ort']['median_ms']:>9.2f} {qc if qc is not None else float('nan'):>9.2f} "
              f"{r.get('ratio', float('nan')):>6} {r['goal']:>5}"
              + (f"  {r['error']}" if "error" in r else ""))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
