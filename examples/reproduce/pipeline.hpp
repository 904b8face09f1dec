#pragma once
// The whole reproduction as one call: base model (pretrained or loaded from the cached
// checkpoint), base evaluation, every method, then every report file under settings.out.
#include <sys/wait.h>
#include <unistd.h>

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include "experiment.hpp"
#include "lr_search.hpp"
#include "report.hpp"

namespace skillgraft::reproduce {

struct pipeline_result {
  bool pretrained = false;  // false: the checkpoint was reused
  double pretrain_seconds = 0, total_seconds = 0;
  std::vector<double> base_row;
  std::vector<method_result> methods;
  std::vector<method_summary> summaries;  // one per method and seed, in the order of `methods`
  std::vector<seeded_summary> seeded;     // one per method: means and intervals over its seeds
  std::vector<std::string> skipped;  // methods not available in this build
  std::vector<rate_choice> rates;    // the learning-rate search, one per method (empty: fixed rates)
  double lr_search_seconds = 0;
  std::vector<std::string> resumed;  // methods whose search-seed runs took the searched stages from the search
};

// A method's results as text, for a worker process to hand them to the parent (exact:
// numbers in the shortest form that reads back to the same double).
inline std::string serialize(const method_result& r) {
  std::ostringstream o;
  auto num = [](double x) { return cl::detail::csv_number(x); };
  o << "name " << r.name << "\nseed " << r.seed << "\ntrain_seconds " << num(r.train_seconds) << "\neval_seconds " << num(r.eval_seconds)
    << "\npeak_bytes " << r.peak_bytes << "\ntrainable " << r.trainable << "\ndevice " << r.device << "\nlr " << num(r.lr)
    << "\nresumed_stages " << r.resumed_stages
    << "\nfinal_loss " << r.final_loss.size();
  for (double l : r.final_loss) o << ' ' << num(l);
  o << "\nR " << r.R.size() << ' ' << (r.R.empty() ? 0 : r.R[0].size());
  for (const auto& row : r.R)
    for (double v : row) o << ' ' << num(v);
  o << "\nprobes " << r.probes.size();
  for (const auto& p : r.probes)
    o << ' ' << p.stage << ' ' << p.step << ' ' << num(p.number_mass) << ' ' << num(p.with_number) << ' ' << num(p.kl);
  o << "\nend\n";
  return o.str();
}

inline method_result deserialize(const std::string& text) {
  std::istringstream in(text);
  method_result r;
  std::string key;
  auto fail = [&](const std::string& what) -> void { throw std::runtime_error("reproduce: worker result: " + what); };
  auto expect = [&](const char* k) {
    if (!(in >> key) || key != k) fail(std::string("expected '") + k + "'");
  };
  expect("name");
  in >> r.name;
  expect("seed");
  in >> r.seed;
  expect("train_seconds");
  in >> r.train_seconds;
  expect("eval_seconds");
  in >> r.eval_seconds;
  expect("peak_bytes");
  in >> r.peak_bytes;
  expect("trainable");
  in >> r.trainable;
  expect("device");
  in >> r.device;
  expect("lr");
  in >> r.lr;
  expect("resumed_stages");
  in >> r.resumed_stages;
  std::size_t n = 0, m = 0;
  expect("final_loss");
  in >> n;
  r.final_loss.resize(n);
  for (auto& l : r.final_loss) in >> l;
  expect("R");
  in >> n >> m;
  r.R.assign(n, std::vector<double>(m));
  for (auto& row : r.R)
    for (auto& v : row) in >> v;
  expect("probes");
  in >> n;
  r.probes.resize(n);
  for (auto& p : r.probes) in >> p.stage >> p.step >> p.number_mass >> p.with_number >> p.kl;
  expect("end");
  if (!in) fail("truncated");
  return r;
}

// Forks a child that runs body() and exits with its code (2, after printing what failed,
// when it throws); returns the child's pid to the parent.
template <class Body>
pid_t fork_child(const std::string& what, Body&& body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::system_error(errno, std::generic_category(), "reproduce: fork");
  if (pid == 0) {
    int code = 0;
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "reproduce: %s: %s\n", what.c_str(), e.what());
      code = 2;
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  return pid;
}

// Runs each method in a forked worker, at most `jobs` at a time, in list order; returns the
// results in list order. A worker that fails makes the whole call throw, naming the method.
template <class Run>
std::vector<method_result> run_in_workers(const std::vector<std::string>& methods, int jobs,
                                          const std::filesystem::path& dir, Run&& run) {
  std::map<pid_t, std::size_t> running;
  std::vector<std::filesystem::path> files(methods.size());
  std::string failures;
  auto reap = [&] {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) throw std::system_error(errno, std::generic_category(), "reproduce: waitpid");
    auto it = running.find(pid);
    if (it == running.end()) return;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failures += " " + methods[it->second];
    running.erase(it);
  };
  for (std::size_t i = 0; i < methods.size(); ++i) {
    while (int(running.size()) >= jobs) reap();
    files[i] = dir / (".worker_" + methods[i] + "_" + std::to_string(::getpid()) + ".txt");
    const pid_t pid = fork_child(methods[i], [&] {
      const auto text = serialize(run(methods[i]));
      std::ofstream out(files[i]);
      out << text;
      out.close();
      return out ? 0 : 3;
    });
    running[pid] = i;
  }
  while (!running.empty()) reap();
  if (!failures.empty()) throw std::runtime_error("reproduce: these methods failed:" + failures);
  std::vector<method_result> out;
  for (const auto& f : files) {
    std::ifstream in(f);
    std::stringstream text;
    text << in.rdbuf();
    out.push_back(deserialize(text.str()));
    std::filesystem::remove(f);
  }
  return out;
}

