"""The ONNX-coverage ops (issue #13) against onnxruntime on fresh random inputs.

ONNX's node cases (tests/test_onnx_node_suite.py) check each op on one fixed data set; here
each op family is imported from a single-node model, run through the ``ref`` pipeline and
the numpy reference, and compared with onnxruntime's CPU kernels on random data of odd shapes
(never zeros: normal * 2 with zeros moved off, or the op's domain). Integer-valued constant
inputs (axes, pads, shapes, repeats, k, indices of some ops) are initializers, as exports
carry them. Ops newer than the installed onnxruntime (opset 24+: SwiGLU, TensorScatter,
CausalConvWithState, LinearAttention, Attention's sliding windows) are compared with
onnx.reference instead. Integer and boolean outputs are compared exactly, floats to 1e-5
(onnxruntime's float32 libm and summation order differ from numpy's by a few ulp).
"""
from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompiler.driver.api import run_pipeline
from qcompiler.frontends.onnx import load
from qcompiler.runtime.reference import run
from qcompiler.targets import get_target

ort = pytest.importorskip("onnxruntime")

PIPELINE = get_target("ref").default_pipeline
ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.uint8): TensorProto.UINT8}


class Init:
    """An initializer input (a constant of the model)."""

    def __init__(self, array):
        self.array = np.asarray(array)


def normal(rng, *shape, scale=2.0, dtype=np.float32):
    x = rng.standard_normal(shape) * scale
    x[np.abs(x) < 1e-3] = 0.5  # never zeros
    return x.astype(dtype)


def uniform(rng, lo, hi, *shape, dtype=np.float32):
    return rng.uniform(lo, hi, shape).astype(dtype)


def ints(rng, lo, hi, *shape, dtype=np.int64):
    return rng.integers(lo, hi, shape, endpoint=True).astype(dtype)


# name -> (op_type, attrs, inputs(rng) -> list of arrays / Init / None, n_outputs, opset)
CASES: dict = {}


def case(name, op, inputs, attrs=None, outputs=1, opset=21, tol=1e-5):
    CASES[name] = (op, attrs or {}, inputs, outputs, opset, tol)


for _op in ("Cos", "Sin", "Atan", "Sinh", "Cosh", "Asinh", "Floor", "Ceil", "Round", "Sign",
            "Softsign", "Softplus", "Mish", "HardSwish"):
    case(_op.lower(), _op, lambda r: [normal(r, 3, 7, 5)])
case("tan", "Tan", lambda r: [uniform(r, -1.4, 1.4, 5, 9)])
for _op in ("Acos", "Asin", "Atanh"):
    case(_op.lower(), _op, lambda r: [uniform(r, -0.99, 0.99, 5, 9)])
case("acosh", "Acosh", lambda r: [uniform(r, 1.01, 9.0, 5, 9)])
case("log", "Log", lambda r: [uniform(r, 0.01, 20.0, 5, 9)])
case("sign_int", "Sign", lambda r: [ints(r, -5, 5, 4, 7, dtype=np.int32)])
case("round_halves", "Round", lambda r: [(ints(r, -9, 9, 5, 7) + 0.5).astype(np.float32)])
case("mish_f16", "Mish", lambda r: [normal(r, 3, 11, dtype=np.float16)], tol=2e-3)
for _op, _attrs in (("LeakyRelu", {"alpha": 0.07}), ("Elu", {"alpha": 0.6}), ("Selu", {}),
                    ("Celu", {"alpha": 1.7}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.45}),
                    ("ThresholdedRelu", {"alpha": 0.4}), ("Shrink", {"bias": 0.3, "lambd": 0.9})):
    case(_op.lower(), _op, lambda r: [normal(r, 3, 7, 5)], _attrs)
case("shrink_int", "Shrink", lambda r: [ints(r, -9, 9, 6, 5, dtype=np.int32)],
     {"bias": 2.0, "lambd": 3.0})
