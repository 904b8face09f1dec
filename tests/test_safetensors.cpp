// safetensors: bit-exact 16-bit float conversions, files written by Hugging Face's
// safetensors read back with their values, our files byte-identical to theirs, every
// malformed header named by file and byte offset, and atomic replacement that never
// loses the last good file.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "skillgraft/io/safetensors.hpp"

namespace sg = skillgraft;
namespace io = skillgraft::io;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

const fs::path data_dir = fs::path(SKILLGRAFT_TEST_DATA) / "safetensors";

// A fresh directory, removed with its contents at the end of the test.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("skillgraft-safetensors-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

std::vector<std::uint8_t> read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const fs::path& file, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(file, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// A file image: 8-byte length (the header's own unless `length` is given), header, data bytes.
std::vector<std::uint8_t> image(const std::string& header, std::size_t data_bytes = 0,
                                std::optional<std::uint64_t> length = std::nullopt) {
  const std::uint64_t n = length.value_or(header.size());
  std::vector<std::uint8_t> b(8 + header.size() + data_bytes);
  for (std::size_t i = 0; i < 8; ++i) b[i] = static_cast<std::uint8_t>(n >> (8 * i));
  for (std::size_t i = 0; i < header.size(); ++i) b[8 + i] = static_cast<std::uint8_t>(header[i]);
  for (std::size_t i = 0; i < data_bytes; ++i) b[8 + header.size() + i] = static_cast<std::uint8_t>(i);
  return b;
}

// The message parse_safetensors gives for these bytes ("" if it accepts them).
std::string parse_error(const std::vector<std::uint8_t>& bytes) {
  try {
    io::parse_safetensors(bytes.data(), bytes.size(), "bad.safetensors");
  } catch (const io::safetensors_error& e) {
    return e.what();
  }
  return "";
}
std::string parse_error(const std::string& header, std::size_t data_bytes = 0) {
  return parse_error(image(header, data_bytes));
}

std::uint32_t bits(float x) { return std::bit_cast<std::uint32_t>(x); }
std::uint64_t bits(double x) { return std::bit_cast<std::uint64_t>(x); }
float float_from_bits(std::uint32_t b) { return std::bit_cast<float>(b); }

template <class T>
sg::cpu::tensor<T> make_tensor(sg::cpu::shape_t shape, const std::vector<T>& values) {
  sg::cpu::tensor<T> t(shape, sg::memory_use::workspace);
  REQUIRE(values.size() == t.size());
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

// Value of a binary16 pattern computed from the definition, for finite patterns.
double half_reference(std::uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  const double v = exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25);
  return sign ? -v : v;
}
double bfloat16_reference(std::uint16_t h) {
  const int sign = h >> 15, exp = (h >> 7) & 0xFF, mant = h & 0x7F;
  const double v = exp == 0 ? std::ldexp(mant, -133) : std::ldexp(128 + mant, exp - 134);
  return sign ? -v : v;
}

}  // namespace

// ---- 16-bit floats --------------------------------------------------------------

