"""The QIR data structures: Module, Function, Node, Value.

A Function is an SSA graph kept as a list of nodes in topological order, each with ordered
operands (a missing optional operand is ``None``) and results. Large constants live in the
module's side table (``Module.constants``) and are referenced by name from ``constant``
nodes; small ones (shapes, scalars) are stored on the node and printed inline.

networkx is used through ``Function.as_networkx()`` for graph questions (reachability,
topological order after a rewrite); the ordered operand lists stay here.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from qcompiler.ir.types import TensorType, elem_from_numpy

# Constants with at most this many elements are stored on their node and printed inline.
INLINE_CONSTANT_LIMIT = 16

_NAME_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$|^[0-9]+$")


class Value:
    """An SSA value: a function argument or a node result."""

    __slots__ = ("name", "type", "producer", "index")

    def __init__(self, name: str, type: TensorType, producer: Optional["Node"] = None,
                 index: int = 0):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


def operand_index(op: str, name: str) -> int:
    """The position of the operand ``name`` in the definition of ``op`` (see ir/ops.py)."""
    from qcompiler.ir.ops import OPS  # ops imports this module's types: import late

    names = [o.rstrip("?*") for o in OPS[op].operands]
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(f"op {op!r} has no operand {name!r} (operands: {', '.join(names)})") from None


class Node:
    """One operation: ``results = op(operands) {attrs}``."""

    __slots__ = ("op", "operands", "results", "attrs")

    def __init__(self, op: str, operands: list, results: list, attrs: Optional[dict] = None):
        self.op = op
        self.operands: list[Optional[Value]] = list(operands)
        self.results: list[Value] = list(results)
        self.attrs: dict[str, Any] = dict(attrs or {})
        for i, r in enumerate(self.results):
            r.producer, r.index = self, i

    @property
    def result(self) -> Value:
        assert len(self.results) == 1, f"{self.op} has {len(self.results)} results"
        return self.results[0]

    def operand(self, i: int) -> Optional[Value]:
        return self.operands[i] if i < len(self.operands) else None

    def arg(self, name: str) -> Optional[Value]:
        """The operand that the op's definition names ``name`` (``node.arg("bias")`` of a
        qmatmul), or None when it is absent. Prefer this to positional ``operand(i)``."""
        return self.operand(operand_index(self.op, name))

    def __repr__(self) -> str:
        return f"<Node {self.op} -> {', '.join(r.name for r in self.results)}>"


class Function:
    """A named SSA graph with typed arguments and named outputs."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.args: list[Value] = []
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.output_names: list[str] = []
        self._names: set[str] = set()
        self._counter = 0

    # -- construction ----------------------------------------------------------------------
    def fresh_name(self, hint: str = "") -> str:
        """A value name unused in this function, derived from ``hint`` (stable across runs)."""
        hint = re.sub(r"[^A-Za-z0-9_.]", "_", hint).strip("_.") if hint else ""
        if hint and hint not in self._names and _NAME_OK.match(hint):
            return hint
        while True:
            name = f"{hint}_{self._counter}" if hint else str(self._counter)
            self._counter += 1
            if name not in self._names:
                return name

    def claim_name(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"value name %{name} defined twice in @{self.name}")
        self._names.add(name)
        return name

    def add_arg(self, name: str, type: TensorType) -> Value:
        v = Value(self.claim_name(name), type)
        self.args.append(v)
        return v

    def make_node(self, op: str, operands: Iterable[Optional[Value]], result_types,
                  attrs: Optional[dict] = None, names: Optional[list[str]] = None,
                  before: Optional[Node] = None) -> Node:
        """Create a node with fresh result values and insert it (at the end, or before ``before``)."""
        result_types = list(result_types)
        names = names or [None] * len(result_types)
        results = [Value(self.claim_name(n if n is not None else self.fresh_name(op)), t)
                   for n, t in zip(names, result_types)]
        node = Node(op, list(operands), results, attrs)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def set_outputs(self, values: list[Value], names: Optional[list[str]] = None) -> None:
        self.outputs = list(values)
        self.output_names = list(names) if names is not None else [v.name for v in values]

    # -- queries ---------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.args
        for n in self.nodes:
            yield from n.results

    def users(self) -> dict[Value, list[Node]]:
        """Map each value to the nodes that use it (a node appears once per use)."""
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.operands:
                if v is not None:
                    out.setdefault(v, []).append(n)
        return out

    def is_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    def as_networkx(self):
        """A networkx DiGraph view: node objects as vertices, an edge per data dependency."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n)
            for v in n.operands:
                if v is not None and v.producer is not None:
                    g.add_edge(v.producer, n)
        return g

    # -- mutation --------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.operands = [new if v is old else v for v in n.operands]
        self.outputs = [new if v is old else v for v in self.outputs]

    def erase(self, node: Node) -> None:
        self.nodes.remove(node)
        for r in node.results:
            self._names.discard(r.name)

    def remove_dead_nodes(self, keep_side_effects: bool = False) -> int:
        """Drop nodes none of whose results reach an output. Returns how many were dropped."""
        live: set[int] = {id(v) for v in self.outputs}
        kept: list[Node] = []
        for n in reversed(self.nodes):
            if any(id(r) in live for r in n.results):
                kept.append(n)
                live.update(id(v) for v in n.operands if v is not None)
            else:
                for r in n.results:
                    self._names.discard(r.name)
        dropped = len(self.nodes) - len(kept)
        self.nodes = list(reversed(kept))
        return dropped

    def topo_sort(self) -> None:
        """Reorder nodes topologically, keeping the current order where it is already valid."""
        import networkx as nx

        order = {n: i for i, n in enumerate(self.nodes)}
        g = self.as_networkx()
        self.nodes = list(nx.lexicographical_topological_sort(g, key=lambda n: order[n]))


class Module:
    """Functions plus the side table of large constants (name → numpy array)."""

    def __init__(self, name: str = "module"):
        self.name = name
        self.functions: list[Function] = []
        self.constants: dict[str, np.ndarray] = {}
        self.metadata: dict[str, Any] = {}

    @property
    def main(self) -> Function:
        for f in self.functions:
            if f.name == "main":
                return f
        if len(self.functions) == 1:
            return self.functions[0]
        raise KeyError("module has no @main function")

    def add_function(self, fn: Function) -> Function:
        self.functions.append(fn)
        return fn

    def clone(self) -> "Module":
        """A deep copy of the graph; constant arrays are shared (passes never mutate them)."""
        consts = self.constants
        self.constants = {}
        try:
            m = copy.deepcopy(self)
        finally:
            self.constants = consts
        m.constants = dict(consts)
        return m

    def drop_unused_constants(self) -> int:
        """Remove side-table constants no ``constant`` node names (after a pass replaced
        weights). Returns how many were removed."""
        used = {n.attrs["name"] for fn in self.functions for n in fn.nodes
                if n.op == "constant" and "name" in n.attrs}
        unused = [name for name in self.constants if name not in used]
        for name in unused:
            del self.constants[name]
        return len(unused)

    def fresh_constant_name(self, hint: str) -> str:
        hint = re.sub(r"[^A-Za-z0-9_.]", "_", hint).strip("_.") or "const"
        if hint not in self.constants:
            return hint
        i = 0
        while f"{hint}_{i}" in self.constants:
            i += 1
        return f"{hint}_{i}"


def constant_node(fn: Function, module: Module, array: np.ndarray, type: Optional[TensorType] = None,
                  name_hint: str = "cst", before: Optional[Node] = None,
                  value_name: Optional[str] = None) -> Node:
    """Create a ``constant`` node for ``array``: inline when small, else in the side table.

    ``type`` defaults to the array's plain element type (pass it for low-bit codes: a u4
    tensor is stored as uint8 but typed ``u4``).
    """
    array = np.asarray(array)
    if type is None:
        type = TensorType(tuple(int(d) for d in array.shape), elem_from_numpy(array.dtype))
    if array.dtype != type.dtype.np_dtype:
        array = array.astype(type.dtype.np_dtype)
    if array.size <= INLINE_CONSTANT_LIMIT:
        attrs = {"value": array}
    else:
        cname = module.fresh_constant_name(name_hint)
        module.constants[cname] = array
        attrs = {"name": cname}
    names = [value_name] if value_name else [fn.fresh_name(name_hint)]
    return fn.make_node("constant", [], [type], attrs, names=names, before=before)


def constant_value(module: Module, value: Optional[Value]) -> Optional[np.ndarray]:
    """The array of ``value`` if a ``constant`` node produces it, else None."""
    if value is None or value.producer is None or value.producer.op != "constant":
        return None
    node = value.producer
    if "value" in node.attrs:
        return node.attrs["value"]
    return module.constants.get(node.attrs["name"])
