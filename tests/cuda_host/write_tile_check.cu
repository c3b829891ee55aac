// Host check of qc::write_tile (include/qcompiler/splitk.cuh): the end of every CUDA qmatmul
// kernel without split-K, run here for every thread index of a CTA in turn, against a
// scalar model: partial M and N tiles, N not a multiple of 8, y not 16-byte aligned, bias
// and per-channel scales, 1 to 8 elements a thread, and column pairs (write_pair_tile). Built and run by tests/test_cuda_tile.py (nvcc; no GPU needed).
// Prints "ok" and exits 0, or the first mismatch and exits 1.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "qcompiler/splitk.cuh"

namespace {

struct NoEpilogue {
  static constexpr bool FUSED = false, PAIRS = false;
  static constexpr int EXTRAS = 0;
};

// A fused epilogue (fuse-epilogue's residual add): element i of y plus extras[0][i].
struct ResidualAdd {
  static constexpr bool FUSED = true, PAIRS = false;
  static constexpr int EXTRAS = 1;
  static __host__ __device__ half apply(half v, const void* const* extras, long long i) {
    return __float2half_rn(__half2float(v) + __half2float(static_cast<const half*>(extras[0])[i]));
  }
};

// fuse-gate-up's SwiGLU on a column pair, host and device here (the generated one is device).
struct SwigluPairs {
  static constexpr bool FUSED = true, PAIRS = true;
  static constexpr int EXTRAS = 0;
  static __host__ __device__ half apply_pair(half a, half b) {
    const float x = __half2float(a);
    return __float2half_rn(x / (1.0f + std::exp(-x)) * __half2float(b));
  }
};

template <int N_, bool SCALE_IN_EPILOGUE_, class Epilogue_ = NoEpilogue>
struct Config {
  typedef half scalar_t;
  static constexpr int N = N_;
  static constexpr bool SCALE_IN_EPILOGUE = SCALE_IN_EPILOGUE_;
  using Epilogue = Epilogue_;
};

uint16_t bits(half v) { uint16_t b; std::memcpy(&b, &v, 2); return b; }

// One CTA tile (m0, n0) of an M x N product written by THREADS threads; 0 on success.
template <int N, bool SCALE, int M_TILE, int N_TILE, int THREADS, bool RESIDUAL = false>
int check(int M, int m0, int n0, bool bias, int y_offset, std::mt19937& rng) {
  using C = Config<N, SCALE, typename std::conditional<RESIDUAL, ResidualAdd, NoEpilogue>::type>;
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  std::vector<float> sums(M_TILE * N_TILE), bias_v(N);
  std::vector<half> scales(N), y(M * N + 16);
  for (float& v : sums) v = u(rng);
  for (float& v : bias_v) v = u(rng);
  for (half& v : scales) v = __float2half_rn(u(rng));
  std::vector<half> residual(M * N);
  for (half& v : residual) v = __float2half_rn(u(rng));
  const half sentinel = __float2half_rn(12345.0f);
  for (half& v : y) v = sentinel;
  qc::Params<half> p{};
  p.y = y.data() + y_offset;
  p.scales = scales.data();
  p.bias = bias ? bias_v.data() : nullptr;
  p.M = M;
  p.split_k = 1;
  p.epilogue = RESIDUAL;
  p.extras[0] = residual.data();
  auto tile_sum = [&](int i) { return sums[i]; };
  for (int tid = 0; tid < THREADS; ++tid)
    qc::write_tile<C, M_TILE, N_TILE, THREADS>(p, m0, n0, tid, tile_sum);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      const bool in_tile = m >= m0 && m < m0 + M_TILE && n >= n0 && n < n0 + N_TILE;
      half want = sentinel;
      if (in_tile) {
        float v = sums[(m - m0) * N_TILE + (n - n0)];
        if (SCALE) v *= __half2float(scales[n]);
        if (bias) v += bias_v[n];
        want = __float2half_rn(v);
        if (RESIDUAL) want = ResidualAdd::apply(want, p.extras, (long long)m * N + n);
      }
      const half got = y[y_offset + (long long)m * N + n];
      if (bits(got) != bits(want)) {
        std::printf("mismatch: N=%d M=%d tile %dx%d at (%d, %d), y offset %d, bias %d: "
                    "y[%d, %d] = %g, want %g\n", N, M, M_TILE, N_TILE, m0, n0, y_offset,
                    (int)bias, m, n, __half2float(got), __half2float(want));
        return 1;
      }
    }
  for (int i = 0; i < y_offset; ++i)
    if (bits(y[i]) != bits(sentinel)) { std::printf("wrote before y\n"); return 1; }
  for (size_t i = y_offset + (size_t)M * N; i < y.size(); ++i)
    if (bits(y[i]) != bits(sentinel)) { std::printf("wrote past y\n"); return 1; }
  return 0;
}

