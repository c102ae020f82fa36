// The verification digest: a function of the table's final entries alone.
#include <catch2/catch.hpp>

#include "engine/page_hashes.h"

using namespace mig::engine;

namespace {
// Two regions, as in a guest with memory above the PCI hole; never dereferenced.
const std::vector<MemoryRegion> kRegions = {{0, 8 * kPageSize, nullptr}, {1ull << 32, 4 * kPageSize, nullptr}};
}  // namespace

TEST_CASE("page hash digest depends on the entries - not on the order or channel that set them") {
  PageHashes sender(kRegions, 2), receiver(kRegions, 1);
  CHECK(sender.digest() == receiver.digest());

  sender.set(0, 0, 3, 111);
  sender.set(1, 1, 2, 222);
  sender.set(0, 0, 3, 333);  // a page resent: only its last version counts
  receiver.set(0, 1, 2, 222);
  CHECK(sender.digest() != receiver.digest());
  receiver.set(0, 0, 3, 333);
  CHECK(sender.digest() == receiver.digest());

  receiver.set(0, 0, 5, 1);  // one entry differs
  CHECK(sender.digest() != receiver.digest());
  receiver.set(0, 0, 5, zero_page_hash());  // back to the zero page: equal again
  CHECK(sender.digest() == receiver.digest());
}

TEST_CASE("page hash digest tells pages apart: swapped contents do not cancel out") {
  PageHashes a(kRegions, 1), b(kRegions, 1);
  a.set(0, 0, 1, 7);
  a.set(0, 0, 2, 9);
  b.set(0, 0, 1, 9);
  b.set(0, 0, 2, 7);
  CHECK(a.digest() != b.digest());
  // The same page number in another region is another page.
  PageHashes c(kRegions, 1);
  c.set(0, 1, 1, 7);
  c.set(0, 0, 2, 9);
  CHECK(a.digest() != c.digest());
}

TEST_CASE("an entry from running memory stays uncertain until a certain send - and the digest is the same either way") {
  PageHashes sender(kRegions, 2), receiver(kRegions, 1);
  CHECK(sender.certain(0, 3));  // never sent: both sides hold the zero page
  sender.set(0, 0, 3, 111, false);
  sender.set(1, 0, 4, 222);
  CHECK_FALSE(sender.certain(0, 3));
  CHECK(sender.certain(0, 4));  // a neighbour in the same word, set by another channel
  receiver.set(0, 0, 3, 111);
  receiver.set(0, 0, 4, 222);
  CHECK(sender.digest() == receiver.digest());
  sender.set(0, 0, 3, 111);  // resent as a copy
  CHECK(sender.certain(0, 3));
  CHECK(sender.digest() == receiver.digest());
}
