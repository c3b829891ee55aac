"""The qmatmul kernels (split-K GEMV and tiled mma.sync, codegen/cuda/include/qcompiler/) run
on the CPU through the host emulation of their CUDA (tests/cuda_host/emulator/emulator.h):
the generated .cu of a packed layer, built with g++, every variant the tile pass chose at M
from 1 to 130, against the reference with the GPU tests' tolerance (cases.TOLERANCE). The
wgmma/TMA kernel (sm_90a) is not emulated: these are built for cuda-sm80.

What it can show: the packing, unpacking (LOP3/PRMT magic numbers, zero points, scales,
act-order), fragment and tile indexing, split-K fix-up and the epilogue's stores. What it
cannot: races, missing cp.async waits, launch limits, speed (the GPU tests and benchmarks).
"""
from __future__ import annotations

import pytest

from cuda_emulation import EmulatedQmm
from qcompiler.codegen.cuda import bench_support as bs, cases
from test_cuda_gpu import FORMATS as GPU_FORMATS

TARGET = "cuda-sm80"
# test_cuda_gpu.py's formats: every unpack path (LOP3 f16, shift bf16, PRMT 8-bit, 2/3-bit
# in 4-bit containers), zero points, act-order and bias
FORMATS = {k: GPU_FORMATS[k] for k in (
    "u4_zp_g128_f16", "i4_g128_bf16", "u4_zp_g32_actorder_f16", "u8_zp_g64_bf16",
    "i8_perchannel_f16", "u2_zp_g64_f16", "i3_g128_bf16")}
SHAPE = (256, 200)  # K, N: N not a multiple of 64 (padded tiles)
MS = (1, 5, 16, 33, 130)


def _emulated(case: cases.Case, workdir, variants: list | None = None):
    """(the reference module, the packed layer's EmulatedQmm); ``variants``: explicit configs
    instead of the tile pass's (as the tuner gives them)."""
    from qcompiler.codegen.cuda.config import KNOBS

    module, packed, node = bs.pack_case(case, TARGET)
    if variants is not None:
        node.attrs["config"] = {**node.attrs["config"], "variants": {
            f"v{i:02d}": {"m_max": v["m_max"], "source": "explicit", "wgmma": 0,
                          **{k: int(v[k]) for k in KNOBS}} for i, v in enumerate(variants)}}
    return module, EmulatedQmm(node, packed, workdir, TARGET)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_variant_in_host_emulation(fmt, tmp_path):
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=SHAPE[0], n=SHAPE[1], bits=bits, signed=signed, zero_point=zp,
                      group=group, act_order=ao, dtype=dtype, bias=bias)
    module, qmm = _emulated(case, tmp_path)
    kinds = set()
    for m in MS:
        x = cases.random_x(case, m, seed=m)
        ref = cases.reference(module, x)
        for i, v in enumerate(qmm.variants):
            if m > v["m_max"] * 4:  # a small-M variant at large M only costs time
                continue
            kinds.add("gemv" if v["gemv"] else "tiled")
            err = cases.rel_error(qmm.run(x, case.n, i), ref)
            assert err <= cases.TOLERANCE[dtype], f"{fmt} M={m} variant {v}: rel error {err:.3g}"
    assert kinds == {"gemv", "tiled"}, kinds


# split-K (the last CTA's fix-up of the partial sums) and scales applied to fp32 sums
# (acc_scale), which the heuristic does not pick at this size, as explicit variants
SPLIT_VARIANTS = [
    {"m_max": 8, "gemv": 1, "m_frags": 1, "warps_n": 1, "warps_k": 2, "stages": 4,
     "stage_k": 64, "acc_scale": 0, "split_k": 4},
    {"m_max": 64, "gemv": 0, "m_frags": 1, "warps_n": 2, "warps_k": 2, "stages": 3,
     "stage_k": 64, "acc_scale": 1, "split_k": 2},
    {"m_max": 4096, "gemv": 0, "m_frags": 2, "warps_n": 1, "warps_k": 4, "stages": 2,
     "stage_k": 128, "acc_scale": 0, "split_k": 3},
]


@pytest.mark.parametrize("fmt", ["u4_zp_g128_f16", "i4_g128_bf16"])
def test_split_k_and_fp32_scaling_in_host_emulation(fmt, tmp_path):
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=1024, n=136, bits=bits, signed=signed, zero_point=zp, group=group,
                      act_order=ao, dtype=dtype, bias=bias)
    module, qmm = _emulated(case, tmp_path, SPLIT_VARIANTS)
    for m in (1, 7, 40, 70):
        x = cases.random_x(case, m, seed=m)
        ref = cases.reference(module, x)
        for i, v in enumerate(qmm.variants):
            if m > v["m_max"]:
                continue
            for call in range(2):  # the split-K counters must be back at zero for a second call
                err = cases.rel_error(qmm.run(x, case.n, i), ref)
                assert err <= cases.TOLERANCE[dtype], \
                    f"{fmt} M={m} variant {v} call {call}: rel error {err:.3g}"
