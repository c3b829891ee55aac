// qcompiler CUDA kernels: the RMS normalization of x that a qmatmul with x_norm = "rms"
// (fuse-norm-qmatmul) applies before its product. One warp normalizes one row of K elements:
// the sum of squares in f32 (lane-strided, then a shuffle reduction), then each element as
// (x / sqrt(mean + eps)) * w, rounded to S, as the reference's rmsnorm computes it. The GEMV
// kernel writes its rows into shared memory with it (gemv.cuh); the other kernels read a copy
// that normalize_x_kernel writes into the workspace (dispatch.cuh). Static code, included by
// the generated .cu.
#ifndef QCOMPILER_NORM_CUH
#define QCOMPILER_NORM_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "scalar.cuh"

namespace qc {

// Shared memory the GEMV kernel may give its normalized rows of x (dispatch.cuh decides).
inline constexpr int GEMV_NORM_SMEM = 48 * 1024;

// 16-byte packs of a row when K allows them (rows then start 16-byte aligned: x's rows are
// K elements apart and its buffer is 256-byte aligned).
template <class C>
__host__ __device__ constexpr bool norm_packs() {
  return C::K % 8 == 0;
}

// sqrt(mean(row^2) + eps) of a row of C::K elements; every lane of the warp gets it.
template <class C>
__device__ __forceinline__ float row_rms(const typename C::scalar_t* row, int lane) {
  using S = typename C::scalar_t;
  float ss = 0.0f;
  if constexpr (norm_packs<C>()) {
    for (int k = lane * 8; k < C::K; k += 32 * 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + k);
      const S* e = reinterpret_cast<const S*>(&v);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float f = to_float(e[j]);
        ss += f * f;
      }
    }
  } else {
    for (int k = lane; k < C::K; k += 32) {
      const float f = to_float(row[k]);
      ss += f * f;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  return sqrtf(ss / (float)C::K + C::X_NORM_EPS);
}

// out[j] = (row[col(j)] / rms) * w[col(j)] for j < C::K, 0 for C::K <= j < out_len, where
// col(j) = perm[j] (act-order) or j. The warp's lanes take every 32nd element.
template <class C>
__device__ __forceinline__ void normalize_row(const typename C::scalar_t* row,
                                              const typename C::scalar_t* w, float rms,
                                              const int* perm, typename C::scalar_t* out,
                                              int out_len, int lane) {
  using S = typename C::scalar_t;
  for (int j = lane; j < out_len; j += 32) {
    float v = 0.0f;
    if (j < C::K) {
      const int k = perm ? perm[j] : j;
      v = to_float(row[k]) / rms * to_float(w[k]);
    }
    out[j] = from_float<S>(v);
  }
}

// Rows [0, rows) of x (rows x_stride apart) normalized by the whole CTA (THREADS threads)
// into out (rows out_stride apart, zero from column K on): each thread sums the squares of
// every THREADS-th element of each row, the warps' sums meet in `scratch` (WARPS x ROWS
// floats of shared memory), then each thread writes its elements. rows <= ROWS. Every thread
// of the CTA calls it; it ends with a barrier (out is then complete, scratch free).
template <class C, int THREADS, int ROWS>
__device__ __forceinline__ void normalize_rows_cta(const typename C::scalar_t* x, int x_stride,
                                                   int rows, const typename C::scalar_t* w,
                                                   typename C::scalar_t* out, int out_stride,
                                                   float* scratch) {
  using S = typename C::scalar_t;
  constexpr int WARPS = THREADS / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float ss[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    ss[r] = 0.0f;
    if (r < rows)
      for (int k = tid; k < C::K; k += THREADS) {
        const float f = to_float(x[(long long)r * x_stride + k]);
        ss[r] += f * f;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], o);
    if (lane == 0) scratch[warp * ROWS + r] = ss[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r >= rows) break;
    float total = 0.0f;
    for (int i = 0; i < WARPS; ++i) total += scratch[i * ROWS + r];  // fixed order
    const float rms = sqrtf(total / (float)C::K + C::X_NORM_EPS);
    for (int j = tid; j < out_stride; j += THREADS)
      out[(long long)r * out_stride + j] = from_float<S>(
          j < C::K ? to_float(x[(long long)r * x_stride + j]) / rms * to_float(w[j]) : 0.0f);
  }
  __syncthreads();
}

// x'[m, :] = the normalized row m of x, in out_stride columns (K_PAD for the kernels that
// read a prepared copy, with the act-order permutation; K for the 8-bit-activation
// quantizer, which permutes itself). One warp per row.
template <class C>
__global__ void normalize_x_kernel(const typename C::scalar_t* x,
                                   typename C::scalar_t* xp,
                                   const typename C::scalar_t* w, const int* perm, int M,
                                   int out_stride) {
  const int lane = threadIdx.x & 31;
  const int m = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5);
  if (m >= M) return;  // whole warps: the shuffles see all 32 lanes
  const typename C::scalar_t* row = x + (long long)m * C::K;
  normalize_row<C>(row, w, row_rms<C>(row, lane), perm, xp + (long long)m * out_stride,
                   out_stride, lane);
}

}  // namespace qc

#endif  // QCOMPILER_NORM_CUH
