"""Helpers for the CPU kernels written with TVM's IR builder instead of a TE compute.

Some kernels cannot be expressed as a TE compute (one value per output element from a
reduction over the inputs): a recurrence needs a serial time loop that carries a state from
step to step (recurrent.py, linear_attention.py), a gather adds its terms in a fixed order
into a row of accumulators (col2im.py). Those kernels write their loops and stores directly
with ``tvm.script.ir_builder``; this module holds the pieces they share: int64 constants,
named loops, named buffers and let bindings, run-time checks, and running the builder.

TVM is imported inside each function, as everywhere in codegen/cpu: TVM is optional, and
the modules must import without it.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def i64(v):
    """A Python or numpy integer as an int64 TIR constant (every index and extent of these
    kernels is int64, as the symbolic dims); a TIR expression unchanged."""
    from tvm import tirx

    return tirx.IntImm("int64", int(v)) if isinstance(v, (int, np.integer)) else v


def parallel_min_elements(params) -> int:
    """The work below which a kernel stays on one thread (the pool's launch costs more than
    the work): the schedule's ``parallel_min_elements``, its default without ``params``. Each
    kernel says what it counts (elements, multiply-adds, state updates ...)."""
    from dataclasses import fields

    from qcompiler.codegen.cpu.ops.schedule import ScheduleParams

    value = getattr(params, "parallel_min_elements", None)
    if value is None:
        value = next(f.default for f in fields(ScheduleParams)
                     if f.name == "parallel_min_elements")
    return value


def build_kernel(name: str, known, emit_body: Callable[[], None]):
    """(name, the PrimFunc that ``emit_body()`` writes: its parameters (``param``), then its
    body), the function's symbol being ``name``; (name, None) for a name in ``known`` (built
    already: not emitted again).

    noalias: the kernels are destination-passing, their results never overlap their operands.
    """
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    if name in known:
        return name, None
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_attr({"tirx.noalias": True})
            emit_body()
    return name, ib.get().with_attr("global_symbol", name)


def param(name: str, shape, dtype: str):
    """The next parameter of the PrimFunc, a buffer of ``shape`` named ``name`` (the names
    show in the printed TIR and in TVM's argument checks)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    return IRBuilder.name(name, T.match_buffer(T.arg(name, T.handle()), shape, dtype))


def scratch(name: str, shape, dtype: str):
    """A buffer allocated in the current scope (inside a parallel loop: each thread its
    own)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    return IRBuilder.name(name, T.alloc_buffer(shape, dtype))


def loop(n, name: str, parallel: bool = False):
    """The frame of a loop over [0, n) whose variable is named ``name``; use it as
    ``with loop(n, "i") as i:``."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    frame = (T.parallel if parallel else T.serial)(i64(0), i64(n))
    IRBuilder.name(name, frame.vars[0])
    return frame


def bind(name: str, value):
    """``value`` computed once, as a named scalar of the loop body."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    return IRBuilder.name(name, T.Bind(value))


def check(condition, message: str) -> None:
    """Fail the call with ``message`` where ``condition`` is false (a run-time check on the
    operands that TVM's shape checks do not cover)."""
    from tvm.script.ir_builder import tirx as T

    with T.Assert(condition, message):
        pass


def static_sizes(*dims) -> Optional[list]:
    """The dims as ints, or None when one is symbolic (known only at run time)."""
    from tvm import tirx

    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]
