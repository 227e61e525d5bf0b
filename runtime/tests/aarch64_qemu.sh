#!/usr/bin/env bash
# Run the ctest models on aarch64 under qemu-user: export them for aarch64, run the
# cross-built edgesparse-run (runtime/aarch64-linux-gnu.cmake) and compare with the
# outputs Python computed on this machine (max relative error <= 1e-5).
#
#   runtime/tests/aarch64_qemu.sh <aarch64 build dir> <work dir> [python]
# Needs g++-aarch64-linux-gnu (to link the kernels) and qemu-user (qemu-aarch64).
set -euo pipefail
build=$1 work=$2 python=${3:-.venv/bin/python}
"$python" "$(dirname "$0")/make_fixtures.py" "$work" aarch64
for model in mlp conv resnet; do
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$build/edgesparse-run" "$work/$model" "$work/$model/input.bin" "$work/$model/output.bin"
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$build/edgesparse-compare" "$work/$model/output.bin" "$work/$model/expected.bin" 1e-5
done
