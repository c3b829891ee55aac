"""Writing your own pass with the Python API, and using it in a pipeline string.

    .venv/bin/python examples/custom_pass.py [--target ref]

The pass below rewrites every exact (erf) GELU into the tanh approximation, a common
speed-for-accuracy trade on targets without a fast erf. It is a ``RewritePattern`` (match one
op, guard, replace) run by ``apply_patterns``, wrapped in a ``Pass`` registered by name, so
the same name works in ``qcompiler.compile(..., passes=...)``, ``PassManager.parse`` and
``qcompile --passes`` (when the module defining it is imported). The example then compiles
the shipped 4-bit MLP with and without it and shows the IR and the output difference.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

import qcompiler
from qcompiler.driver.api import import_model
from qcompiler.ir import print_module
from qcompiler.ir.rewrite import RewritePattern, apply_patterns
from qcompiler.pipeline import Pass, PassManager, record_stat, register_pass

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "mlp_int4.onnx")


class ExactGeluToTanh(RewritePattern):
    """gelu(x) → gelu(x){approximate = "tanh"}."""

    op = "gelu"

    def __init__(self, min_rank: int = 0):
        self.min_rank = min_rank

    def rewrite(self, node, rw):
        if node.attrs.get("approximate", "none") == "tanh":
            return False  # already approximate: no match, or the driver would loop
        if node.result.type.rank < self.min_rank:
            return False
        new = rw.create("gelu", [node.operands[0]], {"approximate": "tanh"}, before=node,
                        hint="gelu_tanh")
        rw.replace(node, [new.result])
        return True


@register_pass("example-gelu-tanh")
@dataclass
class GeluTanhPass(Pass):
    """Replace exact GELU by its tanh approximation (an example pass)."""

    # Options are dataclass fields, set as `example-gelu-tanh{min_rank=3}` in a pipeline.
    min_rank: int = 0  # leave GELUs of lower rank alone

    def run(self, module):
        n = apply_patterns(module, [ExactGeluToTanh(self.min_rank)])
        record_stat(module, self.name, rewritten=n)  # shows up in report.json / report.txt
        return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="ref")
    args = ap.parse_args(argv)
    from qcompiler.targets import get_target

    default = get_target(args.target).default_pipeline

    # 1. Run passes directly: the pass manager takes the same pipeline strings.
    module = import_model(MODEL)
    pm = PassManager.parse("canonicalize,example-gelu-tanh{min_rank=2},fuse-dequant")
    out = pm.run(module)
    print(f"pipeline: {pm.spec()}")
    print("gelu nodes after it:")
    for line in print_module(out).splitlines():
        if "gelu(" in line:
            print("  " + line.strip())

    # 2. Or put the pass in front of the target's pipeline in qcompiler.compile.
    exact = qcompiler.compile(MODEL, target=args.target)
    approx = qcompiler.compile(MODEL, target=args.target,
                               passes=f"example-gelu-tanh,{default}")
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    y_exact, y_approx = exact.run({"x": x})["y"], approx.run({"x": x})["y"]
    diff = float(np.abs(y_exact - y_approx).max())
    print(f"max |exact - tanh-approximate GELU| on the 8x64 batch: {diff:.3g} "
          f"(outputs up to {np.abs(y_exact).max():.3g})")
    with open(os.path.join(approx.directory, "report.txt")) as f:
        print("".join(line for line in f if "example-gelu-tanh" in line).rstrip())
    # The approximation changes the result a little, never a lot.
    return 0 if 0 < diff < 1e-2 * max(1.0, float(np.abs(y_exact).max())) else 1


if __name__ == "__main__":
    sys.exit(main())
