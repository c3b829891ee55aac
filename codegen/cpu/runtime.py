"""Packing, building, loading and calling the CPU kernels; the numpy model of their numerics.

One shared library per qmatmul holds one function per variant (``qmm_v0`` ...); each serves a
range of batch sizes M (``variant["max_m"]``, 0 = no bound), so M is symbolic: the runner pads
M to the variant's ``m_block`` and calls the function, nothing is compiled at run time.

Per call the runner prepares the activations in reused 64-byte aligned buffers that TVM
wraps without copies (act-order permutation of the columns, zero padding of K; for the exact
path the per-group sums and, with m_block > 1, the k-major copy of each row block; for the
int8 path the compiled ``qmm_quantize`` prologue quantizes per row and group), calls the
kernel and the caller adds the bias. Threads: the TVM thread pool, sized by
``set_num_threads`` or ``TVM_NUM_THREADS`` (the backend's runner reads ``QC_CPU_THREADS``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Optional

import numpy as np

from qcompiler.codegen.cpu import kernels, layout
from qcompiler.runtime import numerics
# The int8 path's activation quantization (shared with the CUDA int8 kernel's model).
from qcompiler.runtime.numerics import INT8_MAX, quantize_int8_groups as quantize_groups  # noqa: F401



def default_pool_size() -> None:
    """Let TVM's thread pool reach every CPU this process may use.

    TVM sizes its pool once, when first used, from TVM_NUM_THREADS or else its count of
    physical cores, which is 1 on some VMs with 2 vCPUs; ``set_num_threads`` can only shrink
    it afterwards. An explicit TVM_NUM_THREADS is respected.
    """
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))


def import_tvm() -> None:
    """Import TVM without the torch import that tvm_ffi adds when torch is installed.

    tvm_ffi imports torch first thing (a workaround for a symbol clash seen on Windows only),
    which took 3 of the 4.6 s of a whole warm MiniLM compile here. The kernels never use
    torch; a process that imported torch itself keeps it, and torch imported later works.
    """
    if "tvm" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tvm_ffi expects
    try:
        import tvm  # noqa: F401
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def set_num_threads(n: int) -> int:
    """Size the TVM thread pool used by the kernels (0: all of it); returns the size."""
    default_pool_size()
    import tvm  # noqa: F401  (loads the runtime that registers the functions)
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(0, int(n))
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def pool_threads() -> int:
    """The TVM thread pool's size now."""
    import tvm  # noqa: F401
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


# --------------------------------------------------------------------------------------------
# packing (shared by the cpu-pack-weights pass and the tuner)
# --------------------------------------------------------------------------------------------


def pack_weights(p, q: np.ndarray, scale: np.ndarray, zp: Optional[np.ndarray],
                 g_idx: Optional[np.ndarray]) -> dict:
    """Logical ``[K, N]`` codes and their scale/zero point -> the arrays the kernel reads.

    Returns {"w": packed codes, "s": scales (float32), "zc": zero points in container units
    (uint8), both [tiles, groups, n_tile], "perm": the act-order row permutation or None,
    "zero_code": the zero code all real columns share, or None}.
    """
    scheme, bl = p.scheme, p.blocking
    perm = None
    if scheme.act_order:
        perm = layout.act_order_permutation(g_idx, bl.block, p.k)
        q = np.asarray(q)[perm]
    s, zc = layout.group_params(scheme, scale, zp, p.k, p.n, bl.groups)
    zc = layout.zero_codes(zc)
    u = layout.pad_to(layout.container_codes(scheme, q), (bl.k_pad, p.n_pad))
    cbits = p.container_bits
    if p.numerics == "lut":
        w = layout.pack_lut(u, p.container_bits, p.table_group, p.n_tile, p.lanes,
                            p.single_quads)
    elif p.numerics == "int8":
        w = layout.pack_vnni(u, p.n_tile, cbits)
    else:
        w = layout.pack_exact(u, p.n_tile, cbits)
    return {"w": w,
            "s": layout.tile_columns(layout.pad_to(s, (bl.groups, p.n_pad)), p.n_tile),
            "zc": layout.tile_columns(layout.pad_to(zc, (bl.groups, p.n_pad)), p.n_tile),
            "perm": perm,
            # padded columns' zero codes are 0, and their outputs are never read: the shared
            # code is decided on the real columns
            "zero_code": layout.uniform_zero_code(zc)}


