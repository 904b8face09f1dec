#pragma once
// The host-side check of gather_rows / scatter_rows' row maps, shared by the backends: an index
// outside the tensor would read or write past its end, and two rows scattered to one target
// would race (which one lands would depend on the threads). Both are caller bugs; they get an
// exception naming the map, the index and the bound, before any element moves.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace skillgraft::row_map {

// `rows` is the number of rows of `row` elements the map indexes into (gather: the source's,
// scatter: the target's); `elements` that tensor's size; `mapped` the size of the other one,
// which must hold map.size() rows at least (a gather may fill the first rows of a larger
// buffer). `unique`: no index may repeat (scatter).
inline void check(std::string_view what, const std::vector<std::int64_t>& map, std::size_t row, std::size_t elements,
                  std::size_t mapped, bool unique) {
  const auto fail = [&](const std::string& why) {
    throw std::invalid_argument("skillgraft: " + std::string(what) + ": " + why);
  };
  if (mapped < map.size() * row)
    fail("the row map has " + std::to_string(map.size()) + " rows of " + std::to_string(row) + " elements, the tensor " +
         "they come from or go to only " + std::to_string(mapped));
  if (row == 0 ? elements != 0 : elements % row != 0)
    fail("a tensor of " + std::to_string(elements) + " elements is not made of rows of " + std::to_string(row));
  if (row == 0) return;  // rows of no elements: nothing moves, whatever the map says
  const std::size_t rows = elements / row;
  // A scatter runs per token and per layer during generation: the repeat check marks rows in a
  // per-thread table stamped with a fresh number per call, so it neither allocates nor clears
  // once the table has grown to the largest target.
  thread_local std::vector<std::uint32_t> stamp;
  thread_local std::uint32_t current = 0;
  if (unique) {
    if (stamp.size() < rows) stamp.resize(rows, 0);
    if (++current == 0) {  // the stamp wrapped around: old marks could read as this call's
      std::fill(stamp.begin(), stamp.end(), 0);
      current = 1;
    }
  }
  for (std::size_t r = 0; r < map.size(); ++r) {
    const std::int64_t i = map[r];
    if (i < 0 || std::uint64_t(i) >= rows)
      fail("row index " + std::to_string(i) + " (entry " + std::to_string(r) + ") is outside 0.." +
           std::to_string(std::int64_t(rows) - 1));
    if (unique) {
      if (stamp[std::size_t(i)] == current)
        fail("row " + std::to_string(i) + " is a target twice (entry " + std::to_string(r) + ")");
      stamp[std::size_t(i)] = current;
    }
  }
}

}  // namespace skillgraft::row_map
