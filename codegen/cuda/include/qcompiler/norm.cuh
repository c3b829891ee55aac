// qcompiler CUDA kernels: the normalization of x that a qmatmul with x_norm applies before its
// product (fuse-norm-qmatmul): RMSNorm, (x / sqrt(mean(x^2) + eps)) * w, or LayerNorm,
// ((x - mean) * (1 / sqrt(var + eps))) * w + b, each with f32 statistics and the row rounded to
// S, as the reference's rmsnorm and layernorm compute them (Config::X_NORM says which). The
// GEMV kernel applies RMSNorm after its product (x * g in the loop, each row's 1 / rms from
// cta_row_stats after it) and writes LayerNorm's rows into shared memory with
// normalize_rows_packs / normalize_rows_cta (gemv.cuh); the other kernels read a copy that
// normalize_x_kernel writes into the workspace (dispatch.cuh).
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

// Element v of a normalized row, with its column's scale w_k and bias b_k (0 without one).
template <class C>
__device__ __forceinline__ float normalized_value(float v, RowStats st, float w_k, float b_k) {
  if constexpr (C::X_NORM == X_NORM_RMS) {
    return v / st.scale * w_k;
  } else {
    return (v - st.mean) * st.scale * w_k + b_k;
  }
}

// Element v (column k) of a normalized row; b is null for RMS (and a LayerNorm without bias).
template <class C>
__device__ __forceinline__ float normalized(float v, RowStats st, const typename C::scalar_t* w,
                                            const typename C::scalar_t* b, int k) {
  return normalized_value<C>(v, st, to_float(w[k]), b ? to_float(b[k]) : 0.0f);
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

// The statistics of rows [0, rows) (rows <= ROWS) into st, by the whole CTA: each_element(r, f)
// calls f(v) for every element v of row r that this thread takes, once per pass (RMS: one pass
// of squares; LAYER: the sum, then the squares about the mean). The sums meet in `scratch`
// (cta_totals); every thread of the CTA calls it and gets every row's statistics.
template <class C, int THREADS, int ROWS, class EachElement>
__device__ __forceinline__ void cta_row_stats(int rows, float* scratch, EachElement each_element,
                                              RowStats (&st)[ROWS]) {
  float sums[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    sums[r] = 0.0f;
    if (r < rows)
      each_element(r, [&](float v) { sums[r] += C::X_NORM == X_NORM_RMS ? v * v : v; });
  }
  cta_totals<THREADS, ROWS>(sums, scratch);
  if constexpr (C::X_NORM == X_NORM_RMS) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) st[r] = {0.0f, rms_of<C>(sums[r])};
  } else {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float mean = sums[r] / (float)C::K;
      st[r].mean = mean;
      sums[r] = 0.0f;
      if (r < rows)
        each_element(r, [&](float v) { sums[r] += (v - mean) * (v - mean); });
    }
    cta_totals<THREADS, ROWS>(sums, scratch);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) st[r].scale = inv_std_of<C>(sums[r]);
  }
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
  RowStats st[ROWS];
  cta_row_stats<C, THREADS, ROWS>(rows, scratch, [&](int r, auto f) {
    for (int k = tid; k < C::K; k += THREADS) f(element(r, k));
  }, st);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r >= rows) break;
    for (int j = tid; j < out_stride; j += THREADS)
      out[(long long)r * out_stride + j] =
          from_float<S>(j < C::K ? normalized<C>(element(r, j), st[r], w, b, j) : 0.0f);
  }
  __syncthreads();
}

