"""The KV cache as device state: a decode session whose caches stay on the device, updated in
place.

A decode step exported with a KV cache is a function: ``past [L, B, Hkv, P, D]`` in,
``present`` with P + 1 rows out, through (on a CUDA pipeline, after ``fuse-qkv``)::

    past --cast--> past.f16 --qkv_heads{layer l}--> k_l [B, Hkv, P + 1, D] --attention
                                                     k_l --unsqueeze--> concat(layers) --cast--> present

Run as a function (``run()``), every token casts the whole cache in, copies each layer's P
rows into its present (qkv_heads), concatenates the layers and casts them out: on the 22-layer
TinyLlama step ~40 us of kernels and ~45 MB of copies a token (codegen/cuda/NOTES.md). The QIR
stays functional (the reference and every oracle run it as it is); keeping the cache is a
buffer decision of the runner, as bufferization makes it in MLIR:

- ``KvState.find`` recognizes, in the plan, each (past input, present output) pair of that
  shape: the past reaches only casts or copies and then the past operand of qkv_heads steps;
  each layer's new cache (qkv_heads' k or v result) is the concat's operand at its layer's
  index, and the concat reaches the output through casts or copies only, read by nothing else.
- A session keeps one **state buffer** per pair in the compute dtype, laid out as the present
  of the cache's capacity (``cache_capacity.py``): ``[L, B, Hkv, C + 1, D]`` for capacity C.
  Its signature (``CudaPlanRunner._prepare(..., state=...)``) places each layer's present at
  its slice of the state, passes qkv_heads null past caches (the kernel then writes only the
  new row, after the P rows already there: ``templates/ops/qkv_heads.cu.j2``) and leaves out
  the casts in, the concats and the casts out. The padding word says P, as for a padded
  signature. One signature (and from its second step one CUDA graph) serves every length up to
  the capacity; past it the state is laid out for the next capacity by one 2-D copy a buffer.
- The caller gives the state once (``reset``), steps with the other inputs (``step``) and
  reads the caches only when it wants them (``state``), cast to the model's dtype then.
"""
from __future__ import annotations

import math
import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir import elem

# the launches that may carry a cache to or from the model's boundary unchanged in value
_PASSING_OPS = frozenset({"cast"})


class StatePair:
    """One past input and the present output it becomes: the buffers and steps of its chain."""

    def __init__(self, input: str, output: str, compute: str, presents: list,
                 skipped: list, dtype: str):
        self.input = input          # the plan input (past_k)
        self.output = output        # the plan output buffer (present_k's)
        self.compute = compute      # the buffer qkv_heads reads as its past (past_k.f16)
        self.presents = presents    # per layer, qkv_heads' new cache (k_l): the state's slices
        self.skipped = skipped      # the steps a state signature leaves out
        self.dtype = dtype          # the state's element type (the compute dtype)


