#include "broker/metrics.h"

#include <algorithm>
#include <msgpack.hpp>

#include <cstdio>
#include <sstream>
#include <string_view>

namespace gpuq::broker {

void Histogram::Observe(uint64_t us) {
  size_t i = 0;
  while (i + 1 < kBoundsUs.size() && static_cast<double>(us) > kBoundsUs[i]) ++i;
  ++buckets_[i];
  ++count_;
  sum_us_ += static_cast<double>(us);
}

double Histogram::QuantileUs(double q) const {
  if (count_ == 0) return 0;
  const double target = q * static_cast<double>(count_);
  double seen = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    const double in_bucket = static_cast<double>(buckets_[i]);
    if (seen + in_bucket >= target && in_bucket > 0) {
      if (i + 1 == buckets_.size()) return kBoundsUs[i - 1];  // +Inf: the last finite bound
      const double lo = i == 0 ? 0 : kBoundsUs[i - 1];
      return lo + (kBoundsUs[i] - lo) * (target - seen) / in_bucket;
    }
    seen += in_bucket;
  }
  return kBoundsUs[buckets_.size() - 2];
}

namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

void Str(Packer& p, std::string_view s) {
  p.pack_str(static_cast<uint32_t>(s.size()));
  p.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}

template <typename K>
void CountMap(Packer& p, const std::map<K, uint64_t>& m) {
  p.pack_map(static_cast<uint32_t>(m.size()));
  for (const auto& [k, v] : m) {
    if constexpr (std::is_same_v<K, std::string>) {
      Str(p, k);
    } else {
      Str(p, std::to_string(k));
    }
    p.pack_uint64(v);
  }
}

// The length of the well-formed UTF-8 sequence at s[i], or 0.
size_t Utf8Length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((b(i + k) & 0xC0) != 0x80) return 0;
  }
  // No overlong forms, surrogates, or code points past U+10FFFF.
  if ((c == 0xE0 && b(i + 1) < 0xA0) || (c == 0xED && b(i + 1) > 0x9F) ||
      (c == 0xF0 && b(i + 1) < 0x90) || (c == 0xF4 && b(i + 1) > 0x8F)) {
    return 0;
  }
  return n;
}

// A label value of the text format: valid UTF-8 (a scraper refuses the
// whole page otherwise), with \\, \" and \n escaped. Tenant names are any
// bytes: each byte that is not part of well-formed UTF-8, and '%', is
// written %XX, so that two names never give one label.
std::string Escape(const std::string& s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string o;
  for (size_t i = 0; i < s.size();) {
    const char c = s[i];
    const size_t n = Utf8Length(s, i);
    if (n == 0 || c == '%') {
      const auto u = static_cast<unsigned char>(c);
      o += '%';
      o += kHex[u >> 4];
      o += kHex[u & 15];
      ++i;
      continue;
    }
    if (n > 1) {
      o.append(s, i, n);
      i += n;
      continue;
    }
    if (c == '\\' || c == '"') o += '\\';
    if (c == '\n') {
      o += "\\n";
    } else {
      o += c;
    }
    ++i;
  }
  return o;
}

// The kTopTenants tenants with the largest value by name, the rest summed as
// "other": tenant names on the ipc endpoint are the caller's word, and a
// series per name would grow without bound.
std::map<std::string, uint64_t> TopTenants(const std::map<std::string, uint64_t>& by_tenant) {
  std::vector<std::pair<std::string, uint64_t>> top(by_tenant.begin(), by_tenant.end());
  std::sort(top.begin(), top.end(),
            [](const auto& a, const auto& b) { return a.second > b.second; });
  std::map<std::string, uint64_t> shown;
  for (size_t i = 0; i < top.size(); ++i) {
    shown[i < StatsSnapshot::kTopTenants ? top[i].first : "other"] += top[i].second;
  }
  return shown;
}

}  // namespace

