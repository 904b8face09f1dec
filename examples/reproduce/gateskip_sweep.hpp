#pragma once
// GateSkip on the reproduction's model (docs/gateskip.md): residual gates added to the base
// model, fine-tuned with a recipe on the first target task under the sparsity objective; then
// per-layer thresholds calibrated for each budget, and the target and held-out tasks evaluated
// with token-wise skipping, beside the compute skipping saved: the FLOPs skip_stats counts and
// the wall time of the evaluation, each against the 100 % budget of the same run.
//
//   reproduce --gateskip-sweep [--out DIR] [--order TARGET,...] [--stage-steps N] ...
//
// writes gateskip.md, gateskip.csv and gateskip.svg under --out; the base model is the
// reproduction's, loaded from its cache there or pretrained and cached as a run would.
#include <chrono>
#include <cmath>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "skillgraft/train/gate_sparsity.hpp"

#include "pipeline.hpp"

namespace skillgraft::reproduce {

using gated_mlp = nn::gate_skip<>;

struct sweep_options {
  std::vector<double> budgets{1.0, 0.9, 0.75, 0.5};  // fraction of tokens each layer and branch keeps
  train::gate_sparsity_options sparsity{};           // the paper's code: lambda 0.01, l2
  // The training-time budget ramps from 0.5 % to this over the fine-tuning steps (the paper's
  // code: to 10 % over 5000 steps), so the model learns to do without what it will skip.
  double train_skip = 0.1;
  int calibration_examples = 32;  // per task, the target's and each held-out task's, from training streams
};

// One budget's evaluation of every test set of the run.
struct budget_row {
  double keep = 1;
  std::vector<double> accuracy;  // per run_data::tests
  model::skip_stats stats;       // FLOPs, branch-tokens skipped and decoding time, all test sets
  double eval_seconds = 0;       // wall time of the whole evaluation (soft tokens and decoding)
};

struct sweep_variant {
  std::string name, trains;
  double final_loss = 0;         // the last step's loss (cross-entropy and gate penalty)
  std::vector<double> start;     // the gated model before fine-tuning, without skipping
  std::vector<double> noskip;    // after fine-tuning, model::generate (no skipping decoder)
  std::vector<budget_row> rows;  // in budget order; rows[0] is the 100 % budget
};

struct sweep_result {
  std::vector<std::string> tasks;
  std::vector<bool> target;  // per task
  std::vector<double> base;  // the base model, without gates
  double gate_flops = 0;     // FLOPs of one gate for one token (2 hidden x gate width), which always runs
  std::vector<sweep_variant> variants;
  double seconds = 0;
};

// Mean accuracy over the target (or the held-out) test sets of a row.
inline double mean_of(const std::vector<double>& row, const std::vector<bool>& target, bool want_target) {
  double sum = 0;
  int n = 0;
  for (std::size_t j = 0; j < row.size(); ++j)
    if (target[j] == want_target) sum += row[j], ++n;
  return n ? sum / n : 0.0;
}

// Calibration sequences (prompt <sep> answer, teacher-forced as decoding sees them) from the
// training streams of the target and every held-out task, grouped by image use and length so
// that no row is padded.
struct calibration_set {
  std::vector<token_ids> ids;
  std::vector<cpu::tensor<float>> images;  // empty for text-only groups
};

inline calibration_set make_calibration_set(const settings& s, const sweep_options& o, const run_data& d) {
  std::map<std::tuple<bool, std::size_t>, std::vector<example>> groups;
  std::vector<const task*> tasks{&d.targets.front()};
  for (const auto& t : d.general) tasks.push_back(&t);
  for (const task* t : tasks) {
    example_stream stream(*t, train_seed(s.seed, t->name, 2000));
    for (int i = 0; i < o.calibration_examples; ++i) {
      auto e = stream.next();
      const std::size_t L = d.tok.encode(e.prompt).size() + 1 + d.tok.encode(e.answer).size();
      groups[{e.has_image, L}].push_back(std::move(e));
    }
  }
  calibration_set c;
  for (const auto& [key, rows] : groups) {
    const std::size_t L = std::get<1>(key);
    token_ids ids = token_ids::from_shape({rows.size(), L});
    std::vector<const example*> ptrs;
    for (std::size_t b = 0; b < rows.size(); ++b) {
      auto seq = d.tok.encode(rows[b].prompt);
      seq.push_back(d.tok.sep());
      for (auto id : d.tok.encode(rows[b].answer)) seq.push_back(id);
      for (std::size_t t = 0; t < L; ++t) ids(b, t) = seq[t];
      ptrs.push_back(&rows[b]);
    }
    c.ids.push_back(std::move(ids));
    c.images.push_back(std::get<0>(key) ? image_batch(ptrs) : cpu::tensor<float>{});
  }
  return c;
}

template <class Mm>
model::skip_plan calibrate(const Mm& mm, const weights_t& w, const calibration_set& c, double keep) {
  std::vector<cpu::tensor<float>> soft(c.ids.size());
  std::vector<model::calibration_batch<float>> batches;
  for (std::size_t i = 0; i < c.ids.size(); ++i) {
    if (!c.images[i].empty()) soft[i] = mm.soft_tokens(w, c.images[i]);
    batches.push_back({&c.ids[i], soft[i].empty() ? nullptr : &soft[i]});
  }
  return model::calibrate_skipping(mm.lm(), w.lm, batches, keep);
}

// Every test set evaluated by `ev` (skipping as it is set), and the wall time it took.
template <class Mlp>
std::vector<double> timed_evaluation(const basic_evaluator<Mlp>& ev, const weights_t& w, const run_data& d,
                                     const settings& s, double& seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  auto row = evaluate_all(ev, w, d, s.restricted);
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return row;
}

// What a variant's gates fine-tune on: the first target task (the reproduction's stages), or
// the general abilities the held-out tasks test, mixed as in pretraining (the paper's setting:
// gates trained on the distribution they are evaluated on).
enum class gate_data { target, general };

// One variant: gates on a copy of the base model, `recipe` (which names the gates) fine-tuned
// under the sparsity objective for the stage's steps, then every budget evaluated.
template <class R>
sweep_variant sweep_recipe(const std::string& name, const std::string& trains, R recipe, gate_data data,
                           const settings& s, const sweep_options& o, const weights_t& base,
                           const calibration_set& calib, const run_data& d, progress& prog) {
  static_assert(trains_v<group::residual_gate<branch::attention>, R> && trains_v<group::residual_gate<branch::mlp>, R>,
                "reproduce: a GateSkip variant trains the residual gates");
  sweep_variant v;
  v.name = name, v.trains = trains;
  weights_t w(base.config);
  copy_weights(base, w);
  nn::add_residual_gates(w.lm.trunk);  // the paper's start: bias 5, weights N(0, 0.01^2)
  basic_evaluator<gated_mlp> ev(d.tok, w.config);
  v.start = evaluate_all(ev, w, d, s.restricted);
  {
    model::multimodal_lm<float, R, backend::cpu, gated_mlp> mm(w.config, recipe);
    auto g = mm.make_grads(w);
    train::adamw<float> opt(mm, w, g, {.lr = s.lr, .weight_decay = 0.0});
    const auto sched = stage_schedule(s, s.lr);
    const train::skip_schedule ramp{.start = std::min(0.005, o.train_skip), .end = o.train_skip, .steps = s.stage_steps};
    const train::gate_sparsity_objective objective{o.sparsity};
    // One step on micro-batches of either kind (image rows and text rows apart).
    auto step = [&](const std::vector<encoded_batch>& enc) {
      auto mlp = mm.mlp_options();
      mlp.train_skip = ramp(opt.steps());
      mm.set_mlp_options(mlp);
      std::vector<train::micro_batch<float>> mbs;
      for (const auto& e : enc) mbs.push_back({e.ids, e.targets, e.images.empty() ? nullptr : &e.images});
      const auto st = train::train_step(mm, w, g, opt, sched, std::span<const train::micro_batch<float>>(mbs), {}, objective);
      v.final_loss = st.loss;
      return st;
    };
    if (data == gate_data::general) {
      settings mix = s;  // the pretraining mixture, at the stage's length and batch
      mix.pretrain_steps = s.stage_steps, mix.pretrain_batch = s.stage_batch, mix.pretrain_focus_steps = 0;
      pretrain_loop(mix, d, mm.image_tokens(), prog, step);
    } else {
      const auto& target = d.targets.front();
      example_stream stream(target, train_seed(s.seed, target.name, 0));
      prog.begin("gateskip " + name + " on " + target.name, s.stage_steps);
      for (int n = 0; n < s.stage_steps; ++n) {
        std::vector<encoded_batch> enc;
        enc.push_back(next_stage_batch(stream, s, d.tok, mm.image_tokens()));
        prog.step(n + 1, step(enc).loss);
      }
      prog.end();
    }
  }
  v.noskip = evaluate_all(ev, w, d, s.restricted);
  const model::multimodal_lm<float, frozen_t, backend::cpu, gated_mlp> frozen(w.config, recipe::frozen);
  for (double keep : o.budgets) {
    budget_row row;
    row.keep = keep;
    const auto plan = calibrate(frozen, w, calib, keep);
    ev.skip_by(&plan, &row.stats);
    row.accuracy = timed_evaluation(ev, w, d, s, row.eval_seconds);
    ev.skip_by(nullptr);
    prog.note("gateskip " + name + ", keep " + fmt(100 * keep, "%.0f") + " %: " + fmt(100 * row.stats.skipped_fraction()) +
              " % of branch-tokens skipped, " + fmt(100 * row.stats.flops_saved()) + " % of FLOPs saved");
    v.rows.push_back(std::move(row));
  }
  // Budget 100 % skips nothing: it must decode what the model decodes without the skipping path.
  if (v.rows.front().accuracy != v.noskip || v.rows.front().stats.branch_skipped != 0)
    throw std::logic_error("reproduce: gateskip " + name + ": the 100 % budget differs from decoding without skipping");
  return v;
}

// --- reports -------------------------------------------------------------------------------

// Compute of a budget against the 100 % budget of the same variant (rows[0]).
struct relative_compute {
  double flops = 1, eval_time = 1, decode_time = 1;
};
inline relative_compute relative_to_full(const sweep_variant& v, const budget_row& r) {
  const auto& full = v.rows.front();
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 1.0; };
  return {ratio(r.stats.flops_run, full.stats.flops_run), ratio(r.eval_seconds, full.eval_seconds),
          ratio(r.stats.seconds, full.stats.seconds)};
}

