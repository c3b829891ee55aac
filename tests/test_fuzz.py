"""Seeded mutations of valid inputs for the bad-input fuzz test.

Every case is a function of its seed alone: ``onnx_case(seed)`` / ``qir_case(seed)`` give the
mutated model bytes / IR text and what was done to them, ``run_inputs_case(seed)`` a mutated
``run()`` input dict. ``outcome(fn)`` runs one case under a time limit and classifies it:

- ``ok``: compiled (and ran, where the inputs could be made);
- ``refused``: a ``QCompilerError`` whose message is one line under 400 characters;
- ``uncontrolled``: any other exception, a multi-line or overlong message, or a hang.

    python tests/test_fuzz.py 1000        # a long local run; prints the outcome counts
"""
from __future__ import annotations

import copy
import functools
import os
import random
import re
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "fuzz_corpus")
CASE_SECONDS = 10.0       # per-case limit: a case past it is a hang
MAX_MESSAGE = 400
MAX_RUN_ELEMENTS = 1 << 20  # inputs bigger than this are not made (the harness's memory)


# --------------------------------------------------------------------------------------------
# the seeds: valid models
# --------------------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits, opsets=(("", 21),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 10
    return m


def _pack_lsb_first(codes: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    codes = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce(codes << (np.arange(per, dtype=np.uint8) * bits), axis=-1)


def matmul_nbits_model(bits=4, block=16, K=40, N=8, zp="packed", g_idx=False,
                       bias=True) -> onnx.ModelProto:
    """A[batch, K] → MatMulNBits (ragged K) → Relu: small, every optional operand."""
    rng = np.random.default_rng(bits * 100 + block)
    nblk = -(-K // block)
    codes = rng.integers(0, 1 << bits, (N, nblk * block), dtype=np.uint8)
    B = _pack_lsb_first(codes, bits).reshape(N, nblk, block * bits // 8)
    inits = [numpy_helper.from_array(B, "B"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, (N, nblk)).astype(np.float32), "S")]
    ins = ["A", "B", "S"]
    if zp == "packed":
        z = rng.integers(0, 1 << bits, (N, nblk), dtype=np.uint8)
        inits.append(numpy_helper.from_array(_pack_lsb_first(z, bits), "Z"))
        ins.append("Z")
    elif zp == "float":
        inits.append(numpy_helper.from_array(
            rng.uniform(0, (1 << bits) - 1, (N, nblk)).astype(np.float32), "Z"))
        ins.append("Z")
    else:
        ins.append("")
    if g_idx:
        inits.append(numpy_helper.from_array(rng.permutation(np.arange(K) // block)
                                             .astype(np.int32), "G"))
        ins.append("G")
    else:
        ins.append("")
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "bias"))
        ins.append("bias")
    while ins[-1] == "":
        ins.pop()
    nodes = [helper.make_node("MatMulNBits", ins, ["mm"], name="mnb0", domain="com.microsoft",
                              K=K, N=N, bits=bits, block_size=block),
             helper.make_node("Relu", ["mm"], ["y"], name="relu0")]
    return _model(nodes, [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", K])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], inits,
                  opsets=(("", 21), ("com.microsoft", 1)))


def qdq_model() -> onnx.ModelProto:
    """x → QuantizeLinear → DequantizeLinear → MatMul(DQ(per-axis int8 W)) → Softmax,
    with a Reshape / Transpose / Concat / Split / Gather / Slice tail."""
    rng = np.random.default_rng(7)
    f32 = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(rng.integers(-127, 128, (6, 4), dtype=np.int8), "W"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, 4).astype(np.float32), "Ws"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        numpy_helper.from_array(np.array([1, 3], np.int64), "idx"),
        numpy_helper.from_array(np.array([0], np.int64), "st"),
        numpy_helper.from_array(np.array([2], np.int64), "en"),
        numpy_helper.from_array(np.array([1], np.int64), "ax"),
        numpy_helper.from_array(np.array([2, 2], np.int64), "sizes"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q0"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq0"),
        helper.make_node("DequantizeLinear", ["W", "Ws"], ["Wd"], name="dqw", axis=1),
        helper.make_node("MatMul", ["xd", "Wd"], ["mm"], name="mm0"),
        helper.make_node("Softmax", ["mm"], ["sm"], name="sm0", axis=-1),
        helper.make_node("Transpose", ["sm"], ["t"], name="tr0", perm=[1, 0]),
        helper.make_node("Split", ["t", "sizes"], ["s0", "s1"], name="split0", axis=0),
        helper.make_node("Concat", ["s1", "s0"], ["c"], name="cat0", axis=0),
        helper.make_node("Gather", ["c", "idx"], ["g"], name="gather0", axis=0),
        helper.make_node("Slice", ["g", "st", "en", "ax"], ["sl"], name="slice0"),
        helper.make_node("Reshape", ["sl", "shape"], ["y"], name="reshape0"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", f32, [4, 6])],
                  [helper.make_tensor_value_info("y", f32, None)], inits)


@functools.lru_cache(maxsize=None)
def seed_models() -> tuple[tuple[str, bytes], ...]:
    """(name, serialized model) of every valid model the mutations start from."""
    sys.path.insert(0, HERE)
    import onnx_models

    with open(os.path.join(ROOT, "examples", "mlp_int4.onnx"), "rb") as f:
        seeds = [("mlp_int4", f.read())]
    seeds += [
        ("float_mlp", onnx_models.float_mlp().SerializeToString()),
        ("mnb_b2_packed", matmul_nbits_model(bits=2, block=16).SerializeToString()),
        ("mnb_b4_float_gidx", matmul_nbits_model(bits=4, block=16, zp="float", g_idx=True)
         .SerializeToString()),
        ("mnb_b8_sym", matmul_nbits_model(bits=8, block=32, zp=None, bias=False)
         .SerializeToString()),
        ("qdq", qdq_model().SerializeToString()),
    ]
    return tuple(seeds)


@functools.lru_cache(maxsize=None)
def seed_qir_texts() -> tuple[tuple[str, str, str], ...]:
    """(name, IR text, stage) for each seed model: as imported and after the ref pipeline."""
    from qcompiler.driver.api import run_pipeline
    from qcompiler.frontends.onnx import load
    from qcompiler.ir import print_module
    from qcompiler.targets import get_target

    out = []
    for name, data in seed_models():
        module = load(data)
        out.append((name, print_module(module), "imported"))
        lowered, _, _ = run_pipeline(module, get_target("ref").default_pipeline)
        out.append((name, print_module(lowered), "ref"))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def seed_constants(name: str) -> dict:
    """The side table of a seed's module (the QIR text names its large constants)."""
    from qcompiler.driver.api import run_pipeline
    from qcompiler.frontends.onnx import load
    from qcompiler.targets import get_target

    data = dict(seed_models())[name]
    module = load(data)
    lowered, _, _ = run_pipeline(module, get_target("ref").default_pipeline)
    return {**module.constants, **lowered.constants}


# --------------------------------------------------------------------------------------------
# ONNX mutations
# --------------------------------------------------------------------------------------------

ODD_INTS = [-(1 << 40), -1, 0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 24, 31, 64, 257, 512, 1 << 20,
            1 << 31, 1 << 40]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))] if seq else None


