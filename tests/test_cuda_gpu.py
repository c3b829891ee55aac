"""CUDA kernels on a real GPU against the numpy reference (skipped without a GPU).

Fresh random inputs every run (the seed is printed on failure); outputs are poisoned with NaN
before each launch so that an unwritten element fails. Tolerances: relative Frobenius error
(cases.TOLERANCE) — fp16 weights rounded once plus fp16 output rounding; bf16 ~8x coarser.
"""
import os

import numpy as np
import pytest

from cuda_gpu_util import gpu_reason
from qcompiler.codegen.cuda import bench_support as bs
from qcompiler.codegen.cuda import cases, tuning

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(gpu_reason()), reason=f"GPU tests: {gpu_reason()}")]

# (bits, signed, zero_point, group, act_order, dtype, bias)
FORMATS = {
    "u4_zp_g128_f16": (4, False, True, 128, False, "f16", False),
    "i4_g128_bf16": (4, True, False, 128, False, "bf16", False),
    "i4_g128_f16": (4, True, False, 128, False, "f16", True),
    "u4_zp_g32_actorder_f16": (4, False, True, 32, True, "f16", True),
    "u4_zp_g64_actorder_bf16": (4, False, True, 64, True, "bf16", False),
    "i8_perchannel_f16": (8, True, False, 0, False, "f16", True),
    "u8_zp_g64_bf16": (8, False, True, 64, False, "bf16", False),
    "u8_zp_g128_f16": (8, False, True, 128, False, "f16", False),
    "u2_zp_g64_f16": (2, False, True, 64, False, "f16", False),
    "i3_g128_bf16": (3, True, False, 128, False, "bf16", False),
    "u4_zp_perchannel_bf16": (4, False, True, 0, False, "bf16", True),
}
SHAPES = [(512, 256), (11008, 37), (200, 130)]
MS = [1, 3, 16, 33, 64, 100, 300]


def _case(fmt, shape):
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    k, n = shape
    if group and k % group and ao:
        pytest.skip("act-order needs K divisible by the group")
    return cases.Case(k=k, n=n, bits=bits, signed=signed, zero_point=zp, group=group,
                      act_order=ao, dtype=dtype, bias=bias)


def _check(kern, built, m, variant=-1):
    seed = int.from_bytes(os.urandom(4), "little")
    x = cases.random_x(built.case, m, seed)
    y = kern.run_numpy(x, variant=variant, poison=True)
    ref = cases.reference(built.module, x)
    err = cases.rel_error(y, ref)
    assert err <= cases.TOLERANCE[built.case.dtype], \
        f"{built.case.name} M={m} variant={variant} seed={seed}: rel error {err:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"k{s[0]}n{s[1]}")
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats_shapes_and_m(fmt, shape, tmp_path):
    built = bs.build_case(_case(fmt, shape), str(tmp_path))
    kern = bs.load_kernel(built)
    for m in MS:
        _check(kern, built, m)


# Explicit variants: every tile shape, warp split and split-K path of both kernels, M tails
# included. (gemv, m_frags, warps_n, warps_k, stages, stage_k, acc_scale, split_k)
VARIANTS = [dict(zip(("gemv", "m_frags", "warps_n", "warps_k", "stages", "stage_k", "acc_scale",
                          "split_k"), v)) for v in [
    (0, 1, 1, 4, 8, 128, 1, 7),
    (0, 1, 2, 2, 2, 64, 1, 1),
    (0, 1, 4, 1, 3, 64, 0, 3),
    (0, 1, 4, 2, 4, 128, 1, 2),
    (0, 2, 2, 4, 4, 128, 0, 2),
    (0, 4, 4, 2, 3, 64, 0, 1),
    (0, 4, 2, 1, 4, 128, 0, 5),
    (0, 4, 1, 4, 6, 64, 0, 16),
    (1, 1, 4, 2, 4, 64, 0, 1),
    (1, 1, 1, 8, 4, 64, 0, 3),
    (1, 1, 2, 1, 2, 64, 0, 16),
    (1, 2, 8, 1, 4, 64, 0, 2),
    (1, 2, 1, 4, 3, 64, 0, 5),
    (1, 1, 1, 16, 8, 64, 0, 1),
    (1, 2, 1, 16, 4, 64, 0, 4),
]]


@pytest.mark.parametrize("fmt", ["u4_zp_g128_f16", "i4_g128_bf16", "u8_zp_g64_bf16"])
def test_every_variant(fmt, tmp_path):
    built = bs.build_case(_case(fmt, (1024, 512)), str(tmp_path), variants=VARIANTS)
    kern = bs.load_kernel(built)
    for i in range(len(VARIANTS)):
        for m in (1, 17, 64, 130):
            _check(kern, built, m, variant=i)


