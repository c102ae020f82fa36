// A guest as an operator sees it (libvirt's "domain"): its run state, its migrations in
// both directions, the migration parameters, and a dirty-rate measurement - each command a
// method, every change announced as an event. The QMP server is a thin layer over this, and
// mig-vm, mig-send and mig-recv are built on it too. Thread-safe.
//
// Run states are QEMU's:
//   prelaunch ─migrate_incoming─▶ inmigrate ─(guest arrives)─▶ running ◀─cont/stop─▶ paused
//   running ─migrate─▶ (finish-migrate while paused for the switchover) ─▶ postmigrate
//   any ─quit─▶ shutdown
// A guest that migrated away never runs here again: cont refuses in postmigrate.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "control/arguments.h"
#include "engine/control.h"
#include "engine/incoming_migration.h"
#include "engine/source_migration.h"
#include "transport/endpoint.h"

namespace mig::control {

enum class RunState { prelaunch, inmigrate, running, paused, finish_migrate, postmigrate, shutdown };
const char* to_string(RunState state);

// QEMU's DirtyRateStatus, for calc-dirty-rate.
enum class DirtyRateStatus { unstarted, measuring, measured, failed };
const char* to_string(DirtyRateStatus status);

// An asynchronous event, as QMP sends it: MIGRATION, MIGRATION_PASS, STOP, RESUME, SHUTDOWN.
struct Event {
  std::string name;
  nlohmann::json data;
  std::chrono::system_clock::time_point time;
};

// Connects to `endpoint` for a migration, through `tls` when given, with MSG_ZEROCOPY as
// `mode` asks (under TLS encrypted in user space, there is none to ask for).
transport::Stream open_migration_stream(const transport::Endpoint& endpoint, ZeroCopyMode mode, const transport::TlsContext* tls);

class Domain {
 public:
  using EventSink = std::function<void(const Event&)>;
  struct Incoming {
    engine::VmFactory make_vm;
    engine::ReceiverOptions options;  // accept_channel is the domain's own
    transport::AcceptPolicy accept;   // who may connect to migrate_incoming's and migrate_recover's listeners
  };

  // A domain whose guest runs now.
  explicit Domain(std::unique_ptr<engine::MigratableVm> vm);
  // A domain waiting for its guest to arrive (migrate_incoming).
  explicit Domain(Incoming incoming);
  // Cancels whatever runs (an outgoing migration resumes the guest first) and joins.
  ~Domain();
  Domain(const Domain&) = delete;
  Domain& operator=(const Domain&) = delete;

  // Sinks are called on whichever thread caused the event, never with the domain locked,
  // one call of a sink at a time. unsubscribe returns once no call of that sink is under
  // way, so whatever the sink uses may go right after (a sink may unsubscribe itself).
  std::uint64_t subscribe(EventSink sink);
  void unsubscribe(std::uint64_t id);

  RunState run_state() const;
  nlohmann::json query_status() const;
  // The guest; null until one is here. Valid while the domain lives.
  engine::MigratableVm* vm() const;

  void stop();
  void cont();
  // Cancels a migration in progress, stops the guest and announces SHUTDOWN; whoever owns
  // the domain then ends the process (wait_quit).
  void quit();
  bool wait_quit(std::optional<std::chrono::milliseconds> timeout = std::nullopt) const;

  // Starts migrating the guest away in the background. Throws CommandError when it cannot
  // start (no running guest, a migration or measurement in progress).
  void migrate(MigrateRequest request);
  // migrate's dry run: asks the destination whether it would take this guest, as `request`
  // would migrate it; its no (or silence) is the CommandError. Only reads the guest's description.
  engine::DestinationCheck check_destination(const MigrateRequest& request) const;
  bool cancel_migration();
  // migrate-start-postcopy: throws CommandError unless a migration with post-copy enabled runs
  // and has not switched yet.
  void start_postcopy();
  nlohmann::json query_migrate() const;
  // Blocks until the outgoing migration in progress (if any) ends; the last one's result.
  std::optional<engine::MigrationStats> wait_migration() const;
  std::shared_ptr<engine::MigrationControl> migration_control() const;

  MigrationParameters parameters() const;
  // migrate-set-parameters: changes the defaults of the next migration and, for the
  // tunables among them, the running one at its next round boundary.
  void set_parameters(const nlohmann::json& changes);

  // calc-dirty-rate: counts the pages the guest writes over `seconds`, in the background.
  void calc_dirty_rate(double seconds);
  nlohmann::json query_dirty_rate() const;

  // Waits on `uri` for the incoming guest, in the background; returns where to send it
  // (the real port for tcp:HOST:0). Throws CommandError unless waiting for a guest.
  std::string migrate_incoming(const std::string& uri);
  // migrate-recover: a post-copy whose link broke waits for its source to reconnect on
  // `uri`; returns the address to give the source (migrate with resume). Throws CommandError
  // unless an incoming post-copy waits for recovery.
  std::string migrate_recover(const std::string& uri);
  // migrate {"resume": true, "uri"}: reconnects a postcopy-paused outgoing migration there.
  void resume_postcopy(const std::string& uri);

  // Blocks until an incoming migration has ended, or the domain quit; the last result.
  std::optional<engine::IncomingStats> wait_incoming() const;

 private:
  void emit(const std::string& name, nlohmann::json data = nlohmann::json::object());
  void set_run_state(RunState state);
  engine::MigrationObserver migration_observer();
  void run_outgoing(MigrateRequest request, std::shared_ptr<engine::MigrationControl> control);
  void run_incoming();
  bool receive_one(transport::Stream stream);
  void finish_incoming(const engine::IncomingStats& stats);
  void measure_dirty_rate(double seconds);
  void require_guest_idle(const char* command) const;  // with mutex_ held

  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::unique_ptr<engine::MigratableVm> vm_;
  RunState run_state_;
  bool quit_ = false;
  MigrationParameters parameters_;

  // Outgoing.
  std::shared_ptr<engine::MigrationControl> control_;
  std::shared_ptr<const transport::TlsContext> outgoing_tls_;  // the migration's, for a post-copy recovery
  bool outgoing_active_ = false;
  std::optional<engine::MigrationStats> outgoing_result_;
  std::thread outgoing_thread_;

  // Incoming.
  std::optional<Incoming> incoming_;
  std::optional<transport::Listener> listener_;
  engine::IncomingMigration* receiving_ = nullptr;  // while one runs, for quit()
  bool awaiting_recovery_ = false;                  // an incoming post-copy lost its link
  std::optional<transport::Listener> recovery_listener_;
  bool incoming_active_ = false;
  std::optional<engine::IncomingStats> incoming_result_;
  std::thread incoming_thread_;

  // Dirty rate.
  DirtyRateStatus dirty_status_ = DirtyRateStatus::unstarted;
  double dirty_rate_MBps_ = 0, dirty_calc_time_ = 0;
  std::int64_t dirty_start_time_ = 0;
  std::thread dirty_thread_;

  struct Subscriber;
  std::mutex sinks_mutex_;
  std::map<std::uint64_t, std::shared_ptr<Subscriber>> sinks_;
  std::uint64_t next_sink_ = 1;
};

}  // namespace mig::control
