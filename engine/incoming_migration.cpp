#include "engine/incoming_migration.h"

#include <sys/socket.h>

#include <optional>
#include <thread>

#include "engine/disk_migration.h"
#include "engine/incoming_doorman.h"
#include "engine/page_hashes.h"
#include "engine/page_receiver.h"
#include "engine/postcopy_destination.h"

namespace mig::engine {

namespace {

using Clock = std::chrono::steady_clock;
using wire::MessageType;

std::uint64_t ns_since(Clock::time_point t) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
}

bool is(const wire::FrameHeader& frame, MessageType type) { return frame.type == static_cast<std::uint16_t>(type); }

struct AcceptedChannels {
  std::vector<transport::Stream> pages;      // channels 1..n-1, in index order
  std::optional<transport::Stream> postcopy;
};

// A channel says who it is as soon as it connects; whoever does not within this is dropped.
constexpr std::chrono::milliseconds kChannelHelloWait{2000};

// The next connection that opens with a ChannelHello of this session. Anything else that
// connects meanwhile (another source, a scanner) is closed, and this migration goes on; all
// within `deadline`. Once the channels are in, the doorman answers the address instead.
std::pair<transport::Stream, wire::ChannelHello> accept_own_channel(const ReceiverOptions::Accept& accept, Clock::time_point deadline,
                                                                    std::uint64_t session, const char* waiting_for) {
  for (;;) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) throw transport::PeerError(std::string(waiting_for) + " did not come in time");
    auto stream = accept(left);
    stream.set_timeout(std::min(left, kChannelHelloWait));
    try {
      const auto opening = stream.receive<wire::ChannelHello>();
      if (opening.session == session) return {std::move(stream), opening};
    } catch (const std::exception&) {  // not one of ours: dropped
    }
  }
}

// Accepts the sender's extra channels, and its post-copy channel, in whatever order they connect.
AcceptedChannels accept_channels(const ReceiverOptions::Accept& accept, std::chrono::milliseconds timeout,
                                 std::uint64_t session, unsigned channels, bool postcopy) {
  std::vector<std::optional<transport::Stream>> slots(channels - 1);
  AcceptedChannels out;
  const auto deadline = Clock::now() + timeout;
  for (unsigned n = 1; n < channels + (postcopy ? 1 : 0); ++n) {
    auto [stream, h] = accept_own_channel(accept, deadline, session, "the sender's channels");
    stream.set_timeout(timeout);
    if (postcopy && h.index == wire::kPostcopyChannel && !out.postcopy) {
      out.postcopy = std::move(stream);
      continue;
    }
    if (h.index == 0 || h.index >= channels || slots[h.index - 1]) throw wire::ProtocolError("bad or repeated channel index");
    slots[h.index - 1] = std::move(stream);
  }
  for (auto& s : slots) out.pages.push_back(std::move(*s));
  return out;
}

}  // namespace

// What one incoming migration builds up as it goes. Member order is teardown order in
// reverse: the helper threads stop before the hashes and the VM they use go.
struct IncomingMigration::Session {
  Clock::time_point start = Clock::now();
  CpuTime cpu;  // the helper threads; the receiving thread counts from cpu_start
  std::uint64_t cpu_start = thread_cpu_ns();
  wire::Hello hello;
  VmShape shape;
  std::vector<UniqueFd> memory_fds;  // same host: the source's memory
  std::unique_ptr<MigratableVm> vm;
  std::vector<MemoryRegion> regions;
  unsigned channels = 1;
  std::unique_ptr<PageHashes> hashes;
  std::unique_ptr<PageReceiver> pages;
  std::unique_ptr<DiskReceiver> disks;
  ExtraChannels extra;
  std::vector<std::jthread> preparing;
  // Post-copy.
  bool postcopy = false;  // agreed at the handshake
  std::optional<transport::Stream> urgent, reconnected;
  std::unique_ptr<PostcopyDestination> postcopy_memory;
  Clock::time_point resumed_at;
  wire::Running running;  // as sent, and as sent again to a source asking after it
  std::uint32_t recoveries = 0;
  std::optional<std::string> postcopy_error;  // why the link broke last
  std::vector<StateSection> sections;
  std::uint64_t state_bytes = 0;
  IncomingStats stats;
  std::unique_ptr<IncomingDoorman> doorman;  // once set up: answers the incoming address
};

