"""The table of op handlers: ``handler(imp, *args, **kwargs) -> Value | list | python value``
registered by ATen / quantized_decomposed op name (``_aten``, ``_qd``) in the ``ops_*`` modules,
resolved to torch op objects when torch is first needed."""
from __future__ import annotations

from typing import Any, Callable


_HANDLERS: dict[Any, Callable] = {}
_SKIP: set = set()


def _fold_only(*a, **k):  # marker: the op is supported only with constant inputs
    raise AssertionError


_fold_only.keeps_quantization = False


def _aten(*names: str, keeps_quantization: bool = False):
    """Register a handler for ``aten.<name>`` (packet or ``name.overload``)."""
    def wrap(fn):
        fn.keeps_quantization = keeps_quantization
        _PENDING.append((names, fn, "aten"))
        return fn
    return wrap


def _qd(*names: str):
    def wrap(fn):
        fn.keeps_quantization = True
        _PENDING.append((names, fn, "quantized_decomposed"))
        return fn
    return wrap


_PENDING: list = []
_REGISTERED = False


def _register_all() -> None:
    """Resolve handler names to torch op objects (done once, when torch is first needed)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines quantized_decomposed)

    for names, fn, ns in _PENDING:
        space = getattr(torch.ops, ns)
        for name in names:
            packet_name, _, overload = name.partition(".")
            packet = getattr(space, packet_name)
            _HANDLERS[getattr(packet, overload) if overload else packet] = fn
    for name in ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
                 "_assert_async"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            _SKIP.add(packet.default if hasattr(packet, "default") else packet)
    _SKIP.add(torch.ops.aten._assert_async.msg)
    for name in ("arange", "zeros", "ones", "full", "empty", "scalar_tensor", "tensor", "tril",
                 "triu", "ones_like", "zeros_like", "full_like", "lift_fresh_copy"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            _HANDLERS.setdefault(packet, _fold_only)
    _REGISTERED = True


def supported_ops() -> list[str]:
    """The ATen / quantized_decomposed ops the importer maps (others must fold to constants)."""
    out = set()
    for names, _, ns in _PENDING:
        prefix = "" if ns == "aten" else ns + "."
        out.update(prefix + n.partition(".")[0] for n in names)
    return sorted(out)
