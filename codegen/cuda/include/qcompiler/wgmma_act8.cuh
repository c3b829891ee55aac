// qcompiler CUDA kernels: the Hopper (sm_90a) GEMM with 8-bit activations: wgmma on int8
// (W4A8, W8A8: MatMulNBits accuracy_level 4's numerics, as tiled_i8.cuh computes them) or
// FP8 e4m3 (W8A8-FP8) tensor cores, fed by wgmma.cuh's warp-specialized TMA pipeline. A
// template over the configuration C (params.cuh), the tile parameters the tile pass decides
// and FP8. Static code, included by the generated .cu of a cuda-sm90 qmatmul whose variants
// use it (built for sm_90a only).
//
// The numerics are tiled_i8.cuh's: make_params quantizes x per row and group into codes xq
// (columns in the order of the packed weights' bytes, quantize_x_i8_kernel), scales xs and
// code sums xsum; for every group g of K
//     y[m, n] = sum_g xs[m, g] * ws[g, n] * (sum_{k in g} xq[m, k] u[k, n] - z[g, n] xsum[m, g])
// with u the weights' unsigned codes (int8) or their e4m3 bytes (FP8, no zero point).
//
// The product is transposed as in wgmma.cuh's block-split mapping: y^T = W^T x^T, the
// weights wgmma's A operand from registers, x^T its B operand from shared memory. Consumer
// warpgroup c takes BPW n64 blocks of the CTA's N tile and all M_TILE tokens, warp w of it n16
// tile w of each block. A stage is 128 K rows: one 128-byte swizzle row of x's codes (one TMA
// box), 8 k16 steps of packed weights, and the stage's scale, zero-point and x-scale rows.
// A lane's bytes of a k16 step (b_codes, tiled_i8.cuh) are already the operand the
// m64nNk32 instruction wants: its 8-bit A fragment (CUTLASS's ALayout_64x32) gives register
// 0 row g, k 4q..4q+3; register 1 row g + 8; registers 2, 3 the same rows at k + 16. That is
// mma.m16n8k32's, whose B bytes tiled_i8.cuh hands over (operands swapped: columns of W are
// rows of W^T), so x's code order is the same as that kernel's.
//
// Group scales (int8, groups of a multiple of 128 rows): each stage's wgmmas sum the codes'
// products into fresh s32 accumulators, which the warpgroup then folds into fp32 ones with
// the stage's scales, taking the zero point off at the group's first stage. The fold is about
// as much issue per element as the MMA's own time, so it runs while the next stage's wgmmas
// do: after each stage's wait its sums are held in other registers (Act8BlockSplit::held),
// folded during the next stage (and two consumer warpgroups interleave besides). Per-channel
// weight scales (one x scale a row): the int8 s32 sums run over the whole K range; FP8 sums
// run a stage at a time and are added into fp32 ones as the int8 sums are folded (the FP8
// tensor cores accumulate with fewer bits than fp32). The end applies xs (and takes the zero
// point off once, in split 0); the weight scale is the epilogue's, as for every kernel.
//
// This file holds what differs from the 16-bit-x kernel: the mapping Act8BlockSplit (its
// producer's copies, TMA map, main loop and store), run by wgmma.cuh's qmatmul_wgmma_kernel.
#ifndef QCOMPILER_WGMMA_ACT8_CUH
#define QCOMPILER_WGMMA_ACT8_CUH

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "params.cuh"
#include "scalar.cuh"
#include "splitk.cuh"
#include "tiled_i8.cuh"  // b_codes: a lane's bytes of a k16 step
#include "wgmma.cuh"     // the kernel, its pipeline, wgmma fences, descriptors, TMA encoder

