// The virtio-blk device and its images against a real guest: the guest's own block checks,
// device state round trips with requests in flight, images' extents, holes and locks.
#include <catch2/catch.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "guest/probe.h"
#include "tests/support.h"

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace {

std::string image_path(const std::string& name) { return "/tmp/mig-kvm-test-" + std::to_string(::getpid()) + "-" + name; }

std::string sparse_image(const std::string& name, std::uint64_t size) {
  const auto path = image_path(name);
  std::remove(path.c_str());
  kvm::DiskImage::open({path}, kvm::DiskImage::Open::create, size);
  return path;
}

std::unique_ptr<kvm::Machine> machine_with_disk(const std::string& path, kvm::DiskImage::Open mode = kvm::DiskImage::Open::existing) {
  auto machine = kvm::Machine::create(test::small_config(64ull << 20));
  machine->attach_disk(kvm::DiskImage::open({path}, mode));
  return machine;
}

kvm::HeartbeatState probe_of(const kvm::Machine& machine) { return machine.probe().snapshot().at(0); }

void require_checks_pass(const kvm::Machine& machine) {
  INFO(machine.failure().value_or(""));
  REQUIRE_FALSE(machine.failure());
  const auto hb = probe_of(machine);
  INFO("self-check failure code " << hb.last_failure_code);
  CHECK(hb.check_failures == 0);
}

}  // namespace

TEST_CASE("the guest drives its virtio-blk disk - every block it reads back is the one it wrote") {
  test::require_kvm();
  const auto path = sparse_image("drive.img", 64ull << 20);
  auto config = test::small_config(64ull << 20);
  auto machine = kvm::Machine::create(config);
  machine->attach_disk(kvm::DiskImage::open({path}));
  machine->boot(kvm::read_multiboot_file(test::kGuestImage), "mode=spin disk=1 diskrate=40 diskspan=16M");
  machine->start();
  REQUIRE(machine->probe().wait_ready(30s));
  std::this_thread::sleep_for(500ms);
  // 40 MB/s is 610 writes a second, each read back: 50 take 80 ms on hardware.
  CHECK(test::wait_for_vcpus(machine->probe(), [](std::size_t, const kvm::HeartbeatState& now) { return now.disk_checks > 50; }));
  machine->pause();
  require_checks_pass(*machine);
  // Written blocks are data; the rest of the image stays a hole.
  const auto extents = machine->disk(0).image().data_extents();
  std::uint64_t data = 0;
  for (const auto& e : extents) data += e.length;
  CHECK(data > 0);
  CHECK(data <= 16ull << 20);
  machine.reset();
  std::remove(path.c_str());
}

TEST_CASE("virtio-blk state round trips with requests in flight - and with a quiet disk") {
  test::require_kvm();
  // A busy disk: a request is in flight most of the time, so pauses catch some; a quiet one
  // (the driver is set up, but writes nothing) has none.
  for (const char* rate : {"200", "0"}) {
    const auto path = sparse_image("roundtrip.img", 32ull << 20);
    auto source = machine_with_disk(path);
    source->boot(kvm::read_multiboot_file(test::kGuestImage), std::string("mode=spin disk=1 diskspan=8M diskrate=") + rate);
    source->start();
    REQUIRE(source->probe().wait_ready(30s));
    std::uint64_t drained = 0;
    // Hand the guest back and forth between two machines on the one image.
    for (int hop = 0; hop < 6; ++hop) {
      std::this_thread::sleep_for(60ms);
      source->pause();
      drained = source->disk(0).drained_at_pause();
      require_checks_pass(*source);
      const auto saved = source->save_state();
      REQUIRE(saved.disks.size() == 1);
      CHECK(saved.disks[0].status == 7);  // acknowledged, driver, driver ready
      auto destination = machine_with_disk(path, kvm::DiskImage::Open::existing_unlocked);
      std::memcpy(destination->memory().regions()[0].host(), source->memory().regions()[0].host(),
                  source->memory().regions()[0].layout.size);
      source->disk(0).image().release();
      destination->disk(0).image().reacquire();
      destination->restore_state(saved);
      CHECK(destination->save_state().disks[0] == saved.disks[0]);
      source = std::move(destination);  // the old machine goes: the guest runs in one place
      source->resume();
    }
    std::this_thread::sleep_for(100ms);
    source->pause();
    require_checks_pass(*source);
    INFO("diskrate " << rate << ", requests drained at the last pause " << drained);
    if (std::string(rate) != "0") CHECK(probe_of(*source).disk_checks > 20);
    else CHECK(probe_of(*source).disk_checks == 0);
    source.reset();
    std::remove(path.c_str());
  }
}

