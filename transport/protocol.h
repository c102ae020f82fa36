// The mig migration protocol, whole. Version 6 (verification offered beside shared memory).
//
//   sender (source)                                   receiver (destination, incoming mode)
//   Hello {version, capabilities, vcpus, regions, channels, session, disks, the guest's CPUID}
//                                                 ──▶  checks it can take the guest: its CPU,
//                                                      its size, the post-copy asked for (else
//                                                      Error naming why), then creates a VM of
//                                                      that shape
//                                                 ◀── HelloAck {capabilities, boot id, channels}
//   [channels 1..n-1: a connection each, opening with ChannelHello {session, index}; each
//    carries the pages of its share of guest memory and its own RoundEnd/RoundAck]
//   [SharedMemory {regions} + one memfd per region over SCM_RIGHTS, if both accepted it:
//    the VM is built on the source's own memory and no page is sent]
//   PagePlan {which pages round 0 carries}        ──▶  starts populating those pages, ahead
//   PageBatch {round 0, descriptors, pages}       ──▶  pages land straight in guest memory
//   DiskData {disk, offset, bytes}, DiskZero {disk, offset, length}   (--copy-storage-all:
//                                                      channel 0, before each round's pages)
//   RoundEnd {round 0}                            ──▶
//                                                 ◀── RoundAck {round 0}   once all of it landed
//   PageBatch, RoundEnd {round k ...} (pre-copy)  ──▶  ◀── RoundAck {round k}
//       ... source pauses the guest ...
//   PageBatch {final round}                       ──▶
//   StateSection {name, version, bytes} × n       ──▶
//   Complete {page-hash digest, disk digest}      ──▶  verifies, takes shared disks' locks,
//                                                      restores all state
//                                                 ◀── Ready {restore time}   or Error {message}
//   Commit                                        ──▶  resumes the guest
//                                                 ◀── Running {resumed at}
//                                                 ◀── Handover {guest-observed gap}  (after the
//                                                      guest's first heartbeat there, if any)
// If the connection breaks after Commit was sent and before Running was read, the source cannot
// tell whether the destination resumed. It reconnects (a new connection, as for a channel):
//   CommitRetry {session}                         ──▶  resumes the guest if it holds it paused
//                                                 ◀── Running          it runs there (resumed
//                                                      now, or already before)
// No answer leaves the source in handoff-unknown, its guest paused: the destination may run it.
// The destination keeps a restored guest paused, and answers CommitRetry after it resumed one,
// for ReceiverOptions::handoff_grace; the source retries for less than that.
//
// Post-copy (both offered kCapPostcopy; the source opened one more connection at set-up,
// ChannelHello {session, kPostcopyChannel}, for urgent pages): instead of the final round,
//   StateSection × n, PostcopyStart {pages not valid at the destination}
//                                                 ──▶  drops those pages, traps their faults
//                                                 ◀── Ready        ... Commit ──▶  ◀── Running
//   post-copy channel:                            ◀── PageRequest {guest address}  on a fault
//                      PageBatch {the page}       ──▶  installed at once, the vCPU goes on
//   main channel:      PageBatch {the rest, nearest the last fault first}  ──▶
//                      Complete {digest}          ──▶  once every page is there: verifies
//                                                 ◀── PostcopyDone
// If the link breaks after Commit, the source reconnects when told to (recovery):
//   PostcopyResume {session}                      ──▶
//                                                 ◀── PostcopyResumeAck {pages still missing}
//   ChannelHello {session, kPostcopyChannel} on a new post-copy channel, and on as before.
//
// Every frame is a FrameHeader followed by `length` payload bytes. Integers are
// little-endian. Type 0 is invalid, so an all-zero frame is never accepted. The version is
// checked at Hello; a receiver refuses any other. Every length, count and guest address a
// receiver reads is bounded here or checked against the VM's memory before use.
//
// Ordering invariant for page data: a page's copy from round k must never land after its copy
// from round k+1. With one TCP stream that is the stream's order, and the receiver rejects a
// batch whose round is lower than one it already applied. Parallel channels must keep it by
// sending each page of a round on the channel chosen by its address, and by finishing round k
// on every channel before round k+1 starts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../transport/bytes.h"

