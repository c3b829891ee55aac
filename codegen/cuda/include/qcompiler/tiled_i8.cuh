// qcompiler CUDA kernels: the tiled kernel with 8-bit activations: int8 (W4A8, W8A8: the
// numerics that MatMulNBits accuracy_level 4 permits, as the CPU int8 path computes them) or
// FP8 e4m3 (FP8 e4m3 weights, sm_89+: W8A8-FP8). A template over the configuration C
// (params.cuh), the tile parameters the tile pass decides and FP8. Static code, included by
// the generated .cu.
//
// make_params (dispatch.cuh) first quantizes x per row and group (quantize_x_i8_kernel): codes
// xq and scales xs. Here, for every group g of K (the weights' groups; with per-channel weight
// scales the whole row):
//     y[m, n] = sum_g xs[m, g] * ws[g, n] * sum_{k in g} xq[m, k] * (u[k, n] - z[g, n])
// int8: the inner sum is exact, mma.sync.m16n8k32 s8 x u8 -> s32 on the weights' unsigned codes
// u as they are (layout.py biases every code to unsigned), and the zero point comes off once
// per group: sum xq (u - z) = sum xq u - z xsum, with xsum the group's sum of x codes (the
// quantizer's). So the loop only moves codes into bytes, and every 1-8 bit format fits. FP8:
// mma.sync.m16n8k32 e4m3 x e4m3 -> f32 on the weights' bytes (no zero points). Each finished
// group's sums are scaled into fp32 accumulators; with per-channel scales x has one scale a
// row, so the sums go on to the end and the weight scale is applied with the bias.
//
// The weights are the same packed words as the f16 kernels' (layout.py, cuda_mma_b16): a
// k32 step takes two k16 steps' words, and a lane's four rows of each (bytes or nibbles in
// the order b_row_offset gives) become bytes 0-3 of its B registers b0 and b1. Rows of a
// k32 step therefore reach the MMA out of order; the quantizer writes x's columns in that
// same order, so the dot products are unchanged.
#ifndef QCOMPILER_TILED_I8_CUH
#define QCOMPILER_TILED_I8_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "dispatch.cuh"
#include "mma.cuh"
#include "params.cuh"
#include "pipeline.cuh"
#include "scalar.cuh"
#include "splitk.cuh"
#include "tiled.cuh"  // the stage copies, the k-warp sum and the launch it shares

namespace qc {

// CTA: WARPS_N x WARPS_K warps as in the f16 tiled kernel (tiled.cuh): warp (wn, wk) owns
// columns [64 wn, 64 wn + 64) of the N tile and a contiguous run of each stage's k32 steps.
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int STAGES, int KS, bool FP8>
struct TileI8 {
  static constexpr int THREADS = 32 * WARPS_N * WARPS_K;
  static constexpr int M_TILE = 16 * M_FRAGS;
  static constexpr int N_TILE = 64 * WARPS_N;
  static constexpr int STAGE_K = 16 * KS;                 // K rows per pipeline stage
  static constexpr int K_STAGES = C::K_PAD / STAGE_K;
  static constexpr int RUN = KS / WARPS_K / 2;            // k32 steps of a warp per stage
  // One x scale a row (per-channel weight scales): no per-group conversion of the sums.
  static constexpr bool X_PER_ROW = C::SCALE_IN_EPILOGUE;
  static constexpr int SROWS = C::GROUP < STAGE_K ? STAGE_K / C::GROUP : 1;  // groups a stage
  static constexpr int A_ROW = STAGE_K;                   // bytes of one row of the A tile
  static constexpr int A_CHUNKS = A_ROW / 16;
  // The XOR swizzle of a row's 16-byte chunks that puts ldmatrix's 8 rows in 8 different
  // bank groups: with 8 chunks a row, chunk ^ row; with 4 (rows of 64 bytes, two rows share
  // a 128-byte bank line), chunk ^ (row / 2).
  static constexpr int A_SWIZZLE_SHIFT = A_CHUNKS >= 8 ? 0 : 1;
  static_assert(A_CHUNKS == 4 || A_CHUNKS == 8, "stages of 64 or 128 rows");
  static_assert(C::K_PAD % STAGE_K == 0, "C::K_PAD must be a multiple of the stage");
  static_assert(C::GROUP % STAGE_K == 0 || STAGE_K % C::GROUP == 0, "group and stage must nest");
  static_assert(KS % (2 * WARPS_K) == 0, "each warp takes whole k32 steps of a stage");
  static_assert(X_PER_ROW || C::GROUP % 32 == 0, "groups of whole k32 steps");
  static_assert(C::CB == 4 || C::CB == 8, "4- or 8-bit containers");
  static_assert(!FP8 || (C::CB == 8 && !C::HAS_ZP), "FP8 activations take FP8 weights");
  static constexpr int B_CHUNKS_PER_KS = WARPS_N * (C::CB / 4) * 32;   // uint4 per k16 step
  static constexpr int B_BYTES = KS * B_CHUNKS_PER_KS * 16;
  static constexpr int A_BYTES = M_TILE * A_ROW;
  static constexpr int S_BYTES = C::SCALE_IN_EPILOGUE ? 0 : SROWS * N_TILE * 2;
  static constexpr int Z_BYTES = C::HAS_ZP ? SROWS * N_TILE * 2 : 0;
  // x scales [group][row] as floats, then (int8) the code sums [group][row] as ints
  static constexpr int XS_BYTES = X_PER_ROW ? 0 : SROWS * M_TILE * 4 * (FP8 ? 1 : 2);
  static constexpr int STAGE_BYTES = B_BYTES + A_BYTES + S_BYTES + Z_BYTES + XS_BYTES;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int RED_BYTES = M_TILE * N_TILE * 4;
  static constexpr int SMEM_BYTES = (PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES) + 16;

