"""``qcompile``: the command line.

    qcompile MODEL [--target T[:tp=N]] [--tp N] [-o DIR] [--passes SPEC]
             [--pass-option PASS.OPTION=VALUE ...]
             [--print-ir-after-all | --print-ir-after NAME] [--time-passes] [--verify-each]
             [--tune [--trials N] [--tune-m M]] [--tuning-log FILE] [-j N] [--no-cache]
             [--allow-host-fallback]
    qcompile --list-passes | --list-targets
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Optional

import qcompiler
from qcompiler.errors import ConfigError, QCompilerError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qcompile",
        description="Compile a quantized model (ONNX) into kernels for a target.")
    ap.add_argument("model", nargs="?", help="an .onnx model (or a .qir file)")
    ap.add_argument("-t", "--target", default="ref",
                    help="target name (see --list-targets), optionally with options: "
                         "NAME:tp=N (e.g. cuda-sm90:tp=2)")
    ap.add_argument("--tp", type=int, default=None, metavar="N",
                    help="tensor-parallel degree (same as the target option tp=N): runs "
                         "shard{tp=N} and writes a sharded artifact, one rank per directory")
    ap.add_argument("-o", "--output", default="qc_out", help="artifact directory (qc_out)")
    ap.add_argument("--passes", help="pipeline, e.g. 'canonicalize,fuse-dequant' "
                                     "(default: the target's)")
    ap.add_argument("--pass-option", metavar="PASS.OPTION=VALUE", action="append", default=[],
                    help="set an option of a pass of the pipeline (repeatable), e.g. "
                         "tile.int8_min_m=128 (int8 activations on CUDA from 128 rows where "
                         "the model permits them)")
    ap.add_argument("--print-ir-after-all", action="store_true",
                    help="print the IR after every pass (to stderr)")
    ap.add_argument("--print-ir-before-all", action="store_true",
                    help="print the imported IR before the first pass (to stderr)")
    ap.add_argument("--print-ir-after", metavar="NAME", action="append", default=[],
                    help="print the IR after the named pass (repeatable, or NAME,NAME)")
    ap.add_argument("--time-passes", action="store_true", help="report the time of each pass")
    ap.add_argument("--verify-each", action="store_true",
                    help="run the IR verifier after every pass")
    ap.add_argument("--emit-ir", action="store_true", help="print the final IR to stdout")
    ap.add_argument("--print-plan", action="store_true",
                    help="print the executable plan (steps, buffers, arena offsets of the first "
                         "shape bucket, every bucket's peak) to stdout")
    ap.add_argument("--buckets", metavar="SYM=N,N;SYM=N",
                    help="shape buckets of the plan: upper bounds per input symbol, every "
                         "combination planned, e.g. 'batch=1,8,32;seq=16,128,512' (default: "
                         "1,16,128 per symbol)")
    ap.add_argument("--tune", action="store_true",
                    help="autotune every distinct kernel on the target's device first, append "
                         "to the tuning log, then compile with the best configs")
    ap.add_argument("--trials", type=int, default=None, metavar="N",
                    help="candidates per kernel with --tune (32; 500 for FPGA designs)")
    ap.add_argument("--tune-m", default=None, metavar="M[,M]",
                    help="rows (M) that symbolic batch dimensions take when tuning (default "
                         "1; on targets that dispatch on M buckets, every bucket)")
    ap.add_argument("--tuning-log", metavar="FILE",
                    help="tuning log (JSON Lines); without --tune, replay its best verified "
                         "config per kernel (default with --tune: DIR/tuning_log.jsonl)")
    ap.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                    help="kernels built in parallel (default: the usable CPUs); also the "
                         "tuner's parallel candidate builds")
    ap.add_argument("--no-cache", action="store_true",
                    help="build every kernel: neither read nor write the build cache "
                         "($QC_CACHE_DIR, else $XDG_CACHE_HOME/qcompiler or ~/.cache/qcompiler)")
    ap.add_argument("--allow-host-fallback", action="store_true",
                    help="let ops the target cannot run (e.g. a cpu qmatmul with int8 "
                         "activations) run in the host interpreter instead of failing")
    ap.add_argument("--debug", action="store_true",
                    help="on an error, print the full Python traceback too")
    ap.add_argument("--check", action="store_true",
                    help="report the model's ONNX op coverage without compiling (exit 0 when "
                         "every op is supported, 1 otherwise)")
    ap.add_argument("--list-passes", action="store_true", help="list passes and exit")
    ap.add_argument("--list-targets", action="store_true", help="list targets and exit")
    ap.add_argument("--version", action="version", version=f"qcompile {qcompiler.__version__}")
    return ap


def list_passes() -> str:
    from qcompiler.registry import PASSES, get_pass_class
    import dataclasses

    lines = []
    for name in sorted(PASSES):
        cls = get_pass_class(name)
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        lines.append(f"  {name:<20} {cls.summary()}")
        if opts:
            lines.append(f"  {'':<20}   options: {opts}")
    return "Passes:\n" + "\n".join(lines) + "\n"


def list_targets() -> str:
    from qcompiler.targets import all_targets

    lines = []
    for t in all_targets().values():
        status = "" if t.available else f"  [{t.status}: {t.backend} backend not built yet]"
        lines.append(f"  {t.name:<16} {t.description}{status}")
    return "Targets:\n" + "\n".join(lines) + "\n"


def _tune_m(spec: Optional[str]) -> Optional[list[int]]:
    """--tune-m M[,M]: positive row counts."""
    if not spec:
        return None
    try:
        rows = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--tune-m {spec!r}: expected positive integers M[,M]") from None
    if any(m < 1 for m in rows):
        raise ConfigError(f"--tune-m {spec!r}: rows must be >= 1")
    return rows


def _buckets(spec: Optional[str]) -> Optional[dict]:
    """--buckets 'batch=1,8;seq=16,128' -> {"batch": [1, 8], "seq": [16, 128]}."""
    if not spec:
        return None
    out = {}
    for part in spec.split(";"):
        name, _, values = part.partition("=")
        try:
            out[name.strip()] = [int(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"--buckets {spec!r}: expected SYM=N,N;SYM=N") from None
    return out


def _plan_text(out_dir: str) -> str:
    """The plan stored in the artifact's manifest, printed (or why there is none)."""
    import json
    import os

    from qcompiler.plan import format_plan, plan_from_json

    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if "ranks" in manifest:  # a sharded artifact: each rank's plan
        return "".join(f"# rank {r['rank']} ({r['dir']}/)\n"
                       + _plan_text(os.path.join(out_dir, r["dir"]))
                       for r in manifest["ranks"])
    data = manifest.get("plan")
    if data is None:
        with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as f:
            why = json.load(f).get("plan", {}).get("error", "unknown")
        return f"no plan: {why}\n"
    return format_plan(plan_from_json(data))


