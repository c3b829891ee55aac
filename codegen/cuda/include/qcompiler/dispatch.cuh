// qcompiler CUDA kernels: the host side of a call. The variants (one configuration of the tile
// pass per M bucket), the device workspace, the act-order / padding copy of x, and the
// parameters of a launch. The generated .cu holds the variant table and picks the kernel
// instance. Static code, included by the generated .cu.
#ifndef QCOMPILER_DISPATCH_CUH
#define QCOMPILER_DISPATCH_CUH

#include <cuda_runtime.h>
#include <stddef.h>

#include "params.cuh"
#include "scalar.cuh"

namespace qc {

// One entry of the tile pass's variants (a row of the generated VARIANTS table).
struct Variant {
  int m_max, gemv, m_frags, warps_n, warps_k, stages, stage_k, acc_scale, split_k;
  int wgmma;  // 1: the sm_90a wgmma kernel (wgmma.cuh); tables without it leave it 0
};

// Workspace: [split-K tile counters | split-K partials | prepared x], each 256-byte aligned.
// The counters have a fixed place and size whatever M and the variant: the caller zeroes the
// workspace once, every launch leaves its counters at zero, and no call's partials or x can
// land on a later call's counters. A grid with more tiles than counters (a large M, which
// needs no split of K to fill the GPU) runs without split-K.
inline constexpr int MAX_COUNTERS = 16384;
inline constexpr size_t COUNTERS_BYTES = MAX_COUNTERS * sizeof(int);
inline size_t align256(size_t v) { return (v + 255) / 256 * 256; }

inline int m_tile(const Variant& v) { return (v.gemv ? 8 : 16) * v.m_frags; }  // rows per CTA

// The K splits a call with M rows runs: the variant's, or 1 past the counters' capacity.
template <class C>
int splits(const Variant& v, int M) {
  const long long tiles = (long long)((M + m_tile(v) - 1) / m_tile(v)) *
                          ((C::N_BLOCKS + v.warps_n - 1) / v.warps_n);
  return tiles <= MAX_COUNTERS ? v.split_k : 1;
}

template <class C>
size_t workspace_bytes(const Variant& v, int M) {
  size_t bytes = COUNTERS_BYTES;
  if (splits<C>(v, M) > 1) bytes += align256(sizeof(float) * (size_t)splits<C>(v, M) * M * C::N);
  if (C::PREP_X) bytes += align256(sizeof(typename C::scalar_t) * (size_t)M * C::K_PAD);
  return bytes;
}

// x'[m, k] = x[m, perm[k]] for k < K, 0 up to K_PAD: the act-order permutation of K (and the
// padding of K to the 16-byte copies), done once per call instead of a gather in the loop.
template <class C>
__global__ void prepare_x_kernel(const typename C::scalar_t* x, typename C::scalar_t* xp,
                                 const int* perm, int M) {
  const long long total = (long long)M * C::K_PAD;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int m = (int)(i / C::K_PAD), k = (int)(i % C::K_PAD);
    xp[i] = k < C::K ? x[(long long)m * C::K + (perm ? perm[k] : k)]
                     : from_float<typename C::scalar_t>(0.0f);
  }
}

// The launch parameters of variant v for a call with M rows, the workspace laid out as above;
// with PREP_X the prepared copy of x is made first (on `stream`).
template <class C>
cudaError_t make_params(const Variant& v, const void* x, void* y, const void* w,
                        const void* scales, const void* zeros, const float* bias,
                        const int* perm, int M, void* workspace, cudaStream_t stream,
                        const void* const* extras, Params<typename C::scalar_t>& p) {
  using S = typename C::scalar_t;
  p.x = static_cast<const S*>(x);
  p.y = static_cast<S*>(y);
  p.w = static_cast<const uint4*>(w);
  p.scales = static_cast<const S*>(scales);
  p.zeros = static_cast<const S*>(zeros);
  p.bias = bias;
  p.epilogue = extras != nullptr;
  for (int i = 0; i < kMaxEpilogueExtras; ++i) p.extras[i] = nullptr;
  if (extras)  // the generated source reads only Config::Epilogue's extras (at most the max)
    for (int i = 0; i < C::Epilogue::EXTRAS; ++i) p.extras[i] = extras[i];
  p.M = M;
  p.x_stride = C::K;
  p.split_k = splits<C>(v, M);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  p.counters = reinterpret_cast<int*>(ws);
  ws += COUNTERS_BYTES;
  p.partial = reinterpret_cast<float*>(ws);
  if (p.split_k > 1) ws += align256(sizeof(float) * (size_t)p.split_k * M * C::N);
  if (C::PREP_X) {
    S* xp = reinterpret_cast<S*>(ws);
    const long long total = (long long)M * C::K_PAD;
    const int blocks = (int)((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
    QC_LAUNCH(prepare_x_kernel<C>, blocks, 256, 0, stream, p.x, xp, perm, M);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    p.x = xp;
    p.x_stride = C::K_PAD;
  }
  return cudaSuccess;
}

// The variant for M rows: the first whose m_max holds M, else the last.
inline const Variant& pick(const Variant* variants, int n_variants, int M) {
  for (int i = 0; i < n_variants - 1; ++i)
    if (M <= variants[i].m_max) return variants[i];
  return variants[n_variants - 1];
}

}  // namespace qc

#endif  // QCOMPILER_DISPATCH_CUH