@pytest.mark.parametrize("fmt", ["u4_zp_g128_f16", "i4_g128_bf16", "u8_zp_g64_bf16"])
def test_gemv_acc_scale_variants(fmt, tmp_path):
    """The GEMV kernel with each warp's group scales on its sums (acc_scale=1,
    tile{gemv_acc_scale=1}): one group a warp, over 2 K splits, two M fragments."""
    from test_cuda_qmatmul_emulation import _gemv_acc_scale_variants

    case = _case(fmt, (1024, 512))
    variants = [v for v in _gemv_acc_scale_variants(case.k, case.group) if v["gemv"]]
    built = bs.build_case(case, str(tmp_path), variants=variants)
    kern = bs.load_kernel(built)
    for i, v in enumerate(variants):
        for m in (1, 5, v["m_max"]):
            _check(kern, built, m, variant=i)


# int8 activations (tiled_i8.cuh) on the device: every format the int8 kernel takes, with the
# permission of accuracy_level 4, against its numpy model (cases.int8_model) with its
# tolerance; tile shapes, k warps, 64- and 128-row stages and split-K, at M tails.
INT8_FORMATS = ["u4_zp_g128_f16", "i4_g128_bf16", "u4_zp_g32_actorder_f16",
                "i8_perchannel_f16", "u8_zp_g64_bf16", "u2_zp_g64_f16", "u4_zp_perchannel_bf16"]
INT8_VARIANTS = [{**v, "gemv": 0, "acc_scale": 0, "int8": 1} for v in (
    {"m_frags": 1, "warps_n": 2, "warps_k": 2, "stages": 3, "stage_k": 128, "split_k": 1},
    {"m_frags": 2, "warps_n": 4, "warps_k": 2, "stages": 4, "stage_k": 128, "split_k": 1},
    {"m_frags": 2, "warps_n": 1, "warps_k": 1, "stages": 2, "stage_k": 64, "split_k": 5},
    {"m_frags": 2, "warps_n": 2, "warps_k": 4, "stages": 4, "stage_k": 128, "split_k": 3},
)]


@pytest.mark.parametrize("fmt", INT8_FORMATS)
def test_int8_activation_variants(fmt, tmp_path):
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=1024, n=456, bits=bits, signed=signed, zero_point=zp, group=group,
                      act_order=ao, dtype=dtype, bias=bias, accuracy_level=4)
    built = bs.build_case(case, str(tmp_path), variants=INT8_VARIANTS)
    _check_against_model(built, len(INT8_VARIANTS), cases.int8_model,
                         cases.INT8_TOLERANCE[dtype])


def _check_against_model(built, n_variants: int, model, tolerance: float):
    """Every variant at M tails against ``model`` (the numpy model of its numerics)."""
    kern = bs.load_kernel(built)
    for i in range(n_variants):
        for m in (1, 17, 64, 130, 300):
            seed = int.from_bytes(os.urandom(4), "little")
            x = cases.random_x(built.case, m, seed)
            y = kern.run_numpy(x, variant=i, poison=True)
            err = cases.rel_error(y, model(built.module, x))
            assert err <= tolerance, \
                f"{built.case.name} M={m} variant={i} seed={seed}: {err:.3g} from the model"


# The sm_90a wgmma kernel with 8-bit activations (wgmma_act8.cuh, wgmma=2 with int8=1 or
# fp8=1): M tiles of 64-256, one and two consumer warpgroups, 1 or 2 blocks a warpgroup,
# split-K, on the formats it takes (int8: groups of a multiple of 128 rows with the stage's
# fold, or per-channel scales; FP8: per channel). (m_frags, warps_n, warps_k, stages, split_k)
WGMMA_ACT8_VARIANTS = [{"wgmma": 2, "gemv": 0, "m_frags": mf, "warps_n": wn, "warps_k": wk,
                        "stages": st, "stage_k": 128, "acc_scale": 0, "split_k": sk}
                       for mf, wn, wk, st, sk in [(8, 2, 2, 4, 1), (4, 4, 2, 3, 3),
                                                  (8, 1, 1, 2, 2), (16, 2, 2, 4, 1),
                                                  (4, 2, 1, 5, 1)]]


def _act8_variants(case, knob: str) -> list[dict]:
    """The WGMMA_ACT8_VARIANTS the validator allows for ``case`` (with ``knob`` set)."""
    from qcompiler.targets import get_target
    from qcompiler.tuning.key import kernel_key

    _, _, node = bs.pack_case(case)
    key = kernel_key(node, 512)
    out = [{**v, knob: 1} for v in WGMMA_ACT8_VARIANTS]
    return [v for v in out if tuning.check_config(get_target("cuda-sm90"), key, v) is None]


@pytest.mark.parametrize("fmt", ["u4_zp_g128_f16", "i4_g128_bf16", "u8_zp_g128_f16",
                                 "i8_perchannel_f16", "u4_zp_perchannel_bf16"])
def test_wgmma_int8_activation_variants(fmt, tmp_path):
    if not _sm90():
        pytest.skip("the wgmma kernel needs sm_90")
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=1024, n=456, bits=bits, signed=signed, zero_point=zp, group=group,
                      act_order=ao, dtype=dtype, bias=bias, accuracy_level=4)
    variants = _act8_variants(case, "int8")
    assert len(variants) >= 4  # every format runs each mapping and a split of K
    built = bs.build_case(case, str(tmp_path), variants=variants)
    _check_against_model(built, len(variants), cases.int8_model, cases.INT8_TOLERANCE[dtype])


