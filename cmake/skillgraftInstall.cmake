# Install rules and the exported CMake package for skillgraft (included by the
# top-level CMakeLists.txt after the `skillgraft` INTERFACE target exists).
#
# What gets installed, relative to CMAKE_INSTALL_PREFIX:
#   include/skillgraft/...                              every header under include/
#   share/cmake/skillgraft/skillgraftConfig.cmake       (SKILLGRAFT_INSTALL_CMAKEDIR)
#                          skillgraftConfigVersion.cmake
#                          skillgraftBlas.cmake         skillgraft::blas, the CPU GEMM library
#                          skillgraftTargets.cmake      skillgraft::skillgraft
#                          skillgraftCudaTargets.cmake  skillgraft::cuda (only with SKILLGRAFT_CUDA=ON)
#   share/doc/skillgraft/LICENSE                        Apache-2.0 (CMAKE_INSTALL_DOCDIR)
#
# Consumers: find_package(skillgraft 0.1 CONFIG REQUIRED [COMPONENTS cuda]).
# The package is architecture independent (header-only), so it lives under share/.
# The internal warnings target `skillgraft_dev` is never installed or exported.

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

option(SKILLGRAFT_INSTALL "Generate install rules and the CMake package (find_package(skillgraft))" ${PROJECT_IS_TOP_LEVEL})
option(SKILLGRAFT_CUDA "Define skillgraft::cuda (CUDA toolkit, cuBLAS, Thrust) and install the package's 'cuda' component" OFF)
set(SKILLGRAFT_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/skillgraft" CACHE STRING
  "Where the package configuration files are installed, relative to the prefix (vcpkg uses share/skillgraft)")
mark_as_advanced(SKILLGRAFT_INSTALL_CMAKEDIR)

# Minimum dependency versions the installed config asks for; keep them equal to the
# find_package calls in CMakeLists.txt.
set(SKILLGRAFT_EIGEN_MIN_VERSION 3.4)
set(SKILLGRAFT_BOOST_MIN_VERSION 1.74)

if(SKILLGRAFT_CUDA)
  include(${CMAKE_CURRENT_LIST_DIR}/skillgraftCuda.cmake)
endif()

if(NOT SKILLGRAFT_INSTALL)
  return()
endif()

# --- headers -------------------------------------------------------------------------------
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  COMPONENT skillgraft_headers
  PATTERN ".*" EXCLUDE)

# --- licence: Apache-2.0 ------------------------------------------------------------------
set(SKILLGRAFT_LICENSE "Apache-2.0")
install(FILES ${PROJECT_SOURCE_DIR}/LICENSE
  DESTINATION ${CMAKE_INSTALL_DOCDIR}
  COMPONENT skillgraft_headers)

# --- targets: one export set per package component ----------------------------------------
install(TARGETS skillgraft EXPORT skillgraftTargets COMPONENT skillgraft_headers)
install(EXPORT skillgraftTargets
  NAMESPACE skillgraft::
  FILE skillgraftTargets.cmake
  DESTINATION ${SKILLGRAFT_INSTALL_CMAKEDIR}
  COMPONENT skillgraft_headers)

set(SKILLGRAFT_PACKAGE_COMPONENTS "")
if(SKILLGRAFT_CUDA)
  install(TARGETS skillgraft_cuda EXPORT skillgraftCudaTargets COMPONENT skillgraft_headers)
  install(EXPORT skillgraftCudaTargets
    NAMESPACE skillgraft::
    FILE skillgraftCudaTargets.cmake
    DESTINATION ${SKILLGRAFT_INSTALL_CMAKEDIR}
    COMPONENT skillgraft_headers)
  list(APPEND SKILLGRAFT_PACKAGE_COMPONENTS cuda)
endif()

# --- package configuration and version ----------------------------------------------------
# Values the config template records about this install.
if(SKILLGRAFT_OPENMP)
  set(SKILLGRAFT_PACKAGE_OPENMP ON)
else()
  set(SKILLGRAFT_PACKAGE_OPENMP OFF)
endif()

configure_package_config_file(
  ${CMAKE_CURRENT_LIST_DIR}/skillgraftConfig.cmake.in
  ${PROJECT_BINARY_DIR}/skillgraft-package/skillgraftConfig.cmake
  INSTALL_DESTINATION ${SKILLGRAFT_INSTALL_CMAKEDIR}
  NO_SET_AND_CHECK_MACRO)

# Semantic versioning: find_package(skillgraft X.Y.Z) accepts an installed version V when
# V >= X.Y.Z and V has the same major number as X (SameMajorVersion). Header-only, so the
# version file does not check the consumer's pointer size (ARCH_INDEPENDENT).
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/skillgraft-package/skillgraftConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMajorVersion
  ARCH_INDEPENDENT)

install(FILES
  ${PROJECT_BINARY_DIR}/skillgraft-package/skillgraftConfig.cmake
  ${PROJECT_BINARY_DIR}/skillgraft-package/skillgraftConfigVersion.cmake
  ${CMAKE_CURRENT_LIST_DIR}/skillgraftBlas.cmake
  DESTINATION ${SKILLGRAFT_INSTALL_CMAKEDIR}
  COMPONENT skillgraft_headers)
