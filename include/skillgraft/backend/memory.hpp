#pragma once
// Byte accounting shared by every backend.
//
// Each buffer says what it is for when it is allocated; the ledger keeps the live
// and peak bytes per purpose. This is what lets `memory_report` (a model of what a
// recipe needs) be checked against what the code really holds.
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace skillgraft {

enum class memory_use : int {
  weights,            // parameters, trainable or frozen
  gradients,          // weight gradients (trainable tensors only)
  optimizer_state,    // e.g. AdamW moments (trainable tensors only)
  saved_activations,  // what forward keeps for backward
  method_state,       // continual-learning state: teacher copies, Fisher, adapters, averages
  constants,          // rotary tables and similar precomputed inputs
  workspace,          // activations in flight, temporaries
  count_
};

inline constexpr std::array<std::string_view, static_cast<int>(memory_use::count_)> memory_use_names{
    "weights", "gradients", "optimizer_state", "saved_activations", "method_state", "constants", "workspace"};

class memory_ledger {
 public:
  static memory_ledger& instance() {
    static memory_ledger ledger;
    return ledger;
  }
  void add(memory_use use, std::int64_t bytes) {
    raise(slots_[static_cast<int>(use)], bytes);
    raise(total_, bytes);
  }
  std::int64_t live(memory_use use) const { return slots_[static_cast<int>(use)].live.load(); }
  std::int64_t peak(memory_use use) const { return slots_[static_cast<int>(use)].peak.load(); }
  std::int64_t live_total() const { return total_.live.load(); }
  // Highest sum over all uses at any one time (not the sum of per-use peaks).
  std::int64_t peak_total() const { return total_.peak.load(); }
  // Peaks restart from the current live bytes (for measuring one phase).
  void reset_peaks() {
    for (auto& s : slots_) s.peak.store(s.live.load());
    total_.peak.store(total_.live.load());
  }

 private:
  struct slot {
    std::atomic<std::int64_t> live{0};
    std::atomic<std::int64_t> peak{0};
  };
  static void raise(slot& s, std::int64_t bytes) {
    const std::int64_t now = s.live.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    std::int64_t peak = s.peak.load(std::memory_order_relaxed);
    while (now > peak && !s.peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  std::array<slot, static_cast<int>(memory_use::count_)> slots_{};
  slot total_{};
};

inline memory_ledger& ledger() { return memory_ledger::instance(); }

}  // namespace skillgraft
