#pragma once
// The reproduction as an MPI job (reproduce_mpi; docs/distributed.md): every rank runs every
// method in turn, each step's batch split between the ranks and the trainable gradients
// summed over them (train_step with dist::mpi_communicator), so that k ranks take the steps of
// one process on the whole batch. MPI does not survive fork, so nothing is forked: pretraining
// (when the base-model cache is missing) runs on rank 0 while the others wait, and the methods
// run one after another. Rank 0 alone writes files; every rank reads the cached base model. The
// test sets' decoding is divided: each rank decodes every k-th chunk of a test set and the
// correct answers are summed (evaluation_share); the counting-bias probe, whose sums over
// positions would round differently if divided, runs on every rank.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <xtensor/xview.hpp>

#include "pipeline.hpp"
#include "skillgraft/dist/agreement.hpp"
#include "skillgraft/dist/mpi.hpp"

namespace skillgraft::reproduce {

// The job's communicator, set by data_parallel_run for the stages it creates.
inline dist::mpi_communicator*& job_communicator() {
  static dist::mpi_communicator* comm = nullptr;
  return comm;
}

// Rows [n r / k, n (r + 1) / k) of an encoded batch of n rows: rank r's share of k. The
// padding stays the whole batch's, so each row computes what it computes in the whole batch.
inline encoded_batch share_of(const encoded_batch& enc, int rank, int ranks) {
  const std::size_t n = enc.ids.shape(0), first = n * std::size_t(rank) / std::size_t(ranks),
                    last = n * std::size_t(rank + 1) / std::size_t(ranks);
  if (first == last)
    throw std::invalid_argument("reproduce: a batch of " + std::to_string(n) + " rows cannot be shared by " +
                                std::to_string(ranks) + " ranks (raise --stage-batch)");
  encoded_batch mine{xt::eval(xt::view(enc.ids, xt::range(first, last), xt::all())),
                     xt::eval(xt::view(enc.targets, xt::range(first, last), xt::all())),
                     {}};
  if (!enc.images.empty()) {
    auto shape = enc.images.shape();
    const std::size_t row = enc.images.size() / n;
    shape.dims[0] = last - first;
    mine.images = cpu::tensor<float>(shape, memory_use::workspace);
    std::copy(enc.images.data() + first * row, enc.images.data() + last * row, mine.images.data());
  }
  return mine;
}

// cpu_stage whose every step is shared by the job's ranks.
template <class R, class Mlp>
class mpi_stage : public cpu_stage<R, Mlp> {
 public:
  using cpu_stage<R, Mlp>::cpu_stage;
  train::step_stats step(const encoded_batch& enc, const train::cosine_schedule& sched) {
    auto& comm = *job_communicator();
    const auto mine = share_of(enc, comm.rank(), comm.size());
    train::micro_batch<float> mb{mine.ids, mine.targets, mine.images.empty() ? nullptr : &mine.images};
    return stage_step(this->mm_, this->w_, this->g_, this->opt_, sched, mb, this->teach_ ? &*this->teach_ : nullptr,
                      this->s_, comm);
  }
};

// run_pipeline over the job's ranks. s: the settings every rank parsed alike.
inline pipeline_result data_parallel_run(settings s, progress& prog, dist::mpi_communicator& comm) {
  // The GPU path forks to probe the device and trains without the job's communicator.
  if (s.device != "cpu")
    throw std::invalid_argument("reproduce_mpi trains on the CPU only (--device " + s.device +
                                "): for the GPU, run reproduce --device cuda");
  job_communicator() = &comm;
  s.write_files = comm.rank() == 0;
  s.jobs = 1;
  // The base model: rank 0 pretrains it when the cache is missing, in this process, while the
  // others wait for it as long as it takes (the exchange's deadline would stop them otherwise).
  {
    dist::mpi_communicator patient({.timeout = std::chrono::hours(24 * 7)});
    check_cache(s);  // refuses a cache it must not overwrite, on every rank
    dist::on_rank0(patient, "pretraining the base model", [&] {
      run_data d(s);
      weights_t w(s.model);
      if (load_checkpoint(w, s.checkpoint_path(), fingerprint(s))) return;
      std::filesystem::create_directories(s.out);
      pretrain_and_save(s, d, fingerprint(s), prog);
    });
  }
  // From here every rank evaluates the same test sets in the same order, each decoding its share.
  shared_evaluation() = {.rank = comm.rank(), .ranks = comm.size(), .sum = [&comm](std::uint64_t n) { return comm.sum(n, "the sum of the correct answers"); }};
  auto res = run_pipeline<mpi_stage>(s, prog);
  shared_evaluation() = {};
  job_communicator() = nullptr;
  return res;
}

}  // namespace skillgraft::reproduce
