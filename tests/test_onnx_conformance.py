"""ONNX's own conformance cases for the quantization operators, through qcompiler.

The 42 node cases that ``onnx.backend.test.case.node.collect_testcases()`` builds for
DequantizeLinear, QuantizeLinear, QLinearMatMul, MatMulInteger and DynamicQuantizeLinear
(onnx 1.23 no longer ships them as files; see /work/shared/notes/hls-onnx-cpu.md §B.3).
For each case:

(a) import ``case.model`` with the ONNX frontend and run the numpy reference interpreter on
    ``case.data_sets[0]``: integer (and fp8/fp4 code) outputs must be equal, float outputs
    equal to 1e-6 relative (NaN == NaN);
(b) the same after the ref target's default pipeline (canonicalize,fuse-dequant,canonicalize,
    verified after every pass), once on the case as written (every operand a graph input)
    and once with every input but the first turned into an initializer, so that
    fuse-dequant sees constant weights: a 2-D QLinearMatMul then becomes
    ``quantize(qmatmul(...))``, which may differ from ONNX's single rounding by at most one
    code at a rounding tie (asserted as that bound); everything else stays exact;
(c) the IR round-trips: print_module -> parse_module(text, constants) -> print_module.

Low-bit tensors (int4/uint4/int2/uint2 ml_dtypes arrays) are fed and compared in QIR's storage
(one code per int8/uint8), the conversion the frontend's ``_to_storage`` applies to
initializers.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompiler.driver.api import run_pipeline
from qcompiler.frontends.onnx import FrontendError, _elem_of, load
from qcompiler.ir import parse_module, print_module
from qcompiler.runtime.reference import run
from qcompiler.targets import get_target

PREFIXES = ("test_dequantizelinear", "test_quantizelinear", "test_qlinearmatmul",
            "test_matmulinteger", "test_dynamicquantizelinear")
PIPELINE = get_target("ref").default_pipeline
FLOAT_RTOL = 1e-6


def _collect() -> dict:
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():  # building all node cases warns about unrelated ops
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases()
    return {c.name: c for c in cases if c.name.startswith(PREFIXES)}


CASES = _collect()

# The function-body expansions of DynamicQuantizeLinear (ReduceMin, ReduceMax, Clip, Round,
# Div, Cast) pass since the reduce and round ops exist (issue #13).
KNOWN_FAILURES: dict[str, str] = {}

PARAMS = [pytest.param(name, id=name, marks=(
    [pytest.mark.xfail(strict=True, raises=FrontendError, reason=KNOWN_FAILURES[name])]
    if name in KNOWN_FAILURES else [])) for name in sorted(CASES)]


def test_there_are_42_quantization_cases():
    assert len(CASES) == 42, sorted(CASES)
    assert set(KNOWN_FAILURES) <= set(CASES)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _array(x) -> np.ndarray:
    return numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def _storage(x, onnx_elem_type: int, what: str) -> np.ndarray:
    """An ONNX value as QIR stores it: ml_dtypes int4/uint4/int2/uint2 → int8/uint8 codes."""
    return np.asarray(_array(x)).astype(_elem_of(onnx_elem_type, what).np_dtype, order="C")


def _elem_type(vi) -> int:
    return vi.type.tensor_type.elem_type


def _frozen(model: onnx.ModelProto, inputs: list) -> onnx.ModelProto:
    """The case with every graph input but the first turned into an initializer."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for vi, x in list(zip(g.input, inputs))[1:]:
        if isinstance(x, onnx.TensorProto):
            t = onnx.TensorProto()
            t.CopyFrom(x)
            t.name = vi.name
        else:
            t = numpy_helper.from_array(np.asarray(x), vi.name)
        assert t.data_type == _elem_type(vi), vi.name
        g.initializer.append(t)
    del g.input[1:]
    return m


