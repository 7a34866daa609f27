// Batched matrix product C = A B on the GEMM core (gemm.h), parallel over jobs: a job is one batch
// entry, one block of columns and one range of rows of C. Included inside namespace
// performer::cpu::<isa>.
//
// Per job, in the classic order: for each kKC-deep slice of K, pack the slice of B (kc x nc) once,
// then for each kMC-row block of A pack it (or read float A in place) and run the macro-kernel.
// float32 output accumulates in place across K slices; bfloat16/float16 output in a float buffer
// over the job's rows (at most kMaxBufferedRows of them), rounded once at the end.
#pragma once

// Packing buffers kept per thread between calls: large buffers freed and faulted in again on
// every call would cost more than the packing itself at small sizes.
struct MatmulWorkspace {
  Scratch<float> a, b, c;
};
static MatmulWorkspace& matmul_workspace() {
  static thread_local MatmulWorkspace ws;
  return ws;
}

static constexpr int64_t kMaxBufferedRows = 4 * kMC;

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
static inline int64_t gcd(int64_t a, int64_t b) { return b == 0 ? a : gcd(b, a % b); }

template <typename T>
static Mat<T> batch_mat(const void* base, const int64_t* stride, int64_t bi) {
  return Mat<T>{static_cast<const T*>(base) + bi * stride[0], stride[1], stride[2]};
}

// C[m0:m1, j0:j0+nc] of batch entry bi.
template <typename T>
static void matmul_job(const MatmulParams& p, int64_t bi, int64_t m0, int64_t m1, int64_t j0, int64_t nc,
                       MatmulWorkspace& ws) {
  const Mat<T> a = batch_mat<T>(p.a, p.a_stride, bi), b = batch_mat<T>(p.b, p.b_stride, bi);
  T* c = static_cast<T*>(p.c) + bi * p.M * p.N;
  const int64_t K = p.K, N = p.N, kc_max = imin(kKC, K);
  float* bpack = ws.b.get(kc_max * round_up(nc, kNR));
  float* apack = ws.a.get(apack_size(imin(kMC, m1 - m0), kc_max));
  auto a_direct = [&](int64_t i0, int64_t k0) -> const float* {
    if constexpr (kIsFloat<T>) return a.p + i0 * a.rs + k0 * a.cs;
    return nullptr;  // never read: prepare_a packs every row of non-float A
  };
  // float32 accumulates in the output itself; 16-bit outputs in a float buffer over the job's
  // rows (bounded by the plan), rounded once at the end.
  float* acc;
  int64_t ldacc;
  if constexpr (kIsFloat<T>) {
    acc = c + m0 * N + j0;
    ldacc = N;
  } else {
    acc = ws.c.get((m1 - m0) * nc);
    ldacc = nc;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = imin(kKC, K - k0);
    pack_b(b, k0, kc, j0, nc, bpack);
    for (int64_t i0 = m0; i0 < m1; i0 += kMC) {
      const int64_t mc = imin(kMC, m1 - i0);
      const int64_t direct_rows = prepare_a(a, i0, mc, k0, kc, nc, apack);
      macro_kernel(mc, nc, kc, a_direct(i0, k0), a.rs, a.cs, direct_rows, apack, bpack, acc + (i0 - m0) * ldacc,
                   ldacc, k0 > 0);
    }
  }
  if constexpr (!kIsFloat<T>) {
    for (int64_t i = m0; i < m1; ++i) {
      T* row = c + i * N + j0;
      const float* src = acc + (i - m0) * nc;
      for (int64_t j = 0; j < nc; ++j) store_float(src[j], row + j);
    }
  }
}