IncomingMigration::IncomingMigration(transport::Stream& stream, VmFactory make_vm, ReceiverOptions options)
    : stream_(&stream), make_vm_(std::move(make_vm)), options_(std::move(options)), s_(std::make_unique<Session>()) {}

IncomingMigration::~IncomingMigration() = default;

const char* IncomingMigration::to_string(State state) {
  switch (state) {
    case State::awaiting_hello: return "awaiting Hello";
    case State::awaiting_shared_memory: return "awaiting SharedMemory";
    case State::receiving_pages: return "receiving pages";
    case State::receiving_state: return "receiving state";
    case State::awaiting_commit: return "awaiting Commit";
    case State::postcopy: return "post-copy";
    case State::running: return "running";
  }
  return "unknown";
}

void IncomingMigration::abort() {
  aborted_ = true;
  ::shutdown(stream_->fd(), SHUT_RDWR);
}

IncomingResult IncomingMigration::run() {
  Session& s = *s_;
  IncomingResult result;
  try {
    stream_->set_timeout(options_.peer_timeout);
    for (State state = State::awaiting_hello; state != State::running;) {
      try {
        state = step(state, stream_->read_header());
      } catch (const std::exception& e) {
        if (aborted_ || dynamic_cast<const transport::RemoteError*>(&e)) throw;
        // After the switchover the guest runs here: a broken link pauses, it does not fail.
        if (state == State::postcopy)
          recover_postcopy(e);
        else if (state == State::awaiting_commit)
          state = await_commit_retry(e);  // the source may have committed: ask it
        else
          throw;
      }
      bytes_received_ = stream_->counters().bytes_received;
    }
    result.vm = std::move(s.vm);
  } catch (const std::exception& e) {
    s.stats.status = MigrationStatus::failed;
    // A channel's own error says more than the shutdown of channel 0 it caused.
    const auto channel_error = s.extra.stop();
    s.stats.error = aborted_ ? "the receiver was told to stop" : channel_error ? *channel_error : e.what();
    // The guest ran here in post-copy: it is lost, and the statistics say it had switched.
    if (s.postcopy_memory && s.resumed_at != Clock::time_point{}) s.stats.postcopy = postcopy_so_far();
    if (!dynamic_cast<const transport::RemoteError*>(&e)) {
      try {
        stream_->set_timeout(std::chrono::milliseconds(200));
        stream_->send(wire::Error{s.stats.error});
      } catch (...) {
      }
    }
  }
  s.stats.bytes_received = stream_->counters().bytes_received + s.extra.bytes();
  s.stats.security = stream_->security();
  s.preparing.clear();  // stopped and joined, so their CPU time is counted
  s.stats.cpu_s = s.cpu.seconds(s.cpu_start);
  result.stats = s.stats;
  return result;
}

