#pragma once
// Token embeddings on the CUDA backend (math in model/decoder_lm.hpp). Ids are host data and are
// uploaded per batch. The gradient is a deterministic scatter-add: the positions of each distinct
// id are grouped on the host (a stable sort keeps them in (batch, position) order) and one device
// thread per (id, feature) adds them in that order, so repeated ids never race.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "skillgraft/backend/cuda/algorithms.hpp"
#include "skillgraft/backend/cuda/tensor.hpp"

namespace skillgraft::cuda {

namespace kernels {
template <class T>
struct embed_rows {  // x[b, t] = t < P ? prefix[b, t] : E[ids[b, t - P]]
  T* x;
  const T* E;
  const T* prefix;
  const std::int64_t* ids;
  index_t P, S, d;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t j = e % d, bt = e / d, t = bt % (P + S), b = bt / (P + S);
    x[e] = t < P ? prefix[(b * P + t) * d + j] : E[ids[b * S + t - P] * d + j];
  }
};
template <class T>
struct embed_grad {  // dE[id_u, j] += dx[pos, j] for the positions of id_u, in order
  T* dE;
  const T* dx;
  const std::int64_t* ids;      // distinct ids
  const std::int64_t* offsets;  // positions of ids[u]: pos[offsets[u] .. offsets[u + 1])
  const std::int64_t* pos;      // rows of dx
  index_t d;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t u = e / d, j = e % d;
    T acc = dE[ids[u] * d + j];
    for (std::int64_t k = offsets[u]; k < offsets[u + 1]; ++k) acc += dx[pos[k] * d + j];
    dE[ids[u] * d + j] = acc;
  }
};
template <class T>
struct leading_positions {  // out[b, t] = x[b, t], t < P
  T* out;
  const T* x;
  index_t P, Tn, d;
  SKILLGRAFT_HD void operator()(index_t e) const {
    const index_t j = e % d, bt = e / d, t = bt % P, b = bt / P;
    out[e] = x[(b * Tn + t) * d + j];
  }
};
}  // namespace kernels

struct embedding_ops {
  template <class T>
  static void embed_rows(const tensor<T>& E, const std::int64_t* ids, std::size_t B, std::size_t S,
                         const tensor<T>* prefix, tensor<T>& x) {
    const std::size_t d = E.dim(1), P = x.dim(1) - S;
    const auto dev_ids = upload_indices(std::vector<std::int64_t>(ids, ids + B * S));
    for_each_index(index_t(x.size()), kernels::embed_rows<T>{x.data(), E.data(), P ? prefix->data() : nullptr,
                                                             dev_ids.data(), index_t(P), index_t(S), index_t(d)});
  }

  template <class T>
  static void embedding_backward(const std::int64_t* ids, std::size_t B, std::size_t S, const tensor<T>& dx,
                                 tensor<T>& dE) {
    const std::size_t Tn = dx.dim(1), P = Tn - S, d = dx.dim(2), n = B * S;
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return ids[a] < ids[b]; });
    std::vector<std::int64_t> distinct, offsets, pos;
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t flat = order[k];
      if (distinct.empty() || distinct.back() != ids[flat]) {
        distinct.push_back(ids[flat]);
        offsets.push_back(std::int64_t(k));
      }
      pos.push_back(std::int64_t((flat / S) * Tn + P + flat % S));
    }
    offsets.push_back(std::int64_t(n));
    const auto d_ids = upload_indices(distinct), d_offsets = upload_indices(offsets), d_pos = upload_indices(pos);
    for_each_index(index_t(distinct.size() * d), kernels::embed_grad<T>{dE.data(), dx.data(), d_ids.data(),
                                                                        d_offsets.data(), d_pos.data(), index_t(d)});
  }

  template <class T>
  static void leading_positions(const tensor<T>& x, tensor<T>& out) {
    for_each_index(index_t(out.size()), kernels::leading_positions<T>{out.data(), x.data(), index_t(out.dim(1)),
                                                                      index_t(x.dim(1)), index_t(x.dim(2))});
  }
};

}  // namespace skillgraft::cuda
