// gpuqd's broker: accepts jobs from clients, stores them durably, compiles
// their kernels, dispatches them to GPU workers and returns the results.
//
// Threads: one loop thread owns both ROUTER sockets and every job's state
// (broker/core.h) and never waits on the disk; the job store commits on a
// thread of its own (broker/store_thread.h); compiles run on the compile
// service's pool (broker/compile/); CURVE authentication on a ZAP thread
// (broker/auth.h); the /metrics HTTP server reads only a rendered snapshot.
// Those threads report back to the loop through one eventfd. See
// schema/PROTOCOL.md for what goes over the wire.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "broker/compile/compile_service.h"
#include "broker/job_store.h"
#include "broker/regions.h"
#include "broker/sessions.h"
#include "schema/messages.h"
#include "util/clock.h"
#include "util/curve_keys.h"

namespace gpuq::broker {

struct BrokerOptions {
  std::string client_endpoint;  // ipc://PATH or tcp://HOST:PORT (port * picks one)
  std::string worker_endpoint;
  std::string store_path;       // SQLite job store
  Durability durability = Durability::kProcessCrash;
  compile::CompileServiceOptions compile;  // cache_path required
  std::chrono::milliseconds heartbeat{500};
  int heartbeat_misses = 3;  // a worker silent this many intervals is gone
  // After a message, the loop polls without sleeping for this long before it
  // blocks: a message that comes within it is taken without a thread wake-up
  // (the cost of a hop is mostly wake-ups). 0: always block.
  std::chrono::microseconds spin{0};
  uint32_t max_attempts = 3;
  uint64_t max_queued = 100000;
  uint64_t max_queued_per_tenant = 20000;
  uint64_t max_queued_bytes = 8ull << 30;
  uint64_t default_time_limit_ms = 10000;
  std::chrono::seconds retention{24 * 3600};
  // A queued job that no connected worker could take (placement: arch, GPU,
  // memory) for this long fails with `unavailable`.
  std::chrono::milliseconds unmatched_grace{60000};
  // Bytes of replies and pushes a client connection may leave unread; past
  // them its pushes are dropped (it fetches) and fetches refused.
  uint64_t max_unread_bytes = 1ull << 30;
  std::string metrics_address;  // HOST:PORT for HTTP /metrics; empty = none
  // The tenants file (TenantPolicies, broker/tenants.h): weights and limits
  // by tenant; empty: every tenant weight 1, no limits of its own. Read at
  // Create() (an error fails it) and again at each Reload().
  std::string tenants_path;
  schema::Limits limits;
  // Registered regions per tenant (PROTOCOL.md, "Regions").
  RegionLimits regions;
  // Sessions (PROTOCOL.md, "Sessions"): limits, and the session process.
  SessionLimits sessions;
  // CURVE (schema/PROTOCOL.md, "Security"). With a server secret key, the
  // client endpoint admits only the keys of `allowed_clients` (public key ->
  // tenant, and whether it is an operator's) and binds each connection to
  // its tenant; with `allowed_workers` too, the worker endpoint admits only
  // those keys.
  std::string curve_secret_key;  // Z85; empty: no CURVE
  std::map<std::string, AllowedKey> allowed_clients, allowed_workers;
  // Time, for tests that drive it; the system's clocks when null.
  const Clock* clock = nullptr;
};

class Broker {
 public:
  // Binds the endpoints and opens the store and cache; resumes the jobs the
  // store holds. Errors: kUnavailable (cannot bind), kIoError (store).
  static StatusOr<std::unique_ptr<Broker>> Create(BrokerOptions options);
  ~Broker();

  // Serves until Stop(). Called once, from one thread.
  Status Run();
  // Thread-safe and async-signal-safe: asks Run() to return.
  void Stop();
  // Thread-safe and async-signal-safe: asks the loop to read the tenants
  // file again. A file that does not parse or check leaves the settings as
  // they were, with a log line that says why.
  void Reload();

  // The endpoints as bound (a tcp port chosen by the system is filled in).
  const std::string& client_endpoint() const;
  const std::string& worker_endpoint() const;
  // The HTTP port of /metrics, 0 when off.
  int metrics_port() const;
  // Jobs resumed from the store at start.
  size_t resumed() const;
  // /readyz answers "not ready" until this many workers are attached (the
  // workers gpuqd starts itself, or --expect-workers). Thread-safe.
  void ExpectWorkers(size_t n);
  // The local directory (PROTOCOL.md, "Local buffers"): workers on this host
  // are given it (gpuq-worker --local-dir).
  const std::string& local_dir() const;

 private:
  class Impl;
  explicit Broker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gpuq::broker
