"""One launch of each given config on one shape, for Nsight Compute:

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        --kernel-name regex:qmatmul python benchmarks/profile_cuda.py N K M cfg...

cfg = gemv,m_frags,warps_n,warps_k,stages,stage_k,acc_scale,split_k[,wgmma] (tuning.KNOBS, then
the optional knobs; i4 symmetric g128 fp16 weights).
"""
import sys
import tempfile

import torch

from qcompiler.codegen.cuda import bench_support as bs, cases, tuning


def main():
    n, k, m = (int(v) for v in sys.argv[1:4])
    knobs = tuning.KNOBS + tuple(tuning.OPTIONAL_KNOBS)
    cfgs = [dict(zip(knobs, (int(x) for x in c.split(",")))) for c in sys.argv[4:]]
    case = cases.Case(k=k, n=n, bits=4, signed=True, zero_point=False, group=128)
    built = bs.build_case(case, tempfile.mkdtemp(), variants=[{**c, "m_max": 0} for c in cfgs])
    kern = bs.load_kernel(built)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    for i, c in enumerate(cfgs):
        kern.run_device(x.data_ptr(), y.data_ptr(), m, 0, i)
        torch.cuda.synchronize()
        print("ran", c, flush=True)


if __name__ == "__main__":
    main()
