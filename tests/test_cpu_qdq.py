"""The CPU quantization kernels (codegen/cpu/qdq.py, codegen/cpu/qlinear.py) against the
reference implementation of the same node, bit for bit.

quantize / dequantize in every scheme the ONNX cases use (per tensor, per channel on any axis,
blocked with a short last block, implied / absent zero points, 2- to 16-bit integer codes,
float8 / float4 codes, f16 / bf16 values and scales), dynamic_quantize, matmul_integer and
qlinear_matmul. One library for the module (build time matters on 2 cores); each test runs
its kernels on fresh random inputs (never all zeros: ties to even, saturation, NaN and +-inf
included) at the symbolic size ``batch`` = 7 and 13, and compares with
``qcompiler.runtime.reference.OP_IMPLS``: integer and float8 codes equal, floats equal bit
for bit (NaN where the reference has NaN).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from qcompiler.codegen.cpu.errors import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import OpsLibrary, build_ops_library, primfunc_for  # noqa: E402
from qcompiler.codegen.cpu.runtime import aligned_empty  # noqa: E402
from qcompiler.ir.core import Function, Module, constant_node, constant_value  # noqa: E402
from qcompiler.ir.types import QuantScheme, elem, tensor  # noqa: E402
from qcompiler.runtime.numerics import is_narrow_float  # noqa: E402
from qcompiler.runtime.reference import OP_IMPLS  # noqa: E402

B = "batch"
SIZES = (7, 13)
# scales: powers of two (x / scale exact: ties to even happen) and others
SCALES = (2.0 ** -3, 2.0 ** -6, 0.5, 0.37, 1.7, 0.011)


def scheme(codes, granularity="tensor", axis=None, block=None, zp=True, scale="f32",
           implied=None):
    has_zp = zp and not is_narrow_float(elem(codes))
    return QuantScheme(elem(codes), symmetric=not has_zp,
                       zero_point_type=elem(codes) if has_zp else None,
                       scale_type=elem(scale), granularity=granularity, axis=axis,
                       block_size=block, implied_zero_point=implied)


class Graph:
    def __init__(self):
        self.module = Module("qdq")
        self.fn = self.module.add_function(Function("main"))
        self.nodes: dict = {}

    def arg(self, shape, dtype):
        return self.fn.add_arg(self.fn.fresh_name("a"), tensor(shape, dtype))

    def const(self, array):
        return constant_node(self.fn, self.module, np.asarray(array)).result

    def add(self, key, op, operands, result_types, attrs=None):
        node = self.fn.make_node(op, operands, [tensor(*t) for t in result_types], attrs)
        self.nodes.setdefault(key, []).append(node)
        return node

    def qdq(self, key, op, shape, s: QuantScheme, values="f32", zp="arg", saturate=1):
        """A quantize (x: ``values``) or dequantize (to ``values``) node of scheme ``s``;
        ``zp``: "arg" (a run-time zero point, when the scheme has one), a constant array, or
        None."""
        sshape = s.scale_shape(tuple(shape))
        x = self.arg(shape, values if op == "quantize" else s.dtype.name)
        operands = [x, self.arg(sshape, s.scale_type.name)]
        if isinstance(zp, np.ndarray):
            operands.append(self.const(zp))
        elif zp == "arg" and (s.zero_point_type is not None or is_narrow_float(s.dtype)):
            operands.append(self.arg(sshape, s.dtype.name))
        if op == "quantize":
            return self.add(key, op, operands, [(shape, s.dtype.name)],
                            {"scheme": s, "saturate": saturate})
        return self.add(key, op, operands, [(shape, values)], {"scheme": s, "out": elem(values)})


def _make_graph() -> Graph:
    g = Graph()
    for op in ("quantize", "dequantize"):
        key = op
        g.qdq(key, op, [B, 13], scheme("i8"))
        g.qdq(key, op, [B, 5, 7], scheme("u8", "channel", axis=1))
        g.qdq(key, op, [3, 5, 7], scheme("i16", "channel", axis=-1))
        g.qdq(key, op, [B, 9], scheme("u16", "channel", axis=0))
        g.qdq(key, op, [B, 6, 5], scheme("i8", "channel", axis=-2, scale="f16"), values="f16")
        # blocked, the last block short (10 = 4 + 4 + 2, 7 = 3 + 3 + 1, 8 = 3 + 3 + 2)
        g.qdq(key, op, [3, 10, 5], scheme("i4", "group", axis=1, block=4))
        g.qdq(key, op, [B, 7], scheme("u4", "group", axis=-1, block=3, zp=False))
        g.qdq(key, op, [8, B], scheme("i4", "group", axis=0, block=3))
        # MatMulNBits' implied zero point (no zero-point tensor)
        g.qdq(key, op, [B, 10], scheme("u4", "group", axis=1, block=4, zp=False, implied=8))
        g.qdq(key, op, [B, 13], scheme("i2", zp=False))
        g.qdq(key, op, [4, B], scheme("u2", "channel", axis=-2))
        g.qdq(key, op, [B, 13], scheme("u8", scale="bf16"), values="bf16")
        g.qdq(key, op, [], scheme("i8"))
    # f16 x with an f32 scale: the quotient in float32 (numpy's promotion)
    g.qdq("quantize", "quantize", [B, 13], scheme("u8"), values="f16")
    g.qdq("dequantize", "dequantize", [B, 13], scheme("u16", scale="bf16"), values="f32")

    # float8 / float4 codes: saturating or not, with a run-time zero point (zeros), a constant
    # one, none
    for t in ("f8e4m3fn", "f8e5m2", "f8e4m3fnuz", "f8e5m2fnuz", "f4e2m1"):
        for sat in ((1, 0) if t != "f4e2m1" else (1,)):
            g.qdq("quantize_f8", "quantize", [B, 13], scheme(t), saturate=sat)
        g.qdq("dequantize_f8", "dequantize", [B, 13], scheme(t))
    zeros = np.zeros((), elem("f8e4m3fn").np_dtype)
    g.qdq("quantize_f8", "quantize", [B, 6], scheme("f8e4m3fn"), zp=zeros)
    g.qdq("quantize_f8", "quantize", [6, B], scheme("f8e5m2", "channel", axis=0, scale="f16"),
          values="f16", zp=None)
    g.qdq("quantize_f8", "quantize", [B, 5], scheme("f4e2m1", "group", axis=1, block=2),
          values="bf16", zp=None)
    g.qdq("dequantize_f8", "dequantize", [B, 6], scheme("f8e4m3fn"), zp=zeros)
    g.qdq("dequantize_f8", "dequantize", [6, B],
          scheme("f8e4m3fn", "channel", axis=0, scale="f16"), values="f16", zp=None)
    g.qdq("dequantize_f8", "dequantize", [B, 5], scheme("f8e5m2", "group", axis=1, block=2,
                                                        scale="bf16"), values="bf16", zp=None)

    # matmul_integer: per-row zero point of a ([M] = [5]), per-column of b; batch broadcast
    # without zero points; N = 64 (the row-blocked schedule)
    g.add("matmul_integer", "matmul_integer",
          [g.arg([B, 5, 7], "u8"), g.arg([7, 9], "u8"), g.arg([5], "u8"), g.arg([9], "u8")],
          [([B, 5, 9], "i32")])
    g.add("matmul_integer", "matmul_integer",
          [g.arg([2, B, 3, 4], "i8"), g.arg([B, 4, 6], "i8")], [([2, B, 3, 6], "i32")])
    g.add("matmul_integer", "matmul_integer",
          [g.arg([B, 11], "u8"), g.arg([11, 64], "i8"), g.arg([1], "u8"), g.arg([], "i8")],
          [([B, 64], "i32")])

    # qlinear_matmul: (a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp)
    def qlinear(a_shape, b_shape, out_shape, codes, scale, a_s=(1,), b_s=(1,), y_s=(1,)):
        g.add("qlinear_matmul", "qlinear_matmul",
              [g.arg(a_shape, codes), g.arg(a_s, scale), g.arg(a_s, codes),
               g.arg(b_shape, codes), g.arg(b_s, scale), g.arg(b_s, codes),
               g.arg(y_s, scale), g.arg(y_s, codes)], [(out_shape, codes)])

    qlinear([B, 4, 7], [7, 5], [B, 4, 5], "u8", "f32")
    qlinear([B, 7], [7, 5], [B, 5], "i8", "f16", b_s=(5,))
    qlinear([4, 7], [B, 7, 5], [B, 4, 5], "i8", "f32", a_s=(4,), b_s=(5,))  # per row, column
    qlinear([2, B, 4, 6], [2, 1, 6, 3], [2, B, 4, 3], "u8", "bf16")
    qlinear([3, 70], [70, 64], [3, 64], "u8", "f32")

    # dynamic_quantize (x, its range: see _dq_input)
    for shape, dtype in (([B, 13], "f32"), ([B, 3, 5], "f32"), ([B, 9], "f16"), ([], "f32")):
        x = g.arg(shape, dtype)
        g.add("dynamic_quantize", "dynamic_quantize", [x],
              [(shape, "u8"), ((), dtype), ((), "u8")])
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    g = _make_graph()
    nodes = [n for ns in g.nodes.values() for n in ns]
    path = str(tmp_path_factory.mktemp("qdq") / "ops.so")
    names = build_ops_library(nodes, "cpu", path, module=g.module)
    return g, names, OpsLibrary(path)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _shape(v, batch):
    return tuple(batch if d == B else d for d in v.type.shape)


def _codes(et, shape, rng):
    """Random codes over the whole range of ``et`` (float8 / float4: every bit pattern,
    NaN and inf included)."""
    if is_narrow_float(et):
        return rng.integers(0, 1 << et.bits, size=shape).astype(np.uint8).view(et.np_dtype)
    lo, hi = et.int_range()
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(et.np_dtype)


def _scales(shape, dtype, rng):
    return rng.choice(SCALES, size=shape).astype(dtype)


def _specials(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(-1)
    if flat.size >= 8:
        flat[::11] = np.nan
        flat[1::13] = np.inf
        flat[2::17] = -np.inf
        flat[3::19] = 1e30 if x.dtype == np.float32 else 6e4
    return x


def _qdq_inputs(node, batch, rng, module):
    s = node.attrs["scheme"]
    et = s.dtype
    x_v, scale_v = node.operands[0], node.operands[1]
    scale = _scales(_shape(scale_v, batch), scale_v.type.dtype.np_dtype, rng)
    args = [None, scale]
    for v in node.operands[2:]:
        c = constant_value(module, v)
        if c is not None:
            args.append(np.asarray(c))
        elif is_narrow_float(et):  # ONNX's zero point of float codes: 0
            args.append(np.zeros(_shape(v, batch), v.type.dtype.np_dtype))
        else:
            args.append(_codes(v.type.dtype, _shape(v, batch), rng))
    shape = _shape(x_v, batch)
    if node.op == "dequantize":
        args[0] = _codes(et, shape, rng)
        return args
    # quantize: x = (code + fraction) * scale over and beyond the code range, with halves
    # (ties to even), plus NaN / +-inf / huge values
    from qcompiler.runtime.numerics import expand_scale

    full = expand_scale(scale, shape, s).astype(np.float64)
    if is_narrow_float(et):
        q = rng.standard_normal(shape) * np.exp2(rng.integers(-10, 17, size=shape))
    else:
        lo, hi = et.int_range()
        q = rng.integers(lo - 20, hi + 20, size=shape, endpoint=True) + rng.choice(
            [0.0, 0.5, -0.5, 0.25, 0.73, 1.5], size=shape)
    args[0] = _specials(np.asarray(q * full).astype(x_v.type.dtype.np_dtype))
    return args


def _matmul_inputs(node, batch, rng, module):
    args = []
    for i, v in enumerate(node.operands):
        shape = _shape(v, batch)
        if v.type.dtype.kind in ("int", "uint"):
            args.append(_codes(v.type.dtype, shape, rng))
        elif i == 6:  # y_scale: results across the whole code range and beyond
            args.append(rng.choice([2.0 ** 5, 2.0 ** 7, 37.5, 300.0], size=shape)
                        .astype(v.type.dtype.np_dtype))
        else:
            args.append(rng.choice([0.5, 0.25, 0.37, 1.3], size=shape)
                        .astype(v.type.dtype.np_dtype))
    return args


def _dq_input(node, batch, rng, kind):
    v = node.operands[0]
    shape = _shape(v, batch)
    x = rng.standard_normal(shape) * 3.0
    if kind == "positive":
        x = np.abs(x) + 0.5
    elif kind == "negative":
        x = -np.abs(x) - 0.5
    x = np.asarray(x).astype(v.type.dtype.np_dtype)
    if kind == "nan" and x.size:
        x.reshape(-1)[x.size // 2] = np.nan
    if kind == "inf" and x.size:
        x.reshape(-1)[x.size // 3] = -np.inf
    return [x]


def _aligned_copy(a):
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _run(built, node, args):
    g, names, lib = built
    want = OP_IMPLS[node.op](node, args, g.module)
    outs = [aligned_empty(w.shape, w.dtype) for w in want]
    for o in outs:  # garbage a kernel must overwrite
        o.reshape(-1).view(np.uint8)[...] = 0xA5
    kernel_args = [a for a, v in zip(args, node.operands) if v is not None]
    lib[names[node.results[0].name]](*[_aligned_copy(a) for a in kernel_args], *outs)
    return outs, want


def assert_bits_equal(got, want, what):
    """Codes equal; floats equal bit for bit, NaN where the reference has NaN (any NaN)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if want.dtype.kind in "iub" or want.dtype.itemsize == 1:  # integer / float8 codes
        np.testing.assert_array_equal(got.view(np.uint8) if want.dtype.itemsize == 1 else got,
                                      want.view(np.uint8) if want.dtype.itemsize == 1 else want,
                                      err_msg=what)
        return
    gf, wf = got.astype(np.float64), want.astype(np.float64)
    nan = np.isnan(wf)
    np.testing.assert_array_equal(np.isnan(gf), nan, err_msg=f"{what}: NaN positions")
    bits = {2: np.uint16, 4: np.uint32}[want.dtype.itemsize]
    np.testing.assert_array_equal(got.view(bits)[~nan], want.view(bits)[~nan], err_msg=what)


