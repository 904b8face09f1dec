// Data-parallel training between GPUs over NCCL (dist/nccl.hpp), one rank per GPU:
//
//   mpirun -np N test_nccl_device        (N GPUs on the machine; MPI only starts the ranks)
//
// Each rank trains the CUDA model on its share of the global batch; the result must be the
// CPU backend's single process on the whole batch (computed by every rank itself), the bytes
// sent the plan's gradient bytes, and the weights the same on every rank. With one rank it
// checks the whole path (buckets on the device, scalar sums, broadcasts, the start-up check)
// on a single GPU. Exit code 77 (CTest: skipped) without a CUDA device, or with fewer GPUs
// than ranks (NCCL puts one rank on each GPU).
#include <cmath>
#include <cstdio>
#include <string>

#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/cl/memory_plan.hpp"
#include "skillgraft/dist/agreement.hpp"
#include "skillgraft/dist/mpi.hpp"
#include "skillgraft/dist/nccl.hpp"
#include "two_ranks.hpp"

namespace sg = skillgraft;

namespace {
int failures = 0;
void expect(bool ok, const std::string& what) {
  if (ok) return;
  ++failures;
  std::printf("FAILED: %s\n", what.c_str());
}

template <class Recipe>
void check_recipe(Recipe recipe, const char* name, sg::dist::nccl_communicator& comm) {
  const sg::test::global_batch data;
  const std::size_t n = data.rows / std::size_t(comm.size()), first = n * std::size_t(comm.rank());
  sg::train::no_communicator one;
  const auto whole = sg::test::train_tiny_lm<sg::backend::cpu>(recipe, {data.rows_of(0, data.rows)}, one);
  const auto share = sg::test::train_tiny_lm<sg::backend::cuda>(recipe, {data.rows_of<sg::backend::cuda>(first, n)}, comm);
  double worst = 0;
  for (std::size_t i = 0; i < whole.weights.size() && i < share.weights.size(); ++i)
    worst = std::max(worst, double(std::abs(whole.weights[i] - share.weights[i])));
  const std::string at = std::string(name) + ", rank " + std::to_string(comm.rank()) + ": ";
  expect(whole.weights.size() == share.weights.size(), at + "as many trainable elements");
  // The GPU's kernels sum in other orders than the CPU's: the backends' parity tolerance.
  expect(worst < 1e-4, at + "largest weight difference " + std::to_string(worst));
  for (std::size_t k = 0; k < whole.stats.size(); ++k) {
    expect(share.stats[k].targets == data.targets_in_all, at + "the global target count");
    expect(std::abs(share.stats[k].loss - whole.stats[k].loss) < 1e-4 * std::abs(whole.stats[k].loss),
           at + "loss " + std::to_string(share.stats[k].loss) + " vs " + std::to_string(whole.stats[k].loss));
  }
  const auto c = sg::test::tiny_lm_config();
  sg::model::decoder_lm<float, Recipe, sg::backend::cuda> lm(c, recipe);
  const auto plan = sg::cl::plan_method_memory(lm, sg::cl::method::none, {int(n), int(data.seq)});
  expect(comm.last_reduction().bytes == plan.gradients, at + "bytes sent = the plan's gradient bytes");
  // Every rank holds the same weights to the bit.
  std::vector<float> rank0 = share.weights;
  comm.broadcast(std::as_writable_bytes(std::span(rank0)), "the test's weights");
  expect(rank0 == share.weights, at + "the same weights as rank 0");
}
}  // namespace

int main(int argc, char** argv) {
  sg::dist::mpi_environment mpi(argc, argv);
  sg::dist::mpi_communicator host({.timeout = std::chrono::minutes(2)});
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  const int local = host.local_rank();
  // Every rank skips, or none: a rank that went on alone would wait for the others.
  if (host.max(local >= devices ? 1 : 0, "whether every rank has a GPU")) {
    if (host.rank() == 0)
      std::printf("skillgraft: the NCCL test needs one GPU per rank (%d rank(s); this machine has %d CUDA "
                  "device(s)); skipped\n", host.size(), devices);
    return 77;
  }
  sg::dist::detail::check_cuda(cudaSetDevice(local), "cudaSetDevice");
  sg::dist::nccl_communicator comm(sg::dist::shared_nccl_id(host), host.rank(), host.size(),
                                   {.timeout = std::chrono::minutes(2), .bucket_bytes = 1000});
  check_recipe(sg::recipe::sa_proj, "sa_proj", comm);
  check_recipe(sg::recipe::llm, "llm", comm);
  const auto w = sg::model::to_backend<sg::backend::cuda>(sg::test::random_lm<float>(sg::test::tiny_lm_config(), 11));
  try {
    sg::dist::check_agreement(comm, "sa_proj", w);
  } catch (const std::exception& e) {
    expect(false, std::string("the start-up check: ") + e.what());
  }
  const int failed = int(host.max(std::uint64_t(failures), "the test's result"));
  if (host.rank() == 0) std::printf(failed ? "NCCL test failed\n" : "NCCL test passed on %d GPU(s)\n", host.size());
  return failed ? 1 : 0;
}
