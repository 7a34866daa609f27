// A CPU emulator of the CUDA subset that csrc/cuda/favor.cu uses, so that its kernels run, and are
// tested, on machines without a GPU (tests/test_favor_cuda_simt.py).
//
// Each thread of a block is a fiber (ucontext) with its own stack. A block runs in phases: every
// live thread runs, in a random order (seeded), until it reaches __syncthreads, a warp shuffle or
// its end; then the next phase starts. So a kernel whose result depends on the order of threads
// between two barriers (a race) gives different results for different seeds, and threads that
// meet different kinds of barrier raise an error. Dynamic shared memory is filled with 0xFF bytes
// (a NaN in every float type) before each block, so reading what no thread wrote shows up as NaN.
// Launches check the limits of an H100 (1024 threads, 227 KiB of shared memory per block).
// Blocks run one after another; what is not emulated: timing, the memory model between blocks
// (the kernels do not communicate between blocks within a launch), warp-synchronous code
// without a shuffle or barrier.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using std::fma;
using std::fmax;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __align__(n) alignas(n)
// Static shared arrays: one per kernel function, shared by the fibers of the running block (and
// left over from the previous block: only dynamic shared memory is NaN-filled).
#define __shared__ static

struct SimtDim { unsigned x = 0, y = 0, z = 0; };
inline SimtDim threadIdx, blockIdx, blockDim;

namespace simt {
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = 232448;  // an H100's opt-in limit per block
constexpr size_t kStack = 256 * 1024;
enum Kind { none = 0, sync = 1, shfl = 2 };

struct State {
  ucontext_t scheduler;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<int> done, kind;
  int current = 0;
  std::vector<unsigned char> smem;
  unsigned char shfl_slot[kMaxThreads][8];
  std::function<void()> body;
  std::mt19937 rng{1234};
  long barriers = 0;
  int sms = 2;  // what cudaDevAttrMultiProcessorCount reports: few SMs, so launches split into segments
};
inline State& st() { static State s; return s; }
inline void seed(unsigned v) { st().rng.seed(v); }

// Back to the scheduler until the next phase.
inline void yield(Kind k) {
  State& s = st();
  s.kind[s.current] = k;
  swapcontext(&s.ctx[s.current], &s.scheduler);
  threadIdx.x = s.current;
}

inline void thread_entry() {
  State& s = st();
  s.body();
  s.done[s.current] = 1;
  s.kind[s.current] = none;
  swapcontext(&s.ctx[s.current], &s.scheduler);
}

inline void run_block(unsigned block, int threads, size_t smem_bytes, std::function<void()> body) {
  State& s = st();
  s.ctx.resize(threads);
  s.stacks.resize(threads);
  s.done.assign(threads, 0);
  s.kind.assign(threads, none);
  s.smem.assign(smem_bytes + 64, 0xFF);
  s.body = std::move(body);
  blockIdx.x = block;
  blockDim.x = threads;
  for (int t = 0; t < threads; ++t) {
    s.stacks[t].resize(kStack);
    getcontext(&s.ctx[t]);
    s.ctx[t].uc_stack.ss_sp = s.stacks[t].data();
    s.ctx[t].uc_stack.ss_size = kStack;
    s.ctx[t].uc_link = nullptr;
    makecontext(&s.ctx[t], thread_entry, 0);
  }
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  for (;;) {
    std::shuffle(order.begin(), order.end(), s.rng);
    for (int t : order) {
      if (s.done[t]) continue;
      s.current = t;
      threadIdx.x = t;
      swapcontext(&s.scheduler, &s.ctx[t]);
    }
    int live = 0, kind = none;
    for (int t = 0; t < threads; ++t) {
      if (s.done[t]) continue;
      ++live;
      if (kind == none) kind = s.kind[t];
      else if (kind != s.kind[t])
        throw std::runtime_error("simt: threads of block " + std::to_string(block) +
                                 " wait at different kinds of barrier (__syncthreads and a shuffle)");
    }
    if (!live) break;
    ++s.barriers;
  }
}

template <class K, class... Args>
void launch(K kernel, unsigned blocks, int threads, size_t smem_bytes, Args... args) {
  if (threads < 1 || threads > kMaxThreads)
    throw std::runtime_error("simt: launch with " + std::to_string(threads) + " threads per block");
  if (smem_bytes > kMaxSharedBytes)
    throw std::runtime_error("simt: launch asks for " + std::to_string(smem_bytes) +
                             " bytes of shared memory per block, more than " + std::to_string(kMaxSharedBytes));
  for (unsigned b = 0; b < blocks; ++b) run_block(b, threads, smem_bytes, [&] { kernel(args...); });
}

// The block's dynamic shared memory (16-byte aligned).
inline unsigned char* shared_memory() { return st().smem.data() + 16; }
}  // namespace simt

// ---- the CUDA runtime and intrinsics favor.cu calls ----------------------------------------------

typedef void* cudaStream_t;
typedef int cudaError_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 1, cudaDevAttrMaxSharedMemoryPerBlockOptin = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 1 };
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? simt::st().sms : int(simt::kMaxSharedBytes);
  return 0;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
template <class K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return 0; }

inline void __syncthreads() { simt::yield(simt::sync); }

// Threads run one at a time between yields, so an atomic add is a plain read-modify-write.
template <class T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }

// Shuffles exchange through per-thread slots: write, a phase, read, a phase (so that no thread
// overwrites its slot before the others have read it).
template <class T>
T __shfl_xor_sync(unsigned, T x, int lane_mask) {
  static_assert(sizeof(T) <= 8, "simt: shuffles of at most 8 bytes");
  auto& s = simt::st();
  const int t = threadIdx.x;
  memcpy(s.shfl_slot[t], &x, sizeof(T));
  simt::yield(simt::shfl);
  T y;
  memcpy(&y, s.shfl_slot[t ^ lane_mask], sizeof(T));
  simt::yield(simt::shfl);
  return y;
}
template <class T>
T __shfl_up_sync(unsigned, T x, int delta) {
  static_assert(sizeof(T) <= 8, "simt: shuffles of at most 8 bytes");
  auto& s = simt::st();
  const int t = threadIdx.x, lane = t % 32;
  memcpy(s.shfl_slot[t], &x, sizeof(T));
  simt::yield(simt::shfl);
  T y;
  memcpy(&y, s.shfl_slot[lane >= delta ? t - delta : t], sizeof(T));
  simt::yield(simt::shfl);
  return y;
}

// 16-bit floats as their bits, converted with round-to-nearest-even as the CUDA intrinsics do.
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { _Float16 x; memcpy(&x, &h.bits, 2); return float(x); }
inline __half __float2half_rn(float f) { _Float16 x = _Float16(f); __half h; memcpy(&h.bits, &x, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = uint16_t((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = uint16_t(u >> 16);
  return r;
}
