// qcompiler CUDA kernels: the kernels' argument block and the compile-time configuration
// every kernel template takes. Static code, included by the generated .cu.
//
// The configuration C is a struct that the generated .cu defines from what the passes decided
// (reorder-weights, schedule-unpack; codegen/cuda/backend.py, kernel_params):
//   using scalar_t                 half or __nv_bfloat16: x, y, scales and zero points
//   int CB                         bits per weight container (4 or 8)
//   int K, N, K_PAD, N_PAD         the matmul's K and N, padded (codegen/cuda/layout.py)
//   int N_BLOCKS                   N_PAD / 64: the n64 warp tiles
//   int GROUP                      K rows per scale row
//   bool SCALE_IN_EPILOGUE         per-channel scales, applied to the fp32 sums
//   bool HAS_ZP                    a zero point per group and column (else ZERO_CONST)
//   float ZERO_CONST               the constant zero point (after the bias to unsigned)
//   bool PREP_X                    x is permuted (act-order) or padded first
//   bool PDL                       programmatic dependent launch of the GEMV kernel (sm_90)
//   bool WGMMA_PDL                 the same for the wgmma kernels (tile{wgmma_pdl=1})
//   int CODE_BITS                  bits of the model's codes (the int8 kernel's centring)
//   int X_NORM, float X_NORM_EPS   x's rows are normalized first (qmatmul x_norm, fuse-norm-
//                                  qmatmul; norm.cuh): X_NORM_NONE, X_NORM_RMS (rmsnorm(x,
//                                  norm_w)) or X_NORM_LAYER (layernorm(x, norm_w, norm_b)), as
//                                  the reference computes them (f32 statistics, rows rounded)
//   using Unpack                   one of the strategies in unpack.cuh
//   struct Epilogue                FUSED, EXTRAS (operands it reads), PAIRS, apply(v, extras, i):
//                                  the qmatmul's epilogue on element i of y (fuse-epilogue's
//                                  body), or the identity; with PAIRS (fuse-gate-up)
//                                  apply_pair(a, b) on product columns 2j, 2j + 1 instead
// (all static constexpr).
#ifndef QCOMPILER_PARAMS_CUH
#define QCOMPILER_PARAMS_CUH

#include <cuda_runtime.h>
#include <stdint.h>

// A plain kernel launch. Under QC_HOST_EMULATION (tests/cuda_host/emulator) the grid runs on
// the host, its threads as fibers, so that these kernels can be checked without a GPU.
#ifndef QC_HOST_EMULATION
#define QC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#else
#define QC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  qc_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#endif

namespace qc {

constexpr int kMaxEpilogueExtras = 4;  // codegen/cuda/backend.py MAX_EPILOGUE_EXTRAS

template <class S>
struct Params {
  const S* x;              // [M, x_stride]
  S* y;                    // [M, N]
  const uint4* w;          // packed codes (codegen/cuda/layout.py)
  const S* scales;         // [scale rows, N_PAD] (permuted) or [N_PAD] (epilogue)
  const S* zeros;          // [scale rows, N_PAD] (permuted), zero point after the unsigned bias
  const float* bias;       // [N] or null
  float* partial;          // [split_k, M, N] split-K partial sums
  int* counters;           // one per output tile, zero between launches
  // The fused epilogue's extra operands ([M, N] each), by value: the caller's array is host
  // memory. epilogue == false: y is the product (the caller applies any epilogue itself).
  const void* extras[kMaxEpilogueExtras];
  bool epilogue;
  int M, x_stride, split_k;
  // int8 activations (tiled_i8.cuh): x quantized per row and group by make_params.
  const int8_t* xq;        // [M, K_PAD], K in the kernel's order (quantize_x_i8_kernel)
  const float* xs;         // [x groups, xs_stride]: the scale of each row's group
  const int* xsum;         // [x groups, xs_stride]: the sum of each row's group's int8 codes
  int xs_stride;           // M rounded up to 4 (16-byte rows of scales)
  // C::X_NORM: the normalization's scale [K] and (LayerNorm) bias [K] or null. norm_in_kernel:
  // the GEMV kernel applies the norm itself (RMSNorm after the product, LayerNorm's rows into
  // shared memory); otherwise x already is the normalized copy make_params wrote into the
  // workspace.
  const S* norm_w;
  const S* norm_b;
  bool norm_in_kernel;
  // The GEMV kernel asks L2 for its weights past the first ring before it waits for the
  // previous kernel (programmatic dependent launch: while that one still runs).
  bool l2_prefetch;
};

}  // namespace qc

#endif  // QCOMPILER_PARAMS_CUH