// FLOPs that ran against those of the base model without gates on the same tokens: skip_stats
// counts every gate (one per (token, layer, branch) triple, skipped or not) in both its totals,
// and the model without gates runs none.
inline double flops_vs_ungated(const sweep_result& r, const budget_row& row) {
  const double ungated = row.stats.flops_full - r.gate_flops * double(row.stats.branch_tokens);
  return ungated > 0 ? row.stats.flops_run / ungated : 1.0;
}

inline std::string gateskip_csv(const sweep_result& r) {
  std::string o = "variant,keep";
  for (const auto& t : r.tasks) o += "," + t;
  o += ",target,heldout,branch_skipped,flops_saved,flops_vs_full,flops_vs_ungated,eval_seconds,eval_vs_full,"
       "decode_seconds,decode_vs_full\n";
  auto num = [](double x) { return cl::detail::csv_number(x); };
  for (const auto& v : r.variants)
    for (const auto& row : v.rows) {
      const auto rel = relative_to_full(v, row);
      std::vector<double> cells{row.keep};
      cells.insert(cells.end(), row.accuracy.begin(), row.accuracy.end());
      for (double x : {mean_of(row.accuracy, r.target, true), mean_of(row.accuracy, r.target, false),
                       row.stats.skipped_fraction(), row.stats.flops_saved(), rel.flops, flops_vs_ungated(r, row),
                       row.eval_seconds, rel.eval_time, row.stats.seconds, rel.decode_time})
        cells.push_back(x);
      o += v.name;
      for (double x : cells) {
        o += ',';
        o += num(x);
      }
      o += '\n';
    }
  return o;
}

