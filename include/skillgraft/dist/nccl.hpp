#pragma once
// Data-parallel training between GPUs over NCCL, one rank per GPU: the communicator policy of
// train_step (train/communicator.hpp) for the CUDA backend. Only a .cu file that includes this
// header needs NCCL (nccl.h and libnccl, shipped with the CUDA toolkit on this project's
// machines); the rest of the library does not.
//
//   sg::dist::mpi_environment mpi(argc, argv);                   // MPI only starts the ranks
//   sg::dist::mpi_communicator host;                             // and hands out NCCL's id
//   cudaSetDevice(host.rank() % devices);                        // one GPU per rank
//   sg::dist::nccl_communicator comm(sg::dist::shared_nccl_id(host), host.rank(), host.size());
//   ... train_step(gpu_model, w, g, opt, schedule, my_share, {}, {}, comm);
//
// The gradients stay on the GPU: reduce_in_buckets packs them with the backend's own kernels
// and NCCL sums them device to device. Every exchange runs on the communicator's stream, after
// the backend's work on the default stream (an event orders them), and is waited for with a
// deadline: a rank that died or hangs makes the others abort the NCCL communicator and throw
// dist::peer_timeout instead of waiting forever (NCCL kernels themselves never time out).
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/dist/peer_timeout.hpp"
#include "skillgraft/train/communicator.hpp"
#include "skillgraft/train/gradient_buckets.hpp"

namespace skillgraft::dist {

// NCCL or the CUDA runtime reported an error in an exchange.
class nccl_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void check_nccl(ncclResult_t r, const std::string& what) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  throw nccl_error("skillgraft: NCCL failed in " + what + ": " + ncclGetErrorString(r));
}
inline void check_cuda(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  throw nccl_error("skillgraft: CUDA failed in " + what + ": " + cudaGetErrorString(e));
}
template <class T>
ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return ncclUint64;
  else if constexpr (std::is_same_v<T, std::byte>) return ncclUint8;
  else static_assert(sizeof(T) == 0, "skillgraft: no NCCL type for this element type");
}
}  // namespace detail

// NCCL's id, made on rank 0 and broadcast by any communicator with
// broadcast(std::span<std::byte>, what) (dist::mpi_communicator, for one).
template <class Bootstrap>
ncclUniqueId shared_nccl_id(Bootstrap& bootstrap) {
  ncclUniqueId id{};
  if (bootstrap.rank() == 0) detail::check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  bootstrap.broadcast(std::as_writable_bytes(std::span(&id, 1)), "handing out the NCCL id");
  return id;
}

struct nccl_options {
  // How long a rank waits for the others in one exchange (see mpi_options::timeout).
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
  std::size_t bucket_bytes = std::size_t(25) << 20;
};

// Gradients: train::bucketed_gradients (reduce_gradients, last_reduction) over this transport.
class nccl_communicator : public train::bucketed_gradients<nccl_communicator, backend::cuda> {
 public:
  static constexpr bool distributed = true;
  using request = cudaEvent_t;