def _check(built, key, inputs, seeds=(0, 1)):
    g = built[0]
    count = 0
    for seed in seeds:
        for batch in SIZES:
            rng = np.random.default_rng(seed * 100 + batch)
            for node in g.nodes[key]:
                args = inputs(node, batch, rng, g.module)
                got, want = _run(built, node, args)
                for r, gv, wv in zip(node.results, got, want):
                    assert_bits_equal(gv, wv, f"{node.op} {r.type} "
                                              f"{node.attrs.get('scheme', '')} batch={batch}")
                count += 1
    return count


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["quantize", "dequantize", "quantize_f8", "dequantize_f8"])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning",
                            "ignore:overflow:RuntimeWarning")
def test_quantize_dequantize_bit_exact(built, key):
    assert _check(built, key, _qdq_inputs) == 4 * len(built[0].nodes[key])


def test_quantize_saturates_and_rounds_half_to_even(built):
    """The specials the random inputs mix in, spelled out on one per-tensor i8 node."""
    g = built[0]
    node = g.nodes["quantize"][0]  # [batch, 13] f32 -> i8, scale and zero point
    x = np.full((7, 13), 0.75, np.float32)
    x[0, :8] = [0.625, -0.625, 0.875, np.nan, np.inf, -np.inf, 1e30, -3.0]
    got, want = _run(built, node, [x, np.array(0.25, np.float32), np.array(-3, np.int8)])
    # 2.5 -> 2, -2.5 -> -2, 3.5 -> 4 (then - 3); NaN -> 0 (+ zp); +-inf, huge: the ends
    assert got[0][0, :8].tolist() == [-1, -5, 1, -3, 127, -128, 127, -15]
    np.testing.assert_array_equal(got[0], want[0])


