// qconv
// qconv, channels-last: x [N, 7, 7, 8] uint8_t codes, y [N, 7, 7, 8]
// uint8_t; kernel 3x3, stride 1x1, pads (top 1, left 1),
// dilation 1x1, 8 group(s). Weights centred on their zero points and the
// bias holding bias - x_zp * sum(w') (cuda-conv-layout), so the sum is over raw codes with
// padding read as x_zp.
// Depthwise, dp4a, a strip per thread: 4 consecutive output pixels of one row and 8
// consecutive channels. The strip's input window (3 rows x 6 columns x 8 channels) is loaded
// into registers once: each column serves up to 3 taps of 4 outputs. Then per word of 4 taps,
// one load of the 8 channels' weight words (stored so, cuda_dw_t4), and per output the 4 taps' words
// transposed in registers (8 byte permutes per 4 channels) into one word per channel for one
// dp4a: 16 products in 12 instructions instead of 48. Each output pixel leaves as one 8-channel store.
// Epilogue: requantize: clamp(rne(f32(acc) * f32(s[m] / y_scale)) + y_zp, 0, 255)
namespace qc_cu_qconv_85c81a59e976_ns {
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

// The epilogue's per-tensor values, read once per thread (not once per output: the compiler
// cannot keep them across the stores): the residual's factor to y's units (out_quant with a
// residual, else unused) and the zero points.
struct Requant { float rr; int32_t y_zp, r_zp; };
__device__ __forceinline__ Requant requant_values(const Params& q) {
  Requant e;

  e.rr = 0.0f;
  e.r_zp = 0;

  e.y_zp = (int32_t)q.y_zp[0];
  return e;
}

// y from a sum with the bias added, the residual's code or value r at that output (unused
// without one) and the channel's factor f. Every float step is one IEEE rounding, as in the
// reference (no contraction into fma).
__device__ __forceinline__ Y requantize(int32_t acc, float r, float f, const Requant& e) {

  const float v0 = __fmul_rn(__int2float_rn(acc), f);

  const float v = v0;

  int32_t code = __float2int_rn(v) + e.y_zp;
  code = code < LO ? LO : (code > HI ? HI : code);
  return (Y)code;

}

// y for output pixel p, channel n, from the raw sum, channel n's bias and factor f.
__device__ __forceinline__ Y finish(const Params& q, int32_t raw, int64_t p, int n, int32_t bias,
                                    float f, const Requant& e) {

  const float r = 0;

  return requantize(raw + bias, r, f, e);
}


constexpr int VEC = 8, PX = 4;
constexpr int THREADS = 256;
constexpr int TAPS = KH * KW, WORDS = (TAPS + 3) / 4;  // weight words per channel
constexpr int COLS = (PX - 1) * SW + (KW - 1) * DW + 1;  // the strip's input columns
constexpr int STRIPS = (OW + PX - 1) / PX;               // strips per output row
constexpr int NV = M / VEC;                              // channel vectors per pixel
static_assert(COLS == 6 && M == C && M % VEC == 0 && VEC % 4 == 0, "depthwise strip");

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

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

// Whether column `col` of the window is a tap of some output of the strip (a stride or a
// dilation above 1 leaves columns no tap reads: they are not loaded).
__host__ __device__ constexpr bool column_used(int col) {
  for (int j = 0; j < PX; ++j)
    for (int b = 0; b < KW; ++b)
      if (j * SW + b * DW == col) return true;
  return false;
}

__global__ void __launch_bounds__(THREADS) qconv_dw_kernel(Params q) {
  // every channel's factor, once per block (scales are constants: before the wait)
  __shared__ float fac[M];
  for (int n = threadIdx.x; n < M; n += THREADS) fac[n] = channel_factor(q, n);
  const Requant e = requant_values(q);
  __syncthreads();
  qc_ops::wait_for_inputs();
  const uint32_t zp4 = 0x01010101u * (uint32_t)(uint8_t)q.x_zp[0];  // x_zp in each byte
  const int64_t total = q.pixels / OW * STRIPS * NV;  // output rows x strips x channel vectors
  for (int64_t idx = blockIdx.x * (int64_t)THREADS + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * THREADS) {
    // channel vectors fastest: a warp's loads of one window column are adjacent channels of
    // neighbouring strips
    const int n = (int)(idx % NV) * VEC;
    const int64_t s = idx / NV;
    const int ow0 = (int)(s % STRIPS) * PX;
    const int64_t row = s / STRIPS;  // image * OH + output row
    const int64_t img = row / OH;
    const int ih0 = (int)(row - img * OH) * SH - PT, iw0 = ow0 * SW - PL;
    const X* xi = q.x + img * (int64_t)(H * W * C) + n;
    // the window; padding reads x_zp (its product is folded into the bias)
    Vec<uint32_t, VEC / 4> win[KH][COLS];
#pragma unroll
    for (int a = 0; a < KH; ++a) {
      const int ih = ih0 + a * DH;
#pragma unroll
      for (int col = 0; col < COLS; ++col) {
        if (!column_used(col)) continue;
        const int iw = iw0 + col;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
          win[a][col] = *reinterpret_cast<const Vec<uint32_t, VEC / 4>*>(xi + ((int64_t)ih * W + iw) * C);
        } else {
#pragma unroll
          for (int g = 0; g < VEC / 4; ++g) win[a][col].v[g] = zp4;
        }
      }
    }
    int acc[PX][VEC];
#pragma unroll
    for (int j = 0; j < PX; ++j)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[j][v] = 0;
#pragma unroll
    for (int word = 0; word < WORDS; ++word) {
      const Vec<uint32_t, VEC> ww = *reinterpret_cast<const Vec<uint32_t, VEC>*>(q.w + ((int64_t)word * M + n) * 4);
#pragma unroll
      for (int j = 0; j < PX; ++j) {
#pragma unroll
        for (int g = 0; g < VEC / 4; ++g) {
          uint32_t r[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {  // tap word * 4 + i of output j (past the last tap: weight 0)
            const int t = word * 4 + i;
            r[i] = t < TAPS ? win[t / KW][j * SW + (t % KW) * DW].v[g] : 0u;
          }
          transpose4(r);
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[j][g * 4 + c] = dp4a(r[c], ww.v[g * 4 + c], acc[j][g * 4 + c]);
        }
      }
    }
    float f[VEC];
    int32_t bias[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      f[v] = fac[n + v];
      bias[v] = q.bias[n + v];
    }
#pragma unroll
    for (int j = 0; j < PX; ++j) {
      if (ow0 + j >= OW) break;
      const int64_t p = row * OW + ow0 + j;

      Vec<Y, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        out.v[v] = requantize(acc[j][v] + bias[v], 0, f[v], e);
      *reinterpret_cast<Vec<Y, VEC>*>(q.y + p * M + n) = out;
    }
  }
}

}  // namespace qc_cu_qconv_85c81a59e976_ns

extern "C" int64_t qc_cu_qconv_85c81a59e976_workspace_bytes(const int64_t* shapes) {

  return 0;

}

extern "C" int qc_cu_qconv_85c81a59e976(void* const* ptrs, const int64_t* shapes, void* workspace,
                            cudaStream_t stream) {
  using namespace qc_cu_qconv_85c81a59e976_ns;
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


  const int64_t n = q.pixels / OW * STRIPS * NV;
  qc_ops::launch(qconv_dw_kernel, qc_ops::grid_for(n, THREADS), THREADS, 0, stream, q);

  return (int)cudaGetLastError();

}
