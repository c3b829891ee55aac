"""Scalar semantics of the QIR elementwise ops as TIR expressions (one element at a time).

Each function takes the loaded operand values (in their storage dtypes) and returns the value
in the op's result dtype, with the reference runtime's numerics:

- float math on f16/bf16 is done in float32 and rounded once per op (numpy's f16 ufuncs do
  the same for + - * /; for exp/tanh/... numpy's own f16 loops are within an ulp of it);
- erf is computed in float64 and rounded once, as the reference does
  (erf is Cephes' double erf/erfc written out here, ``erf_f64``, so that it vectorizes; rounded
  to float32 it equals the double libm ``erf``, which scipy's matches; LLVM's float ``erff``
  is 1 ulp off); gelu of f16/bf16/f32 in float32 (``gelu_erf_f32`` within 6 ulp of the
  reference, ``gelu_tanh_f32`` within 2);
- integer division truncates toward zero; division by zero gives 0 (numpy's result, and no
  SIGFPE);
- max/min/relu propagate NaN (numpy maximum/minimum);
- cast follows ``qcompiler.runtime.numerics.cast``: float -> int truncates and saturates,
  NaN -> 0; int -> int wraps modulo 2^bits (within the sub-byte width for i4/u4 ...);
  -> bool is ``x != 0``.
"""
from __future__ import annotations

import math

import numpy as np

from qcompiler.codegen.cpu.ops.common import compute_dtype, dtype_of, is_float_dtype
from qcompiler.ir.types import ElementType

F32_LOWEST = -3.4028234663852886e38


def _c(value, dtype):
    from tvm import tirx

    return tirx.const(value, dtype)


def _let(value, body):
    """``body(v)`` with v bound to ``value`` once (a TIR Let): the expression trees below use
    each intermediate several times, and without a binding each use repeats its whole tree
    (a 460 KB GELU expression, and three divisions LLVM did not merge)."""
    from tvm import tirx

    var = tirx.Var("v", dtype_of(value))
    return tirx.Let(var, value, body(var))


def to_compute(x):
    """x in its compute type (float32 for f16/bf16/f32; ints unchanged)."""
    if is_float_dtype(dtype_of(x)):
        ct = compute_dtype(dtype_of(x))
        return x if dtype_of(x) == ct else x.astype(ct)
    return x


def _isnan(x):
    from tvm import tirx

    if dtype_of(x) == "bfloat16":  # TVM's finiteness ops refuse bf16: exact in f32
        x = x.astype("float32")
    return tirx.isnan(x) if is_float_dtype(dtype_of(x)) else tirx.const(False, "bool")


def maximum(a, b):
    """numpy.maximum: NaN in either operand gives NaN."""
    from tvm import tirx

    if not is_float_dtype(dtype_of(a)):
        return tirx.max(a, b)
    return tirx.Select(_isnan(a), a, tirx.Select(_isnan(b), b, tirx.max(a, b)))


def minimum(a, b):
    from tvm import tirx

    if not is_float_dtype(dtype_of(a)):
        return tirx.min(a, b)
    return tirx.Select(_isnan(a), a, tirx.Select(_isnan(b), b, tirx.min(a, b)))


def int_div(a, b):
    """C / ONNX integer division (toward zero); x / 0 = 0 and MIN / -1 wraps, as numpy."""
    from tvm import tirx

    dtype = dtype_of(a)
    zero = _c(0, dtype)
    one = _c(1, dtype)
    safe = tirx.Select(b == zero, one, b)
    if dtype.startswith("int"):
        safe = tirx.Select(b == _c(-1, dtype), one, safe)
        q = tirx.Select(b == _c(-1, dtype), zero - a, tirx.truncdiv(a, safe))
    else:
        q = tirx.truncdiv(a, safe)
    return tirx.Select(b == zero, zero, q)


def exp_f32(x):
    """e^x in float32 without a libm call, so that LLVM vectorizes the loop around it (a
    scalar ``expf`` per element was most of softmax and attention): Cephes' expf, as TVM's
    ``topi.fast_exp``: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through
    the exponent bits. Within 2 ulp of expf over [-87.3, 88.3]; below that the result is 0 or
    subnormal-free tiny (softmax weights of masked keys), above it clamped at e^88.3."""
    from tvm import tirx

    f32 = "float32"
    x = tirx.max(tirx.min(x, _c(88.3762626647950, f32)), _c(-88.3762626647949, f32))
    n = tirx.floor(x * _c(1.44269504088896341, f32) + _c(0.5, f32))
    r = x - n * _c(0.693359375, f32) + n * _c(2.12194440e-4, f32)
    return _expf_reduced(r) * _pow2_f32(n)


def _expf_reduced(r):
    """e^r in float32 for |r| <= ln2/2: Cephes' expf polynomial (``exp_f32`` and the GELUs)."""
    f32 = "float32"
    p = _c(1.9875691500e-4, f32)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
              5.0000001201e-1):
        p = p * r + _c(c, f32)
    return p * r * r + r + _c(1.0, f32)


def _pow2_f32(n, offset: int = 0):
    """2^(n + offset) in float32 through the exponent bits, for an integral n (any type) with
    n + offset in [-126, 127]."""
    from tvm import tirx

    bits = tirx.shift_left(n.astype("int32") + tirx.IntImm("int32", 127 + offset),
                           tirx.IntImm("int32", 23))
    return tirx.reinterpret("float32", bits)


