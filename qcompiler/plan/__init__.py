"""The executable plan: QIR lowered to kernel calls over planned buffers.

    plan = lower(module, buckets={"batch": [1, 8, 32]})   # steps + a memory plan per bucket
    print(format_plan(plan, {"batch": 8}))
    outputs = PlanExecutor(plan, module).run({"x": x})     # reference ops as the default steps

``lower.py`` (steps, buffers, views, host shape functions), ``memory.py`` (liveness, in-place
reuse, arena offsets per shape bucket), ``shapes.py`` (concrete shapes and shape functions for
concrete dims), ``split.py`` (a plan up to data-dependent ops, the rest interpreted),
``executor.py`` (runs a plan), ``printer.py``, ``plan.py`` (the data, JSON).
"""
from qcompiler.plan.executor import PlanExecutor, reference_step  # noqa: F401
from qcompiler.plan.lower import lower, lower_steps  # noqa: F401
from qcompiler.plan.memory import (DEFAULT_BUCKET_BOUNDS, liveness, plan_memory,  # noqa: F401
                                   resolve_buckets, select_bucket)
from qcompiler.plan.plan import (Buffer, MemoryPlan, Plan, PlanError, Step,  # noqa: F401
                                 plan_from_json, plan_to_json)
from qcompiler.plan.printer import format_plan  # noqa: F401


def slices_in_place(plan: Plan) -> int:
    """Concat operands that their kernels write in place, into slices of the concat's result
    (``lower``'s concat_in_place)."""
    return sum(1 for s in plan.steps if s.kind == "kernel"
               for n in s.outputs if plan.buffers[n].alias_of)


def plan_report(plan: Plan) -> list[dict]:
    """Per bucket: the figures report.json and report.txt show."""
    return [{"bucket": dict(m.bounds), "peak_arena_bytes": m.peak_bytes,
             "intermediate_bytes": m.intermediate_bytes, "kernels": plan.count("kernel"),
             "host_shape_functions": plan.count("host"), "views": plan.count("view"),
             "in_place": len(m.inplace), "concat_slices_in_place": slices_in_place(plan)}
            for m in plan.buckets]


def artifact_plan(module, buckets=None, concat_in_place: bool = False) -> tuple:
    """(plan JSON or None, report entry, report.txt lines) for an artifact. A graph that cannot
    be planned (PlanError) still compiles: the report says why it has no plan.
    ``concat_in_place``: the backend's (``Backend.concat_in_place``), see ``lower``."""
    from qcompiler.plan.split import lower_with_tail, tail_report_line

    try:
        plan, split = lower_with_tail(module, buckets, concat_in_place)
    except PlanError as e:
        return None, {"error": str(e)}, ["", f"plan: none ({e})"]
    rows = plan_report(plan)
    lines = ["", f"plan: {plan.count('kernel')} kernels, {plan.count('host')} host shape "
                 f"functions, {plan.count('view')} views, {plan.count('copy')} copies, "
                 f"{slices_in_place(plan)} concat operands written in place "
                 "(qcompile --print-plan shows it)"]
    for r in rows:
        bucket = "{" + ", ".join(f"{k}: {v}" for k, v in r["bucket"].items()) + "}"
        lines.append(f"  bucket {bucket:<28} arena peak {r['peak_arena_bytes']:>12} B   "
                     f"intermediates {r['intermediate_bytes']:>12} B")
    for bounds, why in plan.skipped_buckets:
        bucket = "{" + ", ".join(f"{k}: {v}" for k, v in bounds.items()) + "}"
        lines.append(f"  bucket {bucket:<28} left out: {why}")
    entry = {"buckets": rows}
    if split is not None:
        lines.append(tail_report_line(plan, split))
        entry["tail"] = {"roots": list(plan.tail_roots), "nodes": list(split.tail_nodes)}
    return plan_to_json(plan), entry, lines
