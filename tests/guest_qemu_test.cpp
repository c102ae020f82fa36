// The workload guest itself, run under QEMU's TCG, which needs no /dev/kvm: its probe writes
// (guest/probe.h) are read back from QEMU's trace of I/O-port writes. So the guest's own code is
// tested on every host, not only where KVM runs it.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <algorithm>
#include <functional>
#include <regex>

#include "guest/probe.h"
#include "tests/process.h"

using namespace mig;
using namespace mig::test;
using Catch::Matchers::Contains;

namespace {

constexpr const char* kQemu = "/usr/bin/qemu-system-x86_64";

struct ProbeWrite {
  unsigned vcpu;
  unsigned port;
  std::uint64_t value;
};

// QEMU traces each write to a device or to no device ('io') as
//   memory_region_ops_write cpu 1 mr 0x55... addr 0x528 value 0x1988 size 4 name 'io'
std::vector<ProbeWrite> read_port_writes(const std::string& trace_path) {
  static const std::regex line(R"(memory_region_ops_write cpu (\d+) mr \S+ addr (0x[0-9a-f]+) value (0x[0-9a-f]+) )");
  std::vector<ProbeWrite> writes;
  std::ifstream in(trace_path);
  std::smatch m;
  for (std::string text; std::getline(in, text);)
    if (std::regex_search(text, m, line))
      writes.push_back({static_cast<unsigned>(std::stoul(m[1])), static_cast<unsigned>(std::stoul(m[2], nullptr, 16)),
                        std::stoull(m[3], nullptr, 16)});
  return writes;
}

std::size_t count(const std::vector<ProbeWrite>& writes, unsigned vcpu, unsigned port) {
  return static_cast<std::size_t>(
      std::count_if(writes.begin(), writes.end(), [&](const ProbeWrite& w) { return w.vcpu == vcpu && w.port == port; }));
}

struct QemuRun {
  std::string console;
  std::vector<ProbeWrite> writes;
};

// Boots the workload guest under QEMU with 2 vCPUs, `append` and QEMU arguments `devices`, until
// `enough` says its probe writes suffice, or 30 s.
QemuRun run_under_qemu(const std::string& accel, const std::string& append,
                       const std::function<bool(const std::vector<ProbeWrite>&)>& enough,
                       const std::vector<std::string>& devices = {}) {
  if (::access(kQemu, X_OK) != 0) {
    std::printf("SKIPPED: qemu-system-x86_64 is not installed\n");
    std::exit(MIG_SKIP_CODE);
  }
  const auto serial = temp_path("qemu-serial.txt"), trace = temp_path("qemu-trace.txt");
  std::vector<std::string> args = {kQemu, "-machine", "accel=" + accel, "-m", "128", "-smp", "2", "-display", "none",
                                   "-nodefaults", "-kernel", kGuestImage, "-append", append, "-serial", "file:" + serial,
                                   "-trace", "memory_region_ops_write", "-D", trace};
  args.insert(args.end(), devices.begin(), devices.end());
  Child qemu(args);
  QemuRun run;
  for (int i = 0; i < 300 && !(run.writes = read_port_writes(trace), enough(run.writes)); ++i) ::usleep(100000);
  qemu.signal(SIGKILL);
  qemu.wait();
  std::ifstream serial_in(serial);
  run.console.assign(std::istreambuf_iterator<char>(serial_in), {});
  std::remove(serial.c_str());
  std::remove(trace.c_str());
  return run;
}

// No self-check failed: none reported through the probe, and no unexpected exception.
void check_guest_healthy(const QemuRun& run) {
  CHECK_THAT(run.console, !Contains("exception"));
  CHECK(count(run.writes, 0, MIG_PROBE_CHECK_FAIL) + count(run.writes, 1, MIG_PROBE_CHECK_FAIL) == 0);
}

}  // namespace

