#include "transport/protocol.h"

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
// The codec of every message that is a single fixed-size field.
template <typename Message, typename Field>
std::vector<std::byte> encode_field(const Message& m, Field Message::*field) {
  return encode_value(m.*field);
}
template <typename Message, typename Field>
Message decode_field(std::span<const std::byte> payload, Field Message::*field, const char* what) {
  Message m;
  m.*field = decode_value<Field>(payload, what);
  return m;
}
}  // namespace

std::vector<std::byte> encode(const Hello& m) {
  ByteWriter w;
  w.put(m.version);
  w.put(m.capabilities);
  w.put(m.page_size);
  w.put(m.vcpus);
  w.put_string(m.host_boot_id);
  w.put_vector(m.regions);
  w.put(m.channels);
  w.put(m.session);
  w.put(static_cast<std::uint32_t>(m.disks.size()));
  for (const auto& d : m.disks) {
    w.put(d.size);
    w.put(d.chunk_bytes);
    w.put(d.flags);
    w.put_string(d.path);
  }
  w.put_vector(m.cpuid);
  w.put(m.tsc_khz);
  return w.take();
}
template <>
Hello decode<Hello>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  Hello m;
  // The version comes first and is checked before anything else is interpreted.
  m.version = r.get<std::uint32_t>("Hello.version");
  if (m.version != kVersion)
    throw ProtocolError("peer speaks mig protocol version " + std::to_string(m.version) + ", this build speaks " +
                        std::to_string(kVersion));
  m.capabilities = r.get<std::uint32_t>("Hello.capabilities");
  m.page_size = r.get<std::uint32_t>("Hello.page_size");
  if (m.page_size != kPageSize) throw ProtocolError("peer uses page size " + std::to_string(m.page_size));
  m.vcpus = r.get<std::uint32_t>("Hello.vcpus");
  if (m.vcpus == 0 || m.vcpus > kMaxVcpus) throw ProtocolError("Hello asks for " + std::to_string(m.vcpus) + " vCPUs");
  m.host_boot_id = r.get_string(kMaxNameBytes, "Hello.host_boot_id");
  m.regions = r.get_vector<Region>(kMaxRegions, "Hello.regions");
  if (m.regions.empty()) throw ProtocolError("Hello has no memory regions");
  std::uint64_t total = 0;
  for (const auto& region : m.regions) {
    if (region.size == 0 || region.size % kPageSize || region.guest_addr % kPageSize || region.size > kMaxGuestBytes ||
        region.guest_addr > kMaxGuestBytes)
      throw ProtocolError("Hello has a malformed memory region");
    total += region.size;
  }
  if (total > kMaxGuestBytes) throw ProtocolError("Hello asks for " + std::to_string(total) + " bytes of guest memory");
  m.channels = r.get<std::uint32_t>("Hello.channels");
  if (m.channels == 0 || m.channels > kMaxChannels) throw ProtocolError("Hello asks for " + std::to_string(m.channels) + " channels");
  m.session = r.get<std::uint64_t>("Hello.session");
  const auto disks = r.get<std::uint32_t>("Hello.disks");
  if (disks > kMaxDisks) throw ProtocolError("Hello has " + std::to_string(disks) + " disks");
  for (std::uint32_t i = 0; i < disks; ++i) {
    Disk d;
    d.size = r.get<std::uint64_t>("Hello.disk.size");
    d.chunk_bytes = r.get<std::uint32_t>("Hello.disk.chunk_bytes");
    d.flags = r.get<std::uint32_t>("Hello.disk.flags");
    d.path = r.get_string(kMaxPathBytes, "Hello.disk.path");
    if (d.size == 0 || d.size % 512 || d.size > kMaxDiskBytes || d.chunk_bytes < kMinDiskChunk ||
        d.chunk_bytes > kMaxDiskChunk || (d.chunk_bytes & (d.chunk_bytes - 1)) || (d.flags & ~kDiskCopy))
      throw ProtocolError("Hello has a malformed disk");
    m.disks.push_back(std::move(d));
  }
  m.cpuid = r.get_vector<CpuidLeaf>(kMaxCpuidLeaves, "Hello.cpuid");
  m.tsc_khz = r.get<std::uint32_t>("Hello.tsc_khz");
  if (m.tsc_khz > kMaxTscKhz) throw ProtocolError("Hello gives the guest a TSC of " + std::to_string(m.tsc_khz) + " kHz");
  r.expect_end("Hello");
  return m;
}

