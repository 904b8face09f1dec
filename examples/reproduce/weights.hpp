#pragma once
// The multimodal model's weights as the reproduction handles them: one type, a checksum of
// their content (the base-model cache and the stage states record it) and a copy between two
// models of the same shape.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "skillgraft/model/multimodal.hpp"

#include "data.hpp"

namespace skillgraft::reproduce {

using weights_t = model::multimodal_weights<float>;

// The metadata key under which a saved model (base-model cache, stage state) records it.
inline constexpr const char* content_checksum_key = "skillgraft.reproduce.checksum";

// FNV-1a over every tensor's name and float bytes, in model order, as 16 hex digits.
inline std::string content_checksum(const weights_t& w) {
  std::uint64_t h = fnv1a("", 0);
  model::for_each_multimodal_parameter(const_cast<weights_t&>(w), [&](const std::string& name, cpu::tensor<float>& t) {
    h = fnv1a(name.data(), name.size() + 1, h);  // with the terminating NUL: names cannot run into data
    h = fnv1a(t.data(), t.bytes(), h);
  });
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

inline void copy_weights(const weights_t& from, weights_t& to) {
  std::vector<const cpu::tensor<float>*> src;
  model::for_each_multimodal_parameter(const_cast<weights_t&>(from),
                                       [&](const std::string&, cpu::tensor<float>& t) { src.push_back(&t); });
  std::size_t i = 0;
  model::for_each_multimodal_parameter(to, [&](const std::string& name, cpu::tensor<float>& t) {
    if (!(src[i]->shape() == t.shape())) throw std::logic_error("reproduce: copying " + name + " between different models");
    std::copy_n(src[i]->data(), t.size(), t.data());
    ++i;
  });
}

}  // namespace skillgraft::reproduce
