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
  if (job.compiling.count(arch) || job.compile_failed.count(arch) || job.Compiled(arch)) {
    return;
  }
  const schema::JobSpec& spec = *job.spec;
  const uint32_t sources = static_cast<uint32_t>(spec.sources.size() + 1);
  std::vector<compile::EntryPtr>& modules = job.modules[arch];
  modules.assign(sources, nullptr);
  for (uint32_t src = 0; src < sources; ++src) {
    Digest key;
    if (!spec.multi()) {
      // The same kernel as the last job for this architecture (the common
      // case of a scheduler sending one kernel many times): no hashing, no
      // copies.
      const schema::KernelSpec& k = spec.kernel;
      KernelMemo& memo = last_kernel_[arch];
      if (memo.valid && memo.kernel.source == k.source && memo.kernel.options == k.options &&
          memo.kernel.headers == k.headers &&
          memo.kernel.name_expression == k.name_expression &&
          (!k.name_expression || memo.kernel.entry == k.entry)) {
        key = memo.key;
      } else {
        key = compiler_->KeyFor(CompileRequestOf(job, src, arch));
        memo = KernelMemo{k, key, true};
      }
    } else {
      key = compiler_->KeyFor(CompileRequestOf(job, src, arch));
    }
    if (compile::EntryPtr hot = compiler_->Peek(key);
        hot && hot->ok && MissingKernel(job, src, *hot).empty()) {
      ++counters_.cache_hits;
      compile_latency_->Observe(0);
      modules[src] = std::move(hot);
      continue;
    }
    job.compiling.insert(arch);
    auto& waiting = waiting_compile_[{key, arch}];
    waiting.emplace_back(job.id, src);
    if (waiting.size() > 1) continue;  // asked already; the service answers once
    compiler_->Submit(CompileRequestOf(job, src, arch), job.tenant,
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
}

compile::CompileRequest BrokerCore::CompileRequestOf(const Job& job, uint32_t source,
                                                     const std::string& arch) {
  const schema::JobSpec& spec = *job.spec;
  const schema::KernelSpec& k = spec.source(source);
  compile::CompileRequest req;
  req.source = k.source;
  req.headers = k.headers;
  req.options = k.options;
  if (!spec.multi()) {
    if (k.name_expression) req.name_expressions = {k.entry};
  } else {
    for (const schema::KernelLaunch& l : spec.launches) {
      if (l.source != source || !l.name_expression) continue;
      if (std::find(req.name_expressions.begin(), req.name_expressions.end(), l.entry) ==
          req.name_expressions.end()) {
        req.name_expressions.push_back(l.entry);
      }
    }
  }
  req.arch = arch;
  return req;
}

std::string BrokerCore::MissingKernel(const Job& job, uint32_t source,
                                      const compile::CacheEntry& module) {
  const schema::JobSpec& spec = *job.spec;
  // A kernel whose lowered name is longer than a worker reads counts as
  // missing: sent, the job would not decode there.
  auto has = [&module](const std::string& entry) {
    const std::string symbol = module.Symbol(entry);
    return symbol.size() <= schema::Limits::kMaxLoweredNameBytes && module.HasKernel(symbol);
  };
  if (!spec.multi()) return has(spec.kernel.entry) ? "" : spec.kernel.entry;
  for (const schema::KernelLaunch& l : spec.launches) {
    if (l.source == source && !has(l.entry)) return l.entry;
  }
  return "";
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
    for (auto [id, src] : waiting.mapped()) {
      Job* job = jobs_.Find(id);
      // Only a compile still outstanding (an earlier source's failure ends
      // the others' wait).
      if (!job || !job->compiling.count(d.arch)) continue;
      job->compile_us += d.info.wall_us;
      job->cache_hit = job->cache_hit && d.info.cache_hit();
      std::vector<compile::EntryPtr>& modules = job->modules[d.arch];
      Status failed;
      std::string missing;
      if (!d.result.ok()) {
        failed = d.result.status().WithContext("compile for " + d.arch);
      } else if (!(*d.result)->ok) {
        failed = Status((*d.result)->code, (*d.result)->log);
      } else if (missing = MissingKernel(*job, src, **d.result); !missing.empty()) {
        const std::string symbol = (*d.result)->Symbol(missing);
        failed = symbol.size() > schema::Limits::kMaxLoweredNameBytes
                     ? Error(Code::kInvalid, "the kernel '" + missing.substr(0, 256) +
                                                 "' has a lowered name of " +
                                                 std::to_string(symbol.size()) +
                                                 " bytes, over the " +
                                                 std::to_string(schema::Limits::kMaxLoweredNameBytes) +
                                                 " a worker takes")
                     : Error(Code::kInvalid,
                             "no kernel named '" + missing +
                                 "' in the compiled source (is it extern \"C\" __global__, or "
                                 "should 'expr' be set for a C++ name?)");
      } else {
        if (src < modules.size()) modules[src] = *d.result;
        if (job->Compiled(d.arch)) job->compiling.erase(d.arch);
        continue;
      }
      if (job->spec->multi()) failed = failed.WithContext("source " + std::to_string(src));
      job->compiling.erase(d.arch);
      job->modules.erase(d.arch);
      job->compile_failed[d.arch] = failed;
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
  // Regions are mapped by the workers of this host that have their region
  // channel; a job whose region has ended runs nowhere.
  if (job.regions && (!w.local || !region_server_.HasWorker(w.token) || !regions_.Live(job.id))) {
    return false;
  }
  return true;
}

bool BrokerCore::Eligible(Job& job, const Worker& w) {
  if (job.loading || !Matches(job, w)) return false;
  // A job may run while its row commits, but not on input files: a client's
  // file becomes the store's, by that name, in the commit (PROTOCOL.md,
  // "Local buffers").
  if (!job.durable) {
    for (const JobInput& in : job.inputs) {
      if (!in.in_memory) return false;
    }
    // Nor a keyed job that writes a region: its key may turn out, in the
    // commit, to be an earlier job's that the broker no longer holds; the
    // submit then answers that job, and this one must not have written the
    // client's memory (PROTOCOL.md, "submit": `key`).
    if (job.region_writes && !job.key.empty()) return false;
  }
  // Its last requeue's count has not committed: dispatched now and again
  // after a crash, two attempts could share a number (Job::attempts_stored).
  if (job.attempts > job.attempts_stored) return false;
  const schema::Placement& p = job.spec->placement;
  if (p.min_free_bytes && w.device.free_bytes < p.min_free_bytes) return false;
  if (job.suspect && !w.inflight.empty()) return false;
  if (!job.Compiled(w.arch)) {
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
      auto id = jobs_.scheduler().Pop(
          [&](uint64_t jid) {
            Job* j = jobs_.Find(jid);
            return j && Eligible(*j, w);
          },
          64, [&](const std::string& tenant) { return tenants_.MayStart(tenant); });
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
  job.charged_us = jobs_.scheduler().Charged();
  tenants_.Started(job.tenant);
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
  const std::vector<compile::EntryPtr>& modules = job.modules[w.arch];
  const schema::JobSpec& spec = *job.spec;
  schema::BrokerMessage m;
  m.op = schema::BrokerOp::kJob;
  m.id = job.id;
  m.attempt = job.attempt_no;
  m.time_limit_ms = spec.time_limit_ms;
  Frames payload;
  // A module's image goes with the first job that brings it to the worker
  // (PROTOCOL.md, "Module images"); modules are touched in order.
  auto image_of = [&](const compile::CacheEntry& e, const std::string& key) {
    if (w.modules.Touch(key)) return schema::ImageKind::kNone;
    const std::string& image = e.cubin.empty() ? e.ptx : e.cubin;
    payload.emplace_back(image.data(), image.size());
    return e.cubin.empty() ? schema::ImageKind::kPtx : schema::ImageKind::kCubin;
  };
  if (!spec.multi()) {
    const compile::CacheEntry& entry = *modules[0];
    m.module = ToHex(entry.key);
    m.entry = entry.Symbol(spec.kernel.entry);
    m.launch = spec.launch;
    m.args = spec.args;
    m.image = image_of(entry, m.module);
  } else {
    for (const compile::EntryPtr& e : modules) {
      schema::ModuleRef& r = m.modules.emplace_back();
      r.key = ToHex(e->key);
      r.image = image_of(*e, r.key);
    }
    m.launches = spec.launches;
    for (schema::KernelLaunch& l : m.launches) {
      l.entry = modules[l.source]->Symbol(l.entry);
      l.name_expression = false;
    }
    m.buffers = spec.buffers;
    m.graph = spec.graph;
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
  for (auto& a : spec.multi() ? m.buffers : m.args) {
    if ((a.kind == schema::ArgKind::kIn || a.kind == schema::ArgKind::kInOut) &&
        !a.in_region()) {
      a.frame = a.frame < index.size() ? index[a.frame] : a.frame;
    }
  }
  if (w.local && job.spec->local_out) m.out_dir = local_dir_;
  QueueToWorker(w.id, m, std::move(payload));
}

}  // namespace gpuq::broker
