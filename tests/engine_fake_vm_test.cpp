// The engine end to end against fake VMs: correctness, verification, failure handling.
#include <catch2/catch.hpp>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>

#include "engine/page_hashes.h"
#include "engine/page_sender.h"
#include "engine/incoming_migration.h"
#include "engine/source_migration.h"
#include "kvm/cpu_features.h"
#include "tests/fake_vm.h"
#include "tests/support.h"
#include "transport/endpoint.h"

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace {

constexpr std::uint64_t kPages = 4096;  // 16 MiB

// Runs the receiver on a thread and the sender here, joined by `relay` (which may tamper).
template <typename Relay>
std::pair<engine::MigrationStats, engine::IncomingResult> run_migration(test::FakeVm& source, test::FakeVm** destination,
                                                                       const engine::SenderOptions& options, Relay relay,
                                                                       test::DiskOpener open_disk = {}) {
  auto [send_end, relay_in] = test::stream_pair();
  auto [relay_out, recv_end] = test::stream_pair();
  auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
    return engine::IncomingMigration(s, test::fake_factory(destination, open_disk), engine::ReceiverOptions{2000ms, 100ms, {}, {}})
        .run();
  });
  auto relay_thread = std::async(std::launch::async, [&, in = std::move(relay_in), out = std::move(relay_out)]() mutable {
    relay(in, out);
  });
  auto stats = engine::SourceMigration(source, send_end, options).run();
  send_end = transport::Stream(UniqueFd());  // close: unblocks a relay still waiting
  auto received = receiver.get();
  relay_thread.get();
  return {stats, std::move(received)};
}

// What a relay does with a frame from the sender.
enum class Relay {
  forward,
  cut,                  // close the connection instead
  forward_then_deafen,  // forward it, then stop taking the receiver's replies: its next send fails
};

// Forwards frames both ways; `tamper` may change a sender frame (payload) and says what to
// do with it (a bool: forward or cut).
Relay as_action(bool forward) { return forward ? Relay::forward : Relay::cut; }
Relay as_action(Relay action) { return action; }

template <typename Tamper>
auto frame_relay(Tamper tamper) {
  return [tamper](transport::Stream& from_sender, transport::Stream& to_receiver) mutable {
    std::atomic<bool> done{false};
    std::thread back([&] {
      // Receiver -> sender: plain byte copy.
      std::vector<std::byte> buf(65536);
      while (!done) {
        const ssize_t n = ::recv(to_receiver.fd(), buf.data(), buf.size(), 0);
        if (n <= 0) break;
        if (::send(from_sender.fd(), buf.data(), static_cast<std::size_t>(n), MSG_NOSIGNAL) != n) break;
      }
      ::shutdown(from_sender.fd(), SHUT_RDWR);
    });
    try {
      for (int index = 0;; ++index) {
        wire::FrameHeader header;
        from_sender.read_exact(std::as_writable_bytes(std::span(&header, 1)));
        auto payload = from_sender.read_payload(header);
        const Relay action = as_action(tamper(index, header, payload));
        if (action == Relay::cut) break;
        if (action == Relay::forward_then_deafen) ::shutdown(to_receiver.fd(), SHUT_RD);
        to_receiver.send_frame(static_cast<wire::MessageType>(header.type), payload);
      }
    } catch (const std::exception&) {
    }
    done = true;
    ::shutdown(to_receiver.fd(), SHUT_RDWR);
    ::shutdown(from_sender.fd(), SHUT_RDWR);
    back.join();
  };
}

// Forwards every frame but those of `type`, which are lost.
auto drop(wire::MessageType type) {
  return frame_relay([type](int, wire::FrameHeader& h, std::vector<std::byte>&) { return h.type != static_cast<std::uint16_t>(type); });
}

// Forwards every frame, but after one of `type` no reply of the receiver's gets back.
auto deafen_after(wire::MessageType type) {
  return frame_relay([type](int, wire::FrameHeader& h, std::vector<std::byte>&) {
    return h.type == static_cast<std::uint16_t>(type) ? Relay::forward_then_deafen : Relay::forward;
  });
}

auto pass_through() {
  return frame_relay([](int, wire::FrameHeader&, std::vector<std::byte>&) { return true; });
}

void fill(test::FakeVm& vm, std::uint64_t pages) {
  for (std::uint64_t p = 0; p < pages; p += 3) vm.write(0, p, p * 7 + 1);  // a third touched
}

}  // namespace

TEST_CASE("a fake VM migrates while being written to - and the destination equals the source") {
  test::FakeVm source({kPages, 64});
  fill(source, kPages);
  source.write(1, 5, 99);
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  std::pair<engine::MigrationStats, engine::IncomingResult> result;
  {
    test::Writer writer(source, kPages, 20us);
    result = run_migration(source, &destination, options, pass_through());
  }
  const auto& [sent, received] = result;
  INFO(sent.error << " / " << received.stats.error);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  REQUIRE(received.stats.status == engine::MigrationStatus::completed);
  CHECK(sent.verified);
  CHECK(received.stats.verified);
  REQUIRE(destination != nullptr);
  CHECK(destination->region_memory(0) == source.region_memory(0));
  CHECK(destination->region_memory(1) == source.region_memory(1));
  CHECK(source.paused());         // the guest now lives at the destination
  CHECK(source.resumes == 0);
  CHECK_FALSE(destination->paused());
  REQUIRE(destination->restored.size() == 2);
  CHECK(destination->restored[0].name == "fake.cpu");
  CHECK(destination->restored[0].version == 3);
  CHECK(sent.round_table.size() >= 1);
}

// Dedup skips only what the receiver surely holds. A page the guest keeps rewriting with the
// same bytes went in round 0 from running memory, which is no proof (page_hashes.h): round 1
// sends it again as a copy, and from then on it is skipped.
TEST_CASE("a page rewritten with the bytes it had is skipped - once a send of it is certain") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  constexpr std::uint64_t kRewritten = 64;
  source.before_fetch = [&](test::FakeVm& vm) {
    for (std::uint64_t p = 0; p < kRewritten * 3; p += 3) vm.write(0, p, p * 7 + 1);  // fill's bytes again
  };
  engine::SenderOptions options;
  options.policy.downtime_target_ms = 0;  // iterate to the cap
  options.policy.no_progress_rounds = 0;
  options.policy.max_rounds = 5;
  test::FakeVm* destination = nullptr;
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  INFO(sent.error << " / " << received.stats.error);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(received.stats.verified);
  REQUIRE(sent.round_table.size() == 5);
  CHECK(sent.round_table[1].pages_sent == kRewritten);
  for (std::size_t r = 2; r < sent.round_table.size(); ++r) {
    INFO("round " << r);
    CHECK(sent.round_table[r].pages_sent == 0);
    CHECK(sent.round_table[r].pages_skipped == kRewritten);
  }
  REQUIRE(destination != nullptr);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

