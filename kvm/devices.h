// The VMM's own devices: a COM1 16550 that is just enough for a guest to print, and the
// probe through which the workload guest reports heartbeats and self-check results.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "../common/fd.h"

namespace mig::kvm {

// Host CLOCK_MONOTONIC in nanoseconds: shared by every process on the host, so a source and
// a destination on one host can compare heartbeat timestamps directly.
std::int64_t monotonic_ns();

struct SerialState {
  std::uint8_t ier = 0, lcr = 0, mcr = 0, scr = 0, dll = 0x0c, dlm = 0;
  friend bool operator==(const SerialState&, const SerialState&) = default;
};

// Writes each byte through to its sink the moment the guest writes it, so a reader can
// timestamp output. No interrupts, no input: THR empty is always reported.
class Serial16550 {
 public:
  static constexpr std::uint16_t kBase = 0x3f8;
  // `path`: empty discards output, "-" is stdout, anything else is opened for appending (a
  // file or a FIFO).
  explicit Serial16550(const std::string& path);
  bool handles(std::uint16_t port) const { return port >= kBase && port < kBase + 8; }
  void io(std::uint16_t port, bool is_write, std::uint8_t* data);

  SerialState save() const { return state_; }
  void restore(const SerialState& s) { state_ = s; }

 private:
  UniqueFd sink_;
  SerialState state_;
};

struct HeartbeatState {
  std::uint64_t count = 0;
  std::uint32_t first_seq = 0, last_seq = 0;
  std::int64_t last_ns = 0;       // host time of the last heartbeat
  std::int64_t max_gap_ns = 0;    // longest host-time gap between consecutive heartbeats
  std::uint64_t seq_breaks = 0;   // heartbeats whose sequence number was not last + 1
  std::uint32_t ticks = 0;        // last reported LAPIC timer tick count
  std::uint32_t sweep_passes = 0;
  std::uint32_t disk_checks = 0;  // disk blocks the guest read back and found right
  std::uint32_t check_failures = 0;
  std::uint32_t last_failure_code = 0;
  bool ready = false;
  friend bool operator==(const HeartbeatState&, const HeartbeatState&) = default;
};

// What the destination's first heartbeat says about the switchover.
struct Handover {
  std::int64_t gap_ns = 0;     // the first heartbeat of any vCPU here minus the last of any at the source, host clock
  // Of the vCPU that beat first here.
  bool sequence_continued = false;
  std::uint32_t last_source_seq = 0, first_destination_seq = 0;
};

class Probe {
 public:
  explicit Probe(unsigned vcpus) : vcpus_(vcpus), work_(vcpus) {}
  bool handles(std::uint16_t port) const;  // the ports of guest/probe.h
  void io(unsigned vcpu, std::uint16_t port, bool is_write, std::uint8_t* data, std::uint32_t size);

  std::vector<HeartbeatState> snapshot() const;
  // The units of work each vCPU has reported here (MIG_PROBE_WORK), since this process
  // started it: a local measure of how fast a computing vCPU runs, which does not travel.
  std::vector<std::uint64_t> work() const;
  // Blocks until every vCPU has reported READY, or `timeout` passes. Returns whether they did.
  bool wait_ready(std::chrono::milliseconds timeout) const;
  // Blocks until vCPU `vcpu` sends a heartbeat with a sequence number above `seq`.
  bool wait_heartbeat_after(unsigned vcpu, std::uint32_t seq, std::chrono::milliseconds timeout) const;

  // Saved state is the per-vCPU heartbeat history; restoring it arms the handover
  // measurement, taken at the first heartbeat of any vCPU.
  std::vector<HeartbeatState> save() const { return snapshot(); }
  void restore(const std::vector<HeartbeatState>& state);
  // The handover, once the first heartbeat after restore() has arrived.
  std::optional<Handover> handover() const;
  bool wait_handover(std::chrono::milliseconds timeout) const;

 private:
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::vector<HeartbeatState> vcpus_;
  std::vector<std::uint64_t> work_;
  bool awaiting_handover_ = false;
  std::int64_t latest_source_ns_ = 0;  // the last heartbeat of any vCPU before restore()
  std::optional<Handover> handover_;
};

}  // namespace mig::kvm
