// The C API (mig/mig.h) over the C++ engine: a VM of callbacks becomes an
// engine::MigratableVm, a migration is a SourceMigration or IncomingMigration on a thread of
// its own, and exceptions become result codes plus a thread-local message. No exception
// crosses into C.
#include "mig/mig.h"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <bit>
#include <cstdio>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/populated_pages.h"
#include "engine/incoming_migration.h"
#include "engine/source_migration.h"
#include "transport/endpoint.h"

namespace {

using namespace mig;

static_assert(MIG_PAGE_SIZE == engine::kPageSize);
static_assert(MIG_STATUS_HANDOFF_UNKNOWN == static_cast<int>(engine::MigrationStatus::handoff_unknown),
              "mig_status mirrors engine::MigrationStatus, value for value");

thread_local std::string last_error;

// A failure the caller caused or must handle, with the code it is reported as.
struct Failure : std::runtime_error {
  mig_result code;
  Failure(mig_result code_, const std::string& message) : std::runtime_error(message), code(code_) {}
};

void require(bool condition, const char* what) {
  if (!condition) throw Failure(MIG_ERR_INVALID, what);
}

// Runs `body`, turning whatever it throws into a code and last_error.
template <typename Body>
mig_result guarded(Body body) {
  try {
    last_error.clear();
    return body();
  } catch (const Failure& e) {
    last_error = e.what();
    return e.code;
  } catch (const std::invalid_argument& e) {
    last_error = e.what();
    return MIG_ERR_INVALID;
  } catch (const transport::PeerError& e) {
    last_error = e.what();
    return MIG_ERR_CONNECT;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return MIG_ERR_INTERNAL;
  } catch (const std::exception& e) {
    last_error = e.what();
    return MIG_ERR_INTERNAL;
  }
}

// A failure once the guest ran at the destination in post-copy cannot resume the source:
// neither side holds the whole guest.
bool guest_lost(const engine::MigrationStats& s) { return s.failed_phase == engine::Phase::postcopy; }
bool guest_lost(const engine::IncomingStats& s) { return s.postcopy.has_value(); }

template <typename Stats>
mig_result result_of(const Stats& s) {
  switch (s.status) {
    case engine::MigrationStatus::completed: return MIG_OK;
    case engine::MigrationStatus::cancelled: return MIG_ERR_CANCELLED;
    case engine::MigrationStatus::handoff_unknown: return MIG_ERR_HANDOFF_UNKNOWN;
    default: return guest_lost(s) ? MIG_ERR_GUEST_LOST : MIG_ERR_FAILED;
  }
}

mig_status to_c(engine::MigrationStatus status) { return static_cast<mig_status>(status); }

mig_round to_c(const engine::RoundStats& r) {
  return {r.round,        r.pages_sent,     r.pages_skipped, r.bytes_sent,           r.dirty_pages, r.duration_s * 1000,
          r.dirty_rate_Bps, r.bandwidth_Bps, r.expected_downtime_ms, r.throttle_pct};
}

void copy_error(const std::string& error, mig_outcome& out) {
  const std::size_t n = std::min(error.size(), sizeof out.error - 1);
  std::memcpy(out.error, error.data(), n);
  out.error[n] = '\0';
}

// What a source's and a destination's statistics both say; `bytes` went out or came in.
template <typename Stats>
mig_outcome outcome_of(const Stats& s, std::uint64_t bytes) {
  mig_outcome out{};
  out.status = to_c(s.status);
  copy_error(s.error, out);
  out.total_ms = s.total_ms;
  out.rounds = s.rounds;
  out.guest_bytes = s.guest_bytes;
  out.bytes = bytes;
  out.verified = s.verified;
  out.postcopy = s.postcopy.has_value();
  out.postcopy_recoveries = s.postcopy ? s.postcopy->recoveries : 0;
  out.shared_memory = s.shared_memory;
  return out;
}

mig_outcome to_c(const engine::MigrationStats& s) {
  auto out = outcome_of(s, s.bytes_sent);
  out.downtime_ms = s.downtime_ms;
  return out;
}

mig_outcome to_c(const engine::IncomingStats& s) { return outcome_of(s, s.bytes_received); }

std::shared_ptr<const transport::TlsContext> load_tls(const char* x509_dir, const char* psk_file,
                                                      transport::TlsCredentials credentials, transport::TlsRole role) {
  credentials.x509_dir = x509_dir ? x509_dir : "";
  credentials.psk_file = psk_file ? psk_file : "";
  if (!credentials.enabled()) return nullptr;
  require(!x509_dir || !psk_file, "TLS takes x509 credentials or a PSK file, not both");
  try {
    return transport::TlsContext::load(credentials, role);
  } catch (const std::runtime_error& e) {
    throw Failure(MIG_ERR_INVALID, e.what());  // a missing or bad credentials file
  }
}

// Waits until `result` is set (by the migration's thread, under `mutex`) or `timeout_ms` has
// passed (negative: for ever); then the outcome, and the code that goes with it.
template <typename Stats>
mig_result wait_outcome(std::mutex& mutex, std::condition_variable& finished, const std::optional<Stats>& result,
                        std::int64_t timeout_ms, mig_outcome* out, const char* still_running) {
  std::unique_lock lock(mutex);
  const auto done = [&] { return result.has_value(); };
  if (timeout_ms < 0) finished.wait(lock, done);
  else if (!finished.wait_for(lock, std::chrono::milliseconds(timeout_ms), done)) throw Failure(MIG_ERR_TIMEOUT, still_running);
  if (out) *out = to_c(*result);
  const mig_result code = result_of(*result);
  if (code != MIG_OK) last_error = result->error;
  return code;
}

// A mapping of this process, as /proc/self/maps describes it. A VMM's memory is only
// pointers to the C API, and what backs them decides what mig may do with it.
struct Mapping {
  bool is_private = false;
  dev_t device = 0;
  unsigned long inode = 0;  // 0: anonymous memory
  bool at_region_offset = false;  // maps the file at the offset the region's bytes have from its start
};

// The mappings that make up `region`'s memory; empty when part of it is not mapped at all.
std::vector<Mapping> mappings_of(const engine::MemoryRegion& region) {
  const auto first = reinterpret_cast<unsigned long>(region.host), last = first + region.size;
  unsigned long covered = first;  // the file lists mappings by address
  std::vector<Mapping> mappings;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; covered < last && std::getline(maps, line);) {
    unsigned long start = 0, end = 0, offset = 0, inode = 0;
    unsigned major_number = 0, minor_number = 0;
    char permissions[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s %lx %x:%x %lu", &start, &end, permissions, &offset, &major_number,
                    &minor_number, &inode) != 7 ||
        end <= covered || start >= last)
      continue;
    if (start > covered) return {};
    mappings.push_back({permissions[3] == 'p', makedev(major_number, minor_number), inode, start - offset == first});
    covered = end;
  }
  if (covered < last) return {};
  return mappings;
}

