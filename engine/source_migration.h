// The source side of a migration, as named phases:
//
//   run()
//     set_up()            handshake, same-host memory hand-over, extra channels
//     start_tracking()    dirty logging on (or, offline, pause now)
//     plan_round_zero()   which pages may hold data; tell the receiver
//     precopy()           rounds while the guest runs, until the policy (or the operator) stops them
//     stop_and_copy()     pause, last dirty disk chunks and pages; shared disks handed over
//     send_device_state() vCPU, VM and device state
//     await_ready()       the receiver verifies and restores
//     commit()            the point of no return: the destination resumes the guest
//   or, switching to post-copy instead of the final round:
//     switch_to_postcopy() pause, and note the pages the destination lacks
//     send_device_state(), await_ready() (with the list of those pages), commit()
//     postcopy()          serve the destination's faults, push the rest; recover a broken link
//   and one outcome: completed, failed, cancelled or handoff-unknown (see MigrationStats).
//
// Whatever the source set up (dirty logging, throttling, the pause) is undone by one
// rollback guard unless the migration committed. Nothing here throws for a failed migration.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>

#include "../engine/control.h"
#include "../engine/convergence.h"
#include "../engine/policy.h"
#include "../engine/stats.h"
#include "../engine/vm.h"
#include "../transport/stream.h"

namespace mig::engine {

struct RoundCounts;  // engine/page_sender.h

struct SenderOptions {
  // The starting point; the downtime target and throttle steps can change while the
  // migration runs (MigrationControl::set_tunables).
  ConvergencePolicy policy;
  // What decides at each round boundary (engine/policy.h); null: "mig" with `policy`.
  // Whatever it says, pre-copy stops after policy.max_rounds.
  std::shared_ptr<const MigrationPolicy> policy_plugin;
  bool offline = false;  // pause first and copy everything once: a cold migration
  bool verify = true;    // page-hash verification at completion
  bool dedup = true;     // skip a dirty page whose contents equal a version it surely sent (page_hashes.h)
  // Skip never-touched pages in round 0 (found without faulting them in) and zero pages the
  // receiver already holds as zero. Off: every page is read and sent, for measuring the gain.
  bool skip_zero_pages = true;
  // Bytes per second for pre-copy page data; 0 = unlimited. The paused final round is not
  // limited: by then the downtime is what matters. The convergence estimate uses the
  // bandwidth measured under the limit, so it stays on the safe side.
  double bandwidth_limit = 0;
  int compress_level = 0;  // zstd level for page batches; 0 = off
  // Pages kept to delta-encode against (XBZRLE-style); 0 = off. Pages enter the cache when
  // resent after round 0, which is when a page shows it is being rewritten.
  std::size_t delta_cache_pages = 0;
  // Hand guest memory over instead of copying it when the VM can share it and the stream
  // is a UNIX socket (same host).
  bool share_memory = true;
  // Tell the receiver which pages round 0 carries, so it can back them with memory ahead of
  // the stream instead of faulting on each page as it lands.
  bool page_plan = true;
  // Connections for page data. Each carries the pages of its share of guest memory (by
  // address, see wire::kChannelChunkPages) on its own thread. `open_channel` connects one
  // more to the same receiver; needed when channels > 1.
  unsigned channels = 1;
  std::function<transport::Stream()> open_channel;
  // Post-copy: offered to the receiver, and a connection of its own opened for urgent pages
  // (open_channel is needed). The switch comes when `postcopy_after_s` seconds of pre-copy
  // have passed (0: as soon as round 0 is done), when the operator asks
  // (MigrationControl::start_postcopy), or when pre-copy stops making progress. Round 0 is
  // always finished first; a later round is cut short at the next batch.
  bool postcopy = false;
  std::optional<double> postcopy_after_s;
  // --copy-storage-all: the VM's disks travel with it (engine/disk_migration.h); otherwise
  // they are shared storage and change owner at the switchover.
  bool copy_storage = false;
  // A peer silent this long (or trickling a frame slower than per_frame_deadline allows) fails
  // the migration, and the guest runs on here: how soon a stalled link is noticed.
  std::chrono::milliseconds peer_timeout{10000};
  std::chrono::milliseconds handover_wait{2000};  // for the guest-observed downtime report
  // When the connection breaks after Commit and before Running, the source asks the
  // destination again (CommitRetry, through open_channel) for this long before it reports
  // handoff-unknown. Keep it below the receiver's handoff_grace.
  std::chrono::milliseconds handoff_retry{10000};

