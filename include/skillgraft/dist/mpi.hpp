#pragma once
// Data-parallel training between CPU processes over MPI: the communicator policy of train_step
// (train/communicator.hpp) for the CPU backend. Only a program that includes this header needs
// MPI (mpi.h, -lmpi; CMake: MPI::MPI_CXX); the rest of the library does not.
//
//   int main(int argc, char** argv) {
//     sg::dist::mpi_environment mpi(argc, argv);            // MPI_Init_thread ... MPI_Finalize
//     sg::dist::mpi_communicator comm;                      // a copy of MPI_COMM_WORLD
//     sg::dist::check_agreement(comm, "sa_proj", w);        // dist/agreement.hpp
//     ... train_step(model, w, g, opt, schedule, my_share_of_the_batch, {}, {}, comm);
//   }
//   mpirun -np 4 ./train ...
//
// Every exchange is non-blocking underneath and waited for with a deadline (`timeout`): a rank
// that died or stopped answering makes the others throw dist::peer_timeout, which names the
// exchange, instead of hanging. After a timeout an exchange may still be pending, so the
// program must end every rank with mpi_environment::abort (the environment does this itself
// when it is destroyed after a failed exchange). mpirun also ends the job when a rank exits
// with an error; the deadline covers ranks that hang and launchers that do not.
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/cpu/backend.hpp"
#include "skillgraft/dist/peer_timeout.hpp"
#include "skillgraft/train/communicator.hpp"
#include "skillgraft/train/gradient_buckets.hpp"

namespace skillgraft::dist {

// MPI reported an error (a peer's connection broke, a bad argument).
class mpi_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
// Set once an exchange failed: MPI_Finalize could then wait for it forever.
inline bool& mpi_exchange_failed() {
  static bool failed = false;
  return failed;
}
inline void check_mpi(int code, const std::string& what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  mpi_exchange_failed() = true;
  throw mpi_error("skillgraft: MPI failed in " + what + ": " + std::string(text, std::size_t(len)));
}
template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return MPI_UINT64_T;
  else if constexpr (std::is_same_v<T, std::byte>) return MPI_BYTE;
  else static_assert(sizeof(T) == 0, "skillgraft: no MPI type for this element type");
}
}  // namespace detail

// MPI_Init_thread / MPI_Finalize for the life of main. OpenMP threads compute, only the main
// thread calls MPI (MPI_THREAD_FUNNELED). If MPI is already initialised, it is left alone.
class mpi_environment {
 public:
  mpi_environment(int& argc, char**& argv) {
    int ready = 0;
    MPI_Initialized(&ready);
    if (ready) return;
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      throw mpi_error("skillgraft: MPI_Init_thread failed");
    owner_ = true;
  }
  mpi_environment(const mpi_environment&) = delete;
  mpi_environment& operator=(const mpi_environment&) = delete;
  ~mpi_environment() {
    if (!owner_) return;
    int done = 0;
    MPI_Finalized(&done);
    if (done) return;
    if (detail::mpi_exchange_failed()) abort(1);  // a pending exchange would keep MPI_Finalize waiting
    MPI_Finalize();
  }
  // Ends every rank of the job (after an error on one of them).
  [[noreturn]] static void abort(int code) {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; this keeps [[noreturn]] true if it did
  }

 private:
  bool owner_ = false;
};

struct mpi_options {
  // How long a rank waits for the others in one exchange before throwing peer_timeout. It
  // must exceed the longest gap between ranks reaching a step's exchange (a slower rank's
  // forward and backward, a checkpoint rank 0 writes while the others wait).
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
  std::size_t bucket_bytes = std::size_t(25) << 20;  // as PyTorch DDP's default bucket
};

