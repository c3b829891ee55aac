"""qcompiler: a compiler for quantized neural-network kernels.

    import qcompiler
    m = qcompiler.compile("model.onnx", target="ref")      # compile and load in one call
    outputs = m.run({"x": x})

The path a model takes: frontend (``qcompiler.frontends``) → QIR (``qcompiler.ir``) → passes
(``qcompiler.passes``, run by ``qcompiler.pipeline``) → backend (``qcompiler.codegen``) →
artifact directory → runtime (``qcompiler.runtime``).
"""
__version__ = "0.1.0"


def compile(model, target: str = "ref", output_dir=None, **options):
    """Compile ``model`` (a path or onnx.ModelProto) for ``target`` and load the result."""
    from qcompiler.driver.api import compile as _compile

    return _compile(model, target=target, output_dir=output_dir, **options)


def load(directory):
    """Load a compiled artifact directory; ``.run({name: array})`` runs it."""
    from qcompiler.runtime.loader import load as _load

    return _load(directory)
