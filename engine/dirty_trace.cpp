#include "engine/dirty_trace.h"

#include <zstd.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <stdexcept>

namespace mig::engine {
namespace {

constexpr char kMagic[8] = {'M', 'I', 'G', 'T', 'R', 'A', 'C', 'E'};
constexpr std::uint32_t kVersion = 1;
// Bounds a reader trusts: a 1 TiB guest (larger ones are --guest-scale's business), 64
// regions, intervals of 100 us to 10 s.
constexpr std::uint64_t kMaxPages = (1ull << 40) / kPageSize;
constexpr std::uint32_t kMaxRegions = 64;
constexpr std::uint32_t kMaxWorkload = 4096;

std::uint64_t words_for(std::uint64_t pages) { return (pages + 63) / 64; }

template <typename Visit>
void for_each_page(std::span<const std::uint64_t> bitmap, Visit visit) {
  for (std::size_t w = 0; w < bitmap.size(); ++w)
    for (std::uint64_t word = bitmap[w]; word != 0; word &= word - 1)
      visit(std::uint64_t{w} * 64 + static_cast<std::uint64_t>(std::countr_zero(word)));
}

std::vector<std::uint64_t> to_bitmap(const std::vector<std::uint64_t>& pages, std::uint64_t page_count) {
  std::vector<std::uint64_t> bitmap(words_for(page_count), 0);
  for (auto p : pages) bitmap[p / 64] |= 1ull << (p % 64);
  return bitmap;
}

std::vector<std::uint64_t> to_pages(const std::vector<std::uint64_t>& bitmap) {
  std::vector<std::uint64_t> pages;
  for_each_page(bitmap, [&](std::uint64_t p) { pages.push_back(p); });
  return pages;
}

std::string compress(const std::vector<std::uint64_t>& bitmap) {
  const std::size_t size = bitmap.size() * sizeof(std::uint64_t);
  std::string out(ZSTD_compressBound(size), '\0');
  const std::size_t n = ZSTD_compress(out.data(), out.size(), bitmap.data(), size, 3);
  if (ZSTD_isError(n)) throw std::runtime_error(std::string("zstd: ") + ZSTD_getErrorName(n));
  out.resize(n);
  return out;
}

struct Reader {
  std::istream& in;
  const std::string& path;
  std::uint64_t remaining;  // bytes left in the stream: no size read from it may exceed them

