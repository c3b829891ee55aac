// qcompiler CUDA kernels: the tiled kernel (any M; mma.sync fed from a cp.async pipeline in
// shared memory) and its launch. A template over the configuration C (params.cuh) and the
// tile parameters the tile pass decides. Static code, included by the generated .cu.
#ifndef QCOMPILER_TILED_CUH
#define QCOMPILER_TILED_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "mma.cuh"
#include "params.cuh"
#include "pipeline.cuh"
#include "scalar.cuh"
#include "splitk.cuh"

namespace qc {

// CTA: WARPS_N x WARPS_K warps; warp (wn, wk) owns columns [64 wn, 64 wn + 64) of the CTA's
// N tile and the k16 steps [wk KS / WARPS_K, (wk + 1) KS / WARPS_K) of each stage (intra-CTA
// split-K). blockIdx = (M tile, N tile, K split): the M tiles that share weights are
// neighbours, so all but the first read them from L2. Weights, activations and scales stream
// through a STAGES-deep cp.async pipeline; B fragments come from shared memory with one
// 16-byte load per lane, are converted in registers and go straight into mma.sync.
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int STAGES, int KS>
struct Tile {
  static constexpr int THREADS = 32 * WARPS_N * WARPS_K;
  static constexpr int M_TILE = 16 * M_FRAGS;
  static constexpr int N_TILE = 64 * WARPS_N;
  static constexpr int STAGE_K = 16 * KS;                 // K rows per pipeline stage
  static constexpr int K_STAGES = C::K_PAD / STAGE_K;
  static constexpr int SROWS = C::GROUP < STAGE_K ? STAGE_K / C::GROUP : 1;  // scale rows per stage
  static constexpr int A_ROW = STAGE_K * 2;               // bytes of one row of the A tile
  static_assert(C::K_PAD % STAGE_K == 0, "C::K_PAD must be a multiple of the stage");
  static_assert(C::GROUP % STAGE_K == 0 || STAGE_K % C::GROUP == 0, "group and stage must nest");
  static_assert(KS % WARPS_K == 0, "the warps split a stage's k16 steps evenly");
  static constexpr int B_CHUNKS_PER_KS = WARPS_N * (C::CB / 4) * 32;   // uint4 per k16 step
  static constexpr int B_BYTES = KS * B_CHUNKS_PER_KS * 16;
  static constexpr int A_BYTES = M_TILE * A_ROW;
  static constexpr int S_BYTES = C::SCALE_IN_EPILOGUE ? 0 : SROWS * N_TILE * 2;
  static constexpr int Z_BYTES = C::HAS_ZP ? SROWS * N_TILE * 2 : 0;
  static constexpr int STAGE_BYTES = B_BYTES + A_BYTES + S_BYTES + Z_BYTES;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int RED_BYTES = M_TILE * N_TILE * 4;
  static constexpr int SMEM_BYTES = (PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES) + 16;
};

// The copies of one stage's weight words into sb: KS k16 steps of the CTA's WARPS_N n64
// blocks (a block past N_BLOCKS is zero-filled). Shared by the f16 and int8 tiled kernels.
template <class C, int KS, int WARPS_N, int THREADS, class S>
__device__ __forceinline__ void copy_weight_stage(uint4* sb, const Params<S>& p, int nb0, int kt,
                                                  int tid) {
  constexpr int CHUNKS_PER_KS = WARPS_N * (C::CB / 4) * 32;  // uint4 per k16 step
  for (int i = tid; i < KS * CHUNKS_PER_KS; i += THREADS) {
    const int ks = i / CHUNKS_PER_KS, r = i % CHUNKS_PER_KS;
    const bool ok = nb0 + r / ((C::CB / 4) * 32) < C::N_BLOCKS;
    const uint4* src = p.w + ((long long)(kt * KS + ks) * C::N_BLOCKS + nb0) * ((C::CB / 4) * 32) + r;
    cp_async16_stream(sb + i, ok ? src : p.w, ok);
  }
}

// The copies of rows [row0, row0 + ROWS) of a permuted [rows, N_PAD] table (group scales or
// zero points), the CTA's N_TILE columns from n64 block nb0, into dst.
template <class C, int ROWS, int N_TILE, int THREADS, class S>
__device__ __forceinline__ void copy_group_rows(unsigned char* dst, const S* table, int row0,
                                                int nb0, int tid) {
  constexpr int ROW_CHUNKS = N_TILE * 2 / 16;
  for (int i = tid; i < ROWS * ROW_CHUNKS; i += THREADS) {
    const int r = i / ROW_CHUNKS, c = i % ROW_CHUNKS;
    const bool ok = nb0 * 64 + c * 8 < C::N_PAD;
    const S* src = table + (long long)(row0 + r) * C::N_PAD + nb0 * 64 + c * 8;
    cp_async16(dst + i * 16, ok ? src : table, ok);
  }
}

// red[row][col] (M_FRAGS x 16 rows, N_TILE columns) = the sum over the WARPS_K warps that
// share a warp column of their sums sum(mf, t, h, e) (the mma accumulator layout: element e
// of n8 tile 2t + h is row 16 mf + lane / 4 + 8 (e / 2), column 2 (lane % 4) + e % 2), added
// in a fixed order (deterministic). Every thread of the CTA calls it.
template <int M_FRAGS, int WARPS_K, int N_TILE, class Sum>
__device__ __forceinline__ void sum_k_warps(float* red, int wn, int wk, int lane, Sum sum) {
  for (int w = 0; w < WARPS_K; ++w) {
    if (wk == w) {
#pragma unroll
      for (int mf = 0; mf < M_FRAGS; ++mf)
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = mf * 16 + (lane >> 2) + (e >> 1) * 8;
              const int col = wn * 64 + t * 16 + h * 8 + (lane & 3) * 2 + (e & 1);
              float* dst = red + row * N_TILE + col;
              *dst = (w == 0 ? 0.0f : *dst) + sum(mf, t, h, e);
            }
    }
    __syncthreads();
  }
}

