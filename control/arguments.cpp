#include "control/arguments.h"

#include <set>
#include <sstream>

namespace mig::control {

namespace {

constexpr int kMaxZstdLevel = 19;

std::string shortest(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

// Reads typed fields from a JSON object, remembering which it read so that anything else
// can be refused. Messages follow QEMU's wording.
class Fields {
 public:
  explicit Fields(const nlohmann::json& object) : object_(object) {
    if (!object_.is_object()) throw CommandError("arguments must be an object");
  }

  bool has(const char* name) {
    known_.insert(name);
    return object_.contains(name);
  }
  bool flag(const char* name, bool fallback) {
    if (!has(name)) return fallback;
    return typed(name, &nlohmann::json::is_boolean, "boolean").get<bool>();
  }
  std::uint64_t integer(const char* name, std::uint64_t fallback, std::uint64_t min, std::uint64_t max) {
    if (!has(name)) return fallback;
    const auto& value = typed(name, &nlohmann::json::is_number_integer, "integer");
    const bool negative = !value.is_number_unsigned() && value.get<std::int64_t>() < 0;
    const std::uint64_t v = negative ? 0 : value.get<std::uint64_t>();
    if (negative || v < min || v > max)
      throw CommandError("Parameter '" + std::string(name) + "' expects a value between " + std::to_string(min) + " and " +
                         std::to_string(max));
    return v;
  }
  double number(const char* name, double fallback, double min, double max) {
    if (!has(name)) return fallback;
    const double value = typed(name, &nlohmann::json::is_number, "number").get<double>();
    if (!(value >= min && value <= max))  // also refuses NaN
      throw CommandError("Parameter '" + std::string(name) + "' expects a value between " + shortest(min) + " and " +
                         shortest(max));
    return value;
  }
  std::string text(const char* name, const std::string& fallback, const std::set<std::string>& allowed = {}) {
    if (!has(name)) return fallback;
    auto value = typed(name, &nlohmann::json::is_string, "string").get<std::string>();
    if (!allowed.empty() && !allowed.count(value))
      throw CommandError("Parameter '" + std::string(name) + "' does not accept value '" + value + "'");
    return value;
  }
  void reject_unknown() const {
    for (const auto& [key, value] : object_.items())
      if (!known_.count(key)) throw CommandError("Parameter '" + key + "' is unexpected");
  }

 private:
  const nlohmann::json& typed(const char* name, bool (nlohmann::json::*is)() const noexcept, const char* expected) {
    const auto& value = object_.at(name);
    if (!(value.*is)()) throw CommandError("Invalid parameter type for '" + std::string(name) + "', expected: " + expected);
    return value;
  }

  const nlohmann::json& object_;
  std::set<std::string> known_;
};

// migrate's tls-creds, tls-psk and tls-hostname; loaded only once every argument is known good.
transport::TlsCredentials tls_credentials(Fields& f) {
  transport::TlsCredentials tls;
  tls.x509_dir = f.text("tls-creds", "");
  tls.psk_file = f.text("tls-psk", "");
  tls.hostname = f.text("tls-hostname", "");
  if (!tls.hostname.empty() && tls.x509_dir.empty()) throw CommandError("Parameter 'tls-hostname' needs 'tls-creds'");
  return tls;
}

}  // namespace

engine::Tunables MigrationParameters::tunables() const {
  return {downtime_limit_ms, static_cast<double>(max_bandwidth), throttle_initial_pct, throttle_increment_pct,
          throttle_max_pct};
}

nlohmann::json to_json(const MigrationParameters& p) {
  return {{"downtime-limit", static_cast<std::uint64_t>(p.downtime_limit_ms)},
          {"max-bandwidth", p.max_bandwidth},
          {"multifd-channels", p.channels},
          {"cpu-throttle-initial", p.throttle_initial_pct},
          {"cpu-throttle-increment", p.throttle_increment_pct},
          {"max-cpu-throttle", p.throttle_max_pct},
          {"multifd-compression", p.compress_level > 0 ? "zstd" : "none"},
          {"multifd-zstd-level", p.compress_level > 0 ? p.compress_level : 1}};
}

MigrationParameters apply_parameters(MigrationParameters p, const nlohmann::json& changes) {
  Fields f(changes);
  p.downtime_limit_ms = static_cast<double>(f.integer("downtime-limit", static_cast<std::uint64_t>(p.downtime_limit_ms), 0, 2'000'000));
  p.max_bandwidth = f.integer("max-bandwidth", p.max_bandwidth, 0, std::uint64_t{1} << 40);
  p.channels = static_cast<unsigned>(f.integer("multifd-channels", p.channels, 1, wire::kMaxChannels));
  p.throttle_initial_pct = static_cast<unsigned>(f.integer("cpu-throttle-initial", p.throttle_initial_pct, 1, 99));
  p.throttle_increment_pct = static_cast<unsigned>(f.integer("cpu-throttle-increment", p.throttle_increment_pct, 1, 99));
  p.throttle_max_pct = static_cast<unsigned>(f.integer("max-cpu-throttle", p.throttle_max_pct, 1, 99));
  const auto compression = f.text("multifd-compression", p.compress_level > 0 ? "zstd" : "none", {"none", "zstd"});
  const auto level = static_cast<int>(f.integer("multifd-zstd-level", p.compress_level > 0 ? static_cast<std::uint64_t>(p.compress_level) : 1, 1, kMaxZstdLevel));
  p.compress_level = compression == "zstd" ? level : 0;
  f.reject_unknown();
  return p;
}

int parse_compress_level(const std::string& text) {
  if (text == "none") return 0;
  if (text == "zstd") return 1;
  const std::string digits = text.rfind("zstd:", 0) == 0 ? text.substr(5) : "";
  if (digits.empty() || digits.size() > 2 || digits.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(digits) < 1 || std::stoi(digits) > kMaxZstdLevel)
    throw CommandError("compression '" + text + "' is not none, zstd or zstd:LEVEL with LEVEL from 1 to " +
                       std::to_string(kMaxZstdLevel));
  return std::stoi(digits);
}

namespace {

// When pre-copy stops and how it switches over: the convergence policy and post-copy.
void switchover_arguments(Fields& f, const MigrationParameters& parameters, engine::SenderOptions& o) {
  auto& policy = o.policy;
  policy.downtime_target_ms = f.number("downtime-ms", parameters.downtime_limit_ms, 0, 2'000'000);
  policy.max_rounds = static_cast<std::uint32_t>(f.integer("max-iterations", policy.max_rounds, 1, 1000));
  o.postcopy = f.flag("postcopy-ram", false);
  if (f.flag("postcopy", false)) o.postcopy_after_s = 0;
  if (f.has("postcopy-after")) o.postcopy_after_s = f.number("postcopy-after", 0, 0, 1e6);
  o.postcopy = o.postcopy || o.postcopy_after_s.has_value();
  const auto no_convergence = f.text("on-no-convergence", o.postcopy ? "postcopy" : "stop", {"stop", "abort", "postcopy"});
  if (no_convergence == "postcopy" && !o.postcopy)
    throw CommandError("Parameter 'on-no-convergence': postcopy needs post-copy enabled (postcopy-ram, postcopy or postcopy-after)");
  policy.on_no_convergence = no_convergence == "abort"      ? engine::NoConvergence::abort
                             : no_convergence == "postcopy" ? engine::NoConvergence::postcopy
                                                            : engine::NoConvergence::stop;
  policy.improve_within_target = !f.flag("stop-at-target", false);
  policy.auto_converge = f.flag("auto-converge", true);
  policy.throttle_initial_pct = parameters.throttle_initial_pct;
  policy.throttle_step_pct = parameters.throttle_increment_pct;
  policy.throttle_max_pct = parameters.throttle_max_pct;
  if (!f.has("policy")) return;
  try {
    o.policy_plugin = engine::PolicyRegistry::global().make(f.text("policy", ""), policy);
  } catch (const std::invalid_argument& e) {
    throw CommandError(std::string("Parameter 'policy': ") + e.what());
  }
}

}  // namespace

MigrateRequest parse_migrate_arguments(const nlohmann::json& arguments, const MigrationParameters& parameters) {
  Fields f(arguments);
  MigrateRequest request;
  if (!f.has("uri")) throw CommandError("Parameter 'uri' is missing");
  try {
    request.endpoint = transport::Endpoint::parse(f.text("uri", ""));
  } catch (const std::invalid_argument& e) {
    throw CommandError(e.what());
  }
  f.flag("detach", true);
  request.dry_run = f.flag("dry-run", false);
  auto& o = request.options;
  switchover_arguments(f, parameters, o);
  o.offline = f.flag("offline", false);
  o.copy_storage = f.flag("blk", false);  // QEMU's name for block migration
  o.verify = f.flag("verify", true);
  o.dedup = f.flag("dedup", true);
  o.skip_zero_pages = f.flag("zero-skip", true);
  o.page_plan = f.flag("page-plan", true);
  o.peer_timeout = std::chrono::milliseconds(f.integer("peer-timeout", static_cast<std::uint64_t>(o.peer_timeout.count()), 100, 3'600'000));
  o.bandwidth_limit = static_cast<double>(f.integer("bandwidth", parameters.max_bandwidth, 0, std::uint64_t{1} << 40));
  try {
    o.compress_level = f.has("compress") ? parse_compress_level(f.text("compress", "")) : parameters.compress_level;
  } catch (const CommandError& e) {
    throw CommandError(std::string("Parameter 'compress': ") + e.what());
  }
  const bool delta = f.flag("delta", false);
  const auto delta_cache = f.integer("delta-cache", 64ull << 20, engine::kPageSize, std::uint64_t{1} << 36);
  if (delta) o.delta_cache_pages = delta_cache / engine::kPageSize;
  o.channels = static_cast<unsigned>(f.integer("parallel", parameters.channels, 1, wire::kMaxChannels));
  const auto zerocopy = f.text("zerocopy", "auto", {"auto", "on", "off"});
  request.zerocopy = zerocopy == "on" ? ZeroCopyMode::on : zerocopy == "off" ? ZeroCopyMode::off : ZeroCopyMode::automatic;
  const auto tls = tls_credentials(f);
  f.reject_unknown();
  try {
    if (tls.enabled()) request.tls = transport::TlsContext::load(tls, transport::TlsRole::client);
  } catch (const std::exception& e) {
    throw CommandError(e.what());
  }
  return request;
}

}  // namespace mig::control