def _m_mnb_attr(m, rng):
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"] or list(m.graph.node)
    n = _pick(rng, nodes)
    if n is None:
        return "no node"
    name = _pick(rng, ["bits", "block_size", "K", "N", "accuracy_level", "weight_prepacked"])
    value = _pick(rng, ODD_INTS)
    for a in n.attribute:
        if a.name == name:
            n.attribute.remove(a)
            break
    n.attribute.append(helper.make_attribute(name, value))
    return f"{n.name}.{name}={value}"


def _m_init_resize(m, rng):
    init = _pick(rng, list(m.graph.initializer))
    if init is None:
        return "no initializer"
    arr = numpy_helper.to_array(init)
    how = _pick(rng, ["drop", "add", "transpose", "tile", "flatten", "extra_dim", "empty",
                      "scalar"])
    if how == "drop" and arr.size:
        new = arr.reshape(-1)[:-1]
    elif how == "add":
        new = np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]])
    elif how == "transpose":
        new = arr.T.copy()
    elif how == "tile":
        new = np.tile(arr, 2)
    elif how == "flatten":
        new = arr.reshape(-1)
    elif how == "extra_dim":
        new = arr[None]
    elif how == "empty":
        new = arr.reshape(-1)[:0]
    else:
        new = arr.reshape(-1)[:1].reshape(())
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
    return f"{init.name}: {how} {arr.shape}->{new.shape}"


