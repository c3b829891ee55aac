"""Shared test options. `make goldens` (pytest --update-goldens) rewrites golden files."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def pytest_configure(config):
    # Tests never touch the user's build cache (~/.cache/qcompiler): one temp dir per session
    # (per xdist worker), removed at the end.
    import tempfile

    config._qc_cache_dir = tempfile.mkdtemp(prefix="qc_test_cache_")
    os.environ["QC_CACHE_DIR"] = config._qc_cache_dir


def pytest_unconfigure(config):
    import shutil

    cache_dir = getattr(config, "_qc_cache_dir", None)
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)


# The ISA flags that choose a code path (ours or onnxruntime's), printed in the header.
HEADER_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                "amx_int8")


def pytest_report_header(config):
    """The CI log says which ISA paths ran: the CPU, its flags, the LLVM -mcpu of target
    ``cpu``, whether the int8 (VNNI) path runs, and whether QC_HOST_ISA is in force."""
    from qcompiler.codegen.cpu import host
    from qcompiler.errors import QCompilerError
    from qcompiler.targets import get_target
    from qcompiler.tuning.device import cpu_name

    try:
        vendor, flags = host.read_cpuinfo()
    except OSError as e:
        return [f"cpu: {cpu_name()}; /proc/cpuinfo unreadable ({e.strerror}): ISA unknown"]
    def marks(fs):
        return " ".join(("+" if f in fs else "-") + f for f in HEADER_FLAGS)

    lines = [f"cpu: {cpu_name()} ({vendor or 'unknown vendor'})",
             f"cpu flags: {marks(flags)}"]
    try:
        isa = host.host_isa_override()
        seen = host.host_flags()[1]
        cpu = host.target_cpu(get_target("cpu"))
    except QCompilerError as e:
        return lines + [f"{host.HOST_ISA_ENV} refused: {e}"]
    if isa:
        lines.append(f"{host.HOST_ISA_ENV}={isa} in force: compiling as for {marks(seen)}")
    else:
        lines.append(f"{host.HOST_ISA_ENV}: unset (real detection)")
    int8 = ("runs" if cpu["vnni"] else "skipped (no AVX-512 VNNI"
            + (f" under {host.HOST_ISA_ENV}={isa})" if isa else ")"))
    lines.append(f"target cpu: -mcpu={cpu['mcpu']}, {cpu['vector_bits']}-bit vectors; "
                 f"int8 VNNI path: {int8}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    # pytest shows report headers only at verbosity >= 0; `make test` runs -q, and CI's log
    # must still say which ISA paths ran. (xdist workers: the controller prints it.)
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if (reporter is None or config.get_verbosity() >= 0 or hasattr(config, "workerinput")
            or config.getoption("no_header", False)):
        return
    for line in pytest_report_header(config):
        reporter.write_line(line)


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite golden files from the current output (review the diff)")


@pytest.fixture
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")


def check_golden(path: str, text: str, update: bool) -> None:
    """Compare ``text`` with the golden file ``path`` (or rewrite it with --update-goldens)."""
    if update or not os.path.exists(path):
        if not update:
            pytest.fail(f"golden file {path} is missing; run `make goldens` and review it")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return
    with open(path) as f:
        want = f.read()
    if want != text:
        import difflib

        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            "golden", "now"))
        pytest.fail(f"{path} differs from the output (run `make goldens` if intended):\n{diff}")


# The CUDA pipelines' passes up to the projection merges (fuse-qkv, fuse-gate-up), for the
# tests of those passes on small decoder exports.
CUDA_PASSES_BEFORE_MERGES = (
    "canonicalize,quantize-weights{bits=4,group=32},canonicalize,fuse-dequant,canonicalize,"
    "compute-dtype{dtype=f16},fuse-rotary,fuse-attention,fold-attention-layout,fuse-kv-concat,"
    "fuse-rmsnorm,fuse-gelu,fuse-epilogue,fuse-elementwise")


def small_llama_onnx(path: str, layers: int, batch: int, seq: int, past: int, seed: int,
                     with_cache: bool = True) -> dict:
    """A Llama-architecture decoder (hidden 128, 4 heads over 2 KV heads) exported to ONNX at
    ``path``; returns its feeds (``past`` cached tokens, none without a cache)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import decoder_models as dm

    cfg = dict(dm.SMALL_LLAMA, hidden=128, heads=4, kv_heads=2, intermediate=192)
    feeds = dm.llama_inputs(cfg, layers, batch, seq, past, seed=seed)
    dm.export_onnx(dm.llama(layers=layers, with_cache=with_cache, **cfg), feeds, path,
                   dynamo=False)
    return feeds
