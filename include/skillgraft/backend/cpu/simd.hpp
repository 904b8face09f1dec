#pragma once
// A SIMD vector of float or double that an element functor's formula can be written over as
// well as over one scalar, so that the CPU index loops run optimizer kernels a whole packet at a
// time (Eigen's packets: AVX-512, AVX2 or SSE, whichever the build targets; no ISA is named).
//
// Why not leave it to the compiler: without -fno-math-errno, which a header-only library cannot
// impose on its users, GCC keeps a call to sqrtf for errno behind every square root and
// vectorises no loop that has one; AdamW's update then runs one element at a time, 4x slower
// than memory allows. Every operation here is one IEEE operation per lane (square root and
// division correctly rounded), so a lane's bits depend on its values only, never on where the
// packet lies in memory.
#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace skillgraft::cpu::simd {

template <class T>
struct vec {
  using packet = typename Eigen::internal::packet_traits<T>::type;
  static constexpr std::int64_t size = Eigen::internal::unpacket_traits<packet>::size;

  packet p;

  vec(packet x) requires(!std::is_same_v<packet, T>) : p(x) {}
  vec(T s) : p(Eigen::internal::pset1<packet>(s)) {}  // a constant of the formula, in every lane

  static vec load(const T* a) { return Eigen::internal::ploadu<packet>(a); }
  void store(T* a) const { Eigen::internal::pstoreu(a, p); }

  friend vec operator+(vec a, vec b) { return Eigen::internal::padd(a.p, b.p); }
  friend vec operator-(vec a, vec b) { return Eigen::internal::psub(a.p, b.p); }
  friend vec operator*(vec a, vec b) { return Eigen::internal::pmul(a.p, b.p); }
  friend vec operator/(vec a, vec b) { return Eigen::internal::pdiv(a.p, b.p); }
  friend vec operator-(vec a) { return Eigen::internal::pnegate(a.p); }
  friend vec sqrt_(vec a) { return Eigen::internal::psqrt(a.p); }
  friend vec abs_(vec a) { return Eigen::internal::pabs(a.p); }
  friend vec exp_(vec a) { return Eigen::internal::pexp(a.p); }  // within 1-2 ulp of expf
  // 0 in a lane that is finite, NaN in one that is infinite or NaN (inf * 0 is NaN): failure
  // flags that add up without a branch, tested once per block with any_flag.
  friend vec not_finite_flag(vec a) { return Eigen::internal::pmul(a.p, Eigen::internal::pzero(a.p)); }
  friend bool any_flag(vec flags) { return !(Eigen::internal::predux(flags.p) == T(0)); }
};

// True where the build has packets of T wider than one element.
template <class T>
inline constexpr bool vectorised = vec<T>::size > 1;

// A gate policy (nn/activation.hpp) whose formula also compiles over vec: it says so with
// packet_math = true (vec has exp and sqrt, not erf or atan).
template <class Act>
concept packet_gate = requires { requires Act::packet_math; };

// An element functor that also offers its formula on a packet (F::value_type is the element):
//   f.template lanes<V>(i)        does f(i) .. f(i + V::size - 1) at once;
//   f.template lanes_fail<V>(i)   for a predicate: 0 in each lane where it is false, NaN where true.
template <class F>
concept packet_kernel = vectorised<typename F::value_type> && requires(const F& f, std::int64_t i) {
  f.template lanes<vec<typename F::value_type>>(i);
};
template <class F>
concept packet_predicate = vectorised<typename F::value_type> && requires(const F& f, std::int64_t i) {
  { f.template lanes_fail<vec<typename F::value_type>>(i) } -> std::same_as<vec<typename F::value_type>>;
};

// body(in, out) for the packets of [0, n) in parallel, in[a] and out[b] pointing at one packet
// of each array: whole packets in place, the last partial one through zero-padded copies (an
// output is copied in as well, so it can also be read; a null array stays null).
template <class T, std::size_t In, std::size_t Out, class Body>
void for_each_packet(std::size_t n, const T* const (&in)[In], T* const (&out)[Out], Body body) {
  constexpr std::size_t w = std::size_t(simd::vec<T>::size);
  const std::size_t packets = n / w;
  const auto offset = [](auto* p, std::size_t i) { return p ? p + i : p; };
#pragma omp parallel for schedule(static) if (n > 32768)
  for (std::int64_t k = 0; k < std::int64_t(packets); ++k) {
    const std::size_t i = std::size_t(k) * w;
    const T* in_at[In];
    T* out_at[Out];
    for (std::size_t a = 0; a < In; ++a) in_at[a] = offset(in[a], i);
    for (std::size_t b = 0; b < Out; ++b) out_at[b] = offset(out[b], i);
    body(in_at, out_at);
  }
  const std::size_t i = packets * w;
  if (i == n) return;
  T in_pad[In][w] = {}, out_pad[Out][w] = {};
  const T* in_at[In];
  T* out_at[Out];
  for (std::size_t a = 0; a < In; ++a) {
    in_at[a] = in[a] ? in_pad[a] : nullptr;
    if (in[a]) std::copy(in[a] + i, in[a] + n, in_pad[a]);
  }
  for (std::size_t b = 0; b < Out; ++b) {
    out_at[b] = out[b] ? out_pad[b] : nullptr;
    if (out[b]) std::copy(out[b] + i, out[b] + n, out_pad[b]);
  }
  body(in_at, out_at);
  for (std::size_t b = 0; b < Out; ++b)
    if (out[b]) std::copy(out_pad[b], out_pad[b] + (n - i), out[b] + i);
}

}  // namespace skillgraft::cpu::simd
