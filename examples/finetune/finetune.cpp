// Fine-tuning a Hugging Face checkpoint with skillgraft, top to bottom.
//
//   finetune <checkpoint-dir> <tokens.txt> <out-dir> [recipe] [steps]
//
// <checkpoint-dir>: what save_pretrained writes for a Llama or Qwen2 model (config.json and
// model.safetensors, or shards). <tokens.txt>: one training sequence per line, as token ids
// separated by spaces, e.g. from Python: print(*tokenizer(line)["input_ids"]). [recipe]: a
// name from skillgraft::recipe_names() (default mlp_gate_up). The program fine-tunes with
// that recipe, evaluates, saves a task checkpoint, trains a LoRA adapter, saves it the PEFT
// way, and loads both back to check that they give the same loss.
//
// Data-parallel (built as finetune_mpi where MPI is found; docs/distributed.md):
//
//   mpirun -np 2 finetune_mpi <checkpoint-dir> <tokens.txt> <out-dir> [recipe] [steps]
//
// Each rank trains on its share of every batch of 8 sequences and the ranks sum the trainable
// gradients, so the run gives the result of one process on the same batches. Rank 0 alone
// prints and writes; every rank reloads what it wrote.
#include <skillgraft/cl/lora.hpp>
#include <skillgraft/cl/lora_checkpoint.hpp>
#include <skillgraft/dist/agreement.hpp>
#include <skillgraft/model/hf_checkpoint.hpp>
#include <skillgraft/policy/dispatch.hpp>
#include <skillgraft/train/adamw.hpp>
#include <skillgraft/train/optimizer_state.hpp>
#include <skillgraft/train/schedule.hpp>
#include <skillgraft/train/step.hpp>
#ifdef SKILLGRAFT_FINETUNE_MPI
#include <skillgraft/dist/mpi.hpp>
#endif

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <xtensor/xview.hpp>

namespace sg = skillgraft;
namespace fs = std::filesystem;

#ifdef SKILLGRAFT_FINETUNE_MPI
using communicator = sg::dist::mpi_communicator;
#else
using communicator = sg::train::no_communicator;
#endif

// Progress and results are printed by rank 0 alone (one process: always).
bool printing = true;
template <class... A>
void say(const char* format, A... a) {
  if (!printing) return;
  std::printf(format, a...);
  std::fflush(stdout);
}

// 1. Data: each line of the file is a sequence. A batch pads them to one length; padding and
// nothing else gets ignore_index in the labels. Labels are Hugging Face labels (label t is
// the token at t): micro_batch shifts them into next-token targets itself.
struct batch {
  sg::token_ids ids;
  sg::token_ids labels;
};

std::vector<std::vector<std::int64_t>> read_sequences(const fs::path& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error("cannot read " + file.string());
  std::vector<std::vector<std::int64_t>> out;
  for (std::string line; std::getline(in, line);) {
    std::istringstream words(line);
    std::vector<std::int64_t> seq;
    for (std::int64_t id; words >> id;) seq.push_back(id);
    if (seq.size() >= 2) out.push_back(std::move(seq));
  }
  return out;
}

std::vector<batch> make_batches(const std::vector<std::vector<std::int64_t>>& seqs, std::size_t size, std::size_t max_len) {
  std::vector<batch> out;
  for (std::size_t first = 0; first < seqs.size(); first += size) {
    const std::size_t n = std::min(size, seqs.size() - first);
    std::size_t len = 0;
    for (std::size_t i = 0; i < n; ++i) len = std::max(len, std::min(max_len, seqs[first + i].size()));
    batch b{xt::zeros<std::int64_t>({n, len}), xt::full_like(sg::token_ids::from_shape({n, len}), sg::ignore_index)};
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t t = 0; t < std::min(len, seqs[first + i].size()); ++t) b.ids(i, t) = b.labels(i, t) = seqs[first + i][t];
    out.push_back(std::move(b));
  }
  return out;
}

// This rank's rows of a batch: the ranks split every batch, so together they train on the
// same batches as one process would.
batch share_of(const batch& b, int rank, int ranks) {
  const std::size_t n = b.ids.shape(0), first = n * std::size_t(rank) / std::size_t(ranks),
                    last = n * std::size_t(rank + 1) / std::size_t(ranks);
  if (first == last)
    throw std::invalid_argument("a batch of " + std::to_string(n) + " sequences cannot be shared by " +
                                std::to_string(ranks) + " ranks");
  return {xt::view(b.ids, xt::range(first, last), xt::all()), xt::view(b.labels, xt::range(first, last), xt::all())};
}

