// mig's own rule (engine/convergence.h): stop when the expected downtime is within the target
// and further rounds no longer shrink it; throttle a guest that dirties as fast as the link
// drains (auto-converge); after rounds of no progress, stop, abort or switch to post-copy.
#include "engine/policy.h"

namespace mig::engine {
namespace {

class MigPolicy final : public MigrationPolicy {
 public:
  explicit MigPolicy(ConvergencePolicy base) : base_(base) {}
  std::string name() const override { return "mig"; }

  PolicyAnswer decide(const PolicyView& view) const override {
    ConvergencePolicy policy = base_;
    policy.downtime_target_ms = view.tunables.downtime_target_ms;
    policy.throttle_initial_pct = view.tunables.throttle_initial_pct;
    policy.throttle_step_pct = view.tunables.throttle_step_pct;
    policy.throttle_max_pct = view.tunables.throttle_max_pct;
    policy.max_rounds = std::min(policy.max_rounds, view.max_rounds);
    // A VM that cannot be slowed: stuck rounds count as no progress at once.
    policy.auto_converge = policy.auto_converge && view.can_throttle;
    const Decision decision = engine::decide(view.rounds, policy);
    return {decision, next_throttle_pct(view.rounds, policy), "mig: " + to_string(decision)};
  }

 private:
  const ConvergencePolicy base_;
};

}  // namespace

void register_policy_mig(PolicyRegistry& registry) {
  registry.add("mig", "mig's default: the downtime target, rounds while they still shrink it, auto-converge",
               [](PolicyParameters& p, const ConvergencePolicy& base) {
                 ConvergencePolicy policy = base;
                 policy.no_progress_rounds = static_cast<std::uint32_t>(p.number("no_progress_rounds", policy.no_progress_rounds, 1, 1000));
                 policy.improve_within_target = p.flag("improve", policy.improve_within_target);
                 policy.auto_converge = p.flag("auto_converge", policy.auto_converge);
                 return std::make_unique<MigPolicy>(policy);
               });
}

}  // namespace mig::engine
