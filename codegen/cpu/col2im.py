"""TensorIR of the CPU ``col2im`` kernel: ONNX Col2Im, N-d.

The reference's semantics (``runtime.reference._col2im``): x [N, C * K, L] holds, for each
channel c and each tap k of the block (K = prod(block), taps in row-major order), one column
entry per block position j (L = prod(counts), row-major); counts[i] = (image[i] + pads[i] +
pads[i + nsp] - ((block[i] - 1) * dilations[i] + 1)) // strides[i] + 1. Entry
x[n, c*K + k, j] is added to the padded image at position j[i] * strides[i] + k[i] *
dilations[i] along each spatial dim i, the taps one after the other in row-major order, into
float64 zeros; the image is then cropped by the begin pads and converted to x's type.

Loop structure, a gather: an output pixel p takes tap k exactly when, along every dim i,
f = p[i] + pads[i] - k[i] * dilations[i] is a non-negative multiple of strides[i] below
strides[i] * counts[i] (then j[i] = f / strides[i]). The (batch, channel) planes are the one
parallel loop; in a plane, each row of the image (all spatial dims but the last) sums its
taps into a row of accumulators: the taps run in row-major order outside the row's columns, so
every pixel adds its entries in the reference's order, starting from 0, and the float sums are
the reference's bit for bit (float64 for float types, as the reference; int64 for the narrow
integer types and bool, where the reference's float64 sums are exact integers). A tap whose
outer dims miss the row is skipped as a whole. The row is converted to x's type once.

Element types: f16 / bf16 / f32 / f64; 8- and 16-bit integers (the sum wraps into the type, as
the reference's float64 -> integer conversion does here) and bool (a non-zero sum is true).
No kernel (CPUBackendError; the node then runs on the host): 32- and 64-bit integers (the
reference's float64 sums lose integer precision past 2**53 and its conversion back of an
out-of-range sum is platform-defined), element types without a TVM dtype, image_shape /
block_shape that are not constants, non-positive strides or dilations, negative pads, no
spatial dims, a block that does not fit the padded image, and x shapes the reference rejects
(a static L other than prod(counts), static channels not a multiple of K).
"""
from __future__ import annotations

import contextlib

import numpy as np

from qcompiler.codegen.cpu.ops.common import (Dims, constant_operand, is_float_dtype,
                                              kernel_name, tvm_dtype, unsupported)
from qcompiler.codegen.cpu.tir_builder import (build_kernel, check, i64, loop,
                                               parallel_min_elements, param, scratch, static_sizes)
from qcompiler.ir.core import Node

# integer types whose float64 sums in the reference are exact (and wrap back into the type)
_NARROW_INTS = ("int8", "uint8", "int16", "uint16")


def primfunc_for_col2im(node: Node, params=None, module=None, known=()):
    """(kernel name, PrimFunc) of a col2im node; (name, None) for a known name. Raises
    CPUBackendError naming the node and op when it has no kernel."""
    geometry = _check(node, module)
    # image_shape and block_shape are baked into the code: part of the kernel's identity
    name = kernel_name(node, {"image": geometry["image"], "block": geometry["block"]})
    # one thread below parallel_min_elements tap visits: N * C * prod(image) * K
    min_elements = parallel_min_elements(params)
    return build_kernel(name, known, lambda: _emit(node, geometry, min_elements))


