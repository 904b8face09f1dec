#pragma once
// Fixed-width text tables of an accuracy matrix and a metric summary, for logs and
// terminals. Numbers are shown in percent / percentage points with one decimal, as
// papers report them; the CSV files keep full precision. Lines carry no trailing spaces.
//
//   stage  trained    cub  seed  count   path  mmstar
//                 stage 2 held-out stage 3 ...
//       0  (base)    20.0  60.0   30.0   40.0    50.0
//       1  path      75.0  50.0   30.0   80.0*   45.0
//
// A '*' marks R(k, t_k), the accuracy on a target right after its own stage.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "skillgraft/cl/accuracy_matrix.hpp"
#include "skillgraft/cl/metrics.hpp"

namespace skillgraft::cl {

namespace detail {

inline std::string pad_left(std::string_view s, std::size_t width) {
  return std::string(width > s.size() ? width - s.size() : 0, ' ') + std::string(s);
}
inline std::string pad_right(std::string_view s, std::size_t width) {
  return std::string(s) + std::string(width > s.size() ? width - s.size() : 0, ' ');
}
inline std::string rstrip(std::string s) {
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}
inline std::string fixed1(double x, bool sign) {
  if (std::isnan(x)) return "NaN";
  char buf[64];
  std::snprintf(buf, sizeof buf, sign ? "%+.1f" : "%.1f", x);
  return buf;
}

}  // namespace detail

inline std::string accuracy_table(const accuracy_matrix& R) {
  using detail::pad_left;
  using detail::pad_right;
  const std::size_t n = R.task_count();
  std::vector<std::string> role(n);
  for (std::size_t j = 0; j < n; ++j) {
    const auto k = R.stage_of(j);
    role[j] = k ? "stage " + std::to_string(*k) : "held-out";
  }
  std::size_t trained_w = std::string_view("trained").size();
  for (const auto& t : R.trained_at_stage()) trained_w = std::max(trained_w, t.size());
  // Each task column: the widest of name, role and "100.0", then one place for the '*'.
  std::vector<std::size_t> w(n);
  for (std::size_t j = 0; j < n; ++j) w[j] = std::max({R.tasks()[j].size(), role[j].size(), std::size_t{5}});

  std::string out;
  std::string line = "stage  " + pad_right("trained", trained_w);
  for (std::size_t j = 0; j < n; ++j) line += "  " + pad_left(R.tasks()[j], w[j]) + ' ';
  out += detail::rstrip(line) + '\n';
  line = "       " + std::string(trained_w, ' ');
  for (std::size_t j = 0; j < n; ++j) line += "  " + pad_left(role[j], w[j]) + ' ';
  out += detail::rstrip(line) + '\n';
  for (std::size_t i = 0; i <= R.stages(); ++i) {
    line = pad_left(std::to_string(i), 5) + "  " + pad_right(i == 0 ? "(base)" : R.trained_at_stage()[i - 1], trained_w);
    for (std::size_t j = 0; j < n; ++j) {
      const bool own_stage = i > 0 && R.target(i) == j;
      line += "  " + pad_left(detail::fixed1(100.0 * R(i, j), false), w[j]) + (own_stage ? '*' : ' ');
    }
    out += detail::rstrip(line) + '\n';
  }
  out += "accuracy in %; * = right after the stage that trained the task\n";
  return out;
}

inline std::string summary_table(const metric_summary& s) {
  using detail::pad_left;
  using detail::pad_right;
  std::size_t name_w = std::string_view("heldout_forgetting after stage 10").size();
  for (const auto& f : summary_fields) name_w = std::max(name_w, std::string_view(f.name).size());
  const std::size_t value_w = 8;
  auto row = [&](std::string_view name, const std::string& value, std::string_view formula) {
    return detail::rstrip(pad_right(name, name_w) + "  " + pad_left(value, value_w) + "  " + std::string(formula)) + '\n';
  };
  std::string out = row("metric", "value", "definition");
  out += row("stages (T)", std::to_string(s.stages), "");
  out += row("targets", std::to_string(s.targets), "");
  out += row("held-out tasks", std::to_string(s.heldout), "");
  for (const auto& f : summary_fields) out += row(f.name, detail::fixed1(100.0 * (s.*f.value), f.difference), f.formula);
  for (std::size_t i = 0; i < s.heldout_forgetting_curve.size(); ++i)
    out += row("heldout_forgetting after stage " + std::to_string(i),
               detail::fixed1(100.0 * s.heldout_forgetting_curve(i), true), i == 0 ? "mean_h R(0,h) - R(i,h)" : "");
  out += "values in %, differences in percentage points; NaN = undefined (a mean over no terms, e.g. T-1 = 0)\n";
  return out;
}

}  // namespace skillgraft::cl
