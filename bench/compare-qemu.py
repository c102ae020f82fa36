#!/usr/bin/env python3
"""compare-qemu: mig and QEMU migrate the same guest over loopback, side by side, in one run.

Every row is one migration of the workload guest (build/guest/mig-guest.elf), booted the same
way by mig's VMM and by `qemu-system-x86_64 -kernel`. For each row it records total time,
the downtime the migrator reports, the downtime the guest saw (the gap in its heartbeats:
the probe port under mig, one serial byte per heartbeat under QEMU), bytes sent, and the
raw link (bench-link's best send size between populated buffers, one stream, the same byte
count, measured next to each row; iperf3 beside it, and alone over --shaped) so every row has a ratio to the
limit. Writes JSON lines and CSV, and a PNG plot of them (bench/plot.py compare, which reruns it).

    bench/compare-qemu.py [--mem 2G[,...]] [--wss 1G] [--fill random[,text,mix,zero]]
                          [--workload random[,hotcold,sweep]] [--rates 0,25,50,75]
                          [--configs mig,mig:prepared,qemu,qemu:prealloc,qemu:multifd4] [--spin] [--repeat N]
                          [--shaped "tbf rate 1gbit burst 512kb latency 50ms"] [--out DIR]

The matrix is every combination of guest size, fill, workload, rate and configuration.
A configuration is `mig` or `qemu`, optionally with `:` and `+`-joined options:
  mig:  prepared (mig-recv --expect-mem), postcopy (--postcopy-after 2), compress (zstd), delta, parallel2, parallel4, attarget, noautoconverge, nozeroskip, nodedup, noverify, noplan, offline, zerocopy
  qemu: multifdN (N channels), xbzrle, autoconverge, postcopy (postcopy-ram, migrate-start-postcopy after 2 s),
        compress (multifd zstd, needs multifdN),
        prealloc (-mem-prealloc on the destination: QEMU's counterpart of mig:prepared)
Rate 0 runs the idle workload; rate `max` writes as fast as the guest can (a CPU-bound
dirtier, the case auto-converge is for). --shaped puts every receiver (mig-recv, the destination QEMU,
the iperf3 server of the raw-link baseline) in a network namespace of its own, reached over a
veth pair whose two ends both carry that qdisc (tc qdisc add dev VETH root SPEC; e.g.
"netem rate 1gbit delay 1ms" where the kernel has netem, "tbf ..." where it has not): a link
slower than memory between two "hosts", on addresses in 10.199.0.0/30 that the run creates
and deletes.
"""
import argparse
import contextlib
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MIG_BUILD", os.path.join(ROOT, "build"))
IMAGE = os.path.join(BUILD, "guest", "mig-guest.elf")
BENCH_LINK = os.path.join(BUILD, "bench", "bench-link")
QEMU = "qemu-system-x86_64"
DOWNTIME_MS = 30
QEMU_TIMEOUT_S = 60


def size_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """Where receivers listen, and the command prefix that starts a process on their side."""

    def __init__(self, host="127.0.0.1", receiver_prefix=(), label="loopback"):
        self.host, self.receiver_prefix, self.label = host, list(receiver_prefix), label


@contextlib.contextmanager
def shaped_link(qdisc):
    """A receiving namespace behind a veth pair, `qdisc` on both ends; gone afterwards."""
    ns, near, far = f"migdst{os.getpid()}", f"migs{os.getpid()}", f"migd{os.getpid()}"
    run = lambda *cmd: subprocess.run(list(cmd), check=True)
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", near, "type", "veth", "peer", "name", far, "netns", ns)
        run("ip", "addr", "add", "10.199.0.1/30", "dev", near)
        run("ip", "link", "set", near, "up")
        run("ip", "-n", ns, "addr", "add", "10.199.0.2/30", "dev", far)
        run("ip", "-n", ns, "link", "set", far, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("tc", "qdisc", "add", "dev", near, "root", *qdisc.split())
        run("tc", "-n", ns, "qdisc", "add", "dev", far, "root", *qdisc.split())
        yield Link("10.199.0.2", ["ip", "netns", "exec", ns], f"veth, {qdisc}")
    finally:
        subprocess.run(["ip", "link", "delete", near], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "delete", ns])


def raw_link_mbps(link, nbytes, spin=False):
    """The raw link for `nbytes`, one stream, and iperf3's figure beside it. Over loopback the
    baseline is bench-link's best send size between populated buffers (with a core kept busy
    when the guest spins, as the migration has it); iperf3 understates it by a third here. A
    shaped link spans two network namespaces, which only iperf3 crosses."""
    iperf = iperf3_mbps(link, nbytes)
    if link.label != "loopback":
        return iperf, iperf
    out = subprocess.run([BENCH_LINK, "--json", "--bytes", str(nbytes), "--streams", "1"] + (["--spin"] if spin else []),
                         capture_output=True, text=True, check=True).stdout
    return max(r["MBps"] for r in map(json.loads, out.splitlines()) if "MBps" in r), iperf


