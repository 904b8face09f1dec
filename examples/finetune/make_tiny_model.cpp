// Writes a tiny random Llama checkpoint (config.json + model.safetensors) and a token file
// of simple patterns, for running the fine-tuning example without downloading a model.
//
//   make_tiny_model <dir>     -> <dir>/model/, <dir>/tokens.txt
#include <skillgraft/model/hf_checkpoint.hpp>

#include <cstdio>
#include <fstream>
#include <random>

namespace sg = skillgraft;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_tiny_model <dir>\n");
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  sg::decoder_config c;
  c.hidden = 32, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 8, c.intermediate = 64, c.n_layers = 2;
  c.max_seq = 32, c.vocab_size = 40;
  sg::model::lm_weights<float> w(c);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 0.1f);
  sg::model::for_each_parameter(w, [&](const std::string& name, sg::cpu::tensor<float>& t, auto, int) {
    const bool norm = name.ends_with("norm.weight");
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = norm ? 1.f : normal(rng);
  });
  sg::model::save_hf_checkpoint(dir / "model", w);

  // Arithmetic sequences modulo the vocabulary: the next token follows from the two before.
  std::ofstream tokens(dir / "tokens.txt");
  std::uniform_int_distribution<int> start(0, c.vocab_size - 1), step(1, 3), length(8, 16);
  for (int line = 0; line < 160; ++line) {
    const int a = start(rng), d = step(rng), n = length(rng);
    for (int i = 0; i < n; ++i) tokens << (a + i * d) % c.vocab_size << (i + 1 < n ? ' ' : '\n');
  }
  std::printf("wrote %s and %s\n", (dir / "model").string().c_str(), (dir / "tokens.txt").string().c_str());
  return tokens ? 0 : 1;
}
