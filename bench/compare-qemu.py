#!/usr/bin/env python3
"""compare-qemu: mig and QEMU migrate the same guest over loopback, side by side, in one run.

Every row is one migration of the workload guest (build/guest/mig-guest.elf), booted the same
way by mig's VMM and by `qemu-system-x86_64 -kernel`. For each row it records total time,
the downtime the migrator reports, the downtime the guest saw (the gap in its heartbeats:
the probe port under mig, one serial byte per heartbeat under QEMU), bytes sent, and the
raw link (iperf3, same byte count, measured in this run) so every row has a ratio to the
limit. Writes JSON lines and CSV, and PNG plots when gnuplot is installed.

    bench/compare-qemu.py [--mem 2G[,...]] [--wss 1G] [--fill random[,text,mix,zero]]
                          [--workload random[,hotcold,sweep]] [--rates 0,25,50,75]
                          [--configs mig,mig:prepared,qemu,qemu:multifd4] [--shaped "tbf rate 1gbit burst 512kb latency 50ms"]
                          [--out DIR]

The matrix is every combination of guest size, fill, workload, rate and configuration.
A configuration is `mig` or `qemu`, optionally with `:` and `+`-joined options:
  mig:  prepared (mig-recv --expect-mem), compress (zstd), delta, parallel2, parallel4, attarget, nozeroskip, nodedup, noverify, noplan, offline, zerocopy
  qemu: multifdN (N channels), xbzrle, compress (multifd zstd, needs multifdN)
Rate 0 runs the idle workload. --shaped runs everything, the raw-link baseline included,
in a private network namespace whose loopback carries that qdisc (tc qdisc add dev lo root
SPEC; "netem rate 1gbit delay 1ms" where the kernel has netem): a link slower than memory,
with no address outside 127.0.0.1 involved.
"""
import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("MIG_BUILD", os.path.join(ROOT, "build"))
IMAGE = os.path.join(BUILD, "guest", "mig-guest.elf")
QEMU = "qemu-system-x86_64"
DOWNTIME_MS = 30


