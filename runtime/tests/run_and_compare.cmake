# cmake -DRUN=edgesparse-run -DCOMPARE=edgesparse-compare -DDIR=<model dir> -P run_and_compare.cmake
execute_process(COMMAND "${RUN}" "${DIR}" "${DIR}/input.bin" "${DIR}/output.bin" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "edgesparse-run failed (${rc})")
endif()
execute_process(COMMAND "${COMPARE}" "${DIR}/output.bin" "${DIR}/expected.bin" 1e-5 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the C++ output differs from Python's")
endif()
