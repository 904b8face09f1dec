#pragma once
// Pretraining of the vision path alone, before the joint pretraining: the paper's models
// start from a vision encoder trained on billions of images, and a ViT trained jointly from
// scratch with a language model on this budget never learned to tell shapes apart.
//
// The pretext is dense labelling from the generators' own facts: every image token (a patch,
// or a merged group of patches) is labelled with the shape, the colour and the size class of
// the object covering most of its pixels ("none" where no object covers enough). A linear
// head on the encoder's output predicts the three labels; the loss is the mean of their
// cross-entropies over tokens. Token-level labels bind each attribute to a place, which is
// what "what shape is the red object ?" needs: the language model finds the red token and
// reads its shape. The head is thrown away afterwards.
#include <array>
#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "skillgraft/model/vision_encoder.hpp"
#include "skillgraft/nn/linear.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"

#include "data.hpp"
#include "progress.hpp"
#include "tasks.hpp"

namespace skillgraft::reproduce {

struct vision_pretext_options {
  // 4000 steps: at 1500 the tokens' shape was 92.5 % right and the language model never
  // learned to find an object named by its shape (the colour question); at 4000, 98.3 %, and
  // it did (docs/reproduction.md, "The task mixture").
  int steps = 4000;
  int batch = 32;
  double lr = 2e-3;
  // What identifies the pretext in the base-model cache's metadata.
  std::string fingerprint() const {
    std::ostringstream o;
    o << "vision-pretext " << steps << "x" << batch << " lr " << lr;
    return o.str();
  }
};

// The label groups and their classes (class 0 of each: no object).
inline constexpr std::array<int, 3> pretext_classes{1 + 5, 1 + 6, 1 + 2};  // shape, colour, size
inline constexpr int pretext_outputs = pretext_classes[0] + pretext_classes[1] + pretext_classes[2];
// A token is labelled with an object only when the object covers at least this many of its pixels.
inline constexpr int pretext_min_pixels = 3;

struct pretext_example {
  canvas image;
  std::vector<std::array<int, 3>> labels;  // per token: shape, colour, size class
};

// Labels of every token of a `side` x `side` grid over the canvas, from the objects drawn.
inline std::vector<std::array<int, 3>> token_labels(const std::vector<object>& objects, int side) {
  const int cell = canvas::size / side;
  std::vector<std::array<int, 3>> out(std::size_t(side * side), {0, 0, 0});
  for (int ty = 0; ty < side; ++ty)
    for (int tx = 0; tx < side; ++tx) {
      int best = pretext_min_pixels - 1;
      for (const auto& o : objects) {
        int n = 0;
        for (int y = ty * cell; y < (ty + 1) * cell; ++y)
          for (int x = tx * cell; x < (tx + 1) * cell; ++x) n += inside_shape(o.shape, o.cx, o.cy, o.r, x, y);
        if (n > best) {
          best = n;
          out[std::size_t(ty * side + tx)] = {1 + int(o.shape), 1 + o.colour, o.r >= 5 ? 2 : 1};
        }
      }
    }
  return out;
}

// One to three separated objects of any shape, colour and size the general tasks use.
inline pretext_example make_pretext_example(std::mt19937_64& rng, int side) {
  std::vector<object> objects;
  for (int i = 0, n = gen::uniform(rng, 1, 3); i < n; ++i) {
    object o;
    o.shape = gen::random_shape(rng);
    o.colour = gen::uniform(rng, 0, 5);
    o.r = gen::uniform(rng, 2, 7);
    if (gen::place(rng, o, objects, 100)) objects.push_back(o);
  }
  return {gen::scene(rng, objects), token_labels(objects, side)};
}

// The encoder with the pretext head: the trainable tensors AdamW visits.
struct vision_pretext_model {
  using encoder_t = model::vision_encoder<float, true>;
  struct weights_t {
    model::vision_weights<float>* vision;
    nn::linear_weights<float> head;
  };
  struct grads_t {
    encoder_t::grads_t vision;
    nn::linear_weights<float> head;
  };
  template <class F>
  void for_each_trainable(weights_t& w, grads_t& g, F&& f) const {
    encoder_t::for_each_trainable(*w.vision, g.vision, f);
    f(std::string("pretext_head.weight"), w.head.weight, g.head.weight);
    f(std::string("pretext_head.bias"), w.head.bias, g.head.bias);
  }
};

// Softmax cross-entropy of each label group on logits [rows, pretext_outputs]; writes the
// gradient (scaled by `scale`) into dlogits and returns the summed loss; counts the tokens
// whose label each group gets right into `correct`, and, of the tokens an object covers (the
// minority: most are background, which every group calls "none" easily), into
// `object_correct` and `object_tokens`.
struct pretext_counts {
  std::array<std::size_t, 3> correct{}, object_correct{};
  std::size_t object_tokens = 0;
};
inline double pretext_loss(const cpu::tensor<float>& logits, const std::vector<std::array<int, 3>>& labels,
                           cpu::tensor<float>* dlogits, double scale, pretext_counts& counts) {
  double loss = 0;
  for (std::size_t r = 0; r < labels.size(); ++r) {
    counts.object_tokens += labels[r][0] != 0;
    const float* z = logits.data() + r * pretext_outputs;
    float* dz = dlogits ? dlogits->data() + r * pretext_outputs : nullptr;
    int at = 0;
    for (std::size_t g = 0; g < pretext_classes.size(); ++g) {
      const int n = pretext_classes[g], y = labels[r][g];
      float top = z[at];
      int arg = 0;
      for (int c = 1; c < n; ++c)
        if (z[at + c] > top) top = z[at + c], arg = c;
      double sum = 0;
      for (int c = 0; c < n; ++c) sum += std::exp(double(z[at + c] - top));
      loss += std::log(sum) - double(z[at + y] - top);
      counts.correct[g] += arg == y;
      if (labels[r][0] != 0) counts.object_correct[g] += arg == y;
      if (dz)
        for (int c = 0; c < n; ++c)
          dz[at + c] = float(scale * (std::exp(double(z[at + c] - top)) / sum - (c == y ? 1.0 : 0.0)));
      at += n;
    }
  }
  return loss;
}

struct vision_pretext_result {
  double final_loss = 0;
  std::array<double, 3> token_accuracy{};         // shape, colour, size on a held-apart set
  std::array<double, 3> object_token_accuracy{};  // the same on the tokens an object covers
};

// Trains w.vision on the pretext (the projector and language model are untouched).
inline vision_pretext_result pretrain_vision(model::multimodal_weights<float>& w, const vision_pretext_options& o,
                                             std::uint64_t seed, progress& prog) {
  const auto& vc = w.config.vision;
  const int side = int(std::lround(std::sqrt(double(vc.tokens()))));
  if (side * side != vc.tokens() || canvas::size % side != 0)
    throw std::invalid_argument("reproduce: the vision pretext needs a square token grid that divides the image");
  vision_pretext_model model;
  vision_pretext_model::encoder_t encoder(vc);
  const auto d = std::size_t(vc.out_features());
  vision_pretext_model::weights_t pw{&w.vision, nn::linear_weights<float>(pretext_outputs, d, true, memory_use::weights)};
  {
    std::mt19937_64 init(seed ^ 0x68656164ull);
    std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(d)));
    for (std::size_t i = 0; i < pw.head.weight.size(); ++i) pw.head.weight[i] = float(nd(init));
    pw.head.bias.set_zero();
  }
  vision_pretext_model::grads_t g{encoder.make_grads(w.vision), pw.head.like(memory_use::gradients)};
  train::adamw<float> opt(model, pw, g, {.lr = o.lr, .weight_decay = 0.01});
  const train::cosine_schedule sched{.peak = o.lr, .floor = 0.1 * o.lr, .warmup = std::max(1, o.steps / 20), .total = o.steps};

  // One pass over a batch: forward, loss, and (when training) backward into g.
  auto pass = [&](const std::vector<pretext_example>& rows, bool train, pretext_counts& counts) {
    std::vector<const example*> ptrs;
    std::vector<example> wrapped(rows.size());
    std::vector<std::array<int, 3>> labels;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      wrapped[i].image = rows[i].image;
      ptrs.push_back(&wrapped[i]);
      labels.insert(labels.end(), rows[i].labels.begin(), rows[i].labels.end());
    }
    const auto images = image_batch(ptrs);
    vision_pretext_model::encoder_t::saved_t saved;
    auto y = encoder.forward(w.vision, images, saved);
    const cpu::shape_t ys = y.shape();
    y.reshape({labels.size(), d});
    cpu::tensor<float> logits({labels.size(), std::size_t(pretext_outputs)}, memory_use::workspace);
    nn::linear_forward(pw.head, y, logits, "pretext_head");
    const double norm = double(labels.size() * pretext_classes.size());
    if (!train) return pretext_loss(logits, labels, nullptr, 0, counts) / norm;
    cpu::tensor<float> dlogits(logits.shape(), memory_use::workspace);
    const double loss = pretext_loss(logits, labels, &dlogits, 1.0 / norm, counts) / norm;
    cpu::tensor<float> dy(y.shape(), memory_use::workspace);
    nn::linear_backward_input(pw.head, dlogits, dy, false, "pretext_head: dx");
    nn::linear_backward_weight(y, dlogits, g.head, "pretext_head: dW");
    dy.reshape(ys);
    encoder.backward(w.vision, saved, dy, g.vision);
    return loss;
  };

  vision_pretext_result res;
  std::mt19937_64 rng(seed ^ 0x76697375616cull);
  prog.begin("vision pretext", o.steps);
  for (int step = 0; step < o.steps; ++step) {
    std::vector<pretext_example> rows;
    for (int b = 0; b < o.batch; ++b) rows.push_back(make_pretext_example(rng, side));
    model.for_each_trainable(pw, g, [](const std::string&, cpu::tensor<float>&, cpu::tensor<float>& dp) { dp.set_zero(); });
    pretext_counts counts;
    res.final_loss = pass(rows, true, counts);
    opt.set_lr(sched(step));
    opt.step(model, pw, g);
    prog.step(step + 1, res.final_loss);
  }
  prog.end();
  // Token accuracy on images the pretext never trained on (its own seed).
  std::mt19937_64 held(test_seed("vision-pretext"));
  std::vector<pretext_example> rows;
  for (int i = 0; i < 256; ++i) rows.push_back(make_pretext_example(held, side));
  pretext_counts counts;
  pass(rows, false, counts);
  for (std::size_t k = 0; k < 3; ++k) {
    res.token_accuracy[k] = double(counts.correct[k]) / double(rows.size() * std::size_t(vc.tokens()));
    res.object_token_accuracy[k] = double(counts.object_correct[k]) / double(std::max<std::size_t>(1, counts.object_tokens));
  }
  return res;
}

}  // namespace skillgraft::reproduce