def test_wgmma_fp8_activation_variants(tmp_path):
    if not _sm90():
        pytest.skip("the wgmma kernel needs sm_90")
    case = cases.Case(k=1024, n=456, fp8=True, group=0, bias=True)
    variants = _act8_variants(case, "fp8")
    # FP8 holds three sets of sums a stage (its own, the held ones, the fp32 accumulators):
    # M tiles of up to 128 tokens, so every variant but the 256-token one (m_frags 16)
    assert [v["m_frags"] for v in variants] == [v["m_frags"] for v in WGMMA_ACT8_VARIANTS
                                                if v["m_frags"] * 16 <= 128]
    built = bs.build_case(case, str(tmp_path), target="cuda-sm90", variants=variants)
    _check_against_model(built, len(variants), cases.fp8_model, cases.FP8_TOLERANCE["f16"])


@pytest.mark.parametrize("group", [0, 128], ids=["perchannel", "g128"])
def test_fp8_weights_and_fp8_activation_variants(group, tmp_path):
    """FP8 e4m3 weights: the f16 kernels (fp8-e4m3-f16 unpack) against the reference, and the
    FP8-activation variants (sm_89+, mma e4m3) against their numpy model (cases.fp8_model)."""
    case = cases.Case(k=1024, n=456, fp8=True, group=group, bias=True)
    built = bs.build_case(case, str(tmp_path / "f16"), target="cuda-sm90")
    kern = bs.load_kernel(built)
    for m in (1, 17, 64, 300):
        _check(kern, built, m)
    variants = [{**v, "int8": 0, "fp8": 1} for v in INT8_VARIANTS]
    built = bs.build_case(case, str(tmp_path / "fp8"), target="cuda-sm90", variants=variants)
    _check_against_model(built, len(variants), cases.fp8_model, cases.FP8_TOLERANCE["f16"])


@pytest.mark.parametrize("device_plan", ["1", "0"])
def test_artifact_numpy_and_torch_no_copy(tmp_path, monkeypatch, device_plan):
    """qcompiler.load(DIR).run with numpy arrays and with torch CUDA tensors, through the
    device plan (the default) and without it (QC_CUDA_PLAN=0: host ops, qmatmul kernels)."""
    monkeypatch.setenv("QC_CUDA_PLAN", device_plan)
    torch = pytest.importorskip("torch")
    import qcompiler
    from qcompiler.driver.api import compile_to_dir

    case = cases.Case(k=1024, n=320, bits=4, zero_point=True, group=128, bias=True)
    module = cases.make_module(case, seed=3)
    out_dir, _ = compile_to_dir(module, "cuda-sm90", str(tmp_path / "art"))
    loaded = qcompiler.load(out_dir)
    x = cases.random_x(case, 5, seed=int.from_bytes(os.urandom(4), "little"))
    ref = cases.reference(module, x)
    y = loaded.run({"x": x})["y"]
    assert cases.rel_error(y, ref) <= cases.TOLERANCE["f16"]
    xt = torch.from_numpy(x).cuda()
    yt = loaded.run({"x": xt})["y"]
    assert yt.is_cuda and yt.dtype == torch.float16
    assert cases.rel_error(yt.cpu().numpy(), ref) <= cases.TOLERANCE["f16"]


