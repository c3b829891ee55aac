"""The CPU pool, float conv and conv_transpose kernels against the reference (issue #13).

Every node below is built into one op library (through ``primfunc_for``'s dispatch, as the
backend builds them: build time matters on 2 cores) and run on fresh random inputs (negative
values, never zeros) at odd shapes, symbolic batch sizes 1 and 3 where the batch is a symbol;
results are compared with ``qcompiler.runtime.reference.OP_IMPLS`` of the same node. Max pooling
and its indices are exact; sums are float32 in both, in another order: a relative tolerance
of ~1e-5 on the size of the terms.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

pytest.importorskip("tvm")

from qcompiler.codegen.cpu.errors import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import OpsLibrary, build_ops_library, primfunc_for  # noqa: E402
from qcompiler.codegen.cpu.runtime import aligned_empty  # noqa: E402
from qcompiler.ir.core import Function, Module  # noqa: E402
from qcompiler.ir.ops import infer_types  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402
from qcompiler.runtime.reference import OP_IMPLS  # noqa: E402

BATCHES = (1, 3)  # sizes of the "batch" symbol


def _pool_attrs(kind, kernel, strides=None, pads=None, dilations=None, ceil_mode=0,
                count_include_pad=0, p=2, indices=0, storage_order=0):
    nsp = len(kernel)
    a = {"kind": kind, "kernel_shape": list(kernel), "strides": strides or [1] * nsp,
         "pads": pads or [0] * (2 * nsp), "dilations": dilations or [1] * nsp,
         "ceil_mode": ceil_mode, "count_include_pad": count_include_pad, "p": p}
    if indices:
        a.update(indices=1, storage_order=storage_order)
    return a


# (id, x shape, x dtype, attrs)
POOLS = [
    ("max1d", ["batch", 3, 11], "f32", _pool_attrs("max", [3], [2], [1, 0])),
    ("avg1d_symbolic_channels", ["batch", "channels", 9], "f32",  # both symbols 1, then 3
     _pool_attrs("average", [2], [2], [1, 0], ceil_mode=1)),
    ("max2d_dil_ceil", [2, 3, 11, 9], "f32",
     _pool_attrs("max", [3, 2], [2, 2], [1, 0, 0, 1], [2, 1], ceil_mode=1)),
    ("max3d", ["batch", 2, 5, 6, 7], "f32", _pool_attrs("max", [2, 3, 2], [1, 2, 2],
                                                       [0, 1, 1, 1, 0, 0], [2, 1, 1])),
    ("max2d_i8", [2, 5, 7, 6], "i8", _pool_attrs("max", [3, 3], [2, 2], [1, 1, 1, 1])),
    ("max2d_u8_ceil", [1, 4, 8, 8], "u8", _pool_attrs("max", [3, 3], [2, 2], ceil_mode=1)),
    # integer max: separable with asymmetric pads (rows clamped into x), and dilated (a
    # padded copy of the window's rows), with and without a border
    ("max2d_i8_asym", [2, 3, 10, 9], "i8", _pool_attrs("max", [2, 3], [2, 1], [1, 0, 0, 2])),
    ("max2d_u8_dilated", [1, 3, 9, 9], "u8", _pool_attrs("max", [3, 3], [1, 1], [2, 2, 2, 2],
                                                        [2, 2])),
    ("max2d_i8_dilated_nopad", [1, 2, 9, 8], "i8", _pool_attrs("max", [2, 2], [2, 1],
                                                              dilations=[2, 3])),
    ("max2d_f16", [1, 3, 9, 10], "f16", _pool_attrs("max", [3, 3], [2, 1], [1, 1, 0, 2])),
    ("max1d_indices", [2, 3, 13], "f32", _pool_attrs("max", [4], [3], [2, 1], [1],
                                                     indices=1)),
    ("max2d_indices", ["batch", 3, 7, 9], "f32",
     _pool_attrs("max", [3, 2], [2, 2], [1, 1, 1, 0], [1, 2], ceil_mode=1, indices=1)),
    ("max2d_indices_colmajor", [2, 2, 6, 5], "f32",
     _pool_attrs("max", [2, 3], [1, 2], [0, 1, 1, 1], indices=1, storage_order=1)),
    ("max3d_indices_i8", [1, 2, 4, 5, 6], "i8",
     _pool_attrs("max", [2, 2, 3], [2, 1, 2], [1, 0, 1, 0, 1, 1], indices=1)),
    ("avg1d", [2, 3, 12], "f32", _pool_attrs("average", [3], [2], [1, 1])),
    ("avg2d_ceil_excl", ["batch", 3, 10, 11], "f32",
     _pool_attrs("average", [3, 3], [2, 2], [1, 0, 0, 1], ceil_mode=1)),
    ("avg2d_ceil_incl", [2, 3, 10, 11], "f32",
     _pool_attrs("average", [3, 3], [2, 2], [1, 0, 0, 1], ceil_mode=1, count_include_pad=1)),
    ("avg3d_dil_incl", [1, 2, 7, 6, 5], "f32",
     _pool_attrs("average", [2, 2, 2], [1, 2, 1], [1, 1, 0, 0, 1, 1], [2, 1, 2],
                 count_include_pad=1)),
    ("avg2d_f16", [2, 3, 8, 7], "f16", _pool_attrs("average", [2, 3], [2, 2], [0, 1, 1, 1])),
    ("avg2d_bf16", [2, 3, 7, 8], "bf16", _pool_attrs("average", [3, 3], [2, 2], [1, 1, 1, 1])),
    ("avg2d_i32", [2, 3, 6, 7], "i32", _pool_attrs("average", [3, 2], [1, 2], [1, 0, 1, 1])),
    ("lrn_window", [2, 1, 7, 4, 5], "f32",  # the ONNX frontend's LRN: a channel window
     _pool_attrs("average", [3, 1, 1], [1, 1, 1], [1, 0, 0, 1, 0, 0], count_include_pad=1)),
    ("lp1d_p3", [2, 3, 11], "f32", _pool_attrs("lp", [3], [2], [1, 1], p=3)),
    ("lp2d_p2", ["batch", 4, 9, 8], "f32",
     _pool_attrs("lp", [3, 2], [2, 1], [1, 0, 1, 1], [1, 2], p=2)),
    ("lp2d_p1_f16", [1, 3, 6, 7], "f16", _pool_attrs("lp", [2, 2], [2, 2], p=1)),
    ("lp3d", [1, 2, 5, 4, 6], "f32", _pool_attrs("lp", [2, 2, 3], [1, 2, 2], ceil_mode=1)),
]


class Graph:
    def __init__(self):
        self.module = Module("pool_conv")
        self.fn = self.module.add_function(Function("main"))
        self.nodes: dict = {}

    def add(self, key, op, operands, attrs):
        """A node whose result types the op's type inference gives."""
        args = [None if o is None else self.fn.add_arg(self.fn.fresh_name("a"), tensor(*o))
                for o in operands]
        types = infer_types(op, [None if v is None else v.type for v in args], attrs,
                            [None] * len(args))
        node = self.fn.make_node(op, args, types, attrs)
        self.nodes[key] = node
        return node