TEST_CASE("half and bfloat16 patterns decode to their known values") {
  struct row {
    std::uint16_t bits;
    double value;
  };
  const row halves[] = {
      {0x0000, 0.0},
      {0x0001, 5.9604644775390625e-08},   // smallest subnormal, 2^-24
      {0x03FF, 6.097555160522461e-05},    // largest subnormal, 1023 * 2^-24
      {0x0400, 6.103515625e-05},          // smallest normal, 2^-14
      {0x3C00, 1.0},
      {0x3C01, 1.0009765625},             // 1 + 2^-10
      {0xC000, -2.0},
      {0x7BFF, 65504.0},                  // largest finite
      {0x3555, 0.333251953125},
      {0xFBFF, -65504.0},
  };
  for (const auto& r : halves) {
    INFO("half 0x" << std::hex << r.bits);
    CHECK(io::half_to_double(r.bits) == r.value);
    CHECK(io::half_to_float(r.bits) == static_cast<float>(r.value));
  }
  CHECK(bits(io::half_to_float(0x8000)) == 0x80000000u);  // -0 keeps its sign
  CHECK(io::half_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(io::half_to_double(0xFC00) == -std::numeric_limits<double>::infinity());
  CHECK(bits(io::half_to_float(0x7E00)) == 0x7FC00000u);          // quiet NaN
  CHECK(bits(io::half_to_float(0xFC01)) == 0xFF802000u);          // signalling NaN payload kept
  CHECK(bits(io::half_to_double(0x7E00)) == 0x7FF8000000000000u);

  const row bf16s[] = {
      {0x0001, 9.183549615799121e-41},    // smallest subnormal, 2^-133
      {0x007F, 1.1663108012064884e-38},   // largest subnormal, 127 * 2^-133
      {0x0080, 1.1754943508222875e-38},   // smallest normal, 2^-126
      {0x3F80, 1.0},
      {0x4049, 3.140625},
      {0xC0A0, -5.0},
      {0x7F7F, 3.3895313892515355e+38},   // largest finite
      {0x3EAB, 0.333984375},
  };
  for (const auto& r : bf16s) {
    INFO("bf16 0x" << std::hex << r.bits);
    CHECK(io::bfloat16_to_double(r.bits) == r.value);
    CHECK(io::bfloat16_to_float(r.bits) == static_cast<float>(r.value));
  }
  CHECK(bits(io::bfloat16_to_float(0x8000)) == 0x80000000u);
  CHECK(io::bfloat16_to_float(0xFF80) == -std::numeric_limits<float>::infinity());
  CHECK(bits(io::bfloat16_to_float(0x7FC0)) == 0x7FC00000u);
  CHECK(bits(io::bfloat16_to_double(0x7FC0)) == 0x7FF8000000000000u);
}

TEST_CASE("every half and bfloat16 pattern widens exactly and narrows back to itself") {
  int mismatches = 0;
  for (std::uint32_t i = 0; i < 0x10000; ++i) {
    const auto h = static_cast<std::uint16_t>(i);
    const bool half_nan = ((h >> 10) & 0x1F) == 0x1F && (h & 0x3FF) != 0;
    const bool half_inf = ((h >> 10) & 0x1F) == 0x1F && (h & 0x3FF) == 0;
    if (!half_nan && !half_inf && io::half_to_double(h) != half_reference(h)) ++mismatches;
    if (half_nan != std::isnan(io::half_to_float(h))) ++mismatches;
    if (io::float_to_half(io::half_to_float(h)) != h) ++mismatches;
    if (io::double_to_half(io::half_to_double(h)) != h) ++mismatches;

    const bool bf_nan = ((h >> 7) & 0xFF) == 0xFF && (h & 0x7F) != 0;
    const bool bf_inf = ((h >> 7) & 0xFF) == 0xFF && (h & 0x7F) == 0;
    if (!bf_nan && !bf_inf && io::bfloat16_to_double(h) != bfloat16_reference(h)) ++mismatches;
    if (!bf_nan && io::bfloat16_to_double(h) != static_cast<double>(io::bfloat16_to_float(h))) ++mismatches;
    if (io::float_to_bfloat16(io::bfloat16_to_float(h)) != h) ++mismatches;
    if (io::double_to_bfloat16(io::bfloat16_to_double(h)) != h) ++mismatches;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("narrowing rounds to nearest, ties to even (hand-computed cases)") {
  const float inf = std::numeric_limits<float>::infinity();
  // bfloat16 keeps 7 mantissa bits: its spacing at 1 is 2^-7.
  CHECK(io::float_to_bfloat16(1.0f + 0x1p-8f) == 0x3F80);             // halfway, 0x3F80 is even
  CHECK(io::float_to_bfloat16(1.0f + 3 * 0x1p-8f) == 0x3F82);         // halfway, 0x3F82 is even
  CHECK(io::float_to_bfloat16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3F81);  // just above halfway
  CHECK(io::float_to_bfloat16(3.14159265f) == 0x4049);                 // 0x40490FDB: low half < 0x8000
  CHECK(io::float_to_bfloat16(-3.14159265f) == 0xC049);
  CHECK(io::float_to_bfloat16(0.1f) == 0x3DCD);                        // 0x3DCCCCCD: low half > 0x8000
  CHECK(io::float_to_bfloat16(float_from_bits(0x7F7F7FFF)) == 0x7F7F);
  CHECK(io::float_to_bfloat16(float_from_bits(0x7F7F8000)) == 0x7F80);  // tie, odd 0x7F7F -> up: infinity
  CHECK(io::float_to_bfloat16(std::numeric_limits<float>::max()) == 0x7F80);
  CHECK(io::float_to_bfloat16(float_from_bits(0x00008000)) == 0x0000);  // subnormal tie -> even 0
  CHECK(io::float_to_bfloat16(float_from_bits(0x00018000)) == 0x0002);  // subnormal tie -> even 2
  CHECK(io::float_to_bfloat16(-0.0f) == 0x8000);
  CHECK(io::float_to_bfloat16(-inf) == 0xFF80);
  CHECK(io::float_to_bfloat16(float_from_bits(0x7FC00000)) == 0x7FC0);
  CHECK(io::float_to_bfloat16(float_from_bits(0x7F800001)) == 0x7FC0);  // payload lost: stays NaN (quiet)
  CHECK(io::float_to_bfloat16(float_from_bits(0xFF812345)) == 0xFF81);  // top payload bits kept
  // A double rounds once, straight to 16 bits; through float it would round twice.
  CHECK(io::double_to_bfloat16(1.0 + 0x1p-8 + 0x1p-40) == 0x3F81);
  CHECK(io::float_to_bfloat16(static_cast<float>(1.0 + 0x1p-8 + 0x1p-40)) == 0x3F80);
  CHECK(io::double_to_bfloat16(1e-300) == 0x0000);
  CHECK(io::double_to_bfloat16(-1e300) == 0xFF80);

  // binary16 keeps 10 mantissa bits, and its exponent range is small.
  CHECK(io::float_to_half(1.0f + 0x1p-11f) == 0x3C00);      // halfway, even
  CHECK(io::float_to_half(1.0f + 3 * 0x1p-11f) == 0x3C02);  // halfway, even
  CHECK(io::float_to_half(0.1f) == 0x2E66);
  CHECK(io::float_to_half(65504.0f) == 0x7BFF);
  CHECK(io::float_to_half(65519.0f) == 0x7BFF);             // below the halfway point 65520
  CHECK(io::float_to_half(65520.0f) == 0x7C00);             // tie, odd 0x7BFF -> up: infinity
  CHECK(io::float_to_half(1e6f) == 0x7C00);
  CHECK(io::float_to_half(0x1p-24f) == 0x0001);             // smallest subnormal
  CHECK(io::float_to_half(0x1p-25f) == 0x0000);             // half of it: tie -> even 0
  CHECK(io::float_to_half(0x1p-25f + 0x1p-40f) == 0x0001);  // just above
  CHECK(io::float_to_half(3 * 0x1p-25f) == 0x0002);         // 1.5 units: tie -> even 2
  CHECK(io::float_to_half(1e-7f) == 0x0002);                // 1.68 units
  CHECK(io::float_to_half(-3.0e-5f) == 0x81F7);             // 503.3 units
  CHECK(io::float_to_half(1023.5f * 0x1p-24f) == 0x0400);   // rounds up into the smallest normal
  CHECK(io::float_to_half(1e-10f) == 0x0000);
  CHECK(io::float_to_half(-1e-10f) == 0x8000);
  CHECK(io::float_to_half(float_from_bits(0x7FC00000)) == 0x7E00);
  CHECK(io::double_to_half(1.0 + 0x1p-11 + 0x1p-40) == 0x3C01);  // once, not twice
  CHECK(io::double_to_half(std::numeric_limits<double>::denorm_min()) == 0x0000);
}

TEST_CASE("narrowing agrees with independent references across the float range") {
  // Positive finite halves in increasing order, for a nearest-value search.
  std::vector<double> halves;
  for (std::uint32_t h = 0; h <= 0x7BFF; ++h) halves.push_back(half_reference(static_cast<std::uint16_t>(h)));
  auto half_by_search = [&](float x) -> std::uint16_t {
    const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const double a = std::fabs(static_cast<double>(x));
    if (a >= 65520.0) return sign | 0x7C00;
    const auto it = std::lower_bound(halves.begin(), halves.end(), a);
    auto hi = static_cast<std::uint16_t>(it - halves.begin());
    if (hi == 0) return sign;
    if (hi == halves.size()) return sign | 0x7BFF;  // in (65504, 65520): below the halfway point
    const auto lo = static_cast<std::uint16_t>(hi - 1);
    const double dlo = a - halves[lo], dhi = halves[hi] - a;  // exact in double
    const std::uint16_t pick = dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi);
    return sign | pick;
  };
  // The integer formula for bfloat16 (add 0x7FFF plus the lowest kept bit, truncate).
  auto bf16_by_formula = [](float x) -> std::uint16_t {
    const std::uint32_t b = bits(x);
    return static_cast<std::uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  };
  int bf16_mismatches = 0, half_mismatches = 0, compiler_mismatches = 0;
  auto check = [&](std::uint32_t b) {
    const float x = float_from_bits(b);
    if (std::isnan(x)) return;
    if (io::float_to_bfloat16(x) != bf16_by_formula(x)) ++bf16_mismatches;
    if (io::float_to_half(x) != half_by_search(x)) ++half_mismatches;
    if (io::double_to_half(static_cast<double>(x)) != half_by_search(x)) ++half_mismatches;
#if defined(__FLT16_MAX__)
    // The compiler's own conversion, where the target has _Float16.
    if (std::bit_cast<std::uint16_t>(static_cast<_Float16>(x)) != io::float_to_half(x)) ++compiler_mismatches;
#endif
  };
  for (std::uint64_t b = 0; b <= 0xFFFFFFFFu; b += 509) check(static_cast<std::uint32_t>(b));
  // Densely around the places where half rounding changes regime.
  for (float edge : {65504.0f, 65520.0f, 0x1p-14f, 0x1p-24f, 0x1p-25f, 1.0f, 2048.0f}) {
    for (int d = -3000; d <= 3000; ++d) {
      check(bits(edge) + static_cast<std::uint32_t>(d));
      check(bits(-edge) + static_cast<std::uint32_t>(d));
    }
  }
  CHECK(bf16_mismatches == 0);
  CHECK(half_mismatches == 0);
  CHECK(compiler_mismatches == 0);
}

// ---- reading ----------------------------------------------------------------------

TEST_CASE("a file written by Hugging Face's safetensors (Python) reads back with its values") {
  io::safetensors_file f(data_dir / "python_values.safetensors");
  CHECK(f.metadata() == std::map<std::string, std::string>{{"note", "h\xC3\xA9llo \"quoted\"\n"}});
  CHECK(f.header().tensors.size() == 11);
  CHECK(f.info("bf16.specials").type == io::dtype::bf16);
  CHECK(f.info("rank5").shape == std::vector<std::size_t>{1, 1, 1, 2, 1});

  const auto m = f.load<float>("f32.matrix");
  CHECK(m.shape() == sg::cpu::shape_t{2, 3});
  CHECK(m[0] == 1.5f);
  CHECK(m[1] == -2.25f);
  CHECK(m[2] == 1e-40f);  // a float subnormal
  CHECK(m[3] == std::numeric_limits<float>::max());
  CHECK(bits(m[4]) == 0x80000000u);
  CHECK(m[5] == std::numeric_limits<float>::infinity());
  const auto md = f.load<double>("f32.matrix");
  CHECK(md[2] == static_cast<double>(1e-40f));

  // The same 14 patterns as in make_fixtures.py.
  const std::uint16_t f16_bits[] = {0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x3C01,
                                    0xC000, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x3555, 0xFBFF};
  const auto h = f.load<float>("f16.specials");
  const auto hd = f.load<double>("f16.specials");
  REQUIRE(h.size() == 14);
  CHECK(h[2] == 0x1p-24f);
  CHECK(h[4] == 0x1p-14f);
  CHECK(h[8] == 65504.0f);
  CHECK(h[9] == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(h[11]));
  for (std::size_t i = 0; i < 14; ++i) {
    CHECK(bits(h[i]) == bits(io::half_to_float(f16_bits[i])));
    CHECK(bits(hd[i]) == bits(io::half_to_double(f16_bits[i])));
  }
  const std::uint16_t bf16_bits[] = {0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x4049,
                                     0xC0A0, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x3EAB, 0xFF7F};
  const auto b = f.load<float>("bf16.specials");
  REQUIRE(b.size() == 14);
  CHECK(b[6] == 3.140625f);
  CHECK(b[7] == -5.0f);
  for (std::size_t i = 0; i < 14; ++i) CHECK(bits(b[i]) == (std::uint32_t{bf16_bits[i]} << 16));

  const auto d = f.load<double>("f64.values");
  CHECK(d[0] == 0.1);
  CHECK(d[1] == -1e300);
  CHECK(d[2] == std::numeric_limits<double>::denorm_min());
  // F64 -> float rounds to nearest, but a finite value beyond float's range is refused
  // (it would load as infinity), naming the element and the value.
  CHECK_THROWS_WITH(f.load<float>("f64.values"),
                    "skillgraft: element 1 of f64.values in " + (data_dir / "python_values.safetensors").string() +
                        " (F64) is -1.0000000000000001e+300, outside the range of float (largest 3.40282347e+38); it "
                        "would load as infinity");

  CHECK(f.load_ids("i64.ids") ==
        std::vector<std::int64_t>{1, -100, std::int64_t{1} << 40, 0, std::numeric_limits<std::int64_t>::max(),
                                  std::numeric_limits<std::int64_t>::min()});
  CHECK(f.load_ids("i32.ids") == std::vector<std::int64_t>{7, -1, 2147483647, -2147483648LL});
  CHECK(f.load_ids("u8.bytes") == std::vector<std::int64_t>{0, 7, 255});
  const auto ids = f.load<std::int64_t>("i64.ids");
  CHECK(ids.shape() == sg::cpu::shape_t{2, 3});
  CHECK(ids[1] == -100);
  const auto i32 = f.load<double>("i32.ids");
  CHECK(i32[3] == -2147483648.0);

  // A scalar (shape []) loads as shape [1]; a zero-size tensor keeps its shape.
  const auto s = f.load<float>("scalar");
  CHECK(s.shape() == sg::cpu::shape_t{1});
  CHECK(s[0] == 2.5f);
  const auto e = f.load<float>("empty");
  CHECK(e.shape() == sg::cpu::shape_t{0, 3});
  CHECK(e.size() == 0);
  CHECK(f.raw("rank5").size() == 8);
  CHECK(f.raw("empty").empty());
}

TEST_CASE("conversions that cannot be done name the tensor, the file and the reason") {
  const fs::path path = data_dir / "python_values.safetensors";
  io::safetensors_file f(path);
  const std::string file = path.string();
  CHECK_FALSE(f.contains("model.norm.weight"));
  CHECK(f.contains("scalar"));
  CHECK_THROWS_WITH(f.info("model.norm.weight"), "skillgraft: no tensor named model.norm.weight in " + file);
  CHECK_THROWS_WITH(f.load<float>("model.norm.weight"), "skillgraft: no tensor named model.norm.weight in " + file);
  CHECK_THROWS_AS(f.load<float>("model.norm.weight"), io::safetensors_error);
  CHECK_THROWS_AS(f.load<float>("model.norm.weight"), std::invalid_argument);
  CHECK_THROWS_WITH(f.load<float>("bool.flags"),
                    "skillgraft: bool.flags in " + file + " is BOOL, which does not convert to float");
  CHECK_THROWS_WITH(f.load<std::int64_t>("f32.matrix"),
                    "skillgraft: f32.matrix in " + file + " is F32, which does not convert to int64");
  CHECK_THROWS_WITH(f.load_ids("f16.specials"),
                    "skillgraft: f16.specials in " + file + " is F16; load_ids reads integer tensors (I64, I32, ...)");
  // 2^63 - 1 has no float; 2^31 - 1 neither; 2^40 does not fit int32.
  CHECK_THROWS_WITH(f.load<float>("i64.ids"),
                    "skillgraft: element 4 of i64.ids in " + file + " (I64) is not exactly representable as float");
  CHECK_THROWS_WITH(f.load<float>("i32.ids"),
                    "skillgraft: element 2 of i32.ids in " + file + " (I32) is not exactly representable as float");
  CHECK_THROWS_WITH(f.load<std::int32_t>("i64.ids"),
                    "skillgraft: element 2 of i64.ids in " + file + " (I64) is not exactly representable as int32");
  CHECK_THROWS_WITH(f.load<float>("rank5"), "skillgraft: rank5 has shape [1, 1, 1, 2, 1] in " + file +
                                                "; tensors have at most 4 dimensions");
}

TEST_CASE("load_into checks the destination's shape and leaves it untouched on failure") {
  const fs::path path = data_dir / "python_values.safetensors";
  io::safetensors_file f(path);
  auto dst = make_tensor<float>({2, 3}, {9, 9, 9, 9, 9, 9});
  f.load_into("f32.matrix", dst);
  CHECK(dst[1] == -2.25f);

  auto wrong = make_tensor<float>({3, 2}, {7, 7, 7, 7, 7, 7});
  CHECK_THROWS_WITH(f.load_into("f32.matrix", wrong),
                    "skillgraft: f32.matrix has shape [2, 3] in " + path.string() + ", expected [3, 2]");
  CHECK(wrong[0] == 7.0f);
  sg::cpu::tensor<float> absent;
  CHECK_THROWS_WITH(f.load_into("f32.matrix", absent),
                    "skillgraft: f32.matrix has shape [2, 3] in " + path.string() + ", expected []");

  auto one = make_tensor<double>({1}, {0});
  f.load_into("scalar", one);
  CHECK(one[0] == 2.5);
  auto two = make_tensor<double>({2}, {0, 0});
  CHECK_THROWS_WITH(f.load_into("scalar", two),
                    "skillgraft: scalar has shape [] in " + path.string() + ", expected [2]");

  // An element that does not fit must not leave a half-converted destination.
  auto ids = make_tensor<std::int32_t>({2, 3}, {5, 5, 5, 5, 5, 5});
  CHECK_THROWS_WITH(f.load_into("i64.ids", ids), Contains("element 2 of i64.ids"));
  CHECK(ids[0] == 5);
  CHECK(ids[1] == 5);
}

TEST_CASE("the tiny Llama checkpoint saved by transformers loads with its shapes") {
  io::safetensors_file f(fs::path(SKILLGRAFT_TEST_DATA) / "lm_llama" / "model.safetensors");
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.info("model.embed_tokens.weight").shape == std::vector<std::size_t>{64, 32});
  for (const auto& t : f.header().tensors) {
    CHECK(t.type == io::dtype::f32);
    const auto w = f.load<float>(t.name);
    CHECK(w.size() == t.elements());
    CHECK(std::all_of(w.data(), w.data() + w.size(), [](float x) { return std::isfinite(x); }));
  }
  auto norm = sg::cpu::tensor<float>({32}, sg::memory_use::weights);
  f.load_into("model.norm.weight", norm);
  CHECK(norm.vec().cwiseAbs().maxCoeff() > 0.0f);
}

// ---- malformed files ----------------------------------------------------------------

TEST_CASE("a file too short or with an impossible header length is named with offset 0") {
  CHECK(parse_error(std::vector<std::uint8_t>{}) ==
        "skillgraft: bad.safetensors at byte 0: the file is 0 bytes long, too short for the 8-byte header length");
  CHECK(parse_error(std::vector<std::uint8_t>{1, 2, 3, 4, 5}) ==
        "skillgraft: bad.safetensors at byte 0: the file is 5 bytes long, too short for the 8-byte header length");
  CHECK(parse_error(image("{}", 0, 100)) ==
        "skillgraft: bad.safetensors at byte 0: header length 100 runs past the end of the file (10 bytes)");
  CHECK(parse_error(image("{}", 0, std::uint64_t{1} << 62)) ==
        "skillgraft: bad.safetensors at byte 0: header length 4611686018427387904 exceeds the limit of 100000000 "
        "bytes (not a safetensors file?)");
  CHECK(parse_error(image("{}", 0, ~std::uint64_t{0})) == "skillgraft: bad.safetensors at byte 0: header length "
                                                           "18446744073709551615 exceeds the limit of 100000000 "
                                                           "bytes (not a safetensors file?)");
  // One byte past: the length counts the 8 length bytes out.
  CHECK(parse_error(image("{}", 0, 3)) ==
        "skillgraft: bad.safetensors at byte 0: header length 3 runs past the end of the file (10 bytes)");

  const auto bytes = image("{}", 0, 3);
  try {
    io::parse_safetensors(bytes.data(), bytes.size(), "x");
    FAIL("accepted");
  } catch (const io::safetensors_error& e) {
    CHECK(e.offset() == 0);
  }
}

TEST_CASE("invalid JSON is named with the file offset of the bad byte") {
  // Offsets count the 8 length bytes: header byte i is file byte 8 + i.
  CHECK(parse_error("") == "skillgraft: bad.safetensors at byte 8: the header is not a JSON object (it begins with "
                           "the end of the header)");
  CHECK(parse_error("[1, 2]") ==
        "skillgraft: bad.safetensors at byte 8: the header is not a JSON object (it begins with an array)");
  CHECK(parse_error("  \"x\"") ==
        "skillgraft: bad.safetensors at byte 10: the header is not a JSON object (it begins with a string)");
  CHECK(parse_error("{\"a\":") == "skillgraft: bad.safetensors at byte 13: tensor a: expected an object with dtype, "
                                  "shape and data_offsets, found the end of the header");
  CHECK(parse_error("{\"a\" 1}") == "skillgraft: bad.safetensors at byte 13: expected ':', found a number");
  CHECK(parse_error("{\"a\":{}") == "skillgraft: bad.safetensors at byte 9: tensor a has no dtype");
  CHECK(parse_error("{} x") == "skillgraft: bad.safetensors at byte 11: found an invalid character after the "
                               "header's JSON object");
  CHECK(parse_error("{}{}") ==
        "skillgraft: bad.safetensors at byte 10: found an object after the header's JSON object");
  CHECK(parse_error(std::string("{}\0\0\0\0\0\0", 8)) ==
        "skillgraft: bad.safetensors at byte 10: found an invalid character after the header's JSON object");
  CHECK(parse_error("{\"a\":1,}") == "skillgraft: bad.safetensors at byte 13: tensor a: expected an object with "
                                     "dtype, shape and data_offsets, found a number");
  CHECK(parse_error("{,}") == "skillgraft: bad.safetensors at byte 9: expected a string key in the object");
  CHECK(parse_error("{\"a\\q\":1}") == "skillgraft: bad.safetensors at byte 11: invalid escape in a string");
  CHECK(parse_error("{\"a") == "skillgraft: bad.safetensors at byte 11: unterminated string");
  CHECK(parse_error("{\"a\nb\":1}") ==
        "skillgraft: bad.safetensors at byte 11: control character in a string (must be escaped)");
  CHECK(parse_error("{\"\xC3\x28\":1}") == "skillgraft: bad.safetensors at byte 10: invalid UTF-8 in a string");
  CHECK(parse_error("{\"\xED\xA0\x80\":1}") == "skillgraft: bad.safetensors at byte 10: invalid UTF-8 in a string");
  CHECK(parse_error("{\"\xC0\xAF\":1}") == "skillgraft: bad.safetensors at byte 10: invalid UTF-8 in a string");
  CHECK(parse_error("{\"\\ud800\":1}") ==
        "skillgraft: bad.safetensors at byte 10: unpaired high surrogate in a \\u escape");
  CHECK(parse_error("{\"\\udc00\":1}") ==
        "skillgraft: bad.safetensors at byte 10: unpaired low surrogate in a \\u escape");
  CHECK(parse_error("{\"\\u12G4\":1}") == "skillgraft: bad.safetensors at byte 14: invalid hex digit in a \\u escape");
  CHECK(parse_error("{\"__metadata__\":{\"a\":\"b\",}}") ==
        "skillgraft: bad.safetensors at byte 33: expected a string key in the object");

  // Deep nesting inside an ignored field is bounded, not recursed into without limit.
  std::string deep = "{\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"x\":";
  deep += std::string(200, '[') + std::string(200, ']') + "}}";
  CHECK_THAT(parse_error(deep, 4), Contains("JSON nested more than 128 levels deep"));
}

TEST_CASE("tensor entries with missing, ill-typed or unknown fields name the tensor") {
  const std::string ok_fields = "\"shape\":[1],\"data_offsets\":[0,4]";
  CHECK(parse_error("{\"w\":{" + ok_fields + "}}", 4) == "skillgraft: bad.safetensors at byte 9: tensor w has no dtype");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 9: tensor w has no shape");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4) ==
        "skillgraft: bad.safetensors at byte 9: tensor w has no data_offsets");
  CHECK(parse_error("{\"w\":{\"dtype\":32," + ok_fields + "}}", 4) ==
        "skillgraft: bad.safetensors at byte 22: tensor w: dtype must be a string, found a number");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F17\"," + ok_fields + "}}", 4) ==
        "skillgraft: bad.safetensors at byte 22: tensor w: unknown dtype \"F17\"");
  CHECK(parse_error("{\"w\":{\"dtype\":\"f32\"," + ok_fields + "}}", 4) ==
        "skillgraft: bad.safetensors at byte 22: tensor w: unknown dtype \"f32\"");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":\"1\",\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 36: tensor w: shape must be an array, found a string");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 37: tensor w: a shape dimension must be a non-negative integer, found "
        "a number");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 37: tensor w: a shape dimension must be a non-negative integer, found "
        "a fraction or exponent");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e0],\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 37: tensor w: a shape dimension must be a non-negative integer, found "
        "a fraction or exponent");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[null],\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 37: tensor w: a shape dimension must be a non-negative integer, found "
        "null");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[18446744073709551616],\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 37: tensor w: a shape dimension does not fit in 64 bits");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 37: number with a leading zero");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4) ==
        "skillgraft: bad.safetensors at byte 55: tensor w: data_offsets must be [begin, end], found 1 number");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 55: tensor w: data_offsets must be [begin, end], found more than 2 "
        "numbers");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":{}}}", 4) ==
        "skillgraft: bad.safetensors at byte 55: tensor w: data_offsets must be an array [begin, end], found an "
        "object");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\"," + ok_fields + "}}", 4) ==
        "skillgraft: bad.safetensors at byte 28: tensor w: duplicate key dtype");
  CHECK(parse_error("{\"w\":[1]}") == "skillgraft: bad.safetensors at byte 13: tensor w: expected an object with "
                                      "dtype, shape and data_offsets, found an array");
  std::string many = "{\"w\":{\"dtype\":\"F32\",\"shape\":[";
  for (int i = 0; i < 65; ++i) many += (i ? ",1" : "1");
  CHECK_THAT(parse_error(many + "],\"data_offsets\":[0,4]}}", 4),
             Contains("tensor w: shape has more than 64 dimensions"));

  // Unknown fields are ignored (as Hugging Face's reader does), whatever they hold.
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\"," + ok_fields + ",\"x\":[1.5e3,-0,true,false,null,{\"y\":\"\\u00e9\"}]}}",
                    4) == "");
  CHECK(parse_error(" \t\r\n{\"w\":{" + ok_fields + ",\"dtype\":\"F32\"}}  \n ", 4) == "");
}

