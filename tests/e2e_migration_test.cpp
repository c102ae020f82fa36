// Live migration of real guests between two in-process VMMs over loopback TCP.
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <future>
#include <thread>

#include "engine/incoming_migration.h"
#include "engine/source_migration.h"
#include "tests/support.h"
#include "transport/endpoint.h"
#include "vmm/kvm_vm.h"

using namespace mig;
using namespace std::chrono_literals;

namespace {

struct Migrated {
  engine::MigrationStats sent;
  engine::IncomingResult received;
  vmm::KvmVm* destination() { return static_cast<vmm::KvmVm*>(received.vm.get()); }
};

Migrated migrate_over(const std::string& endpoint, vmm::KvmVm& source, const engine::SenderOptions& options = {}) {
  transport::Listener listener(transport::Endpoint::parse(endpoint));
  auto receiver = std::async(std::launch::async, [&] {
    auto stream = listener.accept();
    engine::ReceiverOptions receiver_options;
    receiver_options.accept_channel = [&](std::chrono::milliseconds timeout) { return listener.accept(timeout); };
    return engine::IncomingMigration(stream, vmm::KvmVm::factory("", {}), receiver_options).run();
  });
  auto open = [&] { return transport::connect(transport::Endpoint::parse(listener.endpoint())); };
  auto stream = open();
  engine::SenderOptions with_channels = options;
  with_channels.open_channel = open;
  auto sent = engine::SourceMigration(source, stream, with_channels).run();
  return {sent, receiver.get()};
}

Migrated migrate_over_tcp(vmm::KvmVm& source, const engine::SenderOptions& options = {}) {
  return migrate_over("tcp:127.0.0.1:0", source, options);
}

std::unique_ptr<vmm::KvmVm> boot(const std::string& cmdline, std::uint64_t mem = 128ull << 20, unsigned vcpus = 1,
                                   kvm::MemoryBacking backing = kvm::MemoryBacking::anonymous) {
  auto config = test::small_config(mem, vcpus);
  config.memory.backing = backing;
  return std::make_unique<vmm::KvmVm>(test::boot_guest(cmdline, config));
}

std::string unix_endpoint() { return "unix:/tmp/mig-migration-test-" + std::to_string(::getpid()) + ".sock"; }

void require_completed(const Migrated& m) {
  INFO("sender: " << m.sent.error << "; receiver: " << m.received.stats.error);
  REQUIRE(m.sent.status == engine::MigrationStatus::completed);
  REQUIRE(m.received.stats.status == engine::MigrationStatus::completed);
  // Copied memory is verified; shared memory has only one copy, so there is nothing to check.
  CHECK(m.sent.verified != m.sent.shared_memory);
  CHECK(m.received.stats.verified != m.received.stats.shared_memory);
  REQUIRE(m.sent.guest.has_value());  // the guest's first heartbeat at the destination arrived
  CHECK(m.sent.guest->sequence_continued);
}

// Lets the guest run at the destination for `run_for` and ten heartbeats at least, then
// checks it never noticed anything.
void require_guest_carries_on(kvm::Machine& machine, std::chrono::milliseconds run_for = 300ms) {
  const auto before = machine.probe().snapshot();
  std::this_thread::sleep_for(run_for);
  CHECK(test::wait_for_progress(machine.probe(), before, 10));
  machine.pause();
  INFO(machine.failure().value_or(""));
  REQUIRE_FALSE(machine.failure());
  const auto after = machine.probe().snapshot();
  for (std::size_t i = 0; i < after.size(); ++i) {
    INFO("vcpu " << i << " failure code " << after[i].last_failure_code);
    CHECK(after[i].check_failures == 0);
    CHECK(after[i].seq_breaks == 0);
  }
  machine.resume();
}

}  // namespace