def test_matmul_integer_bit_exact(built):
    assert _check(built, "matmul_integer", _matmul_inputs) > 0


def test_qlinear_matmul_bit_exact(built):
    assert _check(built, "qlinear_matmul", _matmul_inputs) > 0


@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "nan", "inf"])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_dynamic_quantize_bit_exact(built, kind):
    """Mixed signs, the min-adjusted (all positive) and max-adjusted (all negative) ranges;
    a NaN (scale NaN, zero point 255, y 0) and -inf (scale inf) as the reference gives."""
    assert _check(built, "dynamic_quantize",
                  lambda node, batch, rng, module: _dq_input(node, batch, rng, kind)) > 0


@pytest.mark.parametrize("why, make", [
    ("nf4", lambda g: g.qdq("x", "dequantize", [4, 8], QuantScheme(elem("nf4")))),
    ("must be 0", lambda g: g.qdq("x", "quantize", [4, 8], scheme("f8e4m3fn"),
                                  zp=np.ones((), elem("f8e4m3fn").np_dtype))),
    ("i32", lambda g: g.qdq("x", "quantize", [4, 8], scheme("i32"))),
    ("f64", lambda g: g.qdq("x", "quantize", [4, 8], scheme("i8"), values="f64")),
    ("1-D", lambda g: g.add("x", "matmul_integer", [g.arg([8], "u8"), g.arg([8, 3], "u8")],
                            [([3], "i32")])),
])
def test_unsupported_cases_name_the_node(why, make):
    g = Graph()
    node = make(g)
    with pytest.raises(CPUBackendError, match=why) as e:
        primfunc_for(node, module=g.module)
    assert f"%{node.results[0].name} = {node.op}" in str(e.value)


def test_act_order_dequantize_runs_on_host():
    g = Graph()
    s = QuantScheme(elem("u4"), granularity="group", axis=0, block_size=4, act_order=True)
    node = g.add("x", "dequantize", [g.arg([8, 3], "u4"), g.arg([2, 3], "f32"), None,
                                     g.arg([8], "i32")], [([8, 3], "f32")],
                 {"scheme": s, "out": elem("f32")})
    with pytest.raises(CPUBackendError, match="g_idx"):
        primfunc_for(node, module=g.module)
