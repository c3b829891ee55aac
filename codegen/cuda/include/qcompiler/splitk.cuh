// qcompiler CUDA kernels: the end of every kernel, the CTA's fp32 tile to y (the epilogue and
// the split-K fix-up). Static code, included by the generated .cu.
#ifndef QCOMPILER_SPLITK_CUH
#define QCOMPILER_SPLITK_CUH

#include <cuda_runtime.h>

#include "params.cuh"
#include "scalar.cuh"

namespace qc {

// __syncthreads, or named barrier 1 over the first THREADS threads.
template <int THREADS>
__device__ __forceinline__ void cta_sync() {
  if constexpr (THREADS == 0) __syncthreads();
#ifndef QC_HOST_EMULATION
  else asm volatile("bar.sync 1, %0;\n" ::"n"(THREADS) : "memory");
#else
  else qc_emu::named_barrier(THREADS);
#endif
}

// VEC consecutive elements of y, stored as one access of 2 VEC bytes (VEC 1, 2, 4 or 8).
template <class S, int VEC>
struct alignas(2 * VEC) Chunk {
  S v[VEC];
};

// Elements a thread of the tile's end takes at a time: 8 (a 16-byte store) where the tile
// gives each thread at least 8, else what it gives (the GEMV kernel's 512 threads share a
// tile of 8 x 64: one each, as loads of its k warps' sums are many).
template <int ELEMENTS, int THREADS>
__host__ __device__ constexpr int chunk_elements() {
  return ELEMENTS / THREADS >= 8 ? 8 : ELEMENTS / THREADS >= 4 ? 4 : ELEMENTS / THREADS >= 2 ? 2 : 1;
}

// Column n of the product from its fp32 sum v: per-channel scale, bias, rounding to S.
template <class C>
__host__ __device__ __forceinline__ typename C::scalar_t product_value(
    const Params<typename C::scalar_t>& p, int n, float v) {
  if (C::SCALE_IN_EPILOGUE) v *= to_float(p.scales[n]);
  if (p.bias) v += p.bias[n];
  return from_float<typename C::scalar_t>(v);
}

// The CTA's sums (tile_sum(i): element i = m * N_TILE + n) to y without split-K or column
// pairs: the product, then the fused epilogue if any (it reads the product rounded to S, as
// its own kernel would). A thread takes VEC (up to 8: chunk_elements) consecutive columns of
// a row at a time, one store of 2 VEC bytes where they are all in range and y's rows are
// aligned to it, so it has VEC independent elements in flight rather than a chain of one load
// and one store each: the end of a wgmma CTA is 64-256 elements a thread with one warp per
// scheduler. Columns past N (a partial last tile) compute with column n's scale and bias
// and are not stored. `tid` is the thread's index among THREADS (a
// parameter, so that the host can check it: tests/test_cuda_tile.py).
template <class C, int M_TILE, int N_TILE, int THREADS, class TileSum>
__host__ __device__ __forceinline__ void write_tile(const Params<typename C::scalar_t>& p,
                                                    int m0, int n0, int tid, TileSum tile_sum) {
  using S = typename C::scalar_t;
  constexpr int N = C::N, VEC = chunk_elements<M_TILE * N_TILE, THREADS>();
  static_assert(N_TILE % VEC == 0, "N tiles of whole chunks");
  const bool aligned = N % VEC == 0 && (reinterpret_cast<uintptr_t>(p.y) & (2 * VEC - 1)) == 0;
  for (int c = tid; c < M_TILE * N_TILE / VEC; c += THREADS) {
    const int m = c / (N_TILE / VEC), n = c % (N_TILE / VEC) * VEC;
    if (m0 + m >= p.M || n0 + n >= N) continue;
    const long long row = (long long)(m0 + m) * N + n0;  // y's offset of the tile's column 0
    Chunk<S, VEC> chunk;
    S* out = chunk.v;
#pragma unroll
    for (int b = 0; b < VEC; ++b) {
      const int col = n0 + n + b < N ? n0 + n + b : n0 + n;  // in range
      out[b] = product_value<C>(p, col, tile_sum(m * N_TILE + n + b));
      if constexpr (C::Epilogue::FUSED) {
        if (p.epilogue && n0 + n + b < N)
          out[b] = C::Epilogue::apply(out[b], p.extras, row + n + b);
      }
    }
    if (aligned && n0 + n + VEC <= N) {
      *reinterpret_cast<Chunk<S, VEC>*>(p.y + row + n) = chunk;
    } else {
#pragma unroll
      for (int b = 0; b < VEC; ++b)
        if (n0 + n + b < N) p.y[row + n + b] = out[b];
    }
  }
}

// As write_tile with column pairs (fuse-gate-up): sums n and n + 1 (n even) give column n / 2
// of y, which has N / 2 columns; up to 8 of y's columns (16 sums) a thread at a time.
template <class C, int M_TILE, int N_TILE, int THREADS, class TileSum>
__host__ __device__ __forceinline__ void write_pair_tile(const Params<typename C::scalar_t>& p,
                                                         int m0, int n0, int tid,
                                                         TileSum tile_sum) {
  using S = typename C::scalar_t;
  constexpr int N = C::N, NY = N / 2, TILE_Y = N_TILE / 2;
  constexpr int VEC = chunk_elements<M_TILE * TILE_Y, THREADS>();
  static_assert(N % 2 == 0 && TILE_Y % VEC == 0, "column pairs in whole chunks");
  const bool aligned = NY % VEC == 0 && (reinterpret_cast<uintptr_t>(p.y) & (2 * VEC - 1)) == 0;
  for (int c = tid; c < M_TILE * TILE_Y / VEC; c += THREADS) {
    const int m = c / (TILE_Y / VEC), j = c % (TILE_Y / VEC) * VEC;  // y's column in the tile
    if (m0 + m >= p.M || n0 + 2 * j >= N) continue;
    const long long row = (long long)(m0 + m) * NY + n0 / 2;
    Chunk<S, VEC> chunk;
    S* out = chunk.v;
#pragma unroll
    for (int b = 0; b < VEC; ++b) {
      const int n = n0 + 2 * (j + b) < N ? n0 + 2 * (j + b) : n0 + 2 * j;  // in range
      const int i = m * N_TILE + 2 * (j + b);
      out[b] = C::Epilogue::apply_pair(product_value<C>(p, n, tile_sum(i)),
                                       product_value<C>(p, n + 1, tile_sum(i + 1)));
    }
    if (aligned && n0 / 2 + j + VEC <= NY) {
      *reinterpret_cast<Chunk<S, VEC>*>(p.y + row + j) = chunk;
    } else {
#pragma unroll
      for (int b = 0; b < VEC; ++b)
        if (n0 + 2 * (j + b) < N) p.y[row + j + b] = out[b];
    }
  }
}

// tile_sum(i) is element i = m * N_TILE + n of the CTA's sums. Without split-K it goes through
// the epilogue (per-channel scale, bias, rounding, then the fused epilogue if any) to y
// (write_tile, write_pair_tile). With split-K every CTA writes its fp32
// partial tile; the last one to finish a tile (atomic counter) sums the partials in split
// order (deterministic), writes y and resets the tile's counter for the next launch.
// BARRIER_THREADS > 0: only the first BARRIER_THREADS threads of the CTA take part (they sync
// on named barrier 1 instead of __syncthreads; the wgmma kernel's producer warps have left).
template <class C, int M_TILE, int N_TILE, int THREADS, class TileSum, int BARRIER_THREADS = 0>
__device__ __forceinline__ void finish_tile(const Params<typename C::scalar_t>& p, int m0, int n0,
                                            int split, int* flag, TileSum tile_sum) {
  using S = typename C::scalar_t;
  constexpr int N = C::N;
  const int tid = threadIdx.x;
  auto product = [&](int n, float v) { return product_value<C>(p, n, v); };
  auto epilogue = [&](int m, int n, float v) {
    const long long i = (long long)m * N + n;
    S out = product(n, v);
    // the fused epilogue reads the stored product (rounded to S), as its own kernel would
    if constexpr (C::Epilogue::FUSED) {
      if (p.epilogue) out = C::Epilogue::apply(out, p.extras, i);
    }
    p.y[i] = out;
  };
  // Column pairs (fuse-gate-up): sums n and n + 1 (n even, one tile) give column n / 2 of y,
  // which has N / 2 columns. Without p.epilogue y is the whole product, as above.
  constexpr bool PAIRS = C::Epilogue::PAIRS;
  auto pair_epilogue = [&](int m, int n, float a, float b) {
    p.y[(long long)m * (N / 2) + n / 2] = C::Epilogue::apply_pair(product(n, a), product(n + 1, b));
  };
  if constexpr (PAIRS) {
    if (p.epilogue && p.split_k == 1) {
      write_pair_tile<C, M_TILE, N_TILE, THREADS>(p, m0, n0, tid, tile_sum);
      return;
    }
  }
  if (p.split_k == 1) {
    write_tile<C, M_TILE, N_TILE, THREADS>(p, m0, n0, tid, tile_sum);
    return;
  }
  for (int i = tid; i < M_TILE * N_TILE; i += THREADS) {
    const int m = i / N_TILE, n = i % N_TILE;
    if (m0 + m < p.M && n0 + n < N)
      p.partial[((long long)split * p.M + m0 + m) * N + n0 + n] = tile_sum(i);
  }
  __threadfence();
  cta_sync<BARRIER_THREADS>();
  const int tile_id = blockIdx.y * gridDim.x + blockIdx.x;
  if (tid == 0) {
    const int done = atomicAdd(p.counters + tile_id, 1);
    *flag = (done == p.split_k - 1);
  }
  cta_sync<BARRIER_THREADS>();
  if (!*flag) return;
  __threadfence();
  // The fix-up reads every partial from L2. A thread takes BATCH elements at a time and
  // issues all their loads of one split before adding them, so that BATCH loads are in
  // flight instead of one: element by element, a 64 x 256 tile's fix-up was a chain of
  // ~128 L2 round trips per thread (measured on the H200: split 2 made a 2048^2 GEMM at
  // M = 512 take 106 us instead of 37). Each element's sum keeps the split order.
  if (PAIRS && p.epilogue) {  // as below, over pairs: 2 x 8 sums in flight per thread
    constexpr int PAIRS_PER_THREAD = (M_TILE * N_TILE / 2 + THREADS - 1) / THREADS;
    constexpr int PB = PAIRS_PER_THREAD < 8 ? PAIRS_PER_THREAD : 8;
    for (int base = tid; base < M_TILE * N_TILE / 2; base += THREADS * PB) {
      float v[PB][2];
      long long at[PB];  // the pair's first element in split 0's partials, or -1 (none)
#pragma unroll
      for (int b = 0; b < PB; ++b) {
        const int i = 2 * (base + b * THREADS), m = i / N_TILE, n = i % N_TILE;
        v[b][0] = v[b][1] = 0.0f;
        at[b] = i < M_TILE * N_TILE && m0 + m < p.M && n0 + n < N
                    ? (long long)(m0 + m) * N + n0 + n : -1;
      }
      for (int s = 0; s < p.split_k; ++s) {
        const float* part = p.partial + (long long)s * p.M * N;
        float got[PB][2];
#pragma unroll
        for (int b = 0; b < PB; ++b) {
          got[b][0] = at[b] >= 0 ? __ldcg(part + at[b]) : 0.0f;
          got[b][1] = at[b] >= 0 ? __ldcg(part + at[b] + 1) : 0.0f;
        }
#pragma unroll
        for (int b = 0; b < PB; ++b) { v[b][0] += got[b][0]; v[b][1] += got[b][1]; }
      }
#pragma unroll
      for (int b = 0; b < PB; ++b) {
        const int i = 2 * (base + b * THREADS);
        if (at[b] >= 0) pair_epilogue(m0 + i / N_TILE, n0 + i % N_TILE, v[b][0], v[b][1]);
      }
    }
    if (tid == 0) p.counters[tile_id] = 0;
    return;
  }
  constexpr int PER_THREAD = (M_TILE * N_TILE + THREADS - 1) / THREADS;
  constexpr int BATCH = PER_THREAD < 16 ? PER_THREAD : 16;
  for (int base = tid; base < M_TILE * N_TILE; base += THREADS * BATCH) {
    float v[BATCH];
    long long at[BATCH];  // the element's offset in split 0's partials, or -1 (none)
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int i = base + b * THREADS, m = i / N_TILE, n = i % N_TILE;
      v[b] = 0.0f;
      at[b] = i < M_TILE * N_TILE && m0 + m < p.M && n0 + n < N
                  ? (long long)(m0 + m) * N + n0 + n : -1;
    }
    for (int s = 0; s < p.split_k; ++s) {
      const float* part = p.partial + (long long)s * p.M * N;
      float got[BATCH];
#pragma unroll
      for (int b = 0; b < BATCH; ++b) got[b] = at[b] >= 0 ? __ldcg(part + at[b]) : 0.0f;
#pragma unroll
      for (int b = 0; b < BATCH; ++b) v[b] += got[b];
    }
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      const int i = base + b * THREADS;
      if (at[b] >= 0) epilogue(m0 + i / N_TILE, n0 + i % N_TILE, v[b]);
    }
  }
  if (tid == 0) p.counters[tile_id] = 0;
}

}  // namespace qc

#endif  // QCOMPILER_SPLITK_CUH
