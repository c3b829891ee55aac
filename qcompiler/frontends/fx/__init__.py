"""torch.fx / torch.export → QIR.

``load(model, example_inputs)`` takes a ``torch.nn.Module`` (a plain module, a
``torch.fx.GraphModule`` from ``symbolic_trace`` or from PT2E quantization) or a
``torch.export.ExportedProgram`` and returns a Module whose ``main`` function mirrors the
ATen graph that ``torch.export`` produces:

- user inputs become arguments (shapes and dtypes of ``example_inputs``: the graph is
  specialized to those shapes, like ``torch.compile(dynamic=False)``); parameters, buffers and
  lifted constants become ``constant`` nodes named after their state-dict key;
- nodes whose inputs are all constants (``arange``, position-id slices, masks built from
  shapes, transposed weights ...) are evaluated with torch at import time (constant folding),
  except the quantization ops, which are kept so that ``fuse-dequant`` can see them;
- ``quantized_decomposed`` ops (what PT2E's ``convert_pt2e`` and torchao's 8da4w / int4
  flows write: ``quantize_per_tensor``, ``dequantize_per_tensor``, ``*_per_channel``,
  ``dequantize_per_channel_group``) become ``quantize`` / ``dequantize`` with the scheme their
  arguments give; ``quant_min``/``quant_max`` of -8..7 or 0..15 mean 4-bit codes;
- ``linear`` becomes ``matmul(x, Wᵀ) (+ add bias)``, with Wᵀ made at import time (a
  transposed constant, or a transposed ``dequantize`` of constant codes), so a weight reaches
  ``quantize-weights`` / ``fuse-dequant`` as the ``[K, N]`` operand they expect;
- ``scaled_dot_product_attention`` is expanded into ``matmul``, ``softmax`` and the mask.

Anything else is refused with a ``FrontendError`` naming the ATen op and the fx node.

``TorchCompiled`` (what ``qcompiler.compile(torch_module, example_inputs=...)`` returns)
accepts and returns torch tensors, and recompiles for input shapes it has not seen.

The package, along the importer's seams:

- ``trace``: the entry points (``load``, ``export``, ``is_torch_model``, ``TorchCompiled``);
- ``importer``: the importer core (values, constants, the node loop, constant folding);
- ``tensors``: dtypes and tensors between torch and QIR, and the import-time constants;
- ``registry``: the op-handler table and its registration decorators;
- ``ops_shape``, ``ops_elementwise``, ``ops_norm``, ``ops_matmul``, ``ops_quant``: the ATen and
  ``quantized_decomposed`` handlers by family.
"""
from __future__ import annotations

# The handler modules register their ops on import (the order is the table's: a later
# registration of a name wins).
from qcompiler.frontends.fx import ops_shape, ops_elementwise, ops_norm  # noqa: F401
from qcompiler.frontends.fx import ops_matmul, ops_quant  # noqa: F401
from qcompiler.frontends.fx.registry import supported_ops
from qcompiler.frontends.fx.trace import TorchCompiled, export, is_torch_model, load
from qcompiler.frontends.onnx import FrontendError

__all__ = ["load", "export", "is_torch_model", "TorchCompiled", "supported_ops", "FrontendError"]
