"""fuse-norm-qmatmul on a Llama step (the CUDA pipelines' order): each rmsnorm read by one
projection becomes that qmatmul's ``x_norm`` prologue; the fused module's reference equals
the unfused one's (the same f32 statistics and f16 rounding); the IR prints and parses; the
pass leaves a norm with a second reader, a norm over more than the last axis and a qmatmul
with act-order alone; the CPU backend runs such a qmatmul on the reference, the HLS backend
refuses it."""
from collections import Counter

import numpy as np
import pytest

from qcompiler.driver.frontend import import_model
from qcompiler.ir.ops import qmatmul_epilogue_operands, qmatmul_x_norm_scale
from qcompiler.pipeline import PassError, PassManager
from qcompiler.runtime.reference import run as ref_run
from conftest import CUDA_PASSES_BEFORE_MERGES as BEFORE, small_llama_onnx

MERGES = "fuse-qkv,fuse-gate-up"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("torch")
    path = str(tmp_path_factory.mktemp("llama") / "llama.onnx")
    feeds = small_llama_onnx(path, 2, 2, 3, 11, seed=5)  # batch 2, 3 new tokens, 11 cached
    return path, PassManager.parse(BEFORE + "," + MERGES).run(import_model(path)), feeds


def test_each_layer_norm_goes_into_its_projection(llama):
    _, plain, feeds = llama
    fused = PassManager.parse("fuse-norm-qmatmul").run(plain.clone())
    before, after = Counter(n.op for n in plain.main.nodes), Counter(n.op for n in fused.main.nodes)
    # per layer: the attention norm into q|k|v, the MLP norm into gate|up; the final norm
    # before the lm head too (its one reader)
    assert before["rmsnorm"] == 5 and after["rmsnorm"] == 0
    assert after["qmatmul"] == before["qmatmul"]
    normed = [n for n in fused.main.nodes if n.op == "qmatmul" and n.attrs.get("x_norm")]
    assert len(normed) == 5
    norms = {n.result.name: n for n in plain.main.nodes if n.op == "rmsnorm"}
    for q in normed:
        assert q.attrs["x_norm"] == "rms" and q.attrs["x_norm_epsilon"] > 0
        scale = qmatmul_x_norm_scale(q)
        assert scale is q.operands[-1] and scale.type.shape == (128,)
        # x is what the norm read: the residual stream, not a normalized copy
        assert q.arg("x").producer is None or q.arg("x").producer.op != "rmsnorm"
        assert q.arg("x").name in {n.operands[0].name for n in norms.values()}
    gate_up = [q for q in normed if q.attrs.get("epilogue_pairs")]
    assert len(gate_up) == 2 and all(qmatmul_epilogue_operands(q) == [] for q in gate_up)
    want, got = ref_run(plain, feeds), ref_run(fused, feeds)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_fused_ir_prints_and_parses(llama):
    from qcompiler.ir.parser import parse_module
    from qcompiler.ir.printer import print_module

    fused = PassManager.parse("fuse-norm-qmatmul").run(llama[1].clone())
    text = print_module(fused)
    assert 'x_norm = "rms"' in text
    again = parse_module(text)
    q = [n for n in again.main.nodes if n.op == "qmatmul" and n.attrs.get("x_norm")]
    assert len(q) == 5 and all(qmatmul_x_norm_scale(n).type.shape == (128,) for n in q)
    assert print_module(again) == text


def test_disabled_and_unfusable_norms_stay(llama):
    _, plain, _ = llama
    off = PassManager.parse("fuse-norm-qmatmul{enable=0}").run(plain.clone())
    assert Counter(n.op for n in off.main.nodes)["rmsnorm"] == 5
    # a second reader of the normalized row keeps its norm (the row is needed as it is)
    m = plain.clone()
    fn = m.main
    norm = next(n for n in fn.nodes if n.op == "rmsnorm")
    extra = fn.make_node("neg", [norm.result], [norm.result.type], {})
    fn.outputs.append(extra.result)
    fn.output_names.append("extra")
    out = PassManager.parse("fuse-norm-qmatmul").run(m)
    assert Counter(n.op for n in out.main.nodes)["rmsnorm"] == 1


