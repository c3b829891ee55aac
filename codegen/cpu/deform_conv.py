"""TensorIR of the CPU ``deform_conv`` kernel: ONNX DeformConv (2-D).

The reference's semantics (``runtime.reference._deform_conv``), all in float64:

- x [N, C, H, W], w [OC, C / group, KH, KW], offset [N, og * KH * KW * 2, OH, OW] (og =
  offset_group; per offset group and tap (a, b) the pair dh, dw), optional b [OC] and mask
  [N, og * KH * KW, OH, OW]; the output size is offset's OH, OW;
- tap (a, b) of output (i, j) in channel c (offset group c // (C / og)) samples x at
  ph = i * stride_h - pad_top + a * dilation_h + dh, pw = j * stride_w - pad_left +
  b * dilation_w + dw, bilinearly: its four neighbours (floor(ph) + {0, 1}, floor(pw) +
  {0, 1}, in that order) each add x * (1 - |ph - row|) * (1 - |pw - col|), 0 outside x;
  the sum is scaled by the mask;
- y[n, o, i, j] = sum over the channels c of o's group and the taps (a, b) of sample *
  w[o, c, a, b], then + b[o]; rounded to x's type.

Loop structure: the output rows (n, i) are the one parallel loop. Each first converts its
row of offsets (and mask) to float64 scratch, then samples every (channel, tap) of the row
into a float64 column buffer [C * KH * KW, OW] (the sampling positions and corner weights
computed once per offset group and tap, the channels of the group inside), then forms each
output channel's row as a float64 row of sums over its group's (channel, tap) rows in
row-major order, the row's columns innermost (contiguous, a loop LLVM vectorizes). The
samples are the reference's operation for operation; the reference's final sum is numpy's
einsum, whose order of adds is its own, so the result is the reference's up to float64
rounding.

Element types: x and the result f16 / bf16 / f32 / f64 (the same); w, offset, b and mask of
any type with a TVM dtype (converted to float64, as the reference). No kernel
(CPUBackendError; the node then runs on the host): integer or bool x (the reference
truncates a float64 sum), element types without a TVM dtype, a result of another type than
x, w of a shape not known at compile time, channels that the groups or offset groups do not
divide (the reference's reshapes fail), and operand shapes the reference rejects (offset or
mask channels other than og * KH * KW * (2 or 1), w's channels other than C / group).
"""
from __future__ import annotations

from qcompiler.codegen.cpu.ops.common import (Dims, is_float_dtype, kernel_name, tvm_dtype,
                                              unsupported)
from qcompiler.codegen.cpu.tir_builder import (bind, build_kernel, i64, loop,
                                               parallel_min_elements, param, scratch,
                                               static_sizes)
from qcompiler.ir.core import Node

OPERANDS = ("x", "w", "offset", "b", "mask")
_F64 = "float64"


def primfunc_for_deform_conv(node: Node, params=None, module=None, known=()):
    """(kernel name, PrimFunc) of a deform_conv node; (name, None) for a known name. Raises
    CPUBackendError naming the node and op when it has no kernel."""
    sizes = _check(node)
    # one thread below parallel_min_elements multiply-adds: N * OH * OW * OC * C / group * KH * KW
    min_elements = parallel_min_elements(params)
    return build_kernel(kernel_name(node, {}), known,
                        lambda: _Kernel(node, sizes).emit(min_elements))


