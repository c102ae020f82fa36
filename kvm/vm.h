// A KVM VM: memory slots, dirty logging, the in-kernel irqchip and PIT, and VM-wide state.
#pragma once

#include <cstdint>
#include <span>

#include "../common/fd.h"
#include "../kvm/memory.h"
#include "../kvm/state.h"
#include "../kvm/system.h"

namespace mig::kvm {

class Vm {
 public:
  // Creates the VM with an in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT2. Dirty pages
  // are reported in the bitmap, or with `dirty_ring_entries` (a power of two from 1024 to what
  // the host allows) in a ring of that many per vCPU (KVM_CAP_DIRTY_LOG_RING), which vCPUs
  // map as they are created. For the bitmap, manual dirty log protection is enabled when the
  // host offers it, so fetching and clearing are separate.
  static Vm create(const KvmSystem& sys, std::uint32_t dirty_ring_entries = 0);

  int fd() const { return fd_.get(); }
  std::uint32_t dirty_ring_entries() const { return dirty_ring_entries_; }

  // Registers every region of `memory` as one slot, slot i for region i. `memory` must
  // outlive the VM's use of it.
  void map_memory(const GuestMemory& memory);
  std::size_t slot_count() const { return slots_.size(); }
  std::uint64_t slot_pages(std::size_t slot) const { return slots_.at(slot).memory_size / kPageSize; }

  // Turns KVM_MEM_LOG_DIRTY_PAGES on or off for every slot. Turning it on starts with a
  // clean log: only writes from now on are reported.
  void set_dirty_logging(bool on);
  bool dirty_logging() const { return dirty_logging_; }

  // Reads the dirty bitmap of `slot` (bit i = page i of the slot, 64-bit words) and
  // re-arms write protection for exactly those pages, so a write after this call shows up in
  // the next one. `bitmap` holds at least ceil(slot_pages / 64) words. Not with dirty rings.
  void fetch_and_clear_dirty_log(std::size_t slot, std::span<std::uint64_t> bitmap);
  // The same in two steps, where KVM allows (manual protection): the fetch leaves the pages
  // it reports writable and set in KVM's bitmap, so that every later fetch reports them too,
  // until rearm_dirty_pages() write-protects and clears those of `pages` (bit i for page
  // `first_page` + i, `first_page` a multiple of 64). Without manual protection the fetch
  // re-arms at once and rearm_dirty_pages() has nothing to do.
  void fetch_dirty_log_unarmed(std::size_t slot, std::span<std::uint64_t> bitmap);
  bool rearms_when_asked() const { return manual_protect_; }
  void rearm_dirty_pages(std::size_t slot, std::uint64_t first_page, std::span<const std::uint64_t> pages);
  // With dirty rings: recycles every entry harvested from every vCPU's ring, and
  // write-protects those pages again (KVM_RESET_DIRTY_RINGS).
  void reset_dirty_rings();

  // Ordering: PIC and IOAPIC before the PIT (the PIT raises IRQ0 through them), kvmclock last
  // so that the guest's clock starts counting from the saved value as late as possible.
  VmState save_state() const;
  void restore_state(const VmState& state);

 private:
  UniqueFd fd_;
  bool manual_protect_ = false;
  std::uint32_t dirty_ring_entries_ = 0;
  bool dirty_logging_ = false;
  std::vector<kvm_userspace_memory_region> slots_;
};

}  // namespace mig::kvm