TEST_CASE("each workload migrates live - verified - and the guest carries on") {
  test::require_kvm();
  struct Case {
    const char* cmdline;
    unsigned vcpus;
  };
  const Case cases[] = {
      {"mode=idle hb=2", 1},
      {"mode=spin hb=2", 1},
      {"mode=random rate=100 wss=64M hb=2", 1},
      {"mode=hotcold rate=200 wss=64M hot=5 hotfrac=95 hb=2", 1},
      {"mode=idle regcheck=1 hb=2", 1},
      {"mode=random rate=20 wss=16M timer=250 hb=2", 1},
      {"mode=random rate=100 wss=64M fill=mix timer=100 regcheck=1 hb=2 cpus=4", 4},
  };
  for (const auto& c : cases) {
    SECTION(c.cmdline) {
      auto source = boot(c.cmdline, 128ull << 20, c.vcpus);
      std::this_thread::sleep_for(200ms);
      const auto ticks_before = source->machine().probe().snapshot()[0].ticks;
      auto m = migrate_over_tcp(*source);
      require_completed(m);
      CHECK(source->machine().paused());
      auto& destination = m.destination()->machine();
      require_guest_carries_on(destination);
      if (std::strstr(c.cmdline, "timer=")) CHECK(destination.probe().snapshot()[0].ticks > ticks_before + 20);
    }
  }
}

TEST_CASE("sweep: the destination's memory holds the sweep pattern") {
  test::require_kvm();
  auto source = boot("mode=sweep rate=200 wss=16M hb=2");
  // A pass done before the migration, however slowly the guest runs (80 ms at full speed).
  REQUIRE(test::wait_until([&] { return source->machine().probe().snapshot()[0].sweep_passes > 0; }, 60s));
  auto m = migrate_over_tcp(*source);
  require_completed(m);
  auto& destination = m.destination()->machine();
  require_guest_carries_on(destination, 200ms);  // the guest checks every byte it increments
  destination.pause();
  // Every page's first byte is v+1 up to where the sweep stands and v after it (mod 256).
  const std::byte* wss = destination.memory().translate(4ull << 20, 16ull << 20);
  REQUIRE(wss != nullptr);
  const std::uint64_t pages = (16ull << 20) / kvm::kPageSize;
  const auto last = static_cast<std::uint8_t>(wss[(pages - 1) * kvm::kPageSize]);
  std::uint64_t boundaries = 0;
  for (std::uint64_t p = 0; p < pages; ++p) {
    const auto value = static_cast<std::uint8_t>(wss[p * kvm::kPageSize]);
    INFO("page " << p);
    REQUIRE((value == last || value == static_cast<std::uint8_t>(last + 1)));
    if (p > 0 && value != static_cast<std::uint8_t>(wss[(p - 1) * kvm::kPageSize])) ++boundaries;
  }
  CHECK(boundaries <= 1);
  CHECK(destination.probe().snapshot()[0].sweep_passes > 0);
}

TEST_CASE("ping-pong: ten migrations back and forth - noticed only as heartbeat gaps") {
  test::require_kvm();
  std::unique_ptr<engine::MigratableVm> current = boot("mode=random rate=50 wss=16M timer=100 regcheck=1 hb=2", 64ull << 20);
  std::this_thread::sleep_for(100ms);
  for (int hop = 0; hop < 10; ++hop) {
    INFO("hop " << hop);
    auto m = migrate_over_tcp(static_cast<vmm::KvmVm&>(*current));
    require_completed(m);
    current = std::move(m.received.vm);  // the old VMM is dropped: the guest lives on only there
    std::this_thread::sleep_for(50ms);
  }
  auto& machine = static_cast<vmm::KvmVm&>(*current).machine();
  require_guest_carries_on(machine);
}

TEST_CASE("offline migration copies a paused guest once") {
  test::require_kvm();
  auto source = boot("mode=random rate=100 wss=32M hb=2");
  engine::SenderOptions options;
  options.offline = true;
  auto m = migrate_over_tcp(*source, options);
  require_completed(m);
  CHECK(m.sent.rounds == 1);
  CHECK(m.sent.stop_reason == engine::StopReason::offline);
  require_guest_carries_on(m.destination()->machine());
}

