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
// fragment of 16 rows of W^T. In a CTA, warp w of a consumer warpgroup takes n64 block w of
// the CTA's four (conflict-free 16-byte loads from shared memory) and wgmma number t of a
// k16 step takes n16 tile t of every warp's block: four m64nNT k16 wgmmas per step, each
// with its own accumulators (2 NT fp32 registers a thread in all).
//
// CTA: CONSUMERS warpgroups (warps 0 .. 4 CONSUMERS - 1), each owning NT tokens (rows of x)
// of the CTA's CONSUMERS x NT, and a producer warpgroup after them (setmaxnreg moves its
// registers to the consumers; lane 0 of its first warp issues every copy: one TMA box of x
// per stage, bulk copies of the packed weights, scale and zero-point rows). Stages of 64 K rows, STAGES deep, a full and an empty mbarrier each. N tile 256;
// blockIdx = (M tile, N tile, K split). The end of the CTA is the other kernels'
// finish_tile (epilogue, or split-K partials and the last CTA's fix-up) over an fp32 tile
// in shared memory.
#ifndef QCOMPILER_WGMMA_CUH
#define QCOMPILER_WGMMA_CUH

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

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

// d[64 x 64] += a (registers: this warp's m16k16 fragment) * b (shared memory, 64 x k16).
template <class S>
__device__ __forceinline__ void wgmma_m64n64k16(float* d, const uint32_t* a, uint64_t desc_b) {
  if constexpr (std::is_same<S, half>::value) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));  }
}


// ---- the kernel ---------------------------------------------------------------------------
template <class C, int NT, int CONSUMERS, int STAGES>
struct WgmmaTile {
  static_assert(C::CB == 4, "the wgmma kernel reads 4-bit containers");
  static_assert(NT == 64, "tokens per consumer warpgroup: 64 (wgmma m64n64k16)");
  static constexpr int CONSUMER_THREADS = 128 * CONSUMERS;
  static constexpr int THREADS = CONSUMER_THREADS + 128;  // consumers, then the producer warpgroup
  static constexpr int M_TILE = NT * CONSUMERS;          // tokens per CTA (<= 256: a TMA box)
  static constexpr int N_BLOCKS_CTA = 4;                 // n64 blocks per CTA: one per warp
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
  static_assert(C::K_PAD % STAGE_K == 0, "K_PAD is a multiple of 64");
  static_assert(C::GROUP % 16 == 0 && (C::GROUP % STAGE_K == 0 || STAGE_K % C::GROUP == 0),
                "group and stage nest");
};

template <class C, int NT, int CONSUMERS, int STAGES>
__global__ void __launch_bounds__(128 * CONSUMERS + 128, 1)
qmatmul_wgmma_kernel(const __grid_constant__ CUtensorMap x_map,
                     const Params<typename C::scalar_t> p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another arch (wgmma and setmaxnreg are sm_90a): never launched there
#else
  using S = typename C::scalar_t;
  using S2 = pair_t<S>;
  using U = typename C::Unpack;
  using T = WgmmaTile<C, NT, CONSUMERS, STAGES>;
  constexpr bool APPLY_SCALE = !C::SCALE_IN_EPILOGUE;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::BODY_BYTES);
  uint64_t* empty = full + STAGES;
  int* flag = reinterpret_cast<int*>(empty + STAGES);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * T::M_TILE;
  const int nb0 = blockIdx.y * T::N_BLOCKS_CTA;
  const int n_valid = C::N_BLOCKS - nb0 < T::N_BLOCKS_CTA ? C::N_BLOCKS - nb0 : T::N_BLOCKS_CTA;
  const int split = blockIdx.z;
  const int kt_begin = (int)(((long long)split * T::K_STAGES) / p.split_k);
  const int kt_end = (int)(((long long)(split + 1) * T::K_STAGES) / p.split_k);
  const int n_kt = kt_end - kt_begin;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, 4 * CONSUMERS);   // lane 0 of every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  float acc[4][NT / 2];
