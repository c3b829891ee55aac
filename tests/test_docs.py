"""docs/ is the design's home: generated pages are current, and no link leaves the repository."""
import os
import re

import pytest

from conftest import ROOT, check_golden
from qcompiler.driver.reference_docs import PAGES

DOCS = os.path.join(ROOT, "docs")


@pytest.mark.parametrize("page", sorted(PAGES))
def test_generated_reference_pages_are_current(page, update_goldens):
    """docs/passes.md, ops.md and targets.md equal what the registries generate
    (`make goldens` or `make docs` rewrites them)."""
    check_golden(os.path.join(DOCS, page), PAGES[page](), update_goldens)


def _markdown_files():
    files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "examples", "README.md")]
    files += [os.path.join(DOCS, f) for f in sorted(os.listdir(DOCS)) if f.endswith(".md")]
    return [f for f in files if os.path.exists(f)]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_links_stay_inside_the_repository(path):
    """Every relative link resolves to a file of the repository; nothing points outside it
    (the README is also the wheel's long description)."""
    text = open(path).read()
    assert "shared/DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert resolved.startswith(ROOT + os.sep), f"{path}: link {target} leaves the repository"
        assert os.path.exists(resolved), f"{path}: link {target} does not exist"


def test_docs_index_lists_every_page():
    index = open(os.path.join(DOCS, "README.md")).read()
    for f in os.listdir(DOCS):
        if f.endswith(".md") and f != "README.md":
            assert f"({f})" in index, f"docs/README.md does not link {f}"
