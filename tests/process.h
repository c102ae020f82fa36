// Real processes for end-to-end tests: the tools as operators run them.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tests/support.h"

namespace mig::test {

inline const std::string kTools = std::string(MIG_BINARY_DIR) + "/tools/";

inline std::string temp_path(const std::string& name) {
  return "/tmp/mig-cli-test-" + std::to_string(::getpid()) + "-" + name;
}

// A tool run as a child process, with stdout on a pipe and stderr in a file. A tool that
// hangs fails the test, with the stacks of every tool still running, rather than running
// into CTest's limit, which kills the test without a word.
class Child {
 public:
  // How long a tool may keep a test waiting for a line or for its exit: four times the
  // slowest seen (a copy-storage-all mig-send, about 60 s nested in TCG under ASan), and
  // under CTest's limit (300 s, 900 s nested).
  static constexpr std::chrono::seconds kHungAfter{240};

  explicit Child(std::vector<std::string> args);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  void signal(int sig) { ::kill(pid_, sig); }
  // The next line of its stdout, with its newline; empty at the end.
  std::string read_line();
  // Its exit code, or 128 + the signal that ended it.
  int wait();
  std::string stderr_text() const;

 private:
  // What each tool still running is doing, for a test that gave up waiting on one of them.
  [[noreturn]] void fail_hung(const std::string& waited_for) const;
  void reap();

  static inline int counter_ = 0;
  static inline std::vector<const Child*> running_;
  std::vector<std::string> args_;
  std::string stderr_path_;
  pid_t pid_ = -1;
  int status_ = -1;
  int stdout_fd_ = -1;
  std::string unread_;  // read from stdout, not yet returned: the start of the next line
};

// Starts mig-recv on a free port and returns it with "tcp:127.0.0.1:PORT".
inline std::pair<std::unique_ptr<Child>, std::string> start_receiver(std::vector<std::string> extra) {
  std::vector<std::string> args = {kTools + "mig-recv", "--listen", "tcp:127.0.0.1:0"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto child = std::make_unique<Child>(args);
  const std::string line = child->read_line();  // "mig-recv: listening on tcp:127.0.0.1:PORT"
  REQUIRE_THAT(line, Catch::Matchers::Contains("listening on tcp:"));
  return {std::move(child), line.substr(line.find("tcp:"), line.find_last_not_of("\n") - line.find("tcp:") + 1)};
}

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

// Sender statistics of a migration that converged because dirty-limit capped each vCPU (at
// 1 MB/s, its default), with no throttle beside it, of a guest whose vCPU 1 computes.
inline void check_converged_by_dirty_limit(const nlohmann::json& sent) {
  CHECK(sent["stop_reason"] == "converged");
  CHECK(sent["policy"] == "dirty-limit");
  CHECK(sent["round_table"].back()["dirty_limit_MBps"] == 1.0);
  CHECK(sent["round_table"].back()["throttle_pct"] == 0);
  // vCPU 1 computes and reports its work, before the migration and during it.
  REQUIRE(sent["local_guest_work"].size() == 1);
  CHECK(sent["local_guest_work"][0]["vcpu"] == 1);
  CHECK(sent["local_guest_work"][0]["before_per_s"].get<double>() > 0);
  CHECK(sent["local_guest_work"][0]["during_per_s"].get<double>() > 0);
}

// Waits for a tool and requires its exit code. Its stderr is read once it has exited, for
// the failure report to hold all of it: Catch's INFO takes its text where it is written.
// `peer`, a tool still running, adds what it wrote so far.
inline void require_exit_code(Child& tool, int code, const Child* peer = nullptr) {
  const int exited = tool.wait();
  INFO(tool.stderr_text() << (peer ? "its peer: " + peer->stderr_text() : ""));
  REQUIRE(exited == code);
}

// The same for a migration's two tools, whose stderr texts explain each other's failures.
inline void require_exit_codes(Child& sender, int sender_code, Child& receiver, int receiver_code) {
  const int sent = sender.wait(), received = receiver.wait();
  INFO("sender: " << sender.stderr_text() << "receiver: " << receiver.stderr_text());
  REQUIRE(sent == sender_code);
  REQUIRE(received == receiver_code);
}

inline std::vector<std::string> send_args(const std::string& to, const std::string& stats, const std::string& append,
                                          const std::string& after = "0.3") {
  return {kTools + "mig-send", "--kernel", test::kGuestImage, "--mem", "128M", "--append", append,
          "--to", to, "--after", after, "--stats-json", stats};
}


struct Ran {
  int exit_code;
  std::string out, err;
};
// Runs a tool to its end.
inline Ran run_tool(std::vector<std::string> args) {
  Child child(std::move(args));
  std::string out;
  for (std::string line; !(line = child.read_line()).empty();) out += line;
  const int code = child.wait();
  return {code, out, child.stderr_text()};
}

// mig-ctl on a socket path.
inline Ran ctl(const std::string& socket, std::vector<std::string> command) {
  std::vector<std::string> args = {kTools + "mig-ctl", "unix:" + socket};
  args.insert(args.end(), command.begin(), command.end());
  return run_tool(args);
}

}  // namespace mig::test
