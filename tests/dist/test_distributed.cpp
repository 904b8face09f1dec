// Data-parallel training over MPI, run as both ranks of `mpirun -np 2`: two ranks on half a
// batch each take the step one process takes on the whole batch (every rank also computes
// that reference itself, in-process), only trainable gradients are sent, ranks agree at start,
// rank 0 alone writes checkpoints that every rank resumes from.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>


#include "support/random_lm.hpp"
#include "two_ranks.hpp"

#include "skillgraft/cl/memory_plan.hpp"
#include "skillgraft/dist/agreement.hpp"
#include "skillgraft/dist/mpi.hpp"
#include "skillgraft/model/hf_checkpoint.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;
using Catch::Contains;

namespace {
using sg::test::global_batch;
constexpr std::size_t rows = global_batch::rows, seq = global_batch::seq;
constexpr int steps = 4;

// micro_batches: how many micro-batches each rank splits its half into (gradient accumulation
// within a rank, summing across ranks).
template <class Recipe>
void check_two_ranks_match_one_process(Recipe recipe, std::size_t bucket_bytes, int micro_batches = 1) {
  sg::dist::mpi_communicator comm({.timeout = std::chrono::seconds(60), .bucket_bytes = bucket_bytes});
  REQUIRE(comm.size() == 2);
  const global_batch data;
  sg::train::no_communicator one;
  const auto whole = sg::test::train_tiny_lm<sg::backend::cpu>(recipe, {data.rows_of(0, rows)}, one, steps);
  std::vector<sg::train::micro_batch<float>> mine;
  if (micro_batches == 1) mine.push_back(data.half(comm.rank()));
  else
    for (std::size_t r = 0; r < 2; ++r) mine.push_back(data.rows_of(2 * std::size_t(comm.rank()) + r, 1));
  const auto half = sg::test::train_tiny_lm<sg::backend::cpu>(recipe, mine, comm, steps);
  REQUIRE(whole.weights.size() == half.weights.size());
  double worst = 0;
  for (std::size_t i = 0; i < whole.weights.size(); ++i)
    worst = std::max(worst, double(std::abs(whole.weights[i] - half.weights[i])));
  INFO("rank " << comm.rank() << ", largest weight difference " << worst);
  CHECK(worst < 2e-6);
  for (int k = 0; k < steps; ++k) {
    CHECK(half.stats[std::size_t(k)].targets == global_batch::targets_in_all);  // 12 + 10
    CHECK(half.stats[std::size_t(k)].loss == Approx(whole.stats[std::size_t(k)].loss).epsilon(1e-5));
    CHECK(half.stats[std::size_t(k)].grad_norm == Approx(whole.stats[std::size_t(k)].grad_norm).epsilon(1e-5));
  }
  CHECK(whole.stats[0].grad_norm > 0.5);  // clipping acted, on the global norm
  // Both ranks hold the same weights to the bit (they applied the same summed gradient).
  std::vector<float> other(half.weights.size());
  if (comm.rank() == 0) other = half.weights;
  comm.broadcast(std::as_writable_bytes(std::span(other)), "the test's weights");
  CHECK(other == half.weights);
}
}  // namespace

TEST_CASE("two ranks on half batches take the steps of one process on the whole batch: sa_proj") {
  check_two_ranks_match_one_process(sg::recipe::sa_proj, std::size_t(25) << 20);
}

TEST_CASE("two ranks on half batches take the steps of one process on the whole batch: llm, tiny buckets") {
  // 1000-byte buckets cut most tensors across two buckets and join the norms into one.
  check_two_ranks_match_one_process(sg::recipe::llm, 1000);
}

TEST_CASE("two ranks of two micro-batches each take the steps of one process on the whole batch: mlp_gate_up") {
  check_two_ranks_match_one_process(sg::recipe::mlp_gate_up, std::size_t(25) << 20, 2);
}

TEST_CASE("only the recipe's trainable gradients go on the wire: the plan's gradient bytes") {
  sg::dist::mpi_communicator comm({.timeout = std::chrono::seconds(60), .bucket_bytes = 4096});
  const global_batch data;
  const auto c = sg::test::tiny_lm_config();
  auto bytes_of = [&](auto recipe) {
    auto w = sg::test::random_lm<float>(c, 11);
    sg::model::decoder_lm<float, decltype(recipe)> lm(c, recipe);
    auto g = lm.make_grads(w);
    sg::train::adamw<float> opt(lm, w, g);
    const std::vector mb{data.half(comm.rank())};
    sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-3}, std::span(mb), {}, {}, comm);
    const auto plan = sg::cl::plan_method_memory(lm, sg::cl::method::none, {2, int(seq)});
    CHECK(comm.last_reduction().bytes == plan.gradients);
    CHECK(plan.gradients == lm.trainable_elements() * sizeof(float));
    CHECK(comm.last_reduction().buckets == (plan.gradients + 4095) / 4096);
    return comm.last_reduction().bytes;
  };
  const auto sa = bytes_of(sg::recipe::sa_proj), gate_up = bytes_of(sg::recipe::mlp_gate_up),
             llm = bytes_of(sg::recipe::llm), frozen = bytes_of(sg::recipe::frozen);
  CHECK(frozen == 0);
  CHECK(sa < llm);
  CHECK(gate_up < llm);
}

