// A host emulation of the CUDA that the op kernels of codegen/cuda/templates/ops use, so that
// their index arithmetic, tiling, shared-memory staging and epilogues run in CI without a GPU
// (tests/cuda_emulation.py builds a kernel's source after this header with g++ and calls
// it through its C ABI on host buffers).
//
// It stands in for the CUDA language and runtime under the real ops/common.cuh (whose launch
// calls qc_emu::launch here; the shim headers cuda_runtime.h, cuda_fp16.h and cuda_bf16.h
// beside this file are empty): a launch runs the grid's blocks one after another; a block's
// threads are fibers (ucontext) run round-robin by a scheduler, which releases
// __syncthreads() when every live thread of the block has reached it, and runs a warp's
// shuffles, __syncwarp and mma.sync.m16n8k32 (integer) once all 32 lanes have posted theirs. The
// fragment layouts are the PTX ISA's for m16n8k32 with 8-bit operands (lane = 4 * group +
// thread in group; A 16 x 32 row-major, B 32 x 8 column-major, C/D 16 x 8):
//   a0: A[g][4t..4t+3]  a1: A[g+8][4t..]  a2: A[g][16+4t..]  a3: A[g+8][16+4t..]
//   b0: B[4t..4t+3][g]  b1: B[16+4t..][g]
//   d0, d1: D[g][2t], D[g][2t+1]   d2, d3: D[g+8][2t], D[g+8][2t+1]
// cp.async copies at once (nothing is in flight, so a missing wait cannot show here: only
// the GPU tests see such races). Float intrinsics are single IEEE operations (build with
// -ffp-contract=off). mma.m16n8k16 (f16/bf16) and m16n8k32 (e4m3) sum in double. A launch's
// dynamic shared memory ends where an inaccessible page starts (shared_region_end), and each
// block finds it filled with ones.
#ifndef QC_CUDA_HOST_EMULATOR_H
#define QC_CUDA_HOST_EMULATOR_H

#define QC_HOST_EMULATION 1

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one per kernel, shared by the fibers (the blocks run one at a time)
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename F> inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
constexpr int cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9;
// The device: an H100/H200's 132 SMs (kernels that size their grids by it split work alike).
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 132;
  return cudaSuccess;
}
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice };
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}
struct cudaFuncAttributes { int ptxVersion = 0; };  // 0: common.cuh launches without PDL
template <typename F> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  *a = cudaFuncAttributes{};
  return cudaSuccess;
}
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  struct { int programmaticStreamSerializationAllowed; } val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(8) uint2 { unsigned x, y; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// Half precision as bits, converted with round-to-nearest-even (as __float2half_rn).
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f,
                 man = h.bits & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp((float)man, -24);  // zero or subnormal
    return sign ? -f : f;
  }
  uint32_t u = exp == 31 ? (sign | 0x7f800000u | (man << 13))
                         : (sign | ((exp + 112) << 23) | (man << 13));
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)(sign | 0x7e00u)};  // NaN
  const float a = std::fabs(f);
  if (a >= 65520.0f) return {(uint16_t)(sign | 0x7c00u)};  // rounds to infinity
  if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24, ties to even
    return {(uint16_t)(sign | (uint16_t)std::nearbyint(a * 16777216.0f))};
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const float scaled = std::nearbyint(std::ldexp(m, 11));  // 11 significant bits
  uint32_t mant = (uint32_t)scaled;
  if (mant == 2048) { mant = 1024; ++e; }
  const uint32_t exp = (uint32_t)(e - 1 + 15);
  if (exp >= 31) return {(uint16_t)(sign | 0x7c00u)};
  return {(uint16_t)(sign | (exp << 10) | (mant - 1024))};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = (uint32_t)h.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(uint16_t)(u >> 16)};
}
inline __half __double2half(double d) { return __float2half_rn((float)d); }  // (double rounding)
typedef __half half;

