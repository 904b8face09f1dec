// The CPU kernels that reduce across rows (RMSNorm's weight gradient, bias gradients, the
// cross-entropy total, fixed-order sums) and the attention core give bit-identical results on
// 1 and 2 threads: each sum's order is fixed by the shape, never by the thread count.
#include <catch2/catch.hpp>
#include <omp.h>

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
