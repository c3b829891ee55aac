"""TVM tensor intrinsics registered once per process (the CPU kernels' int8 dot products).

TVM's ``TensorIntrin`` registry is process-wide: a second import of a module that defines an
intrinsic (tests reload modules, the build cache imports kernels anew) registers the same name
again, which TVM refuses. ``register_intrin_once`` is the one place that tolerates it. A leaf
module: ``kernels``, ``conv`` and ``arm`` import it without importing each other.
"""
from __future__ import annotations


def register_intrin_once(name: str, desc, impl) -> None:
    """``TensorIntrin.register(name, desc, impl)``, a no-op where ``name`` is registered."""
    from tvm.s_tir import TensorIntrin

    try:
        TensorIntrin.register(name, desc, impl)
    except Exception as e:
        if "already" not in str(e).lower():
            raise
