"""ONNX's backend node cases as the node-suite tests and benchmarks use them (issue #13).

``onnx.backend.test.case.node.collect_testcases()`` builds every node case of the installed
onnx. A case is *in scope* unless its op belongs to one of the families in ``OUT_OF_SCOPE``
(each with its reason); function-body expansions (``*_expanded*``) test compositions of the
same primitives and are left out, so every in-scope case is one node of the op under test.

Inputs that real exports carry as constants (integer tensors after the first input: axes,
pads, shapes, sizes, repeats, k, indices; and empty tensors) are frozen into initializers
(``frozen_case``), since QIR takes axes-like operands as attributes. ``check_outputs``
compares a run's outputs with the case's: integers, booleans and fp8/fp4 codes exactly,
floats to the tolerance of their type.

Shared by tests/test_onnx_node_suite.py (target ``ref``), tests/test_onnx_node_suite_cpu.py
and benchmarks/onnx_node_suite_cpu.py (target ``cpu``).
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from qcompiler.frontends.onnx import _elem_of

# Op families outside the suite's scope: (reason, predicate on "domain.op" / "op").
OUT_OF_SCOPE = {
    "training": ("optimizers of ai.onnx.preview.training: not inference",
                 lambda op: op.startswith("ai.onnx.preview.training.")),
    "classical-ml": ("ai.onnx.ml (trees, label encoders ...): not a tensor compiler's work",
                     lambda op: op.startswith("ai.onnx.ml.")),
    "string": ("string tensors: QIR has no string type",
               lambda op: op in ("StringConcat", "StringNormalizer", "StringSplit",
                                 "RegexFullMatch", "TfIdfVectorizer")),
    "sequence/optional": ("sequence and optional values: QIR values are tensors",
                          lambda op: op.startswith(("Sequence", "Optional"))
                          or op in ("SplitToSequence", "ConcatFromSequence")),
    "random": ("random generators: no reproducible expected output",
               lambda op: op in ("Bernoulli", "RandomNormal", "RandomUniform",
                                 "RandomNormalLike", "RandomUniformLike", "Multinomial")),
    "control-flow": ("subgraphs (If, Loop, Scan): QIR functions are straight-line",
                     lambda op: op in ("If", "Loop", "Scan")),
    "loss": ("training losses", lambda op: op in ("NegativeLogLikelihoodLoss",
                                                  "SoftmaxCrossEntropyLoss")),
    "signal": ("signal processing (DFT, STFT, windows, mel matrices)",
               lambda op: op in ("DFT", "STFT", "BlackmanWindow", "HammingWindow",
                                 "HannWindow", "MelWeightMatrix")),
    "detection": ("detection post-processing", lambda op: op in ("NonMaxSuppression",
                                                                 "RoiAlign")),
    "image-decoding": ("encoded image bytes", lambda op: op == "ImageDecoder"),
}


def op_names(model: onnx.ModelProto) -> set[str]:
    return {f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            for n in model.graph.node}


def out_of_scope_family(model: onnx.ModelProto) -> str | None:
    for family, (_, pred) in OUT_OF_SCOPE.items():
        if any(pred(op) for op in op_names(model)):
            return family
    return None


def collect() -> tuple[dict, dict]:
    """({name: case} of every non-expanded case, {name: case} of the in-scope ones)."""
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():  # building all node cases warns about some ops
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases()
    all_cases, in_scope = {}, {}
    for c in cases:
        if "_expanded" in c.name:
            continue
        all_cases[c.name] = c
        if out_of_scope_family(c.model) is None:
            in_scope[c.name] = c
    return all_cases, in_scope


def storage(x, vi) -> np.ndarray:
    """An ONNX value as QIR stores it (ml_dtypes int4/uint4/int2/uint2 → int8/uint8 codes)."""
    arr = numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)
    dtype = _elem_of(vi.type.tensor_type.elem_type, vi.name).np_dtype
    return np.asarray(arr).astype(dtype, order="C")


def tolerance(dtype: np.dtype, case) -> tuple[float, float]:
    if dtype.itemsize <= 2:  # f16, bf16
        return 1e-2, 1e-3
    return max(case.rtol, 1e-5), max(case.atol, 1e-6)


def is_float(dtype: np.dtype) -> bool:
    return not (np.issubdtype(dtype, np.integer) or dtype == np.bool_)


def is_parameter(vi, x, position: int) -> bool:
    """An input that real exports carry as a constant: an integer tensor after the first
    input (axes, pads, shapes, sizes, repeats, k, indices) or an empty one. QIR takes axes-like
    operands as attributes, so the case is compiled with these frozen into initializers."""
    arr = numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)
    return position > 0 and (arr.size == 0 or arr.dtype in (np.int64, np.int32))


def frozen_case(case) -> tuple[onnx.ModelProto, dict]:
    """The case's model with its parameter inputs as initializers, and the feeds of the rest."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, _ = case.data_sets[0]
    g = model.graph
    feeds, keep = {}, []
    for i, (vi, x) in enumerate(zip(list(g.input), inputs)):
        if is_parameter(vi, x, i):
            arr = numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)
            g.initializer.append(numpy_helper.from_array(arr, vi.name))
        else:
            keep.append(vi)
            feeds[vi.name] = storage(x, vi)
    del g.input[:]
    g.input.extend(keep)
    return model, feeds


def check_outputs(name: str, case, model: onnx.ModelProto, got: dict) -> None:
    """Assert that ``got`` (output name -> array) holds the case's expected outputs."""
    _, outputs = case.data_sets[0]
    for vi, y in zip(model.graph.output, outputs):
        want = storage(y, vi)
        g = got[vi.name]
        assert g.dtype == want.dtype, f"{vi.name}: dtype {g.dtype}, expected {want.dtype}"
        assert g.shape == want.shape, f"{vi.name}: shape {g.shape}, expected {want.shape}"
        if is_float(want.dtype) and want.dtype.itemsize > 1:
            rtol, atol = tolerance(want.dtype, case)
            np.testing.assert_allclose(g.astype(np.float64), want.astype(np.float64),
                                       rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=f"{name} {vi.name}")
        elif is_float(want.dtype):  # fp8 / fp4 codes: equal values, NaN equal to NaN
            assert np.array_equal(g.astype(np.float64), want.astype(np.float64),
                                  equal_nan=True), f"{vi.name}: {g} != {want}"
        else:
            assert np.array_equal(g, want), f"{vi.name}: {g} != {want}"


ALL_CASES, CASES = collect()
