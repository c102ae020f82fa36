// Convergence policies as plug-ins: what decides, at each round boundary, whether pre-copy
// goes on, stops, aborts or switches to post-copy, and how hard to throttle the guest.
//
// A policy sees the rounds so far and the live parameters, and nothing else: no clocks, no
// I/O, no state of its own between calls. The same history gives the same answer, so a
// policy is tested as a table of histories, and mig-sim replays it exactly.
//
// Writing one: a file engine/policies/NAME.cpp that defines
//     void register_policy_NAME(mig::engine::PolicyRegistry& registry)
// and adds its factory there (see engine/policies/xen.cpp). CMake finds the file and the
// registry calls it; nothing else changes. `--policy NAME[:key=value,...]` (mig-send) and the
// QMP migrate argument `policy` then choose it. An embedder may also add one at run time
// with PolicyRegistry::global().add().
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../engine/control.h"
#include "../engine/convergence.h"

namespace mig::engine {

// What a policy sees at a round boundary.
struct PolicyView {
  std::span<const RoundStats> rounds;  // every finished round, oldest first; never empty
  Tunables tunables;                   // as the operator has them now (downtime target, throttle steps)
  std::uint32_t max_rounds = 30;       // the engine stops here whatever the policy says
  std::uint64_t guest_pages = 0;
  bool can_throttle = true;            // false once the VM refused a throttle
  bool postcopy_enabled = false;       // start_postcopy is possible
  bool can_limit_dirty_rate = true;    // false once the VM refused a per-vCPU dirty limit
  // What stopping now would cost, by the engine's windowed bandwidth; policies with their
  // own estimate may ignore it.
  double expected_downtime_ms() const;
};

struct PolicyAnswer {
  Decision decision = Decision::next_round;
  unsigned throttle_pct = 0;  // for the next round; the last round's value keeps it as it is
  std::string rule;           // which rule decided, for the round table and the stats ("xen: below 50 dirty pages")
  double dirty_limit_MBps = 0;  // each vCPU's dirty-rate cap for the next round (MB/s); 0 lifts it
};

class MigrationPolicy {
 public:
  virtual ~MigrationPolicy() = default;
  virtual std::string name() const = 0;
  virtual PolicyAnswer decide(const PolicyView& view) const = 0;
};

// A number as a person writes it, for a policy's rules and errors: 3, 2.5, 0.001
// (std::to_string would say 3.000000).
std::string shortest_text(double value);

// NAME:key=value,... as given. Each policy takes the keys it knows; a key no policy read is
// refused, so a typo is an error rather than a silent default.
class PolicyParameters {
 public:
  // Throws std::invalid_argument for a malformed list.
  static PolicyParameters parse(std::string_view list);
  double number(const std::string& key, double fallback, double min, double max);
  std::string text(const std::string& key, const std::string& fallback);
  bool flag(const std::string& key, bool fallback);
  // Throws std::invalid_argument naming the keys nobody read.
  void check_all_used(const std::string& policy) const;

 private:
  std::map<std::string, std::string> values_;
  std::map<std::string, bool> used_;
};

// Makes a policy from its parameters; `base` is the migration's ConvergencePolicy (the
// flags), for policies that build on it.
using PolicyFactory = std::function<std::unique_ptr<MigrationPolicy>(PolicyParameters&, const ConvergencePolicy& base)>;

class PolicyRegistry {
 public:
  // Every policy in engine/policies/, registered once.
  static PolicyRegistry& global();

  void add(const std::string& name, const std::string& summary, PolicyFactory factory);
  // "NAME" or "NAME:key=value,...". Throws std::invalid_argument (an unknown name, listing
  // the known ones; a bad or unknown parameter).
  std::shared_ptr<const MigrationPolicy> make(std::string_view spec, const ConvergencePolicy& base = {}) const;
  // Name and one-line summary of each, sorted by name.
  std::vector<std::pair<std::string, std::string>> list() const;

 private:
  struct Entry {
    std::string summary;
    PolicyFactory factory;
  };
  std::map<std::string, Entry> entries_;
};

// What the engine (and the simulator) does at a round boundary: asks `policy`, then ends
// pre-copy at view.max_rounds whatever it said.
PolicyAnswer decide_within_round_limit(const MigrationPolicy& policy, const PolicyView& view);

// The rules shared by several policies: stuck rounds, the local minimum of what is left.
// Rounds since the fewest dirty pages yet were left (0: the last round set a new low).
std::uint32_t rounds_since_lowest_remaining(std::span<const RoundStats> rounds);
// QEMU's trigger for auto-converge and dirty-limit (its dirty_rate_high_cnt): how many times
// a second round dirtied more than `trigger_pct` of the bytes it sent since the last time.
std::uint32_t qemu_slowdown_triggers(std::span<const RoundStats> rounds, double trigger_pct);

}  // namespace mig::engine
