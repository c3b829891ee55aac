"""numerics=lut: T-MAC-style table-lookup kernels for 1- to 4-bit codes (codegen/cpu/kernels.py).

Each kernel runs on fresh random inputs and is compared with the numpy model of its arithmetic
(``runtime.lut_model``: the same int8 tables, so only the fp32 summation order differs) and
with the exact reference, within the bound of the tables' rounding. Built for ``cpu-x86-avx2``
(-mcpu=haswell: the code a Zen 3 runs, checked free of AVX-512), for the host target
(``vpermb`` on zmm where the host has AVX-512 VBMI, else ``vpshufb`` on zmm with AVX-512BW) and,
on AVX-512 hosts, for ``cpu-x86-avx512`` (Cascade Lake: ``vpshufb`` on zmm).
"""
import numpy as np
import pytest

pytest.importorskip("tvm")

from qcompiler.codegen.cpu import host, kernels, layout, runtime, tuning  # noqa: E402
from qcompiler.passes.cpu_schedule import SYMBOLIC_BUCKETS  # noqa: E402
from qcompiler.targets import get_target  # noqa: E402
from test_cpu_avx2 import key_for, scheme_text  # noqa: E402

pytestmark = pytest.mark.skipif(not host._AVX2 <= host.host_flags()[1],
                                reason="this host lacks AVX2: the lut kernels need vpshufb on ymm")
AVX512_HOST = {"avx512f", "avx512bw", "avx512vl"} <= host.host_flags()[1]
TARGETS = ["cpu-x86-avx2", "cpu",
           pytest.param("cpu-x86-avx512", marks=pytest.mark.skipif(
               not AVX512_HOST, reason="this host lacks AVX-512BW: cpu-x86-avx512's code "
                                       "cannot run here"))]


def build_kernel(tmp_path, target_name, k, n, scheme, seed=0, table_group=None,
                 scale_dtype="f32"):
    """A lut kernel with the heuristic's variants for M = 1, 2..16, > 16, on random weights;
    ``scale_dtype="auto"``: the scales stored as cpu-pack-weights stores them (f16 on x86)."""
    tgt = get_target(target_name)
    variants = []
    for m, max_m in SYMBOLIC_BUCKETS:
        cfg = tuning.default_config(tgt, key_for(m, k, n, scheme, "lut"))
        if table_group:
            cfg["table_group"] = table_group
        variants.append({**cfg, "m": m, "max_m": max_m})
    p = tuning.with_table_group(tuning.problem(tgt, key_for(1, k, n, scheme, "lut")),
                                variants[0])
    wts = tuning.random_weights(p, np.random.default_rng(seed))
    stem = str(tmp_path / f"lut_{target_name}_{seed}")  # one path per library: dlopen caches
    p, packed = runtime.store_scales(p, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], wts["g_idx"]), scale_dtype)
    lib = runtime.build_library(p.kernel_shape(), variants, tgt, stem)
    return p, wts, runtime.QmmKernel(lib, p, variants, packed)


