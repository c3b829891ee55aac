"""conv-channels-last: 2-D ``qconv`` and ``pool`` run on channels-last (NHWC) tensors.

Each 2-D ``qconv`` and ``pool`` (without MaxPool's indices) gets ``channels_last = 1``: its x
(and a qconv's residual) are ``transpose(v, [0, 2, 3, 1])`` and its result is NHWC, read by
the rest of the graph through ``transpose(y, [0, 3, 1, 2])``. Then every transpose of a
transpose whose permutations compose to the identity is bypassed (and one that moves only
dims of size 1 becomes a reshape, a view), so a chain of convolutions
and pools (a CNN after fuse-qconv / fuse-requant / fuse-qpool) passes its activations NHWC
from one to the next and transposes only where the chain starts and ends. The values are the
same; only the layout between the nodes changes.

Why: an implicit GEMM reads a pixel's channels as contiguous K (16-byte loads of 16 codes)
and writes a pixel's output channels contiguously; in NCHW both are strided by H * W.

Option ``target``: empty (the CUDA pipelines) converts every such node. A cpu target converts
a function only where the CPU kernels take every 2-D qconv and pool of it channels-last
(``codegen.cpu.conv.qconv_takes_channels_last``, ``codegen.cpu.pool.pool_takes_channels_last``:
on x86 targets the vnni or madd kernel's channel lanes, depthwise lanes, integer max
pooling), else none of it: a layer left NCHW in the middle of a chain would cost two
transposes of its activations, more than the channel lanes save. For the same reason a
function whose converted chains would leave more transposes than it has inputs and outputs
(an op without an NHWC kernel between convolutions: a float activation, a concat) stays NCHW
(a dry run on a copy decides). Measured on the CPU, 1 thread: see docs/backends.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Module
from qcompiler.ir.ops import channels_last_operands
from qcompiler.ir.rewrite import apply_patterns
from qcompiler.ir.types import TensorType
from qcompiler.passes.canonicalize import TransposeOfUnitDims
from qcompiler.pipeline import Pass, record_stat, register_pass

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _wants_channels_last(node) -> bool:
    if node.op not in ("qconv", "pool") or node.attrs.get("channels_last", 0):
        return False
    if node.operands[0].type.rank != 4 or len(node.results) != 1:
        return False
    return all(isinstance(d, (int, str)) for d in node.operands[0].type.shape)


def _record(module: Module, name: str, counts: tuple, kept: int) -> Module:
    converted, cancelled, as_views = counts
    record_stat(module, name, channels_last=converted, transposes_cancelled=cancelled,
                transposes_as_reshapes=as_views, functions_kept_nchw=kept)
    return module


def _transposes(fn) -> int:
    return sum(1 for n in fn.nodes if n.op == "transpose")


def _transposed(t: TensorType, perm: list) -> TensorType:
    return TensorType(tuple(t.shape[p] for p in perm), t.dtype, t.quant)


@register_pass("conv-channels-last")
@dataclass
class ConvChannelsLastPass(Pass):
    """2-D qconv / pool → channels_last, with the transposes between them cancelled."""

    target: str = ""

    def run(self, module: Module) -> Module:
        takes = self._cpu_kernels_take(module) if self.target else None
        if takes is None:
            return _record(module, self.name, _convert(module), kept=0)
        keep_nchw = {fn.name for fn in module.functions
                     if not all(takes(node) for node in fn.nodes if _wants_channels_last(node))}
        # A trial on a copy: where the chains would leave more transposes (copies of
        # activations) than the function has inputs and outputs, an op without an NHWC kernel
        # sits between convolutions (an activation left in float, a concat): two transposes
        # around it cost more than the channel lanes save, so that function stays NCHW (and
        # the module is converted again without it; else the trial is the result).
        before = {fn.name: _transposes(fn) for fn in module.functions}
        trial = module.clone()
        counts = _convert(trial, skip=keep_nchw)
        over = {fn.name for fn in trial.functions if fn.name not in keep_nchw
                and _transposes(fn) - before[fn.name] > len(fn.args) + len(fn.outputs)}
        if not over:
            return _record(trial, self.name, counts, kept=len(keep_nchw))
        keep_nchw |= over
        return _record(module, self.name, _convert(module, skip=keep_nchw),
                       kept=len(keep_nchw))

    def _cpu_kernels_take(self, module: Module):
        """Whether the CPU target's kernel takes a node channels-last."""
        from qcompiler.codegen.cpu.conv import qconv_takes_channels_last
        from qcompiler.codegen.cpu.host import target_cpu
        from qcompiler.codegen.cpu.pool import pool_takes_channels_last

        cpu = target_cpu(self.backend_target("cpu"))
        vnni, x86 = cpu["vnni"], cpu["arch"] == "x86_64"

        def takes(node) -> bool:
            if node.op == "pool":
                return pool_takes_channels_last(node)
            return qconv_takes_channels_last(node, vnni, module, avx2=x86 and not vnni)
        return takes


