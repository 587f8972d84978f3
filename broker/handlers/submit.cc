#include "broker/compile/compile_request.h"
#include "broker/handlers/handlers.h"
#include "schema/filename.h"

namespace gpuq::broker::handlers {

void Submit(BrokerCore& core, const RequestContext& ctx, schema::ClientRequest& req,
            Frames& frames) {
  schema::JobSpec& spec = req.job;
  // On CURVE the tenant is the key's, whatever the job says.
  const std::string tenant =
      !ctx.tenant.empty() ? ctx.tenant : spec.tenant.empty() ? "default" : spec.tenant;
  // The client's files a submit names are the broker's to remove unless it
  // takes them.
  // A refusal is answered once they are gone.
  auto reject = [&](const gpuq::Status& s, uint64_t retry_after_ms = 0) {
    ++core.counters().rejected;
    if (spec.files.empty()) return core.ReplyError(ctx, s, retry_after_ms);
    core.DropPeerFiles(spec.files, schema::kClientFilePrefix);
    core.batch().on_done.push_back(
        [&core, ctx, s, retry_after_ms] { core.ReplyError(ctx, s, retry_after_ms); });
  };
  if (!spec.files.empty()) {
    if (!core.LocalClients()) {
      return reject(Error(Code::kInvalid, "local files need the broker's ipc endpoint"));
    }
    for (const schema::LocalFile& f : spec.files) {
      // The prefix keeps a client from naming the store's own files (another
      // job's buffers). The rest (a regular file of one link, of the size
      // named) is checked where the file is taken, by the store.
      if (!schema::IsClientFileName(f.name)) {
        return reject(Error(Code::kInvalid, "local file '" + f.name + "' must be named c-..."));
      }
    }
  }
  if (gpuq::Status s = compile::ValidateOptions(spec.kernel.options); !s.ok()) return reject(s);
  for (size_t i = 0; i < spec.sources.size(); ++i) {
    if (gpuq::Status s = compile::ValidateOptions(spec.sources[i].options); !s.ok()) {
      return reject(s.WithContext("source " + std::to_string(i + 1)));
    }
  }
  if (!spec.placement.arch.empty()) {
    if (gpuq::Status s = compile::ValidateArch(spec.placement.arch); !s.ok()) return reject(s);
  }
  if (!core.store_failure().ok()) {
    return reject(Error(core.store_failure().code(),
                        "the job store cannot write (" + core.store_failure().message() +
                            "); try again later"),
                  1000);
  }
  // Idempotency: the same key returns the job it named first. A key the
  // broker no longer holds in memory is looked up by the store thread.
  if (!spec.key.empty()) {
    if (Job* existing = core.jobs().FindByKey(tenant, spec.key)) {
      core.DropPeerFiles(spec.files, schema::kClientFilePrefix);
      if (!existing->durable) {
        existing->also_accepted.push_back(ctx);
        return;
      }
      schema::ClientReply r;
      r.op = schema::ReplyOp::kAccepted;
      r.id = existing->id;
      r.existing = true;
      return (void)core.Reply(ctx, std::move(r));
    }
  }
  // Ranges of registered regions: the tenant's own, live, in bounds, and
  // written by no other unfinished job (PROTOCOL.md, "Regions"); after the
  // key, so that a retry of a job that writes a range is answered with
  // that job, not refused for the ranges it holds.
  const bool regions = NamesRegions(spec);
  if (regions) {
    if (!core.LocalClients() || !core.region_server().listening()) {
      return reject(Error(Code::kInvalid, "regions need the broker's ipc endpoint and its "
                                          "local directory"));
    }
    if (gpuq::Status s = core.regions().Check(tenant, spec.buffer_list()); !s.ok()) {
      return reject(s);
    }
  }
  uint64_t bytes = 0;
  for (size_t i = 3; i < frames.size(); ++i) bytes += frames[i].size();
  for (const schema::LocalFile& f : spec.files) bytes += f.size;
  const uint64_t held = bytes + SpecTextBytes(spec);
  uint64_t retry_after_ms = 0;
  const TenantPolicy& policy = core.tenants().Policy(tenant);
  if (gpuq::Status s = core.jobs().CanAdmit(tenant, held, &retry_after_ms, policy.max_queued,
                                            policy.max_queued_bytes);
      !s.ok()) {
    return reject(s, retry_after_ms);
  }
  // Rate limits last: a submit refused for another reason takes no tokens.
  if (gpuq::Status s = core.tenants().Admit(tenant, bytes, core.clock().Now(), &retry_after_ms);
      !s.ok()) {
    return reject(s, retry_after_ms);
  }
  if (spec.time_limit_ms == 0) spec.time_limit_ms = core.options().default_time_limit_ms;

  auto job = std::make_unique<Job>();
  job->id = core.NextId();
  job->tenant = tenant;
  job->key = spec.key;
  job->submitter = ctx.conn;
  job->priority = spec.priority;
  job->accepted_ms = core.clock().UnixMs();
  job->accepted = core.clock().Now();
  job->deadline_ms =
      spec.deadline_ms ? job->accepted_ms + static_cast<int64_t>(spec.deadline_ms) : 0;
  job->input_bytes = bytes;
  job->held_bytes = held;
  if (regions) {
    job->regions = true;
    for (const schema::Arg& a : spec.buffer_list()) {
      if (a.in_region() && a.kind != schema::ArgKind::kIn) job->region_writes = true;
    }
    core.regions().Use(job->id, spec.buffer_list());
  }

  InsertOp op;
  op.conn = ctx.conn;
  op.rid = ctx.rid;
  op.files = spec.files;
  for (size_t i = 3; i < frames.size(); ++i) {
    JobInput in;
    in.size = frames[i].size();
    in.in_memory = true;
    op.frames.emplace_back().copy(frames[i]);  // shares the bytes
    in.bytes = std::move(frames[i]);
    job->inputs.push_back(std::move(in));
  }
  const size_t nframes = job->inputs.size();
  for (size_t i = 0; i < spec.files.size(); ++i) {
    JobInput in;
    in.size = spec.files[i].size;
    in.path = core.InputPath(job->id, nframes + i);
    job->inputs.push_back(std::move(in));
  }
  spec.files.clear();  // stored as the job's input rows, after the frames
  StoredJob& row = op.row;
  row.id = job->id;
  row.tenant = tenant;
  row.key = spec.key;
  row.priority = spec.priority;
  row.accepted_ms = job->accepted_ms;
  row.deadline_ms = job->deadline_ms;
  job->spec = std::make_shared<const schema::JobSpec>(std::move(spec));
  op.spec = job->spec;
  core.Admit(std::move(job), std::move(op));
}

}  // namespace gpuq::broker::handlers
