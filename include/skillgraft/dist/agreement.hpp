#pragma once
// What ranks must share before and around data-parallel training, for any communicator with
// broadcast(std::span<std::byte>, what) from rank 0 and max(std::uint64_t, what):
//
//   check_agreement(comm, recipe_name, w)   the same recipe and bit-identical weights on every
//                                           rank, or every rank throws std::invalid_argument
//   on_rank0(comm, what, f)                 f runs on rank 0 only (a checkpoint write); every
//                                           rank returns when it is done, or throws its error
//
// Ranks that start apart never meet again: the same gradient applied to different weights
// (another checkpoint, another seed) gives two models, and nothing in a step would notice.
// The check compares a checksum of every parameter (names, shapes and bytes in checkpoint
// order, FNV-1a 64) and the recipe's name; a max-reduction of the mismatch flags makes every
// rank throw together, so no rank walks on into the first step alone.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include "skillgraft/model/parameters.hpp"

namespace skillgraft::dist {

namespace detail {
struct fnv1a {
  std::uint64_t h = 1469598103934665603ull;
  void add(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  void add(std::string_view s) {
    const std::uint64_t n = s.size();
    add(&n, sizeof n);
    add(s.data(), s.size());
  }
};

inline std::string hex(std::uint64_t x) {
  char b[24];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(x));
  return b;
}

// Rank 0's string on every rank: its length, then its bytes.
template <class Comm>
std::string broadcast_string(Comm& comm, std::string s, const std::string& what) {
  std::uint64_t n = s.size();
  comm.broadcast(std::as_writable_bytes(std::span(&n, 1)), what);
  s.resize(std::size_t(n));
  if (n) comm.broadcast(std::as_writable_bytes(std::span(s.data(), s.size())), what);
  return s;
}
template <class Comm>
std::uint64_t broadcast_value(Comm& comm, std::uint64_t x, const std::string& what) {
  comm.broadcast(std::as_writable_bytes(std::span(&x, 1)), what);
  return x;
}
}  // namespace detail

// Checksum of every parameter of a decoder LM's weights (any backend: device tensors are
// copied to the host one at a time), names and shapes included.
template <class T, class Backend>
std::uint64_t weights_checksum(const model::lm_weights<T, Backend>& w) {
  detail::fnv1a f;
  model::for_each_parameter(w, [&](const std::string& name, const auto& t, auto, int) {
    f.add(name);
    const auto& shape = t.shape();
    for (int i = 0; i < shape.rank; ++i) {
      const std::uint64_t d = shape[i];
      f.add(&d, sizeof d);
    }
    if constexpr (std::is_same_v<Backend, backend::cpu>) {
      f.add(t.data(), t.size() * sizeof(T));
    } else {
      cpu::tensor<T> host(t.shape(), memory_use::workspace);
      Backend::download(t, host);
      f.add(host.data(), host.size() * sizeof(T));
    }
  });
  return f.h;
}

template <class Comm, class T, class Backend>
void check_agreement(Comm& comm, std::string_view recipe_name, const model::lm_weights<T, Backend>& w) {
  const std::string mine(recipe_name);
  const std::uint64_t sum = weights_checksum(w);
  const std::string theirs = detail::broadcast_string(comm, mine, "the start-up check of the recipe name");
  const std::uint64_t their_sum = detail::broadcast_value(comm, sum, "the start-up check of the weights");
  // The highest rank that differs (+1; 0: none), so that every rank can name one.
  const std::uint64_t bad_recipe = comm.max(theirs != mine ? std::uint64_t(comm.rank()) + 1 : 0,
                                            "the start-up check of the recipe name");
  const std::uint64_t bad_weights = comm.max(their_sum != sum ? std::uint64_t(comm.rank()) + 1 : 0,
                                             "the start-up check of the weights");
  const std::string me = "rank " + std::to_string(comm.rank()) + ": ";
  if (bad_recipe) {
    if (theirs != mine)
      throw std::invalid_argument("skillgraft: " + me + "the recipe is '" + mine + "', rank 0's is '" + theirs +
                                  "': every rank must train the same recipe");
    throw std::invalid_argument("skillgraft: " + me + "rank " + std::to_string(bad_recipe - 1) +
                                " trains another recipe than rank 0's '" + theirs +
                                "': every rank must train the same recipe");
  }
  if (bad_weights) {
    if (their_sum != sum)
      throw std::invalid_argument("skillgraft: " + me + "the weights' checksum is " + detail::hex(sum) +
                                  ", rank 0's is " + detail::hex(their_sum) +
                                  ": every rank must start from the same weights (the same checkpoint, seed and "
                                  "recipe's adapters)");
    throw std::invalid_argument("skillgraft: " + me + "rank " + std::to_string(bad_weights - 1) +
                                " starts from other weights than rank 0 (checksum " + detail::hex(sum) +
                                "): every rank must start from the same weights");
  }
}

// Runs f on rank 0 (a checkpoint write: one writer, one file); the other ranks wait for it
// and every rank throws std::runtime_error with rank 0's message if f threw. A rank that
// resumes reads what rank 0 wrote, so f must have finished before any rank goes on.
template <class Comm, class F>
void on_rank0(Comm& comm, const std::string& what, F&& f) {
  std::string error;
  if (comm.rank() == 0) {
    try {
      f();
    } catch (const std::exception& e) {
      error = e.what();
      if (error.empty()) error = "an exception without a message";
    }
  }
  error = detail::broadcast_string(comm, error, "waiting for rank 0: " + what);
  if (!error.empty())
    throw std::runtime_error("skillgraft: rank " + std::to_string(comm.rank()) + ": rank 0 failed in " + what + ": " +
                             error);
}

}  // namespace skillgraft::dist