def test_torch_calls_are_ordered_with_the_callers_stream(tmp_path):
    """run() on torch CUDA tensors returns without waiting for the GPU (as a torch op does):
    the plan must start after the caller's stream has written its inputs, and the caller's
    stream must read the outputs only after the plan. On a side stream of torch, each input
    is written behind a sleep (a plan that does not wait reads it unwritten) and overwritten
    with NaN right after the call (a plan still reading it then gives NaN); six calls in
    flight reuse the plan's arena."""
    torch = pytest.importorskip("torch")
    import qcompiler
    from qcompiler.driver.api import compile_to_dir

    case = cases.Case(k=1024, n=320, bits=4, zero_point=True, group=128, bias=True)
    module = cases.make_module(case, seed=5)
    loaded = qcompiler.load(compile_to_dir(module, "cuda-sm90", str(tmp_path / "art"))[0])
    xs = [cases.random_x(case, 5, seed=int.from_bytes(os.urandom(4), "little"))
          for _ in range(6)]
    sources = [torch.from_numpy(x).cuda() for x in xs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    outs = []
    with torch.cuda.stream(side):
        for src in sources:
            torch.cuda._sleep(2_000_000)  # about a millisecond of the caller's stream
            xt = src.clone()
            y = loaded.run({"x": xt})["y"]
            xt.fill_(float("nan"))
            outs.append(y.clone())
    side.synchronize()
    for x, y in zip(xs, outs):
        assert cases.rel_error(y.cpu().numpy(), cases.reference(module, x)) \
            <= cases.TOLERANCE["f16"]


def test_device_inputs_at_a_stable_address_are_read_in_place(tmp_path):
    """A caller that passes the same CUDA buffer twice in a row gets a graph that reads it
    where it lies (no copy into the plan's own input buffer), for whatever it holds at each
    call; up to MAX_BOUND_PER_SHAPE such buffers per shape, copies beyond them."""
    torch = pytest.importorskip("torch")
    import qcompiler
    from qcompiler.driver.api import compile_to_dir

    case = cases.Case(k=1024, n=320, bits=4, zero_point=True, group=128, bias=True)
    module = cases.make_module(case, seed=7)
    loaded = qcompiler.load(compile_to_dir(module, "cuda-sm90", str(tmp_path / "art"))[0])
    runner = loaded._run
    xs = [cases.random_x(case, 5, seed=int.from_bytes(os.urandom(4), "little"))
          for _ in range(4)]

    def check(buffer, x):
        buffer.copy_(torch.from_numpy(x))
        y = loaded.run({"x": buffer})["y"]
        assert cases.rel_error(y.cpu().numpy(), cases.reference(module, x)) \
            <= cases.TOLERANCE["f16"]

    buffers = [torch.empty(xs[0].shape, dtype=torch.from_numpy(xs[0]).dtype, device="cuda")
               for _ in range(3)]
    for x in xs:  # one buffer, new contents each call: bound from the second call on
        check(buffers[0], x)
    assert len(runner._bound) == 1
    (sig,) = runner._bound.values()
    assert sig.bound == {"x"} and sig.inputs["x"][0] == buffers[0].data_ptr()
    for b in buffers[1:]:
        for x in xs[:2]:
            check(b, x)
    assert len(runner._bound) == runner.MAX_BOUND_PER_SHAPE == 2  # the third is copied
    for x in xs[2:]:  # and the first is still read in place
        check(buffers[0], x)
    check(torch.from_numpy(xs[0]).cuda(), xs[0])  # a fresh tensor: copied


def test_sm80_build_runs_here(tmp_path):
    """Code for cuda-sm80 (SASS sm_80 + PTX) must also run on newer GPUs (PTX JIT)."""
    case = cases.Case(k=512, n=192, bits=4, zero_point=True, group=64, dtype="bf16")
    built = bs.build_case(case, str(tmp_path), target="cuda-sm80")
    kern = bs.load_kernel(built)
    for m in (1, 40):
        _check(kern, built, m)


def test_f32_onnx_model_end_to_end(tmp_path):
    """The shipped f32 MatMulNBits MLP compiled for CUDA (kernels in f16) runs whole."""
    import qcompiler
    from qcompiler.driver.api import compile_to_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = os.path.join(root, "examples", "mlp_int4.onnx")
    spec = ("canonicalize,fuse-dequant,canonicalize,reorder-weights{compute_dtype=f16},"
            "schedule-unpack,tile{target=cuda-sm90}")
    out_dir, _ = compile_to_dir(model, "cuda-sm90", str(tmp_path / "art"), passes=spec)
    ref = qcompiler.compile(model, "ref", str(tmp_path / "ref"))
    x = np.random.default_rng().standard_normal((7, 64)).astype(np.float32)
    got = qcompiler.load(out_dir).run({"x": x})["y"]
    assert cases.rel_error(got, ref.run({"x": x})["y"]) < 3e-3


def test_back_to_back_layers_on_one_stream(tmp_path):
    """Two GEMV kernels in a chain on one stream, no sync between them: on sm_90 the second is
    launched early (programmatic dependent launch) and must still read the first's finished
    output. y1 is poisoned with NaN before every round, so an early read fails."""
    torch = pytest.importorskip("torch")
    c1 = cases.Case(k=4096, n=1024, bits=4, zero_point=True, group=128)
    c2 = cases.Case(k=1024, n=512, bits=4, signed=True, zero_point=False, group=64)
    b1 = bs.build_case(c1, str(tmp_path / "l1"))
    b2 = bs.build_case(c2, str(tmp_path / "l2"))
    k1, k2 = bs.load_kernel(b1), bs.load_kernel(b2)
    stream = torch.cuda.current_stream().cuda_stream
    for m in (1, 5, 16, 1, 3):
        x = cases.random_x(c1, m, seed=int.from_bytes(os.urandom(4), "little"))
        xt = torch.from_numpy(x).cuda()
        y1 = torch.full((m, c1.n), float("nan"), device="cuda", dtype=torch.float16)
        y2 = torch.full((m, c2.n), float("nan"), device="cuda", dtype=torch.float16)
        torch.cuda.synchronize()
        k1.run_device(xt.data_ptr(), y1.data_ptr(), m, stream)
        k2.run_device(y1.data_ptr(), y2.data_ptr(), m, stream)
        torch.cuda.synchronize()
        h1 = y1.cpu().numpy()
        assert cases.rel_error(h1, cases.reference(b1.module, x)) <= cases.TOLERANCE["f16"]
        ref2 = cases.reference(b2.module, h1)
        assert cases.rel_error(y2.cpu().numpy(), ref2) <= cases.TOLERANCE["f16"], f"M={m}"


# The sm_90a wgmma/TMA kernel (include/qcompiler/wgmma.cuh): explicit variants (one and two
# consumer warpgroups, ring depths, split-K) on the four large layers' shapes scaled down
# (N, K) and one full shape through the tile pass's heuristic; M = 64 .. 1000 (partial M and
# N tiles). (m_frags, warps_k, stages, split_k)
WGMMA_VARIANTS = [{"wgmma": 1, "gemv": 0, "m_frags": 4 * c, "warps_n": 4, "warps_k": c,
                   "stages": st, "stage_k": 64, "acc_scale": 0, "split_k": sk}
                  for c, st, sk in [(1, 4, 1), (2, 4, 1), (1, 3, 3), (2, 6, 2)]]
# The block-split mapping (wgmma=2): M tiles of 64-256 tokens, 1 or 2 n64 blocks a warpgroup.
# (m_frags, warps_n, warps_k, stages, split_k)
WGMMA_VARIANTS += [{"wgmma": 2, "gemv": 0, "m_frags": mf, "warps_n": wn, "warps_k": wk,
                    "stages": st, "stage_k": 64, "acc_scale": 0, "split_k": sk}
                   for mf, wn, wk, st, sk in [(16, 2, 2, 4, 1), (8, 4, 2, 3, 2), (4, 1, 1, 4, 3),
                                              (16, 1, 1, 5, 1), (8, 2, 2, 4, 1)]]
WGMMA_CASES = {  # format: (N, K) scaled from 4096², 14336x4096, 28672x8192, 8192x28672
    "u4_zp_g128_f16": (512, 512), "i4_g128_bf16": (1792, 512),
    "u4_zp_g128_bf16": (3584, 1024), "i4_g128_f16": (1024, 3584),
    "u4_zp_g32_actorder_f16": (320, 384), "u4_zp_perchannel_bf16": (200, 256),
}
FORMATS["u4_zp_g128_bf16"] = (4, False, True, 128, False, "bf16", False)


def _sm90() -> bool:
    import torch

    return torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize("fmt", sorted(WGMMA_CASES))
def test_wgmma_variants(fmt, tmp_path):
    if not _sm90():
        pytest.skip("the wgmma kernel needs sm_90")
    n, k = WGMMA_CASES[fmt]
    built = bs.build_case(_case(fmt, (k, n)), str(tmp_path), variants=WGMMA_VARIANTS)
    kern = bs.load_kernel(built)
    for i in range(len(WGMMA_VARIANTS)):
        for m in (64, 100, 128, 512, 1000):
            _check(kern, built, m, variant=i)


def test_wgmma_full_shape(tmp_path):
    """One full layer, 4096x4096, with two consumer warpgroups of each mapping."""
    if not _sm90():
        pytest.skip("the wgmma kernel needs sm_90")
    built = bs.build_case(_case("i4_g128_f16", (4096, 4096)), str(tmp_path),
                          variants=WGMMA_VARIANTS[1:2] + WGMMA_VARIANTS[4:5])
    kern = bs.load_kernel(built)
    for variant in (0, 1):
        for m in (64, 100, 128, 512, 1000):
            _check(kern, built, m, variant=variant)


def test_whole_model_plan_on_the_device_with_graph_replay_after_a_shape_change(tmp_path,
                                                                             monkeypatch):
    """issue #12: the f32 MLP with every op on the device (casts, qmatmuls, epilogues), one
    CUDA graph per signature from its second run; batch 3 then 9 (one bucket, two signatures,
    both launched from their tables), then 3 again (captured and launched as a graph)."""
    monkeypatch.setenv("QC_CUDA_PLAN", "1")  # the default; set in case the caller's env has 0
    import qcompiler
    from qcompiler.codegen.cuda.plan import CudaPlanRunner
    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager
    from qcompiler.runtime.reference import run as ref_run
    from qcompiler.targets import get_target

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "mlp_int4.onnx")
    m = qcompiler.compile(path, target="cuda-sm90", output_dir=str(tmp_path / "a"))
    assert isinstance(m._run, CudaPlanRunner)
    full = get_target("cuda-sm90").default_pipeline
    ref = PassManager.parse(full[:full.index(",reorder-weights")]).run(import_model(path))
    rng = np.random.default_rng(5)
    for batch in (3, 9, 3):
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        got, want = m.run({"x": x})["y"], ref_run(ref, {"x": x})["y"]
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 2e-2 * max(np.abs(want).max(), 1.0)
    # graphs are captured at a signature's second run: batch 3's, not batch 9's
    sigs = m._run._signatures
    assert len(sigs) == 2 and sigs[((3, 64),)].graph is not None
    assert sigs[((9, 64),)].graph is None and sigs[((9, 64),)].uses == 1
    # A growing shape (a KV cache) past MAX_SIGNATURES: the least recently used signatures
    # are released (graphs destroyed, buffers freed); the kept ones still replay correctly
    # and a released one is captured again.
    monkeypatch.setattr(CudaPlanRunner, "MAX_SIGNATURES", 2)
    for batch in (4, 5, 6, 9, 3, 6):
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        got, want = m.run({"x": x})["y"], ref_run(ref, {"x": x})["y"]
        assert np.abs(got - want).max() <= 2e-2 * max(np.abs(want).max(), 1.0), batch
        assert len(m._run._signatures) <= 2