def tanh_f32(x):
    """tanh in float32 without libm (vectorizable): Cephes' tanhf, an odd polynomial for
    |x| < 0.625 (TVM's own tanh goes through exp there and loses the low bits near 0) and
    1 - 2 / (e^2|x| + 1) beyond it, with ``exp_f32``."""
    from tvm import tirx

    f32 = "float32"
    a = tirx.abs(x)
    z = x * x
    p = _c(-5.70498872745e-3, f32)
    for c in (2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1):
        p = p * z + _c(c, f32)
    small = p * z * x + x
    big = _c(1.0, f32) - _c(2.0, f32) / (exp_f32(a + a) + _c(1.0, f32))
    big = tirx.Select(x < _c(0.0, f32), _c(0.0, f32) - big, big)
    return tirx.Select(a < _c(0.625, f32), small, big)


# Cephes' double-precision erf / erfc (ndtr.c) and exp coefficients, highest power first.
_ERF_T = (9.60497373987051638749E0, 9.00260197203842689217E1, 2.23200534594684319226E3,
          7.00332514112805075473E3, 5.55923013010394962768E4)
_ERF_U = (3.35617141647503099647E1, 5.21357949780152679795E2, 4.59432382970980127987E3,
          2.26290000613890934246E4, 4.92673942608635921086E4)
_ERFC_P = (2.46196981473530512524E-10, 5.64189564831068821977E-1, 7.46321056442269912687E0,
           4.86371970985681366614E1, 1.96520832956077098242E2, 5.26445194995477358631E2,
           9.34528527171957607540E2, 1.02755188689515710272E3, 5.57535335369399327526E2)
_ERFC_Q = (1.32281951154744992508E1, 8.67072140885989742329E1, 3.54937778887819891062E2,
           9.75708501743205489753E2, 1.82390916687909736289E3, 2.24633760818710981792E3,
           1.65666309194161350182E3, 5.57535340817727675546E2)
_EXP_P = (1.26177193074810590878E-4, 3.02994407707441961300E-2, 9.99999999999999999910E-1)
_EXP_Q = (3.00198505138664455042E-6, 2.52448340349684104192E-3, 2.27265548208155028766E-1,
          2.00000000000000000009E0)


def _polevl(x, coeffs, monic: bool = False):
    """sum c_i x^(n-i) by Horner (``monic``: a leading coefficient 1 before ``coeffs``)."""
    dtype = dtype_of(x)
    p = x + _c(coeffs[0], dtype) if monic else _c(coeffs[0], dtype)
    for c in coeffs[1:]:
        p = p * x + _c(c, dtype)
    return p


def exp_f64_fraction(x):
    """e^x in float64 without a libm call (vectorizable), as ``(plus, minus, scale)`` with
    e^x = plus / minus * scale, for a caller that folds the division into its own: Cephes'
    exp, x = n ln2 + r, e^r by the Pade form (q + p) / (q - p) (Cephes writes it 1 + 2p / (q -
    p)), 2^n through the exponent bits; for x in [-708, 708] (clamped)."""
    from tvm import tirx

    f64 = "float64"
    x = tirx.max(tirx.min(x, _c(708.0, f64)), _c(-708.0, f64))
    n = tirx.floor(x * _c(1.4426950408889634074, f64) + _c(0.5, f64))
    r = x - n * _c(6.93145751953125E-1, f64) - n * _c(1.42860682030941723212E-6, f64)
    rr = r * r
    px = r * _polevl(rr, _EXP_P)
    q = _polevl(rr, _EXP_Q)
    bits = tirx.shift_left(n.astype("int64") + tirx.IntImm("int64", 1023),
                           tirx.IntImm("int64", 52))
    return q + px, q - px, tirx.reinterpret(f64, bits)


def erf_f64(a, phi: bool = False):
    """erf of a float64 without a libm call, so that LLVM vectorizes the loop around it (a
    scalar ``erf`` per element was most of a GELU epilogue): Cephes' double erf (|a| < 1: a
    rational in a^2) and erfc (exp(-a^2) times a rational in |a| for 1 <= |a| < 8, clamped
    there), one division for both branches and for exp's Pade form. Rounded to float32 it
    equals libm's erf rounded (checked on 8M points of [-30, 30], N(0, 16) and N(0, 1), erf
    and GELU alike); NaN stays NaN, +-inf give +-1. ``phi``: (1 + erf(a)) / 2 instead, with
    its relative accuracy kept for a < -1 (GELU's negative tail) down to the clamp at
    |a| = 8, below which it is erfc(8) / 2 ~ 6e-30 (absolute error under that)."""
    from tvm import tirx

    f64 = "float64"
    one = _c(1.0, f64)
    x = tirx.abs(a)
    small = x < one
    z = a * a
    # Cephes has a second erfc rational for |a| >= 8 (_ERFC_R / _ERFC_S), which erfc needs but
    # erf does not: erfc(6) < 2^-54, so 1 - erfc(|a|) rounds to exactly 1 for |a| >= 6 however
    # small the erfc term is. Clamping to 8 keeps the [1, 8) rational's erfc(8) ~ 1e-28 there
    # (the same +-1 after the subtraction) and saves its 12 multiply-adds, which every lane
    # paid (a vector evaluates every branch): most of a GELU epilogue's time is these
    # polynomials.
    xc = tirx.min(x, _c(8.0, f64))
    plus, minus, scale = exp_f64_fraction(_c(0.0, f64) - xc * xc)
    p = _polevl(xc, _ERFC_P)
    q = _polevl(xc, _ERFC_Q, monic=True)
    num = tirx.Select(small, a * _polevl(z, _ERF_T), plus * scale * p)
    den = tirx.Select(small, _polevl(z, _ERF_U, monic=True), minus * q)
    r = num / den                            # erf(a) if small, else erfc(|a|)
    if phi:  # (1 + erf(a)) / 2, from erfc(|a|) directly where a < -1 (no cancellation)
        return tirx.Select(small, _c(0.5, f64) + _c(0.5, f64) * r,
                           tirx.Select(a < _c(0.0, f64), _c(0.5, f64) * r,
                                       one - _c(0.5, f64) * r))
    big = tirx.Select(a < _c(0.0, f64), r - one, one - r)
    return tirx.Select(tirx.isnan(a), a, tirx.Select(small, r, big))


