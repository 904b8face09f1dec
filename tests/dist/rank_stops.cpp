// A rank that stops answering makes the others stop with a clear error within the deadline.
//
//   mpirun -np 2 dist_rank_stops stops    rank 1 stops taking part after one step (alive, silent)
//   mpirun -np 2 dist_rank_stops dies     rank 1 exits with an error after one step
//
// The first step runs with a patient communicator (a loaded machine may start the ranks
// seconds apart); then rank 0 keeps training with a 2-second deadline. It prints "rank 0
// stopped after S s: <error>" when an exchange throws, and "rank 0 stopped as it should" only
// when S is within the deadline plus 10 s and the error is peer_timeout (when rank 1 died, an
// MPI error naming the broken exchange counts too; or mpirun ends the job first, saying so).
// Then it ends the job. CTest looks for those lines and fails the test when the job runs past
// its timeout.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "support/random_lm.hpp"

#include "skillgraft/dist/mpi.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/schedule.hpp"
#include "skillgraft/train/step.hpp"

namespace sg = skillgraft;

int main(int argc, char** argv) {
  sg::dist::mpi_environment mpi(argc, argv);
  const bool dies = argc > 1 && std::strcmp(argv[1], "dies") == 0;
  if (argc != 2 || (!dies && std::strcmp(argv[1], "stops") != 0)) {
    std::fprintf(stderr, "usage: dist_rank_stops stops|dies\n");
    return 2;
  }
  constexpr auto deadline = std::chrono::seconds(2);
  sg::dist::mpi_communicator patient({.timeout = std::chrono::seconds(60)}), comm({.timeout = deadline});
  const auto c = sg::test::tiny_lm_config();
  auto w = sg::test::random_lm<float>(c, 3);
  sg::model::decoder_lm<float, std::remove_const_t<decltype(sg::recipe::sa_proj)>> lm(c, sg::recipe::sa_proj);
  auto g = lm.make_grads(w);
  sg::train::adamw<float> opt(lm, w, g);
  const sg::token_ids ids = {{1, 5, 7, 2, 11, 4}}, targets = {{5, 7, 2, 11, 4, 0}};
  const sg::train::micro_batch<float> mb{ids, targets};
  auto step = [&](sg::dist::mpi_communicator& c) {
    sg::train::train_step(lm, w, g, opt, sg::train::constant_schedule{1e-3}, std::span(&mb, 1), {}, {}, c);
  };
  step(patient);  // both ranks take part once
  if (comm.rank() == 1) {
    if (dies) std::_Exit(3);
    std::this_thread::sleep_for(std::chrono::seconds(120));  // alive but silent, until rank 0 ends the job
    return 1;
  }
  const auto start = std::chrono::steady_clock::now();
  try {
    for (int k = 0; k < 1000; ++k) step(comm);
    std::printf("rank 0 trained on alone: the failure went unnoticed\n");
    return 1;
  } catch (const std::exception& e) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("rank 0 stopped after %.1f s: %s\n", s, e.what());
    const bool timed_out = dynamic_cast<const sg::dist::peer_timeout*>(&e) != nullptr;
    if (s < 12.0 && (timed_out ? s >= 2.0 : dies)) std::printf("rank 0 stopped as it should\n");
    std::fflush(stdout);
    sg::dist::mpi_environment::abort(1);
  }
}
