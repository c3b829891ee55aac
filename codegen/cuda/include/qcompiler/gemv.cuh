// qcompiler CUDA kernels: the split-K GEMV kernel (small M; weights straight from global
// memory into registers) and its launch. A template over the configuration C (params.cuh)
// and the parameters the tile pass decides. Static code, included by the generated .cu.
#ifndef QCOMPILER_GEMV_CUH
#define QCOMPILER_GEMV_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "mma.cuh"
#include "norm.cuh"
#include "ops/common.cuh"  // wait_for_inputs, launch_dependent
#include "params.cuh"
#include "pipeline.cuh"
#include "scalar.cuh"
#include "splitk.cuh"

namespace qc {

// Operands swapped: y^T = w^T x^T, so the weights are the MMA's A operand (16 columns of N
// per n16 tile) and x^T its B operand (8 rows of M per fragment): a tile of M <= 8 wastes no
// MMA rows, and a lane's 16-byte load of the packed layout is already its A fragments of one
// k16 step (b0b1 b2b3 of column g are a0a1 a4a5; of column 8 + g, a2a3 a6a7). Weights go
// from global memory straight to registers: no shared-memory staging, no barrier in the loop.
// Warp (wn, wk) owns n64 block nb and a contiguous run of the CTA's k16 steps; DEPTH steps
// of weights and activations are in flight per warp (a ring of registers). Activations are
// read from global memory (x is small and read by every CTA: L1/L2 hits). Scales and zero
// points are read and converted once per group, the next group's a group ahead. The WARPS_K
// warps of a column block are summed in shared memory, the K splits by the last CTA.
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int DEPTH>
struct GemvTile {
  static constexpr int THREADS = 32 * WARPS_N * WARPS_K;
  static constexpr int M_TILE = 8 * M_FRAGS;
  static constexpr int N_TILE = 64 * WARPS_N;
  static constexpr int RED_BYTES = WARPS_K * M_TILE * N_TILE * 4;  // one tile per k warp
  static constexpr int SMEM_BYTES = RED_BYTES + 16;
  // x_norm in the kernel, after the sums: LayerNorm's normalized rows of x (K_PAD elements
  // each), or RMSNorm's 1 / rms of each row of the tile (M_TILE floats)
  static constexpr int NORM_OFFSET = (SMEM_BYTES + 15) / 16 * 16;
  static constexpr int RMS_SMEM_BYTES = NORM_OFFSET + M_TILE * 4;
  // x_norm = rms without a prepared copy of x: applied after the product (the kernel's
  // comment at RMS_POST)
  static constexpr bool RMS_POST = C::X_NORM == X_NORM_RMS && !C::PREP_X;
  // Registers capped at 128 a thread (the ring is bounded by check_config): 16 warps per SM.
  static constexpr int MIN_BLOCKS = THREADS >= 512 ? 1 : 512 / THREADS;
};

// Programmatic dependent launch (C::PDL: sm_90 targets): a kernel may start before the
// previous one in the stream has finished. Everything up to wait_for_inputs() reads constants
// only; everything after sees the previous kernel's writes complete. Without PDL, or in code
// for an arch before sm_90, both are no-ops.
template <bool PDL>
__device__ __forceinline__ void wait_for_inputs() {
  if constexpr (PDL) qc_ops::wait_for_previous_grid();
}
template <bool PDL>
__device__ __forceinline__ void allow_next_launch() {
  if constexpr (PDL) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  }
}

// Whether every warp's run of k16 steps lies in one group of GROUP rows, for K_STEPS steps
// split over `split_k` CTAs of `warps_k` k warps (the kernel's own division of the steps):
// then a warp multiplies its sums by its group's scales once, after its loop (ACC_SCALE).
// codegen/cuda/config.py gemv_runs_in_one_group is the same rule, for the config check.
__host__ __device__ constexpr bool gemv_runs_in_one_group(int k_steps, int split_k, int warps_k,
                                                         int group_steps) {
  for (int split = 0; split < split_k; ++split) {
    const int cb = (int)((long long)split * k_steps / split_k);
    const int ce = (int)((long long)(split + 1) * k_steps / split_k);
    for (int wk = 0; wk < warps_k; ++wk) {
      const int b = cb + (ce - cb) * wk / warps_k, e = cb + (ce - cb) * (wk + 1) / warps_k;
      if (e > b && b / group_steps != (e - 1) / group_steps) return false;
    }
  }
  return true;
}

