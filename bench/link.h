// The raw link every bench ratio is taken against: plain TCP between populated buffers, at the
// best of a few send sizes, over one stream and over N. iperf3's default (128 KiB writes into
// one reused buffer) understates what a loopback stream carries by a third here, so ratios
// "to the link" that use it overstate how close a migration comes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <thread>
#include <vector>

namespace mig::bench {

struct LinkSample {
  unsigned streams = 1;
  std::size_t send_bytes = 0;  // bytes per send() call
  double Bps = 0;
};

// Moves `bytes` in total, split evenly over `streams` loopback TCP connections, each from a
// populated buffer of its own into a populated buffer of its own (so no page faults and no
// shared cache lines), and returns bytes per second.
double raw_transfer_Bps(std::uint64_t bytes, unsigned streams, std::size_t send_bytes);

inline const std::vector<std::size_t> kSendSizes = {128 << 10, 256 << 10, 1 << 20, 4 << 20};

// Every send size for each stream count, best first within each count.
std::vector<LinkSample> measure_link(std::uint64_t bytes, const std::vector<unsigned>& stream_counts,
                                     const std::vector<std::size_t>& send_sizes = kSendSizes);
// The best sample with `streams` streams.
LinkSample best(const std::vector<LinkSample>& samples, unsigned streams);

// iperf3's own figure for one stream of `bytes`, where iperf3 is installed.
std::optional<double> iperf3_Bps(std::uint64_t bytes);

// Load like a guest vCPU that busy-waits: one thread spinning until destroyed, so that a raw
// transfer can be measured under the same load as a migration of a spinning guest.
class Spinner {
 public:
  Spinner();

 private:
  std::jthread thread_;
};

}  // namespace mig::bench
