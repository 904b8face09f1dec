#pragma once
// What a continual-learning method costs in bytes, per ledger category, before anything is
// allocated: the whole decoder LM under a recipe (weights, gradients, optimizer state, saved
// activations, rotary tables) plus the method's own state (memory_use::method_state).
//
//   trainable bytes  A = (trainable elements, LoRA adapters included) × sizeof(T)
//   gradients        = A
//   optimizer state  = 2A (AdamW m, v), A (SGD momentum), 0 (plain SGD)
//   method state     = LoRA adapters  Σ_adapted r (in + out) per trainable layer   (attach_lora)
//                    + copies:  LwF teacher  A    (cl::teacher: trainable tensors only)
//                               EWC          2A   (F and θ*)
//                               WiSE-FT      A    (θ_before; `interpolate` sweeps keep θ_after too: 2A)
//                               running avg  A
//   constants        = rotary cos/sin tables, 2 · max_seq · head_dim/2 · sizeof(T) each: the
//                      model's, and the LwF teacher's frozen model's own
//   saved            = the stack's plan (nn/memory_report.hpp) + the final norm's input and
//                      1/rms when something below the head trains, for [batch, prefix + seq];
//                      given the micro-batch's target count, train_step's forward of the rows
//                      with a target (nn/output_rows.hpp): the top block's MLP half and the
//                      final norm keep those rows only (not under LwF, which reads every row)
//
// EWC's consolidation (estimate F_new on the task's data, fold it in) holds, while it runs,
// F_new (A more method state) and its own gradient buffer (A more gradients, on top of the
// training gradients when they exist), and saves activations for one example at a time.
//
// Workspace (activations in flight, the loss's logit chunks, the KV cache) is not planned.
// The tests hold every number here equal to the ledger's peaks after a real training step.
#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/nn/memory_report.hpp"

namespace skillgraft::cl {

enum class method { none, lwf, ewc, wise_ft, wise_ft_interpolate, running_average };
enum class optimizer_kind { adamw, sgd_momentum, sgd };

inline std::string_view method_name(method m) {
  switch (m) {
    case method::none: return "none";
    case method::lwf: return "lwf";
    case method::ewc: return "ewc";
    case method::wise_ft: return "wise_ft";
    case method::wise_ft_interpolate: return "wise_ft_interpolate";
    case method::running_average: return "running_average";
  }
  return "?";
}

inline method method_from_name(std::string_view name) {
  for (method m : {method::none, method::lwf, method::ewc, method::wise_ft, method::wise_ft_interpolate,
                   method::running_average})
    if (method_name(m) == name) return m;
  throw std::invalid_argument("skillgraft: unknown method '" + std::string(name) +
                              "'; valid names: none, lwf, ewc, wise_ft, wise_ft_interpolate, running_average");
}

struct method_memory {
  method kind = method::none;
  optimizer_kind optimizer = optimizer_kind::adamw;
  std::string recipe_label;    // e.g. "{q_proj, k_proj, v_proj, o_proj} on layers 0..3"
  seq_shape shape{};           // micro-batch: [batch, prefix + seq]
  std::size_t trainable_elements = 0;

  std::size_t weights = 0;            // every parameter of the LM (adapters are method state)
  std::size_t gradients = 0;          // trainable tensors only
  std::size_t optimizer_state = 0;
  std::size_t saved_activations = 0;  // one micro-batch
  std::size_t constants = 0;          // rotary tables
  std::size_t lora_adapters = 0;      // method_state: A and B of every adapted projection
  std::size_t method_copies = 0;      // method_state: teacher copies, F + θ*, snapshots

  // EWC consolidation, on top of the steady state while it runs.
  std::size_t consolidation_method_state = 0;  // F_new
  std::size_t consolidation_gradients = 0;     // the Fisher estimator's gradient buffer
  std::size_t consolidation_saved = 0;         // one example's saved activations

