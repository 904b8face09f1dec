#pragma once
// LoRA adapters as PEFT saves them: a directory with adapter_model.safetensors
// (base_model.model.model.layers.{i}.mlp.gate_proj.lora_A.weight, ...) and
// adapter_config.json (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
// target_modules, layers_to_transform), so `PeftModel.from_pretrained(base, dir)` loads
// what we train and we load what PEFT trains.
//
//   cl::attach_lora(lm, w, {.rank = 8, .alpha = 16});
//   ... train ...
//   cl::save_lora_adapter("adapter", w, {.base_model_name_or_path = "Qwen/Qwen2-0.5B"});
//   cl::load_lora_adapter("adapter", w2);   // w2 has the same adapters attached
//
// Loading fills adapters that are already attached (attach_lora with the recipe that
// trains them); it checks the rank, the targeted modules and layers, and every shape
// against them before it writes anything, and sets each adapter's scale from the file
// (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora). r and the layer numbers must be
// integers in range and lora_alpha a finite number.
//
// Saving is atomic for the directory: both files go to a staging directory that replaces
// the target in one rename (io/atomic_directory.hpp), so an interrupted save leaves the
// previous adapter -- weights and adapter_config.json together -- as it was.
#include <climits>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "skillgraft/cl/lora.hpp"
#include "skillgraft/io/atomic_directory.hpp"
#include "skillgraft/io/json_file.hpp"
#include "skillgraft/io/printable.hpp"
#include "skillgraft/io/safetensors.hpp"

namespace skillgraft::cl {

struct peft_save_options {
  std::string base_model_name_or_path;  // written when not empty (null otherwise, as PEFT does)
  io::dtype dtype = io::dtype::f32;     // f32, bf16, f16 or f64
};

namespace detail {

// One attached adapter: its projection's model name ("model.layers.3.mlp.up_proj"),
// layer and PEFT module name ("up_proj").
template <class Linear>
struct adapter_site {
  std::string name;
  int layer;
  std::string module;
  Linear* linear;
};

// Every projection of w, attached or not, in model order. (for_each_projection takes a
// mutable trunk; the const overload only reads through it.)
template <class T>
std::vector<adapter_site<nn::linear_weights<T>>> adapter_sites(model::lm_weights<T>& w) {
  std::vector<adapter_site<nn::linear_weights<T>>> sites;
  for_each_projection(w.trunk, [&](const std::string& name, nn::linear_weights<T>& l) {
    const std::size_t layer_begin = std::string("model.layers.").size();
    const int layer = std::stoi(name.substr(layer_begin, name.find('.', layer_begin) - layer_begin));
    sites.push_back({name, layer, name.substr(name.rfind('.') + 1), &l});
  });
  return sites;
}
template <class T>
std::vector<adapter_site<const nn::linear_weights<T>>> adapter_sites(const model::lm_weights<T>& w) {
  std::vector<adapter_site<const nn::linear_weights<T>>> sites;
  for (auto& s : adapter_sites(const_cast<model::lm_weights<T>&>(w))) sites.push_back({s.name, s.layer, s.module, s.linear});
  return sites;
}

inline std::string join(const std::set<std::string>& items) {
  std::string s;
  for (const auto& i : items) s += (s.empty() ? "" : ", ") + i;
  return s;
}
inline std::string join(const std::set<int>& items) {
  std::string s;
  for (int i : items) s += (s.empty() ? "" : ", ") + std::to_string(i);
  return s;
}

// The seven projections PEFT can target by module name in these models.
inline bool is_projection_name(const std::string& m) {
  bool found = false;
  nn::block_projections::for_each([&](auto e) { found = found || e.name() == m; });
  return found;
}

}  // namespace detail

// Writes adapter_model.safetensors and adapter_config.json for every adapter attached
// to w. PEFT describes adapters as target modules x layers with one rank and one alpha,
// so the attached adapters must have that form (attach_lora always gives it).
template <class T>
void save_lora_adapter(const std::filesystem::path& dir, const model::lm_weights<T>& w, peft_save_options o = {}) {
  const std::string where = (dir / "adapter_config.json").string();
  std::set<std::string> modules;
  std::set<int> layers;
  std::set<std::pair<int, std::string>> present;
  std::size_t rank = 0;
  T scale = T(0);
  io::safetensors_writer out;
  out.set_metadata("format", "pt");
  for (const auto& s : detail::adapter_sites(w)) {
    const auto& l = *s.linear;
    if (!l.has_lora()) continue;
    if (rank == 0) {
      rank = l.lora.rank();
      scale = l.lora_scale;
    }
    if (l.lora.rank() != rank || l.lora_scale != scale)
      throw std::invalid_argument("skillgraft: " + s.name + " has an adapter of rank " + std::to_string(l.lora.rank()) +
                                  " and scale " + std::to_string(double(l.lora_scale)) + ", others rank " +
                                  std::to_string(rank) + " and scale " + std::to_string(double(scale)) +
                                  "; " + where + " has one r and one lora_alpha for all");
    cpu::expect_shape(l.lora.A, {rank, l.in_features()}, s.name + ".lora_A.weight");
    cpu::expect_shape(l.lora.B, {l.out_features(), rank}, s.name + ".lora_B.weight");
    modules.insert(s.module);
    layers.insert(s.layer);
    present.insert({s.layer, s.module});
    out.add(peft_name(s.name + ".lora_A.weight"), l.lora.A, o.dtype);
    out.add(peft_name(s.name + ".lora_B.weight"), l.lora.B, o.dtype);
  }
  if (rank == 0) throw std::invalid_argument("skillgraft: no LoRA adapter is attached, so there is nothing to save");
  for (int layer : layers)
    for (const auto& m : modules)
      if (!present.contains({layer, m}))
        throw std::invalid_argument("skillgraft: layer " + std::to_string(layer) + " has no adapter on " + m +
                                    " although other layers do; " + where +
                                    " can only describe the same target modules on every adapted layer");
  if (scale == T(0))
    throw std::invalid_argument("skillgraft: the adapters have scale 0 (merged into the weights by lora_merge); "
                                "unmerge them, or save the merged model instead");

  // lora_alpha is usually a whole number; give it back as one when the scale came from one.
  double alpha = double(scale) * double(rank);
  nlohmann::json alpha_json = alpha;
  if (const double whole = std::round(alpha); T(whole / double(rank)) == scale) alpha_json = static_cast<long long>(whole);
  nlohmann::json layer_list = nullptr;
  if (layers.size() != w.trunk.layers.size()) layer_list = std::vector<int>(layers.begin(), layers.end());
  nlohmann::json config = {
      {"alpha_pattern", nlohmann::json::object()},
      {"base_model_name_or_path", o.base_model_name_or_path.empty() ? nlohmann::json(nullptr)
                                                                    : nlohmann::json(o.base_model_name_or_path)},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layers_pattern", nullptr},
      {"layers_to_transform", layer_list},
      {"lora_alpha", alpha_json},
      {"lora_dropout", 0.0},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"r", rank},
      {"rank_pattern", nlohmann::json::object()},
      {"revision", nullptr},
      {"target_modules", std::vector<std::string>(modules.begin(), modules.end())},
      {"task_type", "CAUSAL_LM"},
      {"use_dora", false},
      {"use_rslora", false}};
  io::save_directory(dir, [&](const std::filesystem::path& staging) {
    out.write(staging / "adapter_model.safetensors");
    io::write_json_file(staging / "adapter_config.json", config);
  });
}

