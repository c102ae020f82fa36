// The destination side: incoming mode, as a state machine over frames.
//
//   awaiting-hello ──Hello──▶ receiving-pages ◀─PageBatch, RoundEnd, PagePlan
//        │                        │
//        └─Hello (shared)─▶ awaiting-shared-memory ─SharedMemory─┘
//                                 │ StateSection
//                                 ▼
//                          receiving-state ◀─StateSection
//                                 │ Complete: verify, restore, Ready
//                                 ▼
//                          awaiting-commit ──Commit: resume, Running──▶ running
//                                 ▲                      │ (post-copy)
//   receiving-state ─PostcopyStart: drop stale pages,    ▼
//     trap the rest, restore, Ready ─┘                postcopy ◀─PageBatch
//                                                        │ Complete: every page here, verify,
//                                                        ▼ PostcopyDone
//                                                     running
// In post-copy a broken link pauses instead of failing: the guest waits on its missing pages
// while the receiver waits for the source to reconnect (ReceiverOptions::await_recovery).
// In awaiting-commit a broken link does not fail at once either: the restored guest waits,
// paused, for the source to say on a new connection that it committed (CommitRetry), for
// ReceiverOptions::handoff_grace; only then is it discarded.
//
// A frame that arrives anywhere else is refused with "unexpected X while Y". Once the guest
// is resumed here, the destination owns it, whatever then happens to the connection.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>

#include "../engine/stats.h"
#include "../engine/vm.h"
#include "../transport/stream.h"

namespace mig::engine {

struct ReceiverOptions {
  std::chrono::milliseconds peer_timeout{10000};
  std::chrono::milliseconds handover_wait{2000};
  // Accepts the next connection on the incoming address, for a sender that asks for parallel
  // channels, and afterwards for the doorman (incoming_doorman.h); it must give up (throw)
  // after `timeout`, and throw transport::Interrupted once the receiver quits. Without it the
  // receiver accepts one channel and the sender falls back to it.
  std::function<transport::Stream(std::chrono::milliseconds timeout)> accept_channel;
  // Post-copy is accepted only with accept_channel (it needs a connection of its own). When
  // the link breaks after the switchover, this is called to wait for the operator to say
  // where the source will reconnect (migrate-recover); it returns a way to accept those
  // connections, or an empty function when the guest is given up. Without it, a broken
  // post-copy link fails at once.
  using Accept = std::function<transport::Stream(std::chrono::milliseconds timeout)>;
  std::function<Accept()> await_recovery;
  // Same-host hand-over: when the source offers its memory (over a unix: socket), build the VM
  // on it (the factory maps VmShape::shared_memory_fds). False declines: the pages are copied,
  // unverified (a source that offers its memory asks for no verification).
  bool adopt_shared_memory = true;
  // False leaves the guest paused once it is here (QEMU's -S): the migration completes, and
  // whoever owns the VM resumes it. Post-copy is then not offered: its guest must run.
  bool autostart = true;
  // False refuses post-copy (a VMM that cannot serve its guest's page faults): a source that
  // asks for it is told so at Hello, a dry run's included.
  bool postcopy = true;
  // The largest guest accepted (memory bytes, vCPUs); 0 takes the protocol's bounds. Checked
  // at Hello, before the VM is built.
  std::uint64_t max_guest_bytes = 0;
  std::uint32_t max_vcpus = 0;
  // The pre-flight check of the guest's CPU (Hello's CPUID) against what this host can give:
  // returns what is missing, for a refusal that names it; empty to accept. Unset: unchecked.
  std::function<std::vector<std::string>(const std::vector<wire::CpuidLeaf>&)> missing_cpu_features = {};
  // The same for the guest's TSC rate (Hello's tsc_khz, when the source gave it): why this
  // host cannot run the guest's TSC at its rate, or empty to accept. Unset: unchecked.
  std::function<std::string(std::uint32_t guest_tsc_khz)> tsc_refusal = {};
  // A dry run's check of the source's disks against the images this side would open or make
  // for them, making and locking nothing: throws what the migration would refuse. (A real
  // migration finds the same when the factory opens them.) Unset: unchecked.
  std::function<void(const std::vector<VmShape::Disk>&)> check_disks = {};
  // The switchover's recovery (protocol.h): a guest restored here is kept paused this long
  // after the connection broke before Commit, for the source to say on a new connection
  // (through accept_channel) that it did commit; and once resumed here, the source's asking
  // again is answered this long (answer_commit_retries). Longer than the source asks.
  std::chrono::milliseconds handoff_grace{30000};
  // Told, once the source's Hello is read, whether this session is a real migration or only
  // a pre-flight check (dry run), before either is checked.
  std::function<void(bool dry_run)> hello_received = {};
};

struct IncomingResult {
  IncomingStats stats;
  std::unique_ptr<MigratableVm> vm;  // running when stats.status is completed (and not a dry run), else null
};

class IncomingMigration {
 public:
  IncomingMigration(transport::Stream& stream, VmFactory make_vm, ReceiverOptions options);
  ~IncomingMigration();
  IncomingMigration(const IncomingMigration&) = delete;
  IncomingMigration& operator=(const IncomingMigration&) = delete;

