// qcompiler CUDA kernels: the host side of a call. The variants (one configuration of the tile
// pass per M bucket), the device workspace, the act-order / padding copy of x, and the
// parameters of a launch. The generated .cu holds the variant table and picks the kernel
// instance. Static code, included by the generated .cu.
#ifndef QCOMPILER_DISPATCH_CUH
#define QCOMPILER_DISPATCH_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdlib.h>  // getenv

#include "norm.cuh"
#include "params.cuh"
#include "scalar.cuh"

namespace qc {

// One entry of the tile pass's variants (a row of the generated VARIANTS table).
struct Variant {
  int m_max, gemv, m_frags, warps_n, warps_k, stages, stage_k, acc_scale, split_k;
  int wgmma;  // 1, 2: the sm_90a wgmma kernel (wgmma.cuh)
  int int8;   // 1: the tiled kernel with int8 activations (tiled_i8.cuh)
  int fp8;    // 1: the same kernel with FP8 e4m3 activations (FP8 e4m3 weights, sm_89+)
};

// Workspace: [split-K tile counters | split-K partials | prepared x], each 256-byte aligned;
// the prepared x of an int8 variant is its codes and scales (quantize_x_i8_kernel).
// The counters have a fixed place and size whatever M and the variant: the caller zeroes the
// workspace once, every launch leaves its counters at zero, and no call's partials or x can
// land on a later call's counters. A grid with more tiles than counters (a large M, which
// needs no split of K to fill the GPU) runs without split-K.
inline constexpr int MAX_COUNTERS = 16384;
inline constexpr size_t COUNTERS_BYTES = MAX_COUNTERS * sizeof(int);
inline size_t align256(size_t v) { return (v + 255) / 256 * 256; }

inline int m_tile(const Variant& v) { return (v.gemv ? 8 : 16) * v.m_frags; }  // rows per CTA

// The K splits a call with M rows runs: the variant's, or 1 past the counters' capacity.
template <class C>
int splits(const Variant& v, int M) {
  const long long tiles = (long long)((M + m_tile(v) - 1) / m_tile(v)) *
                          ((C::N_BLOCKS + v.warps_n - 1) / v.warps_n);
  return tiles <= MAX_COUNTERS ? v.split_k : 1;
}

// The activations' groups of the int8 path: the weights' K groups, or the whole padded row
// where the weight scales are per channel (one scale a row: per token).
template <class C>
__host__ __device__ constexpr int x_group() { return C::SCALE_IN_EPILOGUE ? C::K_PAD : C::GROUP; }

__host__ __device__ inline int rows4(int M) { return (M + 3) / 4 * 4; }

// x_norm (C::X_NORM): whether the GEMV kernel applies the norm itself (RMSNorm: x * g in the
// loop, each row's 1 / rms on the sums at the end; LayerNorm: its rows normalized into shared
// memory, at most GEMV_NORM_SMEM bytes of them: an M tile of up to 16 rows of K_PAD
// elements), or x is normalized into the workspace first (every other kernel, an act-order
// or padded x, LayerNorm rows too long for shared memory).
template <class C>
bool norm_in_kernel(const Variant& v, int M) {
  const int rows = M < m_tile(v) ? M : m_tile(v);
  return C::X_NORM != X_NORM_NONE && v.gemv && !C::PREP_X &&
         (C::X_NORM == X_NORM_RMS ||
          (size_t)rows * C::K_PAD * sizeof(typename C::scalar_t) <= (size_t)GEMV_NORM_SMEM);
}
// Elements of the normalized copy of x: [M, K] for the 8-bit-activation quantizer (which
// permutes and pads itself), [M, K_PAD] (permuted, padded) for the others.
template <class C>
size_t normalized_x_elements(const Variant& v, int M) {
  if (C::X_NORM == X_NORM_NONE || norm_in_kernel<C>(v, M)) return 0;
  return (size_t)M * (v.int8 || v.fp8 ? C::K : C::K_PAD);
}

template <class C>
size_t workspace_bytes(const Variant& v, int M) {
  size_t bytes = COUNTERS_BYTES;
  if (splits<C>(v, M) > 1) bytes += align256(sizeof(float) * (size_t)splits<C>(v, M) * M * C::N);
  if (v.int8 || v.fp8)  // codes, scales and (int8) code sums
    bytes += align256((size_t)M * C::K_PAD) +
             2 * align256(sizeof(float) * (size_t)(C::K_PAD / x_group<C>()) * rows4(M)) +
             align256(sizeof(typename C::scalar_t) * normalized_x_elements<C>(v, M));
  else if (C::PREP_X || normalized_x_elements<C>(v, M))
    bytes += align256(sizeof(typename C::scalar_t) * (size_t)M * C::K_PAD);
  return bytes;
}

// x'[m, k] = x[m, perm[k]] for k < K, 0 up to K_PAD: the act-order permutation of K (and the
// padding of K to the 16-byte copies), done once per call instead of a gather in the loop.
template <class C>
__global__ void prepare_x_kernel(const typename C::scalar_t* x, typename C::scalar_t* xp,
                                 const int* perm, int M) {
  const long long total = (long long)M * C::K_PAD;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int m = (int)(i / C::K_PAD), k = (int)(i % C::K_PAD);
    xp[i] = k < C::K ? x[(long long)m * C::K + (perm ? perm[k] : k)]
                     : from_float<typename C::scalar_t>(0.0f);
  }
}

