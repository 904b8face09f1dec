#pragma once
// Output-distribution probes: where a model's next-token probability goes, and how far its
// next-token distribution has moved from a reference (the model before tuning, an LwF teacher).
//
// "How to Teach Large Multimodal Models New Skills" measures forgetting as such a shift,
// e.g. the "counting bias": probability mass drifting onto number tokens on captions that
// contain no numbers. For a token set S and a probed position i, with logits z = h_i W^T,
// p = softmax(z), and a reference's logits r, p_ref = softmax(r):
//
//   mass_S       = Σ_{j∈S} p_j     = exp(lse_{j∈S} z_j − lse_j z_j)
//   max_prob_S   = max_{j∈S} p_j   = exp(max_{j∈S} z_j − lse_j z_j)
//   max_logit_S  = max_{j∈S} z_j
//   KL(p_ref ‖ p) = Σ_j p_ref,j (log p_ref,j − log p_j) = E_{p_ref}[r − z] − lse(r) + lse(z)
//   KL(p ‖ p_ref) = E_p[z − r] − lse(z) + lse(r)
//
// Positions are taken `rows` at a time and the vocabulary `vocab` columns at a time. Per
// row and per distribution one online log-sum-exp (m = running max, s = Σ e^{x−m}) carries
// beside it t = Σ e^{x−m}·(logit difference), rescaled with s whenever m grows, so a single
// pass over the vocabulary gives lse and the expectation E = t / s: no [positions, vocab]
// softmax is ever held, and the reference costs one more GEMM per chunk. Sums run in double.
//
// Texts: every row of every batch fed to an accumulator is one text, numbered in the order
// fed. Results are the mean over all probed positions (each position weighs the same), the
// mean of per-text means (each text weighs the same), and each text's own mean.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <xtensor/xtensor.hpp>

#include "skillgraft/cl/teacher.hpp"
#include "skillgraft/model/generate.hpp"

namespace skillgraft::cl {

using cpu::tensor;

// Which positions of a batch to probe: [batch, positions] (soft-prefix positions included,
// like the loss's targets); true = probe. Position t's distribution predicts token t + 1.
using position_mask = xt::xtensor<bool, 2>;

// The positions that have a target (target != ignore_index), e.g. a caption's tokens.
inline position_mask mask_from_targets(const token_ids& targets) {
  position_mask m = xt::zeros<bool>({targets.shape(0), targets.shape(1)});
  for (std::size_t b = 0; b < targets.shape(0); ++b)
    for (std::size_t s = 0; s < targets.shape(1); ++s) m(b, s) = targets(b, s) != ignore_index;
  return m;
}

// A validated set of token ids (sorted, distinct, inside the vocabulary), with a name for messages.
class token_set {
 public:
  token_set(const std::vector<std::int64_t>& ids, int vocab_size, std::string name = "token set")
      : name_(std::move(name)), vocab_(vocab_size) {
    if (vocab_size <= 0)
      throw std::invalid_argument("skillgraft: token set '" + name_ + "' needs a positive vocabulary size (got " +
                                  std::to_string(vocab_size) + ")");
    if (ids.empty())
      throw std::invalid_argument("skillgraft: token set '" + name_ + "' is empty; a probe needs at least one token id");
    std::map<std::int64_t, std::size_t> first_at;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const auto id = ids[i];
      if (id < 0 || id >= vocab_size)
        throw std::invalid_argument("skillgraft: token set '" + name_ + "' has id " + std::to_string(id) +
                                    " at index " + std::to_string(i) + ", outside the vocabulary [0, " +
                                    std::to_string(vocab_size) + ")");
      const auto [it, fresh] = first_at.emplace(id, i);
      if (!fresh)
        throw std::invalid_argument("skillgraft: token set '" + name_ + "' lists id " + std::to_string(id) +
                                    " twice (at indices " + std::to_string(it->second) + " and " +
                                    std::to_string(i) + ")");
    }
    ids_.reserve(first_at.size());
    for (const auto& [id, at] : first_at) ids_.push_back(id);
  }

