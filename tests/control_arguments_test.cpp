// Migration commands as JSON: arguments and parameters checked with QEMU's wording, and
// QMP's framing of a byte stream into messages.
#include <catch2/catch.hpp>

#include "control/arguments.h"
#include "control/qmp_framing.h"

using namespace mig;
using control::CommandError;
using Catch::Matchers::Contains;
using nlohmann::json;

TEST_CASE("migrate arguments become sender options - parameters are the defaults") {
  control::MigrationParameters parameters;
  parameters.downtime_limit_ms = 80;
  parameters.max_bandwidth = 1000000;
  parameters.channels = 2;
  parameters.compress_level = 3;
  auto plain = control::parse_migrate_arguments({{"uri", "tcp:127.0.0.1:4444"}}, parameters);
  CHECK(plain.endpoint.port == 4444);
  CHECK(plain.options.policy.downtime_target_ms == 80);
  CHECK(plain.options.bandwidth_limit == 1000000);
  CHECK(plain.options.channels == 2);
  CHECK(plain.options.compress_level == 3);
  CHECK(plain.options.verify);
  CHECK(plain.options.peer_timeout == std::chrono::milliseconds(10000));
  CHECK(plain.zerocopy == control::ZeroCopyMode::automatic);

  auto own = control::parse_migrate_arguments({{"uri", "unix:/tmp/x"},
                                               {"downtime-ms", 5},
                                               {"parallel", 4},
                                               {"compress", "none"},
                                               {"verify", false},
                                               {"offline", true},
                                               {"delta", true},
                                               {"delta-cache", 1 << 20},
                                               {"zerocopy", "off"},
                                               {"auto-converge", false},
                                               {"peer-timeout", 2500},
                                               {"detach", true}},
                                              parameters);
  CHECK(own.endpoint.unix_path == "/tmp/x");
  CHECK(own.options.policy.downtime_target_ms == 5);
  CHECK(own.options.channels == 4);
  CHECK(own.options.compress_level == 0);
  CHECK_FALSE(own.options.verify);
  CHECK(own.options.offline);
  CHECK(own.options.delta_cache_pages == 256);
  CHECK(own.zerocopy == control::ZeroCopyMode::off);
  CHECK_FALSE(own.options.policy.auto_converge);
  CHECK(own.options.peer_timeout == std::chrono::milliseconds(2500));
}

TEST_CASE("migrate's policy argument chooses the convergence policy, the flags stay mig's") {
  auto plain = control::parse_migrate_arguments({{"uri", "tcp:h:1"}}, {});
  CHECK(plain.options.policy_plugin == nullptr);  // mig's, with the flags
  auto xen = control::parse_migrate_arguments({{"uri", "tcp:h:1"}, {"policy", "xen:min_dirty=10"}}, {});
  REQUIRE(xen.options.policy_plugin != nullptr);
  CHECK(xen.options.policy_plugin->name() == "xen");
}

