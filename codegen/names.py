"""Names that generated code may use: C identifiers and file names made from IR value names.

Shared by the backends that emit C/C++ (CUDA kernel symbols, the HLS top function): a value
name from an ONNX model or a ``.qir`` file may hold any character, and must never reach the
generated source as anything but a plain identifier.
"""
from __future__ import annotations

import hashlib
import re

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def safe_identifier(prefix: str, name: str, max_len: int = 64) -> str:
    """``prefix + name`` if that is ``[A-Za-z_][A-Za-z0-9_]*`` of at most ``max_len``
    characters, else a stable sanitized form with an 8-digit hash of ``name`` (so two names
    that sanitize to the same text, ``a.b`` and ``a_b``, stay apart)."""
    text = prefix + name
    if IDENTIFIER.fullmatch(text) and len(text) <= max_len:
        return text
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    body = re.sub(r"[^A-Za-z0-9_]", "_", name.encode("ascii", "replace").decode("ascii"))
    return f"{prefix}{body[:max_len - len(prefix) - 9]}_{digest}"
