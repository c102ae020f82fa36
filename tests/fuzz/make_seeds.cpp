// Writes the seed corpora of the fuzz targets (checked in under tests/fuzz/corpus/): valid
// inputs of each kind, made with the same encoders a real peer uses, so the fuzzers start
// from the protocol rather than from nothing. Rerun it when the protocol changes:
//   make_seeds tests/fuzz/corpus
#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/compression.h"
#include "engine/delta.h"
#include "engine/dirty_trace.h"
#include "transport/protocol.h"
#include "vmm/kvm_vm.h"

using namespace mig;
namespace fs = std::filesystem;

namespace {

void write(const fs::path& path, std::span<const std::byte> bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void append_frame(std::vector<std::byte>& out, wire::MessageType type, std::span<const std::byte> payload) {
  wire::FrameHeader header;
  header.type = static_cast<std::uint16_t>(type);
  header.length = payload.size();
  const auto* h = reinterpret_cast<const std::byte*>(&header);
  out.insert(out.end(), h, h + sizeof header);
  out.insert(out.end(), payload.begin(), payload.end());
}
template <typename T>
void append(std::vector<std::byte>& out, const T& message) {
  append_frame(out, wire::type_of<T>(), wire::encode(message));
}

void frame_seeds(const fs::path& dir) {
  std::vector<std::byte> handshake;
  wire::Hello hello;
  hello.vcpus = 2;
  hello.capabilities = wire::kCapVerify | wire::kCapPostcopy;
  hello.host_boot_id = "boot";
  hello.regions = {{0, 1u << 20}, {1ull << 32, 1u << 20}};
  hello.channels = 2;
  hello.disks = {{1u << 20, 65536, wire::kDiskCopy, "/images/a.raw"}};
  hello.cpuid = {{0, 0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69}, {7, 0, 0, 1u << 16, 0, 0}};
  append(handshake, hello);
  append(handshake, wire::HelloAck{wire::kCapVerify, "boot", 2});
  append(handshake, wire::ChannelHello{7, 1});
  append(handshake, wire::PagePlan{{{0xff, 0}, {1}}});
  write(dir / "handshake", handshake);
  std::vector<std::byte> switchover;
  append(switchover, wire::RoundEnd{3});
  append(switchover, wire::RoundAck{3});
  append(switchover, wire::StateSection{"vcpu.0", 1, std::vector<std::byte>(64, std::byte{1})});
  append(switchover, wire::DiskData{0, 65536, std::vector<std::byte>(512, std::byte{2})});
  append(switchover, wire::DiskZero{0, 0, 65536});
  append(switchover, wire::Complete{1, 2, 3});
  append(switchover, wire::Ready{5});
  append(switchover, wire::Commit{});
  append(switchover, wire::Running{6, 7});
  append(switchover, wire::Handover{8, 1, 2, 3});
  append(switchover, wire::CommitRetry{7});
  write(dir / "switchover", switchover);
  std::vector<std::byte> postcopy;
  append(postcopy, wire::PostcopyStart{{{0b1010}, {}}});
  append(postcopy, wire::PageRequest{4096});
  append(postcopy, wire::PostcopyDone{9});
  append(postcopy, wire::PostcopyResume{7});
  append(postcopy, wire::PostcopyResumeAck{{{1}, {2}}});
  append(postcopy, wire::SharedMemory{2});
  append(postcopy, wire::Error{"no"});
  write(dir / "postcopy", postcopy);
}

// One batch: a descriptor per page, then the pages' bytes (compressed when asked).
std::vector<std::byte> batch(std::uint32_t round, const std::vector<wire::PageDescriptor>& pages,
                             const std::vector<std::byte>& bytes, bool zstd) {
  wire::BatchHeader header{round, static_cast<std::uint32_t>(pages.size()), 0, 0};
  std::vector<std::byte> body(bytes);
  if (zstd) {
    engine::BatchCompressor compressor(1);
    iovec part{const_cast<std::byte*>(bytes.data()), bytes.size()};
    const auto frame = compressor.compress({&part, 1}, bytes.size());
    body.assign(frame.begin(), frame.end());
    header.flags = wire::kBatchZstd;
    header.compressed_bytes = static_cast<std::uint32_t>(body.size());
  }
  std::vector<std::byte> payload(sizeof header + pages.size() * sizeof(wire::PageDescriptor));
  std::memcpy(payload.data(), &header, sizeof header);
  std::memcpy(payload.data() + sizeof header, pages.data(), pages.size() * sizeof(wire::PageDescriptor));
  payload.insert(payload.end(), body.begin(), body.end());
  return payload;
}

void page_batch_seeds(const fs::path& dir) {
  std::vector<std::byte> page(engine::kPageSize, std::byte{0x11}), changed(page);
  changed[100] = std::byte{0x22};
  std::vector<std::byte> delta;
  engine::encode_delta(page.data(), changed.data(), engine::kPageSize - 1, delta);
  std::vector<wire::PageDescriptor> round0 = {{0, engine::kPageSize, wire::PageEncoding::raw, {}},
                                              {4096, 0, wire::PageEncoding::zero, {}},
                                              {(1u << 20) + 8192, engine::kPageSize, wire::PageEncoding::raw, {}}};
  std::vector<std::byte> round0_bytes(page);
  round0_bytes.insert(round0_bytes.end(), page.begin(), page.end());
  std::vector<std::byte> stream;
  append_frame(stream, wire::MessageType::page_batch, batch(0, round0, round0_bytes, false));
  append(stream, wire::RoundEnd{0});
  std::vector<wire::PageDescriptor> round1 = {{0, static_cast<std::uint32_t>(delta.size()), wire::PageEncoding::delta, {}}};
  append_frame(stream, wire::MessageType::page_batch, batch(1, round1, delta, false));
  append(stream, wire::RoundEnd{1});
  write(dir / "rounds", stream);
  std::vector<std::byte> compressed;
  append_frame(compressed, wire::MessageType::page_batch, batch(0, round0, round0_bytes, true));
  write(dir / "zstd", compressed);
}

void state_seeds(const fs::path& dir) {
  kvm::MachineState state;
  state.vcpus.resize(2);
  state.probe.resize(2);
  state.disks.resize(1);
  static const char* const kNames[] = {"vm", "serial", "probe", "vcpu.0", "vcpu.1", "virtio-blk.0", "virtio-blk.1", "bogus"};
  std::vector<std::byte> input;
  for (const auto& section : vmm::encode_state(state)) {
    const auto name = std::find_if(std::begin(kNames), std::end(kNames), [&](const char* n) { return section.name == n; });
    input.push_back(static_cast<std::byte>(name - std::begin(kNames)));
    input.push_back(static_cast<std::byte>(section.version));
    input.push_back(static_cast<std::byte>(section.data.size() & 0xff));
    input.push_back(static_cast<std::byte>(section.data.size() >> 8));
    input.insert(input.end(), section.data.begin(), section.data.end());
  }
  write(dir / "two-vcpus-one-disk", input);
}

void qmp_seeds(const fs::path& dir) {
  const auto text = [&](const char* name, std::string_view json) {
    write(dir / name, std::as_bytes(std::span(json.data(), json.size())));
  };
  text("migrate", R"({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444", "parallel": 2, "compress": "zstd:3",)"
                  R"( "bandwidth": 1000000, "downtime-ms": 30, "postcopy-after": 2.5, "on-no-convergence": "postcopy"}})");
  text("parameters", R"({"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 10, "multifd-channels": 4,)"
                     R"( "multifd-compression": "zstd", "multifd-zstd-level": 3}}{"execute": "migrate", "arguments": {"uri": "unix:/x"}})");
}

