"""CUDA backend without a GPU: the passes' IR, golden generated sources, nvcc builds of every
golden for sm_80 and sm_90, artifacts, heuristics and the tuning-log path."""
import concurrent.futures
import json
import os
import subprocess

import pytest

from conftest import check_golden
from cuda_gpu_util import gpu_reason
from qcompiler.codegen.cuda import backend, build as nv, tuning
from qcompiler.codegen.cuda import bench_support as bs
from qcompiler.codegen.cuda import cases
from qcompiler.codegen.cuda.epilogue import epilogue_in_kernel
from qcompiler.ir import parse_module, print_module, tensor
from qcompiler.ir.core import Value
from qcompiler.pipeline import PassError, PassManager
from qcompiler.targets import get_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "cuda")

# One canonical kernel per unpack strategy (and act-order, per-channel, bias, odd shapes).
GOLDEN_CASES = {
    "u4_g128_zp_f16": cases.Case(k=4096, n=4096, bits=4, zero_point=True, group=128),
    "i4_g32_actorder_bf16": cases.Case(k=1024, n=320, bits=4, signed=True, zero_point=False,
                                       group=32, act_order=True, dtype="bf16"),
    "i8_perchannel_bias_f16": cases.Case(k=11008, n=37, bits=8, signed=True, zero_point=False,
                                         group=0, bias=True),
    "u8_g64_zp_bf16": cases.Case(k=200, n=130, bits=8, zero_point=True, group=64,
                                 dtype="bf16"),
    "f8e4m3_perchannel_bias_f16": cases.Case(k=1024, n=320, fp8=True, group=0, bias=True),
}


# Goldens whose M > 64 buckets are set to the wgmma kernel (the heuristic takes it only on
# layers too large to pack in a unit test).
WGMMA_GOLDEN = {"u4_g128_zp_f16_wgmma": "u4_g128_zp_f16"}


# A qmatmul whose epilogue the kernel applies as it stores y (fuse-epilogue's residual add
# after SiLU; the extra operand has y's shape): the body, the extras' types and the call.
EPILOGUE_GOLDEN = {"i4_g128_silu_residual_f16": (
    cases.Case(k=512, n=256, bits=4, signed=True, zero_point=False, group=128),
    "t0 = silu(x0); t1 = add(t0, x1); return t1")}


# A qmatmul over interleaved gate/up weights whose epilogue pairs columns (fuse-gate-up's
# SwiGLU): column j of y from product columns 2j and 2j + 1, in the tile and the fix-up.
PAIRS_GOLDEN = {"i4_g128_swiglu_pairs_f16": (
    cases.Case(k=512, n=512, bits=4, signed=True, zero_point=False, group=128),
    "t0 = silu(x0); t1 = mul(t0, x1); return t1")}


# A qmatmul that RMS-normalizes its x first (fuse-norm-qmatmul's x_norm): its swiglu pairs
# as a gate/up projection has them, the GEMV's shared-memory rows and the workspace copy.
NORM_GOLDEN = {
    "i4_g128_rmsnorm_swiglu_pairs_f16": (
        cases.Case(k=2048, n=512, bits=4, signed=True, zero_point=False, group=128),
        "t0 = silu(x0); t1 = mul(t0, x1); return t1", "rms"),
    # a GPT-2 ln_1 before c_attn: LayerNorm with a bias, the product's own bias
    "u4_g128_zp_layernorm_bias_f16": (
        cases.Case(k=768, n=2304, bits=4, zero_point=True, group=128, bias=True), None, "layer")}


# Goldens whose buckets of 128 rows and more take the 8-bit-activation kernel (tiled_i8.cuh),
# as tile{int8_min_m=128} gives a qmatmul with accuracy_level 4: 4-bit group scales with zero
# points, and 8-bit per-channel scales (one x scale a row); and FP8 e4m3 activations.
INT8_GOLDEN = {
    "u4_g128_zp_f16_int8": cases.Case(k=4096, n=4096, bits=4, zero_point=True, group=128,
                                      accuracy_level=4),
    "i8_perchannel_bias_f16_int8": cases.Case(k=11008, n=37, bits=8, signed=True,
                                              zero_point=False, group=0, bias=True,
                                              accuracy_level=4),
    # FP8 e4m3 activations on FP8 e4m3 weights (tile{fp8_min_m=128} on cuda-sm90)
    "f8e4m3_perchannel_bias_f16_fp8": cases.Case(k=1024, n=320, fp8=True, group=0, bias=True)}


# Goldens whose buckets of 128 rows and more take the sm_90a wgmma kernel with 8-bit
# activations (wgmma_act8.cuh): int8 with group scales folded every stage, and FP8 e4m3.
WGMMA_ACT8 = {"wgmma": 2, "gemv": 0, "m_frags": 8, "warps_n": 2, "warps_k": 2, "stages": 4,
              "stage_k": 128, "acc_scale": 0, "split_k": 1}
WGMMA_ACT8_GOLDEN = {
    "u4_g128_zp_f16_wgmma_int8": ("u4_g128_zp_f16_int8", {**WGMMA_ACT8, "int8": 1}),
    # FP8: each stage's fp32 sums promoted into fp32 ones (as the int8 group fold)
    "f8e4m3_perchannel_bias_f16_wgmma_fp8": ("f8e4m3_perchannel_bias_f16_fp8",
                                             {**WGMMA_ACT8, "fp8": 1}),
    # 4-bit per-channel codes: the sums to the end, with each stage's A fragments computed
    # while the previous stage's wgmmas are in flight (the case ptxas once gave the same
    # registers: test_wgmma_kernels_keep_their_a_registers)
    "u4_perchannel_zp_bias_bf16_wgmma_int8": ("u4_perchannel_zp_bias_bf16_int8",
                                              {**WGMMA_ACT8, "m_frags": 16, "int8": 1})}
