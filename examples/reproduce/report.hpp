#pragma once
// The reproduction's outputs: per-method accuracy matrices (CSV and text), the
// learning / forgetting summary (CSV and Markdown), the probe series (CSV), and SVG
// pictures: learning vs forgetting, held-out accuracy over stages, and the counting-bias
// probe over the steps of the counting stage and over stages.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "skillgraft/cl/accuracy_matrix.hpp"
#include "skillgraft/cl/metrics.hpp"
#include "skillgraft/cl/metrics_csv.hpp"
#include "skillgraft/cl/metrics_table.hpp"

#include "experiment.hpp"
#include "intervals.hpp"

namespace skillgraft::reproduce {

struct method_summary {
  std::string name, recipe;
  std::uint64_t seed = 0;       // the stages' seed
  double learning = 0;          // mean over targets of R(k, t_k) - R(0, t_k), points
  double learning_final = 0;    // mean over targets of R(T, t_k) - R(0, t_k), points
  double heldout_final = 0;     // mean over held-out of R(T, h) - R(0, h), points (negative = forgetting)
  double heldout_mean = 0;      // the same averaged over stages 1..T
  double heldout_worst = 0;     // the lowest stage
  double probe_final = 0, probe_max = 0;  // number-token mass on captions
  double train_seconds = 0, eval_seconds = 0;
  double peak_mib = 0;
  std::size_t trainable = 0;
  double lr = 0;                      // peak learning rate
  std::vector<double> heldout_curve;  // per stage 0..T, mean held-out accuracy (%)
  std::vector<double> target_curve;   // per stage, mean accuracy over the targets trained so far (%)
};

inline cl::accuracy_matrix matrix_of(const method_result& r, const run_data& d) {
  std::vector<std::string> trained;
  for (const auto& t : d.targets) trained.push_back(t.name);
  return cl::accuracy_matrix(d.task_names(), trained, r.R);
}

inline method_summary summarize(const method_result& r, const run_data& d) {
  const auto R = matrix_of(r, d);
  const auto m = cl::summarize(R);
  method_summary s;
  s.name = r.name;
  s.seed = r.seed;
  s.recipe = r.recipe;
  s.learning = 100 * m.learning_after_own_stage;
  s.learning_final = 100 * m.learning_final;
  s.heldout_final = -100 * m.heldout_forgetting;
  double sum = 0;
  s.heldout_worst = 0;
  for (std::size_t i = 1; i < m.heldout_forgetting_curve.size(); ++i) {
    sum += -100 * m.heldout_forgetting_curve(i);
    s.heldout_worst = std::min(s.heldout_worst, -100 * m.heldout_forgetting_curve(i));
  }
  s.heldout_mean = sum / double(std::max<std::size_t>(1, m.heldout_forgetting_curve.size() - 1));
  for (const auto& p : r.probes) {
    s.probe_max = std::max(s.probe_max, p.number_mass);
    if (p.step == 0) s.probe_final = p.number_mass;
  }
  s.train_seconds = r.train_seconds;
  s.eval_seconds = r.eval_seconds;
  s.peak_mib = double(r.peak_bytes) / (1024.0 * 1024.0);
  s.trainable = r.trainable;
  s.lr = r.lr;
  for (std::size_t i = 0; i < r.R.size(); ++i) {
    double h = 0, t = 0;
    for (auto c : R.heldout_columns()) h += R(i, c);
    s.heldout_curve.push_back(100 * h / double(R.heldout_columns().size()));
    const std::size_t upto = i == 0 ? R.stages() : std::min(i, R.stages());  // the base row: every target
    for (std::size_t k = 1; k <= upto; ++k) t += R(i, R.target(k));
    s.target_curve.push_back(100 * t / double(upto));
  }
  return s;
}

inline std::string fmt(double x, const char* f = "%.1f") {
  char b[64];
  std::snprintf(b, sizeof b, f, x);
  return b;
}
inline std::string signed1(double x) { return fmt(x, "%+.1f"); }

// One method over its seeds: every number of `mean` is the mean over the seeds' runs, and the
// table's numbers carry their 95 % t-intervals.
struct seeded_summary {
  method_summary mean;
  std::vector<std::uint64_t> seeds;
  interval learning, learning_final, heldout_final, heldout_mean, probe_max;
  std::vector<interval> heldout_curve;  // per stage 0..T, mean held-out accuracy (%)
  // per pair of stages i < j, the held-out mean after j minus after i, taken per seed and then
  // averaged (paired): the seeds' common level cancels, so a change smaller than the spread of
  // the seeds' curves can still lie apart from zero. heldout_change(i, j).
  std::vector<std::vector<interval>> heldout_changes;
  const interval& heldout_change(std::size_t i, std::size_t j) const { return heldout_changes.at(i).at(j); }
};

// Groups the runs by method, in order of first appearance.
inline std::vector<seeded_summary> aggregate(const std::vector<method_summary>& runs) {
  std::vector<seeded_summary> out;
  std::vector<std::vector<std::size_t>> members;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    std::size_t k = 0;
    while (k < out.size() && out[k].mean.name != runs[i].name) ++k;
    if (k == out.size()) out.emplace_back().mean = runs[i], members.emplace_back();
    members[k].push_back(i);
  }
  for (std::size_t k = 0; k < out.size(); ++k) {
    auto over = [&](auto field) {
      std::vector<double> v;
      for (auto i : members[k]) v.push_back(field(runs[i]));
      return t_interval(v);
    };
    auto& a = out[k];
    for (auto i : members[k]) a.seeds.push_back(runs[i].seed);
    a.learning = over([](const method_summary& m) { return m.learning; });
    a.learning_final = over([](const method_summary& m) { return m.learning_final; });
    a.heldout_final = over([](const method_summary& m) { return m.heldout_final; });
    a.heldout_mean = over([](const method_summary& m) { return m.heldout_mean; });
    a.probe_max = over([](const method_summary& m) { return m.probe_max; });
    a.mean.learning = a.learning.mean, a.mean.learning_final = a.learning_final.mean;
    a.mean.heldout_final = a.heldout_final.mean, a.mean.heldout_mean = a.heldout_mean.mean;
    a.mean.probe_max = a.probe_max.mean;
    a.mean.heldout_worst = over([](const method_summary& m) { return m.heldout_worst; }).mean;
    a.mean.probe_final = over([](const method_summary& m) { return m.probe_final; }).mean;
    a.mean.train_seconds = over([](const method_summary& m) { return m.train_seconds; }).mean;
    a.mean.eval_seconds = over([](const method_summary& m) { return m.eval_seconds; }).mean;
    a.mean.peak_mib = over([](const method_summary& m) { return m.peak_mib; }).mean;
    for (std::size_t j = 0; j < a.mean.heldout_curve.size(); ++j) {
      a.heldout_curve.push_back(over([&](const method_summary& m) { return m.heldout_curve.at(j); }));
      a.mean.heldout_curve[j] = a.heldout_curve.back().mean;
      a.mean.target_curve[j] = over([&](const method_summary& m) { return m.target_curve.at(j); }).mean;
    }
    const std::size_t T = a.mean.heldout_curve.size();
    a.heldout_changes.assign(T, std::vector<interval>(T));
    for (std::size_t i = 0; i < T; ++i)
      for (std::size_t j = i + 1; j < T; ++j)
        a.heldout_changes[i][j] = over([&](const method_summary& m) { return m.heldout_curve.at(j) - m.heldout_curve.at(i); });
  }
  return out;
}

