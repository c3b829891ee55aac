"""The CUDA op kernel library: a generated CUDA kernel for every op of a transformer but
qmatmul (elementwise and fused bodies, casts, softmax/layernorm/rmsnorm, reductions, data
movement, gather, batched matmul, attention prefill and decode).

``kernel.kernel_source(node)`` renders one node's kernel from ``templates/ops/``;
``library.build_cuda_ops_library`` builds all distinct kernels of a model into one .so with
nvcc and ``library.CudaOpsLibrary`` calls them with device pointers, dims and a stream.
``body.py`` turns elementwise bodies into device functions; ``common.py`` holds the ABI.
"""
from qcompiler.codegen.cuda.ops.common import CudaOpsError
from qcompiler.codegen.cuda.ops.kernel import SUPPORTED_OPS, kernel_source
from qcompiler.codegen.cuda.ops.library import (CudaOpsLibrary, build_cuda_ops_library,
                                                library_path, library_source)

__all__ = ["SUPPORTED_OPS", "CudaOpsError", "kernel_source", "CudaOpsLibrary",
           "build_cuda_ops_library", "library_path", "library_source"]
