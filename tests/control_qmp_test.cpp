// The QMP control socket over fake VMs: the protocol, bad input, events, and an
// orchestrator's session - all through a client that knows nothing of mig but QMP.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <atomic>
#include <cstring>
#include <future>
#include <set>
#include <thread>

#include "control/json.h"
#include "control/qmp_client.h"
#include "control/qmp_server.h"
#include "tests/fake_vm.h"
#include "tests/tls_creds.h"

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

constexpr std::uint64_t kPages = 4096;  // 16 MiB

std::string socket_path(const std::string& name) {
  return "/tmp/mig-qmp-test-" + std::to_string(::getpid()) + "-" + name + ".sock";
}

// A guest with its control socket, as mig-vm --qmp runs one.
struct SourceHost {
  explicit SourceHost(const std::string& name) : path(socket_path(name)) {
    auto fake = std::make_unique<test::FakeVm>(std::vector<std::uint64_t>{kPages});
    vm = fake.get();
    for (std::uint64_t p = 0; p < kPages; p += 3) vm->write(0, p, p + 1);
    domain = std::make_unique<control::Domain>(std::move(fake));
    server = std::make_unique<control::QmpServer>(*domain, path);
  }
  std::string path;
  test::FakeVm* vm;
  std::unique_ptr<control::Domain> domain;
  std::unique_ptr<control::QmpServer> server;  // after the domain: goes first
};

// A receiver waiting on loopback, as mig-recv runs one.
struct DestinationHost {
  explicit DestinationHost(transport::AcceptPolicy accept = {})
      : domain(control::Domain::Incoming{test::fake_factory(&vm), {}, std::move(accept)}),
        endpoint(domain.migrate_incoming("tcp:127.0.0.1:0")) {}
  test::FakeVm* vm = nullptr;
  control::Domain domain;
  std::string endpoint;
};

// Every round finds 64 pages dirty again and takes at least 10 ms: with a downtime limit of
// 0 ms, rounds go on until somebody changes something.
void keep_dirtying(test::FakeVm& vm) {
  std::uint64_t value = 1;
  vm.before_fetch = [value](test::FakeVm& v) mutable {
    std::this_thread::sleep_for(10ms);
    for (std::uint64_t p = 0; p < 64; ++p) v.write(0, p * 5, value++);
  };
}

// A migration that goes on until somebody steps in: a downtime limit of 0 ms that no round
// can meet, and rounds enough. `more`: further arguments to migrate.
void start_endless_migration(control::QmpClient& client, const DestinationHost& destination, json more = json::object()) {
  client.execute("migrate-set-parameters", {{"downtime-limit", 0}});
  json arguments{{"uri", destination.endpoint}, {"max-iterations", 1000}};
  arguments.update(more);
  client.execute("migrate", arguments);
}

json wait_for_status(control::QmpClient& client, const std::set<std::string>& statuses) {
  for (int i = 0; i < 1000; ++i) {
    auto info = client.execute("query-migrate");
    if (statuses.count(info.value("status", ""))) return info;
    std::this_thread::sleep_for(10ms);
  }
  FAIL("query-migrate never reached the expected status: " << client.execute("query-migrate").dump());
  return {};
}

std::vector<std::string> migration_events(control::QmpClient& client) {
  std::vector<std::string> statuses;
  while (auto event = client.next_event(0ms))
    if ((*event)["event"] == "MIGRATION") statuses.push_back((*event)["data"]["status"]);
  return statuses;
}

}  // namespace