def _check(node: Node) -> dict:
    """The static sizes (channels, out_channels, kh, kw), or CPUBackendError."""
    a = node.attrs
    x, w = node.operands[0], node.operands[1]
    dtype = tvm_dtype(x.type.dtype, node)  # refuses types without a TVM dtype
    if x.type.dtype.kind == "bool" or not is_float_dtype(dtype):
        raise unsupported(node, f"x of {x.type.dtype.name} (float types only: the reference "
                                "truncates a float64 sum to an integer type)")
    if tvm_dtype(node.results[0].type.dtype, node) != dtype:
        raise unsupported(node, f"result {node.results[0].type} is not of x's type "
                                f"{x.type.dtype.name}")
    for v in node.operands[1:]:
        if v is not None:
            tvm_dtype(v.type.dtype, node)
    if not all(isinstance(d, int) for d in w.type.shape):
        raise unsupported(node, f"w {w.type.shape} is not static")
    out_channels, per_group, kh, kw = w.type.shape
    group, offset_group = a["group"], a["offset_group"]
    channels = per_group * group
    if isinstance(x.type.shape[1], int) and x.type.shape[1] != channels:
        raise unsupported(node, f"x's {x.type.shape[1]} channels are not w's {per_group} "
                                f"times group {group}")
    if group < 1 or offset_group < 1 or out_channels % group or channels % offset_group:
        raise unsupported(node, f"group {group} / offset_group {offset_group} do not divide "
                                f"{out_channels} output / {channels} input channels")
    taps = offset_group * kh * kw
    for i, per_tap in ((2, 2), (4, 1)):
        v = node.operand(i)
        if v is not None and isinstance(v.type.shape[1], int) and \
                v.type.shape[1] != taps * per_tap:
            raise unsupported(node, f"{OPERANDS[i]} {v.type.shape} has not {taps * per_tap} "
                                    "channels")
    return {"channels": channels, "out_channels": out_channels, "kh": kh, "kw": kw}


