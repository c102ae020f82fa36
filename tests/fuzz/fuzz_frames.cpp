// libFuzzer target: the frame reader. The input is a byte stream as a peer would send it:
// frame headers, each followed by its payload, decoded as the message its type names. Every
// refusal must be a ProtocolError (one line); anything else escaping is a finding.
#include <cstring>

#include "transport/protocol.h"

using namespace mig::wire;

namespace {

template <typename T>
void decode_as(std::span<const std::byte> payload) {
  const T message = decode<T>(payload);
  // What decodes must encode back to a payload that decodes to the same message.
  if (!(decode<T>(encode(message)) == message)) __builtin_trap();
}

void decode_frame(MessageType type, std::span<const std::byte> payload) {
  switch (type) {
    case MessageType::hello: return decode_as<Hello>(payload);
    case MessageType::hello_ack: return decode_as<HelloAck>(payload);
    case MessageType::state_section: return decode_as<StateSection>(payload);
    case MessageType::complete: return decode_as<Complete>(payload);
    case MessageType::ready: return decode_as<Ready>(payload);
    case MessageType::commit: return decode_as<Commit>(payload);
    case MessageType::running: return decode_as<Running>(payload);
    case MessageType::handover: return decode_as<Handover>(payload);
    case MessageType::error: return decode_as<Error>(payload);
    case MessageType::round_end: return decode_as<RoundEnd>(payload);
    case MessageType::round_ack: return decode_as<RoundAck>(payload);
    case MessageType::shared_memory: return decode_as<SharedMemory>(payload);
    case MessageType::page_plan: return decode_as<PagePlan>(payload);
    case MessageType::channel_hello: return decode_as<ChannelHello>(payload);
    case MessageType::postcopy_start: return decode_as<PostcopyStart>(payload);
    case MessageType::page_request: return decode_as<PageRequest>(payload);
    case MessageType::postcopy_done: return decode_as<PostcopyDone>(payload);
    case MessageType::postcopy_resume: return decode_as<PostcopyResume>(payload);
    case MessageType::postcopy_resume_ack: return decode_as<PostcopyResumeAck>(payload);
    case MessageType::disk_data: return decode_as<DiskData>(payload);
    case MessageType::disk_zero: return decode_as<DiskZero>(payload);
    case MessageType::commit_retry: return decode_as<CommitRetry>(payload);
    case MessageType::page_batch: case MessageType::invalid: return;  // page batches: fuzz_page_batch
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data), size);
  try {
    while (input.size() >= sizeof(FrameHeader)) {
      FrameHeader header;
      std::memcpy(&header, input.data(), sizeof header);
      validate(header);
      input = input.subspan(sizeof header);
      if (header.length > input.size()) return 0;  // the peer would be waited for
      decode_frame(static_cast<MessageType>(header.type), input.first(header.length));
      input = input.subspan(header.length);
    }
  } catch (const ProtocolError&) {
  }
  return 0;
}