#pragma unroll
  for (int t = 0; t < 4; ++t)
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) acc[t][i] = 0.0f;

  if (warp >= 4 * CONSUMERS) {
    // ---- producer warpgroup: gives its registers to the consumers; the lane 0 of its first
    // warp issues every copy of every stage, then the warpgroup leaves ----------------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (warp == 4 * CONSUMERS && lane == 0) {
      const uint32_t w_bytes = n_valid * 512, row_bytes = n_valid * 128;
      const uint32_t stage_tx = T::X_BYTES + 4 * w_bytes +
                                T::SROWS * row_bytes * ((T::S_BYTES ? 1 : 0) + (T::Z_BYTES ? 1 : 0));
      for (int it = 0; it < n_kt; ++it) {
        const int s = it % STAGES, kt = kt_begin + it;
        if (it >= STAGES) mbar_wait(empty + s, ((it / STAGES) - 1) & 1);
        unsigned char* base = smem + s * T::STAGE_BYTES;
        mbar_expect_tx(full + s, stage_tx);
        tma_load_2d(base, &x_map, kt * T::STAGE_K, m0, full + s);  // rows past M: zeros
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
          bulk_load(base + T::X_BYTES + ks * T::W_KS_BYTES,
                    p.w + ((long long)(kt * 4 + ks) * C::N_BLOCKS + nb0) * 32, w_bytes, full + s);
#pragma unroll
        for (int r = 0; r < T::SROWS; ++r) {
          const long long row = (long long)kt * T::STAGE_K / C::GROUP + r;
          if (T::S_BYTES)
            bulk_load(base + T::X_BYTES + T::W_BYTES + r * T::ROW_BYTES,
                      p.scales + row * C::N_PAD + nb0 * 64, row_bytes, full + s);
          if (T::Z_BYTES)
            bulk_load(base + T::X_BYTES + T::W_BYTES + T::S_BYTES + r * T::ROW_BYTES,
                      p.zeros + row * C::N_PAD + nb0 * 64, row_bytes, full + s);
        }
      }
    }
    return;  // the consumers finish the tile (named barrier 1 counts them only)
  } else {
    // ---- consumers: warp w of warpgroup c takes n64 block w and tokens [c NT, c NT + NT) ----
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int c = warp >> 2, w = warp & 3, g = lane >> 2;
    typename U::ZeroOffsets zo[4];
    S2 s2[4][2];
    auto load_group = [&](const unsigned char* base, int r) {
      // 8 values per lane: slot 2t + h of column 64 w + 16 t + 8 h + g (layout.py)
      S sv[8], zv[8];
      if constexpr (T::S_BYTES) {
        *reinterpret_cast<uint4*>(sv) = *reinterpret_cast<const uint4*>(
            base + T::X_BYTES + T::W_BYTES + r * T::ROW_BYTES + w * 128 + g * 16);
      }
      if constexpr (T::Z_BYTES) {
        *reinterpret_cast<uint4*>(zv) = *reinterpret_cast<const uint4*>(
            base + T::X_BYTES + T::W_BYTES + T::S_BYTES + r * T::ROW_BYTES + w * 128 + g * 16);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) zv[i] = from_float<S>(C::ZERO_CONST);  // the constant zero
      }
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        zo[t] = U::zero_offsets(zv + 2 * t);   // constants without a zero-point table
#pragma unroll
        for (int h = 0; h < 2; ++h) s2[t][h] = dup(T::S_BYTES ? sv[2 * t + h] : from_float<S>(1.0f));
      }
    };
    for (int it = 0; it < n_kt; ++it) {
      const int s = it % STAGES;
      mbar_wait(full + s, (it / STAGES) & 1);
      const unsigned char* base = smem + s * T::STAGE_BYTES;
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        if ((ks * 16) % (T::SROWS > 1 ? C::GROUP : T::STAGE_K) == 0)
          load_group(base, T::SROWS > 1 ? ks * 16 / C::GROUP : 0);
        const uint4 q = *reinterpret_cast<const uint4*>(
            base + T::X_BYTES + ks * T::W_KS_BYTES + w * 512 + lane * 16);
        const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
        uint32_t a[4][4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          uint32_t b[4];
          U::template unpack_tile<APPLY_SCALE>(qw + t, b, zo[t], s2[t]);
          // B fragments (b0b1, b2b3) of n8 halves 0, 1 -> A fragments a0a1 a2a3 a4a5 a6a7
          a[t][0] = b[0]; a[t][1] = b[2]; a[t][2] = b[1]; a[t][3] = b[3];
        }
        const uint64_t desc = smem_desc_sw128(base + c * NT * 128 + ks * 32);
        wgmma_fence();
#pragma unroll
        for (int t = 0; t < 4; ++t) wgmma_m64n64k16<S>(acc[t], a[t], desc);
        wgmma_commit();
        wgmma_wait<1>();
        // The previous stage's last wgmmas are done: its slot may be refilled.
        if (ks == 0 && it > 0 && lane == 0) mbar_arrive(empty + (it - 1) % STAGES);
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) pin(acc[t][i]);
  }
  // Every stage has been consumed (the producer's copies all landed): the pipeline's shared
  // memory becomes the CTA's fp32 tile [token][n].
  cta_sync<T::CONSUMER_THREADS>();
  float* red = reinterpret_cast<float*>(smem);
  {
    const int c = warp >> 2, w = warp & 3, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) {
        // wgmma D fragment: row 16 w + g + 8 h (an n of W^T), column 8 (i / 4) + 2 q + i % 2
        const int n = 64 * w + 16 * t + 8 * ((i >> 1) & 1) + g;
        const int m = c * NT + 8 * (i >> 2) + 2 * q + (i & 1);
        red[m * T::RED_STRIDE + n] = acc[t][i];
      }
  }
  cta_sync<T::CONSUMER_THREADS>();
  auto tile_sum = [&](int i) { return red[(i / T::N_TILE) * T::RED_STRIDE + i % T::N_TILE]; };
  finish_tile<C, T::M_TILE, T::N_TILE, T::CONSUMER_THREADS, decltype(tile_sum),
              T::CONSUMER_THREADS>(p, m0, nb0 * 64, split, flag, tile_sum);
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

template <class C, int NT, int CONSUMERS, int STAGES>
cudaError_t launch_wgmma(Params<typename C::scalar_t> p, cudaStream_t stream) {
  using T = WgmmaTile<C, NT, CONSUMERS, STAGES>;
  auto kernel = qmatmul_wgmma_kernel<C, NT, CONSUMERS, STAGES>;
  static bool smem_set = false;  // over 48 KB of shared memory must be asked for once
  if (!smem_set) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           T::SMEM_BYTES);
    if (err != cudaSuccess) return err;
    smem_set = true;
  }
  CUtensorMap map;
  cudaError_t err = make_x_map<C, T::M_TILE>(p, &map);
  if (err != cudaSuccess) return err;
  dim3 grid((p.M + T::M_TILE - 1) / T::M_TILE, (C::N_BLOCKS + T::N_BLOCKS_CTA - 1) / T::N_BLOCKS_CTA,
            p.split_k);
  kernel<<<grid, T::THREADS, T::SMEM_BYTES, stream>>>(map, p);
  return cudaGetLastError();
}

}  // namespace qc

#endif  // QCOMPILER_WGMMA_CUH
