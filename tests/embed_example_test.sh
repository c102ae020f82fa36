#!/usr/bin/env bash
# examples/embed's VMM migrates its guest to a second copy of itself through the C API, and
# the guest counts on there. Needs /dev/kvm; exits 77 (skipped) where it is unusable.
# Usage: embed_example_test.sh EMBED_VMM
set -euo pipefail
vmm=$1
if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
  echo "embed_example_test: /dev/kvm is not usable here: skipped"
  exit 77
fi
scratch=$(mktemp -d)
trap 'kill "$receiver" 2>/dev/null || true; rm -rf "$scratch"' EXIT
"$vmm" recv tcp:127.0.0.1:0 >"$scratch/recv.out" 2>&1 &
receiver=$!
for _ in $(seq 100); do
  address=$(sed -n 's/^destination: listening on //p' "$scratch/recv.out")
  [ -n "$address" ] && break
  sleep 0.1
done
[ -n "$address" ] || { cat "$scratch/recv.out"; echo "embed_example_test: the receiver did not listen"; exit 1; }
timeout 60 "$vmm" send "$address"
if ! timeout 60 tail --pid="$receiver" -f /dev/null; then
  echo "embed_example_test: the receiver did not finish"
  exit 1
fi
wait "$receiver" && status=0 || status=$?
cat "$scratch/recv.out"
[ "$status" -eq 0 ] || { echo "embed_example_test: the receiver exited $status"; exit 1; }
