"""The CPU ``resize`` kernel with antialias (codegen/cpu/ops/compute.py: ONNX Resize,
antialias=1) against the reference implementation.

Kernel level: one op library holds a resize node per configuration (linear and cubic; ONNX's
node cases; downscales by 0.6 to 0.1, whose filters span 4 to 40 taps; upscales, where the
filter is the plain one normalized; scales and sizes, keep_aspect_ratio_policy, axes; every
coordinate transformation, exclude_outside, cubic_coeff_a, tf_crop_and_resize's roi and
extrapolation; taps summed along the innermost axis, where numpy adds them pairwise, and
along outer ones; f16 / bf16 / f64 and integer types, rounded and clipped); each runs on
fresh random inputs into a result buffer filled with garbage and must equal
``OP_IMPLS["resize"]`` exactly (the kernel's passes are the reference's operations in its
order). nearest ignores antialias, as the reference. Model level: an ONNX model of Resize
nodes with antialias compiled for ``cpu`` through ``qcompiler.compile`` runs every node as a
compiled kernel (no host fallback) and matches the ``ref`` target.

Scales may also come at run time (ONNX's node cases feed them): the kernel then provides for
each footprint of the scales that give the output size and takes the scale's; nodes of fed
scales (and rois) run at several scales each.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import (KernelGraph, build_kernels, check_nodes,  # noqa: E402
                              check_onnx_model_on_cpu, nonzero_normal, onnx_model)
from qcompiler.codegen.cpu.backend import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import primfunc_for  # noqa: E402
from qcompiler.codegen.cpu.ops.compute import _antialias_footprint  # noqa: E402
from qcompiler.ir.core import constant_node  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402

ATTRS = {"mode": "linear", "coordinate_transformation_mode": "half_pixel",
         "nearest_mode": "round_prefer_floor", "cubic_coeff_a": -0.75, "exclude_outside": 0,
         "extrapolation_value": 0.0, "antialias": 1, "axes": [],
         "keep_aspect_ratio_policy": "stretch"}


class Graph(KernelGraph):
    def __init__(self):
        super().__init__("resize_antialias")

    def const(self, values, dtype):
        return constant_node(self.fn, self.module, np.asarray(values, dtype)).result

    def add(self, key, shape, out, scales=None, sizes=None, roi=None, dtype="f32",
            **attrs):
        """A resize node of x ``shape`` to ``out`` by constant ``scales`` or ``sizes`` (over
        attrs' axes), with a constant ``roi``."""
        return self.add_with(key, shape, out, dtype, [
            None if roi is None else self.const(roi, np.float32),
            None if scales is None else self.const(scales, np.float32),
            None if sizes is None else self.const(sizes, np.int64)], attrs)

    def add_run_time(self, key, shape, out, scales: list, rois=None, **attrs):
        """A resize node of x ``shape`` to ``out`` whose scales (and roi) are arguments: the
        test runs it with each of ``scales`` (and ``rois``)."""
        fn = self.fn
        roi = None if rois is None else \
            fn.add_arg(fn.fresh_name("roi"), tensor([len(rois[0])], "f32"))
        node = self.add_with(key, shape, out, "f32", [
            roi, fn.add_arg(fn.fresh_name("scales"), tensor([len(scales[0])], "f32"))],
            attrs)
        RUN_TIME_VALUES[node.results[0].name] = (scales, rois)
        return node

    def add_with(self, key, shape, out, dtype, operands, attrs):
        operands = [self.fn.add_arg(self.fn.fresh_name("x"), tensor(shape, dtype))] + operands
        while operands[-1] is None:
            operands.pop()
        return self.add_node(key, "resize", operands, [tensor(out, dtype)],
                             {**ATTRS, **attrs})


# a run-time node's result -> (its scales, its rois or None), one pair per call
RUN_TIME_VALUES: dict = {}


def _make_graph() -> Graph:
    g = Graph()
    for mode in ("linear", "cubic"):
        # ONNX's node cases: scales 0.6 and sizes 3 x 3 of a 4 x 4 image
        g.add("modes", [1, 1, 4, 4], [1, 1, 2, 2], scales=[1, 1, 0.6, 0.6], mode=mode)
        g.add("modes", [1, 1, 4, 4], [1, 1, 3, 3], sizes=[1, 1, 3, 3], mode=mode)
        # a wide footprint along both axes (40 cubic taps at 0.1: summed pairwise along the
        # last axis), an upscale (the plain filter, normalized), an upscale with a downscale
        g.add("modes", [2, 3, 30, 41], [2, 3, 3, 10], scales=[1, 1, 0.1, 0.25], mode=mode)
        g.add("modes", [1, 2, 5, 4], [1, 2, 10, 10], scales=[1, 1, 2.0, 2.5], mode=mode)
        g.add("modes", [2, 17, 6], [2, 7, 9], scales=[1, 0.45, 1.5], mode=mode)
        # sizes over axes (negative too), each policy
        g.add("modes", [3, 20, 13], [3, 6, 13], sizes=[6], axes=[1], mode=mode)
        g.add("modes", [2, 19, 23, 2], [2, 5, 23, 2], sizes=[5], axes=[-3], mode=mode)
        # an outer axis with only dims of 1 after it: numpy sums its taps pairwise too
        g.add("modes", [2, 40, 1], [2, 9, 1], scales=[1, 0.23, 1], mode=mode)
        g.add("modes", [1, 1, 12, 16], [1, 1, 6, 8], sizes=[7, 8], axes=[2, 3], mode=mode,
              keep_aspect_ratio_policy="not_larger")
        g.add("modes", [1, 1, 12, 16], [1, 1, 9, 12], sizes=[7, 12], axes=[2, 3], mode=mode,
              keep_aspect_ratio_policy="not_smaller")
    # every coordinate transformation, exclude_outside, cubic_coeff_a
    for ctm in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                "half_pixel_symmetric"):
        for mode in ("linear", "cubic"):
            g.add("coordinates", [2, 11, 13], [2, 5, 4], scales=[1, 0.5, 0.35], mode=mode,
                  coordinate_transformation_mode=ctm)
        g.add("coordinates", [1, 14, 9], [1, 3, 12], sizes=[3, 12], axes=[1, 2],
              mode="cubic", coordinate_transformation_mode=ctm, exclude_outside=1)
    g.add("coordinates", [2, 9, 10], [2, 1, 3], sizes=[1, 3], axes=[1, 2], mode="linear",
          coordinate_transformation_mode="pytorch_half_pixel")  # one output row: x = -0.5
    g.add("coordinates", [1, 12, 15], [1, 4, 4], sizes=[4, 4], axes=[1, 2], mode="cubic",
          cubic_coeff_a=-0.5, exclude_outside=1)
    # tf_crop_and_resize: a roi inside and one reaching past the image (extrapolated)
    g.add("coordinates", [1, 10, 12], [1, 4, 6], scales=[0.4, 0.5], axes=[1, 2],
          roi=[0.1, 0.2, 0.9, 0.7], coordinate_transformation_mode="tf_crop_and_resize")
    g.add("coordinates", [1, 10, 12], [1, 5, 3], sizes=[5, 3], axes=[1, 2], mode="cubic",
          roi=[-0.2, 0.3, 1.1, 0.9], coordinate_transformation_mode="tf_crop_and_resize",
          extrapolation_value=-3.5)
    # other types: floats, integers rounded half to even and clipped (cubic overshoots)
    for dtype in ("f16", "bf16", "f64", "u8", "i8", "i16", "i32"):
        g.add("dtypes", [2, 9, 14], [2, 4, 6], scales=[1, 0.5, 0.45], mode="cubic",
              dtype=dtype)
    g.add("dtypes", [2, 9, 14], [2, 4, 6], sizes=[2, 4, 6], mode="linear", dtype="u8")
    # nearest: the reference ignores antialias (the plain kernel)
    g.add("nearest", [1, 2, 9, 8], [1, 2, 4, 3], scales=[1, 1, 0.5, 0.4], mode="nearest")
    # scales read at run time: the footprint is one of those of the scales that give the
    # output size (4 -> 2: 6 or 8 cubic taps; 9 -> 4 and 7 -> 3: 4 or 6 linear ones)
    g.add_run_time("run_time", [1, 1, 4, 4], [1, 1, 2, 2], mode="cubic", scales=[
        [1, 1, 0.5, 0.5], [1, 1, 0.6, 0.74], [1, 1, 0.74, 0.55]])
    g.add_run_time("run_time", [1, 2, 9, 7], [1, 2, 4, 3], exclude_outside=1, scales=[
        [1, 1, 0.45, 0.43], [1, 1, 0.5, 0.5], [1, 1, 0.55, 0.56]])
    # an axis of the same size at a scale other than 1: the reference resizes it; at 1 it
    # leaves it alone (so do the batch and channel axes)
    g.add_run_time("run_time", [2, 3, 4, 6], [2, 3, 4, 3], mode="cubic", scales=[
        [1, 1, 1.2, 0.5], [1, 1, 1.0, 0.5], [1, 1, 1.1, 0.55]])
    # a roi (unused by half_pixel): an axis of scale 1 is left alone only with the whole roi
    g.add_run_time("run_time", [2, 5, 6], [2, 5, 3], scales=[[1, 1, 0.5]] * 3,
                   rois=[[0, 0, 0, 1, 1, 1], [0, 0.1, 0, 1, 0.9, 1], [0, 0, 0, 1, 1, 1.2]])
    # tf_crop_and_resize's roi, scales at run time
    g.add_run_time("run_time", [1, 10, 12], [1, 4, 6], axes=[1, 2],
                   coordinate_transformation_mode="tf_crop_and_resize",
                   scales=[[0.4, 0.5], [0.45, 0.55], [0.48, 0.53]],
                   rois=[[0.1, 0.2, 0.9, 0.7], [-0.2, 0.3, 1.1, 0.9], [0, 0, 1, 1]])
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_kernels(_make_graph(), tmp_path_factory, "resize_antialias")