  std::size_t method_state() const { return lora_adapters + method_copies; }
  std::size_t total() const {
    return weights + gradients + optimizer_state + saved_activations + constants + method_state();
  }
  // Steady-state bytes of a category during a training step (workspace is not planned).
  std::size_t bytes(memory_use u) const {
    switch (u) {
      case memory_use::weights: return weights;
      case memory_use::gradients: return gradients;
      case memory_use::optimizer_state: return optimizer_state;
      case memory_use::saved_activations: return saved_activations;
      case memory_use::method_state: return method_state();
      case memory_use::constants: return constants;
      default: break;
    }
    throw std::invalid_argument("skillgraft: the memory plan does not cover '" +
                                std::string(memory_use_names[std::size_t(u)]) + "'");
  }
  // Highest bytes of a category over training and (EWC) consolidation.
  std::size_t peak(memory_use u) const {
    switch (u) {
      case memory_use::gradients: return gradients + consolidation_gradients;
      case memory_use::method_state: return method_state() + consolidation_method_state;
      case memory_use::saved_activations: return std::max(saved_activations, consolidation_saved);
      default: return bytes(u);
    }
  }

  // "lwf | {q_proj, k_proj, v_proj, o_proj} on layers 0..3 | adamw | micro-batch 4 x 256 | weights 173.0 MiB,
  //  gradients 12.0 MiB, optimizer 24.0 MiB, saved 30.0 MiB, method 12.0 MiB, constants 0.2 MiB | total 251.2 MiB"
  std::string line() const {
    std::string s = std::string(method_name(kind)) + " | " + recipe_label + " | " + optimizer_label() + " | micro-batch " +
                    std::to_string(shape.batch) + " x " + std::to_string(shape.seq) + " | weights " + mib(weights) +
                    ", gradients " + mib(gradients) + ", optimizer " + mib(optimizer_state) + ", saved " +
                    mib(saved_activations) + ", method " + mib(method_state()) + ", constants " + mib(constants) +
                    " | total " + mib(total());
    if (consolidation_method_state)
      s += " (+" + mib(consolidation_method_state + consolidation_gradients) + " while consolidating)";
    return s;
  }

  // One row per category: bytes, MiB, share of the total and what it holds.
  std::string table() const {
    std::string out = "memory plan: " + std::string(method_name(kind)) + ", " + recipe_label + ", " + optimizer_label() +
                      ", micro-batch " + std::to_string(shape.batch) + " x " + std::to_string(shape.seq) + "\n";
    auto row = [&](std::string_view name, std::size_t b, const std::string& what) {
      char buf[160];
      const double share = total() ? 100.0 * double(b) / double(total()) : 0.0;
      std::snprintf(buf, sizeof buf, "%-18s %15zu %11.2f %6.1f%%  ", std::string(name).c_str(), b,
                    double(b) / double(1 << 20), share);
      std::string r = buf + what;
      while (!r.empty() && r.back() == ' ') r.pop_back();
      out += r + "\n";
    };
    char head[160];
    std::snprintf(head, sizeof head, "%-18s %15s %11s %7s  %s", "category", "bytes", "MiB", "share", "holds");
    out += std::string(head) + "\n";
    row("weights", weights, "every parameter");
    row("gradients", gradients, std::to_string(trainable_elements) + " trainable elements");
    row("optimizer_state", optimizer_state, optimizer_text().second);
    row("saved_activations", saved_activations, "kept by forward for backward, one micro-batch");
    row("method_state", method_state(), method_holds());
    row("constants", constants, kind == method::lwf ? "rotary tables (model and teacher)" : "rotary table");
    row("total", total(), "");
    if (consolidation_method_state) {
      row("+ consolidation", consolidation_method_state + consolidation_gradients,
          "EWC while consolidating: F_new (method_state) and its gradient buffer (gradients)");
    }
    return out;
  }