def _convert(module: Module, skip=frozenset()) -> tuple[int, int, int]:
    """Every 2-D qconv / pool of the functions not named in ``skip`` → channels_last, the
    transposes between them cancelled, those left that move only size-1 dims as reshapes.
    Returns (nodes converted, transposes cancelled, transposes made views)."""
    converted = cancelled = 0
    for fn in module.functions:
        if fn.name in skip:
            continue
        nhwc = {}   # value -> its one NHWC transpose (a value two nodes read: x and residual)
        for node in list(fn.nodes):
            if not _wants_channels_last(node):
                continue
            ops = list(node.operands)
            for i in sorted(channels_last_operands(node.op)):
                if i < len(ops) and ops[i] is not None:
                    v = ops[i]
                    if v not in nhwc:
                        nhwc[v] = fn.make_node("transpose", [v],
                                               [_transposed(v.type, TO_NHWC)],
                                               {"perm": TO_NHWC}, before=node).result
                    ops[i] = nhwc[v]
            node.operands = ops
            node.attrs["channels_last"] = 1
            y = node.results[0]
            nchw = y.type
            y.type = _transposed(nchw, TO_NHWC)
            after = fn.nodes[fn.nodes.index(node) + 1] if node is not fn.nodes[-1] else None
            back = fn.make_node("transpose", [y], [nchw], {"perm": TO_NCHW},
                                names=[fn.fresh_name(f"{y.name}.nchw")], before=after)
            for user in fn.nodes:
                if user is not back:
                    user.operands = [back.result if v is y else v for v in user.operands]
            fn.outputs = [back.result if v is y else v for v in fn.outputs]
            converted += 1
        cancelled += _cancel_transpose_pairs(fn)
        _sink_into_reductions(fn)
        fn.remove_dead_nodes()
    # the transposes left that move only dims of size 1 (a classifier's [N, C, 1, 1]) are
    # reshapes: views, not copies
    as_views = apply_patterns(module, [TransposeOfUnitDims()])
    for fn in module.functions:
        fn.remove_dead_nodes()
    module.drop_unused_constants()
    return converted, cancelled, as_views


# Reductions that a transpose can move through: axes renamed, values unchanged (keepdims).
SPATIAL_REDUCTIONS = ("reduce_mean", "reduce_sum", "reduce_l2")


def _sink_into_reductions(fn) -> int:
    """transpose(y, TO_NCHW) → per-tensor (de)quantizes → a reduction with keepdims (a
    GlobalAveragePool after the chain's last conv): the (de)quantizes and the reduction run
    on the NHWC y (the reduction's axes renamed) and the transpose moves to the reduced
    result, where it moves only dims of size 1 (a view). Taken only where that holds, so no
    transpose grows. Returns how many."""
    n = 0
    users = fn.users()
    for t in list(fn.nodes):
        if t.op != "transpose" or t.attrs["perm"] != TO_NCHW:
            continue
        chain, v = [], t.result
        while len(users.get(v, [])) == 1 and not fn.is_output(v):
            u = users[v][0]
            if u.op in ("quantize", "dequantize") and u.operands[0] is v \
                    and u.attrs["scheme"].granularity == "tensor":
                chain.append(u)
                v = u.result
                continue
            if u.op in SPATIAL_REDUCTIONS and u.attrs.get("keepdims") and u.attrs["axes"]:
                chain.append(u)
            break
        if not chain or chain[-1].op not in SPATIAL_REDUCTIONS:
            continue
        red = chain[-1]
        axes = sorted(TO_NCHW[a % 4] for a in red.attrs["axes"])
        nhwc_shape = _transposed(red.result.type, TO_NHWC).shape
        moved = [p for p in TO_NCHW if nhwc_shape[p] != 1]
        if moved != sorted(moved):
            continue  # the transpose at the end would move data: leave it where it is
        x = t.operands[0]
        for u in chain:
            attrs = dict(u.attrs, axes=axes) if u is red else dict(u.attrs)
            x = fn.make_node(u.op, [x] + list(u.operands[1:]),
                             [_transposed(u.result.type, TO_NHWC)], attrs,
                             names=[fn.fresh_name(f"{u.result.name}.nhwc")], before=red).result
        back = fn.make_node("transpose", [x], [red.result.type], {"perm": TO_NCHW},
                            before=red)
        fn.replace_all_uses(red.result, back.result)
        users = fn.users()
        n += 1
    return n


def _cancel_transpose_pairs(fn) -> int:
    """transpose(transpose(v, p), q) with p then q the identity → v. Returns how many."""
    n = 0
    for node in list(fn.nodes):
        if node.op != "transpose":
            continue
        inner = node.operands[0].producer
        if inner is None or inner.op != "transpose":
            continue
        p, q = inner.attrs["perm"], node.attrs["perm"]
        if len(p) != len(q) or [p[i] for i in q] != list(range(len(q))):
            continue
        fn.replace_all_uses(node.result, inner.operands[0])
        fn.erase(node)
        n += 1
    return n
