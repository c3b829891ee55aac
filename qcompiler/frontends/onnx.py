"""ONNX → QIR.

``load(model)`` takes a path, bytes or an ``onnx.ModelProto`` and returns a Module whose
``main`` function mirrors the ONNX graph: graph inputs become arguments (symbolic dims kept
as symbols), initializers and Constant nodes become ``constant`` nodes, and each ONNX node
becomes one or a few QIR nodes. Quantization ops keep their meaning exactly:

- ``DequantizeLinear`` / ``QuantizeLinear`` (opsets 10–25): ``dequantize`` / ``quantize``
  with a ``QuantScheme`` read from the operand types and ``axis`` / ``block_size``;
- ``com.microsoft.MatMulNBits``: its packed [N, blocks, blob] weight is unpacked at import
  into [K, N] codes, giving ``dequantize(codes, scales, zero_points, g_idx) → matmul (→ add)``,
  which ``fuse-dequant`` turns into ``qmatmul``;
- ``QLinearMatMul``, ``MatMulInteger``, ``DynamicQuantizeLinear``: ops of the same name.
- ``com.microsoft.QGemm`` (``quantize_static`` QOperator Gemm): the equivalent Q/DQ graph.
- ``com.microsoft.QLinearAdd`` (``quantize_static`` QOperator bias adds): ``quantize(
  dequantize(A) + dequantize(B))``.

Anything else is refused with a ``FrontendError`` that names the op, domain, opset and node.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from qcompiler.errors import InputError
from qcompiler.ir import Function, Module, QuantScheme, TensorType, elem
from qcompiler.ir.core import Value, constant_node, constant_value
from qcompiler.ir.ops import TypeInferenceError, infer_types
from qcompiler.ir.verifier import missing_operand

# ONNX tensor element type → QIR element type name.
_ONNX_TYPES = {
    TensorProto.FLOAT: "f32", TensorProto.FLOAT16: "f16", TensorProto.BFLOAT16: "bf16",
    TensorProto.DOUBLE: "f64", TensorProto.INT8: "i8", TensorProto.UINT8: "u8",
    TensorProto.INT16: "i16", TensorProto.UINT16: "u16", TensorProto.INT32: "i32",
    TensorProto.UINT32: "u32", TensorProto.INT64: "i64", TensorProto.UINT64: "u64",
    TensorProto.BOOL: "bool", TensorProto.INT4: "i4", TensorProto.UINT4: "u4",
    TensorProto.FLOAT8E4M3FN: "f8e4m3fn", TensorProto.FLOAT8E5M2: "f8e5m2",
    TensorProto.FLOAT8E4M3FNUZ: "f8e4m3fnuz", TensorProto.FLOAT8E5M2FNUZ: "f8e5m2fnuz",
    TensorProto.FLOAT4E2M1: "f4e2m1",
}
for _name, _qir in (("INT2", "i2"), ("UINT2", "u2")):
    if hasattr(TensorProto, _name):
        _ONNX_TYPES[getattr(TensorProto, _name)] = _qir
# QIR element type name → ONNX tensor element type (value infos given to onnx's inference).
_ONNX_TYPE_OF = {qir: onnx_type for onnx_type, qir in _ONNX_TYPES.items()}


class FrontendError(InputError):
    """The model cannot be imported; the message says which node, op, opset or input."""


# The opset versions the importer is tested with, per domain (inclusive). ai.onnx: from 6
# (Clip-6 with attribute bounds is tested; onnxruntime runs 6 with a warning and guarantees
# 7+) to the newest the installed onnx defines (the conformance cases are built at that
# opset). com.microsoft has one version. An older ai.onnx opset imports as 6 where every op
# the model uses is defined the same at both (``check_versions``).
OPSET_RANGES = {"ai.onnx": (6, onnx.defs.onnx_opset_version()), "com.microsoft": (1, 1)}
# IR 3 introduced opset_import; the newest is what the installed onnx writes.
IR_VERSION_RANGE = (3, onnx.IR_VERSION)


def _elem_of(onnx_type: int, what: str):
    try:
        return elem(_ONNX_TYPES[onnx_type])
    except KeyError:
        name = TensorProto.DataType.Name(onnx_type) if onnx_type in TensorProto.DataType.values() \
            else str(onnx_type)
        raise FrontendError(f"{what}: element type {name} is not supported") from None


def _to_storage(array: np.ndarray, t: TensorType) -> np.ndarray:
    """ml_dtypes int4/uint4/int2 arrays → one code per int8/uint8 (the QIR storage)."""
    # astype(order="C"), not ascontiguousarray: the latter turns a 0-d array into 1-d.
    return np.asarray(array).astype(t.dtype.np_dtype, order="C")


def read_model(model: Union[str, os.PathLike, bytes, onnx.ModelProto]) -> onnx.ModelProto:
    """Read and decode an ONNX model, with errors that say what is wrong with the file."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        data, where = bytes(model), "the given bytes"
    else:
        path = os.fspath(model)
        if not os.path.exists(path):
            raise FrontendError(f"{path}: no such file")
        if os.path.isdir(path):
            raise FrontendError(f"{path}: is a directory, not an ONNX model file")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:  # permissions, special files ...
            raise FrontendError(f"{path}: cannot read the file: {e.strerror or e}") from None
        where = path
    if not data:
        raise FrontendError(f"{where}: empty file, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FrontendError(f"{where}: not a valid ONNX model (protobuf decode failed: {e}); "
                            "the file may be truncated or of another format") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise FrontendError(f"{where}: not an ONNX model (no graph in the file)")
    if not isinstance(model, (bytes, bytearray)) and not isinstance(model, onnx.ModelProto):
        base = os.path.dirname(os.fspath(model))
        if any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer):
            try:
                onnx.external_data_helper.load_external_data_for_model(proto, base)
            except Exception as e:
                raise FrontendError(f"{where}: cannot read its external weights: {e}") from None
    return proto


_SYM = re.compile(r"[^A-Za-z0-9_]")

# ONNX shape inference serializes the model: past protobuf's 2 GB (a 1.1B-parameter f32 model)
# it fails, and every dim it would have sharpened stays symbolic. Above this size it is given
# a view whose large initializers are typed graph inputs instead (their values do not matter
# to shapes; the small ones, shape constants among them, stay).
SHAPE_INFERENCE_INLINE_BYTES = 1 << 30
LARGE_INITIALIZER_BYTES = 1 << 16


def _message_bytes(message) -> float:
    """A protobuf message's serialized size; infinite past 2 GB, where protobuf refuses to
    size it (EncodeError)."""
    try:
        return message.ByteSize()
    except Exception:
        return float("inf")


