"""The communicator a rank program's ``all_reduce`` calls (tensor parallelism, issue #17).

A rank program (``qcompiler.runtime.ranks.rank_program``) keeps its own partial of each
``all_reduce`` and the number of ranks the sum spans (the ``world`` attribute). Executing such
a node is a collective: the reference op (``qcompiler.runtime.reference``), and with it every
plan step that falls back to it (the CPU plan, the CUDA host-ops path), calls ``all_reduce``
here, which hands the array to the communicator this process installed with ``install``.

``TorchCommunicator`` is the only real one: ``torch.distributed.all_reduce`` (sum) over the
process group the sharded runtime's worker initialized (``qcompiler.runtime.distributed``):
gloo for host arrays, NCCL for CUDA (a host array is copied to the rank's device and back).
qcompiler never implements a collective itself. Without a communicator the node is refused
with an error naming it (running one rank's artifact alone would otherwise compute a partial
sum and return it as the result).

The CUDA device plan (``codegen/cuda/plan.py``) keeps the partial on the GPU: between the
plan's segments it calls ``all_reduce_device`` here with the device address of the result
buffer and the plan's stream, and the communicator sums in place on that stream
(``TorchCommunicator``: the buffer wrapped as a torch CUDA tensor without a copy, NCCL under
``torch.cuda.ExternalStream``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from qcompiler.errors import QCompilerError


class CollectiveError(QCompilerError, RuntimeError):
    """An all_reduce of a rank program cannot run: no communicator, or the collective failed."""


class Communicator:
    """Sums an array over every rank of the process group; returns the sum (any array)."""

    world_size: int = 1

    def all_reduce(self, array: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def all_reduce_device(self, ptr: int, shape: tuple, dtype, stream: int) -> None:
        """Sum the contiguous device buffer at ``ptr`` (``shape``, numpy ``dtype``; bf16 is
        ml_dtypes') over the ranks in place, ordered on the CUDA stream ``stream`` (work on it
        before runs first, work enqueued after sees the sum)."""
        raise CollectiveError(f"{type(self).__name__} sums host arrays only; the CUDA device "
                              "plan needs a communicator with all_reduce_device")


class TorchCommunicator(Communicator):
    """``torch.distributed.all_reduce(SUM)`` on the initialized default process group. With
    ``device`` (a torch CUDA device, the NCCL backend) the array is copied to it and back."""

    def __init__(self, device=None):
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            raise CollectiveError("torch.distributed is not initialized in this process")
        self.torch, self.dist, self.device = torch, dist, device
        self.world_size = dist.get_world_size()
        self.calls = 0

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = np.array(array, copy=True, order="C")
        tensor = torch.from_numpy(out)  # shares out's memory
        if self.device is not None:
            dev = tensor.to(self.device)
            self.dist.all_reduce(dev, op=self.dist.ReduceOp.SUM)
            tensor.copy_(dev.cpu())
        else:
            self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM)
        self.calls += 1
        return out

    def all_reduce_device(self, ptr: int, shape: tuple, dtype, stream: int) -> None:
        """In place on the device buffer: wrapped as a torch tensor (no copy) and summed by
        NCCL on ``stream``. ProcessGroupNCCL runs the collective on its own stream after an
        event recorded on the current stream, and (a blocking call) makes the current stream
        wait for its end: with the plan's stream current, the collective is ordered between
        the segment before it and the one after, and the host does not wait. A process group
        on host memory (gloo) sums a host copy instead."""
        torch, dist = self.torch, self.dist
        tensor = device_tensor(torch, ptr, shape, dtype)
        with torch.cuda.stream(torch.cuda.ExternalStream(int(stream), device=tensor.device)):
            if dist.get_backend() == "nccl":
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            else:  # gloo: a host round trip (.cpu() waits for the stream's work)
                host = tensor.cpu()
                dist.all_reduce(host, op=dist.ReduceOp.SUM)
                tensor.copy_(host)
        self.calls += 1


class _DeviceBuffer:
    """A device buffer as ``__cuda_array_interface__`` (version 2: no stream, so torch does
    not synchronize anything when it wraps it), for ``torch.as_tensor`` without a copy."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"data": (int(ptr), False), "shape": tuple(shape),
                                         "typestr": typestr, "strides": None, "version": 2}


