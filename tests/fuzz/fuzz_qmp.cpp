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
      // The server refuses these before it looks at the arguments (QmpServer::respond).
      if (!request.is_object() || !request.contains("arguments") || !request.contains("execute") ||
          !request["execute"].is_string())
        continue;
      auto arguments = request["arguments"];
      // Credentials are files to load, not text to parse: left out, so that the fuzzer does
      // not spend its time (or block) reading whatever paths it makes up.
      if (arguments.is_object())
        for (const char* file : {"tls-creds", "tls-psk"}) arguments.erase(file);
      try {
        if (request["execute"] == "migrate-set-parameters")
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
