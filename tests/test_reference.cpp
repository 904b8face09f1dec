// Forward of one decoder block against an independent NumPy reference
// (tests/data/make_golden_block.py, float64 math on float32 inputs).
#include <catch2/catch.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "skillgraft/io/npy.hpp"
#include "skillgraft/nn/decoder_block.hpp"
#include "skillgraft/policy/recipes.hpp"

namespace sg = skillgraft;
namespace fs = std::filesystem;

namespace {

struct golden_case {
  fs::path dir;
  sg::decoder_config config;
  int batch = 0, seq = 0;
};

golden_case read_case(const std::string& name) {
  golden_case g;
  g.dir = fs::path(SKILLGRAFT_TEST_DATA) / name;
  std::ifstream in(g.dir / "config.json");
  REQUIRE(in.good());
  const auto j = nlohmann::json::parse(in);
  auto& c = g.config;
  c.hidden = j.at("hidden_size");
  c.n_heads = j.at("num_attention_heads");
  c.n_kv_heads = j.at("num_key_value_heads");
  c.head_dim = j.at("head_dim");
  c.intermediate = j.at("intermediate_size");
  c.rope_theta = j.at("rope_theta");
  c.rms_norm_eps = j.at("rms_norm_eps");
  c.attention_bias = j.at("qkv_bias");
  c.n_layers = 1;
  g.batch = j.at("batch");
  g.seq = j.at("seq_len");
  c.max_seq = g.seq;
  return g;
}

template <class T>
sg::cpu::tensor<T> load(const golden_case& g, const std::string& file, sg::cpu::shape_t shape,
                        sg::memory_use use = sg::memory_use::weights) {
  return sg::io::load_npy<T>(g.dir / (file + ".npy"), use, &shape);
}

template <class T>
sg::nn::block_weights<T> load_block(const golden_case& g) {
  const auto& c = g.config;
  const std::size_t d = std::size_t(c.hidden), qd = std::size_t(c.q_dim()), kvd = std::size_t(c.kv_dim()),
                    I = std::size_t(c.intermediate);
  sg::nn::block_weights<T> w;
  w.attn_norm = load<T>(g, "input_layernorm.weight", {d});
  w.mlp_norm = load<T>(g, "post_attention_layernorm.weight", {d});
  auto lin = [&](sg::nn::linear_weights<T>& l, const std::string& name, std::size_t out, std::size_t in, bool bias) {
    l.weight = load<T>(g, name + ".weight", {out, in});
    if (bias) l.bias = load<T>(g, name + ".bias", {out});
  };
  lin(w.self_attn.q_proj, "q_proj", qd, d, c.attention_bias);
  lin(w.self_attn.k_proj, "k_proj", kvd, d, c.attention_bias);
  lin(w.self_attn.v_proj, "v_proj", kvd, d, c.attention_bias);
  lin(w.self_attn.o_proj, "o_proj", d, qd, false);
  lin(w.mlp.gate_proj, "gate_proj", I, d, false);
  lin(w.mlp.up_proj, "up_proj", I, d, false);
  lin(w.mlp.down_proj, "down_proj", d, I, false);
  sg::nn::check_block_weights(w, c);
  return w;
}

template <class T>
void require_close(const sg::cpu::tensor<T>& got, const sg::cpu::tensor<T>& want, double tol, const std::string& what) {
  REQUIRE(got.shape() == want.shape());
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, std::abs(double(got[i]) - double(want[i])) / std::max(1.0, std::abs(double(want[i]))));
  INFO(what << ": worst relative difference " << worst);
  CHECK(worst <= tol);
}

// Runs the block under recipe R and compares output and intermediates with the reference.
template <class T, class R, bool Dx>
void check_case(const golden_case& g, double tol) {
  const auto& c = g.config;
  const std::size_t B = std::size_t(g.batch), S = std::size_t(g.seq), d = std::size_t(c.hidden);
  auto w = load_block<T>(g);
  auto x = load<T>(g, "x", {B, S, d}, sg::memory_use::workspace);
  sg::nn::rope_table<T> table(c.head_dim, c.max_seq, c.rope_theta);
  sg::nn::decoder_block<T, R, Dx> block(c, table);
  typename decltype(block)::saved_t saved;
  const auto y = block.forward(w, x, saved);
  require_close(y, load<T>(g, "y", {B, S, d}, sg::memory_use::workspace), tol, "block output y");

  // The halves on their own, against the reference's intermediates.
  sg::nn::rmsnorm<T, false, false> norm{c.rms_norm_eps};
  typename decltype(norm)::saved_t ns;
  const auto h1 = norm.forward(w.attn_norm, x, ns);
  require_close(h1, load<T>(g, "attn_norm_out", {B, S, d}, sg::memory_use::workspace), tol, "attention norm");
  sg::nn::self_attention<T, R, false> attn{c, &table};
  typename decltype(attn)::saved_t as;
  auto h_mid = attn.forward(w.self_attn, h1, as);
  h_mid.vec() += x.vec();
  require_close(h_mid, load<T>(g, "h_mid", {B, S, d}, sg::memory_use::workspace), tol, "residual after attention");
}

}  // namespace

TEST_CASE("decoder block forward matches the NumPy reference (LLaMA layout)") {
  const auto g = read_case("block_llama");
  CHECK_FALSE(g.config.attention_bias);
  check_case<double, std::remove_const_t<decltype(sg::recipe::frozen)>, false>(g, 1e-6);
  check_case<float, std::remove_const_t<decltype(sg::recipe::frozen)>, false>(g, 2e-5);
  // The recipe changes what is kept, never what is computed.
  check_case<float, std::remove_const_t<decltype(sg::recipe::llm)>, true>(g, 2e-5);
  check_case<float, std::remove_const_t<decltype(sg::recipe::mlp_gate_up)>, false>(g, 2e-5);
}

TEST_CASE("decoder block forward matches the NumPy reference (Qwen2 layout, Q/K/V bias)") {
  const auto g = read_case("block_qwen2");
  CHECK(g.config.attention_bias);
  check_case<double, std::remove_const_t<decltype(sg::recipe::frozen)>, false>(g, 1e-6);
  check_case<float, std::remove_const_t<decltype(sg::recipe::frozen)>, false>(g, 2e-5);
  check_case<float, std::remove_const_t<decltype(sg::recipe::sa_proj)>, true>(g, 2e-5);
}

TEST_CASE("a golden file with the wrong shape is named in the error") {
  const auto g = read_case("block_llama");
  sg::cpu::shape_t wrong{3, 3};
  CHECK_THROWS_WITH(sg::io::load_npy<float>(g.dir / "q_proj.weight.npy", sg::memory_use::weights, &wrong),
                    Catch::Contains("q_proj.weight.npy has shape [32, 32], expected [3, 3]"));
  CHECK_THROWS_WITH(sg::io::load_npy<float>(g.dir / "missing.npy", sg::memory_use::weights),
                    Catch::Contains("no such file"));
}
