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
