// Compiling queued jobs for the architectures of the workers that could take
// them, and sending them to workers with free slots (BrokerCore, core.h).
#include <spdlog/spdlog.h>

#include "broker/core.h"
#include "broker/frames.h"
#include "util/sha256.h"

namespace gpuq::broker {

using schema::JobState;


// ---------------------------------------------------------------- compiles

void BrokerCore::RequestCompile(Job& job, const std::string& arch) {
  if (job.modules.count(arch) || job.compiling.count(arch) || job.compile_failed.count(arch)) {
    return;
  }
  const schema::KernelSpec& k = job.spec->kernel;
  // The same kernel as the last job for this architecture (the common case
  // of a scheduler sending one kernel many times): no hashing, no copies.
  KernelMemo& memo = last_kernel_[arch];
  Digest key;
  if (memo.valid && memo.kernel.source == k.source && memo.kernel.options == k.options &&
      memo.kernel.headers == k.headers && memo.kernel.name_expression == k.name_expression &&
      (!k.name_expression || memo.kernel.entry == k.entry)) {
    key = memo.key;
  } else {
    key = compiler_->KeyFor(CompileRequestOf(job, arch));
    memo = KernelMemo{k, key, true};
  }
  if (compile::EntryPtr hot = compiler_->Peek(key); hot && hot->ok) {
    if (hot->HasKernel(hot->Symbol(k.entry))) {
      ++counters_.cache_hits;
      compile_latency_->Observe(0);
      job.modules[arch] = std::move(hot);
      return;
    }
  }
  job.compiling.insert(arch);
  auto& waiting = waiting_compile_[{key, arch}];
  waiting.push_back(job.id);
  if (waiting.size() > 1) return;  // asked already; the service answers once
  compiler_->Submit(CompileRequestOf(job, arch), job.tenant,
                    [this, arch](const Digest& done_key, StatusOr<compile::EntryPtr> result,
                                 const compile::CompileInfo& info) {
                      {
                        MutexLock lock(&compile_mu_);
                        compiled_.push_back(
                            CompileDone{done_key, arch, std::move(result), info});
                      }
                      wake_();
                    });
}

compile::CompileRequest BrokerCore::CompileRequestOf(const Job& job, const std::string& arch) {
  compile::CompileRequest req;
  req.source = job.spec->kernel.source;
  req.headers = job.spec->kernel.headers;
  req.options = job.spec->kernel.options;
  if (job.spec->kernel.name_expression) req.name_expressions = {job.spec->kernel.entry};
  req.arch = arch;
  return req;
}

void BrokerCore::OnCompilesDone() {
  std::vector<CompileDone> done;
  {
    MutexLock lock(&compile_mu_);
    done.swap(compiled_);
  }
  for (CompileDone& d : done) {
    auto waiting = waiting_compile_.extract({d.key, d.arch});
    if (waiting.empty()) continue;
    if (d.info.cache_hit()) {
      ++counters_.cache_hits;
    } else {
      ++counters_.cache_misses;
      if (cache_changed) cache_changed();
    }
    compile_latency_->Observe(d.info.wall_us);
    for (uint64_t id : waiting.mapped()) {
      Job* job = jobs_.Find(id);
      if (!job) continue;
      job->compiling.erase(d.arch);
      job->compile_us += d.info.wall_us;
      job->cache_hit = job->cache_hit && d.info.cache_hit();
      if (job->state != JobState::kQueued) continue;
      if (!d.result.ok()) {
        job->compile_failed[d.arch] = d.result.status().WithContext("compile for " + d.arch);
      } else if (!(*d.result)->ok) {
        job->compile_failed[d.arch] = Status((*d.result)->code, (*d.result)->log);
      } else if (!(*d.result)->HasKernel((*d.result)->Symbol(job->spec->kernel.entry))) {
        job->compile_failed[d.arch] = Error(
            Code::kInvalid, "no kernel named '" + job->spec->kernel.entry +
                                "' in the compiled source (is it extern \"C\" __global__, or "
                                "should 'expr' be set for a C++ name?)");
      } else {
        job->modules[d.arch] = *d.result;
        continue;
      }
      CheckCompileViable(*job);
    }
  }
}

void BrokerCore::CheckCompileViable(Job& job) {
  if (job.state != JobState::kQueued || job.compile_failed.empty()) return;
  bool any_worker = false;
  for (const auto& [id, w] : workers_.all()) {
    if (!Matches(job, w)) continue;
    any_worker = true;
    if (!job.compile_failed.count(w.arch)) return;  // compiled, compiling, or not yet asked
  }
  if (!any_worker) return;  // the workers it could run on may come (FailUnmatched)
  // Every architecture it could run on failed: the first failure's reason.
  const Status& why = job.compile_failed.begin()->second;
  Finish(job, JobState::kFailed, why.code(), why.message());
}

// ---------------------------------------------------------------- dispatch

bool BrokerCore::Matches(const Job& job, const Worker& w) const {
  const schema::Placement& p = job.spec->placement;
  if (!p.arch.empty() && p.arch != w.arch) return false;
  if (!p.gpu.empty() && p.gpu != w.device.uuid) return false;
  if (p.min_free_bytes && w.device.total_bytes < p.min_free_bytes) return false;
  return true;
}

bool BrokerCore::Eligible(Job& job, const Worker& w) {
  if (job.loading || !Matches(job, w)) return false;
  // Its last requeue's count has not committed: dispatched now and again
  // after a crash, two attempts could share a number (Job::attempts_stored).
  if (job.attempts > job.attempts_stored) return false;
  const schema::Placement& p = job.spec->placement;
  if (p.min_free_bytes && w.device.free_bytes < p.min_free_bytes) return false;
  if (job.suspect && !w.inflight.empty()) return false;
  if (!job.modules.count(w.arch)) {
    RequestCompile(job, w.arch);
    return false;
  }
  return true;
}

void BrokerCore::Dispatch() {
  if (jobs_.scheduler().size() == 0) return;
  // Round robin over workers, one job at a time, while any has a slot.
  bool progress = true;
  while (progress && jobs_.scheduler().size() > 0) {
    progress = false;
    for (auto it = workers_.all().begin(); it != workers_.all().end();) {
      Worker& w = it->second;
      ++it;  // SendJob may lose the worker
      if (w.credits == 0 || w.exclusive || !w.drained.empty()) continue;
      auto id = jobs_.scheduler().Pop([&](uint64_t jid) {
        Job* j = jobs_.Find(jid);
        return j && Eligible(*j, w);
      });
      if (!id) continue;
      SendJob(w, *jobs_.Find(*id));
      progress = true;
    }
  }
  FlushWorkers();
}

void BrokerCore::SendJob(Worker& w, Job& job) {
  job.state = JobState::kDispatched;
  job.worker = w.id;
  job.dispatched = clock_->Now();
  ++job.attempts;
  // Strictly increasing across restarts too: a restart raises the epoch by
  // one, and a job is dispatched at most once between two of its stored
  // attempt counts (Eligible; PROTOCOL.md, "Worker lifecycle").
  job.attempt_no = static_cast<uint32_t>(std::min<uint64_t>(job.attempts + epoch_, UINT32_MAX));
  workers_.Dispatched(w, job.id, job.attempt_no, job.suspect);
  bool needs_load = false;
  for (const JobInput& in : job.inputs) {
    if (!in.in_memory && (in.path.empty() || !w.local)) needs_load = true;
  }
  if (!needs_load) return SendLoaded(w, job);
  // Inputs not in memory (a resumed job's, or files for a worker elsewhere)
  // are read by the store thread first.
  job.loading = true;
  ReadOp r;
  r.kind = ReadOp::Kind::kInputs;
  r.id = job.id;
  r.read_files = !w.local;
  r.purpose = kReadDispatch;
  r.worker = w.id;
  r.attempt = job.attempt_no;
  batch_->reads.push_back(std::move(r));
}

void BrokerCore::OnDispatchInputs(ReadOp& r) {
  Job* job = jobs_.Find(r.id);
  // Only the dispatch the read was for (its worker may have been lost, and
  // the job sent elsewhere, meanwhile).
  if (!job || !job->loading || job->state != JobState::kDispatched ||
      job->worker != r.worker || job->attempt_no != r.attempt) {
    return;
  }
  job->loading = false;
  Worker* w = workers_.Find(r.worker);
  if (!w) return;
  if (!r.status.ok() || r.inputs.size() != job->inputs.size()) {
    workers_.TakeResult(*w, job->id, job->attempt_no);
    Finish(*job, JobState::kFailed, Code::kIoError,
           r.status.ok() ? "the store holds " + std::to_string(r.inputs.size()) +
                               " inputs, the job names " + std::to_string(job->inputs.size())
                         : r.status.message());
    return;
  }
  for (size_t i = 0; i < job->inputs.size(); ++i) {
    JobInput& in = job->inputs[i];
    if (in.in_memory) continue;
    StoredBuffer& b = r.inputs[i];
    if (b.path.empty()) {
      in.bytes = Owning(std::move(b.bytes));
      in.in_memory = true;
    }
  }
  SendLoaded(*w, *job);
}

void BrokerCore::SendLoaded(Worker& w, Job& job) {
  const compile::EntryPtr& entry = job.modules[w.arch];
  schema::BrokerMessage m;
  m.op = schema::BrokerOp::kJob;
  m.id = job.id;
  m.attempt = job.attempt_no;
  m.module = ToHex(entry->key);
  m.entry = entry->Symbol(job.spec->kernel.entry);
  m.launch = job.spec->launch;
  m.time_limit_ms = job.spec->time_limit_ms;
  m.args = job.spec->args;
  Frames payload;
  if (!w.modules.Touch(m.module)) {
    m.image = entry->cubin.empty() ? schema::ImageKind::kPtx : schema::ImageKind::kCubin;
    const std::string& image = entry->cubin.empty() ? entry->ptx : entry->cubin;
    payload.emplace_back(image.data(), image.size());
  }
  // Inputs in memory go as frames; files as files (to a local worker).
  const uint32_t first = static_cast<uint32_t>(payload.size());
  std::vector<uint32_t> index(job.inputs.size());
  std::vector<size_t> as_file;
  for (size_t i = 0; i < job.inputs.size(); ++i) {
    JobInput& in = job.inputs[i];
    if (in.in_memory) {
      index[i] = static_cast<uint32_t>(payload.size());
      payload.push_back(Share(in.bytes));
    } else {
      as_file.push_back(i);
    }
  }
  for (size_t k = 0; k < as_file.size(); ++k) {
    index[as_file[k]] = static_cast<uint32_t>(payload.size() - first + k) + first;
    m.files.push_back({job.inputs[as_file[k]].path, job.inputs[as_file[k]].size});
  }
  for (auto& a : m.args) {
    if (a.kind == schema::ArgKind::kIn || a.kind == schema::ArgKind::kInOut) {
      a.frame = a.frame < index.size() ? index[a.frame] : a.frame;
    }
  }
  if (w.local && job.spec->local_out) m.out_dir = local_dir_;
  QueueToWorker(w.id, m, std::move(payload));
}

}  // namespace gpuq::broker
