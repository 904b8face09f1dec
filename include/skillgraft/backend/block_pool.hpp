#pragma once
// A caching pool of memory blocks, shared by the backends' memory policies.
//
// Why: a training step allocates the same shapes every time. Handing each freed block back to
// the system makes the next step pay for it again: on the GPU cudaMalloc/cudaFree synchronise
// the device; on the CPU glibc returns large blocks to the kernel (munmap, heap trimming), so
// every step page-faults its activations in afresh, one zeroed page at a time, on one thread
// while the others wait (docs/performance.md measured ~20 % of a CPU step). Freed blocks are
// parked by size and the next request of that size takes one back.
//
// `Raw` says where blocks come from:
//   static void* allocate(std::size_t bytes, const char* what)   throws on failure
//   static void free(void* p, std::size_t bytes) noexcept
//   static bool out_of_memory(const std::exception&)              a failure worth a retry
//
// The pool holds little more than the most its blocks were ever in use at once: a block that
// would take `reserved()` above that high-water mark (plus the headroom below) makes the
// longest-parked blocks go back first. A workload whose shapes change (generation, evaluation
// at other lengths) does not pin memory for shapes that never return.
//
// Headroom: blocks are kept by size, so the high-water mark alone is not always enough for a
// step to be served from parked blocks. When a step's peak is reached twice with different
// sizes in use (the forward's activations, then the backward's gradients), the sizes parked at
// one peak are evicted to make room for the other's, and asked for again next step: a training
// step of the reference trunk went to the system 8-32 times per step that way, each a fresh
// zeroed mapping. So a miss for a size the pool evicted earlier (the workload came back to it)
// raises the headroom by that size, up to an eighth of the high-water mark; sizes that never
// return never raise it, nor do evictions the cache limit forced. `set_cache_limit` bounds the
// parked bytes further; `release_cached` frees them and forgets the headroom. When an
// allocation fails for lack of memory, every parked block is freed (the headroom with them)
// and it is retried once; a failed allocation changes neither the mark nor the headroom.
//
// Threads: every member takes the pool's lock; the statistics are each one consistent value.
//
// Parked blocks are not in the byte ledger (memory.hpp counts what tensors hold); `reserved()`
// counts both, and is what the process or device really holds through the pool.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace skillgraft {

template <class Raw>
class block_pool {
 public:
  // Requests are rounded up to a multiple of `granularity` so that nearly equal sizes share
  // blocks.
  explicit block_pool(std::size_t granularity) : granularity_(granularity) {}
  block_pool(const block_pool&) = delete;
  block_pool& operator=(const block_pool&) = delete;
  ~block_pool() {
    for (auto& [size, blocks] : parked_)
      for (const parked& b : blocks) Raw::free(b.p, size);
  }

  std::size_t rounded(std::size_t bytes) const { return (bytes + granularity_ - 1) / granularity_ * granularity_; }

