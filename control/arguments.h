// Migration commands as JSON arguments, checked: QEMU's migration parameters
// (migrate-set-parameters) and the arguments of migrate, which take mig's own options too.
// mig-send's command line becomes these same arguments, so every path is checked here.
#pragma once

#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

#include "engine/source_migration.h"
#include "transport/endpoint.h"

namespace mig::control {

// A command that cannot be carried out, with QEMU's error class ("GenericError",
// "CommandNotFound", ...) and a one-line description.
struct CommandError : std::runtime_error {
  explicit CommandError(const std::string& desc, std::string class_name = "GenericError")
      : std::runtime_error(desc), error_class(std::move(class_name)) {}
  std::string error_class;
};

// The defaults of the next migration. Those that are engine::Tunables also steer a running
// one. JSON names are QEMU's.
struct MigrationParameters {
  double downtime_limit_ms = 30;   // "downtime-limit"
  std::uint64_t max_bandwidth = 0; // "max-bandwidth", bytes/s; 0 = unlimited (QEMU's default is 128 MiB/s)
  unsigned channels = 1;           // "multifd-channels"
  unsigned throttle_initial_pct = 20, throttle_increment_pct = 10, throttle_max_pct = 99;  // "cpu-throttle-initial", ...
  int compress_level = 0;          // "multifd-compression" none|zstd with "multifd-zstd-level"; 0 = none

  engine::Tunables tunables() const;
};
nlohmann::json to_json(const MigrationParameters& parameters);
// migrate-set-parameters: the fields present in `changes` applied to `current`. Throws
// CommandError naming the first bad one; nothing is applied then.
MigrationParameters apply_parameters(MigrationParameters current, const nlohmann::json& changes);

enum class ZeroCopyMode { automatic, on, off };

struct MigrateRequest {
  transport::Endpoint endpoint;
  engine::SenderOptions options;  // everything but open_channel, which needs the endpoint
  ZeroCopyMode zerocopy = ZeroCopyMode::automatic;
  std::shared_ptr<const transport::TlsContext> tls;  // every connection of the migration, when set
  bool dry_run = false;  // only ask the destination whether it would take the guest
};
// migrate's arguments: "uri" (tcp:HOST:PORT or unix:PATH) and mig's options, each overriding
// the parameter it corresponds to for this migration:
//   offline, verify, dedup, zero-skip, page-plan, delta, stop-at-target, auto-converge: booleans
//   compress: "none", "zstd" or "zstd:LEVEL"      delta-cache: bytes      parallel: 1..16
//   bandwidth: bytes/s      downtime-ms: ms      max-iterations: 1..1000
//   on-no-convergence: "stop" | "abort" | "postcopy"      zerocopy: "auto" | "on" | "off"
//   postcopy-ram: enable post-copy (switch on migrate-start-postcopy, or when pre-copy is stuck)
//   dry-run: only the pre-flight check (engine::check_destination); migrate returns its answer
//   postcopy: enable it and switch once round 0 is done      postcopy-after: seconds of pre-copy, then switch
//   tls-creds: an x509 directory (QEMU's layout: ca-cert.pem, client-cert.pem, client-key.pem)
//   tls-psk: a key file of IDENTITY:HEXKEY lines      tls-hostname: the name the destination's
//   certificate must carry (default: the host in uri). The credentials are loaded here, so a bad
//   file fails the command, not the migration.
// QEMU's "detach" is accepted (a migration always runs in the background).
MigrateRequest parse_migrate_arguments(const nlohmann::json& arguments, const MigrationParameters& parameters);

// "zstd" (level 1), "zstd:LEVEL" (1 to 19) or "none" (0). Throws CommandError otherwise.
int parse_compress_level(const std::string& text);

}  // namespace mig::control
