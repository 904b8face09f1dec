# vcpkg overlay port for skillgraft (header-only).
#   vcpkg install skillgraft --overlay-ports=<skillgraft repo>/ports          (classic mode)
#   or in vcpkg-configuration.json: { "overlay-ports": ["<skillgraft repo>/ports"] }  (manifest mode)
# The port builds from the repository that contains it. For a registry, replace the
# SOURCE_PATH lines with:
#   vcpkg_from_github(OUT_SOURCE_PATH SOURCE_PATH REPO <owner>/skillgraft REF "v${VERSION}"
#                     SHA512 <sha512 of the release archive> HEAD_REF main)

set(VCPKG_BUILD_TYPE release)  # header-only: nothing differs between debug and release

get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)
if(NOT EXISTS "${SOURCE_PATH}/include/skillgraft" OR NOT EXISTS "${SOURCE_PATH}/cmake/skillgraftInstall.cmake")
  message(FATAL_ERROR "skillgraft overlay port: expected the skillgraft sources at ${SOURCE_PATH}")
endif()

vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    cuda    SKILLGRAFT_CUDA
    openmp  SKILLGRAFT_OPENMP
)

# The CPU GEMM: OpenBLAS with the default feature `openblas`, else Eigen's own.
set(SKILLGRAFT_BLAS eigen)
if("openblas" IN_LIST FEATURES)
  set(SKILLGRAFT_BLAS openblas)
endif()

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    ${FEATURE_OPTIONS}
    -DSKILLGRAFT_BLAS=${SKILLGRAFT_BLAS}
    -DSKILLGRAFT_INSTALL=ON
    -DSKILLGRAFT_INSTALL_CMAKEDIR=share/skillgraft
    -DSKILLGRAFT_BUILD_TESTS=OFF
    -DSKILLGRAFT_BUILD_BENCHMARKS=OFF
    -DSKILLGRAFT_BUILD_EXAMPLES=OFF
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME skillgraft CONFIG_PATH share/skillgraft)

# Header-only: no libraries, and no debug tree.
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/lib" "${CURRENT_PACKAGES_DIR}/debug")

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")

# Apache-2.0: the repository's LICENSE becomes share/skillgraft/copyright.
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