IncomingMigration::State IncomingMigration::step(State state, const wire::FrameHeader& frame) {
  switch (state) {
    case State::awaiting_hello:
      if (is(frame, MessageType::hello)) return on_hello(frame);
      break;
    case State::awaiting_shared_memory:
      if (is(frame, MessageType::shared_memory)) return on_shared_memory(frame);
      break;
    case State::receiving_pages:
      // Round 0 is over at the first round end (or at Complete, offline): whatever pages the
      // plan still lists have arrived already. Channels interleave 2 MiB chunks, so channel
      // 0's round end is every channel's, give or take a batch.
      if (is(frame, MessageType::round_end) || is(frame, MessageType::complete))
        for (auto& helper : s_->preparing) helper.request_stop();
      if (s_->pages->handle(frame) || s_->disks->handle(*stream_, frame)) return state;
      if (is(frame, MessageType::page_plan)) return on_page_plan(frame);
      [[fallthrough]];
    case State::receiving_state:
      if (is(frame, MessageType::state_section)) return on_state_section(frame);
      if (is(frame, MessageType::complete)) return on_complete(frame);
      if (is(frame, MessageType::postcopy_start) && s_->postcopy) return on_postcopy_start(frame);
      break;
    case State::awaiting_commit:
      if (is(frame, MessageType::commit)) return on_commit(frame);
      break;
    case State::postcopy:
      if (s_->pages->handle(frame)) return state;
      if (is(frame, MessageType::complete)) return on_postcopy_complete(frame);
      break;
    case State::running:
      break;
  }
  throw wire::ProtocolError(std::string("unexpected ") + wire::to_string(static_cast<MessageType>(frame.type)) +
                            " while " + to_string(state));
}

IncomingMigration::State IncomingMigration::on_hello(const wire::FrameHeader& frame) {
  Session& s = *s_;
  s.hello = wire::decode<wire::Hello>(stream_->read_payload(frame));
  s.stats.dry_run = (s.hello.capabilities & wire::kCapDryRun) != 0;
  if (options_.hello_received) options_.hello_received(s.stats.dry_run);
  check_guest_fits(s.hello);
  for (const auto& d : s.hello.disks) s.shape.disks.push_back({d.size, d.chunk_bytes, (d.flags & wire::kDiskCopy) != 0, d.path});
  const std::uint32_t postcopy = s.hello.capabilities & wire::kCapPostcopy;
  if (s.stats.dry_run) {
    // As far as it can be told without building the VM. Memory it would take leaves nothing
    // to copy late, so then post-copy is not asked of it.
    if (options_.check_disks) options_.check_disks(s.shape.disks);
    const std::uint32_t memory = takes_memory(s.hello) ? wire::kCapSharedMemory : 0;
    if (!memory) check_postcopy_possible(nullptr);
    stream_->send(wire::HelloAck{wire::kCapDryRun | memory | (memory ? 0 : postcopy), transport::host_boot_id(),
                                 channels_accepted(s.hello)});
    s.stats.status = MigrationStatus::completed;
    return State::running;  // nothing built, nothing to run: the check is the whole session
  }
  s.shape.vcpus = s.hello.vcpus;
  for (const auto& r : s.hello.regions) s.shape.regions.push_back({r.guest_addr, r.size});
  if (takes_memory(s.hello)) {
    // The VM is built on the source's memory, which arrives only after the acknowledgement.
    // Nothing is left to copy late, so no post-copy; verification covers the copied disks.
    stream_->send(wire::HelloAck{wire::kCapSharedMemory | (s.hello.capabilities & wire::kCapVerify), transport::host_boot_id()});
    s.stats.shared_memory = true;
    return State::awaiting_shared_memory;
  }
  check_postcopy_possible(nullptr);
  build_vm();
  check_postcopy_possible(s.vm.get());
  s.postcopy = postcopy != 0;
  s.channels = channels_accepted(s.hello);
  s.stats.channels = s.channels;
  stream_->send(wire::HelloAck{(s.hello.capabilities & wire::kCapVerify) | postcopy, transport::host_boot_id(), s.channels});
  // Post-copy answers record their hashes as one more channel (postcopy_source.h).
  s.hashes = std::make_unique<PageHashes>(s.regions, s.channels + (s.postcopy ? 1 : 0));
  s.pages = std::make_unique<PageReceiver>(s.regions, *stream_, *s.hashes, 0, s.channels);
  if (s.channels > 1 || s.postcopy) {
    auto channels = accept_channels(options_.accept_channel, options_.peer_timeout, s.hello.session, s.channels, s.postcopy);
    if (s.channels > 1) s.extra.start(std::move(channels.pages), s.regions, *s.hashes, *stream_, s.cpu);
    s.urgent = std::move(channels.postcopy);
  }
  start_doorman();
  return State::receiving_pages;
}

