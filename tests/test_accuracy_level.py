"""MatMulNBits ``accuracy_level``: kept by the ONNX frontend, honored by the cpu backend.

onnxruntime computes a MatMulNBits node of accuracy_level 4 with int8 activations (quantized
per row and block); at 0 (or 1) in fp32. The frontend keeps levels above 1 as the
``accuracy_level`` attribute of the matmul (and of the qmatmul fuse-dequant makes of it);
``cpu-schedule{numerics=auto}`` (the default) gives level-4 qmatmuls the ``int8`` numerics
where the target has an int8 kernel, ``exact`` otherwise; an explicit ``numerics`` wins.
``ref`` computes in float whatever the level.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")

import onnx_models as om  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.driver.api import compile_to_dir  # noqa: E402
from qcompiler.driver.frontend import import_model, run_pipeline  # noqa: E402
from qcompiler.ir import parse_module, print_module, verify  # noqa: E402

PRE = "canonicalize,fuse-dequant,canonicalize"


def _mnb(acc: int, symmetric: bool = True):
    om._quiet()
    return om._examples_module().quantize_matmul_nbits(
        om.float_mlp(), bits=4, block_size=32, symmetric=symmetric, accuracy_level=acc)


def _levels(module, op):
    return [n.attrs.get("accuracy_level") for n in module.main.nodes if n.op == op]


@pytest.mark.parametrize("acc, want", [(0, None), (4, 4)])
def test_frontend_keeps_the_level(acc, want):
    module = import_model(_mnb(acc))
    assert _levels(module, "matmul") == [want] * om.N_LAYERS
    fused, _, _ = run_pipeline(module, PRE)
    assert _levels(fused, "qmatmul") == [want] * om.N_LAYERS
    # the attribute survives the text form
    again = parse_module(print_module(fused))
    verify(again)
    assert _levels(again, "qmatmul") == [want] * om.N_LAYERS


def _numerics(module, pipeline):
    out, _, _ = run_pipeline(module, pipeline)
    return {n.attrs["config"]["numerics"] for n in out.main.nodes if n.op == "qmatmul"}


def test_cpu_schedule_auto_follows_the_level():
    from qcompiler.codegen.cpu.host import host_cpu

    if host_cpu().get("arch", "x86_64") != "x86_64":
        pytest.skip("the int8 kernels are x86")
    acc4, _, _ = run_pipeline(import_model(_mnb(4)), PRE)
    acc0, _, _ = run_pipeline(import_model(_mnb(0)), PRE)
    assert _numerics(acc4, "cpu-schedule{target=cpu}") == {"int8"}
    assert _numerics(acc0, "cpu-schedule{target=cpu}") == {"exact"}
    # an explicit choice wins over the model's level
    assert _numerics(acc4, "cpu-schedule{target=cpu,numerics=exact}") == {"exact"}
    assert _numerics(acc0, "cpu-schedule{target=cpu,numerics=int8}") == {"int8"}
    # the AVX2 target has an int8 kernel too; Arm has none: exact there
    assert _numerics(acc4, "cpu-schedule{target=cpu-x86-avx2}") == {"int8"}
    assert _numerics(acc4, "cpu-schedule{target=cpu-arm-neon}") == {"exact"}


@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_computes_like_onnxruntime_at_each_level(symmetric, tmp_path):
    from qcompiler.codegen.cpu.host import read_cpuinfo
    from qcompiler.targets import get_target

    if not get_target("cpu").available:
        pytest.skip("the cpu target is not available here")
    _, flags = read_cpuinfo()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    x = np.random.default_rng(7).standard_normal((5, om.SIZES[0])).astype(np.float32)
    got, want = {}, {}
    for acc in (0, 4):
        model = _mnb(acc, symmetric)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        want[acc] = sess.run(None, {"x": x})[0]
        compiled = qcompiler.compile(model, "cpu")
        assert {n.attrs["config"]["numerics"] for n in compiled.module.main.nodes
                if n.op == "qmatmul"} == {"int8" if acc == 4 else "exact"}
        got[acc] = next(iter(compiled.run({"x": x}).values()))
    # the int8 path with the model's f32 scales (by default they are stored as f16)
    spec = get_target("cpu").default_pipeline.replace(
        "cpu-pack-weights{target=cpu}", "cpu-pack-weights{target=cpu,scale_dtype=f32}")
    out, _ = compile_to_dir(_mnb(4, symmetric), "cpu", str(tmp_path / "f32"), passes=spec)
    got_f32 = next(iter(qcompiler.load(out).run({"x": x}).values()))
    ref = next(iter(qcompiler.compile(_mnb(4, symmetric), "ref").run({"x": x}).values()))
    scale = float(np.abs(want[0]).max())

    def rel(a, b):
        return float(np.abs(a - b).max()) / scale

    assert rel(got[0], want[0]) < 1e-4
    # int8 activations move the result by about 1e-2 here: the level changes the arithmetic
    assert rel(want[4], want[0]) > 1e-3
    assert rel(ref, want[0]) < 1e-4  # ref is float at any level
    if vnni:  # onnxruntime's int8 path is exact there (without VNNI it may saturate pairs)
        assert rel(got_f32, want[4]) < 1e-4
    # f16 scales (a rounding of 2^-11) also move some int8 codes of the next layer's input by
    # one step: the error against the exact result stays near level 4's own (1.03-1.23x of it
    # on this MLP over six inputs, 2026-12-05)
    assert rel(got[4], want[0]) <= 1.3 * rel(want[4], want[0])
    assert rel(got[4], want[0]) < 5e-2