 private:
  static std::string mib(std::size_t b) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / double(1 << 20));
    return buf;
  }
  // The optimizer's short name and what its state holds.
  std::pair<std::string, std::string> optimizer_text() const {
    switch (optimizer) {
      case optimizer_kind::adamw: return {"adamw", "AdamW m and v of the trainable tensors"};
      case optimizer_kind::sgd_momentum: return {"sgd+momentum", "SGD momentum of the trainable tensors"};
      case optimizer_kind::sgd: return {"sgd", "nothing (plain SGD)"};
    }
    return {"?", ""};
  }
  std::string optimizer_label() const { return optimizer_text().first; }
  std::string method_holds() const {
    std::string s;
    switch (kind) {
      case method::none: break;
      case method::lwf: s = "LwF teacher: copies of the trainable tensors"; break;
      case method::ewc: s = "EWC: Fisher F and anchor θ* of the trainable tensors"; break;
      case method::wise_ft: s = "WiSE-FT: snapshot θ_before of the trainable tensors"; break;
      case method::wise_ft_interpolate: s = "WiSE-FT: snapshots θ_before and θ_after"; break;
      case method::running_average: s = "sequential WiSE-FT: running average of the trainable tensors"; break;
    }
    if (lora_adapters) s += std::string(s.empty() ? "" : "; ") + "LoRA adapters " + mib(lora_adapters);
    return s.empty() ? "nothing" : s;
  }
};

namespace plan_detail {
// "{q_proj, lora(v_proj), norm}" in canonical tag order.
template <class Recipe>
std::string tag_list() {
  std::string s;
  hana::for_each(all_tags, [&](auto t) {
    using Tag = typename decltype(t)::type;
    if constexpr (trains_v<Tag, Recipe>) {
      std::string n;
      if constexpr (requires { typename Tag::base; }) n = "lora(" + std::string(Tag::name) + ")";
      else n = std::string(Tag::name);
      s += (s.empty() ? "" : ", ") + n;
    }
  });
  return "{" + s + "}";
}

// Elements of the LoRA adapters one trainable layer carries: r (in + out) per adapted projection.
template <class Recipe>
std::size_t adapter_elements_per_layer(const decoder_config& c) {
  const std::size_t r = std::size_t(c.lora_rank), d = std::size_t(c.hidden), qd = std::size_t(c.q_dim()),
                    kvd = std::size_t(c.kv_dim()), I = std::size_t(c.intermediate);
  std::size_t n = 0;
  if constexpr (trains_v<lora<proj::q>, Recipe>) n += r * (d + qd);
  if constexpr (trains_v<lora<proj::k>, Recipe>) n += r * (d + kvd);
  if constexpr (trains_v<lora<proj::v>, Recipe>) n += r * (d + kvd);
  if constexpr (trains_v<lora<proj::o>, Recipe>) n += r * (qd + d);
  if constexpr (trains_v<lora<proj::gate>, Recipe>) n += r * (d + I);
  if constexpr (trains_v<lora<proj::up>, Recipe>) n += r * (d + I);
  if constexpr (trains_v<lora<proj::down>, Recipe>) n += r * (I + d);
  return n;
}

// Saved activations of the whole LM (stack + final norm) for one micro-batch shape.
// output_rows: the rows a forward of output rows returns (0: every row).
template <class Model>
std::size_t saved_bytes(const Model& model, seq_shape sh, std::size_t output_rows = 0) {
  using T = typename Model::value_type;
  std::size_t e = model.stack().saved_elements(sh, output_rows);
  const std::size_t top = output_rows ? output_rows : sh.tokens();
  if constexpr (Model::final_norm_t::keeps_input) e += top * std::size_t(model.config().hidden) + top;
  return e * sizeof(T);
}
}  // namespace plan_detail

