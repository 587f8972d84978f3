// Tenants: what each may use (the tenants file, docs/OPERATIONS.md
// "Tenants"), and the loop's state that enforces it — rate limits as token
// buckets broker-wide, jobs running at once. Weights are the scheduler's
// (scheduler.h): GPU time divides in proportion to them among backlogged
// tenants.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>

#include "util/clock.h"
#include "util/status.h"

namespace gpuq::broker {

// What one tenant may use. 0 means no limit of its own (max_queued: the
// broker's --max-queued-per-tenant).
struct TenantPolicy {
  double weight = 1;              // share of GPU time when backlogged, > 0
  uint32_t max_concurrent = 0;    // jobs on GPUs at once
  double jobs_per_s = 0;          // submits accepted per second (token bucket)
  double bytes_per_s = 0;         // input bytes accepted per second (token bucket)
  uint64_t max_queued = 0;        // jobs accepted and not yet ended
  uint64_t max_queued_bytes = 0;  // their input bytes
  bool operator==(const TenantPolicy&) const = default;
};

// A tenants file, parsed and checked: a JSON object
//   {"default": POLICY, "tenants": {"NAME": POLICY, ...}}
// where POLICY is an object of the fields above ("weight", "max_concurrent",
// "jobs_per_s", "bytes_per_s", "max_queued", "max_queued_bytes"), each
// optional; a tenant's missing fields are the default's. Unknown keys,
// wrong types and values out of range are errors (kInvalid, naming them).
class TenantPolicies {
 public:
  static StatusOr<TenantPolicies> Parse(std::string_view json);
  static StatusOr<TenantPolicies> Load(const std::string& path);

  const TenantPolicy& For(const std::string& tenant) const;
  const TenantPolicy& defaults() const { return defaults_; }
  // Whether any tenant has a limit on jobs at once (the dispatcher asks for
  // every job otherwise).
  bool any_max_concurrent() const { return any_max_concurrent_; }
  size_t size() const { return tenants_.size(); }

 private:
  TenantPolicy defaults_;
  std::map<std::string, TenantPolicy, std::less<>> tenants_;
  bool any_max_concurrent_ = false;
};

// A token bucket: `rate` tokens a second, holding at most one second's
// worth. A request larger than that passes when the bucket is full and
// leaves it in debt, so that no request is refused for ever.
class TokenBucket {
 public:
  // Takes `n` tokens at `now`; false, with the wait until they are there,
  // when there are not enough.
  bool Take(double rate, double n, MonoTime now, uint64_t* retry_after_ms);
  // The longest wait it gives (a day).
  static constexpr uint64_t kMaxRetryAfterMs = 86'400'000;

 private:
  bool used_ = false;  // starts full
  double tokens_ = 0;  // below 0: in debt
  MonoTime last_{};
};

// The loop's view of every tenant against its policy. Owned by the broker
// loop thread: not thread-safe.
class TenantLimits {
 public:
  explicit TenantLimits(TenantPolicies policies) : policies_(std::move(policies)) {}

  const TenantPolicy& Policy(const std::string& tenant) const { return policies_.For(tenant); }
  // New policies (a reload); rate buckets and running counts carry over.
  void Reconfigure(TenantPolicies policies) { policies_ = std::move(policies); }
  const TenantPolicies& policies() const { return policies_; }

  // A submit of `bytes` by `tenant` at `now` against its rate limits:
  // kQuotaExceeded naming the limit, with a retry hint, or Ok (and the
  // tokens are taken).
  Status Admit(const std::string& tenant, uint64_t bytes, MonoTime now,
               uint64_t* retry_after_ms);

  // Jobs on GPUs: whether `tenant` may start one more, and the counts.
  bool MayStart(const std::string& tenant) const;
  void Started(const std::string& tenant) { ++running_[tenant]; }
  void Stopped(const std::string& tenant);
  uint32_t Running(const std::string& tenant) const;

 private:
  struct Buckets {
    TokenBucket jobs, bytes;
    MonoTime last{};
  };
  // Buckets idle for a second are full again: forgotten once there are
  // many (tenant names on the ipc endpoint are the caller's word).
  static constexpr size_t kPruneAbove = 4096;
  TenantPolicies policies_;
  std::unordered_map<std::string, Buckets> buckets_;
  std::unordered_map<std::string, uint32_t> running_;
};

}  // namespace gpuq::broker
