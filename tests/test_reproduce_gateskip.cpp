// The GateSkip demonstration of the reproduction (examples/reproduce/gateskip_sweep.hpp) on a
// model small enough that the whole sweep takes seconds: budget 100 % decodes what the model
// decodes without the skipping path, compute falls as the budget does, the FLOPs saved agree
// with the branch-tokens skipped, and the three report files are written.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>

#include "../examples/reproduce/gateskip_sweep.hpp"
#include "support/reduced_reproduction.hpp"

namespace rp = skillgraft::reproduce;
namespace sg = skillgraft;

namespace {

// Bounds on the FLOPs saved for a skipped fraction f of the (token, layer, branch) triples: a
// skipped triple saves at least the cheaper branch and at most the dearer one (attention with
// its core at the longest position), out of a token-layer's two branches and two gates.
std::pair<double, double> saved_bounds(const sg::decoder_config& c, double f) {
  const double d = c.hidden, qd = c.q_dim(), kvd = c.kv_dim();
  const double gates = 2 * 2 * d * d, attention = 2 * d * (qd + 2 * kvd) + 2 * qd * d, mlp = 6 * d * c.intermediate;
  const double core_min = 4.0 * c.n_heads * c.head_dim, core_max = core_min * c.max_seq;
  const double full_min = gates + attention + core_min + mlp, full_max = gates + attention + core_max + mlp;
  return {2 * f * std::min(attention + core_min, mlp) / full_max, 2 * f * std::max(attention + core_max, mlp) / full_min};
}

}  // namespace

TEST_CASE("GateSkip sweep: budget 100 % decodes without skipping, FLOPs fall with the budget as the skips say") {
  rp::settings s = sg::test::reduced_settings("gateskip");
  s.order = {"count"};
  s.stage_steps = 8;
  rp::sweep_options o;
  o.calibration_examples = 6;
  rp::progress prog(true);
  const auto r = rp::run_gateskip_sweep(s, o, prog);
  REQUIRE(r.variants.size() == 3);
  REQUIRE(r.tasks.size() == 9);
  CHECK(r.target == std::vector<bool>{true, false, false, false, false, false, false, false, false});
  for (const auto& v : r.variants) {
    INFO(v.name);
    REQUIRE(v.rows.size() == o.budgets.size());
    // Budget 100 %: the skipping decoder keeps every token and decodes what model::generate does.
    CHECK(v.rows[0].keep == 1.0);
    CHECK(v.rows[0].accuracy == v.noskip);
    CHECK(v.rows[0].stats.branch_skipped == 0);
    CHECK(v.rows[0].stats.flops_run == v.rows[0].stats.flops_full);
    CHECK(v.rows[0].stats.flops_full > 0);
    // The gates run for every token, so the 100 % budget costs more than the model without gates.
    CHECK(rp::flops_vs_ungated(r, v.rows[0]) > 1);
    for (std::size_t i = 1; i < v.rows.size(); ++i) {
      const auto& row = v.rows[i];
      INFO("keep " << row.keep);
      const double f = row.stats.skipped_fraction(), saved = row.stats.flops_saved();
      // A smaller budget skips more and runs fewer FLOPs.
      CHECK(f >= v.rows[i - 1].stats.skipped_fraction());
      CHECK(saved >= v.rows[i - 1].stats.flops_saved());
      CHECK(rp::relative_to_full(v, row).flops <= rp::relative_to_full(v, v.rows[i - 1]).flops * (1 + 0.05));
      const auto [lo, hi] = saved_bounds(s.model.text, f);
      CHECK(saved >= lo * (1 - 1e-9));
      CHECK(saved <= hi * (1 + 1e-9));
      CHECK(row.eval_seconds > 0);
    }
    CHECK(v.rows.back().stats.skipped_fraction() > 0);
    CHECK(v.rows.back().stats.flops_saved() > 0);
  }
  const auto csv = sg::test::read_text(s.out / "gateskip.csv");
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 1 + 3 * 4);
  CHECK(csv.rfind("variant,keep,count,caption,", 0) == 0);
  CHECK(csv.find("\nmlp_gate_up+gates,1,") != std::string::npos);
  CHECK(csv.find("\ngates,0.5,") != std::string::npos);
  CHECK(csv.find("\ngates/general,0.75,") != std::string::npos);
  const auto md = sg::test::read_text(s.out / "gateskip.md");
  CHECK(md.find("| fine-tuned, no skipping decoder |") != std::string::npos);
  CHECK(md.find("| 50 % |") != std::string::npos);
  const auto svg = sg::test::read_text(s.out / "gateskip.svg");
  CHECK(svg.rfind("<svg ", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  CHECK(svg.find("nan") == std::string::npos);
  std::filesystem::remove_all(s.out);
}