def f16_scale_kernels(p) -> bool:
    """Whether ``p``'s kernels take f16 scales where the scales fit: the x86 int8 and lut
    ones (Arm keeps float32)."""
    if p.numerics == "lut":
        return p.lanes != layout.NEON_LUT_BYTES
    return p.numerics == "int8" and p.lanes in (layout.VNNI_LANES, layout.AVX2_INT8_LANES)


def lut_zero_terms(p, s: np.ndarray, zc) -> np.ndarray:
    """The lut kernel's zero-point factors ``zt = s (center - zc)`` (float32; ``kernels.py``'s
    lut section) of the packed scales ``s`` and zero codes ``zc``."""
    return (np.asarray(s, np.float32)
            * (np.float32(kernels.lut_center(p.container_bits))
               - np.asarray(zc).astype(np.float32)))


def store_scales(p, packed: dict, scale_dtype: str = "auto") -> tuple:
    """(p, packed) with the scales as cpu-pack-weights stores them: float16 for the x86 int8
    and lut kernels where every scale is 0 or an f16 normal (``layout.f16_scales_fit``: a
    relative rounding of at most 2^-11; for lut its zero-point factors ``lut_zero_terms``
    too, which the kernel reads as f16 beside them), with ``p.scale_dtype`` saying so;
    otherwise (exact numerics, Arm, scales out of range, ``scale_dtype="f32"``) both
    unchanged."""
    if scale_dtype != "auto" or not f16_scale_kernels(p):
        return p, packed
    s = np.asarray(packed["s"])
    fits = layout.f16_scales_fit(s)
    if fits and p.numerics == "lut":
        # zt computed from the f16 scales, as kernel_weights computes it at load
        fits = layout.f16_scales_fit(lut_zero_terms(p, s.astype(np.float16), packed["zc"]))
    if fits:
        return dataclasses.replace(p, scale_dtype="float16"), {**packed, "s": s.astype(np.float16)}
    return p, packed


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def scheduled_source(ks: kernels.KernelShape, variants: list[dict]) -> str:
    """The scheduled TensorIR of all variants as TVMScript (for people and golden tests)."""
    return kernels.build_module(ks, variants).script()


def llvm_target_string(target) -> str:
    """The TVM LLVM target of ``target`` as text (part of a kernel's build key)."""
    from qcompiler.codegen.cpu.host import tvm_target

    return str(tvm_target(target))


def kernel_build_key(source: str, target) -> str:
    """The build key of a kernel (``qcompiler.codegen.build.kernel_key``): its scheduled
    TensorIR text, the LLVM target string and the TVM version."""
    import tvm

    from qcompiler.codegen.build import kernel_key

    return kernel_key(source, llvm_target_string(target), f"tvm {tvm.__version__}")


def source_file_text(name: str, source: str) -> str:
    """The readable ``<name>.tir.py`` written beside a library."""
    import tvm

    return (f"# Scheduled TensorIR of {name} (TVMScript, tvm {tvm.__version__}); each function "
            f"is one variant.\n{source}\n")


def compile_library(ks: kernels.KernelShape, variants: list[dict], target, path: str) -> str:
    """Compile the variants with LLVM for ``target`` into the shared library ``path``.

    Module-level and with picklable arguments: ``qcompiler.codegen.build`` may run it in a
    worker process (``functools.partial(compile_library, ks, variants, target)``)."""
    import tvm

    from qcompiler.codegen.cpu.host import tvm_target

    ex = tvm.compile(kernels.build_module(ks, variants), target=tvm_target(target))
    export_library(ex, path, target)
    return path


def export_library(executable, path: str, target) -> None:
    """Link ``executable`` into the shared library ``path``: with the host's compiler, or for
    a cross-compiled target (Arm) with its cross compiler (``host.cross_compiler``)."""
    from qcompiler.codegen.cpu.host import cross_compiler

    cc = cross_compiler(target)
    if cc is None:
        executable.export_library(path)
    else:
        executable.export_library(path, cc=cc)


def build_library(ks: kernels.KernelShape, variants: list[dict], target, stem: str,
                  write_source: bool = False) -> str:
    """Compile the variants with LLVM for ``target``; write ``stem.so`` (and ``stem.tir.py``)."""
    if write_source:
        with open(stem + ".tir.py", "w") as f:
            f.write(source_file_text(os.path.basename(stem), scheduled_source(ks, variants)))
    return compile_library(ks, variants, target, stem + ".so")