inline std::string gateskip_markdown(const sweep_result& r) {
  auto pct = [](double x) { return fmt(100 * x); };
  std::string md;
  for (const auto& v : r.variants) {
    md += "**" + v.name + "** (trains " + v.trains + "; last training loss " + fmt(v.final_loss, "%.3f") + ")\n\n";
    md += "| budget (kept) | target % | held-out % | branch-tokens skipped % | FLOPs saved % | FLOPs vs 100 % | "
          "FLOPs vs no gates | eval time vs 100 % | decode time vs 100 % |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    auto plain = [&](const std::string& label, const std::vector<double>& row) {
      md += "| " + label + " | " + pct(mean_of(row, r.target, true)) + " | " + pct(mean_of(row, r.target, false)) +
            " | | | | | | |\n";
    };
    plain("base model, no gates", r.base);
    plain("gates added, before fine-tuning", v.start);
    plain("fine-tuned, no skipping decoder", v.noskip);
    for (const auto& row : v.rows) {
      const auto rel = relative_to_full(v, row);
      md += "| " + fmt(100 * row.keep, "%.0f") + " % | " + pct(mean_of(row.accuracy, r.target, true)) + " | " +
            pct(mean_of(row.accuracy, r.target, false)) + " | " + pct(row.stats.skipped_fraction()) + " | " +
            pct(row.stats.flops_saved()) + " | " + fmt(rel.flops, "%.3f") + " | " + fmt(flops_vs_ungated(r, row), "%.3f") +
            " | " + fmt(rel.eval_time, "%.3f") + " | " + fmt(rel.decode_time, "%.3f") + " |\n";
    }
    md += "\n";
  }
  return md;
}

