// The CPU attention core against the math written out as loops in double, on a sequence long
// enough that the causal tiling of backend/cpu/attention.hpp has several query blocks and a
// partial last one (the layer tests' sequences fit in one block): outputs, kept scores (zeros
// where masked) and the three input gradients, causal and not, with grouped kv heads.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "skillgraft/backend/cpu/backend.hpp"

namespace sg = skillgraft;

namespace {
using tensor = sg::cpu::tensor<double>;

tensor random_tensor(sg::attention_dims d, int heads, unsigned seed) {
  tensor t({std::size_t(d.batch), std::size_t(d.seq), std::size_t(heads * d.head_dim)}, sg::memory_use::workspace);
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = nd(rng);
  return t;
}

// P, a, dq, dk, dv of every (batch, head) by the formulas of nn/attention.hpp.
struct reference {
  std::vector<double> P, a, dq, dk, dv;
  reference(const sg::attention_dims& d, double scale, const tensor& q, const tensor& k, const tensor& v, const tensor& da) {
    const int B = d.batch, S = d.seq, H = d.heads, KV = d.kv_heads, hd = d.head_dim;
    auto at = [&](const tensor& t, int heads, int b, int s, int h, int x) { return t[((std::size_t(b) * S + s) * heads + h) * hd + x]; };
    auto idx = [&](int heads, int b, int s, int h, int x) { return ((std::size_t(b) * S + s) * heads + h) * hd + x; };
    P.assign(std::size_t(B) * H * S * S, 0.0);
    a.assign(q.size(), 0.0);
    dq.assign(q.size(), 0.0);
    dk.assign(k.size(), 0.0);
    dv.assign(v.size(), 0.0);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        const int g = h / d.group();
        double* p = P.data() + (std::size_t(b) * H + h) * S * S;
        for (int i = 0; i < S; ++i) {
          const int seen = d.causal ? i + 1 : S;
          double mx = -1e300, sum = 0;
          for (int j = 0; j < seen; ++j) {
            double s = 0;
            for (int x = 0; x < hd; ++x) s += at(q, H, b, i, h, x) * at(k, KV, b, j, g, x);
            p[i * S + j] = s * scale;
            mx = std::max(mx, p[i * S + j]);
          }
          for (int j = 0; j < seen; ++j) sum += (p[i * S + j] = std::exp(p[i * S + j] - mx));
          for (int j = 0; j < seen; ++j) p[i * S + j] /= sum;
          for (int x = 0; x < hd; ++x)
            for (int j = 0; j < seen; ++j) a[idx(H, b, i, h, x)] += p[i * S + j] * at(v, KV, b, j, g, x);
          // dP_ij = da_i . v_j;  dS_ij = P_ij (dP_ij - sum_l dP_il P_il)
          std::vector<double> dP(seen);
          double dot = 0;
          for (int j = 0; j < seen; ++j) {
            for (int x = 0; x < hd; ++x) dP[j] += at(da, H, b, i, h, x) * at(v, KV, b, j, g, x);
            dot += dP[j] * p[i * S + j];
          }
          for (int j = 0; j < seen; ++j) {
            const double dS = p[i * S + j] * (dP[j] - dot);
            for (int x = 0; x < hd; ++x) {
              dq[idx(H, b, i, h, x)] += dS * at(k, KV, b, j, g, x) * scale;
              dk[idx(KV, b, j, g, x)] += dS * at(q, H, b, i, h, x) * scale;
              dv[idx(KV, b, j, g, x)] += p[i * S + j] * at(da, H, b, i, h, x);
            }
          }
        }
      }
  }
};

void require_close(const tensor& got, const std::vector<double>& want, const char* what) {
  INFO(what);
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) REQUIRE(got[i] == Approx(want[i]).epsilon(1e-10).margin(1e-12));
}
}  // namespace

