"""ATen op handlers: copies, views and reshapes, transposes, slicing and indexing, concatenation
and splitting."""
from __future__ import annotations

import numpy as np

from qcompiler.frontends.fx.registry import _aten
from qcompiler.frontends.fx.tensors import _Const
from qcompiler.ir import QuantScheme, TensorType
from qcompiler.ir.core import Value, constant_node, constant_value


@_aten("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "_to_copy", "to", "type_as",
       "_unsafe_view", "view", "reshape", "unflatten")
def _same_or_reshape(imp, x, *rest, **kw):
    """Copies, dtype changes and views: a cast where the dtype changes, a reshape where the
    shape does."""
    out_shape, out_dtype = imp.out_shape(), imp.out_dtype()
    v = imp.value(x)
    if v.type.dtype != out_dtype:
        v = imp.emit("cast", [v], {"to": out_dtype})
    if tuple(v.type.shape) != out_shape:
        v = _reshape_to(imp, v, out_shape)
    return v


def _reshape_to(imp, v: Value, shape: tuple) -> Value:
    shape_c = imp.value(_Const(_torch_i64(shape), "shape"))
    return imp.emit("reshape", [v, shape_c])


def _torch_i64(values):
    import torch

    return torch.tensor(list(values), dtype=torch.int64)


@_aten("dropout", "feature_dropout")
def _dropout(imp, x, p=0.5, train=False):
    if train and p > 0:
        raise imp.fail("dropout in training mode: call model.eval() before compiling")
    return imp.value(x)


@_aten("flatten")
def _flatten(imp, x, *a, **k):
    return _reshape_to(imp, imp.value(x), imp.out_shape())


@_aten("unsqueeze")
def _unsqueeze(imp, x, dim):
    return imp.emit("unsqueeze", [x], {"axes": [int(dim)]})


@_aten("squeeze")
def _squeeze(imp, x, dim=None):
    return _reshape_to(imp, imp.value(x), imp.out_shape())


@_aten("expand", "expand_as", "broadcast_to")
def _expand(imp, x, *a, **k):
    return imp.emit("expand", [x, _Const(_torch_i64(imp.out_shape()), "shape")])


@_aten("permute")
def _permute(imp, x, dims):
    v = imp.value(x)
    perm = [int(d) % max(v.type.rank, 1) for d in dims]
    return _transpose(imp, x, perm)


@_aten("transpose")
def _transpose_int(imp, x, d0, d1):
    rank = imp.value(x).type.rank if not isinstance(x, _Const) else x.tensor.dim()
    perm = list(range(rank))
    d0, d1 = d0 % rank, d1 % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _transpose(imp, x, perm)


@_aten("t", "numpy_T")
def _t(imp, x):
    rank = imp.value(x).type.rank
    return _transpose(imp, x, list(range(rank))[::-1])


def _transpose(imp, x, perm: list[int]) -> Value:
    """transpose; a 2-D transpose of dequantize(constant codes) becomes a dequantize of
    transposed codes, so that fuse-dequant sees ``matmul(x, dequantize([K, N] codes))``."""
    v = imp.value(x)
    if perm == sorted(perm):
        return v
    dq = v.producer
    if v.type.rank == 2 and dq is not None and dq.op == "dequantize" \
            and all(o is None or constant_value(imp.module, o) is not None
                    for o in dq.operands[:3]) and dq.arg("g_idx") is None:
        scheme: QuantScheme = dq.attrs["scheme"]
        ops = []
        for o in dq.operands[:3]:
            if o is None:
                ops.append(None)
                continue
            arr = constant_value(imp.module, o)
            if arr.ndim == 2 and scheme.granularity != "tensor":
                arr = np.ascontiguousarray(arr.T)
            t = TensorType(tuple(arr.shape), o.type.dtype)
            ops.append(constant_node(imp.fn, imp.module, arr, t,
                                     name_hint=f"{o.name}.t").result)
        if scheme.granularity != "tensor":
            scheme = scheme.replace(axis=1 - scheme.axis)
        return imp.emit("dequantize", ops, {"scheme": scheme, "out": dq.attrs["out"]})
    return imp.emit("transpose", [v], {"perm": perm})


@_aten("slice")
def _slice(imp, x, dim=0, start=None, end=None, step=1):
    v = imp.value(x)
    dim = dim % v.type.rank
    size = v.type.shape[dim]
    start = 0 if start is None else int(start)
    end = size if end is None else min(int(end), size)
    if start == 0 and end == size and step == 1:
        return v
    consts = [_Const(_torch_i64([s]), "slice") for s in (start, end, dim, step)]
    return imp.emit("slice", [v] + consts)


@_aten("select")
def _select(imp, x, dim, index):
    import torch

    return imp.emit("gather", [x, _Const(torch.tensor(int(index)), "index")],
                    {"axis": int(dim)})


@_aten("index_select")
def _index_select(imp, x, dim, index):
    return imp.emit("gather", [x, index], {"axis": int(dim)})


@_aten("index")
def _index(imp, x, indices):
    """x[i0, i1, ...] with index tensors for the leading dims (as masks are built)."""
    import torch

    if any(i is None for i in indices):
        raise imp.fail("indexing with None (a full slice) between index tensors is not "
                       "supported")
    for i in indices:
        dtype = i.tensor.dtype if isinstance(i, _Const) else None
        if (dtype is not None and dtype == torch.bool) or \
                (isinstance(i, Value) and i.type.dtype.name == "bool"):
            raise imp.fail("boolean mask indexing (a data-dependent shape) is not supported")
    if all(isinstance(i, _Const) for i in indices):
        idx = torch.broadcast_tensors(*[i.tensor.to(torch.int64) for i in indices])
        stacked = torch.stack(idx, dim=-1)
        return imp.emit("gather_nd", [x, _Const(stacked, "index")])
    if len(indices) == 1:
        return imp.emit("gather", [x, indices[0]], {"axis": 0})
    raise imp.fail("several run-time index tensors are not supported")


@_aten("gather")
def _gather(imp, x, dim, index, sparse_grad=False):
    return imp.emit("gather_elements", [x, index], {"axis": int(dim)})


@_aten("embedding")
def _embedding(imp, weight, indices, *rest):
    return imp.emit("gather", [weight, indices], {"axis": 0})


@_aten("cat", "concat")
def _cat(imp, tensors, dim=0):
    dtype = imp.out_dtype()
    return imp.emit("concat", [imp.value(t, dtype) for t in tensors], {"axis": int(dim)})


@_aten("stack")
def _stack(imp, tensors, dim=0):
    parts = [imp.emit("unsqueeze", [t], {"axes": [int(dim)]}) for t in tensors]
    return imp.emit("concat", parts, {"axis": int(dim)})


@_aten("split", "split_with_sizes")
def _split(imp, x, sizes, dim=0):
    v = imp.value(x)
    dim = dim % v.type.rank
    total = v.type.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - i) for i in range(0, total, sizes)]
    out = imp.emit("split", [v], {"axis": dim, "sizes": [int(s) for s in sizes]})
    return out if isinstance(out, list) else [out]


@_aten("chunk")
def _chunk(imp, x, chunks, dim=0):
    v = imp.value(x)
    total = v.type.shape[dim % v.type.rank]
    size = -(-total // chunks)
    return _split(imp, x, size, dim)