  const std::vector<std::int64_t>& ids() const { return ids_; }  // ascending
  std::size_t size() const { return ids_.size(); }
  int vocab_size() const { return vocab_; }
  const std::string& name() const { return name_; }
  bool contains(std::int64_t id) const { return std::binary_search(ids_.begin(), ids_.end(), id); }

 private:
  std::string name_;
  int vocab_;
  std::vector<std::int64_t> ids_;
};

namespace probe_detail {
// Drops one leading word-start marker: ' ', "Ġ" (byte-level BPE: GPT-2, Qwen2) or "▁" (SentencePiece: LLaMA).
inline std::string_view strip_word_marker(std::string_view s) {
  for (std::string_view m : {std::string_view(" "), std::string_view("\xC4\xA0"), std::string_view("\xE2\x96\x81")})
    if (s.substr(0, m.size()) == m) return s.substr(m.size());
  return s;
}
inline bool is_number_text(std::string_view s, bool words) {
  if (s.empty()) return false;
  if (std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; })) return true;
  if (!words) return false;
  static constexpr std::string_view names[] = {
      "zero",  "one",    "two",    "three",    "four",     "five",    "six",     "seven",     "eight",    "nine",
      "ten",   "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
      "twenty"};
  std::string lower(s);
  for (auto& c : lower) c = char(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return std::find(std::begin(names), std::end(names), lower) != std::end(names);
}
}  // namespace probe_detail

// The counting-bias set: vocabulary entries (vocab[id] = token text as the tokenizer stores it)
// that spell a number — only ASCII digits, or (with `words`) zero..twenty in any case —
// after an optional word-start marker (' ', 'Ġ', '▁'). Throws if there is none.
inline token_set number_tokens(const std::vector<std::string>& vocab, bool words = true, std::string name = "numbers") {
  std::vector<std::int64_t> ids;
  for (std::size_t i = 0; i < vocab.size(); ++i)
    if (probe_detail::is_number_text(probe_detail::strip_word_marker(vocab[i]), words)) ids.push_back(std::int64_t(i));
  return token_set(ids, int(vocab.size()), std::move(name));
}

// The measurements at one position, or their means (NaN: undefined, e.g. KL without a reference).
struct probe_values {
  static constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  double set_mass = nan;       // Σ_{j∈S} p_j
  double set_max_prob = nan;   // max_{j∈S} p_j
  double set_max_logit = nan;  // max_{j∈S} z_j
  double kl_ref_model = nan;   // KL(p_ref ‖ p_model)  (forward: expectation under the reference)
  double kl_model_ref = nan;   // KL(p_model ‖ p_ref)  (reverse)
};

struct probe_stats {
  std::size_t count = 0;  // positions (or texts, for the mean of text means) averaged
  probe_values mean;
};

struct position_record {
  std::size_t text = 0;      // text index in the accumulator
  std::size_t position = 0;  // position in that text's hidden states (soft prefix included)
  probe_values value;
};

struct probe_options {
  std::size_t rows = 64;     // positions whose logits are held at once
  std::size_t vocab = 4096;  // vocabulary columns per chunk (0: the whole vocabulary)
};

// Sums of the probe values over texts and positions, for one token set.
class probe_accumulator {
 public:
  explicit probe_accumulator(token_set set, bool keep_positions = false)
      : set_(std::move(set)), keep_(keep_positions) {}

  const token_set& set() const { return set_; }
  std::size_t texts() const { return texts_.size(); }
  // Whether positions were probed against a reference (unknown, i.e. false, before the first).
  bool has_reference() const { return reference_ == 1; }

