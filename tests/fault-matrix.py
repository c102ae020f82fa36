#!/usr/bin/python3
"""The fault matrix: migrations between two network namespaces joined by a shaped veth link,
each hit by one fault, with a table of what became of the guest.

    tests/fault-matrix.py BUILD_DIR [--guest synthetic|kvm] [--json FILE]

For each fault it reports where the guest runs afterwards, the longest pause in its
heartbeats, how long each side took to notice, the exit codes, and whether the surviving
source leaked file descriptors or memory. It exits 1 when a fault breaks a target:
- before the commit, the guest runs on at the source, unharmed (no heartbeat sequence break,
  no self-check failure), and its heartbeats never pause 100 ms or more;
- both processes end on their own (nothing hangs), and the source keeps its fds;
- a fault-free migration completes, verified.
Exit code 77 (skipped) where it cannot run: not root, or no network namespaces.

The guest is a synthetic one by default (vmm/synthetic_vm.h), which needs no KVM: what is
under test is the migration path - links, peers, processes - not the guest. With --guest kvm,
mig's workload guest runs instead (needs /dev/kvm and the guest image).

Everything it makes - the namespaces and veth pair (tests/netlab.py), a tmpfs, the files - it
removes, whatever happens. Addresses are inside the namespaces only. The link is shaped to
400 Mbit/s (50 MB/s): round 0 of the 128 MiB guest takes about 2.7 s.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import netlab
from netlab import DEST_ADDR, Network, sh

SKIP = 77
PEER_TIMEOUT_S = "2"   # how long a silent peer is given, on both sides (the default is 10)
PORT, RELAY_PORT = 7411, 7412
HEARTBEAT_PAUSE_LIMIT_MS = 100
RECEIVER_PATIENCE_S = 20  # a receiver still there this long after the fault counts as hung


class Qmp:
    """Just enough QMP to watch a migration: query-migrate."""

    def __init__(self, path):
        for _ in range(200):
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                time.sleep(0.02)
        else:
            raise RuntimeError("no QMP socket at " + path)
        self.file = self.sock.makefile("rw")
        self.file.readline()  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command):
        self.file.write(json.dumps({"execute": command}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline() or "{}")
            if "event" not in reply:
                return reply.get("return", reply)

    def close(self):
        self.sock.close()


def process_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def process_rss_mib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def relay(listen_port, target_port, corrupt_from):
    """Run inside the destination namespace: forwards connections to the receiver, and flips a
    byte of the first connection's stream every 4 MiB for 32 MiB from offset `corrupt_from`:
    one flip could land where it does no harm (a page sent again later)."""
    damage_at = [corrupt_from + i * (4 << 20) for i in range(8)]
    server = socket.create_server((DEST_ADDR, listen_port))
    first = True
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))

        def pump(src, dst, damage):
            seen = 0
            try:
                while chunk := src.recv(65536):
                    chunk = bytearray(chunk)
                    for offset in damage:
                        if seen <= offset < seen + len(chunk):
                            chunk[offset - seen] ^= 0x5A
                    seen += len(chunk)
                    dst.sendall(chunk)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(client, upstream, damage_at if first else []), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, []), daemon=True).start()
        first = False


class Scenario:
    # receiver_waits_on: the fault leaves the receiver waiting for its source, as it should (a
    # peer it refused); the row ends it with SIGTERM.
    def __init__(self, name, inject=None, when="round 0", receiver_args=(), sender_args=(), through_relay=False,
                 expect="source", dirty_MBps=30, receiver_waits_on=False):
        self.name, self.inject, self.when, self.dirty_MBps = name, inject, when, dirty_MBps
        self.receiver_waits_on = receiver_waits_on
        self.receiver_args, self.sender_args = list(receiver_args), list(sender_args)
        self.through_relay, self.expect = through_relay, expect


class Run:
    """One migration under one fault."""

    def __init__(self, build, guest, net, work, scenario, index):
        self.build, self.guest, self.net, self.s = build, guest, net, scenario
        self.work = os.path.join(work, "%02d" % index)  # every run its own files: no stale stats to misread
        os.mkdir(self.work)
        self.row = {"fault": scenario.name, "when": scenario.when}

    def tool(self, name):
        return os.path.join(self.build, "tools", name)

    def guest_args(self, side):
        if self.guest == "synthetic":
            return ["--synthetic-guest"] + ([str(self.s.dirty_MBps), "--mem", "128M", "--vcpus", "2"] if side == "send" else [])
        if side == "recv":
            return []
        image = os.path.join(self.build, "guest", "mig-guest.elf")
        return ["--kernel", image, "--mem", "128M", "--append", "mode=sweep rate=%d wss=96M hb=1" % self.s.dirty_MBps]

    def start_receiver(self):
        listen = "tcp:127.0.0.1:%d" % PORT if self.s.through_relay else "tcp:%s:%d" % (DEST_ADDR, PORT)
        args = [self.tool("mig-recv"), "--listen", listen, "--run-for", "1", "--peer-timeout", PEER_TIMEOUT_S,
                "--stats-json", self.path("recv.json")] + self.guest_args("recv") + self.s.receiver_args
        self.receiver = subprocess.Popen(["ip", "netns", "exec", self.net.dest] + args, stdout=subprocess.PIPE,
                                         stderr=open(self.path("recv.err"), "w"), text=True)
        line = self.receiver.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError("mig-recv did not listen: " + line + open(self.path("recv.err")).read())
        if self.s.through_relay:
            self.relay = subprocess.Popen(["ip", "netns", "exec", self.net.dest, sys.executable, __file__, "--relay",
                                           str(RELAY_PORT), str(PORT), str(16 << 20)])
            time.sleep(0.3)

    def start_sender(self):
        port = RELAY_PORT if self.s.through_relay else PORT
        # --after counts from the guest's ready report, once its memory is filled (0.1-0.3 s
        # here): the fds and RSS are taken between the two, so that what a migration leaves
        # behind is all that grows.
        args = [self.tool("mig-send"), "--to", "tcp:%s:%d" % (DEST_ADDR, port), "--after", "1.5", "--run-for", "60",
                "--peer-timeout", PEER_TIMEOUT_S, "--qmp", "unix:" + self.path("send.qmp"), "--stats-json",
                self.path("send.json")] + self.guest_args("send") + self.s.sender_args
        self.sender = subprocess.Popen(["ip", "netns", "exec", self.net.source] + args, stdout=subprocess.DEVNULL,
                                       stderr=open(self.path("send.err"), "w"))
        started = time.monotonic()
        self.qmp = Qmp(self.path("send.qmp"))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        self.fds_before, self.rss_before = process_fds(self.sender.pid), process_rss_mib(self.sender.pid)

    def path(self, name):
        return os.path.join(self.work, name)

    def migration(self):
        """The source's query-migrate; empty once the source has exited. Notes the slowest reply."""
        started = time.monotonic()
        try:
            return self.qmp.execute("query-migrate")
        except (OSError, ValueError):
            return {}
        finally:
            took = (time.monotonic() - started) * 1000
            self.row["slowest QMP reply ms"] = max(self.row.get("slowest QMP reply ms", 0.0), took)

    def wait_for_phase(self):
        """Polls the source until the migration reaches the scenario's moment."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = self.migration()
            status, ram = info.get("status", ""), info.get("ram", {})
            if status in ("completed", "failed", "cancelled"):
                return status
            if status == "active":
                if self.s.when == "round 0" and ram.get("transferred", 0) > 8 << 20:
                    return "ok"
                if self.s.when == "a later round" and ram.get("dirty-sync-count", 0) >= 2:
                    return "ok"
            time.sleep(0.01)
        return "timeout"

    def wait_source_outcome(self, since):
        """The source's end of the migration, and how long after `since` it was known."""
        deadline = since + 30
        while time.monotonic() < deadline:
            if self.sender.poll() is not None:
                return ("killed" if self.sender.returncode < 0 else "exited %d" % self.sender.returncode), None
            info = self.migration()
            status = info.get("status", "")
            if status in ("completed", "failed", "cancelled", "handoff-unknown"):
                self.row["source error"] = info.get("error-desc", "")
                return status, (time.monotonic() - since) * 1000
            time.sleep(0.005)
        return "hung", None

    def run(self):
        self.start_receiver()
        try:
            self.start_sender()
            if self.s.when == "after the switchover":
                self.wait_source_outcome(time.monotonic())
            elif self.s.inject:
                reached = self.wait_for_phase()
                if reached != "ok":
                    raise RuntimeError("the migration ended before the fault (%s)" % reached)
            fault_at = time.monotonic()
            receiver_outcome = self.watch_receiver(fault_at)
            if self.s.inject:
                self.s.inject(self)
            status, noticed_ms = self.wait_source_outcome(fault_at)
            self.row["source status"] = status
            self.row["source noticed ms"] = noticed_ms if self.s.inject else None
            if self.s.receiver_waits_on:
                self.row["receiver exit"] = self.end_waiting_receiver(receiver_outcome)
            else:
                self.row["receiver exit"], self.row["receiver ended ms"] = receiver_outcome()
            time.sleep(0.3)  # the source guest runs on a little, so its pause shows in full
            self.row["fd leak"] = process_fds(self.sender.pid) - self.fds_before if self.sender.poll() is None else None
            self.row["rss growth MiB"] = (process_rss_mib(self.sender.pid) - self.rss_before
                                          if self.sender.poll() is None else None)
            self.qmp.close()
            if self.sender.poll() is None:
                self.sender.send_signal(signal.SIGTERM)
            self.row["sender exit"] = self.sender.wait(timeout=20)
            self.report_guest()
        finally:
            for p in (getattr(self, "sender", None), self.receiver, getattr(self, "relay", None)):
                if p and p.poll() is None:
                    p.kill()
                    p.wait()
        return self.row

    def watch_receiver(self, since):
        """Waits for the receiver to end, in the background, from `since`; join() gives the
        exit code ("hung" after RECEIVER_PATIENCE_S) and how long it took."""
        outcome = ["hung", None]

        def wait():
            try:
                outcome[0] = self.receiver.wait(timeout=RECEIVER_PATIENCE_S)
                outcome[1] = (time.monotonic() - since) * 1000
            except subprocess.TimeoutExpired:
                pass

        thread = threading.Thread(target=wait)
        thread.start()
        return lambda: (thread.join(), tuple(outcome))[1]

    def end_waiting_receiver(self, receiver_outcome):
        still_waiting = self.receiver.poll() is None
        self.receiver.send_signal(signal.SIGTERM)
        code = receiver_outcome()[0]
        return "waits on (then SIGTERM: %s)" % code if still_waiting else code

    def report_guest(self):
        sent = json.load(open(self.path("send.json"))) if os.path.exists(self.path("send.json")) else {}
        received = json.load(open(self.path("recv.json"))) if os.path.exists(self.path("recv.json")) else {}
        if self.sender.returncode < 0:
            self.row["guest runs"] = "nowhere: its source process was killed"
            beats = []
        elif sent.get("status") == "completed":
            self.row["guest runs"] = "lost with the destination" if self.row["receiver exit"] != 0 else "destination"
            beats = received.get("local_guest_heartbeats", [])
            self.row["verified"] = sent.get("verified")
            self.row["pause ms"] = sent.get("guest_downtime_ms")
        else:
            self.row["guest runs"] = "source"
            beats = sent.get("local_guest_heartbeats", [])
            self.row["pause ms"] = max((b["longest_gap_ms"] for b in beats), default=None)
        self.row["unharmed"] = bool(beats) and all(b["sequence_breaks"] == 0 and b["self_check_failures"] == 0
                                                   for b in beats)
        self.row["receiver said"] = last_line(self.path("recv.err"))
        self.row["source said"] = last_line(self.path("send.err"))
        # Kept for a row that misses its targets: the work directory goes with the run.
        self.row["stderr"] = {tool: last_lines(self.path(name), 40) for tool, name in (("mig-send", "send.err"),
                                                                                       ("mig-recv", "recv.err"))}