def _llama_decode_on_cuda_sm90(tmp_path, cfg: dict, past: int, seed: int, seq: int = 1,
                               x_norm: bool = False):
    """A 2-layer Llama-architecture decode step (batch 1, ``seq`` new tokens, ``past`` cached
    tokens) exported to ONNX and compiled for cuda-sm90 with 4-bit g128 weights: (the compiled
    model, the same module before the CUDA layout passes for the reference, the feeds).
    ``x_norm``: with fuse-norm-qmatmul{enable=1} (the RMSNorms inside the projections)."""
    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples"))
    import decoder_models as dm

    import qcompiler
    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager
    from qcompiler.targets import get_target

    feeds = dm.llama_inputs(cfg, 2, 1, seq, past, seed=seed)
    path = dm.export_onnx(dm.llama(layers=2, **cfg), feeds, str(tmp_path / "llama.onnx"),
                          dynamo=False)
    passes = "canonicalize,quantize-weights{bits=4,group=128}," + \
        get_target("cuda-sm90").default_pipeline
    if x_norm:
        passes = passes.replace("fuse-norm-qmatmul{enable=0}", "fuse-norm-qmatmul{enable=1}")
    m = qcompiler.compile(path, target="cuda-sm90", passes=passes,
                          output_dir=str(tmp_path / "a"))
    ref = PassManager.parse(passes[:passes.index(",reorder-weights")]).run(import_model(path))
    return m, ref, feeds


