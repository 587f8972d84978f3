// gpuq-nvrtc: compiles one kernel with NVRTC inside a sandbox, then exits.
//
// Kernel source is untrusted. NVRTC opens absolute #include paths even with
// --no-source-include and echoes what it read into its log, and macros can
// build any path, so no check of the source text can keep host files out.
// This process is confined by the kernel instead: after loading NVRTC and
// its builtins library it applies a Landlock ruleset under which the only
// readable files are the CUDA toolkit's headers; it cannot write, execute,
// connect or signal anything. Wall time is bounded by the parent (which kills
// it), CPU time and address space by rlimits set here.
//
// Usage (by the compile service only):
//   gpuq-nvrtc MEMORY_BYTES CPU_SECONDS  < request > reply
// Exit status 0 means a reply was written (success or compile failure).
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <nvrtc.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "broker/compile/sandbox_io.h"

namespace gpuq::compile {
namespace {

// Landlock access rights by ABI version. The system header may predate some
// of them, so they are spelled out here.
constexpr uint64_t kFsAbi1 = (1ULL << 13) - 1;        // EXECUTE .. MAKE_SYM
constexpr uint64_t kFsRefer = 1ULL << 13;              // ABI 2
constexpr uint64_t kFsTruncate = 1ULL << 14;           // ABI 3
constexpr uint64_t kFsIoctlDev = 1ULL << 15;           // ABI 5
constexpr uint64_t kNetBindTcp = 1ULL << 0;            // ABI 4
constexpr uint64_t kNetConnectTcp = 1ULL << 1;         // ABI 4
constexpr uint64_t kScopeAbstractUnix = 1ULL << 0;     // ABI 6
constexpr uint64_t kScopeSignal = 1ULL << 1;           // ABI 6
constexpr uint64_t kReadFile = 1ULL << 2;
constexpr uint64_t kReadDir = 1ULL << 3;

struct RulesetAttr {
  uint64_t handled_access_fs;
  uint64_t handled_access_net;
  uint64_t scoped;
};

struct PathBeneathAttr {
  uint64_t allowed_access;
  int32_t parent_fd;
} __attribute__((packed));

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

// Confines this process: read-only access beneath `readable`, nothing else.
Status Confine(const std::vector<std::string>& readable) {
  long abi = syscall(SYS_landlock_create_ruleset, nullptr, 0,
                     LANDLOCK_CREATE_RULESET_VERSION);
  if (abi < 1) {
    return Error(Code::kUnavailable,
                 "Landlock is not available on this kernel; refusing to compile "
                 "untrusted source without a sandbox");
  }
  RulesetAttr attr{};
  attr.handled_access_fs = kFsAbi1;
  size_t attr_size = sizeof(uint64_t);
  if (abi >= 2) attr.handled_access_fs |= kFsRefer;
  if (abi >= 3) attr.handled_access_fs |= kFsTruncate;
  if (abi >= 4) {
    attr.handled_access_net = kNetBindTcp | kNetConnectTcp;
    attr_size = 2 * sizeof(uint64_t);
  }
  if (abi >= 5) attr.handled_access_fs |= kFsIoctlDev;
  if (abi >= 6) {
    attr.scoped = kScopeAbstractUnix | kScopeSignal;
    attr_size = sizeof(RulesetAttr);
  }
  Fd ruleset(static_cast<int>(syscall(SYS_landlock_create_ruleset, &attr, attr_size, 0)));
  if (ruleset.fd < 0) {
    return Error(Code::kUnavailable,
                 std::string("landlock_create_ruleset: ") + strerror(errno));
  }
  for (const std::string& path : readable) {
    Fd dir(open(path.c_str(), O_PATH | O_CLOEXEC));
    if (dir.fd < 0) continue;  // a missing directory grants nothing
    PathBeneathAttr rule{kReadFile | kReadDir, dir.fd};
    if (syscall(SYS_landlock_add_rule, ruleset.fd, LANDLOCK_RULE_PATH_BENEATH, &rule, 0)) {
      return Error(Code::kInternal, "landlock_add_rule " + path + ": " + strerror(errno));
    }
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) {
    return Error(Code::kInternal, std::string("no_new_privs: ") + strerror(errno));
  }
  if (syscall(SYS_landlock_restrict_self, ruleset.fd, 0)) {
    return Error(Code::kInternal, std::string("landlock_restrict_self: ") + strerror(errno));
  }
  return Status::Ok();
}

// NVRTC loads libnvrtc-builtins lazily; load it now, while files can still be
// opened. A later dlopen of the same name finds it already loaded.
void PreloadBuiltins() {
  int major = 0, minor = 0;
  if (nvrtcVersion(&major, &minor) != NVRTC_SUCCESS) return;
  std::string name = "libnvrtc-builtins.so." + std::to_string(major) + "." +
                     std::to_string(minor);
  if (!dlopen(name.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    name = "libnvrtc-builtins.so." + std::to_string(major);
    (void)dlopen(name.c_str(), RTLD_NOW | RTLD_GLOBAL);
  }
}

void SetLimit(int resource, rlim_t value) {
  struct rlimit rl = {value, value};
  setrlimit(resource, &rl);
}

// After a failed compile: did the source try to open a file the sandbox
// denies? Each "cannot open source file" is retried here, still confined;
// EACCES means Landlock refused it. The file's content was never read.
std::string FindDeniedInclude(const std::string& log) {
  static const std::regex kCannotOpen("cannot open source file \"([^\"]{1,4096})\"");
  for (std::sregex_iterator it(log.begin(), log.end(), kCannotOpen), end; it != end; ++it) {
    std::string path = (*it)[1].str();
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      close(fd);
    } else if (errno == EACCES) {
      return path;
    }
  }
  return "";
}

struct ProgramDeleter {
  void operator()(nvrtcProgram p) const { nvrtcDestroyProgram(&p); }
};
using Program = std::unique_ptr<_nvrtcProgram, ProgramDeleter>;

CompileOutput Fail(Code code, std::string log) {
  CompileOutput o;
  o.code = code;
  o.log = std::move(log);
  return o;
}

CompileOutput Compile(const SandboxRequest& req) {
  const CompileRequest& c = req.compile;
  std::vector<const char*> header_src, header_names;
  for (const auto& h : c.headers) {
    header_src.push_back(h.content.c_str());
    header_names.push_back(h.name.c_str());
  }
  nvrtcProgram raw = nullptr;
  nvrtcResult rc = nvrtcCreateProgram(&raw, c.source.c_str(), c.source_name.c_str(),
                                      static_cast<int>(c.headers.size()),
                                      header_src.data(), header_names.data());
  if (rc != NVRTC_SUCCESS) {
    return Fail(Code::kCompileError,
                std::string("nvrtcCreateProgram: ") + nvrtcGetErrorString(rc));
  }
  Program prog(raw);
  for (const auto& e : c.name_expressions) {
    rc = nvrtcAddNameExpression(raw, e.c_str());
    if (rc != NVRTC_SUCCESS) {
      return Fail(Code::kCompileError, "name expression '" + e + "': " +
                                           nvrtcGetErrorString(rc));
    }
  }
  std::vector<std::string> opts = c.options;
  opts.push_back("--gpu-architecture=" + c.arch);
  opts.push_back("--include-path=" + req.cuda_include);
  // CUDA 13 keeps CCCL (libcu++, CUB, Thrust) beneath include/cccl; the
  // toolkit's own headers (cooperative_groups.h) include <cuda/std/...>.
  const std::string cccl = req.cuda_include + "/cccl";
  if (access(cccl.c_str(), F_OK) == 0) opts.push_back("--include-path=" + cccl);
  std::vector<const char*> argv;
  for (const auto& o : opts) argv.push_back(o.c_str());

  auto t0 = std::chrono::steady_clock::now();
  rc = nvrtcCompileProgram(raw, static_cast<int>(argv.size()), argv.data());
  auto t1 = std::chrono::steady_clock::now();

  CompileOutput out;
  out.nvrtc_us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(t1 - t0).count());
  size_t n = 0;
  if (nvrtcGetProgramLogSize(raw, &n) == NVRTC_SUCCESS && n > 1) {
    out.log.resize(n);
    if (nvrtcGetProgramLog(raw, out.log.data()) == NVRTC_SUCCESS) {
      out.log.resize(n - 1);  // drop the terminating NUL
    } else {
      out.log.clear();
    }
  }
  if (rc == NVRTC_ERROR_OUT_OF_MEMORY) {
    return Fail(Code::kResourceExhausted, "NVRTC ran out of memory");
  }
  if (rc != NVRTC_SUCCESS && rc != NVRTC_ERROR_COMPILATION) {
    return Fail(Code::kInternal, std::string("nvrtcCompileProgram: ") + nvrtcGetErrorString(rc));
  }
  // NVRTC reports running out of memory (our rlimit) as a compile error; it
  // depends on the limit, not the source, so it must not be cached as one.
  if (rc == NVRTC_ERROR_COMPILATION &&
      out.log.find("catastrophic error: out of memory") != std::string::npos) {
    return Fail(Code::kResourceExhausted, "the compile ran out of memory at its limit:\n" + out.log);
  }
  if (rc != NVRTC_SUCCESS) {
    out.code = Code::kCompileError;
    std::string denied = FindDeniedInclude(out.log);
    if (!denied.empty()) {
      out.code = Code::kSandboxViolation;
      out.log += "\ngpuq: the source tried to read \"" + denied +
                 "\"; kernels may include only the CUDA toolkit's headers and the "
                 "headers sent with the job\n";
    }
    if (out.log.empty()) out.log = nvrtcGetErrorString(rc);
    return out;
  }
  if (nvrtcGetPTXSize(raw, &n) == NVRTC_SUCCESS && n > 0) {
    out.ptx.resize(n);
    if (nvrtcGetPTX(raw, out.ptx.data()) != NVRTC_SUCCESS) out.ptx.clear();
    if (!out.ptx.empty() && out.ptx.back() == '\0') out.ptx.pop_back();
  }
  if (c.arch.rfind("sm_", 0) == 0 && nvrtcGetCUBINSize(raw, &n) == NVRTC_SUCCESS && n > 0) {
    out.cubin.resize(n);
    if (nvrtcGetCUBIN(raw, out.cubin.data()) != NVRTC_SUCCESS) out.cubin.clear();
  }
  for (const auto& e : c.name_expressions) {
    const char* lowered = nullptr;
    if (nvrtcGetLoweredName(raw, e.c_str(), &lowered) != NVRTC_SUCCESS || !lowered) {
      return Fail(Code::kCompileError, "no lowered name for '" + e + "'");
    }
    out.lowered.push_back({e, lowered});
  }
  out.ok = true;
  return out;
}

bool ReadAll(int fd, std::string* out, size_t max) {
  char buf[1 << 16];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n == 0) return true;
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (out->size() + n > max) return false;
    out->append(buf, n);
  }
}

