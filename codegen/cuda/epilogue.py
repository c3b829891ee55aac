"""A qmatmul's epilogue in the qmatmul kernel itself (the CUDA backend and the device plan
decide it the same way, here).

``fuse-epilogue`` gives a qmatmul an ``epilogue`` body over the product (``x0``) and extra
operands (``x1``...). When every extra has the product's shape, the kernel applies the body
to y[i] as it stores it (``Config::Epilogue`` in ``templates/qmatmul.cu.j2``), reading
element i of each extra: no launch of its own. Otherwise the device plan runs it as a
``fused_elementwise`` kernel in place on the product (``plan.epilogue_node``). An epilogue over
column pairs (``epilogue_pairs``, from ``fuse-gate-up``) is always the kernel's: it reads
the two sums of a pair from the tile and stores one column.
"""
from __future__ import annotations

from qcompiler.ir.ops import qmatmul_epilogue_operands

# Extra operands a fused epilogue may read (qc::kMaxEpilogueExtras: kernel parameters).
MAX_EPILOGUE_EXTRAS = 4


def epilogue_in_kernel(node) -> bool:
    """Whether the qmatmul kernel applies ``node``'s epilogue as it stores y (the device plan
    then has no separate epilogue launch): every extra operand has y's shape, so element i of
    each is read beside y[i]. Otherwise (an extra that broadcasts) the plan runs the epilogue
    as a kernel of its own after the product (``plan.epilogue_node``)."""
    if "epilogue" not in node.attrs:
        return False
    if node.attrs.get("epilogue_pairs"):
        return True  # the pairs only exist inside the kernel's tile
    extras = qmatmul_epilogue_operands(node)
    shape = tuple(node.result.type.shape)
    return len(extras) <= MAX_EPILOGUE_EXTRAS and all(
        v is not None and tuple(v.type.shape) == shape for v in extras)


def epilogue_params(node) -> dict | None:
    """The template's ``epilogue``: the body's text (for a comment: the caller makes it safe
    there), the body as a device function and the extras' C types."""
    if not epilogue_in_kernel(node):
        return None
    from qcompiler.codegen.cuda.ops.common import c_type
    from qcompiler.codegen.cuda.ops.body import device_function
    from qcompiler.ir.elementwise_body import parse_body

    extras = qmatmul_epilogue_operands(node)
    pairs = bool(node.attrs.get("epilogue_pairs"))
    product = node.arg("x").type.dtype  # act float: the product has x's type
    operand_types = [product, product] if pairs else \
        [node.result.type.dtype] + [v.type.dtype for v in extras]
    fn = device_function("epilogue_body", parse_body(node.attrs["epilogue"]), operand_types,
                         c_type(node.result.type.dtype, node), node)
    return {"text": node.attrs["epilogue"], "fn": fn.rstrip("\n"), "pairs": pairs,
            "extra_types": [c_type(v.type.dtype, node) for v in extras]}
