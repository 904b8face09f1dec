#pragma once
// The experiment of "How to Teach Large Multimodal Models New Skills", in miniature:
// pretrain a small multimodal model on eight general abilities (once, cached as a
// safetensors checkpoint), then for each tuning method teach it five target skills in
// sequence with the same budget, evaluating every task after every stage and probing the
// counting bias (number-token mass on generated captions) along the way.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "skillgraft/cl/lora.hpp"
#include "skillgraft/cl/lwf.hpp"
#include "skillgraft/cl/moe.hpp"
#include "skillgraft/cl/probes.hpp"
#include "skillgraft/cl/teacher.hpp"
#include "skillgraft/cl/wise_ft.hpp"
#include "skillgraft/io/safetensors.hpp"
#include "skillgraft/model/gate_skip.hpp"
#include "skillgraft/model/multimodal.hpp"
#include "skillgraft/policy/dispatch.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

#include "data.hpp"
#include "progress.hpp"
#include "stage_states.hpp"
#include "vision_pretext.hpp"

namespace skillgraft::reproduce {

using frozen_t = std::remove_cv_t<decltype(recipe::frozen)>;

// Every method the runner knows, in report order. "moe" grows the model by one expert per
// task, so its model is rebuilt before every stage (see run_recipe).
inline const std::vector<std::string>& all_methods() {
  static const std::vector<std::string> m{"llm", "mlp", "mlp_gate_up", "sa_proj", "vision_projector",
                                          "full", "lwf", "wise_ft", "lora", "moe"};
  return m;
}

// The default run's methods: the paper's comparison (whole LLM, whole MLP, MLP Gate&Up, SA
// Proj.) with seeds; --full runs all ten.
inline const std::vector<std::string>& default_methods() {
  static const std::vector<std::string> m{"llm", "mlp", "mlp_gate_up", "sa_proj"};
  return m;
}

struct settings {
  model::multimodal_config model;
  // Pretraining of the vision path alone (vision_pretext.hpp; 0 steps: none, and the joint
  // pretraining then trains the vision encoder from scratch with everything else).
  vision_pretext_options vision_pretext;
  // Joint pretraining (the base model). 6000 steps at 1e-3: the language model's lookup of the
  // object a question names starts at a random step and takes 500-1500 steps to form; under
  // 3000 steps at 2e-3 a late start did not finish and a formed one could be lost again (2 of
  // 6 base models bound colour and shape, against every one tried at 6000 x 1e-3;
  // docs/reproduction.md, "The lookup: when it forms").
  int pretrain_steps = 6000;
  int pretrain_batch = 32;
  double pretrain_lr = 1e-3;
  // The joint pretraining's draw (pretrain_loop): each general task and the number sequences
  // with probability proportional to an integer weight (pretrain_mix; 1 for a task not named),
  // and for the first pretrain_focus_steps steps only the attribute-binding questions
  // (binding_tasks(): the colour and shape questions name one object by one attribute and ask
  // for another, which the language model learns last). Four times the weight of the others
  // for colour and shape: with the uniform draw the language model never learned to find the
  // named object in 3000 steps; with weight 4 (and the 4000-step pretext) it learned it for
  // both questions (docs/reproduction.md, "The task mixture").
  std::vector<std::pair<std::string, int>> pretrain_mix{{"colour", 4}, {"shape", 4}};
  int pretrain_focus_steps = 0;
  // Every pretrain_watch joint steps (0: never), the colour and shape questions' accuracy on
  // examples of their own seed, printed as the pretraining goes (whether and when the
  // language model learns to find the object a question names). Not part of the cache's
  // fingerprint: it changes nothing the model learns. CPU pretraining only.
  int pretrain_watch = 0;
  // Each target stage: the same budget for every method. 300 steps: at 100 the learning-rate
  // rule gave the restricted recipes 1e-3 to 5e-3 (at 5e-4 they learned more than a tenth below
  // their best) and they forgot more than the whole LLM; from 300 steps on every recipe learns
  // within a tenth of its best at the grid's smallest rate, and the paper's ordering appears
  // (docs/reproduction.md, "Budget or rate").
  int stage_steps = 300;
  int stage_batch = 16;
  // The language model's layers every method trains (--train-layers A:B: layers A..B-1; the
  // recipe's parts outside the layer stack, such as llm's embeddings and head, train as before).
  // All layers by default.
  layer_range train_layers{};
  double lr = 5e-4;       // AdamW peak learning rate, every method but LoRA
  double lora_lr = 2e-3;  // LoRA adapters start at zero and usually take a larger rate
  // The one learning-rate rule (lr_search.hpp): with a non-empty grid, every method's peak
  // rate (LoRA's too) is the smallest grid rate whose first lr_search_stages stages, trained
  // with each of the first lr_search_seeds fine-tuning seeds, learn their targets on validation
  // examples held apart from the test sets within lr_search_tolerance of the best rate's score,
  // or within one standard error (over those seeds) where that is more; lr and lora_lr are then
  // unused. An empty grid: the fixed rates above, for every
  // seed. Two stages: the first target alone (birds) gained 1 to 10 points in 100 steps at every
  // rate, within the validation noise, so it chose by chance; the counting stage separates the
  // rates. Three seeds: with one, the highest score was a draw between neighbouring rates that a
  // change of rounding flipped (docs/reproduction.md).
  std::vector<double> lr_grid{5e-4, 1e-3, 2e-3, 5e-3};
  int lr_search_stages = 2;
  int lr_search_seeds = 3;
  // A tenth: about the median spread (11 %) of one method's score between base models of one
  // seed made by two builds, so that the choice rarely flips with the machine (lr_search.hpp).
  double lr_search_tolerance = 0.1;
  // The reported runs of the search's seeds start where the search's runs at the chosen rate
  // ended the searched stages instead of training them again: the same numbers bit for bit,
  // 24 of the default run's 156 stages fewer (stage_states.hpp). CPU runs of the methods whose
  // state after a stage is their weights alone, with the report files written.
  bool resume_searched_stages = true;
  int validation_examples = 192;  // per searched target
  int lora_rank = 8;
  double lwf_lambda = 1.0;
  double lwf_temperature = 2.0;
  double wise_beta = 0.5;  // sequential WiSE-FT: running average weight of the newest model
  // Evaluation. 192 examples per task put the standard error of a mean over the eight
  // held-out tasks near 1.3 points, so that a 5-point difference stands out of the test noise.
  int test_examples = 192;  // per task
  int probe_examples = 48;  // captions for the counting-bias probe
  bool restricted = true;   // restricted decoding where a task has one
  std::vector<std::string> order{"birds", "count", "tissue", "sign", "clock"};
  std::vector<std::string> methods = default_methods();
  // The base model's seed (initialisation, pretraining data), and the number of fine-tuning
  // seeds: every method runs its stages `seeds` times, with seeds seed, seed + 1, ... for the
  // stages' data and LoRA's initialisation, on the same base model; the table reports each
  // number as a mean with its 95 % interval over them.
  std::uint64_t seed = 1;
  int seeds = 3;
  std::filesystem::path out = "reproduce-out";
  std::filesystem::path checkpoint;  // default: <out>/base.safetensors
  bool quiet = false;
  // Parallelism: `threads` OpenMP/Eigen threads inside each process, and up to `jobs`
  // methods at once, each in its own process (0: one per hardware thread). The models are
  // small, so one thread per method and one method per core uses the cores best, and a
  // thread never spins waiting for a partner that another process has displaced.
  int threads = 1;
  int jobs = 0;
  // Pretraining is one long run of one model: it runs in a process of its own with this many
  // threads (0: one per hardware thread), so that the methods' workers can still be forked.
  // Two by default on every machine: the base model depends on the thread count (the GEMM
  // splits its sums by thread), so a fixed count keeps it from depending on the core count.
  int pretrain_threads = 2;
  // Where pretraining and the plain recipes train: "cpu", or "cuda" in a program built with
  // SKILLGRAFT_REPRODUCE_CUDA (device_cuda.hpp). Evaluation and the probes always run on the
  // CPU, on weights copied back after each stage; LwF, LoRA and MoE train on the CPU.
  std::string device = "cpu";
  // false on every rank but 0 of a data-parallel run (data_parallel.hpp): one writer of the files.
  bool write_files = true;

