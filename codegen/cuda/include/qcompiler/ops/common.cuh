// qcompiler CUDA op kernels: what every generated op kernel shares (not generated).
// Element conversion to and from the f32 compute type, numpy-exact scalar semantics,
// warp/block reductions and the broadcast indexer. The op library's renderer pastes this
// file at the top of the model's .cu, so a library is one self-contained source.
#ifndef QCOMPILER_OPS_COMMON_CUH
#define QCOMPILER_OPS_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#include <utility>

namespace qc_ops {

constexpr int kMaxRank = 8;
inline constexpr float kF32Lowest = -3.4028234663852886e38f;

// ---- element <-> compute type (f16/bf16/f32 math in f32, f64 stays) ----------------------
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ double to_f(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_f<double>(float x) { return x; }

// ---- reductions ----------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sum / max over a block of `nwarps` warps; every thread gets the result. `scratch` holds
// 32 floats in shared memory; callers separate two uses with the __syncthreads inside.
template <typename F>
__device__ __forceinline__ float block_reduce(float v, float* scratch, int nwarps, F op,
                                              float identity) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : identity;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
struct SumOp { __device__ float operator()(float a, float b) const { return a + b; } };
struct MaxOp { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// ---- numpy-exact scalar helpers ------------------------------------------------------------
// numpy maximum/minimum propagate NaN.
template <typename C> __device__ __forceinline__ C np_max(C a, C b) {
  return a != a ? a : (b != b ? b : (a > b ? a : b));
}
template <typename C> __device__ __forceinline__ C np_min(C a, C b) {
  return a != a ? a : (b != b ? b : (a < b ? a : b));
}
// The reference's stable sigmoid.
__device__ __forceinline__ float np_sigmoid(float x) {
  if (x > 0.f) return 1.f / (1.f + expf(-x));
  float e = expf(x);
  return e / (1.f + e);
}
__device__ __forceinline__ double np_sigmoid(double x) {
  if (x > 0.0) return 1.0 / (1.0 + exp(-x));
  double e = exp(x);
  return e / (1.0 + e);
}
// C / ONNX integer division: toward zero; x / 0 = 0 and MIN / -1 wraps (numpy's results).
template <typename I> __device__ __forceinline__ I int_div(I a, I b) {
  if (b == 0) return 0;
  if ((I)-1 < 0 && b == (I)-1) return (I)(0 - a);
  return a / b;
}
// float -> integer: truncate, saturate to [lo, hi], NaN -> 0 (numerics.cast).
template <typename I> __device__ __forceinline__ I float_to_int(double v, double lo, double hi) {
  if (v != v) return 0;
  if (v <= lo) return (I)lo;
  if (v >= hi) return (I)hi;
  return (I)v;
}

// ---- broadcast indexing ----------------------------------------------------------------------
// Element strides of an operand over the result's dims (0 where the operand is broadcast).
struct Strides { int64_t s[kMaxRank]; };
struct Dims { int64_t d[kMaxRank]; };

// Right-aligned numpy broadcasting of an operand of `rank` dims to a result of `out_rank`.
inline Strides broadcast_strides(const int64_t* dims, int rank, const int64_t* out, int out_rank) {
  Strides st;
  int64_t stride = 1;
  for (int i = out_rank - 1; i >= 0; --i) {
    int k = i - (out_rank - rank);
    if (k < 0) { st.s[i] = 0; continue; }
    st.s[i] = (dims[k] == 1 && out[i] != 1) ? 0 : stride;
    if (dims[k] == 1) st.s[i] = 0;
    stride *= dims[k];
  }
  for (int i = out_rank; i < kMaxRank; ++i) st.s[i] = 0;
  return st;
}
inline int64_t numel(const int64_t* dims, int rank) {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= dims[i];
  return n;
}
// ---- programmatic dependent launch (sm_90) ---------------------------------------------------
// Every op kernel begins with wait_for_inputs(): nothing before it reads or writes global
// memory, and after it every earlier kernel of the stream has finished and its writes are
// visible. So a kernel may be launched before the previous one has finished (its launch and
// start-up overlap the other's tail: a whole model is hundreds of short launches). launch()
// does that where the kernels were built for sm_90 (code JIT-compiled from older PTX has no
// wait), unless QC_CUDA_PDL=0; elsewhere it is a plain <<<...>>> launch.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// An op kernel whose grid fits on the SMs at once (at most one block per SM) then lets the
// next kernel of the stream launch: that one's own wait still holds it until this grid has
// finished and its writes are visible, so meanwhile it can only prefetch constants (the
// GEMV's first ring of weights). Without the trigger the next kernel launched only when this
// one had exited, and a decode step's GEMV after a norm read its weights with nothing to
// overlap (1.05 -> 0.97 ms a TinyLlama decode step on the H200). A larger grid does not
// trigger early: the next kernel's blocks, resident and waiting, would take the SMs its own
// later blocks need (with an unconditional trigger, and fuse-qkv, MiniLM at 8x32 took
// 1.03 ms instead of 0.46; at 1x16, small grids only, 0.23 instead of 0.29).
// The qmatmul kernels trigger after their main loop themselves (gemv.cuh).
__device__ __forceinline__ void wait_for_inputs() {
  wait_for_previous_grid();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned sms;
  asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
  if (gridDim.x * gridDim.y * gridDim.z <= sms)
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether `kernel` may be launched early: its code was built for sm_90 or later (so it waits)
// and QC_CUDA_PDL is not 0.
template <typename... Params>
inline bool may_launch_early(void (*kernel)(Params...)) {
  const char* env = getenv("QC_CUDA_PDL");
  cudaFuncAttributes fa;
  return !(env && env[0] == '0') &&
         cudaFuncGetAttributes(&fa, (const void*)kernel) == cudaSuccess && fa.ptxVersion >= 90;
}

// `kernel` on `stream`, allowed to start before the previous kernel ends when `early`.
template <typename... Params, typename... Args>
inline cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block,
                                    size_t smem, cudaStream_t stream, bool early,
                                    Args&&... args) {
  if (early) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  }
#ifdef QC_HOST_EMULATION  // tests/cuda_host/emulator: the blocks run on the host, as fibers
  return qc_emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// ---- asynchronous copies global -> shared (cp.async, sm_80+) -----------------------------
// 16 bytes, or 16 zeros where !valid (src-size 0: nothing is read). In host emulation a copy
// is immediate (nothing is ever in flight).
#ifndef QC_HOST_EMULATION
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
// Until at most N of this thread's committed groups are in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#else
inline void cp_async16(void* smem, const void* gmem, bool valid) {
  qc_emu::copy16(smem, gmem, valid);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
#endif

// Decided at the first launch of the translation unit (one op library is one: its kernels are
// built alike). `static`, not `inline`: an inline variable is one symbol for the whole process
// (STB_GNU_UNIQUE), shared with another model's library that may be built for sm_80 only.
[[maybe_unused]] static int g_early_launch = -1;

template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  if (g_early_launch < 0) g_early_launch = may_launch_early(kernel);
  return launch_dependent(kernel, grid, block, smem, stream, g_early_launch != 0,
                          std::forward<Args>(args)...);
}

inline unsigned grid_for(int64_t n, int threads) {
  int64_t g = (n + threads - 1) / threads;
  return (unsigned)(g < 1 ? 1 : (g > 65535LL * 32 ? 65535LL * 32 : g));
}

}  // namespace qc_ops

namespace qc_ops {
// GELU in double, as the reference (rounded once by the caller).
__device__ __forceinline__ double gelu_erf(double v) {
  return 0.5 * v * (1.0 + erf(v / 1.4142135623730951));
}
__device__ __forceinline__ double gelu_tanh(double v) {
  return 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
}
}  // namespace qc_ops

#endif  // QCOMPILER_OPS_COMMON_CUH
