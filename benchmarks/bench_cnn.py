"""Quantized CNNs on the CPU (issue #15): ResNet-18 and MobileNetV2, ours vs onnxruntime.

torchvision is not installed (it is not a dependency), so both architectures are written
here in torch (torchvision's layer for layer: ResNet-18 BasicBlocks [2, 2, 2, 2], MobileNetV2
inverted residuals with ReLU6), random weights, BatchNorm statistics from a few random
batches, exported to ONNX at 224x224 and quantized with onnxruntime ``quantize_static``
(per-channel, QDQ and QOperator). On AVX2-only hosts reduce_range is set so that onnxruntime
itself is exact (7-bit weights: its vpmaddubsw pairs cannot saturate).

Each row times one file at batch 1 and 8 on one thread (``QC_CPU_THREADS=1``,
``intra_op_num_threads=1``): onnxruntime's median and ours, the ratio (ort / ours; goal
>= 1.2; ``ratio_min`` of the fastest calls too) and the largest difference in output codes /
values. The two are called alternately, one call each in turn, so that a shared host's load
falls on both alike. JSON to benchmarks/results/ with the host's CPU and ISA.

    python benchmarks/bench_cnn.py [--models resnet18,mobilenetv2] [--formats qdq,qoperator]
                                   [--batches 1,8] [--min-seconds 2] [--note TEXT]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
GOAL = 1.2


# --------------------------------------------------------------------------------------------
# the architectures (torchvision's, written out)
# --------------------------------------------------------------------------------------------


def resnet18():
    import torch.nn as nn

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def mobilenetv2():
    import torch.nn as nn

    def cbr(cin, cout, k, stride, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU6()]

    class Inverted(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [] if expand == 1 else cbr(cin, hidden, 1, 1)
            layers += cbr(hidden, hidden, 3, stride, groups=hidden)
            layers += [nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    layers = cbr(3, 32, 3, 2)
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(Inverted(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += cbr(cin, 1280, 1, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    return nn.Sequential(*layers)


ARCHS = {"resnet18": resnet18, "mobilenetv2": mobilenetv2}


# --------------------------------------------------------------------------------------------
# export and quantization (cached in the work directory)
# --------------------------------------------------------------------------------------------


def fp32_model(name: str, work: str) -> str:
    import torch

    path = os.path.join(work, f"{name}.onnx")
    if os.path.exists(path):
        return path
    torch.manual_seed(0)
    net = ARCHS[name]()
    net.train()
    with torch.no_grad():  # BatchNorm statistics of random images, so activations stay sane
        for _ in range(4):
            net(torch.randn(4, 3, 224, 224))
    net.eval()
    torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), path, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def avx2_only() -> bool:
    from qcompiler.codegen.cpu.host import read_cpuinfo

    return "avx512_vnni" not in read_cpuinfo()[1]


def quantized_model(name: str, fmt: str, work: str) -> str:
    path = os.path.join(work, f"{name}.{fmt}.onnx")
    if not os.path.exists(path):
        quantize_file(fp32_model(name, work), path, fmt, reduce_range=avx2_only())
    return path


def quantize_file(fp32_path: str, out_path: str, fmt: str, reduce_range: bool) -> None:
    """quantize_static, per channel, u8 activations and i8 weights (QDQ or QOperator), on 4
    random calibration images."""
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
                                 for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(fp32_path, out_path, Reader(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, reduce_range=reduce_range)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def time_alternately(fns: list, min_seconds: float, *, min_runs: int = 3,
                     max_runs: int = 400, warmup: int = 2) -> list:
    """Call each of ``fns`` in turn (one call each per round) for at least ``min_seconds``
    per function and ``min_runs`` rounds (at most ``max_runs``); per function the median,
    min and max of one call in ms (timing.time_call's fields)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_runs or (
            time.perf_counter() - start < min_seconds * len(fns) and len(times[0]) < max_runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    out = []
    for ts in times:
        ts.sort()
        out.append({"median_ms": round(1e3 * ts[len(ts) // 2], 4),
                    "min_ms": round(1e3 * ts[0], 4), "max_ms": round(1e3 * ts[-1], 4),
                    "runs": len(ts)})
    return out


def host_info() -> dict:
    from qcompiler.codegen.cpu.host import host_cpu, read_cpuinfo

    vendor, flags = read_cpuinfo()
    name = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"cpu": name, "vendor": vendor, "machine": platform.machine(),
            "mcpu": host_cpu()["mcpu"],
            "isa": [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                "amx_int8") if f in flags]}


def measure(name: str, fmt: str, batches: list, work: str, min_seconds: float) -> list:
    import numpy as np
    import onnxruntime as ort

    import qcompiler

    path = quantized_model(name, fmt, work)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    rows = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = qcompiler.compile(path, target="cpu", allow_host_fallback=True)
    compile_s = round(time.perf_counter() - t0, 2)
    fallbacks = [str(w.message) for w in caught if "host fallback" in str(w.message)]
    rng = np.random.default_rng(2)
    for batch in batches:
        feeds = {"x": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
        want = sess.run(None, feeds)[0]
        got = compiled.run(feeds)["y"]
        rec = {"model": name, "format": fmt, "batch": batch, "threads": 1,
               "compile_s": compile_s, "host_fallbacks": fallbacks,
               "max_abs_diff": float(np.max(np.abs(got - want))),
               "output_scale": float(np.max(np.abs(want))), "timing": "alternating calls"}
        rec["ort"], rec["qcompiler"] = time_alternately(
            [lambda: sess.run(None, feeds), lambda: compiled.run(feeds)], min_seconds)
        rec["ratio"] = round(rec["ort"]["median_ms"] / rec["qcompiler"]["median_ms"], 3)
        rec["ratio_min"] = round(rec["ort"]["min_ms"] / rec["qcompiler"]["min_ms"], 3)
        rec["goal"] = GOAL
        print(json.dumps({k: rec[k] for k in ("model", "format", "batch", "ratio",
                                              "ratio_min", "max_abs_diff")}
                         | {"ort_ms": rec["ort"]["median_ms"],
                            "ours_ms": rec["qcompiler"]["median_ms"]}), flush=True)
        rows.append(rec)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenetv2")
    p.add_argument("--formats", default="qdq,qoperator")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "qc_bench_cnn"))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--note", default="", help="recorded in the JSON (e.g. whether the other "
                   "core was busy)")
    a = p.parse_args(argv)
    os.environ["QC_CPU_THREADS"] = "1"
    sys.path.insert(0, HERE)
    os.makedirs(a.work, exist_ok=True)
    rows = []
    for name in a.models.split(","):
        for fmt in a.formats.split(","):
            try:
                rows += measure(name, fmt, [int(b) for b in a.batches.split(",")], a.work,
                                a.min_seconds)
            except Exception as e:  # recorded, not hidden: the row says why it has no figure
                rows.append({"model": name, "format": fmt,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                print(json.dumps(rows[-1]), flush=True)
    import onnxruntime
    import torch

    import qcompiler
    stamp = datetime.datetime.now()
    host = host_info()
    result = {"benchmark": "bench_cnn", "host": host, "note": a.note,
              "versions": {"qcompiler": qcompiler.__version__, "onnxruntime":
                           onnxruntime.__version__, "torch": torch.__version__},
              "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"cnn-cpu-{stamp:%Y%m%d-%H%M}-{host['mcpu']}-t1.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
