"""TensorIR of the CPU ``pool`` kernel: N-d max / average / lp pooling, max's indices (#13, #15).

The reference's semantics (``runtime.reference._pool``), which pads x with NaN (missing):
every kind ignores missing positions, and so NaN inputs too (``np.nansum``, ``-inf`` for
max); max takes the largest value, average divides the sum by the count of positions inside x
(or, with count_include_pad, inside x plus its explicit pads: never ceil_mode's overhang), lp
gives ``(sum |x|^p)^(1/p)``. Max's indices output is numpy's argmax over the window (the first
tap in row-major window order among equal maxima) as a flat index into x's [N, C, *sp] layout:
row-major with the spatial coordinate clipped into x (``ravel_multi_index(mode="clip")``), or
with storage_order=1 column-major over the spatial dims, unclipped.

Float math runs in float32 (float64 stays), as the reference's compute dtype; integer x takes
max (exact) and average (float64 sum and quotient, truncated back to the integer type as numpy's
astype does). Batch and channels may be symbols; the spatial dims must be static (the result's
spatial size is then static too). Anything else raises CPUBackendError naming the node (it then
runs on the host).
"""
from __future__ import annotations

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.codegen.cpu.ops.common import (Dims, compute_dtype, is_float_dtype, kernel_name,
                                              tvm_dtype)
from qcompiler.ir.core import Node

# Below this many output elements the kernel stays on one thread (the pool's launch costs more
# than the work), as the op library's schedules do.
_PARALLEL_MIN_ELEMENTS = 4096


def primfunc_for_pool(node: Node, params=None, module=None, known=()):
    """(kernel name, scheduled PrimFunc) of a pool node; (name, None) for a known name."""
    a = node.attrs
    x = node.operands[0]
    where = f"%{node.results[0].name} = pool"
    if x.type.rank < 3:
        raise CPUBackendError(f"{where}: x {x.type.shape} has no spatial dim")
    for v in (x, node.results[0]):
        if not all(isinstance(d, int) for d in v.type.shape[2:]):
            raise CPUBackendError(f"{where}: the CPU kernel needs static spatial dims, not "
                                  f"{v.type.shape} (batch and channels may be symbols)")
    dtype = tvm_dtype(x.type.dtype, node)  # refuses types without a TVM dtype
    if x.type.dtype.kind == "bool":
        raise CPUBackendError(f"{where}: pooling of bool has no CPU kernel")
    if a["kind"] == "lp" and not is_float_dtype(dtype):
        raise CPUBackendError(f"{where}: lp pooling of {x.type.dtype} has no CPU kernel")
    if a.get("channels_last", 0) and not pool_takes_channels_last(node):
        raise CPUBackendError(f"{where}: channels_last has a CPU kernel for 2-D integer max "
                              "pooling without indices or dilation only")
    name = kernel_name(node, {})
    if name in known:
        return name, None
    min_elements = getattr(params, "parallel_min_elements", _PARALLEL_MIN_ELEMENTS)
    if a.get("channels_last", 0):
        return name, _int_max_2d_nhwc(node, dtype, min_elements).with_attr("global_symbol",
                                                                            name)
    return name, _build(node, dtype, min_elements).with_attr("global_symbol", name)


def pool_takes_channels_last(node: Node) -> bool:
    """Whether the CPU kernel takes this pool channels-last (NHWC, conv-channels-last):
    2-D integer max pooling without indices whose windows are row-separable
    (``_rows_separable``), static shapes; the node's x is read in either layout."""
    a = node.attrs
    x = node.operands[0].type
    if (a["kind"] != "max" or a.get("indices", 0) or x.rank != 4 or len(node.results) != 1
            or x.dtype.kind == "bool" or is_float_dtype(tvm_dtype(x.dtype, node))
            or not all(isinstance(d, int) for d in x.shape[1:])):
        return False
    cl = a.get("channels_last", 0)
    sp = list(x.shape[1:3] if cl else x.shape[2:])
    y = node.results[0].type.shape
    out_sp = list(y[1:3] if cl else y[2:])
    return _rows_separable(sp, out_sp, a["kernel_shape"], a["strides"], a["dilations"],
                           a["pads"])


