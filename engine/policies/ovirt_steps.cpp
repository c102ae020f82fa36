// oVirt's migration policies (vdsm's convergence schedule): a list of steps
// {stalled rounds -> new downtime}. A round is stalled when what is left did not reach a new
// low; when the count of stalled rounds since the last low reaches a step's limit, the
// downtime allowed rises to that step's value. Past the last step, `then` decides: abort
// (oVirt's default), stop-and-copy, or post-copy. The default schedule is oVirt's "Minimal
// downtime": 1:150, 2:200, 3:300, 4:400, 6:500 (ms).
#include "engine/policy.h"

#include <algorithm>
#include <charconv>
#include <stdexcept>
#include <utility>
#include <vector>

namespace mig::engine {
namespace {

struct Step {
  std::uint32_t stalled_rounds = 0;
  double downtime_ms = 0;
};

// "1:150/2:200/...": stalled rounds and downtime, in rising order of stalled rounds.
std::vector<Step> parse_steps(const std::string& text) {
  std::vector<Step> steps;
  std::size_t start = 0;
  while (start < text.size()) {
    const auto end = std::min(text.find('/', start), text.size());
    const auto item = text.substr(start, end - start);
    const auto colon = item.find(':');
    Step step;
    const auto* first = item.data();
    const auto* last = item.data() + item.size();
    if (colon == std::string::npos || std::from_chars(first, first + colon, step.stalled_rounds).ptr != first + colon ||
        std::from_chars(first + colon + 1, last, step.downtime_ms).ptr != last || step.downtime_ms <= 0 ||
        (!steps.empty() && step.stalled_rounds <= steps.back().stalled_rounds))
      throw std::invalid_argument("ovirt-steps: steps=" + text + " is not STALLED:DOWNTIME_MS/... with STALLED rising");
    steps.push_back(step);
    start = end + 1;
  }
  if (steps.empty()) throw std::invalid_argument("ovirt-steps: steps is empty");
  return steps;
}

class OvirtStepsPolicy final : public MigrationPolicy {
 public:
  OvirtStepsPolicy(std::vector<Step> steps, Decision then) : steps_(std::move(steps)), then_(then) {}
  std::string name() const override { return "ovirt-steps"; }

  PolicyAnswer decide(const PolicyView& view) const override {
    const std::uint32_t stalled = rounds_since_lowest_remaining(view.rounds.subspan(1));
    double downtime_ms = view.tunables.downtime_target_ms;
    std::string rule = "ovirt-steps: initial downtime";
    for (const auto& step : steps_)
      if (stalled >= step.stalled_rounds) {
        downtime_ms = std::max(downtime_ms, step.downtime_ms);
        rule = "ovirt-steps: " + std::to_string(step.stalled_rounds) + " stalled -> " + std::to_string(static_cast<int>(step.downtime_ms)) + " ms";
      }
    if (view.expected_downtime_ms() <= downtime_ms) return {Decision::stop_converged, 0, rule};
    if (stalled > steps_.back().stalled_rounds)
      return {then_, 0, "ovirt-steps: past the last step (" + std::to_string(stalled) + " stalled rounds)"};
    if (view.rounds.size() >= view.max_rounds) return {Decision::stop_max_rounds, 0, "ovirt-steps: round limit"};
    return {Decision::next_round, 0, rule};
  }

 private:
  const std::vector<Step> steps_;
  const Decision then_;
};

Decision parse_then(const std::string& then) {
  if (then == "abort") return Decision::abort_no_progress;
  if (then == "stop") return Decision::stop_no_progress;
  if (then == "postcopy") return Decision::start_postcopy;
  throw std::invalid_argument("ovirt-steps: then=" + then + " is not abort, stop or postcopy");
}

}  // namespace

void register_policy_ovirt_steps(PolicyRegistry& registry) {
  registry.add("ovirt-steps", "oVirt: a schedule of {stalled rounds -> new downtime} steps, then abort",
               [](PolicyParameters& p, const ConvergencePolicy&) {
                 return std::make_unique<OvirtStepsPolicy>(parse_steps(p.text("steps", "1:150/2:200/3:300/4:400/6:500")),
                                                           parse_then(p.text("then", "abort")));
               });
}

}  // namespace mig::engine
