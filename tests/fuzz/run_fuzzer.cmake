# Runs one libFuzzer binary for SECONDS seconds (cmake -P, driven by CTest).
#   -DFUZZER=<binary> -DSEEDS=<dir;dir> -DDICT=<file or empty> -DWORK=<scratch dir> -DSECONDS=<n>
# New inputs the fuzzer finds go to WORK/corpus (the committed seeds are only read);
# a failing input is written to WORK/ as crash-*, leak-*, timeout-* or oom-*.
foreach(var FUZZER SEEDS WORK SECONDS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_fuzzer.cmake needs -D${var}=...")
  endif()
endforeach()

file(MAKE_DIRECTORY ${WORK}/corpus)
file(GLOB _old_findings ${WORK}/crash-* ${WORK}/leak-* ${WORK}/timeout-* ${WORK}/oom-*)
if(_old_findings)
  file(REMOVE ${_old_findings})
endif()

set(_args -max_total_time=${SECONDS} -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
          -artifact_prefix=${WORK}/)
if(DICT)
  list(APPEND _args -dict=${DICT})
endif()
execute_process(COMMAND ${FUZZER} ${_args} ${WORK}/corpus ${SEEDS} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  file(GLOB _findings ${WORK}/crash-* ${WORK}/leak-* ${WORK}/timeout-* ${WORK}/oom-*)
  message(FATAL_ERROR "fuzzer ${FUZZER} failed (exit ${rc}); reproduce with: ${FUZZER} ${_findings}")
endif()
