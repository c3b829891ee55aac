"""One shared library for all op kernels of a model, and its loader.

``build_ops_library(nodes, target, path)`` puts every distinct kernel (by kernel name; equal
names are checked to be structurally equal functions) into one IRModule, compiles it with
LLVM for the target's -mcpu and exports ``path`` (.so). ``OpsLibrary(path)[name]`` is a
callable taking numpy arrays (operands, then results) that TVM wraps without copying.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np

from qcompiler.codegen.cpu.errors import CPUBackendError
from qcompiler.codegen.cpu.ops.kernel import primfunc_for
from qcompiler.codegen.cpu.ops.schedule import params_for
from qcompiler.codegen.cpu.runtime import default_pool_size
from qcompiler.ir.types import elem

BFLOAT16 = elem("bf16").np_dtype
# float8 / float4 arrays reach the cast kernels as their uint8 codes
NARROW_FLOATS = frozenset(elem(t).np_dtype for t in ("f8e4m3fn", "f8e5m2", "f8e4m3fnuz",
                                                     "f8e5m2fnuz", "f4e2m1"))


def build_ops_library(nodes: Iterable, target, path: str, module=None) -> dict:
    """Compile the kernels of ``nodes`` into one library at ``path``.

    ``target``: a cpu Target (or its name). Returns {first result name of each node: kernel
    name}. Raises CPUBackendError for a node whose op has no kernel (the caller lists it as
    a host fallback and leaves it out).
    """
    import tvm
    import tvm_ffi

    from qcompiler.codegen.cpu.host import tvm_target
    from qcompiler.targets import get_target

    if isinstance(target, str):
        target = get_target(target)
    params = params_for(target)
    funcs: dict = {}
    names: dict = {}
    for node in nodes:
        name, func = primfunc_for(node, params, module)
        if name in funcs:
            if not tvm_ffi.structural_equal(funcs[name], func):
                raise CPUBackendError(f"%{node.results[0].name} = {node.op}: kernel {name} "
                                      "differs from an earlier kernel of the same name")
        else:
            funcs[name] = func
        names[node.results[0].name] = name
    if not funcs:
        raise CPUBackendError("no op kernels to build")
    ex = tvm.compile(tvm.IRModule(funcs), target=tvm_target(target))
    ex.export_library(path)
    return names


def _aligned(a: np.ndarray) -> bool:
    return a.ctypes.data % 64 == 0 and a.flags.c_contiguous


def _tensor_if_aligned(a: np.ndarray):
    """A tvm tensor viewing ``a`` when ``a`` is 64-byte aligned and C-contiguous, else None.
    The address is read from the tensor: ``a.ctypes.data`` builds a ctypes object per access
    (2.1 us on a Zen 4, against 0.5 us for the tensor and its ``data_ptr``), and a decode
    loop wraps a few dozen arrays a token."""
    import tvm_ffi

    if not a.flags.c_contiguous:
        return None
    t = tvm_ffi.from_dlpack(a)
    return t if t.data_ptr() % 64 == 0 else None


class OpsLibrary:
    """The loaded library: ``lib[kernel_name](*operands, *results)``."""

    def __init__(self, path: str):
        default_pool_size()
        import tvm

        self.module = tvm.runtime.load_module(path)
        self._calls: dict = {}
        self._functions: dict = {}
        # arrays ``bind`` wrapped, by identity, least recently used first; an entry keeps its
        # array, so the id is not reused while it is cached. A decode loop's new signature
        # rebinds a few steps a token, and most of their arrays (weights, arena views that
        # did not move) are the objects an earlier binding wrapped.
        self._wrapped: OrderedDict = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return self.module.implements_function(name) if hasattr(
            self.module, "implements_function") else name in self.names()

    def names(self) -> list:
        return [n for n in self._calls]

    def function(self, name: str):
        """The raw TVM function (takes tvm tensors from ``wrap`` or numpy arrays)."""
        fn = self._functions.get(name)
        if fn is None:
            try:
                fn = self._functions[name] = self.module[name]
            except Exception:
                raise CPUBackendError(f"the op library has no kernel {name}") from None
        return fn

    def __getitem__(self, name: str):
        """``call(*arrays)``: numpy operands then results, passed without copies.

        Measured per call from Python (a [1, 13] add, this 2-core VM): 11 us through this
        callable, 7 us for the raw function on numpy arrays, 27 us when every array is first
        wrapped with from_dlpack (7 us each), 5 us with tensors wrapped once (``bind``).
        """
        call = self._calls.get(name)
        if call is None:
            fn = self.function(name)

            def call(*arrays):
                fn(*[as_kernel_arg(a) for a in arrays])

            self._calls[name] = call
        return call

    def bind(self, name: str, arrays: list):
        """A no-argument call of kernel ``name`` on ``arrays`` wrapped once (for buffers that
        stay put, such as a plan's arena): the cheapest call from Python."""
        from qcompiler.codegen.cpu.native_calls import KernelCall

        return KernelCall(self.function(name), [self._wrap_kept(a) for a in arrays])

    # Arrays kept wrapped (``_wrapped``): a few tokens' worth of a 22-layer decode step's
    # rebindings (~300 arrays a token). An entry keeps its array, and through it the arena it
    # views, alive: a small bound keeps that to an arena or two past the executor's own.
    WRAPPED_MAX = 1024

    def _wrap_kept(self, a):
        if not isinstance(a, np.ndarray):
            return a
        hit = self._wrapped.get(id(a))
        if hit is not None:
            self._wrapped.move_to_end(id(a))
            return hit[1]
        t = wrap(a)
        self._wrapped[id(a)] = (a, t)
        if len(self._wrapped) > self.WRAPPED_MAX:
            self._wrapped.popitem(last=False)
        return t


def as_kernel_arg(a):
    """The cheapest zero-copy argument: numpy itself where DLPack takes its dtype."""
    if isinstance(a, np.ndarray) and (a.size == 0 or a.dtype in (np.bool_, BFLOAT16)
                                      or a.dtype in NARROW_FLOATS):
        return wrap(a)
    return a


def wrap(a: np.ndarray):
    """A tvm tensor viewing ``a`` (no copy) when it is 64-byte aligned and contiguous;
    otherwise the array itself (TVM reads a numpy array through DLPack, also without a copy).

    numpy's DLPack has no bool and no bfloat16: bool arrays go as uint8 (the kernels' bool
    buffers are uint8), bfloat16 ones as a uint16 tensor re-typed in place (aligned only).
    """
    if not isinstance(a, np.ndarray):
        return a
    if a.size == 0:  # numpy's strides of a 0-size array are not "compact" to TVM: no data
        import tvm

        return tvm.runtime.empty(a.shape, "uint8" if a.dtype == np.bool_ else str(a.dtype))
    if a.dtype == np.bool_ or a.dtype in NARROW_FLOATS:
        a = a.view(np.uint8)
    if a.dtype == BFLOAT16:
        import tvm

        if not _aligned(a):
            raise CPUBackendError("bfloat16 arrays must be 64-byte aligned and contiguous to "
                                  "reach a CPU op kernel (codegen.cpu.runtime.aligned_empty)")
        return tvm.runtime.from_dlpack(a.view(np.uint16))._create_view(a.shape, "bfloat16")
    t = _tensor_if_aligned(a)
    return a if t is None else t


def aligned_like(shape, dtype) -> np.ndarray:
    from qcompiler.codegen.cpu.runtime import aligned_empty

    return aligned_empty(tuple(shape), dtype)


__all__ = ["build_ops_library", "OpsLibrary", "wrap", "aligned_like"]
