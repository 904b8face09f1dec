#pragma once
// 16-bit floats as stored in checkpoints: IEEE binary16 ("half", F16) and bfloat16 (BF16).
//
// Widening (half or bfloat16 -> float or double) is exact for every bit pattern,
// subnormals, infinities and NaN payloads included. Narrowing rounds to nearest,
// ties to even (what hardware conversions and PyTorch's `.to(torch.bfloat16)` do),
// produces subnormals rather than flushing them, and overflows to infinity.
//
// Written out on bit patterns instead of using `_Float16` / `__bf16` because those
// depend on compiler and target, and a checkpoint must read the same everywhere.
// Narrowing a double goes straight to 16 bits: going through float first would
// round twice (1 + 2^-8 + 2^-40 would become bf16 1.0 instead of 1 + 2^-7).
#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>

namespace skillgraft::io {

namespace detail {

// An IEEE-754 style binary format: sign bit, `exp_bits` biased exponent bits,
// `mant_bits` stored mantissa bits (the leading 1 of normal numbers is implicit).
struct float_format {
  int exp_bits;
  int mant_bits;
  constexpr int bias() const { return (1 << (exp_bits - 1)) - 1; }
  constexpr std::uint64_t exp_all_ones() const { return (std::uint64_t{1} << exp_bits) - 1; }
};
inline constexpr float_format binary16{5, 10};
inline constexpr float_format bfloat16{8, 7};
inline constexpr float_format binary32{8, 23};
inline constexpr float_format binary64{11, 52};

// x / 2^shift rounded to the nearest integer, ties to even; 1 <= shift <= 63.
constexpr std::uint64_t shift_right_round_even(std::uint64_t x, int shift) {
  const std::uint64_t q = x >> shift;
  const std::uint64_t rest = x & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  return q + ((rest > half || (rest == half && (q & 1))) ? 1 : 0);
}

// Re-encodes a number given as the bits of format From in format To. Exact when
// To is wider; otherwise rounds to nearest even. One routine for all directions so
// that the rounding rule is written (and tested) once.
template <float_format From, float_format To>
constexpr std::uint64_t convert_float_bits(std::uint64_t bits) {
  constexpr int fm = From.mant_bits;
  constexpr int tm = To.mant_bits;
  const std::uint64_t sign = (bits >> (From.exp_bits + fm)) & 1;
  const std::uint64_t exp = (bits >> fm) & From.exp_all_ones();
  const std::uint64_t mant = bits & ((std::uint64_t{1} << fm) - 1);
  const std::uint64_t to_sign = sign << (To.exp_bits + tm);
  const std::uint64_t to_inf = To.exp_all_ones() << tm;

  if (exp == From.exp_all_ones()) {
    if (mant == 0) return to_sign | to_inf;
    // NaN: keep the leading payload bits (so widening then narrowing gives back the
    // same pattern); if none survive, set the quiet bit so the result stays a NaN.
    std::uint64_t payload = fm >= tm ? mant >> (fm - tm) : mant << (tm - fm);
    if (payload == 0) payload = std::uint64_t{1} << (tm - 1);
    return to_sign | to_inf | payload;
  }
  if (exp == 0 && mant == 0) return to_sign;

  // value = sig * 2^(e - fm), with sig's highest set bit at position p.
  const std::uint64_t sig = exp == 0 ? mant : (mant | (std::uint64_t{1} << fm));
  const int e = exp == 0 ? 1 - From.bias() : static_cast<int>(exp) - From.bias();
  const int p = static_cast<int>(std::bit_width(sig)) - 1;
  const int top = e - fm + p;  // value lies in [2^top, 2^(top+1))
  const int to_emin = 1 - To.bias();
  if (top > To.bias()) return to_sign | to_inf;

  // Count the value in units of the target's last place: 2^(top - tm) for a normal
  // result, 2^(emin - tm) for a subnormal one.
  const int unit = std::max(top, to_emin) - tm;
  const int shift = (e - fm) - unit;  // value / unit = sig * 2^shift
  std::uint64_t q = 0;
  if (shift >= 0)
    q = sig << shift;
  else if (-shift < 64)
    q = shift_right_round_even(sig, -shift);
  // (-shift >= 64: sig < 2^53 makes the value below 2^-11 units, which rounds to 0.)

  // Subnormal: q is the stored mantissa; rounding up to 2^tm gives exactly the
  // encoding of the smallest normal number.
  if (top < to_emin) return to_sign | q;
  // Normal: q in [2^tm, 2^(tm+1)] includes the implicit bit, which adds one to the
  // exponent field; a carry out of the mantissa moves to the next binade, and past
  // the largest finite number it lands on the infinity pattern.
  return to_sign | ((static_cast<std::uint64_t>(top - to_emin) << tm) + q);
}

}  // namespace detail

// Widening: exact.
inline float half_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(
      static_cast<std::uint32_t>(detail::convert_float_bits<detail::binary16, detail::binary32>(bits)));
}
inline double half_to_double(std::uint16_t bits) {
  return std::bit_cast<double>(detail::convert_float_bits<detail::binary16, detail::binary64>(bits));
}
// bfloat16 is the top half of a float, so widening is a shift.
inline float bfloat16_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}
inline double bfloat16_to_double(std::uint16_t bits) {
  return std::bit_cast<double>(detail::convert_float_bits<detail::bfloat16, detail::binary64>(bits));
}

// Narrowing: round to nearest, ties to even.
inline std::uint16_t float_to_half(float x) {
  return static_cast<std::uint16_t>(
      detail::convert_float_bits<detail::binary32, detail::binary16>(std::bit_cast<std::uint32_t>(x)));
}
inline std::uint16_t double_to_half(double x) {
  return static_cast<std::uint16_t>(
      detail::convert_float_bits<detail::binary64, detail::binary16>(std::bit_cast<std::uint64_t>(x)));
}
inline std::uint16_t float_to_bfloat16(float x) {
  return static_cast<std::uint16_t>(
      detail::convert_float_bits<detail::binary32, detail::bfloat16>(std::bit_cast<std::uint32_t>(x)));
}
inline std::uint16_t double_to_bfloat16(double x) {
  return static_cast<std::uint16_t>(
      detail::convert_float_bits<detail::binary64, detail::bfloat16>(std::bit_cast<std::uint64_t>(x)));
}

// The same, chosen by the floating-point type T (float or double).
template <class T>
  requires std::is_same_v<T, float> || std::is_same_v<T, double>
T half_to(std::uint16_t bits) {
  if constexpr (std::is_same_v<T, float>) return half_to_float(bits);
  else return half_to_double(bits);
}
template <class T>
  requires std::is_same_v<T, float> || std::is_same_v<T, double>
T bfloat16_to(std::uint16_t bits) {
  if constexpr (std::is_same_v<T, float>) return bfloat16_to_float(bits);
  else return bfloat16_to_double(bits);
}
inline std::uint16_t to_half(float x) { return float_to_half(x); }
inline std::uint16_t to_half(double x) { return double_to_half(x); }
inline std::uint16_t to_bfloat16(float x) { return float_to_bfloat16(x); }
inline std::uint16_t to_bfloat16(double x) { return double_to_bfloat16(x); }

}  // namespace skillgraft::io
