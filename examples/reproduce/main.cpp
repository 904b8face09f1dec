// reproduce: the recipes' learning-vs-forgetting experiment on a small multimodal model.
//
//   reproduce [--full] [--methods llm,sa_proj,...] [--order birds,count,tissue,sign,clock]
//             [--out DIR] [--checkpoint FILE] [--seed N] [--seeds N] [--no-restrict] [--device cpu|cuda]
//             [--vision-pretrain-steps N] [--vision-pretrain-batch N] [--vision-pretrain-lr X]
//             [--pretrain-steps N] [--pretrain-batch N] [--pretrain-lr X] [--pretrain-threads N]
//             [--pretrain-mix task=weight,...] [--pretrain-focus-steps N] [--pretrain-watch N]
//             [--vision-hidden N] [--vision-layers N]
//             [--text-hidden N] [--text-heads N] [--text-kv-heads N] [--text-intermediate N] [--text-layers N]
//             [--train-layers A:B]
//             [--stage-steps N] [--stage-batch N] [--lr-grid X,Y,... | --lr X] [--test-examples N]
//             [--lr-search-stages N] [--lr-search-seeds N] [--lr-tolerance F] [--validation-examples N]
//             [--retrain-searched-stages]
//             [--jobs N] [--threads N]
//   reproduce --gateskip-sweep [--out DIR] [--order TARGET,...] [--stage-steps N] ...
//
// Writes report.md, summary.csv, accuracy_<method>.csv, probe.csv, curves.csv and four SVG
// pictures under --out (default reproduce-out/). The pretrained base model is cached there
// as base.safetensors; a rerun with the same settings skips pretraining. --gateskip-sweep runs
// the GateSkip demonstration instead (gateskip_sweep.hpp) and writes gateskip.md, .csv, .svg.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include "gateskip_sweep.hpp"
#include "pipeline.hpp"
#ifdef SKILLGRAFT_REPRODUCE_MPI
#include "data_parallel.hpp"  // reproduce_mpi: the same program as the ranks of an MPI job
#endif

namespace rp = skillgraft::reproduce;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) v.push_back(item);
  return v;
}