def _shape_inference_view(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto``, or over SHAPE_INFERENCE_INLINE_BYTES a copy without its large tensors' data."""
    if _message_bytes(proto) <= SHAPE_INFERENCE_INLINE_BYTES:
        return proto
    light = onnx.ModelProto()
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    g, src = light.graph, proto.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        if _message_bytes(t) <= LARGE_INITIALIZER_BYTES:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


# Reruns of ONNX's shape inference with our types of values it could not type (Importer).
HINT_RERUNS = 64


def _dim_symbol(param: str) -> str:
    s = _SYM.sub("_", param).strip("_") or "d"
    return s if not s[0].isdigit() else "d" + s


def _type_from_value_info(vi, what: str) -> Optional[TensorType]:
    if not vi.type.HasField("tensor_type"):
        raise FrontendError(f"{what}: only tensor values are supported")
    tt = vi.type.tensor_type
    if tt.elem_type == 0:
        return None
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(_dim_symbol(d.dim_param))
        else:
            dims.append("?")
    return TensorType(tuple(dims), _elem_of(tt.elem_type, what))


def check_text_fields(proto: onnx.ModelProto) -> None:
    """Every name in the graph is text. protobuf hands a string field that is not valid UTF-8
    (a damaged file) back as bytes, which no later step expects."""
    g = proto.graph

    def texts():
        yield "graph name", g.name
        for o in proto.opset_import:
            yield "opset_import domain", o.domain
        for kind, infos in (("graph input", g.input), ("graph output", g.output),
                            ("value_info", g.value_info)):
            for vi in infos:
                yield kind, vi.name
                if vi.type.HasField("tensor_type"):
                    for d in vi.type.tensor_type.shape.dim:
                        yield f"{kind} dim", d.dim_param
        for t in g.initializer:
            yield "initializer name", t.name
        for i, n in enumerate(g.node):
            for value in [n.name, n.op_type, n.domain, *n.input, *n.output]:
                yield f"node #{i}", value
            for a in n.attribute:
                yield f"node #{i} attribute", a.name

    for what, value in texts():
        if not isinstance(value, str):
            raise FrontendError(f"{what} {bytes(value)[:40]!r} is not valid UTF-8 text; the "
                                "file may be damaged")


# --------------------------------------------------------------------------------------------
# the importer
# --------------------------------------------------------------------------------------------


class _Importer:
    def __init__(self, proto: onnx.ModelProto):
        check_text_fields(proto)
        self.proto = proto
        self.module = Module(_dim_symbol(proto.graph.name or "model") or "model")
        self.fn = Function("main")
        self.module.add_function(self.fn)
        self.env: dict[str, Value] = {}
        self.opsets = {(o.domain or "ai.onnx"): o.version for o in proto.opset_import}
        if "ai.onnx" not in self.opsets:
            self.opsets["ai.onnx"] = 1 if proto.graph.node else 21
        self.check_versions()
        # Before onnx's shape inference: its C++ aborts the process on some bad declarations.
        self.check_unique_names()
        self.check_declared_dims()
        self.hints = self._onnx_shape_hints()
        # Values ONNX's inference could not type (outputs of contrib ops it does not know,
        # e.g. MatMulNBits) stop its data propagation there: a Reshape whose shape was built
        # from Shape/Gather/Concat after one gets no hint. When one of our results is left
        # with unknown dims, inference runs again with our types of such values given to it
        # (at most HINT_RERUNS times; _sharpen).
        self.hint_reruns = 0
        self.hinted_upto = 0
        self.node: Optional[onnx.NodeProto] = None
        self.node_index = 0

    def check_versions(self) -> None:
        """ir_version and each imported opset must lie in the range the importer knows."""
        lo, hi = IR_VERSION_RANGE
        if not lo <= self.proto.ir_version <= hi:
            raise FrontendError(f"model ir_version {self.proto.ir_version} is not supported "
                                f"(supported: {lo}..{hi})")
        seen = set()
        for o in self.proto.opset_import:
            domain = o.domain or "ai.onnx"
            if domain in seen:
                raise FrontendError(f"opset_import lists domain {domain!r} twice")
            seen.add(domain)
        used = {n.domain or "ai.onnx" for n in self.proto.graph.node}
        # An ai.onnx opset below the lowest supported one imports as that one when every op
        # the model uses has the same definition at both (ONNX's backend cases of ops
        # unchanged since opset 1, Not and And for instance, are written at opset 1).
        version, lowest = self.opsets.get("ai.onnx", 0), OPSET_RANGES["ai.onnx"][0]
        changed = self._changed_since(version) if 1 <= version < lowest else []
        if 1 <= version < lowest and self.proto.graph.node and not changed:
            self.opsets["ai.onnx"] = lowest
        for domain, version in self.opsets.items():
            if domain not in OPSET_RANGES:
                continue  # a domain no node uses is harmless; one that is used fails per node
            lo, hi = OPSET_RANGES[domain]
            if not lo <= version <= hi and (domain == "ai.onnx" or domain in used):
                hint = changed if domain == "ai.onnx" else []
                raise FrontendError(f"opset {version} of domain {domain!r} is not supported "
                                    f"(supported: {lo}..{hi}" + (
                                        f"; an older opset is read as {lo} where its ops are "
                                        f"defined the same, and {', '.join(hint)} changed "
                                        "since" if hint else "") + ")")

    def _changed_since(self, version: int) -> list:
        """The ai.onnx ops of the graph whose definition at ``version`` differs from the one
        at the lowest supported opset (or that one of them lacks)."""
        lowest = OPSET_RANGES["ai.onnx"][0]
        changed = []
        for op in sorted({n.op_type for n in self.proto.graph.node
                          if (n.domain or "ai.onnx") == "ai.onnx"}):
            try:
                same = (onnx.defs.get_schema(op, version).since_version
                        == onnx.defs.get_schema(op, lowest).since_version)
            except onnx.defs.SchemaError:
                same = False
            if not same:
                changed.append(op)
        return changed

    # -- context ---------------------------------------------------------------------------
    def where(self) -> str:
        n = self.node
        domain = n.domain or "ai.onnx"
        name = n.name or f"#{self.node_index}"
        return (f"node {name!r} (op {n.op_type}, domain {domain}, "
                f"opset {self.opsets.get(domain, '?')})")

    def fail(self, msg: str) -> FrontendError:
        return FrontendError(f"{self.where()}: {msg}")

    @property
    def opset(self) -> int:
        return self.opsets["ai.onnx"]

    def _onnx_shape_hints(self, known: Sequence = ()) -> dict[str, TensorType]:
        """ONNX's own shape inference, used to sharpen dims that ours leaves unknown.
        ``known``: value infos of ours to give it (values it could not type itself)."""
        try:  # (a view that cannot be made or inferred gives no hints, as before)
            view = _shape_inference_view(self.proto)
            if known:
                copy = onnx.ModelProto()
                copy.CopyFrom(view)
                copy.graph.value_info.extend(known)
                view = copy
            inferred = onnx.shape_inference.infer_shapes(view, data_prop=True)
        except Exception:
            return {}
        out = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            try:
                t = _type_from_value_info(vi, vi.name)
            except FrontendError:
                continue
            if t is not None:
                out[vi.name] = t
        return out

    # -- values ----------------------------------------------------------------------------
    def get(self, name: str) -> Optional[Value]:
        if name == "":
            return None
        try:
            return self.env[name]
        except KeyError:
            raise self.fail(f"input {name!r} is neither a graph input, an initializer nor "
                            "the output of an earlier node") from None

    def const(self, value: Optional[Value]) -> Optional[np.ndarray]:
        return constant_value(self.module, value)

    def need_const(self, value: Optional[Value], what: str) -> np.ndarray:
        arr = self.const(value)
        if arr is None:
            raise self.fail(f"{what} must be a constant (initializer or Constant) to compile")
        return arr

    def add_constant(self, array: np.ndarray, type: TensorType, hint: str,
                     value_name: Optional[str] = None) -> Value:
        return constant_node(self.fn, self.module, array, type, name_hint=hint,
                             value_name=value_name).result

    def emit(self, op: str, operands: list, attrs: Optional[dict] = None,
             names: Optional[list[str]] = None, n_results: int = 1) -> list[Value]:
        """Create a QIR node, inferring result types (sharpened by ONNX's inference)."""
        attrs = attrs or {}
        for i, v in enumerate(operands):
            formal = missing_operand(op, i) if v is None else None
            if formal is not None:
                raise self.fail(f"{op}: operand #{i} ({formal}) is missing")
        types = [v.type if v is not None else None for v in operands]
        consts = [self.const(v) for v in operands]
        try:
            result_types = infer_types(op, types, attrs, consts)
        except TypeInferenceError as e:
            raise self.fail(str(e)) from None
        if names is None:
            names = [None] * len(result_types)
        result_types = [self._sharpen(t, n) for t, n in zip(result_types, names)]
        fresh = [self.fn.fresh_name(n) if n is not None else None for n in names]
        node = self.fn.make_node(op, operands, result_types, attrs, names=fresh)
        for onnx_name, r in zip(names, node.results):
            if onnx_name is not None:
                self.env[onnx_name] = r
        return node.results

    def _known_value_infos(self) -> list:
        """Our fully known types (dims static or symbolic) of the values ONNX left untyped."""
        out = []
        for name, v in self.env.items():
            t = v.type
            if name in self.hints or "?" in t.shape or t.dtype.name not in _ONNX_TYPE_OF:
                continue
            out.append(onnx.helper.make_tensor_value_info(name, _ONNX_TYPE_OF[t.dtype.name],
                                                          list(t.shape)))
        return out

    def _sharpen(self, t: TensorType, onnx_name: Optional[str]) -> TensorType:
        hint = self.hints.get(onnx_name) if onnx_name else None
        if hint is None and onnx_name and "?" in t.shape and self.hint_reruns < HINT_RERUNS \
                and len(self.env) > self.hinted_upto:
            known = self._known_value_infos()
            self.hinted_upto = len(self.env)
            if known:
                self.hint_reruns += 1
                self.hints = {**self.hints, **self._onnx_shape_hints(known)}
                hint = self.hints.get(onnx_name)
        if hint is None or hint.rank != t.rank or hint.dtype != t.dtype:
            return t
        # A hint of a non-positive size comes from a bad declaration: keep "?" then.
        dims = tuple(h if d == "?" and not (isinstance(h, int) and h <= 0) else d
                     for d, h in zip(t.shape, hint.shape))
        return t.with_shape(dims)

    def outputs_of(self, n: onnx.NodeProto) -> list[Optional[str]]:
        return [o if o else None for o in n.output]

    # -- graph -----------------------------------------------------------------------------
    def check_unique_names(self) -> None:
        """Every value has one definition, as onnxruntime requires.

        onnxruntime refuses a name defined twice by graph inputs or node outputs (or a node
        output that redefines an input or initializer). It takes the last of duplicate
        initializers with a warning; we refuse them, as the model is ambiguous. An
        initializer that is also a graph input (IR < 4 style; an overridable default in
        onnxruntime) is imported as the constant it defaults to.
        """
        g = self.proto.graph
        defined: dict[str, str] = {}
        for vi in g.input:
            if vi.name in defined:
                raise FrontendError(f"graph input {vi.name!r} is declared twice")
            defined[vi.name] = "a graph input"
        inits: set[str] = set()
        for t in g.initializer:
            if t.name in inits:
                raise FrontendError(f"initializer {t.name!r} is defined twice")
            inits.add(t.name)
            defined.setdefault(t.name, "an initializer")
        for i, n in enumerate(g.node):
            for o in n.output:
                if not o:
                    continue
                if o in defined:
                    self.node, self.node_index = n, i
                    raise self.fail(f"output {o!r} is already defined as {defined[o]}")
                defined[o] = f"an output of node {n.name or f'#{i}'!r}"
        self.node = None

    def check_declared_dims(self) -> None:
        """No negative dims anywhere (zero-size tensors are legal, as in onnxruntime)."""
        g = self.proto.graph
        for what, infos in (("graph input", g.input), ("graph output", g.output),
                            ("value_info", g.value_info)):
            for vi in infos:
                if not vi.type.HasField("tensor_type"):
                    continue
                dims = [d.dim_value for d in vi.type.tensor_type.shape.dim
                        if d.HasField("dim_value")]
                if any(d < 0 for d in dims):
                    raise FrontendError(f"{what} {vi.name!r} declares dims {dims}: each must "
                                        "be >= 0")
        for t in g.initializer:
            if any(d < 0 for d in t.dims):
                raise FrontendError(f"initializer {t.name!r} has negative dims {list(t.dims)}")

    def run(self) -> Module:
        g = self.proto.graph
        init_names = {t.name for t in g.initializer}
        for vi in g.input:
            if vi.name in init_names:
                continue
            t = _type_from_value_info(vi, f"graph input {vi.name!r}")
            if t is None:
                raise FrontendError(f"graph input {vi.name!r} has no element type or shape")
            self.env[vi.name] = self.fn.add_arg(vi.name, t)
        for init in g.initializer:
            self.import_initializer(init)
        self.check_all_supported()
        for i, n in enumerate(g.node):
            self.node, self.node_index = n, i
            self.import_node(n)
        self.node = None
        outs, names = [], []
        for o in g.output:
            if o.name not in self.env:
                raise FrontendError(f"graph output {o.name!r} is produced by no node")
            outs.append(self.env[o.name])
            names.append(o.name)
        self.fn.set_outputs(outs, names)
        self.fn.remove_dead_nodes()
        self.module.metadata["onnx"] = {
            "opsets": dict(self.opsets), "producer": self.proto.producer_name,
            "ir_version": self.proto.ir_version}
        return self.module

    def import_initializer(self, init: TensorProto) -> None:
        what = f"initializer {init.name!r}"
        dtype = _elem_of(init.data_type, what)
        try:
            arr = numpy_helper.to_array(init)
        except Exception as e:
            raise FrontendError(f"{what}: cannot read its data: {e}") from None
        t = TensorType(tuple(int(d) for d in arr.shape), dtype)
        self.env[init.name] = self.add_constant(_to_storage(arr, t), t, init.name,
                                                value_name=self.fn.fresh_name(init.name))

    def check_all_supported(self) -> None:
        """Every op of the graph has an importer; else one message lists all the missing
        ones, each with its count and first node names."""
        for i, n in enumerate(self.proto.graph.node):
            if (n.domain or "ai.onnx") not in self.opsets:
                self.node, self.node_index = n, i
                raise self.fail(f"domain {n.domain!r} is not imported by the model's "
                                "opset_import")
        missing = unsupported_nodes(self.proto)
        if missing:
            raise FrontendError(format_unsupported(missing, self.opsets))

    def import_node(self, n: onnx.NodeProto) -> None:
        domain = n.domain or "ai.onnx"
        key = (domain, n.op_type)
        if domain not in self.opsets:
            raise self.fail(f"domain {domain!r} is not imported by the model's opset_import")
        handler = _HANDLERS.get(key)
        if handler is None:
            raise FrontendError(format_unsupported(
                {key: [n.name or f"#{self.node_index}"]}, self.opsets))
        self.check_required_inputs(n, domain)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        try:
            handler(self, n, attrs)
        except FrontendError:
            raise
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise self.fail(f"{type(e).__name__}: {e}") from None

    def check_required_inputs(self, n: onnx.NodeProto, domain: str) -> None:
        """Inputs that ONNX's schema (at the model's opset) requires must be given.

        Handlers read operands positionally; a missing scale or weight would otherwise fail
        deep inside them. Contrib domains have no schema in onnx and check for themselves.
        """
        if domain != "ai.onnx":
            return
        try:
            schema = onnx.defs.get_schema(n.op_type, self.opset, "")
        except onnx.defs.SchemaError:
            return
        single = onnx.defs.OpSchema.FormalParameterOption.Single
        for i, formal in enumerate(schema.inputs):
            if formal.option == single and (i >= len(n.input) or not n.input[i]):
                raise self.fail(f"required input #{i} ({formal.name}) of {n.op_type}-"
                                f"{schema.since_version} is missing")
        given = sum(1 for name in n.input if name)
        if given < schema.min_input:
            raise self.fail(f"{n.op_type}-{schema.since_version} takes at least "
                            f"{schema.min_input} inputs, the node has {given}")


_HANDLERS: dict[tuple[str, str], Callable] = {}


def _handles(*op_types: str, domain: str = "ai.onnx"):
    def wrap(fn):
        for op in op_types:
            _HANDLERS[(domain, op)] = fn
        return fn
    return wrap


def _inputs(imp: _Importer, n: onnx.NodeProto) -> list[Optional[Value]]:
    return [imp.get(name) for name in n.input]


# -- plumbing ------------------------------------------------------------------------------


@_handles("Identity")
def _identity(imp, n, attrs):
    imp.emit("identity", _inputs(imp, n)[:1], names=imp.outputs_of(n))


@_handles("Constant")
def _constant(imp, n, attrs):
    if "value" in attrs:
        t = attrs["value"]
        dtype = _elem_of(t.data_type, imp.where())
        arr = numpy_helper.to_array(t)
    else:
        key = next((k for k in attrs if k.startswith("value_")), None)
        if key is None:
            raise imp.fail(f"Constant without a supported value attribute ({list(attrs)})")
        v = attrs[key]
        if key in ("value_float", "value_floats"):
            arr, dtype = np.array(v, np.float32), elem("f32")
        elif key in ("value_int", "value_ints"):
            arr, dtype = np.array(v, np.int64), elem("i64")
        else:
            raise imp.fail(f"Constant attribute {key} is not supported")
    t = TensorType(tuple(int(d) for d in arr.shape), dtype)
    out = n.output[0]
    imp.env[out] = imp.add_constant(_to_storage(arr, t), t, out,
                                    value_name=imp.fn.fresh_name(out))


@_handles("Cast")
def _cast(imp, n, attrs):
    to = _elem_of(attrs["to"], imp.where())
    a = {"to": to}
    if attrs.get("saturate", 1) != 1:
        a["saturate"] = int(attrs["saturate"])
    imp.emit("cast", _inputs(imp, n)[:1], a, names=imp.outputs_of(n))


# -- elementwise ---------------------------------------------------------------------------

_SIMPLE = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow",
           "Sqrt": "sqrt", "Erf": "erf", "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh",
           "Equal": "equal", "Where": "where", "Exp": "exp", "Neg": "neg", "Abs": "abs",
           "Reciprocal": "reciprocal", "MatMul": "matmul", "Greater": "greater",
           "GreaterOrEqual": "greater_or_equal", "Less": "less", "LessOrEqual": "less_or_equal",
           "And": "and", "Range": "range", "IsNaN": "isnan"}


@_handles(*_SIMPLE)
def _simple(imp, n, attrs):
    imp.emit(_SIMPLE[n.op_type], _inputs(imp, n), names=imp.outputs_of(n))


@_handles("Max", "Min")
def _max_min(imp, n, attrs):
    xs = _inputs(imp, n)
    op = n.op_type.lower()
    acc = xs[0]
    for i, x in enumerate(xs[1:]):
        last = i == len(xs) - 2
        acc = imp.emit(op, [acc, x], names=imp.outputs_of(n) if last else None)[0]
    if len(xs) == 1:
        imp.emit("identity", [acc], names=imp.outputs_of(n))


@_handles("Gelu")
def _gelu(imp, n, attrs):
    approx = attrs.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    a = {"approximate": approx} if approx != "none" else {}
    imp.emit("gelu", _inputs(imp, n)[:1], a, names=imp.outputs_of(n))


@_handles("Gelu", domain="com.microsoft")
def _ms_gelu(imp, n, attrs):
    imp.emit("gelu", _inputs(imp, n)[:1], names=imp.outputs_of(n))


@_handles("Softmax")
def _softmax(imp, n, attrs):
    x = _inputs(imp, n)[0]
    if imp.opset < 13:
        # Opsets 1-11 flatten to 2-D at `axis` and normalize over the flattened rows.
        _coerced_2d(imp, n, x, "softmax", int(attrs.get("axis", 1)))
        return
    else:
        axis = attrs.get("axis", -1)
    imp.emit("softmax", [x], {"axis": int(axis)}, names=imp.outputs_of(n))


@_handles("LayerNormalization")
@_handles("LayerNormalization", domain="com.microsoft")
def _layernorm(imp, n, attrs):
    xs = _inputs(imp, n)
    if any(o for o in n.output[1:]):
        _layernorm_statistics(imp, n, xs[0], int(attrs.get("axis", -1)),
                              float(attrs.get("epsilon", 1e-5)))
    if attrs.get("stash_type", 1) != 1:
        raise imp.fail("LayerNormalization stash_type other than float32 is not supported")
    xs = xs + [None] * (3 - len(xs))
    imp.emit("layernorm", xs[:3], {"axis": int(attrs.get("axis", -1)),
                                   "epsilon": float(attrs.get("epsilon", 1e-5))},
             names=imp.outputs_of(n)[:1])


def _layernorm_statistics(imp, n, x: Value, axis: int, eps: float) -> None:
    """LayerNormalization's optional Mean and InvStdDev outputs (f32, the normalized dims
    kept as 1)."""
    axes = list(range(axis % x.type.rank, x.type.rank))
    v = x if x.type.dtype.name == "f32" else imp.emit("cast", [x], {"to": elem("f32")})[0]
    outs = imp.outputs_of(n) + [None, None]
    red = {"axes": axes, "keepdims": 1}
    mean = imp.emit("reduce_mean", [v], red, names=[outs[1]])[0]
    diff = imp.emit("sub", [v, mean])[0]
    var = imp.emit("reduce_mean", [imp.emit("mul", [diff, diff])[0]], red)[0]
    std = imp.emit("sqrt", [imp.emit("add", [var, _scalar(imp, eps, elem("f32"))])[0]])[0]
    if outs[2] is not None:
        imp.emit("reciprocal", [std], names=[outs[2]])


@_handles("ReduceMean")
def _reduce_mean(imp, n, attrs):
    xs = _inputs(imp, n)
    if imp.opset >= 18:
        axes = [] if len(xs) < 2 or xs[1] is None else \
            [int(a) for a in imp.need_const(xs[1], "ReduceMean axes")]
    else:
        axes = list(attrs.get("axes", []))
    a = {"axes": axes, "keepdims": int(attrs.get("keepdims", 1))}
    if attrs.get("noop_with_empty_axes", 0):
        a["noop_with_empty_axes"] = 1
    imp.emit("reduce_mean", xs[:1], a, names=imp.outputs_of(n))


