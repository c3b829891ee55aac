"""TensorIR of the CPU ``max_unpool`` kernel: ONNX MaxUnpool.

The reference's semantics (``runtime.reference._max_unpool``): y [N, C, *output_shape] is
zeros, then each element of x (in row-major order) is written at its entry of ``indices``,
a flat position in the whole of y (batch and channel included, as MaxPool's indices are);
where several elements share a position the last one stays (numpy's assignment). An index
outside [0, y's size) fails the call (the reference raises).

Loop structure: y is zeroed through a flat view of it (a parallel loop when large), then one
serial loop over the flat x and indices checks each index and stores x's element there. The
scatter stays serial: positions written twice must keep the last element, and the stores are
a fraction of the zeroing's. A gather (each output position searching the indices) would
cost y's size times x's.

Element types: every type with a TVM dtype (bool as its uint8 storage), any integer indices
(read as int64, as the reference's conversion). No kernel (CPUBackendError; the node then
runs on the host): element types without a TVM dtype, a result of another type than x,
indices whose shape is known to differ from x's (the reference pairs them element by element).
"""
from __future__ import annotations

import numpy as np

from qcompiler.codegen.cpu.ops.common import Dims, kernel_name, tvm_dtype, unsupported
from qcompiler.codegen.cpu.tir_builder import (bind, build_kernel, check, i64, loop,
                                               parallel_min_elements, param, static_sizes)
from qcompiler.ir.core import Node



def primfunc_for_max_unpool(node: Node, params=None, module=None, known=()):
    """(kernel name, PrimFunc) of a max_unpool node; (name, None) for a known name. Raises
    CPUBackendError naming the node and op when it has no kernel."""
    _check(node)
    # one thread below parallel_min_elements output elements (the zeroing)
    min_elements = parallel_min_elements(params)
    return build_kernel(kernel_name(node, {}), known, lambda: _emit(node, min_elements))


def _check(node: Node) -> None:
    x, indices = node.operands
    y = node.results[0]
    if tvm_dtype(y.type.dtype, node) != tvm_dtype(x.type.dtype, node):
        raise unsupported(node, f"result {y.type} is not of x's type {x.type.dtype.name}")
    tvm_dtype(indices.type.dtype, node)  # refuses types without a TVM dtype
    if any(isinstance(a, int) and isinstance(b, int) and a != b
           for a, b in zip(x.type.shape, indices.type.shape)):
        raise unsupported(node, f"indices {indices.type.shape} and x {x.type.shape} differ")


def _flat(buf, size, dtype: str):
    """A 1-D view of ``buf`` (its ``size`` elements of ``dtype`` in row-major order)."""
    from tvm.script.ir_builder import tirx as T

    return T.decl_buffer((size,), dtype, data=buf.data)


def _emit(node: Node, min_elements: int) -> None:
    """The parameters and body of the PrimFunc (inside ``build_kernel``)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    x_type, idx_type = (v.type for v in node.operands)
    dtype = tvm_dtype(x_type.dtype, node)
    dims = Dims()
    # x's dims, a static one of indices where x's is symbolic: the call fails TVM's shape
    # check when the two differ
    x_shape = [dims.dim(b if isinstance(b, int) and not isinstance(a, int) else a)
               for a, b in zip(x_type.shape, idx_type.shape)]
    y_shape = x_shape[:2] + [i64(d) for d in node.attrs["output_shape"]]
    x = param("x", x_shape, dtype)
    indices = param("indices", x_shape, tvm_dtype(idx_type.dtype, node))
    y = param("y", y_shape, dtype)
    x_size, y_size = i64(1), i64(1)
    for d in x_shape:
        x_size = x_size * d
    for d in y_shape:
        y_size = y_size * d
    x_flat, y_flat = _flat(x, x_size, dtype), _flat(y, y_size, dtype)
    idx_flat = _flat(indices, x_size, tvm_dtype(idx_type.dtype, node))
    sizes = static_sizes(*y_shape)
    worth = sizes is None or int(np.prod(sizes)) >= min_elements
    with loop(y_size, "o", parallel=worth) as o:
        T.buffer_store(y_flat, tirx.const(0, dtype), [o])
    # in x's order: a position written twice keeps the later element
    with loop(x_size, "e") as e:
        at = bind("at", idx_flat[e].astype("int64"))
        check(tirx.all(at >= i64(0), at < y_size),
              "max_unpool: an index is outside the output")
        T.buffer_store(y_flat, x_flat[e], [at])
