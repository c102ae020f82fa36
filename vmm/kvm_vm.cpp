#include "vmm/kvm_vm.h"

#include "kvm/cpu_features.h"
#include "vmm/image_disk.h"
#include "transport/bytes.h"

namespace mig::vmm {

namespace {

constexpr std::uint32_t kSectionVersion = 1;
constexpr std::size_t kMaxXsave = 1u << 20;
constexpr std::size_t kMaxEntries = 4096;

std::vector<std::byte> encode_vcpu(const kvm::VcpuState& s) {
  wire::ByteWriter w;
  w.put(s.mp_state);
  w.put(s.regs);
  w.put(s.sregs);
  w.put_vector(s.xsave);
  w.put(s.xcrs);
  w.put(s.debugregs);
  w.put(s.lapic);
  w.put_vector(s.msrs);
  w.put(s.events);
  w.put_vector(s.cpuid);
  w.put(s.tsc_khz);
  return w.take();
}

kvm::VcpuState decode_vcpu(std::span<const std::byte> data) {
  wire::ByteReader r(data);
  kvm::VcpuState s;
  s.mp_state = r.get<kvm_mp_state>("vcpu.mp_state");
  s.regs = r.get<kvm_regs>("vcpu.regs");
  s.sregs = r.get<kvm_sregs>("vcpu.sregs");
  s.xsave = r.get_vector<std::uint8_t>(kMaxXsave, "vcpu.xsave");
  s.xcrs = r.get<kvm_xcrs>("vcpu.xcrs");
  s.debugregs = r.get<kvm_debugregs>("vcpu.debugregs");
  s.lapic = r.get<kvm_lapic_state>("vcpu.lapic");
  s.msrs = r.get_vector<kvm_msr_entry>(kMaxEntries, "vcpu.msrs");
  s.events = r.get<kvm_vcpu_events>("vcpu.events");
  s.cpuid = r.get_vector<kvm_cpuid_entry2>(kMaxEntries, "vcpu.cpuid");
  s.tsc_khz = r.get<std::uint32_t>("vcpu.tsc_khz");
  r.expect_end("vcpu section");
  return s;
}

}  // namespace

std::vector<engine::StateSection> encode_state(const kvm::MachineState& state) {
  std::vector<engine::StateSection> sections;
  for (std::size_t i = 0; i < state.vcpus.size(); ++i)
    sections.push_back({"vcpu." + std::to_string(i), kSectionVersion, encode_vcpu(state.vcpus[i])});
  sections.push_back({"vm", kSectionVersion, wire::encode_value(state.vm)});
  sections.push_back({"serial", kSectionVersion, wire::encode_value(state.serial)});
  sections.push_back({"probe", kSectionVersion, encode_heartbeats(state.probe)});
  for (std::size_t i = 0; i < state.disks.size(); ++i)
    sections.push_back({"virtio-blk." + std::to_string(i), kSectionVersion, wire::encode_value(state.disks[i])});
  return sections;
}

kvm::MachineState decode_state(const std::vector<engine::StateSection>& sections) {
  kvm::MachineState state;
  bool have_vm = false, have_serial = false, have_probe = false;
  for (const auto& s : sections) {
    if (s.name == "synthetic")  // whatever its version: say what was sent
      throw wire::ProtocolError("the source's guest is a synthetic one: only a mig-recv --synthetic-guest takes it");
    if (s.version != kSectionVersion)
      throw wire::ProtocolError("state section '" + s.name + "' has version " + std::to_string(s.version) +
                                ", this build restores version " + std::to_string(kSectionVersion));
    if (s.name == "vm") {
      state.vm = wire::decode_value<kvm::VmState>(s.data, "vm section");
      have_vm = true;
    } else if (s.name == "serial") {
      state.serial = wire::decode_value<kvm::SerialState>(s.data, "serial section");
      have_serial = true;
    } else if (s.name == "probe") {
      state.probe = decode_heartbeats(s.data);
      have_probe = true;
    } else if (s.name == "vcpu." + std::to_string(state.vcpus.size())) {
      state.vcpus.push_back(decode_vcpu(s.data));
    } else if (s.name == "virtio-blk." + std::to_string(state.disks.size())) {
      state.disks.push_back(wire::decode_value<kvm::VirtioBlkState>(s.data, "virtio-blk section"));
    } else {
      throw wire::ProtocolError("unknown or out-of-order state section '" + s.name + "'");
    }
  }
  if (!have_vm || !have_serial || !have_probe || state.vcpus.empty())
    throw wire::ProtocolError("state is incomplete: a vm, serial, probe or vcpu section is missing");
  return state;
}

KvmVm::IncomingMemory KvmVm::incoming_memory(kvm::MemoryOptions wanted) {
  IncomingMemory chosen{wanted, kvm::describe_page_size(wanted)};
  if (!wanted.transparent_huge_pages || wanted.backing == kvm::MemoryBacking::hugetlbfs) return chosen;
  if (kvm::free_huge_blocks_reported_to_hypervisor()) {
    chosen.options.huge_pages_after_fill = true;
    chosen.description +=
        "; a VM that was not prepared ahead fills incoming pages in 4 KiB pages and asks for huge ones once its guest "
        "runs, because this host reports its free 2 MiB blocks to its hypervisor, which makes a fresh huge page several "
        "times dearer to fill";
  }
  return chosen;
}

engine::VmShape KvmVm::pc_shape(std::uint64_t mem_bytes, unsigned vcpus) {
  engine::VmShape shape;
  shape.vcpus = vcpus;
  for (const auto& r : kvm::pc_memory_layout(mem_bytes)) shape.regions.push_back({r.guest_addr, r.size});
  return shape;
}

KvmVm::KvmVm(std::unique_ptr<kvm::Machine> machine) : machine_(std::move(machine)) {
  for (std::size_t i = 0; i < machine_->disk_count(); ++i) disks_.push_back(std::make_unique<KvmDisk>(machine_->disk(i)));
}

std::vector<engine::MigratableDisk*> KvmVm::disks() {
  std::vector<engine::MigratableDisk*> out;
  for (auto& d : disks_) out.push_back(d.get());
  return out;
}

std::vector<engine::DiskExtent> KvmDisk::data_extents() {
  std::vector<engine::DiskExtent> out;
  for (const auto& e : device_.image().data_extents()) out.push_back({e.offset, e.length});
  return out;
}

engine::VmFactory KvmVm::factory(std::string serial_path, kvm::MemoryOptions memory,
                                 std::optional<engine::VmShape> expected, std::vector<kvm::DiskConfig> disks,
                                 std::uint32_t dirty_ring_entries) {
  // A machine built ahead fills its memory while the receiver waits, off the clock: it takes
  // huge pages from the start, whatever they cost to fill here.
  auto config_for = [serial_path, memory, dirty_ring_entries](const engine::VmShape& shape, bool built_ahead) {
    kvm::MachineConfig config;
    config.vcpus = shape.vcpus;
    config.dirty_ring_entries = dirty_ring_entries;
    config.serial_path = serial_path;
    config.memory = memory;
    config.memory.huge_pages_after_fill = memory.huge_pages_after_fill && !built_ahead;
    for (const auto& r : shape.regions) config.layout.push_back({r.guest_addr, r.size});
    config.shared_memory_fds = shape.shared_memory_fds;
    return config;
  };
  // Shared so the factory stays copyable, as std::function wants; taken by the first use.
  auto prepared = std::make_shared<std::unique_ptr<kvm::Machine>>();
  if (expected) {
    *prepared = kvm::Machine::create(config_for(*expected, true));
    (*prepared)->memory().populate();
  }
  return [config_for, prepared, disks](const engine::VmShape& shape) -> std::unique_ptr<engine::MigratableVm> {
    const kvm::MachineConfig config = config_for(shape, false);
    auto machine = std::move(*prepared);
    if (!machine || !config.shared_memory_fds.empty() || machine->config().vcpus != config.vcpus ||
        machine->memory().layout() != config.layout) {
      if (config.shared_memory_fds.empty()) require_host_memory(shape);
      machine = kvm::Machine::create(config);
    }
    for (auto& image : open_incoming_disks(shape.disks, disks)) machine->attach_disk(std::move(image));
    return std::make_unique<KvmVm>(std::move(machine));
  };
}

bool KvmVm::set_throttle(double share) {
  throttler_.set(share);
  return true;
}

bool KvmVm::set_vcpu_dirty_limit(double bytes_per_s) {
  if (!machine_->dirty_rings()) return false;  // a bitmap cannot say which vCPU dirtied a page
  dirty_limiter_.set(bytes_per_s / kvm::kPageSize);
  if (bytes_per_s <= 0)  // lifted: no vCPU waits out a hold it was given under the cap
    for (unsigned vcpu = 0; vcpu < vcpu_count(); ++vcpu) machine_->hold_vcpu(vcpu, {});
  return true;
}

void KvmVm::fetch_dirty_log_by_vcpu(std::size_t region, std::span<std::uint64_t> bitmap,
                                    std::span<const std::span<std::uint64_t>> vcpu_bitmaps) {
  if (!machine_->dirty_rings()) return MigratableVm::fetch_dirty_log_by_vcpu(region, bitmap, vcpu_bitmaps);
  machine_->fetch_dirty_log_by_vcpu(region, bitmap, vcpu_bitmaps);
}

void KvmVm::resume() {
  machine_->resume();
  machine_->memory().advise_huge_pages();  // once the guest runs here, not while it arrives
}

void KvmVm::pause() {
  throttler_.stop();
  machine_->pause();
}

std::vector<wire::CpuidLeaf> KvmVm::guest_cpuid() const {
  std::vector<wire::CpuidLeaf> leaves;
  for (const auto& e : machine_->guest_cpuid()) leaves.push_back({e.function, e.index, e.eax, e.ebx, e.ecx, e.edx});
  return leaves;
}

std::vector<std::string> KvmVm::missing_cpu_features(const std::vector<wire::CpuidLeaf>& guest) {
  std::vector<kvm_cpuid_entry2> wanted;
  for (const auto& l : guest) {
    kvm_cpuid_entry2 e{};
    e.function = l.function;
    e.index = l.index;
    e.eax = l.eax;
    e.ebx = l.ebx;
    e.ecx = l.ecx;
    e.edx = l.edx;
    wanted.push_back(e);
  }
  return kvm::missing_cpu_features(wanted, kvm::KvmSystem::open().supported_cpuid());
}

std::string KvmVm::tsc_refusal(std::uint32_t guest_khz) {
  const auto sys = kvm::KvmSystem::open();
  return kvm::plan_tsc(guest_khz, sys.tsc_khz(), sys.can_scale_tsc()).reason;
}

std::string KvmVm::postcopy_unsupported() const {
  if (machine_->memory().backing() == kvm::MemoryBacking::hugetlbfs)
    return "hugetlbfs guest memory (--mem-path, --hugetlb) traps and fills in 2 MiB pages, and mig's post-copy moves 4 KiB ones";
  return {};
}

std::vector<engine::StateSection> KvmVm::save_state() { return encode_state(machine_->save_state()); }

void KvmVm::restore_state(const std::vector<engine::StateSection>& sections) {
  machine_->restore_state(decode_state(sections));
}

}  // namespace mig::vmm
