"""The computation of each op kernel, in TVM TE: placeholders for the operands, one
``te.compute`` per result (plus named intermediate stages that the schedule places).

Every builder returns a ``Kernel``: the placeholders of all operands that are not ``none`` (in
order; operands whose values are baked into the code, such as slice bounds or a reshape's
shape, are still parameters, unused, so that a caller passes every operand), the result
tensors, the schedule kind and the values baked into the code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qcompiler.codegen.cpu.ops import scalar
from qcompiler.codegen.cpu.ops.common import (Dims, broadcast_index, compute_dtype,
                                              constant_operand, dtype_of, is_float_dtype,
                                              tvm_dtype, unsupported)
from qcompiler.ir.core import Node
from qcompiler.ir.types import elem


@dataclass
class Kernel:
    inputs: list
    outputs: list
    kind: str  # injective | rows | reduce | matmul | attention
    rows: int = 0  # rows kind: leading output dims that index one row (one iteration)
    baked: dict = field(default_factory=dict)
    # scalar parameters after the results: the node's launch constants (ops/common.py
    # LAUNCH_CONSTANTS), each call passing its node's values
    params: list = field(default_factory=list)
    # injective kind: intermediate stages computed once into buffers of their own (their own
    # loop nests, before the results) instead of inlined into every use
    stages: list = field(default_factory=list)


BUILDERS: dict[str, Callable] = {}


def _builder(*ops):
    def wrap(fn):
        for op in ops:
            BUILDERS[op] = fn
        return fn
    return wrap


class _Ctx:
    """Dims and placeholders of one node."""

    def __init__(self, node: Node, module=None):
        from tvm import te

        self.node = node
        self.module = module
        self.dims = Dims()
        self.inputs = []
        self.by_operand = {}
        for i, v in enumerate(node.operands):
            if v is None:
                continue
            p = te.placeholder(self.dims.shape(v.type), tvm_dtype(v.type.dtype, node),
                               name=f"in{i}")
            self.inputs.append(p)
            self.by_operand[i] = p
        self.out_shapes = [self.dims.shape(r.type) for r in node.results]
        self.out_dtypes = [tvm_dtype(r.type.dtype, node) for r in node.results]

    def operand(self, i):
        return self.by_operand[i]

    def has(self, i) -> bool:
        return i in self.by_operand

    def otype(self, i):
        return self.node.operands[i].type

    @property
    def rtype(self):
        return self.node.results[0].type


def _i64(v):
    from tvm import tirx

    return tirx.IntImm("int64", int(v)) if isinstance(v, (int, np.integer)) else v


def _load_bcast(ctx: _Ctx, i: int, out_index: list):
    p = ctx.operand(i)
    idx = broadcast_index(ctx.otype(i), list(p.shape), ctx.rtype, out_index)
    return (p[tuple(idx)] if idx else p[()]).asobject()


def _compute(shape, fn, name):
    """te.compute that also accepts rank-0 results."""
    from tvm import te

    if not shape:
        return te.compute((), lambda: fn([]), name=name)
    return te.compute(shape, lambda *i: fn(list(i)), name=name)


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------


@_builder(*scalar.ELEMENTWISE_OPS)
def _elementwise(ctx: _Ctx) -> Kernel:
    node = ctx.node
    out_dtype = ctx.out_dtypes[0]
    # gelu's approximation; the ONNX activations' parameters (alpha, ...) as the attrs
    attr = node.attrs.get("approximate", "none") if node.op == "gelu" else dict(node.attrs)
    n = len(node.operands)

    def fn(i):
        args = [_load_bcast(ctx, k, i) for k in range(n)]
        return scalar.apply(node.op, attr, args, out_dtype)

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("cast")
def _cast(ctx: _Ctx) -> Kernel:
    src, dst = ctx.otype(0).dtype, ctx.rtype.dtype
    if src.kind == "nf4":
        raise unsupported(ctx.node, f"cast {src} -> {dst}")
    src_code = src.storage in scalar.NARROW_FLOATS
    dst_code = dst.storage in scalar.NARROW_FLOATS
    saturate = bool(ctx.node.attrs.get("saturate", 1))
    f64 = elem("f64")

    def fn(i):
        x = _load_bcast(ctx, 0, i)
        if src_code:  # float8/float4 codes: their float64 value, then as from f64
            x, from_type = scalar.decode_narrow_float(x, src), f64
        else:
            from_type = src
        if dst_code:
            v = x if dtype_of(x) == "float64" else x.astype("float64")
            return scalar.encode_narrow_float(v, dst, saturate)
        return scalar.cast(x, from_type, dst, ctx.out_dtypes[0])

    out = _compute(ctx.out_shapes[0], fn, "out")
    return Kernel(ctx.inputs, [out], "injective")


def _literal_dtype(stmt, arg_dtypes):
    candidates = arg_dtypes[1:] if stmt.op == "where" else arg_dtypes
    for d in candidates:
        if d is not None and is_float_dtype(d):
            return d
    return "float32"


def _stmt_dtype(stmt, arg_dtypes, node):
    from qcompiler.ir.elementwise_body import BOOL_RESULT_OPS

    if stmt.op in BOOL_RESULT_OPS:
        return "bool"
    if stmt.op == "cast":
        return tvm_dtype(elem(stmt.attr), node)
    if stmt.op == "where":
        return arg_dtypes[1]
    return arg_dtypes[0]


def body_value(node: Node, text: str, operands: list, out_dtype: str):
    """The value of an elementwise body on loaded ``operands`` (x0, x1, ...), statement by
    statement rounded to each statement's element type (as ``elementwise_body.evaluate``)."""
    from tvm import tirx

    from qcompiler.ir.elementwise_body import parse_body

    body = parse_body(text)
    env = {f"x{i}": v for i, v in enumerate(operands)}
    elems = {f"x{i}": None for i in range(len(operands))}
    # Each statement's value is bound to a variable (a TIR Let) that later statements read:
    # one read per use would repeat its whole expression, and an expression with Lets of its
    # own (the GELUs') twice in one tree is ill-formed TIR. Boolean values are not bound
    # (TVM's vectorizer fails on a boolean Let); they are comparisons of bound values.
    # Nor are bfloat16 values: TVM's bfloat16 legalization retypes a value but not its Let
    # variable ("value.ty() == var->ty" fails at build), and a float32 variable cast back to
    # bfloat16 inside the tree is refused too ("BF16 needs to be storage lowered first").
    lets = []
    for s in body.stmts:
        known = [dtype_of(env[a]) if isinstance(a, str) else None for a in s.args]
        lit = _literal_dtype(s, known)
        args = [env[a] if isinstance(a, str) else tirx.const(float(a), lit) for a in s.args]
        arg_dtypes = [dtype_of(a) for a in args]
        dtype = _stmt_dtype(s, arg_dtypes, node)
        if s.op == "cast":
            src = elems.get(s.args[0]) if isinstance(s.args[0], str) else None
            src = src or _elem_of(arg_dtypes[0])
            value = scalar.cast(args[0], src, elem(s.attr), dtype)
            elems[s.dst] = elem(s.attr)
        else:
            value = scalar.apply(s.op, s.attr, args, dtype)
        if dtype_of(value) not in ("bool", "bfloat16"):
            var = tirx.Var(s.dst, dtype_of(value))
            lets.append((var, value))
            value = var
        env[s.dst] = value
    y = env[body.result]
    y = y if dtype_of(y) == out_dtype else y.astype(out_dtype)
    for var, value in reversed(lets):
        y = tirx.Let(var, value, y)
    return y


def _elem_of(dtype: str):
    names = {"bool": "bool", "int8": "i8", "uint8": "u8", "int16": "i16", "uint16": "u16",
             "int32": "i32", "uint32": "u32", "int64": "i64", "uint64": "u64",
             "float16": "f16", "float32": "f32", "float64": "f64", "bfloat16": "bf16"}
    return elem(names[dtype])


@_builder("fused_elementwise")
def _fused(ctx: _Ctx) -> Kernel:
    node = ctx.node
    n = len(node.operands)

    def fn(i):
        args = [_load_bcast(ctx, k, i) for k in range(n)]
        return body_value(node, node.attrs["body"], args, ctx.out_dtypes[0])

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


# --------------------------------------------------------------------------------------------
# row reductions: softmax, layernorm, rmsnorm
# --------------------------------------------------------------------------------------------


def _row_split(ctx: _Ctx, axis: int):
    x = ctx.operand(0)
    rank = len(x.shape)
    axis = axis % rank if rank else 0
    return x, rank, axis


def _reduce_axes(shape, names):
    from tvm import te

    return [te.reduce_axis((0, d), name=n) for d, n in zip(shape, names)]


@_builder("softmax")
def _softmax(ctx: _Ctx) -> Kernel:
    from tvm import te

    x, rank, axis = _row_split(ctx, ctx.node.attrs["axis"])
    ct = compute_dtype(dtype_of(x))
    shape = list(x.shape)
    red_shape = shape[:axis] + shape[axis + 1:]

    def at(i, k):  # full index from the row index (without axis) and k
        return tuple(i[:axis]) + (k,) + tuple(i[axis:])

    k1 = te.reduce_axis((0, shape[axis]), name="k1")
    row_max = te.compute(red_shape, lambda *i: te.max(x[at(i, k1)].astype(ct), axis=k1),
                         name="row_max")
    ex = te.compute(shape, lambda *i: _exp(
        x[i].astype(ct) - row_max[tuple(i[:axis]) + tuple(i[axis + 1:])]), name="exp")
    k2 = te.reduce_axis((0, shape[axis]), name="k2")
    row_sum = te.compute(red_shape, lambda *i: te.sum(ex[at(i, k2)], axis=k2), name="row_sum")
    out = te.compute(shape, lambda *i: (ex[i] / row_sum[tuple(i[:axis]) + tuple(i[axis + 1:])])
                     .astype(ctx.out_dtypes[0]), name="out")
    return Kernel(ctx.inputs, [out], "rows", rows=axis)


def _exp(x):
    """e^x of softmax weights (x <= 0): vectorizable in float32 (``scalar.exp_f32``)."""
    from tvm import te

    return scalar.exp_f32(x) if dtype_of(x) == "float32" else te.exp(x)


def _norm_parts(ctx: _Ctx):
    x, rank, axis = _row_split(ctx, ctx.node.attrs["axis"])
    shape = list(x.shape)
    return x, shape, axis, shape[:axis], shape[axis:], compute_dtype(dtype_of(x))


def _count(dims, ct):
    from tvm import tirx

    n = tirx.IntImm("int64", 1)
    for d in dims:
        n = n * d
    return n.astype(ct)


def _param_bcast(ctx: _Ctx, i: int, index: list, ct: str):
    p = ctx.operand(i)
    idx = broadcast_index(ctx.otype(i), list(p.shape), ctx.otype(0), index)
    return (p[tuple(idx)] if idx else p[()]).astype(ct)


@_builder("layernorm")
def _layernorm(ctx: _Ctx) -> Kernel:
    from tvm import te, tirx

    x, shape, axis, rows, cols, ct = _norm_parts(ctx)
    eps = tirx.const(ctx.node.attrs["epsilon"], ct)
    n = _count(cols, ct)
    ks = _reduce_axes(cols, [f"k{j}" for j in range(len(cols))])
    # Reductions must be whole stages in TE: sums here, the divisions in their consumers.
    total = te.compute(rows, lambda *r: te.sum(x[tuple(r) + tuple(ks)].astype(ct), axis=ks),
                       name="total")
    ks2 = _reduce_axes(cols, [f"j{j}" for j in range(len(cols))])

    def sq(r, c):
        d = x[tuple(r) + tuple(c)].astype(ct) - total[tuple(r)] / n
        return d * d

    sq_sum = te.compute(rows, lambda *r: te.sum(sq(r, ks2), axis=ks2), name="sq_sum")

    def fn(*i):
        r = tuple(i[:axis])
        inv_std = tirx.const(1, ct) / te.sqrt(sq_sum[r] / n + eps)
        y = (x[i].astype(ct) - total[r] / n) * inv_std * _param_bcast(ctx, 1, list(i), ct)
        if ctx.has(2):
            y = y + _param_bcast(ctx, 2, list(i), ct)
        return y.astype(ctx.out_dtypes[0])

    out = te.compute(shape, fn, name="out")
    return Kernel(ctx.inputs, [out], "rows", rows=axis)


@_builder("rmsnorm")
def _rmsnorm(ctx: _Ctx) -> Kernel:
    from tvm import te, tirx

    x, shape, axis, rows, cols, ct = _norm_parts(ctx)
    eps = tirx.const(ctx.node.attrs["epsilon"], ct)
    n = _count(cols, ct)
    ks = _reduce_axes(cols, [f"k{j}" for j in range(len(cols))])

    def sq(r):
        v = x[tuple(r) + tuple(ks)].astype(ct)
        return v * v

    sq_sum = te.compute(rows, lambda *r: te.sum(sq(r), axis=ks), name="sq_sum")
    out = te.compute(shape, lambda *i: (x[i].astype(ct) / te.sqrt(sq_sum[tuple(i[:axis])] / n + eps)
                                        * _param_bcast(ctx, 1, list(i), ct))
                     .astype(ctx.out_dtypes[0]), name="out")
    return Kernel(ctx.inputs, [out], "rows", rows=axis)


# --------------------------------------------------------------------------------------------
# reduce_mean / reduce_sum / reduce_l2
# --------------------------------------------------------------------------------------------


