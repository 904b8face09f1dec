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
// bytes sent per step are exactly the plan's gradient bytes.
//
// A transport provides, for the element type T of the model and memory of its backend:
//   t.template staging<T>(slot, elements) -> T*     slot 0 or 1, at least `elements` long
//   t.start_sum(T* data, std::size_t n)   -> request (summed in place over the ranks)
//   t.wait(request&, const std::string& what)       throws (naming `what`) on error or timeout
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "skillgraft/backend/backend_of.hpp"
#include "skillgraft/backend/host_device.hpp"

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

template <class Transport, class Model>
reduction_stats reduce_in_buckets(Transport& transport, const Model& model, typename Model::weights_t& w,
                                  typename Model::grads_t& g, std::size_t bucket_bytes) {
  using T = typename Model::value_type;
  using tensor_t = typename Model::backend_type::template tensor<T>;
  using B = typename backend_of<tensor_t>::type;
  if (bucket_bytes < sizeof(T))
    throw std::invalid_argument("skillgraft: bucket_bytes is " + std::to_string(bucket_bytes) +
                                ", less than one gradient element (" + std::to_string(sizeof(T)) + " bytes)");
  std::vector<std::pair<T*, std::size_t>> tensors;
  model.for_each_trainable(w, g, [&](const std::string&, tensor_t&, tensor_t& dp) {
    if (dp.size()) tensors.emplace_back(dp.data(), dp.size());
  });
  std::reverse(tensors.begin(), tensors.end());  // backward's order: what it finishes first goes first
  const auto buckets = cut_into_buckets(tensors, bucket_bytes / sizeof(T));

  using request_t = decltype(transport.start_sum(std::declval<T*>(), std::size_t{}));
  struct in_flight {
    request_t request;
    std::size_t bucket;
    bool staged;
  };
  std::optional<in_flight> slots[2];
  reduction_stats st;
  auto size_of = [](const std::vector<bucket_piece<T>>& b) { return b.back().offset + b.back().elements; };
  auto finish = [&](std::optional<in_flight>& f, T* staging) {
    if (!f) return;
    transport.wait(f->request, "the sum of gradient bucket " + std::to_string(f->bucket + 1) + " of " +
                                   std::to_string(buckets.size()));
    if (f->staged)
      for (const auto& p : buckets[f->bucket])
        B::for_each_index(std::int64_t(p.elements), kernels::copy_elements<T>{p.grad, staging + p.offset});
    f.reset();
  };
  std::size_t largest = 0;
  for (const auto& b : buckets) largest = std::max(largest, size_of(b));
  T* staging[2] = {nullptr, nullptr};
  for (std::size_t k = 0; k < buckets.size(); ++k) {
    const auto& b = buckets[k];
    const int slot = int(k % 2);
    const bool whole_tensor = b.size() == 1;
    if (!whole_tensor && !staging[slot]) staging[slot] = transport.template staging<T>(slot, largest);
    finish(slots[slot], staging[slot]);  // the bucket two behind this one frees the slot
    T* data = b.front().grad;
    if (!whole_tensor) {
      data = staging[slot];
      for (const auto& p : b)
        B::for_each_index(std::int64_t(p.elements), kernels::copy_elements<T>{data + p.offset, p.grad});
    }
    slots[slot] = in_flight{transport.start_sum(data, size_of(b)), k, !whole_tensor};
    st.bytes += size_of(b) * sizeof(T);
    ++st.buckets;
  }
  for (std::size_t k = buckets.size(); k < buckets.size() + 2; ++k) finish(slots[k % 2], staging[k % 2]);
  return st;
}

// The gradient half of a distributed communicator (CRTP): reduce_gradients through Derived's
// transport, for models of Backend, and what the last call sent. Derived provides the
// transport (above) and options().bucket_bytes.
template <class Derived, class Backend>
class bucketed_gradients {
 public:
  template <class Model>
  void reduce_gradients(const Model& model, typename Model::weights_t& w, typename Model::grads_t& g) {
    static_assert(std::is_same_v<typename Model::backend_type, Backend>,
                  "skillgraft: this communicator sums another backend's memory than the model's (CPU models: "
                  "dist::mpi_communicator; CUDA models: dist::nccl_communicator)");
    auto& self = static_cast<Derived&>(*this);
    last_ = reduce_in_buckets(self, model, w, g, self.options().bucket_bytes);
  }
  // What the last reduce_gradients sent from this rank: payload bytes and buckets.
  const reduction_stats& last_reduction() const { return last_; }

 private:
  reduction_stats last_;
};

}  // namespace skillgraft::train
