#include <string_view>

#include "broker/compile/compile_request.h"

namespace gpuq::compile {
namespace {

// Plain functions rather than std::regex: libstdc++ builds a regex in
// hundreds of microseconds, which a cache hit cannot afford.

bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsIdentStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsIdent(char c) { return IsIdentStart(c) || IsDigit(c); }

bool Bool(std::string_view v) { return v == "true" || v == "false"; }
bool OnOff(std::string_view v) { return v == "on" || v == "off"; }
bool Std(std::string_view v) {
  return v == "c++03" || v == "c++11" || v == "c++14" || v == "c++17" || v == "c++20";
}
bool SmallNumber(std::string_view v) {
  if (v.empty() || v.size() > 3) return false;
  for (char c : v) {
    if (!IsDigit(c)) return false;
  }
  return true;
}
bool DiagList(std::string_view v) {
  if (v.empty() || v.size() > 64) return false;
  for (char c : v) {
    if (!IsDigit(c) && c != ',') return false;
  }
  return true;
}
bool Identifier(std::string_view v) {
  if (v.empty() || !IsIdentStart(v[0])) return false;
  for (char c : v) {
    if (!IsIdent(c)) return false;
  }
  return true;
}
// NAME or NAME=VALUE, VALUE of printable ASCII (no newline can smuggle a
// directive into the source).
bool Macro(std::string_view v) {
  auto eq = v.find('=');
  if (!Identifier(v.substr(0, eq))) return false;
  if (eq == std::string_view::npos) return true;
  for (char c : v.substr(eq + 1)) {
    if (c < ' ' || c > '~') return false;
  }
  return true;
}

// Options that take no value.
constexpr std::string_view kFlags[] = {
    "--use_fast_math", "-use_fast_math", "--extra-device-vectorization",
    "-extra-device-vectorization", "--restrict", "-restrict", "--generate-line-info",
    "-lineinfo", "--device-as-default-execution-space", "-default-device",
    "--disable-warnings", "-w", "--device-debug", "-G",
    "--no-source-include", "-no-source-include",
};

// Options of the form PREFIX + value, with the check of the value.
struct Valued {
  std::string_view prefix;
  bool (*valid)(std::string_view);
};
constexpr Valued kValued[] = {
    {"--ftz=", Bool},          {"-ftz=", Bool},
    {"--prec-div=", Bool},     {"-prec-div=", Bool},
    {"--prec-sqrt=", Bool},    {"-prec-sqrt=", Bool},
    {"--fmad=", Bool},         {"-fmad=", Bool},
    {"--builtin-move-forward=", Bool}, {"-builtin-move-forward=", Bool},
    {"--builtin-initializer-list=", Bool}, {"-builtin-initializer-list=", Bool},
    {"--std=", Std},           {"-std=", Std},
    {"--maxrregcount=", SmallNumber}, {"-maxrregcount=", SmallNumber},
    {"--dopt=", OnOff},        {"-dopt=", OnOff},
    {"--diag-suppress=", DiagList}, {"-diag-suppress=", DiagList},
    {"--diag-error=", DiagList}, {"-diag-error=", DiagList},
    {"--diag-warn=", DiagList},  {"-diag-warn=", DiagList},
    {"--define-macro=", Macro}, {"-D", Macro},
    {"--undefine-macro=", Identifier}, {"-U", Identifier},
};

}  // namespace

Status ValidateOptions(const std::vector<std::string>& options) {
  for (const std::string& o : options) {
    bool allowed = false;
    for (std::string_view f : kFlags) allowed |= o == f;
    for (const Valued& v : kValued) {
      if (allowed || !StartsWith(o, v.prefix)) continue;
      if (!v.valid(std::string_view(o).substr(v.prefix.size()))) {
        return Error(Code::kInvalid, "compile option '" + o.substr(0, 80) +
                                         "' has a value that is not allowed");
      }
      allowed = true;
    }
    if (!allowed) {
      return Error(Code::kInvalid,
                   "compile option '" + o.substr(0, 80) +
                       "' is not on the allowed list (include paths, output files and "
                       "the architecture are set by gpuq)");
    }
  }
  return Status::Ok();
}

void TruncateLog(std::string* log) {
  if (log->size() <= kMaxLogBytes) return;
  const size_t was = log->size();
  log->resize(kMaxLogBytes);
  *log += "\n[gpuq: the compile log was " + std::to_string(was) + " bytes; its first " +
          std::to_string(kMaxLogBytes) + " are kept]\n";
}

bool HasCatastrophicError(std::string_view log, std::string_view what) {
  static constexpr std::string_view kCatastrophic = "catastrophic error: ";
  for (size_t begin = 0; begin < log.size();) {
    size_t end = log.find('\n', begin);
    if (end == std::string_view::npos) end = log.size();
    const std::string_view line = log.substr(begin, end - begin);
    begin = end + 1;
    if (line.empty() || line[0] == ' ' || line[0] == '\t') continue;  // an echoed source line
    // "file(12): catastrophic error: what...", or the line starting with it.
    const size_t at = line.find(kCatastrophic);
    if (at == std::string_view::npos) continue;
    if (at != 0 && line.substr(0, at).find("): ") != at - 3) continue;
    if (StartsWith(line.substr(at + kCatastrophic.size()), what)) return true;
  }
  return false;
}

Status ValidateArch(const std::string& arch) {
  // sm_NN[N][a|f] or compute_NN[N][a|f], NN not starting with 0.
  std::string_view v = arch;
  bool ok = false;
  for (std::string_view prefix : {"sm_", "compute_"}) {
    if (!StartsWith(v, prefix)) continue;
    std::string_view rest = v.substr(prefix.size());
    if (!rest.empty() && (rest.back() == 'a' || rest.back() == 'f')) rest.remove_suffix(1);
    ok = rest.size() >= 2 && rest.size() <= 3 && rest[0] != '0';
    for (char c : rest) ok = ok && IsDigit(c);
  }
  if (!ok) {
    return Error(Code::kInvalid, "architecture '" + arch.substr(0, 32) +
                                     "' is not of the form sm_90 or compute_90");
  }
  return Status::Ok();
}

}  // namespace gpuq::compile
