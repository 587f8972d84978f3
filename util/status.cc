#include "util/status.h"

#include <array>

namespace gpuq {
namespace {

constexpr std::array<std::string_view, 21> kCodeNames = {
    "ok",
    "malformed",
    "too_large",
    "unknown_command",
    "bad_version",
    "invalid",
    "not_found",
    "forbidden",
    "queue_full",
    "compile_error",
    "sandbox_violation",
    "timeout",
    "resource_exhausted",
    "launch_error",
    "kernel_fault",
    "unavailable",
    "io_error",
    "internal",
    "expired",
    "quota_exceeded",
    "session_lost",
};
static_assert(kCodeNames.size() == static_cast<size_t>(Code::kSessionLost) + 1);

}  // namespace

std::string_view CodeName(Code code) {
  auto i = static_cast<size_t>(code);
  return i < kCodeNames.size() ? kCodeNames[i] : "internal";
}

std::optional<Code> CodeFromName(std::string_view name) {
  for (size_t i = 0; i < kCodeNames.size(); ++i) {
    if (kCodeNames[i] == name) return static_cast<Code>(i);
  }
  return std::nullopt;
}

std::string Status::ToString() const {
  if (ok()) return "ok";
  std::string s(CodeName(code_));
  if (!message_.empty()) {
    s += ": ";
    s += message_;
  }
  return s;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string m(context);
  m += ": ";
  m += message_;
  return Status(code_, std::move(m));
}

}  // namespace gpuq
