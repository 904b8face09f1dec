#pragma once
// The safetensors format (Hugging Face): dtypes, the header, and its validation.
//
//   bytes 0..7     N, the header length, unsigned 64-bit little-endian
//   bytes 8..8+N   UTF-8 JSON object: {"__metadata__": {str: str},
//                   "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
//   bytes 8+N..    the data section; a tensor's bytes are [8+N+begin, 8+N+end),
//                  little-endian, row-major
//
// `parse_safetensors` trusts nothing: every rule Hugging Face's own reader checks
// is checked here (header size limit, JSON grammar and UTF-8, field types, known
// dtypes, bytes = elements x dtype size, offsets inside the data, the data covered
// by the tensors exactly, with no gap, overlap or trailing byte), plus duplicate
// names, which their reader silently collapses. A bad file is a safetensors_error
// naming the file and the byte offset of the problem; nothing else can come out of
// it for any input (a fuzz target checks that).
//
// This header has no Eigen dependency: it is what the fuzz target compiles.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "skillgraft/io/half.hpp"
#include "skillgraft/io/printable.hpp"
#include "skillgraft/io/safetensors_json.hpp"

namespace skillgraft::io {

// Every dtype the format defines. The first five are what skillgraft reads and
// writes for weights and token ids; f64 and the other integers convert too; the
// 8-, 6- and 4-bit floats, complex and bool are parsed and validated (so such a
// file opens and its other tensors load) but cannot be converted.
enum class dtype { f32, f16, bf16, i64, i32, f64, c64, i16, i8, u8, u16, u32, u64, boolean,
                   f8_e5m2, f8_e4m3, f8_e8m0, f6_e2m3, f6_e3m2, f4 };

namespace detail {
struct dtype_row {
  dtype type;
  std::string_view name;  // as spelled in the header
  int bits;               // per element
  int hf_rank;            // position in Hugging Face's Dtype enum, which orders tensors on writing
};
inline constexpr std::array<dtype_row, 20> dtype_rows{{
    {dtype::f32, "F32", 32, 15},      {dtype::f16, "F16", 16, 11},         {dtype::bf16, "BF16", 16, 12},
    {dtype::i64, "I64", 64, 18},      {dtype::i32, "I32", 32, 13},         {dtype::f64, "F64", 64, 17},
    {dtype::c64, "C64", 64, 16},      {dtype::i16, "I16", 16, 9},          {dtype::i8, "I8", 8, 5},
    {dtype::u8, "U8", 8, 4},          {dtype::u16, "U16", 16, 10},         {dtype::u32, "U32", 32, 14},
    {dtype::u64, "U64", 64, 19},      {dtype::boolean, "BOOL", 8, 0},      {dtype::f8_e5m2, "F8_E5M2", 8, 6},
    {dtype::f8_e4m3, "F8_E4M3", 8, 7}, {dtype::f8_e8m0, "F8_E8M0", 8, 8},   {dtype::f6_e2m3, "F6_E2M3", 6, 2},
    {dtype::f6_e3m2, "F6_E3M2", 6, 3}, {dtype::f4, "F4", 4, 1},
}};
inline const dtype_row& row(dtype t) { return dtype_rows[static_cast<std::size_t>(t)]; }
}  // namespace detail

inline std::string_view dtype_name(dtype t) { return detail::row(t).name; }
inline int dtype_bits(dtype t) { return detail::row(t).bits; }
inline std::optional<dtype> parse_dtype(std::string_view name) {
  for (const auto& r : detail::dtype_rows)
    if (r.name == name) return r.type;
  return std::nullopt;
}

struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::size_t> shape;  // as in the file; [] is a scalar (one element)
  std::size_t begin = 0, end = 0;  // byte range relative to the start of the data section

  std::size_t elements() const {  // cannot overflow once parse_safetensors accepted the header
    std::size_t n = 1;
    for (std::size_t d : shape) n *= d;
    return n;
  }
  std::size_t bytes() const { return end - begin; }
};

struct safetensors_header {
  std::vector<tensor_info> tensors;  // in data order (by begin offset)
  std::map<std::string, std::string> metadata;
  std::size_t data_start = 0;  // file offset of the data section: 8 + header length
  std::size_t data_size = 0;   // bytes in the data section
};

