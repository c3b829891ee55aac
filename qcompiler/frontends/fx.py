"""torch.fx / torch.export → QIR.

``load(model, example_inputs)`` takes a ``torch.nn.Module`` (a plain module, a
``torch.fx.GraphModule`` from ``symbolic_trace`` or from PT2E quantization) or a
``torch.export.ExportedProgram`` and returns a Module whose ``main`` function mirrors the
ATen graph that ``torch.export`` produces:

- user inputs become arguments (shapes and dtypes of ``example_inputs``: the graph is
  specialized to those shapes, like ``torch.compile(dynamic=False)``); parameters, buffers and
  lifted constants become ``constant`` nodes named after their state-dict key;
- nodes whose inputs are all constants (``arange``, position-id slices, masks built from
  shapes, transposed weights ...) are evaluated with torch at import time (constant folding),
  except the quantization ops, which are kept so that ``fuse-dequant`` can see them;
- ``quantized_decomposed`` ops (what PT2E's ``convert_pt2e`` and torchao's 8da4w / int4
  flows write: ``quantize_per_tensor``, ``dequantize_per_tensor``, ``*_per_channel``,
  ``dequantize_per_channel_group``) become ``quantize`` / ``dequantize`` with the scheme their
  arguments give; ``quant_min``/``quant_max`` of -8..7 or 0..15 mean 4-bit codes;
- ``linear`` becomes ``matmul(x, Wᵀ) (+ add bias)``, with Wᵀ made at import time (a
  transposed constant, or a transposed ``dequantize`` of constant codes), so a weight reaches
  ``quantize-weights`` / ``fuse-dequant`` as the ``[K, N]`` operand they expect;
- ``scaled_dot_product_attention`` is expanded into ``matmul``, ``softmax`` and the mask.

Anything else is refused with a ``FrontendError`` naming the ATen op and the fx node.

``TorchCompiled`` (what ``qcompiler.compile(torch_module, example_inputs=...)`` returns)
accepts and returns torch tensors, and recompiles for input shapes it has not seen.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import numpy as np

from qcompiler.frontends.onnx import FrontendError
from qcompiler.ir import Function, Module, QuantScheme, TensorType, elem
from qcompiler.ir.core import Value, constant_node, constant_value
from qcompiler.ir.ops import TypeInferenceError, infer_types

__all__ = ["load", "export", "is_torch_model", "TorchCompiled", "supported_ops", "FrontendError"]

_TORCH_TO_QIR = {
    "float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
}


def is_torch_model(model) -> bool:
    """True for torch modules and exported programs, without importing torch needlessly."""
    import sys

    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(model, (torch.nn.Module, torch.export.ExportedProgram))


def _qir_dtype(torch_dtype, what: str):
    name = str(torch_dtype).replace("torch.", "")
    try:
        return elem(_TORCH_TO_QIR[name])
    except KeyError:
        raise FrontendError(f"{what}: torch dtype {torch_dtype} is not supported") from None


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def _to_torch(a: np.ndarray):
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def export(model, example_inputs):
    """``torch.export`` a module (eval mode, no grad) for the given example inputs."""
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        return model
    if example_inputs is None:
        raise FrontendError(f"{type(model).__name__}: example_inputs=(tensor, ...) is needed to "
                            "trace a torch module")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    with torch.no_grad():
        try:
            return torch.export.export(model, example_inputs, strict=False)
        except Exception as e:
            raise FrontendError(f"torch.export could not trace {type(model).__name__}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                ) from e


class _Const:
    """A value known at import time (a torch tensor), made a QIR constant only when used."""

    def __init__(self, tensor, hint: str):
        self.tensor = tensor
        self.hint = hint
        self.value: Optional[Value] = None


# --------------------------------------------------------------------------------------------
# the importer
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# op handlers: handler(imp, *args, **kwargs) -> Value | list | python value
# --------------------------------------------------------------------------------------------

_HANDLERS: dict[Any, Callable] = {}
_SKIP: set = set()


def _fold_only(*a, **k):  # marker: the op is supported only with constant inputs
    raise AssertionError


_fold_only.keeps_quantization = False


def _aten(*names: str, keeps_quantization: bool = False):
    """Register a handler for ``aten.<name>`` (packet or ``name.overload``)."""
    def wrap(fn):
        fn.keeps_quantization = keeps_quantization
        _PENDING.append((names, fn, "aten"))
        return fn
    return wrap


def _qd(*names: str):
    def wrap(fn):
        fn.keeps_quantization = True
        _PENDING.append((names, fn, "quantized_decomposed"))
        return fn
    return wrap


_PENDING: list = []
_REGISTERED = False


def _register_all() -> None:
    """Resolve handler names to torch op objects (done once, when torch is first needed)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines quantized_decomposed)

    for names, fn, ns in _PENDING:
        space = getattr(torch.ops, ns)
        for name in names:
            packet_name, _, overload = name.partition(".")
            packet = getattr(space, packet_name)
            _HANDLERS[getattr(packet, overload) if overload else packet] = fn
    for name in ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
                 "_assert_async"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            _SKIP.add(packet.default if hasattr(packet, "default") else packet)
    _SKIP.add(torch.ops.aten._assert_async.msg)
    for name in ("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "tensor", "tril",
                 "triu", "ones_like", "zeros_like", "full_like", "lift_fresh_copy"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            _HANDLERS.setdefault(packet, _fold_only)
    _REGISTERED = True


def supported_ops() -> list[str]:
    """The ATen / quantized_decomposed ops the importer maps (others must fold to constants)."""
    out = set()
    for names, _, ns in _PENDING:
        prefix = "" if ns == "aten" else ns + "."
        out.update(prefix + n.partition(".")[0] for n in names)
    return sorted(out)


# -- plumbing ------------------------------------------------------------------------------


@_aten("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "_to_copy", "to", "type_as",
       "_unsafe_view", "view", "reshape", "unflatten")
def _same_or_reshape(imp, x, *rest, **kw):
    """Copies, dtype changes and views: a cast where the dtype changes, a reshape where the
    shape does."""
    out_shape, out_dtype = imp.out_shape(), imp.out_dtype()
    v = imp.value(x)
    if v.type.dtype != out_dtype:
        v = imp.emit("cast", [v], {"to": out_dtype})
    if tuple(v.type.shape) != out_shape:
        v = _reshape_to(imp, v, out_shape)
    return v


def _reshape_to(imp, v: Value, shape: tuple) -> Value:
    shape_c = imp.value(_Const(_torch_i64(shape), "shape"))
    return imp.emit("reshape", [v, shape_c])


def _torch_i64(values):
    import torch

    return torch.tensor(list(values), dtype=torch.int64)


@_aten("dropout", "feature_dropout")
def _dropout(imp, x, p=0.5, train=False):
    if train and p > 0:
        raise imp.fail("dropout in training mode: call model.eval() before compiling")
    return imp.value(x)


@_aten("flatten")
def _flatten(imp, x, *a, **k):
    return _reshape_to(imp, imp.value(x), imp.out_shape())


@_aten("unsqueeze")
def _unsqueeze(imp, x, dim):
    return imp.emit("unsqueeze", [x], {"axes": [int(dim)]})


@_aten("squeeze")
def _squeeze(imp, x, dim=None):
    return _reshape_to(imp, imp.value(x), imp.out_shape())


@_aten("expand", "expand_as", "broadcast_to")
def _expand(imp, x, *a, **k):
    return imp.emit("expand", [x, _Const(_torch_i64(imp.out_shape()), "shape")])


@_aten("permute")
def _permute(imp, x, dims):
    v = imp.value(x)
    perm = [int(d) % max(v.type.rank, 1) for d in dims]
    return _transpose(imp, x, perm)


@_aten("transpose")
def _transpose_int(imp, x, d0, d1):
    rank = imp.value(x).type.rank if not isinstance(x, _Const) else x.tensor.dim()
    perm = list(range(rank))
    d0, d1 = d0 % rank, d1 % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _transpose(imp, x, perm)


@_aten("t", "numpy_T")
def _t(imp, x):
    rank = imp.value(x).type.rank
    return _transpose(imp, x, list(range(rank))[::-1])


def _transpose(imp, x, perm: list[int]) -> Value:
    """transpose; a 2-D transpose of dequantize(constant codes) becomes a dequantize of
    transposed codes, so that fuse-dequant sees ``matmul(x, dequantize([K, N] codes))``."""
    v = imp.value(x)
    if perm == sorted(perm):
        return v
    dq = v.producer
    if v.type.rank == 2 and dq is not None and dq.op == "dequantize" \
            and all(o is None or constant_value(imp.module, o) is not None
                    for o in dq.operands[:3]) and (len(dq.operands) < 4 or dq.operands[3] is None):
        scheme: QuantScheme = dq.attrs["scheme"]
        ops = []
        for o in dq.operands[:3]:
            if o is None:
                ops.append(None)
                continue
            arr = constant_value(imp.module, o)
            if arr.ndim == 2 and scheme.granularity != "tensor":
                arr = np.ascontiguousarray(arr.T)
            t = TensorType(tuple(arr.shape), o.type.dtype)
            ops.append(constant_node(imp.fn, imp.module, arr, t,
                                     name_hint=f"{o.name}.t").result)
        if scheme.granularity != "tensor":
            scheme = scheme.replace(axis=1 - scheme.axis)
        return imp.emit("dequantize", ops, {"scheme": scheme, "out": dq.attrs["out"]})
    return imp.emit("transpose", [v], {"perm": perm})


@_aten("slice")
def _slice(imp, x, dim=0, start=None, end=None, step=1):
    v = imp.value(x)
    dim = dim % v.type.rank
    size = v.type.shape[dim]
    start = 0 if start is None else int(start)
    end = size if end is None else min(int(end), size)
    if start == 0 and end == size and step == 1:
        return v
    consts = [_Const(_torch_i64([s]), "slice") for s in (start, end, dim, step)]
    return imp.emit("slice", [v] + consts)


@_aten("select")
def _select(imp, x, dim, index):
    import torch

    return imp.emit("gather", [x, _Const(torch.tensor(int(index)), "index")],
                    {"axis": int(dim)})


@_aten("index_select")
def _index_select(imp, x, dim, index):
    return imp.emit("gather", [x, index], {"axis": int(dim)})


@_aten("index")
def _index(imp, x, indices):
    """x[i0, i1, ...] with index tensors for the leading dims (as masks are built)."""
    import torch

    if any(i is None for i in indices):
        raise imp.fail("indexing with None (a full slice) between index tensors is not "
                       "supported")
    for i in indices:
        dtype = i.tensor.dtype if isinstance(i, _Const) else None
        if (dtype is not None and dtype == torch.bool) or \
                (isinstance(i, Value) and i.type.dtype.name == "bool"):
            raise imp.fail("boolean mask indexing (a data-dependent shape) is not supported")
    if all(isinstance(i, _Const) for i in indices):
        idx = torch.broadcast_tensors(*[i.tensor.to(torch.int64) for i in indices])
        stacked = torch.stack(idx, dim=-1)
        return imp.emit("gather_nd", [x, _Const(stacked, "index")])
    if len(indices) == 1:
        return imp.emit("gather", [x, indices[0]], {"axis": 0})
    raise imp.fail("several run-time index tensors are not supported")


@_aten("gather")
def _gather(imp, x, dim, index, sparse_grad=False):
    return imp.emit("gather_elements", [x, index], {"axis": int(dim)})


@_aten("embedding")
def _embedding(imp, weight, indices, *rest):
    return imp.emit("gather", [weight, indices], {"axis": 0})


@_aten("cat", "concat")
def _cat(imp, tensors, dim=0):
    dtype = imp.out_dtype()
    return imp.emit("concat", [imp.value(t, dtype) for t in tensors], {"axis": int(dim)})


@_aten("stack")
def _stack(imp, tensors, dim=0):
    parts = [imp.emit("unsqueeze", [t], {"axes": [int(dim)]}) for t in tensors]
    return imp.emit("concat", parts, {"axis": int(dim)})


@_aten("split", "split_with_sizes")
def _split(imp, x, sizes, dim=0):
    v = imp.value(x)
    dim = dim % v.type.rank
    total = v.type.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - i) for i in range(0, total, sizes)]
    out = imp.emit("split", [v], {"axis": dim, "sizes": [int(s) for s in sizes]})
    return out if isinstance(out, list) else [out]


