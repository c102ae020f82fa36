// Xen's rule, from "Live Migration of Virtual Machines" (Clark et al., NSDI 2005) and the
// xc_domain_save of that time. It has no downtime target: the last round starts when any of
//   - 30 rounds have run (max_iters 29 after round 0);
//   - fewer than 50 pages were dirtied in the last round;
//   - a round sent more pages than the one before it (the writable working set outruns the
//     link: more rounds would send more than they save);
//   - 3 times the guest's memory has been sent (max_factor).
// No throttling.
#include "engine/policy.h"

namespace mig::engine {
namespace {

class XenPolicy final : public MigrationPolicy {
 public:
  XenPolicy(std::uint32_t max_rounds, std::uint64_t min_dirty, double max_factor)
      : max_rounds_(max_rounds), min_dirty_(min_dirty), max_factor_(max_factor) {}
  std::string name() const override { return "xen"; }

  PolicyAnswer decide(const PolicyView& view) const override {
    const auto& rounds = view.rounds;
    const RoundStats& last = rounds.back();
    if (rounds.size() >= std::min(max_rounds_, view.max_rounds)) return {Decision::stop_max_rounds, 0, "xen: round limit"};
    if (last.dirty_pages < min_dirty_) return {Decision::stop_converged, 0, "xen: below " + std::to_string(min_dirty_) + " dirty pages"};
    if (rounds.size() >= 2 && last.pages_sent > rounds[rounds.size() - 2].pages_sent)
      return {Decision::stop_no_progress, 0, "xen: a round sent more than the one before"};
    std::uint64_t sent = 0;
    for (const auto& round : rounds) sent += round.pages_sent;
    if (static_cast<double>(sent) > max_factor_ * static_cast<double>(view.guest_pages))
      return {Decision::stop_no_progress, 0, "xen: sent more than " + shortest_text(max_factor_) + "x the memory"};
    return {Decision::next_round, 0, "xen: next round"};
  }

 private:
  const std::uint32_t max_rounds_;
  const std::uint64_t min_dirty_;
  const double max_factor_;
};

}  // namespace

void register_policy_xen(PolicyRegistry& registry) {
  registry.add("xen", "Xen 2005: at most 30 rounds; stop below 50 dirty pages, when rounds grow, or after 3x memory sent",
               [](PolicyParameters& p, const ConvergencePolicy&) {
                 return std::make_unique<XenPolicy>(static_cast<std::uint32_t>(p.number("max_rounds", 30, 1, 1000)),
                                                    static_cast<std::uint64_t>(p.number("min_dirty", 50, 0, 1e12)),
                                                    p.number("max_factor", 3, 1, 1000));
               });
}

}  // namespace mig::engine
