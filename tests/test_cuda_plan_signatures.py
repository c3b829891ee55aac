"""The device plan's signatures: a generation loop whose KV cache grows by a token per call
meets a new input-shape signature every call. Each is prepared from the last one over the
runner's shared device buffers (checked row for row against one prepared from scratch), a
token allocates nothing unless a cache outgrows its buffer, and past
``CudaPlanRunner.MAX_SIGNATURES`` the least recently used signature is released: its launches
finished, its graphs destroyed, buffers that only it used freed. Checked with the recorders
of test_cuda_collectives.py (no GPU)."""
import ctypes
import os

import numpy as np
import pytest

from qcompiler.codegen.cuda.plan import CudaPlanRunner
from qcompiler.driver.frontend import import_model
from qcompiler.ir.core import constant_value
from qcompiler.pipeline import PassManager
from qcompiler.targets import get_target
from test_cuda_collectives import _Launcher, _Rt, _runner

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class _FreeingRt(_Rt):
    def __init__(self):
        super().__init__()
        self.freed = []

    def free(self, ptr):
        self.freed.append(ptr)


class _DestroyingLauncher(_Launcher):
    def __init__(self, log):
        super().__init__(log)
        self.destroyed = []

    def qc_graph_destroy(self, graph):
        self.destroyed.append(graph)
        return 0


def _mlp_runner(log):
    module = PassManager.parse(get_target("cuda-sm90").default_pipeline).run(
        import_model(os.path.join(EXAMPLES, "mlp_int4.onnx")))
    runner = _runner(module, log)
    runner.rt, runner.launcher = _FreeingRt(), _DestroyingLauncher(log)
    return runner


def test_least_recently_used_signatures_are_released(monkeypatch):
    monkeypatch.setattr(CudaPlanRunner, "MAX_SIGNATURES", 4)
    log = []
    runner = _mlp_runner(log)
    x = {b: np.random.default_rng(b).standard_normal((b, 64)).astype(np.float32)
         for b in range(1, 8)}
    graphs = {}
    for b in range(1, 8):  # 7 shapes: the first 3 are released as the 5th to 7th arrive
        runner({"x": x[b]})
        graphs[b] = runner._signatures[((b, 64),)].graph
    assert sorted(k[0][0] for k in runner._signatures) == [4, 5, 6, 7]
    assert runner.launcher.destroyed == [graphs[1], graphs[2], graphs[3]]
    assert len(runner.rt.freed) == len(set(runner.rt.freed)) > 0  # each buffer once
    # every release waited for the plan's stream first
    assert sum(1 for e in log if e[0] == "sync") >= 7 + 3
    # a kept shape replays its graph; a released one is prepared and captured again,
    # and releases the least recently used (5: 4 was used just before)
    captures, before = len(runner.launcher.tables), len(log)
    runner({"x": x[4]})
    assert len(runner.launcher.tables) == captures
    assert [e for e in log[before:] if e[0] == "graph"] == [("graph", graphs[4], 0x5)]
    runner({"x": x[1]})
    assert len(runner.launcher.tables) == captures + 1
    assert sorted(k[0][0] for k in runner._signatures) == [1, 4, 6, 7]
    assert runner.launcher.destroyed[-1] == graphs[5]
    assert len(runner._recent) == 4


def test_a_signature_is_captured_at_its_second_run():
    """A signature's first run enqueues its table from the launcher; the second captures the
    graph and launches it; later runs replay it. A signature used once (a generation loop's
    cache length) is never captured, and its release destroys no graph."""
    log = []
    runner = _mlp_runner(log)
    runner.capture_after_uses = CudaPlanRunner.CAPTURE_AFTER_USES
    assert runner.capture_after_uses == 2
    x = {b: np.random.default_rng(b).standard_normal((b, 64)).astype(np.float32)
         for b in (1, 2)}

    def launches():
        return [e[0] for e in log if e[0] in ("launch", "graph")]

    runner({"x": x[1]})
    assert launches() == ["launch"] and runner.launcher.tables == []
    sig = runner._signatures[((1, 64),)]
    assert sig.graph is None and sig.uses == 1
    runner({"x": x[1]})
    assert launches() == ["launch", "graph"] and len(runner.launcher.tables) == 1
    graph = sig.graph
    assert graph is not None
    assert runner.last_signature is sig  # what benchmarks replay
    runner({"x": x[1]})
    assert launches() == ["launch", "graph", "graph"] and len(runner.launcher.tables) == 1
    assert [e[1] for e in log if e[0] == "graph"] == [graph, graph]
    runner({"x": x[2]})  # a new shape: its table again, no capture
    assert launches()[-1] == "launch" and len(runner.launcher.tables) == 1
    assert runner.last_signature is runner._signatures[((2, 64),)]
    assert runner.last_signature.graph is None
    runner._release(runner._signatures[((2, 64),)])
    runner._release(sig)
    assert runner.launcher.destroyed == [graph]


