"""The CPU kernels of AVX2-only hosts (Haswell, Zen 3): the int8 path without VNNI.

Every kernel is built for ``cpu-x86-avx2`` (-mcpu=haswell), which any x86 host with AVX2 runs,
so on an AVX-512 machine these tests execute exactly the code a Zen 3 would, and an assembly
check makes sure no AVX-512 instruction slipped in. Each kernel runs on fresh random inputs and
is compared with the numpy model of its arithmetic (tight) and with the exact reference (the
int8 path's documented error).
"""
import numpy as np
import pytest

pytest.importorskip("tvm")

from qcompiler.codegen.cpu import host, kernels, runtime, tuning  # noqa: E402
from qcompiler.passes.cpu_schedule import SYMBOLIC_BUCKETS  # noqa: E402
from qcompiler.targets import get_target  # noqa: E402

AVX2 = get_target("cpu-x86-avx2")
pytestmark = pytest.mark.skipif(not host._AVX2 <= host.host_flags()[1],
                                reason="this host lacks AVX2: cpu-x86-avx2 code cannot run here")


def scheme_text(bits, group, signed, zp):
    code = f"{'i' if signed else 'u'}{bits}"
    kind = f"affine, per_group(axis=0, block={group}), scale=f32, zp={code}" if zp else \
        f"symmetric, per_group(axis=0, block={group}), scale=f32"
    return f"#quant<{code}, {kind}>"


def key_for(m, k, n, scheme, numerics="int8"):
    key = {"op": "qmatmul", "m": m, "k": k, "n": n, "act": "float", "x_dtype": "f32",
           "w_scheme": scheme, "has_bias": False, "act_order": False}
    if numerics != "exact":
        key["numerics"] = numerics
    return key


def build_kernel(tmp_path, k, n, scheme, numerics="int8", seed=0, configs=None):
    """A kernel for AVX2 with the heuristic's variants for M = 1, 2..16 and > 16 (as
    cpu-schedule makes them for a symbolic batch), on fresh random weights."""
    variants = []
    for m, max_m in SYMBOLIC_BUCKETS:
        cfg = (configs or {}).get(m) or tuning.default_config(AVX2, key_for(m, k, n, scheme,
                                                                            numerics))
        variants.append({**cfg, "m": m, "max_m": max_m})
    p = tuning.problem(AVX2, key_for(1, k, n, scheme, numerics))
    wts = tuning.random_weights(p, np.random.default_rng(seed))
    lib = runtime.build_library(p.kernel_shape(), variants, AVX2, str(tmp_path / "k"))
    kern = runtime.QmmKernel(lib, p, variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], wts["g_idx"]))
    return p, wts, kern


def check_int8(p, wts, kern, x):
    got = kern(x)
    model = runtime.numpy_model(p, x, wts["q"], wts["scale"], wts["zp"], wts["g_idx"])
    err = float(np.abs(got - model).max())
    assert err <= runtime.tolerance(p, model), f"max |kernel - int8 model| = {err:.3g}"
    # Against the exact product: only the int8 rounding of x per row and group, the error
    # of onnxruntime's accuracy_level 4 (|dx| <= max|x| / 254 per element).
    exact = x.astype(np.float64) @ runtime.dequantized(p, wts["q"], wts["scale"], wts["zp"],
                                                       wts["g_idx"])
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("bits,group,signed,zp", [
    (2, 32, False, True), (3, 128, True, False), (4, 32, False, False), (4, 128, False, True),
    (8, 32, True, True), (8, 128, False, False)])
def test_int8_avx2_grid(tmp_path, bits, group, signed, zp):
    """Odd shapes (K pads to whole groups, N to whole tiles), every M bucket and
    M that is no multiple of the row block."""
    k, n = (200, 70) if group == 32 else (300, 45)
    p, wts, kern = build_kernel(tmp_path, k, n, scheme_text(bits, group, signed, zp),
                                seed=bits + group)
    assert p.lanes == 8 and p.n_tile == 32
    for m in (1, 5, 17, 130):
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        check_int8(p, wts, kern, x)


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_avx2_extremes_do_not_saturate(tmp_path, bits):
    """The largest codes times activations of +-127 (the int16 pairs of vpmaddubsw at their
    largest: 2 x 15 x 127 for 4-bit, and 8-bit codes up to 255 through the nibble split)
    give the exact integer sums."""
    k, n = 256, 64
    p, wts, kern = build_kernel(tmp_path, k, n, scheme_text(bits, 32, False, True), seed=bits)
    hi = (1 << bits) - 1
    wts["q"][:] = hi
    wts["q"][:, ::3] = hi - 1
    kern = runtime.QmmKernel(str(tmp_path / "k.so"), p, kern.variants,
                             runtime.pack_weights(p, wts["q"], wts["scale"], wts["zp"], None))
    x = np.where(np.random.default_rng(1).random((3, k)) < 0.5, -2.0, 2.0).astype(np.float32)
    x[0] = 2.0                          # every activation quantizes to +127
    check_int8(p, wts, kern, x)