@_builder("reduce_mean", "reduce_sum", "reduce_l2")
def _reduce(ctx: _Ctx) -> Kernel:
    from tvm import te, tirx

    node = ctx.node
    x = ctx.operand(0)
    rank = len(x.shape)
    axes = list(node.attrs["axes"])
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        out = _compute(ctx.out_shapes[0], lambda i: x[tuple(i)] if i else x[()], "out")
        return Kernel(ctx.inputs, [out], "injective")
    axes = sorted({a % rank for a in axes}) if axes else list(range(rank))
    keep = bool(node.attrs["keepdims"])
    dtype = dtype_of(x)
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype
    ks = _reduce_axes([x.shape[a] for a in axes], [f"k{a}" for a in axes])

    def full_index(i):
        """x's index from the result index i and the reduce axes."""
        idx, it, kt = [], iter(i), iter(ks)
        for d in range(rank):
            if d in axes:
                if keep:
                    next(it)  # the kept unit dim
                idx.append(next(kt))
            else:
                idx.append(next(it))
        return tuple(idx)

    def term(i):
        v = x[full_index(i)].astype(ct)
        return v * v if node.op == "reduce_l2" else v

    def fn(i):
        total = te.sum(term(i), axis=ks)
        return total

    acc = _compute(ctx.out_shapes[0], fn, "acc")
    count = tirx.IntImm("int64", 1)
    for a in axes:
        count = count * x.shape[a]

    def finish(i):
        v = acc[tuple(i)] if i else acc[()]
        if node.op == "reduce_l2":
            v = te.sqrt(v) if is_float_dtype(ct) else \
                te.sqrt(v.astype("float64")).astype(ct)
        elif node.op == "reduce_mean":
            v = v / count.astype(ct) if is_float_dtype(ct) else tirx.truncdiv(v, count.astype(ct))
        return v.astype(ctx.out_dtypes[0])

    out = _compute(ctx.out_shapes[0], finish, "out")
    return Kernel(ctx.inputs, [out], "reduce")


# --------------------------------------------------------------------------------------------
# data movement
# --------------------------------------------------------------------------------------------


def _flat_copy(ctx: _Ctx) -> Kernel:
    """out (any shape with the same element count) = x in row-major order."""
    from tvm import tirx

    x = ctx.operand(0)
    in_shape = list(x.shape)
    out_shape = ctx.out_shapes[0]
    if [str(a) for a in in_shape] == [str(b) for b in out_shape]:
        out = _compute(out_shape, lambda i: x[tuple(i)] if i else x[()], "out")
        return Kernel(ctx.inputs, [out], "injective")

    def fn(i):
        flat = tirx.IntImm("int64", 0)
        for d, e in zip(i, out_shape):
            flat = flat * e + d
        idx = []
        for e in reversed(in_shape):
            idx.append(tirx.floormod(flat, e))
            flat = tirx.floordiv(flat, e)
        return x[tuple(reversed(idx))] if in_shape else x[()]

    return Kernel(ctx.inputs, [_compute(out_shape, fn, "out")], "injective")


BUILDERS["identity"] = _flat_copy
BUILDERS["reshape"] = _flat_copy
BUILDERS["squeeze"] = _flat_copy
BUILDERS["unsqueeze"] = _flat_copy


@_builder("expand")
def _expand(ctx: _Ctx) -> Kernel:
    out = _compute(ctx.out_shapes[0], lambda i: _load_bcast(ctx, 0, i), "out")
    return Kernel(ctx.inputs, [out], "injective")


@_builder("transpose")
def _transpose(ctx: _Ctx) -> Kernel:
    perm = list(ctx.node.attrs["perm"])
    x = ctx.operand(0)

    def fn(i):
        idx = [None] * len(perm)
        for out_axis, in_axis in enumerate(perm):
            idx[in_axis] = i[out_axis]
        return x[tuple(idx)]

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("concat")
def _concat(ctx: _Ctx) -> Kernel:
    from tvm import tirx

    xs = ctx.inputs
    rank = len(xs[0].shape)
    axis = ctx.node.attrs["axis"] % rank

    def fn(i):
        offsets, start = [], tirx.IntImm("int64", 0)
        for x in xs:
            offsets.append(start)
            start = start + x.shape[axis]

        def load(k):
            idx = list(i)
            idx[axis] = i[axis] - offsets[k]
            return xs[k][tuple(idx)]

        value = load(len(xs) - 1)
        for k in range(len(xs) - 2, -1, -1):  # if_then_else reads only the branch taken
            value = tirx.if_then_else(i[axis] < offsets[k + 1], load(k), value)
        return value

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("kv_concat")
def _kv_concat(ctx: _Ctx) -> Kernel:
    """concat(past[layer], new, axis=2): the layer's cache read in place from the stacked
    [L, B, H, P, D] past, the new rows from [B, H, S, D] (or [B, S, H, D] with new_bshd)."""
    from tvm import tirx

    past, fresh = ctx.inputs
    layer = tirx.Var("layer", "int64")  # a launch constant
    bshd = ctx.node.attrs["new_bshd"]
    cached = past.shape[3]

    def fn(i):
        b, h, t, d = i
        s = t - cached
        new = fresh[(b, s, h, d)] if bshd else fresh[(b, h, s, d)]
        return tirx.if_then_else(t < cached, past[(layer, b, h, t, d)], new)

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective",
                  params=[layer])


def _rotary_element(ctx: _Ctx, at, b, s, d, rd: int, ct, dtype):
    """Element d of a head rotated as ONNX RotaryEmbedding does (``at(dd)``: the head's
    element dd in the compute type ``ct``): the first ``rd`` features rotated in pairs
    (halves, or adjacent with interleaved) by the cos/sin cache row of the token's position
    (operands 1 and 2; position_ids operand 3 when given, else s; a 3-D cache is already per
    [b, s]), the rest copied. Shared by rotary_embedding and qkv_heads."""
    from tvm import tirx

    cos, sin = ctx.operand(1), ctx.operand(2)
    if len(cos.shape) == 3:
        row = (b, s)
    elif ctx.has(3):
        row = (ctx.operand(3)[(b, s)].astype("int64"),)
    else:
        row = (s,)
    half = rd // 2
    if ctx.node.attrs["interleaved"]:
        j = tirx.floordiv(d, _i64(2))
        first = tirx.floormod(d, _i64(2)) == _i64(0)
        partner = tirx.Select(first, d + _i64(1), d - _i64(1))
    else:
        first = d < _i64(half)
        j = tirx.Select(first, d, d - _i64(half))
        partner = tirx.Select(first, d + _i64(half), d - _i64(half))
    inside = d < _i64(rd)
    j = tirx.Select(inside, j, _i64(0))
    partner = tirx.Select(inside, partner, d)
    cv, sv = cos[row + (j,)].astype(ct), sin[row + (j,)].astype(ct)
    xv, xp = at(d), at(partner)
    rotated = tirx.Select(first, cv * xv - sv * xp, sv * xp + cv * xv)
    return tirx.Select(inside, rotated, xv).astype(dtype)


@_builder("qkv_heads")
def _qkv_heads(ctx: _Ctx) -> Kernel:
    """fuse-qkv's split of one q|k|v projection [B, S, (H + 2 Hkv) D] into q [B, S, H, D]
    and k, v: [B, S, Hkv, D], or the layer's caches [B, Hkv, P + S, D] extended as kv_concat
    does when past caches are given; q and k rotated as rotary_embedding does when cos/sin
    are given."""
    from tvm import tirx

    node = ctx.node
    a = node.attrs
    qkv = ctx.operand(0)
    heads, kv_heads = a["num_heads"], a["kv_heads"]
    width = ctx.otype(0).shape[2]
    if not isinstance(width, int):
        raise unsupported(node, "qkv_heads needs a static projection width")
    head_dim = width // (heads + 2 * kv_heads)
    rd = a["rotary_embedding_dim"] or head_dim
    dtype = dtype_of(qkv)
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype
    rotary = ctx.has(1)
    layer = tirx.Var("layer", "int64")  # a launch constant

    def value(b, s, head, d, rotate: bool):
        """Element d of head ``head`` of token (b, s), rotated if asked."""
        base = _i64(head_dim) * head

        def at(dd):
            return qkv[(b, s, base + dd)].astype(ct)

        if not rotate:
            return qkv[(b, s, base + d)]
        return _rotary_element(ctx, at, b, s, d, rd, ct, dtype)

    def q_fn(i):
        b, s, h, d = i
        return value(b, s, h, d, rotary)

    def kv_fn(first_head: int, rotate: bool, past_operand: int):
        def fn(i):
            if not ctx.has(past_operand):  # [B, S, Hkv, D]
                b, s, h, d = i
                return value(b, s, _i64(first_head) + h, d, rotate)
            past = ctx.operand(past_operand)  # [L, B, Hkv, P, D]: rows t < P are the cache's
            b, h, t, d = i
            cached = past.shape[3]
            return tirx.if_then_else(t < cached, past[(layer, b, h, t, d)],
                                     value(b, t - cached, _i64(first_head) + h, d, rotate))
        return fn

    outs = [_compute(ctx.out_shapes[0], q_fn, "q"),
            _compute(ctx.out_shapes[1], kv_fn(heads, rotary, 4), "k"),
            _compute(ctx.out_shapes[2], kv_fn(heads + kv_heads, False, 5), "v")]
    return Kernel(ctx.inputs, outs, "injective", params=[layer])


@_builder("split")
def _split(ctx: _Ctx) -> Kernel:
    from tvm import tirx

    x = ctx.operand(0)
    axis = ctx.node.attrs["axis"] % len(x.shape)
    outs, off = [], 0
    for k, (shape, size) in enumerate(zip(ctx.out_shapes, ctx.node.attrs["sizes"])):
        def fn(i, off=off):
            idx = list(i)
            idx[axis] = i[axis] + tirx.IntImm("int64", off)
            return x[tuple(idx)]
        outs.append(_compute(shape, fn, f"out{k}"))
        off += int(size)
    return Kernel(ctx.inputs, outs, "injective")


def _slice_start(s: int, step: int, d):
    """Python's slice.indices start for dim d (an int64 expression when d is symbolic)."""
    from tvm import tirx

    if isinstance(d, tirx.IntImm):
        return slice(s, None, step).indices(int(d))[0]
    s64 = tirx.IntImm("int64", s)
    if step > 0:
        v = d + s64 if s < 0 else s64
        return tirx.max(tirx.min(v, d), tirx.IntImm("int64", 0))
    v = d + s64 if s < 0 else s64
    return tirx.max(tirx.min(v, d - 1), tirx.IntImm("int64", -1))


@_builder("slice")
def _slice(ctx: _Ctx) -> Kernel:
    node = ctx.node
    consts = [constant_operand(node, i, ctx.module) for i in range(1, len(node.operands))]
    for i, c in enumerate(consts, start=1):
        if node.operand(i) is not None and c is None:
            raise unsupported(node, f"slice operand {i} is not a constant")
    starts = [int(v) for v in consts[0].reshape(-1)]
    axes = [int(v) for v in consts[2].reshape(-1)] if len(consts) > 2 and consts[2] is not None \
        else list(range(len(starts)))
    steps = [int(v) for v in consts[3].reshape(-1)] if len(consts) > 3 and consts[3] is not None \
        else [1] * len(starts)
    if 0 in steps:
        raise unsupported(node, "slice step 0")
    x = ctx.operand(0)
    rank = len(x.shape)
    begin = {a % rank: (s, st) for s, a, st in zip(starts, axes, steps)}

    def fn(i):
        idx = list(i)
        for a, (s, st) in begin.items():
            idx[a] = _i64(_slice_start(s, st, x.shape[a])) + i[a] * st
        return x[tuple(idx)]

    baked = {"starts": starts, "axes": axes, "steps": steps,
             "ends": [int(v) for v in consts[1].reshape(-1)]}
    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective",
                  baked=baked)


def _wrap_index(i, dim):
    """ONNX negative index -> dim + i; clamped into [0, dim) so a bad index cannot read
    outside the buffer (the reference raises on it)."""
    from tvm import tirx

    i = i.astype("int64")
    i = tirx.Select(i < tirx.IntImm("int64", 0), i + dim, i)
    return tirx.max(tirx.min(i, dim - 1), tirx.IntImm("int64", 0))


@_builder("gather")
def _gather(ctx: _Ctx) -> Kernel:
    x, ind = ctx.operand(0), ctx.operand(1)
    axis = ctx.node.attrs["axis"] % len(x.shape)
    q = len(ind.shape)

    def fn(i):
        pos = ind[tuple(i[axis:axis + q])] if q else ind[()]
        idx = list(i[:axis]) + [_wrap_index(pos, x.shape[axis])] + list(i[axis + q:])
        return x[tuple(idx)]

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("gather_elements")
def _gather_elements(ctx: _Ctx) -> Kernel:
    x, ind = ctx.operand(0), ctx.operand(1)
    axis = ctx.node.attrs["axis"] % len(x.shape)

    def fn(i):
        idx = list(i)
        idx[axis] = _wrap_index(ind[tuple(i)], x.shape[axis])
        return x[tuple(idx)]

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("gather_nd")
def _gather_nd(ctx: _Ctx) -> Kernel:
    from tvm import tirx

    x, ind = ctx.operand(0), ctx.operand(1)
    b = ctx.node.attrs.get("batch_dims", 0)
    depth = ctx.otype(1).shape[-1]
    if not isinstance(depth, int):
        raise unsupported(ctx.node, "gather_nd index depth is not static")
    lead = len(ind.shape) - 1  # result dims taken from indices (batch included)

    def fn(i):
        head = list(i[:lead])
        pos = [_wrap_index(ind[tuple(head) + (tirx.IntImm("int64", k),)], x.shape[b + k])
               for k in range(depth)]
        return x[tuple(head[:b] + pos + list(i[lead:]))]

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("range")
def _range(ctx: _Ctx) -> Kernel:
    start, delta = ctx.operand(0), ctx.operand(2)
    dtype = ctx.out_dtypes[0]
    ct = "float64" if is_float_dtype(dtype) else "int64"

    def fn(i):
        return (start[()].astype(ct) + i[0].astype(ct) * delta[()].astype(ct)).astype(dtype)

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("shape")
def _shape(ctx: _Ctx) -> Kernel:
    from tvm import tirx

    x = ctx.operand(0)
    r = len(x.shape)
    start = ctx.node.attrs.get("start", 0)
    end = ctx.node.attrs.get("end", r)
    dims = [x.shape[k] for k in range(*slice(start, end).indices(r))]

    def fn(i):
        value = tirx.IntImm("int64", 0)
        for k, d in reversed(list(enumerate(dims))):
            value = tirx.Select(i[0] == k, d, value)
        return value

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