  std::filesystem::path checkpoint_path() const { return checkpoint.empty() ? out / "base.safetensors" : checkpoint; }
};

inline model::multimodal_config reference_model(int vocab) {
  model::multimodal_config c;
  c.vision.image_size = canvas::size;
  // 8x8 patches, 16 image tokens. 4x4 patches merged 2x2 (vision.merge = 2, also 16 tokens)
  // learned no better in the same number of pretraining steps and cost 40 % more time.
  c.vision.patch_size = 8;
  c.vision.merge = 1;
  c.vision.channels = 3;
  auto& v = c.vision.blocks;
  v.hidden = 64, v.n_heads = 4, v.n_kv_heads = 4, v.head_dim = 16, v.intermediate = 128, v.n_layers = 2;
  v.max_seq = c.vision.patches(), v.causal = false, v.rotary = false, v.vocab_size = 1;
  c.projector = {.in = c.vision.out_features(), .intermediate = 128, .out = 128};
  auto& t = c.text;
  t.hidden = 128, t.n_heads = 4, t.n_kv_heads = 2, t.head_dim = 32, t.intermediate = 256, t.n_layers = 4;
  t.max_seq = 64, t.vocab_size = vocab, t.tie_word_embeddings = false;
  return c;
}

// A wider or deeper vision encoder than the reference (--vision-hidden, --vision-layers):
// heads of 16 features, MLP twice the width, the projector's input following.
inline void resize_vision(model::multimodal_config& c, int hidden, int layers) {
  if (hidden <= 0 || hidden % 16 != 0)
    throw std::invalid_argument("reproduce: the vision width must be a positive multiple of 16, got " + std::to_string(hidden));
  if (layers <= 0) throw std::invalid_argument("reproduce: the vision encoder needs at least one layer");
  auto& v = c.vision.blocks;
  v.hidden = hidden, v.n_heads = hidden / 16, v.n_kv_heads = hidden / 16, v.head_dim = 16, v.intermediate = 2 * hidden;
  v.n_layers = layers;
  c.projector.in = c.vision.out_features();
  c.validate();
}

// Another language model than the reference (--text-hidden, --text-heads, --text-kv-heads,
// --text-intermediate, --text-layers): heads of hidden / heads features, the projector's output
// following the width. Each bad value is refused naming its option.
struct text_size {
  int hidden, heads, kv_heads, intermediate, layers;
};
inline text_size text_size_of(const model::multimodal_config& c) {
  return {c.text.hidden, c.text.n_heads, c.text.n_kv_heads, c.text.intermediate, c.text.n_layers};
}
inline void resize_text(model::multimodal_config& c, const text_size& z) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("reproduce: " + m); };
  for (const auto& [opt, v] : {std::pair{"--text-hidden", z.hidden}, std::pair{"--text-heads", z.heads},
                               std::pair{"--text-kv-heads", z.kv_heads}, std::pair{"--text-intermediate", z.intermediate},
                               std::pair{"--text-layers", z.layers}})
    if (v <= 0) fail("option " + std::string(opt) + " must be positive, got " + std::to_string(v));
  if (z.hidden % z.heads != 0)
    fail("option --text-hidden (" + std::to_string(z.hidden) + ") must be a multiple of --text-heads (" +
         std::to_string(z.heads) + ")");
  if (z.heads % z.kv_heads != 0)
    fail("option --text-heads (" + std::to_string(z.heads) + ") must be a multiple of --text-kv-heads (" +
         std::to_string(z.kv_heads) + ")");
  if ((z.hidden / z.heads) % 2 != 0)
    fail("options --text-hidden / --text-heads give heads of " + std::to_string(z.hidden / z.heads) +
         " features, which rotary embeddings need even");
  auto& t = c.text;
  t.hidden = z.hidden, t.n_heads = z.heads, t.n_kv_heads = z.kv_heads, t.head_dim = z.hidden / z.heads;
  t.intermediate = z.intermediate, t.n_layers = z.layers;
  c.projector.out = z.hidden;
  c.validate();
}

// --train-layers A:B: layers A..B-1 of a language model of `n_layers` layers, or a message
// naming the option.
inline layer_range parse_train_layers(const std::string& text, int n_layers) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("reproduce: option --train-layers needs A:B with 0 <= A < B <= " +
                                std::to_string(n_layers) + " (the language model's layers), got '" + text + "': " + why);
  };
  const auto colon = text.find(':');
  if (colon == std::string::npos) fail("no ':'");
  auto one = [&](const std::string& v) {
    int x = -1;
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
    if (v.empty() || ec != std::errc{} || end != v.data() + v.size()) fail("'" + v + "' is not an integer");
    return x;
  };
  const int a = one(text.substr(0, colon)), b = one(text.substr(colon + 1));
  if (a < 0) fail("A is negative");
  if (b <= a) fail("the range is empty");
  if (b > n_layers) fail("B is past the last layer");
  return {a, b - 1};
}
inline std::string train_layers_text(layer_range r) {
  return r.all() ? "all layers" : "layers " + std::to_string(r.first) + ":" + std::to_string(r.last + 1);
}

// The default run (9 to 15 minutes on 2 cores, docs/reproduction.md) and the longer, more faithful one.
inline settings default_settings() {
  settings s;
  s.model = reference_model(tokenizer().size());
  return s;
}
inline settings full_settings() {
  settings s = default_settings();
  s.methods = all_methods();
  s.stage_steps = 1000;
  s.test_examples = 256;
  s.probe_examples = 128;
  return s;
}

// What identifies a pretrained checkpoint: a rerun with the same string reuses it.
inline std::string fingerprint(const settings& s) {
  const auto& m = s.model;
  std::ostringstream o;
  o << "reproduce-v4 vision " << m.vision.image_size << "/" << m.vision.patch_size << "m" << m.vision.merge << " "
    << m.vision.blocks.hidden << "x"
    << m.vision.blocks.n_layers << "h" << m.vision.blocks.n_heads << "i" << m.vision.blocks.intermediate << " proj "
    << m.projector.intermediate << " text " << m.text.hidden << "x" << m.text.n_layers << "h" << m.text.n_heads << "/"
    << m.text.n_kv_heads << "d" << m.text.head_dim << "i" << m.text.intermediate << "v" << m.text.vocab_size << " pretrain "
    << s.pretrain_steps << "x" << s.pretrain_batch << " lr " << s.pretrain_lr << " seed " << s.seed << " "
    << (s.vision_pretext.steps > 0 ? s.vision_pretext.fingerprint() : "no vision pretext");
  // Only when set, so that the uniform mixture's caches (made before these options) still load.
  for (const auto& [task, weight] : s.pretrain_mix) o << " mix " << task << "=" << weight;
  if (s.pretrain_focus_steps > 0) o << " focus " << s.pretrain_focus_steps;
  return o.str();
}

