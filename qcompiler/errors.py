"""The project's error classes.

Every error that qcompiler raises on purpose derives from ``QCompilerError``: its message is
one line that names what was wrong (the node, op, opset, shape, file or knob). The CLI prints
such an error as that line and exits with 1; any other exception escaping the compiler is a
bug, reported as one (with the traceback behind ``--debug``).

The module-specific classes (``FrontendError``, ``ParseError``, ``PassError``, the backends'
errors ...) derive from these, so ``except QCompilerError`` catches all of them. Most also
derive from the builtin they replaced (ValueError, RuntimeError), so callers that caught the
builtin keep working.
"""
from __future__ import annotations


class QCompilerError(Exception):
    """Base of every error qcompiler raises on purpose."""


class InputError(QCompilerError, ValueError):
    """The model, IR text, tuning log or run-time inputs are malformed or unsupported."""


class ConfigError(QCompilerError, ValueError):
    """A kernel config (from a pass, a tuning log or ``.qir`` text) fails its validator."""


class ArtifactError(QCompilerError):
    """An artifact directory is not one qcompiler wrote, was changed, or names files outside
    itself."""


class DeviceUnavailableError(QCompilerError, RuntimeError):
    """The artifact's device is absent here (a CUDA artifact on a machine without a GPU)."""


class HostFallbackError(QCompilerError):
    """Ops of a device target would run in the host interpreter and the user did not allow it
    (``--allow-host-fallback``)."""