// Pretrains the base model on --pretrain-threads threads (one per core for 0) and saves it as
// the checkpoint with fingerprint fp: in a forked child (pretrain_in_child) or, under MPI, on
// rank 0 (data_parallel.hpp).
inline void pretrain_and_save(const settings& s, const run_data& d, const std::string& fp, progress& prog) {
  // One process's pretraining evaluates every test chunk itself (--pretrain-watch), also in a
  // child forked from a rank of an MPI job, which must not join the job's collectives.
  shared_evaluation() = {};
  const int threads =
      s.pretrain_threads > 0 ? s.pretrain_threads : int(std::max(1u, std::thread::hardware_concurrency()));
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
  weights_t w(s.model);
#ifdef SKILLGRAFT_REPRODUCE_CUDA
  const std::string pretext = s.device == "cuda" ? pretrain_cuda(w, s, d, prog) : pretrain(w, s, d, prog);
#else
  const std::string pretext = pretrain(w, s, d, prog);
#endif
  save_checkpoint(w, s.checkpoint_path(), fp, pretext);
}

// Pretrains the base model in a child process with settings.pretrain_threads threads and
// saves it as the checkpoint. The parent never starts an OpenMP thread pool (a pool does not
// survive fork), so it can still run one single-threaded worker per core afterwards, while
// the pretraining, one long run of one model, uses every core.
inline void pretrain_in_child(const settings& s, const run_data& d, const std::string& fp, progress& prog) {
  const pid_t pid = fork_child("pretraining", [&] {
    pretrain_and_save(s, d, fp, prog);
    return 0;
  });
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) throw std::system_error(errno, std::generic_category(), "reproduce: waitpid");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw std::runtime_error("reproduce: pretraining failed");
}

// Refuses --device cuda unless this program was built with the GPU backend and a device can
// be used. The check runs in a child: the parent must not create a CUDA context, which would
// not survive the forks that follow.
inline void check_device(const settings& s) {
  if (s.device == "cpu") return;
  if (s.device != "cuda") throw std::invalid_argument("reproduce: unknown device '" + s.device + "' (cpu or cuda)");
  // The watcher evaluates inside the CPU pretraining loop; pretrain_cuda has no such hook, and
  // ignoring the request silently would look like a watch that saw nothing.
  if (s.pretrain_watch > 0)
    throw std::invalid_argument("reproduce: --pretrain-watch watches the CPU pretraining only (not --device " + s.device +
                                ")");
  if constexpr (!built_with_cuda) {
    throw std::invalid_argument(
        "reproduce: not built with CUDA (configure with -DSKILLGRAFT_REPRODUCE_CUDA=ON, or run scripts/reproduce.sh "
        "--device cuda, which does); use --device cpu");
  } else {
#ifdef SKILLGRAFT_REPRODUCE_CUDA
    const pid_t pid = fork_child("device check", [] {
      std::string why;
      if (cuda_device_ready(why)) return 0;
      std::fprintf(stderr, "reproduce: --device cuda: %s\n", why.c_str());
      return 4;
    });
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0)
      if (errno != EINTR) throw std::system_error(errno, std::generic_category(), "reproduce: waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
      throw std::runtime_error("reproduce: --device cuda: no usable CUDA device (see above); use --device cpu");
#endif
  }
}

