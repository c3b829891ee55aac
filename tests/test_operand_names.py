"""Issue #18 (structure): ``node.arg(name)`` agrees with the op definitions and the sources
read the operands of qmatmul-like nodes by name, not by position; a qmatmul's ``w_scheme``
stays the model's scheme after a backend packs its weight (u8 words + a layout)."""
import ast
import os

import pytest

from qcompiler.ir import OPS, elem, tensor
from qcompiler.ir.core import Node, Value, operand_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ("qcompiler", "passes", "codegen", "benchmarks")
# Ops whose operands have distinct meanings: a function that names one of them must read
# their operands (index >= 1) through arg()/operand_index(), never operands[k]/operand(k).
NAMED_OPERAND_OPS = {"qmatmul", "dequantize", "quantize", "qconv", "matmul_integer",
                     "qlinear_matmul", "conv", "attention", "rotary_embedding"}


def _operand_names(op: str) -> list[str]:
    return [o.rstrip("?*") for o in OPS[op].operands]


@pytest.mark.parametrize("op", sorted(OPS))
def test_arg_agrees_with_the_definition(op):
    names = _operand_names(op)
    values = [Value(f"v{i}", tensor([2], "f32")) for i in range(len(names))]
    node = Node(op, list(values), [], {})
    for i, name in enumerate(names):
        assert operand_index(op, name) == i
        assert node.arg(name) is values[i], f"{op}.arg({name!r})"
    # trailing optional operands that are absent read as None, not an IndexError
    if names:
        short = Node(op, list(values[:1]), [], {})
        for name in names[1:]:
            assert short.arg(name) is None
    with pytest.raises(KeyError, match=f"op '{op}' has no operand 'no_such_operand'"):
        node.arg("no_such_operand")


def test_qmatmul_arg_names_are_the_documented_ones():
    # the names the passes and backends use (a renamed operand must fail here first)
    for name, index in (("x", 0), ("w", 1), ("w_scale", 2), ("w_zero_point", 3), ("g_idx", 4),
                        ("x_scale", 5), ("x_zero_point", 6), ("bias", 7)):
        assert operand_index("qmatmul", name) == index
    assert _operand_names("dequantize") == ["x", "scale", "zero_point", "g_idx"]
    assert _operand_names("quantize") == ["x", "scale", "zero_point"]


def _string_constants(fn_node) -> set[str]:
    return {n.value for n in ast.walk(fn_node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _positional_operand_uses(tree):
    """(line, text) of ``X.operands[k]`` and ``X.operand(k)`` with a literal k >= 1 inside a
    function (or class) that names one of NAMED_OPERAND_OPS."""
    found = []

    def visit(scope, named):
        for child in ast.iter_child_nodes(scope):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, named or bool(_string_constants(child) & NAMED_OPERAND_OPS))
                continue
            for n in ast.walk(child) if named else ():
                if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Attribute) \
                        and n.value.attr == "operands" and isinstance(n.slice, ast.Constant) \
                        and isinstance(n.slice.value, int) and n.slice.value >= 1:
                    found.append((n.lineno, ast.unparse(n)))
                # (the CPU TE builders' ctx.operand(i) are placeholders, not QIR operands)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                        and n.func.attr == "operand" and len(n.args) == 1 \
                        and not (isinstance(n.func.value, ast.Name) and n.func.value.id == "ctx") \
                        and isinstance(n.args[0], ast.Constant) \
                        and isinstance(n.args[0].value, int) and n.args[0].value >= 1:
                    found.append((n.lineno, ast.unparse(n)))

    # a class is "named" when its body names the op (``op = "conv"`` of a RewritePattern)
    visit(tree, False)
    return found


def test_the_detector_finds_positional_operands():
    src = ("class P:\n    op = 'qmatmul'\n    def rewrite(self, node):\n"
           "        return node.operands[1], node.operand(7), node.operands[0]\n"
           "def other(node):\n    return node.operands[1]\n")
    assert _positional_operand_uses(ast.parse(src)) == [(4, "node.operands[1]"),
                                                        (4, "node.operand(7)")]


def test_sources_read_named_operands_by_name():
    offenders = []
    for top in SOURCE_DIRS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    tree = ast.parse(fh.read(), path)
                rel = os.path.relpath(path, ROOT)
                offenders += [f"{rel}:{line}: {text}"
                              for line, text in _positional_operand_uses(tree)]
    assert not offenders, ("read these operands with node.arg(name) (operand_index(op, name) "
                           "to assign them):\n" + "\n".join(offenders))



