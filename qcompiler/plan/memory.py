"""Memory planning: liveness, in-place reuse and arena offsets per shape bucket.

- Liveness: an arena buffer lives from the (first) step that writes it or a slice of it to the
  last step that reads it or any view of it (views and host steps read no bytes: a view is an
  alias, and ``shape`` reads only a shape).
- In-place: an elementwise step may write its output over an operand whose bytes die at that
  step when both have the same byte size for every dims (equal symbolic element counts and the
  same element size): then out[i] depends only on in[i], which nobody reads afterwards. The
  output joins that operand's slot; a chain of elementwise ops runs in one slot.
- Placement: slots sorted by size (largest first), each put at the best-fitting gap between
  the slots already placed whose lifetimes overlap it, else above them (the greedy-by-size
  planner of TFLite's arena planner and tinygrad's memory_planner); offsets and sizes are
  multiples of 64 bytes. Weights, inputs, outputs and host values are never in the arena.
- Shape buckets: one memory plan per bucket, sized at the bucket's upper bounds. The plan is
  valid for every shape within them because every buffer's size is monotone in the dims
  (products of dims, min/max of dims): the executor checks that for each signature it serves
  (``PlanExecutor`` raises if a buffer outgrows its bucket's size).
- Beyond every bucket (``MemoryPlans``): a plan for the dims rounded up to their size class
  (eighths of an octave), cached per class, the few most recently used kept. Both runtimes
  (the CPU ``PlanExecutor``, the CUDA ``CudaPlanRunner``) take their plans from it.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections import OrderedDict
from typing import Optional

import numpy as np

from qcompiler.errors import ConfigError
from qcompiler.ir import Module, elem
from qcompiler.plan.plan import ARENA_ALIGN, MemoryPlan, Plan
from qcompiler.plan.shapes import ConstantCache, resolve

# Default upper bounds per input symbol when no buckets are declared: a single row/token, a
# small batch and a typical sequence. Beyond them the executor plans for the exact dims (and
# warns). A model without symbols has one bucket, {}.
DEFAULT_BUCKET_BOUNDS = (1, 16, 128)

# Ops whose output element i depends only on element i of each same-sized operand.
ELEMENTWISE_OPS = frozenset({
    "add", "sub", "mul", "div", "max", "min", "pow", "equal", "where", "isnan", "greater",
    "greater_or_equal", "less", "less_or_equal", "and", "sqrt", "erf", "relu", "sigmoid",
    "tanh", "exp", "neg", "abs", "reciprocal", "gelu", "cast", "identity", "fused_elementwise",
})


def align(n: int) -> int:
    return -(-n // ARENA_ALIGN) * ARENA_ALIGN


# --------------------------------------------------------------------------------------------
# buckets
# --------------------------------------------------------------------------------------------


def resolve_buckets(spec, symbols: list) -> list[dict]:
    """Bucket bounds from a spec: None (defaults), {symbol: [bound, ...]} (every combination),
    or a list of {symbol: bound}. Every bucket bounds every symbol of the inputs."""
    if not symbols:
        return [{}]
    if spec is None:
        spec = {s: list(DEFAULT_BUCKET_BOUNDS) for s in symbols}
    if isinstance(spec, dict):
        _check_symbols(spec, symbols, "buckets")
        lists = []
        for s in symbols:
            values = spec[s] if isinstance(spec[s], (list, tuple)) else [spec[s]]
            lists.append([_bound(v, s) for v in values])
        buckets = [dict(zip(symbols, combo)) for combo in itertools.product(*lists)]
    elif isinstance(spec, (list, tuple)):
        buckets = []
        for b in spec:
            if not isinstance(b, dict):
                raise ConfigError(f"buckets: each bucket is a dict {{symbol: bound}}, got {b!r}")
            _check_symbols(b, symbols, f"bucket {b}")
            buckets.append({s: _bound(b[s], s) for s in symbols})
    else:
        raise ConfigError(f"buckets: expected a dict of lists or a list of dicts, got "
                          f"{type(spec).__name__}")
    unique = {tuple(b[s] for s in symbols): b for b in buckets}
    return [unique[k] for k in sorted(unique)]


def _check_symbols(spec: dict, symbols: list, what: str) -> None:
    missing = [s for s in symbols if s not in spec]
    extra = [s for s in spec if s not in symbols]
    if missing or extra:
        raise ConfigError(f"{what}: missing bounds for {missing}, unknown symbols {extra} "
                          f"(the inputs' symbols are {symbols})")


def _bound(v, symbol: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"buckets: bound {v!r} of {symbol} is not a positive integer")
    return int(v)


def select_bucket(plan: Plan, dims: dict) -> Optional[MemoryPlan]:
    """The bucket with the smallest arena that covers ``dims``; None beyond every bucket."""
    covering = [b for b in plan.buckets
                if all(dims.get(s, 0) <= bound for s, bound in b.bounds.items())]
    if not covering:
        return None
    return min(covering, key=lambda b: (b.peak_bytes, sorted(b.bounds.items())))


# --------------------------------------------------------------------------------------------
# liveness and in-place reuse (independent of the dims)
# --------------------------------------------------------------------------------------------


def liveness(plan: Plan) -> dict[str, tuple[int, int]]:
    """Arena buffer -> (step that writes it, last step that reads it or a view of it)."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, step in enumerate(plan.steps):
        if step.kind in ("view", "host"):
            continue
        for name in step.inputs:
            if name is None:
                continue
            root = plan.buffers[name].alias_of or name
            if plan.buffers[root].kind == "arena":
                last[root] = i
        for name in step.outputs:
            # a slice of an arena buffer (a concat done in place) is written by its own step:
            # the root lives from the first of them
            root = plan.buffers[name].alias_of or name
            if plan.buffers[root].kind == "arena":
                first[root] = min(first.get(root, i), i)
                last.setdefault(root, i)
    return {name: (first[name], max(last[name], first[name])) for name in first}


