"""unify-dims: one symbol per run-time dim that type inference proves the same.

Exporters name every dim they cannot compute with a fresh symbol (``unk__7``), and the
fusions keep the types they are given: a Llama decode step has an attention result
``[batch, unk__7, H, D]`` whose inference gives ``[batch, seq, H, D]``, and 22 layers whose
cache appends each return ``[batch, H, unk__n, D]`` for the same ``past + seq`` rows. Each
such symbol is one more dim that the plan's shape functions must infer per input signature:
a decode loop, whose signature changes every token, re-inferred ~90 nodes a token.

After this pass:
- a result dim held by a symbol where the op's inference gives another symbol is that
  symbol, everywhere the first one appears (``unk__7`` is ``seq``);
- nodes whose inference sees the same operand types, the same operands it reads (equal
  constants, or the very same computed value) and the same attributes it reads (a
  checked-only attribute such as a cache append's ``layer`` aside) have the same result
  types: their symbols where inference gives ``?`` become the first such node's (the 22
  cache appends share one per cache), when that ``?`` is a function of the shapes
  (inference gives an int once the symbols have values: ``p + s``) or of the computed values
  it read; a count that depends on data inference does not see (NonZero's) keeps its symbol;
- the function's argument symbols are never renamed (shape buckets and users name them),
  and two of them proven equal stay two; ints are left to ``canonicalize``.

Inference is a function of operand types, the operand values it reads and the attributes it
reads, so both rules only name equal dims alike (and the plan's shape functions still check
every binding at run time: a symbol bound to two sizes is an error, never a wrong result).
Run it after the fusions, which make the ops whose inference knows more (attention, the
cache appends).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import constant_value
from qcompiler.ir.ops import OPS, WatchedAttributes, WatchedOperands, infer_types
from qcompiler.pipeline import Pass, record_stat, register_pass


def _value_key(a) -> tuple:
    a = np.asarray(a)
    return (a.dtype.str, a.shape, hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())


def _attr_key(v):
    if isinstance(v, np.ndarray):
        return _value_key(v)
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _attr_key(x)) for k, x in v.items()))
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return ("object", id(v))  # (a fused body: shared only by the nodes holding that object)


class _Symbols:
    """Union-find over dim symbols; a function argument's symbol is always its class's name."""

    def __init__(self, fixed: set):
        self.fixed = fixed
        self.parent: dict = {}

    def find(self, s):
        if not isinstance(s, str) or s == "?":
            return s
        root = s
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while s != root:  # path compression
            self.parent[s], s = root, self.parent[s]
        return root

    def union(self, a: str, b: str) -> bool:
        """One class for ``a`` and ``b`` (False when they already were, or both are fixed)."""
        a, b = self.find(a), self.find(b)
        if a == b or (a in self.fixed and b in self.fixed):
            return False
        if a in self.fixed:
            a, b = b, a
        self.parent[a] = b  # b: fixed, or the symbol seen first
        return True


def _sized_by_shapes(node, operands: list, consts: list, read_computed: bool) -> list:
    """Per result of ``node``, per dim: whether inference computes it once the operands'
    symbols have values (each symbol a distinct odd number): a dim such as a concat's ``p +
    s``. A dim that stays unknown then depends on data: on computed values the inference
    read (``read_computed``: a range's limit; then all True, those values are in the
    congruence key) or on data it cannot see (a NonZero's count), which equal operand types
    do not make equal: no congruence for it."""
    if read_computed:
        return [[True] * r.type.rank for r in node.results]
    names: dict = {}
    concrete = [None if t is None else t.with_shape(tuple(
        names.setdefault(d, 5 + 2 * len(names)) if isinstance(d, str) else d
        for d in t.shape)) for t in operands]
    try:
        inferred = infer_types(node.op, concrete, node.attrs, consts)
    except Exception:  # (the values chosen may break an op's constraint: no congruence)
        inferred = None
    return [[isinstance(d, int) for d in t.shape] if t is not None else [False] * r.type.rank
            for r, t in zip(node.results, inferred or [None] * len(node.results))]


def unify(module: Module) -> int:
    """Rename the symbols of ``module.main`` as the module docstring says; returns how many
    symbols were merged into another."""
    fn = module.main
    fixed = {d for a in fn.args for d in a.type.shape if isinstance(d, str) and d != "?"}
    symbols = _Symbols(fixed)
    merged = 0
    seen: dict = {}  # congruence key -> the first node's result shapes

    def shape_of(v):
        return tuple(symbols.find(d) for d in v.type.shape)

    for node in fn.nodes:
        if node.op == "constant" or node.op not in OPS or all(r.type.is_static
                                                              for r in node.results):
            continue
        operands = [None if v is None else v.type.with_shape(shape_of(v))
                    for v in node.operands]
        values = [constant_value(module, v) if v is not None and v.producer is not None
                  and v.producer.op == "constant" else None for v in node.operands]
        consts = WatchedOperands(values)
        attrs = WatchedAttributes(node.attrs)
        try:
            inferred = infer_types(node.op, operands, attrs, consts)
        except Exception:  # the verifier names real errors; this only renames
            continue
        if not inferred or len(inferred) != len(node.results):
            continue
        checked = OPS[node.op].checked_attrs
        read_attrs = sorted(k for k in attrs.read if k not in checked and k in node.attrs)
        key = (node.op,
               tuple(None if t is None else str(t) for t in operands),  # + quant, layout
               # an operand whose value the inference read: its value when it is a
               # constant, else the value itself (the same SSA value: the same numbers)
               tuple((i, ("value", node.operands[i].name) if c is None else _value_key(c))
                     for i in sorted(consts.read)
                     if (c := values[i]) is not None
                     or node.operands[i] is not None),
               tuple((k, _attr_key(node.attrs[k])) for k in read_attrs))
        first = seen.setdefault(key, [shape_of(r) for r in node.results])
        # a dim inference leaves unknown is the same for congruent nodes when it is a
        # function of the shapes, or of computed values the inference read (in the key)
        read_computed = any(values[i] is None and node.operands[i] is not None
                            for i in consts.read)
        sized = None  # _sized_by_shapes, inferred again only where a dim is left unknown
        for k, (r, t, same) in enumerate(zip(node.results, inferred, first)):
            if t is None or t.rank != r.type.rank:
                continue
            for j, (declared, got, other) in enumerate(zip(shape_of(r), t.shape, same)):
                if not isinstance(declared, str) or declared == "?":
                    continue
                if isinstance(got, str) and got != "?":
                    merged += symbols.union(declared, got)
                elif got == "?" and isinstance(other, str) and other != "?":
                    if sized is None:
                        sized = _sized_by_shapes(node, operands, values, read_computed)
                    if sized[k][j]:
                        merged += symbols.union(declared, other)
    if merged:
        for v in list(fn.args) + [r for n in fn.nodes for r in n.results]:
            shape = shape_of(v)
            if shape != tuple(v.type.shape):
                v.type = v.type.with_shape(shape)
    return merged


@register_pass("unify-dims")
@dataclass
class UnifyDimsPass(Pass):
    """Symbols that type inference proves equal become one (fewer dims to infer per run)."""

    def run(self, module: Module) -> Module:
        record_stat(module, self.name, merged=unify(module))
        return module