// --- evaluation --------------------------------------------------------------------

struct test_set {
  std::string task;
  bool target = false;
  std::vector<example> examples;
};

struct probe_value {
  double number_mass = 0;
  double with_number = 0;
  double kl = 0;  // KL(reference || model), mean over the probed positions
};

// Which chunks of a test set this process decodes. One process: all of them. The ranks of
// reproduce_mpi (data_parallel.hpp) each decode every k-th chunk and sum the correct answers:
// a chunk holds the rows it holds in one process, so every answer is the one process's, and k
// ranks share the decoding instead of each repeating it.
struct evaluation_share {
  int rank = 0, ranks = 1;
  std::function<std::uint64_t(std::uint64_t)> sum;  // over the ranks, every rank gets the total
  std::uint64_t chunks = 0, decoded = 0;            // chunks of the test sets so far, and decoded here
};
inline evaluation_share& shared_evaluation() {
  static evaluation_share share;
  return share;
}

// The frozen pieces evaluation runs: soft tokens, then cached decoding, with the MLP policy
// (and expert count) of the weights evaluated. The counting bias's reference is the base
// model, dense whatever the policy, so it has a dense frozen model of its own.
template <class Mlp = nn::default_mlp>
class basic_evaluator {
 public:
  using probe_value = reproduce::probe_value;

  basic_evaluator(const tokenizer& tok, const model::multimodal_config& c, const typename Mlp::options& mlp = {})
      : tok_(&tok), mm_(c, recipe::frozen, mlp), reference_(c, recipe::frozen) {}

  // Exact-match accuracy of greedy answers; with `restricted`, decoding keeps to the
  // example's restriction (numbers, yes/no, option letters, clock) plus <eos>.
  double accuracy(const weights_t& w, const std::vector<example>& set, bool restricted) const {
    // Rows decode together when they share image use, prompt length and restriction.
    std::map<std::tuple<bool, std::size_t, int>, std::vector<std::size_t>> groups;
    std::vector<std::vector<std::int64_t>> prompts(set.size());
    for (std::size_t i = 0; i < set.size(); ++i) {
      prompts[i] = tok_->encode(set[i].prompt);
      prompts[i].push_back(tok_->sep());
      groups[{set[i].has_image, prompts[i].size(), restricted ? int(set[i].restrict) : 0}].push_back(i);
    }
    auto& share = shared_evaluation();
    std::uint64_t correct = 0;
    for (const auto& [key, rows_all] : groups)
      for (std::size_t c0 = 0; c0 < rows_all.size(); c0 += chunk) {
        // Counted over every test set so far, the same on every rank: small sets of one chunk
        // each still alternate between the ranks.
        if (share.chunks++ % std::uint64_t(share.ranks) != std::uint64_t(share.rank)) continue;
        ++share.decoded;
        const std::vector<std::size_t> rows(rows_all.begin() + long(c0),
                                            rows_all.begin() + long(std::min(rows_all.size(), c0 + chunk)));
        const auto answers = generate(w, set, prompts, rows, restricted ? restriction(std::get<2>(key)) : restriction::none);
        for (std::size_t r = 0; r < rows.size(); ++r) correct += answers[r] == tok_->encode(set[rows[r]].answer);
      }
    if (share.ranks > 1) correct = share.sum(correct);
    return set.empty() ? 0.0 : double(correct) / double(set.size());
  }

  // Greedy answers (token ids before <eos>; an answer without <eos> keeps a trailing -1).
  std::vector<std::vector<std::int64_t>> generate(const weights_t& w, const std::vector<example>& set,
                                                  const std::vector<std::vector<std::int64_t>>& prompts,
                                                  const std::vector<std::size_t>& rows, restriction r,
                                                  int max_new = 0) const {
    const std::size_t B = rows.size(), L = prompts[rows[0]].size();
    token_ids ids = token_ids::from_shape({B, L});
    std::vector<const example*> ex;
    std::size_t longest = 0;
    for (std::size_t b = 0; b < B; ++b) {
      for (std::size_t t = 0; t < L; ++t) ids(b, t) = prompts[rows[b]][t];
      ex.push_back(&set[rows[b]]);
      longest = std::max(longest, tok_->encode(set[rows[b]].answer).size());
    }
    model::sampling s;
    s.max_new_tokens = max_new > 0 ? max_new : int(longest) + 1;
    s.eos = tok_->eos();
    s.allowed = allowed_tokens(*tok_, r);
    std::optional<cpu::tensor<float>> soft;
    if (ex[0]->has_image) soft = mm_.soft_tokens(w, image_batch(ex));
    const token_ids out = decode(w, ids, s, soft ? &*soft : nullptr);
    std::vector<std::vector<std::int64_t>> answers(B);
    for (std::size_t b = 0; b < B; ++b) {
      bool ended = false;
      for (std::size_t t = 0; t < out.shape(1) && !ended; ++t) {
        if (out(b, t) == tok_->eos()) ended = true;
        else answers[b].push_back(out(b, t));
      }
      if (!ended) answers[b].push_back(-1);  // never closed: not an exact match
    }
    return answers;
  }

  // The counting bias: greedy captions of the probe images, then, at every generated
  // position (through <eos>), the probability mass on number tokens and the KL divergence
  // KL(reference || model) of the next-token distribution from the reference model's (the
  // base model, fed its own soft tokens), with cl::probe_hidden; and the fraction of
  // captions that contain a number token.
  // GateSkip (model/gate_skip.hpp): decoding skips tokens by `plan` (nullptr: none) and adds
  // what ran to `stats`.
  void skip_by(const model::skip_plan* plan, model::skip_stats* stats = nullptr) {
    static_assert(nn::has_residual_gates_v<Mlp>, "reproduce: only a gate_skip model skips tokens");
    plan_ = plan, stats_ = stats;
  }