TEST_CASE("sizes and offsets that disagree are named with the tensor and the offsets") {
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 20) ==
        "skillgraft: bad.safetensors at byte 9: tensor w: F32 shape [2, 3] needs 24 bytes, but data_offsets [0, 20] "
        "hold 20");
  CHECK(parse_error("{\"w\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,4]}}", 4) ==
        "skillgraft: bad.safetensors at byte 9: tensor w: BF16 shape [] needs 2 bytes, but data_offsets [0, 4] hold 4");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8) ==
        "skillgraft: bad.safetensors at byte 9: tensor w: data_offsets [8, 0] end before they begin");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4) ==
        "skillgraft: bad.safetensors at byte 9: tensor w: data_offsets [0, 8] run past the end of the data section "
        "(4 bytes)");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}") ==
        "skillgraft: bad.safetensors at byte 9: tensor w: shape [4294967296, 4294967296, 16] has more elements than "
        "fit in 64 bits");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}") ==
        "skillgraft: bad.safetensors at byte 9: tensor w: shape [4611686018427387904] is too large for F64");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,1]}}", 1) ==
        "skillgraft: bad.safetensors at byte 9: tensor w: 3 F4 elements do not fill a whole number of bytes");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[0,2]}}", 2) == "");
  CHECK(parse_error("{\"w\":{\"dtype\":\"F6_E2M3\",\"shape\":[4],\"data_offsets\":[0,3]}}", 3) == "");
}

