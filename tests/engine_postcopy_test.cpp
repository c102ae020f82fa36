// Post-copy against fake VMs: the protocol, the exactly-once rules, recovery after a broken
// link, and bad input on both sides. The fake's memory is real anonymous memory, so the
// destination traps faults with userfaultfd exactly as it does for a KVM guest.
#include <catch2/catch.hpp>

#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <random>

#include "engine/page_hashes.h"
#include "engine/pages.h"
#include "engine/postcopy_destination.h"
#include "engine/postcopy_source.h"
#include "tests/fake_vm.h"
#include "tests/support.h"

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace {

constexpr std::uint64_t kPages = 1024;  // 4 MiB

using test::Connections;

void fill(test::FakeVm& vm, std::uint64_t pages) {
  for (std::uint64_t p = 0; p < pages; ++p) vm.write(0, p, p * 7 + 1);
}

engine::SenderOptions postcopy_options(Connections& connections) {
  engine::SenderOptions options;
  options.postcopy = true;
  options.postcopy_after_s = 0;  // right after round 0
  options.open_channel = [&connections] { return connections.open(); };
  return options;
}

struct Outcome {
  engine::MigrationStats sent;
  engine::IncomingResult received;
  test::FakeVm* destination = nullptr;
};

Outcome migrate(test::FakeVm& source, const engine::SenderOptions& options, Connections& connections,
                std::function<void(test::FakeVm&)> after_resume = {}) {
  auto [send_end, recv_end] = test::stream_pair();
  Outcome out;
  auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
    engine::ReceiverOptions receiver_options{2000ms, 100ms, {}, {}};
    receiver_options.accept_channel = [&](std::chrono::milliseconds timeout) { return connections.accept(timeout); };
    auto factory = [&](const engine::VmShape& shape) {
      auto vm = test::fake_factory(&out.destination)(shape);
      out.destination->after_resume = after_resume;
      return vm;
    };
    return engine::IncomingMigration(s, factory, receiver_options).run();
  });
  out.sent = engine::SourceMigration(source, send_end, options).run();
  out.received = receiver.get();
  return out;
}

// Dirties the first `pages` pages while round 0 runs, so they are not valid at the switch.
void dirty_during_round_zero(test::FakeVm& source, std::uint64_t pages) {
  source.before_fetch = [pages, value = std::uint64_t{1000}](test::FakeVm& vm) mutable {
    for (std::uint64_t p = 0; p < pages; ++p) vm.write(0, p, value++);
  };
}

}  // namespace

TEST_CASE("post-copy: a guest touching pages it was never sent sees their contents at once") {
  Connections connections;
  test::FakeVm source({kPages, 64});
  fill(source, kPages);
  dirty_during_round_zero(source, kPages / 2);
  auto options = postcopy_options(connections);
  options.bandwidth_limit = 8e6;  // the background push takes a while: the reads below must fault
  std::future<std::vector<std::uint64_t>> reader;
  // Right after the resume, read pages the source dirtied, from the far end first (the
  // background push starts at the near end), as a vCPU would.
  auto after_resume = [&](test::FakeVm& vm) {
    reader = std::async(std::launch::async, [&vm] {
      std::vector<std::uint64_t> first_words;
      for (std::uint64_t p = kPages / 2; p-- > kPages / 2 - 32;) {
        std::uint64_t word;
        std::memcpy(&word, vm.region_memory(0).data() + p * engine::kPageSize, 8);
        first_words.push_back(word);
      }
      return first_words;
    });
  };
  auto out = migrate(source, options, connections, after_resume);
  INFO(out.sent.error << " / " << out.received.stats.error);
  REQUIRE(out.sent.status == engine::MigrationStatus::completed);
  REQUIRE(out.received.stats.status == engine::MigrationStatus::completed);
  CHECK(out.sent.stop_reason == engine::StopReason::postcopy);
  CHECK(out.received.stats.verified);
  const auto seen = reader.get();
  for (std::size_t i = 0; i < seen.size(); ++i) {
    std::uint64_t expected;
    std::memcpy(&expected, source.region_memory(0).data() + (kPages / 2 - 1 - i) * engine::kPageSize, 8);
    CHECK(seen[i] == expected);
  }
  CHECK(out.destination->region_memory(0) == source.region_memory(0));
  CHECK(out.destination->region_memory(1) == source.region_memory(1));
  REQUIRE(out.sent.postcopy);
  REQUIRE(out.received.stats.postcopy);
  const auto& at_source = *out.sent.postcopy;
  const auto& at_destination = *out.received.stats.postcopy;
  CHECK(at_source.pages_needed >= kPages / 2);
  CHECK(at_source.pages_urgent + at_source.pages_background == at_source.pages_needed);
  CHECK(at_source.requests >= 1);
  CHECK(at_source.requests == at_destination.requests);
  CHECK(at_destination.fault_latency.count >= 1);
  CHECK(at_destination.blocktime_ms > 0);
  CHECK(at_source.bytes_after >= at_source.pages_needed * engine::kPageSize);
}

