// Uses a little of each layer, without /dev/kvm: an endpoint, the convergence rule, and the
// PC memory layout of mig's VMM. Exits non-zero when any answer is wrong.
#include <mig/engine/convergence.h>
#include <mig/engine/source_migration.h>
#include <mig/transport/endpoint.h>
#include <mig/vmm/kvm_vm.h>

#include <cstdio>

int main() {
  const auto endpoint = mig::transport::Endpoint::parse("tcp:127.0.0.1:4444");
  mig::engine::RoundStats round;
  round.pages_sent = 1000;
  round.bytes_sent = 1000 * 4096;
  round.duration_s = 1;
  round.dirty_pages = 1;
  round.bandwidth_Bps = 4096000;
  mig::engine::ConvergencePolicy policy;
  const auto decision = mig::engine::decide({&round, 1}, policy);
  const auto shape = mig::vmm::KvmVm::pc_shape(256ull << 20, 2);
  std::printf("%s, %s, %zu region(s)\n", endpoint.to_string().c_str(), mig::engine::to_string(decision).c_str(),
              shape.regions.size());
  return endpoint.port == 4444 && shape.vcpus == 2 && !shape.regions.empty() ? 0 : 1;
}
