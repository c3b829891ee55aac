"""Whole models on the GPU: the executable plan with every step a CUDA kernel, launched from
native code and replayed as a CUDA graph.

Compile time (``build_plan``, called by the CUDA backend): the plan (``qcompiler.plan.lower``)
of the packed module; one op kernel per ``kernel`` step that is not a qmatmul, plus one per
qmatmul epilogue that the qmatmul kernel does not apply itself (an epilogue whose extra
operands all have the product's shape is applied as y is stored, ``epilogue.py``; any other
runs as a synthetic ``fused_elementwise`` node whose ``x0`` is the product, in place on the
qmatmul's output), all in ``kernels/cuda_ops.so``; and the launcher
``kernels/qc_plan.so`` (``templates/qc_plan.cu``).

Why a step table interpreted by a small C++ launcher rather than a generated C++ function per
plan: the steps' pointers and dims are known only per input signature (shape functions,
bucket arenas, host values), so a generated function would still read them from a table; the
launcher is the same few lines for every model (built once, cached), and the per-model code
is only the kernels. Per run nothing happens per op on the host: the table is captured once
per (bucket, signature) as a CUDA graph and each run is one ``cudaGraphLaunch``. The capture
waits for a signature's second run (``CAPTURE_AFTER_USES``): the first runs the table from
the launcher directly, as fast to enqueue as a capture, so a signature used once (a
generation loop's, whose KV cache grows a token a call) never pays the graph's
instantiation.

Run time (``CudaPlanRunner``, no TVM, no torch): the device is touched on the first run;
weights are uploaded once; per bucket one device arena (the memory plan's offsets); inputs,
outputs, workspaces and host values in buffers the runner shares between signatures (grown as
needed, ``_slot``). Per input signature the shape functions are evaluated on the host (only
those that read a dim that changed), and the table is built from the last signature's: only
the steps over a buffer that moved or changed shape get new rows, so a decode step whose KV
cache grew by a token rebuilds its attention and cache appends and allocates nothing (the
graph is captured at a signature's second run). Consecutive launches that
touch disjoint memory (``concurrent_runs``: none reads or writes what another writes) are
marked to run concurrently, on side streams forked from the plan's stream: the graph gets
parallel branches (``QC_CUDA_LANES=1`` turns this off). A run copies the inputs into
their buffers (host to device for numpy, device to device for torch CUDA tensors and objects
with ``__cuda_array_interface__``), launches the graph and returns the outputs (numpy, or
torch CUDA tensors when the inputs were). A KV cache is an output fed back as an input: keep
it as a torch CUDA tensor and it never leaves the device. A decode step whose cache length
reaches only casts, concats, copies, qkv_heads and attention runs as the step of its cache's
capacity (``cache_capacity.py``): one signature and graph for every length up to it, the
caches copied into and out of padded rows, a device word holding the padding. A decode
session (``session()``, ``kv_state.py``) keeps such a step's caches on the device as state
instead: its signature writes each layer's new row in place and has no cast or concat of
the caches, and nothing of them is copied per step.

Collectives (tensor parallelism, issue #17): in a rank program an ``all_reduce`` with one
operand (its own partial) and ``world`` > 1 is a **collective step**. Its launch is a device
copy of the operand's buffer into the result's (the memory plan gives them separate buffers;
the copy is a few KB per token and keeps the operand's buffer free for in-place reuse), and
the plan's launches are split into **segments** at it (``plan_segments``): the runner replays
segment k, then calls the installed communicator's ``all_reduce_device`` in place on the
result buffer on the plan's stream (``qcompiler.runtime.collectives``: NCCL through
torch.distributed under ``torch.cuda.ExternalStream``), then segment k + 1; no host sync in
between. Each segment is captured as its own CUDA graph and the collective runs outside the
graphs: capturing NCCL inside our raw stream capture would tie the graph to
torch.distributed's internal streams and its lazily created communicator, one host call per
collective costs little beside it, and a plan without collectives is one segment, one graph
as before. A collective is a barrier for the concurrent lanes (a ``solo`` entry in
``concurrent_runs``): no run of concurrent launches crosses it. Without an installed
communicator (a rank artifact loaded alone) the run is refused before anything is launched,
with the reference's ``CollectiveError`` naming the node. An ``all_reduce`` of one operand and
``world`` 1 is the copy alone; one with several operands (the global view) has no kernel.
"""
from __future__ import annotations

import array
import ctypes
import math
import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from qcompiler.codegen.cuda.cache_capacity import CachePadding
from qcompiler.codegen.cuda.epilogue import epilogue_in_kernel
from qcompiler.codegen.cuda.ops.common import PAD_AWARE_OPS
from qcompiler.errors import InputError
from qcompiler.ir import elem
from qcompiler.ir.core import Node, Value, constant_value
from qcompiler.ir.ops import (QMATMUL_FIXED_OPERANDS, qmatmul_epilogue_operands,
                              qmatmul_x_norm_operands)
from qcompiler.plan.memory import MemoryPlans
from qcompiler.plan.shapes import ConstantCache, ShapeDependencies, resolve
from qcompiler.runtime.collectives import all_reduce_device, communicator_for

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
LAUNCHER_SOURCE = os.path.join(TEMPLATES, "qc_plan.cu")
LAUNCHER_LIBRARY = "qc_plan.so"
OPS_DIR = "ops"  # kernels/ops/cuda_ops.so
EPILOGUE_SUFFIX = ".epilogue"
STEP_OP, STEP_QMM, STEP_COPY = 0, 1, 2
MAX_LANES = 4  # templates/qc_plan.cu QC_MAX_LANES: launches that may run concurrently
# The runner's shared device buffers that are not plan buffers (CudaPlanRunner._slot); the
# brackets keep them apart from IR value names.
HOST_VALUES, OP_WORKSPACE, QMM_WORKSPACE = "<host values>", "<op workspace>", "<qmatmul workspace>"
CACHE_PADDING = "<cache padding>"  # the device word of a padded signature (cache_capacity.py)


def _overlaps(a: tuple, b: tuple) -> bool:
    """Whether byte ranges (address, size) a and b share a byte."""
    return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def _conflict(a: tuple, b: tuple) -> bool:
    """Whether two launches' accesses (reads, writes, solo) conflict: one writes a byte the
    other reads or writes."""
    (ra, wa, _), (rb, wb, _) = a, b
    return any(_overlaps(w, x) for w in wa for x in rb + wb) or \
        any(_overlaps(w, x) for w in wb for x in ra)


def concurrent_runs(launches: list, max_lanes: int = MAX_LANES, previous: Optional[list] = None,
                    changed: Optional[list] = None) -> list:
    """For each launch, the length of the concurrent run that starts there (0: inside a run).
    ``launches`` are (reads, writes, solo) in plan order, reads and writes lists of byte ranges
    (address, size). A run is consecutive launches none of which reads or writes a range
    another one writes; a ``solo`` launch (one of a pair that must stay in order, a copy) is
    always alone. Greedy from the first launch: one that conflicts with the run starts the
    next run, so the plan's order holds between runs.

    ``previous``: the runs of an earlier list of as many launches, of which ``changed[i]``
    says whether launch i differs. A run that starts where one started before, over launches
    none of which changed (the one that ended it included), is the same run; only the others
    are formed again (a decode step whose cache grew changes a few launches per layer)."""
    n = len(launches)
    before = None  # before[i]: how many launches before i changed
    if previous is not None and len(previous) == n:
        before = [0]
        for c in changed:
            before.append(before[-1] + bool(c))
    runs = [0] * n
    start = 0
    while start < n:
        old = previous[start] if before is not None else 0
        if old and before[min(start + old + 1, n)] == before[start]:
            runs[start] = old
            start += old
            continue
        end = start + 1
        if not launches[start][2]:
            while (end < n and end - start < max_lanes and not launches[end][2]
                   and not any(_conflict(launches[end], launches[j])
                               for j in range(start, end))):
                end += 1
        runs[start] = end - start
        start = end
    return runs


def _same_runs(old: list, new: list, runs: list, changed: dict) -> bool:
    """Whether ``concurrent_runs`` of the launches ``new`` gives ``runs``, those of ``old``,
    when the ``changed`` launches only grew: each byte range keeps its address and does not
    shrink (else False: the caller forms the runs again). Ranges that overlapped still
    overlap, so every conflict that ended a run still ends it; only a run of several
    launches, one of them changed, must be checked again for a new conflict."""
    for j in changed:
        (r0, w0, s0), (r1, w1, s1) = old[j][1], new[j][1]
        if s0 != s1 or len(r0) != len(r1) or len(w0) != len(w1):
            return False
        for a, b in zip(r0 + w0, r1 + w1):
            if a[0] != b[0] or b[1] < a[1]:
                return False
    for start, n in enumerate(runs):
        if n > 1 and any(start <= j < start + n for j in changed):
            members = [new[k][1] for k in range(start, start + n)]
            if any(_conflict(members[a], members[b]) for a in range(n) for b in range(a)):
                return False
    return True


def collective_world(node: Node) -> Optional[int]:
    """For a rank program's all_reduce (one operand: its own partial), the number of ranks the
    sum spans (1: a copy); None for any other node (the global view's all_reduce, with one
    operand per rank, is no collective step and has no CUDA kernel)."""
    if node.op != "all_reduce" or len(node.operands) != 1:
        return None
    return int(node.attrs.get("world", 1))


