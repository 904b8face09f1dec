#pragma once
// Comparisons of the CUDA backend with the CPU backend, shared by the parity tests.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "skillgraft/backend/cuda/backend.hpp"

namespace skillgraft::test {

// Tolerance of every comparison below: |device - cpu| <= rel * max|cpu| over the tensor.
// Float GEMMs of length <= 1536 summed in another order, through three layers and back.
constexpr double rel = 1e-4;

template <class T>
double max_abs(const cpu::tensor<T>& t) {
  double m = 0;
  for (std::size_t i = 0; i < t.size(); ++i) m = std::max(m, std::abs(double(t[i])));
  return m;
}

// The device tensor, downloaded, against the CPU one; the reference must not be all zeros
// (a comparison of zeros with zeros would pass whatever the backend computes).
template <class T>
void check_close(const std::string& what, const cuda::tensor<T>& d, const cpu::tensor<T>& ref, double tol = rel) {
  INFO(what << ": device " << d.shape().str() << ", cpu " << ref.shape().str());
  REQUIRE(d.shape() == ref.shape());
  const auto h = d.to_host();
  const double scale = max_abs(ref);
  REQUIRE(scale > 0);
  double err = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < h.size(); ++i)
    if (const double e = std::abs(double(h[i]) - double(ref[i])); e > err) err = e, at = i;
  INFO("max |device - cpu| = " << err << " at element " << at << ", max |cpu| = " << scale);
  CHECK(err <= tol * scale);
}

struct ledger_probe {
  std::int64_t start;
  memory_use use;
  explicit ledger_probe(memory_use u) : start(cuda::device_ledger().live(u)), use(u) {}
  std::int64_t delta() const { return cuda::device_ledger().live(use) - start; }
};

// Walks the device model's (name, gradient) pairs beside the CPU model's, in the same order.
template <class CpuModel, class CpuW, class CpuG, class DevModel, class DevW, class DevG>
std::size_t check_gradients(const CpuModel& cm, CpuW& cw, CpuG& cg, const DevModel& dm, DevW& dw, DevG& dg) {
  std::vector<std::pair<std::string, const cpu::tensor<float>*>> ref;
  cm.for_each_trainable(cw, cg, [&](const std::string& n, auto&, auto& g) { ref.emplace_back(n, &g); });
  std::size_t i = 0;
  dm.for_each_trainable(dw, dg, [&](const std::string& n, auto&, auto& g) {
    REQUIRE(i < ref.size());
    CHECK(n == ref[i].first);
    check_close("gradient of " + n, g, *ref[i].second);
    ++i;
  });
  CHECK(i == ref.size());
  return i;
}

}  // namespace skillgraft::test
