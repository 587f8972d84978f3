// gpuq-worker: serves GPUs to a gpuq broker.
//   gpuq-worker --broker tcp://HOST:PORT            one supervised process per GPU
//   gpuq-worker --broker EP --device N               serve GPU N (what the supervisor runs)
//   gpuq-worker --count | --info                     list the GPUs; no broker needed
// Exits 10 when there is no CUDA driver, 11 when there is no such GPU.
#include <CLI/CLI.hpp>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <thread>

#include "util/curve_keys.h"
#include "worker/gpu_worker.h"
#include "worker/worker_supervisor.h"

namespace {

gpuq::worker::WorkerSupervisor* g_supervisor = nullptr;
std::atomic<bool> g_stop{false};

void OnSignal(int) {
  g_stop = true;
  gpuq::worker::GpuWorker::RequestStop();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace gpuq::worker;
  WorkerOptions o;
  int device = -1, heartbeat_ms = 500;
  bool count = false, info = false;
  std::string log_level = "info";
  CLI::App app{"gpuq-worker: serves GPUs to a gpuq broker"};
  app.add_option("--broker", o.broker, "The broker's worker endpoint");
  app.add_option("--device", device, "Serve this GPU only (default: all, one process each)");
  app.add_option("--slots", o.slots, "Jobs held at once")->capture_default_str();
  app.add_option("--streams", o.streams, "Concurrent streams (executor threads)")
      ->capture_default_str();
  app.add_option("--module-slots", o.module_slots, "Modules kept loaded")->capture_default_str();
  app.add_option("--graph-slots", o.graph_slots,
                 "CUDA graphs of jobs of several launches kept per stream")
      ->capture_default_str();
  app.add_option("--heartbeat-ms", heartbeat_ms, "Heartbeat interval")->capture_default_str();
  app.add_option("--local-dir", o.local_dir,
                 "The broker's local directory, when on its host (gpuqd passes it)");
  int64_t spin_us = 0;
  app.add_option("--spin-us", spin_us,
                 "After a message or job, and while jobs run, poll without sleeping this long "
                 "(lower latency, busy cores)")
      ->check(CLI::Range(int64_t{0}, int64_t{100000}))
      ->capture_default_str();
  size_t pinned_mib = o.pinned_bytes >> 20;
  app.add_option("--pinned-mib", pinned_mib,
                 "Page-locked host memory kept for outputs (MiB); past it, pageable")
      ->capture_default_str();
  uint64_t module_mib = o.module_bytes >> 20, local_mib = o.local_bytes >> 20;
  app.add_option("--module-memory-mib", module_mib,
                 "Device memory a module may take when loaded, its __device__ variables and "
                 "code (MiB; 0: no limit)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--local-memory-mib", local_mib,
                 "Local memory a kernel may need over all the threads the GPU holds at once "
                 "(MiB; 0: no limit)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30))
      ->capture_default_str();
  app.add_flag("--count", count, "Print the number of GPUs and exit");
  app.add_flag("--info", info, "Print the GPUs' properties as JSON and exit");
  app.add_option("--log-level", log_level)->capture_default_str();
  std::string server_key, key;
  app.add_option("--server-key", server_key, "CURVE: the broker's public key file");
  app.add_option("--key", key, "CURVE: this worker's secret key file (gpuq keygen)");
  pid_t parent = 0;
  app.add_option("--parent-pid", parent,
                 "End with this process, the supervisor that started this one (its parent: "
                 "a wrapper must exec, not fork)");
  CLI11_PARSE(app, argc, argv);
  if (parent > 0 && !EndWithParent(parent)) {
    // Gone already, or this is not its child (a wrapper that forks).
    fprintf(stderr, "gpuq-worker: the supervisor %d is not this process's parent; ending\n",
            static_cast<int>(parent));
    return 1;
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ gpuq-worker[%P]: %v");
  o.heartbeat = std::chrono::milliseconds(heartbeat_ms);
  o.pinned_bytes = pinned_mib << 20;
  o.module_bytes = module_mib << 20;
  o.local_bytes = local_mib << 20;
  o.spin = std::chrono::microseconds(spin_us);
  if (!key.empty()) {
    auto server = gpuq::ReadCurvePublicKey(server_key);
    auto mine = gpuq::ReadCurveSecretKey(key);
    if (!server.ok() || !mine.ok()) {
      spdlog::error("CURVE keys: {}",
                    (!server.ok() ? server.status() : mine.status()).ToString());
      return 2;
    }
    o.server_key = *server;
    o.public_key = mine->public_key;
    o.secret_key = mine->secret_key;
  }

  auto driver = LoadCudaDriver();
  if (!driver.ok()) {
    if (driver.status().code() == gpuq::Code::kNotFound) {
      if (count) {
        std::printf("0\n");
        return 0;
      }
      spdlog::error("{}", driver.status().message());
      return kExitNoDevice;
    }
    spdlog::error("{}", driver.status().message());
    return kExitNoDriver;
  }
  int n = 0;
  (*driver)->cuDeviceGetCount(&n);
  if (count) {
    std::printf("%d\n", n);
    return 0;
  }
  if (info) {
    nlohmann::json arr = nlohmann::json::array();
    for (int i = 0; i < n; ++i) {
      auto d = QueryDevice(**driver, i);
      if (!d.ok()) continue;
      arr.push_back({{"ordinal", d->ordinal},
                     {"name", d->name},
                     {"uuid", d->uuid},
                     {"arch", d->Arch()},
                     {"total_bytes", d->total_bytes},
                     {"sms", d->sm_count},
                     {"clock_khz", d->clock_khz},
                     {"l2_bytes", d->l2_bytes},
                     {"managed_memory", d->managed_memory},
                     {"max_threads_per_block", d->max_threads_per_block},
                     {"max_shared_per_block", d->max_shared_per_block},
                     {"max_shared_optin", d->max_shared_optin}});
    }
    std::printf("%s\n", arr.dump(2).c_str());
    return 0;
  }
  if (o.broker.empty()) {
    spdlog::error("--broker is needed (or --count / --info)");
    return 2;
  }
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // A file size limit (ulimit -f) fails an output file's write with EFBIG
  // (the job: resource_exhausted) instead of ending the process.
  signal(SIGXFSZ, SIG_IGN);

  if (device < 0) {
    // Every GPU of this host, one supervised process each.
    std::vector<std::string> keys;
    if (!key.empty()) keys = {"--server-key", server_key, "--key", key};
    WorkerSupervisor supervisor(o.broker, "", heartbeat_ms, keys);
    g_supervisor = &supervisor;
    supervisor.Start(n);
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    supervisor.Stop();
    return 0;
  }
  if (device >= n) {
    spdlog::error("no GPU {} (this machine has {})", device, n);
    return kExitNoDevice;
  }
  o.device = device;
  auto worker = GpuWorker::Create(o, *driver);
  if (!worker.ok()) {
    spdlog::error("cannot start: {}", worker.status().ToString());
    return worker.status().code() == gpuq::Code::kNotFound ? kExitNoDevice : kExitFault;
  }
  return (*worker)->Run();
}
