"""The QIR op set, declared as data: operands, attributes, a summary and type inference.

Every op has reference semantics in ``qcompiler.runtime.reference`` (the oracle for every
backend). Float ops follow the ONNX operator of the same meaning; the quantization ops are
described on their definitions below.

Type inference functions take the operand types, the attributes and, for operands produced by
``constant`` nodes, their arrays (None otherwise), and return the result types. A dimension
that cannot be decided is ``?``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from qcompiler.errors import InputError
from qcompiler.ir.types import ELEMENT_TYPES, ElementType, QuantScheme, TensorType, elem

F32 = ELEMENT_TYPES["f32"]
I32 = ELEMENT_TYPES["i32"]
I64 = ELEMENT_TYPES["i64"]
BOOL = ELEMENT_TYPES["bool"]


class TypeInferenceError(InputError):
    """Operand types that the op cannot accept (bad shapes or element types)."""


@dataclass(frozen=True)
class OpDef:
    name: str
    summary: str
    operands: tuple  # names; "x?" optional, "xs*" variadic (last only)
    attrs: dict = field(default_factory=dict)  # name -> (kind, required: bool)
    results: int = 1  # -1: variadic (decided by the node)
    infer: Optional[Callable] = None
    # attributes the inference only checks against static dims (a cache's ``layer`` index
    # against its layer count): they never change the result types, so the plan's memo of
    # inferences (qcompiler/plan/shapes.py) leaves them out of its keys
    checked_attrs: tuple = ()

    def operand_range(self) -> tuple[int, int]:
        required = sum(1 for o in self.operands if not o.endswith(("?", "*")))
        if self.operands and self.operands[-1].endswith("*"):
            return required, 1 << 30
        return required, len(self.operands)


OPS: dict[str, OpDef] = {}


def _def(name, summary, operands, attrs=None, results=1, checked_attrs=()):
    def wrap(fn):
        OPS[name] = OpDef(name, summary, tuple(operands), attrs or {}, results, fn,
                          tuple(checked_attrs))
        return fn
    return wrap


# --------------------------------------------------------------------------------------------
# shape helpers
# --------------------------------------------------------------------------------------------


def broadcast_shapes(*shapes: tuple) -> tuple:
    """numpy broadcasting over dims that may be symbols or ``?``."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        ints = {d for d in dims if isinstance(d, int) and d != 1}
        syms = {d for d in dims if isinstance(d, str)}
        if len(ints) > 1:
            raise TypeInferenceError(f"shapes {' and '.join(map(str, shapes))} do not broadcast")
        if ints:
            out.append(ints.pop())
        elif len(syms) == 1:
            out.append(syms.pop())
        elif syms:
            out.append("?")
        else:
            out.append(1)
    return tuple(out)


