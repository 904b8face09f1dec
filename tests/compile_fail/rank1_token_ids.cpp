// expect: token ids of rank 1 .\[seq\]. where \[batch, seq\] is expected
// One sequence as a rank-1 tensor is refused at compile time, not with std::bad_alloc at run time.
#include "skillgraft/train/step.hpp"
namespace sg = skillgraft;
int main() {
  const xt::xtensor<std::int64_t, 1> seq = {1, 2, 3};
  const sg::train::micro_batch<float> ok{xt::atleast_2d(seq), xt::atleast_2d(seq)};
#ifndef SKILLGRAFT_CONTROL
  const sg::train::micro_batch<float> bad{seq, xt::atleast_2d(seq)};
#endif
}