// Pairs: each lane computed in double and rounded once (exact for + - * of two f16/bf16).
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half2 half2;
inline double as_double(__half h) { return __half2float(h); }
inline double as_double(__nv_bfloat16 h) { return __bfloat162float(h); }
inline __half round_to(double v, __half) { return __float2half_rn((float)v); }
inline __nv_bfloat16 round_to(double v, __nv_bfloat16) { return __float2bfloat16_rn((float)v); }
template <typename P> inline P pair_op(P a, P b, double (*op)(double, double)) {
  return {round_to(op(as_double(a.x), as_double(b.x)), a.x),
          round_to(op(as_double(a.y), as_double(b.y)), a.y)};
}
template <typename P> inline P __hadd2(P a, P b) {
  return pair_op(a, b, [](double u, double v) { return u + v; });
}
template <typename P> inline P __hsub2(P a, P b) {
  return pair_op(a, b, [](double u, double v) { return u - v; });
}
template <typename P> inline P __hmul2(P a, P b) {
  return pair_op(a, b, [](double u, double v) { return u * v; });
}
template <typename P> inline P __hneg2(P a) {
  return {round_to(-as_double(a.x), a.x), round_to(-as_double(a.y), a.y)};
}
template <typename P> inline P __hfma2(P a, P b, P c) {
  return {round_to(as_double(a.x) * as_double(b.x) + as_double(c.x), a.x),
          round_to(as_double(a.y) * as_double(b.y) + as_double(c.y), a.y)};
}
inline __half2 __half2half2(__half h) { return {h, h}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 h) { return {h, h}; }
inline __half2 __floats2half2_rn(float a, float b) {
  return {__float2half_rn(a), __float2half_rn(b)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
template <typename T> inline T __ldg(const T* p) { return *p; }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16_rn((float)d); }
inline float __expf(float x) { return std::exp(x); }

// The executing thread's coordinates (the scheduler sets them before resuming a fiber).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int atomicAdd(int* p, int v) {  // the blocks run one at a time
  const int old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
inline int min(int a, int b) { return a < b ? a : b; }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int2float_rn(int v) { return (float)v; }
inline int __float2int_rn(float v) { return (int)std::nearbyint(v); }  // ties to even

namespace qc_emu {

// A kernel's dynamic shared memory: the last bytes (what the launch asked for, rounded up to
// 128) of one region that an inaccessible page follows, so that an access past the size the
// kernel was launched with faults (the test fails) instead of reading other memory. The blocks
// run one at a time, so one region serves them all.
inline constexpr size_t kSharedCapacity = 232448;  // sm_90's opt-in maximum, 227 KiB
inline uint8_t* shared_region_end() {
  static uint8_t* end = [] {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t bytes = (kSharedCapacity + page - 1) / page * page;
    void* base = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) std::abort();
    uint8_t* guard = static_cast<uint8_t*>(base) + bytes;
    if (mprotect(guard, page, PROT_NONE) != 0) std::abort();
    return guard;
  }();
  return end;
}
inline uint8_t* shared = shared_region_end() - kSharedCapacity;  // set by each launch

enum State { RUNNING, AT_BARRIER, AT_NAMED_BARRIER, AT_MMA, AT_MMA_F16, AT_MMA_E4M3, AT_LDMATRIX,
             AT_SHUFFLE, AT_SYNCWARP, DONE };

struct Fiber {
  ucontext_t ctx;
  State state = RUNNING;
  char* stack = nullptr;  // from stack_pool(): kept across blocks, never zeroed
  dim3 tid;
  // posted fragments at an MMA
  int* d = nullptr;
  const unsigned* a = nullptr;
  const unsigned* b = nullptr;
  bool a_unsigned = false, b_unsigned = false;
  // posted at an ldmatrix: the row address this lane gives and where its 4 words go
  const uint8_t* row = nullptr;
  unsigned* out = nullptr;
  int ld_count = 4;       // matrices (1, 2 or 4)
  bool ld_trans = false;  // .trans: 16-bit elements transposed
  // posted at an f16/bf16 MMA (f32 accumulators)
  float* fd = nullptr;
  bool bf16 = false;
  // posted at a shuffle: 8 bytes of value, the source lane it reads, and the result
  uint64_t value = 0, result = 0;
  int src_lane = 0;
};

inline ucontext_t g_scheduler;
inline int g_named_count = 0;  // the thread count of the named barrier being waited at
inline std::vector<Fiber>* g_fibers = nullptr;
inline int g_current = -1;
inline const std::function<void()>* g_body = nullptr;

inline void yield(State s) {
  Fiber& f = (*g_fibers)[g_current];
  f.state = s;
  swapcontext(&f.ctx, &g_scheduler);
}

inline void fiber_entry() {
  (*g_body)();
  (*g_fibers)[g_current].state = DONE;
  swapcontext(&(*g_fibers)[g_current].ctx, &g_scheduler);
}

inline void warp_release(int w) {
  for (int lane = 0; lane < 32; ++lane) (*g_fibers)[w * 32 + lane].state = RUNNING;
}

// An MMA's C/D fragment of one lane in the 16 x 8 tile: d0, d1 at row g, columns 2t, 2t + 1;
// d2, d3 at row g + 8 (g = lane / 4, t = lane % 4).
template <typename T> inline void fragment_to_tile(T (&D)[16][8], const T* d, int lane) {
  const int g = lane / 4, t = lane % 4;
  D[g][2 * t] = d[0];
  D[g][2 * t + 1] = d[1];
  D[g + 8][2 * t] = d[2];
  D[g + 8][2 * t + 1] = d[3];
}
template <typename T> inline void tile_to_fragment(const T (&D)[16][8], T* d, int lane) {
  const int g = lane / 4, t = lane % 4;
  d[0] = D[g][2 * t];
  d[1] = D[g][2 * t + 1];
  d[2] = D[g + 8][2 * t];
  d[3] = D[g + 8][2 * t + 1];
}

inline int lane_byte(unsigned word, int j, bool is_unsigned) {
  const unsigned v = (word >> (8 * j)) & 0xffu;
  return is_unsigned ? (int)v : (int)(int8_t)v;
}

// D = A * B + C for the 32 lanes of warp `w`, from their posted fragments.
inline void warp_mma(int w) {
  int A[16][32], B[32][8], D[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const Fiber& f = (*g_fibers)[w * 32 + lane];
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; ++j) {
      A[g][4 * t + j] = lane_byte(f.a[0], j, f.a_unsigned);
      A[g + 8][4 * t + j] = lane_byte(f.a[1], j, f.a_unsigned);
      A[g][16 + 4 * t + j] = lane_byte(f.a[2], j, f.a_unsigned);
      A[g + 8][16 + 4 * t + j] = lane_byte(f.a[3], j, f.a_unsigned);
      B[4 * t + j][g] = lane_byte(f.b[0], j, f.b_unsigned);
      B[16 + 4 * t + j][g] = lane_byte(f.b[1], j, f.b_unsigned);
    }
    fragment_to_tile(D, f.d, lane);
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      int64_t s = D[r][c];
      for (int k = 0; k < 32; ++k) s += (int64_t)A[r][k] * B[k][c];
      D[r][c] = (int)(int32_t)s;  // the s32 accumulator wraps as the hardware's does
    }
  for (int lane = 0; lane < 32; ++lane) tile_to_fragment(D, (*g_fibers)[w * 32 + lane].d, lane);
  warp_release(w);
}

