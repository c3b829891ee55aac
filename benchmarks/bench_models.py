"""Whole-model latency on the CPU: qcompiler against onnxruntime on the same 4-bit file.

    .venv/bin/python benchmarks/bench_models.py [--models minilm,gpt2,llama] [--threads 1,2]
                                                [--acc 0,4] [--cases SUBSTR] [--quick]
                                                [--out benchmarks/results]

Models (random weights unless said otherwise; 4-bit MatMulNBits by onnxruntime's quantizer,
round to nearest, symmetric, block 32 unless said otherwise):

- ``minilm``: all-MiniLM-L6-v2 from the offline package (``examples/minilm_onnx.py``), blocks
  32 and 128, shapes batch x tokens 1x16, 8x32, 32x128;
- ``gpt2``: the GPT-2 architecture, 12 layers, 768 hidden (``examples/decoder_models.py``),
  prefill 1x128;
- ``llama``: the Llama architecture at TinyLlama's widths (2048 hidden, 32 heads, 4 KV heads,
  5632 intermediate), 4 layers: prefill 1x128, one decode step against a KV cache of 512,
  and a generation loop (``generate``): 32 decode steps in a row from a cache of 512, each
  step's caches the next one's inputs, so that every step has a new cache length (a new
  input signature for qcompiler's plan). The loops alternate between the peers, each round
  from a cache length neither has seen; the row gives milliseconds per token.

Each model is exported with ``torch.onnx.export(dynamo=True)``; its weight products that the
quantizer would skip are rewritten to ``MatMul`` first (``weights_to_matmul``: GPT-2's
``Gemm`` layers and its lm_head's ``MatMul(x, Transpose(W))``), so every weight is 4-bit
(each row records the file's census: MatMulNBits nodes and float weight products left, 0).
Each model is quantized twice, at ``accuracy_level`` 0 (fp32 activations) and 4 (int8
activations per block): onnxruntime honors the attribute, and so does qcompiler (level 4 →
its ``int8`` numerics, see docs/models.md). The same file is run by onnxruntime (default
graph optimizations, ``intra_op_num_threads`` = threads) and by
``qcompiler.compile(file, target="cpu")`` (``--target``; ``QC_CPU_THREADS`` = threads), their calls
alternating (both see the same load; min and median of each; with several threads in blocks
of ~0.25 s after a 50 ms pause, since a pool spinning after one peer's call takes a core from
the other's). Every qcompiler output is
checked against onnxruntime's (max abs difference relative to the output's scale). Thread
counts run in separate child processes (BLAS and thread pools read their sizes once). The
JSON written to ``--out`` names the host's CPU model and ISA, the versions and the load
average. A model that qcompiler cannot compile yet is recorded with its error, not skipped
silently.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

GOALS = {"minilm": 1.5, "gpt2": 1.3, "llama": 1.3}  # ORT time / qcompiler time


def _cases(quick: bool, accs=(0, 4)) -> list[dict]:
    """(model, variant, block, shape, accuracy level) rows in the order they run."""
    rows = []
    for acc in accs:
        for block in ((32,) if quick else (32, 128)):
            for batch, seq in ([(1, 16), (8, 32)] if quick else [(1, 16), (8, 32), (32, 128)]):
                rows.append({"model": "minilm", "block": block, "case": f"{batch}x{seq}",
                             "batch": batch, "seq": seq, "past": 0, "acc": acc})
        rows.append({"model": "gpt2", "block": 32, "case": "prefill 1x128", "batch": 1,
                     "seq": 32 if quick else 128, "past": 0, "acc": acc})
        rows.append({"model": "llama", "file": "llama_prefill", "block": 32,
                     "case": "prefill 1x128", "batch": 1, "seq": 32 if quick else 128,
                     "past": 0, "acc": acc})
        rows.append({"model": "llama", "block": 32, "case": "decode past 512", "batch": 1,
                     "seq": 1, "past": 128 if quick else 512, "acc": acc})
        rows.append({"model": "llama", "block": 32, "case": "generate 32 from 512",
                     "batch": 1, "seq": 1, "past": 128 if quick else 512, "acc": acc,
                     "generate": 8 if quick else 32})
    return rows


def time_generation(peers: dict, start: dict, tokens: int, rounds: int) -> dict:
    """Milliseconds per token of each peer's generation loop (``peers``: name -> feeds ->
    (logits, present_k, present_v)): ``tokens`` steps from the caches of ``start``, each
    step's presents the next step's pasts. Round r starts from the cache grown by r * tokens
    positions (fresh lengths for every round), the peers' loops alternating. Median, min and
    max over the rounds, and the last step's logits of each peer's first round."""
    import numpy as np

    times = {k: [] for k in peers}
    logits = {}
    past_len = start["past_k"].shape[3]
    for r in range(rounds):
        grow = r * tokens
        pad = [(0, 0)] * 3 + [(0, grow), (0, 0)]
        first = {**start, "past_k": np.pad(start["past_k"], pad, mode="wrap"),
                 "past_v": np.pad(start["past_v"], pad, mode="wrap")}
        for name, run in peers.items():
            feeds = dict(first)
            time.sleep(0.05)  # the other peer's spinning thread pool settles (see above)
            t0 = time.perf_counter()
            for step in range(tokens):
                feeds["position_ids"] = np.array([[past_len + grow + step]], np.int64)
                out, feeds["past_k"], feeds["past_v"] = run(feeds)
            times[name].append(1e3 * (time.perf_counter() - t0) / tokens)
            logits.setdefault(name, np.asarray(out))
    result = {}
    for k, ts in times.items():
        ts.sort()
        result[k] = {"median_ms": round(ts[len(ts) // 2], 4), "min_ms": round(ts[0], 4),
                     "max_ms": round(ts[-1], 4), "runs": len(ts), "tokens": tokens}
    return result, logits


def time_alternating(fns: dict, min_seconds: float, *, min_runs: int = 3,
                     max_runs: int = 400, warmup: int = 2, block_s: float = 0.0,
                     gap_s: float = 0.0) -> dict:
    """Time each of ``fns`` in turn: ``warmup`` calls each, then rounds in which every
    function runs a block of calls, until each has at least ``min_runs`` calls and the rounds
    took ``min_seconds`` per function (at most ``max_runs`` calls each): every peer sees the
    same load. ``block_s`` > 0: a block is as many calls as fill about that long (else one
    call), after a pause of ``gap_s`` and one untimed call: with several threads a peer's
    thread pool keeps spinning after its call (onnxruntime's does) and took a core from the
    next call of the other (MiniLM 1x16 at 2 threads: qcompiler 3.7 ms alone, 42 ms right
    after onnxruntime calls). Median, min and max of one call in ms, per name."""
    est = {}
    for k, fn in fns.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            est[k] = time.perf_counter() - t0
    block = {k: max(1, int(block_s / max(e, 1e-6))) if block_s else 1 for k, e in est.items()}
    times = {k: [] for k in fns}
    start = time.perf_counter()
    while (min(len(v) for v in times.values()) < min_runs
           or (time.perf_counter() - start < min_seconds * len(fns)
               and min(len(v) for v in times.values()) < max_runs)):
        for k, fn in fns.items():
            if gap_s:
                time.sleep(gap_s)
                fn()
            for _ in range(block[k]):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = {"median_ms": round(1e3 * ts[len(ts) // 2], 4), "min_ms": round(1e3 * ts[0], 4),
                  "max_ms": round(1e3 * ts[-1], 4), "runs": len(ts), "block": block[k]}
    return out


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


def weights_to_matmul(model) -> dict:
    """Rewrite, in place, the weight products that onnxruntime's MatMulNBits quantizer skips
    into the ``MatMul(x, W)`` (+ ``Add``) form it converts, so that every weight is 4-bit:

    - ``Gemm(A, B[, C])`` with a constant B and ``transA = 0`` (the torch exports' linear
      layers of 2-D activations, e.g. GPT-2's ``Conv1D``) → ``MatMul(A, alpha * op(B))`` and,
      with C, ``Add(., beta * C)`` (C constant) or ``Add(., C)`` (beta = 1);
    - ``MatMul(A, Transpose(W))`` of a constant 2-D W (GPT-2's lm_head, tied to the
      embedding table, which keeps its float copy for the Gather) → ``MatMul(A, W^T)``.

    The same rewritten file feeds onnxruntime and qcompiler. Returns the counts rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    def add_init(arr, hint):
        name = f"{hint}__qc_mm{len(g.initializer)}"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    counts = {"gemm": 0, "transposed": 0}
    nodes = []
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type == "Gemm" and n.input[1] in inits and not attrs.get("transA", 0)):
            w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            w = w.T if attrs.get("transB", 0) else w
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            w_name = add_init(w * np.float32(alpha) if alpha != 1.0 else w, n.input[1])
            c = n.input[2] if len(n.input) > 2 and n.input[2] else None
            if c is None:
                nodes.append(helper.make_node("MatMul", [n.input[0], w_name], list(n.output),
                                              name=n.name))
            else:
                if beta != 1.0:
                    if c not in inits:
                        raise ValueError(f"Gemm {n.name}: beta={beta} with a run-time C")
                    c = add_init(numpy_helper.to_array(inits[c]) * np.float32(beta), c)
                y = n.output[0] + "__qc_mm"
                nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [y],
                                              name=n.name + "_matmul"))
                nodes.append(helper.make_node("Add", [y, c], list(n.output), name=n.name))
            counts["gemm"] += 1
            continue
        t = producer.get(n.input[1]) if n.op_type == "MatMul" else None
        if (t is not None and t.op_type == "Transpose" and t.input[0] in inits
                and len(inits[t.input[0]].dims) == 2
                and list(helper.get_attribute_value(t.attribute[0]) if t.attribute else [1, 0])
                == [1, 0]):
            w = numpy_helper.to_array(inits[t.input[0]]).T
            nodes.append(helper.make_node("MatMul", [n.input[0], add_init(w, t.input[0])],
                                          list(n.output), name=n.name))
            uses[t.output[0]] -= 1
            counts["transposed"] += 1
            continue
        nodes.append(n)
    # drop the transposes that no longer feed anything
    nodes = [n for n in nodes if not (n.op_type == "Transpose" and uses.get(n.output[0], 1) == 0
                                      and n.output[0] not in {o.name for o in g.output})]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return counts


