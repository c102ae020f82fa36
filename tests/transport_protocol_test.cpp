// Every message round-trips; every malformed input is refused with a reason.
#include <catch2/catch.hpp>

#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "transport/protocol.h"
#include "transport/stream.h"

using namespace mig::wire;
using Catch::Matchers::Contains;

namespace {
template <typename T>
void check_round_trip(const T& message) {
  const auto bytes = encode(message);
  CHECK(decode<T>(bytes) == message);
  // Any truncation is refused, never read past.
  for (std::size_t cut = 0; cut < bytes.size(); ++cut) CHECK_THROWS_AS(decode<T>(std::span(bytes).first(cut)), ProtocolError);
  // Trailing garbage is refused.
  auto longer = bytes;
  longer.push_back(std::byte{0});
  CHECK_THROWS_AS(decode<T>(longer), ProtocolError);
}

Hello sample_hello() {
  Hello h;
  h.capabilities = kCapVerify;
  h.vcpus = 4;
  h.host_boot_id = "8c1f";
  h.regions = {{0, 3ull << 30}, {4ull << 30, 1ull << 30}};
  h.channels = 4;
  h.session = 0xfeedfacecafe;
  h.cpuid = {{0, 0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69}, {7, 0, 0, 1u << 16, 0, 0}};
  h.tsc_khz = 2'100'000;
  return h;
}

Hello sample_hello_with_disk() {
  auto h = sample_hello();
  h.disks = {{64ull << 20, 65536, kDiskCopy, "/var/lib/mig/a.qcow2"}};
  return h;
}

// One of each message, as the tests below send it.
auto sample_messages() {
  return std::tuple{sample_hello_with_disk(),
                    HelloAck{kCapVerify, "8c1f", 4},
                    ChannelHello{0xfeedfacecafe, 3},
                    StateSection{"vcpu.0", 1, {std::byte{1}, std::byte{2}, std::byte{3}}},
                    Complete{0x1234567890abcdefull, 42, 0x55aa},
                    Ready{123456},
                    Commit{},
                    Running{-5, 77},
                    Handover{7'500'000, 1, 99, 100},
                    Error{"something broke"},
                    RoundEnd{7},
                    RoundAck{7},
                    SharedMemory{2},
                    PagePlan{{{1, 2, 3}, {0xffff}}},
                    PostcopyStart{{{0x8000000000000001}}},
                    PageRequest{0x7000},
                    PostcopyDone{4096},
                    PostcopyResume{0xabcdef12345},
                    PostcopyResumeAck{{{5}, {}}},
                    DiskData{1, 1ull << 20, {std::byte{0xee}, std::byte{0}}},
                    DiskZero{0, 65536, 131072},
                    CommitRetry{0xabcdef12345}};
}

std::string hex(std::span<const std::byte> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (auto b : bytes) {
    out += kDigits[std::to_integer<unsigned>(b) >> 4];
    out += kDigits[std::to_integer<unsigned>(b) & 0xf];
  }
  return out;
}
}  // namespace

TEST_CASE("every protocol message round-trips and refuses truncation") {
  check_round_trip(sample_hello());
  std::apply([](const auto&... message) { (check_round_trip(message), ...); }, sample_messages());
}

// The bytes of version 6, pinned: a change to any message's layout must fail here, and come
// with a new kVersion, since a peer of the old version would misread it. (Version 6 laid out
// nothing anew: it changed what the capabilities offered together mean.)
TEST_CASE("every message's bytes are version 6's") {
  REQUIRE(kVersion == 6);
  const std::vector<std::string> expected = {
      // Hello
      "06000000010000000010000004000000040000000000000038633166200000000000000000000000"
      "00000000000000c0000000000000000001000000000000400000000004000000fecacefaedfe0000"
      "010000000000000400000000000001000100000014000000000000002f7661722f6c69622f6d6967"
      "2f612e71636f7732300000000000000000000000000000000d00000047656e756e74656c696e6549"
      "070000000000000000000000000001000000000000000000200b2000",
      "0100000004000000000000003863316604000000",  // HelloAck
      "fecacefaedfe000003000000",  // ChannelHello
      "0600000000000000766370752e30010000000300000000000000010203",  // StateSection
      "efcdab90785634122a00000000000000aa55000000000000",  // Complete
      "40e2010000000000",  // Ready
      "",  // Commit
      "fbffffffffffffff4d00000000000000",  // Running
      "e070720000000000016300000064000000",  // Handover
      "0f00000000000000736f6d657468696e672062726f6b65",  // Error
      "07000000",  // RoundEnd
      "07000000",  // RoundAck
      "02000000",  // SharedMemory
      // PagePlan
      "02000000180000000000000001000000000000000200000000000000030000000000000008000000"
      "00000000ffff000000000000",
      "0100000008000000000000000100000000000080",  // PostcopyStart
      "0070000000000000",  // PageRequest
      "0010000000000000",  // PostcopyDone
      "4523f1debc0a0000",  // PostcopyResume
      "02000000080000000000000005000000000000000000000000000000",  // PostcopyResumeAck
      "0100000000001000000000000200000000000000ee00",  // DiskData
      "0000000000000100000000000000020000000000",  // DiskZero
      "4523f1debc0a0000",  // CommitRetry
  };
  std::vector<std::string> actual;
  std::apply([&](const auto&... message) { (actual.push_back(hex(encode(message))), ...); }, sample_messages());
  CHECK(actual == expected);
}