// Refuses a rate rule choose_rate would refuse, before the base model is pretrained and the
// grid searched: a library caller's settings never pass main.cpp's option checks, and the
// search would otherwise fail only after both.
inline void check_rate_rule(const settings& s) {
  if (!(s.lr_search_tolerance >= 0 && s.lr_search_tolerance < 1))
    throw std::invalid_argument("reproduce: the rate rule's tolerance (settings::lr_search_tolerance) must be in [0, 1), got " +
                                std::to_string(s.lr_search_tolerance));
}

// run_method on the settings' device: with --device cuda every method trains on the GPU.
template <template <class, class> class Stage = cpu_stage>
method_result run_method_on(const std::string& m, const settings& s, const weights_t& base,
                            const std::vector<double>& base_row, const probe_value& base_probe, const run_data& d,
                            progress& prog, const stage_states& states = {}) {
#ifdef SKILLGRAFT_REPRODUCE_CUDA
  if (s.device == "cuda") {
    if (states.use != stage_states::mode::none) throw std::logic_error("reproduce: no stage states on the GPU");
    return run_method_cuda(m, s, base, base_row, base_probe, d, prog);
  }
#endif
  return run_method<Stage>(m, s, base, base_row, base_probe, d, prog, states);
}

// Whether the search's runs save their stage states and the reported runs start from them
// (settings::resume_searched_stages): on the CPU in forked workers or this process, where the
// report files go (the states are kept under the output directory while the run lasts).
template <template <class, class> class Stage>
bool resumes_searched_stages(const settings& s) {
  return s.resume_searched_stages && s.write_files && s.device == "cpu" && !s.lr_grid.empty() &&
         std::is_same_v<Stage<full_t, nn::default_mlp>, cpu_stage<full_t, nn::default_mlp>>;
}
inline std::filesystem::path stage_states_root(const settings& s) { return s.out / ".stage_states"; }

// The search's run of method m at grid rate lr with its k-th search seed: its label (worker
// files, stage-state directory).
inline std::string search_label(const settings& s, const std::string& m, double lr, std::size_t k) {
  return "lr_" + m + "_" + rate_text(lr) + (k ? "_seed" + std::to_string(s.seed + k) : "");
}
inline stage_states search_run_states(const settings& s, const std::string& m, double lr, std::size_t k,
                                      const std::string& base_checksum, stage_states::mode use, std::size_t stages) {
  return {use, stage_states_root(s) / search_label(s, m, lr, k),
          stage_run_name(m, rate_text(lr), s.seed + k, base_checksum), stages};
}

// How many runs go at once: --jobs (0: one per core), at most n. One, in this process, when
// the OpenMP runtime may have started threads (its thread pool does not survive fork) or when
// a step is shared between MPI ranks.
template <template <class, class> class Stage>
int worker_count(const settings& s, int threads, std::size_t n) {
  const int jobs = s.jobs > 0 ? s.jobs : int(std::max(1u, std::thread::hardware_concurrency()));
  if (threads > 1 || !std::is_same_v<Stage<full_t, nn::default_mlp>, cpu_stage<full_t, nn::default_mlp>>) return 1;
  return std::max(1, std::min(jobs, int(n)));
}

