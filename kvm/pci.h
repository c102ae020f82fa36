// PCI configuration mechanism #1 (ports 0xcf8/0xcfc) over bus 0: just enough for a guest to
// find its devices and their I/O-port BARs, as it would on QEMU's `pc` machine.
#pragma once

#include <cstdint>
#include <vector>

namespace mig::kvm {

class PciFunction {
 public:
  virtual ~PciFunction() = default;
  // `offset` is within the 256-byte configuration space, aligned to `size` (1, 2 or 4).
  virtual std::uint32_t config_read(std::uint32_t offset, unsigned size) = 0;
  virtual void config_write(std::uint32_t offset, unsigned size, std::uint32_t value) = 0;
};

// A type-0 configuration header with one I/O BAR at a fixed address: the guest may size the
// BAR (write all ones, read the mask) but not move it, which no driver of ours needs.
class PciConfigHeader {
 public:
  struct Identity {
    std::uint16_t vendor, device, subsystem_vendor, subsystem;
    std::uint32_t class_code;  // class, subclass, programming interface
    std::uint8_t interrupt_line;
  };
  PciConfigHeader(Identity id, std::uint16_t bar0_port, std::uint16_t bar0_size);
  std::uint32_t read(std::uint32_t offset, unsigned size) const;
  void write(std::uint32_t offset, unsigned size, std::uint32_t value);
  std::uint16_t command() const { return command_; }
  void set_command(std::uint16_t command) { command_ = command; }

 private:
  std::uint32_t dword(std::uint32_t index) const;
  Identity id_;
  std::uint16_t bar0_port_, bar0_size_;
  std::uint16_t command_ = 0;
  bool bar0_sizing_ = false;
};

class PciBus {
 public:
  static constexpr std::uint16_t kConfigAddress = 0xcf8, kConfigData = 0xcfc;
  bool handles(std::uint16_t port) const { return port >= kConfigAddress && port < kConfigData + 4; }
  void io(std::uint16_t port, bool is_write, std::uint8_t* data, std::uint32_t size);
  // Puts `function` in the next free slot of bus 0 (from 1; slot 0 stays empty) and returns it.
  unsigned attach(PciFunction& function);

 private:
  PciFunction* selected(std::uint32_t& offset) const;
  std::uint32_t address_ = 0;
  std::vector<PciFunction*> slots_{nullptr};
};

}  // namespace mig::kvm
