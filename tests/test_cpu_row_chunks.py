"""qmatmul kernels called per chunk of rows (``kernels.chunk_blocks``, ``QmmKernel._launch``).

For many rows the runner calls a ``group`` / ``dequant`` kernel once per chunk of rows on
slices of its arguments (so that a chunk's activations stay in cache for every column tile).
Checked against the numpy model on fresh random inputs: row counts of one chunk, of several,
of a ragged last chunk and of a padded last row block, through both outputs (the runner's
padded buffer and a caller's array written directly), exact and int8 numerics.
"""
from __future__ import annotations

import numpy as np
import pytest

from qcompiler.codegen.cpu import kernels, runtime, tuning


def _problem(target, k, n, numerics, m):
    key = {"op": "qmatmul", "m": m, "k": k, "n": n,
           "w_scheme": "#quant<u4, affine, per_group(axis=0, block=32), scale=f32, zp=u4>",
           "act": "float", "x_dtype": "f32", "has_bias": False, "act_order": False}
    if numerics != "exact":
        key["numerics"] = numerics
    return key, tuning.problem(target, key)


def test_chunk_size_follows_the_activation_bytes():
    ks = kernels.KernelShape("exact", n_pad=64, k_pad=4096, block=32, groups=128, n_tile=64,
                             container_bits=4, lanes=16)
    assert kernels.chunk_blocks(ks, {"order": "row", "m_block": 1}) is None
    # 512 KiB of float32 rows of 4096: 32 rows, raised to the 128-row floor
    assert kernels.chunk_blocks(ks, {"order": "dequant", "m_block": 4}) == 128 // 4
    small = kernels.KernelShape("int8", n_pad=64, k_pad=384, block=32, groups=12, n_tile=64,
                                container_bits=4, lanes=16)
    # int8 rows of 384 bytes: 1365 rows fit, capped at 1024
    assert kernels.chunk_blocks(small, {"order": "group", "m_block": 4}) == 1024 // 4


@pytest.mark.parametrize("numerics", ["exact", "int8"])
def test_chunked_calls_match_the_model(numerics, tmp_path):
    from qcompiler.codegen.cpu.host import host_cpu
    from qcompiler.targets import get_target

    target = get_target("cpu")
    if not target.available:
        pytest.skip("the cpu target is not available here")
    if numerics == "int8" and host_cpu().get("arch", "x86_64") != "x86_64":
        pytest.skip("the int8 kernels are x86")
    k, n = 4096, 128  # exact: 128 rows a chunk (int8: 128 as well, 512 KiB / 4096 B)
    key, p = _problem(target, k, n, numerics, 128)
    variant = {**tuning.default_config(target, key), "m": 128, "max_m": 0}
    assert variant["order"] in ("group", "dequant")
    per = kernels.chunk_blocks(p.kernel_shape(), variant) * variant["m_block"]
    assert per == 128
    lib = runtime.build_library(p.kernel_shape(), [variant], target, str(tmp_path / "k"))
    rng = np.random.default_rng()
    w = tuning.random_weights(p, rng)
    kernel = runtime.QmmKernel(lib, p, [variant],
                               runtime.pack_weights(p, w["q"], w["scale"], w["zp"], None))
    for m in (per, 3 * per, 2 * per + 36, 2 * per + 37):  # whole, several, ragged, padded
        x = rng.standard_normal((m, k)).astype(np.float32)
        want = runtime.numpy_model(p, x, w["q"], w["scale"], w["zp"], None)
        tol = runtime.tolerance(p, want)
        got = kernel(x)  # through the runner's padded output
        assert np.abs(got - want).max() <= tol, m
        out = runtime.aligned_empty((m, n), np.float32)
        direct = kernel.direct_output(out)
        assert (direct is not None) == (m % variant["m_block"] == 0)
        out[:] = np.nan
        kernel.run_into(x, out, direct)
        assert np.abs(out - want).max() <= tol, m
