"""Schedules of the op kernels, chosen by the kernel's kind and decided parameters only.

- ``injective`` (elementwise, fused bodies, copies, gathers): the outer loops fused and spread
  over the TVM thread pool; the innermost (contiguous) loop split by the vector lanes and
  vectorized when its extent is a static multiple of them. Otherwise it is left to LLVM's loop
  vectorizer, which vectorizes it at the target's width with a scalar tail: TVM's own
  ``vectorize`` of a loop with a tail (a symbolic or odd extent) scalarizes the whole vector
  (measured: 44 us LLVM-vectorized vs 90 us for a [64, 4096] f32 add on 2 threads).
- ``rows`` (softmax, layernorm, rmsnorm): one row per iteration of the parallel loop; the row
  statistics are computed under it, so they live in registers / a row-sized scratch.
- ``reduce``: the result's loops in parallel, the reduction under each.
- ``matmul``: rows (batch x M) in parallel; per row the k loop outside the n loop, so that the
  inner loop is a contiguous axpy over a row of the output (vectorized by LLVM).
- ``attention``: one query row per iteration (parallel over batch x heads x queries): scores,
  mask, softmax in float32 and the product with v, all under that row.
Small static kernels (fewer than ``parallel_min_elements`` elements) stay on one thread: the
pool's launch costs more than the work.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.codegen.cpu.ops.compute import (ATTENTION_KEY_TILE, ATTENTION_PV_SUMS,
                                             ATTENTION_ROW_LANES)


@dataclass(frozen=True)
class ScheduleParams:
    lanes: int  # 32-bit lanes of a vector register (vector_bits / 32)
    parallel_min_elements: int = 4096
    arch: str = "x86_64"  # the target's (target_cpu's "arch": x86_64, aarch64)


def params_for(target) -> ScheduleParams:
    """The decided parameters for a cpu target (its ``vector_bits``, or the host's)."""
    from qcompiler.codegen.cpu.host import target_cpu

    cpu = target_cpu(target)
    return ScheduleParams(lanes=cpu["vector_bits"] // 32, arch=cpu["arch"])


def _static(extent):
    from tvm import tirx

    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _numel(shape):
    n = 1
    for d in shape:
        s = _static(d)
        if s is None:
            return None
        n *= s
    return n


def _worth_parallel(shape, p: ScheduleParams) -> bool:
    n = _numel(shape)
    return n is None or n >= p.parallel_min_elements


def _loop_extent(sch, loop):
    return sch.get(loop).extent


def _vectorize_inner(sch, loop, p: ScheduleParams):
    extent = _static(_loop_extent(sch, loop))
    if extent is not None and extent >= p.lanes and extent % p.lanes == 0:
        _, inner = sch.split(loop, [None, p.lanes])
        sch.vectorize(inner)


def _outer_parallel(sch, loops, shape, p: ScheduleParams):
    """Fuse ``loops`` and run them in parallel (when worth it); the fused loop or None."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if _worth_parallel(shape, p):
        sch.parallel(fused)
    return fused


def schedule_injective(sch, outputs, p: ScheduleParams, stages=()):
    """``stages``: intermediate blocks kept as loop nests of their own (scheduled as the
    results are), every other one inlined into its uses."""
    for block in _all_blocks(sch):
        if sch.get(block).name_hint not in outputs and sch.get(block).name_hint not in stages:
            sch.compute_inline(block)
    for name in list(stages) + list(outputs):
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        shape = [_loop_extent(sch, lp) for lp in loops]
        if not loops:
            continue
        if len(loops) == 1:
            if _worth_parallel(shape, p) and _static(shape[0]) is None:
                sch.parallel(loops[0])
            else:
                _vectorize_inner(sch, loops[0], p)
            continue
        inner = _static(shape[-1])
        if len(loops) > 2 and inner is not None and 1 < inner < p.lanes \
                and _static(shape[-2]) is not None:
            # A short static innermost dim (an NCHW -> NHWC transpose of 3 channels): it is
            # unrolled and the dim above it stays a loop of its own, which LLVM vectorizes
            # (interleaved loads or stores), where one fused loop over the pixels divided
            # its index per element and stored bytes one at a time
            _outer_parallel(sch, loops[:-2], shape, p)
            sch.unroll(loops[-1])
            continue
        _outer_parallel(sch, loops[:-1], shape, p)
        _vectorize_inner(sch, loops[-1], p)


def _all_blocks(sch):
    root = sch.get_sblock("root") if _has_root(sch) else None
    return sch.get_child_blocks(root) if root is not None else []


def _has_root(sch):
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # a function without a root block
        return False


# The row statistics of softmax / layernorm / rmsnorm: reductions over one trailing axis.
ROW_REDUCTIONS = frozenset({"row_max", "row_sum", "total", "sq_sum"})


def schedule_rows(sch, rows: int, p: ScheduleParams):
    """Everything but ``out`` is computed per row under the (parallel) row loop."""
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    shape = [_loop_extent(sch, lp) for lp in loops]
    if rows == 0:
        return
    partial = [rf for rf in (_vector_dot_products(sch, b, p) for b in _all_blocks(sch)
                             if sch.get(b).name_hint in ROW_REDUCTIONS
                             and len(sch.get_loops(b)) == rows + 1) if rf is not None]
    row = _outer_parallel(sch, loops[:rows], shape, p)
    for block in reversed(_all_blocks(sch)):
        if sch.get(block).name_hint != "out":
            sch.compute_at(block, row)
    for rf in partial:  # under the row: [lanes, cols / lanes]
        lane, outer = sch.get_loops(rf)[-2:]
        sch.reorder(outer, lane)
        sch.vectorize(lane)


def schedule_reduce(sch, p: ScheduleParams):
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    depth = 0
    if loops:
        shape = [_loop_extent(sch, lp) for lp in loops]
        fused = _outer_parallel(sch, loops, shape, p)
        depth = 1
        # every stage (acc, and a log-sum-exp's max before it) per result element
        for block in reversed(_all_blocks(sch)):
            if sch.get(block).name_hint != "out":
                sch.compute_at(block, fused)
    # the accumulators' init before their reduce loops: an empty reduction (a 0-size dim)
    # still gives the identity, where an init inside the loop would never run
    for block in _all_blocks(sch) if not loops else [
            b for b in _all_blocks(sch) if sch.get(b).name_hint != "out"]:
        _decompose_first_reduction(sch, block, depth)


def _decompose_first_reduction(sch, block, depth: int):
    if sch.get(block).init is None:
        return
    block_loops = sch.get_loops(block)
    if len(block_loops) > depth:
        sch.decompose_reduction(block, block_loops[depth])


MATMUL_ROWS = 4     # rows of a float matmul computed together (see schedule_matmul)
MATMUL_COLS = 256   # output columns per chunk


# Vectors of columns in a float matmul's register tile: MATMUL_TILE_ROWS x this many sums,
# half the vector registers (32 zmm on AVX-512, 16 ymm on AVX2).
MATMUL_TILE_VECTORS = {16: 4, 8: 2}


def schedule_matmul_tiles(sch, rows: int, p: ScheduleParams):
    """``compute._matmul_weight_tiles``: per tile of MATMUL_TILE_ROWS rows (in parallel) and
    vectors of columns, the sums in registers across the whole K loop (one broadcast of x per
    row and one load of w per vector per k: rows x vectors FMAs), then copied out."""
    acc, out = sch.get_sblock("acc_tile"), sch.get_sblock("out")
    from qcompiler.codegen.cpu.ops.compute import matmul_tile_rows

    loops = sch.get_loops(acc)  # leading dims, M padded to whole tiles, N, K
    n = _static(_loop_extent(sch, loops[-2]))
    # (a symbolic M: _static is None, matmul_tile_rows gives the compute's MATMUL_TILE_ROWS)
    m_tiles, m_rows = sch.split(loops[-3], [None, matmul_tile_rows(
        _static(_loop_extent(sch, loops[-3])))])
    loops = [*loops[:-3], m_tiles, m_rows, *loops[-2:]]
    vectors = MATMUL_TILE_VECTORS.get(p.lanes, 2)
    while n % (vectors * p.lanes):
        vectors -= 1
    co, c_vec, c_lane = sch.split(loops[-2], [None, vectors, p.lanes])
    a_rows, a_k = loops[-3], loops[-1]
    # column panels outside the row tiles: one panel of w (K x vectors*lanes) is reused by
    # every row tile from L2 instead of all of w streaming through once per tile
    sch.reorder(co, m_tiles, a_k, a_rows, c_vec, c_lane)
    panel = sch.fuse(*loops[:-4], co) if len(loops) > 5 else co
    sch.parallel(panel)
    m_extent = _static(_loop_extent(sch, m_tiles))
    if m_extent is None or m_extent > 1:
        # Pack the panel of w (K rows x the tile's columns, N floats apart in w: a page per
        # row) into a contiguous scratch once for all row tiles: without it every k step of
        # the tile loop touches another page ([128, 768] x [768, 3072], 1 thread: 56 -> 118
        # GF/s, numpy/OpenBLAS ~125). A static single tile of rows (M <= 4) reads w once
        # anyway and skips the copy; a symbolic M always packs, which costs a run at M = 1
        # ([1, 2048] x [2048, 32000]: 37 ms unpacked, 49 ms packed).
        packed = sch.cache_read(acc, 1, "global")
        sch.compute_at(packed, panel)
        p_lane = sch.get_loops(packed)[-1]
        _, p_lane = sch.split(p_lane, [None, p.lanes])
        sch.vectorize(p_lane)
    # The tile's sums in registers, stored once per tile into acc_tile. (The copy out cannot
    # move into the tile loop: with a symbolic M, TVM cannot prove that the tiles cover out.)
    store = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(store, m_tiles)
    s_lane = sch.get_loops(store)[-1]
    s_vec, s_lane = sch.split(s_lane, [None, p.lanes])
    sch.vectorize(s_lane)
    out_loops = sch.get_loops(out)
    if _worth_parallel([_loop_extent(sch, lp) for lp in out_loops], p):
        sch.parallel(out_loops[0])
    sch.unroll(a_rows)
    sch.unroll(c_vec)
    sch.vectorize(c_lane)
    init = sch.decompose_reduction(acc, a_k)
    i_rows, i_vec, i_lane = sch.get_loops(init)[-3:]
    sch.vectorize(i_lane)
    _, o_lane = sch.split(out_loops[-1], [None, p.lanes])
    sch.vectorize(o_lane)


def schedule_matmul(sch, rows: int, p: ScheduleParams):
    names = [sch.get(b).name_hint for b in _all_blocks(sch)]
    if "acc_tile" in names:
        schedule_matmul_tiles(sch, rows, p)
        return
    acc = sch.get_sblock("acc")
    if "out" in names:
        out = sch.get_sblock("out")
        loops = sch.get_loops(out)
        shape = [_loop_extent(sch, lp) for lp in loops]
        row = _outer_parallel(sch, loops[:rows], shape, p)
        sch.compute_at(acc, row)
    else:
        loops = sch.get_loops(acc)
        shape = [_loop_extent(sch, lp) for lp in loops[:-1]]
        n = _static(shape[-1])
        if n is not None and n >= 4 * p.lanes:
            # Row blocks of MATMUL_ROWS share each loaded row of b (4x less b traffic than row
            # by row); columns in chunks of MATMUL_COLS so that the block's output stays in L1.
            fused = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
            ro, ri = sch.split(fused, [None, MATMUL_ROWS])
            if _worth_parallel(shape, p):
                sch.parallel(ro)
            col, red = sch.get_loops(acc)[-2:]
            chunk = MATMUL_COLS if n > MATMUL_COLS and n % MATMUL_COLS == 0 else n
            co, ci = sch.split(col, [None, chunk])
            sch.reorder(co, red, ri, ci)
            sch.decompose_reduction(acc, red)
            return
        row = _outer_parallel(sch, loops[:rows], shape, p)
    spatial, red = sch.get_loops(acc)[-2:]
    sch.reorder(red, spatial)
    sch.decompose_reduction(acc, red)


def schedule_attention(sch, p: ScheduleParams):
    """One (batch, kv head) per iteration of the parallel loop: k transposed once into a
    [D, Skv] scratch (``k_t``), then for each query head of the group and each query row the
    scores as D axpys over the contiguous keys, mask, softmax and the product with v (one
    axpy over the head dim per key, into interleaved partial sums), all in row-sized
    scratch. A decode step (``compute.attention_by_heads``) has no k_t: its scores come from
    a loop nest of their own over the kv heads (``_schedule_scores_by_head``), and the rest
    reads them."""
    names = {sch.get(b).name_hint for b in _all_blocks(sch)}
    bshd = "out_bshd" in names
    out = sch.get_sblock("out_bshd" if bshd else "out")
    loops = sch.get_loops(out)
    shape = [_loop_extent(sch, lp) for lp in loops]
    b, i, h, e = loops if bshd else (loops[0], loops[2], loops[1], loops[3])
    by_heads = "scores_by_head" in names
    per_kv_head = sch.get_sblock("scores_by_head" if by_heads else "k_t")
    kv_heads = _static(_loop_extent(sch, sch.get_loops(per_kv_head)[1]))
    hkv, g = sch.split(h, [kv_heads, None])
    sch.reorder(b, hkv, g, i, e)
    head = _outer_parallel(sch, [b, hkv], shape, p)
    for block in reversed(_all_blocks(sch)):
        if sch.get(block).name_hint not in ("out", "out_bshd", "k_t", "v_c", "scores_by_head",
                                            "q_t"):
            sch.compute_at(block, i)
    if by_heads:
        # the scores their own loop nest over the kv heads (in parallel), for every padded
        # key: under the head loop its tiles would shrink to the keys read, each key checked.
        # q_t (a few hundred floats) runs before it, serial: a parallel region costs more
        loops = sch.get_loops(sch.get_sblock("scores_by_head"))
        _outer_parallel(sch, loops[:2], shape, p)
    else:
        sch.compute_at(per_kv_head, head)
        if "v_c" in names:  # v's rows of the kv head copied together, as k_t
            sch.compute_at(sch.get_sblock("v_c"), head)
    scores = sch.get_sblock("scores")
    keys = _static(_loop_extent(sch, sch.get_loops(scores)[-1 if by_heads else -2]))
    if by_heads:
        _schedule_scores_by_head(sch, per_kv_head)
    else:
        j, dd = sch.get_loops(scores)[-2:]
        sch.reorder(dd, j)
        sch.decompose_reduction(scores, dd)
        # The axpys over the keys a few head dims at a time (the head-dim loop split and its
        # inner part unrolled under the key loop): each key's running score is loaded and
        # stored once per `unroll` products instead of once per product, in the same order of
        # d (the same sums). MiniLM's 32 x 128 attention on a Zen 4, 1 thread: 39.8 -> 30.5
        # ms per call.
        extent = _static(_loop_extent(sch, dd))
        unroll = next((u for u in (8, 4, 2) if extent is not None and extent % u == 0), None)
        if unroll is not None and extent > unroll:
            update = sch.get_sblock("scores_update")
            dd, j = sch.get_loops(update)[-2:]
            d_outer, d_inner = sch.split(dd, [None, unroll])
            sch.reorder(d_outer, j, d_inner)
            sch.unroll(d_inner)
    for name in ("row_max_lanes", "row_sum_lanes"):  # the lanes innermost, under the keys
        if keys is not None and keys <= ATTENTION_ROW_LANES:
            break  # one block of keys: no key loop to put outside the lanes
        block = sch.get_sblock(name)
        lane, key_blocks = sch.get_loops(block)[-2:]
        sch.reorder(key_blocks, lane)
        sch.decompose_reduction(block, key_blocks)
    # probs @ v: per key block, the partial sums (unrolled) over the head dim (vectorized):
    # ATTENTION_PV_SUMS independent chains of accumulators held in registers
    parts = sch.get_sblock("acc_parts")
    if keys is not None and keys <= ATTENTION_PV_SUMS:
        # one block of keys: compute_at left no key-block loop (its extent is 1)
        sch.unroll(sch.get_loops(parts)[-2])
        return
    r, e, jo = sch.get_loops(parts)[-3:]
    sch.reorder(jo, r, e)
    sch.decompose_reduction(parts, jo)
    sch.unroll(r)


def _schedule_scores_by_head(sch, block) -> None:
    """scores_by_head [.., keys, heads] (``compute._attention``): per tile of
    ATTENTION_KEY_TILE keys, the head dim outermost, then the tile's keys (unrolled) and the
    group's heads (a vector; one head for MHA: scalars): each product is k[j, d] broadcast
    times the group's q[:, d] into the key's accumulator, which LLVM keeps in a register
    across the head dim."""
    j, r, dd = sch.get_loops(block)[-3:]
    group = _static(_loop_extent(sch, r))
    jo, ji = sch.split(j, [None, ATTENTION_KEY_TILE])
    # the tile's accumulators in a local buffer (a few vectors: registers), stored once
    tile = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(tile, jo)
    sch.reorder(dd, ji, r)
    sch.vectorize(r)  # while the block is still a reduction (with its init)
    sch.unroll(ji)
    init = sch.decompose_reduction(block, dd)
    for stage in (init, tile):
        # the tile's (keys, heads): the heads a vector, the keys unrolled; where TVM dropped
        # the heads loop of a group of one (MHA), the innermost loop is the keys
        loops = sch.get_loops(stage)
        if group == 1 and _static(_loop_extent(sch, loops[-1])) != 1:
            sch.unroll(loops[-1])
        else:
            sch.vectorize(loops[-1])
            sch.unroll(loops[-2])


def _vector_dot_products(sch, block, p: ScheduleParams):
    """A dot product over a static innermost reduction (the head dim) as ``lanes`` partial
    sums (an rfactor block, its partial-sum axis last), then one short sum: LLVM keeps a float
    reduction in order (a scalar chain of dependent FMAs, 4 cycles each) unless the schedule
    splits it. Returns the rfactor block or None. Call before the blocks are placed."""
    loops = sch.get_loops(block)
    extent = _static(_loop_extent(sch, loops[-1]))
    if extent is None or extent < 2 * p.lanes or extent % p.lanes:
        return None
    _, inner = sch.split(loops[-1], [None, p.lanes])
    rank = len(sch.get(block).writes[0].region)
    return sch.rfactor(inner, factor_axis=rank)


def schedule(func, kernel, p: ScheduleParams):
    """The scheduled PrimFunc of a ``compute.Kernel``'s function."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    if any(_static(d) == 0 for out in kernel.outputs for d in out.shape):
        # an empty result (a static 0-size dim): nothing runs, and splitting its loops for
        # threads or vectors would divide by their zero extent
        return sch.mod["main"]
    if kernel.kind == "injective":
        schedule_injective(sch, [t.op.name for t in kernel.outputs], p, kernel.stages)
    elif kernel.kind == "rows":
        schedule_rows(sch, kernel.rows, p)
    elif kernel.kind == "reduce_rows":
        # log_softmax / hardmax: row statistics then the row; each stage its own loop nest
        pass
    elif kernel.kind == "reduce":
        schedule_reduce(sch, p)
    elif kernel.kind == "matmul":
        schedule_matmul(sch, kernel.rows, p)
    elif kernel.kind == "attention":
        schedule_attention(sch, p)
    return sch.mod["main"]

