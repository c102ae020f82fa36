// A virtio-blk device on the legacy (virtio 0.9.5 / transitional 1.x "legacy interface")
// virtio-pci transport: PCI 1af4:1001 with its registers in an I/O-port BAR, one split
// virtqueue. The same device id and layout as QEMU's virtio-blk-pci on the `pc` machine, so
// one guest driver, running at CPL3 through the TSS I/O bitmap, drives both.
//
// Requests: read, write, flush, get-id, discard and write-zeroes (both punch holes).
//
// The vCPU only touches registers: its queue notify goes to an eventfd (KVM_IOEVENTFD, so the
// write does not even leave the kernel) that an I/O thread waits on. That thread walks the
// ring, does the I/O with io_uring (raw images; a qcow2 image's NBD connection is driven
// synchronously from the same thread), and completes requests in the used ring. Completion
// raises INTx through the in-kernel IOAPIC unless the driver suppressed it
// (VRING_AVAIL_F_NO_INTERRUPT); mig's guest does, and polls the used ring from CPL3, because
// its interrupt handlers run at CPL0, which the project's hosts emulate at ~1 M instr/s.
//
// Migration: pause() drains - no new request is taken and those in flight complete - so the
// saved state never holds one in flight; requests the guest queued but the device had not
// taken stay in the ring (guest memory) and are taken at the destination, where the saved
// last_avail_idx says where to start. Pages the device writes are logged in GuestMemory's
// VMM-write log, and written disk ranges in a chunk bitmap for storage migration.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../common/fd.h"
#include "../kvm/disk_image.h"
#include "../kvm/memory.h"
#include "../kvm/pci.h"

namespace mig::kvm {

class Vm;

struct VirtioBlkState {
  std::uint64_t capacity_sectors = 0;  // checked against the destination's image
  std::uint32_t guest_features = 0;
  std::uint32_t queue_pfn = 0;
  std::uint16_t queue_select = 0;
  std::uint16_t last_avail_idx = 0;  // next ring entry the device takes
  std::uint16_t used_idx = 0;        // the device's copy of used->idx
  std::uint16_t pci_command = 0;
  std::uint8_t status = 0;
  std::uint8_t isr = 0;
  std::uint8_t broken = 0;  // the driver broke the protocol: the queue is not served
  std::uint8_t reserved[5] = {};
  friend bool operator==(const VirtioBlkState&, const VirtioBlkState&) = default;
};

class VirtioBlk final : public PciFunction {
 public:
  static constexpr std::uint16_t kQueueSize = 256;
  static constexpr std::uint16_t kBarSize = 128;
  // `bar0` is the I/O port base of the device's registers; `irq` its INTx GSI.
  VirtioBlk(Vm& vm, GuestMemory& memory, std::unique_ptr<DiskImage> image, std::uint16_t bar0, std::uint8_t irq);
  ~VirtioBlk() override;
  VirtioBlk(const VirtioBlk&) = delete;
  VirtioBlk& operator=(const VirtioBlk&) = delete;

  std::uint32_t config_read(std::uint32_t offset, unsigned size) override;
  void config_write(std::uint32_t offset, unsigned size, std::uint32_t value) override;
  bool handles(std::uint16_t port) const { return port >= bar0_ && port < bar0_ + kBarSize; }
  void io(std::uint16_t port, bool is_write, std::uint8_t* data, std::uint32_t size);

  // Pause: stop taking requests and wait for those in flight. Resume: serve the queue again
  // (with a look at it, for entries queued meanwhile or carried over by a migration).
  void quiesce();
  void resume();
  // Both need a quiesced device.
  VirtioBlkState save() const;
  void restore(const VirtioBlkState& state);

  DiskImage& image() { return *image_; }
  // Storage migration: from start on, every completed write marks its chunks of
  // kWriteChunk bytes; fetch_written ORs into `bitmap` those marked since the last fetch.
  static constexpr std::uint64_t kWriteChunk = 64 * 1024;
  void track_writes(bool on) { tracking_writes_ = on; }
  void fetch_written(std::span<std::uint64_t> bitmap);

  // Requests completed, and of them those a pause had to wait for (in flight when it came).
  std::uint64_t completed() const { return completed_.load(); }
  std::uint64_t drained_at_pause() const { return drained_at_pause_.load(); }

 private:
  struct Request;
  void serve();
  void take_requests();
  std::unique_ptr<Request> parse_chain(std::uint16_t head);
  void execute(std::unique_ptr<Request> request);
  void submit_io(std::unique_ptr<Request> request);
  void finish(Request& request, std::uint8_t status);
  void note_written(std::uint64_t offset, std::uint64_t length);
  void set_irq(bool level);
  void kick();
  void reset();
  std::byte* ring(std::uint64_t offset, std::uint64_t length) const;
  std::uint32_t register_read(std::uint32_t reg, unsigned size);
  void register_write(std::uint32_t reg, unsigned size, std::uint32_t value);

  Vm& vm_;
  GuestMemory& memory_;
  std::unique_ptr<DiskImage> image_;
  const std::uint16_t bar0_;
  const std::uint8_t irq_;
  PciConfigHeader pci_;
  UniqueFd kick_;            // the queue notify: KVM_IOEVENTFD, or written by io() where that is missing
  bool ioeventfd_ = false;
  UniqueFd wake_;            // tells the I/O thread to look at its state again

  // Driver-visible state. Registers change only from vCPU threads; the ring indices only on
  // the I/O thread while serving.
  VirtioBlkState state_;
  std::uint64_t ring_base_ = 0;  // guest address of the descriptor table, 0 when none

  mutable std::mutex mutex_;
  std::condition_variable drained_;
  bool paused_ = true;     // the machine is paused: no request is taken
  bool resetting_ = false; // the driver reset the device: no request is taken
  bool stopping_ = false;
  unsigned in_flight_ = 0;

  std::atomic<bool> tracking_writes_{false};
  std::vector<std::atomic<std::uint64_t>> written_;  // a bit per kWriteChunk
  std::atomic<std::uint64_t> completed_{0}, drained_at_pause_{0};

  struct Uring;
  std::unique_ptr<Uring> uring_;
  std::jthread thread_;
};

}  // namespace mig::kvm