// The source's memory is taken (a same-host hand-over) where it is offered, this receiver
// adopts shared memory, and the stream can carry file descriptors.
bool IncomingMigration::takes_memory(const wire::Hello& hello) const {
  return options_.adopt_shared_memory && (hello.capabilities & wire::kCapSharedMemory) && stream_->can_pass_fds();
}

// Extra channels need accept_channel; without it the sender falls back to one.
std::uint32_t IncomingMigration::channels_accepted(const wire::Hello& hello) const {
  return options_.accept_channel ? hello.channels : 1;
}

// A source that asked for post-copy fails without it, so a receiver that cannot take it answers
// with an Error that says why. Post-copy needs a connection of its own and a guest that runs
// here at once; this receiver's options decide that before anything is built, and the VM's
// memory has its say once it is.
void IncomingMigration::check_postcopy_possible(const MigratableVm* vm) const {
  if (!(s_->hello.capabilities & wire::kCapPostcopy)) return;
  std::string why;
  if (!options_.postcopy)
    why = "this receiver takes no post-copy";
  else if (!options_.accept_channel)
    why = "this receiver takes no extra connections, and post-copy needs one for its urgent pages";
  else if (!options_.autostart)
    why = "this receiver leaves the guest paused, and a guest in post-copy must run to ask for its pages";
  else if (vm)
    why = vm->postcopy_unsupported();
  if (!why.empty()) throw std::runtime_error("the destination cannot take post-copy: " + why);
}

// Before anything is built for it: the guest must be within this receiver's limits, and this
// host must be able to give it the CPU it was given.
void IncomingMigration::check_guest_fits(const wire::Hello& hello) const {
  std::uint64_t guest_bytes = 0;
  for (const auto& r : hello.regions) guest_bytes += r.size;
  if (options_.max_guest_bytes && guest_bytes > options_.max_guest_bytes)
    throw std::runtime_error("the guest has " + std::to_string(guest_bytes >> 20) + " MiB of memory, more than the " +
                             std::to_string(options_.max_guest_bytes >> 20) + " MiB this receiver accepts (--max-mem)");
  if (options_.max_vcpus && hello.vcpus > options_.max_vcpus)
    throw std::runtime_error("the guest has " + std::to_string(hello.vcpus) + " vCPUs, more than the " +
                             std::to_string(options_.max_vcpus) + " this receiver accepts (--max-vcpus)");
  if (options_.missing_cpu_features && !hello.cpuid.empty()) {
    const auto missing = options_.missing_cpu_features(hello.cpuid);
    std::string names;
    for (const auto& m : missing) names += (names.empty() ? "" : ", ") + m;
    if (!missing.empty()) throw std::runtime_error("destination CPU lacks " + names + ", which the guest was given");
  }
  if (options_.tsc_refusal && hello.tsc_khz != 0)
    if (const auto refusal = options_.tsc_refusal(hello.tsc_khz); !refusal.empty()) throw std::runtime_error(refusal);
}

IncomingMigration::State IncomingMigration::on_shared_memory(const wire::FrameHeader& frame) {
  Session& s = *s_;
  const auto announced = wire::decode<wire::SharedMemory>(stream_->read_payload(frame));
  if (announced.regions != s.hello.regions.size())
    throw wire::ProtocolError("SharedMemory announces " + std::to_string(announced.regions) + " regions, Hello had " +
                              std::to_string(s.hello.regions.size()));
  s.memory_fds = stream_->receive_fds(announced.regions);
  for (const auto& fd : s.memory_fds) s.shape.shared_memory_fds.push_back(fd.get());
  build_vm();
  s.hashes = std::make_unique<PageHashes>(s.regions, 1);
  s.pages = std::make_unique<PageReceiver>(s.regions, *stream_, *s.hashes, 0, 1);
  start_doorman();
  return State::receiving_pages;
}

