// The broker's side of the worker protocol (PROTOCOL.md, "Worker ↔
// broker"): registration, heartbeats, results, and what happens to the jobs
// of a worker that is lost.
#include <spdlog/spdlog.h>

#include <zmq_addon.hpp>

#include "broker/core.h"
#include "schema/codec.h"
#include "schema/filename.h"

namespace gpuq::broker {

using schema::BrokerMessage;
using schema::BrokerOp;
using schema::JobState;
using schema::WorkerMessage;
using schema::WorkerOp;

namespace {

std::string_view View(const zmq::message_t& m) {
  return {static_cast<const char*>(m.data()), m.size()};
}

// Checks a done result's outputs against the job: every out and inout
// argument exactly once, each of its size (an out its declared size, an
// inout its input's), frames first and then files as the worker listed them.
Status CheckOutputs(const Job& job, const WorkerMessage& m, const Frames& frames) {
  const size_t nframes = frames.size() - 3;
  if (m.outputs.size() != nframes + m.files.size()) {
    return Error(Code::kInternal, "it listed " + std::to_string(m.outputs.size()) +
                                      " outputs for " + std::to_string(nframes) + " frames and " +
                                      std::to_string(m.files.size()) + " files");
  }
  const std::vector<schema::Arg>& args = job.spec->buffer_list();
  std::vector<bool> seen(args.size(), false);
  for (size_t i = 0; i < m.outputs.size(); ++i) {
    const uint32_t a = m.outputs[i];
    if (a >= args.size() ||
        (args[a].kind != schema::ArgKind::kOut && args[a].kind != schema::ArgKind::kInOut) ||
        args[a].in_region()) {
      return Error(Code::kInternal, "output " + std::to_string(i) + " names argument " +
                                        std::to_string(a) +
                                        ", which is not an out or inout buffer sent back");
    }
    if (seen[a]) {
      return Error(Code::kInternal, "argument " + std::to_string(a) + " has two outputs");
    }
    seen[a] = true;
    const uint64_t size = i < nframes ? frames[3 + i].size() : m.files[i - nframes].size;
    const uint64_t want = args[a].kind == schema::ArgKind::kOut
                              ? args[a].size
                              : (args[a].frame < job.inputs.size() ? job.inputs[args[a].frame].size
                                                                   : 0);
    if (size != want) {
      return Error(Code::kInternal, "the output of argument " + std::to_string(a) + " holds " +
                                        std::to_string(size) + " bytes, not " +
                                        std::to_string(want));
    }
  }
  for (size_t a = 0; a < args.size(); ++a) {
    if ((args[a].kind == schema::ArgKind::kOut || args[a].kind == schema::ArgKind::kInOut) &&
        !args[a].in_region() && !seen[a]) {
      return Error(Code::kInternal, "the output of argument " + std::to_string(a) + " is missing");
    }
  }
  return Status::Ok();
}

}  // namespace

bool BrokerCore::SendWorker(const std::string& id, const BrokerMessage& m, Frames* payload) {
  const std::string header = schema::EncodeBrokerMessage(m);
  const bool has_payload = payload && !payload->empty();
  try {
    if (!worker_sock_.send(zmq::buffer(id), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) {
      return false;
    }
    worker_sock_.send(zmq::buffer(schema::kWorkerProtocol), zmq::send_flags::sndmore);
    worker_sock_.send(zmq::buffer(header),
                      has_payload ? zmq::send_flags::sndmore : zmq::send_flags::none);
    if (has_payload) {
      for (size_t i = 0; i < payload->size(); ++i) {
        worker_sock_.send((*payload)[i], i + 1 < payload->size() ? zmq::send_flags::sndmore
                                                                 : zmq::send_flags::none);
      }
    }
    return true;
  } catch (const zmq::error_t& e) {
    spdlog::warn("worker unreachable: {}", e.what());
    return false;
  }
}

void BrokerCore::OnWorkerFrames(Frames& frames) {
  // A batch is its messages, taken in order as if sent one by one.
  if (frames.size() >= 3 && schema::IsBatch(View(frames[2]))) {
    std::vector<uint64_t> sizes;
    for (size_t i = 3; i < frames.size(); ++i) sizes.push_back(frames[i].size());
    schema::Batch batch;
    if (Status s = schema::DecodeBatch(View(frames[2]), sizes, opt_.limits, &batch); !s.ok()) {
      BrokerMessage m;
      m.op = BrokerOp::kError;
      m.code = s.code();
      m.error = s.message();
      SendWorker(std::string(View(frames[0])), m);
      return;
    }
    size_t next = 3;
    for (uint32_t n : batch.parts) {
      Frames one;
      one.emplace_back().copy(frames[0]);
      one.emplace_back().copy(frames[1]);
      for (uint32_t i = 0; i < n; ++i) one.push_back(std::move(frames[next++]));
      OnWorkerMessage(one);
    }
    return;
  }
  OnWorkerMessage(frames);
}

void BrokerCore::OnWorkerMessage(Frames& frames) {
  if (frames.empty()) return;
  const std::string id(View(frames[0]));
  auto refuse = [&](const Status& s) {
    BrokerMessage m;
    m.op = BrokerOp::kError;
    m.code = s.code();
    m.error = s.message();
    SendWorker(id, m);
  };
  if (frames.size() < 3) {
    return refuse(Error(Code::kMalformed, "a message is [protocol, header, payload...]"));
  }
  if (Status s = schema::CheckProtocolFrame(View(frames[1]), schema::kWorkerProtocol); !s.ok()) {
    return refuse(s);
  }
  std::vector<uint64_t> sizes;
  for (size_t i = 3; i < frames.size(); ++i) sizes.push_back(frames[i].size());
  WorkerMessage m;
  if (Status s = schema::DecodeWorkerMessage(View(frames[2]), sizes, opt_.limits, &m); !s.ok()) {
    return refuse(s);
  }
  const auto now = clock_->Now();
  if (m.op == WorkerOp::kReady) {
    if (workers_.Find(id)) WorkerLost(id, "it registered again", /*lives=*/true);
    const bool local = !m.local_dir.empty() && m.local_dir == local_dir_;
    auto w = workers_.Ready(id, m, local, now,
                            [this](const std::string& arch) { return compiler_->CanTarget(arch); });
    if (!w.ok()) {
      spdlog::warn("refused worker {} ({}, {}): {}", m.worker, m.device.name,
                   m.device.uuid, w.status().message());
      return refuse(w.status());
    }
    spdlog::info("worker {} ready: {} ({}, {}), {} slots", (*w)->name, (*w)->device.name,
                 (*w)->arch, (*w)->device.uuid, (*w)->slots);
    if ((*w)->local && !(*w)->token.empty()) region_server_.WorkerReady((*w)->token);
    if (!m.health.drain.empty()) return OnHealth(**w, m.health);
    // Queued jobs may now run on this architecture.
    const std::string arch = (*w)->arch;
    jobs_.ForEach([&](Job& job) {
      if (job.state == JobState::kQueued && Matches(job, **w)) {
        job.last_matched = now;
        RequestCompile(job, arch);
      }
    });
    return;
  }
  Worker* w = workers_.Find(id);
  if (!w && m.op == WorkerOp::kHeartbeat && !m.token.empty()) {
    // A heartbeat on a worker's liveness connection: its token names it.
    if (Worker* named = workers_.FindByToken(m.token)) {
      if (named->liveness_id != id) {
        spdlog::debug("worker {}: heartbeats on its liveness connection", named->name);
      }
      named->liveness_id = id;
      named->last_seen = now;
      return OnHeartbeat(*named, m, now);
    }
  }
  if (!w) {
    // A worker from before a broker restart, or one declared gone.
    BrokerMessage bye;
    bye.op = BrokerOp::kDisconnect;
    bye.error = "unknown worker: send ready";
    SendWorker(id, bye);
    return;
  }
  w->last_seen = now;
  switch (m.op) {
    case WorkerOp::kHeartbeat:
      return OnHeartbeat(*w, m, now);
    case WorkerOp::kResult:
      w->last_progress = now;
      OnWorkerResult(*w, m, frames);
      // Whatever the result was (current, abandoned, stale): this worker no
      // longer runs that job, and stops writing its regions.
      return Answered(m.id, id);
    case WorkerOp::kDisconnect:
      return WorkerLost(id, "it disconnected: " + m.reason);
    case WorkerOp::kReady:
      return;
  }
}

void BrokerCore::OnHeartbeat(Worker& w, const WorkerMessage& m, MonoTime now) {
  w.device.free_bytes = m.free_bytes;
  if (m.running) {
    // The jobs it has begun: each one's run-time limit counts from the
    // first heartbeat that names it (EnforceLimits).
    w.reports_running = true;
    for (const WorkerMessage::Running& r : *m.running) {
      auto it = w.inflight.find(r.id);
      if (it == w.inflight.end() || it->second.attempt != r.attempt || it->second.started) {
        continue;
      }
      it->second.started = now;
      w.last_progress = now;
    }
  }
  if (m.health.known) OnHealth(w, m.health);
}

void BrokerCore::OnWorkerResult(Worker& w, WorkerMessage& m, Frames& frames) {
  // Nothing changes unless the worker holds this very attempt (a stale
  // result from an earlier attempt or another broker lifetime changes
  // nothing at all); the files it names are removed.
  std::optional<std::string> counted;
  const auto held = workers_.TakeResult(w, m.id, m.attempt, &counted);
  if (counted) tenants_.Stopped(*counted);  // an abandoned attempt has ended
  if (held != WorkerRegistry::ResultFor::kCurrent) return DropPeerFiles(m.files, schema::kWorkerFilePrefix);
  Job* job = jobs_.Find(m.id);
  if (!job || job->state != JobState::kDispatched || job->worker != w.id ||
      job->attempt_no != m.attempt) {
    return DropPeerFiles(m.files, schema::kWorkerFilePrefix);
  }
  if (!m.files.empty() && !(w.local && job->spec->local_out)) {
    DropPeerFiles(m.files, schema::kWorkerFilePrefix);
    Finish(*job, JobState::kFailed, Code::kInternal,
           "worker " + w.name + " returned files it was not asked for");
    return;
  }
  if (m.state == JobState::kDone) {
    if (Status s = CheckOutputs(*job, m, frames); !s.ok()) {
      DropPeerFiles(m.files, schema::kWorkerFilePrefix);
      BrokerMessage refusal;
      refusal.op = BrokerOp::kError;
      refusal.code = s.code();
      refusal.error = "result of job " + std::to_string(m.id) + " refused: " + s.message();
      SendWorker(w.id, refusal);
      spdlog::warn("worker {}: {}", w.name, refusal.error);
      Finish(*job, JobState::kFailed, Code::kInternal,
             "worker " + w.name + " returned a result without every output: " + s.message());
      return;
    }
    job->suspect = false;
  } else {
    // A failed result is its code and error: whatever outputs a worker
    // sent with it (those copied before a failure) are unchecked bytes of
    // a job that did not run to its end, and are not kept.
    DropPeerFiles(m.files, schema::kWorkerFilePrefix);
    m.files.clear();
    m.outputs.clear();
    frames.resize(std::min<size_t>(frames.size(), 3));
  }
  Frames data;
  for (size_t i = 3; i < frames.size(); ++i) data.push_back(std::move(frames[i]));
  Finish(*job, m.state, m.code, std::move(m.error), m.timing, std::move(m.outputs),
         std::move(data), w.device.uuid, std::move(m.files));
}

void BrokerCore::WorkerLost(const std::string& id, const std::string& why, bool lives) {
  if (!workers_.Find(id)) return;
  outboxes_.erase(id);  // jobs not sent yet: requeued below with the rest
  Worker w = workers_.Remove(id);
  ++counters_.workers_lost;
  for (const auto& [jid, held] : w.inflight) {
    if (held.tenant_counted) tenants_.Stopped(held.tenant);  // abandoned attempts end with it
  }
  spdlog::warn("worker {} ({}) is gone: {}; {} jobs were in flight", w.name, w.device.uuid, why,
               w.inflight.size());
  Requeue(w, w.inflight, why, lives);
  // A process that lives on (it registered again) may still run what it
  // held, and answers for it. One that fell silent, could not be reached or
  // kept a job past its limit may live on too, and write the ranges it held:
  // they stay taken until its region channel closes, which the kernel does
  // when the process that maps the regions is gone. A worker without that
  // channel was handed no region.
  if (lives) return;
  if (w.local && region_server_.HasWorker(w.token)) {
    holds_until_closed_[w.token].insert(id);
    return;
  }
  ReleaseHolds(id);
}

void BrokerCore::Requeue(const Worker& w, const std::map<uint64_t, Worker::Held>& inflight,
                         const std::string& why, bool lives) {
  const bool alone = inflight.size() == 1;
  for (const auto& [jid, held] : inflight) {
    Job* job = jobs_.Find(jid);
    if (!job || job->state != JobState::kDispatched || job->worker != w.id ||
        job->attempt_no != held.attempt) {
      continue;
    }
    job->loading = false;
    if (w.local && job->spec->local_out) {
      // The output files the lost attempt may have begun (w-ID-ATTEMPT-ARG).
      std::vector<schema::LocalFile> begun;
      const std::vector<schema::Arg>& buffers = job->spec->buffer_list();
      for (size_t a = 0; a < buffers.size(); ++a) {
        const schema::ArgKind k = buffers[a].kind;
        if (k != schema::ArgKind::kOut && k != schema::ArgKind::kInOut) continue;
        begun.push_back({schema::WorkerOutputName(job->id, held.attempt, static_cast<uint32_t>(a)),
                         0});
      }
      DropPeerFiles(begun, schema::kWorkerFilePrefix);
    }
    // A job that was alone on a worker that died is the culprit; jobs that
    // shared it are suspects, replayed one at a time. A worker that lives
    // on (it lost touch with the broker and registered again) convicts no
    // one, and makes no one a suspect.
    // A job whose region has ended while it ran does not run again.
    if (job->regions && !regions_.Live(jid)) {
      Finish(*job, JobState::kFailed, Code::kUnavailable,
             "its worker was lost while it ran (" + why + "), and a region it names has ended");
      continue;
    }
    // A job that writes a region is not run again: the lost attempt may
    // have written part of its ranges (an inout range read again would not
    // be what the client put there), and may still be writing them (its
    // ranges stay held until its worker answers or is gone).
    if (job->region_writes) {
      Finish(*job, JobState::kFailed, Code::kUnavailable,
             "its worker was lost while it ran (" + why +
                 "); a job that writes a region is not run again, and its ranges may hold "
                 "part of its output");
      continue;
    }
    if (job->suspect && alone && !lives) {
      Finish(*job, JobState::kFailed, Code::kKernelFault,
             "its worker died while running it alone (" + why + ")");
      continue;
    }
    if (job->attempts >= opt_.max_attempts) {
      Finish(*job, JobState::kFailed, Code::kUnavailable,
             "lost with its worker " + std::to_string(job->attempts) + " times (" + why + ")");
      continue;
    }
    // Requeued as a suspect: it runs alone next time, and is judged then.
    if (!lives) job->suspect = true;
    ++counters_.requeued;
    LeftGpu(*job, /*ended=*/false);
    batch_->attempts.push_back({job->id, job->attempts, job->suspect});
    jobs_.Requeue(*job);
  }
}

void BrokerCore::OnHealth(Worker& w, const schema::GpuHealth& h) {
  w.health = h;
  if (h.drain.empty() || !w.drained.empty()) return;
  // A GPU with a critical Xid or an uncorrectable ECC error takes no more
  // jobs. What it holds runs again elsewhere: the GPU is to blame, not the
  // jobs, so none is convicted or made a suspect; results that still come
  // from it are stale.
  w.drained = h.drain;
  ++counters_.gpus_drained;
  spdlog::warn("GPU {} of worker {} is drained: {}; {} jobs in flight run again elsewhere",
               w.device.uuid, w.name, h.drain, w.inflight.size());
  std::map<uint64_t, Worker::Held> held;
  held.swap(w.inflight);
  w.credits = w.slots;
  w.exclusive = false;
  Requeue(w, held, "its GPU was drained: " + h.drain, /*lives=*/true);
}

void BrokerCore::Heartbeats() {
  const auto silent = opt_.heartbeat * opt_.heartbeat_misses;
  for (const std::string& id : workers_.SilentSince(workers_drained_ - silent)) {
    WorkerLost(id, "silent for too long");
  }
  BrokerMessage hb;
  hb.op = BrokerOp::kHeartbeat;
  for (const auto& [id, w] : workers_.all()) {
    SendWorker(w.liveness_id.empty() ? id : w.liveness_id, hb);
  }
}

void BrokerCore::QueueToWorker(const std::string& id, const BrokerMessage& m, Frames payload) {
  Outbox& box = outboxes_[id];
  box.headers.push_back(schema::EncodeBrokerMessage(m));
  box.payloads.push_back(std::move(payload));
}

void BrokerCore::FlushWorkers() {
  std::map<std::string, Outbox> boxes;
  boxes.swap(outboxes_);
  for (auto& [id, box] : boxes) {
    if (!workers_.Find(id) || box.headers.empty()) continue;
    // Several jobs for one worker go as one batch.
    Frames frames;
    frames.emplace_back(id.data(), id.size());
    frames.emplace_back(schema::kWorkerProtocol.data(), schema::kWorkerProtocol.size());
    if (box.headers.size() > 1) {
      schema::Batch batch;
      for (const Frames& p : box.payloads) batch.parts.push_back(static_cast<uint32_t>(1 + p.size()));
      const std::string header = schema::EncodeBatch(batch);
      frames.emplace_back(header.data(), header.size());
    }
    for (size_t i = 0; i < box.headers.size(); ++i) {
      frames.emplace_back(box.headers[i].data(), box.headers[i].size());
      for (zmq::message_t& f : box.payloads[i]) frames.push_back(std::move(f));
    }
    bool sent = false;
    try {
      sent = zmq::send_multipart(worker_sock_, frames, zmq::send_flags::dontwait).has_value();
    } catch (const zmq::error_t& e) {
      spdlog::warn("worker unreachable: {}", e.what());
    }
    if (!sent) WorkerLost(id, "unreachable");
  }
}

}  // namespace gpuq::broker
