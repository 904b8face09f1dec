#pragma once
// Sums a model's trainable gradients over the ranks of a transport, in buckets.
//
// The trainable gradients, taken in the order backward finishes them (the reverse of
// for_each_trainable: head and top layers first), are laid end to end and cut into buckets of
// at most `bucket_bytes`; a tensor may span two buckets. Buckets keep the number of messages
// low for the many small tensors (norms, biases, tiny models) and bound the staging memory for
// large ones. Each bucket is packed into one of two staging buffers, handed to the transport
// without blocking, and unpacked once the bucket two behind it is on its way: a bucket is
// packed while the one before it is on the wire. A bucket that is one whole tensor is summed
// in place, without staging. Frozen tensors have no gradient and are never visited, so the
// bytes sent per step are exactly the plan's gradient bytes. A bucket starts as soon as
// backward has reported all its gradients final (bucket_reducer is the model's gradient hook),
// or after backward (reduce_in_buckets); the buckets and their sums are the same either way.
//
// A transport provides, for the element type T of the model and memory of its backend:
//   t.template staging<T>(slot, elements) -> T*     slot 0 or 1, at least `elements` long
//   t.start_sum(T* data, std::size_t n)   -> request (summed in place over the ranks)
//   t.wait(request&, const std::string& what)       throws (naming `what`) on error or timeout
//   t.test(request&) -> bool                        optional: moves the sum on, true once done
#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/backend_of.hpp"
#include "skillgraft/backend/host_device.hpp"
#include "skillgraft/nn/gradient_hook.hpp"
#include "skillgraft/train/communicator.hpp"

namespace skillgraft::train {

namespace kernels {
template <class T>
struct copy_elements {  // dst[i] = src[i]
  T* dst;
  const T* src;
  SKILLGRAFT_HD void operator()(std::int64_t i) const { dst[i] = src[i]; }
};
}  // namespace kernels

// What one call moved: payload bytes (each rank's contribution) and messages.
struct reduction_stats {
  std::size_t bytes = 0;
  std::size_t buckets = 0;
  std::size_t during_backward = 0;  // buckets started while backward was still running
};

// A contiguous piece of one gradient tensor inside a bucket.
template <class T>
struct bucket_piece {
  T* grad;               // start of the piece in the gradient tensor
  std::size_t offset;    // where it sits in the bucket
  std::size_t elements;
};

// The buckets of a list of (data, elements) tensors, taken in the given order.
template <class T>
std::vector<std::vector<bucket_piece<T>>> cut_into_buckets(const std::vector<std::pair<T*, std::size_t>>& tensors,
                                                           std::size_t bucket_elements) {
  if (bucket_elements == 0) throw std::invalid_argument("skillgraft: a gradient bucket must hold at least one element");
  std::vector<std::vector<bucket_piece<T>>> buckets;
  std::size_t used = bucket_elements;  // "full": the first piece opens a bucket
  for (auto [data, n] : tensors) {
    std::size_t done = 0;
    while (done < n) {
      if (used == bucket_elements) {
        buckets.emplace_back();
        used = 0;
      }
      const std::size_t take = std::min(n - done, bucket_elements - used);
      buckets.back().push_back({data + done, used, take});
      used += take;
      done += take;
    }
  }
  return buckets;
}

// The sum of one step's trainable gradients over the ranks, driven by the model's backward
// through hook() (nn/gradient_hook.hpp). ready(dp) marks dp final and starts, in order, every bucket
// whose gradients are all final; finish() starts the rest and waits for all. Buckets start in
// the same order on every rank (collectives must), and the bytes are the same whether ready()
// was heard or not: overlap changes when a bucket is sent, never what is summed.
//
// A transport that only progresses inside its own calls (MPI without a progress thread)
// provides t.test(request&) -> bool; ready() polls the buckets in flight with it, so that they
// move on between layers.
template <class Transport, class Model>
class bucket_reducer {
 public:
  using T = typename Model::value_type;
  using tensor_t = typename Model::backend_type::template tensor<T>;
  bucket_reducer(Transport& transport, const Model& model, typename Model::weights_t& w, typename Model::grads_t& g,
                 std::size_t bucket_bytes)
      : transport_(transport) {
    if (bucket_bytes < sizeof(T))
      throw std::invalid_argument("skillgraft: bucket_bytes is " + std::to_string(bucket_bytes) +
                                  ", less than one gradient element (" + std::to_string(sizeof(T)) + " bytes)");
    std::vector<std::pair<T*, std::size_t>> tensors;
    model.for_each_trainable(w, g, [&](const std::string&, tensor_t&, tensor_t& dp) {
      if (dp.size()) tensors.emplace_back(dp.data(), dp.size());
    });
    std::reverse(tensors.begin(), tensors.end());  // backward's order: what it finishes first goes first
    buckets_ = cut_into_buckets(tensors, bucket_bytes / sizeof(T));
    // The bucket that holds each tensor's last element: once every tensor up to it is final,
    // the buckets up to it can go.
    tensors_.reserve(tensors.size());
    for (auto [data, n] : tensors) tensors_.push_back({data, false});
    std::size_t t = 0;  // pieces come in the tensors' order
    for (const auto& b : buckets_) {
      largest_ = std::max(largest_, size_of(b));
      const T* end = b.back().grad + b.back().elements;
      while (!(end > tensors[t].first && end <= tensors[t].first + tensors[t].second)) ++t;
      last_tensor_.push_back(t);
    }
  }
  bucket_reducer(const bucket_reducer&) = delete;
  bucket_reducer& operator=(const bucket_reducer&) = delete;

