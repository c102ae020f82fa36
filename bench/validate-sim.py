#!/usr/bin/python3
"""mig-sim against real migrations between two network namespaces, on a shaped veth link.

    bench/validate-sim.py BUILD_DIR [--guest synthetic|kvm] [--repeats 3] [--json rows.json]    (as root)

Each pair is one workload, one link and one policy. The real side: mig-send starts a
synthetic guest (128 MiB, 2 vCPUs) and migrates it to a mig-recv in the other namespace,
`repeats` times. The predicted side: mig-sim replays a dirty trace of the same guest under
the same policy and link. With --guest kvm the guest is the workload guest on KVM instead,
writing random pages of a 128 MiB working set on 2 vCPUs (mode=random, filled first), and
every pair's trace is one of the guest recorded alone: a random writer, once filled,
dirties the same way at any moment, so the replay starts KVM_TRACE_START_S in, well after
the fill. Two kinds of pairs:
  - unbraked: both vCPUs sweep at 5 to 30 MB/s on both links, under mig and xen, neither of
    which slows them; the trace is the first repeat's own (--record-trace);
  - braked: both vCPUs sweep at 90 or 150 MB/s in all over the 1 Gbit link, with dirty
    rings, under dirty-limit (a cap on each vCPU) and qemu (auto-converge's throttle). The
    trace is recorded from the guest running alone (mig-vm --record-trace, the rings naming
    each page's vCPU), so the brake the prediction models is never in its input. No vCPU
    computes here: one that spins takes one of this host's two cores from the migration, by
    as much as the scheduler pleases, which no link calibration can predict.
Per link, three idle guests' migrations first calibrate the simulator (the link's best page
throughput, the median set-up and restore times), and told how far the sender reads ahead
of the link (TCP's largest send buffer, as configured). The workloads are then predicted,
never fitted. It
prints a table and, with --json, every row with all its repeats (bench/plot.py validation
draws them).

bench-sim does the same in one process with a replayed trace on loopback; this one uses the
tools, real processes, recorded guests and a link shaped by tc.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import netlab  # noqa: E402

LINKS = [("veth 400 Mbit/s", "400mbit"), ("veth 1 Gbit/s", "1gbit")]
UNBRAKED = [5, 15, 30]  # MB/s swept by the guest
UNBRAKED_POLICIES = ["mig", "xen"]
BRAKED_LINK = "1gbit"
BRAKED = [90, 150]  # MB/s swept by the two vCPUs together
BRAKED_POLICIES = ["dirty-limit", "qemu"]
BRAKED_GUEST = ["--dirty-track", "ring"]
AFTER_S = 1.5        # mig-send --after: the guest is filled and steady well before
ALONE_S = 15         # how long a guest alone is recorded: longer than its migrations, so never replayed round
PORT = 7431
KVM_TRACE_START_S = 3.0  # the workload guest had booted and filled 128 MiB by 0.6 s here
guest = "synthetic"   # --guest
WORKLOADS = {"synthetic": "synthetic sweep", "kvm": "KVM workload guest, random writes"}  # what each guest does


def guest_args(build, dirty_MBps, extra):
    if guest == "synthetic":
        return ["--synthetic-guest", str(dirty_MBps), "--mem", "128M", "--vcpus", "2"] + extra
    # The working set starts 4 MiB in (guest/workload.c): room for it, and the kernel below it.
    workload = "mode=random rate=%g wss=128M" % dirty_MBps if dirty_MBps >= 1 else "mode=idle"
    return ["--kernel", os.path.join(build, "guest", "mig-guest.elf"), "--mem", "136M", "--vcpus", "2",
            "--append", workload + " cpus=2 hb=2"] + extra


def migrate(build, net, work, dirty_MBps, policy, name, extra=()):
    """One real migration; its mig-send stats and its trace's path."""
    trace, stats = os.path.join(work, name + ".trace"), os.path.join(work, name + ".json")
    receiver = netlab.start_receiver(build, net, PORT, synthetic=guest == "synthetic")
    sender = subprocess.run(["ip", "netns", "exec", net.source, os.path.join(build, "tools", "mig-send")] +
                            guest_args(build, dirty_MBps, list(extra)) +
                            ["--to", "tcp:%s:%d" % (netlab.DEST_ADDR, PORT), "--after", str(AFTER_S),
                             "--policy", policy, "--record-trace", trace, "--stats-json", stats],
                            capture_output=True, text=True)
    receiver.wait(timeout=60)
    if sender.returncode != 0:
        raise RuntimeError("a real migration failed: " + sender.stderr)
    return json.load(open(stats)), trace


def record_alone(build, work, dirty_MBps, extra):
    """A trace of the guest running alone, not migrated."""
    trace = os.path.join(work, "alone-%d.trace" % dirty_MBps)
    subprocess.run([os.path.join(build, "tools", "mig-vm")] + guest_args(build, dirty_MBps, list(extra)) +
                   ["--record-trace", trace, "--run-for", str(ALONE_S)], check=True, capture_output=True)
    return trace


def calibrate(build, net, work, runs=3):
    """The simulator's costs on this link, from idle guests' migrations: the best page
    throughput of `runs` (one alone was 8 % under the link in a run, which shifted every
    prediction on it), and the median set-up and restore times."""
    stats = [migrate(build, net, work, 0.01, "mig", "idle%d" % i)[0] for i in range(runs)]
    return {"bandwidth_Bps": max(s["round_table"][0]["bandwidth_MBps"] for s in stats) * 1e6,
            "setup_ms": statistics.median(s["setup_ms"] for s in stats),
            "restore_ms": statistics.median(s["downtime_ms"] for s in stats)}


