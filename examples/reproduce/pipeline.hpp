#pragma once
// The whole reproduction as one call: base model (pretrained or loaded from the cached
// checkpoint), base evaluation, every method, then every report file under settings.out.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "experiment.hpp"
#include "report.hpp"

namespace skillgraft::reproduce {

struct pipeline_result {
  bool pretrained = false;  // false: the checkpoint was reused
  double pretrain_seconds = 0, total_seconds = 0;
  std::vector<double> base_row;
  std::vector<method_result> methods;
  std::vector<method_summary> summaries;
  std::vector<std::string> skipped;  // methods not available in this build
};

inline pipeline_result run_pipeline(const settings& s, progress& prog) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  pipeline_result res;
  std::filesystem::create_directories(s.out);
  run_data d(s);
  if (s.model.text.vocab_size != d.tok.size())
    throw std::invalid_argument("reproduce: the model's vocabulary (" + std::to_string(s.model.text.vocab_size) +
                                ") is not the tokenizer's (" + std::to_string(d.tok.size()) + ")");
  weights_t base(s.model);
  const std::string fp = fingerprint(s);
  if (load_checkpoint(base, s.checkpoint_path(), fp)) {
    prog.note("base model: loaded " + s.checkpoint_path().string() + " (delete it to pretrain again)");
  } else {
    const auto t0 = clock::now();
    pretrain(base, s, d, prog);
    res.pretrain_seconds = std::chrono::duration<double>(clock::now() - t0).count();
    save_checkpoint(base, s.checkpoint_path(), fp);
    res.pretrained = true;
    prog.note("base model: pretrained in " + fmt(res.pretrain_seconds) + " s, saved to " + s.checkpoint_path().string());
  }
  evaluator ev(d.tok, s.model);
  res.base_row = evaluate_all(ev, base, d, s.restricted);
  const auto base_probe = ev.counting_bias(base, d.probe);
  {
    std::string line = "base model accuracy (%):";
    for (std::size_t j = 0; j < d.tests.size(); ++j) line += " " + d.tests[j].task + " " + fmt(100 * res.base_row[j]);
    prog.note(line + "; counting bias " + fmt(base_probe.number_mass, "%.4f"));
  }
  for (const auto& m : s.methods) {
    if (!method_available(m)) {
      prog.note(m + ": skipped (" + method_description(m) + " is not available in this build)");
      res.skipped.push_back(m);
      continue;
    }
    auto r = run_method(m, s, base, res.base_row, base_probe, d, prog);
    const auto R = matrix_of(r, d);
    cl::write_accuracy_csv(s.out / ("accuracy_" + m + ".csv"), R);
    auto sm = summarize(r, d);
    prog.note(m + ": learning " + signed1(sm.learning) + ", held-out " + signed1(sm.heldout_final) + " (mean " +
              signed1(sm.heldout_mean) + "), counting bias max " + fmt(sm.probe_max, "%.4f") + ", train " +
              fmt(sm.train_seconds) + " s, peak " + fmt(sm.peak_mib) + " MiB");
    res.methods.push_back(std::move(r));
    res.summaries.push_back(sm);
  }
  // Reports.
  write_text(s.out / "summary.csv", summary_csv(res.summaries));
  write_text(s.out / "probe.csv", probe_csv(res.methods));
  write_text(s.out / "curves.csv", curves_csv(res.summaries));
  write_text(s.out / "learning_forgetting.svg", learning_forgetting_svg(res.summaries));
  write_text(s.out / "heldout_over_stages.svg", heldout_svg(res.summaries));
  int count_stage = 0;
  for (std::size_t k = 0; k < d.targets.size(); ++k)
    if (d.targets[k].name == "count") count_stage = int(k + 1);
  write_text(s.out / "probe_counting_stage.svg", probe_steps_svg(res.methods, count_stage, s.stage_steps));
  write_text(s.out / "probe_over_stages.svg", probe_stages_svg(res.methods));
  res.total_seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  std::string md = "# skillgraft reproduction\n\n";
  md += "Settings: pretrain " + std::to_string(s.pretrain_steps) + " steps x " + std::to_string(s.pretrain_batch) +
        ", stages " + std::to_string(s.stage_steps) + " steps x " + std::to_string(s.stage_batch) + ", lr " + fmt(s.lr, "%g") +
        " (LoRA " + fmt(s.lora_lr, "%g") + "), " + std::to_string(s.test_examples) + " test examples per task, " +
        (s.restricted ? "restricted" : "free") + " decoding, order";
  for (const auto& t : s.order) md += " " + t;
  md += ", seed " + std::to_string(s.seed) + ".\n\n";
  md += "Base model: " + std::string(res.pretrained ? "pretrained in " + fmt(res.pretrain_seconds) + " s" : "loaded from the cache") +
        "; whole run " + fmt(res.total_seconds) + " s.\n\n";
  md += summary_markdown(res.summaries) + "\n";
  md += "learning: mean over targets of the gain right after its own stage; held-out Δ: mean change of the held-out "
        "tasks (negative = forgetting); counting bias: number-token mass on generated captions (base " +
        fmt(base_probe.number_mass, "%.4f") + ").\n\n";
  for (const auto& r : res.methods) md += "## " + r.name + "\n\n```\n" + cl::accuracy_table(matrix_of(r, d)) + "```\n\n";
  if (!res.skipped.empty()) {
    md += "Not run (not available in this build):";
    for (const auto& m : res.skipped) md += " " + m;
    md += "\n";
  }
  write_text(s.out / "report.md", md);
  return res;
}

}  // namespace skillgraft::reproduce
