// blocked_matmul for the CUDA dispatch key: c[b] = a[b] @ b[b] for canonical a (B, M, K), b (B, K, N),
// c (B, M, N) contiguous in the input dtype.
//
// float16 / bfloat16: tensor cores (mma.sync m16n8k16, fp32 accumulation; sm_80 and newer).
//   Block tile 128 x 128 x 32, 256 threads = 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4
//   mma tiles. A 4-stage cp.async pipeline (16-byte copies; src-size clipped at the matrix edges,
//   the rest zero-filled) feeds shared memory, 80 KiB at most. Each operand tile keeps the
//   operand's contiguous dimension innermost in shared memory, rows padded by 16 bytes so that
//   the ldmatrix reads (.trans for an m- or n-contiguous tile) are bank-conflict free.
//   Operand layouts, read in place: A row-major (k contiguous) or column-major (m contiguous), B
//   row-major (n contiguous) or column-major (k contiguous): 4 kernels per dtype. In place needs
//   16-byte aligned rows: base pointer, the other matrix stride and the batch stride multiples of
//   16 bytes. Otherwise (odd strides, or neither matrix stride 1) the driver copies the operand into
//   a buffer whose rows are padded to a multiple of 8 elements (aligned_copy; a broadcast batch is
//   copied once).
// float32 / float64: SIMT, FMA in the input dtype (no TF32; setup.py's --use_fast_math flushes
//   float32 denormals). Block tile 128 x 128 x 8 with 8 x 8 outputs per thread (float32) or
//   64 x 64 x 8 with 4 x 4 (float64), 256 threads; a 3-stage pipeline of element-sized cp.async
//   copies, so any strides are read in place (the copies follow the operand's unit-stride
//   dimension, coalesced); tiles are stored k-major in shared memory and read as 16-byte vectors.
// Batches run on grid z with the operands' batch strides (0 = broadcast); grids larger than the
// hardware limits of y and z are split over several launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../checks.h"

namespace performer::cuda {
namespace {

// Everything a kernel reads: operands by element strides (a size-1 dimension has stride 0).
struct GemmArgs {
  const void* a;
  const void* b;
  void* c;                      // (B, M, N) contiguous
  int M, N, K;
  int64_t a_sb, a_sm, a_sk;     // a: batch, row (m), column (k)
  int64_t b_sb, b_sk, b_sn;     // b: batch, row (k), column (n)
  bool a_k_fast, b_k_fast;      // SIMT loaders: consecutive threads step along k (else along m / n)
  int64_t batch0;               // batch of blockIdx.z == 0
  int m_tile0;                  // M tile of blockIdx.y == 0
};

// ---- PTX wrappers -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies `src_bytes` (0..BYTES) from global memory to shared memory and zero-fills the rest of the
// BYTES; src must be valid (and BYTES-aligned) even when src_bytes == 0.
template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src, int src_bytes) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (BYTES == 16) {  // .cg: 16-byte copies may bypass L1
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(__cvta_generic_to_global(src)), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst),
                 "l"(__cvta_generic_to_global(src)), "n"(BYTES), "r"(src_bytes) : "memory");
  }
#else  // before sm_80 (only the SIMT kernels run there): a synchronous copy of the element
  static_assert(BYTES != 16, "the tensor-core kernel needs sm_80");
  if constexpr (BYTES == 4) {
    const uint32_t w = src_bytes ? *static_cast<const uint32_t*>(src) : 0u;
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dst), "r"(w) : "memory");
  } else {
    const uint64_t w = src_bytes ? *static_cast<const uint64_t*>(src) : 0ull;
    asm volatile("st.shared.b64 [%0], %1;\n" ::"r"(dst), "l"(w) : "memory");
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8, and receives in
// r[i] row l / 4, columns 2 (l % 4) + {0, 1} of matrix i (TRANS: column l / 4, rows 2 (l % 4) + {0, 1}).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
  }
#endif
}