TEST_CASE("gaps, overlaps and trailing bytes in the data section are rejected") {
  // Header of 128 bytes so the data section starts at file byte 136.
  auto padded = [](std::string h) {
    h.resize(128, ' ');
    return h;
  };
  const std::string a = "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":";
  const std::string b = "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":";
  CHECK(parse_error(padded("{" + a + "[0,8]}," + b + "[4,12]}}"), 12) ==
        "skillgraft: bad.safetensors at byte 140: tensors a and b overlap (data_offsets [0, 8] and [4, 12])");
  CHECK(parse_error(padded("{" + a + "[0,8]}," + b + "[0,8]}}"), 8) ==
        "skillgraft: bad.safetensors at byte 136: tensors a and b overlap (data_offsets [0, 8] and [0, 8])");
  CHECK(parse_error(padded("{" + b + "[12,20]}," + a + "[0,8]}}"), 20) ==
        "skillgraft: bad.safetensors at byte 144: bytes [8, 12) of the data section belong to no tensor (a gap "
        "before b)");
  CHECK(parse_error(padded("{" + a + "[4,12]}}"), 12) ==
        "skillgraft: bad.safetensors at byte 136: bytes [0, 4) of the data section belong to no tensor (a gap "
        "before a)");
  CHECK(parse_error(padded("{" + a + "[0,8]}}"), 11) ==
        "skillgraft: bad.safetensors at byte 144: the last 3 bytes of the file belong to no tensor");
  CHECK(parse_error(padded("{}"), 1) ==
        "skillgraft: bad.safetensors at byte 136: the last 1 bytes of the file belong to no tensor");
  // A zero-size tensor may sit where another begins, but not inside another.
  const std::string z = "\"z\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":";
  CHECK(parse_error(padded("{" + z + "[0,0]}," + a + "[0,8]}}"), 8) == "");
  CHECK(parse_error(padded("{" + z + "[8,8]}," + a + "[0,8]}}"), 8) == "");
  CHECK(parse_error(padded("{" + z + "[4,4]}," + a + "[0,8]}}"), 8) ==
        "skillgraft: bad.safetensors at byte 140: tensors a and z overlap (data_offsets [0, 8] and [4, 4])");
}

