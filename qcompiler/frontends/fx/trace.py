"""The entry points: tracing with ``torch.export``, ``load`` and ``TorchCompiled``."""
from __future__ import annotations

from typing import Callable

import numpy as np

from qcompiler.frontends.fx.importer import _Importer
from qcompiler.frontends.fx.registry import _register_all
from qcompiler.frontends.fx.tensors import _to_numpy, _to_torch
from qcompiler.frontends.onnx import FrontendError
from qcompiler.ir import Module


def is_torch_model(model) -> bool:
    """True for torch modules and exported programs, without importing torch needlessly."""
    import sys

    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(model, (torch.nn.Module, torch.export.ExportedProgram))


def export(model, example_inputs):
    """``torch.export`` a module (eval mode, no grad) for the given example inputs."""
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        return model
    if example_inputs is None:
        raise FrontendError(f"{type(model).__name__}: example_inputs=(tensor, ...) is needed to "
                            "trace a torch module")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    with torch.no_grad():
        try:
            return torch.export.export(model, example_inputs, strict=False)
        except Exception as e:
            raise FrontendError(f"torch.export could not trace {type(model).__name__}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                ) from e


def load(model, example_inputs=None, input_names=None, output_names=None) -> Module:
    """Import a torch module or exported program as a QIR module (static input shapes)."""
    _register_all()
    ep = export(model, example_inputs)
    return _Importer(ep, input_names, output_names).run()


class TorchCompiled:
    """A compiled torch module: call it with tensors, get tensors back.

    The artifact is specialized to the input shapes it was compiled for; a call with other
    shapes or dtypes compiles again (and keeps both), as ``torch.compile(dynamic=False)`` does.
    """

    def __init__(self, model, compile_fn: Callable, example_inputs):
        import torch

        if isinstance(model, torch.export.ExportedProgram) and example_inputs is None:
            example_inputs = model.example_inputs[0] if model.example_inputs else None
        if example_inputs is None:
            raise FrontendError(f"{type(model).__name__}: example_inputs=(tensor, ...) is "
                                "needed to compile a torch module")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        self._model = model
        self._compile_fn = compile_fn
        self._cache: dict = {}
        self.compiled = self._get(tuple(example_inputs))

    @staticmethod
    def _signature(inputs) -> tuple:
        return tuple((tuple(t.shape), str(t.dtype)) for t in inputs)

    def _get(self, inputs):
        key = self._signature(inputs)
        if key not in self._cache:
            import torch

            if self._cache and isinstance(self._model, torch.export.ExportedProgram):
                raise ValueError(f"inputs {key} differ from the shapes the exported program "
                                 f"was compiled for ({next(iter(self._cache))}); export it "
                                 "again or compile the nn.Module")
            self._cache[key] = self._compile_fn(self._model, inputs)
        return self._cache[key]

    @property
    def directory(self) -> str:
        return self.compiled.directory

    def run_numpy(self, inputs: dict) -> dict:
        return self.compiled.run(inputs)

    def __call__(self, *inputs):
        import torch

        if any(not isinstance(t, torch.Tensor) for t in inputs):
            raise TypeError("a compiled torch module takes tensors as positional arguments")
        compiled = self._get(inputs)
        if len(inputs) != len(compiled.input_names):
            raise TypeError(f"expected {len(compiled.input_names)} inputs "
                            f"({', '.join(compiled.input_names)}), got {len(inputs)}")
        feeds = {name: _to_numpy(t) for name, t in zip(compiled.input_names, inputs)}
        out = compiled.run(feeds)
        tensors = [_to_torch(np.asarray(out[name])) for name in compiled.output_names]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def __repr__(self) -> str:
        return f"<TorchCompiled {len(self._cache)} shape(s), {self.compiled!r}>"