def test_llama_decode_plan_with_fused_epilogues_matches_the_reference(tmp_path, monkeypatch):
    """A 2-layer Llama decode step on the device plan: the residual adds and the SwiGLU product
    are applied by the qmatmul kernels as they store y (their extra operands read per element),
    the KV cache appended by the one-launch concat; against the reference of the same module."""
    from qcompiler.codegen.cuda.epilogue import epilogue_in_kernel
    from qcompiler.runtime.reference import run as ref_run

    monkeypatch.setenv("QC_CUDA_PLAN", "1")
    m, ref, feeds = _llama_decode_on_cuda_sm90(
        tmp_path, dict(vocab=256, hidden=256, heads=4, kv_heads=2, intermediate=384), 37, 4)
    fused = [n for n in m.module.main.nodes if n.op == "qmatmul" and epilogue_in_kernel(n)]
    assert len(fused) >= 4 and any(len(n.operands) > 8 for n in fused)
    # fuse-gate-up and fuse-qkv: one paired gate/up GEMV and one qkv append per layer
    assert sum(1 for n in fused if n.attrs.get("epilogue_pairs")) == 2
    assert sum(1 for n in m.module.main.nodes if n.op == "qkv_heads") == 2
    got, want = m.run(feeds), ref_run(ref, feeds)
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1.0)
        assert np.abs(got[k] - want[k]).max() <= 3e-2 * scale, k


