"""The CPU ``recurrent`` kernel (codegen/cpu/recurrent.py: ONNX RNN / GRU / LSTM) against the
reference implementation.

Kernel level: one op library holds a recurrent node per configuration (each kind and
direction, bias, sequence_lens of int32 and int64 with entries 0, short and full, initial
states, peepholes, clip, linear_before_reset, every activation with its alpha / beta, layout 1,
symbolic seq / batch, f16 / bf16 / f64); each runs on fresh random inputs (no zeros) into
result buffers filled with garbage and is compared with ``OP_IMPLS["recurrent"]``. Model level:
an ONNX model of RNN / GRU / LSTM nodes compiled for ``cpu`` through ``qcompiler.compile``
runs every node as a compiled kernel (no host fallback) and matches the ``ref`` target.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from cpu_kernel_check import (HALF_FLOAT_TOLERANCE, KernelGraph, aligned,  # noqa: E402
                              by_operand_type, build_kernels, check_nodes, check_onnx_model_on_cpu,
                              nonzero_normal, onnx_model, run_kernel)
from qcompiler.codegen.cpu.backend import CPUBackendError  # noqa: E402
from qcompiler.codegen.cpu.ops import primfunc_for  # noqa: E402
from qcompiler.codegen.cpu.runtime import aligned_empty  # noqa: E402
from qcompiler.ir.core import Function  # noqa: E402
from qcompiler.ir.ops import RECURRENT_GATES  # noqa: E402
from qcompiler.ir.types import tensor  # noqa: E402
from qcompiler.runtime.reference import OP_IMPLS  # noqa: E402

DEFAULT_ACTS = {"rnn": ["tanh"], "gru": ["sigmoid", "tanh"],
                "lstm": ["sigmoid", "tanh", "tanh"]}
# sizes of the symbolic configurations: seq and batch
SIZES = ({"seq": 7, "batch": 5}, {"seq": 2, "batch": 3})
# per result dtype: (rtol, atol); the kernel sums its products in another order than numpy's
# BLAS, so f32 differs by rounding
TOLERANCE = {"f32": (2e-5, 2e-6), "f64": (1e-12, 1e-13), **HALF_FLOAT_TOLERANCE}


class Graph(KernelGraph):
    def __init__(self):
        super().__init__("recurrent")

    def add(self, key, kind, direction="forward", seq=5, batch=3, inputs=4, hidden=3,
            layout=0, dtype="f32", bias=True, lens=None, initial_h=False, initial_c=False,
            peepholes=False, acts=None, alpha=None, beta=None, clip=0.0, lbr=0):
        """A recurrent node of ``kind``; ``lens``: the sequence_lens dtype (None: none)."""
        fn = self.fn
        dirs = 2 if direction == "bidirectional" else 1
        gh = RECURRENT_GATES[kind] * hidden
        acts = acts or DEFAULT_ACTS[kind] * dirs
        state = [batch, dirs, hidden] if layout else [dirs, batch, hidden]

        def arg(shape, dt=dtype):
            return fn.add_arg(fn.fresh_name("a"), tensor(shape, dt))

        x = arg([batch, seq, inputs] if layout else [seq, batch, inputs])
        operands = [x, arg([dirs, gh, inputs]), arg([dirs, gh, hidden]),
                    arg([dirs, 2 * gh]) if bias else None,
                    arg([batch], lens) if lens else None,
                    arg(state) if initial_h else None,
                    arg(state) if initial_c else None,
                    arg([dirs, 3 * hidden]) if peepholes else None]
        while operands[-1] is None:
            operands.pop()
        y = [batch, seq, dirs, hidden] if layout else [seq, dirs, batch, hidden]
        results = [tensor(y, dtype), tensor(state, dtype)]
        if kind == "lstm":
            results.append(tensor(state, dtype))
        attrs = {"kind": kind, "direction": direction, "hidden_size": hidden, "layout": layout,
                 "activations": ",".join(acts),
                 "activation_alpha": alpha or [0.0] * len(acts),
                 "activation_beta": beta or [0.0] * len(acts),
                 "clip": clip, "linear_before_reset": lbr}
        return self.add_node(key, "recurrent", operands, results, attrs)


def _make_graph() -> Graph:
    g = Graph()
    # every kind in every direction, with sequence_lens (0, short and full entries)
    for kind in ("rnn", "gru", "lstm"):
        for direction in ("forward", "reverse", "bidirectional"):
            g.add("kinds", kind, direction, lens="i32", initial_h=True,
                  initial_c=kind == "lstm")
        g.add("kinds", kind, "forward", bias=False)                 # defaults
        g.add("kinds", kind, "bidirectional", batch=1, bias=False)  # one pair per direction
    # options
    g.add("options", "gru", "forward", lbr=1, lens="i64", initial_h=True)
    g.add("options", "gru", "bidirectional", lbr=1, clip=0.8, lens="i32")
    g.add("options", "gru", "reverse", clip=1.5, lens="i32")
    g.add("options", "lstm", "bidirectional", lens="i32", initial_h=True, initial_c=True,
          peepholes=True)
    g.add("options", "lstm", "reverse", peepholes=True, clip=0.9)
    g.add("options", "rnn", "forward", clip=0.5, initial_h=True)
    # every activation with its alpha / beta (bidirectional: each direction its own)
    g.add("acts", "rnn", "bidirectional", acts=["relu", "tanh"], lens="i32")
    g.add("acts", "lstm", "forward", acts=["hardsigmoid", "scaledtanh", "tanh"],
          alpha=[0.3, 0.8, 0.0], beta=[0.45, 1.2, 0.0])
    g.add("acts", "gru", "bidirectional", acts=["sigmoid", "affine", "hardsigmoid", "elu"],
          alpha=[0.0, 0.7, 0.25, 0.9], beta=[0.0, 0.1, 0.5, 0.0], lens="i32")
    g.add("acts", "rnn", "bidirectional", acts=["leakyrelu", "thresholdedrelu"],
          alpha=[0.1, 0.2], beta=[0.0, 0.0], initial_h=True)
    g.add("acts", "lstm", "bidirectional",
          acts=["sigmoid", "softsign", "softplus", "hardsigmoid", "elu", "relu"],
          alpha=[0.0, 0.0, 0.0, 0.2, 1.1, 0.0], beta=[0.0, 0.0, 0.0, 0.5, 0.0, 0.0],
          lens="i32", peepholes=True)
    # layout 1 ([batch, seq, ...])
    g.add("layout", "rnn", "reverse", layout=1, lens="i32", initial_h=True)
    g.add("layout", "gru", "bidirectional", layout=1, lens="i32", initial_h=True)
    g.add("layout", "lstm", "bidirectional", layout=1, lens="i32", initial_h=True,
          initial_c=True, peepholes=True)
    # symbolic seq and batch: one kernel for every size
    g.add("symbolic", "lstm", "bidirectional", seq="seq", batch="batch", lens="i32",
          initial_h=True, initial_c=True, peepholes=True)
    g.add("symbolic", "gru", "reverse", seq="seq", batch="batch", layout=1, lens="i32")
    g.add("symbolic", "rnn", "forward", seq="seq", batch="batch", inputs=40, hidden=24)
    # other float types (compute in float32, f64 in float64)
    for dtype in ("f16", "bf16", "f64"):
        g.add("dtypes", "lstm", "bidirectional", dtype=dtype, lens="i32", initial_h=True,
              initial_c=True, peepholes=True)
        g.add("dtypes", "gru", "reverse", dtype=dtype, lens="i32")
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_kernels(_make_graph(), tmp_path_factory, "recurrent")


def _lens(batch: int, seq: int, dtype) -> np.ndarray:
    """Short, 0, full and 1 step in turn (a reversed or unmasked kernel gives other Y)."""
    pattern = [max(seq - 2, 1), 0, seq, 1]
    return np.asarray([pattern[b % 4] for b in range(batch)], dtype)


def _inputs(node, sizes, rng) -> list:
    args = []
    for i, v in enumerate(node.operands):
        if v is None:
            args.append(None)
            continue
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in v.type.shape)
        dtype = v.type.dtype.np_dtype
        if i == 4:  # sequence_lens
            x = node.operands[0].type.shape
            seq = x[1] if node.attrs["layout"] else x[0]
            args.append(_lens(shape[0], sizes.get(seq, seq), dtype))
            continue
        args.append(nonzero_normal(rng, shape, 0.7 if i == 0 else 0.5).astype(dtype))
    return args




# a test per group of _make_graph: (key, sizes of the symbolic dims, seed of the inputs)
@pytest.mark.parametrize("key, sizes_list, seed", [
    pytest.param("kinds", ({},), 0, id="every_kind_and_direction"),
    # linear_before_reset, clip, int64 sequence_lens, peepholes, initial states
    pytest.param("options", ({},), 1, id="options"),
    pytest.param("acts", ({},), 2, id="activations_with_alpha_beta"),
    pytest.param("layout", ({},), 3, id="layout_batch_first"),
    pytest.param("symbolic", SIZES, 4, id="symbolic_seq_and_batch"),
    pytest.param("dtypes", ({},), 5, id="other_float_types"),
])
def test_matches_reference(built, key, sizes_list, seed):
    check_nodes(built, key, _inputs, by_operand_type(TOLERANCE), sizes_list, seed)


def test_kernel_follows_direction_and_lengths(built):
    """The reverse kernel with short sequence_lens matches the reference where a kernel that
    ran forwards, or ignored the lengths, could not: on these inputs the reference's own
    outputs for those differ."""
    node = next(n for n in built.graph.nodes["kinds"]
                if n.attrs["kind"] == "gru" and n.attrs["direction"] == "reverse")
    args = _inputs(node, {}, np.random.default_rng(6))
    outs, want = run_kernel(built, node, args)
    for got, w in zip(outs, want):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)
    forward = Function("f")
    operands = [forward.add_arg(f"a{i}", v.type) if v is not None else None
                for i, v in enumerate(node.operands)]
    fwd = forward.make_node("recurrent", operands, [r.type for r in node.results],
                            {**node.attrs, "direction": "forward"})
    want_fwd = OP_IMPLS["recurrent"](fwd, args, None)
    want_full = OP_IMPLS["recurrent"](node, args[:4] + [None] + args[5:], None)
    assert not np.allclose(want[0], want_fwd[0], rtol=1e-3, atol=1e-3)
    assert not np.allclose(want[0], want_full[0], rtol=1e-3, atol=1e-3)
    lens = args[4]
    assert (lens < node.operands[0].type.shape[0]).any() and (lens == 0).any()
    # past each entry's length Y is 0, and Y_h of a 0-length entry is its initial_h
    b0 = int(np.flatnonzero(lens == 0)[0])
    assert not outs[0][:, :, b0].any()
    np.testing.assert_array_equal(outs[1][:, b0], args[5][:, b0])


def test_sequence_lens_out_of_range_fails(built):
    node = next(n for n in built.graph.nodes["kinds"]
                if n.attrs["kind"] == "lstm" and n.attrs["direction"] == "forward")
    args = _inputs(node, {}, np.random.default_rng(7))
    args[4] = np.asarray([5, 6, 1], np.int32)  # seq is 5
    with pytest.raises(ValueError, match="sequence_lens"):
        OP_IMPLS["recurrent"](node, args, None)
    outs = [aligned_empty(r.type.shape, np.float32) for r in node.results]
    with pytest.raises(RuntimeError, match="sequence_lens"):
        built.lib[built.names[node.results[0].name]](
            *[aligned(a) for a in args if a is not None], *outs)


def test_refused_configurations_name_node_and_op():
    g = Graph()
    # integer x (not an ONNX RNN type): no kernel
    node = g.add("refused", "rnn", dtype="i32", bias=False)
    with pytest.raises(CPUBackendError, match=r"%\S+, %\S+ = recurrent: no CPU op kernel "
                                              r"\(x of i32"):
        primfunc_for(node)
    node = g.add("refused", "gru", layout=2)
    with pytest.raises(CPUBackendError, match=r"%\S+, %\S+ = recurrent: no CPU op kernel "
                                              r"\(layout 2"):
        primfunc_for(node)


# --------------------------------------------------------------------------------------------
# through qcompiler.compile: an ONNX model of RNN / GRU / LSTM nodes
# --------------------------------------------------------------------------------------------


def _onnx_model():
    """RNN / GRU / LSTM nodes over I = 5 inputs, H = 4 hidden, S = 6 steps, B = 3 entries;
    x and initial states fed, weights and some sequence_lens initializers, some fed."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    S, B, I, H = 6, 3, 5, 4
    inputs, inits, feeds, nodes, outputs = [], [], {}, [], []

    def feed(name, a):
        inputs.append(helper.make_tensor_value_info(
            name, TensorProto.INT32 if a.dtype == np.int32 else TensorProto.FLOAT, a.shape))
        feeds[name] = a
        return name

    def init(name, a):
        inits.append(numpy_helper.from_array(a, name))
        return name

    def normal(*shape, scale=0.5):
        return nonzero_normal(rng, shape, scale).astype(np.float32)

    def node(op, name, ins, n_out, **attrs):
        outs = [f"{name}_{o}" for o in ("y", "y_h", "y_c")[:n_out]]
        nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))
        d = 2 if attrs.get("direction") == "bidirectional" else 1
        shapes = ([[B, S, d, H], [B, d, H], [B, d, H]] if attrs.get("layout")
                  else [[S, d, B, H], [d, B, H], [d, B, H]])
        outputs.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, shape)
                       for o, shape in zip(outs, shapes))

    lens = np.array([6, 2, 0], np.int32)
    # RNN bidirectional, relu / tanh, bias, fed initial_h and sequence_lens
    node("RNN", "rnn", [feed("x0", normal(S, B, I, scale=0.7)), init("w0", normal(2, H, I)),
                        init("r0", normal(2, H, H)), init("b0", normal(2, 2 * H)),
                        feed("lens0", lens), feed("h0", normal(2, B, H))], 2,
         hidden_size=H, direction="bidirectional", activations=["Relu", "Tanh"])
    # GRU reverse, linear_before_reset, clip
    node("GRU", "gru", [feed("x1", normal(S, B, I, scale=1.0)),
                        init("w1", normal(1, 3 * H, I)), init("r1", normal(1, 3 * H, H)),
                        init("b1", normal(1, 6 * H)), init("lens1", np.array([5, 6, 2], np.int32))],
         2, hidden_size=H, direction="reverse", linear_before_reset=1, clip=1.5)
    # GRU bidirectional, batch first
    node("GRU", "gru_bf", [feed("x2", normal(B, S, I, scale=0.7)),
                           init("w2", normal(2, 3 * H, I)), init("r2", normal(2, 3 * H, H))],
         2, hidden_size=H, direction="bidirectional", layout=1)
    # LSTM bidirectional with peepholes, initial states, sequence_lens
    node("LSTM", "lstm", [feed("x3", normal(S, B, I, scale=0.7)),
                          init("w3", normal(2, 4 * H, I)), init("r3", normal(2, 4 * H, H)),
                          init("b3", normal(2, 8 * H)),
                          init("lens3", np.array([4, 6, 1], np.int32)),
                          feed("h3", normal(2, B, H)), feed("c3", normal(2, B, H)),
                          init("p3", normal(2, 3 * H))], 3,
         hidden_size=H, direction="bidirectional")
    # LSTM batch first with activation parameters
    node("LSTM", "lstm_bf", [feed("x4", normal(B, S, I, scale=0.7)),
                             init("w4", normal(1, 4 * H, I)), init("r4", normal(1, 4 * H, H))],
         3, hidden_size=H, layout=1, activations=["HardSigmoid", "ScaledTanh", "Tanh"],
         activation_alpha=[0.3, 0.8], activation_beta=[0.45, 1.2])
    return onnx_model("recurrent", nodes, inputs, outputs, inits, opset=21), feeds


def test_onnx_rnn_gru_lstm_compile_without_host_fallback(tmp_path):
    check_onnx_model_on_cpu(_onnx_model, tmp_path, "qc_recurrent_", kernel_count=5,
                            output_count=12, tolerance=(2e-5, 2e-6))
