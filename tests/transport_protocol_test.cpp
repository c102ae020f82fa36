// Every message round-trips; every malformed input is refused with a reason.
#include <catch2/catch.hpp>

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
}  // namespace

TEST_CASE("every protocol message round-trips and refuses truncation") {
  check_round_trip(sample_hello());
  check_round_trip(HelloAck{kCapVerify, "8c1f", 4});
  check_round_trip(ChannelHello{0xfeedfacecafe, 3});
  check_round_trip(StateSection{"vcpu.0", 1, {std::byte{1}, std::byte{2}, std::byte{3}}});
  check_round_trip(Complete{0x1234567890abcdefull, 42});
  check_round_trip(Ready{123456});
  check_round_trip(Running{-5, 77});
  check_round_trip(Handover{7'500'000, 1, 99, 100});
  check_round_trip(Error{"something broke"});
  check_round_trip(RoundEnd{7});
  check_round_trip(RoundAck{7});
  check_round_trip(SharedMemory{2});
  check_round_trip(PagePlan{{{1, 2, 3}, {0xffff}}});
  check_round_trip(CommitRetry{0xabcdef12345});
  CHECK(decode<Commit>(encode(Commit{})) == Commit{});
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
