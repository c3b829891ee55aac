"""Collectives in the CUDA device plan (issue #17), checked without a GPU: a rank program's
all_reduce is a collective step (a device copy of the partial into the result's buffer, then
the communicator's in-place sum between two segments of launches), the plan's segments, the
op library without an all_reduce kernel, the manifest's plan record, and the runner's program
(segment tables and graphs, the collective's buffer, the order of launches and collectives,
lanes never crossing a collective, the refusal without a communicator) with the device, the
launcher and the communicator replaced by recorders. The GPU runs are in
tests/test_cuda_collectives_gpu.py."""
from __future__ import annotations

import ctypes
import json
from types import SimpleNamespace

import numpy as np
import pytest

from qcompiler.codegen.cuda.build import find_nvcc
from qcompiler.codegen.cuda.plan import (STEP_COPY, STEP_OP, STEP_QMM, CudaPlanRunner,
                                         op_nodes, plan_segments, step_table_text)
from qcompiler.driver.sharded import pipeline_with_shard
from qcompiler.ir import parse_module
from qcompiler.pipeline import PassManager
from qcompiler.plan import lower
from qcompiler.runtime import collectives
from qcompiler.runtime.collectives import CollectiveError, Communicator
from qcompiler.runtime.ranks import rank_program
from qcompiler.targets import get_target
from test_shard import _feeds, _module


@pytest.fixture(scope="module")
def rank0():
    """Rank 0's program of the act-order SwiGLU block for cuda-sm90:tp=2 (no nvcc needed;
    its gate and up shards are one paired projection, fuse-gate-up)."""
    pipeline = pipeline_with_shard(get_target("cuda-sm90").default_pipeline, 2)
    return rank_program(PassManager.parse(pipeline).run(_module(act_order=True)), 0)


def test_segments_of_a_tp2_rank_program(rank0):
    plan = lower(rank0)
    segments = plan_segments(rank0, plan)
    # the projections and the copy of the partial, the sum in place in %d.sum's buffer, then
    # the residual add (with the cast back to f32)
    assert len(segments) == 2
    first, last = segments
    assert first["steps"][-1] == "d.sum" and "d.r0" in first["steps"]
    assert sum(1 for s in plan.steps if s.op == "qmatmul") == 2
    assert all(n in first["steps"] for n in ("gate_up", "d.r0"))
    assert first["collective"] == {"node": "d.sum", "operand": "d.r0", "buffer": "d.sum",
                                   "world": 2}
    assert last["collective"] is None and last["steps"] == ["y.f32_fused"]
    # distinct buffers: the copy writes the result's, the partial's stays the operand's
    assert plan.buffers["d.sum"].kind == "arena" and plan.buffers["d.r0"].kind == "arena"
    # no op kernel for the collective (it was "no CUDA op kernel" before)
    assert all(n.op != "all_reduce" for n in op_nodes(rank0, plan))
    text = step_table_text(rank0, plan, {n.results[0].name: f"k_{n.results[0].name}"
                                         for n in op_nodes(rank0, plan)})
    assert "COPY   %d.r0 -> %d.sum" in text
    assert "== ALL_REDUCE sum %d.sum in place, world 2" in text


def test_the_global_view_all_reduce_is_no_collective_step():
    """Several operands (every rank's partial in one graph) is no rank program: no collective
    step, and an op kernel is asked for (the CUDA host-ops path then says which is missing)."""
    m = parse_module("""module @m {
  func @main(%a: tensor<[4, 8], f16>, %b: tensor<[4, 8], f16>) -> ("y": tensor<[4, 8], f16>) {
    %y = all_reduce(%a, %b) {op = "sum"} : tensor<[4, 8], f16>
    return %y
  }
}""")
    plan = lower(m)
    assert [s["collective"] for s in plan_segments(m, plan)] == [None]
    assert [n.op for n in op_nodes(m, plan)] == ["all_reduce"]


# -- the runner with recorders for the device, the launcher and the communicator ------------

