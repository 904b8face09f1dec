# A command run from a `cmake -P` test driver, its exit status and output checked: shared by
# the packaging drivers (tests/packaging/common.cmake) and tests/support/expect_run.cmake.
if(NOT DEFINED SG_RUN_TAG)
  set(SG_RUN_TAG run)
endif()

# sg_run(<what> COMMAND <cmd...> [EXPECT_FAILURE] [EXPECT_OUTPUT <regex>] [OUTPUT_VARIABLE <var>])
# Runs a command; on an unexpected result prints its whole output and stops the test.
# SG_RUN_TAG names the caller in its messages.
function(sg_run what)
  cmake_parse_arguments(PARSE_ARGV 1 arg "EXPECT_FAILURE" "EXPECT_OUTPUT;OUTPUT_VARIABLE" "COMMAND")
  message(STATUS "[${SG_RUN_TAG}] ${what}")
  execute_process(COMMAND ${arg_COMMAND}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(arg_EXPECT_FAILURE)
    if(rc EQUAL 0)
      message(FATAL_ERROR "[${SG_RUN_TAG}] FAILED: ${what}: succeeded but must fail.\n--- output ---\n${out}")
    endif()
  elseif(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${arg_COMMAND}")
    message(FATAL_ERROR "[${SG_RUN_TAG}] FAILED: ${what} (exit ${rc})\n  command: ${cmd}\n--- output ---\n${out}")
  endif()
  # CMake wraps its messages at arbitrary spaces: match against the output with every run
  # of white space turned into one space.
  string(REGEX REPLACE "[ \t\r\n]+" " " flat "${out}")
  if(DEFINED arg_EXPECT_OUTPUT AND NOT flat MATCHES "${arg_EXPECT_OUTPUT}")
    message(FATAL_ERROR "[${SG_RUN_TAG}] FAILED: ${what}: output does not match '${arg_EXPECT_OUTPUT}'.\n--- output ---\n${out}")
  endif()
  if(arg_OUTPUT_VARIABLE)
    set(${arg_OUTPUT_VARIABLE} "${out}" PARENT_SCOPE)
  endif()
endfunction()
