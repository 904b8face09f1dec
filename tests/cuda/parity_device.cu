// The parity tests compiled by nvcc: Thrust on the GPU, GEMMs through cuBLAS.
#include "parity.cpp"
