#pragma once
// What every communicator of skillgraft/dist does while it waits for the other ranks: poll the
// exchange until it is done, and after the deadline throw peer_timeout (a rank died, hangs, or
// fell far behind), so that the ranks still alive stop with a message instead of waiting forever.
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

namespace skillgraft::dist {

class peer_timeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Polls done() (which may throw the transport's own errors) until it returns true. After
// `timeout`, calls give_up() (the transport marks itself failed, aborts what it can) and
// throws peer_timeout naming the rank and the exchange. Spins first, since the ranks of a step
// usually arrive within microseconds of each other, then sleeps between polls so as not to
// take a core from ranks still computing.
template <class Done, class GiveUp>
void wait_for_peers(Done&& done, GiveUp&& give_up, std::chrono::milliseconds timeout, int rank, int size,
                    const std::string& what) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (long polls = 0;; ++polls) {
    if (done()) return;
    if (clock::now() - start > timeout) {
      give_up();
      throw peer_timeout("skillgraft: rank " + std::to_string(rank) + " of " + std::to_string(size) +
                         ": no answer from the other ranks for " + std::to_string(timeout.count()) + " ms in " + what +
                         "; a rank has died, stopped or fallen far behind. End every rank (under MPI: "
                         "dist::mpi_environment::abort)");
    }
    if (polls > 2000) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

}  // namespace skillgraft::dist
