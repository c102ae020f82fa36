// mig-recv: wait in incoming mode, receive a migrating guest, and keep it running - with a
// QMP socket (--qmp) through which it can be watched, stopped or migrated onward.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <chrono>
#include <optional>

#include "control/json.h"
#include "control/qmp_server.h"
#include "tools/cli.h"
#include "tools/vm_options.h"
#include "vmm/image_disk.h"

using namespace mig;

namespace {

std::string receive_summary_line(const engine::IncomingStats& s) {
  return fmt::format("received {:.1f} MiB of guest memory ({} pages, {} rounds, {:.1f} MB); restore {:.2f} ms, resume {:.2f} ms{}; verified: {}",
                     static_cast<double>(s.guest_bytes) / (1 << 20), s.pages_received, s.rounds,
                     static_cast<double>(s.bytes_received) / 1e6, s.restore_ms, s.resume_ms,
                     s.guest ? fmt::format(", guest saw {:.2f} ms", s.guest->gap_ms) : "", s.verified);
}

// Runs the guest that arrived until --run-for, quit or a signal; reports its heartbeats,
// unless it has moved on meanwhile.
int run_received_guest(control::Domain& domain, const engine::IncomingStats& incoming, double run_for,
                       const std::string& stats_json) {
  auto& guest = dynamic_cast<vmm::HostedVm&>(*domain.vm());
  tools::run_guest(domain, guest, run_for);
  if (const auto onward = domain.wait_migration(); onward && onward->status == engine::MigrationStatus::completed) {
    fmt::print(stderr, "mig-recv: the guest migrated onward\n");
    return tools::kExitMigrated;
  }
  guest.pause();
  tools::print_heartbeat_stats(guest.probe(), stdout);
  auto report = control::to_json(incoming);
  report.update(tools::guest_report(guest));
  tools::write_stats_json(stats_json, report);
  if (auto failure = guest.failure()) {
    fmt::print(stderr, "mig-recv: guest failed: {}\n", *failure);
    return tools::kExitGuestFailed;
  }
  return tools::kExitMigrated;
}

struct Options {
  std::string listen, serial, stats_json, qmp;
  double run_for = -1;
  std::uint64_t expect_mem = 0, max_mem = 0;
  unsigned expect_vcpus = 1, max_vcpus = 0;
  double peer_timeout_s = 10;
  std::vector<std::string> disks;
  transport::TlsCredentials tls;
  bool paused = false, synthetic = false;
  tools::MemoryFlags memory;
  tools::DirtyTrackFlags dirty_track;  // for a migration onward