  void* allocate(std::size_t bytes, const char* what) {
    const std::size_t n = rounded(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = parked_.find(n);
    if (it != parked_.end() && !it->second.empty()) {
      void* p = it->second.back().p;
      it->second.pop_back();
      cached_ -= n;
      ++hits_;
      peak_in_use_ = std::max(peak_in_use_, reserved_ - cached_);
      return p;
    }
    ++misses_;
    // The mark and the headroom this request would set; kept only if the allocation succeeds.
    const std::size_t peak_in_use = std::max(peak_in_use_, reserved_ - cached_ + n);
    const bool returning = evicted_.count(n) != 0;  // a size evicted earlier came back
    const std::size_t headroom = returning ? std::min(headroom_ + n, peak_in_use / 8) : headroom_;
    // Make room first, so that the process never holds the new block and the old ones at once.
    while (reserved_ + n > peak_in_use + headroom && cached_ > 0) evict_oldest_locked(true);
    void* p = nullptr;
    bool pressure = false;
    try {
      p = Raw::allocate(n, what);
    } catch (const std::exception& e) {
      if (!Raw::out_of_memory(e) || cached_ == 0) throw;
      release_cached_locked();  // out of memory with blocks parked: give them back and retry once
      pressure = true;          // and keep no headroom
      p = Raw::allocate(n, what);
    }
    if (returning && !pressure) {
      // Looked up again: the evictions above may have rehashed the map, or cleared it when full
      // (then there is nothing to count down). They cannot have added size n: a parked block of
      // that size would have been a hit.
      if (auto e = evicted_.find(n); e != evicted_.end() && --e->second == 0) evicted_.erase(e);
      headroom_ = headroom;
    }
    reserved_ += n;
    peak_in_use_ = peak_in_use;
    peak_reserved_ = std::max(peak_reserved_, reserved_);
    return p;
  }

  void deallocate(void* p, std::size_t bytes) {
    if (!p) return;
    const std::size_t n = rounded(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    if (n > limit_) {  // could never be parked
      free_locked(p, n);
      return;
    }
    while (cached_ + n > limit_) evict_oldest_locked(false);
    parked_[n].push_back({p, ++clock_});
    cached_ += n;
  }

  // Frees every parked block, and forgets the headroom: the pool holds no more than the
  // high-water mark again until churn returns.
  void release_cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cached_locked();
  }
  // The most bytes kept parked; lowering it frees the longest-parked blocks now.
  void set_cache_limit(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    while (cached_ > limit_) evict_oldest_locked(false);
  }
  std::size_t cache_limit() const { return locked(limit_); }

  // Bytes obtained through the pool (in use or parked), and their highest value. Each reads one
  // consistent value; two reads may straddle another thread's allocation.
  std::size_t reserved() const { return locked(reserved_); }
  std::size_t cached() const { return locked(cached_); }
  std::size_t peak_reserved() const { return locked(peak_reserved_); }
  std::size_t peak_in_use() const { return locked(peak_in_use_); }
  // What the pool may hold above peak_in_use() (see the headroom above).
  std::size_t headroom() const { return locked(headroom_); }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_reserved_ = reserved_;
  }
  // Requests served from a parked block, and requests that went to `Raw`.
  std::uint64_t hits() const { return locked(hits_); }
  std::uint64_t misses() const { return locked(misses_); }

 private:
  struct parked {
    void* p;
    std::uint64_t stamp;  // when it was parked: eviction frees the oldest first
  };

  void free_locked(void* p, std::size_t n) {
    Raw::free(p, n);
    reserved_ -= n;
  }
  template <class T>
  T locked(const T& field) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return field;
  }
  // Each size's list is in parking order, so its front is its oldest block. `churn`: evicted to
  // stay under the high-water mark, so a later miss on this size is churn (an eviction to obey
  // the cache limit is the user's choice, not the workload's). Sizes with nothing parked are
  // dropped on the way, so a workload of ever-new sizes does not make this scan grow.
  void evict_oldest_locked(bool churn) {
    auto oldest = parked_.end();
    for (auto it = parked_.begin(); it != parked_.end();) {
      if (it->second.empty()) {
        it = parked_.erase(it);
        continue;
      }
      if (oldest == parked_.end() || it->second.front().stamp < oldest->second.front().stamp) oldest = it;
      ++it;
    }
    if (oldest == parked_.end()) return;
    if (churn) {
      // Full of sizes that did not return (ever-new shapes): start over rather than stop
      // recording, so that churn beginning later is still seen.
      if (evicted_.size() >= max_evicted_sizes && !evicted_.count(oldest->first)) evicted_.clear();
      ++evicted_[oldest->first];
    }
    free_locked(oldest->second.front().p, oldest->first);
    oldest->second.erase(oldest->second.begin());
    cached_ -= oldest->first;
  }
  void release_cached_locked() {
    for (auto& [size, blocks] : parked_) {
      for (const parked& b : blocks) free_locked(b.p, size);
      blocks.clear();
    }
    cached_ = 0;
    headroom_ = 0;
    evicted_.clear();
  }

  std::size_t granularity_;
  std::size_t limit_ = std::numeric_limits<std::size_t>::max();
  mutable std::mutex mutex_;
  std::unordered_map<std::size_t, std::vector<parked>> parked_;
  // Sizes evicted to stay under the high-water mark, with how many times; a miss on one of them
  // means the workload came back to it (churn), and uses up one count. Bounded, so that a
  // workload of ever-new sizes does not grow it without end.
  static constexpr std::size_t max_evicted_sizes = 4096;
  std::unordered_map<std::size_t, std::size_t> evicted_;
  std::size_t reserved_ = 0, cached_ = 0, peak_reserved_ = 0, peak_in_use_ = 0, headroom_ = 0;
  std::uint64_t clock_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace skillgraft
