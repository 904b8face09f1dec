# Compiles SOURCE with COMPILER (syntax only) and passes only if compilation fails
# with the message given on the file's first line: `// expect: <regex>`.
# Control: the same file with -DSKILLGRAFT_CONTROL (which hides the offending line)
# must compile, so the test cannot pass because of an unrelated error.
file(STRINGS ${SOURCE} _first LIMIT_COUNT 1)
string(REGEX REPLACE "^// expect: " "" _expect "${_first}")
if(_expect STREQUAL _first)
  message(FATAL_ERROR "${SOURCE}: first line must be '// expect: <regex>'")
endif()
set(_flags -std=c++20 -fsyntax-only)
foreach(inc ${INCLUDES})
  list(APPEND _flags -isystem ${inc})
endforeach()
execute_process(COMMAND ${COMPILER} ${_flags} -DSKILLGRAFT_CONTROL ${SOURCE}
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE}: the control build (offending line hidden) does not compile:\n${_err}")
endif()
execute_process(COMMAND ${COMPILER} ${_flags} ${SOURCE}
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
if(_rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must not")
endif()
if(NOT "${_err}" MATCHES "${_expect}")
  message(FATAL_ERROR "${SOURCE} failed to compile, but without the expected message '${_expect}':\n${_err}")
endif()
message(STATUS "failed to compile as expected: ${_expect}")