  void add_to(CLI::App& app) {
    app.add_option("--listen", listen, "where to wait for the source: tcp:HOST:PORT (port 0 picks a free one), unix:PATH (same host; with a memfd-backed source, memory is handed over instead of copied), or defer (wait for QMP's migrate-incoming)")->required();
    app.add_option("--qmp", qmp, "a QMP control socket at unix:PATH (mode 0600) for the guest that arrives");
    app.add_option("--serial", serial, "where the guest's COM1 output goes: a file, a FIFO, or - for stdout");
    app.add_option("--run-for", run_for, "run the received guest this many seconds, then exit; default: until quit (QMP) or SIGINT/SIGTERM");
    app.add_option("--stats-json", stats_json, "write the incoming migration's statistics here");
    memory.add_to(app);
    dirty_track.add_to(app);
    auto* synthetic_flag = app.add_flag("--synthetic-guest", synthetic,
                                        "take a synthetic guest (mig-send --synthetic-guest), which needs no KVM, instead of a KVM one");
    tools::size_option(app.add_option("--expect-mem", expect_mem,
                                      "build the VM for a guest of this size while waiting, with its memory populated, so receiving "
                                      "pays no page faults (like QEMU's -incoming with -m); a different incoming shape is still accepted"))
        ->excludes(synthetic_flag);
    app.add_option("--expect-vcpus", expect_vcpus, "with --expect-mem: the vCPU count to prepare for")->default_val(1);
    app.add_option("--tls-creds", tls.x509_dir,
                   "accept only mutual TLS 1.3 connections, with the x509 credentials in DIR (QEMU's layout: ca-cert.pem, "
                   "server-cert.pem, server-key.pem); a source must present a certificate this CA signed");
    app.add_option("--tls-psk", tls.psk_file, "accept only TLS 1.3 with a pre-shared key listed in FILE (IDENTITY:HEXKEY lines)");
    app.add_option("--tls-authz", tls.authz,
                   "with --tls-creds: admit only this client certificate subject, as `openssl x509 -noout -subject -nameopt "
                   "RFC2253` prints it (repeatable)");
    tools::size_option(app.add_option("--max-mem", max_mem,
                                      "refuse a guest with more memory than this, at its Hello, before anything is built "
                                      "(a guest larger than the host's available memory is refused in any case)"));
    app.add_option("--max-vcpus", max_vcpus, "refuse a guest with more vCPUs than this")->check(CLI::Range(1u, 256u));
    app.add_option("--peer-timeout", peer_timeout_s,
                   "seconds a silent or stalled source is given before the migration fails and is discarded here (default 10)")
        ->check(CLI::Range(0.1, 3600.0));
    app.add_flag("--paused", paused, "leave the guest paused once it has arrived (QEMU's -S); QMP cont resumes it");
    tools::add_disk_option(app, disks,
                           "the image for the source's next disk: with --copy-storage-all it is created (or an existing one, "
                           "large enough, is written over); for shared storage it is the same image, by default the "
                           "source's path");
  }
};

// The factory for the arriving VM, built (and with --expect-mem, populated) now, while nobody
// has connected yet. `memory_description` says which page sizes it gets.
engine::VmFactory incoming_factory(const Options& options, std::string& memory_description) {
  if (options.listen == "defer" && options.qmp.empty())
    throw std::invalid_argument("--listen defer needs --qmp, to receive migrate-incoming");
  const auto memory = vmm::KvmVm::incoming_memory(options.memory.options());
  memory_description = memory.description;
  const auto tracking = options.dirty_track.tracking();
  if (options.synthetic) return vmm::SyntheticVm::factory(memory.options, tools::disk_configs(options.disks), tracking);
  return vmm::KvmVm::factory(options.serial, memory.options,
                             options.expect_mem > 0 ? std::optional(vmm::KvmVm::pc_shape(options.expect_mem, options.expect_vcpus))
                                                    : std::nullopt,
                             tools::disk_configs(options.disks), tools::dirty_ring_entries(tracking));
}

// Who may connect: TLS where asked for; a refused peer is reported and the wait goes on.
transport::AcceptPolicy accept_policy(const transport::TlsCredentials& tls) {
  transport::AcceptPolicy accept;
  accept.refused = [](const std::string& why) { fmt::print(stderr, "mig-recv: {}\n", why); };
  if (!tls.authz.empty() && tls.x509_dir.empty()) throw std::invalid_argument("--tls-authz needs --tls-creds");
  if (tls.enabled()) accept.tls = transport::TlsContext::load(tls, transport::TlsRole::server);
  return accept;
}

// What the receiver checks at Hello (limits, CPU, clock, disks) and how it behaves.
engine::ReceiverOptions receiver_options(const Options& options) {
  engine::ReceiverOptions receiver;
  receiver.autostart = !options.paused;
  receiver.max_guest_bytes = options.max_mem;
  receiver.max_vcpus = options.max_vcpus;
  receiver.peer_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(options.peer_timeout_s * 1000));
  receiver.check_disks = [configs = tools::disk_configs(options.disks)](const std::vector<engine::VmShape::Disk>& disks) {
    vmm::check_incoming_disks(disks, configs);
  };
  if (!options.synthetic) {  // a synthetic guest runs on no CPU model and no TSC
    receiver.missing_cpu_features = vmm::KvmVm::missing_cpu_features;
    receiver.tsc_refusal = vmm::KvmVm::tsc_refusal;
  }
  return receiver;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-recv: wait for a migrating guest, restore it and run it"};
  tools::add_version_flag(app, "mig-recv");
  Options options;
  options.add_to(app);
  CLI11_PARSE(app, argc, argv);

  std::string memory_description;
  engine::VmFactory factory;
  try {
    factory = incoming_factory(options, memory_description);
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-recv: {}\n", e.what());
    return tools::kExitSetupError;
  }
  const engine::ReceiverOptions receiver = receiver_options(options);
  transport::AcceptPolicy accept;
  try {
    accept = accept_policy(options.tls);
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-recv: {}\n", e.what());
    return tools::kExitSetupError;
  }
  control::Domain domain(control::Domain::Incoming{std::move(factory), receiver, std::move(accept)});
  std::optional<control::QmpServer> server;
  tools::ControlSignals signals;  // before any thread starts
  const auto quit_on_signal = signals.on_terminate([&domain] { domain.quit(); });
  try {
    if (!options.qmp.empty()) server.emplace(domain, control::qmp_socket_path(options.qmp));
    // Tests and scripts read the actual port from this line (it matters with port 0).
    if (options.listen == "defer")
      fmt::print("mig-recv: waiting for migrate-incoming on {}\n", options.qmp);
    else
      fmt::print("mig-recv: listening on {}\n", domain.migrate_incoming(options.listen));
    fmt::print("mig-recv: guest memory: {}\n", memory_description);
    std::fflush(stdout);
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-recv: {}\n", e.what());
    return tools::kExitSetupError;
  }

  const auto incoming = domain.wait_incoming();
  if (!incoming || incoming->status != engine::MigrationStatus::completed) {
    fmt::print(stderr, "mig-recv: migration failed: {}\n", incoming ? incoming->error : "stopped before a guest arrived");
    if (incoming) tools::write_stats_json(options.stats_json, control::to_json(*incoming));
    return tools::kExitMigrationFailed;
  }
  fmt::print(stderr, "mig-recv: {}\n", receive_summary_line(*incoming));
  tools::write_stats_json(options.stats_json, control::to_json(*incoming));

  return run_received_guest(domain, *incoming, options.run_for, options.stats_json);
}
