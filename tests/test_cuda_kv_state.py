"""The KV cache as device state (``codegen/cuda/kv_state.py``): a decode session keeps each
cache in one state buffer laid out for its capacity, qkv_heads writes each layer's new row in
place, and the casts and concats of the caches leave the step.

Here without a GPU: qkv_heads' in-place path in host emulation (tests/cuda_host/emulator), and
the session on the recorder runner of test_cuda_plan_signatures.py (its tables, copies and
graphs). The GPU test (test_cuda_gpu.py) checks a session's steps against the reference.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cuda_emulation import build_emulated, guarded
from qcompiler.codegen.cuda.kv_state import KvState
from qcompiler.codegen.cuda.ops import kernel_source
from qcompiler.codegen.cuda.plan import CACHE_PADDING
from qcompiler.errors import InputError
from qcompiler.runtime.reference import OP_IMPLS
# (llama_decode: a module-scoped fixture)
from test_cuda_padded_cache import B, L, LAYER, _nodes, _padded_runner
from test_cuda_plan_signatures import llama_decode  # noqa: F401


def _qkv_heads_in_place(lib, symbol, args, state_k, state_v, q_shape, pad):
    """qkv_heads with null past caches (their arrays give the shapes only) and k, v the
    layer's slices of the state, which already hold the past rows."""
    arrays = [guarded(np.asarray(a)) for a in args]
    q = guarded(np.full(q_shape, np.nan, state_k.dtype))
    word = guarded(np.array([pad], np.int64))
    ptrs = [a.ctypes.data for a in arrays[:-2]] + [None, None] + \
        [q.ctypes.data, state_k.ctypes.data, state_v.ctypes.data, word.ctypes.data]
    dims = [int(d) for a in arrays + [q, state_k, state_v] for d in a.shape]
    fn = getattr(lib, symbol)
    fn.restype = ctypes.c_int
    assert fn((ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_int64 * len(dims))(*dims),
              None, None) == 0
    return q


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (2, 1, 12)], ids=["packs", "elements"])
@pytest.mark.parametrize("valid,capacity", [(37, 64), (64, 64), (0, 64)])
def test_qkv_heads_writes_only_the_new_row_in_place(tmp_path, hq, hkv, d, valid, capacity):
    """The state's rows before the new one stay as they were (bit for bit), the new row
    (rotary applied) lands at ``valid``, the rows after it are untouched (NaN), and q is the
    reference's: the same results as the copying kernel without reading a past cache."""
    dtype = "f16"
    module, heads, _ = _nodes(hq, hkv, d, dtype)
    symbol, text = kernel_source(heads, module)
    lib = ctypes.CDLL(build_emulated([text], tmp_path))
    rng = np.random.default_rng(valid + 7 * d)
    f16 = np.float16
    qkv = rng.standard_normal((B, 1, (hq + 2 * hkv) * d)).astype(f16)
    angles = rng.uniform(0, 2 * np.pi, (300, d // 2))
    cos, sin = np.cos(angles).astype(f16), np.sin(angles).astype(f16)
    pos = np.full((B, 1), valid, np.int64)
    past = [rng.standard_normal((L, B, hkv, valid, d)).astype(f16) for _ in range(2)]
    want_q, want_k, want_v = OP_IMPLS["qkv_heads"](heads, [qkv, cos, sin, pos] + past, module)

    # the state of every layer, capacity + 1 rows a head; this layer's past rows, then NaN
    states = [np.full((L, B, hkv, capacity + 1, d), np.nan, f16) for _ in range(2)]
    for s, p in zip(states, past):
        s[:, :, :, :valid] = p
    before = [s.copy() for s in states]
    shape_only = [np.empty((L, B, hkv, capacity, d), f16)] * 2  # (never read)
    got_q = _qkv_heads_in_place(lib, symbol, [qkv, cos, sin, pos] + shape_only,
                                states[0][LAYER], states[1][LAYER], (B, 1, hq, d),
                                capacity - valid)
    np.testing.assert_array_equal(got_q, want_q)
    for s, old, want in zip(states, before, (want_k, want_v)):
        np.testing.assert_array_equal(s[LAYER, :, :, :valid + 1], want)
        assert np.isnan(s[LAYER, :, :, valid + 1:].astype(np.float32)).all()
        other = [i for i in range(L) if i != LAYER]
        np.testing.assert_array_equal(s[other], old[other])  # other layers untouched


def test_the_state_pairs_are_the_caches_chains(llama_decode):
    """Each past input pairs with its present output: read through a cast by the qkv_heads
    of every layer (past operand k or v), whose new caches the concat joins in layer order,
    then a cast to the output. Those casts and the concat are what a session leaves out."""
    module, _ = llama_decode
    runner = _padded_runner(module, [])
    runner._plan_index()
    kv, why = KvState.find(runner.plan, runner.nodes, runner._padding)
    assert why is None
    plan = runner.plan
    by_input = {p.input: p for p in kv.pairs}
    assert set(by_input) == {"past_k", "past_v"}
    names = {o: b for o, b in plan.outputs.items()}
    for past, present, which in (("past_k", names["555"], 1), ("past_v", names["560"], 2)):
        pair = by_input[past]
        assert pair.output == present and pair.dtype == "f16"
        assert [plan.steps[i].op for i in pair.skipped] == ["cast", "concat", "cast"]
        heads = [s for s in plan.steps if s.op == "qkv_heads"]
        assert pair.presents == [s.outputs[which] for s in heads]
        assert all(s.inputs[3 + which] == pair.compute for s in heads)
    # without a capacity's padding there is no session
    assert KvState.find(plan, runner.nodes, None)[0] is None


def _session(module, log):
    runner = _padded_runner(module, log)
    return runner, runner.session()


def _split(feeds: dict) -> tuple:
    caches = {n: feeds[n] for n in ("past_k", "past_v")}
    return caches, {n: v for n, v in feeds.items() if n not in caches}


def test_a_session_updates_its_state_in_place(llama_decode):
    """From a cache of 8 rows to 70: the state given once (a 2-D copy a cache into its
    capacity's rows), then every step copies in only the token and its position and out only
    the logits; its table has no launch of the caches' casts or concat; qkv_heads reads null
    past caches and writes each layer's slice of the state, which attention reads. One
    signature a capacity, its graph captured at the second step; crossing 64 rows lays the
    state out for 128 by one device-to-device 2-D copy a cache. ``state()`` copies the
    caches out without their padding."""
    module, feeds = llama_decode
    log = []
    runner, session = _session(module, log)
    launcher = runner.launcher
    caches, step = _split(feeds(8))
    session.reset(caches)
    f16, rows = 2, 2 * 1 * 2  # layers x batch x kv heads
    row = 32 * f16
    assert launcher.copies2d == [(65 * row, 8 * row, 8 * row, rows, 1)] * 2
    plain = runner.plan
    n_steps = sum(1 for s in plain.steps if s.kind not in ("view", "host"))
    signatures = []
    for length in range(8, 71):
        before2d, before = len(launcher.copies2d), len(launcher.copies)
        out = session.step(step)
        assert list(out) == ["550"] and out["550"].shape == (1, 1, 256)
        assert session.length == length + 1
        new = session._sig not in signatures
        if new:
            signatures.append(session._sig)
        # in: input_ids, position_ids (8 bytes each) and the padding word (it changes every
        # step: the capacity minus the length), a new signature's host values; out: the logits
        copies = [(n, k) for _, n, k in launcher.copies[before:]]
        host = [(len(session._sig.host_block), 1)] if new else []
        assert sorted(copies) == sorted([(8, 1)] * 3 + [(256 * 4, 2)] + host), (length, copies)
        grown = launcher.copies2d[before2d:]
        if length == 65:  # 65 rows: the capacity of 128, the 65 rows copied on the device
            assert grown == [(129 * row, 65 * row, 65 * row, rows, 3)] * 2
        else:
            assert grown == [], length
    assert session.relayouts == 1 and len(signatures) == 2
    sig = session._sig
    assert sig.state is not None and sig.padding is not None
    assert sig.n == n_steps - 6  # two casts in, two concats, two casts out
    assert not any(op in label for label in sig.labels
                   for op in ("= concat", "past_k.f16 = cast", "past_v.f16 = cast"))
    word = sig.slots[CACHE_PADDING]
    state = {n: p for n, (p, _) in session._buffers.items()}
    slice_bytes = 1 * 2 * 129 * 32 * f16
    heads = [(label, parr) for label, (parr, _) in zip(sig.labels, sig.keep)
             if label.endswith("= qkv_heads")]
    for layer, (_, parr) in enumerate(heads):
        # qkv, cos, sin, position ids, past_k, past_v, q, k, v, the padding word
        assert parr[4] is None and parr[5] is None, parr[:]
        assert parr[7] == state["past_k"] + layer * slice_bytes
        assert parr[8] == state["past_v"] + layer * slice_bytes
        assert parr[9] == word
    attention = [parr for label, (parr, _) in zip(sig.labels, sig.keep)
                 if label.endswith("= attention")]
    for layer, parr in enumerate(attention):
        assert parr[1] == state["past_k"] + layer * slice_bytes
        assert parr[2] == state["past_v"] + layer * slice_bytes
    kinds = [e[0] for e in log if e[0] in ("launch", "graph")]
    assert kinds == ["launch"] + ["graph"] * 56 + ["launch"] + ["graph"] * 5

    before2d = len(launcher.copies2d)
    out = session.state()
    assert {k: v.shape for k, v in out.items()} == {"555": (2, 1, 2, 71, 32),
                                                    "560": (2, 1, 2, 71, 32)}
    assert all(v.dtype == np.float32 for v in out.values())
    assert launcher.copies2d[before2d:] == [(71 * row, 129 * row, 71 * row, rows, 2)] * 2


def test_a_session_and_run_share_the_runner(llama_decode):
    """run() between a session's steps keeps its own signatures and buffers; the session's
    signature is not what run()'s next signature is prepared from, and the shared buffers
    its table points to stay allocated while it is kept."""
    module, feeds = llama_decode
    runner, session = _session(module, [])
    caches, step = _split(feeds(20))
    session.reset(caches)
    session.step(step)
    session.step(step)
    mine = session._sig
    runner(feeds(30))
    regular = runner.last_signature
    assert regular is not mine and regular.state is None and runner._layout.signature is regular
    assert mine in list(runner._kept_signatures())
    session.step(step)
    assert session._sig is mine and runner.last_signature is mine
    session.close()
    assert mine not in list(runner._kept_signatures()) and session._buffers == {}
    # a session dropped without close() releases its signature and state too
    other = runner.session()
    other.reset(caches)
    other.step(step)
    theirs = other._sig
    assert theirs in list(runner._kept_signatures())
    del other
    import gc

    gc.collect()
    assert theirs not in list(runner._kept_signatures())


def test_sessions_refuse_what_they_cannot_run(llama_decode):
    module, feeds = llama_decode
    runner, session = _session(module, [])
    caches, step = _split(feeds(8))
    with pytest.raises(InputError, match="no state yet"):
        session.step(step)
    with pytest.raises(InputError, match=r"missing \['past_v'\]"):
        session.reset({"past_k": caches["past_k"]})
    with pytest.raises(InputError, match="one .L, B, Hkv, P, D. shape"):
        session.reset({"past_k": caches["past_k"], "past_v": caches["past_v"][:, :, :, :3]})
    with pytest.raises(InputError, match=r"input %past_k is \[2, .*got \[3, 1, 2, 8, 32\]"):
        session.reset({n: np.concatenate([a, a[:1]]) for n, a in caches.items()})
    session.reset(caches)
    with pytest.raises(InputError, match=r"unknown \['past_k'\].*the session's state"):
        session.step({**step, "past_k": caches["past_k"]})
    # more than one new token: attention is not a decode, the capacity's layout refuses it
    _, prefill = _split(feeds(8, 3))
    with pytest.raises(InputError, match="cannot run inputs of shapes"):
        session.step(prefill)
    # a model without a cache
    from test_cuda_plan_signatures import _mlp_runner

    with pytest.raises(InputError, match="no decode session"):
        _mlp_runner([]).session()


def test_a_cpu_artifact_refuses_a_session(tmp_path):
    import os

    import qcompiler

    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "examples")
    m = qcompiler.compile(os.path.join(examples, "mlp_int4.onnx"), target="ref",
                          output_dir=str(tmp_path / "a"))
    with pytest.raises(InputError, match="decode sessions .* need a CUDA device plan"):
        m.session()