def table_error_bound(p, wts, x) -> np.ndarray:
    """The largest error the int8 tables can cause per row and column: each lookup is off by at
    most half its table scale, plane i's by 2^i times that, for block/g lookups per group."""
    bl = p.blocking
    xp = np.zeros((x.shape[0], bl.k_pad), np.float32)
    xp[:, :p.k] = x
    _, tscale, _ = runtime.lut_tables(xp, p.table_group, bl.block)
    s, _ = layout.group_params(p.scheme, wts["scale"], wts["zp"], p.k, p.n, bl.groups)
    per_lookup = ((1 << p.container_bits) - 1) / 2 * (bl.block // p.table_group)
    return per_lookup * tscale.astype(np.float64) @ np.abs(s).astype(np.float64)


def check_lut(p, wts, kern, x):
    got = kern(x)
    model = runtime.numpy_model(p, x, wts["q"], wts["scale"], wts["zp"], wts["g_idx"])
    err = float(np.abs(got - model).max())
    assert err <= runtime.tolerance(p, model), f"max |kernel - lut model| = {err:.3g}"
    stored = wts["scale"].astype(p.scale_dtype).astype(np.float32)  # f16 scales: rounded
    exact = x.astype(np.float64) @ runtime.dequantized(p, wts["q"], stored, wts["zp"],
                                                       wts["g_idx"])
    slack = runtime.tolerance(p, exact)
    if p.scale_dtype == "float16":  # and the zero-point factors rounded to f16 (2^-11 rel.)
        s, zc = layout.group_params(p.scheme, stored, wts["zp"], p.k, p.n, p.blocking.groups)
        bl = p.blocking
        xp = np.zeros((x.shape[0], bl.k_pad), np.float32)
        xp[:, :p.k] = x
        xsum = runtime.lut_tables(xp, p.table_group, bl.block)[2]
        slack = slack + 2.0 ** -11 * np.abs(xsum).astype(np.float64) @ np.abs(
            runtime.lut_zero_terms(p, s, zc)).astype(np.float64)
    assert np.all(np.abs(got - exact) <= table_error_bound(p, wts, x) + slack)
    # in practice the rounding errors cancel: the error of int8 activations (acc. level 4)
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()
    return got


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits,group,signed,zp", [
    (1, 32, False, False), (2, 32, False, True), (2, 128, True, False), (3, 128, False, True),
    (3, 32, True, True), (4, 32, False, True), (4, 128, False, False)])
def test_lut_grid(tmp_path, target, bits, group, signed, zp):
    """Odd K (padded to whole groups) and N (padded to whole tiles), M = 1, 3, 17."""
    k, n = (200, 70) if group == 32 else (300, 45)
    p, wts, kern = build_kernel(tmp_path, target, k, n, scheme_text(bits, group, signed, zp),
                                seed=bits + group)
    assert p.numerics == "lut" and p.container_bits == bits and p.table_group == 4
    for m in (1, 3, 17):
        check_lut(p, wts, kern, np.random.default_rng(m).standard_normal((m, k))
                  .astype(np.float32))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits,signed,zp", [(2, False, True), (3, True, False)])
def test_lut_f16_scales(tmp_path, target, bits, signed, zp):
    """Scales stored as cpu-pack-weights stores them on x86: f16, with the zero-point factors
    zt = s (centre - zc) computed at load and stored as f16 beside them (the kernel converts
    both as it loads them). The model rounds both as the kernel stores them."""
    k, n = 300, 70
    p, wts, kern = build_kernel(tmp_path, target, k, n, scheme_text(bits, 32, signed, zp),
                                seed=bits, scale_dtype="auto")
    assert p.scale_dtype == "float16" and p.kernel_shape().scale_dtype == "float16"
    w, s, zt, _ = runtime.kernel_weights(p, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], wts["g_idx"]))
    assert s.dtype == zt.dtype == np.float16
    for m in (1, 5):
        check_lut(p, wts, kern, np.random.default_rng(m).standard_normal((m, k))
                  .astype(np.float32))


def test_lut_keeps_f32_where_a_zero_point_factor_is_no_f16_normal():
    """Scales that are f16 normals but whose zt = s (centre - zc) falls below them (here
    s = 1e-4, zt = 5e-5 for codes centred at 1.5 and zero code 1): both stay float32; Arm's
    lut kernels always take float32."""
    scheme = scheme_text(2, 32, False, True)
    lut4 = {"table_group": 4}
    p = tuning.with_table_group(
        tuning.problem(get_target("cpu"), key_for(1, 64, 64, scheme, "lut")), lut4)
    q = np.ones((64, 64), np.uint8)
    zp = np.ones((2, 64), np.uint8)
    for value, f16 in ((1e-2, True), (1e-4, False)):
        scale = np.full((2, 64), value, np.float32)
        stored, _ = runtime.store_scales(p, runtime.pack_weights(p, q, scale, zp, None))
        assert (stored.scale_dtype == "float16") == f16, value
    arm = tuning.with_table_group(
        tuning.problem(get_target("cpu-arm-neon"), key_for(1, 64, 64, scheme, "lut")), lut4)
    scale = np.full((2, 64), 1e-2, np.float32)
    assert runtime.store_scales(arm, runtime.pack_weights(arm, q, scale, zp, None))[0] \
        .scale_dtype == "float32"