// After a hand-over the guest must resume on the source's memory, never on memory of the
// VMM's own that reads as zeros.
bool maps_file(const engine::MemoryRegion& region, int fd) {
  struct stat file {};
  const auto mappings = mappings_of(region);
  return ::fstat(fd, &file) == 0 && !mappings.empty() && std::all_of(mappings.begin(), mappings.end(), [&](const Mapping& m) {
           return m.inode == file.st_ino && m.device == file.st_dev;
         });
}

// mig_populated_pages' test of what backs [host, host + size): "" where the kernel's answer
// holds, else why not.
std::string populated_pages_unknowable(const engine::MemoryRegion& region, int fd) {
  const auto mappings = mappings_of(region);
  if (mappings.empty()) return "part of the memory is not mapped";
  if (fd < 0)
    return std::all_of(mappings.begin(), mappings.end(), [](const Mapping& m) { return m.is_private && m.inode == 0; })
               ? ""
               : "the memory is not private anonymous memory: pass the file it maps";
  struct stat file {};
  if (::fstat(fd, &file) != 0) return "fd " + std::to_string(fd) + " is not open";
  return std::all_of(mappings.begin(), mappings.end(),
                     [&](const Mapping& m) {
                       return !m.is_private && m.at_region_offset && m.inode == file.st_ino && m.device == file.st_dev;
                     })
             ? ""
             : "the memory is not fd " + std::to_string(fd) + " mapped MAP_SHARED from its offset 0";
}

// Post-copy traps missing pages with userfaultfd and drops stale ones with MADV_DONTNEED,
// which leaves a shared file's pages in place: stale data the guest would read unawares.
std::string postcopy_unsupported_by(std::span<const engine::MemoryRegion> regions) {
  for (std::size_t i = 0; i < regions.size(); ++i) {
    const auto mappings = mappings_of(regions[i]);
    if (mappings.empty() || std::any_of(mappings.begin(), mappings.end(), [](const Mapping& m) { return !m.is_private || m.inode != 0; }))
      return "memory region " + std::to_string(i) + " is not private anonymous memory, which post-copy needs";
  }
  return {};
}

// A callback's negative errno becomes the migration's error, naming the callback.
void check_callback(const std::string& callback, int rc) {
  if (rc < 0) throw std::runtime_error(callback + " failed: " + std::strerror(-rc));
  if (rc > 0) throw std::runtime_error(callback + " failed with " + std::to_string(rc));
}

}  // namespace

// ---- a VM of callbacks -------------------------------------------------------------------

struct mig_state_writer {
  std::vector<engine::StateSection>* sections;
};

struct mig_extent_writer {
  std::vector<engine::DiskExtent>* extents;
};

namespace {

// A disk of callbacks (mig_vm_add_disk).
class CallbackDisk final : public engine::MigratableDisk {
 public:
  CallbackDisk(const mig_disk_ops& ops, void* opaque, const mig_disk_info& info)
      : ops_(ops), opaque_(opaque), size_(info.size), chunk_bytes_(info.chunk_bytes), path_(info.path ? info.path : "") {}

  std::uint64_t size() const override { return size_; }
  std::string path() const override { return path_; }
  std::uint64_t chunk_bytes() const override { return chunk_bytes_; }

