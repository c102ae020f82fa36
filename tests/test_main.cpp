#define CATCH_CONFIG_MAIN
#include "tests/support.h"

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <cstdlib>
#include <fstream>
#include <stdexcept>

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

std::vector<std::byte> file_contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<std::byte> bytes(static_cast<std::size_t>(in.tellg()));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!in) throw std::runtime_error("cannot read " + path);
  return bytes;
}

}  // namespace mig::test
