#!/usr/bin/python3
"""mig-sim against real migrations between two network namespaces, on a shaped veth link.

    bench/validate-sim.py BUILD_DIR [--repeats 3] [--json rows.json]    (as root)

Each pair is one workload, one link and one policy. The real side: mig-send starts a
synthetic guest (128 MiB, 2 vCPUs, sweeping at the workload's rate), records its dirty pages
(--record-trace) and migrates it to a mig-recv in the other namespace, `repeats` times. The
predicted side: mig-sim replays the first repeat's trace under the same policy and link.
Per link, an idle guest's migration first calibrates the simulator (the link's page
throughput, set-up and restore times); the workloads are then predicted, never fitted. It
prints a table and, with --json, every row with all its repeats.

bench-sim does the same in one process with a replayed trace on loopback; this one uses the
tools, real processes, a recorded guest and a link shaped by tc.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import netlab  # noqa: E402

LINKS = [("veth 400 Mbit/s", "400mbit"), ("veth 1 Gbit/s", "1gbit")]
WORKLOADS = [5, 15, 30]  # MB/s swept by the guest
POLICIES = ["mig", "xen"]
AFTER_S = 1.5        # mig-send --after: the guest is filled and steady well before
TRACE_START_S = 1.2  # where the simulator starts in the trace: past the fill, steady like the real start
PORT = 7431


def migrate(build, net, work, dirty_MBps, policy, name):
    """One real migration; its mig-send stats and its trace's path."""
    trace, stats = os.path.join(work, name + ".trace"), os.path.join(work, name + ".json")
    receiver = subprocess.Popen(["ip", "netns", "exec", net.dest, os.path.join(build, "tools", "mig-recv"),
                                 "--synthetic-guest", "--listen", "tcp:%s:%d" % (netlab.DEST_ADDR, PORT),
                                 "--run-for", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if "listening on" not in receiver.stdout.readline():
        raise RuntimeError("mig-recv did not listen: " + receiver.stderr.read())
    sender = subprocess.run(["ip", "netns", "exec", net.source, os.path.join(build, "tools", "mig-send"),
                             "--synthetic-guest", str(dirty_MBps), "--mem", "128M", "--vcpus", "2",
                             "--to", "tcp:%s:%d" % (netlab.DEST_ADDR, PORT), "--after", str(AFTER_S),
                             "--policy", policy, "--record-trace", trace, "--stats-json", stats],
                            capture_output=True, text=True)
    receiver.wait(timeout=60)
    if sender.returncode != 0:
        raise RuntimeError("a real migration failed: " + sender.stderr)
    return json.load(open(stats)), trace


def calibrate(build, net, work):
    """The simulator's costs on this link, from an idle guest's migration."""
    stats, _ = migrate(build, net, work, 0.01, "mig", "idle")
    return {"bandwidth_Bps": stats["round_table"][0]["bandwidth_MBps"] * 1e6, "setup_ms": stats["setup_ms"],
            "restore_ms": stats["downtime_ms"]}


def simulate(build, trace, policy, calibration):
    bandwidth = "%d" % calibration["bandwidth_Bps"]  # bytes per second
    out = subprocess.run([os.path.join(build, "tools", "mig-sim"), trace, "--policy", policy, "--bandwidth", bandwidth,
                          "--setup-ms", "%.3f" % calibration["setup_ms"], "--restore-ms",
                          "%.3f" % calibration["restore_ms"], "--trace-start", str(TRACE_START_S), "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def error_pct(predicted, real):
    return (predicted - real) / real * 100 if real else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    if not netlab.usable():
        print("validate-sim needs root and network namespaces (ip netns)")
        return 1
    rows = []
    print("| guest sweeps | link | policy | total ms real (min-max) / sim | err | MB real / sim | err | rounds real / sim |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="mig-validate-sim-") as work:
        for link_name, rate in LINKS:
            with netlab.Network(rate) as net:
                calibration = calibrate(args.build, net, work)
                for dirty in WORKLOADS:
                    for policy in POLICIES:
                        runs = [migrate(args.build, net, work, dirty, policy, "run%d" % i) for i in range(args.repeats)]
                        sim = simulate(args.build, runs[0][1], policy, calibration)  # the first repeat's trace
                        rows.append(report_row(dirty, link_name, policy, [stats for stats, _ in runs], sim,
                                               calibration))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


def report_row(dirty, link, policy, runs, sim, calibration):
    total = sorted(r["total_ms"] for r in runs)
    sent = sorted(r["bytes_sent"] for r in runs)
    rounds = sorted(r["rounds"] for r in runs)
    real_total, real_bytes = statistics.median(total), statistics.median(sent)
    print("| %d MB/s | %s | %s | %.0f (%.0f-%.0f) / %.0f | %+.1f %% | %.1f / %.1f | %+.1f %% | %d-%d / %d |" % (
        dirty, link, policy, real_total, total[0], total[-1], sim["total_ms"], error_pct(sim["total_ms"], real_total),
        real_bytes / 1e6, sim["bytes_sent"] / 1e6, error_pct(sim["bytes_sent"], real_bytes), rounds[0], rounds[-1],
        sim["rounds"]))
    sys.stdout.flush()
    return {"workload": "synthetic sweep %d MB/s, 128 MiB, 2 vCPUs" % dirty, "link": link, "policy": policy,
            "calibration": calibration, "real_total_ms": total, "real_bytes": sent, "real_rounds": rounds,
            "sim_total_ms": sim["total_ms"], "sim_bytes": sim["bytes_sent"], "sim_rounds": sim["rounds"],
            "sim_downtime_ms": sim["downtime_ms"], "real_downtime_ms": sorted(r["downtime_ms"] for r in runs)}


if __name__ == "__main__":
    sys.exit(main())
