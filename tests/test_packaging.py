"""passes/, codegen/ and targets/ install as qcompiler.passes/.codegen/.targets from both a
wheel and an editable install (setuptools' package-dir mapping; see docs/design.md, "Layout")."""
import os
import subprocess
import sys
import zipfile

import pytest

import qcompiler
import qcompiler.codegen
import qcompiler.passes
import qcompiler.targets
from qcompiler.registry import BACKENDS, PASSES, get_backend, get_pass_class
from qcompiler.targets import all_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT_CHECK = """
import qcompiler, qcompiler.passes, qcompiler.codegen, qcompiler.targets
from qcompiler.registry import PASSES, BACKENDS, get_pass_class, get_backend
for name in PASSES: assert get_pass_class(name).name == name
for name in BACKENDS: get_backend(name)
assert len(qcompiler.targets.all_targets()) >= 12
print(qcompiler.passes.__file__)
print(qcompiler.targets.__file__)
"""


def test_this_install_maps_the_top_level_folders():
    # The test environment is the editable install that `make test` creates.
    assert os.path.samefile(os.path.dirname(qcompiler.passes.__file__), os.path.join(ROOT, "passes"))
    assert os.path.samefile(os.path.dirname(qcompiler.codegen.__file__),
                            os.path.join(ROOT, "codegen"))
    assert os.path.samefile(os.path.dirname(qcompiler.targets.__file__),
                            os.path.join(ROOT, "targets"))
    for name in PASSES:
        assert get_pass_class(name).name == name
    for name in BACKENDS:
        get_backend(name)
    assert "ref" in all_targets()


@pytest.mark.slow
def test_wheel_contains_and_imports_every_package(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), ROOT], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("qcompiler-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ["qcompiler/passes/canonicalize.py", "qcompiler/passes/fuse_dequant.py",
                 "qcompiler/codegen/reference/backend.py", "qcompiler/targets/__init__.py",
                 "qcompiler/targets/cuda.toml", "qcompiler/ir/parser.py"]:
        assert path in names, f"{path} missing from the wheel"
    assert not any(n.startswith(("passes/", "codegen/", "targets/")) for n in names)
    # Every data file the backends open at compile time (templates, CUDA headers and sources,
    # C harnesses, target tables) ships: a wheel without them compiles nothing.
    data = [os.path.relpath(os.path.join(d, f), ROOT)
            for top in ("codegen", "targets") for d, _, fs in os.walk(os.path.join(ROOT, top))
            for f in fs if f.endswith((".j2", ".cuh", ".cu", ".toml"))]
    assert data
    for rel in data:
        shipped = "qcompiler/" + rel.replace(os.sep, "/")
        assert shipped in names, f"{shipped} missing from the wheel"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    # The wheel's copy comes first on sys.path, so it is the one imported (checked below).
    code = f"import sys; sys.path.insert(0, {str(site)!r})\n" + IMPORT_CHECK
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=tmp_path).stdout.split()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site))