TEST_CASE("a receiver that dies mid-stream leaves the source guest running") {
  test::require_kvm();
  auto source = boot("mode=random rate=100 wss=64M fill=random hb=2");
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"));
  auto dying_receiver = std::async(std::launch::async, [&] {
    auto stream = listener.accept();
    stream.receive<wire::Hello>();
    stream.send(wire::HelloAck{wire::kCapVerify, transport::host_boot_id()});
    for (int i = 0; i < 5; ++i) stream.read_payload(stream.read_header());
    // Gone without a word, like a killed process: the kernel resets the connection.
    linger hard{1, 0};
    ::setsockopt(stream.fd(), SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
  });
  auto stream = transport::connect(transport::Endpoint::parse(listener.endpoint()));
  const auto seq_before = source->machine().probe().snapshot()[0].last_seq;
  auto sent = engine::SourceMigration(*source, stream, {}).run();
  dying_receiver.get();
  CHECK(sent.status == engine::MigrationStatus::failed);
  CHECK_FALSE(sent.error.empty());
  CHECK_FALSE(source->machine().paused());
  REQUIRE(source->machine().probe().wait_heartbeat_after(0, seq_before + 50, 2s));
  require_guest_carries_on(source->machine());
  // And it can still be migrated afterwards.
  require_completed(migrate_over_tcp(*source));
}

TEST_CASE("same host: memfd-backed guest memory is handed over - not copied") {
  test::require_kvm();
  auto source = boot("mode=random rate=100 wss=64M timer=100 regcheck=1 hb=2", 256ull << 20, 1, kvm::MemoryBacking::memfd);
  std::this_thread::sleep_for(200ms);
  auto m = migrate_over(unix_endpoint(), *source);
  require_completed(m);
  CHECK(m.sent.shared_memory);
  CHECK(m.sent.pages_sent == 0);
  CHECK(m.sent.bytes_sent < 1'000'000);  // state only
  auto& destination = m.destination()->machine();
  // The same pages, not a copy of them.
  CHECK(destination.memory().regions()[0].memfd.valid());
  source.reset();  // the source VMM goes away; its memory lives on in the destination
  require_guest_carries_on(destination);
}

TEST_CASE("same host without memfd memory: pages are copied over the UNIX socket and verified") {
  test::require_kvm();
  auto source = boot("mode=random rate=50 wss=16M hb=2", 64ull << 20);
  auto m = migrate_over(unix_endpoint(), *source);
  require_completed(m);
  CHECK_FALSE(m.sent.shared_memory);
  CHECK(m.sent.pages_sent > 4000);
  require_guest_carries_on(m.destination()->machine());
}

TEST_CASE("throttling holds the vCPUs part of the time - and a pause ends it") {
  test::require_kvm();
  auto vm = boot("mode=spin hb=1");
  std::this_thread::sleep_for(100ms);
  auto beats_in = [&](std::chrono::milliseconds window) {
    const auto before = vm->machine().probe().snapshot()[0].count;
    std::this_thread::sleep_for(window);
    return vm->machine().probe().snapshot()[0].count - before;
  };
  // The vCPU's own pace: the best of three 100 ms windows. A test beside this one can only
  // slow a spinning vCPU, so one slow window must not set the bar the others are held to.
  auto best_pace = [&] { return std::max({beats_in(100ms), beats_in(100ms), beats_in(100ms)}); };
  const auto free_running = best_pace();
  REQUIRE(vm->set_throttle(0.7));
  const auto throttled = beats_in(300ms) / 3;
  INFO("heartbeats per 100 ms: " << free_running << " free at best, " << throttled << " throttled at 70 %");
  CHECK(throttled < free_running * 2 / 3);
  vm->pause();  // ends the throttling first
  const auto parked = vm->machine().probe().snapshot()[0].count;
  std::this_thread::sleep_for(50ms);
  CHECK(vm->machine().probe().snapshot()[0].count == parked);  // the throttler did not resume it
  vm->resume();
  CHECK(best_pace() > free_running * 2 / 3);
}

TEST_CASE("parallel channels: a dirtying guest migrates over three connections") {
  test::require_kvm();
  auto source = boot("mode=random rate=200 wss=64M timer=100 regcheck=1 hb=2", 256ull << 20);
  std::this_thread::sleep_for(200ms);
  engine::SenderOptions options;
  options.channels = 3;
  options.delta_cache_pages = 4096;
  auto m = migrate_over_tcp(*source, options);
  require_completed(m);
  CHECK(m.sent.channels == 3);
  CHECK(m.received.stats.channels == 3);
  require_guest_carries_on(m.destination()->machine());
}