TEST_CASE("ranks agree at start on the recipe and the weights, or every rank throws") {
  sg::dist::mpi_communicator comm({.timeout = std::chrono::seconds(60)});
  const auto c = sg::test::tiny_lm_config();
  auto w = sg::test::random_lm<float>(c, 11);
  CHECK_NOTHROW(sg::dist::check_agreement(comm, "sa_proj", w));

  // Rank 1 names another recipe: both ranks stop, each saying what it knows.
  const char* name = comm.rank() == 1 ? "mlp" : "sa_proj";
  CHECK_THROWS_WITH(sg::dist::check_agreement(comm, name, w),
                    comm.rank() == 1 ? Contains("the recipe is 'mlp', rank 0's is 'sa_proj'")
                                     : Contains("rank 1 trains another recipe than rank 0's 'sa_proj'"));

  // Rank 1 loaded other weights (one element differs): both ranks stop.
  auto w1 = sg::test::random_lm<float>(c, 11);
  if (comm.rank() == 1) w1.trunk.layers[1].mlp.down_proj.weight[3] += 1e-6f;
  CHECK_THROWS_AS(sg::dist::check_agreement(comm, "sa_proj", w1), std::invalid_argument);
  CHECK_THROWS_WITH(sg::dist::check_agreement(comm, "sa_proj", w1),
                    comm.rank() == 1 ? Contains("the weights' checksum is") : Contains("rank 1 starts from other weights"));
  CHECK((sg::dist::weights_checksum(w1) == sg::dist::weights_checksum(w)) == (comm.rank() == 0));
}

TEST_CASE("rank 0 alone writes the checkpoint, every rank resumes from it") {
  sg::dist::mpi_communicator comm({.timeout = std::chrono::seconds(60)});
  const auto c = sg::test::tiny_lm_config();
  const global_batch data;
  auto w = sg::test::random_lm<float>(c, 11);
  sg::model::decoder_lm<float, std::remove_const_t<decltype(sg::recipe::sa_proj)>> lm(c, sg::recipe::sa_proj);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g, {.lr = 1e-2});
  const std::vector mb{data.half(comm.rank())};
  for (int k = 0; k < 2; ++k)
    sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-2}, std::span(mb), {}, {}, comm);

  // One directory for both ranks: rank 0 makes it, the others learn its name.
  std::string dir;
  if (comm.rank() == 0) {
    std::string pattern = (std::filesystem::temp_directory_path() / "skillgraft-dist-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    dir = pattern;
  }
  dir = sg::dist::detail::broadcast_string(comm, dir, "the test's directory");
  const std::filesystem::path task = std::filesystem::path(dir) / "task";
  int writes = 0;
  sg::dist::on_rank0(comm, "saving the task checkpoint", [&] {
    ++writes;
    sg::model::save_task_checkpoint(task, lm, w);
  });
  CHECK(writes == (comm.rank() == 0 ? 1 : 0));
  // Every rank resumes: the base model plus the task checkpoint is the trained model, the
  // same on both ranks (the start-up check passes).
  auto resumed = sg::test::random_lm<float>(c, 11);
  sg::model::apply_task_checkpoint(task, resumed);
  CHECK(sg::dist::weights_checksum(resumed) == sg::dist::weights_checksum(w));
  CHECK_NOTHROW(sg::dist::check_agreement(comm, "sa_proj", resumed));

  // A write that fails on rank 0 stops every rank with rank 0's message.
  CHECK_THROWS_WITH(sg::dist::on_rank0(comm, "saving the task checkpoint",
                                       [&] { throw std::runtime_error("disk full at " + dir); }),
                    Contains("rank 0 failed in saving the task checkpoint: disk full at " + dir));
  sg::dist::on_rank0(comm, "cleaning up", [&] { std::filesystem::remove_all(dir); });
}

TEST_CASE("mpi_communicator refuses options it cannot work with") {
  CHECK_THROWS_WITH(sg::dist::mpi_communicator({.timeout = std::chrono::milliseconds(0)}),
                    Contains("mpi_options.timeout must be positive"));
  CHECK_THROWS_WITH(sg::dist::mpi_communicator({.bucket_bytes = 2}), Contains("mpi_options.bucket_bytes"));
  CHECK_THROWS_WITH(sg::dist::mpi_communicator({.bucket_bytes = std::size_t(1) << 31}),
                    Contains("at most 2147483647 (MPI counts in int)"));
  CHECK_THROWS_WITH(sg::train::cut_into_buckets(std::vector<std::pair<float*, std::size_t>>{}, 0),
                    Contains("at least one element"));
}