// ACC_SCALE (the acc_scale knob; group scales, every warp's run in one group: launch_gemv
// checks): the weights are unpacked to their exact integers (c - z) and the warp's fp32 sums
// are multiplied by its group's scales after the loop, instead of every weight pair by its
// scale in the loop (two HMUL2 per 8 codes: ~16 of a k16 step's instructions, in a loop that
// is issue-bound at small M; codegen/cuda/NOTES.md).
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int DEPTH, bool ACC_SCALE = false>
__global__ void __launch_bounds__(32 * WARPS_N * WARPS_K,
                                  (GemvTile<C, M_FRAGS, WARPS_N, WARPS_K, DEPTH>::MIN_BLOCKS))
qmatmul_gemv_kernel(const Params<typename C::scalar_t> p) {
  using S = typename C::scalar_t;
  using S2 = pair_t<S>;
  using U = typename C::Unpack;
  using T = GemvTile<C, M_FRAGS, WARPS_N, WARPS_K, DEPTH>;
  constexpr int WORDS = C::CB / 4;                           // 16-byte loads per lane per step
  constexpr int K_STEPS = C::K_PAD / 16;
  constexpr long long W_STEP = (long long)C::N_BLOCKS * WORDS * 32;  // uint4 between k16 steps
  constexpr int SCALE_ROWS = (C::K_PAD + C::GROUP - 1) / C::GROUP;
  constexpr bool GROUP_ROWS = !C::SCALE_IN_EPILOGUE || C::HAS_ZP;  // per-group scales or zeros
  static_assert(!ACC_SCALE || !C::SCALE_IN_EPILOGUE, "ACC_SCALE: group scales only");
  // x_norm = rms (fuse-norm-qmatmul) without a prepared copy of x: the row's 1 / rms is a
  // scalar of the product, rmsnorm(x, g) W = (1 / rms(x)) ((x * g) W), so the loop multiplies
  // x's fragments by g's (a constant, loaded with the weights) and the row's statistics are
  // taken after the loop, off the critical path: the MMAs start as soon as x arrives, as in a
  // kernel without the norm (normalizing the rows first, before the first MMA, made every
  // projection slower than the separate norm launch saved: codegen/cuda/NOTES.md "x_norm").
  // x * g is rounded to S (the reference rounds x / rms * g): it must fit S's range, and in
  // f16 a row whose x * g lie below the normal range (6.1e-5) keeps less precision than the
  // reference's normalized row (whose values are O(1)).
  constexpr bool RMS_POST = T::RMS_POST;
  // LayerNorm in the kernel: the CTA normalizes its rows into shared memory first
  constexpr bool LAYER_IN_SMEM = C::X_NORM == X_NORM_LAYER;
#ifndef QC_HOST_EMULATION
  extern __shared__ __align__(16) unsigned char smem[];
#else
  unsigned char* smem = qc_emu::shared;
#endif
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WARPS_N, wk = warp / WARPS_N;
  const int g = lane >> 2, q2 = (lane & 3) * 2;
  const int m0 = blockIdx.x * T::M_TILE;
  const int nb = blockIdx.y * WARPS_N + wn;
  const int split = blockIdx.z;
  const int cta_begin = (int)(((long long)split * K_STEPS) / p.split_k);
  const int cta_end = (int)(((long long)(split + 1) * K_STEPS) / p.split_k);
  const int begin = cta_begin + (cta_end - cta_begin) * wk / WARPS_K;
  const int end = cta_begin + (cta_end - cta_begin) * (wk + 1) / WARPS_K;
  const int n_steps = nb < C::N_BLOCKS ? end - begin : 0;
  const uint4* wp = p.w + ((long long)begin * C::N_BLOCKS + nb) * (WORDS * 32) + lane;

  // x rows m0 + 8 mf + g of this lane (rows past M read nothing); a step's K columns are
  // past the end of x only without the prepared copy and when K is not a multiple of 64.
  constexpr bool K_TAIL = !C::PREP_X && C::K % 64 != 0;
  const S* xrow[M_FRAGS];
  bool xok[M_FRAGS];
#pragma unroll
  for (int mf = 0; mf < M_FRAGS; ++mf) {
    const int r = m0 + mf * 8 + g;
    xok[mf] = r < p.M;
    xrow[mf] = p.x + (long long)(xok[mf] ? r : 0) * p.x_stride + q2;
  }
  uint4 wbuf[DEPTH][WORDS];          // weights of the steps in flight
  uint32_t xbuf[DEPTH][M_FRAGS][2];  // x^T fragments (b0b1: k .. k+1, b2b3: k+8 ..) of row g
  uint32_t gbuf[RMS_POST ? DEPTH : 1][2];  // RMS_POST: the norm's scale at x's columns
  const S* grow = RMS_POST ? p.norm_w + q2 : nullptr;
  // The loads of step s of this warp's run: weights and the norm's scale (constants), then x
  // (the input).
  auto issue_w = [&](int slot, int s) {
#pragma unroll
    for (int j = 0; j < WORDS; ++j) wbuf[slot][j] = ld_stream(wp + s * W_STEP + j * 32);
    if constexpr (RMS_POST) {
      const int k = (begin + s) * 16;
      const unsigned int* pg = reinterpret_cast<const unsigned int*>(grow + k);
      gbuf[slot][0] = !K_TAIL || k < C::K ? __ldg(pg) : 0u;
      gbuf[slot][1] = !K_TAIL || k + 8 < C::K ? __ldg(pg + 4) : 0u;
    }
  };
  // LayerNorm in the kernel: the rows sit in shared memory (normalized there): a generic load
  auto load_x = [](const unsigned int* px) -> unsigned int {
    if constexpr (LAYER_IN_SMEM) return *px;
    else return __ldg(px);
  };
  auto issue_x = [&](int slot, int s) {
    const int k = (begin + s) * 16;
#pragma unroll
    for (int mf = 0; mf < M_FRAGS; ++mf) {
      const unsigned int* px = reinterpret_cast<const unsigned int*>(xrow[mf] + k);
      xbuf[slot][mf][0] = xok[mf] && (!K_TAIL || k < C::K) ? load_x(px) : 0u;
      xbuf[slot][mf][1] = xok[mf] && (!K_TAIL || k + 8 < C::K) ? load_x(px + 4) : 0u;
    }
  };

  // acc[mf][t]: y^T rows 16t + g (c0 c1) and 16t + g + 8 (c2 c3), columns 8mf + q2 + {0, 1}.
  float acc[M_FRAGS][4][4];
#pragma unroll
  for (int mf = 0; mf < M_FRAGS; ++mf)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mf][t][e] = 0.0f;

  // The lane's 8 columns' zero-point offsets and scales for the current group; the next
  // group's rows are loaded a group ahead.
  const long long col = (long long)nb * 64 + g * 8;     // permuted rows: 8 values per g
  auto ld_row = [&](const S* base, int r) {
    return r < SCALE_ROWS && nb < C::N_BLOCKS
               ? __ldg(reinterpret_cast<const uint4*>(base + (long long)r * C::N_PAD + col))
               : make_uint4(0u, 0u, 0u, 0u);
  };
  typename U::ZeroOffsets zo[4];
  S2 s2[4][2];
  {
    __align__(16) S c[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = from_float<S>(C::ZERO_CONST);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      zo[t] = U::zero_offsets(c + 2 * t);
      s2[t][0] = s2[t][1] = dup(from_float<S>(1.0f));
    }
  }
  int row = begin * 16 / C::GROUP, next_group = 0;  // next_group: the step that starts a group
  uint4 s_next = make_uint4(0u, 0u, 0u, 0u), z_next = make_uint4(0u, 0u, 0u, 0u);
  if (GROUP_ROWS && n_steps > 0) {
    if (!C::SCALE_IN_EPILOGUE) s_next = ld_row(p.scales, row);
    if (C::HAS_ZP) z_next = ld_row(p.zeros, row);
  }

  // Step s of the run from ring slot j; `refill`: then load step s + DEPTH into the slot.
  auto step = [&](int j, int s, bool refill) {
    uint32_t q[4 * WORDS];
#pragma unroll
    for (int i = 0; i < WORDS; ++i) {
      q[4 * i] = wbuf[j][i].x; q[4 * i + 1] = wbuf[j][i].y;
      q[4 * i + 2] = wbuf[j][i].z; q[4 * i + 3] = wbuf[j][i].w;
    }
    uint32_t xf[M_FRAGS][2];
#pragma unroll
    for (int mf = 0; mf < M_FRAGS; ++mf)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (RMS_POST)  // x * g (the row's 1 / rms multiplies the sums at the end)
          xf[mf][h] = as_u32(__hmul2(as_pair<S2>(xbuf[j][mf][h]), as_pair<S2>(gbuf[j][h])));
        else
          xf[mf][h] = xbuf[j][mf][h];
      }
    if constexpr (GROUP_ROWS) {
      if (s == next_group) {  // a new group: the first step, then every GROUP / 16 steps
        __align__(16) S sv[8];
        __align__(16) S zv[8];
        *reinterpret_cast<uint4*>(sv) = s_next;
        *reinterpret_cast<uint4*>(zv) = z_next;
        if (!C::SCALE_IN_EPILOGUE) s_next = ld_row(p.scales, row + 1);
        if (C::HAS_ZP) z_next = ld_row(p.zeros, row + 1);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          if constexpr (C::HAS_ZP) zo[t] = U::zero_offsets(zv + 2 * t);
          if constexpr (!C::SCALE_IN_EPILOGUE) {
            s2[t][0] = dup(sv[2 * t]);
            s2[t][1] = dup(sv[2 * t + 1]);
          }
        }
        ++row;
        next_group = row * (C::GROUP / 16) - begin;
      }
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      uint32_t b[4];
      U::template unpack_tile<!C::SCALE_IN_EPILOGUE && !ACC_SCALE>(q + t * WORDS, b, zo[t], s2[t]);
      const uint32_t a[4] = {b[0], b[2], b[1], b[3]};  // B fragments of w -> A of w^T