WGMMA_ACT8_CASES = {"u4_perchannel_zp_bias_bf16_int8": cases.Case(
    k=1024, n=456, bits=4, zero_point=True, group=0, dtype="bf16", bias=True, accuracy_level=4)}


def _source(case, wgmma=False, epilogue=None, pairs=False, int8=False, x_norm=None,
            act8_wgmma=None):
    _, packed, node = bs.pack_case(case)
    if x_norm:  # "rms": the scale operand; "layer": the scale and the bias
        per_k = tensor([case.k], case.dtype)
        node.operands += [None] * (8 - len(node.operands)) + [Value("norm_w", per_k)] + (
            [Value("norm_b", per_k)] if x_norm == "layer" else [])
        node.attrs.update(x_norm=x_norm, x_norm_epsilon=1e-5)
    if int8:  # the int8 kernel, or for FP8 weights the FP8-activation kernel
        from qcompiler.tuning.key import kernel_key

        knob = "fp8" if case.fp8 else "int8"
        for v in node.attrs["config"]["variants"].values():
            if v["m_max"] >= 128:
                cfg = tuning.act8_tiled_default(get_target("cuda-sm90"),
                                                kernel_key(node, v["m_max"]), knob)
                v.update({k: int(cfg[k]) for k in tuning.KNOBS}, wgmma=0, int8=int(not case.fp8),
                         fp8=int(case.fp8))
    if act8_wgmma:  # the buckets of 128 rows and more: this wgmma_act8.cuh config
        for v in node.attrs["config"]["variants"].values():
            if v["m_max"] >= 128:
                v.update({"int8": 0, "fp8": 0, **act8_wgmma})
    if epilogue and pairs:
        node.attrs["epilogue"] = epilogue
        node.attrs["epilogue_pairs"] = 1
        assert epilogue_in_kernel(node)
    elif epilogue:
        node.operands.append(Value("residual", node.result.type))
        node.attrs["epilogue"] = epilogue
        assert epilogue_in_kernel(node)
    if wgmma:  # both mappings: token split up to 128 rows, block split above
        for v in node.attrs["config"]["variants"].values():
            if v["m_max"] > 64:
                v.update(WGMMA if v["m_max"] <= 128 else WGMMA_BLOCKS)
    elif not act8_wgmma:
        # The plain goldens keep mma.sync kernels in every bucket (the cuda-sm80 heuristic's
        # config where cuda-sm90 takes the sm_90a-only wgmma kernel: its prefill bucket), so
        # that they compile for sm_80 and sm_90; the wgmma golden covers the sm_90a path.
        from qcompiler.tuning.key import kernel_key

        for v in node.attrs["config"]["variants"].values():
            if v.get("wgmma"):
                cfg = tuning.default_config(get_target("cuda-sm80"), kernel_key(node, v["m_max"]))
                v.update({k: int(cfg[k]) for k in tuning.KNOBS}, wgmma=0)
    return backend.render(backend.kernel_params(node, "cuda-sm90"))


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_sources(name, update_goldens):
    check_golden(os.path.join(GOLDEN, f"{name}.cu"), _source(GOLDEN_CASES[name]), update_goldens)


@pytest.mark.parametrize("name", sorted(WGMMA_GOLDEN))
def test_golden_wgmma_sources(name, update_goldens):
    check_golden(os.path.join(GOLDEN, f"{name}.cu"),
                 _source(GOLDEN_CASES[WGMMA_GOLDEN[name]], wgmma=True), update_goldens)


@pytest.mark.parametrize("name", sorted(INT8_GOLDEN))
def test_golden_int8_sources(name, update_goldens):
    text = _source(INT8_GOLDEN[name], int8=True)
    assert '#include "qcompiler/tiled_i8.cuh"' in text and "qc::launch_tiled_i8<Config" in text
    check_golden(os.path.join(GOLDEN, f"{name}.cu"), text, update_goldens)


@pytest.mark.parametrize("name", sorted(WGMMA_ACT8_GOLDEN))
def test_golden_wgmma_act8_sources(name, update_goldens):
    base, config = WGMMA_ACT8_GOLDEN[name]
    case = INT8_GOLDEN.get(base) or WGMMA_ACT8_CASES[base]
    text = _source(case, act8_wgmma=config)
    fp8 = "true" if config.get("fp8") else "false"
    assert '#include "qcompiler/wgmma_act8.cuh"' in text
    assert f"qc::launch_wgmma_act8<Config, {16 * config['m_frags']}, 1, 2, 4, {fp8}>" in text
    check_golden(os.path.join(GOLDEN, f"{name}.cu"), text, update_goldens)


@pytest.mark.parametrize("name", sorted(EPILOGUE_GOLDEN))
def test_golden_epilogue_sources(name, update_goldens):
    case, body = EPILOGUE_GOLDEN[name]
    text = _source(case, epilogue=body)
    assert "static constexpr bool FUSED = true;" in text
    assert "epilogue_body(v, static_cast<const __half*>(extras[0])[i])" in text
    check_golden(os.path.join(GOLDEN, f"{name}.cu"), text, update_goldens)


@pytest.mark.parametrize("name", sorted(NORM_GOLDEN))
def test_golden_x_norm_sources(name, update_goldens):
    case, body, kind = NORM_GOLDEN[name]
    text = _source(case, epilogue=body, pairs=body is not None, x_norm=kind)
    want = {"rms": ("X_NORM_RMS", "rmsnorm(x, norm_w)"),
            "layer": ("X_NORM_LAYER", "layernorm(x, norm_w, norm_b)")}[kind]
    assert f"static constexpr int X_NORM = qc::{want[0]};" in text
    assert "X_NORM_EPS = 1e-05f;" in text and f"y[M, N] = {want[1]}[M, K]" in text
    check_golden(os.path.join(GOLDEN, f"{name}.cu"), text, update_goldens)


