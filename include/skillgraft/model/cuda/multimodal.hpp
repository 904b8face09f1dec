#pragma once
// The multimodal model on the CUDA backend: multimodal_lm<T, Recipe, backend::cuda>.
//
//   forward   v = vision(image),  s = projector(v),  h = lm([s ; E[ids]])
//   backward  lm' gives d s only when the projector or the vision encoder trains;
//             projector' gives d v only when the vision encoder trains.
//
// The composition is model/multimodal.hpp's, unchanged; this header supplies the device
// parts (vision encoder, projector, language model) and the weights in device memory.
// Training: train::cuda::train_step with a micro-batch whose `prefix` is the image batch
// as a device tensor [batch, size, size, channels]. Weights cross the bus whole:
// `cuda::multimodal_weights<T>::upload(host)` and `download(host)`, the host weights
// being model::multimodal_weights<T> of the same config (so checkpoints, evaluation and
// generation stay on the CPU side).
#include "skillgraft/backend/cuda/backend.hpp"
#include "skillgraft/model/decoder_lm.hpp"
#include "skillgraft/model/cuda/projector.hpp"
#include "skillgraft/model/cuda/vision_encoder.hpp"
#include "skillgraft/model/multimodal.hpp"

namespace skillgraft::model {

namespace cuda {

template <class T>
struct multimodal_weights {
  multimodal_config config;
  vision_weights<T> vision;
  projector_weights<T> projector;
  model::lm_weights<T, backend::cuda> lm;

  const skillgraft::cuda::tensor<T>& head() const { return lm.head(); }
  skillgraft::cuda::tensor<T>& head() { return lm.head(); }
  std::size_t elements() const {
    return vision.elements() + projector.elements() + lm.embed_tokens.size() + lm.trunk.elements() + lm.norm.size() +
           lm.lm_head.size();
  }

  // Host -> device.
  static multimodal_weights upload(const model::multimodal_weights<T>& h, memory_use use = memory_use::weights) {
    h.config.validate();
    multimodal_weights d;
    d.config = h.config;
    d.vision = vision_weights<T>::upload(h.vision, use);
    d.projector = projector_weights<T>::upload(h.projector, use);
    d.lm = model::to_backend<backend::cuda>(h.lm, use);
    return d;
  }
  // Device -> host, into weights of the same config.
  void download(model::multimodal_weights<T>& h) const {
    vision.download(h.vision);
    projector.download(h.projector);
    model::download(lm, h.lm);
  }
};

}  // namespace cuda

template <class T>
struct multimodal_weights_on<T, backend::cuda> {
  using type = cuda::multimodal_weights<T>;
};

}  // namespace skillgraft::model