case("prelu", "PRelu", lambda r: [normal(r, 2, 5, 7), normal(r, 5, 1)])
case("isinf", "IsInf", lambda r: [np.where(r.random((5, 7)) < 0.3, np.inf,
                                           np.where(r.random((5, 7)) < 0.3, -np.inf,
                                                    normal(r, 5, 7))).astype(np.float32)],
     {"detect_positive": 0})
case("not", "Not", lambda r: [r.random((4, 9)) < 0.5])
case("xor", "Xor", lambda r: [r.random((4, 9)) < 0.5, r.random((9,)) < 0.5])
case("bitwise_not", "BitwiseNot", lambda r: [ints(r, -1000, 1000, 4, 9, dtype=np.int32)])
case("bitwise_and", "BitwiseAnd", lambda r: [ints(r, 0, 255, 4, 9, dtype=np.uint8),
                                              ints(r, 0, 255, 9, dtype=np.uint8)])
case("mod_python", "Mod", lambda r: [ints(r, -50, 50, 5, 6), ints(r, 1, 9, 6) *
                                     np.where(r.random(6) < 0.5, -1, 1)])
case("mod_fmod", "Mod", lambda r: [normal(r, 5, 6), uniform(r, 0.5, 3.0, 6)], {"fmod": 1})
case("bit_shift", "BitShift", lambda r: [ints(r, 0, 200, 5, 6, dtype=np.uint8),
                                         ints(r, 0, 3, 6, dtype=np.uint8)],
     {"direction": "LEFT"})
case("sum", "Sum", lambda r: [normal(r, 3, 1, 5), normal(r, 4, 1), normal(r, 5)])
case("mean", "Mean", lambda r: [normal(r, 3, 4, 5), normal(r, 4, 5)])
for _op in ("ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL1",
            "ReduceLogSumExp"):
    case(_op.lower(), _op, lambda r: [normal(r, 3, 5, 7, scale=0.8), Init([1, -1])],
         {"keepdims": 0}, opset=18)
case("reducelogsum", "ReduceLogSum", lambda r: [uniform(r, 0.1, 3.0, 3, 5, 7), Init([0])],
     opset=18)
case("argmax", "ArgMax", lambda r: [normal(r, 4, 7, 5)], {"axis": 1, "keepdims": 0})
case("argmin_last", "ArgMin", lambda r: [ints(r, -2, 2, 4, 9).astype(np.float32)],
     {"axis": -1, "select_last_index": 1})
case("cumsum", "CumSum", lambda r: [normal(r, 4, 7), Init(np.array(1))],
     {"exclusive": 1, "reverse": 1})
case("logsoftmax", "LogSoftmax", lambda r: [normal(r, 3, 5, 7)], {"axis": 1})
case("hardmax", "Hardmax", lambda r: [normal(r, 3, 5, 7)], {"axis": -1})
case("flatten", "Flatten", lambda r: [normal(r, 2, 3, 5, 7)], {"axis": 2})
case("tile", "Tile", lambda r: [normal(r, 3, 5), Init([2, 3])])
for _mode in ("constant", "reflect", "edge", "wrap"):
    case(f"pad_{_mode}", "Pad", lambda r: [normal(r, 4, 5), Init([1, 2, 2, 3])],
         {"mode": _mode})
case("pad_negative", "Pad", lambda r: [normal(r, 4, 7), Init([-1, 2, 1, -3])])
case("trilu", "Trilu", lambda r: [normal(r, 2, 5, 7), Init(np.array(-1))], {"upper": 1})
case("topk", "TopK", lambda r: [normal(r, 4, 11), Init([3])], {"axis": 1, "largest": 0},
     outputs=2)
case("einsum", "Einsum", lambda r: [normal(r, 2, 3, 5), normal(r, 2, 5, 7)],
     {"equation": "bij,bjk->bik"})
case("resize_linear", "Resize", lambda r: [normal(r, 1, 2, 5, 7), None,
                                          Init(np.array([1, 1, 1.6, 0.7], np.float32))],
     {"mode": "linear"})
