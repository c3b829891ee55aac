"""Running a plan: ``PlanExecutor(plan, module, step_impls).run({name: array})``.

Per shape bucket one arena, allocated once (64-byte aligned) and reused by every run. Per
input-shape signature, once: the shape functions are evaluated (``shapes.resolve``), a bucket
is chosen (the smallest arena covering the dims; beyond every bucket a plan for the dims
rounded up to their size class, cached per class, with a warning), and the call list is built:
for each step its callable and the numpy views it reads and writes (a step bound for an
earlier signature over the same memory keeps its bound call). Small inputs and outputs
(``STAGE_BYTES``) have buffers of their own: a run copies the inputs in and the outputs out.
Larger ones are bound into the call list per run (a fresh array per output), then the run
loops over it.

A step implementation is called in destination-passing style, ``impl(args, outs)``: ``args``
are the operands (None for an absent optional one), ``outs`` the arrays to write. Entries of
``step_impls`` (keyed by the step's node name, else by its kernel name) replace the default,
which runs the reference op (``qcompiler.runtime.reference.OP_IMPLS``) and copies its result
into the out view, so that every plan runs before each op has a compiled kernel. An impl with
a ``bind(args, outs) -> call()`` method is bound once per signature when none of its arrays
changes between runs (arena views, weights, host values, staged inputs and outputs: a compiled
kernel wraps them once); steps that read a larger input or write a larger output are called
with the run's arrays.

``QC_PROFILE=1``: every step is timed; per op kind, the total and per-run milliseconds go to
stderr at exit (``PlanExecutor.profile()`` returns them). ``QC_PROFILE=kernels``: the same per
kernel (op kind and kernel name), which tells apart the layers of one kind.
"""
from __future__ import annotations

import atexit
import functools
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir import Module, elem
from qcompiler.ir.core import constant_value
from qcompiler.ir.types import tensor
from qcompiler.plan.memory import MemoryPlans, itemsize_of, slice_offset
from qcompiler.plan.plan import ARENA_ALIGN, MemoryPlan, Plan, PlanError
from qcompiler.plan.shapes import ConstantCache, ShapeDependencies, resolve

StepImpl = Callable[[list, list], None]

# Inputs and outputs up to this size get a buffer of their own per signature: an input is
# copied into it and an output copied out of it per run, so that every step touching them is
# bound once like the arena's (a step called with the run's own arrays converts them per
# call). On MiniLM at 1x16 (CPU), the four steps reading inputs or writing the output took
# 16-145 us each in a run, 5-10 us alone: Python's work per call, cold after the kernels.
STAGE_BYTES = 1 << 16


def aligned_empty(nbytes: int) -> np.ndarray:
    """Uninitialized uint8 memory whose first byte is 64-byte aligned."""
    raw = np.empty(nbytes + ARENA_ALIGN, np.uint8)
    skip = (-raw.ctypes.data) % ARENA_ALIGN
    return raw[skip:skip + nbytes]


def aligned_array(a: np.ndarray, dtype=None) -> np.ndarray:
    """``a`` (as ``dtype``) contiguous, 64-byte aligned and writeable: itself when it is, else
    a copy. Compiled kernels assume aligned buffers (an unaligned one can fault in a vector
    load), and TVM's DLPack refuses a read-only array (a caller's np.frombuffer, a host
    value shared through the shape functions' memo)."""
    a = np.asarray(a, dtype)
    if a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % ARENA_ALIGN == 0:
        return a
    out = aligned_empty(a.nbytes).view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def view_of(root: np.ndarray, skip: int, shape) -> np.ndarray:
    """``root``'s elements from ``skip`` on as ``shape``: a view of the whole root (skip 0,
    same size) or a slice of it (a concat's operand written in place)."""
    if not skip and root.size == math.prod(shape):
        return root.reshape(shape)
    return root.reshape(-1)[skip:skip + math.prod(shape)].reshape(shape)


def buffer_dependencies(plan: Plan, dependencies: ShapeDependencies) -> dict:
    """Per plan buffer, the input dims its placement depends on (None: unknown, placed for
    every signature): its value's (``ShapeDependencies``), a copied output's source's, and
    for a view also its root's and those of the buffers before it in a slice."""
    values = dependencies.values
    copies = {st.outputs[0]: st.inputs[0] for st in plan.steps
              if st.kind == "copy" and len(st.outputs) == 1}
    own = {}
    for b in plan.buffers.values():
        name = b.name if b.name in values else copies.get(b.name)
        own[b.name] = values.get(name) if name is not None else None
    out = {}
    for b in plan.buffers.values():
        parts = [own[b.name]]
        if b.kind in ("arena", "view"):
            parts += [own.get(b.alias_of or b.name)] + [own.get(n) for n in b.offset_of or ()]
        out[b.name] = None if any(p is None for p in parts) else frozenset().union(*parts)
    return out