  std::vector<engine::DiskExtent> data_extents() override {
    if (!ops_.data_extents) return {{0, size_}};
    std::vector<engine::DiskExtent> extents;
    mig_extent_writer writer{&extents};
    check("data_extents", ops_.data_extents(opaque_, &writer));
    return extents;
  }
  void track_writes(bool on) override { check("track_writes", ops_.track_writes(opaque_, on ? 1 : 0)); }
  void fetch_written(std::span<std::uint64_t> bitmap) override {
    std::fill(bitmap.begin(), bitmap.end(), 0);
    check("fetch_written", ops_.fetch_written(opaque_, bitmap.data(), bitmap.size()));
  }
  void read(std::uint64_t offset, std::span<std::byte> out) override {
    check("read", ops_.read(opaque_, offset, out.data(), out.size()));
  }
  void write(std::uint64_t offset, std::span<const std::byte> data) override {
    check("write", ops_.write(opaque_, offset, data.data(), data.size()));
  }
  void write_zeroes(std::uint64_t offset, std::uint64_t length) override {
    check("write_zeroes", ops_.write_zeroes(opaque_, offset, length));
  }
  void release() override {
    if (ops_.release) check("release", ops_.release(opaque_));
  }
  void reacquire() override {
    if (ops_.reacquire) check("reacquire", ops_.reacquire(opaque_));
  }

 private:
  void check(const char* callback, int rc) const {
    check_callback("disk callback " + std::string(callback) + (path_.empty() ? "" : " (" + path_ + ")"), rc);
  }

  const mig_disk_ops ops_;
  void* const opaque_;
  const std::uint64_t size_, chunk_bytes_;
  const std::string path_;
};

}  // namespace

struct mig_vm final : engine::MigratableVm {
  mig_vm(const mig_vm_ops& ops_, void* opaque_, unsigned vcpus_, std::vector<engine::MemoryRegion> regions_)
      : ops(ops_), opaque(opaque_), vcpus(vcpus_), regions(std::move(regions_)) {}

  unsigned vcpu_count() const override { return vcpus; }
  std::vector<engine::MemoryRegion> memory_regions() const override { return regions; }
  void start_dirty_log() override { check("start_dirty_log", ops.start_dirty_log(opaque)); }
  void stop_dirty_log() override { check("stop_dirty_log", ops.stop_dirty_log(opaque)); }
  void fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) override {
    std::fill(bitmap.begin(), bitmap.end(), 0);
    check("fetch_dirty_log", ops.fetch_dirty_log(opaque, region, bitmap.data(), bitmap.size()));
  }
  void fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) override {
    if (!fetch_unarmed) return fetch_dirty_log(region, bitmap);
    std::fill(bitmap.begin(), bitmap.end(), 0);
    check("fetch_dirty_log_unarmed", fetch_unarmed(opaque, region, bitmap.data(), bitmap.size()));
  }
  void rearm_dirty_pages(std::size_t region, std::uint64_t first_page, std::span<const std::uint64_t> pages) override {
    if (rearm) check("rearm_dirty_pages", rearm(opaque, region, first_page, pages.data(), pages.size()));
  }
  bool set_throttle(double share) override { return ops.set_throttle && ops.set_throttle(opaque, share) == 0; }
  bool set_vcpu_dirty_limit(double bytes_per_s) override {
    return vcpu_dirty_limit && vcpu_dirty_limit(opaque, bytes_per_s) == 0;
  }
  void pause() override { check("pause", ops.pause(opaque)); }
  void resume() override { check("resume", ops.resume(opaque)); }

  std::vector<engine::StateSection> save_state() override {
    std::vector<engine::StateSection> sections;
    mig_state_writer writer{&sections};
    check("save_state", ops.save_state(opaque, &writer));
    return sections;
  }

  void restore_state(const std::vector<engine::StateSection>& sections) override {
    std::vector<mig_state_section> views;
    for (const auto& s : sections) views.push_back({s.name.c_str(), s.version, s.data.data(), s.data.size()});
    check("restore_state", ops.restore_state(opaque, views.data(), views.size()));
  }

  std::string postcopy_unsupported() const override { return postcopy_unsupported_by(regions); }
  std::vector<int> shareable_memory_fds() const override { return memory_fds; }
  void populated_pages(std::size_t region, std::span<std::uint64_t> bitmap) override {
    if (!populated) return engine::MigratableVm::populated_pages(region, bitmap);
    std::fill(bitmap.begin(), bitmap.end(), 0);
    check("populated_pages", populated(opaque, region, bitmap.data(), bitmap.size()));
  }

  std::vector<engine::MigratableDisk*> disks() override {
    std::vector<engine::MigratableDisk*> out;
    for (const auto& disk : added_disks) out.push_back(disk.get());
    return out;
  }

  static void check(const char* callback, int rc) { check_callback(std::string("VM callback ") + callback, rc); }

  const mig_vm_ops ops;
  mig_vcpu_dirty_limit_fn vcpu_dirty_limit = nullptr;  // mig_vm_set_vcpu_dirty_limit's; none by default
  std::vector<std::unique_ptr<CallbackDisk>> added_disks;  // mig_vm_add_disk's, in order
  std::vector<int> memory_fds;   // mig_vm_set_memory_fds'; borrowed
  mig_populated_pages_fn populated = nullptr;  // mig_vm_set_populated_pages'; none: every page may hold data
  mig_fetch_dirty_log_unarmed_fn fetch_unarmed = nullptr;  // mig_vm_set_late_rearm's pair; none: armed at
  mig_rearm_dirty_pages_fn rearm = nullptr;                // each fetch
  void* const opaque;
  const unsigned vcpus;
  const std::vector<engine::MemoryRegion> regions;
};

