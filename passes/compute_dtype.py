"""compute-dtype: run an f32 model in f16 (or bf16), keeping its f32 interface.

The CUDA kernels compute in half precision (fp32 accumulation inside). A model exported in
f32 (what onnxruntime's quantizer writes) is retyped so that every float tensor between the
boundaries is ``dtype``:

- each f32 argument keeps its type; a ``cast`` to ``dtype`` right after it feeds its users
  (none where every user is a fixed-f32 op below: a CNN's input quantize reads it in f32);
- each f32 output is a ``cast`` back to f32 of the half value;
- every f32 node result in between becomes ``dtype``, and ``cast{to=f32}`` becomes
  ``cast{to=dtype}``;
- f32 constants become ``dtype`` constants (rounded once, here), except the ones a quantized
  op reads as a quantization parameter (qmatmul's scales and bias, qconv's, quantize's):
  those ops define their own float types (reorder-weights converts qmatmul's when it packs). A
  value that such an op makes f32 is cast to ``dtype`` for its other users; fixed-f32 users
  and an output read it as f32.

Float work that only connects quantized ops (``_f32_islands``: a CNN's average pool between a
dequantize and a quantize, its classifier's bias add) stays f32: it is small, and half
precision there would only move output codes.

Integer tensors (token ids, masks, shapes) keep their types. After the pass every node's
result type is what type inference gives for its (retyped) operands; a node it cannot retype
consistently is refused with a PassError naming it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module, elem
from qcompiler.ir.core import constant_value
from qcompiler.ir.ops import infer_types
from qcompiler.ir.types import TensorType
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass

DTYPES = ("f16", "bf16")
# Ops whose float operands/results are quantization parameters or fixed f32 by definition:
# their constants are left f32 and an f32 result is cast to the compute type after them.
FIXED_F32_OPS = frozenset({"qconv", "quantize", "dequantize", "requantize",
                           "dynamic_quantize"})


def _f32_islands(fn, users: dict) -> set:
    """ids of the nodes that stay f32: float work between quantized ops (a CNN's average pool
    between a dequantize and a quantize, its classifier's bias add before the output quantize).
    A node is one when its float operands are constants and at least one value of a
    fixed-f32 op or of another such node (not a model input), and each user is a fixed-f32
    op or another such node (or it is an output). Those values are small and feed codes:
    half precision there would only move codes by a step."""
    nodes = [n for n in fn.nodes if n.op != "constant" and n.op not in FIXED_F32_OPS]
    island = {id(n) for n in nodes if any(_is_f32(r) for r in n.results)}
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if id(n) not in island:
                continue
            floats = [v for v in n.operands if v is not None and v.type.dtype.is_float
                      and not (v.producer is not None and v.producer.op == "constant")]
            ins_ok = bool(floats) and all(
                v.producer is not None and (v.producer.op in FIXED_F32_OPS
                                            or id(v.producer) in island) for v in floats)
            outs_ok = all(u.op in FIXED_F32_OPS or id(u) in island
                          for r in n.results for u in users.get(id(r), []))
            if not (ins_ok and outs_ok):
                island.discard(id(n))
                changed = True
    return island


def _is_f32(v) -> bool:
    return v is not None and v.type.dtype.name == "f32"


def _qmatmul_parameter(user, v) -> bool:
    """v is a scale / zero point / bias of qmatmul ``user``: those stay as its w_scheme types
    them (reorder-weights converts them to the kernel's types when it packs)."""
    return user.op == "qmatmul" and user.operands[0] is not v


def _retyped(t: TensorType, dtype) -> TensorType:
    return dataclasses.replace(t, dtype=dtype)


@register_pass("compute-dtype")
@dataclass
class ComputeDtypePass(Pass):
    """Compute an f32 model in f16/bf16: casts at the inputs and outputs, float ops retyped."""

    dtype: str = "f16"

    def run(self, module: Module) -> Module:
        if self.dtype not in DTYPES:
            raise PassError(f"compute-dtype: dtype={self.dtype!r}; use f16 or bf16")
        half = elem(self.dtype)
        fn = module.main
        f32_outputs = [_is_f32(v) for v in fn.outputs]  # before anything is retyped
        users: dict = {}
        for n in fn.nodes:
            for v in n.operands:
                if v is not None:
                    users.setdefault(id(v), []).append(n)

        islands = _f32_islands(fn, users)
        # Constants: f32 arrays become half arrays, unless a fixed-f32 op reads them.
        constants = 0
        for node in fn.nodes:
            if node.op != "constant" or not _is_f32(node.result):
                continue
            uses = users.get(id(node.result), [])
            if any(u.op in FIXED_F32_OPS or id(u) in islands for u in uses) or (
                    uses and all(_qmatmul_parameter(u, node.result) for u in uses)):
                continue
            array = constant_value(module, node.result)
            # f32 extremes (a mask's finfo(f32).min) saturate to half's finite range instead
            # of becoming inf (a fully masked row would then give NaN).
            import ml_dtypes

            info = ml_dtypes.finfo(half.np_dtype)
            a32 = np.asarray(array, np.float32)
            cast = np.where(np.isfinite(a32), np.clip(a32, float(info.min), float(info.max)),
                            a32).astype(half.np_dtype)
            if "value" in node.attrs:
                node.attrs["value"] = cast
            else:  # a new table entry: the module's arrays are shared with its clones
                name = module.fresh_constant_name(f"{node.attrs['name']}.{self.dtype}")
                module.constants[name] = cast
                node.attrs["name"] = name
            node.result.type = _retyped(node.result.type, half)
            constants += 1

        # Arguments: a cast right after each f32 one (inserted at the start, in order).
        first = fn.nodes[0] if fn.nodes else None
        for a in fn.args:
            if not _is_f32(a):
                continue
            uses = users.get(id(a), [])
            if uses and all(u.op in FIXED_F32_OPS for u in uses) and not fn.is_output(a):
                continue  # read only as f32 (a CNN's input quantize): rounding it would move codes
            c = fn.make_node("cast", [a], [_retyped(a.type, half)], {"to": half},
                             names=[fn.fresh_name(f"{a.name}.{self.dtype}")], before=first)
            fn.replace_all_uses(a, c.result)
            c.operands[0] = a  # replace_all_uses rewired the cast's own operand too

        # Nodes in between: each result retyped to what inference gives for the new operands.
        retyped = 0
        for node in list(fn.nodes):
            if node.op == "constant":
                continue
            if node.op == "cast" and node.attrs["to"].name == "f32":
                node.attrs["to"] = half
            if node.op in FIXED_F32_OPS:
                self._cast_after(fn, node, half, islands)
                continue
            if id(node) in islands:
                continue
            try:
                inferred = infer_types(node.op, [None if v is None else v.type
                                                 for v in node.operands],
                                       node.attrs, [constant_value(module, v)
                                                    for v in node.operands])
            except Exception as e:  # the op's own inference error, named by node
                raise PassError(f"compute-dtype: %{node.results[0].name} = {node.op}: "
                                f"cannot retype to {self.dtype}: {e}") from None
            for r, t in zip(node.results, inferred or []):
                if _is_f32(r):
                    if t.dtype.name == "f32":
                        raise PassError(f"compute-dtype: %{r.name} = {node.op}: its result "
                                        f"stays f32 with {self.dtype} operands")
                    r.type = _retyped(r.type, t.dtype)
                    retyped += 1

        # Outputs: the f32 interface again.
        outs = []
        for name, v, was_f32 in zip(fn.output_names, fn.outputs, f32_outputs):
            if was_f32 and v.type.dtype == half:
                c = fn.make_node("cast", [v], [_retyped(v.type, elem("f32"))],
                                 {"to": elem("f32")}, names=[fn.fresh_name(f"{name}.f32")])
                v = c.result
            outs.append(v)
        fn.set_outputs(outs, list(fn.output_names))
        record_stat(module, self.name, constants=constants, values=retyped)
        return module

    @staticmethod
    def _cast_after(fn, node, half, islands=frozenset()) -> None:
        for r in node.results:
            if not _is_f32(r):
                continue
            uses = [u for u in fn.nodes if any(o is r for o in u.operands)]
            # fixed-f32 users (dequantize -> quantize) read r itself; the others the cast
            half_uses = [u for u in uses if u.op not in FIXED_F32_OPS and id(u) not in islands]
            if not half_uses:  # (an output keeps r: f32 already, no round trip through half)
                continue
            c = fn.make_node("cast", [r], [_retyped(r.type, half)], {"to": half},
                             names=[fn.fresh_name(f"{r.name}.{half.name}")])
            fn.nodes.remove(c)
            fn.nodes.insert(fn.nodes.index(node) + 1, c)
            for u in half_uses:
                u.operands = [c.result if o is r else o for o in u.operands]

