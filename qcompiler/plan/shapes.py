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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Module, TensorType, infer_types
from qcompiler.ir.core import constant_value
from qcompiler.plan.plan import Plan, PlanError


class ConstantCache(dict):
    """Host values that depend on no input shape (all operands weights), by value name: they
    are the same for every signature, so one cache serves every bucket and run."""


@dataclass
class Resolved:
    shapes: dict      # value name -> tuple of ints
    host: dict        # host value name -> array
    dims: dict        # symbol -> int (input symbols and the ones bound on the way)


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


def _shape_only(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An array with ``shape`` and no memory behind it, for ops that read only the shape."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def resolve(plan: Plan, module: Module, input_shapes: dict,
            constants: ConstantCache = None) -> Resolved:
    """Concrete shapes and host arrays for inputs of ``input_shapes`` (name -> tuple of ints)."""
    from qcompiler.runtime.reference import OP_IMPLS

    fn = module.main
    constants = ConstantCache() if constants is None else constants
    dims: dict = {}
    shapes: dict = {}
    arrays: dict = {}  # weights and host values
    for a in fn.args:
        shape = tuple(int(n) for n in input_shapes[a.name])
        _bind(dims, a.type.shape, shape, a.name)
        shapes[a.name] = shape
    host: dict = {}
    for node in fn.nodes:
        if node.op == "constant":
            for r in node.results:
                arr = constant_value(module, r)
                if arr is None:
                    raise PlanError(f"%{r.name}: constant {node.attrs.get('name')!r} is not in "
                                    "the module's side table")
                arrays[r.name] = arr
                shapes[r.name] = tuple(arr.shape)
            continue
        kind = plan.buffers[node.results[0].name].kind
        if kind == "host":
            _eval_host(node, module, shapes, arrays, host, dims, constants, OP_IMPLS)
            continue
        todo = []
        for r in node.results:
            known = _known(r.type.shape, dims)
            if known is None:
                todo.append(r)
            else:
                shapes[r.name] = known
        if todo:
            _infer(node, shapes, arrays, dims, todo)
    return Resolved(shapes, host, dims)


def _eval_host(node, module, shapes, arrays, host, dims, constants, op_impls) -> None:
    names = ", ".join(f"%{r.name}" for r in node.results)
    pure = node.op != "shape" and all(v is None or v.name in arrays and v.name not in host
                                      for v in node.operands)
    if pure and node.results[0].name in constants:
        outs = constants[node.results[0].name]
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
    for r, y in zip(node.results, outs):
        _bind(dims, r.type.shape, y.shape, r.name)
        arrays[r.name] = y
        host[r.name] = y
        shapes[r.name] = tuple(y.shape)


def _infer(node, shapes, arrays, dims, todo) -> None:
    types = [None if v is None else TensorType(shapes[v.name], v.type.dtype, v.type.quant,
                                               v.type.layout)
             for v in node.operands]
    consts = [None if v is None else arrays.get(v.name) for v in node.operands]
    names = ", ".join(f"%{r.name}" for r in todo)
    try:
        inferred = infer_types(node.op, types, node.attrs, consts)
    except Exception as e:
        raise PlanError(f"{names} = {node.op}: cannot size it for these dims: "
                        f"{type(e).__name__}: {e}") from e
    if not inferred:
        raise PlanError(f"{names} = {node.op}: cannot size it for these dims (no inference)")
    for r, t in zip(node.results, inferred):
        if r not in todo:
            continue
        if not all(isinstance(d, int) for d in t.shape):
            raise PlanError(f"%{r.name} = {node.op}: its shape {list(r.type.shape)} stays "
                            f"{list(t.shape)} for dims {dims}")
        _bind(dims, r.type.shape, t.shape, r.name)
        shapes[r.name] = tuple(int(d) for d in t.shape)
