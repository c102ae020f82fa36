// libFuzzer target: the QMP command parser - the framing that splits a client's bytes into
// messages, the JSON parser, and the checks of migrate's and migrate-set-parameters'
// arguments. A refusal is a CommandError, a JSON parse failure or the framing's length
// error; anything else escaping is a finding.
#include <string_view>

#include "control/arguments.h"
#include "control/qmp_framing.h"

using namespace mig::control;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  JsonSplitter splitter;
  splitter.feed(std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    while (auto message = splitter.next()) {
      const auto request = nlohmann::json::parse(*message, nullptr, false);
      if (!request.is_object() || !request.contains("arguments")) continue;
      const auto& arguments = request["arguments"];
      try {
        if (request.value("execute", "") == "migrate-set-parameters")
          apply_parameters({}, arguments);
        else
          parse_migrate_arguments(arguments, {});
      } catch (const CommandError&) {
      }
    }
  } catch (const std::length_error&) {
  }
  return 0;
}
