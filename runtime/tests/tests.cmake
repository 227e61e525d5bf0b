# ctest: export a small MLP, a small conv net and a ResNet-18 from Python, run them with edgesparse-run
# and compare with the Python outputs (max relative error <= 1e-5); broken inputs must
# fail with a clear message.
set(FIXTURES "${CMAKE_BINARY_DIR}/fixtures")
add_test(NAME export_fixtures
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/runtime/tests/make_fixtures.py" "${FIXTURES}")
set_tests_properties(export_fixtures PROPERTIES FIXTURES_SETUP exported)

foreach(model mlp conv resnet)
  add_test(NAME run_${model}
    COMMAND "${CMAKE_COMMAND}" -DRUN=$<TARGET_FILE:edgesparse-run> -DCOMPARE=$<TARGET_FILE:edgesparse-compare>
            -DDIR=${FIXTURES}/${model} -P "${CMAKE_CURRENT_SOURCE_DIR}/runtime/tests/run_and_compare.cmake")
  set_tests_properties(run_${model} PROPERTIES FIXTURES_REQUIRED exported)
endforeach()

# name | model dir | input file | what stderr must say
set(_failures
  "bad_schema|bad_schema|mlp/input.bin|schema_version.*is 99"
  "bad_json|bad_json|mlp/input.bin|not valid JSON"
  "kernel_args|kernel_args|mlp/input.bin|kernel_args is \\(inp, V\\), but this runtime calls kernels with"
  "bad_layer|bad_layer|mlp/input.bin|layers\\[0\\].output_shape"
  "bad_inputs|bad_inputs|mlp/input.bin|layers\\[0\\].inputs\\[0\\] is 'layer9', which is neither"
  "missing_weights|missing_weights|mlp/input.bin|cannot open .*weights.bin"
  "missing_library|missing_library|mlp/input.bin|cannot open .*kernels.so"
  "missing_input|mlp|no_such_input.bin|cannot open .*no_such_input.bin"
  "weights_mismatch|weights_mismatch|mlp/input.bin|the manifest expects"
  "input_mismatch|mlp|bad_input.bin|input shape mismatch: the model takes \\[batch, 100\\], got \\[3, 99\\]")
foreach(case ${_failures})
  string(REPLACE "|" ";" fields "${case}")
  list(GET fields 0 name)
  list(GET fields 1 dir)
  list(GET fields 2 input)
  list(GET fields 3 pattern)
  add_test(NAME fails_${name}
    COMMAND "${CMAKE_COMMAND}" -DRUN=$<TARGET_FILE:edgesparse-run> -DDIR=${FIXTURES}/${dir}
            -DINPUT=${FIXTURES}/${input} "-DPATTERN=${pattern}" -P "${CMAKE_CURRENT_SOURCE_DIR}/runtime/tests/expect_failure.cmake")
  set_tests_properties(fails_${name} PROPERTIES FIXTURES_REQUIRED exported)
endforeach()
