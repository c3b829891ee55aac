// A host emulation of the CUDA that the op kernels of codegen/cuda/templates/ops use, so that
// their index arithmetic, tiling, shared-memory staging and epilogues run in CI without a GPU
// (tests/test_cuda_conv.py builds a kernel's source after this header with g++ and calls it
// through its C ABI on host buffers).
//
// It stands in for ops/common.cuh and the CUDA runtime: a launch runs the grid's blocks one
// after another; a block's threads are fibers (ucontext) run round-robin by a scheduler, which
// releases __syncthreads() when every live thread of the block has reached it and computes a
// warp's mma.sync.m16n8k32 (integer) once all 32 lanes have posted their fragments. The
// fragment layouts are the PTX ISA's for m16n8k32 with 8-bit operands (lane = 4 * group +
// thread in group; A 16 x 32 row-major, B 32 x 8 column-major, C/D 16 x 8):
//   a0: A[g][4t..4t+3]  a1: A[g+8][4t..]  a2: A[g][16+4t..]  a3: A[g+8][16+4t..]
//   b0: B[4t..4t+3][g]  b1: B[16+4t..][g]
//   d0, d1: D[g][2t], D[g][2t+1]   d2, d3: D[g+8][2t], D[g+8][2t+1]
// cp.async copies at once (nothing is in flight, so a missing wait cannot show here: only
// the GPU tests see such races). Float intrinsics are single IEEE operations (build with
// -ffp-contract=off).
#ifndef QC_CUDA_HOST_EMULATOR_H
#define QC_CUDA_HOST_EMULATOR_H

#define QC_HOST_EMULATION 1

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__
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

// The executing thread's coordinates (the scheduler sets them before resuming a fiber).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int atomicAdd(int* p, int v) {  // the blocks run one at a time
  const int old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int2float_rn(int v) { return (float)v; }
inline int __float2int_rn(float v) { return (int)std::nearbyint(v); }  // ties to even

namespace qc_emu {

// A kernel's dynamic shared memory: one buffer, the blocks run one at a time.
alignas(128) inline uint8_t shared[232448];

enum State { RUNNING, AT_BARRIER, AT_MMA, AT_LDMATRIX, DONE };

struct Fiber {
  ucontext_t ctx;
  State state = RUNNING;
  std::vector<char> stack;
  dim3 tid;
  // posted fragments at an MMA
  int* d = nullptr;
  const unsigned* a = nullptr;
  const unsigned* b = nullptr;
  bool a_unsigned = false;
  // posted at an ldmatrix: the row address this lane gives and where its 4 words go
  const uint8_t* row = nullptr;
  unsigned* out = nullptr;
};

inline ucontext_t g_scheduler;
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
      B[4 * t + j][g] = lane_byte(f.b[0], j, false);
      B[16 + 4 * t + j][g] = lane_byte(f.b[1], j, false);
    }
    D[g][2 * t] = f.d[0];
    D[g][2 * t + 1] = f.d[1];
    D[g + 8][2 * t] = f.d[2];
    D[g + 8][2 * t + 1] = f.d[3];
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      int64_t s = D[r][c];
      for (int k = 0; k < 32; ++k) s += (int64_t)A[r][k] * B[k][c];
      D[r][c] = (int)(int32_t)s;  // the s32 accumulator wraps as the hardware's does
    }
  for (int lane = 0; lane < 32; ++lane) {
    Fiber& f = (*g_fibers)[w * 32 + lane];
    const int g = lane / 4, t = lane % 4;
    f.d[0] = D[g][2 * t];
    f.d[1] = D[g][2 * t + 1];
    f.d[2] = D[g + 8][2 * t];
    f.d[3] = D[g + 8][2 * t + 1];
    f.state = RUNNING;
  }
}

// ldmatrix.x4 (b16) for warp `w`: matrix j's row r at lane 8j + r's address; lane l receives
// in register j the 4 bytes at column 4 (l % 4) of row l / 4 of matrix j.
inline void warp_ldmatrix(int w) {
  unsigned words[32][4];
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) {
      const uint8_t* row = (*g_fibers)[w * 32 + j * 8 + lane / 4].row;
      std::memcpy(&words[lane][j], row + 4 * (lane % 4), 4);
    }
  for (int lane = 0; lane < 32; ++lane) {
    Fiber& f = (*g_fibers)[w * 32 + lane];
    for (int j = 0; j < 4; ++j) f.out[j] = words[lane][j];
    f.state = RUNNING;
  }
}

// One block of `threads` fibers running `body` to completion.
inline void run_block(const std::function<void()>& body, dim3 block) {
  const int n = (int)(block.x * block.y * block.z);
  std::vector<Fiber> fibers(n);
  g_fibers = &fibers;
  g_body = &body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.stack.resize(256 * 1024);
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
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
    for (int w = 0; w * 32 < n; ++w) {  // warp-wide operations once all 32 lanes are there
      for (State op : {AT_MMA, AT_LDMATRIX}) {
        bool all = w * 32 + 32 <= n;
        for (int l = 0; all && l < 32; ++l) all = fibers[w * 32 + l].state == op;
        if (all) {
          if (op == AT_MMA) warp_mma(w);
          else warp_ldmatrix(w);
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

inline void copy16(void* dst, const void* src, bool valid) {
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
}

inline void mma_m16n8k32(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                         bool a_unsigned) {
  Fiber& f = (*g_fibers)[g_current];
  f.d = d;
  f.a = a;
  f.b = b;
  f.a_unsigned = a_unsigned;
  yield(AT_MMA);
}

inline void ldmatrix_x4(unsigned (&r)[4], const uint8_t* row) {
  Fiber& f = (*g_fibers)[g_current];
  f.row = row;
  f.out = r;
  yield(AT_LDMATRIX);
}

}  // namespace qc_emu

inline void __syncthreads() { qc_emu::yield(qc_emu::AT_BARRIER); }

// What the op kernels take from ops/common.cuh.
namespace qc_ops {
inline void wait_for_inputs() {}
inline float to_f(float x) { return x; }
template <typename T> inline T from_f(float x) { return (T)x; }
template <typename C> inline C np_max(C a, C b) {
  return a != a ? a : (b != b ? b : (a > b ? a : b));
}
template <typename C> inline C np_min(C a, C b) {
  return a != a ? a : (b != b ? b : (a < b ? a : b));
}
inline int64_t numel(const int64_t* dims, int rank) {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= dims[i];
  return n;
}
inline unsigned grid_for(int64_t n, int threads) {
  int64_t g = (n + threads - 1) / threads;
  return (unsigned)(g < 1 ? 1 : (g > 4096 ? 4096 : g));  // (grid-stride loops cover the rest)
}
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t, Args&&... args) {
  if (smem_bytes > sizeof(qc_emu::shared)) return 1;
  gridDim = grid;
  blockDim = block;
  const std::function<void()> body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        qc_emu::run_block(body, block);
      }
  return cudaSuccess;
}
}  // namespace qc_ops

#endif  // QC_CUDA_HOST_EMULATOR_H
