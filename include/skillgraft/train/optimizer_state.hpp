#pragma once
// AdamW's state in a safetensors file, so that a run resumes where it stopped: a model
// checkpoint holds the weights, this file the moments and the step count, and together they
// continue bit for bit as if the run had not stopped (same seed, data order and thread count).
//
//   <name>.exp_avg      m of the trained tensor <name> (its Hugging Face name), as T
//   <name>.exp_avg_sq   v of it
//   __metadata__        skillgraft.optimizer = "adamw", skillgraft.optimizer.step = t,
//                       lr, beta1, beta2, eps, weight_decay (printed to round-trip exactly)
//
// The moment names are PyTorch's (torch.optim.AdamW's state keys); PyTorch indexes its state
// by parameter position, this file by the parameter's name, so a state saved for one recipe
// cannot silently land on another recipe's tensors. Loading restores the step count and the
// options (as torch's load_state_dict restores its param_groups); a schedule sets lr again at
// the next step. Only the tensors the recipe trains have moments, so the file of `sa_proj` on a
// 4-layer model holds a quarter of `llm`'s trunk moments.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "skillgraft/io/safetensors.hpp"
#include "skillgraft/train/adamw.hpp"

namespace skillgraft::train {

inline constexpr const char* optimizer_state_key = "skillgraft.optimizer";

namespace detail {

inline std::string exact(double x) {
  char b[40];
  std::snprintf(b, sizeof b, "%.17g", x);
  return b;
}

// A metadata field of the state file, parsed as a finite number (or a step count).
inline double state_number(const io::safetensors_file& f, const std::string& key) {
  const auto& meta = f.metadata();
  const auto it = meta.find(key);
  if (it == meta.end())
    throw io::safetensors_error("skillgraft: optimizer state " + f.path().string() + " has no metadata field " + key);
  double x = 0;
  const char* end = it->second.data() + it->second.size();
  const auto r = std::from_chars(it->second.data(), end, x);
  if (r.ec != std::errc() || r.ptr != end || !std::isfinite(x))
    throw io::safetensors_error("skillgraft: optimizer state " + f.path().string() + ": metadata field " + key +
                                " is " + io::printable(it->second) + ", not a finite number");
  return x;
}

}  // namespace detail

// Writes opt's state to `file` (atomically: an existing file is replaced only by a complete one).
template <class T, class Backend>
void save_optimizer_state(const adamw<T, Backend>& opt, const std::filesystem::path& file) {
  io::safetensors_writer out;
  std::vector<cpu::tensor<T>> host;  // the writer refers to its tensors until write()
  std::size_t slots = 0;
  opt.for_each_state([&](const std::string&, const auto&, const auto&) { ++slots; });
  host.reserve(2 * slots);
  opt.for_each_state([&](const std::string& name, const auto& m, const auto& v) {
    for (auto [moment, suffix] : {std::pair{&m, ".exp_avg"}, std::pair{&v, ".exp_avg_sq"}}) {
      host.emplace_back(moment->shape(), memory_use::workspace);
      Backend::download(*moment, host.back());
      out.add(name + suffix, host.back(), std::is_same_v<T, double> ? io::dtype::f64 : io::dtype::f32);
    }
  });
  const auto& o = opt.options();
  out.set_metadata(optimizer_state_key, "adamw");
  out.set_metadata(std::string(optimizer_state_key) + ".step", std::to_string(opt.steps()));
  out.set_metadata(std::string(optimizer_state_key) + ".lr", detail::exact(o.lr));
  out.set_metadata(std::string(optimizer_state_key) + ".beta1", detail::exact(o.beta1));
  out.set_metadata(std::string(optimizer_state_key) + ".beta2", detail::exact(o.beta2));
  out.set_metadata(std::string(optimizer_state_key) + ".eps", detail::exact(o.eps));
  out.set_metadata(std::string(optimizer_state_key) + ".weight_decay", detail::exact(o.weight_decay));
  out.write(file);
}

// Reads a state written by save_optimizer_state into opt, which must have been built for the
// same trained tensors (same model and recipe). Everything is read and checked before opt
// changes: a missing, extra or misshapen moment, a negative or non-finite value, a truncated or
// malformed file throws, naming the tensor or field, and leaves opt as it was.
template <class T, class Backend>
void load_optimizer_state(adamw<T, Backend>& opt, const std::filesystem::path& file) {
  const io::safetensors_file f(file);
  const std::string where = "optimizer state " + file.string();
  const auto kind = f.metadata().find(optimizer_state_key);
  if (kind == f.metadata().end() || kind->second != "adamw")
    throw io::safetensors_error("skillgraft: " + where + " is not an AdamW state (metadata " + optimizer_state_key +
                                " is " + (kind == f.metadata().end() ? "missing" : io::printable(kind->second)) + ")");
  const std::string key = optimizer_state_key;
  const double step = detail::state_number(f, key + ".step");
  if (step < 0 || step != std::floor(step) || step > 1e15)
    throw io::safetensors_error("skillgraft: " + where + ": the step count " + detail::exact(step) +
                                " is not a count of steps");
  adamw_options o;
  o.lr = detail::state_number(f, key + ".lr");
  o.beta1 = detail::state_number(f, key + ".beta1");
  o.beta2 = detail::state_number(f, key + ".beta2");
  o.eps = detail::state_number(f, key + ".eps");
  o.weight_decay = detail::state_number(f, key + ".weight_decay");

  std::set<std::string> expected;
  std::vector<std::pair<typename adamw<T, Backend>::tensor_t, typename adamw<T, Backend>::tensor_t>> moments;
  opt.for_each_state([&](const std::string& name, const auto& m, const auto& v) {
    std::pair<cpu::tensor<T>, cpu::tensor<T>> host{cpu::tensor<T>(m.shape(), memory_use::workspace),
                                                   cpu::tensor<T>(v.shape(), memory_use::workspace)};
    for (auto [dst, suffix, nonnegative] :
         {std::tuple{&host.first, ".exp_avg", false}, std::tuple{&host.second, ".exp_avg_sq", true}}) {
      const std::string n = name + suffix;
      expected.insert(n);
      if (!f.contains(n))
        throw io::safetensors_error("skillgraft: " + where + " has no " + n +
                                    ": it was saved for another model or recipe (this optimizer trains " + name + ")");
      f.check_range<T>(n);
      f.load_into(n, *dst);
      for (std::size_t i = 0; i < dst->size(); ++i)
        if (!std::isfinite(double((*dst)[i])) || (nonnegative && (*dst)[i] < T(0)))
          throw io::safetensors_error("skillgraft: " + where + ": " + n + " holds " + detail::exact(double((*dst)[i])) +
                                      " at element " + std::to_string(i) +
                                      (nonnegative ? " (a second moment is finite and >= 0)" : " (a moment is finite)"));
    }
    moments.emplace_back(Backend::upload(host.first, memory_use::optimizer_state),
                         Backend::upload(host.second, memory_use::optimizer_state));
  });
  for (const auto& t : f.header().tensors)
    if (!expected.count(t.name))
      throw io::safetensors_error("skillgraft: " + where + " holds " + io::printable(t.name) +
                                  ", which this optimizer does not train: it was saved for another model or recipe");
  opt.restore(long(step), o, std::move(moments));
}

}  // namespace skillgraft::train
