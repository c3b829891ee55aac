"""Values between torch and QIR: dtypes, tensors to numpy and back, and constants
known at import time."""
from __future__ import annotations

from typing import Optional

import numpy as np

from qcompiler.frontends.onnx import FrontendError
from qcompiler.ir import elem
from qcompiler.ir.core import Value


_TORCH_TO_QIR = {
    "float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
}


def _qir_dtype(torch_dtype, what: str):
    name = str(torch_dtype).replace("torch.", "")
    try:
        return elem(_TORCH_TO_QIR[name])
    except KeyError:
        raise FrontendError(f"{what}: torch dtype {torch_dtype} is not supported") from None


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def _to_torch(a: np.ndarray):
    import torch

    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


class _Const:
    """A value known at import time (a torch tensor), made a QIR constant only when used."""

    def __init__(self, tensor, hint: str):
        self.tensor = tensor
        self.hint = hint
        self.value: Optional[Value] = None