// Small traces of each synthetic workload, one with two regions, and one that names vCPUs.
void trace_seeds(const fs::path& dir) {
  fs::create_directories(dir);
  for (const char* workload : {"random:rate=4M,wss=1M,mem=2M,seconds=0.1", "sweep:rate=4M,wss=1M,mem=2M,seconds=0.1",
                               "hotcold:rate=4M,wss=1M,mem=2M,seconds=0.1,populated=1M"}) {
    const std::string name(workload, std::strchr(workload, ':'));
    engine::write_trace((dir / name).string(), engine::synthesize_trace(workload));
  }
  auto two = engine::synthesize_trace("random:rate=1M,mem=1M,seconds=0.05");
  two.regions = {{0, 512 * 1024}, {1ull << 30, 512 * 1024}};
  engine::write_trace((dir / "two-regions").string(), two);
  auto named = engine::synthesize_trace("random:rate=4M,wss=1M,mem=2M,seconds=0.05");
  named.vcpus = 2;
  for (const auto& frame : named.frames) {
    auto& writers = named.writers.emplace_back();
    for (auto page : frame) writers.push_back(page % 3 == 2 ? engine::kNoVcpu : static_cast<std::uint16_t>(page % 3));
  }
  engine::write_trace((dir / "named-vcpus").string(), named);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds CORPUS_DIR\n");
    return 1;
  }
  const fs::path root = argv[1];
  frame_seeds(root / "frames");
  page_batch_seeds(root / "page_batch");
  state_seeds(root / "state");
  qmp_seeds(root / "qmp");
  trace_seeds(root / "trace");
  return 0;
}
