"""Tensor-parallel Llama-70B MLP block (issue #17): TP-aware vs naive sharding on 1, 2, 4 GPUs.

The block is ``down(silu(gate(x)) * up(x))`` with hidden 8192 and intermediate 28672, W4A16
(u4 affine, group 128 along K, fp16 activations), the down projection act-order (GPTQ g_idx,
rows in a random order). For each world size W the block is compiled with
``qcompile --target cuda-sm90:tp=W`` (W = 1: unsharded) without fuse-epilogue, so that every
rank runs its three generated qmatmul kernels from its rank artifact; SiLU * up runs in torch
and the all_reduce is ``torch.distributed.all_reduce`` over NCCL (``NCCL_NVLS_ENABLE=0``),
all on one stream, one process per GPU.

- **TP-aware** (``shard``): gate/up column blocks reordered by argsort(g_idx), each rank's
  down rows are whole groups of its own columns: gate, up, silu*mul, down, all_reduce.
- **naive**: gate/up take natural column blocks, so each rank's act-order row block of down
  needs columns from every rank: the same kernels (a rank's gate/up shard costs the same
  whichever columns it holds, and its down block is the TP-aware one's), plus an
  ``all_gather`` of h (M x 28672 fp16) and the gather of the rank's columns before down.

Per (W, M): the median time of the block over rank 0's CUDA events (after a barrier), the
speedup TP-aware / naive, the scaling efficiency t(1) / (W t(W)), and the max difference of
TP-aware's output from the 1-GPU output. Goals (the issue): TP-aware >= 1.5x naive, 2-GPU
efficiency >= 80%.

    python benchmarks/bench_tp.py [--gpus 1,2,4] [--m 1,4,16] [--quick] [--out DIR]

Needs torch with CUDA and NCCL, nvcc, and as many GPUs as the largest world size asked for
(it refuses otherwise). ``--quick`` uses a 1024 -> 4096 -> 1024 block.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4", help="world sizes (GPUs), e.g. 1,2,4")
    ap.add_argument("--m", default="1,4,16", help="rows (tokens), e.g. 1,4,16")
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per case")
    ap.add_argument("--quick", action="store_true", help="a 1024 -> 4096 -> 1024 block")
    ap.add_argument("--target", default="cuda-sm90")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--note", default="")
    # internal: one rank's worker
    ap.add_argument("--worker", nargs=5, metavar=("RANK", "WORLD", "ARTIFACT", "PORT", "OUT"),
                    help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mlp_module(hidden: int, inter: int, group: int, seed: int = 0):
    """The block in QIR: f32 model (the CUDA pipeline computes in fp16), random u4 weights."""
    import numpy as np

    from qcompiler.ir import parse_module

    scheme = f"#quant<u4, affine, per_group(axis=0, block={group}), scale=f32, zp=u4>"
    act = scheme[:-1] + ", act_order>"
    gh, gi = hidden // group, inter // group
    text = f"""module @mlp {{
  func @main(%x: tensor<[m, {hidden}], f32>) -> ("y": tensor<[m, {hidden}], f32>) {{
    %wg = constant() {{name = "wg"}} : tensor<[{hidden}, {inter}], u4>
    %sg = constant() {{name = "sg"}} : tensor<[{gh}, {inter}], f32>
    %zg = constant() {{name = "zg"}} : tensor<[{gh}, {inter}], u4>
    %wu = constant() {{name = "wu"}} : tensor<[{hidden}, {inter}], u4>
    %su = constant() {{name = "su"}} : tensor<[{gh}, {inter}], f32>
    %zu = constant() {{name = "zu"}} : tensor<[{gh}, {inter}], u4>
    %wd = constant() {{name = "wd"}} : tensor<[{inter}, {hidden}], u4>
    %sd = constant() {{name = "sd"}} : tensor<[{gi}, {hidden}], f32>
    %zd = constant() {{name = "zd"}} : tensor<[{gi}, {hidden}], u4>
    %gd = constant() {{name = "gd"}} : tensor<[{inter}], i32>
    %g = qmatmul(%x, %wg, %sg, %zg, none, none, none, none) {{act = "float", w_scheme = {scheme}}} : tensor<[m, {inter}], f32>
    %u = qmatmul(%x, %wu, %su, %zu, none, none, none, none) {{act = "float", w_scheme = {scheme}}} : tensor<[m, {inter}], f32>
    %sig = sigmoid(%g) : tensor<[m, {inter}], f32>
    %silu = mul(%g, %sig) : tensor<[m, {inter}], f32>
    %h = mul(%silu, %u) : tensor<[m, {inter}], f32>
    %y = qmatmul(%h, %wd, %sd, %zd, %gd, none, none, none) {{act = "float", w_scheme = {act}}} : tensor<[m, {hidden}], f32>
    return %y
  }}
}}"""
    rng = np.random.default_rng(seed)
    consts = {}
    for name, (k, n) in {"g": (hidden, inter), "u": (hidden, inter), "d": (inter, hidden)}.items():
        consts[f"w{name}"] = rng.integers(0, 16, (k, n), dtype=np.uint8)
        consts[f"s{name}"] = rng.uniform(0.002, 0.004, (k // group, n)).astype(np.float32)
        consts[f"z{name}"] = rng.integers(6, 10, (k // group, n), dtype=np.uint8)
    consts["gd"] = (np.argsort(rng.permutation(inter)) // group).astype(np.int32)
    return parse_module(text, consts)


def compile_world(args, world: int, workdir: str) -> str:
    """The block compiled for ``world`` ranks (a plain artifact for 1); returns its dir."""
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.targets import get_target

    hidden, inter = (1024, 4096) if args.quick else (args.hidden, args.intermediate)
    pipeline = ",".join(p for p in get_target(args.target).default_pipeline.split(",")
                        if p not in ("fuse-epilogue", "fuse-elementwise"))
    out = os.path.join(workdir, f"tp{world}")
    compile_to_dir(mlp_module(hidden, inter, args.group), args.target, out, passes=pipeline,
                   tp=world if world > 1 else None)
    return out


def worker(rank: int, world: int, artifact: str, port: int, out: str, ms: list[int],
           iters: int) -> None:
    """One rank: its kernels, the NCCL group, TP-aware and naive timings (rank 0 writes)."""
    import datetime as dt

    import numpy as np
    import torch
    import torch.distributed as dist

    from qcompiler.codegen.cuda.runtime import CudaModuleRunner
    from qcompiler.driver.artifact import read_artifact

    torch.cuda.set_device(0)  # CUDA_VISIBLE_DEVICES holds this rank's GPU
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=dt.timedelta(seconds=300))
    rank_dir = os.path.join(artifact, f"rank{rank}") if world > 1 else artifact
    module, manifest = read_artifact(rank_dir)
    runner = CudaModuleRunner(module, manifest, rank_dir)
    runner.load_device()
    qmms = [n for n in module.main.nodes if n.op == "qmatmul"]
    # gate and up share their input (x, cast to fp16); down reads h
    (down,) = [n for n in qmms if sum(o.operands[0] is n.operands[0] for o in qmms) == 1]
    gate, up = [n for n in qmms if n is not down]
    kg, ku, kd = (runner.kernels[n.result.name] for n in (gate, up, down))
    hidden = module.main.args[0].type.shape[1]
    per = gate.result.type.shape[-1]
    stream = torch.cuda.current_stream()
    results = []
    for m in ms:
        x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, hidden)).astype(
            np.float16) * 0.5).cuda()
        g = torch.empty((m, per), dtype=torch.float16, device="cuda")
        u, h = torch.empty_like(g), torch.empty_like(g)
        y = torch.empty((m, hidden), dtype=torch.float16, device="cuda")
        full = torch.empty((m, per * world), dtype=torch.float16, device="cuda")
        gathered = [torch.empty_like(h) for _ in range(world)]
        index = torch.randperm(per * world, device="cuda")[:per]

        def block(naive: bool):
            s = stream.cuda_stream
            kg.run_device(x.data_ptr(), g.data_ptr(), m, s)
            ku.run_device(x.data_ptr(), u.data_ptr(), m, s)
            torch.mul(torch.nn.functional.silu(g), u, out=h)
            src = h
            if naive and world > 1:
                dist.all_gather(gathered, h)
                torch.cat(gathered, dim=1, out=full)
                src = torch.index_select(full, 1, index).contiguous()
            kd.run_device(src.data_ptr(), y.data_ptr(), m, s)
            if world > 1:
                dist.all_reduce(y)

        row = {"m": m, "world": world}
        for name, naive in (("tp_aware", False), ("naive", True)):
            for _ in range(10):
                block(naive)
            torch.cuda.synchronize()
            dist.barrier()
            times = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                block(naive)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e3)
            times.sort()
            row[f"{name}_us"] = round(times[len(times) // 2], 2)
        block(False)
        torch.cuda.synchronize()
        row["y"] = y.float().cpu().numpy().tolist() if m <= 4 else None
        results.append(row)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run_world(args, world: int, artifact: str, workdir: str) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(workdir, f"result_tp{world}.json")
    procs = []
    for r in range(world):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(r), NCCL_NVLS_ENABLE="0")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--m", args.m, "--iters",
             str(args.iters), "--worker", str(r), str(world), artifact, str(port), out], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench_tp: world {world}: worker exit codes {codes}")
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    args = _args(argv)
    if args.worker:
        rank, world, artifact, port, out = args.worker
        worker(int(rank), int(world), artifact, int(port), out, _ints(args.m), args.iters)
        return 0
    worlds, ms = _ints(args.gpus), _ints(args.m)
    have = gpu_count()
    if max(worlds) > have:
        fits = ",".join(str(w) for w in worlds if w <= have)
        sys.stderr.write(f"bench_tp: world sizes {worlds} need {max(worlds)} GPUs; {have} here "
                         "(torch.cuda.device_count()); run it on a multi-GPU machine"
                         + (f" or pass --gpus {fits}" if fits else "") + "\n")
        return 2
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tp_") as workdir:
        base = {}
        for world in sorted(worlds):
            artifact = compile_world(args, world, workdir)
            for row in run_world(args, world, artifact, workdir):
                y = row.pop("y")
                if world == 1 and y is not None:
                    base[row["m"]] = np.asarray(y)
                if y is not None and row["m"] in base:
                    row["max_diff_vs_1gpu"] = float(np.abs(np.asarray(y) - base[row["m"]]).max())
                rows.append(row)
    one = {r["m"]: r["tp_aware_us"] for r in rows if r["world"] == 1}
    for r in rows:
        if r["world"] > 1:
            r["tp_aware_speedup_vs_naive"] = round(r["naive_us"] / r["tp_aware_us"], 3)
            if r["m"] in one:
                r["scaling_efficiency"] = round(one[r["m"]] / (r["world"] * r["tp_aware_us"]), 3)
    for r in rows:
        print(json.dumps(r))
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"tp-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"bench": "bench_tp", "target": args.target, "quick": args.quick,
                   "note": args.note, "rows": rows}, f, indent=2)
    print(f"bench_tp: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
