"""Whether a CUDA GPU is usable here (tests marked ``gpu`` skip otherwise)."""
import ctypes
import functools

import pytest

from qcompiler.codegen.cuda.build import find_nvcc


@functools.cache
def gpu_reason() -> str:
    """'' when a GPU and nvcc are present, else why the GPU tests are skipped."""
    if find_nvcc() is None:
        return "nvcc not found"
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1) on this machine"
    n = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0 or n.value == 0:
        return "no CUDA device available"
    return ""


def nccl_torch():
    """torch, for the tests that need its CUDA and NCCL (skips the test otherwise)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no CUDA or no NCCL")
    return torch
