// qcompiler CUDA kernels: asynchronous copies into shared memory (cp.async, sm_80+), the
// streaming global load and the L2 prefetch of the weights. Static code, included by the
// generated .cu.
#ifndef QCOMPILER_PIPELINE_CUH
#define QCOMPILER_PIPELINE_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "ops/common.cuh"  // cp_async16, cp_async_commit, cp_async_wait (zero-fill copies)

namespace qc {

// 16-byte global -> shared copies (src-size 0 fills zeros: rows past M, columns past K), the
// commit and the wait: the op kernels' (ops/common.cuh).
using qc_ops::cp_async16;
using qc_ops::cp_async_commit;
using qc_ops::cp_async_wait;

#ifndef QC_HOST_EMULATION
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp_async16 for the weight stream, which is read once: ask L2 to fetch 128-byte lines.
__device__ __forceinline__ void cp_async16_stream(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}

// The weight stream is read once: bypass L1 (it keeps x) and fetch 256-byte L2 lines.
__device__ __forceinline__ uint4 ld_stream(const uint4* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 { %0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}

// Ask L1 for the 128-byte line at `ptr`, without waiting and without registers.
__device__ __forceinline__ void prefetch_l1(const void* ptr) {
  asm volatile("prefetch.global.L1 [%0];\n" :: "l"(ptr));
}

// Ask L2 for `bytes` (a multiple of 16) from `ptr` (16-byte aligned), without waiting and
// without registers: one bulk prefetch on sm_90, one prefetch a 128-byte line before.
__device__ __forceinline__ void prefetch_l2(const void* ptr, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" :: "l"(ptr), "r"(bytes) : "memory");
#else
  for (unsigned o = 0; o < bytes; o += 128)
    asm volatile("prefetch.global.L2 [%0];\n" :: "l"(static_cast<const char*>(ptr) + o));
#endif
}

#else  // tests/cuda_host/emulator: copies are immediate, loads plain
inline void cp_async16_stream(void* dst, const void* src, bool valid) {
  qc_emu::copy16(dst, src, valid);
}
inline uint4 ld_stream(const uint4* ptr) { return *ptr; }
inline void prefetch_l2(const void*, unsigned) {}
inline void prefetch_l1(const void*) {}
#endif

}  // namespace qc

#endif  // QCOMPILER_PIPELINE_CUH
