// The guest-defining options shared by mig-vm and mig-send, so both start a guest the same way.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <string>

#include "control/domain.h"
#include "engine/dirty_trace.h"
#include "kvm/machine.h"
#include "vmm/kvm_vm.h"
#include "vmm/synthetic_vm.h"

namespace mig::tools {

// How guest memory is backed, on either side of a migration.
struct MemoryFlags {
  bool memfd = false;
  bool hugetlb = false;
  bool small_pages = false;
  std::string mem_path;

  void add_to(CLI::App& app);
  kvm::MemoryOptions options() const;
};

// How the VMM finds dirty pages (--dirty-track, --dirty-ring-entries), on either side.
struct DirtyTrackFlags {
  std::string kind = "bitmap";
  std::uint32_t ring_entries = 4096;

  void add_to(CLI::App& app);
  vmm::DirtyTracking tracking() const;
};

// What a KVM machine takes of it (kvm::MachineConfig::dirty_ring_entries): 0 for the bitmap.
std::uint32_t dirty_ring_entries(const vmm::DirtyTracking& tracking);

struct VmOptions {
  std::string kernel;
  std::uint64_t mem_bytes = 256ull << 20;
  unsigned vcpus = 1;
  std::string append;
  std::string serial;
  std::string cpu = "host";  // or a CPU model file
  MemoryFlags memory;
  std::vector<std::string> disks;  // PATH[,format=raw|qcow2][,cache=none|writeback]
  std::string record_trace;        // a dirty trace file to record into while the guest runs
  double trace_interval_ms = 10;
  std::optional<double> synthetic_dirty_MBps;  // run a synthetic guest (vmm/synthetic_vm.h) instead of a kernel
  unsigned compute_vcpus = 0;                  // of a synthetic guest's vCPUs, how many compute
  DirtyTrackFlags dirty_track;

  void add_to(CLI::App& app);
  bool defines_guest() const { return !kernel.empty() || synthetic_dirty_MBps; }
  kvm::MachineConfig machine_config() const;
  // The guest and what it runs, in words, for a dirty trace's header.
  std::string workload() const;
};

// The guest as the engine sees it; with --record-trace, one recording its dirty pages.
std::unique_ptr<engine::MigratableVm> migratable(std::unique_ptr<engine::MigratableVm> vm, const VmOptions& options);

// --disk PATH[,format=raw|qcow2][,cache=none|writeback], repeatable, for mig-vm, mig-send and mig-recv.
void add_disk_option(CLI::App& app, std::vector<std::string>& disks, const std::string& what);
std::vector<kvm::DiskConfig> disk_configs(const std::vector<std::string>& disks);

// Starts the guest the options describe: a KVM machine (its disks attached, its image loaded)
// or a synthetic guest. Errors carry a one-line reason.
std::unique_ptr<vmm::HostedVm> boot_guest(const VmOptions& options);

// Lets the guest run until `run_for` seconds have passed (forever if negative), the domain
// quits (QMP or a signal), or the guest fails.
void run_guest(const control::Domain& domain, const vmm::HostedVm& guest, double run_for);

// One line per vCPU: heartbeats, sequence breaks, the longest gap, timer ticks, failures.
void print_heartbeat_stats(const kvm::Probe& probe, std::FILE* out);
// The same per vCPU as JSON, plus the guest's failure if any, for statistics files.
nlohmann::json guest_report(const vmm::HostedVm& guest);

// How fast the guest's computing vCPUs (those that report work, --compute-vcpus) ran before a
// migration and during its pre-copy: what slowing the guest down cost the vCPUs that dirty
// no memory.
class WorkMeter {
 public:
  explicit WorkMeter(const kvm::Probe& probe) : probe_(probe), baseline_(take()) {}  // the baseline starts now
  void migration_started() { started_ = take(); }
  // After a failed attempt: the next one's baseline is the time the guest runs on from now,
  // free of the brakes of this one.
  void migration_failed() { baseline_ = take(); }
  // {"local_guest_work": [per vCPU: work per second before and during, their ratio, its
  // longest heartbeat gap so far]} for the vCPUs that reported work, or an empty object.
  // `stats`: the migration's, for how long pre-copy ran.
  nlohmann::json report(const nlohmann::json& stats) const;

 private:
  struct Reading {
    std::chrono::steady_clock::time_point at;
    std::vector<std::uint64_t> work;
  };
  Reading take() const { return {std::chrono::steady_clock::now(), probe_.work()}; }
  const kvm::Probe& probe_;
  Reading baseline_, started_;
};

}  // namespace mig::tools
