#include "control/domain.h"

#include <vector>

#include "control/json.h"
#include "engine/pages.h"

namespace mig::control {

const char* to_string(RunState state) {
  switch (state) {
    case RunState::prelaunch: return "prelaunch";
    case RunState::inmigrate: return "inmigrate";
    case RunState::running: return "running";
    case RunState::paused: return "paused";
    case RunState::finish_migrate: return "finish-migrate";
    case RunState::postmigrate: return "postmigrate";
    case RunState::shutdown: return "shutdown";
  }
  return "unknown";
}

const char* to_string(DirtyRateStatus status) {
  switch (status) {
    case DirtyRateStatus::unstarted: return "unstarted";
    case DirtyRateStatus::measuring: return "measuring";
    case DirtyRateStatus::measured: return "measured";
    case DirtyRateStatus::failed: return "failed";
  }
  return "unknown";
}

transport::Stream open_migration_stream(const transport::Endpoint& endpoint, ZeroCopyMode mode, const transport::TlsContext* tls) {
  auto stream = transport::connect(endpoint, tls);
  using transport::Stream;
  if (mode == ZeroCopyMode::on && !stream.enable_zerocopy(Stream::ZeroCopy::always))
    throw std::runtime_error(stream.security() == transport::StreamSecurity::tls_user_space
                                 ? "zerocopy on was asked for, but TLS is encrypted in user space here (no kTLS)"
                                 : "zerocopy on was asked for, but the socket refuses SO_ZEROCOPY");
  if (mode == ZeroCopyMode::automatic) stream.enable_zerocopy(Stream::ZeroCopy::unless_copied);
  return stream;
}

Domain::Domain(std::unique_ptr<engine::MigratableVm> vm) : vm_(std::move(vm)), run_state_(RunState::running) {}

Domain::Domain(Incoming incoming) : run_state_(RunState::prelaunch), incoming_(std::move(incoming)) {}

Domain::~Domain() {
  quit();
  for (auto* t : {&outgoing_thread_, &incoming_thread_, &dirty_thread_})
    if (t->joinable()) t->join();
}

// A sink, and the lock a call of it holds. emit calls sinks outside sinks_mutex_, from a
// copy of the list, so a sink just removed may still be under way on another thread (a
// migration's thread reporting its end while a QMP server goes away): unsubscribe takes this
// lock to wait that call out. Recursive, so that a sink may unsubscribe itself.
struct Domain::Subscriber {
  explicit Subscriber(EventSink sink_) : sink(std::move(sink_)) {}
  const EventSink sink;
  std::recursive_mutex calling;
  bool gone = false;  // under `calling`
};

std::uint64_t Domain::subscribe(EventSink sink) {
  std::lock_guard lock(sinks_mutex_);
  sinks_[next_sink_] = std::make_shared<Subscriber>(std::move(sink));
  return next_sink_++;
}

void Domain::unsubscribe(std::uint64_t id) {
  std::shared_ptr<Subscriber> subscriber;
  {
    std::lock_guard lock(sinks_mutex_);
    auto it = sinks_.find(id);
    if (it == sinks_.end()) return;
    subscriber = std::move(it->second);
    sinks_.erase(it);
  }
  std::lock_guard wait_for_call(subscriber->calling);
  subscriber->gone = true;
}

void Domain::emit(const std::string& name, nlohmann::json data) {
  const Event event{name, std::move(data), std::chrono::system_clock::now()};
  std::vector<std::shared_ptr<Subscriber>> subscribers;
  {
    std::lock_guard lock(sinks_mutex_);
    for (const auto& [id, subscriber] : sinks_) subscribers.push_back(subscriber);
  }
  for (const auto& subscriber : subscribers) {
    std::lock_guard call(subscriber->calling);
    if (!subscriber->gone) subscriber->sink(event);
  }
}

void Domain::set_run_state(RunState state) {
  {
    std::lock_guard lock(mutex_);
    run_state_ = state;
  }
  changed_.notify_all();
}

RunState Domain::run_state() const {
  std::lock_guard lock(mutex_);
  return run_state_;
}

nlohmann::json Domain::query_status() const {
  const RunState state = run_state();
  return {{"running", state == RunState::running}, {"singlestep", false}, {"status", to_string(state)}};
}

engine::MigratableVm* Domain::vm() const {
  std::lock_guard lock(mutex_);
  return vm_.get();
}

// stop, cont, migrate and calc-dirty-rate each need the guest here and nothing else using
// it: the engine assumes the guest runs while it migrates, and dirty logging has one user.
void Domain::require_guest_idle(const char* command) const {
  if (!vm_) throw CommandError(std::string(command) + ": no guest here yet (" + to_string(run_state_) + ")");
  // Before "in progress": a completed migration's thread may still be waiting for the
  // destination's heartbeat report, but the guest has left for good.
  if (run_state_ == RunState::postmigrate)
    throw CommandError(std::string(command) + ": the guest has migrated away and must not run here again");
  if (outgoing_active_) throw CommandError(std::string(command) + ": a migration is in progress");
  if (dirty_status_ == DirtyRateStatus::measuring) throw CommandError(std::string(command) + ": a dirty-rate measurement is in progress");
  if (quit_) throw CommandError(std::string(command) + ": the domain is shutting down");
}

void Domain::stop() {
  {
    std::lock_guard lock(mutex_);
    require_guest_idle("stop");
    if (run_state_ != RunState::running) return;
    vm_->pause();
    run_state_ = RunState::paused;
  }
  emit("STOP");
}

void Domain::cont() {
  {
    std::lock_guard lock(mutex_);
    require_guest_idle("cont");
    if (run_state_ != RunState::paused) return;
    vm_->resume();
    run_state_ = RunState::running;
  }
  emit("RESUME");
}

void Domain::quit() {
  std::shared_ptr<engine::MigrationControl> control;
  {
    std::lock_guard lock(mutex_);
    if (quit_) return;
    quit_ = true;
    control = control_;
    if (listener_) listener_->interrupt();
    if (recovery_listener_) recovery_listener_->interrupt();
    if (receiving_) receiving_->abort();
  }
  changed_.notify_all();
  // A cancelled migration resumes the guest before it ends; only then is it stopped here.
  if (control) {
    control->cancel();
    control->abandon();  // a post-copy waiting for recovery gives the guest up
  }
  {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return !outgoing_active_ && !incoming_active_; });
  }
  std::thread measuring;
  {
    std::lock_guard lock(mutex_);
    measuring = std::move(dirty_thread_);
  }
  if (measuring.joinable()) measuring.join();
  {
    std::lock_guard lock(mutex_);
    if (vm_ && run_state_ == RunState::running) vm_->pause();
  }
  // Announced before the state says so: whoever waits for the shutdown may end the process
  // (and its QMP server) at once.
  emit("SHUTDOWN", {{"guest", false}, {"reason", "host-qmp-quit"}});
  set_run_state(RunState::shutdown);
}