// "mean ± half" (the half-width omitted with one seed).
inline std::string with_interval(const interval& i, const char* f = "%+.1f") {
  std::string half = f;  // the mean's precision, without its sign
  if (const auto plus = half.find('+'); plus != std::string::npos) half.erase(plus, 1);
  return i.n > 1 ? fmt(i.mean, f) + " ± " + fmt(i.half, half.c_str()) : fmt(i.mean, f);
}

inline std::string seeded_markdown(const std::vector<seeded_summary>& ms) {
  std::string o =
      "| method | trains | seeds | learning | learning (final) | held-out Δ (final) | held-out Δ (mean over stages) | "
      "counting bias (max) | train s | peak MiB | trainable |\n"
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const auto& a : ms) {
    const auto& m = a.mean;
    o += "| " + m.name + " | " + m.recipe + " | " + std::to_string(a.seeds.size()) + " | " + with_interval(a.learning) +
         " | " + with_interval(a.learning_final) + " | " + with_interval(a.heldout_final) + " | " +
         with_interval(a.heldout_mean) + " | " + with_interval(a.probe_max, "%.3f") + " | " + fmt(m.train_seconds) +
         " | " + fmt(m.peak_mib) + " | " + std::to_string(m.trainable) + " |\n";
  }
  return o;
}