TEST_CASE("duplicate names and bad metadata are rejected") {
  const std::string w = "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}";
  CHECK(parse_error("{\"w\":" + w + ",\"w\":" + w + "}", 4) ==
        "skillgraft: bad.safetensors at byte 62: duplicate tensor name w");
  CHECK(parse_error("{\"__metadata__\":{},\"__metadata__\":{}}") ==
        "skillgraft: bad.safetensors at byte 27: duplicate key __metadata__");
  CHECK(parse_error("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}") ==
        "skillgraft: bad.safetensors at byte 33: duplicate __metadata__ key k");
  CHECK(parse_error("{\"__metadata__\":{\"k\":1}}") ==
        "skillgraft: bad.safetensors at byte 29: __metadata__ value of k must be a string, found a number");
  CHECK(parse_error("{\"__metadata__\":[]}") ==
        "skillgraft: bad.safetensors at byte 24: __metadata__ must be an object of strings, found an array");
  CHECK(parse_error("{\"__metadata__\":null,\"w\":" + w + "}", 4) == "");
  const auto bytes = image("{\"__metadata__\":{\"a\\u00e9\\n\":\"\\ud83d\\ude00\\\\\"}}");
  const auto h = io::parse_safetensors(bytes.data(), bytes.size());
  CHECK(h.metadata == std::map<std::string, std::string>{{"a\xC3\xA9\n", "\xF0\x9F\x98\x80\\"}});
  CHECK(h.tensors.empty());
  CHECK(h.data_start == bytes.size());
}

