#include "engine/postcopy_destination.h"

#include <sys/socket.h>

#include "common/thread_name.h"
#include "engine/pages.h"

namespace mig::engine {

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

std::string address_of(const MemoryRegion& region, std::uint64_t page) {
  return "guest address " + std::to_string(region.guest_addr + page * kPageSize);
}

}  // namespace

PostcopyDestination::PostcopyDestination(MigratableVm& vm, std::vector<MemoryRegion> regions, PageHashes& hashes,
                                         Bitmaps needed)
    : vm_(vm), regions_(std::move(regions)), hashes_(hashes), needed_(std::move(needed)),
      installed_(empty_bitmaps(regions_)) {
  if (needed_.size() != regions_.size()) throw wire::ProtocolError("PostcopyStart does not match the memory layout");
  for (std::size_t r = 0; r < regions_.size(); ++r) {
    const std::uint64_t pages = regions_[r].size / kPageSize;
    if (needed_[r].size() != bitmap_words(pages)) throw wire::ProtocolError("PostcopyStart bitmap does not match its region");
    if (pages % 64) needed_[r].back() &= (std::uint64_t{1} << (pages % 64)) - 1;  // no pages past the end
    pages_needed_ += count_pages(needed_[r], pages);
  }
  if (const auto why = vm_.postcopy_unsupported(); !why.empty()) throw std::runtime_error("post-copy: " + why);
  vcpu_blocktime_ms_.resize(vm_.vcpu_threads().size());
  // Faults are served from here on: whatever touches guest memory from now (the VMM restoring
  // state, then the vCPUs) may meet a missing page.
  fault_thread_ = std::thread([this] { handle_faults(); });
  try {
    // Trap first, then drop: a page dropped before it traps would read as zero meanwhile.
    for (const auto& region : regions_) userfault_.register_range(region.host, region.size);
    for (std::size_t r = 0; r < regions_.size(); ++r)
      for_each_run(needed_[r], 0, regions_[r].size / kPageSize,
                   [&](const PageRun& run) { vm_.discard_pages(r, run.first, run.count); });
  } catch (...) {
    stopping_ = true;
    fault_thread_.join();
    throw;
  }
}

PostcopyDestination::~PostcopyDestination() {
  disconnect();
  stopping_ = true;
  if (fault_thread_.joinable()) fault_thread_.join();
  // Closing the userfaultfd (with the member) releases anything still waiting: the VM is
  // being thrown away, or every page is installed.
}

void PostcopyDestination::handle_faults() {
  name_this_thread("mig-postcopy-uf");
  while (!stopping_) {
    try {
      for (const auto& fault : userfault_.wait_faults(50)) on_fault(fault);
    } catch (const std::exception& e) {
      std::lock_guard lock(mutex_);
      if (!link_error_) link_error_ = std::string("userfaultfd: ") + e.what();
    }
  }
}

void PostcopyDestination::on_fault(const Fault& fault) {
  for (std::size_t r = 0; r < regions_.size(); ++r) {
    const auto base = reinterpret_cast<std::uint64_t>(regions_[r].host);
    if (fault.address < base || fault.address - base >= regions_[r].size) continue;
    const std::uint64_t page = (fault.address - base) / kPageSize;
    if (!test_page(needed_[r], page)) {
      // Never sent, so zero at the source too: filled here, never asked for.
      if (userfault_.zero(regions_[r].host + page * kPageSize, kPageSize)) {
        std::lock_guard lock(mutex_);
        ++zero_filled_;
      }
      return;
    }
    std::lock_guard lock(mutex_);
    if (test_page(installed_[r], page)) return;  // installed since; the install woke it
    auto [entry, first] = waiting_.try_emplace(page_key(r, page));
    const auto now = Clock::now();
    if (first) entry->second.since = now;
    entry->second.threads.emplace_back(fault.thread, now);
    if (first) request(r, page);
    return;
  }
}

void PostcopyDestination::request(std::size_t region, std::uint64_t page) {
  if (!urgent_) return;  // asked for at the next connect()
  try {
    urgent_->send(wire::PageRequest{regions_[region].guest_addr + page * kPageSize});
    ++requests_;
  } catch (const std::exception& e) {
    if (!link_error_) link_error_ = e.what();
    urgent_ = nullptr;
  }
}

