#include "kvm/devices.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

#include "guest/probe.h"

namespace mig::kvm {

std::int64_t monotonic_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

Serial16550::Serial16550(const std::string& path) {
  if (path == "-")
    sink_ = UniqueFd(check_syscall("dup stdout", [] { return ::fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 0); }));
  else if (!path.empty())
    sink_ = UniqueFd::open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
}

void Serial16550::io(std::uint16_t port, bool is_write, std::uint8_t* data) {
  const unsigned reg = port - kBase;
  const bool dlab = state_.lcr & 0x80;
  if (is_write) {
    switch (reg) {
      case 0:
        if (dlab) {
          state_.dll = *data;
        } else if (sink_.valid()) {
          // Unbuffered on purpose: a reader timestamps each byte as the guest writes it. A
          // failing sink (closed FIFO reader) must not stop the guest, so errors are dropped.
          [[maybe_unused]] auto n = ::write(sink_.get(), data, 1);
        }
        break;
      case 1: (dlab ? state_.dlm : state_.ier) = *data; break;
      case 3: state_.lcr = *data; break;
      case 4: state_.mcr = *data; break;
      case 7: state_.scr = *data; break;
      default: break;
    }
    return;
  }
  switch (reg) {
    case 0: *data = dlab ? state_.dll : 0; break;
    case 1: *data = dlab ? state_.dlm : state_.ier; break;
    case 2: *data = 0x01; break;  // IIR: no interrupt pending
    case 3: *data = state_.lcr; break;
    case 4: *data = state_.mcr; break;
    case 5: *data = 0x60; break;  // LSR: transmitter holding register and shifter empty
    case 6: *data = 0xb0; break;  // MSR: CTS, DSR, DCD
    case 7: *data = state_.scr; break;
    default: *data = 0xff;
  }
}

bool Probe::handles(std::uint16_t port) const { return port >= MIG_PROBE_FIRST && port < MIG_PROBE_END; }

void Probe::io(unsigned vcpu, std::uint16_t port, bool is_write, std::uint8_t* data, std::uint32_t size) {
  if (!is_write) {
    std::memset(data, 0xff, size);
    return;
  }
  std::uint32_t value = 0;
  std::memcpy(&value, data, std::min<std::uint32_t>(size, 4));
  const std::int64_t now = monotonic_ns();
  std::lock_guard lock(mutex_);
  if (vcpu >= vcpus_.size()) return;
  HeartbeatState& hb = vcpus_[vcpu];
  switch (port) {
    case MIG_PROBE_WORK: work_[vcpu] += value; return;  // frequent, and nobody waits for it
    case MIG_PROBE_HEARTBEAT:
      if (hb.count == 0) {
        hb.first_seq = value;
      } else {
        if (value != hb.last_seq + 1) ++hb.seq_breaks;
        hb.max_gap_ns = std::max(hb.max_gap_ns, now - hb.last_ns);
      }
      if (awaiting_handover_) {
        handover_ = Handover{now - latest_source_ns_, value == hb.last_seq + 1, hb.last_seq, value};
        awaiting_handover_ = false;
      }
      ++hb.count;
      hb.last_seq = value;
      hb.last_ns = now;
      break;
    case MIG_PROBE_TICKS: hb.ticks = value; break;
    case MIG_PROBE_CHECK_FAIL:
      ++hb.check_failures;
      hb.last_failure_code = value;
      break;
    case MIG_PROBE_READY: hb.ready = true; break;
    case MIG_PROBE_SWEEP_PASS: hb.sweep_passes = value; break;
    case MIG_PROBE_DISK_CHECKS: hb.disk_checks = value; break;
    default: return;
  }
  changed_.notify_all();
}

std::vector<HeartbeatState> Probe::snapshot() const {
  std::lock_guard lock(mutex_);
  return vcpus_;
}

std::vector<std::uint64_t> Probe::work() const {
  std::lock_guard lock(mutex_);
  return work_;
}

bool Probe::wait_ready(std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mutex_);
  return changed_.wait_for(lock, timeout, [&] {
    for (const auto& hb : vcpus_)
      if (!hb.ready) return false;
    return true;
  });
}

bool Probe::wait_heartbeat_after(unsigned vcpu, std::uint32_t seq, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mutex_);
  return changed_.wait_for(lock, timeout, [&] { return vcpus_.at(vcpu).count > 0 && vcpus_.at(vcpu).last_seq > seq; });
}

void Probe::restore(const std::vector<HeartbeatState>& state) {
  const std::int64_t now = monotonic_ns();
  std::lock_guard lock(mutex_);
  vcpus_ = state;
  vcpus_.resize(std::max<std::size_t>(vcpus_.size(), 1));
  work_.resize(vcpus_.size());
  // The timestamps came over the wire. One before boot or after now is no time on this
  // clock: nothing can be measured from it (and subtracting it could overflow).
  // The guest was gone from the last heartbeat of any of its vCPUs at the source until the
  // first of any here: a vCPU held back before the pause (by a dirty limit, say) does not
  // lengthen that.
  bool comparable = true, beat = false;
  latest_source_ns_ = 0;
  for (auto& hb : vcpus_) {
    hb.max_gap_ns = std::max<std::int64_t>(hb.max_gap_ns, 0);
    if (hb.last_ns < 0 || hb.last_ns > now) {
      comparable = false;
      hb.last_ns = now;
    } else if (hb.count > 0) {
      beat = true;
      latest_source_ns_ = std::max(latest_source_ns_, hb.last_ns);
    }
  }
  awaiting_handover_ = beat && comparable;
  handover_.reset();
}

std::optional<Handover> Probe::handover() const {
  std::lock_guard lock(mutex_);
  return handover_;
}

bool Probe::wait_handover(std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mutex_);
  return changed_.wait_for(lock, timeout, [&] { return handover_.has_value(); });
}

}  // namespace mig::kvm
