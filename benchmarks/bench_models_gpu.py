"""Whole models on the GPU (issue #12): the device plan (every op a CUDA kernel, one CUDA graph
per signature) against torch fp16 eager on the same GPU, with correctness checks first.

    python3 benchmarks/bench_models_gpu.py --out DIR [--llama-layers 22] [--skip-llama]

- MiniLM-shaped encoder (BERT, 6 layers, hidden 384, 12 heads, 1536 intermediate, random
  weights), 4-bit g128 through quantize-weights, batch x seq 1x16 and 8x32;
- TinyLlama-width decoder (hidden 2048, 32 heads, 4 KV heads, 5632, vocab 32000), W4 g128
  symmetric, one decode step at context 512 (``--llama-layers`` of the 22, fewer to save
  time), then ``--greedy`` tokens decoded greedily by both sides from the same random cache.
torch runs the same architecture in fp16. For MiniLM it runs the float weights (a timing
peer); for the Llama its linear weights are first replaced by their 4-bit dequantized values
(symmetric round-to-nearest, g128, f16 scales: a grid that quantize-weights maps back onto the
same codes), so the greedy tokens compare the same model on both sides. Checks: the plan
against the reference interpreter of the same quantized module (fp16 tolerance), a shape
change within a bucket, the KV cache fed back on the device, the greedy tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

Q4 = "canonicalize,quantize-weights{bits=4,group=128},"
Q4_SYMMETRIC = "canonicalize,quantize-weights{bits=4,group=128,symmetric=true},"


# --int8-min-m N: the quantized layers permit int8 activations (accuracy_level 4) and the
# tile pass gives buckets of N rows and more the int8-activation kernel (W4A8).
INT8_MIN_M = 0
# --x-norm: fuse-norm-qmatmul{enable=1} (each RMSNorm inside its projection's kernel).
X_NORM = False
# --tile-options: more options of the tile pass (e.g. "wgmma_stages=12,wgmma_pdl=1").
TILE_OPTIONS = ""


def pipeline(target: str, quantize: str = Q4, x_norm: bool = None,
             gemv_fill: bool = False, gemv_acc_scale: bool = False) -> str:
    """The target's default pipeline after ``quantize``, with this run's changes (x_norm:
    X_NORM unless given; gemv_fill: ``tile{gemv_fill=1}``; gemv_acc_scale:
    ``tile{gemv_acc_scale=1}``)."""
    from qcompiler.targets import get_target

    spec = get_target(target).default_pipeline
    if INT8_MIN_M:
        quantize = quantize.replace("quantize-weights{", "quantize-weights{accuracy_level=4,")
        spec = spec.replace(f"tile{{target={target}}}",
                            f"tile{{target={target},int8_min_m={INT8_MIN_M}}}")
    if x_norm is None:
        x_norm = X_NORM
    if x_norm:
        spec = spec.replace("fuse-norm-qmatmul{enable=0}", "fuse-norm-qmatmul{enable=1}")
    options = [f"{o}=1" for o, on in (("gemv_fill", gemv_fill),
                                      ("gemv_acc_scale", gemv_acc_scale)) if on]
    options += [o for o in TILE_OPTIONS.split(",") if o]
    if options:
        assert f"tile{{target={target}" in spec
        spec = spec.replace(f"tile{{target={target}",
                            f"tile{{target={target},{','.join(options)}")
    return quantize + spec


def dequantize_linears_in_place(model, group: int = 128) -> int:
    """Replace every nn.Linear weight of ``model`` by its symmetric 4-bit round-to-nearest
    dequantized value (groups of ``group`` along K, scales rounded to f16 as the f16 plan stores
    them). Re-quantizing these values with ``quantize-weights{symmetric=true}`` gives the same
    codes and scales back, so torch then runs exactly the weights the plan runs."""
    import torch

    from qcompiler.passes.quantize_weights import quantize_rtn

    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.detach().float().numpy().T  # [K, N]
                codes, scale, _ = quantize_rtn(w, 4, group, 0, True)
                scale = scale.astype(np.float16).astype(np.float32)  # [K/group, N]
                deq = codes.astype(np.float32) * np.repeat(scale, group, axis=0)[:w.shape[0]]
                mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(deq.T)))
                n += 1
    return n


def cuda_time_ms(fn, iters: int = 200, warmup: int = 20) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_time_ms(runner, sig) -> float:
    """The plan's graph replay alone (inputs already on the device), on its own stream."""
    import ctypes

    import torch

    lib, s = runner.launcher, runner.stream
    ev = torch.cuda.Event
    for _ in range(20):
        lib.qc_graph_launch(sig.graph, s)
    lib.qc_stream_synchronize(s)
    t0 = time.perf_counter()
    n = 200
    for _ in range(n):
        lib.qc_graph_launch(sig.graph, s)
    lib.qc_stream_synchronize(s)
    del ev, ctypes
    return (time.perf_counter() - t0) * 1e3 / n