// ---- the source ------------------------------------------------------------------------

struct mig_migration {
  std::shared_ptr<engine::MigrationControl> control;
  std::shared_ptr<const transport::TlsContext> tls;  // the start's, for a post-copy recovery too
  std::thread thread;
  std::mutex mutex;
  std::condition_variable finished;
  std::optional<engine::MigrationStats> result;

  void run(mig_vm& vm, transport::Stream stream, engine::SenderOptions options) {
    auto stats = engine::SourceMigration(vm, stream, std::move(options), control).run();
    {
      std::lock_guard lock(mutex);
      result = std::move(stats);
    }
    finished.notify_all();
  }
};

namespace {

engine::SenderOptions sender_options(const mig_send_options& o) {
  require(o.downtime_ms > 0, "downtime_ms must be positive");
  require(o.bandwidth >= 0, "bandwidth must not be negative");
  require(o.max_rounds >= 1, "max_rounds must be at least 1");
  require(o.channels >= 1 && o.channels <= wire::kMaxChannels, "channels must be 1 to 16");
  require(o.compress_level >= 0 && o.compress_level <= 19, "compress_level must be 0 (off) to 19");
  require(o.peer_timeout_ms > 0, "peer_timeout_ms must be positive");
  engine::SenderOptions options;
  options.policy.downtime_target_ms = o.downtime_ms;
  options.policy.max_rounds = o.max_rounds;
  options.channels = o.channels;
  options.policy.auto_converge = o.auto_converge != 0;
  options.bandwidth_limit = o.bandwidth;
  options.compress_level = o.compress_level;
  options.verify = o.verify != 0;
  options.peer_timeout = std::chrono::milliseconds(o.peer_timeout_ms);
  options.copy_storage = o.copy_storage != 0;
  options.postcopy = o.postcopy != 0;
  if (o.postcopy && o.postcopy_after_ms >= 0) options.postcopy_after_s = o.postcopy_after_ms / 1000;
  // As mig-send does: a guest that will not converge switches to post-copy where it can.
  if (o.postcopy) options.policy.on_no_convergence = engine::NoConvergence::postcopy;
  if (o.policy) options.policy_plugin = engine::PolicyRegistry::global().make(o.policy, options.policy);
  return options;
}

// The source's options for a migration to `uri`, and the TLS they connect with.
struct SenderSetUp {
  engine::SenderOptions options;
  std::shared_ptr<const transport::TlsContext> tls;
};
SenderSetUp sender_to(const char* uri, const mig_send_options& o) {
  SenderSetUp set_up{sender_options(o), nullptr};
  const auto endpoint = transport::Endpoint::parse(uri);
  transport::TlsCredentials credentials;
  credentials.hostname = o.tls_hostname ? o.tls_hostname : "";
  set_up.tls = load_tls(o.tls_creds_dir, o.tls_psk_file, credentials, transport::TlsRole::client);
  // Opens the first connection and the extra channels, and is how the source asks again
  // after a connection lost at the commit.
  set_up.options.open_channel = [endpoint, tls = set_up.tls] { return transport::connect(endpoint, tls.get()); };
  return set_up;
}

engine::MigrationObserver observer_of(const mig_send_options& o) {
  if (!o.on_event) return {};
  auto emit = [callback = o.on_event, opaque = o.event_opaque](mig_event event) { callback(opaque, &event); };
  return {
      [emit](engine::MigrationStatus status) { emit({MIG_EVENT_STATUS, to_c(status), {}}); },
      [emit](const engine::RoundStats& round) { emit({MIG_EVENT_ROUND, MIG_STATUS_NONE, to_c(round)}); },
      [emit] { emit({MIG_EVENT_GUEST_PAUSED, MIG_STATUS_NONE, {}}); },
      [emit] { emit({MIG_EVENT_GUEST_RESUMED, MIG_STATUS_NONE, {}}); },
  };
}

}  // namespace