void usage() {
  std::cout << "usage: reproduce [options]\n"
               "  --full                 longer, more faithful run of all ten methods (6000 pretraining steps,\n"
               "                         1000 steps per stage)\n"
               "  --methods a,b,...      methods to run (default: llm,mlp,mlp_gate_up,sa_proj; --full: all): ";
  for (const auto& m : rp::all_methods()) std::cout << m << ' ';
  std::cout << "\n"
               "                         ',' alone: none, the base model is pretrained (or loaded) and evaluated only\n"
               "                         any recipe name works too: "
            << skillgraft::multimodal_recipe_names()
            << "\n"
               "  --order a,b,...        target curriculum (default birds,count,tissue,sign,clock)\n"
               "  --out DIR              output directory (default reproduce-out)\n"
               "  --checkpoint FILE      base-model cache (default DIR/base.safetensors); a file there that is not\n"
               "                         one, or (FILE given) one made with other settings, is refused, never\n"
               "                         overwritten; DIR's own cache is pretrained again when a setting changed\n"
               "  --seed N               the base model's seed, and the first fine-tuning seed (default 1)\n"
               "  --seeds N              fine-tuning seeds per method: seed, seed + 1, ... on the same base model;\n"
               "                         the table gives means with 95 % t-intervals (default 3)\n"
               "  --no-restrict          free decoding everywhere (default: restricted where a task has a format)\n"
               "  --vision-pretrain-steps N --vision-pretrain-batch N --vision-pretrain-lr X\n"
               "                         the vision encoder's own pretraining (default 4000 x 32, lr 2e-3; steps 0:\n"
               "                         none, and the joint pretraining trains the encoder from scratch)\n"
               "  --pretrain-steps N --pretrain-batch N --pretrain-lr X   the joint pretraining\n"
               "                         (default 6000 x 32, lr 1e-3)\n"
               "  --pretrain-mix t=w,...  the joint pretraining's task weights (integers; a task not named: 1; '':\n"
               "                         uniform; default colour=4,shape=4); tasks: caption colour shape position size\n"
               "                         exist relation repeat numbers\n"
               "  --pretrain-focus-steps N   the first N joint steps draw only the colour and shape questions\n"
               "  --pretrain-watch N     every N joint steps, print the colour and shape questions' accuracy\n"
               "  --stage-steps N --stage-batch N --test-examples N   each target stage's steps and batch, the test\n"
               "                         examples per task (default 300, 16, 192; --full: 1000, 16, 256)\n"
               "  --lr-grid X,Y,...      every method's peak learning rate, LoRA's too, is the smallest rate of this grid\n"
               "                         whose first stages learn their targets, on validation examples held apart from\n"
               "                         the test sets and averaged over the search seeds, within a tenth of the best\n"
               "                         rate's (or one standard error, if more); '': no search (default 5e-4,1e-3,2e-3,5e-3)\n"
               "  --lr-tolerance F       that tenth: a fraction in [0, 1) (0: one standard error only)\n"
               "  --lr-search-stages N --lr-search-seeds N --validation-examples N   the search's stages (default 2),\n"
               "                         fine-tuning seeds (default 3; 1: the highest score, no standard error) and\n"
               "                         validation examples per target (default 192)\n"
               "  --retrain-searched-stages   the reported runs of the search seeds train the searched stages again\n"
               "                         (default: they start where the search's run at the chosen rate ended them,\n"
               "                         the same numbers bit for bit)\n"
               "  --lr X --lora-lr X     fixed rates instead of the search: X for every method but LoRA, LoRA's\n"
               "                         (defaults 5e-4 and 2e-3 with --lr-grid '')\n"
               "  --pretrain-threads N   threads of the pretraining process (default 2 on every machine, so that the\n"
               "                         base model does not depend on the core count; 0: one per core)\n"
               "  --vision-hidden N --vision-layers N   a wider/deeper vision encoder (default 64, 2)\n"
               "  --text-hidden N --text-heads N --text-kv-heads N --text-intermediate N --text-layers N\n"
               "                         another language model (default 128, 4, 2, 256, 4; heads of hidden / heads\n"
               "                         features); a new size pretrains a base model of its own\n"
               "  --train-layers A:B     every method trains only the language model's layers A..B-1 (its parts\n"
               "                         outside the layers, such as llm's embeddings and head, train as before;\n"
               "                         default: all layers)\n"
               "  --jobs N               methods run at once, each in its own process (default: one per core)\n"
               "  --threads N            threads inside each process (default 1; more than 1 runs methods in turn;\n"
               "                         --threads, --jobs and --pretrain-threads: at most 4 per core, at least 8)\n"
               "  --device cpu|cuda      where pretraining and the methods train (cuda: a build with\n"
               "                         SKILLGRAFT_REPRODUCE_CUDA; every method trains there, evaluation stays on the CPU)\n"
               "  --gateskip-sweep       instead of the methods: residual gates fine-tuned with mlp_gate_up and alone on\n"
               "                         the first --order task, and alone on the general abilities, for --stage-steps;\n"
               "                         then accuracy against compute saved at skip budgets 100/90/75/50 %\n"
               "                         (gateskip.md, gateskip.csv, gateskip.svg)\n"
               "  --quiet                no progress display\n";
}

}  // namespace

