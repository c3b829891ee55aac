"""One decode graph for every KV-cache length up to a capacity.

A decode step exported with a KV cache takes ``past [L, B, Hkv, P, D]`` and returns
``present`` with P + 1 rows. Fed back, the cache makes every token a new input signature:
the runner resolves its shapes, rebuilds the ~50 launches that read P and enqueues the whole
table from the host (2.3 ms a token on an H100 host against a 0.95 ms step; codegen/cuda/NOTES.md).

Where the plan allows it, the runner instead runs the step of cache length P as the step of a
**capacity** C >= P (the next multiple of ``CACHE_STEP`` rows): every launch gets C's shapes,
the cache inputs are copied into buffers laid out for C rows (each head's P rows, then
padding), and a device word holds the padding C - P. Two kernels must know the length and
read that word (``PAD_AWARE_OPS``): qkv_heads copies the P rows and writes the new row at P
(not at C), and decode attention reads P + 1 keys. Every other launch over the cache treats
the padding as data (a cast converts it, a concat along another axis moves it) and nothing
reads it as a key. The outputs are copied out without the padding. One signature, and from
its second run one CUDA graph, then serves a whole range of lengths: a token is the padding
word, the copies and a graph launch.

The plan allows it (``CachePadding.find``) when one symbolic input dim, the cache length,
reaches only launches of ``PAD_AWARE_OPS``, ``cast``, ``concat`` and copies, no host value
and no qmatmul; each signature is then checked (``CachePadding.layout``): over three
capacities every buffer's shape either stays or grows by one row a row on one axis (the
padded axis, which views carry), every cast and copy keeps its axis, every concat joins along
another axis, qkv_heads reads its past along the length and attention is a decode (one query
row) without a mask. A signature that fails any of these runs as before, with its exact
shapes.
"""
from __future__ import annotations

import os
from typing import Optional

from qcompiler.codegen.cuda.ops.common import PAD_AWARE_OPS

# Rows of cache capacity per step (QC_CUDA_CACHE_STEP; 0 turns the padding off): a new
# signature (and graph) every CACHE_STEP tokens of a generation loop. Larger steps mean fewer
# captures and more padding rows for the casts and concats to move.
CACHE_STEP = int(os.environ.get("QC_CUDA_CACHE_STEP", "64"))
# Launches that carry the padding as data: the same rows in, the same rows out.
PAD_CARRYING_OPS = frozenset({"cast", "concat"})


class CacheLayout:
    """Where the padding lies in one signature's buffers: its padded axis per buffer (absent:
    the buffer does not depend on the cache length)."""

    def __init__(self, axes: dict, inputs: dict, outputs: dict):
        self.axes = axes        # buffer -> padded axis
        self.inputs = inputs    # plan input -> padded axis
        self.outputs = outputs  # output buffer -> padded axis


