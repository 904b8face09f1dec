// The CPU kernels that reduce across rows (RMSNorm's weight gradient, bias gradients, the
// cross-entropy total, fixed-order sums) and the attention core give bit-identical results on
// 1 and 2 threads: each sum's order is fixed by the shape, never by the thread count; and the
// row kernels give the same bits at any address.
#include <catch2/catch.hpp>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "skillgraft/backend/cpu/backend.hpp"

namespace sg = skillgraft;
using tensor = sg::cpu::tensor<float>;

namespace {
tensor random_tensor(sg::cpu::shape_t shape, unsigned seed) {
  tensor t(shape, sg::memory_use::workspace);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = nd(rng);
  return t;
}
bool same_bits(const tensor& a, const tensor& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

template <class... Ts>
std::vector<tensor> collect(Ts&... ts) {  // tensors do not copy: moved in one by one
  std::vector<tensor> v;
  (v.push_back(std::move(ts)), ...);
  return v;
}

// Runs f on 1 and on 2 threads and returns both results.
template <class F>
auto on_1_and_2_threads(F f) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(1);
  auto one = f();
  omp_set_num_threads(2);
  auto two = f();
  omp_set_num_threads(before);
  return std::pair{std::move(one), std::move(two)};
}
}  // namespace

TEST_CASE("RMSNorm's weight gradient and a bias gradient do not depend on the thread count") {
  const std::size_t n = 300, d = 512;
  const auto x = random_tensor({n, d}, 1), dy = random_tensor({n, d}, 2), w = random_tensor({d}, 3);
  auto [one, two] = on_1_and_2_threads([&] {
    tensor y({n, d}, sg::memory_use::workspace), rstd({n}, sg::memory_use::workspace);
    tensor dw({d}, sg::memory_use::workspace), dx({n, d}, sg::memory_use::workspace), db({d}, sg::memory_use::workspace);
    dw.fill(0.f);
    db.fill(0.f);
    sg::backend::cpu::rmsnorm_forward(w, x, 1e-6, y, &rstd);
    sg::backend::cpu::rmsnorm_backward(w, x, rstd, dy, &dw, &dx, false);
    sg::backend::cpu::add_column_sums(dy, db);
    return collect(dw, dx, db);
  });
  for (std::size_t i = 0; i < one.size(); ++i) CHECK(same_bits(one[i], two[i]));
}

TEST_CASE("The cross-entropy rows' total does not depend on the thread count") {
  const std::size_t m = 200, V = 1000;
  const auto z0 = random_tensor({m, V}, 4);
  std::vector<std::int64_t> y(m);
  for (std::size_t i = 0; i < m; ++i) y[i] = std::int64_t((i * 37) % V);
  auto [one, two] = on_1_and_2_threads([&] {
    auto z = z0.clone(sg::memory_use::workspace);
    const double loss = sg::backend::cpu::softmax_cross_entropy_rows(z, m, y.data(), double(m));
    return std::pair{loss, std::move(z)};
  });
  CHECK(one.first == two.first);
  CHECK(same_bits(one.second, two.second));
}

TEST_CASE("The attention core does not depend on the thread count") {
  const sg::attention_dims d{.batch = 2, .seq = 130, .heads = 4, .kv_heads = 2, .head_dim = 16, .causal = true};
  const auto q = random_tensor({2, 130, 64}, 5), k = random_tensor({2, 130, 32}, 6), v = random_tensor({2, 130, 32}, 7);
  const auto da = random_tensor({2, 130, 64}, 8);
  auto [one, two] = on_1_and_2_threads([&] {
    tensor a(q.shape(), sg::memory_use::workspace), p({2, 4, 130, 130}, sg::memory_use::workspace);
    tensor dq(q.shape(), sg::memory_use::workspace), dk(k.shape(), sg::memory_use::workspace), dv(v.shape(), sg::memory_use::workspace);
    dk.fill(0.f);
    dv.fill(0.f);
    sg::backend::cpu::attention_forward(d, 0.25f, q, k, v, a, &p);
    sg::backend::cpu::attention_backward(d, 0.25f, p, &q, &k, &v, da, &dq, &dk, &dv);
    return collect(a, p, dq, dk, dv);
  });
  for (std::size_t i = 0; i < one.size(); ++i) CHECK(same_bits(one[i], two[i]));
}

// Above the size at which the heads get threads (a prompt) and below it (one token decoded per
// sequence), listing every row and every other one.
TEST_CASE("Cached attention does not depend on the thread count") {
  for (const int queries : {16, 1}) {
    sg::cached_attention_dims d;
    d.batch = 2, d.queries = queries, d.past = 20, d.capacity = 40, d.heads = 4, d.kv_heads = 2, d.head_dim = 16;
    const auto q = random_tensor({2, std::size_t(queries), 64}, 11);
    const auto kc = random_tensor({2, 40, 32}, 12), vc = random_tensor({2, 40, 32}, 13);
    for (const int stride : {1, 2}) {
      std::vector<std::int64_t> rows;
      for (std::int64_t t = 0; t < 2 * queries; t += stride) rows.push_back(t);
      CAPTURE(queries, stride);
      auto [one, two] = on_1_and_2_threads([&] {
        tensor a(q.shape(), sg::memory_use::workspace);
        a.fill(0.f);
        sg::backend::cpu::cached_attention(d, 0.25f, q, kc, vc, rows, a);
        return a;
      });
      CHECK(same_bits(one, two));
    }
  }
}

TEST_CASE("Row softmax, exp and sums give the same bits wherever the row lies in memory") {
  // The caching allocator hands the same tensor different addresses from run to run: a kernel
  // whose vector code peels to alignment (Eigen's expressions do) would change the last bits.
  const std::size_t n = 1000 + 7;
  std::vector<float> values(n);
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (auto& v : values) v = nd(rng);
  std::vector<float> buffer(n + 64);
  std::vector<float> first_softmax, first_exp;
  double first_sum = 0;
  for (std::size_t offset = 0; offset < 16; ++offset) {
    float* x = buffer.data() + offset;  // every alignment of a float within 64 bytes
    std::copy(values.begin(), values.end(), x);
    sg::cpu::row::exp_shifted(x, n, 0.5f);
    const double sum = sg::cpu::row::lane_sum<double>(n, [&](std::size_t i) { return double(x[i]); });
    std::vector<float> e(x, x + n);
    std::copy(values.begin(), values.end(), x);
    sg::cpu::row::softmax(x, n);
    std::vector<float> s(x, x + n);
    if (offset == 0) {
      first_exp = e, first_softmax = s, first_sum = sum;
      continue;
    }
    CHECK(e == first_exp);
    CHECK(s == first_softmax);
    CHECK(sum == first_sum);
  }
  // and they compute what they say
  double ref = 0;
  for (float v : values) ref += std::exp(double(v) - 0.5);
  CHECK(std::abs(first_sum - ref) <= 1e-5 * ref);
  double total = 0;
  for (float p : first_softmax) total += p;
  CHECK(std::abs(total - 1.0) < 1e-5);
}
