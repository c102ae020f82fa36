// libFuzzer target: reading a dirty trace file (mig-sim's input, which anyone may hand it).
// Whatever the bytes, the reader returns a trace whose every page lies inside the guest, and
// whose every writer is a vCPU it names (or none), or throws its one-line error.
#include <sstream>

#include "engine/dirty_trace.h"

using namespace mig;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    const auto trace = engine::parse_trace(in, "input");
    for (auto page : trace.populated)
      if (page >= trace.pages) __builtin_trap();
    for (const auto& frame : trace.frames)
      for (auto page : frame)
        if (page >= trace.pages) __builtin_trap();
    // A trace that names vCPUs names one writer per page, each a vCPU it has or none.
    if (trace.vcpus > 0 && trace.writers.size() != trace.frames.size()) __builtin_trap();
    for (std::size_t f = 0; f < trace.writers.size(); ++f) {
      if (trace.writers[f].size() != trace.frames[f].size()) __builtin_trap();
      for (auto writer : trace.writers[f])
        if (writer >= trace.vcpus && writer != engine::kNoVcpu) __builtin_trap();
    }
  } catch (const std::runtime_error&) {
  }
  return 0;
}