  template <typename T>
  bool get(T& value) {
    in.read(reinterpret_cast<char*>(&value), sizeof value);
    const auto got = static_cast<std::size_t>(in.gcount());
    remaining -= std::min<std::uint64_t>(remaining, got);
    return got == sizeof value;
  }
  template <typename T>
  T need(const char* what) {
    T value{};
    if (!get(value)) fail(std::string("is truncated in its ") + what);
    return value;
  }
  std::string bytes(std::size_t n, const char* what) {
    if (n > remaining) fail(std::string("is truncated in its ") + what);
    remaining -= n;
    std::string out(n, '\0');
    in.read(out.data(), static_cast<std::streamsize>(n));
    if (static_cast<std::size_t>(in.gcount()) != n) fail(std::string("is truncated in its ") + what);
    return out;
  }
  // A compressed bitmap of `pages` bits.
  std::vector<std::uint64_t> bitmap(std::uint32_t compressed_size, std::uint64_t pages, const char* what) {
    const auto packed = bytes(compressed_size, what);
    const std::size_t size = words_for(pages) * sizeof(std::uint64_t);
    // The frame says how much it holds: anything but one bitmap is refused before allocating.
    if (ZSTD_getFrameContentSize(packed.data(), packed.size()) != size) fail(std::string("has a corrupt ") + what);
    std::vector<std::uint64_t> out(words_for(pages));
    const std::size_t n = ZSTD_decompress(out.data(), size, packed.data(), packed.size());
    if (ZSTD_isError(n) || n != size) fail(std::string("has a corrupt ") + what);
    // The last word may hold bits past the guest's last page: a trace that sets them names
    // pages the guest does not have.
    if (pages % 64 != 0 && (out.back() >> (pages % 64)) != 0) fail(std::string("marks pages beyond the guest in its ") + what);
    return out;
  }
  [[noreturn]] void fail(const std::string& why) const { throw std::runtime_error("dirty trace " + path + " " + why); }
};

void put_header(std::ofstream& out, const DirtyTrace& t) {
  auto put = [&](const auto& value) { out.write(reinterpret_cast<const char*>(&value), sizeof value); };
  out.write(kMagic, sizeof kMagic);
  put(kVersion);
  put(static_cast<std::uint32_t>(t.interval.count()));
  put(static_cast<std::uint32_t>(t.regions.size()));
  for (const auto& r : t.regions) {
    put(r.guest_addr);
    put(r.size);
  }
  put(static_cast<std::uint32_t>(t.workload.size()));
  out.write(t.workload.data(), static_cast<std::streamsize>(t.workload.size()));
  const auto populated = compress(to_bitmap(t.populated, t.pages));
  put(static_cast<std::uint32_t>(populated.size()));
  out.write(populated.data(), static_cast<std::streamsize>(populated.size()));
}

std::uint64_t pages_of(const std::vector<wire::Region>& regions) {
  std::uint64_t pages = 0;
  for (const auto& r : regions) pages += r.size / kPageSize;
  return pages;
}

}  // namespace

struct DirtyTraceWriter::Impl {
  std::ofstream out;
};

DirtyTraceWriter::DirtyTraceWriter(const std::string& path, const DirtyTrace& header) : impl_(std::make_unique<Impl>()) {
  impl_->out.open(path, std::ios::binary | std::ios::trunc);
  if (!impl_->out) throw std::runtime_error("cannot write the dirty trace " + path + ": " + std::strerror(errno));
  put_header(impl_->out, header);
  bytes_ = static_cast<std::uint64_t>(impl_->out.tellp());
}

DirtyTraceWriter::~DirtyTraceWriter() = default;

void DirtyTraceWriter::append(const std::vector<std::uint64_t>& bitmap) {
  const auto packed = compress(bitmap);
  const auto size = static_cast<std::uint32_t>(packed.size());
  impl_->out.write(reinterpret_cast<const char*>(&size), sizeof size);
  impl_->out.write(packed.data(), static_cast<std::streamsize>(packed.size()));
  impl_->out.flush();  // a recording cut short keeps every whole frame
  bytes_ += sizeof size + packed.size();
}

void write_trace(const std::string& path, const DirtyTrace& trace) {
  DirtyTraceWriter writer(path, trace);
  for (const auto& frame : trace.frames) writer.append(to_bitmap(frame, trace.pages));
}

DirtyTrace read_trace(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read the dirty trace " + path + ": " + std::strerror(errno));
  return parse_trace(in, path);
}

DirtyTrace parse_trace(std::istream& in, const std::string& name) {
  in.seekg(0, std::ios::end);
  const auto end = in.tellg();
  in.seekg(0);
  Reader r{in, name, end > 0 ? static_cast<std::uint64_t>(end) : 0};
  char magic[sizeof kMagic] = {};
  r.in.read(magic, sizeof magic);
  if (r.in.gcount() != sizeof magic || std::memcmp(magic, kMagic, sizeof magic) != 0) r.fail("is not a dirty trace");
  if (const auto version = r.need<std::uint32_t>("version"); version != kVersion)
    r.fail("has version " + std::to_string(version) + "; this mig reads version " + std::to_string(kVersion));
  DirtyTrace t;
  const auto interval_us = r.need<std::uint32_t>("interval");
  if (interval_us < 100 || interval_us > 10'000'000) r.fail("has an interval of " + std::to_string(interval_us) + " us");
  t.interval = std::chrono::microseconds(interval_us);
  const auto regions = r.need<std::uint32_t>("region count");
  if (regions == 0 || regions > kMaxRegions) r.fail("has " + std::to_string(regions) + " regions");
  for (std::uint32_t i = 0; i < regions; ++i) {
    wire::Region region{r.need<std::uint64_t>("regions"), r.need<std::uint64_t>("regions")};
    if (region.size == 0 || region.size % kPageSize || region.size / kPageSize > kMaxPages) r.fail("has a region of absurd size");
    t.regions.push_back(region);
  }
  t.pages = pages_of(t.regions);
  if (t.pages > kMaxPages) r.fail("describes a guest over 1 TiB");
  const auto workload = r.need<std::uint32_t>("workload");
  if (workload > kMaxWorkload) r.fail("has a workload text of " + std::to_string(workload) + " bytes");
  t.workload = r.bytes(workload, "workload");
  const auto bound = static_cast<std::uint32_t>(std::min<std::size_t>(ZSTD_compressBound(words_for(t.pages) * 8), UINT32_MAX));
  const auto populated = r.need<std::uint32_t>("populated pages");
  if (populated > bound) r.fail("has an absurd populated-pages size");
  t.populated = to_pages(r.bitmap(populated, t.pages, "populated pages"));
  for (std::uint32_t size; r.get(size);) {
    if (size > bound) r.fail("has a frame of absurd size (frame " + std::to_string(t.frames.size()) + ")");
    t.frames.push_back(to_pages(r.bitmap(size, t.pages, "frame")));
  }
  if (r.in.gcount() != 0) r.fail("ends inside a frame");
  return t;
}

namespace {

// "512M" as bytes (K, M, G binary); a plain number is bytes, or a count where one is meant.
double quantity(const std::string& key, const std::string& text) {
  double value = 0;
  const auto* end = text.data() + text.size();
  auto [rest, error] = std::from_chars(text.data(), end, value);
  double unit = 1;
  if (error == std::errc{} && rest + 1 == end) {
    switch (*rest) {
      case 'K': unit = 1024; break;
      case 'M': unit = 1024.0 * 1024; break;
      case 'G': unit = 1024.0 * 1024 * 1024; break;
      default: error = std::errc::invalid_argument;
    }
    ++rest;
  }
  if (error != std::errc{} || rest != end || value < 0)
    throw std::invalid_argument("workload " + key + "=" + text + " is not a quantity (like 100M)");
  return value * unit;
}

}  // namespace

DirtyTrace synthesize_trace(const std::string& workload, std::chrono::microseconds interval) {
  const auto colon = workload.find(':');
  const std::string kind = workload.substr(0, colon);
  if (kind != "random" && kind != "sweep" && kind != "hotcold")
    throw std::invalid_argument("workload '" + kind + "' is not random, sweep or hotcold");
  std::map<std::string, double> p{{"rate", 0}, {"wss", 0}, {"mem", 256.0 * 1024 * 1024}, {"seconds", 10}, {"hot", 0.1},
                                  {"populated", -1}, {"seed", 1}};
  std::string list = colon == std::string::npos ? "" : workload.substr(colon + 1);
  for (std::size_t start = 0; start < list.size();) {
    const auto end = std::min(list.find(',', start), list.size());
    const auto item = list.substr(start, end - start);
    const auto equals = item.find('=');
    const auto key = item.substr(0, equals);
    if (equals == std::string::npos || !p.contains(key)) throw std::invalid_argument("workload parameter '" + item + "' is unknown");
    p[key] = quantity(key, item.substr(equals + 1));
    start = end + 1;
  }
  const auto mem_pages = static_cast<std::uint64_t>(p["mem"]) / kPageSize;
  const auto wss_pages = std::min(mem_pages, static_cast<std::uint64_t>(p["wss"] > 0 ? p["wss"] : p["mem"]) / kPageSize);
  const auto populated_pages = std::min(mem_pages, static_cast<std::uint64_t>(p["populated"] >= 0 ? p["populated"] : p["mem"]) / kPageSize);
  if (mem_pages == 0 || wss_pages == 0 || p["seconds"] <= 0 || p["seconds"] > 3600 || p["hot"] <= 0 || p["hot"] >= 1)
    throw std::invalid_argument("workload '" + workload + "' needs mem and wss of a page or more, 0 < seconds <= 3600, 0 < hot < 1");

  DirtyTrace t;
  t.interval = interval;
  t.regions = {{0, mem_pages * kPageSize}};
  t.pages = mem_pages;
  t.workload = workload;
  for (std::uint64_t page = 0; page < populated_pages; ++page) t.populated.push_back(page);
  std::mt19937_64 random(static_cast<std::uint64_t>(p["seed"]));
  const auto hot_pages = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(p["hot"] * static_cast<double>(wss_pages)));
  const double pages_per_interval = p["rate"] / kPageSize * static_cast<double>(interval.count()) / 1e6;
  const auto intervals = static_cast<std::uint64_t>(p["seconds"] * 1e6 / static_cast<double>(interval.count()));
  double owed = 0;
  std::uint64_t cursor = 0;
  for (std::uint64_t i = 0; i < intervals; ++i) {
    owed += pages_per_interval;
    std::vector<std::uint64_t> frame;
    for (; owed >= 1; owed -= 1) {
      std::uint64_t page = 0;
      if (kind == "sweep") {
        page = cursor++ % wss_pages;
      } else if (kind == "random") {
        page = random() % wss_pages;
      } else {
        const bool hot = random() % 10 != 0 || hot_pages == wss_pages;
        page = hot ? random() % hot_pages : hot_pages + random() % (wss_pages - hot_pages);
      }
      frame.push_back(page);
    }
    std::sort(frame.begin(), frame.end());
    frame.erase(std::unique(frame.begin(), frame.end()), frame.end());
    t.frames.push_back(std::move(frame));
  }
  return t;
}