def _i64(v: int):
    from tvm import tirx

    return tirx.IntImm("int64", v)


def _build(node: Node, dtype: str, min_elements: int):
    import tvm
    from tvm import te, tirx

    a = node.attrs
    kind = a["kind"]
    x_type = node.operands[0].type
    dims = Dims()
    n, c = dims.dim(x_type.shape[0]), dims.dim(x_type.shape[1])
    sp = list(x_type.shape[2:])
    nsp = len(sp)
    out_sp = list(node.results[0].type.shape[2:])
    kernel, strides, dil, pads = a["kernel_shape"], a["strides"], a["dilations"], a["pads"]
    floats = is_float_dtype(dtype)
    # max of integers stays in their type (exact); average of integers is numpy's float64 mean
    ct = compute_dtype(dtype) if floats else ("float64" if kind != "max" else dtype)
    x = te.placeholder([n, c] + [_i64(d) for d in sp], dtype, name="in0")
    out_shape = [n, c] + [_i64(d) for d in out_sp]
    taps = 1
    for k in kernel:
        taps *= k
    lowest = (tirx.const(float("-inf"), ct) if floats
              else tvm.te.min_value(ct))  # max's value of a missing tap
    # x copied into a padded buffer spanning every window (ceil_mode's overhang included), so
    # that the window loop reads without bounds checks. Float padding is NaN, as in the
    # reference: a missing tap is a NaN (padding or a NaN input, both skipped). Integers pad
    # with max's identity or the sum's 0 (integer windows test their bounds where it matters).
    span = [(out_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nsp)]
    fill = (tirx.const(float("nan"), ct) if floats
            else lowest if kind == "max" else tirx.const(0, ct))

    int_max_2d = (kind == "max" and not floats and nsp == 2 and taps <= 64
                  and not a.get("indices", 0))
    if int_max_2d and _rows_separable(sp, out_sp, kernel, strides, dil, pads):
        return _int_max_2d_rows(x, out_shape, sp, span, kernel, strides, pads, lowest,
                                min_elements)

    def padded(nn, cc, *pos):
        coords = [pos[i] - pads[i] for i in range(nsp)]
        inside = tirx.all(*[tirx.all(coords[i] >= 0, coords[i] < sp[i]) for i in range(nsp)])
        # if_then_else, not Select: TVM drops the clamp of a Select's branch under its
        # condition, and a Select loads both branches (a read outside x)
        return tirx.if_then_else(inside, x(nn, cc, *[tirx.max(tirx.min(coords[i], sp[i] - 1), 0)
                                                     for i in range(nsp)]).astype(ct), fill)
    xp = te.compute([n, c] + [_i64(d) for d in span], padded, name="xp")

    def window(idx):
        """(reduce axes, their row-major tap number, missing, value) of the window of output
        position ``idx``."""
        rs = [te.reduce_axis((0, k), name=f"r{i}") for i, k in enumerate(kernel)]
        v = xp(idx[0], idx[1], *[idx[2 + i] * strides[i] + rs[i] * dil[i] for i in range(nsp)])
        if floats:
            missing = tirx.isnan(v)
        else:
            coords = [idx[2 + i] * strides[i] + rs[i] * dil[i] - pads[i] for i in range(nsp)]
            missing = tirx.Not(tirx.all(*[tirx.all(coords[i] >= 0, coords[i] < sp[i])
                                          for i in range(nsp)]))
        lin = rs[0].var.astype("int64")
        for i in range(1, nsp):
            lin = lin * kernel[i] + rs[i].var.astype("int64")
        return rs, lin, missing, v

    if kind == "max" and a.get("indices", 0):
        return _max_with_indices(node, x, out_shape, window, lowest, taps, ct, dtype,
                                 floats, min_elements)
    if int_max_2d:
        return _int_max_2d(x, xp, out_shape, kernel, strides, dil, min_elements)
    if kind == "max":
        # te.max starts from the lowest finite float: a window of only padding must give -inf
        maximum = te.comm_reducer(lambda u, v: tirx.max(u, v), lambda t: lowest, name="max")

        def acc_fn(*idx):
            rs, _, missing, v = window(idx)
            return maximum(tirx.Select(missing, lowest, v), axis=rs)
        acc = te.compute(out_shape, acc_fn, name="acc")
        out = te.compute(out_shape, lambda *i: acc(*i).astype(dtype), name="out")
    elif kind == "lp":
        p = int(a["p"])

        def acc_fn(*idx):
            rs, _, missing, v = window(idx)
            mag = tirx.abs(v)
            power = mag
            for _ in range(p - 1):  # |x|^p by products: p is a small integer
                power = power * mag
            return te.sum(tirx.Select(missing, tirx.const(0, ct), power), axis=rs)
        acc = te.compute(out_shape, acc_fn, name="acc")

        def root(s):
            if p == 1:
                return s
            if p == 2:
                return tirx.sqrt(s)
            return tirx.pow(s, tirx.const(1.0 / p, ct))
        out = te.compute(out_shape, lambda *i: root(acc(*i)).astype(dtype), name="out")
    else:  # average
        def acc_fn(*idx):
            rs, _, missing, v = window(idx)
            return te.sum(tirx.Select(missing, tirx.const(0, ct), v), axis=rs)
        acc = te.compute(out_shape, acc_fn, name="acc")
        include = a["count_include_pad"]

        def count(idx):
            """Window positions inside x (or x and its explicit pads), per dim multiplied:
            the window is a box, so its count is the product of the per-dim counts."""
            total = None
            for i in range(nsp):
                lo, hi = (-pads[i], sp[i] + pads[i + nsp]) if include else (0, sp[i])
                start = idx[2 + i] * strides[i] - pads[i]
                along = None
                for t in range(kernel[i]):
                    hit = tirx.Select(tirx.all(start + t * dil[i] >= lo,
                                               start + t * dil[i] < hi), 1, 0)
                    along = hit if along is None else along + hit
                total = along if total is None else total * along
            return total.astype(ct)
        out = te.compute(out_shape, lambda *i: (acc(*i) / count(i)).astype(dtype), name="out")

    sch = tvm.s_tir.Schedule(te.create_prim_func([x, out]))
    _parallel_outer(sch, sch.get_sblock("xp"), out_shape, min_elements)
    out_block = sch.get_sblock("out")
    # the window's reduction per output element, in registers under out's innermost loop
    sch.compute_at(sch.get_sblock("acc"), sch.get_loops(out_block)[-1])
    _parallel_outer(sch, out_block, out_shape, min_elements)
    return sch.mod["main"]