def _norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise TypeInferenceError(f"{what} {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def _ints(a) -> Optional[list[int]]:
    return None if a is None else [int(x) for x in np.asarray(a).reshape(-1)]


def _same(types, attrs, consts):
    return [types[0]]


def _float_result(t: TensorType, shape=None) -> TensorType:
    return TensorType(tuple(t.shape if shape is None else shape), t.dtype)


# --------------------------------------------------------------------------------------------
# constants and plumbing
# --------------------------------------------------------------------------------------------


@_def("constant", "A constant tensor: inline `value`, or `name` in the module's side table",
      [], {"value": ("tensor", False), "name": ("str", False)})
def _constant(types, attrs, consts):
    return None  # the declared type is the truth


@_def("identity", "Copy of the operand", ["x"])
def _identity(types, attrs, consts):
    return [types[0]]


@_def("cast", "Element type conversion (ONNX Cast: round to nearest even, saturate fp8)",
      ["x"], {"to": ("type", True), "saturate": ("int", False)})
def _cast(types, attrs, consts):
    return [TensorType(types[0].shape, attrs["to"])]


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------


def _binary(types, attrs, consts):
    a, b = types
    if a.dtype != b.dtype:
        raise TypeInferenceError(f"element types differ: {a.dtype} and {b.dtype}")
    return [TensorType(broadcast_shapes(a.shape, b.shape), a.dtype)]


for _name, _summary in [("add", "a + b"), ("sub", "a - b"), ("mul", "a * b"), ("div", "a / b"),
                        ("max", "elementwise maximum"), ("min", "elementwise minimum")]:
    OPS[_name] = OpDef(_name, f"Broadcasting {_summary}", ("a", "b"), {}, 1, _binary)


@_def("pow", "Broadcasting a ** b (the exponent may have another float type)", ["a", "b"])
def _pow(types, attrs, consts):
    a, b = types
    return [TensorType(broadcast_shapes(a.shape, b.shape), a.dtype)]


@_def("equal", "Broadcasting a == b, boolean result", ["a", "b"])
def _equal(types, attrs, consts):
    a, b = types
    return [TensorType(broadcast_shapes(a.shape, b.shape), BOOL)]


@_def("isnan", "Elementwise x != x (NaN test), boolean result", ["x"])
def _isnan(types, attrs, consts):
    return [TensorType(types[0].shape, BOOL)]


for _name, _summary in [("greater", "a > b"), ("greater_or_equal", "a >= b"), ("less", "a < b"),
                        ("less_or_equal", "a <= b"), ("and", "logical a and b")]:
    OPS[_name] = OpDef(_name, f"Broadcasting {_summary}, boolean result", ("a", "b"), {}, 1, _equal)


@_def("where", "cond ? x : y with broadcasting", ["cond", "x", "y"])
def _where(types, attrs, consts):
    c, x, y = types
    if x.dtype != y.dtype:
        raise TypeInferenceError(f"where branches differ in element type: {x.dtype} and {y.dtype}")
    return [TensorType(broadcast_shapes(c.shape, x.shape, y.shape), x.dtype)]


for _name, _summary in [("sqrt", "square root"), ("erf", "Gauss error function"),
                        ("relu", "max(x, 0)"), ("sigmoid", "1 / (1 + exp(-x))"),
                        ("tanh", "hyperbolic tangent"), ("exp", "e ** x"), ("neg", "-x"),
                        ("abs", "|x|"), ("reciprocal", "1 / x")]:
    OPS[_name] = OpDef(_name, f"Elementwise {_summary}", ("x",), {}, 1, _same)

OPS["gelu"] = OpDef("gelu", "GELU, exact (erf) or `approximate=tanh`", ("x",),
                    {"approximate": ("str", False)}, 1, _same)


@_def("softmax", "Softmax along `axis` (ONNX opset 13 semantics)", ["x"], {"axis": ("int", True)})
def _softmax(types, attrs, consts):
    _norm_axis(attrs["axis"], types[0].rank)
    return [types[0]]


@_def("layernorm", "Layer normalization over the axes from `axis` on, times scale plus bias",
      ["x", "scale", "bias?"], {"axis": ("int", True), "epsilon": ("float", True)})
def _layernorm(types, attrs, consts):
    _norm_axis(attrs["axis"], types[0].rank)
    return [types[0]]


@_def("rmsnorm", "x / sqrt(mean(x^2 over the axes from `axis` on) + epsilon) * scale",
      ["x", "scale"], {"axis": ("int", True), "epsilon": ("float", True)})
def _rmsnorm(types, attrs, consts):
    """ONNX RMSNormalization (opset 23, stash_type 1: f16/bf16 computed in f32)."""
    x, scale = types
    axis = _norm_axis(attrs["axis"], x.rank)
    broadcast_shapes(x.shape[axis:], scale.shape)
    if scale.rank > x.rank - axis:
        raise TypeInferenceError(f"rmsnorm scale {scale.shape} has more dims than the "
                                 f"normalized {x.shape[axis:]}")
    return [x]


@_def("fused_elementwise", "Several elementwise ops as one: `body` over operands x0, x1, ...",
      ["xs*"], {"body": ("str", True)})
def _fused_elementwise(types, attrs, consts):
    """The operands broadcast together; the body (``qcompiler.ir.elementwise_body``) gives the
    element type; statement semantics are those of the QIR ops of the same names."""
    from qcompiler.ir.elementwise_body import parse_body, result_element_type

    if not types or any(t is None for t in types):
        raise TypeInferenceError("fused_elementwise needs operands, none of them none")
    body = parse_body(attrs["body"])
    return [TensorType(broadcast_shapes(*(t.shape for t in types)),
                       result_element_type(body, [t.dtype for t in types]))]


@_def("attention", "softmax(q @ k^T * scale + mask, axis=-1) @ v, grouped-query, optional causal",
      ["q", "k", "v", "mask?"], {"scale": ("float", True), "causal": ("int", True),
                                 "q_bshd": ("int", False), "kv_bshd": ("int", False),
                                 "y_bshd": ("int", False)})
def _attention(types, attrs, consts):
    """q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] -> [B, Hq, Sq, Dv]; query head
    h reads kv head h // (Hq / Hkv). ``mask`` (float, broadcastable to [B, Hq, Sq, Skv]) is added
    to the scaled scores; ``causal=1`` masks key j for query i when j > i + (Skv - Sq).
    ``q_bshd=1``: q is [B, Sq, Hq, D] (the heads-split projection before its transpose); the
    same for k and v with ``kv_bshd=1``, and for the result with ``y_bshd=1`` ([B, Sq, Hq, Dv],
    ready to merge the heads). Set by fold-attention-layout; the mask's dims do not move."""
    for name in ("q_bshd", "kv_bshd", "y_bshd"):
        if attrs.get(name, 0) not in (0, 1):
            raise TypeInferenceError(f"attention {name} must be 0 or 1, not {attrs[name]}")
    types = list(types)
    if attrs.get("q_bshd", 0) and types[0] is not None and types[0].rank == 4:
        types[0] = _swap_seq_heads(types[0])
    if attrs.get("kv_bshd", 0):
        types[1:3] = [_swap_seq_heads(t) if t.rank == 4 else t for t in types[1:3]]
    q, k, v = types[0], types[1], types[2]
    mask = types[3] if len(types) > 3 else None
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise TypeInferenceError(f"attention takes 4-D q, k, v, not {q.shape}, {k.shape}, "
                                 f"{v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeInferenceError(f"attention q, k, v element types differ: {q.dtype}, "
                                 f"{k.dtype}, {v.dtype}")
    b = broadcast_shapes(q.shape[:1], k.shape[:1], v.shape[:1])[0]
    for what, d1, d2 in (("head dim", q.shape[3], k.shape[3]), ("kv length", k.shape[2], v.shape[2]),
                         ("kv heads", k.shape[1], v.shape[1])):
        if isinstance(d1, int) and isinstance(d2, int) and d1 != d2:
            raise TypeInferenceError(f"attention {what} differs: {d1} and {d2}")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and (hkv == 0 or hq % hkv):
        raise TypeInferenceError(f"attention query heads {hq} are not a multiple of kv heads {hkv}")
    if attrs["causal"] not in (0, 1):
        raise TypeInferenceError(f"attention causal must be 0 or 1, not {attrs['causal']}")
    if mask is not None:
        if not mask.dtype.is_float:
            raise TypeInferenceError(f"attention mask must be float (additive), not {mask.dtype}")
        if mask.rank > 4:
            raise TypeInferenceError(f"attention mask {mask.shape} has more than 4 dims")
        broadcast_shapes(mask.shape, (b, hq, q.shape[2], k.shape[2]))
    y = TensorType((b, hq, q.shape[2], v.shape[3]), q.dtype)
    return [_swap_seq_heads(y) if attrs.get("y_bshd", 0) else y]


def _swap_seq_heads(t: TensorType) -> TensorType:
    """[B, X, Y, D] -> [B, Y, X, D]: between attention's [B, H, S, D] and [B, S, H, D]."""
    b, x, y, d = t.shape
    return t.with_shape((b, y, x, d))


@_def("reduce_mean", "Mean over `axes` (all when empty, unless noop_with_empty_axes)", ["x"],
      {"axes": ("ints", True), "keepdims": ("int", True), "noop_with_empty_axes": ("int", False)})
def _reduce_mean(types, attrs, consts):
    t = types[0]
    axes = attrs["axes"]
    if not axes and attrs.get("noop_with_empty_axes", 0):
        return [t]
    axes = {_norm_axis(a, t.rank) for a in axes} if axes else set(range(t.rank))
    if attrs["keepdims"]:
        shape = [1 if i in axes else d for i, d in enumerate(t.shape)]
    else:
        shape = [d for i, d in enumerate(t.shape) if i not in axes]
    return [TensorType(tuple(shape), t.dtype)]


for _name, _summary in [("reduce_sum", "Sum"), ("reduce_l2", "Euclidean norm")]:
    OPS[_name] = OpDef(_name, f"{_summary} over `axes` (as reduce_mean)", ("x",),
                       OPS["reduce_mean"].attrs, 1, _reduce_mean)


# --------------------------------------------------------------------------------------------
# shape ops
# --------------------------------------------------------------------------------------------


@_def("reshape", "Reshape to the `shape` operand (0 copies a dim unless allowzero, -1 infers)",
      ["x", "shape"], {"allowzero": ("int", False)})
def _reshape(types, attrs, consts):
    t, shape_c = types[0], consts[1]
    if shape_c is None:
        n = types[1].shape[0] if types[1].shape else 0
        return [TensorType(("?",) * n if isinstance(n, int) else (), t.dtype)]
    target = _ints(shape_c)
    out: list = []
    for i, d in enumerate(target):
        if d == 0 and not attrs.get("allowzero", 0):
            if i >= t.rank:
                raise TypeInferenceError(f"reshape copies dim {i} of a rank-{t.rank} tensor")
            out.append(t.shape[i])
        else:
            out.append(d)
    if out.count(-1) > 1:
        raise TypeInferenceError(f"reshape target {target} has more than one -1")
    if -1 in out:
        known = [d for d in out if d != -1]
        total = t.numel()
        if total is not None and all(isinstance(d, int) for d in known):
            rest = int(np.prod(known, dtype=np.int64)) if known else 1
            if rest == 0 or total % rest:
                raise TypeInferenceError(f"cannot reshape {t.shape} to {target}")
            out[out.index(-1)] = total // rest
        else:
            out[out.index(-1)] = _infer_symbolic_minus_one(t.shape, known)
    elif t.is_static and all(isinstance(d, int) for d in out):
        if int(np.prod(out, dtype=np.int64)) != t.numel():
            raise TypeInferenceError(f"cannot reshape {t.shape} to {target}")
    return [TensorType(tuple(out), t.dtype)]


def _infer_symbolic_minus_one(src: tuple, known: list):
    """-1 in a reshape of a symbolic shape: cancel equal factors; one symbol left is the answer."""
    num = list(src)
    for d in known:
        if d in num:
            num.remove(d)
        elif isinstance(d, int):
            ints = [x for x in num if isinstance(x, int)]
            prod = int(np.prod(ints, dtype=np.int64)) if ints else 1
            if prod % d:
                return "?"
            num = [x for x in num if not isinstance(x, int)] + ([prod // d] if prod // d != 1 else [])
        else:
            return "?"
    num = [x for x in num if x != 1]
    if len(num) == 1:
        return num[0]
    return 1 if not num else "?"


@_def("transpose", "Permute dimensions by `perm`", ["x"], {"perm": ("ints", True)})
def _transpose(types, attrs, consts):
    t, perm = types[0], attrs["perm"]
    if sorted(perm) != list(range(t.rank)):
        raise TypeInferenceError(f"perm {perm} is not a permutation of rank {t.rank}")
    return [TensorType(tuple(t.shape[p] for p in perm), t.dtype)]


@_def("all_reduce",
      "Sum over tensor-parallel ranks: operand r is rank r's partial (the `shard` pass)",
      ["xs*"], {"op": ("str", True), "world": ("int", False)})
def _all_reduce(types, attrs, consts):
    """The global view of a collective: every rank contributes one operand and every rank
    receives the sum. A rank program (``qcompiler.runtime.ranks.rank_program``) keeps its own
    operand only and says with ``world`` how many ranks the sum spans: the other partials come
    from the collective at run time."""
    if attrs["op"] != "sum":
        raise TypeInferenceError(f"all_reduce op must be 'sum', not {attrs['op']!r}")
    if not types or any(t is None or t.shape != types[0].shape or t.dtype != types[0].dtype
                        for t in types):
        raise TypeInferenceError("all_reduce operands must be present and of one type")
    world = attrs.get("world")
    if world is not None and (world < 1 or len(types) not in (1, world)):
        raise TypeInferenceError(f"all_reduce world = {world} with {len(types)} operands: a "
                                 "rank program has one operand, the global view one per rank")
    return [types[0]]


@_def("concat", "Concatenate along `axis`", ["xs*"], {"axis": ("int", True)})
def _concat(types, attrs, consts):
    rank = types[0].rank
    axis = _norm_axis(attrs["axis"], rank)
    out = list(types[0].shape)
    total = 0
    for t in types:
        if t.rank != rank:
            raise TypeInferenceError("concat operands differ in rank")
        d = t.shape[axis]
        total = total + d if isinstance(total, int) and isinstance(d, int) else "?"
    out[axis] = total
    return [TensorType(tuple(out), types[0].dtype)]


@_def("split", "Split along `axis` into pieces of `sizes`", ["x"],
      {"axis": ("int", True), "sizes": ("ints", True)}, results=-1)
def _split(types, attrs, consts):
    t = types[0]
    axis = _norm_axis(attrs["axis"], t.rank)
    if isinstance(t.shape[axis], int) and sum(attrs["sizes"]) != t.shape[axis]:
        raise TypeInferenceError(f"split sizes {attrs['sizes']} do not sum to {t.shape[axis]}")
    return [TensorType(t.shape[:axis] + (s,) + t.shape[axis + 1:], t.dtype) for s in attrs["sizes"]]


@_def("slice", "ONNX Slice by starts, ends, axes, steps operands",
      ["x", "starts", "ends", "axes?", "steps?"])
def _slice(types, attrs, consts):
    t = types[0]
    starts, ends = _ints(consts[1]), _ints(consts[2])
    axes = _ints(consts[3]) if len(consts) > 3 and types[3] is not None else None
    steps = _ints(consts[4]) if len(consts) > 4 and types[4] is not None else None
    if starts is None or ends is None or (len(types) > 3 and types[3] is not None and axes is None) \
            or (len(types) > 4 and types[4] is not None and steps is None):
        return [TensorType(("?",) * t.rank, t.dtype)]
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    out = list(t.shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _norm_axis(a, t.rank)
        d = t.shape[a]
        out[a] = len(range(*slice(s, e, st).indices(d))) if isinstance(d, int) else "?"
    return [TensorType(tuple(out), t.dtype)]


@_def("gather", "ONNX Gather along `axis`", ["x", "indices"], {"axis": ("int", True)})
def _gather(types, attrs, consts):
    t, idx = types
    axis = _norm_axis(attrs["axis"], t.rank)
    return [TensorType(t.shape[:axis] + idx.shape + t.shape[axis + 1:], t.dtype)]


@_def("gather_elements", "ONNX GatherElements: x[..., indices[i], ...] along `axis`",
      ["x", "indices"], {"axis": ("int", True)})
def _gather_elements(types, attrs, consts):
    t, idx = types
    _norm_axis(attrs["axis"], t.rank)
    if idx.rank != t.rank:
        raise TypeInferenceError(f"gather_elements indices rank {idx.rank} != data rank {t.rank}")
    return [TensorType(idx.shape, t.dtype)]


@_def("gather_nd", "ONNX GatherND: index tuples in the last dim of `indices`", ["x", "indices"],
      {"batch_dims": ("int", False)})
def _gather_nd(types, attrs, consts):
    t, idx = types
    b = attrs.get("batch_dims", 0)
    depth = idx.shape[-1] if idx.rank else "?"
    if not isinstance(depth, int):
        return [TensorType(("?",) * max(idx.rank - 1, 0), t.dtype)]
    if idx.rank < 1 or b + depth > t.rank:
        raise TypeInferenceError(f"gather_nd indices {idx.shape} do not fit data {t.shape} "
                                 f"with batch_dims={b}")
    return [TensorType(idx.shape[:-1] + t.shape[b + depth:], t.dtype)]


@_def("range", "start, start + delta, ... below limit (ONNX Range); 0-d operands", ["start",
      "limit", "delta"])
def _range(types, attrs, consts):
    if any(t.rank != 0 for t in types):
        raise TypeInferenceError("range takes 0-d start, limit and delta")
    n = "?"
    if all(c is not None for c in consts):
        start, limit, delta = (np.asarray(c).item() for c in consts)
        n = max(int(np.ceil((limit - start) / delta)), 0)
    return [TensorType((n,), types[0].dtype)]


@_def("unsqueeze", "Insert unit dims at `axes` (of the result)", ["x"], {"axes": ("ints", True)})
def _unsqueeze(types, attrs, consts):
    t = types[0]
    rank = t.rank + len(attrs["axes"])
    axes = sorted(_norm_axis(a, rank) for a in attrs["axes"])
    out = list(t.shape)
    for a in axes:
        out.insert(a, 1)
    return [TensorType(tuple(out), t.dtype)]


@_def("squeeze", "Remove unit dims at `axes` (all unit dims when empty)", ["x"],
      {"axes": ("ints", True)})
def _squeeze(types, attrs, consts):
    t = types[0]
    axes = {_norm_axis(a, t.rank) for a in attrs["axes"]}
    if not axes:
        axes = {i for i, d in enumerate(t.shape) if d == 1}
    for a in axes:
        if isinstance(t.shape[a], int) and t.shape[a] != 1:
            raise TypeInferenceError(f"squeeze of dim {a} of size {t.shape[a]}")
    return [TensorType(tuple(d for i, d in enumerate(t.shape) if i not in axes), t.dtype)]


@_def("shape", "The shape of x as i64 (dims from `start` to `end`)", ["x"],
      {"start": ("int", False), "end": ("int", False)})
def _shape(types, attrs, consts):
    r = types[0].rank
    start, end = attrs.get("start", 0), attrs.get("end", r)
    n = len(range(*slice(start, end).indices(r)))
    return [TensorType((n,), I64)]


@_def("expand", "Broadcast x to the `shape` operand", ["x", "shape"])
def _expand(types, attrs, consts):
    t, shape_c = types[0], consts[1]
    if shape_c is None:
        n = types[1].shape[0]
        rank = max(n, t.rank) if isinstance(n, int) else t.rank
        return [TensorType(("?",) * rank, t.dtype)]
    return [TensorType(broadcast_shapes(t.shape, tuple(_ints(shape_c))), t.dtype)]


# --------------------------------------------------------------------------------------------
# matrix products
# --------------------------------------------------------------------------------------------


def matmul_shape(a: tuple, b: tuple) -> tuple:
    """numpy.matmul result shape, with symbolic dims."""
    if len(a) == 0 or len(b) == 0:
        raise TypeInferenceError("matmul of a scalar")
    a2 = a if len(a) > 1 else (1,) + a
    b2 = b if len(b) > 1 else b + (1,)
    k1, k2 = a2[-1], b2[-2]
    if isinstance(k1, int) and isinstance(k2, int) and k1 != k2:
        raise TypeInferenceError(f"matmul inner dims differ: {a} @ {b}")
    batch = broadcast_shapes(a2[:-2], b2[:-2]) if (len(a2) > 2 or len(b2) > 2) else ()
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


@_def("matmul", "numpy-style matrix product", ["a", "b"],
      {"accuracy_level": ("int", False)})
def _matmul(types, attrs, consts):
    """``accuracy_level`` (optional, from MatMulNBits): the lowest precision of the
    activations the model allows for this product (see ``qmatmul``); it never changes the
    result of a float matmul."""
    a, b = types
    if a.dtype != b.dtype:
        raise TypeInferenceError(f"matmul element types differ: {a.dtype} and {b.dtype}")
    return [TensorType(matmul_shape(a.shape, b.shape), a.dtype)]


@_def("gemm", "alpha * op(a) @ op(b) + beta * c (ONNX Gemm; canonicalize rewrites it)",
      ["a", "b", "c?"], {"alpha": ("float", False), "beta": ("float", False),
                         "trans_a": ("int", False), "trans_b": ("int", False)})
def _gemm(types, attrs, consts):
    a, b = types[0], types[1]
    if a.rank != 2 or b.rank != 2:
        raise TypeInferenceError(f"gemm takes 2-D operands, not {a.shape} and {b.shape}")
    a_s = a.shape[::-1] if attrs.get("trans_a", 0) else a.shape
    b_s = b.shape[::-1] if attrs.get("trans_b", 0) else b.shape
    return [TensorType(matmul_shape(a_s, b_s), a.dtype)]


@_def("matmul_integer", "(a - a_zp) @ (b - b_zp) accumulated in i32 (ONNX MatMulInteger)",
      ["a", "b", "a_zero_point?", "b_zero_point?"])
def _matmul_integer(types, attrs, consts):
    return [TensorType(matmul_shape(types[0].shape, types[1].shape), I32)]


@_def("qlinear_matmul",
      "Quantized matmul with requantized output (ONNX QLinearMatMul)",
      ["a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale", "y_zero_point"])
def _qlinear_matmul(types, attrs, consts):
    return [TensorType(matmul_shape(types[0].shape, types[3].shape), types[7].dtype)]


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


def check_scheme_operands(scheme: QuantScheme, x: TensorType, scale: TensorType,
                          zero_point: Optional[TensorType], what: str) -> None:
    """Scale and zero-point shapes must be those that ``scheme`` implies for ``x``."""
    want = scheme.scale_shape(x.shape)
    got = scale.shape
    if scheme.granularity == "tensor" and got not in ((), (1,)):
        raise TypeInferenceError(f"{what}: per-tensor scale must be a scalar, not {got}")
    if scheme.granularity != "tensor":
        if len(got) != len(want) or any(
                isinstance(w, int) and isinstance(g, int) and w != g for w, g in zip(want, got)):
            raise TypeInferenceError(
                f"{what}: scale shape {got} does not fit {scheme} on a {x.shape} tensor "
                f"(expected {want})")
    if zero_point is not None and zero_point.shape != got and not (
            scheme.granularity == "tensor" and zero_point.shape in ((), (1,))):
        raise TypeInferenceError(f"{what}: zero point shape {zero_point.shape} != scale shape {got}")


@_def("dequantize",
      "(x - zero_point) * scale per `scheme` (ONNX DequantizeLinear; g_idx picks groups)",
      ["x", "scale", "zero_point?", "g_idx?"], {"scheme": ("quant", True), "out": ("type", True)})
def _dequantize(types, attrs, consts):
    x, scale = types[0], types[1]
    zp = types[2] if len(types) > 2 else None
    check_scheme_operands(attrs["scheme"], x, scale, zp, "dequantize")
    _check_g_idx(attrs["scheme"], types[3] if len(types) > 3 else None, "dequantize")
    return [TensorType(x.shape, attrs["out"])]


def _check_g_idx(scheme: QuantScheme, g_idx: Optional[TensorType], what: str) -> None:
    if scheme.act_order and g_idx is None:
        raise TypeInferenceError(f"{what}: an act_order scheme needs the g_idx operand")
    if g_idx is not None and not scheme.act_order:
        raise TypeInferenceError(f"{what}: g_idx given but the scheme is not act_order")


@_def("quantize",
      "saturate(round_half_even(x / scale) + zero_point) per `scheme` (ONNX QuantizeLinear)",
      ["x", "scale", "zero_point?"], {"scheme": ("quant", True), "saturate": ("int", False)})
def _quantize(types, attrs, consts):
    x, scale = types[0], types[1]
    zp = types[2] if len(types) > 2 else None
    check_scheme_operands(attrs["scheme"], x, scale, zp, "quantize")
    return [TensorType(x.shape, attrs["scheme"].dtype)]


@_def("dynamic_quantize",
      "u8 affine quantization with a per-tensor range computed from x (DynamicQuantizeLinear)",
      ["x"], results=3)
def _dynamic_quantize(types, attrs, consts):
    x = types[0]
    u8 = ELEMENT_TYPES["u8"]
    return [TensorType(x.shape, u8), TensorType((), x.dtype), TensorType((), u8)]


QMATMUL_ACT_MODES = ("float", "dynamic", "static")
QMATMUL_FIXED_OPERANDS = 8  # x .. bias: the epilogue's operands come after them
# x_norm kinds and the operands each adds at the end: rmsnorm's scale; layernorm's scale and
# bias (the bias may be none)
QMATMUL_X_NORMS = {"rms": 1, "layer": 2}


def qmatmul_epilogue_operands(node_or_operands, attrs: Optional[dict] = None) -> list:
    """The operands of a qmatmul's epilogue (its ``x1, x2, ...``): those after the eight
    fixed ones, less the last one or two that ``x_norm`` adds (its scale, its bias). Takes a
    node, or an operand (or type) list with the node's attrs."""
    if attrs is None:
        operands, attrs = node_or_operands.operands, node_or_operands.attrs
    else:
        operands = node_or_operands
    end = len(operands) - QMATMUL_X_NORMS.get(attrs.get("x_norm"), 0)
    return list(operands[QMATMUL_FIXED_OPERANDS:end])


def qmatmul_x_norm_operands(node) -> list:
    """The operands ``x_norm`` adds at the end of a qmatmul: [scale] for ``rms``, [scale,
    bias or None] for ``layer``, [] without one."""
    count = QMATMUL_X_NORMS.get(node.attrs.get("x_norm"), 0)
    return list(node.operands[len(node.operands) - count:]) if count else []


def qmatmul_x_norm_scale(node):
    """The scale operand of a qmatmul's ``x_norm``, or None without one."""
    tail = qmatmul_x_norm_operands(node)
    return tail[0] if tail else None


def qmatmul_x_norm_bias(node):
    """The bias operand of a qmatmul's ``x_norm = "layer"`` (may be None), else None."""
    tail = qmatmul_x_norm_operands(node)
    return tail[1] if len(tail) > 1 else None


@_def("qmatmul",
      "x @ dequant(w) + bias: the fused low-bit-weight matmul (w is [K, N] codes)",
      ["x", "w", "w_scale", "w_zero_point?", "g_idx?", "x_scale?", "x_zero_point?", "bias?",
       "epilogue_args*"],
      {"w_scheme": ("quant", True), "act": ("str", True), "x_scheme": ("quant", False),
       "config": ("dict", False), "epilogue": ("str", False),
       "epilogue_pairs": ("int", False), "accuracy_level": ("int", False),
       "x_norm": ("str", False), "x_norm_epsilon": ("float", False)})
def _qmatmul(types, attrs, consts):
    """``act`` says how x enters the product:

    - ``float``: x is float; y = x @ dequant(w) in x's float type.
    - ``dynamic``: x is float and is quantized per ``x_scheme`` at run time (u8 per-tensor as
      DynamicQuantizeLinear); y = float((xq - xzp) @ (wq - wzp)) * (x_scale * w_scale).
    - ``static``: x holds codes with the x_scale/x_zero_point operands; y as for ``dynamic``.
    The integer modes need a per-tensor or per-output-channel (axis 1) weight scheme.
    ``config`` holds the parameters a backend's passes decided (tiles, fixed-point formats);
    it never changes the result beyond the numerics that backend documents.
    ``accuracy_level`` (``act=float``; MatMulNBits's attribute, kept when above 1): the lowest
    precision of x the model allows (2 f16, 3 bf16, 4 int8 per row and block, as onnxruntime
    computes); a permission, not a demand: ``ref`` computes in float, the ``cpu`` backend
    takes its ``int8`` numerics for 4 (cpu-schedule ``numerics=auto``), the ``cuda`` backend
    its int8-activation kernel where ``tile{int8_min_m}`` or a tuning log asks for it.
    ``epilogue`` (a ``fused_elementwise`` body) is applied to the product: its ``x0`` is
    x @ dequant(w) + bias in the type above, ``x1, x2, ...`` the operands after the eight
    fixed ones (absent fixed operands are none); the result is what the body gives.
    ``epilogue_pairs = 1`` (``fuse-gate-up``): the product's columns come in pairs, and the
    epilogue turns pair j into column j of the result: its ``x0`` is column 2j, its ``x1``
    column 2j + 1 (each rounded to the product's type), no extra operands; y is [..., N / 2].
    ``x_norm`` (``fuse-norm-qmatmul``, ``act=float``): x is first normalized over its last
    axis, as ``rmsnorm(x, scale)`` (``"rms"``) or ``layernorm(x, scale, bias)`` (``"layer"``)
    ``{axis = -1, epsilon = x_norm_epsilon}`` computes it (f32 statistics, the result rounded to
    x's type); the scale [K] (and layer's bias [K], or none) are the node's last operands,
    after the epilogue's.
    """
    x, w, w_scale = types[0], types[1], types[2]
    w_zp = types[3] if len(types) > 3 else None
    scheme: QuantScheme = attrs["w_scheme"]
    act = attrs["act"]
    if act not in QMATMUL_ACT_MODES:
        raise TypeInferenceError(f"qmatmul act must be one of {QMATMUL_ACT_MODES}, not {act!r}")
    if w.rank != 2:
        raise TypeInferenceError(f"qmatmul weight must be [K, N], not {w.shape}")
    if w.layout is None and w.dtype != scheme.dtype:
        raise TypeInferenceError(f"qmatmul weight codes are {w.dtype}, scheme says {scheme.dtype}")
    # A packed weight stores the codes in other elements (u8 words); its layout names the
    # stored code type, which must still be the scheme's (w_scheme stays the model's).
    if w.layout is not None and w.layout.get("codes", scheme.dtype.name) != scheme.dtype.name:
        raise TypeInferenceError(f"qmatmul weight layout {w.layout.name} stores "
                                 f"{w.layout.get('codes')} codes, scheme says {scheme.dtype}")
    if w.layout is None:
        # A packed layout changes the stored shape; the logical checks apply to row_major only.
        check_scheme_operands(scheme, w, w_scale, w_zp, "qmatmul weight")
    _check_g_idx(scheme, types[4] if len(types) > 4 else None, "qmatmul")
    if act != "float":
        if attrs.get("x_scheme") is None:
            raise TypeInferenceError(f"qmatmul act={act} needs an x_scheme")
        if scheme.granularity == "group" or (scheme.granularity == "channel" and scheme.axis != 1):
            raise TypeInferenceError("integer qmatmul needs a per-tensor or per-column weight scale")
    out_dtype = w_scale.dtype if act != "float" else x.dtype
    n = w.shape[1] if w.layout is None else w.layout.get("n", "?")
    shape = matmul_shape(x.shape, (w.shape[0] if w.layout is None else x.shape[-1], n))
    if attrs.get("x_norm") is not None:
        _check_x_norm(types, attrs)
    extra = qmatmul_epilogue_operands(types, attrs)
    if attrs.get("epilogue_pairs"):
        if attrs.get("epilogue") is None or extra or not isinstance(n, int) or n % 2:
            raise TypeInferenceError(f"qmatmul epilogue_pairs needs an epilogue, no epilogue "
                                     f"operands and an even N, not N {n} with "
                                     f"{len(extra)} operands")
        half = TensorType(shape[:-1] + (n // 2,), out_dtype)  # one column of each pair
        return [_apply_epilogue_type(half, [half], attrs["epilogue"])]
    return [_apply_epilogue_type(TensorType(shape, out_dtype), extra, attrs.get("epilogue"))]


def _check_x_norm(types, attrs):
    """qmatmul's x_norm: a known kind, float activations, an epsilon, and the kind's operands
    at the end: a float scale [K] (and for ``layer`` a float bias [K] or none)."""
    kind = attrs["x_norm"]
    if kind not in QMATMUL_X_NORMS:
        raise TypeInferenceError(f"qmatmul x_norm must be one of {tuple(QMATMUL_X_NORMS)}, "
                                 f"not {kind!r}")
    if attrs["act"] != "float":
        raise TypeInferenceError(f"qmatmul x_norm needs act=float, not act={attrs['act']}")
    if attrs.get("x_norm_epsilon") is None:
        raise TypeInferenceError("qmatmul x_norm needs x_norm_epsilon")
    count = QMATMUL_X_NORMS[kind]
    tail = types[len(types) - count:] if len(types) >= QMATMUL_FIXED_OPERANDS + count else []
    scale = tail[0] if tail else None
    if scale is None or not scale.dtype.is_float:
        where = "the last one" if count == 1 else "then its bias"
        raise TypeInferenceError(f"qmatmul x_norm={kind} needs a float scale operand after the "
                                 f"fixed operands ({where})")
    k = types[0].shape[-1]
    for what, t in zip(("scale", "bias"), tail):
        if t is None and what == "bias":
            continue
        if t.rank != 1 or t.shape[0] != k or not t.dtype.is_float:
            raise TypeInferenceError(f"qmatmul x_norm {what} must be [K] = [{k}] floats, "
                                     f"not {t.shape} {t.dtype}")


def _apply_epilogue_type(product: TensorType, extra: list, epilogue: Optional[str]) -> TensorType:
    from qcompiler.ir.elementwise_body import parse_body, result_element_type

    if epilogue is None:
        if extra:
            raise TypeInferenceError(f"qmatmul has {len(extra)} epilogue operands but no epilogue")
        return product
    if any(t is None for t in extra):
        raise TypeInferenceError("qmatmul epilogue operands must not be none")
    body = parse_body(epilogue)
    if body.operand_count() > 1 + len(extra):
        raise TypeInferenceError(f"qmatmul epilogue reads x{body.operand_count() - 1}, "
                                 f"but there are {len(extra)} epilogue operands")
    shape = broadcast_shapes(product.shape, *(t.shape for t in extra))
    if len(shape) != product.rank:
        raise TypeInferenceError(f"qmatmul epilogue operands {[t.shape for t in extra]} would "
                                 f"change the rank of the product {product.shape}")
    dtype = result_element_type(body, [product.dtype] + [t.dtype for t in extra])
    return TensorType(shape, dtype)


# --------------------------------------------------------------------------------------------
# ONNX coverage (issue #13): math, activations, reductions, indexing, convolution and pooling
# --------------------------------------------------------------------------------------------

# Elementwise ops of one operand whose result has the operand's type.
for _name, _summary in [("cos", "cosine"), ("sin", "sine"), ("tan", "tangent"),
                        ("acos", "arc cosine"), ("asin", "arc sine"), ("atan", "arc tangent"),
                        ("cosh", "hyperbolic cosine"), ("sinh", "hyperbolic sine"),
                        ("asinh", "inverse hyperbolic sine"),
                        ("acosh", "inverse hyperbolic cosine"),
                        ("atanh", "inverse hyperbolic tangent"), ("log", "natural logarithm"),
                        ("floor", "round down"), ("ceil", "round up"),
                        ("round", "round half to even"), ("sign", "-1, 0 or 1"),
                        ("softsign", "x / (1 + |x|)"), ("softplus", "log(1 + exp(x))"),
                        ("mish", "x * tanh(softplus(x))"), ("hard_swish", "x * max(0, min(1, x / 6 + 0.5))"),
                        ("not", "logical not"), ("bitwise_not", "bitwise complement")]:
    OPS[_name] = OpDef(_name, f"Elementwise {_summary}", ("x",), {}, 1, _same)

# Elementwise activations with float parameters (ONNX's attribute names and defaults).
ACTIVATION_PARAMS = {
    "leaky_relu": ("x if x >= 0 else alpha * x", {"alpha": 0.01}),
    "elu": ("x if x > 0 else alpha * (exp(x) - 1)", {"alpha": 1.0}),
    "selu": ("gamma * (x if x > 0 else alpha * (exp(x) - 1))",
             {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875}),
    "celu": ("max(0, x) + min(0, alpha * (exp(x / alpha) - 1))", {"alpha": 1.0}),
    "hard_sigmoid": ("max(0, min(1, alpha * x + beta))", {"alpha": 0.2, "beta": 0.5}),
    "thresholded_relu": ("x if x > alpha else 0", {"alpha": 1.0}),
    "shrink": ("x - bias if x > lambd, x + bias if x < -lambd, else 0",
               {"bias": 0.0, "lambd": 0.5}),
}
for _name, (_summary, _params) in ACTIVATION_PARAMS.items():
    OPS[_name] = OpDef(_name, f"Elementwise {_summary}", ("x",),
                       {p: ("float", True) for p in _params}, 1, _same)


@_def("isinf", "Elementwise infinity test (+inf / -inf as `detect_positive` / `detect_negative`)",
      ["x"], {"detect_positive": ("int", True), "detect_negative": ("int", True)})
def _isinf(types, attrs, consts):
    return [TensorType(types[0].shape, BOOL)]


for _name, _summary in [("or", "logical a or b"), ("xor", "logical a xor b")]:
    OPS[_name] = OpDef(_name, f"Broadcasting {_summary}, boolean result", ("a", "b"), {}, 1, _equal)

for _name, _summary in [("bitwise_and", "a & b"), ("bitwise_or", "a | b"),
                        ("bitwise_xor", "a ^ b"), ("prelu", "a if a >= 0 else b * a")]:
    OPS[_name] = OpDef(_name, f"Broadcasting {_summary}", ("a", "b"), {}, 1, _binary)

OPS["mod"] = OpDef("mod", "Broadcasting remainder: sign of b (Python %) or of a (`fmod=1`, C "
                   "fmod)", ("a", "b"), {"fmod": ("int", True)}, 1, _binary)
OPS["bit_shift"] = OpDef("bit_shift", "Broadcasting a << b or a >> b (`direction` left | right)",
                         ("a", "b"), {"direction": ("str", True)}, 1, _binary)

REDUCE_KINDS = ("max", "min", "prod", "sum_square", "l1", "log_sum", "log_sum_exp")


@_def("reduce", "Reduction of `kind` (max, min, prod, sum_square, l1, log_sum, log_sum_exp) "
      "over `axes` (as reduce_mean)", ["x"],
      {"kind": ("str", True), "axes": ("ints", True), "keepdims": ("int", True),
       "noop_with_empty_axes": ("int", False)})
def _reduce(types, attrs, consts):
    if attrs["kind"] not in REDUCE_KINDS:
        raise TypeInferenceError(f"reduce kind {attrs['kind']!r} is not one of {REDUCE_KINDS}")
    return _reduce_mean(types, attrs, consts)


@_def("arg_reduce", "Index (i64) of the max or min (`kind`) along `axis`; the first one, or "
      "the last with select_last_index", ["x"],
      {"kind": ("str", True), "axis": ("int", True), "keepdims": ("int", True),
       "select_last_index": ("int", True)})
def _arg_reduce(types, attrs, consts):
    t = types[0]
    if attrs["kind"] not in ("max", "min"):
        raise TypeInferenceError(f"arg_reduce kind {attrs['kind']!r} is not max or min")
    axis = _norm_axis(attrs["axis"], t.rank)
    shape = [1 if i == axis else d for i, d in enumerate(t.shape)] if attrs["keepdims"] else \
        [d for i, d in enumerate(t.shape) if i != axis]
    return [TensorType(tuple(shape), I64)]


@_def("cumulative", "Running sum or product (`kind`) along `axis` (ONNX CumSum / CumProd)",
      ["x"], {"kind": ("str", True), "axis": ("int", True), "exclusive": ("int", True),
              "reverse": ("int", True)})
def _cumulative(types, attrs, consts):
    if attrs["kind"] not in ("sum", "prod"):
        raise TypeInferenceError(f"cumulative kind {attrs['kind']!r} is not sum or prod")
    _norm_axis(attrs["axis"], types[0].rank)
    return [types[0]]


for _name, _summary in [("log_softmax", "log(softmax(x))"),
                        ("hardmax", "1 at the first maximum, 0 elsewhere")]:
    OPS[_name] = OpDef(_name, f"{_summary} along `axis` (ONNX opset 13 semantics)", ("x",),
                       {"axis": ("int", True)}, 1, _softmax)


@_def("tile", "x repeated `repeats[i]` times along each dim i", ["x", "repeats"])
def _tile(types, attrs, consts):
    t, reps = types[0], _ints(consts[1])
    if reps is None:
        return [TensorType(("?",) * t.rank, t.dtype)]
    if len(reps) != t.rank:
        raise TypeInferenceError(f"tile repeats {reps} do not match rank {t.rank}")
    return [TensorType(tuple(d * r if isinstance(d, int) else ("?" if r != 1 else d)
                             for d, r in zip(t.shape, reps)), t.dtype)]


@_def("pad", "ONNX Pad over all dims: `pads` (begins then ends, negative crops), `mode` "
      "constant | reflect | edge | wrap", ["x", "pads", "value?"], {"mode": ("str", True)})
def _pad(types, attrs, consts):
    t, pads = types[0], _ints(consts[1])
    if attrs["mode"] not in ("constant", "reflect", "edge", "wrap"):
        raise TypeInferenceError(f"pad mode {attrs['mode']!r} is not supported")
    if pads is None:
        return [TensorType(("?",) * t.rank, t.dtype)]
    if len(pads) != 2 * t.rank:
        raise TypeInferenceError(f"pad pads {pads} must have 2 * rank = {2 * t.rank} entries")
    return [TensorType(tuple(d + pads[i] + pads[i + t.rank] if isinstance(d, int)
                             else (d if pads[i] == pads[i + t.rank] == 0 else "?")
                             for i, d in enumerate(t.shape)), t.dtype)]


@_def("trilu", "Upper (`upper=1`) or lower triangle of the last two dims from diagonal k",
      ["x", "k?"], {"upper": ("int", True)})
def _trilu(types, attrs, consts):
    if types[0].rank < 2:
        raise TypeInferenceError(f"trilu takes rank >= 2, not {types[0].shape}")
    return [types[0]]


@_def("topk", "The k largest (`largest=1`) or smallest values along `axis` and their i64 "
      "indices, sorted", ["x", "k"], {"axis": ("int", True), "largest": ("int", True),
                                     "sorted": ("int", True)}, results=2)
def _topk(types, attrs, consts):
    t = types[0]
    axis = _norm_axis(attrs["axis"], t.rank)
    k = _ints(consts[1])
    shape = list(t.shape)
    shape[axis] = k[0] if k is not None else "?"
    return [TensorType(tuple(shape), t.dtype), TensorType(tuple(shape), I64)]


@_def("einsum", "numpy/ONNX einsum over the operands by `equation`", ["xs*"],
      {"equation": ("str", True)})
def _einsum(types, attrs, consts):
    eq = attrs["equation"].replace(" ", "")
    ins, arrow, out = eq.partition("->")
    terms = ins.split(",")
    if len(terms) != len(types):
        raise TypeInferenceError(f"einsum {eq!r} names {len(terms)} operands, got {len(types)}")
    sizes: dict = {}
    counts: dict = {}
    ellipsis: tuple = ()
    for term, t in zip(terms, types):
        letters = term.replace("...", "")
        n_ell = t.rank - len(letters)
        if n_ell < 0 or (n_ell and "..." not in term):
            raise TypeInferenceError(f"einsum term {term!r} does not match rank {t.rank}")
        if "..." in term:
            at = term.index("...")
            ell = t.shape[at:at + n_ell]
            ellipsis = broadcast_shapes(ellipsis, ell) if ellipsis else tuple(ell)
            dims = t.shape[:at] + t.shape[at + n_ell:]
        else:
            dims = t.shape
        for c, d in zip(letters, dims):
            counts[c] = counts.get(c, 0) + 1
            if sizes.get(c, 1) == 1 or sizes.get(c) == "?":
                sizes[c] = d
    if not arrow:
        out = "..." * bool(ellipsis) + "".join(sorted(c for c, k in counts.items() if k == 1))
    shape = []
    for part in out.split("..."):
        shape.extend(sizes.get(c, "?") for c in part)
        shape.extend(ellipsis)
    shape = shape[:len(shape) - len(ellipsis)]  # each part but the last is followed by "..."
    if any(c not in sizes for c in out.replace("...", "")):
        raise TypeInferenceError(f"einsum output {out!r} names an index no operand has")
    return [TensorType(tuple(shape), types[0].dtype)]


RESIZE_ATTRS = {"mode": ("str", True), "coordinate_transformation_mode": ("str", True),
                "nearest_mode": ("str", True), "cubic_coeff_a": ("float", True),
                "exclude_outside": ("int", True), "extrapolation_value": ("float", True),
                "antialias": ("int", True), "axes": ("ints", True),
                "keep_aspect_ratio_policy": ("str", True)}


@_def("resize", "ONNX Resize (opset 19 attributes) by `scales` or `sizes` over `axes` (all "
      "dims when empty)", ["x", "roi?", "scales?", "sizes?"], RESIZE_ATTRS)
def _resize(types, attrs, consts):
    t = types[0]
    axes = [_norm_axis(a, t.rank) for a in attrs["axes"]] or list(range(t.rank))
    scales = _ints_or_floats(consts[2]) if len(consts) > 2 and types[2] is not None else None
    sizes = _ints(consts[3]) if len(consts) > 3 and types[3] is not None else None
    shape = list(t.shape)
    if sizes is not None and attrs["keep_aspect_ratio_policy"] == "stretch":
        for a, s in zip(axes, sizes):
            shape[a] = s
    elif scales is not None and len(scales):
        for a, s in zip(axes, scales):
            d = t.shape[a]
            shape[a] = int(float(s) * d) if isinstance(d, int) else "?"
    else:
        shape = [d if i not in axes else "?" for i, d in enumerate(shape)]
    return [TensorType(tuple(shape), t.dtype)]


def _ints_or_floats(a) -> Optional[list]:
    return None if a is None else [x for x in np.asarray(a).reshape(-1)]


@_def("one_hot", "ONNX OneHot: values[1] where the index (negative from depth) is hot, "
      "values[0] elsewhere; new dim at `axis`", ["indices", "depth", "values"],
      {"axis": ("int", True)})
def _one_hot(types, attrs, consts):
    idx, values = types[0], types[2]
    depth = consts[1]
    d = int(np.asarray(depth).reshape(-1)[0]) if depth is not None else "?"
    axis = _norm_axis(attrs["axis"], idx.rank + 1)
    return [TensorType(idx.shape[:axis] + (d,) + idx.shape[axis:], values.dtype)]


@_def("nonzero", "Indices (i64 [rank, count]) of the non-zero elements, in row-major order",
      ["x"])
def _nonzero(types, attrs, consts):
    return [TensorType((types[0].rank, "?"), I64)]


@_def("scatter_nd", "ONNX ScatterND: data with `updates` written (or combined by `reduction` "
      "none | add | mul | max | min) at index tuples", ["data", "indices", "updates"],
      {"reduction": ("str", True)})
def _scatter_nd(types, attrs, consts):
    if attrs["reduction"] not in ("none", "add", "mul", "max", "min"):
        raise TypeInferenceError(f"scatter reduction {attrs['reduction']!r} is not supported")
    return [types[0]]


@_def("scatter_elements", "ONNX ScatterElements along `axis` with `reduction` (as scatter_nd)",
      ["data", "indices", "updates"], {"axis": ("int", True), "reduction": ("str", True)})
def _scatter_elements(types, attrs, consts):
    _norm_axis(attrs["axis"], types[0].rank)
    return _scatter_nd(types, attrs, consts)


def _window_out(d, k, s, p0, p1, dil, ceil_mode=0):
    if not isinstance(d, int):
        return "?"
    span = (k - 1) * dil + 1
    n = d + p0 + p1 - span
    out = (-(-n // s) if ceil_mode else n // s) + 1
    if ceil_mode and (out - 1) * s >= d + p0:  # the last window must start inside x or its
        out -= 1                               # begin padding (ONNX, PyTorch)
    return out


CONV_ATTRS = {"strides": ("ints", True), "pads": ("ints", True), "dilations": ("ints", True),
              "group": ("int", True)}


@_def("conv", "N-d convolution (ONNX Conv, explicit pads: begins then ends), integer operands "
      "accumulated in i32", ["x", "w", "b?"], CONV_ATTRS)
def _conv(types, attrs, consts):
    x, w = types[0], types[1]
    nsp = x.rank - 2
    if nsp < 1 or w.rank != x.rank:
        raise TypeInferenceError(f"conv of x {x.shape} with w {w.shape}")
    for k in ("strides", "dilations"):
        if len(attrs[k]) != nsp:
            raise TypeInferenceError(f"conv {k} {attrs[k]} must have {nsp} entries")
    if len(attrs["pads"]) != 2 * nsp:
        raise TypeInferenceError(f"conv pads {attrs['pads']} must have {2 * nsp} entries")
    sp = [_window_out(x.shape[2 + i], w.shape[2 + i], attrs["strides"][i], attrs["pads"][i],
                      attrs["pads"][i + nsp], attrs["dilations"][i]) for i in range(nsp)]
    dtype = I32 if x.dtype.is_integer else x.dtype
    return [TensorType((x.shape[0], w.shape[0], *sp), dtype)]


@_def("conv_transpose", "N-d transposed convolution (ONNX ConvTranspose with explicit pads and "
      "output_padding)", ["x", "w", "b?"], {**CONV_ATTRS, "output_padding": ("ints", True)})
def _conv_transpose(types, attrs, consts):
    x, w = types[0], types[1]
    nsp = x.rank - 2
    sp = []
    for i in range(nsp):
        d, k = x.shape[2 + i], w.shape[2 + i]
        if not isinstance(d, int) or not isinstance(k, int):
            sp.append("?")
            continue
        sp.append(attrs["strides"][i] * (d - 1) + attrs["output_padding"][i]
                  + (k - 1) * attrs["dilations"][i] + 1 - attrs["pads"][i] - attrs["pads"][i + nsp])
    c_out = w.shape[1] * attrs["group"] if isinstance(w.shape[1], int) else "?"
    return [TensorType((x.shape[0], c_out, *sp), x.dtype)]


def _channels_first(t: TensorType) -> TensorType:
    """[N, *spatial, C] -> [N, C, *spatial] (a ``channels_last`` operand seen as NCHW)."""
    return TensorType((t.shape[0], t.shape[-1], *t.shape[1:-1]), t.dtype, t.quant)


def _channels_last(t: TensorType) -> TensorType:
    """[N, C, *spatial] -> [N, *spatial, C]."""
    return TensorType((t.shape[0], *t.shape[2:], t.shape[1]), t.dtype, t.quant)


# The operands a node with ``channels_last`` set reads as [N, *spatial, C] (pool, qconv).
CHANNELS_LAST_OPERANDS = ("x", "residual")


def channels_last_operands(op: str) -> frozenset:
    """Positions of ``op``'s CHANNELS_LAST_OPERANDS."""
    names = [o.rstrip("?*") for o in OPS[op].operands]
    return frozenset(names.index(n) for n in CHANNELS_LAST_OPERANDS if n in names)


def _as_channels_last(op: str):
    """Type inference of ``op``, which has a ``channels_last`` attribute: with it set, x (and
    a residual) are [N, *spatial, C] and so are the results; inferred as NCHW in between."""
    def wrap(infer):
        def wrapped(types, attrs, consts):
            if not attrs.get("channels_last", 0):
                return infer(types, attrs, consts)
            if types[0].rank < 3:
                raise TypeInferenceError(f"channels_last needs x of rank >= 3, not "
                                         f"{types[0].shape}")
            moved_ops = channels_last_operands(op)
            moved = [(_channels_first(t) if i in moved_ops and t is not None else t)
                     for i, t in enumerate(types)]
            return [_channels_last(t) for t in infer(moved, attrs, consts)]
        wrapped.__doc__ = infer.__doc__
        return wrapped
    return wrap


@_def("pool", "N-d max / average / lp pooling (`kind`) with explicit pads; max may also give "
      "flat i64 indices", ["x"],
      {"kind": ("str", True), "kernel_shape": ("ints", True), "strides": ("ints", True),
       "pads": ("ints", True), "dilations": ("ints", True), "ceil_mode": ("int", True),
       "count_include_pad": ("int", True), "p": ("int", True), "indices": ("int", False),
       "storage_order": ("int", False), "channels_last": ("int", False)}, results=-1)
@_as_channels_last("pool")
def _pool(types, attrs, consts):
    x = types[0]
    nsp = x.rank - 2
    if attrs["kind"] not in ("max", "average", "lp"):
        raise TypeInferenceError(f"pool kind {attrs['kind']!r} is not max, average or lp")
    if len(attrs["kernel_shape"]) != nsp:
        raise TypeInferenceError(f"pool kernel_shape {attrs['kernel_shape']} for x {x.shape}")
    sp = [_window_out(x.shape[2 + i], attrs["kernel_shape"][i], attrs["strides"][i],
                      attrs["pads"][i], attrs["pads"][i + nsp], attrs["dilations"][i],
                      attrs["ceil_mode"]) for i in range(nsp)]
    y = TensorType((x.shape[0], x.shape[1], *sp), x.dtype)
    if attrs.get("indices", 0):
        if attrs["kind"] != "max":
            raise TypeInferenceError("pool indices are given by max pooling only")
        return [y, TensorType(y.shape, I64)]
    return [y]


@_def("rotary_embedding", "ONNX RotaryEmbedding (opset 23): rotate the first rotary_embedding_dim "
      "features of each head by cos/sin caches (gathered by position_ids when given)",
      ["x", "cos_cache", "sin_cache", "position_ids?"],
      {"interleaved": ("int", True), "num_heads": ("int", True),
       "rotary_embedding_dim": ("int", True)})
def _rotary_embedding(types, attrs, consts):
    if types[0].rank not in (3, 4):
        raise TypeInferenceError(f"rotary_embedding takes 3-D or 4-D x, not {types[0].shape}")
    return [types[0]]


@_def("kv_concat", "A layer's KV cache extended by new keys or values: concat(past[layer], "
      "new, axis=2) with past [L, B, H, P, D] and new [B, H, S, D] ([B, S, H, D] with "
      "new_bshd), result [B, H, P + S, D]", ["past", "new"],
      {"layer": ("int", True), "new_bshd": ("int", True)}, checked_attrs=("layer",))
def _kv_concat(types, attrs, consts):
    past, new = types
    if past.rank != 5 or new.rank != 4:
        raise TypeInferenceError(f"kv_concat takes a 5-D past and a 4-D new, not {past.shape} "
                                 f"and {new.shape}")
    if past.dtype != new.dtype:
        raise TypeInferenceError(f"kv_concat past {past.dtype} and new {new.dtype} differ")
    layers = past.shape[0]
    if attrs["layer"] < 0 or (isinstance(layers, int) and attrs["layer"] >= layers):
        raise TypeInferenceError(f"kv_concat layer {attrs['layer']} of a past with {layers} "
                                 "layers")
    b, h, s, d = new.shape if not attrs["new_bshd"] else (new.shape[0], new.shape[2],
                                                          new.shape[1], new.shape[3])
    p = past.shape[3]
    t = p + s if isinstance(p, int) and isinstance(s, int) else "?"
    return [TensorType((past.shape[1], past.shape[2], t, past.shape[4]), past.dtype)]


@_def("qkv_heads", "An attention layer's inputs from one fused q|k|v projection: qkv "
      "[B, S, (H + 2 Hkv) D] split into heads; with cos/sin caches q and k rotated as "
      "rotary_embedding does; with past caches k and v appended to the layer's cache as "
      "kv_concat does. Results q [B, S, H, D] and k, v [B, Hkv, P + S, D] (with caches) or "
      "[B, S, Hkv, D] (without)",
      ["qkv", "cos_cache?", "sin_cache?", "position_ids?", "past_k?", "past_v?"],
      {"num_heads": ("int", True), "kv_heads": ("int", True), "interleaved": ("int", True),
       "rotary_embedding_dim": ("int", True), "layer": ("int", True)}, results=3,
      checked_attrs=("layer",))
def _qkv_heads(types, attrs, consts):
    qkv = types[0]
    past_k = types[4] if len(types) > 4 else None
    past_v = types[5] if len(types) > 5 else None
    h, hkv = attrs["num_heads"], attrs["kv_heads"]
    if qkv.rank != 3 or h < 1 or hkv < 1 or h % hkv:
        raise TypeInferenceError(f"qkv_heads takes qkv [B, S, (H + 2 Hkv) D] with "
                                 f"Hkv dividing H, not {qkv.shape} with H {h}, Hkv {hkv}")
    width = qkv.shape[2]
    if not isinstance(width, int) or width % (h + 2 * hkv):
        raise TypeInferenceError(f"qkv_heads: width {width} is not (H + 2 Hkv) D with "
                                 f"H {h}, Hkv {hkv}")
    d = width // (h + 2 * hkv)
    cos, sin = types[1] if len(types) > 1 else None, types[2] if len(types) > 2 else None
    if (cos is None) != (sin is None) or (cos is None and len(types) > 3 and types[3] is not None):
        raise TypeInferenceError("qkv_heads takes both rotary caches or neither (and "
                                 "position_ids only with them)")
    b, s = qkv.shape[0], qkv.shape[1]
    q = TensorType((b, s, h, d), qkv.dtype)
    if past_k is None and past_v is None:
        new = TensorType((b, s, hkv, d), qkv.dtype)
        return [q, new, new]
    for name, past in (("past_k", past_k), ("past_v", past_v)):
        if past is None or past.rank != 5 or past.dtype != qkv.dtype or past.shape[2] != hkv \
                or past.shape[4] != d:
            raise TypeInferenceError(f"qkv_heads {name} must be [L, B, {hkv}, P, {d}] "
                                     f"of {qkv.dtype} (both caches or none), not {past}")
    if past_k.shape != past_v.shape:
        raise TypeInferenceError(f"qkv_heads past_k {past_k.shape} and past_v "
                                 f"{past_v.shape} differ")
    layers = past_k.shape[0]
    if attrs["layer"] < 0 or (isinstance(layers, int) and attrs["layer"] >= layers):
        raise TypeInferenceError(f"qkv_heads layer {attrs['layer']} of a past with "
                                 f"{layers} layers")
    p = past_k.shape[3]
    t = p + s if isinstance(p, int) and isinstance(s, int) else "?"
    cache = TensorType((past_k.shape[1], hkv, t, d), qkv.dtype)
    return [q, cache, cache]


@_def("eye_like", "Ones on diagonal `k` of a 2-D tensor of x's shape, zeros elsewhere",
      ["x"], {"k": ("int", True), "dtype": ("type", True)})
def _eye_like(types, attrs, consts):
    if types[0].rank != 2:
        raise TypeInferenceError(f"eye_like takes a 2-D x, not {types[0].shape}")
    return [TensorType(types[0].shape, attrs["dtype"])]


@_def("compress", "The slices of x along `axis` (flattened x when axis is absent) where "
      "`condition` is true", ["x", "condition"], {"axis": ("int", False)})
def _compress(types, attrs, consts):
    t = types[0]
    if "axis" not in attrs:
        return [TensorType(("?",), t.dtype)]
    axis = _norm_axis(attrs["axis"], t.rank)
    return [TensorType(t.shape[:axis] + ("?",) + t.shape[axis + 1:], t.dtype)]


@_def("bitcast", "Reinterpret the bits of each element as `to` (same bit width)", ["x"],
      {"to": ("type", True)})
def _bitcast(types, attrs, consts):
    if types[0].dtype.np_dtype.itemsize != attrs["to"].np_dtype.itemsize:
        raise TypeInferenceError(f"bitcast of {types[0].dtype} to {attrs['to']}: bit widths "
                                 "differ")
    return [TensorType(types[0].shape, attrs["to"])]


@_def("grid_sample", "ONNX GridSample: x [N, C, *sp] sampled at the normalized grid "
      "[N, *out, nd] points (`mode` linear | nearest | cubic, `padding_mode` zeros | border | "
      "reflection)", ["x", "grid"],
      {"mode": ("str", True), "padding_mode": ("str", True), "align_corners": ("int", True)})
def _grid_sample(types, attrs, consts):
    x, grid = types
    if attrs["mode"] not in ("linear", "nearest", "cubic"):
        raise TypeInferenceError(f"grid_sample mode {attrs['mode']!r} is not linear, nearest "
                                 "or cubic")
    if attrs["padding_mode"] not in ("zeros", "border", "reflection"):
        raise TypeInferenceError(f"grid_sample padding_mode {attrs['padding_mode']!r} is not "
                                 "zeros, border or reflection")
    if x.rank < 3 or grid.rank != x.rank or grid.shape[-1] not in (x.rank - 2, "?"):
        raise TypeInferenceError(f"grid_sample of x {x.shape} at grid {grid.shape}")
    if attrs["mode"] == "cubic" and x.rank != 4:
        raise TypeInferenceError("grid_sample cubic mode is 2-D only (ONNX)")
    return [TensorType((x.shape[0], x.shape[1], *grid.shape[1:-1]), x.dtype)]


@_def("unique", "ONNX Unique: the distinct elements (slices along `axis` when given) sorted "
      "(`sorted=1`) or in first-occurrence order, with i64 first indices, inverse indices "
      "and counts", ["x"], {"sorted": ("int", True), "axis": ("int", False)}, results=4)
def _unique(types, attrs, consts):
    t = types[0]
    if "axis" in attrs:
        axis = _norm_axis(attrs["axis"], t.rank)
        y = TensorType(t.shape[:axis] + ("?",) + t.shape[axis + 1:], t.dtype)
    else:
        y = TensorType(("?",), t.dtype)
    return [y, TensorType(("?",), I64), TensorType(("?",), I64), TensorType(("?",), I64)]


@_def("reverse_sequence", "ONNX ReverseSequence: the first sequence_lens[b] steps along "
      "`time_axis` reversed for each batch b along `batch_axis`", ["x", "sequence_lens"],
      {"batch_axis": ("int", True), "time_axis": ("int", True)})
def _reverse_sequence(types, attrs, consts):
    t = types[0]
    if sorted((attrs["batch_axis"], attrs["time_axis"])) != [0, 1] or t.rank < 2:
        raise TypeInferenceError(f"reverse_sequence axes {attrs['batch_axis']}, "
                                 f"{attrs['time_axis']} must be 0 and 1 of a rank >= 2 x")
    if not types[1].dtype.is_integer or types[1].rank != 1:
        raise TypeInferenceError(f"reverse_sequence sequence_lens must be 1-D integers, not "
                                 f"{types[1]}")
    return [t]


@_def("col2im", "ONNX Col2Im: columns [N, C * prod(block), L] summed back into an image "
      "[N, C, *image_shape] (strides, pads: begins then ends, dilations)",
      ["x", "image_shape", "block_shape"],
      {"strides": ("ints", True), "pads": ("ints", True), "dilations": ("ints", True)})
def _col2im(types, attrs, consts):
    x = types[0]
    image, block = _ints(consts[1]), _ints(consts[2])
    if x.rank != 3:
        raise TypeInferenceError(f"col2im takes [N, C * prod(block), L], not {x.shape}")
    if image is None or block is None:
        raise TypeInferenceError("col2im image_shape and block_shape must be constants")
    nsp = len(image)
    if len(block) != nsp or any(len(attrs[k]) != n for k, n in
                                (("strides", nsp), ("dilations", nsp), ("pads", 2 * nsp))):
        raise TypeInferenceError(f"col2im image_shape {image}, block_shape {block}, strides, "
                                 "dilations and pads disagree in rank")
    kk = int(np.prod(block))
    c = x.shape[1] // kk if isinstance(x.shape[1], int) else "?"
    if isinstance(x.shape[1], int) and x.shape[1] % kk:
        raise TypeInferenceError(f"col2im channels {x.shape[1]} not a multiple of {kk}")
    return [TensorType((x.shape[0], c, *image), x.dtype)]


@_def("tensor_scatter", "ONNX TensorScatter: `update` written into the cache along `axis` "
      "from write_indices[b] (0 when absent) of each batch b; `mode` circular wraps",
      ["cache", "update", "write_indices?"], {"mode": ("str", True), "axis": ("int", True)})
def _tensor_scatter(types, attrs, consts):
    cache, update = types[0], types[1]
    if attrs["mode"] not in ("linear", "circular"):
        raise TypeInferenceError(f"tensor_scatter mode {attrs['mode']!r} is not linear or "
                                 "circular")
    axis = _norm_axis(attrs["axis"], cache.rank)
    if axis == 0 or update.rank != cache.rank:
        raise TypeInferenceError(f"tensor_scatter of update {update.shape} into "
                                 f"{cache.shape} along axis {attrs['axis']}")
    return [cache]


@_def("det", "Determinant of each square matrix in the last two dims", ["x"])
def _det(types, attrs, consts):
    t = types[0]
    if t.rank < 2 or (isinstance(t.shape[-1], int) and isinstance(t.shape[-2], int)
                      and t.shape[-1] != t.shape[-2]):
        raise TypeInferenceError(f"det takes [..., M, M], not {t.shape}")
    return [TensorType(t.shape[:-2], t.dtype)]


@_def("max_unpool", "ONNX MaxUnpool: x written at its flat max-pool `indices` of a zero "
      "tensor of `output_shape` (the spatial dims)", ["x", "indices"],
      {"output_shape": ("ints", True)})
def _max_unpool(types, attrs, consts):
    x, idx = types
    if x.rank != idx.rank or not idx.dtype.is_integer:
        raise TypeInferenceError(f"max_unpool x {x.shape} and indices {idx.shape} differ")
    if len(attrs["output_shape"]) != x.rank - 2:
        raise TypeInferenceError(f"max_unpool output_shape {attrs['output_shape']} for x "
                                 f"{x.shape}")
    return [TensorType((x.shape[0], x.shape[1], *attrs["output_shape"]), x.dtype)]


RECURRENT_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
RECURRENT_ACTIVATIONS = ("sigmoid", "tanh", "relu", "affine", "leakyrelu", "thresholdedrelu",
                         "scaledtanh", "hardsigmoid", "elu", "softsign", "softplus")


@_def("recurrent", "ONNX RNN / GRU / LSTM (`kind`) over the whole sequence: Y, Y_h (and Y_c "
      "for lstm); `activations` comma-separated per direction with their alpha / beta",
      ["x", "w", "r", "b?", "sequence_lens?", "initial_h?", "initial_c?", "p?"],
      {"kind": ("str", True), "direction": ("str", True), "hidden_size": ("int", True),
       "layout": ("int", True), "activations": ("str", True),
       "activation_alpha": ("floats", True), "activation_beta": ("floats", True),
       "clip": ("float", True), "linear_before_reset": ("int", True)}, results=-1)
def _recurrent(types, attrs, consts):
    """x [S, B, I] (layout 1: [B, S, I]), w [D, G*H, I], r [D, G*H, H], b [D, 2*G*H];
    Y [S, D, B, H] (layout 1: [B, S, D, H]), Y_h and Y_c [D, B, H] (layout 1: [B, D, H])."""
    kind = attrs["kind"]
    if kind not in RECURRENT_GATES:
        raise TypeInferenceError(f"recurrent kind {kind!r} is not rnn, gru or lstm")
    dirs = {"forward": 1, "reverse": 1, "bidirectional": 2}.get(attrs["direction"])
    if dirs is None:
        raise TypeInferenceError(f"recurrent direction {attrs['direction']!r} is not forward, "
                                 "reverse or bidirectional")
    acts = attrs["activations"].split(",")
    per_dir = {"rnn": 1, "gru": 2, "lstm": 3}[kind]
    if len(acts) != per_dir * dirs or any(a not in RECURRENT_ACTIVATIONS for a in acts):
        raise TypeInferenceError(f"recurrent {kind} activations {acts} ({per_dir} per "
                                 f"direction of {RECURRENT_ACTIVATIONS})")
    if len(attrs["activation_alpha"]) != len(acts) or len(attrs["activation_beta"]) != len(acts):
        raise TypeInferenceError("recurrent activation_alpha / activation_beta must give one "
                                 "value per activation")
    x, w = types[0], types[1]
    h = attrs["hidden_size"]
    if x.rank != 3 or w.rank != 3 or (isinstance(w.shape[0], int) and w.shape[0] != dirs) or \
            (isinstance(w.shape[1], int) and w.shape[1] != RECURRENT_GATES[kind] * h):
        raise TypeInferenceError(f"recurrent {kind} x {x.shape}, w {w.shape} do not fit "
                                 f"{dirs} direction(s) of hidden size {h}")
    seq, batch = (x.shape[1], x.shape[0]) if attrs["layout"] else (x.shape[0], x.shape[1])
    if attrs["layout"]:
        y, state = (batch, seq, dirs, h), (batch, dirs, h)
    else:
        y, state = (seq, dirs, batch, h), (dirs, batch, h)
    out = [TensorType(y, x.dtype), TensorType(state, x.dtype)]
    if kind == "lstm":
        out.append(TensorType(state, x.dtype))
    return out


@_def("linear_attention", "ONNX LinearAttention (opset 27): a recurrent [dk, dv] state per kv "
      "head updated each step by `update_rule` linear | gated | delta | gated_delta and read "
      "by the queries; output [B, T, Hq*dv] and the final state",
      ["q", "k", "v", "past_state?", "decay?", "beta?"],
      {"q_num_heads": ("int", True), "kv_num_heads": ("int", True), "scale": ("float", True),
       "update_rule": ("str", True)}, results=2)
def _linear_attention(types, attrs, consts):
    q, k, v = types[:3]
    hq, hkv, rule = attrs["q_num_heads"], attrs["kv_num_heads"], attrs["update_rule"]
    if rule not in ("linear", "gated", "delta", "gated_delta"):
        raise TypeInferenceError(f"linear_attention update_rule {rule!r} is not linear, "
                                 "gated, delta or gated_delta")
    if hq <= 0 or hkv <= 0 or hq % hkv or q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise TypeInferenceError(f"linear_attention of q {q.shape}, k {k.shape}, v {v.shape} "
                                 f"with {hq} query heads over {hkv} kv heads")
    operands = dict(zip(("decay", "beta"), types[4:6] + [None] * 2))
    for name, wanted in (("decay", rule in ("gated", "gated_delta")),
                         ("beta", rule in ("delta", "gated_delta"))):
        if (operands[name] is not None) != wanted:
            raise TypeInferenceError(f"linear_attention {rule} {'needs' if wanted else 'takes no'}"
                                     f" {name}")
    dk = q.shape[2] // hq if isinstance(q.shape[2], int) else "?"
    dv = v.shape[2] // hkv if isinstance(v.shape[2], int) else "?"
    out_dv = hq * dv if isinstance(dv, int) else "?"
    state_dtype = types[3].dtype if len(types) > 3 and types[3] is not None else q.dtype
    return [TensorType((q.shape[0], q.shape[1], out_dv), q.dtype),
            TensorType((q.shape[0], hkv, dk, dv), state_dtype)]


@_def("deform_conv", "ONNX DeformConv (2-D): a convolution whose kernel taps are moved by "
      "`offset` (bilinear sampling, zeros outside) and scaled by `mask`",
      ["x", "w", "offset", "b?", "mask?"], {**CONV_ATTRS, "offset_group": ("int", True)})
def _deform_conv(types, attrs, consts):
    x, w, offset = types[:3]
    if x.rank != 4 or w.rank != 4 or offset.rank != 4:
        raise TypeInferenceError(f"deform_conv is 2-D: x {x.shape}, w {w.shape}, offset "
                                 f"{offset.shape}")
    out = _conv(types[:2], attrs, consts[:2])[0]
    if any(isinstance(a, int) and isinstance(b, int) and a != b
           for a, b in zip(offset.shape[2:], out.shape[2:])):
        raise TypeInferenceError(f"deform_conv offset {offset.shape} does not match the output "
                                 f"{out.shape}")
    return [TensorType(out.shape, x.dtype)]


def infer_types(op: str, types: list, attrs: dict, consts: list) -> Optional[list[TensorType]]:
    """Result types of ``op`` or None when the op declares its own (constant)."""
    try:
        opdef = OPS[op]
    except KeyError:
        raise TypeInferenceError(f"unknown op {op!r}") from None
    return opdef.infer(types, attrs, consts)


class WatchedOperands(list):
    """The known operand arrays handed to a type inference, noting which ones it reads (the
    plan's shape memo and ``unify-dims``: what an inference read is what its result depends
    on)."""

    def __init__(self, items):
        super().__init__(items)
        self.read: set = set()

    def __getitem__(self, i):
        self.read.update(range(len(self))[i] if isinstance(i, slice) else [i % len(self)])
        return super().__getitem__(i)

    def __iter__(self):
        self.read.update(range(len(self)))
        return super().__iter__()


class WatchedAttributes(dict):
    """A node's attributes handed to a type inference, noting which ones it reads (any
    iteration reads them all)."""

    def __init__(self, items):
        super().__init__(items)
        self.read: set = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)

    def __iter__(self):
        self.read.update(super().keys())
        return super().__iter__()

    def keys(self):
        self.read.update(super().keys())
        return super().keys()

    def items(self):
        self.read.update(super().keys())
        return super().items()

    def values(self):
        self.read.update(super().keys())
        return super().values()

    def copy(self):  # (dict's own copy and | would not go through the methods above)
        self.read.update(super().keys())
        return dict(super().items())

    def __or__(self, other):
        return self.copy() | other


def elem_type(name) -> ElementType:
    return elem(name)


# --------------------------------------------------------------------------------------------
# CNN (issue #15): quantized convolution
# --------------------------------------------------------------------------------------------


QCONV_OUT_MODES = ("float", "quant")
QCONV_REQUANT_MODES = ("float", "dyadic")
QCONV_OPERANDS = ["x", "w", "x_scale", "x_zero_point", "w_scale", "w_zero_point?", "bias?",
                  "y_scale?", "y_zero_point?", "residual?", "r_scale?", "r_zero_point?"]


@_def("qconv", "Quantized N-d convolution: int8/uint8 x codes, int8/int4 w codes (per-tensor "
      "or per-output-channel), i32 accumulation, float or requantized output with a fused "
      "clip/relu and residual add", QCONV_OPERANDS,
      {**CONV_ATTRS, "out": ("str", True), "requant": ("str", False),
       "act_min": ("float", False), "act_max": ("float", False), "config": ("dict", False),
       "channels_last": ("int", False)})
@_as_channels_last("qconv")
def _qconv(types, attrs, consts):
    """acc = sum (x - x_zp) * (w - w_zp[m]) + bias (i32; bias has scale x_scale * w_scale),
    then, with s[m] = f32(x_scale * w_scale[m]):

    - ``out=float``: y = clip(f32(acc) * s[m] + residual, act_min, act_max) (f32).
    - ``out=quant``, ``requant=float`` (onnxruntime's QLinearConv):
      y = clamp(rne(f32(acc) * f32(s[m] / y_scale)
                    + (residual - r_zp) * f32(r_scale / y_scale)) + y_zp, q(act_min), q(act_max))
    - ``out=quant``, ``requant=dyadic`` (integer only, HAWQ-V3): each ratio r above as
      (M, shift) with r ~= M * 2^-shift, M in [2^30, 2^31); y = clamp(rshift(acc * M, shift)
      + y_zp, ...) with rshift rounding half up; with a residual both terms are first shifted
      to f = min(16, shift - 1, shift_r - 1) fraction bits and their sum rounded once:
      rshift(rshift(acc * M, shift - f) + rshift((residual - r_zp) * M_r, shift_r - f), f).
    ``act_min``/``act_max`` are real values (relu: act_min = 0); the quantized bounds are
    their codes, so clamping codes equals quantizing the clipped real value.
    ``config`` (cpu-conv-layout): ``w_shape`` the logical [M, C/g, KH, KW] of packed weights
    (runtime.reference.pack_conv_weights), ``w_layout``, and ``w_shift`` the shift they were
    stored with, or ``w_centred`` (int16 weights minus their zero points, the AVX2 kernel's).
    ``config`` (cuda-conv-layout): ``w_layout`` ``cuda_igemm_mk`` / ``cuda_direct_khwcm`` /
    ``cuda_dw_t4`` (depthwise, taps four to a word),
    int8 weights minus their zero points (``w_centred``), and ``bias_folds_x_zp``: the bias
    operand holds bias - x_zp * sum_k (w - w_zp[m]) (runtime.reference decodes both).
    ``channels_last`` (conv-channels-last): x, a residual and y are [N, *spatial, C].
    """
    x, w = types[0], types[1]
    packed = (attrs.get("config") or {}).get("w_shape")
    if packed is not None:
        w = TensorType(tuple(packed), w.dtype)
        types = [x, w] + list(types[2:])
    nsp = x.rank - 2
    if nsp < 1 or w.rank != x.rank:
        raise TypeInferenceError(f"qconv of x {x.shape} with w {w.shape}")
    w_codes = ("i8", "u8", "i4", "u4") + (("i16",) if packed is not None else ())
    if x.dtype.name not in ("i8", "u8") or w.dtype.name not in w_codes:
        raise TypeInferenceError(f"qconv takes i8/u8 x and i8/u8/i4/u4 w codes, not "
                                 f"{x.dtype} and {w.dtype}")
    out = attrs["out"]
    if out not in QCONV_OUT_MODES:
        raise TypeInferenceError(f"qconv out must be one of {QCONV_OUT_MODES}, not {out!r}")
    requant = attrs.get("requant", "float")
    if requant not in QCONV_REQUANT_MODES:
        raise TypeInferenceError(f"qconv requant must be one of {QCONV_REQUANT_MODES}, "
                                 f"not {requant!r}")
    group = attrs["group"]
    c_in, m = x.shape[1], w.shape[0]
    if isinstance(c_in, int) and isinstance(w.shape[1], int) and (
            group < 1 or c_in != w.shape[1] * group or (isinstance(m, int) and m % group)):
        raise TypeInferenceError(f"qconv group {group}: x has {c_in} channels, w {w.shape}")
    w_scale = types[4]
    if w_scale.shape not in ((), (1,), (m,)):
        raise TypeInferenceError(f"qconv w_scale {w_scale.shape} is neither per-tensor nor "
                                 f"per output channel ({m})")
    y_scale = types[7] if len(types) > 7 else None
    y_zp = types[8] if len(types) > 8 else None
    residual = types[9] if len(types) > 9 else None
    if out == "quant" and (y_scale is None or y_zp is None):
        raise TypeInferenceError("qconv out=quant needs y_scale and y_zero_point")
    if residual is not None and out == "quant" and (len(types) < 12 or types[10] is None
                                                     or types[11] is None):
        raise TypeInferenceError("qconv quantized residual needs r_scale and r_zero_point")
    attrs_conv = {k: attrs[k] for k in CONV_ATTRS}
    shape = _conv(types[:2], attrs_conv, consts)[0].shape
    dtype = F32 if out == "float" else y_zp.dtype
    if residual is not None and tuple(residual.shape) != tuple(shape):
        raise TypeInferenceError(f"qconv residual {residual.shape} is not the output {shape}")
    return [TensorType(shape, dtype)]
