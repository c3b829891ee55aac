"""all-MiniLM-L6-v2 through torch.fx: torch module → quantize → compile → compare with torch.

    .venv/bin/python examples/minilm_fx.py [--target ref] [--sentences 16]

``qcompiler.compile(module, example_inputs=...)`` traces the module with ``torch.export``,
imports the ATen graph (the torch.fx frontend), runs ``quantize-weights`` in front of the
target's pipeline and returns a callable that takes and returns torch tensors. The compiled
module is specialized to the shapes of the example inputs; calling it with other shapes
compiles again (so pad batches to one length if you call it often).

A second part builds a PT2E-style graph by hand — 4-bit codes dequantized with
``quantized_decomposed.dequantize_per_channel_group`` as torchao / ExecuTorch write them — and
shows that qcompiler imports those codes as they are (no requantization).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_onnx import SENTENCES, cosines, load_minilm, qc_quant_pipeline, tokenize  # noqa: E402


def minilm(target: str, n_sentences: int) -> float:
    import torch

    import qcompiler

    tokenizer, model = load_minilm()
    feeds = tokenize(tokenizer, SENTENCES[:n_sentences])
    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    with torch.no_grad():
        want = model(ids, mask).numpy()
    print(f"{len(ids)} sentences, padded length {ids.shape[1]}, target {target}")
    print(f"{'model':<28} {'vs torch mean':>13} {'min':>7} {'compile s':>9} {'run s':>6}")
    worst = 1.0
    for name, passes in [
            ("float (no quantization)", None),
            ("4-bit b32 symmetric", qc_quant_pipeline(target, group=32, symmetric=True)),
            ("4-bit b128 asymmetric", qc_quant_pipeline(target, group=128, symmetric=False))]:
        t0 = time.perf_counter()
        compiled = qcompiler.compile(model, example_inputs=(ids, mask), target=target,
                                     passes=passes)
        t1 = time.perf_counter()
        got = compiled(ids, mask)  # torch tensors in, a torch tensor out
        t2 = time.perf_counter()
        c = cosines(got.numpy(), want)
        worst = min(worst, c.min())
        print(f"{name:<28} {c.mean():>13.4f} {c.min():>7.4f} {t1 - t0:>9.2f} {t2 - t1:>6.2f}")
    return worst


def pt2e_style(target: str) -> float:
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)
    import torch.nn.functional as F

    import qcompiler

    qd = torch.ops.quantized_decomposed
    torch.manual_seed(0)

    class Int4Linear(torch.nn.Module):
        def __init__(self, n=256, k=384, group=32):
            super().__init__()
            self.group = group
            self.register_buffer("codes", torch.randint(-8, 8, (n, k), dtype=torch.int8))
            self.register_buffer("scales", torch.rand(n, k // group) * 0.02)
            self.register_buffer("zeros", torch.zeros(n, k // group, dtype=torch.int8))

        def forward(self, x):
            w = qd.dequantize_per_channel_group(self.codes, self.scales, self.zeros, -8, 7,
                                                torch.int8, self.group, torch.float32)
            return F.gelu(F.linear(x, w))

    model = Int4Linear().eval()
    x = torch.randn(8, 384)
    compiled = qcompiler.compile(model, example_inputs=(x,), target=target)
    with open(os.path.join(compiled.directory, "module.qir")) as f:
        qmm = next(line.strip() for line in f if "qmatmul(" in line)
    err = (compiled(x) - model(x)).abs().max().item()
    print("\nPT2E-style int4 linear (dequantize_per_channel_group) imported as:")
    print("  " + qmm[:160] + ("..." if len(qmm) > 160 else ""))
    print(f"  max |qcompiler - torch| = {err:.3g}")
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="ref")
    ap.add_argument("--sentences", type=int, default=len(SENTENCES))
    args = ap.parse_args(argv)
    worst = minilm(args.target, args.sentences)
    err = pt2e_style(args.target)
    ok = worst >= 0.93 and err < 1e-4
    print("within the expected 4-bit loss and exact on PT2E codes:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
