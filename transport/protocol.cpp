#include "transport/protocol.h"

#include <concepts>
#include <type_traits>

namespace mig::wire {

const char* to_string(MessageType type) {
  switch (type) {
    case MessageType::invalid: return "invalid";
    case MessageType::hello: return "Hello";
    case MessageType::hello_ack: return "HelloAck";
    case MessageType::page_batch: return "PageBatch";
    case MessageType::state_section: return "StateSection";
    case MessageType::complete: return "Complete";
    case MessageType::ready: return "Ready";
    case MessageType::commit: return "Commit";
    case MessageType::running: return "Running";
    case MessageType::handover: return "Handover";
    case MessageType::error: return "Error";
    case MessageType::round_end: return "RoundEnd";
    case MessageType::round_ack: return "RoundAck";
    case MessageType::shared_memory: return "SharedMemory";
    case MessageType::page_plan: return "PagePlan";
    case MessageType::channel_hello: return "ChannelHello";
    case MessageType::postcopy_start: return "PostcopyStart";
    case MessageType::page_request: return "PageRequest";
    case MessageType::postcopy_done: return "PostcopyDone";
    case MessageType::postcopy_resume: return "PostcopyResume";
    case MessageType::postcopy_resume_ack: return "PostcopyResumeAck";
    case MessageType::disk_data: return "DiskData";
    case MessageType::disk_zero: return "DiskZero";
    case MessageType::commit_retry: return "CommitRetry";
  }
  return "unknown";
}

void validate(const FrameHeader& header) {
  if (header.magic != kMagic) throw ProtocolError("not a mig stream: bad frame magic");
  if (header.reserved != 0) throw ProtocolError("frame header has reserved bits set");
  std::uint64_t limit = kMaxControlPayload;
  switch (static_cast<MessageType>(header.type)) {
    case MessageType::page_batch:
      limit = sizeof(BatchHeader) + std::uint64_t{kMaxBatchPages} * (sizeof(PageDescriptor) + kPageSize);
      break;
    case MessageType::state_section: limit = kMaxStateSection + 1024; break;
    case MessageType::disk_data: limit = kMaxDiskData + 64; break;
    case MessageType::page_plan: case MessageType::postcopy_start: case MessageType::postcopy_resume_ack:
      limit = kMaxPlanBytes;
      break;
    case MessageType::hello: case MessageType::hello_ack: case MessageType::complete: case MessageType::ready:
    case MessageType::commit: case MessageType::running: case MessageType::handover: case MessageType::error:
    case MessageType::round_end: case MessageType::round_ack: case MessageType::shared_memory:
    case MessageType::channel_hello: case MessageType::page_request: case MessageType::postcopy_done:
    case MessageType::postcopy_resume: case MessageType::disk_zero: case MessageType::commit_retry:
      break;
    default: throw ProtocolError("unknown frame type " + std::to_string(header.type));
  }
  if (header.length > limit)
    throw ProtocolError(std::string(to_string(static_cast<MessageType>(header.type))) + " frame of " +
                        std::to_string(header.length) + " bytes exceeds the limit of " + std::to_string(limit));
}

void validate(const PageDescriptor& d) {
  switch (d.encoding) {
    case PageEncoding::raw:
      if (d.length != kPageSize) throw ProtocolError("raw page descriptor with length " + std::to_string(d.length));
      break;
    case PageEncoding::zero:
      if (d.length != 0) throw ProtocolError("zero page descriptor with length " + std::to_string(d.length));
      break;
    case PageEncoding::delta:
      if (d.length == 0 || d.length >= kPageSize) throw ProtocolError("delta page descriptor with length " + std::to_string(d.length));
      break;
    default: throw ProtocolError("unknown page encoding " + std::to_string(static_cast<int>(d.encoding)));
  }
  if (d.guest_addr % kPageSize) throw ProtocolError("page descriptor address is not page-aligned");
}

namespace {

// Every message's layout is written once, in a layout() below, and that one description both
// writes and reads it: a field cannot be written in one order and read in another. The Writer
// trusts the values it is given. The Reader bounds every length and count, names what it was
// reading when the bytes run out, and runs a layout's checks where they stand, so Hello's
// version is judged before anything after it is read.
class Writer {
 public:
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void field(const T& value, const char*) {
    bytes_.put(value);
  }
  void field(const std::string& text, std::size_t, const char*) { bytes_.put_string(text); }
  template <typename T>
  void field(const std::vector<T>& values, std::size_t, const char*) {
    bytes_.put_vector(values);
  }
  // A count, then each item as `item` lays it out.
  template <typename T, typename Item>
  void list(const std::vector<T>& items, std::uint32_t, const char*, Item&& item) {
    bytes_.put(static_cast<std::uint32_t>(items.size()));
    for (const auto& each : items) item(each);
  }
  template <typename Check>
  void check(Check&&) {}
  std::vector<std::byte> take() { return bytes_.take(); }