// Accuracy relative to the 100 % budget against FLOPs saved, with the paper's reported savings at 90 %
// of its baseline accuracy (hollow; docs/gateskip.md quotes them).
inline std::string gateskip_svg(const sweep_result& r) {
  std::vector<double> ys{90, 100};
  double x1 = 60;
  std::vector<std::pair<std::string, std::vector<std::pair<double, double>>>> lines;
  for (const auto& v : r.variants)
    for (bool target : {true, false}) {
      const double full = mean_of(v.rows.front().accuracy, r.target, target);
      std::vector<std::pair<double, double>> pts;
      for (const auto& row : v.rows) {
        const double y = full > 0 ? 100 * mean_of(row.accuracy, r.target, target) / full : 100.0;
        pts.push_back({100 * row.stats.flops_saved(), y});
        ys.push_back(y);
        x1 = std::max(x1, 100 * row.stats.flops_saved() + 5);
      }
      lines.push_back({v.name + (target ? " target" : " held-out"), pts});
    }
  auto [y0, y1] = padded_range(ys);
  svg_chart c("GateSkip budget sweep: accuracy against FLOPs saved", "FLOPs saved by skipping (%)",
              "accuracy, % of the 100 % budget's", 0, x1, std::max(0.0, y0), y1);
  for (const auto& [name, pts] : lines) c.line(name, pts);
  c.hollow_point("paper, reasoning", 15, 90);
  c.hollow_point("paper, instr.-tuned", 50, 90);
  return c.str();
}

