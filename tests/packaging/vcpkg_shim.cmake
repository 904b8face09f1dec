# A stand-in for the vcpkg helpers that ports/skillgraft/portfile.cmake calls, so the
# portfile itself can run under `cmake -P` on a machine without the vcpkg tool.
#
# Each helper does the same observable work as vcpkg's (per vcpkg's documentation of
# vcpkg-cmake and vcpkg-cmake-config), for what this port uses: release-only builds
# (VCPKG_BUILD_TYPE release), one triplet, dependencies taken from the system rather
# than from vcpkg's installed tree. It is written for this test, not copied from vcpkg.
#
# Expects: PORT, VERSION, TARGET_TRIPLET, FEATURES, CURRENT_PACKAGES_DIR,
# CURRENT_BUILDTREES_DIR, CURRENT_INSTALLED_DIR, VCPKG_LIBRARY_LINKAGE, SG_NESTED_ARGS,
# SG_PORT_FEATURES_DECLARED (features in vcpkg.json).

# vcpkg_check_features(OUT_FEATURE_OPTIONS <var> [PREFIX <p>] [FEATURES <feature> <option>...]
#                      [INVERTED_FEATURES <feature> <option>...])
function(vcpkg_check_features)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "OUT_FEATURE_OPTIONS;PREFIX" "FEATURES;INVERTED_FEATURES")
  if(NOT arg_OUT_FEATURE_OPTIONS)
    message(FATAL_ERROR "vcpkg_check_features: OUT_FEATURE_OPTIONS is required")
  endif()
  set(out "")
  foreach(kind FEATURES INVERTED_FEATURES)
    set(pairs ${arg_${kind}})
    list(LENGTH pairs n)
    math(EXPR odd "${n} % 2")
    if(odd)
      message(FATAL_ERROR "vcpkg_check_features: ${kind} takes <feature> <option> pairs")
    endif()
    while(pairs)
      list(POP_FRONT pairs feature option)
      if(NOT feature IN_LIST SG_PORT_FEATURES_DECLARED)
        message(FATAL_ERROR "vcpkg_check_features: feature '${feature}' is not declared in vcpkg.json")
      endif()
      set(on OFF)
      if(feature IN_LIST FEATURES)
        set(on ON)
      endif()
      if(kind STREQUAL "INVERTED_FEATURES")
        if(on)
          set(on OFF)
        else()
          set(on ON)
        endif()
      endif()
      list(APPEND out "-D${option}=${on}")
      if(arg_PREFIX)
        set(${arg_PREFIX}_${option} ${on} PARENT_SCOPE)
      endif()
    endwhile()
  endforeach()
  set(${arg_OUT_FEATURE_OPTIONS} "${out}" PARENT_SCOPE)
endfunction()

