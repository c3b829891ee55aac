"""Tune and replay: autotune the kernels of a model once, then compile from the tuning log.

    .venv/bin/python examples/tune_and_replay.py [--target T] [--trials 8] [--out qc_tune]

1. ``qcompiler.tune(model, target, tuning_log=LOG)`` measures candidate configs of every
   distinct kernel on the target's device (each checked against the reference before it may
   win) and appends one JSON line per candidate to LOG;
2. ``qcompiler.compile(model, target, tuning_log=LOG)`` replays the best verified config per
   kernel: no measuring, the same configs every time. The compiled IR says where each
   config came from (``"tuning-log"`` instead of ``"heuristic"``).

The CLI does the same: ``qcompile model.onnx --target T --tune --tuning-log LOG -o out/``
to tune, and ``qcompile model.onnx --target T --tuning-log LOG -o out/`` to replay.

The model is a 4-bit ReLU MLP that this script writes (float ONNX, quantized by qcompiler's
``quantize-weights``). The default target is the first that can be tuned here: ``cpu`` (TVM)
where it is available, else the FPGA part ``fpga-zcu104`` (tuned against its cost model, as
no FPGA is attached). CUDA targets tune on a GPU machine only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import qcompiler
from qcompiler.targets import get_target


def make_mlp(path: str, sizes=(256, 512, 512, 128), seed: int = 0) -> str:
    """A float MatMul + Add + Relu MLP as ONNX (input ``x``: [batch, sizes[0]])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"])]
        prev = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "relu_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                          ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def default_target() -> str:
    """cpu where its backend is built and has a config-choosing (tuning) pass, else an FPGA."""
    from qcompiler.tuning.tuner import tuning_pass_of

    try:
        cpu = get_target("cpu")
        if cpu.available and tuning_pass_of(cpu):
            return "cpu"
    except KeyError:
        pass
    return "fpga-zcu104"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="default: cpu if available, else an FPGA")
    ap.add_argument("--trials", type=int, default=8, help="candidates per kernel")
    ap.add_argument("--out", default="qc_tune", help="tuning output directory")
    ap.add_argument("--no-run", action="store_true",
                    help="check the replayed configs only (an FPGA C simulation builds slowly)")
    args = ap.parse_args(argv)
    target = args.target or default_target()
    os.makedirs(args.out, exist_ok=True)
    model = make_mlp(os.path.join(args.out, "relu_mlp.onnx"))
    # Quantize in front of the target's own pipeline, for tuning and compiling alike.
    quantize = "quantize-weights{bits=4,group=32,symmetric=true}"
    passes = f"{quantize},{get_target(target).default_pipeline}"
    log = os.path.join(args.out, "tuning_log.jsonl")

    summary = qcompiler.tune(model, target, output_dir=args.out, tuning_log=log,
                             trials=args.trials, passes=passes, progress=False, plots=False)
    print(f"tuned {len(summary['kernels'])} kernel(s) for {target} on {summary['device']} "
          f"in {summary['seconds']:.1f} s; log {log}")
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    ok = [r for r in records if r.get("status") == "ok"]
    print(f"log: {len(records)} records, {len(ok)} ok")

    compiled = qcompiler.compile(model, target=target, passes=passes, tuning_log=log)
    with open(os.path.join(compiled.directory, "module.qir")) as f:
        sources = [line for line in f if "qmatmul(" in line]
    from_log = sum('"tuning-log"' in line for line in sources)
    print(f"replayed: {from_log} of {len(sources)} qmatmul configs came from the tuning log")

    if args.no_run:
        return 0 if from_log == len(sources) > 0 else 1
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    y = compiled.run({"x": x})["y"]
    want = qcompiler.compile(model, target="ref", passes=f"{quantize},canonicalize,fuse-dequant"
                             ).run({"x": x})["y"]
    err = float(np.abs(y - want).max())
    scale = float(np.abs(want).max())
    print(f"max |{target} - reference| = {err:.3g} (outputs up to {scale:.3g})")
    # FPGA designs compute in fixed point: a small, bounded error; CPU/GPU: float rounding.
    good = from_log == len(sources) > 0 and err <= 0.05 * scale
    print("tuned configs replayed and results checked:", "yes" if good else "NO")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