def sigmoid(x):
    """The reference's stable form: x > 0 ? 1 / (1 + e^-x) : e^x / (1 + e^x)."""
    from tvm import tirx

    one = _c(1.0, dtype_of(x))
    ex = tirx.exp(x)
    return tirx.Select(x > _c(0.0, dtype_of(x)), one / (one + tirx.exp(-x)), ex / (one + ex))


# erfc in float32 for GELU (``gelu_erf_f32``): erfc(z) = t exp(-z^2 + P(u)) for z >= 0, with
# t = 1 / (1 + z / 2) and u = 2.4 t - 1.4 in [-1, 1] (z in [0, 10]; beyond, GELU's tail is below
# float32's smallest normal). P: a degree-10 fit of ln(erfcx(z) / t) (weighted least squares
# toward minimax over 400k points, in u: the powers of t cancelled in float32 Horner), 0.1 ulp
# of float32 in erfc's relative error. Highest power first.
_GELU_ERFC_P = (-2.180049947225897e-05, 5.509944991298569e-05, 0.00012726797920171892,
                -0.0005348516660137211, -0.00027372761092876204, 0.0037078682698403346,
                -0.0010463303456353507, -0.029470443155283785, 0.015745168188157087,
                0.570307110695184, -0.5585953555213433)
# Cephes' erff for |a| < 1: erf(a) = a T(a^2). Highest power first.
_ERFF_T = (7.853861353153693E-5, -8.010193625184903E-4, 5.188327685732524E-3,
           -2.685381193529856E-2, 1.128358514861418E-1, -3.761262582423300E-1,
           1.128379165726710E0)


def _exp_f32_parts(a, b):
    """e^(a + b) * 2^64 in float32, for a = -x^2/2 (exact, down to -200) and a small b: the
    argument stays a sum, so that its reduction x - n ln2 keeps b's low bits (a float32 a + b
    would lose up to 40 ulp of the result at a ~ -87). The 2^64 keeps it normal down to
    e^-131 (the caller scales its product back in one rounding); 0 below."""
    from tvm import tirx

    f32 = "float32"

    def reduced_with(a, b):
        low = a + b < _c(-130.0, f32)
        a2 = tirx.Select(low, _c(-130.0, f32), a)
        b2 = tirx.Select(low, _c(0.0, f32), b)

        def with_n(n):
            r = ((a2 - n * _c(0.693359375, f32)) + b2) + n * _c(2.12194440e-4, f32)
            return _let(r, lambda r: tirx.Select(low, _c(0.0, f32),
                                                 _expf_reduced(r) * _pow2_f32(n, 64)))
        return _let(tirx.floor((a2 + b2) * _c(1.44269504088896341, f32) + _c(0.5, f32)), with_n)
    # (the condition is not let-bound: TVM's vectorizer fails on a boolean Let)
    return _let(a, lambda a: _let(b, lambda b_: reduced_with(a, b_)))


def _fma(a, b, c):
    """a * b + c rounded once (llvm.fma: one vfmadd per vector after vectorization)."""
    from tvm import tirx

    return tirx.call_llvm_pure_intrin(dtype_of(a), "llvm.fma", a, b, c)


