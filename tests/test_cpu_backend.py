"""The CPU backend (TVM TensorIR -> LLVM): correctness against the numpy reference, goldens.

Every kernel runs on fresh random inputs (never zeros) and is compared with
``qcompiler.runtime.reference`` (exact path: fp32 tolerance) or with a numpy model of the int8
arithmetic (int8 path: tight) and the float reference (int8 path: the documented tolerance).
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("tvm")

import qcompiler  # noqa: E402
from conftest import ROOT, check_golden  # noqa: E402
from qcompiler.codegen.cpu import host, kernels, layout, runtime, tuning  # noqa: E402
from qcompiler.driver.api import compile_to_dir, import_model, run_pipeline  # noqa: E402
from qcompiler.ir import Function, Module  # noqa: E402
from qcompiler.ir.core import constant_node  # noqa: E402
from qcompiler.ir.types import QuantScheme, elem, tensor  # noqa: E402
from qcompiler.pipeline import PassError  # noqa: E402
from qcompiler.runtime.reference import run as reference_run  # noqa: E402
from qcompiler.targets import get_target  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden", "cpu")
MLP = os.path.join(ROOT, "examples", "mlp_int4.onnx")
HOST = host.target_cpu(get_target("cpu"))
HAS_VNNI = HOST["vnni"]
_ISA_NOTE = (f"; {host.HOST_ISA_ENV}={host.host_isa_override()}" if host.host_isa_override()
             else "")
needs_vnni = pytest.mark.skipif(
    not HAS_VNNI, reason=f"the int8 path needs AVX-512 VNNI (host -mcpu={HOST['mcpu']}{_ISA_NOTE})")


def pipeline(target="cpu", numerics="exact", tuning_log=""):
    log = f",tuning_log={tuning_log}" if tuning_log else ""
    return (f"canonicalize,fuse-dequant,canonicalize,"
            f"cpu-schedule{{target={target},numerics={numerics}{log}}},"
            f"cpu-pack-weights{{target={target}}}")


def qmm_module(k, n, bits, group, *, signed=False, zp=True, act_order=False, bias=True,
               batch="batch", seed=0, lead=()):
    """A one-qmatmul module with random codes, scales, zero points (and g_idx, bias).

    ``group``: a block size along K, or "channel" (one scale per column) or "tensor".
    """
    rng = np.random.default_rng(seed)
    code_t = elem(f"{'i' if signed else 'u'}{bits}")
    lo, hi = code_t.int_range()
    if group == "channel":
        gran = dict(granularity="channel", axis=1)
        sshape = (n,)
    elif group == "tensor":
        gran = dict(granularity="tensor")
        sshape = ()
    else:
        gran = dict(granularity="group", axis=0, block_size=group, act_order=act_order)
        sshape = (-(-k // group), n)
    scheme = QuantScheme(code_t, symmetric=not zp, zero_point_type=code_t if zp else None,
                         **gran)
    m = Module("qmm_test")
    fn = m.add_function(Function("main"))
    x = fn.add_arg("x", tensor([*lead, batch, k], "f32"))
    q = rng.integers(lo, hi + 1, (k, n)).astype(code_t.np_dtype)
    w = constant_node(fn, m, q, tensor([k, n], code_t), name_hint="w").result
    s = constant_node(fn, m, (rng.random(sshape) * 0.05 + 0.01).astype(np.float32),
                      name_hint="w_scale").result
    z = None
    if zp:
        z = constant_node(fn, m, rng.integers(lo, hi + 1, sshape).astype(code_t.np_dtype),
                          tensor(list(sshape), code_t), name_hint="w_zp").result
    g = None
    if act_order:
        g_idx = rng.permutation(np.arange(k) // group).astype(np.int32)
        g = constant_node(fn, m, g_idx, name_hint="g_idx").result
    b = None
    if bias:
        b = constant_node(fn, m, rng.standard_normal(n).astype(np.float32),
                          name_hint="bias").result
    node = fn.make_node("qmatmul", [x, w, s, z, g, None, None, b],
                        [tensor([*lead, batch, n], "f32")],
                        {"w_scheme": scheme, "act": "float"}, names=["y"])
    fn.set_outputs([node.result], ["y"])
    return m


def compile_module(module, tmp_path, numerics="exact", target="cpu", name="out", **options):
    out, _ = compile_to_dir(module, target, str(tmp_path / name),
                            passes=pipeline(target, numerics), **options)
    return qcompiler.load(out), out


def rand_x(m, k, seed=1):
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


def assert_close_fp32(got, want, k):
    tol = 2e-5 * max(1.0, float(np.abs(want).max())) * max(1.0, np.sqrt(k) / 8)
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max |cpu - reference| = {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------------------------
# host detection
# --------------------------------------------------------------------------------------------


def test_host_mcpu_is_a_real_llvm_cpu():
    from tvm.target import codegen

    info = host.host_cpu()
    assert info["mcpu"] not in ("native", "generic")
    assert codegen.llvm_is_valid_cpu(info["mcpu"], "x86_64-linux-gnu")


@pytest.mark.parametrize("vendor,flags,want", [
    ("AuthenticAMD", host._VNNI | {"avx512_bf16", "avx_vnni", "avx512_vp2intersect",
                                   "avx512_vbmi2"}, "znver5"),
    ("AuthenticAMD", host._VNNI | {"avx512_bf16", "avx512_vbmi2", "avx512_bitalg"}, "znver4"),
    ("GenuineIntel", host._VNNI, "cascadelake"),
    ("GenuineIntel", host._AVX512, "skylake-avx512"),
    ("GenuineIntel", host._AVX2, "haswell"),
    ("GenuineIntel", {"sse2"}, "x86-64"),
])
def test_mcpu_from_cpuinfo_flags(vendor, flags, want):
    assert host.choose_mcpu(vendor, flags) == want


SPR_FLAGS = host.CANDIDATES["GenuineIntel"][0][1] | {"sse4_2", "amx_tile", "avx512_vpopcntdq"}
ZEN4_FLAGS = host.CANDIDATES["AuthenticAMD"][1][1] | {"vaes", "vpclmulqdq", "avx512ifma"}


@pytest.mark.parametrize("vendor,flags,want", [
    ("GenuineIntel", SPR_FLAGS, "haswell"), ("AuthenticAMD", ZEN4_FLAGS, "znver3")])
def test_avx2_mask_is_a_haswell_or_zen3(vendor, flags, want):
    masked = host.mask_flags(flags, "avx2")
    assert host._AVX2 <= masked
    assert not {f for f in masked if "avx512" in f or "vnni" in f or f.startswith("amx")}
    assert host.choose_mcpu(vendor, masked) == want
    assert host.mask_flags(flags, None) == flags == host.mask_flags(flags, "avx512")


@pytest.fixture
def fake_cpuinfo(monkeypatch):
    """Replace /proc/cpuinfo with (vendor, flags); the detection caches are cleared around."""
    def install(vendor, flags):
        monkeypatch.setattr(host, "read_cpuinfo", lambda path="/proc/cpuinfo": (vendor, flags))
        host._host_flags.cache_clear()
        host._host_cpu.cache_clear()
    yield install
    host._host_flags.cache_clear()
    host._host_cpu.cache_clear()


def test_host_isa_avx2_takes_the_zen3_path(monkeypatch, fake_cpuinfo):
    """QC_HOST_ISA=avx2 on an AVX-512 VNNI host: 256-bit vectors, no VNNI, an AVX2 -mcpu."""
    fake_cpuinfo("AuthenticAMD", ZEN4_FLAGS)
    monkeypatch.delenv(host.HOST_ISA_ENV, raising=False)
    keys = ("mcpu", "vector_bits", "vnni")
    cpu = host.target_cpu(get_target("cpu"))
    assert {k: cpu[k] for k in keys} == {"mcpu": "znver4", "vector_bits": 512, "vnni": True}
    assert cpu["arch"] == "x86_64"
    monkeypatch.setenv(host.HOST_ISA_ENV, "avx2")
    cpu = host.target_cpu(get_target("cpu"))
    assert {k: cpu[k] for k in keys} == {"mcpu": "znver3", "vector_bits": 256, "vnni": False}
    assert host.host_cpu()["isa_override"] == "avx2"
    assert not [f for f in host.host_cpu()["features"] if "avx512" in f or "vnni" in f]


def test_host_isa_avx512_refused_without_avx512(monkeypatch, fake_cpuinfo):
    fake_cpuinfo("AuthenticAMD", host.CANDIDATES["AuthenticAMD"][2][1])  # a Zen 3
    monkeypatch.setenv(host.HOST_ISA_ENV, "avx512")
    with pytest.raises(host.HostISAError, match="QC_HOST_ISA=avx512.*avx512f"):
        host.host_cpu()
    monkeypatch.setenv(host.HOST_ISA_ENV, "avx2")
    assert host.host_cpu()["mcpu"] == "znver3"


def test_host_isa_unknown_value_refused(monkeypatch):
    from qcompiler.errors import ConfigError

    monkeypatch.setenv(host.HOST_ISA_ENV, "sse4")
    with pytest.raises(ConfigError, match="QC_HOST_ISA='sse4'.*avx2, avx512"):
        host.target_cpu(get_target("cpu"))


def test_host_isa_avx2_compiles_and_runs_on_this_host(tmp_path, monkeypatch):
    """The cpu target under QC_HOST_ISA=avx2: cpu-schedule picks the 256-bit tile, LLVM gets
    an AVX2 -mcpu, and the kernel (AVX2 code runs on any x86-64 host here) is exact."""
    if not host._AVX2 <= host.read_cpuinfo()[1]:
        pytest.skip("this CPU lacks AVX2")
    monkeypatch.setenv(host.HOST_ISA_ENV, "avx2")
    k, n = 96, 40
    module = qmm_module(k, n, 4, 32, batch="batch", seed=9)
    compiled, out = compile_module(module, tmp_path)
    assert "#layout<cpu_tiled, n_tile=32>" in open(os.path.join(out, "module.qir")).read()
    assert compiled.manifest["kernels"][0]["mcpu"] in ("haswell", "znver3", "znver2")
    for m in (1, 5):
        x = rand_x(m, k, seed=m)
        assert_close_fp32(compiled.run({"x": x})["y"], reference_run(module, {"x": x})["y"], k)


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


def test_mlp_end_to_end_symbolic_batch(tmp_path):
    """qcompile examples/mlp_int4.onnx --target cpu; every batch size runs one compiled kernel."""
    out = str(tmp_path / "mlp")
    proc = subprocess.run([sys.executable, "-m", "qcompiler.driver.cli", MLP, "--target", "cpu",
                           "-o", out], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    libs = sorted(f for f in os.listdir(os.path.join(out, "kernels")) if f.startswith("qmm_"))
    assert sum(f.endswith(".so") for f in libs) == 3   # one per qmatmul (plus the ops library)
    assert sum(f.endswith(".tir.py") for f in libs) == 3
    compiled = qcompiler.load(out)
    qmms = [c for c in compiled.manifest["kernels"] if c["op"] == "qmatmul"]
    assert len(qmms) == 3 and all(c["impl"] == "tvm-llvm" for c in qmms)
    ref_mod, _, _ = run_pipeline(import_model(MLP), "canonicalize,fuse-dequant,canonicalize")
    for m in (1, 3, 16, 17, 130):  # the three variants and their edges
        x = rand_x(m, 64, seed=m)
        got = compiled.run({"x": x})["y"]
        want = reference_run(ref_mod, {"x": x})["y"]
        assert got.shape == (m, 32)
        assert_close_fp32(got, want, 128)


# The exact path's column tile: 4 vectors of f32 columns, by the detected vector width.
N_TILE_BY_VECTOR_BITS = {256: 32, 512: 64}


def test_printed_ir_shows_the_cpu_layout(tmp_path):
    _, out = compile_module(qmm_module(64, 32, 4, 32), tmp_path)
    text = open(os.path.join(out, "module.qir")).read()
    assert "#layout<cpu_exact," in text and "codes=u4" in text
    n_tile = N_TILE_BY_VECTOR_BITS[host.target_cpu(get_target("cpu"))["vector_bits"]]
    assert f"#layout<cpu_tiled, n_tile={n_tile}>" in text


# --------------------------------------------------------------------------------------------
# correctness grid: bits x groups x zero points, odd shapes (K=200, N=37, M=3)
# --------------------------------------------------------------------------------------------

GRID = [(bits, group, zp, signed)
        for bits in (2, 3, 4, 8)
        for group, zp, signed in ((16, True, False), (32, False, True), (128, True, False),
                                  (256, False, False), ("channel", True, False))]


@pytest.mark.parametrize("bits,group,zp,signed", GRID)
def test_exact_grid(tmp_path, bits, group, zp, signed):
    k, n = 200, 37
    module = qmm_module(k, n, bits, group, zp=zp, signed=signed, batch=3, seed=bits)
    compiled, _ = compile_module(module, tmp_path)
    x = rand_x(3, k, seed=7)
    assert_close_fp32(compiled.run({"x": x})["y"], reference_run(module, {"x": x})["y"], k)


def _with_scales(module, change):
    """A copy of a one-qmatmul module whose scale operand is ``change(scales)``."""
    from qcompiler.ir.core import constant_node, constant_value, operand_index

    module = module.clone()
    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    old = node.arg("w_scale")
    new = np.asarray(change(np.asarray(constant_value(module, old))), np.float32)
    node.operands[operand_index("qmatmul", "w_scale")] = constant_node(
        module.main, module, new, old.type, before=node).result
    module.main.remove_dead_nodes()
    return module


def int8_expected(module, x, f16_scales=True):
    """numpy model of the int8 path: x quantized per row and kernel group (symmetric,
    max|x|/127, groups after the act-order permutation), then the exact float product with
    the scales as stored (``f16_scales``: rounded to float16, as cpu-pack-weights stores them
    for the x86 int8 kernels where they fit)."""
    from qcompiler.ir.core import constant_value

    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    if f16_scales:
        module = _with_scales(module, lambda s: s.astype(np.float16).astype(np.float32))
    scheme = node.attrs["w_scheme"]
    k = x.shape[1]
    bl = layout.blocking(scheme, k, "int8")
    perm = None
    if scheme.act_order:
        perm = layout.act_order_permutation(constant_value(module, node.arg("g_idx")), bl.block, k)
    xd = runtime.int8_activations(x, bl.block, bl.k_pad, perm).astype(np.float32)
    return reference_run(module, {"x": xd})["y"]


@needs_vnni
@pytest.mark.parametrize("bits,group,zp", [(2, 32, True), (3, 64, False), (4, 32, True),
                                           (4, 128, False), (8, "channel", True),
                                           (4, "tensor", True)])
@pytest.mark.parametrize("m", [3, 40])
def test_int8_grid(tmp_path, bits, group, zp, m):
    k, n = 256, 37
    module = qmm_module(k, n, bits, group, zp=zp, batch=m, seed=bits + m)
    compiled, _ = compile_module(module, tmp_path, numerics="int8")
    x = rand_x(m, k, seed=3)
    got = compiled.run({"x": x})["y"]
    # Against the numpy model of the same arithmetic: only fp32 summation order differs.
    assert_close_fp32(got, int8_expected(module, x), k)
    # Against the float reference: int8 rounding of x per row and group, |dx| <= max|x|/254
    # per element; documented bound 2% of max|y| for these random (unit-normal x) layers.
    want = reference_run(module, {"x": x})["y"]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_int8_scales_are_stored_as_f16_where_they_fit(tmp_path):
    """numerics=int8 on x86: the packed scales are float16 (``scale_dtype=f16`` in the layout,
    an f16 constant) and the kernels match the model with those scales; scales below the f16
    normals keep float32, and so does ``cpu-pack-weights{scale_dtype=f32}``."""
    k, n = 256, 37
    module = qmm_module(k, n, 4, 32, zp=True, batch=3, seed=4)
    compiled, out = compile_module(module, tmp_path, numerics="int8")
    text = open(os.path.join(out, "module.qir")).read()
    assert "scale_dtype=f16" in text and "f16, #layout<cpu_tiled" in text
    x = rand_x(3, k, seed=2)
    got = compiled.run({"x": x})["y"]
    assert_close_fp32(got, int8_expected(module, x), k)
    # the f16 rounding is visible: against the f32-scale model the error is larger
    assert np.abs(got - int8_expected(module, x, f16_scales=False)).max() > \
        np.abs(got - int8_expected(module, x)).max()
    # tiny scales (below 2^-14): float32 kept
    tiny = _with_scales(module, lambda s: s * np.float32(1e-4))
    compiled_tiny, out_tiny = compile_module(tiny, tmp_path, numerics="int8", name="tiny")
    assert "scale_dtype" not in open(os.path.join(out_tiny, "module.qir")).read()
    assert_close_fp32(compiled_tiny.run({"x": x})["y"], int8_expected(tiny, x, False), k)
    # the pass option
    spec = pipeline("cpu", "int8").replace("cpu-pack-weights{target=cpu}",
                                          "cpu-pack-weights{target=cpu,scale_dtype=f32}")
    out32, _ = compile_to_dir(module, "cpu", str(tmp_path / "f32"), passes=spec)
    assert "scale_dtype" not in open(os.path.join(out32, "module.qir")).read()
    assert_close_fp32(qcompiler.load(out32).run({"x": x})["y"],
                      int8_expected(module, x, f16_scales=False), k)
    with pytest.raises(PassError, match=r"scale_dtype='f8' \(auto or f32\)"):
        compile_to_dir(module, "cpu", str(tmp_path / "bad"), passes=spec.replace(
            "scale_dtype=f32", "scale_dtype=f8"))


def test_symmetric_weights_carry_one_zero_code(tmp_path):
    """A symmetric scheme's packed layout names its one zero code (i4: 8); the kernels take it
    as a constant and still match the reference, and a zero-point table that disagrees with
    it (hand-edited IR) is refused by name at load instead of computing another model."""
    from qcompiler.codegen.cpu.backend import CPUBackendError
    from qcompiler.registry import get_backend

    k, n = 256, 37
    module = qmm_module(k, n, 4, 32, zp=False, signed=True, batch=3, seed=11)
    compiled, out = compile_module(module, tmp_path, numerics="int8")
    text = open(os.path.join(out, "module.qir")).read()
    assert "zero_code=8" in text
    x = rand_x(3, k, seed=5)
    assert_close_fp32(compiled.run({"x": x})["y"], int8_expected(module, x), k)
    # the same compile with a zero point per column: no shared code in the layout
    _, out_zp = compile_module(qmm_module(k, n, 4, 32, zp=True, batch=3, seed=11), tmp_path,
                               numerics="int8", name="zp")
    assert "zero_code" not in open(os.path.join(out_zp, "module.qir")).read()
    mod = compiled.module
    qmm = next(nd for nd in mod.main.nodes if nd.op == "qmatmul")
    table = qmm.arg("w_zero_point").producer.attrs["name"]
    mod.constants[table] = mod.constants[table].copy()
    mod.constants[table][0, 1, 5] = 3
    with pytest.raises(CPUBackendError, match=r"%y: .*zero_code=8.*\[3, 8\]"):
        get_backend("cpu").runner(mod, compiled.manifest, out)


@needs_vnni
def test_int8_quantize_prologue_matches_numpy(tmp_path):
    """The compiled qmm_quantize equals runtime.quantize_groups bit for bit (a zero group,
    ties and large values included)."""
    tgt = get_target("cpu")
    key = {"op": "qmatmul", "m": 3, "k": 256, "n": 64, "act": "float", "x_dtype": "f32",
           "w_scheme": "#quant<u4, symmetric, per_group(axis=0, block=32), scale=f32>",
           "has_bias": False, "act_order": False, "numerics": "int8"}
    p = tuning.problem(tgt, key)
    wts = tuning.random_weights(p, np.random.default_rng(0))
    variants = [{**tuning.default_config(tgt, key), "m": 3, "max_m": 0}]
    lib = runtime.build_library(p.kernel_shape(), variants, tgt, str(tmp_path / "k"))
    kern = runtime.QmmKernel(lib, p, variants,
                             runtime.pack_weights(p, wts["q"], wts["scale"], None, None))
    x = rand_x(3, 256) * 5
    x[1, :32] = 0                      # an all-zero group
    x[2, :32] = np.arange(32) - 15.5   # evenly spread values
    _, buf, _ = kern.prepare(x)
    g = x.reshape(3, 8, 32)
    xq = np.empty(g.shape, np.int8)
    scale = np.empty((3, 8), np.float32)
    runtime.quantize_groups(g, xq, scale)
    np.testing.assert_array_equal(buf.xq[:3].reshape(g.shape), xq)
    np.testing.assert_array_equal(buf.x_scale[:3], scale)
    np.testing.assert_array_equal(buf.xsum[:3], xq.sum(-1).astype(np.float32))
    assert scale[1, 0] == 1.0 and not xq[1, 0].any()


@pytest.mark.parametrize("numerics", ["exact", pytest.param("int8", marks=needs_vnni)])
def test_act_order(tmp_path, numerics):
    k, n = 256, 48
    module = qmm_module(k, n, 4, 32, act_order=True, batch="batch", seed=5)
    compiled, out = compile_module(module, tmp_path, numerics=numerics)
    assert "act_order=1" in open(os.path.join(out, "module.qir")).read()
    for m in (1, 5):
        x = rand_x(m, k, seed=m)
        want = (reference_run(module, {"x": x})["y"] if numerics == "exact"
                else int8_expected(module, x))
        assert_close_fp32(compiled.run({"x": x})["y"], want, k)


KNOB_POINTS = [("exact", {"m_block": 1, "order": "row", "k_unroll": 8, "col_vectors": 4}),
               ("exact", {"m_block": 2, "order": "row", "k_unroll": 16, "col_vectors": 2}),
               ("exact", {"m_block": 4, "order": "group", "k_unroll": 8, "col_vectors": 1}),
               ("exact", {"m_block": 8, "order": "dequant", "k_unroll": 16, "col_vectors": 2}),
               ("int8", {"m_block": 1, "order": "row"}),
               ("int8", {"m_block": 4, "order": "group"}),
               ("int8", {"m_block": 8, "order": "row"})]


@pytest.mark.parametrize("numerics,config", KNOB_POINTS,
                         ids=[f"{n}-{c['order']}-mb{c['m_block']}" for n, c in KNOB_POINTS])
def test_every_schedule_is_correct(tmp_path, numerics, config):
    """Each point of the search space computes the same thing (M=5 is no multiple of m_block,
    K=272 pads to whole groups of 32, N=70 pads to whole tiles)."""
    if numerics == "int8" and not HAS_VNNI:
        pytest.skip(f"the int8 path needs AVX-512 VNNI (host -mcpu={HOST['mcpu']}{_ISA_NOTE})")
    tgt = get_target("cpu")
    key = {"op": "qmatmul", "m": 5, "k": 272, "n": 70, "act": "float", "x_dtype": "f32",
           "w_scheme": "#quant<u4, affine, per_group(axis=0, block=32), scale=f32, zp=u4>",
           "has_bias": False, "act_order": False}
    if numerics != "exact":
        key["numerics"] = numerics
    assert tuning.check_config(tgt, key, config) is None
    p = tuning.problem(tgt, key)
    wts = tuning.random_weights(p, np.random.default_rng(3))
    variants = [{**config, "m": 5, "max_m": 0}]
    lib = runtime.build_library(p.kernel_shape(), variants, tgt, str(tmp_path / "k"))
    kern = runtime.QmmKernel(lib, p, variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], None))
    x = rand_x(5, 272)
    assert_close_fp32(kern(x), runtime.numpy_model(p, x, wts["q"], wts["scale"], wts["zp"],
                                                   None), 272)


def test_dequant_reads_rows_in_place(tmp_path):
    """The dequant order reads x row-major: an aligned, unpadded x is passed without a copy
    (wrapped per call: a second x must not see the first one's rows); unaligned and padded
    x go through the kernel's own buffer."""
    tgt = get_target("cpu")
    k, n = 256, 70
    key = {"op": "qmatmul", "m": 16, "k": k, "n": n, "act": "float", "x_dtype": "f32",
           "w_scheme": "#quant<u4, affine, per_group(axis=0, block=32), scale=f32, zp=u4>",
           "has_bias": False, "act_order": False}
    config = {"m_block": 8, "order": "dequant", "k_unroll": 16, "col_vectors": 2}
    p = tuning.problem(tgt, key)
    wts = tuning.random_weights(p, np.random.default_rng(4))
    variants = [{**config, "m": 16, "max_m": 0}]
    lib = runtime.build_library(p.kernel_shape(), variants, tgt, str(tmp_path / "k"))
    kern = runtime.QmmKernel(lib, p, variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], None))
    for m, seed, aligned in ((16, 1, True), (16, 2, True), (16, 3, False), (11, 4, True)):
        x = rand_x(m, k, seed=seed)
        if aligned:
            x_in = runtime.aligned_empty((m, k), np.float32)
            x_in[:] = x
        else:
            x_in = np.empty(m * k + 1, np.float32)[1:].reshape(m, k)
            x_in[:] = x
        assert_close_fp32(kern(x_in), runtime.numpy_model(p, x, wts["q"], wts["scale"],
                                                          wts["zp"], None), k)
        buf = kern.prepare(x_in)[1]
        assert (buf.args[0] is not buf.own_x_arg) == (aligned and m == 16)


