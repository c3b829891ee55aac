"""Building kernels once: content keys, the build cache across compiles, parallel builds.

A backend describes each kernel it needs as a ``KernelBuild``: the key (``kernel_key``: sha256
over the generated source, the build flags / target string, the tool's version and
qcompiler's version) and a picklable ``build(path)`` that writes the library. ``Builder``

1. builds each distinct key once per artifact (nodes with equal keys share one library,
   ``kernels/<prefix>_<key[:12]><suffix>``; the name is stable across runs);
2. copies a library from the user's build cache (``cache_dir()``) when it holds a sound entry
   for the key, else builds it and stores it there;
3. builds the misses in ``jobs`` forked processes (TVM's lowering and LLVM hold the GIL, so
   threads measured no faster than one; forked workers inherit the imported modules, so a
   worker costs no import);
4. shows a one-line counter on a terminal (``building kernels 3/12 (2 cached)``) and keeps
   what it did (``report()``: total and per-kernel seconds, hits, misses, jobs) for
   report.json / report.txt.

A cache entry is one file, ``<root>/kernels/<key>.entry``: a header line with the sha256 and
size of the library, then its bytes. It is written to a temp file in the same directory and
renamed into place, so a concurrent compile sees the old entry, the new one or none, never a
part; an entry whose bytes do not match its header (truncated, overwritten) is rebuilt.
"""
from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from qcompiler.errors import ConfigError, QCompilerError

CACHE_ENV = "QC_CACHE_DIR"
ENTRY_MAGIC = "qcompiler-cache-entry-1"


class KernelBuildError(QCompilerError, RuntimeError):
    """Building a kernel failed; the message names the kernel and the nodes that use it."""


def cache_dir() -> str:
    """``$QC_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcompiler``, else ``~/.cache/qcompiler``."""
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = xdg or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qcompiler")