namespace mig::wire {

inline constexpr std::uint32_t kMagic = 0x3147494d;  // "MIG1"
// 4: kCapDryRun; 5: Hello.tsc_khz; 6: kCapVerify and kCapPostcopy offered beside kCapSharedMemory
// (a hand-over declined is a verified copy), and post-copy refused with an Error
inline constexpr std::uint32_t kVersion = 6;
inline constexpr std::uint32_t kPageSize = 4096;

// Bounds on what a receiver accepts.
inline constexpr std::uint64_t kMaxControlPayload = 1u << 20;
inline constexpr std::uint64_t kMaxStateSection = 64u << 20;
inline constexpr std::size_t kMaxStateSections = 1024;      // per migration
inline constexpr std::uint64_t kMaxStateTotal = 256u << 20;  // all sections of a migration together
inline constexpr std::uint32_t kMaxBatchPages = 1024;
inline constexpr std::uint32_t kMaxRegions = 64;
inline constexpr std::uint32_t kMaxVcpus = 256;
inline constexpr std::uint64_t kMaxGuestBytes = 1ull << 40;
inline constexpr std::size_t kMaxNameBytes = 64;
inline constexpr std::size_t kMaxMessageBytes = 4096;
inline constexpr std::uint32_t kMaxChannels = 16;
inline constexpr std::uint32_t kMaxDisks = 16;
inline constexpr std::uint64_t kMaxDiskBytes = 1ull << 44;      // 16 TiB
inline constexpr std::uint32_t kMaxDiskData = 1u << 20;         // bytes in one DiskData
inline constexpr std::uint32_t kMinDiskChunk = 4096, kMaxDiskChunk = 1u << 20;
inline constexpr std::size_t kMaxPathBytes = 4096;
inline constexpr std::uint32_t kMaxCpuidLeaves = 256;
inline constexpr std::uint32_t kMaxTscKhz = 20'000'000;  // 20 GHz
// With parallel channels, the page at guest page number P travels on channel
// (P / kChannelChunkPages) % channels, always, so its copies arrive in round order.
inline constexpr std::uint64_t kChannelChunkPages = 512;
// The index in ChannelHello of the post-copy channel (urgent pages and their requests).
inline constexpr std::uint32_t kPostcopyChannel = kMaxChannels;
inline unsigned channel_of(std::uint64_t guest_page, unsigned channels) {
  return static_cast<unsigned>(guest_page / kChannelChunkPages % channels);
}

enum class MessageType : std::uint16_t {
  invalid = 0,
  hello = 1,
  hello_ack = 2,
  page_batch = 3,
  state_section = 4,
  complete = 5,
  ready = 6,
  commit = 7,
  running = 8,
  handover = 9,
  error = 10,
  round_end = 11,
  round_ack = 12,
  shared_memory = 13,
  page_plan = 14,
  channel_hello = 15,
  postcopy_start = 16,
  page_request = 17,
  postcopy_done = 18,
  postcopy_resume = 19,
  postcopy_resume_ack = 20,
  disk_data = 21,
  disk_zero = 22,
  commit_retry = 23,
};
const char* to_string(MessageType type);

struct FrameHeader {
  std::uint32_t magic = kMagic;
  std::uint16_t type = 0;
  std::uint16_t reserved = 0;
  std::uint64_t length = 0;  // payload bytes after this header
};
static_assert(sizeof(FrameHeader) == 16);

// Checks magic, type and the payload bound for that type.
void validate(const FrameHeader& header);

// Capability bits, offered in Hello and accepted in HelloAck. A source offers each its options
// allow. A receiver that takes kCapSharedMemory takes no kCapPostcopy (nothing is left to copy
// late), and kCapVerify then covers only what is copied: the disks, not the one memory. One that
// cannot take the kCapPostcopy asked for answers Error, saying why.
inline constexpr std::uint32_t kCapVerify = 1u << 0;        // page-hash verification at Complete
inline constexpr std::uint32_t kCapSharedMemory = 1u << 1;  // same host: guest memory handed over as memfds
inline constexpr std::uint32_t kCapPostcopy = 1u << 2;      // the switchover may be to post-copy
// A pre-flight check only (mig-send --check): the receiver checks the guest as for a real
// migration, answers HelloAck (with this bit) or Error, builds nothing, and waits on for its
// source. The connection then closes.
inline constexpr std::uint32_t kCapDryRun = 1u << 3;

struct Region {
  std::uint64_t guest_addr = 0;
  std::uint64_t size = 0;
  friend bool operator==(const Region&, const Region&) = default;
};

// A guest disk. Shared storage (the default) moves no data: the destination opens the same
// image (by this path unless told otherwise) and takes its lock at the switchover. With
// kDiskCopy the data travels: the destination writes it into an image of its own.
inline constexpr std::uint32_t kDiskCopy = 1u << 0;
struct Disk {
  std::uint64_t size = 0;         // bytes, a multiple of 512
  std::uint32_t chunk_bytes = 0;  // the unit of write tracking, hashing and sending; a power of two
  std::uint32_t flags = 0;
  std::string path;               // the source's image, for operators and the shared-storage default
  friend bool operator==(const Disk&, const Disk&) = default;
};
// A CPUID leaf as the guest was given it (KVM's kvm_cpuid_entry2 without its flags).
struct CpuidLeaf {
  std::uint32_t function = 0, index = 0;
  std::uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
  friend bool operator==(const CpuidLeaf&, const CpuidLeaf&) = default;
};
static_assert(sizeof(CpuidLeaf) == 24);

struct Hello {
  std::uint32_t version = kVersion;
  std::uint32_t capabilities = 0;
  std::uint32_t page_size = kPageSize;
  std::uint32_t vcpus = 0;
  std::string host_boot_id;  // equal boot ids mean one host: CLOCK_MONOTONIC is comparable
  std::vector<Region> regions;
  std::uint32_t channels = 1;  // connections the sender would like to use for pages
  std::uint64_t session = 0;   // ties the extra channels' connections to this one
  std::vector<Disk> disks;
  std::vector<CpuidLeaf> cpuid;  // what the guest's CPU says it is; empty: nothing said
  std::uint32_t tsc_khz = 0;     // the rate the guest's TSC ticks at; 0: nothing said
  friend bool operator==(const Hello&, const Hello&) = default;
};

struct HelloAck {
  std::uint32_t capabilities = 0;
  std::string host_boot_id;
  std::uint32_t channels = 1;  // what the receiver accepted: 1, or the sender's count
  friend bool operator==(const HelloAck&, const HelloAck&) = default;
};

enum class PageEncoding : std::uint8_t {
  invalid = 0,
  raw = 1,   // kPageSize bytes follow
  zero = 2,  // no bytes follow; the page is all zeroes
  delta = 3, // `length` bytes of runs against the version of the page sent last (engine/delta.h)
};

struct PageDescriptor {
  std::uint64_t guest_addr = 0;
  std::uint32_t length = 0;  // payload bytes for this page
  PageEncoding encoding = PageEncoding::invalid;
  std::uint8_t reserved[3] = {};
};
static_assert(sizeof(PageDescriptor) == 16);

// A page batch payload is: BatchHeader, PageDescriptor[count], then each page's bytes in
// descriptor order. Kept as raw structs so the sender can gather pages straight from guest
// memory and the receiver can scatter them straight into it. With kBatchZstd the page bytes
// are instead one zstd frame of `compressed_bytes` that must decompress to exactly the sum
// of the descriptors' lengths.
inline constexpr std::uint32_t kBatchZstd = 1u << 0;
struct BatchHeader {
  std::uint32_t round = 0;
  std::uint32_t count = 0;
  std::uint32_t flags = 0;
  std::uint32_t compressed_bytes = 0;
};
static_assert(sizeof(BatchHeader) == 16);

// Checks one descriptor's encoding and length; the address is checked against guest memory
// by the receiver.
void validate(const PageDescriptor& d);

// A pre-copy round is measured from its first page until the receiver acknowledges having
// applied all of it. Without this, socket buffers (megabytes on loopback) hide a slow
// receiver: the bandwidth estimate comes out too high and the backlog drains during the
// downtime instead of before it.
struct RoundEnd {
  std::uint32_t round = 0;
  friend bool operator==(const RoundEnd&, const RoundEnd&) = default;
};
struct RoundAck {
  std::uint32_t round = 0;
  friend bool operator==(const RoundAck&, const RoundAck&) = default;
};

// The pages round 0 will carry, one bitmap per region (bit i = page i), so the receiver can
// back exactly those with memory ahead of the stream instead of faulting on each as it lands.
struct PagePlan {
  std::vector<std::vector<std::uint64_t>> bitmaps;
  friend bool operator==(const PagePlan&, const PagePlan&) = default;
};
inline constexpr std::uint64_t kMaxPlanBytes = kMaxGuestBytes / kPageSize / 8 + 4096;

// Post-copy: the pages the destination does not hold valid at the switchover (one bitmap per
// region). Every other page is valid there as it stands; a never-sent one reads as zero.
struct PostcopyStart {
  std::vector<std::vector<std::uint64_t>> bitmaps;
  friend bool operator==(const PostcopyStart&, const PostcopyStart&) = default;
};

// Post-copy: the destination needs the page at `guest_addr` now (a vCPU waits on it).
struct PageRequest {
  std::uint64_t guest_addr = 0;
  friend bool operator==(const PageRequest&, const PageRequest&) = default;
};

// Post-copy is over: every page is here and the digest matched. The source may free the guest.
struct PostcopyDone {
  std::uint64_t pages_installed = 0;
  friend bool operator==(const PostcopyDone&, const PostcopyDone&) = default;
};

// Recovery after a broken link: the source reconnects to the same post-copy session ...
struct PostcopyResume {
  std::uint64_t session = 0;
  friend bool operator==(const PostcopyResume&, const PostcopyResume&) = default;
};
// ... and learns which pages the destination still lacks: they go again, whatever was in flight.
struct PostcopyResumeAck {
  std::vector<std::vector<std::uint64_t>> bitmaps;
  friend bool operator==(const PostcopyResumeAck&, const PostcopyResumeAck&) = default;
};

// The first frame on an extra channel's connection.
struct ChannelHello {
  std::uint64_t session = 0;
  std::uint32_t index = 0;
  friend bool operator==(const ChannelHello&, const ChannelHello&) = default;
};

// Announces one memory fd per region, sent right after this frame as SCM_RIGHTS.
struct SharedMemory {
  std::uint32_t regions = 0;
  friend bool operator==(const SharedMemory&, const SharedMemory&) = default;
};

struct StateSection {
  std::string name;
  std::uint32_t version = 0;
  std::vector<std::byte> data;
  friend bool operator==(const StateSection&, const StateSection&) = default;
};

// Disk contents from `offset` (a multiple of the disk's chunk): whole chunks, the last one
// possibly cut short by the end of the disk.
struct DiskData {
  std::uint32_t disk = 0;
  std::uint64_t offset = 0;
  std::vector<std::byte> data;
  friend bool operator==(const DiskData&, const DiskData&) = default;
};
// Whole chunks that read as zero: a hole at the destination, never written zeros.
struct DiskZero {
  std::uint32_t disk = 0;
  std::uint64_t offset = 0, length = 0;
  friend bool operator==(const DiskZero&, const DiskZero&) = default;
};
struct Complete {
  std::uint64_t page_digest = 0;  // XXH3 over the per-page hashes of every page, in order
  std::uint64_t pages_sent = 0;
  std::uint64_t disk_digest = 0;  // over the per-chunk hashes of every disk chunk sent (engine/disk_migration.h)
  friend bool operator==(const Complete&, const Complete&) = default;
};

struct Ready {
  std::uint64_t restore_ns = 0;
  friend bool operator==(const Ready&, const Ready&) = default;
};

struct Commit {
  friend bool operator==(const Commit&, const Commit&) = default;
};

struct Running {
  std::int64_t resumed_at_ns = 0;  // receiver's CLOCK_MONOTONIC when the vCPUs ran again
  std::uint64_t resume_ns = 0;     // how long resuming took
  friend bool operator==(const Running&, const Running&) = default;
};

struct Handover {
  std::int64_t gap_ns = 0;  // the guest's first heartbeat here minus its last at the source
  std::uint8_t sequence_continued = 0;
  std::uint32_t last_source_seq = 0;
  std::uint32_t first_destination_seq = 0;
  friend bool operator==(const Handover&, const Handover&) = default;
};

// The switchover's recovery (see the diagram): the source committed, lost the connection, and
// asks again on a new one.
struct CommitRetry {
  std::uint64_t session = 0;
  friend bool operator==(const CommitRetry&, const CommitRetry&) = default;
};

struct Error {
  std::string message;
  friend bool operator==(const Error&, const Error&) = default;
};

// encode() gives the payload; decode() takes exactly one payload and throws ProtocolError on
// anything malformed or out of bounds. Both exist for each message struct above (protocol.cpp
// lays each out once for both).
template <typename T>
std::vector<std::byte> encode(const T& message);
template <typename T>
T decode(std::span<const std::byte> payload);

// The message type each struct travels as.
template <typename T>
constexpr MessageType type_of();
template <> constexpr MessageType type_of<Hello>() { return MessageType::hello; }
template <> constexpr MessageType type_of<HelloAck>() { return MessageType::hello_ack; }
template <> constexpr MessageType type_of<StateSection>() { return MessageType::state_section; }
template <> constexpr MessageType type_of<Complete>() { return MessageType::complete; }
template <> constexpr MessageType type_of<Ready>() { return MessageType::ready; }
template <> constexpr MessageType type_of<Commit>() { return MessageType::commit; }
template <> constexpr MessageType type_of<Running>() { return MessageType::running; }
template <> constexpr MessageType type_of<Handover>() { return MessageType::handover; }
template <> constexpr MessageType type_of<Error>() { return MessageType::error; }
template <> constexpr MessageType type_of<RoundEnd>() { return MessageType::round_end; }
template <> constexpr MessageType type_of<RoundAck>() { return MessageType::round_ack; }
template <> constexpr MessageType type_of<SharedMemory>() { return MessageType::shared_memory; }
template <> constexpr MessageType type_of<PagePlan>() { return MessageType::page_plan; }
template <> constexpr MessageType type_of<ChannelHello>() { return MessageType::channel_hello; }
template <> constexpr MessageType type_of<PostcopyStart>() { return MessageType::postcopy_start; }
template <> constexpr MessageType type_of<PageRequest>() { return MessageType::page_request; }
template <> constexpr MessageType type_of<PostcopyDone>() { return MessageType::postcopy_done; }
template <> constexpr MessageType type_of<PostcopyResume>() { return MessageType::postcopy_resume; }
template <> constexpr MessageType type_of<PostcopyResumeAck>() { return MessageType::postcopy_resume_ack; }
template <> constexpr MessageType type_of<DiskData>() { return MessageType::disk_data; }
template <> constexpr MessageType type_of<DiskZero>() { return MessageType::disk_zero; }
template <> constexpr MessageType type_of<CommitRetry>() { return MessageType::commit_retry; }

}  // namespace mig::wire
