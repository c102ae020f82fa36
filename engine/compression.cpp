#include "engine/compression.h"

#include <zstd.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "transport/bytes.h"

namespace mig::engine {

namespace {
constexpr unsigned kMaxBackoff = 256;
}

struct BatchCompressor::Context {
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ~Context() { ZSTD_freeCCtx(cctx); }
};

BatchCompressor::BatchCompressor(int level) : context_(std::make_unique<Context>()) {
  if (!context_->cctx) throw std::bad_alloc();
  if (level < 1 || level > ZSTD_maxCLevel())
    throw std::invalid_argument("zstd level must be between 1 and " + std::to_string(ZSTD_maxCLevel()));
  ZSTD_CCtx_setParameter(context_->cctx, ZSTD_c_compressionLevel, level);
}
BatchCompressor::~BatchCompressor() = default;

std::span<const std::byte> BatchCompressor::compress(std::span<const iovec> parts, std::size_t total) {
  if (skip_ > 0) {
    --skip_;
    return {};
  }
  ++tried_;
  out_.resize(ZSTD_compressBound(total));
  ZSTD_outBuffer out{out_.data(), out_.size(), 0};
  ZSTD_CCtx_reset(context_->cctx, ZSTD_reset_session_only);
  ZSTD_CCtx_setPledgedSrcSize(context_->cctx, total);
  for (std::size_t i = 0; i < parts.size(); ++i) {
    ZSTD_inBuffer in{parts[i].iov_base, parts[i].iov_len, 0};
    const bool last = i + 1 == parts.size();
    for (;;) {
      const std::size_t left = ZSTD_compressStream2(context_->cctx, &out, &in, last ? ZSTD_e_end : ZSTD_e_continue);
      if (ZSTD_isError(left)) throw std::runtime_error(std::string("zstd: ") + ZSTD_getErrorName(left));
      if (last ? left == 0 : in.pos == in.size) break;
    }
  }
  if (out.pos * 8 > total * 7) {
    backoff_ = std::min(std::max(backoff_ * 2, 1u), kMaxBackoff);
    skip_ = backoff_;
    return {};
  }
  backoff_ = 0;
  ++compressed_;
  return {out_.data(), out.pos};
}

struct BatchDecompressor::Context {
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  ~Context() { ZSTD_freeDCtx(dctx); }
};

BatchDecompressor::BatchDecompressor() : context_(std::make_unique<Context>()) {
  if (!context_->dctx) throw std::bad_alloc();
}
BatchDecompressor::~BatchDecompressor() = default;

void BatchDecompressor::decompress(std::span<const std::byte> blob, std::span<std::byte> out) {
  const std::size_t n = ZSTD_decompressDCtx(context_->dctx, out.data(), out.size(), blob.data(), blob.size());
  if (ZSTD_isError(n)) throw wire::ProtocolError(std::string("corrupt compressed page batch: ") + ZSTD_getErrorName(n));
  if (n != out.size())
    throw wire::ProtocolError("compressed page batch holds " + std::to_string(n) + " bytes, its descriptors say " +
                              std::to_string(out.size()));
}

}  // namespace mig::engine
