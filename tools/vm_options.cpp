#include "tools/vm_options.h"

#include <fmt/core.h>

#include "tools/cli.h"

namespace mig::tools {

void VmOptions::add_to(CLI::App& app) {
  auto* kernel_option = app.add_option("--kernel", kernel, "multiboot v1 kernel image (ELF32 or a.out kludge)")->check(CLI::ExistingFile);
  size_option(app.add_option("--mem", mem_bytes, "guest memory, e.g. 256M or 2G"))
      ->default_str("256M");
  app.add_option("--vcpus", vcpus, "number of vCPUs")->default_val(1);
  auto* append_option = app.add_option("--append", append, "kernel command line");
  auto* serial_option = app.add_option("--serial", serial, "where COM1 output goes: a file, a FIFO, or - for stdout");
  auto* cpu_option = app.add_option("--cpu", cpu,
                 "the guest's CPU: host (all this host's KVM offers) or a CPU model file (mig-vm --print-cpu, "
                 "--common-cpu), so that the guest can move to every host the model was made from")
      ->check(parses_with([](const std::string& value) {
        if (value != "host") kvm::read_cpu_model(value);
      }))
      ->default_str("host");
  memory.add_to(app);
  add_disk_option(app, disks,
                  "a virtio-blk disk on this image (legacy virtio-pci, as QEMU's virtio-blk-pci; a synthetic guest writes "
                  "its first disk itself); repeatable");
  app.add_option("--record-trace", record_trace,
                 "record the guest's dirty pages into this trace file, one bitmap per interval, while it runs (for mig-sim)");
  app.add_option("--trace-interval-ms", trace_interval_ms, "--record-trace's interval (default 10)")->check(CLI::Range(0.1, 10000.0));
  app.add_option("--synthetic-guest", synthetic_dirty_MBps,
                 "instead of booting a kernel, run a synthetic guest (no KVM needed): host threads stand in for its vCPUs, "
                 "sweep its memory at MBPS in all once it is filled (0: as fast as they can) checking every page, and send "
                 "heartbeats every millisecond; with a --disk, vCPU 0 writes and checks blocks of it at 2 MB/s; it "
                 "migrates only to a mig-recv --synthetic-guest")
      ->type_name("MBPS")
      ->check(CLI::Range(0.0, 1e6))
      ->excludes(kernel_option, append_option, serial_option, cpu_option);
  app.add_option("--compute-vcpus", compute_vcpus,
                 "with --synthetic-guest: the last N of the --vcpus compute instead of sweeping memory; they dirty "
                 "nothing and report the work they get done, to show what slowing the guest down costs them")
      ->check(CLI::Range(0u, kvm::kMaxVcpus - 1));
  dirty_track.add_to(app);
}

void DirtyTrackFlags::add_to(CLI::App& app) {
  app.add_option("--dirty-track", kind,
                 "how dirty pages are found: bitmap (KVM_GET_DIRTY_LOG), or ring (per-vCPU dirty rings, which say which "
                 "vCPU dirtied a page: --policy dirty-limit needs them)")
      ->check(CLI::IsMember({"bitmap", "ring"}))
      ->default_str("bitmap");
  app.add_option("--dirty-ring-entries", ring_entries, "with --dirty-track ring: entries per vCPU ring, a power of two (default 4096; KVM takes 1024 at least)")
      ->check(CLI::Range(64u, 65536u));
}

vmm::DirtyTracking DirtyTrackFlags::tracking() const {
  vmm::DirtyTracking tracking;
  tracking.ring_entries = ring_entries;
  if (kind == "ring") tracking.kind = vmm::DirtyTracking::Kind::ring;
  return tracking;
}

std::uint32_t dirty_ring_entries(const vmm::DirtyTracking& tracking) {
  return tracking.kind == vmm::DirtyTracking::Kind::ring ? tracking.ring_entries : 0;
}

std::unique_ptr<engine::MigratableVm> migratable(std::unique_ptr<engine::MigratableVm> vm, const VmOptions& options) {
  if (options.record_trace.empty()) return vm;
  const auto interval = std::chrono::microseconds(static_cast<std::int64_t>(options.trace_interval_ms * 1000));
  fmt::print("recording dirty pages every {} ms into {}\n", options.trace_interval_ms, options.record_trace);
  return std::make_unique<engine::RecordingVm>(std::move(vm), options.record_trace, options.workload(), interval);
}

std::string VmOptions::workload() const {
  const std::string shape = fmt::format("{} MiB, {} vCPUs, dirty {}", mem_bytes >> 20, vcpus, dirty_track.kind);
  if (!synthetic_dirty_MBps) return fmt::format("kernel {} '{}'; {}", kernel, append, shape);
  return fmt::format("synthetic guest sweeping {} MB/s ({} computing vCPUs); {}", *synthetic_dirty_MBps, compute_vcpus, shape);
}

void add_disk_option(CLI::App& app, std::vector<std::string>& disks, const std::string& what) {
  app.add_option("--disk", disks, what + ". PATH[,format=raw|qcow2][,cache=none|writeback]; raw and cache=none by default, "
                                  "qcow2 through qemu-nbd")
      ->check(parses_with(kvm::parse_disk_config));
}

std::vector<kvm::DiskConfig> disk_configs(const std::vector<std::string>& disks) {
  std::vector<kvm::DiskConfig> out;
  for (const auto& d : disks) out.push_back(kvm::parse_disk_config(d));
  return out;
}

void MemoryFlags::add_to(CLI::App& app) {
  auto* with_memfd = app.add_flag("--memfd", memfd,
                                  "back guest memory with memfd instead of anonymous memory, so a same-host migration can "
                                  "hand it over instead of copying it");
  auto* with_mem_path = app.add_option("--mem-path", mem_path,
                                       "back guest memory with files in this hugetlbfs mount, like QEMU's -mem-path (needs "
                                       "huge pages reserved in /proc/sys/vm/nr_hugepages); they cannot be sealed")
                            ->excludes(with_memfd);
  app.add_flag("--hugetlb", hugetlb,
               "back guest memory with sealed memfds of huge pages (MFD_HUGETLB, like QEMU's memory-backend-memfd with "
               "hugetlb=on): no mount needed, huge pages reserved in /proc/sys/vm/nr_hugepages, and a same-host "
               "migration hands them over sealed, as --memfd's")
      ->excludes(with_memfd)
      ->excludes(with_mem_path);
  app.add_flag("--small-pages", small_pages,
               "do not ask for transparent huge pages (asked for by default, as QEMU does: the guest needs fewer "
               "TLB entries, and on most hosts fresh memory fills several times faster)");
}

kvm::MemoryOptions MemoryFlags::options() const {
  kvm::MemoryOptions options;
  options.backing = !mem_path.empty() || hugetlb ? kvm::MemoryBacking::hugetlbfs
                    : memfd                      ? kvm::MemoryBacking::memfd
                                                 : kvm::MemoryBacking::anonymous;
  options.hugetlbfs_dir = mem_path;
  options.transparent_huge_pages = !small_pages;
  return options;
}

kvm::MachineConfig VmOptions::machine_config() const {
  if (mem_bytes % kvm::kPageSize) throw std::invalid_argument("--mem must be a multiple of 4 KiB");
  kvm::MachineConfig config;
  config.layout = kvm::pc_memory_layout(mem_bytes);
  config.vcpus = vcpus;
  config.serial_path = serial;
  config.memory = memory.options();
  if (cpu != "host") config.cpu_model = kvm::read_cpu_model(cpu);
  config.dirty_ring_entries = dirty_ring_entries(dirty_track.tracking());
  return config;
}

std::unique_ptr<vmm::HostedVm> boot_guest(const VmOptions& options) {
  const auto config = options.machine_config();
  std::vector<std::unique_ptr<kvm::DiskImage>> disks;
  for (const auto& disk : disk_configs(options.disks)) disks.push_back(kvm::DiskImage::open(disk));
  const auto tracking = options.dirty_track.tracking();
  if (options.synthetic_dirty_MBps)
    return vmm::SyntheticVm::boot(options.mem_bytes, options.vcpus, config.memory,
                                  {*options.synthetic_dirty_MBps, options.compute_vcpus}, std::move(disks), tracking);
  if (options.compute_vcpus > 0)
    throw std::invalid_argument("--compute-vcpus is for --synthetic-guest; the workload guest takes compute=N in its --append");
  auto image = kvm::read_multiboot_file(options.kernel);
  auto machine = kvm::Machine::create(config);
  for (auto& disk : disks) machine->attach_disk(std::move(disk));
  machine->boot(image, options.append);
  machine->start();
  return std::make_unique<vmm::KvmVm>(std::move(machine));
}

void run_guest(const control::Domain& domain, const vmm::HostedVm& guest, double run_for) {
  using namespace std::chrono;
  const auto until = steady_clock::now() + duration_cast<steady_clock::duration>(duration<double>(std::max(run_for, 0.0)));
  while ((run_for < 0 || steady_clock::now() < until) && !guest.failure() && !domain.wait_quit(milliseconds(20))) {
  }
}

void print_heartbeat_stats(const kvm::Probe& probe, std::FILE* out) {
  const auto vcpus = probe.snapshot();
  const auto work = probe.work();
  for (std::size_t i = 0; i < vcpus.size(); ++i) {
    const auto& hb = vcpus[i];
    fmt::print(out,
               "vcpu {}: heartbeats {} (seq {}..{}), sequence breaks {}, longest gap {:.3f} ms, timer ticks {}, "
               "sweep passes {}, disk checks {}, self-check failures {}{}{}\n",
               i, hb.count, hb.first_seq, hb.last_seq, hb.seq_breaks, static_cast<double>(hb.max_gap_ns) / 1e6,
               hb.ticks, hb.sweep_passes, hb.disk_checks, hb.check_failures,
               hb.check_failures ? fmt::format(" (last code {:#x})", hb.last_failure_code) : "",
               work[i] ? fmt::format(", work units {}", work[i]) : "");
  }
}

nlohmann::json guest_report(const vmm::HostedVm& guest) {
  nlohmann::json beats = nlohmann::json::array();
  const auto work = guest.probe().work();
  for (const auto& hb : guest.probe().snapshot())
    beats.push_back({{"count", hb.count},
                     {"work_units", work[beats.size()]},
                     {"first_seq", hb.first_seq},
                     {"last_seq", hb.last_seq},
                     {"sequence_breaks", hb.seq_breaks},
                     {"longest_gap_ms", static_cast<double>(hb.max_gap_ns) / 1e6},
                     {"timer_ticks", hb.ticks},
                     {"sweep_passes", hb.sweep_passes},
                     {"disk_checks", hb.disk_checks},
                     {"self_check_failures", hb.check_failures},
                     {"last_failure_code", hb.last_failure_code}});
  return {{"local_guest_heartbeats", beats}, {"local_guest_failure", guest.failure().value_or("")}};
}

nlohmann::json WorkMeter::report(const nlohmann::json& stats) const {
  // The guest ran until the stop-and-copy paused it, and its work stopped there.
  const double precopy_s = (stats.value("total_ms", 0.0) - stats.value("downtime_ms", 0.0)) / 1000;
  const double baseline_s = std::chrono::duration<double>(started_.at - baseline_.at).count();
  const auto now = probe_.work();
  const auto heartbeats = probe_.snapshot();
  nlohmann::json vcpus = nlohmann::json::array();
  for (std::size_t i = 0; i < now.size() && i < started_.work.size(); ++i) {
    if (now[i] == 0) continue;
    const double before = static_cast<double>(started_.work[i] - baseline_.work[i]) / std::max(baseline_s, 1e-9);
    const double during = static_cast<double>(now[i] - started_.work[i]) / std::max(precopy_s, 1e-9);
    vcpus.push_back({{"vcpu", i},
                     {"before_per_s", before},
                     {"during_per_s", during},
                     {"during_over_before", during / std::max(before, 1e-9)},
                     {"longest_heartbeat_gap_ms", static_cast<double>(heartbeats.at(i).max_gap_ns) / 1e6}});
  }
  return vcpus.empty() ? nlohmann::json::object() : nlohmann::json{{"local_guest_work", vcpus}};
}

}  // namespace mig::tools