TEST_CASE("post-copy source: a request outside guest memory, for a valid page, or asked twice is refused") {
  test::FakeVm vm({kPages});
  fill(vm, kPages);
  const auto regions = vm.memory_regions();
  engine::PageHashes hashes(regions, 2);
  engine::MigrationControl control;
  auto needed = engine::empty_bitmaps(regions);
  needed[0][0] = 0xff;  // pages 0-7
  auto request = [&](std::vector<std::uint64_t> addresses) {
    engine::PostcopySource source(regions, needed, hashes, control, 1, 1);
    auto [near, far] = test::stream_pair();
    source.serve(near);
    for (const auto a : addresses) far.send(wire::PageRequest{a});
    std::vector<std::uint64_t> answered;
    far.set_timeout(500ms);
    try {
      for (std::size_t i = 0; i < addresses.size(); ++i) {
        auto header = far.read_header();
        auto payload = far.read_payload(header);
        answered.push_back(1);
      }
    } catch (const std::exception&) {
    }
    std::this_thread::sleep_for(50ms);
    return std::pair{source.stop_serving(), answered.size()};
  };
  CHECK(request({0, 4096, 8192}) == std::pair{std::optional<std::string>{}, std::size_t{3}});
  CHECK_THAT(request({kPages * engine::kPageSize}).first.value_or(""), Contains("outside guest memory"));
  CHECK_THAT(request({9 * engine::kPageSize}).first.value_or(""), Contains("was valid at the destination"));
  CHECK_THAT(request({0, 0}).first.value_or(""), Contains("requested twice"));
}

TEST_CASE("post-copy destination: a page that was valid, or arrives twice, is refused and never written") {
  test::FakeVm vm({kPages});
  fill(vm, kPages);
  const auto before = vm.region_memory(0);
  const auto regions = vm.memory_regions();
  engine::PageHashes hashes(regions, 2);
  auto needed = engine::empty_bitmaps(regions);
  needed[0][0] = 0x3;  // pages 0 and 1
  engine::PostcopyDestination destination(vm, regions, hashes, needed);
  std::vector<std::byte> page(engine::kPageSize, std::byte{0x5a});
  destination.install(0, 0, 0, page.data());
  CHECK_THROWS_WITH(destination.install(0, 0, 0, page.data()), Contains("arrived twice"));
  CHECK_THROWS_WITH(destination.install(0, 0, 5, page.data()), Contains("was valid here"));
  destination.install(0, 0, 1, nullptr);
  CHECK(destination.wait_installed(100ms));
  destination.finish();
  CHECK(std::memcmp(vm.region_memory(0).data(), page.data(), engine::kPageSize) == 0);
  CHECK(std::all_of(vm.region_memory(0).begin() + engine::kPageSize, vm.region_memory(0).begin() + 2 * engine::kPageSize,
                    [](std::byte b) { return b == std::byte{0}; }));
  // Page 5 was valid: it still holds what it held.
  CHECK(std::equal(before.begin() + 2 * engine::kPageSize, before.end(), vm.region_memory(0).begin() + 2 * engine::kPageSize));
}

