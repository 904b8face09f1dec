#pragma once
// From examples to tensors: token ids with right padding, next-token targets on the
// answer only, and image batches [batch, 32, 32, 3].
//
//   ids      prompt <sep> answer <pad>...
//   targets  ignore on the image tokens and the prompt; from <sep> on, each position's
//            target is the next answer word, and the last answer word's is <eos>.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/model/token_batch.hpp"
#include "tasks.hpp"

namespace skillgraft::reproduce {

struct encoded_batch {
  token_ids ids;
  token_ids targets;
  cpu::tensor<float> images;  // empty for text-only batches
};

inline cpu::tensor<float> image_batch(const std::vector<const example*>& rows) {
  constexpr std::size_t S = canvas::size, n = S * S * 3;
  cpu::tensor<float> t({rows.size(), S, S, 3}, memory_use::workspace);
  for (std::size_t b = 0; b < rows.size(); ++b) std::copy_n(rows[b]->image.pixels().data(), n, t.data() + b * n);
  return t;
}

// Training rows: all with images or all without (one soft-token prefix length per batch).
inline encoded_batch encode_for_training(const tokenizer& tok, const std::vector<const example*>& rows, int image_tokens) {
  if (rows.empty()) throw std::invalid_argument("reproduce: an empty batch");
  const bool images = rows.front()->has_image;
  std::vector<std::vector<std::int64_t>> prompts, answers;
  std::size_t L = 0;
  for (const auto* e : rows) {
    if (e->has_image != images) throw std::invalid_argument("reproduce: a batch mixes image and text-only rows");
    prompts.push_back(tok.encode(e->prompt));
    answers.push_back(tok.encode(e->answer));
    L = std::max(L, prompts.back().size() + 1 + answers.back().size());
  }
  const std::size_t B = rows.size(), P = images ? std::size_t(image_tokens) : 0;
  encoded_batch out;
  out.ids = xt::full_like(token_ids::from_shape({B, L}), tok.pad());
  out.targets = xt::full_like(token_ids::from_shape({B, P + L}), ignore_index);
  for (std::size_t b = 0; b < B; ++b) {
    const auto& p = prompts[b];
    const auto& a = answers[b];
    std::size_t t = 0;
    for (auto id : p) out.ids(b, t++) = id;
    const std::size_t sep_at = t;
    out.ids(b, t++) = tok.sep();
    for (auto id : a) out.ids(b, t++) = id;
    for (std::size_t i = 0; i <= a.size(); ++i)  // position sep_at + i predicts a[i], then <eos>
      out.targets(b, P + sep_at + i) = i < a.size() ? a[i] : tok.eos();
  }
  if (images) out.images = image_batch(rows);
  return out;
}

// The endless training stream of one task: example i is the same on every run with the same seed.
class example_stream {
 public:
  example_stream(const task& t, std::uint64_t seed) : task_(&t), rng_(seed) {}
  example next() { return task_->make(rng_); }
  const task& source() const { return *task_; }

 private:
  const task* task_;
  std::mt19937_64 rng_;
};

// FNV-1a over n bytes, continuing from h: a stable 64-bit hash.
inline std::uint64_t fnv1a(const void* data, std::size_t n, std::uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// A stable 64-bit hash of a name, for per-task seeds.
inline std::uint64_t name_hash(const std::string& s) { return fnv1a(s.data(), s.size()); }

// Seeds of the fixed splits: the test set and the probe set never share a seed with training.
inline std::uint64_t train_seed(std::uint64_t run_seed, const std::string& task, int stream = 0) {
  return name_hash(task) ^ (run_seed * 0x9E3779B97F4A7C15ull) ^ (std::uint64_t(stream) << 32) ^ 0x7261696eull;
}
inline std::uint64_t test_seed(const std::string& task) { return name_hash(task) ^ 0x74657374ull; }

inline std::vector<example> make_test_set(const task& t, int n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<example> v;
  v.reserve(std::size_t(n));
  for (int i = 0; i < n; ++i) v.push_back(t.make(rng));
  return v;
}

}  // namespace skillgraft::reproduce
