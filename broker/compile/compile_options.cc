#include <cctype>
#include <regex>
#include <string_view>

#include "broker/compile/compile_request.h"

namespace gpuq::compile {
namespace {

bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

// Options that take no value.
constexpr std::string_view kFlags[] = {
    "--use_fast_math", "-use_fast_math", "--extra-device-vectorization",
    "-extra-device-vectorization", "--restrict", "-restrict", "--generate-line-info",
    "-lineinfo", "--device-as-default-execution-space", "-default-device",
    "--disable-warnings", "-w", "--device-debug", "-G", "--Wreorder", "-Wreorder",
    "--builtin-move-forward=true", "--builtin-move-forward=false",
    "--builtin-initializer-list=true", "--builtin-initializer-list=false",
    "--no-source-include", "-no-source-include",
};

// Options of the form PREFIX + value, with the values each accepts.
struct Valued {
  std::string_view prefix;
  const char* value_re;
};
constexpr Valued kValued[] = {
    {"--ftz=", "true|false"},          {"-ftz=", "true|false"},
    {"--prec-div=", "true|false"},     {"-prec-div=", "true|false"},
    {"--prec-sqrt=", "true|false"},    {"-prec-sqrt=", "true|false"},
    {"--fmad=", "true|false"},         {"-fmad=", "true|false"},
    {"--std=", "c\\+\\+(03|11|14|17|20)"}, {"-std=", "c\\+\\+(03|11|14|17|20)"},
    {"--maxrregcount=", "[0-9]{1,3}"}, {"-maxrregcount=", "[0-9]{1,3}"},
    {"--dopt=", "on|off"},             {"-dopt=", "on|off"},
    {"--diag-suppress=", "[0-9,]{1,64}"}, {"-diag-suppress=", "[0-9,]{1,64}"},
    {"--diag-error=", "[0-9,]{1,64}"}, {"--diag-warn=", "[0-9,]{1,64}"},
    // Macros: a name, optionally =value of printable characters.
    {"--define-macro=", "[A-Za-z_][A-Za-z0-9_]*(=[ -~]*)?"},
    {"-D", "[A-Za-z_][A-Za-z0-9_]*(=[ -~]*)?"},
    {"--undefine-macro=", "[A-Za-z_][A-Za-z0-9_]*"},
    {"-U", "[A-Za-z_][A-Za-z0-9_]*"},
};

}  // namespace

Status ValidateOptions(const std::vector<std::string>& options) {
  for (const std::string& o : options) {
    bool allowed = false;
    for (std::string_view f : kFlags) allowed |= o == f;
    for (const Valued& v : kValued) {
      if (allowed || !StartsWith(o, v.prefix)) continue;
      static thread_local std::vector<std::regex> compiled;
      if (compiled.empty()) {
        for (const Valued& w : kValued) compiled.emplace_back(w.value_re);
      }
      size_t i = &v - kValued;
      allowed = std::regex_match(o.begin() + v.prefix.size(), o.end(), compiled[i]);
      if (!allowed) {
        return Error(Code::kInvalid, "compile option '" + o.substr(0, 80) +
                                         "' has a value that is not allowed");
      }
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

Status ValidateArch(const std::string& arch) {
  static const std::regex kArch("(sm_[1-9][0-9]{1,2}[af]?)|(compute_[1-9][0-9]{1,2}[af]?)");
  if (!std::regex_match(arch, kArch)) {
    return Error(Code::kInvalid, "architecture '" + arch.substr(0, 32) +
                                     "' is not of the form sm_90 or compute_90");
  }
  return Status::Ok();
}

}  // namespace gpuq::compile
