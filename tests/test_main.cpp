#define CATCH_CONFIG_MAIN
#include "tests/support.h"

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <thread>

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

bool wait_until(const std::function<bool()>& done, std::chrono::milliseconds limit) {
  const auto give_up = std::chrono::steady_clock::now() + limit;
  for (; !done(); std::this_thread::sleep_for(std::chrono::milliseconds(5)))
    if (std::chrono::steady_clock::now() > give_up) return false;
  return true;
}

bool wait_for_vcpus(const kvm::Probe& probe, const std::function<bool(std::size_t, const kvm::HeartbeatState&)>& done) {
  return wait_until(
      [&] {
        const auto now = probe.snapshot();
        for (std::size_t vcpu = 0; vcpu < now.size(); ++vcpu)
          if (!done(vcpu, now[vcpu])) return false;
        return true;
      },
      std::chrono::seconds(30));
}

}  // namespace mig::test