// 2. Evaluation: the model returns hidden states; the loss applies the LM head in chunks.
// The evaluation form of masked_cross_entropy takes no gradients.
template <class Model>
double eval_loss(const Model& model, const typename Model::weights_t& w, const std::vector<batch>& data) {
  double sum = 0;
  std::size_t count = 0;
  for (const auto& b : data) {
    typename Model::saved_t saved;
    const auto h = model.forward(w, b.ids, saved);
    const auto r = sg::train::masked_cross_entropy(model, w, h, sg::shift_labels(sg::hf_labels{b.labels}));
    sum += r.loss * double(r.count);
    count += r.count;
  }
  return sum / double(count);
}

// f on rank 0 alone, every rank waiting for it (a file write); one process just runs it.
template <class F>
void on_rank0(communicator& comm, const std::string& what, F&& f) {
  if constexpr (communicator::distributed) sg::dist::on_rank0(comm, what, f);
  else f();
}

// 3. Training: a model type for the recipe, gradients and AdamW state for its trainable
// tensors only, a cosine schedule, one train_step per batch with a progress line. The
// optimizer's state is saved beside the task checkpoint: with both, a run resumes exactly
// (load_optimizer_state into an adamw built for the same recipe).
template <class Model>
void train(const Model& model, typename Model::weights_t& w, const std::vector<batch>& data, long steps, double lr,
           communicator& comm, const fs::path& state_file) {
  auto grads = model.make_grads(w);
  sg::train::adamw<float> opt(model, w, grads, {.lr = lr, .weight_decay = 0.0});
  const sg::train::cosine_schedule schedule{.peak = lr, .floor = lr / 10, .warmup = steps / 10, .total = steps};
  for (long step = 0; step < steps; ++step) {
    const auto b = share_of(data[std::size_t(step) % data.size()], comm.rank(), comm.size());
    const sg::train::micro_batch<float> mb{b.ids, sg::hf_labels{b.labels}};
    const auto st =
        sg::train::train_step(model, w, grads, opt, schedule, std::span(&mb, 1), {.max_grad_norm = 1.0}, {}, comm);
    say("\rstep %ld/%ld  loss %.4f  grad norm %.3f  lr %.2e", step + 1, steps, st.loss, st.grad_norm, st.lr);
  }
  say("\n");
  on_rank0(comm, "saving the optimizer state", [&] { sg::train::save_optimizer_state(opt, state_file); });
}

// Ranks start alike (the same recipe and weights) or all stop; one process has nothing to check.
template <class W>
void check_ranks_agree(communicator& comm, const std::string& recipe, const W& w) {
  if constexpr (communicator::distributed) sg::dist::check_agreement(comm, recipe, w);
}

void check_same(const char* what, double a, double b) {
  say("%s: %.6f (reloaded) vs %.6f (trained)\n", what, a, b);
  if (std::abs(a - b) > 1e-5 * std::max(1.0, std::abs(b))) throw std::runtime_error(std::string(what) + " differs after reloading");
}

