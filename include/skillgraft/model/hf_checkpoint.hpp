#pragma once
// Hugging Face checkpoints of LlamaForCausalLM and Qwen2ForCausalLM: a directory with
// config.json and either model.safetensors or model.safetensors.index.json plus the
// shards it lists (what save_pretrained writes for models above its shard size).
//
//   auto w = model::load_hf_checkpoint<float>("Qwen2-0.5B");          // F32/F16/BF16 -> float
//   model::save_hf_checkpoint("out", w, {.dtype = io::dtype::bf16});   // transformers loads it
//   model::save_task_checkpoint("task", lm, w);    // only the tensors lm's recipe trains
//   model::apply_task_checkpoint("task", base);    // those tensors over a base model
//
// Loading checks the whole checkpoint -- every tensor present, none unexpected, every
// shape and dtype -- against the safetensors headers before it allocates the model or
// writes a single value, so a config.json that describes another (larger) model than the
// weights costs nothing, and a bad checkpoint never leaves a model half-loaded. Every
// file it opens must be a regular file (a FIFO is refused, never waited on).
//
// Saving is atomic for the directory as a whole (io/atomic_directory.hpp): the weights
// and config.json are written and synced in a staging directory beside the target, which
// then replaces the target in one rename. A save that fails or is killed at any point
// leaves the previous checkpoint -- weights and config.json together -- as it was; other
// files in the directory (tokenizer, README) are kept.
//
// Adapters are not part of a model checkpoint: save them with cl::save_lora_adapter,
// or merge them (cl::lora_merge, then commit()) before saving the model.
#include <algorithm>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "skillgraft/io/atomic_directory.hpp"
#include "skillgraft/io/json_file.hpp"
#include "skillgraft/io/printable.hpp"
#include "skillgraft/io/safetensors.hpp"
#include "skillgraft/io/safetensors_index.hpp"
#include "skillgraft/model/hf_config.hpp"
#include "skillgraft/model/parameters.hpp"
#include "skillgraft/nn/gate_skip.hpp"
#include "skillgraft/nn/moe_mlp.hpp"

namespace skillgraft::model {

namespace fs = std::filesystem;

// The tensors of a checkpoint: model.safetensors, or the shards of
// model.safetensors.index.json (model.safetensors wins when both exist, as in
// transformers). A path to a .safetensors file is read as that one file.
class hf_tensors {
 public:
  explicit hf_tensors(const fs::path& path) {
    if (fs::is_regular_file(path)) {
      open_single(path);
      return;
    }
    if (!fs::is_directory(path)) throw std::invalid_argument("skillgraft: no checkpoint at " + path.string());
    if (fs::exists(path / "model.safetensors")) {
      open_single(path / "model.safetensors");
    } else if (fs::exists(path / "model.safetensors.index.json")) {
      open_sharded(path, path / "model.safetensors.index.json");
    } else {
      throw std::invalid_argument("skillgraft: " + path.string() +
                                  " has neither model.safetensors nor model.safetensors.index.json");
    }
  }

  // The file or index the tensors come from, for messages.
  const fs::path& origin() const { return origin_; }
  bool contains(std::string_view name) const { return owner_.find(name) != owner_.end(); }
  const io::safetensors_file& file_of(std::string_view name) const {
    const auto it = owner_.find(name);
    if (it == owner_.end())
      throw std::invalid_argument("skillgraft: " + origin_.string() + " has no tensor " + io::printable(name));
    return files_[it->second];
  }
  const io::tensor_info& info(std::string_view name) const { return file_of(name).info(name); }
  // Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& [name, file] : owner_) n.push_back(name);
    return n;
  }
  // Metadata of the first file (shards carry the same).
  const std::map<std::string, std::string>& metadata() const { return files_.front().metadata(); }

 private:
  void open_single(const fs::path& file) {
    origin_ = file;
    files_.emplace_back(file);
    for (const auto& t : files_.back().header().tensors) owner_.emplace(t.name, 0);
  }

