// qcompiler CUDA kernels: the Hopper (sm_90a) mixed-input GEMM for larger M: wgmma fed by a
// warp-specialized TMA pipeline. A template over the configuration C (params.cuh) and the
// tile parameters the tile pass decides. Static code, included by the generated .cu of a
// cuda-sm90 qmatmul whose variants use it (built for sm_90a only).
//
// The transposed product, as Machete does: y^T[n, m] = sum_k W^T[n, k] x^T[k, m]. The
// dequantized weights are wgmma's A operand, taken from registers, so they never go back to
// shared memory; x is the B operand, read by wgmma from shared memory (K-major, 128-byte
// swizzle, exactly what TMA writes). The weights keep the packed layout of the other kernels
// (cuda_mma_b16, layout.py), so one copy of the weights serves the GEMV kernel at small M and
// this one above: a lane's 16-byte chunk of a k16 x n64 block holds the B fragments of the
// block's four n16 tiles t, and (operands swapped) fragment t is exactly the m16k16 A
// fragment of 16 rows of W^T. Which warp unpacks which tile, and how many tokens each
// dequantized tile feeds, is the mapping (TokenSplit for wgmma=1, BlockSplit for wgmma=2,
// below); the pipeline, the producer and the end of the CTA are shared.
//
// CTA: consumer warpgroups, then a producer warpgroup (setmaxnreg moves its registers to the
// consumers; lane 0 of its first warp issues every copy: one TMA box of x per stage, bulk
// copies of the packed weights, scale and zero-point rows). Stages of 64 K rows, STAGES deep,
// a full and an empty mbarrier each; blockIdx = (M tile, N tile, K split). The end of the
// CTA is the other kernels' finish_tile (epilogue, or split-K partials and the last CTA's
// fix-up) over an fp32 tile in shared memory.
#ifndef QCOMPILER_WGMMA_CUH
#define QCOMPILER_WGMMA_CUH

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "ops/common.cuh"  // wait_for_previous_grid, launch_dependent (PDL)
#include "params.cuh"
#include "pipeline.cuh"  // smem_addr
#include "scalar.cuh"
#include "splitk.cuh"

namespace qc {

// ---- mbarriers, TMA and bulk copies -------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
               ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}

// One 2-D box of the tensor map (coordinates: innermost first) into shared memory.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(smem_addr(dst)), "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar)) : "memory");
}

// `bytes` (a multiple of 16) contiguous bytes of global memory into shared memory.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

// ---- wgmma --------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of an accumulator across a wgmma wait.
__device__ __forceinline__ void pin(float& v) { asm volatile("" : "+f"(v)::"memory"); }

