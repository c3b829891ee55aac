"""ONNX's backend node cases through the ``cpu`` target (issue #13), a bounded sample.

The whole in-scope suite (tests/onnx_node_cases.py) through ``cpu`` takes minutes: that is
benchmarks/onnx_node_suite_cpu.py (both rates: correct, and correct with every op compiled).
Here a fixed sample across the op families is compiled with ``allow_host_fallback=True``
(one build cache for the module), run on the case's first data set and compared like the ref
suite. Each sample case must pass; its report's host-fallback list must be empty unless the
case is in ``EXPECTED_FALLBACKS`` (the ops that still run in the host interpreter, each with
its reason), where exactly those ops must still fall back (strict: a new kernel removes the
entry).
"""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("tvm")

import qcompiler  # noqa: E402
from onnx_node_cases import CASES, check_outputs, frozen_case  # noqa: E402

# the compile's warning about each host fallback: asserted through the report instead
pytestmark = pytest.mark.filterwarnings("ignore:host fallback:RuntimeWarning")

SAMPLE = [
    # elementwise, casts, comparisons
    "test_abs", "test_add_bcast", "test_div", "test_pow", "test_sigmoid", "test_erf",
    "test_gelu_tanh_1", "test_leakyrelu", "test_clip", "test_isinf", "test_mean_example",
    "test_cast_FLOAT_to_FLOAT16", "test_castlike_FLOAT_to_DOUBLE", "test_equal",
    "test_cast_FLOAT_to_FLOAT8E4M3FN", "test_cast_FLOAT8E5M2_to_FLOAT",
    "test_bitcast_2d_float32_to_int32",
    "test_where_example", "test_prelu_broadcast",
    # integer / logical
    "test_bitshift_right_uint16", "test_bitwise_and_i16_3d", "test_mod_mixed_sign_int32",
    "test_xor_bcast3v1d",
    # reductions, normalizations, scans
    "test_reduce_max_default_axes_keepdim_example",
    "test_reduce_log_sum_exp_do_not_keepdims_random",
    "test_reduce_mean_default_axes_keepdims_random", "test_reduce_sum_keepdims_random",
    "test_argmax_keepdims_example_select_last_index", "test_argmin_no_keepdims_random",
    "test_cumsum_1d_reverse_exclusive", "test_softmax_axis_1", "test_logsoftmax_axis_1",
    "test_hardmax_example", "test_layer_normalization_4d_axis1", "test_rms_normalization_2d_axis1",
    # data movement
    "test_transpose_default", "test_concat_3d_axis_1", "test_slice", "test_gather_0",
    "test_gather_elements_0", "test_reshape_reordered_all_dims", "test_expand_dim_changed",
    "test_split_equal_parts_1d_opset18", "test_tile", "test_edge_pad", "test_reflect_pad",
    "test_wrap_pad", "test_tril", "test_triu_neg", "test_eyelike_with_dtype", "test_shape",
    "test_range_float_type_positive_delta", "test_scatter_elements_with_duplicate_indices",
    "test_reversesequence_batch", "test_rotary_embedding_interleaved",
    # matmul, attention
    "test_matmul_3d", "test_attention_4d", "test_onehot_with_axis",
    # fully masked rows: zero output rows (the fused op's result fixed up by the frontend)
    "test_attention_23_boolmask_fullymasked_row_nan_robustness",
    "test_attention_causal_boolmask_nan_robustness",
    "test_einsum_batch_matmul", "test_einsum_batch_diagonal", "test_top_k_same_values_2d",
    "test_scatternd_add", "test_tensorscatter_circular",
    "test_resize_upsample_scales_nearest", "test_resize_downsample_scales_cubic",
    "test_resize_tf_crop_and_resize", "test_resize_downsample_scales_linear_antialias",
    # pooling and convolution
    "test_maxpool_with_argmax_2d_precomputed_pads", "test_maxpool_3d_dilations",
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True",
    "test_lppool_2d_pads", "test_lrn", "test_conv_with_strides_and_asymmetric_padding",
    "test_convinteger_with_padding", "test_causal_conv_with_state_decode_step",
    "test_convtranspose", "test_convtranspose_output_shape",
    # quantization: per-axis / blocked / float8 / float4 / 16-bit Q/DQ, dynamic, integer
    # matmuls (codegen/cpu/qdq.py, qlinear.py)
    "test_quantizelinear_axis", "test_quantizelinear_blocked_asymmetric",
    "test_quantizelinear_e4m3fn", "test_quantizelinear_int4",
    "test_dequantizelinear_e4m3fn_zero_point", "test_dequantizelinear_float4e2m1",
    "test_dequantizelinear_uint16", "test_dynamicquantizelinear_min_adjusted",
    "test_qlinearmatmul_3D_uint8_float16", "test_matmulinteger",
    # recurrent (codegen/cpu/recurrent.py)
    "test_lstm_defaults",
    # still host fallbacks (EXPECTED_FALLBACKS)
]

# sample case -> (the ops the report lists as host fallbacks, why)
EXPECTED_FALLBACKS: dict[str, tuple[set, str]] = {
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("node_suite_cpu_cache"))


def test_sample_is_in_scope():
    missing = [n for n in SAMPLE if n not in CASES]
    assert not missing, f"not in-scope node cases of this onnx: {missing}"
    assert set(EXPECTED_FALLBACKS) <= set(SAMPLE)


@pytest.mark.parametrize("name", SAMPLE)
def test_node_case_on_cpu(name, cache_dir, tmp_path):
    case = CASES[name]
    model, feeds = frozen_case(case)
    out_dir = str(tmp_path / "out")
    compiled = qcompiler.compile(model, target="cpu", output_dir=out_dir, cache=cache_dir,
                                 jobs=1, progress=False, allow_host_fallback=True)
    with open(os.path.join(out_dir, "report.json")) as f:
        fallback_ops = {fb["op"] for fb in json.load(f)["host_fallback"]}
    check_outputs(name, case, model, compiled.run(feeds))
    expected, why = EXPECTED_FALLBACKS.get(name, (set(), ""))
    assert fallback_ops == expected, (
        f"{name}: host fallbacks {sorted(fallback_ops)}, expected {sorted(expected)}"
        + (f" ({why})" if why else "") + "; update EXPECTED_FALLBACKS when a kernel lands")