// ldmatrix.x{1,2,4} (b16) for warp `w`: matrix j's row r at lane 8j + r's address; lane l
// receives in register j the 4 bytes at column 4 (l % 4) of row l / 4 of matrix j, or with
// .trans the 16-bit elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
inline void warp_ldmatrix(int w) {
  const Fiber& lead = (*g_fibers)[w * 32];
  const int count = lead.ld_count;
  const bool trans = lead.ld_trans;
  unsigned words[32][4];
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < count; ++j) {
      const int t = lane % 4, r = lane / 4;
      if (!trans) {
        std::memcpy(&words[lane][j], (*g_fibers)[w * 32 + j * 8 + r].row + 4 * t, 4);
      } else {
        uint16_t lo, hi;
        std::memcpy(&lo, (*g_fibers)[w * 32 + j * 8 + 2 * t].row + 2 * r, 2);
        std::memcpy(&hi, (*g_fibers)[w * 32 + j * 8 + 2 * t + 1].row + 2 * r, 2);
        words[lane][j] = (unsigned)lo | ((unsigned)hi << 16);
      }
    }
  for (int lane = 0; lane < 32; ++lane) {
    Fiber& f = (*g_fibers)[w * 32 + lane];
    for (int j = 0; j < count; ++j) f.out[j] = words[lane][j];
    f.state = RUNNING;
  }
}