def _inputs(node, sizes, rng) -> list:
    """Random x (normal floats; integers over the type's range, so cubic's overshoots clip),
    then the roi, scales, sizes: constants, or a run-time node's call ``sizes["call"]``."""
    scales, rois = RUN_TIME_VALUES.get(node.results[0].name, (None, None))
    args = []
    for i, v in enumerate(node.operands):
        if v is None:
            args.append(None)
        elif i > 0 and scales is not None:
            values = (rois if i == 1 else scales)[sizes["call"]]
            args.append(np.asarray(values, np.float32))
        elif i > 0:
            args.append(np.asarray(v.producer.attrs["value"]))
        else:
            dtype = v.type.dtype.np_dtype
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                args.append(rng.integers(info.min, info.max, v.type.shape, dtype=dtype,
                                         endpoint=True))
            else:
                args.append(nonzero_normal(rng, v.type.shape).astype(dtype))
    return args


# exact: the same float64 operations in the same order, one rounding to the result type
@pytest.mark.parametrize("key, seed", [
    pytest.param("modes", 0, id="linear_cubic_scales_sizes_policies"),
    pytest.param("coordinates", 1, id="coordinate_modes_exclude_outside_roi"),
    pytest.param("dtypes", 2, id="float_and_integer_types"),
    pytest.param("nearest", 3, id="nearest_ignores_antialias"),
])
def test_matches_reference(built, key, seed):
    check_nodes(built, key, _inputs, None, seed=seed)