QUADS_HOST = tuning.lut_quads_target(tuning.target_cpu(get_target("cpu")))
needs_quads = pytest.mark.skipif(not QUADS_HOST, reason="this host lacks AVX-512 VBMI or VNNI: "
                                                        "the odd plane in quads needs both")


def test_pack_lut_quads_layout():
    """single_quads: each quad of table groups is one row of the packed codes, the pairs'
    bytes of its four groups as the plain layout has them, then 64-byte vectors of the odd
    plane whose byte 4e + q holds group 4Q + q of column e (low nibble) and of 16 + e (high)."""
    rng = np.random.default_rng(3)
    bits, g, nt, J = 3, 4, 128, 8
    u = rng.integers(0, 1 << bits, (J * g, 2 * nt), dtype=np.uint8)
    idx = layout.lut_indices(u, bits, g)                      # [bits, J, N]
    plain = layout.pack_lut(u, bits, g, nt, 64)
    quads = layout.pack_lut(u, bits, g, nt, 64, quads=True)
    assert quads.shape == plain.shape
    rows = quads.reshape(2, J // 4, -1)                       # [tile, quad, bytes]
    for t in range(2):
        for q4 in range(J // 4):
            row = rows[t, q4]
            pair_bytes = plain[t, 4 * q4:4 * q4 + 4, :nt]     # pairs: nt bytes a group
            np.testing.assert_array_equal(row[:4 * nt], pair_bytes.reshape(-1))
            odd = row[4 * nt:].reshape(nt // 32, 16, 4)       # [vector, e, q]
            for c in range(nt // 32):
                col = t * nt + c * 32
                want_low = idx[2, 4 * q4:4 * q4 + 4, col:col + 16].T
                want_high = idx[2, 4 * q4:4 * q4 + 4, col + 16:col + 32].T
                np.testing.assert_array_equal(odd[c] & 15, want_low)
                np.testing.assert_array_equal(odd[c] >> 4, want_high)


@needs_quads
@pytest.mark.parametrize("bits,group,k_unroll", [(3, 128, 1), (3, 32, 2), (3, 128, 8),
                                                 (1, 64, 4)])
def test_lut_single_quads_kernels(tmp_path, bits, group, k_unroll):
    """The odd plane in quads on this host (cpu: VBMI + VNNI), every k_unroll (below 4 the
    kernel still takes whole quads); odd K and N; against the lut model."""
    k, n = 300, 70
    scheme = scheme_text(bits, group, False, True)
    tgt = get_target("cpu")
    variants = [{**tuning.default_config(tgt, key_for(m, k, n, scheme, "lut")),
                 "k_unroll": k_unroll, "m": m, "max_m": max_m} for m, max_m in SYMBOLIC_BUCKETS]
    p = tuning.with_table_group(tuning.problem(tgt, key_for(1, k, n, scheme, "lut")),
                                variants[0])
    assert p.single_quads and p.kernel_shape().single_quads
    wts = tuning.random_weights(p, np.random.default_rng(bits))
    lib = runtime.build_library(p.kernel_shape(), variants, tgt, str(tmp_path / "quads"))
    kern = runtime.QmmKernel(lib, p, variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], wts["g_idx"]))
    for m in (1, 4):
        check_lut(p, wts, kern, np.random.default_rng(m).standard_normal((m, k))
                  .astype(np.float32))


@needs_quads
def test_lut_quads_only_where_the_int16_runs_hold_whole_quads(tmp_path):
    """Block 24 at table group 4: int16 runs of 6 table groups, no whole quads: the odd plane
    stays on half vectors (and the kernel is right); even bits never take quads; a layout
    packed with quads is refused on a target without VBMI."""
    tgt = get_target("cpu")
    for bits, group, quads in ((3, 24, False), (3, 32, True), (2, 32, False)):
        key = key_for(1, 96, 64, scheme_text(bits, group, False, True), "lut")
        p = tuning.with_table_group(tuning.problem(tgt, key), {"table_group": 4})
        assert p.single_quads == quads, (bits, group)
    p, wts, kern = build_kernel(tmp_path, "cpu", 96, 64, scheme_text(3, 24, False, True))
    assert not p.single_quads
    check_lut(p, wts, kern, np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32))
    code_layout = layout.code_layout("lut", codes="u3", k=96, n=64, k_pad=96, block=32,
                                     n_tile=128, container_bits=3, act_order=0, bits=3,
                                     table_group=4, single_quads=1)
    with pytest.raises(layout.Unsupported, match="single_quads.*cpu-x86-avx512"):
        tuning.problem_from_layout(get_target("cpu-x86-avx512"), code_layout,
                                   {"numerics": "lut", "lanes": 64})


@pytest.mark.parametrize("target", ["cpu-x86-avx2", "cpu"])
def test_lut_table_group_2(tmp_path, target):
    """The table_group knob at 2 (4-entry tables, twice the lookups): same checks (on `cpu`
    of a VBMI + VNNI host, the odd plane in quads of 4-entry tables)."""
    p, wts, kern = build_kernel(tmp_path, target, 96, 40, scheme_text(3, 32, False, True),
                                seed=7, table_group=2)
    assert p.table_group == 2 and p.single_quads == (target == "cpu" and QUADS_HOST)
    check_lut(p, wts, kern, np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 4])
