// The operator's walk-through with real processes: a running guest migrated, watched,
// steered and cancelled through its QMP socket, with mig-send --vm and mig-ctl.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <thread>

#include "tests/process.h"

using namespace mig;
using namespace mig::test;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace {

std::string socket_path(const std::string& name) { return temp_path(name + ".qmp"); }

// mig-vm with a QMP socket; waits until the socket answers.
std::unique_ptr<Child> start_vm(const std::string& socket, const std::string& append) {
  auto vm = std::make_unique<Child>(std::vector<std::string>{kTools + "mig-vm", "--kernel", kGuestImage, "--mem", "128M",
                                                             "--append", append, "--qmp", "unix:" + socket});
  for (int i = 0; i < 100 && ctl(socket, {"status"}).exit_code != 0; ++i) ::usleep(20000);
  return vm;
}

// Until the guest's workload loop runs (it fills its working set first): its dirty rate
// shows it.
void wait_dirtying(const std::string& socket) {
  for (int i = 0; i < 50; ++i) {
    const auto r = ctl(socket, {"dirty-rate", "0.2"});
    if (r.exit_code == 0 && r.out.find("dirty rate: 0 ") == std::string::npos) return;
  }
  FAIL("the guest never started dirtying memory");
}

nlohmann::json info_json(const std::string& socket) {
  const auto r = ctl(socket, {"info", "--json"});
  REQUIRE(r.exit_code == 0);
  return nlohmann::json::parse(r.out);
}

std::string wait_finished(const std::string& socket) {
  for (int i = 0; i < 500; ++i) {
    const auto status = info_json(socket).value("status", "");
    if (status == "completed" || status == "failed" || status == "cancelled") return status;
    ::usleep(20000);
  }
  return "timed out";
}

}  // namespace

TEST_CASE("an operator migrates a running VM with mig-send --vm - and onward with mig-ctl") {
  require_kvm();
  const auto a = socket_path("a"), b = socket_path("b"), c = socket_path("c");
  const auto stats = temp_path("vm-send.json");
  auto vm = start_vm(a, "mode=random rate=50 wss=32M hb=2 timer=100");
  auto [first, first_endpoint] = start_receiver({"--qmp", "unix:" + b});
  CHECK(ctl(a, {"status"}).out == "running\n");
  const auto rate = ctl(a, {"dirty-rate", "0.3"});
  CHECK(rate.exit_code == 0);
  CHECK_THAT(rate.out, Contains("dirty rate:"));

  const auto sent = run_tool({kTools + "mig-send", "--vm", "unix:" + a, "--to", first_endpoint, "--stats-json", stats});
  INFO(sent.err << vm->stderr_text() << first->stderr_text());
  REQUIRE(sent.exit_code == 0);
  CHECK_THAT(sent.err, Contains("verified: true"));
  CHECK(read_json(stats)["status"] == "completed");
  CHECK(vm->wait() == 0);  // the source was told to quit once the guest had moved
  CHECK(ctl(b, {"status"}).out == "running\n");
  CHECK_THAT(ctl(b, {"info"}).out, Contains("status: completed"));

  // Onward, driven by mig-ctl alone.
  auto [second, second_endpoint] = start_receiver({"--qmp", "unix:" + c});
  REQUIRE(ctl(b, {"migrate", second_endpoint}).exit_code == 0);
  CHECK(wait_finished(b) == "completed");
  CHECK(ctl(b, {"status"}).out == "postmigrate\n");
  CHECK(ctl(b, {"cont"}).exit_code == 2);  // never twice
  REQUIRE(ctl(b, {"quit"}).exit_code == 0);
  CHECK(first->wait() == 0);
  CHECK_THAT(first->stderr_text(), Contains("migrated onward"));
  std::this_thread::sleep_for(300ms);
  REQUIRE(ctl(c, {"quit"}).exit_code == 0);
  CHECK(second->wait() == 0);
  std::string beats;
  for (std::string line; !(line = second->read_line()).empty();) beats += line;
  CHECK_THAT(beats, Contains("sequence breaks 0") && Contains("self-check failures 0"));
  std::remove(stats.c_str());
}

TEST_CASE("mig-ctl cancels one migration and completes the next - the events say so") {
  require_kvm();
  const auto a = socket_path("cancel-a");
  auto vm = start_vm(a, "mode=random rate=50 wss=64M hb=2");
  wait_dirtying(a);
  Child events({kTools + "mig-ctl", "unix:" + a, "events"});
  REQUIRE(ctl(a, {"set", "bandwidth", "10M"}).exit_code == 0);  // round 0 then takes seconds
  auto [doomed, doomed_endpoint] = start_receiver({});
  REQUIRE(ctl(a, {"migrate", doomed_endpoint}).exit_code == 0);
  std::this_thread::sleep_for(500ms);
  CHECK_THAT(ctl(a, {"info"}).out, Contains("status: active"));
  REQUIRE(ctl(a, {"cancel"}).exit_code == 0);
  CHECK(wait_finished(a) == "cancelled");
  CHECK(ctl(a, {"status"}).out == "running\n");
  CHECK(doomed->wait() == 2);  // the destination discarded what it had
  CHECK_THAT(doomed->stderr_text(), Contains("migration failed"));

  REQUIRE(ctl(a, {"set", "bandwidth", "0"}).exit_code == 0);
  REQUIRE(ctl(a, {"set", "downtime-ms", "50"}).exit_code == 0);
  auto [receiver, endpoint] = start_receiver({"--run-for", "0.3"});
  REQUIRE(ctl(a, {"migrate", endpoint}).exit_code == 0);
  CHECK(wait_finished(a) == "completed");
  const auto info = info_json(a);
  CHECK(info["mig"]["verified"] == true);
  CHECK(receiver->wait() == 0);
  REQUIRE(ctl(a, {"quit"}).exit_code == 0);
  CHECK(vm->wait() == 0);
  CHECK(events.wait() == 0);  // the stream ended with the process
  std::string seen;
  for (std::string line; !(line = events.read_line()).empty();) seen += line;
  CHECK_THAT(seen, Contains(R"("status":"cancelled")") && Contains(R"("status":"completed")") && Contains("MIGRATION_PASS") &&
                       Contains("SHUTDOWN"));
}