def gelu_erf_f32(x):
    """Exact GELU x Phi(x) in float32 (vectorizable, no libm, no float64): the float64 Cephes
    erf it replaces took ~2 ns an element, as long as the int8 GEMM before it in a BERT FFN
    (MiniLM at 32 x 128 tokens, Zen 4).

    Phi(x) = erfc(-x / sqrt 2) / 2, by regions (a = x / sqrt 2):
    - x < -0.674 (erf(|a|) > 1/2): x erfc(|a|) / 2, with erfc as above and x^2 = hi + lo split
      exactly (lo by a fused multiply-add) so that e^(-x^2/2) keeps its relative accuracy down
      to GELU's smallest normal results (x ~ -13.2), where 1 + erf(a) cancels completely;
    - -0.674 <= x < sqrt 2: x (1 + erf(a)) / 2 with Cephes' erff polynomial (no cancellation
      beyond a factor 2; erfc's relative error near a = 0 would be 7 ulp here);
    - above: x (1 - erfc(a) / 2).
    Within 6 ulp of the float64 reference on [-30, 30], N(0, 1) and N(0, 16) (94 % of the
    elements within 1; tests/test_cpu_erf_gelu.py); NaN stays NaN, +inf gives +inf, -inf NaN
    (as the reference's -inf * 0)."""
    from tvm import tirx

    f32 = "float32"
    one, half = _c(1.0, f32), _c(0.5, f32)
    two_m64 = _c(2.0 ** -64, f32)

    def result(x, a, h):  # h = erfc(|a|) / 2 * 2^64
        neg = (x * h) * two_m64  # one rounding of the (possibly subnormal) result
        pos = x * (one - h * two_m64)
        mid = x * (half + half * (a * _polevl(a * a, _ERFF_T)))
        return tirx.Select(x < _c(-0.6744897, f32), neg, tirx.Select(a < one, mid, pos))

    def erfc_half(x, a, xc, t, hi):
        lo = _fma(xc, xc, _c(0.0, f32) - hi)  # exact: x^2 - hi
        u = t * _c(2.4, f32) + _c(-1.4, f32)
        e = _exp_f32_parts(_c(-0.5, f32) * hi, _polevl(u, _GELU_ERFC_P) - half * lo)
        return _let(half * t * e, lambda h: result(x, a, h))

    def clamped(x, a, xc):  # x clamped to +-20: x^2 stays finite; erfc(14.1) is 0 in float32
        z = tirx.abs(xc) * _c(1.0 / math.sqrt(2.0), f32)
        return _let(one / (one + half * z),
                    lambda t: _let(xc * xc, lambda hi: erfc_half(x, a, xc, t, hi)))

    return _let(x, lambda x: _let(
        x * _c(1.0 / math.sqrt(2.0), f32),
        lambda a: _let(tirx.max(tirx.min(x, _c(20.0, f32)), _c(-20.0, f32)),
                       lambda xc: clamped(x, a, xc))))


def gelu_tanh_f32(x):
    """The tanh-form GELU 0.5 x (1 + tanh(w)), w = sqrt(2/pi) (x + 0.044715 x^3), in float32
    as x / (1 + e^(-2w)) (the same function; 1 + tanh(w) cancels for w << 0): -2w and its
    reduction t - n ln2 in float64 (a few vectorized multiply-adds: the float32 -2w would
    carry an error of up to 2|w| ulp into the exponential), e^r in float32 (``exp_f32``'s
    polynomial), and for x < -1 a scale of 2^-64 on both sides of the quotient so that
    e^(2|w|) stays finite down to results far below float32's smallest normal. The float64
    libm tanh it replaces took ~10 ns an element (a scalar call). Within 2 ulp of the float64 reference
    on [-30, 30], N(0, 1) and N(0, 16); NaN stays NaN, +inf gives +inf, -inf NaN."""
    from tvm import tirx

    f32, f64 = "float32", "float64"
    ln2 = math.log(2.0)

    def with_t(x, t):  # t = -2w - 64 ln2 (x < -1; -2w else), clamped to +-200
        # the quotient's scale: 2^-64 where e^(-2w) may pass float32's largest value (x < -1;
        # for tiny x, x 2^-64 would underflow), else 1
        scale = tirx.Select(x < _c(-1.0, f32), _c(2.0 ** -64, f32), _c(1.0, f32))

        def with_n(n):
            r = (t - n * _c(ln2, f64)).astype(f32)
            e = _expf_reduced(r) * _pow2_f32(tirx.max(tirx.min(n, _c(127.0, f64)),
                                                      _c(-126.0, f64)))
            y = (x * scale) / (scale + e)
            # past t = 150 the result is -0 in float32 (-inf: NaN, as the reference's
            # -inf / inf); written out, as the clamps above map NaN to a bound
            tail = tirx.Select(tirx.isinf(x), _c(float("nan"), f32), _c(-0.0, f32))
            return tirx.Select(tirx.isnan(x), x, tirx.Select(t > _c(150.0, f64), tail, y))
        return _let(tirx.floor(t * _c(1.0 / ln2, f64) + _c(0.5, f64)), with_n)

    def with_v(x, v):
        w2 = _c(-2.0 * math.sqrt(2.0 / math.pi), f64) * (v + _c(0.044715, f64) * v * v * v)
        offset = tirx.Select(v < _c(-1.0, f64), _c(64.0 * ln2, f64), _c(0.0, f64))
        t = tirx.max(tirx.min(w2 - offset, _c(200.0, f64)), _c(-200.0, f64))
        return _let(t, lambda t: with_t(x, t))

    return _let(x, lambda x: _let(x.astype(f64), lambda v: with_v(x, v)))


def gelu(x, approximate: str):
    """GELU of x: f16/bf16/f32 in float32 (``gelu_erf_f32``, ``gelu_tanh_f32``), float64 in
    float64 (Cephes' erf; libm's tanh) as the reference."""
    from tvm import tirx

    if dtype_of(x) != "float64":
        return gelu_tanh_f32(to_compute(x)) if approximate == "tanh" \
            else gelu_erf_f32(to_compute(x))
    # float64 tensors: the reference's forms (a rare case: libm's exp is a scalar call here)
    v = x.astype("float64")
    if approximate == "tanh":
        inner = _c(math.sqrt(2.0 / math.pi), "float64") * (v + _c(0.044715, "float64") * v * v * v)
        return v / (_c(1.0, "float64") + tirx.exp(_c(-2.0, "float64") * inner))
    # times 1/sqrt(2), not divided by sqrt(2) as the reference writes it: a division per
    # element saved
    return v * erf_f64(v * _c(1.0 / math.sqrt(2.0), "float64"), phi=True)


