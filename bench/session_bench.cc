// Session benchmark (PROTOCOL.md, "Sessions"): a client of the GPU's host
// and its session's process, through gpuqd with one real gpuq-worker.
//   gpuq-bench-session [--spin-us N] [--iterations N] [--session-limit-ms N]
// Prints, p50 / p99 over N after a warm-up:
//   empty: an empty kernel launched and its end known by the client;
//   saxpy: write 2 x 4 KB, launch saxpy, read 4 KB; the same as one launch
//   with buffers of its own (x in, y inout);
//   in flight: 1000 empty launches sent at once, then their answers;
// and each launch's time on the GPU (CUDA events); each for timed launches
// and for untimed ones (no events: the client learns of the end from the
// word the GPU writes). The in-process floors
// come from gpuq-bench-floor and CuPy in the same run (bench/run_gpu.sh).
#include <CLI/CLI.hpp>
#include <limits.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

#include "gpuq/client.h"

namespace {

using Clock = std::chrono::steady_clock;
using gpuq::schema::Arg;

std::string Beside(const std::string& name) {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return (std::filesystem::path(std::string(buf, n > 0 ? n : 0)).parent_path() / name).string();
}

struct Stats {
  double p50, p99, mean;
};

Stats Summarize(std::vector<double> v) {
  if (v.empty()) return {0, 0, 0};
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  return {v[v.size() / 2], v[std::min(v.size() - 1, v.size() * 99 / 100)], sum / v.size()};
}

double Us(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}

constexpr char kKernels[] = R"(
extern "C" __global__ void empty() {}
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}
extern "C" __global__ void copy(const uint4* in, uint4* out, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    out[i] = in[i];
  }
}
)";

}  // namespace

