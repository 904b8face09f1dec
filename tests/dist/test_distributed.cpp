// Data-parallel training over MPI, run as both ranks of `mpirun -np 2`: two ranks on half a
// batch each take the step one process takes on the whole batch (every rank also computes
// that reference itself, in-process), only trainable gradients are sent, ranks agree at start,
// rank 0 alone writes checkpoints that every rank resumes from.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>


#include "support/random.hpp"
#include "support/random_lm.hpp"
#include "support/random_multimodal.hpp"
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

// The buckets summed after backward instead of during it (mpi_communicator overlaps them).
using after_backward_communicator = sg::dist::basic_mpi_communicator<sg::train::reduce_after_backward>;

// micro_batches: how many micro-batches each rank splits its half into (gradient accumulation
// within a rank, summing across ranks).
template <class Recipe>
void check_two_ranks_match_one_process(Recipe recipe, std::size_t bucket_bytes, int micro_batches = 1) {
  sg::dist::mpi_communicator comm({.timeout = std::chrono::seconds(60), .bucket_bytes = bucket_bytes});
  after_backward_communicator after({.timeout = std::chrono::seconds(60), .bucket_bytes = bucket_bytes});
  REQUIRE(comm.size() == 2);
  const global_batch data;
  sg::train::no_communicator one;
  const auto whole = sg::test::train_tiny_lm<sg::backend::cpu>(recipe, {data.rows_of(0, rows)}, one, steps);
  std::vector<sg::train::micro_batch<float>> mine;
  if (micro_batches == 1) mine.push_back(data.half(comm.rank()));
  else
    for (std::size_t r = 0; r < 2; ++r) mine.push_back(data.rows_of(2 * std::size_t(comm.rank()) + r, 1));
  const auto half = sg::test::train_tiny_lm<sg::backend::cpu>(recipe, mine, comm, steps);
  // Overlap changes when each bucket goes, not what is summed: the same weights to the bit.
  const auto half_after = sg::test::train_tiny_lm<sg::backend::cpu>(recipe, mine, after, steps);
  CHECK(half.weights == half_after.weights);
  CHECK(after.last_reduction().during_backward == 0);
  // Backward reported every trainable gradient, so every bucket went from inside it (the last
  // one as the lowest layer, or the embeddings, finished).
  const auto& sent = comm.last_reduction();
  INFO(sent.during_backward << " of " << sent.buckets << " buckets went during backward");
  CHECK(sent.buckets == after.last_reduction().buckets);
  CHECK(sent.bytes == after.last_reduction().bytes);
  CHECK(sent.during_backward == sent.buckets);
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

namespace {
// One step's gradients of `model` on this rank's micro-batch, summed over the ranks, each
// rank dividing by the global target count as train_step does. How the buckets are sent:
enum class send { after_backward, during_backward, before_backward };
template <class Model>
std::vector<float> summed_gradients(const Model& model, typename Model::weights_t& w,
                                    const sg::train::micro_batch_for<Model>& mb, send how) {
  sg::dist::mpi_communicator comm({.timeout = std::chrono::seconds(60), .bucket_bytes = 1000});
  auto g = model.make_grads(w);
  std::uint64_t targets = 0;
  for (auto y : mb.targets) targets += (y != sg::ignore_index);
  targets = comm.sum(targets);
  typename Model::saved_t saved;
  auto h = model.forward(w, mb.ids, saved, mb.prefix);
  auto r = sg::train::masked_ce_objective{}.micro(model, w, g, mb, h, mb.targets, std::size_t(targets));
  if (how == send::after_backward) {
    model.backward(w, saved, r.dh, g);
    comm.reduce_gradients(model, w, g);
  } else {
    auto reduction = comm.start_reduction(model, w, g);
    if (how == send::during_backward) {
      model.backward(w, saved, r.dh, g, reduction.hook());
    } else {  // what a hook placed too early would do: every bucket before its gradients exist
      std::vector<typename Model::tensor_t*> all;
      model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) { all.push_back(&dp); });
      for (auto it = all.rbegin(); it != all.rend(); ++it) reduction.ready(**it);
      model.backward(w, saved, r.dh, g);
    }
    comm.finish_reduction(reduction);
  }
  std::vector<float> out;
  model.for_each_trainable(w, g, [&](const std::string&, auto&, auto& dp) {
    out.insert(out.end(), dp.data(), dp.data() + dp.size());
  });
  return out;
}

template <class Model>
void check_buckets_wait_for_final_gradients(const Model& model, typename Model::weights_t& w,
                                            const sg::train::micro_batch_for<Model>& mb) {
  const auto after = summed_gradients(model, w, mb, send::after_backward);
  const auto during = summed_gradients(model, w, mb, send::during_backward);
  const auto before = summed_gradients(model, w, mb, send::before_backward);
  REQUIRE(after.size() == during.size());
  CHECK(during == after);  // the same sums of the same buffers: equal to the bit
  CHECK(before != after);  // the comparison sees a bucket sent too early
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < after.size(); ++i) wrong += before[i] != after[i];
  INFO(wrong << " of " << after.size() << " gradient elements differ when the buckets go before backward");
  CHECK(wrong > after.size() / 2);
}
}  // namespace

TEST_CASE("buckets sent during backward hold final gradients: the sums equal those sent after backward") {
  const global_batch data;
  const auto c = sg::test::tiny_lm_config();
  sg::dist::mpi_communicator comm;
  SECTION("llm: embeddings, every layer, final norm, head; tensors split across 1000-byte buckets") {
    auto w = sg::test::random_lm<float>(c, 11);
    sg::model::decoder_lm<float, std::remove_const_t<decltype(sg::recipe::llm)>> lm(c, sg::recipe::llm);
    check_buckets_wait_for_final_gradients(lm, w, data.half(comm.rank()));
  }
  SECTION("multimodal, every part: vision encoder and projector after the language model") {
    const auto mc = sg::test::tiny_multimodal();
    auto w = sg::test::random_multimodal<float>(mc, 15);
    using full_t = std::remove_const_t<decltype(sg::recipe::full)>;
    sg::model::multimodal_lm<float, full_t> mm(mc, sg::recipe::full);
    const auto images = sg::test::random_tensor<float>({2, 8, 8, 3}, 16 + unsigned(comm.rank()), 0.5);
    const std::size_t P = std::size_t(mm.image_tokens());
    auto half = data.half(comm.rank());
    sg::train::micro_batch<float> mb{half.ids, xt::full_like(sg::token_ids::from_shape({2, P + seq}), sg::ignore_index),
                                     &images};
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t s = 0; s < seq; ++s) mb.targets(b, P + s) = half.targets(b, s);
    check_buckets_wait_for_final_gradients(mm, w, mb);
  }
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