@_handles("ReduceSum", "ReduceL2")
def _reduce_sum_l2(imp, n, attrs):
    xs = _inputs(imp, n)
    # axes moved from an attribute to an input at opset 13 (ReduceSum) and 18 (the others).
    if imp.opset >= (13 if n.op_type == "ReduceSum" else 18):
        axes = [] if len(xs) < 2 or xs[1] is None else \
            [int(a) for a in imp.need_const(xs[1], f"{n.op_type} axes")]
    else:
        axes = list(attrs.get("axes", []))
    a = {"axes": axes, "keepdims": int(attrs.get("keepdims", 1))}
    if attrs.get("noop_with_empty_axes", 0):
        a["noop_with_empty_axes"] = 1
    op = "reduce_sum" if n.op_type == "ReduceSum" else "reduce_l2"
    imp.emit(op, xs[:1], a, names=imp.outputs_of(n))


@_handles("Clip")
def _clip(imp, n, attrs):
    """min(max(x, lo), hi): exactly ONNX Clip (hi wins where lo > hi; NaN stays NaN)."""
    xs = _inputs(imp, n) + [None, None]
    x = xs[0]
    if imp.opset < 11:
        bounds = [attrs.get("min"), attrs.get("max")]
        bounds = [None if b is None else imp.add_constant(
            np.array(b, x.type.dtype.np_dtype), TensorType((), x.type.dtype), "clip")
            for b in bounds]
    else:
        bounds = xs[1:3]
    y = x
    for op, bound in (("max", bounds[0]), ("min", bounds[1])):
        if bound is not None:
            y = imp.emit(op, [y, bound])[0]
    imp.emit("identity", [y], names=imp.outputs_of(n))


@_handles("GatherElements")
def _gather_elements(imp, n, attrs):
    imp.emit("gather_elements", _inputs(imp, n), {"axis": int(attrs.get("axis", 0))},
             names=imp.outputs_of(n))


@_handles("GatherND")
def _gather_nd(imp, n, attrs):
    a = {"batch_dims": int(attrs["batch_dims"])} if attrs.get("batch_dims", 0) else {}
    imp.emit("gather_nd", _inputs(imp, n), a, names=imp.outputs_of(n))


# -- shape ops -----------------------------------------------------------------------------


@_handles("Reshape")
def _reshape(imp, n, attrs):
    xs = _inputs(imp, n)
    if imp.opset < 5:
        raise imp.fail("Reshape-1 (shape attribute) is not supported; use opset >= 5")
    a = {"allowzero": 1} if attrs.get("allowzero", 0) else {}
    imp.emit("reshape", xs[:2], a, names=imp.outputs_of(n))


@_handles("Transpose")
def _transpose(imp, n, attrs):
    x = _inputs(imp, n)[0]
    perm = list(attrs.get("perm", range(x.type.rank - 1, -1, -1)))
    imp.emit("transpose", [x], {"perm": [int(p) for p in perm]}, names=imp.outputs_of(n))


@_handles("Concat")
def _concat(imp, n, attrs):
    imp.emit("concat", _inputs(imp, n), {"axis": int(attrs["axis"])}, names=imp.outputs_of(n))


