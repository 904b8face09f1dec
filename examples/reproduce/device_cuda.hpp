#pragma once
// The reproduction's training on the GPU (--device cuda): the same pretraining loop and the
// same stage loop as on the CPU (experiment.hpp), with the step run by the CUDA backend.
//
//   stage start   upload the host weights;  gradients and AdamW state in device memory
//   each step     encode on the host, upload the image batch, train::train_step
//   probe / end   download the weights; evaluation and probes run on the CPU copy
//
// Included by device_cuda.cu (nvcc: Thrust on the GPU, cuBLAS) and, to test the logic
// without a GPU, by a C++ file compiled with Thrust's host device system.
#include <optional>
#include <string>

#include "experiment.hpp"
#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/cl/teacher.hpp"
#include "skillgraft/model/multimodal.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/step.hpp"

namespace skillgraft::reproduce {

// One stage of a method on the GPU; the interface of cpu_stage (experiment.hpp). The weights
// are uploaded with LoRA's adapters when the host attached them; LwF's teacher snapshots the
// device weights.
template <class R, class Mlp>
class cuda_stage {
 public:
  using host_model_t = model::multimodal_lm<float, R, backend::cpu, Mlp>;
  using model_t = model::multimodal_lm<float, R, backend::cuda, Mlp>;
  static constexpr const char* device = "cuda";
  static memory_ledger& meter() { return skillgraft::cuda::device_ledger(); }

  cuda_stage(R recipe, const host_model_t& host, weights_t& w, double lr, method_kind kind, const settings& s)
      : mm_(w.config, recipe, host.mlp_options()),
        w_(model::to_backend<backend::cuda>(w)),
        g_(mm_.make_grads(w_)),
        opt_(mm_, w_, g_, {.lr = lr, .weight_decay = 0.0}),
        s_(s) {
    if (kind == method_kind::lwf) teach_.emplace(mm_.lm(), w_.lm);
  }
  std::size_t trainable() { return mm_.trainable_elements(w_); }
  train::step_stats step(const encoded_batch& enc, const train::cosine_schedule& sched) {
    skillgraft::cuda::tensor<float> images;
    if (!enc.images.empty()) images = skillgraft::cuda::tensor<float>::from_host(enc.images, memory_use::workspace);
    train::micro_batch<float, backend::cuda> mb{enc.ids, enc.targets, enc.images.empty() ? nullptr : &images};
    return stage_step(mm_, w_, g_, opt_, sched, mb, teach_ ? &*teach_ : nullptr, s_);
  }
  void sync(weights_t& w) const { model::download(w_, w); }

 private:
  model_t mm_;
  model::multimodal_weights<float, backend::cuda> w_;
  typename model_t::grads_t g_;
  train::adamw<float, backend::cuda> opt_;
  const settings& s_;
  std::optional<cl::teacher<float, backend::cuda>> teach_;
};

// pretrain() with the joint steps on the GPU: the same initialisation and vision pretext (on
// the CPU), data, order, recipe and schedule.
inline std::string pretrain_on_device(weights_t& w, const settings& s, const run_data& d, progress& prog) {
  const std::string pretext = initial_weights(w, s, prog);
  with_pretrain_recipe(s, [&](auto r) {
    model::multimodal_lm<float, decltype(r), backend::cuda> mm(w.config, r);
    auto dw = model::to_backend<backend::cuda>(w);
    auto g = mm.make_grads(dw);
    train::adamw<float, backend::cuda> opt(mm, dw, g, {.lr = s.pretrain_lr, .weight_decay = 0.01});
    const auto sched = pretrain_schedule(s);
    pretrain_loop(s, d, mm.image_tokens(), prog, [&](const std::vector<encoded_batch>& enc) {
      std::vector<skillgraft::cuda::tensor<float>> images;
      images.reserve(enc.size());
      std::vector<train::micro_batch<float, backend::cuda>> mbs;
      for (const auto& e : enc) {
        images.emplace_back();
        if (!e.images.empty()) images.back() = skillgraft::cuda::tensor<float>::from_host(e.images, memory_use::workspace);
        mbs.push_back({e.ids, e.targets, e.images.empty() ? nullptr : &images.back()});
      }
      return train::train_step(mm, dw, g, opt, sched, std::span<const train::micro_batch<float, backend::cuda>>(mbs));
    });
    model::download(dw, w);
  });
  return pretext;
}

// run_method() with the training on the GPU.
inline method_result run_method_on_device(const std::string& m, const settings& s, const weights_t& base,
                                          const std::vector<double>& base_row, const probe_value& base_probe,
                                          const run_data& d, progress& prog) {
  method_result r;
  auto on_device = [&](auto rc, method_kind kind) {
    return run_recipe<std::remove_cv_t<decltype(rc)>, nn::default_mlp, cuda_stage>(m, rc, kind, s, base, base_row,
                                                                                   base_probe, d, prog);
  };
  if (m == "moe")
    r = run_recipe<std::remove_cv_t<decltype(moe_recipe)>, moe_policy, cuda_stage>(m, moe_recipe, method_kind::plain, s,
                                                                                  base, base_row, base_probe, d, prog);
  else if (m == "wise_ft") r = on_device(recipe::llm, method_kind::wise_ft);
  else if (m == "lwf") r = on_device(recipe::mlp, method_kind::lwf);
  else if (m == "lora") r = on_device(lora_recipe, method_kind::lora);
  else if (!is_multimodal_recipe_name(m))
    throw std::invalid_argument("reproduce: method '" + m + "' is not available in this build");
  else r = with_multimodal_recipe(m, [&](auto rc) { return on_device(rc, method_kind::plain); });
  r.recipe = method_description(m);
  return r;
}

}  // namespace skillgraft::reproduce