def test_lut_int16_sums_do_not_overflow(tmp_path, bits):
    """Largest codes, every activation of one sign (every lookup +-127): a group of 256 rows is
    64 steps of at most 381 in one int16 sum (24384), exact against the model."""
    k, n = 512, 64
    p, wts, kern = build_kernel(tmp_path, "cpu-x86-avx2", k, n, scheme_text(bits, 256, False, True),
                                seed=bits)
    assert kernels.lut_flush_steps(256, 4) == 64
    wts["q"][:] = (1 << bits) - 1
    kern = runtime.QmmKernel(str(tmp_path / f"lut_cpu-x86-avx2_{bits}.so"), p, kern.variants,
                             runtime.pack_weights(p, wts["q"], wts["scale"], wts["zp"], None))
    x = np.full((2, k), 3.0, np.float32)
    x[1] = -np.random.default_rng(0).random(k).astype(np.float32) - 1
    check_lut(p, wts, kern, x)


def test_lut_flush_steps():
    """int16 runs: the whole group up to 86 table groups, else the largest divisor below."""
    assert kernels.lut_flush_steps(128, 4) == 32
    assert kernels.lut_flush_steps(4096, 4) == 64        # a per-column group of K = 4096
    assert all(kernels.lut_flush_steps(b, g) * 381 <= 32767
               for b in (32, 128, 1024, 4096) for g in (2, 4))


def test_lut_tables_prologue_matches_numpy(tmp_path):
    """The compiled qmm_lut_tables equals runtime.lut_tables bit for bit (a zero group
    included)."""
    for bits in (4, 3):  # (3: on a VBMI + VNNI host, the tables a quad a row)
        p, wts, kern = build_kernel(tmp_path, "cpu", 256, 64, scheme_text(bits, 32, False, True),
                                    seed=bits)
        x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32) * 5
        x[1, :32] = 0
        _, buf, _ = kern.prepare(x)
        tables, tscale, xsum = runtime.lut_tables(x, 4, 32)
        lut, got_scale, got_xsum = (a.numpy() for a in buf.args)
        if p.single_quads:
            assert lut.shape == (3, 16, 64)
            lut = lut.reshape(3, 64, 16)
        # (with vpermb lookups each table is stored once per 128-bit lane:
        # kernels.lut_table_bytes)
        copies = kernels.lut_table_bytes(p.kernel_shape()) // kernels.LUT_TABLE_BYTES
        assert lut.shape == tables.shape[:2] + (16 * copies,)
        np.testing.assert_array_equal(lut, np.tile(tables, (1, 1, copies)))
        np.testing.assert_array_equal(got_scale, tscale)
        np.testing.assert_allclose(got_xsum, xsum, rtol=1e-5, atol=1e-4)  # summation order
        assert tscale[1, 0] == 1.0 and not tables[1, :8].any()


