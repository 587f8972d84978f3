#include "broker/core.h"
#include "broker/frames.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <tuple>

#include "schema/codec.h"
#include "schema/filename.h"

namespace gpuq::broker {

using schema::ClientReply;
using schema::JobState;
using schema::ReplyOp;

namespace {

// How long to wait before writing again after a failed commit.
constexpr std::chrono::milliseconds kStoreRetry{500};

}  // namespace

BrokerCore::BrokerCore(const BrokerOptions& options, const Clock* clock, zmq::socket_t& clients,
                       zmq::socket_t& workers, std::unique_ptr<StoreThread> store,
                       std::unique_ptr<compile::CompileService> compiler, uint64_t next_id,
                       uint64_t epoch, std::function<void()> wake, TenantPolicies tenants)
    : opt_(options),
      clock_(clock),
      client_sock_(clients),
      worker_sock_(workers),
      store_(std::move(store)),
      compiler_(std::move(compiler)),
      wake_(std::move(wake)),
      local_dir_(store_->store().blob_dir()),
      local_clients_(options.client_endpoint.rfind("ipc://", 0) == 0),
      next_id_(next_id),
      epoch_(epoch),
      jobs_(JobTable::Bounds{options.max_queued, options.max_queued_per_tenant,
                             options.max_queued_bytes}),
      tenants_(std::move(tenants)) {
  jobs_.scheduler().SetWeights(
      [this](const std::string& tenant) { return tenants_.Policy(tenant).weight; });
  compile_latency_ = &counters_.latency["compile"];
  started_ = clock_->Now();
}

void BrokerCore::LeftGpu(Job& job, bool ended, bool stopped) {
  if (stopped) tenants_.Stopped(job.tenant);
  if (ended) {
    jobs_.scheduler().Settle(job.tenant, job.charged_us,
                             static_cast<double>(MicrosBetween(job.dispatched, clock_->Now())));
  }
  job.charged_us = 0;
}

void BrokerCore::SetTenantPolicies(TenantPolicies policies) {
  tenants_.Reconfigure(std::move(policies));
}

BrokerCore::~BrokerCore() {
  compiler_.reset();
  store_.reset();
}

// ---------------------------------------------------------------- replies

uint64_t BrokerCore::ReplyBudget(const ConnectionRef& c) const {
  const uint64_t queued = connections_.QueuedBytes(c);
  return opt_.max_unread_bytes > queued ? opt_.max_unread_bytes - queued : 0;
}

bool BrokerCore::Reply(const RequestContext& ctx, ClientReply reply, Frames payload,
                       bool counted) {
  if (!connections_.Sendable(ctx.conn)) {
    spdlog::debug("reply {} to rid {} dropped: its connection {} has gone",
                  schema::ReplyOpName(reply.op), ctx.rid, ctx.conn.serial);
    return false;
  }
  reply.rid = ctx.rid;
  const std::string header = schema::EncodeClientReply(reply);
  try {
    auto more = zmq::send_flags::sndmore | zmq::send_flags::dontwait;
    if (!client_sock_.send(zmq::buffer(ctx.conn.routing_id), more)) {
      // Its queue is full: it is not reading. What was pushed stays fetchable.
      ++counters_.replies_dropped;
      spdlog::debug("reply to rid {} dropped: connection {} is not reading", ctx.rid,
                    ctx.conn.serial);
      return false;
    }
    client_sock_.send(zmq::buffer(schema::kClientProtocol), zmq::send_flags::sndmore);
    const auto last = payload.empty() ? zmq::send_flags::none : zmq::send_flags::sndmore;
    if (counted) {
      client_sock_.send(connections_.Counted(ctx.conn, zmq::message_t(header)), last);
    } else {
      client_sock_.send(zmq::buffer(header), last);
    }
    for (size_t i = 0; i < payload.size(); ++i) {
      client_sock_.send(connections_.Counted(ctx.conn, std::move(payload[i])),
                        i + 1 < payload.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
    }
  } catch (const zmq::error_t& e) {
    // EHOSTUNREACH: the client has gone.
    spdlog::debug("client connection {} unreachable: {}", ctx.conn.serial, e.what());
    return false;
  }
  return true;
}

void BrokerCore::ReplyError(const RequestContext& ctx, const Status& s, uint64_t retry_after_ms,
                            uint64_t id) {
  (void)SendError(ctx, s, retry_after_ms, id);
}

namespace {

ClientReply ErrorReply(const Status& s, uint64_t retry_after_ms, uint64_t id) {
  ClientReply r;
  r.op = ReplyOp::kError;
  r.id = id;
  r.code = s.code() == Code::kOk ? Code::kInternal : s.code();
  r.error = s.message();
  r.retry_after_ms = retry_after_ms;
  return r;
}

}  // namespace

bool BrokerCore::SendError(const RequestContext& ctx, const Status& s, uint64_t retry_after_ms,
                           uint64_t id) {
  return Reply(ctx, ErrorReply(s, retry_after_ms, id));
}

bool BrokerCore::SendCountedError(const RequestContext& ctx, const Status& s) {
  return Reply(ctx, ErrorReply(s, 0, 0), {}, /*counted=*/true);
}

void BrokerCore::SendResult(const ConnectionRef& conn, uint64_t rid, ClientReply header,
                            std::vector<std::pair<uint32_t, JobInput>> outputs, bool local_out) {
  // Frames first, then files, each in argument order (PROTOCOL.md): an
  // output is a file when the job asked for local outputs, the client shares
  // this host and the store keeps it as a file.
  const bool files_ok = local_out && local_clients_;
  std::stable_sort(outputs.begin(), outputs.end(), [&](const auto& a, const auto& b) {
    const bool fa = files_ok && !a.second.path.empty(), fb = files_ok && !b.second.path.empty();
    return fa != fb ? !fa : a.first < b.first;
  });
  Frames payload;
  header.outputs.clear();
  header.files.clear();
  for (auto& [arg, out] : outputs) {
    header.outputs.push_back(arg);
    if (files_ok && !out.path.empty()) {
      header.files.push_back({out.path, out.size});
    } else {
      payload.push_back(std::move(out.bytes));
    }
  }
  RequestContext ctx;
  ctx.conn = conn;
  ctx.rid = rid;
  Reply(ctx, std::move(header), std::move(payload));
}

// ---------------------------------------------------------------- the store

void BrokerCore::DropPeerFiles(const std::vector<schema::LocalFile>& files,
                               std::string_view prefix) {
  for (const schema::LocalFile& f : files) {
    // Plain names only (the codec checks): never another directory's file.
    if (f.name.rfind(prefix, 0) == 0) batch_->unlink.push_back(local_dir_ + "/" + f.name);
  }
}

void BrokerCore::Flush() {
  if (!store_->Idle()) return;
  const auto now = clock_->Now();
  if (!unwritten_.empty() && now >= retry_writes_at_) {
    for (FinishOp& op : unwritten_) batch_->finishes.push_back(std::move(op));
    unwritten_.clear();
    for (AttemptsOp& op : uncounted_) batch_->attempts.push_back(op);
    uncounted_.clear();
  }
  if (batch_->empty()) return;
  batch_->submitted = now;
  store_->Submit(std::move(batch_));
  batch_ = std::make_unique<Batch>();
}

void BrokerCore::OnBatchesDone() {
  std::vector<std::unique_ptr<Batch>> done = store_->TakeDone();
  if (done.empty()) return;
  // Pushes and replies after a commit go to connections that may have gone.
  connections_.DrainEvents();
  for (std::unique_ptr<Batch>& b : done) {
    if (b->has_writes()) {
      if (b->status.ok()) {
        if (!store_failure_.ok()) spdlog::info("the job store writes again");
        store_failure_ = Status::Ok();
      } else {
        if (store_failure_.ok()) {
          spdlog::error("the job store cannot commit: {}; refusing submits until it can",
                        b->status.ToString());
        }
        store_failure_ = b->status;
        retry_writes_at_ = clock_->Now() + kStoreRetry;
      }
    }
    if (b->purged) spdlog::info("purged {} results past retention", b->purged);
    ++counters_.store_batches;
    counters_.store_writes += b->inserts.size() + b->finishes.size() + b->attempts.size();
    counters_.store_batch_us.Observe(MicrosBetween(b->submitted, clock_->Now()));
    for (InsertOp& op : b->inserts) OnInserted(op);
    for (FinishOp& op : b->finishes) OnFinished(op, b->status);
    for (const AttemptsOp& op : b->attempts) {
      Job* job = jobs_.Find(op.id);
      if (!job) continue;
      if (b->status.ok()) {
        job->attempts_stored = std::max(job->attempts_stored, op.attempts);
      } else {
        uncounted_.push_back(op);
      }
    }
    for (ReadOp& r : b->reads) OnRead(r);
    for (auto& f : b->on_done) f();
  }
}

void BrokerCore::OnInserted(InsertOp& op) {
  Job* job = jobs_.Find(op.row.id);
  RequestContext ctx;
  ctx.conn = op.conn;
  ctx.rid = op.rid;
  if (op.existing || !op.status.ok()) {
    // Not stored: the job leaves, and every request that waited on it hears.
    std::vector<RequestContext> waiting = {ctx};
    if (job) {
      waiting.insert(waiting.end(), job->also_accepted.begin(), job->also_accepted.end());
      for (const RequestContext& c : job->pending_cancels) {
        ReplyError(c, Error(Code::kNotFound, "no job " + std::to_string(op.row.id)), 0,
                   op.row.id);
      }
      Forget(*job);
    }
    // The client's files the store did not take go first; then the answers.
    DropPeerFiles(op.files, schema::kClientFilePrefix);
    const bool full = op.status.code() == Code::kResourceExhausted ||
                      op.status.code() == Code::kIoError;
    for (const RequestContext& c : waiting) {
      if (op.existing) {
        ClientReply r;
        r.op = ReplyOp::kAccepted;
        r.id = *op.existing;
        r.existing = true;
        batch_->on_done.push_back([this, c, r] { Reply(c, r); });
      } else {
        ++counters_.rejected;
        batch_->on_done.push_back(
            [this, c, s = op.status, full] { ReplyError(c, s, full ? 1000 : 0); });
      }
    }
    return;
  }
  if (!job) return;
  job->durable = true;
  ++counters_.submitted;
  ClientReply r;
  r.op = ReplyOp::kAccepted;
  r.id = job->id;
  Reply(ctx, r);
  r.existing = true;
  for (const RequestContext& c : job->also_accepted) Reply(c, r);
  job->also_accepted.clear();
  for (const RequestContext& c : std::exchange(job->pending_cancels, {})) Cancel(*job, c);
}

void BrokerCore::OnFinished(FinishOp& op, const Status& commit) {
  if (!commit.ok()) {
    // Written again once the store can (unless its job's row failed too).
    if (jobs_.Find(op.result.id)) unwritten_.push_back(std::move(op));
    return;
  }
  Job* job = jobs_.Find(op.result.id);
  if (!job) return;
  ClientReply r;
  r.op = ReplyOp::kResult;
  r.id = job->id;
  r.state = op.result.state;
  r.code = op.result.code;
  r.error = op.result.error;
  r.attempts = op.result.attempts;
  r.device = op.result.device;
  r.timing = op.result.timing;
  const bool pushable = connections_.Sendable(job->submitter);
  const bool files_ok = job->spec->local_out && local_clients_;
  std::vector<std::pair<uint32_t, JobInput>> outputs;
  uint64_t bytes = 0;  // sent as frames
  if (pushable) {
    // Output i of the store is frame i, then file i - frames (store path).
    for (size_t i = 0; i < op.result.outputs.size(); ++i) {
      JobInput out;
      if (i < op.frames.size()) {
        out.size = op.frames[i].size();
        if (out.size >= kBlobFileMinBytes) out.path = store_->store().OutputPath(job->id, i);
        out.bytes = std::move(op.frames[i]);
      } else {
        out.size = op.files[i - op.frames.size()].size;
        out.path = store_->store().OutputPath(job->id, i);
      }
      if (!(files_ok && !out.path.empty())) bytes += out.size;
      outputs.emplace_back(op.result.outputs[i], std::move(out));
    }
  }
  if (pushable && bytes <= ReplyBudget(job->submitter)) {
    SendResult(job->submitter, 0, std::move(r), std::move(outputs), job->spec->local_out);
  } else if (pushable) {
    ++counters_.replies_dropped;  // it does not read: it fetches instead
  }
  for (const RequestContext& c : job->cancel_replies) {
    ClientReply cr;
    cr.op = ReplyOp::kCanceled;
    cr.id = job->id;
    cr.state = op.result.state;
    if (op.result.code != Code::kOk) {
      cr.code = op.result.code;
      cr.error = op.result.error;
    }
    Reply(c, std::move(cr));
  }
  jobs_.Remove(job->id);
}

ReadOp& BrokerCore::ReadFor(const RequestContext& ctx, ReadOp::Kind kind, uint64_t id,
                            ReadPurpose purpose) {
  ReadOp& read = batch_->reads.emplace_back();
  read.kind = kind;
  read.id = id;
  read.conn = ctx.conn;
  read.rid = ctx.rid;
  read.tenant = ctx.tenant;
  read.operator_ = ctx.operator_;
  read.purpose = purpose;
  return read;
}

void BrokerCore::FetchResult(const RequestContext& ctx, uint64_t id) {
  auto [it, first] = fetches_.try_emplace(ctx.conn.serial);
  if (!first) {
    Fetches& f = it->second;
    if (f.waiting.size() >= kMaxWaitingFetches) {
      return ReplyError(ctx,
                        Error(Code::kResourceExhausted,
                              std::to_string(f.waiting.size() + 1) +
                                  " result fetches of this connection wait for the store, the "
                                  "broker's bound (read the replies before asking for more)"),
                        0, id);
    }
    f.waiting.emplace_back(ctx, id);
    return;
  }
  ReadResult(ctx, id);
}

void BrokerCore::ReadResult(const RequestContext& ctx, uint64_t id) {
  ReadOp& read = ReadFor(ctx, ReadOp::Kind::kResult, id, kReadResult);
  read.client_local = LocalClients();
  read.max_bytes = ReplyBudget(ctx.conn);
}

void BrokerCore::NextFetch(const ConnectionRef& conn) {
  auto it = fetches_.find(conn.serial);
  if (it == fetches_.end()) return;
  Fetches& f = it->second;
  while (!f.waiting.empty()) {
    auto [ctx, id] = std::move(f.waiting.front());
    f.waiting.pop_front();
    if (!connections_.Sendable(ctx.conn)) continue;  // no one to answer
    return ReadResult(ctx, id);
  }
  fetches_.erase(it);
}

void BrokerCore::OnRead(ReadOp& r) {
  if (r.purpose == kReadDispatch) return OnDispatchInputs(r);
  RequestContext ctx;
  ctx.conn = r.conn;
  ctx.rid = r.rid;
  ctx.tenant = r.tenant;
  ctx.operator_ = r.operator_;
  if (r.purpose == kReadUsage) {
    if (!r.status.ok()) return ReplyError(ctx, r.status);
    ClientReply reply;
    reply.op = ReplyOp::kUsage;
    reply.usage = std::move(r.usage);
    return (void)Reply(ctx, std::move(reply));
  }
  // A job whose result has not committed (the store failed): ask again
  // once it has.
  if (Job* j = jobs_.Find(r.id);
      j && j->ended() && ctx.Sees(j->tenant) && (!r.job || !IsTerminal(r.job->state))) {
    ReadOp again = std::move(r);
    again.status = Status::Ok();
    again.job.reset();
    again.result.reset();
    batch_->reads.push_back(std::move(again));
    return;
  }
  // A result read, answered below: the connection's next fetch goes once
  // this reply is queued (its bytes count against the next one's budget).
  struct NextFetchAfter {
    BrokerCore* core;
    const ConnectionRef* conn;
    ~NextFetchAfter() {
      if (conn) core->NextFetch(*conn);
    }
  } next_fetch{this, r.purpose == kReadResult ? &r.conn : nullptr};
  const Status unknown = Error(Code::kNotFound, "no job " + std::to_string(r.id));
  if (r.job && !ctx.Sees(r.job->tenant)) return ReplyError(ctx, unknown, 0, r.id);
  if (!r.status.ok()) return ReplyError(ctx, r.status, 0, r.id);
  if (!r.job) return ReplyError(ctx, unknown, 0, r.id);
  const StoredJob& job = *r.job;
  ClientReply reply;
  reply.id = r.id;
  reply.state = job.state;
  reply.attempts = job.attempts;
  if (r.result) {
    reply.device = r.result->device;
    reply.attempts = r.result->attempts;
    if (r.result->code != Code::kOk) {
      reply.code = r.result->code;
      reply.error = r.result->error;
    }
  }
  switch (r.purpose) {
    case kReadStatus:
      reply.op = ReplyOp::kStatus;
      return (void)Reply(ctx, std::move(reply));
    case kReadCancel:
      reply.op = ReplyOp::kCanceled;
      reply.attempts = 0;
      reply.device.clear();
      return (void)Reply(ctx, std::move(reply));
    case kReadResult: {
      if (!r.result) {
        if (IsTerminal(job.state)) {
          return ReplyError(ctx,
                            Error(Code::kNotFound, "no result for job " + std::to_string(r.id) +
                                                       " (past retention)"),
                            0, r.id);
        }
        reply.op = ReplyOp::kStatus;  // not ended yet
        return (void)Reply(ctx, std::move(reply));
      }
      reply.op = ReplyOp::kResult;
      reply.timing = r.result->timing;
      std::vector<std::pair<uint32_t, JobInput>> outputs;
      for (size_t i = 0; i < r.result->outputs.size() && i < r.result->data.size(); ++i) {
        StoredBuffer& d = r.result->data[i];
        JobInput out;
        out.size = d.size;
        out.path = d.path;
        if (d.path.empty()) out.bytes = Owning(std::move(d.bytes));
        outputs.emplace_back(r.result->outputs[i], std::move(out));
      }
      return SendResult(r.conn, r.rid, std::move(reply), std::move(outputs), job.spec.local_out);
    }
    default:
      return;
  }
}

// ---------------------------------------------------------------- jobs

void BrokerCore::Admit(std::unique_ptr<Job> job, InsertOp insert) {
  Job& j = jobs_.Add(std::move(job));
  batch_->inserts.push_back(std::move(insert));
  // Queued at once: it may run while its row commits (its client hears
  // `accepted` only after the commit, and its result is written after the
  // row, so pushed after that).
  jobs_.Queue(j);
  j.last_matched = clock_->Now();
  for (const auto& arch : workers_.archs()) {
    if (j.spec->placement.arch.empty() || j.spec->placement.arch == arch) RequestCompile(j, arch);
  }
}

void BrokerCore::Forget(Job& job) {
  const uint64_t id = job.id;
  // A worker that holds it answers a job the broker no longer knows: its
  // result is dropped, its slot freed then (at once when the job never
  // reached it: its inputs were still being read), and so does its place
  // among its tenant's jobs on GPUs.
  const bool sent = job.state == JobState::kDispatched && !job.loading;
  if (job.state == JobState::kDispatched) {
    Worker* w = workers_.Find(job.worker);
    LeftGpu(job, /*ended=*/false, /*stopped=*/!(sent && w));
    if (sent && w) {
      workers_.Abandon(*w, id, job.tenant);
    } else if (w) {
      workers_.TakeResult(*w, id, job.attempt_no);
    }
  }
  // Its writes gathered since must not reach the store: they name a row
  // that is not there.
  auto& fin = batch_->finishes;
  fin.erase(std::remove_if(fin.begin(), fin.end(),
                           [&](const FinishOp& op) { return op.result.id == id; }),
            fin.end());
  unwritten_.erase(std::remove_if(unwritten_.begin(), unwritten_.end(),
                                  [&](const FinishOp& op) { return op.result.id == id; }),
                   unwritten_.end());
  for (auto* att : {&batch_->attempts, &uncounted_}) {
    att->erase(std::remove_if(att->begin(), att->end(),
                              [&](const AttemptsOp& op) { return op.id == id; }),
               att->end());
  }
  if (job.regions) {
    if (sent) {
      HoldRegions(id, job.worker);  // until the worker answers the abandoned job
    } else {
      ReleaseRegions(id);
    }
  }
  jobs_.Remove(id);
}

void BrokerCore::RegionEnded(uint64_t id, uint64_t region, const std::string& why) {
  Job* job = jobs_.Find(id);
  if (!job || job->ended() || job->state == JobState::kDispatched) return;
  Finish(*job, JobState::kFailed, Code::kUnavailable,
         "region " + std::to_string(region) + " ended (" + why + ") before the job ran");
}

void BrokerCore::ReleaseRegions(uint64_t id) {
  for (uint64_t gone : regions_.Release(id)) region_server_.Dropped(gone);
}

void BrokerCore::Answered(uint64_t id, const std::string& worker) {
  auto it = region_holds_.find(id);
  if (it == region_holds_.end() || it->second != worker) return;
  region_holds_.erase(it);
  ReleaseRegions(id);
}

void BrokerCore::ReleaseHolds(const std::string& worker) {
  std::vector<uint64_t> ids;
  for (const auto& [id, w] : region_holds_) {
    if (w == worker) ids.push_back(id);
  }
  for (uint64_t id : ids) {
    region_holds_.erase(id);
    ReleaseRegions(id);
  }
}

void BrokerCore::WorkerChannelClosed(const std::string& token) {
  auto it = holds_until_closed_.find(token);
  if (it == holds_until_closed_.end()) return;
  const std::set<std::string> ids = std::move(it->second);
  holds_until_closed_.erase(it);
  for (const std::string& id : ids) ReleaseHolds(id);
}

void BrokerCore::Finish(Job& job, JobState state, Code code, std::string error,
                        const schema::Timing& worker_timing, std::vector<uint32_t> outputs,
                        Frames frames, const std::string& device,
                        std::vector<schema::LocalFile> files) {
  const auto now = clock_->Now();
  schema::Timing t = worker_timing;
  const bool ran = job.state == JobState::kDispatched;
  t.queue_us = MicrosBetween(job.accepted, ran ? job.dispatched : now);
  t.compile_us = job.compile_us;
  t.cache_hit = job.cache_hit && !job.modules.empty();
  t.total_us = MicrosBetween(job.accepted, now);
  if (!IsTerminal(state)) state = JobState::kFailed;
  // A job whose inputs the store was still reading for its dispatch never
  // reached its worker: nothing will answer for it.
  const bool sent = ran && !job.loading;
  if (ran) {
    Worker* w = workers_.Find(job.worker);
    // A canceled attempt that its worker still runs keeps its slot, and its
    // place among its tenant's jobs on GPUs, until the worker answers for
    // it or is gone (no message stops a kernel).
    const bool runs_on = sent && state == JobState::kCanceled && w;
    LeftGpu(job, /*ended=*/true, /*stopped=*/!runs_on);
    if (runs_on) {
      workers_.Abandon(*w, job.id, job.tenant);
    } else if (!sent && w) {
      workers_.TakeResult(*w, job.id, job.attempt_no);  // its slot is free now
    }
    job.loading = false;
  }
  // A job that ran holds its regions' ranges until its worker has answered
  // for it (its result, which released them, or a late one) or is gone: an
  // attempt canceled, or given up on, may write them until then.
  if (job.regions) {
    if (sent) {
      HoldRegions(job.id, job.worker);
    } else {
      ReleaseRegions(job.id);
    }
  }
  FinishOp op;
  StoredResult& r = op.result;
  r.id = job.id;
  r.state = state;
  r.code = state == JobState::kDone || state == JobState::kCanceled ? Code::kOk : code;
  if (state == JobState::kExpired) r.code = Code::kExpired;
  r.error = r.code == Code::kOk ? "" : std::move(error);
  // Every client decoder refuses error text past the wire's bound: a
  // longer one (a worker's, a compile's with its context) is cut to fit.
  if (const size_t most = schema::Limits{}.max_text_bytes - 64; r.error.size() > most) {
    r.error.resize(most);
    r.error += "\n[gpuq: cut]";
  }
  r.device = device;
  r.attempts = job.attempts;
  r.timing = t;
  r.outputs = std::move(outputs);
  op.frames = std::move(frames);
  op.files = std::move(files);
  op.inputs = job.inputs.size();
  r.tenant = job.tenant;
  r.input_bytes = job.input_bytes;
  op.finished_ms = clock_->UnixMs();

  if (state == JobState::kDone) {
    // The common outcome's counter, kept at hand (a map node stays put).
    if (!done_count_) done_count_ = &counters_.finished[std::string(JobStateName(state))];
    ++*done_count_;
  } else {
    ++counters_.finished[state == JobState::kFailed ? std::string(CodeName(r.code))
                                                    : std::string(JobStateName(state))];
  }
  {
    auto& by_tenant = counters_.by_tenant;
    auto it = by_tenant.find(job.tenant);
    if (it == by_tenant.end()) {
      const uint32_t order = static_cast<uint32_t>(by_tenant.size());
      bool added = false;
      std::tie(it, added) = by_tenant.try_emplace(
          order < StatsSnapshot::kMaxTenantCounters ? job.tenant : "other");
      if (added) it->second.first_seen = order;
    }
    TenantCounters& tc = it->second;
    tc.gpu_us += t.total_us - std::min(t.total_us, t.queue_us);
    ++(state == JobState::kDone       ? tc.done
       : state == JobState::kCanceled ? tc.canceled
       : state == JobState::kExpired  ? tc.expired
                                      : tc.failed);
  }
  if (state == JobState::kDone) {
    if (!done_latency_.total) {
      auto& lat = counters_.latency;
      done_latency_ = {&lat["queue"], &lat["load"], &lat["h2d"],
                       &lat["kernel"], &lat["d2h"], &lat["total"]};
    }
    done_latency_.queue->Observe(t.queue_us);
    done_latency_.load->Observe(t.load_us);
    done_latency_.h2d->Observe(t.h2d_us);
    done_latency_.kernel->Observe(t.kernel_us);
    done_latency_.d2h->Observe(t.d2h_us);
    done_latency_.total->Observe(t.total_us);
  }
  if (state == JobState::kFailed) {
    spdlog::info("job {} failed: {}: {}", job.id, CodeName(r.code),
                 r.error.substr(0, r.error.find('\n')));
  }
  jobs_.End(job, state);
  job.inputs.clear();  // its memory goes with the bounds it no longer counts against
  batch_->finishes.push_back(std::move(op));
}

void BrokerCore::Cancel(Job& job, const RequestContext& ctx) {
  if (!job.durable) {
    job.pending_cancels.push_back(ctx);  // answered once its row has committed
    return;
  }
  job.cancel_replies.push_back(ctx);
  if (!job.ended()) Finish(job, JobState::kCanceled, Code::kOk, "");
}

// ---------------------------------------------------------------- stats

StatsSnapshot BrokerCore::Snapshot(const RequestContext* ctx) {
  const bool all = !ctx || ctx->tenant.empty() || ctx->operator_;
  StatsSnapshot s;
  const Scheduler& queue = jobs_.scheduler();
  if (all) {
    s = counters_;
    s.queued = queue.size();
    s.queued_by_priority = queue.SizeByPriority();
    s.queued_by_tenant = queue.SizeByTenant(StatsSnapshot::kMaxTenantCounters);
    for (const auto& [key, ids] : waiting_compile_) s.compiling += ids.size();
  } else {
    // A tenant sees its own queue and jobs in flight, and no one else's.
    s.tenant_view = true;
    s.queued = queue.TenantSize(ctx->tenant);
    s.queued_by_priority = queue.SizeByPriority(ctx->tenant);
    if (s.queued) s.queued_by_tenant[ctx->tenant] = s.queued;
  }
  for (const auto& [id, w] : workers_.all()) {
    for (const auto& [jid, held] : w.inflight) {
      const Job* job = jobs_.Find(jid);
      if (all || (job && job->tenant == ctx->tenant)) ++s.inflight;
    }
  }
  s.workers = WorkerViews();
  for (const auto& [id, r] : regions_.all()) {
    if (s.regions.size() >= StatsSnapshot::kMaxRegionViews) break;
    if (!all && r.tenant != ctx->tenant) continue;
    s.regions.push_back({id, r.tenant, r.size, r.jobs.size(), r.ended});
  }
  for (const SessionView& v : sessions_.Views(all ? nullptr : ctx)) {
    if (s.sessions.size() >= StatsSnapshot::kMaxRegionViews) break;
    s.sessions.push_back({v.id, v.tenant, v.gpu, v.memory, v.held, v.age_ms, v.pid, v.relayed});
  }
  if (all) {
    for (const auto& v : s.workers) s.inflight_by_worker[v.worker] = v.inflight;
    s.cache_entries = cache_entries.load(std::memory_order_relaxed);
    s.cache_bytes = cache_bytes.load(std::memory_order_relaxed);
    s.quarantined = quarantined;
    s.session_calls = sessions_.relayed_calls();
    s.session_call_bytes = sessions_.relayed_bytes();
  }
  s.uptime_s = std::chrono::duration<double>(clock_->Now() - started_).count();
  return s;
}

std::vector<schema::WorkerView> BrokerCore::WorkerViews() const {
  std::vector<schema::WorkerView> views;
  const auto now = clock_->Now();
  for (const auto& [id, w] : workers_.all()) {
    schema::WorkerView v;
    v.worker = w.name;
    v.device = w.device;
    v.slots = w.slots;
    v.inflight = static_cast<uint32_t>(w.inflight.size());
    v.heartbeat_age_ms = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(now - w.last_seen).count());
    v.health = w.health;
    if (!w.drained.empty()) v.health.drain = w.drained;
    views.push_back(std::move(v));
  }
  return views;
}

}  // namespace gpuq::broker
