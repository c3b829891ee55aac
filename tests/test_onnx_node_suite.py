"""ONNX's own backend node cases, through import + the ``ref`` target's default pipeline + the
numpy reference runtime (issue #13).

``onnx.backend.test.case.node.collect_testcases()`` builds every node case of the installed
onnx. A case is *in scope* unless its op belongs to one of the families in ``OUT_OF_SCOPE``
(each with its reason); function-body expansions (``*_expanded*``) test compositions of the
same primitives and are left out, so every in-scope case is one node of the op under test.

Each in-scope case is imported, run through the default pipeline (verified after every
pass) and executed on its first data set; the outputs are compared with the case's expected
ones: integers, booleans and fp8/fp4 codes exactly, floats to the tolerance of their type.
``EXPECTED_FAILURES`` lists the cases that do not pass, each with its reason; the test
asserts that each of them still fails (strict) and that the pass rate over the in-scope
cases stays at the floor (``FLOOR``; issue #13's goal is 90%). Run this file as a script for
a per-op table of failures, or with name patterns to run single cases.

Inputs that real exports carry as constants (integer tensors after the first input: axes,
pads, shapes, sizes, repeats, k, indices; and empty tensors) are frozen into initializers,
since QIR takes axes-like operands as attributes.
"""
from __future__ import annotations

import re
import sys

import pytest

from onnx_node_cases import ALL_CASES, CASES, check_outputs, frozen_case
from onnx_node_cases import op_names as _op_names
from qcompiler.driver.api import run_pipeline
from qcompiler.frontends.onnx import load
from qcompiler.runtime.reference import run
from qcompiler.targets import get_target

PIPELINE = get_target("ref").default_pipeline
# Issue #13 asks for 90% of the in-scope cases; 96.8% pass (the floor: 96%); the rest is
# the cases listed in EXPECTED_FAILURES (FlexAttention, Cast's undefined int4 wrap, FLOAT8E8M0,
# random Dropout masks ...). Raise it as they land.
GOAL_OF_ISSUE = 0.90
FLOOR = 0.96

# The scope (OUT_OF_SCOPE), the case collection, the freezing of parameter inputs and the
# comparison are shared with the cpu suite: tests/onnx_node_cases.py.

# --------------------------------------------------------------------------------------------
# the cases that do not pass, each with its reason
# --------------------------------------------------------------------------------------------

# Cast's spec (opsets 21-25) leaves float -> fixed point out of range undefined (`saturate`
# covers float8 only): onnx.reference wraps these, QIR's cast saturates as for int8.
CAST_OUT_OF_RANGE = ("float to int4/uint4/int2/uint2 out of range: undefined in the spec; "
                     "onnx.reference wraps, QIR's cast saturates (documented in reference.py)")

