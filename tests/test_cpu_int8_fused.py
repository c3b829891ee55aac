"""The fused int8 qmatmul kernels (``row`` order: codes unpacked in registers): AVX-512 VNNI
(``vpdpbusd``, the host target ``cpu``) and AVX2 (``vpmaddubsw`` + ``vpmaddwd``, target
``cpu-x86-avx2``, -mcpu=haswell: any AVX2 host runs it, so an AVX-512 machine runs exactly the
code of a Zen 3).

Every case runs on fresh random codes, scales, zero points and activations (never zeros) and
is compared with the numpy model of the same arithmetic (``runtime.numpy_model``: x quantized
per row and group, exact int32 sums, float scales: only the float32 summation order differs,
so the fp32 tolerance of ``runtime.tolerance``) and with the float reference (int8 rounding of
x: within 2% of max|y| for these unit-normal layers). K and N that are not multiples of the
group / the column tile are padded by the packer (zero codes meet zero activations).
The VNNI kernels are skipped, with the reason, on hosts without AVX-512 VNNI (also under
QC_HOST_ISA=avx2), the AVX2 ones on hosts without AVX2; the accumulator plans are plain Python
and run everywhere.
"""
import dataclasses
import os

import numpy as np
import pytest

pytest.importorskip("tvm")

from qcompiler.codegen.cpu import host, kernels, runtime, tuning  # noqa: E402
from qcompiler.targets import get_target  # noqa: E402
from conftest import ROOT, check_golden  # noqa: E402

HOST = host.target_cpu(get_target("cpu"))
_ISA_NOTE = (f"; {host.HOST_ISA_ENV}={host.host_isa_override()}" if host.host_isa_override()
             else "")
needs_vnni = pytest.mark.skipif(
    not HOST["vnni"],
    reason=f"the fused int8 kernel needs AVX-512 VNNI (host -mcpu={HOST['mcpu']}{_ISA_NOTE})")
needs_avx2 = pytest.mark.skipif(
    not host._AVX2 <= host.host_flags()[1],
    reason=f"this host lacks AVX2: cpu-x86-avx2 code cannot run here{_ISA_NOTE}")
# The targets of the two fused kernels: the host (VNNI) and cpu-x86-avx2 (AVX2, 8 lanes).
TARGETS = [pytest.param("cpu", marks=needs_vnni, id="vnni"),
           pytest.param("cpu-x86-avx2", marks=needs_avx2, id="avx2")]

SCHEMES = {
    "u4-g32-zp": "#quant<u4, affine, per_group(axis=0, block=32), scale=f32, zp=u4>",
    "u4-g128-zp": "#quant<u4, affine, per_group(axis=0, block=128), scale=f32, zp=u4>",
    "i4-g64-sym": "#quant<i4, symmetric, per_group(axis=0, block=64), scale=f32>",
    "u2-g32-zp": "#quant<u2, affine, per_group(axis=0, block=32), scale=f32, zp=u2>",
    "u3-g64-zp": "#quant<u3, affine, per_group(axis=0, block=64), scale=f32, zp=u3>",
    "u8-channel-zp": "#quant<u8, affine, per_channel(axis=1), scale=f32, zp=u8>",
    "u8-g32-zp": "#quant<u8, affine, per_group(axis=0, block=32), scale=f32, zp=u8>",
    "u2-g160-zp": "#quant<u2, affine, per_group(axis=0, block=160), scale=f32, zp=u2>",
    "u4-g32-sym": "#quant<u4, symmetric, per_group(axis=0, block=32), scale=f32>",
}


def key_for(m, k, n, scheme):
    return {"op": "qmatmul", "m": m, "k": k, "n": n, "w_scheme": SCHEMES[scheme],
            "act": "float", "x_dtype": "f32", "has_bias": False, "act_order": False,
            "numerics": "int8"}


