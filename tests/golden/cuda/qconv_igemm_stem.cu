// qconv
// qconv, channels-last: x [N, 30, 30, 4] uint8_t codes, y [N, 15, 15, 64]
// uint8_t; kernel 7x7, stride 2x2, pads (top 3, left 3),
// dilation 1x1, 1 group(s). Weights centred on their zero points and the
// bias holding bias - x_zp * sum(w') (cuda-conv-layout), so the sum is over raw codes with
// padding read as x_zp.
// Implicit GEMM on int8 tensor cores: rows are output pixels, columns output channels,
// K = (kh, row slot, c) (224, padded to 224); mma.sync m16n8k32 u8 x s8 -> s32,
// block tiles 256 x 64 over 8 warps (4 x 2), 64 x 64 over 4 warps (2 x 2),
// a 3-stage cp.async ring of 64-byte K steps, fragments by ldmatrix; the tile and a K split
// chosen per call by the pixel count. A rows load a window row as pairs of 4-channel pixels (8 bytes; cuda_igemm_rows: K = (kh, 8 slots, c), the taps from slot 1).
// Epilogue: requantize: clamp(rne(f32(acc) * f32(s[m] / y_scale)) + y_zp, 110, 255)
namespace qc_cu_qconv_2a8811eca5dc_ns {
using X = uint8_t;
using Y = uint8_t;
constexpr int H = 30, W = 30, C = 4, OH = 15, OW = 15, M = 64;
constexpr int KH = 7, KW = 7, SH = 2, SW = 2, PT = 3, PL = 3;
constexpr int DH = 1, DW = 1;
constexpr int LO = 110, HI = 255;  // output code bounds (activation clip included)

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


constexpr int BK = 64, STAGES = 3;
constexpr int KP = 224;                    // padded K (a multiple of 32)
constexpr int K_REAL = 224;
constexpr int LD = BK + 16;                     // smem row pitch in bytes (conflict-free reads)
constexpr int KSTEPS = (KP + BK - 1) / BK;
// Split-K where the tiles alone leave most SMs idle (one image's last layers): into at most
// 32 parts of at least 3 K steps, to about 132 blocks.
constexpr int SPLIT_TARGET_BLOCKS = 132, SPLIT_MIN_STEPS = 3;
constexpr int MAX_SPLITS = 32;

// The residual at output pixel p, channels n and n + 1 (n even): one 2-byte load of codes
// where M is even (the pair is then aligned), else two.
__device__ __forceinline__ void residual_pair(const Params& q, int64_t p, int n,
                                              float& r0, float& r1) {

  r0 = r1 = 0;

}

// A block tile of BM pixels x BN channels over WM x WN warps.
template <int BM_, int BN_, int WM_, int WN_> struct Tile {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_;
  static constexpr int THREADS = WM * WN * 32;
  static constexpr int WTM = BM / WM, WTN = BN / WN;     // a warp's tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;      // mma tiles per warp (NI even: ldmatrix pairs)
  static constexpr int A_CHUNKS = BM * BK / 16 / THREADS;  // 16-byte chunks per thread, stage
  static constexpr int B_CHUNKS = BN * BK / 16 / THREADS;
  // ring slots: no more than the K steps (a 1 x 1 layer of K <= 64 has one: a third of the
  // shared memory, so more blocks an SM to overlap their latencies)
  static constexpr int SLOTS = STAGES < KSTEPS ? STAGES : KSTEPS;
  static constexpr int SMEM = SLOTS * (BM + BN) * LD;
  static_assert(NI % 2 == 0 && A_CHUNKS * THREADS * 16 == BM * BK &&
                B_CHUNKS * THREADS * 16 == BN * BK, "tile shape");
  static_assert(SMEM >= BM * (BN + 16), "the epilogue's code tile fits in the ring");
};

// The 4- and 8-byte asynchronous copies (16-byte ones: qc_ops::cp_async16) and the MMA.
// QC_HOST_EMULATION (tests/cuda_host/emulator/emulator.h) runs this source on the host, a
// CTA's threads as fibers: a copy is then immediate and the MMA is computed for the whole
// warp from its 32 lanes' fragments.
#ifndef QC_HOST_EMULATION
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
}

