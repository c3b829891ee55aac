"""Per-step profile of the CNN benchmark's models (issue #15): where the time goes, one thread.

Compiles bench_cnn.py's quantized files (cached in its work directory) for the host and times
every kernel step of the plan (``QC_PROFILE=1`` gives the total per op kind; this gives each
step, named by its output, with its shape and, for qconv, the layer's geometry and variant).
Optionally onnxruntime's own per-node profile of the same file (``--ort``).

    python benchmarks/profile_cnn.py [--models resnet18,mobilenetv2] [--formats qdq]
                                     [--batch 1] [--runs 30] [--top 25] [--ort]
                                     [--ort-layers]
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _patch_executor(records: dict):
    """Wrap every kernel call of a prepared plan with a timer keyed by its step."""
    from qcompiler.plan import executor as ex

    orig = ex.PlanExecutor._prepare

    def _prepare(self, arrays):
        prepared = orig(self, arrays)
        steps = [s for s in self.plan.steps if s.kind not in ("view", "host")]
        assert len(steps) == len(prepared.calls)
        clock = time.perf_counter
        wrapped = []
        for step, call in zip(steps, prepared.calls):
            node = self._nodes.get(step.outputs[0]) if step.outputs else None
            key = (len(wrapped), step.op, step.outputs[0] if step.outputs else "?")
            records[key] = [[], node]

            def timed(call=call, rec=records[key][0]):
                t0 = clock()
                call()
                rec.append(clock() - t0)
            wrapped.append(timed)
        prepared.calls[:] = wrapped
        return prepared
    ex.PlanExecutor._prepare = _prepare


@functools.lru_cache(maxsize=None)
def _host_conv_isa() -> tuple:
    """(vnni, avx2) as primfunc_for_qconv decides them for the host target."""
    from qcompiler.codegen.cpu.host import target_cpu
    from qcompiler.codegen.cpu.ops.schedule import params_for
    from qcompiler.targets import get_target

    params = params_for(get_target("cpu"))
    return (target_cpu(get_target("cpu"))["vnni"] and params.lanes == 16,
            params.arch == "x86_64")


def describe(node, module=None) -> str:
    """The step's output shape and, for qconv, the layer's geometry and kernel variant (as
    ``primfunc_for_qconv`` picks it for the host: ``module`` holds the constants it reads)."""
    if node is None:
        return ""
    shape = "x".join(str(d) for d in node.results[0].type.shape)
    extra = " nhwc" if node.attrs.get("channels_last") else ""
    if node.op == "qconv":
        from qcompiler.codegen.cpu.conv import conv_variant
        cfg = node.attrs.get("config") or {}
        w = cfg.get("w_shape") or list(node.arg("w").type.shape)
        x = _nchw(node, node.arg("x").type.shape)
        vnni, avx2 = _host_conv_isa()
        variant = conv_variant(node, vnni, module, avx2=avx2)
        extra += (f" {x[1]}->{w[0]} k{w[2]}x{w[3]} s{node.attrs['strides'][0]}"
                  f" g{node.attrs['group']} in{x[2]}x{x[3]} {variant}"
                 f" out={node.attrs.get('out', 'quant')}"
                 f"{' +res' if node.arg('residual') is not None else ''}")
    elif node.op in ("fused_elementwise",):
        extra = " " + node.attrs.get("body", "")[:70]
    return shape + extra


def _nchw(node, shape) -> tuple:
    """A qconv / pool operand's or result's shape as NCHW (channels_last: NHWC)."""
    shape = tuple(shape)
    if node.attrs.get("channels_last") and len(shape) == 4:
        return (shape[0], shape[3], shape[1], shape[2])
    return shape


def ort_profile(path: str, feeds: dict, runs: int) -> list:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "qc_ort_prof")
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feeds)
    for _ in range(runs):
        sess.run(None, feeds)
    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.remove(prof)
    per_op = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3
    total_runs = runs + 3
    return sorted(((k, v / total_runs) for k, v in per_op.items()), key=lambda kv: -kv[1])


def ort_conv_layers(path: str, feeds: dict, runs: int) -> list:
    """onnxruntime's QLinearConv nodes in execution order: (name stem, output shape (NHWC,
    as its layout transformer runs them), median ms). Matched with our qconv steps by the
    stem of the ONNX name, else by output shape (its order differs from ours where two convs
    are independent, as a downsampling block's shortcut)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "qc_ort_layers")
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(3 + runs):
        sess.run(None, feeds)
    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.remove(prof)
    times = collections.defaultdict(list)
    order = []
    for e in events:
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and e["args"]["op_name"] == "QLinearConv"):
            name = e["name"][:-len("_kernel_time")]
            if name not in times:
                out = list(e["args"]["output_type_shape"][0].values())[0]
                order.append((name, tuple(out)))
            times[name].append(e["dur"] / 1e3)
    return [(_name_stem(n), out, sorted(times[n])[len(times[n]) // 2]) for n, out in order]


def _name_stem(name: str) -> str:
    """'/6/down/down.0/Conv_quant' or '..._Conv_token_19' (onnxruntime's node) and '6_down_down.0_Conv_output_0_
    quantized_75' (our result, named after the ONNX output) -> '6_down_down.0_Conv'."""
    stem = name.replace("/", "_").lstrip("_")
    for cut in ("_output_", "_quant", "_token_"):
        if cut in stem:
            stem = stem[:stem.index(cut)]
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenetv2")
    p.add_argument("--formats", default="qdq")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--ort", action="store_true")
    p.add_argument("--ort-layers", action="store_true",
                   help="every conv layer beside onnxruntime's (its QLinearConv nodes in order)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qc_bench_cnn"))
    a = p.parse_args(argv)
    os.environ["QC_CPU_THREADS"] = "1"
    # each kernel call timed from Python: the executor must not batch runs of them into one
    # native call (codegen/cpu/native_calls.py)
    os.environ["QC_NATIVE_CALLS"] = "0"
    sys.path.insert(0, HERE)
    import numpy as np

    import qcompiler
    from bench_cnn import quantized_model

    os.makedirs(a.work, exist_ok=True)
    for name in a.models.split(","):
        for fmt in a.formats.split(","):
            path = quantized_model(name, fmt, a.work)
            records: dict = {}
            _patch_executor(records)
            compiled = qcompiler.compile(path, target="cpu", allow_host_fallback=True)
            feeds = {"x": np.random.default_rng(2).standard_normal(
                (a.batch, 3, 224, 224)).astype(np.float32)}
            compiled.run(feeds)
            for rec in records.values():
                rec[0].clear()
            t0 = time.perf_counter()
            for _ in range(a.runs):
                compiled.run(feeds)
            wall = (time.perf_counter() - t0) / a.runs * 1e3
            # per step the median over the runs (the host is shared: a mean takes every
            # other process's time slices)
            med = {k: 1e3 * sorted(r[0])[len(r[0]) // 2] for k, r in records.items()}
            steps = sorted(records.items(), key=lambda kv: -med[kv[0]])
            total = sum(med.values())
            print(f"== {name} {fmt} batch {a.batch}: {wall:.2f} ms per run (mean), "
                  f"{total:.2f} ms in {len(records)} steps (sum of per-step medians)")
            kinds = collections.defaultdict(lambda: [0.0, 0])
            for key in records:
                kinds[key[1]][0] += med[key]
                kinds[key[1]][1] += 1
            for op, (ms, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
                print(f"  {op:<20} {ms:8.3f} ms  {n:4d} steps  {100 * ms / total:5.1f} %")
            print("  -- top steps (median ms)")
            for (i, op, out), (times, node) in steps[:a.top]:
                print(f"  {i:4d} {op:<18} {med[(i, op, out)]:7.3f} ms  %{out}  "
                      f"{describe(node, compiled.module)}")
            if a.ort_layers:
                ours = [(key, med[key], rec[1]) for key, rec in sorted(records.items())
                        if key[1] == "qconv"]
                theirs = ort_conv_layers(path, feeds, a.runs)
                print("  -- conv layers in order: ours, onnxruntime (median ms), ort / ours")
                for key, ms, node in ours:
                    stem = _name_stem(node.result.name) if node is not None else ""
                    c, h, w = (_nchw(node, node.result.type.shape)[1:] if node is not None
                               else (0,) * 3)
                    # By name where ours keeps the ONNX output's (QOperator files), else by
                    # output shape: '?' where several layers share it (a downsampling
                    # block's 3x3 and 1x1 convs: onnxruntime may run them in either order).
                    same_shape = [t for t in theirs if t[1][1:] == (h, w, c)]
                    match = next((t for t in theirs if t[0] == stem), None)
                    guess = match is None and len(same_shape) > 1
                    match = match or (same_shape[0] if same_shape else None)
                    if match is None:
                        print(f"  {key[0]:4d} {ms:7.3f}     -         {describe(node, compiled.module)}")
                        continue
                    theirs.remove(match)
                    print(f"  {key[0]:4d} {ms:7.3f} {match[2]:7.3f} {match[2] / ms:5.2f}"
                          f"{'?' if guess else ' '} {describe(node, compiled.module)}")
            if a.ort:
                print("  -- onnxruntime per op type (ms per run)")
                rows = ort_profile(path, feeds, a.runs)
                print(f"  total {sum(v for _, v in rows):.2f} ms")
                for k, v in rows:
                    print(f"  {k:<24} {v:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
