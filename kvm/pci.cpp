#include "kvm/pci.h"

#include <cstring>

namespace mig::kvm {

PciConfigHeader::PciConfigHeader(Identity id, std::uint16_t bar0_port, std::uint16_t bar0_size)
    : id_(id), bar0_port_(bar0_port), bar0_size_(bar0_size) {}

std::uint32_t PciConfigHeader::dword(std::uint32_t index) const {
  switch (index) {
    case 0: return id_.vendor | std::uint32_t{id_.device} << 16;
    case 1: return command_;  // status: nothing to report
    case 2: return id_.class_code << 8;  // revision 0
    case 3: return 0;  // header type 0, single function
    case 4: return bar0_sizing_ ? (~std::uint32_t{bar0_size_ - 1u} | 1u) : (std::uint32_t{bar0_port_} | 1u);
    case 11: return id_.subsystem_vendor | std::uint32_t{id_.subsystem} << 16;
    case 15: return id_.interrupt_line | 1u << 8;  // INTA#
    default: return 0;
  }
}

std::uint32_t PciConfigHeader::read(std::uint32_t offset, unsigned size) const {
  const std::uint32_t value = dword(offset / 4) >> (offset % 4 * 8);
  return size == 4 ? value : value & ((1u << (size * 8)) - 1);
}

void PciConfigHeader::write(std::uint32_t offset, unsigned size, std::uint32_t value) {
  if (offset == 4 && size >= 2) command_ = static_cast<std::uint16_t>(value & 0x7);  // I/O, memory, bus master
  if (offset == 0x10 && size == 4) bar0_sizing_ = value == 0xffffffff;
}

void PciBus::io(std::uint16_t port, bool is_write, std::uint8_t* data, std::uint32_t size) {
  if (port == kConfigAddress && size == 4) {
    if (is_write) std::memcpy(&address_, data, 4);
    else std::memcpy(data, &address_, 4);
    return;
  }
  std::uint32_t offset = port - kConfigData;
  PciFunction* function = port >= kConfigData ? selected(offset) : nullptr;
  if (!function || offset % size != 0) {
    if (!is_write) std::memset(data, 0xff, size);  // no device: all ones
    return;
  }
  std::uint32_t value = 0;
  if (is_write) {
    std::memcpy(&value, data, size);
    function->config_write(offset, size, value);
  } else {
    value = function->config_read(offset, size);
    std::memcpy(data, &value, size);
  }
}

PciFunction* PciBus::selected(std::uint32_t& offset) const {
  if (!(address_ & 0x80000000u)) return nullptr;  // configuration cycles not enabled
  const std::uint32_t bus = (address_ >> 16) & 0xff, slot = (address_ >> 11) & 0x1f, function = (address_ >> 8) & 0x7;
  if (bus != 0 || function != 0 || slot >= slots_.size()) return nullptr;
  offset += address_ & 0xfc;
  return slots_[slot];
}

unsigned PciBus::attach(PciFunction& function) {
  slots_.push_back(&function);
  return static_cast<unsigned>(slots_.size() - 1);
}

}  // namespace mig::kvm
