"""The key of a tunable kernel: what must be equal for a tuned config to be reused.

A key describes the kernel's problem (shapes, dtypes, quant scheme, activation mode), never the
target or the device: those are separate fields of a log record, so that the same key on
another device is a different entry (``log.best_config`` matches all three).
"""
from __future__ import annotations

import json



def _static_dim(value, what: str, node) -> int:
    if not isinstance(value, int):
        raise ValueError(
            f"qmatmul {_node_name(node)}: {what} must be a static dimension to tune, not {value!r}"
        )
    return value


def _node_name(node) -> str:
    return f"%{node.results[0].name}" if node.results else "<no result>"


def kernel_key(node, m: int) -> dict:
    """The tuning key of a ``qmatmul`` node at a concrete row count ``m``.

    ``k`` is the reduction length (x's last dimension) and ``n`` the columns the kernel
    computes: the result's last dimension, except where ``fuse-gate-up`` paired the columns
    (``epilogue_pairs``: the weight's 2n interleaved columns give n results), where it is the
    weight's columns and the key says ``"epilogue_pairs": 1``. The grid, the weight bytes and
    so every config decision go with the weight's columns: keyed by the result's, the 1B
    decode's gate/up kernel (11264 columns) took the config of a 5632-column layer, 16-warp
    CTAs for 88 blocks where 176 ran in 1.33 waves. Both are logical sizes, the same before
    and after a pass packs the weight into another layout.
    """
    if node.op != "qmatmul":
        raise ValueError(f"kernel_key: only qmatmul nodes are tunable, not {node.op!r}")
    if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
        raise ValueError(f"qmatmul {_node_name(node)}: m must be a positive int, not {m!r}")
    x_type = node.arg("x").type
    w_type = node.arg("w").type
    # x's last dim equals the weight's K (matmul requires it): take whichever is static; a
    # packed weight keeps its logical K and N in its layout.
    logical = (w_type.shape[0], w_type.shape[1]) if w_type.layout is None else (
        w_type.layout.get("k"), w_type.layout.get("n"))
    k = x_type.shape[-1] if isinstance(x_type.shape[-1], int) else logical[0]
    pairs = bool(node.attrs.get("epilogue_pairs"))
    n = node.results[0].type.shape[-1]
    if pairs or not isinstance(n, int):  # the weight's columns (pairs: twice the result's)
        n = logical[1]
    scheme = node.attrs["w_scheme"]
    bias = node.arg("bias")
    # The lowest precision of x the model permits (MatMulNBits's accuracy_level; 4: int8
    # activations, which some kernels take): only where the node has one, so that the keys
    # of every other qmatmul are unchanged.
    level = node.attrs.get("accuracy_level")
    return {
        "op": "qmatmul",
        "m": m,
        "k": _static_dim(k, "k (x's last dimension)", node),
        "n": _static_dim(n, "n (the result's last dimension)", node),
        "w_scheme": str(scheme),  # the model's, also after a pass packed w
        "act": node.attrs["act"],
        "x_dtype": x_type.dtype.name,
        "has_bias": bias is not None,
        "act_order": bool(scheme.act_order),
        **({"accuracy_level": int(level)} if level else {}),
        **({"epilogue_pairs": 1} if pairs else {}),
    }


def key_id(key: dict) -> str:
    """The canonical text of a key (sorted JSON, no spaces): equal keys give equal ids."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def scheme_of(key: dict):
    """The QuantScheme of a key's ``w_scheme`` text (parsed back with the IR parser)."""
    from qcompiler.ir.parser import _Parser

    return _Parser(key["w_scheme"], None).quant_scheme()


def describe(key: dict) -> str:
    """A short readable label: ``m=1 k=4096 n=4096 u4 g128 act=float``."""
    scheme = scheme_of(key)
    gran = {"tensor": "pt", "channel": "pc"}.get(scheme.granularity, f"g{scheme.block_size}")
    extra = (" bias" if key.get("has_bias") else "")
    extra += " act_order" if key.get("act_order") else ""
    extra += " pairs" if key.get("epilogue_pairs") else ""
    return (f"m={key['m']} k={key['k']} n={key['n']} {scheme.dtype.name} {gran} "
            f"x={key['x_dtype']} act={key['act']}{extra}")