namespace {

// Carries frames between a sender and a receiver until `cut_after` page batches have passed
// after Commit, then breaks both connections as a failing link would.
void relay_then_cut(transport::Stream& sender, transport::Stream& receiver, int cut_after) {
  std::thread back([&] {
    std::vector<std::byte> buf(65536);
    for (ssize_t n; (n = ::recv(receiver.fd(), buf.data(), buf.size(), 0)) > 0;)
      if (::send(sender.fd(), buf.data(), static_cast<std::size_t>(n), MSG_NOSIGNAL) != n) break;
  });
  try {
    bool committed = false;
    for (int batches = 0; !committed || batches < cut_after;) {
      wire::FrameHeader header;
      sender.read_exact(std::as_writable_bytes(std::span(&header, 1)));
      auto payload = sender.read_payload(header);
      receiver.send_frame(static_cast<wire::MessageType>(header.type), payload);
      committed = committed || header.type == static_cast<std::uint16_t>(wire::MessageType::commit);
      if (committed && header.type == static_cast<std::uint16_t>(wire::MessageType::page_batch)) ++batches;
    }
  } catch (const std::exception&) {
  }
  ::shutdown(sender.fd(), SHUT_RDWR);
  ::shutdown(receiver.fd(), SHUT_RDWR);
  back.join();
}

}  // namespace

TEST_CASE("post-copy survives a cut link - both sides pause - and recovery completes with memory verified") {
  for (const int cut_after : {0, 3}) {
    DYNAMIC_SECTION("cut after " << cut_after << " background batches") {
      Connections connections, recovery;
      test::FakeVm source({kPages});
      fill(source, kPages);
      dirty_during_round_zero(source, kPages);
      auto options = postcopy_options(connections);
      options.bandwidth_limit = 16e6;
      auto control = engine::make_control(options);
      auto [send_end, relay_in] = test::stream_pair();
      auto [relay_out, recv_end] = test::stream_pair();
      test::FakeVm* destination = nullptr;
      std::atomic<bool> recovering{false};
      auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
        engine::ReceiverOptions receiver_options{2000ms, 100ms, {}, {}};
        receiver_options.accept_channel = [&](std::chrono::milliseconds timeout) { return connections.accept(timeout); };
        receiver_options.await_recovery = [&]() -> engine::ReceiverOptions::Accept {
          recovering = true;
          return [&](std::chrono::milliseconds timeout) { return recovery.accept(timeout); };
        };
        return engine::IncomingMigration(s, test::fake_factory(&destination), receiver_options).run();
      });
      auto relay = std::async(std::launch::async, [&, in = std::move(relay_in), out = std::move(relay_out)]() mutable {
        relay_then_cut(in, out, cut_after);
      });
      auto sender = std::async(std::launch::async, [&] { return engine::SourceMigration(source, send_end, options, control).run(); });
      // The operator: once the source says it is paused, point it at the recovery address.
      REQUIRE(test::wait_until([&] { return control->status() == engine::MigrationStatus::postcopy_paused; }, 10s));
      CHECK_FALSE(control->cancel());  // too late to take the guest back
      CHECK(control->resume_postcopy([&] { return recovery.open(); }));
      const auto sent = sender.get();
      const auto received = receiver.get();
      relay.get();
      INFO(sent.error << " / " << received.stats.error);
      REQUIRE(sent.status == engine::MigrationStatus::completed);
      REQUIRE(received.stats.status == engine::MigrationStatus::completed);
      CHECK(recovering);
      CHECK(received.stats.verified);
      REQUIRE(sent.postcopy);
      CHECK(sent.postcopy->recoveries == 1);
      CHECK(source.resumes == 0);  // the source never ran the guest again
      CHECK(destination->region_memory(0) == source.region_memory(0));
    }
  }
}
