"""Decoder-only language models with random weights, for tests and benchmarks.

    .venv/bin/python examples/decoder_models.py --arch llama --layers 2 --small [--target cpu]

- ``gpt2(...)``: the Hugging Face GPT-2 architecture (``transformers.GPT2LMHeadModel``, eager
  attention, no cache): learned positions, LayerNorm, GELU (tanh) MLP, causal attention.
- ``llama(...)``: a Llama-architecture model written out here with an explicit KV cache as
  inputs and outputs, so that one decode step exports as a plain graph: RMSNorm, rotary
  embeddings (cos/sin tables indexed by the position ids, so no Cos/Sin at run time),
  grouped-query attention (``kv_heads < heads``, k/v repeated over heads as Hugging Face's
  ``repeat_kv`` does), SwiGLU MLP, causal masking against the cache.
  ``forward(input_ids [B, S], position_ids [B, S], past_k, past_v)`` with the caches stacked
  over layers: ``[layers, B, kv_heads, P, head_dim]``; returns logits and the caches with the
  new keys/values appended (``[layers, B, kv_heads, P + S, head_dim]``). ``with_cache=False``
  builds the prefill model without cache inputs (logits only); ``with_cache="prefill"`` the
  first step of generation: no cache inputs, logits and the filled caches out.
  ``load_llama_checkpoint`` fills it from a local Hugging Face Llama directory.

``export_onnx`` writes either through ``torch.onnx.export`` with ``dynamo=True`` or ``False``.
Weights are random (seeded): these models measure speed and check numerics; they say nothing
of accuracy on text.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np

TINYLLAMA = dict(vocab=32000, hidden=2048, heads=32, kv_heads=4, intermediate=5632)
SMALL_LLAMA = dict(vocab=256, hidden=64, heads=4, kv_heads=2, intermediate=160)


def gpt2(layers: int = 12, hidden: int = 768, heads: int = 12, vocab: int = 50257,
         positions: int = 1024, seed: int = 0):
    """A GPT-2 LM (transformers) with random weights, eval mode, eager attention."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab,
                     n_positions=positions, use_cache=False, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()

    class LogitsOnly(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits

    return LogitsOnly(model).eval()


def llama(layers: int = 4, vocab: int = 32000, hidden: int = 2048, heads: int = 32,
          kv_heads: int = 4, intermediate: int = 5632, max_positions: int = 2048,
          rope_theta: float = 10000.0, eps: float = 1e-5, with_cache: bool = True,
          seed: int = 0):
    """A Llama-architecture LM with random weights (see the module docstring)."""
    import torch
    from torch import nn

    head_dim = hidden // heads
    groups = heads // kv_heads

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden))

        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(var + eps) * self.weight

    def rotate_half(x):
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def repeat_kv(x):  # [B, KV, T, D] -> [B, KV * groups, T, D]
        b, kv, t, d = x.shape
        x = x[:, :, None, :, :].expand(b, kv, groups, t, d)
        return x.reshape(b, kv * groups, t, d)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_norm = RMSNorm()
            self.q = nn.Linear(hidden, heads * head_dim, bias=False)
            self.k = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.v = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.o = nn.Linear(heads * head_dim, hidden, bias=False)
            self.post_norm = RMSNorm()
            self.gate = nn.Linear(hidden, intermediate, bias=False)
            self.up = nn.Linear(hidden, intermediate, bias=False)
            self.down = nn.Linear(intermediate, hidden, bias=False)

        def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
            b, s, _ = x.shape
            h = self.input_norm(x)
            q = self.q(h).view(b, s, heads, head_dim).transpose(1, 2)
            k = self.k(h).view(b, s, kv_heads, head_dim).transpose(1, 2)
            v = self.v(h).view(b, s, kv_heads, head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if past_k is not None:
                k = torch.cat([past_k, k], dim=2)
                v = torch.cat([past_v, v], dim=2)
            scores = torch.matmul(q, repeat_kv(k).transpose(2, 3)) / math.sqrt(head_dim)
            probs = torch.softmax(scores + mask, dim=-1)
            attn = torch.matmul(probs, repeat_kv(v)).transpose(1, 2).reshape(b, s, hidden)
            x = x + self.o(attn)
            h = self.post_norm(x)
            x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
            return x, k, v

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = RMSNorm()
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
            inv = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
            ang = torch.outer(torch.arange(max_positions).float(), inv)
            ang = torch.cat([ang, ang], dim=-1)
            self.register_buffer("cos_table", ang.cos(), persistent=False)
            self.register_buffer("sin_table", ang.sin(), persistent=False)

        def _run(self, input_ids, position_ids, past_k, past_v):
            x = self.embed(input_ids)
            cos = self.cos_table[position_ids].unsqueeze(1)  # [B, 1, S, D]
            sin = self.sin_table[position_ids].unsqueeze(1)
            s = input_ids.shape[1]
            past = 0 if past_k is None else past_k.shape[3]
            # key j is visible to query i when j <= past + i (causal against the cache)
            qpos = torch.arange(s, device=input_ids.device)[:, None] + past
            kpos = torch.arange(past + s, device=input_ids.device)[None, :]
            # float's lowest (f32: -3.4028234663852886e38, what the ONNX export holds; an fp16
            # run of the same module, under torch.set_default_dtype(float16), gets -65504)
            mask = torch.where(kpos <= qpos, 0.0, torch.finfo(torch.get_default_dtype()).min)
            new_k, new_v = [], []
            for i, block in enumerate(self.blocks):
                pk = None if past_k is None else past_k[i]
                pv = None if past_v is None else past_v[i]
                x, k, v = block(x, cos, sin, mask, pk, pv)
                new_k.append(k)
                new_v.append(v)
            logits = self.lm_head(self.norm(x))
            return logits, torch.stack(new_k), torch.stack(new_v)

    class LlamaWithCache(Llama):
        def forward(self, input_ids, position_ids, past_k, past_v):
            return self._run(input_ids, position_ids, past_k, past_v)

    class LlamaPrefill(Llama):
        def forward(self, input_ids, position_ids):
            return self._run(input_ids, position_ids, None, None)[0]

    class LlamaPrefillWithCache(Llama):
        """The prompt's logits and the caches it fills (the first step of generation)."""

        def forward(self, input_ids, position_ids):
            return self._run(input_ids, position_ids, None, None)

    if with_cache == "prefill":
        return LlamaPrefillWithCache().eval()
    return (LlamaWithCache if with_cache else LlamaPrefill)().eval()


# Hugging Face Llama checkpoint names -> this module's names (``load_llama_checkpoint``).
_HF_NAMES = [("model.embed_tokens.", "embed."), ("model.norm.", "norm."), ("lm_head.", "lm_head."),
             ("self_attn.q_proj.", "q."), ("self_attn.k_proj.", "k."), ("self_attn.v_proj.", "v."),
             ("self_attn.o_proj.", "o."), ("mlp.gate_proj.", "gate."), ("mlp.up_proj.", "up."),
             ("mlp.down_proj.", "down."), ("input_layernorm.", "input_norm."),
             ("post_attention_layernorm.", "post_norm."), ("model.layers.", "blocks.")]


def llama_config_from_checkpoint(path: str) -> dict:
    """``llama(**cfg)`` keyword arguments from a Hugging Face Llama directory's config.json."""
    import json
    import os

    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    return {"layers": c["num_hidden_layers"], "vocab": c["vocab_size"],
            "hidden": c["hidden_size"], "heads": c["num_attention_heads"],
            "kv_heads": c.get("num_key_value_heads", c["num_attention_heads"]),
            "intermediate": c["intermediate_size"], "rope_theta": c.get("rope_theta", 10000.0),
            "eps": c.get("rms_norm_eps", 1e-5),
            "max_positions": c.get("max_position_embeddings", 2048)}


def load_llama_checkpoint(model, path: str) -> None:
    """Copy a local Hugging Face Llama checkpoint (safetensors) into ``model`` (from ``llama``
    with ``llama_config_from_checkpoint(path)``). Tied embeddings fill lm_head."""
    import glob
    import os

    import torch
    from safetensors.torch import load_file

    state = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        for name, t in load_file(f).items():
            for hf, ours in _HF_NAMES:
                name = name.replace(hf, ours)
            state[name] = t.to(torch.float32)
    if "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the Llama architecture "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")


def llama_inputs(model_cfg: dict, layers: int, batch: int, seq: int, past: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for ``llama``: token ids, positions continuing after ``past`` cached tokens, and
    random caches (``past`` may be 0 only for the prefill model, which takes no caches)."""
    rng = np.random.default_rng(seed)
    head_dim = model_cfg["hidden"] // model_cfg["heads"]
    feeds = {"input_ids": rng.integers(0, model_cfg["vocab"], (batch, seq), dtype=np.int64),
             "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64),
                                             (batch, seq)).copy()}
    if past:
        shape = (layers, batch, model_cfg["kv_heads"], past, head_dim)
        feeds["past_k"] = rng.standard_normal(shape).astype(np.float32)
        feeds["past_v"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def export_onnx(model, feeds: dict[str, np.ndarray], path: str, dynamo: bool = True,
                dynamic: bool = True) -> str:
    """Export with ``torch.onnx.export``; batch and sequence dims dynamic when ``dynamic``."""
    import onnx
    import torch

    args = tuple(torch.from_numpy(v) for v in feeds.values())
    names = list(feeds)
    kwargs = {}
    if dynamic:
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            past = torch.export.Dim("past")
            shapes = []
            for n in names:
                shapes.append({1: batch, 3: past} if n.startswith("past_")
                              else {0: batch, 1: seq})
            # past_* are [layers, B, KV, P, D]: B is dim 1 there.
            kwargs["dynamic_shapes"] = tuple(shapes)
        else:
            kwargs["dynamic_axes"] = {n: ({1: "batch", 3: "past"} if n.startswith("past_")
                                          else {0: "batch", 1: "seq"}) for n in names}
    torch.onnx.export(model, args, path, dynamo=dynamo, input_names=names,
                      opset_version=18 if dynamo else 17, **kwargs)
    proto = onnx.load(path)
    # onnx 1.23 stamps IR 14; onnxruntime 1.31 reads IR <= 13.
    proto.ir_version = min(proto.ir_version, onnx.helper.find_min_ir_version_for(
        proto.opset_import, ignore_unknown=True))
    # Past 2 GB (a 1.1B-parameter model in f32) a protobuf can't hold the weights: they go
    # to one external data file beside the model, which onnx and onnxruntime load from there.
    large = sum(t.ByteSize() for t in proto.graph.initializer) > 1_800_000_000
    onnx.save(proto, path, save_as_external_data=large, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data")
    return path


def main(argv=None) -> int:
    """Export one model, compile it, run it beside onnxruntime on the same file."""
    import onnxruntime as ort

    import qcompiler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="llama")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny widths (tests)")
    ap.add_argument("--legacy-exporter", action="store_true", help="torch.onnx dynamo=False")
    ap.add_argument("--target", default="ref")
    ap.add_argument("--out", default="decoder.onnx")
    a = ap.parse_args(argv)
    if a.arch == "gpt2":
        model = gpt2(layers=a.layers, hidden=64 if a.small else 768, heads=4 if a.small else 12,
                     vocab=256 if a.small else 50257)
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, 256 if a.small else 50257, (1, 8), dtype=np.int64)}
    else:
        cfg = SMALL_LLAMA if a.small else TINYLLAMA
        model = llama(layers=a.layers, **cfg)
        feeds = llama_inputs(cfg, a.layers, 1, 1, 8)  # one decode step after 8 cached tokens
    export_onnx(model, feeds, a.out, dynamo=not a.legacy_exporter)
    want = ort.InferenceSession(a.out, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = list(qcompiler.compile(a.out, target=a.target).run(feeds).values())
    diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    print(f"{a.arch} ({a.layers} layers) exported to {a.out}, compiled for {a.target}")
    print(f"max |qcompiler - onnxruntime| = {diff:.3g}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
