// The tools' own glue (tools/cli.h, tools/vm_options.h), where it does more than pass flags on.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <fstream>
#include <thread>

#include "tests/process.h"
#include "tests/support.h"
#include "tools/cli.h"
#include "tools/vm_options.h"

using namespace mig;
using namespace mig::test;

TEST_CASE("a statistics file is replaced whole - a reader holding the old one keeps it, and nothing partial stays") {
  const auto path = temp_path("stats-whole.json");
  REQUIRE(tools::write_stats_json(path, {{"written", 1}}));
  std::ifstream opened_before(path);
  REQUIRE(tools::write_stats_json(path, {{"written", 2}, {"padding", std::string(100000, 'x')}}));
  // Rewritten in place, the file this reader opened would now hold the second text, or a
  // part of it.
  CHECK(nlohmann::json::parse(opened_before)["written"] == 1);
  CHECK(read_json(path)["written"] == 2);
  CHECK(::access((path + ".partial").c_str(), F_OK) != 0);
  std::remove(path.c_str());
}

TEST_CASE("statistics go to a device in place - and a path that cannot be written is reported, not thrown") {
  CHECK(tools::write_stats_json("/dev/null", {{"written", 1}}));
  CHECK(::access("/dev/null.partial", F_OK) != 0);
  CHECK_FALSE(tools::write_stats_json("/nonexistent-directory/stats.json", {{"written", 1}}));
}

// mig-send's hook calls Domain::quit(), which waits for the migration; the tool meanwhile
// returns and destroys the Domain. A hook that went without waiting left the call running
// into a destroyed Domain (the likeliest cause of mig-send's exit 1, ASan's, in one CI run
// of the fault matrix, whose stderr was lost).
TEST_CASE("a terminate hook's end waits for its call under way - the call never outlives its target") {
  tools::ControlSignals signals;
  std::atomic<bool> target_alive{true}, called{false}, saw_target_gone{false};
  {
    const auto hook = signals.on_terminate([&] {
      called = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (!target_alive) saw_target_gone = true;
    });
    REQUIRE(::kill(::getpid(), SIGTERM) == 0);  // to the process: the watcher thread takes it
    REQUIRE(signals.wait(10) == tools::ControlSignals::Signal::terminate);
    REQUIRE(test::wait_until([&] { return called.load(); }, std::chrono::seconds(10)));
  }
  target_alive = false;
  std::this_thread::sleep_for(std::chrono::milliseconds(400));  // long enough for a call left running to see it
  CHECK_FALSE(saw_target_gone);
}

TEST_CASE("the memory flags choose one backing - --hugetlb is hugetlbfs with no mount, and excludes the others") {
  const auto parse = [](std::vector<std::string> args) {
    CLI::App app;
    tools::MemoryFlags flags;
    flags.add_to(app);
    std::reverse(args.begin(), args.end());  // CLI11 takes them last first
    app.parse(args);
    return flags.options();
  };
  CHECK(parse({}).backing == kvm::MemoryBacking::anonymous);
  CHECK(parse({"--memfd"}).backing == kvm::MemoryBacking::memfd);
  const auto hugetlb = parse({"--hugetlb"});
  CHECK(hugetlb.backing == kvm::MemoryBacking::hugetlbfs);
  CHECK(hugetlb.hugetlbfs_dir.empty());
  CHECK(parse({"--mem-path", "/dev/hugepages"}).hugetlbfs_dir == "/dev/hugepages");
  CHECK_THROWS_AS(parse({"--hugetlb", "--memfd"}), CLI::ExcludesError);
  CHECK_THROWS_AS(parse({"--hugetlb", "--mem-path", "/dev/hugepages"}), CLI::ExcludesError);
  CHECK_THROWS_AS(parse({"--memfd", "--mem-path", "/dev/hugepages"}), CLI::ExcludesError);
}