def test_type_checks():
    from qcompiler.errors import QCompilerError
    from qcompiler.ir.ops import infer_types
    from qcompiler.ir.types import QuantScheme, elem, tensor

    scheme = QuantScheme(elem("i4"), granularity="channel", axis=1)
    fixed = [tensor(["m", 16], "f16"), tensor([16, 10], "i4"), tensor([10], "f32")] + [None] * 5
    attrs = {"act": "float", "w_scheme": scheme, "x_norm": "rms", "x_norm_epsilon": 1e-5}
    (y,) = infer_types("qmatmul", fixed + [tensor([16], "f16")], attrs, [None] * 9)
    assert y.shape == ("m", 10)
    with pytest.raises(QCompilerError, match=r"scale must be \[K\]"):
        infer_types("qmatmul", fixed + [tensor([15], "f16")], attrs, [None] * 9)
    with pytest.raises(QCompilerError, match="x_norm must be one of"):
        infer_types("qmatmul", fixed + [tensor([16], "f16")], {**attrs, "x_norm": "group"},
                    [None] * 9)
    layer = {**attrs, "x_norm": "layer"}  # scale then bias (or none) at the end
    for bias in (tensor([16], "f16"), None):
        (y,) = infer_types("qmatmul", fixed + [tensor([16], "f16"), bias], layer, [None] * 10)
        assert y.shape == ("m", 10)
    with pytest.raises(QCompilerError, match=r"bias must be \[K\]"):
        infer_types("qmatmul", fixed + [tensor([16], "f16"), tensor([4], "f16")], layer,
                    [None] * 10)
    with pytest.raises(QCompilerError, match="x_norm_epsilon"):
        infer_types("qmatmul", fixed + [tensor([16], "f16")],
                    {k: v for k, v in attrs.items() if k != "x_norm_epsilon"}, [None] * 9)
    with pytest.raises(QCompilerError, match="scale operand"):
        infer_types("qmatmul", fixed[:3], attrs, [None] * 3)


def test_cpu_runs_a_normed_qmatmul_only_on_the_reference(llama, tmp_path):
    """The CPU kernels take x as it is: the CPU backend refuses such a qmatmul naming it and
    why, and with the host fallback allowed runs it on the reference, matching the unfused
    module. (Without fuse-qkv the layer norms have three readers: only the final one fuses.)"""
    import qcompiler
    from qcompiler.errors import HostFallbackError
    from qcompiler.targets import get_target

    path, plain, feeds = llama
    cpu = get_target("cpu").default_pipeline
    at = cpu.index("fuse-elementwise,") + len("fuse-elementwise,")
    passes = ("canonicalize,quantize-weights{bits=4,group=32}," + cpu[:at]
              + "fuse-norm-qmatmul," + cpu[at:])
    with pytest.raises(HostFallbackError, match=r"%qmm\w* \(x_norm=rms"):
        qcompiler.compile(path, "cpu", output_dir=str(tmp_path / "out"), passes=passes)
    with pytest.warns(UserWarning, match="x_norm=rms"):
        m = qcompiler.compile(path, "cpu", output_dir=str(tmp_path / "out2"), passes=passes,
                              allow_host_fallback=True)
    plain_cpu = qcompiler.compile(path, "cpu", output_dir=str(tmp_path / "plain"),
                                  passes=passes.replace("fuse-norm-qmatmul,", ""))
    got, want = m.run(feeds), plain_cpu.run(feeds)
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1.0)
        assert np.abs(got[k].astype(np.float64) - want[k]).max() <= 1e-2 * scale, k