case("resize_cubic", "Resize", lambda r: [normal(r, 1, 2, 5, 7), None, None,
                                         Init([1, 2, 9, 4])],
     {"mode": "cubic", "coordinate_transformation_mode": "align_corners"})
case("resize_nearest", "Resize", lambda r: [normal(r, 1, 2, 5, 7), None,
                                           Init(np.array([1, 1, 2.5, 1.5], np.float32))],
     {"mode": "nearest", "nearest_mode": "floor"})
case("onehot", "OneHot", lambda r: [ints(r, -5, 4, 3, 4), Init(np.array(5)),
                                    Init(np.array([0.25, 3.0], np.float32))], {"axis": 1})
case("nonzero", "NonZero", lambda r: [(r.random((4, 7)) < 0.4).astype(np.float32)])
case("scatternd_add", "ScatterND", lambda r: [normal(r, 5, 7), Init([[1], [3], [1]]),
                                              normal(r, 3, 7)], {"reduction": "add"})
case("scatterelements_max", "ScatterElements",
     lambda r: [normal(r, 4, 7), Init(np.array([[1, 5], [0, 6], [2, 2], [3, 0]])),
                normal(r, 4, 2)], {"axis": 1, "reduction": "max"})
case("depthtospace", "DepthToSpace", lambda r: [normal(r, 2, 12, 3, 5)],
     {"blocksize": 2, "mode": "CRD"})
case("spacetodepth", "SpaceToDepth", lambda r: [normal(r, 2, 3, 4, 6)], {"blocksize": 2})
case("eyelike", "EyeLike", lambda r: [normal(r, 5, 7)], {"k": -2})
case("compress", "Compress", lambda r: [normal(r, 4, 7),
                                        Init(np.array([1, 0, 1, 1, 0, 0, 1], bool))],
     {"axis": 1})
case("instancenorm", "InstanceNormalization", lambda r: [normal(r, 2, 3, 5, 7), normal(r, 3),
                                                          normal(r, 3)])
case("groupnorm", "GroupNormalization", lambda r: [normal(r, 2, 6, 5), normal(r, 6),
                                                   normal(r, 6)], {"num_groups": 3})
case("batchnorm", "BatchNormalization", lambda r: [normal(r, 2, 3, 5), normal(r, 3),
                                                   normal(r, 3), normal(r, 3),
                                                   uniform(r, 0.5, 2.0, 3)])
case("batchnorm_training", "BatchNormalization",
     lambda r: [normal(r, 3, 4, 5), normal(r, 4), normal(r, 4), normal(r, 4),
                uniform(r, 0.5, 2.0, 4)], {"training_mode": 1, "momentum": 0.7}, outputs=3)
case("mvn", "MeanVarianceNormalization", lambda r: [normal(r, 2, 3, 5, 7)])
case("lpnorm", "LpNormalization", lambda r: [normal(r, 3, 7)], {"p": 1, "axis": 0})
case("lpnorm_zero_slice", "LpNormalization",  # one all-zero column: 0, not 0 / 0
     lambda r: [normal(r, 3, 7) * (np.arange(7) != 4)], {"p": 2, "axis": 0})
case("lrn", "LRN", lambda r: [normal(r, 2, 7, 3, 5)], {"size": 3, "alpha": 0.02})
case("conv", "Conv", lambda r: [normal(r, 2, 4, 9, 7), normal(r, 6, 2, 3, 2), normal(r, 6)],
     {"group": 2, "strides": [2, 1], "pads": [1, 0, 1, 1], "dilations": [1, 2]}, tol=1e-4)
case("conv_transpose", "ConvTranspose", lambda r: [normal(r, 2, 3, 5, 4),
                                                   normal(r, 3, 2, 3, 3)],
     {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}, tol=1e-4)
case("deform_conv", "DeformConv",
     lambda r: [normal(r, 2, 4, 7, 6), normal(r, 6, 2, 3, 2), normal(r, 2, 2 * 6 * 2, 4, 5),
                normal(r, 6), uniform(r, 0.2, 1.0, 2, 2 * 6, 4, 5)],
     {"group": 2, "offset_group": 2, "strides": [2, 1], "pads": [1, 1, 1, 0],
      "dilations": [1, 2]}, opset=22, tol=1e-4)
