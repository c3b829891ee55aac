"""The qmatmul kernels (split-K GEMV and tiled mma.sync, codegen/cuda/include/qcompiler/) run
on the CPU through the host emulation of their CUDA (tests/cuda_host/emulator/emulator.h):
the generated .cu of a packed layer, built with g++, every variant the tile pass chose at M
from 1 to 130 (and the tiled kernel's, which it no longer chooses for a layer this small), against the reference with the GPU tests' tolerance (cases.TOLERANCE). The
wgmma/TMA kernel (sm_90a) is not emulated: these are built for cuda-sm80.

What it can show: the packing, unpacking (LOP3/PRMT magic numbers, zero points, scales,
act-order), fragment and tile indexing, split-K fix-up and the epilogue's stores. What it
cannot: races, missing cp.async waits, launch limits, speed (the GPU tests and benchmarks).
"""
from __future__ import annotations

import os

import pytest

from cuda_emulation import EmulatedQmm
from qcompiler.codegen.cuda import bench_support as bs, cases, tuning
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
    module, packed, node = bs.pack_case(case, TARGET)
    if variants is not None:
        bs.set_variants(node, variants)
    return module, EmulatedQmm(node, packed, workdir, TARGET)


def _tile_pass_variants(case: cases.Case) -> list[dict]:
    """The tile pass's variants for ``case``, then the tiled ones it gives with the GEMV kept
    to small M (``GEMV_MAX_REREAD_BYTES`` 0): a layer this small takes the GEMV kernel at
    every M, and the tiled kernel's buckets must run too."""
    _, _, node = bs.pack_case(case, TARGET)
    chosen = list(node.attrs["config"]["variants"].values())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "GEMV_MAX_REREAD_BYTES", 0)
        _, _, node = bs.pack_case(case, TARGET)
    return chosen + [v for v in node.attrs["config"]["variants"].values() if not v["gemv"]]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_variant_in_host_emulation(fmt, tmp_path):
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=SHAPE[0], n=SHAPE[1], bits=bits, signed=signed, zero_point=zp,
                      group=group, act_order=ao, dtype=dtype, bias=bias)
    module, qmm = _emulated(case, tmp_path, _tile_pass_variants(case))
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


# ---- int8 activations (include/qcompiler/tiled_i8.cuh) --------------------------------------
# Every kind of format the int8 kernel takes (all 1-8 bit integer codes), with MatMulNBits's
# permission (accuracy_level 4). Explicit variants: M tiles of 16 and 32 rows,
# stages of 64 rows (the 4-chunk swizzle) and 128, 1, 2 and 4 k warps (a k32 step a warp per
# stage with 4), split-K 4 ways over 6 stages (uneven).
INT8_FORMATS = ("u4_zp_g128_f16", "i4_g128_bf16", "u4_zp_g32_actorder_f16",
                "i8_perchannel_f16", "u8_zp_g64_bf16", "u2_zp_g64_f16", "i3_g128_bf16")
INT8_VARIANTS = [
    {"m_max": 16, "gemv": 0, "m_frags": 1, "warps_n": 2, "warps_k": 2, "stages": 3,
     "stage_k": 128, "acc_scale": 0, "split_k": 1, "int8": 1},
    {"m_max": 64, "gemv": 0, "m_frags": 2, "warps_n": 1, "warps_k": 1, "stages": 2,
     "stage_k": 64, "acc_scale": 0, "split_k": 4, "int8": 1},
    {"m_max": 4096, "gemv": 0, "m_frags": 2, "warps_n": 4, "warps_k": 4, "stages": 4,
     "stage_k": 128, "acc_scale": 0, "split_k": 1, "int8": 1},
]
INT8_TOLERANCE = cases.INT8_TOLERANCE  # against cases.int8_model


def _int8_case(fmt: str, k: int, n: int) -> cases.Case:
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    return cases.Case(k=k, n=n, bits=bits, signed=signed, zero_point=zp, group=group,
                      act_order=ao, dtype=dtype, bias=bias, accuracy_level=4)


# K = 368 (whole 16-element chunks): the quantizer's chunk-a-lane path; 372 (x read with an
# odd stride) and act-order: its element-a-lane path. Both padded to 384.
QUANTIZER_CHUNKS = ("i4_g128_bf16", "u8_zp_g64_bf16", "i8_perchannel_f16")


