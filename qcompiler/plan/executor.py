"""Running a plan: ``PlanExecutor(plan, module, step_impls).run({name: array})``.

Per shape bucket one arena, allocated once (64-byte aligned) and reused by every run. Per
input-shape signature, once: the shape functions are evaluated (``shapes.resolve``), a bucket
is chosen (the smallest arena covering the dims; beyond every bucket a plan for exactly these
dims, with a warning), and the call list is built: for each step its callable and the numpy
views it reads and writes. A run then binds the inputs and fresh output arrays into that list
and loops over it.

A step implementation is called in destination-passing style, ``impl(args, outs)``: ``args``
are the operands (None for an absent optional one), ``outs`` the arrays to write. Entries of
``step_impls`` (keyed by the step's node name, else by its kernel name) replace the default,
which runs the reference op (``qcompiler.runtime.reference.OP_IMPLS``) and copies its result
into the out view, so that every plan runs before each op has a compiled kernel.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir import Module, elem
from qcompiler.ir.core import constant_value
from qcompiler.plan.memory import plan_memory, select_bucket
from qcompiler.plan.plan import ARENA_ALIGN, MemoryPlan, Plan, PlanError
from qcompiler.plan.shapes import ConstantCache, resolve

StepImpl = Callable[[list, list], None]


def aligned_empty(nbytes: int) -> np.ndarray:
    """Uninitialized uint8 memory whose first byte is 64-byte aligned."""
    raw = np.empty(nbytes + ARENA_ALIGN, np.uint8)
    skip = (-raw.ctypes.data) % ARENA_ALIGN
    return raw[skip:skip + nbytes]


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

    def __init__(self, calls, patches, fresh, dynamic_views, outputs):
        self.calls = calls                  # (impl, args, outs) per step
        self.patches = patches              # (list, index, buffer name) to bind per run
        self.fresh = fresh                  # output buffer -> (shape, dtype): new per run
        self.dynamic_views = dynamic_views  # view -> (root, shape) over inputs/outputs
        self.outputs = outputs              # output name -> buffer name

    def run(self, arrays: dict) -> dict:
        bound = dict(arrays)
        for name, (shape, dtype) in self.fresh.items():
            bound[name] = np.empty(shape, dtype)
        for name, (root, shape) in self.dynamic_views.items():
            bound[name] = bound[root].reshape(shape)
        for lst, i, name in self.patches:
            lst[i] = bound[name]
        for impl, args, outs in self.calls:
            impl(args, outs)
        return {out: bound[buf] for out, buf in self.outputs.items()}


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
        self._prepared: dict[tuple, _Prepared] = {}
        self._exact: dict[tuple, MemoryPlan] = {}
        self._warned = False
        self._impls: dict[str, StepImpl] = {}
        values = {r.name: r for n in module.main.nodes for r in n.results}
        self._weights = {}
        for b in plan.buffers.values():
            if b.kind != "weight":
                continue
            if b.name not in values:
                raise PlanError(f"the plan names %{b.name}, which the module does not define")
            self._weights[b.name] = constant_value(module, values[b.name])

    # -- inputs ----------------------------------------------------------------------------
    def check_inputs(self, inputs) -> dict:
        """Contiguous arrays by input name; InputError naming the input for anything wrong."""
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict {{name: array}}, got {type(inputs).__name__}")
        names = self.plan.inputs
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise InputError(f"@{self.plan.function} inputs: missing {missing}, unknown {extra}")
        dims: dict = {}
        out = {}
        for name in names:
            b = self.plan.buffers[name]
            want = f"tensor<[{', '.join(str(d) for d in b.shape)}], {b.dtype}>"
            x = inputs[name]
            if not isinstance(x, np.ndarray):
                try:
                    x = np.asarray(x)
                except Exception as e:
                    raise InputError(f"input %{name}: expected {want}, got "
                                     f"{type(x).__name__} ({e})") from None
            et = elem(b.dtype)
            if x.dtype != et.np_dtype:
                raise InputError(f"input %{name}: expected {want}, got dtype {x.dtype}")
            if x.ndim != len(b.shape):
                raise InputError(f"input %{name}: expected {want}, got shape {x.shape}")
            for i, (d, n) in enumerate(zip(b.shape, x.shape)):
                if isinstance(d, int) and d != n:
                    raise InputError(f"input %{name}: expected {want}, got shape {x.shape}")
                if isinstance(d, str) and d != "?" and dims.setdefault(d, n) != n:
                    raise InputError(f"input %{name}: dim {i} is {d} = {dims[d]} in another "
                                     f"input, got {n} (shape {x.shape})")
            if et.bits < 8 and et.kind in ("int", "uint", "ternary", "nf4") and x.size:
                lo, hi = et.int_range()
                if x.min() < lo or x.max() > hi:
                    raise InputError(f"input %{name}: {b.dtype} codes must lie in [{lo}, {hi}]")
            out[name] = np.ascontiguousarray(x)
        return out

    # -- running ---------------------------------------------------------------------------
    def run(self, inputs) -> dict:
        arrays = self.check_inputs(inputs)
        signature = tuple(arrays[n].shape for n in self.plan.inputs)
        prepared = self._prepared.get(signature)
        if prepared is None:
            prepared = self._prepared[signature] = self._prepare(arrays)
        if self.poison_byte is not None:
            for arena in self._arenas.values():
                arena.fill(self.poison_byte)
        return prepared.run(arrays)

    __call__ = run

    def memory_plan_for(self, dims: dict) -> MemoryPlan:
        """The bucket that serves ``dims``, or (beyond every bucket) a plan for exactly them."""
        mem = select_bucket(self.plan, dims)
        if mem is not None:
            return mem
        bounds = {s: dims[s] for s in self.plan.symbols}
        key = tuple(sorted(bounds.items()))
        if key not in self._exact:
            if not self._warned:
                self._warned = True
                warnings.warn(f"@{self.plan.function}: dims {bounds} exceed every shape bucket "
                              f"({[b.bounds for b in self.plan.buckets]}); planning the arena "
                              "for exactly these dims (cached per shape; declare a larger "
                              "bucket to avoid it)", RuntimeWarning, stacklevel=3)
            self._exact[key] = plan_memory(self.plan, self.module, bounds, self._constants)
        return self._exact[key]

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
        plan = self.plan
        shapes = {n: a.shape for n, a in arrays.items()}
        resolved = resolve(plan, self.module, shapes, self._constants)
        mem = self.memory_plan_for(resolved.dims)
        arena = self._arena(mem)

        static: dict[str, np.ndarray] = {}
        fresh: dict = {}
        dynamic_views: dict = {}
        for b in plan.buffers.values():
            shape = resolved.shapes.get(b.name)
            if b.kind == "weight":
                static[b.name] = self._weights[b.name]
            elif b.kind == "host":
                static[b.name] = resolved.host[b.name]
            elif b.kind == "output":
                src = b.name if b.name in resolved.shapes else None
                if src is None:  # a copied output: the shape of the value it copies
                    step = next(s for s in plan.steps if s.outputs == [b.name])
                    src = step.inputs[0]
                fresh[b.name] = (resolved.shapes[src], elem(b.dtype).np_dtype)
            elif b.kind in ("arena", "view"):
                root = plan.buffers[b.alias_of or b.name]
                if root.kind == "arena":
                    static[b.name] = self._arena_view(arena, mem, b, root, shape)
                else:
                    dynamic_views[b.name] = (root.name, shape)

        calls, patches = [], []
        for step in plan.steps:
            if step.kind in ("view", "host"):
                continue
            args = [None if n is None else static.get(n) for n in step.inputs]
            outs = [static.get(n) for n in step.outputs]
            for lst, names in ((args, step.inputs), (outs, step.outputs)):
                for i, n in enumerate(names):
                    if n is not None and n not in static:
                        patches.append((lst, i, n))
            calls.append((self._impl(step), args, outs))
        return _Prepared(calls, patches, fresh, dynamic_views, dict(plan.outputs))

    def _arena_view(self, arena, mem: MemoryPlan, b, root, shape) -> np.ndarray:
        dtype = elem(b.dtype).np_dtype
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        # The bucket was sized at its upper bounds; sizes grow with the dims, so a signature
        # within the bounds fits. Checked here, once per signature, rather than assumed.
        if need > mem.sizes[root.name]:
            raise PlanError(f"%{b.name}: needs {need} bytes for shape {shape}, its bucket "
                            f"{mem.bounds} planned {mem.sizes[root.name]} (a size that is not "
                            "monotone in the dims)")
        off = mem.offsets[root.name]
        return arena[off:off + need].view(dtype).reshape(shape)


def interpreter_kernel_step(node, module: Module, kernel) -> StepImpl:
    """A kernel with the interpreter's signature (``kernel(node, args, module) -> [array]``, as
    backends hand to ``reference.run(kernels=...)``) as a step: its result copied into the
    planned output."""
    def impl(args: list, outs: list) -> None:
        for y, out in zip(kernel(node, args, module), outs):
            np.copyto(out, y)
    return impl


def plan_runner(module: Module, manifest: dict, kernels: dict) -> Callable:
    """``run(inputs)`` over the artifact's plan (``manifest["plan"]``, else lowered now), with
    the backend's compiled ``kernels`` (by node name, interpreter signature) as steps."""
    from qcompiler.plan.lower import lower
    from qcompiler.plan.plan import plan_from_json
    from qcompiler.runtime import reference

    data = manifest.get("plan")
    plan = plan_from_json(data) if data else lower(module)
    nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    impls = {}
    for name, kernel in kernels.items():
        node = nodes[name]
        if node.op == "qmatmul":  # the kernel computes the product; the epilogue as run() does
            kernel = reference._with_epilogue(kernel)
        impls[name] = interpreter_kernel_step(node, module, kernel)
    return PlanExecutor(plan, module, impls).run
