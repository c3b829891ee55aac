"""Running CUDA artifacts: ctypes over the generated libraries (no torch, cupy or TVM needed).

- ``CudaRuntime``: device memory through ``qc_runtime.so`` (built beside the kernels).
- ``QmmKernel``: one compiled qmatmul with its packed constants resident on the device;
  ``run_device(x_ptr, y_ptr, M, stream)`` for device pointers (torch tensors: no copy), and
  ``__call__(node, args, module)`` with the reference interpreter's kernel signature (numpy in,
  numpy out) so that whole graphs run with the other ops on the host.
- ``CudaModuleRunner``: what ``qcompiler.load(DIR).run`` calls for a CUDA artifact. It checks
  the artifact's library paths at load but touches the device (dlopen, device query, weight
  upload) only on the first run, so that an artifact loads on a machine without a GPU and its
  ``run`` raises ``CudaDeviceUnavailableError`` (a ``DeviceUnavailableError``).
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from qcompiler.ir.core import constant_value
from qcompiler.ir.ops import qmatmul_x_norm_bias, qmatmul_x_norm_scale
from qcompiler.errors import ArtifactError, DeviceUnavailableError, QCompilerError

c_void_p, c_size_t, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int


class CudaRuntimeError(QCompilerError, RuntimeError):
    pass


class CudaDeviceUnavailableError(DeviceUnavailableError, CudaRuntimeError):
    """No CUDA device (or driver) here; callers catching CudaRuntimeError still catch it."""


class CudaRuntime:
    """Device memory helpers of ``qc_runtime.so``."""

    def __init__(self, lib_path: str):
        if not os.path.exists(lib_path):
            raise CudaRuntimeError(f"{lib_path} is missing: the artifact was compiled where "
                                   "nvcc was not found; compile it again where nvcc exists")
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:  # e.g. no CUDA runtime library (libcudart) on this machine
            raise CudaDeviceUnavailableError(f"cannot load {lib_path}: {e}") from None
        lib = self.lib
        lib.qc_malloc.argtypes = [ctypes.POINTER(c_void_p), c_size_t]
        lib.qc_free.argtypes = [c_void_p]
        lib.qc_memset.argtypes = [c_void_p, c_int, c_size_t]
        lib.qc_h2d.argtypes = [c_void_p, c_void_p, c_size_t]
        lib.qc_d2h.argtypes = [c_void_p, c_void_p, c_size_t]
        lib.qc_error_string.restype = ctypes.c_char_p
        lib.qc_device_count.argtypes = [ctypes.POINTER(c_int)]
        lib.qc_device_name.argtypes = [ctypes.c_char_p, c_int]
        n = c_int(0)
        err = lib.qc_device_count(ctypes.byref(n))
        if err or n.value == 0:
            raise CudaDeviceUnavailableError("no CUDA device is available to run this artifact "
                                   f"({self.error(err) if err else 'device count 0'})")

    def error(self, err: int) -> str:
        return self.lib.qc_error_string(err).decode()

    def check(self, err: int, what: str) -> None:
        if err:
            raise CudaRuntimeError(f"{what}: CUDA error {err} ({self.error(err)})")

    def device_name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.check(self.lib.qc_device_name(buf, 256), "cudaGetDeviceProperties")
        return buf.value.decode()

    def malloc(self, nbytes: int) -> int:
        p = c_void_p()
        self.check(self.lib.qc_malloc(ctypes.byref(p), max(int(nbytes), 1)),
                   f"cudaMalloc({nbytes})")
        return p.value

    def free(self, ptr: int) -> None:
        self.check(self.lib.qc_free(c_void_p(ptr)), "cudaFree")

    def memset(self, ptr: int, nbytes: int) -> None:
        self.check(self.lib.qc_memset(c_void_p(ptr), 0, nbytes), "cudaMemset")

    def upload(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.malloc(array.nbytes)
        self.check(self.lib.qc_h2d(c_void_p(ptr), array.ctypes.data_as(c_void_p), array.nbytes),
                   "cudaMemcpy H2D")
        return ptr

    def d2h(self, out: np.ndarray, ptr: int) -> np.ndarray:
        self.check(self.lib.qc_d2h(out.ctypes.data_as(c_void_p), c_void_p(ptr), out.nbytes),
                   "cudaMemcpy D2H")
        return out

    def synchronize(self) -> None:
        self.check(self.lib.qc_synchronize(), "cudaDeviceSynchronize")


# The calling convention of a qmatmul library's _run that this runtime uses (the library's
# _abi() says which it has; libraries from before _abi, whose _run took no norm_w, are 1).
QMM_ABI = 2


class QmmKernel:
    """One generated qmatmul library with its constants on the device."""

    def __init__(self, rt: CudaRuntime, lib_path: str, symbol: str, arrays: dict,
                 n: int, out_dtype: np.dtype):
        self.rt, self.symbol, self.n, self.out_dtype = rt, symbol, n, np.dtype(out_dtype)
        self.lib = ctypes.CDLL(lib_path)
        abi = getattr(self.lib, f"{symbol}_abi")() if hasattr(self.lib, f"{symbol}_abi") else 1
        if abi != QMM_ABI:
            raise CudaRuntimeError(
                f"{os.path.basename(lib_path)}: its qmatmul kernel has calling convention "
                f"{abi}, this qcompiler calls convention {QMM_ABI}; compile the model again")
        self.fn = getattr(self.lib, f"{symbol}_run")
        # the last argument: the fused epilogue's extras, null here (this runner's callers
        # apply a qmatmul's epilogue themselves; only the device plan passes them)
        self.fn.argtypes = [c_void_p] * 9 + [c_int, c_void_p, c_void_p, c_int, c_void_p]
        self.ws_fn = getattr(self.lib, f"{symbol}_workspace_bytes")
        self.ws_fn.argtypes = [c_int]
        self.ws_fn.restype = c_size_t
        self.n_variants = getattr(self.lib, f"{symbol}_variants")()
        self.dev, self.sizes = {}, {}
        self.host = arrays  # kept for benchmarks that upload extra weight copies
        for role in ("w", "scales", "zeros", "perm", "bias", "norm", "norm_bias"):
            a = arrays.get(role)
            self.dev[role] = rt.upload(a) if a is not None else None
            self.sizes[role] = 0 if a is None else np.asarray(a).nbytes
        self.bench_variant = -1  # the variant benchmarks and the tuner run (-1: by M)
        self.workspace, self.workspace_bytes = None, 0

    def ensure_workspace(self, m: int) -> int:
        need = int(self.ws_fn(m))
        if need > self.workspace_bytes:
            if self.workspace is not None:
                self.rt.free(self.workspace)
            self.workspace = self.rt.malloc(need)
            self.rt.memset(self.workspace, need)  # the split-K counters start at zero
            self.workspace_bytes = need
        return self.workspace

    def run_device(self, x_ptr: int, y_ptr: int, m: int, stream: int = 0,
                   variant: int = -1) -> None:
        ws = self.ensure_workspace(m)
        d = self.dev
        err = self.fn(c_void_p(x_ptr), c_void_p(y_ptr), c_void_p(d["w"]), c_void_p(d["scales"]),
                      c_void_p(d["zeros"]), c_void_p(d["bias"]), c_void_p(d["perm"]),
                      c_void_p(d["norm"]), c_void_p(d["norm_bias"]), m, c_void_p(ws),
                      c_void_p(stream), variant, None)
        if err:
            raise CudaRuntimeError(f"{self.symbol} (M={m}, variant {variant}): CUDA error "
                                   f"{err} ({self.rt.error(err)})")

    def run_numpy(self, x: np.ndarray, variant: int = -1, poison: bool = False) -> np.ndarray:
        """Copy x in, run, copy y out. ``poison`` fills y with NaN first (tests: every
        element must be written)."""
        x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
        m = x2.shape[0]
        y = np.empty((m, self.n), self.out_dtype)
        if m == 0:
            return y.reshape(*x.shape[:-1], self.n)
        xd = self.rt.upload(x2)
        yd = self.rt.malloc(y.nbytes)
        if poison:
            self.rt.lib.qc_memset(c_void_p(yd), 0xFF, y.nbytes)  # 0xFFFF: NaN in f16 and bf16
        try:
            self.run_device(xd, yd, m, 0, variant)
            self.rt.synchronize()
            self.rt.d2h(y, yd)
        finally:
            self.rt.free(xd)
            self.rt.free(yd)
        return y.reshape(*x.shape[:-1], self.n)

    def __call__(self, node, args, module):
        return [self.run_numpy(np.asarray(args[0]))]

    def close(self) -> None:
        for p in list(self.dev.values()) + [self.workspace]:
            if p is not None:
                self.rt.free(p)
        self.dev, self.workspace = {}, None


def _is_torch_cuda(v) -> bool:
    return type(v).__module__.startswith("torch") and getattr(v, "is_cuda", False)


def _in_kernels_dir(library, index: int) -> str:
    """A record's library name as a path relative to the artifact directory (the records name
    it relative to kernels/ or, like the CPU backend's, with the kernels/ prefix)."""
    from qcompiler.driver.artifact import KERNELS_DIR, checked_relpath

    rel = checked_relpath(library, f"kernels[{index}].library")
    return rel if rel.startswith(KERNELS_DIR + "/") else f"{KERNELS_DIR}/{rel}"


