"""Backends: one folder each (``reference/``, later ``cuda/``, ``cpu/``, ``hls/``).

A backend turns the final QIR into the artifact's ``kernels/`` and runs it:

- ``compile(module, target, out_dir) -> list[dict]``: emit and build kernels; one record per
  kernel call, in program order (written to manifest.json);
- ``runner(module, manifest, out_dir) -> callable``: a function ``{name: array} -> {name: array}``.
"""
from __future__ import annotations


class Backend:
    name = "backend"

    def compile(self, module, target, out_dir: str) -> list[dict]:  # pragma: no cover
        raise NotImplementedError

    def runner(self, module, manifest: dict, out_dir: str):  # pragma: no cover
        raise NotImplementedError
