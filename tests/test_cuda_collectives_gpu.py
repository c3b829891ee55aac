"""Collectives in the CUDA device plan on GPUs (issue #17); skipped without a GPU (and the
2-rank run without two). A rank program of the act-order SwiGLU block compiled for
cuda-sm90:tp=2 runs through the device plan (CudaPlanRunner: segments, the NCCL all_reduce in
place on the plan's stream) in a process group of one NCCL rank, and equals the reference of
the same rank program and the host-ops path; the tp=2 sharded artifact on two GPUs equals the
unsharded compile. The checks without a GPU are in tests/test_cuda_collectives.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cuda_gpu_util import gpu_reason, nccl_torch
from test_shard import _feeds, _module

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(bool(gpu_reason()), reason=f"GPU tests: {gpu_reason()}")]

HERE = os.path.dirname(os.path.abspath(__file__))


# argv: the rank-0 artifact of a cuda-sm90:tp=2 compile of test_shard._module(act_order=True)
WORLD_OF_ONE = r"""
import datetime, socket, sys
import numpy as np
import torch, torch.distributed as dist
import qcompiler
from qcompiler.codegen.cuda.plan import CudaPlanRunner
from qcompiler.codegen.cuda.runtime import CudaModuleRunner
from qcompiler.pipeline import PassManager
from qcompiler.runtime import collectives, reference
from qcompiler.runtime.collectives import CollectiveError
from qcompiler.runtime.ranks import rank_program
from test_shard import _feeds, _module

rank_dir = sys.argv[1]
x = _feeds(1)["x"]
compiled = qcompiler.load(rank_dir)
runner = compiled._run
assert isinstance(runner, CudaPlanRunner), type(runner)  # the device plan, not host-ops

# loaded alone: refused, naming the node, before anything runs
try:
    compiled.run({"x": x})
    raise SystemExit("a rank program ran without a communicator")
except CollectiveError as e:
    assert "%d.sum = all_reduce" in str(e), e

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
comm = collectives.TorchCommunicator(torch.device("cuda", 0))
# The rank program's sum spans 2 ranks; in this group of one, NCCL's sum is the identity, so
# every path computes rank 0's partial plus the residual, through the same communicator.
comm.world_size = 2
collectives.install(comm)

# the reference: rank 0's program of the f32 module, its all_reduce through NCCL (host op)
want = reference.run(rank_program(PassManager.parse("shard{tp=2}").run(_module(True)), 0),
                     {"x": x})["y"]
# the CUDA host-ops path of the same artifact (same kernels, other ops on the host)
host = CudaModuleRunner(compiled.module, compiled.manifest, rank_dir)({"x": x})["y"]
calls = comm.calls
for graphs in (True, False):  # one graph per segment, and plain table launches
    runner.use_graphs = graphs
    runner._signatures.clear()
    for _ in range(2):  # the first run prepares (captures), the second replays
        got = compiled.run({"x": x})["y"]
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, host, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
assert comm.calls == calls + 4, (comm.calls, calls)  # one collective a run, on the device
sig = next(iter(runner._signatures.values()))
assert [item[0] for item in sig.program] == ["launch", "collective", "launch"]

# torch CUDA inputs: results stay on the device; a batch of 1 is another signature
xt = torch.from_numpy(x).cuda()
yt = compiled.run({"x": xt})["y"]
assert yt.is_cuda
np.testing.assert_allclose(yt.cpu().numpy(), want, rtol=2e-2, atol=2e-2)
x1 = _feeds(2, batch=1)["x"]
want1 = reference.run(rank_program(PassManager.parse("shard{tp=2}").run(_module(True)), 0),
                      {"x": x1})["y"]
np.testing.assert_allclose(compiled.run({"x": x1})["y"], want1, rtol=2e-2, atol=2e-2)
dist.destroy_process_group()
print("ok")
"""


def test_rank_program_through_the_device_plan_with_nccl_world_of_one(tmp_path):
    nccl_torch()
    from qcompiler.driver.api import compile_to_dir

    compile_to_dir(_module(act_order=True), "cuda-sm90:tp=2", str(tmp_path / "tp2"))
    with open(tmp_path / "tp2" / "rank0" / "manifest.json") as f:
        (plan,) = [k for k in json.load(f)["kernels"] if k["op"] == "plan"]
    assert plan["impl"] == "cuda-plan", plan.get("reason")
    # the installed qcompiler (the repository's root holds qcompiler/ without its mapped
    # subpackages: codegen, passes, targets), then this directory's helpers
    path = [p for p in (os.environ.get("PYTHONPATH"), HERE) if p]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=os.pathsep.join(path))
    p = subprocess.run([sys.executable, "-c", WORLD_OF_ONE, str(tmp_path / "tp2" / "rank0")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), \
        (p.stdout[-2000:] + p.stderr[-4000:])


def test_cuda_tp2_device_plan_on_two_gpus_equals_the_unsharded_compile(tmp_path):
    torch = nccl_torch()
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} here")
    import qcompiler
    from qcompiler.driver.api import compile_to_dir

    base = _module(act_order=True)
    sharded, _ = compile_to_dir(base.clone(), "cuda-sm90:tp=2", str(tmp_path / "tp2"))
    single, _ = compile_to_dir(base.clone(), "cuda-sm90", str(tmp_path / "tp1"))
    ref, _ = compile_to_dir(base.clone(), "ref", str(tmp_path / "ref"))
    for r in range(2):  # every rank runs the device plan with its collective
        with open(os.path.join(sharded, f"rank{r}", "manifest.json")) as f:
            (plan,) = [k for k in json.load(f)["kernels"] if k["op"] == "plan"]
        assert plan["impl"] == "cuda-plan" and plan["segments"] == 2, plan
    module = qcompiler.load(sharded)
    try:
        assert module.backend == "nccl"
        for seed, batch in ((1, 5), (2, 1), (3, 16)):
            feeds = _feeds(seed, batch)
            want = qcompiler.load(single).run(feeds)["y"]
            got = module.run(feeds)["y"]
            np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
            np.testing.assert_allclose(got, qcompiler.load(ref).run(feeds)["y"], rtol=2e-2,
                                       atol=2e-2)
    finally:
        module.close()