  // Mean over every probed position.
  probe_stats positions() const {
    sums all;
    for (const auto& t : texts_) all += t;
    return all.stats(has_reference());
  }
  // Mean of the per-text means over the texts with at least one probed position.
  probe_stats text_mean() const {
    sums means;
    for (const auto& t : texts_) {
      if (t.n == 0) continue;
      const auto m = t.stats(has_reference()).mean;
      means.add(m);
    }
    return means.stats(has_reference());
  }
  probe_stats text(std::size_t i) const {
    if (i >= texts_.size())
      throw std::out_of_range("skillgraft: probe accumulator has " + std::to_string(texts_.size()) + " texts, asked for text " +
                              std::to_string(i));
    return texts_[i].stats(has_reference());
  }
  std::vector<probe_stats> per_text() const {
    std::vector<probe_stats> out;
    for (const auto& t : texts_) out.push_back(t.stats(has_reference()));
    return out;
  }
  // Every probed position, in the order probed (only with keep_positions).
  const std::vector<position_record>& kept() const { return kept_; }

  // Adds `n` texts and the values of their probed positions (text indices relative to the
  // first new text); checked before anything changes.
  void add_batch(std::size_t n, const std::vector<position_record>& records, bool with_reference) {
    if (reference_ >= 0 && reference_ != int(with_reference) && !records.empty())
      throw std::invalid_argument("skillgraft: probe accumulator for '" + set_.name() +
                                  "' would mix positions with and without a reference model");
    for (const auto& r : records)
      if (r.text >= n) throw std::logic_error("skillgraft: probe record names a text outside its batch");
    const std::size_t first = texts_.size();
    texts_.resize(first + n);
    for (auto r : records) {
      r.text += first;
      texts_[r.text].add(r.value);
      if (keep_) kept_.push_back(r);
    }
    if (!records.empty()) reference_ = int(with_reference);
  }

  // "numbers (12 ids): mass 0.0123, max p 0.0041, max logit 3.210, KL(ref||model) 0.0123,
  //  KL(model||ref) 0.0119 over 512 positions in 16 texts"
  std::string summary() const {
    const auto p = positions();
    char buf[320];
    std::snprintf(buf, sizeof buf, "%s (%zu ids): mass %.4g, max p %.4g, max logit %.4g", set_.name().c_str(),
                  set_.size(), p.mean.set_mass, p.mean.set_max_prob, p.mean.set_max_logit);
    std::string s = buf;
    if (has_reference()) {
      std::snprintf(buf, sizeof buf, ", KL(ref||model) %.4g, KL(model||ref) %.4g", p.mean.kl_ref_model,
                    p.mean.kl_model_ref);
      s += buf;
    }
    return s + " over " + std::to_string(p.count) + " positions in " + std::to_string(texts_.size()) + " texts";
  }

 private:
  struct sums {
    std::size_t n = 0;
    double mass = 0, max_prob = 0, max_logit = 0, kl_rm = 0, kl_mr = 0;
    void add(const probe_values& v) {
      ++n;
      mass += v.set_mass;
      max_prob += v.set_max_prob;
      max_logit += v.set_max_logit;
      kl_rm += v.kl_ref_model;
      kl_mr += v.kl_model_ref;
    }
    sums& operator+=(const sums& o) {
      n += o.n;
      mass += o.mass;
      max_prob += o.max_prob;
      max_logit += o.max_logit;
      kl_rm += o.kl_rm;
      kl_mr += o.kl_mr;
      return *this;
    }
    probe_stats stats(bool with_reference) const {
      probe_stats s;
      s.count = n;
      if (n == 0) return s;
      const double k = double(n);
      s.mean.set_mass = mass / k;
      s.mean.set_max_prob = max_prob / k;
      s.mean.set_max_logit = max_logit / k;
      if (with_reference) {
        s.mean.kl_ref_model = kl_rm / k;
        s.mean.kl_model_ref = kl_mr / k;
      }
      return s;
    }
  };
  token_set set_;
  bool keep_;
  int reference_ = -1;  // -1 unknown, 0 without, 1 with
  std::vector<sums> texts_;
  std::vector<position_record> kept_;
};

