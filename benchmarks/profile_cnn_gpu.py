"""One run of a prepared CNN's device plan without CUDA graphs, for Nsight Compute:

    QC_CUDA_GRAPHS=0 ncu --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --kernel-name regex:qconv_igemm --launch-count 4 \\
        python3 benchmarks/profile_cnn_gpu.py gpu_cnn/resnet18.qdq.onnx 64

The file is one of ``bench_cnn_gpu.py --prepare``'s; the input is standard normal (the
kernels' speed does not depend on the values). The plan runs twice; ``--launch-skip`` passes
over the first run's launches where the first run should not count.
"""
import sys

import numpy as np


def main():
    import torch

    import qcompiler

    path, batch = sys.argv[1], int(sys.argv[2])
    target = sys.argv[3] if len(sys.argv) > 3 else "cuda-sm90"
    m = qcompiler.compile(path, target=target, buckets={"batch": [batch]})
    name = m.input_names[0]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(
        (batch, 3, 224, 224)).astype(np.float32)).cuda()
    for _ in range(2):
        m.run({name: x})
    torch.cuda.synchronize()
    print("ran", path, "batch", batch, flush=True)


if __name__ == "__main__":
    main()