extern "C" {

const char* mig_version(void) { return MIG_VERSION_STRING; }
int mig_api_version(void) { return MIG_API_VERSION; }

const char* mig_result_name(mig_result result) {
  switch (result) {
    case MIG_OK: return "ok";
    case MIG_ERR_INVALID: return "invalid";
    case MIG_ERR_STATE: return "state";
    case MIG_ERR_CONNECT: return "connect";
    case MIG_ERR_TIMEOUT: return "timeout";
    case MIG_ERR_FAILED: return "failed";
    case MIG_ERR_CANCELLED: return "cancelled";
    case MIG_ERR_HANDOFF_UNKNOWN: return "handoff-unknown";
    case MIG_ERR_INTERNAL: return "internal";
    case MIG_ERR_GUEST_LOST: return "guest-lost";
  }
  return "unknown";
}

const char* mig_last_error(void) { return last_error.c_str(); }

const char* mig_status_name(mig_status status) {
  if (status < MIG_STATUS_NONE || status > MIG_STATUS_HANDOFF_UNKNOWN) return "unknown";
  return engine::to_string(static_cast<engine::MigrationStatus>(status));
}

mig_result mig_state_add(mig_state_writer* writer, const char* name, uint32_t version, const void* data, size_t size) {
  return guarded([&] {
    require(writer && name && *name, "mig_state_add needs a writer and a name");
    require(data || size == 0, "mig_state_add: data is NULL");
    const auto* bytes = static_cast<const std::byte*>(data);
    writer->sections->push_back({name, version, std::vector<std::byte>(bytes, bytes + size)});
    return MIG_OK;
  });
}

mig_result mig_vm_new(const mig_vm_ops* ops, void* opaque, unsigned vcpus, const mig_memory_region* regions,
                      size_t region_count, mig_vm** out) {
  return guarded([&] {
    require(ops && out, "mig_vm_new needs ops and out");
    require(ops->start_dirty_log && ops->stop_dirty_log && ops->fetch_dirty_log && ops->pause && ops->resume &&
                ops->save_state && ops->restore_state,
            "mig_vm_new: every callback but set_throttle is required");
    require(vcpus >= 1, "mig_vm_new: a VM has at least one vCPU");
    require(regions && region_count >= 1, "mig_vm_new: a VM has at least one memory region");
    std::vector<engine::MemoryRegion> described;
    for (size_t i = 0; i < region_count; ++i) {
      const auto& r = regions[i];
      require(r.host && r.size && r.size % MIG_PAGE_SIZE == 0 && r.guest_addr % MIG_PAGE_SIZE == 0,
              "mig_vm_new: a region needs a mapping, and page-aligned, non-empty guest_addr and size");
      described.push_back({r.guest_addr, r.size, static_cast<std::byte*>(r.host)});
    }
    *out = new mig_vm(*ops, opaque, vcpus, std::move(described));
    return MIG_OK;
  });
}

void mig_vm_free(mig_vm* vm) { delete vm; }

mig_result mig_vm_set_vcpu_dirty_limit(mig_vm* vm, mig_vcpu_dirty_limit_fn set_vcpu_dirty_limit) {
  return guarded([&] {
    require(vm, "mig_vm_set_vcpu_dirty_limit needs a VM");
    vm->vcpu_dirty_limit = set_vcpu_dirty_limit;
    return MIG_OK;
  });
}

mig_result mig_vm_set_memory_fds(mig_vm* vm, const int* fds, size_t count) {
  return guarded([&] {
    require(vm && fds, "mig_vm_set_memory_fds needs a VM and fds");
    require(count == vm->regions.size(), "mig_vm_set_memory_fds: one fd per memory region");
    require(std::all_of(fds, fds + count, [](int fd) { return fd >= 0; }), "mig_vm_set_memory_fds: an fd is negative");
    vm->memory_fds.assign(fds, fds + count);
    return MIG_OK;
  });
}

mig_result mig_vm_set_populated_pages(mig_vm* vm, mig_populated_pages_fn populated_pages) {
  return guarded([&] {
    require(vm, "mig_vm_set_populated_pages needs a VM");
    vm->populated = populated_pages;
    return MIG_OK;
  });
}

mig_result mig_vm_set_late_rearm(mig_vm* vm, mig_fetch_dirty_log_unarmed_fn fetch_dirty_log_unarmed,
                                 mig_rearm_dirty_pages_fn rearm_dirty_pages) {
  return guarded([&] {
    require(vm, "mig_vm_set_late_rearm needs a VM");
    require(!fetch_dirty_log_unarmed == !rearm_dirty_pages,
            "mig_vm_set_late_rearm: both callbacks or neither (a log fetched unarmed that is never re-armed "
            "reports every page again)");
    vm->fetch_unarmed = fetch_dirty_log_unarmed;
    vm->rearm = rearm_dirty_pages;
    return MIG_OK;
  });
}

mig_result mig_populated_pages(const void* host, uint64_t size, int fd, uint64_t* bitmap, size_t words) {
  return guarded([&] {
    require(host && bitmap, "mig_populated_pages needs memory and a bitmap");
    require(size && size % MIG_PAGE_SIZE == 0 && reinterpret_cast<std::uintptr_t>(host) % MIG_PAGE_SIZE == 0,
            "mig_populated_pages: host and size must be page-aligned, and size not 0");
    const std::uint64_t pages = size / MIG_PAGE_SIZE;
    require(words >= (pages + 63) / 64, "mig_populated_pages: the bitmap is too small for the memory");
    const engine::MemoryRegion region{0, size, static_cast<std::byte*>(const_cast<void*>(host))};
    const auto why_not = populated_pages_unknowable(region, fd);
    if (!why_not.empty()) throw Failure(MIG_ERR_INVALID, "mig_populated_pages: " + why_not);
    const std::span<std::uint64_t> out(bitmap, words);
    if (fd < 0)
      mark_populated_anonymous(region.host, pages, out);
    else
      mark_populated_file(region.host, fd, pages, out);
    return MIG_OK;
  });
}

mig_result mig_extent_add(mig_extent_writer* writer, uint64_t offset, uint64_t length) {
  return guarded([&] {
    require(writer, "mig_extent_add needs a writer");
    writer->extents->push_back({offset, length});
    return MIG_OK;
  });
}

mig_result mig_vm_add_disk(mig_vm* vm, const mig_disk_ops* ops, void* opaque, const mig_disk_info* info) {
  return guarded([&] {
    require(vm && ops && info, "mig_vm_add_disk needs a VM, ops and info");
    require(ops->track_writes && ops->fetch_written && ops->read && ops->write && ops->write_zeroes,
            "mig_vm_add_disk: every callback but data_extents, release and reacquire is required");
    require(!ops->release == !ops->reacquire, "mig_vm_add_disk: release and reacquire go together");
    require(info->size > 0 && info->size % 512 == 0 && info->size <= wire::kMaxDiskBytes,
            "mig_vm_add_disk: size must be a multiple of 512, from 512 bytes to 16 TiB");
    require(std::has_single_bit(info->chunk_bytes) && info->chunk_bytes >= wire::kMinDiskChunk &&
                info->chunk_bytes <= wire::kMaxDiskChunk,
            "mig_vm_add_disk: chunk_bytes must be a power of two from 4 KiB to 1 MiB");
    require(!info->path || std::strlen(info->path) <= wire::kMaxPathBytes, "mig_vm_add_disk: the path is too long");
    require(vm->added_disks.size() < wire::kMaxDisks, "mig_vm_add_disk: a VM has at most 16 disks");
    vm->added_disks.push_back(std::make_unique<CallbackDisk>(*ops, opaque, *info));
    return MIG_OK;
  });
}

void mig_send_options_init(mig_send_options* options) {
  if (!options) return;
  *options = {};
  const engine::SenderOptions defaults;
  options->downtime_ms = defaults.policy.downtime_target_ms;
  options->max_rounds = defaults.policy.max_rounds;
  options->channels = defaults.channels;
  options->verify = defaults.verify;
  options->auto_converge = defaults.policy.auto_converge;
  options->peer_timeout_ms = static_cast<unsigned>(defaults.peer_timeout.count());
  options->postcopy_after_ms = -1;
}

mig_result mig_migration_start(mig_vm* vm, const char* uri, const mig_send_options* options, mig_migration** out) {
  return guarded([&] {
    require(vm && uri && options && out, "mig_migration_start needs a vm, a uri, options and out");
    auto [sender, tls] = sender_to(uri, *options);
    auto stream = sender.open_channel();

    auto migration = std::make_unique<mig_migration>();
    migration->tls = tls;
    migration->control = engine::make_control(sender, observer_of(*options));
    migration->control->advance(engine::MigrationStatus::none, engine::MigrationStatus::setup);
    migration->thread = std::thread(&mig_migration::run, migration.get(), std::ref(*vm), std::move(stream), std::move(sender));
    *out = migration.release();
    return MIG_OK;
  });
}

mig_result mig_check_destination(mig_vm* vm, const char* uri, const mig_send_options* options, mig_destination_check* out) {
  return guarded([&] {
    require(vm && uri && options && out, "mig_check_destination needs a vm, a uri, options and out");
    const auto [sender, tls] = sender_to(uri, *options);
    auto stream = sender.open_channel();
    engine::DestinationCheck check;
    try {
      check = engine::check_destination(*vm, stream, sender);
    } catch (const transport::PeerError&) {
      throw;  // unreachable or silent: MIG_ERR_CONNECT
    } catch (const std::runtime_error& e) {
      throw Failure(MIG_ERR_FAILED, e.what());  // its refusal, or an answer no migration could go on from
    }
    *out = {check.channels, check.postcopy ? 1 : 0, check.shared_memory ? 1 : 0};
    return MIG_OK;
  });
}

mig_result mig_migration_progress(mig_migration* migration, mig_progress* out) {
  return guarded([&] {
    require(migration && out, "mig_migration_progress needs a migration and out");
    const auto p = migration->control->progress();
    *out = {to_c(p.status), p.elapsed_ms,   p.guest_bytes,     p.bytes_sent, p.pages_sent, p.pages_zero,
            p.pages_skipped, p.pages_remaining, static_cast<uint32_t>(p.rounds.size()), {}};
    if (!p.rounds.empty()) out->last_round = to_c(p.rounds.back());
    return MIG_OK;
  });
}

mig_result mig_migration_set_downtime(mig_migration* migration, double downtime_ms) {
  return guarded([&] {
    require(migration && downtime_ms > 0, "mig_migration_set_downtime needs a migration and a positive downtime");
    migration->control->set_downtime_target(downtime_ms);
    return MIG_OK;
  });
}

mig_result mig_migration_set_bandwidth(mig_migration* migration, double bytes_per_second) {
  return guarded([&] {
    require(migration && bytes_per_second >= 0, "mig_migration_set_bandwidth needs a migration and a rate >= 0");
    migration->control->set_bandwidth(bytes_per_second);
    return MIG_OK;
  });
}

mig_result mig_migration_force_switchover(mig_migration* migration) {
  return guarded([&] {
    require(migration, "mig_migration_force_switchover needs a migration");
    migration->control->force_switchover();
    return MIG_OK;
  });
}

mig_result mig_migration_cancel(mig_migration* migration) {
  return guarded([&] {
    require(migration, "mig_migration_cancel needs a migration");
    if (!migration->control->cancel())
      throw Failure(MIG_ERR_STATE, "too late to cancel: the migration has ended or committed");
    return MIG_OK;
  });
}

mig_result mig_migration_start_postcopy(mig_migration* migration) {
  return guarded([&] {
    require(migration, "mig_migration_start_postcopy needs a migration");
    if (!migration->control->start_postcopy())
      throw Failure(MIG_ERR_STATE, "no switch to post-copy: it was not enabled, or it is too late");
    return MIG_OK;
  });
}

mig_result mig_migration_recover_postcopy(mig_migration* migration, const char* uri) {
  return guarded([&] {
    require(migration && uri, "mig_migration_recover_postcopy needs a migration and a uri");
    const auto endpoint = transport::Endpoint::parse(uri);
    auto connect = [endpoint, tls = migration->tls] { return transport::connect(endpoint, tls.get()); };
    if (!migration->control->resume_postcopy(std::move(connect)))
      throw Failure(MIG_ERR_STATE, "the migration is not paused in post-copy");
    return MIG_OK;
  });
}

mig_result mig_migration_wait(mig_migration* migration, int64_t timeout_ms, mig_outcome* out) {
  return guarded([&] {
    require(migration, "mig_migration_wait needs a migration");
    return wait_outcome(migration->mutex, migration->finished, migration->result, timeout_ms, out,
                        "the migration is still running");
  });
}

void mig_migration_free(mig_migration* migration) {
  if (!migration) return;
  migration->control->cancel();
  migration->control->abandon();  // nobody is left to recover a broken post-copy
  if (migration->thread.joinable()) migration->thread.join();
  delete migration;
}

}  // extern "C"

