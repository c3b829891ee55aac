"""Backends: one folder each (``reference/``, later ``cuda/``, ``cpu/``, ``hls/``).

A backend turns the final QIR into the artifact's ``kernels/`` and runs it:

- ``compile(module, target, out_dir, builder=None) -> list[dict]``: emit and build kernels;
  one record per kernel call, in program order (written to manifest.json). ``builder``
  (``qcompiler.codegen.build.Builder``) builds each distinct kernel once, through the build
  cache and in parallel, and keeps the build's report;
- ``runner(module, manifest, out_dir) -> callable``: a function ``{name: array} -> {name: array}``.
"""
from __future__ import annotations


class Backend:
    name = "backend"
    # whether the runner executes plans whose concats write in place (slices of the result:
    # ``qcompiler.plan.lower``); only where its executor takes slices
    concat_in_place = False

    def prepare(self, target) -> None:
        """Called before the passes run (e.g. import a toolchain the passes will query)."""

    def compile(self, module, target, out_dir: str,
                builder=None) -> list[dict]:  # pragma: no cover
        raise NotImplementedError

    def runner(self, module, manifest: dict, out_dir: str):  # pragma: no cover
        raise NotImplementedError
