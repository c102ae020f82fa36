#include "kvm/cpu_model.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "kvm/cpu_features.h"

namespace mig::kvm {

namespace {

constexpr const char* kHeader = "mig-cpu-model";
constexpr unsigned kFormatVersion = 1;
constexpr std::uintmax_t kMaxCpuModelBytes = 64 << 10;  // a full table with comments is under 20 KiB

struct LineReader {
  const std::string& source;
  std::size_t line = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::invalid_argument("CPU model " + source + (line ? " line " + std::to_string(line) : "") + ": " + why);
  }
  std::uint32_t number(std::istringstream& fields, const char* what) const {
    std::string text;
    if (!(fields >> text)) fail(std::string("the leaf lacks its ") + what);
    std::size_t used = 0;
    unsigned long long value = 0;
    try {
      value = std::stoull(text, &used, 0);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != text.size() || text[0] == '-' || value > UINT32_MAX) fail(std::string(what) + " '" + text + "' is not a 32-bit number");
    return static_cast<std::uint32_t>(value);
  }
};

kvm_cpuid_entry2 parse_leaf(std::istringstream& fields, const LineReader& reader) {
  kvm_cpuid_entry2 e{};
  e.function = reader.number(fields, "function");
  e.index = reader.number(fields, "index");
  e.eax = reader.number(fields, "EAX");
  e.ebx = reader.number(fields, "EBX");
  e.ecx = reader.number(fields, "ECX");
  e.edx = reader.number(fields, "EDX");
  if (std::string extra; fields >> extra) reader.fail("the leaf has more than six numbers ('" + extra + "')");
  return e;
}

std::string leaf_name(const kvm_cpuid_entry2& e) {
  char text[40];
  std::snprintf(text, sizeof text, "0x%x index %u", e.function, e.index);
  return text;
}

bool same_leaf(const kvm_cpuid_entry2& a, const kvm_cpuid_entry2& b) { return a.function == b.function && a.index == b.index; }

std::string joined(const std::vector<std::string>& items, const char* separator) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : separator) + item;
  return out;
}

}  // namespace

CpuModel parse_cpu_model(std::istream& in, const std::string& source) {
  LineReader reader{source};
  CpuModel model;
  bool headed = false;
  for (std::string text; std::getline(in, text);) {
    ++reader.line;
    std::istringstream fields(text.substr(0, text.find('#')));
    std::string keyword;
    if (!(fields >> keyword)) continue;
    if (!headed) {
      unsigned version = 0;
      if (keyword != kHeader) reader.fail(std::string("does not start with '") + kHeader + " 1'");
      if (!(fields >> version) || version != kFormatVersion)
        reader.fail("is format version " + std::to_string(version) + "; this mig reads version 1");
      headed = true;
    } else if (keyword == "name") {
      std::getline(fields >> std::ws, model.name);
    } else if (keyword == "leaf") {
      const auto leaf = parse_leaf(fields, reader);
      for (const auto& e : model.cpuid)
        if (same_leaf(e, leaf)) reader.fail("leaf " + leaf_name(leaf) + " appears twice");
      if (model.cpuid.size() == kMaxCpuModelLeaves) reader.fail("has more than " + std::to_string(kMaxCpuModelLeaves) + " leaves");
      model.cpuid.push_back(leaf);
    } else {
      reader.fail("'" + keyword + "' is not name or leaf");
    }
  }
  reader.line = 0;
  if (!headed) reader.fail("is empty");
  if (std::none_of(model.cpuid.begin(), model.cpuid.end(), [](const auto& e) { return e.function == 0 && e.index == 0; }))
    reader.fail("has no leaf 0, so no vendor");
  if (model.name.empty()) model.name = source;
  return model;
}

CpuModel read_cpu_model(const std::string& path) {
  // Sized before it is read: --cpu /dev/zero must not read forever.
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) throw std::invalid_argument("cannot read the CPU model " + path + ": not a regular file");
  if (std::filesystem::file_size(path, error) > kMaxCpuModelBytes)
    throw std::invalid_argument("the CPU model " + path + " is over " + std::to_string(kMaxCpuModelBytes >> 10) + " KiB");
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("cannot read the CPU model " + path);
  return parse_cpu_model(in, path);
}

void write_cpu_model(std::ostream& out, const CpuModel& model) {
  out << "# A mig CPU model: the CPUID a guest is given (mig-vm --cpu FILE).\n";
  out << "# Well-known flags: " << joined(cpu_feature_names(model.cpuid), " ") << "\n";
  out << kHeader << " " << kFormatVersion << "\n";
  out << "name " << model.name << "\n";
  out << "#    function   index  eax        ebx        ecx        edx\n";
  for (const auto& e : model.cpuid) {
    char line[96];
    std::snprintf(line, sizeof line, "leaf 0x%08x %-6u 0x%08x 0x%08x 0x%08x 0x%08x\n", e.function, e.index, e.eax, e.ebx, e.ecx, e.edx);
    out << line;
  }
}

CpuModel host_cpu_model(std::string name, std::span<const kvm_cpuid_entry2> supported) {
  CpuModel model{std::move(name), {supported.begin(), supported.end()}};
  for (auto& e : model.cpuid) e.flags = 0;
  return model;
}

CpuModel common_cpu_model(std::span<const CpuModel> hosts) {
  std::vector<std::vector<kvm_cpuid_entry2>> tables;
  std::vector<std::string> names;
  for (const auto& host : hosts) {
    tables.push_back(host.cpuid);
    names.push_back(host.name);
  }
  return {"common(" + joined(names, ",") + ")", common_cpuid(tables)};
}

std::vector<kvm_cpuid_entry2> apply_cpu_model(const CpuModel& model, std::span<const kvm_cpuid_entry2> supported) {
  if (const auto missing = missing_cpu_features(model.cpuid, supported); !missing.empty())
    throw std::invalid_argument("this host cannot give the guest the CPU model " + model.name + ": it lacks " + joined(missing, ", "));
  auto cpuid = model.cpuid;
  for (auto& e : cpuid)
    for (const auto& host : supported)
      if (host.function == e.function) e.flags |= host.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
  return cpuid;
}

}  // namespace mig::kvm
