#pragma once
// .npy exchange through xtensor: the N-d array type at the API boundary.
//
// `load_npy` reads a file into a tensor and checks its shape; `to_xarray` and
// `from_xarray` copy between the library's tensors and xtensor arrays.
#include <xtensor/xadapt.hpp>
#include <xtensor/xarray.hpp>
#include <xtensor/xnpy.hpp>

#include <filesystem>
#include <string>

#include "skillgraft/backend/cpu/tensor.hpp"

namespace skillgraft::io {

template <class T>
cpu::tensor<T> from_xarray(const xt::xarray<T>& a, memory_use use) {
  cpu::shape_t s;
  if (a.dimension() > 4) throw std::invalid_argument("skillgraft: arrays have at most 4 dimensions");
  s.rank = int(a.dimension());
  for (std::size_t i = 0; i < a.dimension(); ++i) s.dims[i] = a.shape()[i];
  cpu::tensor<T> t(s, use);
  std::copy(a.begin(), a.end(), t.data());
  return t;
}

template <class T>
xt::xarray<T> to_xarray(const cpu::tensor<T>& t) {
  std::vector<std::size_t> shape(t.shape().dims.begin(), t.shape().dims.begin() + t.rank());
  xt::xarray<T> a = xt::adapt(t.data(), t.size(), xt::no_ownership(), shape);
  return a;
}

// Loads a float32 .npy into a tensor of T; throws naming the file when it is missing,
// malformed, or of a different shape than `expected` (when given).
template <class T>
cpu::tensor<T> load_npy(const std::filesystem::path& file, memory_use use, const cpu::shape_t* expected = nullptr) {
  if (!std::filesystem::exists(file)) throw std::invalid_argument("skillgraft: no such file " + file.string());
  xt::xarray<float> a;
  try {
    a = xt::load_npy<float>(file.string());
  } catch (const std::exception& e) {
    throw std::invalid_argument("skillgraft: cannot read " + file.string() + " as float32 .npy: " + e.what());
  }
  xt::xarray<T> converted = xt::cast<T>(a);
  auto t = from_xarray<T>(converted, use);
  if (expected) cpu::expect_shape(t, *expected, file.filename().string());
  return t;
}

}  // namespace skillgraft::io