  __device__ static int swizzle(int row, int chunk) {
    return chunk ^ ((row >> A_SWIZZLE_SHIFT) & (A_CHUNKS - 1));
  }
};

// Byte j of the result: row b_row_offset<CB>(j) (after 2 q) of n8 column half h of n16 tile t,
// from a lane's words of one k16 step (layout.py: in 4-bit containers word t holds nibbles
// 4 kodd + 2 h + k8; in 8-bit containers word 2 t + h holds bytes 2 k8 + kodd).
template <int CB>
__device__ __forceinline__ uint32_t b_codes(const uint32_t* q, int t, int h) {
  if constexpr (CB == 4) {
    const uint32_t w = q[t];
    return h == 0 ? (w & 0x000F000Fu) | ((w << 4) & 0x0F000F00u)
                  : ((w >> 8) & 0x000F000Fu) | ((w >> 4) & 0x0F000F00u);
  } else {
    return q[2 * t + h];
  }
}

// Launch bounds: one CTA per SM guaranteed registers. With group scales a thread holds fp32
// and s32 sums (64 + 64 registers at m_frags 2); capped at 128 (two CTAs of 256 threads) it
// spilled ~540 bytes (ptxas, sm_80 and sm_90), so the cap is the 255 of one CTA an SM.
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int STAGES, int KS, bool FP8>
__global__ void __launch_bounds__(32 * WARPS_N * WARPS_K, 1)
qmatmul_i8_kernel(const Params<typename C::scalar_t> p) {
  using S = typename C::scalar_t;
  using T = TileI8<C, M_FRAGS, WARPS_N, WARPS_K, STAGES, KS, FP8>;
  using Part = std::conditional_t<FP8, float, int>;  // the MMA's sums
  constexpr int RUN = T::RUN;
  // k32 steps between two conversions of the integer sums: a group, or the warp's run if
  // shorter (a run never straddles two groups: both are aligned powers of two or nest).
  constexpr int FLUSH = T::X_PER_ROW ? RUN : (C::GROUP / 32 < RUN ? C::GROUP / 32 : RUN);
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

  // Issue the copies of one stage: weight words, x codes, and the stage's weight scales,
  // zero points and x scales.
  auto load_stage = [&](int stage, int kt) {
    unsigned char* base = smem + stage * T::STAGE_BYTES;
    copy_weight_stage<C, KS, WARPS_N, T::THREADS>(reinterpret_cast<uint4*>(base), p, nb0, kt, tid);
    unsigned char* sa = base + T::B_BYTES;
    for (int i = tid; i < T::M_TILE * T::A_CHUNKS; i += T::THREADS) {
      const int m = i / T::A_CHUNKS, c = i % T::A_CHUNKS;
      const bool ok = m0 + m < p.M;
      const int8_t* src = ok ? p.xq + (long long)(m0 + m) * C::K_PAD + kt * T::STAGE_K + c * 16
                             : p.xq;
      cp_async16(sa + m * T::A_ROW + (T::swizzle(m, c) << 4), src, ok);
    }
    const int row0 = C::GROUP < T::STAGE_K ? kt * T::SROWS : (kt * T::STAGE_K) / C::GROUP;
    if (!C::SCALE_IN_EPILOGUE)
      copy_group_rows<C, T::SROWS, T::N_TILE, T::THREADS>(sa + T::A_BYTES, p.scales, row0, nb0, tid);
    if (C::HAS_ZP)
      copy_group_rows<C, T::SROWS, T::N_TILE, T::THREADS>(sa + T::A_BYTES + T::S_BYTES, p.zeros,
                                                          row0, nb0, tid);
    if (!T::X_PER_ROW) {  // x groups are the weight groups: [SROWS][M_TILE] scales, sums
      unsigned char* sx = sa + T::A_BYTES + T::S_BYTES + T::Z_BYTES;
      constexpr int X_CHUNKS = T::M_TILE / 4;
      for (int i = tid; i < T::SROWS * X_CHUNKS * (FP8 ? 1 : 2); i += T::THREADS) {
        const int table = i / (T::SROWS * X_CHUNKS), j = i % (T::SROWS * X_CHUNKS);
        const int r = j / X_CHUNKS, c = j % X_CHUNKS;
        const bool ok = m0 + 4 * c < p.xs_stride;
        const void* base_ptr = table ? static_cast<const void*>(p.xsum) : p.xs;
        const char* src = static_cast<const char*>(base_ptr) +
                          4 * ((long long)(row0 + r) * p.xs_stride + m0 + 4 * c);
        cp_async16(sx + i * 16, ok ? src : base_ptr, ok);
      }
    }
  };

  // fp32 sums of the finished groups, and the MMA's sums of the current one (X_PER_ROW: of
  // the whole K range).
  float acc[T::X_PER_ROW ? 1 : M_FRAGS][4][2][4];
  Part part[M_FRAGS][4][2][4];
#pragma unroll
  for (int a = 0; a < M_FRAGS; ++a)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          part[a][t][h][e] = 0;
          if constexpr (!T::X_PER_ROW) acc[a][t][h][e] = 0.0f;
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
#pragma unroll
    for (int step = 0; step < RUN; ++step) {
      const int kk = wk * RUN + step;   // k32 step in the stage
      const int ks = 2 * kk;            // its first k16 step
      uint32_t a[M_FRAGS][4];
#pragma unroll
      for (int mf = 0; mf < M_FRAGS; ++mf) {
        const int row = mf * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int chunk = kk * 2 + (lane >> 4);
        ldmatrix_x4(a[mf], sa + row * T::A_ROW + (T::swizzle(row, chunk) << 4));
      }
      // The two k16 steps' words of this lane (4 words each in 4-bit containers, 8 in 8-bit).
      uint32_t q[2][4 * (C::CB / 4)];
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int j = 0; j < C::CB / 4; ++j) {
          const uint4 v = sb[((ks + s) * WARPS_N + wn) * ((C::CB / 4) * 32) + j * 32 + lane];
          q[s][4 * j] = v.x; q[s][4 * j + 1] = v.y; q[s][4 * j + 2] = v.z; q[s][4 * j + 3] = v.w;
        }
      // The group's scale and zero-point rows in the stage (a k32 step lies in one group).
      const int srow = C::GROUP < T::STAGE_K ? (ks * 16) / C::GROUP : 0;
      const unsigned char* srow_ptr = sa + T::A_BYTES + (srow * T::N_TILE + wn * 64) * 2;
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t b0 = b_codes<C::CB>(q[0], t, h), b1 = b_codes<C::CB>(q[1], t, h);
#pragma unroll
          for (int mf = 0; mf < M_FRAGS; ++mf) {
            if constexpr (FP8) mma_16832_e4m3(part[mf][t][h], a[mf], b0, b1);
            else mma_16832_s8u8(part[mf][t][h], a[mf], b0, b1);
          }
        }
      if constexpr (!T::X_PER_ROW) {
        if ((step + 1) % FLUSH == 0) {
          // acc += part * xs[row] * ws[col]: the accumulator's element e is row
          // 16 mf + lane / 4 + 8 (e / 2), column 16 t + 8 h + 2 (lane % 4) + e % 2; the
          // permuted scale row gives the lane those columns' scales in two 16-byte loads
          // (as tiled.cuh's accumulator scaling).
          __align__(16) S s0[8];
          __align__(16) S s1[8];
          *reinterpret_cast<uint4*>(s0) =
              *reinterpret_cast<const uint4*>(srow_ptr + ((lane & 3) * 2) * 16);
          *reinterpret_cast<uint4*>(s1) =
              *reinterpret_cast<const uint4*>(srow_ptr + ((lane & 3) * 2 + 1) * 16);
          const float* xs_row = reinterpret_cast<const float*>(
              sa + T::A_BYTES + T::S_BYTES + T::Z_BYTES) + srow * T::M_TILE;
          const int* xsum_row = reinterpret_cast<const int*>(xs_row + T::SROWS * T::M_TILE);
          // int8: the zero points of the same columns (the zero-point row, like the scales),
          // taken off once per group: by the flush whose K range starts the group (ranges
          // never straddle groups, so exactly one warp of one CTA holds each group's start).
          const bool starts_group =
              (kt_begin + it) * T::STAGE_K % C::GROUP == 0 &&
              ((wk * RUN + step + 1 - FLUSH) * 32) % C::GROUP == 0;
          int z0[8], z1[8];
          if constexpr (!FP8) {
            if constexpr (C::HAS_ZP) {
              __align__(16) S zv0[8];
              __align__(16) S zv1[8];
              *reinterpret_cast<uint4*>(zv0) = *reinterpret_cast<const uint4*>(
                  srow_ptr + T::S_BYTES + ((lane & 3) * 2) * 16);
              *reinterpret_cast<uint4*>(zv1) = *reinterpret_cast<const uint4*>(
                  srow_ptr + T::S_BYTES + ((lane & 3) * 2 + 1) * 16);
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                z0[j] = (int)to_float(zv0[j]);
                z1[j] = (int)to_float(zv1[j]);
              }
            } else {
#pragma unroll
              for (int j = 0; j < 8; ++j) z0[j] = z1[j] = (int)C::ZERO_CONST;
            }
          }
#pragma unroll
          for (int mf = 0; mf < M_FRAGS; ++mf) {
            const int r0 = mf * 16 + (lane >> 2), r1 = r0 + 8;
            const float x0 = xs_row[r0], x1 = xs_row[r1];
            const int n0 = FP8 || !starts_group ? 0 : xsum_row[r0];
            const int n1 = FP8 || !starts_group ? 0 : xsum_row[r1];
#pragma unroll
            for (int t = 0; t < 4; ++t)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const float f0 = to_float(s0[2 * t + h]), f1 = to_float(s1[2 * t + h]);
                float* c = acc[mf][t][h];
                Part* d = part[mf][t][h];
                if constexpr (!FP8) {  // sum xq (u - z) = sum xq u - z xsum
                  d[0] -= z0[2 * t + h] * n0;
                  d[1] -= z1[2 * t + h] * n0;
                  d[2] -= z0[2 * t + h] * n1;
                  d[3] -= z1[2 * t + h] * n1;
                }
                c[0] += (float)d[0] * (x0 * f0);
                c[1] += (float)d[1] * (x0 * f1);
                c[2] += (float)d[2] * (x1 * f0);
                c[3] += (float)d[3] * (x1 * f1);
                d[0] = d[1] = d[2] = d[3] = 0;
              }
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // This thread's fp32 sum of element e: with one x scale a row, the sum (int8: less the
  // zero point times the row's code sum) times it. The zero point of column n of n64 block b
  // is at b * 64 + (n % 8) * 8 + (n % 64) / 8 of the permuted table (layout.py).
  auto sum_of = [&](int mf, int t, int h, int e) -> float {
    if constexpr (T::X_PER_ROW) {
      const int m = m0 + mf * 16 + (lane >> 2) + (e >> 1) * 8;
      if (m >= p.M) return 0.0f;
      if constexpr (FP8) {
        return part[mf][t][h][e] * p.xs[m];
      } else if (split != 0 || wk != 0) {  // the zero point comes off once: where K starts
        return (float)part[mf][t][h][e] * p.xs[m];
      } else {
        const int col8 = 2 * (lane & 3) + (e & 1);
        const int z = C::HAS_ZP ? (int)to_float(p.zeros[(nb0 + wn) * 64 + col8 * 8 + 2 * t + h])
                                : (int)C::ZERO_CONST;
        return (float)(part[mf][t][h][e] - z * p.xsum[m]) * p.xs[m];
      }
    } else {
      return acc[mf][t][h][e];
    }
  };

  // Sum the WARPS_K partial tiles in shared memory (tiled.cuh).
  float* red = reinterpret_cast<float*>(smem);
  sum_k_warps<M_FRAGS, WARPS_K, T::N_TILE>(red, wn, wk, lane, sum_of);

  finish_tile<C, T::M_TILE, T::N_TILE, T::THREADS>(
      p, m0, nb0 * 64, split, reinterpret_cast<int*>(smem + T::SMEM_BYTES - 16),
      [&](int i) { return red[i]; });
}

// Launch the 8-bit-activation kernel for a call's parameters p (x already quantized by
// make_params).
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int STAGES, int KS, bool FP8>
cudaError_t launch_tiled_i8(Params<typename C::scalar_t> p, cudaStream_t stream) {
  using T = TileI8<C, M_FRAGS, WARPS_N, WARPS_K, STAGES, KS, FP8>;
  dim3 grid((p.M + T::M_TILE - 1) / T::M_TILE, (C::N_BLOCKS + WARPS_N - 1) / WARPS_N, p.split_k);
  return launch_with_smem<qmatmul_i8_kernel<C, M_FRAGS, WARPS_N, WARPS_K, STAGES, KS, FP8>,
                          T::SMEM_BYTES, T::THREADS>(p, grid, stream);
}

}  // namespace qc

#endif  // QCOMPILER_TILED_I8_CUH
