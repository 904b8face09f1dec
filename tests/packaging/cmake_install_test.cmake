# Packaging test 1: plain CMake install into a fresh prefix, then a separate consumer
# project that uses only find_package(skillgraft CONFIG REQUIRED).
#   cmake -DSOURCE_DIR=<repo> -DWORK_DIR=<scratch> [-DGENERATOR=..] [-DCXX_COMPILER=..] [-DCUDA=ON]
#         -P cmake_install_test.cmake
# With -DCUDA=ON skillgraft is installed with SKILLGRAFT_CUDA=ON and a second consumer
# (consumer_cuda: a .cu file with Thrust and cuBLAS) is built through COMPONENTS cuda;
# this needs nvcc but no GPU (the program stops after its host checks when there is none).
include("${CMAKE_CURRENT_LIST_DIR}/common.cmake")
if(NOT DEFINED CUDA)
  set(CUDA OFF)
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
set(cmakedir "${prefix}/share/cmake/skillgraft")

sg_run("configure skillgraft (install only)"
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" ${SG_NESTED_ARGS}
    "-DCMAKE_INSTALL_PREFIX=${prefix}" -DSKILLGRAFT_INSTALL=ON "-DSKILLGRAFT_OPENMP=${OPENMP}"
    "-DSKILLGRAFT_CUDA=${CUDA}"
    -DSKILLGRAFT_BUILD_TESTS=OFF -DSKILLGRAFT_BUILD_BENCHMARKS=OFF -DSKILLGRAFT_BUILD_EXAMPLES=OFF)
sg_run("install into ${prefix}" COMMAND "${CMAKE_COMMAND}" --install "${WORK_DIR}/build")

# Layout: headers, config, version and targets files; no CUDA component in a non-CUDA install.
sg_check_headers("${prefix}/include")
foreach(f skillgraftConfig.cmake skillgraftConfigVersion.cmake skillgraftTargets.cmake)
  if(NOT EXISTS "${cmakedir}/${f}")
    message(FATAL_ERROR "[packaging] FAILED: ${cmakedir}/${f} was not installed")
  endif()
endforeach()
# The licence: its text, and its SPDX identifier in the package configuration.
file(READ "${SOURCE_DIR}/LICENSE" _sg_license_source)
file(READ "${prefix}/share/doc/skillgraft/LICENSE" _sg_license_installed)
if(NOT _sg_license_installed STREQUAL _sg_license_source)
  message(FATAL_ERROR "[packaging] FAILED: share/doc/skillgraft/LICENSE is not the repository's LICENSE")
endif()
file(STRINGS "${cmakedir}/skillgraftConfig.cmake" _sg_license_line REGEX "^set\\(skillgraft_LICENSE \"Apache-2.0\"\\)")
if(NOT _sg_license_line)
  message(FATAL_ERROR "[packaging] FAILED: skillgraftConfig.cmake does not set skillgraft_LICENSE to Apache-2.0")
endif()
if(CUDA AND NOT EXISTS "${cmakedir}/skillgraftCudaTargets.cmake")
  message(FATAL_ERROR "[packaging] FAILED: SKILLGRAFT_CUDA=ON did not install the cuda component")
elseif(NOT CUDA AND EXISTS "${cmakedir}/skillgraftCudaTargets.cmake")
  message(FATAL_ERROR "[packaging] FAILED: the cuda component was installed although SKILLGRAFT_CUDA is OFF")
endif()
file(READ "${cmakedir}/skillgraftTargets.cmake" targets)
if(targets MATCHES "skillgraft_dev")
  message(FATAL_ERROR "[packaging] FAILED: internal target skillgraft_dev is exported")
endif()

if(CUDA)
  # consumer_cuda's host.cpp also uses the CPU library through skillgraft::cuda.
  sg_build_consumer(consumer-cuda "${SG_PACKAGING_DIR}/consumer_cuda" "${prefix}")
  # The component is loaded only when asked for.
  sg_probe(plain "${prefix}" -DPROBE_EXPECT_CUDA=OFF)
  sg_probe(cuda_required "${prefix}" "-DPROBE_ARGS=COMPONENTS|cuda" -DPROBE_EXPECT_CUDA=ON
    EXPECT_OUTPUT "cuda_found=TRUE")
  sg_probe(version_too_new "${prefix}" -DPROBE_VERSION=0.2 EXPECT_FAILURE
    EXPECT_OUTPUT "compatible with requested version \"0\\.2\".*version: 0\\.1\\.0")
  message(STATUS "[packaging] CMake install with the cuda component + find_package consumers: PASSED")
  return()
endif()

# docs/install.md must show the consumer this test builds, verbatim.
file(READ "${SOURCE_DIR}/docs/install.md" docs)
foreach(f CMakeLists.txt main.cpp)
  file(READ "${SG_PACKAGING_DIR}/consumer/${f}" text)
  string(FIND "${docs}" "${text}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "[packaging] FAILED: docs/install.md does not contain tests/packaging/consumer/${f} verbatim")
  endif()
endforeach()

# The consumer: compiles and runs a small program.
sg_build_consumer(consumer "${SG_PACKAGING_DIR}/consumer" "${prefix}")

# find_package rules (configure only).
sg_probe(plain "${prefix}" -DPROBE_EXPECT_CUDA=OFF)
sg_probe(version_0_1 "${prefix}" -DPROBE_VERSION=0.1)
sg_probe(version_exact "${prefix}" -DPROBE_VERSION=0.1.0 -DPROBE_ARGS=EXACT)
sg_probe(version_too_new "${prefix}" -DPROBE_VERSION=0.2 EXPECT_FAILURE
  EXPECT_OUTPUT "compatible with requested version \"0\\.2\".*version: 0\\.1\\.0")
sg_probe(version_next_major "${prefix}" -DPROBE_VERSION=1.0 EXPECT_FAILURE
  EXPECT_OUTPUT "compatible with requested version \"1\\.0\".*version: 0\\.1\\.0")
sg_probe(cuda_required "${prefix}" "-DPROBE_ARGS=COMPONENTS|cuda" EXPECT_FAILURE
  EXPECT_OUTPUT "component 'cuda' was requested, but the skillgraft install")
sg_probe(cuda_optional "${prefix}" "-DPROBE_ARGS=OPTIONAL_COMPONENTS|cuda" -DPROBE_EXPECT_CUDA=OFF
  EXPECT_OUTPUT "cuda_found=FALSE")
sg_probe(unknown_component "${prefix}" "-DPROBE_ARGS=COMPONENTS|tpu" EXPECT_FAILURE
  EXPECT_OUTPUT "skillgraft has no component 'tpu'")
# A dependency that cannot be found fails find_package and names the dependency.
sg_probe(missing_dependency "${prefix}" -DCMAKE_IGNORE_PREFIX_PATH=/usr EXPECT_FAILURE
  EXPECT_OUTPUT "Could not find a package configuration file provided by \"Eigen3\".*skillgraftConfig\\.cmake:[0-9]+ \\(find_dependency\\)")

message(STATUS "[packaging] CMake install + find_package consumer: PASSED")
