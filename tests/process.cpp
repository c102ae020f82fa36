#include "tests/process.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace mig::test {
namespace {

// Whether `fd` becomes readable before `limit`: a pipe with data or at its end, or a pidfd
// whose process exited.
bool readable_within(int fd, std::chrono::milliseconds limit) {
  pollfd ready{fd, POLLIN, 0};
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    const int n = ::poll(&ready, 1, static_cast<int>(std::max<std::int64_t>(left.count(), 0)));
    if (n > 0) return true;
    if (n == 0 || errno != EINTR) return false;
  }
}

// A descriptor that becomes readable when process `pid` exits. Through syscall(): Debian 12's
// <sys/pidfd.h> lacks extern "C", so its pidfd_open cannot be linked from C++.
int exit_descriptor(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

// Every thread's stack of process `pid`, through gdb: the frames only, without gdb's chatter.
std::string stacks_of(pid_t pid) {
  const std::string command = "gdb -p " + std::to_string(pid) + " -batch -ex 'thread apply all bt' 2>&1";
  std::FILE* gdb = ::popen(command.c_str(), "r");
  if (!gdb) return "(cannot run gdb: " + std::string(std::strerror(errno)) + ")\n";
  std::string frames, everything;
  char* line = nullptr;  // getline's: a frame with long template names is kept whole
  std::size_t capacity = 0;
  while (::getline(&line, &capacity, gdb) > 0) {
    everything += line;
    if (line[0] == '#' || std::strncmp(line, "Thread ", 7) == 0) frames += line;
  }
  std::free(line);
  const int status = ::pclose(gdb);
  // No frames: gdb is missing or could not attach, and its own words say which.
  return frames.empty() ? "(no stacks, gdb exited with " + std::to_string(status) + "): " + everything : frames;
}

std::string last_part(const std::string& text, std::size_t bytes) {
  return text.size() <= bytes ? text : "..." + text.substr(text.size() - bytes);
}

}  // namespace

Child::Child(std::vector<std::string> args)
    : args_(std::move(args)), stderr_path_(temp_path("stderr-" + std::to_string(counter_++))) {
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  pid_ = ::fork();
  REQUIRE(pid_ >= 0);
  if (pid_ == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    const int err = ::open(stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(err, STDERR_FILENO);
    std::vector<char*> argv;
    for (auto& a : args_) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  stdout_fd_ = out[0];
  running_.push_back(this);
}

Child::~Child() {
  if (pid_ > 0 && status_ < 0) {
    ::kill(pid_, SIGKILL);
    reap();
  }
  ::close(stdout_fd_);
  std::remove(stderr_path_.c_str());
}

std::string Child::read_line() {
  for (;;) {
    if (const auto end = unread_.find('\n'); end != std::string::npos) {
      std::string line = unread_.substr(0, end + 1);
      unread_.erase(0, end + 1);
      return line;
    }
    if (!readable_within(stdout_fd_, kHungAfter)) fail_hung("a line on its stdout");
    char buffer[4096];
    const ssize_t n = ::read(stdout_fd_, buffer, sizeof buffer);
    if (n <= 0) return std::exchange(unread_, {});  // the end: what is left, without a newline
    unread_.append(buffer, static_cast<std::size_t>(n));
  }
}

int Child::wait() {
  if (status_ < 0) {
    const int exit_fd = exit_descriptor(pid_);
    REQUIRE(exit_fd >= 0);
    const bool exited = readable_within(exit_fd, kHungAfter);
    ::close(exit_fd);
    if (!exited) fail_hung("its exit");
    reap();
  }
  return status_;
}

void Child::reap() {
  int status = 0;
  ::waitpid(pid_, &status, 0);
  status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::erase(running_, this);
}

std::string Child::stderr_text() const {
  std::ifstream in(stderr_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void Child::fail_hung(const std::string& waited_for) const {
  std::string report = args_[0] + " (pid " + std::to_string(pid_) + ") hung: no sign of " + waited_for + " in " +
                       std::to_string(kHungAfter.count()) + " s.";
  for (const Child* child : running_) {
    report += "\n\n=== " + child->args_[0] + " (pid " + std::to_string(child->pid_) + "), its stderr:\n" +
              last_part(child->stderr_text(), 4096) + "\n=== its threads:\n" + stacks_of(child->pid_);
  }
  throw std::runtime_error(report);  // Catch reports the test failed, with this text
}

}  // namespace mig::test
