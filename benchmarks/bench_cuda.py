"""W4A16 (i4 symmetric, group 128, fp16) qmatmul on the GPU: the generated kernel against
cuBLAS fp16 (torch.matmul) and torch's int4 kernel (tinygemm, bf16), in one run.

Every timing is per call: the call captured 20 times in one CUDA graph over rotating weight
copies (more than 2x the 50 MB L2 in total), the graph replayed 20 times, median (CUDA events).
The floor is (weight + scale bytes) / the measured device copy bandwidth.

    python benchmarks/bench_cuda.py [--quick] [--sweep [--every-frag]] [--shapes NxK,...]
                                    [--ms 1,16] [--out benchmarks/results]

``--sweep`` also times a list of candidate tile configs per shape and M and reports the best
(the tile pass's heuristic is what ``qcompile`` uses without a tuning log); each row of the
JSON lists every candidate's time (``swept``). ``--every-frag`` tries every M tile at every M.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# qcompiler is imported from its installed package (run_on_gpu.sh installs it).

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 8192),
          (8192, 28672)]  # (N, K)
MS = [1, 4, 16, 32, 64, 128, 512]
L2_BYTES = 50 << 20

# Candidate configs for --sweep. Tiled kernel: (m_frags, warps_n, warps_k, stages, stage_k,
# acc_scale), each with the splits of SPLITS[m_frags].
SWEEP = {
    1: [(1, 4, 2, 4, 128, 0), (1, 4, 2, 4, 128, 1), (1, 8, 1, 4, 128, 0), (1, 8, 1, 4, 128, 1),
        (1, 2, 4, 4, 128, 0), (1, 2, 4, 4, 128, 1), (1, 4, 2, 6, 128, 1), (1, 4, 2, 3, 128, 1)],
    2: [(2, 2, 4, 4, 128, 0), (2, 4, 2, 4, 128, 0), (2, 2, 2, 4, 128, 0)],
    4: [(4, 4, 2, 3, 128, 0), (4, 2, 2, 3, 128, 0), (4, 2, 2, 4, 128, 0), (4, 2, 4, 3, 128, 0)],
}
# Narrow layers (N of at most 32 blocks of 64: an encoder's 384-1536 wide projections): tiles
# of one or two N warps, so that the grid still covers the SMs.
SWEEP_NARROW = {
    1: [(1, 1, 4, 3, 128, 0), (1, 1, 2, 3, 128, 0), (1, 2, 2, 3, 128, 0), (1, 1, 4, 2, 64, 0)],
    2: [(2, 1, 4, 3, 128, 0), (2, 1, 2, 3, 128, 0), (2, 2, 2, 3, 128, 0), (2, 1, 2, 2, 64, 0)],
    4: [(4, 1, 4, 3, 128, 0), (4, 1, 2, 3, 128, 0), (4, 2, 2, 3, 128, 0)],
}
SPLITS = {1: [1, 2, 3, 4, 6, 8, 12, 16], 2: [1, 2, 4], 4: [1, 2, 4]}
# GEMV kernel: (m_frags, warps_n, warps_k, stages), each with GEMV_SPLITS.
GEMV_SWEEP = [(1, 1, 16, 8), (1, 1, 8, 8), (1, 2, 8, 8), (1, 4, 2, 8), (1, 1, 8, 6),
              (1, 1, 16, 6), (2, 1, 16, 4), (2, 1, 8, 4), (2, 2, 8, 4), (2, 4, 2, 4),
              # fewer k warps, more CTAs: the decode shapes of small models (K = 2048)
              (1, 1, 4, 8), (1, 1, 4, 4), (1, 1, 2, 8), (1, 1, 8, 4), (1, 2, 4, 8),
              # short K (an encoder's 384): two to four k warps, 16-row tiles
              (2, 1, 4, 4), (2, 1, 2, 8), (2, 1, 2, 4), (1, 1, 2, 4), (2, 2, 2, 4)]
GEMV_SPLITS = [1, 2, 4, 8, 16]


def sweep_variants(n: int, k: int, gemv_only: bool = False) -> list[dict]:
    n_blocks, k_tiles = n // 64, k // 64
    out = []
    tiled = {} if gemv_only else SWEEP_NARROW if n_blocks <= 32 else SWEEP
    for mf, group in tiled.items():
        for _, wn, wk, st, sk_rows, acc in group:
            if n_blocks % wn:
                continue
            for sk in SPLITS[mf]:
                if sk > k // sk_rows:
                    continue
                out.append({"gemv": 0, "m_frags": mf, "warps_n": wn, "warps_k": wk,
                            "stages": st, "stage_k": sk_rows, "acc_scale": acc, "split_k": sk,
                            "m_max": 0})  # 0: by index
    for mf, wn, wk, st in GEMV_SWEEP:
        if n_blocks % wn:
            continue
        for sk in GEMV_SPLITS:
            if k // 16 < sk * wk * st:
                continue
            out.append({"gemv": 1, "m_frags": mf, "warps_n": wn, "warps_k": wk, "stages": st,
                        "stage_k": 64, "acc_scale": 0, "split_k": sk, "m_max": 0})
    return out


def sweep_frags(m: int, every: bool = False) -> tuple:
    """Which (gemv, m_frags) a sweep tries at M rows (``every``: all of them)."""
    if every:
        return (1, 1), (1, 2), (0, 1), (0, 2), (0, 4)
    if m <= 8:
        return (1, 1), (1, 2), (0, 1)
    return ((1, 2), (0, 1)) if m <= 16 else ((1, 2), (0, 2)) if m <= 64 else ((0, 2), (0, 4))


def copy_bandwidth() -> float:
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2 * (1 << 30) / sorted(ts)[len(ts) // 2]  # bytes read + written per second


def time_torch(fn, copies):
    from qcompiler.codegen.cuda.bench_support import time_graph

    return time_graph(fn, copies)


def build_shape(n, k, workdir, sweep, gemv_only=False):
    """Build the W4A16 g128 kernel of (N, K): the tile pass's variants, plus the sweep's."""
    from qcompiler.codegen.cuda import bench_support as bs, cases

    case = cases.Case(k=k, n=n, bits=4, signed=True, zero_point=False, group=128, dtype="f16")
    module, packed, node = bs.pack_case(case, "cuda-sm90", seed=n + k)
    heur = sorted(node.attrs["config"]["variants"].values(), key=lambda v: v["m_max"])
    variants = [dict(v) for v in heur]
    if sweep:
        variants += sweep_variants(n, k, gemv_only)
    built = bs.build_case(case, os.path.join(workdir, f"n{n}_k{k}"), "cuda-sm90",
                          variants=variants, module=module)
    return built, len(heur)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 shapes, M in {1, 16, 64}")
    ap.add_argument("--sweep", action="store_true", help="also time candidate configs")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    ap.add_argument("--every-frag", action="store_true",
                    help="sweep every config at every M (default: the M tiles that suit M)")
    ap.add_argument("--gemv-only", action="store_true", help="sweep the GEMV kernel's configs only")
    ap.add_argument("--shapes", default=None, help="comma-separated NxK shapes (e.g. 4096x4096)")
    args = ap.parse_args()

    import torch

    from qcompiler.codegen.cuda import bench_support as bs, cases, tuning
    from qcompiler.runtime import numerics

    shapes = [SHAPES[0], SHAPES[4], SHAPES[5]] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    ms = [1, 16, 64] if args.quick else MS
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="qc_bench_")
    dev_name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device {dev_name}; copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        builds = list(pool.map(lambda s: build_shape(s[0], s[1], workdir, args.sweep,
                                                      args.gemv_only), shapes))

    rows = []
    for (n, k), (built, n_heur) in zip(shapes, builds):
        kern = bs.load_kernel(built)
        case = built.case
        # Correctness at a few M against a GPU fp32 matmul of the reference's dequantized w.
        node = next(nd for nd in built.module.main.nodes if nd.op == "qmatmul")
        from qcompiler.ir.core import constant_value

        wq = constant_value(built.module, node.arg("w"))
        sc = constant_value(built.module, node.arg("w_scale"))
        wf = numerics.dequantize(wq, sc, None, node.attrs["w_scheme"], np.float32)
        w_ref = torch.from_numpy(wf.astype(np.float16)).cuda().float()
        del wf
        for m in sorted({1, 16, 64, ms[-1]}):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)
            kern.run_device(x.data_ptr(), y.data_ptr(), m, torch.cuda.current_stream().cuda_stream)
            ref = x.float() @ w_ref
            err = float((y.float() - ref).norm() / ref.norm())
            assert err < cases.TOLERANCE["f16"], f"({n},{k}) M={m}: rel error {err}"
        del w_ref
        # Peers: cuBLAS fp16 and tinygemm int4 (bf16) over rotating weight copies.
        fp16_bytes = 2 * k * n
        cop_fp16 = max(1, min(8, -(-4 * L2_BYTES // fp16_bytes)))
        w16 = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(cop_fp16)]
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        tg_w = torch.ops.aten._convert_weight_to_int4pack(q_u8, 8)
        tg_sz = torch.randn(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
        tg_bytes = k * n // 2 + tg_sz.numel() * 2
        cop_tg = max(1, min(16, -(-4 * L2_BYTES // tg_bytes)))
        tg_ws = [tg_w.clone() for _ in range(cop_tg)]
        w4_bytes = k * n // 2 + (k // 128) * n * 2
        floor_us = w4_bytes / bw * 1e6
        for m in ms:
            x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xbf = x16.to(torch.bfloat16)
            t_cublas = time_torch(lambda i: torch.matmul(x16, w16[i]), cop_fp16)["median"]
            t_tg = time_torch(lambda i: torch.ops.aten._weight_int4pack_mm(
                xbf, tg_ws[i], 128, tg_sz), cop_tg)["median"]
            kern.bench_variant = -1
            t_ours = bs.time_kernel(kern, m, case)["median"]
            best, best_cfg = t_ours, "heuristic"
            swept = []  # every candidate's time, for fitting the heuristic
            if args.sweep:
                for i, v in enumerate(built.variants):
                    tried = sweep_frags(m, args.every_frag)
                    if v["m_max"] != 0 or (v["gemv"], v["m_frags"]) not in tried:
                        continue
                    kern.bench_variant = i
                    t = bs.time_kernel(kern, m, case, replays=5)["median"]
                    swept.append({**{key: v[key] for key in tuning.KNOBS}, "us": round(t, 2)})
                    if t < best:
                        best, best_cfg = t, {key: v[key] for key in
                                             ("gemv", "m_frags", "warps_n", "warps_k", "stages",
                                              "stage_k", "acc_scale", "split_k")}
                kern.bench_variant = -1
            row = {"n": n, "k": k, "m": m, "ours_us": round(t_ours, 2),
                   "cublas_fp16_us": round(t_cublas, 2), "tinygemm_int4_us": round(t_tg, 2),
                   "floor_us": round(floor_us, 2),
                   "speedup_vs_cublas": round(t_cublas / t_ours, 3),
                   "speedup_vs_tinygemm": round(t_tg / t_ours, 3),
                   "roofline_pct": round(100 * floor_us / t_ours, 1)}
            if args.sweep:
                row.update({"best_us": round(best, 2), "best_config": best_cfg,
                            "best_roofline_pct": round(100 * floor_us / best, 1),
                            "swept": swept})
            rows.append(row)
            print(json.dumps(row), flush=True)
        kern.close()
        del w16, tg_ws

    print()
    hdr = f"{'N x K':>13} {'M':>4} {'ours':>8} {'cuBLAS':>8} {'tinygemm':>9} {'floor':>7} " \
          f"{'x cuBLAS':>8} {'%roof':>6}" + ("  best(sweep)" if args.sweep else "")
    print(hdr)
    for r in rows:
        line = f"{r['n']:>6}x{r['k']:<6} {r['m']:>4} {r['ours_us']:>8.1f} " \
               f"{r['cublas_fp16_us']:>8.1f} {r['tinygemm_int4_us']:>9.1f} {r['floor_us']:>7.1f} " \
               f"{r['speedup_vs_cublas']:>8.2f} {r['roofline_pct']:>6.1f}"
        if args.sweep:
            line += f"  {r['best_us']:.1f} {r['best_config']}"
        print(line)
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "bench_cuda.py", "format": "W4A16 i4 symmetric g128 fp16 (tinygemm: bf16)",
        "device": dev_name, "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__, "host": platform.node(),
        "copy_bandwidth_tb_s": round(bw / 1e12, 3),
        "method": "per call: 20 calls in one CUDA graph over rotating weight copies > 2x L2, "
                  "20 replays, median; floor = (weight + scale bytes) / copy bandwidth",
        "peers": ["cuBLAS fp16 (torch.matmul)", "torch _weight_int4pack_mm (tinygemm, bf16)"],
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cuda-{now.strftime('%Y%m%d-%H%M')}"
                                  f"{'-quick' if args.quick else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
