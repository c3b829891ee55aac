"""Running a sharded artifact (``qcompiler/driver/sharded.py``): one worker process per rank.

``qcompiler.load(DIR)`` of a sharded artifact returns a ``ShardedModule``. Loading checks the
top manifest and every rank artifact's files (sha256) in this process; nothing is started.
The first ``run`` starts ``tp`` worker processes (multiprocessing, spawn). Worker r:

1. sets ``NCCL_NVLS_ENABLE=0`` (NVLink multicast off, as the device docs require) and, for a
   CUDA artifact, ``CUDA_VISIBLE_DEVICES`` to GPU r (``QC_TP_DEVICES=2,3`` picks others), so
   that torch, NCCL and the artifact's CUDA libraries all use that one GPU;
2. initializes ``torch.distributed`` (``gloo`` for ref/cpu artifacts, ``nccl`` for CUDA; TCP
   rendezvous on 127.0.0.1 at a free port);
3. loads ``DIR/rank<r>`` with ``qcompiler.load`` (a normal single-device artifact: checked
   again, its own weights only) and installs a ``TorchCommunicator``
   (``qcompiler.runtime.collectives``): every ``all_reduce`` node of the rank program, run by
   the plan executor's reference step or by the interpreter, is
   ``torch.distributed.all_reduce(SUM)``;
4. serves runs: every rank gets the inputs, runs its program, rank 0 returns the outputs.

An error in a worker (its message names the rank) stops every worker: a rank waiting in a
collective for a peer that failed would otherwise wait for the engine's timeout.
``close()`` (also at garbage collection and exit) stops the workers.

torch is the optional ``fx`` extra: without it, ``run`` raises ``DeviceUnavailableError``
saying so. A CUDA rank runs its device plan (``codegen/cuda/plan.py``): every op a kernel on
the rank's GPU, the plan split into segments at each all_reduce, and between them the
communicator's ``all_reduce_device``: NCCL in place on the result's device buffer, on the
plan's stream (``QC_CUDA_PLAN=0``: the host-ops path, NCCL on a device copy of the host
partial).
"""
from __future__ import annotations

import os
import socket
import weakref
from typing import Optional

import numpy as np

from qcompiler.driver.artifact import read_manifest, verify_files
from qcompiler.driver.sharded import rank_directory, read_sharded_manifest
from qcompiler.errors import ArtifactError, DeviceUnavailableError, InputError, QCompilerError

START_TIMEOUT_S = float(os.environ.get("QC_TP_START_TIMEOUT", "300"))
RUN_TIMEOUT_S = float(os.environ.get("QC_TP_RUN_TIMEOUT", "600"))


