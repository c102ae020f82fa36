#include "engine/postcopy_source.h"

#include <sys/socket.h>

#include "common/thread_name.h"
#include "engine/pages.h"

namespace mig::engine {

namespace {

// Post-copy pages always go whole: the destination dropped its copies, so there is nothing
// to skip against or to delta-encode from.
const PageSenderConfig kWholePages{false, false, 0, 0};

}  // namespace

PostcopySource::PostcopySource(std::span<const MemoryRegion> regions, Bitmaps unsent, PageHashes& hashes,
                               MigrationControl& control, std::uint32_t round, unsigned urgent_slot)
    : regions_(regions), needed_(unsent), unsent_(std::move(unsent)), requested_(empty_bitmaps(regions)), hashes_(hashes),
      control_(control), round_(round), urgent_slot_(urgent_slot), pages_needed_(count_pages(regions, unsent_)) {}

void PostcopySource::serve(transport::Stream& urgent) {
  stop_serving();
  urgent_ = &urgent;
  serving_error_.reset();
  stopping_ = false;
  serving_ = std::thread([this, &urgent] {
    name_this_thread("mig-postcopy-rq");
    try {
      answer_requests(urgent);
    } catch (const std::exception& e) {
      std::lock_guard lock(answering_);
      if (!stopping_) serving_error_ = e.what();  // else: the shutdown below ended it
    }
  });
}

std::optional<std::string> PostcopySource::stop_serving() {
  stopping_ = true;
  if (urgent_) ::shutdown(urgent_->fd(), SHUT_RDWR);
  if (serving_.joinable()) serving_.join();
  urgent_ = nullptr;
  std::lock_guard lock(answering_);
  return serving_error_;
}

// A request names a page the destination lacks and has not asked for yet. One it had
// already is answered anyway (it may have been in flight on the main channel); one asked for
// twice is a broken or hostile peer.
void PostcopySource::answer_requests(transport::Stream& urgent) {
  PageSender sender(regions_, urgent, hashes_, kWholePages, control_, urgent_slot_, 1);
  sender.set_unpaced();
  urgent.set_timeout(std::chrono::milliseconds(0));  // requests come when the guest faults, or never
  for (;;) {
    const auto request = urgent.receive<wire::PageRequest>();
    const auto target = find_page(regions_, request.guest_addr);
    if (!target) throw wire::ProtocolError("page request for guest address " + std::to_string(request.guest_addr) + " outside guest memory");
    const auto [region, page] = *target;
    if (!test_page(needed_[region], page))
      throw wire::ProtocolError("page at guest address " + std::to_string(request.guest_addr) +
                                " was valid at the destination at the switchover; it cannot be requested");
    if (set_page(requested_[region], page))
      throw wire::ProtocolError("page at guest address " + std::to_string(request.guest_addr) + " requested twice");
    ++requests_;
    push_from_ = page_key(region, page + 1);
    request_moved_push_ = true;
    std::lock_guard lock(answering_);
    if (claim_page(unsent_[region], page)) {
      sender.send_pages(round_, region, page, 1);
      ++pages_urgent_;
    }
  }
}

std::optional<std::pair<std::size_t, std::uint64_t>> PostcopySource::next_unsent(std::size_t region,
                                                                                  std::uint64_t page) const {
  // From (region, page) to the end of memory, then from the start: the first unsent page.
  for (std::size_t pass = 0; pass <= regions_.size(); ++pass) {
    const std::size_t r = (region + pass) % regions_.size();
    const std::uint64_t pages = regions_[r].size / kPageSize;
    const std::uint64_t from = pass == 0 ? std::min(page, pages) : 0;
    const std::uint64_t to = pass == regions_.size() ? std::min(page, pages) : pages;
    std::optional<std::uint64_t> found;
    for_each_run(unsent_[r], from, to, [&](const PageRun& run) {
      if (!found) found = run.first;
    });
    if (found) return std::pair{r, *found};
  }
  return std::nullopt;
}

void PostcopySource::push_rest(transport::Stream& bulk) {
  PageSender sender(regions_, bulk, hashes_, kWholePages, control_, 0, 1);
  std::size_t region = 0;
  std::uint64_t page = 0;
  while (const auto next = next_unsent(region, page)) {
    std::tie(region, page) = *next;
    // A run of consecutive unsent pages, claimed one by one: a request may take any of them.
    std::uint64_t first = page, count = 0;
    const std::uint64_t pages = regions_[region].size / kPageSize;
    while (page < pages && count < PageSender::kBatchPages && claim_page(unsent_[region], page)) ++page, ++count;
    if (count == 0) continue;  // a request took it between the look and the claim
    sender.send_pages(round_, region, first, count);
    pages_background_ += count;
    if (request_moved_push_.exchange(false)) {
      const std::uint64_t from = push_from_;
      region = key_region(from);
      page = key_page(from);
    }
  }
  // Every page is claimed; wait for an answer that may still be on its way out.
  std::lock_guard lock(answering_);
}

void PostcopySource::resend(const Bitmaps& missing) {
  for (std::size_t r = 0; r < regions_.size(); ++r)
    for (std::size_t w = 0; w < missing[r].size() && w < unsent_[r].size(); ++w) {
      std::atomic_ref(unsent_[r][w]).fetch_or(missing[r][w]);
      std::atomic_ref(requested_[r][w]).fetch_and(~missing[r][w]);
    }
}

}  // namespace mig::engine
