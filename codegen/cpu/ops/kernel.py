"""``primfunc_for(node)``: the scheduled TensorIR kernel of one QIR node.

Destination-passing: the function's parameters are the node's operands that are not ``none``
(in order), then its results, then its launch constants (``ops.common.LAUNCH_CONSTANTS``:
int64 scalars, the same kernel serving nodes that differ only in them); it writes the results
and returns nothing. Dims come from the types: a symbol is one int64 var shared by name (one
kernel serves every size), ``?`` a var of its own.
"""
from __future__ import annotations

import importlib
from typing import Optional

from qcompiler.codegen.cpu.ops.common import kernel_name, unsupported
from qcompiler.codegen.cpu.ops.compute import BUILDERS, _Ctx
from qcompiler.codegen.cpu.ops.schedule import ScheduleParams, params_for, schedule
from qcompiler.ir.core import Node

SUPPORTED_OPS = frozenset(BUILDERS)

# The ops whose kernel has its own module instead of a TE compute in ops/compute.py:
# op -> (module, function), the function called as primfunc_for is. The module is imported
# when a node of the op comes: most of them import ops/ (whose __init__ imports this file), so
# importing them at the top of this file would be circular.
OWN_MODULE_KERNELS = {
    # issue #15: int8 conv with its own schedule (vpdpbusd / madd lanes, packed weights, NHWC)
    "qconv": ("qcompiler.codegen.cpu.conv", "primfunc_for_qconv"),
    # issue #15: windows that skip the padding (NaN-padded in the reference), max's indices
    "pool": ("qcompiler.codegen.cpu.pool", "primfunc_for_pool"),
    # a padded copy of x, then row sums LLVM vectorizes; conv_transpose gathers its taps
    "conv": ("qcompiler.codegen.cpu.float_conv", "primfunc_for_conv"),
    "conv_transpose": ("qcompiler.codegen.cpu.float_conv", "primfunc_for_conv"),
    # bit-exact ONNX Q/DQ: every code type (float8 / float4 encodings), blocked scales
    "quantize": ("qcompiler.codegen.cpu.qdq", "primfunc_for_qdq"),
    "dequantize": ("qcompiler.codegen.cpu.qdq", "primfunc_for_qdq"),
    # ONNX's integer matmuls, bit-exact (numpy's promotions of the scales)
    "dynamic_quantize": ("qcompiler.codegen.cpu.qlinear", "primfunc_for_qlinear"),
    "matmul_integer": ("qcompiler.codegen.cpu.qlinear", "primfunc_for_qlinear"),
    "qlinear_matmul": ("qcompiler.codegen.cpu.qlinear", "primfunc_for_qlinear"),
    # RNN / GRU / LSTM: a serial time loop carrying the state (IR builder: cpu/tir_builder.py)
    "recurrent": ("qcompiler.codegen.cpu.recurrent", "primfunc_for_recurrent"),
    # a serial time loop carrying each kv head's state (IR builder: cpu/tir_builder.py)
    "linear_attention": ("qcompiler.codegen.cpu.linear_attention",
                         "primfunc_for_linear_attention"),
    # a gather adding each pixel's taps in the reference's order (IR builder)
    "col2im": ("qcompiler.codegen.cpu.col2im", "primfunc_for_col2im"),
    # LU with partial pivoting, a serial elimination per matrix (IR builder)
    "det": ("qcompiler.codegen.cpu.det", "primfunc_for_det"),
    # a serial scatter at the flat indices, the last write winning (IR builder)
    "max_unpool": ("qcompiler.codegen.cpu.max_unpool", "primfunc_for_max_unpool"),
    # bilinear samples of each output row's taps, then the grouped product (IR builder)
    "deform_conv": ("qcompiler.codegen.cpu.deform_conv", "primfunc_for_deform_conv"),
}


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
    own_module = OWN_MODULE_KERNELS.get(node.op)
    # qconv always takes its own kernel; the other ops only while ops/compute.py has no
    # builder of the same op (a builder added there takes over)
    if own_module is not None and (node.op == "qconv" or node.op not in BUILDERS):
        module_path, function_name = own_module
        primfunc_for_op = getattr(importlib.import_module(module_path), function_name)
        if node.op == "qconv":  # its variant (VNNI / AVX2) follows the schedule's lanes
            params = params or default_params()
        return primfunc_for_op(node, params, module, known)
    builder = BUILDERS.get(node.op)
    if builder is None:
        raise unsupported(node, "op not in the CPU op kernel library")
    ctx = _Ctx(node, module)
    kernel = builder(ctx)
    name = kernel_name(node, kernel.baked)
    if name in known:
        return name, None
    func = te.create_prim_func(kernel.inputs + kernel.outputs + kernel.params)
    func = schedule(func, kernel, params or default_params())
    return name, func.with_attr("global_symbol", name)
