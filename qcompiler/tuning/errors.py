"""Errors a backend's ``measure`` raises; the tuner maps each to a log ``status``.

``BuildError`` -> ``compile_error``; ``WrongResult`` -> ``wrong_result``; any other exception
-> ``runtime_error``; a child process past its time limit -> ``timeout``.
"""
from qcompiler.errors import QCompilerError


class TuningError(QCompilerError):
    """Base of the errors that a measurement reports on purpose."""


class BuildError(TuningError):
    """The candidate kernel did not build (template, compiler or linker failure)."""


class WrongResult(TuningError):
    """The candidate ran but its output differs from the reference beyond the tolerance."""


class MeasureTimeout(TuningError):
    """The child process measuring a candidate ran past its time limit (raised by the tuner)."""
