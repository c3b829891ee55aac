"""The CPU backend's error, in a module of its own: the op kernel library (``ops/``) raises
it and the backend imports that library, so it cannot live in ``backend.py`` without an
import cycle."""
from qcompiler.errors import QCompilerError


class CPUBackendError(QCompilerError, RuntimeError):
    """The module cannot be compiled or run by the CPU backend; the message says why."""
