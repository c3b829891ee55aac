"""Quantized CNNs on the GPU (issue #15): ResNet-18 and MobileNetV2, ours vs torch fp16.

What it measures. The two architectures of ``bench_cnn.py`` (torchvision's, written out in
torch; random weights, BatchNorm statistics from random batches, 224x224), exported to ONNX and
quantized with onnxruntime ``quantize_static``: QDQ and QOperator, per-channel, activations
QUInt8, weights QInt8, ``reduce_range=False`` on a host with AVX512-VNNI (prepared on an
AVX2-only host: ``reduce_range=True``, 7-bit weights, as the CPU benchmark does there, so that
onnxruntime's u8s8 pairs cannot saturate and its outputs stay an exact reference; the manifest
says which). Each quantized file is compiled with ``qcompiler.compile(path,
target="cuda-sm90")`` and, at batch 1 and 64:

- checked against onnxruntime's outputs for the same inputs: the output is a dequantized f32
  logits tensor, so the difference is counted in output quantization steps (the scale of the
  DequantizeLinear that produces the output, read from the ONNX file); a row passes when no
  element is more than one step (one output code) off; the count of elements one code off is
  recorded, and so is the largest raw difference in steps (f16 rounding of the logits shows as
  a fraction of a step);
- timed: our ``run()`` with the input already on the device (a torch CUDA tensor: the plan's
  input copy, its CUDA graph, the output copy and the host syncs) and the CUDA-graph replay
  alone; against torch fp16 channels-last (``model.half().to(memory_format=channels_last)``,
  input likewise, ``torch.inference_mode``, ``cudnn.benchmark``), eager and
  ``torch.compile`` (modes ``max-autotune-no-cudagraphs`` and ``reduce-overhead``), measured
  in the same run on the same float model. CUDA events, warm-up, at least 50 calls and 0.5 s
  per figure (5 samples; the median is reported, the min too).
Ratios: torch eager / ours and torch.compile (the faster mode) / ours, per ``run()`` (the
headline) and per graph replay; goals 1.5 at batch 1 and 1.2 at batch 64.

Two steps, because the GPU machine has torch (CUDA), numpy and onnx but no onnxruntime and no
network, and this machine has onnxruntime and torch (CPU):

1. Here (an x86 host; with AVX512-VNNI onnxruntime's u8s8 arithmetic is exact, without it the
   files are quantized with reduce_range):

       python benchmarks/bench_cnn_gpu.py --prepare gpu_cnn

   writes into DIR, per model: the QDQ and QOperator files, ``<model>.torch.pt`` (what the GPU
   side needs to build the very same float model: the seed, the sha256 of every parameter as
   constructed from that seed, and the BatchNorm buffers; the parameters themselves are not
   stored, see "Size" below) and ``<model>.ort.npz`` (onnxruntime's outputs per format and
   batch, and the fp32 model's output at batch 1); ``inputs.npz`` (the inputs small enough to
   store) and ``manifest.json`` (seeds, sha256 of every input and file, versions, host). The
   fp32 ONNX files (the quantizer's input, not needed on the GPU) go to ``--work``.

2. On the GPU machine (qcompiler installed as benchmarks/run_on_gpu.sh installs it):

       python3 benchmarks/bench_cnn_gpu.py --run DIR --out $OUT [--target cuda-sm90]
           [--batches 1,64] [--models resnet18,mobilenetv2] [--formats qdq,qoperator]
           [--skip-compile-peer] [--compile-modes max-autotune-no-cudagraphs,reduce-overhead]

   prints a table and writes ``$OUT/cnn-gpu-<device>-<YYYYMMDD-HHMM>.json`` (UTC), after every
   measurement, so a run cut short keeps what it measured. Phases: first ours and torch eager
   for every model, then torch.compile (its autotuning takes minutes). A failure (compile
   error, failed check, a torch.compile that fails) is recorded in its row; exit status 1 if
   any check failed, 2 if the run could not start (no CUDA device, no DIR).

Size. The device tool carries at most 64 MiB of working tree, and the ResNet-18 float weights
alone are 47 MB (fp32), its two quantized files 23 MB, one batch-64 input 38.5 MB. So DIR
holds the quantized files and small things only: the torch model's parameters are rebuilt on
the GPU side from the seed (``torch.manual_seed(0)`` then the constructor, on the CPU, exactly
as ``bench_cnn.fp32_model`` does) and checked parameter by parameter against the sha256
recorded here; the BatchNorm statistics (which come from forward passes whose float rounding
depends on the host) are stored. Inputs are standard-normal float32 from
``numpy.random.default_rng(seed)``; the ones over 2 MB (batch 64) are regenerated from their
seed and checked against the recorded sha256 before use (a mismatch fails the row's check
rather than comparing different inputs).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODELS = ("resnet18", "mobilenetv2")
FORMATS = ("qdq", "qoperator")
GOALS = {1: 1.5, 64: 1.2}
SEED = 0                       # torch.manual_seed of the float model (bench_cnn.fp32_model's)
INPUT_SEED = 1000              # input of batch B: default_rng(INPUT_SEED + B).standard_normal
STORE_INPUT_BYTES = 2 << 20    # inputs up to this size are stored; larger ones regenerated
COMPILE_MODES = ("max-autotune-no-cudagraphs", "reduce-overhead")


def sha256_bytes(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def make_input(batch: int) -> np.ndarray:
    return np.random.default_rng(INPUT_SEED + batch).standard_normal(
        (batch, 3, 224, 224)).astype(np.float32)


def csv(text: str) -> list:
    return [t for t in text.split(",") if t]


# --------------------------------------------------------------------------------------------
# --prepare (this machine: onnxruntime, torch on the CPU)
# --------------------------------------------------------------------------------------------


def float_net(name: str):
    """The float model of ``bench_cnn.fp32_model(name, ...)``, rebuilt the same way (same seed,
    same BatchNorm passes), and the sha256 of its parameters as constructed."""
    import torch

    from bench_cnn import ARCHS

    torch.manual_seed(SEED)
    net = ARCHS[name]()
    hashes = {k: sha256_bytes(p.detach().numpy()) for k, p in net.named_parameters()}
    net.train()
    with torch.no_grad():  # as fp32_model: BatchNorm statistics of random images
        for _ in range(4):
            net(torch.randn(4, 3, 224, 224))
    net.eval()
    return net, hashes


def output_step(path: str) -> dict:
    """The quantization step of the model's (first) output: the scale of the DequantizeLinear
    that produces it, else of the last DequantizeLinear in the graph (said in ``source``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path, load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in g.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    out = g.output[0].name
    producer = next((n for n in g.node if out in n.output), None)
    if producer is not None and producer.op_type == "DequantizeLinear":
        node, source = producer, f"DequantizeLinear {producer.name!r} producing {out!r}"
    else:
        dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
        if not dq:
            raise ValueError(f"{path}: no DequantizeLinear: no output step")
        node = dq[-1]
        source = (f"last DequantizeLinear {node.name!r} (the output {out!r} comes from "
                  f"{producer.op_type if producer else 'nowhere'})")
    tensor = inits.get(node.input[1])
    tensor = consts.get(node.input[1]) if tensor is None else tensor
    if tensor is None:
        raise ValueError(f"{path}: the scale {node.input[1]!r} of {node.name!r} is not a constant")
    scale = numpy_helper.to_array(tensor).astype(np.float64)
    if scale.size != 1:
        raise ValueError(f"{path}: the output scale has {scale.size} values (per-axis)")
    return {"scale": float(scale.reshape(())), "source": source}


def prepare(a) -> int:
    import onnxruntime as ort
    import torch

    import bench_cnn
    from qcompiler.driver.artifact import file_sha256

    # Without AVX512-VNNI onnxruntime's u8s8 pairs can saturate (vpmaddubsw): 7-bit weights
    # (reduce_range) keep its outputs an exact reference. Such files are not comparable with
    # ones prepared on a VNNI host (other weights), so the manifest records the choice.
    reduce_range = bench_cnn.avx2_only()
    if reduce_range:
        print("--prepare: this host has no AVX512-VNNI: quantizing with reduce_range (7-bit "
              "weights) so that onnxruntime's outputs stay exact", file=sys.stderr)
    out = os.path.abspath(a.prepare)
    os.makedirs(out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    batches = [int(b) for b in csv(a.batches)]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    inputs, stored = {}, {}
    for b in batches:
        x = make_input(b)
        inputs[b] = x
        stored[b] = x.nbytes <= STORE_INPUT_BYTES
    np.savez(os.path.join(out, "inputs.npz"), **{f"x_b{b}": inputs[b] for b in batches
                                                  if stored[b]})
    manifest = {
        "benchmark": "bench_cnn_gpu --prepare",
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host": bench_cnn.host_info(),
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__,
                     "numpy": np.__version__},
        "quantization": {"per_channel": True, "activation_type": "QUInt8",
                         "weight_type": "QInt8", "reduce_range": reduce_range,
                         "calibration": "4 x default_rng(1).standard_normal((1,3,224,224))"},
        "torch_seed": SEED,
        "inputs": {str(b): {"seed": INPUT_SEED + b, "shape": list(inputs[b].shape),
                            "dtype": "float32", "sha256": sha256_bytes(inputs[b]),
                            "stored": stored[b]} for b in batches},
        "models": {},
    }
    for name in csv(a.models):
        t0 = time.time()
        fp32 = bench_cnn.fp32_model(name, a.work)  # cached in --work
        net, hashes = float_net(name)
        refs = {}
        # the rebuilt torch model is the exported one: same output as onnxruntime on the fp32 file
        sess = ort.InferenceSession(fp32, so, providers=["CPUExecutionProvider"])
        x1 = make_input(1)
        want = sess.run(None, {"x": x1})[0]
        with torch.no_grad():
            got = net(torch.from_numpy(x1)).numpy()
        err = float(np.abs(got - want).max())
        if not err <= 1e-3 * max(1.0, float(np.abs(want).max())):
            raise RuntimeError(f"{name}: the rebuilt torch model differs from {fp32} by {err} "
                               f"(stale --work cache? delete it)")
        refs["fp32_b1"] = want
        torch.save({"arch": name, "seed": SEED, "param_sha256": hashes,
                    "buffers": {k: v.clone() for k, v in net.named_buffers()}},
                   os.path.join(out, f"{name}.torch.pt"))
        entry = {"fp32_torch_vs_ort_max_abs": err, "files": {}}
        for fmt in csv(a.formats):
            path = os.path.join(out, f"{name}.{fmt}.onnx")
            bench_cnn.quantize_file(fp32, path, fmt, reduce_range=reduce_range)
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            for b in batches:
                refs[f"{fmt}_b{b}"] = sess.run(None, {"x": inputs[b]})[0]
            entry["files"][fmt] = {"file": os.path.basename(path), "sha256": file_sha256(path),
                                   "output_step": output_step(path)}
        np.savez(os.path.join(out, f"{name}.ort.npz"), **refs)
        entry["prepare_s"] = round(time.time() - t0, 1)
        manifest["models"][name] = entry
        print(f"{name}: torch vs ort fp32 max |diff| {err:.2e}; "
              + ", ".join(f"{f} step {e['output_step']['scale']:.4g}"
                          for f, e in entry["files"].items())
              + f" ({entry['prepare_s']} s)", flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{out}: {len(os.listdir(out))} files, {total / 1e6:.1f} MB")
    if total > 55e6:
        print("warning: over 55 MB; the device tool carries at most 64 MiB of working tree")
    return 0


# --------------------------------------------------------------------------------------------
# --run (the GPU machine: torch with CUDA, numpy, onnx; no onnxruntime)
# --------------------------------------------------------------------------------------------


def timed(fn, stream=None, *, min_calls: int = 50, min_seconds: float = 0.5,
          samples: int = 5) -> dict:
    """Milliseconds per call of ``fn`` by CUDA events on ``stream`` (torch's current stream
    when None): warm-up, then ``samples`` samples of n calls each, n chosen so that all of them
    together make at least ``min_calls`` calls and ``min_seconds``. Median and min sample."""
    import torch

    def sync():
        (stream or torch.cuda.current_stream()).synchronize()

    for _ in range(10):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    sync()
    per = max((time.perf_counter() - t0) / 3, 1e-6)
    for _ in range(min(200, math.ceil(0.1 / per))):  # warm for 0.1 s more
        fn()
    sync()
    n = max(math.ceil(min_calls / samples), math.ceil(min_seconds / samples / per))
    n = min(n, 20000)
    ms = []
    for _ in range(samples):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(n):
            fn()
        end.record(stream)
        end.synchronize()
        ms.append(start.elapsed_time(end) / n)
    ms.sort()
    return {"median_ms": round(ms[len(ms) // 2], 4), "min_ms": round(ms[0], 4),
            "calls": n * samples}


def reason(e: BaseException) -> str:
    """The exception in a line (its first three lines; inductor's first one says little)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {' | '.join(lines[:3])[:500]}"


class Inputs:
    """The inputs of --prepare: stored, or regenerated from their seed and checked."""

    def __init__(self, d: str, manifest: dict):
        self.meta = manifest["inputs"]
        self.numpy_then = manifest.get("versions", {}).get("numpy")
        self.stored = dict(np.load(os.path.join(d, "inputs.npz")))
        self.cache: dict = {}

    def get(self, batch: int) -> np.ndarray:
        if batch in self.cache:
            return self.cache[batch]
        meta = self.meta.get(str(batch))
        if meta is None:
            raise KeyError(f"batch {batch} was not prepared (prepared: {sorted(self.meta)})")
        x = self.stored.get(f"x_b{batch}")
        if x is None:
            x = make_input(batch)
            if sha256_bytes(x) != meta["sha256"]:
                raise ValueError(f"numpy {np.__version__} here regenerates another batch-"
                                 f"{batch} input than --prepare's numpy {self.numpy_then} "
                                 f"(sha256 differs): no reference for it")
        self.cache[batch] = x
        return x


def check(got: np.ndarray, want: np.ndarray, step: float) -> dict:
    """Ours against onnxruntime in output steps: codes = round(value / step)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    rec = {"shape_ok": got.shape == want.shape, "finite": bool(np.isfinite(got).all())}
    if not (rec["shape_ok"] and rec["finite"]):
        rec.update(passed=False, why=f"shape {got.shape} vs {want.shape}, finite {rec['finite']}")
        return rec
    steps = np.abs(got - want) / step
    codes = np.abs(np.rint(got / step) - np.rint(want / step))
    rec.update({
        "max_steps": round(float(steps.max()), 4),
        "max_code_diff": int(codes.max()),
        "one_code_off": int((codes == 1).sum()),
        "elements": int(codes.size),
        "max_off_grid_steps": round(float(np.abs(got / step - np.rint(got / step)).max()), 4),
    })
    rec["passed"] = rec["max_code_diff"] <= 1
    if not rec["passed"]:
        rec["why"] = (f"{int((codes > 1).sum())} elements more than one step off "
                      f"(max {rec['max_code_diff']} codes)")
    return rec


def peer_model(name: str, d: str):
    """The float model of --prepare on the GPU in fp16 channels-last, and how it was checked."""
    import torch

    from bench_cnn import ARCHS

    saved = torch.load(os.path.join(d, f"{name}.torch.pt"), map_location="cpu")
    torch.manual_seed(saved["seed"])
    net = ARCHS[name]()  # on the CPU, as --prepare built it
    differ = [k for k, p in net.named_parameters()
              if sha256_bytes(p.detach().numpy()) != saved["param_sha256"].get(k)]
    state = net.state_dict()
    state.update(saved["buffers"])
    net.load_state_dict(state, strict=True)
    info = {"parameters": len(saved["param_sha256"]), "parameters_differ": differ,
            "same_as_prepare": not differ}
    if differ:
        print(f"  warning: {name}: {len(differ)} parameters rebuilt from seed {saved['seed']} "
              f"differ from --prepare's (torch {torch.__version__}); the timing peer has "
              f"other random values", flush=True)
    net = net.eval().half().cuda().to(memory_format=torch.channels_last)
    return net, info


def peer_input(x: np.ndarray):
    import torch

    return torch.from_numpy(x).cuda().half().contiguous(memory_format=torch.channels_last)


def graph_signature(m, shape):
    """The plan signature of the model's last run, when it ran input ``shape`` and is one
    captured CUDA graph, else None. (The last run's: with device inputs read in place it is
    not the signature ``_signatures`` keeps for the shape; graphs are captured at a
    signature's second run.)"""
    sig = getattr(m._run, "last_signature", None)
    if sig is None or tuple(sig.inputs[next(iter(sig.inputs))][1]) != tuple(shape):
        return None
    return sig if getattr(sig, "graph", None) is not None else None


class Run:
    def __init__(self, a, d: str, manifest: dict):
        import torch

        self.a, self.d, self.manifest = a, d, manifest
        self.rows: list = []
        self.peer_info: dict = {}  # model -> how its torch peer was built and checked
        self.peers: dict = {}  # (model, batch) -> peer record
        self.device = torch.cuda.get_device_name()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.stamp = now.strftime("%Y%m%d-%H%M")
        self.date = now.strftime("%Y-%m-%d %H:%M UTC")
        short = re.findall(r"[a-z]*\d+[a-z0-9]*", self.device.lower().replace("nvidia", ""))
        self.short = short[0] if short else re.sub(r"[^a-z0-9]+", "-", self.device.lower())
        os.makedirs(a.out, exist_ok=True)
        self.path = os.path.join(a.out, f"cnn-gpu-{self.short}-{self.stamp}.json")

    # -- ours ------------------------------------------------------------------------------
    def ours(self, name: str, fmt: str, inputs: Inputs, refs: dict, batches: list) -> None:
        import torch

        import qcompiler
        from qcompiler.driver.artifact import file_sha256

        path = os.path.join(self.d, f"{name}.{fmt}.onnx")
        base = {"model": name, "format": fmt}
        rows = [dict(base, batch=b) for b in batches]
        self.rows += rows
        try:
            meta = self.manifest["models"][name]["files"][fmt]
            if file_sha256(path) != meta["sha256"]:
                raise ValueError(f"{path} is not the file --prepare wrote (sha256)")
            step = output_step(path)
            t0 = time.time()
            m = qcompiler.compile(path, target=self.a.target,
                                  buckets=None if self.a.default_buckets
                                  else {"batch": sorted(batches)})
            compile_s = round(time.time() - t0, 1)
            print(f"{name} {fmt}: compiled in {compile_s} s; runner {type(m._run).__name__}",
                  flush=True)
        except Exception as e:
            traceback.print_exc()
            for r in rows:
                r["error"] = f"compile: {reason(e)}"
                r["check"] = {"passed": False, "why": r["error"]}
            print(f"{name} {fmt}: FAILED {rows[0]['error']}", flush=True)
            self.save()
            return
        in_name, out_name = m.input_names[0], m.output_names[0]
        for b, row in zip(batches, rows):
            row.update(compile_s=compile_s, output_step=step)
            try:
                x = inputs.get(b)
                got = m.run({in_name: x})[out_name]
                row["check"] = check(got, refs[f"{fmt}_b{b}"], step["scale"])
                xt = torch.from_numpy(x).cuda()
                got_dev = m.run({in_name: xt})[out_name]
                row["check"]["device_input_same"] = bool(
                    np.array_equal(np.asarray(got_dev.float().cpu().numpy()), got))
                if not row["check"]["device_input_same"]:
                    row["check"]["passed"] = False
                    row["check"]["why"] = "a CUDA-tensor input gave another output than numpy"
                row["ours_run"] = timed(lambda: m.run({in_name: xt}))
                row["ours_graph"] = self.graph_replay(m, xt.shape)
                if self.a.trace:
                    row["trace"] = self.trace(m, xt.shape, f"{name} {fmt} b{b}")
            except Exception as e:
                traceback.print_exc()
                row["error"] = reason(e)
                row.setdefault("check", {"passed": False, "why": row["error"]})
            c = row.get("check", {})
            print(f"  {name} {fmt} b{b}: check {'ok' if c.get('passed') else 'FAIL'} "
                  f"(max {c.get('max_steps')} steps, {c.get('one_code_off')} one code off"
                  f"{'; ' + c['why'] if c.get('why') else ''}); run "
                  f"{(row.get('ours_run') or {}).get('median_ms')} ms, graph "
                  f"{(row.get('ours_graph') or {}).get('median_ms')} ms", flush=True)
            self.save()
        del m

    @staticmethod
    def graph_replay(m, shape) -> dict | None:
        """The plan's CUDA graph replayed alone on the runner's stream (bench_models_gpu's
        graph_time_ms, timed with CUDA events); None without a single graph."""
        import torch

        runner, sig = m._run, graph_signature(m, shape)
        if sig is None:
            return None
        lib, s = runner.launcher, runner.stream
        if lib.qc_graph_launch(sig.graph, s) != 0:
            raise RuntimeError("qc_graph_launch failed")
        return timed(lambda: lib.qc_graph_launch(sig.graph, s), torch.cuda.ExternalStream(s))

    @staticmethod
    def trace(m, shape, label: str, reps: int = 20) -> list | None:
        """Each launch of the plan's graph replay as the CUDA profiler (CUPTI, through
        torch.profiler) sees it, in start order: the median duration over ``reps`` replays and,
        where the count matches the plan's launches, the node it runs. Launches that run
        concurrently (lanes) may swap places in start order."""
        from timing import graph_replay_events

        runner, sig = m._run, graph_signature(m, shape)
        if sig is None:
            return None
        events = graph_replay_events(runner.launcher, sig.graph, runner.stream, reps)
        per = len(events) // reps
        if per == 0:
            print(f"  trace {label}: the profiler saw no kernels")
            return None
        names = [e.name.split("(")[0].replace("void ", "")[-48:] for e in events[:per]]
        labels = sig.labels if len(sig.labels) == per else [""] * per
        out = []
        for i in range(per):
            ds = sorted(events[r * per + i].time_range.end - events[r * per + i].time_range.start
                        for r in range(reps))
            out.append({"node": labels[i], "kernel": names[i], "us": round(ds[reps // 2], 2)})
        span = sorted(events[(r + 1) * per - 1].time_range.end - events[r * per].time_range.start
                      for r in range(reps))[reps // 2]
        print(f"  trace {label}: {per} launches, span {span:.1f} us, kernels "
              f"{sum(o['us'] for o in out):.1f} us")
        for o in out:
            print(f"    {o['us']:8.2f} us  {o['node'][:44]:<44} {o['kernel']}")
        return out

    # -- torch -----------------------------------------------------------------------------
    def eager(self, name: str, net, inputs: Inputs, batches: list) -> None:
        import torch

        for b in batches:
            rec = self.peers.setdefault((name, b), {"model": name, "batch": b})
            try:
                x = peer_input(inputs.get(b))
                with torch.inference_mode():
                    rec["torch_eager"] = timed(lambda: net(x))
            except Exception as e:
                rec["torch_eager_error"] = reason(e)
            print(f"  {name} b{b}: torch fp16 eager "
                  f"{rec.get('torch_eager', {}).get('median_ms', rec.get('torch_eager_error'))}"
                  f" ms", flush=True)
            self.save()

    def compiled(self, name: str, net, inputs: Inputs, batches: list) -> None:
        import torch

        for b in batches:
            rec = self.peers.setdefault((name, b), {"model": name, "batch": b})
            rec.setdefault("torch_compile", {})
            for mode in csv(self.a.compile_modes):
                try:
                    torch._dynamo.reset()
                    x = peer_input(inputs.get(b))
                    peer = torch.compile(net, mode=mode, dynamic=False)
                    with torch.inference_mode():
                        t0 = time.time()
                        peer(x)
                        torch.cuda.synchronize()
                        first_s = round(time.time() - t0, 1)
                        rec["torch_compile"][mode] = dict(timed(lambda: peer(x)),
                                                          first_call_s=first_s)
                except Exception as e:  # depends on the machine's compilers
                    rec["torch_compile"][mode] = {"error": reason(e)}
                r = rec["torch_compile"][mode]
                print(f"  {name} b{b}: torch.compile {mode}: "
                      f"{r.get('median_ms', r.get('error'))} ms"
                      f"{' (first call %s s)' % r['first_call_s'] if 'first_call_s' in r else ''}",
                      flush=True)
                self.save()
            torch._dynamo.reset()

    # -- results ---------------------------------------------------------------------------
    def finish_rows(self) -> None:
        """Each row's peers and ratios from what has been measured so far."""
        for row in self.rows:
            peer = self.peers.get((row["model"], row["batch"]), {})
            eager = (peer.get("torch_eager") or {}).get("median_ms")
            modes = {k: v["median_ms"] for k, v in peer.get("torch_compile", {}).items()
                     if "median_ms" in v}
            best = min(modes.items(), key=lambda kv: kv[1]) if modes else (None, None)
            row["torch_eager_ms"] = eager
            row["torch_compile_ms"] = {k: v.get("median_ms", v.get("error"))
                                       for k, v in peer.get("torch_compile", {}).items()}
            row["torch_compile_best"] = {"mode": best[0], "ms": best[1]}
            run = (row.get("ours_run") or {}).get("median_ms")
            graph = (row.get("ours_graph") or {}).get("median_ms")

            def ratio(t, o):
                return round(t / o, 3) if t and o else None
            row["ratio_eager"] = ratio(eager, run)
            row["ratio_compile"] = ratio(best[1], run)
            row["ratio_eager_graph"] = ratio(eager, graph)
            row["ratio_compile_graph"] = ratio(best[1], graph)
            goal = GOALS.get(row["batch"])
            row["goal"] = goal
            got = [r for r in (row["ratio_eager"], row["ratio_compile"]) if r is not None]
            row["meets_goal"] = (None if goal is None or not got
                                 else bool(min(got) >= goal))

    def failed(self) -> bool:
        return any(not (r.get("check") or {}).get("passed") for r in self.rows)

    def save(self, done: bool = False) -> None:
        import torch

        import qcompiler

        self.finish_rows()
        doc = {"benchmark": "bench_cnn_gpu", "device": self.device,
               "date_utc": self.date, "torch": torch.__version__,
               "cuda": torch.version.cuda, "qcompiler": qcompiler.__version__,
               "numpy": np.__version__, "target": self.a.target,
               "goals": {str(k): v for k, v in GOALS.items()},
               "prepared": {k: self.manifest.get(k) for k in ("created_utc", "host",
                                                               "versions", "quantization")},
               "timing": "CUDA events; ours per run() with a torch CUDA input, and its CUDA "
                         "graph replayed alone; torch fp16 channels-last under inference_mode, "
                         "cudnn.benchmark; median of 5 samples, >= 50 calls and 0.5 s in all",
               "finished": done, "checks_passed": None if not done else not self.failed(),
               "peer_models": self.peer_info, "rows": self.rows,
               "peers": list(self.peers.values())}
        with open(self.path, "w") as f:
            json.dump(doc, f, indent=1)

    def table(self) -> None:
        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)
        head = (f"{'model':<12}{'format':<10}{'B':>3}  {'check':<14}{'ours run':>9}{'graph':>9}"
                f"{'eager':>9}{'compile':>9}  {'eager/ours':>10}{'comp/ours':>10}{'goal':>6}  ok")
        print(head)
        print("-" * len(head))
        for r in self.rows:
            c = r.get("check") or {}
            chk = ("ok" if c.get("passed") else "FAIL") + (
                f" {c['max_steps']:.2f}st" if "max_steps" in c else "")
            print(f"{r['model']:<12}{r['format']:<10}{r['batch']:>3}  {chk:<14}"
                  f"{f((r.get('ours_run') or {}).get('median_ms')):>9}"
                  f"{f((r.get('ours_graph') or {}).get('median_ms')):>9}"
                  f"{f(r.get('torch_eager_ms')):>9}{f(r['torch_compile_best']['ms']):>9}  "
                  f"{f(r.get('ratio_eager'), '{:.2f}x'):>10}"
                  f"{f(r.get('ratio_compile'), '{:.2f}x'):>10}{f(r.get('goal'), '{:.1f}'):>6}  "
                  f"{ {True: 'yes', False: 'NO', None: '-'}[r.get('meets_goal')]}")
            if r.get("error"):
                print(f"    error: {r['error']}")
        print("(ms per call; ours run = run() with a CUDA input, graph = its CUDA graph alone; "
              "ratios per run())")


def run(a) -> int:
    try:
        import torch
    except ImportError as e:
        print(f"--run: torch is needed ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("--run: no CUDA device here (torch.cuda.is_available() is False): run it on the "
              "GPU machine (benchmarks/run_on_gpu.sh installs qcompiler there); --prepare is "
              "the step for this machine.", file=sys.stderr)
        return 2
    try:
        import qcompiler  # noqa: F401
    except ImportError as e:
        print(f"--run: qcompiler is not importable ({e}): install it first, as "
              f"benchmarks/run_on_gpu.sh does (pip install --no-deps --target /tmp/qc_site .; "
              f"PYTHONPATH=/tmp/qc_site)", file=sys.stderr)
        return 2
    d = os.path.abspath(a.run)
    mpath = os.path.join(d, "manifest.json")
    if not os.path.exists(mpath):
        print(f"--run: {mpath} not found: run --prepare {a.run} first (on a machine with "
              f"onnxruntime) and carry the directory", file=sys.stderr)
        return 2
    with open(mpath) as f:
        manifest = json.load(f)
    os.environ.setdefault("QC_CUDA_PLAN", "1")  # the device plan (the default) is measured
    torch.backends.cudnn.benchmark = True
    batches = [int(b) for b in csv(a.batches)]
    models = [m for m in csv(a.models) if m in manifest["models"]]
    skipped = [m for m in csv(a.models) if m not in manifest["models"]]
    if skipped:
        print(f"not prepared, skipped: {skipped}")
    r = Run(a, d, manifest)
    inputs = Inputs(d, manifest)
    nets = {}
    for name in models:  # phase 1: ours and torch eager
        refs = dict(np.load(os.path.join(d, f"{name}.ort.npz")))
        for fmt in csv(a.formats):
            r.ours(name, fmt, inputs, refs, batches)
        try:
            net, info = peer_model(name, d)
            want = refs.get("fp32_b1")
            if want is not None and "1" in manifest["inputs"]:
                with torch.inference_mode():  # the peer is the prepared float model, in fp16
                    y = net(peer_input(inputs.get(1))).float().cpu().numpy()
                info["fp16_vs_fp32_ort_b1_max_abs"] = float(np.abs(y - want).max())
                info["fp32_ort_b1_max_abs"] = float(np.abs(want).max())
            r.peer_info[name] = info
            nets[name] = net
            r.eager(name, net, inputs, batches)
        except Exception as e:
            traceback.print_exc()
            r.peer_info[name] = {"error": reason(e)}
            print(f"  {name}: torch peer FAILED {reason(e)}", flush=True)
        r.save()
    if not a.skip_compile_peer:  # phase 2: torch.compile (minutes of autotuning)
        for name, net in nets.items():
            r.compiled(name, net, inputs, batches)
    r.save(done=True)
    print()
    r.table()
    print(r.path)
    return 1 if r.failed() else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", metavar="DIR", help="write models, references (onnxruntime)")
    mode.add_argument("--run", metavar="DIR", help="compile, check and time (GPU machine)")
    p.add_argument("--out", default=".", help="--run: where the JSON goes")
    p.add_argument("--target", default="cuda-sm90")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--skip-compile-peer", action="store_true",
                   help="--run: no torch.compile peers")
    p.add_argument("--compile-modes", default=",".join(COMPILE_MODES),
                   help="--run: torch.compile modes to time")
    p.add_argument("--trace", action="store_true",
                   help="--run: each launch of our graph replay from the CUDA profiler")
    p.add_argument("--default-buckets", action="store_true",
                   help="--run: compile with qcompiler's default shape buckets instead of "
                        "one bucket per batch size")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qc_bench_cnn_gpu"),
                   help="--prepare: where the fp32 ONNX files go (cached)")
    a = p.parse_args(argv)
    for m in csv(a.models):
        if m not in MODELS:
            p.error(f"unknown model {m!r} (known: {', '.join(MODELS)})")
    for f in csv(a.formats):
        if f not in FORMATS:
            p.error(f"unknown format {f!r} (known: {', '.join(FORMATS)})")
    return prepare(a) if a.prepare else run(a)


if __name__ == "__main__":
    sys.exit(main())