inline float half_bits_to_float(uint16_t b, bool bf16) {
  return bf16 ? __bfloat162float(__nv_bfloat16{b}) : __half2float(__half{b});
}

// The end of a float MMA for warp `w` whose lanes' A and B fragments are gathered into tiles:
// D = A * B + C over the lanes' f32 accumulators, the products summed in double and rounded
// once (the hardware's order and internal precision differ: compare with a tolerance).
template <int K>
inline void float_mma_finish(int w, const float (&A)[16][K], const float (&B)[K][8]) {
  float D[16][8];
  for (int lane = 0; lane < 32; ++lane) fragment_to_tile(D, (*g_fibers)[w * 32 + lane].fd, lane);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      double s = D[r][c];
      for (int k = 0; k < K; ++k) s += (double)A[r][k] * B[k][c];
      D[r][c] = (float)s;
    }
  for (int lane = 0; lane < 32; ++lane) tile_to_fragment(D, (*g_fibers)[w * 32 + lane].fd, lane);
  warp_release(w);
}

// mma.m16n8k16 with f16 or bf16 operands and f32 accumulators for warp `w`:
//   a0: A[g][2t, 2t+1]  a1: A[g+8][2t, 2t+1]  a2: A[g][2t+8, 2t+9]  a3: A[g+8][2t+8, 2t+9]
//   b0: B[2t, 2t+1][g]  b1: B[2t+8, 2t+9][g];  c0..c3 as the integer MMA's.
// The products are summed in double and rounded once (the hardware's order and internal
// precision differ: compare with a tolerance).
inline void warp_mma_f16(int w) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const Fiber& f = (*g_fibers)[w * 32 + lane];
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      auto el = [&](unsigned word) {
        return half_bits_to_float((uint16_t)(word >> (16 * h)), f.bf16);
      };
      A[g][2 * t + h] = el(f.a[0]);
      A[g + 8][2 * t + h] = el(f.a[1]);
      A[g][2 * t + 8 + h] = el(f.a[2]);
      A[g + 8][2 * t + 8 + h] = el(f.a[3]);
      B[2 * t + h][g] = el(f.b[0]);
      B[2 * t + 8 + h][g] = el(f.b[1]);
    }
  }
  float_mma_finish(w, A, B);
}

// The value of an FP8 e4m3 (e4m3fn: bias 7, no infinities, S.1111.111 NaN) byte.
inline float e4m3_to_float(unsigned b) {
  const int e = (b >> 3) & 15, m = b & 7;
  const float mag = (e == 15 && m == 7) ? NAN : e == 0 ? std::ldexp((float)m, -9)
                                                       : std::ldexp(1.0f + m / 8.0f, e - 7);
  return (b & 0x80) ? -mag : mag;
}