def _declared(b) -> str:
    """A plan buffer's type as the IR prints it (input errors)."""
    return str(tensor(list(b.shape), b.dtype))


def reference_step(node, module: Module) -> StepImpl:
    """The default step: the reference op, its result copied into the planned output."""
    from qcompiler.runtime.reference import OP_IMPLS

    ref = OP_IMPLS.get(node.op)
    if ref is None:
        raise PlanError(f"%{node.results[0].name} = {node.op}: no kernel and no reference "
                        "implementation of this op")
    names = ", ".join(f"%{r.name}" for r in node.results)

    def impl(args: list, outs: list) -> None:
        ys = ref(node, args, module)
        for y, out in zip(ys, outs):
            y = np.asarray(y)
            if y.shape != out.shape or y.dtype != out.dtype:
                raise PlanError(f"{names} = {node.op}: computed {y.dtype}{list(y.shape)}, the "
                                f"plan has {out.dtype}{list(out.shape)}")
            np.copyto(out, y)
    return impl


def copy_step(args: list, outs: list) -> None:
    np.copyto(outs[0], args[0])


class _Prepared:
    """The call list of one input-shape signature."""

    def __init__(self, calls, patches, fresh, dynamic_views, outputs, staged_inputs=None,
                 staged_outputs=None):
        self.calls = calls                  # a no-argument callable per step
        self.patches = patches              # (list, index, buffer name) to bind per run
        self.fresh = fresh                  # output buffer -> (shape, dtype): new per run
        # view -> (root, shape, elements before it in the root) over inputs/outputs
        self.dynamic_views = dynamic_views
        self.outputs = outputs              # output name -> buffer name
        self.staged_inputs = staged_inputs or {}    # input -> its buffer, copied in per run
        self.staged_outputs = staged_outputs or {}  # output -> its buffer, copied out per run

    def run(self, arrays: dict) -> dict:
        bound = dict(arrays)
        for name, buf in self.staged_inputs.items():
            np.copyto(buf, arrays[name])
        for name, (shape, dtype) in self.fresh.items():
            bound[name] = aligned_empty(int(np.prod(shape)) * dtype.itemsize).view(
                dtype).reshape(shape)
        for name, (root, shape, skip) in self.dynamic_views.items():
            bound[name] = view_of(bound[root], skip, shape)
        for lst, i, name in self.patches:
            lst[i] = bound[name]
        for call in self.calls:
            call()
        staged = self.staged_outputs
        return {out: staged[buf].copy() if buf in staged else bound[buf]
                for out, buf in self.outputs.items()}


class _Placement:
    """What ``_prepare`` decided for one signature, kept until the next one starts from it:
    per buffer its array or how a run gets it, per step its call."""

    def __init__(self, mem: MemoryPlan, arena: np.ndarray, resolved):
        self.mem, self.arena, self.resolved = mem, arena, resolved
        self.static: dict = {}         # buffer -> its array for every run
        self.memory: dict = {}         # buffer -> what memory it is (``PlanExecutor._bind``)
        self.staged: dict = {}         # small input or output -> its own buffer (STAGE_BYTES)
        self.fresh: dict = {}          # large output -> (shape, dtype): new per run
        self.dynamic_views: dict = {}  # view -> (root, shape, elements before it) per run
        self.steps: dict = {}          # step index -> (call, patches)
        self.slice_sizes: dict = {}    # buffer -> bytes at these shapes (slice_offset)
        self.calls: Optional[list] = None  # per call step (``_call_steps``), its call
        self.patches: dict = {}        # position in ``calls`` -> its step's patches
        self.batched = None            # ``calls`` batched for the C loop (native_calls)

    def start_from(self, other: "_Placement") -> None:
        """Every buffer and step as ``other`` has it (then ``forget`` what changes)."""
        self.static, self.memory = dict(other.static), dict(other.memory)
        self.staged, self.fresh = dict(other.staged), dict(other.fresh)
        self.dynamic_views, self.steps = dict(other.dynamic_views), dict(other.steps)
        self.calls = None if other.calls is None else list(other.calls)
        self.patches, self.batched = dict(other.patches), other.batched

    def forget(self, name: str) -> None:
        for placed in (self.static, self.memory, self.staged, self.fresh, self.dynamic_views):
            placed.pop(name, None)


