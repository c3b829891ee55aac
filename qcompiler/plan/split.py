"""A plan up to the data-dependent ops: what comes before them planned, the rest interpreted.

A NonZero, Compress or Unique result has as many elements as its operand has selected
values, and a Range whose limit a kernel computes is as long as that value: no shape function
can size them before a run, so a plan cannot hold them, nor anything whose shape follows from
them. Before this file such a model got no plan at all and ran whole in the reference
interpreter. Now ``lower_with_tail`` finds those nodes (each ``DataDependentShapeError`` the
shape functions raise while planning memory) and ``split_module`` cuts ``main`` in two:

- the **head**: every node that does not read a data-dependent result, directly or through
  other nodes, with an extra output for each head value the tail reads (the boundary). It is
  planned, compiled and run like any model;
- the **tail**: the data-dependent nodes and every node downstream of them, as a function of
  the boundary values and the inputs it reads. ``TailRunner`` runs it in the reference
  interpreter after the head (the backend's compiled qmatmul kernels substituted).

So a model whose data-dependent op comes late (a detector's post-processing, a boolean-mask
gather near the end) keeps nearly all of its work compiled. The head and tail are clones of
the module: node and value names are the original ones, so kernels, reports and the plan's
``tail_roots`` name what the user's graph names.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from qcompiler.ir import Module
from qcompiler.plan.plan import Plan, PlanError

# More data-dependent nodes than this and the plan is not worth cutting out piece by piece.
MAX_TAIL_ROOTS = 64


class Split(NamedTuple):
    head: Module            # planned; outputs: its share of main's, then the boundary values
    tail: Module            # interpreted; args: inputs it reads, then the boundary values
    boundary: dict          # boundary value name -> the head's output name for it
    tail_nodes: list        # first result names of the tail's nodes (constants left out)


def split_module(module: Module, roots) -> Split:
    """``module.main`` cut at the nodes named ``roots`` (first result names; see the module
    doc). Raises PlanError when a root is not a node of ``main`` or when nothing precedes the
    cut (no head output: the whole model follows a data-dependent value)."""
    fn = module.main
    roots = set(roots)
    downstream: set = set()  # value names computed in the tail
    tail_nodes = []
    for node in fn.nodes:
        if node.op == "constant":
            continue
        if node.results[0].name in roots or any(v is not None and v.name in downstream
                                                for v in node.operands):
            tail_nodes.append(node.results[0].name)
            downstream.update(r.name for r in node.results)
    missing = roots - set(tail_nodes)
    if missing:
        raise PlanError(f"cannot split @{fn.name} at {sorted(missing)}: no such node")
    in_tail = set(tail_nodes)
    arg_names = {a.name for a in fn.args}
    constants = {r.name for n in fn.nodes if n.op == "constant" for r in n.results}
    boundary_values = []  # head values the tail reads, in order of first use
    for node in fn.nodes:
        if node.op == "constant" or node.results[0].name not in in_tail:
            continue
        for v in node.operands:
            if v is not None and v.name not in downstream and v.name not in arg_names \
                    and v.name not in constants and v.name not in boundary_values:
                boundary_values.append(v.name)

    # the head: main without the tail, the boundary values as extra outputs
    head = module.clone()
    hf = head.main
    for node in [n for n in hf.nodes if n.op != "constant" and n.results[0].name in in_tail]:
        hf.erase(node)
    kept = [(name, v) for name, v in zip(hf.output_names, hf.outputs) if v.name not in downstream]
    taken = {name for name, _ in kept}
    already = {v.name: name for name, v in reversed(kept)}  # a value main returns already
    values = {v.name: v for v in hf.values()}
    boundary = {}
    for name in boundary_values:
        if name in already:
            boundary[name] = already[name]
            continue
        out = name if name not in taken else f"{name}.to_tail"
        taken.add(out)
        boundary[name] = out
        kept.append((out, values[name]))
    if not kept:
        raise PlanError(f"@{fn.name}: every output follows the data-dependent "
                        f"{', '.join('%' + r for r in sorted(roots))}: nothing to plan "
                        "before it")
    hf.set_outputs([v for _, v in kept], [name for name, _ in kept])
    hf.remove_dead_nodes()

    # the tail: the tail's nodes and the constants they read, over the boundary values
    tail = module.clone()
    tf = tail.main
    used = {v.name for n in tf.nodes if n.op != "constant" and n.results[0].name in in_tail
            for v in n.operands if v is not None}
    for node in [n for n in tf.nodes if not (n.results[0].name in in_tail or (
            n.op == "constant" and n.results[0].name in used))]:
        tf.erase(node)
    types = {r.name: r.type for n in fn.nodes for r in n.results}
    replaced = {name: tf.add_arg(name, types[name]) for name in boundary_values}
    for n in tf.nodes:
        n.operands = [replaced.get(v.name, v) if v is not None else None for v in n.operands]
    tf.args = [a for a in tf.args if a.name in used and a.name in arg_names] + \
        [replaced[name] for name in boundary_values]
    outputs = [(name, v) for name, v in zip(tf.output_names, tf.outputs)
               if v.name in downstream]
    tf.set_outputs([v for _, v in outputs], [name for name, _ in outputs])
    return Split(head, tail, boundary, tail_nodes)


def lower_with_tail(module: Module, buckets=None, concat_in_place: bool = False) -> tuple:
    """(plan, split): ``lower(module)`` and None, or where a node's result shape depends on
    the values it reads, the plan of the head of ``split_module`` at every such node
    (``plan.tail_roots``) and that Split. Raises PlanError as ``lower`` does for anything
    else."""
    from qcompiler.plan.lower import lower
    from qcompiler.plan.shapes import DataDependentShapeError

    roots: list = []
    split = None
    while True:
        try:
            plan = lower(module if split is None else split.head, buckets, concat_in_place)
        except DataDependentShapeError as e:
            if e.node in roots or len(roots) >= MAX_TAIL_ROOTS:
                raise
            roots.append(e.node)
            try:
                split = split_module(module, roots)
            except PlanError as why:
                raise PlanError(f"{e}; {why}: the model runs in the reference interpreter "
                                "with its compiled kernels") from None
            continue
        plan.tail_roots = list(roots)
        return plan, split


class TailRunner:
    """``run(inputs)`` of a split model: the head's runner, then the tail in the reference
    interpreter over the head's boundary outputs; the outputs in ``main``'s order."""

    def __init__(self, split: Split, run_head: Callable, output_names: list,
                 kernels: Optional[dict] = None):
        self.split, self.run_head, self.output_names = split, run_head, list(output_names)
        self.kernels = kernels  # result name -> impl, for the tail's qmatmuls
        self._tail_outputs = set(split.tail.main.output_names)

    def __call__(self, inputs: dict) -> dict:
        from qcompiler.runtime.reference import run

        head = self.run_head(inputs)
        boundary = self.split.boundary
        feeds = {a.name: head[boundary[a.name]] if a.name in boundary else inputs[a.name]
                 for a in self.split.tail.main.args}
        tail = run(self.split.tail, feeds, kernels=self.kernels)
        return {name: tail[name] if name in self._tail_outputs else head[name]
                for name in self.output_names}

    run = __call__


def tail_report_line(plan: Plan, split: Split) -> str:
    """report.txt's line for a plan with a tail."""
    roots = ", ".join(f"%{r}" for r in plan.tail_roots)
    return (f"  tail: {len(split.tail_nodes)} nodes from {roots} on (result shapes that "
            "depend on values) run in the reference interpreter after the plan")