// The dirty log is fetched before a round but re-armed a stretch at a time, just before the
// sender reads it (vm.h): a page written between the start of tracking (or the fetch) and its
// turn leaves with that write, and the next round has nothing to send for it. Re-arming takes
// only the round's own pages: a page written meanwhile that the round does not send must
// still be fetched for the next.
TEST_CASE("a page written before its turn leaves once - one the round does not send waits for the next") {
  test::FakeVm source({kPages});
  fill(source, kPages);  // pages 0, 3, 6, ...: round 0's
  constexpr std::uint64_t kWritten = 64;
  source.after_populated = [&](test::FakeVm& vm, std::size_t) {  // tracking runs; round 0 has not begun
    for (std::uint64_t p = 0; p < kWritten * 3; p += 3) {
      vm.write(0, p, p * 7 + 2);  // round 0's: leaves in round 0, with this write
      vm.write(0, p + 1, p + 5);  // never touched, so not round 0's: round 1's
    }
  };
  engine::SenderOptions options;
  options.policy.downtime_target_ms = 0;  // iterate to the cap
  options.policy.no_progress_rounds = 0;
  test::FakeVm* destination = nullptr;
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  INFO(sent.error << " / " << received.stats.error);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(received.stats.verified);
  REQUIRE(sent.round_table.size() == 2);  // nothing dirty after round 1: it stops
  CHECK(sent.round_table[0].dirty_pages == kWritten);
  CHECK(sent.round_table[1].pages_sent == kWritten);
  CHECK(sent.round_table[1].dirty_pages == 0);
  REQUIRE(destination != nullptr);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

// The sender hashes a page before the kernel copies its bytes. A guest that changes the page
// in between, and later changes it back, leaves a page whose hash equals its last send while
// the destination holds the version in between: the unchanged hash must not pass for proof.
TEST_CASE("a page changed while on its way - then changed back - arrives as the guest left it") {
  test::FakeVm source({kPages});
  for (std::uint64_t p = 0; p < kPages; ++p) source.write(0, p, p + 1);  // round 0 sends every page whole
  // The end of round 0's second batch: hashed, then waiting for room in the socket while the
  // relay holds on to the first batch. The other value lands in the same slot of the page.
  constexpr std::uint64_t kBatch = engine::PageSender::kBatchPages, kTorn = 64, kFirstTorn = 2 * kBatch - kTorn;
  constexpr std::uint64_t kOtherValue = 512;
  int batches = 0;
  bool writes_taken = true;  // Catch's assertions are for this thread only
  auto relay = frame_relay([&](int, wire::FrameHeader& h, std::vector<std::byte>&) {
    if (h.type != static_cast<std::uint16_t>(wire::MessageType::page_batch)) return true;
    if (++batches == 1) {
      std::this_thread::sleep_for(200ms);  // the sender hashes the second batch and blocks sending it
      for (std::uint64_t p = kFirstTorn; p < kFirstTorn + kTorn; ++p) writes_taken &= source.write(0, p, p + 1 + kOtherValue);
    } else if (batches == 2) {  // the second batch has crossed, torn: now back as hashed
      for (std::uint64_t p = kFirstTorn; p < kFirstTorn + kTorn; ++p) writes_taken &= source.write(0, p, p + 1);
    }
    return true;
  });
  test::FakeVm* destination = nullptr;
  auto [sent, received] = run_migration(source, &destination, {}, relay);
  CHECK(writes_taken);  // the guest ran until after the second batch
  INFO(sent.error << " / " << received.stats.error);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  REQUIRE(received.stats.status == engine::MigrationStatus::completed);
  CHECK(sent.verified);
  REQUIRE(destination != nullptr);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("offline migration pauses first and copies once") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.offline = true;
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.rounds == 1);
  CHECK(sent.round_table.empty());
  CHECK(sent.stop_reason == engine::StopReason::offline);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("a page corrupted in flight fails verification and the source resumes") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  bool corrupted = false;
  auto relay = frame_relay([&](int, wire::FrameHeader& header, std::vector<std::byte>& payload) {
    const bool has_page_data = header.type == static_cast<std::uint16_t>(wire::MessageType::page_batch) &&
                               payload.size() > sizeof(wire::BatchHeader) + 256 * sizeof(wire::PageDescriptor);
    if (has_page_data && !corrupted) {
      payload.back() ^= std::byte{0x40};
      corrupted = true;
    }
    return true;
  });
  auto [sent, received] = run_migration(source, &destination, engine::SenderOptions{}, relay);
  REQUIRE(corrupted);
  CHECK(received.stats.status == engine::MigrationStatus::failed);
  CHECK_THAT(received.stats.error, Contains("verification failed"));
  CHECK(received.vm == nullptr);
  CHECK(sent.status == engine::MigrationStatus::failed);
  CHECK_THAT(sent.error, Contains("verification failed"));
  CHECK_FALSE(source.paused());
  CHECK(source.pauses == source.resumes);
}

TEST_CASE("a connection lost at any point before the handoff leaves the source running") {
  // Cut before the Hello, the first page batch, a later one, the state, and the Complete.
  using T = wire::MessageType;
  for (auto [type, nth] : std::vector<std::pair<T, int>>{{T::hello, 0}, {T::page_batch, 0}, {T::page_batch, 3},
                                                          {T::state_section, 0}, {T::complete, 0}}) {
    test::FakeVm source({kPages});
    fill(source, kPages);
    test::FakeVm* destination = nullptr;
    int seen = 0;
    auto relay = frame_relay([&, type = type, nth = nth](int, wire::FrameHeader& h, std::vector<std::byte>&) {
      return !(h.type == static_cast<std::uint16_t>(type) && seen++ == nth);
    });
    const int cut_at = static_cast<int>(type) * 10 + nth;
    auto [sent, received] = run_migration(source, &destination, engine::SenderOptions{}, relay);
    INFO("cut at frame " << cut_at << ": " << sent.error);
    CHECK(sent.status == engine::MigrationStatus::failed);
    CHECK_FALSE(sent.error.empty());
    CHECK(received.stats.status == engine::MigrationStatus::failed);
    CHECK_FALSE(source.paused());
  }
}