bool Domain::wait_quit(std::optional<std::chrono::milliseconds> timeout) const {
  std::unique_lock lock(mutex_);
  auto done = [&] { return run_state_ == RunState::shutdown; };
  if (!timeout) {
    changed_.wait(lock, done);
    return true;
  }
  return changed_.wait_for(lock, *timeout, done);
}

engine::MigrationObserver Domain::migration_observer() {
  engine::MigrationObserver observer;
  observer.status_changed = [this](engine::MigrationStatus status) {
    // The run state follows first, so that whoever reacts to the event sees it.
    // After a post-copy switchover the guest runs at the destination, whatever follows.
    if (status == engine::MigrationStatus::completed || status == engine::MigrationStatus::postcopy_active)
      set_run_state(RunState::postmigrate);
    if (status == engine::MigrationStatus::handoff_unknown) set_run_state(RunState::paused);
    emit("MIGRATION", {{"status", engine::to_string(status)}});
  };
  observer.round_finished = [this](const engine::RoundStats& round) { emit("MIGRATION_PASS", {{"pass", round.round + 1}}); };
  observer.guest_paused = [this] {
    set_run_state(RunState::finish_migrate);
    emit("STOP");
  };
  observer.guest_resumed = [this] {
    set_run_state(RunState::running);
    emit("RESUME");
  };
  return observer;
}

