#include "engine/dirty_trace.h"

#include <zstd.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <stdexcept>

#include "engine/pages.h"

namespace mig::engine {
namespace {

constexpr char kMagic[8] = {'M', 'I', 'G', 'T', 'R', 'A', 'C', 'E'};
constexpr std::uint32_t kVersion = 2;  // 1 named no vCPUs
// Bounds a reader trusts: a 1 TiB guest (larger ones are --guest-scale's business), 64
// regions, intervals of 100 us to 10 s, 256 vCPUs named, and frames of at most 256 MiB of
// bitmaps (so a 1 TiB guest's trace names at most 7 vCPUs).
constexpr std::uint64_t kMaxPages = (1ull << 40) / kPageSize;
constexpr std::uint32_t kMaxRegions = 64;
constexpr std::uint32_t kMaxWorkload = 4096;
constexpr std::uint32_t kMaxVcpus = 256;
constexpr std::uint64_t kMaxFrameBytes = 256ull << 20;

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

std::string compress(std::span<const std::uint64_t> bitmap) {
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
  // `count` compressed bitmaps of `pages` bits each, one after the other.
  std::vector<std::uint64_t> bitmaps(std::uint32_t compressed_size, std::uint64_t pages, std::uint64_t count, const char* what) {
    const auto packed = bytes(compressed_size, what);
    const std::uint64_t words = words_for(pages);
    const std::size_t size = words * count * sizeof(std::uint64_t);
    // The frame says how much it holds: anything but the bitmaps is refused before allocating.
    if (ZSTD_getFrameContentSize(packed.data(), packed.size()) != size) fail(std::string("has a corrupt ") + what);
    std::vector<std::uint64_t> out(words * count);
    const std::size_t n = ZSTD_decompress(out.data(), size, packed.data(), packed.size());
    if (ZSTD_isError(n) || n != size) fail(std::string("has a corrupt ") + what);
    // The last word of each may hold bits past the guest's last page: a trace that sets them
    // names pages the guest does not have.
    for (std::uint64_t b = 1; b <= count && pages % 64 != 0; ++b)
      if ((out[b * words - 1] >> (pages % 64)) != 0) fail(std::string("marks pages beyond the guest in its ") + what);
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
  put(static_cast<std::uint32_t>(t.vcpus));
  const auto populated = compress(to_bitmap(t.populated, t.pages));
  put(static_cast<std::uint32_t>(populated.size()));
  out.write(populated.data(), static_cast<std::streamsize>(populated.size()));
}

std::uint64_t pages_of(const std::vector<wire::Region>& regions) {
  std::uint64_t pages = 0;
  for (const auto& r : regions) pages += r.size / kPageSize;
  return pages;
}

// One interval's writes (page, writer) as the trace holds them: the pages ascending, each
// with the first of its writers in `writes`.
void add_frame(DirtyTrace& t, std::vector<std::pair<std::uint64_t, std::uint16_t>> writes) {
  std::stable_sort(writes.begin(), writes.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  writes.erase(std::unique(writes.begin(), writes.end(), [](const auto& a, const auto& b) { return a.first == b.first; }),
               writes.end());
  auto& pages = t.frames.emplace_back();
  for (const auto& [page, writer] : writes) pages.push_back(page);
  if (t.vcpus == 0) return;
  auto& writers = t.writers.emplace_back();
  for (const auto& [page, writer] : writes) writers.push_back(writer);
}

// A frame's bitmaps (the unnamed writes', then each vCPU's) into the trace; a page in two
// bitmaps goes to the vCPU.
void add_frame_bitmaps(DirtyTrace& t, std::span<const std::uint64_t> bitmaps) {
  const std::uint64_t words = words_for(t.pages), count = bitmaps.size() / words;
  std::vector<std::pair<std::uint64_t, std::uint16_t>> writes;
  for (std::uint64_t i = 1; i <= count; ++i) {
    const std::uint64_t b = i % count;  // the vCPUs' first, the unnamed last
    const auto writer = b == 0 ? kNoVcpu : static_cast<std::uint16_t>(b - 1);
    for_each_page(bitmaps.subspan(b * words, words), [&](std::uint64_t p) { writes.emplace_back(p, writer); });
  }
  add_frame(t, std::move(writes));
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

void DirtyTraceWriter::append(std::span<const std::uint64_t> bitmaps) {
  const auto packed = compress(bitmaps);
  const auto size = static_cast<std::uint32_t>(packed.size());
  impl_->out.write(reinterpret_cast<const char*>(&size), sizeof size);
  impl_->out.write(packed.data(), static_cast<std::streamsize>(packed.size()));
  impl_->out.flush();  // a recording cut short keeps every whole frame
  bytes_ += sizeof size + packed.size();
}

void write_trace(const std::string& path, const DirtyTrace& trace) {
  DirtyTraceWriter writer(path, trace);
  const std::uint64_t words = words_for(trace.pages);
  std::vector<std::uint64_t> bitmaps(words * (1 + trace.vcpus));
  for (std::size_t f = 0; f < trace.frames.size(); ++f) {
    std::fill(bitmaps.begin(), bitmaps.end(), 0);
    for (std::size_t i = 0; i < trace.frames[f].size(); ++i) {
      const std::uint64_t page = trace.frames[f][i], writer_vcpu = trace.writer(f, i);
      const std::uint64_t bitmap = writer_vcpu == kNoVcpu ? 0 : writer_vcpu + 1;
      bitmaps[bitmap * words + page / 64] |= 1ull << (page % 64);
    }
    writer.append(bitmaps);
  }
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
  const auto version = r.need<std::uint32_t>("version");
  if (version != 1 && version != kVersion)
    r.fail("has version " + std::to_string(version) + "; this mig reads versions 1 to " + std::to_string(kVersion));
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
  if (version >= 2) t.vcpus = r.need<std::uint32_t>("vCPU count");
  const std::uint64_t bitmap_bytes = words_for(t.pages) * 8;
  if (t.vcpus > kMaxVcpus || (1 + t.vcpus) * bitmap_bytes > kMaxFrameBytes)
    r.fail("names " + std::to_string(t.vcpus) + " vCPUs, more than a reader takes for its guest");
  auto bound = [](std::uint64_t bytes) { return std::min<std::uint64_t>(ZSTD_compressBound(bytes), UINT32_MAX); };
  const auto populated = r.need<std::uint32_t>("populated pages");
  if (populated > bound(bitmap_bytes)) r.fail("has an absurd populated-pages size");
  t.populated = to_pages(r.bitmaps(populated, t.pages, 1, "populated pages"));
  for (std::uint32_t size; r.get(size);) {
    if (size > bound((1 + t.vcpus) * bitmap_bytes)) r.fail("has a frame of absurd size (frame " + std::to_string(t.frames.size()) + ")");
    add_frame_bitmaps(t, r.bitmaps(size, t.pages, 1 + t.vcpus, "frame"));
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

// The words after "KIND:" as numbers, over their defaults.
std::map<std::string, double> workload_parameters(const std::string& list) {
  std::map<std::string, double> p{{"rate", 0}, {"wss", 0}, {"mem", 256.0 * 1024 * 1024}, {"seconds", 10}, {"hot", 0.1},
                                  {"populated", -1}, {"seed", 1}, {"vcpus", 0}};
  for (std::size_t start = 0; start < list.size();) {
    const auto end = std::min(list.find(',', start), list.size());
    const auto item = list.substr(start, end - start);
    const auto equals = item.find('=');
    const auto key = item.substr(0, equals);
    if (equals == std::string::npos || !p.contains(key)) throw std::invalid_argument("workload parameter '" + item + "' is unknown");
    p[key] = quantity(key, item.substr(equals + 1));
    start = end + 1;
  }
  return p;
}

}  // namespace

DirtyTrace synthesize_trace(const std::string& workload, std::chrono::microseconds interval) {
  const auto colon = workload.find(':');
  const std::string kind = workload.substr(0, colon);
  if (kind != "random" && kind != "sweep" && kind != "hotcold")
    throw std::invalid_argument("workload '" + kind + "' is not random, sweep or hotcold");
  auto p = workload_parameters(colon == std::string::npos ? "" : workload.substr(colon + 1));
  const auto mem_pages = static_cast<std::uint64_t>(p["mem"]) / kPageSize;
  const auto wss_pages = std::min(mem_pages, static_cast<std::uint64_t>(p["wss"] > 0 ? p["wss"] : p["mem"]) / kPageSize);
  const auto populated_pages = std::min(mem_pages, static_cast<std::uint64_t>(p["populated"] >= 0 ? p["populated"] : p["mem"]) / kPageSize);
  if (mem_pages == 0 || wss_pages == 0 || p["seconds"] <= 0 || p["seconds"] > 3600 || p["hot"] <= 0 || p["hot"] >= 1 ||
      p["vcpus"] > 256 || p["vcpus"] != std::floor(p["vcpus"]))
    throw std::invalid_argument("workload '" + workload +
                                "' needs mem and wss of a page or more, 0 < seconds <= 3600, 0 < hot < 1, vcpus a whole number up to 256");

  DirtyTrace t;
  t.interval = interval;
  t.regions = {{0, mem_pages * kPageSize}};
  t.pages = mem_pages;
  t.workload = workload;
  t.vcpus = static_cast<unsigned>(p["vcpus"]);
  for (std::uint64_t page = 0; page < populated_pages; ++page) t.populated.push_back(page);
  std::mt19937_64 random(static_cast<std::uint64_t>(p["seed"]));
  const auto hot_pages = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(p["hot"] * static_cast<double>(wss_pages)));
  const double pages_per_interval = p["rate"] / kPageSize * static_cast<double>(interval.count()) / 1e6;
  const auto intervals = static_cast<std::uint64_t>(p["seconds"] * 1e6 / static_cast<double>(interval.count()));
  double owed = 0;
  std::uint64_t cursor = 0, writes = 0;
  for (std::uint64_t i = 0; i < intervals; ++i) {
    owed += pages_per_interval;
    std::vector<std::pair<std::uint64_t, std::uint16_t>> frame;  // page, writer
    for (; owed >= 1; owed -= 1, ++writes) {
      std::uint64_t page = 0;
      if (kind == "sweep") {
        page = cursor++ % wss_pages;
      } else if (kind == "random") {
        page = random() % wss_pages;
      } else {
        const bool hot = random() % 10 != 0 || hot_pages == wss_pages;
        page = hot ? random() % hot_pages : hot_pages + random() % (wss_pages - hot_pages);
      }
      // Named vCPUs take the writes in turn; a page written twice in an interval keeps its
      // first writer, as a ring names it once.
      frame.emplace_back(page, t.vcpus > 0 ? static_cast<std::uint16_t>(writes % t.vcpus) : kNoVcpu);
    }
    add_frame(t, std::move(frame));
  }
  return t;
}

RecordingVm::RecordingVm(std::unique_ptr<MigratableVm> inner, const std::string& path, std::string workload,
                         std::chrono::microseconds interval)
    : inner_(std::move(inner)),
      regions_(inner_->memory_regions()),
      interval_(interval),
      named_vcpus_(inner_->dirty_log_names_vcpus() ? inner_->vcpu_count() : 0) {
  // Logging first, then the populated pages: a page the guest writes while they are being
  // looked up is then in the log if the lookup missed it. The other way round, a page
  // written between the two would be in neither.
  inner_->start_dirty_log();
  DirtyTrace header;
  header.interval = interval;
  header.workload = std::move(workload);
  header.vcpus = named_vcpus_;
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
    scratch_.emplace_back(words_for(pages) * (1 + named_vcpus_));
    engine_bitmaps_.emplace_back(words_for(pages));
  }
  header.pages = offset;
  interval_bitmaps_.assign(words_for(offset) * (1 + named_vcpus_), 0);
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

// The inner log of one region: scratch_[region] holds its bitmaps (the unnamed writes',
// then each named vCPU's), which go into this interval's bitmaps of the whole guest, and
// all together into the engine's.
void RecordingVm::fetch_inner(std::size_t region) {
  std::uint64_t offset = 0;
  for (std::size_t r = 0; r < region; ++r) offset += regions_[r].size / kPageSize;
  const auto pages = regions_[region].size / kPageSize, words = words_for(pages);
  const std::span<std::uint64_t> scratch(scratch_[region]);
  if (named_vcpus_ == 0) {
    inner_->fetch_dirty_log(region, scratch);
  } else {
    std::vector<std::span<std::uint64_t>> vcpu_bitmaps;
    for (unsigned v = 0; v < named_vcpus_; ++v) vcpu_bitmaps.push_back(scratch.subspan((1 + v) * words, words));
    inner_->fetch_dirty_log_by_vcpu(region, scratch.first(words), vcpu_bitmaps);
  }
  const std::uint64_t guest_words = interval_bitmaps_.size() / (1 + named_vcpus_);
  for (unsigned b = 0; b <= named_vcpus_; ++b) {
    for_each_page(scratch.subspan(b * words, words), [&](std::uint64_t p) {
      if (p >= pages) return;
      const auto at = offset + p;
      interval_bitmaps_[b * guest_words + at / 64] |= 1ull << (at % 64);
      if (engine_logging_) engine_bitmaps_[region][p / 64] |= 1ull << (p % 64);
    });
  }
}

void RecordingVm::fetch_inner() {
  for (std::size_t r = 0; r < regions_.size(); ++r) fetch_inner(r);
}

void RecordingVm::record() {
  std::unique_lock lock(mutex_);
  auto next = std::chrono::steady_clock::now() + interval_;
  while (!stop_.wait_until(lock, next, [this] { return stopping_; })) {
    fetch_inner();
    writer_->append(interval_bitmaps_);
    std::fill(interval_bitmaps_.begin(), interval_bitmaps_.end(), 0);
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

void RecordingVm::fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) {
  std::lock_guard lock(mutex_);
  fetch_inner(region);
  const auto& pending = engine_bitmaps_.at(region);
  std::copy(pending.begin(), pending.end(), bitmap.begin());
}

void RecordingVm::rearm_dirty_pages(std::size_t region, std::uint64_t first_page, std::span<const std::uint64_t> pages) {
  std::lock_guard lock(mutex_);
  clear_pages(engine_bitmaps_.at(region), first_page, pages);
}

}  // namespace mig::engine
