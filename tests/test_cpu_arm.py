"""The Arm targets (``cpu-arm-neon``, ``cpu-arm-dotprod``): cross-compiled by TVM's LLVM for
aarch64 and checked for correctness under qemu-user, never for speed.

The artifact's libraries are aarch64 code: this x86 host cannot load them (its runner refuses
with DeviceUnavailableError). To check them, ``tests/arm_harness/qc_call.c`` is compiled with
``aarch64-linux-gnu-gcc`` and run under ``qemu-aarch64``: it dlopens a library, calls one of
its functions with DLTensor arguments (the TVM FFI packed convention) and writes the tensors
back. The plan executor runs the artifact's plan with every kernel step called that way, and
the result is compared with the numpy reference on fresh random inputs.

Skipped, with the reason, where the cross compiler, qemu-user or the aarch64 sysroot is
missing (``.ci/run`` installs them from Debian).
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("tvm")

import qcompiler  # noqa: E402
from conftest import ROOT  # noqa: E402
from qcompiler.codegen.cpu import backend, host, kernels, runtime  # noqa: E402
from qcompiler.driver.api import compile_to_dir, import_model  # noqa: E402
from qcompiler.errors import DeviceUnavailableError  # noqa: E402
from qcompiler.runtime.reference import run as reference_run  # noqa: E402
from qcompiler.targets import get_target  # noqa: E402
from test_cpu_backend import qmm_module  # noqa: E402

ARM_TARGETS = ("cpu-arm-neon", "cpu-arm-dotprod")
CC = host.CROSS_COMPILERS["aarch64-linux-gnu"]
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
HARNESS = os.path.join(ROOT, "tests", "arm_harness", "qc_call.c")
MLP = os.path.join(ROOT, "examples", "mlp_int4.onnx")
_MISSING = [what for what, ok in ((CC, shutil.which(CC)), (QEMU, shutil.which(QEMU)),
                                  (f"{SYSROOT} (libc6-dev-arm64-cross)",
                                   os.path.isdir(os.path.join(SYSROOT, "lib"))))
            if not ok]
needs_cross = pytest.mark.skipif(bool(_MISSING), reason=(
    f"missing {', '.join(_MISSING)}: apt-get install qemu-user gcc-aarch64-linux-gnu "
    "libc6-dev-arm64-cross (.ci/run does)"))
_DL_CODE = {"i": 0, "u": 1, "b": 1, "f": 2}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The aarch64 qc_call executable, built once per test module."""
    exe = str(tmp_path_factory.mktemp("arm_harness") / "qc_call")
    subprocess.run([CC, "-O1", "-Wall", "-Werror", "-rdynamic", "-o", exe, HARNESS, "-ldl",
                    "-lm"], check=True, capture_output=True, text=True)
    return exe


def qemu_call(harness, library: str, func: str, arrays: list, workdir) -> list:
    """Call ``func`` of the aarch64 ``library`` on ``arrays`` under qemu; every array is
    written back in place (outputs and in-place operands alike)."""
    request, reply = os.path.join(workdir, "in.bin"), os.path.join(workdir, "out.bin")
    with open(request, "wb") as f:
        f.write(b"QCA1" + np.int32(len(arrays)).tobytes())
        for a in arrays:
            a = np.ascontiguousarray(a)
            f.write(np.int32(0).tobytes())
            f.write(bytes([_DL_CODE[a.dtype.kind], 8 * a.dtype.itemsize, 1, 0]))
            f.write(np.int32(a.ndim).tobytes() + np.asarray(a.shape, np.int64).tobytes())
            f.write(np.int64(a.nbytes).tobytes() + a.tobytes())
    done = subprocess.run([QEMU, "-L", SYSROOT, harness, library, func, request, reply],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{func} under qemu: {done.stderr.strip()}"
    with open(reply, "rb") as f:
        data = f.read()
    offset = 0
    for a in arrays:
        a.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8, a.nbytes, offset)
        offset += a.nbytes
    assert offset == len(data)
    return arrays


