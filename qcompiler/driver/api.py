"""The compile driver: frontend → passes → backend → artifact, for the CLI and Python.

    qcompiler.compile("model.onnx", target="ref")         # → CompiledModule (run it)
    compile_to_dir("model.onnx", "ref", "out/")           # → the artifact directory
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from qcompiler.driver.artifact import describe_value, write_artifact
# The front half lives in driver/frontend.py (shared with the tuner); these names stay
# importable from here.
from qcompiler.driver.frontend import (CompileError, import_model,  # noqa: F401
                                       resolve_target, run_pipeline)
from qcompiler.driver.sharded import (COLLECTIVE_BACKENDS, no_blocks_reason,
                                      pipeline_with_shard, shard_stats, sharded_report_text,
                                      split_target,
                                      weight_bytes, write_sharded)
from qcompiler.errors import InputError
from qcompiler.ir import Module
from qcompiler.ir.elementwise_body import parse_body
from qcompiler.pipeline import Instrument
from qcompiler.registry import get_backend
from qcompiler.runtime.loader import load
from qcompiler.runtime.ranks import ranks_of
from qcompiler.targets import Target
from qcompiler.version import __version__


def _weight_bytes(node) -> int:
    w = node.arg("w")
    total = int(np.prod(w.type.shape)) * w.type.dtype.bits // 8
    for v in (node.arg("w_scale"), node.arg("w_zero_point")):
        if v is not None and v.type.is_static:
            total += int(np.prod(v.type.shape, dtype=np.int64)) * max(v.type.dtype.bits, 8) // 8
    return total


def _fused_nodes(module: Module) -> list[dict]:
    """The fused nodes: kind, size (statements of a body; operands of attention and rmsnorm)
    and what they compute (the body, or the op's attributes)."""
    out = []
    for n in module.main.nodes:
        if n.op == "fused_elementwise" or (n.op == "qmatmul" and "epilogue" in n.attrs):
            text = n.attrs["body"] if n.op == "fused_elementwise" else n.attrs["epilogue"]
            kind = "fused_elementwise" if n.op == "fused_elementwise" else "qmatmul+epilogue"
            out.append({"result": n.result.name, "kind": kind,
                        "size": len(parse_body(text).stmts), "what": text})
        elif n.op in ("attention", "rmsnorm"):
            what = ", ".join(f"{k}={v}" for k, v in sorted(n.attrs.items()))
            out.append({"result": n.result.name, "kind": n.op,
                        "size": sum(v is not None for v in n.operands), "what": what})
    return out


def host_fallbacks(kernels: list[dict]) -> list[dict]:
    """The nodes a backend left to the host interpreter: result, op and why."""
    return [{"result": k["result"], "op": k["op"], "reason": k.get("reason", "")}
            for k in kernels if k.get("host_fallback")]


def _report(module: Module, target: Target, spec: str, records: list[dict], source: str,
            kernels: list[dict], build: dict, seconds: dict) -> tuple[dict, str]:
    # Report the model's weight scheme (w_scheme; packing changes only the weight's element
    # type and layout) and the shape of the weight as stored.
    qmms = [{"result": n.result.name, "w": list(n.arg("w").type.shape),
             "w_layout": (n.arg("w").type.layout.name if n.arg("w").type.layout
                          else "row_major"),
             "w_scheme": str(n.attrs["w_scheme"]),
             "act": n.attrs["act"], "weight_bytes": _weight_bytes(n)}
            for n in module.main.nodes if n.op == "qmatmul"]
    ops: dict[str, int] = {}
    for n in module.main.nodes:
        ops[n.op] = ops.get(n.op, 0) + 1
    fused = _fused_nodes(module)
    fused_counts: dict[str, int] = {}
    for f in fused:
        fused_counts[f["kind"]] = fused_counts.get(f["kind"], 0) + 1
    report = {"qcompiler": __version__, "source": source, "target": target.name,
              "pipeline": spec, "passes": records, "op_counts": dict(sorted(ops.items())),
              "fused_counts": dict(sorted(fused_counts.items())), "fused": fused,
              "qmatmuls": qmms, "kernels": kernels, "build": build, "seconds": seconds}
    lines = [f"qcompiler {__version__}: {source} for target {target.name}",
             f"pipeline: {spec}", "", "passes:"]
    for r in records:
        extra = ", ".join(f"{k}={v}" for k, v in r.items()
                          if k not in ("pass", "ms", "nodes_before", "nodes_after"))
        lines.append(f"  {r['pass']:<40} {r['ms']:8.2f} ms  nodes {r['nodes_before']:>4} -> "
                     f"{r['nodes_after']:<4} {extra}")
    lines += ["", f"qmatmul kernels: {len(qmms)}"]
    for q in qmms:
        lines.append(f"  {q['result']:<24} w {q['w']} ({q['w_layout']})  {q['w_scheme']}  "
                     f"act={q['act']}  {q['weight_bytes']} bytes")
    fallbacks = host_fallbacks(kernels)
    report["host_fallback"] = fallbacks
    lines += ["", f"host fallback: {len(fallbacks)} ops" + (" (run by the reference "
                                                             "interpreter)" if fallbacks else "")]
    for f in fallbacks:
        lines.append(f"  {f['result']:<24} {f['op']:<20} {f['reason']}")
    lines += ["", "fused groups: " + (", ".join(f"{k} {v}" for k, v in sorted(
        fused_counts.items())) or "none")]
    for f in fused:
        lines.append(f"  {f['result']:<24} {f['kind']:<20} size {f['size']}  {f['what']}")
    lines += ["", f"backend build: {build['kernels']} distinct kernels, {build['built']} built, "
                  f"{build['cache_hits']} from the cache, {build['jobs']} jobs, "
                  f"{build['seconds']:.2f} s (cache: {build['cache'] or 'off'})"]
    for b in build["per_kernel"]:
        lines.append(f"  {b['library']:<24} {b['cache']:<15} {b['seconds']:8.3f} s  "
                     f"{len(b['nodes'])} nodes: {', '.join(b['nodes'])}")
    lines += ["", "time: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())]
    lines += ["", "ops: " + ", ".join(f"{k} {v}" for k, v in report["op_counts"].items())]
    return report, "\n".join(lines) + "\n"


def compile_to_dir(model, target: str = "ref", output_dir: Optional[str] = None,
                   passes: Optional[str] = None, instruments: Sequence[Instrument] = (),
                   verify_each: bool = False, tuning_log: Optional[str] = None,
                   example_inputs=None, cache=True, jobs: Optional[int] = None,
                   progress: Optional[bool] = None, buckets=None,
                   allow_host_fallback: bool = False,
                   tp: Optional[int] = None) -> tuple[str, Module]:
    """Compile ``model`` for ``target`` into ``output_dir`` (a new temp dir if None).

    ``target`` may carry options: ``"cuda-sm90:tp=2"``; ``tp`` says the same (both given:
    they must agree). With a tensor-parallel degree > 1 the pipeline runs ``shard{tp=N}``
    and the result is a sharded artifact (``qcompiler/driver/sharded.py``): one directory per
    rank, each a single-device artifact of that rank's program; the returned module is the
    global view.

    ``tuning_log``: replay the best verified configs of that log (``qcompile --tune``) by
    passing it to the target's config-choosing pass (its ``tuning_pass``).
    ``cache``: reuse and fill the build cache (``qcompiler.codegen.build.cache_dir()``;
    False: neither read nor write it; a path: that directory). ``jobs``: kernels built in
    parallel (default: the usable CPUs). ``progress``: the build counter on stderr (default:
    when stderr is a terminal). ``buckets``: the shape buckets of the executable plan
    (``qcompiler.plan.resolve_buckets``; None: its defaults). ``allow_host_fallback``: let
    ops the target cannot run (a CPU qmatmul in int8 activation mode ...) run in the host
    interpreter instead of refusing the compile with HostFallbackError."""
    from qcompiler.codegen.build import Builder

    start = time.perf_counter()
    builder = Builder(cache, jobs, progress)
    target_name, target_options = split_target(target, tp)
    tp = target_options.get("tp", 1)
    tgt = resolve_target(target_name)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    backend = get_backend(tgt.backend)
    backend.prepare(tgt)
    prepared = time.perf_counter()
    module = import_model(model, example_inputs)
    imported = time.perf_counter()
    pipeline = passes or tgt.default_pipeline
    if tp > 1:
        pipeline = pipeline_with_shard(pipeline, tp)
    if tuning_log:
        from qcompiler.tuning.tuner import pipeline_with_tuning_log, tuning_pass_of

        pipeline = pipeline_with_tuning_log(pipeline, tuning_pass_of(tgt), tuning_log)
    module, records, spec = run_pipeline(module, pipeline, instruments, verify_each)
    passes_done = time.perf_counter()
    degree = ranks_of(module)
    if tp > 1 and degree != tp:
        raise CompileError(f"tp={tp}: the shard pass split nothing in this model: "
                           f"{no_blocks_reason(records)}")
    out_dir = output_dir or tempfile.mkdtemp(prefix="qcompiler_")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file in the way, no permission ...
        raise InputError(f"{out_dir}: cannot create the output directory: "
                         f"{e.strerror or e}") from None
    options = ({"allow_host_fallback": allow_host_fallback}
               if getattr(backend, "host_fallback_option", False) else {})
    times = {"start": start, "prepared": prepared, "imported": imported,
             "passes_done": passes_done}
    if degree > 1:
        _write_sharded(module, degree, tgt, backend, out_dir, builder, options, spec, records,
                       source, buckets, times)
        return out_dir, module
    _write_single(module, tgt, backend, out_dir, builder, options, spec, records, source,
                  buckets, times)
    return out_dir, module


def _write_single(module: Module, tgt: Target, backend, out_dir: str, builder, options: dict,
                  spec: str, records: list, source: str, buckets, times: dict) -> dict:
    """The backend's compile of ``module`` and a single-device artifact in out_dir; returns
    the report."""
    start, prepared, imported, passes_done = (times[k] for k in (
        "start", "prepared", "imported", "passes_done"))
    kernels = backend.compile(module, tgt, out_dir, builder, **options)
    backend_done = time.perf_counter()
    fn = module.main
    manifest = {
        "qcompiler": __version__, "target": tgt.name, "backend": backend.name,
        "pipeline": spec,
        "inputs": [describe_value(a) for a in fn.args],
        "outputs": [{**describe_value(v), "name": name}
                    for name, v in zip(fn.output_names, fn.outputs)],
        "kernels": kernels,
        "host_fallback": host_fallbacks(kernels),
    }
    from qcompiler.plan import artifact_plan

    manifest["plan"], plan_entry, plan_lines = artifact_plan(module, buckets,
                                                             backend.concat_in_place)
    # Wall-clock seconds of each stage; "backend" includes emitting and building the kernels
    # (the build alone is report["build"]["seconds"]).
    seconds = {"toolchain": prepared - start, "frontend": imported - prepared,
               "passes": passes_done - imported,
               "backend": backend_done - passes_done,
               "total": time.perf_counter() - start}
    seconds = {k: round(v, 3) for k, v in seconds.items()}
    report, text = _report(module, tgt, spec, records, source, kernels, builder.report(),
                           seconds)
    report["plan"] = plan_entry
    text += "\n".join(plan_lines) + "\n"
    write_artifact(out_dir, module, manifest, report, text)
    return report


def _write_sharded(module: Module, tp: int, tgt: Target, backend, out_dir: str, builder,
                   options: dict, spec: str, records: list, source: str, buckets,
                   times: dict) -> None:
    """A sharded artifact: per rank r, ``rank_program(module, r)`` compiled by the backend into
    ``out_dir/rank<r>`` (a single-device artifact holding only that rank's weights), then
    the top manifest and reports (``qcompiler/driver/sharded.py``)."""
    import json

    from qcompiler.driver.artifact import REPORT_TEXT
    from qcompiler.runtime.ranks import rank_program

    ranks, reports, texts = [], [], []
    for r in range(tp):
        prog = rank_program(module, r)
        rel = f"rank{r}"
        report = _write_single(prog, tgt, backend, os.path.join(out_dir, rel), builder,
                               options, spec, records, source, buckets, times)
        with open(os.path.join(out_dir, rel, REPORT_TEXT), encoding="utf-8") as f:
            texts.append(f.read())
        reports.append(report)
        ranks.append({"rank": r, "dir": rel, "weight_bytes": weight_bytes(prog),
                      "qmatmul_weight_bytes": sum(q["weight_bytes"] for q in report["qmatmuls"]),
                      "all_reduce": sum(1 for n in prog.main.nodes if n.op == "all_reduce")})
    fn = module.main
    common = {
        "qcompiler": __version__, "target": tgt.name, "backend": backend.name,
        "pipeline": spec, "collective_backend": COLLECTIVE_BACKENDS.get(backend.name, "gloo"),
        "inputs": [describe_value(a) for a in fn.args],
        "outputs": [{**describe_value(v), "name": name}
                    for name, v in zip(fn.output_names, fn.outputs)],
    }
    collectives = [{"result": n.results[0].name, "op": n.attrs["op"]}
                   for n in fn.nodes if n.op == "all_reduce"]
    stats = shard_stats(records) or {}
    total = weight_bytes(module)
    report = {"qcompiler": __version__, "source": source, "target": tgt.name,
              "pipeline": spec, "tp": tp, "shard": stats, "weight_bytes_global": total,
              "ranks": ranks, "rank_reports": [f"{r['dir']}/report.json" for r in ranks],
              "seconds": {"total": round(time.perf_counter() - times["start"], 3)}}
    text = sharded_report_text(tp, tgt.name, source, spec, stats, ranks, total, texts)
    write_sharded(out_dir, tp=tp, common=common, ranks=ranks, collectives=collectives,
                  report=json.loads(json.dumps(report, default=str)), report_text=text)


def compile(model, target: str = "ref", output_dir: Optional[str] = None,
            passes: Optional[str] = None, verify_each: bool = False,
            tuning_log: Optional[str] = None, example_inputs=None, cache=True,
            jobs: Optional[int] = None, progress: Optional[bool] = None, buckets=None,
            allow_host_fallback: bool = False, tp: Optional[int] = None):
    """Compile and load: returns a ``CompiledModule`` whose ``run`` executes the result
    (``cache``, ``jobs``, ``progress``, ``allow_host_fallback``, ``tp``: see
    ``compile_to_dir``; a sharded artifact loads as a ``ShardedModule``).
    Without ``output_dir`` the artifact goes to a temporary directory that the returned module
    owns: it is removed when the module is garbage-collected (or at exit)."""
    out_dir, _ = compile_to_dir(model, target, output_dir, passes, verify_each=verify_each,
                                tuning_log=tuning_log, example_inputs=example_inputs,
                                cache=cache, jobs=jobs, progress=progress, buckets=buckets,
                                allow_host_fallback=allow_host_fallback, tp=tp)
    compiled = load(out_dir)
    if output_dir is None:
        # Loaded libraries stay mapped after their files are removed (Linux), and the module
        # loads nothing more once it is gone.
        import shutil
        import weakref

        weakref.finalize(compiled, shutil.rmtree, out_dir, True)
    return compiled
