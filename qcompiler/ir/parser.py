"""Parser of the textual QIR written by ``qcompiler.ir.printer``.

``parse_module(text, constants)`` rebuilds the module; ``constants`` is the side table (the
artifact's weights file). Without it, side-table constants are declared by name and type only,
which is enough to print, verify and transform the graph but not to run it.
"""
from __future__ import annotations

import json
import re
from typing import Optional

import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir.core import Function, Module
from qcompiler.ir.ops import OPS
from qcompiler.ir.types import ELEMENT_TYPES, Layout, QuantScheme, TensorType, elem


class ParseError(InputError):
    """Text that is not valid QIR; the message names the line and column."""


MAX_NESTING = 64  # brackets inside attribute values and layouts; deeper text is refused


def _cut(text: str, limit: int = 60) -> str:
    """A name for an error message, cut to keep the message one short line."""
    return text if len(text) <= limit else text[:limit] + "..."


def _short(text: str, limit: int = 60) -> str:
    """A token or name for an error message: quoted and cut to keep the message one line."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit] + "...'"


_TOKEN = re.compile(r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<arrow>->)
  | (?P<value>%(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_.]+))
  | (?P<symbol>@[A-Za-z0-9_.]+)
  | (?P<hash>\#[a-z]+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:(?:inf|nan)\b|[0-9]+(?:\.[0-9]*)?(?:e[-+]?[0-9]+)?))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*|\?)
  | (?P<punct>[{}()\[\]<>,:=])
""", re.VERBOSE)


class _Tokens:
    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ParseError(f"{self._where(pos)}: unexpected character {text[pos]!r}")
            if m.lastgroup != "ws":
                self.toks.append((m.lastgroup, m.group(), pos))
            pos = m.end()
        self.i = 0

    def _where(self, pos: int) -> str:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {col}"

    def peek(self, k: int = 0) -> tuple[str, str, int]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "", len(self.text))

    def next(self) -> tuple[str, str, int]:
        tok = self.peek()
        self.i += 1
        return tok

    def error(self, msg: str) -> ParseError:
        kind, text, pos = self.peek()
        return ParseError(f"{self._where(pos)}: {msg} (found {_short(text or 'end of input')})")

    def expect(self, text: str) -> None:
        if self.peek()[1] != text:
            raise self.error(f"expected {text!r}")
        self.i += 1

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text:
            self.i += 1
            return True
        return False

    def expect_kind(self, kind: str) -> str:
        k, text, _ = self.peek()
        if k != kind:
            raise self.error(f"expected a {kind}")
        self.i += 1
        return text