@pytest.mark.parametrize("name", sorted(PAIRS_GOLDEN))
def test_golden_paired_epilogue_sources(name, update_goldens):
    case, body = PAIRS_GOLDEN[name]
    text = _source(case, epilogue=body, pairs=True)
    assert "static constexpr bool PAIRS = true;" in text and "EXTRAS = 0;" in text
    assert "return epilogue_body(a, b);" in text
    check_golden(os.path.join(GOLDEN, f"{name}.cu"), text, update_goldens)


def test_epilogue_with_a_broadcast_operand_stays_a_kernel_of_its_own():
    """An extra operand that is not y's shape (a [N] row) is not read per element of y: the
    kernel is rendered without the epilogue, and the plan launches it separately."""
    _, packed, node = bs.pack_case(EPILOGUE_GOLDEN["i4_g128_silu_residual_f16"][0])
    row = Value("row", tensor([node.result.type.shape[-1]], node.result.type.dtype.name))
    node.operands.append(row)
    node.attrs["epilogue"] = "t0 = mul(x0, x1); return t0"
    assert not epilogue_in_kernel(node)
    assert "static constexpr bool FUSED = false;" in backend.render(
        backend.kernel_params(node, "cuda-sm90"))


def test_sources_are_deterministic():
    case = GOLDEN_CASES["u4_g128_zp_f16"]
    assert _source(case) == _source(case)


@pytest.mark.slow
@pytest.mark.skipif(nv.find_nvcc() is None, reason="nvcc not found")
def test_every_golden_compiles_for_sm80_and_sm90(tmp_path):
    """nvcc builds each golden kernel for sm_80 and sm_90 (2 jobs at a time, nothing cached)."""
    jobs = []
    for name in sorted(GOLDEN_CASES) + sorted(EPILOGUE_GOLDEN) + sorted(PAIRS_GOLDEN) \
            + sorted(INT8_GOLDEN) + sorted(NORM_GOLDEN):
        src = os.path.join(GOLDEN, f"{name}.cu")
        jobs.append((src, str(tmp_path / f"{name}.so"), ["sm_80", "sm_90"]))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda j: nv.build(*j), jobs))
    assert all(os.path.getsize(o) > 0 for o in outs)


def test_sources_are_thin_and_include_the_headers():
    """The generated source sets the decided constants and instantiates the kernels; the
    device code itself is in the headers (one of each kind a source names exists)."""
    text = _source(GOLDEN_CASES["u4_g128_zp_f16"])
    assert len(text.splitlines()) < 150 and "__global__" not in text
    included = [line.split('"')[1] for line in text.splitlines() if line.startswith("#include \"")]
    assert set(included) <= set(nv.kernel_headers()) and "qcompiler/gemv.cuh" in included
    assert "using Unpack = qc::UnpackLop3MagicF16<scalar_t, HAS_ZP, ZLO2, ZHI2>;" in text
    assert "qc::launch_gemv<Config, 1, 1, 16, 4, true>" in text  # (acc_scale: one group a warp)


@pytest.mark.slow
@pytest.mark.skipif(nv.find_nvcc() is None, reason="nvcc not found")
def test_each_header_compiles_on_its_own(tmp_path):
    """Every header is self-contained: nvcc compiles it alone (as a .cu, nothing before it)
    for sm_80 and sm_90."""
    import subprocess

    def compile_alone(rel):
        out = str(tmp_path / (rel.replace("/", "_") + ".o"))
        cmd = nv.nvcc_command(nv.kernel_headers()[rel], out, ["sm_80", "sm_90"],
                              compile_only=True)
        cmd.insert(cmd.index(nv.kernel_headers()[rel]), "-x")
        cmd.insert(cmd.index(nv.kernel_headers()[rel]), "cu")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return rel, proc.returncode, proc.stderr

    headers = sorted(nv.kernel_headers())
    assert {"qcompiler/unpack.cuh", "qcompiler/mma.cuh", "qcompiler/pipeline.cuh",
            "qcompiler/tiled.cuh", "qcompiler/gemv.cuh", "qcompiler/splitk.cuh"} <= set(headers)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for rel, rc, err in pool.map(compile_alone, headers):
            assert rc == 0, f"{rel}:\n{err}"
            assert "warning" not in err, f"{rel}:\n{err}"


def test_kernel_key_covers_the_headers(tmp_path, monkeypatch):
    """A change of any header changes every qmatmul kernel's key (the build cache never hands
    out a library built against other headers)."""
    module = cases.make_module(cases.Case(k=256, n=96, bits=4, zero_point=True, group=64))
    packed = PassManager.parse(TILE_SPEC).run(module)
    monkeypatch.setattr(nv, "find_nvcc", lambda: None)  # sources only, nothing built

    def keys(out):
        records = backend.CudaBackend().compile(packed, get_target("cuda-sm90"), str(out))
        return [r["kernel_key"] for r in records]

    before = keys(tmp_path / "a")
    assert before == keys(tmp_path / "b")
    monkeypatch.setattr(nv, "headers_digest", lambda: "0" * 64)
    assert set(keys(tmp_path / "c")).isdisjoint(before)
    # The artifact ships exactly the headers (kernels/include/qcompiler/*.cuh).
    shipped = {os.path.relpath(os.path.join(root, f), str(tmp_path / "a" / "kernels" / "include"))
               for root, _, files in os.walk(tmp_path / "a" / "kernels" / "include")
               for f in files}
    assert shipped == set(nv.kernel_headers())


def test_pipeline_ir_shows_the_layout_and_reparses():
    case = cases.Case(k=256, n=96, bits=4, zero_point=True, group=64, act_order=True, bias=True)
    _, packed, node = bs.pack_case(case)
    text = print_module(packed)
    assert "#layout<cuda_mma_b16, act_order=1, code_bias=0, codes=u4, container_bits=4" in text
    assert "#layout<group_permuted, rows=4>" in text and "#layout<act_order_perm>" in text
    assert 'unpack = "lop3-magic-f16"' in text and 'source = "heuristic"' in text
    assert print_module(parse_module(text, packed.constants)) == text


