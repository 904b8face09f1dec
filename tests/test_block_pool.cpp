// The caching pool behind both backends' tensors (backend/block_pool.hpp): blocks come back by
// size, the pool holds no more than its high-water mark of bytes in use plus a headroom that only
// sizes coming back after an eviction raise (to an eighth of the mark at most), a changing workload
// evicts the longest-parked blocks, and running out of memory frees the parked ones and retries.
#include <catch2/catch.hpp>

#include <cstddef>
#include <map>
#include <new>
#include <stdexcept>
#include <vector>

#include "skillgraft/backend/block_pool.hpp"
#include "skillgraft/backend/cpu/backend.hpp"

namespace {

// A source of blocks that counts what it hands out and can be told to run out.
struct counted_raw {
  static inline std::size_t live = 0, allocations = 0, frees = 0, budget = std::size_t(-1);
  static inline std::map<void*, std::size_t> blocks;
  static void reset() {
    live = allocations = frees = 0;
    budget = std::size_t(-1);
    blocks.clear();
  }
  static void* allocate(std::size_t n, const char*) {
    if (live + n > budget) throw std::bad_alloc();
    void* p = ::operator new(n);
    blocks[p] = n;
    live += n;
    ++allocations;
    return p;
  }
  static void free(void* p, std::size_t n) noexcept {
    live -= n;
    ++frees;
    blocks.erase(p);
    ::operator delete(p);
  }
  static bool out_of_memory(const std::exception& e) { return dynamic_cast<const std::bad_alloc*>(&e) != nullptr; }
};

using pool_t = skillgraft::block_pool<counted_raw>;

}  // namespace

TEST_CASE("block pool: a repeated pattern of allocations is served from parked blocks", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(64);
  const std::vector<std::size_t> step{6000, 1000, 6000, 300, 2048};  // one "training step"
  for (int round = 0; round < 4; ++round) {
    std::vector<void*> held;
    for (std::size_t n : step) held.push_back(pool.allocate(n, "test"));
    for (std::size_t i = 0; i < held.size(); ++i) pool.deallocate(held[i], step[i]);
  }
  CHECK(counted_raw::allocations == step.size());  // only the first round asked the source
  CHECK(pool.hits() == 3 * step.size());
  CHECK(pool.misses() == step.size());
  CHECK(pool.reserved() == counted_raw::live);
  CHECK(pool.cached() == pool.reserved());  // everything parked between rounds
  CHECK(pool.rounded(6000) == 6016);
  pool.release_cached();
  CHECK(counted_raw::live == 0);
  CHECK(pool.reserved() == 0);
}

TEST_CASE("block pool: reserved bytes never exceed the high-water mark of bytes in use", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  // Sizes change every round (generation at growing lengths): without eviction the parked
  // blocks of every earlier length would pile up.
  std::size_t peak_in_use = 0;
  for (std::size_t len = 1; len <= 50; ++len) {
    void* a = pool.allocate(1000 * len, "a");
    void* b = pool.allocate(10, "b");
    peak_in_use = std::max(peak_in_use, 1000 * len + 10);
    CHECK(pool.reserved() <= peak_in_use);
    CHECK(counted_raw::live == pool.reserved());
    pool.deallocate(a, 1000 * len);
    pool.deallocate(b, 10);
  }
  CHECK(pool.peak_in_use() == peak_in_use);
  CHECK(pool.peak_reserved() <= peak_in_use);
  CHECK(counted_raw::frees > 0);  // the longest-parked lengths went back
}

TEST_CASE("block pool: a step whose peaks hold different sizes stops going to the system", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  // Two peaks of 1000 bytes in use with different sizes: the weights' 800 with x and y, then
  // with y, z and w. At the high-water mark alone, the second peak evicts x's block to make
  // room for z and w, and the next step's first peak evicts theirs for x again, every step.
  const auto step = [&] {
    void* weights = pool.allocate(800, "weights");
    void* x = pool.allocate(100, "x");
    void* y = pool.allocate(100, "y");
    pool.deallocate(x, 100);
    void* z = pool.allocate(50, "z");
    void* w = pool.allocate(50, "w");
    pool.deallocate(y, 100);
    pool.deallocate(z, 50);
    pool.deallocate(w, 50);
    pool.deallocate(weights, 800);
  };
  step();
  step();
  const auto churn = pool.misses();
  CHECK(churn > 5);  // the second step went to the system again
  CHECK(pool.headroom() > 0);
  for (int i = 0; i < 3; ++i) step();
  const auto misses = pool.misses(), allocations = counted_raw::allocations;
  for (int i = 0; i < 10; ++i) step();
  CHECK(pool.misses() == misses);  // the steady state is served from parked blocks
  CHECK(counted_raw::allocations == allocations);
  CHECK(pool.peak_in_use() == 1000);
  CHECK(pool.headroom() <= pool.peak_in_use() / 8);
  CHECK(pool.peak_reserved() <= pool.peak_in_use() + pool.headroom());
  CHECK(counted_raw::live == pool.reserved());
}

