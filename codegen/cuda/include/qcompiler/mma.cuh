// qcompiler CUDA kernels: ldmatrix and the tensor-core MMAs (mma.sync, sm_80+): m16n8k16 with
// f16 or bf16 inputs and fp32 accumulators, m16n8k32 with s8 x u8 inputs and s32 accumulators or
// FP8 e4m3 inputs and fp32 accumulators (the 8-bit-activation kernel, tiled_i8.cuh). Static code, included by the generated .cu.
#ifndef QCOMPILER_MMA_CUH
#define QCOMPILER_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "pipeline.cuh"  // smem_addr

namespace qc {

#ifndef QC_HOST_EMULATION
// Four 8x8 b16 matrices from shared memory (the A fragments of one m16k16 step).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 { %0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c += a * b for inputs of type S (half or __nv_bfloat16).
template <class S>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<S, half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// d = a * b (the accumulator input is zero: a group's first step in accumulator scaling).
template <class S>
__device__ __forceinline__ void mma_16816_zero(float* d, const uint32_t* a, uint32_t b0,
                                               uint32_t b1) {
  if constexpr (std::is_same<S, half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %10,%10,%10,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %10,%10,%10,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
  }
}

// c += a * b for s8 A (16 x 32 row-major) and u8 B (32 x 8 column-major), exact in s32.
__device__ __forceinline__ void mma_16832_s8u8(int* c, const uint32_t* a, uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 "
      "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a * b for FP8 e4m3 inputs (sm_89+; the same fragment layout as s8), fp32 sums.
__device__ __forceinline__ void mma_16832_e4m3(float* c, const uint32_t* a, uint32_t b0,
                                               uint32_t b1) {
#if __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{ %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the tile pass gives FP8 activations only to targets with FP8 MMA (sm_89+)
#endif
}

#else  // tests/cuda_host/emulator: warp-wide, from the 32 lanes' operands
inline void ldmatrix_x4(uint32_t* r, const void* p) { qc_emu::ldmatrix(r, p, 4, false); }
template <class S>
inline void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  qc_emu::mma_m16n8k16_f32(c, a, b, !std::is_same<S, half>::value);
}
inline void mma_16832_s8u8(int* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  qc_emu::mma_m16n8k32(*reinterpret_cast<int(*)[4]>(c), *reinterpret_cast<const uint32_t(*)[4]>(a),
                       b, false, true);
}
inline void mma_16832_e4m3(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  qc_emu::mma_m16n8k32_e4m3(c, a, b);
}
template <class S>
inline void mma_16816_zero(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  d[0] = d[1] = d[2] = d[3] = 0.0f;
  mma_16816<S>(d, a, b0, b1);
}
#endif

}  // namespace qc

#endif  // QCOMPILER_MMA_CUH