def lut_assembly(target_name, bits):
    import tvm

    tgt = get_target(target_name)
    scheme = scheme_text(bits, 32, False, True)
    key = key_for(1, 256, 128, scheme, "lut")
    variant = {**tuning.default_config(tgt, key), "m": 1, "max_m": 0}
    p = tuning.with_table_group(tuning.problem(tgt, key), variant)
    ex = tvm.compile(kernels.build_module(p.kernel_shape(), [variant]),
                     target=host.tvm_target(tgt))
    return ex.mod.inspect_source("asm")


@pytest.mark.parametrize("bits", [3, 4])
def test_lut_avx2_code_uses_vpshufb_and_no_avx512(bits):
    asm = lut_assembly("cpu-x86-avx2", bits)
    assert "vpshufb" in asm and "vpmaddubsw" in asm and "ymm" in asm
    for banned in ("zmm", "{evex}", "%k1"):
        assert banned not in asm, f"{banned} in the AVX2 lut kernel"


def test_lut_host_code_uses_the_widest_lookup():
    """The host's lut kernel looks up on its widest vectors: vpermb where it has AVX-512 VBMI
    (no nibble masks), else vpshufb."""
    p = tuning.problem(get_target("cpu"), key_for(1, 256, 128, scheme_text(2, 32, False, True),
                                                  "lut"))
    assert p.byte_permute == (p.lanes == 64 and "avx512vbmi" in host.host_flags()[1])
    asm = lut_assembly("cpu", 2)
    reg, lookup = "zmm" if p.lanes == 64 else "ymm", "vpermb" if p.byte_permute else "vpshufb"
    assert any(lookup in line and reg in line for line in asm.splitlines())
    other = "vpshufb" if p.byte_permute else "vpermb"
    assert other not in asm


def test_lut_avx512_without_vbmi_uses_vpshufb_on_zmm():
    """cpu-x86-avx512 (Cascade Lake: AVX-512BW, no VBMI) keeps vpshufb and its nibble masks;
    compiled only, so it is checked on every host."""
    p = tuning.problem(get_target("cpu-x86-avx512"), key_for(
        1, 256, 128, scheme_text(2, 32, False, True), "lut"))
    assert not p.byte_permute and p.lanes == 64
    asm = lut_assembly("cpu-x86-avx512", 2)
    assert any("vpshufb" in line and "zmm" in line for line in asm.splitlines())
    assert "vpermb" not in asm


@pytest.mark.parametrize("bits", [2, 3])
def test_lut_end_to_end_pipeline(tmp_path, bits):
    """cpu-schedule{numerics=lut} + cpu-pack-weights: the cpu_lut layout with its parameters
    is printed (3-bit on a VBMI + VNNI host: single_quads, and f16 scales on x86), the
    compiled module matches the reference; a config whose table_group disagrees with the
    packed layout is refused."""
    from qcompiler.codegen.cpu.config import validate
    from qcompiler.errors import ConfigError
    from qcompiler.runtime.reference import run as reference_run
    from test_cpu_backend import compile_module, qmm_module

    module = qmm_module(160, 48, bits, 32, batch=5, seed=3)
    compiled, out = compile_module(module, tmp_path, numerics="lut")
    text = open(f"{out}/module.qir").read()
    assert "#layout<cpu_lut" in text and f"bits={bits}" in text and "table_group=4" in text
    assert ("single_quads=1" in text) == (bits == 3 and QUADS_HOST)
    assert "scale_dtype=f16" in text
    x = np.random.default_rng(9).standard_normal((5, 160)).astype(np.float32)
    got = compiled.run({"x": x})["y"]
    want = reference_run(module, {"x": x})["y"]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    node = next(n for n in compiled.module.main.nodes if n.op == "qmatmul")
    cfg = node.attrs["config"]
    assert cfg["numerics"] == "lut"
    bad = {**cfg, "variants": {**cfg["variants"],
                               "v0": {**cfg["variants"]["v0"], "table_group": 2}}}
    with pytest.raises(ConfigError, match="table_group"):
        validate(bad, node, get_target("cpu"))


