#define CATCH_CONFIG_MAIN
#include "tests/support.h"

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <cstdlib>

#include "kvm/system.h"

namespace mig::test {

void require_kvm() {
  try {
    kvm::KvmSystem::open();
  } catch (const std::exception& e) {
    fmt::print("SKIPPED: {}\n", e.what());
    std::exit(MIG_SKIP_CODE);
  }
}

}  // namespace mig::test