@pytest.mark.parametrize("bits,signed,dtype,want", [
    (4, False, "f16", "lop3-magic-f16"), (4, True, "bf16", "shift-magic-bf16"),
    (8, True, "f16", "prmt-f16"), (8, False, "bf16", "shift-mask-f32"),
    (2, False, "bf16", "shift-magic-bf16"), (3, True, "f16", "lop3-magic-f16")])
def test_schedule_unpack_choice(bits, signed, dtype, want):
    case = cases.Case(k=128, n=64, bits=bits, signed=signed, zero_point=not signed, group=64,
                      dtype=dtype)
    _, _, node = bs.pack_case(case)
    cfg = node.attrs["config"]
    assert cfg["unpack"] == want and cfg["scale_at"] == "registers"
    assert cfg["zero_at"] == ("constant" if signed else "registers")


def test_schedule_unpack_refuses_a_forced_strategy_that_does_not_fit():
    module = cases.make_module(cases.Case(k=128, n=64, bits=8, group=64))
    with pytest.raises(PassError, match="lop3-magic-f16 does not fit"):
        PassManager.parse("reorder-weights,schedule-unpack{unpack=lop3-magic-f16}").run(module)


@pytest.mark.parametrize("n,k", [(4096, 4096), (28672, 8192), (8192, 28672), (37, 11008),
                                 (1536, 384), (384, 1536), (384, 384),
                                 (130, 200), (64, 64)])
@pytest.mark.parametrize("target", ["cuda-sm80", "cuda-sm90"])
def test_default_configs_are_valid(n, k, target):
    tgt = get_target(target)
    for m in (1, 8, 9, 16, 32, 64, 128, 512):
        key = {"m": m, "k": k, "n": n, "x_dtype": "f16",
               "w_scheme": "#quant<u4, affine, per_group(axis=0, block=128), scale=f16, zp=u4>"}
        cfg = tuning.default_config(tgt, key)
        assert tuning.check_config(tgt, key, cfg) is None, (m, cfg)
        assert all(cfg[k_] in tuning.search_space(tgt, key)[k_] for k_ in tuning.KNOBS)


def test_check_config_reasons():
    tgt = get_target("cuda-sm90")
    key = {"m": 16, "k": 4096, "n": 4096, "w_scheme": "#quant<u4, symmetric, per_group("
           "axis=0, block=32), scale=f16>"}
    good = {"gemv": 0, "m_frags": 1, "warps_n": 4, "warps_k": 2, "stages": 4, "stage_k": 128,
            "acc_scale": 1, "split_k": 8}
    assert tuning.check_config(tgt, key, good) is None
    assert "warps_n=3" in tuning.check_config(tgt, key, {**good, "warps_n": 3})
    assert "split_k" in tuning.check_config(tgt, key, {**good, "split_k": 65})
    assert "acc_scale needs" in tuning.check_config(tgt, key, {**good, "m_frags": 2})
    assert "shared memory" in tuning.check_config(tgt, key, {**good, "stages": 8, "acc_scale": 0,
                                                             "m_frags": 4, "warps_n": 8})
    assert "lacks ['gemv']" in tuning.check_config(
        tgt, key, {k: v for k, v in good.items() if k != "gemv"})
    gemv = {**good, "gemv": 1, "stage_k": 64, "acc_scale": 0, "warps_k": 8, "warps_n": 2}
    assert tuning.check_config(tgt, key, gemv) is None
    assert "does not use stage_k" in tuning.check_config(tgt, key, {**gemv, "stage_k": 128})
    assert "m_frags 1 or 2" in tuning.check_config(tgt, key, {**gemv, "m_frags": 4})
    assert "registers" in tuning.check_config(tgt, key, {**gemv, "stages": 8, "m_frags": 2})
    assert "warps_k=8" in tuning.check_config(tgt, key, {**good, "warps_k": 8})
    assert tuning.check_config(tgt, key, {**gemv, "warps_k": 16, "warps_n": 1}) is None


TILE_SPEC = "reorder-weights,schedule-unpack,tile{target=cuda-sm90}"


def _tile_with_log(tmp_path, config_m16: dict) -> dict:
    """Run the CUDA pipeline with a tuning log holding ``config_m16`` for the M <= 16 bucket;
    returns the node's variants."""
    from qcompiler.tuning import log as tlog
    from qcompiler.tuning.device import device_name
    from qcompiler.tuning.key import kernel_key

    module = cases.make_module(cases.Case(k=1024, n=512, bits=4, zero_point=True, group=128))
    node = next(n for n in PassManager.parse(TILE_SPEC).run(module).main.nodes
                if n.op == "qmatmul")
    tgt = get_target("cuda-sm90")
    log = str(tmp_path / "log.jsonl")
    tlog.append(log, tlog.make_record(tgt.name, device_name(tgt), kernel_key(node, 16),
                                      config_m16, {"median": 5.0, "min": 4.0, "max": 6.0,
                                                   "runs": 10}, "ok"))
    out = PassManager.parse(TILE_SPEC.replace("}", f",tuning_log={log}}}")).run(module)
    return next(n for n in out.main.nodes if n.op == "qmatmul").attrs["config"]["variants"]


def test_tile_reads_the_tuning_log(tmp_path):
    chosen = {"gemv": 0, "m_frags": 1, "warps_n": 2, "warps_k": 4, "stages": 6, "stage_k": 64,
              "acc_scale": 1, "split_k": 3}
    variants = _tile_with_log(tmp_path, chosen)
    assert variants["m16"]["source"] == "tuning-log"
    assert {k: variants["m16"][k] for k in tuning.KNOBS} == chosen
    assert variants["m32"]["source"] == "heuristic"


def test_tile_falls_back_on_a_log_from_before_a_knob(tmp_path):
    """A record tuned before the gemv knob existed is stale: a warning, then the heuristic."""
    old = {"m_frags": 1, "warps_n": 2, "warps_k": 4, "stages": 6, "stage_k": 64,
           "acc_scale": 1, "split_k": 3}
    with pytest.warns(UserWarning, match=r"predates the knobs \['gemv'\]"):
        variants = _tile_with_log(tmp_path, old)
    assert variants["m16"]["source"] == "heuristic" and variants["m16"]["gemv"] == 1