def symbolic_numel(shape: tuple) -> Optional[tuple]:
    """(product of the int dims, sorted symbols): equal for two shapes of equal size at every
    dims; None when a dim is unknown (``?``)."""
    n, syms = 1, []
    for d in shape:
        if isinstance(d, int):
            n *= d
        elif d == "?":
            return None
        else:
            syms.append(d)
    return (n, tuple(sorted(syms))) if n else (0, ())


def inplace_pairs(plan: Plan, live: dict) -> dict[str, str]:
    """Output buffer -> the operand buffer (a root) whose bytes it takes over."""
    out: dict[str, str] = {}
    for i, step in enumerate(plan.steps):
        if step.kind != "kernel" or step.op not in ELEMENTWISE_OPS or len(step.outputs) != 1:
            continue
        dst = plan.buffers[step.outputs[0]]
        if dst.kind != "arena":
            continue
        want = symbolic_numel(dst.shape)
        if want is None:
            continue
        for name in step.inputs:
            if name is None:
                continue
            src = plan.buffers[name]
            root = src.alias_of or name
            if plan.buffers[root].kind != "arena" or live[root][1] != i:
                continue
            # the whole root, not a slice of it: out[i] must land on in[i]
            if (symbolic_numel(plan.buffers[root].shape) == want
                    and symbolic_numel(src.shape) == want
                    and elem(src.dtype).np_dtype.itemsize == elem(dst.dtype).np_dtype.itemsize):
                out[dst.name] = root
                break
    return out


# --------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def itemsize_of(dtype: str) -> int:
    return elem(dtype).np_dtype.itemsize


def nbytes(shape: tuple, dtype: str) -> int:
    # math.prod, not np.prod: called per view per new signature (a decode loop's every token)
    return math.prod(shape) * itemsize_of(dtype)


def slice_offset(plan: Plan, view, shapes: dict, sizes: Optional[dict] = None) -> int:
    """Bytes from the start of its root to ``view`` (0 unless it is a slice: the bytes of the
    buffers before it, at the concrete ``shapes``). ``sizes``: a memo for these shapes,
    filled and reused: buffer -> bytes, and tuple of buffers -> their total. The slices of
    one root share the buffers before them (the 22 layers' slices of a stacked KV cache sum
    231 sizes, 22 distinct), so each slice's total is the one before it plus one size."""
    before = view.offset_of
    if not before:
        return 0
    buffers = plan.buffers
    if sizes is None:
        return sum(math.prod(shapes[n]) * itemsize_of(buffers[n].dtype) for n in before)
    # the longest memoized prefix of `before`, then the sizes after it (each prefix kept)
    k = len(before)
    while k and before[:k] not in sizes:
        k -= 1
    total = sizes[before[:k]] if k else 0
    for i in range(k, len(before)):
        n = before[i]
        size = sizes.get(n)
        if size is None:
            size = sizes[n] = math.prod(shapes[n]) * itemsize_of(buffers[n].dtype)
        total += size
        sizes[before[:i + 1]] = total
    return total