def default_jobs() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def kernel_key(source: str, flags: str, tool: str) -> str:
    """sha256 over what decides a library's bytes: the generated source, the build flags or
    target string, the tool's version, and qcompiler's version."""
    import qcompiler.version

    blob = json.dumps({"source": source, "flags": flags, "tool": tool,
                       "qcompiler": qcompiler.version.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_name(prefix: str, key: str, suffix: str) -> str:
    return f"{prefix}_{key[:12]}{suffix}"


@dataclass
class KernelBuild:
    """One distinct kernel: its key and how to build it.

    ``build(path)`` writes the library at ``path``; it must be picklable (a module-level
    function or a ``functools.partial`` of one) because it may run in a worker process.
    """
    key: str
    library: str            # the file name inside kernels/ (``file_name(...)``)
    build: Callable[[str], object]
    nodes: list = field(default_factory=list)   # the qmatmul results that call it


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------


class BuildCache:
    """Libraries by kernel key under ``root`` (``None``: no cache, every lookup misses)."""

    def __init__(self, root: Optional[str]):
        self.root = root

    def _entry(self, key: str) -> str:
        return os.path.join(self.root, "kernels", key + ".entry")

    def fetch(self, key: str, dest: str) -> str:
        """Copy the library of ``key`` to ``dest``: "hit", "miss" or "corrupt" (not copied)."""
        if self.root is None:
            return "miss"
        try:
            with open(self._entry(key), "rb") as f:
                header = f.readline()
                data = f.read()
        except OSError:
            return "miss"
        try:
            magic, digest, size = header.decode().split()
            size = int(size)
        except (UnicodeDecodeError, ValueError):
            return "corrupt"
        if magic != ENTRY_MAGIC or len(data) != size or \
                hashlib.sha256(data).hexdigest() != digest:
            return "corrupt"
        with open(dest, "wb") as f:  # into the artifact: no other writer, ordinary mode
            f.write(data)
        return "hit"

    def store(self, key: str, library: str) -> None:
        """Put the library file at ``library`` into the cache under ``key`` (atomically)."""
        if self.root is None:
            return
        with open(library, "rb") as f:
            data = f.read()
        header = f"{ENTRY_MAGIC} {hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()
        try:
            os.makedirs(os.path.join(self.root, "kernels"), exist_ok=True)
            _write_atomic(self._entry(key), header + data)
        except OSError as e:
            # An unwritable cache costs speed, not correctness: the artifact has the library.
            sys.stderr.write(f"qcompiler: warning: build cache {self.root} not written: {e}\n")


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                               prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# building many kernels
# --------------------------------------------------------------------------------------------


def _timed_build(build: Callable[[str], object], path: str) -> float:
    """Run one build (in a worker process or here); its seconds."""
    start = time.perf_counter()
    build(path)
    return time.perf_counter() - start


class Progress:
    """``building kernels 3/12 (2 cached)`` rewritten in place on a terminal; silent
    otherwise (the CLI's last line and the report say what was built)."""

    def __init__(self, total: int, enabled: Optional[bool] = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled and total > 0
        self.total, self.done, self.cached = total, 0, 0

    def step(self, cached: bool) -> None:
        self.done += 1
        self.cached += int(cached)
        self.show()

    def show(self) -> None:
        if self.enabled:
            self.stream.write(f"\rbuilding kernels {self.done}/{self.total} "
                              f"({self.cached} cached)")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class Builder:
    """Builds the kernels of one compile (or one tuning candidate) with a cache and jobs.

    ``cache``: True (the user cache, ``cache_dir()``), False/None (none), or a directory.
    ``jobs``: worker processes for the misses (default: the usable CPUs).
    """

    def __init__(self, cache=True, jobs: Optional[int] = None,
                 progress: Optional[bool] = None):
        if cache is True:
            root = cache_dir()
        elif cache in (False, None):
            root = None
        else:
            root = os.fspath(cache)
        self.cache = BuildCache(root)
        if jobs is not None and int(jobs) < 1:
            raise ConfigError(f"jobs={jobs}: the number of parallel builds must be at least 1")
        self.jobs = int(jobs) if jobs is not None else default_jobs()
        self.progress = progress
        self.records: list[dict] = []
        self.seconds = 0.0

    def build_many(self, builds: list[KernelBuild], out_dir: str) -> None:
        """Put the library of every build into ``out_dir`` (from the cache or built);
        ``builds`` must have distinct keys (a backend groups its nodes by key first)."""
        start = time.perf_counter()
        os.makedirs(out_dir, exist_ok=True)
        bar = Progress(len(builds), self.progress)
        bar.show()
        misses = []
        for b in builds:
            t0 = time.perf_counter()
            state = self.cache.fetch(b.key, os.path.join(out_dir, b.library))
            if state == "hit":
                self._record(b, "hit", time.perf_counter() - t0)
                bar.step(cached=True)
            else:
                misses.append((b, state))
        try:
            for (b, state), seconds in zip(misses, self._run(misses, out_dir, bar)):
                self.cache.store(b.key, os.path.join(out_dir, b.library))
                self._record(b, "rebuilt-corrupt" if state == "corrupt" else "miss", seconds)
        finally:
            bar.close()
        self.seconds += time.perf_counter() - start

    def _run(self, misses: list, out_dir: str, bar: Progress):
        """Build the misses; yields each one's seconds in order."""
        def fail(b, e):
            raise KernelBuildError(f"building {b.library} (for %{', %'.join(b.nodes)}) failed: "
                                   f"{type(e).__name__}: {e}") from e

        jobs = min(self.jobs, len(misses))
        if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            for b, _ in misses:
                try:
                    seconds = _timed_build(b.build, os.path.join(out_dir, b.library))
                except QCompilerError:
                    raise
                except Exception as e:
                    fail(b, e)
                bar.step(cached=False)
                yield seconds
            return
        # fork: the workers start with everything imported (TVM takes seconds to import).
        # A forked worker must not collect the parent's objects: garbage the parent has not
        # collected yet (an onnxruntime session of a test, say) would be destroyed in the
        # child, and a destructor that joins or signals the parent's threads waits there for
        # ever (seen: onnxruntime's thread pool in pthread_cond_destroy, a CI run hung). So
        # the parent collects first, and what is left is frozen (out of the collector's
        # reach) while the workers are forked.
        ctx = multiprocessing.get_context("fork")
        gc.collect()
        gc.freeze()
        try:
            pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx)
            futures = [pool.submit(_timed_build, b.build, os.path.join(out_dir, b.library))
                       for b, _ in misses]  # (the workers are forked by the first submit)
        finally:
            gc.unfreeze()
        with pool:
            for fut in concurrent.futures.as_completed(futures):
                bar.step(cached=False)
                if fut.exception() is not None:
                    for other in futures:
                        other.cancel()
            for (b, _), fut in zip(misses, futures):
                try:
                    seconds = fut.result()
                except QCompilerError:
                    raise
                except Exception as e:
                    fail(b, e)
                yield seconds

    def _record(self, b: KernelBuild, state: str, seconds: float) -> None:
        self.records.append({"library": b.library, "key": b.key, "nodes": list(b.nodes),
                             "cache": state, "seconds": round(seconds, 4)})

    def report(self) -> dict:
        """What was built: for report.json (timings live here, never in the manifest)."""
        hits = sum(1 for r in self.records if r["cache"] == "hit")
        return {"seconds": round(self.seconds, 4), "jobs": self.jobs,
                "cache": self.cache.root, "kernels": len(self.records),
                "built": len(self.records) - hits, "cache_hits": hits,
                "cache_misses": len(self.records) - hits,
                "per_kernel": sorted(self.records, key=lambda r: r["library"])}
