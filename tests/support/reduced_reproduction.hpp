#pragma once
// The reproduction (examples/reproduce) with a model small enough that a whole run takes
// seconds, writing under a fresh directory. Include after the reproduction's pipeline.hpp.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace skillgraft::test {

inline reproduce::settings reduced_settings(const std::string& name) {
  reproduce::settings s = reproduce::default_settings();
  auto& v = s.model.vision.blocks;
  v.hidden = 16, v.n_heads = 2, v.n_kv_heads = 2, v.head_dim = 8, v.intermediate = 24, v.n_layers = 1;
  s.model.projector = {.in = s.model.vision.out_features(), .intermediate = 24, .out = 32};
  auto& t = s.model.text;
  t.hidden = 32, t.n_heads = 2, t.n_kv_heads = 1, t.head_dim = 16, t.intermediate = 48, t.n_layers = 2;
  s.vision_pretext.steps = 2, s.vision_pretext.batch = 4;
  s.pretrain_steps = 3, s.pretrain_batch = 8;
  s.stage_steps = 12, s.stage_batch = 4;
  s.seeds = 1;
  s.test_examples = 6, s.probe_examples = 4;
  // The fixed rates: a test of the learning-rate search turns it on with a grid of its own.
  s.lr_grid.clear(), s.validation_examples = 6;
  s.quiet = true;
  s.out = std::filesystem::temp_directory_path() / ("skillgraft_reproduce_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(s.out);
  return s;
}

// The whole of a report file the run wrote.
inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace skillgraft::test