void PostcopyDestination::connect(transport::Stream& urgent, unsigned urgent_slot) {
  disconnect();
  urgent.set_timeout(std::chrono::milliseconds(0));  // answers come when asked for, or never
  {
    std::lock_guard lock(mutex_);
    link_error_.reset();
    urgent_ = &urgent;
    for (const auto& [key, entry] : waiting_) request(key_region(key), key_page(key));
  }
  answer_thread_ = std::thread([this, &urgent, urgent_slot] { receive_answers(urgent, urgent_slot); });
}

void PostcopyDestination::receive_answers(transport::Stream& urgent, unsigned urgent_slot) {
  name_this_thread("mig-postcopy-rx");
  PageReceiver answers(regions_, urgent, hashes_, urgent_slot, 1);
  answers.install_through(*this);
  try {
    for (;;) {
      const auto header = urgent.read_header();
      if (!answers.handle(header))
        throw wire::ProtocolError(std::string("unexpected ") + wire::to_string(static_cast<wire::MessageType>(header.type)) +
                                  " on the post-copy channel");
    }
  } catch (const std::exception& e) {
    std::lock_guard lock(mutex_);
    if (urgent_ == &urgent && !link_error_) link_error_ = std::string("post-copy channel: ") + e.what();
    urgent_ = nullptr;
  }
}

std::optional<std::string> PostcopyDestination::disconnect() {
  transport::Stream* urgent = nullptr;
  {
    std::lock_guard lock(mutex_);
    std::swap(urgent, urgent_);
  }
  if (urgent) ::shutdown(urgent->fd(), SHUT_RDWR);
  if (answer_thread_.joinable()) answer_thread_.join();
  std::lock_guard lock(mutex_);
  return link_error_;
}

void PostcopyDestination::install(unsigned hash_slot, std::size_t region, std::uint64_t page, const std::byte* data) {
  if (!test_page(needed_[region], page))
    throw wire::ProtocolError("page at " + address_of(regions_[region], page) + " was valid here at the switchover; it must not come again");
  std::byte* host = regions_[region].host + page * kPageSize;
  if (!(data ? userfault_.copy(host, data, kPageSize) : userfault_.zero(host, kPageSize)))
    throw wire::ProtocolError("page at " + address_of(regions_[region], page) + " arrived twice");
  hashes_.set(hash_slot, region, page, data ? hash_page(data) : zero_page_hash());
  std::lock_guard lock(mutex_);
  set_page(installed_[region], page);
  if (++installed_count_ == pages_needed_) all_installed_.notify_all();
  const auto waited = waiting_.find(page_key(region, page));
  if (waited == waiting_.end()) return;
  latencies_ms_.push_back(ms_since(waited->second.since));
  const auto vcpu_threads = vm_.vcpu_threads();  // they start with the guest, after the switch
  for (const auto& [thread, since] : waited->second.threads) {
    const double ms = ms_since(since);
    blocktime_ms_ += ms;
    for (std::size_t v = 0; v < vcpu_threads.size() && v < vcpu_blocktime_ms_.size(); ++v)
      if (vcpu_threads[v] == thread) vcpu_blocktime_ms_[v] += ms;
  }
  waiting_.erase(waited);
}

bool PostcopyDestination::wait_installed(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  return all_installed_.wait_for(lock, timeout, [&] { return installed_count_ == pages_needed_; });
}

Bitmaps PostcopyDestination::missing() const {
  Bitmaps out = needed_;
  std::lock_guard lock(mutex_);
  for (std::size_t r = 0; r < out.size(); ++r)
    for (std::size_t w = 0; w < out[r].size(); ++w) out[r][w] &= ~installed_[r][w];
  return out;
}

void PostcopyDestination::finish() {
  disconnect();
  stopping_ = true;
  if (fault_thread_.joinable()) fault_thread_.join();
  for (const auto& region : regions_) userfault_.unregister_range(region.host, region.size);
}

PostcopyStats PostcopyDestination::stats() const {
  std::lock_guard lock(mutex_);
  PostcopyStats s;
  s.pages_needed = pages_needed_;
  s.requests = requests_;
  s.pages_zero_filled = zero_filled_;
  s.fault_latency = summarize_latencies(latencies_ms_);
  s.blocktime_ms = blocktime_ms_;
  s.vcpu_blocktime_ms = vcpu_blocktime_ms_;
  return s;
}

}  // namespace mig::engine
