"""Runs of compiled CPU kernels called from C (codegen/cpu/native_calls.py): the same results
as calling them from Python, the batching of a plan's bound steps, and a kernel's error
raised with its own message."""
from __future__ import annotations

import ctypes
import gc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from qcompiler.codegen.cpu import native_calls as nc


def _chain_model(n: int = 12) -> onnx.ModelProto:
    """x -> (add / mul / sub a constant, softmax) n times: 2n small kernels in a row."""
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        op = ("Add", "Mul", "Sub")[i % 3]
        inits.append(nh.from_array(np.linspace(0.5, 1.5, 64).astype(np.float32) + i, f"c{i}"))
        nodes += [helper.make_node(op, [prev, f"c{i}"], [f"t{i}"]),
                  helper.make_node("Softmax", [f"t{i}"], [f"s{i}"], axis=-1)]
        prev = f"s{i}"
    g = helper.make_graph(nodes, "chain",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _compile(tmp_path, monkeypatch, native: str):
    import qcompiler

    monkeypatch.setenv(nc.ENV, native)
    path = str(tmp_path / "chain.onnx")
    onnx.save(_chain_model(), path)
    return qcompiler.compile(path, target="cpu")


def _prepared_calls() -> list:
    calls = []
    for obj in gc.get_objects():
        if type(obj).__name__ == "_Prepared":
            calls += obj.calls
    return calls


@pytest.fixture
def native_or_skip():
    if not nc.available():
        pytest.skip(f"the C loop was not built on this host: {nc.why_not()}")


def test_a_plan_runs_its_kernels_from_c_with_the_same_results(tmp_path, monkeypatch,
                                                              native_or_skip):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((n, 64)).astype(np.float32) for n in (1, 3, 1)]
    python = _compile(tmp_path, monkeypatch, "0")
    want = [python.run({"x": x}) for x in xs]
    del python
    gc.collect()
    native = _compile(tmp_path, monkeypatch, "1")
    got = [native.run({"x": x}) for x in xs]
    runs = [c for c in _prepared_calls() if isinstance(c, nc.NativeCalls)]
    assert runs and max(len(r.calls) for r in runs) >= 2
    for g, w in zip(got, want):
        (name,) = w
        np.testing.assert_array_equal(g[name], w[name])
        assert np.all(np.isfinite(g[name])) and np.abs(g[name].sum(-1) - 1).max() < 1e-5


def test_a_failing_kernel_raises_its_own_error(tmp_path, monkeypatch, native_or_skip):
    import tvm

    model = _compile(tmp_path, monkeypatch, "1")
    model.run({"x": np.ones((2, 64), np.float32)})
    run = next(c for c in _prepared_calls() if isinstance(c, nc.NativeCalls))
    good = run.calls[0]
    # the same kernel on tensors of another shape: its own shape check fails
    bad = nc.KernelCall(good.fn, [tvm.runtime.empty((3, 5), str(a.dtype))
                                  if isinstance(a, tvm.runtime.Tensor) else a
                                  for a in good.args])
    both = nc.NativeCalls([good, bad])
    with pytest.raises(Exception) as e:
        both()
    assert "shape" in str(e.value).lower() or "match" in str(e.value).lower(), str(e.value)


def test_only_tensors_and_integers_go_through_the_c_loop():
    import tvm

    t = tvm.runtime.empty((4,), "float32")
    assert nc._packed(t) == (nc.TYPE_TENSOR, t.__chandle__())
    assert nc._packed(-3) == (nc.TYPE_INT, 2 ** 64 - 3)
    assert nc._packed(True) is None and nc._packed(np.zeros(4)) is None
    assert nc.KernelCall(print, [t, 5]).native is not None
    assert nc.KernelCall(print, [t, np.zeros(4)]).native is None
    seq = nc.CallSequence([nc.KernelCall(print, [t]), lambda: None])
    assert seq.native is None  # a Python step in it: the sequence stays in Python


