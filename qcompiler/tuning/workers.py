"""Child-process measurement: a pool of worker processes that call the backend's tuning
module under a time limit, so that a candidate that hangs or crashes is killed with its
worker and recorded, and the tuner goes on.

A worker imports the tuning module by name (or from its file), so the functions it calls
must be module-level functions of that module.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import multiprocessing
import sys
import time
import traceback
from multiprocessing.connection import wait
from typing import Optional

MAX_ERROR_CHARS = 2000   # errors are kept in the log; a compiler's full output can be huge


def _load_module(name: str, path: Optional[str]):
    try:
        return importlib.import_module(name)
    except ImportError:
        if not path:
            raise
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


def _status_of(exc: BaseException) -> str:
    from qcompiler.tuning.errors import BuildError, MeasureTimeout, WrongResult

    if isinstance(exc, BuildError):
        return "compile_error"
    if isinstance(exc, WrongResult):
        return "wrong_result"
    if isinstance(exc, MeasureTimeout):
        return "timeout"
    return "runtime_error"


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, Exception) or type(exc).__module__ != "qcompiler.tuning.errors":
        # an unexpected exception: the last frames say where it came from
        tb = "".join(traceback.format_tb(exc.__traceback__)[-3:])
        text = f"{text}\n{tb}"
    return text[:MAX_ERROR_CHARS]


def _worker_main(conn, module_name: str, module_path: Optional[str]) -> None:
    """A worker process: call functions of the tuning module, one request at a time."""
    module = None
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        fn_name, args, kwargs = request
        try:
            if module is None:
                module = _load_module(module_name, module_path)
            value = getattr(module, fn_name)(*args, **kwargs)
            reply = ("ok", value, None)
        except BaseException as e:  # noqa: BLE001 - every failure is a result to record
            reply = (_status_of(e), None, _short_error(e))
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send(("runtime_error", None, f"result could not be sent back: {e}"))


class _Worker:
    def __init__(self, ctx, module_name: str, module_path: Optional[str]):
        self.ctx, self.module_name, self.module_path = ctx, module_name, module_path
        self.deadline = math.inf
        self._start()

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main,
                                     args=(child, self.module_name, self.module_path),
                                     daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def submit(self, request: tuple, timeout_s: float) -> None:
        self.conn.send(request)
        self.deadline = time.monotonic() + timeout_s

    def restart(self) -> None:
        """Kill the process (it hung or died) and start a fresh one."""
        self.close(kill=True)
        self._start()

    def close(self, kill: bool = False) -> None:
        try:
            if not kill and self.proc.is_alive():
                self.conn.send(None)
                self.proc.join(timeout=5)
        except (OSError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """Worker processes (spawned, so no state leaks in from the tuner) that run calls of a
    backend tuning module under a time limit; a worker that times out or dies is replaced.

    ``run(requests, timeout_s)`` returns, per request, ``(status, value, error)`` with status
    "ok", a failure status of the log, or "timeout".
    """

    def __init__(self, module, size: int = 1):
        ctx = multiprocessing.get_context("spawn")
        path = getattr(module, "__file__", None)
        self.workers = [_Worker(ctx, module.__name__, path) for _ in range(max(1, size))]

    def run(self, requests: list[tuple], timeout_s: float) -> list[tuple]:
        results: list = [None] * len(requests)
        pending = list(enumerate(requests))
        running: dict[_Worker, int] = {}
        while pending or running:
            for w in self.workers:
                if w not in running and pending:
                    i, request = pending.pop(0)
                    try:
                        w.submit(request, timeout_s)
                        running[w] = i
                    except (OSError, BrokenPipeError):
                        w.restart()
                        pending.insert(0, (i, request))
            next_deadline = min(w.deadline for w in running)
            ready = wait([w.conn for w in running],
                         timeout=max(0.0, next_deadline - time.monotonic()))
            for w in list(running):
                if w.conn in ready:
                    i = running.pop(w)
                    try:
                        results[i] = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(timeout=5)
                        results[i] = ("runtime_error", None, "the worker process died (exit "
                                      f"code {w.proc.exitcode}) while running it")
                        w.restart()
                elif time.monotonic() >= w.deadline:
                    results[running.pop(w)] = (
                        "timeout", None, f"ran past the time limit of {timeout_s:g} s; killed")
                    w.restart()
        return results

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
