# Helpers shared by the packaging test drivers (run with `cmake -P`).
#
# Every driver takes:
#   SOURCE_DIR   the skillgraft repository root
#   WORK_DIR     a scratch directory; it is deleted first, so every run starts from a clean prefix
#   GENERATOR    (optional) CMake generator for the nested builds; default: CMake's default
#   CXX_COMPILER (optional) C++ compiler for the nested builds
#   OPENMP       (optional) ON/OFF, the SKILLGRAFT_OPENMP value to install with (default ON)

cmake_minimum_required(VERSION 3.21)  # script mode: modern policies (IN_LIST, ...)

foreach(_sg_var SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${_sg_var})
    message(FATAL_ERROR "packaging test: pass -D${_sg_var}=...")
  endif()
endforeach()
if(NOT DEFINED OPENMP)
  set(OPENMP ON)
endif()
get_filename_component(SOURCE_DIR "${SOURCE_DIR}" ABSOLUTE)
get_filename_component(WORK_DIR "${WORK_DIR}" ABSOLUTE)
set(SG_PACKAGING_DIR "${CMAKE_CURRENT_LIST_DIR}")

# Arguments every nested configure gets.
set(SG_NESTED_ARGS)
if(GENERATOR)
  list(APPEND SG_NESTED_ARGS -G "${GENERATOR}")
endif()
if(CXX_COMPILER)
  list(APPEND SG_NESTED_ARGS "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
# Never pick up a package through a user or system package registry.
list(APPEND SG_NESTED_ARGS
  -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
  -DCMAKE_FIND_PACKAGE_NO_SYSTEM_PACKAGE_REGISTRY=ON
  -DCMAKE_EXPORT_NO_PACKAGE_REGISTRY=ON)

set(SG_RUN_TAG packaging)
include("${CMAKE_CURRENT_LIST_DIR}/../support/run_command.cmake")

# sg_check_headers(<installed include dir>): every file under the source include/ must be
# installed. (Existence, not content: the source tree may be edited while a test runs.)
function(sg_check_headers installed_include)
  file(GLOB_RECURSE headers RELATIVE "${SOURCE_DIR}/include" "${SOURCE_DIR}/include/*")
  list(FILTER headers EXCLUDE REGEX "(^|/)\\.")
  list(LENGTH headers n)
  if(n EQUAL 0)
    message(FATAL_ERROR "[packaging] FAILED: no headers under ${SOURCE_DIR}/include")
  endif()
  set(missing "")
  foreach(h IN LISTS headers)
    if(NOT EXISTS "${installed_include}/${h}")
      list(APPEND missing "${h}")
    endif()
  endforeach()
  if(missing)
    list(LENGTH missing nmissing)
    string(REPLACE ";" "\n  " missing "${missing}")
    message(FATAL_ERROR "[packaging] FAILED: ${nmissing} of ${n} headers missing from ${installed_include}:\n  ${missing}")
  endif()
  message(STATUS "[packaging] all ${n} headers installed in ${installed_include}")
endfunction()

# sg_build_consumer(<name> <consumer source dir> <prefix> [extra configure args...])
# Configures, builds and runs a consumer project (executable `my_app`) against <prefix> only,
# and checks that skillgraft really came from <prefix>: its config file, and its include
# directory on the compile line (never the source tree's include/).
function(sg_build_consumer name consumer_src prefix)
  set(bin "${WORK_DIR}/${name}")
  file(REMOVE_RECURSE "${bin}")
  sg_run("${name}: configure against ${prefix}"
    COMMAND "${CMAKE_COMMAND}" -S "${consumer_src}" -B "${bin}" ${SG_NESTED_ARGS}
      "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_EXPORT_COMPILE_COMMANDS=ON ${ARGN})
  file(STRINGS "${bin}/CMakeCache.txt" dir_line REGEX "^skillgraft_DIR:")
  string(REGEX REPLACE "^[^=]*=" "" found_dir "${dir_line}")
  get_filename_component(found_dir "${found_dir}" REALPATH)
  get_filename_component(real_prefix "${prefix}" REALPATH)
  string(FIND "${found_dir}/" "${real_prefix}/" at)
  if(NOT at EQUAL 0)
    message(FATAL_ERROR "[packaging] FAILED: ${name} found skillgraft in '${found_dir}', not under ${real_prefix}")
  endif()
  file(READ "${bin}/compile_commands.json" commands)
  string(FIND "${commands}" "${prefix}/include" at_prefix)
  string(FIND "${commands}" "${SOURCE_DIR}/include " at_src1)
  string(FIND "${commands}" "${SOURCE_DIR}/include\"" at_src2)
  if(at_prefix EQUAL -1 OR NOT at_src1 EQUAL -1 OR NOT at_src2 EQUAL -1)
    message(FATAL_ERROR "[packaging] FAILED: ${name} does not compile against ${prefix}/include only:\n${commands}")
  endif()
  message(STATUS "[packaging] ${name}: skillgraft from ${found_dir}")
  sg_run("${name}: build" COMMAND "${CMAKE_COMMAND}" --build "${bin}")
  sg_run("${name}: run" COMMAND "${bin}/my_app" EXPECT_OUTPUT "gradient bytes [1-9][0-9]*|no CUDA device|: OK")
endfunction()

# sg_probe(<name> <prefix> <probe args...>): configure-only project in probe/ (find_package checks).
function(sg_probe name prefix)
  set(bin "${WORK_DIR}/probe-${name}")
  file(REMOVE_RECURSE "${bin}")
  cmake_parse_arguments(PARSE_ARGV 2 arg "EXPECT_FAILURE" "EXPECT_OUTPUT" "")
  set(flags "")
  if(arg_EXPECT_FAILURE)
    set(flags EXPECT_FAILURE)
  endif()
  if(NOT DEFINED arg_EXPECT_OUTPUT)
    set(arg_EXPECT_OUTPUT ".*")
  endif()
  sg_run("probe ${name}"
    COMMAND "${CMAKE_COMMAND}" -S "${SG_PACKAGING_DIR}/probe" -B "${bin}" ${SG_NESTED_ARGS}
      "-DCMAKE_PREFIX_PATH=${prefix}" ${arg_UNPARSED_ARGUMENTS}
    ${flags} EXPECT_OUTPUT "${arg_EXPECT_OUTPUT}")
endfunction()
