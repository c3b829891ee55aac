"""Passes, pipelines and instruments.

A pass is a named ``Module -> Module`` value whose options are dataclass fields:

    @register_pass("quantize-weights")
    @dataclass
    class QuantizeWeightsPass(Pass):
        '''Round-to-nearest weight quantization of float matmuls.'''   # --list-passes summary
        bits: int = 4
        def run(self, module: Module) -> Module: ...

A pipeline is a string, the same in the CLI and in Python:
``canonicalize,fuse-dequant,quantize-weights{bits=4,group=128}``.
Passes never print or verify; instruments do (``PassManager(instruments=[...])``).
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

from qcompiler.errors import InputError
from qcompiler.ir import Module, print_module, verify
from qcompiler.registry import PASSES, get_pass_class


class PassError(InputError):
    """A pass could not be built (bad name or option) or could not apply."""


@dataclass
class Pass:
    """Base of all passes. Subclasses set ``name`` (by ``register_pass``) and ``run``."""

    name = "pass"

    def run(self, module: Module) -> Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, module: Module) -> Module:
        """Apply to a clone: the caller's module is never changed."""
        return self.run(module.clone())

    def backend_target(self, backend: str):
        """The target named by this pass's ``target`` option; it must be one that ``backend``
        serves (passes that decide for one backend call this first)."""
        from qcompiler.targets import get_target

        try:
            target = get_target(self.target)
        except KeyError as e:
            raise PassError(f"{self.name}: {e.args[0]}") from None
        if target.backend != backend:
            raise PassError(f"{self.name}: target {self.target!r} is served by the "
                            f"{target.backend!r} backend, not {backend!r}")
        return target

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def spec(self) -> str:
        """This pass as pipeline text, listing the options that differ from the defaults."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                opts.append(f"{f.name}={_format_option(v)}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _format_option(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def register_pass(name: str):
    """Class decorator: name the pass and make it known to pipeline strings.

    Built-in passes are also listed in ``registry.PASSES`` so that they load lazily; a pass
    defined elsewhere (a user's module) is added there when its class is defined.
    """
    def wrap(cls):
        cls.name = name
        spec = f"{cls.__module__}:{cls.__qualname__}"
        known = PASSES.setdefault(name, cls)
        if known is not cls and known != spec:
            raise PassError(f"pass name {name!r} is already registered by {known}")
        return cls
    return wrap


_SPEC = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def _parse_option(cls, name: str, key: str, text: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    key = key.replace("-", "_")
    if key not in fields:
        known = ", ".join(fields) or "none"
        raise PassError(f"pass {name!r} has no option {key!r} (options: {known})")
    default = fields[key].default
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise PassError(f"option {key}={text!r} of pass {name!r} is not a "
                        f"{type(default).__name__}") from None
    return text


def make_pass(name: str, options: Optional[dict] = None) -> Pass:
    cls = get_pass_class(name)
    kwargs = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PassError(f"pass {name!r}: {e}") from None


_SETTING = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)=([^,{}]*)")


def pipeline_with_options(spec: str, settings: Sequence[str]) -> str:
    """``spec`` with pass options set. Each setting is ``PASS.OPTION=VALUE`` (for example
    ``tile.int8_min_m=128``) and applies to every pass of that name in the pipeline; a pass
    the pipeline does not run, an option the pass does not have or a value of the wrong type
    is refused by name (``qcompile --pass-option``)."""
    passes = parse_pipeline(spec)
    for setting in settings:
        m = _SETTING.fullmatch(setting.strip())
        if not m:
            raise PassError(f"pass option {setting!r}: expected PASS.OPTION=VALUE (e.g. "
                            "tile.int8_min_m=128), a value without ',', '{' or '}'")
        name, key, text = m.groups()
        chosen = [p for p in passes if p.name == name]
        if not chosen:
            raise PassError(f"pass option {setting!r}: the pipeline runs no {name!r} pass "
                            f"(it runs {', '.join(dict.fromkeys(p.name for p in passes))})")
        value = _parse_option(type(chosen[0]), name, key, text)
        for p in chosen:
            setattr(p, key.replace("-", "_"), value)
    return ",".join(p.spec() for p in passes)


def parse_pipeline(spec: str) -> list[Pass]:
    """``"a,b{k=v,k2=v2}"`` → pass objects, in order."""
    passes: list[Pass] = []
    pos = 0
    spec = spec.strip()
    while pos < len(spec):
        m = _SPEC.match(spec, pos)
        if not m or m.end() == pos:
            raise PassError(f"cannot parse pipeline {spec!r} at {spec[pos:]!r}")
        name, opts = m.group(1), m.group(2)
        if name not in PASSES:
            raise PassError(f"unknown pass {name!r}; registered: {', '.join(sorted(PASSES))}")
        cls = get_pass_class(name)
        kwargs = {}
        for item in filter(None, (o.strip() for o in (opts or "").split(","))):
            if "=" not in item:
                raise PassError(f"option {item!r} of pass {name!r} needs the form key=value")
            k, v = item.split("=", 1)
            kwargs[k.strip().replace("-", "_")] = _parse_option(cls, name, k.strip(), v)
        passes.append(make_pass(name, kwargs))
        pos = m.end()
    return passes


# --------------------------------------------------------------------------------------------
# instruments
# --------------------------------------------------------------------------------------------


class Instrument:
    """Hooks around each pass. Override what you need."""

    def before_pipeline(self, module: Module) -> None: ...
    def before_pass(self, p: Pass, module: Module) -> None: ...
    def after_pass(self, p: Pass, module: Module, seconds: float) -> None: ...
    def after_pipeline(self, module: Module) -> None: ...


class PrintIRAfter(Instrument):
    """``--print-ir-after-all`` (names=None) or ``--print-ir-after=NAME[,NAME]``."""

    def __init__(self, names: Optional[set[str]] = None, stream: Optional[TextIO] = None,
                 before_all: bool = False):
        self.names = names
        self.stream = stream
        self.before_all = before_all

    def before_pipeline(self, module):
        if self.before_all:
            self._print("input", module)

    def after_pass(self, p, module, seconds):
        if self.names is None or p.name in self.names:
            self._print(p.spec(), module)

    def _print(self, label: str, module: Module) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"// ----- IR after {label} -----\n{print_module(module)}")


class VerifyAfterEach(Instrument):
    """Run the verifier after every pass; the error names the pass that broke the IR."""

    def before_pipeline(self, module):
        verify(module)

    def after_pass(self, p, module, seconds):
        try:
            verify(module)
        except ValueError as e:
            raise PassError(f"IR invalid after pass {p.spec()}: {e}") from None


class TimePasses(Instrument):
    """``--time-passes``: wall time per pass, printed at the end."""

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream
        self.times: list[tuple[str, float]] = []

    def after_pass(self, p, module, seconds):
        self.times.append((p.spec(), seconds))

    def after_pipeline(self, module):
        stream = self.stream or sys.stderr
        total = sum(t for _, t in self.times) or 1e-12
        stream.write("===- pass execution timing report -===\n")
        stream.write(f"  total: {total * 1e3:.2f} ms\n")
        for name, t in self.times:
            stream.write(f"  {t * 1e3:9.2f} ms  {100 * t / total:5.1f}%  {name}\n")


class RecordPasses(Instrument):
    """Collects what each pass did for report.json: name, time, node counts before/after."""

    def __init__(self):
        self.records: list[dict] = []
        self._before = 0

    def before_pass(self, p, module):
        self._before = len(module.main.nodes)

    def after_pass(self, p, module, seconds):
        stats = module.metadata.get("pass_stats", {}).pop(p.name, {})
        self.records.append({"pass": p.spec(), "ms": round(seconds * 1e3, 3),
                             "nodes_before": self._before, "nodes_after": len(module.main.nodes),
                             **stats})


class PassManager:
    """Runs passes in order under instruments."""

    def __init__(self, passes: list[Pass], instruments: Optional[list[Instrument]] = None):
        self.passes = list(passes)
        self.instruments = list(instruments or [])

    @classmethod
    def parse(cls, spec: str, instruments: Optional[list[Instrument]] = None) -> "PassManager":
        return cls(parse_pipeline(spec), instruments)

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, module: Module) -> Module:
        """Run every pass; the input module is left unchanged."""
        for ins in self.instruments:
            ins.before_pipeline(module)
        for p in self.passes:
            for ins in self.instruments:
                ins.before_pass(p, module)
            start = time.perf_counter()
            module = p(module)
            elapsed = time.perf_counter() - start
            for ins in self.instruments:
                ins.after_pass(p, module, elapsed)
        for ins in self.instruments:
            ins.after_pipeline(module)
        return module


def record_stat(module: Module, pass_name: str, **stats) -> None:
    """Let a pass note counts (``fused=3``) that the report instrument picks up."""
    bucket = module.metadata.setdefault("pass_stats", {}).setdefault(pass_name, {})
    for k, v in stats.items():
        bucket[k] = bucket.get(k, 0) + v if isinstance(v, int) else v