def plan_segments(module, plan) -> list:
    """The device plan split at its collective steps, in order: per segment ``steps`` (the
    node names of its launching steps, a collective step's copy included) and ``collective``,
    the collective that runs after it ({node, operand, buffer, world}: summed in place in
    ``buffer``, the result's) or None for the last segment."""
    nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    segments = [{"steps": [], "collective": None}]
    for step in plan.steps:
        if step.kind in ("view", "host"):
            continue
        segments[-1]["steps"].append(step.node)
        world = collective_world(nodes[step.node]) if step.kind == "kernel" else None
        if world is not None and world > 1:
            segments[-1]["collective"] = {"node": step.node, "operand": step.inputs[0],
                                          "buffer": step.outputs[0], "world": world}
            segments.append({"steps": [], "collective": None})
    return segments


def epilogue_node(node: Node) -> Node:
    """qmatmul's epilogue as a node of its own: fused_elementwise(product, extras...) with the
    product's type, run in place on the product (out[i] reads only in[i])."""
    extras = qmatmul_epilogue_operands(node)
    result = Value(node.result.name + EPILOGUE_SUFFIX, node.result.type)
    return Node("fused_elementwise", [node.result] + extras, [result],
                {"body": node.attrs["epilogue"]})


def op_nodes(module, plan) -> list:
    """The nodes whose kernels go into cuda_ops.so, in step order."""
    nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    out = []
    for step in plan.steps:
        if step.kind != "kernel":
            continue
        node = nodes[step.node]
        if node.op == "qmatmul":
            if "epilogue" in node.attrs and not epilogue_in_kernel(node):
                out.append(epilogue_node(node))
        elif collective_world(node) is None:  # a collective step is a copy and the collective
            out.append(node)
    return out


def build_plan(module, target, kdir: str) -> dict:
    """Build cuda_ops.so and qc_plan.so for ``module``'s plan; the manifest's ``cuda_plan``
    record. Raises CudaOpsError naming the first op without a CUDA kernel."""
    from qcompiler.codegen.cuda.build import build_cached
    from qcompiler.codegen.cuda.ops.library import LIBRARY_NAME, build_cuda_ops_library
    from qcompiler.plan import lower_steps

    # The steps only: memory plans are the artifact's (its buckets, qcompiler.plan), and the
    # default buckets may not even be valid for the model (a 64-position GPT-2 at seq 128).
    plan = lower_steps(module)
    nodes = op_nodes(module, plan)
    ops_dir = os.path.join(kdir, OPS_DIR)
    if nodes:
        symbols = build_cuda_ops_library(nodes, target, ops_dir, module=module)
    else:
        symbols = {}
    launcher = os.path.join(kdir, "qc_plan.cu")
    with open(LAUNCHER_SOURCE) as f, open(launcher, "w") as g:
        g.write(f.read())
    build_cached(launcher, os.path.join(kdir, LAUNCHER_LIBRARY), [target.params["arch"]])
    segments = plan_segments(module, plan)
    record = {"op": "plan", "impl": "cuda-plan", "symbols": symbols,
              "ops_library": f"{OPS_DIR}/{LIBRARY_NAME}" if nodes else None,
              "launcher": LAUNCHER_LIBRARY, "steps": len(plan.steps)}
    collectives = [s["collective"] for s in segments if s["collective"]]
    if collectives:  # the runner needs a communicator (torch.distributed): said in the record
        record["collectives"] = [{"result": c["node"], "world": c["world"],
                                  "engine": "torch.distributed (qcompiler.runtime.collectives)"}
                                 for c in collectives]
        record["segments"] = len(segments)
    return record