  probe_value counting_bias(const weights_t& w, const std::vector<example>& probe, const weights_t& reference) const {
    std::vector<std::vector<std::int64_t>> prompts(probe.size());
    std::vector<std::size_t> rows;
    for (std::size_t i = 0; i < probe.size(); ++i) {
      prompts[i] = tok_->encode(probe[i].prompt);
      prompts[i].push_back(tok_->sep());
      rows.push_back(i);
    }
    cl::probe_accumulator acc(cl::token_set(tok_->number_ids(), w.config.text.vocab_size, "numbers"));
    std::size_t with_number = 0;
    for (std::size_t c0 = 0; c0 < rows.size(); c0 += chunk) {
      const std::vector<std::size_t> part(rows.begin() + long(c0), rows.begin() + long(std::min(rows.size(), c0 + chunk)));
      auto caps = generate(w, probe, prompts, part, restriction::none, 12);
      // Teacher-forced pass over prompt + caption: position (prompt end) + i predicts caption token i.
      const std::size_t B = part.size(), Lp = prompts[part[0]].size();
      std::size_t Lc = 0;
      for (auto& c : caps) Lc = std::max(Lc, c.size());
      token_ids ids = xt::full_like(token_ids::from_shape({B, Lp + Lc}), tok_->pad());
      std::vector<const example*> ex;
      for (std::size_t b = 0; b < B; ++b) {
        const bool ended = caps[b].empty() || caps[b].back() != -1;
        if (!ended) caps[b].pop_back();
        for (std::size_t t = 0; t < Lp; ++t) ids(b, t) = prompts[part[b]][t];
        for (std::size_t t = 0; t < caps[b].size(); ++t) ids(b, Lp + t) = caps[b][t];
        ex.push_back(&probe[part[b]]);
        bool number = false;
        for (auto t : caps[b]) number = number || tok_->is_number(t);
        with_number += number;
        caps[b].push_back(ended ? tok_->eos() : -1);  // the position after the caption predicted <eos>
      }
      auto images = image_batch(ex);
      auto soft = mm_.soft_tokens(w, images), soft_ref = reference_.soft_tokens(reference, images);
      typename decltype(mm_)::lm_t::saved_t saved;
      typename decltype(reference_)::lm_t::saved_t saved_ref;
      auto h = mm_.lm().forward(w.lm, ids, saved, &soft);
      auto h_ref = reference_.lm().forward(reference.lm, ids, saved_ref, &soft_ref);
      const std::size_t P = soft.dim(1);
      cl::position_mask mask = xt::zeros<bool>({B, h.dim(1)});
      for (std::size_t b = 0; b < B; ++b)
        for (std::size_t i = 0; i < caps[b].size(); ++i)
          if (caps[b][i] != -1) mask(b, P + Lp - 1 + i) = true;
      cl::probe_hidden(acc, h, w.lm.head(), mask, &h_ref, &reference.lm.head());
    }
    const auto st = acc.positions();
    probe_value v;
    v.number_mass = st.count ? st.mean.set_mass : 0.0;
    v.kl = st.count ? st.mean.kl_ref_model : 0.0;
    v.with_number = probe.empty() ? 0.0 : double(with_number) / double(probe.size());
    return v;
  }

 private:
  token_ids decode(const weights_t& w, const token_ids& ids, const model::sampling& s,
                   const cpu::tensor<float>* soft) const {
    if constexpr (nn::has_residual_gates_v<Mlp>)
      if (plan_) return model::generate_skipping(mm_.lm(), w.lm, ids, s, *plan_, stats_, soft);
    return model::generate(mm_.lm(), w.lm, ids, s, soft);
  }

  static constexpr std::size_t chunk = 64;
  const model::skip_plan* plan_ = nullptr;
  model::skip_stats* stats_ = nullptr;
  const tokenizer* tok_;
  model::multimodal_lm<float, frozen_t, backend::cpu, Mlp> mm_;
  model::multimodal_lm<float, frozen_t> reference_;
};
using evaluator = basic_evaluator<>;

// --- checkpoints ---------------------------------------------------------------------
//
// The pretrained base model is cached as a safetensors file whose metadata carries the
// settings it was made with (skillgraft.reproduce) and a checksum of its content
// (skillgraft.reproduce.checksum: FNV-1a over every tensor's name and float bytes, in
// model order). A file at the cache path that is not such a cache is never overwritten;
// a cache whose content does not match its checksum (zeroed, swapped or scaled tensors,
// NaNs) is refused with the file named.

inline constexpr const char* cache_settings_key = "skillgraft.reproduce";
// What the vision pretext reached, for the report of a run that loads the cache.
inline constexpr const char* cache_pretext_key = "skillgraft.reproduce.vision_pretext";

inline void save_checkpoint(const weights_t& w, const std::filesystem::path& path, const std::string& fp,
                            const std::string& pretext = "") {
  io::safetensors_writer out;
  out.set_metadata("format", "pt");
  out.set_metadata(cache_settings_key, fp);
  if (!pretext.empty()) out.set_metadata(cache_pretext_key, pretext);
  out.set_metadata(content_checksum_key, content_checksum(w));
  model::for_each_multimodal_parameter(const_cast<weights_t&>(w),
                                       [&](const std::string& name, cpu::tensor<float>& t) { out.add(name, t); });
  std::filesystem::create_directories(path.parent_path().empty() ? "." : path.parent_path());
  out.write(path);
}

// The cache file at `path` opened, or nullopt when there is none. Anything else at that
// path -- a file that is not safetensors, a safetensors file without the cache's
// metadata, a directory, a FIFO -- is refused, so that pretraining never overwrites it.
inline std::optional<io::safetensors_file> open_cache(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::symlink_status(path, ec))) return std::nullopt;
  const std::string refuse = "reproduce: --checkpoint " + path.string() +
                             " is not a base-model cache of this program, so it is not overwritten (choose another "
                             "path, or delete it): ";
  std::optional<io::safetensors_file> f;
  try {
    f.emplace(path);
  } catch (const std::exception& e) {
    std::string why = e.what();
    if (why.rfind("skillgraft: ", 0) == 0) why.erase(0, 12);
    throw std::invalid_argument(refuse + why);
  }
  if (!f->metadata().contains(cache_settings_key))
    throw std::invalid_argument(refuse + "it is a safetensors file without the " + cache_settings_key + " metadata");
  return f;
}

// The words where two fingerprints differ, with the words they share around them cut off:
// "3000x32 lr 0.002" against "6000x32 lr 0.001" rather than two 300-character lines.
inline std::pair<std::string, std::string> fingerprint_difference(const std::string& a, const std::string& b) {
  const auto words = [](const std::string& t) {
    std::vector<std::string> w;
    std::istringstream in(t);
    for (std::string x; in >> x;) w.push_back(x);
    return w;
  };
  const auto wa = words(a), wb = words(b);
  std::size_t head = 0, tail = 0;
  while (head < wa.size() && head < wb.size() && wa[head] == wb[head]) ++head;
  while (tail < wa.size() - head && tail < wb.size() - head && wa[wa.size() - 1 - tail] == wb[wb.size() - 1 - tail])
    ++tail;
  const auto join = [](const std::vector<std::string>& w, std::size_t from, std::size_t to) {
    std::string t;
    for (std::size_t i = from; i < to; ++i) t += (t.empty() ? "" : " ") + w[i];
    return t.empty() ? std::string("(nothing)") : t;
  };
  return {join(wa, head, wa.size() - tail), join(wb, head, wb.size() - tail)};
}

// Refuses, before anything is written, a cache the run would overwrite but must not keep
// quiet about: a file that is not this program's cache (open_cache), and a base model named
// by --checkpoint that was made with other settings. Such a file is another run's base model
// (minutes of pretraining, perhaps the one a report was made on); only the run's own
// DIR/base.safetensors is pretrained again when a setting changed.
inline void check_cache(const settings& s) {
  const auto f = open_cache(s.checkpoint_path());
  if (!f || s.checkpoint.empty()) return;
  const std::string& made = f->metadata().at(cache_settings_key);
  const std::string wanted = fingerprint(s);
  if (made == wanted) return;
  const auto [was, now] = fingerprint_difference(made, wanted);
  throw std::invalid_argument("reproduce: --checkpoint " + s.checkpoint.string() +
                              " holds a base model made with other settings, so it is not overwritten (give the "
                              "settings it was made with, another path, or delete it): it has '" + was +
                              "', this run '" + now + "'");
}