def test_tile_options_for_the_wgmma_kernels():
    """tile{wgmma_stages=N} deepens the wgmma kernels' ring where shared memory holds it;
    tile{wgmma_pdl=1} gives them programmatic dependent launch (a node config value the
    source renders on sm_90 and the validator holds to 0 or 1)."""
    from qcompiler.codegen.cuda.config import ConfigError, validate

    module = cases.make_module(cases.Case(k=2048, n=2048, bits=4, zero_point=False, group=128))

    def tiled(options):
        spec = TILE_SPEC.replace("}", options + "}")
        return next(n for n in PassManager.parse(spec).run(module).main.nodes
                    if n.op == "qmatmul")

    plain, deep = tiled(""), tiled(",wgmma_stages=12")
    assert plain.attrs["config"]["variants"]["m512"]["stages"] == 6
    assert deep.attrs["config"]["variants"]["m512"]["stages"] == 11  # 12 do not fit
    assert "wgmma_pdl" not in plain.attrs["config"]
    assert "WGMMA_PDL = false" in backend.render(backend.kernel_params(plain, "cuda-sm90"))
    pdl = tiled(",wgmma_pdl=1")
    assert pdl.attrs["config"]["wgmma_pdl"] == 1
    assert "WGMMA_PDL = true" in backend.render(backend.kernel_params(pdl, "cuda-sm90"))
    with pytest.raises(ConfigError, match="wgmma_pdl=2"):
        validate({**pdl.attrs["config"], "wgmma_pdl": 2}, pdl)
    with pytest.raises(PassError, match="wgmma_stages=13"):
        tiled(",wgmma_stages=13")


def test_block_split_token_halves_validation():
    """Two consumer warpgroups may share one n64 block (each half of an M tile of 128 or 256)
    on the 16-bit wgmma kernel; not on an M tile of 64, nor on the 8-bit-activation one."""
    sm90 = get_target("cuda-sm90")
    key = {"m": 512, "k": 2048, "n": 2048,
           "w_scheme": str(GOLDEN_CASES["u4_g128_zp_f16"].scheme())}
    halves = {**WGMMA_BLOCKS, "m_frags": 8, "warps_n": 1, "warps_k": 2}
    assert tuning.check_config(sm90, key, halves) is None
    assert tuning.check_config(sm90, key, {**halves, "m_frags": 16}) is None
    assert "half an M tile" in tuning.check_config(sm90, key, {**halves, "m_frags": 4})
    act8 = {**key, "accuracy_level": 4, "act": "float"}
    assert "same number of n64 blocks" in tuning.check_config(
        sm90, act8, {**halves, "int8": 1, "stage_k": 128, "stages": 4})


def test_compile_writes_sources_and_libraries_without_a_gpu(tmp_path):
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.driver.artifact import file_sha256

    module = cases.make_module(cases.Case(k=256, n=96, bits=4, zero_point=True, group=64))
    out_dir, final = compile_to_dir(module, "cuda-sm90", str(tmp_path / "art"))
    kdir = os.path.join(out_dir, "kernels")
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    rec = manifest["kernels"][0]
    assert manifest["backend"] == "cuda" and rec["impl"] == "cuda"
    assert os.path.exists(os.path.join(kdir, rec["source"]))
    assert os.path.exists(os.path.join(kdir, "qc_runtime.cu"))
    # The headers the source includes travel with it and are covered by the manifest's sha256.
    for rel in nv.kernel_headers():
        assert manifest["files"]["kernels/include/" + rel] == file_sha256(
            os.path.join(kdir, "include", rel))
    assert rec["built"] == (nv.find_nvcc() is not None)
    if rec["built"]:
        assert os.path.exists(os.path.join(kdir, rec["library"]))
    if gpu_reason():
        import qcompiler
        from qcompiler.codegen.cuda.runtime import CudaRuntimeError

        # Without a GPU the artifact loads (lazily); running it says why it cannot run here.
        m = qcompiler.load(out_dir)
        with pytest.raises(CudaRuntimeError, match="no CUDA device|no built libraries"):
            m.run({})  # the device is looked for before the inputs


WGMMA = {"wgmma": 1, "gemv": 0, "m_frags": 8, "warps_n": 4, "warps_k": 2, "stages": 4,
         "stage_k": 64, "acc_scale": 0, "split_k": 2}
WGMMA_BLOCKS = {"wgmma": 2, "gemv": 0, "m_frags": 16, "warps_n": 2, "warps_k": 2, "stages": 4,
                "stage_k": 64, "acc_scale": 0, "split_k": 1}


