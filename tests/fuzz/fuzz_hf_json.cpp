// libFuzzer target: the Hugging Face JSON side files on arbitrary bytes --
// config.json (model::decoder_config_from_hf) and model.safetensors.index.json
// (io::parse_safetensors_index).
//
// For every input each parser must either throw std::invalid_argument whose message
// starts with "skillgraft: " and holds no control character (names from the file are
// escaped), or accept it with its guarantees holding: a config whose sizes are
// positive, whose int products (heads x head_dim) did not wrap, whose parameter count
// fits, and which survives a round trip through decoder_config_to_hf; an index whose
// shards are plain file names. Never a crash, undefined behaviour (a double out of
// int's range, a division by zero) or another exception.
//
// Built and run by tests/fuzz/CMakeLists.txt; by hand:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
//       tests/fuzz/fuzz_hf_json.cpp -o /tmp/fuzz_hf_json
//   /tmp/fuzz_hf_json -dict=tests/fuzz/hf_json.dict /tmp/corpus tests/fuzz/corpus_hf_config \
//       tests/fuzz/corpus_safetensors_index
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "skillgraft/io/json_file.hpp"
#include "skillgraft/io/safetensors_index.hpp"
#include "skillgraft/model/hf_config.hpp"

namespace io = skillgraft::io;
namespace model = skillgraft::model;

namespace {

void check_message(const std::invalid_argument& e) {
  const std::string_view m = e.what();
  FUZZ_CHECK(m.starts_with("skillgraft: "));
  for (char c : m) FUZZ_CHECK(static_cast<unsigned char>(c) >= 0x20 && c != 0x7F);
}

void check_config(const nlohmann::json& j) {
  skillgraft::decoder_config c;
  try {
    c = model::decoder_config_from_hf(j, "config.json");
  } catch (const std::invalid_argument& e) {
    check_message(e);
    return;
  }
  c.validate();
  FUZZ_CHECK(c.hidden > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0 && c.intermediate > 0);
  FUZZ_CHECK(c.n_layers >= 0 && c.vocab_size > 0 && c.max_seq > 0);
  FUZZ_CHECK(std::int64_t(c.n_heads) * c.head_dim <= INT_MAX && std::int64_t(c.n_kv_heads) * c.head_dim <= INT_MAX);
  FUZZ_CHECK(std::int64_t(c.q_dim()) == std::int64_t(c.n_heads) * c.head_dim);
  FUZZ_CHECK(model::hf_parameter_count(c) > 0);
  const nlohmann::json out = model::decoder_config_to_hf(c);
  FUZZ_CHECK(model::decoder_config_to_hf(model::decoder_config_from_hf(out)) == out);
}

void check_index(const nlohmann::json& j) {
  try {
    const auto listed = io::parse_safetensors_index(j, "model.safetensors.index.json");
    FUZZ_CHECK(!listed.empty());
    for (const auto& [name, shard] : listed) {
      FUZZ_CHECK(!shard.empty() && shard != "." && shard != "..");
      FUZZ_CHECK(shard.find('/') == std::string::npos);
      for (char c : shard) FUZZ_CHECK(static_cast<unsigned char>(c) >= 0x20 && c != 0x7F);
    }
  } catch (const std::invalid_argument& e) {
    check_message(e);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  nlohmann::json j;
  try {
    j = io::parse_json(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz input");
  } catch (const std::invalid_argument& e) {
    check_message(e);
    return 0;
  }
  check_config(j);
  check_index(j);
  return 0;
}
