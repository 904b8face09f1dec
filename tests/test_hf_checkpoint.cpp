// Hugging Face checkpoints: the tiny Llama and Qwen2 models saved by transformers load
// and compute what transformers computed (logits, loss, gradients under several recipes,
// soft-prefix logits, greedy tokens, continuation log-probabilities); our saves are
// byte-identical to transformers' and round-trip exactly (F32) or to bf16 rounding;
// sharded checkpoints, task checkpoints over a base, PEFT adapters; every malformed
// input is refused by name, and a failed save keeps the previous checkpoint.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "skillgraft/cl/lora_checkpoint.hpp"
#include "skillgraft/model/generate.hpp"
#include "skillgraft/model/hf_checkpoint.hpp"
#include "skillgraft/train/cross_entropy.hpp"

namespace sg = skillgraft;
namespace io = skillgraft::io;
namespace fs = std::filesystem;
using sg::token_ids;
using Catch::Contains;
using namespace sg::proj;

namespace {

const fs::path llama_dir = fs::path(SKILLGRAFT_TEST_DATA) / "lm_llama";
const fs::path qwen2_dir = fs::path(SKILLGRAFT_TEST_DATA) / "lm_qwen2";

// A fresh directory (mkdtemp: unique even across concurrent test processes), removed
// with its contents at the end of the test.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::string pattern = (fs::temp_directory_path() / "skillgraft-hf-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary);
  out << text;
}
std::vector<std::string> dir_names(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

token_ids load_token_ids(const io::safetensors_file& f, const std::string& name) {
  const auto& info = f.info(name);
  REQUIRE(info.shape.size() == 2);
  const auto v = f.load_ids(name);
  token_ids t = token_ids::from_shape({info.shape[0], info.shape[1]});
  std::copy(v.begin(), v.end(), t.begin());
  return t;
}
token_ids columns(const token_ids& t, std::size_t from, std::size_t to) {
  token_ids out = token_ids::from_shape({t.shape(0), to - from});
  for (std::size_t b = 0; b < t.shape(0); ++b)
    for (std::size_t s = from; s < to; ++s) out(b, s - from) = t(b, s);
  return out;
}

// Largest |ours - theirs|, shapes required equal.
template <class T, class U>
double max_abs_diff(const sg::cpu::tensor<T>& ours, const sg::cpu::tensor<U>& theirs) {
  REQUIRE(ours.shape() == theirs.shape());
  double m = 0;
  for (std::size_t i = 0; i < ours.size(); ++i) m = std::max(m, std::abs(double(ours[i]) - double(theirs[i])));
  return m;
}

template <class T>
bool bitwise_equal(const sg::cpu::tensor<T>& a, const sg::cpu::tensor<T>& b) {
  return a.shape() == b.shape() && std::equal(a.data(), a.data() + a.size(), b.data(),
                                              [](T x, T y) { return std::memcmp(&x, &y, sizeof(T)) == 0; });
}

// Every parameter of a and b (same names, same order) bit for bit.
template <class T>
void check_same_weights(sg::model::lm_weights<T>& a, sg::model::lm_weights<T>& b) {
  std::vector<std::pair<std::string, const sg::cpu::tensor<T>*>> pa, pb;
  sg::model::for_each_parameter(a, [&](const std::string& n, sg::cpu::tensor<T>& t, auto, int) { pa.emplace_back(n, &t); });
  sg::model::for_each_parameter(b, [&](const std::string& n, sg::cpu::tensor<T>& t, auto, int) { pb.emplace_back(n, &t); });
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].first);
    CHECK(pa[i].first == pb[i].first);
    CHECK(bitwise_equal(*pa[i].second, *pb[i].second));
  }
}

// What transformers computed for a model (tests/data/README.md lists it).
struct golden {
  io::safetensors_file file;
  token_ids ids, labels, greedy;
  explicit golden(const fs::path& dir)
      : file(dir / "golden.safetensors"),
        ids(load_token_ids(file, "input_ids")),
        labels(load_token_ids(file, "labels")),
        greedy(load_token_ids(file, "greedy_tokens")) {}
  std::set<std::string> grad_names() const {
    std::set<std::string> n;
    for (const auto& t : file.header().tensors)
      if (t.name.starts_with("grad.")) n.insert(t.name.substr(5));
    return n;
  }
};

// Tolerances, fixed before comparing: logits and log-probabilities of a float32 model
// agree to 1e-4 (the bound); the loss (about 4.8) to 1e-5; gradients (at most
// about 2) to 1e-5, about eight float32 ulps of their largest entries.
constexpr double logits_tol = 1e-4, loss_tol = 1e-5, grad_tol = 1e-5;

