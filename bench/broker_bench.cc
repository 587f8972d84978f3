// Broker benchmark: submit -> result latency and jobs/s through gpuqd, with
// the worker test double (gpuq-fake-worker: it answers each job at once and
// runs nothing on a GPU), beside a bare ZeroMQ round trip measured in the
// same run. What it measures is the broker's own cost: two hops, the durable
// store, scheduling; not GPU work.
//   gpuq-bench-broker [--seconds S] [--durability process|power]
#include <CLI/CLI.hpp>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <array>
#include <fstream>
#include <thread>
#include <nlohmann/json.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "gpuq/client.h"

namespace {

using Clock = std::chrono::steady_clock;
using gpuq::Client;
using gpuq::JobRequest;
using gpuq::Millis;
using gpuq::Region;

std::string Beside(const std::string& name) {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return (std::filesystem::path(std::string(buf, n > 0 ? n : 0)).parent_path() / name).string();
}

// With --pin: the CPUs gpuqd runs on (the last one) and the rest (this
// program, its clients and the workers), so that on a machine of few cores
// the loop's CPU time per job is not its share of a core fought over.
cpu_set_t g_broker_cpus, g_other_cpus;
bool g_pin = false;

void PinCpus() {
  const int n = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  CPU_ZERO(&g_broker_cpus);
  CPU_ZERO(&g_other_cpus);
  CPU_SET(n - 1, &g_broker_cpus);
  for (int c = 0; c < std::max(1, n - 1); ++c) CPU_SET(c, &g_other_cpus);
  sched_setaffinity(0, sizeof g_other_cpus, &g_other_cpus);
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  pid_t pid = fork();
  if (pid == 0) {
    if (g_pin && argv[0].ends_with("/gpuqd")) {
      sched_setaffinity(0, sizeof g_broker_cpus, &g_broker_cpus);
    }
    FILE* f = freopen(log.c_str(), "a", stdout);
    (void)f;
    dup2(1, 2);
    std::vector<char*> a;
    for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execv(a[0], a.data());
    _exit(127);
  }
  return pid;
}

struct Stats {
  double p50, p99, mean;
};

// Time thread `tid` of process `pid` has run on a CPU (ns; its schedstat).
uint64_t ThreadCpuNs(pid_t pid, pid_t tid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/schedstat");
  uint64_t ns = 0;
  f >> ns;
  return ns;
}

// The same for every thread of process `pid`.
uint64_t ProcessCpuNs(pid_t pid) {
  uint64_t ns = 0;
  std::error_code ec;
  for (const auto& t :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    ns += ThreadCpuNs(pid, static_cast<pid_t>(std::stoi(t.path().filename().string())));
  }
  return ns;
}

Stats Summarize(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  double sum = 0;
  for (double u : us) sum += u;
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)], sum / us.size()};
}

