"""Quickstart: compile the shipped 4-bit MLP, run it, and compare with onnxruntime.

    python examples/quickstart.py [--target cpu] [--batch 4]

The model (examples/mlp_int4.onnx) is a 3-layer MLP whose weights onnxruntime's own
quantizer turned into 4-bit MatMulNBits. qcompiler imports it, fuses each dequantize into
a ``qmatmul``, writes the artifact to qc_out/ and runs it. The default target ``cpu`` is this
machine: each qmatmul becomes a TVM TensorIR kernel compiled by LLVM for the detected CPU
(``qc_out/kernels/*.so``, with the scheduled TensorIR beside it in ``*.tir.py``); ``--target ref``
runs the exact numpy reference instead.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import qcompiler

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "mlp_int4.onnx")


def main() -> None:
    ap = argparse.ArgumentParser(description="compile and run the example model")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("-o", "--output", default="qc_out")
    args = ap.parse_args()

    compiled = qcompiler.compile(MODEL, target=args.target, output_dir=args.output)
    print(f"compiled {os.path.relpath(MODEL)} for {args.target} -> {args.output}/")
    with open(os.path.join(args.output, "report.txt")) as f:
        print(f.read())

    x = np.random.default_rng(1).standard_normal((args.batch, 64)).astype(np.float32)
    ours = compiled.run({"x": x})["y"]

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(MODEL, so, providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {"x": x})[0]

    np.set_printoptions(precision=5, suppress=True, linewidth=100)
    print("first row, first 8 outputs")
    print("  qcompiler  :", ours[0, :8])
    print("  onnxruntime:", theirs[0, :8])
    err = np.abs(ours - theirs).max()
    print(f"max |qcompiler - onnxruntime| over {ours.size} outputs: {err:.3g} "
          f"(outputs up to {np.abs(theirs).max():.3g})")


if __name__ == "__main__":
    main()
