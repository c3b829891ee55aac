/* The host's vpdpbusd (AVX-512 VNNI) peak: 12 independent zmm accumulator chains, so that
 * the loop is bound by the instruction's throughput, not its latency. Each vpdpbusd is 64
 * u8 x s8 multiply-adds. Used to say how close the int8 convolutions run to the machine
 * (docs/benchmarks.md, 2026-12-07: 229 GMAC/s on a Zen 4 at 3.57 GHz, one a cycle).
 *
 *   gcc -O2 -mavx512f -mavx512bw -mavx512vnni benchmarks/vpdpbusd_peak.c -o /tmp/peak && /tmp/peak
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define STEP(a) a = _mm512_dpbusd_epi32(a, u, s);

int main(void) {
  /* distinct starting values: identical chains would be merged by the compiler */
  __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2),
          a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
          a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7), a8 = _mm512_set1_epi32(8),
          a9 = _mm512_set1_epi32(9), a10 = _mm512_set1_epi32(10), a11 = _mm512_set1_epi32(11);
  __m512i u = _mm512_set1_epi32(3), s = _mm512_set1_epi32(5);
  const long iters = 50000000;
  double t = now();
  for (long i = 0; i < iters; ++i) {
    STEP(a0) STEP(a1) STEP(a2) STEP(a3) STEP(a4) STEP(a5)
    STEP(a6) STEP(a7) STEP(a8) STEP(a9) STEP(a10) STEP(a11)
    __asm__ volatile("" : "+v"(u)); /* keep the loop from being folded */
  }
  t = now() - t;
  __m512i sum = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                 _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)));
  const double per_ns = iters * 12 / t / 1e9;
  printf("vpdpbusd zmm: %.2f per ns, %.1f GMAC/s (checksum %d)\n", per_ns, per_ns * 64,
         _mm512_reduce_add_epi32(sum));
  return 0;
}