# --------------------------------------------------------------------------------------------
# matmul and attention
# --------------------------------------------------------------------------------------------


@_builder("matmul")
def _matmul(ctx: _Ctx) -> Kernel:
    from tvm import te

    a, b = ctx.operand(0), ctx.operand(1)
    ta, tb = ctx.otype(0), ctx.otype(1)
    if ta.rank < 2 or tb.rank < 2:
        return _matmul_vector(ctx, a, b, ta, tb)
    dtype = dtype_of(a)
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype
    out_shape = ctx.out_shapes[0]
    batch = len(out_shape) - 2
    k = te.reduce_axis((0, a.shape[-1]), name="k")

    def operand_index(p, t, i, last2):
        lead = broadcast_index(t.with_shape(t.shape[:-2]), list(p.shape[:-2]),
                               ctx.rtype.with_shape(ctx.rtype.shape[:-2]), list(i[:batch]))
        return tuple(lead) + last2

    if _weight_tiles_fit(ta, tb, ct):
        return _matmul_weight_tiles(ctx, a, b, ta, out_shape, ct)
    acc = te.compute(out_shape, lambda *i: te.sum(
        a[operand_index(a, ta, i, (i[batch], k))].astype(ct)
        * b[operand_index(b, tb, i, (k, i[batch + 1]))].astype(ct), axis=k), name="acc")
    outs = acc
    if ct != ctx.out_dtypes[0]:
        outs = te.compute(out_shape, lambda *i: acc[i].astype(ctx.out_dtypes[0]), name="out")
    return Kernel(ctx.inputs, [outs], "matmul", rows=batch + 1)


def _matmul_vector(ctx: _Ctx, a, b, ta, tb) -> Kernel:
    """numpy's (and ONNX MatMul's) 1-D operands: a [K] is one row and b [K] one column, and
    the product drops the dim each stands for: [K] @ [..., K, N] -> [..., N], [..., M, K] @
    [K] -> [..., M], [K] @ [K] -> []. A dot product per output element (a reduce kernel)."""
    from tvm import te

    dtype = dtype_of(a)
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype
    out_shape = ctx.out_shapes[0]
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    if ta.rank == 1 and tb.rank == 1:
        def dot(*i):
            return te.sum(a[k].astype(ct) * b[k].astype(ct), axis=k)
    elif ta.rank == 1:  # b's leading dims are the result's (a 1-D a broadcasts over them)
        def dot(*i):
            return te.sum(a[k].astype(ct) * b[tuple(i[:-1]) + (k, i[-1])].astype(ct), axis=k)
    else:
        def dot(*i):
            return te.sum(a[tuple(i) + (k,)].astype(ct) * b[k].astype(ct), axis=k)
    acc = te.compute(out_shape, dot, name="acc")
    out = te.compute(out_shape, lambda *i: acc[i].astype(ctx.out_dtypes[0]), name="out")
    return Kernel(ctx.inputs, [out], "reduce")


# Rows of x in one register tile of a float matmul by a 2-D weight (schedule_matmul puts
# MATMUL_TILE_ROWS x a few vectors of columns of sums in registers).
MATMUL_TILE_ROWS = 4


def _weight_tiles_fit(ta, tb, ct: str) -> bool:
    """x [..., M, K] float32 times a 2-D weight [K, N] with static K and N a multiple of 16
    (whole vectors of either ISA): the register-tiled form ``_matmul_weight_tiles``."""
    if tb.rank != 2 or ct != "float32" or ta.rank < 2:
        return False
    kdim, ndim = tb.shape
    return (isinstance(kdim, int) and isinstance(ndim, int) and ndim >= 64 and ndim % 16 == 0
            and kdim >= 1 and isinstance(ta.shape[-1], int))


def _matmul_weight_tiles(ctx: _Ctx, a, b, ta, out_shape, ct: str) -> Kernel:
    """x [..., M, K] @ w [K, N] as tiles of ``matmul_tile_rows`` rows of M (per leading
    index), the last tile's missing rows clamped to row M-1 (computed twice, written once), so
    the tile loop needs no bound checks whatever the symbolic M; ``out`` copies tiles out."""
    from tvm import te, tirx

    lead = list(out_shape[:-2])
    M = out_shape[-2]
    R = matmul_tile_rows(M)
    K, N = b.shape
    k = te.reduce_axis((0, K), name="k")

    def a_at(idx, m, kk):
        lead_a = broadcast_index(ta.with_shape(ta.shape[:-2]), list(a.shape[:-2]),
                                 ctx.rtype.with_shape(ctx.rtype.shape[:-2]), list(idx))
        return a[tuple(lead_a) + (m, kk)]

    tiles = tirx.floordiv(M + (R - 1), R)

    def tile(*i):
        idx, m, n = i[:-2], i[-2], i[-1]
        return te.sum(a_at(idx, tirx.min(m, M - 1), k).astype(ct) * b[k, n].astype(ct),
                      axis=k)

    acc = te.compute(tuple(lead) + (tiles * R, N), tile, name="acc_tile")
    out = te.compute(out_shape, lambda *i: acc[i].astype(ctx.out_dtypes[0]), name="out")
    return Kernel(ctx.inputs, [out], "matmul", rows=len(lead))


def matmul_tile_rows(M) -> int:
    """Rows of M per register tile: MATMUL_TILE_ROWS, or a static M if it is smaller."""
    return min(M, MATMUL_TILE_ROWS) if isinstance(M, int) else MATMUL_TILE_ROWS


@_builder("attention")
def _attention(ctx: _Ctx) -> Kernel:
    from tvm import te, tirx

    q_in, k_in, v_in = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    ct = compute_dtype(dtype_of(q_in))
    attrs = ctx.node.attrs
    # [B, S, H, D] operands and result (fold-attention-layout) are read and written through
    # swapped indices; the computation below is in [B, H, S, D].
    q = _SwappedHeads(q_in) if attrs.get("q_bshd", 0) else q_in
    k = _SwappedHeads(k_in) if attrs.get("kv_bshd", 0) else k_in
    v = _SwappedHeads(v_in) if attrs.get("kv_bshd", 0) else v_in
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    Dv = v.shape[3]
    group = tirx.floordiv(Hq, Hkv)
    scale = tirx.const(ctx.node.attrs["scale"], ct)
    causal = bool(ctx.node.attrs["causal"])
    lowest = tirx.const(scalar.F32_LOWEST if ct == "float32" else float(np.finfo(np.float64).min),
                        ct)
    row = [B, Hq, Sq]
    d = te.reduce_axis((0, D), name="d")
    if attention_by_heads(Hq, Hkv, Sq, ct):
        # one query row shared by a group of query heads (a GQA decode step): per key the
        # group's scores as one vector over the heads, k[j, d] broadcast (a GEMM of k by
        # the group's q), so k needs no transposed copy (which cost more than the scores)
        g_static = int(Hq) // int(Hkv)
        # the group's q transposed ([D, heads], small): a vector of heads per head dim
        heads = tirx.IntImm(str(Hkv.ty), g_static)  # the index type of the other dims
        q_t = te.compute([B, Hkv, D, heads],
                         lambda b, g, dd, r: q[b, g * g_static + r, 0, dd].astype(ct), name="q_t")
        # keys padded to whole register tiles: the tail repeats the last key (its scores are
        # not read), so no key of a tile needs a bounds check
        tile = ATTENTION_KEY_TILE
        keys_pad = tirx.floordiv(Skv + (tile - 1), tile) * tile
        by_heads = te.compute(
            [B, Hkv, keys_pad, heads], lambda b, g, j, r: te.sum(
                k[b, g, tirx.min(j, Skv - 1), d].astype(ct) * q_t[b, g, d, r], axis=d),
            name="scores_by_head")
        scores = te.compute(row + [Skv], lambda b, h, i, j: by_heads[
            b, tirx.floordiv(h, g_static), j, tirx.floormod(h, g_static)], name="scores")
    else:
        # k transposed per kv head ([D, Skv], once for the group's query heads and rows): the
        # scores of a row are then axpys over contiguous keys (vectorized), not one dot
        # product per key with a horizontal sum of its lanes (11-19 GFLOP/s at MiniLM/GPT-2
        # shapes)
        k_t = te.compute([B, Hkv, D, Skv], lambda b, g, dd, j: k[b, g, j, dd].astype(ct),
                         name="k_t")

        def score(b, h, i, j):
            return te.sum(q[b, h, i, d].astype(ct) * k_t[b, tirx.floordiv(h, group), d, j],
                          axis=d)

        scores = te.compute(row + [Skv], lambda b, h, i, j: score(b, h, i, j), name="scores")
        if attrs.get("kv_bshd", 0):
            # v's rows of a kv head copied together ([Skv, Dv], once for the group's query
            # heads and rows, as k_t): in [B, S, H, D] they lie H * D elements apart, a stride
            # that maps MiniLM's 128 keys (12 heads of 32) onto 8 of the L1's 64 sets, so
            # every query row read them back from L2 (MiniLM's 32 x 128 attention with its
            # [B, 1, S, S] mask on a Zen 4, 1 thread, with the mask fix below: 25.3-26.2 ->
            # 19.0-19.9 ms; the same in [B, H, S, D] 18.1-18.4)
            v_src = v
            v = te.compute([B, Hkv, Skv, Dv], lambda b, g, j, e: v_src[b, g, j, e], name="v_c")

    def masked(b, h, i, j):
        s = scores[b, h, i, j] * scale
        if ctx.has(3):
            s = s + _param_bcast_to(ctx, 3, [b, h, i, j], ct)
        if causal:
            s = tirx.Select(j > i + (Skv - Sq), lowest, s)
        return s

    logits = te.compute(row + [Skv], masked, name="logits")
    row_max = _lane_reduce("row_max", logits, row, Skv, te.max, lowest)
    ex = te.compute(row + [Skv], lambda b, h, i, j: _exp(logits[b, h, i, j] - row_max[b, h, i]),
                    name="exp")
    row_sum = _lane_reduce("row_sum", ex, row, Skv, te.sum, tirx.const(0.0, ct))
    probs = te.compute(row + [Skv], lambda b, h, i, j: ex[b, h, i, j] / row_sum[b, h, i],
                       name="probs")
    # probs @ v in ATTENTION_PV_SUMS interleaved partial sums (keys j = 4 jo + r go to sum r),
    # added at the end: one running sum per output element was a chain of dependent
    # multiply-adds as long as the keys (4 cycles each), the kernel's longest path.
    parts = ATTENTION_PV_SUMS
    jo = te.reduce_axis((0, tirx.floordiv(Skv + (parts - 1), parts)), name="jo")

    def pv_term(b, h, i, r, e):
        # keys past Skv add 0 (if_then_else reads only the branch taken); the index is also
        # clamped so that the regions TVM infers for probs and v stay within the Skv keys
        # (else every producer of probs would loop over a padded range with a predicate)
        j = jo * parts + r
        jc = tirx.min(j, Skv - 1)
        return tirx.if_then_else(j < Skv, probs[b, h, i, jc] * v[b, tirx.floordiv(h, group), jc, e]
                                 .astype(ct), tirx.const(0.0, ct))

    acc_parts = te.compute(row + [parts, Dv], lambda b, h, i, r, e: te.sum(
        pv_term(b, h, i, r, e), axis=jo), name="acc_parts")

    def acc_sum(b, h, i, e):
        total = acc_parts[b, h, i, 0, e]
        for r in range(1, parts):
            total = total + acc_parts[b, h, i, r, e]
        return total

    acc = te.compute(row + [Dv], acc_sum, name="acc")
    if attrs.get("y_bshd", 0):
        out = te.compute([B, Sq, Hq, Dv], lambda b, i, h, e: acc[b, h, i, e].astype(
            ctx.out_dtypes[0]), name="out_bshd")
    else:
        out = te.compute(row + [Dv], lambda b, h, i, e: acc[b, h, i, e].astype(
            ctx.out_dtypes[0]), name="out")
    return Kernel(ctx.inputs, [out], "attention", rows=3)