// Loads a PEFT LoRA adapter directory into the adapters attached to w; returns how many.
template <class T>
int load_lora_adapter(const std::filesystem::path& dir, model::lm_weights<T>& w) {
  const std::filesystem::path config_file = dir / "adapter_config.json";
  const std::string where = config_file.string();
  const nlohmann::json j = io::read_json_file(config_file);
  auto refuse = [&](const std::string& what) { throw std::invalid_argument("skillgraft: " + where + " " + what); };
  if (!j.is_object()) refuse("is not a JSON object");
  const std::string type = j.value("peft_type", std::string());
  if (type != "LORA") refuse("has peft_type \"" + io::printable(type) + "\"; only LORA adapters load");
  // What plain LoRA on the seven projections cannot express is refused, not ignored.
  if (j.value("use_dora", false)) refuse("uses DoRA (use_dora), which is not supported");
  if (j.value("fan_in_fan_out", false)) refuse("sets fan_in_fan_out, which is for GPT-2's Conv1D layers");
  if (j.contains("bias") && j.at("bias") != "none") refuse("trains biases (bias " + io::json_shown(j.at("bias")) + ")");
  for (const char* key : {"rank_pattern", "alpha_pattern"})
    if (j.contains(key) && !j.at(key).is_null() && !j.at(key).empty())
      refuse(std::string("has a ") + key + "; only one rank and one alpha for all adapters are supported");
  // Newer PEFT options that change what the adapter computes or trains; off means null,
  // false or empty in every PEFT version that writes them.
  for (const char* key : {"modules_to_save", "layer_replication", "exclude_modules", "lora_bias", "use_qalora",
                          "use_bdlora", "target_parameters", "trainable_token_indices", "alora_invocation_tokens"})
    if (j.contains(key)) {
      const auto& v = j.at(key);
      if (!(v.is_null() || v == false || (v.is_structured() && v.empty())))
        refuse(std::string("sets ") + key + " (" + io::json_shown(v) + "), which is not supported");
    }

  std::size_t r = 0;
  double alpha = 0;
  std::set<std::string> targets;
  std::set<int> chosen_layers;
  bool all_layers = true;
  try {
    if (!j.contains("r")) refuse("has no \"r\"");
    r = std::size_t(io::json_integer(j.at("r"), "r", where, 1, INT_MAX));
    alpha = j.contains("lora_alpha") ? io::json_real(j.at("lora_alpha"), "lora_alpha", where) : 8.0;  // PEFT's default
    if (!j.contains("target_modules") || !j.at("target_modules").is_array())
      refuse("has no list of target_modules (a regular expression is not supported)");
    for (const auto& m : j.at("target_modules")) {
      const std::string name = m.get<std::string>();
      if (!detail::is_projection_name(name))
        refuse("targets \"" + io::printable(name) + "\"; adapters go on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
      targets.insert(name);
    }
    if (j.contains("layers_to_transform") && !j.at("layers_to_transform").is_null()) {
      all_layers = false;
      const auto& lt = j.at("layers_to_transform");
      auto layer = [&](const nlohmann::json& l) {
        chosen_layers.insert(int(io::json_integer(l, "a layers_to_transform entry", where, INT_MIN, INT_MAX)));
      };
      if (lt.is_number()) layer(lt);
      else if (lt.is_array())
        for (const auto& l : lt) layer(l);
      else
        refuse("has layers_to_transform " + io::json_shown(lt) + "; expected a layer number or a list of them");
    }
  } catch (const nlohmann::json::exception& e) {
    refuse(std::string("has a field of the wrong type: ") + io::printable(e.what()));
  }
  const T scale = T(j.value("use_rslora", false) ? alpha / std::sqrt(double(r)) : alpha / double(r));

  for (int layer : chosen_layers)
    if (layer < 0 || layer >= int(w.trunk.layers.size()))
      refuse("lists layer " + std::to_string(layer) + " in layers_to_transform; the model has " +
             std::to_string(w.trunk.layers.size()) + " layers");

  // Expected adapters (from the file) against attached ones (in w).
  const auto sites = detail::adapter_sites(w);
  std::map<std::string, nn::linear_weights<T>*> expected;  // PEFT tensor prefix -> projection
  for (const auto& s : sites) {
    const bool wanted = targets.contains(s.module) && (all_layers || chosen_layers.contains(s.layer));
    const bool attached = s.linear->has_lora();
    if (wanted && !attached)
      refuse("targets " + s.module + " on layer " + std::to_string(s.layer) + ", but " + s.name +
             " has no adapter attached (attach_lora with a recipe that adapts it)");
    if (attached && !wanted)
      refuse("does not target " + s.name + " (target_modules " + detail::join(targets) + ", layers " +
             (all_layers ? std::string("all") : detail::join(chosen_layers)) + "), but an adapter is attached there");
    if (!wanted) continue;
    if (s.linear->lora.rank() != r)
      refuse("has r " + std::to_string(r) + ", but the adapter attached to " + s.name + " has rank " +
             std::to_string(s.linear->lora.rank()));
    expected.emplace(peft_name(s.name), s.linear);
  }

  io::safetensors_file file(dir / "adapter_model.safetensors");
  std::set<std::string> in_file;
  for (const auto& t : file.header().tensors) in_file.insert(t.name);
  std::vector<std::pair<std::string, cpu::tensor<T>*>> plan;
  for (auto& [prefix, l] : expected)
    for (auto [suffix, dst] : {std::pair{".lora_A.weight", &l->lora.A}, std::pair{".lora_B.weight", &l->lora.B}}) {
      const std::string name = prefix + suffix;
      if (!in_file.contains(name))
        throw std::invalid_argument("skillgraft: " + file.path().string() + " has no tensor " + io::printable(name) + " (expected " +
                                    dst->shape().str() + ")");
      const io::tensor_info& t = file.info(name);
      if (io::shape_string(t.shape) != dst->shape().str())
        throw std::invalid_argument("skillgraft: " + io::printable(name) + " has shape " + io::shape_string(t.shape) + " in " +
                                    file.path().string() + ", expected " + dst->shape().str());
      if (t.type != io::dtype::f32 && t.type != io::dtype::bf16 && t.type != io::dtype::f16 && t.type != io::dtype::f64)
        throw std::invalid_argument("skillgraft: " + io::printable(name) + " in " + file.path().string() + " is " +
                                    std::string(io::dtype_name(t.type)) + "; adapters load from F32, BF16, F16 or F64");
      in_file.erase(name);
      plan.emplace_back(name, dst);
    }
  if (!in_file.empty())
    throw std::invalid_argument("skillgraft: " + file.path().string() + " has " + std::to_string(in_file.size()) +
                                " tensors no attached adapter takes, e.g. " + io::printable(*in_file.begin()));
  for (const auto& [name, dst] : plan) file.check_range<T>(name);  // nothing is written if one fails
  for (const auto& [name, dst] : plan) file.load_into(name, *dst);
  for (auto& [prefix, l] : expected) l->lora_scale = scale;
  return int(expected.size());
}

}  // namespace skillgraft::cl
