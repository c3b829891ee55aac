"""Wall-clock timing shared by the benchmark scripts.

The scripts run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path``.
"""
from __future__ import annotations

import time


def time_call(fn, min_seconds: float, *, min_runs: int = 3, max_runs: int = 400,
              warmup: int = 2) -> dict:
    """Call ``fn`` ``warmup`` times, then at least ``min_runs`` times and for at least
    ``min_seconds`` (at most ``max_runs``); median, min and max of one call in ms."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds
                                    and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": round(1e3 * times[len(times) // 2], 4),
            "min_ms": round(1e3 * times[0], 4), "max_ms": round(1e3 * times[-1], 4),
            "runs": len(times)}


def graph_replay_events(lib, graph, stream, reps: int) -> list:
    """The device events (kernels and copies) of ``reps`` replays of a plan's CUDA graph as
    the CUDA profiler sees them (CUPTI, through torch.profiler), sorted by start: each replay
    synchronized apart, after 5 unprofiled ones. ``lib``: the plan's launcher
    (``qc_graph_launch``, ``qc_stream_synchronize``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not graph:  # a null graph's launch fails and leaves its error for the next check
        raise ValueError("graph_replay_events: no graph to replay")
    for _ in range(5):
        lib.qc_graph_launch(graph, stream)
    lib.qc_stream_synchronize(stream)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            lib.qc_graph_launch(graph, stream)
            lib.qc_stream_synchronize(stream)  # replays apart: each one's span is measurable
    return sorted((e for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.name),
                  key=lambda e: e.time_range.start)