def test_run_time_scales(built):
    """Each run-time node at each of its scales (every footprint taken), exactly."""
    check_nodes(built, "run_time", _inputs, None, [{"call": c} for c in range(3)], seed=4)


def test_footprints():
    """The filter's taps: 2 / 4 at scales >= 1, growing as 2 / s (linear) and 4 / s (cubic)."""
    scales = (2.0, 1.0, 0.6, 0.25, 0.1)
    assert [_antialias_footprint("linear", s) for s in scales] == [2, 2, 4, 8, 20]
    assert [_antialias_footprint("cubic", s) for s in scales] == [4, 4, 8, 16, 40]


def test_refused_configurations_name_node_and_op():
    g = Graph()
    # scales at run time that may need any of many footprints (100 -> 1: a scale in
    # [0.01, 0.02), a filter of 200 to 400 cubic taps)
    node = g.add_run_time("refused", [1, 1, 100, 4], [1, 1, 1, 2], scales=[[1, 1, 0.01, 0.5]],
                          mode="cubic")
    with pytest.raises(CPUBackendError, match=r"%\S+ = resize: no CPU op kernel \(resize "
                                              r"antialias with run-time scales of 100 -> 1"):
        primfunc_for(node, module=g.module)
    # a roi whose length is not two per axis
    fn = g.fn
    node = g.add_with("refused", [1, 1, 8, 8], [1, 1, 4, 4], "f32", [
        fn.add_arg("roi3", tensor([3], "f32")), g.const([1, 1, 0.5, 0.5], np.float32)], {})
    with pytest.raises(CPUBackendError, match=r"resize: no CPU op kernel \(resize roi of "
                                              r"shape \(3,\) for 4 axes"):
        primfunc_for(node, module=g.module)