std::string EncodeStats(const StatsSnapshot& s) {
  msgpack::sbuffer buf;
  Packer p(buf);
  p.pack_map(s.tenant_view ? 8 : 22);
  Str(p, "queued");
  p.pack_uint64(s.queued);
  Str(p, "queued_by_priority");
  CountMap(p, s.queued_by_priority);
  Str(p, "queued_by_tenant");
  CountMap(p, s.queued_by_tenant);
  Str(p, "inflight");
  p.pack_uint64(s.inflight);
  if (!s.tenant_view) {
    Str(p, "inflight_by_worker");
    CountMap(p, s.inflight_by_worker);
    Str(p, "compiling");
    p.pack_uint64(s.compiling);
    Str(p, "submitted");
    p.pack_uint64(s.submitted);
    Str(p, "rejected");
    p.pack_uint64(s.rejected);
    Str(p, "requeued");
    p.pack_uint64(s.requeued);
    Str(p, "quarantined");
    p.pack_uint64(s.quarantined);
    Str(p, "replies_dropped");
    p.pack_uint64(s.replies_dropped);
    Str(p, "session_calls");
    p.pack_uint64(s.session_calls);
    Str(p, "session_call_bytes");
    p.pack_uint64(s.session_call_bytes);
    Str(p, "finished");
    CountMap(p, s.finished);
    Str(p, "latency_us");
    uint32_t phases = 0;
    for (const char* phase : kPhases) phases += s.latency.count(phase);
    p.pack_map(phases);
    for (const char* phase : kPhases) {
      auto it = s.latency.find(phase);
      if (it == s.latency.end()) continue;
      const Histogram& h = it->second;
      Str(p, phase);
      p.pack_map(4);
      Str(p, "p50");
      p.pack_uint64(static_cast<uint64_t>(h.QuantileUs(0.5)));
      Str(p, "p90");
      p.pack_uint64(static_cast<uint64_t>(h.QuantileUs(0.9)));
      Str(p, "p99");
      p.pack_uint64(static_cast<uint64_t>(h.QuantileUs(0.99)));
      Str(p, "count");
      p.pack_uint64(h.count());
    }
    Str(p, "loop");
    p.pack_map(4);
    Str(p, "iterations");
    p.pack_uint64(s.loop_iterations);
    Str(p, "messages");
    p.pack_uint64(s.loop_messages);
    Str(p, "busy_us");
    p.pack_uint64(s.loop_busy_us);
    Str(p, "idle_us");
    p.pack_uint64(s.loop_idle_us);
    Str(p, "store");
    p.pack_map(5);
    Str(p, "batches");
    p.pack_uint64(s.store_batches);
    Str(p, "writes");
    p.pack_uint64(s.store_writes);
    Str(p, "batch_p50_us");
    p.pack_uint64(static_cast<uint64_t>(s.store_batch_us.QuantileUs(0.5)));
    Str(p, "batch_p90_us");
    p.pack_uint64(static_cast<uint64_t>(s.store_batch_us.QuantileUs(0.9)));
    Str(p, "batch_p99_us");
    p.pack_uint64(static_cast<uint64_t>(s.store_batch_us.QuantileUs(0.99)));
    Str(p, "cache");
    p.pack_map(4);
    Str(p, "hits");
    p.pack_uint64(s.cache_hits);
    Str(p, "misses");
    p.pack_uint64(s.cache_misses);
    Str(p, "entries");
    p.pack_uint64(s.cache_entries);
    Str(p, "bytes");
    p.pack_uint64(s.cache_bytes);
  }
  Str(p, "workers");
  p.pack_array(static_cast<uint32_t>(s.workers.size()));
  for (const auto& w : s.workers) {
    p.pack_map(6 + (w.health.known ? 1 : 0) + (w.health.drain.empty() ? 0 : 1));
    Str(p, "worker");
    Str(p, w.worker);
    Str(p, "device");
    Str(p, w.device.name);
    Str(p, "uuid");
    Str(p, w.device.uuid);
    Str(p, "slots");
    p.pack_uint32(w.slots);
    Str(p, "inflight");
    p.pack_uint32(w.inflight);
    Str(p, "heartbeat_age_ms");
    p.pack_uint64(w.heartbeat_age_ms);
    if (w.health.known) {
      Str(p, "health");
      p.pack_map(4);
      Str(p, "util_pct");
      p.pack_uint32(w.health.util_pct);
      Str(p, "temp_c");
      p.pack_uint32(w.health.temp_c);
      Str(p, "power_mw");
      p.pack_uint32(w.health.power_mw);
      Str(p, "mem_used");
      p.pack_uint64(w.health.mem_used_bytes);
    }
    if (!w.health.drain.empty()) {
      Str(p, "drained");
      Str(p, w.health.drain);
    }
  }
  Str(p, "regions");
  p.pack_array(static_cast<uint32_t>(s.regions.size()));
  for (const StatsSnapshot::RegionView& r : s.regions) {
    p.pack_map(5);
    Str(p, "region");
    p.pack_uint64(r.id);
    Str(p, "tenant");
    Str(p, r.tenant);
    Str(p, "size");
    p.pack_uint64(r.size);
    Str(p, "jobs");
    p.pack_uint64(r.jobs);
    Str(p, "ended");
    p.pack(r.ended);
  }
  Str(p, "sessions");
  p.pack_array(static_cast<uint32_t>(s.sessions.size()));
  for (const StatsSnapshot::SessionRow& r : s.sessions) {
    p.pack_map(8);
    Str(p, "session");
    p.pack_uint64(r.id);
    Str(p, "tenant");
    Str(p, r.tenant);
    Str(p, "gpu");
    Str(p, r.gpu);
    Str(p, "memory");
    p.pack_uint64(r.memory);
    Str(p, "held");
    p.pack_uint64(r.held);
    Str(p, "age_ms");
    p.pack_uint64(r.age_ms);
    Str(p, "pid");
    p.pack_uint32(r.pid);
    Str(p, "relayed");
    p.pack(r.relayed);
  }
  Str(p, "uptime_s");
  p.pack_double(s.uptime_s);
  return std::string(buf.data(), buf.size());
}