// The whole demonstration: the base model as the reproduction makes it, three variants (the
// gates with MLP Gate&Up on the target, the gates alone on the target, the gates alone on the
// general abilities), every budget, and the three report files.
inline sweep_result run_gateskip_sweep(const settings& s, const sweep_options& o, progress& prog) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  if (s.device != "cpu")
    throw std::invalid_argument("reproduce: the GateSkip sweep trains and evaluates on the CPU (no --device " + s.device + ")");
  if (o.budgets.empty() || o.budgets.front() != 1.0)
    throw std::invalid_argument("reproduce: the GateSkip sweep's first budget must be 100 % (its reference)");
  check_cache(s);  // refuses a cache it must not overwrite, before anything is written
  std::filesystem::create_directories(s.out);
#ifdef _OPENMP
  omp_set_num_threads(std::max(1, s.threads));
#endif
  Eigen::setNbThreads(std::max(1, s.threads));
  run_data d(s);
  weights_t base(s.model);
  const std::string fp = fingerprint(s);
  const bool cached = load_checkpoint(base, s.checkpoint_path(), fp);
  if (!cached) pretrain_in_child(s, d, fp, prog);
  if (!cached && !load_checkpoint(base, s.checkpoint_path(), fp))
    throw std::runtime_error("reproduce: pretraining did not leave a readable " + s.checkpoint_path().string());
  prog.note(std::string("base model: ") + (cached ? "loaded " : "pretrained and saved to ") + s.checkpoint_path().string());
  sweep_result r;
  r.tasks = d.task_names();
  for (const auto& t : d.tests) r.target.push_back(t.target);
  r.gate_flops = 2.0 * s.model.text.hidden * double(nn::gate_width(nn::gate_shape_of<gated_mlp>, std::size_t(s.model.text.hidden)));
  r.base = evaluate_all(evaluator(d.tok, s.model), base, d, s.restricted);
  const auto calib = make_calibration_set(s, o, d);
  const std::string target = d.targets.front().name;
  r.variants.push_back(sweep_recipe("mlp_gate_up+gates", "MLP gate and up projections and the residual gates, on " + target,
                                    recipe::mlp_gate_up | recipe::residual_gates, gate_data::target, s, o, base, calib,
                                    d, prog));
  r.variants.push_back(sweep_recipe("gates", "the residual gates alone, on " + target, recipe::residual_gates,
                                    gate_data::target, s, o, base, calib, d, prog));
  r.variants.push_back(sweep_recipe("gates/general", "the residual gates alone, on the general abilities",
                                    recipe::residual_gates, gate_data::general, s, o, base, calib, d, prog));
  r.seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  std::string md = "# GateSkip budget sweep\n\nTarget task " + d.targets.front().name + "; held-out: the " +
                   std::to_string(d.general.size()) + " general abilities. Fine-tuning " +
                   std::to_string(s.stage_steps) + " steps x " + std::to_string(s.stage_batch) + ", lr " +
                   fmt(s.lr, "%g") + ", sparsity lambda " + fmt(o.sparsity.lambda, "%g") +
                   ", training-time drop ramped to " + fmt(100 * o.train_skip, "%g") + " %; thresholds calibrated on " +
                   std::to_string(o.calibration_examples) + " training examples per task; " +
                   std::to_string(s.test_examples) + " test examples per task; " + std::to_string(std::max(1, s.threads)) +
                   " thread(s); whole run " + fmt(r.seconds) + " s. For gates/general the general abilities are "
                   "what the gates trained on (their training streams; the test sets stay apart), so its held-out "
                   "column is not held out.\n\n";
  md += gateskip_markdown(r);
  write_text(s.out / "gateskip.md", md);
  write_text(s.out / "gateskip.csv", gateskip_csv(r));
  write_text(s.out / "gateskip.svg", gateskip_svg(r));
  return r;
}

}  // namespace skillgraft::reproduce