TEST_CASE("Hello with a wrong version is refused before anything else is read") {
  auto hello = sample_hello();
  hello.version = kVersion - 1;
  CHECK_THROWS_WITH(decode<Hello>(encode(hello)), Contains("version " + std::to_string(kVersion - 1)) &&
                                                      Contains("speaks " + std::to_string(kVersion)));
}

TEST_CASE("Hello with absurd shapes is refused") {
  auto bad = [](auto mutate) {
    auto h = sample_hello();
    mutate(h);
    return encode(h);
  };
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.vcpus = 0; })), Contains("vCPUs"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.channels = 0; })), Contains("channels"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.channels = 99; })), Contains("channels"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.vcpus = 100000; })), Contains("vCPUs"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.regions.clear(); })), Contains("no memory regions"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.regions[0].size = 4097; })), Contains("malformed"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.regions[0].size = 1ull << 50; })), Contains("malformed"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.page_size = 65536; })), Contains("page size"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.regions.resize(kMaxRegions + 1, {0, 4096}); })), Contains("limit"));
  CHECK_THROWS_WITH(decode<Hello>(bad([](Hello& h) { h.tsc_khz = kMaxTscKhz + 1; })), Contains("TSC of 20000001 kHz"));
}

TEST_CASE("frame headers are validated") {
  FrameHeader h;
  h.type = static_cast<std::uint16_t>(MessageType::hello);
  CHECK_NOTHROW(validate(h));
  SECTION("all-zero frame") { CHECK_THROWS_WITH(validate(FrameHeader{0, 0, 0, 0}), Contains("magic")); }
  SECTION("invalid type") {
    h.type = 0;
    CHECK_THROWS_WITH(validate(h), Contains("unknown frame type"));
  }
  SECTION("unknown type") {
    h.type = 999;
    CHECK_THROWS_WITH(validate(h), Contains("unknown frame type"));
  }
  SECTION("oversized control message") {
    h.length = kMaxControlPayload + 1;
    CHECK_THROWS_WITH(validate(h), Contains("exceeds the limit"));
  }
  SECTION("oversized page batch") {
    h.type = static_cast<std::uint16_t>(MessageType::page_batch);
    h.length = 1ull << 40;
    CHECK_THROWS_WITH(validate(h), Contains("exceeds the limit"));
  }
}

TEST_CASE("page descriptors are validated") {
  PageDescriptor d;
  d.guest_addr = 0x1000;
  d.encoding = PageEncoding::raw;
  d.length = kPageSize;
  CHECK_NOTHROW(validate(d));
  d.length = 100;
  CHECK_THROWS_WITH(validate(d), Contains("raw page descriptor"));
  d.encoding = PageEncoding::zero;
  CHECK_THROWS_WITH(validate(d), Contains("zero page descriptor"));
  d.length = 0;
  d.guest_addr = 0x1001;
  CHECK_THROWS_WITH(validate(d), Contains("not page-aligned"));
  d.encoding = PageEncoding::invalid;
  CHECK_THROWS_WITH(validate(d), Contains("unknown page encoding"));
}

TEST_CASE("a frame header with reserved bits set is refused") {
  FrameHeader header{kMagic, static_cast<std::uint16_t>(MessageType::commit), 1, 0};
  CHECK_THROWS_WITH(validate(header), Contains("reserved"));
  header.reserved = 0;
  CHECK_NOTHROW(validate(header));
}
