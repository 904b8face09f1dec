// The method parity tests compiled by nvcc: Thrust on the GPU, GEMMs through cuBLAS.
#include "parity_methods.cpp"