class KvState:
    """The state pairs of a plan whose decode steps pad to a capacity (``CachePadding``)."""

    def __init__(self, pairs: list):
        self.pairs = pairs
        self.skipped = frozenset(i for p in pairs for i in p.skipped)
        self.inputs = {p.input: p for p in pairs}
        self.outputs = {p.output: p for p in pairs}

    @classmethod
    def find(cls, plan, nodes: dict, padding) -> tuple:
        """(KvState, None) or (None, why not)."""
        if padding is None:
            return None, "its decode steps do not share a capacity's graph (cache_capacity.py)"
        readers: dict = {}  # buffer -> the indices of the steps that read it
        for i, step in enumerate(plan.steps):
            for n in step.inputs:
                if n is not None:
                    readers.setdefault(n, []).append(i)
        views: dict = {}  # root buffer -> its views
        for n, b in plan.buffers.items():
            if b.kind == "view" and b.alias_of:
                views.setdefault(b.alias_of, []).append(n)
        outputs = set(plan.outputs.values())
        pairs = []
        for name in padding.input_axes:
            pair, why = cls._pair(plan, nodes, name, readers, views, outputs)
            if pair is None:
                return None, f"input %{name}: {why}"
            pairs.append(pair)
        if not pairs:
            return None, "no cache input"
        return cls(pairs), None

    @staticmethod
    def _passing(step) -> bool:
        return step.kind == "copy" or (step.kind == "kernel" and step.op in _PASSING_OPS)

    @classmethod
    def _pair(cls, plan, nodes, name, readers, views, outputs):
        steps = plan.steps
        skipped, compute = [], name
        # the past: through casts and copies (each the only reader) to qkv_heads
        while True:
            rs = readers.get(compute, [])
            if len(rs) == 1 and cls._passing(steps[rs[0]]) and compute not in views:
                skipped.append(rs[0])
                compute = steps[rs[0]].outputs[0]
                continue
            break
        rs = readers.get(compute, [])
        if not rs or compute in views or compute in outputs:
            return None, "the past is read by something other than qkv_heads"
        presents = {}  # layer -> the new cache
        which = None   # 1: k (past operand -2), 2: v (-1)
        for i in rs:
            step = steps[i]
            if step.kind != "kernel" or step.op != "qkv_heads" or len(step.inputs) < 3:
                return None, f"the past is read by %{step.node or step.outputs[0]} ({step.op})"
            at = [j for j, n in enumerate(step.inputs) if n == compute]
            if at not in ([len(step.inputs) - 2], [len(step.inputs) - 1]):
                return None, f"%{step.node}: the past is not one of its caches"
            w = 1 if at[0] == len(step.inputs) - 2 else 2
            if which not in (None, w):
                return None, "the past is both a key and a value cache"
            which = w
            layer = int(nodes[step.node].attrs.get("layer", 0))
            if layer in presents:
                return None, f"two qkv_heads read layer {layer}"
            presents[layer] = step.outputs[w]
        # each layer's new cache: the concat's operand at its layer, through one view
        concat = None
        for layer, buf in presents.items():
            if plan.buffers[buf].kind != "arena" or buf in outputs:
                return None, f"%{buf} is not an intermediate"
            vs = views.get(buf, [])
            uses = [(v, i) for v in vs for i in readers.get(v, [])]
            if len(vs) != 1 or len(uses) != 1:
                return None, f"%{buf} does not reach one concat through one view"
            v, i = uses[0]
            step = steps[i]
            if step.kind != "kernel" or step.op != "concat" or (concat not in (None, i)):
                return None, f"%{buf}'s view is read by {step.op or step.kind}"
            concat = i
            if step.inputs.index(v) != layer or step.inputs.count(v) != 1:
                return None, f"layer {layer}'s cache is not the concat's operand {layer}"
            if int(nodes[step.node].attrs.get("axis", 0)) % 5 != 0:
                return None, "the presents are not concatenated along the layers"
        if concat is None or len(steps[concat].inputs) != len(presents):
            return None, "the concat joins something besides the layers' caches"
        skipped.append(concat)
        dtype = plan.buffers[compute].dtype
        if any(plan.buffers[b].dtype != dtype for b in presents.values()):
            return None, "the past and the new caches differ in dtype"
        # the present: through casts and copies (each buffer read by the next only) to an output
        out = steps[concat].outputs[0]
        while out not in outputs:
            rs = readers.get(out, [])
            if len(rs) != 1 or not cls._passing(steps[rs[0]]) or out in views:
                return None, "the concatenated caches are read by something else"
            skipped.append(rs[0])
            out = steps[rs[0]].outputs[0]
        if len(readers.get(out, [])):
            return None, f"the present %{out} is read by a step"
        return StatePair(name, out, compute, [presents[k] for k in sorted(presents)],
                         skipped, dtype), None


class StateBinding:
    """What a state signature's preparation needs: the state buffers' device addresses."""

    def __init__(self, kv: KvState, pointers: dict):
        self.kv = kv
        self.pointers = pointers  # pair input -> its state buffer's device address

    @property
    def skipped(self) -> frozenset:
        return self.kv.skipped

    def place(self, ptr: dict, shape_of: dict, itemsize: dict, views: dict) -> None:
        """Each layer's new cache at its slice of the state, its views with it; the past
        caches qkv_heads reads null (in place)."""
        for pair in self.kv.pairs:
            base = self.pointers[pair.input]
            for layer, buf in enumerate(pair.presents):
                at = base + layer * math.prod(shape_of[buf]) * itemsize[buf]
                ptr[buf] = at
                for v in views.get(buf, ()):
                    ptr[v] = at
            ptr[pair.compute] = 0


