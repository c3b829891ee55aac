// qcompiler CUDA kernels: weight codes -> MMA B fragments. One struct per unpack strategy
// (what the schedule-unpack pass decides); the generated .cu names one as its Config::Unpack.
//
// Every strategy has the same interface, for element type S and its pair type S2:
//   ZeroOffsets                          what the conversion subtracts, per n8 half h = 0, 1;
//   zero_offsets(z)                      from the zero points z[h] of the lane's columns in
//                                        n8 halves 0, 1 (HAS_ZP), else from constants;
//   unpack_tile<APPLY_SCALE>(q, b, zo, s2)
//                                        one n16 tile's codes q -> B fragments b[0..3] =
//                                        (b0b1, b2b3) of n8 halves 0, 1; s2[h] is the scale of
//                                        half h, duplicated. APPLY_SCALE false leaves the
//                                        exact integers (c - z) for a scale applied later
//                                        (epilogue or accumulator).
// With a constant zero point the offsets are constants too: ZLO2 / ZHI2 are their bits as a
// duplicated 16-bit pair (computed by codegen/cuda/backend.py, zero_constants).
// Static code, included by the generated .cu.
#ifndef QCOMPILER_UNPACK_CUH
#define QCOMPILER_UNPACK_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "scalar.cuh"

namespace qc {

#ifndef QC_HOST_EMULATION
// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Bytes of (a, b) selected by sel.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm volatile("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
#else  // tests/cuda_host/emulator
inline uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) { return qc_emu::prmt(a, b, sel); }
#endif

// "lop3-magic-f16" (4-bit codes, f16). LOP3 magic number: (q & 0x000f000f) | 0x64006400 is
// the fp16 pair (1024 + c0, 1024 + c4); the high nibbles come out as 1024 + 16c and take an
// FMA by 1/16. (1024 + c) - (1024 + z) is exact in fp16, so the only rounding is the product
// with the scale. Offsets of one n16 tile (n8 halves h = 0, 1): 1024 + z for the low
// nibbles, -(64 + z) for the high ones (the GEMV kernel computes them once per scale group).
template <class S, bool HAS_ZP, uint32_t ZLO2, uint32_t ZHI2>
struct UnpackLop3MagicF16 {
  using S2 = pair_t<S>;
  struct ZeroOffsets { S2 lo[2], hi[2]; };

  static __device__ __forceinline__ ZeroOffsets zero_offsets(const S* z) {
    ZeroOffsets o;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (HAS_ZP) {
        const S2 z2 = dup(z[h]);
        o.lo[h] = __hadd2(z2, as_pair<S2>(0x64006400u));               // 1024 + z
        o.hi[h] = __hneg2(__hadd2(z2, as_pair<S2>(0x54005400u)));      // -(64 + z)
      } else {
        o.lo[h] = as_pair<S2>(ZLO2);
        o.hi[h] = as_pair<S2>(ZHI2);
      }
    }
    return o;
  }

  template <bool APPLY_SCALE>
  static __device__ __forceinline__ void unpack_tile(const uint32_t* q, uint32_t* b,
                                                     const ZeroOffsets& zo, const S2* s2) {
    const S2 sixteenth = as_pair<S2>(0x2C002C00u);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t word = q[0] >> (8 * h);
      S2 lo = __hsub2(as_pair<S2>(lop3_and_or(word, 0x000f000fu, 0x64006400u)), zo.lo[h]);
      S2 hi = __hfma2(as_pair<S2>(lop3_and_or(word, 0x00f000f0u, 0x64006400u)), sixteenth,
                      zo.hi[h]);
      if constexpr (APPLY_SCALE) {
        lo = __hmul2(lo, s2[h]);
        hi = __hmul2(hi, s2[h]);
      }
      b[2 * h] = as_u32(lo);
      b[2 * h + 1] = as_u32(hi);
    }
  }
};

// "shift-magic-bf16" (4-bit codes, bf16). bf16 has 7 mantissa bits, too few for 16c: each
// nibble pair is shifted down and OR-ed with 0x4300 (128.0), giving (128 + c0, 128 + c4);
// (128 + c) - (128 + z) is exact in bf16.
template <class S, bool HAS_ZP, uint32_t ZLO2>
struct UnpackShiftMagicBf16 {
  using S2 = pair_t<S>;
  struct ZeroOffsets { S2 lo[2]; };   // 128 + z per n8 half

  static __device__ __forceinline__ ZeroOffsets zero_offsets(const S* z) {
    ZeroOffsets o;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (HAS_ZP) o.lo[h] = __hadd2(dup(z[h]), as_pair<S2>(0x43004300u));
      else o.lo[h] = as_pair<S2>(ZLO2);
    }
    return o;
  }

  template <bool APPLY_SCALE>
  static __device__ __forceinline__ void unpack_tile(const uint32_t* q, uint32_t* b,
                                                     const ZeroOffsets& zo, const S2* s2) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int h = i >> 1;
      S2 v = __hsub2(as_pair<S2>(lop3_and_or(q[0] >> (4 * i), 0x000f000fu, 0x43004300u)),
                     zo.lo[h]);
      if constexpr (APPLY_SCALE) v = __hmul2(v, s2[h]);
      b[i] = as_u32(v);
    }
  }
};