// Held-out accuracy after every stage (the recovery phenomenon: forgetting after one stage
// that later stages partly undo), mean ± interval over seeds.
inline std::string stages_markdown(const std::vector<seeded_summary>& ms, const std::vector<std::string>& order) {
  if (ms.empty()) return "";
  std::string o = "| method | base |", rule = "|---|---:|";
  for (std::size_t k = 0; k < order.size(); ++k) o += " after " + order[k] + " |", rule += "---:|";
  o += "\n" + rule + "\n";
  for (const auto& a : ms) {
    o += "| " + a.mean.name + " |";
    for (const auto& c : a.heldout_curve) {  // piece by piece: g++ 12's false -Wrestrict on "literal" + string&&
      o += ' ';
      o += with_interval(c, "%.1f");
      o += " |";
    }
    o += "\n";
  }
  return o;
}

// The recovery phenomenon, paired: the paper's held-out accuracy fell after the counting stage
// and partly came back in later stages. Per method, the change counting made, the change the
// next stage made, and the change from right after counting to the end, each per seed and then
// over the seeds. Comparing the two stages' unpaired intervals of stages_markdown would hide a
// recovery smaller than the spread between seeds. Empty without a counting stage followed by
// another.
inline std::string recovery_markdown(const std::vector<seeded_summary>& ms, const std::vector<std::string>& order) {
  const auto at = std::find(order.begin(), order.end(), "count");
  if (ms.empty() || at == order.end() || at + 1 == order.end()) return "";
  const std::size_t c = std::size_t(at - order.begin()) + 1;  // the curve's row right after counting
  const std::size_t T = order.size();
  for (const auto& a : ms)
    if (a.heldout_changes.size() != T + 1) return "";
  const std::string next = order[c];  // the stage after counting (curve row c + 1)
  std::string o = "Recovery after the counting stage: change of the mean held-out accuracy (points) made by "
                  "counting, by the stage after it (" + next + "), and from right after counting to after the last stage, "
                  "each taken per seed and then averaged (± 95 %); ↑: the interval lies above zero, a recovery; ↓: below.\n\n"
                  "| method | counting | " + next + " | after counting → after the last stage |\n|---|---:|---:|---:|\n";
  auto cell = [](const interval& i) {
    std::string t = with_interval(i);
    if (i.n > 1 && i.lo() > 0) t += " ↑";
    if (i.n > 1 && i.hi() < 0) t += " ↓";
    return t;
  };
  for (const auto& a : ms) {
    o += "| " + a.mean.name + " | " + cell(a.heldout_change(c - 1, c)) + " | " + cell(a.heldout_change(c, c + 1)) + " | " +
         cell(a.heldout_change(c, T)) + " |\n";
  }
  return o;
}

// The paper's comparison against the whole LLM, and the probe's rank correlation with
// forgetting over the methods.
inline std::string comparison_markdown(const std::vector<seeded_summary>& ms) {
  std::string o;
  const seeded_summary* llm = nullptr;
  for (const auto& a : ms)
    if (a.mean.name == "llm") llm = &a;
  if (llm && llm->heldout_mean.mean < 0 && llm->learning.mean > 0) {
    o += "Against the whole LLM (means over seeds; forgetting is the mean held-out Δ over stages):\n\n";
    for (const auto& a : ms) {
      if (&a == llm) continue;
      // Apart on either side: a recipe can forget significantly more than llm, too.
      const bool less = a.heldout_mean.lo() > llm->heldout_mean.hi();
      const bool more = a.heldout_mean.hi() < llm->heldout_mean.lo();
      o += "- " + a.mean.name + ": forgets " + fmt(a.heldout_mean.mean / llm->heldout_mean.mean, "%.2f") +
           " of what llm forgets (" + fmt(a.heldout_final.mean / llm->heldout_final.mean, "%.2f") +
           " after the last stage), learns " + fmt(a.learning.mean / llm->learning.mean, "%.2f") +
           " of its learning; its forgetting interval " +
           (less ? "does not overlap llm's" : more ? "does not overlap llm's (it forgets more)" : "overlaps llm's") + ".\n";
    }
    o += "\n";
  }
  if (ms.size() >= 3) {
    std::vector<double> probe, forgetting;
    for (const auto& a : ms) probe.push_back(a.probe_max.mean), forgetting.push_back(-a.heldout_mean.mean);
    o += "Spearman rank correlation over the " + std::to_string(ms.size()) +
         " methods between the counting bias (max) and the mean held-out forgetting: " +
         fmt(spearman(probe, forgetting), "%.2f") + ".\n\n";
  }
  return o;
}