@_handles("Split")
def _split(imp, n, attrs):
    xs = _inputs(imp, n)
    x = xs[0]
    axis = int(attrs.get("axis", 0))
    dim = x.type.shape[axis]
    if imp.opset >= 13 and len(xs) > 1 and xs[1] is not None:
        sizes = [int(s) for s in imp.need_const(xs[1], "Split sizes")]
    elif "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]
    else:
        count = int(attrs.get("num_outputs", len(n.output)))
        if not isinstance(dim, int):
            raise imp.fail(f"Split into {count} of a symbolic dim {dim} needs explicit sizes")
        chunk = -(-dim // count)
        sizes = [min(chunk, dim - i * chunk) for i in range(count)]
    imp.emit("split", [x], {"axis": axis, "sizes": sizes}, names=imp.outputs_of(n))


@_handles("Slice")
def _slice(imp, n, attrs):
    xs = _inputs(imp, n)
    if imp.opset < 10:
        x = xs[0]
        starts = np.array(attrs["starts"], np.int64)
        ends = np.array(attrs["ends"], np.int64)
        axes = np.array(attrs.get("axes", range(len(starts))), np.int64)
        i64 = elem("i64")
        ops = [x] + [imp.add_constant(a, TensorType(a.shape, i64), "slice")
                     for a in (starts, ends, axes)]
        imp.emit("slice", ops, names=imp.outputs_of(n))
        return
    imp.emit("slice", xs + [None] * (3 - len(xs)) if len(xs) < 3 else xs,
             names=imp.outputs_of(n))


@_handles("Gather")
def _gather(imp, n, attrs):
    imp.emit("gather", _inputs(imp, n), {"axis": int(attrs.get("axis", 0))},
             names=imp.outputs_of(n))


@_handles("Unsqueeze", "Squeeze")
def _unsqueeze(imp, n, attrs):
    xs = _inputs(imp, n)
    if imp.opset >= 13:
        axes = [] if len(xs) < 2 or xs[1] is None else \
            [int(a) for a in imp.need_const(xs[1], f"{n.op_type} axes")]
    else:
        axes = [int(a) for a in attrs.get("axes", [])]
    if n.op_type == "Unsqueeze" and not axes:
        raise imp.fail("Unsqueeze needs axes")
    imp.emit(n.op_type.lower(), xs[:1], {"axes": axes}, names=imp.outputs_of(n))


@_handles("Shape")
def _shape(imp, n, attrs):
    a = {}
    if "start" in attrs and attrs["start"] != 0:
        a["start"] = int(attrs["start"])
    if "end" in attrs:
        a["end"] = int(attrs["end"])
    imp.emit("shape", _inputs(imp, n)[:1], a, names=imp.outputs_of(n))


@_handles("Expand")
def _expand(imp, n, attrs):
    imp.emit("expand", _inputs(imp, n), names=imp.outputs_of(n))


# -- matrix products -----------------------------------------------------------------------


@_handles("Gemm")
def _gemm(imp, n, attrs):
    xs = _inputs(imp, n)
    a = {}
    for onnx_name, qir_name in (("alpha", "alpha"), ("beta", "beta"),
                                ("transA", "trans_a"), ("transB", "trans_b")):
        if onnx_name in attrs:
            a[qir_name] = attrs[onnx_name]
    if imp.opset < 7 and attrs.get("broadcast", 0) == 0 and len(xs) > 2:
        raise imp.fail("Gemm before opset 7 without broadcast is not supported")
    imp.emit("gemm", xs + [None] * (3 - len(xs)), a, names=imp.outputs_of(n))


@_handles("MatMulInteger")
def _matmul_integer(imp, n, attrs):
    xs = _inputs(imp, n)
    imp.emit("matmul_integer", xs + [None] * (4 - len(xs)), names=imp.outputs_of(n))


@_handles("QLinearMatMul")
def _qlinear_matmul(imp, n, attrs):
    imp.emit("qlinear_matmul", _inputs(imp, n), names=imp.outputs_of(n))


@_handles("QLinearAdd", domain="com.microsoft")
def _qlinear_add(imp, n, attrs):
    """``C = quantize(dequantize(A) + dequantize(B), C_scale, C_zero_point)``, per tensor.

    What ``quantize_static(QOperator)`` writes for a bias Add. ORT evaluates the same sum in
    float with the scale ratios folded, so a code may differ by one where the sum is a tie.
    """
    xs = _inputs(imp, n) + [None] * 8
    a, a_s, a_zp, b, b_s, b_zp, c_s, c_zp = xs[:8]
    if a is None or b is None or a_s is None or b_s is None or c_s is None:
        raise imp.fail("QLinearAdd needs A, A_scale, B, B_scale and C_scale")
    if a.type.dtype.name not in ("u8", "i8") or b.type.dtype != a.type.dtype:
        raise imp.fail(f"QLinearAdd takes u8 or i8 A and B of one type, not "
                       f"{a.type.dtype} and {b.type.dtype}")
    for what, s in (("A_scale", a_s), ("B_scale", b_s), ("C_scale", c_s)):
        if s.type.shape not in ((), (1,)):
            raise imp.fail(f"QLinearAdd {what} must be a scalar, not {s.type.shape}")

    def per_tensor(dtype, scale, zp):
        return QuantScheme(dtype=dtype, scale_type=scale.type.dtype, symmetric=zp is None,
                           zero_point_type=None if zp is None else zp.type.dtype)

    real = [imp.emit("dequantize", [x, s, zp],
                     {"scheme": per_tensor(x.type.dtype, s, zp), "out": s.type.dtype})[0]
            for x, s, zp in ((a, a_s, a_zp), (b, b_s, b_zp))]
    y = imp.emit("add", real)[0]
    imp.emit("quantize", [y, c_s, c_zp], {"scheme": per_tensor(a.type.dtype, c_s, c_zp)},
             names=imp.outputs_of(n))


@_handles("QGemm", domain="com.microsoft")
def _qgemm(imp, n, attrs):
    """``Y = alpha * (dq(A) @ dq(B) + dq(C))`` (onnxruntime's arithmetic: alpha scales the bias
    too) then, with ``y_scale``, quantized: what
    ``quantize_static(QOperator)`` writes for a Gemm (a CNN's classifier).

    Imported as the equivalent Q/DQ graph (dequantize A and B, ``gemm`` with the int32 bias
    dequantized at scale ``a_scale * b_scale`` (zero point 0, onnxruntime's convention),
    quantize), which fuse-dequant and fuse-requant then treat as any QDQ Gemm. ``b_scale`` is
    per tensor or per output column (the axis of B that is N: 0 with transB, else 1).
    """
    xs = _inputs(imp, n) + [None] * 9
    a, a_s, a_zp, b, b_s, b_zp, c, y_s, y_zp = xs[:9]
    if a is None or b is None or a_s is None or b_s is None:
        raise imp.fail("QGemm needs A, a_scale, B and b_scale")
    if a.type.rank != 2 or b.type.rank != 2:
        raise imp.fail(f"QGemm takes 2-D A and B, not {a.type.shape} and {b.type.shape}")
    for what, q in (("A", a), ("B", b)):
        if q.type.dtype.name not in ("u8", "i8"):
            raise imp.fail(f"QGemm {what} must be u8 or i8, not {q.type.dtype}")
    if a_s.type.shape not in ((), (1,)):
        raise imp.fail(f"QGemm a_scale must be a scalar, not {a_s.type.shape}")
    if c is not None and c.type.dtype.name != "i32":
        raise imp.fail(f"QGemm C must be int32, not {c.type.dtype}")
    trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    n_axis = 0 if trans_b else 1
    real_a = imp.emit("dequantize", [a, a_s, a_zp],
                      {"scheme": scheme_for(a.type, a_s, a_zp, 0, 0, imp.where()),
                       "out": a_s.type.dtype})[0]
    real_b = imp.emit("dequantize", [b, b_s, b_zp],
                      {"scheme": scheme_for(b.type, b_s, b_zp, n_axis, 0, imp.where()),
                       "out": b_s.type.dtype})[0]
    bias = None
    if c is not None:  # int32 codes at scale a_scale * b_scale, zero point 0
        c_scale = imp.emit("mul", [a_s, b_s])[0]
        bias = imp.emit("mul", [imp.emit("cast", [c], {"to": a_s.type.dtype})[0], c_scale])[0]
    # onnxruntime scales the bias by alpha too: Y = alpha * (A'B' + C) (beta = alpha)
    alpha = float(attrs.get("alpha", 1.0))
    gemm_attrs = {"alpha": alpha, "beta": alpha, "trans_a": trans_a, "trans_b": trans_b}
    if y_s is None:  # a float output
        imp.emit("gemm", [real_a, real_b, bias], gemm_attrs, names=imp.outputs_of(n))
        return
    y = imp.emit("gemm", [real_a, real_b, bias], gemm_attrs)[0]
    dtype = y_zp.type.dtype if y_zp is not None else elem("u8")
    imp.emit("quantize", [y, y_s, y_zp],
             {"scheme": scheme_for(TensorType(y.type.shape, dtype), y_s, y_zp, 1, 0,
                                   imp.where())},
             names=imp.outputs_of(n))


# -- quantization --------------------------------------------------------------------------


def scheme_for(x_type, scale: Value, zero_point: Optional[Value], axis: int, block_size: int,
               what: str, act_order: bool = False) -> QuantScheme:
    """The QuantScheme of ONNX Q/DQ operands: granularity from the scale's rank and block size."""
    dtype = x_type.dtype
    if scale.type.rank == 0 or (scale.type.shape == (1,) and block_size == 0):
        # A 1-element 1-D scale is per-tensor whatever x's rank (ONNX; onnxruntime's
        # IsScalarOr1ElementVector): per-axis on a 1-D x of N > 1 would need N scales.
        gran = {"granularity": "tensor"}
    elif not -x_type.rank <= axis < x_type.rank:
        # ONNX's range is [-r, r-1]; `axis % r` would silently quantize another axis.
        raise FrontendError(f"{what}: axis={axis} is out of range for a rank-{x_type.rank} "
                            "input")
    elif block_size:
        gran = {"granularity": "group", "axis": axis % max(x_type.rank, 1),
                "block_size": int(block_size)}
    else:
        if scale.type.rank != 1:
            raise FrontendError(f"{what}: per-axis scale must be 1-D, not {scale.type.shape}")
        gran = {"granularity": "channel", "axis": axis % max(x_type.rank, 1)}
    if zero_point is None:
        zp = {"symmetric": True}
    else:
        zp = {"symmetric": False, "zero_point_type": zero_point.type.dtype}
    return QuantScheme(dtype=dtype, scale_type=scale.type.dtype, act_order=act_order,
                       **gran, **zp)


def _check_qdq_operands(imp, quantized, scale: Value, zp: Optional[Value],
                        block_size: int) -> None:
    """Element types of Q/DQ's auxiliary tensors (their shapes: ``infer_types``)."""
    if not scale.type.dtype.is_float:
        raise imp.fail(f"scale must be a float tensor, not {scale.type.dtype}")
    if zp is not None and zp.type.dtype != quantized:
        raise imp.fail(f"zero point is {zp.type.dtype} but the quantized tensor is {quantized}")
    if block_size < 0:
        raise imp.fail(f"block_size={block_size} must be >= 0")


@_handles("DequantizeLinear")
def _dequantize(imp, n, attrs):
    xs = _inputs(imp, n) + [None, None]
    x, scale, zp = xs[0], xs[1], xs[2]
    axis = int(attrs.get("axis", 1))
    _check_qdq_operands(imp, x.type.dtype, scale, zp, int(attrs.get("block_size", 0)))
    if imp.opset < 13 and scale.type.rank not in (0,) and scale.type.shape != (1,):
        raise imp.fail(f"DequantizeLinear-{imp.opset} takes a per-tensor scale only")
    scheme = scheme_for(x.type, scale, zp, axis, int(attrs.get("block_size", 0)), imp.where())
    out = scale.type.dtype
    if attrs.get("output_dtype"):
        out = _elem_of(attrs["output_dtype"], imp.where())
    imp.emit("dequantize", [x, scale, zp], {"scheme": scheme, "out": out},
             names=imp.outputs_of(n))


@_handles("QuantizeLinear")
def _quantize(imp, n, attrs):
    xs = _inputs(imp, n) + [None, None]
    x, scale, zp = xs[0], xs[1], xs[2]
    axis = int(attrs.get("axis", 1))
    if attrs.get("precision", 0) not in (0, None):
        prec = _elem_of(attrs["precision"], imp.where())
        if prec != scale.type.dtype and prec.name != "f32":
            raise imp.fail(f"QuantizeLinear precision={prec} is not supported (only f32)")
    if zp is not None:
        dtype = zp.type.dtype
    elif attrs.get("output_dtype"):
        dtype = _elem_of(attrs["output_dtype"], imp.where())
    else:
        dtype = elem("u8")
    _check_qdq_operands(imp, dtype, scale, zp, int(attrs.get("block_size", 0)))
    fake_x = x.type.replace(dtype=dtype)
    scheme = scheme_for(fake_x, scale, zp, axis, int(attrs.get("block_size", 0)), imp.where())
    a = {"scheme": scheme}
    if attrs.get("saturate", 1) != 1:
        a["saturate"] = int(attrs["saturate"])
    imp.emit("quantize", [x, scale, zp], a, names=imp.outputs_of(n))


@_handles("DynamicQuantizeLinear")
def _dynamic_quantize(imp, n, attrs):
    imp.emit("dynamic_quantize", _inputs(imp, n)[:1], names=imp.outputs_of(n))


def unpack_lsb_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes packed LSB-first along the last axis (MatMulNBits, ONNX int4) → uint8 codes."""
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., :, None] >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


# What onnxruntime's CPU kernel accepts (its MatMulNBits constructor and PrePack checks).
MATMUL_NBITS_BITS = (2, 4, 8)
MATMUL_NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _shape_is(value: Value, *shapes: tuple) -> bool:
    return value.type.shape in shapes


@_handles("MatMulNBits", domain="com.microsoft")
def _matmul_nbits(imp, n, attrs):
    xs = _inputs(imp, n) + [None] * 6
    a, b, scales, zps, g_idx, bias = xs[:6]
    for attr in ("K", "N", "block_size"):
        if attr not in attrs:
            raise imp.fail(f"attribute {attr} is required")
    K, N = int(attrs["K"]), int(attrs["N"])
    bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
    if K < 1 or N < 1:
        raise imp.fail(f"K={K} and N={N} must be >= 1")
    if bits not in MATMUL_NBITS_BITS:
        raise imp.fail(f"bits={bits} is not supported (2, 4 or 8)")
    if block not in MATMUL_NBITS_BLOCK_SIZES:
        raise imp.fail(f"block_size={block} is not supported (16, 32, 64, 128 or 256)")
    if attrs.get("weight_prepacked", 0):
        raise imp.fail("weight_prepacked (GPU-specific layouts) is not supported")
    if a is None or b is None or scales is None:
        raise imp.fail("MatMulNBits needs A, B and scales")
    act = a.type.dtype
    if act.name not in ("f32", "f16", "bf16"):
        raise imp.fail(f"A must be f32, f16 or bf16, not {act}")
    if a.type.rank < 1 or (isinstance(a.type.shape[-1], int) and a.type.shape[-1] != K):
        raise imp.fail(f"A has shape {list(a.type.shape)}; its last dim must be K={K}")
    nblk = -(-K // block)
    blob = block * bits // 8
    if b.type.dtype.name != "u8" or not _shape_is(b, (N, nblk, blob)):
        raise imp.fail(f"B is {b.type}; K={K}, N={N}, bits={bits}, block_size={block} need "
                       f"u8 [{N}, {nblk}, {blob}]")
    if scales.type.dtype != act or not _shape_is(scales, (N * nblk,), (N, nblk)):
        raise imp.fail(f"scales is {scales.type}; need {act} [{N * nblk}] or [{N}, {nblk}]")
    if zps is not None:
        if zps.type.dtype.name == "u8":
            zp_bytes = -(-nblk * bits // 8)
            if not _shape_is(zps, (N * zp_bytes,), (N, zp_bytes)):
                raise imp.fail(f"packed u8 zero_points has shape {list(zps.type.shape)}; "
                               f"need [{N * zp_bytes}] or [{N}, {zp_bytes}]")
        elif zps.type.dtype.name in ("f32", "f16", "bf16"):
            if not _shape_is(zps, (N * nblk,), (N, nblk)):
                raise imp.fail(f"float zero_points has shape {list(zps.type.shape)}; "
                               f"need [{N * nblk}] or [{N}, {nblk}]")
        else:
            raise imp.fail(f"zero_points must be u8 (packed) or float, not {zps.type.dtype}")
    if g_idx is not None and (g_idx.type.dtype.name != "i32" or not _shape_is(g_idx, (K,))):
        raise imp.fail(f"g_idx is {g_idx.type}; need i32 [{K}]")
    if bias is not None and (bias.type.dtype != act or not _shape_is(bias, (N,))):
        raise imp.fail(f"bias is {bias.type}; need {act} [{N}]")
    packed = imp.need_const(b, "MatMulNBits B")
    codes = unpack_lsb_first(packed.reshape(N, nblk * blob), bits, K).T  # [K, N]
    s_arr = imp.need_const(scales, "MatMulNBits scales").reshape(N, nblk)
    s = imp.add_constant(np.ascontiguousarray(s_arr.T), TensorType((nblk, N), scales.type.dtype),
                         f"{n.input[2]}.t")
    act_order, g = False, None
    if g_idx is not None:
        g_arr = imp.need_const(g_idx, "MatMulNBits g_idx").reshape(-1)
        if g_arr.min() < 0 or g_arr.max() >= nblk:
            raise imp.fail(f"g_idx values must lie in [0, {nblk}), found {int(g_arr.min())}.."
                           f"{int(g_arr.max())}")
        if not np.array_equal(g_arr, np.arange(K) // block):
            act_order = True
            g = imp.add_constant(g_arr.astype(np.int32), TensorType((K,), elem("i32")), "g_idx")
    common = dict(scale_type=scales.type.dtype, granularity="group", axis=0, block_size=block,
                  act_order=act_order)
    zp = None
    if zps is None:
        # No zero points means an implied 2^(bits-1): store signed codes, exactly equal.
        w_type = elem(f"i{bits}")
        codes = (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
        scheme = QuantScheme(dtype=w_type, **common)
    else:
        w_type = elem(f"u{bits}")
        z_arr = imp.need_const(zps, "MatMulNBits zero_points")
        if zps.type.dtype.name == "u8":
            z_codes = unpack_lsb_first(z_arr.reshape(N, -1), bits, nblk)  # [N, nblk]
            zp = imp.add_constant(np.ascontiguousarray(z_codes.T), TensorType((nblk, N), w_type),
                                  f"{n.input[3]}.codes")
        else:
            zp = imp.add_constant(np.ascontiguousarray(z_arr.reshape(N, nblk).T),
                                  TensorType((nblk, N), zps.type.dtype), f"{n.input[3]}.t")
        scheme = QuantScheme(dtype=w_type, symmetric=False, zero_point_type=zp.type.dtype,
                             **common)
    w = imp.add_constant(np.ascontiguousarray(codes), TensorType((K, N), w_type),
                         f"{n.input[1]}.codes")
    out = imp.outputs_of(n)[0]
    deq = imp.emit("dequantize", [w, s, zp, g], {"scheme": scheme, "out": a.type.dtype})[0]
    # accuracy_level 0 (unset) and 1 (f32) are float arithmetic: no attribute; 2 (f16),
    # 3 (bf16) and 4 (int8 activations per block) allow a lower precision of A, which the
    # matmul (and the qmatmul that fuse-dequant makes of it) keeps for the backend.
    level = int(attrs.get("accuracy_level", 0))
    if level not in (0, 1, 2, 3, 4):
        raise imp.fail(f"accuracy_level={level} is not one of 0..4")
    mm_attrs = {"accuracy_level": level} if level > 1 else None
    if bias is None:
        imp.emit("matmul", [a, deq], mm_attrs, names=[out])
    else:
        y = imp.emit("matmul", [a, deq], mm_attrs)[0]
        imp.emit("add", [y, bias], names=[out])


# --------------------------------------------------------------------------------------------
# ONNX coverage (issue #13)
# --------------------------------------------------------------------------------------------


def _scalar(imp, value, dtype, hint: str = "c") -> Value:
    """A 0-d constant of ``dtype`` (an ElementType)."""
    return imp.add_constant(np.array(value, dtype.np_dtype), TensorType((), dtype), hint)


def _ints_const(imp, values, hint: str) -> Value:
    arr = np.array(list(values), np.int64)
    return imp.add_constant(arr, TensorType(arr.shape, elem("i64")), hint)


def _opt_input(xs: list, i: int) -> Optional[Value]:
    return xs[i] if len(xs) > i else None


def _const_ints(imp, v: Optional[Value], what: str) -> Optional[list[int]]:
    return None if v is None else [int(a) for a in imp.need_const(v, what).reshape(-1)]


def _axes_of(imp, n, attrs, xs, since: int) -> list[int]:
    """A reduce's axes: the attribute before opset ``since``, the second input from it on."""
    if imp.opset >= since:
        return _const_ints(imp, _opt_input(xs, 1), f"{n.op_type} axes") or []
    return [int(a) for a in attrs.get("axes", [])]


_UNARY = {"Cos": "cos", "Sin": "sin", "Tan": "tan", "Acos": "acos", "Asin": "asin",
          "Atan": "atan", "Cosh": "cosh", "Sinh": "sinh", "Asinh": "asinh", "Acosh": "acosh",
          "Atanh": "atanh", "Log": "log", "Floor": "floor", "Ceil": "ceil", "Round": "round",
          "Sign": "sign", "Softsign": "softsign", "Softplus": "softplus", "Mish": "mish",
          "HardSwish": "hard_swish", "Not": "not", "BitwiseNot": "bitwise_not",
          "Or": "or", "Xor": "xor", "BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or",
          "BitwiseXor": "bitwise_xor", "PRelu": "prelu"}


@_handles(*_UNARY)
def _unary_op(imp, n, attrs):
    imp.emit(_UNARY[n.op_type], _inputs(imp, n), names=imp.outputs_of(n))


_ACTIVATIONS = {"LeakyRelu": "leaky_relu", "Elu": "elu", "Selu": "selu", "Celu": "celu",
                "HardSigmoid": "hard_sigmoid", "ThresholdedRelu": "thresholded_relu",
                "Shrink": "shrink"}


@_handles(*_ACTIVATIONS)
def _activation(imp, n, attrs):
    from qcompiler.ir.ops import ACTIVATION_PARAMS

    op = _ACTIVATIONS[n.op_type]
    params = {p: float(attrs.get(p, default)) for p, default in ACTIVATION_PARAMS[op][1].items()}
    imp.emit(op, _inputs(imp, n)[:1], params, names=imp.outputs_of(n))


@_handles("Swish")
def _swish(imp, n, attrs):
    x = _inputs(imp, n)[0]
    alpha = float(attrs.get("alpha", 1.0))
    scaled = imp.emit("mul", [x, _scalar(imp, alpha, x.type.dtype)])[0] if alpha != 1.0 else x
    s = imp.emit("sigmoid", [scaled])[0]
    imp.emit("mul", [x, s], names=imp.outputs_of(n))


@_handles("IsInf")
def _isinf(imp, n, attrs):
    imp.emit("isinf", _inputs(imp, n), {"detect_positive": int(attrs.get("detect_positive", 1)),
                                        "detect_negative": int(attrs.get("detect_negative", 1))},
             names=imp.outputs_of(n))


@_handles("Mod")
def _mod(imp, n, attrs):
    imp.emit("mod", _inputs(imp, n), {"fmod": int(attrs.get("fmod", 0))}, names=imp.outputs_of(n))


@_handles("BitShift")
def _bit_shift(imp, n, attrs):
    direction = attrs["direction"]
    direction = direction.decode() if isinstance(direction, bytes) else direction
    imp.emit("bit_shift", _inputs(imp, n), {"direction": direction.lower()},
             names=imp.outputs_of(n))


@_handles("Sum", "Mean")
def _sum_mean(imp, n, attrs):
    xs = _inputs(imp, n)
    acc = xs[0]
    for x in xs[1:]:
        acc = imp.emit("add", [acc, x])[0]
    if n.op_type == "Mean" and len(xs) > 1:
        acc = imp.emit("div", [acc, _scalar(imp, len(xs), acc.type.dtype)])[0]
    imp.emit("identity", [acc], names=imp.outputs_of(n))


_REDUCE_KINDS = {"ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod",
                 "ReduceSumSquare": "sum_square", "ReduceL1": "l1", "ReduceLogSum": "log_sum",
                 "ReduceLogSumExp": "log_sum_exp"}


@_handles(*_REDUCE_KINDS)
def _reduce(imp, n, attrs):
    xs = _inputs(imp, n)
    a = {"kind": _REDUCE_KINDS[n.op_type], "axes": _axes_of(imp, n, attrs, xs, 18),
         "keepdims": int(attrs.get("keepdims", 1))}
    if attrs.get("noop_with_empty_axes", 0):
        a["noop_with_empty_axes"] = 1
    imp.emit("reduce", xs[:1], a, names=imp.outputs_of(n))


@_handles("ArgMax", "ArgMin")
def _arg_reduce(imp, n, attrs):
    imp.emit("arg_reduce", _inputs(imp, n)[:1],
             {"kind": n.op_type[3:].lower(), "axis": int(attrs.get("axis", 0)),
              "keepdims": int(attrs.get("keepdims", 1)),
              "select_last_index": int(attrs.get("select_last_index", 0))},
             names=imp.outputs_of(n))


@_handles("CumSum", "CumProd")
def _cumulative(imp, n, attrs):
    xs = _inputs(imp, n)
    axis = _const_ints(imp, xs[1], f"{n.op_type} axis")[0]
    imp.emit("cumulative", xs[:1], {"kind": n.op_type[3:].lower(), "axis": axis,
                                    "exclusive": int(attrs.get("exclusive", 0)),
                                    "reverse": int(attrs.get("reverse", 0))},
             names=imp.outputs_of(n))


def _coerced_2d(imp, n, x: Value, op: str, axis: int) -> None:
    """Softmax-family before opset 13: flatten to 2-D at ``axis``, apply on the last axis,
    reshape back."""
    rank = x.type.rank
    axis = axis % max(rank, 1)
    if axis == rank - 1:
        imp.emit(op, [x], {"axis": -1}, names=imp.outputs_of(n))
        return
    flat = _flatten(imp, x, axis)
    y = imp.emit(op, [flat], {"axis": 1})[0]
    shape = imp.emit("shape", [x])[0]
    imp.emit("reshape", [y, shape], names=imp.outputs_of(n))


@_handles("LogSoftmax", "Hardmax")
def _log_softmax(imp, n, attrs):
    x = _inputs(imp, n)[0]
    op = "log_softmax" if n.op_type == "LogSoftmax" else "hardmax"
    if imp.opset < 13:
        _coerced_2d(imp, n, x, op, int(attrs.get("axis", 1)))
    else:
        imp.emit(op, [x], {"axis": int(attrs.get("axis", -1))}, names=imp.outputs_of(n))


def _flatten(imp, x: Value, axis: int, names=None) -> Value:
    """x as 2-D [prod(dims before axis), prod(dims from axis on)]."""
    shape = x.type.shape
    head, tail = shape[:axis], shape[axis:]
    if all(isinstance(d, int) for d in head):
        target = [int(np.prod(head, dtype=np.int64)), -1]
    elif all(isinstance(d, int) for d in tail):
        target = [-1, int(np.prod(tail, dtype=np.int64))]
    else:
        # Symbolic on both sides: the product of the leading dims at run time.
        dims = imp.emit("shape", [x], {"end": axis})[0]
        lead = imp.emit("reduce", [dims], {"kind": "prod", "axes": [0], "keepdims": 1})[0]
        target_v = imp.emit("concat", [lead, _ints_const(imp, [-1], "flatten")], {"axis": 0})[0]
        return imp.emit("reshape", [x, target_v], names=names)[0]
    return imp.emit("reshape", [x, _ints_const(imp, target, "flatten")], names=names)[0]


@_handles("Flatten")
def _flatten_op(imp, n, attrs):
    x = _inputs(imp, n)[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.type.rank if axis < 0 else axis
    _flatten(imp, x, axis, names=imp.outputs_of(n))


@_handles("ConstantOfShape")
def _constant_of_shape(imp, n, attrs):
    """expand(value, shape): a 0-d constant broadcast to the shape operand."""
    value = attrs.get("value")
    if value is None:
        dtype, arr = elem("f32"), np.zeros((), np.float32)
    else:
        dtype = _elem_of(value.data_type, imp.where())
        arr = numpy_helper.to_array(value).reshape(-1)[0]
    c = imp.add_constant(_to_storage(np.array(arr), TensorType((), dtype)),
                         TensorType((), dtype), "fill")
    imp.emit("expand", [c, _inputs(imp, n)[0]], names=imp.outputs_of(n))


@_handles("Dropout")
def _dropout(imp, n, attrs):
    """Inference: the identity, and a mask of all true."""
    x = _inputs(imp, n)[0]
    outs = imp.outputs_of(n)
    imp.emit("identity", [x], names=outs[:1])
    if len(outs) > 1 and outs[1]:
        true = imp.add_constant(np.array(True), TensorType((), elem("bool")), "mask")
        imp.emit("expand", [true, imp.emit("shape", [x])[0]], names=outs[1:2])


@_handles("CastLike")
def _cast_like(imp, n, attrs):
    x, like = _inputs(imp, n)[:2]
    a = {"to": like.type.dtype}
    if attrs.get("saturate", 1) != 1:
        a["saturate"] = int(attrs["saturate"])
    imp.emit("cast", [x], a, names=imp.outputs_of(n))


@_handles("Size")
def _size(imp, n, attrs):
    x = _inputs(imp, n)[0]
    if x.type.is_static:
        imp.env[n.output[0]] = imp.add_constant(np.array(x.type.numel(), np.int64),
                                                TensorType((), elem("i64")), n.output[0])
        return
    shape = imp.emit("shape", [x])[0]
    imp.emit("reduce", [shape], {"kind": "prod", "axes": [0], "keepdims": 0},
             names=imp.outputs_of(n))


@_handles("Tile")
def _tile(imp, n, attrs):
    imp.emit("tile", _inputs(imp, n)[:2], names=imp.outputs_of(n))


@_handles("Pad")
def _pad(imp, n, attrs):
    xs = _inputs(imp, n)
    x = xs[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    r = x.type.rank
    if imp.opset < 11:
        pads_v = _ints_const(imp, attrs["pads"], "pads")
        value = _scalar(imp, float(attrs.get("value", 0.0)), x.type.dtype, "pad_value")
    else:
        pads_v, value = xs[1], _opt_input(xs, 2)
        axes = _const_ints(imp, _opt_input(xs, 3), "Pad axes")
        if axes is not None:
            pads = _const_ints(imp, pads_v, "Pad pads (with axes)")
            full = [0] * (2 * r)
            for i, a in enumerate(axes):
                a = a % r
                full[a], full[a + r] = pads[i], pads[i + len(axes)]
            pads_v = _ints_const(imp, full, "pads")
    imp.emit("pad", [x, pads_v, value], {"mode": mode}, names=imp.outputs_of(n))


@_handles("Trilu")
def _trilu(imp, n, attrs):
    xs = _inputs(imp, n)
    imp.emit("trilu", [xs[0], _opt_input(xs, 1)], {"upper": int(attrs.get("upper", 1))},
             names=imp.outputs_of(n))


@_handles("TopK")
def _topk(imp, n, attrs):
    xs = _inputs(imp, n)
    k = xs[1] if imp.opset >= 10 else _ints_const(imp, [attrs["k"]], "k")
    imp.emit("topk", [xs[0], k], {"axis": int(attrs.get("axis", -1)),
                                  "largest": int(attrs.get("largest", 1)),
                                  "sorted": int(attrs.get("sorted", 1))},
             names=imp.outputs_of(n))


@_handles("Einsum")
def _einsum(imp, n, attrs):
    eq = attrs["equation"]
    imp.emit("einsum", _inputs(imp, n), {"equation": eq.decode() if isinstance(eq, bytes)
                                         else eq}, names=imp.outputs_of(n))


def _text(v, default: str) -> str:
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else v


@_handles("Resize", "Upsample")
def _resize(imp, n, attrs):
    xs = _inputs(imp, n)
    x = xs[0]
    mode = _text(attrs.get("mode"), "nearest")
    a = {"mode": mode,
         "coordinate_transformation_mode": _text(attrs.get("coordinate_transformation_mode"),
                                                 "half_pixel"),
         "nearest_mode": _text(attrs.get("nearest_mode"), "round_prefer_floor"),
         "cubic_coeff_a": float(attrs.get("cubic_coeff_a", -0.75)),
         "exclude_outside": int(attrs.get("exclude_outside", 0)),
         "extrapolation_value": float(attrs.get("extrapolation_value", 0.0)),
         "antialias": int(attrs.get("antialias", 0)),
         "axes": [int(v) for v in attrs.get("axes", [])],
         "keep_aspect_ratio_policy": _text(attrs.get("keep_aspect_ratio_policy"), "stretch")}
    if mode == "bilinear":  # Upsample-7/9
        a["mode"] = "linear"
    if n.op_type == "Upsample" or imp.opset < 11:
        # Upsample and Resize-10: scales only, asymmetric coordinates, floor rounding.
        a.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        scales = xs[1] if len(xs) > 1 else _float_const(imp, attrs["scales"], "scales")
        imp.emit("resize", [x, None, scales, None], a, names=imp.outputs_of(n))
        return
    xs = xs + [None] * (4 - len(xs))
    imp.emit("resize", xs[:4], a, names=imp.outputs_of(n))


def _float_const(imp, values, hint: str) -> Value:
    arr = np.array(list(values), np.float32)
    return imp.add_constant(arr, TensorType(arr.shape, elem("f32")), hint)


@_handles("OneHot")
def _one_hot(imp, n, attrs):
    imp.emit("one_hot", _inputs(imp, n), {"axis": int(attrs.get("axis", -1))},
             names=imp.outputs_of(n))


@_handles("NonZero")
def _nonzero(imp, n, attrs):
    imp.emit("nonzero", _inputs(imp, n), names=imp.outputs_of(n))


@_handles("ScatterND")
def _scatter_nd(imp, n, attrs):
    imp.emit("scatter_nd", _inputs(imp, n), {"reduction": _text(attrs.get("reduction"), "none")},
             names=imp.outputs_of(n))


@_handles("ScatterElements", "Scatter")
def _scatter_elements(imp, n, attrs):
    imp.emit("scatter_elements", _inputs(imp, n),
             {"axis": int(attrs.get("axis", 0)),
              "reduction": _text(attrs.get("reduction"), "none")}, names=imp.outputs_of(n))


@_handles("DepthToSpace", "SpaceToDepth")
def _depth_space(imp, n, attrs):
    """reshape, transpose, reshape (static N, C, H, W)."""
    x = _inputs(imp, n)[0]
    b = int(attrs["blocksize"])
    if x.type.rank != 4 or not x.type.is_static:
        raise imp.fail(f"{n.op_type} needs a 4-D input of static shape, not {x.type.shape}")
    N, C, H, W = x.type.shape
    if n.op_type == "DepthToSpace":
        if _text(attrs.get("mode"), "DCR") == "DCR":
            mid, perm = [N, b, b, C // (b * b), H, W], [0, 3, 4, 1, 5, 2]
        else:
            mid, perm = [N, C // (b * b), b, b, H, W], [0, 1, 4, 2, 5, 3]
        final = [N, C // (b * b), H * b, W * b]
    elif _text(attrs.get("mode"), "DCR") == "DCR":
        mid, perm = [N, C, H // b, b, W // b, b], [0, 3, 5, 1, 2, 4]
        final = [N, C * b * b, H // b, W // b]
    else:  # CRD
        mid, perm = [N, C, H // b, b, W // b, b], [0, 1, 3, 5, 2, 4]
        final = [N, C * b * b, H // b, W // b]
    y = imp.emit("reshape", [x, _ints_const(imp, mid, "shape")])[0]
    y = imp.emit("transpose", [y], {"perm": perm})[0]
    imp.emit("reshape", [y, _ints_const(imp, final, "shape")], names=imp.outputs_of(n))


@_handles("EyeLike")
def _eye_like(imp, n, attrs):
    x = _inputs(imp, n)[0]
    dtype = _elem_of(attrs["dtype"], imp.where()) if attrs.get("dtype") else x.type.dtype
    imp.emit("eye_like", [x], {"k": int(attrs.get("k", 0)), "dtype": dtype},
             names=imp.outputs_of(n))


@_handles("Compress")
def _compress(imp, n, attrs):
    a = {"axis": int(attrs["axis"])} if "axis" in attrs else {}
    imp.emit("compress", _inputs(imp, n), a, names=imp.outputs_of(n))


@_handles("BitCast")
def _bitcast(imp, n, attrs):
    imp.emit("bitcast", _inputs(imp, n)[:1], {"to": _elem_of(attrs["to"], imp.where())},
             names=imp.outputs_of(n))


# -- normalization -------------------------------------------------------------------------


def _channel_param(imp, p: Value, rank: int) -> Value:
    """A per-channel [C] parameter shaped [C, 1, ...] to broadcast against [N, C, *sp]."""
    return imp.emit("reshape", [p, _ints_const(imp, [-1] + [1] * (rank - 2), "shape")])[0]


def _normalize(imp, x: Value, axes: list[int], eps: float) -> Value:
    """(x - mean) / sqrt(var + eps) over ``axes``, computed in f32 for f16/bf16."""
    dtype = x.type.dtype
    v = x
    if dtype.name in ("f16", "bf16"):
        v = imp.emit("cast", [x], {"to": elem("f32")})[0]
    red = {"axes": axes, "keepdims": 1}
    mean = imp.emit("reduce_mean", [v], red)[0]
    diff = imp.emit("sub", [v, mean])[0]
    var = imp.emit("reduce_mean", [imp.emit("mul", [diff, diff])[0]], red)[0]
    std = imp.emit("sqrt", [imp.emit("add", [var, _scalar(imp, eps, v.type.dtype)])[0]])[0]
    y = imp.emit("div", [diff, std])[0]
    if v is not x:
        y = imp.emit("cast", [y], {"to": dtype})[0]
    return y


@_handles("BatchNormalization")
def _batch_norm(imp, n, attrs):
    """Inference mode: (x - mean) / sqrt(var + eps) * scale + bias per channel."""
    xs = _inputs(imp, n)
    x, scale, bias, mean, var = xs[:5]
    r = x.type.rank
    eps = float(attrs.get("epsilon", 1e-5))
    if attrs.get("training_mode", 0) or any(o for o in n.output[1:]):
        _batch_norm_training(imp, n, x, scale, bias, mean, var, eps,
                             float(attrs.get("momentum", 0.9)))
        return
    m = _channel_param(imp, mean, r) if r > 2 else mean
    v = _channel_param(imp, var, r) if r > 2 else var
    s = _channel_param(imp, scale, r) if r > 2 else scale
    b = _channel_param(imp, bias, r) if r > 2 else bias
    eps_c = _scalar(imp, eps, var.type.dtype)
    std = imp.emit("sqrt", [imp.emit("add", [v, eps_c])[0]])[0]
    y = imp.emit("div", [imp.emit("sub", [x, m])[0], std])[0]
    y = imp.emit("mul", [y, s])[0]
    imp.emit("add", [y, b], names=imp.outputs_of(n)[:1])


def _batch_norm_training(imp, n, x, scale, bias, mean, var, eps: float, momentum: float):
    """training_mode=1 (opset 14+): normalized by the batch's mean and (population) variance
    over every dim but the channels; the running statistics outputs are
    mean * momentum + batch mean * (1 - momentum), and so for var."""
    r = x.type.rank
    red = {"axes": [0] + list(range(2, r)), "keepdims": 1}
    dtype = x.type.dtype
    batch_mean = imp.emit("reduce_mean", [x], red)[0]
    diff = imp.emit("sub", [x, batch_mean])[0]
    batch_var = imp.emit("reduce_mean", [imp.emit("mul", [diff, diff])[0]], red)[0]
    std = imp.emit("sqrt", [imp.emit("add", [batch_var, _scalar(imp, eps, dtype)])[0]])[0]
    y = imp.emit("mul", [imp.emit("div", [diff, std])[0], _channel_param(imp, scale, r)])[0]
    outs = imp.outputs_of(n) + [None] * 2
    imp.emit("add", [y, _channel_param(imp, bias, r)], names=outs[:1])
    for name, running, batch in ((outs[1], mean, batch_mean), (outs[2], var, batch_var)):
        if name is None:
            continue
        stat = imp.emit("reshape", [batch, _ints_const(imp, [-1], "shape")])[0]
        kept = imp.emit("mul", [running, _scalar(imp, momentum, running.type.dtype)])[0]
        new = imp.emit("mul", [stat, _scalar(imp, 1.0 - momentum, dtype)])[0]
        imp.emit("add", [kept, new], names=[name])


@_handles("InstanceNormalization")
def _instance_norm(imp, n, attrs):
    x, scale, bias = _inputs(imp, n)[:3]
    r = x.type.rank
    y = _normalize(imp, x, list(range(2, r)), float(attrs.get("epsilon", 1e-5)))
    y = imp.emit("mul", [y, _channel_param(imp, scale, r)])[0]
    imp.emit("add", [y, _channel_param(imp, bias, r)], names=imp.outputs_of(n))


@_handles("GroupNormalization")
def _group_norm(imp, n, attrs):
    """Opset 21: per-channel scale and bias; opset 18: per-group (repeated over channels)."""
    x, scale, bias = _inputs(imp, n)[:3]
    g = int(attrs["num_groups"])
    if x.type.rank < 3 or not isinstance(x.type.shape[1], int):
        raise imp.fail(f"GroupNormalization needs [N, C, ...] with a static C, not {x.type.shape}")
    c = x.type.shape[1]
    r = x.type.rank
    grouped = imp.emit("reshape", [x, _ints_const(imp, [0, g, -1], "shape")])[0]
    y = _normalize(imp, grouped, [2], float(attrs.get("epsilon", 1e-5)))
    y = imp.emit("reshape", [y, imp.emit("shape", [x])[0]])[0]
    if imp.opset < 21 and scale.type.shape == (g,) and g != c:
        scale = imp.emit("reshape", [imp.emit("expand", [imp.emit("reshape", [
            scale, _ints_const(imp, [g, 1], "shape")])[0], _ints_const(imp, [g, c // g], "shape")])[0],
            _ints_const(imp, [c], "shape")])[0]
        bias = imp.emit("reshape", [imp.emit("expand", [imp.emit("reshape", [
            bias, _ints_const(imp, [g, 1], "shape")])[0], _ints_const(imp, [g, c // g], "shape")])[0],
            _ints_const(imp, [c], "shape")])[0]
    y = imp.emit("mul", [y, _channel_param(imp, scale, r)])[0]
    imp.emit("add", [y, _channel_param(imp, bias, r)], names=imp.outputs_of(n))


@_handles("MeanVarianceNormalization")
def _mvn(imp, n, attrs):
    x = _inputs(imp, n)[0]
    axes = [int(a) for a in attrs.get("axes", [0, 2, 3])]
    dtype = x.type.dtype
    red = {"axes": axes, "keepdims": 1}
    mean = imp.emit("reduce_mean", [x], red)[0]
    diff = imp.emit("sub", [x, mean])[0]
    var = imp.emit("reduce_mean", [imp.emit("mul", [diff, diff])[0]], red)[0]
    std = imp.emit("sqrt", [var])[0]
    # onnx.reference: (x - mean) / (sqrt(var) + 1e-9)
    imp.emit("div", [diff, imp.emit("add", [std, _scalar(imp, 1e-9, dtype)])[0]],
             names=imp.outputs_of(n))


@_handles("LpNormalization")
def _lp_norm(imp, n, attrs):
    x = _inputs(imp, n)[0]
    p = int(attrs.get("p", 2))
    axis = int(attrs.get("axis", -1))
    red = {"axes": [axis], "keepdims": 1}
    if p == 2:
        norm = imp.emit("reduce_l2", [x], red)[0]
    elif p == 1:
        norm = imp.emit("reduce", [x], {"kind": "l1", **red})[0]
    else:
        raise imp.fail(f"LpNormalization p={p} is not supported (1 or 2)")
    # a zero norm gives 0 (onnxruntime, onnx.reference), not 0 / 0
    zero = _scalar(imp, 0, x.type.dtype)
    imp.emit("where", [imp.emit("equal", [norm, zero])[0], zero, imp.emit("div", [x, norm])[0]],
             names=imp.outputs_of(n))


@_handles("RMSNormalization")
def _rms_norm(imp, n, attrs):
    x, scale = _inputs(imp, n)[:2]
    imp.emit("rmsnorm", [x, scale], {"axis": int(attrs.get("axis", -1)),
                                     "epsilon": float(attrs.get("epsilon", 1e-5))},
             names=imp.outputs_of(n))


@_handles("LRN")
def _lrn(imp, n, attrs):
    """x / (bias + alpha / size * sum of squares over `size` neighbouring channels) ** beta:
    the channel window sum as an average pool of x^2 over [size, 1, ...] with zero padding."""
    x = _inputs(imp, n)[0]
    size = int(attrs["size"])
    alpha, beta, bias = (float(attrs.get(k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75),
                                                            ("bias", 1.0)))
    r = x.type.rank
    dtype = x.type.dtype
    sq = imp.emit("mul", [x, x])[0]
    # [N, C, *sp] -> [N, 1, C, *sp] so the channel window is a pool's first spatial dim.
    shaped = imp.emit("unsqueeze", [sq], {"axes": [1]})[0]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    rest = [0] * (r - 2)  # the spatial dims of x: windows of 1
    summed = imp.emit("pool", [shaped], {"kind": "average", "kernel_shape": [size] + [1] * (r - 2),
                                        "strides": [1] * (r - 1), "pads": [lo] + rest + [hi] + rest,
                                        "dilations": [1] * (r - 1), "ceil_mode": 0,
                                        "count_include_pad": 1, "p": 2}, names=[None])[0]
    summed = imp.emit("squeeze", [summed], {"axes": [1]})[0]
    # average * size = the sum; alpha / size * sum = alpha * average.
    denom = imp.emit("add", [_scalar(imp, bias, dtype),
                             imp.emit("mul", [summed, _scalar(imp, alpha, dtype)])[0]])[0]
    denom = imp.emit("pow", [denom, _scalar(imp, beta, dtype)])[0]
    imp.emit("div", [x, denom], names=imp.outputs_of(n))


# -- convolution and pooling ---------------------------------------------------------------


def _explicit_pads(imp, attrs, in_sp: tuple, kernel: list, strides: list, dilations: list,
                   what: str) -> list[int]:
    """pads from ``auto_pad`` (SAME_UPPER / SAME_LOWER / VALID) or the ``pads`` attribute."""
    nsp = len(kernel)
    auto = _text(attrs.get("auto_pad"), "NOTSET")
    if auto in ("NOTSET", ""):
        return [int(p) for p in attrs.get("pads", [0] * (2 * nsp))]
    if auto == "VALID":
        return [0] * (2 * nsp)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise imp.fail(f"{what} auto_pad={auto!r} is not supported")
    begins, ends = [], []
    for i in range(nsp):
        d = in_sp[i]
        if not isinstance(d, int):
            raise imp.fail(f"{what} auto_pad={auto} needs static spatial dims, not {in_sp}")
        out = -(-d // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - d, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


@_handles("Conv", "ConvInteger")
def _conv(imp, n, attrs):
    xs = _inputs(imp, n)
    x, w = xs[0], xs[1]
    nsp = x.type.rank - 2
    kernel = [int(k) for k in attrs.get("kernel_shape", w.type.shape[2:])]
    strides = [int(s) for s in attrs.get("strides", [1] * nsp)]
    dil = [int(d) for d in attrs.get("dilations", [1] * nsp)]
    pads = _explicit_pads(imp, attrs, x.type.shape[2:], kernel, strides, dil, n.op_type)
    a = {"strides": strides, "pads": pads, "dilations": dil, "group": int(attrs.get("group", 1))}
    if n.op_type == "ConvInteger":
        # (x - x_zp) conv (w - w_zp) in i32, the zero points subtracted after widening.
        i32 = elem("i32")
        ops = []
        for v, zp in ((x, _opt_input(xs, 2)), (w, _opt_input(xs, 3))):
            wide = imp.emit("cast", [v], {"to": i32})[0]
            if zp is not None:
                zp_w = imp.emit("cast", [zp], {"to": i32})[0]
                if v is w and zp.type.rank == 1 and zp.type.shape != (1,):
                    zp_w = imp.emit("reshape", [zp_w, _ints_const(imp, [-1] + [1] * (nsp + 1),
                                                                  "shape")])[0]
                wide = imp.emit("sub", [wide, zp_w])[0]
            ops.append(wide)
        imp.emit("conv", ops, a, names=imp.outputs_of(n))
        return
    imp.emit("conv", [x, w, _opt_input(xs, 2)], a, names=imp.outputs_of(n))


@_handles("ConvTranspose")
def _conv_transpose(imp, n, attrs):
    xs = _inputs(imp, n)
    x, w = xs[0], xs[1]
    nsp = x.type.rank - 2
    kernel = [int(k) for k in attrs.get("kernel_shape", w.type.shape[2:])]
    strides = [int(s) for s in attrs.get("strides", [1] * nsp)]
    dil = [int(d) for d in attrs.get("dilations", [1] * nsp)]
    out_pad = [int(p) for p in attrs.get("output_padding", [0] * nsp)]
    auto = _text(attrs.get("auto_pad"), "NOTSET")
    in_sp = x.type.shape[2:]
    if "output_shape" in attrs or auto in ("SAME_UPPER", "SAME_LOWER"):
        if not all(isinstance(d, int) for d in in_sp):
            raise imp.fail(f"ConvTranspose output_shape / auto_pad need static dims, not {in_sp}")
        wanted = [int(s) for s in attrs["output_shape"]][-nsp:] if "output_shape" in attrs \
            else [in_sp[i] * strides[i] for i in range(nsp)]
        begins, ends = [], []
        for i in range(nsp):
            total = strides[i] * (in_sp[i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 \
                - wanted[i]
            if total < 0:
                out_pad[i] -= total  # onnx.reference: a larger output is padding at the end
                total = 0
            small, big = total // 2, total - total // 2
            if auto == "SAME_UPPER":
                begins.append(small), ends.append(big)
            else:  # SAME_LOWER and output_shape without auto_pad
                begins.append(big), ends.append(small)
        pads = begins + ends
    elif auto == "VALID":
        pads = [0] * (2 * nsp)
    else:
        pads = [int(p) for p in attrs.get("pads", [0] * (2 * nsp))]
    imp.emit("conv_transpose", [x, w, _opt_input(xs, 2)],
             {"strides": strides, "pads": pads, "dilations": dil,
              "group": int(attrs.get("group", 1)), "output_padding": out_pad},
             names=imp.outputs_of(n))


@_handles("MaxPool", "AveragePool", "LpPool")
def _pool(imp, n, attrs):
    x = _inputs(imp, n)[0]
    nsp = x.type.rank - 2
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides = [int(s) for s in attrs.get("strides", [1] * nsp)]
    dil = [int(d) for d in attrs.get("dilations", [1] * nsp)]
    ceil_mode = int(attrs.get("ceil_mode", 0))
    auto = _text(attrs.get("auto_pad"), "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        # Pools' SAME output is ceil(d / stride) whatever the kernel (onnx.reference).
        pads = _explicit_pads(imp, attrs, x.type.shape[2:], kernel, strides, dil, n.op_type)
    else:
        pads = _explicit_pads(imp, attrs, x.type.shape[2:], kernel, strides, dil, n.op_type)
    kind = {"MaxPool": "max", "AveragePool": "average", "LpPool": "lp"}[n.op_type]
    a = {"kind": kind, "kernel_shape": kernel, "strides": strides, "pads": pads,
         "dilations": dil, "ceil_mode": ceil_mode,
         "count_include_pad": int(attrs.get("count_include_pad", 0)),
         "p": int(attrs.get("p", 2))}
    outs = imp.outputs_of(n)
    if len(outs) > 1 and outs[1]:
        a.update(indices=1, storage_order=int(attrs.get("storage_order", 0)))
        imp.emit("pool", [x], a, names=outs[:2])
    else:
        imp.emit("pool", [x], a, names=outs[:1])


@_handles("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(imp, n, attrs):
    x = _inputs(imp, n)[0]
    axes = list(range(2, x.type.rank))
    if n.op_type == "GlobalAveragePool":
        imp.emit("reduce_mean", [x], {"axes": axes, "keepdims": 1}, names=imp.outputs_of(n))
    elif n.op_type == "GlobalMaxPool":
        imp.emit("reduce", [x], {"kind": "max", "axes": axes, "keepdims": 1},
                 names=imp.outputs_of(n))
    else:
        if int(attrs.get("p", 2)) != 2:
            raise imp.fail("GlobalLpPool p other than 2 is not supported")
        imp.emit("reduce_l2", [x], {"axes": axes, "keepdims": 1}, names=imp.outputs_of(n))


# -- attention -----------------------------------------------------------------------------


@_handles("RotaryEmbedding")
def _rotary_embedding(imp, n, attrs):
    xs = _inputs(imp, n)
    imp.emit("rotary_embedding", [xs[0], xs[1], xs[2], _opt_input(xs, 3)],
             {"interleaved": int(attrs.get("interleaved", 0)),
              "num_heads": int(attrs.get("num_heads", 0)),
              "rotary_embedding_dim": int(attrs.get("rotary_embedding_dim", 0))},
             names=imp.outputs_of(n))


def _heads_first(imp, x: Value, heads: int) -> Value:
    """[B, S, H*D] -> [B, H, S, D]."""
    y = imp.emit("reshape", [x, _ints_const(imp, [0, 0, heads, -1], "shape")])[0]
    return imp.emit("transpose", [y], {"perm": [0, 2, 1, 3]})[0]


@_handles("Attention")
def _attention(imp, n, attrs):
    """ONNX Attention (opset 23+): 3-D inputs split into heads, past key/value concatenated
    (the present outputs), then the fused ``attention`` op where its semantics fit (a float
    or boolean mask of every key, is_causal with the query block ending at the last key), and
    the decomposition of onnx.reference otherwise (softcap, the qk_matmul_output output,
    nonpad_kv_seqlen, a mask of fewer keys, causal offsets)."""
    xs = _inputs(imp, n) + [None] * 7
    q, k, v, mask, past_k, past_v, nonpad = xs[:7]
    outs = imp.outputs_of(n) + [None] * 4
    window = (int(attrs.get("left_window_size", -1)), int(attrs.get("right_window_size", -1)))
    three_d = q.type.rank == 3
    if three_d:
        hq, hkv = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
        q, k, v = _heads_first(imp, q, hq), _heads_first(imp, k, hkv), _heads_first(imp, v, hkv)
    present_names = outs[1:3]
    if past_k is not None:
        k = imp.emit("concat", [past_k, k], {"axis": 2}, names=present_names[:1])[0]
        v = imp.emit("concat", [past_v, v], {"axis": 2}, names=present_names[1:2])[0]
    else:
        for name, val in zip(present_names, (k, v)):
            if name is not None:
                imp.emit("identity", [val], names=[name])
    d = q.type.shape[3]
    if "scale" in attrs:
        scale = float(attrs["scale"])
    elif isinstance(d, int):
        scale = float(1.0 / np.sqrt(d))
    else:
        raise imp.fail("Attention without scale needs a static head size")
    dtype = q.type.dtype
    causal = int(attrs.get("is_causal", 0))
    sq, skv = q.type.shape[2], k.type.shape[2]
    past_len = past_k.type.shape[2] if past_k is not None else 0
    if mask is not None and mask.type.dtype.name == "bool":
        mask = imp.emit("where", [mask, _scalar(imp, 0.0, dtype), _scalar(imp, -np.inf, dtype)])[0]
    elif mask is not None and mask.type.dtype != dtype:
        mask = imp.emit("cast", [mask], {"to": dtype})[0]
    short_mask = mask is not None and isinstance(mask.type.shape[-1], int) and \
        isinstance(skv, int) and mask.type.shape[-1] < skv
    softcap = float(attrs.get("softcap", 0.0) or 0.0)
    fused_causal = not causal or (isinstance(sq, int) and isinstance(skv, int)
                                  and isinstance(past_len, int) and skv - sq == past_len)
    if softcap == 0.0 and outs[3] is None and nonpad is None and not short_mask and \
            fused_causal and window == (-1, -1):
        y_name = None if three_d else outs[0]
        y = imp.emit("attention", [q, k, v, mask], {"scale": scale, "causal": causal},
                     names=[None if mask is not None else y_name])[0]
        if mask is not None:
            y = _zero_fully_masked_rows(imp, y, mask, causal, sq, skv, past_len, y_name)
    else:
        y = _attention_decomposed(imp, q, k, v, mask, nonpad, scale, causal, window, past_len,
                                  softcap, int(attrs.get("qk_matmul_output_mode", 0)), outs[3],
                                  None if three_d else outs[0])
    if three_d:
        y = imp.emit("transpose", [y], {"perm": [0, 2, 1, 3]})[0]
        imp.emit("reshape", [y, _ints_const(imp, [0, 0, -1], "shape")], names=[outs[0]])


def _zero_fully_masked_rows(imp, y: Value, mask: Value, causal: int, sq, skv, past_len,
                            y_name) -> Value:
    """ONNX Attention's rule for a query row whose every key the bias masks with -inf (an
    all-False boolean mask row, or one that with is_causal leaves no key): a zero output row,
    where the fused ``attention`` op (softmax semantics) gives NaN, or with causal's lowest
    value a weighting of the causally masked keys. Those rows have no key whose bias is above
    -inf; other rows are unchanged. (A count of such keys, not a max and isinf: the ops every
    backend, CUDA included, compiles.)"""
    dtype = mask.type.dtype
    bias = mask
    if causal:
        positional = _positional_bias(imp, None, causal, (-1, -1), sq, skv, past_len, dtype)
        bias = imp.emit("add", [bias, positional])[0]
    open_key = imp.emit("greater", [bias, _scalar(imp, -np.inf, dtype)])[0]
    open_keys = imp.emit("reduce_sum", [imp.emit("cast", [open_key], {"to": dtype})[0]],
                         {"axes": [-1], "keepdims": 1})[0]
    masked = imp.emit("equal", [open_keys, _scalar(imp, 0.0, dtype)])[0]
    zero = _scalar(imp, 0.0, y.type.dtype)
    return imp.emit("where", [masked, zero, y], names=[y_name])[0]


def _attention_decomposed(imp, q, k, v, mask, nonpad, scale, causal, window, past_len,
                          softcap, qk_mode, qk_name, y_name) -> Value:
    """onnx.reference's Attention step by step: q and k each scaled by sqrt(scale), softcap,
    the additive bias (mask, causal, sliding window, padding), a softmax whose fully masked
    rows are 0."""
    dtype = q.type.dtype
    hq, hkv = q.type.shape[1], k.type.shape[1]
    sq, skv, d = q.type.shape[2], k.type.shape[2], k.type.shape[3]
    if isinstance(hq, int) and isinstance(hkv, int) and hq != hkv:
        if not isinstance(v.type.shape[3], int) or not isinstance(d, int):
            raise imp.fail("grouped-query Attention needs static head sizes")
        reps = _ints_const(imp, [1, 1, hq // hkv, 1, 1], "reps")
        k, v = (imp.emit("reshape", [imp.emit("expand", [imp.emit("unsqueeze", [t], {
            "axes": [2]})[0], reps])[0], _ints_const(imp, [0, hq, -1, t.type.shape[3]],
                                                     "shape")])[0] for t in (k, v))
    root = _scalar(imp, float(np.sqrt(scale)), dtype)
    qs = imp.emit("mul", [q, root])[0]
    kt = imp.emit("transpose", [imp.emit("mul", [k, root])[0]], {"perm": [0, 1, 3, 2]})[0]
    scores = imp.emit("matmul", [qs, kt])[0]
    if softcap > 0:
        c = _scalar(imp, softcap, dtype)
        scores = imp.emit("mul", [imp.emit("tanh", [imp.emit("div", [scores, c])[0]])[0], c])[0]
    bias = None
    ninf = _scalar(imp, -np.inf, dtype)
    zero = _scalar(imp, 0.0, dtype)
    if mask is not None:
        missing = skv - mask.type.shape[-1] if isinstance(skv, int) and \
            isinstance(mask.type.shape[-1], int) else 0
        if missing > 0:
            pads = [0] * (2 * mask.type.rank)
            pads[-1] = missing
            mask = imp.emit("pad", [mask, _ints_const(imp, pads, "pads"), ninf],
                            {"mode": "constant"})[0]
        bias = mask
    if causal or window != (-1, -1):
        positional = _positional_bias(imp, nonpad, causal, window, sq, skv, past_len, dtype)
        bias = positional if bias is None else imp.emit("add", [bias, positional])[0]
    if nonpad is not None:
        if not isinstance(skv, int):
            raise imp.fail("Attention nonpad_kv_seqlen needs a static kv length")
        keys = imp.add_constant(np.arange(skv, dtype=np.int64), TensorType((skv,), elem("i64")),
                                "keys")
        lens = imp.emit("unsqueeze", [imp.emit("cast", [nonpad], {"to": elem("i64")})[0]],
                        {"axes": [1]})[0]
        keep = imp.emit("less", [keys, lens])[0]  # [B, Skv]
        pad_bias = imp.emit("where", [keep, zero, ninf])[0]
        pad_bias = imp.emit("unsqueeze", [pad_bias], {"axes": [1, 2]})[0]
        bias = pad_bias if bias is None else imp.emit("add", [bias, pad_bias])[0]
    with_bias = imp.emit("add", [scores, bias])[0] if bias is not None else scores
    probs = imp.emit("softmax", [with_bias], {"axis": -1})[0]
    if bias is not None:
        row_max = imp.emit("reduce", [bias], {"kind": "max", "axes": [-1], "keepdims": 1})[0]
        masked = imp.emit("isinf", [row_max], {"detect_positive": 0, "detect_negative": 1})[0]
        probs = imp.emit("where", [masked, zero, probs])[0]
    if qk_name is not None:
        qk = {2: with_bias, 3: probs}.get(qk_mode, scores)
        imp.emit("identity", [qk], names=[qk_name])
    return imp.emit("matmul", [probs, v], names=[y_name])[0]


def _positional_bias(imp, nonpad, causal: int, window: tuple, sq, skv, past_len,
                     dtype) -> Value:
    """The causal and sliding-window bias (0 where key j is allowed, -inf elsewhere) of
    onnx.reference: query i sits at position p = i + offset and may see keys
    p - left <= j <= p (+ right when not causal; a window side of -1 is unbounded). offset is
    past_len, or per batch nonpad_kv_seqlen[b] - Sq without a past (the external cache):
    then the bias is [B, 1, Sq, Skv], else a constant [Sq, Skv]."""
    if not (isinstance(sq, int) and isinstance(skv, int) and isinstance(past_len, int)):
        raise imp.fail("Attention is_causal / sliding windows need static sequence lengths")
    left, right = window
    if nonpad is None or past_len:
        diff = np.arange(sq)[:, None] + past_len - np.arange(skv)[None, :]  # p - j
        allowed = np.ones(diff.shape, bool)
        if causal:
            allowed &= diff >= 0
        if left >= 0:
            allowed &= diff <= left
        if right >= 0:
            allowed &= -diff <= right
        arr = np.where(allowed, 0.0, -np.inf).astype(dtype.np_dtype)
        return imp.add_constant(arr, TensorType(arr.shape, dtype), "positional")
    i64 = elem("i64")
    # diff[b, i, j] = i + nonpad[b] - Sq - j, computed in the graph (nonpad is an input).
    i_minus_j = np.arange(sq)[:, None] - sq - np.arange(skv)[None, :]
    base = imp.add_constant(i_minus_j.astype(np.int64), TensorType(i_minus_j.shape, i64), "i_j")
    lens = imp.emit("reshape", [imp.emit("cast", [nonpad], {"to": i64})[0],
                                _ints_const(imp, [-1, 1, 1], "shape")])[0]
    diff = imp.emit("add", [base, lens])[0]  # [B, Sq, Skv]
    tests = []
    if causal:
        tests.append(imp.emit("greater_or_equal", [diff, _scalar(imp, 0, i64)])[0])
    if left >= 0:
        tests.append(imp.emit("less_or_equal", [diff, _scalar(imp, left, i64)])[0])
    if right >= 0:
        tests.append(imp.emit("greater_or_equal", [diff, _scalar(imp, -right, i64)])[0])
    allowed = tests[0]
    for t in tests[1:]:
        allowed = imp.emit("and", [allowed, t])[0]
    bias = imp.emit("where", [allowed, _scalar(imp, 0.0, dtype), _scalar(imp, -np.inf, dtype)])[0]
    return imp.emit("unsqueeze", [bias], {"axes": [1]})[0]


# -- sampling, sets, sequences and caches --------------------------------------------------


@_handles("GridSample")
def _grid_sample(imp, n, attrs):
    """Opset 16's bilinear / bicubic are opset 20's linear / cubic."""
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(_text(attrs.get("mode"), "linear"),
                                                          _text(attrs.get("mode"), "linear"))
    imp.emit("grid_sample", _inputs(imp, n)[:2],
             {"mode": mode, "padding_mode": _text(attrs.get("padding_mode"), "zeros"),
              "align_corners": int(attrs.get("align_corners", 0))}, names=imp.outputs_of(n))


@_handles("AffineGrid")
def _affine_grid(imp, n, attrs):
    """theta [N, nd, nd + 1] applied to the constant homogeneous base grid of `size`
    ([*sp, nd + 1], x first): base [P, nd + 1] @ theta^T -> [N, P, nd] -> [N, *sp, nd]."""
    theta, size_v = _inputs(imp, n)[:2]
    size = _const_ints(imp, size_v, "AffineGrid size")
    sp = size[2:]
    if len(sp) not in (2, 3):
        raise imp.fail(f"AffineGrid size {size} is not 2-D or 3-D")
    align = int(attrs.get("align_corners", 0))
    axes = []
    for d in sp:  # onnx.reference's arange steps, evaluated in float64
        axes.append(np.linspace(-1.0, 1.0, d) if align and d > 1 else
                    (np.arange(d) * 2.0 + 1.0) / d - 1.0 if not align else np.full(1, -1.0))
    mesh = np.meshgrid(*axes, indexing="ij")  # [*sp] each, slowest dim first
    base = np.stack([m.reshape(-1) for m in reversed(mesh)] + [np.ones(mesh[0].size)], axis=1)
    dtype = theta.type.dtype
    base_c = imp.add_constant(base.astype(dtype.np_dtype), TensorType(base.shape, dtype), "grid")
    theta_t = imp.emit("transpose", [theta], {"perm": [0, 2, 1]})[0]
    points = imp.emit("matmul", [base_c, theta_t])[0]
    imp.emit("reshape", [points, _ints_const(imp, [size[0], *sp, len(sp)], "shape")],
             names=imp.outputs_of(n))


@_handles("CenterCropPad")
def _center_crop_pad(imp, n, attrs):
    """A centered slice where the target is smaller, zero padding (the extra element at the
    end) where it is larger."""
    x, shape_v = _inputs(imp, n)[:2]
    shape = _const_ints(imp, shape_v, "CenterCropPad shape")
    r = x.type.rank
    axes = [int(a) % r for a in attrs.get("axes", range(r))]
    if len(axes) != len(shape) or any(not isinstance(x.type.shape[a], int) for a in axes):
        raise imp.fail(f"CenterCropPad needs static dims on axes {axes} for shape {shape}")
    starts, ends, crop_axes, pads = [], [], [], [0] * (2 * r)
    for a, want in zip(axes, shape):
        d = x.type.shape[a]
        if want < d:
            begin = (d - want) // 2
            starts.append(begin), ends.append(begin + want), crop_axes.append(a)
        elif want > d:
            pads[a] = (want - d) // 2
            pads[a + r] = want - d - pads[a]
    y = x
    if crop_axes:
        y = imp.emit("slice", [x, _ints_const(imp, starts, "starts"),
                               _ints_const(imp, ends, "ends"),
                               _ints_const(imp, crop_axes, "axes")])[0]
    if any(pads):
        y = imp.emit("pad", [y, _ints_const(imp, pads, "pads"),
                             _scalar(imp, 0, x.type.dtype)], {"mode": "constant"})[0]
    imp.emit("identity", [y], names=imp.outputs_of(n))


@_handles("Col2Im")
def _col2im(imp, n, attrs):
    xs = _inputs(imp, n)
    nsp = len(_const_ints(imp, xs[1], "Col2Im image_shape"))
    imp.emit("col2im", xs[:3], {"strides": [int(s) for s in attrs.get("strides", [1] * nsp)],
                                "pads": [int(p) for p in attrs.get("pads", [0] * (2 * nsp))],
                                "dilations": [int(d) for d in attrs.get("dilations",
                                                                        [1] * nsp)]},
             names=imp.outputs_of(n))


@_handles("Unique")
def _unique(imp, n, attrs):
    a = {"sorted": int(attrs.get("sorted", 1))}
    if "axis" in attrs:
        a["axis"] = int(attrs["axis"])
    outs = imp.outputs_of(n)
    imp.emit("unique", _inputs(imp, n)[:1], a, names=outs + [None] * (4 - len(outs)),
             n_results=4)


@_handles("ReverseSequence")
def _reverse_sequence(imp, n, attrs):
    imp.emit("reverse_sequence", _inputs(imp, n)[:2],
             {"batch_axis": int(attrs.get("batch_axis", 1)),
              "time_axis": int(attrs.get("time_axis", 0))}, names=imp.outputs_of(n))


@_handles("TensorScatter")
def _tensor_scatter(imp, n, attrs):
    xs = _inputs(imp, n)
    imp.emit("tensor_scatter", [xs[0], xs[1], _opt_input(xs, 2)],
             {"mode": _text(attrs.get("mode"), "linear"), "axis": int(attrs.get("axis", -2))},
             names=imp.outputs_of(n))


@_handles("SwiGLU")
def _swiglu(imp, n, attrs):
    """a * sigmoid(alpha * a) * b."""
    a, b = _inputs(imp, n)[:2]
    alpha = float(attrs.get("alpha", 1.0))
    gate_in = a if alpha == 1.0 else imp.emit("mul", [a, _scalar(imp, alpha, a.type.dtype)])[0]
    swish = imp.emit("mul", [a, imp.emit("sigmoid", [gate_in])[0]])[0]
    imp.emit("mul", [swish, b], names=imp.outputs_of(n))


@_handles("CausalConvWithState")
def _causal_conv_with_state(imp, n, attrs):
    """past_state (zeros when absent) + input along time, a depthwise conv of kernel k without
    padding (+ bias, optional SiLU); present_state is the last k - 1 steps."""
    xs = _inputs(imp, n) + [None] * 4
    x, w, b, past = xs[:4]
    act = _text(attrs.get("activation"), "none")
    if act not in ("none", "silu", "swish"):
        raise imp.fail(f"CausalConvWithState activation {act!r} is not none, silu or swish")
    k, c = w.type.shape[2], w.type.shape[0]
    if not isinstance(k, int) or not isinstance(c, int) or x.type.rank != 3:
        raise imp.fail(f"CausalConvWithState needs [B, C, L] input and a static [C, 1, k] "
                       f"weight, not {x.type.shape} and {w.type.shape}")
    if past is not None:
        padded = imp.emit("concat", [past, x], {"axis": 2})[0]
    else:
        padded = imp.emit("pad", [x, _ints_const(imp, [0, 0, k - 1, 0, 0, 0], "pads"),
                                  _scalar(imp, 0, x.type.dtype)], {"mode": "constant"})[0]
    outs = imp.outputs_of(n) + [None]
    y = imp.emit("conv", [padded, w, b], {"strides": [1], "pads": [0, 0], "dilations": [1],
                                         "group": c}, names=[None if act != "none" else outs[0]])[0]
    if act != "none":
        imp.emit("mul", [y, imp.emit("sigmoid", [y])[0]], names=outs[:1])
    if outs[1] is not None:
        start = -(k - 1) if k > 1 else 1 << 62  # k = 1: an empty state
        imp.emit("slice", [padded, _ints_const(imp, [start], "starts"),
                           _ints_const(imp, [1 << 62], "ends"), _ints_const(imp, [2], "axes")],
                 names=outs[1:2])


@_handles("LinearAttention")
def _linear_attention(imp, n, attrs):
    """chunk_size is a tuning hint without effect on the result."""
    xs = _inputs(imp, n) + [None] * 6
    outs = imp.outputs_of(n) + [None]
    imp.emit("linear_attention", xs[:6],
             {"q_num_heads": int(attrs["q_num_heads"]), "kv_num_heads": int(attrs["kv_num_heads"]),
              "scale": float(attrs.get("scale", 0.0)),
              "update_rule": _text(attrs.get("update_rule"), "gated_delta")},
             names=outs[:2], n_results=2)


@_handles("DeformConv")
def _deform_conv(imp, n, attrs):
    xs = _inputs(imp, n) + [None] * 5
    w = xs[1]
    kernel = [int(k) for k in attrs.get("kernel_shape", w.type.shape[2:])]
    if len(kernel) != 2 or not all(isinstance(k, int) for k in kernel):
        raise imp.fail(f"DeformConv is supported in 2-D with a static kernel, not {kernel}")
    imp.emit("deform_conv", xs[:5],
             {"strides": [int(s) for s in attrs.get("strides", [1, 1])],
              "pads": [int(p) for p in attrs.get("pads", [0, 0, 0, 0])],
              "dilations": [int(d) for d in attrs.get("dilations", [1, 1])],
              "group": int(attrs.get("group", 1)),
              "offset_group": int(attrs.get("offset_group", 1))}, names=imp.outputs_of(n))


@_handles("Det")
def _det(imp, n, attrs):
    imp.emit("det", _inputs(imp, n)[:1], names=imp.outputs_of(n))


@_handles("MaxUnpool")
def _max_unpool(imp, n, attrs):
    """x scattered at its indices into the shape a MaxPool of these attributes came from;
    a larger output_shape pads zeros at the ends (onnx.reference)."""
    xs = _inputs(imp, n)
    x = xs[0]
    nsp = x.type.rank - 2
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides = [int(s) for s in attrs.get("strides", [1] * nsp)]
    pads = [int(p) for p in attrs.get("pads", [0] * (2 * nsp))]
    sp = x.type.shape[2:]
    if not all(isinstance(d, int) for d in sp):
        raise imp.fail(f"MaxUnpool needs static spatial dims, not {x.type.shape}")
    inferred = [(sp[i] - 1) * strides[i] - pads[i] - pads[i + nsp] + kernel[i]
                for i in range(nsp)]
    wanted = _const_ints(imp, _opt_input(xs, 2), "MaxUnpool output_shape")
    names = imp.outputs_of(n)
    y = imp.emit("max_unpool", [x, xs[1]], {"output_shape": inferred},
                 names=None if wanted else names)[0]
    if wanted:
        extra = [w - d for w, d in zip(wanted[2:], inferred)]
        if any(e < 0 for e in extra):
            raise imp.fail(f"MaxUnpool output_shape {wanted} is smaller than {inferred}")
        imp.emit("pad", [y, _ints_const(imp, [0] * (nsp + 2) + [0, 0] + extra, "pads"),
                         _scalar(imp, 0, x.type.dtype)], {"mode": "constant"}, names=names)


# -- recurrent ops -------------------------------------------------------------------------

_RECURRENT_DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"],
                           "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# ONNX's activation parameters: alpha, beta defaults of the functions that take them
_ACT_PARAMS = {"affine": (1.0, 0.0), "leakyrelu": (0.01, None), "thresholdedrelu": (1.0, None),
               "scaledtanh": (1.0, 1.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, None)}


@_handles("RNN", "GRU", "LSTM")
def _recurrent(imp, n, attrs):
    """One ``recurrent`` node; each activation gets its alpha / beta from
    activation_alpha / activation_beta in order, among the activations that take one
    (onnxruntime's reading), else ONNX's default."""
    xs = _inputs(imp, n) + [None] * 8
    direction = _text(attrs.get("direction"), "forward")
    dirs = 2 if direction == "bidirectional" else 1
    names = [_text(a, "") for a in attrs.get("activations", [])] or \
        _RECURRENT_DEFAULT_ACTS[n.op_type] * dirs
    if int(attrs.get("input_forget", 0)):
        raise imp.fail("LSTM input_forget=1 is not supported")
    alphas = [float(v) for v in attrs.get("activation_alpha", [])]
    betas = [float(v) for v in attrs.get("activation_beta", [])]
    acts, act_alpha, act_beta = [], [], []
    for name in names:
        key = name.lower()
        alpha, beta = _ACT_PARAMS.get(key, (None, None))
        if alpha is not None and alphas:
            alpha = alphas.pop(0)
        if beta is not None and betas:
            beta = betas.pop(0)
        acts.append(key)
        act_alpha.append(alpha if alpha is not None else 0.0)
        act_beta.append(beta if beta is not None else 0.0)
    w = xs[1]
    hidden = int(attrs["hidden_size"]) if "hidden_size" in attrs else xs[2].type.shape[2]
    if not isinstance(hidden, int):
        raise imp.fail(f"{n.op_type} needs hidden_size or a static R")
    kind = n.op_type.lower()
    outs = imp.outputs_of(n)
    n_results = 3 if kind == "lstm" else 2
    imp.emit("recurrent", [xs[0], w, xs[2], xs[3], xs[4], xs[5],
                           xs[6] if kind == "lstm" else None, xs[7] if kind == "lstm" else None],
             {"kind": kind, "direction": direction, "hidden_size": hidden,
              "layout": int(attrs.get("layout", 0)), "activations": ",".join(acts),
              "activation_alpha": act_alpha, "activation_beta": act_beta,
              "clip": float(attrs.get("clip", 0.0)),
              "linear_before_reset": int(attrs.get("linear_before_reset", 0))},
             names=(outs + [None] * 3)[:n_results], n_results=n_results)

def unsupported_nodes(proto: onnx.ModelProto) -> dict[tuple[str, str], list[str]]:
    """(domain, op_type) -> names of the nodes (``#index`` when unnamed) that no importer
    handles, in graph order."""
    missing: dict[tuple[str, str], list[str]] = {}
    for i, n in enumerate(proto.graph.node):
        key = (n.domain or "ai.onnx", n.op_type)
        if key not in _HANDLERS:
            missing.setdefault(key, []).append(n.name or f"#{i}")
    return missing


def format_unsupported(missing: dict, opsets: dict, shown: int = 3) -> str:
    """``unsupported ops: Det (ai.onnx opset 21) x2 nodes 'a', 'b'; ...`` on one line."""
    parts = []
    for (domain, op), names in missing.items():
        listed = ", ".join(repr(x) for x in names[:shown])
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        noun = "node" if len(names) == 1 else "nodes"
        parts.append(f"{op} ({domain} opset {opsets.get(domain, '?')}) x{len(names)} {noun} "
                     f"{listed}{more}")
    return "unsupported ops: " + "; ".join(parts)


def coverage_report(model: Union[str, os.PathLike, bytes, onnx.ModelProto]) -> tuple[bool, str]:
    """What ``qcompile --check`` prints: every op of the model with its node count, marked
    supported or not (nothing is imported or compiled); True when all are supported."""
    proto = read_model(model)
    opsets = {(o.domain or "ai.onnx"): o.version for o in proto.opset_import}
    counts: dict[tuple[str, str], int] = {}
    for n in proto.graph.node:
        key = (n.domain or "ai.onnx", n.op_type)
        counts[key] = counts.get(key, 0) + 1
    missing = unsupported_nodes(proto)
    lines = [f"{len(counts)} ops in {len(proto.graph.node)} nodes; "
             f"{len(counts) - len(missing)} supported, {len(missing)} not"]
    for (domain, op), count in sorted(counts.items()):
        mark = "unsupported" if (domain, op) in missing else "ok"
        name = op if domain == "ai.onnx" else f"{domain}.{op}"
        lines.append(f"  {mark:11s}  {name} (opset {opsets.get(domain, '?')}) x{count}")
    if missing:
        lines.append(format_unsupported(missing, opsets))
    return not missing, "\n".join(lines) + "\n"


def supported_ops() -> list[str]:
    """Every (domain, op_type) the importer accepts, as ``op`` or ``domain.op``."""
    return sorted(op if d == "ai.onnx" else f"{d}.{op}" for d, op in _HANDLERS)


def load(model: Union[str, os.PathLike, bytes, onnx.ModelProto]) -> Module:
    """Import an ONNX model (path, bytes or ModelProto) as a QIR module."""
    proto = read_model(model)
    return _Importer(proto).run()


# onnxruntime's com.microsoft contrib ops register into _HANDLERS from their own module.
from qcompiler.frontends import onnx_contrib as _onnx_contrib  # noqa: E402,F401  (registers)


# --------------------------------------------------------------------------------------------
# CNN (issue #15): QLinearConv
# --------------------------------------------------------------------------------------------


@_handles("QLinearConv")
def _qlinear_conv(imp, n, attrs):
    """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B) -> one ``qconv``
    with ``out=quant`` and float requantization (onnxruntime's arithmetic)."""
    xs = _inputs(imp, n) + [None] * 9
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = xs[:9]
    if x_zp is None or y_zp is None:
        raise imp.fail("QLinearConv without x_zero_point or y_zero_point is not supported")
    nsp = x.type.rank - 2
    kernel = [int(k) for k in attrs.get("kernel_shape", w.type.shape[2:])]
    strides = [int(s) for s in attrs.get("strides", [1] * nsp)]
    dil = [int(d) for d in attrs.get("dilations", [1] * nsp)]
    pads = _explicit_pads(imp, attrs, x.type.shape[2:], kernel, strides, dil, n.op_type)
    imp.emit("qconv", [x, w, x_scale, x_zp, w_scale, w_zp, bias, y_scale, y_zp],
             {"strides": strides, "pads": pads, "dilations": dil,
              "group": int(attrs.get("group", 1)), "out": "quant", "requant": "float"},
             names=imp.outputs_of(n))