// Row k of the weights behind byte j (0-3) of a lane's B register for one k16 step, after
// 2 q (q = lane % 4): the packed layout (codegen/cuda/layout.py) holds a lane's four rows
// of a k16 step as nibbles (k, k+8, k+1, k+9) in 4-bit containers and bytes (k, k+1, k+8,
// k+9) in 8-bit ones; tiled_i8.cuh hands them to mma.m16n8k32 as rows 4q + j of the k32
// step, so x's columns are put in the same order.
template <int CB>
__host__ __device__ constexpr int b_row_offset(int j) {
  return CB == 4 ? (j & 1) * 8 + (j >> 1) : (j >> 1) * 8 + (j & 1);
}

// The FP8 e4m3 (e4m3fn) byte nearest to v (ties to even), saturated to +-448 (NaN: 0x7f).
__host__ __device__ inline uint8_t float_to_e4m3(float v) {
  const uint8_t sign = v < 0.0f || (v == 0.0f && 1.0f / v < 0.0f) ? 0x80 : 0;
  const float a = fabsf(v);
  if (!(a == a)) return 0x7f;
  if (a >= 448.0f) return sign | 0x7e;
  if (a < 0.015625f)  // below 2^-6: subnormal steps of 2^-9 (8 steps is the first normal)
    return sign | (uint8_t)(int)rintf(a * 512.0f);  // rintf: to nearest even (host and device)
  int e;
  const float m = frexpf(a, &e) * 16.0f;  // a = (m / 16) 2^e, m in [8, 16): 3 fraction bits
  int q = (int)rintf(m);                   // 8..16 (16: carried into the exponent)
  if (q == 16) { q = 8; ++e; }
  const int code = ((e - 1 + 7) << 3) | (q - 8);
  return sign | (uint8_t)(code > 0x7e ? 0x7e : code);
}