  // Every rank calls this with the same id, its rank and the number of ranks, on the GPU it
  // will train on (cudaSetDevice first). Joining is non-blocking underneath, so a rank that
  // never arrives gives peer_timeout here too.
  nccl_communicator(ncclUniqueId id, int rank, int size, nccl_options o = {}) : options_(o), rank_(rank), size_(size) {
    if (o.timeout.count() <= 0)
      throw std::invalid_argument("skillgraft: nccl_options.timeout must be positive (it is " +
                                  std::to_string(o.timeout.count()) + " ms)");
    if (o.bucket_bytes < sizeof(double))
      throw std::invalid_argument("skillgraft: nccl_options.bucket_bytes must hold a gradient element (it is " +
                                  std::to_string(o.bucket_bytes) + ")");
    if (size < 1 || rank < 0 || rank >= size)
      throw std::invalid_argument("skillgraft: NCCL rank " + std::to_string(rank) + " of " + std::to_string(size) +
                                  " is not a rank of the job");
    detail::check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    detail::check_cuda(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    detail::check_nccl(ncclCommInitRankConfig(&comm_, size, id, rank, &config), "ncclCommInitRankConfig");
    wait_for_comm("joining the NCCL communicator");
    detail::check_cuda(cudaMalloc(&scalar_, 64), "cudaMalloc of the exchange scalars");
  }
  nccl_communicator(const nccl_communicator&) = delete;
  nccl_communicator& operator=(const nccl_communicator&) = delete;
  ~nccl_communicator() {
    if (comm_) (failed_ ? ncclCommAbort : ncclCommDestroy)(comm_);
    for (auto* p : staging_) cudaFree(p);
    cudaFree(scalar_);
    cudaFreeHost(host_);
    cudaEventDestroy(ready_);
    cudaStreamDestroy(stream_);
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  const nccl_options& options() const { return options_; }

  std::uint64_t sum(std::uint64_t x) { return all_reduce(x, ncclSum, "the sum of the target counts"); }
  double sum(double x) { return all_reduce(x, ncclSum, "the sum of the losses"); }
  std::uint64_t max(std::uint64_t x, const std::string& what) { return all_reduce(x, ncclMax, what); }

  // Rank 0's host bytes into every rank's `data`, through the GPU.
  void broadcast(std::span<std::byte> data, const std::string& what) {
    if (data.empty()) return;
    auto* d = staging<std::byte>(0, data.size());
    auto* h = pinned(data.size());
    std::memcpy(h, data.data(), data.size());
    detail::check_cuda(cudaMemcpyAsync(d, h, data.size(), cudaMemcpyHostToDevice, stream_), what);
    enqueued(ncclBroadcast(d, d, data.size(), ncclUint8, 0, comm_, stream_), what);
    detail::check_cuda(cudaMemcpyAsync(h, d, data.size(), cudaMemcpyDeviceToHost, stream_), what);
    request r = record();
    wait(r, what);
    std::memcpy(data.data(), h, data.size());
  }


  // The transport of reduce_in_buckets: device memory, NCCL on this communicator's stream.
  template <class T>
  T* staging(int slot, std::size_t elements) {
    const std::size_t bytes = elements * sizeof(T);
    if (staging_bytes_[slot] < bytes) {
      detail::check_cuda(cudaStreamSynchronize(stream_), "freeing a staging buffer");
      cudaFree(staging_[slot]);
      staging_[slot] = nullptr;
      staging_bytes_[slot] = 0;
      detail::check_cuda(cudaMalloc(&staging_[slot], bytes), "cudaMalloc of a gradient bucket");
      staging_bytes_[slot] = bytes;
    }
    return static_cast<T*>(staging_[slot]);
  }
  template <class T>
  request start_sum(T* data, std::size_t n) {
    // The gradients (and the packing) were written on the default stream.
    detail::check_cuda(cudaEventRecord(ready_, cudaStreamLegacy), "cudaEventRecord");
    detail::check_cuda(cudaStreamWaitEvent(stream_, ready_, 0), "cudaStreamWaitEvent");
    enqueued(ncclAllReduce(data, data, n, detail::nccl_type<T>(), ncclSum, comm_, stream_),
             "ncclAllReduce of " + std::to_string(n) + " elements");
    return record();
  }
  // Polls the exchange's event and NCCL's asynchronous error until done, or aborts the NCCL
  // communicator and throws peer_timeout after options().timeout.
  void wait(request& r, const std::string& what) {
    wait_for_peers(
        [&] {
          const cudaError_t e = cudaEventQuery(r);
          if (e == cudaSuccess) {
            cudaEventDestroy(r);
            return true;
          }
          if (e != cudaErrorNotReady) {
            failed_ = true;
            detail::check_cuda(e, what);
          }
          check_async(what);
          return false;
        },
        [&] { abort_comm(); }, options_.timeout, rank_, size_, what);
  }

 private:
  request record() {
    request r;
    detail::check_cuda(cudaEventCreateWithFlags(&r, cudaEventDisableTiming), "cudaEventCreate");
    detail::check_cuda(cudaEventRecord(r, stream_), "cudaEventRecord");
    return r;
  }
  // NCCL's asynchronous error (a broken connection, a failed peer) as an exception.
  void check_async(const std::string& what) {
    ncclResult_t async = ncclSuccess;
    detail::check_nccl(ncclCommGetAsyncError(comm_, &async), what);
    if (async != ncclSuccess && async != ncclInProgress) {
      failed_ = true;
      detail::check_nccl(async, what);
    }
  }
  // Ends the kernels still waiting for a missing rank; the communicator is unusable after.
  void abort_comm() {
    failed_ = true;
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  // Non-blocking NCCL calls return before they are enqueued (or joined): wait with the deadline.
  void wait_for_comm(const std::string& what) {
    wait_for_peers(
        [&] {
          ncclResult_t state = ncclSuccess;
          detail::check_nccl(ncclCommGetAsyncError(comm_, &state), what);
          if (state != ncclSuccess && state != ncclInProgress) {
            failed_ = true;
            detail::check_nccl(state, what);
          }
          return state == ncclSuccess;
        },
        [&] { abort_comm(); }, options_.timeout, rank_, size_, what);
  }
  // A non-blocking communicator may return before a call is enqueued: wait until it is.
  void enqueued(ncclResult_t r, const std::string& what) {
    detail::check_nccl(r, what);
    if (r == ncclInProgress) wait_for_comm(what);
  }
  // Host memory the copies can run asynchronously from (a copy to pageable memory would
  // block the host without a deadline while NCCL waits for a missing rank).
  std::byte* pinned(std::size_t bytes) {
    if (host_bytes_ < bytes) {
      detail::check_cuda(cudaStreamSynchronize(stream_), "freeing pinned memory");
      cudaFreeHost(host_);
      host_ = nullptr;
      host_bytes_ = 0;
      detail::check_cuda(cudaMallocHost(&host_, bytes), "cudaMallocHost");
      host_bytes_ = bytes;
    }
    return static_cast<std::byte*>(host_);
  }
  template <class T>
  T all_reduce(T x, ncclRedOp_t op, const std::string& what) {
    auto* d = static_cast<T*>(scalar_);
    auto* h = reinterpret_cast<T*>(pinned(sizeof(T)));
    *h = x;
    detail::check_cuda(cudaMemcpyAsync(d, h, sizeof(T), cudaMemcpyHostToDevice, stream_), what);
    enqueued(ncclAllReduce(d, d, 1, detail::nccl_type<T>(), op, comm_, stream_), what);
    detail::check_cuda(cudaMemcpyAsync(h, d, sizeof(T), cudaMemcpyDeviceToHost, stream_), what);
    request r = record();
    wait(r, what);
    return *h;
  }

  nccl_options options_;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  void* scalar_ = nullptr;
  void* host_ = nullptr;
  std::size_t host_bytes_ = 0;
  void* staging_[2] = {nullptr, nullptr};
  std::size_t staging_bytes_[2] = {0, 0};
  bool failed_ = false;
};

}  // namespace skillgraft::dist