def test_leading_dims_and_bias(tmp_path):
    """x [2, batch, K] (two leading dims, one symbolic), bias added, f32 out."""
    k, n = 64, 40
    module = qmm_module(k, n, 4, 16, batch="batch", seed=11, lead=(2,))
    compiled, _ = compile_module(module, tmp_path)
    for rows in (1, 3):
        x = np.random.default_rng(rows).standard_normal((2, rows, k)).astype(np.float32)
        y = compiled.run({"x": x})["y"]
        assert y.shape == (2, rows, n)
        assert_close_fp32(y, reference_run(module, {"x": x})["y"], k)


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------


def test_one_and_two_threads(tmp_path):
    k, n = 512, 96
    module = qmm_module(k, n, 4, 64, batch="batch", seed=2)
    compiled, _ = compile_module(module, tmp_path)
    x = rand_x(9, k)
    want = reference_run(module, {"x": x})["y"]
    results = []
    try:
        for threads in (1, 2):
            assert runtime.set_num_threads(threads) == threads
            results.append(compiled.run({"x": x})["y"])
            assert_close_fp32(results[-1], want, k)
    finally:
        runtime.set_num_threads(0)
    # Columns are split between threads, never a sum: the two runs agree bit for bit.
    assert np.array_equal(results[0], results[1])