  // The index's weight_map must describe the shards exactly: each listed tensor in the
  // shard it names, each shard's tensors listed there, so a stale or mixed-up shard set
  // is caught instead of loading a mixture of two checkpoints.
  void open_sharded(const fs::path& dir, const fs::path& index) {
    origin_ = index;
    const auto listed = io::parse_safetensors_index(io::read_json_file(index), index.string());
    std::map<std::string, std::size_t> shard_index;  // shard file name -> files_
    for (const auto& [name, s] : listed)
      if (!shard_index.contains(s)) {
        shard_index.emplace(s, files_.size());
        files_.emplace_back(dir / s);
      }
    for (const auto& [s, i] : shard_index)
      for (const auto& t : files_[i].header().tensors) {
        const auto it = listed.find(t.name);
        if (it == listed.end())
          throw std::invalid_argument("skillgraft: shard " + (dir / s).string() + " holds " + io::printable(t.name) +
                                      ", which " + index.string() + " does not list");
        if (it->second != s)
          throw std::invalid_argument("skillgraft: shard " + (dir / s).string() + " holds " + io::printable(t.name) +
                                      ", which " + index.string() + " places in " + io::printable(it->second));
        owner_.emplace(t.name, i);
      }
    for (const auto& [name, s] : listed)
      if (!owner_.contains(name))
        throw std::invalid_argument("skillgraft: " + index.string() + " places " + io::printable(name) + " in " +
                                    io::printable(s) + ", but that shard does not hold it");
  }

  std::vector<io::safetensors_file> files_;
  std::map<std::string, std::size_t, std::less<>> owner_;  // tensor -> files_
  fs::path origin_;
};

struct hf_load_options {
  // Skip tensors the model does not have (a vision tower, a value head) instead of
  // refusing the checkpoint. Rotary `inv_freq` buffers of old checkpoints are always
  // skipped, as transformers does.
  bool ignore_unexpected = false;
};

struct hf_save_options {
  io::dtype dtype = io::dtype::f32;  // f32, bf16, f16 or f64
};

// Name -> shape of every tensor of a decoder LM with config c, as lm_weights<T>(c) holds
// them (the tied head omitted), computed without allocating anything. `layers`: only
// these layers (all when empty).
inline std::map<std::string, cpu::shape_t, std::less<>> hf_tensor_shapes(const decoder_config& c,
                                                                          const std::vector<int>& layers = {}) {
  c.validate();
  const std::size_t V = std::size_t(c.vocab_size), d = std::size_t(c.hidden);
  std::map<std::string, cpu::shape_t, std::less<>> m;
  m.emplace("model.embed_tokens.weight", cpu::shape_t{V, d});
  m.emplace("model.norm.weight", cpu::shape_t{d});
  if (!c.tie_word_embeddings) m.emplace("lm_head.weight", cpu::shape_t{V, d});
  auto layer = [&](int i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    nn::block_norms::for_each([&](auto e) { m.emplace(p + e.path(), cpu::shape_t{d}); });
    nn::block_projections::for_each([&](auto e) {
      m.emplace(p + e.path() + ".weight", cpu::shape_t{e.out(c), e.in(c)});
      if (e.bias(c)) m.emplace(p + e.path() + ".bias", cpu::shape_t{e.out(c)});
    });
  };
  if (layers.empty())
    for (int i = 0; i < c.n_layers; ++i) layer(i);
  for (int i : layers) layer(i);
  return m;
}

// Metadata key that marks a checkpoint holding only the trainable tensors of a recipe.
inline constexpr const char* task_checkpoint_key = "skillgraft.tensors";