namespace qc {

// ---- wgmma m64nNk32 with 8-bit operands ---------------------------------------------------
// Operand lists of 32 accumulators d[i] .. d[i + 31] with constraint c ("+r": s32 sums read
// and written; "=r" / "=f": fresh s32 / fp32 sums). The fp32 "+f" ones are wgmma.cuh's QC_D32.
#define QC_OUT8(c, d, i) c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), \
                         c(d[i + 4]), c(d[i + 5]), c(d[i + 6]), c(d[i + 7])
#define QC_OUT32(c, d, i) \
  QC_OUT8(c, d, i), QC_OUT8(c, d, i + 8), QC_OUT8(c, d, i + 16), QC_OUT8(c, d, i + 24)

// One 8-bit wgmma (the body of wgmma_rs_act8 and wgmma_rs_act8_fresh): SHAPE_TYPES, the
// operand list, SCALE_D what scale-d's predicate is set from (the accumulate operand's
// number, or 0: fresh sums), TAIL what follows scale-d (FP8: the immediate scales of a and
// b), SCALE_IN the accumulate operand (an immediate where scale-d is 0), then the outputs.
#define QC_ACT8_ASM(SHAPE_TYPES, OPS, SCALE_D, TAIL, SCALE_IN, ...)                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                        \
               "wgmma.mma_async.sync.aligned." SHAPE_TYPES " " OPS ", p" TAIL ";\n}\n"      \
               : __VA_ARGS__                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), SCALE_IN)

// d[64 x N] (+)= a (registers: this warp's m16k32 fragment) * b (shared memory, N x k32);
// accumulate == 0 overwrites d (wgmma's scale-d). int8: u8 weights x s8 codes -> s32; FP8:
// e4m3 x e4m3 -> fp32. N in {64, 128, 256} (tokens).
template <int N, bool FP8, class D>
__device__ __forceinline__ void wgmma_rs_act8(D* d, const uint32_t* a, uint64_t desc_b,
                                              int accumulate) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma m64nNk32: N in {64, 128, 256}");
  static_assert(std::is_same<D, std::conditional_t<FP8, float, int>>::value,
                "FP8 sums are fp32, int8 sums s32");
  // Operands: the N / 2 accumulators, a0..a3, the descriptor, then scale-d (accumulate).
  if constexpr (N == 64) {
    if constexpr (FP8)
      QC_ACT8_ASM("m64n64k32.f32.e4m3.e4m3", QC_WGMMA_OPS_N64, "%37", ", 1, 1",
                  "r"(accumulate), QC_OUT32("+f", d, 0));
    else
      QC_ACT8_ASM("m64n64k32.s32.u8.s8", QC_WGMMA_OPS_N64, "%37", "", "r"(accumulate),
                  QC_OUT32("+r", d, 0));
  } else if constexpr (N == 128) {
    if constexpr (FP8)
      QC_ACT8_ASM("m64n128k32.f32.e4m3.e4m3", QC_WGMMA_OPS_N128, "%69", ", 1, 1",
                  "r"(accumulate), QC_OUT32("+f", d, 0), QC_OUT32("+f", d, 32));
    else
      QC_ACT8_ASM("m64n128k32.s32.u8.s8", QC_WGMMA_OPS_N128, "%69", "", "r"(accumulate),
                  QC_OUT32("+r", d, 0), QC_OUT32("+r", d, 32));
  } else {
    if constexpr (FP8)
      QC_ACT8_ASM("m64n256k32.f32.e4m3.e4m3", QC_WGMMA_OPS_N256, "%133", ", 1, 1",
                  "r"(accumulate), QC_OUT32("+f", d, 0), QC_OUT32("+f", d, 32),
                  QC_OUT32("+f", d, 64), QC_OUT32("+f", d, 96));
    else
      QC_ACT8_ASM("m64n256k32.s32.u8.s8", QC_WGMMA_OPS_N256, "%133", "", "r"(accumulate),
                  QC_OUT32("+r", d, 0), QC_OUT32("+r", d, 32), QC_OUT32("+r", d, 64),
                  QC_OUT32("+r", d, 96));
  }
}

