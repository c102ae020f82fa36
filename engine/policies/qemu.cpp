// QEMU's rule (migration/migration.c and ram.c, as of 7.x-8.x): switch over as soon as what
// is left fits in the downtime limit, with no other stopping rule; and auto-converge: when the
// bytes dirtied in a period exceed throttle_trigger_threshold (50 %) of the bytes sent in it
// for the second time, throttle the vCPUs by cpu-throttle-initial (20 %), then by
// cpu-throttle-increment (10 %) more each time, up to cpu-throttle-max (99 %). QEMU has no
// round limit; mig's max_rounds still applies.
#include "engine/policy.h"

#include <algorithm>

namespace mig::engine {
namespace {

class QemuPolicy final : public MigrationPolicy {
 public:
  QemuPolicy(bool auto_converge, double trigger_pct) : auto_converge_(auto_converge), trigger_pct_(trigger_pct) {}
  std::string name() const override { return "qemu"; }

  PolicyAnswer decide(const PolicyView& view) const override {
    const unsigned throttle = auto_converge_ && view.can_throttle ? throttle_pct(view) : 0;
    if (view.expected_downtime_ms() <= view.tunables.downtime_target_ms)
      return {Decision::stop_converged, throttle, "qemu: within the downtime limit"};
    if (view.rounds.size() >= view.max_rounds) return {Decision::stop_max_rounds, throttle, "qemu: mig's round limit"};
    return {Decision::next_round, throttle, "qemu: above the downtime limit"};
  }

 private:
  // The first trigger throttles by throttle_initial_pct, as QEMU sets it (unbounded by the
  // maximum); each later one adds a step, up to the maximum.
  unsigned throttle_pct(const PolicyView& view) const {
    const std::uint32_t triggers = qemu_slowdown_triggers(view.rounds, trigger_pct_);
    if (triggers <= 1) return triggers == 0 ? 0 : view.tunables.throttle_initial_pct;
    const auto pct = view.tunables.throttle_initial_pct + std::uint64_t{triggers - 1} * view.tunables.throttle_step_pct;
    return static_cast<unsigned>(std::min<std::uint64_t>(view.tunables.throttle_max_pct, pct));
  }

  const bool auto_converge_;
  const double trigger_pct_;
};

}  // namespace

void register_policy_qemu(PolicyRegistry& registry) {
  registry.add("qemu", "QEMU: the downtime limit only, and QEMU's auto-converge steps",
               [](PolicyParameters& p, const ConvergencePolicy& base) {
                 return std::make_unique<QemuPolicy>(p.flag("auto_converge", base.auto_converge),
                                                     p.number("trigger_pct", 50, 1, 100));
               });
}

}  // namespace mig::engine