  // What model.backward(..., hook) takes: a pointer to this reducer.
  nn::gradient_hook_ref<bucket_reducer> hook() { return {this}; }

  // dp is final: send every bucket whose gradients are all final now.
  void ready(tensor_t& dp) {
    if (!dp.size()) return;
    const std::size_t i = tensor_index(dp.data());
    if (i == tensors_.size())
      throw std::logic_error("skillgraft: backward reported a gradient that is not one of the model's trainable tensors");
    tensors_[i].final = true;
    while (final_prefix_ < tensors_.size() && tensors_[final_prefix_].final) ++final_prefix_;
    while (next_ < buckets_.size() && last_tensor_[next_] < final_prefix_) start(next_++);
    if constexpr (requires(request_t& r) {
                    { transport_.test(r) } -> std::convertible_to<bool>;
                  })
      for (auto& f : slots_)
        if (f && !f->arrived) f->arrived = transport_.test(f->request);
  }

  // Starts the buckets not started yet and waits for every one; returns what was sent.
  reduction_stats finish() {
    stats_.during_backward = next_;
    while (next_ < buckets_.size()) start(next_++);
    for (std::size_t k = buckets_.size(); k < buckets_.size() + 2; ++k) complete(slots_[k % 2], staging_[k % 2]);
    return stats_;
  }

 private:
  using request_t = decltype(std::declval<Transport&>().start_sum(std::declval<T*>(), std::size_t{}));
  using B = typename backend_of<tensor_t>::type;
  struct in_flight {
    request_t request;
    std::size_t bucket;
    bool staged;
    bool arrived = false;
  };
  struct tensor_state {
    T* data;
    bool final;
  };

  static std::size_t size_of(const std::vector<bucket_piece<T>>& b) { return b.back().offset + b.back().elements; }
  // The tensor whose data starts at p; tensors_.size() if none. Backward reports in the
  // tensors' order, so the search starts where the final prefix ends and usually stops there.
  std::size_t tensor_index(const T* p) const {
    const std::size_t n = tensors_.size();
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t i = (final_prefix_ + k) % n;
      if (tensors_[i].data == p) return i;
    }
    return n;
  }

