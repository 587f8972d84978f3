// Helpers shared by the tests: temporary folders, files, child processes.
#pragma once

#include <string>
#include <vector>

namespace gpuq::testing {

// A fresh folder under $TMPDIR, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& content);
std::string ReadFile(const std::string& path);

// A program built beside the test binary (build/bin/NAME).
std::string BinPath(const std::string& name);
// The heartbeat interval (ms, as text) of gpuqd and the worker test doubles
// where a test names none: $GPUQ_TEST_HEARTBEAT_MS, else 100. A sanitizer
// build on a small machine sets more, so that a worker the sanitizer slows
// is not taken for a silent one.
std::string TestHeartbeatMs();

// Runs argv to completion; returns its exit status (or 128+signal) and what
// it wrote on stdout (and on stderr, `with_stderr`).
int RunProgram(const std::vector<std::string>& argv, std::string* out = nullptr,
               bool with_stderr = false);

}  // namespace gpuq::testing