void Domain::migrate(MigrateRequest request) {
  if (request.dry_run) {
    check_destination(request);
    return;
  }
  std::shared_ptr<engine::MigrationControl> control;
  {
    std::lock_guard lock(mutex_);
    require_guest_idle("migrate");
    if (run_state_ != RunState::running) throw CommandError("migrate: the guest is " + std::string(to_string(run_state_)) + ", not running");
    if (outgoing_thread_.joinable()) outgoing_thread_.join();  // the previous one, finished
    control = engine::make_control(request.options, migration_observer());
    control_ = control;
    outgoing_tls_ = request.tls;
    outgoing_active_ = true;
    outgoing_result_.reset();
  }
  control->advance(engine::MigrationStatus::none, engine::MigrationStatus::setup);
  std::lock_guard lock(mutex_);
  outgoing_thread_ = std::thread([this, request = std::move(request), control]() mutable {
    run_outgoing(std::move(request), std::move(control));
  });
}

engine::DestinationCheck Domain::check_destination(const MigrateRequest& request) const {
  engine::MigratableVm* guest = vm();
  if (!guest) throw CommandError("migrate: no guest here yet (" + std::string(to_string(run_state())) + ")");
  try {
    auto stream = transport::connect(request.endpoint, request.tls.get());
    return engine::check_destination(*guest, stream, request.options);
  } catch (const std::exception& e) {
    throw CommandError(std::string("migrate (dry run): ") + e.what());
  }
}

void Domain::run_outgoing(MigrateRequest request, std::shared_ptr<engine::MigrationControl> control) {
  engine::MigrationStats stats;
  try {
    auto open = [endpoint = request.endpoint, mode = request.zerocopy, tls = request.tls] {
      return open_migration_stream(endpoint, mode, tls.get());
    };
    auto stream = open();
    request.options.open_channel = open;
    stats = engine::SourceMigration(*vm_, stream, request.options, control).run();
  } catch (const std::exception& e) {
    // Connecting failed: nothing was touched, the guest runs on.
    stats.status = engine::MigrationStatus::failed;
    stats.error = e.what();
    control->finish(stats);
  }
  {
    std::lock_guard lock(mutex_);
    outgoing_result_ = stats;
    outgoing_active_ = false;
  }
  changed_.notify_all();
}

bool Domain::cancel_migration() {
  const auto control = migration_control();
  return control && control->cancel();
}

void Domain::start_postcopy() {
  const auto control = migration_control();
  if (!control || !control->start_postcopy())
    throw CommandError("migrate-start-postcopy: no migration with post-copy enabled (postcopy-ram) is in pre-copy");
}

std::shared_ptr<engine::MigrationControl> Domain::migration_control() const {
  std::lock_guard lock(mutex_);
  return control_;
}

std::optional<engine::MigrationStats> Domain::wait_migration() const {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return !outgoing_active_; });
  return outgoing_result_;
}

nlohmann::json Domain::query_migrate() const {
  std::unique_lock lock(mutex_);
  if (control_) {
    const auto control = control_;
    lock.unlock();
    return migration_info(control->progress());
  }
  if (incoming_active_)
    return {{"status", "active"}, {"ram", {{"transferred", receiving_ ? receiving_->bytes_received() : 0}}}};
  if (incoming_result_) {
    nlohmann::json info = {{"status", engine::to_string(incoming_result_->status)},
                           {"total-time", static_cast<std::int64_t>(incoming_result_->total_ms)},
                           {"ram", {{"transferred", incoming_result_->bytes_received}}},
                           {"mig", to_json(*incoming_result_)}};
    if (!incoming_result_->error.empty()) info["error-desc"] = incoming_result_->error;
    return info;
  }
  return nlohmann::json::object();
}

MigrationParameters Domain::parameters() const {
  std::lock_guard lock(mutex_);
  return parameters_;
}

