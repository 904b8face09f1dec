#pragma once
// The backend a tensor type belongs to: backend_of<Backend::tensor<T>>::type is Backend.
// Each backend's header specialises it for its tensor, so generic code that receives only a
// tensor (patch cutting, permutations) can still call its backend's operations.
namespace skillgraft {

template <class Tensor>
struct backend_of;

}  // namespace skillgraft
