#!/usr/bin/env bash
# mig as an embedder gets it: installed with `cmake --install`, and packaged as .debs that
# are unpacked into a scratch root (dpkg-deb -x). Against each, from outside this project:
#   - every installed header compiles on its own (nothing private is reached) and includes
#     no third-party header;
#   - examples/embed builds with find_package(mig), with pkg-config in CMake, and with a bare
#     `cc $(pkg-config --cflags --libs mig)`;
#   - a C++ program links mig::engine and mig::vmm through find_package.
# Usage: package_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$(realpath "$1")
source=$(realpath "$2")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

fail() { echo "package_test: $*" >&2; exit 1; }

# Each public header alone, as an embedder would include it.
check_headers() {
  local include=$1
  local headers
  headers=$(cd "$include" && find mig -name '*.h' | sort)
  [ -n "$headers" ] || fail "no headers under $include"
  # The interface brings no third-party headers: those stay inside mig's libraries.
  if grep -rnE '#include <(nlohmann|xxhash|zstd|boost|openssl|liburing|libnbd|CLI|fmt)' "$include/mig"; then
    fail "an installed header includes a third-party header"
  fi
  for header in $headers; do
    case $header in
      mig/mig.h | mig/version.h)
        printf '#include <%s>\ntypedef int not_empty;\n' "$header" | cc -std=c99 -pedantic -Wall -Werror -fsyntax-only -I"$include" -x c - ||
          fail "$header is not C99" ;;
    esac
    echo "#include <$header>" | c++ -std=c++20 -Wall -Werror -fsyntax-only -I"$include" -x c++ - ||
      fail "$header does not compile on its own from $include"
  done
  echo "package_test: $(echo "$headers" | wc -l) headers compile on their own from $include"
}

# The example and a C++ consumer, against mig installed at `prefix` (its usr/ or the --prefix).
build_consumers() {
  local prefix=$1 name=$2
  local libdir
  libdir=$(dirname "$(find "$prefix" -name mig.pc | head -1)")
  cmake -S "$source/examples/embed" -B "$scratch/$name-cmake" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
  cmake --build "$scratch/$name-cmake" >/dev/null
  PKG_CONFIG_PATH=$libdir cmake -S "$source/examples/embed" -B "$scratch/$name-pc" -DEMBED_USE_PKGCONFIG=ON >/dev/null
  cmake --build "$scratch/$name-pc" >/dev/null
  # shellcheck disable=SC2046  # pkg-config's words are meant to split
  cc -std=c99 -Wall -Werror "$source/examples/embed/embed_vmm.c" -o "$scratch/$name-bare" \
    $(PKG_CONFIG_PATH=$libdir pkg-config --cflags --libs mig)
  for example in "$scratch/$name-cmake/embed-vmm" "$scratch/$name-pc/embed-vmm" "$scratch/$name-bare"; do
    usage=$("$example" 2>&1 || true)  # no arguments: the usage, which names the version linked
    [[ $usage == *"built against mig"* ]] || fail "$example does not run: $usage"
  done
  cmake -S "$source/tests/package/consumer" -B "$scratch/$name-cxx" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
  cmake --build "$scratch/$name-cxx" >/dev/null
  "$scratch/$name-cxx/engine-consumer" || fail "the C++ consumer against $name failed"
  echo "package_test: the example (find_package, pkg-config, bare cc) and a C++ consumer build against $name"
}

# 1. cmake --install
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
for file in bin/mig-send bin/mig-recv bin/mig-vm bin/mig-ctl share/mig/mig-guest.elf share/man/man1/mig-send.1; do
  [ -e "$scratch/prefix/$file" ] || fail "cmake --install did not install $file"
done
check_headers "$scratch/prefix/include"
build_consumers "$scratch/prefix" installed

# 2. cpack's .debs, unpacked into a scratch root
(cd "$build" && cpack -G DEB -B "$scratch/debs" >/dev/null) || fail "cpack failed"
version=$(sed -n 's/^#define MIG_VERSION_STRING "\(.*\)"/\1/p' "$build/generated/mig/version.h")
for package in mig libmig-dev; do
  deb="$scratch/debs/${package}_${version}_amd64.deb"
  [ -f "$deb" ] || fail "no $(basename "$deb") (cpack made: $(ls "$scratch/debs"))"
  dpkg-deb -x "$deb" "$scratch/root"
done
depends=$(dpkg-deb -f "$scratch/debs/mig_${version}_amd64.deb" Depends)
for runtime in libc6 libstdc++6 libssl3 liburing2 libnbd0 libzstd1 libxxhash0; do
  [[ $depends == *"$runtime"* ]] || fail "the mig package does not depend on $runtime: $depends"
done
"$scratch/root/usr/bin/mig-send" --version | grep -qx "mig-send $version" || fail "the packaged mig-send does not run"
check_headers "$scratch/root/usr/include"
build_consumers "$scratch/root/usr" deb
echo "package_test: mig_${version}_amd64.deb depends on: $depends"
