#pragma once
// One gradient checker for every layer, block and stack of the library.
//
// A "layer" here is anything with the module interface the nn/ layers share:
//   weights_t, saved_t, grads_t, needs_input_grad,
//   forward(w, x, saved) -> y,  backward(w, saved, dy, grads) -> dx,
//   make_grads(w),  for_each_trainable(w, grads, f(name, weight, grad)).
// With the scalar loss L = sum(y * R) for a fixed random R, backward(dy = R) must
// give dL/dθ for every trainable θ and dL/dx when the layer promises it; both are
// compared with central finite differences in double precision.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "skillgraft/backend/cpu/tensor.hpp"
#include "support/random.hpp"

namespace skillgraft::test {

struct gradcheck_options {
  double step = 1e-5;          // central difference step
  double tolerance = 1e-6;     // on |analytic - numeric| / max(1, |numeric|)
  std::size_t max_elements = 48;  // elements probed per tensor (all of them when smaller)
};

template <class Layer>
double loss_of(const Layer& layer, const typename Layer::weights_t& w, const cpu::tensor<double>& x,
               const cpu::tensor<double>& r) {
  typename Layer::saved_t s;
  auto y = layer.forward(w, x, s);
  return y.vec().dot(r.vec());
}

inline std::vector<std::size_t> probe_indices(std::size_t n, std::size_t max, unsigned seed) {
  std::vector<std::size_t> idx;
  if (n <= max) {
    for (std::size_t i = 0; i < n; ++i) idx.push_back(i);
    return idx;
  }
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::size_t> pick(0, n - 1);
  idx = {0, n - 1};
  while (idx.size() < max) idx.push_back(pick(rng));
  return idx;
}

// Checks one tensor's analytic gradient against finite differences of `loss(perturbed)`.
template <class Loss>
void check_tensor(const std::string& name, cpu::tensor<double>& value, const cpu::tensor<double>& analytic, Loss&& loss,
                  const gradcheck_options& opt) {
  REQUIRE(analytic.shape() == value.shape());
  double worst = 0;
  std::size_t worst_at = 0;
  for (std::size_t i : probe_indices(value.size(), opt.max_elements, 1234u + unsigned(value.size()))) {
    const double keep = value[i];
    value[i] = keep + opt.step;
    const double up = loss();
    value[i] = keep - opt.step;
    const double down = loss();
    value[i] = keep;
    const double numeric = (up - down) / (2 * opt.step);
    const double err = std::abs(analytic[i] - numeric) / std::max(1.0, std::abs(numeric));
    if (err > worst) {
      worst = err;
      worst_at = i;
    }
  }
  INFO(name << ": worst relative error " << worst << " at element " << worst_at << " (analytic "
            << analytic[worst_at] << ")");
  CHECK(worst <= opt.tolerance);
}

// Returns the names of the tensors whose gradients were checked.
template <class Layer>
std::set<std::string> gradcheck(const Layer& layer, typename Layer::weights_t& w, cpu::tensor<double>& x,
                                gradcheck_options opt = {}) {
  static_assert(std::is_same_v<typename Layer::value_type, double>, "finite differences run in double precision");
  cpu::shape_t ys;
  {
    typename Layer::saved_t s;
    ys = layer.forward(w, x, s).shape();
  }
  const auto r = random_tensor<double>(ys, 99);

  typename Layer::saved_t saved;
  auto y = layer.forward(w, x, saved);
  auto grads = layer.make_grads(w);
  auto dx = layer.backward(w, saved, r, grads);

  auto loss = [&] { return loss_of(layer, w, x, r); };
  std::set<std::string> checked;
  Layer::for_each_trainable(w, grads, [&](const std::string& name, cpu::tensor<double>& p, cpu::tensor<double>& dp) {
    check_tensor(name, p, dp, loss, opt);
    checked.insert(name);
  });
  if constexpr (Layer::needs_input_grad) {
    check_tensor("input", x, dx, loss, opt);
  } else {
    CHECK(dx.empty());  // no input gradient was promised, none is computed
  }
  return checked;
}

// Stacks expose for_each_trainable as a member (their layer range is a runtime value).
template <class Stack>
std::set<std::string> gradcheck_stack(const Stack& stack, typename Stack::weights_t& w, cpu::tensor<double>& x,
                                      gradcheck_options opt = {}) {
  const auto r = random_tensor<double>(x.shape(), 99);
  typename Stack::saved_t saved;
  auto y = stack.forward(w, x, saved);
  auto grads = stack.make_grads(w);
  auto dx = stack.backward(w, saved, r, grads);
  auto loss = [&] {
    typename Stack::saved_t s;
    return stack.forward(w, x, s).vec().dot(r.vec());
  };
  std::set<std::string> checked;
  stack.for_each_trainable(w, grads, [&](const std::string& name, cpu::tensor<double>& p, cpu::tensor<double>& dp) {
    check_tensor(name, p, dp, loss, opt);
    checked.insert(name);
  });
  if constexpr (Stack::needs_input_grad) check_tensor("input", x, dx, loss, opt);
  else CHECK(dx.empty());
  return checked;
}

}  // namespace skillgraft::test