def _rows_separable(sp, out_sp, kernel, strides, dil, pads) -> bool:
    """Whether ``_int_max_2d_rows`` applies: no dilation, and every window has a row inside
    x (its first row at most x's last, its last at least x's first), so that a window row
    outside x may read the nearest row inside instead: a row the window holds anyway, which
    cannot change its max."""
    return (dil[0] == dil[1] == 1 and (out_sp[0] - 1) * strides[0] - pads[0] <= sp[0] - 1
            and kernel[0] - 1 - pads[0] >= 0)


def _int_max_2d_rows(x, out_shape, sp, span, kernel, strides, pads, lowest, min_elements):
    """Integer 2-D max pooling, separable: per output row, the max over the window's rows of x
    (whole rows: a vector max along them, rows outside x clamped to the nearest inside, see
    ``_rows_separable``) into a row padded left and right with max's identity, then the max
    over each window's columns of that one row (strided taps: LLVM's interleaved loads, once
    per output row instead of once per window row). A ResNet stem's 3 x 3 stride-2 pooling of
    64 x 112 x 112, 1 thread of a Zen 5: 0.05-0.07 ms, against 0.29 ms with a padded copy of
    the window's rows (``_int_max_2d``)."""
    from tvm import te

    h, w = sp
    n, c = out_shape[0], out_shape[1]

    def row_max(nn, cc, oh, xx):
        return _window_rows_max(lambda r, col: x(nn, cc, r, col), oh, xx, (h, w), kernel,
                                strides, pads, lowest)
    rows = te.compute([n, c, out_shape[2], _i64(span[1])], row_max, name="rows")

    taps = [lambda nn, cc, oh, ow, kw=kw: (nn, cc, oh, ow * strides[1] + kw)
            for kw in range(kernel[1])]
    sch, rows_block = _max_of_taps(x, rows, out_shape, taps, min_elements)
    if pads[1] or span[1] > w:
        sch.decompose_padding(rows_block, sch.get_loops(rows_block)[1])
    return sch.mod["main"]


