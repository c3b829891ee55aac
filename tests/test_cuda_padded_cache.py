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
from qcompiler.ir.core import Function, Module
from qcompiler.ir.types import tensor
from qcompiler.runtime.reference import OP_IMPLS

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
