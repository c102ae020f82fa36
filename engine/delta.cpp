#include "engine/delta.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "engine/pages.h"
#include "transport/bytes.h"

namespace mig::engine {

namespace {
constexpr std::size_t kWord = 8;

std::uint64_t word_at(const std::byte* p, std::size_t offset) {
  std::uint64_t w;
  std::memcpy(&w, p + offset, kWord);
  return w;
}

void put16(std::vector<std::byte>& out, std::size_t value) {
  const auto v = static_cast<std::uint16_t>(value);
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + 2);
}
}  // namespace

std::size_t encode_delta(const std::byte* old_page, const std::byte* new_page, std::size_t limit,
                         std::vector<std::byte>& out) {
  const std::size_t start = out.size();
  std::size_t offset = 0, last_end = 0;
  while (offset < kPageSize) {
    if (word_at(old_page, offset) == word_at(new_page, offset)) {
      offset += kWord;
      continue;
    }
    std::size_t end = offset + kWord;
    while (end < kPageSize && word_at(old_page, end) != word_at(new_page, end)) end += kWord;
    if (out.size() - start + 4 + (end - offset) >= limit) {
      out.resize(start);
      return 0;
    }
    put16(out, offset - last_end);
    put16(out, end - offset);
    out.insert(out.end(), new_page + offset, new_page + end);
    last_end = offset = end;
  }
  return out.size() - start;
}

void apply_delta(std::byte* page, std::span<const std::byte> delta) {
  std::size_t offset = 0, in = 0;
  while (in < delta.size()) {
    if (delta.size() - in < 4) throw wire::ProtocolError("truncated page delta");
    std::uint16_t skip, length;
    std::memcpy(&skip, delta.data() + in, 2);
    std::memcpy(&length, delta.data() + in + 2, 2);
    in += 4;
    if (skip > kPageSize - offset || length > kPageSize - offset - skip || length > delta.size() - in)
      throw wire::ProtocolError("page delta runs past the page");
    offset += skip;
    std::memcpy(page + offset, delta.data() + in, length);
    offset += length;
    in += length;
  }
}

DeltaCache::DeltaCache(std::size_t capacity_pages)
    : capacity_(capacity_pages), storage_(capacity_pages * kPageSize), owner_(capacity_pages, ~std::uint64_t{0}) {
  if (capacity_pages == 0) throw std::invalid_argument("delta cache needs at least one page");
  slots_.reserve(capacity_pages);
}

std::byte* DeltaCache::find(std::size_t region, std::uint64_t page) {
  const auto it = slots_.find(page_key(region, page));
  return it == slots_.end() ? nullptr : storage_.data() + it->second * kPageSize;
}

std::byte* DeltaCache::slot_for(std::size_t region, std::uint64_t page) {
  if (std::byte* cached = find(region, page)) return cached;
  const std::size_t slot = next_;
  next_ = (next_ + 1) % capacity_;
  if (owner_[slot] != ~std::uint64_t{0}) slots_.erase(owner_[slot]);
  owner_[slot] = page_key(region, page);
  slots_[owner_[slot]] = slot;
  return storage_.data() + slot * kPageSize;
}

}  // namespace mig::engine