// The same product into fresh sums: d = a * b, its accumulators outputs only, so that their
// old values (read by other instructions meanwhile) are not its inputs. N in {64, 128}.
template <int N, bool FP8, class D>
__device__ __forceinline__ void wgmma_rs_act8_fresh(D* d, const uint32_t* a, uint64_t desc_b) {
  static_assert(N == 64 || N == 128, "fresh 8-bit sums: N in {64, 128}");
  static_assert(std::is_same<D, std::conditional_t<FP8, float, int>>::value,
                "FP8 sums are fp32, int8 sums s32");
  if constexpr (N == 64) {
    if constexpr (FP8)
      QC_ACT8_ASM("m64n64k32.f32.e4m3.e4m3", QC_WGMMA_OPS_N64, "0", ", 1, 1", "n"(0),
                  QC_OUT32("=f", d, 0));
    else
      QC_ACT8_ASM("m64n64k32.s32.u8.s8", QC_WGMMA_OPS_N64, "0", "", "n"(0),
                  QC_OUT32("=r", d, 0));
  } else {
    if constexpr (FP8)
      QC_ACT8_ASM("m64n128k32.f32.e4m3.e4m3", QC_WGMMA_OPS_N128, "0", ", 1, 1", "n"(0),
                  QC_OUT32("=f", d, 0), QC_OUT32("=f", d, 32));
    else
      QC_ACT8_ASM("m64n128k32.s32.u8.s8", QC_WGMMA_OPS_N128, "0", "", "n"(0),
                  QC_OUT32("=r", d, 0), QC_OUT32("=r", d, 32));
  }
}

// ---- the TMA map of x's codes (host side) ---------------------------------------------------
// The TMA map of x's codes xq [M, K_PAD] (bytes) in boxes of 128 columns x M_TILE rows,
// 128-byte swizzle; rows past M read as zeros.
template <class C, int M_TILE>
cudaError_t make_xq_map(const Params<typename C::scalar_t>& p, CUtensorMap* map) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {(cuuint64_t)C::K_PAD, (cuuint64_t)p.M};
  const cuuint64_t strides[1] = {(cuuint64_t)C::K_PAD};
  const cuuint32_t box[2] = {128, (cuuint32_t)M_TILE};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2,
                            const_cast<int8_t*>(p.xq), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// ---- the CTA's tile and its shared memory ---------------------------------------------------
template <class C, int M_TILE_, int N_BLOCKS_CTA_, int CONSUMERS_, int STAGES_, bool FP8_>
struct WgmmaAct8Tile {
  static constexpr bool FP8 = FP8_;
  static constexpr int M_TILE = M_TILE_;                 // tokens per CTA (a wgmma's N)
  static constexpr int N_BLOCKS_CTA = N_BLOCKS_CTA_;     // n64 blocks per CTA
  static constexpr int CONSUMERS = CONSUMERS_, STAGES = STAGES_;
  static constexpr int CONSUMER_THREADS = 128 * CONSUMERS;
  static constexpr int THREADS = CONSUMER_THREADS + 128;  // consumers, then the producer warpgroup
  static constexpr int N_TILE = 64 * N_BLOCKS_CTA;
  static constexpr int STAGE_K = 128;                    // one 128-byte swizzle row of x's codes
  static constexpr int K_STAGES = C::K_PAD / STAGE_K;
  // One x scale a row (per-channel weight scales): sums over the whole K range, no fold.
  static constexpr bool X_PER_ROW = C::SCALE_IN_EPILOGUE;
  static constexpr int WORDS = C::CB / 4;                // uint4 of a lane per block and k16 step
  static constexpr int X_BYTES = M_TILE * STAGE_K;
  static constexpr int W_KS_BYTES = N_BLOCKS_CTA * 512 * WORDS;  // one k16 step of the blocks
  static constexpr int W_BYTES = 8 * W_KS_BYTES;
  static constexpr int ROW_BYTES = N_TILE * 2;           // one scale or zero-point row
  static constexpr int S_BYTES = X_PER_ROW ? 0 : ROW_BYTES;
  static constexpr int Z_BYTES = !X_PER_ROW && C::HAS_ZP ? ROW_BYTES : 0;
  static constexpr int XS_BYTES = X_PER_ROW ? 0 : 2 * M_TILE * 4;  // x scales, then code sums
  static constexpr int STAGE_BYTES =
      (X_BYTES + W_BYTES + S_BYTES + Z_BYTES + XS_BYTES + 1023) / 1024 * 1024;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int RED_STRIDE = N_TILE + 4;          // fp32 tile rows, padded (banks)
  static constexpr int RED_BYTES = M_TILE * RED_STRIDE * 4;
  static constexpr int BODY_BYTES = PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES;
  static constexpr int SMEM_BYTES = BODY_BYTES + 2 * STAGES * 8 + 16 + 1024;
  static_assert(C::CB == 4 || C::CB == 8, "4- or 8-bit containers");
  static_assert(M_TILE == 64 || M_TILE == 128 || M_TILE == 256, "M tile: 64, 128 or 256 tokens");
  static_assert(C::K_PAD % STAGE_K == 0, "K_PAD is a multiple of 128");
  static_assert(X_PER_ROW || (!FP8 && C::GROUP % STAGE_K == 0),
                "group scales: int8 with groups of whole 128-row stages");
  static_assert(!FP8 || (C::CB == 8 && !C::HAS_ZP), "FP8 activations take FP8 weights");