int run(int argc, char** argv, communicator& comm) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: finetune <checkpoint-dir> <tokens.txt> <out-dir> [recipe: %s] [steps]\n",
                 sg::recipe_names(" | ").c_str());
    return 2;
  }
  printing = comm.rank() == 0;
  const fs::path checkpoint = argv[1], tokens = argv[2], out = argv[3];
  const std::string recipe_name = argc > 4 ? argv[4] : "mlp_gate_up";
  const long steps = argc > 5 ? std::stol(argv[5]) : 50;

  // Load the checkpoint: config.json becomes w.config (a decoder_config), the tensors land in
  // w.embed_tokens, w.trunk.layers[i].self_attn.q_proj.weight, ..., w.norm, w.lm_head.
  auto w = sg::model::load_hf_checkpoint<float>(checkpoint);
  const auto seqs = read_sequences(tokens);
  const std::size_t split = std::max<std::size_t>(1, seqs.size() / 10), max_len = std::size_t(w.config.max_seq);
  const auto eval_data = make_batches({seqs.begin(), seqs.begin() + std::ptrdiff_t(split)}, 8, max_len);
  const auto train_data = make_batches({seqs.begin() + std::ptrdiff_t(split), seqs.end()}, 8, max_len);
  if (train_data.empty()) throw std::runtime_error(tokens.string() + " has too few sequences (at least 2 lines)");
  say("%s: %d layers, hidden %d, vocabulary %d; %zu training and %zu evaluation batches\n",
      checkpoint.string().c_str(), w.config.n_layers, w.config.hidden, w.config.vocab_size, train_data.size(),
      eval_data.size());

  // Fine-tune with the recipe named on the command line. with_recipe calls the lambda with
  // the compile-time recipe; everything inside is compiled once per recipe.
  sg::with_recipe(recipe_name, [&](auto recipe) {
    sg::model::decoder_lm<float, decltype(recipe)> model(w.config, recipe);
    say("recipe %s: %zu of %zu parameters train\n", recipe_name.c_str(), model.trainable_elements(),
        sg::model::lm_weights<float>::elements_for(w.config));
    check_ranks_agree(comm, recipe_name, w);
    const double before = eval_loss(model, w, eval_data);
    fs::create_directories(out);
    train(model, w, train_data, steps, 1e-3, comm, out / "optimizer.safetensors");
    const double after = eval_loss(model, w, eval_data);
    say("evaluation loss: %.6f -> %.6f\n", before, after);

    // A task checkpoint holds only the tensors this recipe trains (and config.json).
    on_rank0(comm, "saving the task checkpoint", [&] { sg::model::save_task_checkpoint(out / "task", model, w); });
    auto reloaded = sg::model::load_hf_checkpoint<float>(checkpoint);
    sg::model::apply_task_checkpoint(out / "task", reloaded);
    check_same("task checkpoint", eval_loss(model, reloaded, eval_data), after);
  });

  // LoRA: the recipe names adapters (lora<q>, lora<v>); their rank and alpha are the
  // config's (PEFT r and lora_alpha). attach_lora adds A (random) and B (zero), so the
  // adapted model starts exactly at the base model; only the adapters train.
  auto lora_w = sg::model::load_hf_checkpoint<float>(checkpoint);
  lora_w.config.lora_rank = 4;
  lora_w.config.lora_alpha = 8;
  constexpr auto lora_recipe = sg::trainable<sg::lora<sg::proj::q>, sg::lora<sg::proj::v>>;
  sg::model::decoder_lm<float, decltype(lora_recipe)> lora_model(lora_w.config, lora_recipe);
  say("LoRA adapters on %d projections\n", sg::cl::attach_lora(lora_model, lora_w, {.seed = 1}));
  check_ranks_agree(comm, "lora<q_proj, v_proj>", lora_w);  // the same seed gives every rank the same A
  const double lora_before = eval_loss(lora_model, lora_w, eval_data);  // B = 0: the base model's loss
  train(lora_model, lora_w, train_data, steps, 1e-2, comm, out / "adapter-optimizer.safetensors");
  const double lora_loss = eval_loss(lora_model, lora_w, eval_data);
  say("LoRA evaluation loss: %.6f -> %.6f\n", lora_before, lora_loss);

  // Saved the PEFT way (adapter_model.safetensors, adapter_config.json): PeftModel loads it.
  // Loading fills adapters attached to a fresh copy of the base model.
  on_rank0(comm, "saving the LoRA adapter", [&] { sg::cl::save_lora_adapter(out / "adapter", lora_w); });
  auto lora_back = sg::model::load_hf_checkpoint<float>(checkpoint);
  lora_back.config = lora_w.config;
  sg::cl::attach_lora(lora_model, lora_back);
  sg::cl::load_lora_adapter(out / "adapter", lora_back);
  check_same("LoRA adapter", eval_loss(lora_model, lora_back, eval_data), lora_loss);
  say("saved %s and %s\n", (out / "task").string().c_str(), (out / "adapter").string().c_str());
  return 0;
}

int main(int argc, char** argv) {
#ifdef SKILLGRAFT_FINETUNE_MPI
  sg::dist::mpi_environment mpi(argc, argv);
#endif
  try {
    communicator comm;
    return run(argc, argv, comm);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nfinetune: %s\n", e.what());
#ifdef SKILLGRAFT_FINETUNE_MPI
    sg::dist::mpi_environment::abort(1);  // the other ranks may be waiting in an exchange
#endif
    return 1;
  }
}