// Loads the checkpoint when it exists and was made with the same settings; false when
// there is none or it was made with other settings (it is then pretrained again).
inline bool load_checkpoint(weights_t& w, const std::filesystem::path& path, const std::string& fp) {
  auto f = open_cache(path);
  if (!f) return false;
  if (f->metadata().at(cache_settings_key) != fp) return false;
  const auto sum = f->metadata().find(content_checksum_key);
  if (sum == f->metadata().end()) return false;  // a cache from before checksums: pretrained again
  model::for_each_multimodal_parameter(w, [&](const std::string& name, cpu::tensor<float>& t) { f->load_into(name, t); });
  if (const std::string found = content_checksum(w); found != sum->second)
    throw std::runtime_error("reproduce: the cached base model " + path.string() +
                             " is damaged: its content checksum is " + found + ", but the file records " +
                             sum->second + " (delete it to pretrain again)");
  return true;
}

// --- the data of one run ----------------------------------------------------------------

struct run_data {
  tokenizer tok;
  std::vector<task> general = general_tasks();
  std::vector<task> targets;  // in curriculum order
  std::vector<test_set> tests;  // targets in curriculum order, then the held-out tasks
  std::vector<example> probe;   // captions for the counting-bias probe

  run_data() = default;  // for other splits of the same tasks (lr_search.hpp's validation)
  explicit run_data(const settings& s) {
    for (const auto& name : s.order) {
      bool found = false;
      for (const auto& t : target_tasks())
        if (t.name == name) targets.push_back(t), found = true;
      if (!found) throw std::invalid_argument("reproduce: unknown target task '" + name + "' in --order");
    }
    for (const auto& t : targets) tests.push_back({t.name, true, make_test_set(t, s.test_examples, test_seed(t.name))});
    for (const auto& t : general) tests.push_back({t.name, false, make_test_set(t, s.test_examples, test_seed(t.name))});
    probe = make_test_set(general[0], s.probe_examples, test_seed("caption-probe"));
  }
  std::vector<std::string> task_names() const {
    std::vector<std::string> n;
    for (const auto& t : tests) n.push_back(t.task);
    return n;
  }
};

template <class Mlp>
std::vector<double> evaluate_all(const basic_evaluator<Mlp>& ev, const weights_t& w, const run_data& d, bool restricted) {
  std::vector<double> row;
  for (const auto& t : d.tests) row.push_back(ev.accuracy(w, t.examples, restricted));
  return row;
}

// --- pretraining ----------------------------------------------------------------------

// The questions that name one object by one attribute and ask for another.
inline const std::vector<std::string>& binding_tasks() {
  static const std::vector<std::string> t{"colour", "shape"};
  return t;
}

// The draw of the joint pretraining: stream indices, each repeated as often as its task's
// weight (settings::pretrain_mix), of every task or, with `focus`, of the binding tasks only.
// Throws, naming it, for a weight of a task that is not pretrained on or a weight below 0.
inline std::vector<std::size_t> pretrain_slots(const settings& s, const std::vector<std::string>& tasks, bool focus) {
  for (const auto& [name, weight] : s.pretrain_mix) {
    if (std::find(tasks.begin(), tasks.end(), name) == tasks.end())
      throw std::invalid_argument("reproduce: --pretrain-mix names '" + name + "', which is not a pretraining task");
    if (weight < 0) throw std::invalid_argument("reproduce: --pretrain-mix: the weight of '" + name + "' is negative");
  }
  std::vector<std::size_t> slots;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const auto& b = binding_tasks();
    if (focus && std::find(b.begin(), b.end(), tasks[i]) == b.end()) continue;
    int weight = 1;
    for (const auto& [name, w] : s.pretrain_mix)
      if (name == tasks[i]) weight = w;
    slots.insert(slots.end(), std::size_t(weight), i);
  }
  if (slots.empty()) throw std::invalid_argument("reproduce: --pretrain-mix leaves no task to pretrain on");
  return slots;
}

// The mixture in words, for the report: "" when uniform.
inline std::string pretrain_mix_text(const settings& s) {
  std::string m;
  for (const auto& [task, weight] : s.pretrain_mix) m += (m.empty() ? " (weights " : ", ") + task + " " + std::to_string(weight);
  if (!m.empty()) m += ", others 1)";
  if (s.pretrain_focus_steps > 0) m += ", the first " + std::to_string(s.pretrain_focus_steps) + " on colour and shape only";
  return m;
}

// The joint pretraining's tasks, in the order of its streams.
inline std::vector<std::string> pretrain_task_names() {
  std::vector<std::string> n;
  for (const auto& group : {general_tasks(), pretraining_only_tasks()})
    for (const auto& t : group) n.push_back(t.name);
  return n;
}

// The base model: every parameter trains on the eight general abilities and the text-only
// number sequences (what an LLM knows about numbers before it sees images), drawn in the
// proportions of settings::pretrain_mix (and pretrain_focus_steps).
// `step(batches)` runs one optimisation step on the encoded micro-batches (images first, then
// text-only rows) wherever the model lives; the data and its order are the same everywhere.
template <class Step>
void pretrain_loop(const settings& s, const run_data& d, int image_tokens, progress& prog, Step&& step) {
  std::vector<example_stream> streams;
  const auto extra = pretraining_only_tasks();
  for (const auto& t : d.general) streams.emplace_back(t, train_seed(s.seed, t.name, 1000));
  for (const auto& t : extra) streams.emplace_back(t, train_seed(s.seed, t.name, 1000));
  std::vector<std::string> names;
  for (const auto& st : streams) names.push_back(st.source().name);
  const auto all = pretrain_slots(s, names, false);
  const auto focus = s.pretrain_focus_steps > 0 ? pretrain_slots(s, names, true) : all;
  std::mt19937_64 mix(s.seed ^ 0x6d6978ull);
  prog.begin("pretrain", s.pretrain_steps);
  for (int n = 0; n < s.pretrain_steps; ++n) {
    const auto& slots = n < s.pretrain_focus_steps ? focus : all;
    std::vector<example> rows;
    for (int b = 0; b < s.pretrain_batch; ++b)
      rows.push_back(streams[slots[std::size_t(gen::uniform(mix, 0, int(slots.size()) - 1))]].next());
    std::vector<const example*> img, txt;
    for (const auto& e : rows) (e.has_image ? img : txt).push_back(&e);
    std::vector<encoded_batch> enc;
    if (!img.empty()) enc.push_back(encode_for_training(d.tok, img, image_tokens));
    if (!txt.empty()) enc.push_back(encode_for_training(d.tok, txt, image_tokens));
    const train::step_stats st = step(enc);
    prog.step(n + 1, st.loss);
  }
  prog.end();
}

using full_t = std::remove_cv_t<decltype(recipe::full)>;

inline train::cosine_schedule pretrain_schedule(const settings& s) {
  return {.peak = s.pretrain_lr, .floor = 0.1 * s.pretrain_lr, .warmup = std::max(1, s.pretrain_steps / 20),
          .total = s.pretrain_steps};
}

