#pragma once
// model.safetensors.index.json, the table of contents of a sharded checkpoint:
// {"metadata": {...}, "weight_map": {"<tensor name>": "<shard file name>", ...}}.
//
// parse_safetensors_index checks what a loader relies on before it opens a shard:
// the weight map is an object of strings, it lists at least one tensor, and every
// shard is a plain file name in the checkpoint's own directory (a name with a path in
// it could read any file; control characters are refused too). Names from the file are escaped in messages.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>

#include "skillgraft/io/json_file.hpp"
#include "skillgraft/io/printable.hpp"

namespace skillgraft::io {

// tensor name -> shard file name. `where` names the index in messages.
inline std::map<std::string, std::string, std::less<>> parse_safetensors_index(const nlohmann::json& j,
                                                                                const std::string& where) {
  if (!j.is_object() || !j.contains("weight_map") || !j.at("weight_map").is_object())
    throw std::invalid_argument("skillgraft: " + where + " has no \"weight_map\" object");
  std::map<std::string, std::string, std::less<>> listed;
  for (const auto& [name, shard] : j.at("weight_map").items()) {
    if (!shard.is_string())
      throw std::invalid_argument("skillgraft: " + where + " maps " + printable(name) + " to " +
                                  json_shown(shard) + ", not to a shard file name");
    const std::string s = shard.get<std::string>();
    const bool control = std::any_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7F; });
    if (s.empty() || s == "." || s == ".." || s.find('/') != std::string::npos || control)
      throw std::invalid_argument("skillgraft: " + where + " maps " + printable(name) + " to \"" + printable(s) +
                                  "\"; shards must be file names in the checkpoint's directory");
    listed.emplace(name, s);
  }
  if (listed.empty()) throw std::invalid_argument("skillgraft: " + where + " lists no tensors");
  return listed;
}

}  // namespace skillgraft::io