#pragma unroll
      for (int mf = 0; mf < M_FRAGS; ++mf) mma_16816<S>(acc[mf][t], a, xf[mf][0], xf[mf][1]);
    }
    // Refill the slot last: its registers are free by now (no copies to keep them apart).
    if (refill) {
      issue_w(j, s + DEPTH);
      issue_x(j, s + DEPTH);
    }
  };

  // The first ring of weights is requested before waiting for the previous kernel (x may be
  // its output): with programmatic dependent launch that wait overlaps the other's tail.
#pragma unroll
  for (int j = 0; j < DEPTH; ++j)
    if (j < n_steps) issue_w(j, j);
  // The rest of this warp's weights into L2 meanwhile (make_params decides: small weights,
  // QC_CUDA_L2_PREFETCH): one bulk prefetch a step, the steps spread over the lanes.
  if (p.l2_prefetch) {
    for (int s = DEPTH + lane; s < n_steps; s += 32)
      prefetch_l2(wp - lane + s * W_STEP, WORDS * 512);
  }
  // LayerNorm in the kernel: its scale and bias are constants too (NormPacks)
  NormPacks<C, T::THREADS> norm_packs;
  if constexpr (LAYER_IN_SMEM) {
    if (p.norm_in_kernel) norm_packs.load(p.norm_w, p.norm_b);
  }
  wait_for_inputs<C::PDL>();
  const int tile_rows = p.M - m0 < T::M_TILE ? p.M - m0 : T::M_TILE;  // the tile's rows of x
  // RMS_POST: those rows into L1 now, for the statistics after the loop (the loop reads only
  // this CTA's K split of them)
  if constexpr (RMS_POST) {
    constexpr int LINE = 128 / (int)sizeof(S);  // elements a 128-byte line
    constexpr int LINES = (C::K + LINE - 1) / LINE;
    for (int i = tid; i < tile_rows * LINES; i += T::THREADS)
      prefetch_l1(p.x + (long long)(m0 + i / LINES) * p.x_stride + (i % LINES) * LINE);
  }
  if constexpr (LAYER_IN_SMEM) {
    if (p.norm_in_kernel) {
      // fuse-norm-qmatmul: the tile's rows of x, normalized by the whole CTA into shared
      // memory after the sums' region (instead of a norm launch before this kernel); the
      // loop reads x from there. The sums' region is the reductions' scratch meanwhile.
      S* xn = reinterpret_cast<S*>(smem + T::NORM_OFFSET);
      const S* x0 = p.x + (long long)m0 * p.x_stride;
      if (norm_packs.ok && NormPacks<C, T::THREADS>::aligned(x0) &&
          p.x_stride % NormPacks<C, T::THREADS>::VEC == 0) {
        normalize_rows_packs<C, T::THREADS, T::M_TILE>(x0, p.x_stride, tile_rows, norm_packs, xn,
                                                       C::K_PAD, reinterpret_cast<float*>(smem));
      } else {
        normalize_rows_cta<C, T::THREADS, T::M_TILE>(x0, p.x_stride, tile_rows, p.norm_w, p.norm_b,
                                                     xn, C::K_PAD,
                                                     reinterpret_cast<float*>(smem));
      }
#pragma unroll
      for (int mf = 0; mf < M_FRAGS; ++mf)
        xrow[mf] = xn + (long long)(xok[mf] ? mf * 8 + g : 0) * C::K_PAD + q2;
    }
  }
