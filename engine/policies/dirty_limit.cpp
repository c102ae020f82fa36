// QEMU 8.1's dirty-limit (migration/ram.c, system/dirtylimit.c): QEMU's rule with a different
// brake. It stops as QEMU does, as soon as what is left fits in the downtime limit. Where
// auto-converge would throttle every vCPU (on every second round that dirtied more than
// throttle_trigger_threshold, 50 %, of what it sent), dirty-limit instead caps each vCPU's
// dirty rate at vcpu-dirty-limit (1 MB/s). A vCPU that dirties less is not touched, so a
// guest whose writers are few keeps its other vCPUs at full speed. The cap needs the VM to
// know which vCPU dirtied which page (KVM's dirty ring); without that the policy goes on with
// the downtime limit alone, as QEMU would refuse the capability.
#include "engine/policy.h"

namespace mig::engine {
namespace {

class DirtyLimitPolicy final : public MigrationPolicy {
 public:
  DirtyLimitPolicy(double limit_MBps, double trigger_pct) : limit_MBps_(limit_MBps), trigger_pct_(trigger_pct) {}
  std::string name() const override { return "dirty-limit"; }

  PolicyAnswer decide(const PolicyView& view) const override {
    const bool limited = view.can_limit_dirty_rate && qemu_slowdown_triggers(view.rounds, trigger_pct_) > 0;
    PolicyAnswer answer{Decision::next_round, 0, "dirty-limit: above the downtime limit", limited ? limit_MBps_ : 0};
    if (view.expected_downtime_ms() <= view.tunables.downtime_target_ms) {
      answer.decision = Decision::stop_converged;
      answer.rule = "dirty-limit: within the downtime limit";
    } else if (view.rounds.size() >= view.max_rounds) {
      answer.decision = Decision::stop_max_rounds;
      answer.rule = "dirty-limit: mig's round limit";
    } else if (!view.can_limit_dirty_rate) {
      answer.rule = "dirty-limit: above the downtime limit, and the VM cannot limit its vCPUs' dirty rates";
    }
    return answer;
  }

 private:
  const double limit_MBps_;
  const double trigger_pct_;
};

}  // namespace

void register_policy_dirty_limit(PolicyRegistry& registry) {
  registry.add("dirty-limit", "QEMU 8.1: the downtime limit, and a dirty-rate cap on each vCPU that dirties memory fast",
               [](PolicyParameters& p, const ConvergencePolicy&) {
                 return std::make_unique<DirtyLimitPolicy>(p.number("limit", 1, 0.001, 1e6),
                                                           p.number("trigger_pct", 50, 1, 100));
               });
}

}  // namespace mig::engine
