"""Integer CNN designs on the FPGA: what the layers are, their exact integer data, and the
bit-accurate numpy model of the generated C++ (``templates/cnn_*.j2``).

A CNN design is a DATAFLOW graph of streaming layers over channels-last (HWC) pixel streams of
integer codes, one image per call:

- ``conv``: a ``qconv`` (2-D, ``out=quant``, ``requant=dyadic``: chosen for ``fpga-*`` by
  ``fuse-requant``): a line buffer of ``(KH-1)*DH+1`` zero-padded rows of ``x - x_zp`` feeds a
  matrix-vector engine (PE output channels x SIMD taps per cycle) whose i32 accumulator is
  requantized as the reference does (``rounding_shift(acc * M, shift)``, the residual variant
  with ``f`` fraction bits), then clamped to the fused relu/clip bounds. A ``residual`` operand
  is a second input stream (the skip path);
- ``pool``: ``pool{kind=max|average}`` on codes (2-D, ceil_mode 0, dilation 1): max ignores
  padding; average divides the in-window sum by the count of the reference (padding counted
  with ``count_include_pad``) and truncates toward zero, as the reference's integer cast;
- ``flatten``: ``reshape [N, C, H, W] -> [N, C*H*W, 1, 1]`` before a 1x1 ``qconv`` (the dense
  layer): no layer at all, the stream already is the flattened vector in HWC order, so the
  dense weights' K axis is permuted from CHW to HWC at compile time;
- ``dup``: a value with two users (the skip path of a residual block) is copied to two streams.

Every number here is an exact integer; the C++ computes the same integers with ap_int.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qcompiler.ir import Module
from qcompiler.ir.core import constant_value
from qcompiler.pipeline import PassError
from qcompiler.runtime.reference import (DYADIC_FRACTION_BITS, dyadic_multiplier,
                                         qconv_output_bounds)

CNN_OPS = ("qconv", "pool", "reshape")


def is_cnn_design(module: Module) -> bool:
    """Whether ``module`` is an integer CNN design (it holds a qconv) rather than an MLP chain."""
    return any(n.op == "qconv" for n in module.main.nodes)


@dataclass
class Stream:
    """One hls::stream of codes between layers: its C type and the map it carries (HWC)."""

    name: str
    signed: int
    h: int
    w: int
    c: int
    depth: int = 2

    @property
    def ctype(self) -> str:
        return f"ap_{'int' if self.signed else 'uint'}<8>"

    @property
    def size(self) -> int:
        return self.h * self.w * self.c


@dataclass
class CnnLayer:
    name: str
    kind: str  # conv | pool | dup
    inputs: list  # stream names (conv: x then the residual)
    outputs: list  # stream names
    cfg: dict  # shapes and decided values (templates and cost model read only this)
    data: dict = field(default_factory=dict)  # integer arrays (conv weights, requant constants)
    node: object = None


def _const(module, node, name, where):
    v = node.arg(name)
    if v is None:
        return None
    c = constant_value(module, v)
    if c is None:
        raise PassError(f"{where}: {name} must be a constant for the HLS backend")
    return np.asarray(c)


def _scalar(a) -> float:
    return np.asarray(a).reshape(-1)[0]


def _conv_layer(module, node, name, x: Stream, flatten_from, pe_simd) -> tuple:
    where = f"%{node.result.name} = qconv"
    a = node.attrs
    if a["out"] != "quant" or a.get("requant", "float") != "dyadic":
        raise PassError(f"{where}: the HLS backend takes out=quant, requant=dyadic (run "
                        "fuse-requant{target=fpga-...}); got out=" + str(a["out"]) +
                        ", requant=" + str(a.get("requant", "float")))
    if "w_shape" in (a.get("config") or {}):
        raise PassError(f"{where}: weights already packed for another backend "
                        "(cpu-conv-layout, cuda-conv-layout)")
    if a.get("channels_last", 0):
        raise PassError(f"{where}: channels_last (conv-channels-last prepares the CUDA "
                        "kernels; the HLS design reads NCHW)")
    w = _const(module, node, "w", where).astype(np.int64)
    if w.ndim != 4:
        raise PassError(f"{where}: the HLS backend takes 2-D convolutions, not {w.ndim - 2}-D")
    m, cg, kh, kw = w.shape
    group = a["group"]
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    pt, pl, pb, pr = a["pads"]
    w_zp = _const(module, node, "w_zero_point", where)
    wq = w - (0 if w_zp is None else np.asarray(w_zp, np.int64).reshape(-1, 1, 1, 1))
    if flatten_from is not None:
        # The dense layer after a flatten: K in CHW order -> the stream's HWC order.
        fc, fh, fw = flatten_from
        chw = np.arange(fc * fh * fw).reshape(fc, fh, fw).transpose(1, 2, 0).reshape(-1)
        wq = wq[:, chw]
    wk = wq.transpose(0, 2, 3, 1).reshape(m, kh * kw * cg)  # K order: (kh, kw, c in group)
    bias = _const(module, node, "bias", where)
    bias = np.zeros(m, np.int64) if bias is None else np.asarray(bias, np.int64).reshape(-1)
    x_scale = np.float32(_scalar(_const(module, node, "x_scale", where)))
    w_scale = np.broadcast_to(np.asarray(_const(module, node, "w_scale", where),
                                         np.float32).reshape(-1), (m,))
    y_scale = _const(module, node, "y_scale", where)
    y_zp_arr = _const(module, node, "y_zero_point", where)
    ys = np.float32(_scalar(y_scale))
    s = (x_scale * w_scale).astype(np.float32)  # as the reference: f32(x_scale * w_scale[m])
    mult, shift = dyadic_multiplier((s / ys).astype(np.float64))
    lo, hi = qconv_output_bounds(node, y_scale, y_zp_arr)
    h = x.h + pt + pb
    oh = (h - ((kh - 1) * dh + 1)) // sh + 1
    ow = (x.w + pl + pr - ((kw - 1) * dw + 1)) // sw + 1
    out_signed = int(node.result.type.dtype.name == "i8")
    residual = node.arg("residual") is not None
    data = {"w": wk, "bias": bias, "mult": mult, "shift": shift}
    cfg = {
        "kind": "conv", "h": x.h, "w": x.w, "c": cg * group, "m": m, "kh": kh, "kw": kw,
        "sh": sh, "sw": sw, "dh": dh, "dw": dw, "pt": pt, "pl": pl, "pb": pb, "pr": pr,
        "group": group, "cg": cg, "mg": m // group, "oh": oh, "ow": ow, "k": kh * kw * cg,
        "x_zp": int(_scalar(_const(module, node, "x_zero_point", where))),
        "y_zp": int(_scalar(y_zp_arr)), "lo": int(lo), "hi": int(hi),
        "residual": int(residual), "x_signed": x.signed, "y_signed": out_signed,
    }
    if residual:
        r_scale = np.float32(_scalar(_const(module, node, "r_scale", where)))
        rm, rs = dyadic_multiplier(np.float64(r_scale / ys))
        frac = np.minimum(np.minimum(shift, rs) - 1, DYADIC_FRACTION_BITS)
        data["frac"] = frac.astype(np.int64)
        cfg.update({"r_mult": int(rm), "r_shift": int(rs),
                    "r_zp": int(_scalar(_const(module, node, "r_zero_point", where)))})
    # Widths: the weight codes after the zero point, the accumulator's worst case (i32 at most:
    # the reference refuses an i32 overflow, and ap_int<32> wraps as i32 would).
    w_abs = int(np.abs(wk).max()) if wk.size else 0
    cfg["w_bits"] = max(2, w_abs.bit_length() + 1)
    x_abs = 255
    bound = int((np.abs(wk).sum(axis=1) * x_abs + np.abs(bias)).max())
    cfg["acc_bits"] = min(32, bound.bit_length() + 1)
    # n / words_per_group: the limits of PE and SIMD for cost_model.choose_parallelism.
    cfg["n"], cfg["words_per_group"] = m, cfg["k"]
    pe, simd = pe_simd
    cfg["pe"], cfg["simd"] = pe, simd
    cfg["lb_rows"] = (kh - 1) * dh + 1
    return cfg, data, Stream("", out_signed, oh, ow, m)


def _pool_layer(node, x: Stream):
    a = node.attrs
    where = f"%{node.result.name} = pool"
    if a["kind"] not in ("max", "average") or len(a["kernel_shape"]) != 2:
        raise PassError(f"{where}: the HLS backend pools 2-D max or average, not "
                        f"{a['kind']} over {a['kernel_shape']}")
    if a["ceil_mode"] or any(d != 1 for d in a["dilations"]) or a.get("indices", 0):
        raise PassError(f"{where}: ceil_mode, dilation and indices are not supported on FPGA")
    kh, kw = a["kernel_shape"]
    sh, sw = a["strides"]
    pt, pl, pb, pr = a["pads"]
    if max(pt, pb) >= kh or max(pl, pr) >= kw:
        raise PassError(f"{where}: padding {a['pads']} must be smaller than the window")
    oh = (x.h + pt + pb - kh) // sh + 1
    ow = (x.w + pl + pr - kw) // sw + 1
    cfg = {"kind": "pool", "pool": a["kind"], "h": x.h, "w": x.w, "c": x.c, "kh": kh, "kw": kw,
           "sh": sh, "sw": sw, "dh": 1, "dw": 1, "pt": pt, "pl": pl, "pb": pb, "pr": pr,
           "oh": oh, "ow": ow, "lb_rows": kh, "signed": x.signed,
           "count_include_pad": int(a["count_include_pad"]),
           "n": 1, "words_per_group": 1, "pe": 1, "simd": 1}
    data = {}
    if a["kind"] == "average":
        rows = np.arange(oh)[:, None] * sh - pt + np.arange(kh)[None]
        cols = np.arange(ow)[:, None] * sw - pl + np.arange(kw)[None]
        if a["count_include_pad"]:  # taps inside the padded map (all: ceil_mode is 0)
            count = np.full((oh, ow), kh * kw, np.int64)
        else:
            rin = ((rows >= 0) & (rows < x.h)).sum(axis=1)
            cin = ((cols >= 0) & (cols < x.w)).sum(axis=1)
            count = rin[:, None] * cin[None, :]
        data["count"] = count.astype(np.int64)
        cfg["sum_bits"] = 8 + max(1, math.ceil(math.log2(kh * kw))) + 1
    return cfg, data, Stream("", x.signed, oh, ow, x.c)


def cnn_design(module: Module) -> tuple[list[CnnLayer], dict[str, Stream], str, str]:
    """(layers in order, streams by name, input stream, output stream) of a CNN design."""
    fn = module.main
    if len(fn.args) != 1 or len(fn.outputs) != 1:
        raise PassError("an FPGA design takes one input and gives one output; "
                        f"@main has {len(fn.args)} inputs and {len(fn.outputs)} outputs")
    arg = fn.args[0]
    if arg.type.rank != 4 or arg.type.dtype.name not in ("i8", "u8") or not all(
            isinstance(d, int) for d in arg.type.shape[1:]):
        raise PassError(f"a CNN design takes i8/u8 codes [N, C, H, W] of static C, H, W; "
                        f"{arg.name} is {arg.type}")
    users = fn.users()
    streams: dict[str, Stream] = {}
    layers: list[CnnLayer] = []
    _, c, h, w = arg.type.shape
    source = {}  # Value -> list of stream names not yet consumed (one per user)
    flatten = {}  # Value (a reshape result) -> (C, H, W) of the map it flattens

    def produce(value, stream: Stream, base: str):
        """Register the stream(s) a value travels on: one per user (a dup layer when two)."""
        n_users = len(users.get(value, [])) + (1 if value in fn.outputs else 0)
        stream.name = base
        streams[base] = stream
        if n_users <= 1:
            source[value] = [base]
            return
        if n_users > 2:
            raise PassError(f"%{value.name} has {n_users} users; the HLS backend duplicates a "
                            "stream for two (a skip path)")
        outs = [f"{base}_a", f"{base}_b"]
        for o in outs:
            streams[o] = Stream(o, stream.signed, stream.h, stream.w, stream.c,
                                depth=stream.size)  # the skip path buffers a whole map
        layers.append(CnnLayer(f"dup{len(layers)}", "dup", [base], outs,
                               {"kind": "dup", "count": stream.size, "n": 1,
                                "words_per_group": 1, "pe": 1, "simd": 1, "c": stream.c}))
        source[value] = list(outs)  # consumed by take(); the layer keeps its own

    def take(value, where):
        if value in flatten:
            raise PassError(f"{where}: a flattened map feeds only a 1x1 qconv (dense)")
        if value not in source or not source[value]:
            raise PassError(f"{where}: operand %{value.name} is not a stream of the design")
        return source[value].pop(0)

    produce(arg, Stream("", int(arg.type.dtype.name == "i8"), h, w, c), "x_in")
    for node in fn.nodes:
        if node.op == "constant":
            continue
        where = f"%{node.results[0].name} = {node.op}"
        if node.op == "reshape":
            x = node.operands[0]
            shape = tuple(node.result.type.shape)
            if x not in source or len(shape) != 4 or shape[2:] != (1, 1):
                raise PassError(f"{where}: only a flatten [N, C, H, W] -> [N, C*H*W, 1, 1] "
                                "before a dense 1x1 qconv is supported on FPGA")
            s = streams[source[x][0]]
            flatten[node.result] = (s.c, s.h, s.w, take(x, where))
            continue
        if node.op == "qconv":
            x = node.arg("x")
            flat = None
            if x in flatten:
                fc, fh, fw, xs = flatten.pop(x)
                flat = (fc, fh, fw)
                xin = streams[xs]
                xin = Stream(xs, xin.signed, 1, 1, xin.size)
            else:
                xs = take(x, where)
                xin = streams[xs]
            pe_simd = ((node.attrs.get("config") or {}).get("pe", 1),
                       (node.attrs.get("config") or {}).get("simd", 1))
            cfg, data, out = _conv_layer(module, node, f"layer{len(layers)}", xin, flat, pe_simd)
            inputs = [xs]
            if cfg["residual"]:
                inputs.append(take(node.arg("residual"), where))
                r = streams[inputs[1]]
                if (r.h, r.w, r.c) != (out.h, out.w, out.c):
                    raise PassError(f"{where}: residual map {(r.h, r.w, r.c)} is not the "
                                    f"output's {(out.h, out.w, out.c)}")
                cfg["r_signed"] = r.signed
        elif node.op == "pool":
            if node.attrs.get("channels_last", 0):
                raise PassError(f"{where}: channels_last (the HLS design reads NCHW)")
            xs = take(node.operands[0], where)
            cfg, data, out = _pool_layer(node, streams[xs])
            inputs = [xs]
        else:
            raise PassError(f"the HLS backend builds CNNs of qconv, pool and flatten; "
                            f"{where}(...) is not supported")
        name = f"layer{len(layers)}"
        is_out = node.result in fn.outputs
        layer = CnnLayer(name, cfg["kind"], inputs, [], cfg, data, node)
        layers.append(layer)
        produce(node.result, out, "y_out" if is_out else f"{name}_out")
        layer.outputs = [out.name]
    out_value = fn.outputs[0]
    if out_value not in source:
        raise PassError("the design's output is not produced by a streaming layer")
    return layers, streams, "x_in", "y_out"


# ---- the bit-accurate model (HWC, exactly as the C++) ---------------------------------------


def rounding_shift(v, s):
    """(v + 2^(s-1)) >> s for s > 0; v for s = 0 (int64, arithmetic shift: halves up)."""
    s = np.asarray(s, np.int64)
    half = np.where(s > 0, np.int64(1) << np.maximum(s - 1, 0), 0)
    return (v + half) >> s


def _windows(xp, cfg, oh, ow):
    """[oh, ow, kh, kw, C] taps of a padded HWC map."""
    r = (np.arange(oh) * cfg["sh"])[:, None] + np.arange(cfg["kh"])[None] * cfg["dh"]
    c = (np.arange(ow) * cfg["sw"])[:, None] + np.arange(cfg["kw"])[None] * cfg["dw"]
    return xp[r[:, None, :, None], c[None, :, None, :]]


def simulate_conv(layer: CnnLayer, x: np.ndarray, r: np.ndarray = None) -> np.ndarray:
    cfg, d = layer.cfg, layer.data
    xi = x.reshape(cfg["h"], cfg["w"], cfg["c"]).astype(np.int64) - cfg["x_zp"]
    xp = np.pad(xi, [(cfg["pt"], cfg["pb"]), (cfg["pl"], cfg["pr"]), (0, 0)])
    win = _windows(xp, cfg, cfg["oh"], cfg["ow"])  # [oh, ow, kh, kw, C]
    g, cg, mg = cfg["group"], cfg["cg"], cfg["mg"]
    win = win.reshape(cfg["oh"], cfg["ow"], cfg["kh"], cfg["kw"], g, cg)
    wk = d["w"].reshape(g, mg, cfg["kh"], cfg["kw"], cg)
    acc = np.einsum("yxhwgc,gmhwc->yxgm", win, wk).reshape(cfg["oh"], cfg["ow"], cfg["m"])
    acc = acc + d["bias"]
    acc = ((acc + (1 << 31)) & ((1 << 32) - 1)) - (1 << 31)  # ap_int<32> wraps as the i32
    v = acc * d["mult"]
    if not cfg["residual"]:
        q = rounding_shift(v, d["shift"])
    else:
        rr = (r.reshape(cfg["oh"], cfg["ow"], cfg["m"]).astype(np.int64) - cfg["r_zp"]) \
            * cfg["r_mult"]
        f = d["frac"]
        q = rounding_shift(rounding_shift(v, d["shift"] - f)
                           + rounding_shift(rr, cfg["r_shift"] - f), f)
    return np.clip(q + cfg["y_zp"], cfg["lo"], cfg["hi"])


def simulate_pool(layer: CnnLayer, x: np.ndarray) -> np.ndarray:
    cfg = layer.cfg
    xi = x.reshape(cfg["h"], cfg["w"], cfg["c"]).astype(np.int64)
    pad_value = (-128 if cfg["signed"] else 0) if cfg["pool"] == "max" else 0
    xp = np.pad(xi, [(cfg["pt"], cfg["pb"]), (cfg["pl"], cfg["pr"]), (0, 0)],
                constant_values=pad_value)
    win = _windows(xp, cfg, cfg["oh"], cfg["ow"])
    if cfg["pool"] == "max":
        return win.max(axis=(2, 3))
    total = win.sum(axis=(2, 3))
    count = layer.data["count"][:, :, None]
    return np.sign(total) * (np.abs(total) // count)  # C++ '/': toward zero


def simulate_cnn(layers: list[CnnLayer], x_hwc: np.ndarray) -> np.ndarray:
    """One image's input codes (HWC, flat) -> the output stream's codes, as int64 (flat)."""
    env = {"x_in": np.asarray(x_hwc, np.int64).reshape(-1)}
    for layer in layers:
        ins = [env.pop(s) for s in layer.inputs]
        if layer.kind == "dup":
            outs = [ins[0], ins[0].copy()]
        elif layer.kind == "conv":
            outs = [simulate_conv(layer, ins[0], ins[1] if len(ins) > 1 else None)]
        else:
            outs = [simulate_pool(layer, ins[0])]
        for s, v in zip(layer.outputs, outs):
            env[s] = np.asarray(v, np.int64).reshape(-1)
    return env["y_out"]