# --------------------------------------------------------------------------------------------
# through qcompiler.compile: an ONNX model of Resize nodes with antialias
# --------------------------------------------------------------------------------------------


def _onnx_model():
    """Resize with antialias of one image: linear by scales, cubic by sizes (exclude_outside),
    a linear upscale along one axis fed on into an Add, cubic by fed scales."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    feeds = {"x": nonzero_normal(rng, (2, 3, 16, 20)).astype(np.float32),
             "fed": np.asarray([1, 1, 0.5, 0.4], np.float32)}
    inits = [numpy_helper.from_array(np.asarray([1, 1, 0.3, 0.55], np.float32), "down"),
             numpy_helper.from_array(np.asarray([5, 7], np.int64), "small"),
             numpy_helper.from_array(np.asarray([1.5], np.float32), "up")]
    nodes = [helper.make_node("Resize", ["x", "", "down"], ["linear"], mode="linear",
                              antialias=1),
             helper.make_node("Resize", ["x", "", "", "small"], ["cubic"], mode="cubic",
                              antialias=1, axes=[2, 3], exclude_outside=1),
             helper.make_node("Resize", ["x", "", "up"], ["wider"], mode="linear",
                              antialias=1, axes=[3]),
             helper.make_node("Add", ["wider", "wider"], ["wider_twice"]),
             helper.make_node("Resize", ["x", "", "fed"], ["by_fed"], mode="cubic",
                              antialias=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 20]),
              helper.make_tensor_value_info("fed", TensorProto.FLOAT, [4])]
    outputs = [helper.make_tensor_value_info("linear", TensorProto.FLOAT, [2, 3, 4, 11]),
               helper.make_tensor_value_info("cubic", TensorProto.FLOAT, [2, 3, 5, 7]),
               helper.make_tensor_value_info("wider_twice", TensorProto.FLOAT, [2, 3, 16, 30]),
               helper.make_tensor_value_info("by_fed", TensorProto.FLOAT, [2, 3, 8, 8])]
    return onnx_model("resize_antialias", nodes, inputs, outputs, inits, opset=19), feeds


def test_onnx_resize_antialias_compiles_without_host_fallback(tmp_path):
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_resize_", kernel_count=4,
                            output_count=4)