inline std::string summary_csv(const std::vector<method_summary>& ms) {
  std::string o =
      "method,trains,learning,learning_final,heldout_delta_final,heldout_delta_mean,heldout_delta_worst,probe_final,"
      "probe_max,train_seconds,eval_seconds,peak_mib,trainable,lr,seed\n";
  for (const auto& m : ms)
    o += m.name + ",\"" + m.recipe + "\"," + cl::detail::csv_number(m.learning) + "," + cl::detail::csv_number(m.learning_final) +
         "," + cl::detail::csv_number(m.heldout_final) + "," + cl::detail::csv_number(m.heldout_mean) + "," +
         cl::detail::csv_number(m.heldout_worst) + "," + cl::detail::csv_number(m.probe_final) + "," +
         cl::detail::csv_number(m.probe_max) + "," + cl::detail::csv_number(m.train_seconds) + "," +
         cl::detail::csv_number(m.eval_seconds) + "," + cl::detail::csv_number(m.peak_mib) + "," +
         std::to_string(m.trainable) + "," + cl::detail::csv_number(m.lr) + "," + std::to_string(m.seed) + "\n";
  return o;
}

inline std::string probe_csv(const std::vector<method_result>& rs) {
  std::string o = "method,stage,step,number_mass,with_number,kl_base_model\n";
  for (const auto& r : rs)
    for (const auto& p : r.probes)
      o += r.name + "," + std::to_string(p.stage) + "," + std::to_string(p.step) + "," +
           cl::detail::csv_number(p.number_mass) + "," + cl::detail::csv_number(p.with_number) + "," +
           cl::detail::csv_number(p.kl) + "\n";
  return o;
}

inline std::string curves_csv(const std::vector<method_summary>& ms) {
  std::string o = "method,stage,heldout_accuracy,target_accuracy\n";
  for (const auto& m : ms)
    for (std::size_t i = 0; i < m.heldout_curve.size(); ++i)
      o += m.name + "," + std::to_string(i) + "," + cl::detail::csv_number(m.heldout_curve[i]) + "," +
           cl::detail::csv_number(m.target_curve[i]) + "\n";
  return o;
}

// --- SVG ---------------------------------------------------------------------------------

class svg_chart {
 public:
  svg_chart(std::string title, std::string xlabel, std::string ylabel, double x0, double x1, double y0, double y1,
            bool logx = false)
      : title_(std::move(title)), xlabel_(std::move(xlabel)), ylabel_(std::move(ylabel)), x0_(x0), x1_(x1), y0_(y0),
        y1_(y1), logx_(logx) {}

  void line(const std::string& name, const std::vector<std::pair<double, double>>& pts, bool markers = true) {
    const std::string colour = next_colour();
    std::string path;
    for (const auto& [x, y] : pts) path += fmt(px(x), "%.1f") + "," + fmt(py(y), "%.1f") + " ";
    body_ += "<polyline fill=\"none\" stroke=\"" + colour + "\" stroke-width=\"2\" points=\"" + path + "\"/>\n";
    if (markers)
      for (const auto& [x, y] : pts)
        body_ += "<circle cx=\"" + fmt(px(x)) + "\" cy=\"" + fmt(py(y)) + "\" r=\"3\" fill=\"" + colour + "\"/>\n";
    legend_.push_back({name, colour});
  }
  void point(const std::string& name, double x, double y) {
    const std::string colour = next_colour();
    body_ += "<circle cx=\"" + fmt(px(x)) + "\" cy=\"" + fmt(py(y)) + "\" r=\"5\" fill=\"" + colour + "\"/>\n";
    body_ += "<text x=\"" + fmt(px(x) + 7) + "\" y=\"" + fmt(py(y) - 5) + "\" font-size=\"11\">" + name + "</text>\n";
  }
  // A shaded reference region or marker: a paper's point drawn hollow.
  void hollow_point(const std::string& name, double x, double y) {
    body_ += "<circle cx=\"" + fmt(px(x)) + "\" cy=\"" + fmt(py(y)) +
             "\" r=\"5\" fill=\"none\" stroke=\"#444\" stroke-width=\"1.5\"/>\n";
    body_ += "<text x=\"" + fmt(px(x) + 7) + "\" y=\"" + fmt(py(y) + 12) + "\" font-size=\"10\" fill=\"#444\">" + name +
             "</text>\n";
  }

