#include "schema/filename.h"

#include <cstdio>
#include <random>

namespace gpuq::schema {
namespace {

bool Digits(std::string_view v, uint64_t* out) {
  if (v.empty() || v.size() > 19) return false;
  uint64_t x = 0;
  for (char c : v) {
    if (c < '0' || c > '9') return false;
    x = x * 10 + uint64_t(c - '0');
  }
  *out = x;
  return true;
}

}  // namespace

std::string ClientFileName() {
  thread_local std::random_device random;
  char name[40];
  std::snprintf(name, sizeof name, "c-%08x%08x%08x%08x", random(), random(), random(), random());
  return name;
}

std::string WorkerOutputName(uint64_t job, uint32_t attempt, uint32_t arg) {
  std::string n(kWorkerFilePrefix);
  n += std::to_string(job);
  n += '-';
  n += std::to_string(attempt);
  n += '-';
  n += std::to_string(arg);
  return n;
}

std::string StoredBufferName(uint64_t job, char kind, uint64_t idx) {
  std::string n = "j";
  n += std::to_string(job);
  n += '.';
  n += kind;
  n += std::to_string(idx);
  return n;
}

std::string LogSegmentName(char kind, uint64_t seg) {
  std::string n(kind == 'i' ? kInputLogPrefix : kOutputLogPrefix);
  n += std::to_string(seg);
  return n;
}

bool ParseFileName(std::string_view name, ParsedFileName* out) {
  ParsedFileName p;
  if (IsClientFileName(name)) {
    const std::string_view rest = name.substr(kClientFilePrefix.size());
    if (rest.empty()) return false;
    p.type = FileType::kClientInput;
  } else if (IsWorkerFileName(name)) {
    // w-JOB-ATTEMPT-ARG
    std::string_view rest = name.substr(kWorkerFilePrefix.size());
    const size_t a = rest.find('-'), b = a == std::string_view::npos ? a : rest.find('-', a + 1);
    uint64_t attempt = 0, arg = 0;
    if (b == std::string_view::npos || !Digits(rest.substr(0, a), &p.job) ||
        !Digits(rest.substr(a + 1, b - a - 1), &attempt) || !Digits(rest.substr(b + 1), &arg) ||
        attempt > UINT32_MAX || arg > UINT32_MAX) {
      return false;
    }
    p.type = FileType::kWorkerOutput;
    p.attempt = static_cast<uint32_t>(attempt);
    p.arg = static_cast<uint32_t>(arg);
  } else if (name.substr(0, kInputLogPrefix.size()) == kInputLogPrefix ||
             name.substr(0, kOutputLogPrefix.size()) == kOutputLogPrefix) {
    if (!Digits(name.substr(kInputLogPrefix.size()), &p.seg)) return false;
    p.type = name[4] == 'i' ? FileType::kInputLog : FileType::kOutputLog;
  } else if (!name.empty() && name[0] == 'j') {
    // jJOB.kIDX
    const size_t dot = name.find('.');
    if (dot == std::string_view::npos || dot + 2 > name.size()) return false;
    const char kind = name[dot + 1];
    if ((kind != 'i' && kind != 'o') || !Digits(name.substr(1, dot - 1), &p.job) ||
        !Digits(name.substr(dot + 2), &p.idx)) {
      return false;
    }
    p.type = kind == 'i' ? FileType::kStoredInput : FileType::kStoredOutput;
  } else {
    return false;
  }
  *out = p;
  return true;
}

}  // namespace gpuq::schema