TEST_CASE("a connection lost after Commit leaves the guest in at most one place") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  auto [sent, received] = run_migration(source, &destination, engine::SenderOptions{}, drop(wire::MessageType::commit));
  // The source cannot know whether Commit arrived, so it must not resume; here it did not
  // arrive, so the destination must not run either.
  CHECK(sent.status == engine::MigrationStatus::handoff_unknown);
  CHECK(source.paused());
  CHECK(received.stats.status == engine::MigrationStatus::failed);
  CHECK(received.vm == nullptr);
}

TEST_CASE("a destination that resumed keeps the guest even when Running cannot be sent") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  auto relay = deafen_after(wire::MessageType::commit);
  auto [sent, received] = run_migration(source, &destination, engine::SenderOptions{}, relay);
  // The source cannot tell; the destination resumed, and owns the guest from then on.
  CHECK(sent.status == engine::MigrationStatus::handoff_unknown);
  CHECK(source.paused());
  CHECK(received.stats.status == engine::MigrationStatus::completed);
  REQUIRE(received.vm != nullptr);
  CHECK_FALSE(destination->paused());
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("no progress with --on-no-convergence=abort gives up and resumes") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.policy.on_no_convergence = engine::NoConvergence::abort;
  options.policy.downtime_target_ms = 0;  // never converges
  options.policy.no_progress_rounds = 2;
  source.thrash = true;  // every round finds every page dirty again
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  CHECK(sent.status == engine::MigrationStatus::failed);
  CHECK_THAT(sent.error, Contains("no progress"));
  CHECK_FALSE(source.paused());
}

TEST_CASE("auto-converge throttles a thrashing guest step by step until it calms down") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.thrash = true;
  source.throttle_calms_at = 0.5;
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.policy.downtime_target_ms = 0;  // only an empty dirty set converges
  options.policy.throttle_above_ms = 0;
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.stop_reason == engine::StopReason::converged);
  REQUIRE(source.throttles.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) CHECK(source.throttles[i] == Approx(0.2 + 0.1 * static_cast<double>(i)));
  CHECK(sent.round_table.back().throttle_pct == 50);
  REQUIRE(destination != nullptr);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("auto-converge at its maximum: a guest still stuck is given up on - and runs unthrottled") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.thrash = true;
  source.throttle_calms_at = 2.0;  // never
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.policy.downtime_target_ms = 0;
  options.policy.throttle_above_ms = 0;
  options.policy.no_progress_rounds = 2;
  options.policy.on_no_convergence = engine::NoConvergence::abort;
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  CHECK(sent.status == engine::MigrationStatus::failed);
  CHECK_THAT(sent.error, Contains("no progress"));
  REQUIRE(source.throttles.size() == 10);  // 20 % to 90 % by tens, 99 %, then off again
  CHECK(source.throttles[8] == Approx(0.99));  // the VM is told a share
  CHECK(source.throttles.back() == 0);
  CHECK_FALSE(source.paused());
}

TEST_CASE("dirty-limit caps the vCPUs of a guest that outruns the link - and never throttles them") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.thrash = true;
  source.dirty_limit_calms_at = 1e6;
  source.throttle_calms_at = 0.2;  // a throttle would calm it too: dirty-limit must not ask for one
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.policy.downtime_target_ms = 0;  // only an empty dirty set converges
  options.policy_plugin = engine::PolicyRegistry::global().make("dirty-limit");
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.stop_reason == engine::StopReason::converged);
  CHECK(source.dirty_limits == std::vector<double>{1e6});  // QEMU's vcpu-dirty-limit, 1 MB/s
  CHECK(source.throttles.empty());
  CHECK(sent.round_table.front().dirty_limit_MBps == 0);
  CHECK(sent.round_table.back().dirty_limit_MBps == 1);
  REQUIRE(destination != nullptr);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("a migration that fails lifts the dirty limit before the guest runs on - and a VM that cannot take one runs to the round limit") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.thrash = true;
  source.dirty_limit_calms_at = 0;  // held, but never calmed
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.policy_plugin = engine::PolicyRegistry::global().make("dirty-limit:limit=2");
  options.policy.downtime_target_ms = 0;
  options.policy.max_rounds = 4;
  auto [sent, received] = run_migration(source, &destination, options, drop(wire::MessageType::complete));
  CHECK(sent.status == engine::MigrationStatus::failed);
  CHECK(source.dirty_limits == std::vector<double>{2e6, 0});
  CHECK_FALSE(source.paused());

  test::FakeVm unlimited({kPages});
  fill(unlimited, kPages);
  unlimited.thrash = true;
  auto [ran, arrived] = run_migration(unlimited, &destination, options, pass_through());
  CHECK(ran.status == engine::MigrationStatus::completed);
  CHECK(ran.stop_reason == engine::StopReason::max_rounds);
  CHECK(ran.round_table.back().dirty_limit_MBps == 0);
}

