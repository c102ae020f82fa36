#!/usr/bin/python3
"""Dirty-limit against auto-converge: what each costs the vCPUs that do not dirty memory.

    bench/dirty-limit.py BUILD_DIR [--guest synthetic|kvm] [--link veth|limit] [--others-cpus 0]
                         [--repeats 4] [--json rows.json]    (as root)

QEMU 8.1's cover letter for dirty-limit: a guest dirtying 90 MB/s over a 1 Gbit link
finished in 6.0 s with dirty-limit against 33.5 s with auto-converge, while its vCPUs that
dirty no memory kept near their normal speed. This is that comparison on mig.

The guest: a synthetic one (256 MiB, 2 vCPUs, per-vCPU dirty rings): vCPU 0 sweeps memory
at the workload's rate, vCPU 1 computes (--compute-vcpus 1) and reports its work. With
--guest kvm it is the workload guest on KVM, the same way (mode=sweep compute=1 hb=1, a
256 MiB working set, KVM's dirty rings); it starts after one sweep pass has filled memory. mig-send
migrates it between two network namespaces over a veth shaped to 1 Gbit/s (tc tbf) or, with
--link limit where tc is missing, over loopback under mig-send's own 1 Gbit/s limit
(--bandwidth 125M, its token buckets), under
  - qemu: QEMU's rule with auto-converge, which holds every vCPU;
  - dirty-limit: QEMU's rule with dirty-limit, which caps each vCPU's dirty rate (1 MB/s);
  - mig: mig's default, for reference.
The computing vCPU's thread runs alone on CPU 1; everything else (mig-send with the dirtying
vCPU, mig-recv, the link) shares CPU 0, or --others-cpus. On two cores that is the only way its
speed shows the brake rather than the migration's own CPU use; on more, --others-cpus 0,2-15
lets the dirtying vCPU reach its rate. Per run: total time, downtime, rounds, bytes,
and the computing vCPU's work rate during pre-copy as a share of its rate before (3 s or more),
and its longest heartbeat gap.

Where the sweep stands when the migration starts can change the rounds (and the throttle
steps), so the repeats start at phases spread evenly over one sweep pass (--after from 3 s
on), the same phases for every policy. It prints
a table of medians with min-max, and with --json writes every run (bench/plot.py dirtylimit
draws them).
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import netlab  # noqa: E402

LINKS = {"veth": "veth 1 Gbit/s", "limit": "loopback, mig-send's 1 Gbit/s limit"}
WORKLOADS = [90, 150]  # MB/s dirtied by vCPU 0: under the link, and over it
POLICIES = ["qemu", "dirty-limit", "mig"]
AFTER_S = 3  # at least: the computing vCPU's baseline
GUEST_MIB = 256
PORT = 7432


def guest_args(build, guest, dirty_MBps):
    """mig-send's arguments for the guest: vCPU 0 sweeps the working set, vCPU 1 computes."""
    if guest == "synthetic":
        return ["--synthetic-guest", str(dirty_MBps), "--mem", "%dM" % GUEST_MIB, "--vcpus", "2", "--compute-vcpus", "1"]
    # The working set starts 4 MiB in (guest/workload.c): room for it, and the kernel below it.
    return ["--kernel", os.path.join(build, "guest", "mig-guest.elf"), "--mem", "%dM" % (GUEST_MIB + 8), "--vcpus", "2",
            "--append", "mode=sweep rate=%d wss=%dM cpus=2 compute=1 hb=1" % (dirty_MBps, GUEST_MIB)]


