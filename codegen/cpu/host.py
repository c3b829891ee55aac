"""The LLVM CPU of a cpu target: the host's is detected from /proc/cpuinfo, never "native".

LLVM 22 (inside TVM 0.27) rejects ``-mcpu=native`` and silently falls back to a generic x86
without AVX, so the host target names a real CPU: the newest LLVM CPU of the host's vendor
whose key ISA features the host has. ``llvm_get_system_cpu()`` is not used because under
virtualization it reports the hypervisor's model (e.g. "rocketlake" for a Sapphire Rapids guest
with AMX), which can be wrong in both directions.

``QC_HOST_ISA`` (testing) overrides what detection reports for the ``cpu`` target:

- ``avx2``: behave as an AVX2-only x86 host (Haswell, Zen 3): the detected flags lose every
  ``avx512*``, ``*vnni*`` and ``amx*`` flag, so the -mcpu becomes haswell (Intel) or znver3 /
  znver2 (AMD), vectors are 256 bits and the int8 (VNNI) path is refused. On an AVX-512 machine
  this runs the code path a Zen 3 takes, on code this machine can execute.
- ``avx512``: require AVX-512 (the real detection, unchanged); refused with ``HostISAError`` on
  a host without it, since its code could not run there.
- unset or empty: the real detection.

Arm targets (``cpu-arm-neon``, ``cpu-arm-dotprod``) name an ``mtriple`` (aarch64-linux-gnu)
besides their -mcpu: their code is cross-compiled by TVM's LLVM and linked by Debian's
``aarch64-linux-gnu-gcc`` (``CROSS_COMPILERS``); on any other host such code cannot run
(``foreign_arch``), so the runner refuses it lazily. Its correctness is checked under
qemu-user (tests/test_cpu_arm.py), never its speed.
"""
from __future__ import annotations

import functools
import os

from qcompiler.errors import ConfigError

# LLVM CPU names, newest first, and the /proc/cpuinfo flags each one needs. Only ISA features
# that change code generation for our kernels are listed.
_AVX2 = {"avx", "avx2", "fma", "f16c", "bmi2"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
_VNNI = _AVX512 | {"avx512_vnni"}
CANDIDATES = {
    "GenuineIntel": [
        ("sapphirerapids", _VNNI | {"avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16",
                                    "avx_vnni", "avx512_vbmi2", "avx512_bitalg"}),
        ("icelake-server", _VNNI | {"avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq"}),
        ("cascadelake", _VNNI),
        ("skylake-avx512", _AVX512),
        ("haswell", _AVX2),
    ],
    "AuthenticAMD": [
        ("znver5", _VNNI | {"avx512_bf16", "avx_vnni", "avx512_vp2intersect", "avx512_vbmi2"}),
        ("znver4", _VNNI | {"avx512_bf16", "avx512_vbmi2", "avx512_bitalg"}),
        ("znver3", _AVX2 | {"vaes", "vpclmulqdq"}),
        ("znver2", _AVX2),
        ("haswell", _AVX2),
    ],
}
FALLBACK_CPU = "x86-64"

HOST_ISA_ENV = "QC_HOST_ISA"
HOST_ISA_CHOICES = ("avx2", "avx512")
# The flag families an AVX2-only host (Haswell, Zen 3) lacks: what QC_HOST_ISA=avx2 removes.
_NOT_ON_AVX2_HOSTS = ("avx512", "avx_vnni", "amx")


# LLVM CPUs of the Arm targets and the architecture of their code (the -mcpu is what the
# manifest records, so it must say which machine can run the code).
ARM_CPUS = {"cortex-a72": "aarch64", "cortex-a76": "aarch64", "neoverse-n1": "aarch64",
            "neoverse-v1": "aarch64", "neoverse-n2": "aarch64", "apple-m1": "aarch64"}
# The C compiler that links a foreign triple's object code into a shared library (Debian
# package gcc-aarch64-linux-gnu).
CROSS_COMPILERS = {"aarch64-linux-gnu": "aarch64-linux-gnu-gcc"}


class HostISAError(ConfigError):
    """QC_HOST_ISA has a value we do not know, or names an ISA this host cannot execute."""


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set]:
    """(vendor_id, flags) of the first processor listed."""
    vendor, flags = "", set()
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "vendor_id" and not vendor:
                vendor = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            if vendor and flags:
                break
    return vendor, flags