def last_lines(path, count):
    lines = [l for l in open(path).read().splitlines() if l.strip()] if os.path.exists(path) else []
    return lines[-count:]


def last_line(path):
    return (last_lines(path, 1) or [""])[0]


class FullFilesystem:
    """A tmpfs of `size`, mounted at `path` for the destination's disk image to fill."""

    def __init__(self, path, size):
        self.path, self.size = path, size

    def __enter__(self):
        os.mkdir(self.path)
        sh("mount", "-t", "tmpfs", "-o", "size=" + self.size, "mig-fault-matrix", self.path)
        return self

    def __exit__(self, *exc):
        sh("umount", self.path, check=False)


def make_source_disk(path, size, data):
    """A sparse raw image with `data` bytes of non-zero blocks from its start."""
    with open(path, "wb") as image:
        image.truncate(size)
        block = bytes(range(256)) * 4096
        for offset in range(0, data, len(block)):
            image.seek(offset)
            image.write(block)


def scenarios(tls_dir, source_disk, full_disk):
    def link_down(run):
        sh("ip", "link", "set", run.net.source_dev, "down", ns=run.net.source)

    def trickle(run):
        run.net.shape("8kbit")

    def kill_receiver(run):
        run.receiver.send_signal(signal.SIGKILL)

    def term_receiver(run):
        run.receiver.send_signal(signal.SIGTERM)

    def kill_sender(run):
        run.sender.send_signal(signal.SIGKILL)

    return [
        Scenario("none", when="-", expect="destination"),
        Scenario("link down", link_down),
        Scenario("link down", link_down, when="a later round"),
        Scenario("link throttled to 8 kbit/s", trickle),
        Scenario("receiver SIGKILL", kill_receiver),
        Scenario("receiver SIGKILL", kill_receiver, when="a later round"),
        Scenario("receiver SIGKILL", kill_receiver, when="after the switchover", expect="lost"),
        Scenario("receiver SIGTERM", term_receiver),
        Scenario("sender SIGKILL", kill_sender, expect="nowhere"),
        # A guest that dirties slowly, so that damaged pages are not simply sent again.
        Scenario("bytes corrupted by a relay", through_relay=True, dirty_MBps=1),
        Scenario("unauthenticated source (receiver wants TLS)", when="at connect", receiver_args=["--tls-creds", tls_dir],
                 receiver_waits_on=True),
        # 24 MiB of disk data copied into an 8 MiB file system.
        Scenario("destination disk full", when="disk copy", receiver_args=["--disk", full_disk],
                 sender_args=["--disk", source_disk, "--copy-storage-all"]),
    ]