#pragma unroll
  for (int j = 0; j < DEPTH; ++j)
    if (j < n_steps) issue_x(j, j);
  // Whole rounds of the ring without bounds checks, then the last steps with them.
  int s0 = 0;
  for (; s0 + 2 * DEPTH <= n_steps; s0 += DEPTH) {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j) step(j, s0 + j, true);
  }
  for (; s0 < n_steps; s0 += DEPTH) {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j)
      if (s0 + j < n_steps) step(j, s0 + j, s0 + j + DEPTH < n_steps);
  }

  allow_next_launch<C::PDL>();  // the next kernel may start and prefetch its weights meanwhile

  if constexpr (ACC_SCALE) {
    // The run's one group: its scales (s2, as loaded at the run's first step) on the sums;
    // acc[mf][t][0..1] are column 16t + g of the block (scale s2[t][0]), [2..3] 16t + g + 8.
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const float s_lo = to_float(s2[t][0].x), s_hi = to_float(s2[t][1].x);
#pragma unroll
      for (int mf = 0; mf < M_FRAGS; ++mf) {
        acc[mf][t][0] *= s_lo;
        acc[mf][t][1] *= s_lo;
        acc[mf][t][2] *= s_hi;
        acc[mf][t][3] *= s_hi;
      }
    }
  }

  // RMS_POST: each row's 1 / rms, from the whole CTA's sums of squares (the reductions'
  // region is their scratch), into shared memory after the sums for the tile's end
  float* inv_rms = reinterpret_cast<float*>(smem + T::NORM_OFFSET);
  if constexpr (RMS_POST) {
    RowStats st[T::M_TILE];
    const S* x0 = p.x + (long long)m0 * p.x_stride;
    using NP = NormPacks<C, T::THREADS>;  // (its pack width and alignment test)
    constexpr int VEC = NP::VEC;
    const bool packs = C::K % VEC == 0 && p.x_stride % VEC == 0 && NP::aligned(x0);
    cta_row_stats<C, T::THREADS, T::M_TILE>(tile_rows, reinterpret_cast<float*>(smem),
                                            [&](int r, auto f) {
      const S* row = x0 + (long long)r * p.x_stride;
      if (packs) {
        for (int k = tid * VEC; k < C::K; k += T::THREADS * VEC) {
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + k));
#pragma unroll
          for (int e = 0; e < VEC; ++e) f(pack_element<S>(v, e));
        }
      } else {
        for (int k = tid; k < C::K; k += T::THREADS) f(to_float(row[k]));
      }
    }, st);
