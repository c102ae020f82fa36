"""Two network namespaces joined by a veth pair, for the fault matrix and the simulator's
validation: "hosts" with addresses of their own, a link that can be shaped, taken down and
brought back, and nothing left behind. Needs root."""
import os
import subprocess

SOURCE_ADDR, DEST_ADDR = "10.231.0.1", "10.231.0.2"


def sh(*args, check=True, ns=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def usable():
    """Whether namespaces can be made here (root, and ip netns works)."""
    return os.geteuid() == 0 and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


class Network:
    """The pair, shaped to `rate` both ways (tc tbf; None: as fast as the veth goes)."""

    def __init__(self, rate="400mbit"):
        tag = str(os.getpid())
        self.rate = rate
        self.source, self.dest = "migfm-src-" + tag, "migfm-dst-" + tag
        self.source_dev, self.dest_dev = "mfs" + tag, "mfd" + tag

    def __enter__(self):
        sh("ip", "netns", "add", self.source)
        sh("ip", "netns", "add", self.dest)
        sh("ip", "link", "add", self.source_dev, "netns", self.source, "type", "veth", "peer", "name", self.dest_dev,
           "netns", self.dest)
        for ns, dev, addr in self.ends_with_addresses():
            sh("ip", "addr", "add", addr + "/30", "dev", dev, ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        self.restore()
        return self

    def __exit__(self, *exc):
        for ns in (self.source, self.dest):  # deleting a namespace deletes the veth end in it
            sh("ip", "netns", "del", ns, check=False)

    def ends_with_addresses(self):
        return ((self.source, self.source_dev, SOURCE_ADDR), (self.dest, self.dest_dev, DEST_ADDR))

    def shape(self, rate):
        for ns, dev, _ in self.ends_with_addresses():
            if rate:
                sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "100ms",
                   ns=ns)
            else:
                sh("tc", "qdisc", "del", "dev", dev, "root", check=False, ns=ns)

    def restore(self):
        """Both ends up, shaped to the pair's rate again."""
        for ns, dev, _ in self.ends_with_addresses():
            sh("ip", "link", "set", dev, "up", ns=ns)
        self.shape(self.rate)

    def leftovers(self):
        listed = sh("ip", "netns", "list").stdout
        return [ns for ns in (self.source, self.dest) if ns in listed]


def start_receiver(build, net, port, pin_cpu=None, synthetic=True):
    """A mig-recv listening in the destination namespace (on loopback in this one where `net`
    is None; on CPUs `pin_cpu`, taskset's list, if given) for a synthetic guest, or a KVM
    one, that runs the guest 0.2 s after it arrives; returns once it listens."""
    pin = ["taskset", "-c", str(pin_cpu)] if pin_cpu is not None else []
    inside, address = (["ip", "netns", "exec", net.dest], DEST_ADDR) if net else ([], "127.0.0.1")
    receiver = subprocess.Popen(inside + pin +
                                [os.path.join(build, "tools", "mig-recv")] + (["--synthetic-guest"] if synthetic else []) +
                                ["--listen", "tcp:%s:%d" % (address, port), "--run-for", "0.2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if "listening on" not in receiver.stdout.readline():
        raise RuntimeError("mig-recv did not listen: " + receiver.stderr.read())
    return receiver
