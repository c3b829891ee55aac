// qconv
// qconv, channels-last: x [N, 7, 7, 8] uint8_t codes, y [N, 7, 7, 8]
// uint8_t; kernel 3x3, stride 1x1, pads (top 1, left 1),
// dilation 1x1, 8 group(s). Weights centred on their zero points and the
// bias holding bias - x_zp * sum(w') (cuda-conv-layout), so the sum is over raw codes with
// padding read as x_zp.
// Depthwise, dp4a: a thread per output pixel and 4 consecutive channels; the taps four at a
// time: 4 words of x (a tap's 4 channels each) transposed in registers (8 byte permutes) into
// 4 words of one channel's 4 taps, each summed against that channel's 4 weights by one dp4a
// (the weights are stored so, cuda_dw_t4); 16 products in 12 instructions instead of 48.
// Epilogue: requantize: clamp(rne(f32(acc) * f32(s[m] / y_scale)) + y_zp, 0, 255)
namespace qc_cu_qconv_4bb0ee388deb_ns {
using X = uint8_t;
using Y = uint8_t;
constexpr int H = 7, W = 7, C = 8, OH = 7, OW = 7, M = 8;
constexpr int KH = 3, KW = 3, SH = 1, SW = 1, PT = 1, PL = 1;
constexpr int DH = 1, DW = 1;
constexpr int LO = 0, HI = 255;  // output code bounds (activation clip included)

struct Params {
  const X* x; const int8_t* w; const float* x_scale; const X* x_zp; const float* w_scale;
  const int32_t* bias; const float* y_scale; const Y* y_zp;
  const float* residual; const float* r_scale; const uint8_t* r_zp;
  Y* y; int64_t pixels;
  int splits; int* counters; int32_t* partials;  // split-K (igemm): the workspace's parts
                                                 // (counters, then a sum per tile; zero between calls)
};

// Channel n's factor from the raw sum to y's units: f32(x_scale * w_scale[n]) / y_scale, each
// step one IEEE rounding as in the reference. Computed once per channel a thread (or block)
// touches, not once per output: the division costs more than the rest of the epilogue.
__device__ __forceinline__ float channel_factor(const Params& q, int n) {
  const float s = __fmul_rn(q.x_scale[0], q.w_scale[n]);

  return __fdiv_rn(s, q.y_scale[0]);

}

// The residual's factor to y's units (out_quant with a residual), else unused.
__device__ __forceinline__ float residual_factor(const Params& q) {

  return 0.0f;

}

// y for output pixel p, channel n, from the raw sum (bias added here) and channel n's factor
// f. Every float step is one IEEE rounding, as in the reference (no contraction into fma).
__device__ __forceinline__ Y finish(const Params& q, int32_t raw, int64_t p, int n, float f,
                                    float rr) {
  const int32_t acc = raw + q.bias[n];

  const float v0 = __fmul_rn(__int2float_rn(acc), f);

  const float v = v0;

  int32_t code = __float2int_rn(v) + (int32_t)q.y_zp[0];
  code = code < LO ? LO : (code > HI ? HI : code);
  return (Y)code;

}


constexpr int CG = 1, MG = 1, VEC = 4;
constexpr int THREADS = 256;

template <int N> struct alignas(N) Bytes { int8_t v[N]; };

constexpr int TAPS = KH * KW, WORDS = (TAPS + 3) / 4;  // weight words per channel
template <int N> struct alignas(4 * N) Words { uint32_t v[N]; };

#ifndef QC_HOST_EMULATION
// d = c + sum of the 4 byte products of a (x codes) and b (signed weights)
__device__ __forceinline__ int dp4a(uint32_t a, uint32_t b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
  return __byte_perm(a, b, sel);
}
#else
inline int dp4a(uint32_t a, uint32_t b, int c) {
  for (int i = 0; i < 4; ++i)
    c += (int)(uint8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}
inline uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {  // PTX prmt, default mode
  const uint64_t both = ((uint64_t)b << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= (uint32_t)((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
#endif

// r[j] = tap j's bytes of 4 channels -> r[c] = channel c's bytes of the 4 taps
__device__ __forceinline__ void transpose4(uint32_t (&r)[4]) {
  const uint32_t t0 = byte_perm(r[0], r[1], 0x5140), t1 = byte_perm(r[0], r[1], 0x7362);
  const uint32_t t2 = byte_perm(r[2], r[3], 0x5140), t3 = byte_perm(r[2], r[3], 0x7362);
  r[0] = byte_perm(t0, t2, 0x5410);
  r[1] = byte_perm(t0, t2, 0x7632);
  r[2] = byte_perm(t1, t3, 0x5410);
  r[3] = byte_perm(t1, t3, 0x7632);
}


__global__ void __launch_bounds__(THREADS) qconv_direct_kernel(Params q) {
  // every channel's factor, once per block (scales are constants: before the wait)
  __shared__ float fac[M];
  for (int n = threadIdx.x; n < M; n += THREADS) fac[n] = channel_factor(q, n);
  const float rr = residual_factor(q);
  __syncthreads();
  qc_ops::wait_for_inputs();

  const uint32_t zp4 = 0x01010101u * (uint32_t)(uint8_t)q.x_zp[0];  // x_zp in each byte

  const int64_t total = q.pixels * (M / VEC);
  for (int64_t idx = blockIdx.x * (int64_t)THREADS + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * THREADS) {
    const int n = (int)(idx % (M / VEC)) * VEC;
    const int64_t p = idx / (M / VEC);
    const int64_t img = p / (OH * OW);
    const int rem = (int)(p - img * (OH * OW));
    const int ih0 = (rem / OW) * SH - PT, iw0 = (rem % OW) * SW - PL;
    const X* xi = q.x + img * (int64_t)(H * W * C);
    int acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0;

#pragma unroll
    for (int word = 0; word < WORDS; ++word) {
      // the 4 taps' VEC channels (padding and taps past the last read x_zp: their weight is
      // 0 past the last tap, and padding's product is folded into the bias)
      Words<VEC / 4> xw[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int t = word * 4 + j, a = t / KW, b = t % KW;
        const int ih = ih0 + a * DH, iw = iw0 + b * DW;
        const bool inside = t < TAPS && ih >= 0 && ih < H && iw >= 0 && iw < W;
        if (inside) {
          xw[j] = *reinterpret_cast<const Words<VEC / 4>*>(xi + ((int64_t)ih * W + iw) * C + n);
        } else {
#pragma unroll
          for (int g = 0; g < VEC / 4; ++g) xw[j].v[g] = zp4;
        }
      }
      const Words<VEC> ww = *reinterpret_cast<const Words<VEC>*>(q.w + ((int64_t)word * M + n) * 4);
#pragma unroll
      for (int g = 0; g < VEC / 4; ++g) {
        uint32_t r[4] = {xw[0].v[g], xw[1].v[g], xw[2].v[g], xw[3].v[g]};
        transpose4(r);
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[g * 4 + c] = dp4a(r[c], ww.v[g * 4 + c], acc[g * 4 + c]);
      }
    }

#pragma unroll
    for (int v = 0; v < VEC; ++v) q.y[p * M + n + v] = finish(q, acc[v], p, n + v, fac[n + v], rr);
  }
}

}  // namespace qc_cu_qconv_4bb0ee388deb_ns

extern "C" int64_t qc_cu_qconv_4bb0ee388deb_workspace_bytes(const int64_t* shapes) {

  return 0;

}

extern "C" int qc_cu_qconv_4bb0ee388deb(void* const* ptrs, const int64_t* shapes, void* workspace,
                            cudaStream_t stream) {
  using namespace qc_cu_qconv_4bb0ee388deb_ns;
  Params q;
  q.x = (const X*)ptrs[0];
  q.w = (const int8_t*)ptrs[1];
  q.x_scale = (const float*)ptrs[2];
  q.x_zp = (const X*)ptrs[3];
  q.w_scale = (const float*)ptrs[4];
  q.bias = (const int32_t*)ptrs[6];
  q.y_scale = (const float*)ptrs[7];
  q.y_zp = (const Y*)ptrs[8];
  q.residual = nullptr;
  q.r_scale = nullptr;
  q.r_zp = nullptr;
  q.y = (Y*)ptrs[9];
  q.splits = 1;
  q.counters = nullptr;
  q.partials = nullptr;
  q.pixels = shapes[0] * (int64_t)(OH * OW);  // x's batch dim: N * OH * OW output pixels
  if (q.pixels == 0) return 0;

  const int64_t n = q.pixels * (M / VEC);
  qc_ops::launch(qconv_direct_kernel, qc_ops::grid_for(n, THREADS), THREADS, 0, stream, q);
  return (int)cudaGetLastError();

}
