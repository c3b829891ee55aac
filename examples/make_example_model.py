"""Build the example model shipped in examples/: a small MLP quantized by onnxruntime.

    python examples/make_example_model.py      # rewrites examples/mlp_int4.onnx

A float MLP 64 → 128 → 128 → 32 (MatMul + Add + Gelu, symbolic batch) with fixed random
weights is quantized by onnxruntime's own MatMulNBits quantizer (4-bit, block 32, asymmetric),
so the example is what users bring from the field, not something qcompiler made.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))


def float_mlp(sizes=(64, 128, 128, 32), seed: int = 0, act: str = "Gelu",
              opset: int = 21) -> onnx.ModelProto:
    """A float MLP ``x[batch, sizes[0]] → y[batch, sizes[-1]]``: (MatMul, Add, act) per layer."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"fc{i}.mm"], name=f"fc{i}/MatMul"))
        nodes.append(helper.make_node("Add", [f"fc{i}.mm", f"fc{i}.bias"],
                                      ["y" if last else f"fc{i}.out"], name=f"fc{i}/Add"))
        if not last:
            nodes.append(helper.make_node(act, [f"fc{i}.out"], [f"act{i}"], name=f"act{i}/{act}"))
            prev = f"act{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14
    return model


def quantize_matmul_nbits(model: onnx.ModelProto, bits=4, block_size=32, symmetric=False,
                          accuracy_level=0) -> onnx.ModelProto:
    """onnxruntime's MatMulNBits quantizer (the format most 4-bit ONNX models use)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size,
                                 is_symmetric=symmetric, accuracy_level=accuracy_level)
    q.process()
    out = q.model.model
    out.ir_version = 10
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=os.path.join(HERE, "mlp_int4.onnx"))
    args = ap.parse_args()
    model = quantize_matmul_nbits(float_mlp())
    onnx.save(model, args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes)")


if __name__ == "__main__":
    main()