namespace detail {

template <class Tag>
inline constexpr bool is_adapter_tag = false;
template <class P>
inline constexpr bool is_adapter_tag<lora<P>> = true;

inline std::string torch_dtype_name(io::dtype d) {
  switch (d) {
    case io::dtype::f32: return "float32";
    case io::dtype::bf16: return "bfloat16";
    case io::dtype::f16: return "float16";
    case io::dtype::f64: return "float64";
    default:
      throw std::invalid_argument("skillgraft: checkpoints are saved as F32, BF16, F16 or F64, not " +
                                  std::string(io::dtype_name(d)));
  }
}

inline bool is_float_dtype(io::dtype d) {
  return d == io::dtype::f32 || d == io::dtype::bf16 || d == io::dtype::f16 || d == io::dtype::f64;
}

template <class T>
using target_map = std::map<std::string, cpu::tensor<T>*, std::less<>>;

// name -> tensor for every parameter of w (adapters included when attached).
template <class T>
target_map<T> parameter_targets(lm_weights<T>& w) {
  target_map<T> m;
  for_each_parameter(w, [&](const std::string& name, cpu::tensor<T>& t, auto, int) { m.emplace(name, &t); });
  return m;
}

// "a [2, 3], b [4] and 3 more": the first few of a list, for messages.
inline std::string name_list(const std::vector<std::string>& items) {
  constexpr std::size_t shown = 4;
  std::string s;
  for (std::size_t i = 0; i < items.size() && i < shown; ++i) s += (i ? ", " : "") + items[i];
  if (items.size() > shown) s += " and " + std::to_string(items.size() - shown) + " more";
  return s;
}

using shape_map = std::map<std::string, cpu::shape_t, std::less<>>;

template <class T>
shape_map shapes_of(const target_map<T>& targets) {
  shape_map m;
  for (const auto& [name, dst] : targets) m.emplace(name, dst->shape());
  return m;
}

// Checks the checkpoint's headers against `expected` (name -> shape) and returns the
// names to load; throws, naming tensors, files and shapes, before anything is allocated
// or written. `require_all`: every expected tensor must be in the checkpoint. `skip`:
// names the caller handles itself.
inline std::vector<std::string> check_plan(const hf_tensors& src, const shape_map& expected, bool require_all,
                                           bool ignore_unexpected, const std::set<std::string>& skip = {}) {
  std::vector<std::string> missing, unexpected;
  if (require_all)
    for (const auto& [name, shape] : expected)
      if (!src.contains(name)) missing.push_back(io::printable(name) + " (expected " + shape.str() + ")");
  if (!missing.empty()) {
    std::string why = "skillgraft: " + src.origin().string() + " is missing " + std::to_string(missing.size()) +
                      (missing.size() == 1 ? " tensor" : " tensors") + " the model needs: " + name_list(missing);
    const auto& meta = src.metadata();
    if (const auto it = meta.find(task_checkpoint_key); it != meta.end() && it->second == "trainable")
      why += "; this checkpoint holds only the tensors a recipe trains: load it over a base model with "
             "apply_task_checkpoint";
    else if (expected.contains("lm_head.weight") && !src.contains("lm_head.weight"))
      why += "; the config does not tie word embeddings, so lm_head.weight must be in the checkpoint";
    throw std::invalid_argument(why);
  }
  std::vector<std::string> plan;
  for (const std::string& name : src.names()) {
    if (skip.contains(name)) continue;
    // Old Llama checkpoints stored the rotary frequencies; they are recomputed.
    if (name.ends_with("rotary_emb.inv_freq")) continue;
    const io::tensor_info& t = src.info(name);
    const auto it = expected.find(name);
    if (it == expected.end()) {
      unexpected.push_back(io::printable(name) + " " + io::shape_string(t.shape));
      continue;
    }
    const cpu::shape_t& want = it->second;
    const bool same = t.shape.size() == std::size_t(want.rank) &&
                      std::equal(t.shape.begin(), t.shape.end(), want.dims.begin());
    if (!same)
      throw std::invalid_argument("skillgraft: " + io::printable(name) + " has shape " + io::shape_string(t.shape) +
                                  " in " + src.file_of(name).path().string() + ", expected " + want.str());
    if (!is_float_dtype(t.type))
      throw std::invalid_argument("skillgraft: " + io::printable(name) + " in " + src.file_of(name).path().string() +
                                  " is " + std::string(io::dtype_name(t.type)) +
                                  "; weights load from F32, BF16, F16 or F64");
    plan.push_back(name);
  }
  if (!unexpected.empty() && !ignore_unexpected)
    throw std::invalid_argument("skillgraft: " + src.origin().string() + " has " + std::to_string(unexpected.size()) +
                                (unexpected.size() == 1 ? " tensor" : " tensors") +
                                " the model does not have: " + name_list(unexpected) +
                                " (hf_load_options::ignore_unexpected skips them)");
  return plan;
}

// check_plan against the tensors `targets` point to; returns what to load where.
template <class T>
std::vector<std::pair<std::string, cpu::tensor<T>*>> plan_load(const hf_tensors& src, const target_map<T>& targets,
                                                                bool require_all, bool ignore_unexpected,
                                                                const std::set<std::string>& skip = {}) {
  std::vector<std::pair<std::string, cpu::tensor<T>*>> plan;
  for (const auto& name : check_plan(src, shapes_of(targets), require_all, ignore_unexpected, skip))
    plan.emplace_back(name, targets.find(name)->second);
  return plan;
}

template <class T>
void run_plan(const hf_tensors& src, const std::vector<std::pair<std::string, cpu::tensor<T>*>>& plan) {
  // F32/F16/BF16 -> T cannot fail; F64 -> float can (a value beyond float's range), so
  // those tensors are checked first: every tensor is either loaded or untouched.
  for (const auto& [name, dst] : plan) src.file_of(name).template check_range<T>(name);
  for (const auto& [name, dst] : plan) src.file_of(name).load_into(name, *dst);
}

// Checks a checkpoint's headers against the model config.json describes before the
// model is allocated: a config of a larger model than the weights (or sizes near the
// limits) is refused with the tensor and shapes, not after gigabytes of allocation.
// When the config describes more values (or layers) than the files hold, only the tensors
// outside the layers and the first and last layer are compared (enough to name a
// difference without listing billions of names).
inline void check_before_allocating(const hf_tensors& src, const decoder_config& c, bool ignore_unexpected,
                                    const std::set<std::string>& skip) {
  const std::int64_t values = hf_parameter_count(c, src.origin().string());
  std::uint64_t held = 0;
  for (const auto& name : src.names()) {
    const std::uint64_t n = src.info(name).elements();
    held = held + n < held ? std::numeric_limits<std::uint64_t>::max() : held + n;
  }
  // Each layer has several tensors: more layers than tensors cannot match either.
  if (static_cast<std::uint64_t>(values) <= held && std::size_t(c.n_layers) <= src.names().size()) {
    check_plan(src, hf_tensor_shapes(c), true, ignore_unexpected, skip);
    return;
  }
  std::vector<int> layers;
  if (c.n_layers > 0) layers = {0, c.n_layers - 1};
  check_plan(src, hf_tensor_shapes(c, layers), true, true, skip);
  throw std::invalid_argument("skillgraft: the config describes a model of " + std::to_string(values) + " values in " +
                              std::to_string(c.n_layers) + " layers, but " + src.origin().string() + " holds " +
                              std::to_string(held) + " values in " + std::to_string(src.names().size()) + " tensors");
}

// GateSkip residual gates (nn/gate_skip.hpp) are skillgraft's own tensors, not Hugging Face's:
// config.json records them as "skillgraft_residual_gates": "vector" | "scalar" (docs/gateskip.md).
inline constexpr const char* residual_gates_key = "skillgraft_residual_gates";

// The shape of w's residual gates, or none; throws unless every layer has the same.
template <class T>
std::optional<nn::gate_shape> residual_gate_shape(const lm_weights<T>& w) {
  std::optional<nn::gate_shape> shape;
  for (std::size_t i = 0; i < w.trunk.layers.size(); ++i) {
    const auto& l = w.trunk.layers[i];
    std::optional<nn::gate_shape> mine;
    if (l.has_residual_gates())
      mine = l.attn_gate.out_features() == std::size_t(w.config.hidden) ? nn::gate_shape::vector : nn::gate_shape::scalar;
    if (i > 0 && mine != shape)
      throw std::invalid_argument("skillgraft: model.layers." + std::to_string(i) +
                                  " has other residual gates than layer 0 (every layer needs the same)");
    shape = mine;
  }
  return shape;
}
inline const char* gate_shape_name(nn::gate_shape s) { return s == nn::gate_shape::vector ? "vector" : "scalar"; }

template <class Mlp, class T>
void check_layers_with(const lm_weights<T>& w, const typename Mlp::options& o) {
  const auto gates = residual_gate_shape(w);
  for (std::size_t i = 0; i < w.trunk.layers.size(); ++i) {
    const auto& l = w.trunk.layers[i];
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    if (!gates) nn::check_block_weights<Mlp>(l, w.config, prefix, o);
    else if (*gates == nn::gate_shape::vector) nn::check_block_weights<nn::gate_skip<Mlp>>(l, w.config, prefix, {o});
    else nn::check_block_weights<nn::gate_skip<Mlp, nn::gate_shape::scalar>>(l, w.config, prefix, {o});
  }
}
// Act: a gate policy with or without a range (which one of each kind does not matter here).
template <class Act, class T>
void check_layers_under(const lm_weights<T>& w, bool mixture) {
  if (mixture) check_layers_with<nn::moe<Act, 1, false>>(w, {int(w.trunk.layers[0].mlp.router.dim(0))});
  else check_layers_with<nn::swiglu<Act>>(w, {});
}

// Throws, naming the tensor, when w's tensors do not have the shapes its config gives.
template <class T>
void check_lm_weights(const lm_weights<T>& w) {
  const auto& c = w.config;
  c.validate();
  const std::size_t V = std::size_t(c.vocab_size), d = std::size_t(c.hidden);
  cpu::expect_shape(w.embed_tokens, {V, d}, "model.embed_tokens.weight");
  cpu::expect_shape(w.norm, {d}, "model.norm.weight");
  if (c.tie_word_embeddings) {
    if (!w.lm_head.empty())
      throw std::invalid_argument("skillgraft: lm_head.weight is set but the config ties it to model.embed_tokens.weight");
  } else {
    cpu::expect_shape(w.lm_head, {V, d}, "lm_head.weight");
  }
  if (w.trunk.layers.size() != std::size_t(c.n_layers))
    throw std::invalid_argument("skillgraft: the weights have " + std::to_string(w.trunk.layers.size()) +
                                " layers, the config " + std::to_string(c.n_layers));
  if (w.trunk.layers.empty()) return;
  // The weights do not carry their MLP policy, so the layers are checked under the policy
  // their tensors describe (layer 0's): a range alpha (xSiLU, xGELU, xATLU: the same tensors),
  // a router and experts, residual gates. Every other layer must then have the same tensors.
  const auto& mlp0 = w.trunk.layers[0].mlp;
  const bool ranged = !mlp0.act_alpha.empty(), mixture = mlp0.is_mixture();
  if (ranged) check_layers_under<nn::act::xsilu>(w, mixture);
  else check_layers_under<nn::act::silu>(w, mixture);
}

// Throws when the config.json of a checkpoint describes another model than `base`.
inline void check_same_model(const decoder_config& file, const decoder_config& base, const fs::path& where) {
  auto a = decoder_config_to_hf(file), b = decoder_config_to_hf(base);
  std::vector<std::string> diff;
  for (const auto& [key, value] : a.items())
    if (b[key] != value) diff.push_back(key + " " + value.dump() + " (base " + b[key].dump() + ")");
  for (const auto& [key, value] : b.items())
    if (!a.contains(key)) diff.push_back(key + " null (base " + value.dump() + ")");
  if (!diff.empty())
    throw std::invalid_argument("skillgraft: " + where.string() + " describes another model than the base weights: " +
                                name_list(diff));
}

// add(name, tensor) for each tensor to save; writes model.safetensors and config.json
// into a staging directory that replaces `dir` in one rename.
template <class T, class Select>
void write_checkpoint(const fs::path& dir, const lm_weights<T>& w, hf_save_options o, bool task_only, Select&& select) {
  const std::string dtype = torch_dtype_name(o.dtype);
  check_lm_weights(w);
  io::safetensors_writer out;
  out.set_metadata("format", "pt");  // transformers refuses safetensors files without it
  if (task_only) out.set_metadata(task_checkpoint_key, "trainable");
  select([&](const std::string& name, const cpu::tensor<T>& t) { out.add(name, t, o.dtype); });
  nlohmann::json config = decoder_config_to_hf(w.config, dtype);
  if (const auto gates = residual_gate_shape(w)) config[residual_gates_key] = gate_shape_name(*gates);
  io::save_directory(dir, [&](const fs::path& staging) {
    out.write(staging / "model.safetensors");
    io::write_json_file(staging / "config.json", config);
  });
}

}  // namespace detail