// Four 8 x 16-byte matrices of shared memory into a warp's registers: lane l gives the
// address of row l % 8 of matrix l / 8 and receives 4 bytes of row l / 4 of each.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const uint8_t* p) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
inline void cp_async4(void* smem, const void* gmem) { std::memcpy(smem, gmem, 4); }
inline void cp_async8(void* smem, const void* gmem) { std::memcpy(smem, gmem, 8); }
inline void ldsm_x4(unsigned (&r)[4], const uint8_t* p) { qc_emu::ldmatrix_x4(r, p); }
inline void mma_s8(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  qc_emu::mma_m16n8k32(d, a, b, true);
}
#endif

// Where one A row (output pixel) reads: its image's base, the window's top-left corner, the
// offset of that corner in x (outside the image where the padding is: only ever added to an
// inside tap's offset), and which of the kernel's taps fall inside the image (bit t: tap t),
// so that a K step tests one bit instead of four bounds.
constexpr bool TAP_MASK = false && KH * KW <= 64;
struct RowOrigin { int64_t base, at; uint64_t inside; int ih0, iw0; bool valid; };
__device__ __forceinline__ RowOrigin row_origin(int64_t p, int64_t pixels) {
  RowOrigin o;
  o.valid = p < pixels;
  const int64_t pp = o.valid ? p : 0;
  const int64_t img = pp / (OH * OW);
  const int rem = (int)(pp - img * (OH * OW));
  o.ih0 = (rem / OW) * SH - PT;
  o.iw0 = (rem % OW) * SW - PL;
  o.base = img * (int64_t)(H * W * C);
  o.at = o.base + ((int64_t)o.ih0 * W + o.iw0) * C;
  o.inside = 0;
  if (TAP_MASK && o.valid) {
#pragma unroll
    for (int tap = 0; tap < (TAP_MASK ? KH * KW : 1); ++tap) {
      const int ih = o.ih0 + (tap / KW) * DH, iw = o.iw0 + (tap % KW) * DW;
      if (ih >= 0 && ih < H && iw >= 0 && iw < W) o.inside |= 1ull << tap;
    }
  }
  return o;
}

// Whether tap `tap` of row o (for K index k) reads inside the image, and where in x
// relative to o.at it reads channel ch of it.
__device__ __forceinline__ bool tap_inside(const RowOrigin& o, int k, int tap) {
  if (TAP_MASK) return k < K_REAL && ((o.inside >> (k < K_REAL ? tap : 0)) & 1);
  const int ih = o.ih0 + (tap / KW) * DH, iw = o.iw0 + (tap % KW) * DW;
  return o.valid && k < K_REAL && ih >= 0 && ih < H && iw >= 0 && iw < W;
}
__device__ __forceinline__ int64_t tap_offset(int tap, int ch) {
  return ((int64_t)(tap / KW) * DH * W + (tap % KW) * DW) * C + ch;
}

// Stage `k0`'s A tile (activations) into one ring slot.
template <typename T>
__device__ __forceinline__ void load_a(const Params& q, uint8_t* sa, int k0,
                                       const RowOrigin (&rows)[T::A_CHUNKS], uint32_t zp4) {
  const int tid = threadIdx.x;
  static_assert(T::THREADS % (BK / 16) == 0, "a thread's A chunks share their K column");
  const int kc = tid % (BK / 16), k = k0 + kc * 16;
#pragma unroll
  for (int i = 0; i < T::A_CHUNKS; ++i) {
    const int r = (tid + i * T::THREADS) / (BK / 16);
    uint8_t* dst = sa + r * LD + kc * 16;

    // 4 slots of one kernel row: two pairs of pixels, 8 bytes each. The window row starts
    // LEAD slots early, at an even pixel (the stride and the width are even), so each pair
    // is 8-byte aligned and wholly inside or outside the image.
    static_assert(C == 4 && W % 2 == 0 && SW % 2 == 0 && DW == 1, "pairs of 4-byte pixels");
    constexpr int ROW_SLOTS = 8, LEAD = 1;
    const int kh = k / (ROW_SLOTS * C), slot = (k - kh * ROW_SLOTS * C) / C;
    const int ih = rows[i].ih0 + kh * DH;
    const bool row_in = rows[i].valid && k < K_REAL && ih >= 0 && ih < H;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int iw = rows[i].iw0 - LEAD + slot + 2 * j;
      if (row_in && iw >= 0 && iw < W)
        cp_async8(dst + 8 * j, q.x + rows[i].base + ((int64_t)ih * W + iw) * C);
      else  // padding (its product is folded into the bias; slots past a row's taps weigh 0)
        *reinterpret_cast<uint2*>(dst + 8 * j) = make_uint2(zp4, zp4);
    }

  }
}