def _conv_attrs(nsp, strides=None, pads=None, dilations=None, group=1, output_padding=None,
                transpose=False):
    a = {"strides": strides or [1] * nsp, "pads": pads or [0] * (2 * nsp),
         "dilations": dilations or [1] * nsp, "group": group}
    if transpose:
        a["output_padding"] = output_padding or [0] * nsp
    return a


# (id, [(x shape, dtype), (w shape, dtype), bias (shape, dtype) or None], attrs)
CONVS = [
    ("conv1d_group_dil", [(["batch", 4, 13], "f32"), ([6, 2, 3], "f32"), ([6], "f32")],
     _conv_attrs(1, [2], [1, 2], [2], group=2)),
    ("conv2d_asym_pads", [([2, 3, 9, 11], "f32"), ([5, 3, 3, 3], "f32"), None],
     _conv_attrs(2, [2, 1], [1, 0, 2, 1], [1, 2])),
    ("conv2d_depthwise", [(["batch", 4, 8, 8], "f32"), ([4, 1, 3, 3], "f32"), ([4], "f32")],
     _conv_attrs(2, pads=[1, 1, 1, 1], group=4)),
    ("conv2d_1x1_wide", [([2, 16, 5, 37], "f32"), ([8, 16, 1, 1], "f32"), ([8], "f32")],
     _conv_attrs(2)),
    ("conv3d", [([1, 2, 5, 6, 7], "f32"), ([4, 2, 2, 3, 2], "f32"), ([4], "f32")],
     _conv_attrs(3, [1, 2, 1], [1, 0, 1, 0, 1, 1], [2, 1, 1])),
    ("conv2d_f16", [([1, 3, 7, 6], "f16"), ([4, 3, 2, 2], "f16"), ([4], "f16")],
     _conv_attrs(2, pads=[0, 1, 1, 0])),
    ("conv2d_bf16", [([1, 2, 6, 5], "bf16"), ([3, 2, 3, 3], "bf16"), ([3], "bf16")],
     _conv_attrs(2, [1, 2], [1, 1, 1, 1])),
    ("conv2d_i32", [([2, 3, 6, 7], "i32"), ([4, 3, 3, 3], "i32"), None],  # ConvInteger's
     _conv_attrs(2, pads=[1, 1, 1, 1])),
    # loops of extent 1 (a single output column, a single-term sum): CausalConvWithState's
    # decode step and kernel size 1
    ("conv1d_width1_depthwise", [(["batch", 4, 3], "f32"), ([4, 1, 3], "f32"), ([4], "f32")],
     _conv_attrs(1, group=4)),
    ("conv1d_k1_depthwise", [([2, 4, 5], "f32"), ([4, 1, 1], "f32"), None],
     _conv_attrs(1, group=4)),
]
CONV_TRANSPOSES = [
    ("convT1d_group", [(["batch", 4, 5], "f32"), ([4, 3, 3], "f32"), None],
     _conv_attrs(1, [2], [1, 0], group=2, output_padding=[1], transpose=True)),
    ("convT2d_stride_dil_pads", [([2, 3, 4, 5], "f32"), ([3, 2, 3, 3], "f32"), ([2], "f32")],
     _conv_attrs(2, [3, 2], [1, 2, 0, 1], [1, 2], output_padding=[2, 1], transpose=True)),
    ("convT2d_group3", [([1, 6, 3, 4], "f32"), ([6, 2, 2, 2], "f32"), ([6], "f32")],
     _conv_attrs(2, group=3, transpose=True)),
    ("convT3d", [([1, 2, 3, 4, 3], "f32"), ([2, 3, 2, 2, 2], "f32"), ([3], "f32")],
     _conv_attrs(3, [2, 1, 2], transpose=True)),
    ("convT2d_f16", [([1, 2, 4, 4], "f16"), ([2, 2, 3, 3], "f16"), None],
     _conv_attrs(2, [2, 2], [1, 1, 1, 1], transpose=True)),
    ("convT1d_k1_depthwise", [([2, 3, 4], "f32"), ([3, 1, 1], "f32"), ([3], "f32")],
     _conv_attrs(1, [2], group=3, transpose=True)),
]


