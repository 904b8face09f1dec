// libFuzzer target: parse_safetensors on arbitrary bytes.
//
// For every input the parser must either throw safetensors_error or accept a header
// whose invariants hold; it must never crash, hang, read outside the input, hit
// undefined behaviour or throw anything else (an escaping exception aborts, which
// libFuzzer reports). Each input is tried as a file and, when its length field is
// too large, also with the length clamped to the file. Accepted inputs are pushed further: every tensor is converted
// (so the conversions' reads are checked by AddressSanitizer) and the header is
// written back with our encoder and parsed again, which must give the same header.
//
// Built and run by tests/fuzz/CMakeLists.txt; by hand:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
//       tests/fuzz/fuzz_safetensors_header.cpp -o /tmp/fuzz_st
//   /tmp/fuzz_st -dict=tests/fuzz/safetensors.dict /tmp/corpus tests/fuzz/corpus
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_check.hpp"
#include "skillgraft/io/safetensors_format.hpp"

namespace io = skillgraft::io;

namespace {

void check_invariants(const io::safetensors_header& h, std::size_t size) {
  FUZZ_CHECK(h.data_start >= 8 && h.data_start <= size);
  FUZZ_CHECK(h.data_start + h.data_size == size);
  std::size_t covered = 0;
  for (const auto& t : h.tensors) {
    FUZZ_CHECK(t.begin == covered);  // sorted, contiguous, no overlap
    FUZZ_CHECK(t.begin <= t.end && t.end <= h.data_size);
    FUZZ_CHECK(t.elements() * static_cast<std::size_t>(io::dtype_bits(t.type)) == 8 * t.bytes());
    FUZZ_CHECK(t.shape.size() <= io::max_rank);
    FUZZ_CHECK(t.name != "__metadata__");
    covered = t.end;
  }
  FUZZ_CHECK(covered == h.data_size);
}

template <class T>
void convert_all(const io::safetensors_header& h, const std::uint8_t* data) {
  for (const auto& t : h.tensors) {
    std::vector<T> out(t.elements());
    const auto r = io::convert_elements<T>(t.type, data + h.data_start + t.begin, out.size(), out.data());
    FUZZ_CHECK(r.supported == io::converts_to<T>(t.type));
    FUZZ_CHECK(r.inexact_index == io::conversion_result::none || r.inexact_index < out.size());
  }
}

// Our encoder's output for the accepted header, followed by the same data, must
// parse to the same header (names and metadata survive escaping, offsets survive).
void check_reencoding(const io::safetensors_header& h, const std::uint8_t* data) {
  const std::string json = io::encode_safetensors_header(h.tensors, h.metadata);
  FUZZ_CHECK(json.size() % 8 == 0);
  std::vector<std::uint8_t> file(8 + json.size() + h.data_size);
  for (int i = 0; i < 8; ++i) file[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(json.size() >> (8 * i));
  std::memcpy(file.data() + 8, json.data(), json.size());
  if (h.data_size) std::memcpy(file.data() + 8 + json.size(), data + h.data_start, h.data_size);
  const io::safetensors_header again = io::parse_safetensors(file.data(), file.size(), "re-encoded header");
  FUZZ_CHECK(again.metadata == h.metadata);
  FUZZ_CHECK(again.tensors.size() == h.tensors.size());
  for (std::size_t i = 0; i < h.tensors.size(); ++i) {
    const auto& a = h.tensors[i];
    const auto& b = again.tensors[i];
    FUZZ_CHECK(a.name == b.name && a.type == b.type && a.shape == b.shape && a.begin == b.begin && a.end == b.end);
  }
}

// One parse, with every check on the outcome. `bytes` is an exactly sized heap
// buffer, so AddressSanitizer reports a read one byte past the end.
void parse_and_check(const std::vector<std::uint8_t>& bytes) {
  io::safetensors_header h;
  try {
    h = io::parse_safetensors(bytes.data(), bytes.size(), "fuzz input");
  } catch (const io::safetensors_error& e) {
    FUZZ_CHECK(std::strncmp(e.what(), "skillgraft: fuzz input at byte ", 31) == 0);
    FUZZ_CHECK(e.offset() <= bytes.size());
    return;
  }
  check_invariants(h, bytes.size());
  convert_all<float>(h, bytes.data());
  convert_all<double>(h, bytes.data());
  convert_all<std::int32_t>(h, bytes.data());
  convert_all<std::int64_t>(h, bytes.data());
  check_reencoding(h, bytes.data());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // 1. The input as a file.
  parse_and_check(std::vector<std::uint8_t>(data, data + size));
  // 2. When the length field points past the end, the same bytes with the length
  //    clamped to the end of the file. Random mutations rarely keep a 64-bit length
  //    equal to the file's size; this way every truncation of a seed is a header that
  //    ends exactly at the end of the file, which is where a reader overruns.
  if (size >= 8) {
    std::uint64_t n = 0;
    for (std::size_t i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(data[i]) << (8 * i);
    if (n > size - 8) {
      std::vector<std::uint8_t> file(data, data + size);
      const std::uint64_t clamped = size - 8;
      for (std::size_t i = 0; i < 8; ++i) file[i] = static_cast<std::uint8_t>(clamped >> (8 * i));
      parse_and_check(file);
    }
  }
  return 0;
}
