# cmake -DRUN=edgesparse-run -DDIR=<model dir> -DINPUT=<file> -DPATTERN=<regex> -P expect_failure.cmake
# Passes when edgesparse-run exits non-zero and its stderr matches PATTERN.
execute_process(COMMAND "${RUN}" "${DIR}" "${INPUT}" "${DIR}/never_written.bin"
                RESULT_VARIABLE rc ERROR_VARIABLE err)
message(STATUS "exit ${rc}: ${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "edgesparse-run succeeded on a broken input")
endif()
if(NOT err MATCHES "${PATTERN}")
  message(FATAL_ERROR "stderr does not match '${PATTERN}'")
endif()
