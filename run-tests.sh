#!/usr/bin/env bash
# Builds mig and runs its whole test suite. With --sanitize, in an ASan+UBSan build; with
# --fuzz, the fuzz targets instead (clang, libFuzzer).
# Tests that need /dev/kvm report "skipped" (never "passed") where it is unusable.
set -euo pipefail
cd "$(dirname "$0")"
build=build
flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
if [ "${1:-}" = "--sanitize" ]; then
  build=build-asan
  # Shared libraries here, so that this build also proves they link and run.
  flags=(-DCMAKE_BUILD_TYPE=Debug -DMIG_SANITIZE=ON -DBUILD_SHARED_LIBS=ON)
fi
# --fuzz: the libFuzzer targets, each run for MIG_FUZZ_SECONDS (default 20) over its seeds.
if [ "${1:-}" = "--fuzz" ]; then
  build=build-fuzz
  flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DMIG_FUZZ=ON -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++
         -DMIG_FUZZ_SECONDS="${MIG_FUZZ_SECONDS:-20}")
fi
[ -n "${CI:-}" ] && flags+=(-DMIG_WERROR=ON)
cmake -S . -B "$build" -G Ninja "${flags[@]}" >/dev/null
cmake --build "$build"
cd "$build"
ctest --output-on-failure --timeout 300