TEST_CASE("QEMU boots the same guest image, and its timer and register checks hold there") {
  // With KVM where there is one, as bench/compare-qemu.py runs it; else with TCG.
  const auto run = run_under_qemu("kvm:tcg", "mode=random rate=10 wss=8M timer=100 regcheck=1 cpus=2", [](const auto& w) {
    return count(w, 0, MIG_PROBE_HEARTBEAT) >= 50 && count(w, 1, MIG_PROBE_HEARTBEAT) >= 50;
  });
  INFO(run.console);
  CHECK_THAT(run.console, Contains("mig-guest: mode=1") && Contains("cpus=2"));
  std::uint64_t beats[2] = {0, 0}, ticks[2] = {0, 0};
  for (const auto& w : run.writes) {
    if (w.vcpu >= 2) continue;
    if (w.port == MIG_PROBE_HEARTBEAT) CHECK(w.value == ++beats[w.vcpu]);  // in sequence
    if (w.port == MIG_PROBE_TICKS) {
      CHECK(w.value >= ticks[w.vcpu]);
      ticks[w.vcpu] = w.value;
    }
  }
  CHECK(ticks[0] >= 20);  // 100 Hz for 50 heartbeats of 10 ms: about 50
  CHECK(ticks[1] >= 20);
  check_guest_healthy(run);
}

TEST_CASE("under QEMU's TCG, the workload guest's computing vCPU reports work instead of writing, and its other vCPU sweeps") {
  // A pass of 4 MiB at 20 MB/s takes 0.2 s.
  const auto run = run_under_qemu("tcg", "mode=sweep rate=20 wss=4M cpus=2 compute=1", [](const auto& w) {
    return count(w, 0, MIG_PROBE_SWEEP_PASS) >= 3 && count(w, 1, MIG_PROBE_WORK) >= 30;
  });
  INFO(run.console);
  CHECK_THAT(run.console, Contains("compute=1") && Contains("mig-guest: ready"));
  REQUIRE(count(run.writes, 0, MIG_PROBE_SWEEP_PASS) >= 3);
  REQUIRE(count(run.writes, 1, MIG_PROBE_WORK) >= 30);
  CHECK(count(run.writes, 1, MIG_PROBE_SWEEP_PASS) == 0);  // the computing vCPU writes no memory
  CHECK(count(run.writes, 0, MIG_PROBE_WORK) == 0);
  std::uint64_t work = 0, passes = 0;
  for (const auto& w : run.writes) {
    if (w.vcpu == 1 && w.port == MIG_PROBE_WORK) work += w.value;
    if (w.vcpu == 0 && w.port == MIG_PROBE_SWEEP_PASS) CHECK(w.value == ++passes);  // none skipped or repeated
  }
  CHECK(work > 0);
  check_guest_healthy(run);
}

TEST_CASE("under QEMU's TCG, the workload guest's virtio-blk driver writes blocks to QEMU's own device and reads them back") {
  // QEMU's legacy virtio-blk-pci, the device mig's VMM models (kvm/virtio_blk.h): the guest's
  // driver is checked against the reference, not only against mig's reading of the spec.
  const auto image = temp_path("qemu-disk.img");
  { std::ofstream empty(image); }
  REQUIRE(::truncate(image.c_str(), 64 << 20) == 0);  // sparse
  const auto run = run_under_qemu(
      "tcg", "mode=idle cpus=2 disk=1 diskrate=5", [](const auto& w) { return count(w, 0, MIG_PROBE_DISK_CHECKS) >= 50; },
      {"-drive", "file=" + image + ",format=raw,if=none,id=disk0", "-device", "virtio-blk-pci,drive=disk0,disable-modern=on"});
  std::remove(image.c_str());
  INFO(run.console);
  CHECK_THAT(run.console, !Contains("no usable virtio-blk disk"));
  REQUIRE(count(run.writes, 0, MIG_PROBE_DISK_CHECKS) >= 50);
  std::uint64_t checks = 0;
  for (const auto& w : run.writes)
    if (w.port == MIG_PROBE_DISK_CHECKS) CHECK(w.value == ++checks);  // each block read back held what was written
  check_guest_healthy(run);
}
