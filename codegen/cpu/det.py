"""TensorIR of the CPU ``det`` kernel: ONNX Det, the determinant of each matrix of a batch.

The reference's semantics (``runtime.reference._det``): ``np.linalg.det`` of x [..., M, M] in
float64, rounded to x's type. numpy factors each matrix with LAPACK's getrf (LU with partial
pivoting: the pivot of column k is the first row at or below k of the largest magnitude) and
returns sign * exp(sum_k log|u_kk|), the sign flipped once per row swap and once per negative
pivot; a zero pivot (a singular matrix) gives 0. An empty matrix (M = 0) has determinant 1.

Loop structure: the matrices (all leading dims as one) are the one parallel loop. Each copies
its matrix into a float64 scratch [M, M] and eliminates it in place, column by column, in a
serial loop: find the pivot, swap its row up, then subtract multiples of the pivot row from
the rows below it (row updates innermost, contiguous). The determinant is then formed as
numpy forms it, sign * exp(sum of log|pivot|) (a running product would round differently and
over- or underflow where numpy's does not). The elimination order is not LAPACK's (getrf
works in blocks and recursive panels), so the pivots may differ from numpy's in their last
bits: the result is the reference's up to float64 rounding.

Element types: f16 / bf16 / f32 / f64 (x and the result of the same type). No kernel
(CPUBackendError; the node then runs on the host): integer and bool x (the reference truncates
a float64 determinant, and its rounding error decides the integer), element types without a
TVM dtype, a result of another type than x, matrices known to be non-square.
"""
from __future__ import annotations

from qcompiler.codegen.cpu.ops.common import (Dims, is_float_dtype, kernel_name, tvm_dtype,
                                              unsupported)
from qcompiler.codegen.cpu.tir_builder import (bind, build_kernel, i64, loop,
                                               parallel_min_elements, param, scratch,
                                               static_sizes)
from qcompiler.ir.core import Node

_F64 = "float64"


def primfunc_for_det(node: Node, params=None, module=None, known=()):
    """(kernel name, PrimFunc) of a det node; (name, None) for a known name. Raises
    CPUBackendError naming the node and op when it has no kernel."""
    _check(node)
    # one thread below parallel_min_elements multiply-adds: matrices * M**3 / 3
    min_elements = parallel_min_elements(params)
    return build_kernel(kernel_name(node, {}), known, lambda: _emit(node, min_elements))


def _check(node: Node) -> None:
    x, y = node.operands[0], node.results[0]
    dtype = tvm_dtype(x.type.dtype, node)  # refuses types without a TVM dtype
    if x.type.dtype.kind == "bool" or not is_float_dtype(dtype):
        raise unsupported(node, f"x of {x.type.dtype.name} (float types only: the reference "
                                "truncates a float64 determinant to an integer type)")
    if tvm_dtype(y.type.dtype, node) != dtype:
        raise unsupported(node, f"result {y.type} is not of x's type {x.type.dtype.name}")
    rows, cols = x.type.shape[-2:]
    if isinstance(rows, int) and isinstance(cols, int) and rows != cols:
        raise unsupported(node, f"x {x.type.shape} is not a batch of square matrices")


def _emit(node: Node, min_elements: int) -> None:
    """The parameters and body of the PrimFunc (inside ``build_kernel``)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    x_type = node.operands[0].type
    dtype = tvm_dtype(x_type.dtype, node)
    dims = Dims()
    lead = [dims.dim(d) for d in x_type.shape[:-2]]
    # one dim for both: a call with a non-square matrix fails TVM's shape check (numpy
    # raises); a static one of the pair fixes the other
    rows, cols = x_type.shape[-2:]
    m = dims.dim(rows if isinstance(rows, int) or not isinstance(cols, int) else cols)
    x = param("x", tuple(lead) + (m, m), dtype)
    y = param("y", tuple(lead), dtype)
    count = i64(1)
    for d in lead:
        count = count * d
    # flat views: matrix b is x_flat[b * M * M:], its determinant y_flat[b]
    x_flat = T.decl_buffer((count * m * m,), dtype, data=x.data)
    y_flat = T.decl_buffer((count,), dtype, data=y.data)
    sizes = static_sizes(count, m)
    worth = sizes is None or sizes[0] * sizes[1] ** 3 >= 3 * min_elements
    zero, one = tirx.const(0.0, _F64), tirx.const(1.0, _F64)
    with loop(count, "b", parallel=worth) as b:
        a = scratch("a", (m, m), _F64)
        with loop(m, "i") as i:
            with loop(m, "j") as j:
                T.buffer_store(a, x_flat[(b * m + i) * m + j].astype(_F64), [i, j])
        # state: the sign, sum log|pivot|, whether a pivot was 0, the pivot row of column k
        sign = scratch("sign", (1,), _F64)
        log_sum = scratch("log_sum", (1,), _F64)
        singular = scratch("singular", (1,), "int32")
        pivot_row = scratch("pivot_row", (1,), "int64")
        first = [i64(0)]
        T.buffer_store(sign, one, first)
        T.buffer_store(log_sum, zero, first)
        T.buffer_store(singular, tirx.const(0, "int32"), first)
        with loop(m, "k") as k:
            # the pivot: the first row at or below k of the largest |a[., k]| (LAPACK's idamax)
            T.buffer_store(pivot_row, k, first)
            with loop(m - k - i64(1), "r") as r:
                i = k + i64(1) + r
                with T.If(tirx.abs(a[i, k]) > tirx.abs(a[pivot_row[0], k])):
                    with T.Then():
                        T.buffer_store(pivot_row, i, first)
            p = bind("p", pivot_row[0])
            with T.If(p != k):
                with T.Then():
                    T.buffer_store(sign, -sign[0], first)
                    with loop(m, "j") as j:
                        held = bind("held", a[k, j])
                        T.buffer_store(a, a[p, j], [k, j])
                        T.buffer_store(a, held, [p, j])
            pivot = bind("pivot", a[k, k])
            with T.If(pivot == zero):
                with T.Then():
                    # getrf goes on past a zero pivot; numpy then returns 0
                    T.buffer_store(singular, tirx.const(1, "int32"), first)
                with T.Else():
                    with T.If(pivot < zero):
                        with T.Then():
                            T.buffer_store(sign, -sign[0], first)
                    T.buffer_store(log_sum, log_sum[0] + tirx.log(tirx.abs(pivot)), first)
                    with loop(m - k - i64(1), "r") as r:
                        i = k + i64(1) + r
                        factor = bind("factor", a[i, k] / pivot)
                        with loop(m - k - i64(1), "c") as c:
                            j = k + i64(1) + c
                            T.buffer_store(a, a[i, j] - factor * a[k, j], [i, j])
        det = tirx.Select(singular[0] != tirx.const(0, "int32"), zero,
                          sign[0] * tirx.exp(log_sum[0]))
        T.buffer_store(y_flat, det.astype(dtype), [b])
