# Toolchain file: build edgesparse-run for aarch64 Linux with Debian's cross g++
# (apt install g++-aarch64-linux-gnu), against the aarch64 wheels of apache-tvm and
# apache-tvm-ffi unpacked into one directory:
#
#   pip download --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
#       --no-deps apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 -d wheels
#   for w in wheels/*.whl; do unzip -q -o "$w" -d a64site; done
#   cmake -S . -B build-a64 -DCMAKE_TOOLCHAIN_FILE=runtime/aarch64-linux-gnu.cmake \
#         -DEDGESPARSE_SITE_PACKAGES=$PWD/a64site && cmake --build build-a64 -j2
#
# Models for it come from `edgesparse export --target aarch64`. runtime/tests/aarch64_qemu.sh
# runs the result under qemu-user.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