int main(int argc, char** argv) {
#ifdef SKILLGRAFT_REPRODUCE_MPI
  skillgraft::dist::mpi_environment mpi(argc, argv);
#endif
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    rp::settings s = rp::default_settings();
    for (const auto& a : args)
      if (a == "--full") s = rp::full_settings();
    bool gateskip_sweep = false;
    int vision_hidden = s.model.vision.blocks.hidden, vision_layers = s.model.vision.blocks.n_layers;
    rp::text_size text = rp::text_size_of(s.model);
    std::optional<std::string> train_layers;  // --train-layers A:B, checked once the text model's size is known
    bool fixed_rate = false, grid_given = false;  // --lr / --lora-lr, --lr-grid
    for (std::size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= args.size()) throw std::invalid_argument("option " + a + " needs a value");
        return args[++i];
      };
      // The whole value as a number of type N, or a message naming the option.
      auto number = [&]<class N>(N) -> N {
        const std::string v = value();
        N x{};
        const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
        if (ec != std::errc{} || end != v.data() + v.size() || v.empty())
          throw std::invalid_argument("option " + a + " needs " +
                                      (std::is_integral_v<N> ? "an integer" : "a number") + ", got '" + v + "'");
        return x;
      };
      auto integer = [&] { return number(int{}); };
      auto real = [&] { return number(double{}); };
      if (a == "--help" || a == "-h") {
        usage();
        return 0;
      } else if (a == "--full") {
      } else if (a == "--methods") {
        const std::string v = value();
        s.methods = split(v);
        // "," alone: no method, the base model is pretrained (or loaded) and evaluated only.
        if (v.empty())
          throw std::invalid_argument("option --methods needs method names, or ',' for the base model only (see --help)");
        for (const auto& m : s.methods)
          if (!rp::method_available(m)) throw std::invalid_argument("unknown method '" + m + "'");
      } else if (a == "--order") {
        s.order = split(value());
        if (s.order.empty()) throw std::invalid_argument("option --order needs at least one task name");
      } else if (a == "--out") {
        s.out = value();
      } else if (a == "--checkpoint") {
        s.checkpoint = value();
      } else if (a == "--seed") {
        s.seed = number(std::uint64_t{});
      } else if (a == "--seeds") {
        s.seeds = integer();
      } else if (a == "--no-restrict") {
        s.restricted = false;
      } else if (a == "--vision-pretrain-steps") {
        s.vision_pretext.steps = integer();
      } else if (a == "--vision-pretrain-batch") {
        s.vision_pretext.batch = integer();
      } else if (a == "--vision-pretrain-lr") {
        s.vision_pretext.lr = real();
      } else if (a == "--pretrain-steps") {
        s.pretrain_steps = integer();
      } else if (a == "--pretrain-batch") {
        s.pretrain_batch = integer();
      } else if (a == "--pretrain-lr") {
        s.pretrain_lr = real();
      } else if (a == "--pretrain-mix") {
        s.pretrain_mix.clear();
        for (const auto& item : split(value())) {
          const auto eq = item.find('=');
          if (eq == std::string::npos)
            throw std::invalid_argument("option --pretrain-mix needs task=weight items, got '" + item + "'");
          const std::string w = item.substr(eq + 1);
          int x = -1;
          const auto [end, ec] = std::from_chars(w.data(), w.data() + w.size(), x);
          if (ec != std::errc{} || end != w.data() + w.size() || w.empty() || x < 0)
            throw std::invalid_argument("option --pretrain-mix needs a weight of 0 or more for '" + item.substr(0, eq) +
                                        "', got '" + w + "'");
          s.pretrain_mix.emplace_back(item.substr(0, eq), x);
        }
      } else if (a == "--pretrain-focus-steps") {
        s.pretrain_focus_steps = integer();
      } else if (a == "--pretrain-watch") {
        s.pretrain_watch = integer();
      } else if (a == "--pretrain-threads") {
        s.pretrain_threads = integer();
      } else if (a == "--stage-steps") {
        s.stage_steps = integer();
      } else if (a == "--stage-batch") {
        s.stage_batch = integer();
      } else if (a == "--lr") {
        s.lr = real();
        fixed_rate = true;
      } else if (a == "--lora-lr") {
        s.lora_lr = real();
        fixed_rate = true;
      } else if (a == "--lr-grid") {
        s.lr_grid = rp::parse_rate_grid(value());
        grid_given = true;
      } else if (a == "--lr-search-stages") {
        s.lr_search_stages = integer();
      } else if (a == "--lr-tolerance") {
        s.lr_search_tolerance = real();
      } else if (a == "--lr-search-seeds") {
        s.lr_search_seeds = integer();
      } else if (a == "--validation-examples") {
        s.validation_examples = integer();
      } else if (a == "--test-examples") {
        s.test_examples = integer();
      } else if (a == "--threads") {
        s.threads = integer();
      } else if (a == "--jobs") {
        s.jobs = integer();
      } else if (a == "--vision-hidden") {
        vision_hidden = integer();
      } else if (a == "--vision-layers") {
        vision_layers = integer();
      } else if (a == "--text-hidden") {
        text.hidden = integer();
      } else if (a == "--text-heads") {
        text.heads = integer();
      } else if (a == "--text-kv-heads") {
        text.kv_heads = integer();
      } else if (a == "--text-intermediate") {
        text.intermediate = integer();
      } else if (a == "--text-layers") {
        text.layers = integer();
      } else if (a == "--train-layers") {
        train_layers = value();
      } else if (a == "--gateskip-sweep") {
        gateskip_sweep = true;
      } else if (a == "--quiet") {
        s.quiet = true;
      } else if (a == "--retrain-searched-stages") {
        s.resume_searched_stages = false;
      } else if (a == "--device") {
        s.device = value();
        if (s.device != "cpu" && s.device != "cuda")
          throw std::invalid_argument("unknown device '" + s.device + "' (cpu or cuda)");
        if (s.device == "cuda" && !rp::built_with_cuda) {
          std::cerr << "reproduce: not built with CUDA (configure with -DSKILLGRAFT_REPRODUCE_CUDA=ON, or run "
                       "scripts/reproduce.sh --device cuda, which does); use --device cpu\n";
          return 2;
        }
      } else {
        throw std::invalid_argument("unknown option '" + a + "' (see --help)");
      }
    }
    auto positive = [](const char* opt, double v) {
      if (!(v > 0) || !std::isfinite(v)) {
        std::ostringstream o;
        o << "option " << opt << " must be positive, got " << v;
        throw std::invalid_argument(o.str());
      }
    };
    if (s.vision_pretext.steps < 0)
      throw std::invalid_argument("option --vision-pretrain-steps must not be negative (0: no vision pretraining), got " +
                                  std::to_string(s.vision_pretext.steps));
    positive("--vision-pretrain-batch", s.vision_pretext.batch);
    positive("--vision-pretrain-lr", s.vision_pretext.lr);
    positive("--pretrain-steps", s.pretrain_steps);
    positive("--pretrain-batch", s.pretrain_batch);
    positive("--pretrain-lr", s.pretrain_lr);
    if (s.pretrain_focus_steps < 0) throw std::invalid_argument("option --pretrain-focus-steps must not be negative");
    if (s.pretrain_watch < 0) throw std::invalid_argument("option --pretrain-watch must not be negative");
    rp::pretrain_slots(s, rp::pretrain_task_names(), false);  // names a pretraining task, leaves one to draw
    positive("--stage-steps", s.stage_steps);
    positive("--stage-batch", s.stage_batch);
    positive("--lr", s.lr);
    positive("--lora-lr", s.lora_lr);
    if (fixed_rate && grid_given && !s.lr_grid.empty())
      throw std::invalid_argument("options --lr and --lora-lr fix the learning rates, --lr-grid searches them: give one");
    if (fixed_rate) s.lr_grid.clear();  // the rates given, for every method and seed
    positive("--lr-search-stages", s.lr_search_stages);
    positive("--lr-search-seeds", s.lr_search_seeds);
    if (!(s.lr_search_tolerance >= 0 && s.lr_search_tolerance < 1))
      throw std::invalid_argument("option --lr-tolerance needs a fraction in [0, 1), got " +
                                  std::to_string(s.lr_search_tolerance));
    positive("--validation-examples", s.validation_examples);
    positive("--test-examples", s.test_examples);
    positive("--seeds", s.seeds);
    if (s.threads < 1) throw std::invalid_argument("option --threads must be at least 1");
    if (s.jobs < 0 || s.pretrain_threads < 0)
      throw std::invalid_argument("options --jobs and --pretrain-threads must not be negative (0: one per core)");
    // Far more threads or processes than cores only slows the run down, and the OpenMP
    // runtime fails or hangs creating thousands of threads: bounded, with the bound named.
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    const int most = int(std::max(8u, 4 * cores));
    for (const auto& [opt, v] : {std::pair{"--threads", s.threads}, std::pair{"--jobs", s.jobs},
                                 std::pair{"--pretrain-threads", s.pretrain_threads}})
      if (v > most)
        throw std::invalid_argument("option " + std::string(opt) + " must be at most " + std::to_string(most) +
                                    " (four per core, at least 8; this machine has " + std::to_string(cores) +
                                    " cores), got " + std::to_string(v));
    rp::resize_vision(s.model, vision_hidden, vision_layers);
    rp::resize_text(s.model, text);
    if (train_layers) s.train_layers = rp::parse_train_layers(*train_layers, s.model.text.n_layers);
