"""Configs, names and inputs from untrusted sources (issue #18): one validator per backend
whatever the config's source (pass, tuning log, .qir text), names sanitized before they
reach generated code and file names, hardened tuning logs, FPGA run-time input checks and
saturation reports, and no float32 overflow of huge scales on the CPU path."""
import json
import os
import re
import sys
import warnings

import numpy as np
import pytest

import qcompiler
from qcompiler.codegen.cpu import config as cpu_config
from qcompiler.codegen.cuda import backend as cuda_backend
from qcompiler.codegen.cuda import bench_support as bs
from qcompiler.codegen.cuda import cases
from qcompiler.codegen.cuda import config as cuda_config
from qcompiler.codegen.hls import config as hls_config
from qcompiler.errors import ConfigError, InputError
from qcompiler.ir import parse_module, print_module
from qcompiler.targets import get_target
from qcompiler.tuning import log as tlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INJECTED = 'extern "C" int injected(void) { return 42; }'


def _cuda_node():
    _, packed, node = bs.pack_case(cases.Case(k=256, n=128, bits=4, zero_point=True, group=64))
    return packed, node


def _reparse(module):
    return parse_module(print_module(module), module.constants)


def _qmm(module):
    return next(n for n in module.main.nodes if n.op == "qmatmul")


# ---- CUDA: .qir text ------------------------------------------------------------------------


def test_cuda_injection_through_qir_string_is_refused(tmp_path):
    packed, _ = _cuda_node()
    text = print_module(packed)
    evil = json.dumps("registers\n" + INJECTED + "\n//")
    assert 'zero_at = "registers"' in text
    module = parse_module(text.replace('zero_at = "registers"', f"zero_at = {evil}"),
                          packed.constants)
    assert INJECTED in _qmm(module).attrs["config"]["zero_at"]
    with pytest.raises(ConfigError, match=r"%y: config zero_at=.* is not one of registers"):
        cuda_backend.CudaBackend().compile(module, get_target("cuda-sm90"), str(tmp_path))
    for root, _, files in os.walk(tmp_path):
        for f in files:
            assert "injected" not in open(os.path.join(root, f), errors="replace").read()


@pytest.mark.parametrize("knob,value,match", [
    ("warps_n", "0", "warps_n=0"), ("split_k", "1000000", "split_k=1000000"),
    ("stages", "3.0", "stages=3.0 is not an int"), ("gemv", '"1"', "gemv='1' is not an int")])
def test_cuda_qir_knobs_are_validated(knob, value, match):
    packed, _ = _cuda_node()
    text = re.sub(rf"\b{knob} = [^,}}]+", f"{knob} = {value}", print_module(packed), count=1)
    module = parse_module(text, packed.constants)
    with pytest.raises(ConfigError, match=rf"%y variant .*{re.escape(match)}"):
        cuda_config.validate(_qmm(module).attrs["config"], _qmm(module), get_target("cuda-sm90"))


def test_cuda_valid_config_passes_and_is_typed():
    packed, node = _cuda_node()
    typed = cuda_config.validate(_qmm(_reparse(packed)).attrs["config"], node)
    assert typed.zero_at == "registers" and typed.variants[0].m_max == 8
    assert all(type(v.split_k) is int for v in typed.variants)


def test_cuda_names_are_sanitized_in_symbols_and_comments():
    _, node = _cuda_node()
    node.result.name = "y\n" + INJECTED + "\n// é"
    params = cuda_backend.kernel_params(node, "cuda-sm90")
    src = cuda_backend.render(params)
    assert re.fullmatch(r"qc_qmm_[A-Za-z0-9_]+", params["symbol"])
    assert not any(line.startswith("extern \"C\" int injected") for line in src.splitlines())
    assert src.isascii()
    # Stable and distinct: two names that sanitize alike get different symbols.
    node.result.name = "a.b"
    s1 = cuda_backend.kernel_symbol(node)
    node.result.name = "a_b"
    assert cuda_backend.kernel_symbol(node) == "qc_qmm_a_b" != s1
    node.result.name = "a.b"
    assert cuda_backend.kernel_symbol(node) == s1
    node.result.name = "x" * 500
    assert len(cuda_backend.kernel_symbol(node)) <= 64


def test_hls_top_name_is_an_identifier():
    from qcompiler.codegen.hls.backend import top_name
    from qcompiler.ir import Module

    assert top_name(Module("mlp")) == "qc_mlp"
    odd = top_name(Module("m; rm -rf /\né"))
    assert re.fullmatch(r"qc_[A-Za-z0-9_]+", odd) and odd != top_name(Module("m__rm__rf___"))


# ---- CPU ------------------------------------------------------------------------------------


def _cpu_module():
    pytest.importorskip("tvm")
    from qcompiler.driver.api import run_pipeline

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_cpu_backend import pipeline, qmm_module

    return run_pipeline(qmm_module(64, 32, 4, 32), pipeline())[0]


