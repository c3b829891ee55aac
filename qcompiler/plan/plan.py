"""The executable plan: kernel calls over named buffers, and its JSON form.

A ``Plan`` is what ``lower(module)`` returns (``qcompiler/plan/lower.py``): the steps of
``module.main`` in a topological order, each one node, over buffers named after the values
they hold. Buffer kinds:

- ``input``  a graph argument, bound per run (never copied);
- ``output`` a graph output, a fresh array per run that the producing step writes into (so a
  caller may keep the results while the next run reuses the arena);
- ``weight`` a constant: resident, never in the arena;
- ``arena``  an intermediate: an offset in the one arena of a shape bucket;
- ``view``   reshape/squeeze/unsqueeze/identity of a contiguous buffer: the same bytes as
  ``alias_of`` (always the root buffer, never another view) with another shape; no kernel.
  Or a slice of its root (``offset_of``): a concat's operand that its producer writes
  straight into the concat's result (``lower(..., concat_in_place=True)``);
- ``host``   a value that depends only on input *shapes* and constants (``shape`` -> ``concat``
  -> reshape targets, ranges, masks built from them): the plan's shape functions, evaluated on
  the host once per input-shape signature and cached.

Step kinds: ``kernel`` (one kernel call), ``view`` (no call), ``host`` (a shape function) and
``copy`` (a graph output that is a view, an input, a weight or a host value, or one value
returned under two names, copied into its output buffer at the end).

The memory plan of each shape bucket (``MemoryPlan``, made by ``qcompiler/plan/memory.py``) gives
the arena offset and planned byte size of every arena buffer and view for that bucket's upper
bounds. Everything here is JSON-able (``plan_to_json`` / ``plan_from_json``); the artifact's
manifest carries it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qcompiler.errors import QCompilerError

PLAN_FORMAT = 1
BUFFER_KINDS = ("input", "output", "weight", "arena", "view", "host")
STEP_KINDS = ("kernel", "view", "host", "copy")
ARENA_ALIGN = 64  # bytes: a cache line, and what AVX-512 loads want


class PlanError(QCompilerError, RuntimeError):
    """The graph cannot be lowered to a plan, or a plan cannot be sized for some dims."""


@dataclass
class Buffer:
    name: str
    kind: str
    shape: tuple          # the IR's shape: ints and symbols (``batch``, ``Min_512__seq``)
    dtype: str            # QIR element type name
    alias_of: Optional[str] = None  # views only: the root buffer
    # views only: the buffers whose bytes precede this one in its root (a concat's earlier
    # operands), when it is a slice that its producer writes in place (``lower``'s
    # ``concat_in_place``); empty for a view of the whole root
    offset_of: tuple = ()

    def shape_text(self) -> str:
        return "*".join(str(d) for d in self.shape) if self.shape else "1"


@dataclass
class Step:
    kind: str
    op: str
    node: str             # the node's first result name: identifies the node in the module
    kernel: str           # stable name from op, element type and shapes ("" for views/host)
    inputs: list          # buffer names, None for a missing optional operand
    outputs: list


@dataclass
class MemoryPlan:
    """Arena placement for one shape bucket (or for one exact set of dims)."""

    bounds: dict          # symbol -> upper bound
    offsets: dict         # arena and view buffer -> byte offset in the arena
    sizes: dict           # arena buffer -> planned bytes (at ``bounds``)
    inplace: dict         # output buffer -> the dying input buffer whose bytes it reuses
    peak_bytes: int       # the arena's size
    intermediate_bytes: int  # sum of every arena buffer: what an interpreter would allocate

    def key(self) -> tuple:
        return tuple(sorted(self.bounds.items()))


@dataclass
class Plan:
    function: str
    symbols: list                      # symbols of the input shapes, in order of appearance
    inputs: list                       # buffer names of the arguments, in order
    outputs: dict                      # output name -> buffer name (kind ``output``)
    buffers: dict                      # name -> Buffer
    steps: list                        # Step, in execution order
    buckets: list = field(default_factory=list)  # MemoryPlan per declared bucket
    # (bounds, why) of default buckets the model cannot take (not in the artifact's JSON)
    skipped_buckets: list = field(default_factory=list)
    # the plan covers ``split_module(module, tail_roots)``'s head: the nodes whose shapes
    # depend on these data-dependent nodes' values run after it, in the reference
    # interpreter (qcompiler/plan/split.py); empty: the whole function
    tail_roots: list = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for s in self.steps if s.kind == kind)

    def bucket(self, bounds: dict) -> MemoryPlan:
        want = tuple(sorted(bounds.items()))
        for b in self.buckets:
            if b.key() == want:
                return b
        raise PlanError(f"the plan has no bucket {dict(bounds)}; it has "
                        f"{[b.bounds for b in self.buckets]}")


def plan_to_json(plan: Plan) -> dict:
    return {
        "format": PLAN_FORMAT,
        "function": plan.function,
        "symbols": list(plan.symbols),
        "inputs": list(plan.inputs),
        "outputs": dict(plan.outputs),
        "buffers": [{"name": b.name, "kind": b.kind, "shape": list(b.shape), "dtype": b.dtype,
                     **({"alias_of": b.alias_of} if b.alias_of else {}),
                     **({"offset_of": list(b.offset_of)} if b.offset_of else {})}
                    for b in plan.buffers.values()],
        "steps": [{"kind": s.kind, "op": s.op, "node": s.node, "kernel": s.kernel,
                   "inputs": list(s.inputs), "outputs": list(s.outputs)} for s in plan.steps],
        "buckets": [{"bounds": dict(m.bounds), "peak_bytes": m.peak_bytes,
                     "intermediate_bytes": m.intermediate_bytes, "offsets": dict(m.offsets),
                     "sizes": dict(m.sizes), "inplace": dict(m.inplace)}
                    for m in plan.buckets],
        **({"tail_roots": list(plan.tail_roots)} if plan.tail_roots else {}),
    }


def plan_from_json(data: dict) -> Plan:
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanError(f"not a plan of format {PLAN_FORMAT}: "
                        f"{data.get('format') if isinstance(data, dict) else type(data).__name__}")
    try:
        buffers = {b["name"]: Buffer(b["name"], b["kind"], tuple(b["shape"]), b["dtype"],
                                     b.get("alias_of"), tuple(b.get("offset_of", ())))
                   for b in data["buffers"]}
        steps = [Step(s["kind"], s["op"], s["node"], s["kernel"], list(s["inputs"]),
                      list(s["outputs"])) for s in data["steps"]]
        buckets = [MemoryPlan(dict(m["bounds"]), dict(m["offsets"]), dict(m["sizes"]),
                              dict(m["inplace"]), int(m["peak_bytes"]),
                              int(m["intermediate_bytes"])) for m in data["buckets"]]
        return Plan(data["function"], list(data["symbols"]), list(data["inputs"]),
                    dict(data["outputs"]), buffers, steps, buckets,
                    tail_roots=[str(n) for n in data.get("tail_roots", [])])
    except (KeyError, TypeError) as e:
        raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from None