// d (16 x 8, fp32) += a (16 x 16) b (16 x 8). Fragments (g = lane / 4, t = lane % 4), each register
// two elements, lower index in the low half: a[0] = A[g][2t..], a[1] = A[g + 8][2t..],
// a[2] = A[g][2t + 8..], a[3] = A[g + 8][2t + 8..]; b[0] = B[2t..][g], b[1] = B[2t + 8..][g];
// d[0..1] = D[g][2t..], d[2..3] = D[g + 8][2t..].
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (BF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

template <bool BF16>
struct Half16;  // the 16-bit float type and its conversions from fp32 (round to nearest even)
template <>
struct Half16<false> {
  using T = __half;
  using T2 = __half2;
  static __device__ __forceinline__ T from(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ T2 from2(float x, float y) { return __floats2half2_rn(x, y); }
};
template <>
struct Half16<true> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ T from(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ T2 from2(float x, float y) { return __floats2bfloat162_rn(x, y); }
};

// ---- tensor-core kernel (float16 / bfloat16) ----------------------------------------------------

struct MmaConfig {
  static constexpr int BM = 128, BN = 128, BK = 32;            // block tile
  static constexpr int WARPS_M = 2, WARPS_N = 4;               // 8 warps
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;   // warp tile 64 x 32
  static constexpr int MT = WM / 16, NT = WN / 8;              // 4 x 4 mma tiles (16 x 8) per warp
  static constexpr int STAGES = 4;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int PAD = 8;                                // elements (16 bytes) after each smem row
};

// One operand tile in shared memory, for the operand X = A (outer dimension m, BX = BM) or B
// (outer n, BX = BN). K_INNER: k contiguous, tile [BX][BK + PAD]; else outer contiguous, tile
// [BK][BX + PAD]. The loader copies it in 16-byte chunks (8 elements along the contiguous
// dimension), CHUNKS / THREADS per thread, consecutive threads on consecutive chunks of a row.
template <int BX, bool K_INNER>
struct MmaOperand {
  using C = MmaConfig;
  static constexpr int ROWS = K_INNER ? BX : C::BK, COLS = K_INNER ? C::BK : BX;
  static constexpr int LD = COLS + C::PAD;            // elements per smem row
  static constexpr int STAGE_BYTES = ROWS * LD * 2;
  static constexpr int CHUNKS_PER_ROW = COLS / 8;
  static constexpr int PER_THREAD = ROWS * CHUNKS_PER_ROW / C::THREADS;
  static_assert(ROWS * CHUNKS_PER_ROW % C::THREADS == 0, "whole chunks per thread");

  const uint16_t* base;            // the operand's matrix of this batch
  int64_t k_stride;                // elements between k and k + 1 (1 when K_INNER)
  int K;
  const uint16_t* src[PER_THREAD]; // a chunk's first element at k = 0 (clamped into the matrix)
  int k_off[PER_THREAD];           // the chunk's k within the tile
  int fixed_bytes[PER_THREAD];     // bytes of the chunk inside the matrix along the outer dimension
  uint32_t dst[PER_THREAD];        // byte offset of the chunk within a stage

  // row_stride: elements between tile rows (outer stride when K_INNER, else k stride); X: outer size.
  __device__ __forceinline__ MmaOperand(const uint16_t* base_, int64_t row_stride, int X, int x0, int K_, int tid)
      : base(base_), k_stride(K_INNER ? 1 : row_stride), K(K_) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int chunk = tid + i * C::THREADS;
      const int row = chunk / CHUNKS_PER_ROW, col = chunk % CHUNKS_PER_ROW * 8;
      dst[i] = (row * LD + col) * 2;
      if constexpr (K_INNER) {  // row = outer index, col = k
        const int x = x0 + row;
        fixed_bytes[i] = x < X ? 16 : 0;
        src[i] = base + min(x, X - 1) * row_stride;
        k_off[i] = col;
      } else {                  // row = k, col = outer index
        const int x = x0 + col;
        fixed_bytes[i] = max(0, min(X - x, 8)) * 2;
        src[i] = base + min(x, X - 1);
        k_off[i] = row;
      }
    }
  }

  // Issues the copies of the tile at k0 into the stage at shared address `stage`.
  __device__ __forceinline__ void load(uint32_t stage, int k0) const {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int k = k0 + k_off[i];
      int bytes = 0;
      const uint16_t* p = src[i];
      if (k < K) {
        bytes = K_INNER ? min(fixed_bytes[i], min(K - k, 8) * 2) : fixed_bytes[i];
        p += k * k_stride;
      }
      cp_async<16>(stage + dst[i], bytes ? p : base, bytes);
    }
  }
};