#ifdef SKILLGRAFT_REPRODUCE_MPI
    if (gateskip_sweep)
      throw std::invalid_argument("reproduce_mpi: --gateskip-sweep runs in one process (use reproduce)");
    skillgraft::dist::mpi_communicator comm;
    rp::progress prog(s.quiet || comm.rank() != 0);
    auto res = rp::data_parallel_run(s, prog, comm);
    if (comm.rank() != 0) return 0;
#else
    rp::progress prog(s.quiet);
    if (gateskip_sweep) {
      const auto r = rp::run_gateskip_sweep(s, {}, prog);
      std::cout << rp::gateskip_markdown(r) << "report: " << (s.out / "gateskip.md").string() << "  (whole run "
                << rp::fmt(r.seconds) << " s)\n";
      return 0;
    }
    auto res = rp::run_pipeline(s, prog);
#endif
    std::cout << rp::seeded_markdown(res.seeded) << "\nreport: " << (s.out / "report.md").string() << "  (whole run "
              << rp::fmt(res.total_seconds) << " s)\n";
    return 0;
  } catch (const std::exception& e) {
    std::string what = e.what();
    if (what.rfind("reproduce: ", 0) == 0) what.erase(0, 11);  // one prefix, not two
    std::cerr << "reproduce: " << what << "\n";
#ifdef SKILLGRAFT_REPRODUCE_MPI
    skillgraft::dist::mpi_environment::abort(1);  // the other ranks may wait inside an exchange
#endif
    return 1;
  }
}