// 8-bit activations, per row m and group g of x_group<C>() columns (in the kernel's K order,
// after the act-order permutation). int8 (MatMulNBits accuracy_level 4, the CPU int8 path's
// numerics): scale = max|x| / 127 and xq = rint(x * (127 / max|x|)), the IEEE steps of
// qcompiler.runtime.numerics.quantize_int8_groups. FP8 (FP8 e4m3 weights): xq = e4m3(x *
// (448 / max|x|)) and scale = max|x| / 448 / 2^8 (the 2^8 the FP8 weights' scales carry for
// their f16 unpack, reorder-weights). An all-zero group: scale 1, codes 0. xq [M, K_PAD]:
// column 16 c + 4 q + j holds x's column 16 c + 2 q + b_row_offset(j) (zero past K).
// xs [groups, rows4(M)] (rows past M: 0); int8: xsum [groups, rows4(M)], the sum of the
// group's codes (the kernel subtracts zero point x xsum from its sums of codes x raw weights).
// Where x's rows are whole 16-element chunks at 16-byte addresses and K is not permuted
// (`vec`), a lane takes a chunk at a time: two 16-byte loads, the chunk's permutation in
// registers, one 16-byte store of its codes, and a group has `lanes` lanes, the power of two
// at most min(32, G / 16) (a warp takes 32 / lanes groups of a row: all of its lanes busy on
// groups of 128); otherwise a warp takes one group an element at a time (lanes = 32). Both
// give the same codes (the same IEEE steps per element).
inline int quantize_lanes(int group, bool vec) {
  if (!vec) return 32;
  int lanes = 1;  // a power of two (the shuffles' runs), at most a lane a chunk
  while (lanes < 32 && 2 * lanes <= group / 16) lanes *= 2;
  return lanes;
}