VBMI_HOST = tuning.problem(get_target("cpu"), key_for(
    1, 256, 128, scheme_text(2, 32, False, True), "lut")).byte_permute


def test_lut_lookup_follows_the_model_weights_against_the_llc(tmp_path, monkeypatch):
    """cpu-schedule gives a lut kernel vpermb while the model's weights fit in the host's
    last-level cache and vpshufb where they outgrow it (``tuning.lut_byte_permute``); the
    config records it, the kernel looks up with it, and both match the reference."""
    from qcompiler.codegen.cpu.config import validate
    from qcompiler.errors import ConfigError
    from qcompiler.passes import cpu_schedule
    from qcompiler.runtime.reference import run as reference_run
    from test_cpu_backend import compile_module, qmm_module

    module = qmm_module(256, 128, 2, 32, batch=1, seed=5)
    assert cpu_schedule.model_weight_bytes(module) == 256 * 128 * 2 // 8
    x = np.random.default_rng(4).standard_normal((1, 256)).astype(np.float32)
    want = reference_run(module, {"x": x})["y"]
    seen = {}
    for llc in (1 << 30, 1024):  # a cache that holds the 8 KB of codes, one that does not
        monkeypatch.setattr(host, "llc_bytes", lambda llc=llc: llc)
        compiled, _ = compile_module(module, tmp_path / f"llc{llc}", numerics="lut")
        node = next(n for n in compiled.module.main.nodes if n.op == "qmatmul")
        seen[llc] = node.attrs["config"]["byte_permute"]
        got = compiled.run({"x": x})["y"]
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    assert seen == {1 << 30: int(VBMI_HOST), 1024: 0}
    # the rule alone, on any host: vpermb only where the target has it; odd planes in quads
    # keep it whatever the weights; an unknown cache size keeps it
    import dataclasses

    base = tuning.with_table_group(tuning.problem(get_target("cpu"), key_for(
        1, 256, 128, scheme_text(2, 32, False, True), "lut")), {"table_group": 4})
    vbmi = dataclasses.replace(base, byte_permute=True, single_quads=False)
    assert tuning.lut_byte_permute(vbmi, model_weight_bytes=10, llc=100)
    assert not tuning.lut_byte_permute(vbmi, model_weight_bytes=1000, llc=100)
    assert tuning.lut_byte_permute(vbmi, model_weight_bytes=1000, llc=0)
    assert tuning.lut_byte_permute(dataclasses.replace(vbmi, single_quads=True), 1000, 100)
    assert not tuning.lut_byte_permute(dataclasses.replace(vbmi, byte_permute=False), 10, 100)
    p_small = tuning.lut_byte_permute(tuning.with_table_group(tuning.problem(
        get_target("cpu"), key_for(1, 256, 128, scheme_text(2, 32, False, True), "lut")),
        {"table_group": 4}), model_weight_bytes=8192, llc=0)
    assert p_small == VBMI_HOST  # an unknown cache size keeps vpermb
    cfg = node.attrs["config"]
    with pytest.raises(ConfigError, match="byte_permute=2"):
        validate({**cfg, "byte_permute": 2}, node, get_target("cpu"))
    if not VBMI_HOST:  # vpermb asked of a target without VBMI
        from qcompiler.codegen.cpu import layout as cpu_layout

        with pytest.raises(cpu_layout.Unsupported, match="lacks AVX-512 VBMI"):
            tuning.problem_from_layout(get_target("cpu"), node.arg("w").type.layout,
                                       {**cfg, "byte_permute": 1})