@_aten("chunk")
def _chunk(imp, x, chunks, dim=0):
    v = imp.value(x)
    total = v.type.shape[dim % v.type.rank]
    size = -(-total // chunks)
    return _split(imp, x, size, dim)


# -- elementwise ---------------------------------------------------------------------------


def _binary_handler(op: str, swap: bool = False):
    def handler(imp, a, b, alpha=1, **kw):
        dtype = imp.out_dtype()
        if kw.get("rounding_mode") is not None:
            raise imp.fail(f"rounding_mode={kw['rounding_mode']!r} is not supported")
        if op in ("greater", "greater_or_equal", "less", "less_or_equal", "equal", "and"):
            dtype = _common_dtype(imp, a, b)
        if alpha != 1:
            b = imp.emit("mul", [imp.value(b, dtype), imp.value(alpha, dtype)])
        x, y = imp.value(a, dtype), imp.value(b, dtype)
        return imp.emit(op, [y, x] if swap else [x, y])
    handler.keeps_quantization = False
    return handler


def _common_dtype(imp, a, b):
    """The operand type of a comparison: the tensor's (a python scalar follows it)."""
    for x in (a, b):
        if isinstance(x, (Value, _Const)):
            return imp.value(x).type.dtype
    return elem("f32")


for _names, _op, _swap in [
        (("add", "add_"), "add", False), (("sub", "sub_"), "sub", False),
        (("rsub",), "sub", True), (("mul", "mul_"), "mul", False),
        (("div", "div_", "true_divide"), "div", False),
        (("maximum",), "max", False), (("minimum",), "min", False),
        (("gt",), "greater", False), (("ge",), "greater_or_equal", False),
        (("lt",), "less", False), (("le",), "less_or_equal", False), (("eq",), "equal", False),
        (("__and__", "bitwise_and", "logical_and"), "and", False)]:
    _aten(*_names)(_binary_handler(_op, _swap))


def _unary_handler(op: str):
    def handler(imp, x, *a, **k):
        return imp.emit(op, [imp.value(x, imp.out_dtype())])
    handler.keeps_quantization = False
    return handler


for _name, _op in [("neg", "neg"), ("exp", "exp"), ("sqrt", "sqrt"), ("tanh", "tanh"),
                   ("sigmoid", "sigmoid"), ("relu", "relu"), ("erf", "erf"), ("abs", "abs"),
                   ("reciprocal", "reciprocal")]:
    _aten(_name)(_unary_handler(_op))


@_aten("rsqrt")
def _rsqrt(imp, x):
    return imp.emit("reciprocal", [imp.emit("sqrt", [x])])


@_aten("silu")
def _silu(imp, x):
    return imp.emit("mul", [x, imp.emit("sigmoid", [x])])


@_aten("gelu")
def _gelu(imp, x, approximate="none"):
    return imp.emit("gelu", [x], {"approximate": approximate} if approximate != "none" else {})


@_aten("pow")
def _pow(imp, x, exponent):
    dtype = imp.out_dtype()
    return imp.emit("pow", [imp.value(x, dtype), imp.value(exponent, dtype)])


@_aten("logical_not", "bitwise_not")
def _not(imp, x):
    v = imp.value(x)
    if v.type.dtype.name != "bool":
        raise imp.fail(f"{imp.node.target} on {v.type.dtype} (only bool) is not supported")
    return imp.emit("equal", [v, imp.value(False)])


@_aten("clamp", "clamp_min", "clamp_max")
def _clamp(imp, x, lo=None, hi=None):
    packet = str(imp.node.target)
    if "clamp_max" in packet:
        lo, hi = None, lo
    dtype = imp.out_dtype()
    y = imp.value(x, dtype)
    if lo is not None:
        y = imp.emit("max", [y, imp.value(lo, dtype)])
    if hi is not None:
        y = imp.emit("min", [y, imp.value(hi, dtype)])
    return y


@_aten("hardtanh")
def _hardtanh(imp, x, min_val=-1.0, max_val=1.0):
    dtype = imp.out_dtype()
    y = imp.emit("max", [imp.value(x, dtype), imp.value(float(min_val), dtype)])
    return imp.emit("min", [y, imp.value(float(max_val), dtype)])


@_aten("leaky_relu")
def _leaky_relu(imp, x, negative_slope=0.01):
    dtype = imp.out_dtype()
    v = imp.value(x, dtype)
    positive = imp.emit("greater", [v, imp.value(0.0, dtype)])
    return imp.emit("where", [positive, v, imp.emit("mul", [v, imp.value(negative_slope,
                                                                         dtype)])])


@_aten("where")
def _where(imp, cond, x, y):
    dtype = imp.out_dtype()
    return imp.emit("where", [imp.value(cond, elem("bool")), imp.value(x, dtype),
                              imp.value(y, dtype)])


@_aten("masked_fill")
def _masked_fill(imp, x, mask, value):
    dtype = imp.out_dtype()
    return imp.emit("where", [imp.value(mask, elem("bool")), imp.value(value, dtype),
                              imp.value(x, dtype)])


# -- reductions and normalization ----------------------------------------------------------


def _dims(dim, rank) -> list[int]:
    if dim is None:
        return list(range(rank))
    if isinstance(dim, int):
        return [dim]
    return [int(d) for d in dim] or list(range(rank))


@_aten("sum")
def _sum(imp, x, dim=None, keepdim=False, dtype=None):
    v = imp.value(x, imp.out_dtype())
    return imp.emit("reduce_sum", [v], {"axes": _dims(dim, v.type.rank),
                                        "keepdims": int(bool(keepdim))})


@_aten("mean")
def _mean(imp, x, dim=None, keepdim=False, dtype=None):
    v = imp.value(x, imp.out_dtype())
    return imp.emit("reduce_mean", [v], {"axes": _dims(dim, v.type.rank),
                                         "keepdims": int(bool(keepdim))})


@_aten("linalg_vector_norm", "norm")
def _norm(imp, x, ord=2, dim=None, keepdim=False, dtype=None):
    if ord != 2:
        raise imp.fail(f"vector norm of order {ord} is not supported (only 2)")
    v = imp.value(x, imp.out_dtype())
    return imp.emit("reduce_l2", [v], {"axes": _dims(dim, v.type.rank),
                                       "keepdims": int(bool(keepdim))})


@_aten("softmax", "_softmax", "_safe_softmax")
def _softmax(imp, x, dim, *rest):
    return imp.emit("softmax", [imp.value(x, imp.out_dtype())], {"axis": int(dim)})


@_aten("layer_norm")
def _layer_norm(imp, x, normalized_shape, weight=None, bias=None, eps=1e-5, *rest):
    import torch

    v = imp.value(x)
    if weight is None:
        weight = _Const(torch.ones(list(normalized_shape), dtype=torch.float32), "ln_scale")
    return imp.emit("layernorm", [v, imp.value(weight, v.type.dtype),
                                  None if bias is None else imp.value(bias, v.type.dtype)],
                    {"axis": -len(normalized_shape), "epsilon": float(eps)})


@_aten("rms_norm")
def _rms_norm(imp, x, normalized_shape, weight=None, eps=None):
    """x / sqrt(mean(x², last dims) + eps) · weight (eps None: the dtype's machine epsilon)."""
    import torch

    dtype = imp.out_dtype()
    v = imp.value(x, dtype)
    if eps is None:
        eps = torch.finfo(imp.meta_val().dtype).eps
    if weight is None:
        weight = _Const(torch.ones(list(normalized_shape), dtype=imp.meta_val().dtype),
                        "rms_scale")
    # One rmsnorm op (f16/bf16 computed in f32, as ONNX RMSNormalization with stash_type 1).
    return imp.emit("rmsnorm", [v, imp.value(weight, dtype)],
                    {"axis": -len(normalized_shape), "epsilon": float(eps)})


@_aten("batch_norm", "_native_batch_norm_legit_no_training")
def _batch_norm(imp, x, weight, bias, running_mean, running_var, *rest):
    """Inference batch norm with constant statistics: one multiply and one add per channel."""
    import torch

    if str(imp.node.target).startswith("aten.batch_norm"):
        training, eps = rest[0], rest[2]
    else:
        training, eps = False, rest[1]
    if training:
        raise imp.fail("batch_norm in training mode: call model.eval() before compiling")
    stats = [running_mean, running_var, weight, bias]
    if not all(a is None or isinstance(a, _Const) for a in stats) or running_mean is None:
        raise imp.fail("batch_norm needs constant running statistics")
    mean, var = running_mean.tensor.double(), running_var.tensor.double()
    w = weight.tensor.double() if weight is not None else torch.ones_like(mean)
    b = bias.tensor.double() if bias is not None else torch.zeros_like(mean)
    scale = w / torch.sqrt(var + eps)
    shift = b - mean * scale
    v = imp.value(x)
    shape = [1, -1] + [1] * (v.type.rank - 2)  # channels on dim 1
    dtype = v.type.dtype
    y = imp.emit("mul", [v, imp.value(_Const(scale.reshape(shape).float(), "bn_scale"), dtype)])
    y = imp.emit("add", [y, imp.value(_Const(shift.reshape(shape).float(), "bn_shift"), dtype)])
    if str(imp.node.target).startswith("aten._native_batch_norm"):
        return [y, None, None]
    return y


@_aten("native_layer_norm")
def _native_layer_norm(imp, x, normalized_shape, weight, bias, eps):
    # Returns (y, mean, rstd); only y may be used.
    return [_layer_norm(imp, x, normalized_shape, weight, bias, eps), None, None]


# -- matrix products -----------------------------------------------------------------------


def _weight_t(imp, w):
    """Wᵀ of a linear weight [N, K]: a transposed constant, or a transposed dequantize."""
    if isinstance(w, _Const):
        t = w.tensor
        hint = w.hint + ".T"
        return imp.value(_Const(t.t().contiguous(), hint))
    return _transpose(imp, w, [1, 0])


@_aten("linear")
def _linear(imp, x, weight, bias=None):
    dtype = imp.out_dtype()
    y = imp.emit("matmul", [imp.value(x, dtype), imp.value(_weight_t(imp, weight), dtype)])
    if bias is not None:
        y = imp.emit("add", [y, imp.value(bias, dtype)])
    return y


@_aten("matmul", "mm", "bmm")
def _matmul(imp, a, b):
    dtype = imp.out_dtype()
    return imp.emit("matmul", [imp.value(a, dtype), imp.value(b, dtype)])


@_aten("addmm")
def _addmm(imp, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise imp.fail("addmm with beta or alpha other than 1 is not supported")
    dtype = imp.out_dtype()
    y = imp.emit("matmul", [imp.value(a, dtype), imp.value(b, dtype)])
    return imp.emit("add", [y, imp.value(bias, dtype)])


@_aten("scaled_dot_product_attention")
def _sdpa(imp, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    """softmax(q kᵀ · scale + mask) v; a boolean mask keeps the positions that are True."""
    import torch

    if dropout_p:
        raise imp.fail("scaled_dot_product_attention with dropout_p > 0 (training)")
    if enable_gqa:
        raise imp.fail("scaled_dot_product_attention with enable_gqa is not supported")
    dtype = imp.out_dtype()
    qv, kv, vv = (imp.value(t, dtype) for t in (q, k, v))
    rank = kv.type.rank
    d = qv.type.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = imp.emit("matmul", [qv, imp.emit("transpose", [kv], {"perm": perm})])
    scores = imp.emit("mul", [scores, imp.value(scale, dtype)])
    L, S = qv.type.shape[-2], kv.type.shape[-2]
    if is_causal:
        if attn_mask is not None:  # torch refuses this combination too
            raise imp.fail("scaled_dot_product_attention with both is_causal and attn_mask")
        attn_mask = _Const(torch.ones(L, S, dtype=torch.bool).tril(), "causal_mask")
    if attn_mask is not None:
        m = imp.value(attn_mask)
        if m.type.dtype.name == "bool":
            neg = imp.value(float("-inf"), dtype)
            scores = imp.emit("where", [m, scores, neg])
        else:
            scores = imp.emit("add", [scores, imp.value(m, dtype)])
    probs = imp.emit("softmax", [scores], {"axis": -1})
    return imp.emit("matmul", [probs, vv])


# -- quantization (quantized_decomposed) ---------------------------------------------------


def _code_type(imp, qmin: int, qmax: int, dtype):
    """The QIR code type for [quant_min, quant_max] stored in ``dtype``: 4-bit ranges are i4/u4."""
    for name in ("i2", "u2", "i4", "u4", "i8", "u8", "i16", "u16"):
        et = elem(name)
        if et.int_range() == (qmin, qmax):
            return et
    base = _qir_dtype(dtype, imp.where())
    lo, hi = base.int_range()
    if not lo <= qmin <= qmax <= hi:
        raise imp.fail(f"quant range [{qmin}, {qmax}] does not fit {dtype}")
    # A narrower range of a wider type (e.g. [-127, 127] in int8): codes are in range anyway.
    for name in ("i4", "u4", "i8", "u8", "i16", "u16"):
        et = elem(name)
        lo2, hi2 = et.int_range()
        if lo2 <= qmin and qmax <= hi2 and (lo2 < 0) == (lo < 0):
            return et
    return base


def _scalar_or_tensor(imp, a, dtype, hint):
    import torch

    if isinstance(a, (Value, _Const)):
        return imp.value(a, dtype)
    return imp.value(_Const(torch.tensor(a), hint), dtype)


def _qparams(imp, scale, zero_point, code_type, shape_hint=None):
    """QIR scale (f32) and zero point (codes) operands; a zero zero point is dropped."""
    s = _scalar_or_tensor(imp, scale, elem("f32"), "scale")
    if zero_point is None:
        return s, None
    zp_arr = imp.const_array(zero_point) if isinstance(zero_point, (Value, _Const)) \
        else np.asarray(zero_point)
    if zp_arr is not None:
        if np.any(zp_arr != np.rint(zp_arr)):
            raise imp.fail("zero points that are not integers are not supported")
        if not np.any(zp_arr):
            return s, None
        lo, hi = code_type.int_range()
        if zp_arr.min() < lo or zp_arr.max() > hi:
            raise imp.fail(f"zero points outside the code range [{lo}, {hi}]")
        arr = np.asarray(zp_arr).astype(code_type.np_dtype)
        zp = constant_node(imp.fn, imp.module, arr, TensorType(tuple(arr.shape), code_type),
                           name_hint="zero_point").result
        return s, zp
    return s, imp.value(zero_point, code_type)


def _scheme(code_type, s: Value, zp: Optional[Value], **gran) -> QuantScheme:
    return QuantScheme(dtype=code_type, scale_type=s.type.dtype, symmetric=zp is None,
                       zero_point_type=None if zp is None else zp.type.dtype, **gran)


def _codes(imp, x, code_type) -> Value:
    """Codes stored as int8/uint8 tensors, retyped as the narrower code type (i4 ...)."""
    if isinstance(x, _Const):
        arr = _to_numpy(x.tensor)
        lo, hi = code_type.int_range()
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise imp.fail(f"codes of {x.hint} lie outside [{lo}, {hi}]")
        return constant_node(imp.fn, imp.module, arr.astype(code_type.np_dtype),
                             TensorType(tuple(arr.shape), code_type),
                             name_hint=_hint(x.hint)).result
    v = imp.value(x)
    if v.type.dtype != code_type:
        raise imp.fail(f"run-time codes of type {v.type.dtype} cannot be read as {code_type} "
                       "(quantize and dequantize must use the same quant_min/quant_max)")
    return v


@_qd("quantize_per_tensor", "quantize_per_tensor.tensor", "quantize_per_tensor.tensor2")
def _quantize_per_tensor(imp, x, scale, zero_point, qmin, qmax, dtype):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scale, zero_point, code_type)
    scheme = _scheme(code_type, s, zp)
    return _clamp_codes(imp, imp.emit("quantize", [imp.value(x, elem("f32")), s, zp],
                                      {"scheme": scheme}), code_type, qmin, qmax)


def _clamp_codes(imp, q: Value, code_type, qmin, qmax) -> Value:
    """torch clamps to [quant_min, quant_max]; quantize saturates to the type's range."""
    lo, hi = code_type.int_range()
    if (lo, hi) == (qmin, qmax):
        return q
    q = imp.emit("max", [q, constant_node(imp.fn, imp.module, np.array(qmin, code_type.np_dtype),
                                          TensorType((), code_type)).result])
    return imp.emit("min", [q, constant_node(imp.fn, imp.module, np.array(qmax, code_type.np_dtype),
                                             TensorType((), code_type)).result])


@_qd("dequantize_per_tensor", "dequantize_per_tensor.tensor", "dequantize_per_tensor.tensor2")
def _dequantize_per_tensor(imp, x, scale, zero_point, qmin, qmax, dtype, out_dtype=None):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scale, zero_point, code_type)
    out = imp.out_dtype()
    return imp.emit("dequantize", [_codes(imp, x, code_type), s, zp],
                    {"scheme": _scheme(code_type, s, zp), "out": out})


@_qd("quantize_per_channel")
def _quantize_per_channel(imp, x, scales, zero_points, axis, qmin, qmax, dtype):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scales, zero_points, code_type)
    xv = imp.value(x, elem("f32"))
    scheme = _scheme(code_type, s, zp, granularity="channel", axis=int(axis) % xv.type.rank)
    return _clamp_codes(imp, imp.emit("quantize", [xv, s, zp], {"scheme": scheme}),
                        code_type, qmin, qmax)