def _graph() -> Graph:
    g = Graph()
    for key, shape, dtype, attrs in POOLS:
        g.add(key, "pool", [(shape, dtype)], attrs)
    for key, operands, attrs in CONVS:
        g.add(key, "conv", operands, attrs)
    for key, operands, attrs in CONV_TRANSPOSES:
        g.add(key, "conv_transpose", operands, attrs)
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    g = _graph()
    path = str(tmp_path_factory.mktemp("pool_conv") / "ops.so")
    names = build_ops_library(list(g.nodes.values()), "cpu", path, module=g.module)
    return g, names, OpsLibrary(path)


def _random(t, batch, rng):
    shape = tuple(d if isinstance(d, int) else batch for d in t.shape)
    dtype = t.dtype.np_dtype
    if t.dtype.kind in ("int", "uint"):
        info = np.iinfo(dtype)
        lo, hi = max(int(info.min), -1000), min(int(info.max), 1000)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    x = rng.standard_normal(shape) * 2.0
    x[x == 0] = 0.5
    return x.astype(dtype)


def _inputs(node, batch, rng, ties=False, nans=False):
    args = [None if v is None else _random(v.type, batch, rng) for v in node.operands]
    if ties:  # few distinct values: equal maxima in a window (argmax takes the first)
        args[0] = (np.round(args[0].astype(np.float64) / 3.0)).astype(args[0].dtype)
    if nans:  # the reference's pools skip NaN inputs as they skip padding
        args[0].reshape(-1)[::7] = np.nan
    return args


def _run(built, key, args):
    """(kernel results, reference results) of node ``key`` on ``args``."""
    g, names, lib = built
    node = g.nodes[key]
    want = OP_IMPLS[node.op](node, args, g.module)
    outs = []
    for w in want:
        o = aligned_empty(w.shape, w.dtype)
        o[...] = 7  # a value the kernel must overwrite
        outs.append(o)
    kernel_args = []
    for a in args:
        if a is not None:
            copy = aligned_empty(a.shape, a.dtype)
            copy[...] = a
            kernel_args.append(copy)
    lib[names[node.results[0].name]](*kernel_args, *outs)
    return outs, want


def _magnitude(built, key, args):
    """The reference on |inputs|: the sum of the terms' magnitudes behind each result."""
    g = built[0]
    node = g.nodes[key]
    absolute = [None if a is None else np.abs(a.astype(np.float64)) for a in args]
    return np.asarray(OP_IMPLS[node.op](node, absolute, g.module)[0], np.float64)


