"""The qmatmul kernels (split-K GEMV and tiled mma.sync, codegen/cuda/include/qcompiler/) run
on the CPU through the host emulation of their CUDA (tests/cuda_host/emulator/emulator.h):
the generated .cu of a packed layer, built with g++, every variant the tile pass chose at M
from 1 to 130, against the reference with the GPU tests' tolerance (cases.TOLERANCE). The
wgmma/TMA kernel (sm_90a) is not emulated: these are built for cuda-sm80.

What it can show: the packing, unpacking (LOP3/PRMT magic numbers, zero points, scales,
act-order), fragment and tile indexing, split-K fix-up and the epilogue's stores. What it
cannot: races, missing cp.async waits, launch limits, speed (the GPU tests and benchmarks).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

from cuda_emulation import EMULATOR_DIR
from qcompiler.codegen.cuda import backend, bench_support as bs, cases
from qcompiler.codegen.cuda.build import INCLUDE_DIR
from qcompiler.ir.core import constant_value

TARGET = "cuda-sm80"
# (bits, signed, zero point, group, act-order, dtype, bias): test_cuda_gpu.py's formats
FORMATS = {
    "u4_zp_g128_f16": (4, False, True, 128, False, "f16", False),
    "i4_g128_bf16": (4, True, False, 128, False, "bf16", True),
    "u4_zp_g32_actorder_f16": (4, False, True, 32, True, "f16", True),
    "u8_zp_g64_bf16": (8, False, True, 64, False, "bf16", False),
    "i8_perchannel_f16": (8, True, False, 0, False, "f16", True),
    "u2_zp_g64_f16": (2, False, True, 64, False, "f16", False),
    "i3_g128_bf16": (3, True, False, 128, False, "bf16", False),
}
SHAPE = (256, 200)  # K, N: N not a multiple of 64 (padded tiles)
MS = (1, 5, 16, 33, 130)


class EmulatedQmm:
    """One packed qmatmul, its .cu built with g++ after the emulator: ``run(x, variant)``."""

    def __init__(self, case: cases.Case, workdir, variants: list | None = None):
        from qcompiler.codegen.cuda.config import KNOBS

        gxx = shutil.which("g++")
        if gxx is None:
            pytest.skip("g++ not found")
        self.module, packed, node = bs.pack_case(case, TARGET)
        if variants is not None:  # explicit configs instead of the tile pass's (as the tuner)
            node.attrs["config"] = {**node.attrs["config"], "variants": {
                f"v{i:02d}": {"m_max": v["m_max"], "source": "explicit", "wgmma": 0,
                              **{k: int(v[k]) for k in KNOBS}} for i, v in enumerate(variants)}}
        params = backend.kernel_params(node, TARGET)
        self.variants = params["variants"]
        src = os.path.join(str(workdir), "qmm.cpp")
        with open(src, "w") as f:
            f.write('#include "emulator.h"\n' + backend.render(params))
        lib = os.path.join(str(workdir), "qmm.so")
        proc = subprocess.run([gxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                               "-w", "-I", EMULATOR_DIR, "-I", INCLUDE_DIR, "-o", lib, src],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.lib = ctypes.CDLL(lib)
        symbol = backend.kernel_symbol(node)
        self.fn = getattr(self.lib, f"{symbol}_run")
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int, ctypes.c_void_p,
                                                    ctypes.c_void_p, ctypes.c_int,
                                                    ctypes.c_void_p]
        self.ws_fn = getattr(self.lib, f"{symbol}_workspace_bytes")
        self.ws_fn.restype = ctypes.c_size_t
        self.ws_fn.argtypes = [ctypes.c_int]
        self.arrays = {role: constant_value(packed, node.operand(i))
                       for role, i in (("w", 1), ("scales", 2), ("zeros", 3), ("perm", 4),
                                       ("bias", 7))}
        self.arrays = {k: None if v is None else np.ascontiguousarray(v)
                       for k, v in self.arrays.items()}
        self.ws = None
        self.n = node.result.type.shape[-1]
        self.dtype = node.result.type.dtype.np_dtype

    def run(self, x: np.ndarray, variant: int) -> np.ndarray:
        m = x.shape[0]
        y = np.empty((m, self.n), self.dtype)
        y.view(np.uint8).reshape(-1)[:] = 0xFF  # NaN: an unwritten element shows
        need = max(int(self.ws_fn(m)), 1)
        if self.ws is None or self.ws.size < need:  # zeroed once, as QmmKernel's
            self.ws = np.zeros(need, np.uint8)
        ws = self.ws
        ptr = (lambda a: None if a is None else a.ctypes.data)
        err = self.fn(x.ctypes.data, y.ctypes.data, ptr(self.arrays["w"]),
                      ptr(self.arrays["scales"]), ptr(self.arrays["zeros"]),
                      ptr(self.arrays["bias"]), ptr(self.arrays["perm"]), m, ws.ctypes.data,
                      None, variant, None)
        assert err == 0, f"variant {variant}: error {err}"
        return y


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_variant_in_host_emulation(fmt, tmp_path):
    bits, signed, zp, group, ao, dtype, bias = FORMATS[fmt]
    case = cases.Case(k=SHAPE[0], n=SHAPE[1], bits=bits, signed=signed, zero_point=zp,
                      group=group, act_order=ao, dtype=dtype, bias=bias)
    qmm = EmulatedQmm(case, tmp_path)
    kinds = set()
    for m in MS:
        x = cases.random_x(case, m, seed=m)
        ref = cases.reference(qmm.module, x)
        for i, v in enumerate(qmm.variants):
            if m > v["m_max"] * 4:  # a small-M variant at large M only costs time
                continue
            kinds.add("gemv" if v["gemv"] else "tiled")
            err = cases.rel_error(qmm.run(x, i), ref)
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
    qmm = EmulatedQmm(case, tmp_path, SPLIT_VARIANTS)
    for m in (1, 7, 40, 70):
        x = cases.random_x(case, m, seed=m)
        ref = cases.reference(qmm.module, x)
        for i, v in enumerate(qmm.variants):
            if m > v["m_max"]:
                continue
            for call in range(2):  # the split-K counters must be back at zero for a second call
                err = cases.rel_error(qmm.run(x, i), ref)
                assert err <= cases.TOLERANCE[dtype], \
                    f"{fmt} M={m} variant {v} call {call}: rel error {err:.3g}"