class _Profile:
    """Seconds per op kind over every run (``QC_PROFILE=1``)."""

    def __init__(self, function: str):
        self.function = function
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.runs = 0
        atexit.register(self.print)

    def timed(self, kind: str, call: Callable) -> Callable:
        seconds, calls, clock = self.seconds, self.calls, time.perf_counter
        seconds.setdefault(kind, 0.0)
        calls.setdefault(kind, 0)

        def timed_call():
            t0 = clock()
            call()
            seconds[kind] += clock() - t0
            calls[kind] += 1
        return timed_call

    def summary(self) -> dict:
        runs = max(self.runs, 1)
        return {k: {"ms_per_run": 1e3 * v / runs, "calls_per_run": self.calls[k] / runs}
                for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}

    def print(self) -> None:
        if not self.runs:
            return
        rows = self.summary()
        total = sum(r["ms_per_run"] for r in rows.values())
        lines = [f"QC_PROFILE @{self.function}: {self.runs} runs, {total:.3f} ms per run in steps"]
        for kind, r in rows.items():
            lines.append(f"  {kind:<24} {r['ms_per_run']:9.3f} ms/run  "
                         f"{r['calls_per_run']:6.1f} calls/run  "
                         f"{100 * r['ms_per_run'] / max(total, 1e-12):5.1f} %")
        print("\n".join(lines), file=sys.stderr)


