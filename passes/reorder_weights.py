"""reorder-weights: pack every qmatmul's weight into the CUDA backend's mma fragment layout.

For each ``qmatmul{act=float}`` with constant integer weights (1–8 bits) or FP8 e4m3 weights
(``f8e4m3fn``: their bytes as codes, f16 activations, scales x 2^8 for the fp8-e4m3-f16
unpack), fp16/bf16 activations
and per-group (along K, block a multiple of 16 that divides or is divided by 64), per-channel
(along N) or per-tensor scales, the constants are rewritten at compile time
(``codegen/cuda/layout.py`` has the exact layout):

- act-order (g_idx): K is permuted offline so that every group is contiguous
  (``perm = argsort(g_idx)``); the g_idx operand becomes that permutation (i32, layout
  ``act_order_perm``) and the kernel permutes x once per call;
- codes are biased to unsigned and packed into 4- or 8-bit containers, interleaved into
  ``mma.m16n8k16`` B-fragment order: the weight becomes a byte tensor with layout
  ``#layout<cuda_mma_b16, ...>`` whose parameters name the true code type, the container
  width, the bias and the padded sizes. The weight's element type (u8) and layout describe the
  storage; the node's ``w_scheme`` stays the model's scheme (its ``codes`` is the layout's);
- group scales and zero points (after the same bias) become tables ``[groups, N_pad]`` in x's
  float type, permuted so that one 16-byte load gives a lane its 8 columns; per-channel and
  per-tensor scales stay in column order (applied in the epilogue);
- the bias becomes f32.

Weights the layout cannot hold are refused with a PassError naming the node (never packed
wrong). The reference interpreter cannot run the packed module: compare with the module
before this pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.codegen.cuda import layout as L
from qcompiler.ir import Module, elem
from qcompiler.ir.core import constant_node, constant_value, operand_index
from qcompiler.ir.types import Layout, TensorType
from qcompiler.pipeline import Pass, PassError, record_stat, register_pass
from qcompiler.runtime import numerics

ACT_DTYPES = ("f16", "bf16")
FP8_UNPACK_SCALE = 256.0  # the fp8-e4m3-f16 unpack's f16 is the e4m3 value / 2^8


def _refuse(node, why: str):
    raise PassError(f"reorder-weights: %{node.result.name} = qmatmul: {why}")


def _group_size(node, scheme, k: int) -> tuple[int, str]:
    """(K rows per scale row, where scales apply) for a supported granularity."""
    if scheme.granularity == "group":
        if scheme.axis % 2 != 0:
            _refuse(node, f"groups along N ({scheme}) are not supported; group along K (axis 0)")
        g = scheme.block_size
        if g % 16 or not (g % 64 == 0 or 64 % g == 0):
            _refuse(node, f"group size {g} must be a multiple of 16 that divides or is divided "
                          "by 64 (16, 32, 64, 128, 256 ...)")
        return g, "registers"
    if scheme.granularity == "channel" and scheme.axis % 2 != 1:
        _refuse(node, f"per-channel scales along K ({scheme}) are not supported")
    return L.pad_to(k, L.K_ALIGN), "epilogue"


def pack_qmatmul(module: Module, node) -> dict:
    """Pack one node's constants; returns the new operand arrays and the layout parameters."""
    fn = module.main
    scheme = node.attrs["w_scheme"]
    x_t = node.arg("x").type
    if node.attrs["act"] != "float":
        _refuse(node, f"act={node.attrs['act']} (integer activations) has no CUDA kernel yet")
    if x_t.dtype.name not in ACT_DTYPES:
        _refuse(node, f"activations are {x_t.dtype}; the CUDA kernels take f16 or bf16 "
                      "(cast the model's inputs, or reorder-weights{compute_dtype=f16})")
    fp8 = scheme.dtype.name == "f8e4m3fn"
    if fp8 and x_t.dtype.name != "f16":
        _refuse(node, f"FP8 e4m3 weights take f16 activations, not {x_t.dtype} (their unpack "
                      "moves the bits into f16)")
    if not fp8 and (not scheme.dtype.is_integer or scheme.bits > 8):
        _refuse(node, f"weights {scheme.dtype} are not 1-8 bit integers or FP8 e4m3")
    w = constant_value(module, node.arg("w"))
    scale = constant_value(module, node.arg("w_scale"))
    if w is None or scale is None:
        _refuse(node, "weight and scale must be constants")
    zp_v, gidx_v, bias_v = node.arg("w_zero_point"), node.arg("g_idx"), node.arg("bias")
    zp = constant_value(module, zp_v) if zp_v is not None else None
    g_idx = constant_value(module, gidx_v) if gidx_v is not None else None
    bias = constant_value(module, bias_v) if bias_v is not None else None
    if (zp_v is not None and zp is None) or (gidx_v is not None and g_idx is None) or \
            (bias_v is not None and bias is None):
        _refuse(node, "zero point, g_idx and bias must be constants")
    k, n = w.shape
    group, scale_at = _group_size(node, scheme, k)
    # FP8: the bytes are the codes (no bias, no zero point); the unpack gives value / 2^8.
    lo = 0 if fp8 else scheme.dtype.int_range()[0]
    cb = 4 if scheme.bits <= 4 else 8
    scale_factor = FP8_UNPACK_SCALE if fp8 else 1.0
    k_pad, n_pad = L.pad_to(k, L.K_ALIGN), L.pad_to(n, L.N_ALIGN)
    np_dt = x_t.dtype.np_dtype

    # Zero point per element, after the bias to unsigned codes.
    if zp is not None:
        zfull = numerics.expand_scale(zp, (k, n), scheme, g_idx).astype(np.float64) - lo
    elif scheme.implied_zero_point is not None:
        zfull = np.full((k, n), float(scheme.implied_zero_point - lo))
    else:
        zfull = np.full((k, n), float(-lo))
    sfull = numerics.expand_scale(scale, (k, n), scheme, g_idx).astype(np.float32) * scale_factor
    if fp8 and not np.all(np.isfinite(sfull.astype(np_dt))):
        _refuse(node, f"scales x {FP8_UNPACK_SCALE:g} (the FP8 unpack's exponent offset) "
                      f"overflow {x_t.dtype}")

    perm = None
    u = (np.asarray(w).view(np.uint8) if fp8 else (w.astype(np.int32) - lo).astype(np.uint8))
    if scheme.act_order:
        try:
            perm = L.act_order_permutation(g_idx, group)
        except ValueError as e:
            _refuse(node, str(e))
        u, zfull, sfull = u[perm], zfull[perm], sfull[perm]

    u_pad = np.zeros((k_pad, n_pad), np.uint8)
    u_pad[:k, :n] = u
    words = L.pack_codes(u_pad, cb)
    # Rank 2 as qmatmul requires: [K/16, N/64 * cb/4 * 32 lanes * 16 bytes]
    packed = words.view(np.uint8).reshape(k_pad // 16, -1)

    # One row per group: the value of the group's first row (groups are contiguous now).
    rows = -(-k_pad // group)
    first = np.minimum(np.arange(rows) * group, k - 1)
    zero_rows = np.zeros((rows, n_pad), np.float32)
    zero_rows[:, :n] = zfull[first]
    has_zp = zp is not None
    out = {"packed": packed, "perm": perm, "has_zp": has_zp, "cb": cb, "group": group,
           "scale_at": scale_at, "k": k, "n": n, "k_pad": k_pad, "n_pad": n_pad,
           "scale_rows": rows, "code_bias": -lo}
    if scale_at == "registers":
        scale_rows = np.zeros((rows, n_pad), np.float32)
        scale_rows[:, :n] = sfull[first]
        out["scales"] = L.permute_group_rows(scale_rows).astype(np_dt)
    else:
        col = np.zeros(n_pad, np.float32)
        col[:n] = sfull[0]
        out["scales"] = col.astype(np_dt)
    out["zeros"] = L.permute_group_rows(zero_rows).astype(np_dt) if has_zp else None
    # Without a zero-point tensor the zero is one constant for the whole weight.
    out["zero_const"] = None if has_zp else int(zfull.flat[0]) if zfull.size else 0
    out["bias"] = None if bias is None else np.asarray(bias, np.float32).reshape(n)
    return out


def _compute_in(fn, node, dtype: str) -> None:
    """Run an f32 qmatmul in ``dtype``: cast x before it and the result back to f32 after."""
    x = node.operands[0]
    cx = fn.make_node("cast", [x], [TensorType(x.type.shape, elem(dtype))], {"to": elem(dtype)},
                      names=[fn.fresh_name(f"{x.name}.{dtype}")], before=node).result
    old = node.result
    half_t = TensorType(old.type.shape, elem(dtype))
    node.operands[0] = cx
    idx = fn.nodes.index(node)
    back = fn.make_node("cast", [old], [old.type], {"to": old.type.dtype},
                        names=[fn.fresh_name(f"{old.name}.f32")])
    fn.nodes.remove(back)
    fn.nodes.insert(idx + 1, back)
    fn.replace_all_uses(old, back.result)
    back.operands[0] = old  # replace_all_uses rewired the cast's own operand too
    old.type = half_t


@register_pass("reorder-weights")
@dataclass
class ReorderWeightsPass(Pass):
    """Pack qmatmul weights, scales and zero points into the CUDA mma fragment layout."""

    # "f16" or "bf16": run qmatmuls whose activations are f32 in this type (casts around the
    # kernel; x is rounded to it). "" refuses f32 activations.
    compute_dtype: str = ""

    def run(self, module: Module) -> Module:
        if self.compute_dtype not in ("",) + ACT_DTYPES:
            raise PassError(f"reorder-weights: compute_dtype={self.compute_dtype!r}; use f16 "
                            "or bf16")
        fn = module.main
        count = 0
        for node in [n for n in fn.nodes if n.op == "qmatmul"]:
            w_t = node.arg("w").type
            if w_t.layout is not None:
                continue  # already packed
            if self.compute_dtype and node.arg("x").type.dtype.name == "f32" \
                    and node.attrs["act"] == "float":
                _compute_in(fn, node, self.compute_dtype)
            scheme = node.attrs["w_scheme"]
            p = pack_qmatmul(module, node)
            name = node.result.name
            lay = Layout.make(
                L.LAYOUT_NAME, codes=scheme.dtype.name, container_bits=p["cb"],
                code_bias=p["code_bias"], k=p["k"], n=p["n"], k_pad=p["k_pad"],
                n_pad=p["n_pad"], group=p["group"], scale_at=p["scale_at"],
                interleave="kodd_h_k8" if p["cb"] == 4 else "h_k8_kodd",
                act_order=int(p["perm"] is not None),
                zero_const=-1 if p["zero_const"] is None else p["zero_const"])
            # The stored elements are bytes: u8 and the layout describe them; w_scheme keeps
            # the model's scheme (see the module docstring).
            w_new = constant_node(fn, module, p["packed"], TensorType(
                p["packed"].shape, elem("u8"), None, lay),
                name_hint=f"{name}.w_packed", before=node).result
            x_dt = node.arg("x").type.dtype
            s_lay = Layout.make("group_permuted" if p["scale_at"] == "registers" else "column",
                                rows=p["scale_rows"] if p["scale_at"] == "registers" else 1)
            s_new = constant_node(fn, module, p["scales"], TensorType(
                p["scales"].shape, x_dt, None, s_lay), name_hint=f"{name}.scales_packed",
                before=node).result
            z_new = None
            if p["zeros"] is not None:
                z_new = constant_node(fn, module, p["zeros"], TensorType(
                    p["zeros"].shape, x_dt, None, Layout.make("group_permuted",
                                                              rows=p["scale_rows"])),
                    name_hint=f"{name}.zeros_packed", before=node).result
            perm_new = None
            if p["perm"] is not None:
                perm_new = constant_node(fn, module, p["perm"], TensorType(
                    p["perm"].shape, elem("i32"), None, Layout.make("act_order_perm")),
                    name_hint=f"{name}.k_perm", before=node).result
            bias_new = None
            if p["bias"] is not None:
                bias_new = constant_node(fn, module, p["bias"], name_hint=f"{name}.bias_f32",
                                         before=node).result
            ops = list(node.operands) + [None] * (8 - len(node.operands))
            for arg_name, v in (("w", w_new), ("w_scale", s_new), ("w_zero_point", z_new),
                                ("g_idx", perm_new), ("bias", bias_new)):
                ops[operand_index("qmatmul", arg_name)] = v
            node.operands = ops
            count += 1
        fn.remove_dead_nodes()
        record_stat(module, self.name, packed=count)
        return module