def test_arenas_beyond_the_buckets_are_freed_when_no_signature_uses_them(monkeypatch):
    """Past every bucket a signature's arena comes from its dims' size class (MemoryPlans);
    only MAX_EXACT_PLANS classes are kept, and a dropped class's device arena is freed once
    the last kept signature over it is released (before, every new length of a generation
    loop allocated an arena of its own and none was ever freed)."""
    import warnings

    monkeypatch.setattr(CudaPlanRunner, "MAX_EXACT_PLANS", 2)
    monkeypatch.setattr(CudaPlanRunner, "MAX_SIGNATURES", 3)
    log = []
    runner = _mlp_runner(log)
    assert max(b.bounds["batch"] for b in runner.plan.buckets) < 130
    arena_ptrs, arena_of = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # beyond every bucket: said once
        for batch in (130, 131, 150, 170, 200, 230, 260, 300, 350, 400, 131):
            x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
            runner({"x": x})
            arena_of.setdefault(batch, runner._signatures[((batch, 64),)].arena_key)
            for key, (ptr, _) in runner._arenas.items():
                arena_ptrs.setdefault(ptr, key)
            kept = {s.arena_key for s in runner._signatures.values()}
            assert len(runner._plans.exact) <= 2
            # an arena is kept only for a kept plan or a kept signature
            assert set(runner._arenas) <= set(runner._plans.exact) | kept
    assert arena_of[130] == arena_of[131] != arena_of[150]  # one plan per size class
    freed = [p for p in runner.rt.freed if p in arena_ptrs]
    assert len(freed) == len(set(freed)) >= len(arena_ptrs) - 3
    assert not set(freed) & {p for p, _ in runner._arenas.values()}


# -- a generation loop: new signatures share the runner's buffers and start from the last ---


class _CountingRt(_FreeingRt):
    def __init__(self):
        super().__init__()
        self.mallocs = 0

    def malloc(self, nbytes):
        self.mallocs += 1
        return super().malloc(nbytes)

    def upload(self, a):
        raise AssertionError("a signature uploads nothing itself: its host values are "
                             "copied by the run, on the plan's stream")


class _CopyLauncher(_DestroyingLauncher):
    """Also records each copy's destination."""

    def __init__(self, log):
        super().__init__(log)
        self.copies = []

    def qc_copy_async(self, dst, src, nbytes, kind, stream):
        self.copies.append((dst, nbytes, kind))
        return super().qc_copy_async(dst, src, nbytes, kind, stream)


@pytest.fixture(scope="module")
def llama_decode(tmp_path_factory):
    """A 2-layer Llama decode step (KV cache in and out) through the cuda-sm90 pipeline with
    4-bit weights, and a feeds maker by cache length (and new tokens)."""
    pytest.importorskip("torch")
    from conftest import small_llama_onnx

    path = str(tmp_path_factory.mktemp("llama") / "decode.onnx")
    small_llama_onnx(path, 2, 1, 1, 8, seed=0)
    import decoder_models as dm

    cfg = dict(dm.SMALL_LLAMA, hidden=128, heads=4, kv_heads=2, intermediate=192)
    passes = "canonicalize,quantize-weights{bits=4,group=32}," + \
        get_target("cuda-sm90").default_pipeline
    module = PassManager.parse(passes).run(import_model(path))

    def feeds(past: int, seq: int = 1) -> dict:
        feeds = dm.llama_inputs(cfg, 2, 1, seq, past, seed=past)
        return {k: np.asarray(v) for k, v in feeds.items()}

    return module, feeds


def _llama_runner(module, log, capture_after=2):
    runner = _runner(module, log, capture_after=capture_after)
    runner.rt, runner.launcher = _CountingRt(), _CopyLauncher(log)
    # the weights the op kernels read (the norms', the embedding), at made-up addresses
    for step in runner.plan.steps:
        if step.kind == "kernel" and step.op != "qmatmul":
            for name in step.inputs:
                if name is not None and runner.plan.buffers[name].kind == "weight":
                    a = constant_value(module, runner.nodes[name].result)
                    runner.weights[name] = (0x70000 + 0x100 * len(runner.weights), a.shape)
    return runner