@pytest.mark.parametrize("fmt", INT8_FORMATS)
def test_int8_activations_in_host_emulation(fmt, tmp_path):
    case = _int8_case(fmt, 368 if fmt in QUANTIZER_CHUNKS else 372, 200)  # N: padded
    module, packed, node = bs.pack_case(case, TARGET)
    bs.set_variants(node, INT8_VARIANTS)
    qmm = EmulatedQmm(node, packed, tmp_path, TARGET)
    for m in (1, 5, 16, 33, 70):
        x = cases.random_x(case, m, seed=m)
        model = cases.int8_model(module, x)
        ref = cases.reference(module, x)
        for i, v in enumerate(qmm.variants):
            for call in range(2):  # split-K counters back at zero; the workspace reused
                y = qmm.run(x, case.n, i)
                err = cases.rel_error(y, model)
                assert err <= INT8_TOLERANCE[case.dtype], \
                    f"{fmt} M={m} variant {v} call {call}: {err:.3g} from the int8 model"
        # the int8 numerics: close to the float product, and farther than the bound above
        assert INT8_TOLERANCE[case.dtype] < cases.rel_error(model, ref) < 0.05


# ---- FP8 e4m3 weights (the fp8-e4m3-f16 unpack) --------------------------------------------
@pytest.mark.parametrize("group", [0, 64], ids=["perchannel", "g64"])
def test_fp8_weights_in_host_emulation(group, tmp_path):
    """FP8 e4m3 weights (subnormals included) through every variant the tile pass picks, and
    the tiled kernel's split-K, against the reference's float product (exact unpack: only the
    f16 products' and output's rounding)."""
    case = cases.Case(k=372, n=200, fp8=True, group=group, bias=True)
    module, qmm = _emulated(case, tmp_path)
    kinds = set()
    for m in (1, 5, 33, 130):
        x = cases.random_x(case, m, seed=m)
        ref = cases.reference(module, x)
        for i, v in enumerate(qmm.variants):
            if m > v["m_max"] * 4:
                continue
            kinds.add("gemv" if v["gemv"] else "tiled")
            err = cases.rel_error(qmm.run(x, case.n, i), ref)
            assert err <= cases.TOLERANCE["f16"], f"FP8 M={m} variant {v}: rel error {err:.3g}"
    assert kinds == {"gemv", "tiled"}, kinds


# FP8 e4m3 activations on FP8 e4m3 weights (the 8-bit-activation kernel with FP8=true; sm_89+
# targets): the int8 tests' tiles, against the kernel's numpy model (cases.fp8_model).
FP8_VARIANTS = [{**v, "int8": 0, "fp8": 1} for v in INT8_VARIANTS]


@pytest.mark.parametrize("group", [0, 64], ids=["perchannel", "g64"])
def test_fp8_activations_in_host_emulation(group, tmp_path):
    # per channel: K = 368, the quantizer's chunk-a-lane path; g64: 372, element a lane
    case = cases.Case(k=372 if group else 368, n=200, fp8=True, group=group, bias=True)
    module, packed, node = bs.pack_case(case, "cuda-sm89")
    bs.set_variants(node, FP8_VARIANTS)
    qmm = EmulatedQmm(node, packed, tmp_path, "cuda-sm89")
    for m in (1, 5, 16, 33, 70):
        x = cases.random_x(case, m, seed=m)
        model = cases.fp8_model(module, x)
        for i, v in enumerate(qmm.variants):
            for call in range(2):
                err = cases.rel_error(qmm.run(x, case.n, i), model)
                assert err <= cases.FP8_TOLERANCE["f16"], \
                    f"FP8 M={m} variant {v} call {call}: {err:.3g} from the fp8 model"
        # FP8 activations are coarser than int8: far from the float product, but near it
        assert cases.FP8_TOLERANCE["f16"] < cases.rel_error(model, cases.reference(module, x)) < 0.1


