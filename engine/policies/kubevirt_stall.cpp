// KubeVirt's view of a migration that stalls (its progress monitor, which acts when the
// remaining data stops reaching new lows), turned into a switchover rule: go on while the
// expected downtime is above the target and what is left keeps reaching new lows; once
// `stall_rounds` rounds have passed without a new low, switch over at the next round that
// comes back to within `slack` of the lowest seen (a local minimum of the remaining bytes),
// by post-copy where it is enabled, else by stop-and-copy.
#include "engine/policy.h"

#include <algorithm>

namespace mig::engine {
namespace {

class KubevirtStallPolicy final : public MigrationPolicy {
 public:
  KubevirtStallPolicy(std::uint32_t stall_rounds, double slack) : stall_rounds_(stall_rounds), slack_(slack) {}
  std::string name() const override { return "kubevirt-stall"; }

  PolicyAnswer decide(const PolicyView& view) const override {
    if (view.expected_downtime_ms() <= view.tunables.downtime_target_ms)
      return {Decision::stop_converged, 0, "kubevirt-stall: within the downtime target"};
    if (view.rounds.size() >= view.max_rounds) return {Decision::stop_max_rounds, 0, "kubevirt-stall: round limit"};
    // Round 0 sent all memory: the lows are those of the rounds after it. Stalled: the
    // rounds before this one went `stall_rounds` in a row without a new low.
    const auto rounds = view.rounds.subspan(1);
    if (rounds.size() < 2) return {Decision::next_round, 0, "kubevirt-stall: progressing"};
    const auto before = rounds.first(rounds.size() - 1);
    if (rounds_since_lowest_remaining(before) < stall_rounds_) return {Decision::next_round, 0, "kubevirt-stall: progressing"};
    std::uint64_t lowest = UINT64_MAX;
    for (const auto& round : before) lowest = std::min(lowest, round.dirty_pages);
    if (static_cast<double>(rounds.back().dirty_pages) > (1 + slack_) * static_cast<double>(lowest))
      return {Decision::next_round, 0, "kubevirt-stall: stalled, waiting for a local minimum"};
    return {view.postcopy_enabled ? Decision::start_postcopy : Decision::stop_no_progress, 0,
            "kubevirt-stall: stalled, switching over at a local minimum"};
  }

 private:
  const std::uint32_t stall_rounds_;
  const double slack_;
};

}  // namespace

void register_policy_kubevirt_stall(PolicyRegistry& registry) {
  registry.add("kubevirt-stall", "KubeVirt-style: once progress stalls, switch over at a local minimum of what is left",
               [](PolicyParameters& p, const ConvergencePolicy&) {
                 return std::make_unique<KubevirtStallPolicy>(static_cast<std::uint32_t>(p.number("stall_rounds", 3, 1, 1000)),
                                                              p.number("slack", 0.1, 0, 10));
               });
}

}  // namespace mig::engine
