"""Kernels built once per key, the build cache across compiles, parallel builds, progress.

The model: a 4-bit MatMulNBits MLP 64 -> 64 -> 64 -> 64 -> 128, so three qmatmuls have one
shape and config (one shared library) and the last is a second kernel (an N of 32 would not
do: the kernels pad N to a whole column tile, 64 with AVX-512, so it shares the library).
Every compile here passes its cache explicitly or points QC_CACHE_DIR at a temp dir (conftest
already keeps the whole session off the user's cache).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import unittest.mock

import numpy as np
import onnx
import pytest

import qcompiler
from qcompiler.codegen import build
from qcompiler.driver.api import compile_to_dir, import_model, run_pipeline
from qcompiler.runtime.reference import run as reference_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (64, 64, 64, 64, 128)
REPEATED = 3  # the three 64 x 64 layers


def _cpu_available() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


needs_tvm = pytest.mark.skipif(not _cpu_available(), reason="the cpu target needs TVM")


@pytest.fixture(scope="module")
def repeated_model(tmp_path_factory) -> str:
    from onnx_models import IR_VERSION, _examples_module

    examples = _examples_module()
    model = examples.quantize_matmul_nbits(examples.float_mlp(SIZES, seed=3), bits=4,
                                           block_size=32, symmetric=False, accuracy_level=0)
    model.ir_version = IR_VERSION
    path = str(tmp_path_factory.mktemp("model") / "repeated.onnx")
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def first_compile(repeated_model, tmp_path_factory):
    """The repeated model compiled once (jobs=1) into an empty cache: (artifact, cache)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    out = str(tmp_path_factory.mktemp("first"))
    compile_to_dir(repeated_model, "cpu", out, cache=cache, jobs=1)
    return out, cache


def _json(out: str, name: str) -> dict:
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def _libraries(out: str, prefix: str = "") -> list[str]:
    return sorted(f for f in os.listdir(os.path.join(out, "kernels"))
                  if f.endswith(".so") and f.startswith(prefix))


def _qmm_builds(out: str) -> list[dict]:
    """The build records of the qmatmul kernels (the backend may build other libraries)."""
    return [r for r in _json(out, "report.json")["build"]["per_kernel"]
            if r["library"].startswith("qmm_")]


def _outputs(out: str, x: np.ndarray) -> np.ndarray:
    return qcompiler.load(out).run({"x": x})["y"]


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, SIZES[0])).astype(np.float32)