// From here to the end, the incoming address is answered by the doorman: every connection
// the migration needs has been accepted.
void IncomingMigration::start_doorman() {
  if (options_.accept_channel) s_->doorman = std::make_unique<IncomingDoorman>(options_.accept_channel, s_->hello.session);
}

void IncomingMigration::build_vm() {
  Session& s = *s_;
  s.vm = make_vm_(s.shape);
  s.regions = s.vm->memory_regions();
  if (s.regions.size() != s.hello.regions.size()) throw std::runtime_error("the VM built here does not have the sender's memory layout");
  for (std::size_t i = 0; i < s.regions.size(); ++i) {
    if (s.regions[i].guest_addr != s.hello.regions[i].guest_addr || s.regions[i].size != s.hello.regions[i].size)
      throw std::runtime_error("the VM built here does not have the sender's memory layout");
    s.stats.guest_bytes += s.regions[i].size;
  }
  s.disks = std::make_unique<DiskReceiver>(s.vm->disks(), s.hello.disks);
}

IncomingMigration::State IncomingMigration::on_page_plan(const wire::FrameHeader& frame) {
  Session& s = *s_;
  if (!s.preparing.empty()) throw wire::ProtocolError("a second PagePlan");
  s.preparing =
      start_preparing(*s.vm, s.regions, wire::decode<wire::PagePlan>(stream_->read_payload(frame)), s.channels, s.cpu);
  return State::receiving_pages;
}

// Sections are bounded in number and in total, not only each on its own: a peer must not be
// able to make the receiver hold more than a guest's state could ever need.
IncomingMigration::State IncomingMigration::on_state_section(const wire::FrameHeader& frame) {
  Session& s = *s_;
  auto section = wire::decode<wire::StateSection>(stream_->read_payload(frame));
  s.state_bytes += section.data.size();
  if (s.sections.size() >= wire::kMaxStateSections || s.state_bytes > wire::kMaxStateTotal)
    throw wire::ProtocolError("state sections exceed " + std::to_string(wire::kMaxStateSections) + " sections or " +
                              std::to_string(wire::kMaxStateTotal >> 20) + " MiB in total");
  s.sections.push_back({std::move(section.name), section.version, std::move(section.data)});
  return State::receiving_state;
}

// Every channel acknowledged the final round before the sender sent Complete, so all memory
// is here: verify it, then restore the state.
IncomingMigration::State IncomingMigration::on_complete(const wire::FrameHeader& frame) {
  Session& s = *s_;
  const auto complete = wire::decode<wire::Complete>(stream_->read_payload(frame));
  if (auto error = s.extra.stop()) throw std::runtime_error(*error);
  verify(complete.page_digest, "");
  verify_disks(complete.disk_digest);
  return restore_and_report_ready();
}

// Memory handed over is the source's own: one copy, nothing to compare.
void IncomingMigration::verify(std::uint64_t source_digest, const char* when) {
  Session& s = *s_;
  if (!(s.hello.capabilities & wire::kCapVerify) || s.stats.shared_memory) return;
  if (s.hashes->digest() != source_digest)
    throw std::runtime_error(std::string("verification failed") + when + ": destination memory differs from the source's");
  s.stats.verified = true;
}

// Every disk chunk came before Complete on this one connection, so the digest is final.
void IncomingMigration::verify_disks(std::uint64_t source_digest) {
  Session& s = *s_;
  if (!(s.hello.capabilities & wire::kCapVerify)) return;
  if (s.disks->digest() != source_digest)
    throw std::runtime_error("verification failed: destination disk contents differ from the source's");
}

// Shared disks become this side's before anything here may write them: a lock that cannot be
// had fails the migration while the source can still take its guest back.
IncomingMigration::State IncomingMigration::restore_and_report_ready() {
  Session& s = *s_;
  s.disks->take_over_shared();
  const auto restore_start = Clock::now();
  s.vm->restore_state(s.sections);
  const std::uint64_t restore_ns = ns_since(restore_start);
  s.stats.restore_ms = static_cast<double>(restore_ns) / 1e6;
  stream_->send(wire::Ready{restore_ns});
  return State::awaiting_commit;
}

