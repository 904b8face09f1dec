#pragma once
// Learning-rate schedules: linear warm-up, then cosine decay to a floor.
//
//   step < warmup:  lr = peak * (step + 1) / warmup
//   afterwards:     lr = floor + (peak - floor) * (1 + cos(pi * p)) / 2,
//                   p = (step - warmup) / max(1, total - warmup), clamped to [0, 1]
#include <algorithm>
#include <cmath>
#include <numbers>
#include <stdexcept>

namespace skillgraft::train {

struct cosine_schedule {
  double peak = 1e-3;
  double floor = 0.0;
  long warmup = 0;
  long total = 1000;

  double operator()(long step) const {
    if (step < 0) throw std::invalid_argument("skillgraft: schedule step must be non-negative");
    if (step < warmup) return peak * double(step + 1) / double(warmup);
    const double p = std::clamp(double(step - warmup) / double(std::max(1L, total - warmup)), 0.0, 1.0);
    return floor + (peak - floor) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
  }
};

struct constant_schedule {
  double lr = 1e-3;
  double operator()(long) const { return lr; }
};

}  // namespace skillgraft::train