RecordingVm::RecordingVm(std::unique_ptr<MigratableVm> inner, const std::string& path, std::string workload,
                         std::chrono::microseconds interval)
    : inner_(std::move(inner)), regions_(inner_->memory_regions()), interval_(interval) {
  // Logging first, then the populated pages: a page the guest writes while they are being
  // looked up is then in the log if the lookup missed it. The other way round, a page
  // written between the two would be in neither.
  inner_->start_dirty_log();
  DirtyTrace header;
  header.interval = interval;
  header.workload = std::move(workload);
  std::uint64_t offset = 0;
  for (std::size_t r = 0; r < regions_.size(); ++r) {
    const auto pages = regions_[r].size / kPageSize;
    header.regions.push_back({regions_[r].guest_addr, regions_[r].size});
    std::vector<std::uint64_t> populated(words_for(pages));
    inner_->populated_pages(r, populated);
    for_each_page(populated, [&](std::uint64_t p) {
      if (p < pages) header.populated.push_back(offset + p);
    });
    offset += pages;
    scratch_.emplace_back(words_for(pages));
    engine_bitmaps_.emplace_back(words_for(pages));
  }
  header.pages = offset;
  interval_bitmap_.assign(words_for(offset), 0);
  writer_ = std::make_unique<DirtyTraceWriter>(path, header);
  thread_ = std::thread([this] { record(); });
}

