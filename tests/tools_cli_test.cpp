// The tools' own glue (tools/cli.h), where it does more than pass flags on.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>

#include "tests/process.h"
#include "tools/cli.h"

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