def one_stream_graph_ms(runner, run) -> float:
    """Graph replay time of the runner's plan captured without side lanes (every launch in
    plan order on one stream), for comparison with the concurrent runs; restores the lanes."""
    lanes, saved = runner.lanes, dict(runner._signatures)
    try:
        runner.lanes = None
        runner._signatures.clear()
        run()
        run()  # captured at its second run
        return graph_time_ms(runner, runner.last_signature)
    finally:
        runner.lanes = lanes
        runner._signatures.clear()
        runner._signatures.update(saved)


def profile_steps(runner, sig, label: str, top: int = 12, reps: int = 20) -> list:
    """Each launch of the plan timed alone (CUDA events around it, median of ``reps``) on the
    runner's stream: where a run's time goes. Prints the ``top`` steps and the time per op."""
    import ctypes

    import torch

    from qcompiler.codegen.cuda.epilogue import epilogue_in_kernel
    from qcompiler.codegen.cuda.plan import EPILOGUE_SUFFIX, QcStep

    names = []  # one label per launch, in the order _prepare built the table
    for step in runner.plan.steps:
        if step.kind in ("view", "host"):
            continue
        if step.kind == "copy":
            names.append(("copy", step.outputs[0]))
            continue
        names.append((step.op, step.node))
        node = runner.nodes[step.node]
        if step.op == "qmatmul" and "epilogue" in node.attrs and not epilogue_in_kernel(node):
            names.append(("qmatmul-epilogue", step.node + EPILOGUE_SUFFIX))
    assert len(names) == sig.n, (len(names), sig.n)
    lib, s = runner.launcher, runner.stream
    stream = torch.cuda.ExternalStream(s)
    base = ctypes.addressof(sig.table)
    size = ctypes.sizeof(QcStep)
    times = []
    for i in range(sig.n):
        one = ctypes.cast(base + i * size, ctypes.POINTER(QcStep))
        samples = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            lib.qc_plan_launch(one, 1, s, None, None)  # alone: no side lanes
            b.record(stream)
            b.synchronize()
            samples.append(a.elapsed_time(b))
        times.append(float(np.median(samples)))
    by_op: dict = {}
    for (op, _), t in zip(names, times):
        n, total = by_op.get(op, (0, 0.0))
        by_op[op] = (n + 1, total + t)
    total = sum(times)
    print(f"  profile {label}: {sig.n} launches, {total * 1e3:.1f} us summed one at a time")
    for op, (n, t) in sorted(by_op.items(), key=lambda kv: -kv[1][1]):
        print(f"    {op:<22} x{n:<4} {t * 1e3:8.1f} us  {100 * t / total:5.1f}%")
    order = sorted(range(sig.n), key=lambda i: -times[i])[:top]
    for i in order:
        print(f"    step {i:>4} {names[i][0]:<20} %{names[i][1]:<40} {times[i] * 1e3:7.1f} us")
    return [{"op": op, "launches": n, "us": round(t * 1e3, 2)} for op, (n, t) in
            sorted(by_op.items(), key=lambda kv: -kv[1][1])]


def trace_graph(runner, sig, label: str, reps: int = 10, top: int = 14) -> dict:
    """The graph replay as the CUDA profiler (CUPTI, through torch.profiler) sees it: each
    kernel's duration inside the graph and the idle time between kernels, per replay. Unlike
    profile_steps, launch latency is not counted in a kernel's time: this is where a replay's
    time really goes."""
    from timing import graph_replay_events

    if sig.graph is None:  # not captured (yet): nothing to replay
        print(f"  trace {label}: no captured graph; no trace")
        return {}
    kernels = [e for e in graph_replay_events(runner.launcher, sig.graph, runner.stream, reps)
               if not e.name.startswith("Memcpy")]
    if len(kernels) < reps:
        print(f"  trace {label}: the profiler saw {len(kernels)} kernels; no trace")
        return {}
    per = len(kernels) // reps
    by_name: dict = {}
    busy = span = 0.0
    for r in range(reps):
        ks = kernels[r * per:(r + 1) * per]
        span += ks[-1].time_range.end - ks[0].time_range.start
        for e in ks:
            d = e.time_range.end - e.time_range.start
            busy += d
            key = _kernel_key(e.name)
            n, t = by_name.get(key, (0, 0.0))
            by_name[key] = (n + 1, t + d)
    span, busy = span / reps, busy / reps
    print(f"  trace {label}: {per} kernels per replay, span {span:.1f} us, kernels busy "
          f"{busy:.1f} us, idle between kernels {span - busy:.1f} us")
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    for name, (n, t) in rows[:top]:
        print(f"    {name[:110]:<110} x{n // reps:<4} {t / reps:8.1f} us  {t / n:6.2f} us each")
    # the last replay's kernels in order from its 10th (a decoder layer past the embedding):
    # start and end relative to the first of them, in us (overlap shows as a start before
    # the previous end)
    ks = kernels[(reps - 1) * per:]
    t0 = ks[min(10, per - 1)].time_range.start
    timeline = [(_kernel_key(e.name)[:60], round(e.time_range.start - t0, 2),
                 round(e.time_range.end - t0, 2)) for e in ks[10:30]]
    for name, a, b in timeline:
        print(f"      {a:8.2f} {b:8.2f}  {name}")
    return {"kernels": per, "span_us": round(span, 1), "busy_us": round(busy, 1),
            "by_kernel": [{"kernel": k, "launches": n // reps, "us": round(t / reps, 2)}
                          for k, (n, t) in rows], "timeline_us": timeline}


def _kernel_key(name: str) -> str:
    """A kernel's name without its argument list (template arguments kept: a GEMV config
    per shape)."""
    name = name.replace("void ", "")
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i]
    return name