// The joint pretraining's recipe: everything, or, once the vision encoder has been pretrained
// on its own, everything but it (LLaVA's recipe: the encoder stays as its pretraining left it).
using joint_t = std::remove_cv_t<decltype(recipe::llm | trainable<group::projector>)>;
template <class F>
decltype(auto) with_pretrain_recipe(const settings& s, F&& f) {
  if (s.vision_pretext.steps > 0) return f(joint_t{});
  return f(full_t{});
}

// The weights the joint pretraining starts from: a seeded initialisation, then the vision
// pretext (on the CPU, whatever the device: it is small). Returns what the pretext reached.
inline std::string initial_weights(weights_t& w, const settings& s, progress& prog) {
  model::init_weights(w, s.seed);
  if (s.vision_pretext.steps <= 0) return "none";
  const auto r = pretrain_vision(w, s.vision_pretext, s.seed, prog);
  char text[384];
  std::snprintf(text, sizeof text,
                "%d steps x %d, loss %.3f, token accuracy on held-apart images: shape %.1f %%, colour %.1f %%, size %.1f %%"
                " (on the tokens an object covers: %.1f %%, %.1f %%, %.1f %%)",
                s.vision_pretext.steps, s.vision_pretext.batch, r.final_loss, 100 * r.token_accuracy[0],
                100 * r.token_accuracy[1], 100 * r.token_accuracy[2], 100 * r.object_token_accuracy[0],
                100 * r.object_token_accuracy[1], 100 * r.object_token_accuracy[2]);
  const std::string o = text;
  prog.note("vision pretext: " + o);
  return o;
}

// settings::pretrain_watch: the binding questions' accuracy during the joint pretraining.
class pretrain_watcher {
 public:
  pretrain_watcher(const settings& s, const run_data& d) : every_(s.pretrain_watch), restricted_(s.restricted) {
    if (every_ <= 0) return;
    ev_.emplace(d.tok, s.model);
    for (const auto& t : d.general)
      if (std::find(binding_tasks().begin(), binding_tasks().end(), t.name) != binding_tasks().end())
        sets_.push_back({t.name, false, make_test_set(t, 96, name_hash(t.name) ^ 0x77617463ull)});  // "watc"
  }
  void operator()(const weights_t& w, int step, progress& prog) const {
    if (every_ <= 0 || step % every_ != 0) return;
    std::string line = "pretrain step " + std::to_string(step) + ":";
    for (const auto& t : sets_) {
      char v[64];
      std::snprintf(v, sizeof v, " %s %.1f %%", t.task.c_str(), 100 * ev_->accuracy(w, t.examples, restricted_));
      line += v;
    }
    prog.note(line);
  }

 private:
  int every_;
  bool restricted_;
  std::optional<evaluator> ev_;
  std::vector<test_set> sets_;
};

inline std::string pretrain(weights_t& w, const settings& s, const run_data& d, progress& prog) {
  const std::string pretext = initial_weights(w, s, prog);
  with_pretrain_recipe(s, [&](auto r) {
    model::multimodal_lm<float, decltype(r)> mm(w.config, r);
    auto g = mm.make_grads(w);
    train::adamw<float> opt(mm, w, g, {.lr = s.pretrain_lr, .weight_decay = 0.01});
    const auto sched = pretrain_schedule(s);
    const pretrain_watcher watch(s, d);
    int step = 0;
    pretrain_loop(s, d, mm.image_tokens(), prog, [&](const std::vector<encoded_batch>& enc) {
      std::vector<train::micro_batch<float>> mbs;
      for (const auto& e : enc) mbs.push_back({e.ids, e.targets, e.images.empty() ? nullptr : &e.images});
      const auto st = train::train_step(mm, w, g, opt, sched, std::span<const train::micro_batch<float>>(mbs));
      watch(w, ++step, prog);
      return st;
    });
  });
  return pretext;
}

// --- fine-tuning methods -----------------------------------------------------------------

struct probe_point {
  int stage = 0;  // 0: base model
  int step = 0;   // step within the stage (0: after the stage, for the per-stage series)
  double number_mass = 0, with_number = 0, kl = 0;
};

struct method_result {
  std::string name;
  std::uint64_t seed = 0;              // the stages' seed
  std::string recipe;  // what trains
  std::vector<std::vector<double>> R;  // rows: base, after stage 1..T; columns: run_data::tests
  double train_seconds = 0;            // optimisation steps only
  double eval_seconds = 0;
  std::int64_t peak_bytes = 0;         // ledger peak during training: the method's weights, gradients,
                                       // optimizer state, activations and method state
  std::size_t trainable = 0;           // trainable elements
  std::vector<probe_point> probes;     // during the counting stage, and after every stage
  std::vector<double> final_loss;      // last training loss of each stage
  std::string device = "cpu";          // where it trained (peak_bytes are that device's)
  double lr = 0;                       // the peak learning rate it trained with
  std::size_t resumed_stages = 0;      // leading stages taken from a search run (stage_states.hpp)
};

// LwF's objective for the multimodal model: the teacher (the model before this stage) sees
// the same soft tokens (the vision encoder and projector are frozen under LwF's recipe).
template <class Backend = backend::cpu>
struct multimodal_lwf_objective {
  using tensor_t = typename Backend::template tensor<float>;
  cl::teacher<float, Backend>* teach = nullptr;
  cl::lwf_options options{};

  template <class Model>
  train::loss_result<float, Backend> micro(const Model& model, typename Model::weights_t& w,
                                           typename Model::grads_t& g, const train::micro_batch<float, Backend>& mb,
                                           const tensor_t& h, const token_ids& targets, std::size_t normaliser) const {
    static_assert(!Model::train_vision && !Model::train_projector, "LwF here assumes a frozen vision path");
    tensor_t soft;
    if (mb.prefix) soft = model.soft_tokens(w, *mb.prefix);
    auto ht = teach->hidden(w.lm, mb.ids, mb.prefix ? &soft : nullptr);
    auto r = cl::lwf_loss(h, w.lm.head(), ht, teach->head(w.lm), targets, model.head_grad(g), options, normaliser,
                          options.all_positions ? 0 : normaliser);
    return std::move(static_cast<train::loss_result<float, Backend>&>(r));
  }
};

// One step of a stage on any backend: LwF's objective when the method distils (and the recipe
// leaves the vision path frozen, as LwF's does), else the masked cross-entropy. `comm`: the
// ranks that share the step (data_parallel.hpp), one process by default.
template <class Model, class Optimizer, class Backend, class Comm = train::no_communicator>
train::step_stats stage_step(const Model& mm, typename Model::weights_t& w, typename Model::grads_t& g,
                             Optimizer& opt, const train::cosine_schedule& sched,
                             const train::micro_batch<float, Backend>& mb, cl::teacher<float, Backend>* teach,
                             const settings& s, Comm&& comm = {}) {
  if constexpr (!Model::train_vision && !Model::train_projector) {
    if (teach) {
      const multimodal_lwf_objective<Backend> obj{teach, {.lambda = s.lwf_lambda, .temperature = s.lwf_temperature}};
      return train::train_step(mm, w, g, opt, sched, std::span(&mb, 1), {}, obj, comm);
    }
  }
  return train::train_step(mm, w, g, opt, sched, std::span(&mb, 1), {}, train::masked_ce_objective{}, comm);
}

enum class method_kind { plain, lwf, wise_ft, lora };

