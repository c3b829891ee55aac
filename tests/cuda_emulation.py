"""Running CUDA op kernels on the host: their generated source after
tests/cuda_host/emulator/emulator.h (the CUDA they use, emulated: a block's threads as fibers,
warp-wide operations once all 32 lanes are there) and the op kernels' common header, built
with g++, called through the kernels' C ABI on host buffers. Used by test_cuda_conv.py and
test_cuda_ops.py to check the kernels' own code in CI, where no GPU is."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

EMULATOR_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_host", "emulator")


def build_emulated(texts: list, out_dir) -> str:
    """Kernel sources after tests/cuda_host/emulator/emulator.h and the op kernels' common
    header (as the op library pastes it), built with g++ into a library whose symbols have the
    op kernels' C ABI (host pointers in place of device ones)."""
    from qcompiler.codegen.cuda.ops.library import HEADER

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    src = os.path.join(str(out_dir), "emulated.cpp")
    with open(src, "w") as f, open(HEADER) as h:
        f.write('#include "emulator.h"\n' + h.read() + "\n".join(texts))
    lib = os.path.join(str(out_dir), "emulated.so")
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                           "-w", "-I", EMULATOR_DIR, "-o", lib, src],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return lib


def call_emulated(lib, symbol: str, args: list, out_like: list, first: list = None) -> list:
    """Run ``symbol`` on host arrays: ``args`` the node's data operands, ``out_like`` (shape,
    dtype) of each result, filled with 0xFF bytes first (an unwritten element shows). The
    workspace (``SYM_workspace_bytes``) is zeroed once, as the plan does; with ``first``
    (other operands of the same shapes) the kernel runs on those before, on the same
    workspace: a split-K kernel must leave its counters at zero for the next call."""
    outs = [np.empty(shape, dtype) for shape, dtype in out_like]
    fn = getattr(lib, symbol)
    fn.restype = ctypes.c_int
    size = getattr(lib, f"{symbol}_workspace_bytes")
    size.restype = ctypes.c_int64
    workspace = None
    for operands in ([first] if first is not None else []) + [args]:
        # (not ascontiguousarray: it makes a 0-d array 1-d, and the shapes come from these)
        arrays = [a if a.flags.c_contiguous else a.copy() for a in map(np.asarray, operands)]
        arrays += outs
        ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        dims = [int(d) for a in arrays for d in a.shape]
        shapes = (ctypes.c_int64 * max(len(dims), 1))(*dims)
        if workspace is None:
            workspace = np.zeros(max(int(size(shapes)), 1), np.uint8)
        for o in outs:
            o.reshape(-1).view(np.uint8)[:] = 0xFF  # (a 0-d array: through a 1-d view)
        assert fn(ptrs, shapes, ctypes.c_void_p(workspace.ctypes.data), None) == 0
    return outs


class EmulatedLibrary:
    """``CudaOpsLibrary``'s ``run_numpy`` on an emulated build (the runtime argument unused)."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)

    def run_numpy(self, rt, symbol: str, args: list, out_like: list, poison: bool = True):
        return call_emulated(self.lib, symbol, list(map(np.asarray, args)), out_like)