TEST_CASE("the receiver refuses malformed streams with a reason") {
  auto run = [](auto send_bad_stream) {
    auto [sender_end, receiver_end] = test::stream_pair();
    test::FakeVm* destination = nullptr;
    auto receiver = std::async(std::launch::async, [&, s = std::move(receiver_end)]() mutable {
      return engine::IncomingMigration(s, test::fake_factory(&destination), engine::ReceiverOptions{1000ms, 100ms, {}, {}}).run();
    });
    try {
      send_bad_stream(sender_end);
    } catch (const std::exception&) {
    }
    sender_end = transport::Stream(UniqueFd());
    return receiver.get().stats;
  };
  wire::Hello hello;
  hello.vcpus = 1;
  hello.regions = {{0, kPages * engine::kPageSize}};
  auto batch = [](std::uint32_t round, std::uint64_t addr) {
    std::vector<std::byte> payload(sizeof(wire::BatchHeader) + sizeof(wire::PageDescriptor) + engine::kPageSize);
    const wire::BatchHeader h{round, 1, 0, 0};
    wire::PageDescriptor d;
    d.guest_addr = addr;
    d.encoding = wire::PageEncoding::raw;
    d.length = engine::kPageSize;
    std::memcpy(payload.data(), &h, sizeof h);
    std::memcpy(payload.data() + sizeof h, &d, sizeof d);
    return payload;
  };
  auto send_hello_then = [&](auto rest) {
    return [&, rest](transport::Stream& s) {
      s.send(hello);
      s.receive<wire::HelloAck>();
      rest(s);
    };
  };

  SECTION("garbage instead of a frame") {
    auto stats = run([](transport::Stream& s) {
      const char junk[] = "GET / HTTP/1.1\r\n\r\n";
      ::send(s.fd(), junk, sizeof junk, MSG_NOSIGNAL);
    });
    CHECK_THAT(stats.error, Contains("not a mig stream"));
  }
  SECTION("wrong protocol version") {
    auto stats = run([&](transport::Stream& s) {
      auto h = hello;
      h.version = 7;
      s.send(h);
    });
    CHECK_THAT(stats.error, Contains("version 7"));
  }
  SECTION("a stream that stops mid-frame") {
    auto stats = run(send_hello_then([&](transport::Stream& s) {
      const auto payload = batch(0, 0);
      wire::FrameHeader h{wire::kMagic, static_cast<std::uint16_t>(wire::MessageType::page_batch), 0, payload.size()};
      ::send(s.fd(), &h, sizeof h, MSG_NOSIGNAL);
      ::send(s.fd(), payload.data(), 100, MSG_NOSIGNAL);
    }));
    CHECK_THAT(stats.error, Contains("closed the connection"));
  }
  SECTION("a page outside guest memory") {
    auto stats = run(send_hello_then([&](transport::Stream& s) {
      s.send_frame(wire::MessageType::page_batch, batch(0, kPages * engine::kPageSize));
    }));
    CHECK_THAT(stats.error, Contains("outside guest memory"));
  }
  SECTION("a page at an address that wraps around") {
    auto stats = run(send_hello_then([&](transport::Stream& s) {
      s.send_frame(wire::MessageType::page_batch, batch(0, ~0ull & ~4095ull));
    }));
    CHECK_THAT(stats.error, Contains("outside guest memory"));
  }
  SECTION("a round older than one already applied") {
    auto stats = run(send_hello_then([&](transport::Stream& s) {
      s.send_frame(wire::MessageType::page_batch, batch(3, 0));
      s.send_frame(wire::MessageType::page_batch, batch(2, 0));
    }));
    CHECK_THAT(stats.error, Contains("after round 3"));
  }
  SECTION("a batch whose length disagrees with its descriptors") {
    auto stats = run(send_hello_then([&](transport::Stream& s) {
      auto payload = batch(0, 0);
      payload.resize(payload.size() + 4096);
      s.send_frame(wire::MessageType::page_batch, payload);
    }));
    CHECK_THAT(stats.error, Contains("disagrees"));
  }
  SECTION("a message out of place") {
    auto stats = run(send_hello_then([&](transport::Stream& s) { s.send(wire::Commit{}); }));
    CHECK_THAT(stats.error, Contains("unexpected Commit while receiving pages"));
  }
}

TEST_CASE("compressed batches arrive intact - and incompressible memory is mostly not tried") {
  test::FakeVm source({kPages});
  // Compressible: pages of repeated text.
  for (std::uint64_t p = 0; p < kPages / 2; ++p) {
    auto* page = source.region_memory(0).data() + p * engine::kPageSize;
    for (std::size_t i = 0; i < engine::kPageSize; ++i) page[i] = static_cast<std::byte>("migration "[i % 10]);
    source.write(0, p, p + 1);
  }
  // Incompressible: random pages.
  std::mt19937_64 rng(3);
  for (std::uint64_t p = kPages / 2; p < kPages; ++p) {
    auto* page = reinterpret_cast<std::uint64_t*>(source.region_memory(0).data() + p * engine::kPageSize);
    for (std::size_t i = 0; i < engine::kPageSize / 8; ++i) page[i] = rng();
    source.write(0, p, p + 1);
  }
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.compress_level = 1;
  options.offline = true;
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(received.stats.verified);
  CHECK(destination->region_memory(0) == source.region_memory(0));
  // 8 batches of text compress; the 8 random ones are tried only on the 1st, 3rd and 6th.
  CHECK(sent.batches_compressed == 8);
  CHECK(sent.bytes_sent < kPages * engine::kPageSize * 6 / 10);
}

TEST_CASE("a corrupt compressed batch is refused") {
  test::FakeVm source({kPages});
  for (std::uint64_t p = 0; p < 256; ++p) source.write(0, p, 1);  // mostly zero pages: compressible
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.compress_level = 1;
  auto relay = frame_relay([](int, wire::FrameHeader& header, std::vector<std::byte>& payload) {
    if (header.type == static_cast<std::uint16_t>(wire::MessageType::page_batch)) payload.back() ^= std::byte{0xff};
    return true;
  });
  auto [sent, received] = run_migration(source, &destination, options, relay);
  CHECK(received.stats.status == engine::MigrationStatus::failed);
  CHECK_THAT(received.stats.error, Contains("compressed page batch"));
  CHECK(sent.status == engine::MigrationStatus::failed);
  CHECK_FALSE(source.paused());
}

TEST_CASE("delta-encoded rounds leave the destination equal to the source") {
  for (bool compress : {false, true}) {
    INFO("compress " << compress);
    test::FakeVm source({kPages});
    fill(source, kPages);
    test::FakeVm* destination = nullptr;
    engine::SenderOptions options;
    options.delta_cache_pages = 1024;
    options.compress_level = compress ? 1 : 0;
    options.policy.downtime_target_ms = 0;  // keep iterating to the cap: many resends, many deltas
    options.policy.no_progress_rounds = 0;
    options.policy.max_rounds = 12;
    // Each round, one 8-byte word changes in each of 64 hot pages, and one of them goes back
    // to zero (its cached version must follow, or the next delta would be wrong).
    // A different page each round goes to zero, and the next round brings its old contents
    // back with one word changed: a delta against a stale cached version would then leave
    // the receiver's zero page wrong everywhere but that word.
    std::uint64_t value = 1, round = 0, restore = ~0ull;
    std::vector<std::byte> saved(engine::kPageSize);
    source.before_fetch = [&](test::FakeVm& vm) {
      if (vm.paused()) return;
      auto page_bytes = [&vm](std::uint64_t page) { return vm.region_memory(0).data() + page * engine::kPageSize; };
      if (restore != ~0ull) {
        std::memcpy(page_bytes(restore), saved.data(), engine::kPageSize);
        vm.write(0, restore, value++);
      }
      for (std::uint64_t p = 0; p < 64; ++p) vm.write(0, p * 3, value++);
      restore = (round++ % 64) * 3;
      std::memcpy(saved.data(), page_bytes(restore), engine::kPageSize);
      std::memset(page_bytes(restore), 0, engine::kPageSize);
      vm.write(0, restore, 0);
    };
    auto [sent, received] = run_migration(source, &destination, options, pass_through());
    INFO(sent.error << " / " << received.stats.error);
    REQUIRE(sent.status == engine::MigrationStatus::completed);
    CHECK(received.stats.verified);
    INFO("rounds " << sent.rounds << " stop " << engine::to_string(sent.stop_reason) << " pages " << sent.pages_sent << " delta " << sent.pages_delta << " skipped " << sent.pages_skipped);
    CHECK(sent.pages_delta >= 64 * 9);  // every hot page, in every round after its first resend
    CHECK(destination->region_memory(0) == source.region_memory(0));
  }
}