RecordingVm::~RecordingVm() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  stop_.notify_all();
  thread_.join();
  try {
    inner_->stop_dirty_log();
  } catch (const std::exception&) {
    // The VM may be gone with its log; the trace is complete either way.
  }
}

std::uint64_t RecordingVm::frames_recorded() const {
  std::lock_guard lock(mutex_);
  return frames_;
}

std::uint64_t RecordingVm::bytes_written() const {
  std::lock_guard lock(mutex_);
  return writer_->bytes_written();
}

void RecordingVm::fetch_inner(std::size_t region) {
  std::uint64_t offset = 0;
  for (std::size_t r = 0; r < region; ++r) offset += regions_[r].size / kPageSize;
  const auto pages = regions_[region].size / kPageSize;
  inner_->fetch_dirty_log(region, scratch_[region]);
  for_each_page(scratch_[region], [&](std::uint64_t p) {
    if (p >= pages) return;
    const auto at = offset + p;
    interval_bitmap_[at / 64] |= 1ull << (at % 64);
    if (engine_logging_) engine_bitmaps_[region][p / 64] |= 1ull << (p % 64);
  });
}

void RecordingVm::fetch_inner() {
  for (std::size_t r = 0; r < regions_.size(); ++r) fetch_inner(r);
}

void RecordingVm::record() {
  std::unique_lock lock(mutex_);
  auto next = std::chrono::steady_clock::now() + interval_;
  while (!stop_.wait_until(lock, next, [this] { return stopping_; })) {
    fetch_inner();
    writer_->append(interval_bitmap_);
    std::fill(interval_bitmap_.begin(), interval_bitmap_.end(), 0);
    ++frames_;
    next += interval_;
  }
}

void RecordingVm::start_dirty_log() {
  std::lock_guard lock(mutex_);
  fetch_inner();  // what was written before this start is not the engine's
  engine_logging_ = true;
  for (auto& bitmap : engine_bitmaps_) std::fill(bitmap.begin(), bitmap.end(), 0);
}

void RecordingVm::stop_dirty_log() {
  std::lock_guard lock(mutex_);
  engine_logging_ = false;
}

void RecordingVm::fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) {
  std::lock_guard lock(mutex_);
  fetch_inner(region);
  auto& pending = engine_bitmaps_.at(region);
  std::copy(pending.begin(), pending.end(), bitmap.begin());
  std::fill(pending.begin(), pending.end(), 0);
}

}  // namespace mig::engine
