#include "broker/tenants.h"

#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "util/fd.h"

namespace gpuq::broker {
namespace {

using json = nlohmann::json;

Status Bad(const std::string& where, const std::string& what) {
  return Error(Code::kInvalid, "tenants file: " + where + ": " + what);
}

// Fields of `in` over `base`.
Status ParsePolicy(const json& in, const std::string& where, TenantPolicy base,
                   TenantPolicy* out) {
  if (!in.is_object()) return Bad(where, "must be an object");
  for (const auto& [key, v] : in.items()) {
    const std::string at = where + "." + key;
    if (key == "weight") {
      if (!v.is_number()) return Bad(at, "must be a number");
      const double w = v.get<double>();
      if (!(w > 0) || w > 1e6 || !std::isfinite(w)) return Bad(at, "must be above 0 and at most 1e6");
      base.weight = w;
    } else if (key == "jobs_per_s" || key == "bytes_per_s") {
      if (!v.is_number()) return Bad(at, "must be a number");
      const double r = v.get<double>();
      if (!(r >= 0) || !std::isfinite(r)) return Bad(at, "must be 0 (no limit) or more");
      (key == "jobs_per_s" ? base.jobs_per_s : base.bytes_per_s) = r;
    } else if (key == "max_concurrent" || key == "max_queued" || key == "max_queued_bytes") {
      if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0)) {
        return Bad(at, "must be a whole number, 0 (no limit) or more");
      }
      const uint64_t n = v.get<uint64_t>();
      if (key == "max_concurrent") {
        if (n > UINT32_MAX) return Bad(at, "is too large");
        base.max_concurrent = static_cast<uint32_t>(n);
      } else {
        (key == "max_queued" ? base.max_queued : base.max_queued_bytes) = n;
      }
    } else {
      return Bad(at, "unknown field (weight, max_concurrent, jobs_per_s, bytes_per_s, "
                     "max_queued, max_queued_bytes)");
    }
  }
  *out = base;
  return Status::Ok();
}

}  // namespace

StatusOr<TenantPolicies> TenantPolicies::Parse(std::string_view text) {
  json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Bad("(file)", "not valid JSON");
  if (!doc.is_object()) return Bad("(file)", "must be a JSON object");
  TenantPolicies p;
  if (doc.contains("default")) {
    GPUQ_RETURN_IF_ERROR(ParsePolicy(doc["default"], "default", TenantPolicy{}, &p.defaults_));
  }
  for (const auto& [key, v] : doc.items()) {
    if (key == "default") continue;
    if (key != "tenants") return Bad(key, "unknown field (default, tenants)");
    if (!v.is_object()) return Bad("tenants", "must be an object of tenant names");
    for (const auto& [name, policy] : v.items()) {
      if (name.empty() || name.size() > 64) {
        return Bad("tenants", "a tenant name is 1 to 64 bytes");
      }
      TenantPolicy t;
      GPUQ_RETURN_IF_ERROR(ParsePolicy(policy, "tenants." + name, p.defaults_, &t));
      p.tenants_[name] = t;
      p.any_max_concurrent_ |= t.max_concurrent != 0;
    }
  }
  p.any_max_concurrent_ |= p.defaults_.max_concurrent != 0;
  return p;
}

StatusOr<TenantPolicies> TenantPolicies::Load(const std::string& path) {
  // Read on the broker's loop (SIGHUP): a FIFO or a device named here held
  // it, and a file of any size was read whole before its size was checked.
  // Links are followed (a Kubernetes ConfigMap's files are links); what
  // they reach must be a regular file of at most 1 MiB.
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  if (!fd.valid()) {
    return Error(Code::kIoError, "tenants file " + path + ": cannot be read: " + strerror(errno));
  }
  struct stat st {};
  if (fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) return Bad(path, "not a regular file");
  if (st.st_size > (1 << 20)) return Bad(path, "over 1 MiB");
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < text.size()) {
    const ssize_t n = pread(fd.get(), text.data() + got, text.size() - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  text.resize(got);  // a file that shrank meanwhile: what it holds now
  return Parse(text);
}

const TenantPolicy& TenantPolicies::For(const std::string& tenant) const {
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? defaults_ : it->second;
}

namespace {

// A rate as the tenants file may give it: 2000, 0.5, 2e+09.
std::string Rate(double r) {
  char buf[32];
  snprintf(buf, sizeof buf, "%.15g", r);
  return buf;
}

}  // namespace

bool TokenBucket::Take(double rate, double n, MonoTime now, uint64_t* retry_after_ms) {
  const double capacity = rate;  // one second's worth
  if (!used_) {
    used_ = true;
    tokens_ = capacity;
  } else {
    const double dt = std::chrono::duration<double>(now - last_).count();
    tokens_ = std::min(capacity, tokens_ + std::max(0.0, dt) * rate);
  }
  last_ = now;
  // A request larger than the bucket passes once it is full (and leaves it
  // in debt).
  if (tokens_ >= n || (n > capacity && tokens_ >= capacity)) {
    tokens_ -= n;
    return true;
  }
  const double missing = std::min(n, capacity) - tokens_;
  // At most a day: the wait of a tiny rate (1e-20/s) or a deep debt is no
  // number a client can use, nor one a u64 holds.
  const double ms = std::ceil(missing / rate * 1000.0);
  *retry_after_ms = !(ms < static_cast<double>(kMaxRetryAfterMs))
                        ? kMaxRetryAfterMs
                        : static_cast<uint64_t>(std::max(1.0, ms));
  return false;
}

Status TenantLimits::Admit(const std::string& tenant, uint64_t bytes, MonoTime now,
                           uint64_t* retry_after_ms) {
  const TenantPolicy& p = policies_.For(tenant);
  if (p.jobs_per_s <= 0 && p.bytes_per_s <= 0) return Status::Ok();
  if (buckets_.size() > kPruneAbove) {
    std::erase_if(buckets_, [&](const auto& e) { return now - e.second.last > std::chrono::seconds(1); });
  }
  Buckets& b = buckets_[tenant];
  b.last = now;
  // Both buckets must have room before either is taken from.
  TokenBucket jobs = b.jobs, byte_bucket = b.bytes;
  uint64_t wait = 0;
  if (p.jobs_per_s > 0 && !jobs.Take(p.jobs_per_s, 1, now, &wait)) {
    *retry_after_ms = wait;
    return Error(Code::kQuotaExceeded,
                 "tenant '" + tenant + "' is over its rate of " + Rate(p.jobs_per_s) +
                     " jobs/s");
  }
  if (p.bytes_per_s > 0 && bytes > 0 &&
      !byte_bucket.Take(p.bytes_per_s, static_cast<double>(bytes), now, &wait)) {
    *retry_after_ms = wait;
    return Error(Code::kQuotaExceeded,
                 "tenant '" + tenant + "' is over its rate of " + Rate(p.bytes_per_s) +
                     " input bytes/s");
  }
  b.jobs = jobs;
  b.bytes = byte_bucket;
  return Status::Ok();
}

bool TenantLimits::MayStart(const std::string& tenant) const {
  if (!policies_.any_max_concurrent()) return true;
  const uint32_t cap = policies_.For(tenant).max_concurrent;
  return cap == 0 || Running(tenant) < cap;
}

void TenantLimits::Stopped(const std::string& tenant) {
  auto it = running_.find(tenant);
  if (it == running_.end()) return;
  if (--it->second == 0) running_.erase(it);
}

uint32_t TenantLimits::Running(const std::string& tenant) const {
  auto it = running_.find(tenant);
  return it == running_.end() ? 0 : it->second;
}

}  // namespace gpuq::broker