def migration_start(build, trace):
    """Where in `trace` the real migration began: AFTER_S after the guest was ready, which a
    synthetic guest is once its fill has written every page. The sweep's phase then matches
    the real one's, and it decides much (a page swept just before its turn leaves once).
    The workload guest writes at random, which has no phase (see KVM_TRACE_START_S)."""
    if guest == "kvm":
        return KVM_TRACE_START_S
    info = subprocess.run([os.path.join(build, "tools", "mig-sim"), trace, "--info"], capture_output=True, text=True,
                          check=True).stdout
    filled = re.search(r"every page written by ([0-9.]+) s", info)
    if not filled:
        raise RuntimeError("the guest in %s never wrote all its memory:\n%s" % (trace, info))
    return float(filled.group(1)) + AFTER_S


def send_buffer_max():
    """How far mig-send can read ahead of the link: TCP's largest send buffer here (it sets
    none of its own), which bounds the shaper's queue too (tbf holds up to 100 ms: 5 MB at
    400 Mbit/s, 12.5 MB at 1 Gbit/s)."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return int(f.read().split()[2])


def simulate(build, trace, policy, calibration):
    bandwidth = "%d" % calibration["bandwidth_Bps"]  # bytes per second
    out = subprocess.run([os.path.join(build, "tools", "mig-sim"), trace, "--policy", policy, "--bandwidth", bandwidth,
                          "--setup-ms", "%.3f" % calibration["setup_ms"], "--restore-ms",
                          "%.3f" % calibration["restore_ms"], "--trace-start", "%.3f" % migration_start(build, trace),
                          "--read-ahead-bytes", str(send_buffer_max()),
                          "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def error_pct(predicted, real):
    return (predicted - real) / real * 100 if real else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build")
    parser.add_argument("--guest", choices=["synthetic", "kvm"], default="synthetic",
                        help="the synthetic guest (no KVM needed), or the workload guest on KVM")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    global guest
    guest = args.guest
    if not netlab.usable():
        print("validate-sim needs root and network namespaces (ip netns)")
        return 1
    rows = []
    print("| guest dirties | link | policy | total ms real (min-max) / sim | err | MB real / sim | err | rounds real / sim |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="mig-validate-sim-") as work:
        for link_name, rate in LINKS:
            with netlab.Network(rate) as net:
                calibration = calibrate(args.build, net, work)
                for dirty in UNBRAKED:
                    alone = record_alone(args.build, work, dirty, []) if guest == "kvm" else None
                    for policy in UNBRAKED_POLICIES:
                        runs = [migrate(args.build, net, work, dirty, policy, "run%d" % i) for i in range(args.repeats)]
                        sim = simulate(args.build, alone or runs[0][1], policy, calibration)  # else the first repeat's trace
                        rows.append(report_row("%d MB/s" % dirty, link_name, policy, [stats for stats, _ in runs], sim,
                                               calibration))
                if rate != BRAKED_LINK:
                    continue
                for dirty in BRAKED:
                    alone = record_alone(args.build, work, dirty, BRAKED_GUEST)
                    for policy in BRAKED_POLICIES:
                        runs = [migrate(args.build, net, work, dirty, policy, "run%d" % i, BRAKED_GUEST)[0]
                                for i in range(args.repeats)]
                        rows.append(report_row("%d MB/s (rings)" % dirty, link_name, policy, runs,
                                               simulate(args.build, alone, policy, calibration), calibration))
    if args.json:
        with open(args.json, "w") as out:  # as bench-sim writes them, for bench/plot.py validation
            json.dump({"guest": "(recorded guests: %s; shaped veth)" % WORKLOADS[guest], "rows": rows}, out, indent=1)
    return 0


def report_row(workload, link, policy, runs, sim, calibration):
    total = sorted(r["total_ms"] for r in runs)
    sent = sorted(r["bytes_sent"] for r in runs)
    rounds = sorted(r["rounds"] for r in runs)
    real_total, real_bytes = statistics.median(total), statistics.median(sent)
    print("| %s | %s | %s | %.0f (%.0f-%.0f) / %.0f | %+.1f %% | %.1f / %.1f | %+.1f %% | %d-%d / %d |" % (
        workload, link, policy, real_total, total[0], total[-1], sim["total_ms"], error_pct(sim["total_ms"], real_total),
        real_bytes / 1e6, sim["bytes_sent"] / 1e6, error_pct(sim["bytes_sent"], real_bytes), rounds[0], rounds[-1],
        sim["rounds"]))
    sys.stdout.flush()
    return {"workload": "%s %s, 128 MiB, 2 vCPUs" % (WORKLOADS[guest], workload), "link": link, "policy": policy,
            "calibration": calibration, "real_total_ms": total, "real_bytes": sent, "real_rounds": rounds,
            "sim_total_ms": sim["total_ms"], "sim_bytes": sim["bytes_sent"], "sim_rounds": sim["rounds"],
            "sim_downtime_ms": sim["downtime_ms"], "real_downtime_ms": sorted(r["downtime_ms"] for r in runs),
            "real_max_throttle_pct": [max(x["throttle_pct"] for x in r["round_table"]) for r in runs],
            "real_dirty_limit_MBps": [max(x["dirty_limit_MBps"] for x in r["round_table"]) for r in runs],
            "sim_max_throttle_pct": max(x["throttle_pct"] for x in sim["round_table"]),
            "sim_dirty_limit_MBps": max(x["dirty_limit_MBps"] for x in sim["round_table"])}


if __name__ == "__main__":
    sys.exit(main())
