#include "tools/cli.h"

#include <fmt/core.h>
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "control/arguments.h"
#include "mig/version.h"

namespace mig::tools {

CLI::Option* size_option(CLI::Option* option) {
  return option
      ->check([](const std::string& value) {
        return value.find('-') == std::string::npos ? std::string() : std::string("a size cannot be negative");
      })
      ->transform(CLI::AsSizeValue(false));
}

void add_version_flag(CLI::App& app, const char* tool) {
  app.set_version_flag("--version", std::string(tool) + " " + MIG_VERSION_STRING, "print the version and exit");
}

void MigrateFlags::add_to(CLI::App& app) {
  given(app.add_flag("--check", check_,
                     "only the pre-flight check: ask the destination whether it would take this guest (its memory and "
                     "vCPU limits, its CPU, its disks' images), send nothing else, and exit 0 if it would, 2 with its "
                     "reason if not"),
        [](nlohmann::json& a) { a["dry-run"] = true; });
  add_switchover_flags(app);
  add_content_flags(app);
  add_connection_flags(app);
}

void MigrateFlags::given(CLI::Option* option, std::function<void(nlohmann::json&)> argument) {
  given_.emplace_back(option, std::move(argument));
}

namespace {
std::string policy_names() {
  std::string names;
  for (const auto& [name, summary] : engine::PolicyRegistry::global().list()) names += (names.empty() ? "" : ", ") + name;
  return names;
}
}  // namespace

// When the migration stops pre-copy, and how it switches over.
void MigrateFlags::add_switchover_flags(CLI::App& app) {
  given(app.add_flag("--offline", offline_, "pause first and copy everything once, no pre-copy"),
        [](nlohmann::json& a) { a["offline"] = true; });
  given(app.add_flag("--stop-at-target", stop_at_target_,
                     "stop pre-copy as soon as the expected downtime is within the target (by default rounds go on while "
                     "each still cuts the pages left by a tenth)"),
        [](nlohmann::json& a) { a["stop-at-target"] = true; });
  given(app.add_option("--downtime-ms", downtime_ms_, "downtime target for the convergence check, in ms (default 30)")
            ->check(CLI::Range(0.0, 2'000'000.0)),
        [this](nlohmann::json& a) { a["downtime-ms"] = downtime_ms_; });
  given(app.add_option("--max-iterations", max_iterations_, "at most this many pre-copy rounds, round 0 included (default 30)")
            ->check(CLI::Range(1u, 1000u)),
        [this](nlohmann::json& a) { a["max-iterations"] = max_iterations_; });
  given(app.add_option("--on-no-convergence", on_no_convergence_,
                       "when rounds stop making progress: stop (and copy), abort, or postcopy (the default with post-copy on)")
            ->check(CLI::IsMember({"stop", "abort", "postcopy"})),
        [this](nlohmann::json& a) { a["on-no-convergence"] = on_no_convergence_; });
  given(app.add_option("--policy", policy_,
                       "what decides when pre-copy stops: NAME[:key=value,...], one of " + policy_names() +
                           " (default mig, which the flags above tune; see README \"Convergence policies\")")
            ->check(parses_with([](const std::string& spec) { engine::PolicyRegistry::global().make(spec); })),
        [this](nlohmann::json& a) { a["policy"] = policy_; });
  given(app.add_flag("--no-auto-converge", no_auto_converge_,
                     "never slow the guest: by default, while the expected downtime is above 5 ms, a round that did not cut the "
                     "pages left by a tenth holds the vCPUs for 20 % of the time, then 10 % more per such round, up to 99 %"),
        [](nlohmann::json& a) { a["auto-converge"] = false; });
  given(app.add_flag("--postcopy", postcopy_,
                     "switch to post-copy once round 0 is done: the guest resumes at the destination at once and fetches "
                     "the pages it still lacks on demand (needs userfaultfd there)"),
        [](nlohmann::json& a) { a["postcopy"] = true; });
  given(app.add_option("--postcopy-after", postcopy_after_, "hybrid: pre-copy first, switch to post-copy after this many seconds")
            ->check(CLI::Range(0.0, 1e6)),
        [this](nlohmann::json& a) { a["postcopy-after"] = postcopy_after_; });
  given(app.add_flag("--postcopy-ram", postcopy_ram_,
                     "enable post-copy without a timer: the switch comes on migrate-start-postcopy (mig-ctl postcopy), "
                     "or when pre-copy stops making progress"),
        [](nlohmann::json& a) { a["postcopy-ram"] = true; });
}

// What travels, and in which form.
void MigrateFlags::add_content_flags(CLI::App& app) {
  given(app.add_flag("--copy-storage-all", copy_storage_,
                     "copy the guest's disks too (virsh's name): their data moves with the rounds, into images the "
                     "destination creates (mig-recv --disk); without it, disks are shared storage that changes owner"),
        [](nlohmann::json& a) { a["blk"] = true; });
  given(app.add_flag("--no-verify", no_verify_, "skip the page-hash proof that destination memory equals the source's"),
        [](nlohmann::json& a) { a["verify"] = false; });
  given(app.add_flag("--no-dedup", no_dedup_, "resend dirty pages even when their contents did not change"),
        [](nlohmann::json& a) { a["dedup"] = false; });
  given(app.add_flag("--no-zero-skip", no_zero_skip_,
                     "read and send every page, never-touched and zero ones too (to measure what skipping them saves)"),
        [](nlohmann::json& a) { a["zero-skip"] = false; });
  given(app.add_flag("--no-page-plan", no_page_plan_, "do not tell the receiver which pages are coming (it then faults on each as it lands)"),
        [](nlohmann::json& a) { a["page-plan"] = false; });
  given(size_option(app.add_option("--bandwidth", bandwidth_, "limit pre-copy page data to RATE bytes per second, e.g. 100M (the final, paused round is not limited)")),
        [this](nlohmann::json& a) { a["bandwidth"] = bandwidth_; });
  given(app.add_option("--compress", compress_, "compress page batches: zstd or zstd:LEVEL (1-19, default 1); backs off by itself on incompressible memory")
            ->check(parses_with(control::parse_compress_level)),
        [this](nlohmann::json& a) { a["compress"] = compress_; });
  given(app.add_flag("--delta", delta_, "send pages that changed a little as deltas against their last-sent version (XBZRLE-style)"),
        [](nlohmann::json& a) { a["delta"] = true; });
  given(size_option(app.add_option("--delta-cache", delta_cache_, "with --delta: how much last-sent page data to keep (default 64M)")),
        [this](nlohmann::json& a) { a["delta-cache"] = delta_cache_; });
}

// The connections: how many, zero-copy, and TLS.
void MigrateFlags::add_connection_flags(CLI::App& app) {
  given(app.add_option("--parallel", parallel_, "TCP connections for page data, each carrying its share of guest memory")
            ->check(CLI::Range(1u, 16u)),
        [this](nlohmann::json& a) { a["parallel"] = parallel_; });
  given(app.add_option("--peer-timeout", peer_timeout_s_,
                       "seconds a silent or stalled destination is given before the migration fails and the guest runs on "
                       "here (default 10)")
            ->check(CLI::Range(0.1, 3600.0)),
        [this](nlohmann::json& a) { a["peer-timeout"] = static_cast<std::uint64_t>(peer_timeout_s_ * 1000); });
  given(app.add_option("--zerocopy", zerocopy_, "MSG_ZEROCOPY for page data: auto (on until the kernel reports it copied anyway, as over loopback), on, off")
            ->check(CLI::IsMember({"auto", "on", "off"})),
        [this](nlohmann::json& a) { a["zerocopy"] = zerocopy_; });
  given(app.add_option("--tls-creds", tls_creds_,
                       "mutual TLS 1.3 on every connection, with the x509 credentials in DIR (QEMU's layout: ca-cert.pem, "
                       "client-cert.pem, client-key.pem); the destination needs --tls-creds too"),
        [this](nlohmann::json& a) { a["tls-creds"] = tls_creds_; });
  given(app.add_option("--tls-psk", tls_psk_, "TLS 1.3 with a pre-shared key instead: FILE holds IDENTITY:HEXKEY lines, the first one is used"),
        [this](nlohmann::json& a) { a["tls-psk"] = tls_psk_; });
  given(app.add_option("--tls-hostname", tls_hostname_,
                       "with --tls-creds: the name the destination's certificate must carry (default: the host in --to)"),
        [this](nlohmann::json& a) { a["tls-hostname"] = tls_hostname_; });
}

nlohmann::json MigrateFlags::arguments(const std::string& uri) const {
  nlohmann::json args = {{"uri", uri}};
  for (const auto& [option, argument] : given_)
    if (option->count() > 0) argument(args);
  return args;
}

namespace {
sigset_t control_signal_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}
}  // namespace