  // Receives the guest and runs it. Never throws for a failed migration: a malformed stream,
  // a vanished or aborting source, a verification mismatch or a failed restore all give
  // status failed with the reason, and no VM. The peer is told why where the connection
  // still allows it.
  IncomingResult run();

  // After run() completed: answers a source that lost Running and asks again (CommitRetry)
  // on a new connection through accept_channel, until handoff_grace has passed since the
  // resume or accepting throws (the receiver quits). Connections of anyone else are closed.
  void answer_commit_retries();

  // From another thread: ends the migration before the guest runs here (a quitting
  // receiver). The source sees the connection close and keeps its guest.
  void abort();
  std::uint64_t bytes_received() const { return bytes_received_.load(std::memory_order_relaxed); }

 private:
  enum class State { awaiting_hello, awaiting_shared_memory, receiving_pages, receiving_state, awaiting_commit, postcopy, running };
  static const char* to_string(State state);
  struct Session;

  State step(State state, const wire::FrameHeader& frame);
  State on_hello(const wire::FrameHeader& frame);
  void check_guest_fits(const wire::Hello& hello) const;
  bool takes_memory(const wire::Hello& hello) const;
  std::uint32_t channels_accepted(const wire::Hello& hello) const;
  void check_postcopy_possible(const MigratableVm* vm) const;
  State on_shared_memory(const wire::FrameHeader& frame);
  void build_vm();
  void start_doorman();
  State on_page_plan(const wire::FrameHeader& frame);
  State on_state_section(const wire::FrameHeader& frame);
  State on_complete(const wire::FrameHeader& frame);
  State on_commit(const wire::FrameHeader& frame);
  State resume_and_report_running();
  State await_commit_retry(const std::exception& broken);
  void verify(std::uint64_t source_digest, const char* when);
  void verify_disks(std::uint64_t source_digest);
  State restore_and_report_ready();
  State on_postcopy_start(const wire::FrameHeader& frame);
  State on_postcopy_complete(const wire::FrameHeader& frame);
  void recover_postcopy(const std::exception& broken);
  PostcopyStats postcopy_so_far() const;
  void finish_completed(std::chrono::steady_clock::time_point resumed_at);
  void report_guest_handover();

  transport::Stream* stream_;  // the main connection: the one given, until a post-copy recovery
  const VmFactory make_vm_;
  const ReceiverOptions options_;
  std::unique_ptr<Session> s_;
  std::atomic<bool> aborted_{false};
  std::atomic<std::uint64_t> bytes_received_{0};
};

}  // namespace mig::engine
