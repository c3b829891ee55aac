"""Element types, quantization schemes, layouts and tensor types of QIR.

Everything here is an immutable value with a textual form that the printer writes and the
parser reads back (``str(x)`` is that form).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Union

import ml_dtypes
import numpy as np

# --------------------------------------------------------------------------------------------
# Element types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementType:
    """A scalar type: ``i4``, ``u8``, ``f16``, ``f8e4m3fn``, ``nf4``, ``ternary`` ...

    ``kind`` is one of ``int``, ``uint``, ``float``, ``bool``, ``nf4``, ``ternary``.
    ``storage`` is the numpy dtype that holds one unpacked element in the reference runtime
    (sub-byte integers are one code per int8/uint8; nf4 is a uint8 index into the NF4 table).
    """

    name: str
    kind: str
    bits: int
    storage: str

    def __str__(self) -> str:
        return self.name

    @property
    def is_integer(self) -> bool:
        return self.kind in ("int", "uint")

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def signed(self) -> bool:
        return self.kind in ("int", "float", "ternary")

    @property
    def is_low_bit(self) -> bool:
        """True for types narrower than a byte or otherwise only meaningful as quantized codes."""
        return self.bits < 8 or self.kind in ("nf4", "ternary") or self.name.startswith("f8")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_NP_STORAGE[self.storage])

    def int_range(self) -> tuple[int, int]:
        """The closed range of representable codes of an integer-like type."""
        if self.kind == "int":
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        if self.kind == "uint":
            return 0, (1 << self.bits) - 1
        if self.kind == "ternary":
            return -1, 1
        if self.kind == "nf4":
            return 0, 15
        raise TypeError(f"{self.name} has no integer range")


_NP_STORAGE = {
    "bool": np.bool_,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float4_e2m1fn": ml_dtypes.float4_e2m1fn,
}


def _make_element_types() -> dict[str, ElementType]:
    table: dict[str, ElementType] = {}
    for bits in range(1, 9):
        table[f"i{bits}"] = ElementType(f"i{bits}", "int", bits, "int8")
        table[f"u{bits}"] = ElementType(f"u{bits}", "uint", bits, "uint8")
    for bits in (16, 32, 64):
        table[f"i{bits}"] = ElementType(f"i{bits}", "int", bits, f"int{bits}")
        table[f"u{bits}"] = ElementType(f"u{bits}", "uint", bits, f"uint{bits}")
    table["bool"] = ElementType("bool", "bool", 1, "bool")
    table["f16"] = ElementType("f16", "float", 16, "float16")
    table["bf16"] = ElementType("bf16", "float", 16, "bfloat16")
    table["f32"] = ElementType("f32", "float", 32, "float32")
    table["f64"] = ElementType("f64", "float", 64, "float64")
    table["f8e4m3fn"] = ElementType("f8e4m3fn", "float", 8, "float8_e4m3fn")
    table["f8e5m2"] = ElementType("f8e5m2", "float", 8, "float8_e5m2")
    table["f8e4m3fnuz"] = ElementType("f8e4m3fnuz", "float", 8, "float8_e4m3fnuz")
    table["f8e5m2fnuz"] = ElementType("f8e5m2fnuz", "float", 8, "float8_e5m2fnuz")
    table["f4e2m1"] = ElementType("f4e2m1", "float", 4, "float4_e2m1fn")
    table["nf4"] = ElementType("nf4", "nf4", 4, "uint8")
    table["ternary"] = ElementType("ternary", "ternary", 2, "int8")
    return table


ELEMENT_TYPES: dict[str, ElementType] = _make_element_types()

# The 16 NF4 levels of QLoRA (Dettmers et al. 2023), indexed by the 4-bit code.
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32,
)


def elem(name: Union[str, ElementType]) -> ElementType:
    """Look up an element type by its textual name (``"u4"``, ``"f32"`` ...)."""
    if isinstance(name, ElementType):
        return name
    try:
        return ELEMENT_TYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown element type {name!r}; known: {', '.join(ELEMENT_TYPES)}"
        ) from None


def elem_from_numpy(dtype: np.dtype) -> ElementType:
    """The element type whose storage is ``dtype`` (plain dtypes only: i8 → i8, not i4)."""
    return _elem_from_numpy(np.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _elem_from_numpy(dtype: np.dtype) -> ElementType:
    # cached: the interpreter and the shape functions ask it per operand of every evaluation
    for et in ELEMENT_TYPES.values():
        if et.np_dtype == dtype and (et.bits >= 8 or et.kind in ("bool", "float")):
            if et.kind in ("nf4", "ternary"):
                continue
            return et
    raise ValueError(f"no QIR element type for numpy dtype {dtype}")


# --------------------------------------------------------------------------------------------
# Quantization schemes
# --------------------------------------------------------------------------------------------

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantScheme:
    """How codes of a tensor map to real values: ``real = (code - zero_point) * scale``.

    - ``dtype``: the code type (``u4``, ``i8``, ``f8e4m3fn``, ``nf4`` ...).
    - ``symmetric``: no zero point (or an implied one, see ``implied_zero_point``).
    - ``zero_point_type`` / ``scale_type``: element types of the zero-point and scale tensors.
    - ``granularity``: ``tensor`` (one scale), ``channel`` (one scale per index of ``axis``), or
      ``group`` (one scale per ``block_size`` consecutive elements along ``axis``; for a weight
      ``[K, N]``, ``axis=0`` groups along the input channels K, as GPTQ/AWQ/MatMulNBits do, and
      ``axis=1`` groups along the output channels N).
    - ``act_order``: the group of input row k is ``g_idx[k]`` (a tensor operand), not
      ``k // block_size`` (GPTQ's desc_act).
    - ``implied_zero_point``: a zero point applied without a tensor (MatMulNBits' 2^(bits-1)
      when its zero_points input is absent); None for a true symmetric scheme.
    """

    dtype: ElementType
    symmetric: bool = True
    zero_point_type: Optional[ElementType] = None
    scale_type: ElementType = ELEMENT_TYPES["f32"]
    granularity: str = "tensor"
    axis: Optional[int] = None
    block_size: Optional[int] = None
    act_order: bool = False
    implied_zero_point: Optional[int] = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {self.granularity!r}")
        if self.granularity == "tensor" and (self.axis is not None or self.block_size):
            raise ValueError("a per-tensor scheme takes no axis or block size")
        if self.granularity == "channel" and (self.axis is None or self.block_size):
            raise ValueError("a per-channel scheme needs an axis and no block size")
        if self.granularity == "group" and (self.axis is None or not self.block_size):
            raise ValueError("a per-group scheme needs an axis and a block size")
        if self.symmetric and self.zero_point_type is not None:
            raise ValueError("a symmetric scheme has no zero-point type")
        if not self.symmetric and self.zero_point_type is None:
            raise ValueError("an affine scheme needs a zero-point type")
        if self.act_order and self.granularity != "group":
            raise ValueError("act-order (g_idx) needs per-group granularity")

    @property
    def bits(self) -> int:
        return self.dtype.bits

    @property
    def signed(self) -> bool:
        return self.dtype.signed

    def replace(self, **changes) -> "QuantScheme":
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        parts = [self.dtype.name, "symmetric" if self.symmetric else "affine"]
        if self.granularity == "tensor":
            parts.append("per_tensor")
        elif self.granularity == "channel":
            parts.append(f"per_channel(axis={self.axis})")
        else:
            parts.append(f"per_group(axis={self.axis}, block={self.block_size})")
        parts.append(f"scale={self.scale_type.name}")
        if self.zero_point_type is not None:
            parts.append(f"zp={self.zero_point_type.name}")
        if self.implied_zero_point is not None:
            parts.append(f"implied_zp={self.implied_zero_point}")
        if self.act_order:
            parts.append("act_order")
        return "#quant<" + ", ".join(parts) + ">"

    def scale_shape(self, shape: tuple) -> tuple:
        """Shape of the scale (and zero-point) tensor for a tensor of ``shape``.

        ONNX conventions: per-tensor → ``()``; per-channel → ``(shape[axis],)``; per-group →
        ``shape`` with ``ceil(shape[axis] / block)`` on ``axis``; with act-order the group count
        is not derivable from the shape, so the axis becomes ``?``.
        """
        if self.granularity == "tensor":
            return ()
        axis = self.axis % len(shape)
        if self.granularity == "channel":
            return (shape[axis],)
        out = list(shape)
        if self.act_order:
            out[axis] = "?"
        elif isinstance(shape[axis], int):
            out[axis] = -(-shape[axis] // self.block_size)
        else:
            out[axis] = "?"
        return tuple(out)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A named physical arrangement of a tensor's elements, with its parameters.

    ``row_major`` is the logical order. Backends define the others (``mma_m16n8k16`` tile
    permutations, nibble interleaves, packed words); ``params`` are sorted (name, value) pairs
    so that the printed form is stable.
    """

    name: str
    params: tuple = ()

    def __str__(self) -> str:
        if not self.params:
            return f"#layout<{self.name}>"
        inner = ", ".join(f"{k}={_fmt_param(v)}" for k, v in self.params)
        return f"#layout<{self.name}, {inner}>"

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)

    @staticmethod
    def make(name: str, **params) -> "Layout":
        return Layout(name, tuple(sorted(params.items())))


