// The GPU workers connected to the broker: their devices, credits, the jobs
// they hold and the modules they keep (PROTOCOL.md, "Worker ↔ broker").
//
// Invariants: a worker holds at most `slots` jobs (credits + inflight ==
// slots); a job is in a worker's inflight set exactly while the broker has
// it dispatched there under that attempt number. A result counts only when
// its (job, attempt) is in that set: anything else is stale and changes
// nothing.
//
// Owned by the broker loop thread: not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "schema/messages.h"
#include "util/clock.h"

namespace gpuq::broker {

// The modules a worker holds: the same LRU the worker keeps (PROTOCOL.md,
// "Module images"), touched in the order jobs are sent.
class ModuleSet {
 public:
  explicit ModuleSet(size_t capacity = 0) : capacity_(capacity) {}
  // Returns true if the worker already has `key`; records it as most recent.
  bool Touch(const std::string& key);

 private:
  size_t capacity_;
  std::list<std::string> order_;
  std::unordered_map<std::string, std::list<std::string>::iterator> index_;
};

struct Worker {
  std::string id;  // routing id
  std::string name;
  schema::DeviceInfo device;
  std::string arch;
  uint32_t slots = 0, credits = 0;
  struct Held {
    uint32_t attempt = 0;
    bool abandoned = false;  // the broker no longer waits for its result
    // Abandoned while it may still run: it counts among `tenant`'s jobs on
    // GPUs until the worker answers for it or is gone.
    bool tenant_counted = false;
    std::string tenant;
    // When a heartbeat first named it among the jobs the worker has begun
    // (PROTOCOL.md, "Worker lifecycle"); unset until then.
    std::optional<MonoTime> started;
  };
  std::map<uint64_t, Held> inflight;  // by job id
  ModuleSet modules;
  MonoTime last_seen;
  // Its heartbeats name the jobs it has begun (`running`); and when it last
  // began or ended one, which a worker holding jobs it has not begun must
  // keep doing (EnforceLimits).
  bool reports_running = false;
  MonoTime last_progress;
  bool exclusive = false;  // running a suspect alone
  schema::GpuHealth health;  // as its latest ready or heartbeat said
  // Why its GPU takes no more jobs (a critical Xid, an uncorrectable ECC
  // error); empty while it serves. Kept until the worker registers again.
  std::string drained;
  bool local = false;      // on this host: reads and writes the local directory
  // Its liveness connection (PROTOCOL.md, "Liveness"): heartbeats with its
  // token come there, and the broker's go there, beside whatever bulk data
  // its own connection carries. Empty until the first such heartbeat.
  std::string token, liveness_id;
};

class WorkerRegistry {
 public:
  // Registers the worker of a `ready` message. kInvalid (and nothing
  // registered) for a worker that announces no slots, or whose architecture
  // `can_target` refuses. A worker that registers again must have been
  // removed first (the broker treats that as a loss).
  StatusOr<Worker*> Ready(const std::string& id, const schema::WorkerMessage& ready, bool local,
                          MonoTime now, const std::function<bool(const std::string&)>& can_target);
  Worker* Find(const std::string& id);
  // The worker registered with `token`, or null.
  Worker* FindByToken(const std::string& token);
  // Takes the worker out; returns it with the jobs it held.
  Worker Remove(const std::string& id);

  // Records a job sent to `w`: a credit spent, the attempt remembered.
  void Dispatched(Worker& w, uint64_t job, uint32_t attempt, bool suspect);
  // A result of (job, attempt) from `w`. kCurrent or kAbandoned: `w` holds
  // that attempt, and its slot is free again; kStale: it does not, and
  // nothing changed.
  enum class ResultFor { kCurrent, kAbandoned, kStale };
  // `counted_tenant`, if given, is set to the tenant of an abandoned attempt
  // that still counted among that tenant's jobs on GPUs (Abandon), else
  // left as it was.
  ResultFor TakeResult(Worker& w, uint64_t job, uint32_t attempt,
                       std::optional<std::string>* counted_tenant = nullptr);
  // Marks a job whose result the broker no longer waits for (it ended on the
  // broker's side: canceled). Its slot stays taken until the worker answers
  // or is lost; so does its place among `tenant`'s jobs on GPUs when a
  // tenant is given.
  void Abandon(Worker& w, uint64_t job, std::optional<std::string> tenant = std::nullopt);

  // Workers not heard from since `before`.
  std::vector<std::string> SilentSince(MonoTime before) const;
  // The distinct architectures of the connected workers.
  const std::vector<std::string>& archs() const { return archs_; }
  size_t size() const { return workers_.size(); }
  std::map<std::string, Worker>& all() { return workers_; }
  const std::map<std::string, Worker>& all() const { return workers_; }

 private:
  void ArchsChanged();
  std::map<std::string, Worker> workers_;
  std::map<std::string, std::string> by_token_;  // token -> routing id
  std::vector<std::string> archs_;
};

}  // namespace gpuq::broker
