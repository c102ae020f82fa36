#!/usr/bin/python3
"""Ping-pong: one guest migrated N times between fresh receivers, each hop verified.

    tests/ping-pong.py BUILD_DIR [--count N] [--guest synthetic|kvm] [--dirty MBPS]

The guest starts under mig-send, which migrates it to the first mig-recv. From there each hop
is what an operator does: a new mig-recv waits, and `mig-send --vm unix:QMP` moves the guest
from the last receiver to it, over TCP. Every hop must complete with its memory verified
(the page-hash check), and the receiver it left must say the guest migrated onward. At the
end the guest's own account - its heartbeats and self-checks, which travel with it - must
show no sequence break and no self-check failure over all the hops.

It prints one line per hop and a summary; exit code 1 on any mismatch. With --guest kvm,
mig's workload guest in sweep mode (needs /dev/kvm); the default is the synthetic guest.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def receiver(build, work, index, guest, run_for=None):
    qmp = os.path.join(work, "hop%d.qmp" % index)
    args = [os.path.join(build, "tools", "mig-recv"), "--listen", "tcp:127.0.0.1:0", "--qmp", "unix:" + qmp,
            "--stats-json", os.path.join(work, "hop%d.json" % index)]
    if guest == "synthetic":
        args.append("--synthetic-guest")
    if run_for is not None:
        args += ["--run-for", str(run_for)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on (tcp:\S+)", line)
    if not match:
        raise RuntimeError("mig-recv did not listen: " + line + process.stderr.read())
    return process, match.group(1), qmp


def first_hop(build, to, guest, dirty):
    args = [os.path.join(build, "tools", "mig-send"), "--to", to, "--after", "0.3", "--mem", "64M"]
    if guest == "synthetic":
        args += ["--synthetic-guest", str(dirty), "--vcpus", "2"]
    else:
        args += ["--kernel", os.path.join(build, "guest", "mig-guest.elf"), "--append",
                 "mode=sweep rate=%d wss=48M hb=1" % dirty]
    return subprocess.run(args, capture_output=True, text=True)


def onward_hop(build, qmp, to):
    return subprocess.run([os.path.join(build, "tools", "mig-send"), "--vm", "unix:" + qmp, "--to", to],
                          capture_output=True, text=True)


def summary_figures(text):
    """The hop's total time and downtime, from mig-send's summary line."""
    total = re.search(r"in ([\d.]+) ms", text)
    downtime = re.search(r"downtime ([\d.]+) ms", text)
    return (float(total.group(1)) if total else None, float(downtime.group(1)) if downtime else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--guest", choices=["synthetic", "kvm"], default="synthetic")
    parser.add_argument("--dirty", type=int, default=20, help="the guest's dirtying rate, MB/s")
    args = parser.parse_args()
    if args.count < 2:
        parser.error("--count must be 2 or more: the first hop only starts the guest on its way")
    if args.guest == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("SKIPPED: --guest kvm needs /dev/kvm")
        return 77
    failures, totals, downtimes = [], [], []
    with tempfile.TemporaryDirectory(prefix="mig-ping-pong-") as work:
        current, to, qmp = receiver(args.build, work, 0, args.guest)
        for hop in range(args.count):
            last = hop == args.count - 1
            if hop == 0:
                result = first_hop(args.build, to, args.guest, args.dirty)
                left = None
            else:
                nxt, to, next_qmp = receiver(args.build, work, hop, args.guest, run_for=0.5 if last else None)
                result = onward_hop(args.build, qmp, to)
                left, current, qmp = current, nxt, next_qmp
            text = result.stdout + result.stderr
            total, downtime = summary_figures(text)
            problems = []
            if result.returncode != 0:
                problems.append("mig-send exited %d" % result.returncode)
            if "verified: true" not in text:
                problems.append("not verified")
            if left is not None:
                left_code = left.wait(timeout=30)
                if left_code != 0 or "migrated onward" not in left.stderr.read():
                    problems.append("the receiver it left exited %d without saying it migrated onward" % left_code)
            print("hop %3d: %s in %s ms, downtime %s ms%s" % (hop + 1, "verified" if not problems else "FAILED",
                                                              total, downtime, "" if not problems else ": " + "; ".join(problems)))
            sys.stdout.flush()
            if problems:
                failures.append(hop + 1)
                print(text)
                break
            totals.append(total)
            downtimes.append(downtime)
        if not failures and current.wait(timeout=30) != 0:
            failures.append("the last receiver exited %d" % current.returncode)
        guest = json.load(open(os.path.join(work, "hop%d.json" % (args.count - 1)))) if not failures else {}
    beats = guest.get("local_guest_heartbeats", [])
    breaks = sum(b["sequence_breaks"] for b in beats)
    check_failures = sum(b["self_check_failures"] for b in beats)
    if not failures and (not beats or breaks or check_failures):
        failures.append("the guest saw %d sequence breaks and %d self-check failures" % (breaks, check_failures))
    if totals:
        print("\n%d hops, %d verified, %d failed; total ms median %.1f (min %.1f, max %.1f); downtime ms median %.2f "
              "(min %.2f, max %.2f)" % (args.count, len(totals), len(failures), statistics.median(totals), min(totals),
                                        max(totals), statistics.median(downtimes), min(downtimes), max(downtimes)))
    if beats:
        print("the guest, after every hop: %s heartbeats from vCPU 0, %d sequence breaks, %d self-check failures, "
              "%s sweep passes" % (beats[0]["count"], breaks, check_failures, "/".join(str(b.get("sweep_passes", "?"))
                                                                                        for b in beats)))
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