// mma.m16n8k32 with e4m3 operands and f32 accumulators for warp `w`: the 8-bit fragment
// layout of the integer MMA, the products summed in double and rounded once (the hardware
// keeps less precision in its sums: compare with a tolerance).
inline void warp_mma_e4m3(int w) {
  float A[16][32], B[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const Fiber& f = (*g_fibers)[w * 32 + lane];
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; ++j) {
      auto el = [&](unsigned word) { return e4m3_to_float((word >> (8 * j)) & 0xffu); };
      A[g][4 * t + j] = el(f.a[0]);
      A[g + 8][4 * t + j] = el(f.a[1]);
      A[g][16 + 4 * t + j] = el(f.a[2]);
      A[g + 8][16 + 4 * t + j] = el(f.a[3]);
      B[4 * t + j][g] = el(f.b[0]);
      B[16 + 4 * t + j][g] = el(f.b[1]);
    }
  }
  float_mma_finish(w, A, B);
}

// A shuffle: each lane receives the value its source lane posted.
inline void warp_shuffle(int w) {
  for (int lane = 0; lane < 32; ++lane) {
    Fiber& f = (*g_fibers)[w * 32 + lane];
    f.result = (*g_fibers)[w * 32 + (f.src_lane & 31)].value;
  }
  warp_release(w);
}

constexpr size_t kStackBytes = 128 * 1024;

// Fiber stacks, allocated once and reused by every block (zeroing 256 x 128 KB per block
// would cost more than most kernels' work).
inline char* stack_pool(int i) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while ((int)pool.size() <= i) pool.emplace_back(new char[kStackBytes]);
  return pool[i].get();
}

// One block of `threads` fibers running `body` to completion.
inline void run_block(const std::function<void()>& body, dim3 block) {
  const int n = (int)(block.x * block.y * block.z);
  std::vector<Fiber> fibers(n);
  g_fibers = &fibers;
  g_body = &body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.stack = stack_pool(i);
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      if (fibers[i].state != RUNNING) continue;
      g_current = i;
      threadIdx = fibers[i].tid;
      swapcontext(&g_scheduler, &fibers[i].ctx);
      ran = true;
    }
    int done = 0, barrier = 0;
    for (const Fiber& f : fibers) {
      done += f.state == DONE;
      barrier += f.state == AT_BARRIER;
    }
    if (done == n) break;
    bool released = false;
    if (barrier > 0 && barrier + done == n) {  // every live thread waits: release them
      for (Fiber& f : fibers)
        if (f.state == AT_BARRIER) f.state = RUNNING;
      released = true;
    }
    int named = 0;  // bar.sync 1, count: released once `count` threads wait at it
    for (const Fiber& f : fibers) named += f.state == AT_NAMED_BARRIER;
    if (named > 0 && named >= g_named_count) {
      for (Fiber& f : fibers)
        if (f.state == AT_NAMED_BARRIER) f.state = RUNNING;
      released = true;
    }
    for (int w = 0; w * 32 < n; ++w) {  // warp-wide operations once all 32 lanes are there
      for (State op : {AT_MMA, AT_MMA_F16, AT_MMA_E4M3, AT_LDMATRIX, AT_SHUFFLE, AT_SYNCWARP}) {
        bool all = w * 32 + 32 <= n;
        for (int l = 0; all && l < 32; ++l) all = fibers[w * 32 + l].state == op;
        if (all) {
          if (op == AT_MMA) warp_mma(w);
          else if (op == AT_MMA_F16) warp_mma_f16(w);
          else if (op == AT_MMA_E4M3) warp_mma_e4m3(w);
          else if (op == AT_LDMATRIX) warp_ldmatrix(w);
          else if (op == AT_SHUFFLE) warp_shuffle(w);
          else warp_release(w);
          released = true;
        }
      }
    }
    if (!ran && !released) {
      std::fprintf(stderr, "qc_emu: deadlock in block (%u, %u, %u)\n", blockIdx.x, blockIdx.y,
                   blockIdx.z);
      std::abort();
    }
  }
  g_fibers = nullptr;
}

inline void named_barrier(int count) {
  g_named_count = count;
  yield(AT_NAMED_BARRIER);
}