// The plan for a built model (its recipe and layer range); `micro_batch` counts positions
// including soft-prefix tokens. `target_rows`: the positions with a target in one micro-batch,
// for train_step's default forward of those rows alone (step_options::target_rows_only); 0
// plans the forward of every row, an upper bound of that.
template <class Model>
  requires requires(const Model& lm) {
    typename Model::value_type;
    typename Model::recipe_type;
    lm.stack();
    lm.trainable_elements();
  }
method_memory plan_method_memory(const Model& model, method m, seq_shape micro_batch,
                                 optimizer_kind opt = optimizer_kind::adamw, std::size_t target_rows = 0) {
  using T = typename Model::value_type;
  using R = typename Model::recipe_type;
  if (micro_batch.batch <= 0 || micro_batch.seq <= 0)
    throw std::invalid_argument("skillgraft: memory plan needs a positive micro-batch shape (got " +
                                std::to_string(micro_batch.batch) + " x " + std::to_string(micro_batch.seq) + ")");
  const auto& c = model.config();
  const auto& st = model.stack();
  method_memory p;
  p.kind = m;
  p.optimizer = opt;
  p.shape = micro_batch;
  p.recipe_label = plan_detail::tag_list<R>();
  if (st.first_trainable() < c.n_layers)
    p.recipe_label += " on layers " + std::to_string(st.first_trainable()) + ".." + std::to_string(st.last_trainable());

  const auto trunk = plan_memory(st, micro_batch);  // the stack's weights, saved activations, rotary table
  p.trainable_elements = model.trainable_elements();
  const std::size_t A = p.trainable_elements * sizeof(T);
  // The trunk as its own plan counts it (whatever its MLP), then embed_tokens, model.norm and an untied lm_head.
  const std::size_t vd = std::size_t(c.vocab_size) * std::size_t(c.hidden);
  p.weights = trunk.weights + (vd * (c.tie_word_embeddings ? 1 : 2) + std::size_t(c.hidden)) * sizeof(T);
  p.gradients = A;
  p.optimizer_state = opt == optimizer_kind::adamw ? 2 * A : opt == optimizer_kind::sgd_momentum ? A : 0;
  if (target_rows > micro_batch.tokens())
    throw std::invalid_argument("skillgraft: memory plan: " + std::to_string(target_rows) +
                                " target rows in a micro-batch of " + std::to_string(micro_batch.tokens()) + " positions");
  // LwF's objective reads every row (the teacher's distribution at each position): no selection.
  const bool selects = target_rows && m != method::lwf;
  p.saved_activations = plan_detail::saved_bytes(model, micro_batch, selects ? target_rows : 0);
  p.constants = trunk.constants;
  const int trained_layers = st.first_trainable() < c.n_layers ? st.last_trainable() - st.first_trainable() + 1 : 0;
  p.lora_adapters = std::size_t(trained_layers) * plan_detail::adapter_elements_per_layer<R>(c) * sizeof(T);
  switch (m) {
    case method::none: break;
    case method::lwf:
      p.method_copies = A;
      p.constants += trunk.constants;  // the teacher's frozen model has its own rotary table
      break;
    case method::ewc:
      p.method_copies = 2 * A;
      p.consolidation_method_state = A;
      p.consolidation_gradients = A;
      p.consolidation_saved = plan_detail::saved_bytes(model, {1, micro_batch.seq});
      break;
    case method::wise_ft: p.method_copies = A; break;
    case method::wise_ft_interpolate: p.method_copies = 2 * A; break;
    case method::running_average: p.method_copies = A; break;
  }
  return p;
}

// From a config and a recipe alone (builds the model object, which holds a rotary table while
// this runs, but no weights).
template <class T, class S>
method_memory plan_method_memory(const decoder_config& c, trainable_set<S> r, method m, seq_shape micro_batch,
                                 optimizer_kind opt = optimizer_kind::adamw, std::size_t target_rows = 0) {
  const model::decoder_lm<T, trainable_set<S>> model(c, r);
  return plan_method_memory(model, m, micro_batch, opt, target_rows);
}

}  // namespace skillgraft::cl
