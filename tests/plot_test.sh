#!/usr/bin/env bash
# bench/plot.py makes its plots from what mig writes: a mig-sim round table, bench-predict's
# rows, and samples of bench-sim's, bench-tls's, bench-migrate's, dirty-limit.py's and
# compare-qemu.py's; each must come out a PNG.
# Usage: plot_test.sh MIG_SIM PLOT_PY BENCH_PREDICT
set -euo pipefail
mig_sim=$1
plot=$2
bench_predict=$3
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$mig_sim" --synthesize random:rate=20M,wss=8M,mem=32M,seconds=5 --output "$scratch/t.trace" >/dev/null
"$mig_sim" "$scratch/t.trace" --bandwidth 1Gbit --policy qemu --json >"$scratch/sim.json"
cat >"$scratch/rows.json" <<'ROWS'
{"guest": "(sample)", "rows": [
 {"workload": "random:rate=50M,wss=32M", "link": "loopback", "policy": "mig",
  "real_total_ms": [350, 360, 420], "sim_total_ms": 380, "real_bytes": [7.3e7, 7.4e7, 7.4e7], "sim_bytes": 7.5e7},
 {"workload": "sweep:rate=100M", "link": "1 Gbit/s", "policy": "xen",
  "real_total_ms": [1050, 1380, 1390], "sim_total_ms": 1000, "real_bytes": [1.0e8, 1.47e8, 1.49e8], "sim_bytes": 9.3e7}]}
ROWS
/usr/bin/python3 "$plot" rounds "$scratch/sim.json" "$scratch/rounds.png"
/usr/bin/python3 "$plot" validation "$scratch/rows.json" "$scratch/validation.png"
"$bench_predict" --workload random:rate=4M,wss=16M,mem=64M,seconds=5 --json "$scratch/predict.json" >/dev/null
/usr/bin/python3 "$plot" predictions "$scratch/predict.json" "$scratch/predictions.png"
cat >"$scratch/tls.json" <<'LINES'
{"channels":1,"security":"plaintext","repeat":0,"GBps":2.9,"ratio_to_best_plaintext":1.0}
{"channels":1,"security":"plaintext","repeat":1,"GBps":3.1,"ratio_to_best_plaintext":1.0}
{"channels":1,"security":"tls","repeat":0,"GBps":1.2,"ratio_to_best_plaintext":0.39}
{"channels":1,"security":"tls","repeat":1,"GBps":1.3,"ratio_to_best_plaintext":0.42}
LINES
/usr/bin/python3 "$plot" tls "$scratch/tls.json" "$scratch/tls.png"
cat >"$scratch/migrate.json" <<'LINES'
{"link_percent":0,"guest_cmdline":"mode=random","total_ms":700,"raw_same_bytes_ms":650,"downtime_ms":3.1,"guest_downtime_ms":4.0}
{"link_percent":0,"guest_cmdline":"mode=random","total_ms":720,"raw_same_bytes_ms":640,"downtime_ms":2.9,"guest_downtime_ms":null}
{"link_percent":50,"guest_cmdline":"mode=random","total_ms":1900,"raw_same_bytes_ms":1500,"downtime_ms":21.0,"guest_downtime_ms":25.2}
LINES
/usr/bin/python3 "$plot" migrate "$scratch/migrate.json" "$scratch/migrate.png"
cat >"$scratch/dirtylimit.json" <<'ROWS'
[{"link":"veth 1 Gbit/s","dirty_MBps":90,"policy":"qemu","total_ms":8200,"compute_speed_pct":81},
 {"link":"veth 1 Gbit/s","dirty_MBps":90,"policy":"qemu","total_ms":9100,"compute_speed_pct":76},
 {"link":"veth 1 Gbit/s","dirty_MBps":90,"policy":"dirty-limit","total_ms":6900,"compute_speed_pct":99}]
ROWS
/usr/bin/python3 "$plot" dirtylimit "$scratch/dirtylimit.json" "$scratch/dirtylimit.png"
cat >"$scratch/compare.jsonl" <<'LINES'
{"config":"mig","mem":"2G","fill":"random","workload":"random","dirty_MBps":0,"total_ms":900,"guest_downtime_ms":4.1,"bytes_sent":2.2e9}
{"config":"mig","mem":"2G","fill":"random","workload":"random","dirty_MBps":500,"total_ms":1400,"guest_downtime_ms":9.0,"bytes_sent":2.9e9}
{"config":"qemu","mem":"2G","fill":"random","workload":"random","dirty_MBps":500,"total_ms":3100,"guest_downtime_ms":null,"bytes_sent":3.3e9}
{"config":"qemu","mem":"2G","fill":"random","workload":"random","dirty_MBps":null,"total_ms":9000,"guest_downtime_ms":30,"bytes_sent":9e9}
LINES
/usr/bin/python3 "$plot" compare "$scratch/compare.jsonl" "$scratch/compare.png"
for png in rounds validation predictions tls migrate dirtylimit compare; do
  [ "$(head -c 4 "$scratch/$png.png" | tail -c 3)" = "PNG" ] || { echo "plot_test: $png.png is not a PNG"; exit 1; }
done
if /usr/bin/python3 "$plot" rounds "$scratch/rows.json" "$scratch/bad.png" 2>"$scratch/err"; then
  echo "plot_test: a file without a round table was plotted"; exit 1
fi
grep -q "no round_table" "$scratch/err"
echo "plot_test: all five plots made"
