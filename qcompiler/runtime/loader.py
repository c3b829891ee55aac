"""``qcompiler.load(DIR)``: read an artifact and run it on its target's device.

Loading checks the artifact before any of its code is loaded (``read_artifact``: format
version, manifest structure, every file's sha256, the weights); the backend's runner then opens
only files the manifest lists, inside DIR. A device the artifact needs but this machine lacks
(a CUDA artifact without a GPU) is not an error at load: ``run`` raises
``DeviceUnavailableError``.
"""
from __future__ import annotations

import os

import numpy as np

from qcompiler.driver.artifact import read_artifact
from qcompiler.errors import ArtifactError, InputError
from qcompiler.registry import BACKENDS, get_backend


class CompiledModule:
    """A loaded artifact. ``run({input: array}) -> {output: array}``; also callable."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.module, self.manifest = read_artifact(self.directory)
        self.target = self.manifest["target"]
        backend = self.manifest["backend"]
        if backend not in BACKENDS:
            raise ArtifactError(f"manifest.json: unknown backend {backend!r}; this qcompiler "
                                f"has {', '.join(BACKENDS)}")
        self._run = get_backend(backend).runner(self.module, self.manifest, self.directory)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise InputError("run() takes a dict {input name: array}")
        return self._run(inputs)

    def session(self):
        """A decode session: a KV-cache model's caches kept on the device between steps and
        updated in place (``reset(caches)``, ``step(inputs)``, ``state()``; CUDA device
        plans, ``codegen/cuda/kv_state.py``)."""
        make = getattr(self._run, "session", None)
        if make is None:
            raise InputError(f"target {self.target}: decode sessions (the KV cache kept on "
                             f"the device) need a CUDA device plan; run() takes the caches "
                             f"as inputs on every target")
        return make()

    def __call__(self, *args, **kwargs) -> dict[str, np.ndarray]:
        inputs = dict(zip(self.input_names, args))
        inputs.update(kwargs)
        return self.run(inputs)

    def __repr__(self) -> str:
        return f"<CompiledModule {self.directory} target={self.target}>"


def load(directory):
    """The artifact in ``directory``: a ``CompiledModule``, or for a sharded (tensor-parallel)
    artifact a ``qcompiler.runtime.distributed.ShardedModule`` (same ``run`` interface; one
    worker process per rank)."""
    from qcompiler.driver.sharded import is_sharded_artifact

    if is_sharded_artifact(directory):
        from qcompiler.runtime.distributed import ShardedModule

        return ShardedModule(directory)
    return CompiledModule(directory)