def host_isa_override() -> str | None:
    """The value of QC_HOST_ISA (None when unset or empty); an unknown value is refused."""
    isa = os.environ.get(HOST_ISA_ENV, "").strip().lower()
    if not isa:
        return None
    if isa not in HOST_ISA_CHOICES:
        raise HostISAError(f"{HOST_ISA_ENV}={isa!r}: choose one of "
                           f"{', '.join(HOST_ISA_CHOICES)} (or leave it unset)")
    return isa


def mask_flags(flags: set, isa: str | None) -> set:
    """``flags`` as an ``isa`` host would report them (``None``: unchanged)."""
    if isa == "avx2":
        return {f for f in flags if not f.startswith(_NOT_ON_AVX2_HOSTS)}
    return set(flags)


def host_flags() -> tuple[str, set]:
    """(vendor, flags) of this machine as the compiler sees it: QC_HOST_ISA applied."""
    return _host_flags(host_isa_override())


@functools.cache
def _host_flags(isa: str | None) -> tuple[str, frozenset]:
    # Cached per QC_HOST_ISA value, so a test may change the variable (monkeypatch.setenv)
    # and the next lookup sees it without clearing any cache.
    vendor, flags = read_cpuinfo()
    if isa == "avx512" and not _AVX512 <= flags:
        raise HostISAError(f"{HOST_ISA_ENV}=avx512: this host lacks "
                           f"{', '.join(sorted(_AVX512 - flags))}; AVX-512 code cannot run here")
    return vendor, frozenset(mask_flags(flags, isa))


def missing_features(mcpu: str) -> set:
    """The /proc/cpuinfo flags that code built for the LLVM cpu ``mcpu`` needs and this host (as
    QC_HOST_ISA makes it look) lacks: empty when the host can run that code. A name outside
    ``CANDIDATES`` (a generic x86-64) needs nothing we check."""
    needed = [flags for table in CANDIDATES.values() for name, flags in table if name == mcpu]
    if not needed:
        return set()
    _, host_flags = _host_flags(host_isa_override())
    return set(frozenset.intersection(*map(frozenset, needed))) - set(host_flags)


def choose_mcpu(vendor: str, flags: set, valid=None) -> str:
    """The newest LLVM CPU of ``vendor`` whose required flags the host has."""
    for name, needed in CANDIDATES.get(vendor, CANDIDATES["GenuineIntel"]):
        if needed <= flags and (valid is None or valid(name)):
            return name
    return FALLBACK_CPU


def host_cpu() -> dict:
    """{"mcpu", "vendor", "features", "isa_override"} of this machine (features: the flags the
    kernels use), as QC_HOST_ISA makes it look."""
    return _host_cpu(host_isa_override())


@functools.cache
def _host_cpu(isa: str | None) -> dict:
    vendor, flags = _host_flags(isa)
    try:
        from tvm.target import codegen

        valid = codegen.llvm_is_valid_cpu if hasattr(codegen, "llvm_is_valid_cpu") else None
    except ImportError:
        valid = None
    mcpu = choose_mcpu(vendor, flags, _valid_checker(valid))
    return {"mcpu": mcpu, "vendor": vendor,
            # (/proc/cpuinfo spells VBMI "avx512vbmi", without the underscore of VBMI2's
            # "avx512_vbmi2": asked for as "avx512_vbmi", no host ever had it until stop 52)
            "features": sorted(flags & (_VNNI | {"avx_vnni", "amx_int8", "avx512_bf16",
                                                 "avx512vbmi"})),
            "isa_override": isa}