// The shared-memory descriptor of a K-major operand in the 128-byte swizzle (rows of 128
// bytes, 8-row atoms 1024 bytes apart); `addr` is 1024-aligned plus the k16 step's 32 bytes.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* addr) {
  const uint64_t a = smem_addr(addr);
  return ((a & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// The accumulator operand lists of wgmma's inline asm: N / 2 fp32 registers a thread for
// m64nNk16 (the preprocessor cannot count, so the "%i" lists are spelled out).
#define QC_D8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                    "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define QC_D32(d, i) QC_D8(d, i), QC_D8(d, i + 8), QC_D8(d, i + 16), QC_D8(d, i + 24)
#define QC_WGMMA_OPS_N64 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36"
#define QC_WGMMA_OPS_N128 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68"
#define QC_WGMMA_OPS_N256 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, {%128,%129,%130,%131}, %132"

// d[64 x N] += a (registers: this warp's m16k16 fragment) * b (shared memory, N x k16),
// N in {64, 128, 256} (the tokens of the transposed product).
template <class S, int N>
__device__ __forceinline__ void wgmma_rs(float* d, const uint32_t* a, uint64_t desc_b) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma m64nNk16: N in {64, 128, 256}");
  constexpr bool F16 = std::is_same<S, half>::value;
#define QC_WGMMA_ASM(SHAPE, TYPES, OPS, ...)                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                   \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPES " " OPS ", p, 1, 1, 0;\n}\n" \
               : __VA_ARGS__                                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
  if constexpr (N == 64) {
    if constexpr (F16) QC_WGMMA_ASM("m64n64k16", "f16.f16", QC_WGMMA_OPS_N64, QC_D32(d, 0));
    else QC_WGMMA_ASM("m64n64k16", "bf16.bf16", QC_WGMMA_OPS_N64, QC_D32(d, 0));
  } else if constexpr (N == 128) {
    if constexpr (F16)
      QC_WGMMA_ASM("m64n128k16", "f16.f16", QC_WGMMA_OPS_N128, QC_D32(d, 0), QC_D32(d, 32));
    else
      QC_WGMMA_ASM("m64n128k16", "bf16.bf16", QC_WGMMA_OPS_N128, QC_D32(d, 0), QC_D32(d, 32));
  } else {
    if constexpr (F16)
      QC_WGMMA_ASM("m64n256k16", "f16.f16", QC_WGMMA_OPS_N256, QC_D32(d, 0), QC_D32(d, 32),
                   QC_D32(d, 64), QC_D32(d, 96));
    else
      QC_WGMMA_ASM("m64n256k16", "bf16.bf16", QC_WGMMA_OPS_N256, QC_D32(d, 0), QC_D32(d, 32),
                   QC_D32(d, 64), QC_D32(d, 96));
  }
#undef QC_WGMMA_ASM
}

// ---- the kernels --------------------------------------------------------------------------
// Two mappings of warps to the CTA's tile share the pipeline, the producer and the end:
//
// - TokenSplit<NT> (wgmma=1): the consumer warpgroups split the CTA's tokens, NT = 64 each,
//   and each covers all four n64 blocks: warp w loads its block's 16-byte lane chunk (all four
//   n16 tiles t) and wgmma t takes tile t of every warp's block. Four m64n64k16 a k16 step, so
//   each dequantized tile feeds 64 tokens: the unpack (one warp per SM sub-partition) bounds it.
// - BlockSplit<BPW> (wgmma=2): the consumer warpgroups split the CTA's n64 blocks, BPW each,
//   and each covers all M_TILE tokens: warp w takes n16 tile w of each of its blocks (word w
//   of every lane's chunk) and one m64nM_TILEk16 a block, so a dequantized tile feeds up to
//   256 tokens: a quarter of TokenSplit's unpack work per MMA at M tiles of 256.
template <class C, int M_TILE_, int N_BLOCKS_CTA_, int CONSUMERS_, int STAGES_>
struct WgmmaTile {
  static_assert(C::CB == 4, "the wgmma kernel reads 4-bit containers");
  static constexpr int M_TILE = M_TILE_;                 // tokens per CTA (<= 256: a TMA box)
  static constexpr int N_BLOCKS_CTA = N_BLOCKS_CTA_;     // n64 blocks per CTA
  static constexpr int CONSUMERS = CONSUMERS_, STAGES = STAGES_;
  static constexpr int CONSUMER_THREADS = 128 * CONSUMERS;
  static constexpr int THREADS = CONSUMER_THREADS + 128;  // consumers, then the producer warpgroup
  static constexpr int N_TILE = 64 * N_BLOCKS_CTA;
  static constexpr int STAGE_K = 64;                     // one 128-byte swizzle row of x
  static constexpr int K_STAGES = C::K_PAD / STAGE_K;
  static constexpr int SROWS = C::GROUP < STAGE_K ? STAGE_K / C::GROUP : 1;  // scale rows per stage
  static constexpr int X_BYTES = M_TILE * STAGE_K * 2;
  static constexpr int W_KS_BYTES = N_BLOCKS_CTA * 512;  // one k16 step of the CTA's blocks
  static constexpr int W_BYTES = 4 * W_KS_BYTES;
  static constexpr int ROW_BYTES = N_TILE * 2;           // one scale or zero-point row
  static constexpr int S_BYTES = C::SCALE_IN_EPILOGUE ? 0 : SROWS * ROW_BYTES;
  static constexpr int Z_BYTES = C::HAS_ZP ? SROWS * ROW_BYTES : 0;
  static constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + S_BYTES + Z_BYTES + 1023) / 1024 * 1024;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int RED_STRIDE = N_TILE + 4;          // fp32 tile rows, padded (banks)
  static constexpr int RED_BYTES = M_TILE * RED_STRIDE * 4;
  static constexpr int BODY_BYTES = PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES;
  // + barriers and the split-K flag, + alignment of the dynamic base to 1024 bytes
  static constexpr int SMEM_BYTES = BODY_BYTES + 2 * STAGES * 8 + 16 + 1024;
  static_assert(M_TILE % 64 == 0 && M_TILE <= 256, "M tile: 64, 128, 192 or 256 tokens");
  static_assert(C::K_PAD % STAGE_K == 0, "K_PAD is a multiple of 64");
  static_assert(C::GROUP % 16 == 0 && (C::GROUP % STAGE_K == 0 || STAGE_K % C::GROUP == 0),
                "group and stage nest");
};

