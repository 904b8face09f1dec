#pragma once
// The shape of attention over a KV cache (decoding): `queries` new positions per sequence,
// past..past + queries - 1, whose rotated keys and values are already in the cache next to the
// `past` earlier ones. q and a are [batch, queries, heads * head_dim]; the caches
// [batch, capacity, kv_heads * head_dim], of which rows 0..past + queries - 1 are filled. The
// query at position p sees keys 0..p of its own sequence; query head j reads kv head
// j / (heads / kv_heads).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace skillgraft {

struct cached_attention_dims {
  int batch = 1, queries = 1, past = 0, capacity = 1, heads = 1, kv_heads = 1, head_dim = 1;
  int group() const { return heads / kv_heads; }
  int keys() const { return past + queries; }
  // Token t = b * queries + i of q: its sequence and position.
  int sequence_of(std::int64_t t) const { return int(t / queries); }
  int position_of(std::int64_t t) const { return past + int(t % queries); }
};

// A stretch of consecutive tokens of one sequence among the listed query rows: its queries sit
// in consecutive rows of q and see a growing prefix of one cache, so a backend multiplies them
// as one block.
struct token_run {
  std::int64_t first = 0;  // token index into q
  int count = 0;
};

// The runs of `rows` (token indices into q, strictly increasing, each < batch * queries).
inline std::vector<token_run> token_runs(const cached_attention_dims& d, const std::vector<std::int64_t>& rows) {
  const std::int64_t tokens = std::int64_t(d.batch) * d.queries;
  std::vector<token_run> runs;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::int64_t t = rows[i];
    if (t < 0 || t >= tokens || (i > 0 && t <= rows[i - 1]))
      throw std::invalid_argument("skillgraft: cached attention rows must increase strictly within [0, " +
                                  std::to_string(tokens) + "); row " + std::to_string(i) + " is " + std::to_string(t));
    if (!runs.empty() && t == rows[i - 1] + 1 && d.sequence_of(t) == d.sequence_of(runs.back().first))
      ++runs.back().count;
    else
      runs.push_back({t, 1});
  }
  return runs;
}

}  // namespace skillgraft
