#pragma once
// Statistics over seeds and over test examples: a mean with its 95 % Student-t interval (the
// seeds are few, so the normal quantile would make the intervals too narrow), the binomial
// standard error of an accuracy measured on n test examples, and Spearman's rank correlation.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace skillgraft::reproduce {

// The two-sided 95 % quantile of Student's t with `df` degrees of freedom (t_{0.975, df}).
inline double t_quantile_975(int df) {
  static constexpr double table[] = {12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
                                     2.2010,  2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
                                     2.0796,  2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423};
  if (df < 1) throw std::invalid_argument("reproduce: a t interval needs at least two values");
  if (df <= 30) return table[df - 1];
  return 1.959964 + 2.37 / df;  // within 0.002 of the exact quantile beyond 30
}

struct interval {
  double mean = 0;
  double half = 0;  // half-width of the 95 % interval (0 with one value: no interval)
  double sd = 0;    // sample standard deviation
  int n = 0;
  double lo() const { return mean - half; }
  double hi() const { return mean + half; }
};

// mean ± t_{0.975, n-1} sd / sqrt(n) over the values (one per seed).
inline interval t_interval(const std::vector<double>& v) {
  interval r;
  r.n = int(v.size());
  if (v.empty()) return r;
  r.mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  if (v.size() < 2) return r;
  double ss = 0;
  for (double x : v) ss += (x - r.mean) * (x - r.mean);
  r.sd = std::sqrt(ss / double(v.size() - 1));
  r.half = t_quantile_975(r.n - 1) * r.sd / std::sqrt(double(r.n));
  return r;
}

// Standard error, in points, of the mean of several accuracies (fractions in [0, 1]), each
// measured on n independent test examples: sqrt(sum p (1 - p) / n) / count * 100.
inline double mean_accuracy_standard_error(const std::vector<double>& p, int n) {
  if (p.empty() || n <= 0) return 0;
  double var = 0;
  for (double x : p) var += x * (1 - x) / double(n);
  return 100 * std::sqrt(var) / double(p.size());
}

// Ranks with ties sharing their mean rank (1-based).
inline std::vector<double> ranks(const std::vector<double>& v) {
  std::vector<std::size_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return v[a] < v[b]; });
  std::vector<double> r(v.size());
  for (std::size_t i = 0; i < idx.size();) {
    std::size_t j = i;
    while (j + 1 < idx.size() && v[idx[j + 1]] == v[idx[i]]) ++j;
    for (std::size_t k = i; k <= j; ++k) r[idx[k]] = 0.5 * double(i + j) + 1;
    i = j + 1;
  }
  return r;
}

// Spearman's rank correlation (Pearson's over the ranks); NaN when either side is constant.
inline double spearman(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size() || a.size() < 2) throw std::invalid_argument("reproduce: spearman needs two equal lists of 2+");
  const auto ra = ranks(a), rb = ranks(b);
  const double ma = std::accumulate(ra.begin(), ra.end(), 0.0) / double(ra.size());
  const double mb = std::accumulate(rb.begin(), rb.end(), 0.0) / double(rb.size());
  double sab = 0, saa = 0, sbb = 0;
  for (std::size_t i = 0; i < ra.size(); ++i) {
    sab += (ra[i] - ma) * (rb[i] - mb);
    saa += (ra[i] - ma) * (ra[i] - ma);
    sbb += (rb[i] - mb) * (rb[i] - mb);
  }
  return sab / std::sqrt(saa * sbb);
}

}  // namespace skillgraft::reproduce