bool WriteAll(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = write(fd, s.data() + off, s.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += n;
  }
  return true;
}

int Main(int argc, char** argv) {
  // Nothing inherited beyond the three pipes stays open.
  syscall(SYS_close_range, 3, ~0U, 0);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (argc != 3) {
    fprintf(stderr, "usage: gpuq-nvrtc MEMORY_BYTES CPU_SECONDS (run by gpuq only)\n");
    return 2;
  }
  const rlim_t memory = strtoull(argv[1], nullptr, 10);
  const rlim_t cpu = strtoull(argv[2], nullptr, 10);

  std::string input;
  if (!ReadAll(0, &input, 64u << 20)) return 3;
  SandboxRequest req;
  Status s = DecodeSandboxRequest(input, &req);
  if (!s.ok()) {
    fprintf(stderr, "gpuq-nvrtc: %s\n", s.ToString().c_str());
    return 3;
  }

  PreloadBuiltins();
  if (chdir("/") != 0) return 4;
  SetLimit(RLIMIT_CORE, 0);
  SetLimit(RLIMIT_FSIZE, 0);
  if (cpu > 0) SetLimit(RLIMIT_CPU, cpu);
  if (memory > 0) SetLimit(RLIMIT_AS, memory);

  s = Confine({req.cuda_include});
  CompileOutput out = s.ok() ? Compile(req) : Fail(s.code(), s.message());
  return WriteAll(1, EncodeSandboxReply(out)) ? 0 : 5;
}

}  // namespace
}  // namespace gpuq::compile

int main(int argc, char** argv) { return gpuq::compile::Main(argc, argv); }