// Launch KERNEL over `grid` with THREADS threads and SMEM_BYTES of dynamic shared memory
// (over 48 KB must be asked for, once per kernel).
template <auto KERNEL, int SMEM_BYTES, int THREADS, class S>
cudaError_t launch_with_smem(const Params<S>& p, dim3 grid, cudaStream_t stream) {
  static bool smem_set = false;
  if (!smem_set) {
    cudaError_t err = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           SMEM_BYTES);
    if (err != cudaSuccess) return err;
    smem_set = true;
  }
  QC_LAUNCH(KERNEL, grid, THREADS, SMEM_BYTES, stream, p);
  return cudaGetLastError();
}

// ACC_SCALE: group scales multiply fp32 partial sums once per group run instead of every B
// fragment (fewer fp16 instructions; for M tiles of 16, whose extra accumulators are few).
// Launch bounds: two CTAs per SM for M tiles up to 32 (registers capped at 128 a thread;
// measured: with one CTA per SM the 32-row tile was 1.3x slower); the 64-row tile needs ~220.
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int STAGES, int KS, bool ACC_SCALE>
__global__ void __launch_bounds__(32 * WARPS_N * WARPS_K, M_FRAGS <= 2 ? 2 : 1)
qmatmul_kernel(const Params<typename C::scalar_t> p) {
  using S = typename C::scalar_t;
  using S2 = pair_t<S>;
  using U = typename C::Unpack;
  using T = Tile<C, M_FRAGS, WARPS_N, WARPS_K, STAGES, KS>;
  constexpr bool SCALE_ACC = ACC_SCALE && !C::SCALE_IN_EPILOGUE;
  constexpr int RUN = KS / WARPS_K;                       // k16 steps of a warp per stage
  // Steps between two flushes of the partial sums: the warp's run, or one group if shorter.
  constexpr int FLUSH = C::GROUP / 16 < RUN ? C::GROUP / 16 : RUN;
#ifndef QC_HOST_EMULATION
  extern __shared__ __align__(16) unsigned char smem[];
#else
  unsigned char* smem = qc_emu::shared;
#endif
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WARPS_N, wk = warp / WARPS_N;
  const int m0 = blockIdx.x * T::M_TILE;
  const int nb0 = blockIdx.y * WARPS_N;            // first n64 block of this CTA
  const int split = blockIdx.z;
  const int kt_begin = (int)(((long long)split * T::K_STAGES) / p.split_k);
  const int kt_end = (int)(((long long)(split + 1) * T::K_STAGES) / p.split_k);
  const int n_kt = kt_end - kt_begin;

  // Issue the copies of one stage (STAGE_K rows of K).
  auto load_stage = [&](int stage, int kt) {
    unsigned char* base = smem + stage * T::STAGE_BYTES;
    copy_weight_stage<C, KS, WARPS_N, T::THREADS>(reinterpret_cast<uint4*>(base), p, nb0, kt, tid);
    unsigned char* sa = base + T::B_BYTES;
    constexpr int A_CHUNKS = T::A_ROW / 16;  // 16-byte chunks per row
    for (int i = tid; i < T::M_TILE * A_CHUNKS; i += T::THREADS) {
      const int m = i / A_CHUNKS, c = i % A_CHUNKS;
      const int k = kt * T::STAGE_K + c * 8;
      const bool ok = (m0 + m < p.M) && (k < p.x_stride);
      const S* src = ok ? p.x + (long long)(m0 + m) * p.x_stride + k : p.x;
      // XOR swizzle of the 16-byte chunks: ldmatrix's 8 rows then hit 8 different banks.
      cp_async16(sa + m * T::A_ROW + ((c ^ (m & 7)) << 4), src, ok);
    }
    const int row0 = C::GROUP < T::STAGE_K ? kt * T::SROWS : (kt * T::STAGE_K) / C::GROUP;
    if (!C::SCALE_IN_EPILOGUE)
      copy_group_rows<C, T::SROWS, T::N_TILE, T::THREADS>(sa + T::A_BYTES, p.scales, row0, nb0, tid);
    if (C::HAS_ZP)
      copy_group_rows<C, T::SROWS, T::N_TILE, T::THREADS>(sa + T::A_BYTES + T::S_BYTES, p.zeros,
                                                          row0, nb0, tid);
  };

  float acc[M_FRAGS][4][2][4];
  float part[SCALE_ACC ? M_FRAGS : 1][4][2][4];  // this group's sums (accumulator scaling)
#pragma unroll
  for (int a = 0; a < M_FRAGS; ++a)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][t][h][e] = 0.0f;

  // Zero point and scale of this lane's 8 columns when they are constants.
  S zc[8], sc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    zc[j] = from_float<S>(C::ZERO_CONST);
    sc[j] = from_float<S>(1.0f);
  }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_kt) load_stage(s, kt_begin + s);
    cp_async_commit();
  }

  for (int it = 0; it < n_kt; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      const int nxt = it + STAGES - 1;
      if (nxt < n_kt) load_stage(nxt % STAGES, kt_begin + nxt);
      cp_async_commit();
    }
    const unsigned char* base = smem + (it % STAGES) * T::STAGE_BYTES;
    const uint4* sb = reinterpret_cast<const uint4*>(base);
    const unsigned char* sa = base + T::B_BYTES;
    // Each warp takes a contiguous run of KS / WARPS_K k16 steps: a compile-time trip count,
    // so the loop unrolls and the next step's shared-memory loads overlap this step's MMAs.