# ---- w_scheme stays the model's scheme; the packed weight's type describes the storage ----

H100_LOG = os.path.join(ROOT, "benchmarks", "results", "tune-cuda-h100-20261125.jsonl")


def _packed_qmatmuls(module):
    return [n for n in module.main.nodes if n.op == "qmatmul"]


def _check_packed(before: dict, module, layout_names):
    from qcompiler.ir import parse_module, print_module

    for node in _packed_qmatmuls(module):
        w = node.arg("w").type
        assert w.layout is not None and w.layout.name in layout_names
        assert w.dtype.name == "u8" and w.quant is None  # the storage: u8 words + layout
        scheme = node.attrs["w_scheme"]
        assert str(scheme) == before[node.result.name]  # the model's, unchanged
        assert w.layout.get("codes") == scheme.dtype.name
        assert "w_scheme" not in node.attrs.get("config", {})
    # the printed packed module parses back (type inference accepts u8 storage + layout)
    text = print_module(module)
    assert print_module(parse_module(text, dict(module.constants))) == text


def test_reorder_weights_keeps_the_model_scheme_and_an_old_tuning_log_replays():
    """A CUDA tuning log written before w_scheme stayed the model's (its keys hold the model's
    scheme) still matches the key of the packed node."""
    from qcompiler.codegen.cuda import bench_support, cases
    from qcompiler.pipeline import PassManager
    from qcompiler.tuning import log as tlog
    from qcompiler.tuning.key import kernel_key

    record = tlog.read(H100_LOG)[0]
    key = record["key"]
    case = bench_support.case_from_key(key)
    module = cases.make_module(case, seed=3)
    before = {n.result.name: str(n.attrs["w_scheme"]) for n in _packed_qmatmuls(module)}
    assert list(before.values()) == [key["w_scheme"]]
    module = PassManager.parse("reorder-weights").run(module)
    _check_packed(before, module, {"cuda_mma_b16"})
    node = _packed_qmatmuls(module)[0]
    assert kernel_key(node, key["m"]) == key
    assert tlog.best_config(H100_LOG, record["target"], record["device"], key) is not None


def test_cpu_pack_weights_keeps_the_model_scheme():
    from qcompiler.driver.api import import_model, run_pipeline

    mlp = os.path.join(ROOT, "examples", "mlp_int4.onnx")
    fused, _, _ = run_pipeline(import_model(mlp), "canonicalize,fuse-dequant,canonicalize")
    before = {n.result.name: str(n.attrs["w_scheme"]) for n in _packed_qmatmuls(fused)}
    assert before and all(s.startswith("#quant<u4") for s in before.values())
    packed, _, _ = run_pipeline(fused, "cpu-schedule{target=cpu},cpu-pack-weights{target=cpu}",
                                verify_each=True)
    _check_packed(before, packed, {"cpu_exact", "cpu_vnni", "cpu_lut"})


def test_qmatmul_inference_checks_the_stored_code_type():
    """u8 words are accepted only with a layout, and the layout must store the scheme's
    codes."""
    from qcompiler.ir import Layout, QuantScheme, TypeInferenceError, infer_types

    scheme = QuantScheme(dtype=elem("u4"), symmetric=False, zero_point_type=elem("u4"),
                         scale_type=elem("f32"), granularity="channel", axis=1)
    x, scale = tensor([2, 64], "f32"), tensor([8], "f32")
    attrs = {"w_scheme": scheme, "act": "float"}
    lay = Layout.make("cpu_exact", codes="u4", k=64, n=8)
    y, = infer_types("qmatmul", [x, tensor([4, 64], "u8", layout=lay), scale], attrs, [])
    assert y.shape == (2, 8)
    with pytest.raises(TypeInferenceError, match="weight codes are u8, scheme says u4"):
        infer_types("qmatmul", [x, tensor([64, 8], "u8"), scale], attrs, [])
    with pytest.raises(TypeInferenceError, match="stores i4 codes, scheme says u4"):
        infer_types("qmatmul", [x, tensor([4, 64], "u8", layout=Layout.make(
            "cpu_exact", codes="i4", k=64, n=8)), scale], attrs, [])