@pytest.mark.parametrize("padded", [True, False], ids=["capacity", "exact"])
def test_llama_generation_loop_matches_the_reference_at_every_step(tmp_path, monkeypatch,
                                                                    padded):
    """A generation loop on the device plan: each step's presents fed back as the next
    step's caches. Padded (the default, codegen/cuda/cache_capacity.py): every length up to
    the capacity (64) runs the capacity's signature, its graph captured at the second step and
    replayed with the padding word, and the torch loop crosses into the next capacity.
    Exact (QC_CUDA_PAD_CACHES=0): every token is a new input signature, prepared from the last
    one over the runner's shared buffers (which grow as the caches do). Then a cache length
    seen before (its graph captured and replayed), more new tokens (exact shapes either way),
    and torch CUDA tensors in and out. Every step against the reference of the same module on
    the same inputs."""
    from qcompiler.codegen.cuda.plan import CudaPlanRunner
    from qcompiler.runtime.reference import run as ref_run

    monkeypatch.setattr(CudaPlanRunner, "pad_caches", padded)

    torch = pytest.importorskip("torch")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples"))
    import decoder_models as dm

    monkeypatch.setenv("QC_CUDA_PLAN", "1")
    cfg = dict(vocab=256, hidden=256, heads=4, kv_heads=2, intermediate=384)
    m, ref, feeds = _llama_decode_on_cuda_sm90(tmp_path, cfg, 37, 4)
    runner = m._run

    def check(run_feeds, got):
        host = {k: v.cpu().numpy() if hasattr(v, "cpu") else v for k, v in run_feeds.items()}
        want = ref_run(ref, host)
        for k in want:
            g = got[k].cpu().numpy() if hasattr(got[k], "cpu") else got[k]
            assert g.shape == want[k].shape, k
            scale = max(float(np.abs(want[k]).max()), 1.0)
            assert np.abs(g - want[k]).max() <= 3e-2 * scale, k
        return got

    step_feeds = feeds
    for step in range(12):
        got = check(step_feeds, m.run(step_feeds))
        logits, present_k, present_v = got.values()
        past = present_k.shape[3]
        step_feeds = {"input_ids": logits[:, -1:].argmax(-1).astype(np.int64),
                      "position_ids": np.array([[past]], np.int64),
                      "past_k": present_k, "past_v": present_v}
    assert len(runner._slots) > 0 and runner._layout is not None
    for again in (dm.llama_inputs(cfg, 2, 1, 1, 40, seed=8),) * 3 + (
            dm.llama_inputs(cfg, 2, 1, 6, 45, seed=9),):
        check(again, m.run(again))
    assert runner._signatures[tuple(a.shape for a in again.values())].uses == 1
    shape40 = tuple(a.shape for a in dm.llama_inputs(cfg, 2, 1, 1, 64 if padded else 40).values())
    assert runner._signatures[shape40].graph is not None  # captured at its second run
    assert (runner._signatures[shape40].padding is not None) == padded
    step_feeds = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda()
                  for k, v in dm.llama_inputs(cfg, 2, 1, 1, 62, seed=10).items()}
    for step in range(4):  # (cache 62 to 65: a new capacity at 65)
        got = check(step_feeds, m.run(step_feeds))
        logits, present_k, present_v = got.values()
        step_feeds = {"input_ids": logits[:, -1:].argmax(-1),
                      "position_ids": torch.full((1, 1), 63 + step, device="cuda"),
                      "past_k": present_k, "past_v": present_v}
    assert (runner.last_signature.padding is not None) == padded


def test_llama_decode_session_matches_the_reference_at_every_step(tmp_path, monkeypatch):
    """A decode session (codegen/cuda/kv_state.py): the caches given once, kept on the device
    in the compute dtype and updated in place. Greedy steps from a cache of 60 rows to 70
    (crossing the capacity of 64: the state laid out again), each step's logits against the
    reference run on the caches the session holds (read back with ``state()``, which must
    also equal the reference's presents of the step before), numpy in and out; then torch
    CUDA tensors: a session reset with a run()'s caches gives that run()'s logits, and its
    state() that run()'s presents."""
    from qcompiler.runtime.reference import run as ref_run

    torch = pytest.importorskip("torch")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples"))
    import decoder_models as dm

    monkeypatch.setenv("QC_CUDA_PLAN", "1")
    cfg = dict(vocab=256, hidden=256, heads=4, kv_heads=2, intermediate=384)
    m, ref, feeds = _llama_decode_on_cuda_sm90(tmp_path, cfg, 60, 5)
    session = m.session()
    caches = {"past_k": feeds["past_k"], "past_v": feeds["past_v"]}
    session.reset(caches)
    token, names = feeds["input_ids"], list(m.output_names)
    for step in range(10):
        pos = np.array([[60 + step]], np.int64)
        # the reference on the caches as the session holds them (f16 values, as f32)
        held = session.state()
        if step == 0:
            for k, n in zip(("past_k", "past_v"), names[1:]):
                np.testing.assert_allclose(held[n], caches[k], atol=1e-3 * np.abs(caches[k]).max())
        want = ref_run(ref, {"input_ids": token, "position_ids": pos,
                             "past_k": held[names[1]], "past_v": held[names[2]]})
        got = session.step({"input_ids": token, "position_ids": pos})
        assert list(got) == [names[0]]
        scale = max(float(np.abs(want[names[0]]).max()), 1.0)
        assert np.abs(got[names[0]] - want[names[0]]).max() <= 3e-2 * scale, step
        after = session.state()
        for n in names[1:]:
            assert after[n].shape == want[n].shape
            np.testing.assert_allclose(after[n], want[n], rtol=0, atol=3e-2 * max(
                float(np.abs(want[n]).max()), 1.0))
        token = got[names[0]][:, -1:].argmax(-1).astype(np.int64)
    assert session.length == 70 and session.capacity == 128 and session.relayouts == 1
    assert session._sig.graph is not None  # (captured at the capacity's second step)

    # torch CUDA tensors in and out, from run()'s presents: the same logits as run()
    tf = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda()
          for k, v in dm.llama_inputs(cfg, 2, 1, 1, 30, seed=6).items()}
    session.reset({"past_k": tf["past_k"], "past_v": tf["past_v"]})
    by_run = m.run(tf)
    by_session = session.step({"input_ids": tf["input_ids"], "position_ids": tf["position_ids"]})
    assert isinstance(by_session[names[0]], torch.Tensor) and by_session[names[0]].is_cuda
    torch.testing.assert_close(by_session[names[0]], by_run[names[0]], rtol=0, atol=2e-3)
    held = session.state()
    for n in names[1:]:
        assert held[n].is_cuda and held[n].dtype == torch.float32
        torch.testing.assert_close(held[n], by_run[n], rtol=0, atol=2e-3)
    session.close()


