"""``primfunc_for(node)``: the scheduled TensorIR kernel of one QIR node.

Destination-passing: the function's parameters are the node's operands that are not ``none``
(in order), then its results; it writes the results and returns nothing. Dims come from the
types: a symbol is one int64 var shared by name (one kernel serves every size), ``?`` a var
of its own.
"""
from __future__ import annotations

from typing import Optional

from qcompiler.codegen.cpu.ops.common import kernel_name, unsupported
from qcompiler.codegen.cpu.ops.compute import BUILDERS, _Ctx
from qcompiler.codegen.cpu.ops.schedule import ScheduleParams, params_for, schedule
from qcompiler.ir.core import Node

SUPPORTED_OPS = frozenset(BUILDERS)


def default_params() -> ScheduleParams:
    from qcompiler.targets import get_target

    return params_for(get_target("cpu"))


def primfunc_for(node: Node, params: Optional[ScheduleParams] = None, module=None,
                 known=()):
    """(kernel_name, scheduled tvm PrimFunc) of ``node``.

    ``params``: the schedule's decided parameters (default: the host's ``cpu`` target);
    ``module``: where to find constants stored in the side table (slice bounds).
    ``known``: kernel names already built (a model's repeated layers): for those the function
    is (name, None), without the cost of creating and scheduling it again.
    Raises CPUBackendError naming the node and op when the op has no CPU kernel.
    """
    from tvm import te

    if node.attrs.get("channels_last", 0) and node.op not in ("qconv", "pool"):
        raise unsupported(node, "channels_last (only qconv and pool have NHWC kernels)")
    if node.op == "qconv":  # issue #15: its own TensorIR (codegen/cpu/conv.py)
        from qcompiler.codegen.cpu.conv import primfunc_for_qconv

        return primfunc_for_qconv(node, params or default_params(), module, known)
    if node.op == "pool" and "pool" not in BUILDERS:  # issue #15: codegen/cpu/pool.py
        from qcompiler.codegen.cpu.pool import primfunc_for_pool

        return primfunc_for_pool(node, params, module, known)
    if node.op in ("conv", "conv_transpose") and node.op not in BUILDERS:  # cpu/float_conv.py
        from qcompiler.codegen.cpu.float_conv import primfunc_for_conv

        return primfunc_for_conv(node, params, module, known)
    if node.op in ("quantize", "dequantize") and node.op not in BUILDERS:  # cpu/qdq.py
        from qcompiler.codegen.cpu.qdq import primfunc_for_qdq

        return primfunc_for_qdq(node, params, module, known)
    if node.op in ("dynamic_quantize", "matmul_integer", "qlinear_matmul") \
            and node.op not in BUILDERS:  # cpu/qlinear.py
        from qcompiler.codegen.cpu.qlinear import primfunc_for_qlinear

        return primfunc_for_qlinear(node, params, module, known)
    if node.op == "recurrent" and node.op not in BUILDERS:  # cpu/recurrent.py: a time loop
        from qcompiler.codegen.cpu.recurrent import primfunc_for_recurrent

        return primfunc_for_recurrent(node, params, module, known)
    if node.op == "linear_attention" and node.op not in BUILDERS:  # cpu/linear_attention.py
        from qcompiler.codegen.cpu.linear_attention import primfunc_for_linear_attention

        return primfunc_for_linear_attention(node, params, module, known)
    if node.op == "col2im" and node.op not in BUILDERS:  # cpu/col2im.py: a gather over taps
        from qcompiler.codegen.cpu.col2im import primfunc_for_col2im

        return primfunc_for_col2im(node, params, module, known)
    builder = BUILDERS.get(node.op)
    if builder is None:
        raise unsupported(node, "op not in the CPU op kernel library")
    ctx = _Ctx(node, module)
    kernel = builder(ctx)
    name = kernel_name(node, kernel.baked)
    if name in known:
        return name, None
    func = te.create_prim_func(kernel.inputs + kernel.outputs)
    func = schedule(func, kernel, params or default_params())
    return name, func.with_attr("global_symbol", name)