// Reads config.json and the weights of a Hugging Face checkpoint directory.
template <class T>
lm_weights<T> load_hf_checkpoint(const fs::path& dir, hf_load_options o = {}) {
  const decoder_config c = read_hf_config(dir / "config.json");
  hf_tensors src(dir);
  // Some exports of tied models still carry lm_head.weight; it must then be the embedding.
  const bool head_copy = c.tie_word_embeddings && src.contains("lm_head.weight");
  const std::set<std::string> skip = head_copy ? std::set<std::string>{"lm_head.weight"} : std::set<std::string>{};
  // GateSkip gates, when config.json records them: made here, then loaded (and checked) by name.
  std::optional<nn::gate_shape> gates;
  if (const auto j = io::read_json_file(dir / "config.json"); j.contains(detail::residual_gates_key)) {
    const auto& v = j[detail::residual_gates_key];
    if (v == "vector") gates = nn::gate_shape::vector;
    else if (v == "scalar") gates = nn::gate_shape::scalar;
    else
      throw std::invalid_argument("skillgraft: " + (dir / "config.json").string() + ": " + detail::residual_gates_key +
                                  " is " + io::json_shown(v) + ", expected \"vector\" or \"scalar\"");
  }
  std::set<std::string> skip_before = skip;
  if (gates)
    for (int i = 0; i < c.n_layers; ++i)
      nn::residual_gates::for_each([&](auto e) {
        for (const char* t : {".weight", ".bias"}) skip_before.insert("model.layers." + std::to_string(i) + "." + e.path() + t);
      });
  if (head_copy && !(src.info("lm_head.weight").shape ==
                     std::vector<std::size_t>{std::size_t(c.vocab_size), std::size_t(c.hidden)}))
    throw std::invalid_argument("skillgraft: lm_head.weight has shape " + io::shape_string(src.info("lm_head.weight").shape) +
                                " in " + src.file_of("lm_head.weight").path().string() + ", expected [" +
                                std::to_string(c.vocab_size) + ", " + std::to_string(c.hidden) + "]");
  detail::check_before_allocating(src, c, o.ignore_unexpected, skip_before);
  lm_weights<T> w(c);
  if (gates) nn::add_residual_gates(w.trunk, *gates, {.bias = 0, .weight_std = 0});
  const auto targets = detail::parameter_targets(w);
  detail::run_plan(src, detail::plan_load(src, targets, true, o.ignore_unexpected, skip));
  if (head_copy) {
    cpu::tensor<T> head(w.embed_tokens.shape(), memory_use::workspace);
    src.file_of("lm_head.weight").load_into("lm_head.weight", head);
    for (std::size_t i = 0; i < head.size(); ++i)
      if (!(head[i] == w.embed_tokens[i]))
        throw std::invalid_argument("skillgraft: " + src.file_of("lm_head.weight").path().string() +
                                    " has an lm_head.weight that differs from model.embed_tokens.weight (element " +
                                    std::to_string(i) + "), but config.json ties them (tie_word_embeddings)");
  }
  return w;
}