// Where one stage's parts lie in shared memory (T: a WgmmaTile).
template <class T>
struct StageView {
  const unsigned char* base;
  // The 16-byte chunk of `lane` in n64 block `blk` (of the CTA's) at k16 step `ks`.
  __device__ const unsigned char* w_chunk(int ks, int blk, int lane) const {
    return base + T::X_BYTES + ks * T::W_KS_BYTES + blk * 512 + lane * 16;
  }
  // Scale (zero-point) row r, from the 16 bytes of lane group g in n64 block `blk`: slot
  // 2t + h is column 64 blk + 16 t + 8 h + g (layout.py's permuted rows).
  __device__ const unsigned char* scales(int r, int blk, int g) const {
    return base + T::X_BYTES + T::W_BYTES + r * T::ROW_BYTES + blk * 128 + g * 16;
  }
  __device__ const unsigned char* zeros(int r, int blk, int g) const {
    return base + T::X_BYTES + T::W_BYTES + T::S_BYTES + r * T::ROW_BYTES + blk * 128 + g * 16;
  }
};

// The producer's ring: for each of the CTA's stages, wait for its slot to be handed back
// (from the STAGES-th on), announce the stage's bytes, and issue its copies: the model's
// constants, copy_constants(base, kt, bar) (weights, scales, zero points), and what earlier
// kernels wrote, copy_activations(base, kt, bar) (x; every copy completing on the full
// barrier bar). With PDL the kernel may start while the previous kernel of the stream still
// runs (programmatic dependent launch): the first ring's constants are issued at once, and
// its activations only after the wait for that kernel, so the weights' first trip from
// memory overlaps the previous kernel's end.
template <class T, bool PDL, class CopyConstants, class CopyActivations>
__device__ __forceinline__ void produce_ring(unsigned char* smem, uint64_t* full, uint64_t* empty,
                                             int kt_begin, int n_kt, uint32_t stage_tx,
                                             CopyConstants copy_constants,
                                             CopyActivations copy_activations) {
  const int first = PDL ? (n_kt < T::STAGES ? n_kt : T::STAGES) : 0;
  for (int it = 0; it < first; ++it) {
    mbar_expect_tx(full + it, stage_tx);
    copy_constants(smem + it * T::STAGE_BYTES, kt_begin + it, full + it);
  }
  if constexpr (PDL) qc_ops::wait_for_previous_grid();
  for (int it = 0; it < first; ++it)
    copy_activations(smem + it * T::STAGE_BYTES, kt_begin + it, full + it);
  for (int it = first; it < n_kt; ++it) {
    const int s = it % T::STAGES;
    if (it >= T::STAGES) mbar_wait(empty + s, ((it / T::STAGES) - 1) & 1);
    mbar_expect_tx(full + s, stage_tx);
    copy_constants(smem + s * T::STAGE_BYTES, kt_begin + it, full + s);
    copy_activations(smem + s * T::STAGE_BYTES, kt_begin + it, full + s);
  }
}

