#include "engine/vm.h"

#include <algorithm>

namespace mig::engine {

void MigratableVm::populated_pages(std::size_t, std::span<std::uint64_t> bitmap) {
  std::fill(bitmap.begin(), bitmap.end(), ~std::uint64_t{0});
}

void MigratableVm::prepare_pages(std::size_t, std::uint64_t, std::uint64_t) {}

std::optional<GuestHandover> MigratableVm::wait_guest_handover(std::chrono::milliseconds) { return std::nullopt; }

}  // namespace mig::engine