template <bool BF16, bool A_K_INNER, bool B_K_INNER>
struct MmaKernel {
  using C = MmaConfig;
  using OpA = MmaOperand<C::BM, A_K_INNER>;
  using OpB = MmaOperand<C::BN, B_K_INNER>;
  static constexpr int STAGE_BYTES = OpA::STAGE_BYTES + OpB::STAGE_BYTES;
  static constexpr int SMEM_BYTES = C::STAGES * STAGE_BYTES;

  // Byte offset, within a stage's A tile, of the row this lane addresses for ldmatrix of mma tile
  // mt at k-step ks: matrices 0..3 = (m + 0, k + 0), (m + 8, k + 0), (m + 0, k + 8), (m + 8, k + 8)
  // so that r[0..3] are the A fragment a[0..3] (loaded transposed from a [k][m] tile).
  static __device__ __forceinline__ uint32_t a_lane_offset(int warp_m, int lane, int mt, int ks) {
    const int mat = lane / 8, r = lane % 8;
    const int m = warp_m * C::WM + mt * 16 + (mat % 2) * 8, k = ks * 16 + (mat / 2) * 8;
    return A_K_INNER ? ((m + r) * OpA::LD + k) * 2 : ((k + r) * OpA::LD + m) * 2;
  }

  // Byte offset, within a stage's B tile, for ldmatrix of mma tiles 2 np and 2 np + 1 at k-step ks:
  // matrices 0..3 = (n + 0, k + 0), (n + 0, k + 8), (n + 8, k + 0), (n + 8, k + 8), so that r[0..1]
  // and r[2..3] are the B fragments of the two tiles (loaded transposed from a [k][n] tile).
  static __device__ __forceinline__ uint32_t b_lane_offset(int warp_n, int lane, int np, int ks) {
    const int mat = lane / 8, r = lane % 8;
    const int n = warp_n * C::WN + np * 16 + (mat / 2) * 8, k = ks * 16 + (mat % 2) * 8;
    return B_K_INNER ? ((n + r) * OpB::LD + k) * 2 : ((k + r) * OpB::LD + n) * 2;
  }

  static __device__ __forceinline__ void run(const GemmArgs& p) {
    using H = Half16<BF16>;
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;
    const int64_t batch = p.batch0 + blockIdx.z;
    const int m0 = (p.m_tile0 + static_cast<int>(blockIdx.y)) * C::BM, n0 = static_cast<int>(blockIdx.x) * C::BN;

    const OpA op_a(static_cast<const uint16_t*>(p.a) + batch * p.a_sb, A_K_INNER ? p.a_sm : p.a_sk, p.M, m0, p.K, tid);
    const OpB op_b(static_cast<const uint16_t*>(p.b) + batch * p.b_sb, B_K_INNER ? p.b_sn : p.b_sk, p.N, n0, p.K, tid);
    const uint32_t smem0 = smem_address(smem);
    auto stage_a = [&](int s) { return smem0 + s * STAGE_BYTES; };
    auto stage_b = [&](int s) { return smem0 + s * STAGE_BYTES + OpA::STAGE_BYTES; };

    // Prologue: tiles 0 .. STAGES - 2 in flight, one commit group each (empty past the last tile,
    // so that group g always holds tile g).
    const int k_tiles = (p.K + C::BK - 1) / C::BK;
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < k_tiles) {
        op_a.load(stage_a(s), s * C::BK);
        op_b.load(stage_b(s), s * C::BK);
      }
      cp_async_commit();
    }

    float acc[C::MT][C::NT][4];  // warp tile 64 x 32 as 4 x 4 mma tiles of 16 x 8
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

    for (int kt = 0; kt < k_tiles; ++kt) {
      // Tile kt has landed (STAGES - 1 + kt groups committed, at most STAGES - 2 pending) for this
      // thread; the barrier makes it so for all threads, and frees the stage read in iteration kt - 1.
      cp_async_wait<C::STAGES - 2>();
      __syncthreads();
      const int next = kt + C::STAGES - 1;
      if (next < k_tiles) {
        op_a.load(stage_a(next % C::STAGES), next * C::BK);
        op_b.load(stage_b(next % C::STAGES), next * C::BK);
      }
      cp_async_commit();

      const int s = kt % C::STAGES;
#pragma unroll
      for (int ks = 0; ks < C::BK / 16; ++ks) {
        uint32_t af[C::MT][4], bf[C::NT][2];
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt) ldmatrix_x4<!A_K_INNER>(af[mt], stage_a(s) + a_lane_offset(warp_m, lane, mt, ks));
#pragma unroll
        for (int np = 0; np < C::NT / 2; ++np) {
          uint32_t r[4];
          ldmatrix_x4<!B_K_INNER>(r, stage_b(s) + b_lane_offset(warp_n, lane, np, ks));
          bf[2 * np][0] = r[0];
          bf[2 * np][1] = r[1];
          bf[2 * np + 1][0] = r[2];
          bf[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < C::NT; ++nt) mma_16816<BF16>(acc[mt][nt], af[mt], bf[nt]);
      }
    }
    cp_async_wait<0>();  // only empty groups can remain

    // Epilogue: straight from the fragments, element pairs (2 t, 2 t + 1) as one 4-byte store when
    // the row length N is even (then every pair is aligned).
    using T = typename H::T;
    T* c = static_cast<T*>(p.c) + batch * p.M * p.N;
    const int g = lane / 4, t = lane % 4;
    const bool pairs = p.N % 2 == 0;
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + warp_m * C::WM + mt * 16 + half * 8 + g;
        if (row >= p.M) continue;
        T* c_row = c + static_cast<int64_t>(row) * p.N;
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) {
          const int col = n0 + warp_n * C::WN + nt * 8 + 2 * t;
          const float v0 = acc[mt][nt][2 * half], v1 = acc[mt][nt][2 * half + 1];
          if (pairs && col < p.N) {
            *reinterpret_cast<typename H::T2*>(c_row + col) = H::from2(v0, v1);
          } else {
            if (col < p.N) c_row[col] = H::from(v0);
            if (col + 1 < p.N) c_row[col + 1] = H::from(v1);
          }
        }
      }
    }
  }
};