  std::string str() const {
    std::string s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + std::to_string(W) + "\" height=\"" +
                    std::to_string(H) + "\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    s += "<text x=\"" + std::to_string(W / 2) + "\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">" + title_ + "</text>\n";
    // Axes, ticks and grid.
    s += "<rect x=\"" + std::to_string(L) + "\" y=\"" + std::to_string(Tm) + "\" width=\"" + std::to_string(W - L - Rm) +
         "\" height=\"" + std::to_string(H - Tm - Bm) + "\" fill=\"none\" stroke=\"#888\"/>\n";
    for (int i = 0; i <= 5; ++i) {
      const double yv = y0_ + (y1_ - y0_) * i / 5.0;
      s += "<line x1=\"" + std::to_string(L) + "\" x2=\"" + std::to_string(W - Rm) + "\" y1=\"" + fmt(py(yv)) + "\" y2=\"" +
           fmt(py(yv)) + "\" stroke=\"#eee\"/>\n";
      s += "<text x=\"" + std::to_string(L - 6) + "\" y=\"" + fmt(py(yv) + 4) + "\" text-anchor=\"end\" font-size=\"11\">" +
           tick(yv) + "</text>\n";
    }
    for (double xv : xticks()) {
      s += "<line y1=\"" + std::to_string(Tm) + "\" y2=\"" + std::to_string(H - Bm) + "\" x1=\"" + fmt(px(xv)) + "\" x2=\"" +
           fmt(px(xv)) + "\" stroke=\"#eee\"/>\n";
      s += "<text x=\"" + fmt(px(xv)) + "\" y=\"" + std::to_string(H - Bm + 16) + "\" text-anchor=\"middle\" font-size=\"11\">" +
           tick(xv) + "</text>\n";
    }
    if (y0_ < 0 && y1_ > 0)
      s += "<line x1=\"" + std::to_string(L) + "\" x2=\"" + std::to_string(W - Rm) + "\" y1=\"" + fmt(py(0)) + "\" y2=\"" +
           fmt(py(0)) + "\" stroke=\"#aaa\"/>\n";
    if (!logx_ && x0_ < 0 && x1_ > 0)
      s += "<line y1=\"" + std::to_string(Tm) + "\" y2=\"" + std::to_string(H - Bm) + "\" x1=\"" + fmt(px(0)) + "\" x2=\"" +
           fmt(px(0)) + "\" stroke=\"#aaa\"/>\n";
    s += "<text x=\"" + std::to_string((L + W - Rm) / 2) + "\" y=\"" + std::to_string(H - 8) +
         "\" text-anchor=\"middle\" font-size=\"12\">" + xlabel_ + "</text>\n";
    s += "<text transform=\"translate(14," + std::to_string((Tm + H - Bm) / 2) +
         ") rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">" + ylabel_ + "</text>\n";
    s += body_;
    for (std::size_t i = 0; i < legend_.size(); ++i) {
      const int y = Tm + 14 + int(i) * 15;
      s += "<rect x=\"" + std::to_string(W - Rm + 10) + "\" y=\"" + std::to_string(y - 9) +
           "\" width=\"10\" height=\"10\" fill=\"" + legend_[i].second + "\"/>\n";
      s += "<text x=\"" + std::to_string(W - Rm + 24) + "\" y=\"" + std::to_string(y) + "\" font-size=\"11\">" +
           legend_[i].first + "</text>\n";
    }
    return s + "</svg>\n";
  }

 private:
  static constexpr int W = 760, H = 440, L = 60, Rm = 150, Tm = 32, Bm = 46;
  double px(double x) const {
    const double t = logx_ ? (std::log10(x) - std::log10(x0_)) / (std::log10(x1_) - std::log10(x0_)) : (x - x0_) / (x1_ - x0_);
    return L + t * (W - L - Rm);
  }
  double py(double y) const { return H - Bm - (y - y0_) / (y1_ - y0_) * (H - Tm - Bm); }
  std::vector<double> xticks() const {
    std::vector<double> t;
    if (logx_) {
      for (double v = 1; v <= x1_ * 1.0001; v *= 10) t.push_back(v);
    } else {
      for (int i = 0; i <= 5; ++i) t.push_back(x0_ + (x1_ - x0_) * i / 5.0);
    }
    return t;
  }
  static std::string tick(double v) {
    return std::abs(v) >= 10 || v == std::round(v) ? fmt(v, "%.0f") : std::abs(v) >= 1 ? fmt(v, "%.1f") : fmt(v, "%.2f");
  }
  std::string next_colour() {
    static const char* palette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                                    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"};
    return palette[colour_++ % 12];
  }
  std::string title_, xlabel_, ylabel_, body_;
  double x0_, x1_, y0_, y1_;
  bool logx_;
  int colour_ = 0;
  std::vector<std::pair<std::string, std::string>> legend_;
};