// As check, with column pairs: y has N / 2 columns, column j from sums 2j and 2j + 1.
template <int N, bool SCALE, int M_TILE, int N_TILE, int THREADS>
int check_pairs(int M, int m0, int n0, bool bias, int y_offset, std::mt19937& rng) {
  using C = Config<N, SCALE, SwigluPairs>;
  constexpr int NY = N / 2;
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  std::vector<float> sums(M_TILE * N_TILE), bias_v(N);
  std::vector<half> scales(N), y(M * NY + 16);
  for (float& v : sums) v = u(rng);
  for (float& v : bias_v) v = u(rng);
  for (half& v : scales) v = __float2half_rn(u(rng));
  const half sentinel = __float2half_rn(12345.0f);
  for (half& v : y) v = sentinel;
  qc::Params<half> p{};
  p.y = y.data() + y_offset;
  p.scales = scales.data();
  p.bias = bias ? bias_v.data() : nullptr;
  p.M = M;
  p.split_k = 1;
  p.epilogue = true;
  auto tile_sum = [&](int i) { return sums[i]; };
  for (int tid = 0; tid < THREADS; ++tid)
    qc::write_pair_tile<C, M_TILE, N_TILE, THREADS>(p, m0, n0, tid, tile_sum);
  auto product = [&](int n, float v) {
    if (SCALE) v *= __half2float(scales[n]);
    if (bias) v += bias_v[n];
    return __float2half_rn(v);
  };
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NY; ++j) {
      const bool in_tile = m >= m0 && m < m0 + M_TILE && 2 * j >= n0 && 2 * j < n0 + N_TILE;
      half want = sentinel;
      if (in_tile) {
        const int i = (m - m0) * N_TILE + (2 * j - n0);
        want = SwigluPairs::apply_pair(product(2 * j, sums[i]), product(2 * j + 1, sums[i + 1]));
      }
      const half got = y[y_offset + (long long)m * NY + j];
      if (bits(got) != bits(want)) {
        std::printf("pair mismatch: N=%d M=%d tile %dx%d at (%d, %d), y offset %d: y[%d, %d] = "
                    "%g, want %g\n", N, M, M_TILE, N_TILE, m0, n0, y_offset, m, j,
                    __half2float(got), __half2float(want));
        return 1;
      }
    }
  for (int i = 0; i < y_offset; ++i)
    if (bits(y[i]) != bits(sentinel)) { std::printf("pairs: wrote before y\n"); return 1; }
  for (size_t i = y_offset + (size_t)M * NY; i < y.size(); ++i)
    if (bits(y[i]) != bits(sentinel)) { std::printf("pairs: wrote past y\n"); return 1; }
  return 0;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  int bad = 0;
  for (int bias = 0; bias < 2; ++bias)
    for (int y_offset : {0, 1}) {       // 1: y not 16-byte aligned (element stores)
      // N a multiple of 8, whole and partial tiles (M 100: rows past M; N 200: columns past N)
      bad |= check<256, false, 64, 64, 128>(100, 64, 192, bias, y_offset, rng);
      bad |= check<256, true, 64, 64, 128>(100, 0, 64, bias, y_offset, rng);
      bad |= check<200, false, 128, 64, 128>(100, 0, 192, bias, y_offset, rng);
      bad |= check<200, true, 256, 128, 256>(300, 256, 128, bias, y_offset, rng);
      // N not a multiple of 8 (element stores), a partial last tile
      bad |= check<130, false, 64, 64, 128>(70, 64, 128, bias, y_offset, rng);
      bad |= check<130, true, 256, 128, 256>(256, 0, 0, bias, y_offset, rng);
      // Fewer elements a thread: the GEMV kernel's 8 x 64 tile over 512 threads (one each),
      // 16 x 128 over 512 (4 each), 8 x 64 over 256 (2 each)
      bad |= check<200, false, 8, 64, 512>(3, 0, 192, bias, y_offset, rng);
      bad |= check<256, true, 16, 128, 512>(16, 0, 128, bias, y_offset, rng);
      bad |= check<130, false, 8, 64, 256>(9, 8, 128, bias, y_offset, rng);
      // A fused epilogue reading an extra operand at y's element index
      bad |= check<200, false, 128, 64, 128, true>(100, 0, 192, bias, y_offset, rng);
      bad |= check<130, true, 8, 64, 512, true>(3, 0, 64, bias, y_offset, rng);
      // Column pairs (fuse-gate-up): y's width a multiple of 8 or not, partial tiles
      bad |= check_pairs<512, false, 128, 64, 128>(100, 0, 448, bias, y_offset, rng);
      bad |= check_pairs<260, true, 256, 128, 256>(300, 256, 256, bias, y_offset, rng);
      bad |= check_pairs<260, false, 8, 64, 512>(5, 0, 256, bias, y_offset, rng);
    }
  if (bad) return 1;
  std::printf("ok\n");
  return 0;
}