template <bool BF16, bool A_K_INNER, bool B_K_INNER>
__global__ void __launch_bounds__(MmaConfig::THREADS, 2) mma_gemm_kernel(GemmArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the driver refuses float16 / bfloat16 before sm_80
#else
  MmaKernel<BF16, A_K_INNER, B_K_INNER>::run(p);
#endif
}

// ---- SIMT kernel (float32 / float64) ------------------------------------------------------------

template <class T, int BM_, int BN_, int TM_, int TN_>
struct SimtConfig {
  using Elem = T;
  static constexpr int BM = BM_, BN = BN_, BK = 8, TM = TM_, TN = TN_, STAGES = 3;
  static constexpr int THREADS_N = BN / TN, THREADS = (BM / TM) * THREADS_N;
  static constexpr int V = 16 / sizeof(T);       // elements per 16-byte vector
  static constexpr int PAD = V;                  // keeps smem rows 16-byte aligned
  static_assert(THREADS == 256 && TM % V == 0 && TN % V == 0, "256 threads, whole vectors");
};
using SimtF32 = SimtConfig<float, 128, 128, 8, 8>;
using SimtF64 = SimtConfig<double, 64, 64, 4, 4>;

// One operand tile in shared memory, stored [BK][BX + PAD] (k-major) whatever the global layout;
// the loader copies one element per cp.async, consecutive threads along k when k_fast (else along
// the outer dimension), so that the global reads follow the operand's unit stride.
template <class Cfg, int BX>
struct SimtOperand {
  using T = typename Cfg::Elem;
  static constexpr int LD = BX + Cfg::PAD;
  static constexpr int STAGE_BYTES = Cfg::BK * LD * static_cast<int>(sizeof(T));
  static constexpr int PER_THREAD = BX * Cfg::BK / Cfg::THREADS;

  const T* base;
  int64_t k_stride;
  int K;
  const T* src[PER_THREAD];   // element at k = 0 of the thread's outer index (clamped into the matrix)
  int k_off[PER_THREAD];
  bool x_ok[PER_THREAD];
  uint32_t dst[PER_THREAD];

  __device__ __forceinline__ SimtOperand(const T* base_, int64_t x_stride, int64_t k_stride_, int X, int x0, int K_,
                                         bool k_fast, int tid)
      : base(base_), k_stride(k_stride_), K(K_) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int e = tid + i * Cfg::THREADS;
      const int k = k_fast ? e % Cfg::BK : e / BX, x = k_fast ? e / Cfg::BK : e % BX;
      dst[i] = (k * LD + x) * sizeof(T);
      x_ok[i] = x0 + x < X;
      src[i] = base + min(x0 + x, X - 1) * x_stride;
      k_off[i] = k;
    }
  }

  __device__ __forceinline__ void load(uint32_t stage, int k0) const {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int k = k0 + k_off[i];
      const bool ok = x_ok[i] && k < K;
      cp_async<sizeof(T)>(stage + dst[i], ok ? src[i] + k * k_stride : base, ok ? sizeof(T) : 0);
    }
  }
};

