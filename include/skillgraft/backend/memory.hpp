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
  constants,          // rotary tables and similar precomputed inputs
  workspace,          // activations in flight, temporaries
  count_
};

inline constexpr std::array<std::string_view, static_cast<int>(memory_use::count_)> memory_use_names{
    "weights", "gradients", "optimizer_state", "saved_activations", "constants", "workspace"};

class memory_ledger {
 public:
  static memory_ledger& instance() {
    static memory_ledger ledger;
    return ledger;
  }
  void add(memory_use use, std::int64_t bytes) {
    auto& slot = slots_[static_cast<int>(use)];
    const std::int64_t now = slot.live.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    std::int64_t peak = slot.peak.load(std::memory_order_relaxed);
    while (now > peak && !slot.peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  std::int64_t live(memory_use use) const { return slots_[static_cast<int>(use)].live.load(); }
  std::int64_t peak(memory_use use) const { return slots_[static_cast<int>(use)].peak.load(); }
  std::int64_t live_total() const {
    std::int64_t t = 0;
    for (const auto& s : slots_) t += s.live.load();
    return t;
  }
  // Peaks restart from the current live bytes (for measuring one phase).
  void reset_peaks() {
    for (auto& s : slots_) s.peak.store(s.live.load());
  }

 private:
  struct slot {
    std::atomic<std::int64_t> live{0};
    std::atomic<std::int64_t> peak{0};
  };
  std::array<slot, static_cast<int>(memory_use::count_)> slots_{};
};

inline memory_ledger& ledger() { return memory_ledger::instance(); }

}  // namespace skillgraft
