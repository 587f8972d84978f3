// gpuq-nvrtc: compiles one kernel with NVRTC inside a sandbox, then exits.
//
// Kernel source is untrusted. NVRTC opens absolute #include paths even with
// --no-source-include and echoes what it read into its log, and macros can
// build any path, so no check of the source text can keep host files out.
// This process is confined by the kernel instead, in two layers, before it
// reads its request:
//  1. Where user namespaces are allowed, it enters a new user and mount
//     namespace whose root is an empty read-only tmpfs holding only the
//     toolkit's include directory, bind-mounted read-only at its own path:
//     no other host path exists for it, so nothing can be read, and nothing
//     learnt about which paths exist.
//  2. A Landlock ruleset under which the only readable files are beneath the
//     toolkit's include directory; it cannot write, execute, connect or
//     signal anything. Where namespaces are not allowed, this layer alone
//     keeps every other file's content out.
// Wall time is bounded by the parent (which kills it), CPU time and address
// space by rlimits set here.
//
// Whatever the layers, the answer to a compile depends on its source and the
// toolkit only: a denied path and a missing one give the same NVRTC log (the
// errno NVRTC appends is dropped) and the same code, sandbox_violation when
// the path's text names a file outside the toolkit (absolute elsewhere, or
// climbing with ".."), compile_error otherwise; and __has_include is false
// for both.
//
// Before it is confined it loads NVRTC and compiles a fixed kernel, so that
// NVRTC's first-use cost is paid while the helper waits in a pool, not by a
// compile; nothing it reads before it is confined comes from the parent's
// request. Protocol: broker/compile/sandbox_io.h.
//
// Usage (by the compile service only):
//   gpuq-nvrtc MEMORY_BYTES CPU_SECONDS namespaces|landlock CUDA_INCLUDE
// Exit status 0 means a reply was written (success, compile failure, or why
// it could not confine itself).
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <malloc.h>
#include <nvrtc.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
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

// Landlock: read-only access beneath `readable`, nothing else.
Status RestrictWithLandlock(const std::vector<std::string>& readable) {
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

struct ProgramDeleter {
  void operator()(nvrtcProgram p) const { nvrtcDestroyProgram(&p); }
};
using Program = std::unique_ptr<_nvrtcProgram, ProgramDeleter>;

// Pays NVRTC's first-use cost (loading its builtins, initializing the front
// end and the code generator) on a fixed kernel, before any request, for
// `arch` (the architecture the service compiled for last: NVRTC's first
// compile for another architecture than its last still costs several
// milliseconds more), else for the newest it knows. Its outcome does not
// matter: a compile that needs what failed here fails later.
void WarmUp(const std::string& arch) {
  PreloadBuiltins();
  std::string target;
  if (CanTarget(arch)) {
    target = arch;
  } else {
    int n = 0;
    if (nvrtcGetNumSupportedArchs(&n) != NVRTC_SUCCESS || n <= 0) return;
    std::vector<int> archs(n);
    if (nvrtcGetSupportedArchs(archs.data()) != NVRTC_SUCCESS) return;
    target = "sm_" + std::to_string(archs.back());
  }
  nvrtcProgram raw = nullptr;
  if (nvrtcCreateProgram(&raw, "extern \"C\" __global__ void gpuq_warm_up(int* x) { *x = 1; }\n",
                         "warm_up.cu", 0, nullptr, nullptr) != NVRTC_SUCCESS) {
    return;
  }
  Program prog(raw);
  const std::string option = "--gpu-architecture=" + target;
  const char* opts[] = {option.c_str()};
  (void)nvrtcCompileProgram(raw, 1, opts);
}

// A helper serves one compile and exits, so memory it frees need never go
// back to the kernel: kept in the heap, the pages the warm-up faulted in
// serve the compile again (fresh pages cost a fault and zeroing each, about
// 800 per small compile). Allocations up to 32 MiB come from the heap.
void KeepFreedMemory() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
}