def test_hls_refuses_a_normed_qmatmul():
    from qcompiler.codegen.hls.design import design_layers
    from qcompiler.errors import QCompilerError
    from qcompiler.ir import Function, Module, constant_node
    from qcompiler.ir.types import QuantScheme, elem, tensor

    m = Module("normed")
    fn = m.add_function(Function("main"))
    x = fn.add_arg("x", tensor([1, 16], "f32"))
    w = constant_node(fn, m, np.zeros((16, 8), np.int8), tensor([16, 8], "i4")).result
    s = constant_node(fn, m, np.ones(8, np.float32)).result
    g = constant_node(fn, m, np.ones(16, np.float32)).result
    scheme = QuantScheme(elem("i4"), granularity="channel", axis=1)
    q = fn.make_node("qmatmul", [x, w, s, None, None, None, None, None, g],
                     [tensor([1, 8], "f32")],
                     {"act": "float", "w_scheme": scheme, "x_norm": "rms", "x_norm_epsilon": 1e-6})
    fn.set_outputs([q.result], ["y"])
    with pytest.raises(QCompilerError, match="normalizes its input"):
        design_layers(m)


def test_cuda_pipeline_option_and_the_step_table(llama):
    """The CUDA pipelines list the pass off (enable=0) until its speed is measured;
    --pass-option fuse-norm-qmatmul.enable=1 turns it on. The device plan's step table then
    has no rmsnorm launch and shows each normalizing projection."""
    from qcompiler.codegen.cuda.ops.library import library_source
    from qcompiler.codegen.cuda.plan import op_nodes, step_table_text
    from qcompiler.plan import lower
    from qcompiler.targets import get_target

    path = llama[0]
    pipeline = get_target("cuda-sm80").default_pipeline
    assert "fuse-gate-up,fuse-norm-qmatmul{enable=0},unify-dims,reorder-weights" in pipeline
    spec = "canonicalize,quantize-weights{bits=4,group=32}," + pipeline.replace(
        "fuse-norm-qmatmul{enable=0}", "fuse-norm-qmatmul{enable=1}")
    def table(spec):
        module = PassManager.parse(spec).run(import_model(path))
        plan = lower(module)
        symbols, _ = library_source(op_nodes(module, plan), module)
        return step_table_text(module, plan, symbols)

    plain = table("canonicalize,quantize-weights{bits=4,group=32}," + pipeline)
    assert plain.count("qc_cu_rmsnorm") == 5 and "x=rmsnorm(%" not in plain
    text = table(spec)
    assert "qc_cu_rmsnorm" not in text  # no op kernel of its own
    assert text.count("x=rmsnorm(%") == 5, text


def _layernorm_module(bias: bool, readers: int = 1):
    """x [3, 32] f16 -> layernorm(x, g, b) {axis = -1} -> ``readers`` 4-bit qmatmuls."""
    from qcompiler.ir import Function, Module, constant_node
    from qcompiler.ir.types import QuantScheme, elem, tensor

    rng = np.random.default_rng(4)
    m = Module("ln")
    fn = m.add_function(Function("main"))
    x = fn.add_arg("x", tensor(["batch", 32], "f16"))
    g = constant_node(fn, m, rng.uniform(0.5, 1.5, 32).astype(np.float16)).result
    b = constant_node(fn, m, rng.standard_normal(32).astype(np.float16)).result if bias else None
    ln = fn.make_node("layernorm", [x, g] + ([b] if bias else []), [x.type],
                      {"axis": -1, "epsilon": 1e-5})
    scheme = QuantScheme(elem("i4"), granularity="channel", axis=1)
    outs = []
    for i in range(readers):
        w = constant_node(fn, m, rng.integers(-8, 8, (32, 24)).astype(np.int8),
                          tensor([32, 24], "i4")).result
        s = constant_node(fn, m, (rng.random(24) * 0.05 + 0.01).astype(np.float16)).result
        q = fn.make_node("qmatmul", [ln.result, w, s], [tensor(["batch", 24], "f16")],
                         {"act": "float", "w_scheme": scheme})
        outs.append(q.result)
    fn.set_outputs(outs, [f"y{i}" for i in range(readers)])
    return m