def _m_nan_values(m, rng):
    inits = [t for t in m.graph.initializer
             if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    init = _pick(rng, inits)
    if init is None:
        return "no float initializer"
    arr = numpy_helper.to_array(init).copy()
    flat = arr.reshape(-1)
    if flat.size:
        value = _pick(rng, [np.nan, np.inf, -np.inf, 0.0, 1e38, -1e-45])
        k = rng.randrange(flat.size)
        flat[k if rng.random() < 0.5 else slice(None)] = value
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return f"{init.name} gets non-finite / extreme values"


def _m_input_dim(m, rng):
    vi = _pick(rng, list(m.graph.input))
    if vi is None or not vi.type.tensor_type.shape.dim:
        return "no input dims"
    d = _pick(rng, list(vi.type.tensor_type.shape.dim))
    choice = rng.randrange(4)
    if choice == 0:
        d.dim_value = _pick(rng, [0, -1, -7, 1 << 40, 3])
    elif choice == 1:
        d.dim_param = _pick(rng, ["n", "batch", "K", "", "a b", "0"])
    elif choice == 2:
        vi.type.tensor_type.shape.dim.add().dim_value = 2
    else:
        del vi.type.tensor_type.shape.dim[-1]
    return f"input {vi.name} shape changed"


def _m_cycle(m, rng):
    nodes = list(m.graph.node)
    if len(nodes) < 2:
        return "too few nodes"
    first, last = nodes[0], nodes[-1]
    if first.input:
        first.input[0] = last.output[0]
    return f"{first.name} reads {last.output[0]} (a cycle)"


def _m_dup_names(m, rng):
    g = m.graph
    choice = rng.randrange(4)
    if choice == 0 and g.initializer:
        g.initializer.append(copy.deepcopy(_pick(rng, list(g.initializer))))
        return "duplicate initializer"
    if choice == 1 and len(g.node) >= 2:
        a, b = rng.sample(list(g.node), 2)
        a.output[0] = b.output[0]
        return f"{a.name} and {b.name} define {b.output[0]}"
    if choice == 2 and g.node and (g.input or g.initializer):
        n = _pick(rng, list(g.node))
        n.output[0] = _pick(rng, [v.name for v in g.input] + [t.name for t in g.initializer])
        return f"{n.name} redefines {n.output[0]}"
    if g.input:
        g.input.append(copy.deepcopy(g.input[0]))
        return "duplicate graph input"
    return "nothing to duplicate"


def _m_opsets(m, rng):
    choice = rng.randrange(4)
    if choice == 0:
        m.ir_version = _pick(rng, [0, 1, 2, 3, 13, 14, 15, 99])
        return f"ir_version {m.ir_version}"
    if choice == 1 and m.opset_import:
        o = _pick(rng, list(m.opset_import))
        o.version = _pick(rng, [0, 1, 6, 7, 13, 26, 28, 29, 99, 1 << 40])
        return f"opset {o.domain or 'ai.onnx'} {o.version}"
    if choice == 2:
        m.opset_import.append(helper.make_opsetid(_pick(rng, ["", "com.microsoft", "x.y"]),
                                                  _pick(rng, [1, 21, 99])))
        return "extra opset_import"
    del m.opset_import[:]
    return "no opset_import"


def _m_operands(m, rng):
    n = _pick(rng, list(m.graph.node))
    if n is None:
        return "no node"
    ins = list(n.input)
    choice = rng.randrange(5)
    if choice == 0:
        rng.shuffle(ins)
    elif choice == 1 and ins:
        del ins[rng.randrange(len(ins))]
    elif choice == 2 and ins:
        ins[rng.randrange(len(ins))] = ""
    elif choice == 3:
        ins.append(_pick(rng, ins) or "x")
    else:
        others = [o for k in m.graph.node for o in k.output] + [t.name for t in
                                                                 m.graph.initializer]
        if ins:
            ins[rng.randrange(len(ins))] = _pick(rng, others)
    del n.input[:]
    n.input.extend(ins)
    return f"{n.name} inputs -> {ins}"


def _m_nodes(m, rng):
    nodes = list(m.graph.node)
    if not nodes:
        return "no node"
    choice = rng.randrange(3)
    if choice == 0:
        del m.graph.node[rng.randrange(len(nodes))]
        return "node removed"
    if choice == 1 and len(nodes) >= 2:
        i, j = rng.sample(range(len(nodes)), 2)
        a, b = copy.deepcopy(nodes[i]), copy.deepcopy(nodes[j])
        m.graph.node[i].CopyFrom(b)
        m.graph.node[j].CopyFrom(a)
        return f"nodes {i} and {j} swapped"
    m.graph.node.append(copy.deepcopy(_pick(rng, nodes)))
    return "node duplicated"


def _m_dtype(m, rng):
    types = [TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32,
             TensorProto.INT64, TensorProto.FLOAT16, TensorProto.BOOL, TensorProto.STRING,
             TensorProto.INT4, TensorProto.DOUBLE, 0, 999]
    if rng.random() < 0.5 and m.graph.initializer:
        init = _pick(rng, list(m.graph.initializer))
        init.data_type = _pick(rng, types)  # the raw bytes stay: sizes no longer match
        return f"{init.name} data_type {init.data_type}"
    vi = _pick(rng, list(m.graph.input) + list(m.graph.output))
    if vi is None:
        return "no value"
    vi.type.tensor_type.elem_type = _pick(rng, types)
    return f"{vi.name} elem_type {vi.type.tensor_type.elem_type}"


def _m_attributes(m, rng):
    n = _pick(rng, list(m.graph.node))
    if n is None:
        return "no node"
    if n.attribute and rng.random() < 0.7:
        a = _pick(rng, list(n.attribute))
        name = a.name
        n.attribute.remove(a)
        if rng.random() < 0.2:
            return f"{n.name}.{name} removed"
        value = _pick(rng, [_pick(rng, ODD_INTS), 0.5, "none", [1, 2], [-1], [], b"x"])
        n.attribute.append(helper.make_attribute(
            name, value, attr_type=onnx.AttributeProto.INTS if value == [] else None))
        return f"{n.name}.{name}={value!r}"
    name = _pick(rng, ["axis", "perm", "block_size", "bits", "to", "saturate", "bogus"])
    n.attribute.append(helper.make_attribute(name, _pick(rng, ODD_INTS)))
    return f"{n.name} gets {name}"


def _m_g_idx(m, rng):
    for init in m.graph.initializer:
        if init.name == "G" or "g_idx" in init.name:
            arr = numpy_helper.to_array(init).astype(np.int64)
            arr[rng.randrange(arr.size)] = _pick(rng, [1 << 40, -1, 1 << 31, 99])
            dtype = np.int64 if rng.random() < 0.5 else np.int32
            init.CopyFrom(numpy_helper.from_array(arr.astype(dtype), init.name))
            return f"g_idx values out of range ({np.dtype(dtype).name})"
    return _m_mnb_attr(m, rng)


def _m_outputs(m, rng):
    g = m.graph
    choice = rng.randrange(3)
    if choice == 0 and g.output:
        g.output[0].name = _pick(rng, ["nothing", ""] + [v.name for v in g.input])
        return f"output renamed {g.output[0].name!r}"
    if choice == 1:
        del g.output[:]
        return "no outputs"
    if g.output:
        g.output.append(copy.deepcopy(g.output[0]))
    return "output duplicated"


ONNX_MUTATIONS: dict[str, Callable] = {
    "mnb_attr": _m_mnb_attr, "init_resize": _m_init_resize, "nan_values": _m_nan_values,
    "input_dim": _m_input_dim, "cycle": _m_cycle, "dup_names": _m_dup_names,
    "opsets": _m_opsets, "operands": _m_operands, "nodes": _m_nodes, "dtype": _m_dtype,
    "attributes": _m_attributes, "g_idx": _m_g_idx, "outputs": _m_outputs,
}
BYTE_MUTATIONS = ("truncate", "byte_flip")


def onnx_case(seed: int) -> tuple[bytes, str]:
    """The mutated model bytes of case ``seed`` and a description of the mutations."""
    rng = random.Random(seed)
    name, data = _pick(rng, seed_models())
    done = [name]
    if rng.random() < 0.15:
        kind = _pick(rng, BYTE_MUTATIONS)
        b = bytearray(data)
        if kind == "truncate":
            b = b[:rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), f"{name}: {kind}"
    m = onnx.ModelProto()
    m.ParseFromString(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = _pick(rng, sorted(ONNX_MUTATIONS))
        try:
            done.append(f"{kind}({ONNX_MUTATIONS[kind](m, rng)})")
        except Exception as e:  # an earlier mutation left nothing this one can read
            done.append(f"{kind}(skipped: {type(e).__name__})")
    return m.SerializeToString(), "; ".join(done)


# --------------------------------------------------------------------------------------------
# QIR text mutations
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![A-Za-z_%@.])-?[0-9]+(?:\.[0-9]+)?")
_TYPES = ["f32", "f16", "bf16", "i8", "u8", "i4", "u4", "i32", "i64", "bool", "u2", "f64"]
_OPS_SAMPLE = ["add", "matmul", "qmatmul", "dequantize", "quantize", "reshape", "relu",
               "constant", "gelu", "transpose", "concat", "split", "softmax", "bogus"]


def qir_case(seed: int) -> tuple[str, str, str]:
    """(seed model name, mutated QIR text, description) of case ``seed``."""
    rng = random.Random(seed)
    name, text, stage = _pick(rng, seed_qir_texts())
    done = [f"{name}/{stage}"]
    for _ in range(rng.choice((1, 1, 2))):
        kind = rng.randrange(10)
        lines = text.split("\n")
        if kind == 0:
            text = text[:rng.randrange(len(text))]
            done.append("truncate")
        elif kind == 1:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(text))
                text = text[:i] + _pick(rng, list("{}()[]<>,:=%@#\"-0123456789xn \n")) + \
                    text[i + 1:]
            done.append("char flips")
        elif kind == 2 and len(lines) > 3:
            del lines[rng.randrange(1, len(lines) - 2)]
            text = "\n".join(lines)
            done.append("line removed")
        elif kind == 3 and len(lines) > 4:
            i, j = rng.sample(range(2, len(lines) - 2), 2)
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
            done.append("lines swapped")
        elif kind == 4 and len(lines) > 3:
            i = rng.randrange(2, len(lines) - 1)
            lines.insert(i, lines[i])
            text = "\n".join(lines)
            done.append("line duplicated")
        elif kind == 5:
            spots = list(_NUMBER.finditer(text))
            if spots:
                s = _pick(rng, spots)
                new = _pick(rng, ["0", "-1", "-5", "99999999999", "1e308", "nan", "3", "2.5"])
                text = text[:s.start()] + new + text[s.end():]
                done.append(f"number {s.group()}->{new}")
        elif kind == 6:
            spots = [mt for t in _TYPES for mt in re.finditer(rf"\b{t}\b", text)]
            if spots:
                s = _pick(rng, spots)
                new = _pick(rng, _TYPES)
                text = text[:s.start()] + new + text[s.end():]
                done.append(f"type {s.group()}->{new}")
        elif kind == 7:
            refs = list(re.finditer(r"%[A-Za-z0-9_.]+", text))
            if len(refs) > 2:
                a, b = rng.sample(refs, 2)
                text = text[:a.start()] + b.group() + text[a.end():]
                done.append(f"{a.group()}->{b.group()}")
        elif kind == 8:
            spots = [mt for op in _OPS_SAMPLE for mt in re.finditer(rf"= {op}\(", text)]
            if spots:
                s = _pick(rng, spots)
                new = _pick(rng, _OPS_SAMPLE)
                text = text[:s.start()] + f"= {new}(" + text[s.end():]
                done.append(f"op -> {new}")
        else:
            depth = _pick(rng, [50, 5000, 100000])
            i = rng.randrange(len(text))
            text = text[:i] + _pick(rng, ["[", "<", "{", "("]) * depth + text[i:]
            done.append(f"nesting x{depth}")
    return name, text, "; ".join(done)