@_qd("dequantize_per_channel")
def _dequantize_per_channel(imp, x, scales, zero_points, axis, qmin, qmax, dtype,
                            out_dtype=None):
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    s, zp = _qparams(imp, scales, zero_points, code_type)
    codes = _codes(imp, x, code_type)
    scheme = _scheme(code_type, s, zp, granularity="channel", axis=int(axis) % codes.type.rank)
    return imp.emit("dequantize", [codes, s, zp], {"scheme": scheme, "out": imp.out_dtype()})


@_qd("dequantize_per_channel_group")
def _dequantize_per_channel_group(imp, w, scales, zero_points, qmin, qmax, dtype, group_size,
                                  output_dtype=None):
    """torchao / ExecuTorch 4-bit weights: w [N, K] codes, scales [N, K / group_size]."""
    code_type = _code_type(imp, int(qmin), int(qmax), dtype)
    codes = _codes(imp, w, code_type)
    if codes.type.rank != 2:
        raise imp.fail(f"dequantize_per_channel_group takes 2-D codes, not {codes.type.shape}")
    n, k = codes.type.shape
    group = int(group_size)
    if group > k:
        group = k
    if k % group:
        raise imp.fail(f"K={k} is not a multiple of group_size={group}")
    s_arr = imp.const_array(scales)
    if s_arr is None:
        raise imp.fail("the scales of dequantize_per_channel_group must be constants")
    s_arr = np.asarray(s_arr, np.float32).reshape(n, k // group)
    s = constant_node(imp.fn, imp.module, s_arr, TensorType((n, k // group), elem("f32")),
                      name_hint="scales").result
    zp = None
    if zero_points is not None:
        z_arr = imp.const_array(zero_points)
        if z_arr is None:
            raise imp.fail("the zero points of dequantize_per_channel_group must be constants")
        z_arr = np.asarray(z_arr).reshape(n, k // group)
        _, zp = _qparams(imp, s, _Const(_to_torch(z_arr), "zero_points"), code_type)
    scheme = _scheme(code_type, s, zp, granularity="group", axis=1, block_size=group)
    return imp.emit("dequantize", [codes, s, zp], {"scheme": scheme, "out": imp.out_dtype()})


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def load(model, example_inputs=None, input_names=None, output_names=None) -> Module:
    """Import a torch module or exported program as a QIR module (static input shapes)."""
    _register_all()
    ep = export(model, example_inputs)
    return _Importer(ep, input_names, output_names).run()


class TorchCompiled:
    """A compiled torch module: call it with tensors, get tensors back.

    The artifact is specialized to the input shapes it was compiled for; a call with other
    shapes or dtypes compiles again (and keeps both), as ``torch.compile(dynamic=False)`` does.
    """

    def __init__(self, model, compile_fn: Callable, example_inputs):
        import torch

        if isinstance(model, torch.export.ExportedProgram) and example_inputs is None:
            example_inputs = model.example_inputs[0] if model.example_inputs else None
        if example_inputs is None:
            raise FrontendError(f"{type(model).__name__}: example_inputs=(tensor, ...) is "
                                "needed to compile a torch module")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        self._model = model
        self._compile_fn = compile_fn
        self._cache: dict = {}
        self.compiled = self._get(tuple(example_inputs))

    @staticmethod
    def _signature(inputs) -> tuple:
        return tuple((tuple(t.shape), str(t.dtype)) for t in inputs)

    def _get(self, inputs):
        key = self._signature(inputs)
        if key not in self._cache:
            import torch

            if self._cache and isinstance(self._model, torch.export.ExportedProgram):
                raise ValueError(f"inputs {key} differ from the shapes the exported program "
                                 f"was compiled for ({next(iter(self._cache))}); export it "
                                 "again or compile the nn.Module")
            self._cache[key] = self._compile_fn(self._model, inputs)
        return self._cache[key]

    @property
    def directory(self) -> str:
        return self.compiled.directory

    def run_numpy(self, inputs: dict) -> dict:
        return self.compiled.run(inputs)

    def __call__(self, *inputs):
        import torch

        if any(not isinstance(t, torch.Tensor) for t in inputs):
            raise TypeError("a compiled torch module takes tensors as positional arguments")
        compiled = self._get(inputs)
        if len(inputs) != len(compiled.input_names):
            raise TypeError(f"expected {len(compiled.input_names)} inputs "
                            f"({', '.join(compiled.input_names)}), got {len(inputs)}")
        feeds = {name: _to_numpy(t) for name, t in zip(compiled.input_names, inputs)}
        out = compiled.run(feeds)
        tensors = [_to_torch(np.asarray(out[name])) for name in compiled.output_names]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def __repr__(self) -> str:
        return f"<TorchCompiled {len(self._cache)} shape(s), {self.compiled!r}>"
