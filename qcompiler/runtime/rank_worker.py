"""One rank of a sharded artifact (``qcompiler.runtime.distributed``), in its own process.

``ShardedModule.start`` runs ``python -c "from qcompiler.runtime.rank_worker import main;
main()" RANK TP RANK_DIR BACKEND PORT PARENT_PORT TIMEOUT`` per rank with the environment it
chose (``NCCL_NVLS_ENABLE=0``, the rank's ``CUDA_VISIBLE_DEVICES``, the connection's key in
``QC_TP_AUTHKEY``). The worker connects back to the parent (``multiprocessing.connection``,
authenticated), initializes ``torch.distributed``, loads its rank artifact with
``qcompiler.load``, installs a ``TorchCommunicator`` (for NCCL with the rank's device: host
arrays are summed on a device copy, the CUDA device plan's buffers in place) and serves
``("run", inputs)`` messages until ``("stop", None)``: rank 0 replies with the outputs, the
others with None; errors are replied as ``("error", message)``.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"


def _worker(rank: int, tp: int, rank_dir: str, backend: str, port: int, conn,
            timeout_s: float) -> None:
    """One rank: process group, its artifact, then runs until told to stop."""
    try:
        import datetime

        import torch
        import torch.distributed as dist

        from qcompiler.runtime import collectives
        from qcompiler.runtime.loader import load

        device = None
        if backend == "nccl":
            device = torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES holds this rank's GPU
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=tp, timeout=datetime.timedelta(seconds=timeout_s))
        compiled = load(rank_dir)
        collectives.install(collectives.TorchCommunicator(device))
        conn.send(("ready", None))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send(("error", _describe(e)))
        return
    try:
        while True:
            msg = conn.recv()
            if msg[0] != "run":
                break
            try:
                out = compiled.run(msg[1])
                if rank == 0:
                    out = {k: np.asarray(v) for k, v in out.items()}
                conn.send(("ok", out if rank == 0 else None))
            except BaseException as e:  # noqa: BLE001
                conn.send(("error", _describe(e)))
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the process ends anyway
            pass


def main(argv: Optional[list] = None) -> None:
    """The worker process's entry (``python -c "...; worker_main()" RANK TP DIR BACKEND
    PORT ADDRESS_PORT TIMEOUT``): connects back to the parent, then ``_worker``. A fresh
    interpreter rather than multiprocessing's spawn, which would re-run the caller's
    ``__main__`` script in every worker."""
    import sys
    from multiprocessing.connection import Client

    args = sys.argv[1:] if argv is None else argv
    rank, tp, rank_dir, backend, port, parent_port, timeout_s = args
    conn = Client(("127.0.0.1", int(parent_port)),
                  authkey=bytes.fromhex(os.environ.pop("QC_TP_AUTHKEY")))
    conn.send(("rank", int(rank)))
    try:
        _worker(int(rank), int(tp), rank_dir, backend, int(port), conn, float(timeout_s))
    finally:
        conn.close()