std::string PrometheusText(const StatsSnapshot& s) {
  std::ostringstream o;
  o.precision(9);
  auto gauge = [&](const char* name, const char* help) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " gauge\n";
  };
  auto counter = [&](const char* name, const char* help) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " counter\n";
  };
  gauge("gpuq_jobs_queued", "Jobs waiting to be dispatched, by priority.");
  if (s.queued_by_priority.empty()) o << "gpuq_jobs_queued{priority=\"5\"} 0\n";
  for (const auto& [p, n] : s.queued_by_priority) {
    o << "gpuq_jobs_queued{priority=\"" << p << "\"} " << n << "\n";
  }
  gauge("gpuq_tenant_jobs_queued",
        "Jobs waiting to be dispatched, by tenant: the top 20, the rest as \"other\".");
  for (const auto& [t, n] : TopTenants(s.queued_by_tenant)) {
    o << "gpuq_tenant_jobs_queued{tenant=\"" << Escape(t) << "\"} " << n << "\n";
  }
  {
    std::map<std::string, uint64_t> count, bytes;
    for (const StatsSnapshot::RegionView& r : s.regions) {
      ++count[r.tenant];
      bytes[r.tenant] += r.size;
    }
    gauge("gpuq_tenant_regions", "Registered regions, by tenant: the top 20, the rest as \"other\".");
    for (const auto& [t, n] : TopTenants(count)) {
      o << "gpuq_tenant_regions{tenant=\"" << Escape(t) << "\"} " << n << "\n";
    }
    gauge("gpuq_tenant_region_bytes",
          "Bytes of registered regions, by tenant: the top 20, the rest as \"other\".");
    for (const auto& [t, n] : TopTenants(bytes)) {
      o << "gpuq_tenant_region_bytes{tenant=\"" << Escape(t) << "\"} " << n << "\n";
    }
  }
  {
    std::map<std::string, uint64_t> count, held, gpu_count, gpu_held;
    for (const StatsSnapshot::SessionRow& r : s.sessions) {
      ++count[r.tenant];
      held[r.tenant] += r.held;
      ++gpu_count[r.gpu];
      gpu_held[r.gpu] += r.held;
    }
    gauge("gpuq_gpu_sessions", "Open sessions, by GPU.");
    for (const auto& [g, n] : gpu_count) {
      o << "gpuq_gpu_sessions{gpu=\"" << Escape(g) << "\"} " << n << "\n";
    }
    gauge("gpuq_gpu_session_bytes", "Device bytes sessions hold, by GPU.");
    for (const auto& [g, n] : gpu_held) {
      o << "gpuq_gpu_session_bytes{gpu=\"" << Escape(g) << "\"} " << n << "\n";
    }
    gauge("gpuq_tenant_sessions", "Open sessions, by tenant: the top 20, the rest as \"other\".");
    for (const auto& [t, n] : TopTenants(count)) {
      o << "gpuq_tenant_sessions{tenant=\"" << Escape(t) << "\"} " << n << "\n";
    }
    gauge("gpuq_tenant_session_bytes",
          "Device bytes sessions hold, by tenant: the top 20, the rest as \"other\".");
    for (const auto& [t, n] : TopTenants(held)) {
      o << "gpuq_tenant_session_bytes{tenant=\"" << Escape(t) << "\"} " << n << "\n";
    }
  }
  gauge("gpuq_jobs_inflight", "Jobs dispatched to a worker and not yet finished.");
  o << "gpuq_jobs_inflight " << s.inflight << "\n";
  gauge("gpuq_jobs_compiling", "Jobs waiting for their kernel to compile.");
  o << "gpuq_jobs_compiling " << s.compiling << "\n";
  counter("gpuq_jobs_submitted_total", "Jobs accepted.");
  o << "gpuq_jobs_submitted_total " << s.submitted << "\n";
  counter("gpuq_jobs_rejected_total", "Submits rejected (invalid, queue full, ...).");
  o << "gpuq_jobs_rejected_total " << s.rejected << "\n";
  counter("gpuq_jobs_requeued_total", "Jobs requeued after losing their worker.");
  o << "gpuq_jobs_requeued_total " << s.requeued << "\n";
  counter("gpuq_jobs_finished_total", "Jobs that reached a terminal state, by outcome.");
  for (const char* outcome : {"done", "compile_error", "sandbox_violation", "launch_error",
                              "kernel_fault", "timeout", "invalid", "resource_exhausted",
                              "unavailable", "io_error", "internal", "canceled", "expired"}) {
    auto it = s.finished.find(outcome);
    o << "gpuq_jobs_finished_total{outcome=\"" << outcome << "\"} "
      << (it == s.finished.end() ? 0 : it->second) << "\n";
  }
  {
    // The first tenants to finish a job by name, the rest as "other": a
    // bounded set of series, each of which only grows.
    std::map<std::string, TenantCounters> shown;
    for (const auto& [tenant, t] : s.by_tenant) {
      const bool named = t.first_seen < StatsSnapshot::kTopTenants && tenant != "other";
      TenantCounters& c = shown[named ? tenant : "other"];
      c.gpu_us += t.gpu_us;
      c.done += t.done;
      c.failed += t.failed;
      c.canceled += t.canceled;
      c.expired += t.expired;
    }
    counter("gpuq_tenant_gpu_seconds_total",
            "Time tenants' ended jobs held GPUs (dispatch to result), by tenant: the first 20 "
            "to finish a job, the rest as other.");
    for (const auto& [t, c] : shown) {
      o << "gpuq_tenant_gpu_seconds_total{tenant=\"" << Escape(t) << "\"} " << c.gpu_us / 1e6
        << "\n";
    }
    counter("gpuq_tenant_jobs_finished_total",
            "Tenants' jobs that ended, by tenant (as gpuq_tenant_gpu_seconds_total) and outcome.");
    for (const auto& [t, c] : shown) {
      for (const auto& [outcome, n] : {std::pair<const char*, uint64_t>{"done", c.done},
                                       {"failed", c.failed},
                                       {"canceled", c.canceled},
                                       {"expired", c.expired}}) {
        o << "gpuq_tenant_jobs_finished_total{tenant=\"" << Escape(t) << "\",outcome=\""
          << outcome << "\"} " << n << "\n";
      }
    }
  }
  counter("gpuq_jobs_quarantined_total", "Jobs found damaged in the store at start.");
  o << "gpuq_jobs_quarantined_total " << s.quarantined << "\n";
  counter("gpuq_client_replies_dropped_total",
          "Replies and pushes not sent to clients that were not reading.");
  o << "gpuq_client_replies_dropped_total " << s.replies_dropped << "\n";
  counter("gpuq_session_calls_total", "Session requests relayed by the broker.");
  o << "gpuq_session_calls_total " << s.session_calls << "\n";
  counter("gpuq_session_call_bytes_total",
          "Bytes of the session requests the broker relayed and of their answers.");
  o << "gpuq_session_call_bytes_total " << s.session_call_bytes << "\n";
  counter("gpuq_workers_lost_total", "Workers declared gone (silent, faulted or killed).");
  o << "gpuq_workers_lost_total " << s.workers_lost << "\n";
  counter("gpuq_gpus_drained_total",
          "GPUs drained for their health (a critical Xid or an uncorrectable ECC error).");
  o << "gpuq_gpus_drained_total " << s.gpus_drained << "\n";
  o << "# HELP gpuq_job_phase_seconds Time jobs spent in each phase.\n"
       "# TYPE gpuq_job_phase_seconds histogram\n";
  for (const auto& [phase, h] : s.latency) {
    uint64_t cumulative = 0;
    for (size_t i = 0; i < Histogram::kBoundsUs.size(); ++i) {
      cumulative += h.buckets()[i];
      o << "gpuq_job_phase_seconds_bucket{phase=\"" << phase << "\",le=\"";
      if (i + 1 == Histogram::kBoundsUs.size()) {
        o << "+Inf";
      } else {
        o << Histogram::kBoundsUs[i] / 1e6;
      }
      o << "\"} " << cumulative << "\n";
    }
    o << "gpuq_job_phase_seconds_sum{phase=\"" << phase << "\"} " << h.sum_us() / 1e6 << "\n";
    o << "gpuq_job_phase_seconds_count{phase=\"" << phase << "\"} " << h.count() << "\n";
  }
  counter("gpuq_loop_iterations_total", "Iterations of the broker's loop.");
  o << "gpuq_loop_iterations_total " << s.loop_iterations << "\n";
  counter("gpuq_loop_messages_total", "Messages the broker's loop took from clients and workers.");
  o << "gpuq_loop_messages_total " << s.loop_messages << "\n";
  counter("gpuq_loop_busy_seconds_total", "Time the broker's loop spent at work.");
  o << "gpuq_loop_busy_seconds_total " << s.loop_busy_us / 1e6 << "\n";
  counter("gpuq_loop_idle_seconds_total", "Time the broker's loop spent waiting for work.");
  o << "gpuq_loop_idle_seconds_total " << s.loop_idle_us / 1e6 << "\n";
  counter("gpuq_store_batches_total", "Batches the job store committed (one transaction each).");
  o << "gpuq_store_batches_total " << s.store_batches << "\n";
  counter("gpuq_store_writes_total", "Rows the job store wrote (jobs, results, attempt counts).");
  o << "gpuq_store_writes_total " << s.store_writes << "\n";
  o << "# HELP gpuq_store_batch_seconds A batch's time from the loop to the store thread and "
       "back.\n# TYPE gpuq_store_batch_seconds histogram\n";
  {
    uint64_t cumulative = 0;
    const Histogram& h = s.store_batch_us;
    for (size_t i = 0; i < Histogram::kBoundsUs.size(); ++i) {
      cumulative += h.buckets()[i];
      o << "gpuq_store_batch_seconds_bucket{le=\"";
      if (i + 1 == Histogram::kBoundsUs.size()) {
        o << "+Inf";
      } else {
        o << Histogram::kBoundsUs[i] / 1e6;
      }
      o << "\"} " << cumulative << "\n";
    }
    o << "gpuq_store_batch_seconds_sum " << h.sum_us() / 1e6 << "\n";
    o << "gpuq_store_batch_seconds_count " << h.count() << "\n";
  }
  counter("gpuq_kernel_cache_hits_total", "Kernel cache hits (memory or SQLite).");
  o << "gpuq_kernel_cache_hits_total " << s.cache_hits << "\n";
  counter("gpuq_kernel_cache_misses_total", "Kernel cache misses (compiles).");
  o << "gpuq_kernel_cache_misses_total " << s.cache_misses << "\n";
  gauge("gpuq_kernel_cache_entries", "Entries in the kernel cache file.");
  o << "gpuq_kernel_cache_entries " << s.cache_entries << "\n";
  gauge("gpuq_kernel_cache_bytes", "Bytes of PTX, CUBIN and logs in the kernel cache file.");
  o << "gpuq_kernel_cache_bytes " << s.cache_bytes << "\n";
  gauge("gpuq_workers", "Workers connected.");
  o << "gpuq_workers " << s.workers.size() << "\n";
  gauge("gpuq_worker_jobs_inflight", "Jobs in flight on each worker.");
  for (const auto& w : s.workers) {
    o << "gpuq_worker_jobs_inflight{worker=\"" << Escape(w.worker) << "\",gpu=\""
      << Escape(w.device.uuid) << "\"} " << w.inflight << "\n";
  }
  gauge("gpuq_worker_heartbeat_age_seconds", "Time since each worker was last heard from.");
  for (const auto& w : s.workers) {
    o << "gpuq_worker_heartbeat_age_seconds{worker=\"" << Escape(w.worker) << "\"} "
      << w.heartbeat_age_ms / 1e3 << "\n";
  }
  gauge("gpuq_device_memory_free_bytes", "Free device memory reported by each worker.");
  for (const auto& w : s.workers) {
    o << "gpuq_device_memory_free_bytes{gpu=\"" << Escape(w.device.uuid) << "\"} "
      << w.device.free_bytes << "\n";
  }
  // GPU health, where the worker reads NVML (PROTOCOL.md, "GPU health").
  auto per_gpu = [&](const char* name, const char* kind, const char* help, auto value) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << kind << "\n";
    for (const auto& w : s.workers) {
      if (!w.health.known) continue;
      o << name << "{gpu=\"" << Escape(w.device.uuid) << "\",worker=\"" << Escape(w.worker)
        << "\"} " << value(w.health) << "\n";
    }
  };
  using H = schema::GpuHealth;
  per_gpu("gpuq_gpu_utilization_ratio", "gauge",
          "GPU utilization over NVML's last sample period, 0 to 1.",
          [](const H& h) { return h.util_pct / 100.0; });
  per_gpu("gpuq_gpu_memory_used_bytes", "gauge", "Device memory in use, by any process.",
          [](const H& h) { return h.mem_used_bytes; });
  per_gpu("gpuq_gpu_temperature_celsius", "gauge", "GPU temperature.",
          [](const H& h) { return h.temp_c; });
  per_gpu("gpuq_gpu_power_watts", "gauge", "GPU power draw.",
          [](const H& h) { return h.power_mw / 1e3; });
  per_gpu("gpuq_gpu_ecc_corrected_errors_total", "counter",
          "Corrected ECC errors since the driver loaded.",
          [](const H& h) { return h.ecc_corrected; });
  per_gpu("gpuq_gpu_ecc_uncorrected_errors_total", "counter",
          "Uncorrectable ECC errors since the driver loaded.",
          [](const H& h) { return h.ecc_uncorrected; });
  per_gpu("gpuq_gpu_xid_events_total", "counter", "Critical Xid events seen by the worker.",
          [](const H& h) { return h.xid_events; });
  gauge("gpuq_gpu_drained", "1 for a GPU drained for its health, else 0.");
  for (const auto& w : s.workers) {
    o << "gpuq_gpu_drained{gpu=\"" << Escape(w.device.uuid) << "\",worker=\"" << Escape(w.worker)
      << "\"} " << (w.health.drain.empty() ? 0 : 1) << "\n";
  }
  gauge("gpuq_uptime_seconds", "Seconds since the broker started.");
  o << "gpuq_uptime_seconds " << s.uptime_s << "\n";
  return o.str();
}

}  // namespace gpuq::broker