TEST_CASE("mig-ctl refuses what cannot be done with one line and a non-zero exit") {
  require_kvm();
  const auto a = socket_path("refuse-a");
  auto vm = start_vm(a, "mode=idle hb=5");
  auto unreachable = ctl(temp_path("nobody.qmp"), {"status"});
  CHECK(unreachable.exit_code == 1);
  CHECK_THAT(unreachable.err, Contains("cannot connect"));
  auto bad_endpoint = ctl(a, {"migrate", "tcp:nowhere"});
  CHECK(bad_endpoint.exit_code == 2);
  CHECK_THAT(bad_endpoint.err, Contains("tcp:HOST:PORT"));
  CHECK(std::count(bad_endpoint.err.begin(), bad_endpoint.err.end(), '\n') == 1);
  // A second mig-vm on the same socket: refused, the first one untouched.
  auto twin = run_tool({kTools + "mig-vm", "--kernel", kGuestImage, "--qmp", "unix:" + a, "--run-for", "1"});
  CHECK(twin.exit_code == 1);
  CHECK_THAT(twin.err, Contains("another process is listening"));
  CHECK(ctl(a, {"status"}).out == "running\n");
  REQUIRE(ctl(a, {"quit"}).exit_code == 0);
  CHECK(vm->wait() == 0);
}

TEST_CASE("SIGTERM ends a waiting mig-recv and a migrating mig-send cleanly") {
  require_kvm();
  auto [receiver, endpoint] = start_receiver({});
  receiver->signal(SIGTERM);
  CHECK(receiver->wait() == 2);
  CHECK_THAT(receiver->stderr_text(), Contains("stopped waiting for a connection"));

  auto [slow, slow_endpoint] = start_receiver({});
  const auto socket = socket_path("term");
  auto args = send_args(slow_endpoint, temp_path("term.json"), "mode=random rate=50 wss=64M hb=2");
  args.insert(args.end(), {"--bandwidth", "5M", "--qmp", "unix:" + socket});
  Child sender(args);
  // Round 0 of 64 MiB at 5 MB/s takes 13 s: signal once it is under way.
  for (int i = 0; i < 500 && ctl(socket, {"info"}).out.find("status: active") == std::string::npos; ++i) ::usleep(20000);
  sender.signal(SIGTERM);
  CHECK(sender.wait() == 2);
  CHECK_THAT(sender.stderr_text(), Contains("migration cancelled"));
  CHECK(slow->wait() == 2);
  std::remove(temp_path("term.json").c_str());
}

TEST_CASE("a destination that dies during post-copy: the source pauses, says why, and never runs the guest again") {
  require_kvm();
  const auto a = socket_path("pc");
  auto vm = start_vm(a, "mode=random rate=100 wss=64M hb=2");
  wait_dirtying(a);
  auto [receiver, endpoint] = start_receiver({});
  // Slow enough that post-copy is still going when the destination dies.
  REQUIRE(ctl(a, {"migrate", endpoint, "--postcopy", "--bandwidth", "20M"}).exit_code == 0);
  std::string status;
  for (int i = 0; i < 2000 && status != "postcopy-active"; ++i, ::usleep(10000)) status = info_json(a).value("status", "");
  REQUIRE(status == "postcopy-active");
  receiver->signal(SIGKILL);
  receiver->wait();
  nlohmann::json info;
  for (int i = 0; i < 500 && status != "postcopy-paused"; ++i, ::usleep(10000)) {
    info = info_json(a);
    status = info.value("status", "");
  }
  REQUIRE(status == "postcopy-paused");
  CHECK_THAT(info.value("error-desc", ""), Contains("post-copy link broke"));
  CHECK_THAT(info.value("error-desc", ""), Contains("must not run here again"));
  CHECK_THAT(info.value("error-desc", ""), Contains(R"(then migrate {"uri", "resume": true} here)"));
  CHECK_THAT(ctl(a, {"status"}).out, Contains("postmigrate"));
  CHECK(ctl(a, {"cont"}).exit_code != 0);  // the guest ran at the destination: never here again
  CHECK(ctl(a, {"cancel"}).exit_code == 0);  // answered, and refused inside: still paused
  CHECK(info_json(a).value("status", "") == "postcopy-paused");
  ctl(a, {"quit"});
  vm->wait();
}