// ---- the destination ---------------------------------------------------------------------

struct mig_incoming {
  mig_incoming(transport::Listener listener_, std::optional<transport::Listener> recovery_listener_, mig_vm_factory factory_,
               void* factory_opaque_, engine::ReceiverOptions options_)
      : listener(std::move(listener_)), recovery_listener(std::move(recovery_listener_)), address(listener.endpoint()),
        recovery_address(recovery_listener ? recovery_listener->endpoint() : ""), factory(factory_),
        factory_opaque(factory_opaque_), options(std::move(options_)) {}

  transport::Listener listener;
  std::optional<transport::Listener> recovery_listener;  // mig_recv_options.recovery_uri's
  const std::string address, recovery_address;
  const mig_vm_factory factory;
  void* const factory_opaque;
  engine::ReceiverOptions options;
  std::thread thread;
  std::mutex mutex;
  std::condition_variable finished;
  engine::IncomingMigration* receiving = nullptr;  // while run() runs, for abort
  bool quitting = false;
  std::optional<engine::IncomingStats> result;
  std::unique_ptr<engine::MigratableVm> vm;  // the guest, once here

  // The receiver checks the disks the VMM added against the source's (engine::DiskReceiver).
  std::unique_ptr<engine::MigratableVm> make_vm(const engine::VmShape& shape) {
    std::vector<mig_region_shape> regions;
    for (const auto& r : shape.regions) regions.push_back({r.guest_addr, r.size});
    std::vector<mig_disk_shape> disks;
    for (const auto& d : shape.disks) disks.push_back({d.size, d.chunk_bytes, d.copy ? 1 : 0, d.source_path.c_str()});
    const mig_vm_shape c_shape{shape.vcpus,  regions.size(), regions.data(), disks.size(), disks.data(),
                               shape.shared_memory_fds.size(), shape.shared_memory_fds.data()};
    last_error.clear();
    mig_vm* made = factory(factory_opaque, &c_shape);
    if (!made) throw std::runtime_error("the VMM refused the guest" + (last_error.empty() ? "" : ": " + last_error));
    std::unique_ptr<engine::MigratableVm> owned(made);
    if (made->regions.size() != regions.size()) throw std::runtime_error("the VMM built a VM of another shape");
    for (std::size_t i = 0; i < regions.size(); ++i) {
      if (made->regions[i].guest_addr != regions[i].guest_addr || made->regions[i].size != regions[i].size)
        throw std::runtime_error("the VMM built a VM of another shape");
      if (!shape.shared_memory_fds.empty() && !maps_file(made->regions[i], shape.shared_memory_fds[i]))
        throw std::runtime_error("the VMM's memory region " + std::to_string(i) + " does not map the source's memory it was handed");
    }
    return owned;
  }