// The producer of 16-bit x: lane 0 of the producer warpgroup's first warp issues every copy of
// every stage (one TMA box of x, bulk copies of the packed weights, scale and zero-point rows).
template <class C, class T>
__device__ __forceinline__ void wgmma_produce(const CUtensorMap* x_map,
                                              const Params<typename C::scalar_t>& p,
                                              unsigned char* smem, uint64_t* full,
                                              uint64_t* empty, int m0, int nb0, int n_valid,
                                              int kt_begin, int n_kt) {
  const uint32_t w_bytes = n_valid * 512, row_bytes = n_valid * 128;
  const uint32_t stage_tx = T::X_BYTES + 4 * w_bytes +
                            T::SROWS * row_bytes * ((T::S_BYTES ? 1 : 0) + (T::Z_BYTES ? 1 : 0));
  produce_ring<T, C::WGMMA_PDL>(smem, full, empty, kt_begin, n_kt, stage_tx,
                          [&](unsigned char* base, int kt, uint64_t* bar) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
      bulk_load(base + T::X_BYTES + ks * T::W_KS_BYTES,
                p.w + ((long long)(kt * 4 + ks) * C::N_BLOCKS + nb0) * 32, w_bytes, bar);
#pragma unroll
    for (int r = 0; r < T::SROWS; ++r) {
      const long long row = (long long)kt * T::STAGE_K / C::GROUP + r;
      if (T::S_BYTES)
        bulk_load(base + T::X_BYTES + T::W_BYTES + r * T::ROW_BYTES,
                  p.scales + row * C::N_PAD + nb0 * 64, row_bytes, bar);
      if (T::Z_BYTES)
        bulk_load(base + T::X_BYTES + T::W_BYTES + T::S_BYTES + r * T::ROW_BYTES,
                  p.zeros + row * C::N_PAD + nb0 * 64, row_bytes, bar);
    }
  }, [&](unsigned char* base, int kt, uint64_t* bar) {
    tma_load_2d(base, x_map, kt * T::STAGE_K, m0, bar);  // rows past M: zeros
  });
}

// The scale row and whether k16 step ks starts a group (a new row) within a stage.
template <class C, class T>
__device__ __forceinline__ constexpr bool starts_group(int ks) {
  return (ks * 16) % (T::SROWS > 1 ? C::GROUP : T::STAGE_K) == 0;
}
template <class C, class T>
__device__ __forceinline__ constexpr int group_row(int ks) {
  return T::SROWS > 1 ? ks * 16 / C::GROUP : 0;
}

// The lane's scales and zero offsets of n16 tile t of a block, from the 8 values of its row
// slots (scale_slots, zero_slots: slot 2t + h is column 16 t + 8 h + g of the block).
template <class C, class T>
struct TileScales {
  using S = typename C::scalar_t;
  using S2 = pair_t<S>;
  typename C::Unpack::ZeroOffsets zo;
  S2 s2[2];
  __device__ __forceinline__ void load(const unsigned char* scale_slots,
                                       const unsigned char* zero_slots, int t) {
    S sv[2], zv[2];
    if constexpr (T::S_BYTES) {
      *reinterpret_cast<uint32_t*>(sv) = *reinterpret_cast<const uint32_t*>(scale_slots + 4 * t);
    } else {
      sv[0] = sv[1] = from_float<S>(1.0f);
    }
    if constexpr (T::Z_BYTES) {
      *reinterpret_cast<uint32_t*>(zv) = *reinterpret_cast<const uint32_t*>(zero_slots + 4 * t);
    } else {
      zv[0] = zv[1] = from_float<S>(C::ZERO_CONST);  // the constant zero point
    }
    zo = C::Unpack::zero_offsets(zv);  // constants without a zero-point table
    s2[0] = dup(sv[0]);
    s2[1] = dup(sv[1]);
  }
};

// Tile t's packed word -> this warp's m16k16 A fragment (rows: the tile's 16 columns of W).
template <class C>
__device__ __forceinline__ void unpack_a(const uint32_t* q, uint32_t* a,
                                         const typename C::Unpack::ZeroOffsets& zo,
                                         const pair_t<typename C::scalar_t>* s2) {
  uint32_t b[4];
  C::Unpack::template unpack_tile<!C::SCALE_IN_EPILOGUE>(q, b, zo, s2);
  // B fragments (b0b1, b2b3) of n8 halves 0, 1 -> A fragments a0a1 a2a3 a4a5 a6a7
  a[0] = b[0]; a[1] = b[2]; a[2] = b[1]; a[3] = b[3];
}