def attention_by_heads(hq, hkv, sq, ct: str) -> bool:
    """Whether attention computes its scores per key as a vector over a group's query heads
    (``_attention``): one query row (decode), float32 compute, a static group of query heads
    per kv head (GQA; MHA's group of one gives scalar products, still faster). One row per
    head leaves the k_t form nothing to share its transposed copy of K over. Measured on this
    file's kernels at one query row and 1024 keys (Zen 5, 1 thread): head dim 128, 32 query
    heads in groups of 2 to 16, by heads 0.22-0.60 ms, k_t 0.58-1.72 ms (groups of 2 to 8);
    MHA 1.55 against 3.96 ms; GPT-2's 12 heads of 64, 0.15 against 0.36 ms."""
    from tvm import tirx

    static = [int(x) if isinstance(x, (int, tirx.IntImm)) else None for x in (hq, hkv, sq)]
    if None in static or ct != "float32" or static[2] != 1:
        return False
    return static[0] % static[1] == 0  # a whole group of query heads per kv head

# Keys per register tile of the by-heads scores: independent accumulators (one vector over the
# group's heads each) for the chain of multiply-adds over the head dim.
ATTENTION_KEY_TILE = 8


def _lane_reduce(name: str, src, row: list, n, combine, identity):
    """``combine`` (te.max or te.sum) of ``src[..., 0:n]`` per row, as ATTENTION_ROW_LANES
    interleaved partial results (element j to lane j % lanes) then one pass across the lanes:
    a float reduction LLVM keeps in order, so one running max or sum over a row is a chain of
    dependent scalar operations as long as the row. Elements past n give ``identity``; their
    index is clamped so that the region TVM infers for ``src`` stays within n."""
    from tvm import te, tirx

    lanes = ATTENTION_ROW_LANES
    jb = te.reduce_axis((0, tirx.floordiv(n + (lanes - 1), lanes)), name=name + "_jb")

    def term(b, h, i, r):
        j = jb * lanes + r
        return tirx.if_then_else(j < n, src[b, h, i, tirx.min(j, n - 1)], identity)

    parts = te.compute(row + [lanes], lambda b, h, i, r: combine(term(b, h, i, r), axis=jb),
                       name=name + "_lanes")

    def across(b, h, i):
        value = parts[b, h, i, 0]
        for r in range(1, lanes):
            value = tirx.max(value, parts[b, h, i, r]) if combine is te.max \
                else value + parts[b, h, i, r]
        return value
    return te.compute(row, across, name=name)


# Lanes of attention's row max and row sum (``_lane_reduce``): one float32 AVX-512 vector.
ATTENTION_ROW_LANES = 16

# Partial sums of attention's probs @ v per output element (``_attention``): independent
# chains of multiply-adds, kept in registers by schedule_attention.
ATTENTION_PV_SUMS = 4


class _SwappedHeads:
    """A [B, S, H, D] tensor indexed as [B, H, S, D] (attention's layout attrs)."""

    def __init__(self, t):
        self.t = t
        b, s, h, d = t.shape
        self.shape = [b, h, s, d]
        self.dtype = t.dtype

    def __getitem__(self, idx):
        b, h, s, d = idx
        return self.t[b, s, h, d]


def _param_bcast_to(ctx: _Ctx, i: int, index: list, ct: str):
    """The mask operand broadcast (numpy rules) to the scores [B, Hq, Sq, Skv]."""
    p = ctx.operand(i)
    tq, tk = ctx.otype(0), ctx.otype(1)
    # the IR types are [B, S, H, D] where attention's layout attrs say so (fold-attention-layout)
    hq, sq = (2, 1) if ctx.node.attrs.get("q_bshd", 0) else (1, 2)
    skv = 1 if ctx.node.attrs.get("kv_bshd", 0) else 2
    scores_type = tq.with_shape((tq.shape[0], tq.shape[hq], tq.shape[sq], tk.shape[skv]))
    idx = broadcast_index(ctx.otype(i), list(p.shape), scores_type, index)
    return (p[tuple(idx)] if idx else p[()]).astype(ct)


# --------------------------------------------------------------------------------------------
# ONNX-coverage reductions and scans (issue #13): reduce (max, min, prod, sum_square, l1,
# log_sum, log_sum_exp), arg_reduce, cumulative, log_softmax, hardmax
# --------------------------------------------------------------------------------------------


def _extreme(dtype: str, kind: str):
    """The identity of max (``kind`` max: the lowest value) or min: +-inf for floats, the
    type's limits for ints; an empty max / min gives it, as the reference."""
    from tvm import tirx

    if is_float_dtype(dtype):
        return tirx.const(float("-inf") if kind == "max" else float("inf"), dtype)
    if dtype == "uint8" or dtype.startswith("uint"):
        bits = int(dtype[4:])
        return tirx.const(0 if kind == "max" else 2 ** bits - 1, dtype)
    bits = int(dtype[3:])
    return tirx.const(-(2 ** (bits - 1)) if kind == "max" else 2 ** (bits - 1) - 1, dtype)


def _reducer(kind: str, dtype: str):
    from tvm import te, tirx

    if kind == "max":
        return te.comm_reducer(lambda a, b: scalar.maximum(a, b),
                               lambda t: _extreme(t, "max"), name="max_nan")
    if kind == "min":
        return te.comm_reducer(lambda a, b: scalar.minimum(a, b),
                               lambda t: _extreme(t, "min"), name="min_nan")
    if kind == "prod":
        return te.comm_reducer(lambda a, b: a * b, lambda t: tirx.const(1, t), name="prod")
    return te.sum


class _Axes:
    """The reduce axes of a reduction over ``axes`` of x, and x's index from the result's."""

    def __init__(self, x, axes, keep: bool):
        self.x, self.rank, self.keep = x, len(x.shape), keep
        self.axes = sorted({a % self.rank for a in axes}) if axes else list(range(self.rank))
        self.ks = _reduce_axes([x.shape[a] for a in self.axes], [f"k{a}" for a in self.axes])

    def full_index(self, i):
        idx, it, kt = [], iter(i), iter(self.ks)
        for d in range(self.rank):
            if d in self.axes:
                if self.keep:
                    next(it)  # the kept unit dim
                idx.append(next(kt))
            else:
                idx.append(next(it))
        return tuple(idx)


@_builder("reduce")
def _reduce_kind(ctx: _Ctx) -> Kernel:
    from tvm import te, tirx

    node = ctx.node
    x = ctx.operand(0)
    kind = node.attrs["kind"]
    axes = list(node.attrs["axes"])
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        out = _compute(ctx.out_shapes[0], lambda i: x[tuple(i)] if i else x[()], "out")
        return Kernel(ctx.inputs, [out], "injective")
    ax = _Axes(x, axes, bool(node.attrs["keepdims"]))
    dtype = dtype_of(x)
    floating = is_float_dtype(dtype)
    ct = compute_dtype(dtype) if floating else dtype
    shape = ctx.out_shapes[0]

    def load(i):
        return x[ax.full_index(i)].astype(ct)

    def at(t, i):
        return t[tuple(i)] if i else t[()]

    if kind == "log_sum_exp":
        m = _compute(shape, lambda i: _reducer("max", ct)(load(i), axis=ax.ks), "acc_max")
        ax2 = _Axes(x, axes, ax.keep)

        def shift(i):
            v = at(m, i)
            return tirx.Select(tirx.isfinite(v), v, tirx.const(0, ct)) if floating else v

        def sum_exp(i):
            e = x[ax2.full_index(i)].astype(ct) if floating else \
                x[ax2.full_index(i)].astype("float64")
            s = shift(i) if floating else shift(i).astype("float64")
            return te.sum(te.exp(e - s), axis=ax2.ks)

        acc = _compute(shape, sum_exp, "acc")

        def finish(i):
            s = shift(i) if floating else shift(i).astype("float64")
            return (te.log(at(acc, i)) + s).astype(ctx.out_dtypes[0])

        return Kernel(ctx.inputs, [_compute(shape, finish, "out")], "reduce")

    def term(i):
        v = load(i)
        if kind == "sum_square":
            return v * v
        if kind == "l1":
            return tirx.abs(v) if dtype.startswith(("int", "float", "bfloat")) else v
        return v

    reducer = _reducer(kind, ct)
    acc = _compute(shape, lambda i: reducer(term(i), axis=ax.ks), "acc")

    def finish(i):
        v = at(acc, i)
        if kind == "log_sum":
            v = te.log(v) if floating else te.log(v.astype("float64"))
        return v.astype(ctx.out_dtypes[0])

    return Kernel(ctx.inputs, [_compute(shape, finish, "out")], "reduce")


@_builder("arg_reduce")
def _arg_reduce(ctx: _Ctx) -> Kernel:
    """The first (or with select_last_index the last) index of the max / min along axis, as
    numpy's argmax / argmin: a (index, value) reduction in index order."""
    from tvm import te, tirx

    node = ctx.node
    x = ctx.operand(0)
    rank = len(x.shape)
    axis = node.attrs["axis"] % rank
    keep = bool(node.attrs["keepdims"])
    largest = node.attrs["kind"] == "max"
    last = bool(node.attrs["select_last_index"])
    dtype = dtype_of(x)
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype

    def better(new, old):  # new beats the running best (ties: the later index if last)
        if last:
            return new >= old if largest else new <= old
        return new > old if largest else new < old

    def combine(acc, new):
        take = tirx.Or(acc[0] < tirx.IntImm("int64", 0), better(new[1], acc[1]))
        return tirx.Select(take, new[0], acc[0]), tirx.Select(take, new[1], acc[1])

    def identity(t0, t1):
        return tirx.const(-1, t0), _extreme(t1, "max" if largest else "min")

    argbest = te.comm_reducer(combine, identity, name="argbest")
    k = te.reduce_axis((0, x.shape[axis]), name="k")

    def x_index(i):
        i = list(i)
        if keep:
            i[axis] = k
        else:
            i.insert(axis, k)
        return tuple(i)

    shape = ctx.out_shapes[0]
    if shape:
        idx, _ = te.compute(shape, lambda *i: argbest(
            (k.var.astype("int64"), x[x_index(i)].astype(ct)), axis=k), name="acc")
    else:
        idx, _ = te.compute((), lambda: argbest(
            (k.var.astype("int64"), x[x_index([])].astype(ct)), axis=k), name="acc")
    out = _compute(shape, lambda i: idx[tuple(i)] if i else idx[()], "out")
    return Kernel(ctx.inputs, [out], "reduce")


@_builder("cumulative")
def _cumulative(ctx: _Ctx) -> Kernel:
    """Running sum / product along axis: each element a reduction over the elements before
    it (inclusive unless exclusive; from the end if reverse). Quadratic in the axis length,
    which the ONNX models' CumSum (positions, masks) keep short."""
    from tvm import te, tirx

    node = ctx.node
    x = ctx.operand(0)
    rank = len(x.shape)
    axis = node.attrs["axis"] % rank
    exclusive, reverse = bool(node.attrs["exclusive"]), bool(node.attrs["reverse"])
    n = x.shape[axis]
    k = te.reduce_axis((0, n), name="k")
    reducer = _reducer("prod" if node.attrs["kind"] == "prod" else "sum", dtype_of(x))
    one = tirx.const(0 if node.attrs["kind"] == "sum" else 1, dtype_of(x))

    def fn(*i):
        j = i[axis]
        inside = (k > j if exclusive else k >= j) if reverse else \
            (k < j if exclusive else k <= j)
        src = tuple(i[:axis]) + (k,) + tuple(i[axis + 1:])
        return reducer(tirx.Select(inside, x[src], one), axis=k)

    acc = te.compute(list(x.shape), fn, name="acc")
    out = te.compute(list(x.shape), lambda *i: acc[i], name="out")
    return Kernel(ctx.inputs, [out], "reduce")


@_builder("log_softmax", "hardmax")
def _log_softmax_hardmax(ctx: _Ctx) -> Kernel:
    """log_softmax: x - max - log(sum(exp(x - max))) in the compute type; hardmax: 1 at the
    first maximum along axis (an arg_reduce), 0 elsewhere."""
    from tvm import te, tirx

    node = ctx.node
    x = ctx.operand(0)
    rank = len(x.shape)
    axis = node.attrs["axis"] % max(rank, 1)
    shape = list(x.shape)
    red_shape = shape[:axis] + shape[axis + 1:]
    dtype = dtype_of(x)
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype

    def at(i, k):
        return tuple(i[:axis]) + (k,) + tuple(i[axis:])

    def row(i):
        return tuple(i[:axis]) + tuple(i[axis + 1:])

    k1 = te.reduce_axis((0, shape[axis]), name="k1")
    if node.op == "hardmax":
        def combine(acc, new):
            take = tirx.Or(acc[0] < tirx.IntImm("int64", 0), new[1] > acc[1])
            return tirx.Select(take, new[0], acc[0]), tirx.Select(take, new[1], acc[1])

        first = te.comm_reducer(combine, lambda t0, t1: (tirx.const(-1, t0),
                                                         _extreme(t1, "max")), name="argmax")
        best, _ = te.compute(red_shape, lambda *i: first(
            (k1.var.astype("int64"), x[at(i, k1)].astype(ct)), axis=k1), name="acc")
        out = te.compute(shape, lambda *i: tirx.Select(
            best[row(i)] == i[axis].astype("int64"), tirx.const(1, dtype),
            tirx.const(0, dtype)), name="out")
        return Kernel(ctx.inputs, [out], "reduce_rows")
    row_max = te.compute(red_shape, lambda *i: te.max(x[at(i, k1)].astype(ct), axis=k1),
                         name="row_max")
    k2 = te.reduce_axis((0, shape[axis]), name="k2")
    row_sum = te.compute(red_shape, lambda *i: te.sum(
        te.exp(x[at(i, k2)].astype(ct) - row_max[tuple(i)]), axis=k2), name="row_sum")
    out = te.compute(shape, lambda *i: (x[i].astype(ct) - row_max[row(i)]
                                        - te.log(row_sum[row(i)])).astype(dtype), name="out")
    return Kernel(ctx.inputs, [out], "reduce_rows")


