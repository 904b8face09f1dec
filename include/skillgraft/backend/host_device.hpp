#pragma once
// What element-wise code needs to run on either side of a backend: the annotation that makes a
// function callable from device code under nvcc (and is empty for every other compiler), and
// the scalar math of float and double that exists on both sides (std:: functions do not).
//
// Activation policies (nn/activation.hpp) and the CUDA kernels are written with these, so one
// formula serves the CPU loops, the host-Thrust build and the GPU.
#include <cmath>
#include <limits>

#ifndef SKILLGRAFT_HD
#if defined(__CUDACC__)
#define SKILLGRAFT_HD __host__ __device__
#else
#define SKILLGRAFT_HD
#endif
#endif

namespace skillgraft::scalar {

SKILLGRAFT_HD inline float exp_(float x) { return expf(x); }
SKILLGRAFT_HD inline double exp_(double x) { return exp(x); }
SKILLGRAFT_HD inline float log_(float x) { return logf(x); }
SKILLGRAFT_HD inline double log_(double x) { return log(x); }
SKILLGRAFT_HD inline float sqrt_(float x) { return sqrtf(x); }
SKILLGRAFT_HD inline double sqrt_(double x) { return sqrt(x); }
SKILLGRAFT_HD inline float erf_(float x) { return erff(x); }
SKILLGRAFT_HD inline double erf_(double x) { return erf(x); }
SKILLGRAFT_HD inline float atan_(float x) { return atanf(x); }
SKILLGRAFT_HD inline double atan_(double x) { return atan(x); }
// Finite test for float and double on either side, without <cmath>'s isfinite (not device code).
template <class T>
SKILLGRAFT_HD inline bool is_finite(T x) {
  return x <= std::numeric_limits<T>::max() && x >= -std::numeric_limits<T>::max();
}

SKILLGRAFT_HD inline float erfc_(float x) { return erfcf(x); }
SKILLGRAFT_HD inline double erfc_(double x) { return erfc(x); }

}  // namespace skillgraft::scalar
