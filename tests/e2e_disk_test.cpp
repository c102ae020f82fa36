// Disks that move with the guest, through the tools as operators run them.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <thread>

#include "kvm/disk_image.h"
#include "tests/process.h"

using namespace mig;
using namespace mig::test;
using Catch::Matchers::Contains;

namespace {

std::uint64_t allocated(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

// A sparse image with `data` bytes of pattern written at `offset`.
void make_image(const kvm::DiskConfig& config, std::uint64_t size, std::uint64_t offset, std::uint64_t data) {
  std::remove(config.path.c_str());
  auto image = kvm::DiskImage::open({config.path, config.format, kvm::CacheMode::writeback}, kvm::DiskImage::Open::create, size);
  std::vector<std::byte> block(1 << 20);
  for (std::uint64_t at = 0; at < data; at += block.size()) {
    for (std::size_t i = 0; i < block.size(); i += 8) block[i] = static_cast<std::byte>((at + i) >> 12);
    image->write(offset + at, block);
  }
}

std::vector<std::string> with(std::vector<std::string> args, std::vector<std::string> more) {
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

}  // namespace

TEST_CASE("copy-storage-all moves a disk the guest writes - byte for byte, holes kept - and the guest's checks pass on both sides") {
  test::require_kvm();
  const auto source = temp_path("copy-src.img"), destination = temp_path("copy-dst.img"), qmp = temp_path("copy.qmp");
  const auto send_stats = temp_path("copy-send.json"), recv_stats = temp_path("copy-recv.json");
  make_image({source}, 256ull << 20, 32ull << 20, 16ull << 20);
  std::remove(destination.c_str());
  auto [receiver, endpoint] = start_receiver({"--disk", destination, "--paused", "--qmp", "unix:" + qmp,
                                              "--stats-json", recv_stats});
  Child sender(with(send_args(endpoint, send_stats, "mode=random rate=50 wss=16M disk=1 diskrate=20 diskspan=64M", "1"),
                    {"--disk", source, "--copy-storage-all"}));
  require_exit_code(sender, 0, receiver.get());
  // The destination holds the guest paused: its image is what arrived.
  CHECK(file_contents(destination) == file_contents(source));
  CHECK(allocated(destination) <= allocated(source) * 105 / 100);
  const auto s = read_json(send_stats);
  CHECK(s["disk"]["copied"] == true);
  CHECK(s["disk"]["verified"] == true);
  CHECK(s["disk"]["remaining"] == 0);
  CHECK(s["disk"]["processed"].get<std::uint64_t>() >= 16ull << 20);
  const auto cont = ctl(qmp, {"cont"});
  INFO(cont.out << cont.err);
  REQUIRE(cont.exit_code == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  REQUIRE(ctl(qmp, {"quit"}).exit_code == 0);
  REQUIRE(receiver->wait() == 0);
  // The guest's counters travel with it: these cover its time on both sides. At 20 MB/s it
  // checks about 300 blocks a second; the source ran it for about a second, the destination
  // for 1.5 s more.
  const auto r = read_json(recv_stats);
  CHECK(r["disk"]["verified"] == true);
  CHECK(r["local_guest_heartbeats"][0]["self_check_failures"] == 0);
  CHECK(r["local_guest_heartbeats"][0]["disk_checks"].get<std::uint64_t>() > 500);
  for (const auto& p : {source, destination, send_stats, recv_stats}) std::remove(p.c_str());
}

TEST_CASE("copy-storage-all moves a synthetic guest's disk byte for byte - no KVM needed - and its checks pass on both sides") {
  const auto source = temp_path("synthetic-src.img"), destination = temp_path("synthetic-dst.img"), qmp = temp_path("synthetic.qmp");
  const auto send_stats = temp_path("synthetic-copy-send.json"), recv_stats = temp_path("synthetic-copy-recv.json");
  make_image({source}, 64ull << 20, 16ull << 20, 8ull << 20);
  std::remove(destination.c_str());
  auto [receiver, endpoint] = start_receiver({"--synthetic-guest", "--disk", destination, "--paused", "--qmp", "unix:" + qmp,
                                              "--stats-json", recv_stats});
  Child sender({kTools + "mig-send", "--synthetic-guest", "20", "--mem", "64M", "--to", endpoint, "--after", "1",
                "--stats-json", send_stats, "--disk", source, "--copy-storage-all"});
  require_exit_code(sender, 0, receiver.get());
  CHECK(file_contents(destination) == file_contents(source));
  const auto s = read_json(send_stats);
  CHECK(s["disk"]["copied"] == true);
  CHECK(s["disk"]["verified"] == true);
  REQUIRE(ctl(qmp, {"cont"}).exit_code == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  REQUIRE(ctl(qmp, {"quit"}).exit_code == 0);
  REQUIRE(receiver->wait() == 0);
  // At 2 MB/s the guest checks about 30 blocks a second, for a second here and more there.
  const auto r = read_json(recv_stats);
  CHECK(r["local_guest_heartbeats"][0]["self_check_failures"] == 0);
  CHECK(r["local_guest_heartbeats"][0]["disk_checks"].get<std::uint64_t>() > 40);
  for (const auto& p : {source, destination, send_stats, recv_stats}) std::remove(p.c_str());
}

TEST_CASE("qcow2: a 4 GiB image holding 256 MiB moves only its data") {
  test::require_kvm();
  const auto source = temp_path("src.qcow2"), destination = temp_path("dst.qcow2");
  const auto send_stats = temp_path("qcow2-send.json");
  make_image({source, kvm::ImageFormat::qcow2}, 4ull << 30, 1ull << 30, 256ull << 20);
  std::remove(destination.c_str());
  auto [receiver, endpoint] = start_receiver({"--disk", destination + ",format=qcow2", "--run-for", "0.2"});
  Child sender(with(send_args(endpoint, send_stats, "mode=idle wss=8M"),
                    {"--disk", source + ",format=qcow2,cache=writeback", "--copy-storage-all"}));
  require_exit_codes(sender, 0, *receiver, 0);
  const auto s = read_json(send_stats);
  CHECK(s["disk"]["processed"] == 256ull << 20);
  CHECK(s["disk"]["size"] == 4ull << 30);
  CHECK(s["bytes_sent"].get<std::uint64_t>() < (256ull << 20) + (64ull << 20));
  CHECK(run_tool({"/usr/bin/qemu-img", "compare", "-q", source, destination}).exit_code == 0);
  CHECK(allocated(destination) < (256ull + 32) << 20);
  for (const auto& p : {source, destination, send_stats}) std::remove(p.c_str());
}

TEST_CASE("disk troubles are refused before the guest pauses - and the source keeps running") {
  test::require_kvm();
  const auto source = temp_path("bad-src.img"), small = temp_path("bad-small.img");
  make_image({source}, 64ull << 20, 0, 1 << 20);
  make_image({small}, 16ull << 20, 0, 0);
  SECTION("a destination image too small") {
    auto [receiver, endpoint] = start_receiver({"--disk", small});
    Child sender(with(send_args(endpoint, temp_path("bad.json"), "mode=idle wss=8M"),
                      {"--disk", source, "--copy-storage-all", "--run-for", "1"}));
    CHECK(sender.wait() == 2);
    CHECK_THAT(sender.stderr_text(), Contains("the disk needs 67108864"));
    CHECK_THAT(sender.stderr_text(), Contains("keeps running"));
  }
  SECTION("no image named for a disk to copy") {
    auto [receiver, endpoint] = start_receiver({});
    Child sender(with(send_args(endpoint, temp_path("bad.json"), "mode=idle wss=8M"),
                      {"--disk", source, "--copy-storage-all", "--run-for", "1"}));
    CHECK(sender.wait() == 2);
    CHECK_THAT(sender.stderr_text(), Contains("give mig-recv --disk PATH"));
  }
  SECTION("an image another process has locked") {
    auto held = kvm::DiskImage::open({source});
    const auto ran = run_tool({kTools + "mig-vm", "--kernel", kGuestImage, "--disk", source, "--run-for", "0.1"});
    CHECK(ran.exit_code == 1);
    CHECK_THAT(ran.err, Contains("locked by another process"));
  }
  SECTION("qcow2 without qemu-nbd") {
    const auto ran = run_tool({"/usr/bin/env", "PATH=/nonexistent", kTools + "mig-vm", "--kernel", kGuestImage, "--disk",
                               source + ",format=qcow2", "--run-for", "0.1"});
    CHECK(ran.exit_code == 1);
    CHECK_THAT(ran.err, Contains("needs qemu-nbd"));
  }
  std::remove(source.c_str());
  std::remove(small.c_str());
  std::remove(temp_path("bad.json").c_str());
}

TEST_CASE("a dry run finds what the destination would refuse of the disks - and makes and locks nothing") {
  const auto source = temp_path("dry-src.img"), small = temp_path("dry-small.img"), fresh = temp_path("dry-fresh.img");
  make_image({source}, 16ull << 20, 0, 1ull << 20);
  make_image({small}, 8ull << 20, 0, 0);
  std::remove(fresh.c_str());
  const auto check = [&](std::vector<std::string> receiver_disks, bool copy) {
    auto [receiver, endpoint] = start_receiver(with({"--synthetic-guest"}, receiver_disks));
    auto args = with({kTools + "mig-send", "--synthetic-guest", "10", "--mem", "16M", "--to", endpoint, "--after", "0", "--check",
                      "--disk", source},
                     copy ? std::vector<std::string>{"--copy-storage-all"} : std::vector<std::string>{});
    return run_tool(args);
  };
  struct Refusal {
    std::vector<std::string> receiver_disks;
    bool copy;
    std::string reason;
  };
  const Refusal refusals[] = {
      {{}, true, "give mig-recv --disk PATH for the image to write it into"},  // a copy with no image named
      {{"--disk", small}, true, "less than the source's disk"},
      {{"--disk", "/nonexistent-mig-folder/disk.img"}, true, "cannot be made here"},
      {{"--disk", small}, false, "here holds 8388608 bytes, the source's disk 16777216"},  // shared, another size
  };
  for (const auto& refusal : refusals) {
    const auto result = check(refusal.receiver_disks, refusal.copy);
    CHECK(result.exit_code == 2);
    CHECK_THAT(result.err, Contains(refusal.reason));
  }
  SECTION("an image to be made, and the source's own on shared storage, pass - and nothing is made") {
    const auto copied = check({"--disk", fresh}, true);
    INFO(copied.err);
    CHECK(copied.exit_code == 0);
    struct stat st {};
    CHECK(::stat(fresh.c_str(), &st) != 0);
    CHECK(check({}, false).exit_code == 0);
  }
  for (const auto& p : {source, small, fresh}) std::remove(p.c_str());
}