template <class T, int V>
struct alignas(16) Vec {
  T v[V];
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS) simt_gemm_kernel(GemmArgs p) {
  using T = typename Cfg::Elem;
  using OpA = SimtOperand<Cfg, Cfg::BM>;
  using OpB = SimtOperand<Cfg, Cfg::BN>;
  using VecT = Vec<T, Cfg::V>;
  constexpr int STAGE_BYTES = OpA::STAGE_BYTES + OpB::STAGE_BYTES;
  constexpr int V = Cfg::V, TM = Cfg::TM, TN = Cfg::TN;
  // A thread owns rows ty * V + j * (BM / (TM / V)) + [0, V) for j < TM / V, columns likewise: 16-byte
  // vectors of the k-major tiles, with lanes of a warp reading consecutive vectors (2 rows of threads).
  constexpr int ROW_STEP = Cfg::BM / (TM / V), COL_STEP = Cfg::BN / (TN / V);

  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, tx = tid % Cfg::THREADS_N, ty = tid / Cfg::THREADS_N;
  const int64_t batch = p.batch0 + blockIdx.z;
  const int m0 = (p.m_tile0 + static_cast<int>(blockIdx.y)) * Cfg::BM, n0 = static_cast<int>(blockIdx.x) * Cfg::BN;
  const OpA op_a(static_cast<const T*>(p.a) + batch * p.a_sb, p.a_sm, p.a_sk, p.M, m0, p.K, p.a_k_fast, tid);
  const OpB op_b(static_cast<const T*>(p.b) + batch * p.b_sb, p.b_sn, p.b_sk, p.N, n0, p.K, p.b_k_fast, tid);
  const uint32_t smem0 = smem_address(smem);

  const int k_tiles = (p.K + Cfg::BK - 1) / Cfg::BK;
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {  // same pipeline as the tensor-core kernel
    if (s < k_tiles) {
      op_a.load(smem0 + s * STAGE_BYTES, s * Cfg::BK);
      op_b.load(smem0 + s * STAGE_BYTES + OpA::STAGE_BYTES, s * Cfg::BK);
    }
    cp_async_commit();
  }

  T acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    const int next = kt + Cfg::STAGES - 1;
    if (next < k_tiles) {
      const uint32_t st = smem0 + (next % Cfg::STAGES) * STAGE_BYTES;
      op_a.load(st, next * Cfg::BK);
      op_b.load(st + OpA::STAGE_BYTES, next * Cfg::BK);
    }
    cp_async_commit();

    const unsigned char* stage = smem + (kt % Cfg::STAGES) * STAGE_BYTES;
    const T* As = reinterpret_cast<const T*>(stage);                      // [BK][BM + PAD]
    const T* Bs = reinterpret_cast<const T*>(stage + OpA::STAGE_BYTES);   // [BK][BN + PAD]
#pragma unroll
    for (int k = 0; k < Cfg::BK; ++k) {
      T a[TM], b[TN];
#pragma unroll
      for (int j = 0; j < TM / V; ++j) {
        const VecT v = *reinterpret_cast<const VecT*>(As + k * OpA::LD + j * ROW_STEP + ty * V);
#pragma unroll
        for (int e = 0; e < V; ++e) a[j * V + e] = v.v[e];
      }
#pragma unroll
      for (int j = 0; j < TN / V; ++j) {
        const VecT v = *reinterpret_cast<const VecT*>(Bs + k * OpB::LD + j * COL_STEP + tx * V);
#pragma unroll
        for (int e = 0; e < V; ++e) b[j * V + e] = v.v[e];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();

  T* c = static_cast<T*>(p.c) + batch * p.M * p.N;
  const bool vectors = p.N % V == 0;  // then every vector below is 16-byte aligned
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int row = m0 + (i / V) * ROW_STEP + ty * V + i % V;
    if (row >= p.M) continue;
    T* c_row = c + static_cast<int64_t>(row) * p.N;
#pragma unroll
    for (int j = 0; j < TN / V; ++j) {
      const int col = n0 + j * COL_STEP + tx * V;
      if (vectors && col < p.N) {
        VecT v;
#pragma unroll
        for (int e = 0; e < V; ++e) v.v[e] = acc[i][j * V + e];
        *reinterpret_cast<VecT*>(c_row + col) = v;
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (col + e < p.N) c_row[col + e] = acc[i][j * V + e];
      }
    }
  }
}

// ---- driver -------------------------------------------------------------------------------------

constexpr int64_t kMaxGridYZ = 65535;

// Launches `kernel` over (N tiles, M tiles, batches), split where y or z exceed the grid limits.
void launch(void (*kernel)(GemmArgs), GemmArgs args, int64_t batches, int bm, int bn, int threads, int smem_bytes,
            cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const int64_t m_tiles = (args.M + bm - 1) / bm, n_tiles = (args.N + bn - 1) / bn;
  for (int64_t z0 = 0; z0 < batches; z0 += kMaxGridYZ) {
    for (int64_t y0 = 0; y0 < m_tiles; y0 += kMaxGridYZ) {
      args.batch0 = z0;
      args.m_tile0 = static_cast<int>(y0);
      const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(std::min(m_tiles - y0, kMaxGridYZ)),
                      static_cast<unsigned>(std::min(batches - z0, kMaxGridYZ)));
      kernel<<<grid, threads, smem_bytes, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// The stride of t's dimension d, 0 for a size-1 dimension (its stride never meets a nonzero index).
int64_t stride_of(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// The matrix dimension (1 or 2) of t to read contiguously: one with unit stride (a size-1 dimension
// counts), the longer one when both qualify; -1 when neither does.
int unit_dim(const at::Tensor& t) {
  auto unit = [&](int d) { return t.size(d) == 1 || t.stride(d) == 1; };
  if (unit(1) && unit(2)) return t.size(2) >= t.size(1) ? 2 : 1;
  return unit(2) ? 2 : unit(1) ? 1 : -1;
}

// Whether 16-byte copies along t's unit-stride dimension `inner` start on 16-byte boundaries.
bool rows_aligned(const at::Tensor& t, int inner) {
  const int64_t per16 = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && stride_of(t, 3 - inner) % per16 == 0 &&
         stride_of(t, 0) % per16 == 0;
}

// A copy of t (B, R, C) with dimension `inner` (1 or 2) contiguous and the other matrix dimension
// padded to a multiple of 16 bytes (the padding is never read). A broadcast batch (stride 0) is
// copied once and stays broadcast.
at::Tensor aligned_copy(const at::Tensor& t, int inner) {
  const int64_t batches = t.stride(0) == 0 ? 1 : t.size(0), per16 = 16 / t.element_size();
  const int64_t n = t.size(inner), padded = (n + per16 - 1) / per16 * per16;
  at::Tensor buffer = at::empty({batches, t.size(3 - inner), padded}, t.options()).narrow(2, 0, n);
  if (inner == 1) buffer = buffer.transpose(1, 2);
  buffer.copy_(t.narrow(0, 0, batches));
  return buffer.expand(t.sizes());
}

template <bool BF16>
void mma_matmul(at::Tensor a, at::Tensor b, at::Tensor& c, int64_t batches, cudaStream_t stream) {
  int cc_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, c.get_device()));
  TORCH_CHECK_NOT_IMPLEMENTED(cc_major >= 8, "blocked_matmul: ", a.scalar_type(),
                              " on CUDA needs compute capability 8.0 or newer; got ", cc_major, ".x");
  // The contiguous matrix dimension of each operand (k-contiguous when neither is), copied into
  // an aligned buffer when it cannot be read in place.
  int a_inner = unit_dim(a), b_inner = unit_dim(b);
  if (a_inner < 0 || !rows_aligned(a, a_inner)) {
    a_inner = a_inner < 0 ? 2 : a_inner;
    a = aligned_copy(a, a_inner);
  }
  if (b_inner < 0 || !rows_aligned(b, b_inner)) {
    b_inner = b_inner < 0 ? 1 : b_inner;
    b = aligned_copy(b, b_inner);
  }
  GemmArgs args{a.data_ptr(), b.data_ptr(), c.data_ptr(),
                static_cast<int>(a.size(1)), static_cast<int>(b.size(2)), static_cast<int>(a.size(2)),
                stride_of(a, 0), stride_of(a, 1), stride_of(a, 2),
                stride_of(b, 0), stride_of(b, 1), stride_of(b, 2), false, false, 0, 0};
  auto with_layout = [&](auto a_k_inner, auto b_k_inner) {
    constexpr bool A_K_INNER = decltype(a_k_inner)::value, B_K_INNER = decltype(b_k_inner)::value;
    launch(mma_gemm_kernel<BF16, A_K_INNER, B_K_INNER>, args, batches, MmaConfig::BM, MmaConfig::BN,
           MmaConfig::THREADS, MmaKernel<BF16, A_K_INNER, B_K_INNER>::SMEM_BYTES, stream);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (a_inner == 2) {
    b_inner == 1 ? with_layout(Yes{}, Yes{}) : with_layout(Yes{}, No{});
  } else {
    b_inner == 1 ? with_layout(No{}, Yes{}) : with_layout(No{}, No{});
  }
}

template <class Cfg>
void simt_matmul(at::Tensor a, at::Tensor b, at::Tensor& c, int64_t batches, cudaStream_t stream) {
  using T = typename Cfg::Elem;
  // Element-aligned storage (any torch allocation is); a reinterpreted buffer might not be.
  if (reinterpret_cast<uintptr_t>(a.data_ptr()) % sizeof(T)) a = a.clone(at::MemoryFormat::Contiguous);
  if (reinterpret_cast<uintptr_t>(b.data_ptr()) % sizeof(T)) b = b.clone(at::MemoryFormat::Contiguous);
  // Consecutive threads copy along the unit-stride dimension, else along the smaller stride.
  auto k_fast = [](const at::Tensor& t, int k_dim) {
    const int d = unit_dim(t);
    return d >= 0 ? d == k_dim : t.stride(k_dim) <= t.stride(3 - k_dim);
  };
  GemmArgs args{a.data_ptr(), b.data_ptr(), c.data_ptr(),
                static_cast<int>(a.size(1)), static_cast<int>(b.size(2)), static_cast<int>(a.size(2)),
                stride_of(a, 0), stride_of(a, 1), stride_of(a, 2),
                stride_of(b, 0), stride_of(b, 1), stride_of(b, 2), k_fast(a, 2), k_fast(b, 1), 0, 0};
  constexpr int smem = Cfg::STAGES * (SimtOperand<Cfg, Cfg::BM>::STAGE_BYTES + SimtOperand<Cfg, Cfg::BN>::STAGE_BYTES);
  launch(simt_gemm_kernel<Cfg>, args, batches, Cfg::BM, Cfg::BN, Cfg::THREADS, smem, stream);
}

at::Tensor blocked_matmul_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_dim(a, "a", 3, "(B, M, K)");
  check_dim(b, "b", 3, "(B, K, N)");
  check_like(b, "b", a, "a");
  const auto dtype = a.scalar_type();
  PERFORMER_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                       "a", "have dtype float32, float64, bfloat16 or float16", "; got ", dtype);
  const int64_t B = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  check_size(b, "b", 0, B, "(B, K, N)");
  check_size(b, "b", 1, K, "(B, K, N)");
  // Kernel indices are 32-bit within a matrix (offsets are 64-bit); keep tile arithmetic in range.
  constexpr int64_t kMaxDim = INT_MAX - 1024;
  PERFORMER_CHECK_VALUE(M <= kMaxDim && K <= kMaxDim, "a", "have M and K below 2^31 - 1024 on CUDA", "; got ",
                        "shape ", a.sizes());
  PERFORMER_CHECK_VALUE(N <= kMaxDim, "b", "have N below 2^31 - 1024 on CUDA", "; got ", "shape ", b.sizes());

  c10::cuda::CUDAGuard guard(a.device());
  at::Tensor c = at::empty({B, M, N}, a.options());
  if (c.numel() == 0) return c;
  if (K == 0) return c.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {  // the compile-time variant of each dtype
    case at::kHalf: mma_matmul<false>(a, b, c, B, stream); break;
    case at::kBFloat16: mma_matmul<true>(a, b, c, B, stream); break;
    case at::kFloat: simt_matmul<SimtF32>(a, b, c, B, stream); break;
    default: simt_matmul<SimtF64>(a, b, c, B, stream); break;
  }
  return c;
}

}  // namespace
}  // namespace performer::cuda

TORCH_LIBRARY_IMPL(performer, CUDA, m) { m.impl("blocked_matmul", &performer::cuda::blocked_matmul_cuda); }
