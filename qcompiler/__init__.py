"""qcompiler: a compiler for quantized neural-network kernels.

    import qcompiler
    m = qcompiler.compile("model.onnx", target="ref")      # compile and load in one call
    outputs = m.run({"x": x})

The path a model takes: frontend (``qcompiler.frontends``) → QIR (``qcompiler.ir``) → passes
(``qcompiler.passes``, run by ``qcompiler.pipeline``) → backend (``qcompiler.codegen``) →
artifact directory → runtime (``qcompiler.runtime``).
"""
from qcompiler.version import __version__  # noqa: F401  (qcompiler.__version__)


def compile(model, target: str = "ref", output_dir=None, example_inputs=None, **options):
    """Compile ``model`` for ``target`` and load the result.

    ``model``: an ONNX path / bytes / ModelProto, a .qir file or Module (→ a
    ``CompiledModule``: ``.run({name: ndarray})``), or a torch.nn.Module / fx.GraphModule /
    ExportedProgram traced with ``example_inputs`` (→ a callable taking and returning torch
    tensors, specialized to the input shapes and recompiled for new ones).
    """
    from qcompiler.driver.api import compile as _compile
    from qcompiler.frontends.fx import is_torch_model

    if is_torch_model(model):
        from qcompiler.frontends.fx import TorchCompiled

        if output_dir is not None:
            options["output_dir"] = output_dir  # only the first shape compiles into it

        def compile_for(m, inputs):
            out = _compile(m, target=target, example_inputs=inputs, **options)
            options.pop("output_dir", None)
            return out
        return TorchCompiled(model, compile_for, example_inputs)
    return _compile(model, target=target, output_dir=output_dir, **options)


def compile_to_dir(model, target: str = "ref", output_dir=None, **options):
    """Compile ``model`` for ``target`` into an artifact directory without loading it; returns
    ``(directory, final Module)``. ``output_dir`` None: a new temp directory.

    Options: ``passes`` (a pipeline string instead of the target's default pipeline),
    ``tuning_log``, ``verify_each``, ``instruments``, ``example_inputs`` (torch models),
    ``cache`` (the build cache: True, False or a directory), ``jobs`` (parallel kernel
    builds), ``progress`` (the build counter on stderr; default: on a terminal). The
    directory holds module.qir, weights.safetensors, kernels/, manifest.json (format version,
    the sha256 of every file) and report.json/.txt; ``load(directory)`` runs it, here or on
    another machine with the target's device (see docs/ for the artifact format).
    """
    from qcompiler.driver.api import compile_to_dir as _compile_to_dir

    return _compile_to_dir(model, target, output_dir, **options)


def tune(model, target: str, **options) -> dict:
    """Autotune every distinct kernel of ``model`` on ``target``'s device; append the results
    to a tuning log (``qcompiler.tuning.tuner.tune`` lists the options). Compile with
    ``compile(model, target, tuning_log=...)`` to use them."""
    from qcompiler.tuning.tuner import tune as _tune

    return _tune(model, target, **options)


def load(directory):
    """Load a compiled artifact directory; ``.run({name: array})`` runs it.

    The artifact is checked first (format version, manifest structure, the sha256 of every
    file, the weights' types and code ranges; only files inside the directory that the manifest
    lists are opened): ``qcompiler.errors.ArtifactError`` otherwise. An artifact whose device is
    absent here (CUDA without a GPU) loads, and its ``run`` raises ``DeviceUnavailableError``."""
    from qcompiler.runtime.loader import load as _load

    return _load(directory)