def cast(x, src: ElementType, dst: ElementType, dst_dtype: str):
    """numerics.cast of one element from ``src`` to ``dst`` (stored as ``dst_dtype``)."""
    from tvm import tirx

    src_dtype = dtype_of(x)
    if dst.kind == "bool":
        return (x != _c(0, src_dtype) if src_dtype != "bool" else x).astype(dst_dtype)
    if dst.kind in ("int", "uint", "ternary"):
        lo, hi = dst.int_range()
        if is_float_dtype(src_dtype):
            # Truncate toward zero, saturate to the range, NaN -> 0 (compared in float64,
            # where every f16/f32 value is exact and the bounds round outward harmlessly).
            v = x.astype("float64")
            inner = tirx.Select(v <= _c(float(lo), "float64"), _c(lo, dst_dtype),
                                tirx.Select(v >= _c(float(hi), "float64"), _c(hi, dst_dtype),
                                            v.astype(dst_dtype)))
            return tirx.Select(tirx.isnan(v), _c(0, dst_dtype), inner)
        if dst.kind == "ternary":
            v = x.astype("int64")
            return tirx.max(tirx.min(v, _c(1, "int64")), _c(-1, "int64")).astype(dst_dtype)
        if dst.bits >= 8:
            return x.astype(dst_dtype)  # wraps, as numpy astype / ONNX
        v = x.astype("int64") & _c((1 << dst.bits) - 1, "int64")
        if dst.kind == "int":
            wrapped = v - _c(1 << dst.bits, "int64")
            v = tirx.Select(v >= _c(1 << (dst.bits - 1), "int64"), wrapped, v)
        return v.astype(dst_dtype)
    return x.astype(dst_dtype)


UNARY_FLOAT = ("sqrt", "erf", "sigmoid", "tanh", "exp", "reciprocal", "gelu", "silu")
COMPARISONS = ("equal", "greater", "greater_or_equal", "less", "less_or_equal")


def apply(op: str, attr, args: list, out_dtype: str):
    """The value of ``op`` on loaded ``args`` in ``out_dtype`` (the QIR op's result type).

    ``attr``: gelu's approximation (``none``/``tanh``); cast takes its own path (``cast``).
    """
    from tvm import tirx

    if op in COMPARISONS:
        a, b = args
        ct = dtype_of(a) if dtype_of(a) == dtype_of(b) else "float64"
        a, b = a.astype(ct), b.astype(ct)
        r = {"equal": lambda: a == b, "greater": lambda: a > b,
             "greater_or_equal": lambda: a >= b, "less": lambda: a < b,
             "less_or_equal": lambda: a <= b}[op]()
        return r.astype(out_dtype)
    if op == "and":
        a, b = args
        return tirx.And(_truth(a), _truth(b)).astype(out_dtype)
    if op == "isnan":
        return _isnan(args[0]).astype(out_dtype)
    if op == "where":
        cond, a, b = args
        return tirx.Select(_truth(cond), a.astype(out_dtype), b.astype(out_dtype))
    if op == "erf":
        v = erf_f64(args[0].astype("float64"))
        return v.astype("float32").astype(out_dtype)
    if op == "gelu":
        return gelu(args[0], attr or "none").astype(out_dtype)
    if op == "not":
        return tirx.Not(_truth(args[0])).astype(out_dtype)
    if op == "bitwise_not":
        return (~args[0]).astype(out_dtype)
    if op == "isinf":
        return isinf(args[0], attr or {}).astype(out_dtype)
    if op in ("or", "xor"):
        a, b = _truth(args[0]), _truth(args[1])
        xor = tirx.Or(tirx.And(a, tirx.Not(b)), tirx.And(tirx.Not(a), b))
        return (tirx.Or(a, b) if op == "or" else xor).astype(out_dtype)
    if op in BITWISE_OPS:
        return bitwise(op, args[0].astype(out_dtype), args[1].astype(out_dtype))
    if op == "bit_shift":
        return bit_shift(args[0].astype(out_dtype), args[1].astype(out_dtype),
                         (attr or {})["direction"].lower())
    if op == "mod":
        return mod(args[0].astype(out_dtype), args[1].astype(out_dtype),
                   bool((attr or {}).get("fmod", 0)))
    if op == "prelu":
        x, slope = to_compute(args[0]), to_compute(args[1])
        return tirx.Select(x < _c(0, dtype_of(x)), x * slope.astype(dtype_of(x)),
                           x).astype(out_dtype)
    if op == "shrink" and not is_float_dtype(dtype_of(args[0])):
        # integer x: compared and shifted in float64, converted back (the reference)
        return onnx_unary(op, attr or {}, args[0].astype("float64"), "float64").astype(out_dtype)

    xs = [to_compute(a) for a in args]
    ct = dtype_of(xs[0])
    if op == "pow":
        base = xs[0]
        expo = xs[1].astype(ct) if is_float_dtype(ct) else xs[1]
        if not is_float_dtype(ct):
            return tirx.pow(base.astype("float64"), expo.astype("float64")).astype(out_dtype)
        if isinstance(expo, tirx.FloatImm) and expo.value in (2.0, 3.0):
            # a literal square or cube (GELU-tanh's x^3): products, which LLVM vectorizes,
            # instead of a powf call per element; within 2 ulp of powf like powf of numpy's
            r = base * base if expo.value == 2.0 else base * base * base
            return r.astype(out_dtype)
        return tirx.pow(base, expo).astype(out_dtype)
    xs = [x if dtype_of(x) == ct else x.astype(ct) for x in xs]
    floating = is_float_dtype(ct)
    if op == "add":
        r = xs[0] + xs[1]
    elif op == "sub":
        r = xs[0] - xs[1]
    elif op == "mul":
        r = xs[0] * xs[1]
    elif op == "div":
        r = xs[0] / xs[1] if floating else int_div(xs[0], xs[1])
    elif op == "max":
        r = maximum(xs[0], xs[1])
    elif op == "min":
        r = minimum(xs[0], xs[1])
    elif op == "relu":
        r = maximum(xs[0], _c(0, ct))
    elif op == "neg":
        r = _c(0, ct) - xs[0]
    elif op == "abs":
        r = tirx.abs(xs[0])
    elif op == "sqrt":
        r = tirx.sqrt(xs[0])
    elif op == "exp":
        r = tirx.exp(xs[0])
    elif op == "tanh":
        r = tanh_f32(xs[0]) if ct == "float32" else \
            tirx.tanh(xs[0].astype("float64")).astype(ct)
    elif op == "sigmoid":
        r = sigmoid(xs[0])
    elif op == "silu":
        # mul(x, sigmoid(x)) with the sigmoid rounded to the result type first, as the
        # body evaluator runs it (one rounding in f32)
        sig = sigmoid(xs[0])
        if dtype_of(sig) != out_dtype:
            sig = sig.astype(out_dtype).astype(ct)
        r = xs[0] * sig
    elif op == "reciprocal":
        r = _c(1, ct) / xs[0]
    elif op == "identity":
        r = xs[0]
    elif op in ONNX_UNARY_OPS:
        r = onnx_unary(op, attr or {}, xs[0], ct)
    else:
        raise KeyError(op)
    return r if dtype_of(r) == out_dtype else r.astype(out_dtype)


