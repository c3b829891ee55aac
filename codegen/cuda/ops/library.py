"""One CUDA library for all op kernels of a model, and its ctypes loader (no TVM, no torch).

``build_cuda_ops_library(nodes, target, out_dir)`` renders every distinct kernel (by symbol:
equal sources share one), pastes them after ``include/qcompiler/ops/common.cuh`` into one
``cuda_ops.cu`` and builds ``cuda_ops.so`` with nvcc for the target's arch (through the
build cache). ``CudaOpsLibrary(path)`` calls a kernel with device pointers, the buffers'
run-time dims and a stream (the ABI in ``common.py``).
"""
from __future__ import annotations

import ctypes
import os
import re
from typing import Iterable, Optional

import numpy as np

from qcompiler.codegen.cuda.ops.common import CudaOpsError
from qcompiler.codegen.cuda.ops.kernel import SHARED_GUARD, kernel_source

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "include",
                      "qcompiler", "ops", "common.cuh")


def library_source(nodes: Iterable, module=None) -> tuple[dict, str]:
    """({first result name: symbol}, the .cu text with every distinct kernel once)."""
    names: dict = {}
    kernels: dict = {}
    for node in nodes:
        symbol, text = kernel_source(node, module)
        kernels.setdefault(symbol, text)
        names[node.results[0].name] = symbol
    if not kernels:
        raise CudaOpsError("no op kernels to build")
    with open(HEADER) as f:
        header = f.read()  # pasted into the main file (its include guard is harmless there)
    parts = [f"// qcompiler CUDA op kernels: {len(kernels)} kernels (generated)\n", header]
    shared: set = set()  # kernels with launch constants: each once, then every node's entries
    for s in sorted(kernels):
        text = kernels[s]
        if text.startswith(f"#ifndef {SHARED_GUARD}"):
            guard = text.split("\n", 1)[0].split()[1]
            if guard in shared:  # the node's entry points only
                text = text.split(f"#endif  // {guard}\n", 1)[1]
            shared.add(guard)
        parts.append(text)
    return names, "\n".join(parts)


def archs_of(target) -> list:
    from qcompiler.targets import get_target

    if isinstance(target, str):
        if target.startswith("sm_"):
            return [target]
        target = get_target(target)
    return [target.params["arch"]]


LIBRARY_NAME = "cuda_ops.so"  # in the out_dir given to build_cuda_ops_library
SOURCE_NAME = "cuda_ops.cu"


def build_cuda_ops_library(nodes: Iterable, target, out_dir: str, module=None,
                           archs: Optional[list] = None) -> dict:
    """Build the op kernels of ``nodes`` into ``out_dir/cuda_ops.so`` (source beside it).

    ``target``: a CUDA Target, its name, or an arch (``sm_90``); ``archs`` overrides it (one
    fat library for several). Returns {first result name of each node: kernel symbol}.
    Raises CudaOpsError for a node without a kernel, BuildError when nvcc fails or is missing.
    The build goes through the build cache (keyed by the source text, flags and nvcc).
    """
    from qcompiler.codegen.cuda.build import build_cached

    names, text = library_source(nodes, module)
    archs = archs or archs_of(target)
    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(out_dir, SOURCE_NAME)
    old = open(src).read() if os.path.exists(src) else None
    if old != text:  # rewritten only when it changed: an unchanged library is kept
        with open(src, "w") as f:
            f.write(text)
    build_cached(src, os.path.join(out_dir, LIBRARY_NAME), archs)
    return names


def library_path(out_dir: str) -> str:
    return os.path.join(out_dir, LIBRARY_NAME)


c_void_p, c_int64 = ctypes.c_void_p, ctypes.c_int64
# an op kernel's symbol (kernel_source): qc_cu_<op>_<12 hex digits>[_<launch constants>]
_SYMBOL = re.compile(r"qc_cu_([a-z0-9_]+?)_[0-9a-f]{12}(?:_[0-9m_]+)?$")
_SHAPE_WORKSPACE: dict = {}  # symbol -> shape_workspace(symbol)


