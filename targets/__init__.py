"""Targets are data: each table of ``targets/*.toml`` loads into a frozen ``Target``.

Backends read fields; nothing parses target strings. ``status`` is ``available`` when the
target's backend exists in this version, ``planned`` otherwise (listed, refused at compile).
"""
from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from importlib import resources


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    status: str
    default_pipeline: str
    features: tuple = ()
    params: dict = field(default_factory=dict)  # everything else in the table (arch, budgets ...)

    @property
    def available(self) -> bool:
        return self.status == "available"


@functools.cache
def all_targets() -> dict[str, Target]:
    """Every registered target by name, in file order."""
    out: dict[str, Target] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".toml"):
            continue
        for name, table in tomllib.loads(entry.read_text()).items():
            table = dict(table)
            out[name] = Target(
                name=name,
                description=table.pop("description"),
                backend=table.pop("backend"),
                status=table.pop("status"),
                default_pipeline=table.pop("default_pipeline"),
                features=tuple(table.pop("features", ())),
                params=table,
            )
    return out


def get_target(name: str) -> Target:
    targets = all_targets()
    if name not in targets:
        raise KeyError(f"unknown target {name!r}; registered: {', '.join(targets)}")
    return targets[name]