def assert_sum_close(got, want, magnitude, terms: int, what: str):
    """|got - want| within float32's error bound of a ``terms``-long sum in another order
    (terms x 2^-23 of the magnitude of its terms), plus an ulp of the result type (an f16
    result rounded from slightly different f32 sums)."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    nan = np.isnan(w)
    assert (np.isnan(g) == nan).all(), f"{what}: NaN positions differ"
    ulp = np.spacing(np.abs(want).astype(want.dtype)).astype(np.float64)
    bound = terms * 2.0 ** -23 * magnitude + ulp
    err = np.abs(g - w)
    bad = (err > bound) & ~nan
    assert not bad.any(), f"{what}: {bad.sum()} results off (worst {(err / bound)[bad].max():.1f}" \
        f" x the bound; got {g[bad][:3]}, want {w[bad][:3]})"


def _seed(key: str) -> int:
    return zlib.crc32(key.encode())


@pytest.mark.parametrize("case", POOLS, ids=[c[0] for c in POOLS])
def test_pool_matches_reference(built, case):
    key, shape, dtype, attrs = case
    node = built[0].nodes[key]
    rng = np.random.default_rng(_seed(key))
    taps = int(np.prod(attrs["kernel_shape"]))
    variants = [{}, {"ties": True}] if attrs["kind"] == "max" else [{}]
    if dtype.startswith("f"):
        variants.append({"nans": True})
    for batch in BATCHES if "batch" in shape else (None,):
        for variant in variants:
            args = _inputs(node, batch, rng, **variant)
            outs, want = _run(built, key, args)
            what = f"{key} batch={batch} {variant}"
            assert [o.shape for o in outs] == [w.shape for w in want], what
            assert [o.dtype for o in outs] == [w.dtype for w in want], what
            if attrs["kind"] == "max" or want[0].dtype.kind in "iu":
                for got, w in zip(outs, want):  # max, its indices and integer means: exact
                    np.testing.assert_array_equal(got, w, err_msg=what)
            else:
                clean = [np.nan_to_num(a, nan=0.0) for a in args]  # skipped either way
                assert_sum_close(outs[0], want[0], _magnitude(built, key, clean), taps, what)


@pytest.mark.parametrize("case", CONVS + CONV_TRANSPOSES,
                         ids=[c[0] for c in CONVS + CONV_TRANSPOSES])
def test_conv_matches_reference(built, case):
    key, operands, attrs = case
    node = built[0].nodes[key]
    rng = np.random.default_rng(_seed(key))
    w_shape = operands[1][0]
    # terms per result: the input channels of a group times the kernel's taps
    cg = w_shape[1] if node.op == "conv" else w_shape[0] // attrs["group"]
    terms = cg * int(np.prod(w_shape[2:])) + 1
    for batch in BATCHES if "batch" in operands[0][0] else (None,):
        args = _inputs(node, batch, rng)
        (got,), (want,) = _run(built, key, args)
        what = f"{key} batch={batch}"
        assert got.shape == want.shape and got.dtype == want.dtype, what
        if want.dtype.kind in "iu":
            np.testing.assert_array_equal(got, want, err_msg=what)
        else:
            assert_sum_close(got, want, _magnitude(built, key, args), terms, what)


def test_unsupported_cases_raise_naming_the_node():
    """What has no kernel raises CPUBackendError naming the node, op and shape or type (the
    node then runs on the host)."""
    g = Graph()
    cases = [
        (g.add("p", "pool", [([2, 3, "h", 8], "f32")], _pool_attrs("max", [2, 2])),
         r"= pool: .*static spatial dims, not \(2, 3, 'h', 8\)"),
        (g.add("lp", "pool", [([2, 3, 8], "i32")], _pool_attrs("lp", [2])),
         r"= pool: lp pooling of i32"),
        (g.add("c", "conv", [([2, "c", 8], "f32"), ([4, 2, 3], "f32"), None], _conv_attrs(1)),
         r"= conv: .*static channels.*x \(2, 'c', 8\)"),
        (g.add("t", "conv_transpose", [([2, 4, 8], "i32"), ([4, 2, 3], "i32"), None],
               _conv_attrs(1, transpose=True)),
         r"= conv_transpose: i32 has no CPU kernel"),
    ]
    for node, pattern in cases:
        with pytest.raises(CPUBackendError, match=f"%{node.results[0].name} {pattern}"):
            primfunc_for(node)