// run(i, progress) for every label: in turn in this process with one job, else in forked
// single-threaded workers. done(result) gets the results in label order, the same bit for bit
// either way.
template <class Run, class Done>
void run_each(const std::vector<std::string>& labels, int jobs, const settings& s, progress& prog, Run&& run,
              Done&& done) {
  if (jobs <= 1) {
    for (std::size_t i = 0; i < labels.size(); ++i) done(run(i, prog));
    return;
  }
  auto results = run_in_workers(labels, jobs, s.out, [&](const std::string& label) {
    progress worker(s.quiet, /*redraw=*/false);  // line by line, each line naming its method
    const auto at = std::size_t(std::find(labels.begin(), labels.end(), label) - labels.begin());
    return run(at, worker);
  });
  for (auto& r : results) done(std::move(r));
}

// The learning-rate search (lr_search.hpp): every method trains the searched stages once per
// grid rate and search seed, evaluated on the validation split only; returns each method's
// scores and choice. base_checksum: content_checksum(base) where the search records stage states.
template <template <class, class> class Stage = cpu_stage>
std::vector<rate_choice> search_rates(const settings& s, const std::vector<std::string>& methods, const weights_t& base,
                                      const run_data& d, int threads, progress& prog,
                                      const std::string& base_checksum) {
  const run_data v = validation_data(s, d);
  const evaluator ev(d.tok, s.model);
  const auto base_row = evaluate_all(ev, base, v, s.restricted);
  const std::size_t G = s.lr_grid.size(), S = std::size_t(std::max(1, s.lr_search_seeds));
  // Run i: method i / (G S), rate (i / S) % G, seed s.seed + i % S.
  std::vector<std::string> labels;
  for (const auto& m : methods)
    for (double lr : s.lr_grid)
      for (std::size_t k = 0; k < S; ++k) labels.push_back(search_label(s, m, lr, k));
  const bool record = resumes_searched_stages<Stage>(s);
  if (record && base_checksum.empty()) throw std::logic_error("reproduce: stage states need the base model's checksum");
  if (record) std::filesystem::remove_all(stage_states_root(s));  // a failed run's
  const int jobs = worker_count<Stage>(s, threads, labels.size());
  prog.note("learning-rate search: " + std::to_string(methods.size()) + " methods x " + std::to_string(G) +
            " rates x " + std::to_string(S) + " seed(s), " + std::to_string(v.targets.size()) + " stage(s) each, " +
            std::to_string(s.validation_examples) + " validation examples per target, " + std::to_string(jobs) +
            " at a time");
  std::vector<double> score;
  run_each(
      labels, jobs, s, prog,
      [&](std::size_t i, progress& p) {
        settings at_rate = s;
        at_rate.lr = at_rate.lora_lr = s.lr_grid[(i / S) % G];
        at_rate.seed = s.seed + i % S;
        const std::string& m = methods[i / (G * S)];
        const stage_states states =
            record && resumable_method(m)
                ? search_run_states(s, m, at_rate.lr, i % S, base_checksum, stage_states::mode::record, 0)
                : stage_states{};
        auto r = run_method_on<Stage>(m, at_rate, base, base_row, probe_value{}, v, p, states);
        r.seed = at_rate.seed;
        return r;
      },
      [&](const method_result& r) {
        score.push_back(validation_gain(r));
        prog.note(r.name + " at lr " + rate_text(r.lr) + (S > 1 ? ", seed " + std::to_string(r.seed) : "") +
                  ": validation gain " + signed1(score.back()));
      });
  std::vector<rate_choice> chosen;
  for (std::size_t m = 0; m < methods.size(); ++m) {
    std::vector<std::vector<double>> per_seed;
    for (std::size_t g = 0; g < G; ++g) {
      const auto at = score.begin() + long((m * G + g) * S);
      per_seed.emplace_back(at, at + long(S));
    }
    chosen.push_back(choose(methods[m], s.lr_grid, per_seed, s.lr_search_tolerance));
    prog.note(methods[m] + ": learning rate " + chosen_text(chosen.back()));
    if (record)  // only the chosen rate's states are read again
      for (double lr : s.lr_grid)
        for (std::size_t k = 0; k < S && lr != chosen.back().rate; ++k)
          std::filesystem::remove_all(stage_states_root(s) / search_label(s, methods[m], lr, k));
  }
  return chosen;
}