def step_table_text(module, plan, symbols: dict) -> str:
    """The launcher's step table for ``plan`` as text, one line per launch (goldens, docs):
    kind, kernel symbol, and the buffers its pointers come from."""
    nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    lines = [f"// plan @{plan.function}: {len(plan.steps)} steps, buckets "
             f"{[b.bounds for b in plan.buckets]}"]
    for step in plan.steps:
        if step.kind in ("view", "host"):
            lines.append(f"  -- {step.kind:<6} %{step.node} = {step.op} (no launch)")
        elif step.kind == "copy":
            lines.append(f"  COPY   %{step.inputs[0]} -> {step.outputs[0]}")
        elif collective_world(nodes[step.node]) is not None:
            world = collective_world(nodes[step.node])
            lines.append(f"  COPY   %{step.inputs[0]} -> %{step.outputs[0]}")
            if world > 1:
                lines.append(f"  == ALL_REDUCE sum %{step.outputs[0]} in place, world {world}"
                             " (communicator, between segments)")
        elif step.op == "qmatmul":
            node = nodes[step.node]
            x = f"x=%{step.inputs[0]}"
            if node.attrs.get("x_norm"):  # fuse-norm-qmatmul: the kernel normalizes x first
                x = f"x={node.attrs['x_norm']}norm(%{step.inputs[0]}, " + ", ".join(
                    "none" if v is None else "%" + v.name
                    for v in qmatmul_x_norm_operands(node)) + ")"
            if epilogue_in_kernel(node):
                extras = "".join(f" %{v.name}" for v in qmatmul_epilogue_operands(node))
                lines.append(f"  QMM    %{step.node}: {x} w=%{step.inputs[1]}"
                             f" epilogue({node.attrs['epilogue']}) extras:{extras or ' none'}")
                continue
            lines.append(f"  QMM    %{step.node}: {x} w=%{step.inputs[1]}")
            if "epilogue" in node.attrs:
                ins = ", ".join("%" + v.name
                                for v in [node.result] + qmatmul_epilogue_operands(node))
                lines.append(f"  OP     {symbols[node.result.name + EPILOGUE_SUFFIX]}"
                             f"({ins}) -> %{step.node} (epilogue, in place)")
        else:
            ins = ", ".join("%" + n for n in step.inputs if n is not None)
            outs = ", ".join("%" + n for n in step.outputs)
            lines.append(f"  OP     {symbols[step.node]}({ins}) -> {outs}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# run time
# ------------------------------------------------------------------------------------------


class QcStep(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("fn", ctypes.c_void_p),
                ("ptrs", ctypes.POINTER(ctypes.c_void_p)),
                ("shapes", ctypes.POINTER(ctypes.c_int64)), ("workspace", ctypes.c_void_p),
                ("m", ctypes.c_int64), ("variant", ctypes.c_int64),
                ("epilogue", ctypes.c_int64), ("concurrent", ctypes.c_int64)]


def _device_pointer(x) -> Optional[int]:
    """The device address of a CUDA array (torch tensor, __cuda_array_interface__), else None."""
    if type(x).__module__.startswith("torch") and getattr(x, "is_cuda", False):
        return int(x.data_ptr())
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        return int(cai["data"][0])
    return None


def _row_arrays(ptrs: list, dims: list) -> tuple:
    """The ctypes pointer and flattened-shape arrays a table row points to. One spare pointer
    slot: a fused epilogue's extras start at ptrs[9], even when it has none. (array.array
    then one copy: a third of the time of ctypes' own constructors, per launch of every new
    signature.)"""
    ps = array.array("Q", [p or 0 for p in ptrs] + [0])
    flat = array.array("q", [int(v) for s in dims for v in s] or [0])
    return ((ctypes.c_void_p * len(ps)).from_buffer_copy(ps),
            (ctypes.c_int64 * len(flat)).from_buffer_copy(flat))


class _Layout:
    """Where each plan buffer of the last prepared signature lies and its shape, and each
    launching step's launches (``CudaPlanRunner._step_launches``): what the next signature
    starts from."""

    def __init__(self, arena_key: tuple, arena: int, inputs: dict):
        self.arena_key, self.arena, self.inputs = arena_key, arena, inputs
        self.ptr: dict = {}      # buffer -> device address
        self.shape: dict = {}    # buffer -> shape
        self.entries: dict = {}  # step index -> its launches
        # the signature's launches, their concurrent runs, table rows and tables (_tables)
        self.launches: list = []
        self.runs: list = []
        self.rows: list = []
        self.tables: list = []   # (QcStep table, launch indices) per segment
        self.signature = None    # the signature prepared with it (_reshape_last)
        # the launching steps whose launches (and their arrays) were built for that signature:
        # the others' it shares with the signature it was prepared from
        self.fresh: frozenset = frozenset()
        self.first_launch: dict = {}  # step index -> the index of its first launch
        self.padded = False  # its pad-aware launches read the cache padding word


class _Signature:
    """Buffers, step table and graph of one input-shape signature."""

    def __init__(self):
        self.inputs: dict = {}      # name -> (ptr, shape, dtype)
        self.outputs: dict = {}     # buffer -> (ptr, shape, dtype)
        self.keep: list = []        # per launch, the ctypes arrays its table row points to
        self.slots: dict = {}       # the runner's shared buffers it uses: name -> address
        self.host_block = None      # its host values, as HOST_VALUES holds them (or None)
        self.runs: list = []        # concurrent_runs of the launches, collectives included
        self.labels: list = []      # per launch: "%node = op" (errors, profiles)
        # the segments and collectives in order: ("launch", table, n, graph or None, index of
        # the segment's first launch) and ("collective", node, ptr, shape, dtype, world)
        self.program: list = []
        self.uses = 0                # runs so far (the graphs are captured at the second)
        self.collectives: list = []  # (node, world) of the collective items
        self.bound: set = set()      # inputs read in place from the caller's device buffers
        self.arena_key: tuple = ()   # the memory plan whose arena its launches use
        # a capacity's signature (cache_capacity.py): where the padding lies, else None
        self.padding = None
        # a decode session's (kv_state.py): the KV state it updates in place, else None
        self.state = None

    # A plan without collectives is one launch segment: its table, launch count and graph
    # (what benchmarks and tests replay directly); with collectives there is no single graph.
    def _single(self):
        launches = [item for item in self.program if item[0] == "launch"]
        return launches[0] if len(launches) == 1 and not self.collectives else None

    @property
    def table(self):
        one = self._single()
        return one[1] if one else None

    @property
    def n(self) -> int:
        """Launches of the signature, over all segments."""
        return sum(item[2] for item in self.program if item[0] == "launch")

    @property
    def graph(self):
        one = self._single()
        return one[3] if one else None


class CudaPlanRunner:
    """``run({name: array})`` of a CUDA artifact with a device plan (see the module doc)."""

    def __init__(self, module, manifest: dict, out_dir: str, record: dict):
        from qcompiler.codegen.cuda.runtime import CudaModuleRunner

        self.module = module
        self.manifest = manifest
        self.out_dir = out_dir
        self.record = record
        self.qmm = CudaModuleRunner(module, manifest, out_dir)  # paths, qmatmul kernels
        self.target = manifest["target"]
        self.use_graphs = os.environ.get("QC_CUDA_GRAPHS", "1") != "0"
        self.capture_after_uses = max(1, int(os.environ.get("QC_CUDA_CAPTURE_AFTER",
                                                            self.CAPTURE_AFTER_USES)))
        self.lanes_wanted = max(1, min(MAX_LANES, int(os.environ.get("QC_CUDA_LANES", MAX_LANES))))
        self.plan = None
        self._loaded = False
        self._init_signature_state()

    def _init_signature_state(self) -> None:
        """The per-signature caches, empty (also what the recorder tests start from)."""
        self._signatures: dict = {}
        self._arenas: dict = {}
        # Device inputs bound in place (no copy into the shared input buffers): per shape
        # signature the last call's device pointers, and the signatures whose graphs read the
        # caller's buffers directly, keyed (shape signature, pointers).
        self._last_pointers: dict = {}
        self._bound: dict = {}
        self.last_signature: Optional[_Signature] = None  # the last call's (see __call__)
        # Both kinds of signature in order of use, least recent first: (id(store), key) ->
        # (store, key). Past MAX_SIGNATURES the least recent one is released (_touch).
        self._recent: OrderedDict = OrderedDict()
        # host values that depend on no input shape, computed by the first signature's
        # resolve and reused by every later one (a decode loop prepares one per token)
        self._constants = ConstantCache()
        self._dependencies: Optional[ShapeDependencies] = None  # the plan's (_plan_index)
        self._reshaped_cache: dict = {}      # changed input dims -> buffers (_reshaped)
        self._op_operands_cache: dict = {}   # step index -> _op_operands
        self._epilogue_in_kernel: dict = {}  # qmatmul node -> epilogue_in_kernel
        self._kernel_addresses: dict = {}    # qmatmul node -> its kernel's address
        self._op_addresses: dict = {}        # op kernel symbol -> its address
        # memory plans: a bucket's, or beyond them one per size class of the dims, the
        # MAX_EXACT_PLANS most recent kept (MemoryPlans; made when the plan is loaded). A
        # dropped plan's arena is freed once no kept signature launches over it.
        self._plans: Optional[MemoryPlans] = None
        self._retired: set = set()  # arena keys of dropped plans still in use
        self._slots: dict = {}  # shared device buffers (_slot): name -> (address, bytes)
        self._layout: Optional[_Layout] = None  # the last prepared signature's (_prepare)
        # host values: each one's room in the HOST_VALUES block, their offsets and the
        # block's size (_place_host_values)
        self._host_room: dict = {}
        self._host_offsets: Optional[dict] = None
        self._host_bytes = 0
        # per HOST_VALUES buffer (the current one, replaced ones still in use), the
        # signature whose block it holds
        self._host_owners: dict = {}
        self._retired_slots: set = set()  # replaced shared buffers still in use (_slot)
        # the plan's cache length, when its decode steps share a capacity's graph (_plan_index)
        self._padding: Optional[CachePadding] = None
        self._pad_written = None     # (address, value) of the last padding word copied
        # decode sessions (kv_state.py): the plan's state pairs (or why none) and the
        # sessions' signatures, which the runner's shared buffers must outlive
        self._kv_state: Optional[tuple] = None
        self._state_signatures: list = []

    # -- loading ---------------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        from qcompiler.driver.artifact import KERNELS_DIR, artifact_path

        return artifact_path(self.out_dir, self.manifest, f"{KERNELS_DIR}/{rel}",
                             f"cuda_plan {rel}")

    def load_device(self) -> None:
        if self._loaded:
            return
        from qcompiler.codegen.cuda.ops.library import CudaOpsLibrary
        from qcompiler.plan import lower

        self.qmm.load_device()  # raises DeviceUnavailableError without a GPU
        self.rt = self.qmm.rt
        from qcompiler.plan.plan import plan_from_json

        # The artifact's plan (its buckets as compiled), else the default buckets.
        self.plan = (plan_from_json(self.manifest["plan"]) if self.manifest.get("plan")
                     else lower(self.module))
        if self.plan.tail_roots:  # (build_plan refuses such a model: no CUDA kernel for them)
            from qcompiler.plan.plan import PlanError

            raise PlanError("the device plan covers whole models; this one's plan stops at the "
                            "data-dependent " + ", ".join(f"%{r}" for r in self.plan.tail_roots))
        self.nodes = {n.results[0].name: n for n in self.module.main.nodes if n.results}
        lib = ctypes.CDLL(self._path(self.record["launcher"]))
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        lib.qc_plan_launch.argtypes = [ctypes.POINTER(QcStep), I64, P, P, ctypes.POINTER(I64)]
        lib.qc_plan_capture.argtypes = [ctypes.POINTER(QcStep), I64, P, P, ctypes.POINTER(P),
                                        ctypes.POINTER(I64)]
        lib.qc_lanes_create.argtypes = [ctypes.POINTER(P)]
        lib.qc_graph_launch.argtypes = [P, P]
        lib.qc_graph_destroy.argtypes = [P]
        lib.qc_stream_create.argtypes = [ctypes.POINTER(P)]
        lib.qc_stream_synchronize.argtypes = [P]
        lib.qc_copy_async.argtypes = [P, P, ctypes.c_size_t, ctypes.c_int, P]
        size = ctypes.c_size_t
        lib.qc_copy2d_async.argtypes = [P, size, P, size, size, size, ctypes.c_int, P]
        lib.qc_event_create.argtypes = [ctypes.POINTER(P)]
        lib.qc_stream_wait.argtypes = [P, P, P]
        self.launcher = lib
        stream = P()
        self._check(lib.qc_stream_create(ctypes.byref(stream)), "cudaStreamCreate")
        self.stream = stream.value
        # two events: our stream after the caller's (inputs written), the caller's after ours
        self._order_events = []
        for _ in range(2):
            event = P()
            self._check(lib.qc_event_create(ctypes.byref(event)), "cudaEventCreate")
            self._order_events.append(event.value)
        self.lanes = None  # side streams for concurrent launches (None: one stream)
        if self.lanes_wanted > 1:
            lanes = P()
            self._check(lib.qc_lanes_create(ctypes.byref(lanes)), "creating the side streams")
            self.lanes = lanes.value
        self.ops = (CudaOpsLibrary(self._path(self.record["ops_library"]))
                    if self.record.get("ops_library") else None)
        self.symbols = self.record["symbols"]
        # Weights the op kernels read (qmatmul kernels hold their own packed constants).
        self.weights: dict = {}
        for step in self.plan.steps:
            if step.kind != "kernel" or step.op == "qmatmul":
                continue
            for name in step.inputs:
                if name is not None and self.plan.buffers[name].kind == "weight" \
                        and name not in self.weights:
                    node = self.nodes[name]
                    a = np.ascontiguousarray(constant_value(self.module, node.result))
                    self.weights[name] = (self.rt.upload(a) if a.nbytes else 0, a.shape)
        for step in self.plan.steps:  # qmatmul epilogue operands that are weights
            node = self.nodes.get(step.node)
            if step.op == "qmatmul" and node is not None:
                for v in node.operands[QMATMUL_FIXED_OPERANDS:]:  # and x_norm's scale
                    if v is not None and v.producer is not None \
                            and v.producer.op == "constant" and v.name not in self.weights:
                        a = np.ascontiguousarray(constant_value(self.module, v))
                        self.weights[v.name] = (self.rt.upload(a) if a.nbytes else 0, a.shape)
        self._loaded = True

    def _check(self, err: int, what: str) -> None:
        if err:
            from qcompiler.codegen.cuda.runtime import CudaRuntimeError

            raise CudaRuntimeError(f"{what}: CUDA error {err} ({self.rt.error(err)})")

    # -- per signature ---------------------------------------------------------------------
    def _arena(self, mem) -> int:
        ptr, size = self._arenas.get(mem.key(), (0, -1))
        if size < mem.peak_bytes:
            if ptr:
                self.rt.free(ptr)
            ptr = self.rt.malloc(max(mem.peak_bytes, 1))
            self._arenas[mem.key()] = (ptr, mem.peak_bytes)
        return ptr

    # A shared buffer that is too small is replaced by one this much larger (or the size
    # asked, if more): a KV cache that grows by a token a call moves its input and output
    # buffers a logarithmic number of times, not once a token.
    SLOT_GROWTH = 1.25

    def _slot(self, name: str, nbytes: int, zeroed: bool = False) -> int:
        """The device buffer ``name`` (a plan input or output, a workspace, HOST_VALUES), at
        least ``nbytes`` long, shared by every signature. Signatures run one at a time on the
        plan's stream, each run copies its inputs in and its outputs out, and the kernels
        leave the workspaces' counters at zero: so they can share these buffers as they share
        a bucket's arena, and a new signature allocates nothing. One too small is replaced
        (SLOT_GROWTH); the old one is kept for the signatures that launch over it and freed
        with the last of them (``_release``). ``zeroed``: set to zero when allocated."""
        ptr, capacity = self._slots.get(name, (0, -1))
        if capacity >= nbytes:
            return ptr
        if ptr:
            self._retired_slots.add(ptr)
            self._free_slot_if_unused(ptr)
        capacity = max(int(nbytes), int(capacity * self.SLOT_GROWTH), 256)
        ptr = self.rt.malloc(capacity)
        if zeroed:
            self.rt.memset(ptr, capacity)
        self._slots[name] = (ptr, capacity)
        return ptr

    def _free_slot_if_unused(self, ptr: int) -> None:
        """Free a replaced shared buffer once no kept signature launches over it."""
        if any(ptr in sig.slots.values() for sig in self._kept_signatures()):
            return
        # launches over it may still be in flight (a run returns before they finish)
        self._check(self.launcher.qc_stream_synchronize(self.stream), "freeing a buffer")
        self.rt.free(ptr)
        self._retired_slots.discard(ptr)
        self._host_owners.pop(ptr, None)

    def _plan_index(self) -> None:
        """What every signature's preparation looks up, computed once per runner."""
        plan = self.plan
        self._dependencies = ShapeDependencies(plan, self.module)
        from qcompiler.plan.executor import buffer_dependencies

        self._buffer_deps = buffer_dependencies(plan, self._dependencies)
        self._itemsizes = {n: elem(b.dtype).np_dtype.itemsize for n, b in plan.buffers.items()}
        self._dtypes = {n: elem(b.dtype).np_dtype for n, b in plan.buffers.items()}
        # an output buffer's shape is its value's, or for a copied output its source's
        copies = {s.outputs[0]: s.inputs[0] for s in plan.steps if s.kind == "copy"}
        self._output_sources = {n: n if n in self._dependencies.values else copies[n]
                                for n, b in plan.buffers.items() if b.kind == "output"}
        self._host_names = [n for n, b in plan.buffers.items() if b.kind == "host"]
        roots = {n: plan.buffers[b.alias_of or n] for n, b in plan.buffers.items()
                 if b.kind in ("arena", "view")}
        self._arena_buffers = [n for n, r in roots.items() if r.kind == "arena"]
        # views of an input, output, weight or host value: placed after their roots
        self._other_views = [(n, r.name) for n, r in roots.items() if r.kind != "arena"]
        self._views_of: dict = {}  # root buffer -> its views
        for n, b in plan.buffers.items():
            if b.kind == "view" and b.alias_of:
                self._views_of.setdefault(b.alias_of, []).append(n)
        # per buffer, the steps that launch over it (rebuilt when it moves or changes shape)
        self._steps_of: dict = {}
        for i, step in enumerate(plan.steps):
            if step.kind in ("view", "host"):
                continue
            for n in step.inputs + step.outputs:
                if n is not None:
                    self._steps_of.setdefault(n, set()).add(i)
            node = self.nodes.get(step.node)
            if step.op == "qmatmul" and node is not None:  # fused epilogue operands
                for v in qmatmul_epilogue_operands(node):
                    if v is not None:
                        self._steps_of.setdefault(v.name, set()).add(i)
        self._launch_steps = [i for i, s in enumerate(plan.steps) if s.kind not in ("view", "host")]
        # the buffers whose address a signature sets (the others lie in the arena)
        self._direct = (list(plan.inputs) + list(self._output_sources) + self._host_names
                        + [n for n, _ in self._other_views])
        # decode steps of every cache length up to a capacity share one signature
        # (cache_capacity.py); the launcher of an artifact built before has no 2-D copy
        self._pad_aware_steps = {i for i, s in enumerate(plan.steps)
                                 if s.kind == "kernel" and s.op in PAD_AWARE_OPS}
        self._padding = None
        if self.pad_caches and hasattr(self.launcher, "qc_copy2d_async"):
            self._padding = CachePadding.find(plan, self.module, self.nodes, self._buffer_deps)

    def _reshaped(self, changed: frozenset) -> list:
        """The buffers whose shape may differ when the input dims ``changed`` change (every
        buffer of an unknown dependency); once per set."""
        hit = self._reshaped_cache.get(changed)
        if hit is None:
            hit = self._reshaped_cache[changed] = [
                n for n, deps in self._buffer_deps.items() if deps is None or deps & changed]
        return hit

    def _prepare(self, shapes: dict, bound: Optional[dict] = None,
                 padding=None, state=None) -> _Signature:
        """The step table of one shape signature. ``bound``: input name -> the caller's device
        pointer, read in place by the launches. ``padding`` (a ``CacheLayout``): ``shapes``
        are a capacity's, and the pad-aware launches read the padding word
        (cache_capacity.py). ``state`` (a ``kv_state.StateBinding``, with ``padding``): a
        decode session's signature, its caches updated in place in the session's state
        buffers (kv_state.py): prepared from nothing, and not what later signatures start
        from.

        It starts from the last signature's (``_Layout``): inputs, outputs, workspaces and
        host values lie in the runner's shared buffers (``_slot``) and intermediates in the
        bucket's arena, so a buffer moves only when a shared buffer grows, the bucket changes
        or the caller binds its own; only the steps over a buffer that moved or changed shape
        are built again. A decode step whose KV cache grew by a token rebuilds the steps that
        read its length (the cache appends, attention, the presents) and allocates nothing."""
        plan = self.plan
        if self._dependencies is None:
            self._plan_index()
        # only what depends on the dims that changed since the last resolve is evaluated
        resolved = resolve(plan, self.module, shapes, self._constants, self._dependencies)
        if self._plans is None:
            self._plans = MemoryPlans(plan, self.module, self._constants,
                                      self.MAX_EXACT_PLANS, on_drop=self._retire_arena)
        mem = self._plans.for_dims(resolved.dims)
        self._retired.discard(mem.key())  # a class that came back keeps its arena
        arena = self._arena(mem)
        base = self._layout if state is None else None
        if base is not None and (base.arena_key != mem.key() or base.arena != arena):
            base = None  # another arena: every intermediate moved
        sig = _Signature()
        sig.arena_key = mem.key()
        now = _Layout(mem.key(), arena, resolved.inputs)
        now.padded, sig.padding, sig.state = padding is not None, padding, state
        kept = state.kv if state is not None else None  # the caches the session keeps
        shape_of = now.shape = dict(resolved.shapes)
        if base is not None:
            ptr = now.ptr = dict(base.ptr)
        else:
            ptr = now.ptr = {n: arena + mem.offsets[self.plan.buffers[n].alias_of or n]
                             for n in self._arena_buffers}
        # the padding word, which the pad-aware launches read after their operands
        ptr.pop(CACHE_PADDING, None)
        if padding is not None:
            ptr[CACHE_PADDING] = sig.slots[CACHE_PADDING] = self._slot(CACHE_PADDING, 8)
        dtypes, itemsize = self._dtypes, self._itemsizes

        for name in plan.inputs:
            shape = tuple(shapes[name])
            if kept is not None and name in kept.inputs:  # (in the state: never copied)
                ptr[name] = 0
                sig.inputs[name] = (0, shape, dtypes[name])
                continue
            if bound and name in bound:
                ptr[name] = bound[name]
                sig.bound.add(name)
            else:
                ptr[name] = sig.slots[name] = self._slot(name, math.prod(shape) * itemsize[name])
            sig.inputs[name] = (ptr[name], shape, dtypes[name])
        for name, src in self._output_sources.items():
            shape = shape_of[name] = tuple(resolved.shapes[src])
            if kept is not None and name in kept.outputs:  # (read from the state on demand)
                ptr[name] = 0
                sig.outputs[name] = (0, shape, dtypes[name])
                continue
            ptr[name] = sig.slots[name] = self._slot(name, math.prod(shape) * itemsize[name])
            sig.outputs[name] = (ptr[name], shape, dtypes[name])
        for name, (p, shape) in self.weights.items():
            ptr[name], shape_of[name] = p, shape
        # the input dims that differ from the last signature's (None: start from nothing)
        changed = None if base is None else \
            self._dependencies.changed(resolved.inputs, base.inputs)
        self._place_host_values(sig, resolved, ptr, shape_of, base, changed)
        for name, root in self._other_views:
            if root in ptr:
                ptr[name] = ptr[root]
        launch_steps = self._launch_steps
        if state is not None:  # the layers' caches in the state; no casts or concats of them
            state.place(ptr, shape_of, itemsize, self._views_of)
            launch_steps = [i for i in launch_steps if i not in state.skipped]

        # the steps to build: all of them, or those over a buffer that moved or was reshaped
        if base is None:
            rebuild = launch_steps
            entries = now.entries = {}
        else:
            entries = now.entries = dict(base.entries)
            moved = {n for n in self._reshaped(changed) if shape_of.get(n) != base.shape.get(n)}
            relocated = [n for n in self._direct if ptr.get(n) != base.ptr.get(n)]
            moved.update(relocated)
            rebuild = {i for n in moved for i in self._steps_of.get(n, ())}
            if now.padded != base.padded:
                # the pad-aware launches' pointers differ between padded and exact tables
                rebuild |= self._pad_aware_steps
            rebuild = sorted(rebuild)
            # (a padded signature serves many lengths: never reshaped, nor made from one)
            in_place = not relocated and not now.padded and not base.padded
            reshaped = None if not in_place else self._reshape_last(base, sig, now, moved,
                                                                    rebuild, bound)
            if reshaped is not None:
                return reshaped
        for i in rebuild:
            entries[i] = self._step_launches(plan.steps[i], ptr, shape_of)
        if state is None:
            self._layout = now
        now.signature, now.fresh = sig, frozenset(rebuild)
        self._tables(sig, launch_steps, [entries[i] for i in launch_steps], base, now)
        return sig

    def _reshape_last(self, base: _Layout, sig: _Signature, now: _Layout, moved: set,
                      rebuild: list, bound: Optional[dict]) -> Optional[_Signature]:
        """The last signature, made this one in place, when only the shapes of some op
        launches differ: a generation loop's next token (the cache one row longer), whose
        last signature ran once, uncaptured, and will not meet its shapes again.

        Its launches keep their table rows and pointer arrays; each changed launch's shape
        array is rewritten in place (the launcher reads it when it enqueues, so the last run
        is not affected), and the signature is re-keyed under the new shapes. Everything
        else must be as ``_prepare`` would build it, or this returns None and ``_prepare``
        builds the signature as usual: no buffer moved (only shapes changed), the changed
        steps are op launches with the same kernels and shape arrays of the same length, the
        op workspace (the largest launch's) and the concurrent runs unchanged. Then the rows
        are those of a signature prepared from nothing (test_cuda_plan_signatures.py), and
        the host work per token is the shape resolve and the changed launches' shapes (a
        third less than a signature prepared from the last one, on the 22-layer decode step;
        codegen/cuda/NOTES.md)."""
        last = base.signature
        # (only arrays built for the last signature are rewritten: another kept signature,
        # the one it was prepared from, may share the rest)
        if (not self.reshape_in_place or bound or last is None or last.bound
                or last.uses > 1 or last.collectives or not base.fresh.issuperset(rebuild)
                or any(item[0] == "launch" and item[3] is not None for item in last.program)):
            # (called only when no input, output or host value moved: ``_prepare``)
            return None
        plan, itemsize = self.plan, self._itemsizes
        ptr, shape_of = now.ptr, now.shape
        entries = dict(base.entries)
        changed = {}  # launch index -> (new launch, flat shapes)
        first_launch, weights = base.first_launch, self.weights

        def span(n):  # as _step_launches takes it
            if n in weights or n not in ptr:
                return (0, 0)
            return (ptr[n], math.prod(shape_of[n]) * itemsize[n])

        for i in rebuild:
            operands = self._op_operands(i)
            old = base.entries[i]
            if operands is None or len(old[0]) != 1:
                return None
            symbol, names, outs = operands
            (kind, fn, parr, sarr, _), (reads, writes, solo), label = old[0][0]
            dims = [shape_of[n] for n in names + outs]
            flat = [v for d in dims for v in d] or [0]
            if kind != "op" or len(flat) != len(sarr):
                return None
            # (the library answers 0 for ops whose workspace does not depend on the shapes)
            ws = self.ops.workspace_bytes(symbol, dims)
            # byte ranges: the last ones where the buffer kept its shape (no buffer moved)
            launch = ((kind, fn, parr, sarr, ws),
                      ([span(n) if n in moved else r for n, r in zip(names, reads)],
                       [span(n) if n in moved else w for n, w in zip(outs, writes)], solo),
                      label)
            entries[i] = ([launch], ws, 0)
            changed[first_launch[i]] = (launch, flat)
        # the op workspace is the largest launch's: unchanged when no rebuilt launch's is
        # (else counted again over every step)
        if any(entries[i][1] != base.entries[i][1] for i in rebuild):
            op_ws = max((e[1] for e in entries.values()), default=0)
            if op_ws != max((e[1] for e in base.entries.values()), default=0):
                return None  # the workspace slots (and every op row's address) would change
        launches = list(base.launches)
        for j, (launch, _) in changed.items():
            launches[j] = launch
        if self.lanes and not _same_runs(base.launches, launches, base.runs, changed):
            return None
        # the same rows: the changed launches' shapes written into their arrays
        rows = list(base.rows)
        for j, (launch, flat) in changed.items():
            sarr = launch[0][3]
            sarr[:] = flat
            rows[j] = (launch[0],) + rows[j][1:]
        last.uses = 0  # a new signature: captured only if it runs twice as it is now
        old_key = tuple(last.inputs[n][1] for n in plan.inputs)
        if self._signatures.get(old_key) is last:
            del self._signatures[old_key]
            self._recent.pop((id(self._signatures), old_key), None)
        last.inputs, last.outputs = sig.inputs, sig.outputs
        # A decode step's host values (the reshapes' shape tensors ...) rarely depend on the
        # cache length: when they are the bytes the shared buffer already holds for it, the
        # next run uploads nothing (from pageable memory, the copy holds the host up)
        unchanged = last.host_block is not None and sig.host_block is not None \
            and np.array_equal(last.host_block, sig.host_block)
        last.host_block = sig.host_block
        host = last.slots.get(HOST_VALUES)
        if host is not None and self._host_owners.get(host) is last and not unchanged:
            del self._host_owners[host]  # the new host values: copied by the next run
        now.entries, now.launches, now.runs, now.rows = entries, launches, base.runs, rows
        now.tables, now.first_launch, now.signature = base.tables, first_launch, last
        now.fresh = base.fresh
        self._layout = now
        return last

    def _op_operands(self, i: int) -> Optional[tuple]:
        """(kernel symbol, operands, results) of plan step ``i`` when it is one op launch (no
        qmatmul, copy or collective), else None; once per step."""
        hit = self._op_operands_cache.get(i, False)
        if hit is False:
            step = self.plan.steps[i]
            hit = None
            if step.kind == "kernel" and step.op != "qmatmul" \
                    and collective_world(self.nodes[step.node]) is None:
                hit = (self.symbols[step.node], [n for n in step.inputs if n is not None],
                       list(step.outputs))
            self._op_operands_cache[i] = hit
        return hit

    def _place_host_values(self, sig: _Signature, resolved, ptr: dict, shape_of: dict,
                           base: Optional[_Layout] = None,
                           changed: Optional[frozenset] = None) -> None:
        """The signature's host values (shape functions' results the kernels read) packed
        into one block, at offsets that stay put unless a value outgrows its room (a power of
        two), uploaded by the run when the shared HOST_VALUES buffer holds another
        signature's. When none of them depends on a dim in ``changed`` (those that differ
        from ``base``'s: a decode loop's next token, 154 values on the 22-layer step, none
        reading the cache length), the base's block serves as it is (the same bytes; a
        block is never written once made)."""
        if not self._host_names:
            return
        last = base.signature if base is not None else None
        if last is not None and changed is not None and last.host_block is not None \
                and HOST_VALUES in last.slots and self._host_offsets is not None:
            deps = self._buffer_deps
            if not any(deps[n] is None or deps[n] & changed for n in self._host_names) \
                    and self._slot(HOST_VALUES, self._host_bytes) == last.slots[HOST_VALUES]:
                sig.slots[HOST_VALUES] = last.slots[HOST_VALUES]  # (the pointers in ptr)
                for n in self._host_names:
                    shape_of[n] = base.shape[n]
                sig.host_block = last.host_block
                return
        arrays = [np.ascontiguousarray(resolved.host[n], self._dtypes[n])
                  for n in self._host_names]
        grown = False
        for n, a in zip(self._host_names, arrays):
            if a.nbytes > self._host_room.get(n, 0):
                self._host_room[n] = max(64, 1 << (a.nbytes - 1).bit_length())
                grown = True
        if grown or self._host_offsets is None:
            offsets, at = {}, 0
            for n in self._host_names:
                offsets[n], at = at, at + self._host_room.get(n, 0)
            self._host_offsets, self._host_bytes = offsets, at
        if not self._host_bytes:
            for n, a in zip(self._host_names, arrays):
                ptr[n], shape_of[n] = 0, a.shape
            return
        base = sig.slots[HOST_VALUES] = self._slot(HOST_VALUES, self._host_bytes)
        block = np.zeros(self._host_bytes, np.uint8)
        for n, a in zip(self._host_names, arrays):
            at = self._host_offsets[n]
            block[at:at + a.nbytes] = a.reshape(-1).view(np.uint8)
            ptr[n] = base + at if a.nbytes else 0
            shape_of[n] = a.shape
        sig.host_block = block

    def _step_launches(self, step, ptr: dict, shape_of: dict) -> tuple:
        """The launches of one plan step: (launches, op workspace bytes, qmatmul workspace
        bytes); a launch is (entry, (reads, writes, solo) byte ranges, label), an entry
        ("op", fn, ptrs, shapes, workspace bytes), ("qmm", fn, ptrs, shapes, M, epilogue in
        the kernel), ("copy", None, ptrs, shapes, bytes) or ("collective", node, pointer,
        shape, dtype, world). ptrs and shapes are the ctypes arrays the table row points to."""
        plan, itemsize = self.plan, self._itemsizes
        label = f"%{step.node or step.outputs[0]} = {step.op or step.kind}"
        launches, op_ws, qmm_ws = [], 0, 0

        def span(name: str) -> tuple:  # (address, bytes) of a buffer; weights are read-only
            if name is None or plan.buffers[name].kind == "weight" or not ptr.get(name):
                return (0, 0)  # (null: a session's past, read in place)
            return (ptr[name], math.prod(shape_of[name]) * itemsize[name])

        def copy(src: str, dst: str):
            nbytes = math.prod(shape_of[dst]) * itemsize[dst]
            launches.append((("copy", None, *_row_arrays([ptr[src], ptr[dst]], []), nbytes),
                             ([span(src)], [span(dst)], True), label))

        def op(symbol: str, names: list, outs: list, solo: bool = False,
               pad: bool = False) -> int:
            names = [n for n in names if n is not None]
            dims = [shape_of[n] for n in names + outs]
            # (after the operands: the padding word a pad-aware kernel reads, or null)
            padding = [ptr[CACHE_PADDING]] if pad and CACHE_PADDING in ptr else []
            parr, sarr = _row_arrays([ptr[n] for n in names + outs] + padding, dims)
            ws = self.ops.workspace_bytes(symbol, dims, sarr)
            fn = self._op_addresses.get(symbol)
            if fn is None:
                fn = self._op_addresses[symbol] = ctypes.cast(self.ops._fn(symbol)[0],
                                                              ctypes.c_void_p).value
            launches.append((("op", fn, parr, sarr, ws),
                             ([span(n) for n in names], [span(n) for n in outs], solo), label))
            return ws

        if step.kind == "copy":
            copy(step.inputs[0], step.outputs[0])
            return launches, 0, 0
        node = self.nodes[step.node]
        world = collective_world(node)
        if world is not None:
            # the partial copied into the result's buffer, summed there in place by the
            # communicator between two segments (a solo entry: a barrier for the lanes)
            src, dst = step.inputs[0], step.outputs[0]
            if ptr[src] != ptr[dst]:
                copy(src, dst)
            if world > 1:
                launches.append((("collective", node, ptr[dst], tuple(shape_of[dst]),
                                  self._dtypes[dst], world),
                                 ([span(dst)], [span(dst)], True), label))
            return launches, 0, 0
        if step.op != "qmatmul":
            return launches, op(self.symbols[step.node], step.inputs, step.outputs,
                                pad=step.op in PAD_AWARE_OPS), 0
        k = self.qmm.kernels[step.node]
        x, y = step.inputs[0], step.outputs[0]
        m = math.prod(shape_of[x][:-1])
        d = k.dev
        ps = [ptr[x], ptr[y], d["w"], d["scales"], d["zeros"], d["bias"], d["perm"],
              d["norm"], d["norm_bias"]]
        fused = self._epilogue_in_kernel.get(step.node)
        if fused is None:
            fused = self._epilogue_in_kernel[step.node] = epilogue_in_kernel(node)
        extras = [v.name for v in qmatmul_epilogue_operands(node)] if fused else []
        ps += [ptr[n] for n in extras]  # ptrs[9...]: the epilogue's extra operands
        qmm_ws = int(k.ws_fn(m))
        fn = self._kernel_addresses.get(step.node)
        if fn is None:
            fn = self._kernel_addresses[step.node] = ctypes.cast(k.fn, ctypes.c_void_p).value
        separate = "epilogue" in node.attrs and not fused  # a second launch, in order
        launches.append((("qmm", fn, *_row_arrays(ps, []), m, fused),
                         ([span(x)] + [span(n) for n in extras], [span(y)], separate), label))
        if separate:
            names = [y] + [v.name if v is not None else None
                           for v in qmatmul_epilogue_operands(node)]
            op_ws = op(self.symbols[step.node + EPILOGUE_SUFFIX], names, [y], solo=True)
        return launches, op_ws, qmm_ws

    def _tables(self, sig: _Signature, steps: list, entries: list, base: Optional[_Layout],
                now: _Layout) -> None:
        """``sig``'s program from its steps' launches: the concurrent runs, each launch's
        workspace slot, and one QcStep table per segment between collectives. With ``base``
        (the last signature's layout, whose unchanged launches are the same entry objects)
        the runs are formed again only around changed launches, and each table starts as a
        copy of the last one with only the rows that differ written. ``steps``: the indices
        of the launching steps whose ``entries`` these are."""
        launches = [launch for step in entries for launch in step[0]]
        now.first_launch, at = {}, 0
        for i, step in zip(steps, entries):
            now.first_launch[i] = at
            at += len(step[0])
        op_ws = max((step[1] for step in entries), default=0)
        qmm_ws = max((step[2] for step in entries), default=0)
        access = [launch[1] for launch in launches]
        sig.labels = [launch[2] for launch in launches]
        last = base.launches if base is not None and len(base.launches) == len(launches) \
            else None
        # Launches that run concurrently get workspaces of their own (lane j: slot j).
        if self.lanes:
            changed = None if last is None else \
                [a is not b for a, b in zip(launches, last)]
            runs = concurrent_runs(access, self.lanes_wanted,
                                   base.runs if last is not None else None, changed)
        else:
            runs = [1] * len(access)
        lane = []  # each launch's position in its run
        for r in runs:
            lane.append(0 if r else lane[-1] + 1)
        slots = max(lane, default=0) + 1
        op_w = qmm_w = 0
        if op_ws:  # counters in op workspaces start at zero
            op_w = sig.slots[OP_WORKSPACE] = self._slot(OP_WORKSPACE, op_ws * slots, zeroed=True)
        if qmm_ws:  # split-K counters start at zero
            qmm_w = sig.slots[QMM_WORKSPACE] = self._slot(QMM_WORKSPACE, qmm_ws * slots,
                                                          zeroed=True)
        sig.runs = now.runs = runs
        now.launches = launches
        # each launch's row: its entry, workspace address and run length
        rows = []
        for i, launch in enumerate(launches):
            kind = launch[0][0]
            ws = (op_w + lane[i] * op_ws if op_ws else 0) if kind == "op" else \
                (qmm_w + lane[i] * qmm_ws if qmm_ws else 0) if kind == "qmm" else 0
            rows.append((launch[0], ws, runs[i]))
            if kind != "collective":
                sig.keep.append(launch[0][2:4])
        now.rows = rows
        # Segments: the launches between collectives, one table (and graph) each. The runs
        # never cross a collective (a solo entry), so each table's ``concurrent`` counts stay
        # inside it.
        segments, current = [], []
        for i, launch in enumerate(launches):
            if launch[0][0] == "collective":
                segments += [("launch", current), launch[0]]
                current = []
            else:
                current.append(i)
        segments.append(("launch", current))
        previous = {indices[0]: (table, indices) for table, indices in base.tables} \
            if last is not None else {}
        now.tables = []
        for item in segments:
            if item[0] == "collective":
                _, node, dptr, shape, dtype, world = item
                sig.program.append(("collective", node, dptr, shape, dtype, world))
                sig.collectives.append((node, world))
                continue
            indices = item[1]
            if not indices:
                continue
            table = (QcStep * len(indices))()
            old_table, old_indices = previous.get(indices[0], (None, None))
            if old_indices == indices:
                ctypes.memmove(table, old_table, ctypes.sizeof(table))
                old_rows = base.rows
            else:
                old_rows = None
            for j, i in enumerate(indices):
                row = rows[i]
                if old_rows is not None:
                    was = old_rows[i]
                    if was[0] is row[0] and was[1] == row[1] and was[2] == row[2]:
                        continue
                (kind, fn, parr, sarr, extra, *rest), ws, run = row
                if kind == "op":
                    table[j] = QcStep(STEP_OP, fn, parr, sarr, ws or None, 0, -1, 0, run)
                elif kind == "qmm":
                    # variant -1: by M; the launcher passes ptrs + 9 as the epilogue's extras
                    # when ``epilogue`` (the kernel applies it), else null
                    table[j] = QcStep(STEP_QMM, fn, parr, sarr, ws or None, extra, -1,
                                      int(rest[0]), run)
                else:
                    table[j] = QcStep(STEP_COPY, None, parr, sarr, None, extra, -1, 0, run)
            now.tables.append((table, indices))
            sig.program.append(("launch", table, len(indices), None, indices[0]))

    def _capture(self, sig: _Signature) -> None:
        """Capture each launch segment of ``sig`` as a CUDA graph (instantiated, replayed by
        every later run)."""
        for k, item in enumerate(sig.program):
            if item[0] != "launch" or item[3] is not None:
                continue
            _, table, n, _, first = item
            exec_ = ctypes.c_void_p()
            failed = ctypes.c_int64(-1)
            err = self.launcher.qc_plan_capture(table, n, self.stream, self.lanes,
                                                ctypes.byref(exec_), ctypes.byref(failed))
            self._check(err, f"capturing the plan: launch {first + failed.value} "
                             f"({sig.labels[first + failed.value]})")
            sig.program[k] = ("launch", table, n, exec_.value, first)

    # -- running ---------------------------------------------------------------------------
    def __call__(self, inputs: dict) -> dict:
        self.load_device()
        plan = self.plan
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict {{name: array}}, got {type(inputs).__name__}")
        missing = [n for n in plan.inputs if n not in inputs]
        extra = [n for n in inputs if n not in plan.inputs]
        if missing or extra:
            raise InputError(f"@{plan.function} inputs: missing {missing}, unknown {extra}")
        arrays, on_device = self._checked_inputs(inputs, plan.inputs)
        signature = tuple(tuple(arrays[n].shape) for n in plan.inputs)
        if self._dependencies is None:
            self._plan_index()
        padded = self._padded_signature(arrays) if self._padding is not None else None
        sig = padded[0] if padded else self._bound_signature(signature, arrays, on_device)
        if sig is None:
            sig = self._signatures.get(signature)
            if sig is None:
                sig = self._signatures[signature] = self._prepare(
                    {n: tuple(arrays[n].shape) for n in plan.inputs})
            self._touch(self._signatures, signature)
        return self._execute(sig, arrays, on_device, padded[1] if padded else None)

    run = __call__

    def _checked_inputs(self, inputs: dict, names: list) -> tuple:
        """(arrays, device pointers) of the inputs ``names``: numpy arrays contiguous, device
        tensors checked (contiguous, of the plan's dtype); a device pointer or None each."""
        plan = self.plan
        on_device = {n: _device_pointer(inputs[n]) for n in names}
        arrays = {}
        for n in names:
            want = elem(plan.buffers[n].dtype).np_dtype
            x = inputs[n]
            if on_device[n] is None:
                x = np.ascontiguousarray(x)
                if x.dtype != want:
                    raise InputError(f"input %{n}: expected {want}, got dtype {x.dtype}")
            else:
                _check_device_input(n, x, want)
            arrays[n] = x
        return arrays, on_device

    def _execute(self, sig: _Signature, arrays: dict, on_device: dict,
                 pad: Optional[int]) -> dict:
        """Run ``sig`` on ``arrays``: inputs in, its graphs (or tables) and collectives, the
        outputs out. ``pad``: the padding rows of a capacity's signature (else None). A
        decode session's signature (``sig.state``) takes and returns only what is not its
        state."""
        plan = self.plan
        padded = pad is not None
        kept = sig.state.kv if sig.state is not None else None
        if sig.collectives:  # refused before any launch: a rank artifact loaded alone
            for node, world in sig.collectives:
                communicator_for(node, world)
        sig.uses += 1
        if self.use_graphs and sig.uses == self.capture_after_uses:
            self._capture(sig)
        # the signature this call ran (benchmarks replay its graph): with the caller's device
        # inputs read in place it is not the one _signatures keeps for the shapes
        self.last_signature = sig
        lib, s = self.launcher, self.stream
        torch_inputs = [x for n, x in arrays.items() if on_device[n] is not None
                        and type(x).__module__.startswith("torch")]
        # With torch CUDA tensors in, the caller's stream may still be writing them: our
        # stream waits for it on the device, and at the end the caller's stream waits for
        # ours (the outputs are torch tensors), so run() returns without blocking the host,
        # as a torch op does; the host's work for the next call then overlaps this one's
        # kernels. Calls stay ordered on our stream (the arena is reused).
        torch_stream = _torch_stream(torch_inputs[0]) if torch_inputs else None
        if torch_stream is not None:
            self._check(lib.qc_stream_wait(s, torch_stream, self._order_events[0]),
                        "ordering the plan after the caller's stream")
        if padded:  # the padding rows of this cache length, for the pad-aware kernels
            word = (sig.slots[CACHE_PADDING], pad)
            if self._pad_written != word:
                value = np.array([pad], np.int64)
                self._check(lib.qc_copy_async(word[0], value.ctypes.data, 8, 1, s),
                            "copying the cache padding")
                self._pad_written = word
        host = sig.slots.get(HOST_VALUES)
        if host is not None and self._host_owners.get(host) is not sig:
            # the shared host-value buffer holds another signature's: this one's, on the
            # stream before its launches (staged at once: the block may change after)
            block = sig.host_block
            self._check(lib.qc_copy_async(host, block.ctypes.data, block.nbytes, 1, s),
                        "copying the host values")
            self._host_owners[host] = sig
        for n in plan.inputs:
            if kept is not None and n in kept.inputs:
                continue  # (in the session's state)
            dptr, shape, dtype = sig.inputs[n]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if not nbytes or n in sig.bound:  # (a bound input is read where it lies)
                continue
            if padded and n in sig.padding.inputs:  # each head's rows, then the padding
                src = on_device[n] or arrays[n].ctypes.data
                self._copy_rows(dptr, src, shape, sig.padding.inputs[n], pad,
                                dtype.itemsize, 1 if on_device[n] is None else 3, into=True,
                                what=f"copying input %{n}")
                continue
            if on_device[n] is None:
                self._check(lib.qc_copy_async(dptr, arrays[n].ctypes.data, nbytes, 1, s),
                            f"copying input %{n} to the device")
            else:
                self._check(lib.qc_copy_async(dptr, on_device[n], nbytes, 3, s),
                            f"copying input %{n} on the device")
        for item in sig.program:
            if item[0] == "collective":
                _, node, dptr, shape, dtype, world = item
                all_reduce_device(node, dptr, shape, dtype, world, s)
                continue
            _, table, n, graph, first = item
            if graph is not None:
                self._check(lib.qc_graph_launch(graph, s), "cudaGraphLaunch")
            else:
                failed = ctypes.c_int64(-1)
                err = lib.qc_plan_launch(table, n, s, self.lanes, ctypes.byref(failed))
                self._check(err, f"launching plan step {first + failed.value} "
                                 f"({sig.labels[first + failed.value]})")
        torch_out = any(v is not None for v in on_device.values()) and _torch_available()
        results = {}
        for out, buf in plan.outputs.items():
            if kept is not None and buf in kept.outputs:
                continue  # (the session's state: read on demand)
            dptr, shape, dtype = sig.outputs[buf]
            axis = sig.padding.outputs.get(buf) if padded else None
            capacity = shape
            if axis is not None:  # without the padding rows
                shape = shape[:axis] + (shape[axis] - pad,) + shape[axis + 1:]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if torch_out:
                import torch

                t = torch.empty(shape, dtype=_torch_dtype(dtype), device="cuda")
                dst, kind = t.data_ptr(), 3
                results[out] = t
            else:
                a = np.empty(shape, dtype)
                dst, kind = a.ctypes.data, 2
                results[out] = a
            what = f"copying output {out}" + ("" if torch_out else " to the host")
            if axis is not None:
                self._copy_rows(dptr, dst, capacity, axis, pad, dtype.itemsize, kind,
                                into=False, what=what)
            elif nbytes:
                self._check(lib.qc_copy_async(dst, dptr, nbytes, kind, s), what)
        if torch_out and torch_stream is not None:
            self._check(lib.qc_stream_wait(torch_stream, s, self._order_events[1]),
                        "ordering the caller's stream after the plan")
        else:
            self._check(lib.qc_stream_synchronize(s), "running the plan")
        return results

    def _padded_signature(self, arrays: dict):
        """(signature, padding rows) of a decode step run as its cache capacity's
        (cache_capacity.py), or None: the exact shapes' signature serves."""
        padding = self._padding
        shapes = {n: tuple(arrays[n].shape) for n in self.plan.inputs}
        length = padding.length(shapes)
        if length is None:
            return None
        capacity = padding.capacity(length)
        shapes = padding.at(shapes, capacity)
        key = tuple(shapes[n] for n in self.plan.inputs)
        sig = self._signatures.get(key)
        if sig is None:
            layout = self._capacity_layout(shapes)
            if layout is None:
                return None
            sig = self._signatures[key] = self._prepare(shapes, padding=layout)
        elif sig.padding is None:
            return None  # (prepared for these exact shapes)
        self._touch(self._signatures, key)
        return sig, capacity - length

    def _capacity_layout(self, shapes: dict):
        """The padding's layout for the capacity input ``shapes`` (``CachePadding.layout``,
        over the plan's shape functions), or None where they cannot be padded."""
        return self._padding.layout(
            self.plan, self.nodes, shapes,
            lambda s: dict(resolve(self.plan, self.module, s, self._constants,
                                   self._dependencies).shapes),
            self._output_sources)

    def _copy_rows(self, dptr: int, other: int, capacity: tuple, axis: int, pad: int,
                   itemsize: int, kind: int, into: bool, what: str) -> None:
        """Copy a buffer of ``capacity`` shape, padded on ``axis``, from (``into``) or to a
        contiguous one without the ``pad`` padding rows at ``other``: one 2-D copy, a row per
        index before the axis."""
        inner = int(np.prod(capacity[axis + 1:])) * itemsize
        rows = capacity[axis] - pad
        height, width, pitch = int(np.prod(capacity[:axis])), rows * inner, capacity[axis] * inner
        if not height or not width:
            return
        if into:
            err = self.launcher.qc_copy2d_async(dptr, pitch, other, width, width, height, kind,
                                                self.stream)
        else:
            err = self.launcher.qc_copy2d_async(other, width, dptr, pitch, width, height, kind,
                                                self.stream)
        self._check(err, what)

    # At most this many signatures per input shape read the caller's buffers in place; a
    # caller that moves between more stable buffers than that gets its inputs copied.
    MAX_BOUND_PER_SHAPE = 2

    def _bound_signature(self, signature: tuple, arrays: dict, on_device: dict):
        """The signature whose launches read the caller's device inputs in place, when every
        input lies on the device at the same addresses as in the previous call of this
        shape (a caller's stable input buffers, as CUDA graph users keep them): the copy of
        each input into the plan's own buffer is saved (at batch 64 a 224 x 224 image batch
        is 38.5 MB, about 30 us of a 1 ms ResNet-18). A signature is captured per set of
        addresses, at most MAX_BOUND_PER_SHAPE per shape; else None (the inputs are copied).
        Correct for any contents: a graph reads its input addresses when it runs, and
        the caller's stream is ordered before ours (see ``__call__``)."""
        if not self.use_graphs or not self.plan.inputs:
            return None
        pointers = tuple(on_device[n] for n in self.plan.inputs)
        previous = self._last_pointers.get(signature)
        self._last_pointers[signature] = pointers
        if not all(pointers) or not all(arrays[n].nbytes for n in self.plan.inputs):
            return None
        key = (signature, pointers)
        sig = self._bound.get(key)
        if sig is None and previous == pointers \
                and sum(1 for k in self._bound if k[0] == signature) < self.MAX_BOUND_PER_SHAPE:
            sig = self._bound[key] = self._prepare(
                {n: tuple(arrays[n].shape) for n in self.plan.inputs},
                bound=dict(zip(self.plan.inputs, pointers)))
        if sig is not None:
            self._touch(self._bound, key)
        return sig

    # Signatures (plain and bound) kept at once. A generation loop whose KV cache grows by a
    # token per call meets a new shape signature every call, each with its table (and graph,
    # from its second run) over the runner's shared buffers; a buffer that grew stays
    # allocated while a kept signature launches over its old one. Past this many the least
    # recently used is released, so that memory stays bounded (each new length is still
    # prepared once: a decode graph independent of the cache length is future work,
    # codegen/cuda/NOTES.md).
    MAX_SIGNATURES = max(2, int(os.environ.get("QC_CUDA_MAX_SIGNATURES", "8")))
    # The run of a signature that captures its graphs (QC_CUDA_CAPTURE_AFTER; 1: the first).
    # Before it the launcher enqueues the table directly: about what a capture costs on the
    # host, without the instantiation, which a signature used once never repays.
    CAPTURE_AFTER_USES = 2
    # A new signature whose only difference from the last one is some op launches' shapes is
    # that one reshaped in place when it ran at most once (_reshape_last; QC_CUDA_RESHAPE=0:
    # every signature gets tables of its own).
    reshape_in_place = os.environ.get("QC_CUDA_RESHAPE", "1") != "0"
    # Decode steps of every cache length up to a capacity share its signature and graph
    # (cache_capacity.py; QC_CUDA_PAD_CACHES=0: each length its own signature).
    pad_caches = os.environ.get("QC_CUDA_PAD_CACHES", "1") != "0"

    def _touch(self, store: dict, key) -> None:
        """store[key] was used now; release the least recently used signatures past
        MAX_SIGNATURES."""
        entry = (id(store), key)
        self._recent.pop(entry, None)
        self._recent[entry] = (store, key)
        while len(self._recent) > self.MAX_SIGNATURES:
            _, (old_store, old_key) = self._recent.popitem(last=False)
            old = old_store.pop(old_key, None)  # (gone already if a caller cleared the store)
            if old is not None:
                self._release(old)
            shape = old_key[0] if old_store is self._bound else old_key
            if shape not in self._signatures and not any(k[0] == shape for k in self._bound):
                self._last_pointers.pop(shape, None)

    def _release(self, sig: _Signature) -> None:
        """Destroy a signature's graphs, after its launches finished (the caller's next run
        may have been enqueued without waiting for the last one). Its buffers are the
        runner's (``_slot``) and stay; a signature never captured (a generation loop's, used
        once) is dropped without waiting for the device."""
        lib = self.launcher
        graphs = [item[3] for item in sig.program if item[0] == "launch" and item[3] is not None]
        if graphs:
            self._check(lib.qc_stream_synchronize(self.stream), "finishing a released signature")
        for graph in graphs:
            self._check(lib.qc_graph_destroy(graph), "destroying a released graph")
        sig.program, sig.keep, sig.host_block = [], [], None
        for ptr in sig.slots.values():
            if self._host_owners.get(ptr) is sig:
                self._host_owners.pop(ptr)
            if ptr in self._retired_slots:
                self._free_slot_if_unused(ptr)
        if sig.arena_key in self._retired and not self._arena_in_use(sig.arena_key):
            self._free_arena(sig.arena_key)

    # Memory plans (and arenas) kept for dims beyond every bucket (MemoryPlans). Without a
    # bound a generation loop past its buckets allocated a device arena per token, never freed.
    MAX_EXACT_PLANS = 4

    def _arena_in_use(self, key: tuple) -> bool:
        return any(sig.arena_key == key for sig in self._kept_signatures())

    def _kept_signatures(self):
        """Every signature whose launches may still run: the plain and bound ones kept, and
        the decode sessions'."""
        for store in (self._signatures, self._bound):
            yield from store.values()
        yield from self._state_signatures

    # -- decode sessions (kv_state.py) -----------------------------------------------------
    @staticmethod
    def torch_dtype(dtype):
        """The torch dtype of a numpy dtype (a session's tensors in and out)."""
        return _torch_dtype(dtype)

    def session(self):
        """A decode session (``kv_state.DecodeSession``): the KV cache kept on the device
        between steps, updated in place. Refused, with the reason, for a plan whose decode
        step does not have that shape."""
        from qcompiler.codegen.cuda.kv_state import DecodeSession, KvState

        self.load_device()
        if self._dependencies is None:
            self._plan_index()
        if self._kv_state is None:
            self._kv_state = KvState.find(self.plan, self.nodes, self._padding)
        kv, why = self._kv_state
        if kv is None:
            raise InputError(f"@{self.plan.function}: no decode session: {why}")
        return DecodeSession(self, kv)

    def _state_signature(self, shapes: dict, binding) -> _Signature:
        """A decode session's signature for the capacity ``shapes`` (its caches' inputs at
        the capacity) over its state buffers (``binding``)."""
        layout = self._capacity_layout(shapes)
        kv = binding.kv
        if layout is None or any(layout.inputs.get(p.input) != 3 or
                                 layout.outputs.get(p.output) != 3 or
                                 any(layout.axes.get(b) != 2 for b in p.presents)
                                 for p in kv.pairs):
            shown = {n: shapes[n] for n in self.plan.inputs}
            raise InputError(f"@{self.plan.function}: a decode session cannot run inputs of "
                             f"shapes {shown} (a step of one new token is padded to its cache's "
                             f"capacity; codegen/cuda/cache_capacity.py)")
        sig = self._prepare(shapes, padding=layout, state=binding)
        self._state_signatures.append(sig)
        return sig

    def _release_state_signature(self, sig: _Signature) -> None:
        if sig in self._state_signatures:
            self._state_signatures.remove(sig)
            self._release(sig)

    def _retire_arena(self, mem) -> None:
        """MemoryPlans dropped ``mem``: free its arena now, or when the last kept signature
        over it is released."""
        if self._arena_in_use(mem.key()):
            self._retired.add(mem.key())
        else:
            self._free_arena(mem.key())

    def _free_arena(self, key: tuple) -> None:
        self._retired.discard(key)
        ptr, _ = self._arenas.pop(key, (0, 0))
        if ptr:
            # launches over it may still be in flight (a run returns before they finish)
            self._check(self.launcher.qc_stream_synchronize(self.stream), "freeing an arena")
            self.rt.free(ptr)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def _torch_dtype(dtype):
    import torch

    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
            np.dtype(np.bool_): torch.bool, np.dtype(np.uint8): torch.uint8,
            np.dtype(np.int8): torch.int8}.get(np.dtype(dtype), torch.bfloat16)


def _check_device_input(name, x, want) -> None:
    if type(x).__module__.startswith("torch"):
        if not x.is_contiguous():
            raise InputError(f"input %{name}: a CUDA tensor must be contiguous")
        if _torch_dtype(want) != x.dtype:
            raise InputError(f"input %{name}: expected {want}, got {x.dtype}")


def _torch_stream(x) -> int:
    """The handle of torch's current stream on x's device (the caller's stream)."""
    import torch

    return torch.cuda.current_stream(x.device).cuda_stream
