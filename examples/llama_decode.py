"""Greedy decoding of a Llama-architecture model compiled by qcompiler, with a KV cache.

    .venv/bin/python examples/llama_decode.py [--target cpu] [--layers 2] [--small]
                                              [--checkpoint DIR] [--prompt-len 8] [--new 16]

The model is the Llama of ``decoder_models.py`` (GQA, rotary embeddings, SwiGLU, RMSNorm):
random weights at TinyLlama's widths (``--small``: tiny widths), or a local Hugging Face Llama
checkpoint directory (``--checkpoint``: config.json + *.safetensors). Two graphs are exported
with ``torch.onnx.export(dynamo=True)`` and quantized to 4 bits by onnxruntime's MatMulNBits
quantizer (block 32, symmetric):

- prefill: the prompt's token ids -> logits and the filled caches;
- decode: one token, its position and the caches -> logits and the caches one longer.

Both files are compiled for ``--target`` and run step by step: the argmax of the last logits is
the next token, and the caches returned by one step are the next step's inputs. Each step has
a new cache length, so each step is a new input signature for the plan (its shape functions
and kernel bindings are prepared once per signature; nothing is compiled at run time). On a
CUDA target the decode steps run in a **decode session** instead (``CompiledModule.session()``,
``codegen/cuda/kv_state.py``): the prefill's caches are given to it once and stay on the
device, updated in place; each step passes only the token and its position. onnxruntime runs
the same two files the same way; the script checks that both produce the same tokens and prints
qcompiler's decode speed in tokens per second (and onnxruntime's, for reference).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decoder_models as dm  # noqa: E402


def build_files(args, work: str) -> tuple[str, str, dict]:
    """The 4-bit prefill and decode ONNX files, and the model's config."""
    from minilm_onnx import quantize_matmulnbits

    if args.checkpoint:
        cfg = dm.llama_config_from_checkpoint(args.checkpoint)
    else:
        cfg = dict(dm.SMALL_LLAMA if args.small else dm.TINYLLAMA, layers=args.layers)
    files = {}
    for mode in ("prefill", True):
        model = dm.llama(**cfg, with_cache=mode)
        if args.checkpoint:
            dm.load_llama_checkpoint(model, args.checkpoint)
        name = "prefill" if mode == "prefill" else "decode"
        feeds = dm.llama_inputs(cfg, cfg["layers"], 1, 4 if mode == "prefill" else 1,
                                0 if mode == "prefill" else 4)
        fp32 = dm.export_onnx(model, feeds, os.path.join(work, f"{name}.fp32.onnx"))
        files[name] = quantize_matmulnbits(fp32, os.path.join(work, f"{name}.q4.onnx"))
    return files["prefill"], files["decode"], cfg


def generate(prefill, decode, prompt: np.ndarray, new_tokens: int,
             session=None) -> tuple[list, float]:
    """Greedy tokens after ``prompt`` and the seconds the decode steps took. ``prefill`` and
    ``decode`` map a feed dict to the list of outputs (logits, present_k, present_v).
    ``session``: a decode session of the decode model, which then runs the decode steps with
    the caches kept on the device (``decode`` unused)."""
    n = prompt.shape[1]
    logits, k, v = prefill({"input_ids": prompt,
                            "position_ids": np.arange(n, dtype=np.int64)[None]})
    tokens = [int(np.argmax(logits[0, -1]))]
    if session is not None:  # the prefill's caches, given once
        session.reset({"past_k": k, "past_v": v})
        step = 0
        start = time.perf_counter()
        while len(tokens) < new_tokens:
            logits, = session.step({"input_ids": np.array([[tokens[-1]]], np.int64),
                                    "position_ids": np.array([[n + step]], np.int64)}).values()
            tokens.append(int(np.argmax(logits[0, -1])))
            step += 1
        return tokens, time.perf_counter() - start
    # One step whose result is dropped: the first calls of a process (thread pool start-up,
    # first touch of the weights) are not what a long generation sees per token.
    decode({"input_ids": np.array([[tokens[-1]]], np.int64),
            "position_ids": np.array([[n]], np.int64), "past_k": k, "past_v": v})
    start = time.perf_counter()
    for step in range(new_tokens - 1):
        logits, k, v = decode({"input_ids": np.array([[tokens[-1]]], np.int64),
                               "position_ids": np.array([[n + step]], np.int64),
                               "past_k": k, "past_v": v})
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens, time.perf_counter() - start


def main(argv=None) -> int:
    import onnxruntime as ort

    import qcompiler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--layers", type=int, default=2, help="layers of the random model")
    ap.add_argument("--small", action="store_true", help="tiny widths (tests)")
    ap.add_argument("--checkpoint", help="a local Hugging Face Llama directory")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new", type=int, default=16, help="tokens to generate")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="qc_llama_")
    os.makedirs(work, exist_ok=True)
    prefill_file, decode_file, cfg = build_files(args, work)
    prompt = np.random.default_rng(0).integers(0, cfg["vocab"], (1, args.prompt_len),
                                               dtype=np.int64)

    qc_prefill = qcompiler.compile(prefill_file, target=args.target)
    qc_decode = qcompiler.compile(decode_file, target=args.target)
    # on a CUDA target the decode steps keep their caches on the device
    session = qc_decode.session() if args.target.startswith("cuda") else None
    ours, qc_s = generate(lambda f: list(qc_prefill.run(f).values()),
                          lambda f: list(qc_decode.run(f).values()), prompt, args.new, session)

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
                for p in (prefill_file, decode_file)]
    theirs, ort_s = generate(lambda f: sessions[0].run(None, f),
                             lambda f: sessions[1].run(None, f), prompt, args.new)

    steps = max(args.new - 1, 1)
    print(f"Llama {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads / "
          f"{cfg['kv_heads']} KV heads, 4-bit; prompt {args.prompt_len} tokens; "
          f"target {args.target}")
    print(f"qcompiler tokens:   {ours}")
    print(f"onnxruntime tokens: {theirs}")
    print(f"decode: qcompiler {steps / qc_s:.1f} tok/s, onnxruntime (1 thread) "
          f"{steps / ort_s:.1f} tok/s")
    same = ours == theirs
    print(f"same tokens as onnxruntime on the same files: {'yes' if same else 'no'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