TEST_CASE("The CPU attention core over several query blocks equals the formulas") {
  for (bool causal : {true, false}) {
    const sg::attention_dims d{.batch = 2, .seq = 150, .heads = 4, .kv_heads = 2, .head_dim = 8, .causal = causal};
    INFO((causal ? "causal" : "not causal") << ", seq " << d.seq);
    const double scale = 1.0 / std::sqrt(double(d.head_dim));
    const auto q = random_tensor(d, d.heads, 1), k = random_tensor(d, d.kv_heads, 2), v = random_tensor(d, d.kv_heads, 3);
    const auto da = random_tensor(d, d.heads, 4);
    const reference want(d, scale, q, k, v, da);

    tensor a(q.shape(), sg::memory_use::workspace), unkept(q.shape(), sg::memory_use::workspace);
    tensor probs({std::size_t(d.batch), std::size_t(d.heads), std::size_t(d.seq), std::size_t(d.seq)}, sg::memory_use::workspace);
    probs.fill(-1.0);  // every entry must be written, the masked ones with 0
    sg::backend::cpu::attention_forward(d, scale, q, k, v, a, &probs);
    sg::backend::cpu::attention_forward(d, scale, q, k, v, unkept, static_cast<tensor*>(nullptr));
    require_close(probs, want.P, "P");
    require_close(a, want.a, "a");
    require_close(unkept, want.a, "a without keeping P");

    tensor dq(q.shape(), sg::memory_use::workspace), dk(k.shape(), sg::memory_use::workspace), dv(v.shape(), sg::memory_use::workspace);
    dk.fill(0.0);  // dk and dv are accumulated
    dv.fill(0.0);
    sg::backend::cpu::attention_backward(d, scale, probs, &q, &k, &v, da, &dq, &dk, &dv);
    require_close(dq, want.dq, "dq");
    require_close(dk, want.dk, "dk");
    require_close(dv, want.dv, "dv");
  }
}

// The rows a cached-attention call lists (model/generate.hpp computes them) are grouped into
// runs that one GEMM block serves: consecutive tokens of one sequence, never across a sequence
// boundary; a list that is not strictly increasing or leaves [0, batch * queries) is refused by
// name before any product runs, and the output is left untouched.
TEST_CASE("Cached attention groups listed rows into runs and refuses rows out of order or range") {
  sg::cached_attention_dims d;
  d.batch = 3, d.queries = 4, d.past = 2, d.capacity = 8, d.heads = 2, d.kv_heads = 1, d.head_dim = 4;
  auto runs_of = [&](std::vector<std::int64_t> rows) {
    std::vector<std::pair<std::int64_t, int>> out;
    for (const auto& r : sg::token_runs(d, rows)) out.emplace_back(r.first, r.count);
    return out;
  };
  using runs = std::vector<std::pair<std::int64_t, int>>;
  CHECK(runs_of({}) == runs{});
  CHECK(runs_of({0, 1, 2, 3}) == runs{{0, 4}});
  CHECK(runs_of({2, 3, 4, 5}) == runs{{2, 2}, {4, 2}});  // 3 ends sequence 0, 4 starts sequence 1
  CHECK(runs_of({0, 2, 3, 11}) == runs{{0, 1}, {2, 2}, {11, 1}});
  CHECK(d.position_of(5) == 3);
  CHECK(d.sequence_of(11) == 2);

  for (const auto& bad : std::vector<std::vector<std::int64_t>>{{1, 1}, {3, 2}, {-1}, {0, 12}}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH(sg::token_runs(d, bad), Catch::Contains("rows must increase strictly within [0, 12)"));
  }

  using ftensor = sg::cpu::tensor<float>;
  const std::size_t B = 3, Q = 4, C = 8;
  ftensor q({B, Q, 8}, sg::memory_use::workspace), kc({B, C, 4}, sg::memory_use::workspace),
      vc({B, C, 4}, sg::memory_use::workspace), a({B, Q, 8}, sg::memory_use::workspace);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = 7.0f;
  CHECK_THROWS_WITH(sg::backend::cpu::cached_attention(d, 0.5f, q, kc, vc, {4, 3}, a),
                    Catch::Contains("row 1 is 3"));
  bool untouched = true;
  for (std::size_t i = 0; i < a.size(); ++i) untouched = untouched && a[i] == 7.0f;
  CHECK(untouched);
}