TEST_CASE("parallel channels deliver every page - in round order - with deltas and compression") {
  // Socketpairs stand in for connections: the sender's open_channel hands the far end to
  // the receiver's accept_channel.
  test::Connections connections;
  engine::SenderOptions options;
  options.channels = 4;
  options.open_channel = [&] { return connections.open(); };
  options.delta_cache_pages = 1024;
  options.compress_level = 1;
  options.policy.downtime_target_ms = 0;
  options.policy.no_progress_rounds = 0;
  options.policy.max_rounds = 8;
  test::FakeVm source({kPages, 1024});
  fill(source, kPages);
  std::uint64_t value = 1;
  source.before_fetch = [&value](test::FakeVm& vm) {
    for (std::uint64_t p = 0; p < kPages; p += 37) vm.write(0, p, value++);
  };

  auto [send_end, recv_end] = test::stream_pair();
  test::FakeVm* destination = nullptr;
  auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
    engine::ReceiverOptions receiver_options{2000ms, 100ms, {}, {}};
    receiver_options.accept_channel = [&](std::chrono::milliseconds timeout) { return connections.accept(timeout); };
    return engine::IncomingMigration(s, test::fake_factory(&destination), receiver_options).run();
  });
  auto sent = engine::SourceMigration(source, send_end, options).run();
  auto received = receiver.get();
  INFO(sent.error << " / " << received.stats.error);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.channels == 4);
  CHECK(received.stats.channels == 4);
  CHECK(received.stats.verified);
  CHECK(sent.pages_delta > 0);
  CHECK(sent.extra_channel_bytes > sent.bytes_sent / 2);  // most pages went on channels 1-3
  CHECK(destination->region_memory(0) == source.region_memory(0));
  CHECK(destination->region_memory(1) == source.region_memory(1));
}

TEST_CASE("a receiver without extra connections makes the sender fall back to one channel") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.channels = 4;
  options.open_channel = [] () -> transport::Stream { throw std::logic_error("must not be called"); };
  auto [sent, received] = run_migration(source, &destination, options, pass_through());
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.channels == 1);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("with zero-page skipping off - every page crosses the wire") {
  test::FakeVm source({kPages, 100});  // 100 pages: a partial last bitmap word
  fill(source, kPages);                // a third of region 0 touched, region 1 untouched
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.offline = true;
  auto skipping = run_migration(source, &destination, options, pass_through());
  REQUIRE(skipping.first.status == engine::MigrationStatus::completed);
  CHECK(skipping.first.pages_sent < kPages / 2);
  options.skip_zero_pages = false;
  auto all = run_migration(source, &destination, options, pass_through());
  REQUIRE(all.first.status == engine::MigrationStatus::completed);
  CHECK(all.first.pages_sent == kPages + 100);
  CHECK(all.first.pages_skipped == 0);
  CHECK(destination->region_memory(0) == source.region_memory(0));
  CHECK(destination->region_memory(1) == source.region_memory(1));
}

TEST_CASE("a receiver whose extra channels never connect gives up within its timeout") {
  // The sender asks for 3 channels and then opens none of them.
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"));
  auto receiver = std::async(std::launch::async, [&] {
    auto stream = listener.accept(2000ms);
    engine::ReceiverOptions options{300ms, 100ms, {}, {}};
    options.accept_channel = [&](std::chrono::milliseconds timeout) { return listener.accept(timeout); };
    test::FakeVm* made = nullptr;
    return engine::IncomingMigration(stream, test::fake_factory(&made), options).run();
  });
  auto stream = transport::connect(transport::Endpoint::parse(listener.endpoint()));
  wire::Hello hello;
  hello.vcpus = 1;
  hello.channels = 3;
  hello.regions = {{0, kPages * engine::kPageSize}};
  stream.send(hello);
  stream.receive<wire::HelloAck>();
  const auto started = std::chrono::steady_clock::now();
  const auto result = receiver.get();
  CHECK(result.stats.status == engine::MigrationStatus::failed);
  CHECK_THAT(result.stats.error, Contains("nobody connected"));
  CHECK(std::chrono::steady_clock::now() - started < 2s);
}

namespace {

// A sparse raw image of `size` with `data` bytes of pattern at `offset` (cache=writeback: the
// test's buffers are not aligned for direct I/O).
std::string make_image(const std::string& name, std::uint64_t size, std::uint64_t offset = 0, std::uint64_t data = 0) {
  const std::string path = "/tmp/mig-engine-test-" + std::to_string(::getpid()) + "-" + name;
  std::remove(path.c_str());
  auto image = kvm::DiskImage::open({path, kvm::ImageFormat::raw, kvm::CacheMode::writeback}, kvm::DiskImage::Open::create, size);
  std::vector<std::byte> bytes(data);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>(i * 7 + 1);
  if (data) image->write(offset, bytes);
  return path;
}

kvm::DiskConfig writeback(const std::string& path) { return {path, kvm::ImageFormat::raw, kvm::CacheMode::writeback}; }

}  // namespace

TEST_CASE("shared storage: the image's lock changes hands at the switchover - or stays with a source that fails") {
  using T = wire::MessageType;
  const auto path = make_image("shared.img", 4 << 20, 1 << 20, 64 << 10);
  // Whoever opens the image while the source holds it can open it, but not lock it.
  auto destination_image = [&](const engine::VmShape::Disk& d) {
    CHECK(d.source_path == path);
    CHECK_FALSE(d.copy);
    return kvm::DiskImage::open(writeback(d.source_path), kvm::DiskImage::Open::existing_unlocked);
  };
  SECTION("completed: the destination holds it, the source does not") {
    test::FakeVm source({kPages});
    source.disk_list.push_back(std::make_unique<test::ImageDisk>(kvm::DiskImage::open(writeback(path))));
    test::FakeVm* destination = nullptr;
    auto [sent, received] = run_migration(source, &destination, engine::SenderOptions{}, pass_through(), destination_image);
    REQUIRE(sent.status == engine::MigrationStatus::completed);
    REQUIRE(received.vm);
    CHECK_THROWS_WITH(source.disk_list[0]->reacquire(), Contains("locked by another process"));
    received.vm.reset();  // the destination goes: so does its lock
    CHECK_FALSE(kvm::DiskImage::locked_elsewhere(path));
    REQUIRE(sent.disk);
    CHECK_FALSE(sent.disk->copied);
  }
  SECTION("failed at any stage before the commit: the source has it back, the destination never kept it") {
    for (auto [type, nth] : std::vector<std::pair<T, int>>{{T::hello, 0}, {T::page_batch, 0}, {T::state_section, 0},
                                                            {T::complete, 0}, {T::commit, 0}}) {
      test::FakeVm source({kPages});
      fill(source, kPages);
      source.disk_list.push_back(std::make_unique<test::ImageDisk>(kvm::DiskImage::open(writeback(path))));
      test::FakeVm* destination = nullptr;
      int seen = 0;
      auto relay = frame_relay([&, type = type, nth = nth](int, wire::FrameHeader& h, std::vector<std::byte>&) {
        return !(h.type == static_cast<std::uint16_t>(type) && seen++ == nth);
      });
      auto [sent, received] = run_migration(source, &destination, engine::SenderOptions{}, relay, destination_image);
      INFO("cut at " << wire::to_string(type) << ": " << sent.error);
      CHECK(received.vm == nullptr);
      if (type == T::commit) {
        // The source cannot know whether the destination runs the guest: it stays paused and
        // keeps its hands off the image.
        CHECK(sent.status == engine::MigrationStatus::handoff_unknown);
        CHECK_FALSE(kvm::DiskImage::locked_elsewhere(path));
        continue;
      }
      CHECK(sent.status == engine::MigrationStatus::failed);
      CHECK_FALSE(source.paused());
      // The source holds the lock again: a third party cannot take it.
      CHECK_THROWS_WITH(kvm::DiskImage::open(writeback(path)), Contains("locked by another process"));
    }
  }
  std::remove(path.c_str());
}

