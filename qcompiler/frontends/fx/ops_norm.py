"""ATen op handlers: reductions, softmax and normalization (layer, RMS, batch)."""
from __future__ import annotations

from qcompiler.frontends.fx.registry import _aten
from qcompiler.frontends.fx.tensors import _Const


def _dims(dim, rank) -> list[int]:
    if dim is None:
        return list(range(rank))
    if isinstance(dim, int):
        return [dim]
    return [int(d) for d in dim] or list(range(rank))


@_aten("sum")
def _sum(imp, x, dim=None, keepdim=False, dtype=None):
    v = imp.value(x, imp.out_dtype())
    return imp.emit("reduce_sum", [v], {"axes": _dims(dim, v.type.rank),
                                        "keepdims": int(bool(keepdim))})


@_aten("mean")
def _mean(imp, x, dim=None, keepdim=False, dtype=None):
    v = imp.value(x, imp.out_dtype())
    return imp.emit("reduce_mean", [v], {"axes": _dims(dim, v.type.rank),
                                         "keepdims": int(bool(keepdim))})


@_aten("linalg_vector_norm", "norm")
def _norm(imp, x, ord=2, dim=None, keepdim=False, dtype=None):
    if ord != 2:
        raise imp.fail(f"vector norm of order {ord} is not supported (only 2)")
    v = imp.value(x, imp.out_dtype())
    return imp.emit("reduce_l2", [v], {"axes": _dims(dim, v.type.rank),
                                       "keepdims": int(bool(keepdim))})


@_aten("softmax", "_softmax", "_safe_softmax")
def _softmax(imp, x, dim, *rest):
    return imp.emit("softmax", [imp.value(x, imp.out_dtype())], {"axis": int(dim)})


@_aten("layer_norm")
def _layer_norm(imp, x, normalized_shape, weight=None, bias=None, eps=1e-5, *rest):
    import torch

    v = imp.value(x)
    if weight is None:
        weight = _Const(torch.ones(list(normalized_shape), dtype=torch.float32), "ln_scale")
    return imp.emit("layernorm", [v, imp.value(weight, v.type.dtype),
                                  None if bias is None else imp.value(bias, v.type.dtype)],
                    {"axis": -len(normalized_shape), "epsilon": float(eps)})


@_aten("rms_norm")
def _rms_norm(imp, x, normalized_shape, weight=None, eps=None):
    """x / sqrt(mean(x², last dims) + eps) · weight (eps None: the dtype's machine epsilon)."""
    import torch

    dtype = imp.out_dtype()
    v = imp.value(x, dtype)
    if eps is None:
        eps = torch.finfo(imp.meta_val().dtype).eps
    if weight is None:
        weight = _Const(torch.ones(list(normalized_shape), dtype=imp.meta_val().dtype),
                        "rms_scale")
    # One rmsnorm op (f16/bf16 computed in f32, as ONNX RMSNormalization with stash_type 1).
    return imp.emit("rmsnorm", [v, imp.value(weight, dtype)],
                    {"axis": -len(normalized_shape), "epsilon": float(eps)})


@_aten("batch_norm", "_native_batch_norm_legit_no_training")
def _batch_norm(imp, x, weight, bias, running_mean, running_var, *rest):
    """Inference batch norm with constant statistics: one multiply and one add per channel."""
    import torch

    if str(imp.node.target).startswith("aten.batch_norm"):
        training, eps = rest[0], rest[2]
    else:
        training, eps = False, rest[1]
    if training:
        raise imp.fail("batch_norm in training mode: call model.eval() before compiling")
    stats = [running_mean, running_var, weight, bias]
    if not all(a is None or isinstance(a, _Const) for a in stats) or running_mean is None:
        raise imp.fail("batch_norm needs constant running statistics")
    mean, var = running_mean.tensor.double(), running_var.tensor.double()
    w = weight.tensor.double() if weight is not None else torch.ones_like(mean)
    b = bias.tensor.double() if bias is not None else torch.zeros_like(mean)
    scale = w / torch.sqrt(var + eps)
    shift = b - mean * scale
    v = imp.value(x)
    shape = [1, -1] + [1] * (v.type.rank - 2)  # channels on dim 1
    dtype = v.type.dtype
    y = imp.emit("mul", [v, imp.value(_Const(scale.reshape(shape).float(), "bn_scale"), dtype)])
    y = imp.emit("add", [y, imp.value(_Const(shift.reshape(shape).float(), "bn_shift"), dtype)])
    if str(imp.node.target).startswith("aten._native_batch_norm"):
        return [y, None, None]
    return y


@_aten("native_layer_norm")
def _native_layer_norm(imp, x, normalized_shape, weight, bias, eps):
    # Returns (y, mean, rstd); only y may be used.
    return [_layer_norm(imp, x, normalized_shape, weight, bias, eps), None, None]