def _window_rows_max(read, oy, xx, sp, kernel, strides, pads, lowest):
    """The max over output row ``oy``'s window rows of x's column ``xx - pads[1]``
    (``read(row, col)``; rows outside x clamped to the nearest inside, see
    ``_rows_separable``), max's identity outside x's columns: the padding pattern
    decompose_padding takes (a border of the identity, the inside read without conditions)."""
    from tvm import tirx

    h, w = sp
    col = xx - pads[1]
    v = None
    for kh in range(kernel[0]):
        t = read(tirx.max(tirx.min(oy * strides[0] + kh - pads[0], h - 1), 0), col)
        v = t if v is None else tirx.max(v, t)
    return tirx.if_then_else(tirx.all(col >= 0, col < w), v, lowest)


def _int_max_2d_nhwc(node: Node, dtype: str, min_elements: int):
    """``_int_max_2d_rows`` on channels-last x and result: per output row the max over the
    window's rows (whole rows of pixels x channels, rows outside x clamped to the nearest
    inside), then over each window's columns; every step a vector along the channels."""
    import tvm
    from tvm import te, tirx

    a = node.attrs
    n_, h, w, c = node.operands[0].type.shape
    _, oh, ow, _ = node.results[0].type.shape
    kernel, strides, pads = a["kernel_shape"], a["strides"], a["pads"]
    dims = Dims()
    n = dims.dim(n_)
    x = te.placeholder([n, _i64(h), _i64(w), _i64(c)], dtype, name="in0")
    lowest = tvm.te.min_value(dtype)
    span = (ow - 1) * strides[1] + kernel[1]

    def row_max(nn, yy, xx, cc):
        return _window_rows_max(lambda r, col: x(nn, r, col, cc), yy, xx, (h, w), kernel,
                                strides, pads, lowest)
    rows = te.compute([n, _i64(oh), _i64(span), _i64(c)], row_max, name="rows")

    def out_fn(nn, yy, xx, cc):
        v = None
        for kw in range(kernel[1]):
            t = rows(nn, yy, xx * strides[1] + kw, cc)
            v = t if v is None else tirx.max(v, t)
        return v
    out = te.compute([n, _i64(oh), _i64(ow), _i64(c)], out_fn, name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, out]))
    out_block = sch.get_sblock("out")
    on, oy, _, _ = sch.get_loops(out_block)
    row = sch.fuse(on, oy)
    if not isinstance(n_, int) or n_ * oh * ow * c >= min_elements:
        sch.parallel(row)
    rows_block = sch.get_sblock("rows")
    sch.compute_at(rows_block, row)
    if pads[1] or span > w:
        sch.decompose_padding(rows_block, sch.get_loops(rows_block)[1])
    return sch.mod["main"]


def _max_of_taps(x, staged, out_shape, taps, min_elements: int):
    """(schedule, staged's block) of ``out = max(staged[tap(idx)] for tap in taps)``: one
    expression of its taps (no reduction loop), the output rows in parallel, the output row a
    vector loop, ``staged`` made per output row (in cache)."""
    import tvm
    from tvm import te, tirx

    def out_fn(*idx):
        v = None
        for tap in taps:
            t = staged(*tap(*idx))
            v = t if v is None else tirx.max(v, t)
        return v
    out = te.compute(out_shape, out_fn, name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, out]))
    out_block = sch.get_sblock("out")
    _parallel_outer(sch, out_block, out_shape, min_elements)
    staged_block = sch.get_sblock(staged.op.name)
    sch.compute_at(staged_block, sch.get_loops(out_block)[0])
    return sch, staged_block


