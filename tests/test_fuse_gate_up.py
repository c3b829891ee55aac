"""fuse-gate-up on a Llama step (the CUDA pipelines' order): each layer's gate and up
projections become one qmatmul over column-interleaved weights with an epilogue over column
pairs, the reference of the fused module agrees with the unfused one at f16 rounding, and
the CPU backend, which has no paired epilogue, refuses it naming the node."""
from collections import Counter

import numpy as np
import pytest

from qcompiler.driver.frontend import import_model
from qcompiler.pipeline import PassManager
from qcompiler.runtime.reference import run as ref_run
from conftest import CUDA_PASSES_BEFORE_MERGES as BEFORE, small_llama_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("torch")
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    feeds = small_llama_onnx(path, 2, 2, 3, 11, seed=8)  # batch 2, 3 new tokens, 11 cached
    return path, PassManager.parse(BEFORE).run(import_model(path)), feeds


def test_gate_and_up_become_one_paired_projection(llama):
    _, plain, feeds = llama
    fused = PassManager.parse("fuse-gate-up").run(plain.clone())
    before, after = Counter(n.op for n in plain.main.nodes), Counter(n.op for n in fused.main.nodes)
    assert after["qmatmul"] == before["qmatmul"] - 2
    paired = [n for n in fused.main.nodes if n.op == "qmatmul" and n.attrs.get("epilogue_pairs")]
    assert len(paired) == 2
    for n in paired:  # [K, 2 x 192] codes, the result 192 wide, no epilogue operands
        assert n.operands[1].type.shape == (128, 384) and len(n.operands) <= 8
        assert n.result.type.shape[-1] == 192 and "silu" in n.attrs["epilogue"]
    # columns interleaved: even ones are the gate projection's (x0), odd ones the up's
    gate = [n for n in plain.main.nodes if n.op == "qmatmul" and "silu" in n.attrs.get("epilogue", "")]
    up = gate[0].operands[8].producer
    merged = fused.constants[paired[0].operands[1].producer.attrs["name"]]
    codes = [plain.constants[p.operands[1].producer.attrs["name"]] for p in (gate[0], up)]
    assert np.array_equal(merged[:, 0::2], codes[0]) and np.array_equal(merged[:, 1::2], codes[1])
    want, got = ref_run(plain, feeds), ref_run(fused, feeds)
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1.0)
        assert np.abs(got[k].astype(np.float64) - want[k]).max() <= 1e-2 * scale, k


def test_paired_epilogue_type_checks():
    from qcompiler.errors import QCompilerError
    from qcompiler.ir.ops import infer_types
    from qcompiler.ir.types import QuantScheme, elem, tensor

    scheme = QuantScheme(elem("i4"), granularity="channel", axis=1)
    types = [tensor(["m", 16], "f16"), tensor([16, 10], "i4"), tensor([10], "f32")]
    attrs = {"act": "float", "w_scheme": scheme, "epilogue": "t0 = mul(x0, x1); return t0",
             "epilogue_pairs": 1}
    (y,) = infer_types("qmatmul", types, attrs, [None] * 3)
    assert y.shape == ("m", 5)
    with pytest.raises(QCompilerError, match="even N"):
        infer_types("qmatmul", [types[0], tensor([16, 9], "i4"), tensor([9], "f32")], attrs,
                    [None] * 3)


def test_cpu_backend_refuses_a_paired_epilogue(llama, tmp_path):
    import qcompiler
    from qcompiler.errors import QCompilerError
    from qcompiler.targets import get_target

    path = llama[0]
    cpu = get_target("cpu").default_pipeline
    at = cpu.index("fuse-elementwise,") + len("fuse-elementwise,")
    passes = "canonicalize,quantize-weights{bits=4,group=32}," + cpu[:at] + "fuse-gate-up," + cpu[at:]
    with pytest.raises(QCompilerError, match="column pairs"):
        qcompiler.compile_to_dir(path, "cpu", str(tmp_path / "out"), passes=passes)


def test_a_paired_projection_is_keyed_by_its_weights_columns(llama):
    """The tuning key (and so the tile heuristic and a tuning log) of the paired qmatmul counts
    the weight's 2n interleaved columns, which the kernel's grid and bytes go with, and says
    ``epilogue_pairs``: keyed by its n results, the 1B decode's gate/up kernel (11264 weight
    columns) took a 5632-column layer's 16-warp CTAs, 176 of them for 132 SMs. The tuner
    names the paired result under that key."""
    from qcompiler.codegen.cuda import tuning
    from qcompiler.targets import get_target
    from qcompiler.tuning.key import describe, kernel_key
    from qcompiler.tuning.tuner import looked_up_kernels

    path, plain, _ = llama
    fused = PassManager.parse("fuse-gate-up").run(plain.clone())
    paired = next(n for n in fused.main.nodes
                  if n.op == "qmatmul" and n.attrs.get("epilogue_pairs"))
    key = kernel_key(paired, 1)
    assert key["n"] == 2 * paired.result.type.shape[-1] == 384 and key["epilogue_pairs"] == 1
    assert "pairs" in describe(key)
    unpaired = [kernel_key(n, 1) for n in plain.main.nodes if n.op == "qmatmul"]
    assert all("epilogue_pairs" not in k for k in unpaired)
    # the tile pass's GEMV bucket is the heuristic's config at the weight's columns
    sm90 = get_target("cuda-sm90")
    tiled = PassManager.parse("reorder-weights,schedule-unpack,tile{target=cuda-sm90}").run(fused)
    node = next(n for n in tiled.main.nodes if n.op == "qmatmul" and n.attrs.get("epilogue_pairs"))
    want = tuning.default_config(sm90, kernel_key(node, 8))
    got = node.attrs["config"]["variants"]["m8"]
    assert {k: got[k] for k in tuning.KNOBS} == {k: want[k] for k in tuning.KNOBS}
    # TinyLlama's gate/up pair at one row: the 11264-column config, not the 5632-column one
    big = {**key, "m": 1, "k": 2048, "n": 11264}
    assert tuning.default_config(sm90, big)["warps_k"] < \
        tuning.default_config(sm90, {**big, "n": 5632})["warps_k"]
    # the tuner's kernels name the paired result under its key
    from qcompiler.driver.frontend import import_model as load

    looked = looked_up_kernels(load(path), BEFORE + ",fuse-gate-up,reorder-weights,"
                               "schedule-unpack,tile{target=cuda-sm90}", sm90, [1])
    pairs = [names for k, names in looked if k.get("epilogue_pairs")]
    assert pairs and all(names and all(n.startswith("gate_up") for n in names) for names in pairs)