namespace probe_detail {
// Online log-sum-exp of x with the e^{x−m}-weighted sum of y beside it:
//   m = max x,  s = Σ e^{x−m},  t = Σ e^{x−m} y   ⇒   lse = m + log s,  E_{softmax(x)}[y] = t / s
struct weighted_lse {
  double m = -std::numeric_limits<double>::infinity(), s = 0, t = 0;
  void raise_max(double cm) {  // before adding values up to cm: rescale s and t to the new max
    if (cm > m) {
      const double f = std::exp(m - cm);
      s *= f;
      t *= f;
      m = cm;
    }
  }
  double lse() const { return m + std::log(s); }
  double mean() const { return t / s; }
};

struct row_state {
  weighted_lse model, ref;  // model: x = z, y = z − r;  reference: x = r, y = r − z
  weighted_lse set;         // over S only (y unused)
  double set_max = -std::numeric_limits<double>::infinity();
};
}  // namespace probe_detail

// The core: probes the masked positions of hidden states h [batch, positions, hidden] under
// the LM head [vocab, hidden]; with h_ref and head_ref (both or neither; their hidden width may
// differ from h's, the vocabulary may not) also the two KL divergences. Adds `batch` texts to acc.
// Nothing in acc changes if an argument is wrong or a logit is not finite.
// Tensors of any backend: the probed rows are gathered and multiplied by the head there; the
// row statistics run on the host over each [rows, vocab chunk] block of logits (on the CPU
// backend in place, on another backend after a download of the block).
template <class T, template <class> class Tensor>
void probe_hidden(probe_accumulator& acc, const Tensor<T>& h, const Tensor<T>& head, const position_mask& mask,
                  const std::type_identity_t<Tensor<T>>* h_ref = nullptr,
                  const std::type_identity_t<Tensor<T>>* head_ref = nullptr, probe_options o = {}) {
  using B_ = typename backend_of<Tensor<T>>::type;
  const auto& set = acc.set();
  if (h.rank() != 3)
    throw std::invalid_argument("skillgraft: probed hidden states have shape " + h.shape().str() +
                                ", expected [batch, positions, hidden]");
  const std::size_t B = h.dim(0), P = h.dim(1), d = h.dim(2);
  if (head.rank() != 2 || head.dim(1) != d || head.dim(0) != std::size_t(set.vocab_size()))
    throw std::invalid_argument("skillgraft: LM head has shape " + head.shape().str() + ", expected [" +
                                std::to_string(set.vocab_size()) + ", " + std::to_string(d) +
                                "] (the vocabulary of token set '" + set.name() + "' by the hidden width)");
  if (mask.shape(0) != B || mask.shape(1) != P)
    throw std::invalid_argument("skillgraft: probe mask has shape [" + std::to_string(mask.shape(0)) + ", " +
                                std::to_string(mask.shape(1)) + "], expected [" + std::to_string(B) + ", " +
                                std::to_string(P) + "] (one per position of the hidden states " + h.shape().str() + ")");
  if (bool(h_ref) != bool(head_ref))
    throw std::invalid_argument("skillgraft: a probe reference needs both its hidden states and its LM head");
  const bool with_ref = h_ref != nullptr;
  std::size_t dr = 0;
  if (with_ref) {
    if (h_ref->rank() != 3 || h_ref->dim(0) != B || h_ref->dim(1) != P)
      throw std::invalid_argument("skillgraft: reference hidden states have shape " + h_ref->shape().str() +
                                  ", expected [" + std::to_string(B) + ", " + std::to_string(P) + ", hidden]");
    dr = h_ref->dim(2);
    if (head_ref->rank() != 2 || head_ref->dim(0) != head.dim(0) || head_ref->dim(1) != dr)
      throw std::invalid_argument("skillgraft: reference LM head has shape " + head_ref->shape().str() +
                                  ", expected [" + std::to_string(head.dim(0)) + ", " + std::to_string(dr) + "]");
  }
  if (o.rows == 0) throw std::invalid_argument("skillgraft: probe_options.rows must be at least 1");

  std::vector<position_record> records;
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t s = 0; s < P; ++s)
      if (mask(b, s)) records.push_back({b, s, {}});

  const std::size_t V = head.dim(0), vc = o.vocab ? std::min(o.vocab, V) : V;
  const auto& ids = set.ids();
  const std::size_t mc = std::max<std::size_t>(1, std::min(o.rows, records.size()));
  Tensor<T> hc({mc, d}, memory_use::workspace), z({mc, vc}, memory_use::workspace), hrc, zr;
  if (with_ref) hrc = Tensor<T>({mc, dr}, memory_use::workspace), zr = Tensor<T>({mc, vc}, memory_use::workspace);
  constexpr bool on_host = std::is_same_v<Tensor<T>, cpu::tensor<T>>;
  cpu::tensor<T> z_host, zr_host;  // the logits block on the host (another backend only)
  if constexpr (!on_host) {
    z_host = cpu::tensor<T>({mc, vc}, memory_use::workspace);
    if (with_ref) zr_host = cpu::tensor<T>({mc, vc}, memory_use::workspace);
  }
  std::vector<probe_detail::row_state> st;
  for (std::size_t r0 = 0; r0 < records.size(); r0 += mc) {
    const std::size_t m = std::min(mc, records.size() - r0);
    std::vector<std::int64_t> rows(m);
    for (std::size_t i = 0; i < m; ++i) rows[i] = std::int64_t(records[r0 + i].text * P + records[r0 + i].position);
    B_::gather_rows(h, d, rows, hc);
    if (with_ref) B_::gather_rows(*h_ref, dr, rows, hrc);
    st.assign(m, {});
    for (std::size_t c0 = 0; c0 < V; c0 += vc) {
      const std::size_t cw = std::min(vc, V - c0);
      B_::gemm("probe: z = h W^T", op::n, op::t, int(m), int(cw), int(d), T(1), hc.data(), int(d), head.data() + c0 * d,
               int(d), T(0), z.data(), int(cw));
      if (with_ref)
        B_::gemm("probe: r = h_ref W_ref^T", op::n, op::t, int(m), int(cw), int(dr), T(1), hrc.data(), int(dr),
                 head_ref->data() + c0 * dr, int(dr), T(0), zr.data(), int(cw));
      const T* zb = z.data();
      const T* zrb = with_ref ? zr.data() : nullptr;
      if constexpr (!on_host) {
        z.copy_range_to(0, m * cw, z_host.data());
        if (with_ref) zr.copy_range_to(0, m * cw, zr_host.data());
        zb = z_host.data();
        zrb = with_ref ? zr_host.data() : nullptr;
      }
      // The set's ids inside this chunk: [k0, k1) of the ascending list.
      const std::size_t k0 = std::size_t(std::lower_bound(ids.begin(), ids.end(), std::int64_t(c0)) - ids.begin());
      const std::size_t k1 = std::size_t(std::lower_bound(ids.begin(), ids.end(), std::int64_t(c0 + cw)) - ids.begin());
#pragma omp parallel for schedule(static) if (m * cw >= 65536)
      for (std::size_t i = 0; i < m; ++i) {
        auto& a = st[i];
        const T* zi = zb + i * cw;
        const T* ri = with_ref ? zrb + i * cw : nullptr;
        double cm = -std::numeric_limits<double>::infinity(), crm = cm;
        for (std::size_t j = 0; j < cw; ++j) cm = std::max(cm, double(zi[j]));
        a.model.raise_max(cm);
        if (with_ref) {
          for (std::size_t j = 0; j < cw; ++j) crm = std::max(crm, double(ri[j]));
          a.ref.raise_max(crm);
          for (std::size_t j = 0; j < cw; ++j) {
            const double x = double(zi[j]), y = double(ri[j]);
            const double e = std::exp(x - a.model.m), er = std::exp(y - a.ref.m);
            a.model.s += e;
            a.model.t += e * (x - y);
            a.ref.s += er;
            a.ref.t += er * (y - x);
          }
        } else {
          for (std::size_t j = 0; j < cw; ++j) a.model.s += std::exp(double(zi[j]) - a.model.m);
        }
        for (std::size_t k = k0; k < k1; ++k) {
          const double x = double(zi[std::size_t(ids[k]) - c0]);
          a.set.raise_max(x);
          a.set.s += std::exp(x - a.set.m);
          a.set_max = std::max(a.set_max, x);
        }
      }
    }
    for (std::size_t i = 0; i < m; ++i) {
      const auto& a = st[i];
      auto& rec = records[r0 + i];
      const double lse = a.model.lse();
      const double lse_ref = with_ref ? a.ref.lse() : 0.0;
      if (!std::isfinite(lse) || !std::isfinite(lse_ref) || !std::isfinite(a.set_max))
        throw std::domain_error("skillgraft: the " + std::string(std::isfinite(lse) && std::isfinite(a.set_max) ? "reference's " : "") +
                                "logits at position [" + std::to_string(rec.text) + ", " + std::to_string(rec.position) +
                                "] are not finite; the probe was not updated");
      rec.value.set_mass = std::exp(a.set.lse() - lse);
      rec.value.set_max_prob = std::exp(a.set_max - lse);
      rec.value.set_max_logit = a.set_max;
      if (with_ref) {
        // KL ≥ 0; a value a few ulps below 0 (p ≈ p_ref) is rounding, shown as 0.
        rec.value.kl_ref_model = std::max(0.0, a.ref.mean() - lse_ref + lse);
        rec.value.kl_model_ref = std::max(0.0, a.model.mean() - lse + lse_ref);
      }
    }
  }
  acc.add_batch(B, records, with_ref);
}

