// qcompiler CUDA kernels: the 16-bit element types (half, __nv_bfloat16) and their pairs.
//
// The kernels are templates over the element type S; these overloads are the only place that
// names the conversion intrinsics of each type. Static code, included by the generated .cu.
#ifndef QCOMPILER_SCALAR_CUH
#define QCOMPILER_SCALAR_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace qc {

// The pair type of S: half2 or __nv_bfloat162 (two elements in one 32-bit register).
template <class S> struct ScalarTraits;
template <> struct ScalarTraits<half> { using pair_t = half2; };
template <> struct ScalarTraits<__nv_bfloat16> { using pair_t = __nv_bfloat162; };
template <class S> using pair_t = typename ScalarTraits<S>::pair_t;

template <class S2>
__device__ __forceinline__ uint32_t as_u32(S2 v) { return *reinterpret_cast<uint32_t*>(&v); }
template <class S2>
__device__ __forceinline__ S2 as_pair(uint32_t v) { return *reinterpret_cast<S2*>(&v); }

// (Host and device: the tile's end, splitk.cuh, is also checked on the host.)
__host__ __device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class S>
__host__ __device__ __forceinline__ S from_float(float v) {
  if constexpr (std::is_same<S, half>::value) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

// v in both halves of a pair.
__device__ __forceinline__ half2 dup(half v) { return __half2half2(v); }
__device__ __forceinline__ __nv_bfloat162 dup(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }

// (a, b) rounded to a pair of S.
template <class S>
__device__ __forceinline__ pair_t<S> pair_from_floats(float a, float b) {
  if constexpr (std::is_same<S, half>::value) return __floats2half2_rn(a, b);
  else return __floats2bfloat162_rn(a, b);
}

}  // namespace qc

#endif  // QCOMPILER_SCALAR_CUH