def iperf3_mbps(link, nbytes):
    """iperf3, one stream over the link, the same byte count a migration moves."""
    port = free_port()
    server = subprocess.Popen(link.receiver_prefix + ["iperf3", "-s", "-1", "-B", link.host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    out = subprocess.run(["iperf3", "-c", link.host, "-p", str(port), "-n", str(nbytes), "-J"],
                         capture_output=True, text=True, check=True).stdout
    server.wait(timeout=10)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 8 / 1e6


def connect_unix(path, timeout=20):
    """Connects once QEMU listens on `path` (it creates the file a little before it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SerialTap:
    """Reads a QEMU serial chardev; timestamps each heartbeat byte on the host clock."""

    def __init__(self, path):
        self.sock = connect_unix(path)
        self.text = b""
        self.beats = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            data = self.sock.recv(4096)
            now = time.monotonic_ns()
            if not data:
                return
            self.text += data
            if b"ready\n" in self.text:
                self.ready.set()
            self.beats.extend([now] * data.count(b"."))


class Qmp:
    def __init__(self, path):
        self.sock = connect_unix(path)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']['desc']}")


class Qemu:
    instances = 0

    def __init__(self, tmp, tag, mem, append, incoming=None, prefix=(), extra=()):
        Qemu.instances += 1  # fresh socket paths: a killed QEMU leaves its files behind
        self.serial_path = os.path.join(tmp, f"{tag}{Qemu.instances}.serial")
        qmp_path = os.path.join(tmp, f"{tag}{Qemu.instances}.qmp")
        cmd = [QEMU, "-enable-kvm", "-m", str(mem >> 20), "-smp", "1", "-display", "none", "-nodefaults",
               "-kernel", IMAGE, "-append", append,
               "-chardev", f"socket,id=ser,path={self.serial_path},server=on,wait=off", "-serial", "chardev:ser",
               "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", incoming]
        cmd += list(extra)
        self.proc = subprocess.Popen(list(prefix) + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.tap = SerialTap(self.serial_path)
        self.qmp = Qmp(qmp_path)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def qemu_row(link, tmp, mem, append, options):
    channels = next((int(o[len("multifd"):]) for o in options if o.startswith("multifd")), 0)
    port = free_port()
    # -mem-prealloc is QEMU's counterpart of mig-recv --expect-mem: memory populated while waiting.
    dst = Qemu(tmp, "dst", mem, append, incoming="defer", prefix=link.receiver_prefix,
               extra=["-mem-prealloc"] if "prealloc" in options else [])
    src = Qemu(tmp, "src", mem, append)
    try:
        if not src.tap.ready.wait(300):
            raise RuntimeError("QEMU guest never reported ready")
        time.sleep(1)
        for side in (src, dst):
            capabilities = []
            if channels:
                capabilities.append({"capability": "multifd", "state": True})
            if "xbzrle" in options:
                capabilities.append({"capability": "xbzrle", "state": True})
            if "autoconverge" in options:
                capabilities.append({"capability": "auto-converge", "state": True})
            if "postcopy" in options:
                capabilities.append({"capability": "postcopy-ram", "state": True})
            if capabilities:
                side.qmp.execute("migrate-set-capabilities", capabilities=capabilities)
            if channels:
                side.qmp.execute("migrate-set-parameters", **{"multifd-channels": channels})
            if "compress" in options:
                side.qmp.execute("migrate-set-parameters", **{"multifd-compression": "zstd"})
        src.qmp.execute("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS, "max-bandwidth": 1 << 40})
        dst.qmp.execute("migrate-incoming", uri=f"tcp:{link.host}:{port}")
        src.qmp.execute("migrate", uri=f"tcp:{link.host}:{port}")
        # QEMU pre-copies until the rest fits its downtime limit, however long that takes: a
        # guest that never converges would hold up the whole matrix.
        started = time.monotonic()
        deadline = started + QEMU_TIMEOUT_S
        switched = False
        while True:
            info = src.qmp.execute("query-migrate")
            if "postcopy" in options and not switched and time.monotonic() - started >= POSTCOPY_AFTER_S \
                    and info.get("status") == "active":
                src.qmp.execute("migrate-start-postcopy")
                switched = True
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                src.qmp.execute("migrate_cancel")
                return {"status": f"no convergence in {QEMU_TIMEOUT_S} s", "total_ms": None, "downtime_ms": None,
                        "guest_downtime_ms": None, "bytes_sent": info.get("ram", {}).get("transferred"),
                        "rounds": info.get("ram", {}).get("dirty-sync-count"), "verified": None}
            time.sleep(0.01)
        time.sleep(1)  # the guest runs at the destination
        gap = (dst.tap.beats[0] - src.tap.beats[-1]) / 1e6 if dst.tap.beats and src.tap.beats else None
        ram = info.get("ram", {})
        return {"status": info["status"], "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                "guest_downtime_ms": gap, "bytes_sent": ram.get("transferred"), "rounds": ram.get("dirty-sync-count"),
                "verified": None}
    finally:
        src.close()
        dst.close()


# Hybrid post-copy, for both: pre-copy first, switch when this much time has passed.
POSTCOPY_AFTER_S = 2

MIG_SEND_FLAGS = {"compress": ["--compress", "zstd"], "nodedup": ["--no-dedup"], "noverify": ["--no-verify"],
                  "noplan": ["--no-page-plan"], "delta": ["--delta"], "parallel4": ["--parallel", "4"], "parallel2": ["--parallel", "2"],
                  "attarget": ["--stop-at-target"], "noautoconverge": ["--no-auto-converge"], "nozeroskip": ["--no-zero-skip"],
                  "offline": ["--offline"], "zerocopy": ["--zerocopy", "on"],
                  "postcopy": ["--postcopy-after", str(POSTCOPY_AFTER_S)]}


def mig_row(link, tmp, mem, append, options):
    send_stats, recv_stats = os.path.join(tmp, "send.json"), os.path.join(tmp, "recv.json")
    recv_cmd = link.receiver_prefix + [os.path.join(BUILD, "tools", "mig-recv"), "--listen", f"tcp:{link.host}:0",
                                       "--run-for", "1", "--stats-json", recv_stats]
    if "prepared" in options:
        recv_cmd += ["--expect-mem", str(mem)]
    send_flags = [flag for o in options if o != "prepared" for flag in MIG_SEND_FLAGS[o]]
    receiver = subprocess.Popen(recv_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    endpoint = receiver.stdout.readline().split()[-1]
    sender = subprocess.run([os.path.join(BUILD, "tools", "mig-send"), "--kernel", IMAGE, "--mem", str(mem),
                             "--append", append, "--to", endpoint, "--after", "1", "--stats-json", send_stats] + send_flags,
                            capture_output=True, text=True)
    receiver.wait(timeout=60)
    if sender.returncode != 0:
        raise RuntimeError(f"mig-send failed: {sender.stderr.strip()}")
    with open(send_stats) as f:
        s = json.load(f)
    row = {k: s[k] for k in ("status", "total_ms", "downtime_ms", "guest_downtime_ms", "bytes_sent", "rounds", "verified")}
    row["mig_stats"] = s  # every --stats-json field
    with open(recv_stats) as f:
        r = json.load(f)
    row["mig_recv_stats"] = r
    # After a post-copy switch the guest stalls on missing pages: its longest heartbeat gap.
    beats = r.get("local_guest_heartbeats") or [{}]
    row["longest_gap_ms"] = beats[0].get("longest_gap_ms")
    return row


def series(rows):
    """Rows grouped by what a plot line or summary line shows: configuration and guest, then
    dirty rate; each group holds one row per repeat."""
    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["mem"], r["fill"], r["workload"]), {}).setdefault(r["dirty_MBps"], []).append(r)
    return groups


def by_rate(groups_of_one_series):
    """Dirty rates in ascending order; flat out (None) last."""
    return sorted(groups_of_one_series.items(), key=lambda item: (item[0] is None, item[0] or 0))


def values(rows, metric):
    return sorted(r[metric] for r in rows if r.get(metric) is not None)


def summarize(rows):
    """Median and range over the repeats of every matrix point."""
    print("\nmedian [min-max] over repeats")
    for key, rates in sorted(series(rows).items()):
        for rate, group in by_rate(rates):
            parts = []
            for metric, unit in (("total_ms", "ms total"), ("guest_downtime_ms", "ms guest saw"),
                                 ("ratio_to_raw_link", "of link")):
                v = values(group, metric)
                if v:
                    parts.append(f"{statistics.median(v):.2f} [{v[0]:.2f}-{v[-1]:.2f}] {unit}")
            print(f"{' '.join(key):<40} {group[0]['link_percent']:>3}%  " + "  ".join(parts or ["no result"]))


def plot(out_dir):
    """compare.png from rows.jsonl, by bench/plot.py: every repeat drawn, so the spread shows."""
    png = os.path.join(out_dir, "compare.png")
    result = subprocess.run([os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py"), "compare",
                             os.path.join(out_dir, "rows.jsonl"), png], capture_output=True, text=True)
    print(f"plot: {png}" if result.returncode == 0 else f"no plot: {result.stderr.strip()}")


def run_row(link, tmp, wss, mem_text, fill, workload, percent, rate, config, spin):
    """One migration, with the raw link measured just before it: loopback moves by +-30 % within
    minutes here, so a ratio is only meaningful against a baseline taken next to it."""
    mem = size_bytes(mem_text)
    mode = ("mode=spin" if spin else "mode=idle") if percent == 0 else f"mode={workload}" + (f" rate={rate}" if rate is not None else "")
    if workload == "hotcold" and percent:
        mode += " hot=5 hotfrac=95"
    append = f"{mode} wss={wss >> 20}M fill={fill} hb=1 hbserial=1"
    kind, _, option_text = config.partition(":")
    options = [o for o in option_text.split("+") if o]
    row_link, row_iperf3 = raw_link_mbps(link, wss, spin)
    try:
        row = (qemu_row if kind == "qemu" else mig_row)(link, tmp, mem, append, options)
    except Exception as e:  # one failed row must not lose the others
        row = {"status": f"error: {e}", "total_ms": None, "downtime_ms": None, "guest_downtime_ms": None,
               "bytes_sent": None, "rounds": None, "verified": None}
    row.update(config=config, link_percent=percent, dirty_MBps=rate, raw_link_MBps=round(row_link),
               iperf3_MBps=round(row_iperf3), spinning=spin, link=link.label,
               mem=mem_text, wss=f"{wss >> 20}M", fill=fill, workload=workload, guest_cmdline=append)
    if row["bytes_sent"] and row["total_ms"]:
        row["ratio_to_raw_link"] = round(row["bytes_sent"] / 1e6 / row_link * 1000 / row["total_ms"], 3)
    return row


def print_row(row):
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    print(f"{row['mem']:>4} {row['fill']:<6} {row['workload']:<7} {row['link_percent']:>3}% {row['config']:<24} "
          f"{row['status']:<10} total {fmt(row['total_ms'], '8.1f')} ms  downtime {fmt(row['downtime_ms'], '7.2f')} ms  "
          f"guest saw {fmt(row['guest_downtime_ms'], '7.2f')} ms  sent {fmt(row['bytes_sent'] and row['bytes_sent'] / 1e6, '7.1f')} MB  "
          f"link {row['raw_link_MBps']:5d} MB/s  ratio {fmt(row.get('ratio_to_raw_link'), '.2f')}"
          f"{'  longest guest gap ' + fmt(row['longest_gap_ms'], '.1f') + ' ms' if row.get('longest_gap_ms') else ''}", flush=True)


def run_matrix(link, args):
    wss = size_bytes(args.wss)
    # Dirty rates are percentages of one baseline taken at the start, so that every
    # configuration at a given percentage runs the very same guest.
    base, iperf = raw_link_mbps(link, wss, args.spin)
    print(f"raw link ({wss >> 20} MiB over {link.label}{', one core kept busy' if args.spin else ''}): {base:.0f} MB/s; "
          f"iperf3: {iperf:.0f} MB/s", flush=True)
    matrix = [(m, fill, workload, percent if percent == "max" else int(percent), config)
              for m in args.mem.split(",") for fill in args.fill.split(",")
              for workload in args.workload.split(",") for percent in args.rates.split(",")
              for config in args.configs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeat):
            for mem_text, fill, workload, percent, config in matrix:
                rate = None if percent == "max" else int(base * percent / 100)
                row = run_row(link, tmp, wss, mem_text, fill, workload, percent, rate, config, args.spin)
                row["repeat"] = repeat
                rows.append(row)
                print_row(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mem", default="2G", help="guest sizes, comma-separated")
    p.add_argument("--wss", default="1G")
    p.add_argument("--fill", default="random", help="fills, comma-separated: zero, random, text, mix")
    p.add_argument("--workload", default="random", help="dirtying workloads for non-zero rates: random, hotcold, sweep")
    p.add_argument("--rates", default="0,25,50,75",
                   help="guest dirty rates, percent of the raw link; 0 = idle, max = as fast as the guest can")
    p.add_argument("--configs", default="mig,mig:prepared,qemu,qemu:prealloc,qemu:multifd4")
    p.add_argument("--spin", action="store_true",
                   help="the idle guest busy-waits between heartbeats instead of halting, as a busy host's guest does "
                        "(the dirtying workloads always spin)")
    p.add_argument("--repeat", type=int, default=1, help="run the whole matrix this many times (rows carry `repeat`)")
    p.add_argument("--shaped", help='a qdisc for both ends of a veth link, e.g. "tbf rate 1gbit burst 512kb latency 50ms"')
    p.add_argument("--out", default=os.path.join(BUILD, "compare-qemu"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with shaped_link(args.shaped) if args.shaped else contextlib.nullcontext(Link()) as link:
        rows = run_matrix(link, args)
    with open(os.path.join(args.out, "rows.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r if k != "mig_stats"}), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"rows: {args.out}/rows.jsonl, {args.out}/rows.csv")
    summarize(rows)
    plot(args.out)


if __name__ == "__main__":
    sys.exit(main())
