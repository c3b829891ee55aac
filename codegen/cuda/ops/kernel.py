"""``kernel_source(node)``: the CUDA C++ of one QIR node's op kernel (the ABI in common.py).

Each op family has a template under ``codegen/cuda/templates/ops/``; this module decides its
parameters (types, ranks, vector width, tile sizes) from the node and renders it. A kernel's
symbol is ``qc_cu_<op>_<sha1 of its source rendered without names>``, so equal nodes (same op,
attributes, types and baked values) share one kernel.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import jinja2
import numpy as np

from qcompiler.codegen.cuda.ops.body import FLOAT_MATH_OPS, LOGIC_OPS, device_function
from qcompiler.codegen.cuda.ops.common import (C_SIZES, c_type, literal, node_label,
                                               unsupported)
from qcompiler.ir.core import Node, constant_value
from qcompiler.ir.elementwise_body import Body, Stmt, parse_body
from qcompiler.ir.types import elem

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "templates", "ops")
ELEMENTWISE_OPS = ("add", "sub", "mul", "div", "max", "min", "pow", "sqrt", "erf", "relu",
                   "sigmoid", "tanh", "exp", "neg", "abs", "reciprocal", "gelu", "where",
                   "equal", "greater", "greater_or_equal", "less", "less_or_equal", "and",
                   "isnan") + FLOAT_MATH_OPS + LOGIC_OPS  # silu: a body op only (no QIR op)
FLAT_COPY_OPS = ("identity", "reshape", "squeeze", "unsqueeze")
SUPPORTED_OPS = frozenset(ELEMENTWISE_OPS + FLAT_COPY_OPS + (
    "cast", "fused_elementwise", "expand", "softmax", "layernorm", "rmsnorm", "reduce_mean",
    "reduce_sum", "reduce_l2", "transpose", "concat", "split", "slice", "gather", "matmul",
    "attention", "rotary_embedding", "kv_concat", "qkv_heads", "qconv", "pool", "quantize",
    "dequantize", "conv", "pad"))
# The ops whose kernels size their workspace from the run-time shapes (attention: the split-KV
# partials; qconv: its split-K partials). Every other op's template answers 0 for any shape,
# so a plan need not ask its library again when only shapes change (``CudaOpsLibrary``;
# tests/test_cuda_ops.py checks the generated sources).
SHAPE_WORKSPACE_OPS = frozenset({"attention", "qconv"})
MAX_RANK = 8
NAME = "__QC_SYMBOL__"  # the symbol's place while the source is hashed

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True, trim_blocks=False)


def _data_operands(node: Node) -> list:
    return [v for v in node.operands if v is not None]


def _ranks_check(node: Node) -> None:
    for v in _data_operands(node) + list(node.results):
        if v.type.rank > MAX_RANK:
            raise unsupported(node, f"rank {v.type.rank} > {MAX_RANK}")


def _offsets(values) -> list:
    out, off = [], 0
    for v in values:
        out.append(off)
        off += v.type.rank
    return out


# Attributes passed to a kernel's launcher at run time instead of being rendered into its
# source (``{symbol}_run(..., consts)``), so that nodes differing only in them share one
# kernel: a model's 22 layers of qkv_heads were 22 copies of one kernel.
LAUNCH_CONSTANTS = {"qkv_heads": ("layer",), "kv_concat": ("layer",)}
SHARED_GUARD = "QC_KERNEL_"  # the include guard's prefix of such a shared kernel's source


def _render(template: str, node: Node, **params) -> str:
    return _env.get_template(template).render(symbol=NAME, ns=f"{NAME}_ns",
                                              label=node.op, **params)


def kernel_source(node: Node, module=None) -> tuple[str, str]:
    """(symbol, CUDA source) of ``node``'s kernel. Raises CudaOpsError naming the node when
    the op (or one of its types) has no CUDA kernel."""
    if node.op not in SUPPORTED_OPS:
        raise unsupported(node, "op not in the CUDA op library")
    _ranks_check(node)
    if node.op in ELEMENTWISE_OPS or node.op in ("cast", "fused_elementwise", "expand"):
        text = _elementwise(node)
    elif node.op in ("softmax", "layernorm", "rmsnorm"):
        text = _rows(node)
    elif node.op.startswith("reduce_"):
        text = _reduce(node)
    elif node.op in FLAT_COPY_OPS or node.op in ("transpose", "concat", "split", "slice", "pad"):
        text = _copy(node, module)
    elif node.op == "gather":
        text = _gather(node)
    elif node.op == "matmul":
        text = _matmul(node)
    elif node.op == "rotary_embedding":
        text = _rotary(node)
    elif node.op == "qkv_heads":
        text = _qkv_heads(node)
    elif node.op == "qconv":
        text = _qconv(node, module)
    elif node.op == "pool":
        text = _pool(node)
    elif node.op == "conv":
        text = _conv(node)
    elif node.op in ("quantize", "dequantize"):
        text = _quantize(node, module)
    elif node.op == "kv_concat":
        text = _render("kv_concat.cu.j2", node, x_type=c_type(node.operands[0].type.dtype, node),
                       new_bshd=bool(node.attrs["new_bshd"]))
    else:
        text = _attention(node)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    symbol = f"qc_cu_{node.op}_{digest}"
    text = text.replace(NAME, symbol)
    consts = [int(node.attrs[a]) for a in LAUNCH_CONSTANTS.get(node.op, ())]
    if not consts:
        return symbol, text
    return _bound_launcher(node, symbol, text, consts)


def _bound_launcher(node: Node, shared: str, text: str, consts: list) -> tuple[str, str]:
    """(symbol, source) of a node whose kernel takes launch constants: the shared kernel
    (guarded, so that a library or test pasting the sources of several such nodes defines it
    once), then the node's own entry points, which call it with ``consts``."""
    symbol = f"{shared}_{'_'.join(str(c).replace('-', 'm') for c in consts)}"
    names = ", ".join(f"{a} = {c}" for a, c in zip(LAUNCH_CONSTANTS[node.op], consts))
    guard = f"{SHARED_GUARD}{shared.upper()}"
    values = ", ".join(f"{c}LL" for c in consts)
    return symbol, (
        f"#ifndef {guard}\n#define {guard}\n{text}#endif  // {guard}\n\n"
        f"// {node.op} with {names}: the launcher above, with these constants\n"
        f'extern "C" int64_t {symbol}_workspace_bytes(const int64_t* shapes) {{\n'
        f"  return {shared}_workspace_bytes(shapes);\n}}\n"
        f'extern "C" int {symbol}(void* const* ptrs, const int64_t* shapes, void* workspace,\n'
        f"                  cudaStream_t stream) {{\n"
        f"  const int64_t consts[] = {{{values}}};\n"
        f"  return {shared}_run(ptrs, shapes, workspace, stream, consts);\n}}\n")


