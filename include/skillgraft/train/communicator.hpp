#pragma once
// Data-parallel training as a policy of train_step: what ranks exchange so that k processes,
// each on its share of a global batch, take the step one process would take on the whole batch.
//
//   N    = sum over ranks of the target tokens   each rank divides its loss and gradient by N,
//                                                not by its own count (ranks hold different counts)
//   g    = sum over ranks of each rank's g       only the recipe's trainable tensors: a frozen
//                                                tensor has no gradient, so nothing of it is sent
//   loss = sum over ranks of each rank's loss
// Every rank then clips the same norm and steps the same weights identically.
//
// A communicator C provides:
//   C::distributed                    false: train_step is the single-process step, nothing added
//   c.rank(), c.size()
//   c.sum(std::uint64_t), c.sum(double)          host scalars summed over the ranks
//   c.reduce_gradients(model, w, g)              every trainable gradient summed in place
// and, to sum while backward runs (C::bucket_schedule is overlap_with_backward):
//   c.start_reduction(model, w, g) -> r          model.backward(..., r.hook()) drives it
//   c.finish_reduction(r)                        waits for every sum
// `no_communicator` (here) is the default. The distributed ones live under skillgraft/dist/
// and are compiled only where a program includes them: dist::mpi_communicator (CPU processes,
// MPI) and dist::nccl_communicator (one rank per GPU, NCCL); both cut the gradients into
// buckets with train::reduce_in_buckets (train/gradient_buckets.hpp).
#include <concepts>
#include <cstdint>

namespace skillgraft::train {

// When a step's gradient buckets are summed: the schedule policy of a distributed
// communicator (its `bucket_schedule`), types so that train_step compiles only the path taken.
//   overlap_with_backward   each bucket as soon as backward has finished its gradients, while
//                           backward works on the layers below; only during the last
//                           micro-batch's backward (the earlier ones only accumulate). Models
//                           whose backward takes no gradient hook fall back to the next.
//   reduce_after_backward   every bucket after the last micro-batch's backward
// Both sum the same buffers in the same order: the results are the same to the bit.
struct overlap_with_backward {};
struct reduce_after_backward {};

// One process: train_step's default, which compiles every exchange away.
struct no_communicator {
  static constexpr bool distributed = false;
  int rank() const { return 0; }
  int size() const { return 1; }
};

template <class C>
concept communicator = requires(const C& c) {
  { C::distributed } -> std::convertible_to<bool>;
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
};

// A communicator that really exchanges: the scalar sums train_step needs (gradients are
// checked where train_step calls reduce_gradients, with the model's types).
template <class C>
concept distributed_communicator = communicator<C> && C::distributed && requires(C& c, std::uint64_t n, double x) {
  { c.sum(n) } -> std::same_as<std::uint64_t>;
  { c.sum(x) } -> std::same_as<double>;
};

}  // namespace skillgraft::train