// One k16 step's wgmmas issued (TokenSplit); the previous step's are waited for (one group
// in flight while the next step unpacks), and at a stage's first step, where the previous
// stage's last group is done, its slot is handed back to the producer.
__device__ __forceinline__ void step_done(uint64_t* empty, int stages, int it, int ks,
                                          int lane) {
  wgmma_commit();
  wgmma_wait<1>();
  if (ks == 0 && it > 0 && lane == 0) mbar_arrive(empty + (it - 1) % stages);
}

// The CTA's part of the product, shared by its producer and consumer warpgroups: the first
// token m0, the first n64 block nb0 and how many of its blocks exist (n_valid), the K split
// and its range of stages.
struct WgmmaCta {
  int m0, nb0, n_valid, split, kt_begin, n_kt;
};

// What a mapping of 16-bit x brings to the kernel below besides its consumers: the TMA map
// of x and the producer's copies (wgmma_produce).
template <class C, class T>
struct X16Stages {
  static cudaError_t make_map(const Params<typename C::scalar_t>& p, CUtensorMap* map);
  __device__ static void produce(const CUtensorMap* x_map, const Params<typename C::scalar_t>& p,
                                 unsigned char* smem, uint64_t* full, uint64_t* empty,
                                 const WgmmaCta& cta) {
    wgmma_produce<C, T>(x_map, p, smem, full, empty, cta.m0, cta.nb0, cta.n_valid,
                        cta.kt_begin, cta.n_kt);
  }
};

// wgmma=1: the consumer warpgroups split the tokens (64 each); see above.
template <class C, class T>
struct TokenSplit : X16Stages<C, T> {
  static constexpr int NT = 64;  // tokens per consumer warpgroup
  static_assert(T::M_TILE == NT * T::CONSUMERS && T::N_BLOCKS_CTA == 4, "TokenSplit's tile");
  float acc[4][NT / 2];

  __device__ __forceinline__ void mainloop(unsigned char* smem, uint64_t* full, uint64_t* empty,
                                           const WgmmaCta& cta, int warp, int lane) {
    using S = typename C::scalar_t;
    const int c = warp >> 2, w = warp & 3, g = lane >> 2, n_kt = cta.n_kt;
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) acc[t][i] = 0.0f;
    TileScales<C, T> sc[4];
    for (int it = 0; it < n_kt; ++it) {
      const int s = it % T::STAGES;
      mbar_wait(full + s, (it / T::STAGES) & 1);
      const StageView<T> v{smem + s * T::STAGE_BYTES};
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        if (starts_group<C, T>(ks))
#pragma unroll
          for (int t = 0; t < 4; ++t)
            sc[t].load(v.scales(group_row<C, T>(ks), w, g), v.zeros(group_row<C, T>(ks), w, g), t);
        const uint4 q = *reinterpret_cast<const uint4*>(v.w_chunk(ks, w, lane));
        const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
        uint32_t a[4][4];
#pragma unroll
        for (int t = 0; t < 4; ++t) unpack_a<C>(qw + t, a[t], sc[t].zo, sc[t].s2);
        const uint64_t desc = smem_desc_sw128(v.base + c * NT * 128 + ks * 32);
        wgmma_fence();
#pragma unroll
        for (int t = 0; t < 4; ++t) wgmma_rs<S, NT>(acc[t], a[t], desc);
        step_done(empty, T::STAGES, it, ks, lane);
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) pin(acc[t][i]);
  }

  // The accumulators into the fp32 tile [token][n]. wgmma D fragment: row 16 w + g + 8 h of
  // the m64 (an n of W^T), column 8 (i / 4) + 2 q + i % 2 (a token).
  __device__ __forceinline__ void store(float* red, const Params<typename C::scalar_t>&,
                                        const WgmmaCta&, int warp, int lane) const {
    const int c = warp >> 2, w = warp & 3, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) {
        const int n = 64 * w + 16 * t + 8 * ((i >> 1) & 1) + g;
        const int m = c * NT + 8 * (i >> 2) + 2 * q + (i & 1);
        red[m * T::RED_STRIDE + n] = acc[t][i];
      }
  }
};