def _json_string(text: str) -> str:
    """A quoted string token; a bad escape is a parse error, not a JSONDecodeError."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ParseError(f"bad string {_short(text)}: {e}") from None
    if not isinstance(value, str):
        raise ParseError(f"bad string {_short(text)}")
    return value


def _value_name(tok: str) -> str:
    body = tok[1:]
    return _json_string(body) if body.startswith('"') else body


def _number(text: str):
    if any(c in text for c in ".en") or "inf" in text:
        return float(text)
    return int(text)


class _Parser:
    def __init__(self, text: str, constants: Optional[dict]):
        self.t = _Tokens(text)
        self.constants = constants
        self.depth = 0  # nesting of attribute values and layout parameters

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.t.error(f"nested deeper than {MAX_NESTING} levels")

    def int_number(self, what: str, lowest: Optional[int] = None) -> int:
        """An integer token (a dimension, an axis, a block size)."""
        try:
            value = int(self.t.expect_kind("number"))
        except ValueError:
            self.t.i -= 1
            raise self.t.error(f"{what} must be an integer") from None
        if lowest is not None and value < lowest:
            self.t.i -= 1
            raise self.t.error(f"{what} must be >= {lowest}")
        return value

    # -- types -----------------------------------------------------------------------------
    def elem_type(self):
        name = self.t.expect_kind("ident")
        if name not in ELEMENT_TYPES:
            raise ParseError(f"unknown element type {name!r}")
        return ELEMENT_TYPES[name]

    def dim(self):
        kind, text, _ = self.t.peek()
        if kind == "number":
            return self.int_number("a dimension", lowest=0)
        self.t.next()
        if kind == "ident":
            return text
        self.t.i -= 1
        raise self.t.error("expected a dimension")

    def tensor_type(self) -> TensorType:
        if self.t.expect_kind("ident") != "tensor":
            raise self.t.error("expected 'tensor'")
        self.t.expect("<")
        self.t.expect("[")
        shape = []
        while not self.t.accept("]"):
            shape.append(self.dim())
            if not self.t.accept(","):
                self.t.expect("]")
                break
        self.t.expect(",")
        dtype = self.elem_type()
        quant = layout = None
        while self.t.accept(","):
            kind, text, _ = self.t.peek()
            if text == "#quant":
                quant = self.quant_scheme()
            elif text == "#layout":
                layout = self.layout()
            else:
                raise self.t.error("expected #quant or #layout")
        self.t.expect(">")
        try:
            return TensorType(tuple(shape), dtype, quant, layout)
        except ValueError as e:
            raise self.t.error(f"bad tensor type: {e}") from None

    def quant_scheme(self) -> QuantScheme:
        self.t.expect("#quant")
        self.t.expect("<")
        dtype = self.elem_type()
        self.t.expect(",")
        sym = self.t.expect_kind("ident")
        if sym not in ("symmetric", "affine"):
            raise self.t.error("expected symmetric or affine")
        fields: dict = {"dtype": dtype, "symmetric": sym == "symmetric"}
        while self.t.accept(","):
            key = self.t.expect_kind("ident")
            if key == "per_tensor":
                fields["granularity"] = "tensor"
            elif key in ("per_channel", "per_group"):
                fields["granularity"] = "channel" if key == "per_channel" else "group"
                self.t.expect("(")
                while True:
                    k = self.t.expect_kind("ident")
                    self.t.expect("=")
                    v = self.int_number(k)
                    fields["axis" if k == "axis" else "block_size"] = v
                    if not self.t.accept(","):
                        break
                self.t.expect(")")
            elif key == "act_order":
                fields["act_order"] = True
            elif key in ("scale", "zp"):
                self.t.expect("=")
                fields["scale_type" if key == "scale" else "zero_point_type"] = self.elem_type()
            elif key == "implied_zp":
                self.t.expect("=")
                fields["implied_zero_point"] = self.int_number("implied_zp")
            else:
                raise ParseError(f"unknown quant scheme field {_short(key)}")
        self.t.expect(">")
        try:
            return QuantScheme(**fields)
        except (ValueError, TypeError) as e:
            raise self.t.error(f"bad quant scheme: {e}") from None

    def layout(self) -> Layout:
        self.t.expect("#layout")
        self.t.expect("<")
        name = self.t.expect_kind("ident")
        params = []
        while self.t.accept(","):
            key = self.t.expect_kind("ident")
            self.t.expect("=")
            params.append((key, self.layout_param()))
        self.t.expect(">")
        try:
            return Layout(name, tuple(params))
        except (ValueError, TypeError) as e:
            raise self.t.error(f"bad layout: {e}") from None

    def layout_param(self):
        kind, text, _ = self.t.peek()
        if text == "[":
            self.t.next()
            self.enter()
            items = []
            while not self.t.accept("]"):
                if self.t.peek()[0] == "eof":
                    raise self.t.error("expected ']'")
                items.append(self.layout_param())
                self.t.accept(",")
            self.depth -= 1
            return tuple(items)
        self.t.next()
        if kind == "number":
            return _number(text)
        if kind == "string":
            return _json_string(text)
        return text

    # -- attributes ------------------------------------------------------------------------
    def attr_value(self):
        kind, text, _ = self.t.peek()
        if text == "#quant":
            return self.quant_scheme()
        if text == "#layout":
            return self.layout()
        if kind == "ident" and text == "dense":
            self.t.next()
            self.t.expect("<")
            items = self.list_value()
            self.t.expect(">")
            return ("dense", items)
        if text == "[":
            return self.list_value()
        if text == "{":
            self.t.next()
            self.enter()
            items = {}
            while not self.t.accept("}"):
                key = self.t.expect_kind("ident")
                self.t.expect("=")
                items[key] = self.attr_value()
                if not self.t.accept(","):
                    self.t.expect("}")
                    break
            self.depth -= 1
            return items
        self.t.next()
        if kind == "number":
            return _number(text)
        if kind == "string":
            return _json_string(text)
        if kind == "ident" and text in ELEMENT_TYPES:
            return elem(text)
        self.t.i -= 1
        raise self.t.error("bad attribute value")

    def list_value(self) -> list:
        self.t.expect("[")
        items = []
        while not self.t.accept("]"):
            kind, text, _ = self.t.next()
            if kind != "number":
                raise self.t.error("expected a number in a list")
            items.append(_number(text))
            if not self.t.accept(","):
                self.t.expect("]")
                break
        return items

    # -- structure -------------------------------------------------------------------------
    def module(self) -> Module:
        self.t.expect("module")
        name = self.t.expect_kind("symbol")[1:]
        module = Module(name)
        self.t.expect("{")
        while not self.t.accept("}"):
            module.add_function(self.function(module))
        if self.t.peek()[0] != "eof":
            raise self.t.error("text after the end of the module")
        return module

    def function(self, module: Module) -> Function:
        self.t.expect("func")
        fn = Function(self.t.expect_kind("symbol")[1:])
        env: dict = {}
        self.t.expect("(")
        while not self.t.accept(")"):
            name = _value_name(self.t.expect_kind("value"))
            if name in env:
                raise self.t.error(f"argument %{_cut(name)} declared twice")
            self.t.expect(":")
            env[name] = fn.add_arg(name, self.tensor_type())
            if not self.t.accept(","):
                self.t.expect(")")
                break
        self.t.expect("->")
        self.t.expect("(")
        out_names, out_types = [], []
        while not self.t.accept(")"):
            out_names.append(_json_string(self.t.expect_kind("string")))
            self.t.expect(":")
            out_types.append(self.tensor_type())
            if not self.t.accept(","):
                self.t.expect(")")
                break
        self.t.expect("{")
        while self.t.peek()[1] != "return":
            self.node(fn, module, env)
        self.t.expect("return")
        outs = []
        while self.t.peek()[1] != "}":
            outs.append(self.operand(env))
            if not self.t.accept(","):
                break
        self.t.expect("}")
        if len(outs) != len(out_names):
            raise ParseError(f"@{_cut(fn.name)} returns {len(outs)} values but declares "
                             f"{len(out_names)}")
        fn.set_outputs(outs, out_names)
        return fn

    def operand(self, env: dict):
        kind, text, _ = self.t.peek()
        if text == "none":
            self.t.next()
            return None
        if kind == "value" and _value_name(text) not in env:
            raise self.t.error(f"use of undefined value %{_cut(_value_name(text))}")
        return env[_value_name(self.t.expect_kind("value"))]

    def node(self, fn: Function, module: Module, env: dict) -> None:
        names = [_value_name(self.t.expect_kind("value"))]
        while self.t.accept(","):
            names.append(_value_name(self.t.expect_kind("value")))
        self.t.expect("=")
        op = self.t.expect_kind("ident")
        if op not in OPS:
            raise self.t.error(f"unknown op {_short(op)}")
        self.t.expect("(")
        operands = []
        while not self.t.accept(")"):
            operands.append(self.operand(env))
            if not self.t.accept(","):
                self.t.expect(")")
                break
        attrs: dict = {}
        if self.t.accept("{"):
            while not self.t.accept("}"):
                key = self.t.expect_kind("ident")
                self.t.expect("=")
                attrs[key] = self.attr_value()
                if not self.t.accept(","):
                    self.t.expect("}")
                    break
        self.t.expect(":")
        types = [self.tensor_type()]
        while self.t.accept(","):
            types.append(self.tensor_type())
        if len(types) != len(names):
            raise ParseError(f"{op} defines {len(names)} values but lists {len(types)} types")
        attrs = self.typed_attrs(op, attrs, types)
        for i, n in enumerate(names):
            if n in env or n in names[:i]:
                raise ParseError(f"value %{_cut(n)} defined twice")
        node = fn.make_node(op, operands, types, attrs, names=names)
        for r in node.results:
            env[r.name] = r
        if op == "constant" and "name" in attrs and self.constants is not None:
            if attrs["name"] not in self.constants:
                raise ParseError(f"constant {_short(str(attrs['name']))} missing from the weights")
            module.constants[attrs["name"]] = self.constants[attrs["name"]]

    def typed_attrs(self, op: str, attrs: dict, types: list) -> dict:
        """Give parsed attributes the Python types their op declares (floats, arrays)."""
        spec = OPS[op].attrs
        out = {}
        for k, v in attrs.items():
            kind = spec.get(k, ("any", False))[0]
            if isinstance(v, tuple) and v and v[0] == "dense":
                v = self.dense(op, v[1], types[0])
            elif kind == "float":
                v = float(v)
            elif kind == "floats":
                v = [float(x) for x in v]
            out[k] = v
        return out


    @staticmethod
    def dense(op: str, items: list, t: TensorType) -> np.ndarray:
        """``dense<[...]>`` values as an array of the result type (sizes and ranges checked)."""
        if not t.is_static:
            raise ParseError(f"{op}: dense values need a static type, not {t}")
        size = int(np.prod(t.shape, dtype=np.int64))
        if len(items) != size:
            raise ParseError(f"{op}: dense has {len(items)} values, {t} holds {size}")
        if t.dtype.is_float:
            arr = np.array(items, dtype=np.float64)
        else:
            if any(isinstance(x, float) for x in items):
                raise ParseError(f"{op}: dense values of {t.dtype} must be integers")
            info = np.iinfo(t.dtype.np_dtype) if t.dtype.np_dtype.kind in "iu" else None
            if info is not None and items and (min(items) < info.min or max(items) > info.max):
                raise ParseError(f"{op}: dense values outside the range of {t.dtype}")
            arr = np.array(items, dtype=np.int64)
        return arr.astype(t.dtype.np_dtype).reshape(t.shape)


def parse_module(text: str, constants: Optional[dict] = None) -> Module:
    """Parse QIR text; ``constants`` supplies the side table (name → array)."""
    if not isinstance(text, str):
        raise ParseError(f"QIR text must be a str, not {type(text).__name__}")
    try:
        return _Parser(text, constants).module()
    except RecursionError:  # a backstop; nesting is bounded by MAX_NESTING where it recurses
        raise ParseError("QIR text nested too deeply to parse") from None
