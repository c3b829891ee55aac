"""Concrete shapes for concrete input dims: the plan's shape functions.

``resolve(plan, module, input_shapes)`` walks ``module.main`` once and returns the concrete
shape of every value and the arrays of the ``host`` values (shape computations and anything
else that depends only on input shapes and constants), for one input-shape signature.

A value's declared (IR) shape is the truth where its dims are known: ints, and symbols bound
by the inputs (``batch``, ``seq``). A symbol no input binds (``Min_512__seq`` of a slice,
``unk__0`` of a reshape to -1) is bound the first time a value that has it is computed: a host
value by its array, any other value by the op's type inference over the concrete operand
shapes and the host arrays (a reshape's target shape is a host value). A later value with the
same symbol then reuses that binding.

A model's layers repeat the same shape computations (each layer takes ``shape(x)``, gathers a
dim, builds a reshape target; each infers the same attention output): a host evaluation or a
type inference is done once per distinct (op, attributes, operand types, small operand
values) and reused by the layers after it (``_Memo``). With a ``ConstantCache`` the entries
outlive the resolve: a decode loop whose KV cache grows resolves once per token, and then
only the computations that read the cache length are done again.

The cache also keeps the last resolve. Given the plan's ``ShapeDependencies`` (which input
dims each value's shape, and each host value's content, can depend on), a resolve whose
inputs differ from the last one's in a few dims evaluates only the nodes that depend on
those, and takes every other result over: a decode step whose KV length grows by one
re-sizes the cache's values and nothing else (Python's work per node is what a new
signature costs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from qcompiler.ir import Module, TensorType, infer_types
from qcompiler.ir.ops import OPS, WatchedAttributes, WatchedOperands
from qcompiler.ir.core import constant_value
from qcompiler.plan.plan import Plan, PlanError


class ConstantCache(dict):
    """Host values that depend on no input shape (all operands weights), by value name: they
    are the same for every signature, so one cache serves every bucket and run. Also the
    memo's entries (``memo``) and each node's fixed part of a memo key (``node_keys``): one
    cache belongs to one module."""

    def __init__(self):
        super().__init__()
        self.node_keys: dict = {}
        self.memo: dict = {}
        self.constant_arrays: dict = {}  # constant value name -> its array
        self.last: Optional[Resolved] = None  # the last resolve (see the module doc)


@dataclass
class Resolved:
    shapes: dict      # value name -> tuple of ints
    host: dict        # host value name -> array
    dims: dict        # symbol -> int (input symbols and the ones bound on the way)
    arrays: dict = field(default_factory=dict)  # host values and constants -> array
    inputs: Optional[dict] = None  # input name -> its shape
    changed: Optional[frozenset] = None  # the input dims that differ from the resolve
    #                                      this one started from (None: resolved afresh)


class ShapeDependencies:
    """For each value of ``module.main`` (lowered to ``plan``), the input dims its shape can
    depend on, and for a host value its content too. An input dim is its symbol (``batch``,
    ``past``), or ``%name[axis]`` for a ``?`` dim.

    A value whose declared shape is ints and input symbols depends on those symbols only (the
    resolve takes its shape from the dims). Any other value (a ``?`` dim, a symbol first bound
    by it, a host value's content) depends on whatever its operands depend on; a symbol bound
    on the way carries the dependencies of the value that binds it to the values that reuse
    it."""

    def __init__(self, plan: Plan, module: Module):
        fn = module.main
        self.input_keys = {a.name: tuple(None if isinstance(d, int) else
                                         d if d != "?" else f"%{a.name}[{i}]"
                                         for i, d in enumerate(a.type.shape))
                           for a in fn.args}
        input_symbols = {d for a in fn.args for d in a.type.shape
                         if isinstance(d, str) and d != "?"}
        values = {a.name: frozenset(k for k in self.input_keys[a.name] if k)
                  for a in fn.args}
        symbols: dict = {}  # symbol bound on the way -> the dependencies of its binder
        for node in fn.nodes:
            if node.op == "constant":
                for r in node.results:
                    values[r.name] = frozenset()
                continue
            host = plan.buffers[node.results[0].name].kind == "host"
            operands = frozenset().union(*(values[v.name] for v in node.operands
                                           if v is not None))
            for r in node.results:
                deps, by_dims = set(), not host
                for d in r.type.shape:
                    if isinstance(d, int):
                        continue
                    if d in input_symbols:
                        deps.add(d)
                    elif d in symbols:
                        deps |= symbols[d]
                    else:  # "?", or a symbol this value binds
                        by_dims = False
                if not by_dims:
                    deps |= operands
                values[r.name] = frozenset(deps)
                for d in r.type.shape:
                    if isinstance(d, str) and d != "?" and d not in input_symbols:
                        symbols.setdefault(d, values[r.name])
        self.values = values
        self.symbols = symbols
        self._nodes = [n for n in fn.nodes if n.op != "constant"]
        self._affected: dict = {}

    def changed(self, input_shapes: dict, before: dict) -> frozenset:
        """The input dims in which ``input_shapes`` differ from ``before``."""
        out = set()
        for name, keys in self.input_keys.items():
            old, new = before[name], input_shapes[name]
            if len(old) != len(new):
                out.update(k for k in keys if k)
                continue
            for k, a, b in zip(keys, old, new):
                if k is not None and a != b:
                    out.add(k)
        return frozenset(out)

    def affected(self, changed: frozenset) -> tuple:
        """(the nodes to evaluate again in order, the symbols bound on the way to unbind)
        when the dims ``changed`` change; computed once per set."""
        hit = self._affected.get(changed)
        if hit is None:
            values = self.values
            nodes = [n for n in self._nodes
                     if any(values[r.name] & changed for r in n.results)]
            unbind = frozenset(s for s, deps in self.symbols.items() if deps & changed)
            hit = self._affected[changed] = (nodes, unbind)
        return hit


def _bind(dims: dict, declared: tuple, shape: tuple, what: str) -> None:
    if len(declared) != len(shape):
        raise PlanError(f"%{what}: computed shape {tuple(shape)} has another rank than its "
                        f"type {list(declared)}")
    for d, n in zip(declared, shape):
        if isinstance(d, int):
            if d != n:
                raise PlanError(f"%{what}: computed shape {tuple(shape)} contradicts its type "
                                f"{list(declared)}")
        elif d != "?":
            if dims.setdefault(d, int(n)) != n:
                raise PlanError(f"%{what}: dim {d} is {dims[d]} elsewhere but {n} here")


def _known(declared: tuple, dims: dict):
    out = []
    for d in declared:
        if isinstance(d, int):
            out.append(d)
        elif d in dims:
            out.append(dims[d])
        else:
            return None
    return tuple(out)


# Why a plan cannot hold an op whose result shape depends on its operands' values (NonZero,
# Compress, Unique): every buffer is sized before a run.
DATA_DEPENDENT = ("its result's shape depends on the values it reads, not only on their "
                  "shapes, and the plan sizes every buffer before a run")


class DataDependentShapeError(PlanError):
    """A node whose result shape depends on the values it reads (``node``: its first result's
    name): the plan stops before it (``qcompiler/plan/split.py``)."""

    def __init__(self, message: str, node: str):
        super().__init__(message)
        self.node = node


# Host arrays up to this many elements are part of a memo key by value (shape computations
# handle a few dims each); a node reading a larger one is evaluated without the memo.
MEMO_MAX_ELEMENTS = 64


# Memo entries a ConstantCache keeps at most (each a few small arrays or types): past it the
# memo starts again, so a long generation loop's entries (a few per new cache length) stay
# bounded.
MEMO_MAX_ENTRIES = 4096


def _attr_key(v):
    """An attribute value as part of a memo key: by content where its type says what it is
    (numbers, strings, arrays byte for byte: their repr elides the middle of a large one,
    lists and dicts of those), else by identity (an object whose repr might not show all of
    it, e.g. a fused body, is shared only by the nodes that hold that very object)."""
    if v is None or isinstance(v, (bool, int, float, str, np.generic)):
        return (type(v).__name__, repr(v))
    if isinstance(v, np.ndarray):
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_attr_key(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((repr(k), _attr_key(x)) for k, x in v.items())))
    return ("object", id(v))


class _Memo:
    """Host evaluations and type inferences by content (see the module doc)."""

    def __init__(self, static: dict, results: dict):
        self.static = static    # id(node) -> the key part fixed by the node (op, attrs, types)
        if len(results) > MEMO_MAX_ENTRIES:
            results.clear()
        self.results = results  # key -> host arrays or inferred types

    def node_part(self, node) -> tuple:
        """The part of a host evaluation's memo key fixed by the node: its op, operand types
        and result types (``operand_part``) with all its attributes."""
        part = self.static.get(id(node))
        if part is None:
            static, attrs = self.operand_part(node)
            part = self.static[id(node)] = static + (tuple(sorted(attrs.items())),)
        return part

    def operand_part(self, node) -> tuple:
        """The part of a type inference's memo key fixed by the node, without its attributes
        (``_infer`` records the ones an inference reads); and its attributes' key parts."""
        part = self.static.get(("infer", id(node)))
        if part is None:
            part = self.static[("infer", id(node))] = (
                (node.op, tuple(None if v is None else (v.type.dtype.name, repr(v.type.quant),
                                                        repr(v.type.layout))
                                for v in node.operands),
                 tuple(r.type.dtype.name for r in node.results)),
                {k: _attr_key(v) for k, v in node.attrs.items()})
        return part

    @staticmethod
    def array_part(a: np.ndarray):
        """A host array's part of a key; None when it is too large to be one."""
        if a.size > MEMO_MAX_ELEMENTS:
            return None
        return (a.dtype.str, a.shape, a.tobytes())


def _shape_only(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An array with ``shape`` and no memory behind it, for ops that read only the shape."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def resolve(plan: Plan, module: Module, input_shapes: dict,
            constants: ConstantCache = None,
            dependencies: Optional[ShapeDependencies] = None) -> Resolved:
    """Concrete shapes and host arrays for inputs of ``input_shapes`` (name -> tuple of ints).
    With ``dependencies`` (of this plan and module) and the last resolve in ``constants``,
    only the nodes that depend on the input dims that changed since then are evaluated."""
    fn = module.main
    constants = ConstantCache() if constants is None else constants
    input_shapes = {a.name: tuple(int(n) for n in input_shapes[a.name]) for a in fn.args}
    last = constants.last
    if dependencies is not None and last is not None and last.inputs is not None:
        changed = dependencies.changed(input_shapes, last.inputs)
        nodes, unbind = dependencies.affected(changed)
        dims = {s: n for s, n in last.dims.items() if s not in unbind and s not in changed}
        shapes, host, arrays = dict(last.shapes), dict(last.host), dict(last.arrays)
    else:
        changed, nodes = None, fn.nodes
        dims, shapes, host, arrays = {}, {}, {}, {}
    for a in fn.args:
        _bind(dims, a.type.shape, input_shapes[a.name], a.name)
        shapes[a.name] = input_shapes[a.name]
    memo = _Memo(constants.node_keys, constants.memo)
    for node in nodes:
        _resolve_node(plan, module, node, constants, memo, dims, shapes, arrays, host)
    constants.last = Resolved(shapes, host, dims, arrays, input_shapes, changed)
    return constants.last


def _resolve_node(plan: Plan, module: Module, node, constants: ConstantCache, memo: _Memo,
                  dims: dict, shapes: dict, arrays: dict, host: dict) -> None:
    """``node``'s result shapes (and a host node's arrays) into ``shapes`` (``arrays``,
    ``host``), binding the symbols they have in ``dims``."""
    if node.op == "constant":
        for r in node.results:
            arr = constants.constant_arrays.get(r.name)
            if arr is None:
                arr = constants.constant_arrays[r.name] = _constant_array(module, r)
            arrays[r.name] = arr
            shapes[r.name] = tuple(arr.shape)
        return
    if plan.buffers[node.results[0].name].kind == "host":
        from qcompiler.runtime.reference import OP_IMPLS  # (host nodes only: a few a call)

        _eval_host(node, module, shapes, arrays, host, dims, constants, OP_IMPLS, memo)
        return
    todo = []
    for r in node.results:
        known = _known(r.type.shape, dims)
        if known is None:
            todo.append(r)
        else:
            shapes[r.name] = known
    if todo:
        _infer(node, shapes, arrays, dims, todo, memo)


def _constant_array(module: Module, r) -> np.ndarray:
    arr = constant_value(module, r)
    if arr is None:
        raise PlanError(f"%{r.name}: constant {r.producer.attrs.get('name')!r} is not in the "
                        "module's side table")
    if not isinstance(arr, np.ndarray):  # an inline ``value`` attribute
        arr = np.asarray(arr, r.type.dtype.np_dtype)
    return arr


def _eval_host(node, module, shapes, arrays, host, dims, constants, op_impls,
               memo: _Memo) -> None:
    names = ", ".join(f"%{r.name}" for r in node.results)
    pure = node.op != "shape" and all(v is None or v.name in arrays and v.name not in host
                                      for v in node.operands)
    key = None
    if not (pure and node.results[0].name in constants) and node.op != "constant":
        parts = [memo.node_part(node)]
        for v in node.operands:
            if v is None:
                parts.append(None)
            elif v.name in arrays:
                parts.append(memo.array_part(arrays[v.name]))
                if parts[-1] is None:
                    break
            else:  # only the shape is read
                parts.append(("shape", shapes[v.name]))
        else:
            key = tuple(parts)
    if pure and node.results[0].name in constants:
        outs = constants[node.results[0].name]
    elif key is not None and key in memo.results:
        outs = memo.results[key]
    else:
        impl = op_impls.get(node.op)
        if impl is None:
            raise PlanError(f"{names} = {node.op}: no host implementation of this op")
        args = []
        for v in node.operands:
            if v is None:
                args.append(None)
            elif v.name in arrays:
                args.append(arrays[v.name])
            else:  # `shape` of a data value: only its shape is read
                args.append(_shape_only(shapes[v.name], v.type.dtype.np_dtype))
        try:
            outs = [np.asarray(y) for y in impl(node, args, module)]
        except Exception as e:
            raise PlanError(f"{names} = {node.op}: evaluating the shape function failed: "
                            f"{type(e).__name__}: {e}") from e
        if pure:
            constants[node.results[0].name] = outs
        if key is not None:
            for y in outs:  # shared by every node and signature with the same key
                y.setflags(write=False)
            memo.results[key] = outs
    for r, y in zip(node.results, outs):
        _bind(dims, r.type.shape, y.shape, r.name)
        arrays[r.name] = y
        host[r.name] = y
        shapes[r.name] = tuple(y.shape)


_ABSENT = ("absent",)  # an attribute an inference looked for and the node does not have


def _infer(node, shapes, arrays, dims, todo, memo: _Memo) -> None:
    # The memo key: the op, its operand types and shapes, and its small known operands by
    # value. Each entry under it records the attributes the inference read, with their
    # values, and whether it read a large known operand (one that enters the key by shape
    # only: an attention mask built from the shapes). An entry serves a node with the same
    # values of those attributes, unless it read a large operand: so attention's types are
    # inferred once for every layer (they do not read the mask), and a cache append's
    # once too (its ``layer`` attribute is only checked: ``OpDef.checked_attrs``).
    consts = [None if v is None else arrays.get(v.name) for v in node.operands]
    static, attr_parts = memo.operand_part(node)
    parts, large = [static], set()
    for i, (v, c) in enumerate(zip(node.operands, consts)):
        if v is None:
            parts.append(None)
            continue
        part = None if c is None else memo.array_part(np.asarray(c))
        if c is not None and part is None:
            large.add(i)
            part = ("large", np.asarray(c).dtype.str)
        parts.append((shapes[v.name], part))
    key = ("infer", tuple(parts))
    names = ", ".join(f"%{r.name}" for r in todo)
    # per set of attribute names an inference of this key read, its entries by those
    # attributes' values: (read a large operand, types)
    indexes = memo.results.get(key)
    inferred = None
    for read, entries in indexes or ():
        hit = entries.get(tuple(attr_parts.get(k, _ABSENT) for k in read))
        if hit is not None and not hit[0]:
            inferred = hit[1]
            break
    if inferred is None:
        types = [None if v is None else TensorType(shapes[v.name], v.type.dtype, v.type.quant,
                                                   v.type.layout)
                 for v in node.operands]
        watched, attrs = WatchedOperands(consts), WatchedAttributes(node.attrs)
        try:
            inferred = infer_types(node.op, types, attrs, watched)
        except Exception as e:
            raise PlanError(f"{names} = {node.op}: cannot size it for these dims: "
                            f"{type(e).__name__}: {e}") from e
        checked = OPS[node.op].checked_attrs if node.op in OPS else ()
        read = tuple(sorted(k for k in attrs.read if k not in checked))
        if indexes is None:
            indexes = memo.results[key] = []
        entries = next((e for r, e in indexes if r == read), None)
        if entries is None:
            entries = {}
            indexes.append((read, entries))
        if len(entries) < MEMO_MAX_ENTRIES:
            entries[tuple(attr_parts.get(k, _ABSENT) for k in read)] = \
                (bool(watched.read & large), inferred)
    if not inferred:
        raise PlanError(f"{names} = {node.op}: cannot size it for these dims (no inference)")
    for r, t in zip(node.results, inferred):
        if r not in todo:
            continue
        if "?" in t.shape:
            operands = [shapes[v.name] for v in node.operands if v is not None]
            raise DataDependentShapeError(
                f"%{r.name} = {node.op}: {DATA_DEPENDENT} ({list(t.shape)} for operands of "
                f"shapes {operands})", node.results[0].name)
        if not all(isinstance(d, int) for d in t.shape):
            raise PlanError(f"%{r.name} = {node.op}: its shape {list(r.type.shape)} stays "
                            f"{list(t.shape)} for dims {dims}")
        _bind(dims, r.type.shape, t.shape, r.name)
        shapes[r.name] = tuple(int(d) for d in t.shape)
