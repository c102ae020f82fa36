#include "engine/policy.h"

#include <algorithm>
#include <charconv>
#include <mutex>
#include <stdexcept>

namespace mig::engine {

// engine/policies/NAME.cpp, each with its register_policy_NAME (the list is made by CMake).
#define MIG_POLICY(name) void register_policy_##name(PolicyRegistry& registry);
#include "builtin_policies.inc"
#undef MIG_POLICY

double PolicyView::expected_downtime_ms() const { return engine::expected_downtime_ms(rounds, ConvergencePolicy{}); }

PolicyParameters PolicyParameters::parse(std::string_view list) {
  PolicyParameters parameters;
  while (!list.empty()) {
    const auto comma = list.find(',');
    const auto item = list.substr(0, comma);
    const auto equals = item.find('=');
    if (equals == std::string_view::npos || equals == 0)
      throw std::invalid_argument("policy parameter '" + std::string(item) + "' is not key=value");
    const std::string key(item.substr(0, equals));
    if (!parameters.values_.emplace(key, std::string(item.substr(equals + 1))).second)
      throw std::invalid_argument("policy parameter '" + key + "' is given twice");
    list = comma == std::string_view::npos ? std::string_view{} : list.substr(comma + 1);
  }
  return parameters;
}

std::string shortest_text(double value) {
  char text[32];
  const auto [end, error] = std::to_chars(text, text + sizeof text, value);
  return error == std::errc{} ? std::string(text, end) : std::to_string(value);
}

double PolicyParameters::number(const std::string& key, double fallback, double min, double max) {
  const auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  used_[key] = true;
  double value = 0;
  const auto& text = it->second;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc{} || end != text.data() + text.size() || value < min || value > max)
    throw std::invalid_argument("policy parameter " + key + "=" + text + " is not a number from " +
                                shortest_text(min) + " to " + shortest_text(max));
  return value;
}

std::string PolicyParameters::text(const std::string& key, const std::string& fallback) {
  const auto it = values_.find(key);
  if (it == values_.end()) return fallback;
  used_[key] = true;
  return it->second;
}

bool PolicyParameters::flag(const std::string& key, bool fallback) {
  const auto value = text(key, fallback ? "1" : "0");
  if (value == "1" || value == "on" || value == "true") return true;
  if (value == "0" || value == "off" || value == "false") return false;
  throw std::invalid_argument("policy parameter " + key + "=" + value + " is not on or off");
}

void PolicyParameters::check_all_used(const std::string& policy) const {
  std::string unknown;
  for (const auto& [key, value] : values_)
    if (!used_.contains(key)) unknown += (unknown.empty() ? "" : ", ") + key;
  if (!unknown.empty()) throw std::invalid_argument("policy " + policy + " has no parameter " + unknown);
}

namespace {
std::mutex registry_mutex;  // add() may run while a migration makes its policy
}

PolicyRegistry& PolicyRegistry::global() {
  static PolicyRegistry registry = [] {
    PolicyRegistry builtin;
#define MIG_POLICY(name) register_policy_##name(builtin);
#include "builtin_policies.inc"
#undef MIG_POLICY
    return builtin;
  }();
  return registry;
}

void PolicyRegistry::add(const std::string& name, const std::string& summary, PolicyFactory factory) {
  std::lock_guard lock(registry_mutex);
  entries_[name] = {summary, std::move(factory)};
}

std::shared_ptr<const MigrationPolicy> PolicyRegistry::make(std::string_view spec, const ConvergencePolicy& base) const {
  const auto colon = spec.find(':');
  const std::string name(spec.substr(0, colon));
  auto parameters = PolicyParameters::parse(colon == std::string_view::npos ? std::string_view{} : spec.substr(colon + 1));
  PolicyFactory factory;
  {
    std::lock_guard lock(registry_mutex);
    const auto it = entries_.find(name);
    if (it == entries_.end()) {
      std::string known;
      for (const auto& [n, entry] : entries_) known += (known.empty() ? "" : ", ") + n;
      throw std::invalid_argument("no policy '" + name + "' (there are: " + known + ")");
    }
    factory = it->second.factory;
  }
  auto policy = factory(parameters, base);
  parameters.check_all_used(name);
  return policy;
}

std::vector<std::pair<std::string, std::string>> PolicyRegistry::list() const {
  std::lock_guard lock(registry_mutex);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [name, entry] : entries_) out.emplace_back(name, entry.summary);
  return out;
}

PolicyAnswer decide_within_round_limit(const MigrationPolicy& policy, const PolicyView& view) {
  auto answer = policy.decide(view);
  if (answer.decision == Decision::next_round && view.rounds.size() >= view.max_rounds) {
    answer.decision = Decision::stop_max_rounds;
    answer.rule = "the round limit (" + std::to_string(view.max_rounds) + ")";
  }
  return answer;
}

std::uint32_t rounds_since_lowest_remaining(std::span<const RoundStats> rounds) {
  std::uint32_t since = 0;
  std::uint64_t lowest = UINT64_MAX;
  for (const auto& round : rounds) {
    if (round.dirty_pages < lowest) {
      lowest = round.dirty_pages;
      since = 0;
    } else {
      ++since;
    }
  }
  return since;
}

std::uint32_t qemu_slowdown_triggers(std::span<const RoundStats> rounds, double trigger_pct) {
  std::uint32_t triggers = 0, high_rounds = 0;
  for (const auto& round : rounds) {
    const double dirtied = static_cast<double>(round.dirty_pages * kPageSize);
    if (dirtied <= static_cast<double>(round.bytes_sent) * trigger_pct / 100 || ++high_rounds < 2) continue;
    high_rounds = 0;  // QEMU counts afresh after each step
    ++triggers;
  }
  return triggers;
}

}  // namespace mig::engine
