"""One launch of each given config on one shape, for Nsight Compute:

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        --kernel-name regex:qmatmul python benchmarks/profile_cuda.py [--fp8] N K M cfg...

cfg = gemv,m_frags,warps_n,warps_k,stages,stage_k,acc_scale,split_k[,wgmma] (tuning.KNOBS, then
the optional knobs), or ``heuristic``: the config the tile pass gives that M. Weights: i4
symmetric g128 fp16 (W4A16), or with ``--fp8`` FP8 e4m3 per channel with FP8 activations
(W8A8-FP8; ``heuristic`` is then the sm_90a wgmma kernel's, its x quantization a separate
launch).
"""
import sys
import tempfile

import torch

from qcompiler.codegen.cuda import bench_support as bs, cases, tuning
from qcompiler.targets import get_target
from qcompiler.tuning.key import kernel_key


def main():
    args = sys.argv[1:]
    fp8 = args[:1] == ["--fp8"]
    if fp8:
        args = args[1:]
    n, k, m = (int(v) for v in args[:3])
    case = (cases.Case(k=k, n=n, fp8=True, group=0) if fp8 else
            cases.Case(k=k, n=n, bits=4, signed=True, zero_point=False, group=128))
    knobs = tuning.KNOBS + tuple(tuning.OPTIONAL_KNOBS)
    _, _, node = bs.pack_case(case)
    target, key = get_target("cuda-sm90"), kernel_key(node, m)
    heuristic = (tuning.act8_wgmma_default(target, key, "fp8") if fp8
                 else tuning.default_config(target, key))
    cfgs = [heuristic if c == "heuristic" else dict(zip(knobs, (int(x) for x in c.split(","))))
            for c in args[3:]]
    if fp8:
        cfgs = [{**c, "fp8": 1} for c in cfgs]
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