// prmt.b32 (default mode): byte i of the result is byte sel[4i+2:4i] of {b, a} (a: bytes
// 0-3), replicated sign bit when sel bit 4i+3 is set.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t ab = (uint64_t)a | ((uint64_t)b << 32);
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 0xfu;
    uint32_t byte = (uint32_t)(ab >> (8 * (s & 7))) & 0xffu;
    if (s & 8) byte = (byte & 0x80u) ? 0xffu : 0u;
    d |= byte << (8 * i);
  }
  return d;
}

inline void copy16(void* dst, const void* src, bool valid) {
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}

inline void mma_m16n8k32(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                         bool a_unsigned, bool b_unsigned = false) {
  Fiber& f = (*g_fibers)[g_current];
  f.d = d;
  f.a = a;
  f.b = b;
  f.a_unsigned = a_unsigned;
  f.b_unsigned = b_unsigned;
  yield(AT_MMA);
}

inline void ldmatrix(unsigned* r, const void* row, int count, bool trans) {
  Fiber& f = (*g_fibers)[g_current];
  f.row = static_cast<const uint8_t*>(row);
  f.out = r;
  f.ld_count = count;
  f.ld_trans = trans;
  yield(AT_LDMATRIX);
}
inline void ldmatrix_x4(unsigned (&r)[4], const uint8_t* row) { ldmatrix(r, row, 4, false); }

inline void mma_m16n8k32_e4m3(float* d, const unsigned* a, const unsigned* b) {
  Fiber& f = (*g_fibers)[g_current];
  f.fd = d;
  f.a = a;
  f.b = b;
  yield(AT_MMA_E4M3);
}

inline void mma_m16n8k16_f32(float* d, const unsigned* a, const unsigned* b, bool bf16) {
  Fiber& f = (*g_fibers)[g_current];
  f.fd = d;
  f.a = a;
  f.b = b;
  f.bf16 = bf16;
  yield(AT_MMA_F16);
}

}  // namespace qc_emu

inline void __syncthreads() { qc_emu::yield(qc_emu::AT_BARRIER); }

template <typename T> inline T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "a shuffle moves up to 8 bytes");
  qc_emu::Fiber& f = (*qc_emu::g_fibers)[qc_emu::g_current];
  f.value = 0;
  std::memcpy(&f.value, &v, sizeof(T));
  f.src_lane = src_lane;
  qc_emu::yield(qc_emu::AT_SHUFFLE);
  T r;
  std::memcpy(&r, &f.result, sizeof(T));
  return r;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  return shuffle(v, (int)(threadIdx.x % 32) ^ mask);
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = (int)(threadIdx.x % 32);
  return shuffle(v, (lane & ~(width - 1)) + (src % width));
}
inline void __syncwarp(unsigned = 0xffffffffu) { qc_emu::yield(qc_emu::AT_SYNCWARP); }

namespace qc_emu {
// common.cuh's launch: the grid's blocks one after another, each as fibers.
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          Args&&... args) {
  if (smem_bytes > kSharedCapacity) return 1;
  const size_t smem_rounded = (smem_bytes + 127) / 128 * 128;
  shared = shared_region_end() - smem_rounded;
  gridDim = grid;
  blockDim = block;
  const std::function<void()> body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        // Each block starts with garbage in its dynamic shared memory, as on the GPU: all
        // ones (NaN in f16 and f32, -1 in integers), so a read of what it never wrote shows.
        std::memset(shared, 0xFF, smem_rounded);
        run_block(body, block);
      }
  return cudaSuccess;
}
}  // namespace qc_emu

template <typename... Params, typename... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* c, void (*kernel)(Params...),
                                      Args&&... args) {
  return qc_emu::launch(kernel, c->gridDim, c->blockDim, c->dynamicSmemBytes,
                        std::forward<Args>(args)...);
}

#endif  // QC_CUDA_HOST_EMULATOR_H