@pytest.mark.parametrize("bias", [True, False])
def test_a_layernorm_goes_in_as_x_norm_layer(bias):
    """A pre-norm LayerNorm (GPT-2's ln_1 before c_attn) read by one qmatmul: x_norm = "layer"
    with its scale and bias (or none) as the last operands; the reference is unchanged; a
    LayerNorm with two readers stays."""
    from qcompiler.ir.ops import qmatmul_x_norm_bias
    from qcompiler.ir.parser import parse_module
    from qcompiler.ir.printer import print_module

    plain = _layernorm_module(bias)
    fused = PassManager.parse("fuse-norm-qmatmul").run(plain.clone())
    (q,) = [n for n in fused.main.nodes if n.op == "qmatmul"]
    assert "layernorm" not in [n.op for n in fused.main.nodes]
    assert q.attrs["x_norm"] == "layer" and q.arg("x").producer is None
    assert qmatmul_x_norm_scale(q).type.shape == (32,)
    assert (qmatmul_x_norm_bias(q) is not None) == bias and len(q.operands) == 10
    assert qmatmul_epilogue_operands(q) == []
    x = {"x": np.random.default_rng(1).standard_normal((3, 32)).astype(np.float16) * 4}
    np.testing.assert_array_equal(ref_run(fused, x)["y0"], ref_run(plain, x)["y0"])
    assert print_module(parse_module(print_module(fused))) == print_module(fused)
    two = PassManager.parse("fuse-norm-qmatmul").run(_layernorm_module(bias, readers=2))
    assert "layernorm" in [n.op for n in two.main.nodes]
    rms_only = PassManager.parse("fuse-norm-qmatmul{kinds=rms}").run(_layernorm_module(bias))
    assert "layernorm" in [n.op for n in rms_only.main.nodes]  # kinds=rms leaves LayerNorms


def test_kinds_names_the_norms_it_fuses():
    """kinds: "+"-separated rms / layer; anything else is refused with the option named."""
    assert PassManager.parse("fuse-norm-qmatmul{kinds=rms+layer}").passes[0]._kinds == {"rms", "layer"}
    for bad in ("foo", "rms+ln"):
        with pytest.raises(PassError, match="kinds="):
            PassManager.parse(f"fuse-norm-qmatmul{{kinds={bad}}}")


def test_fuse_epilogue_after_the_norm_keeps_its_operands_last():
    """A residual add absorbed into a qmatmul that already took in its norm: the residual
    becomes epilogue operand x1 before the norm's scale and bias, which stay last."""
    from qcompiler.ir.ops import qmatmul_x_norm_bias
    from qcompiler.ir.types import tensor

    plain = _layernorm_module(bias=True)
    fn = plain.main
    (q,) = [n for n in fn.nodes if n.op == "qmatmul"]
    r = fn.add_arg("r", tensor(["batch", 24], "f16"))
    add = fn.make_node("add", [q.result, r], [q.result.type])
    fn.set_outputs([add.result], ["y0"])
    fused = PassManager.parse("fuse-norm-qmatmul,fuse-epilogue").run(plain.clone())
    (q,) = [n for n in fused.main.nodes if n.op == "qmatmul"]
    assert q.attrs["x_norm"] == "layer" and "epilogue" in q.attrs
    assert [v.name for v in qmatmul_epilogue_operands(q)] == ["r"]
    assert qmatmul_x_norm_scale(q).type.shape == (32,) and qmatmul_x_norm_bias(q) is not None
    assert [n.op for n in fused.main.nodes if n.op != "constant"] == ["qmatmul"]
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((3, 32)).astype(np.float16) * 4,
             "r": rng.standard_normal((3, 24)).astype(np.float16)}
    np.testing.assert_array_equal(ref_run(fused, feeds)["y0"], ref_run(plain, feeds)["y0"])
