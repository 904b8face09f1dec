// The multimodal parity tests compiled by nvcc: Thrust on the GPU, GEMMs through cuBLAS.
#include "parity_multimodal.cpp"
