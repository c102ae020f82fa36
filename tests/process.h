// Real processes for end-to-end tests: the tools as operators run them.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "tests/support.h"

namespace mig::test {

inline const std::string kTools = std::string(MIG_BINARY_DIR) + "/tools/";

inline std::string temp_path(const std::string& name) {
  return "/tmp/mig-cli-test-" + std::to_string(::getpid()) + "-" + name;
}

// A child process with stdout on a pipe and stderr in a file.
class Child {
 public:
  explicit Child(std::vector<std::string> args) : stderr_path_(temp_path("stderr-" + std::to_string(counter_++))) {
    int out[2];
    REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::dup2(out[1], STDOUT_FILENO);
      const int err = ::open(stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(err, STDERR_FILENO);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(out[1]);
    stdout_ = ::fdopen(out[0], "r");
  }
  ~Child() {
    if (pid_ > 0 && status_ < 0) {
      ::kill(pid_, SIGKILL);
      wait();
    }
    if (stdout_) std::fclose(stdout_);
    std::remove(stderr_path_.c_str());
  }
  void signal(int sig) { ::kill(pid_, sig); }
  std::string read_line() {
    char buf[512];
    return std::fgets(buf, sizeof buf, stdout_) ? std::string(buf) : std::string();
  }
  int wait() {
    if (status_ < 0) {
      int status = 0;
      ::waitpid(pid_, &status, 0);
      status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    return status_;
  }
  std::string stderr_text() const {
    std::ifstream in(stderr_path_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  static inline int counter_ = 0;
  std::string stderr_path_;
  pid_t pid_ = -1;
  int status_ = -1;
  std::FILE* stdout_ = nullptr;
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
