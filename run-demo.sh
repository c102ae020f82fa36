#!/usr/bin/env bash
# The main job, and the operator's walk-through in README.md: install dependencies, build,
# run a VM, watch it, migrate it, change its downtime and bandwidth while it migrates, cancel
# one migration and complete another - all through the VM's QMP socket.
set -euo pipefail
cd "$(dirname "$0")"
[ "${MIG_DEMO_SKIP_DEPS:-}" ] || scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build
bin=build/tools
guest=build/guest/mig-guest.elf
work=$(mktemp -d /tmp/mig-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

step() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
# A mig-recv waiting in the background, with its own control socket.
start_receiver() {
  $bin/mig-recv --listen tcp:127.0.0.1:0 --qmp "unix:$work/$1.qmp" >"$work/recv-$1.out" 2>"$work/recv-$1.err" &
}
endpoint_of() {
  until grep -q "listening on" "$work/recv-$1.out" 2>/dev/null; do sleep 0.1; done
  grep -o "tcp:[^ ]*" "$work/recv-$1.out"
}

step "1. run a VM: 512 MiB, 2 vCPUs writing 256 MiB at 100 MB/s, with a control socket"
$bin/mig-vm --kernel "$guest" --mem 512M --vcpus 2 --qmp "unix:$work/vm.qmp" \
  --append "mode=random rate=100 wss=256M timer=100 regcheck=1 hb=2 cpus=2" >"$work/vm.out" 2>&1 &
until $bin/mig-ctl "unix:$work/vm.qmp" status >/dev/null 2>&1; do sleep 0.1; done
sleep 1
run $bin/mig-ctl "unix:$work/vm.qmp" status
run $bin/mig-ctl "unix:$work/vm.qmp" dirty-rate 1
$bin/mig-ctl "unix:$work/vm.qmp" events >"$work/events.log" &

step "2. migrate it at 20 MB/s, watch it, then cancel: the guest runs on where it was"
start_receiver first
first_pid=$!
first=$(endpoint_of first)
run $bin/mig-ctl "unix:$work/vm.qmp" set bandwidth 20M
run $bin/mig-ctl "unix:$work/vm.qmp" migrate "$first"
sleep 1
run $bin/mig-ctl "unix:$work/vm.qmp" info
run $bin/mig-ctl "unix:$work/vm.qmp" cancel
sleep 0.3
run $bin/mig-ctl "unix:$work/vm.qmp" info
run $bin/mig-ctl "unix:$work/vm.qmp" status
wait $first_pid || true   # the first receiver discarded what it had, and ended
echo "first receiver: $(cat "$work/recv-first.err")"

step "3. migrate again with mig-send --vm (as virsh migrate --live --verbose); steer it on the way"
start_receiver second
second_pid=$!
second=$(endpoint_of second)
run $bin/mig-ctl "unix:$work/vm.qmp" set downtime-ms 10
$bin/mig-send --vm "unix:$work/vm.qmp" --to "$second" --verbose --stats-json "$work/send.json" &
sender=$!
sleep 1
run $bin/mig-ctl "unix:$work/vm.qmp" info
run $bin/mig-ctl "unix:$work/vm.qmp" set downtime-ms 50
run $bin/mig-ctl "unix:$work/vm.qmp" set bandwidth 0
wait $sender

step "4. the guest runs at the destination; stop it there"
sleep 1
run $bin/mig-ctl "unix:$work/second.qmp" status
run $bin/mig-ctl "unix:$work/second.qmp" info
run $bin/mig-ctl "unix:$work/second.qmp" quit
wait $second_pid
cat "$work/recv-second.out" "$work/recv-second.err"

step "5. what the source's event stream saw"
cat "$work/events.log"