class CudaModuleRunner:
    """``run({name: array})``: numpy arrays (copied to and from the device per kernel call) or
    torch CUDA tensors (used in place, results as torch tensors) when the graph holds only
    qmatmuls; other graphs run their remaining ops with the numpy reference.

    The constructor only resolves the libraries' paths (inside the artifact, listed in its
    verified files); the device is touched on the first call (``load_device``)."""

    def __init__(self, module, manifest: dict, out_dir: str):
        from qcompiler.driver.artifact import KERNELS_DIR, artifact_path

        self.module = module
        self.target = manifest["target"]
        nodes = {n.result.name: n for n in module.main.nodes if n.op == "qmatmul"}
        self.plan = []  # (result, library path or None when not built, symbol, node)
        for i, rec in enumerate(manifest["kernels"]):
            if rec.get("impl") != "cuda":
                continue
            node = nodes.get(rec["result"])
            if node is None:
                raise ArtifactError(f"manifest.json: kernels[{i}].result = {rec['result']!r} is "
                                    "no qmatmul of module.qir")
            lib = (artifact_path(out_dir, manifest, _in_kernels_dir(rec["library"], i),
                                 f"kernels[{i}].library") if rec["built"] else None)
            self.plan.append((rec["result"], lib, rec["symbol"], node))
        built = all(lib is not None for _, lib, _, _ in self.plan)
        self.runtime_library = (artifact_path(out_dir, manifest, f"{KERNELS_DIR}/qc_runtime.so",
                                              "the CUDA runtime library") if built else None)
        self.rt = None
        self.kernels: dict[str, QmmKernel] = {}
        fn = module.main
        self.device_only = all(n.op in ("constant", "qmatmul") for n in fn.nodes)

    def load_device(self) -> None:
        """dlopen the libraries, find a device and upload the weights (once)."""
        if self.rt is not None:
            return
        if self.runtime_library is None:
            raise CudaRuntimeError(f"this artifact ({self.target}) has no built libraries: it "
                                   "was compiled where nvcc was not found; compile it again "
                                   "where nvcc exists")
        try:
            rt = CudaRuntime(self.runtime_library)
        except CudaDeviceUnavailableError as e:
            raise CudaDeviceUnavailableError(
                f"this artifact targets {self.target}; no CUDA device here: {e}") from None
        kernels = {}
        for result, lib, symbol, node in self.plan:
            arrays = {role: constant_value(self.module, node.operand(i))
                      for role, i in (("w", 1), ("scales", 2), ("zeros", 3), ("perm", 4),
                                      ("bias", 7))}
            arrays["norm"] = constant_value(self.module, qmatmul_x_norm_scale(node))
            arrays["norm_bias"] = constant_value(self.module, qmatmul_x_norm_bias(node))
            # the kernel writes the product here (the interpreter applies the epilogue); with
            # column pairs (fuse-gate-up) that is twice the result's width
            width = node.result.type.shape[-1] * (2 if node.attrs.get("epilogue_pairs") else 1)
            kernels[result] = QmmKernel(rt, lib, symbol, arrays, width,
                                        node.result.type.dtype.np_dtype)
        self.rt, self.kernels = rt, kernels

    def __call__(self, inputs: dict) -> dict:
        self.load_device()
        if inputs and all(_is_torch_cuda(v) for v in inputs.values()):
            if self.device_only:
                return self._run_torch(inputs)
            inputs = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
        from qcompiler.runtime.reference import run

        return run(self.module, {k: np.asarray(v) for k, v in inputs.items()},
                   kernels=dict(self.kernels))

    def _run_torch(self, inputs: dict) -> dict:
        import torch

        fn = self.module.main
        env = {a.name: inputs[a.name] for a in fn.args}
        stream = torch.cuda.current_stream().cuda_stream
        for node in fn.nodes:
            if node.op != "qmatmul":
                continue
            x = env[node.operands[0].name]
            if not x.is_contiguous():
                raise ValueError(f"%{node.result.name}: x must be contiguous")
            k = self.kernels[node.result.name]
            want = {np.dtype(np.float16): torch.float16}.get(k.out_dtype, torch.bfloat16)
            if x.dtype != want:
                raise ValueError(f"%{node.result.name}: x is {x.dtype}, the kernel takes {want}")
            x2 = x.reshape(-1, x.shape[-1])
            y = torch.empty((x2.shape[0], k.n), dtype=want, device=x.device)
            if x2.shape[0]:
                k.run_device(x2.data_ptr(), y.data_ptr(), x2.shape[0], stream)
            env[node.result.name] = y.reshape(*x.shape[:-1], k.n)
        return {name: env[v.name] for name, v in zip(fn.output_names, fn.outputs)}
