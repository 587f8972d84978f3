#include <iostream>
#include <nlohmann/json.hpp>

#include "client/cli.h"

namespace gpuq::cli {

int ExitFor(Code code) {
  switch (code) {
    case Code::kOk:
      return kExitOk;
    case Code::kInvalid:
    case Code::kMalformed:
    case Code::kTooLarge:
    case Code::kUnknownCommand:
    case Code::kBadVersion:
      return kExitUsage;
    case Code::kTimeout:
    case Code::kExpired:
    case Code::kResourceExhausted:
      return kExitTimeout;
    case Code::kUnavailable:
    case Code::kIoError:
    case Code::kQueueFull:
    case Code::kQuotaExceeded:
    case Code::kSessionLost:
      return kExitUnavailable;
    case Code::kInternal:
      return kExitInternal;
    case Code::kCompileError:
    case Code::kSandboxViolation:
    case Code::kNotFound:
    case Code::kForbidden:
    case Code::kLaunchError:
    case Code::kKernelFault:
      return kExitRejected;
  }
  return kExitInternal;
}

int Fail(bool json, const Status& s, const std::string& log) {
  if (json) {
    nlohmann::json j = {{"error", s.message()}, {"code", CodeName(s.code())}};
    if (!log.empty()) j["log"] = log;
    std::cout << j.dump(2) << "\n";
  } else {
    std::cerr << "gpuq: " << s.ToString() << "\n";
    if (!log.empty()) std::cerr << log << (log.back() == '\n' ? "" : "\n");
  }
  return ExitFor(s.code());
}

}  // namespace gpuq::cli