@pytest.mark.parametrize("target", TARGETS)
def test_lut_bind_writes_an_aligned_output_in_place(tmp_path, target):
    """A plan binds each kernel to its arena views once (``bind``). With N a whole number of
    column tiles and a 64-byte aligned out, the lut kernel writes out itself and its tables
    read x in place; its bound call gives what a plain call gives (it used to fail looking up
    the int8/exact m_block knob), also after x's contents change."""
    from qcompiler.codegen.cpu.native_calls import CallSequence

    scheme = scheme_text(2, 128, False, True)
    p0 = tuning.problem(get_target(target), key_for(1, 256, 8, scheme, "lut"))
    n = 2 * p0.n_tile  # no padding of N: direct_output applies
    p, wts, kern = build_kernel(tmp_path, target, 256, n, scheme, seed=5)
    assert p.n_pad == n
    for m in (1, 3):
        x = runtime.aligned_empty((m, 256), np.float32)
        x[:] = np.random.default_rng(m).standard_normal((m, 256))
        out = runtime.aligned_empty((m, n), np.float32)
        assert kern.direct_output(out) is not None
        out[:] = np.nan
        call = kern.bind(x, out)
        assert isinstance(call, CallSequence)  # in place: tables over x, kernel into out
        call()
        np.testing.assert_array_equal(out, kern(x))
        check_lut(p, wts, kern, x)
        # bound once, it reads x in place at every call (a plan's arena view, refilled)
        x[:] = np.random.default_rng(10 + m).standard_normal((m, 256))
        out[:] = np.nan
        call()
        np.testing.assert_array_equal(out, kern(x))


@pytest.mark.parametrize("target", TARGETS)
def test_lut_groups_longer_than_one_int16_run(tmp_path, target):
    """Blocks of 512 rows are 128 table groups at g = 4, more than one int16 sum takes (86):
    each group's sums go to float in two runs, the zero-point term once after them."""
    assert kernels.lut_flush_steps(512, 4) == 64
    p, wts, kern = build_kernel(tmp_path, target, 1024, 96, scheme_text(2, 512, False, True),
                                seed=3)
    for m in (1, 3):
        check_lut(p, wts, kern, np.random.default_rng(m).standard_normal((m, 1024))
                  .astype(np.float32))