inline std::pair<double, double> padded_range(std::vector<double> v, double pad_frac = 0.1) {
  if (v.empty()) return {0, 1};
  auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  double a = *lo, b = *hi;
  if (b - a < 1e-9) a -= 1, b += 1;
  const double p = (b - a) * pad_frac;
  return {a - p, b + p};
}

inline std::string learning_forgetting_svg(const std::vector<method_summary>& ms) {
  std::vector<double> xs{0}, ys{0};
  for (const auto& m : ms) xs.push_back(m.heldout_final), ys.push_back(m.learning);
  auto [x0, x1] = padded_range(xs);
  auto [y0, y1] = padded_range(ys);
  svg_chart c("Learning vs held-out change (points)", "held-out accuracy change after the last stage (points)",
              "target gain right after its stage (points)", x0, x1, y0, y1);
  for (const auto& m : ms) c.point(m.name, m.heldout_final, m.learning);
  return c.str();
}

inline std::string heldout_svg(const std::vector<method_summary>& ms) {
  std::vector<double> ys;
  std::size_t n = 0;
  for (const auto& m : ms) {
    ys.insert(ys.end(), m.heldout_curve.begin(), m.heldout_curve.end());
    n = std::max(n, m.heldout_curve.size());
  }
  auto [y0, y1] = padded_range(ys);
  svg_chart c("Held-out accuracy over stages", "stage (0 = base model)", "mean held-out accuracy (%)", 0,
              double(std::max<std::size_t>(n, 2) - 1), std::max(0.0, y0), std::min(100.0, y1));
  for (const auto& m : ms) {
    std::vector<std::pair<double, double>> pts;
    for (std::size_t i = 0; i < m.heldout_curve.size(); ++i) pts.push_back({double(i), m.heldout_curve[i]});
    c.line(m.name, pts);
  }
  return c.str();
}

// The probe during the counting stage (log-spaced steps; the base model at step 1's left).
inline std::string probe_steps_svg(const std::vector<method_result>& rs, int count_stage, int stage_steps) {
  std::vector<double> ys{0};
  for (const auto& r : rs)
    for (const auto& p : r.probes)
      if ((p.stage == count_stage && p.step > 0) || p.stage == 0) ys.push_back(p.number_mass);
  auto [y0, y1] = padded_range(ys);
  svg_chart c("Counting bias during the counting stage", "step of the counting stage (log scale)",
              "number-token mass on captions", 1, std::max(10.0, double(stage_steps)), std::max(0.0, y0), y1, true);
  for (const auto& r : rs) {
    std::vector<std::pair<double, double>> pts;
    for (const auto& p : r.probes)
      if (p.stage == count_stage && p.step > 0) pts.push_back({double(p.step), p.number_mass});
    if (!pts.empty()) c.line(r.name, pts);
  }
  return c.str();
}

inline std::string probe_stages_svg(const std::vector<method_result>& rs) {
  std::vector<double> ys{0};
  int stages = 1;
  for (const auto& r : rs)
    for (const auto& p : r.probes)
      if (p.step == 0) ys.push_back(p.number_mass), stages = std::max(stages, p.stage);
  auto [y0, y1] = padded_range(ys);
  svg_chart c("Counting bias after each stage", "stage (0 = base model)", "number-token mass on captions", 0, stages,
              std::max(0.0, y0), y1);
  for (const auto& r : rs) {
    std::vector<std::pair<double, double>> pts;
    for (const auto& p : r.probes)
      if (p.step == 0) pts.push_back({double(p.stage), p.number_mass});
    c.line(r.name, pts);
  }
  return c.str();
}

inline void write_text(const std::filesystem::path& p, const std::string& s) { cl::write_report_file(p, s); }

}  // namespace skillgraft::reproduce