# --------------------------------------------------------------------------------------------
# targets, refusals, fallbacks, errors
# --------------------------------------------------------------------------------------------


# The flags as the compiler sees them: under QC_HOST_ISA=avx2 the AVX-512 target is skipped,
# as on a Zen 3.
HOST_FLAGS = host.host_flags()[1]


@pytest.mark.parametrize("target", [
    pytest.param("cpu-x86-avx2", marks=pytest.mark.skipif(
        not host._AVX2 <= HOST_FLAGS, reason=f"this host lacks AVX2{_ISA_NOTE}")),
    pytest.param("cpu-x86-avx512", marks=pytest.mark.skipif(
        not host._VNNI <= HOST_FLAGS, reason=f"this host lacks AVX-512 VNNI{_ISA_NOTE}"))])
def test_fixed_x86_targets(tmp_path, target):
    k, n = 128, 40
    module = qmm_module(k, n, 4, 32, batch=2, seed=4)
    compiled, out = compile_module(module, tmp_path, target=target)
    want_mcpu = get_target(target).params["mcpu"]
    assert compiled.manifest["kernels"][0]["mcpu"] == want_mcpu
    x = rand_x(2, k)
    assert_close_fp32(compiled.run({"x": x})["y"], reference_run(module, {"x": x})["y"], k)