void Domain::set_parameters(const nlohmann::json& changes) {
  std::shared_ptr<engine::MigrationControl> control;
  MigrationParameters updated;
  {
    std::lock_guard lock(mutex_);
    updated = apply_parameters(parameters_, changes);
    parameters_ = updated;
    if (outgoing_active_) control = control_;
  }
  if (!control) return;
  // Only what was named changes: a migrate argument that overrode a parameter stays.
  engine::Tunables t = control->tunables();
  const auto wanted = updated.tunables();
  if (changes.contains("downtime-limit")) t.downtime_target_ms = wanted.downtime_target_ms;
  if (changes.contains("max-bandwidth")) t.bandwidth_limit = wanted.bandwidth_limit;
  if (changes.contains("cpu-throttle-initial")) t.throttle_initial_pct = wanted.throttle_initial_pct;
  if (changes.contains("cpu-throttle-increment")) t.throttle_step_pct = wanted.throttle_step_pct;
  if (changes.contains("max-cpu-throttle")) t.throttle_max_pct = wanted.throttle_max_pct;
  control->set_tunables(t);
}

void Domain::calc_dirty_rate(double seconds) {
  if (!(seconds >= 0.1 && seconds <= 60)) throw CommandError("calc-time must be between 0.1 and 60 seconds");
  std::lock_guard lock(mutex_);
  require_guest_idle("calc-dirty-rate");
  if (dirty_thread_.joinable()) dirty_thread_.join();
  dirty_status_ = DirtyRateStatus::measuring;
  dirty_calc_time_ = seconds;
  dirty_start_time_ = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  dirty_thread_ = std::thread([this, seconds] { measure_dirty_rate(seconds); });
}

// Like virsh domdirtyrate-calc: the distinct pages written during the window, under dirty
// logging, per second. Logging is off again afterwards, whatever happened.
void Domain::measure_dirty_rate(double seconds) {
  engine::MigratableVm& vm = *vm_;
  std::optional<double> rate;
  try {
    const auto regions = vm.memory_regions();
    vm.start_dirty_log();
    const auto start = std::chrono::steady_clock::now();
    {
      std::unique_lock lock(mutex_);
      changed_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return quit_; });
    }
    std::uint64_t pages = 0;
    for (std::size_t r = 0; r < regions.size(); ++r) {
      std::vector<std::uint64_t> bitmap(engine::bitmap_words(regions[r].size / engine::kPageSize));
      vm.fetch_dirty_log(r, bitmap);
      pages += engine::count_pages(bitmap, regions[r].size / engine::kPageSize);
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    rate = static_cast<double>(pages * engine::kPageSize) / 1e6 / elapsed;
  } catch (const std::exception&) {
  }
  try {
    vm.stop_dirty_log();
  } catch (const std::exception&) {
    rate.reset();
  }
  std::lock_guard lock(mutex_);
  dirty_status_ = rate ? DirtyRateStatus::measured : DirtyRateStatus::failed;
  dirty_rate_MBps_ = rate.value_or(0);
}

nlohmann::json Domain::query_dirty_rate() const {
  std::lock_guard lock(mutex_);
  nlohmann::json info = {{"status", to_string(dirty_status_)}, {"mode", "dirty-bitmap"}};
  if (dirty_status_ == DirtyRateStatus::unstarted) return info;
  info["start-time"] = dirty_start_time_;
  info["calc-time"] = dirty_calc_time_;
  if (dirty_status_ == DirtyRateStatus::measured) info["dirty-rate"] = static_cast<std::int64_t>(dirty_rate_MBps_ + 0.5);
  return info;
}

std::string Domain::migrate_incoming(const std::string& uri) {
  std::lock_guard lock(mutex_);
  if (!incoming_ || vm_) throw CommandError("migrate-incoming: this domain already has a guest");
  if (run_state_ != RunState::prelaunch) throw CommandError("migrate-incoming: already waiting for an incoming migration");
  try {
    listener_.emplace(transport::Endpoint::parse(uri), incoming_->accept);
  } catch (const std::exception& e) {
    throw CommandError(std::string("migrate-incoming: ") + e.what());
  }
  run_state_ = RunState::inmigrate;
  incoming_active_ = true;
  incoming_thread_ = std::thread([this] { run_incoming(); });
  return listener_->endpoint();
}