std::vector<std::byte> encode(const HelloAck& m) {
  ByteWriter w;
  w.put(m.capabilities);
  w.put_string(m.host_boot_id);
  w.put(m.channels);
  return w.take();
}
template <>
HelloAck decode<HelloAck>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  HelloAck m;
  m.capabilities = r.get<std::uint32_t>("HelloAck.capabilities");
  m.host_boot_id = r.get_string(kMaxNameBytes, "HelloAck.host_boot_id");
  m.channels = r.get<std::uint32_t>("HelloAck.channels");
  r.expect_end("HelloAck");
  return m;
}

std::vector<std::byte> encode(const StateSection& m) {
  ByteWriter w;
  w.put_string(m.name);
  w.put(m.version);
  w.put_bytes(m.data);
  return w.take();
}
template <>
StateSection decode<StateSection>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  StateSection m;
  m.name = r.get_string(kMaxNameBytes, "StateSection.name");
  m.version = r.get<std::uint32_t>("StateSection.version");
  auto data = r.get_bytes(kMaxStateSection, "StateSection.data");
  m.data.assign(data.begin(), data.end());
  r.expect_end("StateSection");
  return m;
}

std::vector<std::byte> encode(const Complete& m) {
  ByteWriter w;
  w.put(m.page_digest);
  w.put(m.pages_sent);
  w.put(m.disk_digest);
  return w.take();
}
template <>
Complete decode<Complete>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  Complete m;
  m.page_digest = r.get<std::uint64_t>("Complete.page_digest");
  m.pages_sent = r.get<std::uint64_t>("Complete.pages_sent");
  m.disk_digest = r.get<std::uint64_t>("Complete.disk_digest");
  r.expect_end("Complete");
  return m;
}

std::vector<std::byte> encode(const Ready& m) { return encode_field(m, &Ready::restore_ns); }
template <>
Ready decode<Ready>(std::span<const std::byte> payload) {
  return decode_field(payload, &Ready::restore_ns, "Ready");
}

std::vector<std::byte> encode(const Commit&) { return {}; }
template <>
Commit decode<Commit>(std::span<const std::byte> payload) {
  ByteReader(payload).expect_end("Commit");
  return {};
}

std::vector<std::byte> encode(const Running& m) {
  ByteWriter w;
  w.put(m.resumed_at_ns);
  w.put(m.resume_ns);
  return w.take();
}
template <>
Running decode<Running>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  Running m;
  m.resumed_at_ns = r.get<std::int64_t>("Running.resumed_at_ns");
  m.resume_ns = r.get<std::uint64_t>("Running.resume_ns");
  r.expect_end("Running");
  return m;
}

std::vector<std::byte> encode(const Handover& m) {
  ByteWriter w;
  w.put(m.gap_ns);
  w.put(m.sequence_continued);
  w.put(m.last_source_seq);
  w.put(m.first_destination_seq);
  return w.take();
}
template <>
Handover decode<Handover>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  Handover m;
  m.gap_ns = r.get<std::int64_t>("Handover.gap_ns");
  m.sequence_continued = r.get<std::uint8_t>("Handover.sequence_continued");
  m.last_source_seq = r.get<std::uint32_t>("Handover.last_source_seq");
  m.first_destination_seq = r.get<std::uint32_t>("Handover.first_destination_seq");
  r.expect_end("Handover");
  return m;
}

std::vector<std::byte> encode(const Error& m) {
  ByteWriter w;
  w.put_string(m.message);
  return w.take();
}
template <>
Error decode<Error>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  Error m{r.get_string(kMaxMessageBytes, "Error.message")};
  r.expect_end("Error");
  return m;
}

std::vector<std::byte> encode(const RoundEnd& m) { return encode_field(m, &RoundEnd::round); }
template <>
RoundEnd decode<RoundEnd>(std::span<const std::byte> payload) {
  return decode_field(payload, &RoundEnd::round, "RoundEnd");
}

std::vector<std::byte> encode(const RoundAck& m) { return encode_field(m, &RoundAck::round); }
template <>
RoundAck decode<RoundAck>(std::span<const std::byte> payload) {
  return decode_field(payload, &RoundAck::round, "RoundAck");
}

std::vector<std::byte> encode(const SharedMemory& m) { return encode_field(m, &SharedMemory::regions); }
namespace {

// PagePlan, PostcopyStart and PostcopyResumeAck all carry one page bitmap per region.
template <typename M>
M decode_bitmaps(std::span<const std::byte> payload, const char* name) {
  ByteReader r(payload);
  M m;
  const auto regions = r.get<std::uint32_t>(name);
  if (regions == 0 || regions > kMaxRegions) throw ProtocolError(std::string(name) + " has " + std::to_string(regions) + " regions");
  for (std::uint32_t i = 0; i < regions; ++i) m.bitmaps.push_back(r.get_vector<std::uint64_t>(kMaxPlanBytes / 8, name));
  r.expect_end(name);
  return m;
}

std::vector<std::byte> encode_bitmaps(const std::vector<std::vector<std::uint64_t>>& bitmaps) {
  ByteWriter w;
  w.put(static_cast<std::uint32_t>(bitmaps.size()));
  for (const auto& b : bitmaps) w.put_vector(b);
  return w.take();
}

}  // namespace