void SetLimit(int resource, rlim_t value) {
  struct rlimit rl = {value, value};
  setrlimit(resource, &rl);
}

bool WriteString(const std::string& path, const std::string& content) {
  Fd f(open(path.c_str(), O_WRONLY | O_CLOEXEC));
  return f.fd >= 0 && write(f.fd, content.data(), content.size()) ==
                          static_cast<ssize_t>(content.size());
}

// Creates the directories of the absolute `path` beneath `base`.
bool MakeDirsBeneath(const std::string& base, const std::string& path) {
  for (size_t slash = path.find('/', 1);; slash = path.find('/', slash + 1)) {
    if (mkdir((base + path.substr(0, slash)).c_str(), 0755) != 0 && errno != EEXIST) return false;
    if (slash == std::string::npos) return true;
  }
}

// The flags a read-only remount of the mount at `path` must keep: in a user
// namespace the kernel refuses to change the atime flags of a mount that came
// from a more privileged namespace.
unsigned long KeptFlags(const std::string& path) {
  struct statvfs st;
  unsigned long flags = 0;
  if (statvfs(path.c_str(), &st) != 0) return flags;
  if (st.f_flag & ST_NOATIME) flags |= MS_NOATIME;
  if (st.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
  if (st.f_flag & ST_RELATIME) flags |= MS_RELATIME;
  return flags;
}

// Layer 1: moves this process into a new user and mount namespace whose root
// is an empty read-only tmpfs holding only `dir` (an absolute real path),
// bind-mounted read-only at its own path. Returns false where user
// namespaces are not allowed (a container without them, a kernel or an LSM
// that refuses them); the process's view of the file system is then left as
// it was, for Landlock alone to confine.
bool EnterNamespaces(const std::string& dir) {
  const uid_t uid = getuid();
  const gid_t gid = getgid();
  if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) return false;
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // kept across unshare, but cheap to be sure
  // Our own ids, mapped to themselves (all an unprivileged process may map).
  if (!WriteString("/proc/self/setgroups", "deny") ||
      !WriteString("/proc/self/uid_map", std::to_string(uid) + " " + std::to_string(uid) + " 1") ||
      !WriteString("/proc/self/gid_map", std::to_string(gid) + " " + std::to_string(gid) + " 1")) {
    return false;
  }
  // Nothing mounted here propagates back to the host.
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return false;
  // The directory itself is the mount point of the new root (it exists by
  // definition); it is opened first, to be bind-mounted from beneath it.
  Fd source(open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (source.fd < 0) return false;
  const unsigned long kept = KeptFlags(dir);
  const unsigned long kSafe = MS_NOSUID | MS_NODEV | MS_NOEXEC;
  if (mount("tmpfs", dir.c_str(), "tmpfs", kSafe, "size=64k,mode=0755") != 0) return false;
  // From here on a failure uncovers the directory again before giving up.
  auto give_up = [&] {
    umount2(dir.c_str(), MNT_DETACH);
    return false;
  };
  const std::string inside = dir + dir;  // `dir`, as seen from the new root
  const std::string from = "/proc/self/fd/" + std::to_string(source.fd);
  // Not recursive: the tmpfs now mounted on `dir` would come along. Where
  // the toolkit's directory has mounts of its own beneath it, the kernel
  // refuses, and Landlock alone confines.
  if (!MakeDirsBeneath(dir, dir) ||
      mount(from.c_str(), inside.c_str(), nullptr, MS_BIND, nullptr) != 0) {
    return give_up();
  }
  // Read-only, as defence in depth: Landlock refuses writes in any case.
  (void)mount(nullptr, inside.c_str(), nullptr,
              MS_REMOUNT | MS_BIND | MS_RDONLY | kSafe | kept, nullptr);
  if (mount(nullptr, dir.c_str(), nullptr, MS_REMOUNT | MS_RDONLY | kSafe, nullptr) != 0) {
    return give_up();
  }
  // The tmpfs becomes the root; the old root, stacked on it by pivot_root,
  // is detached, and with it every other host path.
  if (chdir(dir.c_str()) != 0 || syscall(SYS_pivot_root, ".", ".") != 0) return give_up();
  // Should the old root stay in view, the host's paths do too: no better
  // than Landlock alone, and said so.
  if (umount2(".", MNT_DETACH) != 0) return false;
  return chdir("/") == 0;
}

// Confines this process before it reads anything from its request: layer 1
// when `namespaces` and allowed, layer 2 always, then its rlimits. Returns
// how it is confined: kReadyNamespaces or kReadyLandlock.
StatusOr<char> Confine(const std::string& cuda_include, bool namespaces, rlim_t memory,
                       rlim_t cpu) {
  const bool isolated = namespaces && EnterNamespaces(cuda_include);
  GPUQ_RETURN_IF_ERROR(RestrictWithLandlock({cuda_include}));
  // Relative includes resolve from the toolkit, not from wherever we were.
  if (chdir(cuda_include.c_str()) != 0) {
    return Error(Code::kInternal, "chdir " + cuda_include + ": " + strerror(errno));
  }
  SetLimit(RLIMIT_CORE, 0);
  SetLimit(RLIMIT_FSIZE, 0);
  if (cpu > 0) SetLimit(RLIMIT_CPU, cpu);
  // The memory bound counts the data NVRTC writes (RLIMIT_DATA: private
  // writable mappings), not address space: where a driver is installed,
  // NVRTC's warm-up loads libcuda, whose reservations of unbacked address
  // space (over 12 GB on an H200 host) would exhaust an address-space bound
  // before a compile began.
  if (memory > 0) SetLimit(RLIMIT_DATA, memory);
  return isolated ? kReadyNamespaces : kReadyLandlock;
}

// Whether an #include that could not be opened names, by its text alone, a
// file outside the toolkit's include directory: an absolute path elsewhere,
// or a relative one that climbs with "..". The answer never depends on
// whether the file exists.
bool NamesAFileOutside(const std::string& path, const std::string& cuda_include) {
  std::vector<std::string> parts;
  size_t begin = 0;
  for (size_t end; begin <= path.size(); begin = end + 1) {
    end = path.find('/', begin);
    if (end == std::string::npos) end = path.size();
    const std::string part = path.substr(begin, end - begin);
    if (part == "..") {
      if (path[0] != '/') return true;
      if (!parts.empty()) parts.pop_back();
    } else if (!part.empty() && part != ".") {
      parts.push_back(part);
    }
  }
  if (path.empty() || path[0] != '/') return false;
  std::string normal;
  for (const auto& p : parts) normal += "/" + p;
  return normal.rfind(cuda_include + "/", 0) != 0;
}

// Makes NVRTC's log the same for a path that exists but is denied and one
// that does not exist: NVRTC appends the errno's text (": Permission
// denied", ": Not a directory") to "cannot open source file" only when it is
// not ENOENT. Returns the first path named outside the toolkit, if any.
std::string NormalizeCannotOpen(std::string* log, const std::string& cuda_include) {
  // Only NVRTC's own "catastrophic error: cannot open source file" lines:
  // an #error that says the same, or a source line echoed, is the author's.
  static constexpr std::string_view kCannotOpen = "catastrophic error: cannot open source file \"";
  std::string outside;
  for (size_t at = log->find(kCannotOpen); at != std::string::npos;
       at = log->find(kCannotOpen, at + 1)) {
    const size_t line_begin = at == 0 ? 0 : log->rfind('\n', at - 1) + 1;  // npos + 1 == 0
    const size_t path_begin = at + kCannotOpen.size();
    size_t line_end = log->find('\n', path_begin);
    if (line_end == std::string::npos) line_end = log->size();
    if (!HasCatastrophicError(std::string_view(*log).substr(line_begin, line_end - line_begin),
                              "cannot open source file \"")) {
      continue;
    }
    // The path ends at the line's last quote: an errno's text has none.
    const size_t quote = log->rfind('"', line_end - 1);
    if (quote == std::string::npos || quote < path_begin) continue;
    log->erase(quote + 1, line_end - quote - 1);
    const std::string path = log->substr(path_begin, quote - path_begin);
    if (outside.empty() && NamesAFileOutside(path, cuda_include)) outside = path;
  }
  return outside;
}

CompileOutput Fail(Code code, std::string log) {
  CompileOutput o;
  o.code = code;
  o.log = std::move(log);
  return o;
}

CompileOutput Compile(const CompileRequest& c, const std::string& cuda_include) {
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
  opts.push_back("--include-path=" + cuda_include);
  // CUDA 13 keeps CCCL (libcu++, CUB, Thrust) beneath include/cccl; the
  // toolkit's own headers (cooperative_groups.h) include <cuda/std/...>.
  const std::string cccl = cuda_include + "/cccl";
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
  if (rc == NVRTC_ERROR_INVALID_OPTION) {
    // An option on gpuq's list that this NVRTC does not take: the request's.
    return Fail(Code::kInvalid, "this NVRTC refuses one of the compile options");
  }
  if (rc != NVRTC_SUCCESS && rc != NVRTC_ERROR_COMPILATION) {
    return Fail(Code::kInternal, std::string("nvrtcCompileProgram: ") + nvrtcGetErrorString(rc));
  }
  // NVRTC reports running out of memory (our rlimit) as a compile error; it
  // depends on the limit, not the source, so it must not be cached as one.
  if (rc == NVRTC_ERROR_COMPILATION && HasCatastrophicError(out.log, "out of memory")) {
    return Fail(Code::kResourceExhausted, "the compile ran out of memory at its limit:\n" + out.log);
  }
  if (rc != NVRTC_SUCCESS) {
    out.code = Code::kCompileError;
    const std::string outside = NormalizeCannotOpen(&out.log, cuda_include);
    if (!outside.empty()) {
      out.code = Code::kSandboxViolation;
      out.log += "\ngpuq: \"" + outside +
                 "\" is outside the CUDA toolkit's include directory; kernels may include "
                 "only the CUDA toolkit's headers and the headers sent with the job\n";
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
  const std::string mode = argc == 5 || argc == 6 ? argv[3] : "";
  if (mode != "namespaces" && mode != "landlock") {
    fprintf(stderr,
            "usage: gpuq-nvrtc MEMORY_BYTES CPU_SECONDS namespaces|landlock CUDA_INCLUDE "
            "[WARM_UP_ARCH] (run by gpuq only)\n");
    return 2;
  }
  const rlim_t memory = strtoull(argv[1], nullptr, 10);
  const rlim_t cpu = strtoull(argv[2], nullptr, 10);
  const std::string cuda_include = argv[4];

  KeepFreedMemory();
  WarmUp(argc == 6 ? argv[5] : "");
  StatusOr<char> confined = Confine(cuda_include, mode == "namespaces", memory, cpu);
  if (!confined.ok()) {
    std::string reply(1, kCannotConfine);
    reply += EncodeSandboxReply(Fail(confined.status().code(), confined.status().message()));
    return WriteAll(1, reply) ? 0 : 5;
  }
  if (!WriteAll(1, std::string(1, *confined))) return 5;

  // Confined: from here on everything read is untrusted.
  std::string input;
  if (!ReadAll(0, &input, 64u << 20)) return 3;
  CompileRequest request;
  Status s = DecodeSandboxRequest(input, &request);
  if (!s.ok()) {
    fprintf(stderr, "gpuq-nvrtc: %s\n", s.ToString().c_str());
    return 3;
  }
  CompileOutput out = Compile(request, cuda_include);
  TruncateLog(&out.log);
  const bool written = WriteAll(1, EncodeSandboxReply(out));
  // Done: skip NVRTC's static destructors, which the parent would wait for.
  _exit(written ? 0 : 5);
}

}  // namespace
}  // namespace gpuq::compile

int main(int argc, char** argv) { return gpuq::compile::Main(argc, argv); }