# ---- elementwise -------------------------------------------------------------------------------


def _body_of(node: Node) -> Body:
    """The node as an elementwise body over its operands (a one-statement body for plain ops)."""
    if node.op == "fused_elementwise":
        return parse_body(node.attrs["body"])
    if node.op == "cast":
        return Body((Stmt("t0", "cast", elem(node.attrs["to"]).name, ("x0",)),), "t0")
    if node.op == "expand":
        return Body((Stmt("t0", "identity", None, ("x0",)),), "t0")
    attr = node.attrs.get("approximate", "none") if node.op == "gelu" else None
    args = tuple(f"x{i}" for i in range(len(node.operands)))
    return Body((Stmt("t0", node.op, attr, args),), "t0")


def _elementwise(node: Node) -> str:
    operands = node.operands[:1] if node.op == "expand" else node.operands
    if any(v is None for v in operands):
        raise unsupported(node, "a missing operand")
    in_types = [c_type(v.type.dtype, node) for v in operands]
    out = node.results[0]
    out_type = c_type(out.type.dtype, node)
    fn = device_function("body", _body_of(node), [v.type.dtype for v in operands], out_type, node)
    widest = max(C_SIZES[t] for t in in_types + [out_type])
    # expand's shape operand is a parameter too (passed, unused): its dims sit before y's
    ranks = [v.type.rank for v in _data_operands(node)]
    return _render("elementwise.cu.j2", node, body_fn=fn, rank=out.type.rank, vec=16 // widest,
                   in_types=in_types, out_type=out_type, in_ranks=ranks[:len(in_types)],
                   in_offsets=_offsets(_data_operands(node))[:len(in_types)],
                   out_offset=sum(ranks), out_index=len(ranks))


# ---- rows ---------------------------------------------------------------------------------------


def _rows(node: Node) -> str:
    x = node.operands[0]
    xt = c_type(x.type.dtype, node)
    if xt not in ("__half", "__nv_bfloat16", "float"):
        raise unsupported(node, f"{x.type.dtype.name} rows (f16, bf16, f32 only)")
    rank = x.type.rank
    if rank == 0:
        raise unsupported(node, "a 0-d operand")
    axis = node.attrs["axis"] % rank
    params = {}
    operands = _data_operands(node)
    for role, i in (("scale", 1), ("bias", 2)):
        v = node.operand(i) if i < len(node.operands) else None
        params[f"has_{role}"] = v is not None
        params[f"{role}_type"] = c_type(v.type.dtype, node) if v is not None else ""
        if v is not None:
            tail = tuple(x.type.shape[rank - v.type.rank:]) if v.type.rank else ()
            lead_ones = all(d == 1 for d in v.type.shape[:max(0, v.type.rank - (rank - axis))])
            if v.type.rank > rank or not lead_ones or any(
                    a != b and a != 1 for a, b in zip(v.type.shape, tail)) or any(
                    a == 1 and b != 1 for a, b in zip(v.type.shape, tail)):
                raise unsupported(node, f"{role} of shape {v.type.shape} (a suffix of x's "
                                        "normalized dims only)")
    if node.op == "softmax":
        cols = x.type.shape[axis]
    else:
        cols = 1
        for d in x.type.shape[axis:]:
            cols = cols * d if isinstance(d, int) and isinstance(cols, int) else None
    # a warp per row up to 1024 columns (32 per lane), else a block of 256 threads per row
    scale = node.operand(1) if node.op != "softmax" and len(node.operands) > 1 else None
    # a constant scale or bias may be read before the kernel waits for the previous one (PDL)
    bias = node.operand(2) if node.op == "layernorm" and len(node.operands) > 2 else None
    for role, v in (("scale", scale), ("bias", bias)):
        params[f"{role}_is_constant"] = bool(v is not None and v.producer is not None
                                             and v.producer.op == "constant")
    return _render("rows.cu.j2", node, op=node.op, x_type=xt, rank=rank, axis=axis,
                   eps=repr(float(node.attrs.get("epsilon", 0.0))) + "f",
                   scale_offset=rank,
                   scale_rank=operands[1].type.rank if node.op != "softmax" else 0,
                   n_in=len(operands), warp_max_cols=1024, block_threads=256,
                   **params)