// Whether a run's state after a stage is its weights alone, so that stage_states can save it
// and start another run from it: not WiSE-FT's running average, LoRA's adapters (drawn again
// each stage) or a mixture's expert count.
inline constexpr bool resumable(method_kind kind, bool mixture) {
  return !mixture && (kind == method_kind::plain || kind == method_kind::lwf);
}

// A stage's learning rate over its steps, and its next batch of the target's examples.
inline train::cosine_schedule stage_schedule(const settings& s, double lr) {
  return {.peak = lr, .floor = 0.1 * lr, .warmup = std::max(1, s.stage_steps / 10), .total = s.stage_steps};
}
inline encoded_batch next_stage_batch(example_stream& stream, const settings& s, const tokenizer& tok, int image_tokens) {
  std::vector<example> rows;
  for (int b = 0; b < s.stage_batch; ++b) rows.push_back(stream.next());
  std::vector<const example*> ptrs;
  for (const auto& e : rows) ptrs.push_back(&e);
  return encode_for_training(tok, ptrs, image_tokens);
}

inline std::vector<int> probe_steps(int stage_steps) {
  std::vector<int> v;
  for (int s : {1, 10, 100, 1000})
    if (s <= stage_steps) v.push_back(s);
  if (v.empty() || v.back() != stage_steps) v.push_back(stage_steps);
  return v;
}

// The optimisation of one stage on the CPU: gradients and AdamW over the host weights
// (the optimizer state starts afresh each stage, for every method), and LwF's teacher.
// device_cuda.hpp has the same interface for the GPU (cuda_stage).
template <class R, class Mlp>
class cpu_stage {
 public:
  using model_t = model::multimodal_lm<float, R, backend::cpu, Mlp>;
  static constexpr const char* device = "cpu";
  static memory_ledger& meter() { return ledger(); }

  cpu_stage(R, const model_t& mm, weights_t& w, double lr, method_kind kind, const settings& s)
      : mm_(mm), w_(w), g_(mm.make_grads(w)), opt_(mm, w, g_, {.lr = lr, .weight_decay = 0.0}), s_(s) {
    if (kind == method_kind::lwf) teach_.emplace(mm.lm(), w.lm);
  }
  std::size_t trainable() {
    std::size_t n = 0;
    mm_.for_each_trainable(w_, g_, [&](const std::string&, auto& p, auto&) { n += p.size(); });
    return n;
  }
  train::step_stats step(const encoded_batch& enc, const train::cosine_schedule& sched) {
    train::micro_batch<float> mb{enc.ids, enc.targets, enc.images.empty() ? nullptr : &enc.images};
    return stage_step(mm_, w_, g_, opt_, sched, mb, teach_ ? &*teach_ : nullptr, s_);
  }
  void sync(weights_t&) const {}  // the host weights are the ones that train

 protected:  // data_parallel.hpp's stage shares the step between ranks
  const model_t& mm_;
  weights_t& w_;
  typename model_t::grads_t g_;
  train::adamw<float> opt_;
  const settings& s_;
  std::optional<cl::teacher<float>> teach_;
};

template <class R, class Mlp = nn::default_mlp, template <class, class> class Stage = cpu_stage>
method_result run_recipe(const std::string& name, R recipe, method_kind kind, const settings& s, const weights_t& base,
                         const std::vector<double>& base_row, const probe_value& base_probe, const run_data& d,
                         progress& prog, const stage_states& states = {}) {
  using clock = std::chrono::steady_clock;
  using model_t = model::multimodal_lm<float, R, backend::cpu, Mlp>;
  using stage_t = Stage<R, Mlp>;
  if (!s.train_layers.all()) recipe = recipe.on_layers(s.train_layers.first, s.train_layers.last);
  constexpr bool mixture = std::is_same_v<typename Mlp::options, nn::moe_options>;
  if (states.use != stage_states::mode::none && !resumable(kind, mixture))
    throw std::logic_error("reproduce: " + name + "'s state after a stage is more than its weights (stage_states.hpp)");
  method_result res;
  res.name = name;
  res.device = stage_t::device;
  memory_ledger& meter = stage_t::meter();
  const std::int64_t before = meter.live_total();  // what the method did not allocate
  auto cfg = base.config;
  if (kind == method_kind::lora) cfg.text.lora_rank = s.lora_rank, cfg.text.lora_alpha = 2.0 * s.lora_rank;
  weights_t w(cfg);
  copy_weights(base, w);
  res.R.push_back(base_row);
  res.probes.push_back({0, 0, base_probe.number_mass, base_probe.with_number, base_probe.kl});
  std::optional<cl::running_average<float>> average;
  std::int64_t peak = meter.live_total();
  const double lr = kind == method_kind::lora ? s.lora_lr : s.lr;
  res.lr = lr;
  for (std::size_t k = 0; k < d.targets.size(); ++k) {
    const auto& target = d.targets[k];
    // A mixture grows one expert per task (a copy of the newest; expert 0, the original MLP,
    // stays frozen). The expert count is part of the policy's options, so the model and the
    // evaluator's frozen model are built for each stage.
    typename model_t::mlp_options_t mlp_options{};
    if constexpr (mixture) mlp_options.experts = cl::add_expert(w.lm);
    model_t mm(cfg, recipe, mlp_options);
    basic_evaluator<Mlp> ev(d.tok, cfg, mlp_options);
    if (kind == method_kind::wise_ft && k == 0) average.emplace(mm.lm(), w.lm, s.wise_beta);
    if (kind == method_kind::lora) cl::attach_lora(mm.lm(), w.lm, {.rank = s.lora_rank, .alpha = 2.0 * s.lora_rank, .seed = s.seed + k});
    if (states.resumes(k)) {
      // The stage as the search run at this rate and seed trained it: its probes on the
      // weights it saved at those steps, its measurements, its end state.
      if (target.name == "count")
        for (int step : probe_steps(s.stage_steps)) {
          load_stage_state(w, base, states, k + 1, step == s.stage_steps ? 0 : step);
          const auto t1 = clock::now();
          const auto pv = ev.counting_bias(w, d.probe, base);
          res.probes.push_back({int(k + 1), step, pv.number_mass, pv.with_number, pv.kl});
          res.eval_seconds += std::chrono::duration<double>(clock::now() - t1).count();
        }
      const stage_record rec = load_stage_state(w, base, states, k + 1, 0);
      res.train_seconds = rec.train_seconds;
      res.final_loss.push_back(rec.final_loss);
      peak = std::max(peak, before + rec.peak_bytes);
      if (k == 0) res.trainable = rec.trainable;
      res.resumed_stages = k + 1;
      prog.note(name + " " + std::to_string(k + 1) + "/" + std::to_string(d.targets.size()) + " " + target.name +
                ": the search's run at this rate and seed (" + states.dir.filename().string() + ")");
    } else {
      stage_t stage(recipe, mm, w, lr, kind, s);
      if (k == 0) res.trainable = stage.trainable();
      const auto sched = stage_schedule(s, lr);
      example_stream stream(target, train_seed(s.seed, target.name, int(k)));
      const auto probes = probe_steps(s.stage_steps);
      prog.begin(name + " " + std::to_string(k + 1) + "/" + std::to_string(d.targets.size()) + " " + target.name,
                 s.stage_steps);
      double loss = 0;
      meter.reset_peaks();  // the peak of training alone (evaluation and probes excluded)
      for (int step = 0; step < s.stage_steps; ++step) {
        const auto enc = next_stage_batch(stream, s, d.tok, mm.image_tokens());
        const auto t0 = clock::now();
        const train::step_stats st = stage.step(enc, sched);
        res.train_seconds += std::chrono::duration<double>(clock::now() - t0).count();
        peak = std::max(peak, meter.peak_total());
        loss = st.loss;
        prog.step(step + 1, st.loss);
        if (target.name == "count" && std::find(probes.begin(), probes.end(), step + 1) != probes.end()) {
          const auto t1 = clock::now();
          stage.sync(w);
          const auto pv = ev.counting_bias(w, d.probe, base);
          res.probes.push_back({int(k + 1), step + 1, pv.number_mass, pv.with_number, pv.kl});
          res.eval_seconds += std::chrono::duration<double>(clock::now() - t1).count();
          if (states.records() && step + 1 < s.stage_steps)
            save_stage_state(w, base, states, k + 1, step + 1, {res.train_seconds, loss, peak - before, res.trainable});
          meter.reset_peaks();
        }
      }
      stage.sync(w);
      res.final_loss.push_back(loss);
      prog.end();
      if (states.records()) save_stage_state(w, base, states, k + 1, 0, {res.train_seconds, loss, peak - before, res.trainable});
    }
    if (kind == method_kind::lora) {
      cl::lora_merge merged(w.lm);
      merged.commit();
      cl::detach_lora(w.lm);
    }
    if (kind == method_kind::wise_ft) average->after_task(mm.lm(), w.lm);
    const auto t1 = clock::now();
    res.R.push_back(evaluate_all(ev, w, d, s.restricted));
    const auto pv = ev.counting_bias(w, d.probe, base);
    res.probes.push_back({int(k + 1), 0, pv.number_mass, pv.with_number, pv.kl});
    res.eval_seconds += std::chrono::duration<double>(clock::now() - t1).count();
  }
  res.peak_bytes = peak - before;
  return res;
}