def _one_line(text: str, limit: int = 2000) -> str:
    """Messages are meant to be one line; keep the CLI's output one line even if one is not."""
    text = " ".join(text.split("\n")).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def _report_error(e: QCompilerError, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    # A KeyError's str() quotes its message; its first argument is the message itself.
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    sys.stderr.write(f"qcompile: error: {_one_line(str(msg))}\n")
    return 1


def _report_internal_error(e: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exc()
        sys.stderr.write(f"qcompile: internal error: {type(e).__name__}: {_one_line(str(e))} "
                         "(this is a bug in qcompiler)\n")
    else:
        sys.stderr.write(f"qcompile: internal error: {type(e).__name__}: {_one_line(str(e))} "
                         "(this is a bug in qcompiler; rerun with --debug for the traceback)\n")
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    start = time.perf_counter()
    args = _parser().parse_args(argv)
    if args.list_passes:
        sys.stdout.write(list_passes())
        return 0
    if args.list_targets:
        sys.stdout.write(list_targets())
        return 0
    if not args.model:
        _parser().error("a MODEL is required (or --list-passes / --list-targets)")

    if args.check:
        from qcompiler.frontends.onnx import coverage_report

        try:
            ok, text = coverage_report(args.model)
        except QCompilerError as e:
            return _report_error(e, args.debug)
        sys.stdout.write(text)
        return 0 if ok else 1

    from qcompiler.driver.api import compile_to_dir
    from qcompiler.ir import print_module
    from qcompiler.pipeline import PrintIRAfter, TimePasses

    instruments = []
    names = {n for item in args.print_ir_after for n in item.split(",") if n}
    if args.print_ir_after_all or names or args.print_ir_before_all:
        instruments.append(PrintIRAfter(
            None if args.print_ir_after_all else names if names else set(),
            before_all=args.print_ir_before_all))
    if args.time_passes:
        instruments.append(TimePasses())
    try:
        passes = args.passes
        if args.pass_option:
            from qcompiler.driver.frontend import resolve_target
            from qcompiler.pipeline import pipeline_with_options

            passes = pipeline_with_options(
                passes or resolve_target(args.target.split(":")[0]).default_pipeline,
                args.pass_option)
        tuning_log = args.tuning_log
        if args.tune:
            import os

            tuning_log = tuning_log or os.path.join(args.output, "tuning_log.jsonl")
            tune_m = _tune_m(args.tune_m)
            qcompiler.tune(args.model, args.target, output_dir=args.output,
                           tuning_log=tuning_log, trials=args.trials, m=tune_m,
                           passes=passes, workers=args.jobs)
        out_dir, module = compile_to_dir(args.model, args.target, args.output, passes,
                                         instruments, verify_each=args.verify_each,
                                         tuning_log=tuning_log, cache=not args.no_cache,
                                         jobs=args.jobs, buckets=_buckets(args.buckets),
                                         allow_host_fallback=args.allow_host_fallback,
                                         tp=args.tp)
    except QCompilerError as e:  # bad input, refused on purpose: one line, exit 1
        return _report_error(e, args.debug)
    except Exception as e:  # anything else escaping the compiler is a bug: exit 2
        return _report_internal_error(e, args.debug)
    if args.time_passes:  # the passes are part of a compile: say what the rest took
        sys.stderr.write(_stage_times(out_dir))
    if args.emit_ir:
        sys.stdout.write(print_module(module))
    if args.print_plan:
        sys.stdout.write(_plan_text(out_dir))
    n_qmm = sum(1 for n in module.main.nodes if n.op == "qmatmul")
    from qcompiler.runtime.ranks import ranks_of

    tp = ranks_of(module)
    sharded = f"sharded over {tp} ranks, " if tp > 1 else ""
    sys.stderr.write(f"qcompile: wrote {out_dir} ({sharded}target {args.target}, "
                     f"{len(module.main.nodes)} "
                     f"ops, {n_qmm} qmatmul{_build_summary(out_dir)}) in "
                     f"{time.perf_counter() - start:.2f} s\n")
    return 0


def _stage_times(out_dir: str) -> str:
    """The compile's stages (frontend, passes, backend with its kernel build) from report.json."""
    import json
    import os

    from qcompiler.driver.artifact import REPORT_FILE

    with open(os.path.join(out_dir, REPORT_FILE)) as f:
        report = json.load(f)
    seconds, build = report.get("seconds", {}), report.get("build", {})
    lines = ["===- compile timing report -==="]
    for stage, value in seconds.items():
        lines.append(f"  {value * 1e3:9.2f} ms  {stage}")
    if build.get("kernels"):
        lines.append(f"  {build['seconds'] * 1e3:9.2f} ms    of it kernel builds: "
                     f"{build['built']} built, {build['cache_hits']} cached, "
                     f"{build['jobs']} jobs")
    return "\n".join(lines) + "\n"


def _build_summary(out_dir: str) -> str:
    """``; 3 kernels built, 2 cached`` from the compile's report.json ('' when none built)."""
    import json
    import os

    from qcompiler.driver.artifact import REPORT_FILE

    with open(os.path.join(out_dir, REPORT_FILE)) as f:
        build = json.load(f).get("build", {})
    if not build.get("kernels"):
        return ""
    return (f"; {build['kernels']} distinct kernels: {build['built']} built, "
            f"{build['cache_hits']} cached, {build['seconds']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