@pytest.mark.parametrize("target", ["cpu-x86-avx2", "cpu"])
def test_auto_numerics_picks_lut_for_one_row_of_low_bit_codes(tmp_path, target):
    """numerics=auto on an accuracy_level-4 qmatmul: lut for a one-row (decode) layer of 1- or
    2-bit codes, int8 for a symbolic batch or 3-bit codes, exact without the level; the
    compiled one-row layer agrees with the reference within int8-activation accuracy."""
    from qcompiler.passes.cpu_schedule import node_numerics
    from qcompiler.runtime.reference import run as reference_run
    from test_cpu_backend import compile_module, qmm_module

    tgt = get_target(target)

    def numerics(bits, batch, level=4):
        module = qmm_module(256, 64, bits, 32, batch=batch, seed=bits)
        node = next(n for n in module.main.nodes if n.op == "qmatmul")
        if level is not None:
            node.attrs["accuracy_level"] = level
        return module, node_numerics(module, node, tgt)

    assert numerics(2, 1)[1] == "lut" and numerics(1, 1)[1] == "lut"
    assert numerics(2, "batch")[1] == "int8" and numerics(2, 4)[1] == "int8"
    assert numerics(3, 1)[1] == "int8"
    assert numerics(2, 1, level=None)[1] == "exact"
    module, _ = numerics(2, 1)
    compiled, _ = compile_module(module, tmp_path, numerics="auto", target=target)
    node = next(n for n in compiled.module.main.nodes if n.op == "qmatmul")
    assert node.attrs["config"]["numerics"] == "lut"
    x = np.random.default_rng(4).standard_normal((1, 256)).astype(np.float32)
    got, want = compiled.run({"x": x})["y"], reference_run(module, {"x": x})["y"]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_a_tuning_log_chooses_between_int8_and_lut(tmp_path):
    """numerics=auto with a tuning log: an accuracy_level-4 qmatmul takes the int8-accuracy
    numerics the log measured fastest (here against the heuristic's choice, both ways); with
    one numerics unmeasured the heuristic's stands; while the tuner records lookups, both
    numerics' keys are asked for (so that both get tuned)."""
    from qcompiler.driver.api import run_pipeline
    from qcompiler.passes.cpu_schedule import logged_numerics, node_numerics
    from qcompiler.tuning import log as tlog
    from qcompiler.tuning.device import device_name
    from test_cpu_backend import qmm_module

    tgt = get_target("cpu")
    device = device_name(tgt)
    module = qmm_module(256, 64, 4, 32, batch=1, seed=2)
    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    node.attrs["accuracy_level"] = 4
    assert node_numerics(module, node, tgt) == "int8"  # 4-bit: the heuristic's int8

    def log_with(times):
        path = tmp_path / f"log_{'_'.join(f'{k}{v}' for k, v in times.items())}.jsonl"
        for numerics, us in times.items():
            key = tuning.node_key(node, 1, numerics)
            cfg = tuning.default_config(tgt, key)
            tlog.append(path, tlog.make_record(tgt.name, device, key, cfg,
                                               {"median": us, "min": us, "max": us}, "ok"))
        return tlog.Replay(str(path))

    assert logged_numerics(log_with({"int8": 9.0, "lut": 5.0}), tgt, device, module, node,
                           "int8") == "lut"
    assert logged_numerics(log_with({"int8": 5.0, "lut": 9.0}), tgt, device, module, node,
                           "lut") == "int8"
    assert logged_numerics(log_with({"lut": 1.0}), tgt, device, module, node,
                           "int8") == "lut"  # the heuristic's unmeasured, the other measured
    assert logged_numerics(log_with({"int8": 9.0}), tgt, device, module, node,
                           "int8") == "int8"
    node.attrs["accuracy_level"] = None
    assert logged_numerics(log_with({"int8": 9.0, "lut": 1.0}), tgt, device, module, node,
                           "exact") == "exact"  # no level 4: int8 accuracy is not allowed
    node.attrs["accuracy_level"] = 4
    replay = log_with({"int8": 9.0, "lut": 5.0})
    scheduled, _, _ = run_pipeline(module, f"cpu-schedule{{tuning_log={replay.path}}},"
                                           "cpu-pack-weights")
    cfg = next(n for n in scheduled.main.nodes if n.op == "qmatmul").attrs["config"]
    assert cfg["numerics"] == "lut" and cfg["source"] == "tuning-log"
    with tlog.recording_lookups() as keys:
        logged_numerics(tlog.Replay(str(tmp_path / "unused.jsonl")), tgt, device, module,
                        node, "int8")
    assert sorted(k.get("numerics") for k in keys) == ["int8", "lut"]
    # a symbolic batch: every bucket of both, so that either can be chosen after tuning
    batched = qmm_module(256, 64, 4, 32, batch="batch", seed=2)
    bnode = next(n for n in batched.main.nodes if n.op == "qmatmul")
    bnode.attrs["accuracy_level"] = 4
    with tlog.recording_lookups() as keys:
        logged_numerics(tlog.Replay(str(tmp_path / "unused.jsonl")), tgt, device, batched,
                        bnode, "int8")
    assert sorted((k.get("numerics"), k["m"]) for k in keys) == \
        [(n, m) for n in ("int8", "lut") for m in (1, 16, 128)]
