// The machine's measured floating-point peak for this ISA's vectors (the line the benchmarks
// compare GEMM throughput with): independent chains of float FMAs, enough to cover the FMA
// latency on every FMA port, on `threads` threads for about `seconds`. Included inside namespace
// performer::cpu::<isa>.
#pragma once

static double seconds_now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

static double fma_peak_gflops(int threads, double seconds) {
  constexpr int kChains = 12;
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    vreg acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = vbroadcast(1e-3f * float(i));
    const vreg x = vbroadcast(0.999999f), y = vbroadcast(1e-7f);
    int64_t iters = 0;
    const double start = seconds_now();
    double elapsed = 0;
    do {
      // Opaque to the compiler, so the chains cannot be evaluated at compile time.
      for (int i = 0; i < kChains; ++i) __asm__ volatile("" : "+x"(acc[i]));
      for (int r = 0; r < 4096; ++r) {
#pragma GCC unroll 12
        for (int i = 0; i < kChains; ++i) acc[i] = vfma(acc[i], x, y);
      }
      iters += 4096;
      elapsed = seconds_now() - start;
    } while (elapsed < seconds);
    for (int i = 0; i < kChains; ++i) __asm__ volatile("" : : "x"(acc[i]));  // the results are used
    total += double(iters) * kChains * 2.0 * kVecFloats / elapsed * 1e-9;
  }
  return total;
}