# ---- reductions -------------------------------------------------------------------------------


def _reduce(node: Node) -> str:
    x = node.operands[0]
    rank = x.type.rank
    axes = list(node.attrs["axes"])
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        raise unsupported(node, "noop_with_empty_axes (a copy)")
    axes = sorted({a % rank for a in axes}) if axes else list(range(rank))
    xt = c_type(x.type.dtype, node)
    is_float = x.type.dtype.is_float
    acc = ("double" if xt == "double" else "float") if is_float else \
        ("uint64_t" if x.type.dtype.kind == "uint" else "int64_t")
    if is_float:
        store = "acc" if xt in ("float", "double") else "qc_ops::from_f<T>(acc)"
    else:
        store = "(T)acc"
    return _render("reduce.cu.j2", node, op=node.op, x_type=xt, acc_type=acc, rank=rank,
                   is_float=is_float, n_reduced=len(axes), n_kept=rank - len(axes),
                   reduced_flags=", ".join("true" if k in axes else "false" for k in range(rank))
                   or "false", store=store)


# ---- data movement ------------------------------------------------------------------------------


def _constant_array(node: Node, v, what: str, module) -> np.ndarray:
    """The value of ``v``, an operand of ``node`` that must be a constant (the side table or
    the constant node's own value); refused naming ``what`` otherwise."""
    arr = constant_value(module, v) if module is not None else None
    if arr is None and v.producer is not None and v.producer.op == "constant" \
            and "value" in v.producer.attrs:
        arr = v.producer.attrs["value"]
    if arr is None:
        raise unsupported(node, f"{what} is not a constant")
    return np.asarray(arr)


def _ints(node: Node, i: int, module) -> Optional[list]:
    v = node.operand(i) if i < len(node.operands) else None
    if v is None:
        return None
    return [int(a) for a in _constant_array(node, v, f"operand {i}", module).reshape(-1)]


def _copy(node: Node, module) -> str:
    x = node.operands[0]
    xt = c_type(x.type.dtype, node)
    operands = _data_operands(node)
    common = dict(x_type=xt, rank=max(x.type.rank, 1), n_in=len(operands), op=node.op,
                  in_rank=x.type.rank, perm=[], slices=[], axis=0, n_out=len(node.results),
                  out_offset=sum(v.type.rank for v in operands), tiled=None)
    if node.op in FLAT_COPY_OPS:
        return _render("copy.cu.j2", node, mode="flat", **common)
    if node.op == "transpose":
        common["perm"] = [int(p) for p in node.attrs["perm"]]
        common["tiled"] = _batched_transpose(common["perm"])
        return _render("copy.cu.j2", node, mode="transpose", **common)
    if node.op == "concat":
        common["axis"] = node.attrs["axis"] % x.type.rank
        return _render("copy.cu.j2", node, mode="concat", **common)
    if node.op == "split":
        common["axis"] = node.attrs["axis"] % x.type.rank
        return _render("copy.cu.j2", node, mode="split", **common)
    if node.op == "pad":
        return _pad(node, module, common)
    starts, _ = _ints(node, 1, module), _ints(node, 2, module)
    axes = _ints(node, 3, module) or list(range(len(starts)))
    steps = _ints(node, 4, module) or [1] * len(starts)
    if 0 in steps:
        raise unsupported(node, "slice step 0")
    common["slices"] = [(a % x.type.rank, s, st) for s, a, st in zip(starts, axes, steps)]
    return _render("copy.cu.j2", node, mode="slice", **common)


def _pad(node: Node, module, common: dict) -> str:
    """ONNX Pad with constant pads (and value): constant, edge, reflect and wrap
    (cuda-conv-layout pads a small channel count to 4 with constant mode)."""
    mode = node.attrs["mode"]
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise unsupported(node, f"pad mode {mode!r}")
    x = node.operands[0]
    pads = _ints(node, 1, module)
    if pads is None:
        raise unsupported(node, "pads that are not constant")
    value = node.operands[2] if len(node.operands) > 2 else None
    fill = 0
    if value is not None:
        v = _constant_array(node, value, "value", module).reshape(-1)
        fill = v[0] if v.size else 0
    xt = common["x_type"]
    if x.type.dtype.is_float:
        fill = literal(float(fill), "double" if xt == "double" else "float")
        value = fill if xt in ("float", "double") else f"qc_ops::from_f<T>({fill})"
    else:
        value = f"(T){int(fill)}LL"
    r = x.type.rank
    begins, ends = [int(p) for p in pads[:r]], [int(p) for p in pads[r:]]
    # constant padding at the end of the last axis only: a row copy (no index division)
    last_axis_only = (mode == "constant" and r >= 1 and not any(begins)
                      and not any(ends[:-1]) and ends[-1] > 0)
    return _render("copy.cu.j2", node, mode="pad", pad_mode=mode, pad_begins=begins,
                   pad_ends=ends, pad_value=value, last_axis_only=last_axis_only, **common)


