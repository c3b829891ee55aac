"""The tuning log: JSON Lines, one record per measured candidate, append-only.

A record (docs/tuning-log.md)::

    {"version": 1, "target": "cuda-sm90", "device": "NVIDIA H100 80GB HBM3", "op": "qmatmul",
     "key": {...kernel_key...}, "config": {...knobs...},
     "latency_us": {"median": .., "min": .., "max": .., "runs": ..},
     "status": "ok" | "compile_error" | "runtime_error" | "wrong_result" | "timeout",
     "error": null | "message", "time": "2026-11-25T12:00:00+00:00", "qcompiler": "0.1.0"}

Replay (``best_config``) takes only ``status == "ok"`` records of exactly the same target,
device and key, so a log measured on one GPU is never applied to another; a config measured
several times counts with the median of its records.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import statistics
import warnings
from pathlib import Path
from typing import Callable, Optional

LOG_VERSION = 1
STATUSES = ("ok", "compile_error", "runtime_error", "wrong_result", "timeout")
RECORD_FIELDS = ("version", "target", "device", "op", "key", "config", "latency_us", "status",
                 "error", "time", "qcompiler")


class CorruptLogLine(UserWarning):
    """A line of a tuning log that is not a valid record; it is skipped."""


class OtherDeviceRecords(UserWarning):
    """A tuning log has records of a kernel for other devices only; they are not applied."""


class RejectedConfig(UserWarning):
    """A record's config fails the backend's validator on replay; it is not applied."""


def make_record(target_name: str, device_name: str, key: dict, config: dict,
                latency_us: Optional[dict], status: str, error: Optional[str] = None,
                time: Optional[str] = None) -> dict:
    """A complete record; ``time`` defaults to now (UTC, ISO 8601)."""
    from qcompiler.version import __version__

    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    if status == "ok" and not latency_us:
        raise ValueError("an ok record needs latency_us")
    return {
        "version": LOG_VERSION,
        "target": target_name,
        "device": device_name,
        "op": key.get("op", "qmatmul"),
        "key": key,
        "config": config,
        "latency_us": latency_us,
        "status": status,
        "error": error,
        "time": time or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "qcompiler": __version__,
    }


def _flat(obj) -> bool:
    """A JSON object of scalars (no nesting): what every key and config is."""
    return isinstance(obj, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str)))
        for k, v in obj.items())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def validate(record) -> Optional[str]:
    """None if ``record`` is a valid record, else what is wrong with it (never raises)."""
    if not isinstance(record, dict):
        return f"a record is a JSON object, not {type(record).__name__}"
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        return f"missing fields {missing}"
    if type(record["version"]) is not int or record["version"] != LOG_VERSION:
        return f"log version {record['version']!r:.40} (this qcompiler reads {LOG_VERSION})"
    for field in ("target", "device", "op", "status"):
        if not isinstance(record[field], str):
            return f"{field} must be a string"
    if record["status"] not in STATUSES:
        return f"unknown status {record['status']!r:.40}"
    if not _flat(record["key"]) or not _flat(record["config"]):
        return "key and config must be JSON objects of numbers, strings and booleans"
    if record["status"] == "ok":
        lat = record["latency_us"]
        if not isinstance(lat, dict) or not all(
                _number(lat.get(f)) for f in ("median", "min", "max")):
            return "an ok record needs latency_us with numeric median, min and max"
    return None


def append(path, record: dict) -> None:
    """Append one record as one line. A single ``write`` on an O_APPEND file keeps lines whole
    when several processes append to the same log."""
    problem = validate(record)
    if problem:
        raise ValueError(f"not a tuning record: {problem}")
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read(path) -> list[dict]:
    """Every valid record of the log in file order; a missing file is an empty log (the tuner
    creates it; replay refuses a missing file, see ``Replay``).

    A corrupt line (bad JSON, nesting too deep, a truncated write, a record of another
    version, fields of the wrong type) is skipped with a ``CorruptLogLine`` warning that
    names the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                # ValueError: bad JSON (JSONDecodeError) or a number too long to convert;
                # RecursionError: nesting deeper than the parser's stack.
                why = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
                warnings.warn(f"{path}:{lineno}: skipped a corrupt tuning record ({why})",
                              CorruptLogLine, stacklevel=2)
                continue
            problem = validate(record)
            if problem:
                warnings.warn(f"{path}:{lineno}: skipped a tuning record: {problem}",
                              CorruptLogLine, stacklevel=2)
                continue
            records.append(record)
    return records


def matching(records: list[dict], target_name: str, device_name: str, key: dict) -> list[dict]:
    """The records of exactly this target, device and key (any status)."""
    from qcompiler.tuning.key import key_id

    kid = key_id(key)
    return [r for r in records
            if r["target"] == target_name and r["device"] == device_name
            and key_id(r["key"]) == kid]