def _check(node: Node, module) -> dict:
    """image, block, strides, pads, dilations, counts (lists of ints), or CPUBackendError."""
    x, y = node.operands[0], node.results[0]
    dtype = tvm_dtype(x.type.dtype, node)  # refuses types without a TVM dtype
    if x.type.dtype.kind != "bool" and not is_float_dtype(dtype) and dtype not in _NARROW_INTS:
        raise unsupported(node, f"x of {x.type.dtype.name} (float types, bool and 8- / 16-bit "
                                "integers: wider integers' float64 sums are not exact)")
    if tvm_dtype(y.type.dtype, node) != dtype:
        raise unsupported(node, f"result {y.type} is not of x's type {x.type.dtype.name}")
    consts = [constant_operand(node, i, module) for i in (1, 2)]
    if any(c is None for c in consts):
        raise unsupported(node, "image_shape / block_shape are not constants")
    image, block = ([int(v) for v in np.asarray(c).reshape(-1)] for c in consts)
    a = node.attrs
    strides, pads, dil = a["strides"], a["pads"], a["dilations"]
    nsp = len(image)
    if nsp == 0:
        raise unsupported(node, "no spatial dims")
    if min(strides) <= 0 or min(dil) <= 0 or min(pads) < 0:
        raise unsupported(node, f"strides {strides}, dilations {dil} must be positive and "
                                f"pads {pads} non-negative")
    counts = [(image[i] + pads[i] + pads[i + nsp] - ((block[i] - 1) * dil[i] + 1))
              // strides[i] + 1 for i in range(nsp)]
    if min(counts) < 1 or min(image) < 1 or min(block) < 1:
        raise unsupported(node, f"block {block} does not fit the padded image {image}")
    taps, positions = int(np.prod(block)), int(np.prod(counts))
    if isinstance(x.type.shape[2], int) and x.type.shape[2] != positions:
        raise unsupported(node, f"{x.type.shape[2]} columns, the image has {counts} blocks")
    if isinstance(x.type.shape[1], int) and x.type.shape[1] % taps:
        raise unsupported(node, f"channels {x.type.shape[1]} not a multiple of {taps}")
    return {"image": image, "block": block, "strides": strides, "pads": pads,
            "dilations": dil, "counts": counts, "taps": taps, "positions": positions}


def _row_major(index: list, sizes: list):
    """The flat row-major position of ``index`` in an array of ``sizes``."""
    flat = i64(0)
    for i, n in zip(index, sizes):
        flat = flat * i64(n) + i
    return flat


def _emit(node: Node, g: dict, min_elements: int) -> None:
    """The parameters and body of the PrimFunc (inside ``build_kernel``)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    x_type = node.operands[0].type
    dtype = tvm_dtype(x_type.dtype, node)
    # float64 as the reference; int64 for integers and bool (exact, as the reference's sums)
    acc_dtype = "float64" if is_float_dtype(dtype) else "int64"
    is_bool = x_type.dtype.kind == "bool"
    image, block, counts = g["image"], g["block"], g["counts"]
    strides, pads, dil = g["strides"], g["pads"], g["dilations"]
    nsp, taps = len(image), g["taps"]
    dims = Dims()
    batch, channels_taps = dims.dim(x_type.shape[0]), dims.dim(x_type.shape[1])
    channels = tirx.floordiv(channels_taps, i64(taps)) \
        if not isinstance(channels_taps, tirx.IntImm) else i64(int(channels_taps) // taps)
    # L is written as prod(counts): a call with another L fails TVM's shape check, as the
    # reference raises
    x_shape = (batch, channels_taps, i64(g["positions"]))
    y_shape = (batch, channels) + tuple(i64(n) for n in image)

    x = param("x", x_shape, dtype)
    # image_shape and block_shape: parameters (every operand is), their values baked
    for i, name in ((1, "image_shape"), (2, "block_shape")):
        v = node.operands[i]
        param(name, tuple(i64(d) for d in v.type.shape), tvm_dtype(v.type.dtype, node))
    y = param("y", y_shape, dtype)
    if not isinstance(channels_taps, tirx.IntImm):
        check(tirx.floormod(channels_taps, i64(taps)) == i64(0),
              "col2im: x's channels are not a multiple of prod(block_shape)")
    sizes = static_sizes(batch, channels)
    worth = sizes is None or sizes[0] * sizes[1] * int(np.prod(image)) * taps >= min_elements
    with loop(batch * channels, "nc", parallel=worth) as nc:
        n, c = tirx.floordiv(nc, channels), tirx.floormod(nc, channels)
        acc = scratch("acc", (i64(image[-1]),), acc_dtype)
        zero = tirx.const(0, acc_dtype)
        with contextlib.ExitStack() as rows:
            # one row: every spatial dim but the last fixed
            p = [rows.enter_context(loop(image[i], f"p{i}")) for i in range(nsp - 1)]
            with loop(image[-1], "w") as w:
                T.buffer_store(acc, zero, [w])
            with contextlib.ExitStack() as tap_loops:
                # the taps in row-major order (the reference's order of adds)
                k = [tap_loops.enter_context(loop(block[i], f"k{i}")) for i in range(nsp)]
                # f: the tap's offset along each dim in the padded image
                f = [p[i] + i64(pads[i]) - k[i] * i64(dil[i]) for i in range(nsp - 1)]
                hits = [tirx.all(f[i] >= i64(0),
                                 tirx.floormod(f[i], i64(strides[i])) == i64(0),
                                 f[i] < i64(strides[i] * counts[i]))
                        for i in range(nsp - 1)]
                j_outer = [tirx.floordiv(f[i], i64(strides[i])) for i in range(nsp - 1)]
                with contextlib.ExitStack() as outer_hit:
                    if hits:  # a tap whose outer dims miss this row adds nothing
                        outer_hit.enter_context(T.If(tirx.all(*hits)))
                        outer_hit.enter_context(T.Then())
                    last = nsp - 1
                    with loop(image[-1], "w") as w:
                        fw = w + i64(pads[last]) - k[last] * i64(dil[last])
                        hit = tirx.all(fw >= i64(0),
                                       tirx.floormod(fw, i64(strides[last])) == i64(0),
                                       fw < i64(strides[last] * counts[last]))
                        j = j_outer + [tirx.floordiv(fw, i64(strides[last]))]
                        src = x[n, c * i64(taps) + _row_major(k, block),
                                _row_major(j, counts)]
                        with T.If(hit):
                            with T.Then():
                                T.buffer_store(acc, acc[w] + src.astype(acc_dtype), [w])
            with loop(image[-1], "w") as w:
                value = acc[w] != zero if is_bool else acc[w]
                T.buffer_store(y, value.astype(dtype), [n, c] + p + [w])