// "[2, 3]", the notation used in every shape message of the library.
inline std::string shape_string(const std::vector<std::size_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// A malformed or unexpected safetensors file. Derives from std::invalid_argument,
// the library's exception for bad input. `offset()` is the file offset of the
// problem, or `no_offset` for problems that are not at a place in the file
// (a tensor that is missing, or has another shape than the caller expects).
class safetensors_error : public std::invalid_argument {
 public:
  static constexpr std::size_t no_offset = static_cast<std::size_t>(-1);
  explicit safetensors_error(const std::string& message, std::size_t offset = no_offset)
      : std::invalid_argument(message), offset_(offset) {}
  safetensors_error(std::string_view source, std::size_t offset, const std::string& problem)
      : std::invalid_argument("skillgraft: " + std::string(source) + " at byte " + std::to_string(offset) + ": " +
                              problem),
        offset_(offset) {}
  std::size_t offset() const noexcept { return offset_; }

 private:
  std::size_t offset_;
};

// Headers larger than this are rejected before anything is read (Hugging Face's
// limit too): a wrong or hostile length must not make us allocate or scan gigabytes.
inline constexpr std::size_t max_header_bytes = 100'000'000;
// Shapes with more dimensions are rejected (NumPy's limit is 64): a short header
// must not describe an absurd number of dimensions.
inline constexpr std::size_t max_rank = 64;

namespace detail {

// Reads an unsigned integer stored little-endian at any alignment.
template <class U>
U load_le(const std::uint8_t* p) {
  static_assert(std::is_unsigned_v<U>);
  U v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (std::endian::native == std::endian::big) {
    U r = 0;
    for (std::size_t i = 0; i < sizeof v; ++i) r = static_cast<U>((r << 8) | ((v >> (8 * i)) & 0xFF));
    v = r;
  }
  return v;
}
template <class U>
void store_le(std::uint8_t* p, U v) {
  static_assert(std::is_unsigned_v<U>);
  for (std::size_t i = 0; i < sizeof v; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

inline bool checked_mul(std::size_t a, std::size_t b, std::size_t& out) {
  if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a) return false;
  out = a * b;
  return true;
}

inline void read_metadata(json_reader& r, std::map<std::string, std::string>& metadata) {
  if (r.read_null_if_present()) return;  // Hugging Face's reader accepts null as "no metadata"
  if (r.peek() != '{')
    r.fail("__metadata__ must be an object of strings, found " + std::string(r.peek_kind()));
  r.read_object(
      [&](const std::string& key, std::size_t key_position) {
        if (r.peek() != '"')
          r.fail("__metadata__ value of " + printable(key) + " must be a string, found " + std::string(r.peek_kind()));
        std::string value = r.read_string();
        if (!metadata.emplace(key, std::move(value)).second)
          r.fail_at(key_position, "duplicate __metadata__ key " + printable(key));
      },
      1);
}

// One "<name>": {...} entry, checked against itself and the size of the data section.
inline tensor_info read_tensor_entry(json_reader& r, const std::string& name, std::size_t key_position,
                                     std::size_t data_size) {
  const std::string what = "tensor " + printable(name);
  if (r.peek() != '{')
    r.fail(what + ": expected an object with dtype, shape and data_offsets, found " + std::string(r.peek_kind()));
  std::optional<dtype> type;
  std::optional<std::vector<std::size_t>> shape;
  std::optional<std::pair<std::uint64_t, std::uint64_t>> offsets;
  r.read_object(
      [&](const std::string& key, std::size_t field_position) {
        auto once = [&](bool seen) {
          if (seen) r.fail_at(field_position, what + ": duplicate key " + printable(key));
        };
        if (key == "dtype") {
          once(type.has_value());
          if (r.peek() != '"') r.fail(what + ": dtype must be a string, found " + std::string(r.peek_kind()));
          const std::size_t at = r.position();
          const std::string s = r.read_string();
          type = parse_dtype(s);
          if (!type) r.fail_at(at, what + ": unknown dtype \"" + printable(s) + "\"");
        } else if (key == "shape") {
          once(shape.has_value());
          if (r.peek() != '[') r.fail(what + ": shape must be an array, found " + std::string(r.peek_kind()));
          std::vector<std::size_t> dims;
          r.read_array(
              [&](std::size_t i) {
                if (i >= max_rank) r.fail(what + ": shape has more than " + std::to_string(max_rank) + " dimensions");
                dims.push_back(static_cast<std::size_t>(r.read_unsigned(what + ": a shape dimension")));
              },
              2);
          shape = std::move(dims);
        } else if (key == "data_offsets") {
          once(offsets.has_value());
          const std::size_t at = r.position();
          if (r.peek() != '[')
            r.fail(what + ": data_offsets must be an array [begin, end], found " + std::string(r.peek_kind()));
          std::uint64_t v[2] = {0, 0};
          std::size_t count = 0;
          r.read_array(
              [&](std::size_t i) {
                if (i >= 2) r.fail_at(at, what + ": data_offsets must be [begin, end], found more than 2 numbers");
                v[i] = r.read_unsigned(what + ": a data offset");
                count = i + 1;
              },
              2);
          if (count != 2)
            r.fail_at(at, what + ": data_offsets must be [begin, end], found " + std::to_string(count) + " number" +
                              (count == 1 ? "" : "s"));
          offsets.emplace(v[0], v[1]);
        } else {
          r.skip_value(2);  // Hugging Face's reader ignores unknown fields too
        }
      },
      1);
  if (!type) r.fail_at(key_position, what + " has no dtype");
  if (!shape) r.fail_at(key_position, what + " has no shape");
  if (!offsets) r.fail_at(key_position, what + " has no data_offsets");

  tensor_info t;
  t.name = name;
  t.type = *type;
  t.shape = std::move(*shape);
  const auto [begin, end] = *offsets;
  const std::string offsets_str = "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
  if (begin > end) r.fail_at(key_position, what + ": data_offsets " + offsets_str + " end before they begin");
  std::size_t elements = 1, bits = 0;
  for (std::size_t d : t.shape)
    if (!checked_mul(elements, d, elements))
      r.fail_at(key_position, what + ": shape " + shape_string(t.shape) + " has more elements than fit in 64 bits");
  if (!checked_mul(elements, static_cast<std::size_t>(dtype_bits(t.type)), bits))
    r.fail_at(key_position, what + ": shape " + shape_string(t.shape) + " is too large for " +
                                std::string(dtype_name(t.type)));
  if (bits % 8 != 0)
    r.fail_at(key_position, what + ": " + std::to_string(elements) + " " + std::string(dtype_name(t.type)) +
                                " elements do not fill a whole number of bytes");
  if (end - begin != bits / 8)
    r.fail_at(key_position, what + ": " + std::string(dtype_name(t.type)) + " shape " + shape_string(t.shape) +
                                " needs " + std::to_string(bits / 8) + " bytes, but data_offsets " + offsets_str +
                                " hold " + std::to_string(end - begin));
  if (end > data_size)
    r.fail_at(key_position, what + ": data_offsets " + offsets_str + " run past the end of the data section (" +
                                std::to_string(data_size) + " bytes)");
  t.begin = static_cast<std::size_t>(begin);
  t.end = static_cast<std::size_t>(end);
  return t;
}

}  // namespace detail

// Parses and validates a whole file held in memory (`size` bytes at `bytes`).
// `source` names it in messages (the file's path).
inline safetensors_header parse_safetensors(const std::uint8_t* bytes, std::size_t size,
                                            std::string_view source = "safetensors data") {
  auto fail = [&](std::size_t offset, const std::string& problem) { throw safetensors_error(source, offset, problem); };
  if (size < 8)
    fail(0, "the file is " + std::to_string(size) + " bytes long, too short for the 8-byte header length");
  const std::uint64_t n = detail::load_le<std::uint64_t>(bytes);
  if (n > max_header_bytes)
    fail(0, "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(max_header_bytes) +
                " bytes (not a safetensors file?)");
  if (n > size - 8)
    fail(0, "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
                " bytes)");

  safetensors_header h;
  h.data_start = 8 + static_cast<std::size_t>(n);
  h.data_size = size - h.data_start;
  detail::json_reader r(std::string_view(reinterpret_cast<const char*>(bytes + 8), static_cast<std::size_t>(n)));
  try {
    if (r.peek() != '{') r.fail("the header is not a JSON object (it begins with " + std::string(r.peek_kind()) + ")");
    std::set<std::string, std::less<>> names;
    bool seen_metadata = false;
    r.read_object([&](const std::string& key, std::size_t key_position) {
      if (key == "__metadata__") {
        if (seen_metadata) r.fail_at(key_position, "duplicate key __metadata__");
        seen_metadata = true;
        detail::read_metadata(r, h.metadata);
      } else {
        if (!names.insert(key).second) r.fail_at(key_position, "duplicate tensor name " + printable(key));
        h.tensors.push_back(detail::read_tensor_entry(r, key, key_position, h.data_size));
      }
    });
    // Only whitespace may follow (writers pad the header with spaces to 8 bytes).
    if (!r.at_end()) r.fail("found " + std::string(r.peek_kind()) + " after the header's JSON object");
  } catch (const detail::json_syntax_error& e) {
    fail(8 + e.position, e.message);
  }

  // The tensors must tile the data section exactly: each starts where the previous
  // one ended, and the last ends at the end of the file.
  std::sort(h.tensors.begin(), h.tensors.end(), [](const tensor_info& a, const tensor_info& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  std::size_t covered = 0;
  const tensor_info* previous = nullptr;
  for (const auto& t : h.tensors) {
    if (t.begin < covered)
      fail(h.data_start + t.begin, "tensors " + printable(previous->name) + " and " + printable(t.name) + " overlap (data_offsets [" +
                                       std::to_string(previous->begin) + ", " + std::to_string(previous->end) +
                                       "] and [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "])");
    if (t.begin > covered)
      fail(h.data_start + covered, "bytes [" + std::to_string(covered) + ", " + std::to_string(t.begin) +
                                       ") of the data section belong to no tensor (a gap before " + printable(t.name) + ")");
    covered = t.end;
    previous = &t;
  }
  if (covered != h.data_size)
    fail(h.data_start + covered, "the last " + std::to_string(h.data_size - covered) +
                                     " bytes of the file belong to no tensor");
  return h;
}

// ---- element conversion -------------------------------------------------------

// The element types a stored tensor can be converted to.
template <class T>
concept loadable_element = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                           std::is_same_v<T, std::int32_t> || std::is_same_v<T, std::int64_t>;

template <loadable_element T>
constexpr std::string_view element_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "int32";
  else return "int64";
}

// Outcome of a conversion that can fail without throwing (the fuzz target uses it).
struct conversion_result {
  static constexpr std::size_t none = static_cast<std::size_t>(-1);
  bool supported = true;            // false: no conversion from this dtype to T
  std::size_t inexact_index = none;  // first element whose value T cannot hold exactly
  bool out_of_range = false;         // that element is a finite F64 beyond T's range
  bool ok() const { return supported && inexact_index == none; }
};

// Which stored dtypes convert to T. Floating T: the floating dtypes (exact, except
// F64 to float, which rounds to nearest and refuses finite values beyond float's range,
// which would become infinity) and the integers (checked exact).
// Integer T: the integer dtypes (range-checked). Nothing converts from the 8/6/4-bit
// floats, C64 or BOOL.
template <loadable_element T>
constexpr bool converts_to(dtype from) {
  const bool integer = from == dtype::i64 || from == dtype::i32 || from == dtype::i16 || from == dtype::i8 ||
                       from == dtype::u8 || from == dtype::u16 || from == dtype::u32 || from == dtype::u64;
  if constexpr (std::is_floating_point_v<T>)
    return integer || from == dtype::f32 || from == dtype::f16 || from == dtype::bf16 || from == dtype::f64;
  else
    return integer;
}

namespace detail {
// An integer value as T, or nullopt when T cannot represent it exactly.
template <class T, class I>
std::optional<T> exact_from_integer(I v) {
  if constexpr (std::is_floating_point_v<T>) {
    const T f = static_cast<T>(v);
    // 2^63 and 2^64 are exact in float and double; below them the cast back is defined.
    if constexpr (std::is_signed_v<I>) {
      if (!(f >= T(-9223372036854775808.0) && f < T(9223372036854775808.0))) return std::nullopt;
      if (static_cast<std::int64_t>(f) != static_cast<std::int64_t>(v)) return std::nullopt;
    } else {
      if (!(f < T(18446744073709551616.0))) return std::nullopt;
      if (static_cast<std::uint64_t>(f) != static_cast<std::uint64_t>(v)) return std::nullopt;
    }
    return f;
  } else {
    if (!std::in_range<T>(v)) return std::nullopt;
    return static_cast<T>(v);
  }
}
template <class T, class Stored, class I>
conversion_result convert_integers(const std::uint8_t* src, std::size_t count, T* dst) {
  for (std::size_t i = 0; i < count; ++i) {
    const auto v = static_cast<I>(load_le<Stored>(src + i * sizeof(Stored)));
    const auto t = exact_from_integer<T>(v);
    if (!t) return {true, i};
    dst[i] = *t;
  }
  return {};
}
}  // namespace detail

// Converts `count` elements stored as `from` at `src` (little-endian, any
// alignment) into `dst`. Stops at the first element T cannot hold exactly.
template <loadable_element T>
conversion_result convert_elements(dtype from, const std::uint8_t* src, std::size_t count, T* dst) {
  using detail::load_le;
  if (!converts_to<T>(from)) return {false};
  switch (from) {
    case dtype::f32:
      if constexpr (std::is_same_v<T, float> && std::endian::native == std::endian::little) {
        if (count) std::memcpy(dst, src, count * sizeof(float));
      } else if constexpr (std::is_floating_point_v<T>) {
        for (std::size_t i = 0; i < count; ++i) dst[i] = std::bit_cast<float>(load_le<std::uint32_t>(src + 4 * i));
      }
      return {};
    case dtype::f64:
      if constexpr (std::is_floating_point_v<T>)
        for (std::size_t i = 0; i < count; ++i) {
          const double x = std::bit_cast<double>(load_le<std::uint64_t>(src + 8 * i));
          // A finite value that would round to infinity (at or beyond T's largest value plus
          // half an ulp) is refused, not converted.
          if constexpr (!std::is_same_v<T, double>) {
            constexpr int half_ulp_exp = std::numeric_limits<T>::max_exponent - 1 - std::numeric_limits<T>::digits;
            if (std::isfinite(x) && std::fabs(x) >= double(std::numeric_limits<T>::max()) + std::ldexp(1.0, half_ulp_exp))
              return {true, i, true};
          }
          dst[i] = static_cast<T>(x);
        }
      return {};
    case dtype::f16:
      if constexpr (std::is_floating_point_v<T>)
        for (std::size_t i = 0; i < count; ++i) dst[i] = half_to<T>(load_le<std::uint16_t>(src + 2 * i));
      return {};
    case dtype::bf16:
      if constexpr (std::is_floating_point_v<T>)
        for (std::size_t i = 0; i < count; ++i) dst[i] = bfloat16_to<T>(load_le<std::uint16_t>(src + 2 * i));
      return {};
    case dtype::i64:
      if constexpr (std::is_same_v<T, std::int64_t> && std::endian::native == std::endian::little) {
        if (count) std::memcpy(dst, src, count * sizeof(std::int64_t));
        return {};
      } else {
        return detail::convert_integers<T, std::uint64_t, std::int64_t>(src, count, dst);
      }
    case dtype::i32: return detail::convert_integers<T, std::uint32_t, std::int32_t>(src, count, dst);
    case dtype::i16: return detail::convert_integers<T, std::uint16_t, std::int16_t>(src, count, dst);
    case dtype::i8: return detail::convert_integers<T, std::uint8_t, std::int8_t>(src, count, dst);
    case dtype::u8: return detail::convert_integers<T, std::uint8_t, std::uint8_t>(src, count, dst);
    case dtype::u16: return detail::convert_integers<T, std::uint16_t, std::uint16_t>(src, count, dst);
    case dtype::u32: return detail::convert_integers<T, std::uint32_t, std::uint32_t>(src, count, dst);
    case dtype::u64: return detail::convert_integers<T, std::uint64_t, std::uint64_t>(src, count, dst);
    default: return {false};
  }
}

// ---- writing ------------------------------------------------------------------

// The order Hugging Face's writer puts tensors in: larger dtypes first (by their
// enum position), then by name. With the header padded to 8 bytes this keeps every
// tensor aligned to its element size, and it makes our files byte-identical to theirs.
inline bool hf_write_order(const tensor_info& a, const tensor_info& b) {
  const int ra = detail::row(a.type).hf_rank, rb = detail::row(b.type).hf_rank;
  if (ra != rb) return ra > rb;
  return a.name < b.name;
}

// The header bytes (JSON padded with spaces to a multiple of 8, without the length
// prefix) for tensors already in file order with their offsets set. Metadata comes
// first and is omitted when empty, as Hugging Face writes it.
inline std::string encode_safetensors_header(const std::vector<tensor_info>& tensors,
                                             const std::map<std::string, std::string>& metadata) {
  std::string json = "{";
  bool first = true;
  if (!metadata.empty()) {
    json += "\"__metadata__\":{";
    for (const auto& [key, value] : metadata) {
      if (!first) json += ',';
      first = false;
      detail::append_json_string(json, key);
      json += ':';
      detail::append_json_string(json, value);
    }
    json += '}';
  }
  for (const auto& t : tensors) {
    if (json.size() > 1) json += ',';
    detail::append_json_string(json, t.name);
    json += ":{\"dtype\":\"";
    json += dtype_name(t.type);
    json += "\",\"shape\":[";
    for (std::size_t i = 0; i < t.shape.size(); ++i) {
      if (i) json += ',';
      json += std::to_string(t.shape[i]);
    }
    json += "],\"data_offsets\":[";
    json += std::to_string(t.begin);
    json += ',';
    json += std::to_string(t.end);
    json += "]}";
  }
  json += '}';
  json.append((8 - json.size() % 8) % 8, ' ');
  return json;
}

}  // namespace skillgraft::io