TEST_CASE("files that are missing, not regular or truncated are named by path") {
  temp_dir dir;
  CHECK_THROWS_WITH(io::safetensors_file(dir / "missing.safetensors"),
                    "skillgraft: cannot open " + (dir / "missing.safetensors").string() + ": No such file or directory");
  CHECK_THROWS_WITH(io::safetensors_file(dir.path), "skillgraft: " + dir.path.string() + " is not a regular file (it is a directory)");
  write_bytes(dir / "empty.safetensors", {});
  CHECK_THROWS_WITH(io::safetensors_file(dir / "empty.safetensors"),
                    "skillgraft: " + (dir / "empty.safetensors").string() +
                        " at byte 0: the file is 0 bytes long, too short for the 8-byte header length");
  auto bytes = read_bytes(data_dir / "python_values.safetensors");
  bytes.resize(100);
  write_bytes(dir / "truncated.safetensors", bytes);
  CHECK_THROWS_WITH(io::safetensors_file(dir / "truncated.safetensors"),
                    "skillgraft: " + (dir / "truncated.safetensors").string() +
                        " at byte 0: header length 768 runs past the end of the file (100 bytes)");
  bytes = read_bytes(data_dir / "python_values.safetensors");
  bytes.pop_back();
  write_bytes(dir / "short_data.safetensors", bytes);
  CHECK_THROWS_WITH(io::safetensors_file(dir / "short_data.safetensors"),
                    Contains("tensor bool.flags: data_offsets [183, 185] run past the end of the data section "
                             "(184 bytes)"));
}

// ---- writing ----------------------------------------------------------------------

TEST_CASE("the writer reproduces Hugging Face's bytes") {
  temp_dir dir;
  SECTION("tensors and metadata as the Python package writes them") {
    const std::vector<float> rounded = {0.1f, 65519.0f, 1e-7f, -3.0e-5f, 1.0f + 0x1p-11f, 65520.0f};
    const auto embed = make_tensor<float>({2, 3}, {0.25f, -1.0f, 3.0f, 1e-3f, 7.5f, -0.0f});
    const auto dbl = make_tensor<double>({2}, {0.1, -2.0 / 3.0});
    const auto half = make_tensor<float>({6}, rounded);
    const auto bf16 = make_tensor<float>({6}, rounded);
    io::safetensors_writer w;
    w.set_metadata("format", "pt");
    w.add("model.embed.weight", embed);
    w.add("double.weight", dbl, io::dtype::f64);
    w.add("half.weight", half, io::dtype::f16);
    w.add("bf16.weight", bf16, io::dtype::bf16);
    w.add_ids("input_ids", {3, 1, 4, -100}, {2, 2});
    w.add_ids("step", {1234}, {});
    w.write(dir / "out.safetensors");
    CHECK(read_bytes(dir / "out.safetensors") == read_bytes(data_dir / "python_writer_match.safetensors"));

    // The 16-bit values, by hand (see the rounding test): numpy and the integer formula agree.
    io::safetensors_file f(dir / "out.safetensors");
    const auto raw_half = f.raw("half.weight");
    const std::uint16_t want_half[] = {0x2E66, 0x7BFF, 0x0002, 0x81F7, 0x3C00, 0x7C00};
    const std::uint16_t want_bf16[] = {0x3DCD, 0x4780, 0x33D7, 0xB7FC, 0x3F80, 0x4780};
    const auto raw_bf16 = f.raw("bf16.weight");
    for (std::size_t i = 0; i < 6; ++i) {
      CHECK((raw_half[2 * i] | raw_half[2 * i + 1] << 8) == want_half[i]);
      CHECK((raw_bf16[2 * i] | raw_bf16[2 * i + 1] << 8) == want_bf16[i]);
    }
    CHECK(f.info("step").shape.empty());
    CHECK(f.load_ids("step") == std::vector<std::int64_t>{1234});
  }
  SECTION("golden files written by transformers' tests (I64 and F32, long names)") {
    for (const char* model : {"lm_llama", "lm_qwen2"}) {
      const fs::path golden = fs::path(SKILLGRAFT_TEST_DATA) / model / "golden.safetensors";
      io::safetensors_file f(golden);
      io::safetensors_writer w;
      for (const auto& [k, v] : f.metadata()) w.set_metadata(k, v);
      std::vector<sg::cpu::tensor<float>> floats;
      floats.reserve(f.header().tensors.size());
      for (const auto& t : f.header().tensors) {
        if (t.type == io::dtype::i64) {
          w.add_ids(t.name, f.load_ids(t.name), t.shape);
        } else {
          floats.push_back(f.load<float>(t.name));
          w.add(t.name, floats.back());
        }
      }
      w.write(dir / "golden.safetensors");
      CHECK(read_bytes(dir / "golden.safetensors") == read_bytes(golden));
    }
  }
}

