// performer::moments for the CPU dispatch key: the per-dimension mean and mean square over dim 2 of
// a (B, G, N, E) tensor, the statistics behind performer.FeatureMap, in one read of the input.
// Blocks of kRows rows per (b, g) run in parallel, each into its own partial sums; the partials are
// added in a fixed order (the result does not depend on the thread count). The inner loop runs over
// E contiguous columns and vectorizes; other strides take the same loop through a scalar read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../favor_checks.h"

namespace performer::cpu {
namespace {

constexpr int64_t kRows = 256;

template <class T, class A>
void block_sums(const T* x, int64_t rows, int64_t row_stride, int64_t col_stride, int64_t E, A* sum, A* sq) {
  for (int64_t e = 0; e < E; ++e) sum[e] = sq[e] = A(0);
  for (int64_t n = 0; n < rows; ++n) {
    const T* row = x + n * row_stride;
    if (col_stride == 1) {
      for (int64_t e = 0; e < E; ++e) {
        const A v = static_cast<A>(row[e]);
        sum[e] += v;
        sq[e] += v * v;
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const A v = static_cast<A>(row[e * col_stride]);
        sum[e] += v;
        sq[e] += v * v;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> moments(const at::Tensor& x) {
  check_dim(x, "x", 4, "(B, G, N, E)");
  PERFORMER_CHECK_TYPE(x.is_floating_point(), "x", "be floating point", "; got ", x.scalar_type());
  const int64_t B = x.size(0), G = x.size(1), N = x.size(2), E = x.size(3);
  const auto acc = x.options().dtype(favor_acc_dtype(x));
  at::Tensor mean = at::zeros({B, G, E}, acc), mean_sq = at::zeros({B, G, E}, acc);
  if (N == 0 || B * G * E == 0) return {mean, mean_sq};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "performer::moments", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t blocks = (N + kRows - 1) / kRows, items = B * G * blocks;
    std::vector<A> partial(static_cast<size_t>(items * 2 * E));
    const scalar_t* base = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t bg = i / blocks, n0 = i % blocks * kRows;
        const scalar_t* rows = base + bg / G * x.stride(0) + bg % G * x.stride(1) + n0 * x.stride(2);
        A* out = partial.data() + i * 2 * E;
        block_sums(rows, std::min(kRows, N - n0), x.stride(2), x.stride(3), E, out, out + E);
      }
    });
    A* m = mean.data_ptr<A>();
    A* s = mean_sq.data_ptr<A>();
    for (int64_t i = 0; i < items; ++i) {
      const A* part = partial.data() + i * 2 * E;
      A* mb = m + i / blocks * E;
      A* sb = s + i / blocks * E;
      for (int64_t e = 0; e < E; ++e) {
        mb[e] += part[e];
        sb[e] += part[E + e];
      }
    }
    const A inv = A(1) / static_cast<A>(N);
    for (int64_t j = 0; j < B * G * E; ++j) {
      m[j] *= inv;
      s[j] *= inv;
    }
  });
  return {mean, mean_sq};
}

}  // namespace

TORCH_LIBRARY_IMPL(performer, CPU, m) { m.impl("moments", &moments); }

}  // namespace performer::cpu