TEST_CASE("bad migrate arguments are refused with one line naming the argument") {
  const std::pair<json, const char*> cases[] = {
      {json::object(), "'uri' is missing"},
      {{{"uri", 5}}, "Invalid parameter type for 'uri', expected: string"},
      {{{"uri", "http://x"}}, "tcp:HOST:PORT or unix:PATH"},
      {{{"uri", "tcp:h:1"}, {"parallel", "two"}}, "Invalid parameter type for 'parallel', expected: integer"},
      {{{"uri", "tcp:h:1"}, {"parallel", 99}}, "'parallel' expects a value between 1 and 16"},
      {{{"uri", "tcp:h:1"}, {"parallel", -1}}, "'parallel' expects a value between"},
      {{{"uri", "tcp:h:1"}, {"downtime-ms", -5}}, "'downtime-ms' expects a value between"},
      {{{"uri", "tcp:h:1"}, {"verify", "yes"}}, "expected: boolean"},
      {{{"uri", "tcp:h:1"}, {"compress", "zstd:0"}}, "LEVEL from 1 to 19"},
      {{{"uri", "tcp:h:1"}, {"compress", "zstd:99999999999999999999"}}, "LEVEL from 1 to 19"},
      {{{"uri", "tcp:h:1"}, {"compress", "lz4"}}, "LEVEL from 1 to 19"},
      {{{"uri", "tcp:h:1"}, {"zerocopy", "maybe"}}, "does not accept value 'maybe'"},
      {{{"uri", "tcp:h:1"}, {"peer-timeout", 50}}, "'peer-timeout' expects a value between 100 and 3600000"},
      {{{"uri", "tcp:h:1"}, {"frobnicate", true}}, "Parameter 'frobnicate' is unexpected"},
      {{{"uri", "tcp:h:1"}, {"policy", "zen"}}, "Parameter 'policy': no policy 'zen' (there are: "},
      {{{"uri", "tcp:h:1"}, {"policy", "xen:max_rounds=0"}}, "Parameter 'policy': policy parameter max_rounds=0"},
      {{{"uri", "tcp:h:1"}, {"policy", 3}}, "Invalid parameter type for 'policy', expected: string"},
  };
  for (const auto& [arguments, expected] : cases) {
    INFO(arguments.dump());
    CHECK_THROWS_WITH(control::parse_migrate_arguments(arguments, {}), Contains(expected));
  }
  CHECK_THROWS_AS(control::parse_migrate_arguments(json::array(), {}), CommandError);
}

TEST_CASE("migrate-set-parameters changes what it names - or nothing at all") {
  control::MigrationParameters p;
  p = control::apply_parameters(p, {{"downtime-limit", 300}, {"max-bandwidth", 1 << 20}, {"multifd-compression", "zstd"}});
  CHECK(p.downtime_limit_ms == 300);
  CHECK(p.max_bandwidth == 1 << 20);
  CHECK(p.compress_level == 1);
  CHECK(p.channels == 1);
  const auto j = control::to_json(p);
  CHECK(j["downtime-limit"] == 300);
  CHECK(j["multifd-compression"] == "zstd");
  CHECK(control::apply_parameters({}, j).max_bandwidth == p.max_bandwidth);  // query's reply sets back the same
  CHECK_THROWS_WITH(control::apply_parameters(p, {{"downtime-limit", 400}, {"max-cpu-throttle", 100}}),
                    Contains("'max-cpu-throttle' expects a value between 1 and 99"));
  CHECK_THROWS_WITH(control::apply_parameters(p, {{"downtime-limit", "fast"}}), Contains("expected: integer"));
  CHECK_THROWS_WITH(control::apply_parameters(p, {{"xbzrle-cache-size", 1}}), Contains("is unexpected"));
}

TEST_CASE("QMP framing splits a byte stream into messages however it arrives") {
  control::JsonSplitter splitter;
  splitter.feed(R"({"execute": "a", "arguments": {"x": "}{\"\\"}})");
  splitter.feed("\n  {\"execute\":");
  CHECK(splitter.next() == R"({"execute": "a", "arguments": {"x": "}{\"\\"}})");
  CHECK_FALSE(splitter.next());  // the second is not complete yet
  splitter.feed(" \"b\"}{\"execute\": \"c\"}");
  CHECK(splitter.next() == R"({"execute": "b"})");
  CHECK(splitter.next() == R"({"execute": "c"})");
  CHECK_FALSE(splitter.next());

  splitter.feed("not json at all\n{}");
  CHECK(splitter.next() == "not json at all");  // handed on, for the parser to refuse
  CHECK(splitter.next() == "{}");

  control::JsonSplitter flood;
  flood.feed("{\"execute\": \"" + std::string(control::kMaxQmpMessage, 'x'));
  CHECK_THROWS_AS(flood.next(), std::length_error);
  control::JsonSplitter endless_line;
  endless_line.feed(std::string(control::kMaxQmpMessage + 10, 'x'));
  CHECK_THROWS_AS(endless_line.next(), std::length_error);
}