ControlSignals::ControlSignals() {
  // A peer that went away must be an error on the write, not the end of the process: our
  // own sockets say MSG_NOSIGNAL, but libnbd's connection to qemu-nbd may not.
  ::signal(SIGPIPE, SIG_IGN);
  const sigset_t set = control_signal_set();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  watcher_ = std::thread([this] { watch(); });
}

ControlSignals::~ControlSignals() {
  stop_ = true;
  watcher_.join();
}

ControlSignals::TerminateHook ControlSignals::on_terminate(std::function<void()> callback) {
  set_on_terminate(std::move(callback));
  return TerminateHook(*this);
}

// The callback runs on the watcher thread with mutex_ released (it may take a while: a
// quitting Domain waits for its migrations). A call under way still uses what the old
// callback refers to, so replacing it waits for that call to end: a hook going out of scope
// must not leave the watcher calling into its target as the target is destroyed.
void ControlSignals::set_on_terminate(std::function<void()> callback) {
  std::unique_lock lock(mutex_);
  on_terminate_ = std::move(callback);
  callback_returned_.wait(lock, [&] { return !calling_; });
}

void ControlSignals::watch() {
  const sigset_t set = control_signal_set();
  while (!stop_) {
    timespec slice{0, 100'000'000};  // looks at stop_ ten times a second
    const int sig = ::sigtimedwait(&set, nullptr, &slice);
    if (sig <= 0) continue;
    std::function<void()> callback;
    {
      std::lock_guard lock(mutex_);
      if (sig == SIGUSR1) {
        usr1_ = true;
      } else {
        terminating_ = true;
        callback = on_terminate_;
        calling_ = static_cast<bool>(callback);
      }
    }
    signalled_.notify_all();
    if (!callback) continue;
    callback();
    {
      std::lock_guard lock(mutex_);
      calling_ = false;
    }
    callback_returned_.notify_all();
  }
}

