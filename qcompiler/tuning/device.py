"""The name of the device a target runs on: part of every tuning record's identity.

- cpu targets (and ``ref``): the CPU model name from /proc/cpuinfo ("AMD EPYC 9B45");
- cuda targets: the name of GPU 0 as the CUDA driver reports it ("NVIDIA H100 80GB HBM3");
  without a GPU (a build machine), ``"no-cuda-device"``, which matches no measured record, so
  replay falls back to the heuristic;
- fpga targets: the part ("xcu250-figd2104-2L-e"), since their "measurement" is the cost model.

``QC_TUNING_DEVICE`` overrides the answer, to replay a log measured on a named device when
compiling on another machine (cross-compiling for an H100 on a laptop).
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

NO_CUDA_DEVICE = "no-cuda-device"


def _target(target):
    if isinstance(target, str):
        from qcompiler.targets import get_target

        return get_target(target)
    return target


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


@functools.cache
def cuda_device_name(ordinal: int = 0) -> str:
    """The CUDA driver's name of GPU ``ordinal``, or NO_CUDA_DEVICE without a usable driver."""
    for lib in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return NO_CUDA_DEVICE
    if cuda.cuInit(0) != 0:
        return NO_CUDA_DEVICE
    device = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
        return NO_CUDA_DEVICE
    name = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGetName(name, len(name), device) != 0:
        return NO_CUDA_DEVICE
    return name.value.decode("utf-8", errors="replace").strip()


def device_name(target) -> str:
    """The device name recorded in, and matched against, tuning records for ``target``
    (a Target or a target name)."""
    override = os.environ.get("QC_TUNING_DEVICE")
    if override:
        return override
    target = _target(target)
    if target.backend == "cuda":
        return cuda_device_name(0)
    if target.backend == "hls":
        return str(target.params.get("part", target.name))
    return cpu_name()
