"""ONNX Resize (no antialias) compiled for ``cpu`` against the ``ref`` target, on axes that
keep their size at a scale other than 1.

The reference leaves an axis alone only at scale 1 (within 1e-9): 4 -> 4 at scale 1.1 still
moves every position by 1 / 1.1. Constant scales decide it at compile time; scales fed at run
time (the output size declared) give such an axis a pass of its own that copies its input
where the fed scale is 1. The kernel-level cases are in ``test_cpu_ops.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import check_onnx_model_on_cpu, nonzero_normal, onnx_model  # noqa: E402


def _onnx_model():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    feeds = {"x": nonzero_normal(rng, (2, 4, 5, 4)).astype(np.float32),
             "fed": np.asarray([1.2, 1.0, 1.6, 1.0], np.float32)}
    inits = [numpy_helper.from_array(np.asarray([1, 1.1, 1.6, 2.5], np.float32), "widen"),
             numpy_helper.from_array(np.asarray([1.3, 1.2, 1, 1], np.float32), "same")]
    nodes = [helper.make_node("Resize", ["x", "", "widen"], ["linear"], mode="linear"),
             helper.make_node("Resize", ["x", "", "same"], ["nearest"], mode="nearest"),
             helper.make_node("Resize", ["x", "", "widen"], ["cubic"], mode="cubic",
                              exclude_outside=1),
             helper.make_node("Resize", ["x", "", "fed"], ["by_fed"], mode="cubic")]
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, [2, 4, 5, 4]),
              helper.make_tensor_value_info("fed", f32, [4])]
    outputs = [helper.make_tensor_value_info("linear", f32, [2, 4, 8, 10]),
               helper.make_tensor_value_info("nearest", f32, [2, 4, 5, 4]),
               helper.make_tensor_value_info("cubic", f32, [2, 4, 8, 10]),
               helper.make_tensor_value_info("by_fed", f32, [2, 4, 8, 4])]
    return onnx_model("resize_same_size", nodes, inputs, outputs, inits, opset=19), feeds


def test_resize_of_an_axis_that_keeps_its_size_at_another_scale(tmp_path):
    # float64 sums in another order than the reference's passes: equal to f32 rounding
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_resize", kernel_count=4,
                            output_count=4, tolerance=(1e-6, 1e-6))


def test_fed_scales_that_contradict_the_declared_output_size_are_refused(tmp_path):
    """The declared output of by_fed is [2, 4, 8, 4]; scales fed at run time that give
    another size (int(2.0 * 5) = 10 rows) stop the run with an error naming the node, not a
    result of the compiled size computed with them. Scales that agree still run."""
    import qcompiler
    from qcompiler.errors import InputError
    from qcompiler.targets import get_target

    if not get_target("cpu").available:
        pytest.skip("the cpu target is not available here")
    model, feeds = _onnx_model()
    compiled = qcompiler.compile(model, target="cpu", output_dir=str(tmp_path / "out"),
                                 jobs=1, progress=False)
    agree = {**feeds, "fed": np.asarray([1.3, 1.0, 1.7, 1.05], np.float32)}
    want = qcompiler.compile(model, "ref").run(agree)["by_fed"]
    np.testing.assert_allclose(compiled.run(agree)["by_fed"], want, rtol=1e-6, atol=1e-6)
    for _ in range(2):  # (the second run replays the bound calls)
        with pytest.raises(InputError, match=r"%by_fed = resize: the scales fed at run time "
                                             r"\[1.2.*, 1.0, 2.0, 1.0\] give an output of "
                                             r"shape \[2, 4, 10, 4\], but the model declares "
                                             r"\[2, 4, 8, 4\]"):
            compiled.run({**feeds, "fed": np.asarray([1.2, 1.0, 2.0, 1.0], np.float32)})