TEST_CASE("block pool: the headroom stays within an eighth of the high-water mark", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  // Rounds alternate between two sets of sizes that each fill the peak: every size comes back
  // after its eviction, more than an eighth would be needed to keep both, and the pool still
  // never holds more than 9/8 of the peak.
  for (int round = 0; round < 40; ++round) {
    const std::vector<std::size_t> sizes =
        round % 2 ? std::vector<std::size_t>{250, 250, 250, 250} : std::vector<std::size_t>{500, 500};
    std::vector<void*> held;
    for (std::size_t n : sizes) held.push_back(pool.allocate(n, "block"));
    CHECK(pool.reserved() <= 1000 + 1000 / 8);
    for (std::size_t i = 0; i < sizes.size(); ++i) pool.deallocate(held[i], sizes[i]);
  }
  CHECK(pool.peak_in_use() == 1000);
  CHECK(pool.headroom() == 1000 / 8);
  CHECK(pool.peak_reserved() <= 1000 + 1000 / 8);
}

namespace {
// The two peaks of "a step whose peaks hold different sizes", scaled by `k`.
void two_peak_step(pool_t& pool, std::size_t k) {
  void* weights = pool.allocate(800 * k, "weights");
  void* x = pool.allocate(100 * k, "x");
  void* y = pool.allocate(100 * k, "y");
  pool.deallocate(x, 100 * k);
  void* z = pool.allocate(50 * k, "z");
  void* w = pool.allocate(50 * k, "w");
  pool.deallocate(y, 100 * k);
  pool.deallocate(z, 50 * k);
  pool.deallocate(w, 50 * k);
  pool.deallocate(weights, 800 * k);
}
}  // namespace

TEST_CASE("block pool: only evictions under the high-water mark count as churn", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  // Evictions the user asked for (a cache limit) raise no headroom when the size comes back.
  void* a = pool.allocate(100, "a");
  pool.deallocate(a, 100);
  pool.set_cache_limit(0);
  pool.set_cache_limit(std::size_t(-1));
  pool.deallocate(pool.allocate(100, "a again"), 100);
  CHECK(pool.headroom() == 0);
  // Real churn raises it; giving the parked blocks back forgets it.
  for (int i = 0; i < 4; ++i) two_peak_step(pool, 1);
  CHECK(pool.headroom() > 0);
  pool.release_cached();
  CHECK(pool.headroom() == 0);
  CHECK(counted_raw::live == 0);
  const auto misses = pool.misses();
  two_peak_step(pool, 1);  // after the release the pool holds the mark alone: churn again
  two_peak_step(pool, 1);
  CHECK(pool.misses() - misses > 5);
}

TEST_CASE("block pool: a failed allocation leaves the headroom and the mark as they were", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  pool.deallocate(pool.allocate(1000, "a"), 1000);
  void* b = pool.allocate(500, "b");  // evicts the parked 1000 to stay under the mark
  CHECK(counted_raw::live == 500);
  counted_raw::budget = 1000;
  CHECK_THROWS_AS(pool.allocate(1000, "a again"), std::bad_alloc);  // 500 + 1000 > 1000
  CHECK(pool.headroom() == 0);         // not raised for a block that never came
  CHECK(pool.peak_in_use() == 1000);   // nor the mark
  counted_raw::budget = std::size_t(-1);
  void* a = pool.allocate(1000, "a again");  // the evicted size returns: now it counts
  CHECK(pool.peak_in_use() == 1500);
  CHECK(pool.headroom() == 1500 / 8);
  pool.deallocate(a, 1000);
  pool.deallocate(b, 500);
}

TEST_CASE("block pool: churn is still seen after many sizes that never returned", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  // Generation at 5000 growing lengths: every length evicts the previous one's block, more
  // sizes than the pool remembers. Churn that starts afterwards must still raise the headroom.
  for (std::size_t len = 1; len <= 5000; ++len) pool.deallocate(pool.allocate(len, "token"), len);
  for (int i = 0; i < 4; ++i) two_peak_step(pool, 100);  // sizes it has not seen: 5000 and more
  CHECK(pool.headroom() > 0);
  const auto misses = pool.misses();
  for (int i = 0; i < 5; ++i) two_peak_step(pool, 100);
  CHECK(pool.misses() == misses);
}

