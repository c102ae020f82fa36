#include "tools/migration_cli.h"

#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>

namespace mig::tools {

void SendOptions::add_to(CLI::App& app, const std::string& to_flag, bool to_required) {
  auto* to_option = app.add_option(to_flag, to, "destination in incoming mode, tcp:HOST:PORT");
  if (to_required) to_option->required();
  app.add_option("--downtime-ms", downtime_ms, "downtime target for the convergence check")->default_val(30);
  app.add_option("--max-iterations", max_iterations, "at most this many pre-copy rounds, round 0 included")
      ->default_val(30)
      ->check(CLI::Range(1u, 1000u));
  app.add_option("--on-no-convergence", on_no_convergence, "when rounds stop making progress: stop (and copy) or abort")
      ->default_val("stop")
      ->check(CLI::IsMember({"stop", "abort"}));
  app.add_flag("--no-auto-converge", no_auto_converge,
               "never slow the guest: by default, while the expected downtime is above 5 ms, a round that did not cut the "
               "pages left by a tenth holds the vCPUs for 20 % of the time, then 10 % more per such round, up to 99 %");
  app.add_flag("--offline", offline, "pause first and copy everything once, no pre-copy");
  app.add_flag("--stop-at-target", stop_at_target,
               "stop pre-copy as soon as the expected downtime is within the target (by default rounds go on while "
               "each still cuts the pages left by a tenth)");
  app.add_flag("--no-verify", no_verify, "skip the page-hash proof that destination memory equals the source's");
  app.add_flag("--no-dedup", no_dedup, "resend dirty pages even when their contents did not change");
  app.add_flag("--no-zero-skip", no_zero_skip,
               "read and send every page, never-touched and zero ones too (to measure what skipping them saves)");
  app.add_flag("--no-page-plan", no_page_plan, "do not tell the receiver which pages are coming (it then faults on each as it lands)");
  app.add_option("--bandwidth", bandwidth, "limit pre-copy page data to RATE bytes per second, e.g. 100M (the final, paused round is not limited)")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--compress", compress, "compress page batches: zstd or zstd:LEVEL (default level 1); backs off by itself on incompressible memory")
      ->check([](const std::string& v) {
        return v == "zstd" || (v.rfind("zstd:", 0) == 0 && v.size() > 5 && v.find_first_not_of("0123456789", 5) == std::string::npos)
                   ? std::string()
                   : std::string("expected zstd or zstd:LEVEL");
      });
  app.add_flag("--delta", delta, "send pages that changed a little as deltas against their last-sent version (XBZRLE-style)");
  app.add_option("--delta-cache", delta_cache, "with --delta: how much last-sent page data to keep")
      ->transform(CLI::AsSizeValue(false))
      ->default_str("64M");
  app.add_option("--parallel", parallel, "TCP connections for page data, each carrying its share of guest memory")
      ->default_val(1)
      ->check(CLI::Range(1u, 16u));
  app.add_option("--zerocopy", zerocopy, "MSG_ZEROCOPY for page data: auto (on until the kernel reports it copied anyway, as over loopback), on, off")
      ->default_val("auto")
      ->check(CLI::IsMember({"auto", "on", "off"}));
}

engine::SenderOptions SendOptions::sender_options() const {
  engine::SenderOptions o;
  o.policy.downtime_target_ms = downtime_ms;
  o.policy.max_rounds = max_iterations;
  o.policy.improve_within_target = !stop_at_target;
  o.policy.auto_converge = !no_auto_converge;
  o.policy.on_no_convergence = on_no_convergence == "abort" ? engine::NoConvergence::abort : engine::NoConvergence::stop;
  o.offline = offline;
  o.verify = !no_verify;
  o.dedup = !no_dedup;
  o.page_plan = !no_page_plan;
  o.skip_zero_pages = !no_zero_skip;
  if (delta) o.delta_cache_pages = std::max<std::size_t>(1, delta_cache / engine::kPageSize);
  o.bandwidth_limit = static_cast<double>(bandwidth);
  if (!compress.empty()) o.compress_level = compress == "zstd" ? 1 : std::stoi(compress.substr(5));
  return o;
}

namespace {
sigset_t control_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void block_control_signals() {
  const sigset_t set = control_signals();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int wait_for_signal(double seconds) {
  const sigset_t set = control_signals();
  if (seconds < 0) {
    int sig = 0;
    ::sigwait(&set, &sig);
    return sig;
  }
  timespec timeout{};
  timeout.tv_sec = static_cast<time_t>(seconds);
  timeout.tv_nsec = static_cast<long>((seconds - static_cast<double>(timeout.tv_sec)) * 1e9);
  const int sig = ::sigtimedwait(&set, nullptr, &timeout);
  return sig < 0 ? 0 : sig;
}

engine::MigrationStats migrate_to(KvmVm& vm, const SendOptions& options) {
  engine::SenderOptions sender = options.sender_options();
  if (::isatty(STDOUT_FILENO)) {
    sender.on_round = [](const engine::RoundStats& r, std::uint64_t guest_bytes) {
      const double remaining = static_cast<double>(r.dirty_pages * engine::kPageSize);
      fmt::print("\rmigrating: round {:>2}  {:5.1f} % sent  dirty {:7.1f} MB/s  throughput {:7.1f} MB/s  expected downtime {:7.1f} ms  throttle {:2} %",
                 r.round, 100.0 * (1 - remaining / static_cast<double>(guest_bytes)), r.dirty_rate_Bps / 1e6,
                 r.bandwidth_Bps / 1e6, r.expected_downtime_ms, r.throttle_pct);
      std::fflush(stdout);
    };
  }
  engine::MigrationStats stats;
  try {
    const auto endpoint = transport::Endpoint::parse(options.to);
    auto open = [&endpoint, &options] {
      auto stream = transport::connect(endpoint);
      using transport::Stream;
      if (options.zerocopy == "on" && !stream.enable_zerocopy(Stream::ZeroCopy::always))
        throw std::runtime_error("--zerocopy=on but the socket refuses SO_ZEROCOPY");
      if (options.zerocopy == "auto") stream.enable_zerocopy(Stream::ZeroCopy::unless_copied);
      return stream;
    };
    auto stream = open();
    sender.channels = options.parallel;
    sender.open_channel = open;
    stats = engine::migrate(vm, stream, sender);
  } catch (const std::exception& e) {
    // Nothing was paused yet: connecting or parsing failed.
    stats.status = "failed";
    stats.error = e.what();
  }
  if (sender.on_round) fmt::print("\n");
  return stats;
}

void write_stats_json(const std::string& path, const std::string& role, const engine::MigrationStats& stats,
                      const kvm::Machine* local_guest) {
  if (path.empty()) return;
  nlohmann::json j = engine::to_json(stats);
  j["role"] = role;
  if (local_guest) {
    nlohmann::json beats = nlohmann::json::array();
    for (const auto& hb : local_guest->probe().snapshot())
      beats.push_back({{"count", hb.count},
                       {"first_seq", hb.first_seq},
                       {"last_seq", hb.last_seq},
                       {"sequence_breaks", hb.seq_breaks},
                       {"longest_gap_ms", static_cast<double>(hb.max_gap_ns) / 1e6},
                       {"timer_ticks", hb.ticks},
                       {"self_check_failures", hb.check_failures}});
    j["local_guest_heartbeats"] = beats;
    j["local_guest_failure"] = local_guest->failure().value_or("");
  }
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  if (!out) throw std::runtime_error("cannot write stats to " + path);
}

std::string summary_line(const engine::MigrationStats& s) {
  if (s.status != "completed") return fmt::format("migration {}: {}", s.status, s.error);
  return fmt::format(
      "migrated {:.1f} MiB of guest memory in {:.1f} ms ({} rounds, {}, {:.1f} MB sent, {:.0f} MB/s); downtime {:.2f} ms{}; "
      "verified: {}",
      static_cast<double>(s.guest_bytes) / (1 << 20), s.total_ms, s.rounds, s.stop_reason,
      static_cast<double>(s.bytes_sent) / 1e6, s.throughput_MBps, s.downtime_ms,
      s.guest ? fmt::format(", guest saw {:.2f} ms", s.guest->gap_ms) : "", s.verified);
}

std::string receive_summary_line(const engine::MigrationStats& s) {
  if (s.status != "completed") return fmt::format("migration {}: {}", s.status, s.error);
  return fmt::format("received {:.1f} MiB of guest memory ({} pages, {} rounds, {:.1f} MB); restore {:.2f} ms, resume {:.2f} ms{}; verified: {}",
                     static_cast<double>(s.guest_bytes) / (1 << 20), s.pages_sent, s.rounds,
                     static_cast<double>(s.bytes_sent) / 1e6, s.downtime.restore_ms, s.downtime.resume_ms,
                     s.guest ? fmt::format(", guest saw {:.2f} ms", s.guest->gap_ms) : "", s.verified);
}

}  // namespace mig::tools
