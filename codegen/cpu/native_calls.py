"""Calling a plan's compiled CPU kernels from native code: one call from Python per run of
consecutive kernels instead of one per kernel.

A bound kernel call from Python pays for tvm-ffi's argument conversion and Python's own
call, about a microsecond, which weighs where the kernels are small: all-MiniLM-L6-v2 at 1x16
took 1.39 ms per run with one Python call per kernel and 1.31 ms with this (a Zen 5, one
thread); a 4-layer Llama decode step (about 60 kernels of 0.1 ms) gains 1-2 %, a batch-1
ResNet-18 (30 kernels) less than that. Here a step's bound call is a ``KernelCall`` (a
TVM FFI function and its arguments, wrapped once), and the executor hands each run of such
calls to ``NativeCalls``: a table of (function handle, packed arguments) that a small C
function walks with ``TVMFFIFunctionCall``, the same entry point Python's call ends in, with
the same argument values (tensor objects and integers).

The C function is compiled once per source, tvm-ffi header and compiler into the build cache
(``codegen.build.cache_dir()``), with the host's C compiler (``$CC``, else ``cc``: the same one
TVM links the kernels with). Where that fails, ``available()`` is False with the reason, and
the executor keeps calling the kernels from Python. ``QC_NATIVE_CALLS=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import subprocess
import tempfile
from typing import Optional

ENV = "QC_NATIVE_CALLS"

# tvm-ffi's C ABI (tvm/ffi/c_api.h): TVMFFIAny is a type index, 4 bytes of padding and an
# 8-byte value (an int64 or an object handle).
TYPE_INT = 1            # kTVMFFIInt
TYPE_OBJECT_BEGIN = 64  # kTVMFFIStaticObjectBegin: owned objects from here on
TYPE_TENSOR = 70        # kTVMFFITensor

SOURCE = r"""
/* qcompiler: run a table of TVM FFI calls in order (codegen/cpu/native_calls.py). */
#include <stdint.h>
#include <tvm/ffi/c_api.h>

typedef struct {
  TVMFFIObjectHandle fn;  /* a tvm_ffi.Function */
  TVMFFIAny* args;        /* its arguments, packed once */
  int32_t num_args;
} qc_call;

/* Calls calls[0..n) in order; on an error returns its code with *failed = its index (the
   error stays raised in tvm-ffi's thread-local slot, where Python's next call to the same
   function finds it again). A kernel returns nothing; an object it returned is released. */
int qc_run_calls(const qc_call* calls, int64_t n, int64_t* failed) {
  for (int64_t i = 0; i < n; ++i) {
    TVMFFIAny result;
    result.type_index = kTVMFFINone;
    result.zero_padding = 0;
    result.v_int64 = 0;
    int rc = TVMFFIFunctionCall(calls[i].fn, calls[i].args, calls[i].num_args, &result);
    if (rc != 0) {
      *failed = i;
      return rc;
    }
    if (result.type_index >= kTVMFFIStaticObjectBegin) TVMFFIObjectDecRef(result.v_obj);
  }
  return 0;
}
"""


class _Any(ctypes.Structure):
    _fields_ = [("type_index", ctypes.c_int32), ("zero_padding", ctypes.c_uint32),
                ("value", ctypes.c_uint64)]


class _Call(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("args", ctypes.POINTER(_Any)),
                ("num_args", ctypes.c_int32)]


_lib = None
_why_not: Optional[str] = None


def _build() -> ctypes.CDLL:
    import tvm_ffi.libinfo as info

    from qcompiler.codegen.build import cache_dir

    include = info.find_include_path()
    libffi = info.find_libtvm_ffi()
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE, include, libffi, cc]).encode()).hexdigest()[:16]
    out_dir = os.path.join(cache_dir(), "native")
    path = os.path.join(out_dir, f"qc_calls_{key}.so")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src, tmp_so = os.path.join(tmp, "qc_calls.c"), os.path.join(tmp, "qc_calls.so")
            with open(src, "w") as f:
                f.write(SOURCE)
            cmd = [cc, "-O2", "-shared", "-fPIC", "-std=c11", f"-I{include}",
                   "-I" + info.find_dlpack_include_path(), src, "-o", tmp_so, libffi,
                   "-Wl,-rpath," + os.path.dirname(libffi)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()[-400:]}")
            os.replace(tmp_so, path)  # atomic: a concurrent build writes the same bytes
    lib = ctypes.CDLL(path)
    lib.qc_run_calls.argtypes = [ctypes.POINTER(_Call), ctypes.c_int64,
                                 ctypes.POINTER(ctypes.c_int64)]
    lib.qc_run_calls.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether runs of kernel calls go through the C loop (built on first use)."""
    global _lib, _why_not
    if os.environ.get(ENV, "1") == "0":
        return False
    if _lib is None and _why_not is None:
        try:
            _lib = _build()
        except Exception as e:  # no compiler, no tvm-ffi headers: Python calls the kernels
            _why_not = f"{type(e).__name__}: {e}"
    return _lib is not None