# -- the ONNX-coverage elementwise ops (issue #13) -------------------------------------------
# Libm functions are evaluated in float64 and rounded once (the reference runs numpy's float32
# loops, within an ulp or two of the rounded float64 value; LLVM's float32 libm calls are
# farther off for some); the arithmetic around them keeps the reference's float32 order.
LIBM_F64 = {"cos": "cos", "sin": "sin", "tan": "tan", "acos": "acos", "asin": "asin",
            "atan": "atan", "cosh": "cosh", "sinh": "sinh", "asinh": "asinh",
            "acosh": "acosh", "atanh": "atanh", "log": "log"}
ONNX_UNARY_OPS = tuple(LIBM_F64) + (
    "floor", "ceil", "round", "sign", "softsign", "softplus", "mish", "hard_swish",
    "leaky_relu", "elu", "selu", "celu", "hard_sigmoid", "thresholded_relu", "shrink")


def _f64(fn: str, x, ct: str):
    from tvm import tirx

    return getattr(tirx, fn)(x.astype("float64")).astype(ct)


def _softplus64(v):
    """log(1 + e^v) as numpy's logaddexp(v, 0): max(v, 0) + log1p(e^-|v|), in float64."""
    from tvm import tirx

    zero = _c(0.0, "float64")
    return tirx.max(v, zero) + tirx.log1p(tirx.exp(zero - tirx.abs(v)))


def _expm1_f32(x, ct: str):
    """exp(x) - 1 as the reference computes it: exp rounded to ``ct``, then 1 subtracted."""
    return _f64("exp", x, ct) - _c(1.0, ct)


def isinf(x, attrs: dict):
    from tvm import tirx

    if not is_float_dtype(dtype_of(x)):
        return tirx.const(False, "bool")
    if dtype_of(x) in ("bfloat16", "float16"):  # TVM's finiteness ops refuse bf16: exact in f32
        x = x.astype("float32")
    inf = tirx.isinf(x)
    zero = _c(0.0, dtype_of(x))
    no = tirx.const(False, "bool")
    pos = tirx.And(inf, x > zero) if attrs.get("detect_positive", 1) else no
    neg = tirx.And(inf, x < zero) if attrs.get("detect_negative", 1) else no
    return tirx.Or(pos, neg)


