"""PNG plots of a tuning run (matplotlib, Agg backend: no display needed).

- ``plot_trials``: latency of every trial against its index, with the best so far and the
  heuristic default, one panel per kernel (failed trials as crosses at the top);
- ``plot_roofline``: the tuned and default kernels on the target's roofline; arithmetic
  intensity and work come from the key (``kernel_work``), the roofs from the target's
  ``peak_gflops`` and ``mem_bandwidth_gbs`` or, without them on a CPU, from the host
  (fp32 FMA peak from cores, clock and vector width; copy bandwidth measured with numpy).
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

# Storage bytes of element types by bit width; sub-byte codes are counted packed.
_FLOAT_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}


def kernel_work(key: dict) -> dict:
    """Flops and the minimum bytes moved by one qmatmul call of ``key``.

    Bytes: x once, the packed weight codes once, scales and zero points once, bias and y
    once: a kernel that reaches the memory roof moves no more than this.
    """
    from qcompiler.tuning.key import scheme_of

    scheme = scheme_of(key)
    m, k, n = key["m"], key["k"], key["n"]
    x_bytes = _FLOAT_BYTES.get(key["x_dtype"], 1)
    y_bytes = x_bytes if key["act"] == "float" else 4
    if scheme.granularity == "group":
        blocks = math.ceil((k if scheme.axis == 0 else n) / scheme.block_size)
        scale_count = blocks * (n if scheme.axis == 0 else k)
    elif scheme.granularity == "channel":
        scale_count = n if scheme.axis == 1 else k
    else:
        scale_count = 1
    scale_bytes = max(scheme.scale_type.bits, 8) / 8
    zp_bytes = scheme.zero_point_type.bits / 8 if scheme.zero_point_type is not None else 0
    moved = (m * k * x_bytes + k * n * scheme.bits / 8 + scale_count * (scale_bytes + zp_bytes)
             + m * n * y_bytes + (n * x_bytes if key.get("has_bias") else 0)
             + (k * 4 if key.get("act_order") else 0))
    return {"flops": 2.0 * m * k * n, "bytes": float(moved)}


def _cpu_vector_bits(target) -> int:
    if target.params.get("vector_bits"):
        return int(target.params["vector_bits"])
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return 512 if " avx512f" in flags else 256 if " avx2" in flags else 128


def _cpu_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return 2000.0


def cpu_roofs(target, seconds: float = 0.2) -> dict:
    """Roofs of this host: fp32 FMA peak from cores x clock x vector lanes x 2 FMA units x 2
    flops, and the copy bandwidth measured with numpy (32 MiB, beyond most caches; kernels
    whose weights fit in cache can exceed it)."""
    import numpy as np

    a = np.ones(32 * 1024 * 1024 // 8)
    b = np.empty_like(a)
    best_copy = math.inf
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        np.copyto(b, a)
        best_copy = min(best_copy, time.perf_counter() - t)
    cores, mhz, lanes = os.cpu_count() or 1, _cpu_mhz(), _cpu_vector_bits(target) // 32
    return {"mem_bandwidth_gbs": 2 * a.nbytes / best_copy / 1e9,
            "peak_gflops": cores * mhz / 1e3 * lanes * 2 * 2,
            "source": f"fp32 FMA peak of {cores} cores at {mhz:.0f} MHz x {lanes} lanes; "
                      "measured copy"}


def target_roofs(target) -> Optional[dict]:
    """The target's declared peaks, a measurement for CPU targets, else None."""
    params = target.params
    if params.get("peak_gflops") and params.get("mem_bandwidth_gbs"):
        return {"peak_gflops": float(params["peak_gflops"]),
                "mem_bandwidth_gbs": float(params["mem_bandwidth_gbs"]),
                "source": f"{target.name} data sheet"}
    if target.backend in ("cpu", "reference"):
        return cpu_roofs(target)
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trials(summaries: list[dict], path: str, title: str = "") -> str:
    """Latency against trial index, one panel per kernel. ``summaries`` are
    ``KernelResult.summary()`` dicts with ``"trial_points"`` (index, median, status) added."""
    from qcompiler.tuning.key import describe

    plt = _pyplot()
    count = max(1, len(summaries))
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, s in zip(axes.flat, summaries):
        trials = s["trial_points"]
        ok = [(t["index"], t["median"]) for t in trials if t["median"] is not None]
        bad = [t["index"] for t in trials if t["median"] is None]
        if ok:
            ax.scatter([i for i, _ in ok], [v for _, v in ok], s=14, color="tab:blue",
                       label="trial (ok)")
            best, running = math.inf, []
            for t in trials:
                if t["median"] is not None:
                    best = min(best, t["median"])
                running.append(best if best < math.inf else None)
            xs = [i for i, b in zip((t["index"] for t in trials), running) if b is not None]
            ax.step(xs, [b for b in running if b is not None], where="post", color="tab:green",
                    label="best so far")
            top = max(v for _, v in ok)
            if bad:
                ax.scatter(bad, [top * 1.05] * len(bad), marker="x", color="tab:red",
                           label="failed")
        if s.get("default_us"):
            ax.axhline(s["default_us"], color="tab:orange", linestyle="--",
                       label="heuristic default")
        label = describe(s["key"]) if "w_scheme" in s["key"] else str(s["key"])
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("trial")
        ax.set_ylabel("latency (us)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(summaries):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roofline(summaries: list[dict], roofs: dict, path: str, title: str = "") -> str:
    """Tuned (and default) kernels as points under the roofs ``min(peak, bw * intensity)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    peak, bw = roofs["peak_gflops"], roofs["mem_bandwidth_gbs"]
    points = []
    for s in summaries:
        work = kernel_work(s["key"])
        ai = work["flops"] / work["bytes"]
        for which, us, marker in (("tuned", s.get("best_us"), "o"),
                                  ("default", s.get("default_us"), "s")):
            if us:
                points.append((ai, work["flops"] / (us * 1e-6) / 1e9, which, marker, s["key"]))
    lo = min([p[0] for p in points] + [0.1]) / 2
    hi = max([p[0] for p in points] + [peak / bw * 4])
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, bw * x) for x in xs], color="black",
            label=f"roof: {peak:.4g} GFLOP/s, {bw:.4g} GB/s ({roofs.get('source', '')})")
    for which, color in (("default", "tab:orange"), ("tuned", "tab:blue")):
        pts = [p for p in points if p[2] == which]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=pts[0][3], color=color,
                       label=which, zorder=3)
    for ai, gf, which, _, key in points:
        if which == "tuned":
            ax.annotate(f"m={key['m']} k={key['k']} n={key['n']}", (ai, gf), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(summaries: list[dict], target, out_dir: str, device: str = "") -> list[str]:
    """Both plots into ``out_dir`` (tuning_trials.png, tuning_roofline.png); returns paths.

    The roofline needs roofs (declared or measurable) and latencies in real time; it is
    skipped for cost-model "latencies" (FPGA), which the trials plot still shows.
    """
    os.makedirs(out_dir, exist_ok=True)
    title = f"{target.name} on {device}" if device else target.name
    paths = [plot_trials(summaries, os.path.join(out_dir, "tuning_trials.png"), title)]
    roofs = target_roofs(target) if target.backend != "hls" else None
    if roofs and any(s.get("best_us") for s in summaries):
        paths.append(plot_roofline(summaries, roofs,
                                   os.path.join(out_dir, "tuning_roofline.png"), title))
    return paths