TEST_CASE("block pool: a cache limit bounds the parked bytes, oldest first", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  void* a = pool.allocate(100, "a");
  void* b = pool.allocate(200, "b");
  void* c = pool.allocate(300, "c");
  pool.set_cache_limit(450);
  pool.deallocate(a, 100);
  pool.deallocate(b, 200);
  CHECK(pool.cached() == 300);
  pool.deallocate(c, 300);  // 600 > 450: a (parked first) and then b go back
  CHECK(pool.cached() == 300);
  CHECK(counted_raw::blocks.count(c) == 1);
  CHECK(counted_raw::blocks.count(a) == 0);
  CHECK(counted_raw::blocks.count(b) == 0);
  pool.set_cache_limit(0);
  CHECK(pool.cached() == 0);
  CHECK(counted_raw::live == 0);
  void* d = pool.allocate(50, "d");
  pool.deallocate(d, 50);  // larger than the limit: freed at once
  CHECK(counted_raw::live == 0);
}

TEST_CASE("block pool: out of memory frees the parked blocks and retries once", "[block_pool]") {
  counted_raw::reset();
  pool_t pool(1);
  void* a = pool.allocate(600, "a");
  pool.deallocate(a, 600);
  CHECK(pool.cached() == 600);
  counted_raw::budget = 1000;
  void* b = pool.allocate(500, "b");  // 600 + 500 > 1000: the parked 600 go back first
  CHECK(pool.cached() == 0);
  CHECK(counted_raw::live == 500);
  CHECK_THROWS_AS(pool.allocate(800, "c"), std::bad_alloc);  // nothing parked: the failure stands
  CHECK(pool.reserved() == 500);
  pool.deallocate(b, 500);
}

TEST_CASE("block pool: CPU tensors of 64 KiB and more come back from the pool zeroed", "[block_pool]") {
  using namespace skillgraft;
  auto& pool = cpu::host_pool();
  const std::size_t n = 300, d = 512;  // 600 KiB: pooled
  const void* first = nullptr;
  {
    cpu::tensor<float> t({n, d}, memory_use::workspace);
    t.fill(1.5f);
    first = t.data();
  }
  const auto hits = pool.hits();
  cpu::tensor<float> again({n, d}, memory_use::gradients);
  CHECK(pool.hits() == hits + 1);
  CHECK(static_cast<const void*>(again.data()) == first);  // the block just parked
  bool zero = true;
  for (std::size_t i = 0; i < again.size(); ++i) zero = zero && again[i] == 0.0f;
  CHECK(zero);  // a fresh gradient starts at zero, reused block or not
  {
    cpu::tensor<float> small({100}, memory_use::workspace);  // 400 bytes: malloc's, not the pool's
    CHECK(pool.hits() == hits + 1);
  }
}

TEST_CASE("block pool: CPU kernels give the same bits with and without parked blocks", "[block_pool]") {
  using namespace skillgraft;
  auto& pool = cpu::host_pool();
  const std::size_t n = 256, d = 512;
  auto step = [&] {
    cpu::tensor<float> x({n, d}, memory_use::workspace), w({d}, memory_use::weights);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 37 % 101) - 50) / 50.0f;
    for (std::size_t j = 0; j < d; ++j) w[j] = 1.0f + float(j % 7) / 10.0f;
    cpu::tensor<float> y({n, d}, memory_use::workspace), rstd({n}, memory_use::saved_activations);
    backend::cpu::rmsnorm_forward(w, x, 1e-6, y, &rstd);
    cpu::tensor<float> dw({d}, memory_use::gradients), dx({n, d}, memory_use::workspace);
    backend::cpu::rmsnorm_backward(w, x, rstd, y, &dw, &dx, true);  // accumulates into a fresh dx
    return std::vector<float>(dx.data(), dx.data() + dx.size());
  };
  const auto first = step();
  const auto misses = pool.misses();
  const auto second = step();
  CHECK(pool.misses() == misses);  // every pooled block parked by the first step
  pool.set_cache_limit(0);  // nothing parked: every block from the system
  const auto unpooled = step();
  pool.set_cache_limit(std::size_t(-1));
  CHECK(first == second);
  CHECK(first == unpooled);
}