def _batched_transpose(perm: list) -> dict | None:
    """The axes of x as {batch, rows, cols} when ``perm`` is a batch of matrix transposes:
    x viewed as [B, R, C] becomes [B, C, R] with each group a run of consecutive axes (NCHW ->
    NHWC: rows (1,), cols (2, 3)); else None."""
    runs = []  # the result's axes, as runs of consecutive axes of x
    for p in perm:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    in_order = sorted(runs)
    merged = [in_order.index(r) for r in runs]
    if merged == [1, 0]:
        return {"batch": [], "rows": in_order[0], "cols": in_order[1]}
    if merged == [0, 2, 1]:
        return {"batch": in_order[0], "rows": in_order[1], "cols": in_order[2]}
    return None


def _gather(node: Node) -> str:
    x, ids = node.operands
    return _render("gather.cu.j2", node, x_type=c_type(x.type.dtype, node),
                   index_type=c_type(ids.type.dtype, node), axis=node.attrs["axis"] % x.type.rank,
                   x_rank=x.type.rank, ids_rank=ids.type.rank)


# ---- matmul and attention --------------------------------------------------------------------


def _matmul(node: Node) -> str:
    a, b = node.operands
    y = node.results[0]
    if a.type.rank < 2 or b.type.rank < 2:
        raise unsupported(node, "matmul of a 1-D operand")
    at, bt, yt = (c_type(v.type.dtype, node) for v in (a, b, y))
    if not (a.type.dtype.is_float and b.type.dtype.is_float):
        raise unsupported(node, "integer matmul")
    acc = "double" if "double" in (at, bt) else "float"
    store = "acc[i][j]" if yt in ("float", "double") else "qc_ops::from_f<TY>(acc[i][j])"
    return _render("matmul.cu.j2", node, a_type=at, b_type=bt, y_type=yt, acc_type=acc,
                   n_batch=y.type.rank - 2, a_rank=a.type.rank, b_rank=b.type.rank, store=store)


def _rotary(node: Node) -> str:
    x, cos, sin = node.operands[:3]
    pos = node.arg("position_ids")
    xt, ct = c_type(x.type.dtype, node), c_type(cos.type.dtype, node)
    if xt not in ("__half", "__nv_bfloat16", "float") or c_type(sin.type.dtype, node) != ct:
        raise unsupported(node, "x of f16/bf16/f32 and caches of one type")
    if cos.type.rank not in (2, 3) or (pos is not None and cos.type.rank != 2):
        raise unsupported(node, f"a cos cache of shape {cos.type.shape}")
    if x.type.rank == 3 and not node.attrs.get("num_heads"):
        raise unsupported(node, "3-D x without num_heads")
    return _render("rotary.cu.j2", node, x_type=xt, cache_type=ct, has_pos=pos is not None,
                   pos_type=c_type(pos.type.dtype, node) if pos is not None else "",
                   four_d=x.type.rank == 4, interleaved=bool(node.attrs.get("interleaved", 0)),
                   round_each=ct == xt, num_heads=int(node.attrs.get("num_heads") or 0),
                   x_rank=x.type.rank, cache_rank=cos.type.rank,
                   rotary_dim=int(node.attrs.get("rotary_embedding_dim") or 0),
                   n_in=len(_data_operands(node)))


def _qkv_heads(node: Node) -> str:
    qkv, cos, sin = node.arg("qkv"), node.arg("cos_cache"), node.arg("sin_cache")
    pos = node.arg("position_ids")
    xt = c_type(qkv.type.dtype, node)
    ct = c_type(cos.type.dtype, node) if cos is not None else xt
    if xt not in ("__half", "__nv_bfloat16", "float") or (
            cos is not None and (sin is None or c_type(sin.type.dtype, node) != ct)):
        raise unsupported(node, "qkv of f16/bf16/f32 and caches of one type")
    if cos is not None and (cos.type.rank not in (2, 3) or (
            pos is not None and (cos.type.rank != 2 or pos.type.rank != 2))):
        raise unsupported(node, f"a cos cache of shape {cos.type.shape} with position_ids "
                          f"{pos.type.shape if pos is not None else None}")
    a = node.attrs
    return _render("qkv_heads.cu.j2", node, x_type=xt, cache_type=ct,
                   has_rotary=cos is not None, has_pos=pos is not None,
                   pos_type=c_type(pos.type.dtype, node) if pos is not None else "",
                   pos_rank=pos.type.rank if pos is not None else 0,
                   interleaved=bool(a["interleaved"]), round_each=ct == xt,
                   num_heads=int(a["num_heads"]), kv_heads=int(a["kv_heads"]),
                   cache_rank=cos.type.rank if cos is not None else 0,
                   has_past=node.arg("past_k") is not None,
                   rotary_dim=int(a["rotary_embedding_dim"] or 0))


# ---- quantized convolution, pooling, quantize / dequantize ---------------------------------