# vcpkg_cmake_configure(SOURCE_PATH <dir> [OPTIONS ...] [OPTIONS_RELEASE ...] [OPTIONS_DEBUG ...]
#                       [MAYBE_UNUSED_VARIABLES ...] [GENERATOR <g>] ...)
function(vcpkg_cmake_configure)
  cmake_parse_arguments(PARSE_ARGV 0 arg
    "PREFER_NINJA;DISABLE_PARALLEL_CONFIGURE;WINDOWS_USE_MSBUILD;NO_CHARSET_FLAG"
    "SOURCE_PATH;GENERATOR;LOGFILE_BASE"
    "OPTIONS;OPTIONS_DEBUG;OPTIONS_RELEASE;MAYBE_UNUSED_VARIABLES")
  if(DEFINED arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "vcpkg_cmake_configure was passed extra arguments: ${arg_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT VCPKG_BUILD_TYPE STREQUAL "release")
    message(FATAL_ERROR "vcpkg shim: only VCPKG_BUILD_TYPE=release ports are emulated (header-only)")
  endif()
  # Every -D the port passes must be used by the project (vcpkg reports unused ones).
  set(specified "")
  foreach(option IN LISTS arg_OPTIONS arg_OPTIONS_RELEASE)
    if(option MATCHES "^-D([^:=]*)[:=]")
      list(APPEND specified "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  if(arg_MAYBE_UNUSED_VARIABLES)
    list(REMOVE_ITEM specified ${arg_MAYBE_UNUSED_VARIABLES})
  endif()

  set(bin "${CURRENT_BUILDTREES_DIR}/${TARGET_TRIPLET}-rel")
  file(REMOVE_RECURSE "${bin}")
  if(VCPKG_LIBRARY_LINKAGE STREQUAL "dynamic")
    set(shared ON)
  else()
    set(shared OFF)
  endif()
  # The arguments vcpkg adds on Linux that matter to a CMake project (minus its toolchain file).
  sg_run("vcpkg_cmake_configure (${TARGET_TRIPLET}-rel)"
    COMMAND "${CMAKE_COMMAND}" -S "${arg_SOURCE_PATH}" -B "${bin}" ${SG_NESTED_ARGS}
      ${arg_OPTIONS} ${arg_OPTIONS_RELEASE}
      -DCMAKE_BUILD_TYPE=Release
      "-DCMAKE_INSTALL_PREFIX=${CURRENT_PACKAGES_DIR}"
      -DBUILD_SHARED_LIBS=${shared}
      -DCMAKE_EXPORT_NO_PACKAGE_REGISTRY=ON
      -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
      -DCMAKE_FIND_PACKAGE_NO_SYSTEM_PACKAGE_REGISTRY=ON
      -DCMAKE_INSTALL_SYSTEM_RUNTIME_LIBS_SKIP=TRUE
      -DCMAKE_ERROR_ON_ABSOLUTE_INSTALL_DESTINATION=ON
      -DCMAKE_INSTALL_LIBDIR:STRING=lib
      -DCMAKE_INSTALL_BINDIR:STRING=bin
      -DFETCHCONTENT_FULLY_DISCONNECTED=ON
    OUTPUT_VARIABLE out)
  file(WRITE "${CURRENT_BUILDTREES_DIR}/config-${TARGET_TRIPLET}-rel-out.log" "${out}")
  if(out MATCHES "Manually-specified variables were not used by the project:\n\n([^\n]*(\n    [^\n]*)*)")
    string(REGEX MATCHALL "    [A-Za-z0-9_]+" unused "${CMAKE_MATCH_1}")
    foreach(var IN LISTS unused)
      string(STRIP "${var}" var)
      if(var IN_LIST specified)
        message(FATAL_ERROR "[packaging] FAILED: the port passes -D${var}, which the project does not use")
      endif()
    endforeach()
  endif()
  set(Z_SHIM_BUILD_DIR "${bin}" CACHE INTERNAL "")
endfunction()

# vcpkg_cmake_install([DISABLE_PARALLEL] [ADD_BIN_TO_PATH]): build the `install` target.
function(vcpkg_cmake_install)
  if(NOT Z_SHIM_BUILD_DIR)
    message(FATAL_ERROR "vcpkg_cmake_install called before vcpkg_cmake_configure")
  endif()
  sg_run("vcpkg_cmake_install" COMMAND "${CMAKE_COMMAND}" --build "${Z_SHIM_BUILD_DIR}" --target install)
endfunction()

# vcpkg_cmake_config_fixup([PACKAGE_NAME <name>] [CONFIG_PATH <dir>] [DO_NOT_DELETE_PARENT_CONFIG_PATH]
#                          [NO_PREFIX_CORRECTION])
# Release-only behaviour: move <CONFIG_PATH> to share/<name> (dropping a parent named cmake),
# then rewrite the prefix computations for a config two levels below the prefix and replace
# absolute references to the packages/installed trees.
function(vcpkg_cmake_config_fixup)
  cmake_parse_arguments(PARSE_ARGV 0 arg "DO_NOT_DELETE_PARENT_CONFIG_PATH;NO_PREFIX_CORRECTION"
    "PACKAGE_NAME;CONFIG_PATH" "")
  if(DEFINED arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "vcpkg_cmake_config_fixup was passed extra arguments: ${arg_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT arg_PACKAGE_NAME)
    set(arg_PACKAGE_NAME "${PORT}")
  endif()
  if(NOT arg_CONFIG_PATH)
    set(arg_CONFIG_PATH "share/${arg_PACKAGE_NAME}")
  endif()
  set(share "${CURRENT_PACKAGES_DIR}/share/${arg_PACKAGE_NAME}")
  set(from "${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH}")
  if(NOT EXISTS "${from}")
    message(FATAL_ERROR "[packaging] FAILED: vcpkg_cmake_config_fixup: '${from}' does not exist")
  endif()
  if(NOT arg_CONFIG_PATH STREQUAL "share/${arg_PACKAGE_NAME}")
    file(GLOB files "${from}/*")
    file(MAKE_DIRECTORY "${share}")
    file(COPY ${files} DESTINATION "${share}")
    file(REMOVE_RECURSE "${from}")
    get_filename_component(name "${from}" NAME)
    get_filename_component(parent "${from}" DIRECTORY)
    get_filename_component(parent_name "${parent}" NAME)
    string(TOLOWER "${name}" name)
    string(TOLOWER "${parent_name}" parent_name)
    if(NOT arg_DO_NOT_DELETE_PARENT_CONFIG_PATH AND parent_name STREQUAL "cmake")
      file(REMOVE_RECURSE "${parent}")
    endif()
  endif()
  file(GLOB_RECURSE cmakes "${share}/*.cmake")
  foreach(f IN LISTS cmakes)
    file(READ "${f}" contents)
    if(NOT arg_NO_PREFIX_CORRECTION)
      string(REGEX REPLACE
        "get_filename_component\\(_IMPORT_PREFIX \"\\\${CMAKE_CURRENT_LIST_FILE}\" PATH\\)(\nget_filename_component\\(_IMPORT_PREFIX \"\\\${_IMPORT_PREFIX}\" PATH\\))*"
        "get_filename_component(_IMPORT_PREFIX \"\${CMAKE_CURRENT_LIST_FILE}\" PATH)\nget_filename_component(_IMPORT_PREFIX \"\${_IMPORT_PREFIX}\" PATH)\nget_filename_component(_IMPORT_PREFIX \"\${_IMPORT_PREFIX}\" PATH)"
        contents "${contents}")
      string(REGEX REPLACE
        "get_filename_component\\(PACKAGE_PREFIX_DIR \"\\\${CMAKE_CURRENT_LIST_DIR}/\\.\\./(\\.\\./)*\" ABSOLUTE\\)"
        "get_filename_component(PACKAGE_PREFIX_DIR \"\${CMAKE_CURRENT_LIST_DIR}/../../\" ABSOLUTE)"
        contents "${contents}")
    endif()
    string(REPLACE "${CURRENT_INSTALLED_DIR}" "\${_IMPORT_PREFIX}" contents "${contents}")
    string(REPLACE "${CURRENT_PACKAGES_DIR}" "\${_IMPORT_PREFIX}" contents "${contents}")
    file(WRITE "${f}" "${contents}")
  endforeach()
endfunction()

# vcpkg_install_copyright(FILE_LIST <files...> [COMMENT <text>]): share/<port>/copyright.
function(vcpkg_install_copyright)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "COMMENT" "FILE_LIST")
  if(NOT arg_FILE_LIST)
    message(FATAL_ERROR "vcpkg_install_copyright: FILE_LIST is required")
  endif()
  set(text "")
  if(arg_COMMENT)
    string(APPEND text "${arg_COMMENT}\n\n")
  endif()
  list(LENGTH arg_FILE_LIST n)
  foreach(f IN LISTS arg_FILE_LIST)
    if(NOT EXISTS "${f}")
      message(FATAL_ERROR "vcpkg_install_copyright: ${f} does not exist")
    endif()
    file(READ "${f}" body)
    if(n GREATER 1)
      get_filename_component(name "${f}" NAME)
      string(APPEND text "${name}:\n\n")
    endif()
    string(APPEND text "${body}\n")
  endforeach()
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright" "${text}")
endfunction()
