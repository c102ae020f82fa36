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

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace {

constexpr std::uint64_t kPages = 1024;  // 4 MiB

// Socketpairs stand in for connections: what the sender opens, the receiver accepts.
class Connections {
 public:
  transport::Stream open() {
    auto [near, far] = test::stream_pair();
    std::lock_guard lock(mutex_);
    waiting_.push_back(std::move(far));
    ready_.notify_all();
    return std::move(near);
  }
  transport::Stream accept(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    if (!ready_.wait_for(lock, timeout, [&] { return !waiting_.empty(); })) throw transport::PeerError("nobody connected");
    auto stream = std::move(waiting_.front());
    waiting_.pop_front();
    return stream;
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<transport::Stream> waiting_;
};

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