#pragma unroll
    for (int step = 0; step < RUN; ++step) {
      const int ks = wk * RUN + step;
      uint32_t a[M_FRAGS][4];
#pragma unroll
      for (int mf = 0; mf < M_FRAGS; ++mf) {
        const int row = mf * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int chunk = ks * 2 + (lane >> 4);
        ldmatrix_x4(a[mf], sa + row * T::A_ROW + ((chunk ^ (row & 7)) << 4));
      }
      uint32_t q[4 * (C::CB / 4)];
#pragma unroll
      for (int j = 0; j < C::CB / 4; ++j) {
        const uint4 v = sb[(ks * WARPS_N + wn) * ((C::CB / 4) * 32) + j * 32 + lane];
        q[4 * j] = v.x; q[4 * j + 1] = v.y; q[4 * j + 2] = v.z; q[4 * j + 3] = v.w;
      }
      // This lane's 8 columns: zero point and scale of the k16 step's group.
      __align__(16) S zv[8];
      __align__(16) S sv[8];
      const int srow = C::GROUP < T::STAGE_K ? (ks * 16) / C::GROUP : 0;
      const unsigned char* srow_ptr = sa + T::A_BYTES + (srow * T::N_TILE + wn * 64) * 2;
      if constexpr (C::SCALE_IN_EPILOGUE || SCALE_ACC) {
#pragma unroll
        for (int j = 0; j < 8; ++j) sv[j] = sc[j];
      } else {
        *reinterpret_cast<uint4*>(sv) =
            *reinterpret_cast<const uint4*>(srow_ptr + (lane >> 2) * 16);
      }
      if constexpr (C::HAS_ZP) {
        *reinterpret_cast<uint4*>(zv) =
            *reinterpret_cast<const uint4*>(srow_ptr + T::S_BYTES + (lane >> 2) * 16);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) zv[j] = zc[j];
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        uint32_t b[4];
        const S2 s2[2] = {dup(sv[2 * t]), dup(sv[2 * t + 1])};
        U::template unpack_tile<!C::SCALE_IN_EPILOGUE && !SCALE_ACC>(
            q + t * (C::CB / 4), b, U::zero_offsets(zv + 2 * t), s2);
#pragma unroll
        for (int mf = 0; mf < M_FRAGS; ++mf) {
          if constexpr (SCALE_ACC) {
            if (step % FLUSH == 0) {
              mma_16816_zero<S>(part[mf][t][0], a[mf], b[0], b[1]);
              mma_16816_zero<S>(part[mf][t][1], a[mf], b[2], b[3]);
            } else {
              mma_16816<S>(part[mf][t][0], a[mf], b[0], b[1]);
              mma_16816<S>(part[mf][t][1], a[mf], b[2], b[3]);
            }
          } else {
            mma_16816<S>(acc[mf][t][0], a[mf], b[0], b[1]);
            mma_16816<S>(acc[mf][t][1], a[mf], b[2], b[3]);
          }
        }
      }
      if constexpr (SCALE_ACC) {
        if ((step + 1) % FLUSH == 0) {
          // acc += part * scale. The accumulator's columns are 16t + 8h + 2(lane % 4) + e;
          // in the permuted scale row, column 8-block j of an n64 tile holds slots 2t + h at
          // j * 8: two 16-byte loads give the lane all 16 scales it needs.
          __align__(16) S s0[8];
          __align__(16) S s1[8];
          *reinterpret_cast<uint4*>(s0) =
              *reinterpret_cast<const uint4*>(srow_ptr + ((lane & 3) * 2) * 16);
          *reinterpret_cast<uint4*>(s1) =
              *reinterpret_cast<const uint4*>(srow_ptr + ((lane & 3) * 2 + 1) * 16);
#pragma unroll
          for (int mf = 0; mf < M_FRAGS; ++mf)
#pragma unroll
            for (int t = 0; t < 4; ++t)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const float f0 = to_float(s0[2 * t + h]), f1 = to_float(s1[2 * t + h]);
                acc[mf][t][h][0] += part[mf][t][h][0] * f0;
                acc[mf][t][h][1] += part[mf][t][h][1] * f1;
                acc[mf][t][h][2] += part[mf][t][h][2] * f0;
                acc[mf][t][h][3] += part[mf][t][h][3] * f1;
              }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Sum the WARPS_K partial tiles in shared memory.
  float* red = reinterpret_cast<float*>(smem);
  sum_k_warps<M_FRAGS, WARPS_K, T::N_TILE>(
      red, wn, wk, lane, [&](int mf, int t, int h, int e) { return acc[mf][t][h][e]; });

  finish_tile<C, T::M_TILE, T::N_TILE, T::THREADS>(
      p, m0, nb0 * 64, split, reinterpret_cast<int*>(smem + T::SMEM_BYTES - 16),
      [&](int i) { return red[i]; });
}

// Launch the tiled kernel for a call's parameters p.
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int STAGES, int KS, bool ACC_SCALE>
cudaError_t launch_tiled(Params<typename C::scalar_t> p, cudaStream_t stream) {
  using T = Tile<C, M_FRAGS, WARPS_N, WARPS_K, STAGES, KS>;
  dim3 grid((p.M + T::M_TILE - 1) / T::M_TILE, (C::N_BLOCKS + WARPS_N - 1) / WARPS_N, p.split_k);
  return launch_with_smem<qmatmul_kernel<C, M_FRAGS, WARPS_N, WARPS_K, STAGES, KS, ACC_SCALE>,
                          T::SMEM_BYTES, T::THREADS>(p, grid, stream);
}

}  // namespace qc

#endif  // QCOMPILER_TILED_CUH