TEST_CASE("copy-storage: chunks the guest writes during the rounds arrive - holes stay holes - and the digest verifies") {
  const std::uint64_t size = 64ull << 20;
  const auto source_path = make_image("copy-src.img", size, 8 << 20, 4 << 20);
  const auto destination_path = "/tmp/mig-engine-test-" + std::to_string(::getpid()) + "-copy-dst.img";
  std::remove(destination_path.c_str());
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.disk_list.push_back(std::make_unique<test::ImageDisk>(kvm::DiskImage::open(writeback(source_path))));
  auto& disk = *source.disk_list[0];
  // Each fetch of the dirty log is a round boundary: the guest writes a few blocks, one of
  // them into a hole, one all zeros over data.
  int round = 0;
  source.before_fetch = [&](test::FakeVm&) {
    std::vector<std::byte> block(16 << 10, static_cast<std::byte>(0x40 + round));
    disk.guest_write((20ull << 20) + static_cast<std::uint64_t>(round) * (1 << 20), block);
    disk.guest_write((8ull << 20) + static_cast<std::uint64_t>(round % 3) * (64 << 10), std::vector<std::byte>(64 << 10));
    ++round;
  };
  test::FakeVm* destination = nullptr;
  engine::SenderOptions options;
  options.copy_storage = true;
  options.policy.max_rounds = 4;
  auto [sent, received] = run_migration(source, &destination, options, pass_through(), [&](const engine::VmShape::Disk& d) {
    CHECK(d.copy);
    return kvm::DiskImage::open(writeback(destination_path), kvm::DiskImage::Open::create, d.size);
  });
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  REQUIRE(received.stats.status == engine::MigrationStatus::completed);
  REQUIRE(sent.disk);
  CHECK(sent.disk->verified);
  CHECK(sent.disk->remaining_bytes == 0);
  CHECK(sent.disk->zero_bytes > 0);
  CHECK(round >= 2);
  // Round 0 moved the 4 MiB of data, not the 64 MiB disk; later rounds the written chunks.
  CHECK(sent.disk->processed_bytes < (4u << 20) + static_cast<std::uint64_t>(round) * (256 << 10));
  received.vm.reset();
  CHECK(test::file_contents(destination_path) == test::file_contents(source_path));
  auto copy = kvm::DiskImage::open(writeback(destination_path));
  CHECK(copy->allocated_bytes() <= disk.image().allocated_bytes() * 105 / 100);
  std::remove(source_path.c_str());
  std::remove(destination_path.c_str());
}

TEST_CASE("copy-storage: a disk chunk corrupted in flight fails verification - and a chunk outside the disk is refused") {
  const auto source_path = make_image("bad-src.img", 4 << 20, 0, 1 << 20);
  const auto destination_path = "/tmp/mig-engine-test-" + std::to_string(::getpid()) + "-bad-dst.img";
  for (const bool outside : {false, true}) {
    std::remove(destination_path.c_str());
    test::FakeVm source({kPages});
    source.disk_list.push_back(std::make_unique<test::ImageDisk>(kvm::DiskImage::open(writeback(source_path))));
    test::FakeVm* destination = nullptr;
    engine::SenderOptions options;
    options.copy_storage = true;
    auto relay = frame_relay([outside](int, wire::FrameHeader& h, std::vector<std::byte>& payload) {
      if (h.type == static_cast<std::uint16_t>(wire::MessageType::disk_data)) {
        if (outside) payload[4] = std::byte{0x7f};  // the offset's low byte: no longer a chunk boundary
        else payload.back() ^= std::byte{1};
      }
      return true;
    });
    auto [sent, received] = run_migration(source, &destination, options, relay, [&](const engine::VmShape::Disk& d) {
      return kvm::DiskImage::open(writeback(destination_path), kvm::DiskImage::Open::create, d.size);
    });
    CHECK(sent.status == engine::MigrationStatus::failed);
    CHECK_FALSE(source.paused());
    CHECK_THAT(received.stats.error, Contains(outside ? "not in whole chunks" : "disk contents differ"));
  }
  std::remove(source_path.c_str());
  std::remove(destination_path.c_str());
}

namespace {

// A receiver taking one migration on `listener`, which also gives it its channels.
std::future<engine::IncomingResult> receive_on(transport::Listener& listener, test::FakeVm** destination) {
  return std::async(std::launch::async, [&listener, destination] {
    auto stream = listener.accept(2000ms);
    engine::ReceiverOptions options{2000ms, 100ms, {}, {}};
    options.accept_channel = [&listener](std::chrono::milliseconds timeout) { return listener.accept(timeout); };
    return engine::IncomingMigration(stream, test::fake_factory(destination), options).run();
  });
}

}  // namespace