# --------------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """A case ran past CASE_SECONDS (a BaseException: code under test cannot swallow it)."""


@dataclass
class Outcome:
    kind: str            # ok | refused | uncontrolled
    detail: str = ""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def outcome(fn: Callable[[], None], seconds: float = CASE_SECONDS) -> Outcome:
    """Run one case under a time limit and classify what happened."""
    from qcompiler.errors import QCompilerError

    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
        return Outcome("ok")
    except CaseTimeout:
        return Outcome("uncontrolled", f"hang: over {seconds} s")
    except QCompilerError as e:
        msg = str(e)
        if "\n" in msg or len(msg) > MAX_MESSAGE or not msg.strip():
            return Outcome("uncontrolled",
                           f"{type(e).__name__} message not one short line: {msg[:600]!r}")
        return Outcome("refused", f"{type(e).__name__}: {msg}")
    except RecursionError as e:  # RecursionError must become an InputError where it is read
        return Outcome("uncontrolled", f"RecursionError: {str(e)[:200]}")
    except Exception as e:
        tb = traceback.format_exc(limit=-3)
        return Outcome("uncontrolled", f"{type(e).__name__}: {str(e)[:300]}\n{tb}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def random_inputs(fn, rng: np.random.Generator, sizes: Optional[dict] = None) -> Optional[dict]:
    """Fresh random inputs for a function's arguments (never zeros); None if too big."""
    sizes = {} if sizes is None else sizes
    inputs = {}
    for a in fn.args:
        shape = []
        for d in a.type.shape:
            shape.append(d if isinstance(d, int) else sizes.setdefault(d, int(rng.integers(1, 4))))
        if int(np.prod(shape, dtype=np.float64)) > MAX_RUN_ELEMENTS or any(s < 0 for s in shape):
            return None
        dt = a.type.dtype
        if dt.is_float:
            x = rng.standard_normal(shape).astype(dt.np_dtype)
        elif dt.is_integer:
            lo, hi = dt.int_range() if dt.bits < 8 else (max(np.iinfo(dt.np_dtype).min, -100),
                                                          min(np.iinfo(dt.np_dtype).max, 100))
            x = rng.integers(lo, hi + 1, shape).astype(dt.np_dtype)
        else:
            x = rng.integers(0, 2, shape).astype(dt.np_dtype)
        inputs[a.name] = x
    return inputs


def compile_and_run(module, seed: int, target: str = "ref") -> None:
    """The default pipeline of ``target`` on ``module``, then one run on random inputs."""
    from qcompiler.driver.api import run_pipeline
    from qcompiler.ir import verify
    from qcompiler.runtime.reference import run
    from qcompiler.targets import get_target

    verify(module)
    lowered, _, _ = run_pipeline(module, get_target(target).default_pipeline)
    inputs = random_inputs(lowered.main, np.random.default_rng(seed))
    if inputs is not None:
        run(lowered, inputs)


def run_onnx_case(seed: int) -> tuple[Outcome, bytes, str]:
    data, what = onnx_case(seed)

    def case():
        from qcompiler.frontends.onnx import load

        compile_and_run(load(data), seed)
    return outcome(case), data, what


def run_qir_case(seed: int) -> tuple[Outcome, str, str]:
    name, text, what = qir_case(seed)

    def case():
        from qcompiler.ir import parse_module

        compile_and_run(parse_module(text, seed_constants(name)), seed)
    return outcome(case), text, what


def run_onnx_bytes(data: bytes, seed: int = 0) -> Outcome:
    from qcompiler.frontends.onnx import load

    return outcome(lambda: compile_and_run(load(data), seed))


def run_qir_text(text: str, name: Optional[str], seed: int = 0) -> Outcome:
    from qcompiler.ir import parse_module

    constants = seed_constants(name) if name else None
    return outcome(lambda: compile_and_run(parse_module(text, constants), seed))


@functools.lru_cache(maxsize=None)
def compiled_seed(name: str):
    """A seed model compiled for ref (its lowered module)."""
    from qcompiler.driver.api import run_pipeline
    from qcompiler.frontends.onnx import load
    from qcompiler.targets import get_target

    lowered, _, _ = run_pipeline(load(dict(seed_models())[name]),
                                 get_target("ref").default_pipeline)
    return lowered


def mutate_inputs(rng: random.Random, inputs: dict):
    """A valid input dict with one thing wrong: dtype, rank, name, shape or kind."""
    key = _pick(rng, sorted(inputs))
    x = inputs[key]
    kind = rng.randrange(9)
    if kind == 0:
        inputs[key] = x.astype(_pick(rng, [np.float64, np.int32, np.float16, np.uint8, object]))
    elif kind == 1:
        inputs[key] = x[None] if rng.random() < 0.5 else x.reshape(-1)
    elif kind == 2:
        inputs[key + "_other"] = inputs.pop(key)
    elif kind == 3:
        del inputs[key]
    elif kind == 4:
        shape = list(x.shape)
        shape[rng.randrange(len(shape))] = _pick(rng, [0, 1, 5, 7])
        inputs[key] = np.ones(shape, x.dtype) * 0.5
    elif kind == 5:
        inputs[key] = _pick(rng, [None, "text", [[1, 2], [3]], 3.5, {"a": 1}])
    elif kind == 6:
        inputs["extra"] = x
    elif kind == 7:
        inputs = _pick(rng, [None, [x], "x"])
    elif x.dtype.kind == "f":
        inputs[key] = np.full(x.shape, _pick(rng, [np.nan, np.inf, -np.inf, 1e30]), x.dtype)
    return inputs, f"inputs kind {kind} on {key}"


def run_inputs_case(seed: int) -> tuple[Outcome, str]:
    """A valid seed model run on mutated inputs."""
    from qcompiler.runtime.reference import run

    rng = random.Random(seed)
    name = _pick(rng, [n for n, _ in seed_models()])
    module = compiled_seed(name)
    inputs, what = mutate_inputs(rng, random_inputs(module.main, np.random.default_rng(seed)))
    return outcome(lambda: run(module, inputs)), f"{name}: {what}"


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------

# Cases of each kind in CI (QC_FUZZ_CASES=N runs N of each; seeds from QC_FUZZ_SEED, 0).
DEFAULT_CASES = 400


def _cases() -> range:
    n = int(os.environ.get("QC_FUZZ_CASES", DEFAULT_CASES))
    first = int(os.environ.get("QC_FUZZ_SEED", 0))
    return range(first, first + n)


def _check_all(kind: str, runner: Callable) -> dict[str, int]:
    counts = {"ok": 0, "refused": 0, "uncontrolled": 0}
    bad = []
    for seed in _cases():
        res = runner(seed)
        counts[res[0].kind] += 1
        if res[0].kind == "uncontrolled":
            bad.append(f"{kind} seed {seed} ({res[-1]}): {res[0].detail}")
    assert not bad, f"{len(bad)} uncontrolled outcomes of {sum(counts.values())}:\n" + \
        "\n".join(bad[:5])
    return counts


def _quiet_numpy():
    """Mutated scales (NaN, 1e38) overflow on purpose; numpy's warnings are noise here."""
    import warnings

    warnings.simplefilter("ignore", RuntimeWarning)
    return np.errstate(all="ignore")


def test_fuzz_onnx_models():
    with _quiet_numpy():
        counts = _check_all("onnx", run_onnx_case)
    # The mutations must leave some models valid and break others, or they test nothing.
    assert counts["ok"] > 0 and counts["refused"] > 0, counts


def test_fuzz_qir_texts():
    with _quiet_numpy():
        counts = _check_all("qir", run_qir_case)
    assert counts["ok"] > 0 and counts["refused"] > 0, counts


def test_fuzz_run_inputs():
    with _quiet_numpy():
        counts = _check_all("inputs", run_inputs_case)
    assert counts["ok"] > 0 and counts["refused"] > 0, counts


def test_seed_models_compile_and_match_the_reference_semantics():
    """The seeds are valid: each compiles for ref and runs on fresh random inputs."""
    for name, data in seed_models():
        out = run_onnx_bytes(data, seed=1)
        assert out.kind == "ok", (name, out.detail)


def test_a_hang_is_reported_not_waited_for():
    import time

    out = outcome(lambda: time.sleep(5), seconds=0.2)
    assert out.kind == "uncontrolled" and "hang" in out.detail


def _corpus_files() -> list[str]:
    if not os.path.isdir(CORPUS):
        return []
    return sorted(f for f in os.listdir(CORPUS) if f.endswith((".onnx", ".qir")))


@pytest.mark.parametrize("name", _corpus_files())
def test_corpus_case_has_a_clean_outcome(name):
    """Each corpus file once gave an uncontrolled outcome (a traceback, a crash, a
    multi-line message); now it must compile or be refused with one line."""
    path = os.path.join(CORPUS, name)
    with _quiet_numpy():
        if name.endswith(".onnx"):
            with open(path, "rb") as f:
                out = run_onnx_bytes(f.read())
        else:
            model = name.split("-")[1]
            with open(path, encoding="utf-8") as f:
                out = run_qir_text(f.read(), model if model in dict(seed_models()) else None)
    assert out.kind in ("ok", "refused"), out.detail


def test_cpu_target_refuses_bad_models_cleanly(tmp_path):
    """A few deterministic bad models through the cpu target's pipeline: refused in the
    frontend before TVM sees them (K = 0 gave a 322-line TVM ScheduleError once)."""
    pytest.importorskip("tvm")
    from qcompiler.driver.api import compile_to_dir
    from qcompiler.errors import QCompilerError

    bad = []
    for bits, block, K, N in ((4, 16, 0, 8), (4, 16, 40, 0), (3, 16, 40, 8), (4, 24, 40, 8),
                              (4, 16, -8, 8)):
        m = matmul_nbits_model(bits=4, block=16)
        for a in m.graph.node[0].attribute:
            value = {"bits": bits, "block_size": block, "K": K, "N": N}.get(a.name)
            if value is not None:
                a.i = value
        with pytest.raises(QCompilerError) as info:
            compile_to_dir(m, "cpu", str(tmp_path / "never"))
        msg = str(info.value)
        if "\n" in msg or "mnb0" not in msg:
            bad.append(msg)
    assert not bad, bad
    assert not (tmp_path / "never").exists()


def test_cpu_target_run_inputs(tmp_path):
    """One valid model compiled for cpu (TVM, ~5 s), run on mutated inputs: each run
    succeeds or is refused with one line; the valid run matches the reference."""
    pytest.importorskip("tvm")
    import qcompiler
    from qcompiler.runtime.reference import run

    model = matmul_nbits_model(bits=4, block=16, zp="packed")
    compiled = qcompiler.compile(model, target="cpu", output_dir=str(tmp_path / "cpu"))
    ref = compiled_module_for_ref(model)
    x = {"A": np.random.default_rng(3).standard_normal((3, 40)).astype(np.float32)}
    np.testing.assert_allclose(compiled.run(dict(x))["y"], run(ref, dict(x))["y"],
                               rtol=1e-4, atol=1e-4)
    bad = []
    with _quiet_numpy():
        for seed in range(40):
            rng = random.Random(seed)
            inputs, what = mutate_inputs(rng, {"A": x["A"].copy()})
            out = outcome(lambda: compiled.run(inputs))
            if out.kind == "uncontrolled":
                bad.append(f"{what}: {out.detail}")
    assert not bad, "\n".join(bad[:3])


def compiled_module_for_ref(model: onnx.ModelProto):
    from qcompiler.driver.api import run_pipeline
    from qcompiler.frontends.onnx import load
    from qcompiler.targets import get_target

    return run_pipeline(load(model), get_target("ref").default_pipeline)[0]


def save_case(directory: str, kind: str, seed: int, payload, what: str) -> str:
    """Write a case to the corpus: ``onnx-SEED.onnx`` or ``qir-MODEL-SEED.qir`` (the QIR
    text names its large constants; MODEL says which seed model's side table has them)."""
    os.makedirs(directory, exist_ok=True)
    if kind == "onnx":
        path, data = os.path.join(directory, f"onnx-{seed}.onnx"), payload
    else:
        model = what.split("/")[0]
        path, data = os.path.join(directory, f"qir-{model}-{seed}.qir"), payload.encode()
    with open(path, "wb") as f:
        f.write(data)
    return path


def main(argv: list[str]) -> int:
    """``python tests/test_fuzz.py N [SAVE_DIR]``: N cases of each kind, with a summary."""
    n = int(argv[1]) if len(argv) > 1 else 1000
    save = argv[2] if len(argv) > 2 else None
    counts: dict[str, dict[str, int]] = {}
    bad = []
    for kind, runner in (("onnx", run_onnx_case), ("qir", run_qir_case),
                         ("inputs", run_inputs_case)):
        counts[kind] = {"ok": 0, "refused": 0, "uncontrolled": 0}
        for seed in range(n):
            res = runner(seed)
            out = res[0]
            counts[kind][out.kind] += 1
            if out.kind == "uncontrolled":
                bad.append((kind, seed, res[-1], out.detail))
                if save and kind in ("onnx", "qir"):
                    save_case(save, kind, seed, res[1], res[2])
    for kind, seed, what, detail in bad:
        print(f"--- {kind} seed {seed}: {what}\n{detail}")
    print(counts)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv))
