"""The package's structure: one-way imports between the layers and no import cycle.

Every module of qcompiler (``qcompiler/``, and ``passes/``, ``codegen/``, ``targets/``, which
install as ``qcompiler.passes`` ...) is parsed with ``ast``; every import counts, at the top
of the file or inside a function (a lazy import is still a dependency). The rules:

- ``codegen/`` never imports ``passes/``: a backend's pass decides for that backend and
  imports it, never the reverse;
- ``qcompiler/ir`` and ``qcompiler/runtime`` import neither ``passes/`` nor ``codegen/``
  (the registry names passes and backends as lazy strings, which are not imports);
- the module import graph has no cycle (networkx's ``simple_cycles``), except the cycles
  listed in KNOWN_CYCLES, each of which must still exist (so the list only shrinks).
"""
from __future__ import annotations

import ast
import os

import networkx as nx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGE_DIRS = {"qcompiler": "qcompiler", "passes": "qcompiler.passes",
                "codegen": "qcompiler.codegen", "targets": "qcompiler.targets"}

# Cycles inside files that other work was changing when this test was written; each is a set
# of modules that must not grow. Remove an entry when its cycle is gone (the test says so).
KNOWN_CYCLES = [
    # the CUDA backend: config and bench_support call into tuning, tuning into both
    {"qcompiler.codegen.cuda.tuning", "qcompiler.codegen.cuda.config",
     "qcompiler.codegen.cuda.bench_support", "qcompiler.codegen.cuda.backend"},
    # the ONNX frontend and its contrib-op importers register into each other
    {"qcompiler.frontends.onnx", "qcompiler.frontends.onnx_contrib"},
    # the IR: the op table and the elementwise body type each other; the body evaluates
    # through the reference runtime's op implementations
    {"qcompiler.ir.core", "qcompiler.ir.ops", "qcompiler.ir.elementwise_body",
     "qcompiler.runtime.reference"},
]


def _modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the installed package."""
    out = {}
    for folder, package in PACKAGE_DIRS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for f in filenames:
                if f.endswith(".py"):
                    stem = f[:-3]
                    out[".".join([package] + parts + ([] if stem == "__init__" else [stem]))] = \
                        os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imported_names(name: str, path: str) -> list[tuple[str, int]]:
    """(imported dotted name, line) for every import statement anywhere in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package upwards
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub when there is one
            out += [(f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module,
                     node.lineno) for a in node.names]
    return out


def _owning_module(dotted: str):
    """The module of ours that ``dotted`` names (a module, or a name inside one), or None."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for name, path in MODULES.items():
        for dotted, line in _imported_names(name, path):
            target = _owning_module(dotted)
            if target is not None and target != name:
                graph.add_edge(name, target, line=line)
    return graph


GRAPH = import_graph()


def _imports_from(prefixes: tuple, into: tuple) -> list[str]:
    return [f"{a} (line {d['line']}) imports {b}" for a, b, d in GRAPH.edges(data=True)
            if a.startswith(prefixes) and b.startswith(into)]


def test_the_graph_sees_the_package():
    # guards the walk itself: a graph of nothing has no cycles either
    assert {"qcompiler.driver.api", "qcompiler.passes.tile", "qcompiler.codegen.cpu.backend",
            "qcompiler.codegen.hls.design", "qcompiler.tuning.tuner"} <= set(MODULES)
    assert GRAPH.has_edge("qcompiler.passes.hls_fixed_point", "qcompiler.codegen.hls.design")
    assert GRAPH.has_edge("qcompiler.driver.api", "qcompiler.tuning.tuner")  # a lazy import
    assert GRAPH.number_of_edges() > 200


def test_codegen_never_imports_passes():
    assert _imports_from(("qcompiler.codegen.",), ("qcompiler.passes",)) == []


@pytest.mark.parametrize("layer", ["qcompiler.ir.", "qcompiler.runtime."])
def test_ir_and_runtime_import_neither_passes_nor_codegen(layer):
    assert _imports_from((layer,), ("qcompiler.passes", "qcompiler.codegen")) == []


def test_no_module_imports_the_qcompiler_facade():
    # qcompiler/__init__.py's functions import the driver and the tuner; a module that
    # imports the package back (for __version__: qcompiler.version) closes a cycle
    assert [a for a, b in GRAPH.edges if b == "qcompiler" and a != "qcompiler.driver.cli"] == []


def test_driver_depends_on_tuning_never_the_reverse():
    assert GRAPH.has_edge("qcompiler.tuning.tuner", "qcompiler.driver.frontend")
    assert not nx.has_path(GRAPH, "qcompiler.tuning.tuner", "qcompiler.driver.api")
    assert not nx.has_path(GRAPH, "qcompiler.driver.frontend", "qcompiler.tuning.tuner")


def test_no_import_cycles():
    new = []
    seen_known = set()
    for cycle in nx.simple_cycles(GRAPH):
        known = [i for i, group in enumerate(KNOWN_CYCLES) if set(cycle) <= group]
        if known:
            seen_known.add(known[0])
            continue
        steps = [f"{a} (line {GRAPH.edges[a, b]['line']})"
                 for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        new.append(" -> ".join(steps + [cycle[0]]))
    assert new == [], "import cycles:\n" + "\n".join(sorted(new, key=len)[:20])
    gone = [sorted(g) for i, g in enumerate(KNOWN_CYCLES) if i not in seen_known]
    assert gone == [], f"these KNOWN_CYCLES are gone, remove them from the list: {gone}"


def test_tuner_public_names_stay_importable():
    # the tuner is split (search, workers, kernel_tuning); tests and examples import from it
    from qcompiler.tuning import tuner

    for name in tuner.__all__:
        assert getattr(tuner, name) is not None, name
