"""Safe artifacts (issue #18): a loader opens only the files that belong to the artifact, notices
when one was changed, refuses manifests it cannot read, and loads a CUDA artifact without a GPU
(``run`` raises DeviceUnavailableError).

The "nothing outside ran" checks use a real shared library whose constructor writes a marker
file when it is dlopened (built with gcc here): the marker must never appear.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import qcompiler
from qcompiler.driver.api import compile_to_dir
from qcompiler.driver.artifact import read_weights, write_weights
from qcompiler.errors import ArtifactError, DeviceUnavailableError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "examples", "mlp_int4.onnx")

EVIL_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void qc_test_marker(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
int qc_test_symbol(void) { return 1; }
"""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_artifact(tmp_path_factory):
    """One CPU compile per module (TVM builds take seconds); tests mutate copies."""
    out, _ = compile_to_dir(MODEL, "cpu", str(tmp_path_factory.mktemp("cpu") / "art"))
    return out


@pytest.fixture(scope="module")
def ref_artifact(tmp_path_factory):
    out, _ = compile_to_dir(MODEL, "ref", str(tmp_path_factory.mktemp("ref") / "art"))
    return out


def copy_artifact(src, tmp_path, name="art"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def read_manifest(art):
    with open(os.path.join(art, "manifest.json")) as f:
        return json.load(f)


def write_manifest(art, manifest):
    with open(os.path.join(art, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def flip_byte(path, offset=None):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = len(data) // 2 if offset is None else offset
        data[i] ^= 0x01
        f.seek(0)
        f.write(data)


def cpu_library_index(manifest):
    return next(i for i, k in enumerate(manifest["kernels"]) if k.get("impl") == "tvm-llvm")


@pytest.fixture
def evil_library(tmp_path):
    """(a shared library outside every artifact whose constructor writes a marker, marker path)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = outside / "constructor_ran"
    src = outside / "evil.c"
    src.write_text(EVIL_SOURCE)
    lib = outside / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(lib)],
                   check=True, capture_output=True)
    return str(lib), marker


def test_the_marker_library_does_run_when_dlopened(evil_library, tmp_path):
    """The proof below means something: loading this library does write the marker."""
    lib, marker = evil_library
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({lib!r})"], check=True)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# normal artifacts still load and run
# --------------------------------------------------------------------------------------------


def test_cpu_and_ref_artifacts_load_and_run(cpu_artifact, ref_artifact):
    x = np.random.default_rng().standard_normal((5, 64)).astype(np.float32)
    ref = qcompiler.load(ref_artifact)
    cpu = qcompiler.load(cpu_artifact)
    from qcompiler.runtime.reference import run

    want = run(ref.module, {"x": x})["y"]
    np.testing.assert_allclose(ref.run({"x": x})["y"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cpu.run({"x": x})["y"], want, rtol=1e-4, atol=1e-4)
    manifest = read_manifest(cpu_artifact)
    assert manifest["format"] == {"name": "qcompiler-artifact", "version": 1}
    listed = set(manifest["files"])
    assert {"module.qir", "weights.safetensors"} <= listed
    assert {f"kernels/{n}" for n in os.listdir(os.path.join(cpu_artifact, "kernels"))} <= listed
    assert not listed & {"manifest.json", "report.json", "report.txt"}
    for rel, digest in manifest["files"].items():
        assert sha256(os.path.join(cpu_artifact, rel)) == digest


def test_compile_to_dir_is_public(tmp_path):
    out, module = qcompiler.compile_to_dir(MODEL, "ref", str(tmp_path / "out"))
    assert out == str(tmp_path / "out") and module.main is not None
    x = np.random.default_rng().standard_normal((2, 64)).astype(np.float32)
    from qcompiler.runtime.reference import run

    np.testing.assert_allclose(qcompiler.load(out).run({"x": x})["y"], run(module, {"x": x})["y"])


# --------------------------------------------------------------------------------------------
# files outside the artifact: refused before anything is loaded
# --------------------------------------------------------------------------------------------


def _point_library_at(art, name, lib_for_hash):
    """Make the first CPU kernel's manifest entry name ``name``, listed with the hash of the
    library an attacker brought (so that only the path check stands in the way)."""
    manifest = read_manifest(art)
    i = cpu_library_index(manifest)
    manifest["kernels"][i]["library"] = name
    manifest["files"][name] = sha256(lib_for_hash)
    write_manifest(art, manifest)


def test_absolute_library_path_is_refused(cpu_artifact, evil_library, tmp_path):
    lib, marker = evil_library
    art = copy_artifact(cpu_artifact, tmp_path)
    manifest = read_manifest(art)
    i = cpu_library_index(manifest)
    manifest["kernels"][i]["library"] = lib  # not listed in files: the path check comes first
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match=rf"kernels\[{i}\]\.library .*absolute path"):
        qcompiler.load(art)
    assert not marker.exists()
    _point_library_at(art, lib, lib)  # listed too: refused while reading the manifest
    with pytest.raises(ArtifactError, match="absolute path"):
        qcompiler.load(art)
    assert not marker.exists()


def test_dotdot_library_path_is_refused(cpu_artifact, evil_library, tmp_path):
    lib, marker = evil_library
    art = copy_artifact(cpu_artifact, tmp_path / "outside")  # evil.so is art/../evil.so
    manifest = read_manifest(art)
    i = cpu_library_index(manifest)
    manifest["kernels"][i]["library"] = "kernels/../../evil.so"
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match=r"library = 'kernels/\.\./\.\./evil\.so' leads out"):
        qcompiler.load(art)
    _point_library_at(art, "../evil.so", lib)
    with pytest.raises(ArtifactError, match=r"leads out"):
        qcompiler.load(art)
    assert not marker.exists()


def test_symlink_out_of_the_artifact_is_refused(cpu_artifact, evil_library, tmp_path):
    lib, marker = evil_library
    art = copy_artifact(cpu_artifact, tmp_path)
    manifest = read_manifest(art)
    name = manifest["kernels"][cpu_library_index(manifest)]["library"]
    os.remove(os.path.join(art, name))
    os.symlink(lib, os.path.join(art, name))
    manifest["files"][name] = sha256(lib)  # the manifest rewritten to match: still refused
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        qcompiler.load(art)
    assert not marker.exists()


def test_symlinked_kernels_directory_is_refused(cpu_artifact, evil_library, tmp_path):
    lib, marker = evil_library
    art = copy_artifact(cpu_artifact, tmp_path)
    manifest = read_manifest(art)
    name = manifest["kernels"][cpu_library_index(manifest)]["library"]
    moved = str(tmp_path / "elsewhere")
    shutil.move(os.path.join(art, "kernels"), moved)
    os.symlink(moved, os.path.join(art, "kernels"))
    shutil.copy(lib, os.path.join(art, name))  # lands in the directory outside
    manifest["files"][name] = sha256(lib)
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        qcompiler.load(art)
    assert not marker.exists()


def test_unlisted_library_is_not_loaded(cpu_artifact, evil_library, tmp_path):
    """A library inside kernels/ that the manifest's files do not list: naming it is refused,
    and lying beside the kernels it is never loaded."""
    lib, marker = evil_library
    art = copy_artifact(cpu_artifact, tmp_path)
    shutil.copy(lib, os.path.join(art, "kernels", "extra.so"))
    x = np.random.default_rng().standard_normal((3, 64)).astype(np.float32)
    got = qcompiler.load(art).run({"x": x})["y"]  # an unlisted file beside the kernels is fine
    np.testing.assert_allclose(got, qcompiler.load(cpu_artifact).run({"x": x})["y"])
    manifest = read_manifest(art)
    i = cpu_library_index(manifest)
    manifest["kernels"][i]["library"] = "kernels/extra.so"
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match=r"'kernels/extra\.so' is not among the artifact's "
                                            r"verified files"):
        qcompiler.load(art)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# integrity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["library", "weights.safetensors", "module.qir"])
def test_a_changed_file_is_refused(cpu_artifact, tmp_path, which):
    art = copy_artifact(cpu_artifact, tmp_path)
    manifest = read_manifest(art)
    rel = manifest["kernels"][cpu_library_index(manifest)]["library"] if which == "library" \
        else which
    flip_byte(os.path.join(art, rel))
    with pytest.raises(ArtifactError, match=rf"{rel} was changed after the compile"):
        qcompiler.load(art)


def test_a_missing_file_is_refused(ref_artifact, tmp_path):
    art = copy_artifact(ref_artifact, tmp_path)
    os.remove(os.path.join(art, "weights.safetensors"))
    with pytest.raises(ArtifactError, match="weights.safetensors: missing"):
        qcompiler.load(art)


# --------------------------------------------------------------------------------------------
# format version and malformed manifests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, message", [
    ({"name": "qcompiler-artifact", "version": 2}, "format version 2 was written by a newer "
                                                   "qcompiler; this qcompiler reads version 1"),
    ({"name": "qcompiler-artifact", "version": 0}, "unknown format version 0"),
    ({"name": "something-else", "version": 1}, "format 'something-else' is not"),
    ({"name": "qcompiler-artifact", "version": "1"}, "'format.version' must be int, got str"),
    ({"name": "qcompiler-artifact", "version": True}, "'format.version' must be int, got bool"),
    (None, "no format version"),
])
def test_format_version(ref_artifact, tmp_path, fmt, message):
    art = copy_artifact(ref_artifact, tmp_path)
    manifest = read_manifest(art)
    if fmt is None:
        del manifest["format"]
    else:
        manifest["format"] = fmt
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match=message):
        qcompiler.load(art)


def _delete(path):
    def mutate(m):
        *parents, last = path
        for p in parents:
            m = m[p]
        del m[last]
    return mutate


def _set(path, value):
    def mutate(m):
        *parents, last = path
        for p in parents:
            m = m[p]
        m[last] = value
    return mutate


MANIFEST_MUTATIONS = {
    "missing kernels": (_delete(["kernels"]), "missing key 'kernels'"),
    "kernels not a list": (_set(["kernels"], {"0": {}}), "'kernels' must be list, got dict"),
    "kernel record not an object": (_set(["kernels", 0], "qmatmul"), r"kernels\[0\] must be an"),
    "kernel without op": (_delete(["kernels", 0, "op"]), r"missing key 'kernels\[0\]\.op'"),
    "missing target": (_delete(["target"]), "missing key 'target'"),
    "target a number": (_set(["target"], 3), "'target' must be str, got int"),
    "unknown backend": (_set(["backend"], "tpu"), "unknown backend 'tpu'"),
    "inputs not a list": (_set(["inputs"], "x"), "'inputs' must be list"),
    "input without name": (_delete(["inputs", 0, "name"]), r"missing key 'inputs\[0\]\.name'"),
    "shape with a float": (_set(["outputs", 0, "shape"], [1.5]), r"outputs\[0\]\.shape holds 1.5"),
    "missing files": (_delete(["files"]), "missing key 'files'"),
    "files a list": (_set(["files"], ["module.qir"]), "'files' must be dict"),
    "weights not listed": (_delete(["files", "weights.safetensors"]),
                           "'files' does not list weights.safetensors"),
    "digest not hex": (_set(["files", "module.qir"], "abc"), "must be a sha256 hex digest"),
    "absolute file": (_set(["files", "/etc/passwd"], "0" * 64), "absolute path"),
    "dotdot file": (_set(["files", "../x"], "0" * 64), "leads out"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_MUTATIONS))
def test_malformed_manifest(ref_artifact, tmp_path, case):
    mutate, message = MANIFEST_MUTATIONS[case]
    art = copy_artifact(ref_artifact, tmp_path)
    manifest = read_manifest(art)
    mutate(manifest)
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match=message):
        qcompiler.load(art)


@pytest.mark.parametrize("case", ["library missing", "library a number", "built missing"])
def test_malformed_kernel_records(cpu_artifact, tmp_path, case):
    art = copy_artifact(cpu_artifact, tmp_path)
    manifest = read_manifest(art)
    i = cpu_library_index(manifest)
    if case == "library missing":
        del manifest["kernels"][i]["library"]
        message = rf"missing key 'kernels\[{i}\]\.library'"
    elif case == "library a number":
        manifest["kernels"][i]["library"] = 7
        message = rf"'kernels\[{i}\]\.library' must be str, got int"
    else:  # a CUDA record without "built"
        manifest["kernels"][i]["impl"] = "cuda"
        manifest["kernels"][i]["symbol"] = "qc_qmm_x"
        message = rf"missing key 'kernels\[{i}\]\.built'"
    write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match=message):
        qcompiler.load(art)


@pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2]", "\xff\xfe"])
def test_unreadable_manifest(ref_artifact, tmp_path, text):
    art = copy_artifact(ref_artifact, tmp_path)
    with open(os.path.join(art, "manifest.json"), "wb") as f:
        f.write(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match="manifest.json: (not valid JSON|must hold a JSON)"):
        qcompiler.load(art)


def test_truncated_manifest(ref_artifact, tmp_path):
    art = copy_artifact(ref_artifact, tmp_path)
    path = os.path.join(art, "manifest.json")
    with open(path, "rb") as f:
        data = f.read()
    for cut in (1, len(data) // 3, len(data) // 2, len(data) - 3):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ArtifactError, match="manifest.json: not valid JSON"):
            qcompiler.load(art)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a qcompiler artifact"):
        qcompiler.load(tmp_path)


# --------------------------------------------------------------------------------------------
# weights re-verified at load
# --------------------------------------------------------------------------------------------


def _rewrite_weights(art, change):
    """Apply ``change(tensors)`` to the weights and record the new hash (the weights are what
    the load must refuse, not the hash)."""
    path = os.path.join(art, "weights.safetensors")
    tensors = read_weights(path)
    change(tensors)
    write_weights(path, tensors)
    manifest = read_manifest(art)
    manifest["files"]["weights.safetensors"] = sha256(path)
    write_manifest(art, manifest)


@pytest.mark.parametrize("code", [200, 16])
def test_out_of_range_u4_code_is_refused(ref_artifact, tmp_path, code):
    art = copy_artifact(ref_artifact, tmp_path)
    rng = np.random.default_rng()
    i, j = rng.integers(0, 64), rng.integers(0, 128)

    def change(t):
        t["fc0.weight_Q4.codes"][i, j] = code
    _rewrite_weights(art, change)
    with pytest.raises(ArtifactError, match=rf"tensor 'fc0\.weight_Q4\.codes' holds codes in "
                                            rf"\[0, {code}\], outside the range of u4 \[0, 15\]"):
        qcompiler.load(art)


def test_weights_with_another_shape_or_dtype_are_refused(ref_artifact, tmp_path):
    art = copy_artifact(ref_artifact, tmp_path)
    _rewrite_weights(art, lambda t: t.update({"fc1.bias": t["fc1.bias"][:100]}))
    with pytest.raises(ArtifactError, match=r"tensor 'fc1\.bias' has shape \[100\]; module.qir "
                                            r"declares \[128\]"):
        qcompiler.load(art)
    art = copy_artifact(ref_artifact, tmp_path, "art2")
    _rewrite_weights(art, lambda t: t.update({"fc2.bias": t["fc2.bias"].astype(np.float64)}))
    with pytest.raises(ArtifactError, match=r"tensor 'fc2\.bias' is float64; module.qir declares "
                                            r"f32"):
        qcompiler.load(art)
    art = copy_artifact(ref_artifact, tmp_path, "art3")
    _rewrite_weights(art, lambda t: t.pop("fc0.bias"))
    with pytest.raises(ArtifactError, match="module.qir: .*fc0.bias"):
        qcompiler.load(art)


# --------------------------------------------------------------------------------------------
# FPGA: the top-level name and the C simulation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fpga_artifact(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from make_example_model import float_mlp

    passes = ("canonicalize,quantize-weights{bits=4,group=16},fuse-dequant,canonicalize,"
              "hls-fixed-point,hls-parallelism{target=fpga-pynq-z2}")
    out, _ = compile_to_dir(float_mlp(sizes=(32, 16, 8), seed=5, act="Relu"), "fpga-pynq-z2",
                            str(tmp_path_factory.mktemp("fpga") / "art"), passes)
    return out


@pytest.mark.parametrize("top", ["../../evil", "/tmp/evil", "x -o /tmp/y", "", 3])
def test_fpga_top_name_must_be_an_identifier(fpga_artifact, tmp_path, top):
    art = copy_artifact(fpga_artifact, tmp_path)
    manifest = read_manifest(art)
    manifest["kernels"][0]["top"] = top
    write_manifest(art, manifest)
    message = "must be str" if not isinstance(top, str) else "is not a C identifier"
    with pytest.raises(ArtifactError, match=message):
        qcompiler.load(art)


def test_fpga_sources_are_verified_and_no_planted_executable_runs(fpga_artifact, tmp_path):
    pytest.importorskip("hls4ml")
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    art = copy_artifact(fpga_artifact, tmp_path)
    top = read_manifest(art)["kernels"][0]["top"]
    # A prebuilt "simulation" where the old runner looked for one: it must not be run.
    marker = tmp_path / "planted_ran"
    planted = os.path.join(art, "kernels", "build", f"{top}_csim")
    os.makedirs(os.path.dirname(planted))
    with open(planted, "w") as f:
        f.write(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    os.chmod(planted, 0o755)
    os.utime(planted, (2 ** 31, 2 ** 31))  # newer than the sources
    m = qcompiler.load(art)
    x = np.random.default_rng().standard_normal((3, 32)).astype(np.float32)
    got = m.run({"x": x})["y"]
    from qcompiler.runtime.reference import run

    want = run(m.module, {"x": x})["y"]
    assert np.abs(got - want).max() <= 2e-2 * max(np.abs(want).max(), 1.0)
    assert not marker.exists()
    flip_byte(os.path.join(art, "kernels", f"{top}.cpp"))
    with pytest.raises(ArtifactError, match=rf"kernels/{top}\.cpp was changed"):
        qcompiler.load(art)


# --------------------------------------------------------------------------------------------
# CUDA without a GPU: lazy device loading
# --------------------------------------------------------------------------------------------



def test_cuda_artifact_loads_without_a_gpu_and_run_says_why(tmp_path, evil_library):
    from cuda_gpu_util import gpu_reason
    from qcompiler.codegen.cuda.build import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA compile writes no libraries")
    if not gpu_reason():
        pytest.skip("a CUDA GPU is present: this test is for machines without one")
    from qcompiler.codegen.cuda import cases

    # One f16 qmatmul (one kernel library beside the runtime's: nvcc takes seconds per file).
    model = cases.make_module(cases.Case(k=64, n=32, bits=4, zero_point=True, group=32))
    out = str(tmp_path / "cuda")
    m = qcompiler.compile(model, target="cuda-sm90", output_dir=out)  # compiles, then loads
    assert m.target == "cuda-sm90"
    x = np.random.default_rng().standard_normal((2, 64)).astype(np.float16)
    with pytest.raises(DeviceUnavailableError,
                       match="this artifact targets cuda-sm90; no CUDA device here: "):
        m.run({"x": x})
    with pytest.raises(DeviceUnavailableError, match="targets cuda-sm90"):
        qcompiler.load(out).run({"x": x})  # again, from the directory
    # The checks still run at load: a library outside the artifact, then a changed file.
    lib, marker = evil_library
    manifest = read_manifest(out)
    assert "kernels/qc_runtime.so" in manifest["files"]
    for name, message in ((lib, "absolute path"), ("../../outside/evil.so", "leads out")):
        bad = copy_artifact(out, tmp_path, "bad")
        changed = read_manifest(bad)
        changed["kernels"][0]["library"] = name
        write_manifest(bad, changed)
        with pytest.raises(ArtifactError, match=rf"kernels\[0\]\.library = .*{message}"):
            qcompiler.load(bad)
        shutil.rmtree(bad)
    assert not marker.exists()
    flip_byte(os.path.join(out, "kernels", "qc_runtime.so"))
    with pytest.raises(ArtifactError, match="kernels/qc_runtime.so was changed"):
        qcompiler.load(out)
