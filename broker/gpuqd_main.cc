// gpuqd: the gpuq broker. With no options it is a whole single-host service:
// it listens on a local ipc endpoint, keeps its jobs and kernel cache in
// SQLite files under the user's data and cache folders, and starts and
// supervises one gpuq-worker per visible GPU (or says plainly that there is
// no GPU, and serves queue, compile and stats all the same).
#include <CLI/CLI.hpp>
#include <signal.h>
#include <sys/resource.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "broker/broker.h"
#include "worker/worker_supervisor.h"
#include "gpuq/client.h"
#include "util/curve_keys.h"

namespace {

std::atomic<gpuq::broker::Broker*> g_broker{nullptr};

void OnSignal(int) {
  if (gpuq::broker::Broker* b = g_broker.load()) b->Stop();
}

void OnHangup(int) {
  if (gpuq::broker::Broker* b = g_broker.load()) b->Reload();
}

std::string Folder(const char* xdg, const char* fallback, const char* leaf) {
  std::filesystem::path dir;
  if (const char* x = getenv(xdg); x && *x) {
    dir = x;
  } else if (const char* h = getenv("HOME"); h && *h) {
    dir = std::filesystem::path(h) / fallback;
  } else {
    dir = "/tmp";
  }
  dir /= "gpuq";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return (dir / leaf).string();
}

}  // namespace

