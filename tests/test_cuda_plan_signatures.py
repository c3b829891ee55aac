"""The device plan's signatures are bounded: a generation loop whose KV cache grows by a
token per call meets a new input-shape signature every call (its own input and output
buffers and CUDA graph). Past ``CudaPlanRunner.MAX_SIGNATURES`` the least recently used one
is released: its launches finished, its graphs destroyed, its buffers freed. Checked with the
recorders of test_cuda_collectives.py (no GPU)."""
import os

import numpy as np

from qcompiler.codegen.cuda.plan import CudaPlanRunner
from qcompiler.driver.frontend import import_model
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