// mig-send's QMP server went away while the failed migration's thread was still in the
// server's event sink: a use-after-free ASan caught in the fault matrix.
TEST_CASE("unsubscribe waits for a call of the sink under way - and a sink may unsubscribe itself") {
  control::Domain domain(std::make_unique<test::FakeVm>(std::vector<std::uint64_t>{kPages}));
  std::promise<void> entered;
  std::atomic<bool> finished{false};
  const auto slow = domain.subscribe([&](const control::Event& event) {
    if (event.name != "STOP") return;
    entered.set_value();
    std::this_thread::sleep_for(100ms);  // still under way when unsubscribe is called
    finished = true;
  });
  std::thread stopping([&] { domain.stop(); });
  entered.get_future().wait();
  domain.unsubscribe(slow);
  CHECK(finished);
  stopping.join();

  std::uint64_t once = 0;
  int calls = 0;
  once = domain.subscribe([&](const control::Event&) {
    ++calls;
    domain.unsubscribe(once);
  });
  domain.cont();
  domain.stop();
  CHECK(calls == 1);
}

TEST_CASE("QMP: greeting, capabilities negotiation, then commands") {
  SourceHost host("greeting");
  control::QmpClient raw(host.path);  // negotiates by itself; a second negotiation is refused
  CHECK(raw.greeting()["QMP"]["version"]["qemu"]["major"] == 7);
  CHECK(raw.greeting()["QMP"]["capabilities"] == json::array());
  CHECK_THROWS_WITH(raw.execute("qmp_capabilities"), Contains("already complete"));
  CHECK(raw.execute("query-status")["status"] == "running");
  CHECK(raw.execute("query-status")["running"] == true);
  bool has_migrate = false;
  for (const auto& c : raw.execute("query-commands")) has_migrate |= c["name"] == "migrate";
  CHECK(has_migrate);
  CHECK(raw.execute("query-migrate") == json::object());  // no migration yet
}

TEST_CASE("QMP: commands before qmp_capabilities are refused") {
  SourceHost host("unnegotiated");
  // A bare socket, to speak before negotiating.
  control::QmpClient probe(host.path);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, host.path.c_str(), sizeof addr.sun_path - 1);
  REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
  const std::string request = R"({"execute": "stop", "id": 7})" "\n";
  REQUIRE(::send(fd.get(), request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size()));
  std::string got;
  char buffer[4096];
  while (std::count(got.begin(), got.end(), '\n') < 2) {
    const ssize_t n = ::recv(fd.get(), buffer, sizeof buffer, 0);
    REQUIRE(n > 0);
    got.append(buffer, static_cast<std::size_t>(n));
  }
  const auto reply = json::parse(got.substr(got.find('\n') + 1));
  CHECK(reply["error"]["class"] == "CommandNotFound");
  CHECK(reply["id"] == 7);
  CHECK(probe.execute("query-status")["status"] == "running");  // the guest was not stopped
}

TEST_CASE("QMP: bad input gets an error reply or a closed connection - never harms the guest") {
  SourceHost host("bad-input");
  control::QmpClient client(host.path);
  SECTION("a line that is not JSON") {
    client.send_raw("this is not json\n");
    auto reply = client.read_message(2s);
    REQUIRE(reply);
    CHECK((*reply)["error"]["class"] == "GenericError");
    CHECK(client.execute("query-status")["status"] == "running");  // still serving
  }
  SECTION("an unknown command, with its id echoed") {
    client.send_raw(R"({"execute": "format-disk", "id": {"n": 1}})");
    auto reply = client.read_message(2s);
    REQUIRE(reply);
    CHECK((*reply)["error"]["class"] == "CommandNotFound");
    CHECK((*reply)["id"] == json{{"n", 1}});
  }
  SECTION("arguments of the wrong type") {
    CHECK_THROWS_WITH(client.execute("migrate", {{"uri", 5}}), Contains("expected: string"));
    CHECK_THROWS_WITH(client.execute("calc-dirty-rate", {{"calc-time", "soon"}}), Contains("expected: number"));
    CHECK_THROWS_WITH(client.execute("migrate", {{"resume", 1}, {"uri", "tcp:127.0.0.1:1"}}), Contains("'resume', expected: boolean"));
    client.send_raw(R"({"execute": 1, "arguments": {}})" "\n");
    CHECK((*client.read_message(2s))["error"]["desc"] == "Expected 'execute' with a command name");
    CHECK_THROWS_WITH(client.execute("migrate-set-parameters", {{"downtime-limit", true}}), Contains("expected: integer"));
    CHECK_THROWS_WITH(client.execute("stop", {{"now", true}}), Contains("'now' is unexpected"));
    client.send_raw(R"({"execute": "stop", "arguments": [1, 2]})" "\n");
    CHECK((*client.read_message(2s))["error"]["desc"].get<std::string>().find("expected: object") != std::string::npos);
    client.send_raw(R"({"arguments": {}})" "\n");
    CHECK(client.read_message(2s)->contains("error"));
    CHECK(client.execute("query-status")["status"] == "running");
  }
  SECTION("a 10 MiB line: refused, then the connection is closed") {
    try {
      client.send_raw("{\"execute\": \"" + std::string(10u << 20, 'a') + "\"}\n");
    } catch (const std::runtime_error&) {
      // The server may close before all of it was sent.
    }
    auto reply = client.read_message(5s);
    REQUIRE(reply);
    CHECK_THAT((*reply)["error"]["desc"].get<std::string>(), Contains("exceeds"));
    CHECK_THROWS_WITH(client.read_message(5s), Contains("closed"));
    control::QmpClient next(host.path);  // the server itself is fine
    CHECK(next.execute("query-status")["status"] == "running");
  }
  SECTION("a client that vanishes mid-command") {
    {
      control::QmpClient gone(host.path);
      gone.send_raw(R"({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:)");
    }
    std::this_thread::sleep_for(50ms);
    CHECK(client.execute("query-status")["status"] == "running");
    CHECK(client.execute("query-migrate") == json::object());
  }
  CHECK_FALSE(host.vm->paused());
}