@pytest.mark.parametrize("target,isa", [("cpu-x86-avx2", None), ("cpu", "avx2")])
def test_int8_without_vnni_takes_the_avx2_path(tmp_path, monkeypatch, target, isa):
    """numerics=int8 on an AVX2 target or host: the AVX2 dot (8 int32 lanes), end to end
    (tests/test_cpu_avx2.py checks its kernels in depth)."""
    if not host._AVX2 <= HOST_FLAGS:
        pytest.skip(f"this host lacks AVX2{_ISA_NOTE}")
    if isa:
        monkeypatch.setenv(host.HOST_ISA_ENV, isa)
    module = qmm_module(64, 16, 4, 32, batch=3, seed=8)
    compiled, _ = compile_module(module, tmp_path, numerics="int8", target=target)
    qmm = next(c for c in compiled.manifest["kernels"] if c["op"] == "qmatmul")
    assert qmm["config"]["lanes"] == 8 and qmm["mcpu"] in ("haswell", "znver3", "znver2")
    x = rand_x(3, 64, seed=9)
    assert_close_fp32(compiled.run({"x": x})["y"], int8_expected(module, x), 64)


@pytest.mark.parametrize("target", ["cpu", "cpu-x86-avx2"])
def test_int8_config_never_reaches_llvm_without_vnni(tmp_path, monkeypatch, target):
    """An int8 config scheduled for a VNNI target (as a .qir file or tuning log can carry it)
    is refused by the backend, naming the node, before LLVM (which aborts the process)."""
    from qcompiler.codegen.cpu.backend import CPUBackend, CPUBackendError

    scheduled, _, _ = run_pipeline(qmm_module(64, 16, 4, 32), pipeline("cpu-x86-avx512", "int8"))
    node = next(n for n in scheduled.main.nodes if n.op == "qmatmul")
    assert node.attrs["config"]["numerics"] == "int8"
    monkeypatch.setenv(host.HOST_ISA_ENV, "avx2")
    with pytest.raises(CPUBackendError,
                       match=r"%y: this numerics=int8 config needs AVX-512 VNNI"):
        CPUBackend().compile(scheduled, get_target(target), str(tmp_path / "out"))
    assert not [f for f in os.listdir(tmp_path / "out" / "kernels") if f.endswith(".so")]


