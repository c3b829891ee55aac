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


_current: Optional[Communicator] = None


def install(comm: Optional[Communicator]) -> Optional[Communicator]:
    """Make ``comm`` this process's communicator (None: none); returns the previous one."""
    global _current
    previous, _current = _current, comm
    return previous


def current() -> Optional[Communicator]:
    return _current


def all_reduce(node, array: np.ndarray, world: int) -> np.ndarray:
    """The sum of ``array`` over ``world`` ranks for ``node`` (an all_reduce of a rank
    program), through the installed communicator, in ``array``'s dtype."""
    names = ", ".join(f"%{r.name}" for r in node.results)
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
    try:
        out = comm.all_reduce(array)
    except QCompilerError:
        raise
    except Exception as e:  # the engine's own errors (gloo/NCCL): name the node
        raise CollectiveError(f"{names} = all_reduce failed in the collective engine: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    return np.asarray(out).astype(array.dtype, copy=False).reshape(array.shape)


__all__ = ["Communicator", "TorchCommunicator", "CollectiveError", "install", "current",
           "all_reduce"]