TEST_CASE("strangers that connect while a receiver accepts its channels are turned away - the migration goes on") {
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"));
  const auto endpoint = transport::Endpoint::parse(listener.endpoint());
  test::FakeVm source({kPages});
  fill(source, kPages);
  std::vector<transport::Stream> strangers;
  engine::SenderOptions options;
  options.channels = 3;
  // Ahead of the first real channel: another migration's channel, and a source that thinks
  // the port is free for a migration of its own.
  options.open_channel = [&] {
    if (strangers.empty()) {
      strangers.push_back(transport::connect(endpoint));
      strangers.back().send(wire::ChannelHello{0x5eed, 1});
      strangers.push_back(transport::connect(endpoint));
      strangers.back().send(wire::Hello{});
    }
    return transport::connect(endpoint);
  };
  test::FakeVm* destination = nullptr;
  auto receiver = receive_on(listener, &destination);
  auto main = transport::connect(endpoint);
  const auto sent = engine::SourceMigration(source, main, options).run();
  const auto received = receiver.get();
  INFO(sent.error << " / " << received.stats.error);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(received.stats.channels == 3);
  CHECK(destination->region_memory(0) == source.region_memory(0));
  CHECK(strangers.size() == 2);
}

TEST_CASE("a second source during a migration is refused at once, in one line - and the first migration completes") {
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"));
  const auto endpoint = transport::Endpoint::parse(listener.endpoint());
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  auto receiver = receive_on(listener, &destination);
  // The first source, slowed so that its migration lasts about a second.
  engine::SenderOptions options;
  options.bandwidth_limit = 4 << 20;
  auto main = transport::connect(endpoint);
  auto first = std::async(std::launch::async, [&] { return engine::SourceMigration(source, main, options).run(); });
  std::this_thread::sleep_for(300ms);

  test::FakeVm other({kPages});
  auto second = transport::connect(endpoint);
  const auto asked = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(engine::check_destination(other, second, engine::SenderOptions{}), Contains("this receiver is taking another migration"));
  CHECK(std::chrono::steady_clock::now() - asked < 500ms);  // not after the first migration, not after a timeout
  CHECK(first.wait_for(0s) == std::future_status::timeout);   // which goes on meanwhile

  const auto sent = first.get();
  const auto received = receiver.get();
  INFO(sent.error << " / " << received.stats.error);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("a guest larger than the receiver's limits is refused at its Hello - before anything is built") {
  for (const auto& [vcpus, pages, expected] : {std::tuple{1u, kPages * 2, "--max-mem"}, std::tuple{9u, kPages, "--max-vcpus"}}) {
    auto [send_end, recv_end] = test::stream_pair();
    test::FakeVm* made = nullptr;
    auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
      engine::ReceiverOptions options{2000ms, 100ms, {}, {}};
      options.max_guest_bytes = kPages * engine::kPageSize;
      options.max_vcpus = 8;
      return engine::IncomingMigration(s, test::fake_factory(&made), options).run();
    });
    wire::Hello hello;
    hello.vcpus = vcpus;
    hello.regions = {{0, pages * engine::kPageSize}};
    send_end.send(hello);
    CHECK_THROWS_WITH(send_end.receive<wire::HelloAck>(), Contains(expected));
    const auto result = receiver.get();
    CHECK(result.stats.status == engine::MigrationStatus::failed);
    CHECK(made == nullptr);
  }
}

namespace {

// A migration whose main connection goes through `relay`, with reconnections (a source asking
// again after Commit) over socketpairs; the receiver then answers such questions as the
// control plane has it do.
template <typename Relay>
std::pair<engine::MigrationStats, engine::IncomingResult> run_reconnectable(test::FakeVm& source, test::FakeVm** destination,
                                                                           Relay relay, bool source_asks_again = true) {
  test::Connections connections;
  engine::SenderOptions options;
  options.peer_timeout = 500ms;
  options.handoff_retry = 1500ms;
  if (source_asks_again) options.open_channel = [&] { return connections.open(); };
  auto [send_end, relay_in] = test::stream_pair();
  auto [relay_out, recv_end] = test::stream_pair();
  auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
    engine::ReceiverOptions receiver_options{500ms, 100ms, {}, {}};
    receiver_options.handoff_grace = 2000ms;
    receiver_options.accept_channel = [&](std::chrono::milliseconds timeout) { return connections.accept(timeout); };
    engine::IncomingMigration migration(s, test::fake_factory(destination), receiver_options);
    auto result = migration.run();
    migration.answer_commit_retries();
    return result;
  });
  auto relay_thread = std::async(std::launch::async, [&, in = std::move(relay_in), out = std::move(relay_out)]() mutable {
    relay(in, out);
  });
  auto stats = engine::SourceMigration(source, send_end, options).run();
  send_end = transport::Stream(UniqueFd());
  relay_thread.get();
  return {stats, receiver.get()};
}

}  // namespace

TEST_CASE("Commit lost: the destination keeps the guest paused, the source asks again, and the guest runs at the destination") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  auto [sent, received] = run_reconnectable(source, &destination, drop(wire::MessageType::commit));
  INFO(sent.error << " / " << received.stats.error);
  CHECK(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.commit_retried);
  CHECK(source.paused());  // for good: the guest left
  REQUIRE(received.stats.status == engine::MigrationStatus::completed);
  CHECK(received.stats.commit_retried);
  REQUIRE(received.vm != nullptr);
  CHECK_FALSE(destination->paused());
  CHECK(destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("Running lost: the source asks again and hears from the destination that the guest runs there") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  auto [sent, received] = run_reconnectable(source, &destination, deafen_after(wire::MessageType::commit));
  INFO(sent.error << " / " << received.stats.error);
  CHECK(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.commit_retried);
  CHECK(source.paused());
  REQUIRE(received.stats.status == engine::MigrationStatus::completed);
  CHECK_FALSE(received.stats.commit_retried);  // Commit itself arrived
  CHECK_FALSE(destination->paused());
}

TEST_CASE("Commit lost and the source never asks again: the destination discards after its grace period - the source holds the guest") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  test::FakeVm* destination = nullptr;
  const auto start = std::chrono::steady_clock::now();
  auto [sent, received] = run_reconnectable(source, &destination, drop(wire::MessageType::commit), false);
  CHECK(sent.status == engine::MigrationStatus::handoff_unknown);
  CHECK(source.paused());
  CHECK(received.stats.status == engine::MigrationStatus::failed);
  CHECK_THAT(received.stats.error, Contains("the source holds it"));
  CHECK(received.vm == nullptr);
  CHECK(std::chrono::steady_clock::now() - start >= 2000ms);  // it waited out its grace period first
}

