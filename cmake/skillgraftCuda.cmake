# skillgraft::cuda — what the GPU backend needs on top of skillgraft::skillgraft.
# Included by skillgraftInstall.cmake only when the project is configured with
# -DSKILLGRAFT_CUDA=ON; installed as the package's separate `cuda` component.
#
# Deliberately absent (see shared/TOOLCHAIN.md):
#   - no GPU architectures: the consumer chooses CMAKE_CUDA_ARCHITECTURES;
#   - no CUDA::cudart: exporting it next to cuBLAS drags in both the shared and the
#     static runtime; CUDA::cublas brings the runtime the consumer's CUDA language uses;
#   - no CUDA_STANDARD / cuda_std_20 compile feature: CMake 3.25 cannot request the CUDA20
#     dialect, so C++20 for .cu files is passed as a flag, only to the CUDA language.
# The CUDA language does not need to be enabled to configure skillgraft itself (the target
# is INTERFACE); a consumer compiling .cu files enables it in its own project.

find_package(CUDAToolkit REQUIRED)
# Thrust/CUB/libcudacxx (CCCL): nvcc finds them by itself, plain C++ translation units do not.
find_package(CCCL CONFIG REQUIRED HINTS "${CUDAToolkit_LIBRARY_DIR}/cmake")

add_library(skillgraft_cuda INTERFACE)
add_library(skillgraft::cuda ALIAS skillgraft_cuda)
set_target_properties(skillgraft_cuda PROPERTIES EXPORT_NAME cuda)
target_link_libraries(skillgraft_cuda INTERFACE skillgraft CUDA::cublas CCCL::CCCL)
target_compile_definitions(skillgraft_cuda INTERFACE SKILLGRAFT_HAS_CUDA=1)
target_compile_options(skillgraft_cuda INTERFACE
  "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20;--expt-relaxed-constexpr;--extended-lambda;-diag-suppress=20012>")