TEST_CASE("the writer matches the byte strings in Hugging Face's own unit tests") {
  // From safetensors/src/tensor.rs: test_empty, test_serialization, test_serialization_forced_alignement.
  temp_dir dir;
  {
    io::safetensors_writer w;
    w.write(dir / "empty.safetensors");
    CHECK(read_bytes(dir / "empty.safetensors") ==
          std::vector<std::uint8_t>{8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32});
  }
  {
    io::safetensors_writer w;
    w.set_metadata("framework", "pt");
    w.write(dir / "meta.safetensors");
    CHECK(read_bytes(dir / "meta.safetensors") ==
          std::vector<std::uint8_t>{40,  0,   0,   0,   0,   0,   0,   0,   123, 34,  95,  95,  109, 101, 116, 97,
                                    100, 97,  116, 97,  95,  95,  34,  58,  123, 34,  102, 114, 97,  109, 101, 119,
                                    111, 114, 107, 34,  58,  34,  112, 116, 34,  125, 125, 32,  32,  32,  32,  32});
  }
  const std::vector<std::uint8_t> data = {0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64};
  {
    const auto t = make_tensor<float>({1, 2, 3}, {0, 1, 2, 3, 4, 5});
    io::safetensors_writer w;
    w.add("attn.0", t);
    w.write(dir / "attn.safetensors");
    std::vector<std::uint8_t> want = image(R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})");
    want.insert(want.end(), data.begin(), data.end());
    REQUIRE(want.size() == 8 + 64 + 24);
    CHECK(read_bytes(dir / "attn.safetensors") == want);
  }
  {
    const auto t = make_tensor<float>({1, 1, 2, 3}, {0, 1, 2, 3, 4, 5});
    io::safetensors_writer w;
    w.add("attn0", t);
    w.write(dir / "attn0.safetensors");
    // Header padded with 7 spaces to 72 bytes, so the F32 data starts 8-aligned.
    std::vector<std::uint8_t> want =
        image(R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}}       )");
    want.insert(want.end(), data.begin(), data.end());
    REQUIRE(want.size() == 8 + 72 + 24);
    CHECK(read_bytes(dir / "attn0.safetensors") == want);
  }
}

TEST_CASE("F32 and BF16 round trips") {
  temp_dir dir;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> values = {0.0f, -0.0f, 1.0f, -2.5f, 1e-40f, 3.4e38f, inf, -inf,
                               1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 3.14159265f, 65519.0f};
  for (int i = 0; values.size() < 3 * 4 * 5; ++i) values.push_back(std::sin(0.37f * static_cast<float>(i)) * 1e3f);
  const auto t = make_tensor<float>({3, 4, 5}, values);
  const auto d = make_tensor<double>({60}, std::vector<double>(values.begin(), values.end()));
  io::safetensors_writer w;
  w.add("f32", t);
  w.add("bf16", t, io::dtype::bf16);
  w.add("f16", t, io::dtype::f16);
  w.add("from_double_f32", d);
  w.add("from_double_bf16", d, io::dtype::bf16);
  w.write(dir / "rt.safetensors");

  io::safetensors_file f(dir / "rt.safetensors");
  CHECK(f.info("bf16").type == io::dtype::bf16);
  CHECK(f.info("bf16").shape == std::vector<std::size_t>{3, 4, 5});
  const auto f32 = f.load<float>("f32", sg::memory_use::weights);
  CHECK(f32.shape() == t.shape());
  CHECK(f32.use() == sg::memory_use::weights);
  for (std::size_t i = 0; i < t.size(); ++i) CHECK(bits(f32[i]) == bits(t[i]));
  const auto f32d = f.load<double>("f32");
  for (std::size_t i = 0; i < t.size(); ++i) CHECK(f32d[i] == static_cast<double>(t[i]));

  const auto bf = f.load<float>("bf16");
  const auto bfd = f.load<float>("from_double_bf16");
  for (std::size_t i = 0; i < t.size(); ++i) {
    CHECK(bits(bf[i]) == std::uint32_t{io::float_to_bfloat16(t[i])} << 16);
    CHECK(bits(bfd[i]) == bits(bf[i]));  // float values are doubles exactly: one rounding either way
  }
  // Hand-computed: ties go to even, the rest to nearest.
  CHECK(bf[8] == 1.0f);               // 1 + 2^-8: tie between 1 and 1 + 2^-7
  CHECK(bf[9] == 1.015625f);          // 1 + 3 * 2^-8: tie, even is 1 + 2^-6
  CHECK(bf[10] == 3.140625f);
  CHECK(bf[11] == 65536.0f);
  CHECK(bf[4] == 0x1p-133f);          // 1e-40 = 0x000116C2: 1.09 units of 2^-133
  CHECK(bf[5] == inf);                // 3.4e38 = 0x7F7FC99E: rounds past the largest finite 0x7F7F
  CHECK(bf[6] == inf);
  const auto half = f.load<float>("f16");
  CHECK(half[2] == 1.0f);
  CHECK(half[5] == inf);              // beyond F16's range
  CHECK(half[11] == 65504.0f);
  const auto dd = f.load<double>("from_double_f32");
  for (std::size_t i = 0; i < t.size(); ++i) CHECK(dd[i] == static_cast<double>(static_cast<float>(d[i])));
}

TEST_CASE("metadata round trip") {
  temp_dir dir;
  io::safetensors_writer w;
  w.set_metadata("format", "pt");
  w.set_metadata("note", "quotes \" backslash \\ newline \n tab \t bell \x07 \xC3\xA9 \xF0\x9F\x98\x80 /");
  w.set_metadata("controls", "\b\f\r\x1F\x7F");
  w.set_metadata("", "");
  w.set_metadata("format", "skillgraft");  // set again: replaced
  w.write(dir / "meta.safetensors");
  io::safetensors_file f(dir / "meta.safetensors");
  CHECK(f.metadata() == std::map<std::string, std::string>{
                            {"", ""},
                            {"controls", "\b\f\r\x1F\x7F"},
                            {"format", "skillgraft"},
                            {"note", "quotes \" backslash \\ newline \n tab \t bell \x07 \xC3\xA9 \xF0\x9F\x98\x80 /"}});
  CHECK(f.header().tensors.empty());
  // serde_json's escaping: short forms where JSON has them, \u00XX otherwise.
  const auto bytes = read_bytes(dir / "meta.safetensors");
  const std::string header(bytes.begin() + 8, bytes.end());
  CHECK_THAT(header, Contains(R"("note":"quotes \" backslash \\ newline \n tab \t bell \u0007 )"));
  CHECK_THAT(header, Contains("\"controls\":\"\\b\\f\\r\\u001f\x7F\""));
  CHECK(header.size() % 8 == 0);
  CHECK_THROWS_WITH(w.set_metadata("bad\xFF", "x"), "skillgraft: safetensors metadata must be UTF-8 (key bad\\xff)");
}