# --------------------------------------------------------------------------------------------
# ONNX-coverage data movement (issue #13): pad, tile, trilu, eye_like
# --------------------------------------------------------------------------------------------


def _constant_ints(ctx: _Ctx, i: int, what: str) -> list:
    c = constant_operand(ctx.node, i, ctx.module)
    if c is None:
        raise unsupported(ctx.node, f"{ctx.node.op} {what} (operand {i}) is not a constant")
    return [int(v) for v in np.asarray(c).reshape(-1)]


@_builder("pad")
def _pad(ctx: _Ctx) -> Kernel:
    """ONNX Pad with the pads baked in: out[i] reads x at i - begin (negative pads crop);
    outside x: the value (constant), the nearest edge, the mirror (reflect) or the wrap."""
    from tvm import tirx

    node = ctx.node
    x = ctx.operand(0)
    rank = len(x.shape)
    pads = _constant_ints(ctx, 1, "pads")
    mode = node.attrs["mode"]
    dtype = dtype_of(x)
    has_value = ctx.has(2) and mode == "constant"
    zero = tirx.IntImm("int64", 0)

    def fn(i):
        idx, inside = [], tirx.const(True, "bool")
        for d in range(rank):
            n = x.shape[d]
            # the cropped input's dim starts at max(-begin, 0) in x
            lo = max(-pads[d], 0)
            size = n - lo - max(-pads[d + rank], 0)
            j = i[d] - _i64(max(pads[d], 0))  # position in the cropped input
            if mode == "constant":
                inside = tirx.And(inside, tirx.And(j >= zero, j < size))
                j = tirx.max(tirx.min(j, size - 1), zero)
            elif mode == "edge":
                j = tirx.max(tirx.min(j, size - 1), zero)
            elif mode == "wrap":
                j = tirx.floormod(j, size)
            else:  # reflect: period 2 * (size - 1), mirrored about both ends
                period = tirx.max(2 * (size - 1), _i64(1))
                m = tirx.floormod(j, period)
                j = tirx.Select(m < size, m, period - m)
            idx.append(j + _i64(lo))
        v = x[tuple(idx)] if idx else x[()]
        if mode != "constant":
            return v
        if has_value:
            p = ctx.operand(2)
            fill = (p[tuple(zero for _ in p.shape)] if len(p.shape) else p[()]).astype(dtype)
        else:
            fill = tirx.const(0, dtype)
        return tirx.Select(inside, v, fill)

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective",
                  baked={"pads": pads})


@_builder("tile")
def _tile(ctx: _Ctx) -> Kernel:
    from tvm import tirx

    x = ctx.operand(0)
    reps = _constant_ints(ctx, 1, "repeats")

    def fn(i):
        return x[tuple(tirx.floormod(j, d) for j, d in zip(i, x.shape))]

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective",
                  baked={"repeats": reps})


@_builder("trilu")
def _trilu(ctx: _Ctx) -> Kernel:
    """Upper: keep j - i >= k; lower: keep j - i <= k (over the last two dims)."""
    from tvm import tirx

    node = ctx.node
    x = ctx.operand(0)
    k = _constant_ints(ctx, 1, "k")[0] if ctx.has(1) else 0
    dtype = dtype_of(x)

    def fn(i):
        diag = i[-1] - i[-2]
        keep = diag >= _i64(k) if node.attrs["upper"] else diag <= _i64(k)
        return tirx.Select(keep, x[tuple(i)], tirx.const(0, dtype))

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective",
                  baked={"k": k})


@_builder("eye_like")
def _eye_like(ctx: _Ctx) -> Kernel:
    from tvm import tirx

    k = int(ctx.node.attrs.get("k", 0))
    dtype = ctx.out_dtypes[0]

    def fn(i):
        return tirx.Select(i[1] - i[0] == _i64(k), tirx.const(1, dtype), tirx.const(0, dtype))

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("bitcast")
def _bitcast(ctx: _Ctx) -> Kernel:
    """The same bits as another type of the same width (numpy's view); other widths change
    the shape and have no kernel here. A bool (one byte, 0 or 1) as an 8-bit integer is its
    0 or 1."""
    from tvm import tirx

    x = ctx.operand(0)
    src, dst = dtype_of(x), ctx.out_dtypes[0]
    kinds = (ctx.otype(0).dtype.kind, ctx.rtype.dtype.kind)
    bool_to_byte = kinds[0] == "bool" and ctx.rtype.dtype.bits == 8 and kinds[1] != "bool"
    if not bool_to_byte and (ctx.otype(0).dtype.bits != ctx.rtype.dtype.bits
                             or "bool" in kinds):
        raise unsupported(ctx.node, f"bitcast {ctx.otype(0).dtype} -> {ctx.rtype.dtype} "
                                    "(different widths)")

    def fn(i):
        v = x[tuple(i)] if i else x[()]
        if bool_to_byte:
            return v.astype(dst)
        return v if src == dst else tirx.reinterpret(dst, v)

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("one_hot")
def _one_hot(ctx: _Ctx) -> Kernel:
    """values[1] where the index (as int64, negative from depth) equals the position along
    the new axis, values[0] elsewhere. depth is the result's static dim there."""
    from tvm import tirx

    node = ctx.node
    out_shape = ctx.rtype.shape
    axis = node.attrs["axis"] % len(out_shape)
    depth = out_shape[axis]
    if not isinstance(depth, int):
        raise unsupported(node, "one_hot depth is not a constant")
    indices = ctx.operand(0)
    values = ctx.operand(2)
    dtype = ctx.out_dtypes[0]
    zero = tirx.IntImm("int64", 0)

    def value_at(k):
        return (values[(tirx.IntImm("int64", k),) + (zero,) * (len(values.shape) - 1)]
                if values.shape else values[()]).astype(dtype)

    def fn(i):
        rest = tuple(i[:axis]) + tuple(i[axis + 1:])
        idx = (indices[rest] if rest else indices[()]).astype("int64")
        idx = tirx.Select(idx < zero, idx + _i64(depth), idx)
        return tirx.Select(idx == i[axis], value_at(1), value_at(0))

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective",
                  baked={"depth": depth})


@_builder("scatter_elements")
def _scatter_elements(ctx: _Ctx) -> Kernel:
    """Scatter as a gather: each result element folds the updates aimed at it (same position
    off the axis, index equal to its own along it) in update order: the last one
    (reduction none) or their sum / product / max / min with the data. Quadratic in the
    axis length of the updates, which ONNX graphs keep small (a few indices)."""
    from tvm import te, tirx

    node = ctx.node
    data, indices, updates = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    rank = len(data.shape)
    axis = node.attrs["axis"] % rank
    reduction = node.attrs["reduction"]
    dtype = dtype_of(data)
    k = te.reduce_axis((0, updates.shape[axis]), name="k")
    zero = tirx.IntImm("int64", 0)

    def source(i):
        """The updates' position for result index i and k, and whether it is one."""
        pos, inside = [], tirx.const(True, "bool")
        for d in range(rank):
            if d == axis:
                pos.append(k)
                continue
            inside = tirx.And(inside, i[d] < updates.shape[d])
            pos.append(tirx.min(i[d], tirx.max(updates.shape[d] - 1, zero)))
        target = indices[tuple(pos)].astype("int64")
        target = tirx.Select(target < zero, target + data.shape[axis], target)
        return tuple(pos), tirx.And(inside, target == i[axis])

    if reduction == "none":
        def last(*i):
            pos, hit = source(i)
            return te.max(tirx.Select(hit, k.var.astype("int64"), tirx.IntImm("int64", -1)),
                          axis=k)

        acc = te.compute(list(data.shape), last, name="acc")

        def pick(*i):
            kk = acc[i]
            pos = list(i)
            for d in range(rank):
                if d != axis:
                    pos[d] = tirx.min(i[d], tirx.max(updates.shape[d] - 1, zero))
            pos[axis] = tirx.max(kk, zero)
            return tirx.Select(kk >= zero, updates[tuple(pos)], data[i])

        out = te.compute(list(data.shape), pick, name="out")
        return Kernel(ctx.inputs, [out], "reduce")
    kind = {"add": "sum", "mul": "prod", "max": "max", "min": "min"}[reduction]
    reducer = _reducer(kind, dtype)
    identity = {"sum": tirx.const(0, dtype), "prod": tirx.const(1, dtype),
                "max": _extreme(dtype, "max"), "min": _extreme(dtype, "min")}[kind]

    def fold(*i):
        pos, hit = source(i)
        return reducer(tirx.Select(hit, updates[pos], identity), axis=k)

    acc = te.compute(list(data.shape), fold, name="acc")
    combine = {"sum": lambda a, b: a + b, "prod": lambda a, b: a * b,
               "max": scalar.maximum, "min": scalar.minimum}[kind]
    out = te.compute(list(data.shape), lambda *i: combine(data[i], acc[i]), name="out")
    return Kernel(ctx.inputs, [out], "reduce")


@_builder("reverse_sequence")
def _reverse_sequence(ctx: _Ctx) -> Kernel:
    """Along time_axis, the first lens[b] steps of batch b reversed, the rest copied."""
    from tvm import tirx

    node = ctx.node
    x, lens = ctx.operand(0), ctx.operand(1)
    b_axis, t_axis = node.attrs["batch_axis"], node.attrs["time_axis"]

    def fn(i):
        n = lens[(i[b_axis],)].astype("int64")
        t = i[t_axis]
        src = list(i)
        src[t_axis] = tirx.Select(t < n, n - 1 - t, t)
        return x[tuple(src)]

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("rotary_embedding")
def _rotary_embedding(ctx: _Ctx) -> Kernel:
    """ONNX RotaryEmbedding per element of x ([B, H, S, D], or [B, S, H*D] with num_heads):
    the first rotary_embedding_dim features of a head rotated in pairs (halves, or adjacent
    with interleaved) by the cos/sin cache row of its position (position_ids[b, s] when
    given, else s; a 3-D cache is already per [b, s]); the rest copied."""
    from tvm import tirx

    node = ctx.node
    a = node.attrs
    x = ctx.operand(0)
    rank = len(x.shape)
    if rank == 4:
        head_dim = ctx.otype(0).shape[3]
    else:
        c = ctx.otype(0).shape[2]
        if not isinstance(c, int) or not a["num_heads"]:
            raise unsupported(node, "rotary_embedding of 3-D x needs a static hidden size "
                                    "and num_heads")
        head_dim = c // a["num_heads"]
    if not isinstance(head_dim, int):
        raise unsupported(node, "rotary_embedding head size is not static")
    rd = a["rotary_embedding_dim"] or head_dim
    dtype = dtype_of(x)
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype
    D = _i64(head_dim)

    def fn(i):
        if rank == 4:
            b, s, d = i[0], i[2], i[3]

            def at(dd):
                return x[(i[0], i[1], i[2], dd)].astype(ct)
        else:
            b, s, d = i[0], i[1], tirx.floormod(i[2], D)
            base = i[2] - d

            def at(dd):
                return x[(i[0], i[1], base + dd)].astype(ct)
        return _rotary_element(ctx, at, b, s, d, rd, ct, dtype)

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


@_builder("scatter_nd")
def _scatter_nd(ctx: _Ctx) -> Kernel:
    """ScatterND as a gather: each result element folds the update rows whose index tuple
    (negative from the dim) is its leading index, in row order: the last one (none) or
    their sum / product / max / min with the data. Quadratic, like scatter_elements."""
    from tvm import te, tirx

    node = ctx.node
    data, indices, updates = ctx.operand(0), ctx.operand(1), ctx.operand(2)
    depth = ctx.otype(1).shape[-1]
    if not isinstance(depth, int):
        raise unsupported(node, "scatter_nd index depth is not static")
    lead = list(indices.shape[:-1])
    ks = _reduce_axes(lead, [f"k{j}" for j in range(len(lead))])
    reduction = node.attrs["reduction"]
    dtype = dtype_of(data)
    zero = tirx.IntImm("int64", 0)

    def hit(i, us):
        match = tirx.const(True, "bool")
        for t in range(depth):
            v = indices[tuple(us) + (_i64(t),)].astype("int64")
            v = tirx.Select(v < zero, v + data.shape[t], v)
            match = tirx.And(match, v == i[t])
        return match

    def update_at(i, us):
        return updates[tuple(us) + tuple(i[depth:])]

    if reduction == "none":
        def linear(us):
            flat = zero
            for u, e in zip(us, lead):
                flat = flat * e + u
            return flat

        def last(*i):
            us = [k.var for k in ks]
            return te.max(tirx.Select(hit(i, us), linear(us), _i64(-1)), axis=ks)

        acc = te.compute(list(data.shape), last, name="acc")

        def pick(*i):
            flat = tirx.max(acc[i], zero)
            us = []
            for e in reversed(lead):
                us.append(tirx.floormod(flat, e))
                flat = tirx.floordiv(flat, e)
            return tirx.Select(acc[i] >= zero, update_at(i, list(reversed(us))), data[i])

        out = te.compute(list(data.shape), pick, name="out")
        return Kernel(ctx.inputs, [out], "reduce")
    kind = {"add": "sum", "mul": "prod", "max": "max", "min": "min"}[reduction]
    identity = {"sum": tirx.const(0, dtype), "prod": tirx.const(1, dtype),
                "max": _extreme(dtype, "max"), "min": _extreme(dtype, "min")}[kind]

    def fold(*i):
        us = [k.var for k in ks]
        return _reducer(kind, dtype)(tirx.Select(hit(i, us), update_at(i, us), identity),
                                     axis=ks)

    acc = te.compute(list(data.shape), fold, name="acc")
    combine = {"sum": lambda a, b: a + b, "prod": lambda a, b: a * b,
               "max": scalar.maximum, "min": scalar.minimum}[kind]
    out = te.compute(list(data.shape), lambda *i: combine(data[i], acc[i]), name="out")
    return Kernel(ctx.inputs, [out], "reduce")