// wgmma=2: the consumer warpgroups split the n64 blocks (BPW each); see above. With TG > 1
// (more warpgroups than blocks: one block, two warpgroups) they split the tokens instead,
// NT = M_TILE / TG each, every one unpacking the same weights: an M tile of 128 on one n64
// block then keeps two warpgroups on the SM, so that one unpacks while the other's wgmmas
// run (a lone warpgroup's unpack and wgmmas take turns).
template <class C, class T, int BPW, int TG = 1>
struct BlockSplit : X16Stages<C, T> {
  static constexpr int NT = T::M_TILE / TG;  // tokens per wgmma: the CTA's, or a TG-th of them
  static_assert(T::N_BLOCKS_CTA * TG == BPW * T::CONSUMERS && T::CONSUMERS % TG == 0,
                "BlockSplit's tile");
  static_assert(NT == 64 || NT == 128 || NT == 256, "a wgmma's N: 64, 128 or 256 tokens");
  static_assert(BPW * NT <= 256, "at most 128 fp32 accumulators a thread");
  float acc[BPW][NT / 2];

  __device__ __forceinline__ void mainloop(unsigned char* smem, uint64_t* full, uint64_t* empty,
                                           const WgmmaCta& cta, int warp, int lane) {
    using S = typename C::scalar_t;
    // warpgroup wg: token group wg % TG, blocks (wg / TG) BPW ..
    const int wg = warp >> 2, c = wg / TG, tg = wg % TG, w = warp & 3, g = lane >> 2;
    const int n_kt = cta.n_kt;
#pragma unroll
    for (int j = 0; j < BPW; ++j)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) acc[j][i] = 0.0f;
    // Unrolled twice: two register sets of A fragments, one read by the group in flight
    // while the other is written.
#pragma unroll 2
    for (int it = 0; it < n_kt; ++it) {
      const int s = it % T::STAGES;
      mbar_wait(full + s, (it / T::STAGES) & 1);
      const StageView<T> v{smem + s * T::STAGE_BYTES};
      // Every load of the stage first, independent of each other: one shared-memory latency
      // a stage instead of one a k16 step (a consumer warp is alone on its SM sub-partition,
      // so nothing else hides it). Word w of a lane's chunk: 4-way bank conflicts (lanes 8
      // apart share a bank), 4 wavefronts a warp, as many as 16-byte loads of whole chunks.
      TileScales<C, T> sc[T::SROWS][BPW];
      uint32_t q[4][BPW];
#pragma unroll
      for (int r = 0; r < T::SROWS; ++r)
#pragma unroll
        for (int j = 0; j < BPW; ++j)
          sc[r][j].load(v.scales(r, c * BPW + j, g), v.zeros(r, c * BPW + j, g), w);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int j = 0; j < BPW; ++j)
          q[ks][j] = *reinterpret_cast<const uint32_t*>(v.w_chunk(ks, c * BPW + j, lane) + 4 * w);
      // The whole stage's A fragments, then its 4 x BPW wgmmas as one group: one fence,
      // commit and wait a stage (warpgroup-wide steps, each costing a synchronization of
      // the four warps) rather than one a k16 step, and the next stage's unpack runs while
      // this group is in flight.
      uint32_t a[4][BPW][4];
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int j = 0; j < BPW; ++j) {
          const TileScales<C, T>& t = sc[group_row<C, T>(ks)][j];
          unpack_a<C>(&q[ks][j], a[ks][j], t.zo, t.s2);
        }
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        // x's rows of this token group: NT rows of 128 bytes (whole 8-row swizzle atoms)
        const uint64_t desc = smem_desc_sw128(v.base + tg * NT * 128 + ks * 32);
#pragma unroll
        for (int j = 0; j < BPW; ++j) wgmma_rs<S, NT>(acc[j], a[ks][j], desc);
      }
      wgmma_commit();
      // The previous stage's group is done (one group in flight): its slot goes back.
      wgmma_wait<1>();
      if (it > 0 && lane == 0) mbar_arrive(empty + (it - 1) % T::STAGES);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int j = 0; j < BPW; ++j)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) pin(acc[j][i]);
  }

  // As TokenSplit's, with the m64's rows the four tiles of block c BPW + j (warp w: tile w)
  // and the columns the tokens of token group tg.
  __device__ __forceinline__ void store(float* red, const Params<typename C::scalar_t>&,
                                        const WgmmaCta&, int warp, int lane) const {
    const int wg = warp >> 2, c = wg / TG, tg = wg % TG, w = warp & 3, g = lane >> 2,
              q = lane & 3;
#pragma unroll
    for (int j = 0; j < BPW; ++j)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) {
        const int n = 64 * (c * BPW + j) + 16 * w + 8 * ((i >> 1) & 1) + g;
        const int m = tg * NT + 8 * (i >> 2) + 2 * q + (i & 1);
        red[m * T::RED_STRIDE + n] = acc[j][i];
      }
  }
};