// Loss and gradients of the golden batch under recipe R, compared with transformers'
// for every tensor R trains that the golden file lists; returns the names compared.
template <class T, class R>
std::set<std::string> check_golden_grads(const fs::path& dir, R recipe) {
  golden g(dir);
  auto w = sg::model::load_hf_checkpoint<T>(dir);
  sg::model::decoder_lm<T, R> lm(w.config, recipe);
  auto grads = lm.make_grads(w);
  typename decltype(lm)::saved_t saved;
  auto h = lm.forward(w, g.ids, saved);
  auto r = sg::train::masked_cross_entropy<T>(h, w.head(), sg::shift_labels(g.labels), lm.head_grad(grads), {.chunk = 5});
  lm.backward(w, saved, r.dh, grads);
  CHECK(r.count == 8);
  CHECK(std::abs(r.loss - double(g.file.load<float>("loss")[0])) <= loss_tol);
  std::set<std::string> compared;
  lm.for_each_trainable(w, grads, [&](const std::string& name, sg::cpu::tensor<T>&, sg::cpu::tensor<T>& dp) {
    if (!g.file.contains("grad." + name)) return;
    INFO(dir.filename().string() << " " << name);
    CHECK(max_abs_diff(dp, g.file.load<float>("grad." + name)) <= grad_tol);
    compared.insert(name);
  });
  return compared;
}

template <class T>
void check_golden_forward(const fs::path& dir) {
  golden g(dir);
  auto w = sg::model::load_hf_checkpoint<T>(dir);
  sg::model::decoder_lm<T, std::remove_cv_t<decltype(sg::recipe::frozen)>> lm(w.config, sg::recipe::frozen);
  INFO(dir.filename().string() << (sizeof(T) == 4 ? " float" : " double"));
  {
    typename decltype(lm)::saved_t s;
    auto z = lm.logits(w, lm.forward(w, g.ids, s));
    CHECK(max_abs_diff(z, g.file.load<float>("logits")) <= logits_tol);
  }
  {  // logits after a soft-token prefix
    auto prefix = g.file.load<T>("prefix_embeds");
    typename decltype(lm)::saved_t s;
    auto z = lm.logits(w, lm.forward(w, g.ids, s, &prefix));
    CHECK(max_abs_diff(z, g.file.load<float>("prefix_logits")) <= logits_tol);
  }
  {  // greedy tokens
    const auto tokens = sg::model::generate(lm, w, g.ids, sg::model::sampling{.max_new_tokens = 5, .temperature = 0.0, .seed = 0, .eos = -1, .allowed = {}});
    CHECK(tokens == g.greedy);
  }
  {  // continuation log-probability
    const auto lp = sg::model::continuation_logprob(lm, w, columns(g.ids, 0, 4), columns(g.ids, 4, 7));
    const auto theirs = g.file.load<float>("continuation_logprob");
    REQUIRE(lp.size() == 2);
    for (std::size_t b = 0; b < 2; ++b) CHECK(std::abs(lp[b] - double(theirs[b])) <= logits_tol);
  }
}

using trunk_only = decltype(sg::trainable<q, o, gate, up, down, sg::group::attn_norm, sg::group::final_norm>);

}  // namespace

// ---- golden outputs of transformers -------------------------------------------------------

TEST_CASE("golden: the Llama checkpoint computes transformers' logits, prefix logits, tokens, log-probs") {
  check_golden_forward<float>(llama_dir);
  check_golden_forward<double>(llama_dir);
}

TEST_CASE("golden: the tied, biased Qwen2 checkpoint computes transformers' outputs") {
  check_golden_forward<float>(qwen2_dir);
  check_golden_forward<double>(qwen2_dir);
}

TEST_CASE("golden: loss and gradients match transformers under several recipes") {
  for (const auto& dir : {llama_dir, qwen2_dir}) {
    const auto all = golden(dir).grad_names();
    CHECK(all.size() == 9);  // README: 8 shared + lm_head (Llama) or q_proj.bias (Qwen2)
    // The whole LM, so every listed tensor has a gradient (the tied one included).
    CHECK(check_golden_grads<float>(dir, sg::recipe::llm) == all);
    CHECK(check_golden_grads<double>(dir, sg::recipe::llm) == all);
    // The trunk alone: the specialised backward with frozen embeddings and head.
    auto trunk = all;
    trunk.erase("model.embed_tokens.weight");
    trunk.erase("lm_head.weight");
    CHECK(check_golden_grads<float>(dir, trunk_only{}) == trunk);
    // Layer-scoped recipes: backward stops above layer 0.
    CHECK(check_golden_grads<float>(dir, sg::recipe::mlp.on_layers(1, 1)) ==
          std::set<std::string>{"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"});
    CHECK(check_golden_grads<float>(dir, sg::recipe::sa_proj.on_layers(1, 1)) ==
          std::set<std::string>{"model.layers.1.self_attn.o_proj.weight"});
  }
  // Untied Llama: the head alone.
  CHECK(check_golden_grads<float>(llama_dir, sg::trainable<sg::group::lm_head>) ==
        std::set<std::string>{"lm_head.weight"});
}
