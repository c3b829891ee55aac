"""A few small CUDA kernels run once each, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py

Covers both kernels (tiled and GEMV), split-K (the last-CTA reduction), act-order (x prepared
by the permute kernel), K not a multiple of 8 (padding), N not a multiple of 64, every unpack
strategy, and M tails. Then two decode steps of a small Llama-architecture model through the
device plan (every op kernel of a decode step: gathers, rotary, kv_concat, grouped-query
decode attention with 8 query heads per kv head, RMSNorm, fused epilogues; concurrent
launches on side streams), launched without a graph so that every kernel is checked, each
step compared with the reference.
"""
import os
import sys
import tempfile

import numpy as np

# qcompiler is imported from its installed package (run_on_gpu.sh installs it).
from qcompiler.codegen.cuda import bench_support as bs, cases

KNOBS = ("gemv", "m_frags", "warps_n", "warps_k", "stages", "stage_k", "acc_scale", "split_k")
CASES = [
    (cases.Case(k=1024, n=200, bits=4, zero_point=True, group=128, act_order=True, bias=True),
     dict(zip(KNOBS, (0, 1, 1, 4, 4, 128, 1, 4)))),
    (cases.Case(k=196, n=70, bits=8, signed=True, zero_point=False, group=0, dtype="bf16"),
     dict(zip(KNOBS, (0, 2, 2, 2, 3, 64, 0, 2)))),
    (cases.Case(k=512, n=128, bits=4, signed=True, zero_point=False, group=32, dtype="bf16"),
     dict(zip(KNOBS, (0, 4, 2, 2, 3, 128, 0, 1)))),
    (cases.Case(k=512, n=64, bits=8, zero_point=True, group=64, dtype="f16"),
     dict(zip(KNOBS, (0, 4, 1, 1, 2, 64, 0, 3)))),
    # The GEMV kernel: split-K, warps splitting K, act-order, N and K tails, zero points.
    (cases.Case(k=1000, n=200, bits=4, zero_point=True, group=0, act_order=False, bias=True),
     dict(zip(KNOBS, (1, 1, 1, 4, 8, 64, 0, 3)))),
    (cases.Case(k=1024, n=320, bits=4, zero_point=True, group=64, act_order=True),
     dict(zip(KNOBS, (1, 2, 1, 2, 4, 64, 0, 2)))),
    (cases.Case(k=196, n=70, bits=8, signed=True, zero_point=False, group=0, dtype="bf16"),
     dict(zip(KNOBS, (1, 1, 1, 8, 4, 64, 0, 1)))),
]


def main():
    work = tempfile.mkdtemp(prefix="qc_sanitize_")
    for i, (case, cfg) in enumerate(CASES):
        built = bs.build_case(case, os.path.join(work, str(i)), variants=[cfg])
        kern = bs.load_kernel(built)
        for m in (1, 11, 37):
            x = cases.random_x(case, m, seed=i + m)
            y = kern.run_numpy(x, variant=0, poison=True)
            err = cases.rel_error(y, cases.reference(built.module, x))
            print(f"{case.name} {cfg} M={m}: rel error {err:.2e}", flush=True)
            assert err <= cases.TOLERANCE[case.dtype]
        kern.close()
    print("sanitize cases ok")
    decode_plan(work)


def decode_plan(work: str) -> None:
    """Two decode steps of a 2-layer Llama (head dim 64, 8 query heads per kv head)."""
    os.environ["QC_CUDA_GRAPHS"] = "0"  # launch each kernel: the sanitizer sees each one
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "examples"))
    import decoder_models as dm
    import qcompiler
    from qcompiler.driver.frontend import import_model
    from qcompiler.pipeline import PassManager
    from qcompiler.runtime.reference import run as ref_run
    from qcompiler.targets import get_target

    cfg = dict(vocab=256, hidden=512, heads=8, kv_heads=1, intermediate=256)
    model = dm.llama(layers=2, **cfg)
    past = 40
    feeds = dm.llama_inputs(cfg, 2, 1, 1, past)
    path = dm.export_onnx(model, feeds, os.path.join(work, "llama.onnx"), dynamo=False)
    passes = ("canonicalize,quantize-weights{bits=4,group=128}," +
              get_target("cuda-sm90").default_pipeline)
    m = qcompiler.compile(path, target="cuda-sm90", passes=passes,
                          output_dir=os.path.join(work, "llama_out"))
    # the reference: the same passes up to the packing (the numpy interpreter runs them)
    ref = PassManager.parse(passes[:passes.index(",reorder-weights")]).run(import_model(path))
    for step in range(2):
        out, want = m.run(feeds), ref_run(ref, feeds)
        for name, w in want.items():
            err = float(np.abs(np.asarray(out[name], np.float64) - w).max())
            scale = max(float(np.abs(w).max()), 1.0)
            print(f"decode step {step} {name}: max err {err:.3g} (scale {scale:.3g})", flush=True)
            assert err <= 3e-2 * scale, name
        names = list(want)
        feeds = {"input_ids": np.array([[7 + step]], np.int64),
                 "position_ids": np.array([[past + step + 1]], np.int64),
                 "past_k": np.asarray(out[names[1]], np.float32),
                 "past_v": np.asarray(out[names[2]], np.float32)}
    print("sanitize decode plan ok")


if __name__ == "__main__":
    main()
