// The --device cuda entry points compiled by nvcc: Thrust on the GPU, GEMMs through cuBLAS.
#include "device_cuda.cpp"
