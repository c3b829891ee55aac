"""A few small CUDA kernels run once each, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py

Covers both kernels (tiled and GEMV), split-K (the last-CTA reduction), act-order (x prepared
by the permute kernel), K not a multiple of 8 (padding), N not a multiple of 64, every unpack
strategy, and M tails.
"""
import os
import tempfile

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


if __name__ == "__main__":
    main()
