// Thread names, so that top -H and perf tell a migration's threads apart from each other and
// from the vCPUs.
#pragma once

#include <string>

namespace mig {

// Names the calling thread; the kernel keeps at most 15 characters.
void name_this_thread(const std::string& name);

}  // namespace mig
