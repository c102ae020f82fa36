#!/usr/bin/env bash
# Storage migration on this host: a sparse raw image of SIZE holding DATA (in 1 MiB pieces
# spread over the image), migrated with --copy-storage-all while the guest writes its disk at
# RATE MB/s. Prints the wire bytes against memory sent + disk data + re-dirtied chunks.
#   bench/storage.sh [SIZE_GIB=4] [DATA_MIB=256] [RATE=20]
set -euo pipefail
size_gib=${1:-4} data_mib=${2:-256} rate=${3:-20}
build=${BUILD:-build}
dir=$(mktemp -d /tmp/mig-storage-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
truncate -s "${size_gib}G" "$dir/src.img"
for ((i = 0; i < data_mib; i++)); do  # one MiB every size/data, so extents are scattered
  dd if=/dev/urandom of="$dir/src.img" bs=1M count=1 seek=$((i * size_gib * 1024 / data_mib)) conv=notrunc status=none
done
"$build/tools/mig-recv" --listen tcp:127.0.0.1:0 --disk "$dir/dst.img" --run-for 1 --stats-json "$dir/recv.json" >"$dir/recv.out" 2>&1 &
for _ in $(seq 50); do grep -q "listening on" "$dir/recv.out" && break; sleep 0.1; done
to=$(sed -n 's/.*listening on \(tcp:[^ ]*\).*/\1/p' "$dir/recv.out")
"$build/tools/mig-send" --kernel "$build/guest/mig-guest.elf" --mem 512M \
  --append "mode=random rate=50 wss=64M disk=1 diskrate=$rate diskspan=${size_gib}G" \
  --disk "$dir/src.img" --copy-storage-all --to "$to" --after 2 --stats-json "$dir/send.json" 2>&1 | head -1
wait
python3 - "$dir/send.json" "$data_mib" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
d = s["disk"]
memory = s["pages_sent"] * 4096
redirtied = d["processed"] - d["round0"]
print(f"total {s['total_ms']:.0f} ms, downtime {s['downtime_ms']:.1f} ms, guest saw {s['guest_downtime_ms']:.1f} ms, rounds {s['rounds']}")
print(f"wire {s['bytes_sent']/1e6:.1f} MB = memory pages {memory/1e6:.1f} MB + disk frames {d['wire_bytes']/1e6:.1f} MB + control")
print(f"disk: {int(sys.argv[2])} MiB written before boot; data at the start (round 0, incl. what the guest wrote before "
      f"the migration) {d['round0']/1e6:.1f} MB, re-dirtied {redirtied/1e6:.1f} MB, zero {d['zero_bytes']/1e6:.1f} MB, verified {d['verified']}")
bound = memory + 1.05 * d["round0"] + redirtied
print(f"target: wire <= memory + 1.05 x data + re-dirtied = {bound/1e6:.1f} MB: {'met' if s['bytes_sent'] <= bound else 'missed'}")
PY