// The LoRA baseline's recipe: adapters on every projection of the language model.
inline constexpr auto lora_recipe = trainable<lora<proj::q>, lora<proj::k>, lora<proj::v>, lora<proj::o>,
                                              lora<proj::gate>, lora<proj::up>, lora<proj::down>>;

// The MoE baseline: per task a new expert and the router train (the newest expert's Gate, Up
// and Down). Top-2 renormalised, because a mixture grown from the dense MLP then starts at the
// base model bit for bit (cl/moe.hpp) and the router still gets a gradient.
using moe_policy = nn::moe<nn::act::silu, 2>;
inline constexpr auto moe_recipe = recipe::mlp | trainable<group::router>;

inline std::string method_description(const std::string& m) {
  if (m == "lwf") return "mlp + LwF distillation";
  if (m == "wise_ft") return "llm + sequential WiSE-FT";
  if (m == "lora") return "LoRA on all LLM projections";
  if (m == "moe") return "MoE on the MLP";
  if (m == "llm") return "whole LLM";
  if (m == "full") return "vision + projector + LLM";
  if (m == "vision_projector") return "vision encoder + projector";
  if (m == "sa_proj") return "q, k, v, o";
  if (m == "mlp") return "gate, up, down";
  if (m == "mlp_gate_up") return "gate, up (down frozen)";
  if (m == "mlp_down") return "down";
  return m;
}

// Whether run_method can run m: a baseline of all_methods() or any multimodal recipe by name.
inline bool method_available(const std::string& m) {
  return std::find(all_methods().begin(), all_methods().end(), m) != all_methods().end() ||
         is_multimodal_recipe_name(m);
}

// The recipe runs are instantiated in their own translation units (recipes_*.cpp) when the
// program is built from them, so that they compile in parallel.
#define SKILLGRAFT_REPRODUCE_RUN_RECIPE_WITH(R, Mlp)                                                         \
  method_result run_recipe<std::remove_cv_t<decltype(R)>, Mlp>(                                              \
      const std::string&, std::remove_cv_t<decltype(R)>, method_kind, const settings&, const weights_t&,    \
      const std::vector<double>&, const probe_value&, const run_data&, progress&, const stage_states&)
#define SKILLGRAFT_REPRODUCE_RUN_RECIPE(R) SKILLGRAFT_REPRODUCE_RUN_RECIPE_WITH(R, nn::default_mlp)
#ifdef SKILLGRAFT_REPRODUCE_SPLIT_RECIPES
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::llm);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp_gate_up);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::sa_proj);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp_down);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::frozen);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::vision_projector);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::full);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE(lora_recipe);
extern template SKILLGRAFT_REPRODUCE_RUN_RECIPE_WITH(moe_recipe, moe_policy);
#endif

// Whether run_method can record and resume m's stage states (see resumable).
inline bool resumable_method(const std::string& m) { return m != "wise_ft" && m != "lora" && m != "moe"; }

// Stage: where each step trains (cpu_stage; data_parallel.hpp's shares it between ranks).
template <template <class, class> class Stage = cpu_stage>
method_result run_method(const std::string& m, const settings& s, const weights_t& base,
                         const std::vector<double>& base_row, const probe_value& base_probe, const run_data& d,
                         progress& prog, const stage_states& states = {}) {
  auto run = [&]<class Mlp = nn::default_mlp>(auto recipe, method_kind kind) {
    return run_recipe<std::remove_cv_t<decltype(recipe)>, Mlp, Stage>(m, recipe, kind, s, base, base_row, base_probe,
                                                                       d, prog, states);
  };
  method_result r;
  if (m == "lwf") r = run(recipe::mlp, method_kind::lwf);
  else if (m == "wise_ft") r = run(recipe::llm, method_kind::wise_ft);
  else if (m == "lora") r = run(lora_recipe, method_kind::lora);
  else if (m == "moe") r = run.template operator()<moe_policy>(moe_recipe, method_kind::plain);
  else if (!method_available(m))
    throw std::invalid_argument("reproduce: method '" + m + "' is not available in this build");
  else
    r = with_multimodal_recipe(m, [&](auto rc) { return run(rc, method_kind::plain); });
  r.recipe = method_description(m);
  return r;
}

// --- the GPU ------------------------------------------------------------------------------

// With --device cuda every method trains on the GPU: the plain recipes, LwF (its teacher on
// the device), LoRA (adapters attached and merged on the host between stages), MoE (the
// mixture grown on the host between stages) and WiSE-FT (its averaging is a host step between
// stages). Evaluation and the probes run on the CPU copy of the weights.

#ifdef SKILLGRAFT_REPRODUCE_CUDA
inline constexpr bool built_with_cuda = true;
// device_cuda.cu (nvcc): pretrain and run_method with the training on the GPU.
// cuda_device_ready says why not when there is no usable device; call it in a process that
// will not fork afterwards (a CUDA context does not survive fork).
bool cuda_device_ready(std::string& why);
std::string pretrain_cuda(weights_t& w, const settings& s, const run_data& d, progress& prog);
method_result run_method_cuda(const std::string& m, const settings& s, const weights_t& base,
                              const std::vector<double>& base_row, const probe_value& base_probe, const run_data& d,
                              progress& prog);
#else
inline constexpr bool built_with_cuda = false;
#endif

}  // namespace skillgraft::reproduce