ControlSignals::Signal ControlSignals::wait(double seconds) {
  std::unique_lock lock(mutex_);
  auto arrived = [&] { return usr1_ || terminating_; };
  if (seconds < 0)
    signalled_.wait(lock, arrived);
  else
    signalled_.wait_for(lock, std::chrono::duration<double>(seconds), arrived);
  if (terminating_) return Signal::terminate;
  if (std::exchange(usr1_, false)) return Signal::usr1;
  return Signal::none;
}

std::string progress_line(const nlohmann::json& info) {
  const auto ram = info.value("ram", nlohmann::json::object());
  const auto rounds = info.value("mig", nlohmann::json::object()).value("rounds", nlohmann::json::array());
  const auto last = rounds.empty() ? nlohmann::json::object() : rounds.back();
  // Sent is what needs no sending any more; before the first page goes nothing is known.
  const double total = ram.value("total", 0.0), remaining = ram.value("remaining", 0.0);
  const bool started = info.value("status", "") != "setup" && total > 0;
  return fmt::format("migrating: {:>10}  round {:>2}  {:5.1f} % sent  {:8.1f} MB on the wire at {:7.1f} MB/s  dirty {:7.1f} MB/s  "
                     "expected downtime {:6.1f} ms  throttle {:2} %",
                     info.value("status", "?"), rounds.size(), started ? 100.0 * (1 - remaining / total) : 0.0,
                     ram.value("transferred", 0.0) / 1e6, ram.value("mbps", 0.0) / 8, last.value("dirty_rate_MBps", 0.0),
                     last.value("expected_downtime_ms", 0.0), info.value("cpu-throttle-percentage", 0));
}