def _rows(sig) -> list:
    """Every table row of ``sig`` as plain values, its pointer and shape arrays included."""
    out, k = [], 0
    for item in sig.program:
        if item[0] != "launch":
            out.append(("collective",) + tuple(item[2:4]))
            continue
        table, n = item[1], item[2]
        for j in range(n):
            row = table[j]
            parr, sarr = sig.keep[k]
            k += 1
            assert ctypes.addressof(parr) == ctypes.cast(row.ptrs, ctypes.c_void_p).value
            out.append((row.kind, row.fn, row.workspace, row.m, row.variant, row.epilogue,
                        row.concurrent, list(parr), list(sarr)))
    return out


@pytest.mark.parametrize("in_place", [False, True], ids=["rebuilt", "reshaped-in-place"])
def test_a_new_signature_is_the_one_prepared_from_scratch(llama_decode, in_place):
    """A signature prepared from the last one (only the steps over a buffer that moved or
    changed shape built again, the table copied and patched, the concurrent runs formed again
    around the changed launches) has exactly the rows of one prepared from nothing, over a
    growing cache, a jump in length, inputs bound in place and not, more new tokens and back;
    and a decode step rebuilds only the steps that read the cache length. With the last
    signature reshaped in place (``_reshape_last``: it ran at most once, uncaptured), a
    cache one row longer takes that path, and its rows are those of a fresh one too."""
    module, feeds = llama_decode
    log = []
    runner = _llama_runner(module, log)
    runner.reshape_in_place = in_place
    built = []
    original = CudaPlanRunner._step_launches

    def counting(self, step, ptr, shape_of):
        built.append(step.op or step.kind)
        return original(self, step, ptr, shape_of)

    runner._step_launches = counting.__get__(runner)
    # (cache length, new tokens, inputs bound in place: the caller's device buffers)
    sequence = [(8, 1, False), (9, 1, False), (10, 1, False), (11, 1, False), (40, 1, False),
                (41, 1, False), (41, 1, True), (41, 1, False), (41, 5, False), (46, 1, False),
                (12, 1, False)]
    scratch = None
    for past, seq, bind in sequence:
        previous = scratch
        shapes = {n: a.shape for n, a in feeds(past, seq).items()}
        bound = {n: 0xB0000 + 0x1000 * i for i, n in enumerate(shapes)} if bind else None
        built.clear()
        last = runner._layout.signature if runner._layout is not None else None
        incremental = runner._prepare(shapes, bound)
        rebuilt = list(built)
        reshaped = incremental is last
        runner._layout = None
        scratch = runner._prepare(shapes, bound)
        assert _rows(incremental) == _rows(scratch), (past, seq)
        assert incremental.runs == scratch.runs
        assert incremental.inputs == scratch.inputs and incremental.outputs == scratch.outputs
        assert np.array_equal(incremental.host_block, scratch.host_block)
        if in_place:
            # a cache one row longer, unbound, within the shared buffers (at 9, 11 and 41
            # they grow: new addresses): the last signature reshaped
            if (past, seq, bind) == (10, 1, False):
                assert reshaped and not rebuilt, (past, rebuilt)
            continue
        assert not reshaped
        if (past, seq, bind) in [(9, 1, False), (10, 1, False), (11, 1, False)]:
            # the cache appends (qkv_heads), attention and the cache casts: not the GEMVs
            assert 0 < len(rebuilt) < (len(built) - len(rebuilt)) // 2, (past, rebuilt)
            assert "attention" in rebuilt and "qmatmul" not in rebuilt
            # no host value reads the cache length: the last block serves as it is
            assert incremental.host_block is previous.host_block, past