def run_case(tmp_path, m, k, n, scheme, m_block, seed, target="cpu", x=None, codes=None,
             f16_scales=False):
    """Build the row-order int8 kernel with ``m_block`` for the problem on ``target``, run it
    on random x (or ``x``; random codes, or ``codes``) and return (kernel output, numpy
    model, float reference, problem). ``f16_scales``: the scales stored as float16, as
    cpu-pack-weights stores them on x86 (the model then takes the f16-rounded scales)."""
    tgt = get_target(target)
    key = key_for(m, k, n, scheme)
    config = {"m_block": m_block, "order": "row"}
    assert tuning.check_config(tgt, key, config) is None
    p = tuning.problem(tgt, key)
    rng = np.random.default_rng(seed)
    wts = tuning.random_weights(p, rng)
    if codes is not None:
        wts["q"] = codes.astype(wts["q"].dtype)
    if f16_scales:
        wts["scale"] = np.asarray(wts["scale"]).astype(np.float16).astype(np.float32)
    # packed first, as cpu-pack-weights does: a symmetric scheme's shared zero code is
    # decided there and reaches the kernel as a constant (the zc table is then not read)
    packed = runtime.pack_weights(p, wts["q"], wts["scale"], wts["zp"], None)
    p = dataclasses.replace(p, zero_code=packed["zero_code"])
    if f16_scales:
        packed["s"] = packed["s"].astype(np.float16)
        p = dataclasses.replace(p, scale_dtype="float16")
    assert (p.zero_code is not None) == ("sym" in scheme)
    ks = p.kernel_shape()
    variants = [{**config, "m": m, "max_m": 0}]
    assert kernels.int8_fused(ks, variants[0])
    source = kernels.int8_fused_source(ks, variants[0])
    assert ("zc.vload" in source) == (p.zero_code is None)
    assert ("'float16x" in source) == f16_scales
    lib = runtime.build_library(ks, variants, tgt, str(tmp_path / f"k{m}_{m_block}"))
    kern = runtime.QmmKernel(lib, p, variants, packed)
    if x is None:
        x = rng.standard_normal((m, k)).astype(np.float32)
    assert np.all(x != 0)
    got = kern(x)
    model = runtime.numpy_model(p, x, wts["q"], wts["scale"], wts["zp"], None)
    exact = x.astype(np.float64) @ runtime.dequantized(p, wts["q"], wts["scale"], wts["zp"],
                                                       None)
    return got, model, exact, p


# (M, K, N, scheme, m_block): M = 1 and small M; K not a multiple of the group (272 = 8.5 x 32,
# 200 = 3.1 x 64) and N not a multiple of the 64-column tile (70, 37); m_block 1 and 2 keep one
# accumulator per code of a byte (codes masked in place), 4 and 8 share them (shifted codes),
# 2-bit codes with m_block 2 share them two by two; 8-bit codes have one per byte.
CASES = [
    (1, 272, 70, "u4-g32-zp", 1),
    (1, 4096, 256, "u4-g128-zp", 1),
    (2, 272, 70, "u4-g32-zp", 2),
    (3, 200, 37, "i4-g64-sym", 1),
    (3, 272, 70, "u4-g32-zp", 4),
    (4, 256, 128, "u4-g128-zp", 2),
    (4, 272, 70, "u4-g32-zp", 4),
    (5, 272, 70, "u4-g32-zp", 8),
    (1, 200, 37, "u2-g32-zp", 1),
    (3, 200, 37, "u2-g32-zp", 2),
    (2, 200, 70, "u3-g64-zp", 2),
    (1, 200, 37, "u8-channel-zp", 1),
    (4, 200, 37, "u8-channel-zp", 2),
]


# AVX2 (32-column tiles: N = 70 and 37 are no multiples either): the same cases, and 8-bit
# codes by groups (nibbles), 2-bit codes with a 40-step int16 run (block 160: 10 words of 4
# codes per vpmaddwd), symmetric 4-bit codes; m_block 4 and 8 do the tile in passes of
# fewer column vectors.
AVX2_CASES = CASES + [
    (1, 200, 37, "u8-g32-zp", 1),
    (5, 200, 70, "u8-g32-zp", 2),
    (2, 400, 37, "u2-g160-zp", 2),
    (3, 400, 70, "u2-g160-zp", 1),
    (2, 272, 37, "u4-g32-sym", 1),
]
ALL_CASES = ([pytest.param(*c, "cpu", marks=needs_vnni,
                           id=f"vnni-m{c[0]}-k{c[1]}-n{c[2]}-{c[3]}-mb{c[4]}") for c in CASES]
             + [pytest.param(*c, "cpu-x86-avx2", marks=needs_avx2,
                             id=f"avx2-m{c[0]}-k{c[1]}-n{c[2]}-{c[3]}-mb{c[4]}")
                for c in AVX2_CASES])


# float16 scales (cpu-pack-weights' scale_dtype on x86): both kernels, affine and symmetric,
# one and several rows
F16_CASES = [pytest.param(*c, t, marks=mark, id=f"{t}-m{c[0]}-{c[3]}-mb{c[4]}")
             for c in [(1, 272, 70, "u4-g32-zp", 1), (3, 200, 37, "i4-g64-sym", 1),
                       (4, 272, 70, "u4-g32-zp", 4)]
             for t, mark in (("cpu", needs_vnni), ("cpu-x86-avx2", needs_avx2))]