EXPECTED_FAILURES: dict[str, str] = {
    'test_cast_FLOAT16_to_INT2': CAST_OUT_OF_RANGE,
    'test_cast_FLOAT16_to_INT4': CAST_OUT_OF_RANGE,
    'test_cast_FLOAT16_to_UINT2': CAST_OUT_OF_RANGE,
    'test_cast_FLOAT16_to_UINT4': CAST_OUT_OF_RANGE,
    'test_cast_FLOAT_to_INT2': CAST_OUT_OF_RANGE,
    'test_cast_FLOAT_to_INT4': CAST_OUT_OF_RANGE,
    'test_cast_FLOAT_to_UINT2': CAST_OUT_OF_RANGE,
    'test_cast_FLOAT_to_UINT4': CAST_OUT_OF_RANGE,
    'test_cast_e8m0_FLOAT16_to_FLOAT8E8M0': "FLOAT8E8M0 is not a QIR element type",
    'test_cast_e8m0_FLOAT8E8M0_to_FLOAT': "FLOAT8E8M0 is not a QIR element type",
    'test_cast_e8m0_FLOAT8E8M0_to_FLOAT16': "FLOAT8E8M0 is not a QIR element type",
    'test_cast_e8m0_FLOAT_to_FLOAT8E8M0': "FLOAT8E8M0 is not a QIR element type",
    'test_castlike_FLOAT16_to_INT2': CAST_OUT_OF_RANGE,
    'test_castlike_FLOAT16_to_INT4': CAST_OUT_OF_RANGE,
    'test_castlike_FLOAT16_to_UINT2': CAST_OUT_OF_RANGE,
    'test_castlike_FLOAT16_to_UINT4': CAST_OUT_OF_RANGE,
    'test_castlike_FLOAT_to_INT2': CAST_OUT_OF_RANGE,
    'test_castlike_FLOAT_to_INT4': CAST_OUT_OF_RANGE,
    'test_castlike_FLOAT_to_UINT2': CAST_OUT_OF_RANGE,
    'test_castlike_FLOAT_to_UINT4': CAST_OUT_OF_RANGE,
    'test_equal_string': 'string tensors: QIR has no string type',
    'test_equal_string_broadcast': 'string tensors: QIR has no string type',
    'test_flexattention': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_causal_mask': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_diff_head_sizes': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_double': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_fp16': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_gqa': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_prob_mod': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_relative_positional': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_scaled': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_score_mod': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_flexattention_soft_cap': 'ai.onnx.preview FlexAttention (a graph-valued score_mod) is not imported',
    'test_identity_opt': 'optional / sequence values through Identity: QIR values are tensors',
    'test_identity_sequence': 'optional / sequence values through Identity: QIR values are tensors',
    'test_training_dropout': "training_mode=True: random mask, expected output depends on onnx's seed",
    'test_training_dropout_default': "training_mode=True: random mask, expected output depends on onnx's seed",
    'test_training_dropout_default_mask': "training_mode=True: random mask, expected output depends on onnx's seed",
    'test_training_dropout_mask': "training_mode=True: random mask, expected output depends on onnx's seed",
}

# --------------------------------------------------------------------------------------------
# running one case
# --------------------------------------------------------------------------------------------


def check_case(name: str) -> None:
    """Import, run the default pipeline, run the reference; assert the case's outputs."""
    case = CASES[name]
    model, feeds = frozen_case(case)
    module, _, _ = run_pipeline(load(model), PIPELINE, verify_each=True)
    check_outputs(name, case, model, run(module, feeds))


def _passes(name: str) -> bool:
    try:
        check_case(name)
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------


def test_scope_and_expected_failures_are_consistent():
    assert set(EXPECTED_FAILURES) <= set(CASES), sorted(set(EXPECTED_FAILURES) - set(CASES))
    passing = len(CASES) - len(EXPECTED_FAILURES)
    rate = passing / len(CASES)
    print(f"\nONNX node suite on ref: {passing} of {len(CASES)} in-scope cases "
          f"({rate:.1%}); {len(ALL_CASES) - len(CASES)} cases out of scope")
    if rate < GOAL_OF_ISSUE:
        print(f"below the issue's goal of {GOAL_OF_ISSUE:.0%}")
    assert rate >= FLOOR, f"pass rate {rate:.1%} is below the floor {FLOOR:.0%}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_node_case(name):
    if name in EXPECTED_FAILURES:
        assert not _passes(name), f"{name} passes now: drop it from EXPECTED_FAILURES"
        return
    check_case(name)


def _report() -> None:
    """Per-op table of the failing cases (``python tests/test_onnx_node_suite.py``)."""
    import collections

    failures = collections.defaultdict(list)
    for name in sorted(CASES):
        try:
            check_case(name)
        except Exception as e:
            op = "+".join(sorted(_op_names(CASES[name].model)))
            failures[op].append((name, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
    failed = sum(len(v) for v in failures.values())
    for op, items in sorted(failures.items()):
        print(f"{op}: {len(items)}")
        for name, msg in items:
            print(f"    {name}: {msg}")
    print(f"passed {len(CASES) - failed} of {len(CASES)}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        for pattern in sys.argv[1:]:
            for name in sorted(CASES):
                if re.search(pattern, name):
                    try:
                        check_case(name)
                        print("ok  ", name)
                    except Exception as e:
                        print("FAIL", name, type(e).__name__, " ".join(str(e).split())[:300])
    else:
        _report()
