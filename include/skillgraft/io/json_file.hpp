#pragma once
// The small JSON side files of Hugging Face checkpoints (config.json,
// model.safetensors.index.json, adapter_config.json): reading them, writing them
// atomically, and reading their numbers as what they must be.
//
// A number in such a file is checked before it is used: an integer field must hold an
// integer (1e300, 32.7 and 4294967328 are refused, never truncated or wrapped) inside
// the range the caller gives, and a real field must be finite.
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>

#include "skillgraft/io/atomic_file.hpp"
#include "skillgraft/io/printable.hpp"
#include "skillgraft/io/regular_file.hpp"

namespace skillgraft::io {

// Parses JSON text; bad JSON is std::invalid_argument naming `where`.
inline nlohmann::json parse_json(std::string_view text, const std::string& where) {
  try {
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("skillgraft: " + where + " is not valid JSON: " + printable(e.what()));
  }
}

// Parses a JSON file; a missing file, one that is not a regular file (a directory, a
// FIFO: refused before anything reads it) or bad JSON is std::invalid_argument naming it.
inline nlohmann::json read_json_file(const std::filesystem::path& file) {
  const regular_file f(file);
  return parse_json(f.read_all(std::uintmax_t{64} << 20), file.string());
}

// Writes j as transformers does (2-space indent, trailing newline), replacing `file` atomically.
inline void write_json_file(const std::filesystem::path& file, const nlohmann::json& j) {
  const std::string text = j.dump(2) + "\n";
  atomic_file out(file);
  out.write(text.data(), text.size());
  out.commit();
}

// A JSON value as a message shows it: its text with control characters and DEL escaped
// (JSON itself leaves DEL and C1 controls raw in strings) and cut to 80 bytes, so that a
// nested object or a long string in the wrong field cannot flood the terminal.
inline std::string json_shown(const nlohmann::json& v) {
  std::string text = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return printable(text);
}

// The value of integer field `key` as a 64-bit integer in [lo, hi]. Whole numbers
// written as reals (32.0) are accepted; fractions, values outside [lo, hi] and
// non-numbers are std::invalid_argument naming `where`, the key, the range and the value.
inline std::int64_t json_integer(const nlohmann::json& v, std::string_view key, const std::string& where,
                                 std::int64_t lo, std::int64_t hi) {
  auto refuse = [&](const std::string& found) -> std::int64_t {
    throw std::invalid_argument("skillgraft: " + where + " has " + std::string(key) + " " + found +
                                "; expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  };
  if (v.is_number_unsigned()) {
    // JSON text gives non-negative integers this type: checked against both bounds too.
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(hi) || (lo > 0 && u < static_cast<std::uint64_t>(lo))) return refuse(json_shown(v));
    return static_cast<std::int64_t>(u);
  }
  std::int64_t x = 0;
  if (v.is_number_integer()) {
    x = v.get<std::int64_t>();
  } else if (v.is_number_float()) {
    const double d = v.get<double>();
    // Range first: converting a double outside int64 is undefined behaviour.
    if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0) || d != std::floor(d)) return refuse(json_shown(v));
    x = static_cast<std::int64_t>(d);
  } else {
    return refuse(json_shown(v) + " (" + std::string(v.type_name()) + ")");
  }
  if (x < lo || x > hi) return refuse(json_shown(v));
  return x;
}

// The value of a real field as a finite double (an integer is fine too).
inline double json_real(const nlohmann::json& v, std::string_view key, const std::string& where) {
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    throw std::invalid_argument("skillgraft: " + where + " has " + std::string(key) + " " + json_shown(v) +
                                "; expected a finite number");
  return v.get<double>();
}

}  // namespace skillgraft::io