namespace {

// A migration to a receiver whose pre-flight checks (set by `refuse`) turn the guest away at
// Hello: nothing may have moved or been built, and the source runs on. Returns the source's error.
std::string refused_at_hello(test::FakeVm& source, const std::function<void(engine::ReceiverOptions&)>& refuse) {
  auto [send_end, recv_end] = test::stream_pair();
  test::FakeVm* made = nullptr;
  auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
    engine::ReceiverOptions options{2000ms, 100ms, {}, {}};
    refuse(options);
    return engine::IncomingMigration(s, test::fake_factory(&made), options).run();
  });
  const auto sent = engine::SourceMigration(source, send_end, engine::SenderOptions{}).run();
  const auto received = receiver.get();
  CHECK(sent.status == engine::MigrationStatus::failed);
  CHECK(sent.pages_sent == 0);
  CHECK_FALSE(source.paused());
  CHECK(made == nullptr);
  CHECK(received.stats.status == engine::MigrationStatus::failed);
  return sent.error;
}

}  // namespace

TEST_CASE("a destination that cannot give the guest its CPU refuses at Hello, naming what it lacks - before any page") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.cpuid = {{7, 0, 0, 1u << 16, 0, 0}};
  std::vector<wire::CpuidLeaf> asked;
  const auto error = refused_at_hello(source, [&](engine::ReceiverOptions& options) {
    options.missing_cpu_features = [&](const std::vector<wire::CpuidLeaf>& guest) {
      asked = guest;
      return std::vector<std::string>{"AVX-512F", "XSAVE state AVX-512 opmask"};
    };
  });
  CHECK(asked == source.cpuid);
  CHECK_THAT(error, Contains("destination CPU lacks AVX-512F, XSAVE state AVX-512 opmask, which the guest was given"));
}

TEST_CASE("a destination that cannot run the guest's TSC at its rate refuses at Hello, naming both rates") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.tsc_khz = 2'100'000;
  std::uint32_t asked = 0;
  const auto error = refused_at_hello(source, [&](engine::ReceiverOptions& options) {
    options.tsc_refusal = [&](std::uint32_t guest_khz) {
      asked = guest_khz;
      return kvm::plan_tsc(guest_khz, 3'000'000, false).reason;
    };
  });
  CHECK(asked == 2'100'000);
  CHECK_THAT(error, Contains("the guest's TSC runs at 2100000 kHz, this host's at 3000000 kHz, and this host cannot scale it"));
}

TEST_CASE("a dry run asks the destination and changes nothing: yes, or no with its reason") {
  test::FakeVm source({kPages});
  fill(source, kPages);
  source.cpuid = {{7, 0, 0, 1u << 16, 0, 0}};
  for (const bool lacking : {false, true}) {
    INFO((lacking ? "the destination lacks a CPU feature" : "the destination has everything"));
    auto [send_end, recv_end] = test::stream_pair();
    test::FakeVm* made = nullptr;
    bool told_dry_run = false;
    auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
      engine::ReceiverOptions options{2000ms, 100ms, {}, {}};
      options.missing_cpu_features = [&](const std::vector<wire::CpuidLeaf>&) {
        return lacking ? std::vector<std::string>{"AVX-512F"} : std::vector<std::string>{};
      };
      options.hello_received = [&](bool dry_run) { told_dry_run = dry_run; };
      return engine::IncomingMigration(s, test::fake_factory(&made), options).run();
    });
    if (lacking)
      CHECK_THROWS_WITH(engine::check_destination(source, send_end, engine::SenderOptions{}), Contains("destination CPU lacks AVX-512F"));
    else
      CHECK_NOTHROW(engine::check_destination(source, send_end, engine::SenderOptions{}));
    const auto received = receiver.get();
    CHECK(received.stats.dry_run);
    CHECK(told_dry_run);
    CHECK(received.stats.status == (lacking ? engine::MigrationStatus::failed : engine::MigrationStatus::completed));
    CHECK(received.vm == nullptr);
    CHECK(made == nullptr);  // nothing was built
    CHECK(received.stats.pages_received == 0);
    CHECK(source.pauses == 0);
    CHECK_FALSE(source.paused());
  }
}

TEST_CASE("a dry run also asks for the migration's channels, post-copy and hand-over - and says what the destination would take") {
  test::FakeVm source({kPages});
  // Memory a same-host hand-over could take: to a dry run only the offer matters.
  const UniqueFd memory(::memfd_create("dry-run-guest", MFD_CLOEXEC));
  REQUIRE(memory.get() >= 0);
  source.memory_fds = {memory.get()};
  engine::SenderOptions asking;
  asking.channels = 4;
  asking.postcopy = true;
  struct Case {
    const char* what;
    bool takes_channels, autostart, takes_memory;
    std::optional<engine::DestinationCheck> expected;  // none: refused for post-copy, saying `why`
    const char* why;
  };
  const Case cases[] = {
      {"a receiver that takes extra connections and runs the guest", true, true, false, engine::DestinationCheck{4, true, false}, ""},
      {"one that takes no extra connections", false, true, false, std::nullopt, "takes no extra connections"},
      {"one that leaves the guest paused (--paused)", true, false, false, std::nullopt, "leaves the guest paused"},
      // The real migration would hand the memory over and need no post-copy.
      {"a paused one that takes the memory", false, false, true, engine::DestinationCheck{1, false, true}, ""},
      {"a running one that takes the memory", true, true, true, engine::DestinationCheck{1, false, true}, ""},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    auto [send_end, recv_end] = test::stream_pair();
    test::Connections connections;
    test::FakeVm* made = nullptr;
    auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
      engine::ReceiverOptions options{2000ms, 100ms, {}, {}};
      if (c.takes_channels) options.accept_channel = [&](std::chrono::milliseconds timeout) { return connections.accept(timeout); };
      options.autostart = c.autostart;
      options.adopt_shared_memory = c.takes_memory;
      return engine::IncomingMigration(s, test::fake_factory(&made), options).run();
    });
    if (c.expected) {
      const auto check = engine::check_destination(source, send_end, asking);
      CHECK(check.channels == c.expected->channels);
      CHECK(check.postcopy == c.expected->postcopy);
      CHECK(check.shared_memory == c.expected->shared_memory);
    } else {
      CHECK_THROWS_WITH(engine::check_destination(source, send_end, asking),
                        Contains("the destination cannot take post-copy: this receiver " + std::string(c.why)));
    }
    receiver.get();
    CHECK(made == nullptr);
  }
  // Without post-copy asked, a receiver that takes no extra connections would take one channel.
  auto [send_end, recv_end] = test::stream_pair();
  test::FakeVm* made = nullptr;
  auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
    return engine::IncomingMigration(s, test::fake_factory(&made), engine::ReceiverOptions{2000ms, 100ms, {}, {}}).run();
  });
  asking.postcopy = false;
  asking.share_memory = false;
  const auto check = engine::check_destination(source, send_end, asking);
  CHECK(check.channels == 1);
  CHECK_FALSE(check.postcopy);
  CHECK_FALSE(check.shared_memory);
  receiver.get();
}