def test_int8_avx2_knobs(tmp_path):
    """Both orders and several row blocks of the int8 search space on AVX2."""
    k, n = 256, 96
    scheme = scheme_text(4, 32, False, True)
    configs = {1: {"m_block": 2, "order": "row"}, 16: {"m_block": 8, "order": "row"},
               128: {"m_block": 2, "order": "group"}}
    for m, cfg in configs.items():
        assert tuning.check_config(AVX2, key_for(m, k, n, scheme), cfg) is None
    p, wts, kern = build_kernel(tmp_path, k, n, scheme, configs=configs, seed=5)
    for m in (1, 3, 20):
        check_int8(p, wts, kern, np.random.default_rng(m).standard_normal((m, k))
                   .astype(np.float32))


def avx2_assembly(numerics, bits):
    import tvm

    scheme = scheme_text(bits, 32, False, True)
    p = tuning.problem(AVX2, key_for(1, 256, 64, scheme, numerics))
    variants = [{**tuning.default_config(AVX2, key_for(m, 256, 64, scheme, numerics)),
                 "m": m, "max_m": max_m} for m, max_m in SYMBOLIC_BUCKETS]
    ex = tvm.compile(kernels.build_module(p.kernel_shape(), variants),
                     target=host.tvm_target(AVX2))
    return ex.mod.inspect_source("asm")


@pytest.mark.parametrize("numerics,bits", [("int8", 4), ("int8", 8), ("exact", 4)])
def test_avx2_code_has_no_avx512(numerics, bits):
    """The AVX2 kernels must run on a Zen 3: no zmm register, no EVEX-only instruction."""
    asm = avx2_assembly(numerics, bits)
    assert "ymm" in asm
    for banned in ("zmm", "vpdpbusd", "{evex}", "%k1"):
        assert banned not in asm, f"{banned} in the AVX2 {numerics} kernel"
    if numerics == "int8":
        assert "vpmaddubsw" in asm and "vpmaddwd" in asm


def test_schedule_picks_the_avx2_int8_path(monkeypatch):
    """cpu-schedule{numerics=int8} on AVX2 targets: the AVX2 dot (8 lanes, 32-column tiles);
    on a VNNI target: vpdpbusd (16 lanes)."""
    from qcompiler.driver.api import run_pipeline
    from test_cpu_backend import pipeline, qmm_module

    def config(target):
        module, _, _ = run_pipeline(qmm_module(64, 16, 4, 32), pipeline(target, "int8"))
        return next(n for n in module.main.nodes if n.op == "qmatmul").attrs["config"]

    cfg = config("cpu-x86-avx2")
    assert (cfg["numerics"], cfg["lanes"], cfg["n_tile"]) == ("int8", 8, 32)
    assert cfg["variants"]["v2"]["m_block"] == 4
    monkeypatch.setenv(host.HOST_ISA_ENV, "avx2")
    assert config("cpu")["lanes"] == 8
    p = tuning.problem(AVX2, key_for(1, 64, 16, scheme_text(4, 32, False, True)))
    # 4-bit codes: 8 steps of 4 rows summed in int16 before vpmaddwd widens them
    assert kernels.int8_intrin(p.kernel_shape()) == kernels.AVX2_INTRIN + "x8"
    p = tuning.problem(AVX2, key_for(1, 64, 16, scheme_text(8, 32, False, True)))
    assert kernels.int8_intrin(p.kernel_shape()) == kernels.AVX2_NIBBLES_INTRIN
    vnni = get_target("cpu-x86-avx512")
    p = tuning.problem(vnni, key_for(1, 64, 16, scheme_text(4, 32, False, True)))
    assert kernels.int8_intrin(p.kernel_shape()) == kernels.VNNI_INTRIN