def onnx_unary(op: str, attrs: dict, x, ct: str):
    """The value of an ONNX-coverage unary op on ``x`` in compute type ``ct``."""
    from tvm import tirx

    zero, one = _c(0, ct), _c(1, ct)
    # the parameters rounded to ct up front, as the reference does (a float32 constant that
    # is widened in TIR would keep its float64 value)
    p = {k: _c(float(np.asarray(v, ct)), ct) for k, v in attrs.items()
         if isinstance(v, (int, float))}
    if op in LIBM_F64:
        return _f64(LIBM_F64[op], x, ct)
    if op in ("floor", "ceil", "round", "softsign", "hard_swish", "hard_sigmoid") and \
            not is_float_dtype(ct):
        raise KeyError(f"{op} of integers")
    if op == "floor":
        return tirx.floor(x)
    if op == "ceil":
        return tirx.ceil(x)
    if op == "round":
        return tirx.nearbyint(x)  # halves to even under the default rounding mode
    if op == "sign":
        s = tirx.Select(x > zero, one, tirx.Select(x < zero, zero - one, zero))
        return tirx.Select(_isnan(x), x, s) if is_float_dtype(ct) else s
    if op == "softsign":
        return x / (one + tirx.abs(x))
    if op == "softplus":
        return _softplus64(x.astype("float64")).astype(ct)
    if op == "mish":  # x * tanh(softplus(x)), each function rounded as the reference does
        sp = _softplus64(x.astype("float64")).astype(ct)
        return x * tirx.tanh(sp.astype("float64")).astype(ct)
    if op == "hard_swish":
        return x * minimum(maximum(x / _c(6.0, ct) + _c(0.5, ct), zero), one)
    if op == "leaky_relu":
        return tirx.Select(x >= zero, x, p["alpha"] * x)
    if op == "elu":
        return tirx.Select(x > zero, x, p["alpha"] * _expm1_f32(x, ct))
    if op == "selu":
        return tirx.Select(x > zero, p["gamma"] * x,
                           p["gamma"] * p["alpha"] * _expm1_f32(x, ct))
    if op == "celu":
        return maximum(zero, x) + minimum(zero, p["alpha"] * _expm1_f32(x / p["alpha"], ct))
    if op == "hard_sigmoid":
        # in float64, rounded once: LLVM contracts a float32 mul + add into an FMA anyway
        # (one rounding where the reference has two: within an ulp); in float64 the product
        # of float32 values is exact, so FMA or not gives the same result
        f64 = "float64"
        v = p["alpha"].astype(f64) * x.astype(f64) + p["beta"].astype(f64)
        return minimum(maximum(v, _c(0, f64)), _c(1, f64)).astype(ct)
    if op == "thresholded_relu":
        return tirx.Select(x > p["alpha"], x, zero)
    if op == "shrink":
        return tirx.Select(x > p["lambd"], x - p["bias"],
                           tirx.Select(x < zero - p["lambd"], x + p["bias"], zero))
    raise KeyError(op)


BITWISE_OPS = ("bitwise_and", "bitwise_or", "bitwise_xor")


def bitwise(op: str, a, b):
    from tvm import tirx

    fn = {"bitwise_and": tirx.bitwise_and, "bitwise_or": tirx.bitwise_or,
          "bitwise_xor": tirx.bitwise_xor}[op]
    return fn(a, b)


def bit_shift(a, b, direction: str):
    """numpy's left_shift / right_shift: a shift by the width or more (or a negative one)
    gives 0, or -1 for a negative a shifted right (LLVM's shl / shr would be poison there)."""
    from tvm import tirx

    dtype = dtype_of(a)
    bits = int("".join(ch for ch in dtype if ch.isdigit()))
    shifted = tirx.shift_left(a, b) if direction == "left" else tirx.shift_right(a, b)
    if dtype.startswith("int"):  # signed b: negative counts are out of range too
        in_range = tirx.And(b >= _c(0, dtype), b < _c(bits, dtype))
    else:
        in_range = b < _c(bits, dtype)
    out = _c(0, dtype)
    if direction != "left" and dtype.startswith("int"):
        out = tirx.Select(a < _c(0, dtype), _c(-1, dtype), out)
    return tirx.Select(in_range, shifted, out)


def mod(a, b, fmod: bool):
    """ONNX Mod as the reference: fmod=1 is C's fmod (sign of a); fmod=0 Python's % (sign of
    b). Integer x % 0 gives 0 (numpy's result, and no SIGFPE)."""
    from tvm import tirx

    dtype = dtype_of(a)
    if is_float_dtype(dtype):
        # libm's fmod in float64 (exact for every f16/bf16/f32/f64 pair): TVM's LLVM
        # codegen has no fmod intrinsic
        ct = "float64"
        x, y = a.astype(ct), b.astype(ct)
        r = tirx.call_pure_extern(ct, "fmod", x, y)
        if not fmod:  # Python's % on floats: fmod moved to the sign of y
            zero = _c(0, ct)
            same_sign = tirx.Or(tirx.And(r < zero, y < zero), tirx.And(r > zero, y > zero))
            r = tirx.Select(tirx.Or(r == zero, same_sign), r, r + y)
        return r.astype(dtype)
    zero, one = _c(0, dtype), _c(1, dtype)
    safe = tirx.Select(b == zero, one, b)
    if dtype.startswith("int"):
        safe = tirx.Select(b == _c(-1, dtype), one, safe)  # MIN % -1 = 0, no SIGFPE
    r = tirx.truncmod(a, safe) if fmod else tirx.floormod(a, safe)
    return tirx.Select(b == zero, zero, r)


def _truth(x):
    from tvm import tirx

    return x if dtype_of(x) == "bool" else x != tirx.const(0, dtype_of(x))


ELEMENTWISE_OPS = ("add", "sub", "mul", "div", "max", "min", "pow", "sqrt", "erf", "relu",
                   "sigmoid", "tanh", "exp", "neg", "abs", "reciprocal", "gelu", "where",
                   "equal", "greater", "greater_or_equal", "less", "less_or_equal", "and",
                   "isnan", "silu", "identity") + ONNX_UNARY_OPS + (
                       "not", "bitwise_not", "isinf", "or", "xor", "mod", "prelu",
                       "bit_shift") + BITWISE_OPS