def test_batched_keeps_python_steps_in_place(tmp_path, monkeypatch, native_or_skip):
    """Runs of two or more kernels become one NativeCalls; a Python step between them, or a
    lone kernel, stays as it is, in order."""
    model = _compile(tmp_path, monkeypatch, "1")
    model.run({"x": np.ones((2, 64), np.float32)})
    kernels = next(c for c in _prepared_calls() if isinstance(c, nc.NativeCalls)).calls[:3]
    seen = []
    py = [lambda: seen.append("a"), lambda: seen.append("b")]
    out = nc.batched([py[0], kernels[0], kernels[1], py[1], kernels[2]])
    assert out[0] is py[0] and out[2] is py[1] and out[3] is kernels[2]
    assert isinstance(out[1], nc.NativeCalls) and out[1].calls == kernels[:2]
    for call in out:
        call()
    assert seen == ["a", "b"]


def test_a_new_signature_patches_the_tables_of_the_runs_it_changed(tmp_path, monkeypatch,
                                                                   native_or_skip):
    """``Batched.updated``: a changed call that stays native gets its entry rewritten in a
    copy of its run's table (the earlier list keeps its own); a run without changes is the
    same object; a call that stops being native batches the list again."""
    model = _compile(tmp_path, monkeypatch, "1")
    model.run({"x": np.ones((2, 64), np.float32)})
    k = next(c for c in _prepared_calls() if isinstance(c, nc.NativeCalls)).calls[:4]
    seen = []
    py = lambda: seen.append("py")  # noqa: E731
    source = [k[0], k[1], py, k[2], k[3]]
    first = nc.Batched(source)
    assert [type(c).__name__ for c in first.calls] == ["NativeCalls", "function", "NativeCalls"]
    again = nc.KernelCall(k[1].fn, k[1].args)  # a new binding of the same kernel
    second = first.updated([k[0], again, py, k[2], k[3]], [1])
    assert second.calls[2] is first.calls[2] and second.calls[1] is py
    run0, run1 = first.calls[0], second.calls[0]
    assert run1 is not run0 and run1.calls == [k[0], again] and run0.calls == [k[0], k[1]]
    assert ctypes.addressof(run1._table[1].args.contents) == ctypes.addressof(
        again.entry().args.contents)
    assert ctypes.addressof(run0._table[1].args.contents) == ctypes.addressof(
        k[1].entry().args.contents)
    for call in second.calls:
        call()
    assert seen == ["py"]
    # nothing changed at the position: the same lists
    assert first.updated(list(source), [1]) is first
    # a Python call where a kernel was: batched again, in order
    third = first.updated([k[0], py, py, k[2], k[3]], [1])
    assert third.calls[0] is k[0] and third.calls[1] is py and third.calls[2] is py
    assert isinstance(third.calls[3], nc.NativeCalls) and third.calls[3].calls == [k[2], k[3]]


def test_bind_wraps_an_array_once_and_keeps_a_bounded_few(tmp_path, monkeypatch):
    """``OpsLibrary.bind`` wraps an array it has wrapped before with the same tensor (a decode
    loop rebinds steps over the same weights and arena views every token), and keeps at most
    ``WRAPPED_MAX`` arrays (each entry keeps its array's memory alive)."""
    from qcompiler.plan.executor import aligned_empty

    _compile(tmp_path, monkeypatch, "1")
    lib = next(o for o in gc.get_objects() if type(o).__name__ == "OpsLibrary")
    a = aligned_empty(256).view(np.float32)
    first = lib._wrap_kept(a)
    assert lib._wrap_kept(a) is first and first.data_ptr() == a.ctypes.data
    monkeypatch.setattr(lib, "WRAPPED_MAX", 3)
    others = [aligned_empty(256).view(np.float32) for _ in range(4)]
    for o in others:
        lib._wrap_kept(o)
    assert len(lib._wrapped) <= 3 and id(a) not in lib._wrapped
    assert lib._wrap_kept(a) is not first  # evicted: wrapped again
    unaligned = aligned_empty(260)[4:].view(np.float32)
    assert lib._wrap_kept(unaligned) is unaligned  # TVM reads it through DLPack as it is