def size_bytes(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_link_mbps(nbytes):
    """iperf3, one stream over loopback, the same byte count a migration moves."""
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", str(nbytes), "-J"],
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

    def __init__(self, tmp, tag, mem, append, incoming=None):
        Qemu.instances += 1  # fresh socket paths: a killed QEMU leaves its files behind
        self.serial_path = os.path.join(tmp, f"{tag}{Qemu.instances}.serial")
        qmp_path = os.path.join(tmp, f"{tag}{Qemu.instances}.qmp")
        cmd = [QEMU, "-enable-kvm", "-m", str(mem >> 20), "-smp", "1", "-display", "none", "-nodefaults",
               "-kernel", IMAGE, "-append", append,
               "-chardev", f"socket,id=ser,path={self.serial_path},server=on,wait=off", "-serial", "chardev:ser",
               "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", incoming]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.tap = SerialTap(self.serial_path)
        self.qmp = Qmp(qmp_path)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def qemu_row(tmp, mem, append, options):
    channels = next((int(o[len("multifd"):]) for o in options if o.startswith("multifd")), 0)
    port = free_port()
    dst = Qemu(tmp, "dst", mem, append, incoming="defer")
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
            if capabilities:
                side.qmp.execute("migrate-set-capabilities", capabilities=capabilities)
            if channels:
                side.qmp.execute("migrate-set-parameters", **{"multifd-channels": channels})
            if "compress" in options:
                side.qmp.execute("migrate-set-parameters", **{"multifd-compression": "zstd"})
        src.qmp.execute("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS, "max-bandwidth": 1 << 40})
        dst.qmp.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        src.qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = src.qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
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


MIG_SEND_FLAGS = {"compress": ["--compress", "zstd"], "nodedup": ["--no-dedup"], "noverify": ["--no-verify"],
                  "noplan": ["--no-page-plan"], "delta": ["--delta"], "parallel4": ["--parallel", "4"], "parallel2": ["--parallel", "2"],
                  "attarget": ["--stop-at-target"], "nozeroskip": ["--no-zero-skip"],
                  "offline": ["--offline"], "zerocopy": ["--zerocopy", "on"]}


def mig_row(tmp, mem, append, options):
    send_stats, recv_stats = os.path.join(tmp, "send.json"), os.path.join(tmp, "recv.json")
    recv_cmd = [os.path.join(BUILD, "tools", "mig-recv"), "--listen", "tcp:127.0.0.1:0", "--run-for", "1",
                "--stats-json", recv_stats]
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
    return row


def plot(out_dir, rows):
    if not shutil.which("gnuplot"):
        print("gnuplot not installed: no plots")
        return
    configs = sorted({(r["config"], r["mem"], r["fill"], r["workload"]) for r in rows})
    for metric, label in (("total_ms", "total time (ms)"), ("guest_downtime_ms", "guest-observed downtime (ms)"),
                          ("bytes_sent", "bytes sent")):
        data = os.path.join(out_dir, f"{metric}.dat")
        with open(data, "w") as f:
            for c in configs:
                f.write(f'"{" ".join(c)}"\n')
                for r in sorted((r for r in rows if (r["config"], r["mem"], r["fill"], r["workload"]) == c),
                                key=lambda r: r["dirty_MBps"]):
                    if r[metric] is not None:
                        f.write(f"{r['dirty_MBps']} {r[metric]}\n")
                f.write("\n\n")
        png = os.path.join(out_dir, f"{metric}.png")
        script = (f"set terminal png size 800,500; set output '{png}'; set key top left; set grid;"
                  f"set xlabel 'guest dirty rate asked (MB/s)'; set ylabel '{label}';"
                  f"plot for [i=0:{len(configs) - 1}] '{data}' index i using 1:2 with linespoints title columnheader(1)")
        subprocess.run(["gnuplot", "-e", script], check=True)
        print(f"plot: {png}")


def enter_shaped_namespace(qdisc):
    """Re-runs this script inside a fresh network namespace whose loopback is shaped."""
    name = f"migbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root"] + qdisc.split(),
                       check=True)
        argv = [a for a in sys.argv if a != "--shaped" and a != qdisc]
        return subprocess.run(["ip", "netns", "exec", name, sys.executable] + argv + ["--link-label", qdisc]).returncode
    finally:
        subprocess.run(["ip", "netns", "delete", name])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mem", default="2G", help="guest sizes, comma-separated")
    p.add_argument("--wss", default="1G")
    p.add_argument("--fill", default="random", help="fills, comma-separated: zero, random, text, mix")
    p.add_argument("--workload", default="random", help="dirtying workloads for non-zero rates: random, hotcold, sweep")
    p.add_argument("--rates", default="0,25,50,75", help="guest dirty rates, percent of the raw link; 0 = idle")
    p.add_argument("--configs", default="mig,mig:prepared,qemu,qemu:multifd4")
    p.add_argument("--shaped", help='a qdisc for a shaped loopback, e.g. "tbf rate 1gbit burst 512kb latency 50ms"')
    p.add_argument("--link-label", default="loopback", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(BUILD, "compare-qemu"))
    args = p.parse_args()
    if args.shaped:
        return enter_shaped_namespace(args.shaped)
    wss = size_bytes(args.wss)
    os.makedirs(args.out, exist_ok=True)
    link = raw_link_mbps(wss)
    print(f"raw link (iperf3, {wss >> 20} MiB over {args.link_label}): {link:.0f} MB/s")
    rows = []
    matrix = [(m, fill, workload, int(percent), config) for m in args.mem.split(",") for fill in args.fill.split(",")
              for workload in args.workload.split(",") for percent in args.rates.split(",") for config in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for mem_text, fill, workload, percent, config in matrix:
            mem = size_bytes(mem_text)
            rate = int(link * percent / 100)
            mode = f"mode={workload} rate={rate}" if percent else "mode=idle"
            if workload == "hotcold" and percent:
                mode += " hot=5 hotfrac=95"
            append = f"{mode} wss={wss >> 20}M fill={fill} hb=1 hbserial=1"
            kind, _, option_text = config.partition(":")
            options = [o for o in option_text.split("+") if o]
            if True:
                try:
                    if kind == "qemu":
                        row = qemu_row(tmp, mem, append, options)
                    else:
                        row = mig_row(tmp, mem, append, options)
                except Exception as e:  # one failed row must not lose the others
                    row = {"status": f"error: {e}", "total_ms": None, "downtime_ms": None, "guest_downtime_ms": None,
                           "bytes_sent": None, "rounds": None, "verified": None}
                row.update(config=config, link_percent=percent, dirty_MBps=rate, raw_link_MBps=round(link),
                           link=args.link_label, mem=mem_text, wss=args.wss, fill=fill, workload=workload,
                           guest_cmdline=append)
                if row["bytes_sent"] and row["total_ms"]:
                    row["ratio_to_raw_link"] = round(row["bytes_sent"] / 1e6 / link * 1000 / row["total_ms"], 3)
                rows.append(row)
                fmt = lambda v, f: "n/a" if v is None else format(v, f)
                print(f"{mem_text:>4} {fill:<6} {workload:<7} {percent:>3}% {config:<18} {row['status']:<10} total {fmt(row['total_ms'], '8.1f')} ms  "
                      f"downtime {fmt(row['downtime_ms'], '7.2f')} ms  guest saw {fmt(row['guest_downtime_ms'], '7.2f')} ms  "
                      f"sent {fmt(row['bytes_sent'] and row['bytes_sent'] / 1e6, '7.1f')} MB  "
                      f"ratio to link {fmt(row.get('ratio_to_raw_link'), '.2f')}", flush=True)
    with open(os.path.join(args.out, "rows.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "rows.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r if k != "mig_stats"}), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"rows: {args.out}/rows.jsonl, {args.out}/rows.csv")
    plot(args.out, rows)


if __name__ == "__main__":
    sys.exit(main())