// --- probing a decoder LM --------------------------------------------------------------

// No reference: the KL values stay NaN.
struct no_reference {};
// Reference: a model of the same config under other weights (e.g. the base checkpoint).
template <class T, class Backend = backend::cpu>
struct weights_reference {
  const model::lm_weights<T, Backend>* weights = nullptr;
};
// Reference: an LwF teacher, i.e. its snapshot of the trainable tensors swapped into `weights`
// (the student's, shared) while it runs.
template <class T, class Backend = backend::cpu>
struct teacher_reference {
  teacher<T, Backend>* teach = nullptr;
  model::lm_weights<T, Backend>* weights = nullptr;
};

// Mlp: the MLP policy of the probed models (dense by default); make_distribution_probe
// takes it, with its options, from a model. Backend: where the probed weights live (the
// probes and generation run there; the row statistics read each logits block on the host).
template <class T, class Mlp = nn::default_mlp, class Backend = backend::cpu>
class distribution_probe {
 public:
  using frozen_model = model::decoder_lm<T, std::remove_cv_t<decltype(recipe::frozen)>, Backend, Mlp>;
  using tensor_t = typename Backend::template tensor<T>;
  using weights_t = model::lm_weights<T, Backend>;

  explicit distribution_probe(const decoder_config& c, probe_options o = {}, const typename Mlp::options& mlp = {})
      : model_(c, recipe::frozen, mlp), opt_(o) {}