def _feeds(model: onnx.ModelProto, inputs: list) -> dict:
    return {vi.name: _storage(x, _elem_type(vi), f"input {vi.name}")
            for vi, x in zip(model.graph.input, inputs)}


def _expected(model: onnx.ModelProto, outputs: list) -> dict:
    return {vi.name: _storage(y, _elem_type(vi), f"output {vi.name}")
            for vi, y in zip(model.graph.output, outputs)}


def _is_float(dtype: np.dtype) -> bool:
    return not (np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def _compare(name: str, got: dict, want: dict, max_code_diff: int = 0) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for out, e in want.items():
        g = got[out]
        assert g.dtype == e.dtype, f"{name} {out}: dtype {g.dtype}, expected {e.dtype}"
        assert g.shape == e.shape, f"{name} {out}: shape {g.shape}, expected {e.shape}"
        if e.dtype.itemsize == 1 and _is_float(e.dtype):
            # fp8 / fp4 outputs are codes: equal values (NaN codes equal each other).
            assert np.array_equal(g.astype(np.float64), e.astype(np.float64), equal_nan=True), \
                f"{name} {out}: {g} != {e}"
        elif _is_float(e.dtype):
            np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64),
                                       rtol=FLOAT_RTOL, atol=0, equal_nan=True,
                                       err_msg=f"{name} {out}")
        elif max_code_diff == 0:
            assert np.array_equal(g, e), f"{name} {out}: {g} != {e}"
        else:
            diff = np.abs(g.astype(np.int64) - e.astype(np.int64))
            assert diff.max() <= max_code_diff, f"{name} {out}: codes differ by {diff.max()}"


def _round_trips(module) -> None:
    text = print_module(module)
    assert print_module(parse_module(text, module.constants)) == text


def _case(name: str):
    case = CASES[name]
    inputs, outputs = case.data_sets[0]
    return case.model, list(inputs), list(outputs)


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARAMS)
def test_reference_matches_onnx(name):
    """(a) raw import + reference run."""
    model, inputs, outputs = _case(name)
    module = load(model)
    got = run(module, _feeds(model, inputs))
    _compare(name, got, _expected(model, outputs))


@pytest.mark.parametrize("name", PARAMS)
def test_default_pipeline_matches_onnx(name):
    """(b) the target's default pipeline on the case as written (operands are inputs)."""
    model, inputs, outputs = _case(name)
    module, _, spec = run_pipeline(load(model), PIPELINE, verify_each=True)
    assert spec == PIPELINE == "canonicalize,fuse-dequant,canonicalize"
    got = run(module, _feeds(model, inputs))
    _compare(name, got, _expected(model, outputs))


@pytest.mark.parametrize("name", PARAMS)
def test_default_pipeline_with_constant_operands(name):
    """(b) the default pipeline with every input but the first frozen into an initializer."""
    model, inputs, outputs = _case(name)
    frozen = _frozen(model, inputs)
    module, _, _ = run_pipeline(load(frozen), PIPELINE, verify_each=True)
    ops = [n.op for n in module.main.nodes]
    max_code_diff = 0
    if name.startswith("test_qlinearmatmul_2D"):
        # Constant 2-D b: fuse-dequant must have rewritten it; requantizing the f32 product
        # of qmatmul may land one code away from QLinearMatMul's single rounding at a tie.
        assert "qmatmul" in ops and "quantize" in ops and "qlinear_matmul" not in ops, ops
        max_code_diff = 1
    got = run(module, _feeds(frozen, inputs[:1]))
    _compare(name, got, _expected(model, outputs), max_code_diff)
    _round_trips(module)


@pytest.mark.parametrize("name", PARAMS)
def test_ir_round_trips(name):
    """(c) print → parse → print is the identity, before and after the pipeline."""
    model, _, _ = _case(name)
    module = load(model)
    _round_trips(module)
    final, _, _ = run_pipeline(module, PIPELINE, verify_each=True)
    _round_trips(final)
