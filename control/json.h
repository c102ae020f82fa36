// The JSON edge of mig: statistics files and QMP replies. The engine speaks in typed values;
// this is the only place they become JSON field names.
#pragma once

#include <nlohmann/json.hpp>

#include "engine/control.h"
#include "engine/source_migration.h"
#include "engine/stats.h"

namespace mig::control {

// --stats-json of a source ("role": "source") and of a destination ("role": "destination").
nlohmann::json to_json(const engine::MigrationStats& stats);
nlohmann::json to_json(const engine::IncomingStats& stats);
nlohmann::json to_json(const engine::RoundStats& round);
nlohmann::json to_json(const engine::PostcopyStats& postcopy);
nlohmann::json to_json(const engine::DiskStats& disk);
nlohmann::json to_json(const engine::LatencySummary& latency);
// migrate's dry-run reply: {"channels", "postcopy", "shared-memory"}.
nlohmann::json to_json(const engine::DestinationCheck& check);

// QEMU's MigrationInfo (query-migrate) for a migration in any state, with mig's own fields
// under "mig".
nlohmann::json migration_info(const engine::MigrationProgress& progress);

}  // namespace mig::control