def test_emulator_faults_past_the_launched_shared_memory(tmp_path):
    """The emulator's dynamic shared memory ends at what the launch asked for (rounded up to
    128 bytes) and an inaccessible page follows: a kernel that reads past it crashes (so the
    tests above would catch a shared-memory layout larger than its launch), one that stays
    inside runs; each block starts with ones in it."""
    import subprocess
    import sys

    from cuda_emulation import compile_emulated
    from qcompiler.codegen.cuda.build import INCLUDE_DIR

    lib = compile_emulated(
        '#include "qcompiler/params.cuh"\n'
        '__global__ void k(int n, int* out) { unsigned char* s = qc_emu::shared;\n'
        '  if (threadIdx.x == 0) { s[n - 1] = 7; *out = s[n - 1]; } }\n'
        'extern "C" int run(int smem, int n) { int out = 0;\n'
        '  QC_LAUNCH(k, 1, 32, smem, nullptr, n, &out); return out; }\n'
        '__global__ void unwritten(int* out) { if (threadIdx.x == 0) *out = qc_emu::shared[5]; }\n'
        'extern "C" int fresh() { int out = 0; QC_LAUNCH(k, 1, 32, 64, nullptr, 6, &out);\n'
        '  QC_LAUNCH(unwritten, 1, 32, 64, nullptr, &out); return out; }\n',
        tmp_path, "guard", [INCLUDE_DIR])
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).run; "
            "print(f(int(sys.argv[2]), int(sys.argv[3])))")
    inside = subprocess.run([sys.executable, "-c", code, lib, "1000", "1024"],
                            capture_output=True, text=True)
    assert inside.returncode == 0 and inside.stdout.strip() == "7", inside
    past = subprocess.run([sys.executable, "-c", code, lib, "1000", "1025"],
                          capture_output=True, text=True)
    assert past.returncode != 0, past  # SIGSEGV
    # a block finds its shared memory full of ones, not what an earlier launch left there
    import ctypes

    assert ctypes.CDLL(lib).fresh() == 255
    # the emulated kernels' host buffers (cuda_emulation.guarded) end before a guard page too
    code = ("import sys, ctypes, numpy as np; sys.path.insert(0, sys.argv[1]); "
            "from cuda_emulation import guarded; a = guarded(np.arange(1000, dtype=np.float32)); "
            "assert np.array_equal(a, np.arange(1000)) and a.ctypes.data % 256 == 0; "
            "print(ctypes.string_at(a.ctypes.data + a.nbytes + int(sys.argv[2]), 1))")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    near = subprocess.run([sys.executable, "-c", code, tests_dir, "0"], capture_output=True)
    assert near.returncode == 0, near.stderr[-500:]  # (within the 256-byte alignment slack)
    far = subprocess.run([sys.executable, "-c", code, tests_dir, "256"], capture_output=True)
    assert far.returncode != 0


def _gemv_acc_scale_variants(k: int, group: int) -> list[dict]:
    """GEMV variants with acc_scale (each warp's run one group): one group a warp without a
    split, the same over 2 K splits, two M fragments, then a tiled variant for larger M."""
    steps = k // 16 // (group // 16)  # groups: one per warp
    return [
        {"m_max": 8, "gemv": 1, "m_frags": 1, "warps_n": 1, "warps_k": steps, "stages": 4,
         "stage_k": 64, "acc_scale": 1, "split_k": 1},
        {"m_max": 16, "gemv": 1, "m_frags": 1, "warps_n": 1, "warps_k": steps // 2,
         "stages": 4, "stage_k": 64, "acc_scale": 1, "split_k": 2},
        {"m_max": 32, "gemv": 1, "m_frags": 2, "warps_n": 1, "warps_k": steps, "stages": 2,
         "stage_k": 64, "acc_scale": 1, "split_k": 1},
        {"m_max": 4096, "gemv": 0, "m_frags": 1, "warps_n": 1, "warps_k": 2, "stages": 2,
         "stage_k": 64, "acc_scale": 0, "split_k": 1},
    ]


@pytest.mark.parametrize("fmt", ["u4_zp_g128_f16", "i4_g128_bf16", "u8_zp_g64_bf16",
                                 "u2_zp_g64_f16"])
def test_gemv_scales_on_the_sums_in_host_emulation(fmt, tmp_path):
    """acc_scale=1 on the GEMV kernel (tile{gemv_acc_scale=1}): the codes unpacked to their
    exact integers and each warp's sums multiplied by its group's scales after its loop;
    zero points, bf16, 8- and 2-bit codes, K split over CTAs, two M fragments, against the
    reference (the scale must reach each accumulator's own column: a swapped half fails)."""
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=1024, n=200, bits=bits, signed=signed, zero_point=zp, group=group,
                      act_order=ao, dtype=dtype, bias=bias)
    variants = _gemv_acc_scale_variants(case.k, group)
    for v in variants:
        key = {"op": "qmatmul", "m": v["m_max"], "k": case.k, "n": case.n,
               "w_scheme": str(case.scheme()), "act_order": False}
        assert tuning.check_config(tuning_target(), key, v) is None, v
    module, qmm = _emulated(case, tmp_path, variants)
    for m in (1, 5, 16, 30):
        x = cases.random_x(case, m, seed=m)
        ref = cases.reference(module, x)
        for i, v in enumerate(qmm.variants):
            if m > v["m_max"] or not v["gemv"]:
                continue
            err = cases.rel_error(qmm.run(x, case.n, i), ref)
            assert err <= cases.TOLERANCE[dtype], f"{fmt} M={m} variant {v}: rel error {err:.3g}"


