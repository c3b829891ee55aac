"""Run one CNN of gpu_cnn/ (bench_cnn_gpu.py --prepare) through qcompiler's CUDA plan a few
times, for a profiler to attach to (GPU machine):

    ncu --clock-control none --kernel-name regex:qconv_igemm --launch-count 20 \
        --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/profile_cnn_gpu.py gpu_cnn resnet18 qdq 64

Prints each launch of the plan once (name, op) so that the profiler's kernel order can be
matched to the model's nodes."""
import os
import sys

import numpy as np


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d, name, fmt, batch = argv[0], argv[1], argv[2], int(argv[3])
    reps = int(argv[4]) if len(argv) > 4 else 2
    import torch

    import qcompiler

    m = qcompiler.compile(os.path.join(d, f"{name}.{fmt}.onnx"), target="cuda-sm90",
                          buckets={"batch": [batch]})
    rng = np.random.default_rng(0)
    shape = [batch, 3, 224, 224]  # the models of bench_cnn_gpu.py
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).cuda()
    for _ in range(reps):
        m.run({m.input_names[0]: x})
    torch.cuda.synchronize()
    print(f"{name} {fmt} b{batch}: {reps} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