// "prmt-f16" (8-bit codes, f16). PRMT puts each byte under 0x64: the fp16 pair
// (1024 + c_k, 1024 + c_k+1), exact.
template <class S, bool HAS_ZP, uint32_t ZLO2>
struct UnpackPrmtF16 {
  using S2 = pair_t<S>;
  struct ZeroOffsets { S2 lo[2]; };   // 1024 + z per n8 half

  static __device__ __forceinline__ ZeroOffsets zero_offsets(const S* z) {
    ZeroOffsets o;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (HAS_ZP) o.lo[h] = __hadd2(dup(z[h]), as_pair<S2>(0x64006400u));
      else o.lo[h] = as_pair<S2>(ZLO2);
    }
    return o;
  }

  template <bool APPLY_SCALE>
  static __device__ __forceinline__ void unpack_tile(const uint32_t* q, uint32_t* b,
                                                     const ZeroOffsets& zo, const S2* s2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      S2 lo = __hsub2(as_pair<S2>(prmt(q[h], 0x64646464u, 0x4140u)), zo.lo[h]);  // rows k, k+1
      S2 hi = __hsub2(as_pair<S2>(prmt(q[h], 0x64646464u, 0x4342u)), zo.lo[h]);  // k+8, k+9
      if constexpr (APPLY_SCALE) {
        lo = __hmul2(lo, s2[h]);
        hi = __hmul2(hi, s2[h]);
      }
      b[2 * h] = as_u32(lo);
      b[2 * h + 1] = as_u32(hi);
    }
  }
};

// "fp8-e4m3-f16" (FP8 e4m3 codes in 8-bit containers, f16). An e4m3 byte s.eeee.mmm moved to
// f16's bits as s.0eeee.mmm0000000 is the f16 of its value / 2^8 (f16's exponent bias is 8
// more than e4m3's; e4m3's subnormals land on f16 subnormals, also exactly): a PRMT puts the
// bytes in the high halves, one shift and one LOP3 place sign and magnitude. reorder-weights
// folds the 2^8 into the scales. No zero points (FP8 weights are symmetric).
template <class S, bool HAS_ZP>
struct UnpackFp8E4M3F16 {
  static_assert(std::is_same<S, half>::value && !HAS_ZP, "FP8 e4m3 weights: f16, no zero point");
  using S2 = pair_t<S>;
  struct ZeroOffsets {};

  static __device__ __forceinline__ ZeroOffsets zero_offsets(const S*) { return {}; }

  static __device__ __forceinline__ uint32_t pair(uint32_t bytes_hi) {
    return (bytes_hi & 0x80008000u) | ((bytes_hi >> 1) & 0x3f803f80u);
  }

  template <bool APPLY_SCALE>
  static __device__ __forceinline__ void unpack_tile(const uint32_t* q, uint32_t* b,
                                                     const ZeroOffsets&, const S2* s2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      S2 lo = as_pair<S2>(pair(prmt(q[h], 0u, 0x1404u)));  // rows k, k+1 (bytes 0, 1)
      S2 hi = as_pair<S2>(pair(prmt(q[h], 0u, 0x3424u)));  // rows k+8, k+9 (bytes 2, 3)
      if constexpr (APPLY_SCALE) {
        lo = __hmul2(lo, s2[h]);
        hi = __hmul2(hi, s2[h]);
      }
      b[2 * h] = as_u32(lo);
      b[2 * h + 1] = as_u32(hi);
    }
  }
};

// "shift-mask-f32" (any container width CB = 4 or 8, f16 or bf16). Shift and mask, then fp32:
// (c - z) * s rounded once to S.
template <class S, int CB>
struct UnpackShiftMaskF32 {
  using S2 = pair_t<S>;
  struct ZeroOffsets { float z[2]; };        // the zero point per n8 half

  static __device__ __forceinline__ ZeroOffsets zero_offsets(const S* z) {
    ZeroOffsets o;
#pragma unroll
    for (int h = 0; h < 2; ++h) o.z[h] = to_float(z[h]);
    return o;
  }

  static __device__ __forceinline__ float code_at(const uint32_t* q, int h, int k8, int kodd) {
    if (CB == 4) return float((q[0] >> (4 * (4 * kodd + 2 * h + k8))) & 0xFu);
    return float((q[h] >> (8 * (2 * k8 + kodd))) & 0xFFu);
  }

  template <bool APPLY_SCALE>
  static __device__ __forceinline__ void unpack_tile(const uint32_t* q, uint32_t* b,
                                                     const ZeroOffsets& zo, const S2* s2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float zf = zo.z[h];
      const float sf = APPLY_SCALE ? to_float(s2[h].x) : 1.0f;
#pragma unroll
      for (int k8 = 0; k8 < 2; ++k8)
        b[2 * h + k8] = as_u32(pair_from_floats<S>((code_at(q, h, k8, 0) - zf) * sf,
                                                   (code_at(q, h, k8, 1) - zf) * sf));
    }
  }
};

}  // namespace qc

#endif  // QCOMPILER_UNPACK_CUH