int main(int argc, char** argv) {
  gpuq::broker::BrokerOptions o;
  CLI::App app{"gpuqd: the gpuq broker"};
  o.client_endpoint = "ipc://" + gpuq::DefaultRuntimeFolder() + "/broker.sock";
  o.worker_endpoint = "ipc://" + gpuq::DefaultRuntimeFolder() + "/workers.sock";
  o.store_path = Folder("XDG_DATA_HOME", ".local/share", "jobs.db");
  o.compile.cache_path = Folder("XDG_CACHE_HOME", ".cache", "kernels.db");
  std::string durability = "process", log_level = "info", ready_file, worker_bin;
  std::string curve_secret, allowed_keys, worker_keys;
  bool insecure = false;
  int heartbeat_ms = 500, retention_s = 86400, workers = -1;
  size_t expect_workers = 0;
  uint64_t compile_timeout_ms = 10000, compile_memory_mb = 4096;
  app.add_option("--listen", o.client_endpoint, "Client endpoint (ipc://PATH or tcp://HOST:PORT)")
      ->capture_default_str();
  app.add_option("--worker-listen", o.worker_endpoint, "Worker endpoint")->capture_default_str();
  app.add_option("--store", o.store_path, "Job store (SQLite)")->capture_default_str();
  app.add_option("--cache", o.compile.cache_path, "Kernel cache (SQLite)")->capture_default_str();
  app.add_option("--durability", durability,
                 "process: jobs survive a broker crash; power: and a power loss (fsync)")
      ->check(CLI::IsMember({"process", "power"}))
      ->capture_default_str();
  app.add_option("--metrics", o.metrics_address, "Serve Prometheus /metrics on HOST:PORT")
      ->check([](const std::string& v) -> std::string {
        const size_t colon = v.rfind(':');
        const std::string port = colon == std::string::npos ? "" : v.substr(colon + 1);
        if (colon == 0 || port.empty() || port.size() > 5 ||
            port.find_first_not_of("0123456789") != std::string::npos || std::stoul(port) > 65535) {
          return "HOST:PORT, with a port of 0 to 65535 (0: any free one)";
        }
        return "";
      });
  app.add_option("--tenants", o.tenants_path,
                 "Tenants file (JSON): weights and limits by tenant; read again on SIGHUP");
  app.add_option("--heartbeat-ms", heartbeat_ms, "Heartbeat interval")
      ->check(CLI::Range(10, 60000))
      ->capture_default_str();
  int64_t spin_us = 0;
  app.add_option("--spin-us", spin_us,
                 "After a message, and while jobs run, poll without sleeping this long (lower "
                 "latency, busy cores)")
      ->check(CLI::Range(int64_t{0}, int64_t{100000}))
      ->capture_default_str();
  app.add_option("--max-attempts", o.max_attempts, "Dispatches per job before it fails")
      ->capture_default_str();
  app.add_option("--max-queued", o.max_queued, "Jobs held at most")->capture_default_str();
  app.add_option("--max-queued-per-tenant", o.max_queued_per_tenant, "Queued jobs per tenant")
      ->capture_default_str();
  app.add_option("--max-queued-bytes", o.max_queued_bytes, "Input bytes held at most")
      ->capture_default_str();
  app.add_option("--time-limit-ms", o.default_time_limit_ms,
                 "Default run-time limit of a job, and of a session's launch")
      ->check(CLI::Range(uint64_t{1}, gpuq::schema::kMaxTimeLimitMs))
      ->capture_default_str();
  app.add_option("--retention-s", retention_s, "How long results stay fetchable")
      ->check(CLI::Range(1, 366 * 86400))
      ->capture_default_str();
  size_t compile_threads = 2;
  app.add_option("--compile-threads", compile_threads, "Compiles at once")
      ->capture_default_str();
  int64_t unmatched_grace_ms = 60000;
  app.add_option("--unmatched-grace-ms", unmatched_grace_ms,
                 "A queued job no connected worker could take for this long fails (unavailable)")
      ->check(CLI::Range(int64_t{0}, int64_t{86400000}))
      ->capture_default_str();
  uint64_t max_unread_mb = 1024;
  app.add_option("--max-unread-mb", max_unread_mb,
                 "Replies a client connection may leave unread before its pushes are dropped")
      ->capture_default_str();
  app.add_option("--max-launches", o.limits.max_launches,
                 "Launches per job (jobs of several launches)")
      ->check(CLI::Range(size_t{1}, size_t{4096}))
      ->capture_default_str();
  app.add_option("--max-job-buffers", o.limits.max_job_buffers,
                 "Buffers per job of several launches")
      ->check(CLI::Range(size_t{1}, size_t{4096}))
      ->capture_default_str();
  app.add_option("--max-sources", o.limits.max_sources,
                 "Sources per job of several launches, its own included")
      ->check(CLI::Range(size_t{1}, size_t{64}))
      ->capture_default_str();
  uint64_t max_scratch_mb = o.limits.max_scratch_bytes >> 20;
  app.add_option("--max-scratch-mb", max_scratch_mb, "Scratch buffer bytes per job, in all")
      ->capture_default_str();
  app.add_option("--max-regions", o.regions.regions_per_tenant,
                 "Registered regions a tenant may hold at once")
      ->capture_default_str();
  uint64_t max_region_mb = o.regions.bytes_per_tenant >> 20;
  app.add_option("--max-region-mb", max_region_mb, "Bytes of registered regions per tenant, in all")
      ->capture_default_str();
  app.add_option("--max-regions-total", o.regions.regions, "Registered regions at once, in all")
      ->capture_default_str();
  uint64_t max_region_mb_total = o.regions.bytes >> 20;
  app.add_option("--max-region-mb-total", max_region_mb_total,
                 "Bytes of registered regions, of every tenant, in all")
      ->capture_default_str();
  std::string session_bin;
  app.add_option("--session-bin", session_bin,
                 "gpuq-session, the session process (default: beside gpuqd; 'none': no "
                 "sessions)");
  app.add_option("--max-sessions", o.sessions.per_tenant, "Sessions a tenant may hold open")
      ->capture_default_str();
  uint64_t max_session_mb = o.sessions.bytes_per_tenant >> 20;
  app.add_option("--max-session-mb", max_session_mb,
                 "Device memory a tenant's sessions may hold, in all (each session's limit "
                 "counts whole)")
      ->capture_default_str();
  uint64_t session_memory_mb = o.sessions.default_memory >> 20;
  app.add_option("--session-memory-mb", session_memory_mb,
                 "A session's device memory limit when it names none")
      ->capture_default_str();
  app.add_option("--session-attach-mb", o.sessions.max_attach_mb,
                 "Host memory (regions) a session may attach, page-locked while attached")
      ->capture_default_str();
  app.add_option("--max-session-processes", o.sessions.processes,
                 "Session processes at once (one per tenant with a session on a GPU), in all")
      ->check(CLI::Range(size_t{1}, size_t{4096}))
      ->capture_default_str();
  app.add_option("--session-kernels", o.sessions.max_kernels,
                 "Kernels a session process keeps loaded that no session holds (oldest dropped)")
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 20))
      ->capture_default_str();
  app.add_option("--session-buffers", o.sessions.max_buffers,
                 "Buffers a session holds at once")
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 24))
      ->capture_default_str();
  int64_t session_limit_ms = -1;
  app.add_option("--session-time-limit-ms", session_limit_ms,
                 "A session launch's run-time limit where its session names none (default: "
                 "--time-limit-ms; 0: none)")
      ->check(CLI::Range(int64_t{-1}, int64_t{86400000}));
  app.add_option("--session-idle-ms", o.sessions.default_idle_ms,
                 "A session ends after this long without a request, unless it names its own")
      ->check(CLI::Range(uint64_t{1}, gpuq::schema::kMaxDeadlineMs))
      ->capture_default_str();
  app.add_option("--compile-timeout-ms", compile_timeout_ms, "Wall-time bound of a compile")
      ->capture_default_str();
  app.add_option("--compile-memory-mb", compile_memory_mb, "Memory bound of a compile")
      ->capture_default_str();
  app.add_option("--module-memory-mib", o.sessions.module_memory_mib,
                 "Device memory a module may take when loaded, its __device__ variables and "
                 "code (MiB; 0: no limit), in the workers gpuqd starts and in session processes")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--session-kernels-memory-mib", o.sessions.kernels_memory_mib,
                 "Device memory the modules of a tenant's session kernels on one GPU may take "
                 "in all, loaded in its session process (MiB; 0: no limit)")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--local-memory-mib", o.sessions.local_memory_mib,
                 "Local memory a kernel may need over all the threads the GPU holds at once "
                 "(MiB; 0: no limit), in the workers gpuqd starts and in session processes")
      ->check(CLI::Range(uint64_t{0}, uint64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--workers", workers,
                 "GPU workers to start and supervise: -1 one per visible GPU, 0 none")
      ->capture_default_str();
  app.add_option("--worker-bin", worker_bin, "gpuq-worker to start (default: beside gpuqd)");
  app.add_option("--expect-workers", expect_workers,
                 "/readyz says not ready until this many workers are attached (besides those "
                 "gpuqd starts itself)")
      ->capture_default_str();
  app.add_option("--ready-file", ready_file,
                 "Write the bound endpoints here as JSON once serving");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->capture_default_str();
  app.add_option("--curve-secret", curve_secret,
                 "CURVE: the broker's secret key file (gpuq keygen); clients need its .pub");
  app.add_option("--allowed-keys", allowed_keys,
                 "CURVE: client keys, 'PUBLIC-KEY TENANT [operator]' per line; the tenant is "
                 "bound to the key; an operator sees every tenant's stats");
  app.add_option("--worker-keys", worker_keys,
                 "CURVE: worker keys, 'PUBLIC-KEY NAME' per line (CURVE on the worker endpoint)");
  app.add_flag("--insecure", insecure, "Allow a tcp endpoint without CURVE");
  CLI11_PARSE(app, argc, argv);

  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ gpuqd: %v");
  o.durability = durability == "power" ? gpuq::broker::Durability::kPowerLoss
                                       : gpuq::broker::Durability::kProcessCrash;
  o.heartbeat = std::chrono::milliseconds(heartbeat_ms);
  o.spin = std::chrono::microseconds(spin_us);
  o.retention = std::chrono::seconds(retention_s);
  o.compile.max_concurrent = compile_threads;
  o.unmatched_grace = std::chrono::milliseconds(unmatched_grace_ms);
  o.max_unread_bytes = max_unread_mb << 20;
  o.limits.max_scratch_bytes = max_scratch_mb << 20;
  o.regions.bytes_per_tenant = max_region_mb << 20;
  o.regions.bytes = max_region_mb_total << 20;
  o.sessions.bytes_per_tenant = max_session_mb << 20;
  o.sessions.default_memory = session_memory_mb << 20;
  o.sessions.spin = o.spin;
  o.sessions.default_limit_ms = session_limit_ms >= 0 ? static_cast<uint64_t>(session_limit_ms)
                                                      : o.default_time_limit_ms;
  if (session_bin != "none") {
    o.sessions.bin = session_bin.empty() ? gpuq::worker::Beside("gpuq-session") : session_bin;
  }
  o.compile.limits.wall = std::chrono::milliseconds(compile_timeout_ms);
  o.compile.limits.memory_bytes = compile_memory_mb << 20;
  std::string broker_public_key;
  if (!curve_secret.empty()) {
    auto keys = gpuq::ReadCurveSecretKey(curve_secret);
    if (!keys.ok()) {
      spdlog::error("{}", keys.status().ToString());
      return 2;
    }
    o.curve_secret_key = keys->secret_key;
    broker_public_key = keys->public_key;
    spdlog::info("CURVE on; the broker's public key is {}", keys->public_key);
  }
  for (auto [path, into] : {std::pair{&allowed_keys, &o.allowed_clients},
                            std::pair{&worker_keys, &o.allowed_workers}}) {
    if (path->empty()) continue;
    auto keys = gpuq::ReadAllowedKeys(*path);
    if (!keys.ok()) {
      spdlog::error("{}", keys.status().ToString());
      return 2;
    }
    *into = std::move(*keys);
  }
  if (!o.allowed_clients.empty() || !o.allowed_workers.empty()) {
    if (o.curve_secret_key.empty()) {
      spdlog::error("--allowed-keys and --worker-keys need --curve-secret");
      return 2;
    }
  }
  // With CURVE on the worker endpoint, the workers gpuqd supervises get a
  // key pair of their own, made for this run and allowed beside
  // --worker-keys (without one they were refused, silently, for ever).
  std::optional<gpuq::CurveKeyPair> supervised_keys;
  if (workers != 0 && !o.allowed_workers.empty()) {
    auto keys = gpuq::NewCurveKeyPair();
    if (!keys.ok()) {
      spdlog::error("a key pair for the supervised workers: {}", keys.status().ToString());
      return 2;
    }
    o.allowed_workers[keys->public_key] = gpuq::AllowedKey{"supervised"};
    supervised_keys = std::move(*keys);
  }
  // tcp reaches other machines: without CURVE anyone there could submit.
  const bool client_tcp = o.client_endpoint.rfind("tcp://", 0) == 0;
  const bool worker_tcp = o.worker_endpoint.rfind("tcp://", 0) == 0;
  if (!insecure && ((client_tcp && o.curve_secret_key.empty()) ||
                    (worker_tcp && o.allowed_workers.empty()))) {
    spdlog::error("a tcp endpoint needs CURVE (--curve-secret with --allowed-keys, and "
                  "--worker-keys for workers) or --insecure");
    return 2;
  }

  // Past the file size limit a write fails (EFBIG), as on a full disk; the
  // broker refuses what it cannot store and goes on.
  signal(SIGXFSZ, SIG_IGN);
  // Descriptors: the bounds on regions (each holds one) and connections are
  // set for more than a shell's or a service manager's usual soft limit of
  // 1024; the soft limit goes up to the hard one, and the log says if that
  // leaves less than the bounds need.
  if (rlimit nofile{}; getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &nofile) != 0) {
      spdlog::warn("cannot raise the descriptor limit to {}: {}", nofile.rlim_max,
                   strerror(errno));
    }
  }
  if (rlimit nofile{}; getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < 4096) {
    spdlog::warn("descriptor limit {}: regions and connections at their bounds need about 4096 "
                 "(ulimit -n)", nofile.rlim_cur);
  }
  // SIGHUP reads the tenants file again: from now on, before the store's
  // opening (which may take minutes), so that a reload asked during the
  // start neither ends the process (its default) nor interrupts a call
  // (SA_RESTART); one before the broker exists is the start's own read.
  struct sigaction hup = {};
  hup.sa_handler = OnHangup;
  hup.sa_flags = SA_RESTART;
  sigaction(SIGHUP, &hup, nullptr);
  auto broker = gpuq::broker::Broker::Create(o);
  if (!broker.ok()) {
    spdlog::error("cannot start: {}", broker.status().ToString());
    return 4;
  }
  g_broker = broker->get();
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::vector<std::string> worker_args = {"--spin-us", std::to_string(spin_us),
                                          "--local-dir", (*broker)->local_dir(),
                                          "--module-memory-mib",
                                          std::to_string(o.sessions.module_memory_mib),
                                          "--local-memory-mib",
                                          std::to_string(o.sessions.local_memory_mib)};
  if (supervised_keys) {
    // In the local directory (mode 0700), the secret key's file 0600.
    const std::string prefix = (*broker)->local_dir() + "/supervised-worker";
    gpuq::Status w = gpuq::WriteCurveKeyPair(*supervised_keys, prefix);
    if (w.ok()) w = gpuq::WriteCurvePublicKey(broker_public_key, prefix + ".server.pub");
    if (!w.ok()) {
      spdlog::error("the supervised workers' keys: {}", w.ToString());
      return 2;
    }
    worker_args.insert(worker_args.end(), {"--server-key", prefix + ".server.pub", "--key",
                                           prefix + ".key"});
  }
  gpuq::worker::WorkerSupervisor supervisor((*broker)->worker_endpoint(), worker_bin,
                                            heartbeat_ms, worker_args);
  // /readyz waits for the workers supervised, but not for one retired (no
  // driver, no such GPU): it would wait for ever.
  gpuq::broker::Broker* b = broker->get();
  b->ExpectWorkers(expect_workers);
  supervisor.OnCount(
      [b, expect_workers](size_t kept) { b->ExpectWorkers(std::max(expect_workers, kept)); });
  if (workers != 0) supervisor.Start(workers);

  if (!ready_file.empty()) {
    nlohmann::json j = {{"client", (*broker)->client_endpoint()},
                        {"worker", (*broker)->worker_endpoint()},
                        {"metrics_port", (*broker)->metrics_port()},
                        {"resumed", (*broker)->resumed()},
                        {"pid", getpid()}};
    std::string tmp = ready_file + ".tmp";
    std::ofstream(tmp) << j.dump() << "\n";
    std::filesystem::rename(tmp, ready_file);
  }
  gpuq::Status s = (*broker)->Run();
  supervisor.Stop();
  g_broker = nullptr;
  if (!s.ok()) {
    spdlog::error("{}", s.ToString());
    return 5;
  }
  return 0;
}