  // The tunables these options start from.
  Tunables tunables() const;
};

// The control of a migration with `options`, steerable from the moment the migration is
// started: migrate-start-postcopy may come before the migration's thread has set anything up.
std::shared_ptr<MigrationControl> make_control(const SenderOptions& options, MigrationObserver observer = {});

// The pre-flight check (mig-send --check, QMP migrate's dry-run): tells the receiver at the
// other end of `stream` about the guest (shape, CPU, TSC rate) and what a migration with
// `options` would ask (its channels, post-copy) as that migration would, and returns once it
// said it would take it. Throws with the receiver's reason when it would not, when it would
// not take the post-copy asked for, or when it does not answer within options.peer_timeout.
// Nothing of the VM changes, and nothing is sent but the description. Not checked: disks,
// and what only the destination's VM knows (hugetlbfs memory cannot take post-copy).
struct DestinationCheck {
  std::uint32_t channels = 1;  // the page channels it would accept (fewer than asked: the rest are not used)
  bool postcopy = false;       // false where the memory would be handed over: nothing is left to copy late
  bool shared_memory = false;  // it would take the guest's memory as it is (a same-host hand-over)
};
DestinationCheck check_destination(MigratableVm& vm, transport::Stream& stream, const SenderOptions& options);

class SourceMigration {
 public:
  // `control` (from make_control) may be shared with whoever steers the migration; without
  // one, the migration makes its own.
  SourceMigration(MigratableVm& vm, transport::Stream& stream, SenderOptions options,
                  std::shared_ptr<MigrationControl> control = nullptr);
  ~SourceMigration();
  SourceMigration(const SourceMigration&) = delete;
  SourceMigration& operator=(const SourceMigration&) = delete;

  MigrationControl& control() { return *control_; }

  // Runs the migration to its outcome; call once.
  //   completed        the destination runs the guest; the VM stays paused and must not run again.
  //   failed           something went wrong before the commit; the VM runs again (it was
  //                    resumed if this paused it), dirty logging is off, stats.error says why.
  //   cancelled        as failed, because MigrationControl::cancel() asked.
  //   handoff-unknown  the connection broke after Commit was sent and before Running came back:
  //                    the destination may be running the guest, so the VM stays paused.
  MigrationStats run();

 private:
  struct State;
  void enter_phase(Phase phase);  // for failures to name, and progress() to show
  void set_up();
  void hand_over_memory(const std::vector<int>& fds);
  void open_channels();
  void start_tracking();
  void plan_round_zero();
  void precopy();
  bool precopy_round(std::uint32_t round);
  void record_round(std::uint32_t round, const RoundCounts& counts, double seconds);
  PolicyView policy_view() const;
  void adjust_throttle(unsigned wanted_pct);
  void adjust_dirty_limit(double wanted_MBps);
  void apply_tunables();
  void stop_and_copy();
  void hand_over_disks();
  void send_device_state();
  void await_ready();
  void commit();
  wire::Running ask_again_after_commit(const std::exception& lost);
  bool postcopy_wanted() const;
  void switch_to_postcopy();
  void postcopy();
  void finish_postcopy();
  void reconnect_postcopy();
  void report_guest_handover();
  void fail(const std::exception& error);
  void finish_statistics();
  std::uint64_t total_bytes_sent() const;  // every connection, closed ones included

  std::unique_ptr<State> s_;
  std::shared_ptr<MigrationControl> control_;
};

}  // namespace mig::engine
