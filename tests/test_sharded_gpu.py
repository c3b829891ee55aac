"""Sharded artifacts on GPUs through NCCL (issue #17); skipped without a GPU (and the
2-rank run without two). The NCCL communicator is checked with a world of one in its own
process; the act-order MLP compiled for cuda-sm90:tp=2 runs on two GPUs, one worker process
per GPU, and equals the unsharded reference within fp16 tolerance."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cuda_gpu_util import gpu_reason
from test_shard import _feeds, _module

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(gpu_reason()), reason=f"GPU tests: {gpu_reason()}")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no CUDA or no NCCL")
    return torch


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
    _cuda_torch()
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", NCCL_WORLD_OF_ONE], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_cuda_tp2_on_two_gpus_equals_the_reference(tmp_path):
    torch = _cuda_torch()
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} here")
    import qcompiler
    from qcompiler.driver.api import compile_to_dir

    base = _module(act_order=True)
    sharded, _ = compile_to_dir(base.clone(), "cuda-sm90:tp=2", str(tmp_path / "tp2"))
    ref, _ = compile_to_dir(base.clone(), "ref", str(tmp_path / "ref"))
    module = qcompiler.load(sharded)
    try:
        assert module.backend == "nccl"
        want = qcompiler.load(ref).run(_feeds(1))["y"]
        got = module.run(_feeds(1))["y"]
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)
    finally:
        module.close()


def test_too_few_gpus_for_the_degree_is_refused(tmp_path):
    torch = _cuda_torch()
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