def migrate(build, net, work, guest, dirty_MBps, policy, name, after_s, others_cpus):
    """One migration, `after_s` after the guest is ready; mig-send's stats. `net`: the veth
    between namespaces, or None for loopback under mig-send's own limit."""
    stats = os.path.join(work, name + ".json")
    receiver = netlab.start_receiver(build, net, PORT, pin_cpu=others_cpus, synthetic=guest == "synthetic")
    if net:
        in_source, destination, limit = ["ip", "netns", "exec", net.source], netlab.DEST_ADDR, []
    else:
        in_source, destination, limit = [], "127.0.0.1", ["--bandwidth", "125M"]
    sender = subprocess.Popen(in_source + ["taskset", "-c", others_cpus, os.path.join(build, "tools", "mig-send")] +
                              guest_args(build, guest, dirty_MBps) + limit +
                              ["--dirty-track", "ring", "--to", "tcp:%s:%d" % (destination, PORT),
                               "--after", "%.3f" % after_s, "--policy", policy, "--stats-json", stats],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pin_thread(sender.pid, "vcpu1", 1)
    _, errors = sender.communicate(timeout=120)
    receiver.wait(timeout=120)
    if sender.returncode != 0:
        raise RuntimeError("a migration failed: " + errors)
    return json.load(open(stats))


def pin_thread(pid, name, cpu):
    """Moves thread `name` of process `pid` to `cpu` as soon as it exists (well before --after)."""
    for _ in range(200):
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/comm" % (pid, tid)) as comm:
                    if comm.read().strip() == name:
                        subprocess.run(["taskset", "-p", "-c", str(cpu), tid], check=True, capture_output=True)
                        return
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise RuntimeError("mig-send has no thread named " + name)


def phase_starts(guest, dirty_MBps, repeats):
    """--after values that start the migration at `repeats` phases spread evenly over one
    pass of the sweep (vCPU 0 sweeps the whole guest at `dirty_MBps`). The synthetic guest
    fills its memory flat out; the workload guest's first pass, at the rate, fills it."""
    pass_s = GUEST_MIB * 2**20 / (dirty_MBps * 1e6)
    first = AFTER_S if guest == "synthetic" else max(AFTER_S, pass_s)
    return [first + pass_s * k / repeats for k in range(repeats)]


def row(link, guest, dirty_MBps, policy, repeat, stats):
    computing = stats["local_guest_work"][0]
    return {"link": link, "guest": guest, "dirty_MBps": dirty_MBps, "policy": policy, "repeat": repeat,
            "total_ms": stats["total_ms"], "downtime_ms": stats["downtime_ms"], "rounds": stats["rounds"],
            "bytes_sent": stats["bytes_sent"], "stop_rule": stats["stop_rule"],
            "max_throttle_pct": max(r["throttle_pct"] for r in stats["round_table"]),
            "dirty_limit_MBps": max(r["dirty_limit_MBps"] for r in stats["round_table"]),
            "compute_speed_pct": computing["during_over_before"] * 100,
            "compute_longest_gap_ms": computing["longest_heartbeat_gap_ms"]}


def spread(rows, key, fmt):
    values = [r[key] for r in rows]
    return (fmt + " (" + fmt + "-" + fmt + ")") % (statistics.median(values), min(values), max(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build")
    parser.add_argument("--guest", choices=["synthetic", "kvm"], default="synthetic",
                        help="the synthetic guest (no KVM needed), or the workload guest on KVM")
    parser.add_argument("--link", choices=sorted(LINKS), default="veth",
                        help="a veth shaped by tc, or loopback under mig-send's own limit (where tc is missing)")
    parser.add_argument("--others-cpus", default="0", help="the CPUs for all but the computing vCPU (taskset's list)")
    parser.add_argument("--repeats", type=int, default=4, help="runs per policy, at phases spread over a sweep pass")
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()
    if os.geteuid() != 0 or (args.link == "veth" and not netlab.usable()):
        sys.exit("dirty-limit.py: needs root, and ip netns for --link veth")
    link = LINKS[args.link]
    rows = []
    with tempfile.TemporaryDirectory() as work, (netlab.Network("1gbit") if args.link == "veth" else contextlib.nullcontext()) as net:
        for dirty in WORKLOADS:
            for policy in POLICIES:
                for repeat, after_s in enumerate(phase_starts(args.guest, dirty, args.repeats)):
                    stats = migrate(args.build, net, work, args.guest, dirty, policy, "%s-%d-%d" % (policy, dirty, repeat), after_s,
                                    args.others_cpus)
                    rows.append(row(link, args.guest, dirty, policy, repeat, stats))
                    print(json.dumps(rows[-1]), flush=True)
    print("\n%s, %s guest of %d MiB: vCPU 0 dirties, vCPU 1 computes; median (min-max) of %d runs at phases spread over a sweep"
          % (link, args.guest, GUEST_MIB, args.repeats))
    print("| dirtied | policy | total ms | downtime ms | rounds | GB sent | brake | computing vCPU's speed % | its longest gap ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dirty in WORKLOADS:
        for policy in POLICIES:
            runs = [r for r in rows if r["dirty_MBps"] == dirty and r["policy"] == policy]
            most_throttle = max(r["max_throttle_pct"] for r in runs)
            brake = "throttle up to %d %%" % most_throttle if most_throttle else "none"
            if any(r["dirty_limit_MBps"] for r in runs):
                brake = "%g MB/s per vCPU" % max(r["dirty_limit_MBps"] for r in runs)
            print("| %d MB/s | %s | %s | %s | %s | %.2f | %s | %s | %s |" % (
                dirty, policy, spread(runs, "total_ms", "%.0f"), spread(runs, "downtime_ms", "%.1f"),
                spread(runs, "rounds", "%d"), statistics.median(r["bytes_sent"] for r in runs) / 1e9, brake,
                spread(runs, "compute_speed_pct", "%.0f"), spread(runs, "compute_longest_gap_ms", "%.1f")))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
