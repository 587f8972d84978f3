// gpuq's one error type, part of the client's public surface: expected
// failures are values (Status, StatusOr<T>), never exceptions. The codes are
// the wire protocol's error codes.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace gpuq {

// The codes double as the protocol's error codes (PROTOCOL.md, "Error
// codes"): CodeName() is what goes on the wire.
enum class Code : int {
  kOk = 0,
  kMalformed,         // undecodable or ill-typed message
  kTooLarge,          // a size or count is over its limit
  kUnknownCommand,    // op not known for this protocol
  kBadVersion,        // protocol frame names another version
  kInvalid,           // well-formed but semantically wrong request
  kNotFound,          // no such job / entry
  kForbidden,         // not this tenant's job, or key not allowed
  kQueueFull,         // bounded queue is full: retry later
  kCompileError,      // NVRTC rejected the source (log attached)
  kSandboxViolation,  // source tried to reach a forbidden file
  kTimeout,           // a wall-time bound ran out
  kResourceExhausted, // memory or another bound ran out
  kLaunchError,       // the driver rejected the launch
  kKernelFault,       // the kernel faulted (sticky CUDA error)
  kUnavailable,       // a needed part (GPU, worker, driver) is not there
  kIoError,           // file system or database failure
  kInternal,          // a bug: an invariant did not hold
  kExpired,           // a job was not started by its deadline
  kQuotaExceeded,     // over a tenant's limit (rate): retry later
  kSessionLost,       // a session ended under its client (fault, kill, idle)
};

std::string_view CodeName(Code code);
// Parses a wire code name; returns nullopt for an unknown name.
std::optional<Code> CodeFromName(std::string_view name);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message)
      : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "code: message", for logs and command lines.
  std::string ToString() const;

  // Prepends context: "context: message".
  Status WithContext(std::string_view context) const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status Error(Code code, std::string message) {
  return Status(code, std::move(message));
}

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT
    assert(!status_.ok());
  }
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace gpuq
