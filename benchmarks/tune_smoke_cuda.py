"""Tune one CUDA kernel on the GPU (a few trials), then compile with the tuning log and check
that the tile pass took the tuned config and the result is right:

    python benchmarks/tune_smoke_cuda.py OUT_DIR
"""
import json
import os
import sys

import numpy as np


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "qc_tune_smoke"
    from qcompiler.codegen.cuda import cases
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.tuning.tuner import tune
    import qcompiler

    case = cases.Case(k=4096, n=4096, bits=4, zero_point=True, group=128)
    module = cases.make_module(case, seed=5)
    summary = tune(module, "cuda-sm90", output_dir=out, trials=6, m=[1], progress=False,
                   plots=False, timeout_s=120)
    print(json.dumps(summary["kernels"], indent=1, default=str)[:3000])
    log = os.path.join(out, "tuning_log.jsonl")
    art, final = compile_to_dir(module, "cuda-sm90", os.path.join(out, "art"), tuning_log=log)
    node = next(n for n in final.main.nodes if n.op == "qmatmul")
    v16 = node.attrs["config"]["variants"]["m16"]
    print("m16 variant:", v16)
    assert v16["source"] == "tuning-log", v16
    x = cases.random_x(case, 1, seed=int.from_bytes(os.urandom(4), "little"))
    y = qcompiler.load(art).run({"x": x})["y"]
    err = cases.rel_error(y, cases.reference(module, x))
    print(f"tuned kernel rel error {err:.2e}")
    assert err <= cases.TOLERANCE["f16"] and np.isfinite(y).all()
    print("tune smoke ok")


if __name__ == "__main__":
    main()
