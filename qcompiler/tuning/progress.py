"""Progress of a tuning run on stderr, and the summary table at its end.

On a terminal one line per kernel is redrawn in place::

    [2/3] m=1 k=4096 n=4096 u4 g128  [########------------] 16/40  best 41.3 us (1.62x)  2 failed

elsewhere (a CI log, a pipe) a line is printed every few trials instead of redrawing.
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO

BAR_WIDTH = 20


def _fmt_us(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v / 1000:.3g} ms"
    return f"{v:.3g} us"


class Progress:
    """Receives tuner events (``start_kernel``, ``trial``, ``end_kernel``) and draws them."""

    def __init__(self, total_kernels: int = 1, stream: Optional[TextIO] = None,
                 enabled: bool = True, every: int = 8):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total = total_kernels
        self.every = every
        self.index = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def start_kernel(self, key: dict, trials: int) -> None:
        from qcompiler.tuning.key import describe

        self.index += 1
        if "design" in key:
            self.label = f"the {key['layers']}-layer design for {key['design']} (cost model)"
        else:
            self.label = describe(key)
        self.trials = trials
        self.failed = 0
        self._write(f"tuning [{self.index}/{self.total}] {self.label}: up to {trials} trials\n")

    def trial(self, trial, result) -> None:
        if trial.status != "ok":
            self.failed += 1
        done = len(result.trials)
        best = result.best
        default = result.default
        speedup = ""
        if best and default and default.median:
            speedup = f" ({default.median / best.median:.2f}x vs default)"
        filled = int(BAR_WIDTH * done / max(self.trials, 1))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = (f"  [{bar}] {done}/{self.trials}  best {_fmt_us(best.median if best else None)}"
                f"{speedup}  {self.failed} failed")
        if self.tty:
            self._write("\r" + line + "\x1b[K")
        elif done % self.every == 0 or done == self.trials:
            self._write(line + "\n")

    def end_kernel(self, kernel_result) -> None:
        s = kernel_result.summary()
        end = "\n" if self.tty else ""
        self._write(f"{end}  done: {s['trials']} trials in {s['seconds']:.1f} s ({s['stopped']})"
                    f", best {_fmt_us(s['best_us'])}, default {_fmt_us(s['default_us'])}\n")


def summary_table(summaries: list[dict]) -> str:
    """A plain-text table of tuned kernels (one row per key) for the end of a run.

    "default" and "tuned" are the latencies replay judges by: a config measured more than
    once (the default and the winner are measured again at the end) shows its median.
    """
    from qcompiler.tuning.key import describe

    header = ("kernel", "trials", "failed", "default", "tuned", "speedup", "time", "best config")
    rows = []
    for s in summaries:
        key = s["key"]
        label = describe(key) if "w_scheme" in key else str(key)
        failed = sum(v for k, v in s["statuses"].items() if k != "ok")
        speed = f"{s['speedup']:.2f}x" if s.get("speedup") else "-"
        config = " ".join(f"{k}={v}" for k, v in (s["best_config"] or {}).items()) or "-"
        rows.append((label, str(s["trials"]), str(failed), _fmt_us(s["default_us"]),
                     _fmt_us(s["best_us"]), speed, f"{s['seconds']:.1f} s", config))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"
