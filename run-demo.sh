#!/usr/bin/env bash
# The main job: install dependencies, build, then live-migrate a running workload guest
# between a mig-send and a mig-recv on this machine and print what happened.
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build
guest=build/guest/mig-guest.elf
echo "== the workload guest under mig's VMM for 2 s"
build/tools/mig-vm --kernel "$guest" --mem 256M --vcpus 2 \
  --append "mode=random rate=100 wss=128M timer=100 regcheck=1 hb=5 cpus=2" --run-for 2
echo "== live migration over loopback"
build/tools/mig-recv --listen tcp:127.0.0.1:0 --run-for 2 --stats-json /tmp/mig-demo-recv.json > /tmp/mig-demo-recv.out &
receiver=$!
until grep -q "listening on" /tmp/mig-demo-recv.out 2>/dev/null; do sleep 0.1; done
endpoint=$(grep -o "tcp:[^ ]*" /tmp/mig-demo-recv.out)
build/tools/mig-send --kernel "$guest" --mem 512M --vcpus 2 \
  --append "mode=random rate=100 wss=256M timer=100 regcheck=1 hb=2 cpus=2" \
  --to "$endpoint" --after 1 --stats-json /tmp/mig-demo-send.json
wait "$receiver"
cat /tmp/mig-demo-recv.out
echo "== statistics: /tmp/mig-demo-send.json (source), /tmp/mig-demo-recv.json (destination)"