class _Kernel:
    """Emits the parameters and body of one deform_conv node's PrimFunc (``emit``, run by
    ``build_kernel``)."""

    def __init__(self, node: Node, sizes: dict):
        a = node.attrs
        self.group, self.og = a["group"], a["offset_group"]
        self.strides, self.pads, self.dilations = a["strides"], a["pads"], a["dilations"]
        self.channels, self.out_channels = sizes["channels"], sizes["out_channels"]
        self.kh, self.kw = sizes["kh"], sizes["kw"]
        self.dtype = tvm_dtype(node.operands[0].type.dtype, node)
        self.dtypes = {name: tvm_dtype(v.type.dtype, node)
                       for name, v in zip(OPERANDS, node.operands) if v is not None}
        dims = Dims()
        x_type, offset_type = node.operands[0].type, node.operands[2].type
        out_type = node.results[0].type

        def shared(*ds):
            """One dim for several operands' (a static one if any): TVM checks that the
            call's shapes agree."""
            return dims.dim(next((d for d in ds if isinstance(d, int)), ds[0]))

        self.batch = shared(x_type.shape[0], offset_type.shape[0], out_type.shape[0])
        self.height, self.width = (dims.dim(d) for d in x_type.shape[2:])
        # the output size is offset's (the reference reads it there)
        self.out_h = shared(offset_type.shape[2], out_type.shape[2])
        self.out_w = shared(offset_type.shape[3], out_type.shape[3])
        taps = self.og * self.kh * self.kw
        rows = (self.batch, None, self.out_h, self.out_w)
        self.shapes = {
            "x": (self.batch, i64(self.channels), self.height, self.width),
            "w": tuple(i64(d) for d in node.operands[1].type.shape),
            "offset": rows[:1] + (i64(2 * taps),) + rows[2:],
            "b": (i64(self.out_channels),),
            "mask": rows[:1] + (i64(taps),) + rows[2:],
            "y": rows[:1] + (i64(self.out_channels),) + rows[2:]}

    def emit(self, min_elements: int) -> None:
        """The parameters and body of the PrimFunc (inside ``build_kernel``)."""
        from tvm import tirx

        self.buf = {name: param(name, self.shapes[name], self.dtypes[name])
                    for name in OPERANDS if name in self.dtypes}
        self.buf["y"] = param("y", self.shapes["y"], self.dtype)
        sizes = static_sizes(self.batch, self.out_h, self.out_w)
        macs = self.out_channels * self.channels // self.group * self.kh * self.kw
        worth = sizes is None or sizes[0] * sizes[1] * sizes[2] * macs >= min_elements
        with loop(self.batch * self.out_h, "ni", parallel=worth) as ni:
            self.row(tirx.floordiv(ni, self.out_h), tirx.floormod(ni, self.out_h))

    def converted(self, name: str, n, i, count: int):
        """Row (n, i) of operand ``name`` ([N, count, OH, OW]) as float64 scratch [count, OW]
        (converted once, so no bf16 value is ever loaded inside a let binding: TVM's bf16
        legalization leaves such a load unconverted)."""
        from tvm.script.ir_builder import tirx as T

        out = scratch(name + "_row", (i64(count), self.out_w), _F64)
        with loop(count, "t") as t:
            with loop(self.out_w, "j") as j:
                T.buffer_store(out, self.buf[name][n, t, i, j].astype(_F64), [t, j])
        return out

    def row(self, n, i) -> None:
        """Output row i of batch entry n: its samples, then every output channel's row."""
        from tvm.script.ir_builder import tirx as T

        taps = self.og * self.kh * self.kw
        offsets = self.converted("offset", n, i, 2 * taps)
        masks = self.converted("mask", n, i, taps) if "mask" in self.buf else None
        cols = scratch("cols", (i64(self.channels * self.kh * self.kw), self.out_w), _F64)
        with loop(self.og, "go") as go:
            with loop(self.kh, "a") as a:
                with loop(self.kw, "b") as b:
                    tap = (go * i64(self.kh) + a) * i64(self.kw) + b
                    with loop(self.out_w, "j") as j:
                        self.sample(cols, offsets, masks, n, i, j, go, a, b, tap)
        acc = scratch("acc", (self.out_w,), _F64)
        per_group = self.channels // self.group
        with loop(self.out_channels, "o") as o:
            g = o // i64(self.out_channels // self.group)
            with loop(self.out_w, "j") as j:
                T.buffer_store(acc, _zero(), [j])
            with loop(per_group, "c") as c:
                with loop(self.kh, "a") as a:
                    with loop(self.kw, "b") as b:
                        col = ((g * i64(per_group) + c) * i64(self.kh) + a) * i64(self.kw) + b
                        weight = self.buf["w"][o, c, a, b].astype(_F64)
                        with loop(self.out_w, "j") as j:
                            T.buffer_store(acc, acc[j] + cols[col, j] * weight, [j])
            with loop(self.out_w, "j") as j:
                value = acc[j]
                if "b" in self.buf:
                    value = value + self.buf["b"][o].astype(_F64)
                T.buffer_store(self.buf["y"], value.astype(self.dtype), [n, o, i, j])

    def sample(self, cols, offsets, masks, n, i, j, go, a, b, tap) -> None:
        """cols[(c, a, b), j] for the channels c of offset group go: x sampled bilinearly at
        tap (a, b) of output (i, j), times the mask, as the reference."""
        from tvm import tirx
        from tvm.script.ir_builder import tirx as T

        (sh, sw), (dh, dw) = self.strides, self.dilations
        base_h = i * i64(sh) - i64(self.pads[0]) + a * i64(dh)
        base_w = j * i64(sw) - i64(self.pads[1]) + b * i64(dw)
        ph = bind("ph", base_h.astype(_F64) + offsets[tap * i64(2), j])
        pw = bind("pw", base_w.astype(_F64) + offsets[tap * i64(2) + i64(1), j])
        h0 = bind("h0", tirx.floor(ph).astype("int64"))
        w0 = bind("w0", tirx.floor(pw).astype("int64"))
        one = tirx.const(1.0, _F64)
        corners = []
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):  # the reference's order of adds
            yy, xx = h0 + i64(dy), w0 + i64(dx)
            weight = bind(f"weight{dy}{dx}",
                          (one - tirx.abs(ph - yy.astype(_F64)))
                          * (one - tirx.abs(pw - xx.astype(_F64))))
            inside = bind(f"inside{dy}{dx}", tirx.all(yy >= i64(0), yy < self.height,
                                                      xx >= i64(0), xx < self.width))
            corners.append((inside, yy, xx, weight))
        per_offset_group = self.channels // self.og
        with loop(per_offset_group, "c") as c:
            channel = go * i64(per_offset_group) + c
            value = _zero()
            for inside, yy, xx, weight in corners:
                # x is read only inside (the reference reads a clamped position and drops it)
                tap_value = self.buf["x"][n, channel, yy, xx].astype(_F64)
                value = value + tirx.if_then_else(inside, tap_value * weight, _zero())
            if masks is not None:
                value = value * masks[tap, j]
            T.buffer_store(cols, value, [(channel * i64(self.kh) + a) * i64(self.kw) + b, j])


def _zero():
    from tvm import tirx

    return tirx.const(0.0, _F64)