// Stage `k0`'s B tile (the constant weights) into one ring slot.
template <typename T>
__device__ __forceinline__ void load_b(const Params& q, uint8_t* sb, int k0, int n0) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < T::B_CHUNKS; ++i) {
    const int chunk = tid + i * T::THREADS, r = chunk / (BK / 16), kc = chunk % (BK / 16);
    const int k = k0 + kc * 16, n = n0 + r;
    const bool valid = n < M && k < KP;
    qc_ops::cp_async16(sb + r * LD + kc * 16, q.w + (valid ? (int64_t)n * KP + k : 0), valid);
  }
}

template <typename T>
__global__ void __launch_bounds__(T::THREADS) qconv_igemm_kernel(Params q) {
  constexpr int BM = T::BM, BN = T::BN, WTM = T::WTM, WTN = T::WTN, MI = T::MI, NI = T::NI;
  constexpr int THREADS = T::THREADS;
  constexpr int A_CHUNKS = T::A_CHUNKS;
#ifndef QC_HOST_EMULATION
  extern __shared__ __align__(16) uint8_t smem[];
#else
  uint8_t* smem = qc_emu::shared;
#endif
  uint8_t* sa = smem;
  uint8_t* sb = smem + T::SLOTS * BM * LD;  // (a step's slot is step % STAGES < SLOTS)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / T::WN, wn = warp % T::WN, g = lane >> 2, t = lane & 3;
  const int64_t p0 = (int64_t)blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  // this block's K steps: part blockIdx.z of q.splits
  const int per_split = (KSTEPS + q.splits - 1) / q.splits;
  const int k_first = blockIdx.z * per_split;
  const int nsteps = min(KSTEPS, k_first + per_split) - k_first;
  RowOrigin rows[A_CHUNKS];
#pragma unroll
  for (int i = 0; i < A_CHUNKS; ++i)
    rows[i] = row_origin(p0 + (tid + i * THREADS) / (BK / 16), q.pixels);
  const uint32_t zp4 = 0x01010101u * (uint32_t)(uint8_t)q.x_zp[0];

  int acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // The block's channel factors and biases (constants): computed while the first loads fly.
  __shared__ float block_fac[BN];
  __shared__ int32_t block_bias[BN];
  for (int c = tid; c < BN; c += THREADS) {
    const int n = n0 + c;
    block_fac[c] = n < M ? channel_factor(q, n) : 0.0f;
    block_bias[c] = n < M ? q.bias[n] : 0;
  }

  // The first stages' weights are constants: fetched while the previous kernel finishes
  // (programmatic dependent launch), before the wait for x. They join stage 0's copy group.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < nsteps) load_b<T>(q, sb + s * BN * LD, (k_first + s) * BK, n0);
  qc_ops::wait_for_inputs();  // x ready from here on
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nsteps) load_a<T>(q, sa + s * BM * LD, (k_first + s) * BK, rows, zp4);
    qc_ops::cp_async_commit();
  }
  for (int ks = 0; ks < nsteps; ++ks) {
    qc_ops::cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage ks is in shared memory; slot (ks - 1) % STAGES is free again
    const int next = ks + STAGES - 1;
    if (next < nsteps) {
      load_a<T>(q, sa + (next % STAGES) * BM * LD, (k_first + next) * BK, rows, zp4);
      load_b<T>(q, sb + (next % STAGES) * BN * LD, (k_first + next) * BK, n0);
    }
    qc_ops::cp_async_commit();
    const uint8_t* A = sa + (ks % STAGES) * BM * LD + wm * WTM * LD;
    const uint8_t* B = sb + (ks % STAGES) * BN * LD + wn * WTN * LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 32) {
      if (KP % BK != 0 && (k_first + ks) * BK + kk >= KP) break;  // the last step's padding
      // A fragment i: matrices (rows 0-7 | 8-15) x (bytes 0-15 | 16-31) = a0, a1, a2, a3.
      // B fragments j, j + 1: (n rows of j | of j + 1) x (bytes 0-15 | 16-31) = b0, b1 each.
      unsigned af[MI][4], bf[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i)
        ldsm_x4(af[i], A + (i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk
                           + (lane >> 4) * 16);
#pragma unroll
      for (int j = 0; j < NI; j += 2) {
        unsigned r[4];
        ldsm_x4(r, B + ((j + (lane >> 4)) * 8 + (lane & 7)) * LD + kk + ((lane >> 3) & 1) * 16);
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_s8(acc[i][j], af[i], bf[j]);
    }
  }
  qc_ops::cp_async_wait<0>();

  if (q.splits > 1) {
    // Each part adds its sums into the tile's accumulator in the workspace (atomic adds in
    // L2, a thread's THREADS apart: coalesced); the tile's last block to arrive reads the
    // total, leaves the accumulator zero for the next call, and runs the epilogue. Integer
    // sums: the result does not depend on the order.
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    int32_t* sum = q.partials + (int64_t)tile * (BM * BN);
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) atomicAdd(sum + ((i * NI + j) * 4 + e) * THREADS + tid, acc[i][j][e]);
    __threadfence();
    __syncthreads();  // (also: every warp is past its last MMA, the ring is free)
    int* last = reinterpret_cast<int*>(smem);
    if (tid == 0) *last = atomicAdd(q.counters + tile, 1) == q.splits - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int32_t* at = sum + ((i * NI + j) * 4 + e) * THREADS + tid;
          acc[i][j][e] = __ldcg(at);
          __stcg(at, 0);
        }
    if (tid == 0) q.counters[tile] = 0;  // the workspace's counters stay zero between calls
  }

  // c0, c1: row g, columns 2t, 2t + 1; c2, c3: row g + 8. A thread's 2 * NI columns are the
  // same for every row: their factors first (the main loop's barriers ordered their writes).
  float fac[NI][2];
  int32_t bias[NI][2];
