#!/usr/bin/env bash
# Builds mig and runs its whole test suite. With --sanitize, in an ASan+UBSan build; with
# --fuzz, the fuzz targets instead (clang, libFuzzer).
# Tests that need /dev/kvm report "skipped" (never "passed") where it is unusable, and then
# run again with KVM nested in QEMU's TCG (below).
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
ctest --output-on-failure --timeout 300 --output-junit results.xml
# Where /dev/kvm is unusable, the tests that skipped for want of it run again inside QEMU's
# TCG, whose emulated CPU lets KVM load (scripts/nested-kvm.sh; about 3 minutes). There none
# may skip. MIG_NESTED_KVM=off leaves them skipped.
if ! { [ -r /dev/kvm ] && [ -w /dev/kvm ]; } && [ "${MIG_NESTED_KVM:-on}" != off ]; then
  skipped=$(../scripts/skipped-tests.py results.xml)
  if [ -n "$skipped" ]; then
    echo "run-tests: /dev/kvm is unusable here: the tests that need it run again with KVM nested in QEMU's TCG"
    ../scripts/nested-kvm.sh nested-kvm ctest --output-on-failure --timeout 900 -I "$skipped" --output-junit nested-results.xml
    still=$(../scripts/skipped-tests.py nested-results.xml)
    [ -z "$still" ] || { echo "run-tests: tests skipped even with nested KVM (ctest -I $still)" >&2; exit 1; }
  fi
fi
