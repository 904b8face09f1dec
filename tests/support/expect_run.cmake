# Runs the command given after `--` and passes only if both its exit status and its output are
# the expected ones: CTest's PASS_REGULAR_EXPRESSION alone ignores the exit status, so a
# program that printed the right line and then failed would pass.
#   cmake -DEXPECT_EXIT=zero|nonzero -DEXPECT_OUTPUT=<regex> -P expect_run.cmake -- <command...>
set(_command)
set(_after_dashes FALSE)
math(EXPR _last "${CMAKE_ARGC} - 1")
foreach(i RANGE 0 ${_last})
  if(_after_dashes)
    string(REPLACE ";" "\\;" _arg "${CMAKE_ARGV${i}}")  # one argument, even with a ';' in it
    list(APPEND _command "${_arg}")
  elseif("${CMAKE_ARGV${i}}" STREQUAL "--")
    set(_after_dashes TRUE)
  endif()
endforeach()
if(NOT _command)
  message(FATAL_ERROR "expect_run.cmake: no command after --")
endif()
if(NOT EXPECT_EXIT MATCHES "^(zero|nonzero)$")
  message(FATAL_ERROR "expect_run.cmake: EXPECT_EXIT must be zero or nonzero, not '${EXPECT_EXIT}'")
endif()
set(SG_RUN_TAG expect_run)
include("${CMAKE_CURRENT_LIST_DIR}/run_command.cmake")
set(_failure)
if(EXPECT_EXIT STREQUAL "nonzero")
  set(_failure EXPECT_FAILURE)
endif()
sg_run("expected exit ${EXPECT_EXIT}" COMMAND ${_command} ${_failure} EXPECT_OUTPUT "${EXPECT_OUTPUT}")