TEST_CASE("scalars and zero-size tensors survive a round trip") {
  temp_dir dir;
  const auto empty = sg::cpu::tensor<float>({0, 4}, sg::memory_use::workspace);
  io::safetensors_writer w;
  w.add("empty", empty, io::dtype::bf16);
  w.add_ids("scalar", {-7}, {});
  w.add_ids("none", {}, {3, 0});
  w.write(dir / "s.safetensors");
  io::safetensors_file f(dir / "s.safetensors");
  CHECK(f.info("empty").shape == std::vector<std::size_t>{0, 4});
  CHECK(f.load<float>("empty").shape() == sg::cpu::shape_t{0, 4});
  CHECK(f.info("scalar").shape.empty());
  const auto s = f.load<std::int64_t>("scalar");
  CHECK(s.shape() == sg::cpu::shape_t{1});
  CHECK(s[0] == -7);
  CHECK(f.load_ids("none").empty());
}

TEST_CASE("the writer rejects what it cannot write") {
  const auto t = make_tensor<float>({2}, {1, 2});
  io::safetensors_writer w;
  w.add("w", t);
  CHECK_THROWS_WITH(w.add("w", t), "skillgraft: the writer already has a tensor named w");
  CHECK_THROWS_WITH(w.add("__metadata__", t), "skillgraft: __metadata__ is reserved and cannot name a tensor");
  CHECK_THROWS_WITH(w.add("x", t, io::dtype::i32),
                    "skillgraft: cannot write x as I32; tensors are written as F32, F64, F16 or BF16");
  const sg::cpu::tensor<float> absent;
  CHECK_THROWS_WITH(w.add("y", absent),
                    "skillgraft: cannot write y: the tensor is empty (rank 0)");
  CHECK_THROWS_WITH(w.add_ids("ids", {1, 2, 3}, {2, 2}),
                    "skillgraft: ids has 3 ids, but shape [2, 2] holds 4");
  CHECK_THROWS_WITH(w.add("bad\xC3", t), "skillgraft: tensor names must be UTF-8");
  CHECK(w.size() == 1);
}

// The writer keeps references: a temporary tensor must not compile.
template <class W, class T>
constexpr bool can_add = requires(W w, T t) { w.add(std::string("x"), std::move(t)); };
template <class W, class T>
constexpr bool can_add_lvalue = requires(W w, const T& t) { w.add(std::string("x"), t); };
static_assert(!can_add<io::safetensors_writer, sg::cpu::tensor<float>>);
static_assert(can_add_lvalue<io::safetensors_writer, sg::cpu::tensor<float>>);

// ---- atomic replacement ---------------------------------------------------------------

TEST_CASE("a failed write keeps the previous file byte-identical and leaves no temporary") {
  temp_dir dir;
  const fs::path target = dir / "ckpt.safetensors";
  const auto first = make_tensor<float>({4}, {1, 2, 3, 4});
  {
    io::safetensors_writer w;
    w.add("w", first);
    w.write(target);
  }
  const auto before = read_bytes(target);
  REQUIRE(before.size() > 16);
  REQUIRE(dir.names() == std::vector<std::string>{"ckpt.safetensors"});

  // A big second checkpoint, so failures can happen after bytes reached the disk.
  auto big = sg::cpu::tensor<float>({256, 1024}, sg::memory_use::workspace);
  big.fill(0.5f);
  auto later = make_tensor<float>({2}, {5, 6});

  SECTION("a tensor that changed shape after add() throws mid-way") {
    io::safetensors_writer w;
    w.add("a.big", big);  // written first (larger dtype rank, then name order: a.big < z)
    w.add("z", later);
    later = make_tensor<float>({3}, {5, 6, 7});
    CHECK_THROWS_WITH(w.write(target), "skillgraft: z changed shape from [2] to [3] between add() and write() "
                                       "(writing " + target.string() + "; it was left unchanged)");
  }
  SECTION("the file size limit is hit in the middle of the data") {
    io::safetensors_writer w;
    w.add("a.big", big);
    struct rlimit old {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    struct rlimit small = old;
    small.rlim_cur = 64 * 1024;  // the data is 1 MiB
    auto* old_handler = ::signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of being killed
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    std::string message;
    try {
      w.write(target);
    } catch (const std::system_error& e) {
      message = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    ::signal(SIGXFSZ, old_handler);
    CHECK_THAT(message, Contains("skillgraft: cannot write " + target.string() + ": cannot write " +
                                 target.string() + ".tmp-"));
    CHECK_THAT(message, Contains("File too large"));
  }
  SECTION("the target is a directory, so the final rename fails") {
    const fs::path as_dir = dir / "subdir.safetensors";
    fs::create_directory(as_dir);
    io::safetensors_writer w;
    w.add("w", later);
    CHECK_THROWS_WITH(w.write(as_dir), Contains("cannot rename"));
    CHECK(fs::is_directory(as_dir));
    CHECK(fs::is_empty(as_dir));
    fs::remove(as_dir);
  }
  SECTION("the target's directory does not exist") {
    io::safetensors_writer w;
    w.add("w", later);
    const fs::path nowhere = dir / "no" / "such" / "dir.safetensors";
    CHECK_THROWS_WITH(w.write(nowhere), "skillgraft: cannot write " + nowhere.string() +
                                            ": cannot create temporary file " + nowhere.string() + ".tmp-" +
                                            std::to_string(::getpid()) + ": No such file or directory");
  }
  SECTION("the directory is not writable (skipped as root, who may write anyway)") {
    if (::geteuid() == 0) {
      WARN("running as root: permission bits do not stop writes, case skipped");
    } else {
      fs::permissions(dir.path, fs::perms::owner_read | fs::perms::owner_exec);
      io::safetensors_writer w;
      w.add("w", later);
      CHECK_THROWS_WITH(w.write(target), Contains("Permission denied"));
      fs::permissions(dir.path, fs::perms::owner_all);
    }
  }
  CHECK(read_bytes(target) == before);
  CHECK(dir.names() == std::vector<std::string>{"ckpt.safetensors"});
  io::safetensors_file still(target);
  CHECK(still.load<float>("w")[3] == 4.0f);
}

TEST_CASE("a successful write replaces the file, while readers of the old file keep its contents") {
  temp_dir dir;
  const fs::path target = dir / "ckpt.safetensors";
  const auto v1 = make_tensor<float>({3}, {1, 2, 3});
  const auto v2 = make_tensor<float>({2, 2}, {9, 8, 7, 6});
  io::safetensors_writer w1;
  w1.add("w", v1);
  w1.write(target);
  io::safetensors_file old(target);  // mapped: the rename must not disturb it

  io::safetensors_writer w2;
  w2.add("w", v2);
  w2.add_ids("step", {2}, {});
  w2.write(target);
  CHECK(dir.names() == std::vector<std::string>{"ckpt.safetensors"});

  io::safetensors_file now(target);
  CHECK(now.load<float>("w").shape() == sg::cpu::shape_t{2, 2});
  CHECK(now.load_ids("step") == std::vector<std::int64_t>{2});
  const auto old_w = old.load<float>("w");
  CHECK(old_w.shape() == sg::cpu::shape_t{3});
  CHECK(old_w[2] == 3.0f);
  CHECK_FALSE(old.contains("step"));
}