def _constant(node: Node, name: str, module):
    v = node.arg(name)
    return None if v is None else _constant_array(node, v, name, module)


# The implicit GEMM's block tiles, (BM pixels, BN channels, WM x WN warps), each with the
# least output pixels (at run time: the batch is symbolic), output channels and K (static: kh
# kw c) a call needs to take it; the first that applies is taken, the last applies to every
# call. With a batch of images:
# - 128 x 128 from 128 channels and 64 x 132 pixels (ResNet-18's 14 x 14 layers at batch 64:
#   196 blocks of 128 x 128, 1.4x faster than 784 of 64 x 64, whose operand reads from L2
#   bound them); at 7 x 7 (100 blocks) 2-3x slower than 64 x 64;
# and from 128 x 132 pixels (about a block per SM of an H100/H200):
# - 256 x 64 over 8 warps of 64 x 32 from 48 channels and K 200 (ResNet-18's first stage:
#   twice the reuse of each weight tile read from L2; and its stem, K 224: 113 -> 105 us);
# - 128 x 64 from 48 channels (short K: MobileNetV2's 1 x 1 expansions of 16-24 channels);
# - 128 x 32 over 4 warps of 32 x 32 below 48 channels (a 64-wide tile would be half
#   padding, and a block's time is mostly its fixed costs: one or two K steps);
# else 64 x 64 (one image: ResNet-18's last layers have 49 pixels).
# Measured on an H100 at batch 64 (QC_QCONV_TILES sweeps: 2026-12-05 14:23,
# `cnn-gpu-h100-20261205-14*.json`, and 15:43, `cnn-gpu-h100-20261205-154*-tiles-*.json`):
# ResNet-18's 64-channel 3x3 layers 80-98 us with 64 x 64 tiles, 58-67 with 128 x 64, 50-59
# with 256 x 64; MobileNetV2's 16-32-channel layers (stem, projections) 1.2-1.5x faster with
# 128 x 32 than with 128 x 64 or 256 x 64, its 16 -> 96 expansion at 112² 131 us with 128 x 64
# and 189 with 128 x 32. 256 x 128 or 128 x 256 for the 128-512-channel layers, a 4th stage
# or 128-byte K steps were each slower (14:23). ResNet-18 at batch 64 with 128 x 128 from
# 64 x 132 pixels: graph 1.109 -> 1.045 ms (15:56, `cnn-gpu-h100-20261205-1556-tiles-*.json`);
# 256 x 64 from K 200 instead of 512 (the stem too): 0.957 -> 0.948 ms, MobileNetV2 the same
# (18:12, `cnn-gpu-h100-20261205-181*-tiles-*.json`).
QCONV_TILES = [
    {"min_pixels": 64 * 132, "min_channels": 128, "tile": (128, 128, 4, 2)},
    {"min_pixels": 128 * 132, "min_channels": 48, "min_k": 200, "tile": (256, 64, 4, 2)},
    {"min_pixels": 128 * 132, "min_channels": 48, "tile": (128, 64, 4, 2)},
    {"min_pixels": 128 * 132, "min_channels": 1, "tile": (128, 32, 4, 1)},
    {"min_pixels": 0, "min_channels": 1, "tile": (64, 64, 2, 2)},
]
# K bytes per pipeline stage and stages in flight (cp.async ring)
QCONV_PIPELINE = {"bk": 64, "stages": 3}
# Split-K where the tiles fill less than half of an H100/H200's 132 SMs: up to 32 parts of
# at least 3 K steps (192 codes), to about 132 blocks (no more: a grid that fits on the SMs
# lets the next kernel launch early). A batch-1 ResNet's last layers (49 pixels, K = 4608)
# then take 15 parts of 5 steps instead of 9 of 8: their time is the latency of the steps.
QCONV_SPLIT = {"split_target_blocks": 132, "split_min_steps": 3, "max_splits": 32}


def _qconv_tiles(channels: int, k: int) -> list:
    """The tiles of QCONV_TILES (or of ``QC_QCONV_TILES``, for tile sweeps on the device:
    ``min_pixels:min_channels:BMxBNxWMxWN[:min_k]`` entries joined by ``;``) that a layer of
    ``channels`` output channels and a K of ``k`` can take, as the template's table."""
    table = QCONV_TILES
    override = os.environ.get("QC_QCONV_TILES")
    if override:
        table = []
        for entry in override.split(";"):
            pix, ch, dims, *min_k = entry.split(":")
            table.append({"min_pixels": int(pix), "min_channels": int(ch),
                          "min_k": int(min_k[0]) if min_k else 0,
                          "tile": tuple(int(d) for d in dims.split("x"))})
    tiles = []
    for t in table:
        if channels < t["min_channels"] or k < t.get("min_k", 0):
            continue
        if tiles and t["min_pixels"] >= tiles[-1]["min_pixels"]:
            continue  # an earlier tile takes every call this one would: never launched
        tiles.append(dict(zip(("bm", "bn", "wm", "wn"), t["tile"]), min_pixels=t["min_pixels"]))
    if not tiles or tiles[-1]["min_pixels"] != 0:
        raise ValueError(f"qconv tile table {table}: its last tile for {channels} channels "
                         "must take every pixel count (min_pixels 0)")
    return tiles


