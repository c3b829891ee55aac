"""shard{tp=N}: tensor-parallel MLP blocks over N ranks, with TP-aware reordering of
act-order weights (no all-gather between the two layers).

Matched: a row-parallel candidate B (a float ``qmatmul`` without epilogue; a bias is added
on rank 0) whose input is computed, through elementwise ops only, from one or more
column-parallel candidates A_i (float ``qmatmul``s of one shared input, no epilogue), e.g.
Llama's ``down(silu(gate(x)) * up(x))`` or GPT's ``fc2(gelu(fc1(x)))``. The region between
them must be elementwise column by column: unary and binary elementwise ops whose other
operands are scalar constants, used nowhere else. Rewritten, for ranks r = 0..N-1::

    A_i^r = qmatmul(x, W_i[:, cols_r], ...)          column block r of every A_i
    h^r   = the region on the A_i^r                  (cloned per rank)
    B^r   = qmatmul(h^r, W_B[rows_r, :], ...)        row block r of B (its bias on rank 0)
    y     = all_reduce(B^0, ..., B^(N-1)) {op = "sum"}

Every new node carries ``rank = r`` (the placement attribute, ``qcompiler.ir.verifier``);
nodes without it (the replicated rest of the model) run on every rank. The module stays one
graph, the global view: the reference runs it as is, and a runtime with a process per rank
takes the nodes of its rank and its operand of each ``all_reduce``.

**Act-order (GPTQ's g_idx) on B.** B's row k belongs to group g_idx[k]; a kernel reads the
rows grouped (sorted by g_idx), so a rank owning a contiguous block of the *sorted* rows
needs activations from every rank: an all-gather. The TP-aware fix (Hoque et al., TP-aware
dequantization): permute A's output columns offline by P = argsort(g_idx) and B's rows by the
same P. The product is unchanged (h's columns and B's rows move together), B's groups become
contiguous (g_idx[P] is sorted: B is then a plain group-quantized weight when every group has
block_size rows), and each rank's block of rows is local.

Not sharded (left as is, counted in the stats as skipped): N not divisible by the degree, a
row block that splits a group of B, integer (``dynamic``/``static``) qmatmuls, epilogues.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import Function, Node, Value, constant_node, constant_value
from qcompiler.ir.verifier import PLACEMENT_ATTR
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass

# Elementwise ops a column-parallel region may hold (each output column depends on the
# same column of its inputs only).
_UNARY = frozenset({"relu", "sigmoid", "tanh", "gelu", "erf", "neg", "exp", "abs", "sqrt",
                    "reciprocal", "cast"})
_BINARY = frozenset({"add", "sub", "mul", "div", "pow", "max", "min"})


@dataclass
class _Block:
    columns: list        # the A_i nodes (column-parallel)
    region: list         # elementwise nodes between them and B, in graph order
    row: Node            # B (row-parallel)


def _scalar_constant(module: Module, v: Optional[Value]) -> bool:
    c = constant_value(module, v) if v is not None else None
    return c is not None and c.size == 1


def _float_qmatmul(node: Node) -> bool:
    return (node.op == "qmatmul" and node.attrs.get("act") == "float"
            and "epilogue" not in node.attrs and node.operands[0] is not None)


def _match(module: Module, fn: Function, row: Node, users: dict) -> Optional[_Block]:
    """The MLP block ending at qmatmul ``row``, or None."""
    region: list = []
    columns: list = []
    seen: set = set()
    stack = [row.operands[0]]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = v.producer
        if node is None or fn.is_output(v):
            return None
        if _float_qmatmul(node):  # a column-parallel layer (its uses are checked below)
            columns.append(node)
            continue
        if node.op in _UNARY and len(node.results) == 1:
            region.append(node)
            stack.append(node.operands[0])
        elif node.op in _BINARY and len(node.results) == 1:
            region.append(node)
            for o in node.operands:
                if not _scalar_constant(module, o):
                    stack.append(o)
        else:
            return None
    if not columns:
        return None
    x = columns[0].operands[0]
    if any(a.operands[0] is not x for a in columns):
        return None  # column layers of different inputs
    # region values are used only inside the block
    for n in region:
        if any(u not in region and u is not row for u in users.get(n.results[0], [])):
            return None
    for a in columns:
        if any(u not in region and u is not row for u in users.get(a.results[0], [])):
            return None
    order = {n: i for i, n in enumerate(fn.nodes)}
    return _Block(sorted(set(columns), key=order.get), sorted(set(region), key=order.get), row)


class _Sharder:
    def __init__(self, module: Module, fn: Function, tp: int):
        self.module, self.fn, self.tp = module, fn, tp

    def const(self, v: Optional[Value]) -> Optional[np.ndarray]:
        return None if v is None else constant_value(self.module, v)

    def new_const(self, array: np.ndarray, like: Value, shape: tuple, before: Node,
                  hint: str) -> Value:
        return constant_node(self.fn, self.module, np.ascontiguousarray(array),
                             like.type.with_shape(shape), name_hint=hint, before=before).result

    def why_not(self, b: _Block) -> Optional[str]:
        """Why ``b`` cannot be sharded over tp ranks (None: it can)."""
        tp = self.tp
        w_b = self.const(b.row.arg("w"))
        if w_b is None or any(self.const(a.arg("w")) is None for a in b.columns):
            return "weights are not constants"
        n = w_b.shape[0]  # B's K = the A's N
        if any(self.const(a.arg("w")).shape[1] != n for a in b.columns):
            return "column layers of another width"
        if n % tp:
            return f"width {n} not divisible by tp={tp}"
        scheme = b.row.attrs["w_scheme"]
        if scheme.granularity == "group" and scheme.axis == 0 and (n // tp) % scheme.block_size:
            return f"a rank's {n // tp} rows split B's groups of {scheme.block_size}"
        if scheme.granularity == "group" and scheme.axis != 0:
            return "B is grouped along N"
        for a in b.columns:
            s = a.attrs["w_scheme"]
            if s.granularity == "group" and s.axis == 1:
                return "a column layer grouped along N"
        return None

    def shard(self, b: _Block) -> None:
        tp, row = self.tp, self.row_perm(b)
        perm = row["perm"]
        n = self.const(b.row.arg("w")).shape[0]
        per = n // tp
        clones: dict = {}  # (rank, old value) -> new value
        partials = []
        for r in range(tp):
            cols = perm[r * per:(r + 1) * per]
            for a in b.columns:
                clones[(r, a.results[0])] = self.column_layer(a, cols, r, b.row)
            for node in b.region:
                ops = [clones.get((r, o), o) for o in node.operands]
                new = self.fn.make_node(node.op, ops, [self._region_type(node, per)],
                                        {**node.attrs, PLACEMENT_ATTR: r},
                                        names=[self.fn.fresh_name(f"{node.results[0].name}.r{r}")],
                                        before=b.row)
                clones[(r, node.results[0])] = new.results[0]
            h = clones[(r, b.row.operands[0])]
            partials.append(self.row_layer(b.row, row, r * per, (r + 1) * per, h, r))
        reduce = self.fn.make_node("all_reduce", partials, [b.row.results[0].type], {"op": "sum"},
                                   names=[self.fn.fresh_name(f"{b.row.results[0].name}.sum")],
                                   before=b.row)
        self.fn.replace_all_uses(b.row.results[0], reduce.results[0])

    @staticmethod
    def _region_type(node: Node, per: int):
        t = node.results[0].type
        return t.with_shape(tuple(t.shape[:-1]) + (per,))

    def row_perm(self, b: _Block) -> dict:
        """B's rows in the order the ranks take them: sorted by g_idx for act-order (the
        TP-aware reordering), else natural; with B's reordered operands."""
        row = b.row
        w = self.const(row.arg("w"))
        g_idx = self.const(row.arg("g_idx"))
        scheme = row.attrs["w_scheme"]
        perm = np.arange(w.shape[0])
        if scheme.act_order and g_idx is not None:
            perm = np.argsort(g_idx, kind="stable")
            g_sorted = g_idx[perm]
            plain = np.array_equal(g_sorted, np.arange(w.shape[0]) // scheme.block_size)
            return {"perm": perm, "g_idx": None if plain else g_sorted,
                    "scheme": dataclasses.replace(scheme, act_order=False) if plain else scheme}
        return {"perm": perm, "g_idx": g_idx, "scheme": scheme}

    def column_layer(self, a: Node, cols: np.ndarray, r: int, before: Node) -> Value:
        """A with its output columns ``cols`` (weights, scales, zero points, bias)."""
        ops = list(a.operands)
        names = ("w", "w_scale", "w_zero_point", "bias")
        idx = {name: i for i, name in enumerate(("x", "w", "w_scale", "w_zero_point", "g_idx",
                                                 "x_scale", "x_zero_point", "bias"))}
        for name in names:
            v = ops[idx[name]] if idx[name] < len(ops) else None
            c = self.const(v)
            if v is None or c is None:
                continue
            if c.ndim == 0 or c.size == 1:
                continue  # per-tensor: shared by every column
            part = c[..., cols]
            ops[idx[name]] = self.new_const(part, v, part.shape, before, f"{v.name}.r{r}")
        t = a.results[0].type
        new = self.fn.make_node("qmatmul", ops, [t.with_shape(tuple(t.shape[:-1]) + (len(cols),))],
                                {**a.attrs, PLACEMENT_ATTR: r},
                                names=[self.fn.fresh_name(f"{a.results[0].name}.r{r}")],
                                before=before)
        return new.results[0]

    def row_layer(self, b: Node, row: dict, lo: int, hi: int, h: Value, r: int) -> Value:
        """B's rows perm[lo:hi] (their scale and zero-point groups), bias on rank 0 only."""
        scheme, perm = row["scheme"], row["perm"]
        ops = list(b.operands) + [None] * (8 - len(b.operands))
        rows = perm[lo:hi]
        w = self.const(ops[1])
        ops[1] = self.new_const(w[rows], ops[1], (hi - lo, w.shape[1]), b, f"{ops[1].name}.r{r}")
        for i in (2, 3):  # scale and zero point: [groups or K, N], [N] or scalar
            v = ops[i]
            c = self.const(v)
            if v is None or c is None or c.ndim < 2:
                continue
            if scheme.granularity == "group" and not scheme.act_order:
                g = scheme.block_size
                part = c[lo // g:hi // g]
            else:  # act-order kept: all groups (g_idx names them), or per-row tables
                part = c
            ops[i] = self.new_const(part, v, part.shape, b, f"{v.name}.r{r}")
        if row["g_idx"] is not None:
            g_part = row["g_idx"][lo:hi]
            ops[4] = self.new_const(g_part, ops[4], g_part.shape, b, f"{ops[4].name}.r{r}")
        else:
            ops[4] = None
        if r != 0:
            ops[7] = None  # the bias is added once
        ops[0] = h
        while len(ops) > 1 and ops[-1] is None:
            ops.pop()
        new = self.fn.make_node("qmatmul", ops, [b.results[0].type],
                                {**b.attrs, "w_scheme": scheme, PLACEMENT_ATTR: r},
                                names=[self.fn.fresh_name(f"{b.results[0].name}.r{r}")],
                                before=b)
        return new.results[0]


@register_pass("shard")
@dataclass
class ShardPass(Pass):
    """Tensor-parallel MLP blocks over ``tp`` ranks (column- then row-parallel qmatmuls, one
    all_reduce), act-order weights reordered TP-aware."""

    tp: int = 2

    def run(self, module: Module) -> Module:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise PassError(f"shard: tp must be an int >= 1, not {self.tp!r}")
        sharded, skipped = 0, []
        if self.tp == 1:
            record_stat(module, self.name, blocks=0)
            return module
        for fn in module.functions:
            users = fn.users()
            blocks = []
            for node in list(fn.nodes):
                if not _float_qmatmul(node):
                    continue
                b = _match(module, fn, node, users)
                if b is not None and not any(b.row in c.columns for c in blocks):
                    blocks.append(b)
            # a layer is the row of one block and the column of another only in chains of
            # three or more qmatmuls: shard the later block, keep the earlier one whole
            rows = {b.row for b in blocks}
            blocks = [b for b in blocks if not any(a in rows for a in b.columns)]
            sharder = _Sharder(module, fn, self.tp)
            for b in blocks:
                why = sharder.why_not(b)
                if why:
                    skipped.append(f"%{b.row.results[0].name}: {why}")
                    continue
                sharder.shard(b)
                sharded += 1
            fn.remove_dead_nodes()
        # the report lists why a block stayed whole
        record_stat(module, self.name, blocks=sharded, skipped=len(skipped),
                    skipped_blocks="; ".join(skipped) if skipped else "none")
        return module