class RankError(QCompilerError, RuntimeError):
    """A rank's worker failed (its message names the rank and the error)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"


class _Workers:
    """The worker processes and their connections (apart from ShardedModule, for finalize)."""

    def __init__(self, procs, conns):
        self.procs, self.conns = procs, conns

    def stop(self) -> None:
        import subprocess

        for c in self.conns:
            try:
                c.send(("stop", None))
            except (OSError, EOFError, ValueError):
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []


class ShardedModule:
    """A loaded sharded artifact: ``run({input: array}) -> {output: array}`` (rank 0's
    outputs), executed by one worker process per rank with torch.distributed collectives."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.manifest = read_sharded_manifest(self.directory)
        self.tp = self.manifest["tp"]
        self.target = self.manifest["target"]
        self.backend = self.manifest["collective_backend"]
        if self.backend not in ("gloo", "nccl"):
            raise ArtifactError(f"manifest.json: collective_backend {self.backend!r} is not "
                                "gloo or nccl")
        self.rank_dirs = []
        for r in range(self.tp):
            path = rank_directory(self.directory, self.manifest, r)
            rank_manifest = read_manifest(path)
            verify_files(path, rank_manifest)  # every rank file, before any process starts
            if rank_manifest["backend"] != self.manifest["backend"]:
                raise ArtifactError(f"{self.manifest['ranks'][r]['dir']}/manifest.json: backend "
                                    f"{rank_manifest['backend']!r}, the sharded manifest says "
                                    f"{self.manifest['backend']!r}")
            self.rank_dirs.append(path)
        self._workers: Optional[_Workers] = None
        self._finalizer = None

    # the CompiledModule interface
    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def __call__(self, *args, **kwargs) -> dict:
        inputs = dict(zip(self.input_names, args))
        inputs.update(kwargs)
        return self.run(inputs)

    def __repr__(self) -> str:
        return f"<ShardedModule {self.directory} target={self.target} tp={self.tp}>"

    # workers
    def _devices(self) -> list[str]:
        """The GPU of each rank (CUDA artifacts): QC_TP_DEVICES, else 0..tp-1 of the visible
        ones; DeviceUnavailableError when there are fewer."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        chosen = os.environ.get("QC_TP_DEVICES")
        if chosen:
            devices = [d.strip() for d in chosen.split(",") if d.strip()]
        else:
            try:
                import torch

                count = torch.cuda.device_count()
            except Exception:  # noqa: BLE001
                count = 0
            pool = [d.strip() for d in visible.split(",")] if visible else \
                [str(i) for i in range(count)]
            devices = pool[:count]
        if len(devices) < self.tp:
            raise DeviceUnavailableError(
                f"{self.directory}: a tp={self.tp} CUDA artifact needs {self.tp} GPUs, one per "
                f"rank; {len(devices)} available here (QC_TP_DEVICES / CUDA_VISIBLE_DEVICES)")
        return devices[:self.tp]

    def start(self) -> None:
        """Start the workers (the first ``run`` does it); returns when every rank is ready."""
        if self._workers is not None:
            return
        try:
            import torch  # noqa: F401
            import torch.distributed as dist
        except ImportError:
            raise DeviceUnavailableError(
                "running a sharded (tensor-parallel) artifact needs torch for its collectives "
                "(torch.distributed): pip install 'qcompiler[fx]'") from None
        if not dist.is_available():
            raise DeviceUnavailableError("this torch build has no torch.distributed")
        if self.backend == "gloo" and not dist.is_gloo_available():
            raise DeviceUnavailableError("this torch build has no gloo backend")
        devices = self._devices() if self.backend == "nccl" else None
        if self.backend == "nccl" and not dist.is_nccl_available():
            raise DeviceUnavailableError("this torch build has no NCCL backend (a CPU build?)")
        import secrets
        import subprocess
        import sys
        import threading
        import time
        from multiprocessing.connection import Listener

        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        port = _free_port()
        procs = []
        for r in range(self.tp):
            env = dict(os.environ, NCCL_NVLS_ENABLE="0", QC_TP_AUTHKEY=authkey.hex())
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices[r]
            procs.append(subprocess.Popen(
                [sys.executable, "-c",
                 "from qcompiler.runtime.rank_worker import main; main()",
                 str(r), str(self.tp), self.rank_dirs[r], self.backend, str(port),
                 str(listener.address[1]), str(RUN_TIMEOUT_S)],
                env=env, stdin=subprocess.DEVNULL))
        conns: list = [None] * self.tp
        failed: list = []

        def accept():
            try:
                for _ in range(self.tp):
                    c = listener.accept()
                    kind, rank = c.recv()
                    conns[rank] = c
            except Exception as e:  # noqa: BLE001 - reported below
                failed.append(_describe(e))

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while thread.is_alive() and time.monotonic() < deadline:
            dead = [r for r, p in enumerate(procs) if p.poll() is not None and conns[r] is None]
            if dead:
                failed.append(f"rank {dead[0]}'s process exited (code {procs[dead[0]].returncode}) "
                              "before connecting")
                break
            thread.join(0.1)
        listener.close()
        if thread.is_alive() or failed or any(c is None for c in conns):
            _Workers(procs, [c for c in conns if c is not None]).stop()
            raise RankError(f"{self.directory}: starting the rank workers failed: "
                            f"{failed[0] if failed else 'no connection within the timeout'}")
        workers = _Workers(procs, conns)
        self._workers = workers
        self._finalizer = weakref.finalize(self, workers.stop)
        self._gather(START_TIMEOUT_S, "starting")

    def close(self) -> None:
        """Stop the workers (a later ``run`` starts them again)."""
        if self._finalizer is not None:
            self._finalizer()
        self._workers, self._finalizer = None, None

    def _gather(self, timeout_s: float, what: str) -> list:
        """Every rank's reply; on an error or a dead worker, stop all and raise RankError."""
        import time
        from multiprocessing.connection import wait

        workers = self._workers
        replies: list = [None] * self.tp
        pending = dict(enumerate(workers.conns))
        errors = []
        deadline = time.monotonic() + timeout_s
        while pending and not errors:
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append((min(pending), f"no reply within {timeout_s:.0f} s"))
                break
            ready = wait(list(pending.values()), timeout=min(left, 1.0))
            for r, c in list(pending.items()):
                if c in ready:
                    try:
                        kind, value = c.recv()
                    except (EOFError, OSError):
                        kind, value = "error", "the worker process died"
                    del pending[r]
                    if kind == "error":
                        errors.append((r, value))
                    else:
                        replies[r] = value
                elif workers.procs[r].poll() is not None:
                    del pending[r]
                    errors.append((r, f"the worker process exited (code "
                                      f"{workers.procs[r].returncode})"))
        if errors:
            self.close()
            rank, msg = errors[0]
            raise RankError(f"{self.directory}: rank {rank} failed while {what}: {msg}")
        return replies

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise InputError("run() takes a dict {input name: array}")
        self.start()
        arrays = {}
        for k, v in inputs.items():
            if type(v).__module__.startswith("torch"):
                v = v.detach().cpu().numpy()
            arrays[k] = np.asarray(v)
        for c in self._workers.conns:
            c.send(("run", arrays))
        replies = self._gather(RUN_TIMEOUT_S, "running")
        return replies[0]


__all__ = ["ShardedModule", "RankError"]
