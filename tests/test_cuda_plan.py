"""CUDA whole-model plan, CPU side (CI has no GPU): the f32 -> f16 boundary of the CUDA
pipelines (compute-dtype) checked on the reference, the default CUDA pipelines on f32
models, and the generated host plan (golden, nvcc)."""
import os
import sys

import numpy as np
import pytest

from qcompiler.driver.frontend import import_model
from qcompiler.ir import elem
from qcompiler.ir.verifier import verify
from qcompiler.pipeline import PassError, PassManager
from qcompiler.runtime.reference import run
from qcompiler.targets import get_target

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
CUDA_TARGETS = ("cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90")


def _mlp():
    return import_model(os.path.join(EXAMPLES, "mlp_int4.onnx"))


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """The small Llama decode step (2 layers, KV cache in and out), exported to ONNX."""
    pytest.importorskip("torch")
    sys.path.insert(0, EXAMPLES)
    import decoder_models as dm

    model = dm.llama(layers=2, **dm.SMALL_LLAMA)
    feeds = dm.llama_inputs(dm.SMALL_LLAMA, 2, 1, 1, 8)
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    dm.export_onnx(model, feeds, path, dynamo=False)
    return dm, import_model(path)


def _close(want: dict, got: dict, rtol: float) -> None:
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name  # the f32 interface is kept
        assert g.shape == w.shape, name
        err = np.abs(g.astype(np.float64) - w).max()
        assert err <= rtol * max(np.abs(w).max(), 1.0), (name, err, np.abs(w).max())


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_compute_dtype_keeps_the_f32_interface_on_the_mlp(dtype):
    base = PassManager.parse("canonicalize,fuse-dequant,canonicalize").run(_mlp())
    half = PassManager.parse(f"compute-dtype{{dtype={dtype}}}").run(base)
    verify(half)
    fn = half.main
    assert [a.type.dtype.name for a in fn.args] == ["f32"]
    assert [v.type.dtype.name for v in fn.outputs] == ["f32"]
    # in between, every float value is half: the only f32 values are the boundary's
    inner = [r for n in fn.nodes for r in n.results if r.type.dtype.name == "f32"
             and not (n.op == "cast" and fn.is_output(r))
             and not (n.op == "constant" and all(u.op == "qmatmul" for u in fn.nodes
                                                 if r in u.operands))]
    assert inner == []
    assert fn.nodes[0].op == "cast" and fn.nodes[0].attrs["to"] == elem(dtype)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    _close(run(base, {"x": x}), run(half, {"x": x}), 4e-3 if dtype == "f16" else 3e-2)


def test_compute_dtype_keeps_integer_tensors_and_the_kv_cache_interface(small_llama):
    dm, module = small_llama
    base = PassManager.parse("canonicalize,quantize-weights{bits=4,group=32},fuse-dequant,"
                             "canonicalize").run(module)
    half = PassManager.parse("compute-dtype").run(base)
    verify(half)
    fn = half.main
    types = {a.name: a.type.dtype.name for a in fn.args}
    assert types["input_ids"] == "int64" or types["input_ids"] == "i64"
    assert types["past_k"] == "f32"
    assert all(v.type.dtype.name in ("f32", "i64", "int64") for v in fn.outputs)
    feeds = dm.llama_inputs(dm.SMALL_LLAMA, 2, 1, 1, 8, seed=3)
    _close(run(base, feeds), run(half, feeds), 1e-2)


def test_compute_dtype_refuses_an_unknown_type():
    with pytest.raises(PassError, match="dtype='f8'"):
        PassManager.parse("compute-dtype{dtype=f8}").run(_mlp())


@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_default_cuda_pipelines_take_f32_models(target):
    """The f32 file onnxruntime's quantizer writes compiles for every CUDA target (the passes;
    the kernels' nvcc build is tested elsewhere)."""
    out = PassManager.parse(get_target(target).default_pipeline).run(_mlp())
    ops = [n.op for n in out.main.nodes if n.op != "constant"]
    assert ops.count("qmatmul") == 3 and ops[0] == "cast" and ops[-1] == "cast"
    # gelu went into the qmatmuls' epilogues (the fusion passes run on CUDA targets)
    assert "gelu" not in ops
    assert all(n.attrs["config"]["variants"] for n in out.main.nodes if n.op == "qmatmul")


