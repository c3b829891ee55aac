"""The fused int8 qmatmul kernel (AVX-512 VNNI, ``row`` order: codes unpacked in registers).

Every case runs on fresh random codes, scales, zero points and activations (never zeros) and
is compared with the numpy model of the same arithmetic (``runtime.numpy_model``: x quantized
per row and group, exact int32 sums, float scales: only the float32 summation order differs,
so the fp32 tolerance of ``runtime.tolerance``) and with the float reference (int8 rounding of
x: within 2% of max|y| for these unit-normal layers). K and N that are not multiples of the
group / the column tile are padded by the packer (zero codes meet zero activations).
The kernels are skipped, with the reason, on hosts without AVX-512 VNNI (they take the AVX2
int8 path); the accumulator plan is plain Python and runs everywhere.
"""
import numpy as np
import pytest

pytest.importorskip("tvm")

from qcompiler.codegen.cpu import host, kernels, runtime, tuning  # noqa: E402
from qcompiler.targets import get_target  # noqa: E402

HOST = host.target_cpu(get_target("cpu"))
_ISA_NOTE = (f"; {host.HOST_ISA_ENV}={host.host_isa_override()}" if host.host_isa_override()
             else "")
needs_vnni = pytest.mark.skipif(
    not HOST["vnni"],
    reason=f"the fused int8 kernel needs AVX-512 VNNI (host -mcpu={HOST['mcpu']}{_ISA_NOTE})")

SCHEMES = {
    "u4-g32-zp": "#quant<u4, affine, per_group(axis=0, block=32), scale=f32, zp=u4>",
    "u4-g128-zp": "#quant<u4, affine, per_group(axis=0, block=128), scale=f32, zp=u4>",
    "i4-g64-sym": "#quant<i4, symmetric, per_group(axis=0, block=64), scale=f32>",
    "u2-g32-zp": "#quant<u2, affine, per_group(axis=0, block=32), scale=f32, zp=u2>",
    "u3-g64-zp": "#quant<u3, affine, per_group(axis=0, block=64), scale=f32, zp=u3>",
    "u8-channel-zp": "#quant<u8, affine, per_channel(axis=1), scale=f32, zp=u8>",
}


def key_for(m, k, n, scheme):
    return {"op": "qmatmul", "m": m, "k": k, "n": n, "w_scheme": SCHEMES[scheme],
            "act": "float", "x_dtype": "f32", "has_bias": False, "act_order": False,
            "numerics": "int8"}


def run_case(tmp_path, m, k, n, scheme, m_block, seed):
    """Build the row-order int8 kernel with ``m_block`` for the problem, run it on random x
    and return (kernel output, numpy model, float reference, problem)."""
    tgt = get_target("cpu")
    key = key_for(m, k, n, scheme)
    config = {"m_block": m_block, "order": "row"}
    assert tuning.check_config(tgt, key, config) is None
    p = tuning.problem(tgt, key)
    ks = p.kernel_shape()
    variants = [{**config, "m": m, "max_m": 0}]
    assert kernels.int8_fused(ks, variants[0])
    lib = runtime.build_library(ks, variants, tgt, str(tmp_path / f"k{m}_{m_block}"))
    rng = np.random.default_rng(seed)
    wts = tuning.random_weights(p, rng)
    kern = runtime.QmmKernel(lib, p, variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], None))
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


@needs_vnni
@pytest.mark.parametrize("m,k,n,scheme,m_block", CASES,
                         ids=[f"m{c[0]}-k{c[1]}-n{c[2]}-{c[3]}-mb{c[4]}" for c in CASES])
def test_fused_matches_the_numpy_model(tmp_path, m, k, n, scheme, m_block):
    got, model, exact, p = run_case(tmp_path, m, k, n, scheme, m_block, seed=m * 1000 + k + n)
    assert got.shape == (m, n)
    err = float(np.abs(got - model).max())
    tol = runtime.tolerance(p, model)
    assert err <= tol, f"max |kernel - numpy model| = {err:.3g} > {tol:.3g}"
    # the int8 rounding of x only: documented bound 2% of max|y| for unit-normal activations
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


@needs_vnni
def test_every_row_of_a_padded_block_is_its_own(tmp_path):
    """M=3 in 2-row blocks (one padded row): each row's output is its own (rows swapped in x
    swap in y), so no accumulator of one row leaks into another."""
    got, model, _, p = run_case(tmp_path, 3, 272, 70, "u4-g32-zp", 2, seed=11)
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


@needs_vnni
@pytest.mark.parametrize("m", [1, 2, 3, 4, 16])
def test_small_m_defaults_run_the_fused_kernel(m):
    """The default config of M <= 4 (and up to tuning.FUSED_MAX_M) on a VNNI host is the
    fused row kernel: its source has no unpack buffer and one vpdpbusd per code and row."""
    tgt = get_target("cpu")
    key = key_for(m, 4096, 4096, "u4-g128-zp")
    cfg = tuning.default_config(tgt, key)
    ks = tuning.problem(tgt, key).kernel_shape()
    assert cfg["order"] == "row" and kernels.int8_fused(ks, cfg)
    src = runtime.scheduled_source(ks, [cfg])
    assert "unpack" not in src and "vpdpbusd" in src
    assert src == runtime.scheduled_source(ks, [cfg])  # deterministic text