  const frozen_model& model() const { return model_; }
  const probe_options& options() const { return opt_; }

  // Final hidden states of weights w, [batch, prefix + seq, hidden]. The probe runs every set of
  // weights (and an LwF teacher runs its snapshot) through the same frozen model, which keeps
  // nothing for backward: equal weights give bit-identical distributions, hence KL exactly 0.
  tensor_t hidden(const weights_t& w, const token_ids& ids, const tensor_t* prefix = nullptr) const {
    typename frozen_model::saved_t s;
    return model_.forward(w, ids, s, prefix);
  }

  // (a) Teacher-forced: the positions of [prefix ; ids] that mask selects ([batch, prefix + seq]).
  template <class Ref = no_reference>
  void teacher_forced(probe_accumulator& acc, const weights_t& w, const token_ids& ids, const position_mask& mask,
                      const tensor_t* prefix = nullptr, Ref ref = {}) const {
    auto h = hidden(w, ids, prefix);
    if constexpr (std::is_same_v<Ref, no_reference>) {
      probe_hidden(acc, h, w.head(), mask, nullptr, nullptr, opt_);
    } else {
      auto hr = reference_hidden(ref, ids, prefix);
      probe_hidden(acc, h, w.head(), mask, &hr, &reference_head(ref), opt_);
    }
  }