std::string summary_line(const nlohmann::json& info) {
  const std::string status = info.value("status", "unknown");
  const auto stats = info.value("mig", nlohmann::json::object()).value("stats", nlohmann::json::object());
  if (status != "completed") return fmt::format("migration {}: {}", status, info.value("error-desc", "no reason given"));
  const auto guest = stats.value("guest_downtime_ms", nlohmann::json());
  return fmt::format(
      "migrated {:.1f} MiB of guest memory in {:.1f} ms ({} rounds, {}, {:.1f} MB sent, {:.0f} MB/s); downtime {:.2f} ms{}; "
      "verified: {}",
      stats.value("guest_bytes", 0.0) / (1 << 20), stats.value("total_ms", 0.0), stats.value("rounds", 0),
      stats.value("stop_reason", ""), stats.value("bytes_sent", 0.0) / 1e6, stats.value("throughput_MBps", 0.0),
      stats.value("downtime_ms", 0.0), guest.is_number() ? fmt::format(", guest saw {:.2f} ms", guest.get<double>()) : "",
      stats.value("verified", false));
}

bool write_stats_json(const std::string& path, const nlohmann::json& json) {
  if (path.empty()) return true;
  const auto write = [&](const std::string& to) {
    std::ofstream out(to);
    out << json.dump(2) << "\n";
    out.flush();
    return static_cast<bool>(out);
  };
  // A regular file is written beside itself and renamed over: a reader (an operator's
  // monitor, a test) never sees it half-written, as it could while mig-recv rewrites it once
  // the guest has run, or after a kill mid-write.
  struct stat existing{};
  if (::stat(path.c_str(), &existing) != 0 || S_ISREG(existing.st_mode)) {
    const std::string partial = path + ".partial";
    if (write(partial) && std::rename(partial.c_str(), path.c_str()) == 0) return true;
    std::remove(partial.c_str());
  }
  // A pipe or a device (/dev/stdout), or a file in a directory where nothing new may be
  // created: in place.
  if (write(path)) return true;
  fmt::print(stderr, "mig: cannot write statistics to {}\n", path);
  return false;
}

int exit_code_for(const std::string& status) {
  if (status == "completed") return kExitMigrated;
  if (status == "handoff-unknown") return kExitHandoffUnknown;
  return kExitMigrationFailed;
}

std::string round_table_text(const nlohmann::json& rounds) {
  // The per-vCPU dirty limit gets a column only where a round had one (dirty-limit).
  const bool limited = std::any_of(rounds.begin(), rounds.end(), [](const auto& r) { return r.value("dirty_limit_MBps", 0.0) > 0; });
  std::string text = fmt::format("{:>5} {:>9} {:>10} {:>9} {:>9} {:>10} {:>10} {:>11} {:>8}{}\n", "round", "pages", "MB", "ms",
                                 "dirty", "dirty MB/s", "link MB/s", "expected ms", "throttle", limited ? "  vCPU limit MB/s" : "");
  for (const auto& r : rounds)
    text += fmt::format("{:>5} {:>9} {:>10.1f} {:>9.1f} {:>9} {:>10.1f} {:>10.1f} {:>11.2f} {:>7}%{}\n", r.value("round", 0),
                        r.value("pages", 0), r.value("bytes", 0.0) / 1e6, r.value("duration_ms", 0.0), r.value("dirty_pages", 0),
                        r.value("dirty_rate_MBps", 0.0), r.value("bandwidth_MBps", 0.0), r.value("expected_downtime_ms", 0.0),
                        r.value("throttle_pct", 0),
                        limited ? fmt::format("  {:>16.1f}", r.value("dirty_limit_MBps", 0.0)) : "");
  return text;
}

}  // namespace mig::tools
