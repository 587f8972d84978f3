// Counters and latency histograms of the broker, and their rendering as the
// stats reply (msgpack) and as Prometheus text. Owned by the broker loop; the
// HTTP /metrics thread reads only the rendered text, under a mutex.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "schema/messages.h"

namespace gpuq::broker {

// Latency histogram with fixed buckets in a 1-2-5 series from 10 µs to 60 s
// (the last bucket is +Inf).
class Histogram {
 public:
  static constexpr std::array<double, 22> kBoundsUs = {
      10,     20,     50,     100,    200,    500,     1e3,   2e3,   5e3,   1e4,  2e4,
      5e4,    1e5,    2e5,    5e5,    1e6,    2e6,     5e6,   1e7,   3e7,   6e7,  1e18};
  void Observe(uint64_t us);
  uint64_t count() const { return count_; }
  double sum_us() const { return sum_us_; }
  // Estimated from the buckets by linear interpolation within the bucket
  // that holds q (as Prometheus' histogram_quantile does).
  double QuantileUs(double q) const;
  const std::array<uint64_t, kBoundsUs.size()>& buckets() const { return buckets_; }

 private:
  std::array<uint64_t, kBoundsUs.size()> buckets_{};
  uint64_t count_ = 0;
  double sum_us_ = 0;
};

struct WorkerSnapshot {
  schema::WorkerView view;
};

// What a tenant's ended jobs used since the broker started (the store's
// usage table keeps it durably).
struct TenantCounters {
  uint64_t gpu_us = 0, done = 0, failed = 0, canceled = 0, expired = 0;
  // The order in which tenants first finished a job (0, 1, ...): /metrics
  // names the first kTopTenants and sums the rest as "other", so that no
  // counter it shows ever goes down (re-ranked by value, a tenant that
  // passed another would move their totals between series).
  uint32_t first_seen = 0;
};

struct StatsSnapshot {
  uint64_t queued = 0, inflight = 0, compiling = 0;
  std::map<uint32_t, uint64_t> queued_by_priority;
  std::map<std::string, uint64_t> queued_by_tenant;
  std::map<std::string, uint64_t> inflight_by_worker;
  std::map<std::string, uint64_t> finished;  // by outcome
  // By tenant: at most kMaxTenantCounters, the rest under "other" (tenant
  // names on the ipc endpoint are the caller's word). /metrics shows the
  // first kTopTenants to finish a job and sums the rest as "other".
  std::map<std::string, TenantCounters> by_tenant;
  static constexpr size_t kMaxTenantCounters = 4096, kTopTenants = 20;
  uint64_t submitted = 0, rejected = 0, requeued = 0, workers_lost = 0;
  uint64_t gpus_drained = 0;  // GPUs drained for their health (a critical Xid, ECC)
  uint64_t quarantined = 0;      // jobs found damaged at start
  // The job store: batches written (one transaction each), the rows they
  // wrote (jobs, results, attempt counts), and each batch's time from the
  // loop to the store thread and back.
  uint64_t store_batches = 0, store_writes = 0;
  Histogram store_batch_us;
  // The broker's loop: iterations, messages taken, and its time at work and
  // waiting for something to do.
  uint64_t loop_iterations = 0, loop_messages = 0, loop_busy_us = 0, loop_idle_us = 0;
  uint64_t replies_dropped = 0;  // pushes and replies to clients that were not reading
  // Session requests relayed by the broker, and the bytes of them and their answers.
  uint64_t session_calls = 0, session_call_bytes = 0;
  // A tenant's view (CURVE, not an operator): only its own queue and jobs in
  // flight; the broker's counters, latencies and cache are left out.
  bool tenant_view = false;
  std::map<std::string, Histogram> latency;  // by phase (kPhases)
  uint64_t cache_hits = 0, cache_misses = 0, cache_entries = 0, cache_bytes = 0;
  std::vector<schema::WorkerView> workers;
  // Registered regions (a tenant's view: its own), at most kMaxRegionViews.
  struct RegionView {
    uint64_t id = 0;
    std::string tenant;
    uint64_t size = 0, jobs = 0;
    bool ended = false;
  };
  std::vector<RegionView> regions;
  static constexpr size_t kMaxRegionViews = 1024;
  // Open sessions (a tenant's view: its own): id, tenant, GPU, memory limit
  // and bytes held, age, process.
  struct SessionRow {
    uint64_t id = 0;
    std::string tenant, gpu;
    uint64_t memory = 0, held = 0, age_ms = 0;
    uint32_t pid = 0;
    bool relayed = false;
  };
  std::vector<SessionRow> sessions;
  double uptime_s = 0;
};

// The phases of a job's latency, in the order of PROTOCOL.md.
inline constexpr const char* kPhases[] = {"queue", "compile", "load", "h2d",
                                           "kernel", "d2h", "total"};

// The msgpack map of the stats reply (schema/PROTOCOL.md, "Stats").
std::string EncodeStats(const StatsSnapshot& s);
// Prometheus text exposition format 0.0.4: base units, _total counters,
// histograms for phase latencies.
std::string PrometheusText(const StatsSnapshot& s);

}  // namespace gpuq::broker