def _valid_checker(fn):
    if fn is None:
        return None

    def valid(name: str) -> bool:
        try:
            return bool(fn(name, "x86_64-linux-gnu"))
        except Exception:  # another signature: trust the table
            return True
    return valid


def llc_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """This host's last-level cache in bytes: the largest cache sysfs lists for cpu0 (0 where
    it lists none)."""
    best = 0
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    for idx in entries:
        try:
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1024, "M": 1024 ** 2}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KM")) * mult)
        except (OSError, ValueError, IndexError):
            continue  # not a cache entry (e.g. uevent)
    return best


def host_arch() -> str:
    """The machine this process runs on (``uname -m``: x86_64, aarch64 ...)."""
    return os.uname().machine


def foreign_arch(mcpu: str) -> str | None:
    """The architecture code built for the LLVM cpu ``mcpu`` needs when it is not this host's
    (an Arm -mcpu on an x86 host: "aarch64"); None when this host's architecture runs it."""
    arch = ARM_CPUS.get(mcpu, "x86_64")
    return None if arch == host_arch() else arch


def target_cpu(target) -> dict:
    """{"mcpu", "vector_bits", "vnni", "vbmi", "arch", "triple", "mattr"} for a cpu target
    (``cpu`` is the detected host). ``triple`` is None for x86 targets (the host's triple, as LLVM
    defaults to), the cross triple for Arm ones; ``mattr`` their LLVM features (+neon ...)."""
    if target.params.get("mtriple"):
        triple = target.params["mtriple"]
        feats = list(target.features)
        return {"mcpu": target.params["mcpu"], "vector_bits": target.params["vector_bits"],
                "vnni": False, "vbmi": False, "arch": triple.split("-")[0], "triple": triple,
                "mattr": [f"+{f}" for f in feats]}
    if target.params.get("mcpu"):
        feats = set(target.features)
        mcpu = target.params["mcpu"]
    else:
        host = host_cpu()
        feats = {f.replace("_", "") for f in host["features"]}
        mcpu = host["mcpu"]
    vector_bits = target.params.get("vector_bits") or (512 if "avx512f" in feats else 256)
    vnni = "avx512vnni" in feats and vector_bits == 512
    # vpermb (AVX-512 VBMI: Ice Lake, Zen 4 and later): the lut kernel's lookup (kernels.py)
    vbmi = "avx512vbmi" in feats and vector_bits == 512
    return {"mcpu": mcpu, "vector_bits": vector_bits, "vnni": vnni, "vbmi": vbmi,
            "arch": "x86_64", "triple": None, "mattr": []}


def tvm_target(target, threads: int = 0):
    """The TVM LLVM target of a cpu target."""
    import tvm

    cpu = target_cpu(target)
    cfg = {"kind": "llvm", "mcpu": cpu["mcpu"]}
    if cpu["triple"]:  # cross-compiled (Arm): x86 targets keep their text, hence build keys
        cfg["mtriple"] = cpu["triple"]
        cfg["mattr"] = cpu["mattr"]
    if threads:
        cfg["num-cores"] = threads
    return tvm.target.Target(cfg)


def cross_compiler(target) -> str | None:
    """The C compiler ``export_library`` links a cross-compiled target's library with (None:
    the host's default). Missing from PATH: ``CPUBackendError`` naming the Debian package."""
    import shutil

    from qcompiler.codegen.cpu.errors import CPUBackendError

    triple = target_cpu(target)["triple"]
    if not triple:
        return None
    cc = CROSS_COMPILERS.get(triple)
    if cc is None:
        raise CPUBackendError(f"target {target.name}: no cross compiler known for the triple "
                              f"{triple}")
    if shutil.which(cc) is None:
        raise CPUBackendError(f"target {target.name}: linking its {triple} kernels needs {cc}, "
                              f"which is not on PATH (Debian: apt-get install "
                              f"gcc-{triple} libc6-dev-arm64-cross)")
    return cc
