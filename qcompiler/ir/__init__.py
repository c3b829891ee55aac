"""QIR: the quantization IR (types, graph, ops, printer, parser, verifier)."""
from qcompiler.ir.core import (Function, Module, Node, Value, constant_node,  # noqa: F401
                               constant_value)
from qcompiler.ir.ops import OPS, TypeInferenceError, infer_types  # noqa: F401
from qcompiler.ir.parser import ParseError, parse_module  # noqa: F401
from qcompiler.ir.printer import print_module  # noqa: F401
from qcompiler.ir.types import (ELEMENT_TYPES, ElementType, Layout, QuantScheme,  # noqa: F401
                                TensorType, elem, tensor)
from qcompiler.ir.verifier import VerificationError, verify  # noqa: F401