def test_host_plan_golden_and_the_launcher_compiles(tmp_path, update_goldens):
    """The launcher's step table for the MLP (golden), and qc_plan.cu builds for sm_80/sm_90."""
    import subprocess

    from conftest import check_golden
    from qcompiler.codegen.cuda import build as nv
    from qcompiler.codegen.cuda.ops.library import library_source
    from qcompiler.codegen.cuda.plan import LAUNCHER_SOURCE, op_nodes, step_table_text
    from qcompiler.plan import lower

    module = PassManager.parse(get_target("cuda-sm90").default_pipeline).run(_mlp())
    plan = lower(module)
    symbols, _ = library_source(op_nodes(module, plan), module)
    text = step_table_text(module, plan, symbols)
    # gelu(x0) has no extra operands: the qmatmul kernels apply it as they store y
    assert text.count("QMM") == 3 and "epilogue(" in text and "in place" not in text
    check_golden(os.path.join(HERE, "golden", "cuda_plan_mlp_int4.txt"), text, update_goldens)
    if nv.find_nvcc() is None:
        pytest.skip("nvcc not found")
    for arch in ("sm_80", "sm_90"):
        out = tmp_path / f"qc_plan_{arch}.so"
        subprocess.run([nv.find_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
                        f"-arch={arch}", LAUNCHER_SOURCE, "-o", str(out)], check=True)
        assert out.stat().st_size > 0


def test_concurrent_runs_group_launches_that_touch_disjoint_memory():
    """q, k and v projections of one input run together; a launch reading what the run writes,
    writing what it reads, or marked solo starts a new run; at most MAX_LANES a run."""
    from qcompiler.codegen.cuda.plan import MAX_LANES, concurrent_runs

    x, q, k, v = (0, 100), (100, 50), (150, 10), (160, 10)
    qkv = [([x], [q], False), ([x], [k], False), ([x], [v], False)]
    assert concurrent_runs(qkv) == [3, 0, 0]
    # rotary of q reads q: a new run, which the rotary of k then joins
    rot = [([q], [(200, 50)], False), ([k], [(250, 10)], False)]
    assert concurrent_runs(qkv + rot) == [3, 0, 0, 2, 0]
    # a write over a byte another member reads (the last byte of x) splits the run
    assert concurrent_runs([([x], [q], False), ([k], [(99, 4)], False)]) == [1, 1]
    # two writes to one range (in place) split it too
    assert concurrent_runs([([x], [q], False), ([k], [(149, 2)], False)]) == [1, 1]
    # solo launches (a qmatmul and its separate epilogue; copies) are alone
    assert concurrent_runs([([x], [q], True), ([x], [k], False), ([x], [v], True)]) == [1, 1, 1]
    # weights are left out of the ranges: size 0 never overlaps
    assert concurrent_runs([([(0, 0)], [q], False), ([(0, 0)], [k], False)]) == [2, 0]
    many = [([x], [(1000 + 10 * i, 10)], False) for i in range(MAX_LANES + 1)]
    assert concurrent_runs(many) == [MAX_LANES] + [0] * (MAX_LANES - 1) + [1]
    assert concurrent_runs(qkv, max_lanes=1) == [1, 1, 1]
    assert concurrent_runs([]) == []


def test_concurrent_runs_from_the_last_ones_are_the_runs_formed_anew():
    """With the runs of an earlier list of launches and which launches changed since, runs
    over unchanged launches are kept and the rest formed again: the result is always the
    one formed from nothing (random lists, random changes, every lane count)."""
    from qcompiler.codegen.cuda.plan import concurrent_runs

    rng = np.random.default_rng(0)

    def launch():
        def ranges(k):
            return [(int(rng.integers(0, 40)) * 8, int(rng.integers(0, 3)) * 8)
                    for _ in range(k)]
        return (ranges(int(rng.integers(1, 3))), ranges(1), bool(rng.random() < 0.1))

    for trial in range(400):
        n = int(rng.integers(1, 30))
        before = [launch() for _ in range(n)]
        lanes = int(rng.integers(1, 5))
        after = list(before)
        changed = [False] * n
        for i in rng.choice(n, int(rng.integers(0, n + 1)), replace=False):
            after[i], changed[i] = launch(), True
        want = concurrent_runs(after, lanes)
        got = concurrent_runs(after, lanes, concurrent_runs(before, lanes), changed)
        assert got == want, (trial, before, after, changed)
