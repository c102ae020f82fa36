// The tools with a synthetic guest (vmm/synthetic_vm.h): the migration path as operators run
// it - real processes, sockets, signals, exit codes and stats files - on any host, KVM or not.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "tests/huge_pages.h"
#include "tests/process.h"
#include "tests/tls_creds.h"

using namespace mig;
using namespace mig::test;
using Catch::Matchers::Contains;

namespace {

std::vector<std::string> synthetic_send_args(const std::string& to, const std::string& stats, const std::string& dirty_MBps,
                                             std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {kTools + "mig-send", "--synthetic-guest", dirty_MBps, "--mem", "64M", "--vcpus", "2",
                                   "--to", to, "--after", "0.3", "--stats-json", stats};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::pair<std::unique_ptr<Child>, std::string> start_synthetic_receiver(std::vector<std::string> extra) {
  extra.insert(extra.begin(), "--synthetic-guest");
  return start_receiver(extra);
}

// The guest's own account, in a stats file: every vCPU beat without a break, and found every
// page as it had left it.
void check_guest_unharmed(const nlohmann::json& stats) {
  REQUIRE(stats["local_guest_heartbeats"].size() == 2);
  for (const auto& beats : stats["local_guest_heartbeats"]) {
    CHECK(beats["sequence_breaks"] == 0);
    CHECK(beats["self_check_failures"] == 0);
  }
}

}  // namespace

TEST_CASE("a synthetic guest migrates between mig-send and mig-recv - verified, its heartbeats unbroken") {
  const auto send_stats = temp_path("synthetic-send.json"), recv_stats = temp_path("synthetic-recv.json");
  auto [receiver, endpoint] = start_synthetic_receiver({"--run-for", "1", "--stats-json", recv_stats});
  Child sender(synthetic_send_args(endpoint, send_stats, "50"));
  require_exit_codes(sender, 0, *receiver, 0);
  const auto s = read_json(send_stats), r = read_json(recv_stats);
  CHECK(s["status"] == "completed");
  CHECK(s["verified"] == true);
  CHECK(s["heartbeat_sequence_continued"] == true);
  CHECK(r["verified"] == true);
  check_guest_unharmed(r);
  std::remove(send_stats.c_str());
  std::remove(recv_stats.c_str());
}

TEST_CASE("dirty-limit caps a synthetic guest's dirtying vCPU through its rings - its computing vCPU's pace reported") {
  const auto send_stats = temp_path("synthetic-dl-send.json"), recv_stats = temp_path("synthetic-dl-recv.json");
  // Onward migrations from the receiver would track with rings too.
  auto [receiver, endpoint] = start_synthetic_receiver({"--run-for", "0.5", "--stats-json", recv_stats, "--dirty-track", "ring"});
  // 60 MB/s against a 40 MB/s link: it cannot converge unless the brake works.
  Child sender(synthetic_send_args(endpoint, send_stats, "60",
                                   {"--compute-vcpus", "1", "--dirty-track", "ring", "--policy", "dirty-limit", "--bandwidth", "40M"}));
  require_exit_codes(sender, 0, *receiver, 0);
  const auto s = read_json(send_stats), r = read_json(recv_stats);
  check_converged_by_dirty_limit(s);
  CHECK(r["verified"] == true);
  check_guest_unharmed(r);
  std::remove(send_stats.c_str());
  std::remove(recv_stats.c_str());
}

TEST_CASE("post-copy moves a synthetic guest that dirties faster than the link - its faults served, memory verified") {
  const auto send_stats = temp_path("synthetic-pc-send.json"), recv_stats = temp_path("synthetic-pc-recv.json");
  auto [receiver, endpoint] = start_synthetic_receiver({"--run-for", "1", "--stats-json", recv_stats});
  Child sender(synthetic_send_args(endpoint, send_stats, "0", {"--postcopy", "--bandwidth", "50M"}));
  require_exit_codes(sender, 0, *receiver, 0);
  const auto s = read_json(send_stats), r = read_json(recv_stats);
  CHECK(s["stop_reason"] == "postcopy");
  CHECK(r["verified"] == true);
  CHECK(r["postcopy"]["postcopy-requests"].get<std::uint64_t>() > 0);
  check_guest_unharmed(r);
  std::remove(send_stats.c_str());
  std::remove(recv_stats.c_str());
}

namespace {
// A synthetic guest in shared memory (`memory_flag`) is handed over on the same host, not copied.
void hand_over_synthetic_guest(const std::string& memory_flag) {
  const auto socket = temp_path("synthetic-handover.sock"), recv_stats = temp_path("synthetic-handover.json");
  Child receiver({kTools + "mig-recv", "--synthetic-guest", "--listen", "unix:" + socket, "--run-for", "0.5", "--stats-json", recv_stats});
  REQUIRE_THAT(receiver.read_line(), Contains("listening on unix:"));
  Child sender(synthetic_send_args("unix:" + socket, temp_path("synthetic-handover-send.json"), "20", {memory_flag}));
  require_exit_codes(sender, 0, receiver, 0);
  CHECK_THAT(sender.stderr_text(), Contains("shared-memory"));
  const auto r = read_json(recv_stats);
  CHECK(r["pages_received"] == 0);
  check_guest_unharmed(r);
  std::remove(recv_stats.c_str());
  std::remove(temp_path("synthetic-handover-send.json").c_str());
}
}  // namespace

TEST_CASE("a memfd-backed synthetic guest is handed over on the same host, not copied - --memfd") {
  hand_over_synthetic_guest("--memfd");
}

TEST_CASE("a synthetic guest in --hugetlb's huge pages is handed over too: sealed, so taken as any of mig's memfds") {
  HugePagesForTest huge_pages(32);  // the source's 64 MiB; the receiver maps the same pages
  huge_pages.require();
  hand_over_synthetic_guest("--hugetlb");
}

TEST_CASE("a dry run asking post-copy of a paused receiver passes where the memory would be handed over") {
  const auto socket = temp_path("synthetic-check.sock");
  Child receiver({kTools + "mig-recv", "--synthetic-guest", "--listen", "unix:" + socket, "--paused"});
  REQUIRE_THAT(receiver.read_line(), Contains("listening on unix:"));
  const std::vector<std::string> check = {kTools + "mig-send", "--synthetic-guest", "10", "--mem", "16M", "--to",
                                          "unix:" + socket, "--after", "0", "--postcopy", "--check"};
  auto with_memfd = check;
  with_memfd.push_back("--memfd");
  const auto handed_over = run_tool(with_memfd);
  INFO(handed_over.err);
  CHECK(handed_over.exit_code == 0);
  CHECK_THAT(handed_over.out, Contains("would take this guest, its memory handed over"));
  // Memory to be copied would need post-copy, which a paused guest cannot serve.
  const auto copied = run_tool(check);
  CHECK(copied.exit_code == 2);
  CHECK_THAT(copied.err, Contains("leaves the guest paused"));
  receiver.signal(SIGTERM);
  receiver.wait();
}

TEST_CASE("a receiver killed or stopped mid-migration costs no guest: the source runs on") {
  const auto send_stats = temp_path("synthetic-killed.json");
  auto [receiver, endpoint] = start_synthetic_receiver({});
  // 64 MiB at 20 MB/s: round 0 alone takes about 3 s, so the receiver goes mid-round.
  Child sender(synthetic_send_args(endpoint, send_stats, "20", {"--bandwidth", "20M", "--run-for", "2.5"}));
  ::usleep(1000000);
  int expected_receiver_exit = 0;
  SECTION("SIGKILL") {
    receiver->signal(SIGKILL);
    expected_receiver_exit = 128 + SIGKILL;
  }
  SECTION("SIGTERM: the receiver discards what it had and says so") {
    receiver->signal(SIGTERM);
    expected_receiver_exit = 2;
  }
  require_exit_codes(sender, 2, *receiver, expected_receiver_exit);
  CHECK_THAT(sender.stderr_text(), Contains("keeps running here"));
  const auto s = read_json(send_stats);
  CHECK(s["status"] == "failed");
  check_guest_unharmed(s);
  CHECK(s["local_guest_heartbeats"][0]["longest_gap_ms"].get<double>() < 100);
  std::remove(send_stats.c_str());
}

TEST_CASE("a synthetic guest moves on from mig-recv through its QMP socket") {
  const auto a = temp_path("synthetic-a.qmp"), b = temp_path("synthetic-b.qmp");
  auto [first, first_endpoint] = start_synthetic_receiver({"--qmp", "unix:" + a});
  Child sender(synthetic_send_args(first_endpoint, temp_path("synthetic-onward.json"), "20"));
  REQUIRE(sender.wait() == 0);
  auto [second, second_endpoint] = start_synthetic_receiver({"--qmp", "unix:" + b, "--run-for", "0.5"});
  const auto onward = run_tool({kTools + "mig-send", "--vm", "unix:" + a, "--to", second_endpoint});
  INFO(onward.err << first->stderr_text() << second->stderr_text());
  CHECK(onward.exit_code == 0);
  CHECK(first->wait() == 0);
  CHECK_THAT(first->stderr_text(), Contains("migrated onward"));
  CHECK(second->wait() == 0);
  CHECK_THAT(second->stderr_text(), Contains("verified: true"));
  std::remove(temp_path("synthetic-onward.json").c_str());
}

TEST_CASE("a source without TLS, sent to a receiver that takes only TLS, is told what is likely wrong") {
  auto [receiver, endpoint] = start_synthetic_receiver({"--tls-creds", trusted_creds()});
  const auto check = run_tool({kTools + "mig-send", "--synthetic-guest", "10", "--mem", "16M", "--to", endpoint, "--after", "0", "--check"});
  CHECK(check.exit_code == 2);
  CHECK_THAT(check.err, Contains("before answering Hello: a receiver that takes only TLS does that to a source without "
                                 "--tls-creds or --tls-psk"));
  CHECK_THAT(receiver->stderr_text(), Contains("refused a connection"));
}