# --------------------------------------------------------------------------------------------
# calling
# --------------------------------------------------------------------------------------------


def variant_list(config: dict) -> list[dict]:
    """The variants of a qmatmul config in order (stored as ``{"v0": {...}, "v1": ...}``:
    the IR's attribute syntax has dicts of dicts but no lists of dicts)."""
    vs = config["variants"]
    return [vs[f"v{i}"] for i in range(len(vs))]


def choose_variant(variants: list[dict], m: int) -> int:
    """The first variant whose ``max_m`` bounds m (variants are sorted; 0 = unbounded)."""
    for i, v in enumerate(variants):
        if v["max_m"] == 0 or m <= v["max_m"]:
            return i
    return len(variants) - 1


def aligned_empty(shape, dtype) -> np.ndarray:
    """A numpy array whose data is 64-byte aligned (TVM wraps such arrays without a copy)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes].view(dtype).reshape(shape)


class _Buffers:
    """The activation and output buffers of one (variant, padded M), wrapped once for TVM."""

    def __init__(self, p, m_pad: int, m_block: int, row_major: bool = False):
        import tvm

        bl = p.blocking
        groups = bl.groups
        self.x = aligned_empty((m_pad, bl.k_pad), np.float32)
        self.x[:] = 0  # K padding stays zero: padded codes meet zero activations
        self.xsum = aligned_empty((m_pad, groups), np.float32)
        arrays = []
        if p.numerics == "int8":
            self.xq = aligned_empty((m_pad, bl.k_pad), np.int8)
            self.x_scale = aligned_empty((m_pad, groups), np.float32)
            arrays = [self.xq, self.xsum, self.x_scale]
            shapes = [(m_pad // m_block, m_block, a.shape[1]) for a in arrays]
        else:
            # the exact kernel reads x k-major per row block: [m_outer, k_pad, m_block]
            # (row-major [m_outer, m_block, k_pad] for kernels.x_row_major variants)
            self.x_kmajor = (self.x if row_major or m_block == 1 else
                             aligned_empty((m_pad // m_block, bl.k_pad, m_block), np.float32))
            arrays = [self.x_kmajor, self.xsum]
            shapes = [(m_pad // m_block, m_block, bl.k_pad) if row_major else
                      (m_pad // m_block, bl.k_pad, m_block), (m_pad // m_block, m_block, groups)]
        self.y = aligned_empty((m_pad, p.n_pad), np.float32)
        # the kernel's arguments as numpy views (row chunks are slices of them) and wrapped
        self.np_args = [a.reshape(s) for a, s in zip(arrays, shapes)]
        self.args = [tvm.runtime.from_dlpack(a) for a in self.np_args]
        self.own_x_arg, self.own_x_np, self.x_shape = self.args[0], self.np_args[0], shapes[0]
        if p.numerics == "int8":  # the quantization prologue's 2-D views of the same memory
            self.quant_args = [tvm.runtime.from_dlpack(a) for a in
                               (self.x, self.xq, self.x_scale, self.xsum)]
        self.out = tvm.runtime.from_dlpack(self.y.reshape(m_pad // m_block, m_block, p.n_pad))


# Largest |scale| given to a kernel: the exact path's intermediate sums reach about
# |scale| x 2 x sum|x| (its codes are 1 + u/2^cb), so keep 2^24 below the float32 limit.
SCALE_LIMIT = float(np.finfo(np.float32).max) / 2.0 ** 24


def output_factor(scales: np.ndarray) -> float:
    """The power of two the exact kernel's output is multiplied by: 1 unless the largest
    scale (float64, with its 2^cb factor) exceeds ``SCALE_LIMIT``, then 2^e bringing it below."""
    top = float(np.max(np.abs(scales), initial=0.0))
    if not np.isfinite(top) or top <= SCALE_LIMIT:
        return 1.0
    return 2.0 ** math.ceil(math.log2(top / SCALE_LIMIT))


def kernel_weights(p, packed: dict) -> tuple:
    """(w, s, zc, output factor): the packed weights as the kernel's arguments read them
    (numpy, contiguous), and the power of two its output is multiplied by. Shared by
    ``QmmKernel``, ``LutKernel`` and the Arm tests, which call the kernel under qemu without
    TVM. The lut kernel takes in zc's place the zero-point term's factors
    ``zt = s (center - zc)`` (``lut_zero_terms``), computed here once, in the scales' type."""
    if p.numerics == "lut":
        rows = p.blocking.k_pad // p.table_group  # table groups (quads: quads of them)
        w = np.asarray(packed["w"]).view(np.uint8).reshape(
            p.n_pad // p.n_tile, rows // kernels.LUT_QUAD if p.single_quads else rows, -1)
        dtype = np.float16 if p.scale_dtype == "float16" else np.float32
        s = np.ascontiguousarray(packed["s"], dtype)
        zt = lut_zero_terms(p, s, packed["zc"])
        # scales meet int32 sums times a table scale: no 2^cb factor. f16: store_scales
        # checked that every zt is an f16 normal or 0.
        return np.ascontiguousarray(w), s, np.ascontiguousarray(zt, dtype), 1.0
    s = np.asarray(packed["s"], np.float64)
    # The IR stores the codes 2-D ([tiles, bytes of a tile]); the kernel reads them as
    # [tiles, k_pad/r, n_tile] words (exact) or [tiles, k_pad/4c, n_tile, 4] bytes (int8).
    c = 8 // p.container_bits
    bl = p.blocking
    raw = np.asarray(packed["w"]).view(np.uint8)
    if p.numerics == "int8":
        w = raw.reshape(p.n_pad // p.n_tile, bl.k_pad // (4 * c), p.n_tile, 4)
    else:
        r = 32 // p.container_bits
        w = raw.view(np.uint32).reshape(p.n_pad // p.n_tile, bl.k_pad // r, p.n_tile)
        # codes arrive as f = 1 + u/2^cb: (u - zc) s = 2^cb s (f - 1 - zc/2^cb). The 2^cb
        # goes into the scales (float64 here). Scales near the float32 limit (either path):
        # the kernel runs on scales / 2^e and its output is multiplied by 2^e (powers of
        # two: exact), so no intermediate overflows where the result is finite.
        s = s * float(1 << p.container_bits)
    factor = output_factor(s)
    s = s / factor
    w = np.ascontiguousarray(w)
    # f16 scales (int8 kernels, cpu-pack-weights' scale_dtype): factor 1 (f16 is far below
    # SCALE_LIMIT), so stored f16 values convert back exactly
    s = np.ascontiguousarray(s, np.float16 if p.scale_dtype == "float16" else np.float32)
    zc = np.ascontiguousarray(np.asarray(packed["zc"]).astype(np.uint8))
    return w, s, zc, factor


class QmmKernel:
    """A loaded qmatmul kernel: ``kernel(x [M, K] float32) -> [M, N] float32`` (no bias)."""

    def __new__(cls, lib_path: str, p, *args, **kwargs):
        # numerics=lut has its own prologue and arguments (LutKernel, below)
        if cls is QmmKernel and p.numerics == "lut":
            cls = LutKernel
        return super().__new__(cls)

    def __init__(self, lib_path: str, p, variants: list[dict], packed: dict):
        default_pool_size()
        import tvm

        self.p = p
        self.variants = variants
        self.lib = tvm.runtime.load_module(lib_path)
        self.funcs = [self.lib[kernels.function_name(i)] for i in range(len(variants))]
        self.quantize = self.lib[kernels.QUANTIZE_FUNC] if p.numerics == "int8" else None
        self.quantize_rows = self.lib[kernels.QUANTIZE_ROWS_FUNC] if p.numerics == "int8" \
            else None
        w, s, zc, self.out_factor = kernel_weights(p, packed)
        self.weights = [tvm.runtime.tensor(a) for a in (w, s, zc)]
        self.perm = packed.get("perm")
        self._ones = np.ones(self.p.blocking.block, np.float32)
        self._buffers: dict = {}
        ks = p.kernel_shape()
        self._chunks = [kernels.chunk_blocks(ks, v) for v in variants]

    def quantizer(self, rows: int):
        """The int8 prologue for a call of ``rows`` rows: over the thread pool for many rows
        and more than one thread, else serial (one thread: no pool to wake)."""
        if rows >= kernels.QUANTIZE_PARALLEL_ROWS and pool_threads() > 1:
            return self.quantize_rows
        return self.quantize

    def prepare(self, x: np.ndarray):
        """(variant index, buffers, M): x written into the kernel's activation buffers."""
        p, bl = self.p, self.p.blocking
        m = x.shape[0]
        vi = choose_variant(self.variants, m)
        mb = self.variants[vi]["m_block"]
        m_pad = -(-max(m, 1) // mb) * mb
        row_major = kernels.x_row_major(p.numerics, self.variants[vi])
        buf = self._buffers.get((vi, m_pad))
        if buf is None:
            buf = self._buffers[(vi, m_pad)] = _Buffers(p, m_pad, mb, row_major)
        if p.numerics == "int8":
            if (self.perm is None and p.k == bl.k_pad and m == m_pad and x.nbytes >= 65536
                    and x.flags.c_contiguous and x.ctypes.data % 64 == 0):
                # the prologue reads the caller's rows (a large copy saved; for small x the
                # copy costs less than wrapping x)
                import tvm

                self.quantizer(m)(tvm.runtime.from_dlpack(x), *buf.quant_args[1:])
                return vi, buf, m
            buf.x[:m, :p.k] = x if self.perm is None else x[:, self.perm]
            buf.x[m:] = 0
            self.quantizer(m_pad)(*buf.quant_args)
            return vi, buf, m
        if self.perm is None and p.k == bl.k_pad and m == m_pad and x.flags.c_contiguous:
            # No padding to add: the group sums and the k-major blocks come straight from x.
            src = x
        else:
            buf.x[:m, :p.k] = x if self.perm is None else x[:, self.perm]
            buf.x[m:] = 0
            src = buf.x
        # The group sums as a matrix-vector product: 20x faster than np.sum over the last
        # axis of [M, G, block] (measured 28 vs 572 us at M=256, K=384, block 32).
        if self.variants[vi]["order"] != "dequant":  # the dequant kernel does not read xsum
            np.matmul(src.reshape(-1, bl.block), self._ones, out=buf.xsum.reshape(-1))
        if not row_major and mb > 1:
            np.copyto(buf.x_kmajor, src.reshape(m_pad // mb, mb, bl.k_pad).transpose(0, 2, 1))
        elif src is not buf.x:
            if row_major and src.ctypes.data % 64 == 0:
                # the caller's rows as they are (no copy): wrapped for this call only
                import tvm

                buf.np_args[0] = src.reshape(buf.x_shape)
                buf.args[0] = tvm.runtime.from_dlpack(buf.np_args[0])
                return vi, buf, m
            np.copyto(buf.x, src)
        buf.args[0], buf.np_args[0] = buf.own_x_arg, buf.own_x_np
        return vi, buf, m

    def direct_output(self, out: np.ndarray):
        """A tvm tensor over ``out`` ([M, N] float32) when the kernel can write its result
        there itself (N needs no padding, M is a multiple of its variant's m_block, out is
        64-byte aligned and the output factor is 1): then ``run_into`` copies nothing out."""
        import tvm

        m = out.shape[0]
        mb = self.variants[choose_variant(self.variants, m)]["m_block"]
        if (self.p.n_pad != self.p.n or m == 0 or m % mb or self.out_factor != 1.0
                or out.dtype != np.float32 or not out.flags.c_contiguous
                or out.ctypes.data % 64):
            return None
        return tvm.runtime.from_dlpack(out.reshape(m // mb, mb, self.p.n_pad))

    def _launch(self, vi: int, buf, out, out_rows) -> None:
        """The variant's kernel over every row block; with more row blocks than one chunk
        (``kernels.chunk_blocks``) one call per chunk of rows, on slices of the arguments:
        the chunk's activations stay in cache for every column tile (one call streams all of
        x once per column tile). ``out_rows``: ``out``'s memory as a numpy [rows, n_pad]."""
        per = self._chunks[vi]
        if per is None or buf.np_args[0].shape[0] <= per:
            self.funcs[vi](*buf.args, *self.weights, out)
            return
        import tvm

        wrap = tvm.runtime.from_dlpack
        blocks = buf.np_args[0].shape[0]
        out_np = out_rows.reshape(blocks, -1, self.p.n_pad)
        for c in range(0, blocks, per):
            self.funcs[vi](*[wrap(a[c:c + per]) for a in buf.np_args], *self.weights,
                           wrap(out_np[c:c + per]))

    def call_prepared(self, prepared) -> None:
        vi, buf, _ = prepared
        self._launch(vi, buf, buf.out, buf.y)

    def bind(self, x: np.ndarray, out: np.ndarray):
        """``run_into(x, out)`` as a no-argument call over arrays that stay put (a plan's
        arena views, bound once per input signature). Where the kernel can read x and write
        out in place (no padding, no permutation, one call for all rows, aligned views),
        everything but the per-call work is decided and wrapped here: the call is then the
        quantization prologue (int8) or the group sums (exact) and the kernel, with
        arguments wrapped once. Profiled on MiniLM at 1x16, ``prepare`` alone was 12-26 us
        of a 20-95 us call. Anything else goes through ``run_into`` per call."""
        direct = self.direct_output(out)
        call = self._bind_in_place(x, direct) if direct is not None else None
        if call is not None:
            return call
        run_into = self.run_into
        return lambda: run_into(x, out, direct)

    def _reads_in_place(self, x: np.ndarray) -> bool:
        """Whether the kernel (or its prologue) can take x's memory as it is: rows in order
        (no act-order permutation), no K padding, float32, C-contiguous, 64-byte aligned."""
        return (self.perm is None and self.p.k == self.p.blocking.k_pad and x.shape[0] > 0
                and x.dtype == np.float32 and x.flags.c_contiguous and x.ctypes.data % 64 == 0)

    def _bind_in_place(self, x: np.ndarray, direct):
        import tvm

        from qcompiler.codegen.cpu.native_calls import CallSequence, KernelCall

        p, bl = self.p, self.p.blocking
        m = x.shape[0]
        vi = choose_variant(self.variants, m)
        mb = self.variants[vi]["m_block"]
        per = self._chunks[vi]
        if not self._reads_in_place(x) or m % mb or (per is not None and m // mb > per):
            return None
        row_major = kernels.x_row_major(p.numerics, self.variants[vi])
        if p.numerics == "exact" and not (row_major or mb == 1):
            return None  # the k-major copy of x is per call: run_into does it
        buf = self._buffers.get((vi, m))
        if buf is None:
            buf = self._buffers[(vi, m)] = _Buffers(p, m, mb, row_major)
        fn = self.funcs[vi]
        if p.numerics == "int8":
            quantize = self.quantizer(m)
            quant_args = (tvm.runtime.from_dlpack(x), *buf.quant_args[1:])
            kernel_args = (*buf.args, *self.weights, direct)

            return CallSequence([KernelCall(quantize, quant_args), KernelCall(fn, kernel_args)])
        x_arg = tvm.runtime.from_dlpack(x.reshape(buf.x_shape))
        kernel_args = (x_arg, *buf.args[1:], *self.weights, direct)
        if self.variants[vi]["order"] == "dequant":  # reads no group sums
            return KernelCall(fn, kernel_args)
        groups, ones, xsum = x.reshape(-1, bl.block), self._ones, buf.xsum.reshape(-1)

        def call_exact():
            np.matmul(groups, ones, out=xsum)  # the group sums (see prepare)
            fn(*kernel_args)
        return call_exact

    def run_into(self, x: np.ndarray, out: np.ndarray, direct=None) -> None:
        """x [M, K] float32 -> ``out`` [M, N] float32 (a plan's out view). ``direct``: out as
        ``direct_output`` wrapped it (the kernel writes out itself); otherwise the copy of
        the kernel's padded output into ``out`` (scaled by the output factor) is the only
        copy."""
        prepared = self.prepare(x)
        if direct is not None:
            vi, buf, _ = prepared
            self._launch(vi, buf, direct, out)
            return
        self.call_prepared(prepared)
        y = prepared[1].y[:prepared[2], :self.p.n]
        if self.out_factor != 1.0:
            np.multiply(y, np.float32(self.out_factor), out=out)
        else:
            np.copyto(out, y)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.p.k:
            raise ValueError(f"the kernel takes x [M, {self.p.k}], got {x.shape}")
        y = np.empty((x.shape[0], self.p.n), np.float32)
        self.run_into(x, y)
        return y


def int8_activations(x: np.ndarray, block: int, k_pad: int, perm=None) -> np.ndarray:
    """x as the int8 path sees it: quantized per row and group of the kernel, dequantized.

    Groups are the kernel's (after the act-order permutation of the columns); the result is
    in x's own column order, float64.
    """
    x = np.asarray(x, np.float32)
    m, k = x.shape
    xp = np.zeros((m, k_pad), np.float32)
    xp[:, :k] = x if perm is None else x[:, perm]
    g = xp.reshape(m, k_pad // block, block)
    xq = np.empty(g.shape, np.int8)
    scale = np.empty(g.shape[:2], np.float32)
    quantize_groups(g, xq, scale)
    xd = (xq.astype(np.float64) * scale.astype(np.float64)[..., None]).reshape(m, k_pad)[:, :k]
    out = np.empty_like(xd)
    if perm is None:
        out[:] = xd
    else:
        out[:, perm] = xd
    return out


# --------------------------------------------------------------------------------------------
# the numpy model of the numerics, and the tolerance of a comparison
# --------------------------------------------------------------------------------------------


def dequantized(p, q, scale, zp, g_idx) -> np.ndarray:
    """The float64 weights ``[K, N]`` (exact dequantization)."""
    wf = numerics.dequantize(q, scale, zp, p.scheme, np.float64, g_idx=g_idx)
    return np.asarray(wf, np.float64)


def numpy_model(p, x, q, scale, zp, g_idx) -> np.ndarray:
    """What the kernel computes, in float64: x @ dequant(w), x quantized per group for int8."""
    x = np.asarray(x, np.float32)
    if p.numerics == "lut":
        return lut_model(p, x, q, scale, zp, g_idx)
    if p.numerics == "int8":
        perm = None
        if p.scheme.act_order:
            perm = layout.act_order_permutation(g_idx, p.blocking.block, p.k)
        x64 = int8_activations(x, p.blocking.block, p.blocking.k_pad, perm)
    else:
        x64 = x.astype(np.float64)
    return x64 @ dequantized(p, q, scale, zp, g_idx)


def tolerance(p, want: np.ndarray) -> float:
    """fp32 accumulation error bound for the kernel vs the float64 model of its numerics.

    The sums run over K terms in float32 (and over groups), so the error grows like
    sqrt(K) ulps of the largest partial sums; 1e-5 relative to max|y| times sqrt(K)/8 covers
    it with margin while catching any wrong code, scale or group (errors of order max|y|).
    """
    scale = float(np.abs(want).max()) if want.size else 1.0
    return 1e-5 * max(scale, 1e-3) * max(1.0, np.sqrt(p.k) / 8) * 4


# --------------------------------------------------------------------------------------------
# numerics=lut: the table prologue, the kernel, and their numpy model
# --------------------------------------------------------------------------------------------


class LutKernel(QmmKernel):
    """A loaded lut kernel (``QmmKernel(...)`` returns one for ``p.numerics == "lut"``): per
    call the compiled ``qmm_lut_tables`` builds each row's tables, their scales and the
    group sums of x, then the kernel looks them up. One row at a time: every variant is
    called the same way (``variant["m"]`` only picks the function)."""

    def __init__(self, lib_path: str, p, variants: list[dict], packed: dict):
        default_pool_size()
        import tvm

        self.p = p
        self.variants = variants
        self.lib = tvm.runtime.load_module(lib_path)
        self.funcs = [self.lib[kernels.function_name(i)] for i in range(len(variants))]
        self.tables = self.lib[kernels.LUT_TABLES_FUNC]
        w, s, zt, self.out_factor = kernel_weights(p, packed)
        self.weights = [tvm.runtime.tensor(a) for a in (w, s, zt)]
        self.perm = packed.get("perm")
        self._buffers: dict = {}
        self._chunks = [None] * len(variants)  # one row at a time: one call

    def _buffers_for(self, m: int) -> "_LutBuffers":
        buf = self._buffers.get(m)
        if buf is None:
            buf = self._buffers[m] = _LutBuffers(self.p, max(m, 1))
        return buf

    def prepare(self, x: np.ndarray):
        p = self.p
        m = x.shape[0]
        vi = choose_variant(self.variants, m)
        buf = self._buffers_for(m)
        buf.x[:m, :p.k] = x if self.perm is None else x[:, self.perm]
        self.tables(*buf.table_args)
        return vi, buf, m

    def _bind_in_place(self, x: np.ndarray, direct):
        """The bound call over x and out as they are: the table prologue reads the caller's
        rows and the kernel writes out (no copy of x, no per-call wrapping: at M = 1 a
        decode step's lut layers are mostly this overhead); None where x needs a copy
        (act-order, K padding, an unaligned view)."""
        import tvm

        from qcompiler.codegen.cpu.native_calls import CallSequence, KernelCall

        if not self._reads_in_place(x):
            return None
        m = x.shape[0]
        buf = self._buffers_for(m)
        vi = choose_variant(self.variants, m)
        tables = KernelCall(self.tables, (tvm.runtime.from_dlpack(x), *buf.table_args[1:]))
        return CallSequence([tables, KernelCall(self.funcs[vi],
                                                (*buf.args, *self.weights, direct))])

    def direct_output(self, out: np.ndarray):
        import tvm

        if (self.p.n_pad != self.p.n or out.shape[0] == 0 or out.dtype != np.float32
                or not out.flags.c_contiguous or out.ctypes.data % 64):
            return None
        return tvm.runtime.from_dlpack(out)


class _LutBuffers:
    """x (K zero-padded), its tables, table scales and group sums, y: for one M."""

    def __init__(self, p, m: int):
        import tvm

        bl = p.blocking
        self.x = aligned_empty((m, bl.k_pad), np.float32)
        self.x[:] = 0  # K padding stays zero
        J, ks = bl.k_pad // p.table_group, p.kernel_shape()
        lut = aligned_empty((m, J // kernels.LUT_QUAD, kernels.lut_quad_row_bytes(ks))
                            if p.single_quads else (m, J, kernels.lut_table_bytes(ks)), np.int8)
        scale = aligned_empty((m, bl.groups), np.float32)
        xsum = aligned_empty((m, bl.groups), np.float32)
        self.y = aligned_empty((m, p.n_pad), np.float32)
        self.table_args = [tvm.runtime.from_dlpack(a) for a in (self.x, lut, scale, xsum)]
        self.args = self.table_args[1:]
        self.out = tvm.runtime.from_dlpack(self.y)


def lut_tables(x: np.ndarray, table_group: int, block: int):
    """The numpy model of ``qmm_lut_tables`` for x ``[M, k_pad]`` float32: (tables ``[M, J,
    16]`` int8, their scale per row and group ``[M, G]``, the group sums of x ``[M, G]``)."""
    m, k_pad = x.shape
    g, per_group = table_group, block // table_group
    rows = x.reshape(m, k_pad // g, g)
    c = np.arange(kernels.LUT_TABLE_BYTES)
    signs = np.stack([np.where((c >> t) & 1, 1.0, -1.0) for t in range(g)]).astype(np.float32)
    half_sums = np.einsum("mjt,tc->mjc", rows, signs).astype(np.float32) * np.float32(0.5)
    amax = (np.abs(rows).sum(-1, dtype=np.float32) * np.float32(0.5)).reshape(
        m, -1, per_group).max(-1)
    scale = np.where(amax > 0, amax * np.float32(1.0 / 127), 1).astype(np.float32)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    tables = np.rint(half_sums * np.repeat(inv, per_group, axis=1)[..., None]).astype(np.int8)
    return tables, scale, x.reshape(m, -1, block).sum(-1, dtype=np.float32)


def lut_model(p, x, q, scale, zp, g_idx) -> np.ndarray:
    """What the lut kernel computes, in float64: the quantized tables looked up with the
    planes' indices, scaled per group, plus the centered zero-point term (``kernels.py``),
    with the scales and zero-point factors as the kernel stores them (``p.scale_dtype``)."""
    bl, g, bits = p.blocking, p.table_group, p.container_bits
    perm = layout.act_order_permutation(g_idx, bl.block, p.k) if p.scheme.act_order else None
    m = x.shape[0]
    xp = np.zeros((m, bl.k_pad), np.float32)
    xp[:, :p.k] = x if perm is None else x[:, perm]
    tables, tscale, xsum = lut_tables(xp, g, bl.block)
    qq = np.asarray(q) if perm is None else np.asarray(q)[perm]
    u = layout.pad_to(layout.container_codes(p.scheme, qq), (bl.k_pad, p.n))
    idx = layout.lut_indices(u, bits, g)                       # [bits, J, N]
    s, zc = layout.group_params(p.scheme, scale, zp, p.k, p.n, bl.groups)
    per_group = bl.block // g
    j = np.arange(idx.shape[1])[:, None]
    isum = np.zeros((m, bl.groups, p.n), np.float64)
    for r in range(m):
        looked = sum(float(1 << i) * tables[r, j, idx[i]].astype(np.float64)
                     for i in range(bits))                    # [J, N]
        isum[r] = looked.reshape(bl.groups, per_group, p.n).sum(1)
    stored = np.dtype(p.scale_dtype)
    s = np.asarray(s, np.float32).astype(stored)
    zt = lut_zero_terms(p, s, zc).astype(stored)                 # as kernel_weights does
    return (np.einsum("mgn,gn->mn", isum * tscale.astype(np.float64)[..., None],
                      s.astype(np.float64))
            + xsum.astype(np.float64) @ zt.astype(np.float64))