// Stage: where the methods' steps train (cpu_stage; data_parallel.hpp's mpi_stage shares each
// step between the ranks of an MPI job, which then run the methods in turn, never forked).
template <template <class, class> class Stage = cpu_stage>
pipeline_result run_pipeline(const settings& s, progress& prog) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  pipeline_result res;
  check_device(s);  // before anything is written
  check_rate_rule(s);
  check_cache(s);  // refuses a cache it must not overwrite, before anything is written
  if (s.write_files) std::filesystem::create_directories(s.out);
  const int threads = std::max(1, s.threads);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
  run_data d(s);
  if (s.model.text.vocab_size != d.tok.size())
    throw std::invalid_argument("reproduce: the model's vocabulary (" + std::to_string(s.model.text.vocab_size) +
                                ") is not the tokenizer's (" + std::to_string(d.tok.size()) + ")");
  weights_t base(s.model);
  const std::string fp = fingerprint(s);
  if (load_checkpoint(base, s.checkpoint_path(), fp)) {
    prog.note("base model: loaded " + s.checkpoint_path().string() + " (delete it to pretrain again)");
  } else {
    const auto t0 = clock::now();
    pretrain_in_child(s, d, fp, prog);
    res.pretrain_seconds = std::chrono::duration<double>(clock::now() - t0).count();
    if (!load_checkpoint(base, s.checkpoint_path(), fp))
      throw std::runtime_error("reproduce: pretraining did not leave a readable " + s.checkpoint_path().string());
    res.pretrained = true;
    prog.note("base model: pretrained in " + fmt(res.pretrain_seconds) + " s, saved to " + s.checkpoint_path().string());
  }
  evaluator ev(d.tok, s.model);
  res.base_row = evaluate_all(ev, base, d, s.restricted);
  const auto base_probe = ev.counting_bias(base, d.probe, base);
  {
    std::string line = "base model accuracy (%):";
    for (std::size_t j = 0; j < d.tests.size(); ++j) line += " " + d.tests[j].task + " " + fmt(100 * res.base_row[j]);
    prog.note(line + "; counting bias " + fmt(base_probe.number_mass, "%.4f"));
  }
  std::vector<std::string> todo;
  for (const auto& m : s.methods) {
    if (method_available(m)) {
      todo.push_back(m);
    } else {
      prog.note(m + ": skipped (" + method_description(m) + " is not available in this build)");
      res.skipped.push_back(m);
    }
  }
  // Every method once per fine-tuning seed, on the same base model: run i of a method trains
  // its stages with seed s.seed + i (data streams, LoRA's initialisation).
  struct job {
    std::string method;
    std::uint64_t seed;
    std::string label() const { return method + ".seed" + std::to_string(seed); }
  };
  std::vector<job> runs;
  for (const auto& m : todo)
    for (int i = 0; i < std::max(1, s.seeds); ++i) runs.push_back({m, s.seed + std::uint64_t(i)});
  // What the search's stage states and the runs that resume from them are checked against.
  const std::string base_checksum = resumes_searched_stages<Stage>(s) ? content_checksum(base) : "";
  if (!s.lr_grid.empty() && !todo.empty()) {
    const auto t0 = clock::now();
    res.rates = search_rates<Stage>(s, todo, base, d, threads, prog, base_checksum);
    res.lr_search_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  }
  // A run with one of the search's seeds starts where the search's run at its rate ended.
  const bool resume = !res.rates.empty() && resumes_searched_stages<Stage>(s);
  auto run_one = [&](const job& j, progress& p) {
    settings si = s;
    si.seed = j.seed;
    si.lr = si.lora_lr = rate_of(j.method, res.rates, s);
    const std::size_t k = std::size_t(j.seed - s.seed);
    const stage_states states =
        resume && resumable_method(j.method) && k < std::size_t(std::max(1, s.lr_search_seeds))
            ? search_run_states(s, j.method, si.lr, k, base_checksum, stage_states::mode::resume, searched_stages(s, d))
            : stage_states{};
    auto r = run_method_on<Stage>(j.method, si, base, res.base_row, base_probe, d, p, states);
    r.seed = j.seed;
    return r;
  };
  auto finish = [&](method_result r) {
    r.recipe = method_description(r.name);
    // The first seed's matrix keeps the plain name (it is the run with the base model's seed).
    const std::string suffix = r.seed == s.seed ? "" : "_seed" + std::to_string(r.seed);
    if (s.write_files) cl::write_accuracy_csv(s.out / ("accuracy_" + r.name + suffix + ".csv"), matrix_of(r, d));
    auto sm = summarize(r, d);
    prog.note(r.name + (s.seeds > 1 ? " seed " + std::to_string(r.seed) : "") +
              (r.device == "cpu" ? "" : " (" + r.device + ")") + ": learning " + signed1(sm.learning) + ", held-out " +
              signed1(sm.heldout_final) + " (mean " + signed1(sm.heldout_mean) + "), counting bias max " +
              fmt(sm.probe_max, "%.4f") + ", train " + fmt(sm.train_seconds) + " s, peak " + fmt(sm.peak_mib) + " MiB");
    res.methods.push_back(std::move(r));
    res.summaries.push_back(sm);
  };
  const int jobs = worker_count<Stage>(s, threads, runs.size());
  if (jobs > 1)
    prog.note("running " + std::to_string(todo.size()) + " methods x " + std::to_string(std::max(1, s.seeds)) +
              " seeds, " + std::to_string(jobs) + " at a time");
  std::vector<std::string> labels;
  for (const auto& j : runs) labels.push_back(j.label());
  run_each(
      labels, jobs, s, prog, [&](std::size_t i, progress& p) { return run_one(runs[i], p); },
      [&](method_result r) { finish(std::move(r)); });
  if (resume) std::filesystem::remove_all(stage_states_root(s));
  for (const auto& r : res.methods)
    if (r.resumed_stages > 0 && std::find(res.resumed.begin(), res.resumed.end(), r.name) == res.resumed.end())
      res.resumed.push_back(r.name);
  res.seeded = aggregate(res.summaries);
  std::vector<method_summary> means;
  for (const auto& a : res.seeded) means.push_back(a.mean);
  // The probe pictures show the first seed's runs (one line per method).
  std::vector<method_result> first_seed;
  for (const auto& r : res.methods)
    if (r.seed == s.seed) first_seed.push_back(r);
  if (!s.write_files) {  // another rank writes the reports
    res.total_seconds = std::chrono::duration<double>(clock::now() - t_start).count();
    return res;
  }
  // Reports.
  write_text(s.out / "summary.csv", summary_csv(res.summaries));
  if (!res.rates.empty()) write_text(s.out / "lr_search.csv", lr_search_csv(res.rates));
  write_text(s.out / "probe.csv", probe_csv(res.methods));
  write_text(s.out / "curves.csv", curves_csv(means));
  write_text(s.out / "learning_forgetting.svg", learning_forgetting_svg(means));
  write_text(s.out / "heldout_over_stages.svg", heldout_svg(means));
  int count_stage = 0;
  for (std::size_t k = 0; k < d.targets.size(); ++k)
    if (d.targets[k].name == "count") count_stage = int(k + 1);
  write_text(s.out / "probe_counting_stage.svg", probe_steps_svg(first_seed, count_stage, s.stage_steps));
  write_text(s.out / "probe_over_stages.svg", probe_stages_svg(first_seed));
  res.total_seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  std::string md = "# skillgraft reproduction\n\n";
  md += "Settings: " + (s.vision_pretext.steps > 0 ? "vision pretext " + std::to_string(s.vision_pretext.steps) + " steps x " +
                                                         std::to_string(s.vision_pretext.batch) + ", then "
                                                   : std::string("no vision pretext, ")) +
        "joint pretraining " + std::to_string(s.pretrain_steps) + " steps x " + std::to_string(s.pretrain_batch) +
        pretrain_mix_text(s) + ", stages " + std::to_string(s.stage_steps) + " steps x " + std::to_string(s.stage_batch) + (s.train_layers.all() ? "" : " on the LM's " + train_layers_text(s.train_layers)) +
        ", " + rates_text(s, res.rates) + ", " +
        std::to_string(s.test_examples) + " test examples per task, " +
        (s.restricted ? "restricted" : "free") + " decoding, order";
  for (const auto& t : s.order) md += " " + t;
  md += ", base-model seed " + std::to_string(s.seed) + ", fine-tuning seeds " + std::to_string(s.seed) +
        (s.seeds > 1 ? ".." + std::to_string(s.seed + std::uint64_t(s.seeds) - 1) : "") + ".\n\n";
  md += "Base model: " + std::string(res.pretrained ? "pretrained in " + fmt(res.pretrain_seconds) + " s" : "loaded from the cache") +
        "; whole run " + fmt(res.total_seconds) + " s.";
  if (auto f = open_cache(s.checkpoint_path())) {
    const auto note = f->metadata().find(cache_pretext_key);
    if (note != f->metadata().end()) md += " Vision pretext: " + note->second + ".";
  }
  md += "\n\n";
  if (const auto& share = shared_evaluation(); share.ranks > 1)
    md += "Evaluation divided among " + std::to_string(share.ranks) + " ranks: rank 0 decoded " +
          std::to_string(share.decoded) + " of the " + std::to_string(share.chunks) +
          " chunks of the test and validation sets.\n\n";
  md += seeded_markdown(res.seeded) + "\n";
  md += "Each number: the mean over the seeds ± the half-width of its 95 % t-interval. learning: mean over targets of "
        "the gain right after its own stage; held-out Δ: mean change of the held-out tasks (negative = forgetting); "
        "counting bias: number-token mass on generated captions (base " +
        fmt(base_probe.number_mass, "%.4f") + ").\n\n";
  {
    std::vector<double> held, targ;
    for (std::size_t j = 0; j < d.tests.size(); ++j) (d.tests[j].target ? targ : held).push_back(res.base_row[j]);
    md += "Test-set noise (binomial standard error at the base model's accuracies, " + std::to_string(s.test_examples) +
          " examples per task): " + fmt(mean_accuracy_standard_error(held, s.test_examples), "%.2f") +
          " points for the mean over the held-out tasks, " + fmt(mean_accuracy_standard_error(targ, s.test_examples), "%.2f") +
          " for the mean over the targets. The test sets are the same for every seed and method.\n\n";
  }
  md += lr_search_markdown(res.rates, s, searched_stages(s, d), res.lr_search_seconds);
  if (!res.resumed.empty()) {
    const std::size_t K = searched_stages(s, d);
    std::string who;
    for (const auto& m : res.resumed) who += (who.empty() ? "" : ", ") + m;
    const int S = std::min(std::max(1, s.seeds), std::max(1, s.lr_search_seeds));
    md += "The reported runs of " + who + " with seed" + (S > 1 ? "s " + std::to_string(s.seed) + ".." + std::to_string(s.seed + std::uint64_t(S) - 1) : " " + std::to_string(s.seed)) +
          " took their first " + (K == 1 ? std::string("stage") : std::to_string(K) + " stages") +
          " from the search's runs at the chosen rate and seed: the same steps on the same data from the same base "
          "model, so the same numbers bit for bit as training them again (their train s include those stages).\n\n";
  }
  md += comparison_markdown(res.seeded);
  md += "Mean held-out accuracy (%) after each stage:\n\n" + stages_markdown(res.seeded, s.order) + "\n";
  if (const auto rec = recovery_markdown(res.seeded, s.order); !rec.empty()) md += rec + "\n";
  if (s.device != "cpu") {
    md += "Device: pretraining " + std::string(res.pretrained ? "on " + s.device : "loaded from the cache") +
          "; training of each method on:";
    for (const auto& r : first_seed) md += " " + r.name + " " + r.device + ",";
    md.back() = '.';
    md += " Evaluation and probes on the CPU; peak memory is the training device's.\n\n";
  }
  for (const auto& r : res.methods) {
    md += "## " + r.name + (s.seeds > 1 ? ", seed " + std::to_string(r.seed) : "") + "\n\n```\n" +
          cl::accuracy_table(matrix_of(r, d)) + "```\n\nLast training loss of each stage:";
    for (double l : r.final_loss) md += " " + fmt(l, "%.6f");
    md += "\n\n";
  }
  if (!res.skipped.empty()) {
    md += "Not run (not available in this build):";
    for (const auto& m : res.skipped) md += " " + m;
    md += "\n";
  }
  write_text(s.out / "report.md", md);
  return res;
}

}  // namespace skillgraft::reproduce
