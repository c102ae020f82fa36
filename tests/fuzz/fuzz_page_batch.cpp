// libFuzzer target: page batches (raw, zero, delta, zstd) and round ends applied by the
// receiver into a small guest of two regions. The guest memory is on the heap, so ASan's
// redzones catch any write outside it. The input goes through a real Stream (a socketpair).
#include <sys/socket.h>

#include <vector>

#include "engine/page_receiver.h"

using namespace mig;

namespace {

constexpr std::size_t kRegionPages = 16;

struct Guest {
  std::vector<std::byte> low = std::vector<std::byte>(kRegionPages * engine::kPageSize);
  std::vector<std::byte> high = std::vector<std::byte>(kRegionPages * engine::kPageSize);
  std::vector<engine::MemoryRegion> regions{{0, low.size(), low.data()}, {1u << 20, high.size(), high.data()}};
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > (1u << 20)) return 0;
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) __builtin_trap();
  const int buffer = 4 << 20;
  ::setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &buffer, sizeof buffer);
  ::setsockopt(fds[1], SOL_SOCKET, SO_RCVBUF, &buffer, sizeof buffer);
  transport::Stream peer{UniqueFd(fds[0])}, stream{UniqueFd(fds[1])};
  for (std::size_t sent = 0; sent < size;) {
    const ssize_t n = ::send(peer.fd(), data + sent, size - sent, MSG_NOSIGNAL);
    if (n <= 0) __builtin_trap();
    sent += static_cast<std::size_t>(n);
  }
  ::shutdown(peer.fd(), SHUT_WR);
  Guest guest;
  engine::PageHashes hashes(guest.regions, 1);
  engine::PageReceiver receiver(guest.regions, stream, hashes, 0, 1);
  try {
    for (;;) {
      const auto header = stream.read_header();
      if (!receiver.handle(header)) stream.read_payload(header);
    }
  } catch (const wire::ProtocolError&) {
  } catch (const transport::RemoteError&) {  // an Error frame: the peer's own refusal
  } catch (const transport::PeerError&) {    // the end of the input
  }
  return 0;
}