// The GEMV kernel's normalization, vectorized: a thread's 16-byte packs of the norm's scale
// (and bias) are read with the kernel's first ring of weights, before it waits for its
// inputs, so after the wait the rows cost one round trip to L2 (x), the sums' barriers and
// passes over shared memory. The scalar path (normalize_rows_cta) read x, summed, then read
// x again and the scale: two dependent round trips after the wait, on the critical path of
// every projection (the 22-layer decode lost 9 % with it, codegen/cuda/NOTES.md "x_norm").
// FITS: rows of whole packs, at most MAX_PACKS a thread (registers held across the wait);
// else, or when x or the parameters are not 16-byte aligned, the scalar path runs.
template <class C, int THREADS>
struct NormPacks {
  using S = typename C::scalar_t;
  static constexpr int VEC = 16 / (int)sizeof(S);
  static constexpr int MAX_PACKS = 2;
  static constexpr int PACKS = (C::K / VEC + THREADS - 1) / THREADS;
  static constexpr bool FITS = C::K % VEC == 0 && PACKS <= MAX_PACKS;
  static constexpr int N = FITS ? PACKS : 1;
  uint4 w[N], b[N];
  bool ok;  // the vector path runs (set by load; x's alignment is checked by the caller)

  // Column of element e of the thread's pack i.
  __device__ __forceinline__ static int column(int i) {
    return (i * THREADS + (int)threadIdx.x) * VEC;
  }
  __device__ __forceinline__ void load(const S* norm_w, const S* norm_b) {
    ok = FITS && aligned(norm_w) && (norm_b == nullptr || aligned(norm_b));
    if constexpr (FITS) {
      if (!ok) return;
#pragma unroll
      for (int i = 0; i < PACKS; ++i) {
        const int k = column(i);
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        w[i] = k < C::K ? __ldg(reinterpret_cast<const uint4*>(norm_w + k)) : zero;
        b[i] = norm_b != nullptr && k < C::K
                   ? __ldg(reinterpret_cast<const uint4*>(norm_b + k)) : zero;
      }
    }
  }
  __device__ __forceinline__ static bool aligned(const void* ptr) {
    return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
  }
};

// Element j of a 16-byte pack of S, as float.
template <class S>
__device__ __forceinline__ float pack_element(const uint4& v, int j) {
  return to_float(reinterpret_cast<const S*>(&v)[j]);
}

// normalize_rows_cta's work with the packs of `np` (np.ok, x rows 16-byte aligned): each
// row's packs go into out as they are, the statistics are taken from there, and each pack is
// normalized in place in shared memory. Ends with a barrier.
template <class C, int THREADS, int ROWS>
__device__ __forceinline__ void normalize_rows_packs(const typename C::scalar_t* x,
                                                     int x_stride, int rows,
                                                     const NormPacks<C, THREADS>& np,
                                                     typename C::scalar_t* out, int out_stride,
                                                     float* scratch) {
  using S = typename C::scalar_t;
  using NP = NormPacks<C, THREADS>;
  constexpr int VEC = NP::VEC;
  // the rows' packs into out as they are: one round trip to L2, then shared memory only
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int i = 0; i < NP::N; ++i) {
      const int k = NP::column(i);
      if (k < C::K)
        *reinterpret_cast<uint4*>(out + (long long)r * out_stride + k) =
            *reinterpret_cast<const uint4*>(x + (long long)r * x_stride + k);
    }
  }
  RowStats st[ROWS];
  cta_row_stats<C, THREADS, ROWS>(rows, scratch, [&](int r, auto f) {
#pragma unroll
    for (int i = 0; i < NP::N; ++i) {
      const int k = NP::column(i);
      if (k < C::K) {
        const uint4 v = *reinterpret_cast<const uint4*>(out + (long long)r * out_stride + k);
#pragma unroll
        for (int j = 0; j < VEC; ++j) f(pack_element<S>(v, j));
      }
    }
  }, st);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r >= rows) break;
#pragma unroll
    for (int i = 0; i < NP::N; ++i) {
      const int k = NP::column(i);
      if (k < C::K) {
        uint4* at = reinterpret_cast<uint4*>(out + (long long)r * out_stride + k);
        const uint4 v = *at;
        __align__(16) S y[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          y[j] = from_float<S>(normalized_value<C>(pack_element<S>(v, j), st[r],
                                                   pack_element<S>(np.w[i], j),
                                                   pack_element<S>(np.b[i], j)));
        *at = *reinterpret_cast<const uint4*>(y);
      }
    }
    for (int j = C::K + (int)threadIdx.x; j < out_stride; j += THREADS)
      out[(long long)r * out_stride + j] = from_float<S>(0.0f);
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