def check(row, scenario):
    """The targets this fault must meet; an empty list when it met them."""
    broken = []
    if scenario.expect == "destination":
        if row["guest runs"] != "destination" or row.get("verified") is not True:
            broken.append("the fault-free migration did not complete verified")
    elif scenario.expect == "source":
        if row["guest runs"] != "source" or row["sender exit"] != 2:
            broken.append("the guest does not run on at the source")
        if not row["unharmed"]:
            broken.append("the source guest was harmed")
        if row["pause ms"] is None or row["pause ms"] >= HEARTBEAT_PAUSE_LIMIT_MS:
            broken.append("the source guest paused %s ms" % row["pause ms"])
        if row["fd leak"]:
            broken.append("the source holds %d more fds" % row["fd leak"])
    if row["receiver exit"] == "hung":
        broken.append("the receiver hung")
    if scenario.expect != "nowhere" and row["source status"] == "hung":
        broken.append("the source hung")
    return broken


def print_table(rows):
    columns = ["fault", "when", "guest runs", "pause ms", "source noticed ms", "receiver ended ms", "slowest QMP reply ms", "sender exit",
               "receiver exit", "fd leak", "rss growth MiB", "met targets"]
    fmt = lambda v: "-" if v is None else ("%.1f" % v if isinstance(v, float) else str(v))
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
    print()
    for r in rows:
        print("%s (%s):\n  source: %s\n  receiver: %s" % (r["fault"], r["when"], r.get("source error") or r["source said"],
                                                     r["receiver said"]))
    for r in rows:
        if r["met targets"] != "yes":
            for tool, lines in r.get("stderr", {}).items():
                print("\n%s (%s): the last lines %s wrote to stderr:" % (r["fault"], r["when"], tool))
                print("\n".join("  | " + line for line in lines) or "  | (nothing)")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--relay":
        return relay(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build")
    parser.add_argument("--guest", choices=["synthetic", "kvm"], default="synthetic")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--only", help="run only the faults whose name contains this")
    args = parser.parse_args()
    if not netlab.usable():
        print("SKIPPED: the fault matrix needs root and network namespaces (ip netns)")
        return SKIP
    if args.guest == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("SKIPPED: --guest kvm needs /dev/kvm")
        return SKIP
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="mig-fault-matrix-") as work, Network() as net, \
            FullFilesystem(os.path.join(work, "full"), "8m") as full:
        tls_dir = os.path.join(work, "tls")
        subprocess.run([os.path.join(os.path.dirname(__file__), "..", "scripts", "make-tls-creds.sh"), tls_dir,
                        DEST_ADDR], check=True)
        source_disk = os.path.join(work, "source-disk.img")
        make_source_disk(source_disk, 64 << 20, 24 << 20)
        for index, scenario in enumerate(scenarios(tls_dir, source_disk, os.path.join(full.path, "disk.img"))):
            if args.only and args.only not in scenario.name:
                continue
            net.restore()
            run = Run(args.build, args.guest, net, work, scenario, index)
            row = run.run()
            broken = check(row, scenario)
            row["met targets"] = "yes" if not broken else "NO: " + "; ".join(broken)
            failures += broken
            rows.append(row)
        leftovers = net.leftovers()
    print_table(rows)
    leftovers = [ns for ns in leftovers if ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                   text=True).stdout]
    print("\nnamespaces left behind: %s" % (", ".join(leftovers) or "none"))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    if leftovers:
        failures.append("namespaces left behind")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
