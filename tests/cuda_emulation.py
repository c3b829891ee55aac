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


_PAGE = os.sysconf("SC_PAGE_SIZE")
_mprotect = ctypes.CDLL(None).mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def guarded(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` that ends within 256 bytes of an inaccessible page, its start 256-byte
    aligned as cudaMalloc's: a kernel that reads or writes more than that past the end faults
    (the test fails) instead of touching other memory."""
    import mmap

    a = np.asarray(a)
    nbytes = max(a.nbytes, 1)
    data = -(-nbytes // _PAGE) * _PAGE
    mm = mmap.mmap(-1, data + _PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    assert _mprotect(base + data, _PAGE, 0) == 0  # PROT_NONE
    offset = (data - nbytes) // 256 * 256
    # (the array keeps the mapping alive, and with it the guard page)
    out = np.frombuffer(mm, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
    out[...] = a
    return out


def compile_emulated(text: str, out_dir, name: str, include_dirs=()) -> str:
    """``text`` after emulator.h, built with g++ into ``out_dir/name.so``; its path."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    src = os.path.join(str(out_dir), f"{name}.cpp")
    with open(src, "w") as f:
        f.write('#include "emulator.h"\n' + text)
    lib = os.path.join(str(out_dir), f"{name}.so")
    includes = [flag for d in (EMULATOR_DIR, *include_dirs) for flag in ("-I", d)]
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                           "-w", *includes, "-o", lib, src], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return lib


def build_emulated(texts: list, out_dir) -> str:
    """Op kernel sources after the op kernels' common header (as the op library pastes it),
    built into a library whose symbols have the op kernels' C ABI (host pointers in place
    of device ones)."""
    from qcompiler.codegen.cuda.ops.library import HEADER

    with open(HEADER) as h:
        return compile_emulated(h.read() + "\n".join(texts), out_dir, "emulated")


def call_emulated(lib, symbol: str, args: list, out_like: list, first: list = None,
                  pad: int = None) -> list:
    """Run ``symbol`` on host arrays: ``args`` the node's data operands, ``out_like`` (shape,
    dtype) of each result, filled with 0xFF bytes first (an unwritten element shows); every
    buffer ``guarded`` (an access far past its end faults). The
    workspace (``SYM_workspace_bytes``) is zeroed once, as the plan does; with ``first``
    (other operands of the same shapes) the kernel runs on those before, on the same
    workspace: a split-K kernel must leave its counters at zero for the next call. ``pad``:
    the padding word of a cache laid out for a capacity (qkv_heads and attention read it
    after their operands; null without)."""
    outs = [guarded(np.empty(shape, dtype)) for shape, dtype in out_like]
    fn = getattr(lib, symbol)
    fn.restype = ctypes.c_int
    size = getattr(lib, f"{symbol}_workspace_bytes")
    size.restype = ctypes.c_int64
    workspace = None
    for operands in ([first] if first is not None else []) + [args]:
        # (not ascontiguousarray: it makes a 0-d array 1-d, and the shapes come from these)
        arrays = [guarded(a) for a in map(np.asarray, operands)] + outs
        pad_word = None if pad is None else guarded(np.array([pad], np.int64))
        ptrs = (ctypes.c_void_p * (len(arrays) + 1))(
            *[a.ctypes.data for a in arrays], None if pad_word is None else pad_word.ctypes.data)
        dims = [int(d) for a in arrays for d in a.shape]
        shapes = (ctypes.c_int64 * max(len(dims), 1))(*dims)
        if workspace is None:
            workspace = guarded(np.zeros(max(int(size(shapes)), 1), np.uint8))
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


def op_kernel_impl(lib, symbol: str):
    """``reference.run``'s ``kernels`` entry for a node whose op kernel is ``symbol`` in the
    emulated ``lib``: result shapes by type inference on the run-time shapes (or, where a
    shape comes from data, a reshape's, from the reference op)."""
    from qcompiler.ir.core import constant_value
    from qcompiler.ir.ops import infer_types
    from qcompiler.ir.types import TensorType
    from qcompiler.runtime.reference import OP_IMPLS

    def impl(node, args, module):
        types = [None if a is None else TensorType(a.shape, v.type.dtype)
                 for a, v in zip(args, node.operands)]
        consts = [None if v is None else constant_value(module, v) for v in node.operands]
        out = [(t.shape, t.dtype.np_dtype)
               for t in infer_types(node.op, types, node.attrs, consts)]
        if any(not isinstance(d, int) for shape, _ in out for d in shape):
            out = [(r.shape, r.dtype) for r in OP_IMPLS[node.op](node, args, module)]
        return call_emulated(lib, symbol, [a for a in args if a is not None], out)
    return impl


class EmulatedQmm:
    """A packed qmatmul node's generated .cu (``backend.render``) built after the emulator:
    ``run(x, width, variant, extras)`` with the ``SYM_run`` ABI on host buffers, one
    workspace zeroed once (as the runtime's QmmKernel keeps it)."""

    def __init__(self, node, packed_module, workdir, target: str):
        from qcompiler.codegen.cuda import backend
        from qcompiler.codegen.cuda.build import INCLUDE_DIR
        from qcompiler.ir.core import constant_value
        from qcompiler.ir.ops import qmatmul_x_norm_bias, qmatmul_x_norm_scale

        params = backend.kernel_params(node, target)
        self.variants = params["variants"]
        lib = ctypes.CDLL(compile_emulated(backend.render(params), workdir, node.result.name,
                                           [INCLUDE_DIR]))
        symbol = backend.kernel_symbol(node)
        self.fn = getattr(lib, f"{symbol}_run")
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int, ctypes.c_void_p,
                                                    ctypes.c_void_p, ctypes.c_int,
                                                    ctypes.c_void_p]
        self.ws_fn = getattr(lib, f"{symbol}_workspace_bytes")
        self.ws_fn.restype = ctypes.c_size_t
        self.ws_fn.argtypes = [ctypes.c_int]
        self.arrays = {}
        for role, i in (("w", 1), ("scales", 2), ("zeros", 3), ("perm", 4), ("bias", 7)):
            v = constant_value(packed_module, node.operand(i))
            self.arrays[role] = None if v is None else guarded(np.ascontiguousarray(v))
        for role, v in (("norm", qmatmul_x_norm_scale(node)),  # fuse-norm-qmatmul's operands
                        ("norm_bias", qmatmul_x_norm_bias(node))):
            a = constant_value(packed_module, v)
            self.arrays[role] = None if a is None else guarded(np.ascontiguousarray(a))
        self.dtype = node.result.type.dtype.np_dtype
        self.ws = None

    def run(self, x: np.ndarray, width: int, variant: int = -1, extras=None) -> np.ndarray:
        """y [M, width] for x [M, K] (poisoned first: an unwritten element shows). ``extras``:
        the epilogue's extra operands (a list, maybe empty: the kernel applies its epilogue),
        or None (the product only)."""
        x = guarded(np.ascontiguousarray(x))
        m = x.shape[0]
        y = guarded(np.empty((m, width), self.dtype))
        y.view(np.uint8).reshape(-1)[:] = 0xFF
        need = max(int(self.ws_fn(m)), 1)
        if self.ws is None or self.ws.size < need:
            self.ws = guarded(np.zeros(need, np.uint8))
        extra_arrays = [guarded(np.ascontiguousarray(a)) for a in extras or []]
        extra_ptrs = (ctypes.c_void_p * max(len(extra_arrays), 1))(
            *[a.ctypes.data for a in extra_arrays])
        ptr = (lambda a: None if a is None else a.ctypes.data)
        err = self.fn(x.ctypes.data, y.ctypes.data, ptr(self.arrays["w"]),
                      ptr(self.arrays["scales"]), ptr(self.arrays["zeros"]),
                      ptr(self.arrays["bias"]), ptr(self.arrays["perm"]),
                      ptr(self.arrays["norm"]), ptr(self.arrays["norm_bias"]), m,
                      self.ws.ctypes.data, None, variant,
                      ctypes.cast(extra_ptrs, ctypes.c_void_p).value if extras is not None
                      else None)
        assert err == 0, f"variant {variant}: error {err}"
        return y