  // (b) Given continuations: the positions whose next-token distributions produced
  // continuation[:, t] after [prefix ; prompt] (one teacher-forced pass over
  // [prefix ; prompt ; continuation[:, :C-1]]). With eos >= 0, a row's steps after the one
  // that emitted eos are padding and are not probed.
  template <class Ref = no_reference>
  void continuations(probe_accumulator& acc, const weights_t& w, const token_ids& prompt,
                     const token_ids& continuation, const tensor_t* prefix = nullptr, Ref ref = {},
                     std::int64_t eos = -1) const {
    const std::size_t B = prompt.shape(0), P0 = prompt.shape(1), C = continuation.shape(1);
    const std::size_t Pp = prefix && !prefix->empty() ? prefix->dim(1) : 0;
    if (continuation.shape(0) != B)
      throw std::invalid_argument("skillgraft: continuations have " + std::to_string(continuation.shape(0)) +
                                  " rows, the prompt " + std::to_string(B));
    if (C == 0) throw std::invalid_argument("skillgraft: a continuation probe needs at least one continuation token");
    if (Pp + P0 == 0) throw std::invalid_argument("skillgraft: a continuation probe needs a prompt or soft tokens");
    token_ids all = token_ids::from_shape({B, P0 + C - 1});
    for (std::size_t b = 0; b < B; ++b) {
      for (std::size_t s = 0; s < P0; ++s) all(b, s) = prompt(b, s);
      for (std::size_t s = 0; s + 1 < C; ++s) all(b, P0 + s) = continuation(b, s);
    }
    position_mask mask = xt::zeros<bool>({B, Pp + P0 + C - 1});
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t t = 0; t < C; ++t) {
        mask(b, Pp + P0 - 1 + t) = true;  // this position's distribution produced continuation[b, t]
        if (eos >= 0 && continuation(b, t) == eos) break;
      }
    teacher_forced(acc, w, all, mask, prefix, ref);
  }

  // (b) Generated: decodes with model::generate (greedy or sampled, stopping at s.eos), then
  // probes every generation step as `continuations` does; returns the generated tokens.
  // The step distributions are recomputed by one causal pass — the same distributions the
  // decoder sampled from, up to float rounding — so the reference scores the very same prefixes.
  template <class Ref = no_reference>
  token_ids generated(probe_accumulator& acc, const weights_t& w, const token_ids& prompt,
                      const model::sampling& s, const tensor_t* prefix = nullptr, Ref ref = {}) const {
    if (s.max_new_tokens <= 0)
      throw std::invalid_argument("skillgraft: a generation probe needs max_new_tokens >= 1 (got " +
                                  std::to_string(s.max_new_tokens) + ")");
    auto out = model::generate(model_, w, prompt, s, prefix);
    continuations(acc, w, prompt, out, prefix, ref, s.eos);
    return out;
  }

 private:
  tensor_t reference_hidden(const weights_reference<T, Backend>& r, const token_ids& ids, const tensor_t* prefix) const {
    if (!r.weights) throw std::invalid_argument("skillgraft: weights_reference has no weights");
    return hidden(*r.weights, ids, prefix);
  }
  const tensor_t& reference_head(const weights_reference<T, Backend>& r) const { return r.weights->head(); }
  tensor_t reference_hidden(const teacher_reference<T, Backend>& r, const token_ids& ids, const tensor_t* prefix) const {
    if (!r.teach || !r.weights) throw std::invalid_argument("skillgraft: teacher_reference needs a teacher and weights");
    return r.teach->hidden(*r.weights, ids, prefix);
  }
  const tensor_t& reference_head(const teacher_reference<T, Backend>& r) const { return r.teach->head(*r.weights); }

  frozen_model model_;
  probe_options opt_;
};

// A probe for models like `model`: same config, MLP policy and MLP options.
template <class Model>
auto make_distribution_probe(const Model& model, probe_options o = {}) {
  return distribution_probe<typename Model::value_type, typename Model::mlp_policy, typename Model::backend_type>(
      model.config(), o, model.mlp_options());
}

}  // namespace skillgraft::cl
