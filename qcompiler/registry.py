"""The registries: every pass, target and backend, listed once, imported lazily.

Adding a pass means adding its file under ``passes/`` and one line here; a test checks that
each key equals the registered object's own name.
"""
from __future__ import annotations

import importlib

# pass name -> "module:Class"
PASSES: dict[str, str] = {
    "canonicalize": "qcompiler.passes.canonicalize:CanonicalizePass",
    "fuse-dequant": "qcompiler.passes.fuse_dequant:FuseDequantPass",
    "quantize-weights": "qcompiler.passes.quantize_weights:QuantizeWeightsPass",
}

# backend name -> "module:Class"
BACKENDS: dict[str, str] = {
    "reference": "qcompiler.codegen.reference.backend:ReferenceBackend",
}


def _load(spec: str):
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def get_pass_class(name: str):
    try:
        return _load(PASSES[name])
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; registered: {', '.join(sorted(PASSES))}") from None


def get_backend(name: str):
    try:
        return _load(BACKENDS[name])()
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; registered: {', '.join(BACKENDS)}") from None
