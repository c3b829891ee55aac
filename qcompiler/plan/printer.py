"""``format_plan(plan, bucket)``: the plan as text, one line per step, for one shape bucket.

    plan @main for bucket {batch: 16}: 4 kernels, 1 view, 2 host, 0 copies; arena peak 16384 B
      %fc0.out @0x0 [batch*128 f32, 8192 B] = qmatmul(%x (input), %fc0.w (weight), ...)
      %act0 @0x0 [batch*128 f32, 8192 B] = gelu(%fc0.out @0x0)  in place of %fc0.out

Arena buffers show their offset and their size at the bucket's bounds; other buffers their
kind. Views and host steps (shape functions) are marked, as are kernels that write a slice of
a concat's result in place; a summary of every bucket ends it.
"""
from __future__ import annotations

from typing import Optional, Union

from qcompiler.plan.plan import MemoryPlan, Plan


def _bucket_text(bounds: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in bounds.items()) + "}"


def _operand(plan: Plan, mem: MemoryPlan, name: Optional[str]) -> str:
    if name is None:
        return "none"
    b = plan.buffers[name]
    if name in mem.offsets:
        return f"%{name} @{mem.offsets[name]:#x}"
    return f"%{name} ({b.kind})"


def _result(plan: Plan, mem: MemoryPlan, name: str) -> str:
    b = plan.buffers[name]
    typ = f"{b.shape_text()} {b.dtype}"
    if b.kind == "arena":
        return f"%{name} @{mem.offsets[name]:#x} [{typ}, {mem.sizes[name]} B]"
    if b.kind == "view" and name in mem.offsets:
        return f"%{name} @{mem.offsets[name]:#x} [{typ}]"
    return f"%{name} ({b.kind}) [{typ}]"


def format_plan(plan: Plan, bucket: Union[dict, MemoryPlan, None] = None) -> str:
    """The plan's steps with the offsets of ``bucket`` (bounds or a MemoryPlan; default: the
    first bucket)."""
    if isinstance(bucket, MemoryPlan):
        mem = bucket
    elif bucket is not None:
        mem = plan.bucket(bucket)
    else:
        mem = plan.buckets[0]
    counts = {k: plan.count(k) for k in ("kernel", "view", "host", "copy")}
    lines = [f"plan @{plan.function} for bucket {_bucket_text(mem.bounds)}: "
             f"{counts['kernel']} kernels, {counts['view']} views, {counts['host']} host "
             f"(shape functions), {counts['copy']} copies; {len(plan.steps)} steps",
             f"  arena peak {mem.peak_bytes} B (intermediates {mem.intermediate_bytes} B), "
             f"{len(mem.inplace)} in place",
             "  inputs: " + ", ".join(_result(plan, mem, n) for n in plan.inputs),
             "  outputs: " + ", ".join(f'"{o}" = %{b}' for o, b in plan.outputs.items())]
    for i, step in enumerate(plan.steps):
        outs = ", ".join(_result(plan, mem, n) for n in step.outputs)
        args = ", ".join(_operand(plan, mem, n) for n in step.inputs)
        line = f"  {i:>3} {step.kind:<6} {outs} = {step.op}({args})"
        src = mem.inplace.get(step.outputs[0]) if step.outputs else None
        if src is not None:
            line += f"  in place of %{src}"
        if step.kind == "view":
            line += f"  view of %{plan.buffers[step.outputs[0]].alias_of}"
        else:
            # concat operands written in place: the concat has no step
            for out in (plan.buffers[n] for n in step.outputs):
                if out.alias_of:
                    after = ", ".join(f"%{n}" for n in out.offset_of)
                    line += (f"  %{out.name} into %{out.alias_of}"
                             + (f" after {after}" if after else " at its start"))
        lines.append(line)
    if plan.tail_roots:  # qcompiler/plan/split.py
        lines.append("  then the reference interpreter, from the data-dependent "
                     + ", ".join(f"%{r}" for r in plan.tail_roots) + " on")
    lines.append("  buckets:")
    for m in plan.buckets:
        lines.append(f"    {_bucket_text(m.bounds):<28} arena peak {m.peak_bytes:>12} B   "
                     f"intermediates {m.intermediate_bytes:>12} B")
    return "\n".join(lines) + "\n"