def tuning_target():
    from qcompiler.targets import get_target

    return get_target(TARGET)


def test_gemv_scales_on_the_sums_only_where_a_run_keeps_to_one_group():
    """The config check and the heuristic (tile{gemv_acc_scale=1}, the default) take acc_scale on the GEMV
    only where every warp's k16 steps lie in one group: K 2048 at group 128 with 16 k warps
    (the 22-layer decode's 2048-row layers), not K 5632 split 4 (a warp's 5.5 steps cross
    groups), not per-channel scales."""
    from qcompiler.codegen.cuda.config import gemv_runs_in_one_group

    assert gemv_runs_in_one_group(128, 1, 16, 8) and gemv_runs_in_one_group(128, 2, 8, 8)
    assert not gemv_runs_in_one_group(352, 4, 16, 8) and not gemv_runs_in_one_group(128, 1, 8, 8)
    tgt = tuning_target()
    scheme = str(cases.Case(k=2048, n=2048, bits=4, signed=True, zero_point=False,
                            group=128).scheme())
    key = {"op": "qmatmul", "m": 1, "k": 2048, "n": 2048, "w_scheme": scheme,
           "act_order": False, "act": "none", "x_dtype": "f16", "has_bias": False}
    plain = tuning.default_config(tgt, key, gemv_acc_scale=False)
    chosen = tuning.default_config(tgt, key)  # (on by default)
    assert plain["acc_scale"] == 0 and chosen["acc_scale"] == 1
    assert {k: v for k, v in chosen.items() if k != "acc_scale"} == \
        {k: v for k, v in plain.items() if k != "acc_scale"}
    assert tuning.check_config(tgt, key, chosen) is None
    crossing = dict(chosen, warps_k=8)  # 16 steps a warp: two groups
    assert "crosses a group" in tuning.check_config(tgt, key, crossing)
    down = dict(key, k=5632, n=2048)
    assert tuning.default_config(tgt, down, gemv_acc_scale=True)["acc_scale"] == 0
    channel = dict(key, w_scheme=str(cases.Case(k=2048, n=2048, bits=8, signed=True,
                                                 zero_point=False, group=0).scheme()))
    assert tuning.default_config(tgt, channel, gemv_acc_scale=True)["acc_scale"] == 0
    assert "group scales" in tuning.check_config(tgt, channel, dict(chosen))


# ---- x_norm (fuse-norm-qmatmul): x normalized by the kernel ------------------------------------
# GEMV variants apply RMSNorm after the product (x * g in the loop, each row's 1 / rms on the
# sums, every K split alike) and normalize LayerNorm's rows into shared memory (up to 48 KB
# of rows); the others (and a LayerNorm GEMV whose rows do not fit, or an act-order x) read a
# normalized copy that the call writes into the workspace first; the int8 kernel quantizes
# that copy.
NORM_VARIANTS = [
    {"m_max": 8, "gemv": 1, "m_frags": 1, "warps_n": 1, "warps_k": 4, "stages": 4,
     "stage_k": 64, "acc_scale": 0, "split_k": 2},
    {"m_max": 16, "gemv": 1, "m_frags": 2, "warps_n": 2, "warps_k": 2, "stages": 2,
     "stage_k": 64, "acc_scale": 0, "split_k": 1},
    {"m_max": 4096, "gemv": 0, "m_frags": 2, "warps_n": 1, "warps_k": 4, "stages": 2,
     "stage_k": 64, "acc_scale": 0, "split_k": 1},
]