def _qconv_pipeline() -> dict:
    """QCONV_PIPELINE, or ``QC_QCONV_BK`` / ``QC_QCONV_STAGES`` (tile sweeps)."""
    return {"bk": int(os.environ.get("QC_QCONV_BK", QCONV_PIPELINE["bk"])),
            "stages": int(os.environ.get("QC_QCONV_STAGES", QCONV_PIPELINE["stages"]))}


def _qconv(node: Node, module) -> str:
    from qcompiler.runtime.reference import cuda_igemm_rows, qconv_output_bounds

    a = node.attrs
    cfg = a.get("config") or {}
    x, y = node.operands[0], node.results[0]
    if not a.get("channels_last", 0) or x.type.rank != 4:
        raise unsupported(node, "a 2-D channels-last qconv only (conv-channels-last)")
    if cfg.get("w_layout") not in ("cuda_igemm_mk", "cuda_igemm_rows", "cuda_direct_khwcm",
                                   "cuda_dw_t4") \
            or not cfg.get("bias_folds_x_zp"):
        raise unsupported(node, "weights not in a CUDA layout (cuda-conv-layout: zero points "
                          "and weights must be constants, centred weights within int8)")
    if a.get("requant", "float") != "float":
        raise unsupported(node, f"requant={a['requant']} (float requantization only)")
    _, h, w, c = x.type.shape
    _, oh, ow, m = y.type.shape
    if not all(isinstance(d, int) for d in (h, w, c, oh, ow, m)):
        raise unsupported(node, "symbolic spatial or channel dims")
    mw, cg, kh, kw = cfg["w_shape"]
    group = int(a["group"])
    out_quant = a["out"] == "quant"
    x_type = c_type(x.type.dtype, node)
    y_type = c_type(y.type.dtype, node)
    operands = [(name, v) for name, v in zip(
        ["x", "w", "x_scale", "x_zero_point", "w_scale", "w_zero_point", "bias", "y_scale",
         "y_zero_point", "residual", "r_scale", "r_zero_point"], node.operands) if v is not None]
    idx = {name: i for i, (name, _) in enumerate(operands)}
    idx["y"] = len(operands)
    for name in ("x_scale", "w_scale") + (("y_scale",) if out_quant else ()):
        if node.arg(name).type.dtype.name != "f32":
            raise unsupported(node, f"{name} of type {node.arg(name).type.dtype.name} (f32)")
    residual = node.arg("residual")
    if residual is not None and out_quant and node.arg("r_scale").type.dtype.name != "f32":
        raise unsupported(node, "r_scale not f32")
    w_scale = node.arg("w_scale")
    params = dict(
        x_type=x_type, y_type=y_type, x_unsigned=x_type == "uint8_t",
        h=h, w=w, c=c, oh=oh, ow=ow, m=m, kh=kh, kw=kw,
        sh=a["strides"][0], sw=a["strides"][1], pt=a["pads"][0], pl=a["pads"][1],
        dh=a["dilations"][0], dw=a["dilations"][1], group=group, idx=idx,
        out_quant=out_quant, has_residual=residual is not None,
        r_type=c_type(residual.type.dtype, node) if residual is not None else "float",
        r_zp_type=(c_type(node.arg("r_zero_point").type.dtype, node)
                   if residual is not None and out_quant else "uint8_t"),
        w_scale_per_channel=int(np.prod(w_scale.type.shape or (1,))) > 1,
        has_act_min="act_min" in a, has_act_max="act_max" in a,
        act_min=literal(float(a.get("act_min", 0.0)), "float"),
        act_max=literal(float(a.get("act_max", 0.0)), "float"), lo=0, hi=0)
    if out_quant:
        params["lo"], params["hi"] = qconv_output_bounds(
            node, _constant(node, "y_scale", module), _constant(node, "y_zero_point", module))
        doc = ("requantize: clamp(rne(f32(acc) * f32(s[m] / y_scale)"
               + (" + (r - r_zp) * f32(r_scale / y_scale)" if residual is not None else "")
               + f") + y_zp, {params['lo']}, {params['hi']})")
    else:
        doc = "f32(acc) * s[m]" + (" + residual" if residual is not None else "") + \
              (" clipped" if "act_min" in a or "act_max" in a else "")
    params["epilogue_doc"] = doc
    if group == 1:
        rows = cfg["w_layout"] == "cuda_igemm_rows"
        if rows and cuda_igemm_rows(c, w, kw, params["sw"], params["pl"], params["dw"]) != (
                cfg.get("w_row_taps"), cfg.get("w_lead")):
            raise unsupported(node, "cuda_igemm_rows weights need 4 channels, an even width "
                              "and stride, no dilation, and the row slots and lead that "
                              "cuda-conv-layout derives from them")
        # K: the taps (kh, kw, c), or with cuda_igemm_rows each kernel row's slots
        k_real = kh * (cfg["w_row_taps"] if rows else kw) * cg
        a_load = ("pairs" if rows else "vec16" if c % 16 == 0 else
                  "word" if c % 4 == 0 else "byte")
        return _render("qconv.cu.j2", node, variant="igemm", dw4=False, k_real=k_real,
                       kp=-(-k_real // 32) * 32, tiles=_qconv_tiles(m, k_real), a_load=a_load,
                       row_taps=cfg.get("w_row_taps", 0), lead=cfg.get("w_lead", 0),
                       **_qconv_pipeline(), **QCONV_SPLIT, **params)
    depthwise = cg == 1 and m == c
    dw4 = cfg["w_layout"] == "cuda_dw_t4"
    if dw4:
        if not (depthwise and c % 4 == 0):
            raise unsupported(node, "cuda_dw_t4 weights on a layer that is not depthwise with "
                              "channels in fours")
        vec, px = _dw_strip(c, kh, kw, params["sw"], params["dw"])
        return _render("qconv.cu.j2", node, variant="direct", dw4=True, vec=vec, px=px,
                       cols=_dw_columns(px, kw, params["sw"], params["dw"]), **params)
    # other groups (depthwise layers whose channels are not in fours, thin groups)
    return _render("qconv.cu.j2", node, variant="direct", cg=cg, mg=m // group, dw4=False,
                   **params)


# The depthwise dp4a kernel's strip: a thread computes PX output pixels of a row x VEC
# channels from an input window of KH x COLS pixels x VEC channels held in registers, at most
# DW_WINDOW_WORDS 32-bit words of them (with the PX x VEC sums and a word of weights a tap
# group, about 100 registers: two blocks of 256 threads an SM). VEC 8 where the channels
# allow, then the widest strip of 4, 2, 1 pixels whose window fits: 3 x 3 stride 1 takes
# 4 pixels (a window of 6 columns: 18 loads for 36 taps), stride 2 takes 2; a kernel too
# large for any strip of 8 channels (7 x 7) takes 4 channels.
DW_WINDOW_WORDS = 48


def _dw_columns(px: int, kw: int, sw: int, dw: int) -> int:
    return (px - 1) * sw + (kw - 1) * dw + 1


def _dw_strip(channels: int, kh: int, kw: int, sw: int, dw: int) -> tuple[int, int]:
    """(VEC, PX) of the depthwise kernel, or ``QC_DW_STRIP=VEC:PX`` (sweeps on the device;
    VEC must divide the channels)."""
    override = os.environ.get("QC_DW_STRIP")
    if override:
        vec, px = (int(v) for v in override.split(":"))
        if channels % vec == 0:
            return vec, px
    for vec in (8, 4):  # 4 channels a thread where 8 leave no strip that fits (7 x 7 kernels)
        if channels % vec:
            continue
        for px in (4, 2, 1):
            if kh * _dw_columns(px, kw, sw, dw) * vec // 4 <= DW_WINDOW_WORDS:
                return vec, px
    return 4, 1


def _pool(node: Node) -> str:
    a = node.attrs
    x = node.operands[0]
    if x.type.rank != 4 or len(node.results) != 1:
        raise unsupported(node, "2-D pooling without indices only")
    if a["kind"] not in ("max", "average"):
        raise unsupported(node, f"{a['kind']} pooling")
    xt = c_type(x.type.dtype, node)
    is_float = x.type.dtype.is_float
    if a["kind"] == "average" and not is_float:
        raise unsupported(node, "average pooling of integer codes")
    if xt == "double" or (not is_float and xt not in ("int8_t", "uint8_t", "int32_t")):
        raise unsupported(node, f"{x.type.dtype.name} pooling")
    lo = {"int8_t": "-128", "uint8_t": "0", "int32_t": "INT32_MIN"}.get(xt, "-INFINITY")
    return _render("pool.cu.j2", node, kind=a["kind"], x_type=xt,
                   channels_last=bool(a.get("channels_last", 0)), is_float=is_float,
                   acc_type="float" if is_float else "int", lowest=lo,
                   empty="qc_ops::from_f<T>(-INFINITY)" if is_float else lo,
                   kh=a["kernel_shape"][0], kw=a["kernel_shape"][1], sh=a["strides"][0],
                   sw=a["strides"][1], pt=a["pads"][0], pl=a["pads"][1], pb=a["pads"][2],
                   pr=a["pads"][3], dh=a["dilations"][0], dw=a["dilations"][1],
                   count_include_pad=bool(a["count_include_pad"]))


def _conv(node: Node) -> str:
    """A float 1-D or 2-D convolution (``conv``; the int8 ones are ``qconv``)."""
    a = node.attrs
    x, w = node.operands[0], node.operands[1]
    b = node.operands[2] if len(node.operands) > 2 else None
    if x.type.rank not in (3, 4):
        raise unsupported(node, f"a {x.type.rank - 2}-D convolution (1-D and 2-D only)")
    if not x.type.dtype.is_float or x.type.dtype.name == "f64":
        raise unsupported(node, f"{x.type.dtype.name} convolution (f32, f16 and bf16 only)")
    if any(v is not None and v.type.dtype != x.type.dtype for v in (w, b)):
        raise unsupported(node, "operands of different element types")
    kernel = w.type.shape[2:]
    if not all(isinstance(d, int) for d in kernel):
        raise unsupported(node, f"a symbolic kernel size {kernel}")
    one_d = x.type.rank == 3
    pads, strides, dil = a["pads"], a["strides"], a["dilations"]
    kh, kw = (1, kernel[0]) if one_d else kernel
    sh, sw = (1, strides[0]) if one_d else strides
    dh, dw = (1, dil[0]) if one_d else dil
    pt, pl = (0, pads[0]) if one_d else (pads[0], pads[1])
    return _render("conv.cu.j2", node, x_type=c_type(x.type.dtype, node), one_d=one_d,
                   rank=x.type.rank, groups=int(a["group"]), kh=kh, kw=kw, sh=sh, sw=sw, pt=pt,
                   pl=pl, dh=dh, dw=dw, has_bias=b is not None,
                   y_offset=x.type.rank + w.type.rank + (1 if b is not None else 0))


def _quantize(node: Node, module) -> str:
    scheme = node.attrs["scheme"]
    x, y = node.operands[0], node.results[0]
    codes = y if node.op == "quantize" else x
    if scheme.dtype.name not in ("i8", "u8") or codes.type.dtype.name not in ("i8", "u8"):
        raise unsupported(node, f"{scheme.dtype.name} codes (i8/u8 only)")
    if scheme.granularity not in ("tensor", "channel"):
        raise unsupported(node, f"{scheme.granularity} granularity")
    if node.op == "dequantize" and node.arg("g_idx") is not None:
        raise unsupported(node, "g_idx")
    scale, zp = node.arg("scale"), node.arg("zero_point")
    if scale.type.dtype.name != "f32" or (zp is not None and zp.type.dtype != scheme.dtype):
        raise unsupported(node, "an f32 scale and a zero point of the codes' type only")
    if zp is None and scheme.implied_zero_point not in (None, 0):
        raise unsupported(node, "an implied zero point")
    rank = max(x.type.rank, 1)
    per_axis = scheme.granularity == "channel"
    axis = (scheme.axis % x.type.rank) if per_axis else 0
    lo, hi = scheme.dtype.int_range()
    return _render("quantize.cu.j2", node, op=node.op, x_type=c_type(x.type.dtype, node),
                   y_type=c_type(y.type.dtype, node), zp_type=c_type(scheme.dtype, node),
                   q_type=scheme.dtype.name, has_zp=zp is not None, per_axis=per_axis,
                   axis=axis, rank=x.type.rank, lo=lo, hi=hi,
                   y_index=len(_data_operands(node)))


SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on sm_90 (sm_80: 163 KB)


def attention_tiles(d: int, dv: int, elem_bytes: int) -> dict:
    """Prefill tile: 4 warps x 4 query rows, 64 keys per tile (32 when the tile would need
    more than 96 KB of shared memory)."""
    warps, rows = 4, 4
    for bn in (64, 32):
        smem = elem_bytes * (d * (bn + 2) + bn * dv) + 4 * (warps * rows * d + warps * rows * bn)
        if smem <= 96 * 1024:
            break
    return {"warps": warps, "rows": rows, "bn": bn, "kpad": 2, "smem": smem}


def _attention(node: Node) -> str:
    q, k, v = node.operands[:3]
    mask = node.arg("mask")
    y = node.results[0]
    if q.type.rank != 4 or k.type.rank != 4 or v.type.rank != 4:
        raise unsupported(node, "attention operands must be [B, H, S, D]")
    d, dv = q.type.shape[3], v.type.shape[3]
    if not isinstance(d, int) or not isinstance(dv, int):
        raise unsupported(node, "a symbolic head dim")
    xt = c_type(q.type.dtype, node)
    if xt not in ("__half", "__nv_bfloat16", "float") or c_type(k.type.dtype, node) != xt \
            or c_type(v.type.dtype, node) != xt:
        raise unsupported(node, "q, k, v must share one of f16, bf16, f32")
    if mask is not None and mask.type.rank > 4:
        raise unsupported(node, "a mask of rank > 4")
    if d > 256 or dv > 256:
        raise unsupported(node, "head dim > 256")
    tiles = attention_tiles(d, dv, C_SIZES[xt])
    if tiles["smem"] > SMEM_LIMIT:
        raise unsupported(node, f"needs {tiles['smem']} bytes of shared memory")
    return _render("attention.cu.j2", node, x_type=xt, y_type=c_type(y.type.dtype, node),
                   has_mask=mask is not None,
                   mask_type=c_type(mask.type.dtype, node) if mask is not None else "",
                   mask_rank=mask.type.rank if mask is not None else 0,
                   d=d, dv=dv, scale=repr(float(node.attrs["scale"])) + "f",
                   causal=bool(node.attrs.get("causal", 0)), n_in=len(_data_operands(node)),
                   q_bshd=bool(node.attrs.get("q_bshd", 0)),
                   kv_bshd=bool(node.attrs.get("kv_bshd", 0)),
                   y_bshd=bool(node.attrs.get("y_bshd", 0)),
                   # tensor cores for f16/bf16 when the head dims are whole k16 steps
                   mma=xt in ("__half", "__nv_bfloat16") and d % 16 == 0 and dv % 16 == 0,
                   mma_type={"__half": "f16", "__nv_bfloat16": "bf16"}.get(xt, ""),
                   **{k2: tiles[k2] for k2 in ("warps", "rows", "bn", "kpad")})


__all__ = ["kernel_source", "SUPPORTED_OPS", "SHAPE_WORKSPACE_OPS", "node_label"]