def test_a_reshaped_step_uploads_its_host_values_only_when_they_changed(llama_decode):
    """Over a generation loop, the shared host-value buffer holds, at every run, the bytes of
    the signature that runs (a model of the device memory fed by the recorded copies); a
    step reshaped in place whose host values equal the last ones uploads nothing."""
    from qcompiler.codegen.cuda.plan import HOST_VALUES

    module, feeds = llama_decode
    log = []
    runner = _llama_runner(module, log)
    device = {}  # destination address -> the bytes last copied there from the host

    uploads = []

    def copy(dst, src, nbytes, kind, stream):
        if kind == 1:
            device[dst] = ctypes.string_at(src, nbytes)
            uploads.append(dst)
        return 0

    runner.launcher.qc_copy_async = copy
    last, reshaped = None, 0
    for past in range(8, 16):
        uploads.clear()
        runner(feeds(past))
        sig = runner.last_signature
        host = sig.slots[HOST_VALUES]
        assert device[host] == sig.host_block.tobytes(), past
        if sig is last:  # reshaped in place: its host values equal the last ones here
            assert host not in uploads, past
            reshaped += 1
        last = sig
    assert runner._host_names and reshaped >= 2


def test_reshaping_in_place_leaves_the_other_kept_signatures_as_they_were(llama_decode):
    """Only launches built for the last signature are rewritten in place: the signature it was
    prepared from shares the others' arrays. Over (40, 1 token) -> (40, 5) -> (41, 5) ->
    (42, 5) the first keeps its rows; and a last signature whose launches to rewrite are not
    all its own (here: marked shared) is not reshaped, and keeps its rows too."""
    module, feeds = llama_decode
    log = []
    runner = _llama_runner(module, log)
    runner._prepare({n: a.shape for n, a in feeds(60, 5).items()})  # shared buffers: room
    shapes = lambda past, seq=1: {n: a.shape for n, a in feeds(past, seq).items()}  # noqa: E731
    first = runner._prepare(shapes(40))
    want = _rows(first)
    second = runner._prepare(shapes(40, 5))
    third = runner._prepare(shapes(41, 5))
    fourth = runner._prepare(shapes(42, 5))
    assert fourth is third and _rows(first) == want
    before = _rows(fourth)
    runner._layout.fresh = frozenset()  # as if every launch were shared with another
    fifth = runner._prepare(shapes(43, 5))
    assert fifth is not fourth and _rows(fourth) == before
    assert second is not first


def test_a_growing_cache_allocates_nothing_per_token(llama_decode):
    """A generation loop's signatures share the runner's input, output, workspace and
    host-value buffers: a token allocates device memory only when a cache outgrows its
    buffer (by a quarter each time), and a replaced buffer is freed with the last signature
    that launches over it. Each signature's host values are copied by its run when the
    shared buffer holds another signature's, and not again when it runs twice in a row."""
    module, feeds = llama_decode
    log = []
    runner = _llama_runner(module, log)
    runner({k: v for k, v in feeds(8).items()})
    start, grown, allocating, reshaped = runner.rt.mallocs, 0, 0, 0
    for past in range(9, 73):
        before, slots, arenas = runner.rt.mallocs, dict(runner._slots), dict(runner._arenas)
        last = runner.last_signature
        runner(feeds(past))
        reshaped += runner.last_signature is last
        # every allocation is a shared buffer replaced by a larger one, or the arena of a
        # bucket met for the first time
        grown += sum(1 for n, (p, size) in runner._slots.items()
                     if n in slots and slots[n] != (p, size) and size > slots[n][1])
        grown += sum(1 for key in runner._arenas if key not in arenas)
        assert len(runner._slots) == len(slots)
        allocating += runner.rt.mallocs > before
    assert runner.rt.mallocs - start == grown > 0
    # 64 tokens, the caches 8 -> 72 rows: their buffers (in and out) grow 1.25x at a time
    assert allocating <= 24, allocating
    # every other token reshapes the last signature in place (_reshape_last)
    assert reshaped >= 64 - allocating - 4, (reshaped, allocating)
    assert len(runner._signatures) <= CudaPlanRunner.MAX_SIGNATURES
    # replaced buffers: freed once no kept signature launches over them
    in_use = {p for s in runner._signatures.values() for p in s.slots.values()}
    assert runner._retired_slots <= in_use
    assert len(runner.rt.freed) == len(set(runner.rt.freed)) > 0
    assert not set(runner.rt.freed) & in_use
    # host values: copied when the shared buffer holds another signature's block
    sig = runner._signatures[tuple(a.shape for a in feeds(72).values())]
    host = sig.slots.get("<host values>")
    assert host is not None and sig.host_block is not None
    copies = lambda: [c for c in runner.launcher.copies if c[0] == host]  # noqa: E731
    n = len(copies())
    runner(feeds(72))  # the same signature again: its block is there
    assert len(copies()) == n
    runner(feeds(71))
    runner(feeds(72))
    assert len(copies()) == n + 2
