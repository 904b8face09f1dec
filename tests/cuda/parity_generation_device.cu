// The generation parity tests compiled by nvcc: Thrust on the GPU, GEMMs through cuBLAS.
#include "parity_generation.cpp"