def test_wgmma_selection_and_validation():
    """cuda-sm90 picks the wgmma kernel for 4-bit weights above M = 32 on layers whose N tiles
    fill the GPU; other targets and 8-bit codes never do; the validator holds its knobs to what it was written for."""
    sm90, sm80 = get_target("cuda-sm90"), get_target("cuda-sm80")
    key4 = {"m": 128, "k": 8192, "n": 28672,
            "w_scheme": str(GOLDEN_CASES["u4_g128_zp_f16"].scheme())}
    key8 = {**key4, "w_scheme": str(GOLDEN_CASES["u8_g64_zp_bf16"].scheme())}
    cfg = tuning.default_config(sm90, key4)
    assert cfg["wgmma"] == 1 and tuning.check_config(sm90, key4, cfg) is None
    assert tuning.default_config(sm80, key4)["wgmma"] == 0
    assert tuning.default_config(sm90, key8)["wgmma"] == 0
    assert tuning.default_config(sm90, {**key4, "m": 8})["gemv"] == 1
    assert tuning.default_config(sm90, {**key4, "n": 4096})["wgmma"] == 0
    assert tuning.check_config(sm90, key4, WGMMA) is None
    assert "needs a target with wgmma" in tuning.check_config(sm80, key4, WGMMA)
    assert "4-bit" in tuning.check_config(sm90, key8, WGMMA)
    assert "warps_n=2" in tuning.check_config(sm90, key4, {**WGMMA, "warps_n": 2})
    assert "consumer warpgroups" in tuning.check_config(sm90, key4, {**WGMMA, "m_frags": 4})
    # the wgmma ring goes deeper than the other kernels' (up to 12), where shared memory holds it
    assert "stages=13" in tuning.check_config(sm90, key4, {**WGMMA, "stages": 13})
    assert "shared memory" in tuning.check_config(sm90, key4, {**WGMMA, "stages": 12})
    narrow = {**WGMMA, "wgmma": 2, "m_frags": 8, "warps_n": 1, "warps_k": 1}
    assert tuning.check_config(sm90, key4, {**narrow, "stages": 11}) is None
    assert "shared memory" in tuning.check_config(sm90, key4, {**narrow, "stages": 12})
    prefill = {**key4, "m": 512, "n": 2048, "k": 2048}
    assert tuning.default_config(sm90, prefill)["stages"] == 6
    assert tuning.default_config(sm90, prefill, wgmma_stages=12)["stages"] == 11
    assert "not an int" in tuning.check_config(sm90, key4, {**WGMMA, "wgmma": True})
    assert "not in (0, 1, 2)" in tuning.check_config(sm90, key4, {**WGMMA, "wgmma": 3})
    # The block split (wgmma=2): M tiles of 64-256, the blocks shared evenly by the warpgroups,
    # at most 128 accumulators a thread (blocks per warpgroup x M tile <= 256), and the
    # shared memory its stages need (the validator's smem_bytes mirrors WgmmaTile).
    key512 = {**key4, "m": 512}
    assert tuning.check_config(sm90, key512, WGMMA_BLOCKS) is None
    assert "M tiles of 64, 128" in tuning.check_config(sm90, key512, {**WGMMA_BLOCKS, "m_frags": 12})
    assert "same number of n64 blocks" in tuning.check_config(
        sm90, key512, {**WGMMA_BLOCKS, "warps_n": 3})
    assert "128 accumulators" in tuning.check_config(sm90, key512, {**WGMMA_BLOCKS, "warps_n": 4})
    assert "shared memory" in tuning.check_config(sm90, key512, {**WGMMA_BLOCKS, "stages": 7})
    assert tuning.check_config(sm90, key512, {**WGMMA_BLOCKS, "stages": 6}) is None
    assert "needs a target with wgmma" in tuning.check_config(sm80, key512, WGMMA_BLOCKS)
    # A config from before the knob means the other kernels (wgmma=0).
    old = {k: v for k, v in tuning.default_config(sm90, {**key4, "m": 8}).items() if k != "wgmma"}
    assert tuning.check_config(sm90, {**key4, "m": 8}, old) is None


def test_prefill_bucket_configs():
    """Above 128 rows (the prefill buckets, keyed at 512 and 4096): the GEMV kernel where its
    re-reads of the weights stay small, else on cuda-sm90 the block-split wgmma kernel on
    every 4-bit shape, the tile with the least fitted time: M tiles
    of 128 on one warpgroup for 2048-wide layers at 512 rows, 256 x 128 tiles where the grid
    fills the GPU (5632-wide at 512 rows, every shape at 4096), never split-K; the tiled kernel
    never splits K there; every config the heuristic gives is one the validator accepts (a
    group the wgmma stages do not nest falls back to the tiled kernel)."""
    sm90, sm80 = get_target("cuda-sm90"), get_target("cuda-sm80")
    s4 = str(GOLDEN_CASES["u4_g128_zp_f16"].scheme())
    s8 = str(GOLDEN_CASES["u8_g64_zp_bf16"].scheme())

    def tile(m, n, k):
        c = tuning.default_config(sm90, {"m": m, "k": k, "n": n, "w_scheme": s4})
        return c["wgmma"], 16 * c["m_frags"], 64 * c["warps_n"], c["warps_k"], c["split_k"]
    assert tile(512, 5632, 2048) == (2, 256, 128, 2, 1)
    assert tile(512, 2048, 2048) == (2, 128, 64, 1, 1)
    assert tile(512, 2048, 5632) == (2, 128, 64, 1, 1)
    assert tile(4096, 2048, 2048) == (2, 256, 128, 2, 1)
    # Weights the GEMV kernel's 16-row tiles re-read in under GEMV_MAX_REREAD_BYTES (an
    # encoder's 384-wide layers): the GEMV kernel, whose loop has no barrier, at any M.
    for n, k in ((384, 384), (1536, 384), (384, 1536), (256, 2048)):
        assert tuning.default_config(sm90, {"m": 512, "k": k, "n": n, "w_scheme": s4})["gemv"]
    assert not tuning.default_config(sm90, {"m": 4096, "k": 384, "n": 1536, "w_scheme": s4})["gemv"]
    # The fitted times rank the tiles as measured (M = 512, 2048 x 2048: 15.7 us for M tiles of
    # 128 on one warpgroup, 19.1 with two, 28.9 for 256 x 128).
    est = [tuning.block_split_estimate_us(sm90, {"m": 512, "k": 2048, "n": 2048}, mt, b)
           for mt, b in ((128, 1), (128, 2), (256, 2))]
    assert est == sorted(est)
    for target in (sm90, sm80):
        for scheme in (s4, s8):
            for m in (512, 4096):
                for n, k in ((2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)):
                    key = {"m": m, "k": k, "n": n, "w_scheme": scheme}
                    cfg = tuning.default_config(target, key)
                    assert tuning.check_config(target, key, cfg) is None, (target.name, key, cfg)
                    if tuning.gemv_reread_bytes(key) < tuning.GEMV_MAX_REREAD_BYTES:
                        assert cfg["gemv"] == 1
                        continue
                    assert cfg["gemv"] == 0 and cfg["split_k"] == 1
                    assert cfg["wgmma"] == (2 if target is sm90 and scheme == s4 else 0)
    g48 = "#quant<i4, symmetric, per_group(axis=0, block=48), scale=f16>"
    assert "do not nest" in tuning.check_config(sm90, {"m": 512, "k": 1536, "n": 2048,
                                                       "w_scheme": g48}, {**WGMMA, "split_k": 1})
    assert tuning.default_config(sm90, {"m": 512, "k": 1536, "n": 2048,
                                        "w_scheme": g48})["wgmma"] == 0