def _tree(path: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return files


# --------------------------------------------------------------------------------------------
# end to end on the cpu target
# --------------------------------------------------------------------------------------------


@needs_tvm
def test_identical_layers_share_one_library(first_compile, repeated_model):
    out, cache = first_compile
    calls = [c for c in _json(out, "manifest.json")["kernels"] if c["impl"] == "tvm-llvm"]
    assert len(calls) == len(SIZES) - 1
    libraries = [c["library"] for c in calls]
    assert len(set(libraries[:REPEATED])) == 1      # the three 64 x 64 layers: one library
    assert libraries[REPEATED] != libraries[0]
    assert len({c["kernel_key"] for c in calls}) == 2
    for c in calls:  # the file name comes from the key; the runner reads the path as written
        assert c["library"] == f"kernels/qmm_{c['kernel_key'][:12]}.so"
        assert c["source"] == f"kernels/qmm_{c['kernel_key'][:12]}.tir.py"
    assert _libraries(out, "qmm_") == sorted({os.path.basename(p) for p in libraries})
    b = _json(out, "report.json")["build"]
    assert (b["built"], b["cache_hits"], b["jobs"]) == (b["kernels"], 0, 1)
    qmm = _qmm_builds(out)
    assert sorted(len(r["nodes"]) for r in qmm) == [1, REPEATED]
    assert all(r["cache"] == "miss" for r in qmm)
    assert f"backend build: {b['kernels']} distinct kernels, {b['kernels']} built, 0 from the " \
        "cache, 1 jobs" in open(os.path.join(out, "report.txt")).read()
    # every node still computes its own layer: compare with the reference interpreter
    ref_module, _, _ = run_pipeline(import_model(repeated_model), "canonicalize,fuse-dequant")
    for rows in (1, 5):
        x = _x(rows, seed=rows)
        want = reference_run(ref_module, {"x": x})["y"]
        got = _outputs(out, x)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


@needs_tvm
def test_second_compile_with_the_same_cache_builds_nothing(first_compile, repeated_model,
                                                          tmp_path):
    first, cache = first_compile
    out = str(tmp_path / "second")
    compile_to_dir(repeated_model, "cpu", out, cache=cache, jobs=2)
    b = _json(out, "report.json")["build"]
    assert (b["built"], b["cache_hits"]) == (0, b["kernels"])
    assert all(r["cache"] == "hit" for r in b["per_kernel"])
    assert len(_qmm_builds(out)) == 2
    # the artifact is self-contained: the libraries were copied in, bytes as built
    assert _libraries(out) == _libraries(first)
    for name in _libraries(out):
        assert not os.path.islink(os.path.join(out, "kernels", name))
    assert _tree(os.path.join(out, "kernels")) == _tree(os.path.join(first, "kernels"))
    x = _x(3, seed=11)
    np.testing.assert_array_equal(_outputs(out, x), _outputs(first, x))


@needs_tvm
def test_no_cache_builds_and_neither_reads_nor_writes_the_cache(first_compile, repeated_model,
                                                                tmp_path):
    """`qcompile --no-cache -j 1` with QC_CACHE_DIR at a full cache: builds, leaves it as is."""
    _, cache = first_compile
    before = _tree(cache)
    out = str(tmp_path / "nocache")
    env = {**os.environ, "QC_CACHE_DIR": cache}
    proc = subprocess.run([sys.executable, "-m", "qcompiler.driver.cli", repeated_model,
                           "--target", "cpu", "-o", out, "--no-cache", "-j", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    b = _json(out, "report.json")["build"]
    assert (b["built"], b["cache_hits"], b["cache"]) == (b["kernels"], 0, None)
    assert f"{b['kernels']} distinct kernels: {b['kernels']} built, 0 cached" in last
    assert last.endswith(" s")
    assert _tree(cache) == before


@needs_tvm
def test_api_cache_false_and_jobs_2_give_the_artifact_of_jobs_1(first_compile, repeated_model,
                                                                 tmp_path, monkeypatch):
    """cache=False writes nothing to QC_CACHE_DIR; two parallel builds give the same kernels
    and the same manifest as the serial build of the first compile."""
    first, _ = first_compile
    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("QC_CACHE_DIR", str(user_cache))
    out = str(tmp_path / "jobs2")
    compile_to_dir(repeated_model, "cpu", out, cache=False, jobs=2)
    assert not user_cache.exists()
    b = _json(out, "report.json")["build"]
    assert (b["built"], b["jobs"]) == (b["kernels"], 2)
    assert _tree(os.path.join(out, "kernels")) == _tree(os.path.join(first, "kernels"))
    assert _json(out, "manifest.json") == _json(first, "manifest.json")


@needs_tvm
def test_truncated_cache_entry_is_rebuilt_not_loaded(first_compile, repeated_model, tmp_path):
    first, cache = first_compile
    broken = str(tmp_path / "cache")
    shutil.copytree(cache, broken)
    key = _qmm_builds(first)[0]["key"]
    victim = os.path.join(broken, "kernels", f"{key}.entry")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    out = str(tmp_path / "out")
    compile_to_dir(repeated_model, "cpu", out, cache=broken, jobs=1)
    states = {r["key"]: r["cache"] for r in _json(out, "report.json")["build"]["per_kernel"]}
    assert states.pop(key) == "rebuilt-corrupt"
    assert set(states.values()) == {"hit"}
    assert os.path.getsize(victim) == size  # the entry was written again, whole
    assert _tree(os.path.join(out, "kernels")) == _tree(os.path.join(first, "kernels"))
    x = _x(2, seed=5)
    np.testing.assert_array_equal(_outputs(out, x), _outputs(first, x))


# --------------------------------------------------------------------------------------------
# the pieces, without TVM
# --------------------------------------------------------------------------------------------


def test_cache_entry_round_trip_and_corruption(tmp_path):
    cache = build.BuildCache(str(tmp_path / "c"))
    lib = tmp_path / "lib.so"
    data = os.urandom(4096)
    lib.write_bytes(data)
    key = build.kernel_key("source", "flags", "tool 1")
    assert cache.fetch(key, str(tmp_path / "miss.so")) == "miss"
    cache.store(key, str(lib))
    assert cache.fetch(key, str(tmp_path / "hit.so")) == "hit"
    assert (tmp_path / "hit.so").read_bytes() == data
    entry = tmp_path / "c" / "kernels" / f"{key}.entry"
    raw = entry.read_bytes()
    # one flipped byte: same size, other hash
    entry.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    assert cache.fetch(key, str(tmp_path / "bad.so")) == "corrupt"
    entry.write_bytes(raw[: len(raw) // 3])
    assert cache.fetch(key, str(tmp_path / "bad.so")) == "corrupt"
    entry.write_bytes(b"")
    assert cache.fetch(key, str(tmp_path / "bad.so")) == "corrupt"
    assert not (tmp_path / "bad.so").exists()
    assert not [f for f in os.listdir(tmp_path / "c" / "kernels") if f.endswith(".tmp")]
    assert build.BuildCache(None).fetch(key, str(tmp_path / "x.so")) == "miss"


def test_kernel_key_covers_source_flags_tool_and_version(monkeypatch):
    base = build.kernel_key("src", "llvm -mcpu=znver3", "tvm 0.27")
    assert base == build.kernel_key("src", "llvm -mcpu=znver3", "tvm 0.27")
    others = {build.kernel_key("src2", "llvm -mcpu=znver3", "tvm 0.27"),
              build.kernel_key("src", "llvm -mcpu=sapphirerapids", "tvm 0.27"),
              build.kernel_key("src", "llvm -mcpu=znver3", "tvm 0.28")}
    monkeypatch.setattr(qcompiler.version, "__version__", "99.0")
    others.add(build.kernel_key("src", "llvm -mcpu=znver3", "tvm 0.27"))
    assert len(others) == 4 and base not in others


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("QC_CACHE_DIR", str(tmp_path / "explicit"))
    assert build.cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("QC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == str(tmp_path / "xdg" / "qcompiler")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build.cache_dir() == str(tmp_path / "home" / ".cache" / "qcompiler")


def _write_bytes(payload: bytes, path: str) -> None:
    with open(path, "wb") as f:
        f.write(payload)


def _fail(path: str) -> None:
    raise OSError("linker exploded")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("jobs", [1, 2])
def test_builder_builds_misses_in_parallel_and_counts_hits(tmp_path, jobs):
    import functools

    cache = str(tmp_path / "cache")
    builds = [build.KernelBuild(build.kernel_key(f"src{i}", "", ""), f"k{i}.so",
                                functools.partial(_write_bytes, bytes([i]) * 100), [f"n{i}"])
              for i in range(3)]
    first = build.Builder(cache, jobs=jobs, progress=False)
    first.build_many(builds, str(tmp_path / "a"))
    assert first.report()["built"] == 3
    for i in range(3):
        assert (tmp_path / "a" / f"k{i}.so").read_bytes() == bytes([i]) * 100
    terminal = _Terminal()
    second = build.Builder(cache, jobs=jobs, progress=True)
    with unittest.mock.patch.object(sys, "stderr", terminal):
        second.build_many(builds, str(tmp_path / "b"))
    r = second.report()
    assert (r["built"], r["cache_hits"], r["kernels"]) == (0, 3, 3)
    assert terminal.getvalue().rstrip().endswith("building kernels 3/3 (3 cached)")


def _collect_then_write(payload: bytes, path: str) -> None:
    import gc

    gc.collect()  # what a worker's allocations may trigger at any time
    _write_bytes(payload, path)


class _Finalized:
    """A cycle's member whose destruction records the process it happened in."""

    def __init__(self, log: str):
        self.log, self.me = log, self

    def __del__(self):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_forked_build_workers_never_collect_the_parents_garbage(tmp_path):
    """Garbage the parent had not collected (a cycle holding an onnxruntime session, whose
    destructor waits for the parent's threads) must not be destroyed in a forked worker: a
    CI run hung so. The parent collects before forking and freezes the rest."""
    import functools
    import gc

    log = str(tmp_path / "finalized")
    builds = [build.KernelBuild(build.kernel_key(f"gc{i}", "", ""), f"g{i}.so",
                                functools.partial(_collect_then_write, b"x"), [f"n{i}"])
              for i in range(2)]
    was_enabled = gc.isenabled()
    gc.disable()  # (so that the cycle is still garbage, uncollected, when the workers fork)
    try:
        _Finalized(log)
        build.Builder(False, jobs=2, progress=False).build_many(builds, str(tmp_path / "out"))
    finally:
        if was_enabled:
            gc.enable()
    gc.collect()
    pids = open(log).read().split() if os.path.exists(log) else []
    assert pids == [str(os.getpid())]  # destroyed once, here, not in a worker


def test_progress_is_silent_off_a_terminal():
    stream = io.StringIO()
    bar = build.Progress(2, stream=stream)
    bar.step(cached=True)
    bar.step(cached=False)
    bar.close()
    assert stream.getvalue() == ""
    tty = _Terminal()
    bar = build.Progress(2, stream=tty)
    bar.step(cached=True)
    bar.step(cached=False)
    bar.close()
    assert tty.getvalue() == ("\rbuilding kernels 1/2 (1 cached)"
                              "\rbuilding kernels 2/2 (1 cached)\n")


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_build_names_its_kernel_and_nodes(tmp_path, jobs):
    import functools

    builds = [build.KernelBuild("a" * 64, "ok.so", functools.partial(_write_bytes, b"x"), ["y0"]),
              build.KernelBuild("b" * 64, "bad.so", _fail, ["y1", "y2"])]
    with pytest.raises(build.KernelBuildError, match=r"bad\.so \(for %y1, %y2\).*linker"):
        build.Builder(False, jobs=jobs, progress=False).build_many(builds, str(tmp_path))


def test_jobs_below_one_is_refused():
    from qcompiler.errors import ConfigError

    with pytest.raises(ConfigError, match="jobs=0"):
        build.Builder(False, jobs=0)


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    """Two processes storing one key over and over while this one reads: every read is a
    whole entry (hit) or none (miss), never a corrupt one (temp file + rename)."""
    import multiprocessing

    root = str(tmp_path / "c")
    key = build.kernel_key("concurrent", "", "")
    libs = []
    for i in range(2):
        lib = tmp_path / f"lib{i}.so"
        lib.write_bytes(bytes([i + 1]) * (1 << 20))  # 1 MiB: a write takes a while
        libs.append(str(lib))
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_store_repeatedly, args=(root, key, lib, 30)) for lib in libs]
    for w in writers:
        w.start()
    seen = set()
    dest = str(tmp_path / "dest.so")
    while any(w.is_alive() for w in writers):
        state = build.BuildCache(root).fetch(key, dest)
        seen.add(state)
        if state == "hit":
            data = open(dest, "rb").read()
            assert data in (bytes([1]) * (1 << 20), bytes([2]) * (1 << 20))
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert "corrupt" not in seen
    assert build.BuildCache(root).fetch(key, dest) == "hit"


def _store_repeatedly(root: str, key: str, lib: str, times: int) -> None:
    cache = build.BuildCache(root)
    for _ in range(times):
        cache.store(key, lib)


def _two_cuda_layers(k: int = 128):
    """y = qmatmul(qmatmul(x, w0), w1): two layers of one shape, f16 activations."""
    from qcompiler.codegen.cuda import cases
    from qcompiler.ir import Function, Module
    from qcompiler.ir.core import constant_node
    from qcompiler.ir.ops import infer_types
    from qcompiler.ir.types import tensor

    case = cases.Case(k=k, n=k, bits=4, zero_point=True, group=64)
    scheme = case.scheme()
    lo, hi = scheme.dtype.int_range()
    rng = np.random.default_rng(7)
    m = Module("two_layers")
    fn = m.add_function(Function("main"))
    h = fn.add_arg("x", tensor(["batch", k], case.dtype))
    for i in range(2):
        codes = rng.integers(lo, hi + 1, (k, k)).astype(scheme.dtype.np_dtype)
        w = constant_node(fn, m, codes, tensor((k, k), scheme.dtype), f"w{i}").result
        scale = (rng.uniform(0.5, 1.5, (k // 64, k)) / ((hi - lo) * np.sqrt(k))).astype(
            np.float16)
        s = constant_node(fn, m, scale, tensor((k // 64, k), "f16"), f"s{i}").result
        zc = rng.integers(lo, hi + 1, (k // 64, k)).astype(scheme.dtype.np_dtype)
        z = constant_node(fn, m, zc, tensor((k // 64, k), scheme.dtype), f"z{i}").result
        operands = [h, w, s, z, None, None, None, None]
        attrs = {"w_scheme": scheme, "act": "float"}
        types = infer_types("qmatmul", [v.type if v is not None else None for v in operands],
                            attrs, [None] * 8)
        h = fn.make_node("qmatmul", operands, types, attrs, names=[f"y{i}"]).result
    fn.set_outputs([h], ["y"])
    return m


def test_cuda_layers_of_one_shape_share_one_source_and_library_name(tmp_path, monkeypatch):
    """Without nvcc (made absent here: building takes long) the sources are still written:
    one .cu for both layers, its symbol from the key, and both records name it."""
    from qcompiler.codegen.cuda import build as nv

    monkeypatch.setattr(nv, "find_nvcc", lambda: None)
    out = str(tmp_path / "cuda")
    compile_to_dir(_two_cuda_layers(), "cuda-sm90", out, cache=str(tmp_path / "cache"))
    records = _json(out, "manifest.json")["kernels"]
    assert [r["result"] for r in records] == ["y0", "y1"]
    assert len({(r["symbol"], r["source"], r["library"], r["kernel_key"]) for r in records}) == 1
    symbol = records[0]["symbol"]
    assert symbol == f"qc_qmm_{records[0]['kernel_key'][:12]}"
    sources = sorted(f for f in os.listdir(os.path.join(out, "kernels")) if f.endswith(".cu"))
    assert sources == [symbol + ".cu", "qc_runtime.cu"]
    text = open(os.path.join(out, "kernels", symbol + ".cu")).read()
    assert "%y0, %y1" in text.splitlines()[0] and f"{symbol}_run(" in text
    assert not any(r["built"] for r in records)
