"""The CPU op kernel library: a TVM TensorIR kernel for every QIR op but qmatmul.

``kernel.primfunc_for(node)`` gives one node's scheduled PrimFunc (destination-passing:
operands then results as buffers; symbolic dims as shared vars); ``library.build_ops_library``
builds all distinct kernels of a model into one .so and ``library.OpsLibrary`` loads it.
``compute.py`` holds the computations (TE), ``scalar.py`` the elementwise semantics (also of
fused bodies), ``schedule.py`` the schedules, ``common.py`` types, dims and kernel names.
"""
from qcompiler.codegen.cpu.ops.kernel import SUPPORTED_OPS, primfunc_for
from qcompiler.codegen.cpu.ops.library import OpsLibrary, build_ops_library

__all__ = ["SUPPORTED_OPS", "primfunc_for", "OpsLibrary", "build_ops_library"]