#pragma unroll
  for (int j = 0; j < NI; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      fac[j][c] = block_fac[wn * WTN + j * 8 + t * 2 + c];
      bias[j][c] = block_bias[wn * WTN + j * 8 + t * 2 + c];
    }
  const Requant e = requant_values(q);

  // Codes go through shared memory (the ring is free once every warp is past its last MMA)
  // so that each pixel's BN channels leave as 16-byte stores.
  constexpr int TP = BN + 16;  // the tile's pitch in bytes
  __syncthreads();
  uint8_t* tile = smem;
#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = wm * WTM + i * 16 + g + half * 8;
      const int64_t p = p0 + r;
      if (p >= q.pixels) continue;
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const int c = wn * WTN + j * 8 + t * 2, n = n0 + c;
        if (M % 2 == 0 && (M % BN == 0 || n < M)) {
          // both columns (M even: n + 1 < M too; M a multiple of BN: no test at all), one
          // residual load and one 2-byte store for the pair
          float r0, r1;
          residual_pair(q, p, n, r0, r1);
          const uint32_t lo = (uint8_t)requantize(acc[i][j][half * 2] + bias[j][0], r0, fac[j][0], e);
          const uint32_t hi = (uint8_t)requantize(acc[i][j][half * 2 + 1] + bias[j][1], r1, fac[j][1], e);
          *reinterpret_cast<uint16_t*>(tile + r * TP + c) = (uint16_t)(lo | hi << 8);
        } else {
          if (n < M) tile[r * TP + c] = (uint8_t)finish(q, acc[i][j][half * 2], p, n, bias[j][0], fac[j][0], e);
          if (n + 1 < M)
            tile[r * TP + c + 1] = (uint8_t)finish(q, acc[i][j][half * 2 + 1], p, n + 1, bias[j][1], fac[j][1], e);
        }
      }
    }
  }
  __syncthreads();
  for (int chunk = tid; chunk < BM * (BN / 16); chunk += THREADS) {
    const int r = chunk / (BN / 16), c = (chunk % (BN / 16)) * 16;
    const int64_t p = p0 + r;
    const int n = n0 + c;
    if (p >= q.pixels || n >= M) continue;
    if (M % 16 == 0) {  // (then n + 16 <= M, and y's rows are 16-byte aligned)
      *reinterpret_cast<uint4*>(q.y + p * M + n) = *reinterpret_cast<const uint4*>(tile + r * TP + c);
    } else {
      for (int e = 0; e < 16 && n + e < M; ++e) q.y[p * M + n + e] = (Y)tile[r * TP + c + e];
    }
  }

}