 private:
  ByteWriter bytes_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> payload) : bytes_(payload) {}
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void field(T& value, const char* what) {
    value = bytes_.get<T>(what);
  }
  void field(std::string& text, std::size_t max_bytes, const char* what) { text = bytes_.get_string(max_bytes, what); }
  template <typename T>
  void field(std::vector<T>& values, std::size_t max_values, const char* what) {
    values = bytes_.get_vector<T>(max_values, what);
  }
  template <typename T, typename Item>
  void list(std::vector<T>& items, std::uint32_t max_items, const char* what, Item&& item) {
    const auto count = bytes_.get<std::uint32_t>(what);
    if (count > max_items)
      throw ProtocolError(std::string(what) + " counts " + std::to_string(count) + ", more than the limit of " +
                          std::to_string(max_items));
    items.resize(count);
    for (auto& each : items) item(each);
  }
  template <typename Check>
  void check(Check&& refuse_if_malformed) {
    refuse_if_malformed();
  }
  void expect_end(const char* what) const { bytes_.expect_end(what); }

 private:
  ByteReader bytes_;
};

// A layout takes its message as `Message<T> auto&`: const when written, not when read.
template <typename M, typename T>
concept Message = std::same_as<std::remove_const_t<M>, T>;

[[noreturn]] void refuse(const std::string& why) { throw ProtocolError(why); }

void check_shape(const Hello& m) {
  if (m.page_size != kPageSize) refuse("peer uses page size " + std::to_string(m.page_size));
  if (m.vcpus == 0 || m.vcpus > kMaxVcpus) refuse("Hello asks for " + std::to_string(m.vcpus) + " vCPUs");
  if (m.regions.empty()) refuse("Hello has no memory regions");
  std::uint64_t total = 0;
  for (const auto& region : m.regions) {
    if (region.size == 0 || region.size % kPageSize || region.guest_addr % kPageSize || region.size > kMaxGuestBytes ||
        region.guest_addr > kMaxGuestBytes)
      refuse("Hello has a malformed memory region");
    total += region.size;
  }
  if (total > kMaxGuestBytes) refuse("Hello asks for " + std::to_string(total) + " bytes of guest memory");
  if (m.channels == 0 || m.channels > kMaxChannels) refuse("Hello asks for " + std::to_string(m.channels) + " channels");
  for (const auto& d : m.disks)
    if (d.size == 0 || d.size % 512 || d.size > kMaxDiskBytes || d.chunk_bytes < kMinDiskChunk ||
        d.chunk_bytes > kMaxDiskChunk || (d.chunk_bytes & (d.chunk_bytes - 1)) || (d.flags & ~kDiskCopy))
      refuse("Hello has a malformed disk");
  if (m.tsc_khz > kMaxTscKhz) refuse("Hello gives the guest a TSC of " + std::to_string(m.tsc_khz) + " kHz");
}

void layout(auto& io, Message<Hello> auto& m) {
  io.field(m.version, "Hello.version");
  // Another version may lay out what follows differently: say so, not that it is malformed.
  io.check([&] {
    if (m.version != kVersion)
      refuse("peer speaks mig protocol version " + std::to_string(m.version) + ", this build speaks " +
             std::to_string(kVersion));
  });
  io.field(m.capabilities, "Hello.capabilities");
  io.field(m.page_size, "Hello.page_size");
  io.field(m.vcpus, "Hello.vcpus");
  io.field(m.host_boot_id, kMaxNameBytes, "Hello.host_boot_id");
  io.field(m.regions, kMaxRegions, "Hello.regions");
  io.field(m.channels, "Hello.channels");
  io.field(m.session, "Hello.session");
  io.list(m.disks, kMaxDisks, "Hello.disks", [&](auto& disk) {
    io.field(disk.size, "Hello.disk.size");
    io.field(disk.chunk_bytes, "Hello.disk.chunk_bytes");
    io.field(disk.flags, "Hello.disk.flags");
    io.field(disk.path, kMaxPathBytes, "Hello.disk.path");
  });
  io.field(m.cpuid, kMaxCpuidLeaves, "Hello.cpuid");
  io.field(m.tsc_khz, "Hello.tsc_khz");
  io.check([&] { check_shape(m); });
}

void layout(auto& io, Message<HelloAck> auto& m) {
  io.field(m.capabilities, "HelloAck.capabilities");
  io.field(m.host_boot_id, kMaxNameBytes, "HelloAck.host_boot_id");
  io.field(m.channels, "HelloAck.channels");
}

void layout(auto& io, Message<ChannelHello> auto& m) {
  io.field(m.session, "ChannelHello.session");
  io.field(m.index, "ChannelHello.index");
}

void layout(auto& io, Message<SharedMemory> auto& m) {
  io.field(m.regions, "SharedMemory.regions");
  io.check([&] {
    if (m.regions == 0 || m.regions > kMaxRegions) refuse("SharedMemory announces " + std::to_string(m.regions) + " regions");
  });
}

// PagePlan, PostcopyStart and PostcopyResumeAck: one page bitmap per region.
void layout_bitmaps(auto& io, auto& m, const char* name) {
  io.list(m.bitmaps, kMaxRegions, name, [&](auto& bitmap) { io.field(bitmap, kMaxPlanBytes / 8, name); });
  io.check([&] {
    if (m.bitmaps.empty()) refuse(std::string(name) + " has no regions");
  });
}
void layout(auto& io, Message<PagePlan> auto& m) { layout_bitmaps(io, m, "PagePlan"); }
void layout(auto& io, Message<PostcopyStart> auto& m) { layout_bitmaps(io, m, "PostcopyStart"); }
void layout(auto& io, Message<PostcopyResumeAck> auto& m) { layout_bitmaps(io, m, "PostcopyResumeAck"); }

void layout(auto& io, Message<DiskData> auto& m) {
  io.field(m.disk, "DiskData.disk");
  io.field(m.offset, "DiskData.offset");
  io.field(m.data, kMaxDiskData, "DiskData.data");
  io.check([&] {
    if (m.data.empty()) refuse("DiskData with no data");
  });
}

void layout(auto& io, Message<DiskZero> auto& m) {
  io.field(m.disk, "DiskZero.disk");
  io.field(m.offset, "DiskZero.offset");
  io.field(m.length, "DiskZero.length");
  io.check([&] {
    if (m.length == 0) refuse("DiskZero of no bytes");
  });
}

void layout(auto& io, Message<RoundEnd> auto& m) { io.field(m.round, "RoundEnd.round"); }
void layout(auto& io, Message<RoundAck> auto& m) { io.field(m.round, "RoundAck.round"); }

void layout(auto& io, Message<StateSection> auto& m) {
  io.field(m.name, kMaxNameBytes, "StateSection.name");
  io.field(m.version, "StateSection.version");
  io.field(m.data, kMaxStateSection, "StateSection.data");
}

void layout(auto& io, Message<Complete> auto& m) {
  io.field(m.page_digest, "Complete.page_digest");
  io.field(m.pages_sent, "Complete.pages_sent");
  io.field(m.disk_digest, "Complete.disk_digest");
}

void layout(auto& io, Message<Ready> auto& m) { io.field(m.restore_ns, "Ready.restore_ns"); }

void layout(auto&, Message<Commit> auto&) {}

void layout(auto& io, Message<Running> auto& m) {
  io.field(m.resumed_at_ns, "Running.resumed_at_ns");
  io.field(m.resume_ns, "Running.resume_ns");
}

void layout(auto& io, Message<Handover> auto& m) {
  io.field(m.gap_ns, "Handover.gap_ns");
  io.field(m.sequence_continued, "Handover.sequence_continued");
  io.field(m.last_source_seq, "Handover.last_source_seq");
  io.field(m.first_destination_seq, "Handover.first_destination_seq");
}

void layout(auto& io, Message<CommitRetry> auto& m) { io.field(m.session, "CommitRetry.session"); }

void layout(auto& io, Message<Error> auto& m) { io.field(m.message, kMaxMessageBytes, "Error.message"); }

void layout(auto& io, Message<PageRequest> auto& m) { io.field(m.guest_addr, "PageRequest.guest_addr"); }
void layout(auto& io, Message<PostcopyDone> auto& m) { io.field(m.pages_installed, "PostcopyDone.pages_installed"); }
void layout(auto& io, Message<PostcopyResume> auto& m) { io.field(m.session, "PostcopyResume.session"); }

}  // namespace

