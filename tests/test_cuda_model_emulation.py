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
import os
import shutil
import subprocess

import numpy as np
import pytest

from cuda_emulation import EMULATOR_DIR, build_emulated, call_emulated
from qcompiler.codegen.cuda import backend
from qcompiler.codegen.cuda.build import INCLUDE_DIR
from qcompiler.codegen.cuda.epilogue import epilogue_in_kernel
from qcompiler.codegen.cuda.ops import kernel_source
from qcompiler.ir.core import constant_value
from qcompiler.ir.ops import infer_types
from qcompiler.ir.types import TensorType
from qcompiler.runtime.reference import OP_IMPLS, run

TARGET = "cuda-sm80"  # (the sm_90a wgmma kernel is not emulated)


def _qmatmul_impl(node, module, workdir):
    """The node's emulated qmatmul kernel as a ``run(kernels=...)`` implementation: with its
    epilogue applied in the kernel where the plan applies it there (``applies_epilogue``),
    else the product (the interpreter then applies the epilogue, as the plan's separate
    epilogue launch would)."""
    gxx = shutil.which("g++")
    params = backend.kernel_params(node, TARGET)
    src = os.path.join(str(workdir), f"{node.result.name}.cpp")
    with open(src, "w") as f:
        f.write('#include "emulator.h"\n' + backend.render(params))
    lib_path = src[:-4] + ".so"
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                           "-w", "-I", EMULATOR_DIR, "-I", INCLUDE_DIR, "-o", lib_path, src],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = ctypes.CDLL(lib_path)
    symbol = backend.kernel_symbol(node)
    fn = getattr(lib, f"{symbol}_run")
    fn.restype = ctypes.c_int
    ws_fn = getattr(lib, f"{symbol}_workspace_bytes")
    ws_fn.restype = ctypes.c_size_t
    ws_fn.argtypes = [ctypes.c_int]
    const = {role: constant_value(module, node.operand(i))
             for role, i in (("w", 1), ("scales", 2), ("zeros", 3), ("perm", 4), ("bias", 7))}
    const = {k: None if v is None else np.ascontiguousarray(v) for k, v in const.items()}
    fused = epilogue_in_kernel(node)
    pairs = bool(node.attrs.get("epilogue_pairs"))
    n_out = node.result.type.shape[-1]
    n_product = n_out * 2 if pairs else n_out

    def impl(nd, args, module_):
        x = np.ascontiguousarray(args[0])
        m = int(np.prod(x.shape[:-1]))
        width = n_out if fused else n_product
        y = np.empty((m, width), nd.result.type.dtype.np_dtype)
        y.view(np.uint8).reshape(-1)[:] = 0xFF
        ws = np.zeros(max(int(ws_fn(m)), 1), np.uint8)
        extras = [np.ascontiguousarray(a) for a in args[8:]] if fused else []
        extra_ptrs = (ctypes.c_void_p * max(len(extras), 1))(*[a.ctypes.data for a in extras])
        ptr = (lambda a: ctypes.c_void_p(None if a is None else a.ctypes.data))
        err = fn(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(y.ctypes.data),
                 ptr(const["w"]), ptr(const["scales"]), ptr(const["zeros"]), ptr(const["bias"]),
                 ptr(const["perm"]), ctypes.c_int(m), ctypes.c_void_p(ws.ctypes.data),
                 ctypes.c_void_p(None), ctypes.c_int(-1),
                 ctypes.cast(extra_ptrs, ctypes.c_void_p) if fused else ctypes.c_void_p(None))
        assert err == 0, f"%{nd.result.name}: error {err}"
        return [y.reshape(*x.shape[:-1], width)]
    impl.applies_epilogue = fused  # (the interpreter applies it otherwise: _with_epilogue)
    return impl


def _op_impl(lib, symbol):
    def impl(node, args, module):
        data = [a for a in args if a is not None]
        types = [None if a is None else TensorType(a.shape, v.type.dtype)
                 for a, v in zip(args, node.operands)]
        consts = [None if v is None else constant_value(module, v) for v in node.operands]
        out = [(t.shape, t.dtype.np_dtype) for t in infer_types(node.op, types, node.attrs, consts)]
        if any(not isinstance(d, int) for shape, _ in out for d in shape):
            # a shape computed from data (a reshape's shape operand): the reference's shapes
            out = [(r.shape, r.dtype) for r in OP_IMPLS[node.op](node, args, module)]
        return call_emulated(lib, symbol, data, out)
    return impl


def test_llama_decode_step_in_host_emulation(tmp_path, monkeypatch):
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
    spec = "canonicalize,quantize-weights{bits=4,group=32}," + get_target(TARGET).default_pipeline
    packing = "reorder-weights,schedule-unpack,tile"
    assert spec.split(",reorder-weights")[1].startswith(",schedule-unpack,tile")
    module = PassManager.parse(spec.split(",reorder-weights")[0]).run(import_model(path))
    packed = PassManager.parse(packing + "{target=%s}" % TARGET).run(module.clone())
    packed_nodes = {n.result.name: n for n in packed.main.nodes if n.op == "qmatmul"}
    kernels, texts, symbols = {}, {}, {}
    qmms = [n for n in module.main.nodes if n.op == "qmatmul"]
    assert any(n.attrs.get("epilogue_pairs") for n in qmms)  # fuse-gate-up's SwiGLU
    assert any(epilogue_in_kernel(n) and n.operands[8:] for n in qmms)  # a residual add
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
            kernels[n.results[0].name] = _op_impl(lib, symbols[n.results[0].name])
            kinds.add(n.op)
    assert {"attention", "rmsnorm"} <= kinds, kinds
    # a kernel that applies its node's epilogue itself is not given it a second time
    from qcompiler.runtime import reference

    plain = reference._with_epilogue
    monkeypatch.setattr(reference, "_with_epilogue",
                        lambda k: k if getattr(k, "applies_epilogue", False) else plain(k))
    got = run(module, feeds, kernels=kernels)
    want = run(module, feeds)
    for k in want:
        w, g = np.asarray(want[k], np.float64), np.asarray(got[k], np.float64)
        scale = max(float(np.abs(w).max()), 1.0)
        assert np.abs(g - w).max() <= 2e-2 * scale, (k, float(np.abs(g - w).max()), scale)
