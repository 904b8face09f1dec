#pragma once
// The model before a task, as a teacher, at the cost of its trainable tensors only.
//
// A snapshot copies just the tensors the recipe trains. To run the teacher, those
// copies are swapped into the student's weights (a pointer exchange per tensor, no
// copy), a frozen model runs forward, and they are swapped back — even if forward
// throws. Every frozen tensor is therefore shared, never duplicated: an attention-only
// recipe on Qwen2-7B in bf16 needs a teacher of ~1.6 GB, not ~15 GB (3.3 GB vs 30.5 GB in float).
// Not thread-safe: while the teacher runs, the student's weights *are* the teacher's.
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/parameters.hpp"

namespace skillgraft::cl {

using cpu::tensor;

// Backend: where the student's weights live; the copies live there too.
template <class T, class Backend = backend::cpu>
class trainable_snapshot {
 public:
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = model::lm_weights<T, Backend>;

  template <class Model>
  trainable_snapshot(const Model& model, weights_t& w) {
    model::for_each_trainable_weight(model, w, [&](const std::string& name, tensor_t& t) {
      index_[name] = copies_.size();
      copies_.push_back({name, t.clone(memory_use::method_state)});
    });
  }

  std::size_t state_bytes() const {
    std::size_t b = 0;
    for (const auto& c : copies_) b += c.value.bytes();
    return b;
  }
  std::size_t size() const { return copies_.size(); }
  // The snapshot's copy of a tensor, or nullptr when that tensor is frozen (shared).
  const tensor_t* find(const std::string& name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &copies_[it->second].value;
  }
  template <class F>
  void for_each(F&& f) const {
    for (const auto& c : copies_) f(c.name, c.value);
  }

  // Calls f() with the snapshot swapped into w; restores w afterwards.
  template <class F>
  decltype(auto) with_swapped(weights_t& w, F&& f) {
    swap_into(w);
    struct restore {
      trainable_snapshot* s;
      weights_t* w;
      ~restore() { s->swap_into(*w); }
    } guard{this, &w};
    return f();
  }

 private:
  void swap_into(weights_t& w) {
    std::size_t found = 0;
    model::for_each_parameter(w, [&](const std::string& name, tensor_t& t, auto, int) {
      auto it = index_.find(name);
      if (it == index_.end()) return;
      auto& c = copies_[it->second].value;
      if (!(c.shape() == t.shape()))
        throw std::invalid_argument("skillgraft: snapshot of " + name + " has shape " + c.shape().str() +
                                    ", the model has " + t.shape().str());
      std::swap(c, t);
      ++found;
    });
    if (found != copies_.size())
      throw std::invalid_argument("skillgraft: the snapshot holds tensors these weights do not have");
  }
  struct copy {
    std::string name;
    tensor_t value;
  };
  std::vector<copy> copies_;
  std::map<std::string, std::size_t> index_;
};

// The teacher of learning-without-forgetting: a frozen model over (student weights with
// the snapshot swapped in). The frozen model has the student's MLP policy and options
// (dense, xSiLU/xGELU, a mixture of experts), chosen from the student's type when the
// teacher is made; the teacher's own type depends on T and the backend only, so objectives
// and probes hold any teacher through one pointer type. On the CUDA backend the snapshot
// lives in device memory and the teacher runs there.
template <class T, class Backend = backend::cpu>
class teacher {
 public:
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = model::lm_weights<T, Backend>;

  template <class Model>
  teacher(const Model& student, weights_t& w) : snapshot_(student, w), forward_(frozen_forward(student)) {}

  const trainable_snapshot<T, Backend>& snapshot() const { return snapshot_; }
  std::size_t state_bytes() const { return snapshot_.state_bytes(); }

  // Teacher's final hidden states for a batch (nothing saved for backward).
  tensor_t hidden(weights_t& w, const token_ids& ids, const tensor_t* prefix = nullptr) {
    return snapshot_.with_swapped(w, [&] { return forward_(w, ids, prefix); });
  }
  // The teacher's LM head: its own copy if the head trains, else the shared one.
  const tensor_t& head(const weights_t& w) const {
    const auto* h = snapshot_.find(w.config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
    return h ? *h : w.head();
  }

 private:
  using forward_fn = std::function<tensor_t(const weights_t&, const token_ids&, const tensor_t*)>;

  template <class Model>
  static forward_fn frozen_forward(const Model& student) {
    using frozen_r = std::remove_cv_t<decltype(recipe::frozen)>;
    using frozen_model = model::decoder_lm<T, frozen_r, Backend, typename Model::mlp_policy>;
    auto m = std::make_shared<const frozen_model>(student.config(), recipe::frozen, student.mlp_options());
    return [m](const weights_t& w, const token_ids& ids, const tensor_t* prefix) {
      typename frozen_model::saved_t s;
      return m->forward(w, ids, s, prefix);
    };
  }

  trainable_snapshot<T, Backend> snapshot_;
  forward_fn forward_;
};

}  // namespace skillgraft::cl