IncomingMigration::State IncomingMigration::on_commit(const wire::FrameHeader& frame) {
  wire::decode<wire::Commit>(stream_->read_payload(frame));
  return resume_and_report_running();
}

// The connection broke while the restored guest waited for Commit. The source either failed
// before committing (and runs the guest again), or committed and lost the connection; only
// it knows, and it asks again on a new connection if it committed. Until then the guest stays
// here paused; after handoff_grace it is discarded, as the source holds it either way.
IncomingMigration::State IncomingMigration::await_commit_retry(const std::exception& broken) {
  Session& s = *s_;
  if (!s.doorman) throw;
  try {
    auto [stream, retry] = s.doorman->take_commit_retry(Clock::now() + options_.handoff_grace, "the source's word on the commit");
    s.reconnected = std::move(stream);
    stream_ = &*s.reconnected;
    stream_->set_timeout(options_.peer_timeout);
  } catch (const transport::PeerError&) {
    throw std::runtime_error(std::string("the connection broke before Commit (") + broken.what() +
                             "), and the source did not say it committed; the guest was discarded here, the source holds it");
  }
  s.stats.commit_retried = true;
  return resume_and_report_running();
}

void IncomingMigration::answer_commit_retries() {
  Session& s = *s_;
  if (!s.doorman || s.stats.status != MigrationStatus::completed) return;
  // The main connection has carried all it will: closed now, as it would be without this
  // wait, so that the source does not wait out its time for a Handover report.
  ::shutdown(stream_->fd(), SHUT_RDWR);
  const auto until = s.resumed_at + options_.handoff_grace;
  try {
    for (;;) {
      auto [stream, retry] = s.doorman->take_commit_retry(until, "CommitRetry");
      stream.send(s.running);
    }
  } catch (const std::exception&) {  // the grace period is over, or the receiver quits
  }
}

IncomingMigration::State IncomingMigration::resume_and_report_running() {
  Session& s = *s_;
  const auto resume_start = Clock::now();
  if (options_.autostart) s.vm->resume();
  s.resumed_at = Clock::now();
  // The guest runs here now: from this line on, nothing may take it away, so what follows
  // only reports - or, in post-copy, brings the rest of its memory.
  s.stats.resume_ms = std::chrono::duration<double, std::milli>(s.resumed_at - resume_start).count();
  s.running = {std::chrono::duration_cast<std::chrono::nanoseconds>(s.resumed_at.time_since_epoch()).count(),
               ns_since(resume_start)};
  try {
    stream_->send(s.running);
  } catch (const std::exception&) {
    // The source may be gone already (it then reports handoff-unknown, or in post-copy waits
    // for a recovery); the guest runs here.
  }
  if (s.postcopy_memory) return State::postcopy;
  finish_completed(s.resumed_at);
  return State::running;
}

void IncomingMigration::finish_completed(Clock::time_point done_at) {
  Session& s = *s_;
  auto& stats = s.stats;
  stats.status = MigrationStatus::completed;
  stats.pages_received = s.pages->pages() + s.extra.pages();
  stats.rounds = s.pages->rounds();
  stats.total_ms = std::chrono::duration<double, std::milli>(done_at - s.start).count();
  if (s.shape.disks.size() > 0) {
    stats.disk = s.disks->stats();
    stats.disk->verified = (s.hello.capabilities & wire::kCapVerify) && stats.disk->copied;
  }
  if (!options_.autostart) return;  // no guest running here yet to report on
  try {
    report_guest_handover();
  } catch (const std::exception&) {
  }
}