class CudaOpsLibrary:
    """The loaded library: ``lib.call(symbol, ptrs, shapes, workspace=0, stream=0)``."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            from qcompiler.codegen.cuda.runtime import CudaDeviceUnavailableError

            raise CudaDeviceUnavailableError(f"cannot load {path}: {e}") from None
        self._fns: dict = {}

    def _fn(self, symbol: str):
        fns = self._fns.get(symbol)
        if fns is None:
            try:
                run = getattr(self.lib, symbol)
                ws = getattr(self.lib, f"{symbol}_workspace_bytes")
            except AttributeError:
                raise CudaOpsError(f"{self.path} has no kernel {symbol}") from None
            run.argtypes = [ctypes.POINTER(c_void_p), ctypes.POINTER(c_int64), c_void_p, c_void_p]
            run.restype = ctypes.c_int
            ws.argtypes = [ctypes.POINTER(c_int64)]
            ws.restype = c_int64
            fns = self._fns[symbol] = (run, ws)
        return fns

    @staticmethod
    def shape_workspace(symbol: str) -> bool:
        """Whether ``symbol``'s workspace depends on the shapes (``SHAPE_WORKSPACE_OPS``); a
        symbol not of the ``qc_cu_<op>_<digest>`` form is asked (True). Once per symbol."""
        known = _SHAPE_WORKSPACE.get(symbol)
        if known is None:
            from qcompiler.codegen.cuda.ops.kernel import SHAPE_WORKSPACE_OPS, SUPPORTED_OPS

            named = _SYMBOL.match(symbol)
            op = named.group(1) if named else None
            known = _SHAPE_WORKSPACE[symbol] = (op is None or op in SHAPE_WORKSPACE_OPS
                                                or op not in SUPPORTED_OPS)
        return known

    @staticmethod
    def _arrays(ptrs: list, shapes: list):
        # (one null slot after the operands: the padding word that qkv_heads and attention
        # read there, ``PAD_AWARE_OPS``, is absent)
        flat = [int(d) for s in shapes for d in s]
        return (c_void_p * (len(ptrs) + 1))(*ptrs, None), (c_int64 * max(len(flat), 1))(*flat)

    def workspace_bytes(self, symbol: str, shapes: list, flat=None) -> int:
        """The workspace ``symbol`` needs for operands and results of ``shapes``; ``flat``:
        those shapes already as the kernel's c_int64 array (a plan's table row has it). 0
        without a call for a kernel whose op sizes no workspace from the shapes (the symbol
        names its op: ``qc_cu_<op>_<digest>``)."""
        if not self.shape_workspace(symbol):
            return 0
        _, ws = self._fn(symbol)
        return int(ws(self._arrays([], shapes)[1] if flat is None else flat))

    def call(self, symbol: str, ptrs: list, shapes: list, workspace: int = 0,
             stream: int = 0) -> None:
        """Launch ``symbol`` on ``stream``: ``ptrs`` the device pointers of the node's data
        operands then results, ``shapes`` their run-time shapes in the same order."""
        run, _ = self._fn(symbol)
        p, s = self._arrays(ptrs, shapes)
        err = run(p, s, c_void_p(workspace or None), c_void_p(stream or None))
        if err:
            from qcompiler.codegen.cuda.runtime import CudaRuntimeError

            raise CudaRuntimeError(f"op kernel {symbol}: CUDA error {err}")

    def run_numpy(self, rt, symbol: str, args: list, out_like: list,
                  poison: bool = True) -> list:
        """Copy ``args`` (numpy, data operands) to the device, run, copy the results back.
        ``out_like``: (shape, dtype) of each result. ``poison`` fills results with 0xFF
        bytes first (NaN in f16/bf16/f32) so that an unwritten element shows."""
        # shapes from the arrays as given: ascontiguousarray would make a 0-d array 1-d
        ins = [a if a.flags.c_contiguous else a.copy() for a in map(np.asarray, args)]
        outs = [np.empty(shape, dtype) for shape, dtype in out_like]
        ptrs_in = [rt.upload(a) for a in ins]
        ptrs_out = [rt.malloc(o.nbytes) for o in outs]
        shapes = [a.shape for a in ins] + [o.shape for o in outs]
        ws_bytes = self.workspace_bytes(symbol, shapes)
        ws = rt.malloc(ws_bytes) if ws_bytes else 0
        if ws:  # the ABI: a workspace starts zeroed (kernels keep their counters at zero)
            rt.lib.qc_memset(c_void_p(ws), 0, ws_bytes)
        try:
            if poison:
                for p, o in zip(ptrs_out, outs):
                    rt.lib.qc_memset(c_void_p(p), 0xFF, max(o.nbytes, 1))
            self.call(symbol, ptrs_in + ptrs_out, shapes, ws)
            rt.synchronize()
            for p, o in zip(ptrs_out, outs):
                if o.nbytes:
                    rt.d2h(o, p)
        finally:
            for p in ptrs_in + ptrs_out + ([ws] if ws else []):
                rt.free(p)
        return outs


__all__ = ["build_cuda_ops_library", "library_source", "library_path", "CudaOpsLibrary"]