// CTA: T::CONSUMERS consumer warpgroups (warps 0 .. 4 CONSUMERS - 1) running Mapping, and a
// producer warpgroup after them (setmaxnreg moves its registers to the consumers) issuing
// Mapping::produce's copies. Stages of T::STAGE_K rows, STAGES deep, a full and an empty
// mbarrier each; blockIdx = (M tile, N tile, K split). The end of the CTA is the other
// kernels' finish_tile (epilogue, or split-K partials and the last CTA's fix-up) over the
// fp32 tile that Mapping::store writes in shared memory. Mappings: TokenSplit, BlockSplit
// (16-bit x), Act8BlockSplit (8-bit x, wgmma_act8.cuh).
template <class C, class T, class Mapping>
__global__ void __launch_bounds__(T::THREADS, 1)
qmatmul_wgmma_kernel(const __grid_constant__ CUtensorMap x_map,
                     const Params<typename C::scalar_t> p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another arch (wgmma and setmaxnreg are sm_90a): never launched there
#else
  extern __shared__ unsigned char smem_raw[];
  // Aligned to 1024 bytes (the 128-byte swizzle's atoms) by an offset from smem_raw, not a
  // round trip through an integer, so that the compiler still knows every pointer into it
  // is shared memory: LDS and STS instead of generic loads and stores.
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::BODY_BYTES);
  uint64_t* empty = full + T::STAGES;
  int* flag = reinterpret_cast<int*>(empty + T::STAGES);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  WgmmaCta cta;
  cta.m0 = blockIdx.x * T::M_TILE;
  cta.nb0 = blockIdx.y * T::N_BLOCKS_CTA;
  cta.n_valid = C::N_BLOCKS - cta.nb0 < T::N_BLOCKS_CTA ? C::N_BLOCKS - cta.nb0 : T::N_BLOCKS_CTA;
  cta.split = blockIdx.z;
  cta.kt_begin = (int)(((long long)cta.split * T::K_STAGES) / p.split_k);
  cta.n_kt = (int)(((long long)(cta.split + 1) * T::K_STAGES) / p.split_k) - cta.kt_begin;

  if (tid == 0) {
    for (int s = 0; s < T::STAGES; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, 4 * T::CONSUMERS);   // lane 0 of every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  Mapping mapping;
  if (warp >= 4 * T::CONSUMERS) {
    // The producer warpgroup gives its registers to the consumers, issues the copies, leaves.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 4 * T::CONSUMERS && lane == 0) Mapping::produce(&x_map, p, smem, full, empty, cta);
    return;  // the consumers finish the tile (named barrier 1 counts them only)
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  mapping.mainloop(smem, full, empty, cta, warp, lane);
  if constexpr (C::WGMMA_PDL) {
    // The end of the tile reads the epilogue's operands and writes y (perhaps over a buffer
    // the previous kernel read): each consumer thread waits for that kernel itself (the
    // producer's wait orders only its own reads; long done by now). Then the next kernel
    // may launch: its blocks take SMs only as this grid's last ones leave (its own wait holds
    // it until this grid has finished).
    qc_ops::wait_for_previous_grid();
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  }
  // Every stage has been consumed (the producer's copies all landed): the pipeline's shared
  // memory becomes the CTA's fp32 tile [token][n].
  cta_sync<T::CONSUMER_THREADS>();
  float* red = reinterpret_cast<float*>(smem);
  mapping.store(red, p, cta, warp, lane);
  cta_sync<T::CONSUMER_THREADS>();
  auto tile_sum = [&](int i) { return red[(i / T::N_TILE) * T::RED_STRIDE + i % T::N_TILE]; };
  finish_tile<C, T::M_TILE, T::N_TILE, T::CONSUMER_THREADS, decltype(tile_sum),
              T::CONSUMER_THREADS>(p, cta.m0, cta.nb0 * 64, cta.split, flag, tile_sum);
#endif
}

// ---- host side ----------------------------------------------------------------------------
// cuTensorMapEncodeTiled from the driver, through the runtime (no link to libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                         cudaEnableDefault, &found) == cudaSuccess &&
        found == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }
  return fn;
}