def _fmt_param(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_param(x) for x in v) + "]"
    return repr(v)


# --------------------------------------------------------------------------------------------
# Tensor types
# --------------------------------------------------------------------------------------------

Dim = Union[int, str]  # an int, a symbol (``batch``), or ``?`` for unknown


@dataclass(frozen=True)
class TensorType:
    """Shape, element type, and optionally the quantization scheme and the layout of a value."""

    shape: tuple
    dtype: ElementType
    quant: Optional[QuantScheme] = None
    layout: Optional[Layout] = None

    def __post_init__(self) -> None:
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                raise TypeError(f"bad dimension {d!r} in shape {self.shape}")
            if isinstance(d, int) and d < 0:
                raise ValueError(f"negative dimension in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Optional[int]:
        if not self.is_static:
            return None
        return int(np.prod(self.shape, dtype=np.int64))

    def with_shape(self, shape) -> "TensorType":
        return dataclasses.replace(self, shape=tuple(shape))

    def replace(self, **changes) -> "TensorType":
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        out = f"tensor<[{dims}], {self.dtype.name}"
        if self.quant is not None:
            out += f", {self.quant}"
        if self.layout is not None:
            out += f", {self.layout}"
        return out + ">"


def tensor(shape, dtype, quant=None, layout=None) -> TensorType:
    """Shorthand: ``tensor([4, "batch"], "f32")``."""
    return TensorType(tuple(shape), elem(dtype), quant, layout)
