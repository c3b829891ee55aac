"""Lowering QIR to an executable plan: ``lower(module, buckets) -> Plan``.

Each node of ``module.main`` becomes one step, in the function's (topological) order:

- ``constant`` nodes become ``weight`` buffers and no step;
- a node whose operands are all host values or weights, and every ``shape`` node (it reads only
  its operand's shape), is a ``host`` step: a shape function, evaluated once per input-shape
  signature (``qcompiler/plan/shapes.py``), its results held outside the arena;
- reshape/squeeze/unsqueeze/identity/flatten of a data buffer is a ``view`` step: the result
  aliases the root buffer of its operand (a view of a view aliases the root), no kernel;
- every other node is a ``kernel`` step, one kernel call in destination-passing style.

Graph outputs: a kernel that produces a graph output writes straight into an ``output`` buffer,
a fresh array per run. The alternative, copying results out of the arena at the end, costs a
copy per output and per run; returning arena views instead would let the next run overwrite
results a caller still holds. An output that no kernel writes (a view, an input, a weight, a
host value, or a value returned under a second name) gets a ``copy`` step at the end.

Concats in place (``concat_in_place=True``; backends whose executor takes slices, the CPU's):
a concat along an axis with only 1s before it, whose operands are each the whole of an arena
buffer that only a kernel wrote, has no step. Each operand's producer writes straight into
its slice of the concat's result (a ``view`` whose ``offset_of`` names the operands before
it), so the bytes are written once instead of written, read and copied. The slices must
start on 64-byte boundaries for every dims (compiled kernels take aligned arrays): the
static bytes of each earlier operand are a multiple of 64. The stacked KV cache of a decode
step is the case that matters: each layer's cache, concatenated with its new position,
lands in the graph's ``present`` output directly.

Memory (arena offsets per shape bucket) is planned by ``qcompiler/plan/memory.py``.
"""
from __future__ import annotations

import re

from qcompiler.ir import Module, elem
from qcompiler.plan.memory import symbolic_numel
from qcompiler.plan.plan import ARENA_ALIGN, Buffer, Plan, PlanError, Step

# Ops whose result is the operand's bytes under another shape (the operand is contiguous:
# every plan buffer is).
VIEW_OPS = frozenset({"reshape", "squeeze", "unsqueeze", "identity", "flatten"})


def _is_row_major(value) -> bool:
    layout = value.type.layout
    return layout is None or layout.name == "row_major"


def _shape_tag(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def kernel_name(node, data_operands) -> str:
    """A stable name from the op, the result's element type and the data shapes: two nodes with
    the same name can share one compiled kernel (weights are operands, not part of the name)."""
    parts = [node.op, node.results[0].type.dtype.name]
    parts += [_shape_tag(v.type.shape) for v in data_operands]
    parts.append("to_" + "_".join(_shape_tag(r.type.shape) for r in node.results))
    return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))


def input_symbols(module: Module) -> list[str]:
    """Symbols of the argument shapes, in order of first appearance."""
    out: list[str] = []
    for a in module.main.args:
        for d in a.type.shape:
            if isinstance(d, str) and d != "?" and d not in out:
                out.append(d)
    return out


def lower(module: Module, buckets=None, concat_in_place: bool = False) -> Plan:
    """The plan of ``module.main`` with a memory plan per shape bucket.

    ``buckets``: None (the default set, see ``memory.resolve_buckets``), ``{symbol: [bound,
    ...]}`` (every combination) or a list of ``{symbol: bound}``.

    A default bucket the model cannot take (a shape function fails at its bounds: a GPT-2 with
    64 positions at seq 128) is left out and named in ``plan.skipped_buckets``; a bucket the
    caller asked for raises PlanError naming it, as does a model no default bucket fits.
    ``concat_in_place``: see the module's docstring.
    """
    from qcompiler.plan.memory import plan_memory, resolve_buckets
    from qcompiler.plan.shapes import ConstantCache, DataDependentShapeError

    plan = lower_steps(module, concat_in_place)
    cache = ConstantCache()
    for bounds in resolve_buckets(buckets, plan.symbols):
        try:
            plan.buckets.append(plan_memory(plan, module, bounds, cache))
        except DataDependentShapeError:
            raise  # no bucket would help (split.py plans what comes before it)
        except PlanError as e:
            if buckets is not None:
                raise PlanError(f"bucket {bounds}: {e}") from None
            plan.skipped_buckets.append((dict(bounds), str(e)))
    if not plan.buckets and plan.skipped_buckets:
        bounds, why = plan.skipped_buckets[0]
        raise PlanError(f"no default bucket fits the model (bucket {bounds}: {why}); pass "
                        "buckets (qcompile --buckets SYM=N,N)")
    return plan


