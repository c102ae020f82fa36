// What the command-line tools share: migrate options as flags, signals, progress and
// summary lines, stats files and exit codes. Everything a flag means is decided by
// control::parse_migrate_arguments, which the flags are turned into.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace mig::tools {

// Exit codes of mig-send and mig-recv (also in README.md).
enum ExitCode : int {
  kExitMigrated = 0,         // mig-send: the destination runs the guest. mig-recv: ran the guest to the end
  kExitSetupError = 1,       // bad image, /dev/kvm unusable, cannot listen, bad endpoint, bad option
  kExitMigrationFailed = 2,  // the migration failed or was cancelled; the source kept its guest running
  kExitHandoffUnknown = 3,   // connection lost between Commit and Running: the guest may run remotely
  kExitGuestFailed = 4,      // the guest itself crashed (triple fault, internal error)
};

// --version, as "TOOL VERSION" (what help2man reads for the man pages).
void add_version_flag(CLI::App& app, const char* tool);

// A size in bytes with K/M/G suffixes (binary). A negative one is refused, where CLI11 alone
// would wrap it around into an absurd size.
CLI::Option* size_option(CLI::Option* option);

// A CLI11 check from a parser that throws: the parser's message is the option's error.
template <typename Parse>
std::function<std::string(const std::string&)> parses_with(Parse parse) {
  return [parse](const std::string& value) {
    try {
      parse(value);
      return std::string();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
  };
}

// mig's migrate options as command-line flags (mig-send, mig-ctl migrate). Only the flags
// given become arguments, so a domain's migration parameters stay the defaults.
class MigrateFlags {
 public:
  void add_to(CLI::App& app);
  // migrate's QMP arguments for a migration to `uri`.
  nlohmann::json arguments(const std::string& uri) const;

 private:
  double downtime_ms_ = 30;
  unsigned max_iterations_ = 30, parallel_ = 1;
  std::string on_no_convergence_ = "stop", policy_, zerocopy_ = "auto", compress_, tls_creds_, tls_psk_, tls_hostname_;
  std::uint64_t bandwidth_ = 0, delta_cache_ = 64ull << 20;
  bool offline_ = false, no_verify_ = false, no_dedup_ = false, no_page_plan_ = false, no_zero_skip_ = false;
  bool check_ = false, copy_storage_ = false, delta_ = false, stop_at_target_ = false, no_auto_converge_ = false, postcopy_ = false, postcopy_ram_ = false;
  double postcopy_after_ = 0, peer_timeout_s_ = 10;
  void add_switchover_flags(CLI::App& app);
  void add_content_flags(CLI::App& app);
  void add_connection_flags(CLI::App& app);
  // Records a flag with the migrate argument it becomes when given.
  void given(CLI::Option* option, std::function<void(nlohmann::json&)> argument);

  // Each flag, and how it becomes a migrate argument when given.
  std::vector<std::pair<CLI::Option*, std::function<void(nlohmann::json&)>>> given_;
};

// SIGINT, SIGTERM and SIGUSR1 as calls instead of interruptions: blocked in every thread
// (construct it before starting any), taken by a thread of its own.
class ControlSignals {
 public:
  enum class Signal { none, usr1, terminate };
  ControlSignals();
  ~ControlSignals();
  ControlSignals(const ControlSignals&) = delete;
  ControlSignals& operator=(const ControlSignals&) = delete;

  // Calls `callback` on SIGINT or SIGTERM for as long as the returned hook lives: declare
  // the hook after whatever the callback uses, so it is gone first: its end waits for a
  // call under way.
  class TerminateHook {
   public:
    explicit TerminateHook(ControlSignals& signals) : signals_(signals) {}
    ~TerminateHook() { signals_.set_on_terminate({}); }
    TerminateHook(const TerminateHook&) = delete;
    TerminateHook& operator=(const TerminateHook&) = delete;

   private:
    ControlSignals& signals_;
  };
  [[nodiscard]] TerminateHook on_terminate(std::function<void()> callback);
  // Waits up to `seconds` (forever if negative) for SIGUSR1 or a termination signal.
  Signal wait(double seconds);
  bool terminating() const { return terminating_; }

 private:
  void watch();
  void set_on_terminate(std::function<void()> callback);
  std::mutex mutex_;
  std::condition_variable signalled_, callback_returned_;
  std::function<void()> on_terminate_;
  bool usr1_ = false;
  bool calling_ = false;  // the watcher is in on_terminate_'s callback
  std::atomic<bool> terminating_{false}, stop_{false};
  std::thread watcher_;
};

// One line for a terminal from query-migrate's reply: round, percent sent, rates, throttle.
std::string progress_line(const nlohmann::json& info);
// One line for stderr summarising a finished migration, from query-migrate's reply.
std::string summary_line(const nlohmann::json& info);
// The pre-copy rounds of a stats JSON's round_table (a real run's or mig-sim's), one line each.
std::string round_table_text(const nlohmann::json& rounds);
// Writes `json` to `path` (nothing for an empty path), whole: a regular file is replaced by
// a rename, so a reader sees the old text or the new, never part of one. A path that cannot
// be written is reported on stderr and returns false: a statistics file never costs a guest.
bool write_stats_json(const std::string& path, const nlohmann::json& json);
// Exit code for a finished outgoing migration's status.
int exit_code_for(const std::string& status);

}  // namespace mig::tools
