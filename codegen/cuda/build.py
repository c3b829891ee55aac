"""Invoking nvcc: generated sources -> shared libraries with a C ABI (kept apart from emitting)."""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import shutil
import subprocess
from qcompiler.errors import QCompilerError

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
RUNTIME_SOURCE = os.path.join(TEMPLATES, "qc_runtime.cu.j2")  # plain CUDA, copied as is
# The kernels' static device code: headers that the generated .cu includes as
# "qcompiler/<name>.cuh" (nvcc -I INCLUDE_DIR; an artifact has its own copy, kernels/include).
INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
# -fno-gnu-unique: g++ makes a template's or inline function's static variable (the launch
# functions' "attribute set once" flags) a STB_GNU_UNIQUE symbol, which the dynamic linker
# binds once per process even across RTLD_LOCAL libraries. Two models whose libraries hold
# the same kernel (same name: names come from the source's hash) then shared the flag, and
# the second library's kernel launched without its shared-memory attribute ("invalid
# argument"; found on an H200 with a QDQ and a QOperator ResNet-18 in one process).
NVCC_FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fno-gnu-unique",
              "-lineinfo", "--expt-relaxed-constexpr"]


class BuildError(QCompilerError, RuntimeError):
    """nvcc failed or is missing; the message holds the command and its output."""


def find_nvcc() -> str | None:
    path = shutil.which("nvcc")
    if path:
        return path
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = os.path.join(cand, "bin", "nvcc") if cand else ""
        if p and os.path.exists(p):
            return p
    return None


def gencode_flags(arch: str) -> list[str]:
    """Machine code for the target's arch (``sm_80`` ...) plus its PTX, which the driver
    compiles for newer GPUs (so cuda-sm80 libraries also run on an H100)."""
    num = arch.split("_", 1)[1]
    return [f"-gencode=arch=compute_{num},code=sm_{num}",
            f"-gencode=arch=compute_{num},code=compute_{num}"]


def kernel_headers() -> dict[str, str]:
    """{path relative to INCLUDE_DIR ("qcompiler/tiled.cuh" ...): absolute path} of the headers
    the generated qmatmul sources include: the folder's top level, and the op kernels'
    element functions (``ops/common.cuh``), which a fused epilogue's body calls."""
    paths = sorted(glob.glob(os.path.join(INCLUDE_DIR, "qcompiler", "*.cuh")))
    paths.append(os.path.join(INCLUDE_DIR, "qcompiler", "ops", "common.cuh"))
    return {os.path.relpath(p, INCLUDE_DIR).replace(os.sep, "/"): p for p in paths}


@functools.cache
def headers_digest() -> str:
    """sha256 over the headers' names and contents: part of every qmatmul kernel's key, so
    that a library built against other headers is never taken from the cache."""
    h = hashlib.sha256()
    for rel, path in kernel_headers().items():
        with open(path, "rb") as f:
            h.update(rel.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def key_source(text: str) -> str:
    """What a qmatmul kernel's key is taken over as its source: the generated .cu and the
    digest of the headers it includes."""
    return f"{text}\n// headers sha256 {headers_digest()}\n"


def copy_headers(kernels_dir: str) -> list[str]:
    """Copy the headers to ``kernels_dir/include`` (an artifact's sources compile from there
    with ``-I include``); returns the paths written."""
    written = []
    for rel, path in kernel_headers().items():
        dst = os.path.join(kernels_dir, "include", *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(path, dst)
        written.append(dst)
    return written


def _up_to_date(out: str, source: str) -> bool:
    """``out`` exists and is newer than ``source`` and every header."""
    if not os.path.exists(out):
        return False
    newest = max([os.path.getmtime(source)] +
                 [os.path.getmtime(p) for p in kernel_headers().values()])
    return os.path.getmtime(out) >= newest


def nvcc_command(source: str, out: str, archs: list[str], compile_only: bool = False,
                 include_dir: str = INCLUDE_DIR) -> list[str]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    flags = list(NVCC_FLAGS)
    if compile_only:
        flags = [f for f in flags if f != "-shared"] + ["-c"]
    cmd = [nvcc, *flags, "-I", include_dir]
    for a in archs:
        cmd += gencode_flags(a)
    return cmd + [source, "-o", out]


def build(source: str, out: str, archs: list[str], compile_only: bool = False) -> str:
    """Compile ``source`` to ``out`` (a .so, or an object with compile_only); rebuilt only
    when the source or a header is newer."""
    if _up_to_date(out, source):
        return out
    cmd = nvcc_command(source, out, archs, compile_only)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BuildError(f"nvcc failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr}")
    return out


def build_library(source: str, archs: list[str], out: str,
                  include_dir: str = INCLUDE_DIR) -> str:
    """Compile ``source`` to the shared library ``out``, always (``qcompiler.codegen.build``
    decides what needs building; this is its picklable build step)."""
    cmd = nvcc_command(source, out, archs, include_dir=include_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BuildError(f"nvcc failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr}")
    return out


@functools.cache
def nvcc_version() -> str:
    """The last line of ``nvcc --version`` (part of every CUDA kernel's build key); "none"
    without nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        return "none"
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    return f"nvcc {lines[-1] if lines else proc.returncode}"


def build_cached(source: str, out: str, archs: list[str]) -> str:
    """``build`` through the build cache (``qcompiler.codegen.build``): a library already up to
    date in place is kept, else one built before for the same source text, headers, flags
    and nvcc is copied from the cache, else nvcc runs and the cache keeps the result."""
    from qcompiler.codegen.build import Builder, KernelBuild, kernel_key

    if _up_to_date(out, source):
        return out
    with open(source) as f:
        text = f.read()
    flags = " ".join(NVCC_FLAGS + [f for a in archs for f in gencode_flags(a)])
    kernel = KernelBuild(kernel_key(key_source(text), flags, nvcc_version()),
                         os.path.basename(out),
                         functools.partial(build_library, source, archs))
    try:
        Builder(jobs=1, progress=False).build_many([kernel], os.path.dirname(out) or ".")
    except QCompilerError as e:  # the tuner files nvcc's failures as compile errors
        raise BuildError(str(e)) from None
    return out

