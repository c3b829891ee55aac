"""Host work per token of a generation loop, where every token is a new input signature.

    .venv/bin/python benchmarks/bench_decode_host.py [--mode cuda-recorder,cpu] [--tokens 200]
                                                     [--out benchmarks/results]

A decode step exported with a KV cache takes the cache as ``past_k [L, B, H, P, D]`` and
returns it one row longer, so a loop feeding ``present`` back as ``past`` meets a new shape
signature every token; what the runtime does on the host per signature (the shape functions,
placing and binding what the new length reaches) is paid every token. Two rows:

- ``cuda-recorder``: the CUDA plan runner on this machine's CPU, with the device calls
  recorded instead of made (``tests/test_cuda_plan_signatures.py``'s recorder: no GPU, no
  CUDA driver). The model is the 22-layer TinyLlama structure at narrow widths (hidden 128,
  8 heads, 2 KV heads), 4-bit, through the ``cuda-sm90`` pipeline; the cache grows from 300.
  It times the Python side of a token (``CudaPlanRunner.__call__`` without the device's
  work), the part a GPU loop cannot overlap, and the median of its pieces.
- ``cpu``: the 2-layer tiny Llama of ``examples/llama_decode.py --small`` compiled for
  ``cpu`` (one thread), a greedy loop of 100 tokens from an 8-token prompt; the median time
  of a decode call, and onnxruntime's on the same file (1 thread) in the same process.

Both print the medians and write ``decode-host-<date>.json`` with the host's CPU.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def cuda_recorder(tokens: int, work: str) -> dict:
    import decoder_models as dm
    from test_cuda_plan_signatures import _llama_runner

    from qcompiler.codegen.cuda import plan as cuda_plan
    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager
    from qcompiler.targets import get_target

    layers = 22
    cfg = dict(vocab=512, hidden=128, heads=8, kv_heads=2, intermediate=256)
    path = os.path.join(work, "decode22.onnx")
    if not os.path.exists(path):
        model = dm.llama(layers=layers, **cfg)
        dm.export_onnx(model, dm.llama_inputs(cfg, layers, 1, 1, 16), path, dynamo=False)
    passes = "canonicalize,quantize-weights{bits=4,group=32}," + \
        get_target("cuda-sm90").default_pipeline
    module = PassManager.parse(passes).run(import_model(path))
    runner = _llama_runner(module, [])
    pieces = collections.defaultdict(list)

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            pieces[name].append(time.perf_counter() - t0)
            return out
        return call

    runner._reshape_last = timed("reshape_last", runner._reshape_last)
    runner._place_host_values = timed("host_values", runner._place_host_values)
    resolve = cuda_plan.resolve
    cuda_plan.resolve = timed("resolve", resolve)
    try:
        start = 300
        feeds = [{k: np.asarray(v) for k, v in
                  dm.llama_inputs(cfg, layers, 1, 1, p, seed=1).items()}
                 for p in range(start, start + tokens + 3)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # beyond the buckets: said once
            for f in feeds[:3]:
                runner(f)
            for v in pieces.values():
                v.clear()
            per_token = []
            for f in feeds[3:]:
                t0 = time.perf_counter()
                runner(f)
                per_token.append(time.perf_counter() - t0)
    finally:
        cuda_plan.resolve = resolve
    return {"row": "cuda-recorder", "layers": layers, "model": cfg, "tokens": tokens,
            "cache_from": start, "launches": runner.last_signature.n,
            "median_ms": round(1e3 * float(np.median(per_token)), 4),
            "best_ms": round(1e3 * float(np.min(per_token)), 4),
            "pieces_median_ms": {k: round(1e3 * float(np.median(v)), 4)
                                 for k, v in pieces.items()}}


def cpu_loop(tokens: int, work: str) -> dict:
    import onnxruntime as ort

    import decoder_models as dm
    import llama_decode
    import qcompiler

    cfg = dict(dm.SMALL_LLAMA, layers=2)
    files = {n: os.path.join(work, f"{n}.q4.onnx") for n in ("prefill", "decode")}
    if not all(os.path.exists(p) for p in files.values()):
        args = argparse.Namespace(checkpoint=None, small=True, layers=2)
        files["prefill"], files["decode"], _ = llama_decode.build_files(args, work)
    prefill, decode = (qcompiler.compile(files[n], target="cpu") for n in ("prefill", "decode"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(files[n], so, providers=["CPUExecutionProvider"])
                for n in ("prefill", "decode")]

    def loop(run_prefill, run_decode) -> list:
        prompt = np.random.default_rng(0).integers(0, cfg["vocab"], (1, 8), dtype=np.int64)
        logits, k, v = run_prefill({"input_ids": prompt,
                                    "position_ids": np.arange(8, dtype=np.int64)[None]})
        token, times = int(np.argmax(logits[0, -1])), []
        for step in range(tokens):
            t0 = time.perf_counter()
            logits, k, v = run_decode({"input_ids": np.array([[token]], np.int64),
                                       "position_ids": np.array([[8 + step]], np.int64),
                                       "past_k": k, "past_v": v})
            times.append(time.perf_counter() - t0)
            token = int(np.argmax(logits[0, -1]))
        return times[5:]

    ours, theirs = [], []
    for _ in range(3):  # alternated: the VM's load moves between runs
        ours.append(np.median(loop(lambda f: list(prefill.run(f).values()),
                                   lambda f: list(decode.run(f).values()))))
        theirs.append(np.median(loop(lambda f: sessions[0].run(None, f),
                                     lambda f: sessions[1].run(None, f))))
    return {"row": "cpu", "model": cfg, "tokens": tokens,
            "median_ms_per_loop": [round(1e3 * float(t), 4) for t in ours],
            "onnxruntime_median_ms_per_loop": [round(1e3 * float(t), 4) for t in theirs]}


def main(argv=None) -> int:
    from qcompiler.codegen.cpu.host import host_cpu
    from qcompiler.tuning.device import cpu_name

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="cuda-recorder,cpu")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qc_decode_host"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("QC_CPU_THREADS", "1")
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for mode in args.mode.split(","):
        row = cuda_recorder(args.tokens, args.work) if mode == "cuda-recorder" else \
            cpu_loop(min(args.tokens, 100), args.work)
        print(json.dumps(row))
        rows.append(row)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    doc = {"benchmark": "bench_decode_host", "date": stamp.isoformat(timespec="seconds"),
           "device": {"cpu": cpu_name(), "llvm_mcpu": host_cpu()["mcpu"],
                      "isa": host_cpu().get("features"), "cores": os.cpu_count()},
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode-host-{stamp.strftime('%Y%m%d-%H%M')}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