def compiled_peer_ms(module, call, iters: int):
    """Milliseconds per call of torch.compile(mode="reduce-overhead") of ``module`` (CUDA
    graphs), or None when it fails here: the error is printed, a missing peer is reported,
    not hidden. ``call(peer)`` runs it once."""
    import torch

    try:
        peer = torch.compile(module, mode="reduce-overhead")
        return cuda_time_ms(lambda: call(peer), iters=iters, warmup=10)
    except Exception as e:  # depends on the machine's compilers
        print(f"  torch.compile peer failed: {type(e).__name__}: {str(e)[:300]}")
        return None


def reference_of(path: str, target: str):
    """The quantized, f16-retyped module before packing (the reference can run it)."""
    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager

    full = pipeline(target)
    upto = full[:full.index(",reorder-weights")]
    return PassManager.parse(upto).run(import_model(path))


@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def check_close(name, got, want, rtol):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    err = float(np.abs(got - want).max())
    scale = float(max(np.abs(want).max(), 1.0))
    ok = bool(np.isfinite(got).all()) and err <= rtol * scale
    print(f"  check {name}: max err {err:.3g} (scale {scale:.3g}) {'ok' if ok else 'FAIL'}")
    return ok


def minilm(args, target, results):
    import torch
    from transformers import BertConfig, BertModel

    import qcompiler
    from qcompiler.runtime.reference import run as ref_run

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                     num_attention_heads=12, intermediate_size=1536,
                     attn_implementation="eager")
    model = BertModel(cfg).eval()

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "minilm.onnx")
    ids = torch.randint(0, 30522, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    torch.onnx.export(Enc(), (ids, mask), path, input_names=["input_ids", "attention_mask"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                    "attention_mask": {0: "batch", 1: "seq"}},
                      opset_version=17, dynamo=False)
    t0 = time.time()
    m = qcompiler.compile(path, target=target, passes=pipeline(target),
                          buckets={"batch": [1, 8], "seq": [16, 32]})
    print(f"minilm compiled in {time.time() - t0:.1f} s; runner {type(m._run).__name__}")
    ref = reference_of(path, target)
    ok = True
    rng = np.random.default_rng(1)
    for b, s in ((1, 16), (8, 32), (3, 11)):  # (3, 11): a shape change within the 8x32 bucket
        feeds = {"input_ids": rng.integers(0, 30522, (b, s)).astype(np.int64),
                 "attention_mask": np.ones((b, s), np.int64)}
        out = m.run(feeds)
        want = ref_run(ref, feeds)
        for k in want:
            ok &= check_close(f"minilm {b}x{s} {k}", out[k], want[k], 3e-2)
    half = model.half().cuda()
    for b, s in ((1, 16), (8, 32)):
        feeds = {"input_ids": rng.integers(0, 30522, (b, s)).astype(np.int64),
                 "attention_mask": np.ones((b, s), np.int64)}
        tfeeds = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
        ms_ours = cuda_time_ms(lambda: m.run(tfeeds))
        runner = m._run
        sig = runner.last_signature  # the one m.run(t) ran (inputs read in place)
        ms_graph = graph_time_ms(runner, sig) if sig.graph is not None else None
        one_stream = (one_stream_graph_ms(runner, lambda: m.run(tfeeds))
                      if args.lanes_ab and runner.lanes else None)
        with torch.no_grad():
            ms_torch = cuda_time_ms(lambda: half(input_ids=tfeeds["input_ids"],
                                                 attention_mask=tfeeds["attention_mask"]))
            ms_compiled = None
            if args.compile_peers != "none":
                ms_compiled = compiled_peer_ms(half, lambda p: p(
                    input_ids=tfeeds["input_ids"], attention_mask=tfeeds["attention_mask"]), 200)
        print(f"minilm {b}x{s}: ours {ms_ours:.3f} ms per run() (graph replay "
              f"{ms_graph if ms_graph is None else round(ms_graph, 3)} ms), torch fp16 eager "
              f"{ms_torch:.3f} ms, torch.compile {ms_compiled} ms; launches per run {sig.n}, "
              f"{sum(1 for r in sig.runs if r > 1)} concurrent runs (one stream: {one_stream})")
        prof = profile_steps(runner, sig, f"minilm {b}x{s}") if args.profile else None
        trace = trace_graph(runner, sig, f"minilm {b}x{s}") if args.trace else None
        results.append({"workload": f"minilm-q4g128-{b}x{s}", "ours_run_ms": ms_ours,
                        "ours_graph_ms": ms_graph, "torch_fp16_eager_ms": ms_torch,
                        "torch_compile_fp16_ms": ms_compiled, "launches": sig.n,
                        "concurrent_runs": sum(1 for r in sig.runs if r > 1),
                        "ours_graph_ms_one_stream": one_stream,
                        "profile": prof, "trace": trace})
    return ok


def llama(args, target, results):
    import torch

    import decoder_models as dm
    import qcompiler
    from qcompiler.runtime.reference import run as ref_run

    ok = True
    for name, cfg, layers, past in (("small", dm.SMALL_LLAMA, 2, 8),
                                    ("tinyllama-width", dm.TINYLLAMA, args.llama_layers, 511)):
        if name != "small" and args.skip_llama or name == "small" and args.skip_small:
            continue
        model = dm.llama(layers=layers, **cfg)
        quantize = Q4
        if name != "small":  # torch runs the dequantized weights (greedy tokens compare)
            dequantize_linears_in_place(model)
            quantize = Q4_SYMMETRIC
        feeds = dm.llama_inputs(cfg, layers, 1, 1, past)
        tmp = tempfile.mkdtemp()
        path = dm.export_onnx(model, feeds, os.path.join(tmp, "llama.onnx"), dynamo=False)
        t0 = time.time()
        m = qcompiler.compile(path, target=target, passes=pipeline(target, quantize),
                              buckets={"batch": [1], "seq": [1], "past": [past + 1]})
        print(f"llama {name} ({layers} layers) compiled in {time.time() - t0:.1f} s; "
              f"runner {type(m._run).__name__}")
        if name == "small":
            ref = reference_of(path, target)
            out = m.run(feeds)
            want = ref_run(ref, feeds)
            for k in want:
                ok &= check_close(f"llama small step 1 {k}", out[k], want[k], 3e-2)
            # step 2: the cache stays on the device (torch CUDA tensors in and out)
            t = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
            o1 = m.run(t)
            feeds2 = {"input_ids": np.array([[7]], np.int64),
                      "position_ids": np.array([[past + 1]], np.int64),
                      "past_k": o1[list(o1)[1]].cpu().numpy(),
                      "past_v": o1[list(o1)[2]].cpu().numpy()}
            t2 = {"input_ids": torch.tensor([[7]]).cuda(),
                  "position_ids": torch.tensor([[past + 1]]).cuda(),
                  "past_k": o1[list(o1)[1]], "past_v": o1[list(o1)[2]]}
            o2 = m.run(t2)
            want2 = ref_run(ref, feeds2)
            for k in want2:
                ok &= check_close(f"llama small step 2 (cache on device) {k}",
                                  o2[k].cpu().numpy(), want2[k], 3e-2)
            continue
        t = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
        ms_ours = cuda_time_ms(lambda: m.run(t), iters=50, warmup=5)
        runner = m._run
        sig = runner.last_signature  # the one m.run(t) ran (its cache's capacity's)
        ms_graph = graph_time_ms(runner, sig) if sig.graph is not None else None
        row = {"workload": f"llama-{name}-{layers}layers-decode-ctx{past + 1}",
               "ours_run_ms": ms_ours, "ours_graph_ms": ms_graph, "launches": sig.n,
               "concurrent_runs": sum(1 for r in sig.runs if r > 1)}
        if args.lanes_ab and runner.lanes:  # the same plan with every launch in order
            row["ours_graph_ms_one_stream"] = one_stream_graph_ms(runner, lambda: m.run(t))
        results.append(row)  # before the peers: a failing peer keeps our figures
        args.save(row)  # and on disk, should the run be cut short
        print(f"llama {name} {layers} layers decode at ctx {past + 1}: ours {ms_ours:.3f} ms "
              f"per run() (graph replay {ms_graph}); launches {sig.n}, "
              f"{row['concurrent_runs']} concurrent runs; one stream: "
              f"{row.get('ours_graph_ms_one_stream')}")
        # the same file again with the other fuse-norm-qmatmul setting, or the GEMV
        # heuristic's gemv_fill or gemv_acc_scale
        ab = "x_norm" if args.x_norm_ab else "gemv_fill" if args.gemv_fill_ab else \
            "gemv_acc_scale" if args.gemv_acc_scale_ab else None
        if ab:
            other = not X_NORM if ab == "x_norm" else True
            passes2 = pipeline(target, quantize, other) if ab == "x_norm" else \
                pipeline(target, quantize, gemv_fill=ab == "gemv_fill",
                         gemv_acc_scale=ab == "gemv_acc_scale")
            m2 = qcompiler.compile(path, target=target, passes=passes2,
                                   buckets={"batch": [1], "seq": [1], "past": [past + 1]})
            ms2 = cuda_time_ms(lambda: m2.run(t), iters=50, warmup=5)
            sig2 = m2._run.last_signature
            ms2_graph = graph_time_ms(m2._run, sig2) if sig2.graph is not None else None
            ms_again = cuda_time_ms(lambda: m.run(t), iters=50, warmup=5)  # drift check
            row[f"{ab}_ab"] = {ab: other, "ours_run_ms": ms2, "ours_graph_ms": ms2_graph,
                               "launches": sig2.n, "first_variant_run_ms_again": ms_again}
            args.save(row)
            print(f"  {ab}={other}: {ms2:.3f} ms per run() (graph replay {ms2_graph}); "
                  f"launches {sig2.n}; the first variant again {ms_again:.3f} ms")
        half = model.half().cuda()
        th = {k: (v.half() if v.is_floating_point() else v) for k, v in t.items()}
        # The example builds its causal mask with Python floats (the default dtype, f32, as
        # the ONNX export wants); an fp16 peer needs fp16 defaults for it.
        with torch.no_grad(), default_dtype(torch.float16):
            ms_torch = cuda_time_ms(lambda: half(*th.values()), iters=50, warmup=5)
            ms_compiled = None
            if args.compile_peers == "all":
                ms_compiled = compiled_peer_ms(half, lambda p: p(*th.values()), 50)
        print(f"  peers: torch fp16 eager {ms_torch:.3f} ms, torch.compile {ms_compiled} ms")
        row.update({"torch_fp16_eager_ms": ms_torch, "torch_compile_fp16_ms": ms_compiled})
        args.save(row)
        # (the profile and trace first: the loops below meet a new signature every step and
        # may release the fixed context's, CudaPlanRunner.MAX_SIGNATURES)
        row["profile"] = profile_steps(runner, sig, f"llama {name}") if args.profile else None
        row["trace"] = trace_graph(runner, sig, f"llama {name}") if args.trace else None
        if ab:  # its trace and greedy tokens (then its model goes)
            if args.trace:
                row[f"{ab}_ab"]["trace"] = trace_graph(m2._run, sig2, f"llama {name} {ab}")
            if args.greedy:
                ok &= greedy_tokens(m2, half, cfg, layers, past + 1 - args.greedy, args.greedy,
                                    row[f"{ab}_ab"])
            del m2, sig2
        if args.greedy:
            same = greedy_tokens(m, half, cfg, layers, past + 1 - args.greedy, args.greedy, row)
            # cache lengths the greedy check has not prepared yet (each is a new signature)
            start = max(1, past + 1 - 3 * args.greedy)
            steady = {}
            row["generation_ms_per_token"] = generation_ms_per_token(
                m, cfg, layers, start, args.greedy, args.generation_profile, steady=steady)
            row["generation_ms_per_token_after_2"] = steady.get("ms_per_token")
            if args.reshape_ab:  # the same loop with every token's signature prepared anew
                m._run.reshape_in_place = False
                row["generation_ms_per_token_no_reshape"] = generation_ms_per_token(
                    m, cfg, layers, max(1, start - 2 * args.greedy), args.greedy)
                m._run.reshape_in_place = True
                print(f"  generation loop without reshaping in place: "
                      f"{row['generation_ms_per_token_no_reshape']:.3f} ms per token")
            if args.pad_ab:  # the same loop with every cache length its own signature
                padding, m._run._padding = m._run._padding, None
                row["generation_ms_per_token_exact"] = generation_ms_per_token(
                    m, cfg, layers, max(1, start - 2 * args.greedy), args.greedy)
                m._run._padding = padding
                print(f"  generation loop without the capacity's graph (each length its own "
                      f"signature): {row['generation_ms_per_token_exact']:.3f} ms per token")
            if args.session:  # the caches kept on the device (kv_state.py)
                ok &= greedy_tokens(m, half, cfg, layers, past + 1 - args.greedy, args.greedy,
                                    row, session=True)
                steady = {}
                row["session_generation_ms_per_token"] = generation_ms_per_token(
                    m, cfg, layers, start, args.greedy, session=True, steady=steady)
                row["session_generation_ms_per_token_after_2"] = steady.get("ms_per_token")
                kept = steady["session"]._sig  # (the session's, kept open by ``steady``)
                row["session_graph_ms"] = graph_time_ms(m._run, kept) \
                    if kept.graph is not None else None
                row["session_launches"] = kept.n
                if args.trace:
                    row["session_trace"] = trace_graph(m._run, kept, f"llama {name} session")
                print(f"  decode session (the caches kept on the device): "
                      f"{row['session_generation_ms_per_token']:.3f} ms per token (after its "
                      f"first two steps {steady.get('ms_per_token')}); its graph "
                      f"{row['session_graph_ms']} ms, {kept.n} launches")
            row["generation_ms_per_token_torch_fp16_eager"] = generation_ms_per_token(
                half, cfg, layers, start, args.greedy)
            print(f"  a generation loop (cache growing a token a step, {args.greedy} steps): "
                  f"{row['generation_ms_per_token']:.3f} ms per token (after its first two "
                  f"steps {row['generation_ms_per_token_after_2']}); torch fp16 eager "
                  f"{row['generation_ms_per_token_torch_fp16_eager']:.3f}")
            ok &= same
    return ok


def llama_prefill(args, target, results) -> bool:
    """The TinyLlama-shaped model without a cache, one prefill of ``args.prefill`` tokens:
    ours (plan, graph) against torch fp16 eager and torch.compile on the same dequantized
    weights; the logits compared with torch's."""
    import torch

    import decoder_models as dm
    import qcompiler

    cfg, layers, seq = dm.TINYLLAMA, args.llama_layers, args.prefill
    model = dm.llama(layers=layers, with_cache=False, **cfg)
    dequantize_linears_in_place(model)
    feeds = dm.llama_inputs(cfg, layers, 1, seq, 0)
    tmp = tempfile.mkdtemp()
    path = dm.export_onnx(model, feeds, os.path.join(tmp, "llama_prefill.onnx"), dynamo=False)
    t0 = time.time()
    m = qcompiler.compile(path, target=target, passes=pipeline(target, Q4_SYMMETRIC),
                          buckets={"batch": [1], "seq": [seq]})
    print(f"llama prefill ({layers} layers) compiled in {time.time() - t0:.1f} s")
    t = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    out = list(m.run(t).values())[0]
    ms_ours = cuda_time_ms(lambda: m.run(t), iters=20, warmup=3)
    runner = m._run
    sig = runner.last_signature  # the one m.run(t) ran (inputs read in place)
    ms_graph = graph_time_ms(runner, sig) if sig.graph is not None else None
    row = {"workload": f"llama-tinyllama-width-{layers}layers-prefill-{seq}",
           "ours_run_ms": ms_ours, "ours_graph_ms": ms_graph, "launches": sig.n}
    if args.trace and sig.graph is not None:
        row["trace"] = trace_graph(runner, sig, f"llama prefill {seq}")
    results.append(row)
    args.save(row)
    for options in args.prefill_ab:
        row.setdefault("prefill_ab", []).append(
            prefill_variant(args, target, path, seq, t, out, m, ms_graph, options))
        args.save(row)
    half = model.half().cuda()
    with torch.no_grad(), default_dtype(torch.float16):
        want = half(*t.values())
        want = want[0] if isinstance(want, (tuple, list)) else want
        ok = check_close(f"llama prefill {seq} logits vs torch fp16", out.float().cpu().numpy(),
                         want.float().cpu().numpy(), 3e-2)
        ms_torch = cuda_time_ms(lambda: half(*t.values()), iters=20, warmup=3)
        ms_compiled = (compiled_peer_ms(half, lambda p: p(*t.values()), 20)
                       if args.compile_peers == "all" else None)
    row.update({"torch_fp16_eager_ms": ms_torch, "torch_compile_fp16_ms": ms_compiled,
                "logits_close": ok})
    args.save(row)
    print(f"llama prefill {seq}: ours {ms_ours:.3f} ms per run() (graph replay {ms_graph}); "
          f"launches {sig.n}; torch fp16 eager {ms_torch:.3f} ms, torch.compile {ms_compiled} ms")
    return ok


def prefill_variant(args, target, path, seq, t, out, m, ms_graph, options: str) -> dict:
    """The prefill compiled again from the same file with more tile-pass ``options`` (e.g.
    ``wgmma_stages=12`` or ``wgmma_pdl=1``): its graph replay beside the first compile's (the
    first timed again after it, for drift), its trace with ``--trace``, and whether its
    logits equal the first's (neither option changes the arithmetic)."""
    global TILE_OPTIONS
    import numpy as np

    import qcompiler

    saved = TILE_OPTIONS
    TILE_OPTIONS = ",".join(o for o in (saved, options) if o)
    try:
        m2 = qcompiler.compile(path, target=target, passes=pipeline(target, Q4_SYMMETRIC),
                               buckets={"batch": [1], "seq": [seq]})
    finally:
        TILE_OPTIONS = saved
    out2 = list(m2.run(t).values())[0]
    # (a signature is captured as a graph after a few uses, CudaPlanRunner.capture_after_uses)
    cuda_time_ms(lambda: m2.run(t), iters=5, warmup=3)
    sig2 = m2._run.last_signature
    ms2 = graph_time_ms(m2._run, sig2) if sig2.graph is not None else None
    again = graph_time_ms(m._run, m._run.last_signature)
    same = bool(np.array_equal(out.float().cpu().numpy(), out2.float().cpu().numpy()))
    ab = {"tile_options": options, "ours_graph_ms": ms2, "first_graph_ms": ms_graph,
          "first_graph_ms_again": again, "logits_equal": same}
    if args.trace and sig2.graph is not None:
        ab["trace"] = trace_graph(m2._run, sig2, f"llama prefill {seq} {options}")
    print(f"  tile{{{options}}}: graph replay {ms2} ms (first compile {ms_graph}, again "
          f"{again}); logits equal to the first's: {same}")
    return ab  # (m2 and its device memory go with this frame)


def greedy_tokens(m, half, cfg, layers: int, past: int, n: int, row: dict,
                  session: bool = False) -> bool:
    """``n`` greedy decode steps on both sides from the same random cache of ``past`` tokens
    (the caches each side returns are its next inputs; ours stay torch tensors on the device).
    Records both token lists and, where they first differ, torch's top-2 logit margin there.
    ``session``: ours in a decode session (the caches kept on the device, kv_state.py)."""
    import torch

    import decoder_models as dm

    feeds = dm.llama_inputs(cfg, layers, 1, 1, past, seed=2)
    ours_in = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    theirs_in = {k: (v.half() if v.is_floating_point() else v) for k, v in ours_in.items()}
    kept = None
    if session:
        kept = m.session()
        kept.reset({"past_k": ours_in.pop("past_k"), "past_v": ours_in.pop("past_v")})
    ours, theirs, margins = [], [], []
    with torch.no_grad(), default_dtype(torch.float16):
        for step in range(n):
            out = list((kept.step if kept else m.run)(ours_in).values())
            logits, k, v = half(*theirs_in.values())
            ours.append(int(out[0][0, -1].argmax()))
            theirs.append(int(logits[0, -1].argmax()))
            top2 = logits[0, -1].float().topk(2).values
            margins.append(float(top2[0] - top2[1]))
            pos = torch.tensor([[past + step + 1]], device="cuda")
            # each side continues from its own token: a divergence is not papered over
            ours_in = {"input_ids": torch.tensor([[ours[-1]]], device="cuda"),
                       "position_ids": pos}
            if not kept:
                ours_in.update(past_k=out[1], past_v=out[2])
            theirs_in = {"input_ids": torch.tensor([[theirs[-1]]], device="cuda"),
                         "position_ids": pos, "past_k": k, "past_v": v}
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    print(f"  greedy {n} tokens from context {past}{' (decode session)' if session else ''}: "
          f"{'same' if first is None else 'DIFFER'}")
    print(f"    ours:  {ours}\n    torch: {theirs}")
    if first is not None:
        print(f"    first difference at step {first}; torch's top-2 margin there "
              f"{margins[first]:.4g} (smallest margin over the run {min(margins):.4g})")
    row["session_greedy" if session else "greedy"] = {
        "tokens": n, "context_start": past, "ours": ours, "torch_fp16": theirs,
        "first_difference": first, "min_top2_margin": min(margins)}
    if kept:
        kept.close()
    return first is None


def generation_ms_per_token(m, cfg, layers: int, past: int, n: int,
                            profile: bool = False, session: bool = False,
                            steady: dict = None) -> float:
    """``n`` greedy steps from a random cache of ``past`` tokens as a generation loop runs
    them: the cache grows a token a step, so for ours every step is a new input signature
    (prepared from the last, captured at its second run, CudaPlanRunner.MAX_SIGNATURES kept),
    unlike the fixed-context timing above. The next token is chosen on the device (no host
    sync inside the loop). ``m``: our compiled model, or the torch fp16 module (the peer: its
    caches concatenated by torch ops a step). ``profile``: also print where the host time
    goes (cProfile, the top functions by own time; the timing is then not the figure).
    ``session``: ours in a decode session (kv_state.py), given the cache once before the
    clock starts; the loop passes only the token and its position. Its signature then is
    ``m._run.last_signature``. ``steady``: filled with ``ms_per_token`` over the steps after
    the first two (a signature prepared at its first run and captured at its second: a long
    generation pays that once per capacity of 64 tokens), and with the session (kept open:
    a session closes when dropped)."""
    import time

    import torch

    import decoder_models as dm

    ours = hasattr(m, "run")
    feeds = dm.llama_inputs(cfg, layers, 1, 1, past, seed=3)
    inputs = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    if not ours:
        inputs = {k: (v.half() if v.is_floating_point() else v) for k, v in inputs.items()}
    kept = None
    if session:
        kept = m.session()
        kept.reset({"past_k": inputs.pop("past_k"), "past_v": inputs.pop("past_v")})
        if steady is not None:
            steady["session"] = kept
    torch.cuda.synchronize()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    with torch.no_grad(), default_dtype(torch.float16 if not ours else torch.float32):
        for step in range(n):
            if step == 2 and steady is not None:
                torch.cuda.synchronize()
                warm = time.perf_counter()
            if kept:
                out = list(kept.step(inputs).values())
            else:
                out = list(m.run(inputs).values()) if ours else list(m(*inputs.values()))
            inputs = {"input_ids": out[0][:, -1:].argmax(-1),
                      "position_ids": torch.full((1, 1), past + step + 1, device="cuda")}
            if not kept:
                inputs.update(past_k=out[1], past_v=out[2])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if steady is not None and n > 2:
        steady["ms_per_token"] = (time.perf_counter() - warm) / (n - 2) * 1e3
    if profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return elapsed / n * 1e3


STAMP = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")


def write_results(a, results: list, ok) -> dict:
    """The JSON of the run so far (``ok`` None: the run is still going)."""
    import torch

    doc = {"device": torch.cuda.get_device_name(), "date_utc": STAMP, "torch": torch.__version__,
           "target": a.target, "checks_passed": None if ok is None else bool(ok),
           "pipeline_changes": {"int8_min_m": INT8_MIN_M, "x_norm": X_NORM,
                                "tile_options": TILE_OPTIONS},
           "results": results}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"models-gpu-{STAMP}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def main(argv=None) -> int:
    os.environ["QC_CUDA_PLAN"] = "1"  # the device plan (the default) is what this measures
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--target", default="cuda-sm90")
    ap.add_argument("--llama-layers", type=int, default=22)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-small", action="store_true",
                    help="leave out the 2-layer Llama's check against the reference (~30 s)")
    ap.add_argument("--greedy", type=int, default=32,
                    help="greedy decode steps compared with torch (0: none)")
    ap.add_argument("--profile", action="store_true", help="time each launch alone")
    ap.add_argument("--prefill", type=int, default=0,
                    help="also time a prefill of this many tokens (no cache) of the Llama model")
    ap.add_argument("--lanes-ab", action="store_true",
                    help="also time the plan captured on one stream (no concurrent launches)")
    ap.add_argument("--generation-profile", action="store_true",
                    help="cProfile the generation loop's host work (ours; its timing then "
                         "includes the profiler)")
    ap.add_argument("--session", action="store_true",
                    help="with --greedy: also the decode session (the KV cache kept on the "
                         "device): its greedy tokens, loop time, graph replay")
    ap.add_argument("--pad-ab", action="store_true",
                    help="also time the generation loop with every cache length its own "
                         "signature (the runner's capacity padding off, cache_capacity.py)")
    ap.add_argument("--reshape-ab", action="store_true",
                    help="also time the generation loop with CudaPlanRunner.reshape_in_place "
                         "off (every token's signature prepared anew)")
    ap.add_argument("--trace", action="store_true",
                    help="the graph replay's kernels and idle time, from the CUDA profiler")
    ap.add_argument("--compile-peers", choices=["none", "minilm", "all"], default="none",
                    help="also time torch.compile(mode='reduce-overhead') for these models")
    ap.add_argument("--int8-min-m", type=int, default=0,
                    help="int8 activations (W4A8) for buckets of this many rows and more "
                         "(the logits check is then against torch fp16 with int8's error)")
    ap.add_argument("--x-norm", action="store_true",
                    help="fuse-norm-qmatmul{enable=1}: each RMSNorm inside its projection")
    ap.add_argument("--x-norm-ab", action="store_true",
                    help="also compile the Llama decode from the same file with the other "
                         "fuse-norm-qmatmul setting and time both in this process")
    ap.add_argument("--gemv-fill-ab", action="store_true",
                    help="the same with tile{gemv_fill=1} (the GEMV heuristic splitting K "
                         "where that lowers the busiest SM's share)")
    ap.add_argument("--gemv-acc-scale-ab", action="store_true",
                    help="the same with tile{gemv_acc_scale=1} (group scales on each GEMV "
                         "warp's sums where its run keeps to one group)")
    ap.add_argument("--prefill-ab", action="append", default=[], metavar="OPTIONS",
                    help="also compile the prefill with these tile-pass options (e.g. "
                         "wgmma_stages=12 or wgmma_pdl=1; repeatable) and time each graph "
                         "beside the first in this process")
    ap.add_argument("--tile-options", default="",
                    help="more tile-pass options for every compile (e.g. wgmma_stages=12)")
    a = ap.parse_args(argv)
    global INT8_MIN_M, X_NORM, TILE_OPTIONS
    INT8_MIN_M = a.int8_min_m
    X_NORM = a.x_norm
    TILE_OPTIONS = a.tile_options
    results = []
    ok = True
    a.save = lambda row: write_results(a, results, None)
    for part in (minilm, llama, llama_prefill):
        if (part is minilm and a.skip_minilm) or (part is llama_prefill and not a.prefill):
            continue
        try:
            ok &= part(a, a.target, results)
        except Exception as e:  # report and carry on with the other model
            import traceback

            traceback.print_exc()
            print(f"{part.__name__}: FAILED: {type(e).__name__}: {e}")
            ok = False
        doc = write_results(a, results, ok)  # after each model: a run cut short keeps them
    print(json.dumps(doc, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
