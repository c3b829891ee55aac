"""``qcompiler.load(DIR)``: read an artifact and run it on its target's device."""
from __future__ import annotations

import os

import numpy as np

from qcompiler.driver.artifact import read_artifact
from qcompiler.registry import get_backend


class CompiledModule:
    """A loaded artifact. ``run({input: array}) -> {output: array}``; also callable."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.module, self.manifest = read_artifact(self.directory)
        self.target = self.manifest["target"]
        self._run = get_backend(self.manifest["backend"]).runner(
            self.module, self.manifest, self.directory)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise TypeError("run() takes a dict {input name: array}")
        return self._run(inputs)

    def __call__(self, *args, **kwargs) -> dict[str, np.ndarray]:
        inputs = dict(zip(self.input_names, args))
        inputs.update(kwargs)
        return self.run(inputs)

    def __repr__(self) -> str:
        return f"<CompiledModule {self.directory} target={self.target}>"


def load(directory) -> CompiledModule:
    return CompiledModule(directory)
