// zstd for page batches: one context per stream, and a gate that stops trying on
// incompressible memory and samples it again later, so random memory costs next to nothing
// with compression on.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace mig::engine {

class BatchCompressor {
 public:
  explicit BatchCompressor(int level);
  ~BatchCompressor();
  BatchCompressor(const BatchCompressor&) = delete;
  BatchCompressor& operator=(const BatchCompressor&) = delete;

  // The zstd frame of the bytes in `parts` (`total` of them), when it is worth sending:
  // at most 7/8 of the input. Otherwise empty, and after such a miss the next batches are
  // sent raw without trying: 1, 2, 4 ... up to 256 of them, doubling while misses continue.
  std::span<const std::byte> compress(std::span<const iovec> parts, std::size_t total);

  std::uint64_t batches_compressed() const { return compressed_; }
  std::uint64_t batches_tried() const { return tried_; }

 private:
  struct Context;
  std::unique_ptr<Context> context_;
  std::vector<std::byte> out_;
  unsigned backoff_ = 0, skip_ = 0;
  std::uint64_t compressed_ = 0, tried_ = 0;
};

class BatchDecompressor {
 public:
  BatchDecompressor();
  ~BatchDecompressor();
  BatchDecompressor(const BatchDecompressor&) = delete;
  BatchDecompressor& operator=(const BatchDecompressor&) = delete;

  // Fills `out` exactly from the zstd frame in `blob`; anything else (a corrupt frame, a
  // frame of another size) throws wire::ProtocolError and writes nothing beyond `out`.
  void decompress(std::span<const std::byte> blob, std::span<std::byte> out);

 private:
  struct Context;
  std::unique_ptr<Context> context_;
};

}  // namespace mig::engine