  void run() {
    try {
      options.accept_channel = [this](std::chrono::milliseconds timeout) { return listener.accept(timeout); };
      // A broken post-copy link waits for its source on the recovery address, for as long as
      // this handle lives: the guest here cannot run on without the pages only it holds.
      if (recovery_listener) options.await_recovery = [this]() -> engine::ReceiverOptions::Accept {
        std::lock_guard lock(mutex);
        if (quitting) return {};
        return [this](std::chrono::milliseconds timeout) { return recovery_listener->accept(timeout); };
      };
      // Pre-flight checks (a source's dry run) are answered on the way to the migration.
      while (!receive_one(listener.accept())) {
      }
    } catch (const std::exception& e) {
      std::lock_guard lock(mutex);
      receiving = nullptr;
      if (!result) {
        result.emplace();
        result->error = e.what();
      }
    }
    finished.notify_all();
  }

  // One connection: a migration (true), or a dry run answered (false).
  bool receive_one(transport::Stream stream) {
    engine::IncomingMigration migration(stream, [this](const engine::VmShape& shape) { return make_vm(shape); }, options);
    {
      std::lock_guard lock(mutex);
      if (quitting) throw transport::Interrupted("the receiver was freed");
      receiving = &migration;
    }
    auto received = migration.run();
    if (received.stats.dry_run) {
      std::lock_guard lock(mutex);
      receiving = nullptr;
      return false;
    }
    {
      std::lock_guard lock(mutex);
      receiving = nullptr;
      vm = std::move(received.vm);
      result = std::move(received.stats);
    }
    finished.notify_all();
    // A source that lost our Running asks again for a while; free() interrupts this.
    migration.answer_commit_retries();
    return true;
  }
};