class PlanExecutor:
    """Runs ``plan`` (lowered from ``module``) over one arena per shape bucket.

    ``poison_byte``: when set (tests, debugging), every arena is filled with it before each
    run, so that a step reading bytes no step wrote gives garbage (0xFF: NaN in floats).
    """

    def __init__(self, plan: Plan, module: Module, step_impls: Optional[dict] = None):
        self.plan = plan
        self.module = module
        self.step_impls = dict(step_impls or {})
        self.poison_byte: Optional[int] = None
        self._nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
        self._constants = ConstantCache()
        self._arenas: dict[tuple, np.ndarray] = {}
        # per input signature, least recently used first (at most MAX_PREPARED: a decode loop
        # whose KV cache grows a token a call has a new signature every call)
        self._prepared: OrderedDict[tuple, _Prepared] = OrderedDict()
        # the bucket's plan, or beyond them one per size class (at most MAX_EXACT_PLANS, each
        # with its arena: a dropped plan's arena goes; the prepared signatures still holding
        # views of it keep that memory until they age out of MAX_PREPARED)
        self._plans = MemoryPlans(plan, module, self._constants, self.MAX_EXACT_PLANS,
                                  on_drop=self._drop_memory_plan)
        self._impls: dict[str, StepImpl] = {}
        self._bound: dict[int, tuple] = {}  # step index -> (its arrays, impl, bound call)
        self._staged: dict[tuple, np.ndarray] = {}  # (name, shape, dtype) -> its buffer
        self._placement: Optional[_Placement] = None  # the last signature's (_prepare)
        self._dependencies = ShapeDependencies(plan, module)
        self._buffer_deps = buffer_dependencies(plan, self._dependencies)
        self._affected_cache: dict = {}
        # the steps that are calls (views and host values are placed, not called)
        self._call_steps = [i for i, st in enumerate(plan.steps)
                            if st.kind not in ("view", "host")]
        self._call_position = {i: p for p, i in enumerate(self._call_steps)}
        mode = os.environ.get("QC_PROFILE")
        self._profile = _Profile(plan.function) if mode in ("1", "kernels") else None
        self._profile_kernels = mode == "kernels"
        values = {r.name: r for n in module.main.nodes for r in n.results}
        # per input, its element type and numpy dtype (check_inputs, every run)
        self._input_types = {}
        for n in plan.inputs:
            et = elem(plan.buffers[n].dtype)
            self._input_types[n] = (et, et.np_dtype)
        self._weights = {}
        for b in plan.buffers.values():
            if b.kind != "weight":
                continue
            if b.name not in values:
                raise PlanError(f"the plan names %{b.name}, which the module does not define")
            self._weights[b.name] = aligned_array(constant_value(module, values[b.name]))

    # -- inputs ----------------------------------------------------------------------------
    def check_inputs(self, inputs) -> dict:
        """The inputs by name; InputError naming the input for anything wrong. Inputs of
        at most ``STAGE_BYTES`` are returned as given (a run copies them into their
        staged buffers); larger ones contiguous and 64-byte aligned (a copy only where they
        are not)."""
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict {{name: array}}, got {type(inputs).__name__}")
        names = self.plan.inputs
        if len(inputs) != len(names) or any(n not in inputs for n in names):
            missing = [n for n in names if n not in inputs]
            extra = [n for n in inputs if n not in names]
            raise InputError(f"@{self.plan.function} inputs: missing {missing}, unknown {extra}")
        dims: dict = {}
        out = {}
        for name in names:
            b = self.plan.buffers[name]
            et, np_dtype = self._input_types[name]
            x = inputs[name]
            want = functools.partial(_declared, b)  # (its text only for an error)
            if not isinstance(x, np.ndarray):
                try:
                    x = np.asarray(x)
                except Exception as e:
                    raise InputError(f"input %{name}: expected {want()}, got "
                                     f"{type(x).__name__} ({e})") from None
            if x.dtype != np_dtype:
                raise InputError(f"input %{name}: expected {want()}, got dtype {x.dtype}")
            if x.ndim != len(b.shape):
                raise InputError(f"input %{name}: expected {want()}, got shape {x.shape}")
            for i, (d, n) in enumerate(zip(b.shape, x.shape)):
                if isinstance(d, int) and d != n:
                    raise InputError(f"input %{name}: expected {want()}, got shape {x.shape}")
                if isinstance(d, str) and d != "?" and dims.setdefault(d, n) != n:
                    raise InputError(f"input %{name}: dim {i} is {d} = {dims[d]} in another "
                                     f"input, got {n} (shape {x.shape})")
            if et.bits < 8 and et.kind in ("int", "uint", "ternary", "nf4") and x.size:
                lo, hi = et.int_range()
                if x.min() < lo or x.max() > hi:
                    raise InputError(f"input %{name}: {b.dtype} codes must lie in [{lo}, {hi}]")
            # a copy only when a large input is unaligned (kernels read it in place)
            out[name] = x if x.nbytes <= STAGE_BYTES else aligned_array(x)
        return out

    # -- running ---------------------------------------------------------------------------
    MAX_PREPARED = 32  # input signatures kept prepared (calls bound, buffers staged)
    # Memory plans (and arenas) kept for dims beyond every bucket (MemoryPlans): a decode
    # loop's KV length moves through a size class every P / 8 tokens; without a bound a long
    # generation kept every class's arena.
    MAX_EXACT_PLANS = 4

    def run(self, inputs) -> dict:
        arrays = self.check_inputs(inputs)
        signature = tuple(arrays[n].shape for n in self.plan.inputs)
        prepared = self._prepared.get(signature)
        if prepared is None:
            prepared = self._prepared[signature] = self._prepare(arrays)
            while len(self._prepared) > self.MAX_PREPARED:
                self._prepared.popitem(last=False)
        else:
            self._prepared.move_to_end(signature)
        if self.poison_byte is not None:
            for arena in self._arenas.values():
                arena.fill(self.poison_byte)
        if self._profile is not None:
            self._profile.runs += 1
        return prepared.run(arrays)

    def profile(self) -> Optional[dict]:
        """Per op kind: milliseconds and calls per run (``QC_PROFILE=1``), else None."""
        return self._profile.summary() if self._profile is not None else None

    __call__ = run

    def memory_plan_for(self, dims: dict) -> MemoryPlan:
        """The bucket that serves ``dims``, or beyond every bucket the plan of their size
        class (``MemoryPlans``)."""
        return self._plans.for_dims(dims)

    def _drop_memory_plan(self, mem: MemoryPlan) -> None:
        self._arenas.pop(mem.key(), None)
        if self._placement is not None and self._placement.mem is mem:
            self._placement = None

    def _arena(self, mem: MemoryPlan) -> np.ndarray:
        arena = self._arenas.get(mem.key())
        if arena is None or arena.nbytes < mem.peak_bytes:
            arena = self._arenas[mem.key()] = aligned_empty(mem.peak_bytes)
        return arena

    def _impl(self, step) -> StepImpl:
        impl = self.step_impls.get(step.node) or self.step_impls.get(step.kernel)
        if impl is not None:
            return impl
        if step.kind == "copy":
            return copy_step
        if step.node not in self._impls:
            self._impls[step.node] = reference_step(self._nodes[step.node], self.module)
        return self._impls[step.node]

    def _prepare(self, arrays: dict) -> _Prepared:
        """The call list of a new signature. It starts from the last signature prepared over
        the same arena (``_Placement``) where there is one: only the buffers whose shape or
        host value depends on an input dim that differs from that signature's
        (``ShapeDependencies``) are placed again, and only the steps that touch them get a
        new call, so that a decode step whose KV length grows by one redoes only what reads
        that length."""
        plan = self.plan
        shapes = {n: a.shape for n, a in arrays.items()}
        resolved = resolve(plan, self.module, shapes, self._constants, self._dependencies)
        mem = self.memory_plan_for(resolved.dims)
        arena = self._arena(mem)
        base = self._placement
        now = _Placement(mem, arena, resolved)
        if base is not None and base.mem is mem and base.arena is arena:
            now.start_from(base)
            changed = self._dependencies.changed(resolved.inputs, base.resolved.inputs)
            buffers, views, steps = self._affected(changed)
            for name in buffers + views:
                now.forget(name)
        else:
            buffers, views, steps = self._affected(None)
        for name in buffers:
            self._place(now, plan.buffers[name], arrays)
        for name in views:  # once their roots are placed
            b = plan.buffers[name]
            self._place_view(now, b, plan.buffers[b.alias_of or b.name])
        for index in steps:
            now.steps[index] = self._step_call(index, plan.steps[index], now)
        self._placement = now
        # the call list, the patches and the native tables: from the base's, at the positions
        # of the steps called anew (a decode loop's token changes a few of a few hundred)
        position = self._call_position
        moved = [position[i] for i in steps]
        if now.calls is None:
            now.calls = [now.steps[i][0] for i in self._call_steps]
            now.patches = {p: now.steps[i][1] for p, i in enumerate(self._call_steps)
                           if now.steps[i][1]}
        else:
            for p in moved:
                call, step_patches = now.steps[self._call_steps[p]]
                now.calls[p] = call
                if step_patches:
                    now.patches[p] = step_patches
                else:
                    now.patches.pop(p, None)
        patches = [x for p in sorted(now.patches) for x in now.patches[p]]
        calls = now.calls
        if now.batched is not None:
            now.batched = now.batched.updated(calls, moved)
            calls = now.batched.calls
        elif any(getattr(c, "native", None) for c in calls):
            # runs of compiled CPU kernels: one call from Python each (not when profiling:
            # the timed wrappers are not native)
            from qcompiler.codegen.cpu.native_calls import Batched
            now.batched = Batched(calls)
            calls = now.batched.calls
        staged = now.staged
        staged_inputs = {n: staged[n] for n in plan.inputs if n in staged}
        staged_outputs = {n: a for n, a in staged.items() if n not in staged_inputs}
        return _Prepared(calls, patches, now.fresh, now.dynamic_views, dict(plan.outputs),
                         staged_inputs, staged_outputs)

    def _affected(self, changed: Optional[frozenset]) -> tuple:
        """(buffers other than views, views, step indices) to place or call anew when the
        input dims ``changed`` change (None: everything); computed once per set."""
        hit = self._affected_cache.get(changed)
        if hit is None:
            def hits(name):
                deps = self._buffer_deps[name]
                return changed is None or deps is None or bool(deps & changed)

            plan = self.plan
            names = [b.name for b in plan.buffers.values() if hits(b.name)]
            views = [n for n in names if plan.buffers[n].kind in ("arena", "view")]
            buffers = [n for n in names if plan.buffers[n].kind not in ("arena", "view")]
            moved = set(names)  # None: every buffer, so every step (each has an output)
            steps = [i for i in self._call_steps
                     if any(n in moved for n in plan.steps[i].inputs + plan.steps[i].outputs
                            if n is not None)]
            hit = self._affected_cache[changed] = (buffers, views, steps)
        return hit

    def _place(self, now: "_Placement", b, arrays: dict) -> None:
        """An input, weight, host value or output of the signature: its array (or how a run
        gets it) in ``now``."""
        resolved = now.resolved

        def stage(name: str, shape, dtype) -> None:
            # one buffer per name and shape, shared by the signatures that have that shape
            # (a decode step's token ids keep theirs while the KV length grows)
            dtype = np.dtype(dtype)
            key = (name, tuple(shape), dtype.str)
            buf = self._staged.get(key)
            if buf is None:
                buf = self._staged[key] = aligned_empty(
                    math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)
            now.static[name] = now.staged[name] = buf
            now.memory[name] = ("staged",) + key

        if b.kind == "input" and arrays[b.name].nbytes <= STAGE_BYTES:
            stage(b.name, arrays[b.name].shape, arrays[b.name].dtype)
        elif b.kind == "weight":
            now.static[b.name] = self._weights[b.name]
            now.memory[b.name] = ("weight", b.name)
        elif b.kind == "host":
            # as the IR types it: compiled kernels read host values as their typed buffers
            now.static[b.name] = aligned_array(resolved.host[b.name], elem(b.dtype).np_dtype)
            now.memory[b.name] = ("host", id(now.static[b.name]))  # new per host array
        elif b.kind == "output":
            src = b.name if b.name in resolved.shapes else None
            if src is None:  # a copied output: the shape of the value it copies
                step = next(s for s in self.plan.steps if s.outputs == [b.name])
                src = step.inputs[0]
            out_shape, out_dtype = resolved.shapes[src], elem(b.dtype).np_dtype
            if math.prod(out_shape) * out_dtype.itemsize <= STAGE_BYTES:
                stage(b.name, out_shape, out_dtype)
            else:
                now.fresh[b.name] = (out_shape, out_dtype)

    def _place_view(self, now: "_Placement", b, root) -> None:
        """A buffer over its root (an arena slot, a staged buffer, or a run's input or output
        array, bound per run)."""
        shape = now.resolved.shapes.get(b.name)
        # bytes before a slice
        skip = slice_offset(self.plan, b, now.resolved.shapes, now.slice_sizes)
        skip_elems = skip // itemsize_of(b.dtype)
        if root.kind == "arena":
            now.static[b.name] = self._arena_view(now.arena, now.mem, b, root, shape, skip)
            now.memory[b.name] = (id(now.arena), now.mem.offsets[root.name] + skip,
                                  tuple(shape), b.dtype)
        elif root.name in now.staged:
            now.static[b.name] = view_of(now.staged[root.name], skip_elems, shape)
            now.memory[b.name] = now.memory[root.name] + (skip, tuple(shape), b.dtype)
        else:
            now.dynamic_views[b.name] = (root.name, shape, skip_elems)

    def _step_call(self, index: int, step, now: "_Placement") -> tuple:
        """(the step's no-argument call, its patches: (list, index, buffer name) that a run
        fills with its own arrays)."""
        static = now.static
        args = [None if n is None else static.get(n) for n in step.inputs]
        outs = [static.get(n) for n in step.outputs]
        patches = []
        for lst, names in ((args, step.inputs), (outs, step.outputs)):
            for i, n in enumerate(names):
                if n is not None and n not in static:
                    patches.append((lst, i, n))
        impl = self._impl(step)
        if not patches and hasattr(impl, "bind"):
            key = tuple(None if n is None else now.memory[n]
                        for n in list(step.inputs) + list(step.outputs))
            call = self._bind(index, key, impl, args, outs)
        else:  # the lists are patched with the run's arrays before the calls
            call = functools.partial(impl, args, outs)
        if self._profile is not None:
            label = step.op
            if self._profile_kernels and step.kernel:
                label = f"{step.op} {step.kernel}"
            call = self._profile.timed(label, call)
        return call, patches

    def _bind(self, index: int, key: tuple, impl, args: list, outs: list):
        """``impl.bind(args, outs)``, or the call bound for an earlier signature when this step
        sees the same memory (``key``: per array its arena, offset, shape and dtype, or the
        weight; host values are new per signature): a new signature of a decode step (one
        more KV position) rebinds only the steps whose arrays changed. The cached call holds
        its arrays, so their memory stays allocated while it is kept."""
        cached = self._bound.get(index)
        if cached is not None and cached[0] == key and cached[1] is impl:
            return cached[2]
        call = impl.bind(args, outs)
        self._bound[index] = (key, impl, call, args, outs)
        return call

    def _arena_view(self, arena, mem: MemoryPlan, b, root, shape, skip: int = 0) -> np.ndarray:
        """``b`` over the arena: its root's slot from ``skip`` bytes on (a slice's start)."""
        dtype = elem(b.dtype).np_dtype
        need = skip + math.prod(shape) * dtype.itemsize
        # The bucket was sized at its upper bounds; sizes grow with the dims, so a signature
        # within the bounds fits. Checked here, once per signature, rather than assumed.
        if need > mem.sizes[root.name]:
            raise PlanError(f"%{b.name}: needs {need} bytes for shape {shape}, its bucket "
                            f"{mem.bounds} planned {mem.sizes[root.name]} (a size that is not "
                            "monotone in the dims)")
        off = mem.offsets[root.name]
        return arena[off + skip:off + need].view(dtype).reshape(shape)