  // Where a stage's parts lie (base: the stage's first byte).
  __device__ static const unsigned char* w_lane(const unsigned char* base, int ks, int blk,
                                                int lane) {
    return base + X_BYTES + ks * W_KS_BYTES + blk * 512 * WORDS + lane * 16;
  }
  __device__ static const unsigned char* scale_slots(const unsigned char* base, int blk, int g) {
    return base + X_BYTES + W_BYTES + blk * 128 + g * 16;
  }
  __device__ static const unsigned char* zero_slots(const unsigned char* base, int blk, int g) {
    return base + X_BYTES + W_BYTES + S_BYTES + blk * 128 + g * 16;
  }
  __device__ static const float* x_scales(const unsigned char* base) {
    return reinterpret_cast<const float*>(base + X_BYTES + W_BYTES + S_BYTES + Z_BYTES);
  }
};

// The producer: lane 0 of the producer warpgroup's first warp issues every copy of a stage:
// a TMA box of x's codes, 8 bulk copies of packed weights (one a k16 step), and with group
// scales the stage's scale and zero-point rows and its x scales and code sums.
template <class C, class T>
__device__ __forceinline__ void act8_produce(const CUtensorMap* x_map,
                                             const Params<typename C::scalar_t>& p,
                                             unsigned char* smem, uint64_t* full,
                                             uint64_t* empty, int m0, int nb0, int n_valid,
                                             int kt_begin, int n_kt) {
  const uint32_t w_bytes = n_valid * 512 * T::WORDS, row_bytes = n_valid * 128;
  // x scales of the tile's tokens: up to the end of the table's row (rows4(M) entries).
  const int xs_count = p.xs_stride - m0 < T::M_TILE ? p.xs_stride - m0 : T::M_TILE;
  const uint32_t xs_bytes = T::XS_BYTES ? xs_count * 4 : 0;
  const uint32_t stage_tx = T::X_BYTES + 8 * w_bytes + (T::S_BYTES ? row_bytes : 0) +
                            (T::Z_BYTES ? row_bytes : 0) + 2 * xs_bytes;
  produce_ring<T, C::WGMMA_PDL>(smem, full, empty, kt_begin, n_kt, stage_tx,
                          [&](unsigned char* base, int kt, uint64_t* bar) {
#pragma unroll
    for (int ks = 0; ks < 8; ++ks)
      bulk_load(base + T::X_BYTES + ks * T::W_KS_BYTES,
                p.w + ((long long)(kt * 8 + ks) * C::N_BLOCKS + nb0) * 32 * T::WORDS, w_bytes,
                bar);
    if constexpr (!T::X_PER_ROW) {
      const long long row = (long long)kt * T::STAGE_K / C::GROUP;  // the stage's group
      unsigned char* rows = base + T::X_BYTES + T::W_BYTES;
      bulk_load(rows, p.scales + row * C::N_PAD + nb0 * 64, row_bytes, bar);
      if (T::Z_BYTES)
        bulk_load(rows + T::S_BYTES, p.zeros + row * C::N_PAD + nb0 * 64, row_bytes, bar);
    }
  }, [&](unsigned char* base, int kt, uint64_t* bar) {
    tma_load_2d(base, x_map, kt * T::STAGE_K, m0, bar);  // rows past M: zeros
    if constexpr (!T::X_PER_ROW) {  // x's scales and code sums: the quantize kernel's output
      const long long row = (long long)kt * T::STAGE_K / C::GROUP;
      unsigned char* xs = base + T::X_BYTES + T::W_BYTES + T::S_BYTES + T::Z_BYTES;
      bulk_load(xs, p.xs + row * p.xs_stride + m0, xs_bytes, bar);
      bulk_load(xs + T::M_TILE * 4, p.xsum + row * p.xs_stride + m0, xs_bytes, bar);
    }
  });
}

