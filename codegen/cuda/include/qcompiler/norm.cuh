// qcompiler CUDA kernels: the normalization of x that a qmatmul with x_norm applies before its
// product (fuse-norm-qmatmul): RMSNorm, (x / sqrt(mean(x^2) + eps)) * w, or LayerNorm,
// ((x - mean) * (1 / sqrt(var + eps))) * w + b, each with f32 statistics and the row rounded to
// S, as the reference's rmsnorm and layernorm compute them (Config::X_NORM says which). The
// GEMV kernel writes its rows into shared memory with normalize_rows_cta (gemv.cuh); the other
// kernels read a copy that normalize_x_kernel writes into the workspace (dispatch.cuh).
// Static code, included by the generated .cu.
#ifndef QCOMPILER_NORM_CUH
#define QCOMPILER_NORM_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "scalar.cuh"

namespace qc {

// Config::X_NORM: what the qmatmul does to x first.
inline constexpr int X_NORM_NONE = 0, X_NORM_RMS = 1, X_NORM_LAYER = 2;

// Shared memory the GEMV kernel may give its normalized rows of x (dispatch.cuh decides).
inline constexpr int GEMV_NORM_SMEM = 48 * 1024;

// A row's statistics: RMS: (0, rms); LAYER: (mean, 1 / sqrt(var + eps)).
struct RowStats {
  float mean, scale;
};

// Element v (column k) of a normalized row; b is null for RMS (and a LayerNorm without bias).
template <class C>
__device__ __forceinline__ float normalized(float v, RowStats st, const typename C::scalar_t* w,
                                            const typename C::scalar_t* b, int k) {
  if constexpr (C::X_NORM == X_NORM_RMS) {
    return v / st.scale * to_float(w[k]);
  } else {
    const float y = (v - st.mean) * st.scale * to_float(w[k]);
    return b ? y + to_float(b[k]) : y;
  }
}

// The statistics of a row of C::K elements from its sums over the row: sum(v) and sum(v^2)
// (RMS), or sum(v) then sum((v - mean)^2) (LAYER: the second from the mean of the first).
template <class C>
__device__ __forceinline__ float rms_of(float sum_sq) {
  return sqrtf(sum_sq / (float)C::K + C::X_NORM_EPS);
}
template <class C>
__device__ __forceinline__ float inv_std_of(float sum_centred_sq) {
  return 1.0f / sqrtf(sum_centred_sq / (float)C::K + C::X_NORM_EPS);
}

__device__ __forceinline__ float warp_total(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The statistics of a row, by one warp (every lane gets them).
template <class C>
__device__ __forceinline__ RowStats row_stats(const typename C::scalar_t* row, int lane) {
  auto sum = [&](auto f) {
    float s = 0.0f;
    for (int k = lane; k < C::K; k += 32) s += f(to_float(row[k]));
    return warp_total(s);
  };
  if constexpr (C::X_NORM == X_NORM_RMS) {
    return {0.0f, rms_of<C>(sum([](float v) { return v * v; }))};
  } else {
    const float mean = sum([](float v) { return v; }) / (float)C::K;
    return {mean, inv_std_of<C>(sum([&](float v) { return (v - mean) * (v - mean); }))};
  }
}

// Per row r < ROWS: v[r] summed over the CTA's THREADS threads, into every thread's v[r]. Each
// warp's totals meet in `scratch` (WARPS x ROWS floats of shared memory), added in warp order.
template <int THREADS, int ROWS>
__device__ __forceinline__ void cta_totals(float (&v)[ROWS], float* scratch) {
  constexpr int WARPS = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float t = warp_total(v[r]);
    if (lane == 0) scratch[warp * ROWS + r] = t;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    v[r] = 0.0f;
    for (int i = 0; i < WARPS; ++i) v[r] += scratch[i * ROWS + r];
  }
  __syncthreads();  // scratch free again
}

// Rows [0, rows) of x (rows x_stride apart) normalized by the whole CTA (THREADS threads) into
// out (rows out_stride apart, zero from column K on): each thread takes every THREADS-th
// element of each row; the row sums meet in `scratch` (cta_totals). rows <= ROWS. Every
// thread of the CTA calls it; it ends with a barrier (out is then complete, scratch free).
template <class C, int THREADS, int ROWS>
__device__ __forceinline__ void normalize_rows_cta(const typename C::scalar_t* x, int x_stride,
                                                   int rows, const typename C::scalar_t* w,
                                                   const typename C::scalar_t* b,
                                                   typename C::scalar_t* out, int out_stride,
                                                   float* scratch) {
  using S = typename C::scalar_t;
  const int tid = threadIdx.x;
  auto element = [&](int r, int k) { return to_float(x[(long long)r * x_stride + k]); };
  float sums[ROWS];
  RowStats st[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    sums[r] = 0.0f;
    if (r < rows)
      for (int k = tid; k < C::K; k += THREADS) {
        const float v = element(r, k);
        sums[r] += C::X_NORM == X_NORM_RMS ? v * v : v;
      }
  }
  cta_totals<THREADS, ROWS>(sums, scratch);
  if constexpr (C::X_NORM == X_NORM_RMS) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) st[r] = {0.0f, rms_of<C>(sums[r])};
  } else {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      st[r].mean = sums[r] / (float)C::K;
      sums[r] = 0.0f;
      if (r < rows)
        for (int k = tid; k < C::K; k += THREADS) {
          const float d = element(r, k) - st[r].mean;
          sums[r] += d * d;
        }
    }
    cta_totals<THREADS, ROWS>(sums, scratch);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) st[r].scale = inv_std_of<C>(sums[r]);
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r >= rows) break;
    for (int j = tid; j < out_stride; j += THREADS)
      out[(long long)r * out_stride + j] =
          from_float<S>(j < C::K ? normalized<C>(element(r, j), st[r], w, b, j) : 0.0f);
  }
  __syncthreads();
}

// x'[m, :] = the normalized row m of x, in out_stride columns (K_PAD for the kernels that
// read a prepared copy, with the act-order permutation; K for the 8-bit-activation
// quantizer, which permutes itself): column j holds x's column perm[j] (or j), zero from K
// on. One warp per row.
template <class C>
__global__ void normalize_x_kernel(const typename C::scalar_t* x, typename C::scalar_t* xp,
                                   const typename C::scalar_t* w, const typename C::scalar_t* b,
                                   const int* perm, int M, int out_stride) {
  using S = typename C::scalar_t;
  const int lane = threadIdx.x & 31;
  const int m = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5);
  if (m >= M) return;  // whole warps: the shuffles see all 32 lanes
  const S* row = x + (long long)m * C::K;
  const RowStats st = row_stats<C>(row, lane);
  S* out = xp + (long long)m * out_stride;
  for (int j = lane; j < out_stride; j += 32) {
    float v = 0.0f;
    if (j < C::K) {
      const int k = perm ? perm[j] : j;
      v = normalized<C>(to_float(row[k]), st, w, b, k);
    }
    out[j] = from_float<S>(v);
  }
}

}  // namespace qc

#endif  // QCOMPILER_NORM_CUH
