"""torch.fx / torch.export frontend: modules → QIR → reference target, checked against torch.

Float graphs (linear, activations, layer norm, attention) must match torch to float32
rounding; quantized graphs written with ``quantized_decomposed`` ops (what PT2E's
convert_pt2e and torchao's 4-bit flows emit) must become ``qmatmul`` and match torch on the
same codes; ``quantize-weights`` on a float module must match torch with the same
round-to-nearest weights. Bad input gets a FrontendError that names the op and the node.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.ao.quantization.fx._decomposed  # noqa: E402,F401  (quantized_decomposed ops)
import torch.nn.functional as F  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.frontends.fx import FrontendError, load  # noqa: E402
from qcompiler.passes.quantize_weights import quantize_rtn  # noqa: E402

qd = torch.ops.quantized_decomposed


def _seeded(seed: int):
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _ops(module) -> dict:
    counts: dict = {}
    for n in module.main.nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def _qmatmuls(compiled):
    from qcompiler.driver.artifact import read_artifact

    module, _ = read_artifact(compiled.directory)
    return [n for n in module.main.nodes if n.op == "qmatmul"]


class MLP(torch.nn.Module):
    def __init__(self, k=64, h=96, n=32):
        super().__init__()
        self.fc1 = torch.nn.Linear(k, h)
        self.norm = torch.nn.LayerNorm(h)
        self.fc2 = torch.nn.Linear(h, h, bias=False)
        self.fc3 = torch.nn.Linear(h, n)

    def forward(self, x):
        h = F.gelu(self.norm(self.fc1(x)))
        h = F.silu(self.fc2(h)) + torch.relu(h) * torch.sigmoid(h) - torch.tanh(h)
        return torch.softmax(self.fc3(h), dim=-1), F.gelu(h, approximate="tanh").mean(-1)


class Attention(torch.nn.Module):
    """Multi-head self-attention with a padding mask, through F.scaled_dot_product_attention
    (and, with ``explicit=True``, written out by hand as eager BERT does)."""

    def __init__(self, d=64, heads=4, causal=False, explicit=False):
        super().__init__()
        self.heads, self.causal, self.explicit = heads, causal, explicit
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        keep = mask[:, None, None, :].to(torch.bool)
        if self.explicit:
            scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            y = torch.softmax(scores, dim=-1) @ v
        elif self.causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        y = y.transpose(1, 2).reshape(b, s, d)
        return self.norm(x + self.out(y))


# --------------------------------------------------------------------------------------------
# float graphs
# --------------------------------------------------------------------------------------------


def test_float_mlp_matches_torch_and_returns_tensors():
    _seeded(0)
    model = MLP().eval()
    x = torch.randn(5, 64)
    compiled = qcompiler.compile(model, example_inputs=(x,), target="ref")
    probs, mean = compiled(x)
    assert isinstance(probs, torch.Tensor) and isinstance(mean, torch.Tensor)
    want_probs, want_mean = model(x)
    torch.testing.assert_close(probs, want_probs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, want_mean.detach(), rtol=1e-5, atol=1e-6)
    module = load(model, (x,))
    ops = _ops(module)
    assert ops["matmul"] == 3 and ops["layernorm"] == 1 and ops["gelu"] == 2
    assert [a.name for a in module.main.args] == ["x"]
    assert module.main.output_names == ["output_0", "output_1"]


@pytest.mark.parametrize("variant", ["sdpa_mask", "sdpa_causal", "explicit"])
def test_attention_matches_torch(variant):
    _seeded(1)
    model = Attention(causal=variant == "sdpa_causal", explicit=variant == "explicit").eval()
    x = torch.randn(2, 7, 64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    compiled = qcompiler.compile(model, example_inputs=(x, mask), target="ref")
    got = compiled(x, mask)
    with torch.no_grad():
        want = model(x, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _MHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _batchnorm():
    bn = torch.nn.BatchNorm1d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return bn


COMMON_MODULES = {
    "multihead_attention": _MHA,
    "transformer_encoder_layer": lambda: torch.nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, batch_first=True, activation="gelu"),
    "rms_norm": lambda: torch.nn.RMSNorm(32),
    "batch_norm_eval": _batchnorm,
    "activations": lambda: torch.nn.Sequential(
        torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.LeakyReLU(0.1), torch.nn.Hardtanh(),
        torch.nn.SiLU(), torch.nn.Tanh(), torch.nn.Sigmoid(), torch.nn.GELU(),
        torch.nn.Softmax(-1), torch.nn.Dropout(), torch.nn.Flatten(), torch.nn.Identity()),
}


@pytest.mark.parametrize("name", sorted(COMMON_MODULES))
def test_common_torch_modules_match_torch(name):
    _seeded(8)
    model = COMMON_MODULES[name]().eval()
    x = torch.randn(2, 5, 32) * 2
    compiled = qcompiler.compile(model, example_inputs=(x,), target="ref")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_symbolic_trace_graph_module_and_exported_program():
    _seeded(2)
    model = MLP().eval()
    x = torch.randn(3, 64)
    gm = torch.fx.symbolic_trace(model)
    want = model(x)[0].detach()
    got = qcompiler.compile(gm, example_inputs=(x,), target="ref")(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ep = torch.export.export(model, (x,))
    compiled = qcompiler.compile(ep, target="ref")  # example inputs come from the program
    torch.testing.assert_close(compiled(x)[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exported program"):
        compiled(torch.randn(4, 64))


def test_new_input_shapes_recompile():
    _seeded(3)
    model = Attention(explicit=True).eval()
    x, mask = torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.int64)
    compiled = qcompiler.compile(model, example_inputs=(x, mask), target="ref")
    x2, mask2 = torch.randn(3, 9, 64), torch.ones(3, 9, dtype=torch.int64)
    mask2[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(x2, mask2), model(x2, mask2), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(x, mask), model(x, mask), rtol=1e-4, atol=1e-5)
    assert "2 shape(s)" in repr(compiled)


def test_embedding_index_and_reductions():
    """The ops HF encoders use to build masks and pool: embedding, index, where, sum, norm."""
    _seeded(4)

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.register_buffer("pos", torch.arange(32).unsqueeze(0))

        def forward(self, ids, mask):
            s = ids.shape[1]
            h = self.emb(ids) + self.emb(self.pos[:, :s])
            rows = torch.arange(ids.shape[0])[:, None]
            cols = torch.arange(s)[None, :]
            keep = (mask[rows, cols] >= 1) & (cols >= 0)
            h = torch.where(keep[..., None], h, torch.zeros((), dtype=h.dtype))
            m = mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return F.normalize(e, p=2.0, dim=1), torch.gather(
                h, 1, (ids[..., None] >= 25).to(torch.int64).expand(-1, -1, 16))

    model = Pool().eval()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]])
    got = qcompiler.compile(model, example_inputs=(ids, mask), target="ref")(ids, mask)
    with torch.no_grad():
        want = model(ids, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_weights_on_a_float_module_matches_torch_with_rtn_weights(symmetric):
    _seeded(5)
    model = MLP().eval()
    x = torch.randn(4, 64)
    sym = "true" if symmetric else "false"
    passes = f"quantize-weights{{bits=4,group=32,symmetric={sym}}},canonicalize,fuse-dequant"
    compiled = qcompiler.compile(model, example_inputs=(x,), target="ref", passes=passes)
    qmms = _qmatmuls(compiled)
    assert len(qmms) == 3
    assert all(q.attrs["w_scheme"].block_size == 32 for q in qmms)
    # The same round-to-nearest weights, put back into torch.
    fake = MLP().eval()
    fake.load_state_dict(model.state_dict())
    with torch.no_grad():
        for lin in (fake.fc1, fake.fc2, fake.fc3):
            w = lin.weight.detach().numpy().T  # [K, N]
            codes, scale, zp = quantize_rtn(w, 4, 32, 0, symmetric)
            s = np.repeat(scale, 32, axis=0)
            z = 0 if zp is None else np.repeat(zp, 32, axis=0).astype(np.float32)
            lin.weight.copy_(torch.from_numpy(((codes - z) * s).T.astype(np.float32)))
    got = compiled(x)[0]
    torch.testing.assert_close(got, fake(x)[0].detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, model(x)[0].detach(), atol=1e-6)  # quantization did happen


class GroupWise4Bit(torch.nn.Module):
    """A linear layer the way torchao / ExecuTorch 4-bit weight-only and 8da4w write it:
    int8-stored codes in [-8, 7] (or [0, 15]), per-channel-group scales and zero points."""

    def __init__(self, n=48, k=128, group=32, signed=True, act_qdq=False):
        super().__init__()
        lo, hi = (-8, 7) if signed else (0, 15)
        self.lo, self.hi, self.group, self.act_qdq = lo, hi, group, act_qdq
        self.register_buffer("codes", torch.randint(lo, hi + 1, (n, k), dtype=torch.int8))
        self.register_buffer("scales", torch.rand(n, k // group) * 0.05 + 0.01)
        zp = torch.randint(lo // 2, hi // 2 + 1, (n, k // group), dtype=torch.int8)
        self.register_buffer("zeros", zp)
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        if self.act_qdq:  # static per-tensor int8 activations, as convert_pt2e writes them
            x = qd.quantize_per_tensor(x, 0.04, 3, -128, 127, torch.int8)
            x = qd.dequantize_per_tensor(x, 0.04, 3, -128, 127, torch.int8)
        w = qd.dequantize_per_channel_group(self.codes, self.scales, self.zeros, self.lo,
                                            self.hi, torch.int8, self.group, torch.float32)
        return F.linear(x, w, self.bias)


@pytest.mark.parametrize("signed,act_qdq", [(True, False), (False, False), (True, True)])
def test_per_channel_group_4bit_becomes_qmatmul(signed, act_qdq):
    _seeded(6)
    model = GroupWise4Bit(signed=signed, act_qdq=act_qdq).eval()
    x = torch.randn(6, 128)
    compiled = qcompiler.compile(model, example_inputs=(x,), target="ref")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (q,) = _qmatmuls(compiled)
    scheme = q.attrs["w_scheme"]
    assert scheme.dtype.name == ("i4" if signed else "u4")
    assert (scheme.granularity, scheme.axis, scheme.block_size) == ("group", 0, 32)
    assert q.arg("w").type.shape == (128, 48)  # [K, N] codes
    assert q.arg("bias") is not None  # the bias was fused


def test_pt2e_style_graph_module_from_export():
    """convert_pt2e hands back ``ExportedProgram.module()``: a GraphModule with get_attr
    weights and quantized_decomposed nodes. It is traced again and imported the same way."""
    _seeded(9)
    model = GroupWise4Bit(act_qdq=True).eval()
    x = torch.randn(3, 128)
    gm = torch.export.export(model, (x,)).module()
    assert isinstance(gm, torch.fx.GraphModule)
    assert any("dequantize_per_channel_group" in str(n.target) for n in gm.graph.nodes)
    compiled = qcompiler.compile(gm, example_inputs=(x,), target="ref")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(_qmatmuls(compiled)) == 1


def test_per_channel_int8_weights_and_static_activations():
    _seeded(7)

    class PerChannel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randint(-127, 128, (24, 40), dtype=torch.int8))
            self.register_buffer("s", torch.rand(24) * 0.01 + 0.001)
            self.register_buffer("z", torch.zeros(24, dtype=torch.int64))

        def forward(self, x):
            x = qd.quantize_per_tensor(x, 0.02, 0, -128, 127, torch.int8)
            x = qd.dequantize_per_tensor(x, 0.02, 0, -128, 127, torch.int8)
            w = qd.dequantize_per_channel(self.w, self.s, self.z, 0, -127, 127, torch.int8)
            return F.linear(x, w)

    model = PerChannel().eval()
    x = torch.randn(5, 40)
    compiled = qcompiler.compile(model, example_inputs=(x,), target="ref")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (q,) = _qmatmuls(compiled)
    assert q.attrs["act"] == "static"  # an integer product: i8 activations × i8 weights
    assert q.attrs["w_scheme"].granularity == "channel" and q.attrs["w_scheme"].axis == 1


def test_quantize_with_narrow_range_clamps_like_torch():
    class Narrow(torch.nn.Module):
        def forward(self, x):
            q = qd.quantize_per_tensor(x, 0.1, 0, -7, 7, torch.int8)
            return qd.dequantize_per_tensor(q, 0.1, 0, -7, 7, torch.int8)

    x = torch.linspace(-2, 2, 41)
    got = qcompiler.compile(Narrow(), example_inputs=(x,), target="ref")(x)
    torch.testing.assert_close(got, Narrow()(x))
    assert got.min().item() == pytest.approx(-0.7) and got.max().item() == pytest.approx(0.7)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_unsupported_op_names_op_and_node():
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3)

        def forward(self, x):
            return torch.cumsum(self.conv(x), dim=-1)

    with pytest.raises(FrontendError) as e:
        load(Conv().eval(), (torch.randn(1, 4, 8),))
    msg = str(e.value)
    assert "fx node 'conv1d' (aten.conv1d.default): unsupported op" in msg
    assert "Supported: " in msg and "linear" in msg


def test_missing_example_inputs_and_training_mode():
    with pytest.raises(FrontendError, match="example_inputs"):
        qcompiler.compile(MLP().eval(), target="ref")

    class Drop(torch.nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=True)

    with pytest.raises(FrontendError, match=r"dropout.*eval\(\)"):
        load(Drop(), (torch.randn(2, 3),))


def test_wrong_call_is_a_clear_error():
    model = MLP().eval()
    compiled = qcompiler.compile(model, example_inputs=(torch.randn(2, 64),), target="ref")
    with pytest.raises(TypeError, match="tensors"):
        compiled(np.zeros((2, 64), np.float32))
