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
from qcompiler.codegen.cpu import backend, host, kernels, layout, runtime, tuning  # noqa: E402
from qcompiler.driver.api import compile_to_dir, import_model, run_pipeline  # noqa: E402
from qcompiler.errors import DeviceUnavailableError  # noqa: E402
from qcompiler.passes.cpu_schedule import SYMBOLIC_BUCKETS  # noqa: E402
from qcompiler.runtime.reference import run as reference_run  # noqa: E402
from qcompiler.targets import get_target  # noqa: E402
from test_cpu_avx2 import key_for, scheme_text  # noqa: E402
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
    (and ``runtime.LutKernel``) do on the host: padding, group sums and k-major row blocks
    (exact), the compiled activation prologue (int8: ``qmm_quantize``; lut:
    ``qmm_lut_tables``, each called under qemu too), the output factor. ``last`` keeps the
    prologue's outputs of the latest call."""

    def __init__(self, harness, library, p, variants, packed, workdir):
        self.harness, self.library, self.workdir = harness, library, workdir
        self.p, self.variants = p, variants
        # (the lut kernel's zc argument is the zero-point term's factors zt)
        self.w, self.s, self.zc, self.factor = runtime.kernel_weights(p, packed)
        self.perm = packed.get("perm")
        self.calls = 0
        self.last = {}

    def direct_output(self, out):
        return None

    def bind(self, x, out):
        """``runtime.QmmKernel.bind`` without its in-place fast path: run_into per call."""
        return lambda: self.run_into(x, out)

    def __call__(self, x):
        out = np.empty((x.shape[0], self.p.n), np.float32)
        self.run_into(np.asarray(x, np.float32), out)
        return out

    def run_into(self, x, out, direct=None):
        p, bl = self.p, self.p.blocking
        m = x.shape[0]
        vi = runtime.choose_variant(self.variants, m)
        variant = self.variants[vi]
        mb = variant.get("m_block", 1)  # lut: one row at a time
        m_pad = -(-max(m, 1) // mb) * mb
        xp = np.zeros((m_pad, bl.k_pad), np.float32)
        xp[:m, :p.k] = x if self.perm is None else x[:, self.perm]
        if p.numerics in ("int8", "lut"):
            y = self._run_quantized(vi, xp, m_pad, mb)
            np.multiply(y[:m, :p.n], np.float32(self.factor), out=out)
            return
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

    def _run_quantized(self, vi, xp, m_pad, mb):
        """The int8 / lut kernel of variant ``vi`` on the padded rows ``xp``: the prologue,
        then the kernel, both under qemu; y ``[m_pad, n_pad]``."""
        p, bl = self.p, self.p.blocking
        G = bl.groups
        y = np.zeros((m_pad, p.n_pad), np.float32)
        if p.numerics == "int8":
            xq = np.zeros((m_pad, bl.k_pad), np.int8)
            x_scale, xsum = np.zeros((m_pad, G), np.float32), np.zeros((m_pad, G), np.float32)
            qemu_call(self.harness, self.library, kernels.QUANTIZE_FUNC, [xp, xq, x_scale, xsum],
                      self.workdir)
            blocks = [a.reshape(m_pad // mb, mb, -1) for a in (xq, xsum, x_scale)]
            qemu_call(self.harness, self.library, kernels.function_name(vi),
                      [*blocks, self.w, self.s, self.zc, y.reshape(m_pad // mb, mb, -1)],
                      self.workdir)
            self.last = {"xq": xq, "x_scale": x_scale, "xsum": xsum}
        else:
            lut = np.zeros((m_pad, bl.k_pad // p.table_group, p.lanes), np.int8)
            tscale, xsum = np.zeros((m_pad, G), np.float32), np.zeros((m_pad, G), np.float32)
            qemu_call(self.harness, self.library, kernels.LUT_TABLES_FUNC, [xp, lut, tscale, xsum],
                      self.workdir)
            qemu_call(self.harness, self.library, kernels.function_name(vi),
                      [lut, tscale, xsum, self.w, self.s, self.zc, y], self.workdir)
            self.last = {"tables": lut, "table_scale": tscale, "xsum": xsum}
        self.calls += 1
        return y


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


def test_int8_without_dotprod_is_refused_before_llvm(tmp_path):
    """cpu-arm-neon has no sdot: numerics=int8 is refused by cpu-schedule (the qmatmul would
    run in the host interpreter: HostFallbackError) and by the backend for a config from
    elsewhere, naming the missing extension, instead of reaching LLVM."""
    from test_cpu_backend import pipeline

    from qcompiler.codegen.cpu.errors import CPUBackendError
    from qcompiler.errors import HostFallbackError

    with pytest.warns(UserWarning, match="numerics=int8 on aarch64 needs the dot-product"):
        with pytest.raises(HostFallbackError, match="needs the dot-product extension"):
            compile_to_dir(qmm_module(128, 32, 4, 32), "cpu-arm-neon", str(tmp_path / "o"),
                           passes=pipeline("cpu-arm-neon", "int8"))
    # an int8 config scheduled for cpu-arm-dotprod, compiled for cpu-arm-neon
    module, _, _ = run_pipeline(qmm_module(128, 32, 4, 32), pipeline("cpu-arm-dotprod", "int8"))
    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    with pytest.raises(CPUBackendError, match="cpu-arm-neon.*has none: use cpu-arm-dotprod"):
        backend._check_numerics_on_target(get_target("cpu-arm-neon"), node)
    backend._check_numerics_on_target(get_target("cpu-arm-dotprod"), node)


# --------------------------------------------------------------------------------------------
# int8 (sdot, cpu-arm-dotprod) and lut (tbl, both Arm targets): choice, code, numerics
# --------------------------------------------------------------------------------------------


def test_schedule_picks_the_arm_paths():
    """int8 on cpu-arm-dotprod: 4 int32 lanes (sdot), 16-column tiles, the cpu_vnni layout;
    lut on both Arm targets: 16-byte index vectors (tbl); numerics=auto gives an
    accuracy_level-4 qmatmul int8 on cpu-arm-dotprod and exact on cpu-arm-neon."""
    from qcompiler.passes.cpu_schedule import node_numerics

    scheme = scheme_text(4, 32, False, True)
    p = tuning.problem(get_target("cpu-arm-dotprod"), key_for(1, 256, 64, scheme))
    assert (p.lanes, p.n_tile, p.container_bits) == (4, 16, 4)
    assert tuning.default_config(get_target("cpu-arm-dotprod"), key_for(128, 256, 64, scheme)) \
        == {"m_block": 4, "order": "group"}
    for name in ARM_TARGETS:
        p = tuning.problem(get_target(name), key_for(1, 256, 64, scheme, "lut"))
        assert (p.lanes, p.n_tile) == (16, 32)
    module = qmm_module(128, 32, 4, 32)
    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    node.attrs["accuracy_level"] = 4
    assert node_numerics(module, node, get_target("cpu-arm-dotprod")) == "int8"
    assert node_numerics(module, node, get_target("cpu-arm-neon")) == "exact"
    module, _, _ = run_pipeline(module, "cpu-schedule{target=cpu-arm-dotprod},"
                                        "cpu-pack-weights{target=cpu-arm-dotprod}")
    node = next(n for n in module.main.nodes if n.op == "qmatmul")
    assert node.attrs["config"]["numerics"] == "int8" and node.attrs["config"]["lanes"] == 4
    assert node.arg("w").type.layout.name == "cpu_vnni"


def arm_assembly(target_name, numerics, bits):
    import tvm

    tgt = get_target(target_name)
    key = key_for(16, 256, 64, scheme_text(bits, 32, False, True), numerics)
    variant = {**tuning.default_config(tgt, key), "m": 16, "max_m": 0}
    p = tuning.with_table_group(tuning.problem(tgt, key), variant)
    ex = tvm.compile(kernels.build_module(p.kernel_shape(), [variant]),
                     target=host.tvm_target(tgt))
    return ex.mod.inspect_source("asm")


def mnemonics(asm):
    return {line.split()[0] for line in asm.splitlines()
            if line.startswith("\t") and line.split()}


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_code_uses_sdot(bits):
    """The int8 kernel's dot products are sdot on 16-byte vectors (8-bit containers too, by the
    offset of arm.py), with no udot or widening multiplies in their place."""
    asm = arm_assembly("cpu-arm-dotprod", "int8", bits)
    assert any(line.split()[:1] == ["sdot"] and ".4s" in line and ".16b" in line
               for line in asm.splitlines())
    assert not {"udot", "smull", "smlal"} & mnemonics(asm)


@pytest.mark.parametrize("bits", [3, 4])
def test_lut_code_uses_tbl(bits):
    """The lut kernel looks its tables up with tbl and adds plane pairs with sadalp / ssra
    (no multiplies), and needs no dot-product instruction (it runs on cpu-arm-neon cores)."""
    ops = mnemonics(arm_assembly("cpu-arm-neon", "lut", bits))
    assert {"tbl", "ssra"} <= ops and {"sadalp", "saddlp"} & ops
    assert not {"sdot", "udot"} & ops


def arm_kernel(harness, tmp_path, target_name, numerics, k, n, scheme, seed=0,
               table_group=None):
    """An Arm kernel with the heuristic's variants for M = 1, 2..16, > 16 (as cpu-schedule
    makes them for a symbolic batch) on fresh random weights, called under qemu."""
    tgt = get_target(target_name)
    variants = []
    for m, max_m in SYMBOLIC_BUCKETS:
        cfg = tuning.default_config(tgt, key_for(m, k, n, scheme, numerics))
        if table_group:
            cfg["table_group"] = table_group
        variants.append({**cfg, "m": m, "max_m": max_m})
    p = tuning.with_table_group(tuning.problem(tgt, key_for(1, k, n, scheme, numerics)),
                                variants[0])
    wts = tuning.random_weights(p, np.random.default_rng(seed))
    lib = runtime.build_library(p.kernel_shape(), variants, tgt,
                                str(tmp_path / f"{numerics}_{target_name}_{seed}"))
    kern = QemuQmmKernel(harness, lib, p, variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], wts["g_idx"]), str(tmp_path))
    return p, wts, kern


def int8_model(p, wts, x):
    """The int8 kernel's arithmetic in numpy: x quantized per row and group as qmm_quantize
    does (``runtime.quantize_groups``), the exact integer sums P of codes times activations
    per group, and ``x_scale * s * (P - xsum * zc)`` summed over the groups, in float64.
    Returns (y, the float32 rounding bound of the kernel, xq, x_scale): P, xsum * zc and
    their difference are integers below 2^24 (exact in float32); the two scale products
    and the G additions round, each by at most 2^-24 of the sum of |group terms|."""
    bl, m = p.blocking, x.shape[0]
    G, B = bl.groups, bl.block
    xp = np.zeros((m, bl.k_pad), np.float32)
    xp[:, :p.k] = x
    xq = np.empty((m, G, B), np.int8)
    x_scale = np.empty((m, G), np.float32)
    runtime.quantize_groups(xp.reshape(m, G, B), xq, x_scale)
    u = layout.pad_to(layout.container_codes(p.scheme, wts["q"]), (bl.k_pad, p.n))
    s, zc = layout.group_params(p.scheme, wts["scale"], wts["zp"], p.k, p.n, G)
    P = np.einsum("mgb,gbn->mgn", xq.astype(np.int64), u.reshape(G, B, p.n).astype(np.int64))
    xsum = xq.astype(np.int64).sum(-1)
    assert np.abs(P).max() < 2 ** 24 and np.abs(xsum[..., None] * zc).max() < 2 ** 24
    terms = (x_scale.astype(np.float64)[..., None] * s.astype(np.float64)
             * (P - xsum[..., None] * zc.astype(np.float64)))
    bound = (G + 3) * 2.0 ** -24 * np.abs(terms).sum(1)
    return terms.sum(1), bound, xq.reshape(m, bl.k_pad), x_scale


def int8_error_bound(p, wts, x_scale):
    """How far the int8 path may be from the exact product: each activation is off by at most
    half its group's x_scale, so |y - exact| <= sum_g x_scale/2 * sum_{k in g} |w[k, n]|."""
    bl = p.blocking
    w = np.abs(runtime.dequantized(p, wts["q"], wts["scale"], wts["zp"], wts["g_idx"]))
    w = layout.pad_to(w, (bl.k_pad, p.n)).reshape(bl.groups, bl.block, p.n).sum(1)
    return 0.5 * x_scale.astype(np.float64) @ w


def check_int8(p, wts, kern, x):
    """The kernel vs the numpy model of its arithmetic (the prologue bit for bit, the output
    within the float32 rounding of the group terms) and vs the exact product (within the
    int8 rounding of the activations)."""
    got = kern(x)
    m = x.shape[0]
    want, bound, xq, x_scale = int8_model(p, wts, x)
    np.testing.assert_array_equal(kern.last["xq"][:m], xq)
    np.testing.assert_array_equal(kern.last["x_scale"][:m], x_scale)
    np.testing.assert_array_equal(kern.last["xsum"][:m],
                                  xq.reshape(m, p.blocking.groups, -1).sum(-1, dtype=np.int64))
    err = np.abs(got - want)
    assert np.all(err <= bound), f"max |arm - int8 model| = {err.max():.3g}"
    exact = x.astype(np.float64) @ runtime.dequantized(p, wts["q"], wts["scale"], wts["zp"],
                                                       wts["g_idx"])
    assert np.all(np.abs(got - exact) <= int8_error_bound(p, wts, x_scale) + bound
                  + 1e-6 * np.abs(exact).max())
    return got


# (bits, group, signed, zero points, K, N): odd K and N pad to whole groups and tiles
INT8_CASES = [(4, 32, False, True, 200, 70), (2, 64, False, True, 192, 33),
              (3, 128, True, False, 300, 45), (8, 32, True, True, 96, 40),
              (8, 128, False, False, 256, 17), (4, 256, True, True, 512, 24)]


@needs_cross
@pytest.mark.parametrize("bits,group,signed,zp,k,n", INT8_CASES,
                         ids=[f"{'i' if c[2] else 'u'}{c[0]}-g{c[1]}-zp{int(c[3])}-{c[4]}x{c[5]}"
                              for c in INT8_CASES])
def test_int8_sdot_under_qemu(harness, tmp_path, bits, group, signed, zp, k, n):
    """The int8 kernels of cpu-arm-dotprod (qmm_quantize + sdot) at M = 1, 5, 17 (every
    variant; 5 and 17 are no multiple of the row block)."""
    p, wts, kern = arm_kernel(harness, tmp_path, "cpu-arm-dotprod", "int8", k, n,
                              scheme_text(bits, group, signed, zp), seed=bits + group)
    assert p.lanes == layout.ARM_SDOT_LANES and p.n_tile == 16
    for m in (1, 5, 17):
        x = np.random.default_rng(m + k).standard_normal((m, k)).astype(np.float32)
        x[0, :7] *= 40  # one group with large activations: the groups' scales differ
        check_int8(p, wts, kern, x)
    assert kern.calls == 3


@needs_cross
@pytest.mark.parametrize("bits", [4, 8])
def test_int8_sdot_extremes_under_qemu(harness, tmp_path, bits):
    """Largest and smallest codes against activations of +-127 of one sign per row: the
    largest sums (8-bit: codes 255, where the offset u - 128 and its correction matter) are
    exact; an all-zero group gets scale 1 and zero codes."""
    k, n = 256, 32
    p, wts, kern = arm_kernel(harness, tmp_path, "cpu-arm-dotprod", "int8", k, n,
                              scheme_text(bits, 128, False, True), seed=3)
    wts["q"][:] = (1 << bits) - 1
    wts["q"][:, ::3] = 0
    wts["zp"][:] = 0
    kern = QemuQmmKernel(harness, kern.library, p, kern.variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], None), kern.workdir)
    x = np.full((3, k), 2.5, np.float32)
    x[1] = -1.0
    x[2, :128] = 0
    x[2, 128:] = np.random.default_rng(1).standard_normal(128)
    got = check_int8(p, wts, kern, x)
    assert np.all(kern.last["xq"][0] == 127) and np.all(kern.last["xq"][1] == -127)
    assert kern.last["x_scale"][2, 0] == 1.0 and not kern.last["xq"][2, :128].any()
    # row 0: x is exactly 127 * x_scale, the sums at their largest (256 x 127 x 255)
    s = runtime.dequantized(p, wts["q"], wts["scale"], wts["zp"], None)
    np.testing.assert_allclose(got[0], 2.5 * s.sum(0), rtol=1e-6)


def check_lut(p, wts, kern, x):
    """The lut kernel vs runtime.lut_model (the same int8 tables; the prologue's tables and
    scales bit for bit) and vs the exact product within the tables' rounding."""
    from test_cpu_lut import table_error_bound

    got = kern(x)
    m = x.shape[0]
    xp = np.zeros((m, p.blocking.k_pad), np.float32)
    xp[:, :p.k] = x
    tables, tscale, xsum = runtime.lut_tables(xp, p.table_group, p.blocking.block)
    np.testing.assert_array_equal(kern.last["tables"][:m], tables)
    np.testing.assert_array_equal(kern.last["table_scale"][:m], tscale)
    np.testing.assert_allclose(kern.last["xsum"][:m], xsum, rtol=1e-5, atol=1e-4)
    model = runtime.numpy_model(p, x, wts["q"], wts["scale"], wts["zp"], wts["g_idx"])
    err = float(np.abs(got - model).max())
    assert err <= runtime.tolerance(p, model), f"max |arm lut - lut model| = {err:.3g}"
    exact = x.astype(np.float64) @ runtime.dequantized(p, wts["q"], wts["scale"], wts["zp"],
                                                       wts["g_idx"])
    assert np.all(np.abs(got - exact) <= table_error_bound(p, wts, x)
                  + runtime.tolerance(p, exact))
    return got


# (bits, group, signed, zero points, K, N, table_group)
LUT_CASES = [(1, 32, False, False, 200, 70, 4), (2, 32, False, True, 200, 70, 4),
             (2, 128, True, False, 300, 45, 4), (3, 128, False, True, 300, 45, 4),
             (3, 32, True, True, 96, 40, 2), (4, 64, False, True, 192, 33, 4)]


@needs_cross
@pytest.mark.parametrize("bits,group,signed,zp,k,n,tg", LUT_CASES,
                         ids=[f"{'i' if c[2] else 'u'}{c[0]}-g{c[1]}-zp{int(c[3])}-{c[4]}x{c[5]}"
                              f"-tg{c[6]}" for c in LUT_CASES])
def test_lut_tbl_under_qemu(harness, tmp_path, bits, group, signed, zp, k, n, tg):
    """The lut kernels of cpu-arm-neon (qmm_lut_tables + tbl) at M = 1, 3, 17."""
    p, wts, kern = arm_kernel(harness, tmp_path, "cpu-arm-neon", "lut", k, n,
                              scheme_text(bits, group, signed, zp), seed=bits + group,
                              table_group=tg)
    assert p.lanes == layout.NEON_LUT_BYTES and p.table_group == tg
    for m in (1, 3, 17):
        check_lut(p, wts, kern, np.random.default_rng(m).standard_normal((m, k))
                  .astype(np.float32))


@needs_cross
@pytest.mark.parametrize("bits", [2, 3])
def test_lut_int16_sums_under_qemu(harness, tmp_path, bits):
    """Largest codes, activations of one sign (every lookup +-127): a group of 256 rows is 64
    steps of at most 381 in one int16 sum; exact against the model."""
    k, n = 512, 32
    p, wts, kern = arm_kernel(harness, tmp_path, "cpu-arm-neon", "lut", k, n,
                              scheme_text(bits, 256, False, True), seed=bits)
    assert kernels.lut_flush_steps(256, 4) == 64
    wts["q"][:] = (1 << bits) - 1
    kern = QemuQmmKernel(harness, kern.library, p, kern.variants, runtime.pack_weights(
        p, wts["q"], wts["scale"], wts["zp"], None), kern.workdir)
    x = np.full((2, k), 3.0, np.float32)
    x[1] = -np.random.default_rng(0).random(k).astype(np.float32) - 1
    check_lut(p, wts, kern, x)


# (target, numerics, bits, group, act_order)
PIPELINE_CASES = [("cpu-arm-dotprod", "int8", 4, 32, False),
                  ("cpu-arm-dotprod", "int8", 8, 64, True),
                  ("cpu-arm-neon", "lut", 2, 32, False),
                  ("cpu-arm-dotprod", "lut", 4, 64, True)]


@needs_cross
@pytest.mark.parametrize("target,numerics,bits,group,act_order", PIPELINE_CASES,
                         ids=[f"{c[0]}-{c[1]}-u{c[2]}-g{c[3]}{'-act' if c[4] else ''}"
                              for c in PIPELINE_CASES])
def test_int8_and_lut_compiled_under_qemu(harness, tmp_path, target, numerics, bits, group,
                                          act_order):
    """cpu-schedule{numerics=int8|lut} + cpu-pack-weights for an Arm target, compiled to an
    artifact: its qmatmul (and bias kernel) run as aarch64 code under qemu, vs the reference
    within the int8 path's error."""
    from test_cpu_backend import pipeline

    k, n = 160, 40
    module = qmm_module(k, n, bits, group, act_order=act_order, seed=bits)
    out, compiled = compile_to_dir(module, target, str(tmp_path / "out"),
                                   passes=pipeline(target, numerics))
    node = next(nd for nd in compiled.main.nodes if nd.op == "qmatmul")
    assert node.attrs["config"]["numerics"] == numerics
    for m in (1, 5, 17):
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        got, qmms, _ = run_under_qemu(harness, out, compiled, {"x": x}, str(tmp_path))
        assert sum(q.calls for q in qmms.values()) == 1
        want = reference_run(module, {"x": x})["y"]
        assert np.abs(got["y"] - want).max() <= 0.02 * np.abs(want).max()


@needs_cross
def test_mlp_int8_under_qemu(harness, tmp_path):
    """examples/mlp_int4.onnx with numerics=int8 on cpu-arm-dotprod: every kernel of the plan
    under qemu; the whole model within the int8 path's error of the reference."""
    passes = get_target("cpu-arm-dotprod").default_pipeline.replace(
        "cpu-schedule{target=cpu-arm-dotprod}",
        "cpu-schedule{target=cpu-arm-dotprod,numerics=int8}")
    out, compiled = compile_to_dir(MLP, "cpu-arm-dotprod", str(tmp_path / "out"),
                                   passes=passes)
    nodes = [nd for nd in compiled.main.nodes if nd.op == "qmatmul"]
    assert nodes and all(nd.attrs["config"]["numerics"] == "int8" for nd in nodes)
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    got, qmms, lib = run_under_qemu(harness, out, compiled, {"x": x}, str(tmp_path))
    want = reference_run(import_model(MLP), {"x": x})
    assert qmms and all(q.calls == 1 for q in qmms.values()) and lib.called
    for name, value in want.items():
        assert np.abs(got[name] - value).max() <= 0.02 * np.abs(value).max()