def _normed(case: cases.Case, seed: int = 0, epsilon: float = 1e-5, kind: str = "rms"):
    """(the unfused module: the norm (rmsnorm, or layernorm with a bias) then the qmatmul,
    the fused one after fuse-norm-qmatmul)."""
    import numpy as np

    from qcompiler.ir import constant_node
    from qcompiler.ir.types import tensor
    from qcompiler.pipeline import PassManager

    module = cases.make_module(case, seed)
    fn = module.main
    q = next(n for n in fn.nodes if n.op == "qmatmul")
    x = q.operands[0]
    w = np.random.default_rng(seed + 7).uniform(0.5, 1.5, case.k).astype(x.type.dtype.np_dtype)
    g = constant_node(fn, module, w, tensor([case.k], case.dtype), "norm_w", before=q).result
    operands = [x, g]
    if kind == "layer":
        b = np.random.default_rng(seed + 8).standard_normal(case.k).astype(w.dtype)
        operands.append(constant_node(fn, module, b, tensor([case.k], case.dtype), "norm_b",
                                      before=q).result)
    norm = fn.make_node("rmsnorm" if kind == "rms" else "layernorm", operands, [x.type],
                        {"axis": -1, "epsilon": epsilon}, before=q)
    q.operands[0] = norm.result
    fused = PassManager.parse("fuse-norm-qmatmul").run(module.clone())
    assert [n.attrs.get("x_norm") for n in fused.main.nodes if n.op == "qmatmul"] == [kind]
    return module, fused


@pytest.mark.parametrize("fmt,k,kind", [("u4_zp_g128_f16", 1024, "rms"),
                                        ("i4_g128_bf16", 1600, "rms"),
                                        ("i4_g128_bf16", 2560, "rms"),
                                        ("u4_zp_g32_actorder_f16", 256, "rms"),
                                        ("u4_zp_g128_f16", 1000, "rms"),
                                        ("u4_zp_g128_f16", 1024, "layer"),
                                        ("i4_g128_bf16", 1600, "layer"),
                                        ("u4_zp_g32_actorder_f16", 256, "layer")])
def test_x_norm_in_host_emulation(fmt, k, kind, tmp_path):
    """RMSNorm: the GEMV variants (one with split_k 2: each split scales its own sums) take
    the row statistics in 16-byte packs, any K (K 1000: steps past K read no scale). LayerNorm: K 1600's 16 rows (51 KB) no longer
    fit the GEMV's shared memory, one row does; its 128 threads take x in 16-byte packs,
    prefetching the norm's parameters (NormPacks), up to K = 2048 (two packs a thread).
    act-order: always the workspace copy (normalized and permuted at once)."""
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=k, n=136, bits=bits, signed=signed, zero_point=zp, group=group,
                      act_order=ao, dtype=dtype, bias=bias)
    module, fused = _normed(case, kind=kind)
    _, packed, node = bs.pack_case(case, TARGET, module=fused)
    bs.set_variants(node, NORM_VARIANTS)
    qmm = EmulatedQmm(node, packed, tmp_path, TARGET)
    for m in (1, 5, 16, 33):
        x = cases.random_x(case, m, seed=m) * 3  # rows far from unit RMS
        ref = cases.reference(module, x)
        for i, v in enumerate(qmm.variants):
            if m > v["m_max"] * 4:
                continue
            for call in range(2):
                err = cases.rel_error(qmm.run(x, case.n, i), ref)
                assert err <= cases.TOLERANCE[dtype], \
                    f"{fmt} {kind} K={k} M={m} variant {v} call {call}: rel error {err:.3g}"


def test_x_norm_with_int8_activations_in_host_emulation(tmp_path):
    """The int8 kernel quantizes the normalized copy (the act-order permutation its own)."""
    from qcompiler.runtime.reference import rms_normalize

    case = _int8_case("u4_zp_g32_actorder_f16", 256, 72)
    module, fused = _normed(case, seed=3)
    _, packed, node = bs.pack_case(case, TARGET, module=fused)
    bs.set_variants(node, INT8_VARIANTS[:2])
    qmm = EmulatedQmm(node, packed, tmp_path, TARGET)
    plain = cases.make_module(case, 3)  # the same weights without the norm
    w = next(n for n in module.main.nodes if n.op == "rmsnorm").operands[1]
    from qcompiler.ir.core import constant_value
    scale = constant_value(module, w)
    for m in (1, 9, 40):
        x = cases.random_x(case, m, seed=m) * 3
        model = cases.int8_model(plain, rms_normalize(x, scale, 1e-5, axis=-1))
        for i in range(len(qmm.variants)):
            err = cases.rel_error(qmm.run(x, case.n, i), model)
            assert err <= INT8_TOLERANCE[case.dtype], f"M={m} variant {i}: {err:.3g}"
