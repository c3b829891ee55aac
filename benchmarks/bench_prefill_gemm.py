"""Prefill GEMMs of a 1B Llama (K, N of TinyLlama: 2048 hidden, 5632 intermediate) at large M:
the tile pass's heuristic for the M <= 512 bucket against a few hand-picked alternatives
(the wgmma/TMA kernel at M tiles of 64 and 128, with and without split-K; tiled variants),
and cuBLAS fp16 on the same shapes, in one run. W4A16 symmetric g128, fp16.

    python benchmarks/bench_prefill_gemm.py [--ms 512] [--out DIR]
    python benchmarks/bench_prefill_gemm.py --large --int8 --ms 64,256,1024,4096

``--fp8``: FP8 e4m3 weights (per channel) instead of 4-bit: our f16 kernels (the FP8 unpack)
and the FP8-activation kernel (W8A8-FP8, its x quantization in the time) beside cuBLAS fp16 and
``torch._scaled_mm``.
``--int8``: the layers permit int8 activations (MatMulNBits accuracy_level 4), so the
int8-activation kernel (W4A8, tiled_i8.cuh; its x quantization included in the time) runs
beside the f16 ones, checked against its numpy model; the peers add cuBLAS int8
(``torch._int_mm``, W8A8 without scales) and FP8 e4m3 (``torch._scaled_mm``).

Each config is built, checked against the reference on fresh random inputs (every row up to
512, then the first and last 256), then timed per call inside a CUDA graph over weight copies
larger than L2 (bench_support.measure_config).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import sys
import tempfile

SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]  # (N, K): q/o, k/v, gate/up, down
# issue #14's shapes (N, K): a 4096-wide layer and the large layers of 8B / 70B models.
LARGE_SHAPES = [(4096, 4096), (14336, 4096), (28672, 8192), (8192, 28672)]
SCHEME = "#quant<i4, symmetric, per_group(axis=0, block=128), scale=f16>"
FP8_SCHEME = "#quant<f8e4m3fn, symmetric, per_channel(axis=1), scale=f16>"
PERCHANNEL_SCHEME = "#quant<i4, symmetric, per_channel(axis=1), scale=f16>"  # --perchannel


def act8_candidates(target, key, knob: str) -> dict:
    """The 8-bit-activation kernel (``knob``: ``int8`` or ``fp8``): its heuristic and a few
    tiles around it, each valid config once."""
    from qcompiler.codegen.cuda import tuning

    out = {f"{knob} heuristic": tuning.act8_default(target, key, knob)}
    base = {"gemv": 0, "acc_scale": 0, "wgmma": 0, "int8": int(knob == "int8"),
            "fp8": int(knob == "fp8"), "stage_k": 128}
    for mf, wn, wk, st, sk in ((2, 4, 2, 4, 1), (2, 2, 2, 4, 1), (1, 4, 2, 4, 1),
                               (2, 4, 4, 3, 1), (2, 2, 4, 4, 1), (2, 4, 2, 4, 2)):
        out[f"{knob} mf{mf} wn{wn} wk{wk} st{st} sk{sk}"] = {
            **base, "m_frags": mf, "warps_n": wn, "warps_k": wk, "stages": st, "split_k": sk}
    # the sm_90a wgmma kernel with 8-bit activations (wgmma_act8.cuh): M tiles of 64-256,
    # 1 or 2 n64 blocks a warpgroup (group scales: at most 128 sums of each kind a thread)
    for mf, wn, wk, st, sk in ((8, 2, 2, 4, 1), (8, 2, 2, 6, 1), (4, 4, 2, 4, 1), (8, 1, 1, 4, 1),
                               (16, 2, 2, 4, 1), (16, 4, 2, 3, 1), (8, 4, 2, 4, 1),
                               (8, 2, 2, 4, 2), (4, 2, 2, 4, 1)):
        out[f"{knob} wgmma mf{mf} wn{wn} wk{wk} st{st} sk{sk}"] = {
            **base, "wgmma": 2, "m_frags": mf, "warps_n": wn, "warps_k": wk, "stages": st,
            "split_k": sk}
    unique = {}
    for name, c in out.items():  # the heuristic's config under its own name only
        if tuning.check_config(target, key, c) is None and c not in unique.values():
            unique[name] = c
    return unique


def candidates(target, key, tiled: bool = True, deeper: tuple = ()) -> dict:
    """The heuristic and hand-picked alternatives; ``deeper``: ring depths to add to each
    block-split tile and to the heuristic (the deepest that fits, at most that many stages)."""
    from qcompiler.codegen.cuda import tuning

    base = {"gemv": 0, "acc_scale": 0, "wgmma": 0, "stage_k": 128}
    out = {"heuristic": tuning.default_config(target, key)}
    for mf, wn, wk, st, sk in ((4, 4, 2, 3, 1), (4, 2, 2, 3, 1), (4, 2, 4, 3, 1), (2, 4, 2, 4, 1),
                               (4, 4, 2, 3, 2)) if tiled else ():
        out[f"tiled mf{mf} wn{wn} wk{wk} st{st} sk{sk}"] = {
            **base, "m_frags": mf, "warps_n": wn, "warps_k": wk, "stages": st, "split_k": sk}
    wgmma = {"gemv": 0, "stages": 6, "stage_k": 64, "acc_scale": 0}
    for consumers in (1, 2):
        for sk in (1, 2):
            out[f"wgmma m{64 * consumers} sk{sk}"] = {
                **wgmma, "wgmma": 1, "m_frags": 4 * consumers, "warps_n": 4,
                "warps_k": consumers, "split_k": sk}
    # The block-split mapping (wgmma=2): (M tile, n64 blocks, consumer warpgroups, splits).
    for m_tile, blocks, consumers, splits in ((256, 2, 2, (1, 2, 4)), (128, 4, 2, (1, 2)),
                                              (128, 2, 2, (1, 2)), (256, 1, 1, (1, 2)),
                                              (128, 1, 1, (1,)), (128, 1, 2, (1,)),
                                              (256, 1, 2, (1,))):
        for sk in splits:
            out[f"blocks m{m_tile} n{64 * blocks} c{consumers} sk{sk}"] = {
                **wgmma, "wgmma": 2, "m_frags": m_tile // 16, "warps_n": blocks,
                "warps_k": consumers, "split_k": sk}
    for depth in deeper:
        for name, c in list(out.items()):
            if c.get("wgmma") == 2 and " st" not in name:
                out[f"{name} st{depth}"] = {**c, "stages": depth}
        out[f"heuristic st{depth}"] = tuning.default_config(target, key, wgmma_stages=depth)
    for c in out.values():
        while c.get("wgmma") and tuning.check_config(target, key, c) and c["stages"] > 2:
            c["stages"] -= 1
    unique = {}
    for name, c in out.items():  # a depth that does not fit gives a config seen already
        if tuning.check_config(target, key, c) is None and c not in unique.values():
            unique[name] = c
    return unique


def cublas_us(m, n, k) -> float:
    import torch

    from qcompiler.codegen.cuda.bench_support import time_graph

    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(4)]
    return time_graph(lambda i: torch.matmul(x, ws[i]), 4)["median"]


def int8_peers_us(m, n, k) -> dict:
    """cuBLAS int8 (torch._int_mm, s8 x s8 -> s32) and FP8 e4m3 (torch._scaled_mm, per-tensor
    scales, fp16 out) on the same shape; a peer that fails is reported by its error."""
    import torch

    from qcompiler.codegen.cuda.bench_support import time_graph

    out = {}
    try:
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        bs_ = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8).t()
               for _ in range(4)]
        out["cuBLAS int8 (torch._int_mm)"] = time_graph(lambda i: torch._int_mm(a, bs_[i]),
                                                        4)["median"]
    except Exception as e:  # noqa: BLE001 (a peer's failure is a result)
        out["cuBLAS int8 (torch._int_mm)"] = f"{type(e).__name__}: {e}"[:200]
    try:
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        bs_ = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t() for _ in range(4)]
        one = torch.ones((), device="cuda")
        out["FP8 e4m3 (torch._scaled_mm)"] = time_graph(
            lambda i: torch._scaled_mm(a, bs_[i], scale_a=one, scale_b=one,
                                       out_dtype=torch.float16), 4)["median"]
    except Exception as e:  # noqa: BLE001
        out["FP8 e4m3 (torch._scaled_mm)"] = f"{type(e).__name__}: {e}"[:200]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="512")
    ap.add_argument("--out", default=".")
    ap.add_argument("--large", action="store_true", help="issue #14's shapes instead of 1B's")
    ap.add_argument("--no-tiled", action="store_true", help="leave out the mma.sync configs")
    ap.add_argument("--only", default="", help="comma-separated substrings of config names to keep")
    ap.add_argument("--fp8", action="store_true",
                    help="FP8 e4m3 weights: our f16 and FP8-activation kernels, FP8 peers")
    ap.add_argument("--stages", default="",
                    help="comma-separated ring depths (e.g. 8,12) added to the block-split tiles "
                         "and the heuristic (the deepest that fits, at most that many)")
    ap.add_argument("--shapes", default="", help="comma-separated NxK shapes instead of the set's")
    ap.add_argument("--perchannel", action="store_true",
                    help="4-bit weights with per-channel scales (W4A8: one x scale a row)")
    ap.add_argument("--int8", action="store_true",
                    help="accuracy_level 4 layers: the int8-activation kernel and int8/FP8 peers")
    a = ap.parse_args(argv)
    import torch

    from qcompiler.codegen.cuda.bench_support import measure_config
    from qcompiler.targets import get_target

    target = get_target("cuda-sm90")
    shapes = LARGE_SHAPES if a.large else SHAPES
    if a.shapes:  # N x K pairs, e.g. 4096x4096,14336x4096
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    work = tempfile.mkdtemp()
    jobs = []
    for m in [int(v) for v in a.ms.split(",")]:
        for n, k in shapes:
            key = {"op": "qmatmul", "m": m, "k": k, "n": n,
                   "w_scheme": FP8_SCHEME if a.fp8 else PERCHANNEL_SCHEME if a.perchannel
                   else SCHEME, "act": "float",
                   "x_dtype": "f16", "has_bias": False, **({"accuracy_level": 4} if a.int8 else {})}
            configs = candidates(target, key, tiled=not a.no_tiled,
                                 deeper=tuple(int(v) for v in a.stages.split(",") if v))
            if a.int8:
                configs.update(act8_candidates(target, key, "int8"))
            if a.fp8:
                configs.update(act8_candidates(target, key, "fp8"))
            for name, cfg in configs.items():
                if a.only and not any(part in name for part in a.only.split(",")):
                    continue
                jobs.append((m, n, k, name, key, cfg))
    # Build (nvcc) in parallel, then time one at a time: measure_config builds and times, so
    # warm the build cache first with a pool, then time serially.
    from qcompiler.codegen.cuda import bench_support as bs

    def build(job):
        m, n, k, name, key, cfg = job
        try:
            bs.build_case(bs.case_from_key(key), os.path.join(work, f"{n}x{k}x{m}-{abs(hash(name))}"),
                          target.name, variants=[cfg])
            return None
        except Exception as e:  # reported with the timing below
            return f"{type(e).__name__}: {e}"
    with cf.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        build_errors = list(pool.map(build, jobs))
    date = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    doc = {"benchmark": "bench_prefill_gemm.py", "device": torch.cuda.get_device_name(),
           "date": date.isoformat(timespec="seconds"), "torch": torch.__version__,
           "format": ("W8A16 FP8 e4m3 per channel, fp16; fp8 rows: W8A8-FP8 (x per row)"
                      if a.fp8 else "W4A16 i4 symmetric per channel, fp16" if a.perchannel
                      else "W4A16 i4 symmetric g128, fp16") + (
               "; int8 rows: W4A8 (x quantized per row" + ("" if a.perchannel else
                                                           " and group of 128")
               + ", in the time)" if a.int8 else ""), "method":
           "per call: 20 calls in one CUDA graph over weight copies > 4x L2, median", "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    gpu = "h200" if "H200" in torch.cuda.get_device_name() else "h100" \
        if "H100" in torch.cuda.get_device_name() else "gpu"
    path = os.path.join(a.out, f"prefill-gemm-{gpu}-{date:%Y%m%d-%H%M}{'-int8' if a.int8 else ''}"
                               f"{'-perchannel' if a.perchannel else ''}{'-fp8' if a.fp8 else ''}.json")

    def save():
        # after every row: a run cut off by its time limit (device calls are short) keeps
        # what it measured
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    def peers(m, n, k):
        """cuBLAS fp16 (and the 8-bit peers) on one shape, right after our rows of it."""
        us = cublas_us(m, n, k)
        rows.append({"m": m, "n": n, "k": k, "config_name": "cuBLAS fp16 (torch.matmul)",
                     "us": round(us, 2), "tflops": round(2 * m * n * k / us / 1e6, 1)})
        print(f"M={m} {n}x{k} {'cuBLAS fp16':<32} {us:8.2f} us", flush=True)
        for name, t in (int8_peers_us(m, n, k) if a.int8 or a.fp8 else {}).items():
            row = {"m": m, "n": n, "k": k, "config_name": name}
            if isinstance(t, str):
                row["error"] = t
            else:
                row.update(us=round(t, 2), tflops=round(2 * m * n * k / t / 1e6, 1))
            rows.append(row)
            print(f"M={m} {n}x{k} {name:<32} " + (f"{t:8.2f} us" if "us" in row else t),
                  flush=True)
        save()

    save()
    for i, (job, err) in enumerate(zip(jobs, build_errors)):
        m, n, k, name, key, cfg = job
        row = {"m": m, "n": n, "k": k, "config_name": name, "config": cfg}
        if err:
            row["error"] = err[:300]
        else:
            try:
                t = measure_config(target, key, cfg, os.path.join(work, f"{n}x{k}x{m}-{abs(hash(name))}"))
                row["us"] = round(t["median"], 2)
                row["tflops"] = round(2 * m * n * k / t["median"] / 1e6, 1)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(f"M={m} {n}x{k} {name:<32} " + (f"{row['us']:8.2f} us {row['tflops']:6.1f} TFLOPS"
                                             if "us" in row else row["error"]), flush=True)
        save()
        if i + 1 == len(jobs) or jobs[i + 1][:3] != (m, n, k):
            peers(m, n, k)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