def why_not() -> Optional[str]:
    """Why ``available()`` is False (None when it is True or was not asked)."""
    return _why_not


_tensor_type = None  # tvm_ffi.Tensor, imported on first use


def _packed(arg) -> Optional[tuple]:
    """(type index, value) of an argument the C loop can pass as Python would, else None."""
    global _tensor_type
    if _tensor_type is None:
        import tvm_ffi

        _tensor_type = tvm_ffi.Tensor
    if isinstance(arg, _tensor_type):
        return TYPE_TENSOR, arg.__chandle__()
    if isinstance(arg, int) and not isinstance(arg, bool) and -2 ** 63 <= arg < 2 ** 63:
        return TYPE_INT, arg & (2 ** 64 - 1)
    return None


_UNKNOWN = object()


class KernelCall:
    """``fn(*args)`` of a compiled kernel with its arguments wrapped once (a bound plan step).
    Its arguments never change, so whether it can be called from C, and its packed entry of
    a table, are worked out once: a new signature of a decode loop rewrites only the entries
    of its changed calls, in copies of their runs' tables (``Batched.updated``)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, tuple(args)
        self._native = _UNKNOWN
        self._packed = None  # per argument (type index, value), once ``native`` looked
        self._entry = None

    def __call__(self) -> None:
        self.fn(*self.args)

    @property
    def native(self) -> Optional[list]:
        """[self] when every argument is a tvm tensor or an integer, else None."""
        if self._native is _UNKNOWN:
            packed = [_packed(a) for a in self.args]
            self._native = None if None in packed else [self]
            self._packed = packed
        return self._native

    def entry(self) -> "_Call":
        """Its entry of a ``NativeCalls`` table (the packed arguments kept here)."""
        if self._entry is None:
            if self.native is None:
                raise ValueError("a kernel call with arguments other than tensors and "
                                 "integers has no entry in a native table")
            packed = self._packed
            # one struct.pack of every (type index, padding, value) rather than a ctypes
            # structure per argument (a decode loop packs a few calls a token)
            flat = [x for t, v in packed for x in (t, 0, v)] or [0, 0, 0]
            self._packed_args = (_Any * max(len(packed), 1)).from_buffer_copy(
                struct.pack("<" + "iIQ" * max(len(packed), 1), *flat))
            self._entry = _Call(self.fn.__chandle__(), self._packed_args, len(packed))
        return self._entry


class CallSequence:
    """Bound calls run one after the other (a qmatmul's prologue, kernel and epilogue)."""

    def __init__(self, calls):
        self.calls = list(calls)
        self._native = _UNKNOWN

    def __call__(self) -> None:
        for call in self.calls:
            call()

    @property
    def native(self) -> Optional[list]:
        if self._native is _UNKNOWN:
            parts = [getattr(c, "native", None) for c in self.calls]
            self._native = None if any(p is None for p in parts) else \
                [k for p in parts for k in p]
        return self._native


def native_calls(call) -> Optional[list]:
    """The KernelCalls a bound call consists of, or None if any part needs Python."""
    return getattr(call, "native", None)


class NativeCalls:
    """A run of KernelCalls as one C call (``available()`` must be True)."""

    def __init__(self, calls: list, table=None):
        # self.calls keeps the KernelCalls, which keep their packed arguments and through
        # them the objects those name
        self.calls = list(calls)
        if table is None:
            table = (_Call * len(self.calls))(*[k.entry() for k in self.calls])
        self._table = table
        self._failed = ctypes.c_int64(-1)

    def patched(self, replaced: dict) -> "NativeCalls":
        """A new run with the KernelCalls at the indices of ``replaced`` ({index: call})
        replaced: this table copied (one memmove) and those entries rewritten. This run is
        left as it is (the call list of an earlier signature may still hold it)."""
        calls = list(self.calls)
        table = type(self._table).from_buffer_copy(self._table)
        for i, k in replaced.items():
            calls[i] = k
            table[i] = k.entry()
        return NativeCalls(calls, table)

    def __call__(self) -> None:
        rc = _lib.qc_run_calls(self._table, len(self.calls), ctypes.byref(self._failed))
        if rc != 0:
            # the same call from Python raises the kernel's error with its message
            self.calls[self._failed.value]()
            raise RuntimeError(f"kernel call {self._failed.value} of a native run failed "
                               f"(code {rc}) and did not fail again from Python")


class Batched:
    """A plan's step calls in order (``source``) as ``calls``: each run of two or more
    consecutive native-capable calls replaced by one ``NativeCalls`` (``calls`` is
    ``source`` itself where ``available()`` is False).

    ``updated(source, changed)`` gives the list of a new input signature from this one
    (``changed``: the positions whose calls differ): a run whose changed calls stay native
    with as many KernelCalls gets a copy of its table with their entries rewritten, and
    every other run is kept; only when a call changes whether it can run from C is the list
    batched again. A decode loop's new signature (one more KV position) changes a few calls
    of a few hundred, and this keeps its work proportional to those."""

    def __init__(self, source: list):
        self.source = list(source)
        # per segment: (first position, end position, its callable, per call of a run the
        # index of its first KernelCall in the run's table, or None for a lone call)
        self.segments: list = []
        self._segment_of: list = []  # position -> index of its segment
        if not available():
            self.calls = self.source
            return
        start, kernels = None, []

        def close(end: int) -> None:
            if start is None:
                return
            if end - start > 1:
                offsets = []
                for call in self.source[start:end]:
                    offsets.append(len(kernels))
                    kernels.extend(native_calls(call))
                self._add(start, end, NativeCalls(list(kernels)), offsets)
                kernels.clear()
            else:
                self._add(start, end, self.source[start], None)

        for pos, call in enumerate(self.source):
            if native_calls(call) is not None:
                if start is None:
                    start = pos
                continue
            close(pos)
            start = None
            self._add(pos, pos + 1, call, None)
        close(len(self.source))
        self.calls = [seg[2] for seg in self.segments]

    def _add(self, lo: int, hi: int, call, offsets) -> None:
        self._segment_of.extend([len(self.segments)] * (hi - lo))
        self.segments.append((lo, hi, call, offsets))

    def updated(self, source: list, changed) -> "Batched":
        if not available() or len(source) != len(self.source):
            return Batched(source)
        by_segment: dict = {}
        for pos in changed:
            if source[pos] is not self.source[pos]:
                by_segment.setdefault(self._segment_of[pos], []).append(pos)
        if not by_segment:
            return self
        segments = list(self.segments)
        for si, positions in by_segment.items():
            lo, hi, call, offsets = segments[si]
            if offsets is None:  # a lone call: still lone only if its nativeness stays
                if (native_calls(source[lo]) is None) != (native_calls(call) is None):
                    return Batched(source)
                segments[si] = (lo, hi, source[lo], None)
                continue
            replaced = {}
            for pos in positions:
                new, old = native_calls(source[pos]), native_calls(self.source[pos])
                if new is None or len(new) != len(old):
                    return Batched(source)
                first = offsets[pos - lo]
                replaced.update((first + j, k) for j, k in enumerate(new))
            segments[si] = (lo, hi, call.patched(replaced), offsets)
        out = Batched.__new__(Batched)
        out.source, out.segments, out._segment_of = list(source), segments, self._segment_of
        out.calls = [seg[2] for seg in segments]
        return out


def batched(calls: list) -> list:
    """``calls`` with each run of two or more consecutive native-capable calls replaced by
    one ``NativeCalls`` (unchanged where ``available()`` is False): ``Batched(calls).calls``."""
    return Batched(calls).calls