// Floor: a 64-byte DEALER -> ROUTER -> DEALER round trip over ipc, echoed by
// a thread of this process.
// A bare DEALER -> ROUTER -> DEALER echo of `bytes` over ipc, n times after
// a warm-up.
Stats ZmqRoundTrip(const std::string& dir, int n, size_t bytes = 64, int warm = 100) {
  zmq::context_t ctx;
  zmq::socket_t router(ctx, zmq::socket_type::router);
  router.bind("ipc://" + dir + "/echo.sock");
  std::atomic<bool> stop{false};
  std::thread echo([&] {
    while (!stop) {
      zmq::pollitem_t it = {router.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&it, 1, std::chrono::milliseconds(50));
      std::vector<zmq::message_t> m;
      if (it.revents && zmq::recv_multipart(router, std::back_inserter(m))) {
        zmq::send_multipart(router, m);
      }
    }
  });
  zmq::socket_t dealer(ctx, zmq::socket_type::dealer);
  dealer.connect("ipc://" + dir + "/echo.sock");
  std::string payload(bytes, 'x');
  std::vector<double> us;
  for (int i = 0; i < n + warm; ++i) {
    auto t0 = Clock::now();
    dealer.send(zmq::buffer(payload));
    zmq::message_t r;
    (void)dealer.recv(r);
    if (i >= warm) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  stop = true;
  echo.join();
  return Summarize(us);
}

uint64_t g_spin_cycles = 0;
std::string g_job = "empty";  // or "saxpy4k"
const std::vector<float> g_x(1024, 1.0f), g_y(1024, 2.0f);

// An empty kernel, or (--spin-cycles) one block that spins on the GPU for
// that many clock cycles, so that GPU time, not the broker, bounds a run.
JobRequest Trivial() {
  if (g_job == "saxpy4k") {
    // Two 4 KB inputs, one 4 KB output.
    JobRequest j;
    j.spec.kernel.source =
        "extern \"C\" __global__ void saxpy(float a, const float* x, const float* y,\n"
        "                                   float* out, unsigned n) {\n"
        "  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  if (i < n) out[i] = a * x[i] + y[i];\n}\n";
    j.spec.kernel.entry = "saxpy";
    j.spec.launch.grid = {4, 1, 1};
    j.spec.launch.block = {256, 1, 1};
    j.spec.args = {gpuq::schema::Arg::F32(2.0f), gpuq::schema::Arg::In(0),
                   gpuq::schema::Arg::In(1), gpuq::schema::Arg::Out(4096),
                   gpuq::schema::Arg::U32(1024)};
    j.inputs = {std::string_view(reinterpret_cast<const char*>(g_x.data()), 4096),
                std::string_view(reinterpret_cast<const char*>(g_y.data()), 4096)};
    return j;
  }
  JobRequest j;
  j.spec.kernel.source =
      "extern \"C\" __global__ void empty(unsigned long long cycles) {\n"
      "  unsigned long long t0 = clock64(); while (clock64() - t0 < cycles) {}\n}\n";
  j.spec.kernel.entry = "empty";
  j.spec.args = {gpuq::schema::Arg::Scalar(gpuq::schema::ScalarType::kU64, g_spin_cycles)};
  return j;
}

// A job of `n` launches of the empty kernel (one source), as a graph or not.
JobRequest EmptyLaunches(int n, bool graph) {
  JobRequest j;
  j.spec.kernel.source = "extern \"C\" __global__ void empty() {}\n";
  gpuq::schema::KernelLaunch l;
  l.entry = "empty";
  j.spec.launches.assign(n, l);
  j.spec.graph = graph;
  return j;
}

constexpr char kChainSource[] =
    "extern \"C\" __global__ void axpb(float* y, float a, float b, unsigned n) {\n"
    "  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  if (i < n) y[i] = a * y[i] + b;\n}\n";

// Step k of the chain over a 4 KB buffer, as a job of its own (the buffer
// in and out).
JobRequest ChainStep(std::string_view y, int k) {
  JobRequest j;
  j.spec.kernel.source = kChainSource;
  j.spec.kernel.entry = "axpb";
  j.spec.launch.grid = {4, 1, 1};
  j.spec.launch.block = {256, 1, 1};
  j.spec.args = {gpuq::schema::Arg::InOut(0), gpuq::schema::Arg::F32(1.0f + 0.01f * k),
                 gpuq::schema::Arg::F32(0.5f), gpuq::schema::Arg::U32(1024)};
  j.inputs = {y};
  return j;
}

// The ten steps as one job of ten launches.
JobRequest Chain(std::string_view y, bool graph) {
  JobRequest j;
  j.spec.kernel.source = kChainSource;
  j.spec.buffers = {gpuq::schema::Arg::InOut(0)};
  for (int k = 0; k < 10; ++k) {
    gpuq::schema::KernelLaunch l;
    l.entry = "axpb";
    l.launch.grid = {4, 1, 1};
    l.launch.block = {256, 1, 1};
    l.args = {gpuq::schema::Arg::Ref(0), gpuq::schema::Arg::F32(1.0f + 0.01f * k),
              gpuq::schema::Arg::F32(0.5f), gpuq::schema::Arg::U32(1024)};
    j.spec.launches.push_back(l);
  }
  j.spec.graph = graph;
  j.inputs = {y};
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 3;
  bool gpu = false;
  int gpus = 1;
  std::string durability = "process";
  CLI::App app{"gpuq-bench-broker"};
  app.add_option("--seconds", seconds, "Duration of each throughput run");
  app.add_option("--durability", durability)->check(CLI::IsMember({"process", "power"}));
  app.add_flag("--gpu", gpu, "Use real gpuq-workers instead of the test double");
  app.add_option("--gpus", gpus, "GPUs to use (one worker process each; without --gpu, test doubles)");
  int worker_slots = 256, worker_streams = 8;
  app.add_option("--worker-slots", worker_slots, "With --gpu: each worker's --slots");
  app.add_option("--worker-streams", worker_streams, "With --gpu: each worker's --streams");
  app.add_option("--spin-cycles", g_spin_cycles, "GPU clock cycles each job spins (0: none)");
  app.add_option("--job", g_job,
                 "empty: an empty kernel; saxpy4k: 2 x 4 KB in, 4 KB out; launches: jobs of "
                 "several launches (100 empty launches, a 10-step chain); shares: two weighted tenants' "
                 "GPU time")
      ->check(CLI::IsMember({"empty", "saxpy4k", "launches", "shares"}));
  uint64_t buffer_mib = 0;
  app.add_option("--buffer-mib", buffer_mib,
                 "Instead: jobs with one input and one output of this many MiB; GB/s");
  int spin_us = 0;
  app.add_option("--spin-us", spin_us,
                 "gpuqd's and gpuq-worker's --spin-us (poll without sleeping after a message)");
  int client_spin_us = 0;
  app.add_option("--client-spin-us", client_spin_us,
                 "The one-in-flight client's ClientOptions::spin");
  app.add_flag("--pin", g_pin,
               "Run gpuqd on the last CPU and everything else on the others (for machines of "
               "few cores)");
  CLI11_PARSE(app, argc, argv);
  if (g_pin) PinCpus();

  std::string dir = std::filesystem::temp_directory_path().string() + "/gpuq-bench-XXXXXX";
  if (!mkdtemp(dir.data())) return 1;
  const std::string client_ep = "ipc://" + dir + "/c.sock", worker_ep = "ipc://" + dir + "/w.sock";
  std::vector<std::string> broker_argv = {
      Beside("gpuqd"), "--listen", client_ep, "--worker-listen", worker_ep, "--store",
      dir + "/jobs.db", "--cache", dir + "/k.db", "--workers", "0", "--durability", durability,
      "--log-level", "warn", "--max-queued", "1000000", "--max-queued-per-tenant", "1000000",
      "--spin-us", std::to_string(spin_us)};
  if (g_job == "shares") {
    // Two tenants, weights 3 and 1 (docs/OPERATIONS.md, "Tenants").
    std::ofstream(dir + "/tenants.json")
        << R"({"tenants": {"heavy": {"weight": 3}, "light": {"weight": 1}}})";
    broker_argv.insert(broker_argv.end(), {"--tenants", dir + "/tenants.json"});
  }
  pid_t broker = Spawn(broker_argv, dir + "/gpuqd.log");
  std::vector<pid_t> workers;
  for (int g = 0; g < gpus; ++g) {
    // On the broker's host, as gpuqd's own workers: with its local directory.
    const std::string local_dir = dir + "/jobs.db.blobs";
    workers.push_back(gpu ? Spawn({Beside("gpuq-worker"), "--broker", worker_ep, "--device",
                                   std::to_string(g), "--slots", std::to_string(worker_slots), "--streams",
                                   std::to_string(worker_streams),
                                   "--spin-us", std::to_string(spin_us), "--local-dir",
                                   local_dir},
                                  dir + "/worker.log")
                          : Spawn({Beside("gpuq-fake-worker"), "--broker", worker_ep, "--slots",
                                   "1024", "--local-dir", local_dir},
                                  dir + "/worker.log"));
  }
  auto cleanup = [&] {
    for (pid_t w : workers) kill(w, SIGKILL);
    kill(broker, SIGKILL);
    for (pid_t w : workers) waitpid(w, nullptr, 0);
    waitpid(broker, nullptr, 0);
    std::filesystem::remove_all(dir);
  };
  gpuq::ClientOptions client_options;
  client_options.spin = std::chrono::microseconds(client_spin_us);
  auto client = Client::Connect(client_ep, client_options);
  if (!client.ok()) return cleanup(), 1;
  for (int i = 0; i < 500; ++i) {  // wait for the workers; warm the kernel cache
    auto d = (*client)->Devices();
    if (d.ok() && d->size() == workers.size()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  auto warm = (*client)->Submit(Trivial());
  if (!warm.ok() || !(*client)->Wait(*warm).ok()) {
    fprintf(stderr, "warm-up failed: %s\n",
            warm.ok() ? (*client)->Wait(*warm).status().ToString().c_str()
                      : warm.status().ToString().c_str());
    return cleanup(), 1;
  }

  if (g_job == "shares") {
    // Both tenants backlogged: heavy's jobs spin about 1 ms on the GPU,
    // light's about 2 ms. GPU time (a job's dispatch to its result) should
    // divide 3:1 while both have jobs queued; round robin would give light
    // two thirds. Meant for --gpu with --worker-slots equal to
    // --worker-streams, so that a job's time held is its time running.
    const uint64_t cycles_1ms = gpu ? 1500000 : 0;
    auto spin_job = [&](const char* tenant, uint64_t cycles) {
      JobRequest j;
      j.spec.tenant = tenant;
      j.spec.kernel.source =
          "extern \"C\" __global__ void spin(unsigned long long cycles) {\n"
          "  unsigned long long t0 = clock64(); while (clock64() - t0 < cycles) {}\n}\n";
      j.spec.kernel.entry = "spin";
      j.spec.args = {gpuq::schema::Arg::Scalar(gpuq::schema::ScalarType::kU64, cycles)};
      return j;
    };
    const int heavy_jobs = 3000, light_jobs = 1500;
    for (int i = 0; i < std::max(heavy_jobs, light_jobs); ++i) {
      if (i < heavy_jobs && !(*client)->SubmitAsync(spin_job("heavy", cycles_1ms)).ok()) {
        return cleanup(), 1;
      }
      if (i < light_jobs && !(*client)->SubmitAsync(spin_job("light", 2 * cycles_1ms)).ok()) {
        return cleanup(), 1;
      }
    }
    // Job ids are issued in submit order: heavy, light, heavy, light, ...,
    // then heavy's alone; the warm-up job took id 1.
    const uint64_t pairs = std::min(heavy_jobs, light_jobs);
    auto heavy_id = [&](uint64_t id) {
      const uint64_t k = id - 2;
      return k >= 2 * pairs || k % 2 == 0;
    };
    struct Ended {
      bool heavy;
      double start_us, held_us;  // dispatch (after acceptance), dispatch to result
    };
    std::vector<Ended> ended;
    while (ended.size() < static_cast<size_t>(heavy_jobs + light_jobs)) {
      auto e = (*client)->Poll(Millis(60000));
      if (!e.ok()) return cleanup(), 1;
      if (e->kind != Client::Event::kResult) continue;
      const auto& t = e->result.timing;
      ended.push_back({heavy_id(e->result.id), static_cast<double>(t.queue_us),
                       static_cast<double>(t.total_us - t.queue_us)});
    }
    // The window: while both were backlogged, until the first tenant's
    // last job started (all were accepted within a few ms of each other).
    double last[2] = {0, 0};
    for (const Ended& x : ended) last[x.heavy] = std::max(last[x.heavy], x.start_us);
    const double window = std::min(last[0], last[1]);
    double held[2] = {0, 0};
    int count[2] = {0, 0};
    for (const Ended& x : ended) {
      if (x.start_us > window) continue;
      held[x.heavy] += x.held_us;
      ++count[x.heavy];
    }
    const double total = held[0] + held[1];
    printf("gpuq weighted fair share (%s): two tenants backlogged, heavy weight 3 with ~1 ms "
           "jobs, light weight 1 with ~2 ms jobs\n\n",
           gpu ? "real gpuq-worker" : "test-double worker");
    printf("| tenant | weight | jobs started in the window | GPU time held | share | "
           "weight's share |\n|---|---|---|---|---|---|\n");
    printf("| heavy | 3 | %d | %.3f s | %.1f%% | 75%% |\n", count[1], held[1] / 1e6,
           100 * held[1] / total);
    printf("| light | 1 | %d | %.3f s | %.1f%% | 25%% |\n", count[0], held[0] / 1e6,
           100 * held[0] / total);
    printf("\nwindow: the first %.0f ms, while both had jobs queued\n", window / 1e3);
    cleanup();
    return 0;
  }

  if (g_job == "launches") {
    // Jobs of several launches, one in flight: end to end, and the GPU's
    // span of the launches (CUDA events); then a 10-step chain over 4 KB as
    // one job and as 10 jobs.
    std::vector<double> inside;  // the broker's accept -> result stored, of the last run
    std::vector<double> acked;   // submit -> its acknowledgement (the row committed), likewise
    std::vector<double> load, h2d, d2h;  // the worker's phases, of the last run
    auto run = [&](const JobRequest& j, int reps, std::vector<double>* e2e,
                   std::vector<double>* span, std::string* out) -> bool {
      inside.clear();
      acked.clear();
      load.clear();
      h2d.clear();
      d2h.clear();
      for (int i = 0; i < reps + 20; ++i) {
        auto t0 = Clock::now();
        auto id = (*client)->Submit(j);
        if (!id.ok()) return false;
        const auto t_acked = Clock::now();
        auto r = (*client)->Wait(*id, Millis(60000));
        if (!r.ok() || !r->ok()) {
          fprintf(stderr, "launches job failed: %s\n",
                  r.ok() ? r->error.c_str() : r.status().ToString().c_str());
          return false;
        }
        if (out && r->Output(0)) *out = r->Output(0)->str();
        if (i < 20) continue;
        e2e->push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        if (span) span->push_back(static_cast<double>(r->timing.kernel_us));
        inside.push_back(static_cast<double>(r->timing.total_us));
        acked.push_back(std::chrono::duration<double, std::micro>(t_acked - t0).count());
        load.push_back(static_cast<double>(r->timing.load_us));
        h2d.push_back(static_cast<double>(r->timing.h2d_us));
        d2h.push_back(static_cast<double>(r->timing.d2h_us));
      }
      return true;
    };
    printf("gpuq jobs of several launches (%s)\n\n",
           gpu ? "real gpuq-worker" : "test-double worker, no GPU work");
    printf("| job, 1 in flight | end to end p50 | submit acknowledged p50 | inside the broker p50 | "
           "GPU span of the launches p50 | per launch, from end to end (100 vs 1) | per launch, "
           "GPU span |\n"
           "|---|---|---|---|---|---|---|\n");
    {
      JobRequest one;
      one.spec.kernel.source = "extern \"C\" __global__ void empty() {}\n";
      one.spec.kernel.entry = "empty";
      std::vector<double> e, sp;
      if (!run(one, 300, &e, &sp, nullptr)) return cleanup(), 1;
      printf("| an empty kernel as a job of one launch | %.1f us | %.1f us | %.1f us | %.1f us | | |\n",
             Summarize(e).p50, Summarize(acked).p50, Summarize(inside).p50, Summarize(sp).p50);
    }
    std::string phases;
    for (bool graph : {false, true}) {
      std::vector<double> e1, s1, e100, s100;
      if (!run(EmptyLaunches(1, graph), 300, &e1, &s1, nullptr)) return cleanup(), 1;
      const double in1 = Summarize(inside).p50, ack1 = Summarize(acked).p50;
      if (!run(EmptyLaunches(100, graph), 300, &e100, &s100, nullptr)) return cleanup(), 1;
      const Stats a = Summarize(e1), b = Summarize(e100), sa = Summarize(s1),
                  sb = Summarize(s100);
      printf("| 1 empty launch%s | %.1f us | %.1f us | %.1f us | %.1f us | | |\n",
             graph ? ", graph" : "", a.p50, ack1, in1, sa.p50);
      printf("| 100 empty launches%s | %.1f us | %.1f us | %.1f us | %.1f us | %.2f us | %.2f us |\n",
             graph ? ", graph" : "", b.p50, Summarize(acked).p50, Summarize(inside).p50, sb.p50,
             (b.p50 - a.p50) / 99.0, sb.p50 / 100.0);
      phases += "100 empty launches" + std::string(graph ? ", graph" : "") +
                ": worker load p50 " + std::to_string(Summarize(load).p50) + " us, h2d " +
                std::to_string(Summarize(h2d).p50) + " us, d2h " +
                std::to_string(Summarize(d2h).p50) + " us\n";
    }
    printf("\n%s", phases.c_str());
    std::vector<float> y0(1024, 1.0f);
    const std::string_view y(reinterpret_cast<const char*>(y0.data()), 4096);
    std::vector<double> ten_jobs, one_job, one_graph;
    std::string by_jobs, by_launches, by_graph;
    for (int i = 0; i < 220; ++i) {
      auto t0 = Clock::now();
      std::string cur(y);
      for (int k = 0; k < 10; ++k) {
        auto id = (*client)->Submit(ChainStep(cur, k));
        if (!id.ok()) return cleanup(), 1;
        auto r = (*client)->Wait(*id, Millis(60000));
        if (!r.ok() || !r->ok() || !r->Output(0)) return cleanup(), 1;
        cur = r->Output(0)->str();
      }
      if (i >= 20) {
        ten_jobs.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      }
      by_jobs = cur;
    }
    if (!run(Chain(y, false), 200, &one_job, nullptr, &by_launches) ||
        !run(Chain(y, true), 200, &one_graph, nullptr, &by_graph)) {
      return cleanup(), 1;
    }
    const Stats tj = Summarize(ten_jobs), oj = Summarize(one_job), og = Summarize(one_graph);
    printf("\n| 10-step chain over 4 KB, 1 in flight | end to end p50 | p99 | vs 10 jobs |\n"
           "|---|---|---|---|\n");
    printf("| 10 jobs of one launch, each waiting for the last | %.1f us | %.1f us | 1.00x |\n",
           tj.p50, tj.p99);
    printf("| 1 job of 10 launches | %.1f us | %.1f us | %.2fx faster |\n", oj.p50, oj.p99,
           tj.p50 / oj.p50);
    printf("| 1 job of 10 launches, graph | %.1f us | %.1f us | %.2fx faster |\n", og.p50,
           og.p99, tj.p50 / og.p50);
    if (gpu) {
      printf("\nthe three ways' results are %s\n",
             by_jobs == by_launches && by_launches == by_graph ? "the same bytes"
                                                               : "NOT the same bytes");
    }
    cleanup();
    return 0;
  }

  if (buffer_mib > 0) {
    // Large buffers: a copy kernel with N MiB in and N MiB out, end to end.
    const uint64_t bytes = buffer_mib << 20;
    std::string input(bytes, '\x5a');
    JobRequest j;
    j.spec.kernel.source =
        "extern \"C\" __global__ void copy(const uint4* in, uint4* out, unsigned long long n) {\n"
        "  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;\n"
        "       i < n; i += (unsigned long long)gridDim.x * blockDim.x) out[i] = in[i];\n}\n";
    j.spec.kernel.entry = "copy";
    j.spec.launch.grid = {1024, 1, 1};
    j.spec.launch.block = {256, 1, 1};
    j.spec.args = {gpuq::schema::Arg::In(0), gpuq::schema::Arg::Out(bytes),
                   gpuq::schema::Arg::Scalar(gpuq::schema::ScalarType::kU64, bytes / 16)};
    j.inputs = {input};
    // Two ways: local buffers (files of the broker's local directory, the
    // default for a client on an ipc endpoint), and every byte through the
    // sockets.
    gpuq::ClientOptions sockets_only;
    sockets_only.local_buffers = false;
    auto socket_client = Client::Connect(client_ep, sockets_only);
    if (!socket_client.ok()) return cleanup(), 1;
    struct Way {
      const char* name;
      Client* client;
      std::vector<double> total, h2d, d2h, broker;
    } ways[] = {{"local files", client->get(), {}, {}, {}, {}},
                {"sockets", socket_client->get(), {}, {}, {}, {}}};
    for (Way& way : ways) {
    std::vector<double>& total = way.total;
    std::vector<double>& h2d = way.h2d;
    std::vector<double>& d2h = way.d2h;
    for (int i = 0; i < 6; ++i) {
      // The local way fills an InputBuffer (a mapped file of the broker's
      // local directory) where the other fills a string: before the clock.
      std::unique_ptr<gpuq::InputBuffer> buf;
      j.inputs = {input};
      if (way.client == client->get()) {
        auto b = way.client->NewInput(bytes);
        if (!b.ok()) return cleanup(), 1;
        buf = std::move(*b);
        memset(buf->data(), 0x5a, bytes);
        j.inputs = {buf->view()};
      }
      auto t0 = Clock::now();
      auto id = way.client->Submit(j);
      if (!id.ok()) return cleanup(), 1;
      auto r = way.client->Wait(*id, Millis(60000));
      // The test double does not run the kernel: check the bytes on a GPU only.
      if (!r.ok() || !r->ok() || r->Output(1)->size() != bytes ||
          (gpu && (*r->Output(1))[bytes - 1] != '\x5a')) {
        fprintf(stderr, "large job failed: %s\n",
                !r.ok() ? r.status().ToString().c_str()
                        : !r->ok() ? r->error.c_str() : "wrong output");
        return cleanup(), 1;
      }
      if (i == 0) continue;  // warm-up
      total.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      h2d.push_back(r->timing.h2d_us / 1e6);
      d2h.push_back(r->timing.d2h_us / 1e6);
      way.broker.push_back(r->timing.total_us / 1e6);
    }
    }
    // A registered region (PROTOCOL.md, "Regions"): the input and the output
    // are ranges of one region of the client's memory, registered once; the
    // worker copies from and to it page-locked, and nothing else moves.
    const auto reg0 = Clock::now();
    auto region = (*client)->NewRegion(2 * bytes);
    const double register_ms = std::chrono::duration<double, std::milli>(Clock::now() - reg0).count();
    if (!region.ok()) {
      fprintf(stderr, "region: %s\n", region.status().ToString().c_str());
      return cleanup(), 1;
    }
    Region& rg = **region;
    memset(rg.data(), 0x5a, bytes);
    JobRequest rj = j;
    rj.inputs = {};
    rj.spec.args = {rg.In(0, bytes), rg.Out(bytes, bytes), j.spec.args[2]};
    Way in_region{"a registered region", client->get(), {}, {}, {}, {}};
    double first_job_s = 0;
    std::vector<std::array<uint64_t, 7>> phases;  // one region job's time, where it went
    for (int i = 0; i < 6; ++i) {
      rg.data()[2 * bytes - 1] = 0;
      auto t0 = Clock::now();
      auto id = (*client)->Submit(rj);
      if (!id.ok()) return cleanup(), 1;
      auto r = (*client)->Wait(*id, Millis(60000));
      if (!r.ok() || !r->ok() || (gpu && rg.data()[2 * bytes - 1] != '\x5a')) {
        fprintf(stderr, "region job failed: %s\n",
                !r.ok() ? r.status().ToString().c_str()
                        : !r->ok() ? r->error.c_str() : "wrong output");
        return cleanup(), 1;
      }
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      if (i == 0) {
        first_job_s = s;  // includes waiting for the worker to lock the region
        continue;
      }
      in_region.total.push_back(s);
      phases.push_back({r->timing.queue_us, r->timing.load_us, r->timing.h2d_us,
                        r->timing.kernel_us, r->timing.d2h_us, r->timing.total_us,
                        static_cast<uint64_t>(s * 1e6)});
      in_region.h2d.push_back(r->timing.h2d_us / 1e6);
      in_region.d2h.push_back(r->timing.d2h_us / 1e6);
      in_region.broker.push_back(r->timing.total_us / 1e6);
    }
    // What the worker's locking cost, as its log says.
    std::string lock_ms = "?";
    {
      std::ifstream log(dir + "/worker.log");
      std::string line;
      while (std::getline(log, line)) {
        auto at = line.find("page-locked in ");
        if (at != std::string::npos) lock_ms = line.substr(at + 15);
      }
    }
    // The floor of the socket path: one bare ZeroMQ hop carrying the same
    // bytes there and back (gpuq's path has two hops, and the store).
    const Stats zmq_hop = ZmqRoundTrip(dir, 5, bytes, 1);
    const double gb = bytes / 1e9;
    printf("| %llu MiB in + %llu MiB out, client on the same host | end to end (p50 of 5) | "
           "GB/s each way | of which accept -> result stored | worker h2d, d2h GB/s |\n"
           "|---|---|---|---|---|\n",
           (unsigned long long)buffer_mib, (unsigned long long)buffer_mib);
    std::vector<Way*> rows = {&ways[0], &ways[1], &in_region};
    for (Way* wp : rows) {
      Way& way = *wp;
      std::sort(way.total.begin(), way.total.end());
      std::sort(way.h2d.begin(), way.h2d.end());
      std::sort(way.d2h.begin(), way.d2h.end());
      const double t = way.total[way.total.size() / 2];
      std::sort(way.broker.begin(), way.broker.end());
      printf("| gpuq, %s | %.3f s | %.2f | %.3f s | %.2f, %.2f |\n", way.name, t, gb / t,
             way.broker[way.broker.size() / 2], gb / way.h2d[way.h2d.size() / 2],
             gb / way.d2h[way.d2h.size() / 2]);
    }
    printf("| floor: one bare ZeroMQ ipc hop there and back | %.3f s | %.2f | | |\n",
           zmq_hop.p50 / 1e6, gb / (zmq_hop.p50 / 1e6));
    if (!phases.empty()) {
      std::sort(phases.begin(), phases.end(),
                [](const auto& a, const auto& b) { return a[6] < b[6]; });
      const auto& m = phases[phases.size() / 2];
      printf("\nthe median region job, us: queue %llu, load %llu, h2d %llu, kernel %llu, d2h "
             "%llu; accept -> stored %llu; end to end %llu\n",
             (unsigned long long)m[0], (unsigned long long)m[1], (unsigned long long)m[2],
             (unsigned long long)m[3], (unsigned long long)m[4], (unsigned long long)m[5],
             (unsigned long long)m[6]);
    }
    printf("\nregion of %llu MiB: registered in %.2f ms (the client's call); the worker locked "
           "it in %s; the first job after registering took %.3f s\n",
           2 * (unsigned long long)buffer_mib, register_ms, lock_ms.c_str(), first_job_s);
    cleanup();
    return 0;
  }

  const Stats floor = ZmqRoundTrip(dir, 5000);

  // One job in flight: submit -> pushed result.
  std::vector<double> rtt, broker_total, queue;
  for (int i = 0; i < 2000; ++i) {
    auto t0 = Clock::now();
    auto id = (*client)->SubmitAsync(Trivial());
    for (;;) {
      auto e = (*client)->Poll(Millis(5000));
      if (!e.ok()) return cleanup(), 1;
      if (e->kind == Client::Event::kResult) {
        rtt.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        broker_total.push_back(static_cast<double>(e->result.timing.total_us));
        queue.push_back(static_cast<double>(e->result.timing.queue_us));
        break;
      }
    }
    (void)id;
  }
  const Stats one = Summarize(rtt), inside = Summarize(broker_total), q = Summarize(queue);

  // Throughput: C clients, each keeping W jobs in flight. Beside the rate,
  // the CPU time per job of gpuqd's loop thread (its main thread) and of
  // the whole process: figures that a busy machine changes less than it
  // changes the rate.
  struct Rate {
    double jobs_s = 0, loop_us = 0, process_us = 0;
  };
  auto throughput = [&](int clients, int window) {
    std::atomic<uint64_t> done{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&] {
        auto cl = Client::Connect(client_ep);
        if (!cl.ok()) return;
        int inflight = 0;
        while (!stop) {
          while (inflight < window) {
            if (!(*cl)->SubmitAsync(Trivial()).ok()) return;
            ++inflight;
          }
          auto e = (*cl)->Poll(Millis(2000));
          if (!e.ok()) return;
          if (e->kind == Client::Event::kResult) {
            --inflight;
            ++done;
          } else if (e->kind == Client::Event::kRejected) {
            --inflight;
          }
        }
      });
    }
    // The clients connect and fill their windows first.
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const uint64_t n0 = done.load();
    const uint64_t loop0 = ThreadCpuNs(broker, broker), all0 = ProcessCpuNs(broker);
    auto t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    const uint64_t n = done.load() - n0;
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    const uint64_t loop = ThreadCpuNs(broker, broker) - loop0, all = ProcessCpuNs(broker) - all0;
    stop = true;
    for (auto& t : threads) t.join();
    Rate r;
    r.jobs_s = n / s;
    if (n) {
      r.loop_us = loop / 1e3 / static_cast<double>(n);
      r.process_us = all / 1e3 / static_cast<double>(n);
    }
    return r;
  };
  const Rate t1 = throughput(1, 64), t4 = throughput(4, 64), t16 = throughput(16, 32);
  // The job store's share: how its batches went over all the runs.
  std::string store_line;
  if (auto c = Client::Connect(client_ep); c.ok()) {
    if (auto raw = (*c)->Stats(); raw.ok()) {
      auto all = nlohmann::json::from_msgpack(*raw);
      auto st = all.value("store", nlohmann::json::object());
      auto lat = all.value("latency_us", nlohmann::json::object());
      auto loop = all.value("loop", nlohmann::json::object());
      const double batches = st.value("batches", 0.0), writes = st.value("writes", 0.0);
      char line[256];
      std::snprintf(line, sizeof line,
                    "job store: %.0f batches, %.1f rows each; a batch's round trip p50 %.0f us, "
                    "p99 %.0f us; jobs queued p50 %.0f us, accepted to result p50 %.0f us; "
                    "loop busy %.0f%%, %.1f messages per iteration\n",
                    batches, batches ? writes / batches : 0.0, st.value("batch_p50_us", 0.0),
                    st.value("batch_p99_us", 0.0),
                    lat.value("queue", nlohmann::json::object()).value("p50", 0.0),
                    lat.value("total", nlohmann::json::object()).value("p50", 0.0),
                    100.0 * loop.value("busy_us", 0.0) /
                        std::max(1.0, loop.value("busy_us", 0.0) + loop.value("idle_us", 0.0)),
                    loop.value("messages", 0.0) / std::max(1.0, loop.value("iterations", 0.0)));
      store_line = line;
    }
  }
  cleanup();

  const std::string workers_used =
      gpu ? "real gpuq-workers on " + std::to_string(gpus) + " GPU(s), kernel spins " +
                std::to_string(g_spin_cycles) + " cycles"
          : std::to_string(gpus) + " test-double worker(s), no GPU work";
  printf("gpuq broker benchmark (%s, job %s; durability=%s)\n\n", workers_used.c_str(),
         g_job.c_str(), durability.c_str());
  printf("| measure | p50 | p99 | mean |\n|---|---|---|---|\n");
  printf("| bare ZeroMQ 64 B round trip, ipc (floor) | %.1f us | %.1f us | %.1f us |\n", floor.p50,
         floor.p99, floor.mean);
  printf("| submit -> result through gpuqd, 1 in flight | %.1f us | %.1f us | %.1f us |\n",
         one.p50, one.p99, one.mean);
  printf("| of which inside the broker (accept -> result stored) | %.1f us | %.1f us | %.1f us |\n",
         inside.p50, inside.p99, inside.mean);
  printf("| of which queued (accept -> dispatch) | %.1f us | %.1f us | %.1f us |\n", q.p50, q.p99,
         q.mean);
  printf("\nlatency / floor: %.2fx (p50)\n\n", one.p50 / floor.p50);
  printf("| clients x in flight | jobs/s | gpuqd's loop thread, CPU per job | gpuqd, CPU per job |\n"
         "|---|---|---|---|\n");
  for (const auto& [name, r] : {std::pair<const char*, Rate>{"1 x 64", t1}, {"4 x 64", t4},
                                {"16 x 32", t16}}) {
    printf("| %s | %.0f | %.2f us | %.2f us |\n", name, r.jobs_s, r.loop_us, r.process_us);
  }
  printf("\n%s", store_line.c_str());
  return 0;
}