class DecodeSession:
    """A generation loop's decode steps with the KV cache kept on the device
    (``CudaPlanRunner.session()``; the module doc says how).

    ``reset({past input: array})`` gives the caches (numpy or torch CUDA, the model's dtype,
    any length, e.g. a prefill's presents); ``step({other input: array})`` runs one token and
    returns the other outputs (numpy, or torch CUDA tensors when the inputs are); ``state()``
    returns the caches as the model's presents ({output name: array}); ``length`` is the
    cache's rows."""

    def __init__(self, runner, kv: KvState):
        self.runner = runner
        self.kv = kv
        plan = runner.plan
        self.step_inputs = [n for n in plan.inputs if n not in kv.inputs]
        self.state_outputs = {o: b for o, b in plan.outputs.items() if b in kv.outputs}
        self.length = 0
        self.capacity = 0
        self._shape = None       # [L, B, Hkv, _, D] of the caches
        self._buffers: dict = {}  # pair input -> (address, bytes) of its state buffer
        self._sig = None          # the current capacity's signature
        self._sig_key = None
        self.relayouts = 0        # 2-D copies into a larger capacity (tests, benchmarks)

    # -- the state ------------------------------------------------------------------------
    def _rows_bytes(self) -> int:
        return int(self._shape[4]) * elem(self.kv.pairs[0].dtype).np_dtype.itemsize

    def _allocate(self, capacity: int) -> dict:
        L, B, H, _, D = self._shape
        nbytes = L * B * H * (capacity + 1) * self._rows_bytes()
        return {p.input: (self.runner.rt.malloc(max(nbytes, 1)), nbytes) for p in self.kv.pairs}

    def reset(self, caches: dict) -> None:
        """Start from ``caches`` ({past input: [L, B, Hkv, P, D] array}, every pair's)."""
        r = self.runner
        r.load_device()
        missing = [n for n in self.kv.inputs if n not in caches]
        extra = [n for n in caches if n not in self.kv.inputs]
        if missing or extra:
            raise InputError(f"session state: missing {missing}, unknown {extra} (the "
                             f"caches are {sorted(self.kv.inputs)})")
        shapes = {tuple(caches[n].shape) for n in self.kv.inputs}
        if len(shapes) != 1 or len(next(iter(shapes))) != 5:
            raise InputError(f"session state: the caches must share one [L, B, Hkv, P, D] "
                             f"shape, got {sorted(shapes)}")
        shape = next(iter(shapes))
        for arg in r.module.main.args:  # the model's static dims (layers, heads, head size)
            if arg.name in self.kv.inputs:
                want = arg.type.shape
                if len(want) != 5 or any(isinstance(w, int) and w != d
                                         for w, d in zip(want, shape)):
                    raise InputError(f"session state: input %{arg.name} is {list(want)}, "
                                     f"got {list(shape)}")
        self.close()
        self._shape, self.length = shape, shape[3]
        # a step of length P runs at the capacity C of P and writes row P of C + 1
        self.capacity = r._padding.capacity(self.length)
        self._buffers = self._allocate(self.capacity)
        self._torch_io = any(type(a).__module__.startswith("torch") for a in caches.values())
        for n, a in caches.items():
            self._copy_in(n, a)

    def _copy_in(self, name: str, a) -> None:
        """One cache into its state buffer's rows (cast to the state's dtype first)."""
        r = self.runner
        want = elem(self.kv.inputs[name].dtype).np_dtype
        if type(a).__module__.startswith("torch") and a.is_cuda:
            import torch

            t = a.to(r.torch_dtype(want)).contiguous()
            torch.cuda.current_stream(t.device).synchronize()  # (our stream reads it next)
            src, kind, keep = t.data_ptr(), 3, t
        else:
            keep = np.ascontiguousarray(np.asarray(a), want)
            src, kind = keep.ctypes.data, 1
        self._copy2d(self._buffers[name][0], self.capacity + 1, src, self.length, self.length,
                     kind)
        r._check(r.launcher.qc_stream_synchronize(r.stream), "copying the session's state")
        del keep

    def _copy2d(self, dst: int, dst_rows: int, src: int, src_rows: int, rows: int,
                kind: int) -> None:
        """``rows`` rows of each (layer, batch, head) from a buffer of ``src_rows`` rows per
        head to one of ``dst_rows``: one 2-D copy on the runner's stream."""
        L, B, H, _, _ = self._shape
        row = self._rows_bytes()
        if not rows or not L * B * H:
            return
        r = self.runner
        r._check(r.launcher.qc_copy2d_async(dst, dst_rows * row, src, src_rows * row,
                                            rows * row, L * B * H, kind, r.stream),
                 "copying the session's state")

    def _grow(self, capacity: int) -> None:
        """Lay the state out for ``capacity``: new buffers, the rows copied (device to
        device), the old buffers and signature released."""
        new = self._allocate(capacity)
        for name, (dst, _) in new.items():
            self._copy2d(dst, capacity + 1, self._buffers[name][0], self.capacity + 1,
                         self.length, 3)
        self.relayouts += 1
        self._drop_signature()
        self._free_buffers("growing the session's state")  # (after the copies ran)
        self._buffers, self.capacity = new, capacity

    def _free_buffers(self, what: str) -> None:
        """Free the state buffers once the launches over them have finished."""
        if self._buffers:
            r = self.runner
            r._check(r.launcher.qc_stream_synchronize(r.stream), what)
            for ptr, _ in self._buffers.values():
                r.rt.free(ptr)
        self._buffers = {}

    def state(self) -> dict:
        """The caches as the model's present outputs ({output name: [L, B, Hkv, length, D]}),
        in the model's dtype: numpy, or torch CUDA tensors after torch inputs."""
        self._require_state()
        r = self.runner
        shape = self._shape[:3] + (self.length, self._shape[4])
        out = {}
        for oname, buf in self.state_outputs.items():
            pair = self.kv.outputs[buf]
            held = elem(pair.dtype).np_dtype  # the state's dtype; the model's is r._dtypes[buf]
            if self._torch_io:
                import torch

                a = torch.empty(shape, dtype=r.torch_dtype(held), device="cuda")
                dst, kind = a.data_ptr(), 3
            else:
                a = np.empty(shape, held)
                dst, kind = a.ctypes.data, 2
            self._copy2d(dst, self.length, self._buffers[pair.input][0], self.capacity + 1,
                         self.length, kind)
            r._check(r.launcher.qc_stream_synchronize(r.stream), "reading the state")
            want = r._dtypes[buf]
            out[oname] = a.to(r.torch_dtype(want)) if self._torch_io else a.astype(want)
        return out

    _torch_io = False  # the last step's inputs were torch tensors

    def _require_state(self) -> None:
        if self._shape is None:
            raise InputError("the session has no state yet: call reset({past input: array}) "
                             "first")

    # -- steps ------------------------------------------------------------------------------
    def step(self, inputs: dict) -> dict:
        """One decode step: ``inputs`` are the model's inputs other than the caches; returns
        the outputs other than the presents."""
        self._require_state()
        r = self.runner
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict {{name: array}}, got "
                             f"{type(inputs).__name__}")
        missing = [n for n in self.step_inputs if n not in inputs]
        extra = [n for n in inputs if n not in self.step_inputs]
        if missing or extra:
            raise InputError(f"session step inputs: missing {missing}, unknown {extra} (the "
                             f"caches {sorted(self.kv.inputs)} are the session's state)")
        arrays, on_device = r._checked_inputs(inputs, self.step_inputs)
        capacity = r._padding.capacity(self.length)
        if capacity != self.capacity:
            self._grow(capacity)
        shapes = {n: tuple(arrays[n].shape) for n in self.step_inputs}
        cache = self._shape[:3] + (self.capacity, self._shape[4])
        shapes.update({n: cache for n in self.kv.inputs})
        key = tuple(shapes[n] for n in r.plan.inputs)
        if self._sig is None or self._sig_key != key:
            self._drop_signature()
            self._sig = r._state_signature(shapes, self._binding())
            self._sig_key = key
        self._torch_io = any(v is not None for v in on_device.values())
        out = r._execute(self._sig, arrays, on_device, self.capacity - self.length)
        # (a step adds the new tokens' rows: one for a decode, whose attention has one row)
        self.length += 1
        return out

    def _binding(self) -> StateBinding:
        return StateBinding(self.kv, {n: p for n, (p, _) in self._buffers.items()})

    def _drop_signature(self) -> None:
        if self._sig is not None:
            self.runner._release_state_signature(self._sig)
        self._sig, self._sig_key = None, None

    def close(self) -> None:
        """Free the state and the session's signature (also when the session is reset)."""
        self._drop_signature()
        self._free_buffers("closing the session")
        self._shape = None

    def __del__(self):
        # A session dropped without close(): its state and signature go with it (a server
        # that opens a session per request must not keep every one's buffers). Errors are
        # ignored: at interpreter exit the runtime may be gone before the session.
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
