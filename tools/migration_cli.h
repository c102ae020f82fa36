// What mig-send and mig-recv share: the outgoing-migration options, signals, the progress
// line, the stats file, and the exit codes.
#pragma once

#include <CLI/CLI.hpp>

#include <optional>
#include <string>

#include "engine/receiver.h"
#include "engine/sender.h"
#include "tools/kvm_vm.h"

namespace mig::tools {

// Exit codes of mig-send and mig-recv (also in README.md).
enum ExitCode : int {
  kExitMigrated = 0,       // mig-send: the destination runs the guest. mig-recv: ran the guest to the end
  kExitSetupError = 1,     // bad image, /dev/kvm unusable, cannot listen, bad endpoint
  kExitMigrationFailed = 2,  // the migration failed; the source kept its guest running
  kExitHandoffUnknown = 3,   // connection lost between Commit and Running: the guest may run remotely
  kExitGuestFailed = 4,      // the guest itself crashed (triple fault, internal error)
};

struct SendOptions {
  std::string to;
  double downtime_ms = 30;
  unsigned max_iterations = 30;
  std::string on_no_convergence = "stop";
  bool offline = false;
  bool no_verify = false;
  bool no_dedup = false;
  bool no_page_plan = false;
  bool no_zero_skip = false;
  std::string zerocopy = "auto";
  std::uint64_t bandwidth = 0;  // bytes per second, 0 = unlimited
  std::string compress;         // "", "zstd" or "zstd:LEVEL"
  bool delta = false;
  unsigned parallel = 1;
  bool stop_at_target = false;
  bool no_auto_converge = false;
  std::uint64_t delta_cache = 64ull << 20;

  void add_to(CLI::App& app, const std::string& to_flag, bool to_required);
  engine::SenderOptions sender_options() const;
};

// Blocks SIGUSR1, SIGINT and SIGTERM in every thread (call before any thread starts), so
// that wait_for_signal() can take them synchronously.
void block_control_signals();
// Waits up to `seconds` (forever if negative) for one of them; returns it, or 0 on timeout.
int wait_for_signal(double seconds);

// Connects and migrates `vm`, printing a progress line on a terminal. Never throws.
engine::MigrationStats migrate_to(KvmVm& vm, const SendOptions& options);

// Writes the stats (plus the local guest's heartbeat summary, if any) as JSON to `path`;
// an empty path writes nothing.
void write_stats_json(const std::string& path, const std::string& role, const engine::MigrationStats& stats,
                      const kvm::Machine* local_guest);

// One line for stderr summarising a migration, from the sending or the receiving side.
std::string summary_line(const engine::MigrationStats& stats);
std::string receive_summary_line(const engine::MigrationStats& stats);

}  // namespace mig::tools
