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
weights are uploaded once; per bucket one device arena (the memory plan's offsets); per input
signature the shape functions are evaluated on the host, their values uploaded, input and
output buffers allocated, the table built (and the graph captured at its second run). Consecutive launches that
touch disjoint memory (``concurrent_runs``: none reads or writes what another writes) are
marked to run concurrently, on side streams forked from the plan's stream: the graph gets
parallel branches (``QC_CUDA_LANES=1`` turns this off). A run copies the inputs into
their buffers (host to device for numpy, device to device for torch CUDA tensors and objects
with ``__cuda_array_interface__``), launches the graph and returns the outputs (numpy, or
torch CUDA tensors when the inputs were). A KV cache is an output fed back as an input: keep
it as a torch CUDA tensor and it never leaves the device.

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

import ctypes
import math
import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from qcompiler.codegen.cuda.epilogue import epilogue_in_kernel
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


def _overlaps(a: tuple, b: tuple) -> bool:
    """Whether byte ranges (address, size) a and b share a byte."""
    return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def concurrent_runs(launches: list, max_lanes: int = MAX_LANES) -> list:
    """For each launch, the length of the concurrent run that starts there (0: inside a run).
    ``launches`` are (reads, writes, solo) in plan order, reads and writes lists of byte ranges
    (address, size). A run is consecutive launches none of which reads or writes a range
    another one writes; a ``solo`` launch (one of a pair that must stay in order, a copy) is
    always alone. Greedy from the first launch: one that conflicts with the run starts the
    next run, so the plan's order holds between runs."""
    def independent(i: int, j: int) -> bool:
        (ri, wi, _), (rj, wj, _) = launches[i], launches[j]
        return not (any(_overlaps(w, x) for w in wi for x in rj + wj)
                    or any(_overlaps(w, x) for w in wj for x in ri))

    runs = [0] * len(launches)
    start = 0
    while start < len(launches):
        end = start + 1
        if not launches[start][2]:
            while (end < len(launches) and end - start < max_lanes and not launches[end][2]
                   and all(independent(end, j) for j in range(start, end))):
                end += 1
        runs[start] = end - start
        start = end
    return runs


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
    from qcompiler.codegen.cuda.ops.library import (LIBRARY_NAME, build_cuda_ops_library,
                                                    library_source)
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


class _Signature:
    """Device buffers, step table and graph of one input-shape signature."""

    def __init__(self):
        self.inputs: dict = {}      # name -> (ptr, shape, dtype)
        self.outputs: dict = {}     # buffer -> (ptr, shape, dtype)
        self.keep: list = []        # ctypes arrays the table points into
        self.allocs: list = []      # device allocations owned by this signature
        self.runs: list = []        # concurrent_runs of the launches, collectives included
        self.labels: list = []      # per launch: "%node = op" (errors, profiles)
        # the segments and collectives in order: ("launch", table, n, graph or None, index of
        # the segment's first launch) and ("collective", node, ptr, shape, dtype, world)
        self.program: list = []
        self.uses = 0                # runs so far (the graphs are captured at the second)
        self.collectives: list = []  # (node, world) of the collective items
        self.bound: set = set()      # inputs read in place from the caller's device buffers
        self.arena_key: tuple = ()   # the memory plan whose arena its launches use

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
        self._signatures: dict = {}
        self._arenas: dict = {}
        # Device inputs bound in place (no copy into the signature's own input buffers): per
        # shape signature the last call's device pointers, and the signatures whose graphs
        # read the caller's buffers directly, keyed (shape signature, pointers).
        self._last_pointers: dict = {}
        self._bound: dict = {}
        self.last_signature: Optional[_Signature] = None  # the last call's (see __call__)
        # Both kinds of signature in order of use, least recent first: (id(store), key) ->
        # (store, key). Past MAX_SIGNATURES the least recent one is released (_touch).
        self._recent: OrderedDict = OrderedDict()
        self._itemsizes: Optional[dict] = None  # buffer name -> element bytes (_prepare)
        # host values that depend on no input shape, computed by the first signature's
        # resolve and reused by every later one (a decode loop prepares one per token)
        self._constants = ConstantCache()
        self._dependencies: Optional[ShapeDependencies] = None  # the plan's (_prepare)
        self._epilogue_in_kernel: dict = {}  # qmatmul node -> epilogue_in_kernel (_prepare)
        self._kernel_addresses: dict = {}    # qmatmul node -> its kernel's address
        # memory plans: a bucket's, or beyond them one per size class of the dims, the
        # MAX_EXACT_PLANS most recent kept (MemoryPlans; made when the plan is loaded). A
        # dropped plan's arena is freed once no kept signature launches over it.
        self._plans: Optional[MemoryPlans] = None
        self._retired: set = set()  # arena keys of dropped plans still in use

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

    def _prepare(self, shapes: dict, bound: Optional[dict] = None) -> _Signature:
        """The buffers, step table and graph of one shape signature. ``bound``: input name ->
        the caller's device pointer, read in place by the launches (not allocated here)."""
        plan, rt = self.plan, self.rt
        if self._dependencies is None:
            self._dependencies = ShapeDependencies(plan, self.module)
        # only what depends on the dims that changed since the last resolve is evaluated
        resolved = resolve(plan, self.module, shapes, self._constants, self._dependencies)
        if self._plans is None:
            self._plans = MemoryPlans(plan, self.module, self._constants,
                                      self.MAX_EXACT_PLANS, on_drop=self._retire_arena)
        mem = self._plans.for_dims(resolved.dims)
        self._retired.discard(mem.key())  # a class that came back keeps its arena
        arena = self._arena(mem)
        sig = _Signature()
        sig.arena_key = mem.key()
        ptr: dict = {}
        shape_of = dict(resolved.shapes)

        def alloc(nbytes: int) -> int:
            p = rt.malloc(max(int(nbytes), 1))
            sig.allocs.append(p)
            return p

        for b in plan.buffers.values():
            if b.kind in ("arena", "view"):
                continue  # placed below, once their roots are
            dtype = elem(b.dtype).np_dtype
            if b.kind == "input":
                shape = tuple(shapes[b.name])
                if bound and b.name in bound:
                    ptr[b.name] = bound[b.name]
                    sig.bound.add(b.name)
                else:
                    ptr[b.name] = alloc(math.prod(shape) * dtype.itemsize)
                sig.inputs[b.name] = (ptr[b.name], shape, dtype)
            elif b.kind == "weight":
                if b.name in self.weights:
                    ptr[b.name], shape_of[b.name] = self.weights[b.name]
            elif b.kind == "host":
                a = np.ascontiguousarray(resolved.host[b.name], dtype)
                ptr[b.name] = rt.upload(a) if a.nbytes else 0
                if a.nbytes:
                    sig.allocs.append(ptr[b.name])
                shape_of[b.name] = a.shape
            elif b.kind == "output":
                src = b.name if b.name in resolved.shapes else next(
                    s.inputs[0] for s in plan.steps if s.outputs == [b.name])
                shape = tuple(resolved.shapes[src])
                shape_of[b.name] = shape
                ptr[b.name] = alloc(math.prod(shape) * dtype.itemsize)
                sig.outputs[b.name] = (ptr[b.name], shape, dtype)
        for b in plan.buffers.values():
            if b.kind in ("arena", "view"):
                root = plan.buffers[b.alias_of or b.name]
                if root.kind == "arena":
                    ptr[b.name] = arena + mem.offsets[root.name]
                elif root.name in ptr:
                    ptr[b.name] = ptr[root.name]

        op_ws, qmm_ws = 0, 0
        pending = []  # (QcStep fields) before workspaces are known
        access = []  # per launch: (reads, writes, solo) byte ranges, for concurrent_runs
        labels = []  # per launch: the node it runs, for errors
        label = ""

        # element sizes of the plan's buffers, once per runner: a decode loop whose KV cache
        # grows prepares a signature per token, and these were most of its host time
        itemsize = self._itemsizes
        if itemsize is None:
            itemsize = self._itemsizes = {n: elem(b.dtype).np_dtype.itemsize
                                          for n, b in plan.buffers.items()}

        def span(name: str) -> tuple:  # (address, bytes) of a buffer; weights are read-only
            if name is None or plan.buffers[name].kind == "weight" or name not in ptr:
                return (0, 0)
            return (ptr[name], math.prod(shape_of[name]) * itemsize[name])

        def op_step(symbol: str, names: list, out_names: list, solo: bool = False):
            names = [n for n in names if n is not None]
            ps = [ptr[n] for n in names + out_names]
            dims = [shape_of[n] for n in names + out_names]
            ws = self.ops.workspace_bytes(symbol, dims)
            pending.append(("op", self.ops._fn(symbol)[0], ps, dims, ws, False))
            access.append(([span(n) for n in names], [span(n) for n in out_names], solo))
            labels.append(label)
            return ws

        for step in plan.steps:
            if step.kind in ("view", "host"):
                continue
            label = f"%{step.node or step.outputs[0]} = {step.op or step.kind}"
            if step.kind == "copy":
                src, dst = step.inputs[0], step.outputs[0]
                nbytes = math.prod(shape_of[dst]) * itemsize[dst]
                pending.append(("copy", None, [ptr[src], ptr[dst]], [], nbytes, False))
                access.append(([span(src)], [span(dst)], True))
                labels.append(label)
                continue
            node = self.nodes[step.node]
            world = collective_world(node)
            if world is not None:
                # the partial copied into the result's buffer, summed there in place by the
                # communicator between two segments (a solo entry: a barrier for the lanes)
                src, dst = step.inputs[0], step.outputs[0]
                dtype = elem(plan.buffers[dst].dtype).np_dtype
                nbytes = int(np.prod(shape_of[dst])) * dtype.itemsize
                if ptr[src] != ptr[dst]:
                    pending.append(("copy", None, [ptr[src], ptr[dst]], [], nbytes, False))
                    access.append(([span(src)], [span(dst)], True))
                    labels.append(label)
                if world > 1:
                    pending.append(("collective", node, [ptr[dst]], [tuple(shape_of[dst])],
                                    world, dtype))
                    access.append(([span(dst)], [span(dst)], True))
                    labels.append(label)
                continue
            if step.op == "qmatmul":
                k = self.qmm.kernels[step.node]
                x = step.inputs[0]
                m = math.prod(shape_of[x][:-1])
                d = k.dev
                ps = [ptr[x], ptr[step.outputs[0]], d["w"], d["scales"], d["zeros"],
                      d["bias"], d["perm"], d["norm"], d["norm_bias"]]
                fused = self._epilogue_in_kernel.get(step.node)
                if fused is None:  # per node, once: a decode loop prepares a signature a token
                    fused = self._epilogue_in_kernel[step.node] = epilogue_in_kernel(node)
                extras = [v.name for v in qmatmul_epilogue_operands(node)] if fused else []
                ps += [ptr[n] for n in extras]  # ptrs[9...]: the epilogue's extra operands
                qmm_ws = max(qmm_ws, int(k.ws_fn(m)))
                fn = self._kernel_addresses.get(step.node)
                if fn is None:
                    fn = self._kernel_addresses[step.node] = \
                        ctypes.cast(k.fn, ctypes.c_void_p).value
                pending.append(("qmm", fn, ps, [], m, fused))
                separate = "epilogue" in node.attrs and not fused  # a second launch, in order
                access.append(([span(x)] + [span(n) for n in extras],
                               [span(step.outputs[0])], separate))
                labels.append(label)
                if separate:
                    sym = self.symbols[step.node + EPILOGUE_SUFFIX]
                    names = [step.outputs[0]] + [v.name if v is not None else None
                                                 for v in qmatmul_epilogue_operands(node)]
                    op_ws = max(op_ws, op_step(sym, names, [step.outputs[0]], solo=True))
            else:
                op_ws = max(op_ws, op_step(self.symbols[step.node], step.inputs, step.outputs))

        # Launches that run concurrently get workspaces of their own (lane j: slot j).
        runs = concurrent_runs(access, self.lanes_wanted) if self.lanes else [1] * len(access)
        lane = []  # each launch's position in its run
        for r in runs:
            lane.append(0 if r else lane[-1] + 1)
        slots = max(lane, default=0) + 1
        op_ws_ptr = alloc(op_ws * slots) if op_ws else 0
        if op_ws:
            rt.memset(op_ws_ptr, op_ws * slots)  # counters in op workspaces start at zero
        qmm_ws_ptr = 0
        if qmm_ws:
            qmm_ws_ptr = alloc(qmm_ws * slots)
            rt.memset(qmm_ws_ptr, qmm_ws * slots)  # split-K counters start at zero
        # Segments: the launches between collectives, one table (and graph) each. The runs
        # never cross a collective (a solo entry), so each table's ``concurrent`` counts stay
        # inside it.
        segments, current = [], []
        for i, entry in enumerate(pending):
            if entry[0] == "collective":
                segments += [("launch", current), entry]
                current = []
            else:
                current.append(i)
        segments.append(("launch", current))
        sig.runs = runs
        sig.labels = labels
        for item in segments:
            if item[0] == "collective":
                _, node, ps, dims, world, dtype = item
                sig.program.append(("collective", node, ps[0], dims[0], dtype, world))
                sig.collectives.append((node, world))
                continue
            indices = item[1]
            if not indices:
                continue
            table = (QcStep * len(indices))()
            for j, i in enumerate(indices):
                kind, fn, ps, dims, extra, epilogue = pending[i]
                # one spare slot: a fused epilogue's extras start at ptrs[7], even when it has
                # none
                parr = (ctypes.c_void_p * (len(ps) + 1))(*[p or None for p in ps])
                flat = [int(v) for s in dims for v in s]
                sarr = (ctypes.c_int64 * max(len(flat), 1))(*flat)
                sig.keep += [parr, sarr]
                op_w = (op_ws_ptr + lane[i] * op_ws) if op_ws_ptr else None
                qmm_w = (qmm_ws_ptr + lane[i] * qmm_ws) if qmm_ws_ptr else None
                if kind == "op":
                    table[j] = QcStep(STEP_OP, ctypes.cast(fn, ctypes.c_void_p).value, parr,
                                      sarr, op_w, 0, -1, 0, runs[i])
                elif kind == "qmm":
                    # variant -1: by M; the launcher passes ptrs + 7 as the epilogue's extras
                    # when ``epilogue`` (the kernel applies it), else null
                    table[j] = QcStep(STEP_QMM, fn, parr, sarr, qmm_w, extra, -1,
                                      int(epilogue), runs[i])
                else:
                    table[j] = QcStep(STEP_COPY, None, parr, sarr, None, extra, -1, 0, runs[i])
            sig.program.append(("launch", table, len(indices), None, indices[0]))
        return sig

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
        on_device = {n: _device_pointer(inputs[n]) for n in plan.inputs}
        arrays = {}
        for n in plan.inputs:
            want = elem(plan.buffers[n].dtype).np_dtype
            x = inputs[n]
            if on_device[n] is None:
                x = np.ascontiguousarray(x)
                if x.dtype != want:
                    raise InputError(f"input %{n}: expected {want}, got dtype {x.dtype}")
            else:
                _check_device_input(n, x, want)
            arrays[n] = x
        signature = tuple(tuple(arrays[n].shape) for n in plan.inputs)
        sig = self._bound_signature(signature, arrays, on_device)
        if sig is None:
            sig = self._signatures.get(signature)
            if sig is None:
                sig = self._signatures[signature] = self._prepare(
                    {n: tuple(arrays[n].shape) for n in plan.inputs})
            self._touch(self._signatures, signature)
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
        torch_inputs = [arrays[n] for n in plan.inputs if on_device[n] is not None
                        and type(arrays[n]).__module__.startswith("torch")]
        # With torch CUDA tensors in, the caller's stream may still be writing them: our
        # stream waits for it on the device, and at the end the caller's stream waits for
        # ours (the outputs are torch tensors), so run() returns without blocking the host,
        # as a torch op does; the host's work for the next call then overlaps this one's
        # kernels. Calls stay ordered on our stream (the arena is reused).
        torch_stream = _torch_stream(torch_inputs[0]) if torch_inputs else None
        if torch_stream is not None:
            self._check(lib.qc_stream_wait(s, torch_stream, self._order_events[0]),
                        "ordering the plan after the caller's stream")
        for n in plan.inputs:
            dptr, shape, dtype = sig.inputs[n]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if not nbytes or n in sig.bound:  # (a bound input is read where it lies)
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
            dptr, shape, dtype = sig.outputs[buf]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if torch_out:
                import torch

                t = torch.empty(shape, dtype=_torch_dtype(dtype), device="cuda")
                if nbytes:
                    self._check(lib.qc_copy_async(t.data_ptr(), dptr, nbytes, 3, s),
                                f"copying output {out}")
                results[out] = t
            else:
                a = np.empty(shape, dtype)
                if nbytes:
                    self._check(lib.qc_copy_async(a.ctypes.data, dptr, nbytes, 2, s),
                                f"copying output {out} to the host")
                results[out] = a
        if torch_out and torch_stream is not None:
            self._check(lib.qc_stream_wait(torch_stream, s, self._order_events[1]),
                        "ordering the caller's stream after the plan")
        else:
            self._check(lib.qc_stream_synchronize(s), "running the plan")
        return results

    run = __call__

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
    # token per call meets a new shape signature every call, each with its own input and
    # output buffers (and graph, from its second run): past this many the least recently used
    # is released, so that memory stays bounded (each new length is still prepared once: a
    # decode graph independent of the cache length is future work, codegen/cuda/NOTES.md).
    # Few: a 22-layer decode's signature at a 2048-token cache holds ~90 MB of cache in and
    # out.
    MAX_SIGNATURES = max(2, int(os.environ.get("QC_CUDA_MAX_SIGNATURES", "8")))
    # The run of a signature that captures its graphs (QC_CUDA_CAPTURE_AFTER; 1: the first).
    # Before it the launcher enqueues the table directly: about what a capture costs on the
    # host, without the instantiation, which a signature used once never repays.
    CAPTURE_AFTER_USES = 2

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
        """Destroy a signature's graphs and free its buffers, after its launches finished
        (the caller's next run may have been enqueued without waiting for the last one)."""
        lib = self.launcher
        self._check(lib.qc_stream_synchronize(self.stream), "finishing a released signature")
        for item in sig.program:
            if item[0] == "launch" and item[3] is not None:
                self._check(lib.qc_graph_destroy(item[3]), "destroying a released graph")
        for p in sig.allocs:
            self.rt.free(p)
        sig.program, sig.allocs, sig.keep = [], [], []
        if sig.arena_key in self._retired and not self._arena_in_use(sig.arena_key):
            self._free_arena(sig.arena_key)

    # Memory plans (and arenas) kept for dims beyond every bucket (MemoryPlans). Without a
    # bound a generation loop past its buckets allocated a device arena per token, never freed.
    MAX_EXACT_PLANS = 4

    def _arena_in_use(self, key: tuple) -> bool:
        return any(sig.arena_key == key for store in (self._signatures, self._bound)
                   for sig in store.values())

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