TEST_CASE("raw images: data extents without reading - holes punched - one writer at a time") {
  const auto path = sparse_image("raw.img", 8ull << 20);
  auto image = kvm::DiskImage::open({path, kvm::ImageFormat::raw, kvm::CacheMode::writeback});
  std::vector<std::byte> block(1 << 20, std::byte{0x5a});
  image->write(3ull << 20, block);
  image->write(6ull << 20, std::span(block).first(4096));
  const auto extents = image->data_extents();
  REQUIRE(extents.size() == 2);
  CHECK(extents[0] == kvm::Extent{3ull << 20, 1ull << 20});
  CHECK(extents[1].offset == 6ull << 20);
  image->write_zeroes(3ull << 20, 1ull << 20);
  CHECK(image->data_extents().size() == 1);
  std::vector<std::byte> back(4096);
  image->read(3ull << 20, back);
  CHECK(back == std::vector<std::byte>(4096));

  CHECK_THROWS_WITH(kvm::DiskImage::open({path}), Contains("locked by another process"));
  CHECK(kvm::DiskImage::locked_elsewhere(path));
  image->release();
  CHECK_FALSE(kvm::DiskImage::locked_elsewhere(path));
  {
    auto other = kvm::DiskImage::open({path});
    CHECK_THROWS_WITH(image->reacquire(), Contains("locked by another process"));
  }
  image->reacquire();
  CHECK_THROWS_WITH(kvm::DiskImage::open({image_path("missing.img")}), Contains("No such file"));
  CHECK_THROWS_WITH(kvm::DiskImage::open({path}, kvm::DiskImage::Open::create, 16ull << 20), Contains("the disk needs"));
  image.reset();
  ::chmod(path.c_str(), 0444);
  if (::geteuid() != 0) CHECK_THROWS_WITH(kvm::DiskImage::open({path}), Contains("Permission denied"));
  std::remove(path.c_str());
}

TEST_CASE("qcow2 through qemu-nbd: block status finds the data - and holes stay holes") {
  const auto path = image_path("image.qcow2");
  std::remove(path.c_str());
  const kvm::DiskConfig config{path, kvm::ImageFormat::qcow2, kvm::CacheMode::writeback};
  {
    auto image = kvm::DiskImage::open(config, kvm::DiskImage::Open::create, 4ull << 30);
    CHECK(image->size() == 4ull << 30);
    CHECK(image->data_extents().empty());
    std::vector<std::byte> block(2 << 20, std::byte{0x33});
    image->write(1ull << 30, block);
    image->write(3ull << 30, block);
    image->write_zeroes(3ull << 30, 2 << 20);
    image->flush();
    CHECK_THROWS_WITH(kvm::DiskImage::open(config), Contains("locked by another process"));
  }
  auto image = kvm::DiskImage::open(config);
  const auto extents = image->data_extents();
  REQUIRE(extents.size() == 1);
  CHECK(extents[0] == kvm::Extent{1ull << 30, 2ull << 20});
  CHECK_THROWS_WITH(kvm::DiskImage::open({path, kvm::ImageFormat::qcow2}, kvm::DiskImage::Open::existing_unlocked),
                    Contains("shared storage needs a raw image"));
  std::remove(path.c_str());
}

TEST_CASE("disk options parse - and bad ones say what is wrong") {
  const auto c = kvm::parse_disk_config("/x.img,format=qcow2,cache=writeback");
  CHECK(c.path == "/x.img");
  CHECK(c.format == kvm::ImageFormat::qcow2);
  CHECK(c.cache == kvm::CacheMode::writeback);
  CHECK(kvm::parse_disk_config("/y.img").cache == kvm::CacheMode::none);
  CHECK_THROWS_WITH(kvm::parse_disk_config("/x.img,format=vmdk"), Contains("format=raw|qcow2"));
  CHECK_THROWS_WITH(kvm::parse_disk_config(",cache=none"), Contains("an image path is needed"));
}