@pytest.mark.parametrize("value", [True, 1.0, "2", None, [2]])
def test_cpu_knob_types(value):
    pytest.importorskip("tvm")
    from qcompiler.codegen.cpu import tuning
    from qcompiler.passes.cpu_schedule import node_key

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_cpu_backend import qmm_module

    tgt = get_target("cpu")
    key = node_key(_qmm(qmm_module(64, 32, 4, 32)), 1, "exact")
    good = tuning.default_config(tgt, key)
    assert tuning.check_config(tgt, key, good) is None
    assert "m_block" in tuning.check_config(tgt, key, {**good, "m_block": value})


def test_cpu_compile_validates_qir_configs(tmp_path):
    module = _cpu_module()
    text = print_module(module)
    bad = parse_module(re.sub(r"m_block = \d+", "m_block = 1.0", text, count=1),
                       module.constants)
    from qcompiler.codegen.cpu.backend import CPUBackend

    with pytest.raises(ConfigError, match=r"%y variant v0: m_block=1.0"):
        CPUBackend().compile(bad, get_target("cpu"), str(tmp_path))
    assert cpu_config.validate(_qmm(module).attrs["config"], _qmm(module),
                               get_target("cpu")).impl == "tvm"


def test_cpu_huge_scales_do_not_overflow(tmp_path):
    """Scales near 1e38 (the ref target is finite): the compiled kernel equals the reference
    instead of becoming inf (the exact path's 2^cb factor overflowed float32)."""
    pytest.importorskip("tvm")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_cpu_backend import compile_module, qmm_module
    from qcompiler.runtime.reference import run as reference_run

    module = qmm_module(64, 32, 4, 32, zp=True, bias=False, batch=3, seed=7)
    rng = np.random.default_rng(7)
    scale_name = _qmm(module).arg("w_scale").producer.attrs["name"]
    zp_name = _qmm(module).arg("w_zero_point").producer.attrs["name"]
    code_name = _qmm(module).arg("w").producer.attrs["name"]
    module.constants[scale_name] = (rng.random(module.constants[scale_name].shape) * 0.9e38
                                    + 0.1e38).astype(np.float32)
    module.constants[zp_name] = np.full(module.constants[zp_name].shape, 8, np.uint8)
    module.constants[code_name] = rng.integers(6, 11, module.constants[code_name].shape) \
        .astype(np.uint8)  # |code - zp| <= 2: every weight (<= 2e38) is finite in float32
    x = (rng.standard_normal((3, 64)) * 1e-3).astype(np.float32)
    want = reference_run(module, {"x": x})["y"]
    assert np.isfinite(want).all() and np.abs(want).max() > 1e33
    compiled, _ = compile_module(module, tmp_path)
    got = compiled.run({"x": x})["y"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# ---- tuning logs ----------------------------------------------------------------------------


def _record(config, key=None):
    return tlog.make_record("cpu", "dev", key or {"op": "qmatmul", "m": 1}, config,
                            {"median": 1.0, "min": 1.0, "max": 1.0, "runs": 1}, "ok")


def test_tuning_log_skips_malformed_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    good = _record({"m_block": 1})
    lines = ["[" * 100000 + "]" * 100000, '{"a": ' * 5000 + "1" + "}" * 5000,
             json.dumps({**good, "config": {"m_block": {"deep": [1]}}}),
             json.dumps({**good, "config": {"m_block": [2]}}),
             json.dumps({**good, "version": True}), json.dumps({**good, "status": ["ok"]}),
             json.dumps({**good, "latency_us": {"median": True, "min": 1, "max": 1}}),
             "not json", json.dumps(good)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(tlog.CorruptLogLine) as caught:
        records = tlog.read(path)
    assert records == [good] and len(caught) == len(lines) - 1


def test_replay_of_a_missing_log_is_an_input_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match=f"tuning log {re.escape(str(missing))} does not exist"):
        tlog.Replay(missing)
    assert tlog.read(missing) == []  # the tuner's own reads: a new log starts empty


@pytest.mark.parametrize("value", [True, 1.0, "2", None])  # [2]: a corrupt line (above)
def test_replay_rejects_wrong_knob_types_with_a_warning(tmp_path, value):
    from qcompiler.codegen.cuda import tuning
    from qcompiler.tuning.device import device_name
    from qcompiler.tuning.key import kernel_key

    _, node = _cuda_node()
    tgt = get_target("cuda-sm90")
    key = kernel_key(node, 16)
    good = tuning.default_config(tgt, key)
    path = tmp_path / "log.jsonl"
    tlog.append(path, {**tlog.make_record(tgt.name, device_name(tgt), key,
                                          {**good, "split_k": 1},
                                          {"median": 9.0, "min": 9, "max": 9, "runs": 1}, "ok")})
    tlog.append(path, {**tlog.make_record(tgt.name, device_name(tgt), key,
                                          {**good, "warps_n": value},
                                          {"median": 1.0, "min": 1, "max": 1, "runs": 1}, "ok")})
    replay = tlog.Replay(path)
    with pytest.warns(tlog.RejectedConfig, match="warps_n"):
        chosen = replay.best_config(tgt.name, device_name(tgt), key,
                                    check=lambda c: tuning.check_config(tgt, key, c))
    assert chosen == {**good, "split_k": 1}  # the next best valid record


def test_fpga_tuning_check_refuses_bool_pe():
    from qcompiler.codegen.hls import tuning as hls_tuning

    key = {"op": "qmatmul", "m": 1, "k": 64, "n": 32,
           "w_scheme": "#quant<u4, affine, per_group(axis=0, block=32), scale=f32, zp=u4>",
           "act": "float", "x_dtype": "f32", "has_bias": False, "act_order": False}
    target = get_target("fpga-zcu104")
    assert hls_tuning.check_config(target, key, {"pe": 1, "simd": 1}) is None
    assert "pe=True" in hls_tuning.check_config(target, key, {"pe": True, "simd": 1})
    assert "simd=1.0" in hls_tuning.check_config(target, key, {"pe": 1, "simd": 1.0})


# ---- FPGA -----------------------------------------------------------------------------------


def _fpga_model():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from make_example_model import float_mlp

    return float_mlp(sizes=(32, 16, 8), seed=3, act="Relu")


FPGA_PASSES = ("canonicalize,quantize-weights{{bits=4,group=16,symmetric=false}},fuse-dequant,"
               "canonicalize,hls-fixed-point{{input_range=2{extra}}},"
               "hls-parallelism{{target=fpga-pynq-z2}}")


def test_fpga_config_validator_refuses_bool_and_bad_values():
    from qcompiler.driver.api import import_model, run_pipeline

    module = run_pipeline(import_model(_fpga_model()), FPGA_PASSES.format(extra=""))[0]
    node = _qmm(module)
    cfg = node.attrs["config"]
    assert hls_config.validate(cfg, node).pe == cfg["pe"]
    for knob, value, match in (("pe", True, "pe=True"), ("simd", 1.0, "simd=1.0"),
                               ("x_width", "12", "x_width='12'"), ("bits", 9, "bits=9"),
                               ("n", 7, "n=7")):
        with pytest.raises(ConfigError, match=rf"%\S+: .*{re.escape(match)}"):
            hls_config.validate({**cfg, knob: value}, node)


def test_fpga_runner_checks_inputs_and_reports_saturation(tmp_path):
    from qcompiler.codegen.hls.numerics import InputSaturated, saturated_count
    from qcompiler.driver.api import compile_to_dir

    out, _ = compile_to_dir(_fpga_model(), "fpga-pynq-z2", str(tmp_path / "a"),
                            FPGA_PASSES.format(extra=""))
    m = qcompiler.load(out)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    for bad, match in ((np.where(np.arange(32) == 5, np.nan, x), "3 NaN"),
                       (np.where(np.arange(32) == 5, np.inf, x), "3 infinite"),
                       (x.astype(np.int32), "dtype int32"), (x[None], "rank 3"),
                       (np.float32(1.0), "rank 0"), (x[:0], "at least 1"),
                       (x[:, :31], "dimension 1 must be 32")):
        with pytest.raises(InputError, match=rf"input 'x': .*{match}"):
            m.run({"x": bad})
    with pytest.raises(InputError, match="one input 'x'"):
        m.run({"y": x})
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputSaturated)
        m.run({"x": x * 0.5})  # within [-2, 2): no warning
    assert m.module.last_run_stats == {"saturated": {"x": 0}}
    big = x * 4
    cfg = _qmm(m.module).attrs["config"]
    want = saturated_count(big, cfg["x_width"], cfg["x_int"])
    assert want > 0
    with pytest.warns(InputSaturated, match=f"{want} of 96 values"):
        m.run({"x": big})
    assert m.module.last_run_stats == {"saturated": {"x": want}}


def test_fpga_input_range_from_calibration(tmp_path):
    from qcompiler.driver.api import import_model, run_pipeline

    samples = np.random.default_rng(2).standard_normal((16, 32)) * 20  # |x| up to ~60
    path = tmp_path / "calib.npz"
    np.savez(path, x=samples)
    module = run_pipeline(import_model(_fpga_model()),
                          FPGA_PASSES.format(extra=f",calibration={path}"))[0]
    cfg = _qmm(module).attrs["config"]
    bound = float(np.abs(samples).max())
    assert 2.0 ** (cfg["x_int"] - 1) > bound >= 2.0 ** (cfg["x_int"] - 2)
    np.savez(path, x=np.array([1.0, np.nan]))
    with pytest.raises(InputError, match="NaN"):
        run_pipeline(import_model(_fpga_model()), FPGA_PASSES.format(extra=f",calibration={path}"))
    with pytest.raises(InputError, match="does not exist"):
        run_pipeline(import_model(_fpga_model()),
                     FPGA_PASSES.format(extra=f",calibration={tmp_path / 'none.npz'}"))
