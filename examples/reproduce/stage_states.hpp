#pragma once
// Stage states: the weights a learning-rate search run reached after each stage it trained, and
// inside the counting stage at each step the counting-bias probe looks at, kept so that the
// reported run of the same method, rate and seed starts from them instead of training those
// stages again. The search trains exactly those stages (the same steps on the same data from
// the same base model, on the same thread count), so the reported numbers are bit for bit those
// of training them again (tests/test_reproduce_pipeline.cpp checks it); the default run trains
// 24 of its 156 stages fewer.
//
// A state file holds only the tensors that differ from the base model (the ones the recipe
// trains), a checksum of the whole model they make with it, what the run had measured by then
// (its training seconds, the stage's last loss, its peak memory, its trainable count) and the
// name of the run it belongs to, checked when it is read. Only methods whose state after a
// stage is their weights alone take part: not WiSE-FT (its running average), LoRA (adapters
// drawn again each stage) or MoE (an expert added each stage).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "skillgraft/cl/metrics_csv.hpp"
#include "skillgraft/io/safetensors.hpp"

#include "weights.hpp"

namespace skillgraft::reproduce {

// What a run records of its stages, or takes from them when it resumes.
struct stage_states {
  enum class mode { none, record, resume };
  mode use = mode::none;
  std::filesystem::path dir;  // this run's files
  std::string run;            // whose states: method, rate, seed and base model (run_name)
  std::size_t stages = 0;     // resume: how many leading stages come from dir

  bool records() const { return use == mode::record; }
  // Whether stage k (0-based) is read from dir rather than trained.
  bool resumes(std::size_t k) const { return use == mode::resume && k < stages; }
};

// The name a search run gives its states and a reported run asks for.
inline std::string stage_run_name(const std::string& method, const std::string& rate, std::uint64_t seed,
                                  const std::string& base_checksum) {
  return method + " lr " + rate + " seed " + std::to_string(seed) + " base " + base_checksum;
}

// What the run had measured when a state was saved.
struct stage_record {
  double train_seconds = 0;     // the run's optimisation time so far
  double final_loss = 0;        // the stage's last training loss
  std::int64_t peak_bytes = 0;  // the run's training peak so far, above what it found allocated
  std::size_t trainable = 0;    // trainable elements
};

inline constexpr const char* stage_state_key = "skillgraft.reproduce.stage_state";

// Stage `stage` (1-based) after its last step (step 0), or after `step` steps.
inline std::filesystem::path stage_state_file(const stage_states& st, std::size_t stage, int step = 0) {
  return st.dir / ("stage" + std::to_string(stage) + (step > 0 ? "_step" + std::to_string(step) : "") + ".safetensors");
}

inline std::string stage_state_label(const stage_states& st, std::size_t stage, int step) {
  return st.run + " stage " + std::to_string(stage) + " step " + std::to_string(step);
}

inline void save_stage_state(const weights_t& w, const weights_t& base, const stage_states& st, std::size_t stage,
                             int step, const stage_record& r) {
  std::vector<const cpu::tensor<float>*> from;
  model::for_each_multimodal_parameter(const_cast<weights_t&>(base),
                                       [&](const std::string&, cpu::tensor<float>& t) { from.push_back(&t); });
  io::safetensors_writer out;
  std::size_t i = 0;
  model::for_each_multimodal_parameter(const_cast<weights_t&>(w), [&](const std::string& name, cpu::tensor<float>& t) {
    const cpu::tensor<float>& b = *from[i++];
    if (!(b.shape() == t.shape())) throw std::logic_error("reproduce: a stage state of " + name + " in another shape");
    if (std::memcmp(b.data(), t.data(), t.bytes()) != 0) out.add(name, t);
  });
  out.set_metadata("format", "pt");
  out.set_metadata(stage_state_key, stage_state_label(st, stage, step));
  out.set_metadata(content_checksum_key, content_checksum(w));
  out.set_metadata("train_seconds", cl::detail::csv_number(r.train_seconds));
  out.set_metadata("final_loss", cl::detail::csv_number(r.final_loss));
  out.set_metadata("peak_bytes", std::to_string(r.peak_bytes));
  out.set_metadata("trainable", std::to_string(r.trainable));
  std::filesystem::create_directories(st.dir);
  out.write(stage_state_file(st, stage, step));
}

// w: the base model with the state's tensors in place of its own. Throws naming the file when
// it belongs to another run or its content does not match its checksum.
inline stage_record load_stage_state(weights_t& w, const weights_t& base, const stage_states& st, std::size_t stage,
                                     int step) {
  const auto path = stage_state_file(st, stage, step);
  const io::safetensors_file f(path);
  const auto& meta = f.metadata();
  const auto field = [&](const char* key) -> const std::string& {
    const auto it = meta.find(key);
    if (it == meta.end())
      throw std::runtime_error("reproduce: the stage state " + path.string() + " has no '" + key + "' metadata");
    return it->second;
  };
  const std::string wanted = stage_state_label(st, stage, step);
  if (field(stage_state_key) != wanted)
    throw std::runtime_error("reproduce: the stage state " + path.string() + " is of '" + field(stage_state_key) +
                             "', not of '" + wanted + "'");
  copy_weights(base, w);
  std::size_t found = 0;
  model::for_each_multimodal_parameter(w, [&](const std::string& name, cpu::tensor<float>& t) {
    if (f.contains(name)) f.load_into(name, t), ++found;
  });
  if (found != f.header().tensors.size())
    throw std::runtime_error("reproduce: the stage state " + path.string() + " holds tensors this model does not have");
  if (const std::string sum = content_checksum(w); sum != field(content_checksum_key))
    throw std::runtime_error("reproduce: the stage state " + path.string() + " is damaged: its content checksum is " +
                             sum + ", but the file records " + field(content_checksum_key));
  stage_record r;
  try {
    r.train_seconds = std::stod(field("train_seconds"));
    r.final_loss = std::stod(field("final_loss"));
    r.peak_bytes = std::stoll(field("peak_bytes"));
    r.trainable = std::stoull(field("trainable"));
  } catch (const std::logic_error&) {  // std::invalid_argument, std::out_of_range
    throw std::runtime_error("reproduce: the stage state " + path.string() + " has a malformed measurement");
  }
  return r;
}

}  // namespace skillgraft::reproduce