def test_gemv_fill_splits_where_the_busiest_sm_gains():
    """tile{gemv_fill=1}: the GEMV heuristic also splits K where that lowers the share of the
    grid the busiest SM runs (a CTA of 16 warps fills an SM): the decode's qkv (40 N blocks)
    and o (32) GEMVs split, layers that already fill the GPU (a gate/up pair's 176 weight
    blocks among them) keep the default; every config passes the validator,
    and the tile pass writes it with the option."""
    sm90 = get_target("cuda-sm90")
    s4 = str(GOLDEN_CASES["u4_g128_zp_f16"].scheme())

    def split(n, k, fill):
        key = {"m": 1, "k": k, "n": n, "w_scheme": s4}
        cfg = tuning.default_config(sm90, key, gemv_fill=fill)
        assert cfg["gemv"] == 1 and tuning.check_config(sm90, key, cfg) is None, (n, k, cfg)
        return cfg["split_k"]
    assert (split(2560, 2048, False), split(2560, 2048, True)) == (1, 2)
    assert (split(2048, 2048, False), split(2048, 2048, True)) == (1, 4)
    for n, k in ((5632, 2048), (2048, 5632), (32000, 2048), (11264, 2048)):
        assert split(n, k, True) == split(n, k, False), (n, k)

    case = cases.Case(k=2048, n=2560, bits=4, signed=True, zero_point=False, group=128)
    _, packed, _ = bs.pack_case(case)
    for fill, want in ((0, 1), (1, 2)):
        out = PassManager.parse(f"tile{{target=cuda-sm90,gemv_fill={fill}}}").run(packed.clone())
        node = next(n for n in out.main.nodes if n.op == "qmatmul")
        assert node.attrs["config"]["variants"]["m8"]["split_k"] == want


def test_wgmma_source_and_archs():
    """A source with wgmma variants includes wgmma.cuh, instantiates launch_wgmma and is built
    for sm_90a alone; the others keep the target's arch."""
    _, _, node = bs.pack_case(GOLDEN_CASES["u4_g128_zp_f16"])
    for v in node.attrs["config"]["variants"].values():
        if v["m_max"] > 64:
            v.update(WGMMA if v["m_max"] <= 128 else WGMMA_BLOCKS)
    params = backend.kernel_params(node, "cuda-sm90")
    text = backend.render(params)
    assert '#include "qcompiler/wgmma.cuh"' in text
    assert "qc::launch_wgmma_token_split<Config, 2, 4>" in text
    assert "qc::launch_wgmma_block_split<Config, 256, 2, 2, 4>" in text
    assert backend.target_archs(get_target("cuda-sm90"), params) == ["sm_90a"]
    _, _, node8 = bs.pack_case(GOLDEN_CASES["u8_g64_zp_bf16"])
    params8 = backend.kernel_params(node8, "cuda-sm90")
    assert not params8["wgmma_instances"] and "wgmma" not in backend.render(params8)
    assert backend.target_archs(get_target("cuda-sm90"), params8) == ["sm_90"]