def config_scores(records: list[dict], target_name: str, device_name: str,
                  key: dict) -> list[tuple[dict, float, int]]:
    """(config, score, records) of every config with ok records for this target, device and
    key, in the order first measured; the score is the median of its records' medians."""
    by_config: dict[str, list[dict]] = {}
    for r in matching(records, target_name, device_name, key):
        if r["status"] == "ok":
            by_config.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
    return [(group[0]["config"], statistics.median(r["latency_us"]["median"] for r in group),
             len(group)) for group in by_config.values()]


def best_record(records: list[dict], target_name: str, device_name: str, key: dict,
                per_config: bool = True) -> Optional[dict]:
    """The ok record of the fastest config for this target, device and key.

    ``per_config``: a config measured several times (the tuner measures the default and the
    winner again at its end) counts with the median of its records' medians, so that one
    lucky measurement on a loaded machine does not make it win; with one record per config
    this is the record of lowest median. False: the single record of lowest median (the
    FPGA cost model's records score whole designs, each once). Ties go to the config
    measured first, so replay is deterministic.
    """
    ok = [r for r in matching(records, target_name, device_name, key) if r["status"] == "ok"]
    if not per_config:
        return min(ok, key=lambda r: r["latency_us"]["median"]) if ok else None
    scores = config_scores(ok, target_name, device_name, key)
    if not scores:
        return None
    best_config = min(scores, key=lambda t: t[1])[0]
    return next(r for r in ok if r["config"] == best_config)


# While ``recording_lookups`` is active: the keys asked of ``Replay.best_config``.
_LOOKUPS: Optional[list] = None


@contextlib.contextmanager
def recording_lookups():
    """Within it, ``Replay.best_config`` reads no log, answers None (the pass then uses its
    heuristic) and records every key it is asked for: the tuner learns this way which
    kernels a pipeline's config-choosing pass looks up. Yields the list of keys."""
    global _LOOKUPS
    outer, _LOOKUPS = _LOOKUPS, []
    try:
        yield _LOOKUPS
    finally:
        _LOOKUPS = outer


class Replay:
    """A tuning log read once, for a pass that looks up the configs of many kernels.

    A missing file is an ``InputError`` ("tuning log FILE does not exist"): replay never
    treats a mistyped path as an empty log (``qcompile --tune`` creates the file first).
    """

    def __init__(self, path):
        self.path = path
        if _LOOKUPS is not None:
            self.records = []
            return
        if not Path(path).is_file():
            from qcompiler.errors import InputError

            raise InputError(f"tuning log {path} does not exist")
        self.records = read(path)

    def best_config(self, target_name: str, device_name: str, key: dict,
                    check: Optional[Callable[[dict], Optional[str]]] = None) -> Optional[dict]:
        """The fastest verified config for exactly this target, device and key
        (``best_record``), or None when the log has none (the caller uses its heuristic).

        ``check`` is the backend's validator (config -> None or what is wrong): a record whose
        config fails it is skipped with a ``RejectedConfig`` warning and the next best valid
        one is taken. When the log holds ok records of this target and key measured on other
        devices only, the fallback is announced (``OtherDeviceRecords`` warning).
        """
        best = self.best_record(target_name, device_name, key, check)
        return None if best is None else dict(best["config"])

    def best_record(self, target_name: str, device_name: str, key: dict,
                    check: Optional[Callable[[dict], Optional[str]]] = None) -> Optional[dict]:
        """The record ``best_config`` takes its config from (its ``latency_us`` compares
        kernels of different keys: a pass choosing between numerics), or None."""
        if _LOOKUPS is not None:
            _LOOKUPS.append(dict(key))
            return None
        from qcompiler.tuning.key import key_id

        kid = key_id(key)
        records = self.records
        if check is not None:
            records = []
            for r in self.records:
                if r["status"] == "ok" and r["target"] == target_name \
                        and r["device"] == device_name and key_id(r["key"]) == kid:
                    problem = check(dict(r["config"]))
                    if problem:
                        warnings.warn(f"{self.path}: a record of the kernel {kid} is not used: "
                                      f"{problem}", RejectedConfig, stacklevel=2)
                        continue
                records.append(r)
        best = best_record(records, target_name, device_name, key)
        if best is not None:
            return best
        others = sorted({r["device"] for r in records
                         if r["status"] == "ok" and r["target"] == target_name
                         and key_id(r["key"]) == kid})
        if others:
            warnings.warn(f"{self.path}: the kernel {kid} was tuned for {target_name} on "
                          f"{', '.join(others)}, not on this device ({device_name}); those "
                          "records are not applied (the heuristic is used)",
                          OtherDeviceRecords, stacklevel=2)
        return None


def best_config(path, target_name: str, device_name: str, key: dict) -> Optional[dict]:
    """``Replay(path).best_config(...)`` for one lookup."""
    return Replay(path).best_config(target_name, device_name, key)