def weight_census(path: str) -> dict:
    """MatMulNBits nodes, and float MatMul/Gemm nodes that still take a constant weight (0 for
    a file that is 4-bit throughout)."""
    import onnx

    m = onnx.load(path)
    inits = {i.name for i in m.graph.initializer}
    return {"matmulnbits": sum(n.op_type == "MatMulNBits" for n in m.graph.node),
            "float_weight_matmuls": sum(n.op_type in ("MatMul", "Gemm")
                                        and any(i in inits for i in n.input[1:2])
                                        for n in m.graph.node)}


def quantized_model(name: str, block: int, work: str, quick: bool, acc: int = 0) -> str:
    """The 4-bit file of ``name``: Gemm and transposed-constant products rewritten to MatMul
    (``weights_to_matmul``), then onnxruntime's MatMulNBits quantizer (round to nearest,
    symmetric) with ``accuracy_level = acc`` (0: fp32 activations; 4: int8 activations)."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    src = fp32_model(name, work, quick)
    dst = src.replace(".fp32.onnx", f".q4b{block}.acc{acc}.onnx")
    if not os.path.exists(dst):
        model = onnx.load(src)
        weights_to_matmul(model)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
            logging.WARNING)
        q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True,
                                     accuracy_level=acc)
        q.process()
        q.model.save_model_to_file(dst, use_external_data_format=False)
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
              min_seconds: float, accs=(0, 4), only: str = "", target: str = "cpu") -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    import qcompiler

    os.environ["QC_CPU_THREADS"] = str(threads)
    out = []
    compiled: dict[str, object] = {}
    artifacts: dict[str, str] = {}
    for row in _cases(quick, accs):
        if row["model"] not in models or only not in f"{row['model']} {row['case']}":
            continue
        rec = {**row, "threads": threads, "target": target}
        path = quantized_model(row.get("file", row["model"]), row["block"], work, quick,
                               row["acc"])
        rec["census"] = weight_census(path)
        feeds = feeds_for(row, quick)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        want = sess.run(None, feeds)
        try:
            if path not in compiled:
                # one compiled model alive at a time (memory), its artifact (weights of up to
                # 0.4 GB) in a directory removed with it
                for old_dir in artifacts.values():
                    shutil.rmtree(old_dir, ignore_errors=True)
                compiled.clear()
                artifacts.clear()
                artifacts[path] = tempfile.mkdtemp(prefix="qc_bench_models_")
                t0 = time.perf_counter()
                compiled[path] = qcompiler.compile(path, target=target,
                                                   output_dir=artifacts[path])
                rec["compile_s"] = round(time.perf_counter() - t0, 2)
            mod = compiled[path]
            numerics = sorted({n.attrs["config"].get("numerics", "?")
                               for n in mod.module.main.nodes
                               if n.op == "qmatmul" and "config" in n.attrs}) \
                if hasattr(mod, "module") else None
            if numerics is not None:
                rec["qmatmul_numerics"] = numerics
            if "generate" in row:
                # the loop's last logits, against onnxruntime's after the same loop
                t, last = time_generation(
                    {"ort": lambda f: sess.run(None, f),
                     "qcompiler": lambda f: list(mod.run(f).values())},
                    feeds, row["generate"], rounds=3 if quick else 5)
                got, want = [last["qcompiler"]], [last["ort"]]
            else:
                got = list(mod.run(feeds).values())
            scale = max(float(np.max(np.abs(w))) for w in want) or 1.0
            rec["max_rel_err"] = max(float(np.max(np.abs(np.asarray(g, np.float64) - w)))
                                     for g, w in zip(got, want)) / scale
            if "generate" not in row:
                # several threads: blocks of calls after a pause (a spinning pool of one
                # peer must not take a core from the other's call); one thread: call by call
                t = time_alternating({"ort": lambda: sess.run(None, feeds),
                                      "qcompiler": lambda: mod.run(feeds)}, min_seconds,
                                     **({"block_s": 0.25, "gap_s": 0.05} if threads > 1
                                        else {}))
            rec.update(t)
            rec["ratio"] = round(rec["ort"]["median_ms"] / rec["qcompiler"]["median_ms"], 3)
            rec["ratio_min"] = round(rec["ort"]["min_ms"] / rec["qcompiler"]["min_ms"], 3)
        except Exception as e:  # recorded, not hidden: the row says why it has no figure
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if "ort" not in rec:
                from timing import time_call

                rec["ort"] = time_call(lambda: sess.run(None, feeds), min_seconds)
        rec["goal"] = GOALS[row["model"]]
        rec["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        out.append(rec)
        print(json.dumps({k: rec.get(k) for k in ("model", "block", "case", "acc", "threads",
                                                  "ratio", "ratio_min", "max_rel_err",
                                                  "error", "loadavg")}),
              file=sys.stderr, flush=True)
    compiled.clear()
    for old_dir in artifacts.values():
        shutil.rmtree(old_dir, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,gpt2,llama")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--acc", default="0,4", help="MatMulNBits accuracy levels of the files")
    ap.add_argument("--cases", default="", help="run only rows whose 'model case' contains this")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, smaller models")
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--target", default="cpu",
                    help="qcompiler's target (cpu-x86-avx2: the AVX2 code on any x86 host; "
                         "onnxruntime still picks its kernels for this host's ISA)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qc_bench_models"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    models = a.models.split(",")
    accs = tuple(int(x) for x in a.acc.split(","))
    os.makedirs(a.work, exist_ok=True)
    if a.child:
        rows = run_child(a.child, models, a.quick, a.work, a.min_seconds, accs, a.cases,
                         a.target)
        json.dump(rows, sys.stdout)
        return 0
    for row in _cases(a.quick, accs):  # export and quantize once, before the timed children
        if row["model"] in models and a.cases in f"{row['model']} {row['case']}":
            quantized_model(row.get("file", row["model"]), row["block"], a.work, a.quick,
                            row["acc"])
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(threads),
               "--models", a.models, "--work", a.work, "--min-seconds", str(a.min_seconds),
               "--acc", a.acc, "--cases", a.cases, "--target", a.target]
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
              "target": a.target, "quick": a.quick,
              "argv": sys.argv[1:] if argv is None else list(argv),
              "peers": "onnxruntime CPU EP on the same MatMulNBits file (default graph "
                       "optimizations); calls alternating with qcompiler's",
              "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    tag = "" if a.target == "cpu" else f"-{a.target.removeprefix('cpu-x86-')}-on-host"
    path = os.path.join(a.out, f"models-cpu-{stamp:%Y%m%d-%H%M}{tag}"
                        f"{'-quick' if a.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{'model':<8} {'block':>5} {'case':<16} {'acc':>3} {'thr':>3} {'ORT ms':>9} "
          f"{'qc ms':>9} {'ratio':>6} {'goal':>5}")
    for r in rows:
        qc = r.get("qcompiler", {}).get("median_ms")
        print(f"{r['model']:<8} {r['block']:>5} {r['case']:<16} {r['acc']:>3} {r['threads']:>3} "
              f"{r['ort']['median_ms']:>9.2f} {qc if qc is not None else float('nan'):>9.2f} "
              f"{r.get('ratio', float('nan')):>6} {r['goal']:>5}"
              + (f"  {r['error']}" if "error" in r else ""))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