// Gradients: train::bucketed_gradients (reduce_gradients, start_reduction, last_reduction) over
// this transport. Schedule: when the buckets go (train/communicator.hpp); mpi_communicator
// overlaps them with backward, polling them with test() between layers, because Open MPI's
// non-blocking collectives move on only inside MPI calls (it starts no progress thread for them).
template <class Schedule = train::overlap_with_backward>
class basic_mpi_communicator
    : public train::bucketed_gradients<basic_mpi_communicator<Schedule>, backend::cpu, Schedule> {
 public:
  static constexpr bool distributed = true;
  using request = MPI_Request;

  explicit basic_mpi_communicator(mpi_options o = {}, MPI_Comm base = MPI_COMM_WORLD) : options_(o) {
    if (o.timeout.count() <= 0)
      throw std::invalid_argument("skillgraft: mpi_options.timeout must be positive (it is " +
                                  std::to_string(o.timeout.count()) + " ms)");
    if (o.bucket_bytes < sizeof(double) || o.bucket_bytes > std::size_t(INT_MAX))
      throw std::invalid_argument("skillgraft: mpi_options.bucket_bytes must hold a gradient element and be at most " +
                                  std::to_string(INT_MAX) + " (MPI counts in int); it is " +
                                  std::to_string(o.bucket_bytes));
    int ready = 0;
    MPI_Initialized(&ready);
    if (!ready) throw std::logic_error("skillgraft: mpi_communicator needs MPI initialised (dist::mpi_environment)");
    // A private copy: our exchanges never match a user's messages on the same communicator;
    // errors return codes (turned into exceptions) instead of ending the process silently.
    detail::check_mpi(MPI_Comm_dup(base, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  basic_mpi_communicator(const basic_mpi_communicator&) = delete;
  basic_mpi_communicator& operator=(const basic_mpi_communicator&) = delete;
  ~basic_mpi_communicator() {
    int done = 0;
    MPI_Finalized(&done);
    if (!done && !detail::mpi_exchange_failed()) MPI_Comm_free(&comm_);
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  // This rank's index among the ranks on its own machine: the GPU it takes, one rank per GPU.
  int local_rank() const {
    MPI_Comm node;
    detail::check_mpi(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node),
                      "MPI_Comm_split_type");
    int r = 0;
    MPI_Comm_rank(node, &r);
    MPI_Comm_free(&node);
    return r;
  }
  const mpi_options& options() const { return options_; }
  MPI_Comm handle() const { return comm_; }

  // Scalars summed over the ranks (every rank gets the sum).
  std::uint64_t sum(std::uint64_t x, const std::string& what = "the sum of the target counts") {
    return all_reduce(x, MPI_SUM, what);
  }
  double sum(double x) { return all_reduce(x, MPI_SUM, "the sum of the losses"); }
  std::uint64_t max(std::uint64_t x, const std::string& what) { return all_reduce(x, MPI_MAX, what); }

  // Rank 0's bytes into every rank's `data` (the same length on every rank).
  void broadcast(std::span<std::byte> data, const std::string& what) {
    if (data.size() > std::size_t(INT_MAX))
      throw std::invalid_argument("skillgraft: a broadcast of " + std::to_string(data.size()) +
                                  " bytes is more than MPI counts in int (" + what + ")");
    request r;
    detail::check_mpi(MPI_Ibcast(data.data(), int(data.size()), MPI_BYTE, 0, comm_, &r), what);
    wait(r, what);
  }

  // The transport of reduce_in_buckets.
  template <class T>
  T* staging(int slot, std::size_t elements) {
    auto& b = staging_[slot];
    if (b.size() < elements * sizeof(T)) b.assign(elements * sizeof(T), std::byte{});
    return reinterpret_cast<T*>(b.data());
  }
  template <class T>
  request start_sum(T* data, std::size_t n) {
    request r;
    detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, int(n), detail::mpi_type<T>(), MPI_SUM, comm_, &r),
                      "MPI_Iallreduce of " + std::to_string(n) + " elements");
    return r;
  }
  // Moves the exchange on; true once it completed (then it needs no wait).
  bool test(request& r) {
    int done = 0;
    detail::check_mpi(MPI_Test(&r, &done, MPI_STATUS_IGNORE), "MPI_Test of a gradient bucket");
    return done != 0;
  }
  // Polls until the exchange completes, or throws peer_timeout after options().timeout.
  void wait(request& r, const std::string& what) {
    wait_for_peers(
        [&] {
          int done = 0;
          detail::check_mpi(MPI_Test(&r, &done, MPI_STATUS_IGNORE), what);
          return done != 0;
        },
        [] { detail::mpi_exchange_failed() = true; }, options_.timeout, rank_, size_, what);
  }

 private:
  template <class T>
  T all_reduce(T x, MPI_Op op, const std::string& what) {
    request r;
    T out{};
    detail::check_mpi(MPI_Iallreduce(&x, &out, 1, detail::mpi_type<T>(), op, comm_, &r), what);
    wait(r, what);
    return out;
  }

  mpi_options options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::vector<std::byte> staging_[2];
};

using mpi_communicator = basic_mpi_communicator<train::overlap_with_backward>;

}  // namespace skillgraft::dist