// Consumer warpgroup c: BPW n64 blocks (c BPW ..) of the CTA over all M_TILE tokens.
template <class C, class T, int BPW>
struct Act8BlockSplit {
  static constexpr int NT = T::M_TILE;             // tokens per wgmma
  static constexpr bool FOLD = !T::X_PER_ROW;      // group scales: s32 sums folded each stage
  // FP8: each stage's fp32 sums added into fp32 ones (the tensor cores' FP8 accumulation
  // keeps fewer bits than fp32: over K = 4096 its error reached 1.4e-3 of the output's scale
  // on an H100; DeepSeek-V3 promotes every 128 K rows the same way).
  static constexpr bool PROMOTE = T::FP8;
  static constexpr bool STAGE_SUMS = FOLD || PROMOTE;  // fresh sums a stage, held, then added
  using Sum = std::conditional_t<T::FP8, float, int>;
  static_assert(T::N_BLOCKS_CTA == BPW * T::CONSUMERS, "each warpgroup takes BPW blocks");
  static_assert(BPW * NT <= (STAGE_SUMS ? 128 : 256),
                "accumulators a thread: at most 128 (a stage's sums, the held ones and the fp32 "
                "ones, 64 each)");
  __device__ static void produce(const CUtensorMap* x_map, const Params<typename C::scalar_t>& p,
                                 unsigned char* smem, uint64_t* full, uint64_t* empty,
                                 const WgmmaCta& cta) {
    act8_produce<C, T>(x_map, p, smem, full, empty, cta.m0, cta.nb0, cta.n_valid, cta.kt_begin,
                       cta.n_kt);
  }
  static cudaError_t make_map(const Params<typename C::scalar_t>& p, CUtensorMap* map) {
    return make_xq_map<C, T::M_TILE>(p, map);
  }


  Sum part[BPW][NT / 2];                 // the wgmmas' sums (of a stage: STAGE_SUMS)
  // The previous stage's sums: int8, the float bits of 1.5 * 2^23 + sum (below); FP8, the
  // bits of -sum. Either way a real instruction writes them (see mainloop).
  uint32_t held[STAGE_SUMS ? BPW : 1][STAGE_SUMS ? NT / 2 : 1];
  float acc[STAGE_SUMS ? BPW : 1][STAGE_SUMS ? NT / 2 : 1];  // fp32 sums over the stages

