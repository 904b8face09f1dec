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
#include "skillgraft/cl/moe.hpp"
#include "skillgraft/model/generate.hpp"
#include "skillgraft/model/hf_checkpoint.hpp"
#include "skillgraft/train/cross_entropy.hpp"
#include "support/temp_dir.hpp"

namespace sg = skillgraft;
namespace io = skillgraft::io;
namespace fs = std::filesystem;
using sg::token_ids;
using Catch::Contains;
using namespace sg::proj;

namespace {

const fs::path llama_dir = fs::path(SKILLGRAFT_TEST_DATA) / "lm_llama";
const fs::path qwen2_dir = fs::path(SKILLGRAFT_TEST_DATA) / "lm_qwen2";

using sg::test::temp_dir;
using sg::test::read_text;
using sg::test::dir_names;

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
// agree to 1e-4; the loss (about 4.8) to 1e-5; gradients (at most
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

// ---- helpers for checkpoints written by the tests ------------------------------------------

namespace {

using tensor_map = std::map<std::string, sg::cpu::tensor<float>>;

tensor_map tensors_in(const fs::path& file) {
  io::safetensors_file f(file);
  tensor_map m;
  for (const auto& t : f.header().tensors) m.emplace(t.name, f.load<float>(t.name));
  return m;
}

sg::cpu::tensor<float> filled(sg::cpu::shape_t s, float v) {
  sg::cpu::tensor<float> t(s, sg::memory_use::workspace);
  t.fill(v);
  return t;
}

// A checkpoint directory: `config` copied from a golden model, `tensors` as one file.
void write_dir(const fs::path& dir, const fs::path& config_from, const tensor_map& tensors,
               io::dtype as = io::dtype::f32) {
  fs::create_directories(dir);
  fs::copy_file(config_from / "config.json", dir / "config.json", fs::copy_options::overwrite_existing);
  io::safetensors_writer out;
  out.set_metadata("format", "pt");
  for (const auto& [name, t] : tensors) out.add(name, t, as);
  out.write(dir / "model.safetensors");
}

// The same tensors as two shards and an index, the way save_pretrained shards.
void write_sharded(const fs::path& dir, const fs::path& config_from, const tensor_map& tensors,
                   const std::function<void(nlohmann::json&)>& edit_index = {}) {
  fs::create_directories(dir);
  fs::copy_file(config_from / "config.json", dir / "config.json", fs::copy_options::overwrite_existing);
  io::safetensors_writer a, b;
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  std::size_t i = 0, bytes = 0;
  for (const auto& [name, t] : tensors) {
    const bool first = i++ < tensors.size() / 2;
    (first ? a : b).add(name, t);
    index["weight_map"][name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    bytes += t.bytes();
  }
  index["metadata"]["total_size"] = bytes;
  a.set_metadata("format", "pt");
  b.set_metadata("format", "pt");
  a.write(dir / "model-00001-of-00002.safetensors");
  b.write(dir / "model-00002-of-00002.safetensors");
  if (edit_index) edit_index(index);
  io::write_json_file(dir / "model.safetensors.index.json", index);
}

std::string load_error(const fs::path& dir, sg::model::hf_load_options o = {}) {
  try {
    sg::model::load_hf_checkpoint<float>(dir, o);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// ---- round trips ---------------------------------------------------------------------------

TEST_CASE("save: F32 checkpoints are byte-identical to transformers' and load back bit for bit") {
  for (const auto& dir : {llama_dir, qwen2_dir}) {
    INFO(dir.filename().string());
    temp_dir tmp;
    auto w = sg::model::load_hf_checkpoint<float>(dir);
    sg::model::save_hf_checkpoint(tmp.path, w);
    CHECK(read_text(tmp / "model.safetensors") == read_text(dir / "model.safetensors"));
    CHECK(dir_names(tmp.path) == std::vector<std::string>{"config.json", "model.safetensors"});
    auto back = sg::model::load_hf_checkpoint<float>(tmp.path);
    check_same_weights(w, back);
    // The config says the same model to us, and to transformers 4.x and 5.x.
    const auto j = io::read_json_file(tmp / "config.json");
    CHECK(j.at("rope_theta") == j.at("rope_parameters").at("rope_theta"));
    CHECK(j.at("dtype") == "float32");
    CHECK(sg::model::decoder_config_to_hf(back.config) == sg::model::decoder_config_to_hf(w.config));
    CHECK(back.config.tie_word_embeddings == (dir == qwen2_dir));
  }
}

TEST_CASE("save: models with expanded gates or a mixture of experts keep their extra tensors") {
  for (const bool mixture : {false, true}) {
    INFO((mixture ? "mixture of 3 experts with xSiLU ranges" : "xSiLU ranges"));
    temp_dir tmp;
    auto w = sg::model::load_hf_checkpoint<float>(llama_dir);
    auto shape_like = [&](sg::model::lm_weights<float>& x) {  // what docs/moe-and-activations.md says to do
      if (mixture) sg::cl::add_expert(x), sg::cl::add_expert(x);
      sg::nn::add_act_range(x.trunk, 0.0f);
    };
    shape_like(w);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 0.5f);
    sg::model::for_each_parameter(w, [&](const std::string& name, sg::cpu::tensor<float>& t, auto, int) {
      if (name.find("act_fn.alpha") != std::string::npos || name.find("router") != std::string::npos ||
          name.find("experts.2.") != std::string::npos)
        for (std::size_t i = 0; i < t.size(); ++i) t[i] = nd(rng);
    });
    sg::model::save_hf_checkpoint(tmp.path, w);
    std::set<std::string> names;
    const io::safetensors_file saved(tmp / "model.safetensors");
    for (const auto& t : saved.header().tensors) names.insert(t.name);
    CHECK(names.count(mixture ? "model.layers.1.mlp.experts.0.act_fn.alpha" : "model.layers.1.mlp.act_fn.alpha") == 1);
    CHECK(names.count("model.layers.0.mlp.router.weight") == (mixture ? 1 : 0));
    CHECK(names.count("model.layers.0.mlp.experts.2.down_proj.weight") == (mixture ? 1 : 0));
    auto back = sg::model::load_hf_checkpoint<float>(llama_dir);
    shape_like(back);
    sg::model::apply_task_checkpoint(tmp.path, back);
    check_same_weights(w, back);
    // A layer whose tensors differ from layer 0's is refused by name.
    w.trunk.layers[1].mlp.act_alpha = sg::cpu::tensor<float>();
    CHECK_THROWS_WITH(sg::model::save_hf_checkpoint(tmp / "bad", w),
                      Contains("model.layers.1.mlp.") && Contains("act_fn.alpha is missing"));
  }
}

TEST_CASE("save: BF16 checkpoints round to nearest even, and reload to exactly those values") {
  temp_dir tmp;
  auto w = sg::model::load_hf_checkpoint<float>(llama_dir);
  sg::model::save_hf_checkpoint(tmp.path, w, {.dtype = io::dtype::bf16});
  io::safetensors_file f(tmp / "model.safetensors");
  for (const auto& t : f.header().tensors) CHECK(t.type == io::dtype::bf16);
  CHECK(io::read_json_file(tmp / "config.json").at("torch_dtype") == "bfloat16");
  auto back = sg::model::load_hf_checkpoint<float>(tmp.path);
  std::size_t changed = 0, compared = 0, too_far = 0;
  std::vector<const sg::cpu::tensor<float>*> b;
  sg::model::for_each_parameter(back, [&](const std::string&, sg::cpu::tensor<float>& t, auto, int) { b.push_back(&t); });
  std::size_t k = 0;
  sg::model::for_each_parameter(w, [&](const std::string& name, sg::cpu::tensor<float>& t, auto, int) {
    const auto& r = *b[k++];
    for (std::size_t i = 0; i < t.size(); ++i) {
      const float expected = io::bfloat16_to_float(io::float_to_bfloat16(t[i]));
      if (r[i] != expected) FAIL_CHECK(name << "[" << i << "] = " << r[i] << ", expected " << expected);
      too_far += !(std::abs(r[i] - t[i]) <= std::ldexp(std::abs(t[i]), -8));  // half an ulp of 8 significant bits
      changed += r[i] != t[i];
      ++compared;
    }
  });
  CHECK(too_far == 0);
  CHECK(compared == sg::model::lm_weights<float>::elements_for(w.config));
  CHECK(changed > compared / 2);  // the rounding really happened
}

TEST_CASE("load: F16 and BF16 files convert to float and double") {
  temp_dir tmp;
  const auto tensors = tensors_in(llama_dir / "model.safetensors");
  write_dir(tmp / "f16", llama_dir, tensors, io::dtype::f16);
  auto f = sg::model::load_hf_checkpoint<float>(tmp / "f16");
  auto d = sg::model::load_hf_checkpoint<double>(tmp / "f16");
  const auto& orig = tensors.at("model.layers.1.mlp.down_proj.weight");
  const auto& lf = f.trunk.layers[1].mlp.down_proj.weight;
  const auto& ld = d.trunk.layers[1].mlp.down_proj.weight;
  std::size_t wrong = 0, rounded = 0;
  for (std::size_t i = 0; i < orig.size(); ++i) {
    wrong += lf[i] != io::half_to_float(io::float_to_half(orig[i])) || ld[i] != double(lf[i]);
    rounded += lf[i] != orig[i];
  }
  CHECK(wrong == 0);
  CHECK(rounded > orig.size() / 2);
}

TEST_CASE("load: a sharded checkpoint equals the single file") {
  temp_dir tmp;
  auto single = sg::model::load_hf_checkpoint<float>(llama_dir);
  write_sharded(tmp.path, llama_dir, tensors_in(llama_dir / "model.safetensors"));
  auto sharded = sg::model::load_hf_checkpoint<float>(tmp.path);
  check_same_weights(single, sharded);
  // model.safetensors wins over an index, as in transformers.
  fs::copy_file(llama_dir / "model.safetensors", tmp / "model.safetensors");
  CHECK(sg::model::hf_tensors(tmp.path).origin() == tmp / "model.safetensors");
}

TEST_CASE("load: sharded checkpoints whose index and shards disagree are refused by name") {
  temp_dir tmp;
  const auto tensors = tensors_in(llama_dir / "model.safetensors");
  const fs::path index = tmp / "model.safetensors.index.json";
  const std::string s1 = (tmp / "model-00001-of-00002.safetensors").string();
  const std::string first = tensors.begin()->first;  // in shard 1
  const std::string last = tensors.rbegin()->first;  // in shard 2
  SECTION("a tensor placed in the wrong shard") {
    write_sharded(tmp.path, llama_dir, tensors,
                  [&](nlohmann::json& j) { j["weight_map"][first] = "model-00002-of-00002.safetensors"; });
    CHECK(load_error(tmp.path) == "skillgraft: shard " + s1 + " holds " + first + ", which " + index.string() +
                                      " places in model-00002-of-00002.safetensors");
  }
  SECTION("a tensor in a shard that the index does not list") {
    write_sharded(tmp.path, llama_dir, tensors, [&](nlohmann::json& j) { j["weight_map"].erase(first); });
    CHECK(load_error(tmp.path) ==
          "skillgraft: shard " + s1 + " holds " + first + ", which " + index.string() + " does not list");
  }
  SECTION("the index lists a tensor no shard holds") {
    write_sharded(tmp.path, llama_dir, tensors, [&](nlohmann::json& j) {
      j["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors";
    });
    CHECK(load_error(tmp.path) == "skillgraft: " + index.string() +
                                      " places model.layers.9.mlp.up_proj.weight in model-00002-of-00002.safetensors, "
                                      "but that shard does not hold it");
  }
  SECTION("a shard file is missing") {
    write_sharded(tmp.path, llama_dir, tensors);
    fs::remove(tmp / "model-00002-of-00002.safetensors");
    CHECK_THAT(load_error(tmp.path), Contains("cannot open " + (tmp / "model-00002-of-00002.safetensors").string()));
  }
  SECTION("a shard name that leaves the directory") {
    write_sharded(tmp.path, llama_dir, tensors,
                  [&](nlohmann::json& j) { j["weight_map"][last] = "../model-00002-of-00002.safetensors"; });
    CHECK(load_error(tmp.path) == "skillgraft: " + index.string() + " maps " + last +
                                      " to \"../model-00002-of-00002.safetensors\"; shards must be file names in "
                                      "the checkpoint's directory");
  }
  SECTION("an index without a weight_map") {
    write_sharded(tmp.path, llama_dir, tensors, [&](nlohmann::json& j) { j.erase("weight_map"); });
    CHECK(load_error(tmp.path) == "skillgraft: " + index.string() + " has no \"weight_map\" object");
  }
}

// ---- malformed checkpoints -------------------------------------------------------------------

TEST_CASE("load: missing, misshapen, unexpected and mistyped tensors are named with their shapes") {
  temp_dir tmp;
  auto tensors = tensors_in(llama_dir / "model.safetensors");
  const std::string file = (tmp / "model.safetensors").string();
  SECTION("a missing tensor") {
    tensors.erase("model.layers.1.mlp.up_proj.weight");
    write_dir(tmp.path, llama_dir, tensors);
    CHECK(load_error(tmp.path) == "skillgraft: " + file +
                                      " is missing 1 tensor the model needs: model.layers.1.mlp.up_proj.weight "
                                      "(expected [48, 32])");
  }
  SECTION("an untied model without lm_head.weight") {
    tensors.erase("lm_head.weight");
    write_dir(tmp.path, llama_dir, tensors);
    CHECK(load_error(tmp.path) == "skillgraft: " + file +
                                      " is missing 1 tensor the model needs: lm_head.weight (expected [64, 32]); the "
                                      "config does not tie word embeddings, so lm_head.weight must be in the "
                                      "checkpoint");
  }
  SECTION("a config with more layers than the file") {
    write_dir(tmp.path, llama_dir, tensors);
    auto j = io::read_json_file(tmp / "config.json");
    j["num_hidden_layers"] = 3;
    io::write_json_file(tmp / "config.json", j);
    CHECK_THAT(load_error(tmp.path), Contains(" is missing 9 tensors the model needs: model.layers.2."));
    CHECK_THAT(load_error(tmp.path), Contains(" and 5 more"));
  }
  SECTION("a tensor of the wrong shape") {
    tensors.erase("model.layers.0.self_attn.k_proj.weight");
    tensors.emplace("model.layers.0.self_attn.k_proj.weight", filled({32, 32}, 0.f));
    write_dir(tmp.path, llama_dir, tensors);
    CHECK(load_error(tmp.path) == "skillgraft: model.layers.0.self_attn.k_proj.weight has shape [32, 32] in " + file +
                                      ", expected [16, 32]");
  }
  SECTION("a bias the config does not have") {
    tensors.emplace("model.layers.0.self_attn.q_proj.bias", filled({32}, 0.f));
    write_dir(tmp.path, llama_dir, tensors);
    CHECK(load_error(tmp.path) == "skillgraft: " + file +
                                      " has 1 tensor the model does not have: model.layers.0.self_attn.q_proj.bias "
                                      "[32] (hf_load_options::ignore_unexpected skips them)");
  }
  SECTION("unexpected tensors are refused, or skipped on request; inv_freq always") {
    tensors.emplace("vision_tower.proj.weight", filled({4, 4}, 1.f));
    tensors.emplace("model.layers.0.self_attn.rotary_emb.inv_freq", filled({4}, 1.f));
    write_dir(tmp.path, llama_dir, tensors);
    CHECK(load_error(tmp.path) == "skillgraft: " + file +
                                      " has 1 tensor the model does not have: vision_tower.proj.weight [4, 4] "
                                      "(hf_load_options::ignore_unexpected skips them)");
    auto w = sg::model::load_hf_checkpoint<float>(tmp.path, {.ignore_unexpected = true});
    auto golden = sg::model::load_hf_checkpoint<float>(llama_dir);
    check_same_weights(w, golden);
  }
  SECTION("integer weights") {
    io::safetensors_writer out;
    for (const auto& [name, t] : tensors)
      if (name != "model.norm.weight") out.add(name, t);
    out.add_ids("model.norm.weight", std::vector<std::int64_t>(32, 1), {32});
    write_dir(tmp.path, llama_dir, {});
    out.write(tmp / "model.safetensors");
    CHECK(load_error(tmp.path) ==
          "skillgraft: model.norm.weight in " + file + " is I64; weights load from F32, BF16, F16 or F64");
  }
  SECTION("no weights file, no config") {
    write_dir(tmp.path, llama_dir, tensors);
    fs::remove(tmp / "model.safetensors");
    CHECK(load_error(tmp.path) ==
          "skillgraft: " + tmp.path.string() + " has neither model.safetensors nor model.safetensors.index.json");
    fs::remove(tmp / "config.json");
    CHECK(load_error(tmp.path) == "skillgraft: cannot open " + (tmp / "config.json").string() + ": No such file or directory");
  }
}

TEST_CASE("load: a tied model may carry lm_head.weight only as a copy of the embedding") {
  temp_dir tmp;
  auto tensors = tensors_in(qwen2_dir / "model.safetensors");
  REQUIRE(!tensors.contains("lm_head.weight"));
  tensors.emplace("lm_head.weight", tensors.at("model.embed_tokens.weight").clone());
  write_dir(tmp.path, qwen2_dir, tensors);
  auto w = sg::model::load_hf_checkpoint<float>(tmp.path);
  CHECK(w.lm_head.empty());
  tensors.at("lm_head.weight")[70] += 1.0f;
  write_dir(tmp.path, qwen2_dir, tensors);
  CHECK(load_error(tmp.path) == "skillgraft: " + (tmp / "model.safetensors").string() +
                                    " has an lm_head.weight that differs from model.embed_tokens.weight (element 70), "
                                    "but config.json ties them (tie_word_embeddings)");
}

// ---- atomic saves ----------------------------------------------------------------------------

TEST_CASE("save: a failed save leaves the previous checkpoint intact and no temporary behind") {
  temp_dir tmp;
  auto w = sg::model::load_hf_checkpoint<float>(llama_dir);
  sg::model::save_hf_checkpoint(tmp.path, w);
  const std::string weights = read_text(tmp / "model.safetensors"), config = read_text(tmp / "config.json");
  REQUIRE(weights.size() > 64 * 1024);
  auto other = sg::model::load_hf_checkpoint<float>(llama_dir);
  for (std::size_t i = 0; i < other.norm.size(); ++i) other.norm[i] += 1.0f;

  SECTION("the disk fills up (file size limit) while the weights are written") {
    struct rlimit old {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    struct rlimit small = old;
    small.rlim_cur = 16 * 1024;
    auto* old_handler = ::signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of being killed
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    std::string message;
    try {
      sg::model::save_hf_checkpoint(tmp.path, other);
    } catch (const std::system_error& e) {
      message = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    ::signal(SIGXFSZ, old_handler);
    CHECK_THAT(message, Contains("skillgraft: cannot save " + tmp.path.string() + " (it was left unchanged)"));
    CHECK_THAT(message, Contains("File too large"));
  }
  SECTION("weights that do not fit their config are refused before anything is written") {
    other.trunk.layers[1].mlp.up_proj.weight = sg::cpu::tensor<float>({48, 31}, sg::memory_use::weights);
    CHECK_THROWS_WITH(sg::model::save_hf_checkpoint(tmp.path, other),
                      "skillgraft: model.layers.1.mlp.up_proj.weight has shape [48, 31], expected [48, 32]");
  }
  SECTION("an unsupported dtype is refused before anything is written") {
    CHECK_THROWS_WITH(sg::model::save_hf_checkpoint(tmp.path, other, {.dtype = io::dtype::i32}),
                      "skillgraft: checkpoints are saved as F32, BF16, F16 or F64, not I32");
  }
  CHECK(read_text(tmp / "model.safetensors") == weights);
  CHECK(read_text(tmp / "config.json") == config);
  CHECK(dir_names(tmp.path) == std::vector<std::string>{"config.json", "model.safetensors"});
}

// ---- task checkpoints: the trainable tensors of a recipe -------------------------------------

TEST_CASE("task checkpoint: only the recipe's trainable tensors, loaded over a base model") {
  temp_dir tmp;
  constexpr auto recipe = sg::recipe::mlp_gate_up.on_layers(1, 1);
  auto tuned = sg::model::load_hf_checkpoint<float>(llama_dir);
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(recipe)>> lm(tuned.config, recipe);
  // "Training": every tensor changes, but only the trainable ones belong in the checkpoint.
  sg::model::for_each_parameter(tuned, [](const std::string&, sg::cpu::tensor<float>& t, auto, int) {
    for (std::size_t i = 0; i < t.size(); ++i) t[i] += 0.25f;
  });
  sg::model::save_task_checkpoint(tmp.path, lm, tuned);
  const std::vector<std::string> trained{"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"};
  {
    io::safetensors_file f(tmp / "model.safetensors");
    std::vector<std::string> names;
    for (const auto& t : f.header().tensors) names.push_back(t.name);
    std::sort(names.begin(), names.end());
    CHECK(names == trained);
    CHECK(f.metadata().at("format") == "pt");
    CHECK(f.metadata().at(sg::model::task_checkpoint_key) == "trainable");
  }
  auto base = sg::model::load_hf_checkpoint<float>(llama_dir);
  auto expected = sg::model::load_hf_checkpoint<float>(llama_dir);
  for (auto* p : {&expected.trunk.layers[1].mlp.gate_proj.weight, &expected.trunk.layers[1].mlp.up_proj.weight})
    for (std::size_t i = 0; i < p->size(); ++i) (*p)[i] += 0.25f;
  CHECK(sg::model::apply_task_checkpoint(tmp.path, base) == trained);
  check_same_weights(base, expected);

  // It is not a full checkpoint, and says so.
  CHECK_THAT(load_error(tmp.path), Contains("is missing 19 tensors the model needs: "));
  CHECK_THAT(load_error(tmp.path), Contains("this checkpoint holds only the tensors a recipe trains: load it over a "
                                            "base model with apply_task_checkpoint"));
  // A full checkpoint applies too: every tensor is replaced.
  auto other = sg::model::load_hf_checkpoint<float>(llama_dir);
  CHECK(sg::model::apply_task_checkpoint(llama_dir, tuned).size() == 21);
  check_same_weights(tuned, other);
}

TEST_CASE("task checkpoint: another model or a wrong shape is refused and the base is left untouched") {
  temp_dir tmp;
  auto base = sg::model::load_hf_checkpoint<float>(llama_dir);
  auto untouched = sg::model::load_hf_checkpoint<float>(llama_dir);
  SECTION("the checkpoint's config describes another model") {
    auto qwen = sg::model::load_hf_checkpoint<float>(qwen2_dir);
    sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::sa_proj)>> lm(qwen.config, sg::recipe::sa_proj);
    sg::model::save_task_checkpoint(tmp.path, lm, qwen);
    CHECK_THROWS_WITH(sg::model::apply_task_checkpoint(tmp.path, base),
                      Contains((tmp / "config.json").string() + " describes another model than the base weights: "));
    CHECK_THROWS_WITH(sg::model::apply_task_checkpoint(tmp.path, base), Contains("model_type \"qwen2\" (base \"llama\")"));
  }
  // A tensor that would load (layer 0 sorts and is written first), then a bad one.
  auto apply_with = [&](const std::string& bad, sg::cpu::shape_t shape) {
    tensor_map t;
    t.emplace("model.layers.0.mlp.gate_proj.weight", filled({48, 32}, 3.f));
    t.emplace(bad, filled(shape, 3.f));
    write_dir(tmp.path, llama_dir, t);
    try {
      sg::model::apply_task_checkpoint(tmp.path, base);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  SECTION("a tensor of the wrong shape") {
    CHECK(apply_with("model.layers.1.mlp.gate_proj.weight", {32, 48}) ==
          "skillgraft: model.layers.1.mlp.gate_proj.weight has shape [32, 48] in " +
              (tmp / "model.safetensors").string() + ", expected [48, 32]");
  }
  SECTION("a tensor the base does not have") {
    CHECK_THAT(apply_with("model.layers.0.mlp.gate_proj.lora_A.weight", {4, 32}),
               Contains("has 1 tensor the model does not have: model.layers.0.mlp.gate_proj.lora_A.weight [4, 32]"));
  }
  check_same_weights(base, untouched);
}

TEST_CASE("task checkpoint: a recipe that trains nothing, and a model with an active adapter, are refused") {
  temp_dir tmp;
  auto w = sg::model::load_hf_checkpoint<float>(llama_dir);
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(sg::recipe::frozen)>> frozen(w.config, sg::recipe::frozen);
  CHECK_THROWS_WITH(sg::model::save_task_checkpoint(tmp.path, frozen, w),
                    "skillgraft: the recipe trains no tensor, so a task checkpoint would be empty");
  auto c = w.config;
  c.lora_rank = 2;
  sg::model::decoder_lm<float, decltype(sg::trainable<sg::lora<v>>)> lm(c, sg::trainable<sg::lora<v>>);
  sg::cl::attach_lora(lm, w, {.rank = 2, .alpha = 4, .seed = 1});
  CHECK_THROWS_WITH(sg::model::save_hf_checkpoint(tmp.path, w),
                    Contains("skillgraft: layer 0 has an active LoRA adapter, which a model checkpoint would lose"));
  // The adapters themselves make a task checkpoint of that recipe.
  sg::model::save_task_checkpoint(tmp.path, lm, w);
  CHECK(tensors_in(tmp / "model.safetensors").size() == 4);
  CHECK(fs::is_empty(tmp.path) == false);
  // Merged (scale 0), the model saves: its weights now carry the adapters.
  sg::cl::lora_merge merged(w);
  sg::model::save_hf_checkpoint(tmp / "merged", w);
  CHECK(tensors_in(tmp / "merged" / "model.safetensors").size() == 21);
}

// ---- config.json -----------------------------------------------------------------------------

namespace {
std::string config_error(const nlohmann::json& j) {
  try {
    sg::model::decoder_config_from_hf(j, "config.json");
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("config: the golden configs read as the models they describe") {
  const auto l = sg::model::read_hf_config(llama_dir / "config.json");
  CHECK(l.hidden == 32);
  CHECK(l.n_heads == 4);
  CHECK(l.n_kv_heads == 2);
  CHECK(l.head_dim == 8);
  CHECK(l.intermediate == 48);
  CHECK(l.n_layers == 2);
  CHECK(l.vocab_size == 64);
  CHECK(l.max_seq == 32);
  CHECK(l.rope_theta == 1e4);
  CHECK(l.rms_norm_eps == 1e-6);
  CHECK(!l.attention_bias);
  CHECK(!l.tie_word_embeddings);
  const auto q = sg::model::read_hf_config(qwen2_dir / "config.json");
  CHECK(q.rope_theta == 1e6);  // only inside rope_parameters (transformers 5.x)
  CHECK(q.attention_bias);
  CHECK(q.tie_word_embeddings);
  CHECK(q.head_dim == 8);  // not in the file: hidden / heads
  for (const auto& c : {l, q}) {
    const auto back = sg::model::decoder_config_from_hf(sg::model::decoder_config_to_hf(c));
    CHECK(sg::model::decoder_config_to_hf(back) == sg::model::decoder_config_to_hf(c));
  }
}

TEST_CASE("config: rope_parameters (5.x) and top-level rope_theta (4.x) read the same, or are refused") {
  auto j = io::read_json_file(qwen2_dir / "config.json");
  REQUIRE(!j.contains("rope_theta"));
  auto old = j;  // as transformers 4.x writes it
  old.erase("rope_parameters");
  old["rope_theta"] = 1e6;
  old["rope_scaling"] = nullptr;
  CHECK(sg::model::decoder_config_from_hf(old).rope_theta == 1e6);
  old.erase("rope_theta");
  CHECK(sg::model::decoder_config_from_hf(old).rope_theta == 1e4);  // transformers' default
  auto both = j;
  both["rope_theta"] = 1e6;
  CHECK(sg::model::decoder_config_from_hf(both).rope_theta == 1e6);
  both["rope_theta"] = 5e5;
  CHECK(config_error(both) == "skillgraft: config.json has rope_theta 500000.0 at the top level but 1000000.0 in "
                              "rope_parameters; which one applies depends on the transformers version, so the file "
                              "is ambiguous");
  auto yarn = j;
  yarn["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1e6}, {"factor", 4.0}};
  CHECK(config_error(yarn) == "skillgraft: config.json uses rope_parameters of rope_type \"yarn\"; only the default "
                              "rotary embedding is supported");
  auto linear = old;
  linear["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  CHECK(config_error(linear) == "skillgraft: config.json uses rope_scaling of rope_type \"linear\"; only the default "
                                "rotary embedding is supported");
}

TEST_CASE("config: models the decoder cannot compute are refused by what they use") {
  const auto llama = io::read_json_file(llama_dir / "config.json");
  const auto qwen = io::read_json_file(qwen2_dir / "config.json");
  auto with = [](nlohmann::json j, const std::string& key, nlohmann::json v) {
    j[key] = std::move(v);
    return j;
  };
  CHECK(config_error(with(llama, "model_type", "mistral")) ==
        "skillgraft: config.json describes a \"mistral\" model; supported: llama, qwen2");
  CHECK(config_error(with(llama, "attention_bias", true)) ==
        "skillgraft: config.json uses attention_bias, which in Llama also puts a bias on o_proj; that is not supported");
  CHECK(config_error(with(llama, "mlp_bias", true)) == "skillgraft: config.json uses mlp_bias, which is not supported");
  CHECK(config_error(with(llama, "hidden_act", "gelu")) ==
        "skillgraft: config.json uses hidden_act \"gelu\"; only silu (SwiGLU) is supported");
  CHECK(config_error(with(qwen, "use_sliding_window", true)) ==
        "skillgraft: config.json uses sliding-window attention (use_sliding_window), which is not supported");
  CHECK(config_error(with(qwen, "layer_types", {"full_attention", "sliding_attention"})) ==
        "skillgraft: config.json has layer_types entry \"sliding_attention\"; only full_attention is supported");
  auto no_hidden = llama;
  no_hidden.erase("hidden_size");
  CHECK(config_error(no_hidden) == "skillgraft: config.json has no \"hidden_size\"");
  CHECK_THAT(config_error(with(llama, "num_key_value_heads", 3)), Contains("is not a multiple of num_key_value_heads (3)"));
  CHECK(config_error(with(llama, "hidden_size", "32")) ==
        "skillgraft: config.json has hidden_size \"32\" (string); expected an integer in [1, 2147483647]");
}

// ---- PEFT LoRA adapters ------------------------------------------------------------------------

namespace {

using peft_recipe = decltype(sg::trainable<sg::lora<q>, sg::lora<v>, sg::lora<gate>>);

void fill_lora_b(sg::cpu::tensor<float>& b, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 0.3f);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = nd(rng);
}

template <class R = peft_recipe>
sg::model::lm_weights<float> llama_with_adapters(int rank, double alpha, std::uint64_t seed, R recipe = {}) {
  auto w = sg::model::load_hf_checkpoint<float>(llama_dir);
  auto c = w.config;
  c.lora_rank = rank;
  sg::model::decoder_lm<float, R> lm(c, recipe);
  sg::cl::attach_lora(lm, w, {.rank = rank, .alpha = alpha, .seed = seed});
  // B starts at zero; give it values so that a round trip has something to carry.
  std::mt19937 rng(unsigned(seed) + 100);
  for (auto& l : w.trunk.layers)
    for (auto* p : {&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj, &l.self_attn.o_proj,
                    &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj})
      if (p->has_lora()) fill_lora_b(p->lora.B, rng);
  return w;
}

std::string adapter_error(const fs::path& dir, sg::model::lm_weights<float>& w) {
  try {
    sg::cl::load_lora_adapter(dir, w);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

template <class T>
sg::cpu::tensor<T> logits_of_ids(sg::model::lm_weights<T>& w, const token_ids& ids) {
  sg::model::decoder_lm<T, std::remove_cv_t<decltype(sg::recipe::frozen)>> lm(w.config, sg::recipe::frozen);
  typename decltype(lm)::saved_t s;
  return lm.logits(w, lm.forward(w, ids, s));
}
template <class T>
sg::cpu::tensor<T> logits_of(sg::model::lm_weights<T>& w) {
  return logits_of_ids(w, {{1, 5, 7, 2, 11}, {3, 3, 12, 0, 4}});
}

}  // namespace

TEST_CASE("PEFT: adapters save under PEFT's names with PEFT's adapter_config.json, and load back exactly") {
  temp_dir tmp;
  auto w = llama_with_adapters(4, 8, 1);
  sg::cl::save_lora_adapter(tmp.path, w, {.base_model_name_or_path = "tiny-llama"});
  CHECK(dir_names(tmp.path) == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});

  io::safetensors_file f(tmp / "adapter_model.safetensors");
  std::set<std::string> names;
  for (const auto& t : f.header().tensors) names.insert(t.name);
  std::set<std::string> expected;
  for (int l : {0, 1})
    for (const char* m : {"self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj"})
      for (const char* ab : {"lora_A", "lora_B"})
        expected.insert("base_model.model.model.layers." + std::to_string(l) + "." + m + "." + ab + ".weight");
  CHECK(names == expected);
  CHECK(f.info("base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight").shape == std::vector<std::size_t>{4, 32});
  CHECK(f.info("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight").shape == std::vector<std::size_t>{48, 4});
  CHECK(f.metadata().at("format") == "pt");

  const auto j = io::read_json_file(tmp / "adapter_config.json");
  CHECK(j.at("peft_type") == "LORA");
  CHECK(j.at("task_type") == "CAUSAL_LM");
  CHECK(j.at("r") == 4);
  CHECK(j.at("lora_alpha").is_number_integer());
  CHECK(j.at("lora_alpha") == 8);
  CHECK(j.at("target_modules") == nlohmann::json{"gate_proj", "q_proj", "v_proj"});
  CHECK(j.at("layers_to_transform").is_null());
  CHECK(j.at("base_model_name_or_path") == "tiny-llama");
  CHECK(j.at("bias") == "none");
  CHECK(j.at("use_rslora") == false);

  auto w2 = llama_with_adapters(4, 16, 2);  // other values and another scale
  CHECK(sg::cl::load_lora_adapter(tmp.path, w2) == 6);
  for (std::size_t l = 0; l < 2; ++l)
    for (auto [a, b] : {std::pair{&w.trunk.layers[l].self_attn.q_proj, &w2.trunk.layers[l].self_attn.q_proj},
                        std::pair{&w.trunk.layers[l].self_attn.v_proj, &w2.trunk.layers[l].self_attn.v_proj},
                        std::pair{&w.trunk.layers[l].mlp.gate_proj, &w2.trunk.layers[l].mlp.gate_proj}}) {
      CHECK(bitwise_equal(a->lora.A, b->lora.A));
      CHECK(bitwise_equal(a->lora.B, b->lora.B));
      CHECK(b->lora_scale == 2.0f);  // lora_alpha / r = 8 / 4
    }
  CHECK(bitwise_equal(logits_of(w), logits_of(w2)));
  CHECK(!bitwise_equal(logits_of(w), logits_of(*std::make_unique<sg::model::lm_weights<float>>(
                                         sg::model::load_hf_checkpoint<float>(llama_dir)))));
}

TEST_CASE("PEFT: the adapter_config.json PEFT 0.21 writes, with all its newer keys, loads") {
  temp_dir tmp;
  auto w = llama_with_adapters(4, 8, 1);
  sg::cl::save_lora_adapter(tmp.path, w);
  // Verbatim from PEFT 0.21.2's save_pretrained (get_peft_model on the tiny Llama with
  // LoraConfig(r=4, lora_alpha=8, target_modules=[...], task_type="CAUSAL_LM")).
  auto j = nlohmann::json::parse(R"({
    "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
    "base_model_name_or_path": "/tmp/sgexport/llama_f32", "bias": "none", "corda_config": null,
    "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null, "fan_in_fan_out": false,
    "inference_mode": true, "init_lora_weights": true, "kasa_config": null, "layer_replication": null,
    "layers_pattern": null, "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
    "lora_dropout": 0.0, "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core",
    "modules_to_save": null, "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2",
    "qalora_group_size": 16, "r": 4, "rank_pattern": {}, "revision": null,
    "target_modules": ["q_proj", "gate_proj", "v_proj"], "target_parameters": null, "task_type": "CAUSAL_LM",
    "trainable_token_indices": null, "use_bdlora": null, "use_dora": false, "use_qalora": false,
    "use_rslora": false, "velora_config": null})");
  io::write_json_file(tmp / "adapter_config.json", j);
  auto w2 = llama_with_adapters(4, 2, 7);
  CHECK(sg::cl::load_lora_adapter(tmp.path, w2) == 6);
  CHECK(bitwise_equal(logits_of(w), logits_of(w2)));
}

TEST_CASE("PEFT: a layer range becomes layers_to_transform, and odd alphas and rsLoRA keep their scale") {
  temp_dir tmp;
  constexpr auto upper = sg::trainable<sg::lora<up>>.on_layers(1, 1);
  auto w = llama_with_adapters(3, 5, 1, upper);
  sg::cl::save_lora_adapter(tmp.path, w);
  auto j = io::read_json_file(tmp / "adapter_config.json");
  CHECK(j.at("layers_to_transform") == nlohmann::json{1});
  CHECK(j.at("target_modules") == nlohmann::json{"up_proj"});
  CHECK(j.at("lora_alpha") == 5);
  CHECK(j.at("base_model_name_or_path").is_null());
  auto w2 = llama_with_adapters(3, 1, 9, upper);
  CHECK(sg::cl::load_lora_adapter(tmp.path, w2) == 1);
  CHECK(w2.trunk.layers[1].mlp.up_proj.lora_scale == w.trunk.layers[1].mlp.up_proj.lora_scale);
  CHECK(bitwise_equal(w2.trunk.layers[1].mlp.up_proj.lora.B, w.trunk.layers[1].mlp.up_proj.lora.B));
  j["use_rslora"] = true;
  io::write_json_file(tmp / "adapter_config.json", j);
  sg::cl::load_lora_adapter(tmp.path, w2);
  CHECK(w2.trunk.layers[1].mlp.up_proj.lora_scale == float(5.0 / std::sqrt(3.0)));
}

TEST_CASE("PEFT: adapters that do not match the attached ones are refused, leaving them untouched") {
  temp_dir tmp;
  auto saved = llama_with_adapters(4, 8, 1);
  sg::cl::save_lora_adapter(tmp.path, saved);
  const std::string config = (tmp / "adapter_config.json").string();
  const std::string file = (tmp / "adapter_model.safetensors").string();
  auto edit_config = [&](auto&& f) {
    auto j = io::read_json_file(tmp / "adapter_config.json");
    f(j);
    io::write_json_file(tmp / "adapter_config.json", j);
  };
  auto w = llama_with_adapters(4, 8, 3);
  const auto before = w.trunk.layers[0].self_attn.q_proj.lora.A.clone();

  SECTION("another rank") {
    auto w2 = llama_with_adapters(2, 8, 3);
    CHECK(adapter_error(tmp.path, w2) == "skillgraft: " + config +
                                             " has r 4, but the adapter attached to model.layers.0.self_attn.q_proj has "
                                             "rank 2");
  }
  SECTION("a target with no adapter attached") {
    auto w2 = llama_with_adapters(4, 8, 3, sg::trainable<sg::lora<q>, sg::lora<v>>);
    CHECK(adapter_error(tmp.path, w2) == "skillgraft: " + config +
                                             " targets gate_proj on layer 0, but model.layers.0.mlp.gate_proj has no "
                                             "adapter attached (attach_lora with a recipe that adapts it)");
  }
  SECTION("an attached adapter the file does not target") {
    auto w2 = llama_with_adapters(4, 8, 3, sg::trainable<sg::lora<q>, sg::lora<v>, sg::lora<gate>, sg::lora<up>>);
    CHECK(adapter_error(tmp.path, w2) == "skillgraft: " + config +
                                             " does not target model.layers.0.mlp.up_proj (target_modules gate_proj, "
                                             "q_proj, v_proj, layers all), but an adapter is attached there");
  }
  SECTION("configurations plain LoRA cannot express") {
    edit_config([](auto& j) { j["peft_type"] = "IA3"; });
    CHECK(adapter_error(tmp.path, w) == "skillgraft: " + config + " has peft_type \"IA3\"; only LORA adapters load");
    edit_config([](auto& j) { j["peft_type"] = "LORA", j["use_dora"] = true; });
    CHECK(adapter_error(tmp.path, w) == "skillgraft: " + config + " uses DoRA (use_dora), which is not supported");
    edit_config([](auto& j) { j["use_dora"] = false, j["target_modules"] = ".*proj"; });
    CHECK(adapter_error(tmp.path, w) ==
          "skillgraft: " + config + " has no list of target_modules (a regular expression is not supported)");
    edit_config([](auto& j) { j["target_modules"] = {"q_proj", "lm_head"}; });
    CHECK(adapter_error(tmp.path, w) == "skillgraft: " + config + " targets \"lm_head\"; adapters go on q_proj, "
                                                                  "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
    edit_config([](auto& j) { j["target_modules"] = {"q_proj", "v_proj", "gate_proj"}, j["rank_pattern"] = {{"q_proj", 8}}; });
    CHECK_THAT(adapter_error(tmp.path, w), Contains("has a rank_pattern; only one rank and one alpha"));
    edit_config([](auto& j) { j["rank_pattern"] = nlohmann::json::object(), j["layers_to_transform"] = {5}; });
    CHECK(adapter_error(tmp.path, w) ==
          "skillgraft: " + config + " lists layer 5 in layers_to_transform; the model has 2 layers");
    edit_config([](auto& j) { j["layers_to_transform"] = nullptr, j["lora_bias"] = true; });
    CHECK(adapter_error(tmp.path, w) == "skillgraft: " + config + " sets lora_bias (true), which is not supported");
    edit_config([](auto& j) { j["lora_bias"] = false, j["trainable_token_indices"] = {1, 2}; });
    CHECK(adapter_error(tmp.path, w) ==
          "skillgraft: " + config + " sets trainable_token_indices ([1,2]), which is not supported");
  }
  SECTION("a missing, misshapen or extra tensor") {
    tensor_map t = tensors_in(tmp / "adapter_model.safetensors");
    auto rewrite = [&] {
      io::safetensors_writer out;
      for (const auto& [name, x] : t) out.add(name, x);
      out.write(tmp / "adapter_model.safetensors");
    };
    const std::string b1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    auto kept = std::move(t.at(b1));
    t.erase(b1);
    rewrite();
    CHECK(adapter_error(tmp.path, w) == "skillgraft: " + file + " has no tensor " + b1 + " (expected [16, 4])");
    t.emplace(b1, filled({4, 16}, 0.f));
    rewrite();
    CHECK(adapter_error(tmp.path, w) ==
          "skillgraft: " + b1 + " has shape [4, 16] in " + file + ", expected [16, 4]");
    t.at(b1) = std::move(kept);
    t.emplace("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight", filled({4, 32}, 0.f));
    rewrite();
    CHECK(adapter_error(tmp.path, w) ==
          "skillgraft: " + file +
              " has 1 tensors no attached adapter takes, e.g. base_model.model.model.layers.1.mlp.up_proj.lora_A.weight");
  }
  CHECK(bitwise_equal(w.trunk.layers[0].self_attn.q_proj.lora.A, before));
}

TEST_CASE("PEFT: nothing attached, or adapters PEFT cannot describe, are refused on saving") {
  temp_dir tmp;
  auto w = sg::model::load_hf_checkpoint<float>(llama_dir);
  CHECK_THROWS_WITH(sg::cl::save_lora_adapter(tmp.path, w),
                    "skillgraft: no LoRA adapter is attached, so there is nothing to save");
  auto mixed = llama_with_adapters(4, 8, 1);
  mixed.trunk.layers[1].mlp.gate_proj.lora = {};
  CHECK_THROWS_WITH(sg::cl::save_lora_adapter(tmp.path, mixed),
                    Contains("layer 1 has no adapter on gate_proj although other layers do"));
  auto scaled = llama_with_adapters(4, 8, 1);
  scaled.trunk.layers[1].mlp.gate_proj.lora_scale = 1.0f;
  CHECK_THROWS_WITH(sg::cl::save_lora_adapter(tmp.path, scaled),
                    Contains("model.layers.1.mlp.gate_proj has an adapter of rank 4 and scale 1.000000, others rank 4 "
                             "and scale 2.000000"));
  CHECK(fs::is_empty(tmp.path));
}

// ---- export for tests/data/check_transformers_roundtrip.py ------------------------------------

// Not run by default (hidden tag): writes checkpoints saved by this library, and the
// logits it computes for them, into $SKILLGRAFT_EXPORT_DIR, for the script that loads
// them into transformers and PEFT and compares.
TEST_CASE("export: checkpoints and logits for transformers", "[.export]") {
  const char* out_env = std::getenv("SKILLGRAFT_EXPORT_DIR");
  REQUIRE(out_env != nullptr);
  const fs::path out = out_env;
  fs::create_directories(out / "expected");
  const token_ids ids = {{1, 5, 7, 2, 11, 60, 33}, {3, 3, 12, 0, 4, 63, 9}};
  auto record = [&](const std::string& name, sg::model::lm_weights<float>& w) {
    auto z = logits_of_ids(w, ids);
    io::safetensors_writer e;
    std::vector<std::int64_t> flat(ids.begin(), ids.end());
    e.add_ids("input_ids", flat, {ids.shape(0), ids.shape(1)});
    e.add("logits", z);
    e.write(out / "expected" / (name + ".safetensors"));
  };
  // Weights moved off the golden ones, so transformers cannot match by accident.
  auto moved = [](const fs::path& dir) {
    auto w = sg::model::load_hf_checkpoint<float>(dir);
    std::size_t k = 0;
    sg::model::for_each_parameter(w, [&](const std::string&, sg::cpu::tensor<float>& t, auto, int) {
      for (std::size_t i = 0; i < t.size(); ++i) t[i] += 0.05f * float(std::sin(double(++k)));
    });
    return w;
  };
  auto llama = moved(llama_dir);
  sg::model::save_hf_checkpoint(out / "llama_f32", llama);
  record("llama_f32", llama);
  auto qwen = moved(qwen2_dir);
  sg::model::save_hf_checkpoint(out / "qwen2_f32", qwen);
  record("qwen2_f32", qwen);
  sg::model::save_hf_checkpoint(out / "qwen2_bf16", qwen, {.dtype = io::dtype::bf16});
  auto qwen_bf16 = sg::model::load_hf_checkpoint<float>(out / "qwen2_bf16");
  record("qwen2_bf16", qwen_bf16);
  // An adapter on the saved Llama, on layer 1 only, with an alpha that is not r.
  auto c = llama.config;
  c.lora_rank = 4;
  constexpr auto recipe = sg::trainable<sg::lora<q>, sg::lora<v>, sg::lora<down>>.on_layers(1, 1);
  sg::model::decoder_lm<float, std::remove_cv_t<decltype(recipe)>> lm(c, recipe);
  sg::cl::attach_lora(lm, llama, {.rank = 4, .alpha = 12, .seed = 5});
  std::mt19937 rng(6);
  for (auto* p : {&llama.trunk.layers[1].self_attn.q_proj, &llama.trunk.layers[1].self_attn.v_proj,
                  &llama.trunk.layers[1].mlp.down_proj})
    fill_lora_b(p->lora.B, rng);
  sg::cl::save_lora_adapter(out / "llama_lora", llama, {.base_model_name_or_path = (out / "llama_f32").string()});
  record("llama_lora", llama);
}