template <class C, bool FP8>
__global__ void quantize_x_i8_kernel(const typename C::scalar_t* x, int8_t* xq, float* xs,
                                     int* xsum, const int* perm, int M, bool vec, int lanes) {
  using S = typename C::scalar_t;
  constexpr int G = x_group<C>(), GROUPS = C::K_PAD / G;
  const int per_warp = 32 / lanes, warps_a_row = (GROUPS + per_warp - 1) / per_warp;
  const int m4 = rows4(M), lane = threadIdx.x & 31, sub = lane % lanes;
  const int warp = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5);
  if (warp >= m4 * warps_a_row) return;  // whole warps: the shuffles below see all 32 lanes
  const int m = warp / warps_a_row, g = warp % warps_a_row * per_warp + lane / lanes;
  const bool mine = g < GROUPS;          // the last warp of a row may have lanes to spare
  const bool leader = mine && sub == 0;  // writes the group's scale and code sum
  if (m >= M) {
    if (leader) {
      xs[g * m4 + m] = 0.0f;
      if (!FP8) xsum[g * m4 + m] = 0;
    }
    return;
  }
  constexpr float QMAX = FP8 ? 448.0f : 127.0f;
  auto quantize = [](float v, float inv) -> int8_t {
    const float s = __fmul_rn(v, inv);
    return FP8 ? (int8_t)float_to_e4m3(s) : (int8_t)__float2int_rn(s);
  };
  // over the group's lanes (aligned runs of `lanes`: xor offsets below `lanes` stay in them)
  auto group_max = [&](float v) {
    for (int o = lanes / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
  };
  auto publish = [&](float amax) {  // the group's scale; returns 127 / amax (or 448 / amax)
    if (leader)
      xs[g * m4 + m] = amax == 0.0f ? 1.0f
                       : FP8        ? __fmul_rn(__fmul_rn(amax, 1.0f / QMAX), 1.0f / 256.0f)
                                    : __fmul_rn(amax, 1.0f / QMAX);
    return amax > 0.0f ? __fdiv_rn(QMAX, amax) : 0.0f;
  };
  int sum = 0;
  if (vec) {
    // chunk c of the group: x columns k0 .. k0 + 15 (k0 = g G + 16 c), all < K or all >= K
    const S* row = x + (long long)m * C::K;
    auto load = [&](int k0, float* v) {
      __align__(16) S h[16];
      *reinterpret_cast<uint4*>(h) = *reinterpret_cast<const uint4*>(row + k0);
      *reinterpret_cast<uint4*>(h + 8) = *reinterpret_cast<const uint4*>(row + k0 + 8);
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = to_float(h[i]);
    };
    const int chunks = mine ? G / 16 : 0;
    float amax = 0.0f;
    for (int c = sub; c < chunks; c += lanes) {
      const int k0 = g * G + 16 * c;
      if (k0 >= C::K) break;
      float v[16];
      load(k0, v);
#pragma unroll
      for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
    }
    const float inv = publish(group_max(amax));
    for (int c = sub; c < chunks; c += lanes) {
      const int k0 = g * G + 16 * c;
      __align__(16) int8_t q[16];
      if (k0 < C::K) {
        float v[16];
        load(k0, v);
        // code 4 p + j of the chunk is x column 2 p + b_row_offset(j) of it
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          q[i] = quantize(v[2 * (i >> 2) + b_row_offset<C::CB>(i & 3)], inv);
          sum += q[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) q[i] = 0;
      }
      *reinterpret_cast<uint4*>(xq + (long long)m * C::K_PAD + k0) = *reinterpret_cast<uint4*>(q);
    }
  } else {  // lanes == 32: the warp's one group
    auto value = [&](int kq) -> float {
      const int k = (kq & ~15) + 2 * ((kq & 15) >> 2) + b_row_offset<C::CB>(kq & 3);
      return k < C::K ? to_float(x[(long long)m * C::K + (perm ? perm[k] : k)]) : 0.0f;
    };
    float amax = 0.0f;
    for (int i = lane; i < G; i += 32) amax = fmaxf(amax, fabsf(value(g * G + i)));
    const float inv = publish(group_max(amax));
    for (int i = lane; i < G; i += 32) {
      const int8_t q = quantize(value(g * G + i), inv);
      xq[(long long)m * C::K_PAD + g * G + i] = q;
      sum += q;
    }
  }
  if (!FP8) {
    for (int o = lanes / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (leader) xsum[g * m4 + m] = sum;
  }
}

// Whether the GEMV kernel prefetches its weights into L2 before its wait: QC_CUDA_L2_PREFETCH=1
// (off by default until measured), for weights of at most 24 MB (half an H100's L2: more
// would evict what the next kernels read).
[[maybe_unused]] static bool l2_prefetch_requested() {
  static const bool on = [] {
    const char* env = getenv("QC_CUDA_L2_PREFETCH");
    return env != nullptr && env[0] == '1';
  }();
  return on;
}
template <class C>
bool l2_prefetch_weights() {
  constexpr long long bytes = (long long)C::N_BLOCKS * (C::K_PAD / 16) * (C::CB / 4) * 512;
  return bytes <= (24LL << 20) && l2_prefetch_requested();
}

// The launch parameters of variant v for a call with M rows, the workspace laid out as above;
// with PREP_X the prepared copy of x is made first (on `stream`).
template <class C>
cudaError_t make_params(const Variant& v, const void* x, void* y, const void* w,
                        const void* scales, const void* zeros, const float* bias,
                        const int* perm, const void* norm_w, const void* norm_b, int M,
                        void* workspace, cudaStream_t stream, const void* const* extras,
                        Params<typename C::scalar_t>& p) {
  using S = typename C::scalar_t;
  p.x = static_cast<const S*>(x);
  p.y = static_cast<S*>(y);
  p.w = static_cast<const uint4*>(w);
  p.scales = static_cast<const S*>(scales);
  p.zeros = static_cast<const S*>(zeros);
  p.bias = bias;
  p.epilogue = extras != nullptr;
  for (int i = 0; i < kMaxEpilogueExtras; ++i) p.extras[i] = nullptr;
  if (extras)  // the generated source reads only Config::Epilogue's extras (at most the max)
    for (int i = 0; i < C::Epilogue::EXTRAS; ++i) p.extras[i] = extras[i];
  p.M = M;
  p.x_stride = C::K;
  p.split_k = splits<C>(v, M);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  p.counters = reinterpret_cast<int*>(ws);
  ws += COUNTERS_BYTES;
  p.partial = reinterpret_cast<float*>(ws);
  if (p.split_k > 1) ws += align256(sizeof(float) * (size_t)p.split_k * M * C::N);
  p.xq = nullptr;
  p.xs = nullptr;
  p.xsum = nullptr;
  p.xs_stride = rows4(M);
  p.norm_w = static_cast<const S*>(norm_w);
  p.norm_b = static_cast<const S*>(norm_b);
  p.norm_in_kernel = norm_in_kernel<C>(v, M);
  p.l2_prefetch = l2_prefetch_weights<C>();
  // x_norm elsewhere: x normalized into the workspace (normalize_x_kernel), one warp a row
  auto normalize_into = [&](S* xp, const int* order, int stride) -> cudaError_t {
    const int blocks = (int)((32LL * M + 255) / 256);
    QC_LAUNCH(normalize_x_kernel<C>, blocks, 256, 0, stream, p.x, xp, p.norm_w, p.norm_b,
              order, M, stride);
    return cudaGetLastError();
  };
  if (v.int8 || v.fp8) {  // x's codes and scales (the act-order permutation and padding included)
    const size_t table = align256(sizeof(float) * (size_t)(C::K_PAD / x_group<C>()) * rows4(M));
    int8_t* xq = reinterpret_cast<int8_t*>(ws);
    float* xs = reinterpret_cast<float*>(ws + align256((size_t)M * C::K_PAD));
    int* xsum = reinterpret_cast<int*>(ws + align256((size_t)M * C::K_PAD) + table);
    if (normalized_x_elements<C>(v, M)) {  // [M, K] after the tables; the quantizer permutes
      S* xn = reinterpret_cast<S*>(ws + align256((size_t)M * C::K_PAD) + 2 * table);
      cudaError_t err = normalize_into(xn, nullptr, C::K);
      if (err != cudaSuccess) return err;
      p.x = xn;
    }
    auto quantize = v.fp8 ? quantize_x_i8_kernel<C, true> : quantize_x_i8_kernel<C, false>;
    // whole 16-element chunks at 16-byte addresses, K in order: a chunk a lane at a time
    const bool vec = perm == nullptr && C::K % 16 == 0 &&
                     (reinterpret_cast<uintptr_t>(p.x) & 15) == 0;
    const int lanes = quantize_lanes(x_group<C>(), vec), per_warp = 32 / lanes;
    const int groups = C::K_PAD / x_group<C>();
    const long long threads = 32LL * rows4(M) * ((groups + per_warp - 1) / per_warp);
    const int blocks = (int)((threads + 255) / 256);
    QC_LAUNCH(quantize, blocks, 256, 0, stream, p.x, xq, xs, xsum, perm, M, vec, lanes);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    p.xq = xq;
    p.xs = xs;
    p.xsum = xsum;
    return cudaSuccess;
  }
  if (normalized_x_elements<C>(v, M)) {  // normalized, permuted and padded in one copy
    S* xp = reinterpret_cast<S*>(ws);
    cudaError_t err = normalize_into(xp, perm, C::K_PAD);
    if (err != cudaSuccess) return err;
    p.x = xp;
    p.x_stride = C::K_PAD;
  } else if (C::PREP_X) {
    S* xp = reinterpret_cast<S*>(ws);
    const long long total = (long long)M * C::K_PAD;
    const int blocks = (int)((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
    QC_LAUNCH(prepare_x_kernel<C>, blocks, 256, 0, stream, p.x, xp, perm, M);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    p.x = xp;
    p.x_stride = C::K_PAD;
  }
  return cudaSuccess;
}

// The variant for M rows: the first whose m_max holds M, else the last.
inline const Variant& pick(const Variant* variants, int n_variants, int M) {
  for (int i = 0; i < n_variants - 1; ++i)
    if (M <= variants[i].m_max) return variants[i];
  return variants[n_variants - 1];
}

}  // namespace qc

#endif  // QCOMPILER_DISPATCH_CUH
