"""The CUDA op kernels (codegen/cuda/ops) against the reference implementation of each node.

CPU side (CI, no GPU): every kernel renders, equal nodes share one kernel, unsupported nodes
fail naming the node, and the whole library compiles with nvcc for sm_80 and sm_90 in one
call (skipped where nvcc is missing). GPU side (marked ``gpu``, skipped without a GPU): one
library for every node below; each runs on fresh random inputs (never zeros; the seed is in
the message) at two sets of odd symbolic sizes, results poisoned with NaN before the launch,
and is compared with ``qcompiler.runtime.reference.OP_IMPLS`` of the same node.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from cuda_gpu_util import gpu_reason
from op_graph import Graph
from qcompiler.codegen.cuda.build import find_nvcc
from qcompiler.codegen.cuda.ops import (CudaOpsError, CudaOpsLibrary, build_cuda_ops_library,
                                        kernel_source, library_path, library_source)
from qcompiler.codegen.cuda.ops.body import FLOAT_MATH_OPS
from qcompiler.ir.core import Function, constant_value
from qcompiler.ir.types import elem, tensor
from qcompiler.runtime.reference import OP_IMPLS

SIZES = ({"batch": 7, "seq": 33}, {"batch": 3, "seq": 130})


def _make_graph() -> Graph:
    g = Graph()
    B, S = "batch", "seq"
    for dt in ("f32", "f16", "bf16"):
        for op in ("add", "sub", "mul", "div", "max", "min"):
            g.add("binary", op, [g.arg([B, 13], dt), g.arg([13], dt)], [([B, 13], dt)])
        g.add("binary", "add", [g.arg([B, 1], dt), g.arg([1, S], dt)], [([B, S], dt)])
        g.add("binary", "mul", [g.arg([B, S, 64], dt), g.arg([B, S, 64], dt)],
              [([B, S, 64], dt)])  # the contiguous, vectorized path
        g.add("binary", "add", [g.arg([B, S, 64], dt), g.arg([], dt)], [([B, S, 64], dt)])
    g.add("pow", "pow", [g.arg([B, 13], "f32", low="positive"), g.arg([13], "f32")],
          [([B, 13], "f32")])
    for dt in ("f32", "f16", "bf16"):
        for op in ("sqrt", "erf", "relu", "sigmoid", "tanh", "exp", "neg", "abs", "reciprocal"):
            g.add("unary", op, [g.arg([B, S], dt, low="positive" if op == "sqrt" else None)],
                  [([B, S], dt)])
        for approx in ("none", "tanh"):
            g.add("unary", "gelu", [g.arg([B, S], dt)], [([B, S], dt)], {"approximate": approx})
    # float convolutions (conv.cu.j2): a ViT patch embedding, padded / strided / dilated /
    # grouped / depthwise 2-D ones (strides, pads and dilations differing between H and W),
    # a 1-D audio stem
    def out_dim(size, k, stride, pad0, pad1, dil):
        return (size + pad0 + pad1 - dil * (k - 1) - 1) // stride + 1

    for dt in ("f32", "f16", "bf16"):
        for (c, m, k, strides, pads, dils, group, bias, hw) in (
                (3, 24, (4, 4), (4, 4), (0, 0, 0, 0), (1, 1), 1, True, (16, 12)),
                (5, 7, (3, 2), (2, 1), (1, 0, 1, 1), (1, 1), 1, False, (11, 9)),
                (6, 4, (3, 3), (1, 2), (2, 1, 0, 2), (2, 1), 2, True, (9, 10)),
                (8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8, True, (7, 7))):
            oh = out_dim(hw[0], k[0], strides[0], pads[0], pads[2], dils[0])
            ow = out_dim(hw[1], k[1], strides[1], pads[1], pads[3], dils[1])
            g.add("conv", "conv", [g.arg([B, c, *hw], dt), g.arg([m, c // group, *k], dt)]
                  + ([g.arg([m], dt)] if bias else []), [([B, m, oh, ow], dt)],
                  {"group": group, "strides": list(strides), "pads": list(pads),
                   "dilations": list(dils)})
        g.add("conv", "conv", [g.arg([B, 4, 50], dt), g.arg([6, 4, 3], dt), g.arg([6], dt)],
              [([B, 6, 25], dt)], {"group": 1, "strides": [2], "pads": [1, 0], "dilations": [1]})
    # float math and activations (body.FLOAT_MATH_OPS), with their attributes and domains
    domains = {"log": (0.05, 4.0), "acosh": (1.0, 4.0), "asin": (-0.99, 0.99),
               "acos": (-0.99, 0.99), "atanh": (-0.99, 0.99), "round": (-6.0, 6.0)}
    params = {"leaky_relu": {"alpha": 0.01}, "elu": {"alpha": 1.0},
              "selu": {"alpha": 1.6732632, "gamma": 1.0507009},
              "celu": {"alpha": 0.7}, "hard_sigmoid": {"alpha": 0.2, "beta": 0.5},
              "thresholded_relu": {"alpha": 0.3}}
    for dt in ("f32", "f16", "bf16"):
        for op in FLOAT_MATH_OPS:
            g.add("math", op, [g.arg([B, S], dt, low=domains.get(op))], [([B, S], dt)],
                  params.get(op))
    g.add("exact", "div", [g.arg([B, 13], "i32", low=(-50, 50)),
                           g.arg([B, 13], "i32", low=(-7, 7))], [([B, 13], "i32")])
    g.add("exact", "add", [g.arg([B, 13], "i64", low=(-2**40, 2**40)),
                           g.arg([13], "i64", low=(-2**40, 2**40))], [([B, 13], "i64")])
    for op in ("equal", "greater", "greater_or_equal", "less", "less_or_equal"):
        g.add("exact", op, [g.arg([B, 13], "i32", low=(-3, 3)), g.arg([13], "i32", low=(-3, 3))],
              [([B, 13], "bool")])
    g.add("exact", "less", [g.arg([B, 13], "f16"), g.arg([B, 1], "f16")], [([B, 13], "bool")])
    g.add("exact", "and", [g.arg([B, 13], "bool"), g.arg([B, 13], "bool")], [([B, 13], "bool")])
    for op in ("or", "xor"):
        g.add("exact", op, [g.arg([B, 13], "bool"), g.arg([13], "bool")], [([B, 13], "bool")])
    g.add("exact", "not", [g.arg([B, 13], "bool")], [([B, 13], "bool")])
    for dt in ("i32", "u8", "i64"):
        for op in ("bitwise_and", "bitwise_or", "bitwise_xor"):
            g.add("exact", op, [g.arg([B, 13], dt, low=(0, 255)), g.arg([13], dt, low=(0, 255))],
                  [([B, 13], dt)])
        g.add("exact", "bitwise_not", [g.arg([B, 13], dt, low=(0, 255))], [([B, 13], dt)])
    for dt in ("f32", "f16", "bf16"):  # a per-channel slope, broadcast
        g.add("binary", "prelu", [g.arg([B, 13], dt), g.arg([13], dt)], [([B, 13], dt)])
    g.add("exact", "isnan", [g.arg([B, 13], "f32", low="nan")], [([B, 13], "bool")])
    g.add("exact", "where", [g.arg([B, 13], "bool"), g.arg([B, 13], "bf16"), g.arg([13], "bf16")],
          [([B, 13], "bf16")])
    for src, dst, low in (("f32", "i8", (-300.0, 300.0)), ("f32", "u8", (-300.0, 300.0)),
                          ("f32", "i32", None), ("f32", "f16", None), ("f32", "bf16", None),
                          ("f16", "f32", None), ("bf16", "f32", None), ("f16", "bf16", None),
                          ("i64", "i8", (-1000, 1000)), ("f32", "bool", (-2.0, 2.0)),
                          ("i32", "f32", (-10**6, 10**6)), ("i64", "i64", (-2**40, 2**40)),
                          ("i64", "i32", (-2**40, 2**40))):
        g.add("exact", "cast", [g.arg([B, S], src, low=low)], [([B, S], dst)], {"to": elem(dst)})
    g.add("exact", "expand", [g.arg([B, 1], "i32", low=(-9, 9)), g.const([1, 13])],
          [([B, 13], "i32")])
    # fused bodies
    g.add("fused", "fused_elementwise", [g.arg([B, S], "f32"), g.arg([S], "f32")],
          [([B, S], "f32")], {"body": "t0 = add(x0, x1); t1 = gelu<none>(t0); "
                                      "t2 = mul(t1, 0.5); return t2"})
    g.add("fused", "fused_elementwise", [g.arg([B, S, 64], "bf16"), g.arg([B, S, 64], "bf16")],
          [([B, S, 64], "bf16")], {"body": "t0 = silu(x0); t1 = mul(t0, x1); return t1"})
    g.add("fused", "fused_elementwise", [g.arg([B, S], "f16"), g.arg([B, 1], "f16")],
          [([B, S], "f32")], {"body": "t0 = sub(x0, x1); t1 = tanh(t0); t2 = cast<f32>(t1); "
                                      "t3 = max(t2, -0.25); return t3"})
    g.add("fused", "fused_elementwise", [g.arg([B, S], "f16"), g.arg([B, S], "f16")],
          [([B, S], "f16")], {"body": "t0 = greater(x0, x1); t1 = where(t0, x0, -3.4e+38); "
                                      "t2 = exp(t1); return t2"})
    # row reductions
    for dt in ("f32", "f16", "bf16"):
        g.add("rows", "softmax", [g.arg([B, S], dt)], [([B, S], dt)], {"axis": -1})
        g.add("rows", "softmax", [g.arg([B, 3, 1500], dt)], [([B, 3, 1500], dt)], {"axis": -1})
        g.add("rows", "layernorm", [g.arg([B, S, 384], dt), g.arg([384], dt), g.arg([384], dt)],
              [([B, S, 384], dt)], {"axis": -1, "epsilon": 1e-5})
        g.add("rows", "layernorm", [g.arg([B, 2, 2051], dt), g.arg([2051], dt),
                                    g.arg([2051], dt)],
              [([B, 2, 2051], dt)], {"axis": -1, "epsilon": 1e-5})
        g.add("rows", "rmsnorm", [g.arg([B, S, 96], dt), g.arg([96], dt)], [([B, S, 96], dt)],
              {"axis": -1, "epsilon": 1e-6})
        g.add("rows", "rmsnorm", [g.arg([B, 4096], dt), g.arg([4096], dt)], [([B, 4096], dt)],
              {"axis": -1, "epsilon": 1e-6})
    # constant scale and bias (a model's weights): read before the kernel waits for its inputs
    wr = np.random.default_rng(7)
    g.add("rows", "layernorm", [g.arg([B, S, 384], "f16"), g.const(wr.uniform(0.5, 1.5, 384), "f16"),
                                g.const(wr.uniform(-1, 1, 384), "f16")],
          [([B, S, 384], "f16")], {"axis": -1, "epsilon": 1e-5})
    g.add("rows", "rmsnorm", [g.arg([B, 2048], "f16"), g.const(wr.uniform(0.5, 1.5, 2048), "f16")],
          [([B, 2048], "f16")], {"axis": -1, "epsilon": 1e-6})
    g.add("rows", "softmax", [g.arg([B, 7, 13], "f32")], [([B, 7, 13], "f32")], {"axis": 1})
    g.add("rows", "layernorm", [g.arg([B, 7, 13], "f16"), g.arg([7, 13], "f16")],
          [([B, 7, 13], "f16")], {"axis": 1, "epsilon": 1e-3})
    g.add("rows", "reduce_mean", [g.arg([B, S], "f32")], [([B, 1], "f32")],
          {"axes": [-1], "keepdims": 1})
    g.add("rows", "reduce_sum", [g.arg([B, 7, 13], "bf16")], [([B, 13], "bf16")],
          {"axes": [1], "keepdims": 0})
    g.add("rows", "reduce_l2", [g.arg([B, 7], "f32")], [((), "f32")],
          {"axes": [], "keepdims": 0})
    g.add("exact", "reduce_sum", [g.arg([B, 13], "i32", low=(-100, 100))], [([13], "i32")],
          {"axes": [0], "keepdims": 0})
    # data movement: exact
    g.add("copy", "transpose", [g.arg([B, S, 4, 16], "f16")], [([B, 4, S, 16], "f16")],
          {"perm": [0, 2, 1, 3]})
    g.add("copy", "transpose", [g.arg([2, B, 3, 5], "bf16")], [([3, 5, 2, B], "bf16")],
          {"perm": [2, 3, 0, 1]})
    # NCHW <-> NHWC: a batch of matrix transposes through shared-memory tiles (partial tiles
    # at both edges), and with 3 channels (a side under 8) a thread per pixel both ways
    g.add("copy", "transpose", [g.arg([B, 40, 9, 7], "u8", low=(0, 255))], [([B, 9, 7, 40], "u8")],
          {"perm": [0, 2, 3, 1]})
    g.add("copy", "transpose", [g.arg([B, 5, 7, 36], "f32")], [([B, 36, 5, 7], "f32")],
          {"perm": [0, 3, 1, 2]})
    g.add("copy", "transpose", [g.arg([B, 3, 10, 10], "i8", low=(-128, 127))],
          [([B, 10, 10, 3], "i8")], {"perm": [0, 2, 3, 1]})
    g.add("copy", "transpose", [g.arg([B, 9, 11, 3], "f32")], [([B, 3, 9, 11], "f32")],
          {"perm": [0, 3, 1, 2]})
    # constant Pad: channels 3 -> 4 (what cuda-conv-layout inserts), and a crop with a value
    g.add("copy", "pad", [g.arg([B, 5, 6, 3], "u8", low=(0, 255)), g.const([0, 0, 0, 0, 0, 0, 0, 1])],
          [([B, 5, 6, 4], "u8")], {"mode": "constant"})
    g.add("copy", "pad", [g.arg([B, 13], "f16"), g.const([0, -2, 0, 3]), g.const(1.5, "f16")],
          [([B, 14], "f16")], {"mode": "constant"})
    g.add("copy", "pad", [g.arg([B, 7, 13], "f32"), g.const([0, 0, 0, 0, 0, 3]),
                          g.const(-2.5, "f32")], [([B, 7, 16], "f32")], {"mode": "constant"})
    # edge, reflect (a crop on the other side) and wrap
    g.add("copy", "pad", [g.arg([B, 6, 7], "f32"), g.const([0, 2, 3, 0, 1, 2])],
          [([B, 9, 12], "f32")], {"mode": "edge"})
    g.add("copy", "pad", [g.arg([B, 6, 7], "bf16"), g.const([0, 2, -1, 0, -2, 3])],
          [([B, 6, 9], "bf16")], {"mode": "reflect"})
    g.add("copy", "pad", [g.arg([B, 5], "i32", low=(-99, 99)), g.const([0, 7, 0, 4])],
          [([B, 16], "i32")], {"mode": "wrap"})
    g.add("copy", "concat", [g.arg([B, 7], "f32"), g.arg([B, S], "f32"), g.arg([B, 1], "f32")],
          [([B, "?"], "f32")], {"axis": 1})
    # the KV cache append (16-byte vectors) and a 40-input stack (two launches of 32 and 8)
    g.add("copy", "concat", [g.arg([B, 2, "kv", 64], "f16"), g.arg([B, 2, 1, 64], "f16")],
          [([B, 2, "?", 64], "f16")], {"axis": 2})
    g.add("copy", "concat", [g.arg([1, B, 3, 8], "bf16") for _ in range(40)],
          [([40, B, 3, 8], "bf16")], {"axis": 0})
    # a layer's cache update from the stacked cache: new rows [B, S, H, D] (vectors) and
    # [B, H, S, D] with D = 5 (scalar path)
    g.add("copy", "kv_concat", [g.arg([3, B, 2, "kv", 64], "f16"), g.arg([B, S, 2, 64], "f16")],
          [([B, 2, "?", 64], "f16")], {"layer": 2, "new_bshd": 1})
    g.add("copy", "kv_concat", [g.arg([2, B, 2, "kv", 5], "f32"), g.arg([B, 2, S, 5], "f32")],
          [([B, 2, "?", 5], "f32")], {"layer": 0, "new_bshd": 0})
    g.add("copy", "split", [g.arg([B, 20], "f16")], [([B, 7], "f16"), ([B, 13], "f16")],
          {"axis": 1, "sizes": [7, 13]})
    x = g.arg([B, S], "f32")
    g.add("copy", "slice", [x, g.const([1, -20]), g.const([-1, 1000]), g.const([0, 1]),
                            g.const([1, 2])], [(["?", "?"], "f32")])
    g.add("copy", "slice", [g.arg([B, 33], "f16"), g.const([-2]), g.const([-1000]),
                            g.const([1]), g.const([-3])], [([B, 11], "f16")])
    g.add("copy", "gather", [g.arg([50, 64], "f16"), g.arg([B, S], "i64", low=(-50, 49))],
          [([B, S, 64], "f16")], {"axis": 0})
    g.add("copy", "gather", [g.arg([50, 13], "f32"), g.arg([B, 7], "i64", low=(-50, 49))],
          [([B, 7, 13], "f32")], {"axis": 0})
    g.add("copy", "gather", [g.arg([B, 13], "bf16"), g.arg([5], "i32", low=(-13, 12))],
          [([B, 5], "bf16")], {"axis": 1})
    g.add("copy", "expand", [g.arg([1, 13], "f16"), g.const([7, 1])], [([7, 13], "f16")])
    g.add("copy", "reshape", [g.arg([B, 7, 13], "f32"), g.const([0, -1])], [([B, 91], "f32")])
    # matmul
    g.add("matmul", "matmul", [g.arg([B, 7, 13], "f32"), g.arg([13, S], "f32")],
          [([B, 7, S], "f32")])
    g.add("matmul", "matmul", [g.arg([B, 1, 70, 33], "f16"), g.arg([1, 3, 33, 45], "f16")],
          [([B, 3, 70, 45], "f16")])
    g.add("matmul", "matmul", [g.arg([B, 40, 64], "bf16"), g.arg([B, 64, 40], "bf16")],
          [([B, 40, 40], "bf16")])
    # attention: GQA (4 query heads over 2 kv heads), causal, additive padding mask
    for dt in ("f16", "bf16", "f32"):
        g.add("attention", "attention",
              [g.arg([B, 4, S, 64], dt), g.arg([B, 2, S, 64], dt), g.arg([B, 2, S, 64], dt),
               g.arg([B, 1, 1, S], dt, low="mask")],
              [([B, 4, S, 64], dt)], {"scale": 0.125, "causal": 1})
        g.add("attention", "attention",
              [g.arg([B, 8, S, 128], dt), g.arg([B, 2, S, 128], dt), g.arg([B, 2, S, 128], dt)],
              [([B, 8, S, 128], dt)], {"scale": 0.0884, "causal": 1})
        # decode: one query row against a long KV (split over the KV length)
        g.add("attention", "attention",
              [g.arg([B, 6, 1, 128], dt), g.arg([B, 2, "kv", 128], dt),
               g.arg([B, 2, "kv", 128], dt), g.arg([B, 1, 1, "kv"], dt, low="mask")],
              [([B, 6, 1, 128], dt)], {"scale": 0.0884, "causal": 1})
    g.add("attention", "attention",
          [g.arg([B, 4, 7, 8], "f32"), g.arg([B, 4, 13, 8], "f32"), g.arg([B, 4, 13, 5], "f32")],
          [([B, 4, 7, 5], "f32")], {"scale": 0.35, "causal": 1})  # Skv > Sq, Dv != D, odd
    # grouped-query decode (a block per group of query heads sharing a kv head): 8 heads a
    # group with a padding mask (f16) and without (f32, four lanes a 16-byte pack); 4 heads
    # over 20 keys (one split: the block writes y itself); 2 heads in [B, S, H, D]
    g.add("attention", "attention",
          [g.arg([B, 8, 1, 64], "f16"), g.arg([B, 1, "kv", 64], "f16"),
           g.arg([B, 1, "kv", 64], "f16"), g.arg([B, 1, 1, "kv"], "f16", low="mask")],
          [([B, 8, 1, 64], "f16")], {"scale": 0.125, "causal": 1})
    g.add("attention", "attention",
          [g.arg([B, 16, 1, 64], "f32"), g.arg([B, 2, "kv", 64], "f32"),
           g.arg([B, 2, "kv", 64], "f32")],
          [([B, 16, 1, 64], "f32")], {"scale": 0.125, "causal": 1})
    g.add("attention", "attention",
          [g.arg([B, 8, 1, 64], "bf16"), g.arg([B, 2, 20, 64], "bf16"),
           g.arg([B, 2, 20, 64], "bf16")],
          [([B, 8, 1, 64], "bf16")], {"scale": 0.125, "causal": 0})
    g.add("attention", "attention",
          [g.arg([B, 1, 4, 64], "f16"), g.arg([B, "kv", 2, 64], "f16"),
           g.arg([B, "kv", 2, 64], "f16")],
          [([B, 1, 4, 64], "f16")], {"scale": 0.125, "causal": 1, "q_bshd": 1, "kv_bshd": 1,
                                     "y_bshd": 1})
    # the tensor-core grouped-query decode (4 or 8 heads a group, f16/bf16): [B, S, H, D]
    # with D = 128 and a mask, 4 heads a group; D = 16 (8-byte quarter rows), 8 heads a group
    g.add("attention", "attention",
          [g.arg([B, 1, 8, 128], "f16"), g.arg([B, "kv", 2, 128], "f16"),
           g.arg([B, "kv", 2, 128], "f16"), g.arg([B, 1, 1, "kv"], "f16", low="mask")],
          [([B, 1, 8, 128], "f16")], {"scale": 0.0884, "causal": 1, "q_bshd": 1, "kv_bshd": 1,
                                      "y_bshd": 1})
    g.add("attention", "attention",
          [g.arg([B, 16, 1, 16], "bf16"), g.arg([B, 2, "kv", 16], "bf16"),
           g.arg([B, 2, "kv", 16], "bf16")],
          [([B, 16, 1, 16], "bf16")], {"scale": 0.25, "causal": 0})
    # heads 256 wide: the tensor-core kernel's shared memory would pass 48 KB (scalar kernel)
    g.add("attention", "attention",
          [g.arg([B, 8, 1, 256], "f16"), g.arg([B, 1, "kv", 256], "f16"),
           g.arg([B, 1, "kv", 256], "f16")],
          [([B, 8, 1, 256], "f16")], {"scale": 0.0625, "causal": 1})
    g.add("attention", "attention",
          [g.arg([B, 2, "seq", 32], "f16"), g.arg([B, 2, 9, 32], "f16"),
           g.arg([B, 2, 9, 32], "f16")],
          [([B, 2, "seq", 32], "f16")], {"scale": 0.2, "causal": 1})  # rows with no key
    # a prefill over a longer cache (Skv = 4 S + 3 > Sq): the tensor-core kernel's causal
    # limit shifted by Skv - Sq, its tiles of unmasked scores and its partial last tile
    g.add("attention", "attention",
          [g.arg([B, 2, S, 64], "f16"), g.arg([B, 2, "kv", 64], "f16"),
           g.arg([B, 2, "kv", 64], "f16")],
          [([B, 2, S, 64], "f16")], {"scale": 0.125, "causal": 1})
    # [B, S, H, D] layouts (fold-attention-layout): tensor-core prefill, decode, warp prefill
    g.add("attention", "attention",
          [g.arg([B, S, 4, 64], "f16"), g.arg([B, S, 2, 64], "f16"), g.arg([B, S, 2, 64], "f16"),
           g.arg([B, 1, 1, S], "f16", low="mask")],
          [([B, S, 4, 64], "f16")], {"scale": 0.125, "causal": 1, "q_bshd": 1, "kv_bshd": 1,
                                     "y_bshd": 1})
    g.add("attention", "attention",
          [g.arg([B, 1, 6, 128], "bf16"), g.arg([B, "kv", 2, 128], "bf16"),
           g.arg([B, "kv", 2, 128], "bf16")],
          [([B, 1, 6, 128], "bf16")], {"scale": 0.0884, "causal": 1, "q_bshd": 1, "kv_bshd": 1,
                                       "y_bshd": 1})
    g.add("attention", "attention",
          [g.arg([B, 7, 4, 8], "f32"), g.arg([B, 4, 13, 8], "f32"), g.arg([B, 4, 13, 5], "f32")],
          [([B, 4, 7, 5], "f32")], {"scale": 0.35, "causal": 1, "q_bshd": 1})
    g.add("attention", "attention",
          [g.arg([B, 4, 7, 8], "f32"), g.arg([B, 13, 4, 8], "f32"), g.arg([B, 13, 4, 5], "f32")],
          [([B, 7, 4, 5], "f32")], {"scale": 0.35, "causal": 1, "kv_bshd": 1, "y_bshd": 1})
    # rotary embedding: [B, H, S, D] with position ids, [B, S, H*D] interleaved over part of D
    g.add("rotary", "rotary_embedding",
          [g.arg([B, 4, S, 64], "f16"), g.arg([300, 32], "f16", low=(-1.0, 1.0)),
           g.arg([300, 32], "f16", low=(-1.0, 1.0)), g.arg([B, S], "i64", low=(0, 299))],
          [([B, 4, S, 64], "f16")], {"interleaved": 0, "num_heads": 0,
                                     "rotary_embedding_dim": 0})
    g.add("rotary", "rotary_embedding",
          [g.arg([B, S, 3 * 32], "bf16"), g.arg([S, 16], "bf16", low=(-1.0, 1.0)),
           g.arg([S, 16], "bf16", low=(-1.0, 1.0))],
          [([B, S, 96], "bf16")], {"interleaved": 1, "num_heads": 3, "rotary_embedding_dim": 16})
    g.add("rotary", "rotary_embedding",
          [g.arg([B, 2, S, 32], "f16"), g.arg([B, S, 16], "f32", low=(-1.0, 1.0)),
           g.arg([B, S, 16], "f32", low=(-1.0, 1.0))],
          [([B, 2, S, 32], "f16")], {"interleaved": 0, "num_heads": 0,
                                     "rotary_embedding_dim": 0})
    # qkv_heads (fuse-qkv): GQA with position ids (16-byte cache copies); an
    # interleaved partial rotation without ids; f32 caches [B, S, D/2] and D = 6 (scalar copies)
    g.add("rotary", "qkv_heads",
          [g.arg([B, S, 8 * 64], "f16"), g.arg([300, 32], "f16", low=(-1.0, 1.0)),
           g.arg([300, 32], "f16", low=(-1.0, 1.0)), g.arg([B, S], "i64", low=(0, 299)),
           g.arg([3, B, 2, "kv", 64], "f16"), g.arg([3, B, 2, "kv", 64], "f16")],
          [([B, S, 4, 64], "f16"), ([B, 2, "?", 64], "f16"), ([B, 2, "?", 64], "f16")],
          {"num_heads": 4, "kv_heads": 2, "interleaved": 0, "rotary_embedding_dim": 0,
           "layer": 1})
    g.add("rotary", "qkv_heads",
          [g.arg([B, S, 5 * 32], "bf16"), g.arg([S, 16], "bf16", low=(-1.0, 1.0)),
           g.arg([S, 16], "bf16", low=(-1.0, 1.0)), None,
           g.arg([2, B, 1, "kv", 32], "bf16"), g.arg([2, B, 1, "kv", 32], "bf16")],
          [([B, S, 3, 32], "bf16"), ([B, 1, "?", 32], "bf16"), ([B, 1, "?", 32], "bf16")],
          {"num_heads": 3, "kv_heads": 1, "interleaved": 1, "rotary_embedding_dim": 16,
           "layer": 0})
    g.add("rotary", "qkv_heads",
          [g.arg([B, S, 6 * 6], "f16"), g.arg([B, S, 3], "f32", low=(-1.0, 1.0)),
           g.arg([B, S, 3], "f32", low=(-1.0, 1.0)), None,
           g.arg([1, B, 2, "kv", 6], "f16"), g.arg([1, B, 2, "kv", 6], "f16")],
          [([B, S, 2, 6], "f16"), ([B, 2, "?", 6], "f16"), ([B, 2, "?", 6], "f16")],
          {"num_heads": 2, "kv_heads": 2, "interleaved": 0, "rotary_embedding_dim": 0,
           "layer": 0})
    g.add("rotary", "qkv_heads",  # no cache (a prefill export): k, v [B, S, Hkv, D]
          [g.arg([B, S, 8 * 64], "f16"), g.arg([300, 32], "f16", low=(-1.0, 1.0)),
           g.arg([300, 32], "f16", low=(-1.0, 1.0)), g.arg([B, S], "i64", low=(0, 299))],
          [([B, S, 4, 64], "f16"), ([B, S, 2, 64], "f16"), ([B, S, 2, 64], "f16")],
          {"num_heads": 4, "kv_heads": 2, "interleaved": 0, "rotary_embedding_dim": 0,
           "layer": 0})
    g.add("rotary", "qkv_heads",  # no rotary, no cache (an encoder's attention): a head split
          [g.arg([B, S, 3 * 96], "bf16")],
          [([B, S, 3, 32], "bf16"), ([B, S, 3, 32], "bf16"), ([B, S, 3, 32], "bf16")],
          {"num_heads": 3, "kv_heads": 3, "interleaved": 0, "rotary_embedding_dim": 0,
           "layer": 0})
    # two identical nodes: one kernel
    g.add("dedup", "add", [g.arg([B, 13], "f32"), g.arg([13], "f32")], [([B, 13], "f32")])
    return g


def _all_nodes(g):
    return [n for ns in g.nodes.values() for n in ns]


# ---- CPU side ------------------------------------------------------------------------------------


def test_every_node_renders_and_duplicates_share_a_kernel():
    g = _make_graph()
    names, text = library_source(_all_nodes(g), g.module)
    first, dup = g.nodes["binary"][0], g.nodes["dedup"][0]
    assert names[first.results[0].name] == names[dup.results[0].name]
    assert names[first.results[0].name] != names[g.nodes["binary"][1].results[0].name]
    for symbol in set(names.values()):
        assert text.count(f'extern "C" int {symbol}(') == 1, symbol


def test_only_attention_and_qconv_size_a_workspace_from_the_shapes():
    """Every op kernel but attention's and qconv's answers 0 for its workspace whatever the
    shapes (its template's ``_workspace_bytes`` returns 0, directly or through the shared
    kernel of a launch-constant entry point), which ``CudaOpsLibrary.workspace_bytes`` reads
    from the symbol instead of calling the library (a decode loop asks per changed launch)."""
    import re

    from qcompiler.codegen.cuda.ops.kernel import SHAPE_WORKSPACE_OPS

    g = _make_graph()
    seen = set()
    for node in _all_nodes(g):
        symbol, text = kernel_source(node, g.module)
        seen.add(node.op)
        depends = node.op in SHAPE_WORKSPACE_OPS
        assert CudaOpsLibrary.shape_workspace(symbol) == depends, (node.op, symbol)
        if depends:
            continue
        shared = re.search(rf"{symbol}_workspace_bytes\(const int64_t\* shapes\) \{{\n"
                           rf"  return (\w+)_workspace_bytes\(shapes\);", text)
        base = shared.group(1) if shared else symbol
        assert f"{base}_workspace_bytes(const int64_t* shapes) {{ return 0; }}" in text, \
            (node.op, symbol)
    assert {"attention", "qkv_heads", "add", "softmax", "concat"} <= seen
    assert CudaOpsLibrary.shape_workspace("a_symbol_of_another_form")  # asked: unknown


def test_layers_share_one_kernel_with_their_layer_at_launch():
    """qkv_heads of different layers (the layer: a launch constant) are one kernel in the
    library, each layer an entry point passing its own index."""
    fn = Function("main")
    qkv = fn.add_arg("qkv", tensor([1, 1, 3 * 64], "f16"))
    past = [fn.add_arg(n, tensor([3, 1, 1, 5, 64], "f16")) for n in ("pk", "pv")]
    nodes = [fn.make_node("qkv_heads", [qkv, None, None, None] + past,
                          [tensor([1, 1, 1, 64], "f16"), tensor([1, 1, 6, 64], "f16"),
                           tensor([1, 1, 6, 64], "f16")],
                          {"num_heads": 1, "kv_heads": 1, "interleaved": 0,
                           "rotary_embedding_dim": 0, "layer": layer},
                          names=[f"q{i}", f"k{i}", f"v{i}"])
             for i, layer in enumerate((0, 2, 2))]
    names, text = library_source(nodes)
    assert names["q0"].endswith("_0") and names["q1"].endswith("_2")
    assert names["q1"] == names["q2"]  # the same node twice: one symbol
    assert names["q0"][:-2] == names["q1"][:-2]  # one kernel
    assert text.count("__global__ void qkv_heads_kernel") == 1
    assert text.count(f'extern "C" int {names["q0"]}(') == 1
    assert text.count(f'extern "C" int {names["q1"]}(') == 1
    assert "const int64_t consts[] = {2LL};" in text


def test_unsupported_nodes_name_node_and_op():
    fn = Function("main")
    a = fn.add_arg("a", tensor(["batch", 4], "f32"))
    node = fn.make_node("dynamic_quantize", [a], [tensor(["batch", 4], "u8"), tensor([], "f32"),
                                                  tensor([], "u8")], names=["q", "s", "z"])
    with pytest.raises(CudaOpsError, match=r"%q, %s, %z = dynamic_quantize"):
        kernel_source(node)
    c = fn.make_node("cast", [a], [tensor(["batch", 4], "u4")], {"to": elem("u4")}, names=["c"])
    with pytest.raises(CudaOpsError, match=r"%c = cast.*u4"):
        kernel_source(c)


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_library_compiles_for_sm80_and_sm90(tmp_path):
    """One nvcc call (object only: no link) for both archs: the first kernel of every op and
    an attention kernel per dtype (tensor-core and warp prefill, decode). All ~140 kernels take 80+ s per arch on a
    2-core machine, too long for CI; the GPU tests build them all."""
    from qcompiler.codegen.cuda.build import build

    g = _make_graph()
    first: dict = {}
    for n in _all_nodes(g):
        key = (n.op, str(n.operands[0].type.dtype), tuple(sorted(n.attrs.items()))[-3:]) \
            if n.op == "attention" else n.op
        first.setdefault(key, n)
    _, text = library_source(list(first.values()), g.module)
    src = tmp_path / "ops.cu"
    src.write_text(text)
    build(str(src), str(tmp_path / "ops.o"), ["sm_80", "sm_90"], compile_only=True)
    assert (tmp_path / "ops.o").stat().st_size > 0
    # No process-wide (STB_GNU_UNIQUE) statics: the launchers' "attribute set once" flags
    # must stay per library, or a second model's copy of a kernel skips its attribute.
    import shutil
    import subprocess

    if shutil.which("readelf"):
        syms = subprocess.run(["readelf", "-sW", str(tmp_path / "ops.o")], capture_output=True,
                              text=True, check=True).stdout
        assert [ln for ln in syms.splitlines() if " UNIQUE " in ln] == []


# ---- GPU side ------------------------------------------------------------------------------------

def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(bool(gpu_reason()),
                                              reason=f"GPU tests: {gpu_reason()}")(test))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from qcompiler.codegen.cuda import build as nv
    from qcompiler.codegen.cuda.runtime import CudaRuntime

    g = _make_graph()
    d = tmp_path_factory.mktemp("cuda_ops")
    names = build_cuda_ops_library(_all_nodes(g), "sm_90", str(d), module=g.module)
    rt_src = d / "qc_runtime.cu"
    rt_src.write_text(open(nv.RUNTIME_SOURCE).read())
    rt = CudaRuntime(nv.build_cached(str(rt_src), str(d / "qc_runtime.so"), ["sm_90"]))
    return g, names, CudaOpsLibrary(library_path(str(d))), rt


def _random(v, sizes, rng, low):
    t = v.type
    shape = tuple(d if isinstance(d, int) else sizes[d] for d in t.shape)
    dtype = t.dtype.np_dtype
    if t.dtype.kind == "bool":
        return rng.random(shape) < 0.5
    if t.dtype.kind in ("int", "uint"):
        lo, hi = low or (-100, 100)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    if low == "positive":
        x = rng.uniform(0.1, 3.0, size=shape)
    elif low == "mask":  # additive padding mask: 0 or the ONNX -3.4e38, one -inf
        x = np.where(rng.random(shape) < 0.3, -3.4e38, 0.0)
        x.reshape(-1)[0] = -np.inf
    elif isinstance(low, tuple):
        x = rng.uniform(*low, size=shape)
    else:
        x = np.asarray(rng.standard_normal(shape) * 2.0)
        x[x == 0] = 0.5
    x = x.astype(dtype)
    if low == "nan":
        x.reshape(-1)[::3] = np.nan
    return x


def _f64(x):
    return np.asarray(x).astype(np.float64)


def _run(built, node, sizes, rng):
    g, names, lib, rt = built
    args = []
    for v in node.operands:
        if v is None:
            args.append(None)
        elif v.producer is not None:
            args.append(np.asarray(constant_value(g.module, v)))
        else:
            args.append(_random(v, sizes, rng, g.low.get(v.name)))
    want = OP_IMPLS[node.op](node, args, g.module)
    data = [a for a in args if a is not None]
    got = lib.run_numpy(rt, names[node.results[0].name], data, [(w.shape, w.dtype) for w in want])
    return got, want


def assert_ulps(got, want, ulps, what, atol=0.0):
    want = np.asarray(want)
    dtype = want.dtype
    g, w = _f64(got), _f64(want)
    nan = np.isnan(w)
    assert (np.isnan(g) == nan).all(), f"{what}: NaN positions differ"
    spacing = np.spacing(np.abs(w[~nan]).astype(dtype)).astype(np.float64)
    floating = dtype.kind == "f" or dtype.name == "bfloat16"
    tiny = float(ml_dtypes.finfo(dtype).tiny) if floating else 0.0
    err = np.abs(g[~nan] - w[~nan])
    bad = err > ulps * spacing + max(tiny, atol)
    assert not bad.any(), f"{what}: {bad.sum()} elements off by more than {ulps} ulp " \
        f"(e.g. got {g[~nan][bad][:3]} want {w[~nan][bad][:3]})"


def _check(built, key, compare, sizes_list=SIZES):
    g = built[0]
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    for sizes in sizes_list:
        sizes = dict(sizes, kv=sizes["seq"] * 4 + 3)
        for node in g.nodes[key]:
            outs, want = _run(built, node, sizes, rng)
            for got, w in zip(outs, want):
                what = f"{node.op} {node.results[0].type} at {sizes} (seed {seed})"
                assert got.shape == w.shape and got.dtype == w.dtype, what
                compare(got, w, what)


def _elementwise_close(ulps):
    # + - * / max min: computed in f32 and rounded once, exactly as numpy; CUDA's expf/tanhf
    # are within 2 ulp and powf within 4 of numpy's, sigmoid adds a division. gelu's
    # 1 + erf(x) cancels for x << 0 in the reference's formula itself (CUDA's and scipy's
    # double erf differ by an ulp there): an absolute floor of 1e-9 of the largest value.
    def compare(got, w, what):
        scale = float(np.nanmax(np.abs(_f64(w)))) if w.size else 0.0
        assert_ulps(got, w, ulps, what, atol=1e-9 * scale)
    return compare


def _math_close(got, w, what):
    # Each computed in f32 (f64 for the transcendentals) and rounded once, as the reference;
    # CUDA's and numpy's expf/log1pf/tanhf differ by up to 2 ulp, and elu/selu/celu's
    # exp(x) - 1 cancels near 0 in both: an absolute floor of 4 ulp of 1 in the result type.
    eps = float(ml_dtypes.finfo(np.asarray(w).dtype).eps)
    scale = max(float(np.nanmax(np.abs(_f64(w)))) if w.size else 0.0, 1.0)
    assert_ulps(got, w, 4, what, atol=4 * eps * scale)


def _conv_close(got, w, what):
    # sums of up to 3 x 4 x 4 = 48 f32 products in another order: a relative bound of the
    # output's scale, 64 eps of f32, or 4 ulp of the result type
    scale = max(float(np.nanmax(np.abs(_f64(w)))) if w.size else 0.0, 1e-30)
    assert_ulps(got, w, 4, what, atol=64 * float(np.finfo(np.float32).eps) * scale)


def _exact(got, w, what):
    np.testing.assert_array_equal(got, w, err_msg=what)


def _rows_close(got, w, what):
    tol = 2e-5 if w.dtype == np.float32 else (1e-2 if w.dtype.name == "bfloat16" else 2e-3)
    np.testing.assert_allclose(_f64(got), _f64(w), rtol=tol, atol=tol, err_msg=what)


def _matmul_close(got, w, what):
    tol = 1e-5 if w.dtype == np.float32 else (1e-2 if w.dtype.name == "bfloat16" else 2e-3)
    scale = np.abs(_f64(w)).max()
    np.testing.assert_allclose(_f64(got), _f64(w), rtol=tol, atol=tol * scale, err_msg=what)


def _attention_close(got, w, what):
    tol = 2e-5 if w.dtype == np.float32 else (1.6e-2 if w.dtype.name == "bfloat16" else 2e-3)
    np.testing.assert_allclose(_f64(got), _f64(w), rtol=tol, atol=tol, err_msg=what)
    assert np.isfinite(_f64(got)).any(), what


# f16/bf16 caches: each product and sum rounded to the type as numpy; f32 caches: 1 rounding
def _rotary_close(got, w, what):
    assert_ulps(got, w, 1, what)


# each node group and how its results compare with the reference
COMPARE = {"conv": _conv_close, "math": _math_close, "binary": _elementwise_close(0), "pow": _elementwise_close(4),
           "unary": _elementwise_close(4), "fused": _elementwise_close(4), "exact": _exact,
           "rows": _rows_close, "copy": _exact, "matmul": _matmul_close,
           "attention": _attention_close, "rotary": _rotary_close,
           "dedup": lambda got, w, what: assert_ulps(got, w, 0, what)}


@gpu
@pytest.mark.parametrize("key", ["binary", "pow", "unary", "math", "fused"])
def test_elementwise_few_ulp(built, key):
    _check(built, key, COMPARE[key])


@gpu
def test_integer_bool_and_cast_ops_exact(built):
    _check(built, "exact", COMPARE["exact"])


@gpu
def test_float_convolutions(built):
    _check(built, "conv", COMPARE["conv"])


@gpu
def test_row_reductions(built):
    _check(built, "rows", COMPARE["rows"])


@gpu
def test_data_movement_exact(built):
    _check(built, "copy", COMPARE["copy"])


@gpu
def test_matmul(built):
    _check(built, "matmul", COMPARE["matmul"])


@gpu
def test_attention_prefill_decode_gqa_causal_mask(built):
    _check(built, "attention", COMPARE["attention"])


@gpu
def test_rotary_embedding(built):
    _check(built, "rotary", COMPARE["rotary"])


# ---- host emulation (CI): the same kernels' source run on the CPU ------------------------------


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from cuda_emulation import EmulatedLibrary, build_emulated

    g = _make_graph()
    names, texts = {}, {}
    for node in _all_nodes(g):
        symbol, text = kernel_source(node, g.module)
        names[node.results[0].name] = symbol
        texts[symbol] = text
    lib = build_emulated([texts[k] for k in sorted(texts)], tmp_path_factory.mktemp("emulated"))
    return g, names, EmulatedLibrary(lib), None


@pytest.mark.parametrize("key", ["binary", "pow", "unary", "math", "conv", "fused", "exact",
                                 "rows", "copy", "matmul", "attention", "rotary", "dedup"])
def test_op_kernels_in_host_emulation(emulated, key):
    _check(emulated, key, COMPARE[key])


@gpu
def test_identical_nodes_share_one_kernel_on_gpu(built):
    _check(built, "dedup", COMPARE["dedup"])