void Domain::run_incoming() {
  try {
    // Pre-flight checks (dry runs) are answered on the way: the source comes after them.
    for (bool migrated = false; !migrated;) migrated = receive_one(listener_->accept());
  } catch (const std::exception& e) {
    engine::IncomingStats failed;
    failed.error = e.what();
    finish_incoming(failed);
  }
}

// One connection to the incoming address: a migration (true, whatever its outcome), or a
// dry run answered (false).
bool Domain::receive_one(transport::Stream stream) {
  engine::ReceiverOptions options = incoming_->options;
  options.accept_channel = [this](std::chrono::milliseconds timeout) { return listener_->accept(timeout); };
  options.await_recovery = [this]() -> engine::ReceiverOptions::Accept {
    std::unique_lock lock(mutex_);
    awaiting_recovery_ = true;
    changed_.wait(lock, [&] { return recovery_listener_ || quit_; });
    awaiting_recovery_ = false;
    if (quit_) return {};
    return [this](std::chrono::milliseconds timeout) { return recovery_listener_->accept(timeout); };
  };
  options.hello_received = [this](bool dry_run) {
    if (!dry_run) emit("MIGRATION", {{"status", "active"}});
  };
  engine::IncomingMigration migration(stream, incoming_->make_vm, options);
  {
    std::lock_guard lock(mutex_);
    if (quit_) throw std::runtime_error("the receiver was told to stop");
    receiving_ = &migration;
  }
  auto result = migration.run();
  if (result.stats.dry_run) {
    {
      std::lock_guard lock(mutex_);
      receiving_ = nullptr;
    }
    emit("MIGRATION_CHECK", {{"accepted", result.stats.status == engine::MigrationStatus::completed},
                             {"error", result.stats.error}});
    return false;
  }
  {
    std::lock_guard lock(mutex_);
    if (result.vm) {
      vm_ = std::move(result.vm);
      run_state_ = options.autostart ? RunState::running : RunState::paused;
    }
  }
  finish_incoming(result.stats);
  // The source may not have heard that the guest runs here: it asks again for a while.
  migration.answer_commit_retries();
  return true;
}

void Domain::finish_incoming(const engine::IncomingStats& stats) {
  {
    std::lock_guard lock(mutex_);
    receiving_ = nullptr;
    incoming_result_ = stats;
    incoming_active_ = false;
    if (!vm_ && run_state_ == RunState::inmigrate) run_state_ = RunState::prelaunch;  // migrate-incoming may try again
  }
  changed_.notify_all();
  if (stats.status == engine::MigrationStatus::completed && incoming_->options.autostart) emit("RESUME");
  emit("MIGRATION", {{"status", engine::to_string(stats.status)}});
}

std::string Domain::migrate_recover(const std::string& uri) {
  std::string endpoint;
  {
    std::lock_guard lock(mutex_);
    if (!awaiting_recovery_) throw CommandError("migrate-recover: no incoming post-copy is waiting for recovery");
    try {
      recovery_listener_.emplace(transport::Endpoint::parse(uri), incoming_->accept);
    } catch (const std::exception& e) {
      throw CommandError(std::string("migrate-recover: ") + e.what());
    }
    endpoint = recovery_listener_->endpoint();
  }
  changed_.notify_all();
  return endpoint;
}

void Domain::resume_postcopy(const std::string& uri) {
  transport::Endpoint endpoint;
  try {
    endpoint = transport::Endpoint::parse(uri);
  } catch (const std::exception& e) {
    throw CommandError(std::string("migrate: ") + e.what());
  }
  const auto control = migration_control();
  std::shared_ptr<const transport::TlsContext> tls;
  {
    std::lock_guard lock(mutex_);
    tls = outgoing_tls_;
  }
  if (!control || !control->resume_postcopy([endpoint, tls] { return transport::connect(endpoint, tls.get()); }))
    throw CommandError("migrate: resume asks for a post-copy migration in postcopy-paused, and there is none");
}

std::optional<engine::IncomingStats> Domain::wait_incoming() const {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return (incoming_result_ && !incoming_active_) || run_state_ == RunState::shutdown; });
  return incoming_result_;
}

}  // namespace mig::control