@pytest.mark.parametrize("device_plan", ["1", "0"])
def test_llama_with_norms_in_the_projections_matches_the_reference(tmp_path, monkeypatch,
                                                                   device_plan):
    """fuse-norm-qmatmul{enable=1}: every RMSNorm inside its projection's kernel. A decode
    step (the GEMV multiplies x by the norm's scale and its sums by each row's 1 / rms), then
    40 and 150 new tokens (the tiled and wgmma kernels read a normalized copy), against the
    reference; no rmsnorm launch is left in the plan."""
    from qcompiler.runtime.reference import run as ref_run

    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples"))
    import decoder_models as dm

    monkeypatch.setenv("QC_CUDA_PLAN", device_plan)
    cfg = dict(vocab=256, hidden=256, heads=4, kv_heads=2, intermediate=384)
    m, ref, feeds = _llama_decode_on_cuda_sm90(tmp_path, cfg, 37, 4, x_norm=True)
    ops = [n.op for n in m.module.main.nodes]
    assert "rmsnorm" not in ops
    assert sum(1 for n in m.module.main.nodes if n.op == "qmatmul" and n.attrs.get("x_norm")) == 5
    for run_feeds in (feeds, dm.llama_inputs(cfg, 2, 1, 40, 5, seed=6),
                      dm.llama_inputs(cfg, 2, 1, 150, 5, seed=7)):
        got, want = m.run(run_feeds), ref_run(ref, run_feeds)
        for k in want:
            scale = max(float(np.abs(want[k]).max()), 1.0)
            assert np.abs(got[k] - want[k]).max() <= 3e-2 * scale, k


@pytest.mark.parametrize("device_plan", ["1", "0"])
def test_llama_prefill_with_paired_gate_up_matches_the_reference(tmp_path, monkeypatch,
                                                                  device_plan):
    """The same layers over 40 and 150 new tokens (the tiled and wgmma kernels' M buckets):
    the paired gate/up epilogue, applied in the tile and in the split-K fix-up alike, and the
    qkv append of many rows, against the reference of the same module. Without the device
    plan the kernel writes the whole product (twice the result's width) and the host applies
    the pairs."""
    from qcompiler.runtime.reference import run as ref_run

    pytest.importorskip("torch")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "examples"))
    import decoder_models as dm

    monkeypatch.setenv("QC_CUDA_PLAN", device_plan)
    cfg = dict(vocab=256, hidden=256, heads=4, kv_heads=2, intermediate=384)
    m, ref, feeds = _llama_decode_on_cuda_sm90(tmp_path, cfg, 5, 6, seq=40)
    assert any(n.attrs.get("epilogue_pairs") for n in m.module.main.nodes if n.op == "qmatmul")
    for run_feeds in (feeds, dm.llama_inputs(cfg, 2, 1, 150, 5, seed=7)):
        got, want = m.run(run_feeds), ref_run(ref, run_feeds)
        for k in want:
            scale = max(float(np.abs(want[k]).max()), 1.0)
            assert np.abs(got[k] - want[k]).max() <= 3e-2 * scale, k


def test_concurrent_launches_give_the_same_bits_as_one_stream(tmp_path, monkeypatch):
    """A Llama decode step (8 query heads per kv head: the grouped-query decode attention)
    with its independent launches on side streams: the graph has concurrent runs and its outputs are bit for bit those of the same plan captured
    on one stream (every kernel is deterministic; only the order of independent launches
    changes); both match the reference."""
    from qcompiler.runtime.reference import run as ref_run

    monkeypatch.setenv("QC_CUDA_PLAN", "1")
    m, ref, feeds = _llama_decode_on_cuda_sm90(
        tmp_path, dict(vocab=256, hidden=512, heads=8, kv_heads=1, intermediate=384), 70, 5)
    got = m.run(feeds)
    runner = m._run
    (sig,) = runner._signatures.values()
    # a layer is one chain since fuse-qkv (q, k and v are one GEMV): the concurrent
    # runs left are the caches' casts and the present outputs beside the layers
    assert runner.lanes and sum(1 for r in sig.runs if r > 1) >= 1
    assert max(sig.runs) >= 2
    lanes = runner.lanes
    runner.lanes = None
    runner._signatures.clear()
    try:
        alone = m.run(feeds)
        (sig1,) = runner._signatures.values()
        assert max(sig1.runs) == 1
    finally:
        runner.lanes = lanes
    want = ref_run(ref, feeds)
    for k in want:
        np.testing.assert_array_equal(got[k], alone[k], err_msg=k)
        scale = max(float(np.abs(want[k]).max()), 1.0)
        assert np.abs(got[k] - want[k]).max() <= 3e-2 * scale, k
