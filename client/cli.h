// The gpuq command line: each group of commands registers itself on the app.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

#include "util/status.h"

namespace gpuq::cli {

// Exit codes shared by every command (README.md, "Exit codes").
enum Exit : int {  // plain enum: converts to int
  kExitOk = 0,
  kExitRejected = 1,     // the job or compile was rejected (compile error, ...)
  kExitUsage = 2,        // bad arguments or an invalid request
  kExitTimeout = 3,      // a bound ran out
  kExitUnavailable = 4,  // broker, GPU or file not reachable
  kExitInternal = 5,
};

// A command's action, run after parsing; its return value is the exit code.
using Action = std::function<int()>;

// The exit code for a failure code, the same for every command (README.md).
int ExitFor(Code code);
// Reports a failure, as JSON on stdout or as text on stderr (with `log`, a
// compile log, after it), and returns its exit code.
int Fail(bool json, const Status& s, const std::string& log = "");

void AddCompileCommands(CLI::App& app, Action* action);
void AddJobCommands(CLI::App& app, Action* action);

// The kernel cache file: $GPUQ_CACHE, else $XDG_CACHE_HOME/gpuq/kernels.db,
// else ~/.cache/gpuq/kernels.db. Creates the folder.
std::string DefaultCachePath();

}  // namespace gpuq::cli