@pytest.mark.slow
@pytest.mark.skipif(nv.find_nvcc() is None, reason="nvcc not found")
def test_wgmma_golden_compiles_for_sm90a(tmp_path):
    """The goldens with the wgmma kernels (16-bit and 8-bit activations) build for sm_90a
    with no spills and no serialized wgmma (ptxas -v)."""
    import subprocess

    for name in ["u4_g128_zp_f16_wgmma"] + sorted(WGMMA_ACT8_GOLDEN):
        kernel = "qmatmul_wgmma_kernel"  # one kernel template, the mappings its parameter
        src = os.path.join(GOLDEN, f"{name}.cu")
        cmd = nv.nvcc_command(src, str(tmp_path / "k.o"), ["sm_90a"], compile_only=True)
        proc = subprocess.run(cmd[:1] + ["-Xptxas", "-v"] + cmd[1:], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
        report = proc.stderr
        assert "C7512" not in report and "C7508" not in report, report  # serialized / setmaxnreg
        wgmma_lines = [ln for ln in report.splitlines() if kernel in ln]
        assert wgmma_lines, name
        assert " 0 bytes spill stores" in report.split(wgmma_lines[-1], 1)[1].splitlines()[1], name


@pytest.mark.slow
@pytest.mark.skipif(nv.find_nvcc() is None, reason="nvcc not found")
def test_wgmma_kernels_keep_their_a_registers(tmp_path):
    """No instruction of a wgmma kernel writes a register that a wgmma still in flight reads
    as its A operand (codegen/cuda/sass_check.py over nvdisasm's SASS): ptxas does not
    guarantee it, and the first per-channel loop of wgmma_act8.cuh computed wrong sums on the
    GPU because the next stage's fragments landed on the in-flight group's registers. The
    goldens with the 16-bit and 8-bit-activation wgmma kernels and every tile of the latter,
    built for sm_90a."""
    from qcompiler.codegen.cuda import sass_check
    from qcompiler.tuning.key import kernel_key

    tool = sass_check.find_nvdisasm()
    if tool is None:
        pytest.skip("nvdisasm not found (the test extra installs nvidia-cuda-nvdisasm)")
    sources = {name: os.path.join(GOLDEN, f"{name}.cu")
               for name in ["u4_g128_zp_f16_wgmma"] + sorted(WGMMA_ACT8_GOLDEN)}
    # and every tile shape of the 8-bit-activation kernel (M 64/128/256, 1 or 2 warpgroups
    # of 1 or 2 blocks) on group scales, on 4-bit per-channel codes and on FP8
    sm90 = get_target("cuda-sm90")
    for label, case, knob in (
            ("g128", INT8_GOLDEN["u4_g128_zp_f16_int8"], "int8"),
            ("perchannel", WGMMA_ACT8_CASES["u4_perchannel_zp_bias_bf16_int8"], "int8"),
            ("fp8", INT8_GOLDEN["f8e4m3_perchannel_bias_f16_fp8"], "fp8")):
        _, _, node = bs.pack_case(case)
        key = kernel_key(node, 512)
        variants = [v for v in ({**WGMMA_ACT8, "m_frags": mf, "warps_n": wn, "warps_k": wk,
                                 knob: 1}
                                for mf, wn, wk in ((4, 2, 1), (4, 4, 2), (8, 1, 1), (8, 2, 2),
                                                   (16, 2, 2), (16, 1, 1)))
                    if tuning.check_config(sm90, key, v) is None]
        assert variants, label
        bs.set_variants(node, variants)
        sources[f"act8_{label}"] = str(tmp_path / f"act8_{label}.cu")
        with open(sources[f"act8_{label}"], "w") as f:
            f.write(backend.render(backend.kernel_params(node, "cuda-sm90")))
    for name, src in sources.items():
        cubin = str(tmp_path / f"{name}.cubin")
        cmd = nv.nvcc_command(src, cubin, ["sm_90a"], compile_only=True)
        # one sm_90a cubin: no PTX for the JIT (code=compute_*), -cubin instead of -c
        cmd = ["-cubin" if c == "-c" else c for c in cmd if "code=compute_" not in c]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        hazards = sass_check.check_cubin(cubin, tool)
        assert not hazards, f"{name}: " + "; ".join(
            f"{h.instruction} at {h.address:#x} writes R{h.register}" for h in hazards[:5])


def test_sass_check_finds_a_register_written_under_a_wgmma_in_flight():
    """The checker itself, on hand-written SASS: a loop whose top rewrites the A registers of
    the group its bottom left in flight, and the same loop with two register sets."""
    from qcompiler.codegen.cuda import sass_check

    def sass(a_top, a_bottom):
        return (".text.k:\n"
                ".L_x_0:\n"
                f"        /*0000*/                   LDS R{a_top}, [R3] ;\n"
                "        /*0010*/                   WARPGROUP.ARRIVE ;\n"
                f"        /*0020*/                   IGMMA.64x128x32.U8.S8 R24, R{a_top}, gdesc[UR12], R24, gsb0 ;\n"
                "        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n"
                f"        /*0040*/                   LDS R{a_bottom}, [R3+0x10] ;\n"
                f"        /*0050*/                   IGMMA.64x128x32.U8.S8 R24, R{a_bottom}, gdesc[UR12], R24, gsb0 ;\n"
                "        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;\n"
                "        /*0070*/               @P0 BRA `(.L_x_0) ;\n"
                "        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
                "        /*0090*/                   LDS R88, [R3] ;\n")
    same = sass_check.check_functions(sass(88, 88))
    assert [(h.address, h.register) for h in same] == [(0x40, 88), (0x0, 88)]
    assert sass_check.check_functions(sass(88, 100)) == []
    assert sass_check.check_functions(sass(88, 90))[0].register == 90  # R88..R91 in flight


def test_fp8_weights_from_onnx_and_their_refusals(tmp_path):
    """An ONNX DequantizeLinear of FP8 e4m3 weights (opset 21, per-channel) feeding a MatMul
    compiles for cuda-sm90 with the fp8-e4m3-f16 unpack and its scales x 2^8; bf16 compute
    is refused naming the node."""
    import ml_dtypes
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.driver.frontend import import_model

    k, n = 256, 96
    rng = np.random.default_rng(0)
    w = np.clip(rng.standard_normal((k, n)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    scale = (rng.uniform(0.5, 1.5, n) / (448 * 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=1),
         helper.make_node("MatMul", ["x", "wd"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [k, n], w.view(np.uint8).tobytes(),
                            raw=True), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    spec = get_target("cuda-sm90").default_pipeline
    out = PassManager.parse(spec).run(import_model(model))
    node = next(nd for nd in out.main.nodes if nd.op == "qmatmul")
    assert node.attrs["config"]["unpack"] == "fp8-e4m3-f16"
    assert node.arg("w").type.layout.get("codes") == "f8e4m3fn"
    from qcompiler.ir.core import constant_value

    packed_scales = constant_value(out, node.arg("w_scale"))
    assert np.allclose(packed_scales[:n].astype(np.float32), scale * 256, rtol=1e-3)
    with pytest.raises(PassError, match="FP8 e4m3 weights take f16 activations"):
        PassManager.parse(spec.replace("compute-dtype{dtype=f16}", "compute-dtype{dtype=bf16}")
                          ).run(import_model(model))


def test_a_library_of_an_older_calling_convention_is_refused(tmp_path):
    """A qmatmul library built before _run took norm_w (no _abi symbol) is refused by name
    before anything calls it; the generated source says its convention."""
    import shutil
    import subprocess

    from qcompiler.codegen.cuda.runtime import QMM_ABI, CudaRuntimeError, QmmKernel

    text = _source(GOLDEN_CASES["u4_g128_zp_f16"])
    assert f"int qc_qmm_y_abi() {{ return {QMM_ABI}; }}" in text
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "old.c"
    src.write_text("int qc_qmm_y_run(void) { return 0; }\n"
                   "int qc_qmm_y_variants(void) { return 1; }\n")
    lib = tmp_path / "old.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    with pytest.raises(CudaRuntimeError, match="calling convention 1.*compile the model again"):
        QmmKernel(None, str(lib), "qc_qmm_y", {}, 8, "float16")
