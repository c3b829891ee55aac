"""Time the CUDA op kernels (codegen/cuda/ops) against torch on the same GPU.

Attention prefill (causal, GQA) and decode (split-K over the KV length) against
``torch.nn.functional.scaled_dot_product_attention`` (enable_gqa), layernorm / rmsnorm /
softmax against torch's own kernels; f16, torch tensors passed by pointer (no copies), the
kernels launched on torch's current stream. Each timing: 3 warm-ups, then the median of 20
CUDA-event-timed calls; decode attention (a few microseconds, less than a launch's host cost)
is timed per call over 20 back-to-back calls captured in one CUDA graph instead. Also checks
each result against torch (max abs difference).

    python3 benchmarks/bench_cuda_ops.py --out DIR    # writes DIR/cuda-ops-<date>.json
    python3 benchmarks/bench_cuda_ops.py --only attention_decode_gqa --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

import numpy as np


def _graph():
    from qcompiler.ir.core import Function, Module
    from qcompiler.ir.types import tensor

    module = Module("bench")
    fn = module.add_function(Function("main"))
    nodes = {}

    def node(key, op, shapes, out_shape, attrs, dt="f16"):
        args = [fn.add_arg(fn.fresh_name("a"), tensor(s, dt)) for s in shapes]
        nodes[key] = fn.make_node(op, args, [tensor(out_shape, dt)], attrs)

    B, S, KV = "b", "s", "kv"
    node("attention", "attention", [[B, 32, S, 128], [B, 8, KV, 128], [B, 8, KV, 128]],
         [B, 32, S, 128], {"scale": 128 ** -0.5, "causal": 1})
    # TinyLlama's decode: 32 query heads over 4 kv heads of 64, the export's padding mask
    node("attention_small", "attention", [[B, 32, 1, 64], [B, 4, KV, 64], [B, 4, KV, 64],
                                          [B, 1, 1, KV]],
         [B, 32, 1, 64], {"scale": 64 ** -0.5, "causal": 1})
    node("layernorm", "layernorm", [[B, 4096], [4096], [4096]], [B, 4096],
         {"axis": -1, "epsilon": 1e-5})
    node("rmsnorm", "rmsnorm", [[B, 4096], [4096]], [B, 4096], {"axis": -1, "epsilon": 1e-6})
    node("softmax", "softmax", [[B, S]], [B, S], {"axis": -1})
    return module, nodes


def _time(fn, reps=20, calls=1):
    """Median over ``reps`` of the microseconds per call. With ``calls`` > 1: ``calls``
    back-to-back calls captured in one CUDA graph and replayed (no host launch cost: a
    decode kernel takes less time than its launch from Python)."""
    import torch

    for _ in range(3):
        fn()
    run = fn
    if calls > 1:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch's graph docs do
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            run = graph.replay
        except RuntimeError as e:  # no capture: the calls back to back, launch cost included
            print(f"  (no CUDA graph: {str(e)[:120]}; timing back-to-back launches)")
            torch.cuda.synchronize()

            def run():
                for _ in range(calls):
                    fn()
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / calls)
    return float(np.median(times))


def main():
    import torch
    import torch.nn.functional as F

    from qcompiler.codegen.cuda.ops import CudaOpsLibrary, build_cuda_ops_library, library_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="", help="comma-separated kernel names (rows) to run")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    module, nodes = _graph()
    work = tempfile.mkdtemp()
    names = build_cuda_ops_library(list(nodes.values()), "sm_90", work, module=module)
    lib = CudaOpsLibrary(library_path(work))
    dev = torch.device("cuda")
    rows = []

    def ours(key, tensors, out):
        sym = names[nodes[key].results[0].name]
        shapes = [t.shape for t in tensors] + [out.shape]
        ws_bytes = lib.workspace_bytes(sym, shapes)
        ws = torch.zeros(max(ws_bytes, 1), dtype=torch.uint8, device=dev)  # ABI: zeroed
        ptrs = [t.data_ptr() for t in tensors] + [out.data_ptr()]
        # the current stream at call time: a graph capture runs on its own stream
        return lambda: lib.call(sym, ptrs, shapes, ws.data_ptr(),
                                torch.cuda.current_stream().cuda_stream)

    def record(name, shape, fn_ours, fn_torch, out, want, nbytes, flops=0.0, calls=1):
        if only and name not in only:
            return
        fn_ours()
        torch.cuda.synchronize()
        err = (out.float() - want.float()).abs().max().item()
        t_ours, t_torch = _time(fn_ours, calls=calls), _time(fn_torch, calls=calls)
        row = {"kernel": name, "shape": shape, "qcompiler_us": round(t_ours, 2),
               "torch_us": round(t_torch, 2), "speedup_vs_torch": round(t_torch / t_ours, 3),
               "max_abs_diff_vs_torch": err,
               "qcompiler_GBps": round(nbytes / t_ours / 1e3, 1)}
        if flops:
            row["qcompiler_TFLOPs"] = round(flops / t_ours / 1e6, 2)
            row["torch_TFLOPs"] = round(flops / t_torch / 1e6, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    torch.manual_seed(0)
    h = torch.float16
    # attention prefill: causal GQA 32 query heads over 8 kv heads, head dim 128
    for b, s in ((1, 512), (1, 2048), (4, 1024)):
        q = torch.randn(b, 32, s, 128, dtype=h, device=dev)
        k = torch.randn(b, 8, s, 128, dtype=h, device=dev)
        v = torch.randn(b, 8, s, 128, dtype=h, device=dev)
        y = torch.empty_like(q)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        flops = 4.0 * b * 32 * s * s * 128 / 2  # causal: half the score matrix
        record("attention_prefill_causal_gqa", [b, 32, 8, s, 128], ours("attention", [q, k, v], y),
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
               y, want, (q.numel() * 2 + k.numel() * 2 + y.numel()) * 2, flops)
    # attention decode: one query row against a long KV cache
    for b, kv in ((1, 4096), (8, 4096), (8, 32768)):
        q = torch.randn(b, 32, 1, 128, dtype=h, device=dev)
        k = torch.randn(b, 8, kv, 128, dtype=h, device=dev)
        v = torch.randn(b, 8, kv, 128, dtype=h, device=dev)
        y = torch.empty_like(q)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
        record("attention_decode_gqa", [b, 32, 8, kv, 128], ours("attention", [q, k, v], y),
               lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
               y, want, (k.numel() + v.numel()) * 2, calls=20)
    # TinyLlama-shaped decode (a layer of the 22-layer decode step) with a padding mask
    for b, kv in ((1, 512), (1, 2048), (8, 512)):
        q = torch.randn(b, 32, 1, 64, dtype=h, device=dev)
        k = torch.randn(b, 4, kv, 64, dtype=h, device=dev)
        v = torch.randn(b, 4, kv, 64, dtype=h, device=dev)
        mask = torch.zeros(b, 1, 1, kv, dtype=h, device=dev)
        mask[:, :, :, : kv // 8] = torch.finfo(h).min  # left padding
        y = torch.empty_like(q)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        record("attention_decode_gqa", [b, 32, 4, kv, 64],
               ours("attention_small", [q, k, v, mask], y),
               lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
               y, want, (k.numel() + v.numel()) * 2, calls=20)
    for rows_n in (16, 4096, 16384):
        x = torch.randn(rows_n, 4096, dtype=h, device=dev)
        w = torch.randn(4096, dtype=h, device=dev)
        bias = torch.randn(4096, dtype=h, device=dev)
        y = torch.empty_like(x)
        record("layernorm", [rows_n, 4096], ours("layernorm", [x, w, bias], y),
               lambda: F.layer_norm(x, (4096,), w, bias, 1e-5), y,
               F.layer_norm(x, (4096,), w, bias, 1e-5), x.numel() * 4)
        record("rmsnorm", [rows_n, 4096], ours("rmsnorm", [x, w], y),
               lambda: F.rms_norm(x, (4096,), w, 1e-6), y, F.rms_norm(x, (4096,), w, 1e-6),
               x.numel() * 4)
    for rows_n, cols in ((4096, 1024), (32 * 2048, 2048), (1024, 32000)):
        x = torch.randn(rows_n, cols, dtype=h, device=dev)
        y = torch.empty_like(x)
        record("softmax", [rows_n, cols], ours("softmax", [x], y),
               lambda: torch.softmax(x, dim=-1), y, torch.softmax(x, dim=-1), x.numel() * 4)
    result = {"device": torch.cuda.get_device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "torch": torch.__version__, "dtype": "f16", "method": "median of 20 CUDA-event "
              "timed calls after 3 warm-ups, single stream, hot caches", "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"cuda-ops-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