@_builder("tensor_scatter")
def _tensor_scatter(ctx: _Ctx) -> Kernel:
    """The cache with batch b's update written along axis from write_indices[b] (0 when
    absent; circular wraps): position t takes update step t - start when that is a step."""
    from tvm import tirx

    node = ctx.node
    cache, update = ctx.operand(0), ctx.operand(1)
    axis = node.attrs["axis"] % len(cache.shape)
    length, steps = cache.shape[axis], update.shape[axis]
    zero = tirx.IntImm("int64", 0)

    def fn(i):
        start = ctx.operand(2)[(i[0],)].astype("int64") if ctx.has(2) else zero
        rel = i[axis] - start
        if node.attrs["mode"] == "circular":
            rel = tirx.floormod(rel, length)
        inside = tirx.And(rel >= zero, rel < steps)
        src = list(i)
        src[axis] = tirx.max(tirx.min(rel, steps - 1), zero)
        return tirx.Select(inside, update[tuple(src)], cache[tuple(i)])

    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective")


def _einsum_terms(equation: str, ranks: list) -> tuple[list, str]:
    """The operands' index letters and the result's, '...' spelled out (as capitals, right
    aligned) and the implicit result (no '->': the letters used once, sorted) made explicit."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    widest = 0
    spelled = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            n = rank - (len(term) - 3)
            widest = max(widest, n)
            term = term.replace("...", "".join(chr(ord("A") + 26 - n + j) for j in range(n)))
        spelled.append(term)
    ell = "".join(chr(ord("A") + 26 - widest + j) for j in range(widest))
    if arrow:
        out = rhs.replace("...", ell)
    else:
        letters = "".join(spelled)
        out = ell + "".join(sorted(c for c in set(letters) if c.islower()
                                   and letters.count(c) == 1))
    return spelled, out


@_builder("einsum")
def _einsum(ctx: _Ctx) -> Kernel:
    """out[result letters] = sum over the other letters of the product of the operands (a
    letter repeated in one operand reads its diagonal), in the compute type."""
    from tvm import te

    node = ctx.node
    ops = [ctx.operand(i) for i in range(len(node.operands))]
    terms, out_letters = _einsum_terms(node.attrs["equation"], [len(p.shape) for p in ops])
    extent = {}
    for term, p in zip(terms, ops):
        if len(term) != len(p.shape):
            raise unsupported(node, f"einsum term {term!r} does not match rank {len(p.shape)}")
        for c, d in zip(term, p.shape):
            extent.setdefault(c, d)
    reduce_letters = sorted(set("".join(terms)) - set(out_letters))
    ks = _reduce_axes([extent[c] for c in reduce_letters], [f"k_{c}" for c in reduce_letters])
    dtype = ctx.out_dtypes[0]
    ct = compute_dtype(dtype) if is_float_dtype(dtype) else dtype

    def product(index):
        v = None
        for term, p in zip(terms, ops):
            load = (p[tuple(index[c] for c in term)] if term else p[()]).astype(ct)
            v = load if v is None else v * load
        return v

    def fn(i):
        index = dict(zip(out_letters, i))
        index.update({c: k for c, k in zip(reduce_letters, ks)})
        return te.sum(product(index), axis=ks) if ks else product(index)

    if not ks:
        out = _compute(ctx.out_shapes[0], lambda i: fn(i).astype(dtype), "out")
        return Kernel(ctx.inputs, [out], "injective")
    acc = _compute(ctx.out_shapes[0], fn, "acc")
    out = _compute(ctx.out_shapes[0],
                   lambda i: (acc[tuple(i)] if i else acc[()]).astype(dtype), "out")
    return Kernel(ctx.inputs, [out], "reduce")


@_builder("topk")
def _topk(ctx: _Ctx) -> Kernel:
    """The k largest (smallest) along axis, sorted, ties by the smaller index (the
    reference's stable sort): each element's rank is the count of elements before it in
    that order; result r is the element of rank r. Quadratic in the axis length."""
    from tvm import te, tirx

    node = ctx.node
    x = ctx.operand(0)
    rank = len(x.shape)
    axis = node.attrs["axis"] % rank
    largest = bool(node.attrs["largest"])
    k = _constant_ints(ctx, 1, "k")[0]
    n = x.shape[axis]
    dtype = dtype_of(x)

    def along(i, j):
        return tuple(i[:axis]) + (j,) + tuple(i[axis + 1:])

    m = te.reduce_axis((0, n), name="m")

    def order(*i):
        xj, xm = x[i], x[along(i, m)]
        ahead = xm > xj if largest else xm < xj
        before = tirx.Or(ahead, tirx.And(xm == xj, m < i[axis]))
        return te.sum(tirx.Select(before, tirx.IntImm("int64", 1), tirx.IntImm("int64", 0)),
                      axis=m)

    ranks = te.compute(list(x.shape), order, name="ranks")
    out_shape = ctx.out_shapes[0]
    j1 = te.reduce_axis((0, n), name="j1")
    j2 = te.reduce_axis((0, n), name="j2")
    values = te.compute(out_shape, lambda *r: te.sum(tirx.Select(
        ranks[along(r, j1)] == r[axis], x[along(r, j1)], tirx.const(0, dtype)), axis=j1),
        name="out")
    indices = te.compute(out_shape, lambda *r: te.sum(tirx.Select(
        ranks[along(r, j2)] == r[axis], j2.var.astype("int64"), tirx.IntImm("int64", 0)),
        axis=j2), name="out_indices")
    return Kernel(ctx.inputs, [values, indices], "reduce_rows", baked={"k": k})


def _nonzero(d):
    """A float64 divisor, 1 where it is 0 (the branch that would divide is not taken there;
    TVM's constant folding would still refuse the division)."""
    from tvm import tirx

    return tirx.Select(d == tirx.const(0.0, "float64"), tirx.const(1.0, "float64"), d)


def _resize_coordinate(ctx: _Ctx, p: int, axes_count: int, scale, in_n: int, out_n: int,
                       y):
    """(x, extrapolated or None): the float64 input coordinate of output position ``y``
    (int64) along an axis as the reference's _resize_1d, and for tf_crop_and_resize whether
    it lies outside the input. ``scale``: float64 expression; ``p``: the axis' place in roi."""
    from tvm import tirx

    attrs = ctx.node.attrs
    f64 = "float64"

    def c(v):
        return tirx.const(float(v), f64)

    yf = y.astype(f64)
    out_w = scale * c(in_n)
    ctm = attrs["coordinate_transformation_mode"]
    extrapolated = None
    if ctm == "align_corners":
        x = tirx.Select(out_w == c(1), c(0), yf * c(in_n - 1) / _nonzero(out_w - c(1)))
    elif ctm == "asymmetric":
        x = yf / scale
    elif ctm == "tf_crop_and_resize":
        roi = ctx.operand(1)
        lo = roi[(_i64(p),)].astype(f64)
        hi = roi[(_i64(axes_count + p),)].astype(f64)
        x = tirx.Select(out_w == c(1), (hi - lo) * c(in_n - 1) / c(2),
                        yf * (hi - lo) * c(in_n - 1) / _nonzero(out_w - c(1))) + lo * c(in_n - 1)
        extrapolated = tirx.Or(x < c(0), x > c(in_n - 1))
    elif ctm == "pytorch_half_pixel":
        x = tirx.Select(out_w == c(1), c(-0.5), (yf + c(0.5)) / scale - c(0.5))
    elif ctm == "half_pixel":
        x = (yf + c(0.5)) / scale - c(0.5)
    elif ctm == "half_pixel_symmetric":
        offset = c(in_n / 2) * (c(1) - c(out_n) / out_w)
        x = offset + (yf + c(0.5)) / scale - c(0.5)
    else:
        raise unsupported(ctx.node, f"resize coordinate_transformation_mode {ctm}")
    return x, extrapolated


def _resize_first_neighbour(x, n: int):
    """The int64 index of the first of the ``n`` neighbours closest to coordinate ``x`` (ties
    to the smaller index), as the reference picks them."""
    from tvm import tirx

    def c(v):
        return tirx.const(float(v), "float64")

    pad = -(-n // 2)
    xp = x + c(pad)
    pf = tirx.floor(xp)
    frac = xp - pf
    if n % 2 == 0:
        offset = tirx.Select(frac == c(0), _i64(-(n // 2)), _i64(-(n // 2) + 1))
    else:
        offset = tirx.Select(frac <= c(0.5), _i64(-((n - 1) // 2)), _i64(-((n - 1) // 2) + 1))
    return pf.astype("int64") + offset - _i64(pad)


def _resize_ratio(x):
    """x's distance from the input position below it; 1 on a position (the reference
    weights it as the right neighbour)."""
    from tvm import tirx

    base = tirx.floor(x)
    return tirx.Select(x == base, tirx.const(1.0, "float64"), x - base)


def _resize_axis_terms(ctx: _Ctx, a: int, p: int, axes_count: int, scale, in_n: int,
                       out_n: int, y):
    """(neighbour indices, weights, extrapolated or None) of output position ``y`` (int64)
    along axis ``a`` as the reference's _resize_1d: float64 coordinate, coefficients, the n
    nearest neighbours. ``scale``: float64 expression; ``p``: the axis' place in roi."""
    from tvm import tirx

    attrs = ctx.node.attrs

    def c(v):
        return tirx.const(float(v), "float64")

    x, extrapolated = _resize_coordinate(ctx, p, axes_count, scale, in_n, out_n, y)
    ratio = _resize_ratio(x)
    mode = attrs["mode"]
    if mode == "nearest":
        nm = attrs["nearest_mode"]
        right = {"round_prefer_floor": lambda: ratio > c(0.5),
                 "round_prefer_ceil": lambda: ratio >= c(0.5),
                 "floor": lambda: tirx.const(False, "bool"),
                 "ceil": lambda: tirx.const(True, "bool")}[nm]()
        right = tirx.Or(right, ratio == c(1))
        coeffs = [tirx.Select(right, c(0), c(1)), tirx.Select(right, c(1), c(0))]
    elif mode == "linear":
        coeffs = [c(1) - ratio, ratio]
    elif mode == "cubic":
        ca = float(attrs["cubic_coeff_a"])
        coeffs = []
        for d in (ratio + c(1), ratio, c(1) - ratio, c(2) - ratio):
            d = tirx.abs(d)
            near = ((c(ca + 2) * d - c(ca + 3)) * d * d + c(1))
            far = ((c(ca) * d - c(5 * ca)) * d + c(8 * ca)) * d - c(4 * ca)
            coeffs.append(tirx.Select(d <= c(1), near, tirx.Select(d < c(2), far, c(0))))
    else:
        raise unsupported(ctx.node, f"resize mode {mode}")
    n = len(coeffs)
    first = _resize_first_neighbour(x, n)
    idx = [first + _i64(j) for j in range(n)]
    if attrs["exclude_outside"]:
        coeffs = [tirx.Select(tirx.Or(k < _i64(0), k >= _i64(in_n)), c(0), w)
                  for k, w in zip(idx, coeffs)]
        total = coeffs[0]
        for w in coeffs[1:]:
            total = total + w
        total = tirx.Select(total == c(0), c(1), total)
        coeffs = [w / total for w in coeffs]
    idx = [tirx.max(tirx.min(k, _i64(in_n - 1)), _i64(0)) for k in idx]
    return idx, coeffs, extrapolated


@_builder("resize")
def _resize(ctx: _Ctx) -> Kernel:
    """ONNX Resize on static shapes: each resized axis contributes its n neighbours and
    weights (the reference's coordinate transforms, nearest modes, linear, cubic with
    exclude_outside, tf_crop_and_resize's roi and extrapolation), and the result is the
    weighted sum over their combinations in float64, as the reference's axis-by-axis passes
    (equal up to float64 rounding). Sizes and constant scales are baked, other scales read
    at run time. antialias (linear and cubic; the reference's nearest ignores it) is
    ``_resize_antialias``.

    The reference leaves an axis alone when it keeps its size at scale 1 (within 1e-9) and
    the whole roi. An axis that keeps its size at another scale is still resized (4 -> 4 at
    1.1 reads 4 / 1.1 apart). Where the scale is known here, so is the choice; a scale read
    at run time on an axis that keeps its size gets a pass of its own after the others,
    which copies its input where the scale is 1 (the axes are independent, so the order of
    the passes changes the result only by float64 rounding)."""
    from tvm import tirx

    node = ctx.node
    attrs = node.attrs
    x = ctx.operand(0)
    in_type, out_type = ctx.otype(0), ctx.rtype
    rank = len(in_type.shape)
    antialias = bool(attrs["antialias"]) and attrs["mode"] != "nearest"
    if not all(isinstance(d, int) for d in in_type.shape + out_type.shape):
        raise unsupported(node, "resize of dynamic shapes")
    axes = [a % rank for a in attrs["axes"]] or list(range(rank))
    sizes = constant_operand(node, 3, ctx.module) if len(node.operands) > 3 else None
    has_scales = ctx.has(2) and (sizes is None or np.asarray(sizes).size == 0)
    roi_used = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    if roi_used and not ctx.has(1):
        raise unsupported(node, "tf_crop_and_resize without roi")
    static_scale = {}
    if not has_scales:
        if sizes is None:
            raise unsupported(node, "resize without scales or sizes")
        full = [in_type.shape[i] for i in range(rank)]
        for i, a in enumerate(axes):
            full[a] = int(np.asarray(sizes).reshape(-1)[i])
        scale = [full[i] / in_type.shape[i] for i in range(rank)]
        if attrs["keep_aspect_ratio_policy"] != "stretch":
            pick = min if attrs["keep_aspect_ratio_policy"] == "not_larger" else max
            s = pick(scale[a] for a in axes)
            scale = [s if i in axes else 1.0 for i in range(rank)]
        static_scale = {a: scale[a] for a in axes}
    else:
        # constant scales are baked (for antialias they fix the filters' footprints)
        scales = constant_operand(node, 2, ctx.module)
        if scales is not None:
            values = np.asarray(scales, np.float64).reshape(-1)
            static_scale = {a: float(values[i]) for i, a in enumerate(axes)}
    baked = {"sizes": None if sizes is None else np.asarray(sizes).tolist(),
             "scales": [static_scale.get(a) for a in axes]}
    if antialias:
        return _resize_antialias(ctx, axes, static_scale, baked)
    # axes resized whatever the scale: a new size, or (with a roi) any dim but 1 (a dim of 1
    # stays at its only element whatever the roi); and those of a known scale other than 1
    moving = [a for a in axes if (roi_used and out_type.shape[a] != 1)
              or in_type.shape[a] != out_type.shape[a]
              or (a in static_scale and not math.isclose(static_scale[a], 1.0))]
    # axes that keep their size at a scale read at run time: a pass each (see above)
    run_time = [a for a in axes if a not in moving and a not in static_scale]
    dtype = ctx.out_dtypes[0]

    def scale_of(a):
        if a in static_scale:
            return tirx.const(static_scale[a], "float64")
        return ctx.operand(2)[(_i64(axes.index(a)),)].astype("float64")

    tables, stages = {}, []
    for a in moving + run_time:
        tables[a] = _resize_axis_tables(ctx, a, axes.index(a), len(axes), scale_of(a),
                                        in_type.shape[a], out_type.shape[a])
        stages += [t.op.name for t in tables[a] if t is not None]

    def total_over(i, moving, read):
        """The weighted sum over the neighbours along the ``moving`` axes of ``read(index)``
        (float64), or the extrapolation value where a coordinate falls outside the roi."""
        total = tirx.const(0.0, "float64")
        taps = [int(tables[a][1].shape[1]) for a in moving]
        for combo in np.ndindex(*taps):
            index = list(i)
            weight = None
            for a, j in zip(moving, combo):
                neighbour, weights, _ = tables[a]
                index[a] = neighbour[i[a], _i64(j)]
                w = weights[i[a], _i64(j)]
                weight = w if weight is None else weight * w
            v = read(index)
            total = total + (v if weight is None else weight * v)
        for a in moving:
            extrapolated = tables[a][2]
            if extrapolated is not None:
                total = tirx.Select(extrapolated[i[a]] != tirx.const(0, "int8"),
                                    tirx.const(float(attrs["extrapolation_value"]), "float64"),
                                    total)
        return total

    previous = None  # the float64 result of the passes so far (None: x)
    if moving and not run_time:
        out = _compute(ctx.out_shapes[0], lambda i: _resize_result(
            total_over(i, moving, lambda at: _pass_input(ctx, None, at)), dtype), "out")
        return Kernel(ctx.inputs, [out], "injective", baked=baked, stages=stages)
    if moving:
        previous = _compute(ctx.out_shapes[0], lambda i: total_over(
            i, moving, lambda at: _pass_input(ctx, None, at)), "resize_moved")
        stages.append(previous.op.name)
    # a pass per axis of a run-time scale that keeps its size (see above)
    for step, a in enumerate(run_time):
        p = axes.index(a)
        skip = _isclose(scale_of(a), 1.0)
        if ctx.has(1) and tuple(ctx.otype(1).shape) != (0,):
            roi = ctx.operand(1)
            lo = roi[(_i64(p),)].astype("float64")
            hi = roi[(_i64(len(axes) + p),)].astype("float64")
            skip = tirx.all(skip, lo == tirx.const(0.0, "float64"), _isclose(hi, 1.0))

        def resized(i, a=a, skip=skip, source=previous):
            return tirx.if_then_else(
                skip, _pass_input(ctx, source, i),
                total_over(i, [a], lambda at: _pass_input(ctx, source, at)))

        previous = _compute(ctx.out_shapes[0], resized, f"resize_axis{step}")
        stages.append(previous.op.name)
    out = _compute(ctx.out_shapes[0],
                   lambda i: _resize_result(_pass_input(ctx, previous, i), dtype), "out")
    return Kernel(ctx.inputs, [out], "injective", baked=baked, stages=stages)


def _resize_axis_tables(ctx: _Ctx, a: int, p: int, axes_count: int, scale, in_n: int,
                        out_n: int) -> tuple:
    """(neighbour [out_n, n] int64, weight [out_n, n] float64, extrapolated [out_n] int8 or
    None): ``_resize_axis_terms`` of each output position along axis ``a``, as stages of
    their own. The sum over the neighbours' combinations reads them: inlined, each weight
    (a cubic's polynomials, exclude_outside's normalization) was an expression repeated in
    every term of the sum, and a 3-axis cubic took minutes to build."""
    from tvm import te, tirx

    def terms(y):
        return _resize_axis_terms(ctx, a, p, axes_count, scale, in_n, out_n, y)

    def pick(values, k):
        v = values[-1]
        for j in reversed(range(len(values) - 1)):
            v = tirx.Select(k == _i64(j), values[j], v)
        return v

    probe = terms(_i64(0))  # how many neighbours, and whether a roi can be left
    n = len(probe[0])
    extents = [_i64(out_n), _i64(n)]
    neighbour = te.compute(extents, lambda y, k: pick(terms(y)[0], k),
                           name=f"resize_neighbour{a}")
    weight = te.compute(extents, lambda y, k: pick(terms(y)[1], k), name=f"resize_weight{a}")
    extrapolated = None
    if probe[2] is not None:
        extrapolated = te.compute([_i64(out_n)], lambda y: tirx.Select(
            terms(y)[2], tirx.const(1, "int8"), tirx.const(0, "int8")),
            name=f"resize_extrapolated{a}")
    return neighbour, weight, extrapolated


def _resize_result(total, dtype: str):
    """The float64 ``total`` in the result type: rounded half to even and clipped into an
    integer type, as the reference."""
    from tvm import tirx

    if is_float_dtype(dtype):
        return total.astype(dtype)
    info = np.iinfo(np.dtype(dtype))
    r = tirx.nearbyint(total)
    r = tirx.max(tirx.min(r, tirx.const(float(info.max), "float64")),
                 tirx.const(float(info.min), "float64"))
    return r.astype(dtype)


def _numpy_sum(terms: list, pairwise: bool):
    """The sum of ``terms`` in numpy's order of adds: along an outer axis one after the
    other; along the innermost (contiguous) axis (``pairwise``) numpy's pairwise_sum, which
    past 7 terms adds them into 8 partial sums (in blocks of 128, halved beyond)."""
    n = len(terms)
    if not pairwise or n < 8:
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total
    if n > 128:
        half = n // 2
        half -= half % 8
        return _numpy_sum(terms[:half], True) + _numpy_sum(terms[half:], True)
    partial = list(terms[:8])
    i = 8
    while i < n - n % 8:
        partial = [partial[j] + terms[i + j] for j in range(8)]
        i += 8
    total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + \
        ((partial[4] + partial[5]) + (partial[6] + partial[7]))
    for t in terms[i:]:
        total = total + t
    return total


def _antialias_footprint(mode: str, scale: float) -> int:
    """The taps n of an antialiased linear / cubic resize at ``scale`` (the reference's
    _resize_coeffs): the filter is stretched by 1 / min(scale, 1), over the offsets
    start, ..., start + n - 1 from the coordinate's floor (start = 1 - n / 2)."""
    start = int(np.floor((-1 if mode == "linear" else -2) / min(scale, 1.0)) + 1)
    return 2 - 2 * start


# Most footprints a kernel of run-time scales provides for (one per scale range)
_ANTIALIAS_MAX_FOOTPRINTS = 4


def _antialias_footprints(ctx: _Ctx, in_n: int, out_n: int) -> list:
    """The footprints (taps, ascending) of the scales that resize ``in_n`` to ``out_n``: the
    reference's output size int(scale * in_n) puts the scale in [out_n, out_n + 1) / in_n
    (widened by a little for the rounding of the product)."""
    mode = ctx.node.attrs["mode"]
    if in_n == 0:
        raise unsupported(ctx.node, "resize antialias of an empty axis")
    high = _antialias_footprint(mode, (out_n + 1) / in_n * (1 + 1e-9))
    low = _antialias_footprint(mode, out_n / in_n * (1 - 1e-9)) if out_n else high
    if (low - high) // 2 + 1 > _ANTIALIAS_MAX_FOOTPRINTS:
        raise unsupported(ctx.node, f"resize antialias with run-time scales of {in_n} -> "
                                    f"{out_n}: filters of {high} to {low} taps")
    return list(range(high, low + 1, 2))


def _antialias_weight(mode: str, cubic_a: float, s, tap, ratio):
    """The unnormalized weight of tap ``tap`` (its float64 offset from the floor) at
    ``ratio``, the filter stretched by 1 / ``s`` (float64 expressions), as the reference:
    every product feeding an add rounded on its own (no FMA)."""
    from tvm import tirx

    def c(v):
        return tirx.const(float(v), "float64")

    if mode == "linear":
        return tirx.min(tirx.max(c(1) - tirx.abs((tap - ratio) * s), c(0)), c(1))
    a = cubic_a
    d = tirx.abs(s * (tap - ratio))
    near = _rounded((_rounded(c(a + 2) * d) - c(a + 3)) * d * d) + c(1)
    far = _rounded(c(a) * d) - c(5 * a)
    far = _rounded(far * d) + c(8 * a)
    far = _rounded(far * d) - c(4 * a)
    return tirx.Select(d <= c(1), near, tirx.Select(d < c(2), far, c(0)))


def _isclose(v, target: float):
    """math.isclose(v, target) (relative tolerance 1e-9) of a float64 expression."""
    from tvm import tirx

    f64 = "float64"
    return tirx.abs(v - tirx.const(target, f64)) <= \
        tirx.const(1e-9, f64) * tirx.max(tirx.abs(v), tirx.const(abs(target), f64))


def _resize_antialias(ctx: _Ctx, axes: list, scale: dict, baked: dict) -> Kernel:
    """ONNX Resize with antialias, linear or cubic: the reference's axis-by-axis passes
    (``_antialias_pass``), each a stage of its own, in float64; the last one rounded to the
    result type. ``scale``: the axes' scales known at compile time (from sizes or constant
    scales); the others are read at run time.

    The reference leaves an axis alone when it keeps its size at scale 1 with the whole roi:
    decided here where the scale is known and no roi is given, else at run time (the pass
    then copies its input)."""
    from tvm import tirx

    attrs = ctx.node.attrs
    f64 = "float64"
    roi_type = ctx.otype(1) if ctx.has(1) else None
    roi_given = roi_type is not None and tuple(roi_type.shape) != (0,)
    if roi_given and tuple(roi_type.shape) != (2 * len(axes),):
        raise unsupported(ctx.node, f"resize roi of shape {roi_type.shape} for "
                                    f"{len(axes)} axes")
    if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" and not roi_given:
        raise unsupported(ctx.node, "tf_crop_and_resize without roi")
    shape = list(ctx.otype(0).shape)
    previous, stages, passes = None, [], 0
    for p, a in enumerate(axes):
        known = scale.get(a)
        if shape[a] != ctx.rtype.shape[a] or (known is not None and
                                              not math.isclose(known, 1.0)):
            skip = None  # always resized
        elif known is not None and not roi_given:
            continue  # left alone
        else:
            skip = tirx.const(True, "bool") if known is not None else \
                _isclose(ctx.operand(2)[(_i64(p),)].astype(f64), 1.0)
            if roi_given:
                roi = ctx.operand(1)
                lo = roi[(_i64(p),)].astype(f64)
                hi = roi[(_i64(len(axes) + p),)].astype(f64)
                skip = tirx.all(skip, lo == tirx.const(0.0, f64), _isclose(hi, 1.0))
        previous, names = _antialias_pass(ctx, axes, passes, a, known, shape, previous, skip)
        shape[a] = ctx.rtype.shape[a]
        stages += names
        passes += 1
    dtype = ctx.out_dtypes[0]
    out = _compute(ctx.out_shapes[0],
                   lambda i: _resize_result(_pass_input(ctx, previous, i), dtype), "out")
    return Kernel(ctx.inputs, [out], "injective", baked=baked, stages=stages)


def _pass_input(ctx: _Ctx, previous, index):
    """Element ``index`` of a pass' input in float64: x, or the pass before's result."""
    if previous is None:
        return ctx.operand(0)[tuple(index)].astype("float64")
    return previous[tuple(index)]


def _antialias_pass(ctx: _Ctx, axes: list, step: int, a: int, scale, shape: list,
                    previous, skip):
    """(result, stage names) of the antialiased resize of axis ``a`` of the pass input
    (``previous``; None: x) of ``shape``, the reference's _resize_1d. ``scale``: a float, or
    None to read it from the scales operand; ``skip``: None, or where the pass copies its
    input instead (the reference leaves the axis alone).

    The filter is stretched by 1 / min(scale, 1): a downscale by f reads about 2 / f (linear)
    or 4 / f (cubic) neighbours per output position, a footprint the scale fixes; a scale
    read at run time is one of a few footprints (``_antialias_footprints``), each with its
    own tables and sum, the pass taking the one of the scale. Per output position along the
    axis: its input coordinate; per footprint the taps' weights and their sum, the
    normalized weights (for exclude_outside: those outside the input zeroed and normalized
    again), the first neighbour. Each is a stage of its own ([out] or [out, taps]), so that
    no expression holds a sum over the taps more than once (inlined, a 40-tap filter's
    weights were expressions of thousands of terms). Then the pass sums neighbour * weight
    over the taps (clamped into the input) in numpy's order (the reference's ``sum`` along
    the taps' axis). All of it the reference's operations, in its order."""
    from tvm import te, tirx

    attrs = ctx.node.attrs
    mode = attrs["mode"]
    f64 = "float64"
    in_n, out_n = shape[a], ctx.rtype.shape[a]
    p = axes.index(a)
    one = tirx.const(1.0, f64)
    if scale is None:
        scale_expr = ctx.operand(2)[(_i64(p),)].astype(f64)
        s = tirx.Select(one < scale_expr, one, scale_expr)  # min(scale, 1.0)
        footprints = _antialias_footprints(ctx, in_n, out_n)
        # the first tap's offset from the floor, as the reference finds it
        start = tirx.floor(tirx.const(-1.0 if mode == "linear" else -2.0, f64) / s) + one
    else:
        scale_expr = tirx.const(scale, f64)
        s = tirx.const(min(scale, 1.0), f64)
        footprints = [_antialias_footprint(mode, scale)]
        start = None  # one footprint: nothing to choose

    def coordinate(y):
        return _resize_coordinate(ctx, p, len(axes), scale_expr, in_n, out_n, y)

    def stage(extents, fn, name):
        return te.compute([_i64(e) for e in extents], fn, name=f"resize{step}_{name}")

    coord = stage([out_n], lambda y: coordinate(y)[0], "coord")
    stages = [coord]
    tables = {}  # footprint -> (first neighbour, weights, their stages)
    for n in footprints:
        tables[n] = _antialias_tables(ctx, stage, coord, n, s, in_n, out_n)
        stages += tables[n][2]
    # numpy sums the taps pairwise where their axis is the innermost one left
    pairwise = all(d == 1 for d in shape[a + 1:])

    def resized(i, n):
        first, weights, _ = tables[n]
        terms = []
        for k in range(n):
            at = list(i)
            at[a] = tirx.max(tirx.min(first[i[a]] + _i64(k), _i64(in_n - 1)), _i64(0))
            terms.append(_rounded(_pass_input(ctx, previous, at) * weights[i[a], _i64(k)]))
        return _numpy_sum(terms, pairwise)

    def value(i):
        # the footprint of the scale (every scale of this output size has one of them)
        total = resized(i, footprints[-1])
        for n in reversed(footprints[:-1]):
            total = tirx.if_then_else(start == tirx.const(float(1 - n // 2), f64),
                                      resized(i, n), total)
        extrapolated = coordinate(i[a])[1]
        if extrapolated is not None:
            total = tirx.Select(extrapolated,
                                tirx.const(float(attrs["extrapolation_value"]), f64), total)
        if skip is not None:
            total = tirx.if_then_else(skip, _pass_input(ctx, previous, i), total)
        return total

    out_shape = [_i64(d) for d in shape[:a] + [out_n] + shape[a + 1:]]
    result = _compute(out_shape, value, f"resize{step}_pass")
    return result, [t.op.name for t in stages] + [result.op.name]


def _antialias_tables(ctx: _Ctx, stage, coord, n: int, s, in_n: int, out_n: int) -> tuple:
    """(first neighbour [out], weights [out, n], the stages) of the ``n``-tap filter
    stretched by 1 / ``s`` at the coordinates ``coord`` [out], as the reference's
    _resize_coeffs and _resize_1d: the taps' weights, normalized by their sum; for
    exclude_outside those outside the input zeroed and the rest normalized again.
    ``stage(extents, fn, name)`` makes each table."""
    from tvm import tirx

    attrs = ctx.node.attrs
    mode, cubic_a = attrs["mode"], float(attrs["cubic_coeff_a"])
    f64 = "float64"
    tap0 = 1 - n // 2  # the first tap's offset from the coordinate's floor

    def tap_sum(table, name):
        """The sum of each row of a [out, n] table, as numpy sums it (contiguous)."""
        return stage([out_n], lambda y: _numpy_sum([table[y, _i64(j)] for j in range(n)],
                                                   True), name)

    taps = stage([out_n, n], lambda y, k: _antialias_weight(
        mode, cubic_a, s, (k + _i64(tap0)).astype(f64), _resize_ratio(coord[y])), f"taps{n}")
    total = tap_sum(taps, f"total{n}")
    first = stage([out_n], lambda y: _resize_first_neighbour(coord[y], n), f"first{n}")
    if not attrs["exclude_outside"]:
        weights = stage([out_n, n], lambda y, k: taps[y, k] / total[y], f"weight{n}")
        return first, weights, [taps, total, first, weights]

    def kept_weight(y, k):
        outside = tirx.Or(first[y] + k < _i64(0), first[y] + k >= _i64(in_n))
        return tirx.Select(outside, tirx.const(0.0, f64), taps[y, k] / total[y])

    kept = stage([out_n, n], kept_weight, f"kept{n}")
    kept_total = tap_sum(kept, f"kept_total{n}")
    weights = stage([out_n, n], lambda y, k: kept[y, k] / _nonzero(kept_total[y]),
                    f"weight{n}")
    return first, weights, [taps, total, first, kept, kept_total, weights]


def _rounded(x):
    """``x`` (a product) behind ``llvm.arithmetic.fence``: TVM lets LLVM contract a multiply
    that feeds an add into one FMA, rounding once where the reference (numpy) rounds the
    product and the sum; behind the fence the add sees no multiply to fuse."""
    from tvm import tirx

    return tirx.call_llvm_pure_intrin(dtype_of(x), "llvm.arithmetic.fence", x)


def _grid_reflect(x, lo: float, hi: float):
    """The reference's _grid_reflect of one float64 coordinate."""
    from tvm import tirx

    f64 = "float64"
    lo_c, hi_c = tirx.const(lo, f64), tirx.const(hi, f64)
    span = hi - lo
    below, above = x < lo_c, x > hi_c
    d = tirx.Select(below, lo_c - x, tirx.Select(above, x - hi_c, tirx.const(0.0, f64)))
    n = tirx.trunc(d / tirx.const(span, f64)) if span > 0 else tirx.const(0.0, f64)
    r = d - n * tirx.const(span, f64)
    even = tirx.floormod(n.astype("int64"), tirx.IntImm("int64", 2)) == tirx.IntImm("int64", 0)
    from_lo = tirx.Select(even, lo_c + r, hi_c - r)
    from_hi = tirx.Select(even, hi_c - r, lo_c + r)
    return tirx.Select(below, from_lo, tirx.Select(above, from_hi, x))


@_builder("grid_sample")
def _grid_sample(ctx: _Ctx) -> Kernel:
    """GridSample as the reference: per spatial dim the grid coordinate denormalized in
    float32, padded (border / reflection) and its taps (nearest 1, linear 2, cubic 4) with
    weights; the result the float64 sum over the tap combinations (0 outside x for zeros
    padding). Static spatial sizes of x.

    Each grid point's padded coordinate, tap indices and tap weights are stages of their own
    (``gs_coord<d>`` [N, *out], ``gs_tap<d>`` / ``gs_w<d>`` [taps, N, *out]), materialized once
    per point and read by the taps of every channel: inlined, the reflected coordinate (and
    the reflection of each tap's index of it) was re-derived in every one of the 4 / 16 tap
    combinations, an expression so large that the linear + reflection kernel took over 300 s
    to build. A tap index is already padded and clamped into x; -1 marks a tap outside x
    (zeros padding). Equal to the reference bit for bit: every product that feeds an add is
    rounded on its own (``_rounded``: no FMA), the float32 denormalization included."""
    from tvm import te, tirx

    node = ctx.node
    mode, padding = node.attrs["mode"], node.attrs["padding_mode"]
    align = bool(node.attrs["align_corners"])
    x, grid = ctx.operand(0), ctx.operand(1)
    sp = list(ctx.otype(0).shape[2:])
    if not all(isinstance(d, int) for d in sp):
        raise unsupported(node, "grid_sample of dynamic spatial sizes")
    nsp = len(sp)
    f32, f64, i64 = "float32", "float64", "int64"
    dtype = ctx.out_dtypes[0]
    points = list(grid.shape[:-1])  # [N, *out]
    ntaps = {"nearest": 1, "linear": 2}.get(mode, 4)
    first = -1 if mode == "cubic" else 0  # the offset of tap 0 from floor(coordinate)

    def bounds(size):
        return (0.0, size - 1.0) if align else (-0.5, size - 0.5)

    def coord_stage(d, size, lo, hi):
        def coord(*p):
            g = grid[tuple(p) + (_i64(nsp - 1 - d),)].astype(f32)
            one, two = tirx.const(1.0, f32), tirx.const(2.0, f32)
            c = ((g + one) / two * tirx.const(float(size - 1), f32)) if align else \
                ((_rounded((g + one) * tirx.const(float(size), f32)) - one) / two)
            c = c.astype(f64)
            if mode == "nearest":
                c = tirx.nearbyint(c)
            if padding == "border" and mode != "cubic":  # cubic: each tap clamped (below)
                c = tirx.Select(tirx.Or(c < tirx.const(lo, f64), c > tirx.const(hi, f64)),
                                tirx.max(tirx.min(c, tirx.const(size - 1.0, f64)),
                                         tirx.const(0.0, f64)), c)
            elif padding == "reflection":
                c = _grid_reflect(c, lo, hi)
            return c

        return te.compute(points, coord, name=f"gs_coord{d}")

    def tap_stage(d, cd, size, lo, hi):
        def tap(*pj):
            j, p = pj[0], pj[1:]
            c = cd[p]
            if mode == "nearest":
                idx = tirx.trunc(c).astype(i64)
            else:
                idx = tirx.floor(c).astype(i64) + j.astype(i64) + _i64(first)
            if padding == "zeros":
                inside = tirx.And(idx >= _i64(0), idx < _i64(size))
                return tirx.Select(inside, idx, _i64(-1))
            if padding == "border":
                return tirx.max(tirx.min(idx, _i64(size - 1)), _i64(0))
            idx = tirx.trunc(_grid_reflect(idx.astype(f64), lo, hi)).astype(i64)
            return tirx.max(tirx.min(idx, _i64(size - 1)), _i64(0))

        return te.compute([ntaps] + points, tap, name=f"gs_tap{d}")

    def weight_stage(d, cd):
        def weight(*pj):
            j, p = pj[0], pj[1:]
            c = cd[p]
            t = c - tirx.floor(c)
            one = tirx.const(1.0, f64)
            if mode == "linear":
                return tirx.Select(j == 0, one - t, t)
            # |t - (j - 1)|: the reference's |t + 1|, |t|, |1 - t|, |2 - t| (exact)
            dd = tirx.abs(t - (j.astype(i64) + _i64(first)).astype(f64))
            a = -0.75
            near = _rounded((_rounded(tirx.const(a + 2, f64) * dd)
                             - tirx.const(a + 3, f64)) * dd * dd) + one
            far = _rounded(tirx.const(a, f64) * dd) - tirx.const(5 * a, f64)
            far = _rounded(far * dd) + tirx.const(8 * a, f64)
            far = _rounded(far * dd) - tirx.const(4 * a, f64)
            return tirx.Select(dd <= one, near, far)

        return te.compute([ntaps] + points, weight, name=f"gs_w{d}")

    coords, taps, weights = [], [], []
    for d, size in enumerate(sp):
        lo, hi = bounds(size)
        coords.append(coord_stage(d, size, lo, hi))
        taps.append(tap_stage(d, coords[-1], size, lo, hi))
        if mode != "nearest":
            weights.append(weight_stage(d, coords[-1]))

    def fn(i):
        p = (i[0],) + tuple(i[2:])
        total = tirx.const(0.0, f64)
        for combo in np.ndindex(*[ntaps] * nsp):
            weight, index, inside = None, [], None
            for d, j in enumerate(combo):
                k = taps[d][(_i64(j),) + p]
                if padding == "zeros":
                    ok = k >= _i64(0)
                    inside = ok if inside is None else tirx.And(inside, ok)
                    k = tirx.max(k, _i64(0))
                index.append(k)
                if mode != "nearest":
                    w = weights[d][(_i64(j),) + p]
                    weight = w if weight is None else weight * w
            pixel = x[(i[0], i[1]) + tuple(index)].astype(f64)
            if inside is not None:
                pixel = tirx.Select(inside, pixel, tirx.const(0.0, f64))
            total = total + (pixel if weight is None else _rounded(pixel * weight))
        return total.astype(dtype)

    stages = [t.op.name for t in coords + taps + weights]
    return Kernel(ctx.inputs, [_compute(ctx.out_shapes[0], fn, "out")], "injective",
                  stages=stages)