// The switchover to post-copy. The page channels are done (each acknowledged its last
// round); the pages the source still holds are dropped here and trapped, and only then is
// the state restored, since restoring may touch guest memory.
IncomingMigration::State IncomingMigration::on_postcopy_start(const wire::FrameHeader& frame) {
  Session& s = *s_;
  auto start = wire::decode<wire::PostcopyStart>(stream_->read_payload(frame));
  if (auto error = s.extra.stop()) throw std::runtime_error(*error);
  s.preparing.clear();  // nothing may fault pages in behind the trap's back
  s.postcopy_memory = std::make_unique<PostcopyDestination>(*s.vm, s.regions, *s.hashes, std::move(start.bitmaps));
  s.postcopy_memory->connect(*s.urgent, s.channels);
  s.pages->install_through(*s.postcopy_memory);
  return restore_and_report_ready();
}

// The source has sent every page. Those answering requests may still be landing on the
// post-copy channel; once all are here, memory stops trapping and is verified like pre-copy's.
IncomingMigration::State IncomingMigration::on_postcopy_complete(const wire::FrameHeader& frame) {
  Session& s = *s_;
  const auto complete = wire::decode<wire::Complete>(stream_->read_payload(frame));
  if (!s.postcopy_memory->wait_installed(options_.peer_timeout))
    throw wire::ProtocolError("the source said post-copy was complete, but pages are still missing");
  s.postcopy_memory->finish();
  verify(complete.page_digest, " after post-copy");
  verify_disks(complete.disk_digest);
  s.stats.postcopy = postcopy_so_far();
  stream_->send(wire::PostcopyDone{s.stats.postcopy->pages_needed});
  finish_completed(Clock::now());
  return State::running;
}

// Post-copy since the guest resumed here.
PostcopyStats IncomingMigration::postcopy_so_far() const {
  const Session& s = *s_;
  auto postcopy = s.postcopy_memory->stats();
  postcopy.recoveries = s.recoveries;
  postcopy.postcopy_ms = std::chrono::duration<double, std::milli>(Clock::now() - s.resumed_at).count();
  return postcopy;
}

// The link broke after the switchover. The guest stays here, its vCPUs waiting on whatever
// page they miss, until the source reconnects where the operator says; the source learns
// which pages are still missing, and they come again.
void IncomingMigration::recover_postcopy(const std::exception& broken) {
  Session& s = *s_;
  const auto channel_error = s.postcopy_memory->disconnect();
  s.postcopy_error = channel_error ? *channel_error : broken.what();
  if (!options_.await_recovery) throw std::runtime_error("post-copy link broke and recovery is not possible here: " + *s.postcopy_error);
  for (;;) {
    const auto accept = options_.await_recovery();
    if (!accept) throw std::runtime_error("post-copy was given up after the link broke (" + *s.postcopy_error + "); the guest is lost");
    try {
      auto main = accept(options_.peer_timeout);
      main.set_timeout(options_.peer_timeout);
      if (main.receive<wire::PostcopyResume>().session != s.hello.session)
        throw wire::ProtocolError("a source of another migration tried to resume this post-copy");
      main.send(wire::PostcopyResumeAck{s.postcopy_memory->missing()});
      auto channels = accept_channels(accept, options_.peer_timeout, s.hello.session, 1, true);
      s.reconnected = std::move(main);
      s.urgent = std::move(channels.postcopy);
      stream_ = &*s.reconnected;
      s.pages = std::make_unique<PageReceiver>(s.regions, *stream_, *s.hashes, 0, 1);
      s.pages->install_through(*s.postcopy_memory);
      s.postcopy_memory->connect(*s.urgent, s.channels);
      ++s.recoveries;
      return;
    } catch (const std::exception& e) {
      s.postcopy_error = std::string("recovery failed: ") + e.what();
    }
  }
}

void IncomingMigration::report_guest_handover() {
  Session& s = *s_;
  s.stats.guest = s.vm->wait_guest_handover(options_.handover_wait);
  if (!s.stats.guest) return;
  stream_->send(wire::Handover{static_cast<std::int64_t>(s.stats.guest->gap_ms * 1e6), s.stats.guest->sequence_continued,
                              s.stats.guest->last_source_seq, s.stats.guest->first_destination_seq});
}

}  // namespace mig::engine
