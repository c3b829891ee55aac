"""Sharded artifacts on GPUs through NCCL (issue #17); skipped without a GPU (and the
2-rank run without two). The NCCL communicator is checked with a world of one in its own
process; a tp=2 artifact asked to run on fewer GPUs than ranks is refused. The 2-GPU run is
in test_cuda_collectives_gpu.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cuda_gpu_util import gpu_reason, nccl_torch
from test_shard import _feeds, _module

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(gpu_reason()), reason=f"GPU tests: {gpu_reason()}")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NCCL_WORLD_OF_ONE = r"""
import datetime, os, socket
import numpy as np
import torch, torch.distributed as dist
from qcompiler.ir import parse_module
from qcompiler.runtime import collectives, reference
assert os.environ["NCCL_NVLS_ENABLE"] == "0"
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
comm = collectives.TorchCommunicator(torch.device("cuda", 0))
collectives.install(comm)
m = parse_module('''module @m {
  func @main(%x: tensor<[4, 8], f16>) -> ("y": tensor<[4, 8], f16>) {
    %y = all_reduce(%x) {op = "sum", world = 1} : tensor<[4, 8], f16>
    return %y
  }
}''')
x = np.arange(32, dtype=np.float16).reshape(4, 8)
node = m.main.nodes[0]
y = collectives.all_reduce(node, x, 1)  # through NCCL on the device
assert comm.calls == 1 and y.dtype == np.float16 and np.array_equal(y, x), y
assert np.array_equal(reference.run(m, {"x": x})["y"], x)
dist.destroy_process_group()
print("ok")
"""


def test_nccl_communicator_with_a_world_of_one():
    nccl_torch()
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", NCCL_WORLD_OF_ONE], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


# The tp=2 run on two GPUs against the reference and the unsharded compile:
# test_cuda_collectives_gpu.test_cuda_tp2_device_plan_on_two_gpus_equals_the_unsharded_compile


def test_too_few_gpus_for_the_degree_is_refused(tmp_path):
    torch = nccl_torch()
    import qcompiler
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.errors import DeviceUnavailableError

    n = torch.cuda.device_count()
    if n >= 4:
        pytest.skip("4 or more GPUs here: a tp=2 artifact fits")
    # 96 rows of groups of 16 shard over 2 ranks; ask for more GPUs than exist with
    # QC_TP_DEVICES pointing at one GPU
    sharded, _ = compile_to_dir(_module(act_order=True), "cuda-sm90:tp=2", str(tmp_path / "a"))
    module = qcompiler.load(sharded)
    old = os.environ.get("QC_TP_DEVICES")
    os.environ["QC_TP_DEVICES"] = "0"
    try:
        with pytest.raises(DeviceUnavailableError, match="needs 2 GPUs, one per rank; 1"):
            module.run(_feeds(1))
    finally:
        if old is None:
            os.environ.pop("QC_TP_DEVICES")
        else:
            os.environ["QC_TP_DEVICES"] = old
