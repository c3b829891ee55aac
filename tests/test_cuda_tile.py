"""The end of the CUDA qmatmul kernels, checked on the host: ``qc::write_tile``
(codegen/cuda/include/qcompiler/splitk.cuh) is ``__host__ __device__``, so nvcc builds a host
program (tests/cuda_host/write_tile_check.cu) that runs it for every thread of a CTA against a
scalar model: partial tiles, N not a multiple of 8, unaligned y, bias and per-channel scales.
No GPU is needed; skipped without nvcc."""
import os
import subprocess

import pytest

from qcompiler.codegen.cuda import build as nv

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(os.path.dirname(HERE), "codegen", "cuda", "include")


@pytest.mark.skipif(nv.find_nvcc() is None, reason="nvcc not found")
def test_write_tile_matches_the_scalar_model(tmp_path):
    exe = str(tmp_path / "write_tile_check")
    build = subprocess.run([nv.find_nvcc(), "-std=c++17", "-O2", "-I", INCLUDE,
                            os.path.join(HERE, "cuda_host", "write_tile_check.cu"), "-o", exe],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