TEST_CASE("QMP: two clients at once - both are served and both see events") {
  SourceHost host("two-clients");
  control::QmpClient first(host.path), second(host.path);
  first.execute("stop");
  CHECK(second.execute("query-status")["status"] == "paused");
  CHECK(host.vm->paused());
  second.execute("cont");
  for (auto* client : {&first, &second}) {
    auto stop = client->next_event(2s);
    auto resume = client->next_event(2s);
    REQUIRE(stop);
    REQUIRE(resume);
    CHECK((*stop)["event"] == "STOP");
    CHECK((*resume)["event"] == "RESUME");
    CHECK((*stop)["timestamp"]["seconds"].get<std::int64_t>() > 1'600'000'000);
    CHECK((*stop)["timestamp"].contains("microseconds"));
  }
  CHECK_FALSE(host.vm->paused());
}

TEST_CASE("QMP: query-migrate polled during a migration agrees with the events") {
  SourceHost host("polling");
  keep_dirtying(*host.vm);
  DestinationHost destination;
  control::QmpClient client(host.path);
  client.execute("migrate-set-parameters", {{"downtime-limit", 0}});
  // Exactly 8 rounds, whatever the pace: the fake VM cannot be throttled, and where a slow
  // host (ThreadSanitizer's) puts the expected downtime above auto-converge's threshold, the
  // refused throttle would otherwise end the stuck rounds early as no progress.
  client.execute("migrate", {{"uri", destination.endpoint}, {"max-iterations", 8}, {"policy", "mig:no_progress_rounds=1000"}});
  std::uint64_t last_transferred = 0;
  std::vector<std::string> polled;
  json info;
  for (int i = 0; i < 2000; ++i) {
    info = client.execute("query-migrate");
    const auto transferred = info["ram"]["transferred"].get<std::uint64_t>();
    CHECK(transferred >= last_transferred);
    last_transferred = transferred;
    if (polled.empty() || polled.back() != info["status"]) polled.push_back(info["status"]);
    if (info["status"] == "completed" || info["status"] == "failed") break;
    std::this_thread::sleep_for(2ms);
  }
  REQUIRE(info["status"] == "completed");
  INFO(info.dump());
  CHECK(info["ram"]["remaining"] == 0);
  CHECK(info["ram"]["total"] == kPages * 4096);
  CHECK(info["ram"]["dirty-sync-count"] == 9);
  CHECK(info.contains("downtime"));
  CHECK(info["mig"]["verified"] == true);
  CHECK(info["mig"]["rounds"].size() == 8);
  const auto events = migration_events(client);
  CHECK(events == std::vector<std::string>{"setup", "active", "device", "completed"});
  // Every status polled is one the events announced, in the same order.
  auto next = events.begin();
  for (const auto& status : polled) {
    next = std::find(next, events.end(), status);
    CHECK(next != events.end());
  }
  CHECK(client.execute("query-status")["status"] == "postmigrate");
  CHECK_THROWS_WITH(client.execute("cont"), Contains("migrated away"));
  REQUIRE(destination.domain.wait_incoming());
  CHECK(destination.domain.run_state() == control::RunState::running);
  CHECK(destination.vm->region_memory(0) == host.vm->region_memory(0));
}

TEST_CASE("QMP: an orchestrator raises the downtime limit when progress stalls - and the migration completes") {
  SourceHost host("orchestrator");
  keep_dirtying(*host.vm);
  DestinationHost destination;
  control::QmpClient client(host.path);
  start_endless_migration(client, destination);
  // As KubeVirt's and Nova's monitors do: watch expected-downtime, and when it stops
  // falling, give the migration the downtime it needs.
  std::vector<std::int64_t> expected;
  int raises = 0;
  json info;
  for (int i = 0; i < 2000; ++i) {
    info = client.execute("query-migrate");
    if (info["status"] != "active" && info["status"] != "setup") break;
    const auto syncs = info["ram"]["dirty-sync-count"].get<std::uint64_t>();
    expected.push_back(info["expected-downtime"].get<std::int64_t>());
    const bool stalled = syncs >= 5 && expected.size() >= 3 && expected.back() >= expected[expected.size() - 3];
    if (stalled && raises == 0) {
      client.execute("migrate-set-parameters", {{"downtime-limit", expected.back() + 50}});
      ++raises;
      CHECK(client.execute("query-migrate-parameters")["downtime-limit"] == expected.back() + 50);
    }
    std::this_thread::sleep_for(20ms);
  }
  info = wait_for_status(client, {"completed", "failed"});
  CHECK(raises == 1);
  REQUIRE(info["status"] == "completed");
  CHECK(info["mig"]["stop-reason"] == "converged");
  CHECK(info["mig"]["rounds"].size() >= 5);  // it did go on until the orchestrator stepped in
  REQUIRE(destination.domain.wait_incoming());
  CHECK(destination.vm->region_memory(0) == host.vm->region_memory(0));
}

TEST_CASE("QMP: migrate_cancel stops a migration - the guest runs on and migrates later") {
  SourceHost host("cancel");
  keep_dirtying(*host.vm);
  {
    DestinationHost destination;
    control::QmpClient client(host.path);
    start_endless_migration(client, destination);
    while (client.execute("query-migrate")["ram"]["dirty-sync-count"] < 3) std::this_thread::sleep_for(5ms);
    client.execute("migrate_cancel");
    const auto info = wait_for_status(client, {"cancelled", "failed", "completed"});
    CHECK(info["status"] == "cancelled");
    CHECK_THAT(info["error-desc"].get<std::string>(), Contains("cancelled"));
    CHECK(client.execute("query-status")["status"] == "running");
    CHECK_FALSE(host.vm->paused());
    const auto incoming = destination.domain.wait_incoming();
    REQUIRE(incoming);
    CHECK(incoming->status == engine::MigrationStatus::failed);
    CHECK(destination.domain.vm() == nullptr);
    const auto events = migration_events(client);
    CHECK(events == std::vector<std::string>{"setup", "active", "cancelling", "cancelled"});
  }
  DestinationHost again;
  control::QmpClient client(host.path);
  client.execute("migrate-set-parameters", {{"downtime-limit", 30}});
  client.execute("migrate", {{"uri", again.endpoint}});
  CHECK(wait_for_status(client, {"completed", "failed", "cancelled"})["status"] == "completed");
}

TEST_CASE("QMP: stop, cont, calc-dirty-rate and quit") {
  SourceHost host("lifecycle");
  control::QmpClient client(host.path);
  CHECK(client.execute("query-dirty-rate")["status"] == "unstarted");
  test::Writer writer(*host.vm, kPages, 50us);
  client.execute("calc-dirty-rate", {{"calc-time", 0.3}});
  CHECK_THROWS_WITH(client.execute("migrate", {{"uri", "tcp:127.0.0.1:1"}}), Contains("dirty-rate measurement"));
  json rate;
  for (int i = 0; i < 200 && (rate = client.execute("query-dirty-rate"))["status"] == "measuring"; ++i)
    std::this_thread::sleep_for(10ms);
  CHECK(rate["status"] == "measured");
  CHECK(rate["dirty-rate"].get<std::int64_t>() > 0);
  CHECK(rate["calc-time"] == 0.3);

  client.execute("stop");
  CHECK(client.execute("query-status")["status"] == "paused");
  CHECK_THROWS_WITH(client.execute("migrate", {{"uri", "tcp:127.0.0.1:1"}}), Contains("paused"));
  client.execute("cont");
  CHECK(client.execute("query-status")["status"] == "running");

  client.execute("quit");
  CHECK(host.domain->wait_quit(2s));
  CHECK(host.domain->run_state() == control::RunState::shutdown);
  bool shutdown = false;
  while (auto event = client.next_event(500ms)) shutdown |= (*event)["event"] == "SHUTDOWN";
  CHECK(shutdown);
}

TEST_CASE("QMP: a receiver started deferred listens when migrate-incoming says where") {
  test::FakeVm* made = nullptr;
  control::Domain destination(control::Domain::Incoming{test::fake_factory(&made), {}, {}});
  control::QmpServer server(destination, socket_path("deferred"));
  control::QmpClient client(server.path());
  CHECK(client.execute("query-status")["status"] == "prelaunch");
  CHECK_THROWS_WITH(client.execute("stop"), Contains("no guest here yet"));
  CHECK_THROWS_WITH(client.execute("migrate-incoming", {{"uri", "udp:x"}}), Contains("tcp:HOST:PORT"));
  const auto uri = client.execute("migrate-incoming", {{"uri", "tcp:127.0.0.1:0"}})["uri"].get<std::string>();
  CHECK(client.execute("query-status")["status"] == "inmigrate");
  CHECK_THROWS_WITH(client.execute("migrate-incoming", {{"uri", "tcp:127.0.0.1:0"}}), Contains("already waiting"));

  SourceHost source("deferred-source");
  control::QmpClient source_client(source.path);
  source_client.execute("migrate", {{"uri", uri}});
  CHECK(wait_for_status(source_client, {"completed", "failed"})["status"] == "completed");
  REQUIRE(destination.wait_incoming());
  CHECK(client.execute("query-status")["status"] == "running");
  CHECK(client.execute("query-migrate")["status"] == "completed");
  REQUIRE(made != nullptr);
  CHECK(made->region_memory(0) == source.vm->region_memory(0));
}

TEST_CASE("QMP: a paused post-copy's error-desc says how to recover in QMP's words - the engine's own text names none") {
  engine::MigrationProgress paused;
  paused.status = engine::MigrationStatus::postcopy_paused;
  paused.error = "post-copy link broke: the peer closed the connection";
  const auto info = control::migration_info(paused);
  CHECK(info["error-desc"] == paused.error + R"( (QMP: migrate-recover {"uri"} at the destination, then migrate {"uri", "resume": true} here))");
  paused.status = engine::MigrationStatus::failed;
  CHECK(control::migration_info(paused)["error-desc"] == paused.error);
}

// An orchestrator may switch as soon as it has started the migration, before the migration's
// own thread has connected, let alone set anything up.
TEST_CASE("QMP: migrate-start-postcopy straight after migrate is taken - and the migration ends in post-copy") {
  SourceHost host("postcopy-at-once");
  keep_dirtying(*host.vm);
  DestinationHost destination;
  control::QmpClient client(host.path);
  start_endless_migration(client, destination, {{"postcopy", true}});
  client.execute("migrate-start-postcopy");
  const auto info = wait_for_status(client, {"completed", "failed", "cancelled"});
  INFO(info.dump());
  REQUIRE(info["status"] == "completed");
  CHECK(info["mig"]["stop-reason"] == "postcopy");
  REQUIRE(destination.domain.wait_incoming());
  REQUIRE(destination.vm);
  CHECK(destination.vm->region_memory(0) == host.vm->region_memory(0));
}

TEST_CASE("QMP: migrate over mutual TLS - a source without credentials is refused and the destination waits on") {
  std::atomic<int> refused{0};
  transport::AcceptPolicy accept;
  accept.tls = transport::TlsContext::load(test::x509(test::trusted_creds()), transport::TlsRole::server);
  accept.refused = [&](const std::string&) { ++refused; };
  DestinationHost destination(accept);
  SourceHost source("tls");
  control::QmpClient client(source.path);

  CHECK_THROWS_WITH(client.execute("migrate", {{"uri", destination.endpoint}, {"tls-creds", "/nonexistent"}}),
                    Contains("--tls-creds /nonexistent: cannot read ca-cert.pem"));
  client.execute("migrate", {{"uri", destination.endpoint}});
  auto info = wait_for_status(client, {"completed", "failed"});
  CHECK(info["status"] == "failed");
  CHECK(client.execute("query-status")["status"] == "running");
  CHECK(refused == 1);
  CHECK(destination.vm == nullptr);  // nothing was built, let alone written

  SECTION("parallel channels") {
    client.execute("migrate", {{"uri", destination.endpoint}, {"tls-creds", test::trusted_creds()}, {"parallel", 2}});
  }
  SECTION("post-copy, whose channel is read and written from two threads") {
    client.execute("migrate", {{"uri", destination.endpoint}, {"tls-creds", test::trusted_creds()}, {"postcopy", true}});
  }
  info = wait_for_status(client, {"completed", "failed"});
  INFO(info.dump());
  REQUIRE(info["status"] == "completed");
  CHECK(info["mig"]["stats"]["security"] != "plaintext");
  CHECK(info["mig"]["stats"]["verified"] == true);
  REQUIRE(destination.domain.wait_incoming());
  CHECK(destination.domain.wait_incoming()->security != transport::StreamSecurity::plaintext);
  REQUIRE(destination.vm);
  CHECK(destination.vm->region_memory(0) == source.vm->region_memory(0));
  CHECK(refused == 1);
}

TEST_CASE("QMP: migrate with dry-run asks the destination, which answers and waits on for the real migration") {
  SourceHost host("dry-run");
  DestinationHost destination;
  std::vector<std::string> checks;
  destination.domain.subscribe([&](const control::Event& event) {
    if (event.name == "MIGRATION_CHECK") checks.push_back(event.data.dump());
  });
  control::QmpClient client(host.path);
  CHECK(client.execute("migrate", {{"uri", destination.endpoint}, {"dry-run", true}, {"parallel", 2}}) ==
        json{{"channels", 2}, {"postcopy", false}, {"shared-memory", false}});
  CHECK(client.execute("query-status")["status"] == "running");
  CHECK(client.execute("query-migrate") == json::object());  // no migration ran
  CHECK(destination.vm == nullptr);
  // The destination still waits: the real migration comes next, and completes.
  client.execute("migrate", {{"uri", destination.endpoint}});
  REQUIRE(destination.domain.wait_incoming());
  CHECK(destination.domain.run_state() == control::RunState::running);
  REQUIRE(destination.vm != nullptr);
  CHECK(destination.vm->region_memory(0) == host.vm->region_memory(0));
  CHECK(checks == std::vector<std::string>{R"({"accepted":true,"error":""})"});
  CHECK_THROWS_WITH(client.execute("migrate", {{"uri", "tcp:127.0.0.1:1"}, {"dry-run", true}}),
                    Contains("migrate (dry run): "));
}