#pragma unroll
    for (int r = 0; r < T::M_TILE; ++r)
      if (tid == r) inv_rms[r] = 1.0f / st[r].scale;
  }

  // Each k warp's tile to its own slice of shared memory ([wk][m][n]), then one barrier.
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mf = 0; mf < M_FRAGS; ++mf)
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = mf * 8 + q2 + (e & 1);
        const int n = wn * 64 + t * 16 + g + (e >> 1) * 8;
        red[(wk * T::M_TILE + m) * T::N_TILE + n] = acc[mf][t][e];
      }
  __syncthreads();
  finish_tile<C, T::M_TILE, T::N_TILE, T::THREADS>(
      p, m0, blockIdx.y * T::N_TILE, split, reinterpret_cast<int*>(smem + T::SMEM_BYTES - 16),
      [&](int i) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS_K; ++w) v += red[w * T::M_TILE * T::N_TILE + i];  // fixed order
        if constexpr (RMS_POST) v *= inv_rms[i / T::N_TILE];  // each K split's sum alike
        return v;
      });
}

// Launch the GEMV kernel for a call's parameters p (early, with PDL, where it may).
template <class C, int M_FRAGS, int WARPS_N, int WARPS_K, int DEPTH, bool ACC_SCALE = false>
cudaError_t launch_gemv(Params<typename C::scalar_t> p, cudaStream_t stream) {
  using T = GemvTile<C, M_FRAGS, WARPS_N, WARPS_K, DEPTH>;
  auto kernel = qmatmul_gemv_kernel<C, M_FRAGS, WARPS_N, WARPS_K, DEPTH, ACC_SCALE>;
  // (the config check allows ACC_SCALE only where this holds for the variant's split; a split
  // the runtime lowered, splits(), must keep it too)
  if (ACC_SCALE && !gemv_runs_in_one_group(C::K_PAD / 16, p.split_k, WARPS_K, C::GROUP / 16))
    return cudaErrorInvalidConfiguration;
  // x_norm in the kernel: room after the sums for LayerNorm's rows of x (GEMV_NORM_SMEM at
  // most) or RMSNorm's 1 / rms of each row
  constexpr int MAX_SMEM = C::X_NORM == X_NORM_LAYER ? T::NORM_OFFSET + GEMV_NORM_SMEM
                           : T::RMS_POST            ? T::RMS_SMEM_BYTES
                                                    : T::SMEM_BYTES;
  static bool smem_set = false;
  if (!smem_set) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           MAX_SMEM);
    if (err != cudaSuccess) return err;
    smem_set = true;
  }
  int smem = T::RMS_POST ? T::RMS_SMEM_BYTES : T::SMEM_BYTES;
  if (C::X_NORM == X_NORM_LAYER && p.norm_in_kernel) {
    const int rows = p.M < T::M_TILE ? p.M : T::M_TILE;
    smem = T::NORM_OFFSET + rows * C::K_PAD * (int)sizeof(typename C::scalar_t);
  }
  dim3 grid((p.M + T::M_TILE - 1) / T::M_TILE, (C::N_BLOCKS + WARPS_N - 1) / WARPS_N, p.split_k);
  if constexpr (C::PDL) {
    // Only code built for sm_90 or later waits for its inputs (above), so only that code may
    // be launched early (code JIT-compiled from compute_80 PTX would not wait).
    static int early = -1;
    if (early < 0) early = qc_ops::may_launch_early(kernel);
    return qc_ops::launch_dependent(kernel, grid, dim3(T::THREADS), smem, stream,
                                    early != 0, p);
  }
  QC_LAUNCH(kernel, grid, T::THREADS, smem, stream, p);
  return cudaGetLastError();
}

}  // namespace qc

#endif  // QCOMPILER_GEMV_CUH