class CachePadding:
    """The cache-length dim of a plan whose decode steps can share a capacity's graph."""

    def __init__(self, dim: str, input_axes: dict, steps: list):
        self.dim = dim
        self.input_axes = input_axes  # plan input -> its axis of ``dim``
        self.steps = steps            # indices of the launching steps the length reaches
        self._layouts: dict = {}      # capacity input shapes -> CacheLayout or None

    @classmethod
    def find(cls, plan, module, nodes: dict, buffer_deps: dict) -> Optional["CachePadding"]:
        """The plan's cache-length dim (the first symbolic input dim, by name, that only
        ``PAD_AWARE_OPS``, ``PAD_CARRYING_OPS`` and copies reach, attention among them), or
        None."""
        if CACHE_STEP <= 0:
            return None
        fn = module.main
        symbols = sorted({d for a in fn.args for d in a.type.shape
                          if isinstance(d, str) and d != "?"})
        hosts = [n for n, b in plan.buffers.items() if b.kind == "host"]
        for dim in symbols:
            def reaches(name):
                deps = buffer_deps.get(name)
                return deps is None or dim in deps
            if any(reaches(n) for n in hosts):
                continue
            steps = [i for i, s in enumerate(plan.steps) if s.kind not in ("view", "host")
                     and any(n is not None and reaches(n) for n in s.inputs + s.outputs)]
            kinds = {"copy" if plan.steps[i].kind == "copy" else plan.steps[i].op for i in steps}
            if "attention" not in kinds or not kinds <= PAD_AWARE_OPS | PAD_CARRYING_OPS | {"copy"}:
                continue
            if any(plan.steps[i].kind == "kernel" and nodes.get(plan.steps[i].node) is None
                   for i in steps):
                continue
            input_axes = {a.name: a.type.shape.index(dim) for a in fn.args if dim in a.type.shape}
            return cls(dim, input_axes, steps)
        return None

    def length(self, shapes: dict) -> Optional[int]:
        """The cache length of input ``shapes`` (None: the inputs disagree)."""
        lengths = {tuple(shapes[n])[axis] for n, axis in self.input_axes.items()}
        return lengths.pop() if len(lengths) == 1 else None

    @staticmethod
    def capacity(length: int) -> int:
        return max(CACHE_STEP, -(-length // CACHE_STEP) * CACHE_STEP)

    def at(self, shapes: dict, length: int) -> dict:
        """``shapes`` with the cache length set to ``length``."""
        out = {}
        for n, s in shapes.items():
            s = list(s)
            if n in self.input_axes:
                s[self.input_axes[n]] = length
            out[n] = tuple(s)
        return out

    def layout(self, plan, nodes: dict, shapes: dict, resolve,
               output_sources: dict) -> Optional[CacheLayout]:
        """The padding's layout for the capacity input ``shapes`` (see the module doc), or
        None where this signature cannot be padded. ``resolve(shapes)``: every value's shape
        for input shapes (the plan's shape functions); ``output_sources``: each output
        buffer's value. Once per capacity shapes."""
        key = tuple(sorted(shapes.items()))
        if key in self._layouts:
            return self._layouts[key]
        c = self.length(shapes)
        layout = None
        if c is not None and c >= 2:
            probes = [resolve(self.at(shapes, c - k)) for k in (0, 1, 2)]
            layout = self._layout(plan, nodes, probes, output_sources)
        if len(self._layouts) >= self.MAX_LAYOUTS:  # (a prefill loop's many shapes)
            self._layouts.clear()
        self._layouts[key] = layout
        return layout

    MAX_LAYOUTS = 64  # capacity shapes whose layout (or refusal) is remembered

    def _layout(self, plan, nodes: dict, probes: list,
                output_sources: dict) -> Optional[CacheLayout]:
        at_c, less1, less2 = probes
        axes = {}
        for name, shape in at_c.items():
            a, b = less1.get(name), less2.get(name)
            if a is None or b is None or len(a) != len(shape) or len(b) != len(shape):
                return None
            grew = [i for i, (x, y, z) in enumerate(zip(shape, a, b)) if (x, y, z) != (x, x, x)]
            if not grew:
                continue
            i = grew[0]
            if len(grew) > 1 or not shape[i] - a[i] == a[i] - b[i] == 1:
                return None  # not one row a row on one axis
            axes[name] = i
        for out, src in output_sources.items():  # an output buffer: its value's
            if src in axes:
                axes[out] = axes[src]
        for i in self.steps:
            if not self._step_fits(plan.steps[i], nodes, axes, at_c):
                return None
        inputs = {n: axes[n] for n in self.input_axes if n in axes}
        if set(inputs) != set(self.input_axes):
            return None
        outputs = {n: axes[n] for n in output_sources if n in axes}
        return CacheLayout(axes, inputs, outputs)

    @staticmethod
    def _step_fits(step, nodes: dict, axes: dict, shapes: dict) -> bool:
        """Whether a launch over the cache is correct with the padding in its buffers."""
        ins = [n for n in step.inputs if n is not None]
        if step.kind == "copy" or step.op == "cast":
            return axes.get(ins[0]) == axes.get(step.outputs[0])
        node = nodes[step.node]
        if step.op == "concat":
            out = axes.get(step.outputs[0])
            rank = len(shapes[step.outputs[0]])
            along = int(node.attrs.get("axis", 0)) % rank
            return out is not None and along != out and all(axes.get(n) == out for n in ins)
        if step.op == "qkv_heads":
            # qkv, [cos, sin], [position ids], past_k, past_v -> q, k, v
            if len(ins) < 3 or any(len(shapes[n]) != 5 for n in ins[-2:]):
                return False
            q, k, v = step.outputs
            return (all(axes.get(n) == 3 for n in ins[-2:]) and q not in axes
                    and axes.get(k) == axes.get(v) == 2
                    and not any(n in axes for n in ins[:-2]))
        if step.op == "attention":
            if len(step.inputs) > 3 and step.inputs[3] is not None:
                return False  # a mask
            q, k, v = step.inputs[:3]
            keys = 1 if node.attrs.get("kv_bshd") else 2
            rows = shapes[q][1 if node.attrs.get("q_bshd") else 2]
            return (rows == 1 and q not in axes and step.outputs[0] not in axes
                    and axes.get(k) == axes.get(v) == keys)
        return False