def lower_steps(module: Module, concat_in_place: bool = False) -> Plan:
    """The steps and buffers of the plan, without memory plans."""
    fn = module.main
    buffers: dict[str, Buffer] = {}
    for a in fn.args:
        buffers[a.name] = Buffer(a.name, "input", tuple(a.type.shape), a.type.dtype.name)
    output_ids = {id(v) for v in fn.outputs}

    def buffer_of(v) -> Buffer:
        b = buffers.get(v.name)
        if b is None:
            raise PlanError(f"%{v.name} is used before it is defined in @{fn.name}")
        return b

    steps: list[Step] = []
    concats: list = []  # (step, node) of the concat kernels
    for node in fn.nodes:
        if not node.results:
            raise PlanError(f"{node.op}: a node without results cannot be a plan step")
        if node.op == "constant":
            for r in node.results:
                buffers[r.name] = Buffer(r.name, "weight", tuple(r.type.shape), r.type.dtype.name)
            continue
        present = [v for v in node.operands if v is not None]
        kinds = [buffer_of(v).kind for v in present]
        if node.op == "shape" or all(k in ("host", "weight") for k in kinds):
            kind = "host"
        elif (node.op in VIEW_OPS and len(node.results) == 1 and node.operands[0] is not None
              and kinds[0] not in ("host", "weight")
              and _is_row_major(node.operands[0]) and _is_row_major(node.results[0])):
            kind = "view"
        else:
            kind = "kernel"
        for r in node.results:
            if kind == "kernel":
                bkind = "output" if id(r) in output_ids else "arena"
            else:
                bkind = kind
            alias = None
            if kind == "view":
                src = buffer_of(node.operands[0])
                alias = src.alias_of or src.name
            buffers[r.name] = Buffer(r.name, bkind, tuple(r.type.shape), r.type.dtype.name,
                                     alias)
        data = [v for v, k in zip(present, kinds) if k not in ("host", "weight")]
        steps.append(Step(kind, node.op, node.results[0].name,
                          kernel_name(node, data) if kind == "kernel" else "",
                          [v.name if v is not None else None for v in node.operands],
                          [r.name for r in node.results]))
        if kind == "kernel" and node.op == "concat":
            concats.append((steps[-1], node))
    if concat_in_place:
        sliced: set = set()  # results of the concats done in place
        for step, node in concats:
            if _slice_concat(buffers, step, node, sliced):
                steps.remove(step)
                sliced.add(step.outputs[0])

    outputs: dict[str, str] = {}
    written: set[str] = set()
    for name, v in zip(fn.output_names, fn.outputs):
        b = buffer_of(v)
        if b.kind == "output" and b.name not in written:
            outputs[name] = b.name
            written.add(b.name)
            continue
        out_name = f"out:{name}"  # ':' never occurs in a value name
        buffers[out_name] = Buffer(out_name, "output", tuple(v.type.shape), v.type.dtype.name)
        steps.append(Step("copy", "copy", v.name, f"copy_{v.type.dtype.name}", [v.name],
                          [out_name]))
        outputs[name] = out_name
    return Plan(fn.name, input_symbols(module), [a.name for a in fn.args], outputs, buffers,
                steps)


def _slice_concat(buffers: dict, step: Step, node, sliced: set) -> bool:
    """Turn the operands of ``step`` (a concat) into slices of its result when that is legal
    (see the module's docstring); True when it did, and the step has no work left."""
    out = buffers[step.outputs[0]]
    rank = len(out.shape)
    axis = node.attrs.get("axis", 0)
    axis = axis + rank if axis < 0 else axis
    if out.kind not in ("arena", "output") or not 0 <= axis < rank \
            or any(d != 1 for d in out.shape[:axis]):
        return False  # each operand would not be one contiguous block of the result
    if any(n is None for n in step.inputs) or len(set(step.inputs)) != len(step.inputs):
        return False
    roots = []
    for name in step.inputs:
        b = buffers[name]
        root = buffers[b.alias_of or name]
        # the whole of an arena buffer a kernel wrote (not an input, a weight, a host value,
        # an output, a slice already or a concat done in place: no nested slices), of the
        # result's element type
        size = symbolic_numel(b.shape)
        if (root.kind != "arena" or root.name in sliced or root.dtype != out.dtype
                or size is None or size != symbolic_numel(root.shape) or root.name in roots):
            return False
        roots.append(root.name)
    itemsize = elem(out.dtype).np_dtype.itemsize
    if any(symbolic_numel(buffers[n].shape)[0] * itemsize % ARENA_ALIGN
           for n in step.inputs[:-1]):
        return False  # a later slice could start off a 64-byte boundary
    for i, root in enumerate(roots):
        before = tuple(step.inputs[:i])
        for b in buffers.values():
            if b.name == root or b.alias_of == root:
                b.kind, b.alias_of, b.offset_of = "view", out.name, before
    return True