class _Rt:
    def __init__(self):
        self.next = 0x10000

    def malloc(self, nbytes):
        p, self.next = self.next, self.next + ((int(nbytes) + 0xFFF) // 0x1000 + 1) * 0x1000
        return p

    def upload(self, a):
        return self.malloc(a.nbytes)

    def free(self, ptr):
        pass

    def memset(self, ptr, nbytes):
        pass

    def error(self, err):
        return "fake"


class _Launcher:
    """Records captures (each table's kinds, concurrent counts and pointers) and launches."""

    def __init__(self, log):
        self.log, self.tables = log, []

    def qc_plan_capture(self, table, n, stream, lanes, exec_ref, failed_ref):
        self.tables.append([(table[i].kind, table[i].concurrent,
                             [table[i].ptrs[j] for j in range(2)]) for i in range(n)])
        exec_ref._obj.value = 0x900 + len(self.tables)  # the byref'd c_void_p
        return 0

    def qc_graph_launch(self, graph, stream):
        self.log.append(("graph", graph, stream))
        return 0

    def qc_plan_launch(self, table, n, stream, lanes, failed_ref):
        self.log.append(("launch", n, stream))
        return 0

    def qc_copy_async(self, dst, src, nbytes, kind, stream):
        self.log.append(("copy", kind))
        return 0

    def qc_stream_synchronize(self, stream):
        self.log.append(("sync", stream))
        return 0


class _Comm(Communicator):
    world_size = 2

    def __init__(self, log):
        self.log = log

    def all_reduce_device(self, ptr, shape, dtype, stream):
        self.log.append(("all_reduce", ptr, tuple(shape), np.dtype(dtype).name, stream))


def _runner(module, log, use_graphs=True, lanes=True, capture_after=1):
    """A CudaPlanRunner whose device parts are recorders (load_device is not called); its
    graphs captured at a signature's ``capture_after``-th run (1: the first, so that a test's
    single run shows its tables)."""
    r = CudaPlanRunner.__new__(CudaPlanRunner)
    r.module, r.plan = module, lower(module)
    r.nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    r.rt, r.launcher = _Rt(), _Launcher(log)
    r.stream, r.lanes = 0x5, (0x7 if lanes else None)
    r.lanes_wanted, r.use_graphs = 4, use_graphs
    r.ops = SimpleNamespace(workspace_bytes=lambda symbol, dims, flat=None: 0,
                            _fn=lambda symbol: (ctypes.c_void_p(0x1234),))
    r.symbols = {n.results[0].name: "op_" + n.results[0].name for n in module.main.nodes
                 if n.results}
    kernels = {n.results[0].name: SimpleNamespace(
        dev={"w": 1, "scales": 2, "zeros": 3, "bias": 4, "perm": None, "norm": None,
             "norm_bias": None},
        fn=ctypes.c_void_p(0x4321), ws_fn=lambda m: 0)
        for n in module.main.nodes if n.op == "qmatmul"}
    r.qmm = SimpleNamespace(kernels=kernels)
    r.weights, r._loaded = {}, True
    r._init_signature_state()
    r.capture_after_uses = capture_after
    return r


@pytest.fixture
def no_communicator():
    previous = collectives.install(None)
    yield
    collectives.install(previous)


def test_runner_replays_segments_around_the_collective(rank0, no_communicator):
    log = []
    runner = _runner(rank0, log)
    collectives.install(_Comm(log))
    runner({"x": _feeds(1)["x"]})
    sig = next(iter(runner._signatures.values()))
    assert [item[0] for item in sig.program] == ["launch", "collective", "launch"]
    # segment 0: cast, 2 qmatmuls (gate/up paired, down), the copy of the partial into
    # %d.sum's buffer
    seg0, seg1 = runner.launcher.tables
    assert [k for k, _, _ in seg0] == [STEP_OP, STEP_QMM, STEP_QMM, STEP_COPY]
    assert [k for k, _, _ in seg1] == [STEP_OP]
    _, node, dptr, shape, dtype, world = sig.program[1]
    assert node.results[0].name == "d.sum" and world == 2 and shape == (5, 64)
    assert seg0[-1][2][1] == dptr != seg0[-1][2][0]  # copy d.r0 -> d.sum, summed in d.sum
    # inputs copied in, graph 0, the collective on the plan's stream, graph 1, output, sync
    launches = [e for e in log if e[0] in ("graph", "all_reduce")]
    assert launches == [("graph", 0x901, 0x5), ("all_reduce", dptr, (5, 64), "float16", 0x5),
                        ("graph", 0x902, 0x5)]
    assert log[0] == ("copy", 1) and log[-1] == ("sync", 0x5)
    # without graphs: the same order with table launches
    log.clear()
    runner = _runner(rank0, log, use_graphs=False)
    runner({"x": _feeds(1)["x"]})
    assert [e[0] for e in log if e[0] in ("launch", "all_reduce")] == \
        ["launch", "all_reduce", "launch"]
    assert [e[1] for e in log if e[0] == "launch"] == [4, 1]


def test_without_a_communicator_nothing_is_launched(rank0, no_communicator):
    log = []
    runner = _runner(rank0, log)
    with pytest.raises(CollectiveError, match=r"%d\.sum = all_reduce: this is one rank's "
                                              r"program \(the sum spans 2 ranks\)"):
        runner({"x": _feeds(1)["x"]})
    assert log == []  # refused before any copy or launch
    collectives.install(SimpleNamespace(world_size=4))
    with pytest.raises(CollectiveError, match="the sum spans 2 ranks, the process group has 4"):
        runner({"x": _feeds(1)["x"]})
    # a communicator without a device path says so, naming nothing partial as the result
    collectives.install(type("HostOnly", (Communicator,), {"world_size": 2})())
    with pytest.raises(CollectiveError, match="sums host arrays only"):
        runner({"x": _feeds(1)["x"]})


LANES = """module @m {
  func @main(%x: tensor<[4, 8], f16>, %z: tensor<[4, 8], f16>) -> ("y": tensor<[4, 8], f16>) {
    %p = sigmoid(%x) : tensor<[4, 8], f16>
    %p2 = sigmoid(%z) : tensor<[4, 8], f16>
    %s = all_reduce(%p) {op = "sum", world = 2} : tensor<[4, 8], f16>
    %q = sigmoid(%z) : tensor<[4, 8], f16>
    %t = neg(%x) : tensor<[4, 8], f16>
    %a = add(%s, %q) : tensor<[4, 8], f16>
    %y = add(%a, %t) : tensor<[4, 8], f16>
    return %y
  }
}"""


def test_concurrent_runs_never_cross_a_collective(no_communicator):
    """Launches on either side of the collective touch disjoint memory (they would run
    together without it); each segment's runs stay inside it."""
    m = parse_module(LANES)
    log = []
    collectives.install(_Comm(log))
    runner = _runner(m, log)
    x = np.ones((4, 8), np.float16)
    runner({"x": x, "z": x})
    sig = next(iter(runner._signatures.values()))
    assert [item[0] for item in sig.program] == ["launch", "collective", "launch"]
    seg0, seg1 = runner.launcher.tables
    # p and p2 together, then the copy alone; q and t together, then the adds
    assert [(k, c) for k, c, _ in seg0] == [(STEP_OP, 2), (STEP_OP, 0), (STEP_COPY, 1)]
    assert [c for _, c, _ in seg1][:2] == [2, 0]
    for table in (seg0, seg1):  # every run ends inside its table
        i = 0
        while i < len(table):
            assert table[i][1] >= 1 and i + table[i][1] <= len(table)
            i += table[i][1]
    # the whole program's runs: the collective is alone
    at = len(seg0)
    assert sig.runs[at] == 1 and all(i + r <= at for i, r in enumerate(sig.runs[:at]))


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_tp2_cuda_artifact_records_the_device_plan_with_its_collective(tmp_path):
    from qcompiler.driver.api import compile_to_dir

    out, _ = compile_to_dir(_module(act_order=True), "cuda-sm90:tp=2", str(tmp_path / "tp2"))
    for r in range(2):
        with open(tmp_path / "tp2" / f"rank{r}" / "manifest.json") as f:
            manifest = json.load(f)
        (plan,) = [k for k in manifest["kernels"] if k["op"] == "plan"]
        assert plan["impl"] == "cuda-plan", plan.get("reason")
        assert plan["segments"] == 2
        assert [(c["result"], c["world"]) for c in plan["collectives"]] == [("d.sum", 2)]
        assert not any("all_reduce" in str(k.get("reason", "")) for k in manifest["kernels"])
        assert manifest["host_fallback"] == []