def place(slots: dict) -> tuple[dict, int]:
    """Greedy best fit. ``slots``: name -> (first, last, bytes). Returns offsets and the peak."""
    order = sorted(slots, key=lambda s: (-slots[s][2], slots[s][0], s))
    placed: list[tuple[int, int, int, int]] = []  # offset, aligned size, first, last
    offsets: dict[str, int] = {}
    for name in order:
        first, last, size = slots[name]
        size = align(size)
        overlapping = sorted((o, sz) for o, sz, f, l in placed if f <= last and first <= l)
        best, end = None, 0
        for o, sz in overlapping:
            gap = o - end
            if gap >= size and (best is None or gap < best[1]):
                best = (end, gap)
            end = max(end, o + sz)
        offsets[name] = best[0] if best else end
        placed.append((offsets[name], size, first, last))
    peak = max((o + sz for o, sz, _, _ in placed), default=0)
    return offsets, peak


def plan_memory(plan: Plan, module: Module, bounds: dict,
                constants: Optional[ConstantCache] = None) -> MemoryPlan:
    """The arena plan for dims ``bounds`` (a bucket's upper bounds, or exact dims)."""
    shapes = {name: tuple(bounds[d] if isinstance(d, str) else d
                          for d in plan.buffers[name].shape) for name in plan.inputs}
    resolved = resolve(plan, module, shapes, constants)
    live = liveness(plan)
    inplace = inplace_pairs(plan, live)
    sizes = {name: nbytes(resolved.shapes[name], plan.buffers[name].dtype) for name in live}

    slot_of: dict[str, str] = {}
    for name in live:  # steps write in order, so an in-place source has its slot already
        slot_of[name] = slot_of[inplace[name]] if name in inplace else name
    slots: dict[str, tuple[int, int, int]] = {}
    for name, (first, last) in live.items():
        s = slot_of[name]
        f, l, size = slots.get(s, (first, last, 0))
        slots[s] = (min(f, first), max(l, last), max(size, sizes[name]))
    slot_offsets, peak = place(slots)
    offsets = {name: slot_offsets[slot_of[name]] for name in live}
    for b in plan.buffers.values():
        if b.kind == "view" and b.alias_of in offsets:
            offsets[b.name] = offsets[b.alias_of] + slice_offset(plan, b, resolved.shapes)
    return MemoryPlan(dict(bounds), offsets, sizes, inplace, peak, sum(sizes.values()))


def size_class(d: int) -> int:
    """``d`` rounded up to a multiple of an eighth of the largest power of two not above it
    (less than 12.5% more; 8 classes per octave): the dims an arena is planned for beyond
    every bucket."""
    if d <= 8:
        return d
    step = (1 << (d.bit_length() - 1)) // 8
    return -(-d // step) * step


class MemoryPlans:
    """The memory plan of each signature's dims: the bucket with the smallest arena that
    covers them, else (beyond every bucket) a plan for the dims rounded up to their size class
    (``size_class``). A decode loop, whose KV length grows by one each step, then plans once
    per class instead of once per step (sizes are monotone in the dims; the runtimes check
    every buffer against its slot). Dims at which the model's shapes cannot be resolved when
    rounded are planned as they are.

    At most ``max_exact`` plans beyond the buckets are kept, least recently used dropped: a
    generation loop leaves each class behind for good, and each class's arena is as large as
    its longest cache's activations. ``on_drop(plan)`` is told of each dropped plan (the
    runtime releases its arena)."""

    def __init__(self, plan: Plan, module: Module, constants: Optional[ConstantCache] = None,
                 max_exact: int = 4, on_drop=None):
        self.plan, self.module, self.constants = plan, module, constants
        self.max_exact, self.on_drop = max_exact, on_drop
        self.exact: OrderedDict[tuple, MemoryPlan] = OrderedDict()
        self.warned = False

    def for_dims(self, dims: dict) -> MemoryPlan:
        mem = select_bucket(self.plan, dims)
        if mem is not None:
            return mem
        bounds = {s: dims[s] for s in self.plan.symbols}
        rounded = {s: size_class(d) for s, d in bounds.items()}
        for want in (rounded, bounds):
            key = tuple(sorted(want.items()))
            if key in self.exact:
                self.exact.move_to_end(key)
                return self.exact[key]
        if not self.warned:
            self.warned = True
            warnings.warn(f"@{self.plan.function}: dims {bounds} exceed every shape bucket "
                          f"({[b.bounds for b in self.plan.buckets]}); planning the arena for "
                          f"dims rounded up to their size class ({rounded}; cached per class; "
                          "declare a larger bucket to avoid it)", RuntimeWarning, stacklevel=4)
        try:
            mem = plan_memory(self.plan, self.module, rounded, self.constants)
            key = tuple(sorted(rounded.items()))
        except Exception:  # a shape the model cannot take at the rounded dims
            mem = plan_memory(self.plan, self.module, bounds, self.constants)
            key = tuple(sorted(bounds.items()))
        self.exact[key] = mem
        while len(self.exact) > self.max_exact:
            _, old = self.exact.popitem(last=False)
            if self.on_drop is not None:
                self.on_drop(old)
        return mem