class QemuQmmKernel:
    """A qmatmul kernel of an aarch64 library, called under qemu: what ``runtime.QmmKernel``
    does on the host (padding, group sums, k-major row blocks, the output factor)."""

    def __init__(self, harness, library, p, variants, packed, workdir):
        self.harness, self.library, self.workdir = harness, library, workdir
        self.p, self.variants = p, variants
        self.w, self.s, self.zc, self.factor = runtime.kernel_weights(p, packed)
        self.perm = packed.get("perm")
        self.calls = 0

    def direct_output(self, out):
        return None

    def run_into(self, x, out, direct=None):
        p, bl = self.p, self.p.blocking
        m = x.shape[0]
        vi = runtime.choose_variant(self.variants, m)
        variant = self.variants[vi]
        mb = variant["m_block"]
        m_pad = -(-max(m, 1) // mb) * mb
        xp = np.zeros((m_pad, bl.k_pad), np.float32)
        xp[:m, :p.k] = x if self.perm is None else x[:, self.perm]
        xsum = xp.reshape(m_pad, bl.groups, bl.block).sum(-1, dtype=np.float32)
        row_major = getattr(kernels, "x_row_major", lambda *a: False)(p.numerics, variant)
        blocks = xp.reshape(m_pad // mb, mb, bl.k_pad)
        xk = np.ascontiguousarray(blocks if row_major else blocks.transpose(0, 2, 1))
        y = np.zeros((m_pad // mb, mb, p.n_pad), np.float32)
        qemu_call(self.harness, self.library, kernels.function_name(vi),
                  [xk, xsum.reshape(m_pad // mb, mb, bl.groups), self.w, self.s, self.zc, y],
                  self.workdir)
        self.calls += 1
        np.multiply(y.reshape(m_pad, p.n_pad)[:m, :p.n], np.float32(self.factor), out=out)


class QemuOpsLibrary:
    """The op library of an aarch64 artifact, its functions called under qemu (the
    ``OpsLibrary`` interface the plan's steps use)."""

    def __init__(self, harness, library, workdir):
        self.harness, self.library, self.workdir = harness, library, workdir
        self.called = set()

    def function(self, name):
        def call(*args):
            arrays = [np.from_dlpack(a) if not isinstance(a, np.ndarray) else a for a in args]
            staged = [a.view(np.uint8) if a.dtype == np.bool_ else a for a in arrays]
            copies = [np.ascontiguousarray(a) for a in staged]
            qemu_call(self.harness, self.library, name, copies, self.workdir)
            for a, c in zip(staged, copies):
                if c is not a:
                    a[...] = c
            self.called.add(name)
        return call

    def bind(self, name, arrays):
        fn = self.function(name)
        return lambda: fn(*arrays)


def run_under_qemu(harness, out_dir, module, inputs, workdir):
    """The artifact's plan run with every compiled kernel called under qemu: (outputs, qmatmul
    kernels, op library)."""
    from qcompiler.plan.executor import PlanExecutor
    from qcompiler.plan.plan import plan_from_json

    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    target = get_target(manifest["target"])
    nodes = {n.results[0].name: n for n in module.main.nodes if n.results}
    lib, impls, qmms, epilogues = None, {}, {}, {}
    for rec in manifest["kernels"]:
        if rec.get("impl") == "tvm-llvm-ops":
            lib = QemuOpsLibrary(harness, os.path.join(out_dir, rec["library"]), workdir)
            epilogues = rec["epilogues"]
            impls.update({name: backend.OpKernelStep(lib, k) for name, k in rec["kernels"].items()})
    for rec in manifest["kernels"]:
        if rec.get("impl") == "tvm-llvm":
            node = nodes[rec["result"]]
            qmms[rec["result"]] = QemuQmmKernel(
                harness, os.path.join(out_dir, rec["library"]), backend._problem(target, node),
                runtime.variant_list(node.attrs["config"]), backend._packed(module, node), workdir)
            impls[rec["result"]] = backend.QmatmulStep(node, qmms[rec["result"]], lib,
                                                       epilogues.get(rec["result"]))
    run = PlanExecutor(plan_from_json(manifest["plan"]), module, impls).run
    return run(inputs), qmms, lib


def assert_close(got, want, k):
    tol = 2e-5 * max(1.0, float(np.abs(want).max())) * max(1.0, np.sqrt(k) / 8)
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max |arm - reference| = {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------------------------
# targets and the refusal on a foreign host (no cross tools needed beyond the link)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARM_TARGETS)
def test_arm_targets_are_cross_targets(name):
    import tvm

    t = get_target(name)
    cpu = host.target_cpu(t)
    assert t.available and cpu["vector_bits"] == 128 and not cpu["vnni"]
    assert cpu["arch"] == "aarch64" and cpu["triple"] == "aarch64-linux-gnu"
    llvm = host.tvm_target(t)
    assert str(llvm.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert "+neon" in list(llvm.attrs["mattr"])
    assert ("+dotprod" in list(llvm.attrs["mattr"])) == (name == "cpu-arm-dotprod")
    assert f"target={name}" in t.default_pipeline
    # x86 targets keep their LLVM target text (and so their build keys): no triple added
    assert "mtriple" not in str(host.tvm_target(get_target("cpu-x86-avx2")))
    assert isinstance(tvm.target.Target(llvm), tvm.target.Target)


def test_foreign_arch():
    assert host.foreign_arch("neoverse-n1") == (None if host.host_arch() == "aarch64"
                                                else "aarch64")
    assert host.foreign_arch("haswell") == (None if host.host_arch() == "x86_64" else "x86_64")


def test_missing_cross_compiler_is_a_clear_error(monkeypatch):
    from qcompiler.codegen.cpu.errors import CPUBackendError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(CPUBackendError, match="aarch64-linux-gnu-gcc.*apt-get install"):
        host.cross_compiler(get_target("cpu-arm-neon"))
    assert host.cross_compiler(get_target("cpu-x86-avx2")) is None


# --------------------------------------------------------------------------------------------
# correctness under qemu
# --------------------------------------------------------------------------------------------

# (bits, group, zero points, signed, K, N): odd K and N pad to whole groups and tiles
QMM_CASES = [(4, 32, True, False, 272, 70), (2, 64, True, False, 192, 33),
             (3, 32, False, True, 96, 40), (8, "channel", True, False, 100, 24),
             (4, 128, True, True, 256, 17)]


@needs_cross
@pytest.mark.parametrize("bits,group,zp,signed,k,n", QMM_CASES,
                         ids=[f"u{c[0]}-g{c[1]}-zp{int(c[2])}-s{int(c[3])}-{c[4]}x{c[5]}"
                              for c in QMM_CASES])
def test_qmatmul_exact_under_qemu(harness, tmp_path, bits, group, zp, signed, k, n):
    """The exact fp32 qmatmul kernel, built for aarch64 NEON, vs the reference at M = 1, 5, 17
    (M = 17 is no multiple of any m_block; a symbolic batch: every variant is built)."""
    module = qmm_module(k, n, bits, group, zp=zp, signed=signed, bias=False, seed=bits)
    out, compiled = compile_to_dir(module, "cpu-arm-neon", str(tmp_path / "out"))
    for m in (1, 5, 17):
        x = np.random.default_rng(m + k).standard_normal((m, k)).astype(np.float32)
        got, qmms, _ = run_under_qemu(harness, out, compiled, {"x": x}, str(tmp_path))
        assert sum(q.calls for q in qmms.values()) == 1
        assert_close(got["y"], reference_run(module, {"x": x})["y"], k)


@needs_cross
@pytest.mark.parametrize("target", ARM_TARGETS)
def test_mlp_with_every_op_compiled_under_qemu(harness, tmp_path, target):
    """examples/mlp_int4.onnx (4-bit MatMulNBits, bias, activations) for an Arm target: every
    kernel of the plan, qmatmuls and op library alike, runs as aarch64 code under qemu and the
    whole model matches the reference; on this host the artifact itself refuses to run."""
    out, compiled = compile_to_dir(MLP, target, str(tmp_path / "out"))
    with open(os.path.join(out, "manifest.json")) as f:
        records = json.load(f)["kernels"]
    assert not [r for r in records if r.get("host_fallback")]
    assert {r["mcpu"] for r in records if "mcpu" in r} == {get_target(target).params["mcpu"]}
    for rec in records:
        if "library" in rec:
            with open(os.path.join(out, rec["library"]), "rb") as f:
                head = f.read(20)
            assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    got, qmms, lib = run_under_qemu(harness, out, compiled, {"x": x}, str(tmp_path))
    want = reference_run(import_model(MLP), {"x": x})
    assert qmms and all(q.calls == 1 for q in qmms.values())
    assert lib is not None and lib.called
    for name, value in want.items():
        assert_close(got[name], value, 64)
    if host.host_arch() != "aarch64":
        with pytest.raises(DeviceUnavailableError, match="aarch64.*-mcpu="):
            qcompiler.load(out).run({"x": x})


@pytest.mark.parametrize("numerics", ["int8", "lut"])
def test_int8_and_lut_are_refused_before_llvm(tmp_path, numerics):
    """Their kernels are x86 intrinsics: LLVM for aarch64 would abort the process, so the
    compile says why instead (the qmatmul would run in the host interpreter)."""
    from test_cpu_backend import pipeline

    from qcompiler.errors import HostFallbackError

    with pytest.warns(UserWarning, match=f"numerics={numerics} has no aarch64 kernel"):
        with pytest.raises(HostFallbackError, match=f"numerics={numerics} has no aarch64"):
            compile_to_dir(qmm_module(128, 32, 4, 32), "cpu-arm-neon", str(tmp_path / "o"),
                           passes=pipeline("cpu-arm-neon", numerics))