int main(int argc, char** argv) {
  int spin_us = 0, iterations = 5000;
  CLI::App app{"gpuq-bench-session"};
  app.add_option("--spin-us", spin_us,
                 "gpuqd's --spin-us (its session processes poll that long) and the client's");
  app.add_option("--iterations", iterations, "Samples per figure");
  int64_t limit_ms = -1;
  app.add_option("--session-limit-ms", limit_ms,
                 "gpuqd's --session-time-limit-ms (0: launches run without a limit, so without "
                 "the watchdog's write after each); default: gpuqd's");
  bool through = false;
  app.add_flag("--through-broker", through,
               "Every request through the broker (a session_call each), as a client of "
               "another host makes them; no attached region");
  bool fake = false;
  app.add_flag("--fake", fake,
               "The test doubles' worker and session device (no GPU): the path's own cost");
  CLI11_PARSE(app, argc, argv);

  std::string dir = std::filesystem::temp_directory_path().string() + "/gpuq-bench-XXXXXX";
  if (!mkdtemp(dir.data())) return 1;
  const std::string client_ep = "ipc://" + dir + "/c.sock";
  pid_t broker = fork();
  if (broker == 0) {
    FILE* f = freopen((dir + "/gpuqd.log").c_str(), "a", stdout);
    (void)f;
    dup2(1, 2);
    std::vector<std::string> args = {Beside("gpuqd"), "--listen", client_ep, "--worker-listen",
                                     "ipc://" + dir + "/w.sock", "--store", dir + "/jobs.db",
                                     "--cache", dir + "/k.db", "--workers", fake ? "0" : "1",
                                     "--log-level", "warn", "--spin-us", std::to_string(spin_us)};
    if (fake) {
      args.insert(args.end(), {"--session-bin", Beside("gpuq-fake-session")});
    }
    if (limit_ms >= 0) {
      args.insert(args.end(), {"--session-time-limit-ms", std::to_string(limit_ms)});
    }
    std::vector<char*> a;
    for (auto& s : args) a.push_back(s.data());
    a.push_back(nullptr);
    execv(a[0], a.data());
    _exit(127);
  }
  pid_t worker = -1;
  if (fake) {
    worker = fork();
    if (worker == 0) {
      std::vector<std::string> args = {Beside("gpuq-fake-worker"), "--broker",
                                       "ipc://" + dir + "/w.sock", "--local-dir",
                                       dir + "/jobs.db.blobs"};
      std::vector<char*> a;
      for (auto& s : args) a.push_back(s.data());
      a.push_back(nullptr);
      execv(a[0], a.data());
      _exit(127);
    }
  }
  auto cleanup = [&](int rc) {
    if (worker > 0) kill(worker, SIGKILL), waitpid(worker, nullptr, 0);
    kill(broker, SIGTERM);
    waitpid(broker, nullptr, 0);
    std::filesystem::remove_all(dir);
    return rc;
  };
  gpuq::ClientOptions o;
  o.spin = std::chrono::microseconds(spin_us);
  o.timeout = gpuq::Millis(60000);
  auto client = gpuq::Client::Connect(client_ep, o);
  if (!client.ok()) return cleanup(1);
  std::unique_ptr<gpuq::Session> s;
  for (int i = 0; i < 600 && !s; ++i) {  // until the worker has registered
    gpuq::SessionOptions so;
    so.through_broker = through;
    auto opened = (*client)->OpenSession(so);
    if (opened.ok()) {
      s = std::move(*opened);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  if (!s) {
    fprintf(stderr, "no session\n");
    return cleanup(1);
  }

  gpuq::SessionLaunch empty;
  empty.kernel.source = kKernels;
  empty.kernel.entry = "empty";
  empty.launch.grid = empty.launch.block = {1, 1, 1};
  const unsigned n = 1024;
  auto x = s->Alloc(n * 4), y = s->Alloc(n * 4);
  if (!x.ok() || !y.ok()) return cleanup(1);
  gpuq::SessionLaunch saxpy;
  saxpy.kernel.source = kKernels;
  saxpy.kernel.entry = "saxpy";
  saxpy.launch.grid = {n / 256, 1, 1};
  saxpy.launch.block = {256, 1, 1};
  saxpy.args = {Arg::F32(2.0f), Arg::Ref(*x), Arg::Ref(*y), Arg::U32(n)};
  const std::vector<float> hx(n, 1.0f), hy(n, 2.0f);
  gpuq::SessionLaunch own = saxpy;
  own.args = {Arg::F32(2.0f), Arg::In(0), Arg::InOut(1), Arg::U32(n)};
  own.inputs = {std::string_view(reinterpret_cast<const char*>(hx.data()), n * 4),
                std::string_view(reinterpret_cast<const char*>(hy.data()), n * 4)};

  // Every figure twice: launches timed (two CUDA events each, the time in
  // the answer) and untimed (no events; the client learns of the end from
  // the word the GPU writes, when it polls).
  struct Figures {
    Stats empty, gpu, saxpy, saxpy_pipe, saxpy_own, rate;
  };
  auto measure = [&](bool timed) -> std::optional<Figures> {
    empty.timed = saxpy.timed = own.timed = timed;
    Figures f;
    std::vector<double> e2e, gpu;
    for (int i = 0; i < iterations + 200; ++i) {
      auto t0 = Clock::now();
      auto ns = s->Launch(empty);
      auto t1 = Clock::now();
      if (!ns.ok()) {
        fprintf(stderr, "launch: %s\n", ns.status().ToString().c_str());
        return std::nullopt;
      }
      if (i >= 200) {
        e2e.push_back(Us(t0, t1));
        gpu.push_back(*ns / 1e3);
      }
    }
    f.empty = Summarize(e2e);
    f.gpu = Summarize(gpu);
    // Each request waited for in turn (four round trips), and the four sent
    // at once (one round trip: they run and are answered in order).
    std::vector<double> sx, sx_pipe;
    for (int i = 0; i < iterations + 200; ++i) {
      auto t0 = Clock::now();
      bool ok = s->Write(*x, 0, hx.data(), n * 4).ok() &&
                s->Write(*y, 0, hy.data(), n * 4).ok() && s->Launch(saxpy).ok();
      auto r = s->Read(*y, 0, n * 4);
      auto t1 = Clock::now();
      if (!ok || !r.ok() || (!fake && reinterpret_cast<const float*>(r->data())[7] != 4.0f)) {
        fprintf(stderr, "saxpy failed\n");
        return std::nullopt;
      }
      if (i >= 200) sx.push_back(Us(t0, t1));
    }
    for (int i = 0; i < iterations + 200; ++i) {
      auto t0 = Clock::now();
      auto w1 = s->WriteAsync(*x, 0, hx.data(), n * 4);
      auto w2 = s->WriteAsync(*y, 0, hy.data(), n * 4);
      auto l = s->LaunchAsync(saxpy);
      auto rd = s->ReadAsync(*y, 0, n * 4);
      bool ok = w1.ok() && w2.ok() && l.ok() && rd.ok() && s->Wait(*w1).ok() &&
                s->Wait(*w2).ok() && s->Wait(*l).ok();
      auto r = ok ? s->WaitRead(*rd)
                  : gpuq::StatusOr<std::string>(gpuq::Status(gpuq::Code::kInternal, ""));
      auto t1 = Clock::now();
      if (!r.ok() || (!fake && reinterpret_cast<const float*>(r->data())[7] != 4.0f)) {
        fprintf(stderr, "saxpy (pipelined) failed\n");
        return std::nullopt;
      }
      if (i >= 200) sx_pipe.push_back(Us(t0, t1));
    }
    std::vector<double> sx_own;
    std::vector<std::string> outs;
    for (int i = 0; i < iterations + 200; ++i) {
      auto t0 = Clock::now();
      auto l = s->Launch(own, &outs);
      auto t1 = Clock::now();
      if (!l.ok() || outs.size() != 1 || outs[0].size() != n * 4 ||
          (!fake && reinterpret_cast<const float*>(outs[0].data())[7] != 4.0f)) {
        fprintf(stderr, "saxpy (own buffers) failed: %s\n", l.status().ToString().c_str());
        return std::nullopt;
      }
      if (i >= 200) sx_own.push_back(Us(t0, t1));
    }
    f.saxpy = Summarize(sx);
    f.saxpy_pipe = Summarize(sx_pipe);
    f.saxpy_own = Summarize(sx_own);
    std::vector<double> rates;
    for (int round = 0; round < 7; ++round) {
      std::vector<uint64_t> tickets;
      tickets.reserve(1000);
      auto t0 = Clock::now();
      for (int i = 0; i < 1000; ++i) {
        auto t = s->LaunchAsync(empty);
        if (!t.ok()) return std::nullopt;
        tickets.push_back(*t);
      }
      for (uint64_t t : tickets) {
        if (!s->Wait(t).ok()) return std::nullopt;
      }
      auto t1 = Clock::now();
      if (round >= 2) rates.push_back(1000 / (Us(t0, t1) / 1e6));
    }
    f.rate = Summarize(rates);
    return f;
  };
  const auto timed = measure(true), untimed = measure(false);
  if (!timed || !untimed) return cleanup(1);

  printf("gpuq sessions, client on the GPU's host, %s, --spin-us %d (%s), launch run-time "
         "limit %s\n\n",
         through ? "every request through the broker" : "direct", spin_us,
         spin_us ? "both sides poll" : "threads sleep",
         limit_ms < 0 ? "gpuqd's default" : limit_ms == 0 ? "none" : "set");
  printf("| | timed launches, p50 | p99 | untimed, p50 | p99 |\n|---|---|---|---|---|\n");
  printf("| empty kernel, launch to end known by the client | %.1f µs | %.1f µs | %.1f µs | "
         "%.1f µs |\n",
         timed->empty.p50, timed->empty.p99, untimed->empty.p50, untimed->empty.p99);
  printf("| 4 KB saxpy: write 2 x 4 KB, launch, read 4 KB, each waited for | %.1f µs | %.1f µs "
         "| %.1f µs | %.1f µs |\n",
         timed->saxpy.p50, timed->saxpy.p99, untimed->saxpy.p50, untimed->saxpy.p99);
  printf("| 4 KB saxpy, the four requests sent at once | %.1f µs | %.1f µs | %.1f µs | %.1f µs "
         "|\n",
         timed->saxpy_pipe.p50, timed->saxpy_pipe.p99, untimed->saxpy_pipe.p50,
         untimed->saxpy_pipe.p99);
  printf("| 4 KB saxpy as one launch with buffers of its own (x in, y inout) | %.1f µs | %.1f µs "
         "| %.1f µs | %.1f µs |\n",
         timed->saxpy_own.p50, timed->saxpy_own.p99, untimed->saxpy_own.p50,
         untimed->saxpy_own.p99);
  printf("| 1000 empty launches in flight | %.0f launches/s | | %.0f launches/s | |\n",
         timed->rate.p50, untimed->rate.p50);
  printf("| an empty launch's time on the GPU (its events), p50 | %.1f µs | | | |\n",
         timed->gpu.p50);

  if (through) {
    (void)s->Close();
    return cleanup(0);
  }
  // N MiB in and out through a region attached to the session: its first
  // half copied to a buffer, a copy kernel, the result into its second
  // half; bytes one way over the whole, as bench e reports jobs.
  printf("\n| N MiB in and out through an attached region | attach (page-lock) | end to end p50 "
         "| GB/s each way |\n|---|---|---|---|\n");
  for (uint64_t mib : {uint64_t{64}, uint64_t{256}}) {
    const uint64_t bytes = mib << 20;
    auto region = (*client)->NewRegion(2 * bytes);
    if (!region.ok()) {
      fprintf(stderr, "region: %s\n", region.status().ToString().c_str());
      return cleanup(1);
    }
    memset((*region)->data(), 0x5a, 2 * bytes);
    auto a0 = Clock::now();
    auto h = s->Attach(**region);
    auto a1 = Clock::now();
    auto in = s->Alloc(bytes), out = s->Alloc(bytes);
    if (!h.ok() || !in.ok() || !out.ok()) {
      fprintf(stderr, "attach: %s\n", h.status().ToString().c_str());
      return cleanup(1);
    }
    gpuq::SessionLaunch copy;
    copy.kernel.source = kKernels;
    copy.kernel.entry = "copy";
    copy.launch.grid = {1024, 1, 1};
    copy.launch.block = {256, 1, 1};
    copy.args = {Arg::Ref(*in), Arg::Ref(*out), Arg::Scalar(gpuq::schema::ScalarType::kU64, bytes / 16)};
    copy.timed = false;
    std::vector<double> t;
    for (int i = 0; i < 6; ++i) {
      auto t0 = Clock::now();
      auto w = s->WriteFromAsync(*in, 0, *h, 0, bytes);
      auto l = s->LaunchAsync(copy);
      auto r = s->ReadIntoAsync(*out, 0, bytes, *h, bytes);
      bool ok = w.ok() && l.ok() && r.ok() && s->Wait(*w).ok() && s->Wait(*l).ok() &&
                s->Wait(*r).ok();
      auto t1 = Clock::now();
      if (!ok) {
        fprintf(stderr, "region copy failed\n");
        return cleanup(1);
      }
      if (i > 0) t.push_back(Us(t0, t1));
    }
    if (!fake && memcmp((*region)->data(), (*region)->data() + bytes, bytes) != 0) {
      fprintf(stderr, "region copy: the bytes differ\n");
      return cleanup(1);
    }
    const double us = Summarize(t).p50;
    printf("| %llu MiB | %.1f ms | %.0f µs | %.2f |\n", (unsigned long long)mib,
           Us(a0, a1) / 1e3, us, bytes / 1e3 / us);
    (void)s->Free(*in);
    (void)s->Free(*out);
  }
  (void)s->Close();
  return cleanup(0);
}