// The TMA map of x [M, x_stride] in boxes of 64 K columns x M_TILE rows, 128-byte swizzle
// (what wgmma's K-major B operand reads); rows past M and columns past K read as zeros.
template <class C, int M_TILE>
cudaError_t make_x_map(const Params<typename C::scalar_t>& p, CUtensorMap* map) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const CUtensorMapDataType type = std::is_same<typename C::scalar_t, half>::value
                                       ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t dims[2] = {(cuuint64_t)p.x_stride, (cuuint64_t)p.M};
  const cuuint64_t strides[1] = {(cuuint64_t)p.x_stride * 2};
  const cuuint32_t box[2] = {64, (cuuint32_t)M_TILE};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, type, 2, const_cast<typename C::scalar_t*>(p.x), dims, strides,
                            box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  // x must be 16-byte aligned with rows a multiple of 16 bytes (PREP_X copies it otherwise).
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <class C, class T>
cudaError_t X16Stages<C, T>::make_map(const Params<typename C::scalar_t>& p, CUtensorMap* map) {
  return make_x_map<C, T::M_TILE>(p, map);
}

template <class C, class T, class Mapping>
cudaError_t launch_wgmma(Params<typename C::scalar_t> p, cudaStream_t stream) {
  auto kernel = qmatmul_wgmma_kernel<C, T, Mapping>;
  static bool smem_set = false;  // over 48 KB of shared memory must be asked for once
  if (!smem_set) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           T::SMEM_BYTES);
    if (err != cudaSuccess) return err;
    smem_set = true;
  }
  CUtensorMap map;
  cudaError_t err = Mapping::make_map(p, &map);
  if (err != cudaSuccess) return err;
  dim3 grid((p.M + T::M_TILE - 1) / T::M_TILE, (C::N_BLOCKS + T::N_BLOCKS_CTA - 1) / T::N_BLOCKS_CTA,
            p.split_k);
  // Early (programmatic dependent launch) where the tile pass asked for it (C::WGMMA_PDL:
  // the code then waits for its inputs) and QC_CUDA_PDL is not 0 (ops/common.cuh).
  static int early = -1;
  if (early < 0) early = C::WGMMA_PDL && qc_ops::may_launch_early(kernel);
  return qc_ops::launch_dependent(kernel, grid, dim3(T::THREADS), T::SMEM_BYTES, stream,
                                  early != 0, map, p);
}

// wgmma=1: CONSUMERS warpgroups of 64 tokens over an N tile of 256.
template <class C, int CONSUMERS, int STAGES>
cudaError_t launch_wgmma_token_split(Params<typename C::scalar_t> p, cudaStream_t stream) {
  using T = WgmmaTile<C, 64 * CONSUMERS, 4, CONSUMERS, STAGES>;
  return launch_wgmma<C, T, TokenSplit<C, T>>(p, stream);
}

// wgmma=2: CONSUMERS warpgroups over M tiles of M_TILE tokens and BLOCKS n64 blocks: each
// takes BLOCKS / CONSUMERS blocks and every token, or (two warpgroups, one block) half the
// tokens of the block.
template <class C, int M_TILE, int BLOCKS, int CONSUMERS, int STAGES>
cudaError_t launch_wgmma_block_split(Params<typename C::scalar_t> p, cudaStream_t stream) {
  constexpr int TG = CONSUMERS > BLOCKS ? CONSUMERS / BLOCKS : 1;  // token groups
  constexpr int BPW = BLOCKS * TG / CONSUMERS;                     // blocks a warpgroup
  using T = WgmmaTile<C, M_TILE, BLOCKS, CONSUMERS, STAGES>;
  return launch_wgmma<C, T, BlockSplit<C, T, BPW, TG>>(p, stream);
}

}  // namespace qc

#endif  // QCOMPILER_WGMMA_CUH