case("maxpool", "MaxPool", lambda r: [normal(r, 2, 3, 9, 7)],
     {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
     outputs=2)
case("averagepool", "AveragePool", lambda r: [normal(r, 2, 3, 9, 7)],
     {"kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 1, 1, 1],
      "count_include_pad": 0})
case("lppool", "LpPool", lambda r: [normal(r, 2, 3, 9, 7)], {"kernel_shape": [2, 3], "p": 2})
case("globalmaxpool", "GlobalMaxPool", lambda r: [normal(r, 2, 3, 5, 7)])
case("rotary", "RotaryEmbedding", lambda r: [normal(r, 2, 3, 5, 8), normal(r, 2, 5, 4),
                                             normal(r, 2, 5, 4)], {"interleaved": 1},
     opset=23)
case("attention_gqa_causal", "Attention",
     lambda r: [normal(r, 2, 4, 5, 8, scale=0.5), normal(r, 2, 2, 7, 8, scale=0.5),
                normal(r, 2, 2, 7, 6), normal(r, 5, 9, scale=0.5), normal(r, 2, 2, 2, 8),
                normal(r, 2, 2, 2, 6)], {"is_causal": 1}, outputs=3, opset=23, tol=1e-4)
case("attention_softcap_3d", "Attention",
     lambda r: [normal(r, 2, 5, 12), normal(r, 2, 7, 12), normal(r, 2, 7, 9)],
     {"q_num_heads": 3, "kv_num_heads": 3, "softcap": 2.5}, opset=23, tol=1e-4)
# the ops that arrived with the 90% step
for _mode, _pad, _align in (("linear", "zeros", 0), ("nearest", "border", 1),
                            ("cubic", "reflection", 0), ("linear", "reflection", 1),
                            ("cubic", "border", 1)):
    case(f"gridsample_{_mode}_{_pad}_{_align}", "GridSample",
         lambda r: [normal(r, 2, 3, 5, 7), uniform(r, -1.3, 1.3, 2, 4, 6, 2)],
         {"mode": _mode, "padding_mode": _pad, "align_corners": _align}, opset=20, tol=1e-4)
case("gridsample_3d", "GridSample",
     lambda r: [normal(r, 1, 2, 3, 5, 4), uniform(r, -1.1, 1.1, 1, 2, 3, 4, 3)],
     {"mode": "linear", "padding_mode": "border"}, opset=20, tol=1e-4)
case("affinegrid", "AffineGrid", lambda r: [normal(r, 2, 2, 3), Init([2, 3, 5, 7])],
     {"align_corners": 0}, opset=20)
case("affinegrid_3d", "AffineGrid", lambda r: [normal(r, 2, 3, 4), Init([2, 1, 3, 5, 4])],
     {"align_corners": 1}, opset=20)
case("unique_sorted", "Unique", lambda r: [ints(r, -4, 4, 13).astype(np.float32)],
     {"sorted": 1}, outputs=4)
case("unique_unsorted", "Unique", lambda r: [ints(r, -4, 4, 13).astype(np.float32)],
     {"sorted": 0}, outputs=4)
case("unique_axis", "Unique", lambda r: [ints(r, 0, 1, 7, 2).astype(np.float32)],
     {"sorted": 1, "axis": 0}, outputs=4)
case("reversesequence", "ReverseSequence", lambda r: [normal(r, 6, 4, 3), Init([6, 1, 3, 0])],
     {"batch_axis": 1, "time_axis": 0})
case("reversesequence_batch0", "ReverseSequence", lambda r: [normal(r, 3, 5),
                                                              Init([2, 5, 1])],
     {"batch_axis": 0, "time_axis": 1})
case("col2im", "Col2Im", lambda r: [normal(r, 2, 12, 9), Init([5, 6]), Init([2, 3])],
     {"strides": [2, 2], "pads": [1, 0, 0, 1], "dilations": [1, 1]})
case("centercroppad", "CenterCropPad", lambda r: [normal(r, 5, 8, 3), Init([8, 5])],
     {"axes": [0, 1]}, opset=18)
case("det", "Det", lambda r: [normal(r, 3, 4, 4)], tol=1e-4)
case("maxunpool", "MaxUnpool", lambda r: [normal(r, 1, 2, 2, 3),
                                          Init(np.array([[[[0, 3, 4], [13, 10, 17]],
                                                          [[20, 22, 26], [31, 33, 35]]]]))],
     {"kernel_shape": [2, 2], "strides": [2, 2]})

# recurrent ops: I = 5 inputs, H = 4 hidden, S = 6 steps, B = 3 batch entries
case("rnn_seq_lens", "RNN",
     lambda r: [normal(r, 6, 3, 5, scale=0.7), normal(r, 1, 4, 5, scale=0.5),
                normal(r, 1, 4, 4, scale=0.5), normal(r, 1, 8), np.array([6, 2, 4], np.int32),
                normal(r, 1, 3, 4)],
     {"hidden_size": 4}, outputs=2, tol=1e-4)
case("rnn_bidirectional_relu", "RNN",
     lambda r: [normal(r, 6, 3, 5, scale=0.7), normal(r, 2, 4, 5, scale=0.5),
                normal(r, 2, 4, 4, scale=0.5)],
     {"hidden_size": 4, "direction": "bidirectional", "activations": ["Relu", "Tanh"]},
     outputs=2, tol=1e-4)
case("gru_linear_before_reset", "GRU",
     lambda r: [normal(r, 6, 3, 5, scale=0.7), normal(r, 1, 12, 5, scale=0.5),
                normal(r, 1, 12, 4, scale=0.5), normal(r, 1, 24), np.array([3, 6, 1], np.int32)],
     {"hidden_size": 4, "linear_before_reset": 1}, outputs=2, tol=1e-4)
case("gru_reverse_clip", "GRU",
     lambda r: [normal(r, 6, 3, 5), normal(r, 1, 12, 5), normal(r, 1, 12, 4), normal(r, 1, 24),
                np.array([5, 6, 2], np.int32)],
     {"hidden_size": 4, "direction": "reverse", "clip": 1.5}, outputs=2, tol=1e-4)
case("lstm_bidirectional_seq_lens", "LSTM",
     lambda r: [normal(r, 6, 3, 5, scale=0.7), normal(r, 2, 16, 5, scale=0.5),
                normal(r, 2, 16, 4, scale=0.5), normal(r, 2, 32), np.array([4, 6, 1], np.int32),
                normal(r, 2, 3, 4), normal(r, 2, 3, 4), normal(r, 2, 12)],
     {"hidden_size": 4, "direction": "bidirectional"}, outputs=3, tol=1e-4)
case("lstm_activation_params", "LSTM",
     lambda r: [normal(r, 6, 3, 5, scale=0.7), normal(r, 1, 16, 5, scale=0.5),
                normal(r, 1, 16, 4, scale=0.5)],
     {"hidden_size": 4, "activations": ["HardSigmoid", "ScaledTanh", "Tanh"],
      "activation_alpha": [0.3, 0.8], "activation_beta": [0.45, 1.2]}, outputs=3, tol=1e-4)

# ops newer than this onnxruntime (opset 24+): checked against onnx.reference instead
NEWER_THAN_ORT: set = set()


def newer(name, *args, **kw):
    case(name, *args, **kw)
    NEWER_THAN_ORT.add(name)


newer("swiglu", "SwiGLU", lambda r: [normal(r, 3, 7), normal(r, 3, 7)], {"alpha": 1.3},
      opset=28)
newer("tensorscatter_circular", "TensorScatter",
      lambda r: [normal(r, 2, 3, 7, 4), normal(r, 2, 3, 3, 4), np.array([5, 1], np.int64)],
      {"mode": "circular", "axis": 2}, opset=24)
newer("causal_conv_silu_past", "CausalConvWithState",
      lambda r: [normal(r, 2, 5, 7), normal(r, 5, 1, 3), normal(r, 5), normal(r, 2, 5, 2)],
      {"activation": "silu"}, outputs=2, opset=27)
newer("causal_conv_no_past", "CausalConvWithState",
      lambda r: [normal(r, 2, 3, 6), normal(r, 3, 1, 4)], outputs=2, opset=27)
for _rule, _extra in (("linear", lambda r: []),
                      ("gated", lambda r: [normal(r, 2, 5, 2, scale=0.3)]),
                      ("delta", lambda r: [None, uniform(r, 0.1, 0.9, 2, 5, 2)]),
                      ("gated_delta", lambda r: [normal(r, 2, 5, 2 * 3, scale=0.3),
                                                 uniform(r, 0.1, 0.9, 2, 5, 1)])):
    newer(f"linear_attention_{_rule}", "LinearAttention",
          lambda r, extra=_extra: [normal(r, 2, 5, 4 * 3), normal(r, 2, 5, 2 * 3),
                                   normal(r, 2, 5, 2 * 4), normal(r, 2, 2, 3, 4)] + extra(r),
          {"q_num_heads": 4, "kv_num_heads": 2, "update_rule": _rule}, outputs=2, opset=27,
          tol=1e-4)
newer("attention_window_nonpad_causal", "Attention",
      lambda r: [normal(r, 2, 3, 4, 8, scale=0.5), normal(r, 2, 3, 9, 8, scale=0.5),
                 normal(r, 2, 3, 9, 5), None, None, None, np.array([7, 9], np.int64)],
      {"is_causal": 1, "left_window_size": 3}, opset=25, tol=1e-4)
newer("attention_bidirectional_window_past", "Attention",
      lambda r: [normal(r, 2, 3, 4, 8, scale=0.5), normal(r, 2, 3, 4, 8, scale=0.5),
                 normal(r, 2, 3, 4, 5), normal(r, 4, 9, scale=0.5),
                 normal(r, 2, 3, 5, 8, scale=0.5), normal(r, 2, 3, 5, 5)],
      {"left_window_size": 2, "right_window_size": 1}, outputs=3, opset=25, tol=1e-4)


def _model(name) -> tuple[onnx.ModelProto, dict]:
    op, attrs, make_inputs, n_out, opset, _ = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    arrays = make_inputs(rng)
    names, inputs, inits, feeds = [], [], [], {}
    for i, a in enumerate(arrays):
        if a is None:
            names.append("")
            continue
        nm = f"in{i}"
        names.append(nm)
        if isinstance(a, Init):
            inits.append(numpy_helper.from_array(a.array, nm))
        else:
            a = np.asarray(a)
            inputs.append(helper.make_tensor_value_info(nm, ONNX_TYPES[a.dtype], a.shape))
            feeds[nm] = a
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph([node], name, inputs,
                              [helper.make_value_info(o, onnx.TypeProto()) for o in outs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)  # what this onnxruntime reads
    return onnx.shape_inference.infer_shapes(model), feeds  # the output types


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_onnxruntime(name):
    model, feeds = _model(name)
    tol = CASES[name][5]
    if name in NEWER_THAN_ORT:
        want = ReferenceEvaluator(model).run(None, feeds)
    else:
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        want = sess.run(None, feeds)
    module, _, _ = run_pipeline(load(model), PIPELINE, verify_each=True)
    got = run(module, feeds)
    for vi, w in zip(model.graph.output, want):
        g = got[vi.name]
        assert g.shape == w.shape, f"{name} {vi.name}: shape {g.shape}, onnxruntime {w.shape}"
        assert g.dtype == w.dtype, f"{name} {vi.name}: dtype {g.dtype}, onnxruntime {w.dtype}"
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol,
                                       atol=tol, err_msg=f"{name} {vi.name}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{name} {vi.name}")