// float64 keeps the plain loops of gemm.h (the reference-precision path), per job.
template <>
void matmul_job<double>(const MatmulParams& p, int64_t bi, int64_t m0, int64_t m1, int64_t j0, int64_t nc,
                        MatmulWorkspace&) {
  const Mat<double> a = batch_mat<double>(p.a, p.a_stride, bi), b = batch_mat<double>(p.b, p.b_stride, bi);
  double* c = static_cast<double*>(p.c) + bi * p.M * p.N;
  GemmScratch<double> unused;
  gemm(m1 - m0, nc, p.K, Mat<double>{a.p + m0 * a.rs, a.rs, a.cs}, Mat<double>{b.p + j0 * b.cs, b.rs, b.cs},
       c + m0 * p.N + j0, p.N, false, unused);
}

// How C is cut into jobs: column blocks of at most kNC (multiples of NR), then, when batch x
// column blocks do not share evenly among the threads, more column blocks or row ranges. Column
// splits are preferred when A is read in place (no thread packs anything twice) or N >= M;
// otherwise rows are split (each thread then packs B's block itself). 16-bit outputs also cap the
// rows of a job (their float accumulation buffer).
struct MatmulPlan {
  int64_t nc, mr, col_blocks, row_blocks, jobs;
};

template <typename T>
static MatmulPlan plan_matmul(const MatmulParams& p) {
  const int64_t threads = imax(1, p.num_threads);
  int64_t nparts = ceil_div(p.N, kNC), mparts = 1;
  const int64_t base = p.batch * nparts;
  if (base % threads != 0 && base < 8 * threads) {
    const int64_t factor = threads / gcd(base, threads);
    const int64_t panels = ceil_div(p.N, kNR), row_panels = ceil_div(p.M, kMR);
    const bool a_direct = reads_a_in_place(batch_mat<T>(p.a, p.a_stride, 0), ceil_div(p.N, nparts * factor));
    const bool prefer_cols = a_direct || p.N >= p.M;
    if ((prefer_cols || row_panels < factor) && panels >= nparts * factor) nparts *= factor;
    else mparts = imin(factor, row_panels);
  }
  if constexpr (!kIsFloat<T>) {
    const int64_t needed = ceil_div(p.M, kMaxBufferedRows);
    if (needed > mparts) {  // a multiple of what shares evenly, as above
      const int64_t even = threads / gcd(p.batch * nparts, threads);
      mparts = imin(round_up(needed, even), ceil_div(p.M, kMR));
    }
  }
  MatmulPlan plan{};
  plan.nc = round_up(ceil_div(p.N, nparts), kNR);
  plan.mr = round_up(ceil_div(p.M, mparts), kMR);
  plan.col_blocks = ceil_div(p.N, plan.nc);
  plan.row_blocks = ceil_div(p.M, plan.mr);
  plan.jobs = p.batch * plan.col_blocks * plan.row_blocks;
  return plan;
}

template <typename T>
static void matmul_typed(const MatmulParams& p) {
  const MatmulPlan plan = plan_matmul<T>(p);
  auto run = [&](int64_t job) {
    const int64_t ib = job % plan.row_blocks, jb = (job / plan.row_blocks) % plan.col_blocks,
                  bi = job / (plan.row_blocks * plan.col_blocks);
    const int64_t m0 = ib * plan.mr, j0 = jb * plan.nc;
    matmul_job<T>(p, bi, m0, imin(p.M, m0 + plan.mr), j0, imin(plan.nc, p.N - j0), matmul_workspace());
  };
  if (plan.jobs == 1 || p.num_threads <= 1) {
    for (int64_t job = 0; job < plan.jobs; ++job) run(job);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(p.num_threads)
  for (int64_t job = 0; job < plan.jobs; ++job) run(job);
}

// C = A B for the shapes and strides in p; M, N, K, batch >= 1 (the driver handles empty cases).
static void matmul(const MatmulParams& p) {
  switch (p.dtype) {
    case DType::f32: matmul_typed<float>(p); break;
    case DType::f64: matmul_typed<double>(p); break;
    case DType::bf16: matmul_typed<bf16_t>(p); break;
    case DType::f16: matmul_typed<f16_t>(p); break;
  }
}