# --------------------------------------------------------------------------------------------
# float8 / float4 codes (ONNX Cast to and from FLOAT8E4M3FN ... FLOAT4E2M1), as uint8 codes
# --------------------------------------------------------------------------------------------

# storage -> (exponent bits, mantissa bits, bias, largest finite value, kind of specials):
# "fn" NaN at all-ones (no inf), "ieee" inf and NaN at the top exponent (e5m2), "uz" one NaN
# at 0x80 and no -0, "none" (float4: saturates, NaN becomes 0x8 as ml_dtypes)
NARROW_FLOATS = {
    "float8_e4m3fn": (4, 3, 7, 448.0, "fn"),
    "float8_e5m2": (5, 2, 15, 57344.0, "ieee"),
    "float8_e4m3fnuz": (4, 3, 8, 240.0, "uz"),
    "float8_e5m2fnuz": (5, 2, 16, 57344.0, "uz"),
    "float4_e2m1fn": (2, 1, 1, 6.0, "none"),
}


def _pow2(k):
    """2.0 ** k (an int64 expression in the float64 normal range) from its bits: exact."""
    from tvm import tirx

    return tirx.reinterpret("float64", (k + _c(1023, "int64")) << _c(52, "int64"))


def encode_narrow_float(v, et: ElementType, saturate: bool):
    """The uint8 code of the float64 value ``v`` in float8/float4 ``et``: round to nearest
    even (one rounding from float64, where every source value is exact), saturating to the
    largest finite value when ``saturate`` (float4 always), else overflow to NaN or inf."""
    from tvm import tirx

    E, M, bias, largest, specials = NARROW_FLOATS[et.storage]
    bits = 4 if et.storage.startswith("float4") else 8
    i64, f64 = "int64", "float64"
    raw = tirx.reinterpret(i64, v)
    sign = (raw >> _c(63, i64)) & _c(1, i64)
    a = tirx.abs(v)
    if saturate or specials == "none":
        a = tirx.min(a, _c(largest, f64))  # inf too; NaN handled below
    # the exponent of the (clamped) magnitude
    ex = ((tirx.reinterpret(i64, a) >> _c(52, i64)) & _c(0x7FF, i64)) - _c(1023, i64)
    e = tirx.max(ex, _c(1 - bias, i64))  # below the normal range: the subnormal quantum
    q = _pow2(e - _c(M, i64))
    m = tirx.nearbyint(a / q).astype(i64)  # 0 .. 2^(M+1)
    carry = m >= _c(2 ** (M + 1), i64)  # rounded up into the next binade
    e = tirx.Select(carry, e + _c(1, i64), e)
    m = tirx.Select(carry, _c(2 ** M, i64), m)
    normal = m >= _c(2 ** M, i64)
    expf = tirx.Select(normal, e + _c(bias, i64), _c(0, i64))
    mant = tirx.Select(normal, m - _c(2 ** M, i64), m)
    sign_bit = sign << _c(bits - 1, i64)
    code = sign_bit | (expf << _c(M, i64)) | mant
    if specials == "uz":
        code = tirx.Select(m == _c(0, i64), _c(0, i64), code)  # no negative zero
        nan = _c(0x80, i64)
    elif specials == "fn":
        nan = sign_bit | _c(0x7F, i64)
    elif specials == "ieee":
        nan = sign_bit | _c(0x7E, i64)
    else:
        nan = _c(0x8, i64)
    if not (saturate or specials == "none"):
        over = sign_bit | _c(0x7C, i64) if specials == "ieee" else nan
        code = tirx.Select(tirx.Or(tirx.isinf(v), m.astype(f64) * q > _c(largest, f64)),
                           over, code)
    return tirx.Select(tirx.isnan(v), nan, code).astype("uint8")


def decode_narrow_float(code, et: ElementType):
    """The float64 value of a float8/float4 uint8 code."""
    from tvm import tirx

    E, M, bias, largest, specials = NARROW_FLOATS[et.storage]
    bits = 4 if et.storage.startswith("float4") else 8
    i64, f64 = "int64", "float64"
    c = code.astype(i64)
    sign = (c >> _c(bits - 1, i64)) & _c(1, i64)
    expf = (c >> _c(M, i64)) & _c(2 ** E - 1, i64)
    mant = c & _c(2 ** M - 1, i64)
    sub = mant.astype(f64) * _c(2.0 ** (1 - bias - M), f64)
    norm = (mant + _c(2 ** M, i64)).astype(f64) * _pow2(expf - _c(bias + M, i64))
    mag = tirx.Select(expf == _c(0, i64), sub, norm)
    value = tirx.Select(sign == _c(1, i64), _c(0.0, f64) - mag, mag)
    nan, inf = _c(float("nan"), f64), _c(float("inf"), f64)
    if specials == "fn":
        value = tirx.Select(tirx.And(expf == _c(2 ** E - 1, i64), mant == _c(2 ** M - 1, i64)),
                            nan, value)
    elif specials == "ieee":
        special = tirx.Select(mant == _c(0, i64),
                              tirx.Select(sign == _c(1, i64), _c(0.0, f64) - inf, inf), nan)
        value = tirx.Select(expf == _c(2 ** E - 1, i64), special, value)
    elif specials == "uz":
        value = tirx.Select(c == _c(0x80, i64), nan, value)
    return value
