#include "kvm/virtio_blk.h"

#include <liburing.h>
#include <linux/kvm.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>

#include "common/thread_name.h"
#include "kvm/vm.h"

namespace mig::kvm {

namespace {

// Legacy virtio-pci registers, from the start of BAR0; the device's own configuration
// (struct virtio_blk_config) follows at kDeviceConfig when MSI-X is off, as it is here.
enum : std::uint32_t {
  kHostFeatures = 0x00,
  kGuestFeatures = 0x04,
  kQueuePfn = 0x08,
  kQueueNum = 0x0c,
  kQueueSelect = 0x0e,
  kQueueNotify = 0x10,
  kDeviceStatus = 0x12,
  kIsr = 0x13,
  kDeviceConfig = 0x14,
};

constexpr std::uint8_t kStatusDriverOk = 4;
constexpr std::uint32_t kFeatureSegMax = 1u << 2, kFeatureBlkSize = 1u << 6, kFeatureFlush = 1u << 9,
                        kFeatureDiscard = 1u << 13, kFeatureWriteZeroes = 1u << 14;
constexpr std::uint32_t kHostFeatureSet = kFeatureSegMax | kFeatureBlkSize | kFeatureFlush | kFeatureDiscard | kFeatureWriteZeroes;

enum : std::uint32_t { kTypeIn = 0, kTypeOut = 1, kTypeFlush = 4, kTypeGetId = 8, kTypeDiscard = 11, kTypeWriteZeroes = 13 };
enum : std::uint8_t { kOk = 0, kIoError = 1, kUnsupported = 2 };

constexpr std::uint16_t kDescNext = 1, kDescWrite = 2;
constexpr std::uint16_t kAvailNoInterrupt = 1;
constexpr std::uint64_t kRingAlign = 4096;
constexpr std::uint64_t kSector = 512;
constexpr std::uint32_t kMaxSegments = VirtioBlk::kQueueSize - 2;
constexpr std::uint32_t kMaxDiscardSectors = 1u << 22;  // 2 GiB per range

struct Descriptor {
  std::uint64_t addr;
  std::uint32_t len;
  std::uint16_t flags, next;
};
struct RequestHeader {
  std::uint32_t type, reserved;
  std::uint64_t sector;
};
struct ZeroRange {
  std::uint64_t sector;
  std::uint32_t sectors, flags;
};

// The split ring's layout for queue size N, legacy alignment.
constexpr std::uint64_t kAvailOffset = 16ull * VirtioBlk::kQueueSize;
constexpr std::uint64_t kUsedOffset = (kAvailOffset + 6 + 2ull * VirtioBlk::kQueueSize + kRingAlign - 1) / kRingAlign * kRingAlign;
constexpr std::uint64_t kRingBytes = kUsedOffset + 6 + 8ull * VirtioBlk::kQueueSize;

constexpr std::uint64_t kKickTag = 1, kWakeTag = 2;  // io_uring user_data of the two eventfd reads

}  // namespace

struct VirtioBlk::Request {
  std::uint16_t head = 0;
  std::uint32_t type = 0;
  std::uint64_t sector = 0;
  struct Segment {
    std::uint64_t guest_addr;
    std::byte* host;
    std::uint32_t length;
  };
  std::vector<Segment> data;
  std::uint64_t data_bytes = 0;
  std::uint64_t status_addr = 0;
  std::byte* status = nullptr;
  std::vector<iovec> iov;  // for io_uring; lives as long as the request
  std::uint32_t used_len = 0;  // bytes the device wrote into the driver's buffers
};

struct VirtioBlk::Uring {
  io_uring ring{};
  std::uint64_t kick_value = 0, wake_value = 0;
  explicit Uring(unsigned entries) {
    if (const int err = ::io_uring_queue_init(entries, &ring, 0); err < 0) throw_errno("io_uring_queue_init", -err);
  }
  ~Uring() { ::io_uring_queue_exit(&ring); }
  io_uring_sqe* sqe() {
    io_uring_sqe* entry = ::io_uring_get_sqe(&ring);
    if (!entry) {
      ::io_uring_submit(&ring);
      entry = ::io_uring_get_sqe(&ring);
    }
    if (!entry) throw std::runtime_error("io_uring submission queue full");
    return entry;
  }
  void read_eventfd(int fd, std::uint64_t* value, std::uint64_t tag) {
    io_uring_sqe* entry = sqe();
    ::io_uring_prep_read(entry, fd, value, sizeof *value, 0);
    entry->user_data = tag;
  }
};

VirtioBlk::VirtioBlk(Vm& vm, GuestMemory& memory, std::unique_ptr<DiskImage> image, std::uint16_t bar0, std::uint8_t irq)
    : vm_(vm), memory_(memory), image_(std::move(image)), bar0_(bar0), irq_(irq),
      pci_({0x1af4, 0x1001, 0x1af4, 2, 0x010000, irq}, bar0, kBarSize),
      kick_(check_syscall("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC); })),
      wake_(check_syscall("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC); })),
      written_((image_->size() + kWriteChunk * 64 - 1) / (kWriteChunk * 64)),
      uring_(std::make_unique<Uring>(2 * kQueueSize)) {
  state_.capacity_sectors = image_->size() / kSector;
  kvm_ioeventfd notify{};
  notify.addr = bar0_ + kQueueNotify;
  notify.len = 2;
  notify.fd = kick_.get();
  notify.flags = KVM_IOEVENTFD_FLAG_PIO;
  ioeventfd_ = ::ioctl(vm_.fd(), KVM_IOEVENTFD, &notify) == 0;
  thread_ = std::jthread([this] {
    name_this_thread("virtio-blk");
    try {
      serve();
    } catch (const std::exception&) {
      // io_uring itself failed: the queue stops, as a device needing reset, and the VMM
      // goes on. A pause still finds nothing in flight.
      std::lock_guard lock(mutex_);
      state_.broken = 1;
      in_flight_ = 0;
      drained_.notify_all();
    }
  });
}

VirtioBlk::~VirtioBlk() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof one);
  thread_ = {};  // joined: nothing is in flight past here
  if (ioeventfd_) {
    kvm_ioeventfd notify{};
    notify.addr = bar0_ + kQueueNotify;
    notify.len = 2;
    notify.fd = kick_.get();
    notify.flags = KVM_IOEVENTFD_FLAG_PIO | KVM_IOEVENTFD_FLAG_DEASSIGN;
    ::ioctl(vm_.fd(), KVM_IOEVENTFD, &notify);
  }
}

std::uint32_t VirtioBlk::config_read(std::uint32_t offset, unsigned size) {
  std::lock_guard lock(mutex_);
  return pci_.read(offset, size);
}

void VirtioBlk::config_write(std::uint32_t offset, unsigned size, std::uint32_t value) {
  std::lock_guard lock(mutex_);
  pci_.write(offset, size, value);
}

void VirtioBlk::io(std::uint16_t port, bool is_write, std::uint8_t* data, std::uint32_t size) {
  const std::uint32_t reg = port - bar0_;
  if (is_write) {
    std::uint32_t value = 0;
    std::memcpy(&value, data, std::min<std::uint32_t>(size, 4));
    register_write(reg, size, value);
  } else {
    const std::uint32_t value = register_read(reg, size);
    std::memcpy(data, &value, std::min<std::uint32_t>(size, 4));
  }
}

std::uint32_t VirtioBlk::register_read(std::uint32_t reg, unsigned size) {
  std::lock_guard lock(mutex_);
  switch (reg) {
    case kHostFeatures: return kHostFeatureSet;
    case kGuestFeatures: return state_.guest_features;
    case kQueuePfn: return state_.queue_select == 0 ? state_.queue_pfn : 0;
    case kQueueNum: return state_.queue_select == 0 ? kQueueSize : 0;
    case kQueueSelect: return state_.queue_select;
    case kDeviceStatus: return state_.status;
    case kIsr: {
      // Reading the ISR acknowledges the interrupt, as on any legacy virtio-pci device.
      const std::uint8_t isr = state_.isr;
      state_.isr = 0;
      set_irq(false);
      return isr;
    }
    default: break;
  }
  if (reg < kDeviceConfig) return 0;
  // struct virtio_blk_config, little-endian; only the fields of offered features are filled.
  std::uint8_t config[60] = {};
  auto put = [&](std::size_t at, auto value) { std::memcpy(config + at, &value, sizeof value); };
  put(0, state_.capacity_sectors);
  put(12, kMaxSegments);                 // seg_max
  put(20, static_cast<std::uint32_t>(kSector));  // blk_size
  put(36, kMaxDiscardSectors);           // max_discard_sectors
  put(40, std::uint32_t{1});             // max_discard_seg
  put(44, std::uint32_t{8});             // discard_sector_alignment: 4 KiB
  put(48, kMaxDiscardSectors);           // max_write_zeroes_sectors
  put(52, std::uint32_t{1});             // max_write_zeroes_seg
  put(56, std::uint8_t{1});              // write_zeroes_may_unmap
  const std::uint32_t at = reg - kDeviceConfig;
  std::uint32_t value = 0;
  if (at + size <= sizeof config) std::memcpy(&value, config + at, size);
  return value;
}

void VirtioBlk::register_write(std::uint32_t reg, unsigned size, std::uint32_t value) {
  if (reg == kQueueNotify) return kick();  // no lock: the I/O thread takes it from here
  if (reg == kDeviceStatus && size == 1 && value == 0) return reset();
  std::lock_guard lock(mutex_);
  switch (reg) {
    case kGuestFeatures: state_.guest_features = value & kHostFeatureSet; break;
    case kQueueSelect: state_.queue_select = static_cast<std::uint16_t>(value); break;
    case kQueuePfn:
      if (state_.queue_select != 0) break;
      state_.queue_pfn = value;
      ring_base_ = std::uint64_t{value} * kRingAlign;
      if (value != 0 && !memory_.translate(ring_base_, kRingBytes)) state_.broken = 1;  // a ring outside RAM
      break;
    case kDeviceStatus:
      state_.status = static_cast<std::uint8_t>(value);
      break;
    default: break;
  }
  if (reg == kDeviceStatus && (value & kStatusDriverOk)) kick();  // a restarted driver may have queued already
}

// A reset waits for requests in flight: afterwards nothing the device does may reach memory
// the driver has taken back.
void VirtioBlk::reset() {
  std::unique_lock lock(mutex_);
  resetting_ = true;
  drained_.wait(lock, [&] { return in_flight_ == 0; });
  const std::uint64_t capacity = state_.capacity_sectors;
  state_ = {};
  state_.capacity_sectors = capacity;
  ring_base_ = 0;
  set_irq(false);
  resetting_ = false;
}

void VirtioBlk::kick() {
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(kick_.get(), &one, sizeof one);
}

void VirtioBlk::quiesce() {
  std::unique_lock lock(mutex_);
  paused_ = true;
  drained_at_pause_ += in_flight_;
  drained_.wait(lock, [&] { return in_flight_ == 0; });
}

void VirtioBlk::resume() {
  {
    std::lock_guard lock(mutex_);
    paused_ = false;
  }
  kick();
}

VirtioBlkState VirtioBlk::save() const {
  std::lock_guard lock(mutex_);
  VirtioBlkState state = state_;
  state.pci_command = pci_.command();
  return state;
}

void VirtioBlk::restore(const VirtioBlkState& state) {
  if (state.capacity_sectors != image_->size() / kSector)
    throw std::runtime_error("virtio-blk: the source's disk has " + std::to_string(state.capacity_sectors) +
                             " sectors, the image here " + std::to_string(image_->size() / kSector));
  std::lock_guard lock(mutex_);
  state_ = state;
  state_.guest_features &= kHostFeatureSet;
  pci_.set_command(state.pci_command);
  ring_base_ = std::uint64_t{state_.queue_pfn} * kRingAlign;
  if (state_.queue_pfn != 0 && !memory_.translate(ring_base_, kRingBytes)) state_.broken = 1;
}

void VirtioBlk::fetch_written(std::span<std::uint64_t> bitmap) {
  for (std::size_t i = 0; i < std::min(bitmap.size(), written_.size()); ++i)
    bitmap[i] |= written_[i].exchange(0, std::memory_order_acq_rel);
}

void VirtioBlk::note_written(std::uint64_t offset, std::uint64_t length) {
  if (!tracking_writes_.load(std::memory_order_acquire) || length == 0) return;
  for (std::uint64_t chunk = offset / kWriteChunk; chunk <= (offset + length - 1) / kWriteChunk; ++chunk)
    written_[chunk / 64].fetch_or(1ull << (chunk % 64), std::memory_order_acq_rel);
}

void VirtioBlk::set_irq(bool level) {
  kvm_irq_level line{};
  line.irq = irq_;
  line.level = level ? 1 : 0;
  ::ioctl(vm_.fd(), KVM_IRQ_LINE, &line);
}

std::byte* VirtioBlk::ring(std::uint64_t offset, std::uint64_t length) const {
  return memory_.translate(ring_base_ + offset, length);
}

// The I/O thread: waits on the queue notify, the wake-up and io_uring completions alike.
void VirtioBlk::serve() {
  Uring& u = *uring_;
  u.read_eventfd(kick_.get(), &u.kick_value, kKickTag);
  u.read_eventfd(wake_.get(), &u.wake_value, kWakeTag);
  for (;;) {
    ::io_uring_submit(&u.ring);
    io_uring_cqe* cqe = nullptr;
    const int err = ::io_uring_wait_cqe(&u.ring, &cqe);
    if (err == -EINTR) continue;
    if (err < 0) throw_errno("io_uring_wait_cqe", -err);
    bool look = false;
    unsigned head = 0, seen = 0;
    io_uring_for_each_cqe(&u.ring, head, cqe) {
      ++seen;
      if (cqe->user_data == kKickTag || cqe->user_data == kWakeTag) {
        look = true;
        if (cqe->user_data == kKickTag) u.read_eventfd(kick_.get(), &u.kick_value, kKickTag);
        else u.read_eventfd(wake_.get(), &u.wake_value, kWakeTag);
        continue;
      }
      std::unique_ptr<Request> request(reinterpret_cast<Request*>(cqe->user_data));
      const bool whole = cqe->res >= 0 && (request->type == kTypeFlush || static_cast<std::uint64_t>(cqe->res) == request->data_bytes);
      finish(*request, whole ? kOk : kIoError);
    }
    ::io_uring_cq_advance(&u.ring, seen);
    {
      std::lock_guard lock(mutex_);
      if (stopping_ && in_flight_ == 0) return;
    }
    if (look) take_requests();
  }
}

// Takes every request the driver has made available, unless the machine is paused or the
// device is being reset.
void VirtioBlk::take_requests() {
  for (;;) {
    std::uint16_t head = 0;
    {
      std::lock_guard lock(mutex_);
      if (paused_ || resetting_ || stopping_ || state_.broken || ring_base_ == 0 || !(state_.status & kStatusDriverOk)) return;
      auto* avail_idx = reinterpret_cast<std::uint16_t*>(ring(kAvailOffset + 2, 2));
      if (__atomic_load_n(avail_idx, __ATOMIC_ACQUIRE) == state_.last_avail_idx) return;
      std::uint16_t entry = 0;
      std::memcpy(&entry, ring(kAvailOffset + 4 + 2ull * (state_.last_avail_idx % kQueueSize), 2), 2);
      head = entry;
      ++state_.last_avail_idx;
      ++in_flight_;
    }
    auto request = parse_chain(head);
    if (!request) {
      std::lock_guard lock(mutex_);
      state_.broken = 1;  // the driver broke the ring's rules: stop, as a device needing reset
      --in_flight_;
      drained_.notify_all();
      return;
    }
    execute(std::move(request));
  }
}

// Header first (driver-readable), data, and the status byte last (device-writable). Every
// address goes through GuestMemory::translate; a chain that loops or leaves RAM is refused.
std::unique_ptr<VirtioBlk::Request> VirtioBlk::parse_chain(std::uint16_t head) {
  if (head >= kQueueSize) return nullptr;
  std::vector<Descriptor> chain;
  for (std::uint16_t index = head;;) {
    if (chain.size() > kQueueSize) return nullptr;  // a loop
    Descriptor d{};
    std::memcpy(&d, ring(16ull * index, sizeof d), sizeof d);
    chain.push_back(d);
    if (!(d.flags & kDescNext)) break;
    if (d.next >= kQueueSize) return nullptr;
    index = d.next;
  }
  if (chain.size() < 2 || chain.front().len < sizeof(RequestHeader) || (chain.front().flags & kDescWrite) ||
      !(chain.back().flags & kDescWrite) || chain.back().len < 1)
    return nullptr;
  auto request = std::make_unique<Request>();
  request->head = head;
  const auto* header_bytes = memory_.translate(chain.front().addr, sizeof(RequestHeader));
  request->status_addr = chain.back().addr + chain.back().len - 1;
  request->status = memory_.translate(request->status_addr, 1);
  if (!header_bytes || !request->status) return nullptr;
  RequestHeader header{};
  std::memcpy(&header, header_bytes, sizeof header);
  request->type = header.type;
  request->sector = header.sector;
  const bool device_writes = header.type == kTypeIn || header.type == kTypeGetId;
  for (std::size_t i = 1; i + 1 < chain.size(); ++i) {
    const Descriptor& d = chain[i];
    if (static_cast<bool>(d.flags & kDescWrite) != device_writes || d.len == 0) return nullptr;
    std::byte* host = memory_.translate(d.addr, d.len);
    if (!host) return nullptr;
    request->data.push_back({d.addr, host, d.len});
    request->data_bytes += d.len;
  }
  return request;
}

void VirtioBlk::execute(std::unique_ptr<Request> request) {
  Request& r = *request;
  const std::uint64_t offset = r.sector * kSector;
  const bool in_range = r.sector <= state_.capacity_sectors && r.data_bytes <= image_->size() - offset;
  try {
    switch (r.type) {
      case kTypeIn:
      case kTypeOut:
        if (!in_range || r.data_bytes % kSector != 0) return finish(r, kIoError);
        return submit_io(std::move(request));
      case kTypeFlush:
        return submit_io(std::move(request));
      case kTypeGetId: {
        char id[20] = {};
        std::snprintf(id, sizeof id, "mig-%s", image_->config().path.substr(image_->config().path.rfind('/') + 1).c_str());
        std::uint64_t done = 0;
        for (auto& seg : r.data) {
          const std::uint64_t n = std::min<std::uint64_t>(seg.length, sizeof id - std::min<std::uint64_t>(done, sizeof id));
          std::memcpy(seg.host, id + done, n);
          done += n;
        }
        r.used_len = static_cast<std::uint32_t>(done);
        return finish(r, kOk);
      }
      case kTypeDiscard:
      case kTypeWriteZeroes: {
        if (r.data.size() != 1 || r.data[0].length % sizeof(ZeroRange) != 0) return finish(r, kIoError);
        for (std::uint32_t at = 0; at < r.data[0].length; at += sizeof(ZeroRange)) {
          ZeroRange range{};
          std::memcpy(&range, r.data[0].host + at, sizeof range);
          const std::uint64_t begin = range.sector * kSector, length = std::uint64_t{range.sectors} * kSector;
          if (range.sector > state_.capacity_sectors || length > image_->size() - begin) return finish(r, kIoError);
          image_->write_zeroes(begin, length);
          note_written(begin, length);
        }
        return finish(r, kOk);
      }
      default:
        return finish(r, kUnsupported);
    }
  } catch (const std::exception&) {
    finish(r, kIoError);  // the image failed: the guest sees an I/O error, as on real hardware
  }
}

// Raw images with buffers direct I/O can take go through io_uring; anything else is done here,
// synchronously, on this thread (a qcow2 image's NBD connection, a misaligned buffer).
void VirtioBlk::submit_io(std::unique_ptr<Request> request) {
  Request& r = *request;
  const std::uint64_t offset = r.sector * kSector;
  const std::size_t align = image_->direct_io_alignment();
  bool aligned = image_->fd() >= 0;
  for (const auto& seg : r.data) {
    aligned = aligned && reinterpret_cast<std::uintptr_t>(seg.host) % align == 0 && seg.length % align == 0;
    r.iov.push_back({seg.host, seg.length});
  }
  if (!aligned) {
    if (r.type == kTypeFlush) {
      image_->flush();
    } else {
      std::uint64_t at = offset;
      for (const auto& seg : r.data) {
        if (r.type == kTypeIn) image_->read(at, {seg.host, seg.length});
        else image_->write(at, {seg.host, seg.length});
        at += seg.length;
      }
    }
    return finish(r, kOk);
  }
  io_uring_sqe* sqe = uring_->sqe();
  if (r.type == kTypeFlush)
    ::io_uring_prep_fsync(sqe, image_->fd(), IORING_FSYNC_DATASYNC);
  else if (r.type == kTypeIn)
    ::io_uring_prep_readv(sqe, image_->fd(), r.iov.data(), static_cast<unsigned>(r.iov.size()), offset);
  else
    ::io_uring_prep_writev(sqe, image_->fd(), r.iov.data(), static_cast<unsigned>(r.iov.size()), offset);
  ::io_uring_sqe_set_data(sqe, request.release());  // back in serve() with its completion
}

// The request's status, its used-ring entry, and the page log for everything written into
// guest memory: KVM's dirty log sees only what vCPUs write.
void VirtioBlk::finish(Request& r, std::uint8_t status) {
  if (status == kOk && r.type == kTypeIn) r.used_len = static_cast<std::uint32_t>(r.data_bytes);
  if (status == kOk && r.type == kTypeOut) note_written(r.sector * kSector, r.data_bytes);
  if (r.type == kTypeIn || r.type == kTypeGetId)
    for (const auto& seg : r.data) memory_.note_vmm_write(seg.guest_addr, seg.length);
  *reinterpret_cast<volatile std::uint8_t*>(r.status) = status;
  memory_.note_vmm_write(r.status_addr, 1);
  {
    std::lock_guard lock(mutex_);
    const std::uint32_t element[2] = {r.head, r.used_len + 1};  // the status byte counts
    const std::uint64_t at = kUsedOffset + 4 + 8ull * (state_.used_idx % kQueueSize);
    std::memcpy(ring(at, 8), element, 8);
    ++state_.used_idx;
    __atomic_store_n(reinterpret_cast<std::uint16_t*>(ring(kUsedOffset + 2, 2)), state_.used_idx, __ATOMIC_RELEASE);
    memory_.note_vmm_write(ring_base_ + kUsedOffset, kRingBytes - kUsedOffset);
    std::uint16_t avail_flags = 0;
    std::memcpy(&avail_flags, ring(kAvailOffset, 2), 2);
    if (!(avail_flags & kAvailNoInterrupt)) {
      state_.isr |= 1;
      set_irq(true);
    }
    --in_flight_;
    drained_.notify_all();
  }
  completed_.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace mig::kvm