// The tiles this layer can take, and how a call of `pixels` output pixels runs: its tile
// (the first whose least pixel count it reaches), grid and K split.

using Tile0 = Tile<256, 64, 4, 2>;  // from 16896 pixels
using Tile1 = Tile<64, 64, 2, 2>;  // from 0 pixels
struct LaunchPlan { int tile, bm, bn; int64_t tiles_x, tiles_y; int splits; int64_t counter_bytes; };

inline LaunchPlan launch_plan(int64_t pixels) {
  LaunchPlan p;
  if (pixels >= 16896) { p.tile = 0; p.bm = 256; p.bn = 64; } else
  { p.tile = 1; p.bm = 64; p.bn = 64; }
  const int bm = p.bm, bn = p.bn;
  p.tiles_x = (pixels + bm - 1) / bm;
  p.tiles_y = (M + bn - 1) / bn;
  const int64_t tiles = p.tiles_x * p.tiles_y;
  p.splits = 1;
  if (tiles * 2 <= SPLIT_TARGET_BLOCKS) {
    int64_t s = SPLIT_TARGET_BLOCKS / tiles;
    s = s < KSTEPS / SPLIT_MIN_STEPS ? s : KSTEPS / SPLIT_MIN_STEPS;
    s = s < MAX_SPLITS ? s : MAX_SPLITS;
    if (s >= 2) {
      const int64_t per = (KSTEPS + s - 1) / s;
      p.splits = (int)((KSTEPS + per - 1) / per);  // no empty part
    }
  }
  p.counter_bytes = p.splits > 1 ? (tiles * 4 + 255) / 256 * 256 : 0;
  return p;
}

inline int64_t workspace_bytes(int64_t pixels) {
  const LaunchPlan p = launch_plan(pixels);
  const int64_t tile_elems = (int64_t)p.bm * p.bn;
  return p.splits > 1 ? p.counter_bytes + p.tiles_x * p.tiles_y * tile_elems * 4 : 0;
}

template <typename T> int launch_tile(Params q, const LaunchPlan& p, void* workspace,
                                      cudaStream_t stream) {
  static bool configured = false;  // the attribute is per kernel: set once
  if (!configured) {
    cudaError_t e = cudaFuncSetAttribute(qconv_igemm_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, T::SMEM);
    if (e != cudaSuccess) return (int)e;
    configured = true;
  }
  q.splits = p.splits;
  q.counters = reinterpret_cast<int*>(workspace);
  q.partials = reinterpret_cast<int32_t*>(reinterpret_cast<char*>(workspace) + p.counter_bytes);
  const dim3 grid((unsigned)p.tiles_x, (unsigned)p.tiles_y, (unsigned)p.splits);
  qc_ops::launch(qconv_igemm_kernel<T>, grid, T::THREADS, T::SMEM, stream, q);
  return (int)cudaGetLastError();
}

}  // namespace qc_cu_qconv_2a8811eca5dc_ns

extern "C" int64_t qc_cu_qconv_2a8811eca5dc_workspace_bytes(const int64_t* shapes) {

  return qc_cu_qconv_2a8811eca5dc_ns::workspace_bytes(shapes[0] * (int64_t)(qc_cu_qconv_2a8811eca5dc_ns::OH * qc_cu_qconv_2a8811eca5dc_ns::OW));

}

extern "C" int qc_cu_qconv_2a8811eca5dc(void* const* ptrs, const int64_t* shapes, void* workspace,
                            cudaStream_t stream) {
  using namespace qc_cu_qconv_2a8811eca5dc_ns;
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

  const LaunchPlan plan = launch_plan(q.pixels);
  switch (plan.tile) {
    case 0: return launch_tile<Tile0>(q, plan, workspace, stream);
    default: return launch_tile<Tile1>(q, plan, workspace, stream);
  }

}
