"""The compile's front half: a model in, the target resolved, a pipeline run over the module.

``driver.api`` (compile, compile_to_dir) and the autotuner (``tuning.tuner``) both start
here; this module imports neither of them, so that the tuner depends on it, the driver on
the tuner (tuning-log replay, ``qcompile --tune``), and never the reverse.
"""
from __future__ import annotations

import os
from typing import Sequence

from qcompiler.errors import InputError
from qcompiler.ir import Module, verify
from qcompiler.pipeline import Instrument, PassManager, RecordPasses, VerifyAfterEach
from qcompiler.targets import Target, all_targets, get_target


class CompileError(InputError):
    """The request cannot be compiled (unknown or unavailable target, bad pipeline ...)."""


def import_model(model, example_inputs=None) -> Module:
    """A Module from a path (.onnx or .qir), bytes, an onnx.ModelProto or a Module, or from a
    torch.nn.Module / fx.GraphModule / ExportedProgram traced with ``example_inputs``."""
    if isinstance(model, Module):
        return model
    from qcompiler.frontends.fx import is_torch_model  # imports torch only if already loaded

    if is_torch_model(model):
        from qcompiler.frontends.fx import load as load_torch

        return load_torch(model, example_inputs)
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".qir"):
        from qcompiler.ir import parse_module

        path = os.fspath(model)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:  # missing, a directory, not text ...
            raise InputError(f"{path}: cannot read the QIR file: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        return parse_module(text)
    from qcompiler.frontends.onnx import load

    return load(model)


def resolve_target(name: str) -> Target:
    """The registered, available target called ``name`` (``CompileError`` otherwise)."""
    try:
        target = get_target(name)
    except KeyError as e:
        raise CompileError(str(e.args[0])) from None
    if not target.available:
        raise CompileError(
            f"target {name!r} is registered but its backend ({target.backend}) is not "
            f"implemented yet; available targets: "
            f"{', '.join(t for t, v in all_targets().items() if v.available)}")
    return target


def run_pipeline(module: Module, pipeline: str,
                 instruments: Sequence[Instrument] = (), verify_each: bool = False,
                 ) -> tuple[Module, list[dict], str]:
    """Run a pipeline string; returns the new module, per-pass records and the spec."""
    recorder = RecordPasses()
    inst = list(instruments) + [recorder]
    if verify_each:
        inst.insert(0, VerifyAfterEach())
    pm = PassManager.parse(pipeline, inst)
    out = pm.run(module)
    verify(out)
    return out, recorder.records, pm.spec()
