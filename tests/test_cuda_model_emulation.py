"""A whole decoder step through the CUDA pipeline with every kernel emulated on the CPU
(tests/cuda_host/emulator): a small Llama (2 layers, grouped-query attention, a KV cache)
compiled for cuda-sm80, its qmatmuls (GEMV and tiled kernels, with their fused epilogues:
residual adds and fuse-gate-up's paired SwiGLU) and every op kernel (RMSNorm, qkv_heads,
attention, rotary, elementwise, copies ...) run from their generated source, against the
reference of the same module. What the GPU tests check on the device, in CI; not races,
launch limits or speed.
"""
from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest

from cuda_emulation import EmulatedQmm, build_emulated, op_kernel_impl
from qcompiler.codegen.cuda.epilogue import epilogue_in_kernel
from qcompiler.codegen.cuda.ops import kernel_source
from qcompiler.ir.core import constant_value
from qcompiler.ir.ops import qmatmul_epilogue_operands
from qcompiler.runtime.reference import run

TARGET = "cuda-sm80"  # (the sm_90a wgmma kernel is not emulated)


def _qmatmul_impl(node, packed, workdir):
    """The packed node's emulated qmatmul kernel as a ``run(kernels=...)`` implementation:
    with its epilogue applied in the kernel where the plan applies it there
    (``applies_epilogue``), else the product (the interpreter then applies the epilogue, as
    the plan's separate epilogue launch would)."""
    qmm = EmulatedQmm(node, packed, workdir, TARGET)
    fused = epilogue_in_kernel(node)
    n_out = node.result.type.shape[-1]
    width = n_out if fused or not node.attrs.get("epilogue_pairs") else 2 * n_out

    def impl(nd, args, module_):
        x = args[0]
        extras = qmatmul_epilogue_operands(list(args), nd.attrs) if fused else None
        y = qmm.run(x.reshape(-1, x.shape[-1]), width, extras=extras)
        return [y.reshape(*x.shape[:-1], width)]
    impl.applies_epilogue = fused  # (the interpreter applies it otherwise: _with_epilogue)
    return impl


def _int8_model_impl(node, module):
    """The numpy model of the int8-activation kernel (cases.int8_model) as the product of
    ``node`` (the interpreter applies its epilogue)."""
    from qcompiler.codegen.cuda.cases import int8_model

    def impl(nd, args, module_):
        x = args[0]
        y = int8_model(module, x.reshape(-1, x.shape[-1]), node)
        return [y.reshape(*x.shape[:-1], y.shape[-1])]
    return impl


@pytest.mark.parametrize("int8,norm", [(False, False), (True, False), (False, True),
                                       (True, True)],
                         ids=["f16", "int8", "f16-x_norm", "int8-x_norm"])
def test_llama_decode_step_in_host_emulation(tmp_path, monkeypatch, int8, norm):
    """int8: the weights permit int8 activations (quantize-weights{accuracy_level=4}) and
    tile{int8_min_m=1} gives every qmatmul the int8 kernel, with its fused epilogues; the
    expected values then run each qmatmul's product through the int8 kernel's numpy model.
    x_norm: fuse-norm-qmatmul{enable=1}, every RMSNorm inside its projection's kernel (the
    GEMV's x * g and 1 / rms at M = 6, the int8 kernel's normalized copy)."""
    pytest.importorskip("torch")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    from conftest import small_llama_onnx
    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager
    from qcompiler.targets import get_target

    path = str(tmp_path / "llama.onnx")
    feeds = small_llama_onnx(path, 2, 2, 3, 11, seed=5)  # batch 2, 3 new tokens, 11 cached
    # 4-bit weights (quantize-weights, as bench_models_gpu.py does), then the target's
    # pipeline; the reference runs the module before the qmatmul packing (it reads row-major
    # codes), the emulated qmatmul kernels the packed nodes of the same names.
    level = ",accuracy_level=4" if int8 else ""
    spec = "canonicalize,quantize-weights{bits=4,group=32%s}," % level \
        + get_target(TARGET).default_pipeline
    if norm:
        assert "fuse-norm-qmatmul{enable=0}" in spec
        spec = spec.replace("fuse-norm-qmatmul{enable=0}", "fuse-norm-qmatmul{enable=1}")
    packing = "reorder-weights,schedule-unpack,tile"
    assert spec.split(",reorder-weights")[1].startswith(",schedule-unpack,tile")
    module = PassManager.parse(spec.split(",reorder-weights")[0]).run(import_model(path))
    packed = PassManager.parse(packing + "{target=%s%s}" % (
        TARGET, ",int8_min_m=1" if int8 else "")).run(module.clone())
    if int8:
        assert all(v.get("int8") for n in packed.main.nodes if n.op == "qmatmul"
                   for v in n.attrs["config"]["variants"].values())
    packed_nodes = {n.result.name: n for n in packed.main.nodes if n.op == "qmatmul"}
    kernels, texts, symbols = {}, {}, {}
    qmms = [n for n in module.main.nodes if n.op == "qmatmul"]
    assert any(n.attrs.get("epilogue_pairs") for n in qmms)  # fuse-gate-up's SwiGLU
    assert any(epilogue_in_kernel(n) and qmatmul_epilogue_operands(n) for n in qmms)  # residual
    assert sum(bool(n.attrs.get("x_norm")) for n in qmms) == (5 if norm else 0)
    for n in qmms:
        kernels[n.result.name] = _qmatmul_impl(packed_nodes[n.result.name], packed, tmp_path)
    ops = [n for n in module.main.nodes if n.op not in ("constant", "qmatmul")
           and not all(v is None or constant_value(module, v) is not None for v in n.operands)]
    for n in ops:
        try:
            symbol, text = kernel_source(n, module)
        except Exception:  # views and host shape work: the reference runs them
            continue
        texts[symbol] = text
        symbols[n.results[0].name] = symbol
    lib = ctypes.CDLL(build_emulated([texts[s] for s in sorted(texts)], tmp_path))
    kinds = set()
    for n in ops:
        if n.results[0].name in symbols:
            kernels[n.results[0].name] = op_kernel_impl(lib, symbols[n.results[0].name])
            kinds.add(n.op)
    assert "attention" in kinds and ("rmsnorm" in kinds) != norm, kinds
    # a kernel that applies its node's epilogue itself is not given it a second time
    from qcompiler.runtime import reference

    plain = reference._with_epilogue
    monkeypatch.setattr(reference, "_with_epilogue",
                        lambda k: k if getattr(k, "applies_epilogue", False) else plain(k))
    got = run(module, feeds, kernels=kernels)
    want = run(module, feeds, kernels={n.result.name: _int8_model_impl(n, module)
                                       for n in qmms} if int8 else None)
    for k in want:
        w, g = np.asarray(want[k], np.float64), np.asarray(got[k], np.float64)
        scale = max(float(np.abs(w).max()), 1.0)
        assert np.abs(g - w).max() <= 2e-2 * scale, (k, float(np.abs(g - w).max()), scale)