  void complete(std::optional<in_flight>& f, T* staging) {
    if (!f) return;
    if (!f->arrived)
      transport_.wait(f->request, "the sum of gradient bucket " + std::to_string(f->bucket + 1) + " of " +
                                      std::to_string(buckets_.size()));
    if (f->staged)
      for (const auto& p : buckets_[f->bucket])
        B::for_each_index(std::int64_t(p.elements), kernels::copy_elements<T>{p.grad, staging + p.offset});
    f.reset();
  }

  void start(std::size_t k) {
    const auto& b = buckets_[k];
    const int slot = int(k % 2);
    const bool whole_tensor = b.size() == 1;
    if (!whole_tensor && !staging_[slot]) staging_[slot] = transport_.template staging<T>(slot, largest_);
    complete(slots_[slot], staging_[slot]);  // the bucket two behind this one frees the slot
    T* data = b.front().grad;
    if (!whole_tensor) {
      data = staging_[slot];
      for (const auto& p : b)
        B::for_each_index(std::int64_t(p.elements), kernels::copy_elements<T>{data + p.offset, p.grad});
    }
    slots_[slot] = in_flight{transport_.start_sum(data, size_of(b)), k, !whole_tensor};
    stats_.bytes += size_of(b) * sizeof(T);
    ++stats_.buckets;
  }

  Transport& transport_;
  std::vector<std::vector<bucket_piece<T>>> buckets_;
  std::vector<tensor_state> tensors_;       // backward's order
  std::vector<std::size_t> last_tensor_;    // per bucket: the tensor of its last piece
  std::size_t largest_ = 0;
  std::size_t final_prefix_ = 0;            // tensors [0, final_prefix_) are all final
  std::size_t next_ = 0;                    // the next bucket to start
  std::optional<in_flight> slots_[2];
  T* staging_[2] = {nullptr, nullptr};
  reduction_stats stats_;
};

// Every bucket after backward: the reduce_after_backward schedule, and what overlap falls
// back to for a model whose backward takes no hook.
template <class Transport, class Model>
reduction_stats reduce_in_buckets(Transport& transport, const Model& model, typename Model::weights_t& w,
                                  typename Model::grads_t& g, std::size_t bucket_bytes) {
  return bucket_reducer<Transport, Model>(transport, model, w, g, bucket_bytes).finish();
}

// The gradient half of a distributed communicator (CRTP): the sums of train_step's gradients
// through Derived's transport, for models of Backend, and what the last step sent. Derived
// provides the transport (above) and options().bucket_bytes. Schedule: when the buckets go
// (train/communicator.hpp: overlap_with_backward, reduce_after_backward).
template <class Derived, class Backend, class Schedule = overlap_with_backward>
class bucketed_gradients {
 public:
  using bucket_schedule = Schedule;

  // Every bucket now (after backward).
  template <class Model>
  void reduce_gradients(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g) {
    check_backend<Model>();
    auto& self = static_cast<Derived&>(*this);
    last_ = reduce_in_buckets(self, model, w, g, self.options().bucket_bytes);
  }
  // A reduction that the last micro-batch's backward drives through its hook(); g must hold
  // every earlier micro-batch's gradients already. finish_reduction waits for it.
  template <class Model>
  bucket_reducer<Derived, Model> start_reduction(const Model& model, typename Model::weights_t& w,
                                                 typename Model::grads_t& g) {
    check_backend<Model>();
    auto& self = static_cast<Derived&>(*this);
    return {self, model, w, g, self.options().bucket_bytes};
  }
  template <class Model>
  void finish_reduction(bucket_reducer<Derived, Model>& r) {
    last_ = r.finish();
  }
  // What the last step sent from this rank: payload bytes, buckets, how many during backward.
  const reduction_stats& last_reduction() const { return last_; }

 private:
  template <class Model>
  static void check_backend() {
    static_assert(std::is_same_v<typename Model::backend_type, Backend>,
                  "skillgraft: this communicator sums another backend's memory than the model's (CPU models: "
                  "dist::mpi_communicator; CUDA models: dist::nccl_communicator)");
  }
  reduction_stats last_;
};

}  // namespace skillgraft::train