// Writes config.json and model.safetensors (Hugging Face names; a tied head is not
// written, as transformers does) into dir, creating it if needed.
template <class T>
void save_hf_checkpoint(const fs::path& dir, const lm_weights<T>& w, hf_save_options o = {}) {
  for (std::size_t i = 0; i < w.trunk.layers.size(); ++i) {
    const auto& l = w.trunk.layers[i];
    nn::block_projections::for_each([&](auto e) {
      const auto& p = e.in_block(l);
      if (p.has_lora() && p.lora_scale != T(0))
        throw std::invalid_argument("skillgraft: layer " + std::to_string(i) +
                                    " has an active LoRA adapter, which a model checkpoint would lose; save it with "
                                    "cl::save_lora_adapter, or merge it (cl::lora_merge, then commit()) first");
    });
  }
  detail::write_checkpoint(dir, w, o, false, [&](auto&& add) {
    for_each_parameter(w, [&](const std::string& name, const cpu::tensor<T>& t, auto tag, int) {
      if constexpr (!detail::is_adapter_tag<typename decltype(tag)::type>) add(name, t);
    });
  });
}

// A small checkpoint of the tensors `model`'s recipe trains (its layer range included,
// adapters when the recipe trains them), with the config.json of the whole model.
template <class Model, class T>
void save_task_checkpoint(const fs::path& dir, const Model& model, const lm_weights<T>& w, hf_save_options o = {}) {
  std::size_t n = 0;
  for_each_trainable_weight(model, w, [&](const std::string&, const cpu::tensor<T>&) { ++n; });
  if (n == 0) throw std::invalid_argument("skillgraft: the recipe trains no tensor, so a task checkpoint would be empty");
  detail::write_checkpoint(dir, w, o, true, [&](auto&& add) { for_each_trainable_weight(model, w, add); });
}

// Loads the tensors a checkpoint holds over `base` (a task checkpoint, or a full one);
// shapes are checked against base and, when the checkpoint has a config.json, the model
// it describes must be base's. Returns the names loaded. Nothing changes on failure.
template <class T>
std::vector<std::string> apply_task_checkpoint(const fs::path& path, lm_weights<T>& base, hf_load_options o = {}) {
  detail::check_lm_weights(base);
  hf_tensors src(path);
  if (fs::is_directory(path) && fs::exists(path / "config.json"))
    detail::check_same_model(read_hf_config(path / "config.json"), base.config, path / "config.json");
  const auto plan = detail::plan_load(src, detail::parameter_targets(base), false, o.ignore_unexpected);
  detail::run_plan(src, plan);
  std::vector<std::string> names;
  for (const auto& [name, dst] : plan) names.push_back(name);
  return names;
}

}  // namespace skillgraft::model