template <>
PagePlan decode<PagePlan>(std::span<const std::byte> payload) {
  return decode_bitmaps<PagePlan>(payload, "PagePlan");
}
std::vector<std::byte> encode(const PagePlan& m) { return encode_bitmaps(m.bitmaps); }

template <>
PostcopyStart decode<PostcopyStart>(std::span<const std::byte> payload) {
  return decode_bitmaps<PostcopyStart>(payload, "PostcopyStart");
}
std::vector<std::byte> encode(const PostcopyStart& m) { return encode_bitmaps(m.bitmaps); }

template <>
PostcopyResumeAck decode<PostcopyResumeAck>(std::span<const std::byte> payload) {
  return decode_bitmaps<PostcopyResumeAck>(payload, "PostcopyResumeAck");
}
std::vector<std::byte> encode(const PostcopyResumeAck& m) { return encode_bitmaps(m.bitmaps); }

std::vector<std::byte> encode(const PageRequest& m) { return encode_field(m, &PageRequest::guest_addr); }
template <>
PageRequest decode<PageRequest>(std::span<const std::byte> payload) {
  return decode_field(payload, &PageRequest::guest_addr, "PageRequest");
}

std::vector<std::byte> encode(const PostcopyDone& m) { return encode_field(m, &PostcopyDone::pages_installed); }
template <>
PostcopyDone decode<PostcopyDone>(std::span<const std::byte> payload) {
  return decode_field(payload, &PostcopyDone::pages_installed, "PostcopyDone");
}

std::vector<std::byte> encode(const CommitRetry& m) { return encode_field(m, &CommitRetry::session); }
template <>
CommitRetry decode<CommitRetry>(std::span<const std::byte> payload) {
  return decode_field(payload, &CommitRetry::session, "CommitRetry");
}
std::vector<std::byte> encode(const PostcopyResume& m) { return encode_field(m, &PostcopyResume::session); }
template <>
PostcopyResume decode<PostcopyResume>(std::span<const std::byte> payload) {
  return decode_field(payload, &PostcopyResume::session, "PostcopyResume");
}

std::vector<std::byte> encode(const ChannelHello& m) {
  ByteWriter w;
  w.put(m.session);
  w.put(m.index);
  return w.take();
}
template <>
ChannelHello decode<ChannelHello>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  ChannelHello m;
  m.session = r.get<std::uint64_t>("ChannelHello.session");
  m.index = r.get<std::uint32_t>("ChannelHello.index");
  r.expect_end("ChannelHello");
  return m;
}

template <>
SharedMemory decode<SharedMemory>(std::span<const std::byte> payload) {
  const auto m = decode_field(payload, &SharedMemory::regions, "SharedMemory");
  if (m.regions == 0 || m.regions > kMaxRegions) throw ProtocolError("SharedMemory announces " + std::to_string(m.regions) + " regions");
  return m;
}

std::vector<std::byte> encode(const DiskData& m) {
  ByteWriter w;
  w.put(m.disk);
  w.put(m.offset);
  w.put_bytes(m.data);
  return w.take();
}
template <>
DiskData decode<DiskData>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  DiskData m;
  m.disk = r.get<std::uint32_t>("DiskData.disk");
  m.offset = r.get<std::uint64_t>("DiskData.offset");
  auto data = r.get_bytes(kMaxDiskData, "DiskData.data");
  if (data.empty()) throw ProtocolError("DiskData with no data");
  m.data.assign(data.begin(), data.end());
  r.expect_end("DiskData");
  return m;
}

std::vector<std::byte> encode(const DiskZero& m) {
  ByteWriter w;
  w.put(m.disk);
  w.put(m.offset);
  w.put(m.length);
  return w.take();
}
template <>
DiskZero decode<DiskZero>(std::span<const std::byte> payload) {
  ByteReader r(payload);
  DiskZero m;
  m.disk = r.get<std::uint32_t>("DiskZero.disk");
  m.offset = r.get<std::uint64_t>("DiskZero.offset");
  m.length = r.get<std::uint64_t>("DiskZero.length");
  if (m.length == 0) throw ProtocolError("DiskZero of no bytes");
  r.expect_end("DiskZero");
  return m;
}

}  // namespace mig::wire