def _int_max_2d(x, xp, out_shape, kernel, strides, dil, min_elements: int):
    """Integer 2-D max pooling where ``_int_max_2d_rows`` does not apply (dilated windows,
    or a window with no row inside x):
    the padding holds the type's lowest value, max's identity, so no tap needs a bounds test;
    the padded rows a window needs are made per output row, and the output row is a vector
    loop (strided taps are LLVM's interleaved loads)."""
    taps = [lambda nn, cc, oh, ow, kh=kh, kw=kw: (nn, cc, oh * strides[0] + kh * dil[0],
                                                  ow * strides[1] + kw * dil[1])
            for kh in range(kernel[0]) for kw in range(kernel[1])]
    sch, _ = _max_of_taps(x, xp, out_shape, taps, min_elements)
    return sch.mod["main"]


def _max_with_indices(node, x, out_shape, window, lowest, taps, ct, dtype, floats,
                      min_elements):
    """Max and its flat indices from one (value, tap) reduction: the larger value wins, equal
    values the smaller tap number (numpy's first argmax, whatever the loop order)."""
    import tvm
    from tvm import te, tirx

    a = node.attrs
    x_type = node.operands[0].type
    sp = list(x_type.shape[2:])
    nsp = len(sp)
    kernel, strides, dil, pads = a["kernel_shape"], a["strides"], a["dilations"], a["pads"]
    none = _i64(taps)  # the tap number of "no tap yet"

    def combine(acc, new):
        take = tirx.Or(new[1] > acc[1], tirx.And(new[1] == acc[1], new[0] < acc[0]))
        return tirx.Select(take, new[0], acc[0]), tirx.Select(take, new[1], acc[1])

    def identity(t0, t1):
        return tirx.const(taps, t0), lowest

    argmax = te.comm_reducer(combine, identity, name="argmax")

    def acc_fn(*idx):
        rs, lin, missing, v = window(idx)
        # Missing taps of floats are -inf candidates at their own position, as in the
        # reference's filled window; integers have no -inf, so a missing tap never wins there
        # (its tap number is "none": a real tap of the lowest value beats it).
        tap = lin if floats else tirx.Select(missing, none, lin)
        return argmax((tap, tirx.Select(missing, lowest, v)), axis=rs)
    tap, best = te.compute(out_shape, acc_fn, name="acc")
    out = te.compute(out_shape, lambda *i: best(*i).astype(dtype), name="out")
    size = 1
    for d in sp:
        size *= d
    channels = out_shape[1]

    def index_fn(*idx):
        t = tap(*idx)
        t = tirx.Select(t == none, _i64(0), t)  # a window of missing integer taps: argmax's 0
        coords = []
        below = taps
        for i in range(nsp):
            below //= kernel[i]
            ti = (t // below) % kernel[i]
            coords.append(idx[2 + i] * strides[i] - pads[i] + ti * dil[i])
        flat = _i64(0)
        if a.get("storage_order", 0):  # column-major spatial order, coordinates as they are
            stride = 1
            for i in range(nsp):
                flat = flat + coords[i] * stride
                stride *= sp[i]
        else:  # row-major, each coordinate clipped into x
            for i in range(nsp):
                flat = flat * sp[i] + tirx.max(tirx.min(coords[i], sp[i] - 1), 0)
        return (idx[0] * channels + idx[1]) * size + flat
    indices = te.compute(out_shape, index_fn, name="indices")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, out, indices]))
    # acc feeds two results: a whole buffer of its own (small: the size of the result)
    for name in ("xp", "acc", "out", "indices"):
        _parallel_outer(sch, sch.get_sblock(name), out_shape, min_elements)
    return sch.mod["main"]


def _parallel_outer(sch, block, out_shape, min_elements: int):
    """All loops but the innermost output loop fused and run in parallel, when the result is
    large enough (or of symbolic size) to be worth the thread pool."""
    from tvm import tirx

    loops = sch.get_loops(block)[:len(out_shape) - 1]
    numel = 1
    for d in out_shape:
        numel = numel * int(d) if isinstance(d, tirx.IntImm) and numel is not None else None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if numel is None or numel >= min_elements:
        sch.parallel(fused)