@pytest.mark.parametrize("m,k,n,scheme,m_block,target", F16_CASES)
def test_fused_with_f16_scales_matches_the_numpy_model(tmp_path, m, k, n, scheme, m_block,
                                                        target):
    got, model, exact, p = run_case(tmp_path, m, k, n, scheme, m_block, seed=m + k + n,
                                    target=target, f16_scales=True)
    err = float(np.abs(got - model).max())
    tol = runtime.tolerance(p, model)
    assert err <= tol, f"max |kernel - numpy model| = {err:.3g} > {tol:.3g}"
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("m,k,n,scheme,m_block,target", ALL_CASES)
def test_fused_matches_the_numpy_model(tmp_path, m, k, n, scheme, m_block, target):
    got, model, exact, p = run_case(tmp_path, m, k, n, scheme, m_block, seed=m * 1000 + k + n,
                                    target=target)
    assert got.shape == (m, n)
    err = float(np.abs(got - model).max())
    tol = runtime.tolerance(p, model)
    assert err <= tol, f"max |kernel - numpy model| = {err:.3g} > {tol:.3g}"
    # the int8 rounding of x only: documented bound 2% of max|y| for unit-normal activations
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("target", TARGETS)
def test_many_rows_take_the_parallel_prologue_with_the_same_codes(tmp_path, target):
    """M = 130 (>= QUANTIZE_PARALLEL_ROWS): the prologue with its rows over the thread pool;
    the kernel still matches the numpy model, and on the same x both prologues give the
    same codes, scales and sums bit for bit."""
    import tvm

    m = 130
    assert m >= kernels.QUANTIZE_PARALLEL_ROWS
    got, model, _, p = run_case(tmp_path, m, 272, 70, "u4-g32-zp", 2, seed=13, target=target)
    assert float(np.abs(got - model).max()) <= runtime.tolerance(p, model)
    lib = tvm.runtime.load_module(str(tmp_path / "k130_2.so"))  # run_case built it
    bl = p.blocking
    x = np.random.default_rng(14).standard_normal((m, bl.k_pad)).astype(np.float32)
    outs = []
    for name in (kernels.QUANTIZE_FUNC, kernels.QUANTIZE_ROWS_FUNC):
        arrays = [np.zeros((m, bl.k_pad), np.int8), np.zeros((m, bl.k_pad // bl.block), np.float32),
                  np.zeros((m, bl.k_pad // bl.block), np.float32)]
        tensors = [tvm.runtime.tensor(a) for a in arrays]
        lib[name](tvm.runtime.tensor(x), *tensors)
        outs.append([t.numpy() for t in tensors])
    for serial, parallel in zip(*outs):
        np.testing.assert_array_equal(serial, parallel)
    assert np.abs(outs[0][0]).max() == 127


@pytest.mark.parametrize("target", TARGETS)
def test_every_row_of_a_padded_block_is_its_own(tmp_path, target):
    """M=3 in 2-row blocks (one padded row): each row's output is its own (rows swapped in x
    swap in y), so no accumulator of one row leaks into another."""
    got, model, _, p = run_case(tmp_path, 3, 272, 70, "u4-g32-zp", 2, seed=11, target=target)
    assert float(np.abs(got - model).max()) <= runtime.tolerance(p, model)
    assert np.abs(got[0] - got[1]).max() > 10 * runtime.tolerance(p, model)


def test_accumulator_plan():
    """One int32 accumulator per code of a byte while 16 fit (codes masked in place), fewer
    (and shifted codes) for larger row blocks; no in-place codes where a sum could overflow."""
    def shape(bits, block=32, k_pad=256):
        cb = {2: 2, 4: 4, 8: 8}[bits]
        return kernels.KernelShape("int8", n_pad=64, k_pad=k_pad, block=block,
                                   groups=k_pad // block, n_tile=64, container_bits=cb, lanes=16)

    assert kernels.int8_fused_splits(shape(4), 1) == 2 and kernels.int8_codes_in_place(shape(4), 1)
    assert kernels.int8_fused_splits(shape(4), 2) == 2 and kernels.int8_codes_in_place(shape(4), 2)
    assert kernels.int8_fused_splits(shape(4), 4) == 1
    assert not kernels.int8_codes_in_place(shape(4), 4)
    assert kernels.int8_fused_splits(shape(2), 1) == 4 and kernels.int8_codes_in_place(shape(2), 1)
    assert kernels.int8_fused_splits(shape(2), 2) == 2
    assert not kernels.int8_codes_in_place(shape(2), 2)
    assert kernels.int8_fused_splits(shape(8), 1) == 1 and not kernels.int8_codes_in_place(
        shape(8), 1)
    big = shape(4, block=1 << 17, k_pad=1 << 17)  # 2^17 x 255 x 127 >= 2^31
    assert not kernels.int8_codes_in_place(big, 1)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 16, 32])
def test_small_m_defaults_run_the_fused_kernel(m, target):
    """The default config of M <= 4 (and up to tuning.FUSED_MAX_M on VNNI,
    AVX2_FUSED_MAX_M on AVX2) is the fused row kernel: its source has no unpack buffer and
    one vpdpbusd (VNNI) or vpmaddubsw (AVX2) per code and row; above it the group order."""
    tgt = get_target(target)
    key = key_for(m, 4096, 4096, "u4-g128-zp")
    cfg = tuning.default_config(tgt, key)
    ks = tuning.problem(tgt, key).kernel_shape()
    assert cfg["order"] == "row" and kernels.int8_fused(ks, cfg)
    src = runtime.scheduled_source(ks, [cfg])
    dot = "vpdpbusd" if ks.lanes == 16 else "pmadd.ub.sw"
    assert "unpack" not in src and dot in src
    assert src == runtime.scheduled_source(ks, [cfg])  # deterministic text
    big = tuning.default_config(tgt, key_for(tuning.fused_max_m(ks.lanes) + 1, 4096, 4096,
                                             "u4-g128-zp"))
    assert big["order"] == "group"


def avx2_shape(bits, block=32, k_pad=256, m_block=1):
    return kernels.KernelShape("int8", n_pad=32, k_pad=k_pad, block=block,
                               groups=k_pad // block, n_tile=32,
                               container_bits={2: 2, 4: 4, 8: 8}[bits], lanes=8)


def test_avx2_int16_plan():
    """The AVX2 int16 sums never saturate: vpmaddubsw results per sum within 32767 / (2 x
    largest code x 127) (8 for 4-bit codes and 8-bit nibbles, 43 for 2-bit codes), whole
    words per sum, dividing the group's; the tile's column vectors in passes whose sums fit
    the 16 ymm registers."""
    assert kernels.int8_avx2_int16_limit(avx2_shape(4)) == 8
    assert kernels.int8_avx2_int16_limit(avx2_shape(8)) == 8
    assert kernels.int8_avx2_int16_limit(avx2_shape(2)) == 43
    for bits in (2, 4, 8):
        for block in (16, 32, 64, 128, 160, 256, 4096):
            ks = avx2_shape(bits, block, k_pad=block * 2)
            if block % (4 * ks.per_byte):
                continue
            words = kernels.int8_avx2_flush_words(ks)
            assert (block // (4 * ks.per_byte)) % words == 0
            worst = 2 * (15 if bits == 8 else (1 << bits) - 1) * 127
            assert words * ks.per_byte * worst <= 32767, (bits, block)
    assert kernels.int8_avx2_flush_words(avx2_shape(4, 128)) == 4
    assert kernels.int8_avx2_flush_words(avx2_shape(2, 160, 320)) == 10
    assert [kernels.int8_avx2_pass_vectors(avx2_shape(4), mb) for mb in (1, 2, 4, 8)] == \
        [4, 2, 1, 1]
    assert kernels.int8_avx2_pass_vectors(avx2_shape(8), 1) == 2


@needs_avx2
@pytest.mark.parametrize("scheme,codes", [("u4-g32-zp", (15, 14)), ("u4-g128-zp", (15, 14)),
                                          ("u8-g32-zp", (255, 254)), ("u2-g160-zp", (3, 2))])
def test_avx2_extremes_do_not_saturate(tmp_path, scheme, codes):
    """The largest codes times activations of +-127 fill each int16 sum of the AVX2 fused
    kernel to its bound (4-bit: 8 x 3810 = 30480; 2-bit, block 160: 40 x 762 = 30480; 8-bit
    through the nibbles) and the sums stay exact."""
    m, k, n = 3, 320, 37
    top, below = codes
    q = np.full((k, n), top)
    q[:, ::3] = below
    x = np.where(np.random.default_rng(1).random((m, k)) < 0.5, -2.0, 2.0).astype(np.float32)
    x[0] = 2.0   # every activation quantizes to +127
    x[1] = -2.0  # and to -127
    got, model, _, p = run_case(tmp_path, m, k, n, scheme, 2, seed=3, target="cpu-x86-avx2",
                                x=x, codes=q)
    err = float(np.abs(got - model).max())
    assert err <= runtime.tolerance(p, model), f"max |kernel - numpy model| = {err:.3g}"


def test_avx2_fused_golden(update_goldens):
    """The AVX2 fused kernel's TensorIR (4-bit codes, groups of 32, 2-row blocks: column
    vectors in 2 passes) as the golden file says."""
    ks = kernels.KernelShape("int8", n_pad=64, k_pad=64, block=32, groups=2, n_tile=32,
                             container_bits=4, lanes=8)
    text = runtime.scheduled_source(ks, [{"m_block": 2, "order": "row"}])
    check_golden(os.path.join(ROOT, "tests", "golden", "cpu", "int8_avx2_u4_g32_row_mb2.tir.py"),
                 text, update_goldens)
