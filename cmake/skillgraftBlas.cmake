# The CPU backend's GEMM library (include/skillgraft/backend/cpu/gemm.hpp), chosen by
# SKILLGRAFT_BLAS:
#   auto      the fastest one found, in the order bench/bench_gemm measured (docs/performance.md,
#             "Choosing the CPU GEMM"): OpenBLAS, then BLIS, then Eigen's own GEMM
#   openblas  OpenBLAS (Debian: libopenblas-openmp-dev), an error when absent
#   blis      BLIS (Debian: libblis-openmp-dev), an error when absent
#   eigen     Eigen's own GEMM, no library
# Both libraries pick their kernels for the CPU at run time, so one build serves AVX2 and
# AVX-512 machines. Their OpenMP builds are preferred: they take their thread count from
# omp_get_max_threads() and run on one thread inside an OpenMP region, as the backend needs.
#
# Defines the INTERFACE target skillgraft::blas (empty for eigen) and sets
# SKILLGRAFT_BLAS_SELECTED to openblas, blis or eigen. Included by CMakeLists.txt (which makes
# SKILLGRAFT_BLAS a cache option) and by the installed skillgraftConfig.cmake, where the choice
# the install was built with is the default and a consumer's own SKILLGRAFT_BLAS wins (the
# library is header-only: the consumer's compile decides).
if(TARGET skillgraft::blas)
  return()
endif()

if(NOT DEFINED SKILLGRAFT_BLAS)
  set(SKILLGRAFT_BLAS auto)
endif()
if(NOT SKILLGRAFT_BLAS MATCHES "^(auto|openblas|blis|eigen)$")
  message(FATAL_ERROR "SKILLGRAFT_BLAS=${SKILLGRAFT_BLAS}: expected auto, openblas, blis or eigen")
endif()

# Candidates in the order auto tries them: name, a header only it installs, its library, and
# the folders Debian keeps its threading variants in (the OpenMP one first).
set(_skillgraft_blas_openblas openblas_config.h openblas openblas-openmp openblas openblas-pthread)
set(_skillgraft_blas_blis blis.h blis blis-openmp blis blis-pthread)
set(_skillgraft_blas_openblas_debian libopenblas-openmp-dev)
set(_skillgraft_blas_blis_debian libblis-openmp-dev)

set(SKILLGRAFT_BLAS_SELECTED eigen)
add_library(skillgraft::blas INTERFACE IMPORTED)
foreach(_skillgraft_lib openblas blis)
  if(NOT SKILLGRAFT_BLAS_SELECTED STREQUAL "eigen" OR NOT SKILLGRAFT_BLAS MATCHES "^(auto|${_skillgraft_lib})$")
    continue()
  endif()
  string(TOUPPER ${_skillgraft_lib} _skillgraft_up)
  list(POP_FRONT _skillgraft_blas_${_skillgraft_lib} _skillgraft_header _skillgraft_library)
  find_path(SKILLGRAFT_${_skillgraft_up}_INCLUDE_DIR ${_skillgraft_header} PATH_SUFFIXES ${_skillgraft_blas_${_skillgraft_lib}})
  find_library(SKILLGRAFT_${_skillgraft_up}_LIBRARY ${_skillgraft_library} PATH_SUFFIXES ${_skillgraft_blas_${_skillgraft_lib}})
  mark_as_advanced(SKILLGRAFT_${_skillgraft_up}_INCLUDE_DIR SKILLGRAFT_${_skillgraft_up}_LIBRARY)
  if(SKILLGRAFT_${_skillgraft_up}_INCLUDE_DIR AND SKILLGRAFT_${_skillgraft_up}_LIBRARY)
    set(SKILLGRAFT_BLAS_SELECTED ${_skillgraft_lib})
    set_target_properties(skillgraft::blas PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${SKILLGRAFT_${_skillgraft_up}_INCLUDE_DIR}"
      INTERFACE_LINK_LIBRARIES "${SKILLGRAFT_${_skillgraft_up}_LIBRARY}"
      INTERFACE_COMPILE_DEFINITIONS SKILLGRAFT_BLAS_${_skillgraft_up})
  elseif(SKILLGRAFT_BLAS STREQUAL _skillgraft_lib)
    message(FATAL_ERROR "SKILLGRAFT_BLAS=${_skillgraft_lib} but it was not found "
                        "(Debian: ${_skillgraft_blas_${_skillgraft_lib}_debian})")
  endif()
endforeach()
if(NOT skillgraft_FIND_QUIETLY)
  message(STATUS "skillgraft: CPU GEMM: ${SKILLGRAFT_BLAS_SELECTED} (SKILLGRAFT_BLAS=${SKILLGRAFT_BLAS})")
endif()
foreach(_skillgraft_var lib up header library)
  unset(_skillgraft_${_skillgraft_var})
endforeach()
