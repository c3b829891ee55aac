"""A KV cache laid out for a capacity: the kernels that read its padding word (qkv_heads and
decode attention, ``PAD_AWARE_OPS``), run in host emulation (tests/cuda_host/emulator).

A decode graph shared by every cache length up to a capacity (``codegen/cuda/plan.py``)
launches these kernels with the capacity's shapes and a device word holding the padding rows:
the past [L, B, Hkv, cap, D] holds P = cap - pad rows per head, then garbage; qkv_heads must
copy the P rows and put the new row at P (not at cap), and attention must read P + 1 keys of
its cap + 1. The garbage here is NaN: a kernel that reads one row too many fails the test.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cuda_emulation import build_emulated, call_emulated
from qcompiler.codegen.cuda.ops import kernel_source
from qcompiler.codegen.cuda.plan import CACHE_PADDING, CudaPlanRunner
from qcompiler.ir.core import Function, Module
from qcompiler.ir.types import tensor
from qcompiler.runtime.reference import OP_IMPLS
# (llama_decode: a module-scoped fixture, used by the runner's tests below)
from test_cuda_plan_signatures import _CopyLauncher, _llama_runner, _rows, llama_decode  # noqa: F401

L, B, LAYER = 2, 2, 1


def _nodes(hq: int, hkv: int, d: int, dtype: str):
    module = Module("padded")
    fn = module.add_function(Function("main"))
    qkv = fn.add_arg("qkv", tensor([B, 1, (hq + 2 * hkv) * d], dtype))
    cos = fn.add_arg("cos", tensor([300, d // 2], dtype))
    sin = fn.add_arg("sin", tensor([300, d // 2], dtype))
    pos = fn.add_arg("pos", tensor([B, 1], "i64"))
    past = [fn.add_arg(n, tensor([L, B, hkv, "past", d], dtype)) for n in ("pk", "pv")]
    heads = fn.make_node("qkv_heads", [qkv, cos, sin, pos] + past,
                         [tensor([B, 1, hq, d], dtype), tensor([B, hkv, "t", d], dtype),
                          tensor([B, hkv, "t", d], dtype)],
                         {"num_heads": hq, "kv_heads": hkv, "interleaved": 0,
                          "rotary_embedding_dim": 0, "layer": LAYER}, names=["q", "k", "v"])
    att = fn.make_node("attention", list(heads.results), [tensor([B, 1, hq, d], dtype)],
                       {"scale": 1.0 / np.sqrt(d), "causal": 1, "q_bshd": 1, "y_bshd": 1},
                       names=["y"])
    return module, heads, att


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 2, 64), (2, 1, 12)],
                         ids=["gqa-mma", "gqa", "scalar"])
@pytest.mark.parametrize("valid,capacity", [(37, 64), (64, 64), (1, 40)])
def test_padded_cache_reads_only_its_rows(tmp_path, hq, hkv, d, valid, capacity):
    """(8, 2, 64): the tensor-core grouped-query decode kernel and 16-byte cache copies;
    (4, 2, 64): the grouped-query kernel on CUDA cores; (2, 1, 12): the one-head kernel with
    its split merge and element-wise copies. valid == capacity: a padding word of 0."""
    dtype = "f16"
    module, heads, att = _nodes(hq, hkv, d, dtype)
    sources = {"heads": kernel_source(heads, module), "att": kernel_source(att, module)}
    symbols = {key: symbol for key, (symbol, _) in sources.items()}
    lib = ctypes.CDLL(build_emulated([text for _, text in sources.values()], tmp_path))

    rng = np.random.default_rng(valid * 1000 + capacity + d)
    f16 = np.float16
    qkv = rng.standard_normal((B, 1, (hq + 2 * hkv) * d)).astype(f16)
    angles = rng.uniform(0, 2 * np.pi, (300, d // 2))
    cos, sin = np.cos(angles).astype(f16), np.sin(angles).astype(f16)
    pos = np.full((B, 1), valid, np.int64)
    past = [rng.standard_normal((L, B, hkv, valid, d)).astype(f16) for _ in range(2)]
    # the runner's layout: each head's rows padded to the capacity (garbage: NaN)
    padded = [np.full((L, B, hkv, capacity, d), np.nan, f16) for _ in range(2)]
    for p, x in zip(padded, past):
        p[:, :, :, :valid] = x

    want_q, want_k, want_v = OP_IMPLS["qkv_heads"](heads, [qkv, cos, sin, pos] + past, module)
    got_q, got_k, got_v = call_emulated(
        lib, symbols["heads"], [qkv, cos, sin, pos] + padded,
        [((B, 1, hq, d), f16), ((B, hkv, capacity + 1, d), f16),
         ((B, hkv, capacity + 1, d), f16)], pad=capacity - valid)
    np.testing.assert_array_equal(got_q, want_q)
    # the first valid + 1 rows are the cache; the rest was left alone (the outputs start as
    # 0xFF bytes: NaN)
    np.testing.assert_array_equal(got_k[:, :, :valid + 1], want_k)
    np.testing.assert_array_equal(got_v[:, :, :valid + 1], want_v)
    assert np.isnan(got_k[:, :, valid + 1:].astype(np.float32)).all()

    want_y, = OP_IMPLS["attention"](att, [want_q, want_k, want_v], module)
    # the keys past the cache: NaN (qkv_heads left them so)
    got_y, = call_emulated(lib, symbols["att"], [got_q, got_k, got_v], [((B, 1, hq, d), f16)],
                           pad=capacity - valid)
    np.testing.assert_allclose(got_y.astype(np.float64), want_y.astype(np.float64),
                               rtol=2e-3, atol=2e-3)
    # without the padding word the same call reads the NaN rows: the test can fail
    unpadded, = call_emulated(lib, symbols["att"], [got_q, got_k, got_v],
                              [((B, 1, hq, d), f16)])
    if valid < capacity:
        assert np.isnan(unpadded.astype(np.float32)).any()


# -- the runner: decode steps of every length up to a capacity share its signature ----------
# (recorders of test_cuda_plan_signatures.py: no GPU; the GPU test of the generation loop,
# test_cuda_gpu.py, checks the values)


class _RowsLauncher(_CopyLauncher):
    """Also records 2-D copies and the values copied into the padding word."""

    def __init__(self, log):
        super().__init__(log)
        self.copies2d, self.words, self.word = [], [], None

    def qc_copy_async(self, dst, src, nbytes, kind, stream):
        if dst == self.word:
            self.words.append(int(np.frombuffer(ctypes.string_at(src, 8), np.int64)[0]))
        return super().qc_copy_async(dst, src, nbytes, kind, stream)

    def qc_copy2d_async(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.copies2d.append((dpitch, spitch, width, height, kind))
        return 0


def _padded_runner(module, log):
    runner = _llama_runner(module, log)
    runner.launcher = _RowsLauncher(log)
    return runner


def _reads_word(sig, word) -> dict:
    """Per op of ``sig``'s launches, whether they read the padding word at ``word`` (the slot
    after their operands, before the spare null)."""
    out = {}
    for label, (parr, _) in zip(sig.labels, sig.keep):
        out.setdefault(label.split(" = ")[1], set()).add(len(parr) > 1 and parr[len(parr) - 2]
                                                          == word)
    return out


def test_decode_steps_share_their_capacity_signature(llama_decode):
    """A generation loop from a cache of 8 rows to 70: two signatures (capacities 64 and 128),
    each prepared once, its table enqueued at its first run, its graph captured at the second
    and replayed after; every token copies its padding (capacity - length) into the word, its
    caches into the capacity's rows (2-D copies, a row per head) and its presents out without
    the padding. Only qkv_heads and attention read the word."""
    module, feeds = llama_decode
    log = []
    runner = _padded_runner(module, log)
    prepared = []
    original = runner._prepare

    def counting(shapes, bound=None, padding=None):
        prepared.append((shapes["past_k"][3], padding is not None))
        return original(shapes, bound, padding)

    runner._prepare = counting
    f32 = 4
    for past in range(8, 71):
        before = len(runner.launcher.copies2d)
        out = runner(feeds(past))
        runner.launcher.word = runner.last_signature.slots[CACHE_PADDING]
        capacity = 64 if past <= 64 else 128
        assert [o.shape[3] for o in list(out.values())[1:]] == [past + 1] * 2, past
        # past_k, past_v in (pitch: the capacity's rows), presents out (capacity + 1 rows)
        rows = 2 * 1 * 2  # layers x batch x kv heads
        assert runner.launcher.copies2d[before:] == [
            (capacity * 32 * f32, past * 32 * f32, past * 32 * f32, rows, 1)] * 2 + [
            ((past + 1) * 32 * f32, (capacity + 1) * 32 * f32, (past + 1) * 32 * f32, rows, 2)] * 2
    assert prepared == [(64, True), (128, True)]
    sigs = runner._signatures
    shapes = {n: a.shape for n, a in feeds(8).items()}
    assert set(sigs) == {tuple(runner._padding.at(shapes, c)[n] for n in runner.plan.inputs)
                         for c in (64, 128)}
    assert all(s.padding is not None and s.graph is not None for s in sigs.values())
    kinds = [e[0] for e in log if e[0] in ("launch", "graph")]
    assert kinds == ["launch"] + ["graph"] * 56 + ["launch"] + ["graph"] * 5
    # the words (the first run's word was copied before the test knew its address)
    assert runner.launcher.words == [64 - p for p in range(9, 65)] + [128 - p for p in range(65, 71)]
    reads = _reads_word(runner.last_signature, runner.last_signature.slots[CACHE_PADDING])
    assert reads.pop("qkv_heads") == reads.pop("attention") == {True}
    assert all(r == {False} for r in reads.values()), reads


def test_other_steps_keep_their_exact_signatures(llama_decode, monkeypatch):
    """A prefill over a cache (5 new tokens: attention is not a decode) runs with its exact
    shapes and no padding word, and a decode step after it pads again: its rows are those of
    a capacity's signature prepared from nothing. With the padding off (QC_CUDA_PAD_CACHES=0)
    each length has its own signature."""
    module, feeds = llama_decode
    log = []
    runner = _padded_runner(module, log)
    runner(feeds(40, 5))
    exact = runner.last_signature
    assert exact.padding is None and tuple(a.shape for a in feeds(40, 5).values()) in \
        runner._signatures
    runner(feeds(45))
    padded = runner.last_signature
    word = padded.slots[CACHE_PADDING]
    assert _reads_word(exact, word)["attention"] == {False}
    assert padded.padding is not None and padded.padding.inputs == {"past_k": 3, "past_v": 3}
    shapes = {n: a.shape for n, a in feeds(64).items()}
    runner._layout = None
    scratch = runner._prepare(shapes, padding=padded.padding)
    assert _rows(padded) == _rows(scratch)
    # a table prepared from the padded one for exact shapes: no padding word left in it
    runner(feeds(45, 5))
    assert _reads_word(runner.last_signature, word)["qkv_heads"] == {False}

    monkeypatch.setattr(CudaPlanRunner, "pad_caches", False)
    plain = _padded_runner(module, [])
    for past in (45, 46):
        plain(feeds(past))
        assert plain.last_signature.padding is None
    assert plain._padding is None and len(plain._signatures) == 2


def test_the_cache_length_is_found_where_only_the_cache_reaches(llama_decode):
    """The decode step's cache length (``past``) reaches casts, qkv_heads, attention and the
    presents' concat only; the batch and the new tokens reach the GEMVs: not padded."""
    module, feeds = llama_decode
    runner = _padded_runner(module, [])
    runner._plan_index()
    padding = runner._padding
    assert padding.dim == "past" and padding.input_axes == {"past_k": 3, "past_v": 3}
    ops = {runner.plan.steps[i].op or runner.plan.steps[i].kind for i in padding.steps}
    assert {"qkv_heads", "attention", "cast", "concat"} <= ops <= {
        "qkv_heads", "attention", "cast", "concat", "copy"}
    assert padding.capacity(1) == padding.capacity(64) == 64 and padding.capacity(65) == 128
    # a model without a cache (the MLP example: its batch reaches the qmatmuls): none
    from test_cuda_plan_signatures import _mlp_runner

    mlp = _mlp_runner([])
    mlp.launcher = _RowsLauncher([])
    mlp._plan_index()
    assert mlp._padding is None