extern "C" {

void mig_recv_options_init(mig_recv_options* options) {
  if (!options) return;
  *options = {};
  const engine::ReceiverOptions defaults;
  options->peer_timeout_ms = static_cast<unsigned>(defaults.peer_timeout.count());
  options->autostart = defaults.autostart;
  options->postcopy = 1;
  options->share_memory = 1;
}

mig_result mig_incoming_listen(const char* uri, const mig_recv_options* options, mig_vm_factory factory,
                               void* factory_opaque, mig_incoming** out) {
  return guarded([&] {
    require(uri && options && factory && out, "mig_incoming_listen needs a uri, options, a factory and out");
    require(options->peer_timeout_ms > 0, "peer_timeout_ms must be positive");
    engine::ReceiverOptions receiver;
    receiver.peer_timeout = std::chrono::milliseconds(options->peer_timeout_ms);
    receiver.autostart = options->autostart != 0;
    receiver.max_guest_bytes = options->max_guest_bytes;
    receiver.max_vcpus = options->max_vcpus;
    receiver.adopt_shared_memory = options->share_memory != 0;
    receiver.postcopy = options->postcopy != 0;
    transport::TlsCredentials credentials;
    if (options->tls_authz) credentials.authz.push_back(options->tls_authz);
    transport::AcceptPolicy policy;
    policy.tls = load_tls(options->tls_creds_dir, options->tls_psk_file, credentials, transport::TlsRole::server);
    std::optional<transport::Listener> recovery;
    if (options->recovery_uri) recovery.emplace(transport::Endpoint::parse(options->recovery_uri), policy);
    transport::Listener listener(transport::Endpoint::parse(uri), std::move(policy));
    auto incoming = std::make_unique<mig_incoming>(std::move(listener), std::move(recovery), factory, factory_opaque,
                                                   std::move(receiver));
    incoming->thread = std::thread(&mig_incoming::run, incoming.get());
    *out = incoming.release();
    return MIG_OK;
  });
}

const char* mig_incoming_address(const mig_incoming* incoming) { return incoming ? incoming->address.c_str() : ""; }

const char* mig_incoming_recovery_address(const mig_incoming* incoming) {
  return incoming ? incoming->recovery_address.c_str() : "";
}

mig_result mig_incoming_wait(mig_incoming* incoming, int64_t timeout_ms, mig_outcome* out) {
  return guarded([&] {
    require(incoming, "mig_incoming_wait needs an incoming migration");
    return wait_outcome(incoming->mutex, incoming->finished, incoming->result, timeout_ms, out,
                        "no migration has arrived and finished yet");
  });
}

void mig_incoming_free(mig_incoming* incoming) {
  if (!incoming) return;
  {
    std::lock_guard lock(incoming->mutex);
    incoming->quitting = true;
    if (incoming->receiving) incoming->receiving->abort();
  }
  incoming->listener.interrupt();
  if (incoming->recovery_listener) incoming->recovery_listener->interrupt();
  if (incoming->thread.joinable()) incoming->thread.join();
  delete incoming;
}

}  // extern "C"