# numpy dtype name -> (typestr of the wrapped buffer, torch dtype name to view it as): bf16
# has no typestr, so its bits are wrapped as int16 and viewed as bfloat16 (same size, no copy)
_DEVICE_TYPES = {"float16": ("<f2", None), "float32": ("<f4", None),
                 "bfloat16": ("<i2", "bfloat16"), "int32": ("<i4", None),
                 "int64": ("<i8", None), "float64": ("<f8", None)}


def device_tensor(torch, ptr: int, shape: tuple, dtype):
    """The torch CUDA tensor over the device memory at ``ptr`` (current device, no copy)."""
    name = np.dtype(dtype).name
    if name not in _DEVICE_TYPES:
        raise CollectiveError(f"all_reduce on the device: no collective for dtype {name}")
    typestr, view = _DEVICE_TYPES[name]
    numel = int(np.prod(shape, dtype=np.int64))
    if numel == 0:
        return torch.empty(tuple(shape), dtype=getattr(torch, view or name), device="cuda")
    t = torch.as_tensor(_DeviceBuffer(ptr, shape, typestr), device="cuda")
    if t.data_ptr() != int(ptr):  # a copy would sum the copy and leave the buffer partial
        raise CollectiveError("all_reduce on the device: torch copied the device buffer")
    return t.view(getattr(torch, view)) if view else t


_current: Optional[Communicator] = None


def install(comm: Optional[Communicator]) -> Optional[Communicator]:
    """Make ``comm`` this process's communicator (None: none); returns the previous one."""
    global _current
    previous, _current = _current, comm
    return previous


def current() -> Optional[Communicator]:
    return _current


def _names(node) -> str:
    return ", ".join(f"%{r.name}" for r in node.results)


def communicator_for(node, world: int) -> Communicator:
    """The installed communicator, checked for ``node``'s sum over ``world`` ranks; raises
    CollectiveError naming the node when none is installed or its group has another size."""
    names = _names(node)
    comm = _current
    if comm is None:
        raise CollectiveError(
            f"{names} = all_reduce: this is one rank's program (the sum spans {world} ranks) "
            "and no communicator is installed; load the sharded artifact's directory with "
            "qcompiler.load (one process per rank), or run the global module with "
            "qcompiler.runtime.ranks.run_ranks")
    if comm.world_size != world:
        raise CollectiveError(f"{names} = all_reduce: the sum spans {world} ranks, the "
                              f"process group has {comm.world_size}")
    return comm


def all_reduce(node, array: np.ndarray, world: int) -> np.ndarray:
    """The sum of ``array`` over ``world`` ranks for ``node`` (an all_reduce of a rank
    program), through the installed communicator, in ``array``'s dtype."""
    comm = communicator_for(node, world)
    names = _names(node)
    try:
        out = comm.all_reduce(array)
    except QCompilerError:
        raise
    except Exception as e:  # the engine's own errors (gloo/NCCL): name the node
        raise CollectiveError(f"{names} = all_reduce failed in the collective engine: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    return np.asarray(out).astype(array.dtype, copy=False).reshape(array.shape)


def all_reduce_device(node, ptr: int, shape: tuple, dtype, world: int, stream: int) -> None:
    """``node``'s sum over ``world`` ranks, in place on the device buffer at ``ptr``, ordered on
    the CUDA stream ``stream`` (the CUDA device plan's collective step)."""
    comm = communicator_for(node, world)
    try:
        comm.all_reduce_device(ptr, tuple(shape), dtype, stream)
    except QCompilerError:
        raise
    except Exception as e:  # the engine's own errors (NCCL): name the node
        raise CollectiveError(f"{_names(node)} = all_reduce failed in the collective engine: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e


__all__ = ["Communicator", "TorchCommunicator", "CollectiveError", "install", "current",
           "communicator_for", "all_reduce", "all_reduce_device", "device_tensor"]