template <typename T>
std::vector<std::byte> encode(const T& message) {
  Writer writer;
  layout(writer, message);
  return writer.take();
}

template <typename T>
T decode(std::span<const std::byte> payload) {
  Reader reader(payload);
  T message;
  layout(reader, message);
  reader.expect_end(to_string(type_of<T>()));
  return message;
}

// The codec of each message, compiled here once.
#define MIG_WIRE_CODEC(T)                                      \
  template std::vector<std::byte> encode<T>(const T& message); \
  template T decode<T>(std::span<const std::byte> payload);
MIG_WIRE_CODEC(Hello)
MIG_WIRE_CODEC(HelloAck)
MIG_WIRE_CODEC(ChannelHello)
MIG_WIRE_CODEC(SharedMemory)
MIG_WIRE_CODEC(PagePlan)
MIG_WIRE_CODEC(PostcopyStart)
MIG_WIRE_CODEC(PostcopyResumeAck)
MIG_WIRE_CODEC(DiskData)
MIG_WIRE_CODEC(DiskZero)
MIG_WIRE_CODEC(RoundEnd)
MIG_WIRE_CODEC(RoundAck)
MIG_WIRE_CODEC(StateSection)
MIG_WIRE_CODEC(Complete)
MIG_WIRE_CODEC(Ready)
MIG_WIRE_CODEC(Commit)
MIG_WIRE_CODEC(Running)
MIG_WIRE_CODEC(Handover)
MIG_WIRE_CODEC(CommitRetry)
MIG_WIRE_CODEC(Error)
MIG_WIRE_CODEC(PageRequest)
MIG_WIRE_CODEC(PostcopyDone)
MIG_WIRE_CODEC(PostcopyResume)
#undef MIG_WIRE_CODEC

}  // namespace mig::wire