  // This warp's A fragments of k32 step kk of block blk: the lane's bytes of k16 steps 2 kk
  // and 2 kk + 1 of n16 tile w (rows g, g + 8 of the m16: n8 halves 0 and 1).
  __device__ __forceinline__ static void load_a(const unsigned char* base, int kk, int blk, int w,
                                                int lane, uint32_t* a) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const unsigned char* chunk = T::w_lane(base, 2 * kk + s, blk, lane);
      if constexpr (C::CB == 4) {
        // word w of the lane's 16-byte chunk: tile w's nibbles (b_codes<4> of tile 0)
        const uint32_t word = *reinterpret_cast<const uint32_t*>(chunk + 4 * w);
        a[2 * s] = b_codes<4>(&word, 0, 0);
        a[2 * s + 1] = b_codes<4>(&word, 0, 1);
      } else {
        // words 2 w and 2 w + 1 of the lane's two chunks (uint4 w / 2, components 2 (w % 2) ..)
        const uint2 v = *reinterpret_cast<const uint2*>(chunk + (w >> 1) * 512 + (w & 1) * 8);
        a[2 * s] = v.x;
        a[2 * s + 1] = v.y;
      }
    }
  }

  // A stage's sums, held as the bits of the float 1.5 * 2^23 + sum: one integer add converts
  // them (exact while |sum| < 2^22: 128 rows of codes times at most 127 x 255), and it is a
  // real instruction right after the wgmma wait, so the fold reads registers no wgmma defines.
  static constexpr uint32_t MAGIC_BITS = 0x4B400000u;   // 1.5 * 2^23 = 12582912
  static constexpr float MAGIC = 12582912.0f;

  // The held sums of a stage into the fp32 ones: acc += (sum - z xsum) xs ws for element i of
  // block j: row 16 w + g + 8 h of the m64 (column n of the block), token 8 a + 2 q + e, with
  // i = 4 a + 2 h + e. The zero point comes off at the group's first stage only. Every step
  // is exact up to the last multiply-add (|sum - z xsum| < 2^23).
  __device__ __forceinline__ void fold(const unsigned char* base, bool group_start, int c, int w,
                                       int lane) {
    using S = typename C::scalar_t;
    const int g = lane >> 2, q = lane & 3;
    const float* xs = T::x_scales(base);
    const int* xsum = reinterpret_cast<const int*>(xs + NT);
#pragma unroll
    for (int j = 0; j < BPW; ++j) {
      S sv[2], zv[2];
      *reinterpret_cast<uint32_t*>(sv) =
          *reinterpret_cast<const uint32_t*>(T::scale_slots(base, c * BPW + j, g) + 4 * w);
      if constexpr (T::Z_BYTES) {
        *reinterpret_cast<uint32_t*>(zv) =
            *reinterpret_cast<const uint32_t*>(T::zero_slots(base, c * BPW + j, g) + 4 * w);
      } else {
        zv[0] = zv[1] = from_float<S>(C::ZERO_CONST);
      }
      const float ws[2] = {to_float(sv[0]), to_float(sv[1])};
      const float z[2] = {group_start ? to_float(zv[0]) : 0.0f,
                          group_start ? to_float(zv[1]) : 0.0f};
#pragma unroll
      for (int a = 0; a < NT / 8; ++a) {
        const float2 x = *reinterpret_cast<const float2*>(xs + 8 * a + 2 * q);
        const int2 n = *reinterpret_cast<const int2*>(xsum + 8 * a + 2 * q);
        const float xv[2] = {x.x, x.y};
        const float nv[2] = {(float)n.x, (float)n.y};
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int i = 4 * a + 2 * h + e;
            const float d = __uint_as_float(held[j][i]) + fmaf(-z[h], nv[e], -MAGIC);
            acc[j][i] = fmaf(d, xv[e] * ws[h], acc[j][i]);
          }
      }
    }
  }

  // FP8: the held sums of a stage into the fp32 ones (held = -sum, so acc - held is
  // exactly acc + sum).
  __device__ __forceinline__ void promote() {
#pragma unroll
    for (int j = 0; j < BPW; ++j)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) acc[j][i] -= __uint_as_float(held[j][i]);
  }

  // The held sums of stage kt: folded with their scales (int8) or added (FP8).
  __device__ __forceinline__ void retire(const unsigned char* base, int kt, int c, int w,
                                         int lane) {
    if constexpr (PROMOTE) promote();
    else fold(base, (long long)kt * T::STAGE_K % C::GROUP == 0, c, w, lane);
  }

  // Stage it's wgmmas into `sums` (this warp's A fragments loaded first: one shared-memory
  // latency a stage), committed as one group.
  __device__ __forceinline__ void issue_stage(const unsigned char* base, Sum (&sums)[BPW][NT / 2],
                                              int c, int w, int lane) {
    uint32_t a[4][BPW][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int j = 0; j < BPW; ++j) load_a(base, kk, c * BPW + j, w, lane, a[kk][j]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t desc = smem_desc_sw128(base + kk * 32);
#pragma unroll
      for (int j = 0; j < BPW; ++j) {
        if constexpr (STAGE_SUMS) {
          if (kk == 0) wgmma_rs_act8_fresh<NT, T::FP8>(sums[j], a[kk][j], desc);  // a stage's own
          else wgmma_rs_act8<NT, T::FP8>(sums[j], a[kk][j], desc, 1);
        } else {
          wgmma_rs_act8<NT, T::FP8>(sums[j], a[kk][j], desc, 1);
        }
      }
    }
    wgmma_commit();
  }

  // Keeps the compiler from moving reads of the sums above the wgmma wait before it.
  __device__ __forceinline__ static void pin_sums(Sum (&sums)[BPW][NT / 2]) {
#pragma unroll
    for (int j = 0; j < BPW; ++j)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) {
        if constexpr (T::FP8) pin(sums[j][i]);
        else asm volatile("" : "+r"(sums[j][i])::"memory");
      }
  }

  __device__ __forceinline__ void mainloop(unsigned char* smem, uint64_t* full, uint64_t* empty,
                                           const WgmmaCta& cta, int warp, int lane) {
    const int c = warp >> 2, w = warp & 3, kt_begin = cta.kt_begin, n_kt = cta.n_kt;
#pragma unroll
    for (int j = 0; j < BPW; ++j)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) {
        if constexpr (STAGE_SUMS) acc[j][i] = 0.0f;  // (a stage's first wgmma: fresh sums)
        else part[j][i] = 0;
      }
    auto stage_base = [&](int it) { return smem + (it % T::STAGES) * T::STAGE_BYTES; };
    if constexpr (STAGE_SUMS) {
      // Stage it's wgmmas run while the warpgroup retires stage it - 1's held sums (then
      // hands that stage's slot back), so the tensor cores and the fold's arithmetic overlap
      // within the warpgroup too. Each step waits for all of its wgmmas and holds their sums
      // at once: the fold never reads registers of a wgmma in flight (ptxas would serialize
      // every wgmma, C7514, or wait before the fold, C7517). The hold is an add (int8) or a
      // sign flip (FP8) so that ptxas cannot make it a plain copy and fold in place.
      for (int it = 0; it < n_kt; ++it) {
        mbar_wait(full + it % T::STAGES, (it / T::STAGES) & 1);
        issue_stage(stage_base(it), part, c, w, lane);
        if (it > 0) {
          retire(stage_base(it - 1), kt_begin + it - 1, c, w, lane);
          __syncwarp();
          if (lane == 0) mbar_arrive(empty + (it - 1) % T::STAGES);
        }
        wgmma_wait<0>();
#pragma unroll
        for (int j = 0; j < BPW; ++j)
#pragma unroll
          for (int i = 0; i < NT / 2; ++i) {
            if constexpr (T::FP8)
              asm volatile("xor.b32 %0, %1, 0x80000000;\n"
                           : "=r"(held[j][i]) : "r"(__float_as_uint(part[j][i])));
            else
              asm volatile("add.s32 %0, %1, %2;\n"
                           : "=r"(held[j][i]) : "r"(part[j][i]), "n"(MAGIC_BITS));
          }
      }
      if (n_kt > 0) retire(stage_base(n_kt - 1), kt_begin + n_kt - 1, c, w, lane);
#pragma unroll
      for (int j = 0; j < BPW; ++j)
#pragma unroll
        for (int i = 0; i < NT / 2; ++i) pin(acc[j][i]);
    } else {
      // Unrolled twice: two register sets of A fragments, one read by the group in flight
      // while the next stage's are written (as wgmma.cuh's block split).
#pragma unroll 2
      for (int it = 0; it < n_kt; ++it) {
        mbar_wait(full + it % T::STAGES, (it / T::STAGES) & 1);
        issue_stage(stage_base(it), part, c, w, lane);
        // One group in flight: the previous stage's is done, and its slot goes back.
        wgmma_wait<1>();
        if (it > 0 && lane == 0) mbar_arrive(empty + (it - 1) % T::STAGES);
      }
      wgmma_wait<0>();
      pin_sums(part);
    }
  }

  // The sums into the fp32 tile [token][n] (wgmma.cuh's BlockSplit order). Per-channel: the
  // x scale of the token, and (int8) the zero point times its code sum off in split 0 (the
  // zero point of column n of block b is slot 8 (n % 8) + (n % 64) / 8 of the permuted row).
  __device__ __forceinline__ void store(float* red, const Params<typename C::scalar_t>& p,
                                        const WgmmaCta& cta, int warp, int lane) const {
    const int c = warp >> 2, w = warp & 3, g = lane >> 2, q = lane & 3;
    const int m0 = cta.m0, nb0 = cta.nb0, split = cta.split;
#pragma unroll
    for (int j = 0; j < BPW; ++j) {
      int z[2] = {0, 0};
      if constexpr (!FOLD && !T::FP8) {
        if (split == 0) {
#pragma unroll
          for (int h = 0; h < 2; ++h)
            z[h] = C::HAS_ZP ? (int)to_float(p.zeros[(nb0 + c * BPW + j) * 64 + g * 8 + 2 * w + h])
                             : (int)C::ZERO_CONST;
        }
      }
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) {
        const int h = (i >> 1) & 1;
        const int n = 64 * (c * BPW + j) + 16 * w + 8 * h + g;
        const int m = 8 * (i >> 2) + 2 * q + (i & 1);
        float v;
        if constexpr (FOLD) {
          v = acc[j][i];
        } else {
          const bool row_ok = m0 + m < p.M;
          const float xs = row_ok ? p.xs[m0 + m] : 0.0f;
          if constexpr (T::FP8) v = acc[j][i] * xs;
          else v = row_ok ? (float)(part[j][i] - z[h] * p.xsum[m0 + m]) * xs : 0.0f;
        }
        red[m * T::RED_STRIDE + n] = v;
      }
    }
  }
};

// ---- host side ----------------------------------------------------------------------------
// wgmma=2 with int8=1 or fp8=1: CONSUMERS warpgroups of BPW n64 blocks each over M tiles of
// M_TILE tokens (x already quantized by make_params), on wgmma.cuh's kernel.
template <class C, int M_TILE, int BPW, int CONSUMERS, int STAGES, bool FP8>
cudaError_t launch_wgmma_act8(Params<typename C::scalar_t> p, cudaStream_t stream) {
  using T = WgmmaAct8Tile<C, M_TILE, BPW * CONSUMERS, CONSUMERS, STAGES, FP8>;
  return launch_wgmma<C, T, Act8BlockSplit<C, T, BPW>>(p, stream);
}

}  // namespace qc

#endif  // QCOMPILER_WGMMA_ACT8_CUH
