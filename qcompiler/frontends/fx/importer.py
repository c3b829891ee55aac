"""The importer core: an ExportedProgram's graph, node by node, to a QIR function (inputs,
parameters and constants, the op handlers, constant folding, outputs)."""
from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np

from qcompiler.frontends.fx.registry import _HANDLERS, _SKIP, _fold_only, supported_ops
from qcompiler.frontends.fx.tensors import _qir_dtype, _to_numpy, _Const
from qcompiler.frontends.onnx import FrontendError
from qcompiler.ir import Function, Module, TensorType, elem
from qcompiler.ir.core import Value, constant_node, constant_value
from qcompiler.ir.ops import TypeInferenceError, infer_types


class _Importer:
    def __init__(self, ep, input_names=None, output_names=None):
        self.ep = ep
        self.module = Module("fx")
        self.fn = Function("main")
        self.module.add_function(self.fn)
        self.env: dict[Any, Any] = {}
        self.node = None
        self.input_names = list(input_names) if input_names else None
        self.output_names = list(output_names) if output_names else None

    # -- context ---------------------------------------------------------------------------
    def where(self) -> str:
        n = self.node
        return f"fx node {n.name!r} ({_target_name(n.target)})"

    def fail(self, msg: str) -> FrontendError:
        return FrontendError(f"{self.where()}: {msg}")

    # -- values ----------------------------------------------------------------------------
    def value(self, a, dtype=None) -> Value:
        """A QIR value for an fx argument: a node's value, a constant, or a python scalar."""
        if isinstance(a, _Const):
            if a.value is None:
                arr = _to_numpy(a.tensor)
                t = TensorType(tuple(int(d) for d in arr.shape),
                               _qir_dtype(a.tensor.dtype, a.hint))
                a.value = constant_node(self.fn, self.module, arr, t,
                                        name_hint=_hint(a.hint)).result
            v = a.value
        elif isinstance(a, Value):
            v = a
        elif isinstance(a, (bool, int, float)):
            et = dtype or (elem("bool") if isinstance(a, bool) else
                           elem("i64") if isinstance(a, int) else elem("f32"))
            v = constant_node(self.fn, self.module, np.array(a, et.np_dtype),
                              TensorType((), et), name_hint="scalar").result
            return v
        else:
            raise self.fail(f"expected a tensor argument, got {type(a).__name__} {a!r}")
        if dtype is not None and v.type.dtype != dtype:
            v = self.emit("cast", [v], {"to": dtype})
        return v

    def arg(self, a):
        """Resolve an fx argument (nodes → their env entry; lists and tuples recursively)."""
        import torch.fx

        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return a

    def const_array(self, a) -> Optional[np.ndarray]:
        if isinstance(a, _Const):
            return _to_numpy(a.tensor)
        if isinstance(a, Value):
            return constant_value(self.module, a)
        return None

    def emit(self, op: str, operands: list, attrs: Optional[dict] = None,
             n_results: int = 1):
        attrs = attrs or {}
        operands = [None if o is None else self.value(o) for o in operands]
        types = [v.type if v is not None else None for v in operands]
        consts = [constant_value(self.module, v) for v in operands]
        try:
            result_types = infer_types(op, types, attrs, consts)
        except TypeInferenceError as e:
            raise self.fail(f"{op}: {e}") from None
        base = self.node.name if self.node is not None else op
        hints = [base] if len(result_types) == 1 else \
            [f"{base}_{i}" for i in range(len(result_types))]
        node = self.fn.make_node(op, operands, result_types, attrs,
                                 names=[self.fn.fresh_name(h) for h in hints])
        return node.results[0] if len(node.results) == 1 else list(node.results)

    # -- meta ------------------------------------------------------------------------------
    def meta_val(self, n=None):
        n = n or self.node
        return n.meta.get("val")

    def out_dtype(self):
        val = self.meta_val()
        if val is None or not hasattr(val, "dtype"):
            raise self.fail("the node has no tensor metadata (was the graph exported?)")
        return _qir_dtype(val.dtype, self.where())

    def out_shape(self) -> tuple:
        return tuple(int(d) for d in self.meta_val().shape)

    # -- graph -----------------------------------------------------------------------------
    def run(self) -> Module:
        import torch
        from torch.export.graph_signature import InputKind, OutputKind

        ep = self.ep
        gm = ep.graph_module
        sig = ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs}
        user_inputs = [s for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
        if self.input_names and len(self.input_names) != len(user_inputs):
            raise FrontendError(f"input_names has {len(self.input_names)} names, the program "
                                f"takes {len(user_inputs)} tensor inputs")
        user_index = 0
        for n in gm.graph.nodes:
            self.node = n
            if n.op == "placeholder":
                spec = specs.get(n.name)
                kind = spec.kind if spec is not None else InputKind.USER_INPUT
                if kind == InputKind.USER_INPUT:
                    val = n.meta.get("val")
                    if not isinstance(val, torch.Tensor):
                        raise self.fail(f"input {n.name!r} is not a tensor ({type(val).__name__})"
                                        "; only tensor inputs are supported")
                    name = self.input_names[user_index] if self.input_names else n.name
                    user_index += 1
                    shape = tuple(int(d) for d in val.shape)
                    self.env[n] = self.fn.add_arg(name, TensorType(
                        shape, _qir_dtype(val.dtype, f"input {name!r}")))
                elif kind in (InputKind.PARAMETER, InputKind.BUFFER,
                              InputKind.CONSTANT_TENSOR):
                    tensor = ep.state_dict.get(spec.target)
                    if tensor is None:
                        tensor = ep.constants.get(spec.target)
                    if not isinstance(tensor, torch.Tensor):
                        raise self.fail(f"cannot find the tensor of {spec.target!r}")
                    self.env[n] = _Const(tensor.detach(), spec.target)
                else:
                    raise self.fail(f"input kind {kind.name} is not supported")
            elif n.op == "get_attr":
                self.env[n] = _Const(_fetch_attr(gm, n.target).detach(), n.target)
            elif n.op == "call_function":
                self.call_function(n)
            elif n.op == "output":
                self.set_outputs(n, sig, OutputKind)
            else:
                raise self.fail(f"fx op {n.op} is not supported (export the model first)")
        self.node = None
        self.fn.remove_dead_nodes()
        used = {n.attrs["name"] for n in self.fn.nodes if n.op == "constant" and "name" in n.attrs}
        for name in list(self.module.constants):
            if name not in used:
                del self.module.constants[name]
        self.module.metadata["torch"] = {"version": torch.__version__}
        return self.module

    def set_outputs(self, n, sig, OutputKind) -> None:
        results = n.args[0] if isinstance(n.args[0], (list, tuple)) else (n.args[0],)
        kinds = [s.kind for s in sig.output_specs]
        outs = []
        for r, kind in zip(results, kinds):
            if kind != OutputKind.USER_OUTPUT:
                raise self.fail(f"output kind {kind.name} (the model mutates state) is not "
                                "supported")
            v = self.arg(r)
            if not isinstance(v, (Value, _Const)):
                raise self.fail(f"output {r} is not a tensor")
            outs.append(self.value(v))
        if self.output_names:
            if len(self.output_names) != len(outs):
                raise FrontendError(f"output_names has {len(self.output_names)} names, the "
                                    f"program returns {len(outs)} tensors")
            names = self.output_names
        else:
            names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        # An input or a constant returned as is still gets its own named output value.
        outs = [self.emit("identity", [v]) if v.producer is None or v.producer.op == "constant"
                else v for v in outs]
        self.fn.set_outputs(outs, names)

    def call_function(self, n) -> None:
        target = n.target
        if target in _SKIP:
            self.env[n] = None
            return
        args = self.arg(n.args)
        kwargs = {k: self.arg(v) for k, v in n.kwargs.items()}
        if target is operator.getitem:
            seq, i = args
            self.env[n] = seq[i]
            return
        packet = getattr(target, "overloadpacket", None)
        handler = _HANDLERS.get(target) or _HANDLERS.get(packet)
        if handler in (None, _fold_only) or not handler.keeps_quantization:
            folded = self.try_fold(n, args, kwargs)
            if folded is not None:
                self.env[n] = folded
                return
        if handler is None or handler is _fold_only:
            raise self.fail(f"unsupported op. Supported: {', '.join(supported_ops())} "
                            "(and any op on constants only, which is evaluated at import)")
        try:
            self.env[n] = handler(self, *args, **kwargs)
        except FrontendError:
            raise
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise self.fail(f"{type(e).__name__}: {e}") from None

    def try_fold(self, n, args, kwargs):
        """Evaluate a node whose tensor inputs are all constants with torch itself."""
        import torch

        leaves = []

        def collect(a):
            if isinstance(a, (list, tuple)):
                for x in a:
                    collect(x)
            else:
                leaves.append(a)
        collect(args)
        collect(list(kwargs.values()))
        if any(isinstance(a, Value) for a in leaves):
            return None

        def to_torch(a):
            if isinstance(a, _Const):
                return a.tensor
            if isinstance(a, (list, tuple)):
                return type(a)(to_torch(x) for x in a)
            return a
        with torch.no_grad():
            out = n.target(*to_torch(args), **{k: to_torch(v) for k, v in kwargs.items()})

        def wrap(o):
            if isinstance(o, torch.Tensor):
                return _Const(o, n.name)
            if isinstance(o, (list, tuple)):
                return type(o)(wrap(x) for x in o)
            return o
        return wrap(out)


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _hint(name: str) -> str:
    return name.replace("/", ".") or "cst"


def _target_name(target) -> str:
    if hasattr(target, "_schema") or hasattr(target, "overloadpacket"):
        return str(target)
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