def test_bad_numerics_option(tmp_path):
    with pytest.raises(PassError, match="numerics"):
        compile_module(qmm_module(64, 16, 4, 32), tmp_path, numerics="fp16")


def test_unsupported_scheme_runs_on_reference(tmp_path):
    """Groups along N: no CPU kernel; the numpy reference runs it and the manifest says so."""
    k, n = 32, 64
    rng = np.random.default_rng(0)
    m = Module("grouped_n")
    fn = m.add_function(Function("main"))
    x = fn.add_arg("x", tensor(["batch", k], "f32"))
    scheme = QuantScheme(elem("i4"), granularity="group", axis=1, block_size=16)
    w = constant_node(fn, m, rng.integers(-8, 8, (k, n)).astype(np.int8),
                      tensor([k, n], "i4")).result
    s = constant_node(fn, m, (rng.random((k, n // 16)) + 0.1).astype(np.float32)).result
    node = fn.make_node("qmatmul", [x, w, s], [tensor(["batch", n], "f32")],
                        {"w_scheme": scheme, "act": "float"}, names=["y"])
    fn.set_outputs([node.result], ["y"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, _ = compile_module(m, tmp_path, allow_host_fallback=True)
    assert any("groups along N" in str(w.message) for w in caught)
    assert compiled.manifest["kernels"][0]["impl"] == "reference"
    xv = rand_x(2, k)
    np.testing.assert_allclose(compiled.run({"x": xv})["y"], reference_run(m, {"x": xv})["y"],
                               rtol=1e-6)


def test_wrong_input_shape_names_the_node(tmp_path):
    compiled, _ = compile_module(qmm_module(64, 16, 4, 32), tmp_path)
    with pytest.raises(ValueError, match="%x"):
        compiled.run({"x": rand_x(2, 63)})


def test_unequal_act_order_groups_refused():
    g_idx = np.array([0, 0, 0, 1], np.int32)
    with pytest.raises(layout.Unsupported, match="act-order"):
        layout.act_order_permutation(g_idx, 2, 4)


# --------------------------------------------------------------------------------------------
# golden scheduled TensorIR (two canonical configs)
# --------------------------------------------------------------------------------------------

CANONICAL = {
    # 4-bit, groups of 128, fp32 activations, M=1 GEMV variant.
    "exact_u4_g128_row_mb1.tir.py": (
        kernels.KernelShape("exact", n_pad=128, k_pad=256, block=128, groups=2, n_tile=64,
                            container_bits=4, lanes=16),
        {"m_block": 1, "order": "row", "k_unroll": 16, "col_vectors": 4}),
    # 4-bit, groups of 32, int8 activations with VNNI, many-rows variant.
    "int8_u4_g32_group_mb4.tir.py": (
        kernels.KernelShape("int8", n_pad=64, k_pad=64, block=32, groups=2, n_tile=64,
                            container_bits=4, lanes=16),
        {"m_block": 4, "order": "group"}),
    # 4-bit, groups of 32, int8 activations with VNNI, few-rows variant: the fused kernel
    # (codes unpacked in registers, two rows of accumulators).
    "int8_u4_g32_row_mb2.tir.py": (
        kernels.KernelShape("int8", n_pad=64, k_pad=64, block=32, groups=2, n_tile=64,
                            container_bits=4, lanes=16),
        {"m_block": 2, "order": "row"}),
}


@pytest.mark.parametrize("name", sorted(CANONICAL))
def test_golden_scheduled_tir(name, update_goldens):
    ks, variant = CANONICAL[name]
    text = runtime.scheduled_source(ks, [variant])
    check_golden(os.path.join(GOLDEN, name), text, update_goldens)


# --------------------------------------------------------------------------------------------
# the tuning contract
# --------------------------------------------------------------------------------------------


def _key(m=16, numerics="exact", scheme="#quant<u4, affine, per_group(axis=0, block=32), "
                                        "scale=f32, zp=u4>"):
    key = {"op": "qmatmul", "m": m, "k": 256, "n": 48, "w_scheme": scheme, "act": "float",
           "x_dtype": "f32", "has_bias": False, "act_order": False}
    if numerics != "exact":
        key["numerics"] = numerics
    return key


@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize("numerics", ["exact", pytest.param("int8", marks=needs_vnni)])
def test_default_config_is_in_the_space(m, numerics):
    tgt = get_target("cpu")
    key = _key(m, numerics)
    cfg = tuning.default_config(tgt, key)
    space = tuning.search_space(tgt, key)
    assert set(cfg) == set(space)
    assert all(cfg[k] in space[k] for k in space)
    assert tuning.check_config(tgt, key, cfg) is None
    assert "m_block" in tuning.check_config(tgt, key, {**cfg, "m_block": 3})


def test_measure_checks_and_times(tmp_path):
    tgt = get_target("cpu")
    key = _key(4)
    res = tuning.measure(tgt, key, tuning.default_config(tgt, key), str(tmp_path), repeats=5)
    assert res["runs"] == 5 and 0 < res["min"] <= res["median"] <= res["max"]


def test_measure_reports_a_wrong_kernel(tmp_path, monkeypatch):
    from qcompiler.tuning.errors import WrongResult

    tgt = get_target("cpu")
    key = _key(2)
    real_model = runtime.numpy_model
    monkeypatch.setattr(runtime, "numpy_model", lambda *a: real_model(*a) + 1.0)
    with pytest.raises(WrongResult):
        tuning.measure(tgt, key, tuning.default_config(tgt, key), str(tmp_path), repeats=2)


def test_tuning_log_replay(tmp_path):
    """cpu-schedule{tuning_log=...} takes the log's best config and says so in the config."""
    from qcompiler.passes.cpu_schedule import node_key
    from qcompiler.tuning import log
    from qcompiler.tuning.device import device_name

    tgt = get_target("cpu")
    module = qmm_module(256, 48, 4, 32, bias=False, batch=16)
    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    key = node_key(node, 16, "exact")
    tuned = {"m_block": 2, "order": "row", "k_unroll": 16, "col_vectors": 2}
    path = str(tmp_path / "log.jsonl")
    log.append(path, {"version": 1, "target": tgt.name, "device": device_name(tgt),
                      "op": "qmatmul", "key": key, "config": tuned,
                      "latency_us": {"median": 10.0, "min": 9.0, "max": 11.0, "runs": 3},
                      "status": "ok", "error": None, "time": "2026-11-25T12:00:00",
                      "qcompiler": qcompiler.__version__})
    out, packed = compile_to_dir(module, "cpu", str(tmp_path / "o"),
                                 passes=pipeline(tuning_log=path))
    cfg = next(n for n in packed.main.nodes if n.op == "qmatmul").attrs["config"]
    assert cfg["source"] == "tuning-log"
    assert {k: cfg["variants"]["v0"][k] for k in tuned} == tuned
    x = rand_x(16, 256)
    assert_close_fp32(qcompiler.load(out).run({"x": x})["y"],
                      reference_run(module, {"x": x})["y"], 256)


# --------------------------------------------------------------------------------------------
# the CI log's header (tests/conftest.py)
# --------------------------------------------------------------------------------------------


def test_report_header_says_which_isa_paths_run(monkeypatch):
    from conftest import pytest_report_header

    monkeypatch.delenv(host.HOST_ISA_ENV, raising=False)
    text = "\n".join(pytest_report_header(None))
    assert "QC_HOST_ISA: unset" in text and f"-mcpu={host.host_cpu()['mcpu']}" in text
    assert ("int8 VNNI path: runs" in text) == host.target_cpu(get_target("cpu"))["vnni"]
    if not host._AVX2 <= host.read_cpuinfo()[1]:
        return
    monkeypatch.setenv(host.HOST_ISA_ENV, "avx2")
    text = "\n".join(pytest_report_header(None))
    assert "QC_HOST_ISA=avx2 in force" in text and "-avx512f" in text
    assert "256-bit vectors; int8 VNNI path: skipped" in text


def test_artifact_built_for_avx512_refuses_to_run_on_an_avx2_host(tmp_path, monkeypatch):
    """Code for an AVX-512 -mcpu would die with an illegal instruction on an AVX2-only host:
    the artifact still loads (lazily), and run() says why instead, before any dlopen."""
    from qcompiler.codegen.cpu.host import missing_features, target_cpu
    from qcompiler.errors import DeviceUnavailableError

    mcpu = target_cpu(get_target("cpu-x86-avx512"))["mcpu"]
    if missing_features(mcpu):
        pytest.skip(f"this host cannot run -mcpu={mcpu} code, so it cannot build the artifact")
    out = str(tmp_path / "avx512")
    qcompiler.compile_to_dir(MLP, "cpu-x86-avx512", out)
    monkeypatch.setenv("QC_HOST_ISA", "avx2")
    assert "avx512f" in missing_features(mcpu)
    m = qcompiler.load(out)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(DeviceUnavailableError, match=f"-mcpu={mcpu}.*avx512f"):
        m.run({"x": x})
    monkeypatch.delenv("QC_HOST_ISA")
    assert np.isfinite(qcompiler.load(out).run({"x": x})["y"]).all()
